//! containerd's registry host files (`config_path`, e.g.
//! `/etc/containerd/certs.d/<registry>/hosts.toml`) and what SOCI can be
//! told of them. Pure: the caller reads the files.
//!
//! SOCI does not read these files. In parallel mode it resolves manifests
//! through its own `[resolver.host."REGISTRY"]` mirrors, but builds layer
//! URLs from the image's own registry (see `reference/soci.md`). So install
//! carries what SOCI honours into its config: a registry served over plain
//! HTTP, and each mirror host (plain HTTP ones `insecure`). What it cannot
//! carry (layers through a mirror, `skip_verify`, the `_default` directory,
//! per-host headers or CA files) is listed for doctor to warn about.

use std::collections::BTreeMap;

/// One registry's `hosts.toml`, as far as SOCI is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryHosts {
    /// The directory name: the registry host as images name it (`docker.io`, `10.0.0.5:5000`).
    pub registry: String,
    /// `server`, when set.
    pub server: Option<String>,
    /// Each `[host."URL"]`, in file order.
    pub hosts: Vec<HostEntry>,
}

/// One `[host."URL"]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    pub url: String,
    /// `skip_verify = true` (TLS not verified).
    pub skip_verify: bool,
}

/// A mirror as SOCI's resolver takes it: `host` is a URL (SOCI parses it as
/// one and keeps its host and path; a bare `host:port` does not parse), plain
/// HTTP when `insecure`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SociMirror {
    pub host: String,
    pub insecure: bool,
}

/// A `hosts.toml` that cannot be read as one.
#[derive(Debug, thiserror::Error)]
#[error("{registry}/hosts.toml: {message}")]
pub struct HostsError {
    pub registry: String,
    pub message: String,
}

/// Reads one registry's `hosts.toml` (`registry` is its directory name).
pub fn parse(registry: &str, text: &str) -> Result<RegistryHosts, HostsError> {
    let bad = |message: String| HostsError {
        registry: registry.to_string(),
        message,
    };
    let doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| bad(e.to_string()))?;
    let server = doc.get("server").and_then(|v| v.as_str()).map(str::to_string);
    let mut hosts = Vec::new();
    if let Some(table) = doc.get("host").and_then(|h| h.as_table_like()) {
        for (url, entry) in table.iter() {
            let skip_verify = entry.get("skip_verify").and_then(|v| v.as_bool()).unwrap_or(false);
            hosts.push(HostEntry {
                url: url.to_string(),
                skip_verify,
            });
        }
    }
    Ok(RegistryHosts {
        registry: registry.to_string(),
        server,
        hosts,
    })
}

/// `host[:port]` of a URL (`http://m.example:5000/v2` -> `m.example:5000`), and whether it is plain HTTP.
fn host_of(url: &str) -> Option<(String, bool)> {
    let (scheme, rest) = url.split_once("://").unwrap_or(("https", url));
    let host = rest.split('/').next().filter(|h| !h.is_empty())?;
    Some((host.to_string(), scheme.eq_ignore_ascii_case("http")))
}

impl RegistryHosts {
    /// What SOCI's resolver can be told: every host entry (the registry
    /// itself included, when it is served over plain HTTP), in file order,
    /// then a plain-HTTP `server`. Empty for `_default` (SOCI has no
    /// catch-all) and for a registry reached over https with no mirror.
    pub fn soci_mirrors(&self) -> Vec<SociMirror> {
        if self.registry == "_default" {
            return Vec::new();
        }
        let mut out: Vec<SociMirror> = Vec::new();
        let mut seen = Vec::new();
        let plain_server = self
            .server
            .as_deref()
            .filter(|s| host_of(s).is_some_and(|(_, http)| http));
        let entries = self.hosts.iter().map(|h| h.url.as_str()).chain(plain_server);
        for url in entries {
            let Some((host, insecure)) = host_of(url) else { continue };
            let is_self_https = host == self.registry && !insecure;
            if is_self_https || seen.contains(&host) {
                continue;
            }
            let scheme = if insecure { "http" } else { "https" };
            let rest = url.split_once("://").map_or(url, |(_, r)| r).trim_end_matches('/');
            out.push(SociMirror {
                host: format!("{scheme}://{rest}"),
                insecure,
            });
            seen.push(host);
        }
        out
    }

