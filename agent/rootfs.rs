//! The node's filesystem as seen under `--root`: path resolution, reads that
//! tell "absent" from "unreadable", and the one atomic-write helper every
//! change goes through (temp file in the same directory, fsync, rename, fsync
//! the directory; symlinks swapped by renaming a new link over the old one).

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot create directory {path}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot rename {from} to {to}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        source: io::Error,
    },
    #[error("cannot create symlink {path} -> {target}")]
    Symlink {
        path: PathBuf,
        target: PathBuf,
        source: io::Error,
    },
    #[error("cannot remove {path}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("{path} is not an absolute node path")]
    NotAbsolute { path: String },
}

/// Marker in the names of temporary files, so a crashed run's leftovers can
/// be recognised (they never sit at a final path).
pub const TMP_MARKER: &str = ".soci-agent-tmp";

/// Symlinks followed at most while resolving one path (Linux's own limit).
const MAX_LINKS: usize = 40;
/// Where a path that cannot be resolved inside the root (a symlink loop) goes.
const UNRESOLVABLE: &str = ".soci-agent-unresolvable-path";

/// The components of an absolute node path, `..` applied lexically (never
/// above the root), `.` dropped.
fn lexical_parts(path: &Path) -> Vec<OsString> {
    let mut out: Vec<OsString> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(p) => out.push(p.to_os_string()),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// The components of a symlink's target, `..` kept (it applies to what was
/// resolved before it), `.` and the root dropped.
fn link_parts(target: &Path) -> Vec<OsString> {
    target
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// The root every node path is resolved under (`--root`, default `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    base: PathBuf,
}

impl Root {
    pub fn new(base: impl Into<PathBuf>) -> Self {
        Root { base: base.into() }
    }
    pub fn base(&self) -> &Path {
        &self.base
    }
    /// True when the root is the running host's `/`.
    pub fn is_host(&self) -> bool {
        self.base == Path::new("/")
    }
    /// Resolves an absolute node path (`/etc/x`) under the root, as a
    /// process chrooted there would see it: every directory on the way that
    /// is a symlink is followed INSIDE the root (an absolute target is
    /// re-rooted, `..` stops at the root), so no write, rename or delete
    /// through the result leaves the root. The last component is not
    /// followed (writes replace it, symlink swaps rename over it); use
    /// [`Root::resolve`] to read through it. On `/` this is the path itself.
    pub fn path(&self, node_path: impl AsRef<Path>) -> PathBuf {
        self.resolve_in_root(node_path.as_ref(), false)
    }
    /// Like [`Root::path`], following a symlink at the last component too
    /// (inside the root): the file a read under the root means.
    pub fn resolve(&self, node_path: impl AsRef<Path>) -> PathBuf {
        self.resolve_in_root(node_path.as_ref(), true)
    }
    fn resolve_in_root(&self, node_path: &Path, follow_last: bool) -> PathBuf {
        let mut queue: VecDeque<OsString> = lexical_parts(node_path).into();
        if self.is_host() {
            return self.join(&queue.into_iter().collect::<Vec<_>>());
        }
        let mut done: Vec<OsString> = Vec::new();
        let mut hops = 0;
        while let Some(part) = queue.pop_front() {
            if part == ".." {
                done.pop();
                continue;
            }
            let here = self.join(&done).join(&part);
            let is_link = fs::symlink_metadata(&here).is_ok_and(|m| m.file_type().is_symlink());
            if !is_link || (queue.is_empty() && !follow_last) {
                done.push(part);
                continue;
            }
            hops += 1;
            let Some(target) = fs::read_link(&here).ok().filter(|_| hops <= MAX_LINKS) else {
                // A loop (or an unreadable link): a path inside the root that
                // does not exist, never the link the OS would follow outward.
                return self.base.join(UNRESOLVABLE);
            };
            if target.is_absolute() {
                done.clear();
            }
            for (i, c) in link_parts(&target).into_iter().enumerate() {
                queue.insert(i, c);
            }
        }
        self.join(&done)
    }
    fn join(&self, parts: &[OsString]) -> PathBuf {
        let mut out = self.base.clone();
        out.extend(parts);
        out
    }
    pub fn exists(&self, node_path: impl AsRef<Path>) -> bool {
        fs::symlink_metadata(self.path(node_path)).is_ok()
    }
    /// Reads a file; `Ok(None)` when it does not exist.
    pub fn read_opt(&self, node_path: impl AsRef<Path>) -> Result<Option<Vec<u8>>, FsError> {
        read_opt(&self.resolve(node_path))
    }
    /// Reads a UTF-8 file; `Ok(None)` when it does not exist.
    pub fn read_string_opt(&self, node_path: impl AsRef<Path>) -> Result<Option<String>, FsError> {
        let path = self.resolve(node_path);
        match read_opt(&path)? {
            None => Ok(None),
            Some(b) => String::from_utf8(b).map(Some).map_err(|e| FsError::Read {
                path,
                source: io::Error::new(io::ErrorKind::InvalidData, e),
            }),
        }
    }
}

pub fn read_opt(path: &Path) -> Result<Option<Vec<u8>>, FsError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(FsError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Creates `dir` and its missing parents, each with mode 0755 set
/// explicitly (never from the umask); existing directories are left as they are.
pub fn create_dirs(dir: &Path) -> Result<(), FsError> {
    let err = |source| FsError::CreateDir {
        path: dir.to_path_buf(),
        source,
    };
    if dir.is_dir() {
        return Ok(());
    }
    let mut missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    missing.reverse();
    for d in missing {
        match fs::DirBuilder::new().mode(0o755).create(d) {
            Ok(()) => fs::set_permissions(d, fs::Permissions::from_mode(0o755)).map_err(err)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(err(e)),
        }
    }
    Ok(())
}

fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}{TMP_MARKER}-{}", std::process::id()))
}

