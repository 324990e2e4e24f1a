//! host.*: the distribution, architecture, size, and the disk under the SOCI
//! root (free space, filesystem, instance store or EBS).

use crate::mountinfo::{self, Mount};
use crate::paths::STORE_DIR;
use std::path::{Path, PathBuf};

use super::Check;
use super::node::Node;
use crate::install::plan::{MIN_CPUS, MIN_MEMORY_BYTES};
use crate::release::Arch;

const GIB: f64 = (1u64 << 30) as f64;
/// Below this much free space under the SOCI root, pulls will fail.
const FAIL_FREE_BYTES: u64 = 2 << 30;
/// Below this (or 10 %), large images will not fit for long.
const WARN_FREE_BYTES: u64 = 20 << 30;
/// Where nodeadm mounts local (instance store) disks.
const K8S_DISKS: &str = "/mnt/k8s-disks";

pub fn os(node: &Node) -> Check {
    const ID: &str = "host.os";
    let os = &node.facts.os;
    if os.is_bottlerocket() {
        return Check::skip(
            ID,
            format!(
                "{} (ID=bottlerocket in /etc/os-release): SOCI is built in",
                os.pretty_name
            ),
        )
        .advise(
            "configure SOCI through Bottlerocket's settings API (settings.container-runtime-plugins, \
             settings.kubernetes); soci-agent does not manage Bottlerocket nodes",
        );
    }
    if os.id.is_empty() {
        return Check::skip(
            ID,
            "no /etc/os-release or /usr/lib/os-release under the root (or no ID= in it)",
        );
    }
    let name = if os.pretty_name.is_empty() {
        &os.id
    } else {
        &os.pretty_name
    };
    Check::ok(
        ID,
        format!("{name} (ID={} VERSION_ID={} in /etc/os-release)", os.id, os.version_id),
    )
}

pub fn checks(node: &Node) -> Vec<Check> {
    vec![arch(node), size(node), disk(node), storage(node)]
}

fn arch(node: &Node) -> Check {
    const ID: &str = "host.arch";
    let machine = &node.facts.machine;
    let arch = match Arch::from_machine(machine) {
        Ok(a) => a,
        Err(e) => return Check::fail(ID, format!("uname -m: {machine}"), e.to_string()),
    };
    let whose = if node.root.is_host() {
        ""
    } else {
        " (the machine running doctor; --root is not /)"
    };
    let stored = node.exec.as_ref().and_then(|e| store_manifest(node, e.binary()));
    match stored {
        Some((entry, m)) if node.root.is_host() && m.arch != arch => Check::fail(
            ID,
            format!(
                "uname -m: {machine} ({arch}), but {entry}/release.json is for {}",
                m.arch
            ),
            format!("re-run soci-agent install (it installs the {arch} release)"),
        ),
        _ => Check::ok(ID, format!("uname -m: {machine} ({arch}){whose}")),
    }
}

/// The store entry and manifest a binary resolves into, if it does.
pub(super) fn store_manifest(node: &Node, binary: &str) -> Option<(String, crate::release::store::Manifest)> {
    let resolved = node.resolve(binary);
    let entry = Path::new(&resolved).parent()?;
    if !entry.starts_with(STORE_DIR) {
        return None;
    }
    let text = std::fs::read_to_string(node.root.path(entry).join(crate::release::store::MANIFEST)).ok()?;
    Some((entry.display().to_string(), serde_json::from_str(&text).ok()?))
}

fn size(node: &Node) -> Check {
    const ID: &str = "host.size";
    if !node.root.is_host() {
        return Check::skip(
            ID,
            "--root is not /: this machine's vCPU and memory say nothing about the node",
        );
    }
    let cpus = node.facts.cpus;
    let mem = node.facts.memory_bytes;
    let mem_s = mem.map_or("unknown memory".into(), |m| format!("{:.1} GiB", m as f64 / GIB));
    let evidence = format!("{cpus} vCPU, {mem_s} (available_parallelism, /proc/meminfo)");
    if cpus < MIN_CPUS || mem.is_some_and(|m| m < MIN_MEMORY_BYTES) {
        return Check::warn(
            ID,
            evidence,
            format!(
                "parallel pull/unpack helps little below {MIN_CPUS} vCPU / 7 GiB (nodeadm's FastImagePull \
                 skips SOCI there): use a larger instance type for image-heavy pods"
            ),
        );
    }
    Check::ok(ID, evidence)
}

