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
            format!(" --root {}", exec_word(&self.soci_root))
        }
    }
    fn fill(&self, template: &str) -> String {
        template
            .replace("@SOCI_BIN@", &exec_word(&self.binary))
            .replace("@SOCI_ARGS@", &self.extra_args())
            .replace("@SOCI_ROOT@", &path_word(&self.soci_root))
    }
}

/// Why a path cannot go into a unit file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitValueError {
    #[error("{what} {value:?} is not an absolute path")]
    NotAbsolute { what: &'static str, value: String },
    #[error("{what} {value:?} is not normalized (no empty, `.` or `..` components, no trailing `/`)")]
    NotNormalized { what: &'static str, value: String },
    #[error("{what} {value:?} contains a control character (a newline would start a new unit-file line)")]
    ControlCharacter { what: &'static str, value: String },
}

/// Checks a path that lands in a unit file (`what` names the setting):
/// absolute, normalized, printable. Quoting and specifiers are handled when
/// it is written ([`exec_word`], [`path_word`]).
pub fn check_unit_path(what: &'static str, value: &str) -> Result<(), UnitValueError> {
    if value.chars().any(char::is_control) {
        return Err(UnitValueError::ControlCharacter {
            what,
            value: value.to_owned(),
        });
    }
    if !value.starts_with('/') {
        return Err(UnitValueError::NotAbsolute {
            what,
            value: value.to_owned(),
        });
    }
    let normalized = value == "/" || value[1..].split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    if !normalized {
        return Err(UnitValueError::NotNormalized {
            what,
            value: value.to_owned(),
        });
    }
    Ok(())
}

/// One word of an `ExecStart=` command line: `%` and `$` doubled (no
/// specifier or variable expansion), double-quoted with C escapes when it
/// holds anything else systemd would split or interpret.
pub fn exec_word(value: &str) -> String {
    quoted(&value.replace('%', "%%").replace('$', "$$"))
}

/// One path of a path-list setting (`RequiresMountsFor=`): `%` doubled,
/// double-quoted with C escapes when needed.
pub fn path_word(value: &str) -> String {
    quoted(&value.replace('%', "%%"))
}

fn quoted(value: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/-_.,:+=@%$".contains(c);
    if !value.is_empty() && value.chars().all(plain) {
        return value.to_owned();
    }
    let mut out = String::from("\"");
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32 & 0xff)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
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

    fn with_root(root: &str) -> String {
        service(&DaemonCommand {
            binary: "/usr/local/bin/soci-snapshotter-grpc".into(),
            soci_root: root.into(),
        })
    }

    #[test]
    fn values_cannot_inject_directives_or_expand() {
        let injected = with_root("/var/lib/x\nExecStartPre=/bin/touch /tmp/INJ");
        assert_eq!(
            injected.lines().filter(|l| l.starts_with("ExecStart")).count(),
            1,
            "{injected}"
        );
        assert!(!injected.lines().any(|l| l.starts_with("ExecStartPre")), "{injected}");
        let spaced = with_root("/var/lib/with space");
        assert!(spaced.contains("--root \"/var/lib/with space\""), "{spaced}");
        assert!(spaced.contains("RequiresMountsFor=\"/var/lib/with space\""), "{spaced}");
        let specifier = with_root("/var/lib/%h");
        assert!(specifier.contains("--root /var/lib/%%h") && specifier.contains("RequiresMountsFor=/var/lib/%%h"));
        assert!(
            with_root("/var/lib/$HOME").contains("--root \"/var/lib/$$HOME\"")
                || with_root("/var/lib/$HOME").contains("--root /var/lib/$$HOME")
        );
        assert_eq!(exec_word("/a\"b\\c"), "\"/a\\\"b\\\\c\"");
    }

    #[test]
    fn unit_paths_are_checked() {
        check_unit_path("--soci-root", "/var/lib/soci").unwrap();
        check_unit_path("--soci-root", "/var/lib/with space").unwrap();
        for bad in [
            "relative/dir",
            "",
            "/var/../etc",
            "/var/lib/",
            "/a//b",
            "/a/./b",
            "/x\ny",
        ] {
            assert!(check_unit_path("--soci-root", bad).is_err(), "{bad:?} accepted");
        }
    }

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
