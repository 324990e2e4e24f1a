//! The versioned release store: `/usr/local/lib/soci-agent/releases/{VER}-{ARCH}/`
//! holding the verified binaries and `release.json`, the record of what was
//! verified (archive digest, per-file digests). A store entry is complete or
//! absent: it is extracted into a temp sibling and renamed into place.

use crate::paths::STORE_DIR;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::release::{Arch, Flavor, ReleaseSpec, Sha256Hex};
use crate::rootfs::Root;

pub const MANIFEST: &str = "release.json";

/// `release.json`: what was verified when the entry was installed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: String,
    pub arch: Arch,
    pub flavor: Flavor,
    pub archive_name: String,
    pub archive_sha256: Sha256Hex,
    /// Where the digest came from: "pinned", a checksum URL or a file path.
    pub verified_against: String,
    /// File name -> SHA-256 of its content.
    pub files: BTreeMap<String, Sha256Hex>,
}

impl Manifest {
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("manifest serializes");
        s.push('\n');
        s
    }
}

/// Node path of a store entry.
pub fn entry_dir(spec: &ReleaseSpec) -> String {
    format!("{STORE_DIR}/{}", spec.store_name())
}

/// Why an existing store entry cannot be kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryState {
    Missing,
    /// Complete, and every file still hashes to its recorded digest.
    Valid(Manifest),
    Stale(String),
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<Sha256Hex> {
    let mut f = std::fs::File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Sha256Hex::from_bytes(&h.finalize()))
}

/// Checks the entry for `spec` against its manifest, the flavor and, when
/// known, the expected archive digest.
pub fn inspect(root: &Root, spec: &ReleaseSpec, expected: Option<&Sha256Hex>) -> EntryState {
    let dir = root.path(entry_dir(spec));
    let text = match std::fs::read_to_string(dir.join(MANIFEST)) {
        Ok(t) => t,
        Err(_) if !dir.exists() => return EntryState::Missing,
        Err(e) => return EntryState::Stale(format!("{MANIFEST} unreadable: {e}")),
    };
    let m: Manifest = match serde_json::from_str(&text) {
        Ok(m) => m,
        Err(e) => return EntryState::Stale(format!("{MANIFEST} invalid: {e}")),
    };
    if m.version != spec.version.to_string() || m.arch != spec.arch || m.flavor != spec.flavor {
        return EntryState::Stale(format!(
            "holds {} {} {}, want {} {} {}",
            m.version, m.arch, m.flavor, spec.version, spec.arch, spec.flavor
        ));
    }
    if let Some(want) = expected
        && *want != m.archive_sha256
    {
        return EntryState::Stale(format!("installed from archive {}, expected {want}", m.archive_sha256));
    }
    if !m.files.contains_key(crate::release::DAEMON_BINARY) {
        return EntryState::Stale(format!("{} missing from {MANIFEST}", crate::release::DAEMON_BINARY));
    }
    for (name, digest) in &m.files {
        match sha256_file(&dir.join(name)) {
            Ok(d) if d == *digest => {}
            Ok(d) => return EntryState::Stale(format!("{name} changed on disk (sha256 {d}, recorded {digest})")),
            Err(e) => return EntryState::Stale(format!("{name} unreadable: {e}")),
        }
    }
    EntryState::Valid(m)
}
