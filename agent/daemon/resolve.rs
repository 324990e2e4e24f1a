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

use base64_lite::{decode_ok, encode};
use sha2::Digest;

use crate::prefetch::ImageRef;

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
    if let Some(a) = entry["auth"].as_str().filter(|a| decode_ok(a)) {
        return Some(format!("Basic {a}"));
    }
    let (u, p) = (entry["username"].as_str()?, entry["password"].as_str()?);
    Some(format!("Basic {}", encode(format!("{u}:{p}").as_bytes())))
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

/// Resolves `image`'s tag to the manifest digest its registry serves now.
pub async fn digest(image: &ImageRef, auth_file: Option<&Path>, bound: Duration) -> Result<String, String> {
    let tag = image.tag.as_deref().ok_or("not a tag reference")?;
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
        .map_err(|e| format!("HTTP client: {e}"))?;
    let basic = basic_auth(auth_file, &image.registry);
    let send = |method: reqwest::Method, auth: Option<String>| {
        let mut req = client.request(method, &url).header("Accept", ACCEPT);
        if let Some(a) = auth {
            req = req.header("Authorization", a);
        }
        req.send()
    };
    let fail = |e: reqwest::Error| format!("HEAD {url}: {e}");
    let mut auth = None;
    let mut resp = send(reqwest::Method::HEAD, None).await.map_err(fail)?;
    if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
        let header = resp
            .headers()
            .get("www-authenticate")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("")
            .to_string();
        auth = Some(answer(&client, &header, basic.clone(), image).await?);
        resp = send(reqwest::Method::HEAD, auth.clone()).await.map_err(fail)?;
    }
    if !resp.status().is_success() {
        return Err(format!("HEAD {url}: {}", resp.status()));
    }
    if let Some(d) = resp
        .headers()
        .get("docker-content-digest")
        .and_then(|h| h.to_str().ok())
    {
        return Ok(d.trim().to_string());
    }
    let body = send(reqwest::Method::GET, auth)
        .await
        .map_err(|e| format!("GET {url}: {e}"))?
        .bytes()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if body.len() > MANIFEST_LIMIT {
        return Err(format!("GET {url}: manifest larger than {MANIFEST_LIMIT} bytes"));
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
) -> Result<String, String> {
    let (scheme, params) = challenge(header);
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    match scheme.as_str() {
        "basic" => basic.ok_or_else(|| format!("{} wants credentials: none in [prefetch] auth_file", image.registry)),
        "bearer" => {
            let realm = param("realm").ok_or("Bearer challenge without realm")?;
            let scope = param("scope").unwrap_or_else(|| format!("repository:{}:pull", image.repository));
            let mut url = format!(
                "{realm}{}scope={}",
                if realm.contains('?') { '&' } else { '?' },
                escape(&scope)
            );
            if let Some(s) = param("service") {
                url.push_str(&format!("&service={}", escape(&s)));
            }
            let mut req = client.get(&url);
            if let Some(b) = basic {
                req = req.header("Authorization", b);
            }
            let resp = req.send().await.map_err(|e| format!("token from {realm}: {e}"))?;
            if !resp.status().is_success() {
                return Err(format!("token from {realm}: {}", resp.status()));
            }
            let body = resp.bytes().await.map_err(|e| format!("token from {realm}: {e}"))?;
            let v: serde_json::Value =
                serde_json::from_slice(&body).map_err(|e| format!("token from {realm}: not JSON: {e}"))?;
            let token = v["token"]
                .as_str()
                .or(v["access_token"].as_str())
                .ok_or("token response without a token")?;
            Ok(format!("Bearer {token}"))
        }
        _ => Err(format!("unsupported auth challenge {header:?}")),
    }
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

/// Standard base64, just what the `Basic` header needs.
mod base64_lite {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                out.push(if i <= chunk.len() {
                    T[(n >> (18 - 6 * i)) as usize & 63] as char
                } else {
                    '='
                });
            }
        }
        out
    }

    /// Looks like base64 (what docker's `auth` holds).
    pub fn decode_ok(s: &str) -> bool {
        !s.is_empty() && s.len() % 4 == 0 && s.bytes().all(|b| T.contains(&b) || b == b'=')
    }
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
        assert_eq!(encode(b"user:pass"), "dXNlcjpwYXNz");
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
