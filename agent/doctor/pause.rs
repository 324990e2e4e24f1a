//! Is the node's pause image unpacked in the soci snapshotter? Reads the
//! image names from the archive (`index.json` annotations or Docker's
//! `manifest.json` RepoTags), then asks containerd (namespace `k8s.io`): the
//! image record, its manifest (through an index for this platform), and the
//! `containerd.io/gc.ref.snapshot.soci` label containerd puts on the config
//! blob after unpacking into soci, confirmed by a `Snapshots.Stat`.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use containerd_client::Client;
use containerd_client::services::v1::snapshots::StatSnapshotRequest;
use containerd_client::services::v1::{GetImageRequest, Image, InfoRequest, ReadContentRequest};
use serde_json::Value;

const NAMESPACE: &str = "k8s.io";
const SNAPSHOT_LABEL: &str = "containerd.io/gc.ref.snapshot.";

/// What containerd holds for the pause image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PauseState {
    /// Unpacked in soci: image name and chain ID.
    InSoci { name: String, chain_id: String },
    /// Image present but unpacked only in these snapshotters (maybe none).
    Elsewhere { name: String, snapshotters: Vec<String> },
    /// None of the names is an image in `k8s.io`.
    Absent { names: Vec<String> },
}

/// Why the pause image could not be looked up: the operation and what it was on.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("{}", path.display())]
    OpenArchive { path: PathBuf, source: std::io::Error },
    #[error("reading its tar stream")]
    ReadArchive(#[source] std::io::Error),
    #[error("{entry}")]
    ReadEntry { entry: String, source: std::io::Error },
    #[error("{entry} is not JSON")]
    ParseEntry { entry: String, source: serde_json::Error },
    #[error("connect {}", socket.display())]
    Connect {
        socket: PathBuf,
        source: tonic::transport::Error,
    },
    /// A containerd call (`Images.Get`, `Content.Read`, `Content.Info`) on `object` failed.
    #[error("{call} {object}: {message}")]
    Call {
        call: &'static str,
        object: String,
        message: String,
    },
    #[error("Snapshots.Stat via soci: {message}")]
    Stat { message: String },
    #[error("{digest}: larger than 4 MiB, not a manifest")]
    TooLarge { digest: String },
    #[error("{digest} is not JSON")]
    NotJson { digest: String, source: serde_json::Error },
    /// The image record or its manifests lack what the lookup needs (`problem`).
    #[error("{image}: {problem}")]
    Image { image: String, problem: &'static str },
}

impl PauseError {
    /// `call` on `object` answered with `status`.
    fn call(call: &'static str, object: &str, status: &tonic::Status) -> Self {
        PauseError::Call {
            call,
            object: object.to_string(),
            message: status.message().to_string(),
        }
    }
}

/// Image names recorded in an image archive (OCI layout or `docker save`).
pub fn archive_names(path: &Path) -> Result<Vec<String>, PauseError> {
    let file = std::fs::File::open(path).map_err(|source| PauseError::OpenArchive {
        path: path.to_path_buf(),
        source,
    })?;
    let mut archive = tar::Archive::new(file);
    let mut names = Vec::new();
    for entry in archive.entries().map_err(PauseError::ReadArchive)? {
        let entry = entry.map_err(PauseError::ReadArchive)?;
        let name = entry
            .path()
            .map_err(PauseError::ReadArchive)?
            .to_string_lossy()
            .into_owned();
        let name = name.trim_start_matches("./").to_string();
        if name != "index.json" && name != "manifest.json" {
            continue;
        }
        let mut text = String::new();
        if let Err(source) = entry.take(1 << 20).read_to_string(&mut text) {
            return Err(PauseError::ReadEntry { entry: name, source });
        }
        let v: Value = serde_json::from_str(&text).map_err(|source| PauseError::ParseEntry {
            entry: name.clone(),
            source,
        })?;
        if name == "index.json" {
            names.extend(index_names(&v));
        } else {
            names.extend(docker_names(&v));
        }
    }
    names.dedup();
    Ok(names)
}

/// Image names an OCI `index.json` annotates its manifests with.
fn index_names(index: &Value) -> Vec<String> {
    let mut names = Vec::new();
    for m in index["manifests"].as_array().into_iter().flatten() {
        for key in ["io.containerd.image.name", "org.opencontainers.image.ref.name"] {
            if let Some(n) = m["annotations"][key].as_str().filter(|n| n.contains(['/', ':'])) {
                names.push(n.to_string());
            }
        }
    }
    names
}

/// The RepoTags of a `docker save` `manifest.json`, named as containerd names them.
fn docker_names(manifest: &Value) -> Vec<String> {
    manifest
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|m| m["RepoTags"].as_array().into_iter().flatten())
        .filter_map(|tag| tag.as_str().map(normalize_docker))
        .collect()
}

