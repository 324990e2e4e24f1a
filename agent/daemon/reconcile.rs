//! One reconcile: run doctor's checks (`crate::doctor::diagnose`, cheap and
//! live: the sockets, containerd, systemd over D-Bus) plus the drift check
//! (`drift`), log every verdict that changed since the last reconcile (once,
//! not every loop), repair what the agent owns when `repair = true`
//! (`repair` and `units`), read the newest run reports, and publish the
//! result to the shared state.

mod units;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use super::config::Config;
use super::drift::{self, Assessment, Fix};
use super::repair::{Budget, Deferred};
use super::state::{CheckState, FileDrift, LastReconcile, RepairEvent, RunFigures, Shared, lock, unix_now};
use crate::doctor::{Check, DoctorContext, Summary, Verdict};
use crate::install::plan::Effects;
use crate::rootfs::Root;

/// Where the daemons are, as given on the command line.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    /// D-Bus address of systemd; `None` = the system bus when the root is `/`.
    pub bus_address: Option<String>,
    pub containerd_socket: Option<PathBuf>,
    pub soci_socket: Option<PathBuf>,
}

/// What one reconcile's repairs did and left undone.
#[derive(Debug, Default)]
pub struct Outcome {
    pub events: Vec<RepairEvent>,
    pub pending: Vec<String>,
    pub budget_exhausted: bool,
}

/// Whether files may be put back now.
enum FileLock {
    /// Taken (shared): files may be put back while it is held (released on drop).
    Held { _lock: nix::fcntl::Flock<std::fs::File> },
    /// Install or uninstall holds it: no repair at all this time.
    Busy,
    /// It cannot be taken: files are not put back, units still are.
    Unavailable,
}

pub struct Reconciler {
    pub(super) root: Root,
    pub(super) ends: Endpoints,
    pub(super) cfg: Arc<Config>,
    shared: Shared,
    /// Last verdict per check id and since when (unix seconds).
    last: BTreeMap<String, (Verdict, f64)>,
    pub(super) budget: Budget,
    /// The last deferral reason logged per target (logged again only when it changes).
    deferred: HashMap<String, String>,
    /// Owned paths seen as install would write them since start or the last install run:
    /// only their drift is repaired (see [`Reconciler::repairable`]).
    seen_ok: BTreeSet<String>,
    /// The newest install report seen (a new one resets `seen_ok`).
    install_report: Option<String>,
    reconciles: u64,
}

impl Reconciler {
    pub fn new(root: Root, ends: Endpoints, cfg: Arc<Config>, shared: Shared) -> Self {
        let budget = Budget::new(cfg.max_repairs_per_hour, cfg.repair_backoff);
        Reconciler {
            root,
            ends,
            cfg,
            shared,
            last: BTreeMap::new(),
            budget,
            deferred: HashMap::new(),
            seen_ok: BTreeSet::new(),
            install_report: None,
            reconciles: 0,
        }
    }

    /// A new configuration generation (after a reload).
    pub fn set_config(&mut self, cfg: Arc<Config>) {
        self.budget.configure(cfg.max_repairs_per_hour, cfg.repair_backoff);
        self.cfg = cfg;
    }

    fn doctor_context(&self) -> DoctorContext {
        DoctorContext {
            root: self.root.clone(),
            soci_root: None,
            containerd_config: self.cfg.install.containerd_config.clone(),
            bus_address: self.ends.bus_address.clone(),
            live: true,
            containerd_socket: self.ends.containerd_socket.clone(),
            soci_socket: self.ends.soci_socket.clone(),
            now: std::time::SystemTime::now(),
        }
    }

    /// Runs one reconcile and publishes it.
    pub async fn run_once(&mut self) {
        let started = Instant::now();
        let mut checks = crate::doctor::diagnose(&self.doctor_context()).await;
        let assessment = drift::assess(&self.root, &self.cfg.install).await;
        checks.push(assessment.check.clone());
        let now = unix_now();
        self.note_transitions(&checks, now);
        let previous = lock(&self.shared).reports.clone();
        let reports = super::figures::refresh(&self.root, &previous);
        self.note_baseline(&reports, &assessment);
        let outcome = if self.cfg.repair {
            self.repair(&checks, &assessment).await
        } else {
            Outcome::default()
        };
        self.reconciles += 1;
        self.publish(&checks, assessment.files, outcome, reports, now, started);
    }

