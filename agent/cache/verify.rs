//! `cache verify`: which images of the manifest this node has, through CRI
//! `ImageStatus` (what kubelet will ask). Library entry [`verify`] returns
//! the report; `boot` uses its misses as the prefetch list.

use std::time::Instant;

use clap::Args;
use serde::Serialize;

use super::manifest::{Manifest, incompatibility};
use super::{Common, manifest_path, node};
use crate::rootfs::Root;

pub const EXIT_ALL_HIT: u8 = 0;
pub const EXIT_SOME_MISS: u8 = 4;
pub const EXIT_NO_MANIFEST: u8 = 2;

#[derive(Debug, Clone, Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub common: Common,
    /// CRI endpoint to ask. [default: containerd's socket]
    #[arg(long, value_name = "ENDPOINT")]
    pub cri_endpoint: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ImageCheck {
    pub image: String,
    pub digest: String,
    pub hit: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub command: &'static str,
    pub exit_code: u8,
    pub manifest: String,
    /// When the builder sealed the cache, and with what.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub built_with: Option<String>,
    pub images: Vec<ImageCheck>,
    pub hits: usize,
    pub misses: usize,
    pub warnings: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub seconds: f64,
}

impl VerifyReport {
    fn new() -> Self {
        VerifyReport {
            command: "cache verify",
            exit_code: EXIT_ALL_HIT,
            manifest: manifest_path(),
            created: None,
            built_with: None,
            images: Vec::new(),
            hits: 0,
            misses: 0,
            warnings: Vec::new(),
            error: None,
            seconds: 0.0,
        }
    }

    /// The images to prefetch: every miss.
    pub fn missing(&self) -> Vec<String> {
        self.images.iter().filter(|i| !i.hit).map(|i| i.image.clone()).collect()
    }

    pub fn to_text(&self) -> String {
        let mut out = String::new();
        if let Some(e) = &self.error {
            out.push_str(&format!("soci-agent cache verify: {e}\n"));
        }
        for w in &self.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        for i in &self.images {
            out.push_str(&format!(
                "  {:<5} {} {}\n",
                if i.hit { "hit" } else { "miss" },
                i.image,
                i.detail
            ));
        }
        if self.error.is_none() {
            out.push_str(&format!(
                "cache {}: {} hit, {} miss{} ({:.2}s)\n",
                self.manifest,
                self.hits,
                self.misses,
                self.built_with.as_deref().map(|b| format!("; {b}")).unwrap_or_default(),
                self.seconds
            ));
        }
        out
    }
}

/// Why there is no manifest to verify against (the report's `error`, exit 2).
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("no cache manifest at {path}: no data volume mounted, or it was never sealed (soci-agent cache seal)")]
    Missing { path: String },
    #[error(transparent)]
    Read(crate::rootfs::FsError),
    #[error(transparent)]
    Invalid(#[from] super::manifest::ManifestError),
}

/// The manifest under `root`.
fn load(root: &Root) -> Result<Manifest, LoadError> {
    let path = manifest_path();
    match root.read_string_opt(&path) {
        Ok(Some(text)) => Ok(Manifest::parse(&path, &text)?),
        Ok(None) => Err(LoadError::Missing { path }),
        Err(e) => Err(LoadError::Read(e)),
    }
}

/// Reads the manifest under `root` and checks each image through CRI.
pub async fn verify(root: &Root, cri_endpoint: Option<&str>) -> VerifyReport {
    let started = Instant::now();
    let mut report = VerifyReport::new();
    let m = match load(root) {
        Ok(m) => m,
        Err(e) => {
            report.error = Some(crate::exit::error_chain(&e));
            report.exit_code = EXIT_NO_MANIFEST;
            report.seconds = started.elapsed().as_secs_f64();
            return report;
        }
    };
    report.created = Some(m.created.clone());
    report.built_with = Some(format!(
        "sealed {} with containerd {}, SOCI {}, soci-agent {}",
        m.created, m.containerd_version, m.soci_version, m.agent_version
    ));
    let versions = node::versions(root).await;
    let unreadable = incompatibility(&m, versions.containerd.as_deref(), versions.soci.as_deref());
    if let Some(why) = &unreadable {
        // `cache mount` then bound fresh directories: CRI only finds what was pulled since.
        report.warnings.push(format!(
            "{why}: the cached copies are not used on this node (the daemons run on fresh directories of the \
             volume); missing images are prefetched instead"
        ));
    }
    let client = node::cri(root, cri_endpoint);
    for img in &m.images {
        let (hit, detail) = match &client {
            Err(e) => (false, crate::exit::error_chain(e)),
            Ok(c) => match node::status(c, &img.image).await {
                Ok(Some(found)) if found.id == img.digest => (true, format!("{} present", short(&found.id))),
                Ok(Some(found)) => (
                    false,
                    format!(
                        "present as {}, the manifest says {}",
                        short(&found.id),
                        short(&img.digest)
                    ),
                ),
                Ok(None) => (false, "not found through CRI".to_string()),
                Err(e) => (false, crate::exit::error_chain(&e)),
            },
        };
        report.images.push(ImageCheck {
            image: img.image.clone(),
            digest: img.digest.clone(),
            hit,
            detail,
        });
    }
    report.hits = report.images.iter().filter(|i| i.hit).count();
    report.misses = report.images.len() - report.hits;
    if report.misses > 0 {
        report.exit_code = EXIT_SOME_MISS;
    }
    report.seconds = started.elapsed().as_secs_f64();
    report
}

fn short(id: &str) -> &str {
    let hex = id.strip_prefix("sha256:").unwrap_or(id);
    &hex[..hex.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_a_manifest_exit_2_and_bad_json_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        let r = verify(&root, None).await;
        assert_eq!(r.exit_code, EXIT_NO_MANIFEST);
        assert!(r.error.as_deref().unwrap().contains("no cache manifest"), "{r:?}");
        let p = root.path(manifest_path());
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, "{not json").unwrap();
        let r = verify(&root, None).await;
        assert_eq!(r.exit_code, EXIT_NO_MANIFEST);
        assert!(r.to_text().contains("not valid JSON"), "{}", r.to_text());
    }
}
