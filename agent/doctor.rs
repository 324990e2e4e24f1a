//! `soci-agent doctor` (alias `status`): explains the node's SOCI state.
//! Read-only: every check reads files under `--root`, runs a binary's
//! `--version` (bounded), or asks a live daemon (the SOCI socket, containerd's
//! API, systemd over D-Bus) something that changes nothing. A check that
//! cannot look (no permission, no bus, `--no-live`) says `skip` and why.
//!
//! Each [`Check`] has an id (`group.name`), a [`Verdict`], one line of
//! evidence (the value found and the file and key it came from) and, when not
//! ok, one line of advice. [`diagnose`] is the library entry point (cheap
//! enough to run in a loop); [`run`] is the subcommand: it prints a compact
//! table or JSON and returns exit 0 when nothing failed, 1 otherwise.
//!
//! Groups, in output order: `host` (os, arch, size, disk, storage), `agent`
//! (install record), `soci` (binary, version, digest, other copies),
//! `soci-config`, `containerd`, `nodeadm`, `kubelet`, `systemd`, `live`,
//! `cache` (the data volume, its manifest, hits and misses, free space),
//! `recent` (the last install/boot/prefetch reports).

mod checks_cache;
mod checks_containerd;
mod checks_host;
mod checks_kubelet;
mod checks_live;
mod checks_nodeadm;
mod checks_pull_path;
mod checks_recent;
mod checks_soci;
mod checks_soci_config;
mod checks_systemd;
mod node;
mod output;
mod pause;

mod nodeconfig_yaml;
mod unitfile;

use crate::paths::CONTAINERD_CONFIG;
use std::path::PathBuf;
use std::time::SystemTime;

use serde::Serialize;

use crate::output::OutputFormat;
use crate::rootfs::Root;

pub use node::Node;

/// The ids of the checks other modules act on (the daemon decides its
/// repairs on these and on verdicts, never on evidence text). Ids are part of
/// the JSON contract; a check renamed here is renamed for everyone.
pub mod ids {
    pub const SOCI_SERVICE: &str = "systemd.soci-service";
    pub const CONTAINERD_SERVICE: &str = "systemd.containerd";
    pub const SOCI_SOCKET: &str = "live.soci-socket";
    pub const CONTAINERD_SOCI: &str = "live.containerd-soci";
}
pub use unitfile::{ExecStart, UnitFiles};

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
    /// Could not or need not look (the evidence says why).
    Skip,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "fail",
            Verdict::Skip => "skip",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable id, `group.name` (e.g. `containerd.snapshotter`).
    pub id: &'static str,
    pub verdict: Verdict,
    /// One line: the value found, and the file and key it came from.
    pub evidence: String,
    /// One line saying what to do; `None` when ok.
    pub advice: Option<String>,
}

impl Check {
    pub fn ok(id: &'static str, evidence: impl Into<String>) -> Self {
        Check {
            id,
            verdict: Verdict::Ok,
            evidence: evidence.into(),
            advice: None,
        }
    }
    pub fn warn(id: &'static str, evidence: impl Into<String>, advice: impl Into<String>) -> Self {
        Check {
            id,
            verdict: Verdict::Warn,
            evidence: evidence.into(),
            advice: Some(advice.into()),
        }
    }
    pub fn fail(id: &'static str, evidence: impl Into<String>, advice: impl Into<String>) -> Self {
        Check {
            id,
            verdict: Verdict::Fail,
            evidence: evidence.into(),
            advice: Some(advice.into()),
        }
    }
    /// `why` says what could not be looked at and why.
    pub fn skip(id: &'static str, why: impl Into<String>) -> Self {
        Check {
            id,
            verdict: Verdict::Skip,
            evidence: why.into(),
            advice: None,
        }
    }
    /// Adds (or replaces) the advice.
    pub fn advise(mut self, advice: impl Into<String>) -> Self {
        self.advice = Some(advice.into());
        self
    }
}

/// Count of checks per verdict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub ok: usize,
    pub warn: usize,
    pub fail: usize,
    pub skip: usize,
}

impl Summary {
    pub fn of(checks: &[Check]) -> Self {
        let mut s = Summary::default();
        for c in checks {
            match c.verdict {
                Verdict::Ok => s.ok += 1,
                Verdict::Warn => s.warn += 1,
                Verdict::Fail => s.fail += 1,
                Verdict::Skip => s.skip += 1,
            }
        }
        s
    }
}

/// The whole report: `{"checks":[...], "summary":{ok,warn,fail,skip}}`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub checks: Vec<Check>,
    pub summary: Summary,
}

