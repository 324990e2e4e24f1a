//! systemd.*: the SOCI service and socket (enabled, active), containerd
//! running (stopping the snapshotter stops it too: its drop-in's Requires=),
//! containerd's
//! ordering drop-in, the boot unit (enabled, or wanted by kubelet) and its
//! last result. Over D-Bus when a bus answers, else from the unit files.

use super::Check;
use super::ids;
use super::node::{Bus, Node};
use super::unitfile::{UnitFiles, enablement_links};
use crate::paths::{BOOT_SERVICE, CONTAINERD_SERVICE, KUBELET_SERVICE, PAUSE_ARCHIVE, SOCI_SERVICE, SOCI_SOCKET_UNIT};
use crate::systemd::UnitState;

pub fn checks(node: &Node) -> Vec<Check> {
    vec![
        bus(node),
        service(node),
        socket(node),
        containerd(node),
        containerd_dropin(node),
        boot_unit(node),
        boot_result(node),
    ]
}

fn bus(node: &Node) -> Check {
    const ID: &str = "systemd.bus";
    match &node.bus {
        Bus::Connected { address, units } => {
            let errors: Vec<String> = units
                .iter()
                .filter_map(|(u, r)| {
                    r.as_ref()
                        .err()
                        .map(|e| format!("{u}: {}", crate::exit::error_chain(e)))
                })
                .collect();
            if errors.is_empty() {
                Check::ok(ID, format!("systemd answers on {address}"))
            } else {
                Check::warn(
                    ID,
                    format!("systemd on {address}: {}", errors.join("; ")),
                    "run doctor as root",
                )
            }
        }
        Bus::Unavailable(why) => Check::skip(ID, why.clone()),
    }
}

fn links_shown(links: &[String]) -> String {
    if links.is_empty() {
        "no enablement links".into()
    } else {
        links.join(", ")
    }
}

fn state_shown(st: &UnitState) -> String {
    let mut s = format!("{st}, UnitFileState={}", st.unit_file_state);
    if st.n_restarts > 0 {
        s.push_str(&format!(", NRestarts={}", st.n_restarts));
    }
    s
}

fn enabled(st: &UnitState) -> bool {
    matches!(
        st.unit_file_state.as_str(),
        "enabled" | "enabled-runtime" | "static" | "indirect" | "linked" | "alias"
    )
}

const SERVICE_ID: &str = ids::SOCI_SERVICE;

/// `systemd.soci-service`: the SOCI service runs or will be started, over D-Bus when it answers.
fn service(node: &Node) -> Check {
    match node.bus.unit(SOCI_SERVICE) {
        Some(st) => service_on_bus(node, st),
        None => service_in_files(node),
    }
}

/// The SOCI service as systemd reports it over D-Bus.
fn service_on_bus(node: &Node, st: &UnitState) -> Check {
    const ID: &str = SERVICE_ID;
    let journal = format!("see journalctl -u {SOCI_SERVICE}");
    let containerd_active = node.bus.unit(CONTAINERD_SERVICE).is_some_and(UnitState::is_active);
    let evidence = format!("{SOCI_SERVICE}: {} (D-Bus)", state_shown(st));
    match (st.load_state.as_str(), st.active_state.as_str()) {
        ("not-found", _) => Check::fail(ID, evidence, "run soci-agent install"),
        ("masked", _) => Check::fail(ID, evidence, format!("systemctl unmask {SOCI_SERVICE}")),
        _ if st.need_daemon_reload => Check::warn(
            ID,
            evidence,
            "unit files changed since systemd read them: systemctl daemon-reload",
        ),
        (_, "failed") => Check::fail(ID, evidence, journal),
        _ if st.sub_state == "auto-restart" => Check::fail(
            ID,
            format!("{evidence}: it keeps exiting and systemd keeps restarting it"),
            journal,
        ),
        (_, "active") if st.n_restarts > 0 => Check::warn(
            ID,
            format!("{evidence}: running, after exiting {} time(s)", st.n_restarts),
            format!("{journal} (CRI keychain credentials are lost at every restart)"),
        ),
        (_, "active" | "reloading" | "activating") => Check::ok(ID, evidence),
        _ if containerd_active => Check::fail(
            ID,
            format!("{evidence}, while containerd is active"),
            format!("containerd runs without its snapshotter: systemctl start {SOCI_SERVICE}; {journal}"),
        ),
        _ if enabled(st) || node.bus.unit(SOCI_SOCKET_UNIT).is_some_and(enabled) => {
            Check::ok(ID, format!("{evidence}; containerd's Requires= starts it"))
        }
        _ => Check::warn(
            ID,
            evidence,
            format!("systemctl enable {SOCI_SERVICE} {SOCI_SOCKET_UNIT}"),
        ),
    }
}

