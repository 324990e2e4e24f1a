//! The systemd side of repairs, over D-Bus (`crate::systemd::Systemd`):
//! `Reload` after a unit file was put back, `StartUnit` for a snapshotter
//! that is down while containerd runs (its socket unit first, when that is
//! down too), and restarts only where they cannot
//! take containerd down unasked (see `repair`'s module docs).

use crate::paths::{CONTAINERD_SERVICE, SOCI_SERVICE, SOCI_SOCKET_UNIT};
use std::time::Duration;

use super::{Outcome, Reconciler, verdict_of};
use crate::daemon::state::{RepairEvent, unix_now};
use crate::doctor::{Check, Verdict};
use crate::install::plan::Effects;
use crate::systemd::{Systemd, UnitState};

/// Bound on connecting and on each job (a start waits for the unit's READY=1).
const BUS_BOUND: Duration = Duration::from_secs(60);

fn unit_target(unit: &str) -> String {
    format!("unit:{unit}")
}

/// Connects to systemd: `--bus-address`, else the system bus when the root is `/`.
async fn connect(r: &Reconciler) -> Result<Systemd, String> {
    let connecting = match &r.ends.bus_address {
        Some(a) => Systemd::connect_address(a, BUS_BOUND).await,
        None if r.root.is_host() => Systemd::connect(BUS_BOUND).await,
        None => return Err("--root is not / and no --bus-address: systemd is not reachable".into()),
    };
    connecting.map_err(|e| crate::exit::error_chain(&e))
}

/// Does containerd's view say it never loaded the soci plugin (a restart would fix)?
fn containerd_unwired(checks: &[Check]) -> bool {
    verdict_of(checks, "live.containerd-soci").is_some_and(|c| {
        c.verdict == Verdict::Fail
            && (c.evidence.contains("lists no soci snapshotter") || c.evidence.contains("failed to load"))
    })
}

fn failed(checks: &[Check], id: &str) -> bool {
    verdict_of(checks, id).is_some_and(|c| c.verdict == Verdict::Fail)
}

/// What to do with the snapshotter unit.
#[derive(Debug, PartialEq, Eq)]
enum SociAction {
    None,
    Start,
    Restart,
}

fn soci_action(soci: &UnitState, containerd: &UnitState, checks: &[Check], effects: Effects) -> SociAction {
    let down = soci.load_state == "loaded"
        && matches!(soci.active_state.as_str(), "inactive" | "failed")
        && soci.sub_state != "auto-restart";
    if down && (failed(checks, "systemd.soci-service") || (effects.restart_soci && containerd.is_active())) {
        return SociAction::Start;
    }
    if soci.is_active() && (effects.restart_soci || failed(checks, "live.soci-socket")) {
        return SociAction::Restart;
    }
    SociAction::None
}

/// Runs the systemd part of one reconcile's repairs.
pub async fn repair(r: &mut Reconciler, checks: &[Check], effects: Effects, out: &mut Outcome) {
    let unwired = containerd_unwired(checks);
    let wanted = effects.daemon_reload
        || effects.restart_soci
        || effects.restart_containerd
        || unwired
        || failed(checks, "systemd.soci-service")
        || failed(checks, "live.soci-socket");
    if !wanted {
        r.healthy(&unit_target(SOCI_SERVICE));
        r.healthy(&unit_target(CONTAINERD_SERVICE));
        return;
    }
    let sd = match connect(r).await {
        Ok(sd) => sd,
        Err(e) => {
            out.pending.push(format!("systemd: {e}"));
            return;
        }
    };
    if effects.daemon_reload {
        let result = sd.reload().await.map_err(|e| crate::exit::error_chain(&e));
        event(out, "systemd", "daemon-reload", result);
    }
    let state = |name| sd.unit_state(name);
    let (soci, containerd) = match (state(SOCI_SERVICE).await, state(CONTAINERD_SERVICE).await) {
        (Ok(s), Ok(c)) => (s, c),
        (Err(e), _) | (_, Err(e)) => {
            out.pending.push(format!("systemd: {}", crate::exit::error_chain(&e)));
            return;
        }
    };
    let mut containerd_restarted = false;
    match soci_action(&soci, &containerd, checks, effects) {
        SociAction::None => r.healthy(&unit_target(SOCI_SERVICE)),
        SociAction::Start => {
            // Its socket first when that is down too (stopped, or failed with the service):
            // a start of the service alone would have no listening socket to inherit.
            if let Ok(socket) = sd.unit_state(SOCI_SOCKET_UNIT).await
                && socket.load_state == "loaded"
                && !socket.is_active()
            {
                job(r, &sd, "start", SOCI_SOCKET_UNIT, out).await;
            }
            job(r, &sd, "start", SOCI_SERVICE, out).await;
        }
        SociAction::Restart if !containerd.is_active() || r.cfg.restart_containerd => {
            job(r, &sd, "restart", SOCI_SERVICE, out).await;
            containerd_restarted = containerd.is_active();
        }
        SociAction::Restart => out.pending.push(format!(
            "{SOCI_SERVICE} needs a restart ({}); containerd Requires= it, so that restarts containerd too: not done \
             without [daemon] restart_containerd = true",
            if effects.restart_soci {
                "its files were put back"
            } else {
                "its socket does not answer"
            }
        )),
    }
    if containerd.is_active() && (effects.restart_containerd || unwired) && !containerd_restarted {
        if r.cfg.restart_containerd {
            job(r, &sd, "restart", CONTAINERD_SERVICE, out).await;
        } else {
            out.pending.push(format!(
                "{CONTAINERD_SERVICE} must restart to load its soci wiring; not done without [daemon] \
                 restart_containerd = true"
            ));
        }
    } else if !unwired {
        r.healthy(&unit_target(CONTAINERD_SERVICE));
    }
}

