//! The install report: JSON for machines, a compact listing for people.
//! Reports go to stdout; logs go to stderr.

use serde::Serialize;

use crate::exit::ExitKind;
use crate::host::HostFacts;
use crate::install::plan::{Action, ActionKind, Plan};
use crate::release::store::Manifest;

#[derive(Debug, Clone, Serialize)]
pub struct InstallReport {
    pub command: &'static str,
    pub agent_version: &'static str,
    pub dry_run: bool,
    /// 0 done, 1 failed (node left as it was), 2 usage/validation, 3 verification.
    pub exit_code: u8,
    pub outcome: ExitKind,
    pub changed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<HostFacts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan: Option<PlanSummary>,
    pub actions: Vec<Action>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub release: Option<Manifest>,
    /// What the systemd step did (absent with --no-start and --dry-run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub systemd: Option<crate::install::activate::Activation>,
    pub warnings: Vec<String>,
    pub notes: Vec<String>,
    pub next_steps: Vec<String>,
    /// Seconds per phase (detect, plan, release = download + verify +
    /// extract in one streaming pass, files, apply, systemd, total).
    pub phases: std::collections::BTreeMap<String, f64>,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanSummary {
    pub arch: String,
    pub wiring: crate::install::plan::Wiring,
    pub containerd_config_version: u8,
    pub daemon_binary: String,
    pub soci_unit: &'static str,
    /// Which SOCI runs and why.
    pub soci: crate::install::plan::SociChoice,
    /// The containerd version the wiring was written for, and its source.
    pub containerd: Option<String>,
}

impl PlanSummary {
    pub fn of(plan: &Plan) -> Self {
        PlanSummary {
            arch: plan.arch.to_string(),
            wiring: plan.wiring,
            containerd_config_version: plan.containerd_config_version.as_u8(),
            daemon_binary: plan.daemon_binary.clone(),
            soci_unit: plan.soci_unit,
            soci: plan.soci.clone(),
            containerd: plan.containerd.clone(),
        }
    }
}

impl InstallReport {
    pub fn new(dry_run: bool) -> Self {
        Self::for_command("install", dry_run)
    }

    pub fn for_command(command: &'static str, dry_run: bool) -> Self {
        InstallReport {
            command,
            agent_version: env!("CARGO_PKG_VERSION"),
            dry_run,
            exit_code: 0,
            outcome: ExitKind::Ok,
            changed: false,
            error: None,
            host: None,
            plan: None,
            actions: Vec::new(),
            release: None,
            systemd: None,
            warnings: Vec::new(),
            notes: Vec::new(),
            next_steps: Vec::new(),
            phases: Default::default(),
            seconds: 0.0,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }

    /// What the systemd step changed, in a few words.
    fn systemd_summary(&self) -> String {
        let Some(act) = &self.systemd else {
            return "nothing else changed".into();
        };
        let mut parts = Vec::new();
        if act.reloaded {
            parts.push("systemd reloaded".to_string());
        }
        if !act.enabled.is_empty() {
            parts.push(format!("enabled {}", act.enabled.join(", ")));
        }
        if !act.restarted.is_empty() {
            let names: Vec<&str> = act.restarted.iter().map(|(u, _)| u.as_str()).collect();
            parts.push(format!("(re)started {}", names.join(", ")));
        }
        if parts.is_empty() {
            "nothing else changed".into()
        } else {
            parts.join("; ")
        }
    }

    /// The human listing; diffs are shown for a dry run.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut out = format!("soci-agent {}: {}\n", self.command, self.headline());
        if let Some(line) = self.node_line() {
            let _ = writeln!(out, "{line}");
        }
        if self.outcome != ExitKind::Ok && !self.dry_run && !self.actions.is_empty() {
            let _ = writeln!(
                out,
                "nothing applied: the node is as it was (every change made was rolled back); the plan was:"
            );
        }
        for a in &self.actions {
            self.write_action(&mut out, a);
        }
        for (title, list) in [
            ("warning", &self.warnings),
            ("note", &self.notes),
            ("next", &self.next_steps),
        ] {
            for item in list {
                let _ = writeln!(out, "{title}: {item}");
            }
        }
        out
    }

    /// The first line's verdict: what happened, or why it failed.
    fn headline(&self) -> String {
        let n = self.actions.iter().filter(|a| a.changed).count();
        match (self.outcome, self.dry_run, n) {
            (ExitKind::Ok, true, 0) => "dry run: nothing to change".to_string(),
            (ExitKind::Ok, true, n) => format!("dry run: {n} change(s) planned, nothing changed"),
            (ExitKind::Ok, false, 0) if self.changed => {
                format!("done: no file changed; {}", self.systemd_summary())
            }
            (ExitKind::Ok, false, 0) => "nothing to do: the node already matches (no file changed)".to_string(),
            (ExitKind::Ok, false, n) => format!("done: {n} change(s) applied"),
            (kind, _, _) => format!(
                "FAILED (exit {}): {}",
                kind.code(),
                self.error.as_deref().unwrap_or("unknown error")
            ),
        }
    }

    /// "node: OS, arch, containerd, wiring, SOCI binary" when the plan got that far.
    fn node_line(&self) -> Option<String> {
        let (h, p) = (self.host.as_ref()?, self.plan.as_ref()?);
        let containerd = h
            .containerd
            .as_ref()
            .map_or("unknown".to_string(), |c| c.version.clone());
        let os = match (h.os.id.as_str(), h.os.version_id.as_str()) {
            ("", _) => "unknown OS".to_string(),
            (id, "") => id.to_string(),
            (id, v) => format!("{id} {v}"),
        };
        let wiring = match p.wiring {
            crate::install::plan::Wiring::Nodeadm => "nodeadm (NodeConfig drop-in)",
            crate::install::plan::Wiring::Containerd => "containerd config",
        };
        Some(format!(
            "node: {os}, arch {}, containerd {containerd} (config v{}), wiring {wiring}, SOCI binary {} (SOCI {}, {})",
            p.arch,
            p.containerd_config_version,
            p.daemon_binary,
            p.soci.version.map_or("version unknown".to_string(), |v| v.to_string()),
            p.soci.origin
        ))
    }

    /// One action's line, and its diff on a dry run.
    fn write_action(&self, out: &mut String, a: &Action) {
        use std::fmt::Write;
        let verb = match a.action {
            ActionKind::Create => "create",
            ActionKind::Update => "update",
            ActionKind::Unchanged => "unchanged",
            ActionKind::Backup => "backup",
            ActionKind::Symlink => "symlink",
            ActionKind::InstallRelease => "install",
            ActionKind::KeepRelease => "keep",
            ActionKind::Remove => "remove",
            ActionKind::Restore => "restore",
            ActionKind::Format => "format",
        };
        let _ = writeln!(out, "  {verb:<10} {}  ({})", a.path, a.detail);
        if let Some(d) = a.diff.as_deref().filter(|d| !d.is_empty() && self.dry_run) {
            for line in d.lines() {
                let _ = writeln!(out, "      {line}");
            }
        }
    }
}
