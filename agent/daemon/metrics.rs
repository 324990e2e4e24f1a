//! The daemon's figures in the OpenMetrics text format (1.0.0), built with
//! `prometheus-client` (types, `# HELP`/`# TYPE`/`# UNIT`, label escaping,
//! the closing `# EOF`) and served on `GET /metrics` by `daemon::http`.
//! Rendered from a snapshot of `state::Live` into a registry made for the
//! scrape, so a scrape never waits on a check.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `soci_agent_info` (1) | info | `version` |
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
//! Counters are registered without `_total` (the OpenMetrics family name);
//! their samples carry it. Families without samples are left out.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use super::state::{ImageStatus, Live};
use crate::doctor::Verdict;

/// The `Content-Type` of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const IMAGE_STATES: [&str; 5] = ["pending", "hit", "pulled", "failed", "absent"];

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;
type FloatCounter = Counter<f64, AtomicU64>;

/// The registry of one scrape; `help` texts get their final period from
/// `prometheus-client`.
struct Out {
    registry: Registry,
}

/// Non-finite figures (a clock gone wrong) are shown as 0.
fn finite(v: f64) -> f64 {
    if v.is_finite() { v } else { 0.0 }
}

fn gauge_of(value: f64) -> FloatGauge {
    let g = FloatGauge::default();
    g.set(finite(value));
    g
}

fn counter_of(value: f64) -> FloatCounter {
    let c = FloatCounter::default();
    c.inc_by(finite(value).max(0.0));
    c
}

