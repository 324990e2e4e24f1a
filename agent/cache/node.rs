//! What the cache commands ask the running node: images through CRI (the
//! view kubelet has), and the containerd and SOCI versions.

use std::time::Duration;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{Image, ImageFilter, ImageSpec, ImageStatusRequest, ListImagesRequest};
use tonic::transport::Channel;

use crate::install::record::Record;
use crate::paths::{CONTAINERD_SOCKET, SOCI_BINARY_LOCATIONS};
use crate::rootfs::Root;

/// Bound of one CRI call.
const CALL_BOUND: Duration = Duration::from_secs(20);

/// A CRI call of the cache commands that failed. The gRPC status is kept as
/// its code and message (its own display adds metadata nobody reads).
#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error(transparent)]
    Endpoint(#[from] crate::prefetch::cri::EndpointError),
    #[error("ImageStatus {image}: {code:?}: {message}")]
    ImageStatus {
        image: String,
        code: tonic::Code,
        message: String,
    },
    #[error("ImageStatus {image}: no answer within {bound:?}")]
    ImageStatusTimeout { image: String, bound: Duration },
    #[error("ListImages: {code:?}: {message}")]
    ListImages { code: tonic::Code, message: String },
    #[error("ListImages: no answer within {bound:?}")]
    ListImagesTimeout { bound: Duration },
}

/// The CRI image service at `endpoint` (unix path or `unix://` URL), else containerd's socket.
pub fn cri(root: &Root, endpoint: Option<&str>) -> Result<ImageServiceClient<Channel>, CriError> {
    let socket = match endpoint {
        Some(e) => crate::prefetch::cri::socket_path(e)?,
        None => std::path::PathBuf::from(CONTAINERD_SOCKET),
    };
    Ok(ImageServiceClient::new(crate::prefetch::cri::unix_channel(
        root.path(socket),
    )))
}

/// `ImageStatus`: the image when CRI has it.
pub async fn status(client: &ImageServiceClient<Channel>, image: &str) -> Result<Option<Image>, CriError> {
    let req = ImageStatusRequest {
        image: Some(ImageSpec {
            image: image.to_string(),
            ..ImageSpec::default()
        }),
        verbose: false,
    };
    match tokio::time::timeout(CALL_BOUND, client.clone().image_status(req)).await {
        Ok(Ok(r)) => Ok(r.into_inner().image),
        Ok(Err(s)) => Err(CriError::ImageStatus {
            image: image.to_string(),
            code: s.code(),
            message: s.message().to_string(),
        }),
        Err(_) => Err(CriError::ImageStatusTimeout {
            image: image.to_string(),
            bound: CALL_BOUND,
        }),
    }
}

/// `ListImages`: every image CRI knows.
pub async fn list(client: &ImageServiceClient<Channel>) -> Result<Vec<Image>, CriError> {
    let req = ListImagesRequest {
        filter: Some(ImageFilter::default()),
    };
    match tokio::time::timeout(CALL_BOUND, client.clone().list_images(req)).await {
        Ok(Ok(r)) => Ok(r.into_inner().images),
        Ok(Err(s)) => Err(CriError::ListImages {
            code: s.code(),
            message: s.message().to_string(),
        }),
        Err(_) => Err(CriError::ListImagesTimeout { bound: CALL_BOUND }),
    }
}

/// This node's platform as CRI pulls it (`linux/amd64`).
pub fn platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    format!("linux/{arch}")
}

/// The daemons' versions on this node, when they can be told.
#[derive(Debug, Clone, Default)]
pub struct Versions {
    pub containerd: Option<String>,
    pub soci: Option<String>,
}

/// containerd's version (EKS file or `containerd --version`) and the
/// version of the SOCI binary the install record names (else the first
/// known location).
pub async fn versions(root: &Root) -> Versions {
    let facts_containerd = crate::host::detect_containerd(root).await;
    let mut bins: Vec<String> = Record::load(root)
        .ok()
        .flatten()
        .map(|r| vec![r.daemon_binary])
        .unwrap_or_default();
    bins.extend(SOCI_BINARY_LOCATIONS.iter().map(|s| s.to_string()));
    let mut soci = None;
    if root.is_host() {
        for b in bins {
            let p = root.path(&b);
            if !p.exists() {
                continue;
            }
            let out = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::process::Command::new(&p)
                    .arg("--version")
                    .kill_on_drop(true)
                    .output(),
            )
            .await;
            if let Ok(Ok(o)) = out
                && let Some(v) = crate::host::parse_soci_version(&String::from_utf8_lossy(&o.stdout))
            {
                soci = Some(v);
                break;
            }
        }
    }
    Versions {
        containerd: facts_containerd.map(|c| c.version),
        soci,
    }
}
