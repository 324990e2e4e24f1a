//! Steps 1 and 2 of the plan: which SOCI binary runs (the preinstalled one,
//! or a release in the store with its links), and SOCI's own config.

use crate::paths::{BIN_DIR, SOCI_BINARY_LOCATIONS, SOCI_CONFIG, UNPIGZ};

use crate::files::soci_config::{Decompressor, SociConfig};
use crate::host::{HostFacts, InstalledSoci};
use crate::install::options::PreinstalledPolicy;
use crate::install::settings::{DecompressorChoice, InstallSettings, sibling_checksum};
use crate::release::store::{self, EntryState};
use crate::release::{Arch, BINARIES, DAEMON_BINARY, FIXED_SOCI_VERSION, ReleaseSpec, Sha256Hex, Version};
use crate::rootfs::{FsError, Root};

use super::builder::Builder;
use super::{
    Action, ActionKind, ArchiveSource, DigestSource, Effects, Op, PlanError, RESTART_SOCI, ReleaseStep, SociCheck,
    SociChoice, SociOrigin,
};

/// What step 1 decided: which SOCI runs, from which binary, checked how.
pub(super) struct SociPlan {
    pub(super) choice: SociChoice,
    /// Node path of the binary the unit runs.
    pub(super) daemon_binary: String,
    /// The preinstalled binary's digest, when it is kept.
    pub(super) adopted_sha256: Option<Sha256Hex>,
    pub(super) check: Option<SociCheck>,
}

/// Step 1: the binary, the preinstalled one or the store + links
/// (--preinstalled policy), and which binary can check SOCI's config.
pub(super) fn soci_binary(
    b: &mut Builder,
    s: &InstallSettings,
    facts: &HostFacts,
    arch: Arch,
) -> Result<SociPlan, PlanError> {
    let spec = ReleaseSpec {
        version: s.soci_version,
        arch,
        flavor: s.flavor,
    };
    let preinstalled = facts.soci_installed.iter().find(|i| !i.managed);
    let choice = choose_soci(s.preinstalled, s.soci_version, preinstalled)?;
    b.notes.push(choice.reason.clone());
    let (daemon_binary, adopted_sha256) = if choice.origin == SociOrigin::Preinstalled {
        (choice.binary.clone(), Some(adopt_preinstalled(b, &choice)?))
    } else {
        (install_release(b, s, spec)?, None)
    };
    let entry = (choice.origin == SociOrigin::Release).then(|| store::entry_dir(&spec));
    let host_arch = Arch::from_machine(&facts.machine).ok();
    let (check, why_not) = soci_check(b.root, &choice, entry.as_deref(), arch, host_arch);
    b.notes.extend(why_not);
    Ok(SociPlan {
        choice,
        daemon_binary,
        adopted_sha256,
        check,
    })
}

/// Keeps the preinstalled binary: warns when its version is unknown and
/// returns its digest.
fn adopt_preinstalled(b: &mut Builder, choice: &SociChoice) -> Result<Sha256Hex, PlanError> {
    if choice.version.is_none() {
        b.warnings.push(format!(
            "could not read the version of {}; parallel mode needs SOCI 0.11.0 or newer",
            choice.binary
        ));
    }
    let resolved = b.root.path(&choice.binary);
    store::sha256_file(&resolved).map_err(|source| PlanError::Fs(FsError::Read { path: resolved, source }))
}

/// Plans the release's store entry (installed, or kept when verified) and
/// the links to it; returns the node path of the daemon binary.
fn install_release(b: &mut Builder, s: &InstallSettings, spec: ReleaseSpec) -> Result<String, PlanError> {
    let (step, kept) = release_step(b.root, s, spec)?;
    b.actions.push(match step {
        Some(step) => Action {
            path: step.entry.clone(),
            action: ActionKind::InstallRelease,
            changed: true,
            detail: release_detail(&step),
            diff: None,
            op: Op::Release(Box::new(step)),
            effects: RESTART_SOCI,
        },
        None => Action {
            path: store::entry_dir(&spec),
            action: ActionKind::KeepRelease,
            changed: false,
            detail: kept.unwrap_or_default(),
            diff: None,
            op: Op::Nothing,
            effects: Effects::default(),
        },
    });
    let entry = store::entry_dir(&spec);
    for bin in BINARIES {
        b.symlink(&format!("{BIN_DIR}/{bin}"), &format!("{entry}/{bin}"), RESTART_SOCI)?;
    }
    Ok(format!("{BIN_DIR}/{DAEMON_BINARY}"))
}

