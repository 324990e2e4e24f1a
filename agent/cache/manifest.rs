//! `soci-agent-cache.json`, the manifest `cache seal` writes at the data
//! volume's top: which images the volume holds (digest, platform), which
//! containerd and SOCI wrote it, and when. `cache verify` and `boot` read it.
//! Pure: parse, render, and the compatibility rule.

use serde::{Deserialize, Serialize};

/// Bumped when a field changes meaning; a newer schema is refused.
pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedImage {
    /// The reference as the builder pulled it (normalized).
    pub image: String,
    /// containerd's image id (`sha256:` of the config) as CRI reported it.
    pub digest: String,
    /// Repo digests CRI reported (`repo@sha256:...`).
    #[serde(default)]
    pub repo_digests: Vec<String>,
    /// `os/arch` of the builder (CRI pulls the node's platform).
    pub platform: String,
    /// Unpacked size CRI reported, bytes.
    #[serde(default)]
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filesystem {
    /// ext4 or xfs.
    pub kind: String,
    #[serde(default)]
    pub label: String,
    #[serde(default)]
    pub uuid: String,
    pub size_bytes: u64,
    pub used_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema: u32,
    pub images: Vec<CachedImage>,
    /// containerd's version on the builder (e.g. `2.4.2`).
    pub containerd_version: String,
    /// SOCI's version on the builder (e.g. `0.16.1`).
    pub soci_version: String,
    pub agent_version: String,
    /// RFC 3339, UTC.
    pub created: String,
    pub filesystem: Filesystem,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cache manifest {path} is not valid JSON of a soci-agent cache manifest: {message}")]
    Parse { path: String, message: String },
    #[error("cache manifest {path} has schema {found}; this soci-agent reads schema {SCHEMA} (upgrade soci-agent)")]
    Schema { path: String, found: u32 },
}

impl Manifest {
    /// Parses the manifest text read from `path` (named in errors).
    pub fn parse(path: &str, text: &str) -> Result<Manifest, ManifestError> {
        let m: Manifest = serde_json::from_str(text).map_err(|e| ManifestError::Parse {
            path: path.to_string(),
            message: e.to_string(),
        })?;
        if m.schema > SCHEMA {
            return Err(ManifestError::Schema {
                path: path.to_string(),
                found: m.schema,
            });
        }
        Ok(m)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("manifest serializes") + "\n"
    }
}

/// `MAJOR.MINOR` of a version string (`v2.4.2`, `2.2.9`, `0.16.1`).
fn major_minor(v: &str) -> Option<(u32, u32)> {
    let t = v.trim().strip_prefix('v').unwrap_or(v.trim());
    let mut it = t.split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.chars().take_while(char::is_ascii_digit).collect::<String>();
    Some((major, minor.parse().ok()?))
}

/// Whether this node's daemons can read what the manifest's daemons wrote.
/// `None` when they can; else why not (the caller warns and falls back to
/// prefetch). containerd keeps one on-disk format (bolt metadata, content
/// store, snapshot layout) within a major version; SOCI's bolt metadata and
/// snapshot layout only grow: a node SOCI at least as new as the builder's
/// reads it, an older one may not. Unknown node versions are given the
/// benefit of the doubt (noted by the caller through `ImageStatus` anyway).
pub fn incompatibility(m: &Manifest, node_containerd: Option<&str>, node_soci: Option<&str>) -> Option<String> {
    if let (Some(node), Some(built)) = (
        node_containerd.and_then(major_minor),
        major_minor(&m.containerd_version),
    ) && node.0 != built.0
    {
        return Some(format!(
            "the cache was written by containerd {} and this node runs containerd {}: a different major version \
             does not read the other's on-disk metadata",
            m.containerd_version,
            node_containerd.unwrap_or("?")
        ));
    }
    if let (Some(node), Some(built)) = (node_soci.and_then(major_minor), major_minor(&m.soci_version))
        && node < built
    {
        return Some(format!(
            "the cache was written by SOCI {} and this node runs SOCI {}: an older SOCI may not read a newer one's \
             snapshot metadata",
            m.soci_version,
            node_soci.unwrap_or("?")
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        Manifest {
            schema: SCHEMA,
            images: vec![CachedImage {
                image: "127.0.0.1:5000/big:v1".into(),
                digest: "sha256:abc".into(),
                repo_digests: vec!["127.0.0.1:5000/big@sha256:def".into()],
                platform: "linux/amd64".into(),
                size: 42,
            }],
            containerd_version: "2.4.2".into(),
            soci_version: "0.16.1".into(),
            agent_version: "0.1.0".into(),
            created: "2026-12-05T08:00:00Z".into(),
            filesystem: Filesystem {
                kind: "ext4".into(),
                label: "soci-cache".into(),
                uuid: "u".into(),
                size_bytes: 3 << 30,
                used_bytes: 1 << 30,
            },
        }
    }

    #[test]
    fn round_trips_and_names_the_file_on_errors() {
        let m = sample();
        assert_eq!(Manifest::parse("/v/m.json", &m.to_json()).unwrap(), m);
        let e = Manifest::parse("/v/m.json", "not json").unwrap_err().to_string();
        assert!(e.contains("/v/m.json") && e.contains("not valid JSON"), "{e}");
        let newer = m.to_json().replace("\"schema\": 1", "\"schema\": 9");
        let e = Manifest::parse("/v/m.json", &newer).unwrap_err().to_string();
        assert!(e.contains("schema 9"), "{e}");
    }

    #[test]
    fn compatibility_rule() {
        let m = sample();
        assert_eq!(incompatibility(&m, Some("2.2.9"), Some("0.16.1")), None);
        assert_eq!(incompatibility(&m, Some("v2.4.2"), Some("0.17.0")), None);
        assert_eq!(incompatibility(&m, None, None), None);
        let e = incompatibility(&m, Some("1.7.27"), Some("0.16.1")).unwrap();
        assert!(e.contains("containerd 2.4.2") && e.contains("1.7.27"), "{e}");
        let e = incompatibility(&m, Some("2.4.2"), Some("0.15.0")).unwrap();
        assert!(e.contains("SOCI 0.16.1") && e.contains("0.15.0"), "{e}");
    }
}
