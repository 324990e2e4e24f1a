//! systemd unit files and drop-ins, rendered from the files in `systemd/`
//! (embedded, so the binary and the repository agree). Pure.
use crate::paths::SOCI_ROOT;

/// First-line marker of every unit file soci-agent writes; a
/// `soci-snapshotter.service` without it belongs to someone else.
pub const MARKER: &str = "# Installed by soci-agent";

const SERVICE_TEMPLATE: &str = include_str!("../../systemd/soci-snapshotter.service");
const SOCKET_TEMPLATE: &str = include_str!("../../systemd/soci-snapshotter.socket");
const SERVICE_DROPIN_TEMPLATE: &str = include_str!("../../systemd/soci-snapshotter.service.d/50-soci-agent.conf");
const CONTAINERD_DROPIN: &str = include_str!("../../systemd/containerd.service.d/10-soci-snapshotter.conf");
const BOOT_SERVICE_TEMPLATE: &str = include_str!("../../systemd/soci-agent-boot.service");
const KUBELET_DROPIN: &str = include_str!("../../systemd/kubelet.service.d/50-soci-agent-boot.conf");
const DAEMON_SERVICE_TEMPLATE: &str = include_str!("../../systemd/soci-agent.service");

/// What ExecStart runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonCommand {
    /// Absolute node path of `soci-snapshotter-grpc`.
    pub binary: String,
    /// The snapshotter root; `--root` is passed only when not the default.
    pub soci_root: String,
}

impl DaemonCommand {
    fn extra_args(&self) -> String {
        if self.soci_root == SOCI_ROOT {
            String::new()
        } else {
            format!(" --root {}", self.soci_root)
        }
    }
    fn fill(&self, template: &str) -> String {
        template
            .replace("@SOCI_BIN@", &self.binary)
            .replace("@SOCI_ARGS@", &self.extra_args())
            .replace("@SOCI_ROOT@", &self.soci_root)
    }
}

/// Our full `soci-snapshotter.service`, for hosts without one.
pub fn service(cmd: &DaemonCommand) -> String {
    cmd.fill(SERVICE_TEMPLATE)
}

/// Our `soci-snapshotter.socket`, installed with our service.
pub fn socket() -> String {
    SOCKET_TEMPLATE.to_string()
}

/// The drop-in over a preinstalled service: our binary, Restart=always, the
/// root mounted first.
pub fn service_dropin(cmd: &DaemonCommand) -> String {
    cmd.fill(SERVICE_DROPIN_TEMPLATE)
}

/// `containerd.service.d/10-soci-snapshotter.conf`: Requires= and After=.
pub fn containerd_dropin() -> String {
    CONTAINERD_DROPIN.to_string()
}

/// The boot unit (`soci-agent boot` before kubelet).
pub fn boot_service() -> String {
    BOOT_SERVICE_TEMPLATE.to_string()
}

/// `kubelet.service.d/50-soci-agent-boot.conf`: Wants= and After= the boot unit.
pub fn kubelet_dropin() -> String {
    KUBELET_DROPIN.to_string()
}

/// The daemon unit (`soci-agent daemon`), installed with `install --daemon`.
pub fn daemon_service() -> String {
    DAEMON_SERVICE_TEMPLATE.to_string()
}

/// True when a unit file's text was written by soci-agent.
pub fn is_ours(text: &str) -> bool {
    text.starts_with(MARKER)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::AGENT_BINARY;

    #[test]
    fn templates_are_filled_and_marked() {
        let cmd = DaemonCommand {
            binary: "/usr/local/bin/soci-snapshotter-grpc".into(),
            soci_root: "/data/soci".into(),
        };
        let s = service(&cmd);
        assert!(is_ours(&s));
        assert!(s.contains("ExecStart=/usr/local/bin/soci-snapshotter-grpc --address fd:// --root /data/soci\n"));
        assert!(s.contains("Type=notify") && s.contains("Restart=always") && s.contains("Before=containerd.service"));
        assert!(!s.contains('@'), "unfilled placeholder in {s}");
        let d = service_dropin(&DaemonCommand {
            soci_root: SOCI_ROOT.into(),
            ..cmd
        });
        assert!(d.contains("ExecStart=\nExecStart=/usr/local/bin/soci-snapshotter-grpc --address fd://\n"));
        assert!(d.contains("RequiresMountsFor=/var/lib/soci-snapshotter-grpc"));
        assert!(is_ours(&socket()) && is_ours(&containerd_dropin()));
        assert!(containerd_dropin().contains("Requires=soci-snapshotter.service"));
        let boot = boot_service();
        assert!(is_ours(&boot) && boot.contains("Type=oneshot") && boot.contains("Before=kubelet.service"));
        assert!(boot.contains(&format!("ExecStart={AGENT_BINARY} boot")));
        assert!(kubelet_dropin().contains("Wants=soci-agent-boot.service"));
    }
}
