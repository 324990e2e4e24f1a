//! Step 4 of the plan: wiring containerd and kubelet to SOCI, through a
//! NodeConfig drop-in on nodeadm hosts or by editing containerd's config.

use crate::paths::{
    CONTAINERD_DROPIN, CONTAINERD_VERSION_FILE, KUBELET_DROPIN, KUBELET_DROPIN_DIR, NODEADM_DROPIN, NODEADM_DROPIN_DIR,
    SOCI_CONFIG, SOCI_SOCKET,
};

use crate::files::containerd_config::{self, ConfigVersion, Daemon, SociWiring};
use crate::files::{kubelet, nodeconfig};
use crate::host::HostFacts;
use crate::install::options::WiringMode;
use crate::install::settings::InstallSettings;

use super::builder::Builder;
use super::{CONTAINERD_CHANGE, Effects, PlanError, Wiring};

/// What step 4 wired, for the plan.
pub(super) struct Wired {
    pub(super) wiring: Wiring,
    pub(super) config_version: ConfigVersion,
    /// The containerd version written for, and where it came from.
    pub(super) containerd: Option<String>,
}

/// Step 4: containerd + kubelet wiring, as `--wiring` (or the host) says.
pub(super) fn wire_containerd(b: &mut Builder, s: &InstallSettings, facts: &HostFacts) -> Result<Wired, PlanError> {
    let wiring_in = SociWiring {
        address: SOCI_SOCKET.to_string(),
        soci_root: s.soci_root.clone(),
    };
    let wiring = match s.wiring {
        WiringMode::Nodeadm => Wiring::Nodeadm,
        WiringMode::Containerd => Wiring::Containerd,
        WiringMode::Auto if facts.nodeadm => Wiring::Nodeadm,
        WiringMode::Auto => Wiring::Containerd,
    };
    let (daemon, containerd) = containerd_target(s, facts);
    let config_version = match wiring {
        Wiring::Nodeadm => nodeadm_dropin(b, s, facts, daemon, &wiring_in)?,
        Wiring::Containerd => containerd_config(b, s, facts, daemon, containerd.as_deref(), &wiring_in)?,
    };
    Ok(Wired {
        wiring,
        config_version,
        containerd,
    })
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

/// A nodeadm host: the NodeConfig drop-in, in the table names of the
/// containerd version nodeadm renders for.
fn nodeadm_dropin(
    b: &mut Builder,
    s: &InstallSettings,
    facts: &HostFacts,
    daemon: Option<Daemon>,
    wiring_in: &SociWiring,
) -> Result<ConfigVersion, PlanError> {
    let daemon = daemon.ok_or(PlanError::UnknownContainerdForNodeadm {
        file: CONTAINERD_VERSION_FILE,
    })?;
    let version = nodeconfig::version_for_containerd(daemon);
    if !facts.nodeadm_dropin_dir {
        b.warnings.push(format!(
            "{} did not exist: nodeadm older than AMI v20251023 does not read drop-ins; pass the NodeConfig in user data instead",
            NODEADM_DROPIN_DIR
        ));
    }
    b.file(
        NODEADM_DROPIN,
        nodeconfig::render(version, wiring_in),
        0o644,
        CONTAINERD_CHANGE,
    )?;
    b.notes.push(format!(
        "nodeadm host: {} is left to nodeadm, which renders it from {} when nodeadm-run starts containerd",
        s.containerd_config, NODEADM_DROPIN
    ));
    b.notes.push(format!(
        "nodeadm's FastImagePull is turned off by {}: soci-agent manages SOCI, and with the gate on nodeadm \
         would rewrite {SOCI_CONFIG} and {} on every boot",
        NODEADM_DROPIN, CONTAINERD_DROPIN
    ));
    Ok(version)
}

/// Any other host: SOCI merged into containerd's config, and kubelet's
/// image service endpoint.
fn containerd_config(
    b: &mut Builder,
    s: &InstallSettings,
    facts: &HostFacts,
    daemon: Option<Daemon>,
    containerd_shown: Option<&str>,
    wiring_in: &SociWiring,
) -> Result<ConfigVersion, PlanError> {
    let existing = b.root.read_opt(&s.containerd_config)?;
    let existing = existing
        .map(|b| {
            String::from_utf8(b).map_err(|_| PlanError::NotUtf8 {
                path: s.containerd_config.clone(),
            })
        })
        .transpose()?;
    let merged = containerd_config::merge(existing.as_deref(), &s.containerd_config, wiring_in, daemon)?;
    if merged.created || existing.as_deref().is_some_and(|t| t.trim().is_empty()) {
        b.notes.push(format!(
            "{} written as version {} for containerd {}",
            s.containerd_config,
            merged.version,
            containerd_shown.unwrap_or("?")
        ));
    }
    b.file(&s.containerd_config, merged.text, 0o644, CONTAINERD_CHANGE)?;
    kubelet_endpoint(b, facts)?;
    Ok(merged.version)
}

/// kubelet's drop-in naming SOCI as its image service, when kubelet's
/// config layout is there; else a note saying what to set.
fn kubelet_endpoint(b: &mut Builder, facts: &HostFacts) -> Result<(), PlanError> {
    let endpoint = nodeconfig::image_service_endpoint(SOCI_SOCKET);
    if facts.kubelet_config_layout {
        b.file(KUBELET_DROPIN, kubelet::dropin(&endpoint), 0o644, Effects::default())?;
        b.notes.push(format!(
            "kubelet reads {} only when started with --config-dir={}",
            KUBELET_DROPIN, KUBELET_DROPIN_DIR
        ));
    } else {
        b.notes.push(format!(
            "no kubelet config found under the root: set imageServiceEndpoint: {endpoint} in kubelet's configuration"
        ));
    }
    Ok(())
}
