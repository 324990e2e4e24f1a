//! The data volume mounted: at `/var/lib/soci-agent/volume`, with its
//! `containerd/` bound on `/var/lib/containerd` and `soci-snapshotter-grpc/`
//! on SOCI's root (the manifest `soci-agent-cache.json` sits at its top);
//! unmounted; grown to its device; its free space. The device itself is
//! `super::device`.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::device::{Content, Device, VolumeError, check_writable, filesystem_size, probe};
use crate::mountinfo::{self, Mount};
use crate::paths::{CONTAINERD_ROOT, VOLUME_CONTAINERD_DIR, VOLUME_MOUNT, VOLUME_SOCI_DIR};
use crate::rootfs::Root;

/// The host's mount table now.
pub fn mounts() -> Vec<Mount> {
    mountinfo::read().unwrap_or_default()
}

/// The last (topmost) mount at host path `at`.
pub fn mount_at(table: &[Mount], at: &Path) -> Option<Mount> {
    mountinfo::at(table, at).cloned()
}

/// Directory of the volume holding fresh roots when the cached ones cannot be read.
pub const FALLBACK_DIR: &str = "unreadable-cache-fallback";

/// Where the volume and the two roots land (host paths under the root).
#[derive(Debug, Clone)]
pub struct Layout {
    pub mountpoint: PathBuf,
    /// (directory on the volume, root it is bound onto), containerd first.
    pub binds: Vec<(PathBuf, PathBuf)>,
}

impl Layout {
    pub fn new(root: &Root, soci_root: &str) -> Layout {
        let mp = root.path(VOLUME_MOUNT);
        Layout {
            binds: vec![
                (mp.join(VOLUME_CONTAINERD_DIR), root.path(CONTAINERD_ROOT)),
                (mp.join(VOLUME_SOCI_DIR), root.path(soci_root)),
            ],
            mountpoint: mp,
        }
    }
    /// The layout used when the cache was written by daemons this node
    /// cannot read: fresh directories of the volume, the old ones untouched.
    pub fn fallback(root: &Root, soci_root: &str) -> Layout {
        let mut l = Layout::new(root, soci_root);
        let fresh = l.mountpoint.join(FALLBACK_DIR);
        l.binds = vec![
            (fresh.join(VOLUME_CONTAINERD_DIR), root.path(CONTAINERD_ROOT)),
            (fresh.join(VOLUME_SOCI_DIR), root.path(soci_root)),
        ];
        l
    }
    fn targets(&self) -> Vec<&Path> {
        std::iter::once(self.mountpoint.as_path())
            .chain(self.binds.iter().map(|(_, t)| t.as_path()))
            .collect()
    }
}

/// Refuses a device mounted anywhere but the layout's places.
pub fn check_not_mounted_elsewhere(dev: &Device, layout: &Layout, table: &[Mount]) -> Result<(), VolumeError> {
    let Some(rdev) = dev.rdev else { return Ok(()) };
    let ours = layout.targets();
    if let Some(m) = table
        .iter()
        .find(|m| m.dev == rdev && !ours.iter().any(|p| Path::new(&m.mount_point) == *p))
    {
        return Err(VolumeError::MountedElsewhere {
            device: dev.used.clone(),
            mountpoint: m.mount_point.clone(),
        });
    }
    Ok(())
}

/// What [`mount`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Mounted {
    pub device: String,
    pub note: Option<String>,
    pub fs: String,
    /// Host paths mounted by this run (already mounted ones are not listed).
    pub mounted: Vec<String>,
    /// Set when the filesystem was grown to the volume's size.
    pub grown: Option<String>,
}

