//! Figures from the newest saved run reports (`crate::history::latest`) of
//! install, boot and prefetch, for `/metrics`: when, exit code, seconds per
//! install phase, boot step or prefetched image. Re-read only when a newer
//! report appears; at most [`MAX_PHASES`] figures per command.

use crate::paths::REPORTS_DIR;
use serde_json::Value;

use super::state::RunFigures;
use crate::rootfs::Root;

pub const COMMANDS: [&str; 3] = ["install", "boot", "prefetch"];
pub const MAX_PHASES: usize = 64;

/// The figures of one report.
pub fn of(command: &'static str, path: &std::path::Path, v: &Value) -> RunFigures {
    RunFigures {
        command,
        path: path.display().to_string(),
        at: saved_at(command, path),
        exit_code: v["exit_code"].as_u64(),
        phases: phases(command, v),
    }
}

/// Seconds per install phase, boot step or prefetched image (plus boot's and prefetch's
/// `total`), at most [`MAX_PHASES`].
fn phases(command: &str, v: &Value) -> Vec<(String, f64)> {
    let mut phases: Vec<(String, f64)> = Vec::new();
    match command {
        "install" => {
            if let Some(map) = v["phases"].as_object() {
                phases.extend(map.iter().filter_map(|(k, s)| Some((k.clone(), s.as_f64()?))));
            }
        }
        "boot" => {
            for s in v["steps"].as_array().into_iter().flatten() {
                if let (Some(n), Some(secs)) = (s["name"].as_str(), s["seconds"].as_f64()) {
                    phases.push((n.to_string(), secs));
                }
            }
        }
        _ => {
            for i in v["images"].as_array().into_iter().flatten() {
                let name = i["reference"].as_str().or(i["image"].as_str());
                if let (Some(n), Some(secs)) = (name, i["seconds"].as_f64()) {
                    phases.push((n.to_string(), secs));
                }
            }
        }
    }
    if command != "install"
        && let Some(total) = v["seconds"].as_f64()
    {
        phases.push(("total".into(), total));
    }
    phases.truncate(MAX_PHASES);
    phases
}

/// When the report was saved (unix seconds, from its `<command>-<millis>.json` name; 0 if not).
fn saved_at(command: &str, path: &std::path::Path) -> f64 {
    let millis = path.file_name().and_then(|n| n.to_str()).and_then(|n| {
        n.strip_prefix(command)?
            .strip_prefix('-')?
            .strip_suffix(".json")?
            .parse::<u64>()
            .ok()
    });
    millis.map_or(0.0, |m| m as f64 / 1000.0)
}

/// The newest figures of every command, reusing `previous` when its report is still the newest.
pub fn refresh(root: &Root, previous: &[RunFigures]) -> Vec<RunFigures> {
    let dir = root.path(REPORTS_DIR);
    let mut out = Vec::new();
    for command in COMMANDS {
        let newest = newest_name(&dir, command);
        let Some(newest) = newest else { continue };
        let path = dir.join(&newest);
        if let Some(p) = previous
            .iter()
            .find(|p| p.command == command && p.path == path.display().to_string())
        {
            out.push(p.clone());
            continue;
        }
        if let Some((path, v)) = crate::history::latest(root, command) {
            out.push(of(command, &path, &v));
        }
    }
    out
}

/// File name of the newest `{command}-{millis}.json` in `dir`.
fn newest_name(dir: &std::path::Path, command: &str) -> Option<String> {
    let prefix = format!("{command}-");
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stamp: u128 = name.strip_prefix(&prefix)?.strip_suffix(".json")?.parse().ok()?;
            Some((stamp, name))
        })
        .max()
        .map(|(_, n)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_install_boot_and_prefetch_reports() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path());
        let dir = root.path(REPORTS_DIR);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("install-1700000000000.json"),
            r#"{"exit_code":0,"phases":{"plan":0.5,"total":1.5}}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("boot-1700000001000.json"),
            r#"{"exit_code":0,"seconds":2.0,"steps":[{"name":"verify","seconds":0.1}]}"#,
        )
        .unwrap();
        std::fs::write(
            dir.join("prefetch-5.json"),
            r#"{"exit_code":4,"seconds":3.0,"images":[{"image":"a","reference":"docker.io/library/a:latest","seconds":2.5}]}"#,
        )
        .unwrap();
        let got = refresh(&root, &[]);
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[0].phases,
            vec![("plan".to_string(), 0.5), ("total".to_string(), 1.5)]
        );
        assert_eq!(got[0].at, 1700000000.0);
        assert_eq!(
            got[1].phases,
            vec![("verify".to_string(), 0.1), ("total".to_string(), 2.0)]
        );
        assert_eq!(got[2].exit_code, Some(4));
        assert_eq!(got[2].phases[0].0, "docker.io/library/a:latest");
        // Unchanged reports are reused, not re-read.
        let mut cached = got.clone();
        cached[0].phases.clear();
        assert!(refresh(&root, &cached)[0].phases.is_empty());
    }
}
