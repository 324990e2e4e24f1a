//! `soci-agent boot`, run by `soci-agent-boot.service` on every boot after
//! containerd and before kubelet: verifies the SOCI binary against the
//! install record, imports the node's pause image into the soci snapshotter
//! (with `snapshotter = "soci"`, a sandbox image unpacked elsewhere leaves the
//! node NotReady), then the pre-pull list. Bounded in time: past the bound it
//! logs loudly and exits 0 so the node still joins, unless `--strict`.

use crate::paths::{CONTAINERD_SOCKET, CTR_CANDIDATES, PAUSE_ARCHIVE};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use std::path::PathBuf;

use clap::Args;

use crate::exit::ExitKind;
use crate::install::record::Record;
use crate::output::OutputFormat;
use crate::release::store::{self, EntryState, Manifest};
use crate::rootfs::Root;

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub name: &'static str,
    /// ok, skipped, failed
    pub status: &'static str,
    pub detail: String,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BootReport {
    pub command: &'static str,
    pub exit_code: u8,
    pub strict: bool,
    pub steps: Vec<Step>,
    pub seconds: f64,
}

impl BootReport {
    pub fn to_text(&self) -> String {
        let mut out = format!("soci-agent boot: exit {} in {:.1}s\n", self.exit_code, self.seconds);
        for s in &self.steps {
            out.push_str(&format!(
                "  {:<8} {:<14} {} ({:.1}s)\n",
                s.status, s.name, s.detail, s.seconds
            ));
        }
        out
    }
}

