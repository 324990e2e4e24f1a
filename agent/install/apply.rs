//! Apply: carries out a plan as one transaction. Every path is snapshotted
//! (content + mode, link target, or absence) before it changes; on any
//! failure all of them are restored in reverse order and a newly installed
//! store entry is removed, so the node ends as it started.

use crate::paths::SOCI_CONFIG;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::install::plan::{Action, ArchiveSource, DigestSource, Op, Plan, ReleaseStep};
use crate::release::extract::Extracted;
use crate::release::fetch::{FetchError, Fetcher, HttpOptions};
use crate::release::store::{MANIFEST, Manifest};
use crate::release::{Sha256Hex, parse_sha256sum};
use crate::rootfs::{self, FsError, Root, Snapshot, TMP_MARKER};

/// Largest `.sha256sum` file accepted.
const CHECKSUM_LIMIT: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("fetching {what}")]
    Fetch { what: String, source: FetchError },
    #[error("the published checksum {url} is unusable")]
    Checksum {
        url: String,
        source: crate::release::ReleaseError,
    },
    #[error("{path}")]
    Fs { path: String, source: FsError },
    #[error("SOCI {version} ({binary}) refuses the config soci-agent would write: {message}")]
    SociRejected {
        binary: String,
        version: String,
        message: String,
    },
    #[error(transparent)]
    Volume(Box<crate::cache::device::VolumeError>),
}

impl crate::exit::ExitKindOf for ApplyError {
    /// A refused download is a verification failure (exit 3); a setting the
    /// target SOCI refuses, a usage error (exit 2).
    fn exit_kind(&self) -> crate::exit::ExitKind {
        use crate::exit::ExitKind;
        match self {
            ApplyError::Fetch { source, .. } if source.is_verification_failure() => ExitKind::Verification,
            ApplyError::Checksum { .. } => ExitKind::Verification,
            ApplyError::SociRejected { .. } => ExitKind::Usage,
            ApplyError::Volume(e) => e.exit_kind(),
            ApplyError::Fetch { .. } | ApplyError::Fs { .. } => ExitKind::Failed,
        }
    }
}

/// What applying did, for the report.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Applied {
    pub release: Option<Manifest>,
    pub download_bytes: u64,
    pub release_seconds: f64,
    pub files_seconds: f64,
}

/// Undo log of one install: what `apply` changed, restored by `rollback`
/// unless `commit` is called once the node proved healthy.
#[derive(Default)]
pub struct Transaction {
    snapshots: Vec<(PathBuf, Snapshot)>,
    /// Store entry created by this run (removed on rollback).
    created_entry: Option<PathBuf>,
    /// Store entry moved aside by this run: (aside, original).
    replaced_entry: Option<(PathBuf, PathBuf)>,
    /// Directories this run created, outermost first.
    created_dirs: Vec<PathBuf>,
}

impl Transaction {
    /// Restores every snapshotted path (files only), keeping the log so a
    /// later `rollback` also undoes the store. Idempotent.
    pub fn restore_files(&mut self) {
        for (path, snap) in self.snapshots.drain(..).rev() {
            if let Err(e) = snap.restore(&path) {
                tracing::error!(path = %path.display(), error = %crate::exit::error_chain(&e), "rollback could not restore a file");
            }
        }
    }

