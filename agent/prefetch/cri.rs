//! The CRI v1 `ImageService` client (kubelet's own API to containerd) over a
//! unix socket, and the classification of its errors into "retry" and "give
//! up". Pulling through CRI puts an image exactly where kubelet expects it:
//! namespace `k8s.io`, the snapshotter CRI is configured with, CRI's labels.

use std::path::PathBuf;
use std::time::Duration;

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::{AuthConfig, Image, ImageSpec, ImageStatusRequest, PullImageRequest};
use tonic::transport::{Channel, Endpoint, Uri};

use super::credentials::Credential;

/// A lazily connected channel to a unix socket: nothing is dialled until the
/// first call, and a daemon that is down (or restarting) surfaces as
/// `Unavailable` on that call, which the caller retries.
pub fn unix_channel(socket: PathBuf) -> Channel {
    Endpoint::from_static("http://[::]")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(&socket)
                    .await
                    .map_err(|e| std::io::Error::new(e.kind(), format!("connect to {}: {e}", socket.display())))?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
}

/// A CRI endpoint that is not a unix socket path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CRI endpoint {endpoint:?} must be unix:///absolute/path or an absolute path")]
pub struct EndpointError {
    pub endpoint: String,
}

/// `unix:///run/x.sock` or `/run/x.sock` -> the socket path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, EndpointError> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(EndpointError {
            endpoint: endpoint.to_string(),
        });
    }
    Ok(PathBuf::from(path))
}

/// One failed call, classified.
#[derive(Debug, Clone)]
pub struct CallError {
    /// `Code: message`, as shown to people.
    pub message: String,
    pub transient: bool,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<tonic::Status> for CallError {
    fn from(s: tonic::Status) -> Self {
        CallError {
            message: format!("{:?}: {}", s.code(), s.message().trim()),
            transient: is_transient(s.code(), s.message()),
        }
    }
}

/// Error texts that mean trying again cannot help (checked first).
const PERMANENT: [&str; 9] = [
    "401 unauthorized",
    "403 forbidden",
    "unauthorized",
    "denied",
    "not found",
    "invalid reference",
    "failed to parse",
    "no match for platform",
    "invalid argument",
];

/// Error texts of registry or network trouble that may pass.
const TRANSIENT: [&str; 20] = [
    "connection refused",
    "connection reset",
    "broken pipe",
    "dial tcp",
    "i/o timeout",
    "no such host",
    "server misbehaving",
    "tls handshake timeout",
    "timeout awaiting response headers",
    "context deadline exceeded",
    "unexpected eof",
    "http2: server sent goaway",
    "500 internal server error",
    "502 bad gateway",
    "503 service unavailable",
    "504 gateway timeout",
    "429 too many requests",
    "too many requests",
    "toomanyrequests",
    "temporarily unavailable",
];

/// Retry `Unavailable`, `DeadlineExceeded`, `ResourceExhausted`, `Aborted`,
/// and `Unknown`/`Internal` whose text is a registry 5xx/429 or a network
/// error (containerd reports registry trouble as `Unknown`). Never retry an
/// authorization failure, a missing image or a bad reference.
pub fn is_transient(code: tonic::Code, message: &str) -> bool {
    use tonic::Code;
    if message.to_ascii_lowercase().contains("no such file or directory") {
        return false; // the socket is gone: waiting will not bring it back
    }
    match code {
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted => true,
        Code::Unknown | Code::Internal => {
            let m = message.to_ascii_lowercase();
            !PERMANENT.iter().any(|p| m.contains(p)) && TRANSIENT.iter().any(|t| m.contains(t))
        }
        _ => false,
    }
}

/// The CRI image service on one channel.
#[derive(Clone)]
pub struct Cri {
    client: ImageServiceClient<Channel>,
}

impl Cri {
    pub fn new(channel: Channel) -> Self {
        Cri {
            client: ImageServiceClient::new(channel),
        }
    }

    /// `ImageStatus`: `Some(image)` when the runtime has it.
    pub async fn status(&self, reference: &str) -> Result<Option<Image>, CallError> {
        let req = ImageStatusRequest {
            image: Some(spec(reference)),
            verbose: false,
        };
        Ok(self.client.clone().image_status(req).await?.into_inner().image)
    }

    /// `PullImage`: the image ref the runtime reports (an image ID).
    pub async fn pull(&self, reference: &str, credential: Option<&Credential>) -> Result<String, CallError> {
        let auth = credential.map(|c| AuthConfig {
            username: c.username.clone(),
            password: c.password.clone(),
            auth: c.auth.clone(),
            server_address: String::new(),
            identity_token: c.identity_token.clone(),
            registry_token: c.registry_token.clone(),
        });
        let req = PullImageRequest {
            image: Some(spec(reference)),
            auth,
            sandbox_config: None,
        };
        Ok(self.client.clone().pull_image(req).await?.into_inner().image_ref)
    }
}

fn spec(reference: &str) -> ImageSpec {
    ImageSpec {
        image: reference.to_string(),
        user_specified_image: reference.to_string(),
        ..ImageSpec::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn classifies_errors() {
        assert!(is_transient(Code::Unavailable, "transport error"));
        assert!(is_transient(Code::DeadlineExceeded, ""));
        assert!(is_transient(Code::ResourceExhausted, ""));
        let refused = "failed to pull and unpack image \"127.0.0.1:5000/a:1\": failed to resolve reference \
                       \"127.0.0.1:5000/a:1\": failed to do request: Head \"http://127.0.0.1:5000/v2/a/manifests/1\": \
                       dial tcp 127.0.0.1:5000: connect: connection refused";
        assert!(is_transient(Code::Unknown, refused));
        assert!(is_transient(
            Code::Unknown,
            "unexpected status from GET request: 503 Service Unavailable"
        ));
        assert!(!is_transient(
            Code::Unknown,
            "pulling from host r failed with status code: 401 Unauthorized"
        ));
        assert!(!is_transient(Code::NotFound, "127.0.0.1:5000/a:missing: not found"));
        assert!(!is_transient(Code::Unknown, "something nobody knows"));
        assert!(!is_transient(Code::InvalidArgument, "connection refused"));
    }

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///run/containerd/containerd.sock").unwrap(),
            PathBuf::from("/run/containerd/containerd.sock")
        );
        assert_eq!(socket_path("/x.sock").unwrap(), PathBuf::from("/x.sock"));
        assert!(socket_path("tcp://1.2.3.4:1").is_err());
        assert!(socket_path("unix://rel.sock").is_err());
    }
}