fn mount_err(what: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> VolumeError {
    let path = path.display().to_string();
    move |source| VolumeError::Mount { what, path, source }
}

/// Mounts the volume at [`VOLUME_MOUNT`] and binds its two directories on
/// containerd's and SOCI's roots; what is already in place stays. On any
/// error what this call mounted is unmounted again: nothing half-done.
pub fn mount(root: &Root, dev: &Device, layout: &Layout) -> Result<Mounted, VolumeError> {
    let fs = match probe(root, dev)? {
        Content::Filesystem { fs, .. } if fs == "ext4" || fs == "xfs" => fs,
        Content::Blank => {
            return Err(VolumeError::Blank {
                device: dev.used.clone(),
            });
        }
        Content::Filesystem { fs, .. } => {
            return Err(VolumeError::Foreign {
                device: dev.used.clone(),
                what: format!("an {fs} filesystem"),
            });
        }
        Content::Other { what } => {
            return Err(VolumeError::Foreign {
                device: dev.used.clone(),
                what,
            });
        }
    };
    check_writable(dev)?;
    let table = mounts();
    check_not_mounted_elsewhere(dev, layout, &table)?;
    let mut done = Mounted {
        device: dev.used.clone(),
        note: dev.note.clone(),
        fs: fs.clone(),
        mounted: Vec::new(),
        grown: None,
    };
    let result = mount_all(root, dev, layout, &fs, &table, &mut done);
    if let Err(e) = result {
        for p in done.mounted.iter().rev() {
            let _ = nix::mount::umount2(Path::new(p), nix::mount::MntFlags::empty());
        }
        return Err(e);
    }
    Ok(done)
}

fn mount_all(
    root: &Root,
    dev: &Device,
    layout: &Layout,
    fs: &str,
    table: &[Mount],
    done: &mut Mounted,
) -> Result<(), VolumeError> {
    use nix::mount::MsFlags;
    let ours = |at: &Path| dev.rdev.is_some() && mount_at(table, at).is_some_and(|m| Some(m.dev) == dev.rdev);
    let mkdir = |p: &Path| {
        std::fs::create_dir_all(p).map_err(|source| VolumeError::Dir {
            path: p.display().to_string(),
            source,
        })
    };
    if !ours(&layout.mountpoint) {
        grow_offline(root, dev, fs, done);
        mkdir(&layout.mountpoint)?;
        nix::mount::mount(
            Some(&root.path(&dev.used)),
            &layout.mountpoint,
            Some(fs),
            MsFlags::MS_NOATIME,
            None::<&str>,
        )
        .map_err(|e| match e {
            nix::Error::EROFS | nix::Error::EACCES => VolumeError::ReadOnly {
                device: dev.used.clone(),
            },
            e => mount_err("mount the data volume on", &layout.mountpoint)(e),
        })?;
        done.mounted.push(layout.mountpoint.display().to_string());
    }
    if done.grown.is_none() {
        grow_online(root, dev, fs, &layout.mountpoint, done);
    }
    for (src, target) in &layout.binds {
        mkdir(src)?;
        if ours(target) {
            continue;
        }
        mkdir(target)?;
        nix::mount::mount(Some(src), target, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .map_err(mount_err("bind the data volume onto", target))?;
        done.mounted.push(target.display().to_string());
    }
    Ok(())
}

/// (filesystem bytes, device bytes) when the device is larger than its
/// filesystem by more than 64 MiB: a volume made from a snapshot with
/// `--data-volume-size` over the builder's size.
fn grow_needed(root: &Root, dev: &Device) -> Option<(u64, u64)> {
    let (ma, mi) = dev.rdev?;
    let sectors: u64 = std::fs::read_to_string(format!("/sys/dev/block/{ma}:{mi}/size"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let mut head = vec![0u8; 65536];
    File::open(root.path(&dev.used))
        .and_then(|mut f| f.read_exact(&mut head))
        .ok()?;
    let fs_bytes = filesystem_size(&head)?;
    let dev_bytes = sectors * 512;
    (dev_bytes > fs_bytes + (64 << 20)).then_some((fs_bytes, dev_bytes))
}

/// Whether this process may grow a mounted ext4 online (`CAP_SYS_RESOURCE`,
/// which some containers drop).
fn can_resize_online() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?.trim().to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

/// A filesystem tool (`e2fsck`, `resize2fs`, `xfs_growfs`) that could not do its job.
#[derive(Debug, thiserror::Error)]
enum ToolError {
    #[error("{program} is missing")]
    Missing { program: &'static str },
    #[error("{program}")]
    Run {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{program}: {status}: {stderr}")]
    Failed {
        program: &'static str,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

fn run_tool(candidates: &[&'static str], args: &[&std::ffi::OsStr]) -> Result<(), ToolError> {
    let program: &'static str = candidates
        .iter()
        .copied()
        .find(|p| Path::new(p).is_file())
        .ok_or(ToolError::Missing { program: candidates[0] })?;
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| ToolError::Run { program, source })?;
    // e2fsck: 1 = errors corrected, fine.
    if out.status.success() || (program.ends_with("e2fsck") && out.status.code() == Some(1)) {
        Ok(())
    } else {
        Err(ToolError::Failed {
            program,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Before mounting: an ext4 that must grow while online growth is not
/// allowed here is checked and grown offline (`e2fsck -f -p`, `resize2fs`).
fn grow_offline(root: &Root, dev: &Device, fs: &str, done: &mut Mounted) {
    if fs != "ext4" || can_resize_online() {
        return;
    }
    let Some((fs_bytes, dev_bytes)) = grow_needed(root, dev) else {
        return;
    };
    let path = root.path(&dev.used);
    let result = run_tool(
        &["/usr/sbin/e2fsck", "/sbin/e2fsck"],
        &["-f".as_ref(), "-p".as_ref(), path.as_os_str()],
    )
    .and_then(|()| run_tool(&["/usr/sbin/resize2fs", "/sbin/resize2fs"], &[path.as_os_str()]));
    match result {
        Ok(()) => {
            done.grown = Some(format!(
                "grew the ext4 filesystem offline from {:.1} GiB to the volume's {:.1} GiB",
                gib(fs_bytes),
                gib(dev_bytes)
            ))
        }
        Err(e) => tracing::warn!(
            "growing the data volume's filesystem: {}: it keeps its size",
            crate::exit::error_chain(&e)
        ),
    }
}

/// After mounting: grow the filesystem online to the volume's size
/// (`resize2fs` for ext4, `xfs_growfs` for xfs). A failure is logged, not
/// fatal: the cache is still there.
fn grow_online(root: &Root, dev: &Device, fs: &str, mountpoint: &Path, done: &mut Mounted) {
    let Some((fs_bytes, dev_bytes)) = grow_needed(root, dev) else {
        return;
    };
    let path = root.path(&dev.used);
    let result = if fs == "xfs" {
        run_tool(&["/usr/sbin/xfs_growfs", "/sbin/xfs_growfs"], &[mountpoint.as_os_str()])
    } else {
        run_tool(&["/usr/sbin/resize2fs", "/sbin/resize2fs"], &[path.as_os_str()])
    };
    match result {
        Ok(()) => {
            done.grown = Some(format!(
                "grew the {fs} filesystem online from {:.1} GiB to the volume's {:.1} GiB",
                gib(fs_bytes),
                gib(dev_bytes)
            ))
        }
        Err(e) => tracing::warn!(
            "growing the data volume's filesystem: {}: it keeps its size",
            crate::exit::error_chain(&e)
        ),
    }
}

/// Unmounts the two roots and the volume (those that are mounts of the
/// volume's device); returns the host paths unmounted.
pub fn unmount(layout: &Layout) -> Result<Vec<String>, VolumeError> {
    let table = mounts();
    let Some(vol) = mount_at(&table, &layout.mountpoint) else {
        return Ok(Vec::new());
    };
    let mut gone = Vec::new();
    for at in layout.targets().into_iter().rev() {
        while mount_at(&mounts(), at).is_some_and(|m| m.dev == vol.dev) {
            nix::mount::umount2(at, nix::mount::MntFlags::empty()).map_err(mount_err("unmount", at))?;
            gone.push(at.display().to_string());
        }
    }
    let _ = table;
    Ok(gone)
}

/// Rollback of an install that set up the volume: the daemons on it are
/// stopped, then the volume unit (its `ExecStop` unmounts); whatever is
/// still mounted is unmounted here. Runs before the caller restores the
/// files (the unit's agent binary may be one of them) and before its undo
/// reloads systemd and restarts the daemons on the node's own directories.
/// Returns the problems met.
pub async fn stop_for_rollback(sd: &crate::systemd::Systemd, root: &Root, soci_root: &str) -> Vec<String> {
    use crate::paths::{CONTAINERD_SERVICE, SOCI_SERVICE, VOLUME_SERVICE};
    let mut problems = Vec::new();
    for unit in [CONTAINERD_SERVICE, SOCI_SERVICE, VOLUME_SERVICE] {
        if let Err(e) = sd.stop(unit).await {
            problems.push(format!("stopping {unit}: {}", crate::exit::error_chain(&e)));
        }
    }
    if let Err(e) = unmount(&Layout::new(root, soci_root)) {
        problems.push(crate::exit::error_chain(&e));
    }
    problems
}

/// Free space under which a failed pull is blamed on a full volume.
const FULL_BYTES: u64 = 256 << 20;

/// When the data volume is mounted and (nearly) full: a sentence saying so,
/// for reports of pulls that failed (containerd's own error may only say
/// `context canceled`).
pub fn full_hint(root: &Root) -> Option<String> {
    let mp = root.path(VOLUME_MOUNT);
    mount_at(&mounts(), &mp)?;
    let (total, _, avail) = space(&mp)?;
    (avail < FULL_BYTES).then(|| {
        format!(
            "the data volume at {VOLUME_MOUNT} is full ({} MiB free of {:.1} GiB): pulls onto it fail; grow the \
             volume (render --data-volume-size) or cache fewer images",
            avail >> 20,
            gib(total)
        )
    })
}

/// Size and free space of the filesystem at host path `at`: (total, used, available) bytes.
pub fn space(at: &Path) -> Option<(u64, u64, u64)> {
    let s = nix::sys::statvfs::statvfs(at).ok()?;
    let f = s.fragment_size();
    let total = s.blocks() * f;
    let free = s.blocks_free() * f;
    Some((total, total - free, s.blocks_available() * f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo() {
        let t = "36 35 259:1 / /var/lib/soci-agent/volume rw,noatime shared:1 - ext4 /dev/nvme1n1 rw\n\
                 37 35 259:1 /containerd /var/lib/containerd rw - ext4 /dev/nvme1n1 rw\n\
                 38 35 0:5 / /with\\040space rw - tmpfs tmpfs rw\n";
        let m = mountinfo::parse(t);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].dev, (259, 1));
        assert_eq!(m[1].fs_root, "/containerd");
        assert_eq!(m[2].mount_point, "/with space");
        let root = Root::new("/");
        let layout = Layout::new(&root, "/var/lib/soci-snapshotter-grpc");
        let dev = Device {
            given: "/dev/xvdb".into(),
            used: "/dev/nvme1n1".into(),
            note: None,
            rdev: Some((259, 1)),
        };
        check_not_mounted_elsewhere(&dev, &layout, &m).unwrap();
        let elsewhere = mountinfo::parse("40 35 259:1 / /mnt rw - ext4 /dev/nvme1n1 rw\n");
        let e = check_not_mounted_elsewhere(&dev, &layout, &elsewhere).unwrap_err();
        assert!(e.to_string().contains("mounted at /mnt"), "{e}");
    }
}
