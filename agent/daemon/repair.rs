//! Repairs: what the loop may do about what it found, and how often.
//!
//! - Files: a drifted file or link install owns is put back atomically
//!   (`drift::apply`), then systemd is told (`Reload` when a unit file
//!   changed).
//! - `soci-snapshotter.service` down while containerd runs (doctor's
//!   `systemd.soci-service` fails with the unit inactive or failed): a
//!   `StartUnit` over D-Bus. A start does not touch containerd.
//! - Restarting a *running* snapshotter (its config was put back, or its
//!   socket stopped answering) also restarts containerd: containerd
//!   `Requires=` it and systemd propagates restarts along `Requires=`. So
//!   that, and restarting containerd itself (its wiring was put back, or
//!   it does not list soci), happen only with `restart_containerd = true`;
//!   otherwise the status says what is pending.
//!
//! Every repair (a file, a link, a unit start or restart) counts against
//! `max_repairs_per_hour` (a sliding hour), and a target repaired again
//! waits `repair_backoff`, doubling per attempt up to an hour, until it is
//! seen healthy. A target's backoff is forgotten once it is healthy.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use nix::fcntl::Flock;

use crate::rootfs::Root;

const HOUR: Duration = Duration::from_secs(3600);
const BACKOFF_CAP: Duration = HOUR;

/// Why a repair did not happen now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deferred {
    /// The target was repaired recently; next attempt after this long.
    Backoff(Duration),
    /// `max_repairs_per_hour` attempts were made in the last hour.
    Budget,
}

impl std::fmt::Display for Deferred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Deferred::Backoff(d) => write!(f, "repaired recently; next attempt in {:.0} s", d.as_secs_f64().ceil()),
            Deferred::Budget => f.write_str("max_repairs_per_hour spent"),
        }
    }
}

/// Tries [`INSTALL_LOCK`] shared without waiting: `Ok(None)` while install holds it.
pub fn try_install_lock(root: &Root) -> Result<Option<Flock<std::fs::File>>, crate::install::lock::LockError> {
    crate::install::lock::try_shared(root)
}

#[derive(Debug, Clone)]
struct Backoff {
    attempts: u32,
    next: Instant,
}

/// The hourly budget and per-target backoff.
#[derive(Debug, Clone)]
pub struct Budget {
    per_hour: u32,
    base: Duration,
    window: VecDeque<Instant>,
    backoff: HashMap<String, Backoff>,
}

impl Budget {
    pub fn new(per_hour: u32, base: Duration) -> Self {
        Budget {
            per_hour,
            base,
            window: VecDeque::new(),
            backoff: HashMap::new(),
        }
    }

    /// New limits (on reload); history is kept.
    pub fn configure(&mut self, per_hour: u32, base: Duration) {
        self.per_hour = per_hour;
        self.base = base;
    }

    /// Attempts within the hour before `now`.
    pub fn last_hour(&mut self, now: Instant) -> u32 {
        while self.window.front().is_some_and(|t| now.duration_since(*t) >= HOUR) {
            self.window.pop_front();
        }
        self.window.len() as u32
    }

    /// May `target` be repaired at `now`?
    pub fn permit(&mut self, target: &str, now: Instant) -> Result<(), Deferred> {
        if let Some(b) = self.backoff.get(target)
            && b.next > now
        {
            return Err(Deferred::Backoff(b.next - now));
        }
        if self.last_hour(now) >= self.per_hour {
            return Err(Deferred::Budget);
        }
        Ok(())
    }

    /// Counts an attempt on `target` at `now` and backs it off.
    pub fn record(&mut self, target: &str, now: Instant) {
        self.window.push_back(now);
        while self.window.len() > self.per_hour.max(1) as usize {
            self.window.pop_front();
        }
        let attempts = self.backoff.get(target).map_or(0, |b| b.attempts) + 1;
        let wait = self
            .base
            .saturating_mul(1u32 << (attempts - 1).min(20))
            .min(BACKOFF_CAP);
        self.backoff.insert(
            target.to_string(),
            Backoff {
                attempts,
                next: now + wait,
            },
        );
    }

    /// `target` was seen healthy: its backoff starts over.
    pub fn healthy(&mut self, target: &str) {
        self.backoff.remove(target);
    }

    /// Targets with a backoff (bounded by the targets there are).
    #[cfg(test)]
    pub fn backed_off(&self) -> usize {
        self.backoff.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::FlockArg;

    #[test]
    fn backoff_doubles_and_resets() {
        let mut b = Budget::new(100, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(b.permit("/etc/x", t0), Ok(()));
        b.record("/etc/x", t0);
        assert_eq!(
            b.permit("/etc/x", t0 + Duration::from_secs(5)),
            Err(Deferred::Backoff(Duration::from_secs(5)))
        );
        assert_eq!(b.permit("/etc/y", t0), Ok(()), "another target is not held back");
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.permit("/etc/x", t1), Ok(()));
        b.record("/etc/x", t1);
        assert!(
            b.permit("/etc/x", t1 + Duration::from_secs(19)).is_err(),
            "second wait is 20 s"
        );
        assert_eq!(b.permit("/etc/x", t1 + Duration::from_secs(20)), Ok(()));
        b.healthy("/etc/x");
        assert_eq!(b.permit("/etc/x", t1), Ok(()));
        assert_eq!(b.backed_off(), 0);
    }

    #[test]
    fn the_hourly_budget_slides() {
        let mut b = Budget::new(2, Duration::ZERO);
        let t0 = Instant::now();
        b.record("a", t0);
        b.record("b", t0 + Duration::from_secs(60));
        assert_eq!(b.permit("c", t0 + Duration::from_secs(61)), Err(Deferred::Budget));
        assert_eq!(b.last_hour(t0 + Duration::from_secs(61)), 2);
        assert_eq!(b.permit("c", t0 + HOUR), Ok(()), "the first attempt left the window");
        assert_eq!(b.last_hour(t0 + HOUR), 1);
    }

    #[test]
    fn the_install_lock_is_only_tried() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path());
        let shared = try_install_lock(&root).unwrap();
        assert!(shared.is_some(), "free");
        assert!(try_install_lock(&root).unwrap().is_some(), "shared with another reader");
        drop(shared);
        let file = std::fs::File::open(crate::install::lock::path_for(&root)).unwrap();
        let install = Flock::lock(file, FlockArg::LockExclusive).unwrap();
        assert!(
            try_install_lock(&root).unwrap().is_none(),
            "held by install: no wait, no lock"
        );
        drop(install);
        assert!(try_install_lock(&root).unwrap().is_some());
    }

    #[test]
    fn backoff_is_capped() {
        let mut b = Budget::new(1000, Duration::from_secs(60));
        let t0 = Instant::now();
        for _ in 0..30 {
            b.record("x", t0);
        }
        assert_eq!(b.permit("x", t0 + HOUR), Ok(()));
    }
}
