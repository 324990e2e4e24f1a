//! The systemd step of install, over D-Bus: daemon-reload, enable, and on
//! non-nodeadm hosts (re)start the snapshotter, wait for its socket, restart
//! containerd only when its wiring changed, then check containerd sees
//! `soci`. Everything it does is logged in `Activation` so a failure can be
//! undone: units it restarted are restarted again (or stopped) after the
//! files are restored, units it enabled are disabled.

use crate::paths::{
    BOOT_SERVICE, CONTAINERD_SERVICE, CONTAINERD_SOCKET, DAEMON_SERVICE, DAEMON_SERVICE_PATH, SOCI_SERVICE,
    SOCI_SOCKET, SOCI_SOCKET_UNIT,
};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::health::{self, HealthError, SnapshotterStatus};
use crate::install::plan::{Plan, Wiring};
use crate::rootfs::Root;
use crate::systemd::{Systemd, SystemdError, UnitState};

/// Bounds of the waits after a (re)start.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub job: Duration,
    pub socket: Duration,
    pub health: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            job: Duration::from_secs(90),
            socket: Duration::from_secs(30),
            health: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("systemd step failed")]
    Systemd(#[source] Box<SystemdError>),
    #[error("health check failed")]
    Health(#[from] HealthError),
    #[error("cannot update the install record")]
    Record(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Notes units about to be enabled in the install record (before enabling
/// them, so uninstall knows even if the run is killed next).
pub type RecordEnabled<'a> = dyn FnMut(&[String]) -> Result<(), Box<dyn std::error::Error + Send + Sync>> + Send + 'a;

impl From<SystemdError> for ActivateError {
    fn from(e: SystemdError) -> Self {
        ActivateError::Systemd(Box::new(e))
    }
}

/// What the systemd step did, in order (also the undo log).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Activation {
    pub reloaded: bool,
    /// Units enabled by this run (they were not enabled before).
    pub enabled: Vec<String>,
    /// Units (re)started by this run, with whether they were active before.
    pub restarted: Vec<(String, bool)>,
    pub soci_socket_seconds: Option<f64>,
    pub health: Option<SnapshotterStatus>,
    /// Human summary lines for the report.
    pub steps: Vec<String>,
}

/// Running, or on its way (a start job in progress).
fn running(state: &crate::systemd::UnitState) -> bool {
    matches!(state.active_state.as_str(), "active" | "activating" | "reloading")
}

fn enabled_state(s: &str) -> bool {
    matches!(
        s,
        "enabled" | "enabled-runtime" | "static" | "alias" | "indirect" | "generated"
    )
}

/// Runs the systemd step for `plan`; on error, `act` holds what was done.
/// With `install --daemon` on a non-nodeadm host, soci-agent.service is
/// (re)started last, once the snapshotter and containerd are healthy.
pub async fn activate(
    sd: &Systemd,
    root: &Root,
    plan: &Plan,
    act: &mut Activation,
    bounds: Bounds,
    record_enabled: &mut RecordEnabled<'_>,
) -> Result<(), ActivateError> {
    activate_units(sd, root, plan, act, bounds, record_enabled).await?;
    if !plan.daemon || plan.wiring == Wiring::Nodeadm {
        return Ok(());
    }
    let unit = DAEMON_SERVICE;
    let changed = plan.actions.iter().any(|a| a.changed && a.path == DAEMON_SERVICE_PATH);
    let state = sd.unit_state(unit).await?;
    if changed || !state.is_active() {
        restart_logged(sd, unit, state.is_active(), act).await?;
    }
    Ok(())
}

/// (Re)starts `unit`, logging it (with whether it was active) for `undo`
/// first.
async fn restart_logged(sd: &Systemd, unit: &str, was_active: bool, act: &mut Activation) -> Result<(), ActivateError> {
    act.restarted.push((unit.to_string(), was_active));
    let verb = if was_active { "restarted" } else { "started" };
    if let Err(first) = sd.restart(unit).await {
        // A unit with Restart= whose first attempt failed is already queued for
        // another one (SubState=auto-restart): give systemd that attempt.
        if !came_up_on_retry(sd, unit).await {
            return Err(first.into());
        }
        act.steps.push(format!(
            "{verb} {unit} on systemd's automatic retry (the first attempt failed: {first})"
        ));
        return Ok(());
    }
    act.steps.push(format!("{verb} {unit}"));
    Ok(())
}

/// After a failed start job: whether `unit` was in `auto-restart` and became
/// active on systemd's own retry within [`AUTO_RESTART_BOUND`].
async fn came_up_on_retry(sd: &Systemd, unit: &str) -> bool {
    let deadline = tokio::time::Instant::now() + AUTO_RESTART_BOUND;
    let mut retrying = false;
    while tokio::time::Instant::now() < deadline {
        let Ok(state) = sd.unit_state(unit).await else {
            return false;
        };
        if state.is_active() && state.sub_state == "running" {
            return true;
        }
        retrying |= state.sub_state == "auto-restart";
        if !retrying || state.active_state == "failed" {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    false
}

/// How long install waits for systemd's automatic retry of a failed start
/// (the units' RestartSec= is 5 s).
const AUTO_RESTART_BOUND: std::time::Duration = std::time::Duration::from_secs(30);

/// containerd's entry in the undo log: restarted, and active before.
fn containerd_entry() -> (String, bool) {
    (CONTAINERD_SERVICE.to_string(), true)
}

/// The snapshotter and containerd part of `activate`.
async fn activate_units(
    sd: &Systemd,
    root: &Root,
    plan: &Plan,
    act: &mut Activation,
    bounds: Bounds,
    record_enabled: &mut RecordEnabled<'_>,
) -> Result<(), ActivateError> {
    let effects = plan.effects();
    reload_if_needed(sd, effects.daemon_reload, act).await?;
    enable_units(sd, &wanted_units(plan), act, record_enabled).await?;
    if plan.wiring == Wiring::Nodeadm {
        act.steps.push(
            "nodeadm host: nothing started; nodeadm-run starts containerd after local-disk setup, and containerd's Requires= starts soci-snapshotter.service".into(),
        );
        return Ok(());
    }
    let containerd_before = start_snapshotter(sd, root, effects.restart_soci, act, bounds).await?;
    settle_containerd(sd, root, effects.restart_containerd, &containerd_before, act, bounds).await
}

/// The units this install enables: SOCI's service and socket, the boot
/// unit when no kubelet pulls it in, and soci-agent.service with --daemon.
fn wanted_units(plan: &Plan) -> Vec<&'static str> {
    let mut wanted = vec![SOCI_SERVICE, SOCI_SOCKET_UNIT];
    if !plan.kubelet_present {
        wanted.push(BOOT_SERVICE);
    }
    if plan.daemon {
        wanted.push(DAEMON_SERVICE);
    }
    wanted
}

/// daemon-reload when the plan changed a unit, or systemd says a unit's
/// files changed since its last reload.
async fn reload_if_needed(sd: &Systemd, planned: bool, act: &mut Activation) -> Result<(), ActivateError> {
    // A run killed after writing files but before its reload leaves units whose files changed
    // since the last reload: the plan then sees no change, so ask systemd too.
    let mut needs_reload = planned;
    for unit in [SOCI_SERVICE, SOCI_SOCKET_UNIT, CONTAINERD_SERVICE, BOOT_SERVICE] {
        if needs_reload {
            break;
        }
        needs_reload = sd.unit_state(unit).await?.need_daemon_reload;
    }
    if needs_reload {
        sd.reload().await?;
        act.reloaded = true;
        act.steps.push("daemon-reload".into());
    }
    Ok(())
}

/// Enables those of `wanted` that exist and are not enabled yet, recording
/// them first, then reloads so systemd sees their new dependencies.
async fn enable_units(
    sd: &Systemd,
    wanted: &[&str],
    act: &mut Activation,
    record_enabled: &mut RecordEnabled<'_>,
) -> Result<(), ActivateError> {
    let mut to_enable = Vec::new();
    for &unit in wanted {
        let state = sd.unit_state(unit).await?;
        if state.load_state != "not-found" && !enabled_state(&state.unit_file_state) {
            to_enable.push(unit.to_string());
        }
    }
    if !to_enable.is_empty() {
        // Recorded before enabling, so uninstall knows even if this run is killed next.
        record_enabled(&to_enable).map_err(ActivateError::Record)?;
    }
    for unit in to_enable {
        sd.enable(&[unit.as_str()]).await?;
        act.steps.push(format!("enabled {unit}"));
        act.enabled.push(unit);
    }
    if !act.enabled.is_empty() {
        // systemd keeps the old dependencies until a reload after enabling.
        sd.reload().await?;
        act.reloaded = true;
    }
    Ok(())
}

/// Starts SOCI's socket, (re)starts the snapshotter when its files changed
/// or it is not running, and waits for its socket. Returns containerd's
/// state from before the restart.
async fn start_snapshotter(
    sd: &Systemd,
    root: &Root,
    restart_soci: bool,
    act: &mut Activation,
    bounds: Bounds,
) -> Result<UnitState, ActivateError> {
    // The socket first, so the service gets its listener (fd://).
    let socket_state = sd.unit_state(SOCI_SOCKET_UNIT).await?;
    if socket_state.load_state != "not-found" && !socket_state.is_active() {
        sd.start(SOCI_SOCKET_UNIT).await?;
        act.restarted.push((SOCI_SOCKET_UNIT.to_string(), false));
        act.steps.push(format!("started {}", SOCI_SOCKET_UNIT));
    }
    let containerd_before = sd.unit_state(CONTAINERD_SERVICE).await?;
    let soci_state = sd.unit_state(SOCI_SERVICE).await?;
    if restart_soci || !soci_state.is_active() {
        // containerd Requires= the snapshotter: restarting it restarts containerd too, and a
        // snapshotter that fails to start leaves containerd stopped (its start job fails with
        // `dependency`). Log containerd first so that `undo` starts it again, after the
        // snapshotter is stopped.
        if running(&containerd_before) {
            act.restarted.push(containerd_entry());
        }
        restart_logged(sd, SOCI_SERVICE, soci_state.is_active(), act).await?;
    }
    let waited = health::wait_for_socket(&root.path(SOCI_SOCKET), bounds.socket).await?;
    act.soci_socket_seconds = Some(waited.as_secs_f64());
    Ok(containerd_before)
}

/// Brings containerd onto the snapshotter: leaves a stopped containerd
/// alone, waits for a pending start, keeps a containerd that already uses
/// SOCI, else restarts it and waits until it lists and reaches SOCI.
async fn settle_containerd(
    sd: &Systemd,
    root: &Root,
    restart_containerd: bool,
    before: &UnitState,
    act: &mut Activation,
    bounds: Bounds,
) -> Result<(), ActivateError> {
    // A start job queued before this run (e.g. by an interrupted run) shows up
    // only now that the snapshotter it waits for is up.
    let mut now = sd.unit_state(CONTAINERD_SERVICE).await?;
    if !running(before) && !running(&now) {
        act.steps
            .push("containerd is not running: it uses SOCI from its next start".into());
        return Ok(());
    }
    if !now.is_active() {
        sd.start(CONTAINERD_SERVICE).await?;
        act.steps.push("waited for containerd's pending start".into());
        now = sd.unit_state(CONTAINERD_SERVICE).await?;
    }
    let restarted_along = now.invocation_id != before.invocation_id;
    // The files say containerd is already wired; a run killed between writing them and
    // restarting containerd leaves it running the old config, so check what it loaded.
    if !restart_containerd && !restarted_along && uses_snapshotter(root, act).await {
        return Ok(());
    }
    restart_containerd_for_soci(sd, root, restarted_along && now.is_active(), act, bounds).await
}

/// Whether the running containerd already uses the soci snapshotter; when
/// it does, containerd leaves the undo log (it is not restarted).
async fn uses_snapshotter(root: &Root, act: &mut Activation) -> bool {
    match health::query_snapshotter(&root.path(CONTAINERD_SOCKET), &root.path(SOCI_SOCKET)).await {
        Ok(status) if status.loaded => {
            act.restarted.retain(|u| *u != containerd_entry());
            act.steps.push(format!(
                "containerd wiring unchanged and containerd {} uses the soci snapshotter: not restarted",
                status.containerd_version
            ));
            act.health = Some(status);
            return true;
        }
        Ok(status) => act.steps.push(format!(
            "containerd {} does not use the soci snapshotter yet ({}): restarting it",
            status.containerd_version,
            status.init_error.as_deref().unwrap_or("not listed")
        )),
        Err(e) => act.steps.push(format!(
            "containerd does not answer about the soci snapshotter ({}): restarting it",
            crate::exit::error_chain(&e)
        )),
    }
    false
}

/// Restarts containerd (unless the snapshotter's restart already did,
/// `restarted_along`) and waits until it lists and reaches the snapshotter.
async fn restart_containerd_for_soci(
    sd: &Systemd,
    root: &Root,
    restarted_along: bool,
    act: &mut Activation,
    bounds: Bounds,
) -> Result<(), ActivateError> {
    let started = Instant::now();
    if !act.restarted.contains(&containerd_entry()) {
        act.restarted.push(containerd_entry());
    }
    if restarted_along {
        act.steps
            .push("containerd restarted along with the snapshotter (Requires=)".into());
    } else {
        sd.restart(CONTAINERD_SERVICE).await?;
    }
    let status =
        health::wait_for_snapshotter(&root.path(CONTAINERD_SOCKET), &root.path(SOCI_SOCKET), bounds.health).await?;
    act.steps.push(format!(
        "restarted containerd {} ({:.1}s): it lists the soci snapshotter and reaches it",
        status.containerd_version,
        started.elapsed().as_secs_f64()
    ));
    act.health = Some(status);
    Ok(())
}

/// Undoes `act` after the files were restored: reload, restart what was
/// restarted (stop what was not running), disable what was enabled.
pub async fn undo(sd: &Systemd, act: &Activation) -> Vec<String> {
    let mut problems = Vec::new();
    let mut note = |r: Result<(), SystemdError>| {
        if let Err(e) = r {
            problems.push(crate::exit::error_chain(&e));
        }
    };
    note(sd.reload().await);
    for (unit, was_active) in act.restarted.iter().rev() {
        note(if *was_active {
            sd.restart(unit).await
        } else {
            sd.stop(unit).await
        });
    }
    if !act.enabled.is_empty() {
        let units: Vec<&str> = act.enabled.iter().map(String::as_str).collect();
        note(sd.disable(&units).await.map(|_| ()));
        note(sd.reload().await);
    }
    problems
}
