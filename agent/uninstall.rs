//! `soci-agent uninstall`: puts the node back as the install record says it
//! was before soci-agent (files restored from backups, created files and
//! links removed, units soci-agent enabled disabled, containerd restarted
//! without SOCI), as one transaction. The versioned store stays unless
//! `--purge`.

use std::time::{Duration, Instant};

use crate::cli::{OutputFormat, UninstallArgs};
use crate::exit::{ExitKind, error_chain};
use crate::plan::{Action, ActionKind, BACKUP_DIR, Effects, Op};
use crate::record::{Before, RECORD_PATH, Record};
use crate::report::InstallReport;
use crate::rootfs::Root;
use crate::systemd::{Systemd, SystemdError};
use crate::units;

fn action(path: &str, kind: ActionKind, op: Op, detail: String) -> Action {
    Action {
        path: path.to_string(),
        action: kind,
        changed: true,
        detail,
        diff: None,
        op,
        effects: Effects::default(),
    }
}

/// The restore actions for `record`, in reverse order of installation.
pub fn plan(root: &Root, record: &Record) -> Vec<Action> {
    let mut actions = Vec::new();
    for (path, before) in record.paths.iter().rev() {
        let exists = std::fs::symlink_metadata(root.path(path)).is_ok();
        match before {
            Before::Absent if exists => actions.push(action(
                path,
                ActionKind::Remove,
                Op::Remove,
                "created by soci-agent".into(),
            )),
            Before::Absent => {}
            Before::Backup { backup } => actions.push(action(
                path,
                ActionKind::Restore,
                Op::Restore { source: backup.clone() },
                format!("from {backup}"),
            )),
            Before::Link { target } => actions.push(action(
                path,
                ActionKind::Symlink,
                Op::Symlink { target: target.clone() },
                format!("-> {target}"),
            )),
        }
    }
    actions.push(action(
        RECORD_PATH,
        ActionKind::Remove,
        Op::Remove,
        "the install record".into(),
    ));
    actions
}

async fn systemd_side(record: &Record, steps: &mut Vec<String>) -> Result<(), SystemdError> {
    let sd = Systemd::connect(Duration::from_secs(10)).await?;
    sd.reload().await?;
    steps.push("daemon-reload".into());
    let containerd = sd.unit_state(units::CONTAINERD_SERVICE).await?;
    if containerd.is_active() {
        sd.restart(units::CONTAINERD_SERVICE).await?;
        steps.push("restarted containerd without SOCI".into());
    }
    let ours = matches!(record.paths.get(units::SERVICE_PATH), Some(Before::Absent));
    for unit in [units::SERVICE, units::SOCKET, units::BOOT_SERVICE] {
        let state = sd.unit_state(unit).await?;
        if !state.is_active() {
            continue;
        }
        if ours || unit == units::BOOT_SERVICE {
            sd.stop(unit).await?;
            steps.push(format!("stopped {unit}"));
        } else if unit == units::SERVICE {
            sd.restart(unit).await?;
            steps.push(format!("restarted {unit} without soci-agent's drop-in"));
        }
    }
    Ok(())
}

pub async fn run(args: &UninstallArgs) -> (InstallReport, OutputFormat) {
    let started = Instant::now();
    let output = args.output.unwrap_or(OutputFormat::Text);
    let mut report = InstallReport::for_command("uninstall", args.dry_run);
    let fail = |report: &mut InstallReport, kind: ExitKind, msg: String| {
        tracing::error!(exit_code = kind.code(), "{msg}");
        report.outcome = kind;
        report.exit_code = kind.code();
        report.error = Some(msg);
    };
    let root = Root::new(&args.root);
    if !root.is_host() && !args.no_start && !args.dry_run {
        fail(
            &mut report,
            ExitKind::Usage,
            format!(
                "--root {}: uninstalling from another root needs --no-start",
                args.root.display()
            ),
        );
        return (report, output);
    }
    let record = match Record::load(&root) {
        Ok(Some(r)) => r,
        Ok(None) => {
            report
                .notes
                .push(format!("no install record at {RECORD_PATH}: nothing to uninstall"));
            return (report, output);
        }
        Err(e) => {
            fail(&mut report, ExitKind::Failed, error_chain(&e));
            return (report, output);
        }
    };
    report.actions = plan(&root, &record);
    report.changed = true;
    if args.dry_run {
        return (report, output);
    }

    let mut steps = Vec::new();
    let mut txn = crate::apply::Transaction::default();
    if !args.no_start && !record.enabled_units.is_empty() {
        let units: Vec<&str> = record.enabled_units.iter().map(String::as_str).collect();
        let disabled = async { Systemd::connect(Duration::from_secs(10)).await?.disable(&units).await };
        match disabled.await {
            Ok(_) => steps.push(format!("disabled {}", units.join(", "))),
            Err(e) => {
                fail(&mut report, ExitKind::Failed, error_chain(&e));
                return (report, output);
            }
        }
    }
    if let Err(e) = crate::apply::apply_actions(&mut txn, &root, &report.actions) {
        txn.rollback();
        fail(&mut report, ExitKind::Failed, error_chain(&e));
        report.changed = false;
        return (report, output);
    }
    txn.commit();
    if !args.no_start
        && let Err(e) = systemd_side(&record, &mut steps).await
    {
        report.warnings.push(format!(
            "files restored, but the systemd step failed: {}",
            error_chain(&e)
        ));
        fail(&mut report, ExitKind::Failed, error_chain(&e));
    }
    let _ = std::fs::remove_dir_all(root.path(BACKUP_DIR));
    if args.purge {
        for entry in &record.store_entries {
            match std::fs::remove_dir_all(root.path(entry)) {
                Ok(()) => steps.push(format!("purged {entry}")),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => report.warnings.push(format!("could not purge {entry}: {e}")),
            }
        }
    } else if !record.store_entries.is_empty() {
        report.notes.push(
            "the versioned store under /usr/local/lib/soci-agent/releases is kept (use --purge to remove it)".into(),
        );
    }
    report.notes.extend(steps);
    report.seconds = started.elapsed().as_secs_f64();
    (report, output)
}
