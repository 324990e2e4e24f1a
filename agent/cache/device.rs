//! The data volume's device: finding it (a path, a `/dev/disk/by-*` link, or
//! an EBS name such as `/dev/xvdb` that a Nitro instance shows as
//! `/dev/nvme1n1`), reading what it holds (superblock magic, no udev or blkid
//! needed), and formatting a blank one. Every path resolves under the root.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::paths::VOLUME_LABEL;
use crate::rootfs::Root;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("data volume {device}: {reason}")]
    Device { device: String, reason: String },
    #[error("data volume {device}: cannot read it")]
    Read { device: String, source: std::io::Error },
    #[error(
        "data volume {device} has no filesystem (blank): add --format-data-volume to make an ext4 filesystem on it"
    )]
    Blank { device: String },
    #[error(
        "data volume {device} holds {what}, not an ext4 or xfs filesystem: soci-agent never formats a device that holds something"
    )]
    Foreign { device: String, what: String },
    #[error(
        "data volume {device} is mounted at {mountpoint}: unmount it first (it must be mounted only by soci-agent)"
    )]
    MountedElsewhere { device: String, mountpoint: String },
    #[error("data volume {device} is read-only: attach it read-write")]
    ReadOnly { device: String },
    #[error("formatting data volume {device} with {program} failed: {message}")]
    Format {
        device: String,
        program: String,
        message: String,
    },
    #[error("cannot {what} {path}")]
    Mount {
        what: &'static str,
        path: String,
        source: nix::Error,
    },
    #[error("cannot create {path} on the data volume")]
    Dir { path: String, source: std::io::Error },
}

impl crate::exit::ExitKindOf for VolumeError {
    /// The operator's input is wrong (exit 2), as opposed to a failure doing it (exit 1).
    fn exit_kind(&self) -> crate::exit::ExitKind {
        use crate::exit::ExitKind;
        match self {
            VolumeError::Device { .. }
            | VolumeError::Blank { .. }
            | VolumeError::Foreign { .. }
            | VolumeError::MountedElsewhere { .. }
            | VolumeError::ReadOnly { .. } => ExitKind::Usage,
            VolumeError::Read { .. }
            | VolumeError::Format { .. }
            | VolumeError::Mount { .. }
            | VolumeError::Dir { .. } => ExitKind::Failed,
        }
    }
}

/// What a device holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Content {
    /// Zeros where any filesystem or partition table would start.
    Blank,
    /// A filesystem soci-agent mounts.
    Filesystem { fs: String, label: String, uuid: String },
    /// Anything else (named when known).
    Other { what: String },
}

/// Bytes read from the start of a device to tell what it holds.
const PROBE_BYTES: usize = 1 << 20;

/// Reads what `bytes` (a device's first bytes) hold.
pub fn identify(bytes: &[u8]) -> Content {
    let at = |off: usize, magic: &[u8]| bytes.get(off..off + magic.len()) == Some(magic);
    if at(1080, &[0x53, 0xEF]) {
        let sb = &bytes[1024..];
        let compat = u32::from_le_bytes(sb[92..96].try_into().unwrap_or_default());
        let incompat = u32::from_le_bytes(sb[96..100].try_into().unwrap_or_default());
        // A journal (compat 0x4) makes ext3; extents (incompat 0x40) or 64bit (0x80) ext4.
        let fs = if incompat & 0xC0 != 0 {
            "ext4"
        } else if compat & 0x4 != 0 {
            "ext3"
        } else {
            "ext2"
        };
        return Content::Filesystem {
            fs: fs.into(),
            label: c_string(&sb[120..136]),
            uuid: uuid(&sb[104..120]),
        };
    }
    if at(0, b"XFSB") {
        return Content::Filesystem {
            fs: "xfs".into(),
            label: c_string(&bytes[108..120]),
            uuid: uuid(&bytes[32..48]),
        };
    }
    let known: [(usize, &[u8], &str); 7] = [
        (0, b"LUKS\xba\xbe", "a LUKS encrypted volume"),
        (0x10040, b"_BHRfS_M", "a btrfs filesystem"),
        (4086, b"SWAPSPACE2", "swap space"),
        (512, b"EFI PART", "a GPT partition table"),
        (0, b"hsqs", "a squashfs filesystem"),
        (32769, b"CD001", "an ISO 9660 filesystem"),
        (3, b"NTFS    ", "an NTFS filesystem"),
    ];
    if let Some((_, _, what)) = known.iter().find(|(off, magic, _)| at(*off, magic)) {
        return Content::Other { what: what.to_string() };
    }
    if at(510, &[0x55, 0xAA]) {
        return Content::Other {
            what: "an MBR partition table or boot sector".into(),
        };
    }
    if bytes.iter().all(|b| *b == 0) {
        Content::Blank
    } else {
        Content::Other {
            what: "data of an unknown kind".into(),
        }
    }
}