/// The SOCI root, or its nearest existing ancestor (host path).
fn existing_ancestor(node: &Node) -> (PathBuf, bool) {
    let want = node.host_path(&node.soci_root.value);
    let mut p = want.as_path();
    loop {
        if p.exists() {
            return (p.to_path_buf(), p == want);
        }
        match p.parent() {
            Some(parent) => p = parent,
            None => return (PathBuf::from("/"), false),
        }
    }
}

const DISK_ID: &str = "host.disk";
const STORAGE_ID: &str = "host.storage";

/// `host.disk`: free space and filesystem under the SOCI root.
fn disk(node: &Node) -> Check {
    let soci_root = &node.soci_root.value;
    let (at, exists) = existing_ancestor(node);
    let where_ = if exists {
        format!("{soci_root} ({})", node.soci_root.source)
    } else {
        format!("{soci_root} (not created yet; measured at {})", at.display())
    };
    let (avail, total) = match free_space(&at) {
        Ok(space) => space,
        Err(e) => return Check::skip(DISK_ID, format!("statvfs {}: {e}", at.display())),
    };
    let pct = if total > 0 {
        avail as f64 * 100.0 / total as f64
    } else {
        0.0
    };
    let mount = mountinfo::read()
        .ok()
        .and_then(|t| mountinfo::holding(&t, &canonical(&at)).cloned());
    let fs = mount.as_ref().map_or("filesystem unknown".to_string(), |m| {
        format!("{} on {} mounted at {}", m.fstype, m.source, m.mount_point)
    });
    let evidence = format!(
        "{where_}: {:.1} GiB free of {:.1} GiB ({pct:.0}%), {fs}",
        avail as f64 / GIB,
        total as f64 / GIB
    );
    disk_verdict(evidence, avail, pct, mount.as_ref())
}

/// Bytes available to unprivileged users and in total on the filesystem holding `at`.
fn free_space(at: &Path) -> nix::Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(at)?;
    let frag = st.fragment_size() as u64;
    Ok((st.blocks_available() as u64 * frag, st.blocks() as u64 * frag))
}

/// `at` with symlinks resolved, or as given when that fails.
fn canonical(at: &Path) -> PathBuf {
    std::fs::canonicalize(at).unwrap_or(at.to_path_buf())
}

/// Fails on too little free space, warns on a poor filesystem or a tight one.
fn disk_verdict(evidence: String, avail: u64, pct: f64, mount: Option<&Mount>) -> Check {
    if avail < FAIL_FREE_BYTES {
        return Check::fail(
            DISK_ID,
            evidence,
            "free space under the SOCI root: images are unpacked there; put it on a larger volume (--soci-root)",
        );
    }
    if let Some(m) = mount
        && (matches!(m.fstype.as_str(), "overlay" | "nfs" | "nfs4" | "tmpfs") || m.fstype.starts_with("fuse"))
    {
        return Check::warn(
            DISK_ID,
            evidence,
            format!(
                "{} is a poor home for snapshots (overlayfs on it may be refused, or it lives in RAM): \
                 use an ext4 or xfs volume",
                m.fstype
            ),
        );
    }
    if avail < WARN_FREE_BYTES || pct < 10.0 {
        return Check::warn(
            DISK_ID,
            evidence,
            "little free space under the SOCI root for large images: grow the volume or use instance store",
        );
    }
    Check::ok(DISK_ID, evidence)
}

/// `host.storage`: whether the SOCI root is on instance store.
fn storage(node: &Node) -> Check {
    if !node.root.is_host() {
        return Check::skip(
            STORAGE_ID,
            "--root is not /: mounts are the running host's, not the node's",
        );
    }
    let mounts = match mountinfo::read() {
        Ok(m) => m,
        Err(e) => return Check::skip(STORAGE_ID, format!("/proc/self/mountinfo: {e}")),
    };
    let canon = canonical(&existing_ancestor(node).0);
    let Some(m) = mountinfo::holding(&mounts, &canon) else {
        return Check::skip(
            STORAGE_ID,
            format!("no mount found for {} in /proc/self/mountinfo", canon.display()),
        );
    };
    let (bound, local_disks) = k8s_disks(&mounts, m);
    let model = device_model(m.dev);
    if bound || model.as_deref().is_some_and(|s| s.contains("Instance Storage")) {
        return on_instance_store(node, m, bound);
    }
    off_instance_store(node, m, model.as_deref(), local_disks)
}