/// How the release step gets its archive, for the plan's listing.
fn release_detail(step: &ReleaseStep) -> String {
    match (&step.source, &step.replaces) {
        (ArchiveSource::Url(u), None) => format!("download {u}"),
        (ArchiveSource::Local(p), None) => format!("extract {p}"),
        (src, Some(why)) => format!(
            "replace ({why}) from {}",
            match src {
                ArchiveSource::Url(u) | ArchiveSource::Local(u) => u,
            }
        ),
    }
}

/// The mirrors and plain-HTTP registries of containerd's `hosts.toml` files,
/// for SOCI's resolver; what SOCI cannot take over becomes a warning.
fn registry_mirrors(
    b: &mut Builder,
    s: &InstallSettings,
) -> std::collections::BTreeMap<String, Vec<crate::files::registry_hosts::SociMirror>> {
    let (hosts, errors) = crate::host::registry_hosts(b.root, &s.containerd_config);
    for e in errors {
        b.warnings.push(format!("{e}: not carried into SOCI's resolver"));
    }
    for r in &hosts {
        for what in r.not_carried() {
            b.warnings.push(format!(
                "containerd registry host {what}: not carried into SOCI's config"
            ));
        }
    }
    let resolver = crate::files::registry_hosts::soci_resolver(&hosts);
    if !resolver.is_empty() {
        let names: Vec<&str> = resolver.keys().map(String::as_str).collect();
        b.notes.push(format!(
            "SOCI resolves {} through the mirrors of containerd's hosts.toml; layers still come from each image's own registry",
            names.join(", ")
        ));
    }
    resolver
}

/// Step 2: SOCI's own config, with the gzip decompressor and the tuning.
pub(super) fn soci_config(
    b: &mut Builder,
    s: &InstallSettings,
    facts: &HostFacts,
    choice: &SociChoice,
) -> Result<(), PlanError> {
    let gzip = match &s.decompressor {
        DecompressorChoice::Auto => facts.unpigz.then(|| Decompressor::unpigz(UNPIGZ)),
        DecompressorChoice::None => None,
        DecompressorChoice::Path(p) => Some(Decompressor::unpigz(p)),
    };
    if gzip.is_none() {
        b.warnings.push("no gzip decompressor (unpigz): SOCI will decompress layers with Go's single-threaded gzip; install pigz for faster unpacks".into());
    }
    let soci_cfg = SociConfig {
        tuning: s.tuning.clone(),
        gzip,
        version: choice.version.unwrap_or(crate::release::MIN_SOCI_VERSION),
        resolver: registry_mirrors(b, s),
        ..SociConfig::default()
    };
    b.file(
        SOCI_CONFIG,
        crate::files::soci_config::render_checked(&soci_cfg)?,
        0o644,
        RESTART_SOCI,
    )?;
    Ok(())
}

/// `config dump` exists from SOCI 0.12.0 on.
const CONFIG_DUMP_SINCE: Version = Version {
    major: 0,
    minor: 12,
    patch: 0,
};

/// No binary checks the config, and why.
fn own_rules_only(why: String) -> (Option<SociCheck>, Option<String>) {
    (
        None,
        Some(format!("{why}: the config is checked by soci-agent's own rules only")),
    )
}

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
        Some(v) => return own_rules_only(format!("SOCI {v} has no `config dump` (0.12.0+)")),
        None => return own_rules_only("SOCI version unknown".into()),
    };
    if host_arch != Some(arch) {
        return own_rules_only(format!("the {arch} SOCI cannot run on this machine"));
    }
    let binary = match entry {
        Some(entry) => format!("{entry}/{DAEMON_BINARY}"),
        None if root.is_host() => soci.binary.clone(),
        None => return own_rules_only("the preinstalled SOCI is inside another root and is not run here".into()),
    };
    (Some(SociCheck { binary, version }), None)
}

/// A choice to run the preinstalled binary `f`.
fn keep(f: &InstalledSoci, version: Option<Version>, reason: String) -> SociChoice {
    SociChoice {
        binary: f.path.clone(),
        version,
        origin: SociOrigin::Preinstalled,
        reason,
    }
}

/// A choice to run `wanted` from the release.
fn from_release(wanted: Version, reason: String) -> SociChoice {
    SociChoice {
        binary: format!("{BIN_DIR}/{DAEMON_BINARY}"),
        version: Some(wanted),
        origin: SociOrigin::Release,
        reason,
    }
}

