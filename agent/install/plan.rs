//! Plan: host facts + settings + the current content of the files involved
//! -> an ordered list of actions, each with its node path, new bytes, mode,
//! diff and effects. Building a plan changes nothing; `apply` carries it out
//! and `--dry-run` prints it.

use crate::paths::{
    AGENT_BINARY, BACKUP_DIR, BIN_DIR, BOOT_SERVICE_PATH, CONTAINERD_DROPIN, CONTAINERD_VERSION_FILE,
    DAEMON_SERVICE_PATH, KUBELET_DROPIN, KUBELET_DROPIN_DIR, KUBELET_DROPIN_PATH, NODEADM_DROPIN, NODEADM_DROPIN_DIR,
    RECORD, SOCI_BINARY_LOCATIONS, SOCI_CONFIG, SOCI_SERVICE, SOCI_SERVICE_DROPIN, SOCI_SERVICE_PATH, SOCI_SOCKET,
    SOCI_SOCKET_PATH, STORE_DIR, UNPIGZ,
};
use serde::Serialize;

use crate::files::containerd_config::{self, ConfigVersion, ContainerdConfigError, Daemon, SociWiring};
use crate::files::soci_config::{Decompressor, SociConfig};
use crate::files::units::{self, DaemonCommand};
use crate::files::{kubelet, nodeconfig};
use crate::host::{HostFacts, InstalledSoci, SociUnit};
use crate::install::args::{PreinstalledPolicy, WiringMode};
use crate::install::record::{Before, Record, RecordError};
use crate::install::settings::{DecompressorChoice, InstallSettings, sibling_checksum};
use crate::release::store::{self, EntryState};
use crate::release::{Arch, BINARIES, DAEMON_BINARY, FIXED_SOCI_VERSION, ReleaseSpec, Sha256Hex, Version};
use crate::rootfs::{FsError, Root};

