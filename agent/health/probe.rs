//! Does containerd reach the soci snapshotter? Shared by install's health
//! check and doctor.
//!
//! Being listed by Introspection proves little: a proxy plugin is listed
//! even when nothing serves its socket (containerd dials lazily), and
//! `Snapshots.List` is answered from containerd's own metadata store without
//! calling the proxy. A `Snapshots.Stat` of an existing soci snapshot does
//! call it. When containerd holds no soci snapshot, the daemon's socket is
//! asked directly (`Snapshots.List`, read-only). A SOCI that holds no
//! snapshot yet answers that with gRPC NotFound (`bucket does not exist`):
//! that is an empty snapshotter answering, not an unreachable one. Anything
//! else (no listener, a server without the snapshots service, a timeout)
//! fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::Client;
use containerd_client::services::v1::snapshots::{ListSnapshotsRequest, StatSnapshotRequest};
use containerd_client::services::v1::{ListNamespacesRequest, Plugin, PluginsRequest};

const SNAPSHOTTER: &str = "soci";
const PLUGIN_TYPE: &str = crate::health::SNAPSHOTTER_PLUGIN_TYPE;
const BOUND: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    NotListed,
    InitError(String),
    /// A Stat of `key` (namespace `ns`) went through containerd to the daemon.
    Stat {
        ns: String,
        key: String,
    },
    /// A call through containerd to the daemon failed (`call` names it).
    Unreachable {
        call: String,
        error: String,
    },
    /// containerd holds no soci snapshot; the daemon answered at the socket directly.
    Direct,
    /// containerd holds no soci snapshot and the socket does not answer.
    DirectFailed(String),
    /// containerd holds no soci snapshot, and dialing was not allowed.
    NotProbed,
}