/// Applies the `--preinstalled` policy to what detection found.
fn choose_soci(
    policy: PreinstalledPolicy,
    wanted: Version,
    found: Option<&InstalledSoci>,
) -> Result<SociChoice, PlanError> {
    let Some(f) = found else {
        return match policy {
            PreinstalledPolicy::Keep => Err(PlanError::NothingToAdopt(SOCI_BINARY_LOCATIONS.join(" or "))),
            _ => Ok(from_release(
                wanted,
                format!("no preinstalled SOCI: installing {wanted} from the release"),
            )),
        };
    };
    let parsed = f.version.as_deref().and_then(|v| v.parse::<Version>().ok());
    let shown = f.version.as_deref().unwrap_or("of unknown version");
    match policy {
        PreinstalledPolicy::Replace => Ok(from_release(
            wanted,
            format!(
                "--preinstalled replace: running {wanted} from the release instead of the preinstalled {} (SOCI {shown})",
                f.path
            ),
        )),
        PreinstalledPolicy::Keep => choose_keep(f, parsed, shown),
        PreinstalledPolicy::Auto => Ok(choose_auto(f, parsed, shown, wanted)),
    }
}

/// `--preinstalled keep`: the preinstalled binary, unless it is too old for
/// parallel mode.
fn choose_keep(f: &InstalledSoci, parsed: Option<Version>, shown: &str) -> Result<SociChoice, PlanError> {
    match parsed {
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
    }
}

/// `--preinstalled auto`: the preinstalled binary when it has the fixes,
/// else the release.
fn choose_auto(f: &InstalledSoci, parsed: Option<Version>, shown: &str, wanted: Version) -> SociChoice {
    match parsed {
        Some(v) if v >= FIXED_SOCI_VERSION => keep(
            f,
            parsed,
            format!(
                "--preinstalled auto: keeping the preinstalled {} (SOCI {v}, {FIXED_SOCI_VERSION} or newer)",
                f.path
            ),
        ),
        _ => from_release(
            wanted,
            format!(
                "--preinstalled auto: the preinstalled {} is SOCI {shown}, older than {FIXED_SOCI_VERSION} \
                 (no fixes for soci-snapshotter issues 2035/2036) or unknown: running {wanted} from the release",
                f.path
            ),
        ),
    }
}

/// The release step, or `None` (with why) when the store already holds a
/// verified copy.
fn release_step(
    root: &Root,
    s: &InstallSettings,
    spec: ReleaseSpec,
) -> Result<(Option<ReleaseStep>, Option<String>), PlanError> {
    let (source, digest) = archive_source(s, &spec)?;
    let entry = store::entry_dir(&spec);
    let replaces = match store::inspect(root, &spec, digest.known()) {
        EntryState::Valid(m) => {
            return Ok((
                None,
                Some(format!(
                    "verified SOCI {} already installed (archive sha256 {})",
                    m.version, m.archive_sha256
                )),
            ));
        }
        EntryState::Missing => None,
        EntryState::Stale(why) => Some(why),
    };
    let step = ReleaseStep {
        spec,
        source,
        digest,
        entry,
        replaces,
    };
    Ok((Some(step), None))
}

/// Where the archive comes from (`--archive` or the release URL) and where
/// its expected digest comes from (`--sha256`, the local `.sha256sum`, or
/// the published one).
fn archive_source(s: &InstallSettings, spec: &ReleaseSpec) -> Result<(ArchiveSource, DigestSource), PlanError> {
    let pinned = s.sha256.clone().map(DigestSource::Pinned);
    match &s.archive {
        Some(path) => {
            let digest = match pinned {
                Some(d) => d,
                None => checksum_file_digest(path)?,
            };
            Ok((ArchiveSource::Local(path.display().to_string()), digest))
        }
        None => {
            let digest = pinned.unwrap_or_else(|| DigestSource::Published(spec.checksum_url(&s.release_url)));
            Ok((ArchiveSource::Url(spec.archive_url(&s.release_url)), digest))
        }
    }
}

/// The digest of the local archive `path` from its `.sha256sum` sibling.
fn checksum_file_digest(path: &std::path::Path) -> Result<DigestSource, PlanError> {
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
    let digest = crate::release::parse_sha256sum(&text, &name).map_err(|source| PlanError::BadChecksum {
        path: sum_s.clone(),
        source,
    })?;
    Ok(DigestSource::File { path: sum_s, digest })
}
