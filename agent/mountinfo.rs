//! The kernel's mount table (`/proc/self/mountinfo`), read once per question:
//! which mount holds a path, what is mounted exactly at a path. A leaf: the
//! snapshot-cache wing and doctor's disk checks both ask it.

use std::path::Path;

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `(major, minor)` of the filesystem's device.
    pub dev: (u64, u64),
    /// The directory of the filesystem mounted here (`/containerd` for a bind, `/` otherwise).
    pub fs_root: String,
    pub mount_point: String,
    pub fstype: String,
    pub source: String,
}

/// Parses mountinfo text; malformed lines are skipped, octal escapes in paths decoded.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            let (major, minor) = fields.get(2)?.split_once(':')?;
            Some(Mount {
                dev: (major.parse().ok()?, minor.parse().ok()?),
                fs_root: unescape(fields.get(3)?),
                mount_point: unescape(fields.get(4)?),
                fstype: fields.get(sep + 1)?.to_string(),
                source: unescape(fields.get(sep + 2).copied().unwrap_or("")),
            })
        })
        .collect()
}

/// This process's mount table now.
pub fn read() -> std::io::Result<Vec<Mount>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The mount holding `path`: the longest mount point that contains it (the
/// last one listed when several are stacked). Prefixes are whole components:
/// `/mnt/k8s` is not inside `/mnt/k8s-disks`.
pub fn holding<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a Mount> {
    // `max_by_key` returns the last of equal maxima: the mount on top.
    mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| Path::new(&m.mount_point).components().count())
}

/// The last (topmost) mount exactly at `at`.
pub fn at<'a>(mounts: &'a [Mount], at: &Path) -> Option<&'a Mount> {
    mounts.iter().rev().find(|m| Path::new(&m.mount_point) == at)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], oct) {
            (b'\\', Some(d)) => {
                out.push(d.iter().fold(0u8, |acc, c| acc.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 259:1 / / rw,relatime shared:1 - xfs /dev/nvme0n1p1 rw
30 22 9:127 / /mnt/k8s-disks/0 rw shared:5 - xfs /dev/md127 rw
31 22 9:127 /soci /var/lib/soci-snapshotter-grpc rw shared:5 - xfs /dev/md127 rw
32 22 0:44 / /mnt/with\\040space rw - tmpfs tmpfs rw
33 22 259:2 / /stacked rw - ext4 /dev/a rw
34 22 259:3 / /stacked rw - ext4 /dev/b rw
";

    #[test]
    fn binds_escapes_and_stacks() {
        let mounts = parse(MOUNTINFO);
        assert_eq!(mounts.len(), 6);
        assert_eq!(mounts[3].mount_point, "/mnt/with space");
        let m = holding(&mounts, Path::new("/var/lib/soci-snapshotter-grpc/snapshotter")).unwrap();
        assert_eq!((m.dev, m.fs_root.as_str()), ((9, 127), "/soci"));
        assert_eq!(
            holding(&mounts, Path::new("/var/lib/other")).unwrap().source,
            "/dev/nvme0n1p1"
        );
        assert_eq!(holding(&mounts, Path::new("/mnt/k8s")).unwrap().mount_point, "/");
        assert_eq!(at(&mounts, Path::new("/stacked")).unwrap().source, "/dev/b");
        assert_eq!(holding(&mounts, Path::new("/stacked/x")).unwrap().source, "/dev/b");
        assert!(at(&mounts, Path::new("/var/lib")).is_none());
    }

    #[test]
    fn malformed_lines_are_skipped() {
        assert!(parse("garbage\n1 2 x:y / / rw - ext4 /dev/a rw\n").is_empty());
    }
}
