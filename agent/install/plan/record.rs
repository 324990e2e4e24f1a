//! Step 5 of the plan: the install record, how every path was before
//! soci-agent changed it.

use crate::paths::{BACKUP_DIR, RECORD, STORE_DIR};

use crate::install::record::{Before, Record, RecordError};
use crate::install::settings::InstallSettings;
use crate::rootfs::Root;

use super::builder::Builder;
use super::soci::SociPlan;
use super::{Action, ActionKind, Effects, Op, PlanError};

/// Step 5: the record, updated with the paths this plan touches for the
/// first time and the SOCI binary it runs.
pub(super) fn install_record(b: &mut Builder, s: &InstallSettings, soci: &SociPlan) -> Result<(), PlanError> {
    let previous = Record::load(b.root).map_err(|e| match e {
        RecordError::Read(fs) => PlanError::Fs(fs),
        RecordError::Invalid { path, message } => PlanError::Record { path, message },
    })?;
    let record = Record {
        daemon_binary: soci.daemon_binary.clone(),
        soci_root: s.soci_root.clone(),
        adopted_sha256: soci.adopted_sha256.clone(),
        soci_version: soci.choice.version.map(|v| v.to_string()).unwrap_or_default(),
        soci_reason: soci.choice.reason.clone(),
        request: s.layered.request(),
        ..record_paths(b.root, previous.unwrap_or_default(), &b.actions, &s.containerd_config)
    };
    b.file(RECORD, record.to_json(), 0o644, Effects::default())?;
    Ok(())
}

/// Records the digest of every file this plan writes (or finds already
/// holding what it would write), so uninstall can tell our content from a
/// later edit by someone else.
fn record_written(root: &Root, record: &mut Record, actions: &[Action]) {
    for a in actions {
        let is_link = std::fs::symlink_metadata(root.path(&a.path)).is_ok_and(|m| m.file_type().is_symlink());
        let bytes = match (&a.op, a.action) {
            (Op::Write { content, .. }, _) => Some(content.clone()),
            (Op::Copy { source, .. }, _) => std::fs::read(source).ok(),
            (_, ActionKind::Unchanged) if !is_link => root.read_opt(&a.path).ok().flatten(),
            _ => None,
        };
        if let Some(bytes) = bytes.filter(|_| a.path != RECORD) {
            record
                .written
                .insert(a.path.clone(), crate::install::record::digest(&bytes));
        }
    }
}

/// Adds to `record` the paths this plan touches for the first time, with
/// their state before soci-agent, and the store entries in use. A path
/// already holding exactly our content (left by an interrupted run) counts as
/// created by us, except `merged` (the containerd config, which we only edit).
fn record_paths(root: &Root, mut record: Record, actions: &[Action], merged: &str) -> Record {
    record_written(root, &mut record, actions);
    for a in actions {
        let first_time = !record.paths.contains_key(&a.path);
        let backup = format!("{BACKUP_DIR}{}", a.path);
        let backed_up = root.exists(&backup) || actions.iter().any(|b| b.path == backup);
        let before = match (&a.op, a.action) {
            (Op::Release(step), _) => {
                record.store_entries.insert(step.entry.clone());
                continue;
            }
            (_, ActionKind::KeepRelease) => {
                // Everything under the store is soci-agent's own, whoever made it.
                record.store_entries.insert(a.path.clone());
                continue;
            }
            (Op::Backup { .. }, _) | (Op::FormatVolume(_), _) => continue,
            _ if !first_time => continue,
            _ if backed_up => Before::Backup { backup },
            (_, ActionKind::Unchanged) if a.path == merged => continue,
            _ => match std::fs::read_link(root.path(&a.path)) {
                Ok(t) if !t.starts_with(STORE_DIR) => Before::Link {
                    target: t.display().to_string(),
                },
                _ => Before::Absent,
            },
        };
        record.paths.insert(a.path.clone(), before);
    }
    record
}