impl Report {
    pub fn new(checks: Vec<Check>) -> Self {
        let summary = Summary::of(&checks);
        Report { checks, summary }
    }
    /// 0 when no check failed, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.summary.fail > 0)
    }
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("doctor report serializes")
    }
    pub fn to_text(&self) -> String {
        output::table(self)
    }
}

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Exit codes: 0 when no check fails (warn and skip included), 1 otherwise.\n\
JSON: {\"checks\":[{\"id\",\"verdict\",\"evidence\",\"advice\"}],\"summary\":{\"ok\",\"warn\",\"fail\",\"skip\"}}"
)]
pub struct DoctorArgs {
    /// Directory every node path is resolved under (an image root, tests).
    #[arg(long, value_name = "DIR", env = "SOCI_AGENT_ROOT", default_value = "/")]
    pub root: PathBuf,
    /// Report format on stdout.
    #[arg(long, value_enum, env = "SOCI_AGENT_OUTPUT", default_value = "text")]
    pub output: OutputFormat,
    /// The snapshotter's root (checked against containerd's exports.root, free space).
    /// [default: the --root of the unit's ExecStart, else /var/lib/soci-snapshotter-grpc]
    #[arg(long, value_name = "DIR", env = "SOCI_AGENT_SOCI_ROOT", value_parser = crate::flag_values::parse_node_path)]
    pub soci_root: Option<String>,
    /// containerd config file (a node path under --root).
    #[arg(
        long,
        value_name = "PATH",
        env = "SOCI_AGENT_CONTAINERD_CONFIG",
        default_value = CONTAINERD_CONFIG,
        value_parser = crate::flag_values::parse_node_path
    )]
    pub containerd_config: String,
    /// D-Bus address of systemd's bus, e.g. unix:path=/run/dbus/system_bus_socket.
    /// [default: the system bus when --root is /; none otherwise (unit files are read instead)]
    #[arg(long, value_name = "ADDRESS")]
    pub bus_address: Option<String>,
    /// Skip the live checks: the SOCI socket, containerd's API and D-Bus.
    #[arg(long)]
    pub no_live: bool,
    /// containerd's socket as seen from here (not resolved under --root).
    /// [default: /run/containerd/containerd.sock under --root]
    #[arg(long, value_name = "PATH")]
    pub containerd_socket: Option<PathBuf>,
    /// The SOCI socket as seen from here (not resolved under --root).
    /// [default: the socket the unit listens on, under --root]
    #[arg(long, value_name = "PATH")]
    pub soci_socket: Option<PathBuf>,
}

/// Everything [`diagnose`] needs; built once, reusable across runs.
#[derive(Debug, Clone)]
pub struct DoctorContext {
    pub root: Root,
    /// `--soci-root`, when given.
    pub soci_root: Option<String>,
    /// containerd config, a node path.
    pub containerd_config: String,
    /// Explicit bus address; `None` = the system bus when the root is `/`.
    pub bus_address: Option<String>,
    /// Whether to talk to daemons (SOCI socket, containerd, D-Bus).
    pub live: bool,
    /// Host paths overriding the sockets' node paths.
    pub containerd_socket: Option<PathBuf>,
    pub soci_socket: Option<PathBuf>,
    /// "Now", for report ages.
    pub now: SystemTime,
}

impl DoctorContext {
    pub fn from_args(args: &DoctorArgs) -> Self {
        DoctorContext {
            root: Root::new(&args.root),
            soci_root: args.soci_root.clone(),
            containerd_config: args.containerd_config.clone(),
            bus_address: args.bus_address.clone(),
            live: !args.no_live,
            containerd_socket: args.containerd_socket.clone(),
            soci_socket: args.soci_socket.clone(),
            now: SystemTime::now(),
        }
    }
}

/// Runs every check, in output order.
pub async fn diagnose(ctx: &DoctorContext) -> Vec<Check> {
    let node = Node::gather(ctx).await;
    let os = checks_host::os(&node);
    if os.verdict == Verdict::Skip && node.facts.os.is_bottlerocket() {
        return vec![os];
    }
    let mut checks = vec![os];
    checks.extend(checks_host::checks(&node));
    checks.push(checks_recent::record(&node));
    checks.extend(checks_soci::binary_checks(&node).await);
    checks.extend(checks_soci_config::config_checks(&node));
    checks.extend(checks_containerd::checks(&node));
    checks.push(checks_containerd::registry_mirrors(&node));
    checks.extend(checks_nodeadm::checks(&node));
    checks.push(checks_kubelet::image_service_endpoint(&node));
    checks.extend(checks_systemd::checks(&node));
    checks.extend(checks_live::checks(ctx, &node).await);
    checks.extend(checks_cache::checks(ctx, &node).await);
    checks.extend(checks_recent::reports(&node));
    checks
}

/// The subcommand: prints the report, returns the exit code.
pub async fn run(args: &DoctorArgs) -> u8 {
    let ctx = DoctorContext::from_args(args);
    let report = Report::new(diagnose(&ctx).await);
    match args.output {
        OutputFormat::Json => println!("{}", report.to_json()),
        OutputFormat::Text => print!("{}", report.to_text()),
    }
    report.exit_code()
}
