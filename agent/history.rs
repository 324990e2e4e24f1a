//! Run reports: every install, boot and prefetch run saves its JSON report
//! under `/var/lib/soci-agent/reports/` (`{command}-{unix millis}.json`, the
//! newest `KEEP` per command kept), which `doctor` reads back. This is a run
//! log, not configuration: it is the one place a no-op install still writes.
//! With `--textfile-dir`, the same figures go to a node-exporter textfile.

use crate::paths::REPORTS_DIR;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::rootfs::{self, FsError, Root};

/// Reports kept per command.
pub const KEEP: usize = 10;

fn reports_of(dir: &Path, command: &str) -> Vec<PathBuf> {
    let prefix = format!("{command}-");
    let mut list: Vec<(u128, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let stamp = name.strip_prefix(&prefix)?.strip_suffix(".json")?.parse().ok()?;
            Some((stamp, e.path()))
        })
        .collect();
    list.sort();
    list.into_iter().map(|(_, p)| p).collect()
}

/// Saves `json` as the newest report of `command` and prunes old ones.
pub fn save(root: &Root, command: &str, json: &str) -> Result<PathBuf, FsError> {
    let dir = root.path(REPORTS_DIR);
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let path = dir.join(format!("{command}-{millis}.json"));
    rootfs::write_atomic(&path, json.as_bytes(), 0o644)?;
    let all = reports_of(&dir, command);
    for old in all.iter().take(all.len().saturating_sub(KEEP)) {
        let _ = std::fs::remove_file(old);
    }
    Ok(path)
}

/// The newest report of `command`, parsed, with its path.
pub fn latest(root: &Root, command: &str) -> Option<(PathBuf, serde_json::Value)> {
    let path = reports_of(&root.path(REPORTS_DIR), command).pop()?;
    let value = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
    Some((path, value))
}

/// One gauge sample: metric name, labels, value.
pub type Gauge<'a> = (&'a str, Vec<(&'a str, String)>, f64);

/// Writes `{dir}/soci_agent_{command}.prom` atomically (node-exporter textfile
/// collector format) from `(metric, labels, value)` rows.
pub fn write_textfile(dir: &Path, command: &str, rows: &[Gauge<'_>]) -> Result<PathBuf, FsError> {
    let mut out = String::new();
    let mut seen = Vec::new();
    for (name, labels, value) in rows {
        if !seen.contains(name) {
            out.push_str(&format!("# TYPE {name} gauge\n"));
            seen.push(name);
        }
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| {
                format!(
                    "{k}=\"{}\"",
                    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
                )
            })
            .collect();
        let labels = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{}}}", labels.join(","))
        };
        out.push_str(&format!("{name}{labels} {value}\n"));
    }
    let path = dir.join(format!("soci_agent_{command}.prom"));
    rootfs::write_atomic(&path, out.as_bytes(), 0o644)?;
    Ok(path)
}

/// Saves a run's report and, with a textfile dir (a node path), its gauges:
/// last run time, exit code, seconds per phase. Failures to save are logged,
/// never fatal: the run itself already happened.
pub fn record_run(
    root: &Root,
    command: &str,
    json: &str,
    exit_code: u8,
    phases: &std::collections::BTreeMap<String, f64>,
    textfile_dir: Option<&str>,
) {
    if let Err(e) = save(root, command, json) {
        tracing::warn!(error = %crate::exit::error_chain(&e), "could not save the run report");
    }
    let Some(dir) = textfile_dir else { return };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let cmd = || vec![("command", command.to_string())];
    let mut rows = vec![
        ("soci_agent_last_run_timestamp_seconds", cmd(), now),
        ("soci_agent_last_run_exit_code", cmd(), f64::from(exit_code)),
    ];
    for (phase, secs) in phases {
        rows.push((
            "soci_agent_phase_seconds",
            vec![("command", command.to_string()), ("phase", phase.clone())],
            *secs,
        ));
    }
    if let Err(e) = write_textfile(&root.path(dir), command, &rows) {
        tracing::warn!(error = %crate::exit::error_chain(&e), "could not write the textfile metrics");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_reports_and_reads_the_latest() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path());
        for i in 0..(KEEP + 3) {
            let dir = root.path(REPORTS_DIR);
            rootfs::write_atomic(
                &dir.join(format!("install-{}.json", 1000 + i)),
                format!("{{\"n\":{i}}}").as_bytes(),
                0o644,
            )
            .unwrap();
        }
        save(&root, "install", "{\"n\":99}").unwrap();
        assert_eq!(reports_of(&root.path(REPORTS_DIR), "install").len(), KEEP);
        assert_eq!(latest(&root, "install").unwrap().1["n"], 99);
        assert!(latest(&root, "boot").is_none());
    }

    #[test]
    fn textfile_is_prometheus_text() {
        let d = tempfile::tempdir().unwrap();
        let p = write_textfile(
            d.path(),
            "install",
            &[("soci_agent_phase_seconds", vec![("phase", "download".into())], 1.5)],
        )
        .unwrap();
        let text = std::fs::read_to_string(p).unwrap();
        assert_eq!(
            text,
            "# TYPE soci_agent_phase_seconds gauge\nsoci_agent_phase_seconds{phase=\"download\"} 1.5\n"
        );
    }
}