/// fsyncs a directory so a rename in it is durable.
pub fn fsync_dir(dir: &Path) -> Result<(), FsError> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|source| FsError::Write {
            path: dir.to_path_buf(),
            source,
        })
}

fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Writes `bytes` to `path` atomically with `mode`: a temp file in the same
/// directory, fsync, chmod, rename over the target, fsync the directory.
/// Readers see the old or the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FsError> {
    write_atomic_with(path, mode, |f| f.write_all(bytes))
}

/// Streams `src` into `dst` atomically with `mode` (constant memory; for
/// binaries).
pub fn copy_file_atomic(src: &Path, dst: &Path, mode: u32) -> Result<(), FsError> {
    write_atomic_with(dst, mode, |f| io::copy(&mut fs::File::open(src)?, f).map(drop))
}

/// Gives the new file the owner and group of the file it replaces (a config
/// owned by another account stays theirs); nothing to do for a new file.
fn keep_owner(new: &fs::File, replaced: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    match fs::metadata(replaced) {
        Ok(old) if old.is_file() => {
            let now = new.metadata()?;
            if (now.uid(), now.gid()) == (old.uid(), old.gid()) {
                return Ok(());
            }
            std::os::unix::fs::fchown(new, Some(old.uid()), Some(old.gid()))
        }
        _ => Ok(()),
    }
}

/// The one atomic-write path: `fill` writes the temp file's content.
fn write_atomic_with(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut fs::File) -> io::Result<()>,
) -> Result<(), FsError> {
    let dir = parent_of(path);
    create_dirs(dir)?;
    let tmp = tmp_sibling(path);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        fill(&mut f)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        keep_owner(&f, path)?;
        f.sync_all()
    })();
    if let Err(source) = result {
        let _ = fs::remove_file(&tmp);
        return Err(FsError::Write {
            path: path.to_path_buf(),
            source,
        });
    }
    rename(&tmp, path)?;
    fsync_dir(dir)
}

/// Copies `src` to `dst` atomically, keeping its mode and modification
/// time (backups, and restores from them, are indistinguishable from the
/// original).
pub fn copy_atomic(src: &Path, dst: &Path) -> Result<(), FsError> {
    let meta = fs::metadata(src).map_err(|source| FsError::Read {
        path: src.to_path_buf(),
        source,
    })?;
    copy_file_atomic(src, dst, meta.permissions().mode() & 0o7777)?;
    if let Ok(mtime) = meta.modified() {
        fs::File::options()
            .write(true)
            .open(dst)
            .and_then(|f| f.set_modified(mtime))
            .map_err(|source| FsError::Write {
                path: dst.to_path_buf(),
                source,
            })?;
    }
    Ok(())
}

/// Renames, removing `from` when the rename fails.
pub fn rename(from: &Path, to: &Path) -> Result<(), FsError> {
    fs::rename(from, to).map_err(|source| {
        let _ = fs::remove_file(from);
        FsError::Rename {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            source,
        }
    })
}

/// Points `link` at `target` atomically: a new link beside it renamed over it.
pub fn symlink_atomic(target: &Path, link: &Path) -> Result<(), FsError> {
    let dir = parent_of(link);
    create_dirs(dir)?;
    let tmp = tmp_sibling(link);
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).map_err(|source| FsError::Symlink {
        path: link.to_path_buf(),
        target: target.to_path_buf(),
        source,
    })?;
    rename(&tmp, link)?;
    fsync_dir(dir)
}

