//! `soci-agent uninstall`: puts the node back as the install record says it
//! was before soci-agent (files restored from backups, created files and
//! links removed, units soci-agent enabled disabled, containerd restarted
//! without SOCI), as one transaction. The versioned store stays unless
//! `--purge`.

use crate::paths::{
    BACKUP_DIR, BOOT_SERVICE, BOOT_SERVICE_PATH, CONTAINERD_SERVICE, DAEMON_SERVICE, RECORD, SOCI_SERVICE,
    SOCI_SERVICE_PATH, SOCI_SOCKET_PATH, SOCI_SOCKET_UNIT,
};
use std::time::{Duration, Instant};

use std::path::PathBuf;

use clap::Args;

use crate::exit::{ExitKind, error_chain};
use crate::install::plan::{Action, ActionKind, Effects, Op};
use crate::install::record::{Before, Record};
use crate::install::report::InstallReport;
use crate::output::OutputFormat;
use crate::rootfs::Root;
use crate::systemd::{Systemd, SystemdError};

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
        RECORD,
        ActionKind::Remove,
        Op::Remove,
        "the install record".into(),
    ));
    actions
}

/// The units to disable: those the record lists as enabled by soci-agent, plus soci-agent's own
/// unit files that still exist (the record says soci-agent created them). An install killed
/// between enabling its units and writing the record enabled them without recording it, and
/// nobody else can have enabled a unit whose file soci-agent created; leaving them enabled would
/// leave dangling `.wants/` links once the files are removed.
fn units_to_disable(root: &Root, record: &Record) -> Vec<String> {
    let mut units: Vec<String> = record.enabled_units.iter().cloned().collect();
    let own = [
        (SOCI_SERVICE, SOCI_SERVICE_PATH),
        (SOCI_SOCKET_UNIT, SOCI_SOCKET_PATH),
        (BOOT_SERVICE, BOOT_SERVICE_PATH),
    ];
    for (unit, path) in own {
        let created = matches!(record.paths.get(path), Some(Before::Absent));
        if created && root.exists(path) && !units.iter().any(|u| u == unit) {
            units.push(unit.to_string());
        }
    }
    units
}

async fn systemd_side(record: &Record, steps: &mut Vec<String>) -> Result<(), SystemdError> {
    let sd = Systemd::connect(Duration::from_secs(10)).await?;
    sd.reload().await?;
    steps.push("daemon-reload".into());
    let containerd = sd.unit_state(CONTAINERD_SERVICE).await?;
    if containerd.is_active() {
        sd.restart(CONTAINERD_SERVICE).await?;
        steps.push("restarted containerd without SOCI".into());
    }
    let ours = matches!(record.paths.get(SOCI_SERVICE_PATH), Some(Before::Absent));
    for unit in [DAEMON_SERVICE, SOCI_SERVICE, SOCI_SOCKET_UNIT, BOOT_SERVICE] {
        let state = sd.unit_state(unit).await?;
        if !state.is_active() {
            continue;
        }
        if ours || unit == BOOT_SERVICE || unit == DAEMON_SERVICE {
            sd.stop(unit).await?;
            steps.push(format!("stopped {unit}"));
        } else if unit == SOCI_SERVICE {
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
                .push(format!("no install record at {RECORD}: nothing to uninstall"));
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

    let _lock = match crate::install::apply::lock_node(&root) {
        Ok(l) => l,
        Err(e) => {
            fail(&mut report, ExitKind::Failed, error_chain(&e));
            return (report, output);
        }
    };
    let mut steps = Vec::new();
    let mut txn = crate::install::apply::Transaction::default();
    let to_disable = units_to_disable(&root, &record);
    if !args.no_start && !to_disable.is_empty() {
        let units: Vec<&str> = to_disable.iter().map(String::as_str).collect();
        let disabled = async { Systemd::connect(Duration::from_secs(10)).await?.disable(&units).await };
        match disabled.await {
            Ok(_) => steps.push(format!("disabled {}", units.join(", "))),
            Err(e) => {
                fail(&mut report, ExitKind::Failed, error_chain(&e));
                return (report, output);
            }
        }
    }
    if let Err(e) = crate::install::apply::apply_actions(&mut txn, &root, &report.actions) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_unit_files_are_disabled_even_when_the_record_missed_them() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        for path in [SOCI_SERVICE_PATH, SOCI_SOCKET_PATH] {
            let p = root.path(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "# Installed by soci-agent\n").unwrap();
        }
        let mut record = Record::default();
        // Created by soci-agent, enabled by a run killed before it recorded that.
        record.paths.insert(SOCI_SERVICE_PATH.into(), Before::Absent);
        // Someone else's file (backed up): not ours to disable unless recorded.
        record
            .paths
            .insert(SOCI_SOCKET_PATH.into(), Before::Backup { backup: "/x".into() });
        // Created by soci-agent but already gone: nothing to disable.
        record.paths.insert(BOOT_SERVICE_PATH.into(), Before::Absent);
        record.enabled_units.insert("other.service".into());
        assert_eq!(units_to_disable(&root, &record), vec!["other.service", SOCI_SERVICE]);
        record.enabled_units.insert(SOCI_SERVICE.into());
        assert_eq!(units_to_disable(&root, &record), vec!["other.service", SOCI_SERVICE]);
    }
}

#[derive(Debug, Clone, Args)]
pub struct UninstallArgs {
    /// Directory every node path is resolved under.
    #[arg(long, value_name = "DIR", env = "SOCI_AGENT_ROOT", default_value = "/")]
    pub root: PathBuf,
    /// Also remove the versioned release store.
    #[arg(long)]
    pub purge: bool,
    /// Restore files only; never talk to systemd.
    #[arg(long, env = "SOCI_AGENT_NO_START")]
    pub no_start: bool,
    /// Print what would be restored and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Report format on stdout. [default: text]
    #[arg(long, value_enum, env = "SOCI_AGENT_OUTPUT")]
    pub output: Option<OutputFormat>,
}
