//! Tag re-resolution for `[daemon] refresh`: which manifest digest does a
//! tag name in its registry now? One `HEAD /v2/<repo>/manifests/<tag>`
//! (distribution API) with the manifest and index media types accepted, and
//! the `Docker-Content-Digest` of the answer (a `GET` and a SHA-256 of the
//! body when a registry leaves it out). A `401` with a `Bearer` challenge is
//! answered with a token from its realm (anonymous, or with the `auths` of
//! `[prefetch] auth_file`); `Basic` with those credentials.
//!
//! Loopback registries (`localhost`, `127.0.0.0/8`, `[::1]`) are spoken to
//! over plain HTTP, as containerd does for them; everything else over
//! HTTPS, proxies from the environment. Credential provider plugins are not
//! consulted here (the prefetch module keeps them private): a registry that
//! needs them resolves only when the plugins' registry also serves
//! anonymous or `auth_file` pulls.

use std::path::Path;
use std::time::Duration;

use sha2::Digest;

use crate::prefetch::{ImageRef, basic_authorization};

const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
/// Largest manifest read when the digest has to be computed.
const MANIFEST_LIMIT: usize = 4 * 1024 * 1024;

/// The registry host requests go to (`docker.io` is served by `registry-1.docker.io`).
fn api_host(registry: &str) -> &str {
    if registry == "docker.io" {
        "registry-1.docker.io"
    } else {
        registry
    }
}

fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => registry.split(':').next().unwrap_or(""),
    };
    host == "localhost" || host == "::1" || host.starts_with("127.")
}

/// `Basic <base64>` for `registry` from a docker config.json's `auths`.
fn basic_auth(auth_file: Option<&Path>, registry: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(auth_file?).ok()?).ok()?;
    let auths = v["auths"].as_object()?;
    let key = |k: &str| {
        let k = k.split_once("://").map_or(k, |(_, r)| r);
        let host = k.split('/').next().unwrap_or(k);
        match host {
            "index.docker.io" | "registry-1.docker.io" => "docker.io".to_string(),
            h => h.to_string(),
        }
    };
    let entry = auths.iter().find(|(k, _)| key(k) == registry)?.1;
    if let Some(a) = entry["auth"].as_str().filter(|a| looks_base64(a)) {
        return Some(format!("Basic {a}"));
    }
    let (u, p) = (entry["username"].as_str()?, entry["password"].as_str()?);
    Some(basic_authorization(u, p))
}

/// Looks like padded standard base64 (what docker's `auth` holds).
fn looks_base64(s: &str) -> bool {
    !s.is_empty()
        && s.len() % 4 == 0
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
}

/// Parses `Bearer realm="…",service="…",scope="…"` into its scheme and parameters.
pub fn challenge(header: &str) -> (String, Vec<(String, String)>) {
    let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = chars.by_ref().take_while(|c| *c != ',').collect();
        }
        params.push((key.trim().to_ascii_lowercase(), value));
    }
    (scheme.to_ascii_lowercase(), params)
}

/// Why a tag could not be resolved (the image's `refresh_error`).
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("not a tag reference")]
    NotATag,
    #[error("cannot build the HTTP client")]
    Client(#[source] reqwest::Error),
    #[error("{method} {url}")]
    Request {
        method: &'static str,
        url: String,
        #[source]
        error: reqwest::Error,
    },
    #[error("HEAD {url}: {status}")]
    Status { url: String, status: reqwest::StatusCode },
    #[error("GET {url}: manifest larger than {} bytes", MANIFEST_LIMIT)]
    TooLarge { url: String },
    #[error("{registry} wants credentials: none in [prefetch] auth_file")]
    NoCredentials { registry: String },
    #[error("Bearer challenge without realm")]
    NoRealm,
    #[error("token from {realm}")]
    Token {
        realm: String,
        #[source]
        error: reqwest::Error,
    },
    #[error("token from {realm}: {status}")]
    TokenStatus { realm: String, status: reqwest::StatusCode },
    #[error("token from {realm}: not JSON")]
    TokenJson {
        realm: String,
        #[source]
        error: serde_json::Error,
    },
    #[error("token response without a token")]
    NoToken,
    #[error("unsupported auth challenge {0:?}")]
    Challenge(String),
}

/// Resolves `image`'s tag to the manifest digest its registry serves now.
pub async fn digest(image: &ImageRef, auth_file: Option<&Path>, bound: Duration) -> Result<String, ResolveError> {
    let tag = image.tag.as_deref().ok_or(ResolveError::NotATag)?;
    let scheme = if is_loopback(&image.registry) { "http" } else { "https" };
    let url = format!(
        "{scheme}://{}/v2/{}/manifests/{tag}",
        api_host(&image.registry),
        image.repository
    );
    let client = reqwest::Client::builder()
        .user_agent(concat!("soci-agent/", env!("CARGO_PKG_VERSION")))
        .timeout(bound)
        .build()
        .map_err(ResolveError::Client)?;
    let basic = basic_auth(auth_file, &image.registry);
    let (resp, auth) = head(&client, &url, basic, image).await?;
    if let Some(d) = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|h| h.to_str().ok())
    {
        return Ok(d.trim().to_string());
    }
    computed_digest(&client, &url, auth).await
}

/// A request for the manifest at `url`, every manifest media type accepted.
fn manifest_request(
    client: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    auth: Option<String>,
) -> reqwest::RequestBuilder {
    let req = client.request(method, url).header("Accept", ACCEPT);
    match auth {
        Some(a) => req.header("Authorization", a),
        None => req,
    }
}