/// Removes a file or symlink; absent is fine.
pub fn remove_file(path: &Path) -> Result<(), FsError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(FsError::Remove {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Current state of a path, enough to restore it exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Snapshot {
    Absent,
    File {
        bytes: Vec<u8>,
        mode: u32,
        mtime: Option<std::time::SystemTime>,
    },
    Symlink {
        target: PathBuf,
    },
}

impl Snapshot {
    pub fn take(path: &Path) -> Result<Snapshot, FsError> {
        let read_err = |source| FsError::Read {
            path: path.to_path_buf(),
            source,
        };
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Snapshot::Absent),
            Err(e) => Err(read_err(e)),
            Ok(m) if m.file_type().is_symlink() => Ok(Snapshot::Symlink {
                target: fs::read_link(path).map_err(read_err)?,
            }),
            Ok(m) => Ok(Snapshot::File {
                bytes: fs::read(path).map_err(read_err)?,
                mode: m.permissions().mode() & 0o7777,
                mtime: m.modified().ok(),
            }),
        }
    }
    /// Puts the path back the way it was.
    pub fn restore(&self, path: &Path) -> Result<(), FsError> {
        match self {
            Snapshot::Absent => remove_file(path),
            Snapshot::File { bytes, mode, mtime } => {
                write_atomic(path, bytes, *mode)?;
                if let Some(t) = mtime {
                    let _ = fs::File::options()
                        .write(true)
                        .open(path)
                        .and_then(|f| f.set_modified(*t));
                }
                Ok(())
            }
            Snapshot::Symlink { target } => symlink_atomic(target, path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_under_the_root() {
        let r = Root::new("/mnt/img");
        assert_eq!(
            r.path("/etc/containerd/config.toml"),
            PathBuf::from("/mnt/img/etc/containerd/config.toml")
        );
        assert_eq!(r.path("/../../etc/passwd"), PathBuf::from("/mnt/img/etc/passwd"));
        assert_eq!(Root::new("/").path("/etc/x"), PathBuf::from("/etc/x"));
    }

    /// Symlinked directories resolve inside the root, whatever they point at.
    #[test]
    fn symlinks_resolve_inside_the_root() {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().join("root");
        let r = Root::new(&base);
        std::fs::create_dir_all(base.join("etc")).unwrap();
        std::fs::create_dir_all(base.join("real")).unwrap();
        let link = |target: &str, at: &str| std::os::unix::fs::symlink(target, base.join(at)).unwrap();
        link("/x/outside", "etc/abs");
        link("../../../outside", "etc/rel");
        link("../real", "etc/inside");
        link("loop", "etc/loop");
        link("/etc/abs/file", "etc/last");
        assert_eq!(r.path("/etc/abs/config.toml"), base.join("x/outside/config.toml"));
        assert_eq!(r.path("/etc/rel/config.toml"), base.join("outside/config.toml"));
        assert_eq!(r.path("/etc/inside/a/b"), base.join("real/a/b"));
        assert_eq!(r.path("/etc/loop/x"), base.join(UNRESOLVABLE));
        // The last component is the link itself for writes, its target for reads.
        assert_eq!(r.path("/etc/last"), base.join("etc/last"));
        assert_eq!(r.resolve("/etc/last"), base.join("x/outside/file"));
        for p in ["/etc/abs/c", "/etc/rel/c", "/etc/last", "/etc/loop/x"] {
            assert!(r.resolve(p).starts_with(&base), "{p} -> {}", r.resolve(p).display());
        }
    }

    #[test]
    fn atomic_write_replaces_and_sets_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/b/c.conf");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o644);
        let leftovers: Vec<_> = fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp file left behind");
    }

    #[test]
    fn symlink_swap_and_snapshot_restore() {
        let d = tempfile::tempdir().unwrap();
        let link = d.path().join("bin/soci");
        symlink_atomic(Path::new("/a"), &link).unwrap();
        let snap = Snapshot::take(&link).unwrap();
        symlink_atomic(Path::new("/b"), &link).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), PathBuf::from("/b"));
        snap.restore(&link).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), PathBuf::from("/a"));
        let f = d.path().join("f");
        let absent = Snapshot::take(&f).unwrap();
        write_atomic(&f, b"x", 0o644).unwrap();
        absent.restore(&f).unwrap();
        assert!(!f.exists());
    }
}