/// Why containerd, or the daemon at its socket, could not be asked: the call and what it was on.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{call}: no answer within {:?}", BOUND)]
    Timeout { call: &'static str },
    #[error("connect")]
    Connect(#[source] tonic::transport::Error),
    /// A call to containerd (`Version`, `Introspection.Plugins`, `Namespaces.List`) failed.
    #[error("{call}: {message}")]
    Call { call: &'static str, message: String },
    #[error("namespace {0:?}")]
    Namespace(String),
    #[error("connect {}", socket.display())]
    ConnectDaemon {
        socket: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("Snapshots.List at {}: {message}", socket.display())]
    ListDaemon { socket: PathBuf, message: String },
}

impl ProbeError {
    /// `call` answered with `status`.
    fn call(call: &'static str, status: &tonic::Status) -> Self {
        ProbeError::Call {
            call,
            message: status.message().to_string(),
        }
    }
}

/// `msg` as a request in containerd namespace `ns`.
fn request<T>(ns: &str, msg: T) -> Result<tonic::Request<T>, ProbeError> {
    let mut req = tonic::Request::new(msg);
    let value = ns.parse().map_err(|_| ProbeError::Namespace(ns.to_string()))?;
    req.metadata_mut().insert("containerd-namespace", value);
    Ok(req)
}

/// `f`, given up on after [`BOUND`] (the error names `call`).
async fn bounded<T>(
    call: &'static str,
    f: impl std::future::Future<Output = Result<T, ProbeError>>,
) -> Result<T, ProbeError> {
    tokio::time::timeout(BOUND, f)
        .await
        .map_err(|_| ProbeError::Timeout { call })?
}

/// A request for every soci snapshot (no filters).
fn list_soci() -> ListSnapshotsRequest {
    ListSnapshotsRequest {
        snapshotter: SNAPSHOTTER.into(),
        filters: vec![],
    }
}

/// Where the first soci snapshot containerd knows is (namespace, key), k8s.io first.
enum First {
    Found(String, String),
    None,
    /// Listing failed: with snapshots present, containerd stats each through the proxy.
    ListFailed {
        ns: String,
        error: String,
    },
}

/// Finds the first soci snapshot containerd holds, looking in k8s.io first.
async fn first_snapshot(client: &Client) -> Result<First, ProbeError> {
    let mut namespaces: Vec<String> = client
        .namespaces()
        .list(ListNamespacesRequest { filter: String::new() })
        .await
        .map_err(|e| ProbeError::call("Namespaces.List", &e))?
        .into_inner()
        .namespaces
        .into_iter()
        .map(|n| n.name)
        .collect();
    namespaces.sort_by_key(|n| n != "k8s.io");
    for ns in namespaces {
        let failed = |e: tonic::Status| First::ListFailed {
            ns: ns.clone(),
            error: e.message().to_string(),
        };
        let mut stream = match client.snapshots().list(request(&ns, list_soci())?).await {
            Ok(r) => r.into_inner(),
            Err(e) => return Ok(failed(e)),
        };
        match stream.message().await {
            Ok(Some(batch)) => {
                if let Some(info) = batch.info.into_iter().next() {
                    return Ok(First::Found(ns, info.name));
                }
            }
            Ok(None) => {}
            Err(e) => return Ok(failed(e)),
        }
    }
    Ok(First::None)
}

/// Asks containerd at `containerd` (and, if needed and `may_dial`, the daemon at `soci`).
/// Returns containerd's version and what was found.
pub async fn probe(containerd: &Path, soci: &Path, may_dial: bool) -> Result<(String, Reach), ProbeError> {
    let client = bounded("connect", async {
        Client::from_path(containerd).await.map_err(ProbeError::Connect)
    })
    .await?;
    let version = bounded("Version", containerd_version(&client)).await?;
    let reach = match bounded("Introspection.Plugins", soci_plugin(&client)).await? {
        None => Reach::NotListed,
        Some(plugin) => match plugin.init_err {
            Some(err) => Reach::InitError(err.message),
            None => through_containerd(&client, soci, may_dial).await?,
        },
    };
    Ok((version, reach))
}

/// containerd's version string.
async fn containerd_version(client: &Client) -> Result<String, ProbeError> {
    client
        .version()
        .version(())
        .await
        .map(|r| r.into_inner().version)
        .map_err(|e| ProbeError::call("Version", &e))
}

/// The soci snapshotter plugin, when containerd lists it.
async fn soci_plugin(client: &Client) -> Result<Option<Plugin>, ProbeError> {
    let filter = format!("type=={PLUGIN_TYPE},id=={SNAPSHOTTER}");
    let plugins = client
        .introspection()
        .plugins(PluginsRequest { filters: vec![filter] })
        .await
        .map_err(|e| ProbeError::call("Introspection.Plugins", &e))?
        .into_inner()
        .plugins;
    Ok(plugins
        .into_iter()
        .find(|p| p.r#type == PLUGIN_TYPE && p.id == SNAPSHOTTER))
}

/// Reaches the listed snapshotter: a Stat through containerd of a soci snapshot it holds,
/// else (when `may_dial`) a List at the daemon's socket.
async fn through_containerd(client: &Client, soci: &Path, may_dial: bool) -> Result<Reach, ProbeError> {
    Ok(match bounded("Snapshots.List", first_snapshot(client)).await? {
        First::Found(ns, key) => stat_through(client, ns, key).await?,
        First::ListFailed { ns, error } => Reach::Unreachable {
            call: format!("Snapshots.List in {ns}"),
            error,
        },
        First::None if !may_dial => Reach::NotProbed,
        First::None => match bounded("the SOCI socket", list_at_daemon(soci)).await {
            Ok(()) => Reach::Direct,
            Err(e) => Reach::DirectFailed(crate::exit::error_chain(&e)),
        },
    })
}

/// A `Snapshots.Stat` of `key` in namespace `ns`, which containerd passes to the daemon.
async fn stat_through(client: &Client, ns: String, key: String) -> Result<Reach, ProbeError> {
    let stat = StatSnapshotRequest {
        snapshotter: SNAPSHOTTER.into(),
        key: key.clone(),
    };
    let req = request(&ns, stat)?;
    let call = format!("Snapshots.Stat of {key} in {ns}");
    Ok(match tokio::time::timeout(BOUND, client.snapshots().stat(req)).await {
        Ok(Ok(_)) => Reach::Stat { ns, key },
        Ok(Err(e)) => Reach::Unreachable {
            call,
            error: e.message().to_string(),
        },
        Err(_) => Reach::Unreachable {
            call,
            error: format!("no answer within {BOUND:?}"),
        },
    })
}

/// A read-only `Snapshots.List` at the daemon's own socket; an empty snapshotter answers too.
async fn list_at_daemon(soci: &Path) -> Result<(), ProbeError> {
    let daemon = Client::from_path(soci)
        .await
        .map_err(|source| ProbeError::ConnectDaemon {
            socket: soci.to_path_buf(),
            source,
        })?;
    let failed = |e: tonic::Status| ProbeError::ListDaemon {
        socket: soci.to_path_buf(),
        message: e.message().to_string(),
    };
    let mut stream = match daemon.snapshots().list(list_soci()).await {
        Ok(r) => r.into_inner(),
        Err(e) if answered_empty(&e) => return Ok(()),
        Err(e) => return Err(failed(e)),
    };
    match stream.message().await {
        Ok(_) => Ok(()),
        Err(e) if answered_empty(&e) => Ok(()),
        Err(e) => Err(failed(e)),
    }
}

/// `Snapshots.List` answered "no snapshot bucket yet": a freshly started
/// SOCI. v0.16.1 sends it as gRPC Unknown with the message
/// `bucket does not exist: not found` (its List stream does not map
/// containerd's errdefs to codes); NotFound is accepted too.
fn answered_empty(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::NotFound || status.message().contains("bucket does not exist")
}
