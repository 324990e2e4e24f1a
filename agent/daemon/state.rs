//! The daemon's live state: what the status socket answers (as JSON) and
//! what `/metrics` renders. One value behind a mutex, replaced piecewise by
//! the reconcile loop and the image warmer; readers clone what they need
//! under the lock and never wait on I/O while holding it.
//!
//! Everything here is bounded: one entry per check, per file the agent
//! owns, per configured image, per reported command; the repair history
//! keeps the last [`RECENT_REPAIRS`] events.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::config::Shown;
use crate::doctor::{Summary, Verdict};

/// Repair events kept for the status socket.
pub const RECENT_REPAIRS: usize = 20;

pub type Shared = Arc<Mutex<Live>>;

/// Locks the state; a panic elsewhere while holding it does not stop readers.
pub fn lock(shared: &Shared) -> MutexGuard<'_, Live> {
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Seconds since the epoch, now.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// One check's latest verdict.
#[derive(Debug, Clone, Serialize)]
pub struct CheckState {
    pub id: String,
    pub verdict: Verdict,
    pub evidence: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
    /// When the verdict last changed (unix seconds).
    pub since: f64,
}

/// A file (or link, or the release store entry) install owns, compared with
/// what install would write now.
#[derive(Debug, Clone, Serialize)]
pub struct FileDrift {
    pub path: String,
    /// `ok`, `changed`, `missing`, `mode`, `link`, `release`.
    pub state: &'static str,
    /// What differs, in one line.
    pub detail: String,
    /// The daemon can put it back (a file or link it wrote), given `repair = true`.
    pub repairable: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RepairEvent {
    pub at: f64,
    /// A node path, or a unit name.
    pub target: String,
    /// `rewrite`, `relink`, `start`, `restart`, `daemon-reload`.
    pub action: &'static str,
    /// `ok` or `failed`.
    pub result: &'static str,
    pub detail: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Repairs {
    pub enabled: bool,
    /// Repairs attempted since start (successful or not).
    pub total: u64,
    pub failed: u64,
    /// Attempts in the last hour, against `budget`.
    pub last_hour: u32,
    pub budget: u32,
    /// A repair was due but the hourly budget was spent.
    pub budget_exhausted: bool,
    /// What the last reconcile found to do but did not (backoff, budget,
    /// `restart_containerd = false`, no bus), one line each.
    pub pending: Vec<String>,
    pub recent: VecDeque<RepairEvent>,
}

impl Repairs {
    pub fn push(&mut self, e: RepairEvent) {
        self.total += 1;
        if e.result != "ok" {
            self.failed += 1;
        }
        if self.recent.len() == RECENT_REPAIRS {
            self.recent.pop_front();
        }
        self.recent.push_back(e);
    }
}

/// One configured image, as the warmer last saw it.
#[derive(Debug, Clone, Serialize)]
pub struct ImageStatus {
    /// As configured.
    pub image: String,
    /// Normalized; absent when invalid.
    pub reference: Option<String>,
    /// `pending` (not looked at yet), `hit`, `pulled`, `failed`, `absent`.
    pub state: &'static str,
    pub bytes: Option<u64>,
    /// Seconds the last check or pull took.
    pub seconds: f64,
    pub image_id: Option<String>,
    pub pinned: Option<bool>,
    pub error: Option<String>,
    /// The manifest digest the tag resolved to at the last refresh.
    pub digest: Option<String>,
    /// The digest it resolved to before it moved (unpinned when `pin = true`).
    pub previous_digest: Option<String>,
    pub checked_at: Option<f64>,
    pub refreshed_at: Option<f64>,
    /// When the tag is re-resolved next (with `refresh`; jittered).
    pub next_refresh_at: Option<f64>,
    /// Pulls done (not hits) since the daemon started.
    pub pulls: u64,
    /// Times the tag was seen to move.
    pub moves: u64,
    /// The last refresh's error, if it failed.
    pub refresh_error: Option<String>,
}

impl ImageStatus {
    pub fn pending(image: &str, reference: Option<String>) -> Self {
        ImageStatus {
            image: image.to_string(),
            reference,
            state: "pending",
            bytes: None,
            seconds: 0.0,
            image_id: None,
            pinned: None,
            error: None,
            digest: None,
            previous_digest: None,
            checked_at: None,
            refreshed_at: None,
            next_refresh_at: None,
            pulls: 0,
            moves: 0,
            refresh_error: None,
        }
    }
}

/// Figures from the newest run report of one command (`install`, `boot`, `prefetch`).
#[derive(Debug, Clone, Serialize)]
pub struct RunFigures {
    pub command: &'static str,
    pub path: String,
    /// When it was saved (from its file name), unix seconds.
    pub at: f64,
    pub exit_code: Option<u64>,
    /// Seconds per phase, step or image (bounded).
    pub phases: Vec<(String, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigProblem {
    pub at: f64,
    pub error: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct LastReconcile {
    pub at: f64,
    pub seconds: f64,
}

/// The whole state, as the status socket answers it.
#[derive(Debug, Clone, Serialize)]
pub struct Live {
    pub pid: u32,
    pub agent_version: &'static str,
    pub started_at: f64,
    /// False until the first reconcile is done (READY=1 goes out then).
    pub ready: bool,
    pub config: Shown,
    /// 1 at start, +1 per successful reload.
    pub config_generation: u64,
    /// The last reload that was refused (the old config kept running).
    pub config_error: Option<ConfigProblem>,
    pub config_errors: u64,
    pub reconciles: u64,
    pub last_reconcile: Option<LastReconcile>,
    pub summary: Summary,
    pub checks: Vec<CheckState>,
    pub drift: Vec<FileDrift>,
    pub repairs: Repairs,
    pub images: Vec<ImageStatus>,
    pub reports: Vec<RunFigures>,
}

impl Live {
    pub fn new(config: Shown, repair_budget: u32, repair: bool) -> Self {
        Live {
            pid: std::process::id(),
            agent_version: env!("CARGO_PKG_VERSION"),
            started_at: unix_now(),
            ready: false,
            config,
            config_generation: 1,
            config_error: None,
            config_errors: 0,
            reconciles: 0,
            last_reconcile: None,
            summary: Summary::default(),
            checks: Vec::new(),
            drift: Vec::new(),
            repairs: Repairs {
                enabled: repair,
                budget: repair_budget,
                ..Repairs::default()
            },
            images: Vec::new(),
            reports: Vec::new(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("daemon state serializes")
    }

    /// One line for `STATUS=` and logs.
    pub fn status_line(&self) -> String {
        let s = &self.summary;
        format!(
            "reconcile {}: {} ok, {} warn, {} fail, {} skip; {} drifted; {} repairs",
            self.reconciles,
            s.ok,
            s.warn,
            s.fail,
            s.skip,
            self.drift.iter().filter(|d| d.state != "ok").count(),
            self.repairs.total
        )
    }
}

impl CheckState {
    pub fn is_ok(&self) -> bool {
        self.verdict == Verdict::Ok
    }
}
