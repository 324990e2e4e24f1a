//! Pinning: containerd's CRI treats an image whose record carries
//! `io.cri-containerd.pinned=pinned` as pinned (CRI `Image.pinned`, honoured
//! from containerd 1.7), so kubelet's image GC leaves it alone.
//!
//! CRI keeps several containerd image records for one image, in namespace
//! `k8s.io`: one per tag (`docker.io/library/x:1`), one per digest reference
//! and one named by the image ID (`sha256:<config>`). The label goes on every
//! record that exists (`Images.Get`, then `Images.Update` with the update
//! mask `labels.io.cri-containerd.pinned`, which touches nothing else);
//! unpinning sends the same mask without the label, which deletes it.

use std::collections::HashMap;

use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{GetImageRequest, UpdateImageRequest};
use tonic::transport::Channel;

use super::cri::CallError;

pub const PINNED_LABEL: &str = "io.cri-containerd.pinned";
pub const PINNED_VALUE: &str = "pinned";
pub const CRI_NAMESPACE: &str = "k8s.io";

fn request<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "containerd-namespace",
        tonic::metadata::MetadataValue::from_static(CRI_NAMESPACE),
    );
    req
}

/// The containerd image records CRI keeps for one image.
pub fn record_names(image: &k8s_cri::v1::Image) -> Vec<String> {
    let mut names: Vec<String> = image.repo_tags.iter().chain(&image.repo_digests).cloned().collect();
    if !image.id.is_empty() {
        names.push(image.id.clone());
    }
    names.dedup();
    names
}

/// Sets (`pinned`) or removes the label on every record in `names` that
/// exists; returns the records changed. A missing record is skipped.
pub async fn set_pinned(channel: &Channel, names: &[String], pinned: bool) -> Result<Vec<String>, CallError> {
    let mut client = ImagesClient::new(channel.clone());
    let mut changed = Vec::new();
    for name in names {
        let got = match client.get(request(GetImageRequest { name: name.clone() })).await {
            Ok(r) => r.into_inner().image,
            Err(s) if s.code() == tonic::Code::NotFound => None,
            Err(s) => return Err(context(name, s)),
        };
        let Some(mut image) = got else { continue };
        let has = image.labels.get(PINNED_LABEL).map(String::as_str) == Some(PINNED_VALUE);
        if has == pinned {
            continue;
        }
        image.labels = if pinned {
            HashMap::from([(PINNED_LABEL.to_string(), PINNED_VALUE.to_string())])
        } else {
            HashMap::new()
        };
        let mut update = UpdateImageRequest {
            image: Some(image),
            update_mask: Some(Default::default()),
            source_date_epoch: None,
        };
        if let Some(mask) = update.update_mask.as_mut() {
            mask.paths = vec![format!("labels.{PINNED_LABEL}")];
        }
        client.update(request(update)).await.map_err(|s| context(name, s))?;
        changed.push(name.clone());
    }
    Ok(changed)
}

fn context(name: &str, s: tonic::Status) -> CallError {
    let mut e = CallError::from(s);
    e.message = format!("containerd image {name}: {}", e.message);
    e
}