/// Below these, parallel mode helps little (nodeadm's FastImagePull skips SOCI there).
pub const MIN_CPUS: usize = 4;
pub const MIN_MEMORY_BYTES: u64 = 7 * 1024 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(
        "this is Bottlerocket ({0}): it ships SOCI and configures it through its settings API (settings.container-runtime-plugins / settings.kubernetes); soci-agent does not manage Bottlerocket nodes"
    )]
    Bottlerocket(String),
    #[error("--preinstalled keep: no preinstalled soci-snapshotter-grpc found at {0}")]
    NothingToAdopt(String),
    #[error(
        "--preinstalled keep: the preinstalled {path} is SOCI {version}, which has no parallel pull/unpack mode (needs 0.11.0 or newer)"
    )]
    AdoptTooOld { path: String, version: String },
    #[error(
        "containerd's version is unknown on this nodeadm host (no {file} and no containerd binary): nodeadm \
         renders version 2 or 3 table names by containerd version, and the wrong ones make `nodeadm init` fail; \
         pass --containerd-version (e.g. 2.2)"
    )]
    UnknownContainerdForNodeadm { file: &'static str },
    #[error("{0} (use --arch to choose)")]
    Arch(crate::release::ReleaseError),
    #[error(transparent)]
    Containerd(#[from] ContainerdConfigError),
    #[error("containerd config {path} is not UTF-8")]
    NotUtf8 { path: String },
    #[error("cannot read the checksum file {path}")]
    ReadChecksum { path: String, source: std::io::Error },
    #[error("checksum file {path}: {source}")]
    BadChecksum {
        path: String,
        source: crate::release::ReleaseError,
    },
    #[error("{0} (move it aside to start a fresh record)")]
    Record(String),
    #[error(transparent)]
    Tuning(#[from] crate::files::soci_config::TuningError),
    #[error(transparent)]
    Fs(#[from] FsError),
}

impl PlanError {
    /// Usage/validation errors (exit 2) vs failures reading the node (exit 1).
    pub fn is_usage(&self) -> bool {
        !matches!(self, PlanError::Fs(_) | PlanError::ReadChecksum { .. })
    }
}

/// Where the expected archive digest comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum DigestSource {
    Pinned(Sha256Hex),
    /// The published `.sha256sum` at this URL.
    Published(String),
    /// A local `.sha256sum` file's digest.
    File {
        path: String,
        digest: Sha256Hex,
    },
}

impl DigestSource {
    pub fn known(&self) -> Option<&Sha256Hex> {
        match self {
            DigestSource::Pinned(d) | DigestSource::File { digest: d, .. } => Some(d),
            DigestSource::Published(_) => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "location", rename_all = "snake_case")]
pub enum ArchiveSource {
    Url(String),
    Local(String),
}

/// Downloading, verifying and extracting a release into the store.
#[derive(Debug, Clone, Serialize)]
pub struct ReleaseStep {
    #[serde(skip)]
    pub spec: ReleaseSpec,
    pub source: ArchiveSource,
    pub digest: DigestSource,
    /// Node path of the store entry.
    pub entry: String,
    /// Why the existing entry is replaced, when one exists.
    pub replaces: Option<String>,
}

/// What applying an action does.
#[derive(Debug, Clone)]
pub enum Op {
    Write {
        content: Vec<u8>,
        mode: u32,
    },
    Symlink {
        target: String,
    },
    /// Copy the current file at `source` to the action's path (a backup).
    Backup {
        source: String,
    },
    Release(Box<ReleaseStep>),
    /// Copy a file from outside the root (the agent's own executable),
    /// streamed, to the action's path.
    Copy {
        source: std::path::PathBuf,
        mode: u32,
    },
    /// Remove the file or symlink at the action's path (uninstall).
    Remove,
    /// Copy the file at `source` back to the action's path (uninstall).
    Restore {
        source: String,
    },
    Nothing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    Create,
    Update,
    Unchanged,
    Backup,
    Symlink,
    InstallRelease,
    KeepRelease,
    Remove,
    Restore,
}

/// What a change means for running services (used by the systemd step).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Effects {
    pub daemon_reload: bool,
    pub restart_soci: bool,
    pub restart_containerd: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Action {
    pub path: String,
    pub action: ActionKind,
    pub changed: bool,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diff: Option<String>,
    #[serde(skip)]
    pub op: Op,
    #[serde(skip)]
    pub effects: Effects,
}

/// How containerd and kubelet get wired on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Wiring {
    Nodeadm,
    Containerd,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub arch: Arch,
    /// soci-agent.service is installed (install --daemon).
    pub daemon: bool,
    /// kubelet exists (its drop-in pulls the boot unit in); else the boot
    /// unit is enabled for multi-user.target.
    pub kubelet_present: bool,
    pub wiring: Wiring,
    pub containerd_config_version: ConfigVersion,
    /// The containerd version the wiring was written for, and where it came from.
    pub containerd: Option<String>,
    pub daemon_binary: String,
    /// Which SOCI runs and why (the --preinstalled policy's decision).
    pub soci: SociChoice,
    /// The SOCI binary that checks the new config before it is written
    /// (`config dump`), when it can run here.
    pub soci_check: Option<SociCheck>,
    pub soci_unit: &'static str,
    pub actions: Vec<Action>,
    pub warnings: Vec<String>,
    pub notes: Vec<String>,
}

impl Plan {
    pub fn changed(&self) -> bool {
        self.actions.iter().any(|a| a.changed)
    }
    pub fn effects(&self) -> Effects {
        self.actions
            .iter()
            .filter(|a| a.changed)
            .fold(Effects::default(), |e, a| Effects {
                daemon_reload: e.daemon_reload || a.effects.daemon_reload,
                restart_soci: e.restart_soci || a.effects.restart_soci,
                restart_containerd: e.restart_containerd || a.effects.restart_containerd,
            })
    }
}

/// A SOCI binary (node path) that can load a config here.
#[derive(Debug, Clone, Serialize)]
pub struct SociCheck {
    pub binary: String,
    #[serde(serialize_with = "version_str_plain")]
    pub version: Version,
}

fn version_str_plain<S: serde::Serializer>(v: &Version, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&v.to_string())
}

/// `config dump` exists from SOCI 0.12.0 on.
const CONFIG_DUMP_SINCE: Version = Version {
    major: 0,
    minor: 12,
    patch: 0,
};

/// Which binary can check the config: the store entry's (being installed) or
/// the preinstalled one on a live host; never another architecture's, and
/// never a mounted image's own programs.
fn soci_check(
    root: &Root,
    soci: &SociChoice,
    entry: Option<&str>,
    arch: Arch,
    host_arch: Option<Arch>,
) -> (Option<SociCheck>, Option<String>) {
    let version = match soci.version {
        Some(v) if v >= CONFIG_DUMP_SINCE => v,
        Some(v) => {
            return (
                None,
                Some(format!(
                    "SOCI {v} has no `config dump` (0.12.0+): the config is checked by soci-agent's own rules only"
                )),
            );
        }
        None => {
            return (
                None,
                Some("SOCI version unknown: the config is checked by soci-agent's own rules only".into()),
            );
        }
    };
    if host_arch != Some(arch) {
        return (
            None,
            Some(format!(
                "the {arch} SOCI cannot run on this machine: the config is checked by soci-agent's own rules only"
            )),
        );
    }
    match entry {
        Some(entry) => (
            Some(SociCheck {
                binary: format!("{entry}/{DAEMON_BINARY}"),
                version,
            }),
            None,
        ),
        None if root.is_host() => (
            Some(SociCheck {
                binary: soci.binary.clone(),
                version,
            }),
            None,
        ),
        None => (None, Some("the preinstalled SOCI is inside another root and is not run here: the config is checked by soci-agent's own rules only".into())),
    }
}

/// Which SOCI binary the unit runs, and why.
#[derive(Debug, Clone, Serialize)]
pub struct SociChoice {
    /// Node path of the binary the unit's ExecStart names.
    pub binary: String,
    /// Its SOCI version, when known.
    #[serde(serialize_with = "version_str")]
    pub version: Option<Version>,
    /// `preinstalled` (kept) or `release` (installed from the release tree).
    pub origin: &'static str,
    /// One sentence: the policy and the facts it decided on.
    pub reason: String,
}

fn version_str<S: serde::Serializer>(v: &Option<Version>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_str(&v.to_string()),
        None => s.serialize_none(),
    }
}

