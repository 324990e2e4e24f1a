//! The plan under construction: the actions so far, and the warnings and
//! notes the steps add. Its methods compare what a path holds with what it
//! should hold and plan the difference.

use crate::paths::BACKUP_DIR;

use crate::files::units;
use crate::release::store;
use crate::rootfs::{FsError, Root};

use super::{Action, ActionKind, Effects, Op};

/// True when soci-agent wrote this file (its marker comment).
fn written_by_agent(text: &str) -> bool {
    units::is_ours(text) || text.starts_with("# Written by soci-agent")
}

/// The action that changes `path` when `changed`, or leaves it alone.
fn change(path: &str, kind: ActionKind, changed: bool, detail: String, op: Op, effects: Effects) -> Action {
    Action {
        path: path.to_string(),
        action: kind,
        changed,
        detail,
        diff: None,
        op: if changed { op } else { Op::Nothing },
        effects: if changed { effects } else { Effects::default() },
    }
}

/// The plan being built: its actions, warnings and notes, in order.
pub(super) struct Builder<'a> {
    pub(super) root: &'a Root,
    pub(super) actions: Vec<Action>,
    pub(super) warnings: Vec<String>,
    pub(super) notes: Vec<String>,
}

impl<'a> Builder<'a> {
    /// An empty plan for `root`, starting with the settings' warnings.
    pub(super) fn new(root: &'a Root, warnings: Vec<String>) -> Self {
        Builder {
            root,
            actions: Vec::new(),
            warnings,
            notes: Vec::new(),
        }
    }

    /// Plans copying `path` into the backup dir, unless a backup exists.
    fn back_up_once(&mut self, path: &str, detail: String) {
        let backup = format!("{BACKUP_DIR}{path}");
        if !self.root.exists(&backup) {
            self.actions.push(Action {
                path: backup,
                action: ActionKind::Backup,
                changed: true,
                detail,
                diff: None,
                op: Op::Backup {
                    source: path.to_string(),
                },
                effects: Effects::default(),
            });
        }
    }

    /// Plans writing `content` at `path`, with a backup of a foreign
    /// original before its first change.
    pub(super) fn file(&mut self, path: &str, content: String, mode: u32, effects: Effects) -> Result<(), FsError> {
        let old = self.root.read_opt(path)?;
        let old_text = old.as_deref().map(String::from_utf8_lossy);
        let existing_mode = std::fs::metadata(self.root.resolve(path))
            .ok()
            .filter(|m| m.is_file())
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777);
        // Someone else's file we edit keeps its mode (a 0600 containerd config
        // may hold registry credentials); files soci-agent wrote get `mode`.
        let mode = match (&old_text, existing_mode) {
            (Some(text), Some(m)) if !written_by_agent(text) => m,
            _ => mode,
        };
        let (kind, changed) = match &old {
            None => (ActionKind::Create, true),
            Some(b) if b == content.as_bytes() && existing_mode == Some(mode) => (ActionKind::Unchanged, false),
            Some(_) => (ActionKind::Update, true),
        };
        if changed
            && let Some(text) = &old_text
            && !written_by_agent(text)
        {
            self.back_up_once(path, format!("copy of {path} before its first change"));
        }
        let diff = changed.then(|| crate::diff::unified(path, old_text.as_deref(), &content));
        let op = Op::Write {
            content: content.into_bytes(),
            mode,
        };
        self.actions.push(Action {
            diff,
            ..change(path, kind, changed, format!("mode {mode:04o}"), op, effects)
        });
        Ok(())
    }

    /// Plans installing an executable (no diff; compared by content).
    pub(super) fn binary(&mut self, path: &str, source: &std::path::Path) -> Result<(), FsError> {
        let read_err = |p: &std::path::Path| {
            let p = p.to_path_buf();
            move |source| FsError::Read { path: p, source }
        };
        let want = store::sha256_file(source).map_err(read_err(source))?;
        let size = std::fs::metadata(source).map_err(read_err(source))?.len();
        let target = self.root.path(path);
        let (kind, changed) = match store::sha256_file(&target) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (ActionKind::Create, true),
            Err(e) => return Err(read_err(&target)(e)),
            Ok(have) if have == want => (ActionKind::Unchanged, false),
            Ok(_) => (ActionKind::Update, true),
        };
        let op = Op::Copy {
            source: source.to_path_buf(),
            mode: 0o755,
        };
        let detail = format!("{size} bytes, sha256 {want}, mode 0755");
        self.actions
            .push(change(path, kind, changed, detail, op, Effects::default()));
        Ok(())
    }

    /// Plans pointing the symlink `path` at `target`, with a backup of a
    /// file (not a link) in its place.
    pub(super) fn symlink(&mut self, path: &str, target: &str, effects: Effects) -> Result<(), FsError> {
        let resolved = self.root.path(path);
        let current = std::fs::symlink_metadata(&resolved).ok();
        let is_link = current.as_ref().is_some_and(|m| m.file_type().is_symlink());
        let same = is_link && std::fs::read_link(&resolved).is_ok_and(|t| t == std::path::Path::new(target));
        if current.is_some() && !is_link {
            self.back_up_once(
                path,
                format!("copy of {path} (a file, not soci-agent's link) before it is replaced"),
            );
        }
        let kind = if same {
            ActionKind::Unchanged
        } else {
            ActionKind::Symlink
        };
        let op = Op::Symlink {
            target: target.to_string(),
        };
        self.actions
            .push(change(path, kind, !same, format!("-> {target}"), op, effects));
        Ok(())
    }
}