    pub fn rollback(mut self) {
        self.restore_files();
        if let Some(dir) = self.created_entry {
            let _ = std::fs::remove_dir_all(&dir);
        }
        if let Some((aside, original)) = self.replaced_entry {
            let _ = std::fs::rename(&aside, &original);
        }
        for dir in self.created_dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
    /// Records the missing ancestors of `path` (which are about to be created).
    fn note_missing_dirs(&mut self, path: &Path) {
        let mut missing: Vec<PathBuf> = path
            .ancestors()
            .skip(1)
            .take_while(|d| !d.exists())
            .map(Path::to_path_buf)
            .collect();
        missing.reverse();
        self.created_dirs.extend(missing);
    }
    pub fn commit(self) {
        if let Some((aside, _)) = self.replaced_entry {
            let _ = std::fs::remove_dir_all(aside);
        }
    }
}

/// Removes temp leftovers of an interrupted run in `dir` (never final paths).
fn sweep_temps(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().contains(TMP_MARKER) {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

async fn expected_digest(fetcher: &Fetcher, step: &ReleaseStep) -> Result<(Sha256Hex, String), ApplyError> {
    match &step.digest {
        DigestSource::Pinned(d) => Ok((d.clone(), "pinned".into())),
        DigestSource::File { path, digest } => Ok((digest.clone(), path.clone())),
        DigestSource::Published(url) => {
            let body = fetcher
                .get_small(url, CHECKSUM_LIMIT)
                .await
                .map_err(|source| ApplyError::Fetch {
                    what: "the published checksum".into(),
                    source,
                })?;
            let text = String::from_utf8_lossy(&body);
            let d = parse_sha256sum(&text, &step.spec.archive_name()).map_err(|source| ApplyError::Checksum {
                url: url.clone(),
                source,
            })?;
            Ok((d, url.clone()))
        }
    }
}

/// Installs one release into the store: verify, extract to a temp dir, promote.
async fn install_release(
    root: &Root,
    fetcher: &Fetcher,
    step: &ReleaseStep,
    txn: &mut Transaction,
) -> Result<Manifest, ApplyError> {
    let (expected, verified_against) = expected_digest(fetcher, step).await?;
    let dirs = StagingDirs::prepare(root, step, txn)?;
    let extracted = extract_release(fetcher, step, &expected, &dirs.tmp).await?;
    let manifest = release_manifest(step, &extracted, verified_against);
    if let Err(e) = promote(&dirs, &manifest, txn) {
        let _ = std::fs::remove_dir_all(&dirs.tmp);
        return Err(fs_err(&dirs.final_dir)(e));
    }
    tracing::info!(entry = %step.entry, sha256 = %manifest.archive_sha256, "release verified and installed");
    Ok(manifest)
}

/// Maps an [`FsError`] at `path` to [`ApplyError::Fs`].
fn fs_err(path: &Path) -> impl FnOnce(FsError) -> ApplyError {
    let path = path.display().to_string();
    move |source| ApplyError::Fs { path, source }
}

/// Where a store entry is staged before it is renamed into place.
struct StagingDirs {
    /// The store entry's final path.
    final_dir: PathBuf,
    /// Its parent directory, which holds the temp dirs too.
    parent: PathBuf,
    /// The entry's file name.
    name: String,
    /// The temp dir the release is extracted into.
    tmp: PathBuf,
}

impl StagingDirs {
    /// Creates the entry's parent (noting new dirs), sweeps old temps, creates the temp dir.
    fn prepare(root: &Root, step: &ReleaseStep, txn: &mut Transaction) -> Result<Self, ApplyError> {
        let final_dir = root.path(&step.entry);
        let parent = final_dir.parent().expect("store entries have a parent").to_path_buf();
        txn.note_missing_dirs(&final_dir);
        rootfs::create_dirs(&parent).map_err(fs_err(&parent))?;
        sweep_temps(&parent);
        let name = final_dir
            .file_name()
            .expect("entry name")
            .to_string_lossy()
            .into_owned();
        let tmp = parent.join(format!(".{name}{TMP_MARKER}-{}", std::process::id()));
        rootfs::create_dirs(&tmp).map_err(fs_err(&tmp))?;
        Ok(StagingDirs {
            final_dir,
            parent,
            name,
            tmp,
        })
    }
}

/// Downloads or reads the archive and extracts it into `tmp`, removed on failure.
async fn extract_release(
    fetcher: &Fetcher,
    step: &ReleaseStep,
    expected: &Sha256Hex,
    tmp: &Path,
) -> Result<Extracted, ApplyError> {
    let extracted: Result<Extracted, FetchError> = match &step.source {
        ArchiveSource::Url(url) => fetcher.download_release(url, expected, tmp).await,
        ArchiveSource::Local(path) => crate::release::fetch::extract_local(Path::new(path), expected, tmp).await,
    };
    let what = match &step.source {
        ArchiveSource::Url(u) | ArchiveSource::Local(u) => u.clone(),
    };
    match extracted {
        Ok(x) => Ok(x),
        Err(source) => {
            let _ = std::fs::remove_dir_all(tmp);
            Err(ApplyError::Fetch { what, source })
        }
    }
}

/// The store manifest of an extracted release.
fn release_manifest(step: &ReleaseStep, extracted: &Extracted, verified_against: String) -> Manifest {
    Manifest {
        version: step.spec.version.to_string(),
        arch: step.spec.arch,
        flavor: step.spec.flavor,
        archive_name: step.spec.archive_name(),
        archive_sha256: extracted.archive_sha256.clone(),
        verified_against,
        files: extracted
            .files
            .iter()
            .map(|f| (f.name.clone(), f.sha256.clone()))
            .collect(),
    }
}

/// Writes the manifest, moves an existing entry aside and renames the temp dir into place.
fn promote(dirs: &StagingDirs, manifest: &Manifest, txn: &mut Transaction) -> Result<(), FsError> {
    let StagingDirs {
        final_dir,
        parent,
        name,
        tmp,
    } = dirs;
    rootfs::write_atomic(&tmp.join(MANIFEST), manifest.to_json().as_bytes(), 0o644)?;
    if final_dir.exists() {
        let aside = parent.join(format!(".{name}.old{TMP_MARKER}-{}", std::process::id()));
        std::fs::rename(final_dir, &aside).map_err(|source| FsError::Rename {
            from: final_dir.clone(),
            to: aside.clone(),
            source,
        })?;
        txn.replaced_entry = Some((aside, final_dir.clone()));
    }
    std::fs::rename(tmp, final_dir).map_err(|source| FsError::Rename {
        from: tmp.clone(),
        to: final_dir.clone(),
        source,
    })?;
    txn.created_entry = Some(final_dir.clone());
    rootfs::fsync_dir(parent)
}

fn apply_file_op(root: &Root, path: &str, op: &Op) -> Result<(), FsError> {
    let target = root.path(path);
    match op {
        Op::Write { content, mode } => rootfs::write_atomic(&target, content, *mode),
        Op::Symlink { target: link_target } => rootfs::symlink_atomic(Path::new(link_target), &target),
        Op::Remove => rootfs::remove_file(&target),
        Op::Copy { source, mode } => rootfs::copy_file_atomic(source, &target, *mode),
        Op::Backup { source } | Op::Restore { source } => rootfs::copy_atomic(&root.path(source), &target),
        Op::Release(_) | Op::FormatVolume(_) | Op::Nothing => Ok(()),
    }
}

/// Bound of `soci-snapshotter-grpc config dump`.
const DUMP_BOUND: std::time::Duration = std::time::Duration::from_secs(30);

/// Before a new SOCI config is promoted, the SOCI that will read it loads it
/// (`soci-snapshotter-grpc config dump --config STAGED`, SOCI 0.12+): what it
/// refuses at load (bad TOML, types, chunk size, drop policy, headers) is
/// refused here with its own message, before anything else changes. Skipped
/// (logged) when the binary cannot run here: another architecture, a
/// preinstalled binary inside a mounted image, or SOCI < 0.12.
async fn validate_soci_config(root: &Root, plan: &Plan) -> Result<(), ApplyError> {
    let Some(check) = &plan.soci_check else {
        return Ok(());
    };
    let Some(Op::Write { content, .. }) = plan
        .actions
        .iter()
        .find(|a| a.changed && a.path == SOCI_CONFIG)
        .map(|a| &a.op)
    else {
        return Ok(());
    };
    let binary = root.path(&check.binary);
    let staged = std::env::temp_dir().join(format!("soci-agent-config-check-{}.toml", std::process::id()));
    let fs = |source| ApplyError::Fs {
        path: staged.display().to_string(),
        source,
    };
    rootfs::write_atomic(&staged, content, 0o600).map_err(fs)?;
    let run = tokio::process::Command::new(&binary)
        .args(["config", "dump", "--config"])
        .arg(&staged)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DUMP_BOUND, run).await;
    let _ = std::fs::remove_file(&staged);
    let out = match out {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            tracing::warn!(binary = %binary.display(), error = %e, "cannot run SOCI to check its config; skipped");
            return Ok(());
        }
        Err(_) => {
            tracing::warn!(binary = %binary.display(), "SOCI's config check did not finish within {DUMP_BOUND:?}; skipped");
            return Ok(());
        }
    };
    if out.status.success() {
        tracing::info!(binary = %check.binary, "SOCI {} accepts the new config", check.version);
        return Ok(());
    }
    Err(ApplyError::SociRejected {
        binary: check.binary.clone(),
        version: check.version.to_string(),
        message: soci_message(&String::from_utf8_lossy(&out.stderr)),
    })
}

/// The `msg="..."` of SOCI's logrus fatal line, else its last stderr line.
fn soci_message(stderr: &str) -> String {
    let line = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no message)");
    line.split_once(" msg=\"")
        .and_then(|(_, rest)| rest.split_once("\" ").or_else(|| rest.rsplit_once('"')))
        .map(|(msg, _)| msg.replace("\\\"", "\""))
        .unwrap_or_else(|| line.trim().to_string())
}