/// Applies the `--preinstalled` policy to what detection found.
fn choose_soci(
    policy: PreinstalledPolicy,
    wanted: Version,
    found: Option<&InstalledSoci>,
) -> Result<SociChoice, PlanError> {
    let keep = |f: &InstalledSoci, version: Option<Version>, reason: String| SociChoice {
        binary: f.path.clone(),
        version,
        origin: "preinstalled",
        reason,
    };
    let release = |reason: String| SociChoice {
        binary: format!("{BIN_DIR}/{DAEMON_BINARY}"),
        version: Some(wanted),
        origin: "release",
        reason,
    };
    let Some(f) = found else {
        return match policy {
            PreinstalledPolicy::Keep => Err(PlanError::NothingToAdopt(SOCI_BINARY_LOCATIONS.join(" or "))),
            _ => Ok(release(format!(
                "no preinstalled SOCI: installing {wanted} from the release"
            ))),
        };
    };
    let parsed = f.version.as_deref().and_then(|v| v.parse::<Version>().ok());
    let shown = f.version.as_deref().unwrap_or("of unknown version");
    match policy {
        PreinstalledPolicy::Replace => Ok(release(format!(
            "--preinstalled replace: running {wanted} from the release instead of the preinstalled {} (SOCI {shown})",
            f.path
        ))),
        PreinstalledPolicy::Keep => match parsed {
            Some(v) if v < crate::release::MIN_SOCI_VERSION => Err(PlanError::AdoptTooOld {
                path: f.path.clone(),
                version: v.to_string(),
            }),
            _ => Ok(keep(
                f,
                parsed,
                format!(
                    "--preinstalled keep: running the preinstalled {} (SOCI {shown})",
                    f.path
                ),
            )),
        },
        PreinstalledPolicy::Auto => match parsed {
            Some(v) if v >= FIXED_SOCI_VERSION => Ok(keep(
                f,
                parsed,
                format!(
                    "--preinstalled auto: keeping the preinstalled {} (SOCI {v}, {FIXED_SOCI_VERSION} or newer)",
                    f.path
                ),
            )),
            _ => Ok(release(format!(
                "--preinstalled auto: the preinstalled {} is SOCI {shown}, older than {FIXED_SOCI_VERSION} \
                 (no fixes for soci-snapshotter issues 2035/2036) or unknown: running {wanted} from the release",
                f.path
            ))),
        },
    }
}