/// The SOCI root is on instance store (`bound`: it shares a device with a /mnt/k8s-disks mount).
fn on_instance_store(node: &Node, m: &Mount, bound: bool) -> Check {
    Check::ok(
        STORAGE_ID,
        format!(
            "{} is on instance store: {} {} (dev {}:{}) {}",
            node.soci_root.value,
            m.fstype,
            m.source,
            m.dev.0,
            m.dev.1,
            if bound {
                "shared with a /mnt/k8s-disks mount"
            } else {
                ""
            }
        )
        .trim_end()
        .to_string(),
    )
}

/// The SOCI root is elsewhere (`model` of its device, when known): a warning when local disks go unused.
fn off_instance_store(node: &Node, m: &Mount, model: Option<&str>, local_disks: bool) -> Check {
    let what = match model {
        Some(s) if s.contains("Elastic Block Store") => "on EBS".to_string(),
        Some(s) => format!("on a {s:?} device, not instance store"),
        None => "not on instance store".to_string(),
    };
    let evidence = format!(
        "{} is {what}: {} {} mounted at {}",
        node.soci_root.value, m.fstype, m.source, m.mount_point
    );
    if local_disks {
        return Check::warn(
            STORAGE_ID,
            evidence,
            format!(
                "local disks are mounted under {K8S_DISKS} but the SOCI root is not on them: with nodeadm, \
                 keep the root at /var/lib/soci-snapshotter-grpc and do not list SOCI in localStorage.disabledMounts"
            ),
        );
    }
    Check::ok(STORAGE_ID, evidence)
}

/// Is mount `m` on the node's instance-store disks (under, or sharing a device
/// with, a `/mnt/k8s-disks` mount), and has the node any such mount at all?
fn k8s_disks(mounts: &[Mount], m: &Mount) -> (bool, bool) {
    let local: Vec<&Mount> = mounts
        .iter()
        .filter(|x| Path::new(&x.mount_point).starts_with(K8S_DISKS))
        .collect();
    let bound = Path::new(&m.mount_point).starts_with(K8S_DISKS) || local.iter().any(|x| x.dev == m.dev);
    (bound, !local.is_empty())
}

/// `/sys/dev/block/MAJ:MIN/device/model` (or the parent disk's, for a partition).
fn device_model((major, minor): (u64, u64)) -> Option<String> {
    let base = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    [base.join("device/model"), base.join("../device/model")]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_bound_from_the_raid_of_instance_stores_is_on_them() {
        let mounts = mountinfo::parse(
            "22 1 259:1 / / rw - xfs /dev/nvme0n1p1 rw\n\
             30 22 9:127 / /mnt/k8s-disks/0 rw - xfs /dev/md127 rw\n\
             31 22 9:127 /soci /var/lib/soci-snapshotter-grpc rw - xfs /dev/md127 rw\n\
             32 22 259:9 / /mnt/k8s-disks-other rw - xfs /dev/nvme9n1 rw\n",
        );
        let soci = mountinfo::holding(&mounts, Path::new("/var/lib/soci-snapshotter-grpc/snapshotter")).unwrap();
        assert_eq!(k8s_disks(&mounts, soci), (true, true));
        let other = mountinfo::holding(&mounts, Path::new("/var/lib/other")).unwrap();
        assert_eq!(k8s_disks(&mounts, other), (false, true));
        // `/mnt/k8s-disks-other` is not under `/mnt/k8s-disks`: whole components only.
        let lookalike = mountinfo::holding(&mounts, Path::new("/mnt/k8s-disks-other/x")).unwrap();
        assert_eq!(k8s_disks(&mounts, lookalike), (false, true));
        assert_eq!(k8s_disks(&mounts[..1], &mounts[0]), (false, false));
    }
}
