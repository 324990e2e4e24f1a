//! `soci_agent::systemd` against the real systemd (252) of a booted Debian node.
//!
//! One node boots for the whole file (`systemd_client_drives_a_booted_node`, a sequence of
//! steps); the client connects to the node's system bus from the host through the bus socket
//! the harness exposes (see `common::nspawn`). Facts are cross-checked with `systemctl` and the
//! files in the node's rootfs. Needs root, debootstrap and systemd-nspawn.

mod common;

use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use common::nspawn::{Node, NodeOptions, mirror_from_deb822, mirror_from_one_line};
use soci_agent::systemd::{Systemd, SystemdError, UnitFileChange, UnitState};

/// Bound for the main client: far above any job here, so job results, not our bound, decide.
const BOUND: Duration = Duration::from_secs(30);

const PROBE: &str = "[Unit]\nDescription=probe\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\n\
                     ExecStart=/bin/true\n\n[Install]\nWantedBy=multi-user.target\n";
const BROKEN: &str = "[Service]\nType=oneshot\nExecStart=/bin/false\n";
/// Never sends READY=1; systemd gives up after 2 s.
const SILENT: &str = "[Service]\nType=notify\nExecStart=/bin/sleep infinity\nTimeoutStartSec=2\n";
/// Never sends READY=1; the start job (not the service) times out after 2 s.
const JOB_TIMEOUT: &str =
    "[Unit]\nJobTimeoutSec=2\n\n[Service]\nType=notify\nExecStart=/bin/sleep infinity\nTimeoutStartSec=300\n";
/// Never sends READY=1 and systemd would wait 5 minutes: only our bound can end the wait.
const SLOW: &str = "[Service]\nType=notify\nExecStart=/bin/sleep infinity\nTimeoutStartSec=300\n";
/// A socket nobody connects to, so it stays `listening`.
const LISTEN_SOCKET: &str = "[Socket]\nListenStream=/run/listen.sock\n";
const LISTEN_SERVICE: &str = "[Service]\nType=oneshot\nExecStart=/bin/true\n";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn step(name: &str) {
    eprintln!("-- {name}");
}

#[test]
fn systemd_client_drives_a_booted_node() {
    let started = Instant::now();
    let node = Node::boot(
        NodeOptions::new()
            .al2023_like()
            .file("/etc/systemd/system/probe.service", PROBE)
            .file("/etc/systemd/system/broken.service", BROKEN)
            .file("/etc/systemd/system/silent.service", SILENT)
            .file("/etc/systemd/system/jobtimeout.service", JOB_TIMEOUT)
            .file("/etc/systemd/system/slow.service", SLOW)
            .file("/etc/systemd/system/listen.socket", LISTEN_SOCKET)
            .file("/etc/systemd/system/listen.service", LISTEN_SERVICE),
    );
    let booted = started.elapsed();
    runtime().block_on(async {
        let sd = Systemd::connect_address(&node.bus_address(), BOUND)
            .await
            .expect("connect to the node's bus");
        fresh_unit_state(&sd).await;
        enable_creates_the_install_symlink(&node, &sd).await;
        start_restart_and_invocation_ids(&node, &sd).await;
        reload_picks_up_changed_files(&node, &sd).await;
        failing_start_is_job_failed(&sd).await;
        stop_and_disable(&node, &sd).await;
        socket_and_missing_units(&node, &sd).await;
        notify_unit_that_never_notifies(&sd).await;
        our_bound_ends_a_wait_systemd_would_continue(&node, &sd).await;
    });
    // containerd's boot symlink was removed before boot, as on AL2023.
    assert_eq!(
        node.exec(&["systemctl", "is-active", "containerd"]).stdout,
        b"inactive\n"
    );
    eprintln!("node booted in {booted:.1?}; whole test {:.1?}", started.elapsed());
}

async fn state(sd: &Systemd, unit: &str) -> UnitState {
    sd.unit_state(unit)
        .await
        .unwrap_or_else(|e| panic!("unit_state {unit}: {e}"))
}

