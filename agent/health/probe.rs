//! Does containerd reach the soci snapshotter? Shared by install's health
//! check and doctor. Being listed by Introspection proves little: a proxy plugin is listed even when nothing
//! serves its socket (containerd dials lazily), and `Snapshots.List` is
//! answered from containerd's own metadata store without calling the
//! proxy. A `Snapshots.Stat` of an existing soci snapshot does call it.
//! When containerd holds no soci snapshot, the daemon's socket is asked
//! directly (`Snapshots.List`, read-only). A SOCI that holds no snapshot yet
//! answers that with gRPC NotFound (`bucket does not exist`): that is an
//! empty snapshotter answering, not an unreachable one. Anything else (no
//! listener, a server without the snapshots service, a timeout) fails.

use std::path::Path;
use std::time::Duration;

use containerd_client::services::v1::snapshots::{ListSnapshotsRequest, StatSnapshotRequest};
use containerd_client::services::v1::{ListNamespacesRequest, PluginsRequest};

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

fn request<T>(ns: &str, msg: T) -> Result<tonic::Request<T>, String> {
    let mut req = tonic::Request::new(msg);
    let value = ns.parse().map_err(|_| format!("namespace {ns:?}"))?;
    req.metadata_mut().insert("containerd-namespace", value);
    Ok(req)
}

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::time::timeout(BOUND, f)
        .await
        .map_err(|_| format!("{what}: no answer within {BOUND:?}"))?
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

async fn first_snapshot(client: &containerd_client::Client) -> Result<First, String> {
    let mut namespaces: Vec<String> = client
        .namespaces()
        .list(ListNamespacesRequest { filter: String::new() })
        .await
        .map_err(|e| format!("Namespaces.List: {}", e.message()))?
        .into_inner()
        .namespaces
        .into_iter()
        .map(|n| n.name)
        .collect();
    namespaces.sort_by_key(|n| n != "k8s.io");
    for ns in namespaces {
        let list = ListSnapshotsRequest {
            snapshotter: SNAPSHOTTER.into(),
            filters: vec![],
        };
        let failed = |e: tonic::Status| First::ListFailed {
            ns: ns.clone(),
            error: e.message().to_string(),
        };
        let mut stream = match client.snapshots().list(request(&ns, list)?).await {
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
pub async fn probe(containerd: &Path, soci: &Path, may_dial: bool) -> Result<(String, Reach), String> {
    let client = bounded("connect", async {
        containerd_client::Client::from_path(containerd)
            .await
            .map_err(|e| format!("connect: {e}"))
    })
    .await?;
    let version = bounded("Version", async {
        client
            .version()
            .version(())
            .await
            .map(|r| r.into_inner().version)
            .map_err(|e| format!("Version: {}", e.message()))
    })
    .await?;
    let filter = format!("type=={PLUGIN_TYPE},id=={SNAPSHOTTER}");
    let plugins = bounded("Introspection.Plugins", async {
        client
            .introspection()
            .plugins(PluginsRequest { filters: vec![filter] })
            .await
            .map(|r| r.into_inner().plugins)
            .map_err(|e| format!("Introspection.Plugins: {}", e.message()))
    })
    .await?;
    let Some(plugin) = plugins
        .into_iter()
        .find(|p| p.r#type == PLUGIN_TYPE && p.id == SNAPSHOTTER)
    else {
        return Ok((version, Reach::NotListed));
    };
    if let Some(err) = plugin.init_err {
        return Ok((version, Reach::InitError(err.message)));
    }
    match bounded("Snapshots.List", first_snapshot(&client)).await? {
        First::Found(ns, key) => {
            let stat = StatSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: key.clone(),
            };
            let req = request(&ns, stat)?;
            let call = format!("Snapshots.Stat of {key} in {ns}");
            let reach = match tokio::time::timeout(BOUND, client.snapshots().stat(req)).await {
                Ok(Ok(_)) => Reach::Stat { ns, key },
                Ok(Err(e)) => Reach::Unreachable {
                    call,
                    error: e.message().to_string(),
                },
                Err(_) => Reach::Unreachable {
                    call,
                    error: format!("no answer within {BOUND:?}"),
                },
            };
            return Ok((version, reach));
        }
        First::ListFailed { ns, error } => {
            let call = format!("Snapshots.List in {ns}");
            return Ok((version, Reach::Unreachable { call, error }));
        }
        First::None => {}
    }
    if !may_dial {
        return Ok((version, Reach::NotProbed));
    }
    let direct = bounded("the SOCI socket", async {
        let daemon = containerd_client::Client::from_path(soci)
            .await
            .map_err(|e| format!("connect {}: {e}", soci.display()))?;
        let list = ListSnapshotsRequest {
            snapshotter: SNAPSHOTTER.into(),
            filters: vec![],
        };
        let failed = |e: tonic::Status| format!("Snapshots.List at {}: {}", soci.display(), e.message());
        let mut stream = match daemon.snapshots().list(list).await {
            Ok(r) => r.into_inner(),
            Err(e) if answered_empty(&e) => return Ok(()),
            Err(e) => return Err(failed(e)),
        };
        match stream.message().await {
            Ok(_) => Ok(()),
            Err(e) if answered_empty(&e) => Ok(()),
            Err(e) => Err(failed(e)),
        }
    })
    .await;
    Ok((
        version,
        match direct {
            Ok(()) => Reach::Direct,
            Err(e) => Reach::DirectFailed(e),
        },
    ))
}

/// `Snapshots.List` answered "no snapshot bucket yet": a freshly started
/// SOCI. v0.16.1 sends it as gRPC Unknown with the message
/// `bucket does not exist: not found` (its List stream does not map
/// containerd's errdefs to codes); NotFound is accepted too.
fn answered_empty(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::NotFound || status.message().contains("bucket does not exist")
}
