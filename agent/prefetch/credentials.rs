//! Pull credentials, looked up per image in this order:
//! 1. an explicit docker `config.json` (`--auth-file`): `auths.<key>` with
//!    `auth` (base64 `user:pass`, passed to CRI as is) or `username`/`password`
//!    (also `identitytoken`, `registrytoken`); keys are matched like kubelet
//!    matches them (`https://index.docker.io/v1/` is `docker.io`);
//! 2. kubelet image credential provider plugins (`CredentialProviderConfig`,
//!    JSON), run through the exec protocol when their `matchImages` match:
//!    a `CredentialProviderRequest` on stdin, a `CredentialProviderResponse`
//!    on stdout whose `auth` keys are matched again; responses are cached in
//!    process by `cacheKeyType` (Image, Registry, Global) for `cacheDuration`
//!    (else the provider's `defaultCacheDuration`; `0` = no cache);
//! 3. anonymous.
//!
//! Secrets never leave this module except inside the CRI request: a
//! [`Credential`]'s `Debug` is redacted and reports name only the source.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::matchimage::matches;
use super::reference::ImageRef;

/// kubelet's bound on one plugin run.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);
const REQUEST_KIND: &str = "CredentialProviderRequest";
const RESPONSE_KIND: &str = "CredentialProviderResponse";
const API_VERSIONS: [&str; 3] = [
    "credentialprovider.kubelet.k8s.io/v1",
    "credentialprovider.kubelet.k8s.io/v1beta1",
    "credentialprovider.kubelet.k8s.io/v1alpha1",
];

/// Registry credentials, mapped 1:1 onto CRI's `AuthConfig`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credential {
    pub username: String,
    pub password: String,
    /// base64 `user:pass`, as in docker's config.json.
    pub auth: String,
    pub identity_token: String,
    pub registry_token: String,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(<redacted>)")
    }
}

impl Credential {
    fn is_empty(&self) -> bool {
        self.username.is_empty()
            && self.auth.is_empty()
            && self.identity_token.is_empty()
            && self.registry_token.is_empty()
    }
}

/// What a lookup found: the credential, where it came from (never the
/// secret), and why a source was skipped, if one was.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    pub credential: Option<Credential>,
    /// `auth-file`, `credential-provider:<name>` or `anonymous`.
    pub source: String,
    pub note: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read auth file {path}")]
    ReadAuthFile { path: PathBuf, source: std::io::Error },
    #[error("auth file {path} is not a docker config.json: {message}")]
    ParseAuthFile { path: PathBuf, message: String },
    #[error("cannot read image credential provider config {path}")]
    ReadProviderConfig { path: PathBuf, source: std::io::Error },
    #[error("image credential provider config {path} is not valid: {message}")]
    ParseProviderConfig { path: PathBuf, message: String },
}