/// `pause:3.9` -> `docker.io/library/pause:3.9`, as containerd names it.
fn normalize_docker(t: &str) -> String {
    let first = t.split('/').next().unwrap_or("");
    if !t.contains('/') {
        format!("docker.io/library/{t}")
    } else if first.contains(['.', ':']) || first == "localhost" {
        t.to_string()
    } else {
        format!("docker.io/{t}")
    }
}

/// `msg` as a request in containerd's `k8s.io` namespace.
fn request<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "containerd-namespace",
        tonic::metadata::MetadataValue::from_static(NAMESPACE),
    );
    req
}

/// A blob of containerd's content store parsed as JSON (at most 4 MiB).
async fn read_json(client: &Client, digest: &str) -> Result<Value, PauseError> {
    let read = ReadContentRequest {
        digest: digest.to_string(),
        offset: 0,
        size: 0,
    };
    let failed = |s: tonic::Status| PauseError::call("Content.Read", digest, &s);
    let mut stream = client.content().read(request(read)).await.map_err(failed)?.into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream.message().await.map_err(failed)? {
        data.extend_from_slice(&chunk.data);
        if data.len() > 4 << 20 {
            return Err(PauseError::TooLarge {
                digest: digest.to_string(),
            });
        }
    }
    serde_json::from_slice(&data).map_err(|source| PauseError::NotJson {
        digest: digest.to_string(),
        source,
    })
}

/// Looks the pause image up in containerd.
pub async fn state(socket: &Path, names: &[String], arch: &str) -> Result<PauseState, PauseError> {
    let client = Client::from_path(socket).await.map_err(|source| PauseError::Connect {
        socket: socket.to_path_buf(),
        source,
    })?;
    let Some(image) = find_image(&client, names).await? else {
        return Ok(PauseState::Absent { names: names.to_vec() });
    };
    let config = config_digest(&client, &image, arch).await?;
    let labels = client
        .content()
        .info(request(InfoRequest { digest: config.clone() }))
        .await
        .map_err(|s| PauseError::call("Content.Info", &config, &s))?
        .into_inner()
        .info
        .unwrap_or_default()
        .labels;
    unpacked_state(&client, image.name, &labels).await
}

/// The first of `names` that is an image in containerd's `k8s.io` namespace.
async fn find_image(client: &Client, names: &[String]) -> Result<Option<Image>, PauseError> {
    for name in names {
        match client
            .images()
            .get(request(GetImageRequest { name: name.clone() }))
            .await
        {
            Ok(r) => {
                if let Some(img) = r.into_inner().image {
                    return Ok(Some(img));
                }
            }
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(PauseError::call("Images.Get", name, &s)),
        }
    }
    Ok(None)
}

/// The digest of the image's config blob, through an index to this platform's manifest.
async fn config_digest(client: &Client, image: &Image, arch: &str) -> Result<String, PauseError> {
    let problem = |problem| PauseError::Image {
        image: image.name.clone(),
        problem,
    };
    let target = image.target.as_ref().ok_or_else(|| problem("image has no target"))?;
    let mut doc = read_json(client, &target.digest).await?;
    if let Some(list) = doc["manifests"].as_array() {
        let pick = list
            .iter()
            .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch)
            .or_else(|| list.first())
            .and_then(|m| m["digest"].as_str())
            .ok_or_else(|| problem("empty index"))?
            .to_string();
        doc = read_json(client, &pick).await?;
    }
    Ok(doc["config"]["digest"]
        .as_str()
        .ok_or_else(|| problem("manifest has no config"))?
        .to_string())
}

/// Where the image `name` is unpacked, from its config blob's snapshot `labels`; a soci
/// snapshot is confirmed with a `Snapshots.Stat`.
async fn unpacked_state(
    client: &Client,
    name: String,
    labels: &HashMap<String, String>,
) -> Result<PauseState, PauseError> {
    let mut snapshotters: Vec<String> = labels
        .keys()
        .filter_map(|k| k.strip_prefix(SNAPSHOT_LABEL).map(str::to_string))
        .collect();
    snapshotters.sort();
    let Some(chain_id) = labels.get(&format!("{SNAPSHOT_LABEL}soci")).cloned() else {
        return Ok(PauseState::Elsewhere { name, snapshotters });
    };
    let stat = StatSnapshotRequest {
        snapshotter: "soci".into(),
        key: chain_id.clone(),
    };
    match client.snapshots().stat(request(stat)).await {
        Ok(_) => Ok(PauseState::InSoci { name, chain_id }),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(PauseState::Elsewhere {
            name,
            snapshotters: snapshotters.into_iter().filter(|s| s != "soci").collect(),
        }),
        Err(s) => Err(PauseError::Stat {
            message: s.message().to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn docker_names_are_normalized() {
        assert_eq!(super::normalize_docker("pause:3.9"), "docker.io/library/pause:3.9");
        assert_eq!(super::normalize_docker("me/pause:1"), "docker.io/me/pause:1");
        assert_eq!(
            super::normalize_docker("localhost/kubernetes/pause:latest"),
            "localhost/kubernetes/pause:latest"
        );
    }
}