/// The containerd version to write for: `--containerd-version`, else detected.
fn containerd_target(s: &InstallSettings, facts: &HostFacts) -> (Option<Daemon>, Option<String>) {
    if let Some(d) = s.containerd_version {
        return (Some(d), Some(format!("{d} (--containerd-version)")));
    }
    match &facts.containerd {
        Some(c) => (
            Some(Daemon {
                major: c.major,
                minor: c.minor,
            }),
            Some(format!("{} (from {})", c.version, c.source)),
        ),
        None => (None, None),
    }
}

/// True when soci-agent wrote this file (its marker comment).
fn written_by_agent(text: &str) -> bool {
    units::is_ours(text) || text.starts_with("# Written by soci-agent")
}

struct Builder<'a> {
    root: &'a Root,
    actions: Vec<Action>,
}

impl Builder<'_> {
    /// Plans writing `content` at `path`, with a backup of a foreign
    /// original before its first change.
    fn file(&mut self, path: &str, content: String, mode: u32, effects: Effects) -> Result<(), FsError> {
        let old = self.root.read_opt(path)?;
        let old_text = old.as_deref().map(String::from_utf8_lossy);
        let same_mode = std::fs::metadata(self.root.path(path))
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777 == mode)
            .unwrap_or(false);
        let (kind, changed) = match &old {
            None => (ActionKind::Create, true),
            Some(b) if b == content.as_bytes() && same_mode => (ActionKind::Unchanged, false),
            Some(_) => (ActionKind::Update, true),
        };
        if changed && let Some(text) = &old_text {
            let backup = format!("{BACKUP_DIR}{path}");
            if !written_by_agent(text) && !self.root.exists(&backup) {
                self.actions.push(Action {
                    path: backup,
                    action: ActionKind::Backup,
                    changed: true,
                    detail: format!("copy of {path} before its first change"),
                    diff: None,
                    op: Op::Backup {
                        source: path.to_string(),
                    },
                    effects: Effects::default(),
                });
            }
        }
        let diff = changed.then(|| crate::diff::unified(path, old_text.as_deref(), &content));
        self.actions.push(Action {
            path: path.to_string(),
            action: kind,
            changed,
            detail: format!("mode {mode:04o}"),
            diff,
            op: if changed {
                Op::Write {
                    content: content.into_bytes(),
                    mode,
                }
            } else {
                Op::Nothing
            },
            effects: if changed { effects } else { Effects::default() },
        });
        Ok(())
    }

    /// Plans installing an executable (no diff; compared by content).
    fn binary(&mut self, path: &str, source: &std::path::Path) -> Result<(), FsError> {
        let read_err = |p: &std::path::Path| {
            let p = p.to_path_buf();
            move |source| FsError::Read { path: p, source }
        };
        let want = store::sha256_file(source).map_err(read_err(source))?;
        let size = std::fs::metadata(source).map_err(read_err(source))?.len();
        let target = self.root.path(path);
        let (kind, changed) = match store::sha256_file(&target) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (ActionKind::Create, true),
            Err(e) => return Err(read_err(&target)(e)),
            Ok(have) if have == want => (ActionKind::Unchanged, false),
            Ok(_) => (ActionKind::Update, true),
        };
        self.actions.push(Action {
            path: path.to_string(),
            action: kind,
            changed,
            detail: format!("{size} bytes, sha256 {want}, mode 0755"),
            diff: None,
            op: if changed {
                Op::Copy {
                    source: source.to_path_buf(),
                    mode: 0o755,
                }
            } else {
                Op::Nothing
            },
            effects: Effects::default(),
        });
        Ok(())
    }

    fn symlink(&mut self, path: &str, target: &str, effects: Effects) -> Result<(), FsError> {
        let resolved = self.root.path(path);
        let current = std::fs::symlink_metadata(&resolved).ok();
        let is_link = current.as_ref().is_some_and(|m| m.file_type().is_symlink());
        let same = is_link && std::fs::read_link(&resolved).is_ok_and(|t| t == std::path::Path::new(target));
        if current.is_some() && !is_link {
            let backup = format!("{BACKUP_DIR}{path}");
            if !self.root.exists(&backup) {
                self.actions.push(Action {
                    path: backup,
                    action: ActionKind::Backup,
                    changed: true,
                    detail: format!("copy of {path} (a file, not soci-agent's link) before it is replaced"),
                    diff: None,
                    op: Op::Backup {
                        source: path.to_string(),
                    },
                    effects: Effects::default(),
                });
            }
        }
        self.actions.push(Action {
            path: path.to_string(),
            action: if same {
                ActionKind::Unchanged
            } else {
                ActionKind::Symlink
            },
            changed: !same,
            detail: format!("-> {target}"),
            diff: None,
            op: if same {
                Op::Nothing
            } else {
                Op::Symlink {
                    target: target.to_string(),
                }
            },
            effects: if same { Effects::default() } else { effects },
        });
        Ok(())
    }
}

