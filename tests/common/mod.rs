//! Shared support for soci-agent's integration tests.
//!
//! Use it from a test file with `mod common;`. Pieces:
//! - [`archive`]: release-layout `.tar.gz` archives built in memory
//!   ([`archive::standard_release`], [`archive::release_tar_gz`]), digests in
//!   `sha256sum` format, and hostile archives ([`archive::hostile`]).
//!   [`archive::oci_image_tar`] builds a one-layer OCI image archive (a pause image).
//! - [`mirror`]: a loopback HTTP/1.1 release mirror with per-path fault
//!   scripts and request counters ([`mirror::Mirror`], [`mirror::Fault`]).
//! - [`tree`]: node trees under a temp dir for `--root` runs ([`tree::Tree`]).
//! - [`nspawn`]: a booted systemd node; [`booted`]: such a node with the agent
//!   in it and a D-Bus connection to its systemd ([`booted::Booted`]), the
//!   agent's runs inside it ([`booted::AgentRun`]).
//! - [`al2023`]: an EKS AL2023-shaped node tree (the AMI's units, real nodeadm, stubs).
//! - [`real`], [`containerd`], [`registry`], [`imds`]: the real components and
//!   the servers around them.
//! - [`loopdev`]: a host loop device over a sparse file (an EBS volume stand-in);
//!   [`ratelimit`]: nginx with a per-connection rate limit in front of a registry,
//!   counting blob downloads in its access log.
//! - small helpers below: fast [`HttpOptions`] for tests, directory listings,
//!   a per-process copy of the agent binary, bounded waits for a child.
//!
//! Not every test file uses every helper, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod al2023;
pub mod archive;
pub mod booted;
pub mod containerd;
pub mod imds;
pub mod loopdev;
pub mod mirror;
pub mod nspawn;
pub mod ratelimit;
pub mod real;
pub mod registry;
pub mod tree;

use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

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

/// The agent under test, copied once per test process: `install` copies its own executable into
/// the root (and the daemon's drift check compares that copy with the running daemon's), so a
/// rebuild of the cargo target while tests run must not change it between runs. The copy lives
/// in cargo's per-target temp dir under one name per test binary, replaced atomically on each
/// run, so nothing piles up in /tmp.
pub fn agent_bin() -> &'static Path {
    static AGENT: OnceLock<PathBuf> = OnceLock::new();
    AGENT.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("agent-copies");
        std::fs::create_dir_all(&dir).unwrap();
        let me = std::env::current_exe().unwrap();
        let name = format!("soci-agent-{}", me.file_name().unwrap().to_string_lossy());
        let tmp = dir.join(format!(".{name}.{}", std::process::id()));
        std::fs::copy(env!("CARGO_BIN_EXE_soci-agent"), &tmp).unwrap();
        let path = dir.join(name);
        std::fs::rename(&tmp, &path).unwrap();
        path
    })
}

/// Waits up to `limit` for `child` to exit (polling every 5 ms): its status, or `None` when it
/// still runs (it is left running: the caller decides).
pub fn wait_for_exit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