/// Size in bytes of the ext2/3/4 or xfs filesystem whose first bytes are `bytes`.
pub fn filesystem_size(bytes: &[u8]) -> Option<u64> {
    let le32 = |o: usize| Some(u32::from_le_bytes(bytes.get(o..o + 4)?.try_into().ok()?));
    let be32 = |o: usize| Some(u32::from_be_bytes(bytes.get(o..o + 4)?.try_into().ok()?));
    let be64 = |o: usize| Some(u64::from_be_bytes(bytes.get(o..o + 8)?.try_into().ok()?));
    match identify(bytes) {
        Content::Filesystem { fs, .. } if fs == "xfs" => Some(be64(8)? * u64::from(be32(4)?)),
        Content::Filesystem { .. } => {
            let sb = 1024;
            let lo = u64::from(le32(sb + 4)?);
            // 64bit feature (incompat 0x80): the high half of the block count.
            let hi = if le32(sb + 96)? & 0x80 != 0 {
                u64::from(le32(sb + 0x150)?)
            } else {
                0
            };
            let block = 1024u64 << le32(sb + 24)?;
            Some(((hi << 32) | lo) * block)
        }
        _ => None,
    }
}

fn c_string(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).trim().to_string()
}

fn uuid(b: &[u8]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A device found for the operator's `--data-volume`.
#[derive(Debug, Clone, Serialize)]
pub struct Device {
    /// As given.
    pub given: String,
    /// The node path used (links followed).
    pub used: String,
    /// How `given` became `used`, when it is not the same path.
    pub note: Option<String>,
    /// `MAJOR:MINOR` of a block device (`None` for an image file under a test root).
    #[serde(skip)]
    pub rdev: Option<(u64, u64)>,
}

/// Finds the device named `given` under `root`: the path itself (links
/// followed), else on Nitro instances the NVMe namespace whose EBS device
/// name is `given` (what AL2023's udev rules link as `/dev/xvdb`). A regular
/// file stands in for a device only under a root that is not this host
/// (tests, image builds).
pub fn find_device(root: &Root, given: &str) -> Result<Device, VolumeError> {
    let bad = |reason: String| VolumeError::Device {
        device: given.to_string(),
        reason,
    };
    if !given.starts_with('/') {
        return Err(bad(
            "must be an absolute path (e.g. /dev/xvdb or /dev/disk/by-id/...)".into()
        ));
    }
    let host_path = root.path(given);
    if let Ok(real) = std::fs::canonicalize(&host_path) {
        let meta = std::fs::metadata(&real).map_err(|source| VolumeError::Read {
            device: given.to_string(),
            source,
        })?;
        let used = node_path(root, &real);
        let note = (used != given).then(|| format!("{given} is {used}"));
        if meta.file_type().is_block_device() {
            let rdev = meta.rdev();
            return Ok(Device {
                given: given.to_string(),
                used,
                note,
                rdev: Some((nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev))),
            });
        }
        if meta.is_file() && !root.is_host() {
            return Ok(Device {
                given: given.to_string(),
                used,
                note,
                rdev: None,
            });
        }
        return Err(bad(format!("{used} is not a block device")));
    }
    if let Some(found) = ebs_nvme::find(root, given) {
        return Ok(Device {
            given: given.to_string(),
            note: Some(format!(
                "{given} is not present; used {found}, the NVMe namespace whose EBS device name is {given}"
            )),
            used: found.clone(),
            rdev: std::fs::metadata(root.path(&found)).ok().map(|m| {
                let r = m.rdev();
                (nix::sys::stat::major(r), nix::sys::stat::minor(r))
            }),
        });
    }
    Err(bad(
        "no such device (on Nitro instances EBS volumes appear as /dev/nvme*n1; check lsblk and the block device mapping)"
            .into(),
    ))
}