/// Adds to `record` the paths this plan touches for the first time, with
/// their state before soci-agent, and the store entries in use. A path
/// already holding exactly our content (left by an interrupted run) counts as
/// created by us, except `merged` (the containerd config, which we only edit).
fn record_paths(root: &Root, mut record: Record, actions: &[Action], merged: &str) -> Record {
    for a in actions {
        let first_time = !record.paths.contains_key(&a.path);
        let backup = format!("{BACKUP_DIR}{}", a.path);
        let backed_up = root.exists(&backup) || actions.iter().any(|b| b.path == backup);
        let before = match (&a.op, a.action) {
            (Op::Release(step), _) => {
                record.store_entries.insert(step.entry.clone());
                continue;
            }
            (_, ActionKind::KeepRelease) => {
                // Everything under the store is soci-agent's own, whoever made it.
                record.store_entries.insert(a.path.clone());
                continue;
            }
            (Op::Backup { .. }, _) => continue,
            _ if !first_time => continue,
            _ if backed_up => Before::Backup { backup },
            (_, ActionKind::Unchanged) if a.path == merged => continue,
            _ => match std::fs::read_link(root.path(&a.path)) {
                Ok(t) if !t.starts_with(STORE_DIR) => Before::Link {
                    target: t.display().to_string(),
                },
                _ => Before::Absent,
            },
        };
        record.paths.insert(a.path.clone(), before);
    }
    record
}