/// Takes the install lock of `root` (see [`super::lock`]), waiting at most
/// `SOCI_AGENT_LOCK_TIMEOUT` seconds (default 300) for another run.
pub fn lock_node(root: &Root) -> Result<Option<nix::fcntl::Flock<std::fs::File>>, super::lock::LockError> {
    super::lock::acquire(root, super::lock::wait_from_env()).map(Some)
}

/// Applies the file actions (everything but releases) inside `txn`.
pub fn apply_actions(txn: &mut Transaction, root: &Root, actions: &[Action]) -> Result<(), ApplyError> {
    for action in actions
        .iter()
        .filter(|a| a.changed && !matches!(a.op, Op::Release(_) | Op::FormatVolume(_)))
    {
        let target = root.path(&action.path);
        let fs = |source| ApplyError::Fs {
            path: action.path.clone(),
            source,
        };
        let snap = Snapshot::take(&target).map_err(fs)?;
        txn.note_missing_dirs(&target);
        txn.snapshots.push((target, snap));
        apply_file_op(root, &action.path, &action.op).map_err(fs)?;
        tracing::info!(path = %action.path, action = ?action.action, "applied");
    }
    Ok(())
}

impl Transaction {
    /// Writes a file atomically, snapshotting it first so rollback restores it.
    pub fn write(&mut self, root: &Root, node_path: &str, bytes: &[u8], mode: u32) -> Result<(), ApplyError> {
        let target = root.path(node_path);
        let fs = |source| ApplyError::Fs {
            path: node_path.to_string(),
            source,
        };
        if !self.snapshots.iter().any(|(p, _)| *p == target) {
            let snap = Snapshot::take(&target).map_err(fs)?;
            self.note_missing_dirs(&target);
            self.snapshots.push((target.clone(), snap));
        }
        rootfs::write_atomic(&target, bytes, mode).map_err(fs)
    }
}

