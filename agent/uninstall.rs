//! `soci-agent uninstall`: puts the node back as the install record says it
//! was before soci-agent (files restored from backups, created files and
//! links removed, units soci-agent enabled disabled, containerd restarted
//! without SOCI), as one transaction. The versioned store stays unless
//! `--purge`; `--purge` after a plain uninstall (no record left) removes
//! the store entries still there.

use crate::paths::{
    BACKUP_DIR, BOOT_SERVICE, BOOT_SERVICE_PATH, CONTAINERD_SERVICE, DAEMON_SERVICE, RECORD, SOCI_SERVICE,
    SOCI_SERVICE_PATH, SOCI_SOCKET_PATH, SOCI_SOCKET_UNIT, STORE_DIR,
};
use std::time::{Duration, Instant};

use std::path::PathBuf;

use clap::Args;

use crate::exit::{ExitKind, ExitKindOf, error_chain};
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
        if exists && changed_since_written(root, record, path) {
            continue; // someone else's content now: left in place (see `left_alone`)
        }
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

/// Whether `path` no longer holds what soci-agent last wrote there (its
/// record has the digest): another tool rewrote it since.
fn changed_since_written(root: &Root, record: &Record, path: &str) -> bool {
    let Some(want) = record.written.get(path) else {
        return false;
    };
    match root.read_opt(path) {
        Ok(Some(bytes)) => crate::install::record::digest(&bytes) != *want,
        _ => false,
    }
}

