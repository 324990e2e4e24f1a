//! Host detection: gathered once, passed down as a value. Reads files under
//! the root and, for versions, runs `--version` of the binaries found there
//! (bounded in time). Nothing else in the agent looks at the host by itself.

use crate::paths::{
    CONTAINERD_VERSION_FILE, KUBELET_CONFIG, KUBELET_DROPIN_DIR, KUBELET_SERVICE, NODEADM_BIN, NODEADM_DROPIN_DIR,
    SOCI_BINARY_LOCATIONS, SOCI_SERVICE, STORE_DIR, UNIT_SEARCH_PATH, UNPIGZ,
};
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::release::{Arch, ReleaseError};
use crate::rootfs::Root;

const CONTAINERD_BINARIES: [&str; 3] = [
    "/usr/bin/containerd",
    "/usr/local/bin/containerd",
    "/usr/sbin/containerd",
];
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Default, Serialize)]
pub struct OsRelease {
    pub id: String,
    pub version_id: String,
    pub pretty_name: String,
}

impl OsRelease {
    pub fn parse(text: &str) -> Self {
        let mut os = OsRelease::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else { continue };
            let v = v.trim().trim_matches('"').trim_matches('\'').to_string();
            match k.trim() {
                "ID" => os.id = v,
                "VERSION_ID" => os.version_id = v,
                "PRETTY_NAME" => os.pretty_name = v,
                _ => {}
            }
        }
        os
    }
    pub fn is_bottlerocket(&self) -> bool {
        self.id == "bottlerocket"
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ContainerdVersion {
    pub version: String,
    pub major: u32,
    pub minor: u32,
    /// Where it was read: the EKS version file or `containerd --version`.
    pub source: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct InstalledSoci {
    pub path: String,
    /// A symlink into soci-agent's store.
    pub managed: bool,
    pub version: Option<String>,
}

/// Who owns `soci-snapshotter.service` on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "owner", content = "path", rename_all = "snake_case")]
pub enum SociUnit {
    Absent,
    /// Written by soci-agent (marker line).
    Ours(String),
    /// Preinstalled (e.g. the AL2023 AMI's RPM unit).
    Foreign(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct HostFacts {
    /// Kernel machine name of the running host (`uname -m`).
    pub machine: String,
    pub os: OsRelease,
    pub nodeadm: bool,
    pub nodeadm_dropin_dir: bool,
    pub containerd: Option<ContainerdVersion>,
    pub soci_installed: Vec<InstalledSoci>,
    pub soci_unit: SociUnit,
    pub unpigz: bool,
    pub kubelet_config_layout: bool,
    /// A `kubelet.service` unit file exists.
    pub kubelet_unit: bool,
    pub cpus: usize,
    pub memory_bytes: Option<u64>,
}

impl HostFacts {
    /// The release architecture: the override, else the running machine's.
    pub fn arch(&self, overridden: Option<Arch>) -> Result<Arch, ReleaseError> {
        overridden.map_or_else(|| Arch::from_machine(&self.machine), Ok)
    }
}

/// Parses `2.2.1`, `v1.7.27`, `containerd github.com/containerd/containerd v1.6.20~ds1 …`.
pub fn parse_containerd_version(text: &str, source: &str) -> Option<ContainerdVersion> {
    text.split_whitespace().find_map(|tok| {
        let t = tok.strip_prefix('v').unwrap_or(tok);
        let core: String = t.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
        let mut it = core.split('.');
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        Some(ContainerdVersion {
            version: core.clone(),
            major,
            minor,
            source: source.to_string(),
        })
    })
}

/// Runs `<binary> --version` with a bound; its stdout+stderr, or None.
async fn run_version(binary: &Path) -> Option<String> {
    let child = tokio::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(VERSION_TIMEOUT, child).await {
        Ok(Ok(out)) => {
            let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&out.stderr));
            Some(s)
        }
        _ => None,
    }
}

/// `soci-snapshotter-grpc version v0.11.1 <rev>` -> `0.11.1`.
pub fn parse_soci_version(text: &str) -> Option<String> {
    text.split_whitespace().find_map(|tok| {
        let t = tok.strip_prefix('v').unwrap_or(tok);
        let ok = t.split('.').count() >= 3 && t.chars().next().is_some_and(|c| c.is_ascii_digit());
        ok.then(|| t.to_string())
    })
}

fn meminfo_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Gathers the facts of the host under `root`. CPU, memory and machine are
/// the running host's (the target when installing on a node). Versions come
/// from files; `--version` of a binary is asked only when `root` is this
/// host, never of a mounted image's binaries.
pub async fn detect(root: &Root) -> HostFacts {
    HostFacts {
        machine: nix::sys::utsname::uname()
            .map(|u| u.machine().to_string_lossy().into_owned())
            .unwrap_or_default(),
        os: OsRelease::parse(&os_release_text(root)),
        nodeadm: root.exists(NODEADM_BIN) || root.exists(NODEADM_DROPIN_DIR),
        nodeadm_dropin_dir: root.resolve(NODEADM_DROPIN_DIR).is_dir(),
        containerd: containerd_version(root).await,
        soci_installed: installed_soci(root).await,
        soci_unit: soci_unit(root),
        unpigz: root.resolve(UNPIGZ).is_file(),
        kubelet_config_layout: root.exists(KUBELET_CONFIG) || root.exists(KUBELET_DROPIN_DIR),
        kubelet_unit: UNIT_SEARCH_PATH
            .iter()
            .any(|d| root.exists(format!("{d}/{}", KUBELET_SERVICE))),
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        memory_bytes: meminfo_total(),
    }
}

/// `/etc/os-release`, else `/usr/lib/os-release`, else empty.
fn os_release_text(root: &Root) -> String {
    root.read_string_opt("/etc/os-release")
        .ok()
        .flatten()
        .or_else(|| root.read_string_opt("/usr/lib/os-release").ok().flatten())
        .unwrap_or_default()
}

/// containerd's version alone (see [`detect`]), for commands that need no other fact.
pub async fn detect_containerd(root: &Root) -> Option<ContainerdVersion> {
    containerd_version(root).await
}

/// containerd's version from the EKS file, else (on this host only) from
/// `containerd --version`: programs inside a --root that is not this host (a
/// mounted image) are never run, they would run as root on the build host.
async fn containerd_version(root: &Root) -> Option<ContainerdVersion> {
    let from_file = root
        .read_string_opt(CONTAINERD_VERSION_FILE)
        .ok()
        .flatten()
        .and_then(|t| parse_containerd_version(&t, CONTAINERD_VERSION_FILE));
    if from_file.is_some() || !root.is_host() {
        return from_file;
    }
    for bin in CONTAINERD_BINARIES {
        let p = root.resolve(bin);
        if p.is_file()
            && let Some(out) = run_version(&p).await
            && let Some(v) = parse_containerd_version(&out, &format!("{bin} --version"))
        {
            return Some(v);
        }
    }
    None
}

/// Every `soci-snapshotter-grpc` at the known locations: whether it is our
/// store's link, and its version (asked only on this host).
async fn installed_soci(root: &Root) -> Vec<InstalledSoci> {
    let mut found = Vec::new();
    for loc in SOCI_BINARY_LOCATIONS {
        let p = root.path(loc);
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let managed = meta.file_type().is_symlink() && std::fs::read_link(&p).is_ok_and(|t| t.starts_with(STORE_DIR));
        let version = if root.is_host() {
            run_version(&root.resolve(loc))
                .await
                .as_deref()
                .and_then(parse_soci_version)
        } else {
            None
        };
        found.push(InstalledSoci {
            path: loc.to_string(),
            managed,
            version,
        });
    }
    found
}

/// The first `soci-snapshotter.service` on systemd's search path: ours or foreign.
fn soci_unit(root: &Root) -> SociUnit {
    for dir in UNIT_SEARCH_PATH {
        let node_path = format!("{dir}/{}", SOCI_SERVICE);
        if let Ok(Some(text)) = root.read_string_opt(&node_path) {
            return if crate::files::units::is_ours(&text) {
                SociUnit::Ours(node_path)
            } else {
                SociUnit::Foreign(node_path)
            };
        }
    }
    SociUnit::Absent
}

/// The registry host files containerd reads (`config_path` of the CRI
/// registry in the containerd config at `containerd_config`, a node path):
/// each `<config_path>/<registry>/hosts.toml` that parses, and the errors of
/// those that do not. Nothing when containerd has no `config_path` or the
/// config cannot be read (install and doctor report that themselves).
pub fn registry_hosts(
    root: &Root,
    containerd_config: &str,
) -> (
    Vec<crate::files::registry_hosts::RegistryHosts>,
    Vec<crate::files::registry_hosts::HostsError>,
) {
    use crate::files::registry_hosts::{config_path, parse};
    let text = root.read_opt(containerd_config).ok().flatten().unwrap_or_default();
    let doc = String::from_utf8(text)
        .ok()
        .and_then(|t| t.parse::<toml_edit::DocumentMut>().ok());
    let Some(dir) = doc.as_ref().and_then(config_path) else {
        return (Vec::new(), Vec::new());
    };
    // containerd takes the first directory of a ':'-separated list that has the registry.
    let Some(first) = dir.split(':').next().filter(|d| d.starts_with('/')) else {
        return (Vec::new(), Vec::new());
    };
    let mut registries: Vec<String> = std::fs::read_dir(root.path(first))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    registries.sort();
    let (mut found, mut errors) = (Vec::new(), Vec::new());
    for registry in registries {
        let file = format!("{first}/{registry}/hosts.toml");
        let Ok(Some(bytes)) = root.read_opt(&file) else {
            continue;
        };
        match parse(&registry, &String::from_utf8_lossy(&bytes)) {
            Ok(r) => found.push(r),
            Err(e) => errors.push(e),
        }
    }
    (found, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_parsed() {
        let v = parse_containerd_version(
            "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1\n",
            "x",
        )
        .unwrap();
        assert_eq!((v.major, v.minor), (1, 6));
        assert_eq!(parse_containerd_version("2.2.1\n", "f").unwrap().major, 2);
        assert!(parse_containerd_version("garbage", "f").is_none());
        assert_eq!(
            parse_soci_version("soci-snapshotter-grpc version v0.11.1 abcdef\n").as_deref(),
            Some("0.11.1")
        );
    }

    #[test]
    fn os_release_is_parsed() {
        let os = OsRelease::parse("NAME=Bottlerocket\nID=bottlerocket\nVERSION_ID=\"1.44.0\"\n");
        assert!(os.is_bottlerocket());
        assert_eq!(os.version_id, "1.44.0");
    }
}
