//! What the checks look at, gathered once per run: host facts, the SOCI
//! unit and the command it runs, the SOCI and containerd configs, the
//! install record and, when a bus is reachable, systemd's view of the units.
//! Reading never fails here: a file is present, absent or unreadable (with
//! the reason), and the checks decide what that means.

use crate::paths::{
    BOOT_SERVICE, CONTAINERD_SERVICE, KUBELET_SERVICE, SOCI_CONFIG, SOCI_ROOT, SOCI_SERVICE, SOCI_SOCKET,
    SOCI_SOCKET_UNIT, SYSTEM_BUS,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::DoctorContext;
use super::unitfile::{ExecStart, UnitFiles};
use crate::files::containerd_config::{Daemon, SociWiring};
use crate::files::units;
use crate::host::{ContainerdVersion, HostFacts};
use crate::install::record::{Record, RecordError};
use crate::rootfs::Root;
use crate::systemd::{Systemd, SystemdError, UnitState};

const BUS_TIMEOUT: Duration = Duration::from_secs(3);

/// A file's content as far as we could read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Text {
    Missing,
    Found(String),
    /// Exists but could not be read: the error (e.g. permission denied).
    Unreadable(String),
}

impl Text {
    pub fn read(root: &Root, node_path: &str) -> Text {
        match std::fs::read(root.path(node_path)) {
            Ok(b) => match String::from_utf8(b) {
                Ok(s) => Text::Found(s),
                Err(_) => Text::Unreadable("not UTF-8".into()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Text::Missing,
            Err(e) => Text::Unreadable(e.to_string()),
        }
    }
    pub fn found(&self) -> Option<&str> {
        match self {
            Text::Found(s) => Some(s),
            _ => None,
        }
    }
}

/// systemd's answers over D-Bus, or why there are none.
#[derive(Debug)]
pub enum Bus {
    Connected {
        address: String,
        units: BTreeMap<&'static str, Result<UnitState, SystemdError>>,
    },
    Unavailable(String),
}

impl Bus {
    /// The unit's state, when the bus answered for it.
    pub fn unit(&self, name: &str) -> Option<&UnitState> {
        match self {
            Bus::Connected { units, .. } => units.get(name).and_then(|r| r.as_ref().ok()),
            Bus::Unavailable(_) => None,
        }
    }
}

/// Where a derived value came from, for evidence lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sourced {
    pub value: String,
    pub source: String,
}

/// The node as the checks see it.
#[derive(Debug)]
pub struct Node {
    pub root: Root,
    pub facts: HostFacts,
    pub soci_unit: UnitFiles,
    pub soci_socket_unit: UnitFiles,
    /// The command `soci-snapshotter.service` runs.
    pub exec: Option<ExecStart>,
    pub soci_root: Sourced,
    /// Node path of the socket the daemon serves (what containerd and kubelet must name).
    pub soci_socket: Sourced,
    pub soci_config_path: Sourced,
    pub soci_config: Text,
    pub containerd_config_path: String,
    pub containerd_config: Text,
    pub record: Result<Option<Record>, RecordError>,
    pub bus: Bus,
    pub now: SystemTime,
}

impl Node {
    pub async fn gather(ctx: &DoctorContext) -> Node {
        let root = ctx.root.clone();
        let facts = crate::host::detect(&root).await;
        let soci_unit = UnitFiles::load(&root, SOCI_SERVICE);
        let soci_socket_unit = UnitFiles::load(&root, SOCI_SOCKET_UNIT);
        let exec = soci_unit.exec_start();
        let soci_root = soci_root_of(ctx, exec.as_ref());
        let soci_config_path = exec_flag(exec.as_ref(), "--config").unwrap_or_else(|| Sourced {
            value: SOCI_CONFIG.into(),
            source: "the daemon's default --config".into(),
        });
        let soci_socket = socket_of(exec.as_ref(), &soci_socket_unit);
        let soci_config = Text::read(&root, &soci_config_path.value);
        let containerd_config = Text::read(&root, &ctx.containerd_config);
        let record = Record::load(&root);
        let bus = bus(ctx).await;
        Node {
            facts,
            soci_unit,
            soci_socket_unit,
            exec,
            soci_root,
            soci_socket,
            soci_config_path,
            soci_config,
            containerd_config_path: ctx.containerd_config.clone(),
            containerd_config,
            record,
            bus,
            now: ctx.now,
            root,
        }
    }

    /// soci-agent has installed here (a record, or one of its unit files).
    pub fn agent_installed(&self) -> bool {
        matches!(self.record, Ok(Some(_)) | Err(_))
            || self.soci_unit.fragment.as_ref().is_some_and(|(_, t)| units::is_ours(t))
            || self.soci_unit.dropins.iter().any(|(_, t)| units::is_ours(t))
    }

    /// The node's nodeadm (EKS AL2023) wiring applies.
    pub fn nodeadm(&self) -> bool {
        self.facts.nodeadm
    }

    /// A node path resolved under the root, following symlinks the way the
    /// node would (absolute targets stay under the root). Returns the final
    /// node path.
    pub fn resolve(&self, node_path: &str) -> String {
        resolve_in_root(&self.root, node_path)
    }

    pub fn host_path(&self, node_path: &str) -> PathBuf {
        self.root.path(node_path)
    }