async fn fresh_unit_state(sd: &Systemd) {
    step("state of a unit that never ran");
    let probe = state(sd, "probe.service").await;
    assert_eq!(probe.name, "probe.service");
    assert_eq!(
        (probe.load_state.as_str(), probe.active_state.as_str()),
        ("loaded", "inactive")
    );
    assert_eq!(probe.unit_file_state, "disabled");
    assert_eq!(probe.fragment_path, "/etc/systemd/system/probe.service");
    assert!(probe.drop_in_paths.is_empty(), "{probe:?}");
    assert!(!probe.need_daemon_reload);
    assert_eq!(probe.invocation_id, "", "never ran");
}

/// Needs probe.service active: an inactive, unreferenced unit is unloaded after each call and
/// read afresh by the next `LoadUnit`, so it never "needs" a reload.
async fn reload_picks_up_changed_files(node: &Node, sd: &Systemd) {
    step("reload");
    let before = state(sd, "probe.service").await;
    assert!(before.is_active() && !before.need_daemon_reload, "{before:?}");
    let fragment = node.path("/etc/systemd/system/probe.service");
    std::fs::write(
        &fragment,
        PROBE.replace("Description=probe", "Description=probe, edited"),
    )
    .unwrap();
    let dropin = node.path("/etc/systemd/system/probe.service.d/10-test.conf");
    std::fs::create_dir_all(dropin.parent().unwrap()).unwrap();
    std::fs::write(&dropin, "[Unit]\nDescription=probe with a drop-in\n").unwrap();
    assert!(
        state(sd, "probe.service").await.need_daemon_reload,
        "a changed unit file needs a reload"
    );

    sd.reload().await.unwrap();
    let after = state(sd, "probe.service").await;
    assert!(!after.need_daemon_reload, "{after:?}");
    assert_eq!(
        after.drop_in_paths,
        ["/etc/systemd/system/probe.service.d/10-test.conf"]
    );
    assert_eq!(
        node.check(&["systemctl", "show", "-P", "Description", "probe"]),
        "probe with a drop-in"
    );
    assert_eq!(after.invocation_id, before.invocation_id, "a reload restarts nothing");
}

async fn enable_creates_the_install_symlink(node: &Node, sd: &Systemd) {
    step("enable");
    let link = "/etc/systemd/system/multi-user.target.wants/probe.service";
    let changes = sd.enable(&["probe.service"]).await.unwrap();
    assert_eq!(
        changes,
        [UnitFileChange {
            kind: "symlink".into(),
            path: link.into(),
            source: "/etc/systemd/system/probe.service".into(),
        }]
    );
    let target = std::fs::read_link(node.path(link)).expect("symlink in the node's rootfs");
    assert_eq!(target.to_str(), Some("/etc/systemd/system/probe.service"));
    sd.reload().await.unwrap();
    assert_eq!(state(sd, "probe.service").await.unit_file_state, "enabled");
    let wants = node.check(&["systemctl", "show", "-P", "Wants", "multi-user.target"]);
    assert!(wants.split_whitespace().any(|u| u == "probe.service"), "{wants}");
    assert_eq!(node.check(&["systemctl", "is-enabled", "probe"]), "enabled");
    assert_eq!(
        sd.enable(&["probe.service"]).await.unwrap(),
        [],
        "enabling twice changes nothing"
    );

    let err = sd.enable(&["no-such-unit.service"]).await.unwrap_err();
    assert!(
        matches!(&err, SystemdError::Call { method: "EnableUnitFiles", unit, .. } if unit == "no-such-unit.service"),
        "{err:?}"
    );
}