/// Formats a blank data volume first: the step most likely to fail (a
/// read-only or vanished device) runs before any file changes. A blank
/// device that got a filesystem is not undone by a rollback (nothing on it
/// is lost); the next run finds it formatted.
fn format_volumes(root: &Root, plan: &Plan) -> Result<(), ApplyError> {
    for action in &plan.actions {
        if let Op::FormatVolume(dev) = &action.op {
            crate::cache::device::format(root, dev).map_err(|e| ApplyError::Volume(Box::new(e)))?;
            tracing::info!(device = %dev.used, "formatted the data volume (ext4)");
        }
    }
    Ok(())
}

/// Applies every changed action of `plan` under `root`, or none of them.
/// On success the returned transaction still holds the undo log: the caller
/// commits it, or rolls back when a later step (systemd, health) fails.
pub async fn apply(root: &Root, plan: &Plan, http: HttpOptions) -> Result<(Applied, Transaction), ApplyError> {
    let mut txn = Transaction::default();
    let mut applied = Applied::default();
    // Temp files of an interrupted run never sit at final paths; clear them.
    let mut dirs: Vec<PathBuf> = plan
        .actions
        .iter()
        .filter_map(|a| root.path(&a.path).parent().map(Path::to_path_buf))
        .collect();
    dirs.dedup();
    for d in &dirs {
        sweep_temps(d);
    }
    let result = async {
        format_volumes(root, plan)?;
        let started = Instant::now();
        for action in plan.actions.iter().filter(|a| a.changed) {
            if let Op::Release(step) = &action.op {
                let fetcher = Fetcher::new(http.clone()).map_err(|source| ApplyError::Fetch {
                    what: "an HTTP client".into(),
                    source,
                })?;
                let m = install_release(root, &fetcher, step, &mut txn).await?;
                applied.release = Some(m);
            }
        }
        applied.release_seconds = started.elapsed().as_secs_f64();
        validate_soci_config(root, plan).await?;
        let started = Instant::now();
        apply_actions(&mut txn, root, &plan.actions)?;
        applied.files_seconds = started.elapsed().as_secs_f64();
        Ok(())
    }
    .await;
    match result {
        Ok(()) => Ok((applied, txn)),
        Err(e) => {
            tracing::error!(error = %crate::exit::error_chain(&e), "install failed; rolling back");
            txn.rollback();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn soci_messages_are_quoted_from_logrus() {
        let line = "time=\"2026-12-04T19:08:19Z\" level=fatal msg=\"config file at \\\"/tmp/x\\\": failed to parse config: invalid size format: 16MiB\" error=\"x\"\n";
        assert_eq!(
            super::soci_message(line),
            "config file at \"/tmp/x\": failed to parse config: invalid size format: 16MiB"
        );
        assert_eq!(super::soci_message("plain words\n\n"), "plain words");
    }
}
