//! The systemd side of repairs, over D-Bus (`crate::systemd::Systemd`):
//! `Reload` after a unit file was put back, `StartUnit` for a snapshotter
//! that is down (its socket unit first, when that is down too), and restarts
//! only where they cannot take containerd down unasked (see `repair`'s module
//! docs).
//!
//! containerd itself is started only when it ran since boot and is now down
//! together with the snapshotter: the mark of `systemctl stop
//! soci-snapshotter`, which stops containerd through the drop-in's
//! `Requires=` and leaves the node NotReady. Starting a stopped containerd
//! interrupts nothing. A containerd that never ran since boot is left to
//! whoever starts it (on nodeadm hosts, `nodeadm-run.service`, after it has
//! rendered the config). A containerd stopped while the snapshotter runs was
//! stopped on purpose (maintenance): the daemon leaves it, and
//! `systemd.containerd` fails with the command to run.

use crate::doctor::ids;
use crate::paths::{CONTAINERD_SERVICE, CONTAINERD_SOCKET, SOCI_SERVICE, SOCI_SOCKET, SOCI_SOCKET_UNIT};
use std::time::Duration;

use super::{Outcome, Reconciler, verdict_of};
use crate::daemon::state::{RepairEvent, unix_now};
use crate::doctor::{Check, Verdict};
use crate::health::probe::{self, Reach};
use crate::install::plan::Effects;
use crate::systemd::{Systemd, SystemdError, UnitState};

/// Bound on connecting and on each job (a start waits for the unit's READY=1).
const BUS_BOUND: Duration = Duration::from_secs(60);
/// Bound on asking containerd whether it loaded the soci plugin (doctor's own bound).
const PROBE_BOUND: Duration = Duration::from_secs(15);

fn unit_target(unit: &str) -> String {
    format!("unit:{unit}")
}