async fn start_restart_and_invocation_ids(node: &Node, sd: &Systemd) {
    step("start, restart, invocation IDs");
    sd.start("probe.service").await.unwrap();
    let first = state(sd, "probe.service").await;
    assert_eq!(
        (first.active_state.as_str(), first.sub_state.as_str()),
        ("active", "exited")
    );
    assert_eq!(first.result, "success");
    assert_eq!(first.invocation_id.len(), 32, "{first:?}");
    assert!(first.invocation_id.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(node.check(&["systemctl", "is-active", "probe"]), "active");
    assert_eq!(
        node.check(&["systemctl", "show", "-P", "InvocationID", "probe"]),
        first.invocation_id
    );

    // Nothing restarted: the same invocation, even after a start of the active unit.
    sd.start("probe.service").await.unwrap();
    assert_eq!(state(sd, "probe.service").await.invocation_id, first.invocation_id);

    sd.restart("probe.service").await.unwrap();
    let second = state(sd, "probe.service").await;
    assert!(second.is_active());
    assert_ne!(
        second.invocation_id, first.invocation_id,
        "a restart is a new invocation"
    );
    assert_eq!(second.invocation_id.len(), 32);
}

async fn failing_start_is_job_failed(sd: &Systemd) {
    step("start of a failing unit");
    let err = sd.start("broken.service").await.unwrap_err();
    let SystemdError::JobFailed {
        unit,
        op,
        result,
        state,
    } = &err
    else {
        panic!("expected JobFailed, got {err:?}");
    };
    assert_eq!(
        (unit.as_str(), *op, result.as_str()),
        ("broken.service", "start", "failed")
    );
    assert_eq!(
        (
            state.active_state.as_str(),
            state.sub_state.as_str(),
            state.result.as_str()
        ),
        ("failed", "failed", "exit-code")
    );
    assert_eq!(
        err.to_string(),
        "start broken.service: job failed (result=failed; ActiveState=failed SubState=failed Result=exit-code)"
    );

    let err = sd.start("no-such-unit.service").await.unwrap_err();
    assert!(
        matches!(&err, SystemdError::Call { method: "StartUnit", unit, .. } if unit == "no-such-unit.service"),
        "{err:?}"
    );
    assert!(err.to_string().contains("not found"), "{err}");
}

async fn stop_and_disable(node: &Node, sd: &Systemd) {
    step("stop, disable");
    sd.stop("probe.service").await.unwrap();
    let stopped = state(sd, "probe.service").await;
    assert_eq!(
        (stopped.active_state.as_str(), stopped.sub_state.as_str()),
        ("inactive", "dead")
    );
    sd.stop("probe.service").await.expect("stopping a stopped unit is fine");
    assert_eq!(node.exec(&["systemctl", "is-active", "probe"]).stdout, b"inactive\n");

    let link = "/etc/systemd/system/multi-user.target.wants/probe.service";
    let changes = sd.disable(&["probe.service"]).await.unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!((changes[0].kind.as_str(), changes[0].path.as_str()), ("unlink", link));
    assert!(std::fs::symlink_metadata(node.path(link)).is_err(), "symlink removed");
    // A loaded unit's UnitFileState is cached until the next reload (systemctl reloads too).
    sd.reload().await.unwrap();
    assert_eq!(state(sd, "probe.service").await.unit_file_state, "disabled");
    assert_eq!(node.exec(&["systemctl", "is-enabled", "probe"]).stdout, b"disabled\n");
    assert_eq!(sd.disable(&["probe.service"]).await.unwrap(), []);
}

async fn socket_and_missing_units(node: &Node, sd: &Systemd) {
    step("socket unit, missing unit");
    sd.start("listen.socket").await.unwrap();
    let socket = state(sd, "listen.socket").await;
    assert_eq!(socket.name, "listen.socket");
    assert_eq!(
        (socket.active_state.as_str(), socket.sub_state.as_str()),
        ("active", "listening")
    );
    assert_eq!((socket.result.as_str(), socket.main_pid, socket.n_restarts), ("", 0, 0));
    assert_eq!(socket.to_string(), "ActiveState=active SubState=listening");

    let dbus = state(sd, "dbus.service").await;
    assert!(dbus.is_active());
    assert_eq!(
        dbus.main_pid.to_string(),
        node.check(&["systemctl", "show", "-P", "MainPID", "dbus"])
    );

    let missing = state(sd, "no-such-unit.service").await;
    assert_eq!(
        (missing.load_state.as_str(), missing.active_state.as_str()),
        ("not-found", "inactive")
    );
}

/// TimeoutStartSec= failing a start fails the job (result `failed`) with the service's
/// `Result=timeout`; the job result `timeout` comes from JobTimeoutSec=.
async fn notify_unit_that_never_notifies(sd: &Systemd) {
    step("Type=notify without READY=1: TimeoutStartSec=2, then JobTimeoutSec=2");
    let t = Instant::now();
    let err = sd.start("silent.service").await.unwrap_err();
    let SystemdError::JobFailed { result, state, .. } = &err else {
        panic!("expected JobFailed, got {err:?}");
    };
    assert_eq!(result, "failed");
    assert_eq!(
        (state.active_state.as_str(), state.result.as_str()),
        ("failed", "timeout"),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "start silent.service: job failed (result=failed; ActiveState=failed SubState=failed Result=timeout)"
    );
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "systemd's timeout decided: {:?}",
        t.elapsed()
    );

    let t = Instant::now();
    let err = sd.start("jobtimeout.service").await.unwrap_err();
    let SystemdError::JobFailed { result, .. } = &err else {
        panic!("expected JobFailed, got {err:?}");
    };
    assert_eq!(result, "timeout", "{err}");
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "systemd's job timeout decided: {:?}",
        t.elapsed()
    );
    sd.stop("jobtimeout.service").await.unwrap();
}

