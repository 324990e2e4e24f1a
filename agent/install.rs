//! `soci-agent install`: settings -> host facts -> plan -> (dry run | apply)
//! -> report. Glue only; the logic lives in the modules it calls.

pub mod activate;
pub mod apply;
pub mod args;
pub mod lock;
pub mod plan;
pub mod record;
pub mod report;
pub mod settings;

use crate::paths::RECORD;
use std::io::IsTerminal;
use std::time::Instant;

use std::time::Duration;

use crate::exit::{ExitKind, error_chain};
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

async fn execute(args: &InstallArgs, saved_to: &mut Option<(Root, Option<String>)>) -> (InstallReport, OutputFormat) {
    let mut phase = Instant::now();
    let mut lap = |report: &mut InstallReport, name: &str| {
        report.phases.insert(name.to_string(), phase.elapsed().as_secs_f64());
        phase = Instant::now();
    };
    let mut report = InstallReport::new(args.dry_run);
    let fallback_output = args.output.unwrap_or(OutputFormat::Text);
    let settings = match InstallSettings::resolve(args) {
        Ok(s) => s,
        Err(e) => {
            fail(&mut report, ExitKind::Usage, &e);
            return (report, fallback_output);
        }
    };
    let output = settings.output;
    if !settings.dry_run {
        *saved_to = Some((settings.root.clone(), settings.textfile_dir.clone()));
    }
    if let Some(f) = &settings.config_file {
        report.notes.push(format!("settings read from {}", f.display()));
    }
    // Held until this run is done, so the daemon never repairs mid-install.
    let _lock = if settings.dry_run {
        None
    } else {
        match crate::install::apply::lock_node(&settings.root) {
            Ok(l) => l,
            Err(e) => {
                fail(&mut report, ExitKind::Failed, &e);
                return (report, output);
            }
        }
    };
    let facts = crate::host::detect(&settings.root).await;
    lap(&mut report, "detect");
    report.host = Some(facts.clone());
    let plan = match crate::install::plan::build(&settings, &facts) {
        Ok(p) => p,
        Err(e) => {
            let kind = if e.is_usage() {
                ExitKind::Usage
            } else {
                ExitKind::Failed
            };
            fail(&mut report, kind, &e);
            report.warnings.extend(settings.warnings.iter().cloned());
            return (report, output);
        }
    };
    lap(&mut report, "plan");
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    report.plan = Some(PlanSummary::of(&plan));
    report.warnings = plan.warnings.clone();
    report.notes.extend(plan.notes.iter().cloned());
    report.changed = plan.changed();
    report.actions = plan.actions.clone();

    if settings.dry_run {
        report.next_steps = next_steps(&settings, &plan);
        return (report, output);
    }
    for a in &mut report.actions {
        a.diff = None;
    }
    let http = HttpOptions {
        stall_timeout: settings.http_timeout,
        retries: settings.retries,
        progress: if std::io::stderr().is_terminal() {
            Progress::Tty
        } else {
            Progress::Log
        },
        ..HttpOptions::default()
    };
    let (applied, mut txn) = match crate::install::apply::apply(&settings.root, &plan, http).await {
        Ok(x) => x,
        Err(e) => {
            let kind = if e.is_verification_failure() {
                ExitKind::Verification
            } else if e.is_usage() {
                ExitKind::Usage
            } else {
                ExitKind::Failed
            };
            fail(&mut report, kind, &e);
            report.changed = false;
            return (report, output);
        }
    };
    report.release = applied.release;
    report.phases.insert("release".into(), applied.release_seconds);
    report.phases.insert("files".into(), applied.files_seconds);
    lap(&mut report, "apply");
    if !settings.no_start {
        match start_units(&settings, &plan, &mut txn).await {
            Ok(act) => {
                report.changed |= act.reloaded || !act.enabled.is_empty() || !act.restarted.is_empty();
                report.systemd = Some(act);
            }
            Err((e, act, undo_problems)) => {
                txn.rollback();
                fail(&mut report, ExitKind::Failed, e.as_ref());
                report
                    .notes
                    .push("rolled back: every file restored, units restarted or stopped as they were".into());
                report
                    .warnings
                    .extend(undo_problems.into_iter().map(|p| format!("rollback: {p}")));
                report.changed = false;
                report.systemd = act;
                return (report, output);
            }
        }
    }
    if !settings.no_start {
        lap(&mut report, "systemd");
    }
    txn.commit();
    report.next_steps = next_steps(&settings, &plan);
    (report, output)
}

fn fail(report: &mut InstallReport, kind: ExitKind, e: &(dyn std::error::Error + 'static)) {
    let msg = error_chain(e);
    tracing::error!(exit_code = kind.code(), "{msg}");
    report.outcome = kind;
    report.exit_code = kind.code();
    report.error = Some(msg);
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
    let mut record_enabled = |units: &[String]| -> Result<(), String> {
        let mut record = Record::load(&root).map_err(|e| error_chain(&e))?.unwrap_or_default();
        record.enabled_units.extend(units.iter().cloned());
        txn.write(&root, RECORD, record.to_json().as_bytes(), 0o644)
            .map_err(|e| error_chain(&e))
    };
    let result = activate(&sd, &s.root, plan, &mut act, Bounds::default(), &mut record_enabled).await;
    if let Err(e) = result {
        // Files first (so a restart below runs the old config), then units.
        txn.restore_files();
        let problems = undo(&sd, &act).await;
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
