//! agent.record and recent.*: the install record and the last saved report
//! of each command (age, outcome, per-phase timings).

use crate::paths::{RECORD, REPORTS_DIR};
use std::time::{Duration, UNIX_EPOCH};

use serde_json::Value;

use crate::install::options::Requested;

use super::Check;
use super::node::{Node, Text};

pub fn record(node: &Node) -> Check {
    const ID: &str = "agent.record";
    match (&node.record, Text::read(&node.root, RECORD)) {
        (_, Text::Unreadable(e)) => Check::skip(ID, format!("{RECORD}: {e}")).advise("run doctor as root"),
        (Err(e), _) => Check::fail(
            ID,
            crate::exit::error_chain(e),
            format!("move {RECORD} aside and re-run soci-agent install (uninstall needs a valid record)"),
        ),
        (Ok(None), _) => Check::skip(ID, format!("no {RECORD}: soci-agent has not installed on this node")),
        (Ok(Some(r)), _) => {
            let how = match &r.adopted_sha256 {
                Some(d) => format!("adopted, sha256 {d}"),
                None => format!(
                    "store entries {}",
                    r.store_entries.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            };
            Check::ok(
                ID,
                format!(
                    "{RECORD}: daemon_binary {} ({how}); {} paths, {} units enabled by soci-agent; {}",
                    r.daemon_binary,
                    r.paths.len(),
                    r.enabled_units.len(),
                    requested(&r.request)
                ),
            )
        }
    }
}

/// The recorded request in one line: what the daemon and a re-run want.
fn requested(request: &std::collections::BTreeMap<String, Requested>) -> String {
    if request.is_empty() {
        return "installed with no flags or SOCI_AGENT_* settings (config file and defaults)".into();
    }
    let each: Vec<String> = request
        .iter()
        .map(|(k, r)| format!("{k}={} ({})", r.value, r.source.describe()))
        .collect();
    format!("installed with {}", each.join(", "))
}

pub fn reports(node: &Node) -> Vec<Check> {
    vec![
        report(node, "recent.install", "install"),
        report(node, "recent.boot", "boot"),
        report(node, "recent.prefetch", "prefetch"),
    ]
}

/// Check `id`: the last saved report of `command`, with its age, outcome and timings.
fn report(node: &Node, id: &'static str, command: &str) -> Check {
    if let Err(e) = std::fs::read_dir(node.root.path(REPORTS_DIR))
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Check::skip(id, format!("{REPORTS_DIR}: {e}")).advise("run doctor as root");
    }
    let Some((path, value)) = crate::history::latest(&node.root, command) else {
        return Check::skip(id, format!("no {command} report in {REPORTS_DIR}"));
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let exit = value["exit_code"].as_u64();
    let failed_steps = failed_steps(&value);
    let evidence = format!(
        "{REPORTS_DIR}/{name}: {}, {}{}",
        age(node, command, &name),
        outcome(exit, &failed_steps),
        timings(&value)
    );
    if exit == Some(0) && failed_steps.is_empty() {
        return Check::ok(id, evidence);
    }
    let error = value["error"]
        .as_str()
        .map(str::to_string)
        .or_else(|| failed_steps.first().cloned())
        .unwrap_or_default();
    failed(id, command, evidence, &error)
}

/// How long ago the report named `name` (`<command>-<unix ms>.json`) was written.
fn age(node: &Node, command: &str, name: &str) -> String {
    name.strip_prefix(&format!("{command}-"))
        .and_then(|s| s.strip_suffix(".json"))
        .and_then(|s| s.parse::<u64>().ok())
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
        .and_then(|t| node.now.duration_since(t).ok())
        .map_or("age unknown".to_string(), |d| format!("{} ago", human(d)))
}

/// `name: detail` of each step the report marks failed.
fn failed_steps(value: &Value) -> Vec<String> {
    steps(value)
        .iter()
        .filter(|s| s["status"] == "failed")
        .map(|s| {
            format!(
                "{}: {}",
                s["name"].as_str().unwrap_or("?"),
                s["detail"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// `ok`, the failed step count, the exit code, or `outcome unknown`.
fn outcome(exit: Option<u64>, failed_steps: &[String]) -> String {
    match exit {
        Some(0) if failed_steps.is_empty() => "ok".to_string(),
        Some(0) => format!("{} step(s) failed", failed_steps.len()),
        Some(code) => format!("exit {code}"),
        None => "outcome unknown".to_string(),
    }
}

/// The check for a last run of `command` that failed with `error`: a failed boot fails, the rest warn.
fn failed(id: &'static str, command: &str, evidence: String, error: &str) -> Check {
    match command {
        "boot" => Check::fail(
            id,
            evidence,
            format!(
                "the last boot tasks failed ({error}): see journalctl -u soci-agent-boot.service; run soci-agent boot --strict"
            ),
        ),
        "install" => Check::warn(
            id,
            evidence,
            format!(
                "the last install failed and left the node as it was ({error}): fix that and re-run soci-agent install"
            ),
        ),
        _ => Check::warn(
            id,
            evidence,
            format!("the last {command} failed ({error}): see its report"),
        ),
    }
}

fn steps(value: &Value) -> Vec<Value> {
    value["steps"].as_array().cloned().unwrap_or_default()
}

/// `; phases: detect 0.1s, …` or `; steps: verify-binary ok 0.0s, …`.
fn timings(value: &Value) -> String {
    if let Some(phases) = value["phases"].as_object().filter(|p| !p.is_empty()) {
        let list: Vec<String> = phases
            .iter()
            .filter_map(|(k, v)| Some(format!("{k} {:.1}s", v.as_f64()?)))
            .collect();
        return format!("; phases: {}", list.join(", "));
    }
    let list: Vec<String> = steps(value)
        .iter()
        .map(|s| {
            format!(
                "{} {} {:.1}s",
                s["name"].as_str().unwrap_or("?"),
                s["status"].as_str().unwrap_or("?"),
                s["seconds"].as_f64().unwrap_or(0.0)
            )
        })
        .collect();
    if list.is_empty() {
        String::new()
    } else {
        format!("; steps: {}", list.join(", "))
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}