    /// Replaces the shared state's view of the node with this reconcile's findings.
    fn publish(
        &mut self,
        checks: &[Check],
        drift: Vec<FileDrift>,
        outcome: Outcome,
        reports: Vec<RunFigures>,
        now: f64,
        started: Instant,
    ) {
        let last_hour = self.budget.last_hour(Instant::now());
        let mut live = lock(&self.shared);
        live.summary = Summary::of(checks);
        live.checks = checks.iter().map(|c| self.check_state(c, now)).collect();
        live.drift = drift;
        for e in outcome.events {
            live.repairs.push(e);
        }
        live.repairs.enabled = self.cfg.repair;
        live.repairs.budget = self.cfg.max_repairs_per_hour;
        live.repairs.last_hour = last_hour;
        live.repairs.budget_exhausted = outcome.budget_exhausted;
        live.repairs.pending = outcome.pending;
        live.reports = reports;
        live.reconciles = self.reconciles;
        live.last_reconcile = Some(LastReconcile {
            at: unix_now(),
            seconds: started.elapsed().as_secs_f64(),
        });
        live.ready = true;
    }

    /// A check as the status shows it, with since when its verdict holds.
    fn check_state(&self, c: &Check, now: f64) -> CheckState {
        CheckState {
            id: c.id.to_string(),
            verdict: c.verdict,
            evidence: c.evidence.clone(),
            advice: c.advice.clone(),
            since: self.last.get(c.id).map_or(now, |(_, since)| *since),
        }
    }

    /// Logs each verdict that changed (and, at the first reconcile, each that is not ok).
    fn note_transitions(&mut self, checks: &[Check], now: f64) {
        let first = self.last.is_empty();
        for c in checks {
            let advice = c.advice.as_deref().unwrap_or("");
            match self.last.get(c.id) {
                Some((was, _)) if *was == c.verdict => continue,
                Some((was, _)) => {
                    let (from, to) = (was.as_str(), c.verdict.as_str());
                    match c.verdict {
                        Verdict::Ok | Verdict::Skip => {
                            tracing::info!(check = c.id, from, to, evidence = c.evidence.as_str(), "check changed")
                        }
                        Verdict::Warn | Verdict::Fail => tracing::warn!(
                            check = c.id,
                            from,
                            to,
                            evidence = c.evidence.as_str(),
                            advice,
                            "check changed"
                        ),
                    }
                }
                None if first && matches!(c.verdict, Verdict::Warn | Verdict::Fail) => tracing::warn!(
                    check = c.id,
                    to = c.verdict.as_str(),
                    evidence = c.evidence.as_str(),
                    advice,
                    "check at start"
                ),
                None => {}
            }
            self.last.insert(c.id.to_string(), (c.verdict, now));
        }
        self.last.retain(|id, _| checks.iter().any(|c| c.id == id));
    }

    /// Tracks which owned paths were seen as install writes them. A new install run (a new
    /// install report) starts over: what it wrote is the new baseline, and a path that
    /// differs from the daemon's plan right after it (install ran with flags the daemon does
    /// not know, or is still running) is reported, never "repaired" back.
    fn note_baseline(&mut self, reports: &[RunFigures], a: &Assessment) {
        let newest = reports.iter().find(|r| r.command == "install").map(|r| r.path.clone());
        if newest != self.install_report {
            if self.install_report.is_some() {
                tracing::info!(report = ?newest, "a new install run: drift is judged from what it wrote");
            }
            self.install_report = newest;
            self.seen_ok.clear();
        }
        for f in a.files.iter().filter(|f| f.state == "ok") {
            self.seen_ok.insert(f.path.clone());
        }
        self.seen_ok.retain(|p| a.files.iter().any(|f| &f.path == p));
    }

    /// Only drift the daemon saw happen is repaired.
    fn repairable(&self, path: &str) -> bool {
        self.seen_ok.contains(path)
    }