/// `systemd.containerd`: containerd runs (over D-Bus only; skipped without
/// an answer or a containerd unit). `systemctl stop soci-snapshotter`
/// stops it too, through the drop-in's `Requires=`: the node then runs no
/// containers and kubelet goes NotReady.
fn containerd(node: &Node) -> Check {
    const ID: &str = ids::CONTAINERD_SERVICE;
    let Some(st) = node.bus.unit(CONTAINERD_SERVICE) else {
        return Check::skip(ID, format!("no D-Bus answer about {CONTAINERD_SERVICE}"));
    };
    let evidence = format!("{CONTAINERD_SERVICE}: {} (D-Bus)", state_shown(st));
    let soci_down = node.bus.unit(SOCI_SERVICE).is_some_and(|s| !s.is_active());
    match (st.load_state.as_str(), st.active_state.as_str()) {
        ("not-found", _) => Check::skip(ID, evidence),
        (_, "active" | "reloading" | "activating") => Check::ok(ID, evidence),
        _ if st.invocation_id.is_empty() => Check::warn(
            ID,
            format!("{evidence}: not started since boot"),
            format!(
                "on nodeadm hosts nodeadm-run.service starts it; elsewhere systemctl enable --now {CONTAINERD_SERVICE}"
            ),
        ),
        _ if soci_down => Check::fail(
            ID,
            format!("{evidence}, and {SOCI_SERVICE} is down too (stopping it stops containerd: Requires=)"),
            format!(
                "systemctl start {CONTAINERD_SERVICE} (it starts {SOCI_SERVICE} first); \
                 soci-agent daemon with [daemon] repair = true does this itself"
            ),
        ),
        _ => Check::fail(
            ID,
            format!("{evidence}: no containers run and kubelet reports the node NotReady"),
            format!("systemctl start {CONTAINERD_SERVICE}; see journalctl -u {CONTAINERD_SERVICE}"),
        ),
    }
}

/// The SOCI service from its unit files and enablement links (no D-Bus answer).
fn service_in_files(node: &Node) -> Check {
    if !node.soci_unit.exists() {
        return Check::fail(
            SERVICE_ID,
            format!("no {SOCI_SERVICE} unit file (see soci.binary)"),
            "run soci-agent install",
        );
    }
    let links = enablement_links(&node.root, SOCI_SERVICE);
    let evidence = format!("{SOCI_SERVICE}: {} (unit files)", links_shown(&links));
    if !links.is_empty() {
        return Check::ok(SERVICE_ID, evidence);
    }
    if !enablement_links(&node.root, SOCI_SOCKET_UNIT).is_empty() {
        return Check::ok(
            SERVICE_ID,
            format!("{evidence}; {SOCI_SOCKET_UNIT} is enabled and containerd's Requires= starts it"),
        );
    }
    Check::warn(
        SERVICE_ID,
        format!("{evidence}: neither it nor {SOCI_SOCKET_UNIT} is enabled"),
        format!("systemctl enable {SOCI_SERVICE} {SOCI_SOCKET_UNIT} (install --no-start leaves them disabled)"),
    )
}

const SOCKET_ID: &str = "systemd.soci-socket";

/// `systemd.soci-socket`: the SOCI socket unit, when ExecStart needs one, is enabled or listening.
fn socket(node: &Node) -> Check {
    let fd = node.exec.as_ref().and_then(|e| e.flag("--address")) == Some("fd://");
    let unit = &node.soci_socket_unit;
    if !unit.exists() {
        if fd {
            return Check::warn(
                SOCKET_ID,
                format!("ExecStart uses --address fd:// but there is no {SOCI_SOCKET_UNIT}"),
                "the daemon falls back to its default socket and is not socket-activated: re-run soci-agent install",
            );
        }
        return Check::skip(
            SOCKET_ID,
            format!("no {SOCI_SOCKET_UNIT}, and ExecStart does not use fd:// (none needed)"),
        );
    }
    let listen = unit
        .list("Socket", "ListenStream")
        .into_iter()
        .map(|(_, v)| v)
        .collect::<Vec<_>>()
        .join(" ");
    match node.bus.unit(SOCI_SOCKET_UNIT) {
        Some(st) => socket_on_bus(st, &listen),
        None => socket_in_files(node, &listen),
    }
}

