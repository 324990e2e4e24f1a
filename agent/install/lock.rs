//! The install lock: one install (or uninstall) at a time per root, for the
//! whole run (plan, download into the store, apply, systemd). On the host it
//! is [`INSTALL_LOCK`] (the daemon's repairs share it); for another `--root`
//! (a mounted image) it is a file on the running host named after the root,
//! so the image itself is not touched. It sits in a directory only its owner
//! may enter, is a regular file of mode 0600 holding the holder's pid, and is
//! waited for with a deadline, so nobody else can hold root's install
//! forever, silently.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::paths::INSTALL_LOCK;
use crate::rootfs::Root;

/// How long install waits for another run's lock by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// Environment override of [`DEFAULT_WAIT`], in seconds.
pub const WAIT_ENV: &str = "SOCI_AGENT_LOCK_TIMEOUT";
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("install lock {path}: {action}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error(
        "install lock {path} is not a regular file ({kind}): refusing to use it; remove it (only root may create it)"
    )]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "install lock directory {path} is owned by uid {uid} or open to others (mode {mode:04o}): refusing it; \
         remove it so soci-agent creates it 0700"
    )]
    UnsafeDir { path: PathBuf, uid: u32, mode: u32 },
    #[error("install lock {path} is owned by uid {uid}, not by this user: refusing it; remove it")]
    NotOurs { path: PathBuf, uid: u32 },
    #[error(
        "install lock {path} is still held by {holder} after {}s: another soci-agent install or uninstall is running; \
         wait for it, or stop it (set {WAIT_ENV} to wait longer)",
        .waited.as_secs()
    )]
    Timeout {
        path: PathBuf,
        holder: String,
        waited: Duration,
    },
}

impl crate::exit::ExitKindOf for LockError {
    /// Nothing was changed: the run never got the node.
    fn exit_kind(&self) -> crate::exit::ExitKind {
        crate::exit::ExitKind::Failed
    }
}

/// The wait from [`WAIT_ENV`], else [`DEFAULT_WAIT`].
pub fn wait_from_env() -> Duration {
    std::env::var(WAIT_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(DEFAULT_WAIT, Duration::from_secs_f64)
}

/// Where the lock of other roots lives on the running host.
pub const ROOTS_LOCK_DIR: &str = "/run/soci-agent/roots";

/// The lock file of `root`: [`INSTALL_LOCK`] for `/`, else
/// `ROOTS_LOCK_DIR/<first 16 hex digits of the SHA-256 of the canonical root path>.lock`.
pub fn path_for(root: &Root) -> PathBuf {
    if root.is_host() {
        return root.path(INSTALL_LOCK);
    }
    use sha2::Digest;
    let canonical = std::fs::canonicalize(root.base()).unwrap_or_else(|_| root.base().to_path_buf());
    let digest = sha2::Sha256::digest(canonical.as_os_str().as_encoded_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Path::new(ROOTS_LOCK_DIR).join(format!("{hex}.lock"))
}

/// Takes the exclusive install lock of `root`, waiting at most `wait` for
/// another holder; writes this process's pid into it.
pub fn acquire(root: &Root, wait: Duration) -> Result<Flock<File>, LockError> {
    let path = path_for(root);
    let dir = path.parent().expect("the lock has a parent");
    private_dir(dir)?;
    let file = open_regular(&path)?;
    let started = Instant::now();
    let mut file = file;
    let mut told = false;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                write_pid(&mut lock, &path)?;
                return Ok(lock);
            }
            Err((f, nix::errno::Errno::EWOULDBLOCK)) => {
                file = f;
                let holder = holder(&mut file);
                if started.elapsed() >= wait {
                    return Err(LockError::Timeout {
                        path,
                        holder,
                        waited: started.elapsed(),
                    });
                }
                if !told {
                    tracing::warn!(lock = %path.display(), %holder, "waiting for the install lock");
                    told = true;
                }
                std::thread::sleep(POLL);
            }
            Err((_, errno)) => {
                return Err(LockError::Io {
                    path,
                    action: "cannot lock it",
                    source: errno.into(),
                });
            }
        }
    }
}

/// Tries the lock of `root` shared, without waiting (the daemon, around a
/// repair): `Ok(None)` while an install holds it.
pub fn try_shared(root: &Root) -> Result<Option<Flock<File>>, LockError> {
    let path = path_for(root);
    private_dir(path.parent().expect("the lock has a parent"))?;
    let file = open_regular(&path)?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(LockError::Io {
            path,
            action: "cannot lock it",
            source: errno.into(),
        }),
    }
}

/// Creates `dir` 0700, or checks an existing one is ours and closed to others.
fn private_dir(dir: &Path) -> Result<(), LockError> {
    let io = |action, source| LockError::Io {
        path: dir.to_path_buf(),
        action,
        source,
    };
    if let Some(parent) = dir.parent() {
        crate::rootfs::create_dirs(parent).map_err(|e| io("cannot create its parent", std::io::Error::other(e)))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io("cannot set its mode", e))?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io("cannot create it", e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| io("cannot inspect it", e))?;
    let mode = meta.mode() & 0o7777;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() || mode & 0o022 != 0 {
        return Err(LockError::UnsafeDir {
            path: dir.to_path_buf(),
            uid: meta.uid(),
            mode,
        });
    }
    Ok(())
}

/// Opens (creating 0600) the lock without following a link or blocking on a
/// FIFO, and refuses anything but a regular file of ours.
fn open_regular(path: &Path) -> Result<File, LockError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc_flags())
        .open(path)
        .map_err(|source| LockError::Io {
            path: path.to_path_buf(),
            action: "cannot open it",
            source,
        })?;
    let meta = file.metadata().map_err(|source| LockError::Io {
        path: path.to_path_buf(),
        action: "cannot inspect it",
        source,
    })?;
    if !meta.is_file() {
        let ft = meta.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_dir() {
            "a directory"
        } else {
            "a device"
        };
        return Err(LockError::NotRegular {
            path: path.to_path_buf(),
            kind,
        });
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(LockError::NotOurs {
            path: path.to_path_buf(),
            uid: meta.uid(),
        });
    }
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|source| LockError::Io {
            path: path.to_path_buf(),
            action: "cannot set its mode",
            source,
        })?;
    Ok(file)
}

/// `O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC`: a symlink is refused, a FIFO does not hang the open.
fn libc_flags() -> i32 {
    (nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC).bits()
}

fn write_pid(file: &mut File, path: &Path) -> Result<(), LockError> {
    let pid = std::process::id();
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{pid}"))
        .map_err(|source| LockError::Io {
            path: path.to_path_buf(),
            action: "cannot write the pid into it",
            source,
        })
}

/// "pid N" from the lock's content, or "another process".
fn holder(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.rewind().and_then(|()| file.read_to_string(&mut text));
    match text.trim().parse::<u32>() {
        Ok(pid) => format!("pid {pid}"),
        Err(_) => "another process".to_owned(),
    }
}
