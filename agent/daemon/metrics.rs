//! Prometheus text exposition (format 0.0.4) of the daemon's state, served
//! on `GET /metrics` by `daemon::http`. Rendered from a snapshot of
//! `state::Live`, so a scrape never waits on a check.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `soci_agent_info` (1) | gauge | `version` |
//! | `soci_agent_ready` (0/1: first reconcile done) | gauge | |
//! | `soci_agent_check_ok` (1 ok, 0 warn or fail; skipped checks left out) | gauge | `check` |
//! | `soci_agent_checks` (checks per verdict) | gauge | `verdict` |
//! | `soci_agent_last_reconcile_timestamp_seconds` | gauge | |
//! | `soci_agent_reconcile_duration_seconds` (the last one) | gauge | |
//! | `soci_agent_reconciles_total` | counter | |
//! | `soci_agent_file_drifted` (0/1 per file install owns) | gauge | `path` |
//! | `soci_agent_repairs_total`, `soci_agent_repair_failures_total` | counter | |
//! | `soci_agent_repairs_last_hour`, `soci_agent_repair_budget_per_hour` | gauge | |
//! | `soci_agent_config_generation`, `soci_agent_config_reload_errors_total` | gauge, counter | |
//! | `soci_agent_image_state` (1 for the current state) | gauge | `image`, `state` |
//! | `soci_agent_image_bytes`, `soci_agent_image_seconds`, `soci_agent_image_pinned` | gauge | `image` |
//! | `soci_agent_image_pulls_total`, `soci_agent_image_moves_total` | counter | `image` |
//! | `soci_agent_last_run_timestamp_seconds`, `soci_agent_last_run_exit_code` | gauge | `command` |
//! | `soci_agent_phase_seconds` (install phases, boot steps, prefetch images) | gauge | `command`, `phase` |
//!
//! The last three come from the newest saved run reports
//! (`crate::history::latest`), with the names `--textfile-dir` uses.

use std::fmt::Write;

use super::state::{ImageStatus, Live};
use crate::doctor::Verdict;

const IMAGE_STATES: [&str; 5] = ["pending", "hit", "pulled", "failed", "absent"];

/// Escapes a label value (`\`, `"` and newlines).
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Builds the exposition text family by family.
struct Out {
    text: String,
}

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let value = if value.is_finite() { value } else { 0.0 };
        self.text.push_str(name);
        if !labels.is_empty() {
            let joined: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{}\"", escape(v))).collect();
            let _ = write!(self.text, "{{{}}}", joined.join(","));
        }
        let _ = writeln!(self.text, " {value}");
    }
    /// A family with one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
    /// A family of samples labelled `keys` (values in the same order); left out when there are none.
    fn labelled<'a, const N: usize>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        keys: [&str; N],
        samples: impl IntoIterator<Item = ([&'a str; N], f64)>,
    ) {
        let samples: Vec<_> = samples.into_iter().collect();
        if samples.is_empty() {
            return;
        }
        self.family(name, kind, help);
        for (values, value) in samples {
            let labels: Vec<(&str, &str)> = keys.iter().copied().zip(values).collect();
            self.sample(name, &labels, value);
        }
    }
}

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// Renders every family; families without samples are left out.
pub fn render(live: &Live) -> String {
    let mut o = Out { text: String::new() };
    daemon(&mut o, live);
    checks(&mut o, live);
    reconciles(&mut o, live);
    drift(&mut o, live);
    repairs(&mut o, live);
    config(&mut o, live);
    images(&mut o, live);
    image_pins_and_counts(&mut o, live);
    reports(&mut o, live);
    o.text
}

/// `soci_agent_info` and `soci_agent_ready`.
fn daemon(o: &mut Out, live: &Live) {
    o.family("soci_agent_info", "gauge", "The running soci-agent daemon.");
    o.sample("soci_agent_info", &[("version", live.agent_version)], 1.0);
    o.single(
        "soci_agent_ready",
        "gauge",
        "1 once the first reconcile is done.",
        flag(live.ready),
    );
}

