//! Live checks of the wiring: the snapshotter socket accepts connections, and
//! containerd answers and lists the `soci` proxy snapshotter as loaded. Every
//! wait is bounded; the error says what was last seen.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use containerd_client::services::v1::PluginsRequest;
use containerd_client::services::v1::snapshots::ListSnapshotsRequest;

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
    pub loaded: bool,
    /// containerd's init error for the plugin, when it failed to load.
    pub init_error: Option<String>,
}

/// One look: asks containerd's Version and Introspection APIs.
pub async fn query_snapshotter(containerd_socket: &Path, id: &str) -> Result<SnapshotterStatus, String> {
    let client = tokio::time::timeout(
        Duration::from_secs(5),
        containerd_client::Client::from_path(containerd_socket),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| format!("connect: {e}"))?;
    let version = client
        .version()
        .version(())
        .await
        .map(|r| r.into_inner().version)
        .map_err(|e| format!("Version: {}", e.message()))?;
    let filter = format!("type=={SNAPSHOTTER_PLUGIN_TYPE},id=={id}");
    let plugins = client
        .introspection()
        .plugins(PluginsRequest { filters: vec![filter] })
        .await
        .map_err(|e| format!("Introspection.Plugins: {}", e.message()))?
        .into_inner()
        .plugins;
    let plugin = plugins
        .into_iter()
        .find(|p| p.r#type == SNAPSHOTTER_PLUGIN_TYPE && p.id == id);
    let listed = plugin.as_ref().is_some_and(|p| p.init_err.is_none());
    let init_error = plugin.and_then(|p| p.init_err).map(|s| s.message);
    // A proxy plugin is listed even when its socket is down (containerd dials
    // lazily): a Snapshots.List through it proves containerd can reach it.
    let usable = if listed {
        let mut req = tonic::Request::new(ListSnapshotsRequest {
            snapshotter: id.to_string(),
            filters: vec![],
        });
        req.metadata_mut().insert(
            "containerd-namespace",
            tonic::metadata::MetadataValue::from_static("k8s.io"),
        );
        let mut stream = client
            .snapshots()
            .list(req)
            .await
            .map_err(|e| format!("Snapshots.List via {id}: {}", e.message()))?
            .into_inner();
        tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .map_err(|_| format!("Snapshots.List via {id}: no answer"))?
            .map_err(|e| format!("Snapshots.List via {id}: {}", e.message()))?;
        true
    } else {
        false
    };
    Ok(SnapshotterStatus {
        containerd_version: version,
        loaded: usable,
        init_error,
    })
}

/// Polls containerd until the snapshotter `id` is listed without an init error.
pub async fn wait_for_snapshotter(
    containerd_socket: &Path,
    id: &str,
    bound: Duration,
) -> Result<SnapshotterStatus, HealthError> {
    let started = Instant::now();
    loop {
        let last = match query_snapshotter(containerd_socket, id).await {
            Ok(s) if s.loaded => return Ok(s),
            Ok(s) => match &s.init_error {
                Some(e) => format!("containerd {}: plugin init error: {e}", s.containerd_version),
                None => format!("containerd {}: plugin not listed", s.containerd_version),
            },
            Err(e) => e,
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