    /// Notes that `target` was not repaired now (logged when the reason changes).
    pub(super) fn defer(&mut self, target: &str, why: &Deferred, out: &mut Outcome) {
        let line = format!("{target}: {why}");
        if self.deferred.get(target) != Some(&line) {
            tracing::info!(target, reason = %why, "repair deferred");
            self.deferred.insert(target.to_string(), line.clone());
        }
        out.budget_exhausted |= *why == Deferred::Budget;
        out.pending.push(line);
    }

    /// Counts an attempt on `target` now.
    pub(super) fn attempt(&mut self, target: &str) {
        self.budget.record(target, Instant::now());
        self.deferred.remove(target);
    }

    /// Forgets `target`'s backoff: it is healthy.
    pub(super) fn healthy(&mut self, target: &str) {
        self.budget.healthy(target);
        self.deferred.remove(target);
    }

    /// Puts back the drifted files it may (under the install lock), then repairs units.
    async fn repair(&mut self, checks: &[Check], a: &Assessment) -> Outcome {
        let mut out = Outcome::default();
        for f in a.files.iter().filter(|f| f.state == "ok") {
            self.healthy(&f.path);
        }
        let mut effects = Effects::default();
        let install_lock = self.install_lock(&mut out);
        match install_lock {
            FileLock::Busy => return out,
            FileLock::Unavailable => {}
            FileLock::Held { .. } => {
                for fix in &a.fixes {
                    self.repair_file(fix, &mut effects, &mut out);
                }
            }
        }
        drop(install_lock);
        units::repair(self, checks, effects, &mut out).await;
        out
    }

    /// Tries the install lock for file repairs; says in `out` why files wait or are skipped.
    fn install_lock(&self, out: &mut Outcome) -> FileLock {
        match super::repair::try_install_lock(&self.root) {
            Ok(Some(l)) => FileLock::Held { _lock: l },
            Ok(None) => {
                out.pending.push(format!(
                    "{}: held (install or uninstall is changing the node): repairs wait",
                    crate::install::lock::path_for(&self.root).display()
                ));
                FileLock::Busy
            }
            Err(e) => {
                out.pending.push(format!("install lock: {e}: file repairs skipped"));
                FileLock::Unavailable
            }
        }
    }

    /// Puts one drifted path back when it may (seen healthy, within budget), noting the effects.
    fn repair_file(&mut self, fix: &Fix, effects: &mut Effects, out: &mut Outcome) {
        if !self.repairable(&fix.path) {
            out.pending.push(format!(
                "{}: drifted before the daemon saw it as install writes it (since start or the last \
                 install): not put back; soci-agent install --dry-run shows the difference",
                fix.path
            ));
            return;
        }
        if let Err(why) = self.budget.permit(&fix.path, Instant::now()) {
            self.defer(&fix.path, &why, out);
            return;
        }
        self.attempt(&fix.path);
        let action = fix.op.action();
        let (result, detail) = self.put_back(fix, effects);
        out.events.push(RepairEvent {
            at: unix_now(),
            target: fix.path.clone(),
            action,
            result,
            detail,
        });
    }

    /// Writes `fix` (logged); on success its effects join `effects`. The event's result and detail.
    fn put_back(&self, fix: &Fix, effects: &mut Effects) -> (&'static str, String) {
        let action = fix.op.action();
        match drift::apply(&self.root, fix) {
            Ok(()) => {
                tracing::warn!(
                    path = fix.path.as_str(),
                    action,
                    why = fix.why.as_str(),
                    "repaired a drifted file"
                );
                effects.daemon_reload |= fix.effects.daemon_reload;
                effects.restart_soci |= fix.effects.restart_soci;
                effects.restart_containerd |= fix.effects.restart_containerd;
                ("ok", format!("was: {}", fix.why))
            }
            Err(e) => {
                let e = crate::exit::error_chain(&e);
                tracing::error!(path = fix.path.as_str(), action, error = e.as_str(), "repair failed");
                ("failed", e)
            }
        }
    }
}

/// The verdict of check `id`, if it ran.
pub fn verdict_of<'a>(checks: &'a [Check], id: &str) -> Option<&'a Check> {
    checks.iter().find(|c| c.id == id)
}
