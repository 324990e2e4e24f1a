//! `soci-agent install`: settings -> host facts -> plan -> (dry run | apply)
//! -> report. Glue only; the logic lives in the modules it calls.

pub mod activate;
pub mod apply;
pub mod args;
pub mod lock;
pub mod options;
pub mod plan;
pub mod record;
pub mod report;
pub mod settings;

use crate::paths::RECORD;
use std::io::IsTerminal;
use std::time::Instant;

use std::time::Duration;

use nix::fcntl::Flock;

use crate::exit::{ExitKind, ExitKindOf, error_chain};
use crate::host::HostFacts;
use crate::install::activate::{Activation, Bounds, activate, undo};
use crate::install::apply::Transaction;
use crate::install::args::InstallArgs;
use crate::install::plan::{Plan, Wiring};
use crate::install::record::Record;
use crate::install::report::{InstallReport, PlanSummary};
use crate::install::settings::InstallSettings;
use crate::output::OutputFormat;
use crate::release::fetch::{HttpOptions, Progress};
use crate::rootfs::Root;
use crate::systemd::Systemd;

/// Runs install; always returns a report (with the error when it failed).
/// A run that got past validation saves its report under the state dir
/// (and, with `--textfile-dir`, as Prometheus gauges).
pub async fn run(args: &InstallArgs) -> (InstallReport, OutputFormat) {
    let started = Instant::now();
    let mut saved_to = None;
    let (mut report, output) = execute(args, &mut saved_to).await;
    report.seconds = started.elapsed().as_secs_f64();
    report.phases.insert("total".into(), report.seconds);
    if let Some((root, textfile_dir)) = saved_to {
        crate::history::record_run(
            &root,
            "install",
            &report.to_json(),
            report.exit_code,
            &report.phases,
            textfile_dir.as_deref(),
        );
    }
    (report, output)
}

/// The run stopped; the report already holds the error.
struct Stopped;

/// Times the phases of a run into its report.
struct Laps(Instant);

impl Laps {
    /// Records the time since the previous lap as phase `name`.
    fn lap(&mut self, report: &mut InstallReport, name: &str) {
        report.phases.insert(name.to_string(), self.0.elapsed().as_secs_f64());
        self.0 = Instant::now();
    }
}

/// Resolves the settings and runs the install; sets `saved_to` once the
/// run is one whose report is kept (not a dry run).
async fn execute(args: &InstallArgs, saved_to: &mut Option<(Root, Option<String>)>) -> (InstallReport, OutputFormat) {
    let laps = Laps(Instant::now());
    let mut report = InstallReport::new(args.dry_run);
    let fallback_output = args.options.output.unwrap_or(OutputFormat::Text);
    let settings = match InstallSettings::resolve(args) {
        Ok(s) => s,
        Err(e) => {
            fail(&mut report, &e);
            return (report, fallback_output);
        }
    };
    if !settings.dry_run {
        *saved_to = Some((settings.root.clone(), settings.textfile_dir.clone()));
    }
    if let Some(f) = &settings.config_file {
        report.notes.push(format!("settings read from {}", f.display()));
    }
    if settings.layered.replayed {
        report.notes.push(format!(
            "no settings given: replaying those of the recorded install ({}); give any to replace them",
            replayed(&settings)
        ));
    }
    // Stopped: the report already says why.
    let _ = install(&settings, &mut report, laps).await;
    (report, settings.output)
}