/// `soci_agent_check_ok` per judged check and `soci_agent_checks` per verdict.
fn checks(o: &mut Out, live: &Live) {
    o.labelled(
        "soci_agent_check_ok",
        "gauge",
        "1 when the check is ok, 0 on warn or fail (skipped checks are left out).",
        ["check"],
        live.checks
            .iter()
            .filter(|c| c.verdict != Verdict::Skip)
            .map(|c| ([c.id.as_str()], flag(c.is_ok()))),
    );
    let s = &live.summary;
    o.labelled(
        "soci_agent_checks",
        "gauge",
        "Checks per verdict at the last reconcile.",
        ["verdict"],
        [("ok", s.ok), ("warn", s.warn), ("fail", s.fail), ("skip", s.skip)].map(|(v, n)| ([v], n as f64)),
    );
}

/// When the last reconcile finished, how long it took, and how many ran.
fn reconciles(o: &mut Out, live: &Live) {
    if let Some(last) = &live.last_reconcile {
        o.single(
            "soci_agent_last_reconcile_timestamp_seconds",
            "gauge",
            "When the last reconcile finished (unix seconds).",
            last.at,
        );
        o.single(
            "soci_agent_reconcile_duration_seconds",
            "gauge",
            "How long the last reconcile took.",
            last.seconds,
        );
    }
    o.single(
        "soci_agent_reconciles_total",
        "counter",
        "Reconciles done since start.",
        live.reconciles as f64,
    );
}

/// `soci_agent_file_drifted` per file install owns.
fn drift(o: &mut Out, live: &Live) {
    o.labelled(
        "soci_agent_file_drifted",
        "gauge",
        "1 when a file install owns differs from what install would write.",
        ["path"],
        live.drift.iter().map(|d| ([d.path.as_str()], flag(d.state != "ok"))),
    );
}

/// The repair counters and the hourly budget.
fn repairs(o: &mut Out, live: &Live) {
    let r = &live.repairs;
    o.single(
        "soci_agent_repairs_total",
        "counter",
        "Repairs attempted since start.",
        r.total as f64,
    );
    o.single(
        "soci_agent_repair_failures_total",
        "counter",
        "Repairs that failed since start.",
        r.failed as f64,
    );
    o.single(
        "soci_agent_repairs_last_hour",
        "gauge",
        "Repairs attempted in the last hour.",
        f64::from(r.last_hour),
    );
    o.single(
        "soci_agent_repair_budget_per_hour",
        "gauge",
        "[daemon] max_repairs_per_hour (0 when repair is off).",
        if r.enabled { f64::from(r.budget) } else { 0.0 },
    );
}

/// The configuration generation and the refused reloads.
fn config(o: &mut Out, live: &Live) {
    o.single(
        "soci_agent_config_generation",
        "gauge",
        "Configuration generation: 1 at start, +1 per applied reload.",
        live.config_generation as f64,
    );
    o.single(
        "soci_agent_config_reload_errors_total",
        "counter",
        "Reloads refused (the previous configuration kept running).",
        live.config_errors as f64,
    );
}

/// The name an image's samples carry: its normalized reference, else as configured.
fn image_name(i: &ImageStatus) -> &str {
    i.reference.as_deref().unwrap_or(&i.image)
}

/// The image state (one sample per configured image and state), size and seconds families.
fn images(o: &mut Out, live: &Live) {
    let all = &live.images;
    o.labelled(
        "soci_agent_image_state",
        "gauge",
        "1 for the state the configured image is in.",
        ["image", "state"],
        all.iter()
            .flat_map(|i| IMAGE_STATES.map(|st| ([image_name(i), st], flag(i.state == st)))),
    );
    o.labelled(
        "soci_agent_image_bytes",
        "gauge",
        "Image size as CRI reports it.",
        ["image"],
        all.iter().filter_map(|i| Some(([image_name(i)], i.bytes? as f64))),
    );
    o.labelled(
        "soci_agent_image_seconds",
        "gauge",
        "Seconds the last check or pull of the image took.",
        ["image"],
        all.iter().map(|i| ([image_name(i)], i.seconds)),
    );
}

