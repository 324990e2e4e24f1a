//! The TEST-ONLY SOCI stand-in (`tests/standin`, binary `soci-snapshotter-grpc`), built on demand.
//!
//! [`standin_binary`] runs a nested `cargo build -p soci-standin --release --message-format=json`
//! once per test binary (a `OnceLock`; later calls return the cached path) and returns the
//! executable cargo reports. It is a release build for the workspace's explicit target, so it is
//! static-pie like the release archives the end-to-end tests ship it in, and runs unchanged inside
//! the Debian test node. See `tests/standin/README.md` for what it implements.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// Path of the built stand-in `soci-snapshotter-grpc` (built once per test binary; panics with
/// cargo's output when the build fails, e.g. without `protoc`).
pub fn standin_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "-p", "soci-standin", "--release", "--message-format=json"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .output()
            .expect("run cargo build -p soci-standin");
        assert!(
            out.status.success(),
            "cargo build -p soci-standin failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let mut exe = None;
        for line in out.stdout.split(|b| *b == b'\n') {
            let Ok(msg) = serde_json::from_slice::<serde_json::Value>(line) else {
                continue;
            };
            if msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "soci-snapshotter-grpc" {
                exe = msg["executable"].as_str().map(PathBuf::from).or(exe);
            }
        }
        exe.expect("cargo's JSON output names no soci-snapshotter-grpc executable")
    })
    .clone()
}