    /// Mirrors other than the registry itself: SOCI fetches layers past them.
    pub fn mirrors(&self) -> Vec<String> {
        let entries = self.hosts.iter().filter_map(|h| host_of(&h.url));
        entries.map(|(h, _)| h).filter(|h| *h != self.registry).collect()
    }

    /// What SOCI cannot take over from this file, one phrase each.
    pub fn not_carried(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.registry == "_default" && !self.hosts.is_empty() {
            out.push("_default/hosts.toml (SOCI has no catch-all resolver)".to_string());
        }
        for h in self.hosts.iter().filter(|h| h.skip_verify) {
            out.push(format!("{}: skip_verify (SOCI verifies TLS)", h.url));
        }
        out
    }
}

/// containerd's `config_path` for the CRI registry (`None` when unset):
/// version 2 reads it from the `io.containerd.grpc.v1.cri` plugin, 3 and 4
/// from `io.containerd.cri.v1.images`.
pub fn config_path(containerd_config: &toml_edit::DocumentMut) -> Option<String> {
    let plugins = containerd_config.get("plugins")?;
    ["io.containerd.cri.v1.images", "io.containerd.grpc.v1.cri"]
        .iter()
        .find_map(|p| plugins.get(p)?.get("registry")?.get("config_path")?.as_str())
        .map(str::to_string)
}

/// Every registry with something for SOCI, by registry.
pub fn soci_resolver(all: &[RegistryHosts]) -> BTreeMap<String, Vec<SociMirror>> {
    all.iter()
        .map(|r| (r.registry.clone(), r.soci_mirrors()))
        .filter(|(_, m)| !m.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_through_cache_and_a_plain_http_registry() {
        let docker = parse(
            "docker.io",
            "server = \"https://registry-1.docker.io\"\n\n\
             [host.\"https://mirror.example.com\"]\n  capabilities = [\"pull\", \"resolve\"]\n\n\
             [host.\"http://10.0.0.9:5000/v2\"]\n  capabilities = [\"pull\"]\n  skip_verify = true\n",
        )
        .unwrap();
        assert_eq!(
            docker.soci_mirrors(),
            [
                SociMirror {
                    host: "https://mirror.example.com".into(),
                    insecure: false
                },
                SociMirror {
                    host: "http://10.0.0.9:5000/v2".into(),
                    insecure: true
                },
            ]
        );
        assert_eq!(docker.mirrors(), ["mirror.example.com", "10.0.0.9:5000"]);
        assert_eq!(docker.not_carried().len(), 1);

        let plain = parse(
            "10.0.0.5:5000",
            "server = \"http://10.0.0.5:5000\"\n[host.\"http://10.0.0.5:5000\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        )
        .unwrap();
        assert_eq!(
            plain.soci_mirrors(),
            [SociMirror {
                host: "http://10.0.0.5:5000".into(),
                insecure: true
            }]
        );
        assert!(plain.mirrors().is_empty(), "the registry itself is no mirror");

        let https_only = parse("ghcr.io", "server = \"https://ghcr.io\"\n").unwrap();
        assert!(https_only.soci_mirrors().is_empty());
        let resolver = soci_resolver(&[docker, plain, https_only]);
        assert_eq!(resolver.keys().collect::<Vec<_>>(), ["10.0.0.5:5000", "docker.io"]);
    }

    #[test]
    fn config_path_in_each_format_and_a_bad_file() {
        let v3: toml_edit::DocumentMut =
            "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\nconfig_path = '/etc/containerd/certs.d'\n"
                .parse()
                .unwrap();
        assert_eq!(config_path(&v3).as_deref(), Some("/etc/containerd/certs.d"));
        let v2: toml_edit::DocumentMut =
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/x\"\n"
                .parse()
                .unwrap();
        assert_eq!(config_path(&v2).as_deref(), Some("/x"));
        assert_eq!(config_path(&"version = 3\n".parse().unwrap()), None);
        let err = parse("r", "server = \n").unwrap_err();
        assert!(err.to_string().starts_with("r/hosts.toml: "), "{err}");
    }
}
