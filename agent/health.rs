//! Live checks of the wiring: the snapshotter socket accepts connections, and
//! containerd answers and lists the `soci` proxy snapshotter as loaded. Every
//! wait is bounded; the error says what was last seen.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub mod probe;

use probe::{ProbeError, Reach};

pub const SNAPSHOTTER_PLUGIN_TYPE: &str = "io.containerd.snapshotter.v1";
const POLL: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("{socket} did not accept a connection within {waited:?} (last error: {last})")]
    SocketDown {
        socket: PathBuf,
        waited: Duration,
        last: String,
    },
    #[error("containerd at {socket} did not list the soci snapshotter as loaded within {waited:?} (last seen: {last})")]
    SnapshotterNotLoaded {
        socket: PathBuf,
        waited: Duration,
        last: String,
    },
}

/// Waits until a unix socket accepts a connection.
pub async fn wait_for_socket(socket: &Path, bound: Duration) -> Result<Duration, HealthError> {
    let started = Instant::now();
    loop {
        let last = match tokio::net::UnixStream::connect(socket).await {
            Ok(_) => return Ok(started.elapsed()),
            Err(e) => e.to_string(),
        };
        if started.elapsed() >= bound {
            return Err(HealthError::SocketDown {
                socket: socket.to_path_buf(),
                waited: bound,
                last,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// What containerd says about the `soci` snapshotter plugin.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotterStatus {
    pub containerd_version: String,
    /// containerd lists `soci` and a call through it (or, with no soci
    /// snapshot yet, to the daemon's socket) answered.
    pub loaded: bool,
    /// Why not, when not.
    pub init_error: Option<String>,
}

/// One look: containerd's Version and Introspection, then a call that really
/// reaches the snapshotter (see `probe`).
pub async fn query_snapshotter(containerd_socket: &Path, soci_socket: &Path) -> Result<SnapshotterStatus, ProbeError> {
    let (version, reach) = probe::probe(containerd_socket, soci_socket, true).await?;
    let why = match reach {
        Reach::Stat { .. } | Reach::Direct => None,
        Reach::NotListed => Some("containerd does not list the soci snapshotter".to_string()),
        Reach::InitError(e) => Some(format!("plugin init error: {e}")),
        Reach::Unreachable { call, error } => Some(format!("{call}: {error}")),
        Reach::DirectFailed(e) => Some(e),
        Reach::NotProbed => Some("not probed".to_string()),
    };
    Ok(SnapshotterStatus {
        containerd_version: version,
        loaded: why.is_none(),
        init_error: why,
    })
}

/// Polls until containerd lists `soci` and reaches it.
pub async fn wait_for_snapshotter(
    containerd_socket: &Path,
    soci_socket: &Path,
    bound: Duration,
) -> Result<SnapshotterStatus, HealthError> {
    let started = Instant::now();
    loop {
        let last = match query_snapshotter(containerd_socket, soci_socket).await {
            Ok(s) if s.loaded => return Ok(s),
            Ok(s) => format!(
                "containerd {}: {}",
                s.containerd_version,
                s.init_error.unwrap_or_default()
            ),
            Err(e) => crate::exit::error_chain(&e),
        };
        if started.elapsed() >= bound {
            return Err(HealthError::SnapshotterNotLoaded {
                socket: containerd_socket.to_path_buf(),
                waited: bound,
                last,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}