/// The pinned, pulls and moves families of the configured images.
fn image_pins_and_counts(o: &mut Out, live: &Live) {
    let all = &live.images;
    o.labelled(
        "soci_agent_image_pinned",
        "gauge",
        "1 when the image carries the pinned label.",
        ["image"],
        all.iter().filter_map(|i| Some(([image_name(i)], flag(i.pinned?)))),
    );
    o.labelled(
        "soci_agent_image_pulls_total",
        "counter",
        "Pulls (not hits) of the image since start.",
        ["image"],
        all.iter().map(|i| ([image_name(i)], i.pulls as f64)),
    );
    o.labelled(
        "soci_agent_image_moves_total",
        "counter",
        "Times the image's tag was seen to move since start.",
        ["image"],
        all.iter().map(|i| ([image_name(i)], i.moves as f64)),
    );
}

/// The families from the newest saved run reports.
fn reports(o: &mut Out, live: &Live) {
    let all = &live.reports;
    o.labelled(
        "soci_agent_last_run_timestamp_seconds",
        "gauge",
        "When the newest run report of the command was saved.",
        ["command"],
        all.iter().map(|r| ([r.command], r.at)),
    );
    o.labelled(
        "soci_agent_last_run_exit_code",
        "gauge",
        "Exit code of the command's newest run report.",
        ["command"],
        all.iter().filter_map(|r| Some(([r.command], r.exit_code? as f64))),
    );
    o.labelled(
        "soci_agent_phase_seconds",
        "gauge",
        "Seconds per phase (install), step (boot) or image (prefetch) of the newest run.",
        ["command", "phase"],
        all.iter().flat_map(|r| {
            r.phases
                .iter()
                .map(|(phase, secs)| ([r.command, phase.as_str()], *secs))
        }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::state::{CheckState, ImageStatus, LastReconcile, RunFigures};

    fn live() -> Live {
        let d = tempfile::tempdir().unwrap();
        let cfg = crate::daemon::config::load(
            &crate::rootfs::Root::new(d.path()),
            &crate::daemon::config::Overrides::default(),
        )
        .unwrap();
        Live::new(cfg.shown(), 6, true)
    }

    #[test]
    fn renders_checks_images_and_reports() {
        let mut l = live();
        l.ready = true;
        l.reconciles = 3;
        l.last_reconcile = Some(LastReconcile {
            at: 1700000000.5,
            seconds: 0.25,
        });
        for (id, verdict) in [
            ("live.soci-socket", Verdict::Ok),
            ("agent.drift", Verdict::Fail),
            ("host.disk", Verdict::Skip),
        ] {
            l.checks.push(CheckState {
                id: id.into(),
                verdict,
                evidence: String::new(),
                advice: None,
                since: 0.0,
            });
        }
        let mut img = ImageStatus::pending("a:1", Some("docker.io/library/a:1".into()));
        img.state = "pulled";
        img.bytes = Some(1024);
        l.images.push(img);
        l.reports.push(RunFigures {
            command: "install",
            path: String::new(),
            at: 1.0,
            exit_code: Some(0),
            phases: vec![("plan".into(), 0.5), ("say \"hi\"\n".into(), 1.0)],
        });
        let text = render(&l);
        for line in [
            "soci_agent_ready 1",
            "soci_agent_check_ok{check=\"live.soci-socket\"} 1",
            "soci_agent_check_ok{check=\"agent.drift\"} 0",
            "soci_agent_last_reconcile_timestamp_seconds 1700000000.5",
            "soci_agent_reconciles_total 3",
            "soci_agent_image_state{image=\"docker.io/library/a:1\",state=\"pulled\"} 1",
            "soci_agent_image_state{image=\"docker.io/library/a:1\",state=\"hit\"} 0",
            "soci_agent_image_bytes{image=\"docker.io/library/a:1\"} 1024",
            "soci_agent_phase_seconds{command=\"install\",phase=\"plan\"} 0.5",
            "soci_agent_phase_seconds{command=\"install\",phase=\"say \\\"hi\\\"\\n\"} 1",
            "soci_agent_repair_budget_per_hour 6",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("host.disk"), "skipped checks are left out");
        assert!(text.ends_with('\n'));
    }
}
