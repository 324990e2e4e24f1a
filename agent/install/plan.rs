//! Plan: host facts + settings + the current content of the files involved
//! -> an ordered list of actions, each with its node path, new bytes, mode,
//! diff and effects. Building a plan changes nothing; `apply` carries it out
//! and `--dry-run` prints it.

use serde::Serialize;

use crate::files::containerd_config::{ConfigVersion, ContainerdConfigError};
use crate::host::HostFacts;
use crate::install::settings::InstallSettings;
use crate::paths::SOCI_SERVICE;
use crate::release::{Arch, ReleaseSpec, Sha256Hex, Version};
use crate::rootfs::FsError;

mod builder;
mod record;
mod soci;
mod units;
mod volume;
mod wiring;

use builder::Builder;

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
    #[error("checksum file {path}")]
    BadChecksum {
        path: String,
        source: crate::release::ReleaseError,
    },
    #[error("install record {path} is not valid JSON: {message} (move it aside to start a fresh record)")]
    Record { path: String, message: String },
    #[error(transparent)]
    Tuning(#[from] crate::files::soci_config::TuningError),
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Volume(#[from] crate::cache::device::VolumeError),
}

impl crate::exit::ExitKindOf for PlanError {
    /// Usage/validation errors (exit 2) vs failures reading the node (exit 1).
    fn exit_kind(&self) -> crate::exit::ExitKind {
        use crate::exit::ExitKind;
        match self {
            PlanError::Bottlerocket(_)
            | PlanError::NothingToAdopt(_)
            | PlanError::AdoptTooOld { .. }
            | PlanError::UnknownContainerdForNodeadm { .. }
            | PlanError::Arch(_)
            | PlanError::Containerd(_)
            | PlanError::NotUtf8 { .. }
            | PlanError::BadChecksum { .. }
            | PlanError::Record { .. }
            | PlanError::Tuning(_) => ExitKind::Usage,
            PlanError::ReadChecksum { .. } | PlanError::Fs(_) => ExitKind::Failed,
            PlanError::Volume(e) => e.exit_kind(),
        }
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
    /// Make the data volume's filesystem (the action's path is the device).
    FormatVolume(Box<crate::cache::device::Device>),
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
    Format,
}

/// What a change means for running services (used by the systemd step).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Effects {
    pub daemon_reload: bool,
    pub restart_soci: bool,
    pub restart_containerd: bool,
}

/// The effects of a change: daemon-reload, restart SOCI, restart containerd.
const fn effects(daemon_reload: bool, restart_soci: bool, restart_containerd: bool) -> Effects {
    Effects {
        daemon_reload,
        restart_soci,
        restart_containerd,
    }
}
/// A change that needs SOCI restarted.
const RESTART_SOCI: Effects = effects(false, true, false);
/// A change to SOCI's units: daemon-reload, then restart SOCI.
const UNIT_CHANGE: Effects = effects(true, true, false);
/// A change to containerd's wiring: daemon-reload, then restart containerd.
const CONTAINERD_CHANGE: Effects = effects(true, false, true);
/// A change to a unit nothing restarts for: daemon-reload only.
const RELOAD: Effects = effects(true, false, false);

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
/// Which SOCI binary the unit runs, and why.
#[derive(Debug, Clone, Serialize)]
pub struct SociChoice {
    /// Node path of the binary the unit's ExecStart names.
    pub binary: String,
    /// Its SOCI version, when known.
    #[serde(serialize_with = "version_str")]
    pub version: Option<Version>,
    pub origin: SociOrigin,
    /// One sentence: the policy and the facts it decided on.
    pub reason: String,
}

/// Where the SOCI binary the unit runs comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SociOrigin {
    /// The node's own (the AMI's package), kept.
    Preinstalled,
    /// The release, installed into the store.
    Release,
}

impl std::fmt::Display for SociOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SociOrigin::Preinstalled => "preinstalled",
            SociOrigin::Release => "release",
        })
    }
}

fn version_str<S: serde::Serializer>(v: &Option<Version>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_str(&v.to_string()),
        None => s.serialize_none(),
    }
}

/// Builds the install plan. Reads the files involved; writes nothing.
pub fn build(s: &InstallSettings, facts: &HostFacts) -> Result<Plan, PlanError> {
    if facts.os.is_bottlerocket() {
        return Err(PlanError::Bottlerocket(facts.os.pretty_name.clone()));
    }
    let arch = facts.arch(s.arch).map_err(PlanError::Arch)?;
    let mut b = Builder::new(&s.root, s.warnings.clone());
    // 1. The binary: the preinstalled one, or the store + links (--preinstalled policy).
    let soci = soci::soci_binary(&mut b, s, facts, arch)?;
    // 2. SOCI's own config.
    soci::soci_config(&mut b, s, facts, &soci.choice)?;
    // 3. systemd units; 3b. the agent itself and its boot unit.
    units::soci_units(&mut b, s, facts, &soci.daemon_binary)?;
    let kubelet_present = units::agent_units(&mut b, s, facts)?;
    // 4. containerd + kubelet wiring.
    let wired = wiring::wire_containerd(&mut b, s, facts)?;
    // 4b. The data volume (a snapshot cache) under both daemons' roots.
    volume::data_volume(&mut b, s, facts)?;
    // 5. The install record: how every path was before soci-agent changed it.
    record::install_record(&mut b, s, &soci)?;
    warn_small_host(&mut b, facts);
    Ok(Plan {
        arch,
        daemon: s.daemon,
        kubelet_present,
        wiring: wired.wiring,
        containerd_config_version: wired.config_version,
        containerd: wired.containerd,
        daemon_binary: soci.daemon_binary,
        soci: soci.choice,
        soci_check: soci.check,
        soci_unit: SOCI_SERVICE,
        actions: b.actions,
        warnings: b.warnings,
        notes: b.notes,
    })
}

/// Warns when the running host is below the size where parallel mode helps.
fn warn_small_host(b: &mut Builder, facts: &HostFacts) {
    if !b.root.is_host() {
        return;
    }
    let mem_low = facts.memory_bytes.is_some_and(|m| m < MIN_MEMORY_BYTES);
    if facts.cpus < MIN_CPUS || mem_low {
        b.warnings.push(format!(
            "this host has {} vCPU and {} GiB: parallel pull/unpack mode helps little below {MIN_CPUS} vCPU / 7 GiB (EKS FastImagePull skips SOCI there)",
            facts.cpus,
            facts.memory_bytes.map_or("?".into(), |m| format!("{:.1}", m as f64 / (1u64 << 30) as f64))
        ));
    }
}