/// The SOCI socket unit (listening on `listen`) as systemd reports it over D-Bus.
fn socket_on_bus(st: &UnitState, listen: &str) -> Check {
    let evidence = format!(
        "{SOCI_SOCKET_UNIT} (ListenStream={listen}): {} (D-Bus)",
        state_shown(st)
    );
    match st.active_state.as_str() {
        "active" => Check::ok(SOCKET_ID, evidence),
        "failed" => Check::fail(SOCKET_ID, evidence, format!("see journalctl -u {SOCI_SOCKET_UNIT}")),
        _ if enabled(st) => Check::ok(SOCKET_ID, evidence),
        _ => Check::warn(
            SOCKET_ID,
            evidence,
            format!("systemctl enable --now {SOCI_SOCKET_UNIT}"),
        ),
    }
}

/// The SOCI socket unit (listening on `listen`) from its enablement links (no D-Bus answer).
fn socket_in_files(node: &Node, listen: &str) -> Check {
    let links = enablement_links(&node.root, SOCI_SOCKET_UNIT);
    let evidence = format!(
        "{SOCI_SOCKET_UNIT} (ListenStream={listen}): {} (unit files)",
        links_shown(&links)
    );
    if links.is_empty() {
        return Check::warn(
            SOCKET_ID,
            evidence,
            format!("systemctl enable {SOCI_SOCKET_UNIT} (install --no-start leaves it disabled)"),
        );
    }
    Check::ok(SOCKET_ID, evidence)
}

/// Files of `unit` listing `wanted` under `[Unit] key`.
fn listed_in(unit: &UnitFiles, key: &str, wanted: &str) -> Vec<String> {
    unit.list("Unit", key)
        .into_iter()
        .filter(|(_, v)| v == wanted)
        .map(|(p, _)| p)
        .collect()
}

fn containerd_dropin(node: &Node) -> Check {
    const ID: &str = "systemd.containerd-dropin";
    let unit = UnitFiles::load(&node.root, CONTAINERD_SERVICE);
    let requires = listed_in(&unit, "Requires", SOCI_SERVICE);
    let after = listed_in(&unit, "After", SOCI_SERVICE);
    let fix = "re-run soci-agent install (it writes containerd.service.d/10-soci-snapshotter.conf)";
    match (requires.first(), after.first()) {
        (Some(r), Some(a)) => {
            let st = node.bus.unit(CONTAINERD_SERVICE);
            let evidence = format!("Requires={SOCI_SERVICE} ({r}), After={SOCI_SERVICE} ({a})");
            match st {
                Some(st) if st.need_daemon_reload => Check::warn(
                    ID,
                    format!("{evidence}; systemd has not reloaded {CONTAINERD_SERVICE} since they changed"),
                    "systemctl daemon-reload",
                ),
                Some(st) if !st.drop_in_paths.iter().any(|p| p == r) => Check::warn(
                    ID,
                    format!("{evidence}; systemd loaded {} instead", st.drop_in_paths.join(", ")),
                    "systemctl daemon-reload",
                ),
                _ => Check::ok(ID, evidence),
            }
        }
        (None, Some(a)) => Check::fail(
            ID,
            format!("After={SOCI_SERVICE} ({a}) but no Requires={SOCI_SERVICE}"),
            format!("containerd can start without SOCI: {fix}"),
        ),
        (Some(r), None) => Check::fail(
            ID,
            format!("Requires={SOCI_SERVICE} ({r}) but no After={SOCI_SERVICE}"),
            format!("containerd may start before SOCI serves: {fix}"),
        ),
        (None, None) => Check::fail(
            ID,
            format!("no {CONTAINERD_SERVICE} file or drop-in requires or orders after {SOCI_SERVICE}"),
            format!("containerd may start before or without SOCI: {fix}"),
        ),
    }
}

