//! Step 3 of the plan: the systemd units: SOCI's service and socket (or a
//! drop-in over a preinstalled unit), containerd's drop-in, the agent itself
//! with its boot unit, soci-agent.service and kubelet's drop-in.

use crate::paths::{
    AGENT_BINARY, BOOT_SERVICE_PATH, CONTAINERD_DROPIN, DAEMON_SERVICE_PATH, KUBELET_DROPIN_PATH, SOCI_SERVICE_DROPIN,
    SOCI_SERVICE_PATH, SOCI_SOCKET_PATH,
};

use crate::files::units::{self, DaemonCommand};
use crate::host::{HostFacts, SociUnit};
use crate::install::settings::InstallSettings;
use crate::rootfs::FsError;

use super::builder::Builder;
use super::{CONTAINERD_CHANGE, PlanError, RELOAD, UNIT_CHANGE};

/// Step 3: SOCI's unit and socket, or a drop-in over a preinstalled unit,
/// and containerd's drop-in.
pub(super) fn soci_units(
    b: &mut Builder,
    s: &InstallSettings,
    facts: &HostFacts,
    daemon_binary: &str,
) -> Result<(), PlanError> {
    let cmd = DaemonCommand {
        binary: daemon_binary.to_string(),
        soci_root: s.soci_root.clone(),
    };
    match &facts.soci_unit {
        SociUnit::Foreign(path) => {
            b.notes
                .push(format!("keeping the preinstalled {path}; overriding it with a drop-in"));
            b.file(SOCI_SERVICE_DROPIN, units::service_dropin(&cmd), 0o644, UNIT_CHANGE)?;
        }
        SociUnit::Absent | SociUnit::Ours(_) => {
            b.file(SOCI_SERVICE_PATH, units::service(&cmd), 0o644, UNIT_CHANGE)?;
            b.file(SOCI_SOCKET_PATH, units::socket(), 0o644, UNIT_CHANGE)?;
        }
    }
    b.file(CONTAINERD_DROPIN, units::containerd_dropin(), 0o644, CONTAINERD_CHANGE)?;
    Ok(())
}

/// Step 3b: the agent itself and its boot unit (pause image import,
/// pre-pull), soci-agent.service with --daemon, and kubelet's drop-in when
/// kubelet exists. Returns whether it does.
pub(super) fn agent_units(b: &mut Builder, s: &InstallSettings, facts: &HostFacts) -> Result<bool, PlanError> {
    let me = std::env::current_exe().map_err(|source| FsError::Read {
        path: "/proc/self/exe".into(),
        source,
    })?;
    b.binary(AGENT_BINARY, &me)?;
    b.file(BOOT_SERVICE_PATH, units::boot_service(), 0o644, RELOAD)?;
    if s.daemon {
        b.file(DAEMON_SERVICE_PATH, units::daemon_service(), 0o644, RELOAD)?;
    }
    let kubelet_present = facts.kubelet_unit || facts.nodeadm;
    if kubelet_present {
        b.file(KUBELET_DROPIN_PATH, units::kubelet_dropin(), 0o644, RELOAD)?;
    }
    Ok(kubelet_present)
}
