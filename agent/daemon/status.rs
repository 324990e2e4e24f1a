//! The status socket (`/run/soci-agent/daemon.sock`, mode 0600): a client
//! connects and reads one JSON object (the daemon's live state, see
//! `state::Live`) followed by a newline; the daemon then closes the
//! connection. Nothing is read from the client. Only root (or the daemon's
//! own user) is answered, checked with `SO_PEERCRED` on top of the mode.
//!
//! `soci-agent daemon --query` is the reader: it prints that object.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use super::state::{Shared, lock};

const WRITE_BOUND: Duration = Duration::from_secs(5);
const QUERY_BOUND: Duration = Duration::from_secs(10);
/// Answers in flight at once; more connections wait in the backlog.
const MAX_CLIENTS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another soci-agent daemon answers on {0}")]
    InUse(PathBuf),
    #[error("cannot create {path}")]
    Create { path: PathBuf, source: std::io::Error },
    #[error("cannot listen on {path}")]
    Bind { path: PathBuf, source: std::io::Error },
}

/// Creates the parent directory (0700 when new), removes a stale socket,
/// binds and sets mode 0600. Refuses when another daemon answers there.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
    let create = |source| SocketError::Create {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(create)?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(SocketError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(create)?;
    }
    let listener = UnixListener::bind(path).map_err(|source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(create)?;
    Ok(listener)
}

/// Is this peer allowed to read the state: root, or the daemon's own user.
pub fn peer_allowed(stream: &UnixStream) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    stream.peer_cred().is_ok_and(|c| c.uid() == 0 || c.uid() == me)
}

/// Answers clients until the task is aborted.
pub async fn serve(listener: UnixListener, shared: Shared) {
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "status socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !peer_allowed(&stream) {
            tracing::warn!("status socket: refused a client that is neither root nor the daemon's user");
            continue;
        }
        let mut body = lock(&shared).to_json();
        body.push('\n');
        tokio::spawn(async move {
            let _permit = permit;
            let _ = tokio::time::timeout(WRITE_BOUND, async {
                stream.write_all(body.as_bytes()).await?;
                stream.shutdown().await
            })
            .await;
        });
    }
}

/// Why the daemon's state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("cannot connect to {} (is soci-agent daemon running?)", .path.display())]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("cannot read the daemon's state from {}", .path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}: no answer within {QUERY_BOUND:?}", .path.display())]
    Timeout { path: PathBuf },
}

/// Reads the state from a running daemon's socket.
pub async fn query(path: &Path) -> Result<String, QueryError> {
    let read = async {
        let mut s = UnixStream::connect(path).await.map_err(|source| QueryError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let mut text = String::new();
        s.read_to_string(&mut text).await.map_err(|source| QueryError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(text)
    };
    tokio::time::timeout(QUERY_BOUND, read)
        .await
        .map_err(|_| QueryError::Timeout {
            path: path.to_path_buf(),
        })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::state::Live;

    #[tokio::test]
    async fn answers_one_json_object_and_refuses_a_second_daemon() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("run/soci-agent/daemon.sock");
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        let shown = crate::daemon::config::load(
            &crate::rootfs::Root::new(d.path()),
            &crate::daemon::config::Overrides::default(),
        )
        .unwrap()
        .shown();
        let shared: Shared = std::sync::Arc::new(std::sync::Mutex::new(Live::new(shown, 6, false)));
        let server = tokio::spawn(serve(listener, shared.clone()));
        let text = query(&path).await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["pid"], std::process::id());
        assert_eq!(v["reconciles"], 0);
        assert!(matches!(bind(&path), Err(SocketError::InUse(_))));
        server.abort();
        let _ = server.await;
        // A stale socket (nobody listening) is replaced.
        bind(&path).unwrap();
    }
}