/// The replayed options as `key=value`, comma-separated.
fn replayed(s: &InstallSettings) -> String {
    let shown = s.layered.shown();
    let each = shown.iter().filter(|o| o.source.is_recorded());
    each.map(|o| format!("{}={}", o.key, o.value))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Locks the node, detects, plans and, unless this is a dry run, applies
/// the plan and starts the units; fills `report` as it goes.
async fn install(s: &InstallSettings, report: &mut InstallReport, mut laps: Laps) -> Result<(), Stopped> {
    // Held until this run is done, so the daemon never repairs mid-install.
    let _lock = lock(s, report)?;
    let facts = crate::host::detect(&s.root).await;
    laps.lap(report, "detect");
    report.host = Some(facts.clone());
    let plan = build_plan(s, &facts, report)?;
    laps.lap(report, "plan");
    show_plan(&plan, report);
    if s.dry_run {
        release_reachable(s, &plan, report).await?;
        report.next_steps = next_steps(s, &plan);
        return Ok(());
    }
    let mut txn = apply_plan(s, &plan, report).await?;
    laps.lap(report, "apply");
    if !s.no_start {
        txn = start_or_roll_back(s, &plan, txn, report).await?;
        laps.lap(report, "systemd");
    }
    txn.commit();
    report.next_steps = next_steps(s, &plan);
    Ok(())
}

/// The node's install lock; none for a dry run, which changes nothing.
fn lock(s: &InstallSettings, report: &mut InstallReport) -> Result<Option<Flock<std::fs::File>>, Stopped> {
    if s.dry_run {
        return Ok(None);
    }
    crate::install::apply::lock_node(&s.root).map_err(|e| fail(report, &e))
}

/// Builds the plan; a failure carries the settings' warnings to the report.
fn build_plan(s: &InstallSettings, facts: &HostFacts, report: &mut InstallReport) -> Result<Plan, Stopped> {
    crate::install::plan::build(s, facts).map_err(|e| {
        let stopped = fail(report, &e);
        report.warnings.extend(s.warnings.iter().cloned());
        stopped
    })
}

/// Logs the plan's warnings and puts the plan in the report.
fn show_plan(plan: &Plan, report: &mut InstallReport) {
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    report.plan = Some(PlanSummary::of(plan));
    report.warnings = plan.warnings.clone();
    report.notes.extend(plan.notes.iter().cloned());
    report.changed = plan.changed();
    report.actions = plan.actions.clone();
}

/// A dry run's check that the release it would download is there: the
/// archive and its published `.sha256sum` answer a HEAD. Nothing is
/// downloaded; an unreachable or wrong mirror fails the dry run as it would
/// fail the real one.
async fn release_reachable(s: &InstallSettings, plan: &Plan, report: &mut InstallReport) -> Result<(), Stopped> {
    use crate::install::plan::{ArchiveSource, DigestSource, Op};
    let mut urls = Vec::new();
    for a in &plan.actions {
        if let Op::Release(step) = &a.op
            && let ArchiveSource::Url(url) = &step.source
        {
            urls.push(url.clone());
            if let DigestSource::Published(sum) = &step.digest {
                urls.push(sum.clone());
            }
        }
    }
    if urls.is_empty() {
        return Ok(());
    }
    let fetcher = crate::release::fetch::Fetcher::new(http_options(s)).map_err(|e| fail(report, &e))?;
    for url in &urls {
        fetcher.exists(url).await.map_err(|e| fail(report, &e))?;
    }
    report.notes.push(format!(
        "dry run: the release answers at {} (not downloaded)",
        urls.join(" and ")
    ));
    Ok(())
}

/// Applies the plan (a real run's report carries no diffs); returns the
/// transaction, still open.
async fn apply_plan(s: &InstallSettings, plan: &Plan, report: &mut InstallReport) -> Result<Transaction, Stopped> {
    for a in &mut report.actions {
        a.diff = None;
    }
    match crate::install::apply::apply(&s.root, plan, http_options(s)).await {
        Ok((applied, txn)) => {
            report.release = applied.release;
            report.phases.insert("release".into(), applied.release_seconds);
            report.phases.insert("files".into(), applied.files_seconds);
            Ok(txn)
        }
        Err(e) => {
            let stopped = fail(report, &e);
            report.changed = false;
            Err(stopped)
        }
    }
}

/// Download settings: the timeout and retries, progress on a terminal.
fn http_options(s: &InstallSettings) -> HttpOptions {
    HttpOptions {
        stall_timeout: s.http_timeout,
        retries: s.retries,
        progress: if std::io::stderr().is_terminal() {
            Progress::Tty
        } else {
            Progress::Log
        },
        ..HttpOptions::default()
    }
}

/// The systemd step; when it fails, every file is restored and the units
/// are put back as they were.
async fn start_or_roll_back(
    s: &InstallSettings,
    plan: &Plan,
    mut txn: Transaction,
    report: &mut InstallReport,
) -> Result<Transaction, Stopped> {
    match start_units(s, plan, &mut txn).await {
        Ok(act) => {
            report.changed |= act.reloaded || !act.enabled.is_empty() || !act.restarted.is_empty();
            report.systemd = Some(act);
            Ok(txn)
        }
        Err((e, act, undo_problems)) => {
            txn.rollback();
            // Rolled back: the node is as it was.
            let stopped = fail_as(report, ExitKind::Failed, e.as_ref());
            report
                .notes
                .push("rolled back: every file restored, units restarted or stopped as they were".into());
            report
                .warnings
                .extend(undo_problems.into_iter().map(|p| format!("rollback: {p}")));
            report.changed = false;
            report.systemd = act;
            Err(stopped)
        }
    }
}

/// Marks the run failed with `kind`, logging and reporting `e`'s chain.
fn fail<E: ExitKindOf + 'static>(report: &mut InstallReport, e: &E) -> Stopped {
    fail_as(report, e.exit_kind(), e)
}