#[derive(Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, DockerAuth>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct DockerAuth {
    auth: String,
    username: String,
    password: String,
    #[serde(rename = "identitytoken")]
    identity_token: String,
    #[serde(rename = "registrytoken")]
    registry_token: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProviderConfigFile {
    kind: Option<String>,
    #[serde(default)]
    providers: Vec<ProviderSpec>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProviderSpec {
    name: String,
    #[serde(default)]
    match_images: Vec<String>,
    default_cache_duration: Option<String>,
    api_version: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    env: Vec<EnvVar>,
}

#[derive(Deserialize)]
struct EnvVar {
    name: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProviderResponse {
    kind: String,
    api_version: String,
    cache_key_type: Option<String>,
    cache_duration: Option<String>,
    #[serde(default)]
    auth: HashMap<String, ResponseAuth>,
}

#[derive(Deserialize)]
struct ResponseAuth {
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
}

/// Pattern -> credential, most specific (reverse-lexicographic, as kubelet
/// sorts) first.
type AuthList = Vec<(String, Credential)>;

struct Provider {
    name: String,
    match_images: Vec<String>,
    default_cache: Duration,
    api_version: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Cache key (`image:..`, `registry:..`, `global`) -> (expiry, auths).
    /// Held across a plugin run, so one provider runs once per key at a time.
    cache: tokio::sync::Mutex<HashMap<String, (Instant, AuthList)>>,
}

/// Every credential source for one run.
#[derive(Default)]
pub struct Keyring {
    auth_file: AuthList,
    providers: Vec<Provider>,
    bin_dir: PathBuf,
    /// Things worth a warning (unsupported credHelpers, ...), no secrets.
    pub warnings: Vec<String>,
}

impl Keyring {
    /// Loads the auth file (when given) and the provider config (when given;
    /// `provider_config_required` false means a missing file is no providers).
    pub fn load(
        auth_file: Option<&Path>,
        provider_config: Option<&Path>,
        provider_config_required: bool,
        bin_dir: &Path,
    ) -> Result<Keyring, CredentialError> {
        let mut ring = Keyring {
            bin_dir: bin_dir.to_path_buf(),
            ..Keyring::default()
        };
        if let Some(path) = auth_file {
            ring.auth_file = load_auth_file(path, &mut ring.warnings)?;
        }
        if let Some(path) = provider_config
            && (provider_config_required || path.exists())
        {
            ring.providers = load_providers(path)?;
        }
        Ok(ring)
    }

    /// The credential for `image` (see the module doc for the order).
    pub async fn lookup(&self, image: &ImageRef) -> Resolved {
        let target = image.repo();
        if let Some(c) = best(&self.auth_file, &target) {
            return Resolved {
                credential: Some(c),
                source: "auth-file".into(),
                note: None,
            };
        }
        let mut notes = Vec::new();
        for p in self
            .providers
            .iter()
            .filter(|p| p.match_images.iter().any(|m| matches(m, &target)))
        {
            match p.provide(&self.bin_dir, &target, &image.registry).await {
                Ok(auths) => match best(&auths, &target) {
                    Some(c) => {
                        return Resolved {
                            credential: Some(c),
                            source: format!("credential-provider:{}", p.name),
                            note: None,
                        };
                    }
                    None => notes.push(format!(
                        "credential provider {} returned no auth matching {target}",
                        p.name
                    )),
                },
                Err(e) => notes.push(format!(
                    "credential provider {}: {}",
                    p.name,
                    crate::exit::error_chain(&e)
                )),
            }
        }
        Resolved {
            credential: None,
            source: "anonymous".into(),
            note: (!notes.is_empty()).then(|| notes.join("; ")),
        }
    }
}

fn best(list: &AuthList, target: &str) -> Option<Credential> {
    list.iter().find(|(k, _)| matches(k, target)).map(|(_, c)| c.clone())
}

fn sort_most_specific(list: &mut AuthList) {
    list.sort_by(|a, b| b.0.cmp(&a.0));
}

/// A docker config key as kubelet reads it: no scheme, docker hub aliases
/// folded into `docker.io`, the legacy `/v1/` path dropped.
fn normalize_key(key: &str) -> String {
    let k = key.split_once("://").map_or(key, |(_, r)| r);
    let (host, path) = k.split_once('/').map_or((k, ""), |(h, p)| (h, p));
    let host = match host {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        h => h,
    };
    let path = path.trim_end_matches('/');
    if path.is_empty() || path == "v1" || path == "v2" {
        host.to_string()
    } else {
        format!("{host}/{path}")
    }
}

fn load_auth_file(path: &Path, warnings: &mut Vec<String>) -> Result<AuthList, CredentialError> {
    let text = std::fs::read(path).map_err(|source| CredentialError::ReadAuthFile {
        path: path.to_path_buf(),
        source,
    })?;
    let cfg: DockerConfig = serde_json::from_slice(&text).map_err(|e| CredentialError::ParseAuthFile {
        path: path.to_path_buf(),
        // serde_json's message names the position, never the value.
        message: e.to_string(),
    })?;
    if !cfg.cred_helpers.is_empty() || cfg.creds_store.is_some() {
        warnings.push(format!(
            "auth file {}: credHelpers/credsStore are not supported; only auths entries are used",
            path.display()
        ));
    }
    let mut list: AuthList = cfg
        .auths
        .into_iter()
        .map(|(k, a)| {
            let c = Credential {
                username: a.username,
                password: a.password,
                auth: a.auth,
                identity_token: a.identity_token,
                registry_token: a.registry_token,
            };
            (normalize_key(&k), c)
        })
        .filter(|(_, c)| !c.is_empty())
        .collect();
    sort_most_specific(&mut list);
    Ok(list)
}

/// The provider config (JSON `CredentialProviderConfig`), every provider checked.
fn load_providers(path: &Path) -> Result<Vec<Provider>, CredentialError> {
    let text = std::fs::read_to_string(path).map_err(|source| CredentialError::ReadProviderConfig {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |message: String| invalid_provider_config(path, message);
    if !text.trim_start().starts_with('{') {
        return Err(invalid(
            "YAML is not supported; write the JSON form (the EKS AMI's)".into(),
        ));
    }
    let file: ProviderConfigFile = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    if let Some(kind) = &file.kind
        && kind != "CredentialProviderConfig"
    {
        return Err(invalid(format!("kind {kind:?} is not CredentialProviderConfig")));
    }
    file.providers.into_iter().map(|p| provider(path, p)).collect()
}

/// The error for a provider config at `path` that is not valid.
fn invalid_provider_config(path: &Path, message: String) -> CredentialError {
    CredentialError::ParseProviderConfig {
        path: path.to_path_buf(),
        message,
    }
}

/// One provider entry of the config at `path`, checked (name, matchImages, apiVersion, cache).
fn provider(path: &Path, p: ProviderSpec) -> Result<Provider, CredentialError> {
    let invalid = |message: String| invalid_provider_config(path, message);
    if p.name.is_empty() || p.name.contains('/') || p.name == "." || p.name == ".." {
        return Err(invalid(format!("provider name {:?} is not a file name", p.name)));
    }
    if p.match_images.is_empty() {
        return Err(invalid(format!("provider {}: matchImages is empty", p.name)));
    }
    if !API_VERSIONS.contains(&p.api_version.as_str()) {
        return Err(invalid(format!(
            "provider {}: apiVersion {:?} is not one of {API_VERSIONS:?}",
            p.name, p.api_version
        )));
    }
    let default_cache = match &p.default_cache_duration {
        None => Duration::ZERO,
        Some(d) => go_duration(d).ok_or_else(|| {
            invalid(format!(
                "provider {}: defaultCacheDuration {d:?} is not a duration",
                p.name
            ))
        })?,
    };
    Ok(Provider {
        name: p.name,
        match_images: p.match_images,
        default_cache,
        api_version: p.api_version,
        args: p.args,
        env: p.env.into_iter().map(|e| (e.name, e.value)).collect(),
        cache: tokio::sync::Mutex::new(HashMap::new()),
    })
}

/// Why a credential provider plugin gave no usable answer (a lookup note).
#[derive(Debug, thiserror::Error)]
enum ProviderError {
    #[error("cannot run {}", program.display())]
    Spawn {
        program: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("{program} did not answer within {:?}", PLUGIN_TIMEOUT)]
    Timeout { program: PathBuf },
    #[error("waiting for {}", program.display())]
    Wait {
        program: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: PathBuf,
        status: std::process::ExitStatus,
        /// The end of what it wrote to stderr.
        stderr: String,
    },
    #[error("{name}: response is not valid JSON")]
    Json {
        name: String,
        #[source]
        error: serde_json::Error,
    },
    #[error("response kind {0:?} is not {RESPONSE_KIND}", RESPONSE_KIND = RESPONSE_KIND)]
    Kind(String),
    #[error("response apiVersion {got:?} is not the configured {want:?}")]
    ApiVersion { got: String, want: String },
    #[error("cacheDuration {0:?} is not a duration")]
    CacheDuration(String),
    #[error("cacheKeyType {0:?} is not Image, Registry or Global")]
    CacheKeyType(Option<String>),
}

impl Provider {
    /// The auths for `image`: cached by image, registry or globally, else from a plugin run.
    async fn provide(&self, bin_dir: &Path, image: &str, registry: &str) -> Result<AuthList, ProviderError> {
        let keys = [
            format!("image:{image}"),
            format!("registry:{registry}"),
            "global".to_string(),
        ];
        let mut cache = self.cache.lock().await;
        let now = Instant::now();
        cache.retain(|_, (expiry, _)| *expiry > now);
        if let Some((_, auths)) = keys.iter().find_map(|k| cache.get(k)) {
            return Ok(auths.clone());
        }
        let response = self.exec(bin_dir, image).await?;
        let ttl = match &response.cache_duration {
            Some(d) => go_duration(d).ok_or_else(|| ProviderError::CacheDuration(d.clone()))?,
            None => self.default_cache,
        };
        let key = cache_key(&keys, response.cache_key_type.as_deref())?;
        let mut auths: AuthList = response
            .auth
            .into_iter()
            .map(|(k, a)| {
                let c = Credential {
                    username: a.username,
                    password: a.password,
                    ..Credential::default()
                };
                (k, c)
            })
            .collect();
        sort_most_specific(&mut auths);
        if !ttl.is_zero() {
            cache.insert(key, (now + ttl, auths.clone()));
        }
        Ok(auths)
    }

    /// Runs the plugin (exec protocol) and checks its response.
    async fn exec(&self, bin_dir: &Path, image: &str) -> Result<ProviderResponse, ProviderError> {
        let program = bin_dir.join(&self.name);
        let out = self.run(&program, image).await?;
        if !out.status.success() {
            return Err(ProviderError::Failed {
                stderr: stderr_tail(&out.stderr),
                status: out.status,
                program,
            });
        }
        self.response(&out.stdout)
    }

    /// Runs `program` with one request for `image` on stdin; its output, within [`PLUGIN_TIMEOUT`].
    async fn run(&self, program: &Path, image: &str) -> Result<std::process::Output, ProviderError> {
        let request = serde_json::json!({
            "apiVersion": self.api_version,
            "kind": REQUEST_KIND,
            "image": image,
        });
        let mut child = tokio::process::Command::new(program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| ProviderError::Spawn {
                program: program.to_path_buf(),
                error,
            })?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let body = request.to_string();
        let run = async move {
            // A plugin may exit without reading its stdin: a broken pipe is its business.
            let _ = stdin.write_all(body.as_bytes()).await;
            drop(stdin);
            child.wait_with_output().await
        };
        tokio::time::timeout(PLUGIN_TIMEOUT, run)
            .await
            .map_err(|_| ProviderError::Timeout {
                program: program.to_path_buf(),
            })?
            .map_err(|error| ProviderError::Wait {
                program: program.to_path_buf(),
                error,
            })
    }

    /// The plugin's stdout as a response of the kind and apiVersion configured.
    fn response(&self, stdout: &[u8]) -> Result<ProviderResponse, ProviderError> {
        // serde_json's error names a position, never the content.
        let resp: ProviderResponse = serde_json::from_slice(stdout).map_err(|error| ProviderError::Json {
            name: self.name.clone(),
            error,
        })?;
        if resp.kind != RESPONSE_KIND {
            return Err(ProviderError::Kind(resp.kind));
        }
        if resp.api_version != self.api_version {
            return Err(ProviderError::ApiVersion {
                got: resp.api_version,
                want: self.api_version.clone(),
            });
        }
        Ok(resp)
    }
}

/// Which of `keys` (image, registry, global) a response's `cacheKeyType` names.
fn cache_key(keys: &[String; 3], kind: Option<&str>) -> Result<String, ProviderError> {
    match kind {
        Some("Image") => Ok(keys[0].clone()),
        Some("Registry") => Ok(keys[1].clone()),
        Some("Global") => Ok(keys[2].clone()),
        other => Err(ProviderError::CacheKeyType(other.map(str::to_string))),
    }
}

/// The last 300 characters of a plugin's stderr, trimmed.
fn stderr_tail(stderr: &[u8]) -> String {
    let stderr = String::from_utf8_lossy(stderr);
    stderr
        .trim()
        .chars()
        .rev()
        .take(300)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect()
}

/// The `Basic` `Authorization` header value for a username and password.
pub(crate) fn basic_authorization(username: &str, password: &str) -> String {
    format!("Basic {}", base64(format!("{username}:{password}").as_bytes()))
}

/// Standard base64 with padding (for one header value).
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A Go `time.Duration` string (`12h`, `1h30m`, `1.5s`, `300ms`, `0`).
pub fn go_duration(text: &str) -> Option<Duration> {
    let s = text.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s.strip_prefix('+').unwrap_or(s);
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += number * scale;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_authorization_is_padded_base64() {
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(basic_authorization("user", "pass"), "Basic dXNlcjpwYXNz");
    }

    #[test]
    fn durations() {
        assert_eq!(go_duration("12h"), Some(Duration::from_secs(43200)));
        assert_eq!(go_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(go_duration("0"), Some(Duration::ZERO));
        assert_eq!(go_duration("0s"), Some(Duration::ZERO));
        assert_eq!(go_duration("300ms"), Some(Duration::from_millis(300)));
        for bad in ["", "12", "h", "1x", "-1s", "1h-"] {
            assert_eq!(go_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn docker_config_keys() {
        assert_eq!(normalize_key("https://index.docker.io/v1/"), "docker.io");
        assert_eq!(normalize_key("http://127.0.0.1:5000"), "127.0.0.1:5000");
        assert_eq!(normalize_key("registry.example/team/"), "registry.example/team");
        assert!(format!("{:?}", Credential::default()).contains("redacted"));
    }
}