/// Files the record covers that were changed by someone else since
/// soci-agent wrote them: uninstall leaves them in place and says so.
pub fn left_alone(root: &Root, record: &Record) -> Vec<String> {
    record
        .paths
        .keys()
        .filter(|p| std::fs::symlink_metadata(root.path(p)).is_ok() && changed_since_written(root, record, p))
        .cloned()
        .collect()
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

/// Why an uninstall stopped (the report's `error`).
#[derive(Debug, thiserror::Error)]
enum UninstallError {
    #[error("--root {}: uninstalling from another root needs --no-start", root.display())]
    OtherRootNeedsNoStart { root: PathBuf },
    #[error(transparent)]
    Record(#[from] crate::install::record::RecordError),
    #[error(transparent)]
    Lock(#[from] crate::install::lock::LockError),
    /// Disabling soci-agent's units, before any file is restored.
    #[error(transparent)]
    Disable(Box<SystemdError>),
    /// Restoring the files (rolled back).
    #[error(transparent)]
    Restore(#[from] crate::install::apply::ApplyError),
    /// The systemd step after the files were restored.
    #[error(transparent)]
    SystemdSide(Box<SystemdError>),
}

impl ExitKindOf for UninstallError {
    /// `--root` without `--no-start` is a usage error (exit 2); everything else failed (exit 1):
    /// a restore is rolled back whatever its cause, so it is never a verification failure.
    fn exit_kind(&self) -> ExitKind {
        match self {
            UninstallError::OtherRootNeedsNoStart { .. } => ExitKind::Usage,
            UninstallError::Lock(e) => e.exit_kind(),
            UninstallError::Record(_)
            | UninstallError::Disable(_)
            | UninstallError::Restore(_)
            | UninstallError::SystemdSide(_) => ExitKind::Failed,
        }
    }
}

/// Logs `error` and makes it the report's outcome.
fn record_stop(error: &UninstallError, report: &mut InstallReport) {
    let kind = error.exit_kind();
    let message = error_chain(error);
    tracing::error!(exit_code = kind.code(), "{message}");
    report.outcome = kind;
    report.exit_code = kind.code();
    report.error = Some(message);
}

/// The subcommand: restores the node as the install record says, and returns the report with the output format.
pub async fn run(args: &UninstallArgs) -> (InstallReport, OutputFormat) {
    let started = Instant::now();
    let output = args.output.unwrap_or(OutputFormat::Text);
    let mut report = InstallReport::for_command("uninstall", args.dry_run);
    if let Err(e) = uninstall(args, &mut report, started).await {
        record_stop(&e, &mut report);
    }
    (report, output)
}

/// Plans the restore from the install record into `report` and, unless `--dry-run`,
/// carries it out (then records how long that took since `started`).
async fn uninstall(args: &UninstallArgs, report: &mut InstallReport, started: Instant) -> Result<(), UninstallError> {
    let root = Root::new(&args.root);
    if !root.is_host() && !args.no_start && !args.dry_run {
        return Err(UninstallError::OtherRootNeedsNoStart {
            root: args.root.clone(),
        });
    }
    let Some(record) = Record::load(&root)? else {
        if args.purge {
            return purge_left_store(&root, args.dry_run, report);
        }
        report
            .notes
            .push(format!("no install record at {RECORD}: nothing to uninstall"));
        return Ok(());
    };
    report.actions = plan(&root, &record);
    for path in left_alone(&root, &record) {
        report.warnings.push(format!(
            "left {path} in place: it changed since soci-agent wrote it (another tool owns it now)"
        ));
    }
    report.changed = true;
    if args.dry_run {
        return Ok(());
    }
    restore(args, &root, &record, report).await?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(())
}

/// Under the node lock: disables soci-agent's units, restores the files, then lets
/// systemd run without SOCI and cleans up.
async fn restore(
    args: &UninstallArgs,
    root: &Root,
    record: &Record,
    report: &mut InstallReport,
) -> Result<(), UninstallError> {
    let _lock = crate::install::apply::lock_node(root)?;
    let mut steps = Vec::new();
    let mut start_containerd = false;
    if !args.no_start {
        disable_units(root, record, &mut steps).await?;
        let (problems, was_active) = release_data_volume(root, record, &mut steps).await;
        start_containerd = was_active;
        for p in problems {
            report.warnings.push(format!("releasing the data volume: {p}"));
        }
    }
    restore_files(root, report)?;
    if !args.no_start
        && let Err(e) = systemd_side(record, &mut steps).await
    {
        report.warnings.push(format!(
            "files restored, but the systemd step failed: {}",
            error_chain(&e)
        ));
        record_stop(&UninstallError::SystemdSide(Box::new(e)), report);
    }
    if start_containerd {
        // Stopped with the data volume: it runs again, on its own directory.
        let started = async {
            Systemd::connect(Duration::from_secs(10))
                .await?
                .start(CONTAINERD_SERVICE)
                .await
        };
        match started.await {
            Ok(()) => steps.push("started containerd again, without the data volume".into()),
            Err(e) => report.warnings.push(format!(
                "containerd was stopped with the data volume and did not start again: {}",
                error_chain(&e)
            )),
        }
    }
    clean_up(root, record, args.purge, report, &mut steps);
    report.notes.extend(steps);
    Ok(())
}

/// With a data volume (install --data-volume): stops the daemons on it and
/// unmounts it while its unit and the agent it runs are still in place, so
/// containerd starts again afterwards on the node's own directory. Returns
/// the problems met and whether containerd was running.
async fn release_data_volume(root: &Root, record: &Record, steps: &mut Vec<String>) -> (Vec<String>, bool) {
    if !root.exists(crate::paths::VOLUME_SERVICE_PATH) {
        return (Vec::new(), false);
    }
    let sd = match Systemd::connect(Duration::from_secs(10)).await {
        Ok(sd) => sd,
        Err(e) => return (vec![error_chain(&e)], false),
    };
    let was_active = sd.unit_state(CONTAINERD_SERVICE).await.is_ok_and(|s| s.is_active());
    let problems = crate::cache::volume::stop_for_rollback(&sd, root, &record.soci_root).await;
    steps.push(format!(
        "stopped containerd and SOCI and unmounted the data volume ({})",
        crate::paths::VOLUME_MOUNT
    ));
    (problems, was_active)
}

/// Disables the units soci-agent enabled (see [`units_to_disable`]), if any.
async fn disable_units(root: &Root, record: &Record, steps: &mut Vec<String>) -> Result<(), UninstallError> {
    let to_disable = units_to_disable(root, record);
    if to_disable.is_empty() {
        return Ok(());
    }
    let units: Vec<&str> = to_disable.iter().map(String::as_str).collect();
    let disabled = async { Systemd::connect(Duration::from_secs(10)).await?.disable(&units).await };
    disabled.await.map_err(|e| UninstallError::Disable(Box::new(e)))?;
    steps.push(format!("disabled {}", units.join(", ")));
    Ok(())
}

/// Applies the report's restore actions as one transaction, rolled back when one fails.
fn restore_files(root: &Root, report: &mut InstallReport) -> Result<(), UninstallError> {
    let mut txn = crate::install::apply::Transaction::default();
    if let Err(e) = crate::install::apply::apply_actions(&mut txn, root, &report.actions) {
        txn.rollback();
        report.changed = false;
        return Err(e.into());
    }
    txn.commit();
    Ok(())
}

/// Removes the backups and, with `purge`, the store entries (else notes that they stay).
fn clean_up(root: &Root, record: &Record, purge: bool, report: &mut InstallReport, steps: &mut Vec<String>) {
    let _ = std::fs::remove_dir_all(root.path(BACKUP_DIR));
    if purge {
        for entry in &record.store_entries {
            match std::fs::remove_dir_all(root.path(entry)) {
                Ok(()) => steps.push(format!("purged {entry}")),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => report.warnings.push(format!("could not purge {entry}: {e}")),
            }
        }
        remove_empty_store_dirs(root);
    } else if !record.store_entries.is_empty() {
        report.notes.push(format!(
            "the versioned store under {STORE_DIR} is kept (`soci-agent uninstall --purge` removes it, now or later)"
        ));
    }
}

/// The store entries under [`STORE_DIR`] (directories holding a `release.json`), as node paths.
fn store_entries(root: &Root) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(root.path(STORE_DIR)) else {
        return Vec::new();
    };
    let mut entries: Vec<String> = dir
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| e.path().join(crate::release::store::MANIFEST).is_file())
        .map(|e| format!("{STORE_DIR}/{}", e.file_name().to_string_lossy()))
        .collect();
    entries.sort();
    entries
}

/// `--purge` with no install record (a plain uninstall ran before): removes the store entries
/// left behind, under the node lock; with `dry_run`, only says which.
fn purge_left_store(root: &Root, dry_run: bool, report: &mut InstallReport) -> Result<(), UninstallError> {
    let entries = store_entries(root);
    if entries.is_empty() {
        report.notes.push(format!(
            "no install record at {RECORD} and no store entries under {STORE_DIR}: nothing to uninstall"
        ));
        return Ok(());
    }
    report.changed = true;
    if dry_run {
        report.notes.extend(
            entries
                .iter()
                .map(|e| format!("would purge {e} (left by an earlier uninstall)")),
        );
        return Ok(());
    }
    let _lock = crate::install::apply::lock_node(root)?;
    for entry in &entries {
        match std::fs::remove_dir_all(root.path(entry)) {
            Ok(()) => report
                .notes
                .push(format!("purged {entry} (left by an earlier uninstall)")),
            Err(e) => report.warnings.push(format!("could not purge {entry}: {e}")),
        }
    }
    remove_empty_store_dirs(root);
    Ok(())
}

/// Removes the store directory and its parent once they are empty (nothing else is touched).
fn remove_empty_store_dirs(root: &Root) {
    let store = root.path(STORE_DIR);
    if std::fs::remove_dir(&store).is_ok()
        && let Some(parent) = STORE_DIR.rsplit_once('/').map(|(p, _)| p)
    {
        let _ = std::fs::remove_dir(root.path(parent));
    }
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