/// `HEAD` of the manifest, a `401` challenge answered once; the answer, and the
/// `Authorization` value it took (if any).
async fn head(
    client: &reqwest::Client,
    url: &str,
    basic: Option<String>,
    image: &ImageRef,
) -> Result<(reqwest::Response, Option<String>), ResolveError> {
    let fail = |error| ResolveError::Request {
        method: "HEAD",
        url: url.to_string(),
        error,
    };
    let head = |auth| manifest_request(client, reqwest::Method::HEAD, url, auth).send();
    let mut auth = None;
    let mut resp = head(None).await.map_err(fail)?;
    if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
        let header = resp
            .headers()
            .get("www-authenticate")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .to_string();
        auth = Some(answer(client, &header, basic, image).await?);
        resp = head(auth.clone()).await.map_err(fail)?;
    }
    if !resp.status().is_success() {
        return Err(ResolveError::Status {
            url: url.to_string(),
            status: resp.status(),
        });
    }
    Ok((resp, auth))
}

/// The digest of the manifest body (`GET`, at most [`MANIFEST_LIMIT`] bytes), for
/// registries that leave `Docker-Content-Digest` out.
async fn computed_digest(client: &reqwest::Client, url: &str, auth: Option<String>) -> Result<String, ResolveError> {
    let fail = |error| ResolveError::Request {
        method: "GET",
        url: url.to_string(),
        error,
    };
    let body = manifest_request(client, reqwest::Method::GET, url, auth)
        .send()
        .await
        .map_err(fail)?
        .bytes()
        .await
        .map_err(fail)?;
    if body.len() > MANIFEST_LIMIT {
        return Err(ResolveError::TooLarge { url: url.to_string() });
    }
    let hex: String = sha2::Sha256::digest(&body).iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("sha256:{hex}"))
}

/// The `Authorization` value answering a `401` challenge.
async fn answer(
    client: &reqwest::Client,
    header: &str,
    basic: Option<String>,
    image: &ImageRef,
) -> Result<String, ResolveError> {
    let (scheme, params) = challenge(header);
    match scheme.as_str() {
        "basic" => basic.ok_or_else(|| ResolveError::NoCredentials {
            registry: image.registry.clone(),
        }),
        "bearer" => bearer_token(client, &params, basic, image).await,
        _ => Err(ResolveError::Challenge(header.to_string())),
    }
}

/// `Bearer <token>` from the challenge's realm (pull scope of the image's repository unless
/// the challenge names one), asked with the `Basic` credentials when there are some.
async fn bearer_token(
    client: &reqwest::Client,
    params: &[(String, String)],
    basic: Option<String>,
    image: &ImageRef,
) -> Result<String, ResolveError> {
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let realm = param("realm").ok_or(ResolveError::NoRealm)?;
    let scope = param("scope").unwrap_or_else(|| format!("repository:{}:pull", image.repository));
    let mut req = client.get(token_url(&realm, &scope, param("service")));
    if let Some(b) = basic {
        req = req.header("Authorization", b);
    }
    let failed = |error| ResolveError::Token {
        realm: realm.clone(),
        error,
    };
    let resp = req.send().await.map_err(failed)?;
    if !resp.status().is_success() {
        return Err(ResolveError::TokenStatus {
            realm: realm.clone(),
            status: resp.status(),
        });
    }
    let body = resp.bytes().await.map_err(failed)?;
    let v: serde_json::Value = serde_json::from_slice(&body).map_err(|error| ResolveError::TokenJson {
        realm: realm.clone(),
        error,
    })?;
    let token = v["token"]
        .as_str()
        .or(v["access_token"].as_str())
        .ok_or(ResolveError::NoToken)?;
    Ok(format!("Bearer {token}"))
}

/// The realm's URL asking for a token of `scope` (for `service`, when the challenge names one).
fn token_url(realm: &str, scope: &str, service: Option<String>) -> String {
    let mut url = format!(
        "{realm}{}scope={}",
        if realm.contains('?') { '&' } else { '?' },
        escape(scope)
    );
    if let Some(s) = service {
        url.push_str(&format!("&service={}", escape(&s)));
    }
    url
}

/// Percent-encodes a query value (RFC 3986 unreserved characters kept).
fn escape(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let (s, p) = challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(s, "bearer");
        assert_eq!(
            p,
            vec![
                ("realm".into(), "https://auth.docker.io/token".into()),
                ("service".into(), "registry.docker.io".into()),
                ("scope".into(), "repository:a/b:pull,push".into())
            ]
        );
        assert_eq!(escape("repository:a/b:pull"), "repository%3Aa%2Fb%3Apull");
        assert_eq!(
            challenge("Basic realm=x").1,
            vec![("realm".to_string(), "x".to_string())]
        );
    }

    #[test]
    fn hosts_and_credentials() {
        assert!(is_loopback("127.0.0.1:5000") && is_loopback("localhost") && is_loopback("[::1]:5000"));
        assert!(!is_loopback("registry.example:5000"));
        assert_eq!(api_host("docker.io"), "registry-1.docker.io");
        assert!(looks_base64("dXNlcjpwYXNz") && !looks_base64("user:pass"));
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("config.json");
        std::fs::write(
            &f,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},"r.example:5000":{"username":"a","password":"b"}}}"#,
        )
        .unwrap();
        assert_eq!(basic_auth(Some(&f), "docker.io").as_deref(), Some("Basic dXNlcjpwYXNz"));
        assert_eq!(basic_auth(Some(&f), "r.example:5000").as_deref(), Some("Basic YTpi"));
        assert_eq!(basic_auth(Some(&f), "other"), None);
    }
}