    /// The SOCI socket and root containerd must name, as doctor derived them.
    pub fn soci_wiring(&self) -> SociWiring {
        SociWiring {
            address: self.soci_socket.value.clone(),
            soci_root: self.soci_root.value.clone(),
        }
    }
}

/// The containerd that reads the config, as the config module names it.
pub fn containerd_daemon(c: &ContainerdVersion) -> Daemon {
    Daemon {
        major: c.major,
        minor: c.minor,
    }
}

/// Follows a chain of symlinks at `node_path` within `root` (at most 40).
pub fn resolve_in_root(root: &Root, node_path: &str) -> String {
    let mut cur = PathBuf::from(node_path);
    for _ in 0..40 {
        let Ok(target) = std::fs::read_link(root.path(&cur)) else {
            break;
        };
        let next = if target.is_absolute() {
            target
        } else {
            cur.parent().unwrap_or(Path::new("/")).join(target)
        };
        cur = PathBuf::from(normalize(&next));
    }
    normalize(&cur)
}

/// Lexically removes `.` and `..` from an absolute path.
fn normalize(p: &Path) -> String {
    let mut parts: Vec<String> = Vec::new();
    for c in p.components() {
        match c {
            std::path::Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
            std::path::Component::ParentDir => {
                parts.pop();
            }
            _ => {}
        }
    }
    format!("/{}", parts.join("/"))
}

/// The SOCI root: `--soci-root`, else the ExecStart's `--root`, else the daemon's default.
fn soci_root_of(ctx: &DoctorContext, exec: Option<&ExecStart>) -> Sourced {
    match &ctx.soci_root {
        Some(r) => Sourced {
            value: r.clone(),
            source: "--soci-root".into(),
        },
        None => exec_flag(exec, "--root").unwrap_or_else(|| Sourced {
            value: SOCI_ROOT.into(),
            source: "the daemon's default --root".into(),
        }),
    }
}

/// The value of `flag` in the service's ExecStart, with where it came from.
fn exec_flag(exec: Option<&ExecStart>, flag: &str) -> Option<Sourced> {
    let e = exec?;
    e.flag(flag).map(|v| Sourced {
        value: v.to_string(),
        source: format!("{flag} in ExecStart of {}", e.source),
    })
}

/// The socket the daemon serves: `--address PATH`, or with `fd://` the
/// socket unit's ListenStream, else the default.
fn socket_of(exec: Option<&ExecStart>, socket_unit: &UnitFiles) -> Sourced {
    let default = || Sourced {
        value: SOCI_SOCKET.into(),
        source: "the daemon's default --address".into(),
    };
    let Some(e) = exec else { return default() };
    match e.flag("--address") {
        Some("fd://") => socket_unit
            .list("Socket", "ListenStream")
            .into_iter()
            .find(|(_, v)| v.starts_with('/'))
            .map(|(path, v)| Sourced {
                value: v,
                source: format!("ListenStream in {path} (ExecStart uses fd://)"),
            })
            .unwrap_or_else(|| Sourced {
                value: SOCI_SOCKET.into(),
                source: "the default socket (ExecStart uses fd:// but no socket unit listens)".into(),
            }),
        Some(a) => Sourced {
            value: a.trim_start_matches("unix://").to_string(),
            source: format!("--address in ExecStart of {}", e.source),
        },
        None => default(),
    }
}

async fn bus(ctx: &DoctorContext) -> Bus {
    if !ctx.live {
        return Bus::Unavailable("--no-live: systemd not asked; read from unit files".into());
    }
    let (connecting, address) = match &ctx.bus_address {
        Some(a) => (Systemd::connect_address(a, BUS_TIMEOUT).await, a.clone()),
        None if ctx.root.is_host() => (Systemd::connect(BUS_TIMEOUT).await, format!("unix:path={}", SYSTEM_BUS)),
        None => {
            return Bus::Unavailable(
                "--root is not /: its systemd is not running here (use --bus-address); read from unit files".into(),
            );
        }
    };
    let sd = match connecting {
        Ok(sd) => sd,
        Err(crate::systemd::SystemdError::NoBus { address, source }) => {
            return Bus::Unavailable(format!("no bus at {address}: {source}; read from unit files"));
        }
        Err(e) => return Bus::Unavailable(format!("{}; read from unit files", crate::exit::error_chain(&e))),
    };
    let mut units_map = BTreeMap::new();
    for name in [
        SOCI_SERVICE,
        SOCI_SOCKET_UNIT,
        CONTAINERD_SERVICE,
        BOOT_SERVICE,
        KUBELET_SERVICE,
    ] {
        let state = sd.unit_state(name).await;
        units_map.insert(name, state);
    }
    Bus::Connected {
        address,
        units: units_map,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path());
        std::fs::create_dir_all(root.path("/usr/local/bin")).unwrap();
        std::fs::create_dir_all(root.path("/opt/x")).unwrap();
        std::os::unix::fs::symlink("/opt/x/bin", root.path("/usr/local/bin/a")).unwrap();
        std::os::unix::fs::symlink("../y/../x/real", root.path("/opt/x/bin")).unwrap();
        assert_eq!(resolve_in_root(&root, "/usr/local/bin/a"), "/opt/x/real");
        assert_eq!(resolve_in_root(&root, "/nope"), "/nope");
    }
}
