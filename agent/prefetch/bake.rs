//! Bake mode (`--platform linux/amd64,linux/arm64`): besides the CRI pull
//! for this node's platform, fetch every other listed platform's content
//! into containerd's content store (namespace `k8s.io`, same image name and
//! CRI's `io.cri-containerd.image=managed` label), so one data-volume
//! snapshot serves both instance families: on the other family the CRI pull
//! at boot finds every blob local and only unpacks.
//!
//! This goes through containerd's Transfer service (`OCIRegistry` source,
//! `ImageStore` destination limited to one platform, no unpack), which
//! containerd has from 1.7 on. containerd 1.6 has no Transfer service: the
//! call answers `Unimplemented` and every such platform is reported as
//! "unsupported by this containerd" (the CRI pull of the native platform is
//! unaffected). Credentials go as a static `Authorization` header (Basic, or
//! Bearer for a registry token), which suits ECR and basic-auth registries.

use crate::paths::CONTAINERD_HOSTS_DIR;
use std::collections::HashMap;

use containerd_client::services::v1::TransferRequest;
use containerd_client::services::v1::transfer_client::TransferClient;
use containerd_client::types::Platform;
use containerd_client::types::transfer::{ImageStore, OciRegistry, RegistryResolver};
use tonic::transport::Channel;

use super::credentials::{Credential, basic_authorization};
use super::pin::{CRI_NAMESPACE, PINNED_LABEL, PINNED_VALUE};

/// The outcome for one extra platform.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PlatformState {
    /// This node's platform: pulled through CRI.
    Native,
    /// Content fetched through the Transfer service.
    Fetched,
    /// containerd has no Transfer service (1.6).
    Unsupported,
    Failed,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PlatformReport {
    pub platform: String,
    pub state: PlatformState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `linux/amd64` for this build's architecture.
pub fn native_platform() -> String {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    format!("linux/{arch}")
}

/// A platform that is not `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("platform {text:?} is not os/arch[/variant] (e.g. linux/arm64)")]
pub struct PlatformError {
    pub text: String,
}

/// Parses `os/arch[/variant]`.
pub fn parse_platform(text: &str) -> Result<Platform, PlatformError> {
    let parts: Vec<&str> = text.split('/').collect();
    let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    match parts.as_slice() {
        [os, arch] if ok(os) && ok(arch) => Ok(Platform {
            os: os.to_string(),
            architecture: arch.to_string(),
            ..Platform::default()
        }),
        [os, arch, variant] if ok(os) && ok(arch) && ok(variant) => Ok(Platform {
            os: os.to_string(),
            architecture: arch.to_string(),
            variant: variant.to_string(),
            ..Platform::default()
        }),
        _ => Err(PlatformError { text: text.to_string() }),
    }
}

/// Fetches `reference`'s content for `platform` into containerd's store.
pub async fn fetch_platform(
    channel: &Channel,
    reference: &str,
    platform: &str,
    credential: Option<&Credential>,
    pin: bool,
) -> PlatformReport {
    let report = |state, error| PlatformReport {
        platform: platform.to_string(),
        state,
        error,
    };
    let parsed = match parse_platform(platform) {
        Ok(p) => p,
        Err(e) => return report(PlatformState::Failed, Some(e.to_string())),
    };
    let req = transfer_request(
        &registry_source(reference, credential),
        &image_store(reference, parsed, pin),
    );
    match TransferClient::new(channel.clone()).transfer(req).await {
        Ok(_) => report(PlatformState::Fetched, None),
        Err(s) if s.code() == tonic::Code::Unimplemented => report(
            PlatformState::Unsupported,
            Some("unsupported by this containerd: no Transfer service (containerd 1.7 or newer needed)".into()),
        ),
        Err(s) => report(
            PlatformState::Failed,
            Some(format!("failed: {:?}: {}", s.code(), s.message())),
        ),
    }
}

/// The Transfer source: the registry, with the credential as a static header and
/// containerd's hosts directory when the node has one.
fn registry_source(reference: &str, credential: Option<&Credential>) -> OciRegistry {
    let mut headers = HashMap::new();
    if let Some(value) = credential.and_then(authorization) {
        headers.insert("Authorization".to_string(), value);
    }
    OciRegistry {
        reference: reference.to_string(),
        resolver: Some(RegistryResolver {
            headers,
            host_dir: if std::path::Path::new(CONTAINERD_HOSTS_DIR).is_dir() {
                CONTAINERD_HOSTS_DIR.to_string()
            } else {
                String::new()
            },
            ..RegistryResolver::default()
        }),
    }
}

/// The Transfer destination: containerd's image store, one platform, CRI's label (and pinned).
fn image_store(reference: &str, platform: Platform, pin: bool) -> ImageStore {
    let mut labels = HashMap::from([("io.cri-containerd.image".to_string(), "managed".to_string())]);
    if pin {
        labels.insert(PINNED_LABEL.to_string(), PINNED_VALUE.to_string());
    }
    ImageStore {
        name: reference.to_string(),
        labels,
        platforms: vec![platform],
        ..ImageStore::default()
    }
}

/// A Transfer call from `source` to `destination`, in CRI's namespace.
fn transfer_request(source: &OciRegistry, destination: &ImageStore) -> tonic::Request<TransferRequest> {
    let mut req = tonic::Request::new(TransferRequest {
        source: Some(containerd_client::to_any(source)),
        destination: Some(containerd_client::to_any(destination)),
        options: None,
    });
    req.metadata_mut().insert(
        "containerd-namespace",
        tonic::metadata::MetadataValue::from_static(CRI_NAMESPACE),
    );
    req
}

/// The static `Authorization` header value for a credential, if it has one.
fn authorization(c: &Credential) -> Option<String> {
    if !c.registry_token.is_empty() {
        Some(format!("Bearer {}", c.registry_token))
    } else if !c.username.is_empty() {
        Some(basic_authorization(&c.username, &c.password))
    } else if !c.auth.is_empty() {
        Some(format!("Basic {}", c.auth))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_and_headers() {
        assert_eq!(parse_platform("linux/arm64").unwrap().architecture, "arm64");
        assert_eq!(parse_platform("linux/arm/v7").unwrap().variant, "v7");
        assert!(parse_platform("arm64").is_err());
        assert!(parse_platform("linux//x").is_err());
        let c = Credential {
            username: "user".into(),
            password: "pass".into(),
            ..Credential::default()
        };
        assert_eq!(authorization(&c).unwrap(), "Basic dXNlcjpwYXNz");
        assert!(native_platform().starts_with("linux/"));
    }
}