const BOOT_UNIT_ID: &str = "systemd.boot-unit";

/// `systemd.boot-unit`: the boot unit exists, runs an existing binary, and something starts it.
fn boot_unit(node: &Node) -> Check {
    const ID: &str = BOOT_UNIT_ID;
    let unit = UnitFiles::load(&node.root, BOOT_SERVICE);
    if !unit.exists() {
        if !node.agent_installed() {
            return Check::skip(ID, format!("no {BOOT_SERVICE}: soci-agent has not installed here"));
        }
        return Check::fail(ID, format!("no {BOOT_SERVICE}"), "re-run soci-agent install");
    }
    if let Some(e) = unit.exec_start()
        && !node.root.path(node.resolve(e.binary())).is_file()
    {
        return Check::fail(
            ID,
            format!(
                "{BOOT_SERVICE} runs {} ({}), which does not exist",
                e.binary(),
                e.source
            ),
            "re-run soci-agent install (it copies itself there)",
        );
    }
    let how = boot_unit_started_by(node);
    if !how.is_empty() {
        return Check::ok(ID, format!("{BOOT_SERVICE}: {}", how.join("; ")));
    }
    boot_unit_idle(node)
}

/// What starts the boot unit: its enablement (D-Bus, else links) and kubelet's Wants=/Requires=.
fn boot_unit_started_by(node: &Node) -> Vec<String> {
    let kubelet = UnitFiles::load(&node.root, KUBELET_SERVICE);
    let mut wanted = listed_in(&kubelet, "Wants", BOOT_SERVICE);
    wanted.extend(listed_in(&kubelet, "Requires", BOOT_SERVICE));
    let links = enablement_links(&node.root, BOOT_SERVICE);
    let mut how = Vec::new();
    if let Some(st) = node.bus.unit(BOOT_SERVICE).filter(|st| enabled(st)) {
        how.push(format!("UnitFileState={} (D-Bus)", st.unit_file_state));
    } else if !links.is_empty() {
        how.push(format!("enabled ({})", links.join(", ")));
    }
    if let Some(w) = wanted.first() {
        how.push(format!("wanted by {KUBELET_SERVICE} ({w})"));
    }
    how
}

/// Nothing starts the boot unit: a failure when there is a pause image to import, else a warning.
fn boot_unit_idle(node: &Node) -> Check {
    let evidence = format!("{BOOT_SERVICE} exists but is neither enabled nor wanted by {KUBELET_SERVICE}");
    if node.root.exists(PAUSE_ARCHIVE) {
        return Check::fail(
            BOOT_UNIT_ID,
            format!("{evidence}, and {} exists", PAUSE_ARCHIVE),
            format!(
                "the pause image is never imported into soci, so nodes stay NotReady: systemctl enable {BOOT_SERVICE}"
            ),
        );
    }
    Check::warn(
        BOOT_UNIT_ID,
        evidence,
        format!("systemctl enable {BOOT_SERVICE} (install --no-start leaves it disabled)"),
    )
}

fn boot_result(node: &Node) -> Check {
    const ID: &str = "systemd.boot-result";
    let Some(st) = node.bus.unit(BOOT_SERVICE) else {
        let why = match &node.bus {
            Bus::Unavailable(_) => "no D-Bus (see systemd.bus); the last boot report is recent.boot",
            Bus::Connected { .. } => "systemd did not answer for the boot unit",
        };
        return Check::skip(ID, why);
    };
    let evidence = format!("{BOOT_SERVICE}: {} (D-Bus)", state_shown(st));
    match (st.load_state.as_str(), st.active_state.as_str(), st.result.as_str()) {
        ("not-found", _, _) => Check::skip(ID, format!("{BOOT_SERVICE} is not installed")),
        (_, "failed", _) => Check::fail(
            ID,
            evidence,
            format!("see journalctl -u {BOOT_SERVICE}; run soci-agent boot --strict by hand"),
        ),
        (_, "active", "success") => Check::ok(ID, evidence),
        (_, "activating", _) => Check::ok(ID, format!("{evidence}: running now")),
        (_, _, _) if st.invocation_id.is_empty() => Check::skip(ID, format!("{evidence}: has not run since boot")),
        _ => Check::warn(ID, evidence, format!("see journalctl -u {BOOT_SERVICE}")),
    }
}
