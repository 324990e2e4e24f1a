//! Drift: are the files install owns still what install would write?
//!
//! "Owned" is what the install record lists (`record.paths`: every path
//! soci-agent ever wrote) plus the release store entry. "What install would
//! write" is [`crate::install::plan::build`] with the daemon's install settings (the
//! `[install]` table and `SOCI_AGENT_*`): an action with `changed == false`
//! means no drift. The containerd config is merged, not replaced, so edits a
//! person made to other keys are not drift; only losing the soci wiring is.
//!
//! A drifted file or link can be put back ([`Fix`]), from what install
//! wrote and the verified store entry in use; never another SOCI: when the
//! plan wants another binary than the record's, nothing is repaired and the
//! check says to run install. A stale store entry or
//! a different agent binary cannot (that is `soci-agent install`'s job, or a
//! restart of the daemon after an upgrade), nor is the install record
//! rewritten: those are reported only.

use crate::paths::RECORD;
use std::path::Path;

use crate::doctor::Check;
use crate::install::plan::{Action, ActionKind, Effects, Op, PlanError};
use crate::install::record::Record;
use crate::install::settings::InstallSettings;
use crate::rootfs::{self, FsError, Root};

use super::state::FileDrift;

pub const CHECK_ID: &str = "agent.drift";

/// How to put one drifted path back.
#[derive(Debug, Clone)]
pub struct Fix {
    pub path: String,
    pub op: FixOp,
    /// What the change means for running services (from the plan).
    pub effects: Effects,
    /// Why (one line, for the repair log).
    pub why: String,
}

#[derive(Debug, Clone)]
pub enum FixOp {
    Write { content: Vec<u8>, mode: u32 },
    Symlink { target: String },
}

impl FixOp {
    pub fn action(&self) -> &'static str {
        match self {
            FixOp::Write { .. } => "rewrite",
            FixOp::Symlink { .. } => "relink",
        }
    }
}

/// The outcome of one look.
#[derive(Debug, Clone)]
pub struct Assessment {
    pub check: Check,
    pub files: Vec<FileDrift>,
    pub fixes: Vec<Fix>,
}

impl Assessment {
    fn only(check: Check) -> Self {
        Assessment {
            check,
            files: Vec::new(),
            fixes: Vec::new(),
        }
    }
}

/// `+3 -1 lines` from a unified diff.
fn diff_size(diff: Option<&str>) -> String {
    let Some(d) = diff else { return String::new() };
    let count = |c: char| {
        d.lines()
            .filter(|l| l.starts_with(c) && !l.starts_with("+++") && !l.starts_with("---"))
            .count()
    };
    format!("+{} -{} lines", count('+'), count('-'))
}

/// Compares what the record says install wrote with what it would write now.
pub async fn assess(root: &Root, settings: &InstallSettings) -> Assessment {
    let record = match load_record(root) {
        Ok(r) => r,
        Err(check) => return Assessment::only(check),
    };
    let facts = crate::host::detect(root).await;
    let plan = match crate::install::plan::build(settings, &facts) {
        Ok(p) => p,
        Err(e) => return Assessment::only(unplannable(&e)),
    };
    let mut files = Vec::new();
    let mut fixes = Vec::new();
    for a in plan.actions.iter().filter(|a| owned(a, &record)) {
        let (file, fix) = compare(root, a);
        files.push(file);
        fixes.extend(fix);
    }
    if switches_soci(&record, &plan) {
        // Another SOCI is wanted than the one installed (the AMI's package
        // changed, or the config file asks for another version): switching
        // is install's job, and the files for it belong to that SOCI.
        return Assessment {
            check: switch_wanted(&record, &plan),
            files,
            fixes: Vec::new(),
        };
    }
    let check = verdict(&files);
    Assessment { check, files, fixes }
}

/// Would the plan run another SOCI than the record's (another binary, or
/// another version behind the same link)?
fn switches_soci(record: &Record, plan: &crate::install::plan::Plan) -> bool {
    let version = plan.soci.version.map(|v| v.to_string()).unwrap_or_default();
    plan.daemon_binary != record.daemon_binary || (!record.soci_version.is_empty() && version != record.soci_version)
}

/// The check when the desired SOCI is not the installed one.
fn switch_wanted(record: &Record, plan: &crate::install::plan::Plan) -> Check {
    Check::warn(
        CHECK_ID,
        format!(
            "install would now run {} (SOCI {}: {}), the node runs {} (SOCI {}); the daemon never switches SOCI \
             on its own and repairs nothing until install has run",
            plan.daemon_binary,
            plan.soci
                .version
                .map(|v| v.to_string())
                .unwrap_or_else(|| "of unknown version".into()),
            plan.soci.reason,
            record.daemon_binary,
            if record.soci_version.is_empty() {
                "of unknown version"
            } else {
                &record.soci_version
            },
        ),
        "run soci-agent install --dry-run to see the switch, then soci-agent install to make it",
    )
}

/// The install record, or the check that says why there is none to compare with.
fn load_record(root: &Root) -> Result<Record, Check> {
    match Record::load(root) {
        Ok(Some(r)) => Ok(r),
        Ok(None) => Err(Check::skip(
            CHECK_ID,
            format!("no install record ({RECORD}): soci-agent has not installed here"),
        )),
        Err(e) => Err(Check::warn(
            CHECK_ID,
            crate::exit::error_chain(&e),
            "run soci-agent install (it rewrites the record)",
        )),
    }
}