/// Why the repairs could not reach systemd.
#[derive(Debug, thiserror::Error)]
enum BusError {
    #[error("--root is not / and no --bus-address: systemd is not reachable")]
    NoBus,
    #[error(transparent)]
    Connect(#[from] Box<SystemdError>),
}

/// Connects to systemd: `--bus-address`, else the system bus when the root is `/`.
async fn connect(r: &Reconciler) -> Result<Systemd, BusError> {
    let connected = match &r.ends.bus_address {
        Some(a) => Systemd::connect_address(a, BUS_BOUND).await,
        None if r.root.is_host() => Systemd::connect(BUS_BOUND).await,
        None => return Err(BusError::NoBus),
    };
    connected.map_err(|e| BusError::Connect(Box::new(e)))
}

/// Does containerd say it never loaded the soci plugin (a restart would fix)? Asked only when
/// doctor's `live.containerd-soci` failed: the daemon then asks containerd itself, with the
/// probe doctor uses (no direct dial of the SOCI socket), and goes by its typed answer, not
/// by the check's wording.
async fn containerd_unwired(r: &Reconciler, checks: &[Check]) -> bool {
    if !failed(checks, ids::CONTAINERD_SOCI) {
        return false;
    }
    let containerd = r
        .ends
        .containerd_socket
        .clone()
        .unwrap_or_else(|| r.root.path(CONTAINERD_SOCKET));
    // Only dialed with may_dial = true; named for the probe's signature.
    let soci = r.ends.soci_socket.clone().unwrap_or_else(|| r.root.path(SOCI_SOCKET));
    match tokio::time::timeout(PROBE_BOUND, probe::probe(&containerd, &soci, false)).await {
        Ok(Ok((_, reach))) => unwired(&reach),
        Ok(Err(_)) | Err(_) => false,
    }
}

/// containerd does not list the soci snapshotter, or lists it as failed to load.
fn unwired(reach: &Reach) -> bool {
    matches!(reach, Reach::NotListed | Reach::InitError(_))
}

fn failed(checks: &[Check], id: &str) -> bool {
    verdict_of(checks, id).is_some_and(|c| c.verdict == Verdict::Fail)
}

/// Is anything for systemd to do: a unit file put back, containerd unwired, the snapshotter down?
fn wanted(checks: &[Check], effects: Effects, unwired: bool) -> bool {
    effects.daemon_reload
        || effects.restart_soci
        || effects.restart_containerd
        || unwired
        || failed(checks, ids::SOCI_SERVICE)
        || failed(checks, ids::CONTAINERD_SERVICE)
        || failed(checks, ids::SOCI_SOCKET)
}

/// Ran since boot (systemd keeps the last `InvocationID` of a stopped unit).
fn ran(unit: &UnitState) -> bool {
    !unit.invocation_id.is_empty()
}

/// Loaded, stopped or failed, and not about to be restarted by systemd.
fn down(unit: &UnitState) -> bool {
    unit.load_state == "loaded"
        && matches!(unit.active_state.as_str(), "inactive" | "failed")
        && unit.sub_state != "auto-restart"
}

/// What to do with the snapshotter unit.
#[derive(Debug, PartialEq, Eq)]
enum SociAction {
    None,
    Start,
    Restart,
}

fn soci_action(soci: &UnitState, containerd: &UnitState, checks: &[Check], effects: Effects) -> SociAction {
    let wanted_up = failed(checks, ids::SOCI_SERVICE)
        || (effects.restart_soci && containerd.is_active())
        || (down(containerd) && ran(containerd));
    if down(soci) && wanted_up {
        return SociAction::Start;
    }
    if soci.is_active() && (effects.restart_soci || failed(checks, ids::SOCI_SOCKET)) {
        return SociAction::Restart;
    }
    SociAction::None
}

/// Runs the systemd part of one reconcile's repairs.
pub async fn repair(r: &mut Reconciler, checks: &[Check], effects: Effects, out: &mut Outcome) {
    let unwired = containerd_unwired(r, checks).await;
    if !wanted(checks, effects, unwired) {
        r.healthy(&unit_target(SOCI_SERVICE));
        r.healthy(&unit_target(CONTAINERD_SERVICE));
        return;
    }
    let sd = match connect(r).await {
        Ok(sd) => sd,
        Err(e) => {
            out.pending.push(format!("systemd: {}", crate::exit::error_chain(&e)));
            return;
        }
    };
    if effects.daemon_reload {
        let result = sd.reload().await;
        event(out, "systemd", "daemon-reload", result);
    }
    let Some((soci, containerd)) = unit_states(&sd, out).await else {
        return;
    };
    let action = soci_action(&soci, &containerd, checks, effects);
    let containerd_restarted = repair_soci(r, &sd, action, &containerd, effects, out).await;
    if down(&containerd) && ran(&containerd) {
        start_containerd(r, &sd, &soci, out).await;
    } else if containerd.is_active() && (effects.restart_containerd || unwired) && !containerd_restarted {
        restart_containerd(r, &sd, out).await;
    } else if !unwired {
        r.healthy(&unit_target(CONTAINERD_SERVICE));
    }
}

/// Starts a containerd that went down with the snapshotter (see the module
/// docs); one stopped while the snapshotter ran is left to its operator.
async fn start_containerd(r: &mut Reconciler, sd: &Systemd, soci_before: &UnitState, out: &mut Outcome) {
    if down(soci_before) {
        job(r, sd, "start", CONTAINERD_SERVICE, out).await;
    } else {
        out.pending.push(format!(
            "{CONTAINERD_SERVICE} is stopped while {SOCI_SERVICE} runs (stopped on purpose?): not started by the \
             daemon; systemctl start {CONTAINERD_SERVICE}"
        ));
    }
}

/// The snapshotter's and containerd's unit states; `None` (noted in `out`) when systemd does not say.
async fn unit_states(sd: &Systemd, out: &mut Outcome) -> Option<(UnitState, UnitState)> {
    let state = |name| sd.unit_state(name);
    match (state(SOCI_SERVICE).await, state(CONTAINERD_SERVICE).await) {
        (Ok(s), Ok(c)) => Some((s, c)),
        (Err(e), _) | (_, Err(e)) => {
            out.pending.push(format!("systemd: {}", crate::exit::error_chain(&e)));
            None
        }
    }
}

/// Does `action` to the snapshotter; returns whether that restarted a running containerd too.
async fn repair_soci(
    r: &mut Reconciler,
    sd: &Systemd,
    action: SociAction,
    containerd: &UnitState,
    effects: Effects,
    out: &mut Outcome,
) -> bool {
    match action {
        SociAction::None => r.healthy(&unit_target(SOCI_SERVICE)),
        SociAction::Start => {
            // Its socket first when that is down too (stopped, or failed with the service):
            // a start of the service alone would have no listening socket to inherit.
            if let Ok(socket) = sd.unit_state(SOCI_SOCKET_UNIT).await
                && socket.load_state == "loaded"
                && !socket.is_active()
            {
                job(r, sd, "start", SOCI_SOCKET_UNIT, out).await;
            }
            job(r, sd, "start", SOCI_SERVICE, out).await;
        }
        SociAction::Restart if !containerd.is_active() || r.cfg.restart_containerd => {
            job(r, sd, "restart", SOCI_SERVICE, out).await;
            return containerd.is_active();
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
    false
}

/// Restarts containerd so it loads its soci wiring, when `restart_containerd` allows it.
async fn restart_containerd(r: &mut Reconciler, sd: &Systemd, out: &mut Outcome) {
    if r.cfg.restart_containerd {
        job(r, sd, "restart", CONTAINERD_SERVICE, out).await;
    } else {
        out.pending.push(format!(
            "{CONTAINERD_SERVICE} must restart to load its soci wiring; not done without [daemon] \
             restart_containerd = true"
        ));
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
    };
    match &result {
        Ok(()) => tracing::warn!(unit, op, "repaired a unit"),
        Err(e) => tracing::error!(unit, op, error = %crate::exit::error_chain(e), "unit repair failed"),
    }
    event(out, unit, op, result);
}

fn event(out: &mut Outcome, target: &str, action: &'static str, result: Result<(), SystemdError>) {
    let (result, detail) = match result {
        Ok(()) => ("ok", String::new()),
        Err(e) => ("failed", crate::exit::error_chain(&e)),
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
            unit_file_state: "enabled".into(),
            ..UnitState::default()
        }
    }

    #[test]
    fn a_dead_snapshotter_is_started_a_running_one_restarted() {
        let fail = vec![Check::fail(ids::SOCI_SERVICE, "e", "a")];
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
        let dead_socket = vec![Check::fail(ids::SOCI_SOCKET, "e", "a")];
        assert_eq!(soci_action(&up, &up, &dead_socket, none), SociAction::Restart);
        assert_eq!(soci_action(&up, &up, &[], none), SociAction::None);
        let stopped = unit("inactive", "dead");
        assert_eq!(
            soci_action(&stopped, &stopped, &[], none),
            SociAction::None,
            "containerd never ran since boot: not the daemon's to start (nodeadm-run does)"
        );
        let ran = UnitState {
            invocation_id: "0123456789abcdef0123456789abcdef".into(),
            ..stopped.clone()
        };
        assert_eq!(
            soci_action(&stopped, &ran, &[], none),
            SociAction::Start,
            "both down: systemctl stop soci-snapshotter took containerd with it"
        );
    }

    #[test]
    fn containerd_without_the_plugin_wants_a_restart() {
        assert!(unwired(&Reach::NotListed));
        assert!(unwired(&Reach::InitError("no socket".into())));
        assert!(!unwired(&Reach::DirectFailed("refused".into())));
        assert!(!unwired(&Reach::Unreachable {
            call: "Snapshots.Stat".into(),
            error: "refused".into(),
        }));
    }
}
