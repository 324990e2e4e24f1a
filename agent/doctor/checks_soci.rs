//! soci.*: the binary `soci-snapshotter.service` runs (ExecStart resolved
//! through drop-ins), its version, whether it is what soci-agent verified,
//! and other copies on the node.

use crate::paths::{SOCI_BINARY_LOCATIONS, SOCI_SERVICE, STORE_DIR};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use super::Check;
use super::node::Node;
use super::unitfile::{ExecStart, SEARCH_PATH, UnitFiles};
use crate::release::store::{self, EntryState};
use crate::release::{MIN_SOCI_VERSION, ReleaseSpec, Sha256Hex, Version};

const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn binary_checks(node: &Node) -> Vec<Check> {
    let (binary, exec) = binary(node);
    let version = match &exec {
        Some(e) => version(node, e).await,
        None => Check::skip("soci.version", "no runnable binary (see soci.binary)"),
    };
    let digest = match &exec {
        Some(e) => digest(node, e),
        None => Check::skip("soci.digest", "no binary to compare (see soci.binary)"),
    };
    vec![binary, version, digest, other_copies(node, exec.as_ref()).await]
}

const BINARY_ID: &str = "soci.binary";
const INSTALL: &str = "run soci-agent install";

/// `soci.binary`, and the ExecStart when its binary exists and is executable.
fn binary(node: &Node) -> (Check, Option<ExecStart>) {
    const ID: &str = BINARY_ID;
    let unit = &node.soci_unit;
    if unit.masked {
        return (
            Check::fail(
                ID,
                format!("{SOCI_SERVICE} is masked (a link to /dev/null)"),
                format!("systemctl unmask {SOCI_SERVICE}"),
            ),
            None,
        );
    }
    if !unit.exists() {
        return (missing_unit(unit), None);
    }
    let Some(exec) = node.exec.clone() else {
        return (
            Check::fail(ID, format!("{SOCI_SERVICE} has no ExecStart="), INSTALL),
            None,
        );
    };
    let bin = exec.binary();
    let resolved = node.resolve(bin);
    let evidence = if resolved == bin {
        format!("ExecStart in {}: {}", exec.source, exec.line)
    } else {
        format!("ExecStart in {}: {}; {bin} -> {resolved}", exec.source, exec.line)
    };
    match std::fs::metadata(node.host_path(&resolved)) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => (Check::ok(ID, evidence), Some(exec)),
        Ok(_) => (
            Check::fail(ID, format!("{evidence}: not an executable file"), INSTALL),
            None,
        ),
        Err(e) => (Check::fail(ID, format!("{evidence}: {e}"), INSTALL), None),
    }
}

/// `soci.binary` when the service has no unit file: unreadable, or only drop-ins, or none.
fn missing_unit(unit: &UnitFiles) -> Check {
    if let Some(e) = unit.unreadable.first() {
        return Check::skip(BINARY_ID, e.clone()).advise("run doctor as root");
    }
    let where_ = if unit.dropins.is_empty() {
        format!("in {}", SEARCH_PATH.join(", "))
    } else {
        format!(
            "(only drop-ins: {})",
            unit.dropins.iter().map(|d| d.0.as_str()).collect::<Vec<_>>().join(", ")
        )
    };
    Check::fail(BINARY_ID, format!("no {SOCI_SERVICE} {where_}"), INSTALL)
}

/// Why a binary under a `--root` that is not this host is not asked its version.
const NOT_RUN: &str =
    "not run: --root is not this host, and a mounted image's binaries are never run on the build host";