/// The check when install's plan cannot be computed with the daemon's settings.
fn unplannable(e: &PlanError) -> Check {
    Check::warn(
        CHECK_ID,
        format!(
            "cannot compute what install would write: {}",
            crate::exit::error_chain(e)
        ),
        "fix the [install] settings, or run soci-agent install to see the error",
    )
}

/// Is `a` about a path install owns (the record lists it, or the release store entry)?
fn owned(a: &Action, record: &Record) -> bool {
    let store = matches!(a.action, ActionKind::InstallRelease | ActionKind::KeepRelease);
    !matches!(a.op, Op::Backup { .. }) && (store || record.paths.contains_key(&a.path))
}

/// One owned path compared with the plan: its drift entry, and how to put it back if it can be.
fn compare(root: &Root, a: &Action) -> (FileDrift, Option<Fix>) {
    if !a.changed {
        let file = FileDrift {
            path: a.path.clone(),
            state: "ok",
            detail: String::new(),
            repairable: false,
        };
        return (file, None);
    }
    let (state, detail, fix) = difference(root, a);
    let state = if a.path == RECORD { "record" } else { state };
    let file = FileDrift {
        path: a.path.clone(),
        state,
        detail: detail.clone(),
        repairable: fix.is_some(),
    };
    let fix = fix.map(|op| Fix {
        path: a.path.clone(),
        op,
        effects: a.effects,
        why: detail,
    });
    (file, fix)
}

/// How a changed action's path differs (state, one-line detail) and the op that puts it back.
fn difference(root: &Root, a: &Action) -> (&'static str, String, Option<FixOp>) {
    match &a.op {
        Op::Write { content, mode } => {
            let (state, detail) = content_difference(root, a, content, *mode);
            let fix = (a.path != RECORD).then(|| FixOp::Write {
                content: content.clone(),
                mode: *mode,
            });
            (state, detail, fix)
        }
        Op::Symlink { target } => {
            let now = std::fs::read_link(root.path(&a.path))
                .map(|t| format!("-> {}", t.display()))
                .unwrap_or_else(|_| "not a symlink, or missing".into());
            let fix = FixOp::Symlink { target: target.clone() };
            ("link", format!("{now}, want -> {target}"), Some(fix))
        }
        Op::Release(_) => ("release", format!("{}: run soci-agent install", a.detail), None),
        Op::Copy { .. } => (
            "changed",
            "differs from the running daemon's binary (restart the daemon after an upgrade)".into(),
            None,
        ),
        _ => ("changed", a.detail.clone(), None),
    }
}

/// A file install would write: missing, only its mode differs, or its content does.
fn content_difference(root: &Root, a: &Action, content: &[u8], mode: u32) -> (&'static str, String) {
    match root.read_opt(&a.path).ok().flatten() {
        None => ("missing", "missing".to_string()),
        Some(b) if b == content => ("mode", format!("mode is not {mode:04o}")),
        Some(_) => (
            "changed",
            format!("content differs: install would write {}", diff_size(a.diff.as_deref())),
        ),
    }
}

fn verdict(files: &[FileDrift]) -> Check {
    let drifted: Vec<String> = files
        .iter()
        .filter(|f| f.state != "ok")
        .map(|f| format!("{} ({})", f.path, f.detail))
        .collect();
    if drifted.is_empty() {
        return Check::ok(
            CHECK_ID,
            format!("{} paths install owns are as install would write them", files.len()),
        );
    }
    let evidence = format!(
        "{} of {} paths drifted: {}",
        drifted.len(),
        files.len(),
        drifted.join("; ")
    );
    if files.iter().any(|f| f.state != "ok" && f.repairable) {
        Check::fail(
            CHECK_ID,
            evidence,
            "soci-agent install puts them back (or [daemon] repair = true); soci-agent install --dry-run shows the diff",
        )
    } else {
        Check::warn(
            CHECK_ID,
            evidence,
            "run soci-agent install (soci-agent install --dry-run shows what it would do)",
        )
    }
}

/// Puts one path back, atomically.
pub fn apply(root: &Root, fix: &Fix) -> Result<(), FsError> {
    let path = root.path(&fix.path);
    match &fix.op {
        FixOp::Write { content, mode } => rootfs::write_atomic(&path, content, *mode),
        FixOp::Symlink { target } => rootfs::symlink_atomic(Path::new(target), &path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_sizes() {
        assert_eq!(
            diff_size(Some("--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n+c\n")),
            "+2 -1 lines"
        );
        assert_eq!(diff_size(None), "");
    }

    #[test]
    fn verdicts() {
        let f = |state: &'static str, repairable| FileDrift {
            path: "/etc/x".into(),
            state,
            detail: "d".into(),
            repairable,
        };
        assert_eq!(verdict(&[f("ok", false)]).verdict, crate::doctor::Verdict::Ok);
        assert_eq!(
            verdict(&[f("ok", false), f("changed", true)]).verdict,
            crate::doctor::Verdict::Fail
        );
        let w = verdict(&[f("release", false)]);
        assert_eq!(w.verdict, crate::doctor::Verdict::Warn);
        assert!(
            w.evidence.contains("1 of 1 paths drifted: /etc/x (d)"),
            "{}",
            w.evidence
        );
    }
}
