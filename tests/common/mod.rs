//! Shared support for soci-agent's integration tests.
//!
//! Use it from a test file with `mod common;`. Pieces:
//! - [`archive`]: release-layout `.tar.gz` archives built in memory
//!   ([`archive::standard_release`], [`archive::release_tar_gz`]), digests in
//!   `sha256sum` format, and hostile archives ([`archive::hostile`]).
//! - [`mirror`]: a loopback HTTP/1.1 release mirror with per-path fault
//!   scripts and request counters ([`mirror::Mirror`], [`mirror::Fault`]).
//! - small helpers below: fast [`HttpOptions`] for tests, directory listings.
//!
//! Not every test file uses every helper, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod archive;
pub mod containerd;
pub mod imds;
pub mod mirror;
pub mod nspawn;
pub mod real;
pub mod registry;

use std::path::Path;
use std::time::Duration;

use soci_agent::release::fetch::{HttpOptions, Progress};

/// HTTP options for tests: fast backoff (10-50 ms), 3 retries, no progress
/// output. The stall timeout (5 s) is generous so a loaded CI machine does not
/// cause spurious retries; tests of stalls lower it (e.g. to 300 ms) and use
/// a longer `Fault::SlowFirstByte`.
pub fn fast_http_options() -> HttpOptions {
    HttpOptions {
        connect_timeout: Duration::from_secs(2),
        stall_timeout: Duration::from_secs(5),
        retries: 3,
        backoff_base: Duration::from_millis(10),
        backoff_cap: Duration::from_millis(50),
        progress: Progress::Quiet,
        ..HttpOptions::default()
    }
}

/// Sorted names of the entries of `dir`; empty when `dir` does not exist.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Permission bits of `path` (e.g. `0o755`).
pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// A valid-looking digest that is certainly not the digest of `bytes`.
pub fn wrong_digest(bytes: &[u8]) -> String {
    let right = archive::sha256_hex(bytes);
    let wrong = "0".repeat(64);
    if right == wrong { "1".repeat(64) } else { wrong }
}