async fn our_bound_ends_a_wait_systemd_would_continue(node: &Node, sd: &Systemd) {
    step("our bound is shorter than TimeoutStartSec");
    let bound = Duration::from_secs(1);
    let impatient = Systemd::connect_address(&node.bus_address(), bound).await.unwrap();
    let t = Instant::now();
    let err = impatient.start("slow.service").await.unwrap_err();
    let waited = t.elapsed();
    let SystemdError::Timeout {
        unit,
        op,
        waited: said,
        state,
    } = &err
    else {
        panic!("expected Timeout, got {err:?}");
    };
    assert_eq!((unit.as_str(), *op, *said), ("slow.service", "start", bound));
    assert!(waited >= bound && waited < bound * 5, "waited {waited:?}");
    let state = state.as_ref().expect("state read after the timeout");
    assert_eq!(
        (state.active_state.as_str(), state.sub_state.as_str()),
        ("activating", "start")
    );
    assert!(state.main_pid > 0);
    assert!(
        err.to_string()
            .starts_with("start slow.service: no job result within 1s (ActiveState=activating"),
        "{err}"
    );

    // The main client can still stop it (cancelling the pending start job).
    sd.stop("slow.service").await.unwrap();
    assert_eq!(self::state(sd, "slow.service").await.active_state, "inactive");
}

#[test]
fn no_bus_when_the_socket_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let address = format!("unix:path={}/system_bus_socket", dir.path().display());
    let t = Instant::now();
    let err = runtime()
        .block_on(Systemd::connect_address(&address, Duration::from_secs(2)))
        .err()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(
        matches!(&err, SystemdError::NoBus { address: a, .. } if *a == address),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.starts_with(&format!("no system bus at {address}: ")), "{msg}");
    assert!(
        msg.ends_with("(is this a booted systemd host? use --no-start to only write files)"),
        "{msg}"
    );
}

#[test]
fn no_bus_when_the_socket_never_answers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("system_bus_socket");
    let _listener = UnixListener::bind(&path).unwrap(); // accepts into the backlog, never speaks
    let bound = Duration::from_millis(500);
    let t = Instant::now();
    let err = runtime()
        .block_on(Systemd::connect_address(
            &format!("unix:path={}", path.display()),
            bound,
        ))
        .err()
        .unwrap();
    let waited = t.elapsed();
    assert!(waited >= bound && waited < bound * 4, "waited {waited:?}");
    assert!(matches!(err, SystemdError::NoBus { .. }), "{err:?}");
}

#[test]
fn harness_reads_the_apt_mirror() {
    let deb822 = "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n\n\
                  Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n";
    assert_eq!(
        mirror_from_deb822(deb822).as_deref(),
        Some("http://mirror.example/debian")
    );
    let one_line = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n";
    assert_eq!(
        mirror_from_one_line(one_line).as_deref(),
        Some("http://m.example/debian")
    );
    assert_eq!(mirror_from_one_line("deb http://x/ bookworm-updates main\n"), None);
}