/// Why the `verify-binary` or `pause-image` step failed (its row's `detail`).
#[derive(Debug, thiserror::Error)]
enum BootError {
    #[error("no install record: run soci-agent install")]
    NoRecord,
    #[error(transparent)]
    Record(#[from] crate::install::record::RecordError),
    #[error("cannot hash {bin}")]
    HashBinary {
        bin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{bin} sha256 {got}, recorded {want}")]
    Checksum {
        bin: String,
        got: crate::release::Sha256Hex,
        want: crate::release::Sha256Hex,
    },
    #[error("{bin} is not soci-agent's link")]
    NotLink {
        bin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{bin} -> {} is outside the store", target.display())]
    OutsideStore { bin: String, target: PathBuf },
    #[error("cannot read store manifest {}", path.display())]
    ReadManifest {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("store manifest {} is not valid JSON", path.display())]
    ParseManifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("store manifest {} has no usable version", path.display())]
    ManifestVersion {
        path: PathBuf,
        #[source]
        source: crate::release::ReleaseError,
    },
    #[error("store entry {} is missing", entry.display())]
    StoreMissing { entry: PathBuf },
    #[error("store entry {} is stale: {why}", entry.display())]
    StoreStale { entry: PathBuf, why: String },
    #[error("no ctr binary found (looked for {})", CTR_CANDIDATES.join(", "))]
    NoCtr,
    #[error(transparent)]
    ContainerdDown(#[from] crate::health::HealthError),
    #[error("cannot run {}", ctr.display())]
    RunCtr {
        ctr: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ctr images import {archive} failed ({status}): {output}")]
    Import {
        archive: String,
        status: std::process::ExitStatus,
        output: String,
    },
}

/// Checks the binary the SOCI unit runs against what install verified.
fn verify_binary(root: &Root, record: &Record) -> Result<String, BootError> {
    let bin = &record.daemon_binary;
    if let Some(want) = &record.adopted_sha256 {
        let got = store::sha256_file(&root.path(bin)).map_err(|source| BootError::HashBinary {
            bin: bin.clone(),
            source,
        })?;
        return if &got == want {
            Ok(format!("{bin} sha256 {got} as recorded"))
        } else {
            Err(BootError::Checksum {
                bin: bin.clone(),
                got,
                want: want.clone(),
            })
        };
    }
    let target = std::fs::read_link(root.path(bin)).map_err(|source| BootError::NotLink {
        bin: bin.clone(),
        source,
    })?;
    let entry = target.parent().ok_or_else(|| BootError::OutsideStore {
        bin: bin.clone(),
        target: target.clone(),
    })?;
    let path = entry.join(store::MANIFEST);
    let manifest_text = std::fs::read_to_string(root.path(&path)).map_err(|source| BootError::ReadManifest {
        path: path.clone(),
        source,
    })?;
    let m: Manifest = serde_json::from_str(&manifest_text).map_err(|source| BootError::ParseManifest {
        path: path.clone(),
        source,
    })?;
    let spec = crate::release::ReleaseSpec {
        version: m
            .version
            .parse()
            .map_err(|source| BootError::ManifestVersion { path, source })?,
        arch: m.arch,
        flavor: m.flavor,
    };
    match store::inspect(root, &spec, Some(&m.archive_sha256)) {
        EntryState::Valid(m) => Ok(format!(
            "{bin} -> SOCI {} matches {} (archive sha256 {})",
            m.version,
            store::MANIFEST,
            m.archive_sha256
        )),
        EntryState::Missing => Err(BootError::StoreMissing {
            entry: entry.to_path_buf(),
        }),
        EntryState::Stale(why) => Err(BootError::StoreStale {
            entry: entry.to_path_buf(),
            why,
        }),
    }
}

/// `ctr` flags differ between containerd 1.6 and 2.x: use what this ctr knows.
async fn import_flags(ctr: &Path) -> Vec<&'static str> {
    let help = tokio::process::Command::new(ctr)
        .args(["images", "import", "--help"])
        .output()
        .await;
    let text = help
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
        .unwrap_or_default();
    let mut flags = Vec::new();
    if text.contains("--discard-unpacked-layers") {
        flags.push("--discard-unpacked-layers=false");
    }
    if text.contains("--local") {
        flags.push("--local");
    }
    flags
}

async fn import_pause(root: &Root, archive: &str) -> Result<String, BootError> {
    let ctr = CTR_CANDIDATES
        .iter()
        .map(|c| root.path(c))
        .find(|p| p.is_file())
        .ok_or(BootError::NoCtr)?;
    let socket = root.path(CONTAINERD_SOCKET);
    crate::health::wait_for_socket(&socket, Duration::from_secs(60)).await?;
    let mut cmd = tokio::process::Command::new(&ctr);
    cmd.arg("--address")
        .arg(&socket)
        .args(["-n", "k8s.io", "images", "import", "--snapshotter", "soci"]);
    cmd.args(import_flags(&ctr).await)
        .arg(root.path(archive))
        .kill_on_drop(true);
    let out = match cmd.output().await {
        Ok(out) => out,
        Err(source) => return Err(BootError::RunCtr { ctr, source }),
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        tracing::info!(target: "ctr", "{line}");
    }
    if out.status.success() {
        Ok(format!(
            "imported {archive} into the soci snapshotter (namespace k8s.io)"
        ))
    } else {
        Err(BootError::Import {
            archive: archive.to_string(),
            status: out.status,
            output: text.trim().to_string(),
        })
    }
}

/// Runs the steps in order, adding each one's row as it ends (so a timeout keeps the
/// rows so far); true when none fails the boot.
async fn steps(args: &BootArgs, root: &Root, report: &mut Vec<Step>) -> bool {
    // Without a usable record the binary cannot be verified; the pause image
    // and the pre-pull still matter, so they run regardless.
    let (step, verified) = verify_step(root);
    report.push(step);
    let (step, imported) = pause_step(root, &args.pause_archive).await;
    report.push(step);
    let (step, misses) = cache_step(root).await;
    report.push(step);
    let (step, prefetched) = prefetch_step(root, args, misses).await;
    report.push(step);
    verified && imported && prefetched
}

impl Step {
    /// A step that did not need to run.
    fn skipped(name: &'static str, detail: String) -> Step {
        Step {
            name,
            status: "skipped",
            detail,
            seconds: 0.0,
        }
    }

    /// A step that ran since `started` and succeeded.
    fn ok(name: &'static str, started: Instant, detail: String) -> Step {
        Step {
            name,
            status: "ok",
            detail,
            seconds: started.elapsed().as_secs_f64(),
        }
    }

    /// A step that ran since `started` and failed; logged as `what` FAILED.
    fn failed(name: &'static str, started: Instant, what: &str, detail: String) -> Step {
        tracing::error!("{what} FAILED: {detail}");
        Step {
            name,
            status: "failed",
            detail,
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}

/// `verify-binary`: the SOCI binary against the install record.
fn verify_step(root: &Root) -> (Step, bool) {
    let t = Instant::now();
    let verified = match Record::load(root) {
        Ok(Some(record)) => verify_binary(root, &record),
        Ok(None) => Err(BootError::NoRecord),
        Err(e) => Err(e.into()),
    };
    match verified {
        Ok(detail) => (Step::ok("verify-binary", t, detail), true),
        Err(e) => (
            Step::failed(
                "verify-binary",
                t,
                "SOCI binary verification",
                crate::exit::error_chain(&e),
            ),
            false,
        ),
    }
}

/// `pause-image`: imports the node's pause archive into soci, when it has one.
async fn pause_step(root: &Root, archive: &str) -> (Step, bool) {
    if !root.path(archive).is_file() {
        return (Step::skipped("pause-image", format!("no {archive} on this node")), true);
    }
    let t = Instant::now();
    match import_pause(root, archive).await {
        Ok(detail) => (Step::ok("pause-image", t, detail), true),
        Err(e) => (
            Step::failed("pause-image", t, "pause image import", crate::exit::error_chain(&e)),
            false,
        ),
    }
}

/// `cache`: with a sealed data volume attached, which of its images this
/// node has (`cache verify`); the misses are prefetched next. Never fails the
/// boot: a miss is pulled, an unreadable cache is a warning.
async fn cache_step(root: &Root) -> (Step, Vec<String>) {
    if !root.exists(crate::cache::manifest_path()) {
        return (
            Step::skipped("cache", "no snapshot cache (data volume manifest) on this node".into()),
            Vec::new(),
        );
    }
    let t = Instant::now();
    // Right after containerd starts its CRI socket may not be there yet: a miss then would be false.
    if let Err(e) = crate::health::wait_for_socket(&root.path(CONTAINERD_SOCKET), Duration::from_secs(60)).await {
        return (
            Step::failed("cache", t, "snapshot cache check", e.to_string()),
            Vec::new(),
        );
    }
    let v = crate::cache::verify::verify(root, None).await;
    for w in &v.warnings {
        tracing::warn!("{w}");
    }
    let detail = match &v.error {
        Some(e) => format!("{e}; prefetching the configured images only"),
        None => format!(
            "{} hit, {} miss{}",
            v.hits,
            v.misses,
            if v.misses > 0 { ": prefetching the misses" } else { "" }
        ),
    };
    (Step::ok("cache", t, detail), v.missing())
}

/// `prefetch`: pre-pulls the configured images and the cache's misses, if
/// any; a bad config fails the boot.
async fn prefetch_step(root: &Root, args: &BootArgs, misses: Vec<String>) -> (Step, bool) {
    let opts = crate::prefetch::PrefetchOptions::from_config(root.base(), args.config.as_deref()).map(|mut o| {
        o.images.extend(misses);
        o
    });
    match opts {
        Err(e) => {
            let step = Step {
                name: "prefetch",
                status: "failed",
                detail: crate::exit::error_chain(&e),
                seconds: 0.0,
            };
            (step, false)
        }
        Ok(opts) if opts.images.is_empty() => (
            Step::skipped("prefetch", "no [prefetch] images configured".into()),
            true,
        ),
        Ok(opts) => pre_pull(root, &opts).await,
    }
}

/// Pre-pulls `opts.images` and saves prefetch's own report; a failed image fails the
/// boot only when `[prefetch] strict` asks for it.
async fn pre_pull(root: &Root, opts: &crate::prefetch::PrefetchOptions) -> (Step, bool) {
    let t = Instant::now();
    let mut pre = crate::prefetch::prefetch(opts).await;
    if pre.failed().next().is_some()
        && let Some(hint) = crate::cache::volume::full_hint(root)
    {
        tracing::error!("{hint}");
        pre.warnings.push(hint);
    }
    let json = pre.to_json();
    crate::history::record_run(root, "prefetch", &json, pre.exit_code, &Default::default(), None);
    let detail = format!(
        "{} image(s): {} hit, {} pulled, {} failed",
        pre.images.len(),
        pre.summary.hit,
        pre.summary.pulled,
        pre.summary.failed
    );
    let failed = !pre.all_ok();
    if failed {
        tracing::error!("image pre-pull had failures: {detail}");
    }
    let step = Step {
        name: "prefetch",
        status: if failed { "failed" } else { "ok" },
        detail,
        seconds: t.elapsed().as_secs_f64(),
    };
    (step, !(failed && opts.strict))
}

/// The subcommand: runs the steps within `--timeout`, saves the report, and returns it with the output format.
pub async fn run(args: &BootArgs) -> (BootReport, OutputFormat) {
    let started = Instant::now();
    let root = Root::new(&args.root);
    let mut list = Vec::new();
    let bound = Duration::from_secs_f64(args.timeout);
    let ok = match tokio::time::timeout(bound, steps(args, &root, &mut list)).await {
        Ok(ok) => ok,
        Err(_) => {
            tracing::error!("soci-agent boot did not finish within {bound:?}: giving up so kubelet can start");
            list.push(Step {
                name: "timeout",
                status: "failed",
                detail: format!("gave up after {bound:?}"),
                seconds: bound.as_secs_f64(),
            });
            false
        }
    };
    let kind = if ok || !args.strict {
        ExitKind::Ok
    } else {
        ExitKind::Failed
    };
    if !ok && !args.strict {
        tracing::error!(
            "soci-agent boot had failures (see above); exiting 0 so the node still joins (use --strict to fail)"
        );
    }
    let report = BootReport {
        command: "boot",
        exit_code: kind.code(),
        strict: args.strict,
        steps: list,
        seconds: started.elapsed().as_secs_f64(),
    };
    record(&root, &report, args.textfile_dir.as_deref());
    (report, args.output)
}

/// Saves the report in the run history, with each step's seconds as a phase.
fn record(root: &Root, report: &BootReport, textfile_dir: Option<&str>) {
    let mut phases: std::collections::BTreeMap<String, f64> =
        report.steps.iter().map(|s| (s.name.to_string(), s.seconds)).collect();
    phases.insert("total".into(), report.seconds);
    let json = serde_json::to_string_pretty(report).expect("report serializes");
    crate::history::record_run(root, "boot", &json, report.exit_code, &phases, textfile_dir);
}

#[derive(Debug, Clone, Args)]
pub struct BootArgs {
    /// Directory every node path is resolved under.
    #[arg(long, value_name = "DIR", env = "SOCI_AGENT_ROOT", default_value = "/")]
    pub root: PathBuf,
    /// The node's pause image archive, imported into the soci snapshotter when present.
    #[arg(long, value_name = "PATH", default_value = PAUSE_ARCHIVE, value_parser = crate::flag_values::parse_node_path)]
    pub pause_archive: String,
    /// Give up after this many seconds (then exit 0 unless --strict).
    #[arg(long, value_name = "SECS", default_value_t = 600.0, value_parser = crate::flag_values::parse_seconds)]
    pub timeout: f64,
    /// Exit 1 when a step fails or the time bound is hit (default: log loudly, exit 0 so the node joins).
    #[arg(long)]
    pub strict: bool,
    /// Agent config file ([prefetch] images to pre-pull). [default: /etc/soci-agent/config.toml under --root, when present]
    #[arg(long, value_name = "FILE", env = "SOCI_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Also write this run's figures as Prometheus gauges to DIR/soci_agent_boot.prom (under --root).
    #[arg(long, value_name = "DIR", env = "SOCI_AGENT_TEXTFILE_DIR", value_parser = crate::flag_values::parse_node_path)]
    pub textfile_dir: Option<String>,
    /// Report format on stdout.
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}
