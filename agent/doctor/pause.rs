//! Is the node's pause image unpacked in the soci snapshotter? Reads the
//! image names from the archive (`index.json` annotations or Docker's
//! `manifest.json` RepoTags), then asks containerd (namespace `k8s.io`): the
//! image record, its manifest (through an index for this platform), and the
//! `containerd.io/gc.ref.snapshot.soci` label containerd puts on the config
//! blob after unpacking into soci, confirmed by a `Snapshots.Stat`.

use std::io::Read;
use std::path::Path;

use containerd_client::services::v1::snapshots::StatSnapshotRequest;
use containerd_client::services::v1::{GetImageRequest, InfoRequest, ReadContentRequest};
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

/// Image names recorded in an image archive (OCI layout or `docker save`).
pub fn archive_names(path: &Path) -> Result<Vec<String>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut archive = tar::Archive::new(file);
    let mut names = Vec::new();
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.path().map_err(|e| e.to_string())?.to_string_lossy().into_owned();
        let name = name.trim_start_matches("./").to_string();
        if name != "index.json" && name != "manifest.json" {
            continue;
        }
        let mut text = String::new();
        entry
            .take(1 << 20)
            .read_to_string(&mut text)
            .map_err(|e| format!("{name}: {e}"))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{name}: {e}"))?;
        if name == "index.json" {
            for m in v["manifests"].as_array().into_iter().flatten() {
                for key in ["io.containerd.image.name", "org.opencontainers.image.ref.name"] {
                    if let Some(n) = m["annotations"][key].as_str().filter(|n| n.contains(['/', ':'])) {
                        names.push(n.to_string());
                    }
                }
            }
        } else {
            for m in v.as_array().into_iter().flatten() {
                for tag in m["RepoTags"].as_array().into_iter().flatten() {
                    if let Some(t) = tag.as_str() {
                        names.push(normalize_docker(t));
                    }
                }
            }
        }
    }
    names.dedup();
    Ok(names)
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

fn request<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "containerd-namespace",
        tonic::metadata::MetadataValue::from_static(NAMESPACE),
    );
    req
}

async fn read_json(client: &containerd_client::Client, digest: &str) -> Result<Value, String> {
    let mut stream = client
        .content()
        .read(request(ReadContentRequest {
            digest: digest.to_string(),
            offset: 0,
            size: 0,
        }))
        .await
        .map_err(|e| format!("Content.Read {digest}: {}", e.message()))?
        .into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|e| format!("Content.Read {digest}: {}", e.message()))?
    {
        data.extend_from_slice(&chunk.data);
        if data.len() > 4 << 20 {
            return Err(format!("{digest}: larger than 4 MiB, not a manifest"));
        }
    }
    serde_json::from_slice(&data).map_err(|e| format!("{digest}: {e}"))
}

/// Looks the pause image up in containerd.
pub async fn state(socket: &Path, names: &[String], arch: &str) -> Result<PauseState, String> {
    let client = containerd_client::Client::from_path(socket)
        .await
        .map_err(|e| format!("connect {}: {e}", socket.display()))?;
    let mut found = None;
    for name in names {
        match client
            .images()
            .get(request(GetImageRequest { name: name.clone() }))
            .await
        {
            Ok(r) => {
                if let Some(img) = r.into_inner().image {
                    found = Some(img);
                    break;
                }
            }
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(format!("Images.Get {name}: {}", s.message())),
        }
    }
    let Some(image) = found else {
        return Ok(PauseState::Absent { names: names.to_vec() });
    };
    let target = image
        .target
        .ok_or_else(|| format!("{}: image has no target", image.name))?;
    let mut doc = read_json(&client, &target.digest).await?;
    if let Some(list) = doc["manifests"].as_array() {
        let pick = list
            .iter()
            .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch)
            .or_else(|| list.first())
            .and_then(|m| m["digest"].as_str())
            .ok_or_else(|| format!("{}: empty index", image.name))?
            .to_string();
        doc = read_json(&client, &pick).await?;
    }
    let config = doc["config"]["digest"]
        .as_str()
        .ok_or_else(|| format!("{}: manifest has no config", image.name))?
        .to_string();
    let info = client
        .content()
        .info(request(InfoRequest { digest: config.clone() }))
        .await
        .map_err(|e| format!("Content.Info {config}: {}", e.message()))?
        .into_inner()
        .info
        .unwrap_or_default();
    let mut snapshotters: Vec<String> = info
        .labels
        .keys()
        .filter_map(|k| k.strip_prefix(SNAPSHOT_LABEL).map(str::to_string))
        .collect();
    snapshotters.sort();
    let Some(chain_id) = info.labels.get(&format!("{SNAPSHOT_LABEL}soci")).cloned() else {
        return Ok(PauseState::Elsewhere {
            name: image.name,
            snapshotters,
        });
    };
    let stat = client
        .snapshots()
        .stat(request(StatSnapshotRequest {
            snapshotter: "soci".into(),
            key: chain_id.clone(),
        }))
        .await;
    match stat {
        Ok(_) => Ok(PauseState::InSoci {
            name: image.name,
            chain_id,
        }),
        Err(s) if s.code() == tonic::Code::NotFound => Ok(PauseState::Elsewhere {
            name: image.name,
            snapshotters: snapshotters.into_iter().filter(|s| s != "soci").collect(),
        }),
        Err(s) => Err(format!("Snapshots.Stat via soci: {}", s.message())),
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