/// One budgeted unit job.
async fn job(r: &mut Reconciler, sd: &Systemd, op: &'static str, unit: &str, out: &mut Outcome) {
    let target = unit_target(unit);
    if let Err(why) = r.budget.permit(&target, std::time::Instant::now()) {
        r.defer(&target, &why, out);
        return;
    }
    r.attempt(&target);
    let result = match op {
        "start" => sd.start(unit).await,
        _ => sd.restart(unit).await,
    }
    .map_err(|e| crate::exit::error_chain(&e));
    match &result {
        Ok(()) => tracing::warn!(unit, op, "repaired a unit"),
        Err(e) => tracing::error!(unit, op, error = e.as_str(), "unit repair failed"),
    }
    event(out, unit, op, result);
}

fn event(out: &mut Outcome, target: &str, action: &'static str, result: Result<(), String>) {
    let (result, detail) = match result {
        Ok(()) => ("ok", String::new()),
        Err(e) => ("failed", e),
    };
    out.events.push(RepairEvent {
        at: unix_now(),
        target: target.to_string(),
        action,
        result,
        detail,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(active: &str, sub: &str) -> UnitState {
        UnitState {
            name: "x.service".into(),
            load_state: "loaded".into(),
            active_state: active.into(),
            sub_state: sub.into(),
            result: String::new(),
            unit_file_state: "enabled".into(),
            invocation_id: String::new(),
            need_daemon_reload: false,
            main_pid: 0,
            n_restarts: 0,
            fragment_path: String::new(),
            drop_in_paths: vec![],
        }
    }

    #[test]
    fn a_dead_snapshotter_is_started_a_running_one_restarted() {
        let fail = vec![Check::fail("systemd.soci-service", "e", "a")];
        let up = unit("active", "running");
        let none = Effects::default();
        assert_eq!(
            soci_action(&unit("failed", "failed"), &up, &fail, none),
            SociAction::Start
        );
        assert_eq!(soci_action(&unit("inactive", "dead"), &up, &[], none), SociAction::None);
        assert_eq!(
            soci_action(&unit("activating", "auto-restart"), &up, &fail, none),
            SociAction::None,
            "systemd is already restarting it"
        );
        let config = Effects {
            restart_soci: true,
            ..Effects::default()
        };
        assert_eq!(soci_action(&up, &up, &[], config), SociAction::Restart);
        let dead_socket = vec![Check::fail("live.soci-socket", "e", "a")];
        assert_eq!(soci_action(&up, &up, &dead_socket, none), SociAction::Restart);
        assert_eq!(soci_action(&up, &up, &[], none), SociAction::None);
    }

    #[test]
    fn containerd_without_the_plugin_wants_a_restart() {
        assert!(containerd_unwired(&[Check::fail(
            "live.containerd-soci",
            "containerd 1.7 at x lists no soci snapshotter: ...",
            "a"
        )]));
        assert!(!containerd_unwired(&[Check::fail(
            "live.containerd-soci",
            "lists soci but cannot reach it",
            "a"
        )]));
    }
}