/// Waits up to `bound` for [`find_device`] (an EBS volume can show up after
/// boot starts); the last error when it never does.
pub fn wait_for_device(root: &Root, given: &str, bound: Duration) -> Result<Device, VolumeError> {
    let deadline = Instant::now() + bound;
    loop {
        match find_device(root, given) {
            Ok(d) => return Ok(d),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// `host` as a node path under `root`.
fn node_path(root: &Root, host: &Path) -> String {
    match host.strip_prefix(root.base()) {
        Ok(rel) => format!("/{}", rel.display()),
        Err(_) => host.display().to_string(),
    }
}

/// Reads what the device holds.
pub fn probe(root: &Root, dev: &Device) -> Result<Content, VolumeError> {
    let read_err = |source| VolumeError::Read {
        device: dev.used.clone(),
        source,
    };
    let mut f = File::open(root.path(&dev.used)).map_err(read_err)?;
    let mut buf = Vec::with_capacity(PROBE_BYTES);
    (&mut f)
        .take(PROBE_BYTES as u64)
        .read_to_end(&mut buf)
        .map_err(read_err)?;
    let content = identify(&buf);
    if content != Content::Blank {
        return Ok(content);
    }
    // A backup GPT header sits in the last sector: blank means blank at both ends.
    let len = f.seek(SeekFrom::End(0)).map_err(read_err)?;
    if len > PROBE_BYTES as u64 {
        let tail = (len - 65536).max(PROBE_BYTES as u64);
        f.seek(SeekFrom::Start(tail)).map_err(read_err)?;
        let mut end = Vec::new();
        f.read_to_end(&mut end).map_err(read_err)?;
        if end.iter().any(|b| *b != 0) {
            return Ok(Content::Other {
                what: "data near its end (a backup partition table?)".into(),
            });
        }
    }
    Ok(Content::Blank)
}

/// Refuses a read-only block device (sysfs `ro`).
pub fn check_writable(dev: &Device) -> Result<(), VolumeError> {
    if let Some((ma, mi)) = dev.rdev
        && std::fs::read_to_string(format!("/sys/dev/block/{ma}:{mi}/ro")).is_ok_and(|s| s.trim() == "1")
    {
        return Err(VolumeError::ReadOnly {
            device: dev.used.clone(),
        });
    }
    Ok(())
}

/// Makes an ext4 filesystem labelled [`VOLUME_LABEL`] on a blank device,
/// with the host's `mkfs.ext4` (e2fsprogs).
pub fn format(root: &Root, dev: &Device) -> Result<(), VolumeError> {
    let program = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4", "/usr/bin/mkfs.ext4"]
        .into_iter()
        .find(|p| Path::new(p).is_file())
        .ok_or_else(|| VolumeError::Format {
            device: dev.used.clone(),
            program: "mkfs.ext4".into(),
            message: "not found (install e2fsprogs)".into(),
        })?;
    // Checked again right before: the device must still be blank.
    match probe(root, dev)? {
        Content::Blank => {}
        Content::Filesystem { fs, .. } => {
            return Err(VolumeError::Foreign {
                device: dev.used.clone(),
                what: format!("an {fs} filesystem now"),
            });
        }
        Content::Other { what } => {
            return Err(VolumeError::Foreign {
                device: dev.used.clone(),
                what,
            });
        }
    }
    let out = std::process::Command::new(program)
        .args(["-q", "-F", "-L", VOLUME_LABEL, "-m", "0"])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1"])
        .arg(root.path(&dev.used))
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| VolumeError::Format {
            device: dev.used.clone(),
            program: program.into(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(VolumeError::Format {
            device: dev.used.clone(),
            program: program.into(),
            message: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(())
}

/// The EBS volume id of a block device, from its NVMe serial (`vol0abc...`
/// -> `vol-0abc...`), when it is one.
pub fn ebs_volume_id(rdev: (u64, u64)) -> Option<String> {
    let base = format!("/sys/dev/block/{}:{}", rdev.0, rdev.1);
    let serial = std::fs::read_to_string(format!("{base}/device/serial"))
        .or_else(|_| std::fs::read_to_string(format!("{base}/../device/serial")))
        .ok()?;
    let s = serial.trim();
    s.strip_prefix("vol")
        .map(|rest| format!("vol-{}", rest.trim_start_matches('-')))
}

/// EBS device names of NVMe namespaces (the Identify Controller vendor
/// area, as AL2023's `ebsnvme-id` reads it).
mod ebs_nvme {
    use super::Root;

    #[repr(C)]
    #[derive(Default)]
    struct AdminCmd {
        opcode: u8,
        flags: u8,
        rsvd1: u16,
        nsid: u32,
        cdw2: u32,
        cdw3: u32,
        metadata: u64,
        addr: u64,
        metadata_len: u32,
        data_len: u32,
        cdw10: u32,
        cdw11: u32,
        cdw12: u32,
        cdw13: u32,
        cdw14: u32,
        cdw15: u32,
        timeout_ms: u32,
        result: u32,
    }

    nix::ioctl_readwrite!(nvme_admin, b'N', 0x41, AdminCmd);

    /// `(model, EBS device name)` of the NVMe device at host path `dev`.
    fn identify(dev: &std::path::Path) -> Option<(String, String)> {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(dev).ok()?;
        let mut buf = vec![0u8; 4096];
        let mut cmd = AdminCmd {
            opcode: 0x06,
            addr: buf.as_mut_ptr() as u64,
            data_len: 4096,
            cdw10: 1,
            ..AdminCmd::default()
        };
        // SAFETY: `cmd` points at a live 4096-byte buffer, the size the command declares.
        unsafe { nvme_admin(f.as_raw_fd(), &mut cmd) }.ok()?;
        let text = |b: &[u8]| {
            String::from_utf8_lossy(b)
                .trim_matches(|c: char| c == '\0' || c == ' ')
                .to_string()
        };
        Some((text(&buf[24..64]), text(&buf[3072..3104])))
    }

    /// `/dev/xvdb` and `xvdb`, `sdb` and `/dev/sdb` name the same EBS attachment.
    fn same_name(a: &str, b: &str) -> bool {
        let norm = |s: &str| {
            let s = s.trim_start_matches("/dev/");
            s.strip_prefix("xvd")
                .or_else(|| s.strip_prefix("sd"))
                .unwrap_or(s)
                .to_string()
        };
        norm(a) == norm(b)
    }

    /// The `/dev/nvmeXnY` whose EBS device name is `given`.
    pub(super) fn find(root: &Root, given: &str) -> Option<String> {
        if !root.is_host() {
            return None;
        }
        let mut names: Vec<String> = std::fs::read_dir("/sys/block")
            .ok()?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("nvme"))
            .collect();
        names.sort();
        names.into_iter().map(|n| format!("/dev/{n}")).find(|dev| {
            identify(std::path::Path::new(dev))
                .is_some_and(|(model, name)| model.starts_with("Amazon Elastic Block Store") && same_name(&name, given))
        })
    }

    #[cfg(test)]
    #[test]
    fn names() {
        assert_eq!(std::mem::size_of::<AdminCmd>(), 72);
        assert!(same_name("/dev/xvdb", "sdb") && same_name("xvdb", "/dev/xvdb") && !same_name("xvdb", "xvdc"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifies_what_a_device_holds() {
        let mut b = vec![0u8; 1 << 16];
        assert_eq!(identify(&b), Content::Blank);
        b[1080] = 0x53;
        b[1081] = 0xEF;
        b[1024 + 96] = 0x40;
        b[1024 + 120..1024 + 130].copy_from_slice(b"soci-cache");
        match identify(&b) {
            Content::Filesystem { fs, label, .. } => assert_eq!((fs.as_str(), label.as_str()), ("ext4", "soci-cache")),
            other => panic!("{other:?}"),
        }
        let mut x = vec![0u8; 4096];
        x[..4].copy_from_slice(b"XFSB");
        assert!(matches!(identify(&x), Content::Filesystem { fs, .. } if fs == "xfs"));
        let mut m = vec![0u8; 4096];
        m[510] = 0x55;
        m[511] = 0xAA;
        assert!(matches!(identify(&m), Content::Other { what } if what.contains("MBR")));
        let mut r = vec![0u8; 4096];
        r[7] = 1;
        assert!(matches!(identify(&r), Content::Other { what } if what.contains("unknown")));
    }

    #[test]
    fn blank_files_are_blank_and_formatted_ones_are_ext4() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("dev")).unwrap();
        let img = dir.path().join("dev/xvdb");
        let f = File::create(&img).unwrap();
        f.set_len(64 << 20).unwrap();
        let root = Root::new(dir.path());
        let dev = find_device(&root, "/dev/xvdb").unwrap();
        assert_eq!(probe(&root, &dev).unwrap(), Content::Blank);
        assert!(
            find_device(&root, "/dev/xvdc")
                .unwrap_err()
                .to_string()
                .contains("no such device")
        );
        if Path::new("/usr/sbin/mkfs.ext4").exists() || Path::new("/sbin/mkfs.ext4").exists() {
            format(&root, &dev).unwrap();
            assert!(
                matches!(probe(&root, &dev).unwrap(), Content::Filesystem { fs, label, .. } if fs == "ext4" && label == VOLUME_LABEL)
            );
            let head = std::fs::read(&img).unwrap();
            assert_eq!(filesystem_size(&head[..65536]), Some(64 << 20));
            let again = format(&root, &dev).unwrap_err();
            assert!(again.to_string().contains("never formats"), "{again}");
        }
    }
}