/// Why `--version` gave no output to read.
#[derive(Debug, thiserror::Error)]
enum VersionRun {
    #[error("{NOT_RUN}")]
    NotHost,
    #[error("cannot run it")]
    Spawn(#[from] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
}

/// Output of `<binary> --version` (a node path, resolved under the root), bounded.
async fn run_version(node: &Node, binary: &str) -> Result<String, VersionRun> {
    if !node.root.is_host() {
        return Err(VersionRun::NotHost);
    }
    let host = node.host_path(&node.resolve(binary));
    let run = tokio::process::Command::new(&host)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(VERSION_TIMEOUT, run).await {
        Ok(Ok(o)) => Ok(String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(VersionRun::Timeout(VERSION_TIMEOUT)),
    }
}

async fn version(node: &Node, exec: &ExecStart) -> Check {
    const ID: &str = "soci.version";
    let bin = exec.binary();
    if !node.root.is_host() {
        // The record's version, when the unit runs the binary install chose.
        let record = node.record.as_ref().ok().and_then(Option::as_ref);
        return match record
            .filter(|r| r.daemon_binary == bin)
            .map(|r| r.soci_version.as_str())
        {
            Some(v) if !v.is_empty() => Check::ok(ID, format!("SOCI {v} (from the install record; {NOT_RUN})")),
            _ => Check::skip(ID, format!("{bin}: {NOT_RUN}")),
        };
    }
    let out = match run_version(node, bin).await {
        Ok(out) => out,
        Err(e) => {
            return Check::warn(
                ID,
                format!("{bin} --version: {}", crate::exit::error_chain(&e)),
                "check that the binary runs on this machine (architecture, flavor)",
            );
        }
    };
    let first = out.lines().next().unwrap_or("").trim().to_string();
    let Some(v) = crate::host::parse_soci_version(&out) else {
        return Check::warn(
            ID,
            format!("{bin} --version printed {first:?}: no version found"),
            "check that it is soci-snapshotter-grpc",
        );
    };
    match v.parse::<Version>() {
        Ok(parsed) if parsed < MIN_SOCI_VERSION => Check::fail(
            ID,
            format!("{bin} --version: SOCI {v}"),
            format!(
                "SOCI {v} has no parallel pull/unpack mode: install {MIN_SOCI_VERSION} or newer (soci-agent install)"
            ),
        ),
        _ => Check::ok(ID, format!("{bin} --version: SOCI {v} ({first})")),
    }
}

const DIGEST_ID: &str = "soci.digest";
const REINSTALL: &str = "re-run soci-agent install (something replaced the unit, its drop-in or the binary)";

/// `soci.digest`: the binary the unit runs is the one install verified or adopted.
fn digest(node: &Node, exec: &ExecStart) -> Check {
    let record = match &node.record {
        Ok(Some(r)) => r,
        Ok(None) => return Check::skip(DIGEST_ID, "no install record: nothing to compare the binary with"),
        Err(_) => return Check::skip(DIGEST_ID, "the install record is unreadable (see agent.record)"),
    };
    let bin = exec.binary();
    let resolved = node.resolve(bin);
    if node.resolve(&record.daemon_binary) != resolved {
        return Check::fail(
            DIGEST_ID,
            format!(
                "the unit runs {bin} ({}), the install record says {}",
                exec.source, record.daemon_binary
            ),
            REINSTALL,
        );
    }
    match &record.adopted_sha256 {
        Some(want) => adopted_digest(node, bin, &resolved, want),
        None => store_digest(node, bin, &resolved),
    }
}

/// An adopted binary: its sha256 against the one recorded at adoption.
fn adopted_digest(node: &Node, bin: &str, resolved: &str, want: &Sha256Hex) -> Check {
    match store::sha256_file(&node.host_path(resolved)) {
        Ok(got) if &got == want => Check::ok(DIGEST_ID, format!("{bin} sha256 {got}, as adopted (record.json)")),
        Ok(got) => Check::fail(
            DIGEST_ID,
            format!("{bin} sha256 {got}, adopted as {want} (record.json)"),
            "the adopted binary changed (an RPM update?): re-run soci-agent install --adopt to accept it, \
             or install a pinned release",
        ),
        Err(e) => Check::skip(DIGEST_ID, format!("{bin}: {e}")).advise("run doctor as root"),
    }
}

/// A binary from soci-agent's store: every file of its entry against the entry's manifest.
fn store_digest(node: &Node, bin: &str, resolved: &str) -> Check {
    let Some((entry, m)) = super::checks_host::store_manifest(node, bin) else {
        return Check::fail(
            DIGEST_ID,
            format!("{bin} -> {resolved} is not in soci-agent's store ({})", STORE_DIR),
            REINSTALL,
        );
    };
    let Ok(version) = m.version.parse::<Version>() else {
        return Check::fail(
            DIGEST_ID,
            format!("{entry}/{}: bad version {:?}", store::MANIFEST, m.version),
            REINSTALL,
        );
    };
    let spec = ReleaseSpec {
        version,
        arch: m.arch,
        flavor: m.flavor,
    };
    match store::inspect(&node.root, &spec, Some(&m.archive_sha256)) {
        EntryState::Valid(m) => Check::ok(
            DIGEST_ID,
            format!(
                "{bin} -> {entry}: every file matches {} (SOCI {} {}, archive sha256 {}, verified against {})",
                store::MANIFEST,
                m.version,
                m.arch,
                m.archive_sha256,
                m.verified_against
            ),
        ),
        EntryState::Missing => Check::fail(DIGEST_ID, format!("store entry {entry} is missing"), REINSTALL),
        EntryState::Stale(why) => Check::fail(DIGEST_ID, format!("{entry}: {why}"), REINSTALL),
    }
}

/// `soci.other-copies`: SOCI binaries on the node besides the one the unit runs.
async fn other_copies(node: &Node, exec: Option<&ExecStart>) -> Check {
    const ID: &str = "soci.other-copies";
    let used = exec.map(|e| node.resolve(e.binary()));
    let mut others = Vec::new();
    for loc in SOCI_BINARY_LOCATIONS {
        let resolved = node.resolve(loc);
        if Some(&resolved) == used.as_ref() || !node.host_path(&resolved).is_file() {
            continue;
        }
        let v = run_version(node, loc)
            .await
            .ok()
            .and_then(|out| crate::host::parse_soci_version(&out))
            .unwrap_or_else(|| "version unknown".into());
        let rpm = if loc.starts_with("/usr/bin/") {
            ", the distribution's (RPM) copy"
        } else {
            ""
        };
        others.push(format!("{loc} (SOCI {v}{rpm})"));
    }
    let running = exec.map_or("the unit runs none".to_string(), |e| {
        format!("the unit runs {}", e.binary())
    });
    if others.is_empty() {
        let places = SOCI_BINARY_LOCATIONS.join(", ");
        return Check::ok(ID, format!("no other soci-snapshotter-grpc at {places} ({running})"));
    }
    Check::ok(ID, format!("also present ({running}): {}", others.join(", ")))
}