/// The release step, or `None` when the store already holds a verified copy.
fn release_step(
    root: &Root,
    s: &InstallSettings,
    spec: ReleaseSpec,
) -> Result<(Option<ReleaseStep>, Option<String>), PlanError> {
    let (source, digest) = match &s.archive {
        Some(path) => {
            let source = ArchiveSource::Local(path.display().to_string());
            let digest = match &s.sha256 {
                Some(d) => DigestSource::Pinned(d.clone()),
                None => {
                    let sum = sibling_checksum(path);
                    let sum_s = sum.display().to_string();
                    let text = std::fs::read_to_string(&sum).map_err(|source| PlanError::ReadChecksum {
                        path: sum_s.clone(),
                        source,
                    })?;
                    let name = path
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let digest =
                        crate::release::parse_sha256sum(&text, &name).map_err(|source| PlanError::BadChecksum {
                            path: sum_s.clone(),
                            source,
                        })?;
                    DigestSource::File { path: sum_s, digest }
                }
            };
            (source, digest)
        }
        None => {
            let digest = match &s.sha256 {
                Some(d) => DigestSource::Pinned(d.clone()),
                None => DigestSource::Published(spec.checksum_url(&s.release_url)),
            };
            (ArchiveSource::Url(spec.archive_url(&s.release_url)), digest)
        }
    };
    let entry = store::entry_dir(&spec);
    match store::inspect(root, &spec, digest.known()) {
        EntryState::Valid(m) => Ok((
            None,
            Some(format!(
                "verified SOCI {} already installed (archive sha256 {})",
                m.version, m.archive_sha256
            )),
        )),
        EntryState::Missing => Ok((
            Some(ReleaseStep {
                spec,
                source,
                digest,
                entry,
                replaces: None,
            }),
            None,
        )),
        EntryState::Stale(why) => Ok((
            Some(ReleaseStep {
                spec,
                source,
                digest,
                entry,
                replaces: Some(why),
            }),
            None,
        )),
    }
}