impl Out {
    /// A gauge with one unlabelled sample; `unit` is the name's last part (`seconds`).
    fn gauge(&mut self, name: &str, help: &str, unit: Option<Unit>, value: f64) {
        match unit {
            Some(u) => self.registry.register_with_unit(name, help, u, gauge_of(value)),
            None => self.registry.register(name, help, gauge_of(value)),
        }
    }
    /// A counter (`name` without `_total`) with one unlabelled sample.
    fn counter(&mut self, name: &str, help: &str, value: f64) {
        self.registry.register(name, help, counter_of(value));
    }
    /// A gauge family labelled `keys` (values in the same order); left out when empty.
    fn gauges<'a, const N: usize>(
        &mut self,
        name: &str,
        help: &str,
        unit: Option<Unit>,
        keys: [&'static str; N],
        samples: impl IntoIterator<Item = ([&'a str; N], f64)>,
    ) {
        let family = Family::<Labels, FloatGauge>::default();
        let mut any = false;
        for (values, value) in samples {
            family.get_or_create(&labels(keys, values)).set(finite(value));
            any = true;
        }
        if any {
            match unit {
                Some(u) => self.registry.register_with_unit(name, help, u, family),
                None => self.registry.register(name, help, family),
            }
        }
    }
    /// A counter family (`name` without `_total`); left out when empty.
    fn counters<'a, const N: usize>(
        &mut self,
        name: &str,
        help: &str,
        keys: [&'static str; N],
        samples: impl IntoIterator<Item = ([&'a str; N], f64)>,
    ) {
        let family = Family::<Labels, FloatCounter>::default();
        let mut any = false;
        for (values, value) in samples {
            family
                .get_or_create(&labels(keys, values))
                .inc_by(finite(value).max(0.0));
            any = true;
        }
        if any {
            self.registry.register(name, help, family);
        }
    }
}

fn labels<const N: usize>(keys: [&'static str; N], values: [&str; N]) -> Labels {
    keys.into_iter().zip(values.map(str::to_string)).collect()
}

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// Renders every family (OpenMetrics text ending in `# EOF`).
pub fn render(live: &Live) -> String {
    let mut o = Out {
        registry: Registry::default(),
    };
    daemon(&mut o, live);
    checks(&mut o, live);
    reconciles(&mut o, live);
    drift(&mut o, live);
    repairs(&mut o, live);
    config(&mut o, live);
    images(&mut o, live);
    image_pins_and_counts(&mut o, live);
    reports(&mut o, live);
    let mut text = String::new();
    encode(&mut text, &o.registry).expect("formatting into a String does not fail");
    text
}

/// `soci_agent_info` and `soci_agent_ready`.
fn daemon(o: &mut Out, live: &Live) {
    o.registry.register(
        "soci_agent",
        "The running soci-agent daemon",
        Info::new(vec![("version", live.agent_version.to_string())]),
    );
    o.gauge(
        "soci_agent_ready",
        "1 once the first reconcile is done",
        None,
        flag(live.ready),
    );
}

/// `soci_agent_check_ok` per judged check and `soci_agent_checks` per verdict.
fn checks(o: &mut Out, live: &Live) {
    o.gauges(
        "soci_agent_check_ok",
        "1 when the check is ok, 0 on warn or fail (skipped checks are left out)",
        None,
        ["check"],
        live.checks
            .iter()
            .filter(|c| c.verdict != Verdict::Skip)
            .map(|c| ([c.id.as_str()], flag(c.is_ok()))),
    );
    let s = &live.summary;
    o.gauges(
        "soci_agent_checks",
        "Checks per verdict at the last reconcile",
        None,
        ["verdict"],
        [("ok", s.ok), ("warn", s.warn), ("fail", s.fail), ("skip", s.skip)].map(|(v, n)| ([v], n as f64)),
    );
}

/// When the last reconcile finished, how long it took, and how many ran.
fn reconciles(o: &mut Out, live: &Live) {
    if let Some(last) = &live.last_reconcile {
        o.gauge(
            "soci_agent_last_reconcile_timestamp",
            "When the last reconcile finished (unix seconds)",
            Some(Unit::Seconds),
            last.at,
        );
        o.gauge(
            "soci_agent_reconcile_duration",
            "How long the last reconcile took",
            Some(Unit::Seconds),
            last.seconds,
        );
    }
    o.counter(
        "soci_agent_reconciles",
        "Reconciles done since start",
        live.reconciles as f64,
    );
}

/// `soci_agent_file_drifted` per file install owns.
fn drift(o: &mut Out, live: &Live) {
    o.gauges(
        "soci_agent_file_drifted",
        "1 when a file install owns differs from what install would write",
        None,
        ["path"],
        live.drift.iter().map(|d| ([d.path.as_str()], flag(d.state != "ok"))),
    );
}

/// The repair counters and the hourly budget.
fn repairs(o: &mut Out, live: &Live) {
    let r = &live.repairs;
    o.counter("soci_agent_repairs", "Repairs attempted since start", r.total as f64);
    o.counter(
        "soci_agent_repair_failures",
        "Repairs that failed since start",
        r.failed as f64,
    );
    o.gauge(
        "soci_agent_repairs_last_hour",
        "Repairs attempted in the last hour",
        None,
        f64::from(r.last_hour),
    );
    o.gauge(
        "soci_agent_repair_budget_per_hour",
        "[daemon] max_repairs_per_hour (0 when repair is off)",
        None,
        if r.enabled { f64::from(r.budget) } else { 0.0 },
    );
}

/// The configuration generation and the refused reloads.
fn config(o: &mut Out, live: &Live) {
    o.gauge(
        "soci_agent_config_generation",
        "Configuration generation: 1 at start, +1 per applied reload",
        None,
        live.config_generation as f64,
    );
    o.counter(
        "soci_agent_config_reload_errors",
        "Reloads refused (the previous configuration kept running)",
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
    o.gauges(
        "soci_agent_image_state",
        "1 for the state the configured image is in",
        None,
        ["image", "state"],
        all.iter()
            .flat_map(|i| IMAGE_STATES.map(|st| ([image_name(i), st], flag(i.state == st)))),
    );
    o.gauges(
        "soci_agent_image",
        "Image size as CRI reports it",
        Some(Unit::Bytes),
        ["image"],
        all.iter().filter_map(|i| Some(([image_name(i)], i.bytes? as f64))),
    );
    o.gauges(
        "soci_agent_image",
        "Seconds the last check or pull of the image took",
        Some(Unit::Seconds),
        ["image"],
        all.iter().map(|i| ([image_name(i)], i.seconds)),
    );
}

/// The pinned, pulls and moves families of the configured images.
fn image_pins_and_counts(o: &mut Out, live: &Live) {
    let all = &live.images;
    o.gauges(
        "soci_agent_image_pinned",
        "1 when the image carries the pinned label",
        None,
        ["image"],
        all.iter().filter_map(|i| Some(([image_name(i)], flag(i.pinned?)))),
    );
    o.counters(
        "soci_agent_image_pulls",
        "Pulls (not hits) of the image since start",
        ["image"],
        all.iter().map(|i| ([image_name(i)], i.pulls as f64)),
    );
    o.counters(
        "soci_agent_image_moves",
        "Times the image's tag was seen to move since start",
        ["image"],
        all.iter().map(|i| ([image_name(i)], i.moves as f64)),
    );
}

/// The families from the newest saved run reports.
fn reports(o: &mut Out, live: &Live) {
    let all = &live.reports;
    o.gauges(
        "soci_agent_last_run_timestamp",
        "When the newest run report of the command was saved (unix seconds)",
        Some(Unit::Seconds),
        ["command"],
        all.iter().map(|r| ([r.command], r.at)),
    );
    o.gauges(
        "soci_agent_last_run_exit_code",
        "Exit code of the command's newest run report",
        None,
        ["command"],
        all.iter().filter_map(|r| Some(([r.command], r.exit_code? as f64))),
    );
    o.gauges(
        "soci_agent_phase",
        "Seconds per phase (install), step (boot) or image (prefetch) of the newest run",
        Some(Unit::Seconds),
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
            "soci_agent_ready 1.0",
            "soci_agent_check_ok{check=\"live.soci-socket\"} 1.0",
            "soci_agent_check_ok{check=\"agent.drift\"} 0.0",
            "soci_agent_last_reconcile_timestamp_seconds 1700000000.5",
            "soci_agent_reconciles_total 3.0",
            "# TYPE soci_agent_reconciles counter",
            "# UNIT soci_agent_last_reconcile_timestamp_seconds seconds",
            "soci_agent_info{version=\"0.1.0\"} 1",
            "soci_agent_image_state{image=\"docker.io/library/a:1\",state=\"pulled\"} 1.0",
            "soci_agent_image_state{image=\"docker.io/library/a:1\",state=\"hit\"} 0.0",
            "soci_agent_image_bytes{image=\"docker.io/library/a:1\"} 1024.0",
            "soci_agent_phase_seconds{command=\"install\",phase=\"plan\"} 0.5",
            "soci_agent_phase_seconds{command=\"install\",phase=\"say \\\"hi\\\"\\n\"} 1.0",
            "soci_agent_repair_budget_per_hour 6.0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("host.disk"), "skipped checks are left out");
        assert!(text.ends_with("\n# EOF\n"), "{text}");
    }
}