/// [`fail`] for an error whose exit code the caller knows.
fn fail_as(report: &mut InstallReport, kind: ExitKind, e: &(dyn std::error::Error + 'static)) -> Stopped {
    let msg = error_chain(e);
    tracing::error!(exit_code = kind.code(), "{msg}");
    report.outcome = kind;
    report.exit_code = kind.code();
    report.error = Some(msg);
    Stopped
}

type StartFailure = (
    Box<dyn std::error::Error + Send + Sync>,
    Option<Activation>,
    Vec<String>,
);

/// Connects to systemd, runs the systemd step and records the units it
/// enabled. On failure the systemd side is already undone; the caller
/// restores the files.
async fn start_units(s: &InstallSettings, plan: &Plan, txn: &mut Transaction) -> Result<Activation, StartFailure> {
    let sd = Systemd::connect(Duration::from_secs(10))
        .await
        .map_err(|e| (Box::new(e) as _, None, Vec::new()))?;
    let mut act = Activation::default();
    let root = s.root.clone();
    let mut record_enabled = |units: &[String]| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let mut record = Record::load(&root)?.unwrap_or_default();
        record.enabled_units.extend(units.iter().cloned());
        Ok(txn.write(&root, RECORD, record.to_json().as_bytes(), 0o644)?)
    };
    let result = activate(&sd, &s.root, plan, &mut act, Bounds::default(), &mut record_enabled).await;
    if let Err(e) = result {
        // Files first (so a restart below runs the old config), then units.
        // The volume first, while its unit and the agent it runs are still in place.
        let mut problems = Vec::new();
        if s.data_volume.is_some() {
            problems = crate::cache::volume::stop_for_rollback(&sd, &s.root, &s.soci_root).await;
        }
        txn.restore_files();
        problems.extend(undo(&sd, &act).await);
        return Err((Box::new(e), Some(act), problems));
    }
    Ok(act)
}

/// What the operator (or the next soci-agent step) still has to do.
fn next_steps(s: &InstallSettings, plan: &Plan) -> Vec<String> {
    if !s.no_start {
        return Vec::new();
    }
    let mut units = vec!["soci-snapshotter.socket", "soci-snapshotter.service"];
    if !plan.kubelet_present {
        units.push("soci-agent-boot.service");
    }
    let units = units.join(" ");
    let mut steps = vec![
        "--no-start: units written, nothing enabled or started; once enabled, systemd starts them at boot".to_string(),
    ];
    match plan.wiring {
        Wiring::Nodeadm => steps.push(format!(
            "systemctl daemon-reload && systemctl enable {units} (start nothing: nodeadm-run starts containerd, whose Requires= starts SOCI)"
        )),
        Wiring::Containerd => {
            steps.push(format!("systemctl daemon-reload && systemctl enable {units}"));
            if plan.effects().restart_containerd {
                steps.push(
                    "on a running node: systemctl restart containerd (its config or drop-ins changed), then soci-agent doctor"
                        .into(),
                );
            }
        }
    }
    steps
}