/// Builds the install plan. Reads the files involved; writes nothing.
pub fn build(s: &InstallSettings, facts: &HostFacts) -> Result<Plan, PlanError> {
    let root = &s.root;
    if facts.os.is_bottlerocket() {
        return Err(PlanError::Bottlerocket(facts.os.pretty_name.clone()));
    }
    let arch = facts.arch(s.arch).map_err(PlanError::Arch)?;
    let spec = ReleaseSpec {
        version: s.soci_version,
        arch,
        flavor: s.flavor,
    };
    let mut warnings = s.warnings.clone();
    let mut notes = Vec::new();
    let mut b = Builder {
        root,
        actions: Vec::new(),
    };
    let restart_soci = Effects {
        restart_soci: true,
        ..Effects::default()
    };

    // 1. The binary: the preinstalled one, or the store + links (--preinstalled policy).
    let mut adopted_sha256 = None;
    let preinstalled = facts.soci_installed.iter().find(|i| !i.managed);
    let soci = choose_soci(s.preinstalled, s.soci_version, preinstalled)?;
    notes.push(soci.reason.clone());
    let daemon_binary = if soci.origin == "preinstalled" {
        if soci.version.is_none() {
            warnings.push(format!(
                "could not read the version of {}; parallel mode needs SOCI 0.11.0 or newer",
                soci.binary
            ));
        }
        let resolved = root.path(&soci.binary);
        adopted_sha256 = Some(
            store::sha256_file(&resolved).map_err(|source| PlanError::Fs(FsError::Read { path: resolved, source }))?,
        );
        soci.binary.clone()
    } else {
        let (step, kept) = release_step(root, s, spec)?;
        match step {
            Some(step) => {
                let detail = match (&step.source, &step.replaces) {
                    (ArchiveSource::Url(u), None) => format!("download {u}"),
                    (ArchiveSource::Local(p), None) => format!("extract {p}"),
                    (src, Some(why)) => format!(
                        "replace ({why}) from {}",
                        match src {
                            ArchiveSource::Url(u) | ArchiveSource::Local(u) => u,
                        }
                    ),
                };
                b.actions.push(Action {
                    path: step.entry.clone(),
                    action: ActionKind::InstallRelease,
                    changed: true,
                    detail,
                    diff: None,
                    op: Op::Release(Box::new(step)),
                    effects: restart_soci,
                });
            }
            None => b.actions.push(Action {
                path: store::entry_dir(&spec),
                action: ActionKind::KeepRelease,
                changed: false,
                detail: kept.unwrap_or_default(),
                diff: None,
                op: Op::Nothing,
                effects: Effects::default(),
            }),
        }
        let entry = store::entry_dir(&spec);
        for bin in BINARIES {
            b.symlink(&format!("{BIN_DIR}/{bin}"), &format!("{entry}/{bin}"), restart_soci)?;
        }
        format!("{BIN_DIR}/{DAEMON_BINARY}")
    };
    let entry = (soci.origin == "release").then(|| store::entry_dir(&spec));
    let host_arch = Arch::from_machine(&facts.machine).ok();
    let (soci_check, why_not) = soci_check(root, &soci, entry.as_deref(), arch, host_arch);
    notes.extend(why_not);

    // 2. SOCI's own config.
    let gzip = match &s.decompressor {
        DecompressorChoice::Auto => facts.unpigz.then(|| Decompressor::unpigz(UNPIGZ)),
        DecompressorChoice::None => None,
        DecompressorChoice::Path(p) => Some(Decompressor::unpigz(p)),
    };
    if gzip.is_none() {
        warnings.push("no gzip decompressor (unpigz): SOCI will decompress layers with Go's single-threaded gzip; install pigz for faster unpacks".into());
    }
    let soci_cfg = SociConfig {
        tuning: s.tuning.clone(),
        gzip,
        version: soci.version.unwrap_or(crate::release::MIN_SOCI_VERSION),
        ..SociConfig::default()
    };
    b.file(
        SOCI_CONFIG,
        crate::files::soci_config::render_checked(&soci_cfg)?,
        0o644,
        restart_soci,
    )?;

    // 3. systemd units.
    let cmd = DaemonCommand {
        binary: daemon_binary.clone(),
        soci_root: s.soci_root.clone(),
    };
    let unit_change = Effects {
        daemon_reload: true,
        restart_soci: true,
        ..Effects::default()
    };
    match &facts.soci_unit {
        SociUnit::Foreign(path) => {
            notes.push(format!("keeping the preinstalled {path}; overriding it with a drop-in"));
            b.file(SOCI_SERVICE_DROPIN, units::service_dropin(&cmd), 0o644, unit_change)?;
        }
        SociUnit::Absent | SociUnit::Ours(_) => {
            b.file(SOCI_SERVICE_PATH, units::service(&cmd), 0o644, unit_change)?;
            b.file(SOCI_SOCKET_PATH, units::socket(), 0o644, unit_change)?;
        }
    }
    let containerd_change = Effects {
        daemon_reload: true,
        restart_containerd: true,
        ..Effects::default()
    };
    b.file(CONTAINERD_DROPIN, units::containerd_dropin(), 0o644, containerd_change)?;

    // 3b. The agent itself and its boot unit (pause image import, pre-pull).
    let me = std::env::current_exe().map_err(|source| FsError::Read {
        path: "/proc/self/exe".into(),
        source,
    })?;
    b.binary(AGENT_BINARY, &me)?;
    let reload = Effects {
        daemon_reload: true,
        ..Effects::default()
    };
    b.file(BOOT_SERVICE_PATH, units::boot_service(), 0o644, reload)?;
    if s.daemon {
        let daemon_change = Effects {
            daemon_reload: true,
            ..Effects::default()
        };
        b.file(DAEMON_SERVICE_PATH, units::daemon_service(), 0o644, daemon_change)?;
    }
    let kubelet_present = facts.kubelet_unit || facts.nodeadm;
    if kubelet_present {
        b.file(KUBELET_DROPIN_PATH, units::kubelet_dropin(), 0o644, reload)?;
    }

    // 4. containerd + kubelet wiring.
    let wiring_in = SociWiring {
        address: SOCI_SOCKET.to_string(),
        soci_root: s.soci_root.clone(),
    };
    let endpoint = nodeconfig::image_service_endpoint(SOCI_SOCKET);
    let wiring = match s.wiring {
        WiringMode::Nodeadm => Wiring::Nodeadm,
        WiringMode::Containerd => Wiring::Containerd,
        WiringMode::Auto if facts.nodeadm => Wiring::Nodeadm,
        WiringMode::Auto => Wiring::Containerd,
    };
    let (daemon, containerd_shown) = containerd_target(s, facts);
    let containerd_config_version = match wiring {
        Wiring::Nodeadm => {
            let daemon = daemon.ok_or(PlanError::UnknownContainerdForNodeadm {
                file: CONTAINERD_VERSION_FILE,
            })?;
            let version = nodeconfig::version_for_containerd(daemon);
            if !facts.nodeadm_dropin_dir {
                warnings.push(format!(
                    "{} did not exist: nodeadm older than AMI v20251023 does not read drop-ins; pass the NodeConfig in user data instead",
                    NODEADM_DROPIN_DIR
                ));
            }
            b.file(
                NODEADM_DROPIN,
                nodeconfig::render(version, &wiring_in),
                0o644,
                containerd_change,
            )?;
            notes.push(format!(
                "nodeadm host: {} is left to nodeadm, which renders it from {} when nodeadm-run starts containerd",
                s.containerd_config, NODEADM_DROPIN
            ));
            notes.push(format!(
                "nodeadm's FastImagePull is turned off by {}: soci-agent manages SOCI, and with the gate on nodeadm \
                 would rewrite {SOCI_CONFIG} and {} on every boot",
                NODEADM_DROPIN, CONTAINERD_DROPIN
            ));
            version
        }
        Wiring::Containerd => {
            let existing = root.read_opt(&s.containerd_config)?;
            let existing = existing
                .map(|b| {
                    String::from_utf8(b).map_err(|_| PlanError::NotUtf8 {
                        path: s.containerd_config.clone(),
                    })
                })
                .transpose()?;
            let merged = containerd_config::merge(existing.as_deref(), &s.containerd_config, &wiring_in, daemon)?;
            if merged.created || existing.as_deref().is_some_and(|t| t.trim().is_empty()) {
                notes.push(format!(
                    "{} written as version {} for containerd {}",
                    s.containerd_config,
                    merged.version,
                    containerd_shown.as_deref().unwrap_or("?")
                ));
            }
            b.file(&s.containerd_config, merged.text, 0o644, containerd_change)?;
            if facts.kubelet_config_layout {
                b.file(KUBELET_DROPIN, kubelet::dropin(&endpoint), 0o644, Effects::default())?;
                notes.push(format!(
                    "kubelet reads {} only when started with --config-dir={}",
                    KUBELET_DROPIN, KUBELET_DROPIN_DIR
                ));
            } else {
                notes.push(format!("no kubelet config found under the root: set imageServiceEndpoint: {endpoint} in kubelet's configuration"));
            }
            merged.version
        }
    };

    // 5. The install record: how every path was before soci-agent changed it.
    let previous = Record::load(root).map_err(|e| match e {
        RecordError::Read(fs) => PlanError::Fs(fs),
        invalid => PlanError::Record(invalid.to_string()),
    })?;
    let record = Record {
        daemon_binary: daemon_binary.clone(),
        soci_root: s.soci_root.clone(),
        adopted_sha256,
        soci_version: soci.version.map(|v| v.to_string()).unwrap_or_default(),
        soci_reason: soci.reason.clone(),
        ..record_paths(root, previous.unwrap_or_default(), &b.actions, &s.containerd_config)
    };
    b.file(RECORD, record.to_json(), 0o644, Effects::default())?;

    if root.is_host() {
        let mem_low = facts.memory_bytes.is_some_and(|m| m < MIN_MEMORY_BYTES);
        if facts.cpus < MIN_CPUS || mem_low {
            warnings.push(format!(
                "this host has {} vCPU and {} GiB: parallel pull/unpack mode helps little below {MIN_CPUS} vCPU / 7 GiB (EKS FastImagePull skips SOCI there)",
                facts.cpus,
                facts.memory_bytes.map_or("?".into(), |m| format!("{:.1}", m as f64 / (1u64 << 30) as f64))
            ));
        }
    }

    Ok(Plan {
        arch,
        daemon: s.daemon,
        kubelet_present,
        wiring,
        containerd_config_version,
        containerd: containerd_shown,
        daemon_binary,
        soci,
        soci_check,
        soci_unit: SOCI_SERVICE,
        actions: b.actions,
        warnings,
        notes,
    })
}
