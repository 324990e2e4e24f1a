//! `soci-agent daemon` as systemd runs it, against real parts: node trees
//! built by `soci-agent install --root DIR --no-start --archive …`, the
//! status socket (one JSON object), `/metrics` (checked by a strict
//! OpenMetrics text parser below and by the `prometheus-parse` crate), a test `NOTIFY_SOCKET`, real containerd
//! with the SOCI stand-in for the live checks, a real registry and
//! containerd's CRI for warm images and moved tags, and a booted systemd
//! node (`common::nspawn`) for repairs over D-Bus. Every wait polls the
//! daemon's state with a deadline; nothing sleeps to synchronise.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::agent_bin;
use common::archive::standard_release;
use common::booted::{Boot, Booted, CONTAINERD, SOCI};
use common::containerd::Containerd;
use common::nspawn::{Node, NodeOptions};
use common::real::{NodeContainerdConfig, with_containerd};
use common::registry::Pushed;
use common::tree::Tree;
use serde_json::Value;

const VER: &str = "0.15.0";
const ARCHIVE: &str = "soci-snapshotter-0.15.0-linux-amd64-static.tar.gz";
const SOCI_CONFIG: &str = "/etc/soci-snapshotter-grpc/config.toml";
const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
const CONTAINERD_DROPIN: &str = "/etc/systemd/system/containerd.service.d/10-soci-snapshotter.conf";
const AGENT_CONFIG: &str = "/etc/soci-agent/config.toml";
/// The daemon's promise: it is gone this soon after SIGTERM.
const STOP_BOUND: Duration = Duration::from_secs(10);
const WAIT: Duration = Duration::from_secs(30);

/// The agent with a clean environment (nothing from a surrounding systemd or SOCI_AGENT_*).
fn agent(args: &[&str]) -> Command {
    let mut cmd = Command::new(agent_bin());
    cmd.args(args).stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("SOCI_AGENT_") || k == "NOTIFY_SOCKET" || k.starts_with("WATCHDOG_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// Node trees and the daemon process.

/// Node trees for the daemon: installed by `soci-agent install --no-start`, or bare.
impl Tree {
    /// A plain Debian-like host (containerd's default config, unpigz, kubelet config), installed.
    fn installed() -> Tree {
        let t = Tree::plain();
        let archive = t.put_archive(ARCHIVE, &standard_release(VER));
        let out = agent(&["install", "--no-start", "--log-level", "warn"])
            .arg("--root")
            .arg(t.root())
            .arg("--archive")
            .arg(&archive)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "install failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        t
    }
    /// An empty tree (nothing installed): for the image tests.
    fn bare() -> Tree {
        let t = Tree::empty();
        std::fs::create_dir_all(t.root()).unwrap();
        t
    }
    fn mode(&self, node_path: &str) -> u32 {
        common::mode_of(&self.path(node_path))
    }
    fn config(&self, text: &str) {
        self.write(AGENT_CONFIG, text, 0o644);
    }
    /// Where the daemon's status socket is put (a short host path: sun_path is 108 bytes).
    fn socket(&self) -> PathBuf {
        self.beside("d.sock")
    }
}

/// A running `soci-agent daemon`; killed (and its log shown) on drop during a panic.
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
    socket: PathBuf,
}

impl Daemon {
    fn start(tree: &Tree, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let log = tree.beside(&format!("daemon-{}.log", fastrand::u32(..)));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = agent(&["daemon", "--log-level", "info"]);
        cmd.arg("--root")
            .arg(tree.root())
            .arg("--state-socket")
            .arg(tree.socket())
            .args(args)
            .envs(env.iter().copied())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        let child = cmd.spawn().unwrap();
        Daemon {
            child: Some(child),
            log,
            socket: tree.socket(),
        }
    }
    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// The log's JSON lines.
    fn events(&self) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
    /// Log lines with `message` (and `check == check` when given).
    fn count(&self, message: &str, check: Option<&str>) -> usize {
        self.events()
            .iter()
            .filter(|e| e["message"] == message && check.is_none_or(|c| e["check"] == c))
            .count()
    }
    /// One answer of the status socket, if it answers.
    fn try_status(&self) -> Option<Value> {
        let mut s = UnixStream::connect(&self.socket).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        serde_json::from_str(&text).ok()
    }
    fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|| panic!("status socket does not answer\n{}", self.log()))
    }
    /// Polls the status until `ok(status)`; returns that status.
    fn wait(&mut self, what: &str, limit: Duration, ok: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let deadline = Instant::now() + limit;
        loop {
            self.assert_running();
            if let Some(v) = self.try_status() {
                if ok(&v) {
                    return v;
                }
                last = v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {limit:?}\nlast status: {}\nlog:\n{}",
                serde_json::to_string_pretty(&last).unwrap(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    fn ready(&mut self) -> Value {
        self.wait("ready", WAIT, |v| v["ready"] == true)
    }
    /// Waits for `n` more reconciles than `status` shows; returns the newest status.
    fn reconciles_after(&mut self, status: &Value, n: u64) -> Value {
        let base = status["reconciles"].as_u64().unwrap();
        self.wait(&format!("{n} more reconciles"), WAIT, |v| {
            v["reconciles"].as_u64().unwrap() >= base + n
        })
    }
    fn assert_running(&mut self) {
        if let Some(s) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("the daemon exited ({s}); log:\n{}", self.log());
        }
    }
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(ok.success(), "kill -{sig}");
    }
    /// SIGTERM, then waits (bounded) for the exit: its status and how long it took.
    fn terminate(&mut self) -> (ExitStatus, Duration) {
        self.signal("TERM");
        let started = Instant::now();
        let mut child = self.child.take().unwrap();
        let Some(status) = common::wait_for_exit(&mut child, STOP_BOUND + Duration::from_secs(5)) else {
            let _ = child.kill();
            panic!("still running {:?} after SIGTERM\n{}", started.elapsed(), self.log());
        };
        (status, started.elapsed())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- daemon log:\n{}", self.log());
        }
    }
}

fn check<'a>(status: &'a Value, id: &str) -> &'a Value {
    let checks = status["checks"].as_array().expect("checks");
    checks
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no check {id} in {status}"))
}

fn drift_of<'a>(status: &'a Value, path: &str) -> &'a Value {
    let drift = status["drift"].as_array().expect("drift");
    drift
        .iter()
        .find(|d| d["path"] == path)
        .unwrap_or_else(|| panic!("no drift entry for {path} in {status}"))
}

fn repaired(status: &Value) -> BTreeSet<String> {
    status["repairs"]["recent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["result"] == "ok")
        .map(|e| e["target"].as_str().unwrap().to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Drift, repair, reload.

#[test]
fn drift_is_reported_and_with_repair_on_put_back() {
    let t = Tree::installed();
    let soci_config = t.read_bytes(SOCI_CONFIG);
    let dropin = t.read_bytes(CONTAINERD_DROPIN);
    t.config("[daemon]\nrepair = true\n");
    let mut d = Daemon::start(&t, &["--interval", "0.1"], &[]);
    let s = d.ready();
    assert_eq!(check(&s, "agent.drift")["verdict"], "ok", "{s}");
    assert_eq!(drift_of(&s, SOCI_CONFIG)["state"], "ok");

    // A person edits SOCI's config, deletes containerd's drop-in, and edits containerd's
    // config: an unrelated comment (theirs to keep) and the soci wiring (ours to put back).
    edit_soci_config_delete_dropin_edit_containerd_config(&t, &soci_config);
    let s = three_files_are_put_back(&t, &mut d, &soci_config, &dropin);

    // A mode change is drift too.
    std::fs::set_permissions(t.path(SOCI_CONFIG), std::fs::Permissions::from_mode(0o600)).unwrap();
    let total = s["repairs"]["total"].as_u64().unwrap();
    d.wait("mode repaired", WAIT, |v| {
        v["repairs"]["total"].as_u64().unwrap() > total && check(v, "agent.drift")["verdict"] == "ok"
    });
    assert_eq!(t.mode(SOCI_CONFIG), 0o644);
    assert_eq!(t.read_bytes(SOCI_CONFIG), soci_config);
}

/// SOCI's config with its parallel switch flipped, containerd's drop-in deleted, containerd's
/// config with a local note and its soci wiring undone.
fn edit_soci_config_delete_dropin_edit_containerd_config(t: &Tree, soci_config: &[u8]) {
    let local = String::from_utf8_lossy(soci_config).replace("enable = true", "enable = false");
    assert_ne!(
        local.as_bytes(),
        soci_config,
        "the SOCI config has a parallel switch to flip"
    );
    t.write(SOCI_CONFIG, &local, 0o644);
    std::fs::remove_file(t.path(CONTAINERD_DROPIN)).unwrap();
    let wired = t.read(CONTAINERD_CONFIG);
    assert!(wired.contains("snapshotter = \"soci\""), "{wired}");
    let edited = format!(
        "# kept: a local note\n{}",
        wired.replacen("snapshotter = \"soci\"", "snapshotter = \"overlayfs\"", 1)
    );
    t.write(CONTAINERD_CONFIG, &edited, 0o644);
}

/// The three files are repaired once each: install's bytes again, containerd's config merged
/// (the note kept, the wiring back). Returns the status that showed it.
fn three_files_are_put_back(t: &Tree, d: &mut Daemon, soci_config: &[u8], dropin: &[u8]) -> Value {
    let s = d.wait("three files repaired", WAIT, |v| {
        let r = repaired(v);
        [SOCI_CONFIG, CONTAINERD_DROPIN, CONTAINERD_CONFIG]
            .iter()
            .all(|p| r.contains(*p))
            && check(v, "agent.drift")["verdict"] == "ok"
    });
    assert_eq!(
        t.read_bytes(SOCI_CONFIG),
        soci_config,
        "SOCI config bytes are install's again"
    );
    assert_eq!(
        t.read_bytes(CONTAINERD_DROPIN),
        dropin,
        "drop-in bytes are install's again"
    );
    let merged = t.read(CONTAINERD_CONFIG);
    assert!(merged.starts_with("# kept: a local note\n"), "{merged}");
    assert!(
        merged.contains("snapshotter = \"soci\"") && !merged.contains("snapshotter = \"overlayfs\""),
        "{merged}"
    );
    assert_eq!(s["repairs"]["failed"], 0);
    assert!(s["repairs"]["total"].as_u64().unwrap() >= 3);
    for p in [SOCI_CONFIG, CONTAINERD_DROPIN, CONTAINERD_CONFIG] {
        assert_eq!(drift_of(&s, p)["state"], "ok", "{p}");
        let logged = d
            .events()
            .iter()
            .filter(|e| e["message"] == "repaired a drifted file" && e["path"] == p)
            .count();
        assert_eq!(logged, 1, "{p} repaired once");
    }
    s
}

/// The desired state is what install was asked (here `--archive`, recorded, at the default
/// version); when the config file later asks for another SOCI version, the daemon says so and
/// repairs nothing: it never downloads, unpacks or switches SOCI on its own.
#[test]
fn another_soci_wanted_is_reported_never_switched() {
    let t = Tree::installed();
    let soci_config = t.read_bytes(SOCI_CONFIG);
    t.config("[install]\nsoci_version = \"0.15.0\"\n\n[daemon]\nrepair = true\n");
    let drifted = format!("{}# a local change\n", t.read(SOCI_CONFIG));
    t.write(SOCI_CONFIG, &drifted, 0o644);
    let mut d = Daemon::start(&t, &["--interval", "0.1"], &[]);
    let s = d.ready();
    let s = d.reconciles_after(&s, 3);
    let drift = check(&s, "agent.drift");
    assert_eq!(drift["verdict"], "warn", "{drift}");
    assert!(
        drift["evidence"].as_str().unwrap().contains("never switches SOCI"),
        "{drift}"
    );
    assert_eq!(s["repairs"]["total"], 0, "{s}");
    assert_eq!(t.read(SOCI_CONFIG), drifted, "nothing written for another SOCI");
    assert_ne!(t.read_bytes(SOCI_CONFIG), soci_config);
    assert!(
        !t.path("/usr/local/lib/soci-agent/releases/0.15.0-amd64").exists(),
        "nothing downloaded or unpacked"
    );
    let desired = s["config"]["desired"].as_array().unwrap();
    let source = |key: &str| desired.iter().find(|o| o["key"] == key).map(|o| o["source"].clone());
    assert_eq!(source("archive"), Some(Value::from("recorded-flag")), "{desired:?}");
    assert_eq!(source("soci_version"), Some(Value::from("file")), "{desired:?}");
}

#[test]
fn drift_with_repair_off_is_reported_once_and_left_alone() {
    let t = Tree::installed();
    let mut d = Daemon::start(&t, &["--interval", "0.1"], &[]);
    let s = d.ready();
    assert_eq!(s["config"]["repair"], false, "repair is off by default");
    let drifted = format!("{}# a local change\n", t.read(SOCI_CONFIG));
    t.write(SOCI_CONFIG, &drifted, 0o644);
    let s = d.wait("drift reported", WAIT, |v| check(v, "agent.drift")["verdict"] == "fail");
    let c = check(&s, "agent.drift");
    assert!(c["evidence"].as_str().unwrap().contains(SOCI_CONFIG), "{c}");
    assert!(c["advice"].as_str().unwrap().contains("soci-agent install"), "{c}");
    assert_eq!(drift_of(&s, SOCI_CONFIG)["state"], "changed");
    assert_eq!(drift_of(&s, SOCI_CONFIG)["repairable"], true);
    let s = d.reconciles_after(&s, 5);
    assert_eq!(t.read(SOCI_CONFIG), drifted, "not restored with repair off");
    assert_eq!(s["repairs"]["total"], 0);
    assert_eq!(check(&s, "agent.drift")["verdict"], "fail");
    assert_eq!(
        d.count("check changed", Some("agent.drift")),
        1,
        "the transition is logged once"
    );
    let metrics = d.count("repaired a drifted file", None);
    assert_eq!(metrics, 0);
}

#[test]
fn drift_found_at_start_or_while_install_holds_its_lock_is_not_put_back() {
    use nix::fcntl::{Flock, FlockArg};
    let t = Tree::installed();
    let soci_config = t.read_bytes(SOCI_CONFIG);
    t.config("[daemon]\nrepair = true\n");
    // Drifted before the daemon ever saw it as install writes it (install may have run with
    // flags the daemon does not know): reported, never "put back".
    let before = format!("{}# changed before the daemon started\n", t.read(SOCI_CONFIG));
    t.write(SOCI_CONFIG, &before, 0o644);
    let mut d = Daemon::start(&t, &["--interval", "0.1"], &[]);
    let s = d.ready();
    assert_eq!(check(&s, "agent.drift")["verdict"], "fail");
    let s = d.reconciles_after(&s, 5);
    assert_eq!(t.read(SOCI_CONFIG), before);
    assert_eq!(s["repairs"]["total"], 0);
    let pending = s["repairs"]["pending"].to_string();
    assert!(pending.contains("drifted before the daemon saw it"), "{pending}");

    // Put right by hand: now it is the baseline, and a later change is repaired...
    t.write(SOCI_CONFIG, std::str::from_utf8(&soci_config).unwrap(), 0o644);
    d.wait("ok again", WAIT, |v| check(v, "agent.drift")["verdict"] == "ok");
    // ...except while install holds its lock: the daemon neither waits nor writes.
    let lock_path = soci_agent::install::lock::path_for(&soci_agent::rootfs::Root::new(t.root()));
    std::fs::create_dir_all(lock_path.parent().unwrap()).unwrap();
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap();
    let install = Flock::lock(file, FlockArg::LockExclusive).unwrap();
    let later = format!("{}# changed while the daemon watched\n", t.read(SOCI_CONFIG));
    t.write(SOCI_CONFIG, &later, 0o644);
    let s = d.wait("drift while locked", WAIT, |v| {
        check(v, "agent.drift")["verdict"] == "fail"
            && v["repairs"]["pending"]
                .to_string()
                .contains("held (install or uninstall")
    });
    let s = d.reconciles_after(&s, 3);
    assert_eq!(
        t.read(SOCI_CONFIG),
        later,
        "nothing written while install holds the lock"
    );
    assert_eq!(s["repairs"]["total"], 0);
    drop(install);
    d.wait("repaired once the lock is free", WAIT, |v| {
        v["repairs"]["total"] == 1 && check(v, "agent.drift")["verdict"] == "ok"
    });
    assert_eq!(t.read_bytes(SOCI_CONFIG), soci_config);
}

#[test]
fn sighup_with_a_broken_config_keeps_the_old_one_running() {
    let t = Tree::installed();
    t.config("[daemon]\ninterval = \"100ms\"\n");
    let mut d = Daemon::start(&t, &[], &[]);
    let s = d.ready();
    assert_eq!(
        (
            s["config_generation"].as_u64(),
            s["config"]["interval_seconds"].as_f64()
        ),
        (Some(1), Some(0.1))
    );

    t.config("[daemon\ninterval = \"1h\"\n");
    d.signal("HUP");
    let s = d.wait("reload refused", WAIT, |v| v["config_errors"] == 1);
    let err = s["config_error"]["error"].as_str().unwrap();
    assert!(err.contains("is not valid"), "{err}");
    assert_eq!(s["config_generation"], 1);
    assert_eq!(s["config"]["interval_seconds"], 0.1, "the old interval still runs");
    d.reconciles_after(&s, 3);
    assert_eq!(d.count("reload refused: the running configuration stays", None), 1);

    // A well-formed file with a bad value is refused as well.
    t.config("[daemon]\ninterval = \"soon\"\n");
    d.signal("HUP");
    let s = d.wait("second refusal", WAIT, |v| v["config_errors"] == 2);
    assert!(
        s["config_error"]["error"]
            .as_str()
            .unwrap()
            .contains("[daemon] interval"),
        "{s}"
    );

    // A good one is applied.
    t.config("[daemon]\ninterval = \"200ms\"\nrepair = true\n");
    d.signal("HUP");
    let s = d.wait("reloaded", WAIT, |v| v["config_generation"] == 2);
    assert_eq!(
        (
            s["config"]["repair"].as_bool(),
            s["config"]["interval_seconds"].as_f64()
        ),
        (Some(true), Some(0.2))
    );
    assert!(s["config_error"].is_null());
    // The query CLI reads the same socket.
    let out = agent(&["daemon", "--query", "--state-socket"])
        .arg(t.socket())
        .output()
        .unwrap();
    assert!(out.status.success());
    let q: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(q["config_generation"], 2);
}

// ---------------------------------------------------------------------------------------------
// sd_notify and shutdown.

#[test]
fn ready_after_the_first_reconcile_watchdog_reloading_and_stopping() {
    let t = Tree::installed();
    let notify = t.dir.path().join("notify.sock");
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut d = Daemon::start(
        &t,
        &["--interval", "0.5"],
        &[("NOTIFY_SOCKET", notify.to_str().unwrap()), ("WATCHDOG_USEC", "200000")],
    );
    let mut seen: Vec<String> = Vec::new();
    let recv = |seen: &mut Vec<String>| {
        let mut buf = [0u8; 512];
        rx.recv(&mut buf).ok().map(|n| {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.push(m.clone());
            m
        })
    };
    // Receives until a message starting with `prefix` (bounded).
    let until = |seen: &mut Vec<String>, prefix: &str| -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(m) = recv(seen).filter(|m| m.starts_with(prefix)) {
                return m;
            }
            assert!(Instant::now() < deadline, "no {prefix} within {WAIT:?}: {seen:?}");
        }
    };
    let ready = until(&mut seen, "READY=1");
    // READY goes out after the first reconcile was published.
    let s = d.status();
    assert_eq!(s["ready"], true);
    assert!(s["reconciles"].as_u64().unwrap() >= 1, "{s}");
    assert!(ready.contains("STATUS=reconcile 1:"), "{ready}");
    assert_eq!(seen.iter().filter(|m| m.contains("READY=1")).count(), 1, "{seen:?}");
    // Half of WATCHDOG_USEC: a ping every 100 ms.
    let started = Instant::now();
    let mut pings = 0;
    while pings < 5 {
        if recv(&mut seen).is_some_and(|m| m.trim_end() == "WATCHDOG=1") {
            pings += 1;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "WATCHDOG=1 pings: {seen:?}");
    }
    d.signal("HUP");
    until(&mut seen, "RELOADING=1");
    until(&mut seen, "READY=1");

    let (status, took) = d.terminate();
    assert!(status.success(), "exit status after SIGTERM: {status}\n{}", d.log());
    assert!(took < STOP_BOUND, "took {took:?} to stop");
    let mut rest = Vec::new();
    while recv(&mut rest).is_some() {}
    assert!(
        rest.iter().any(|m| m.starts_with("STOPPING=1")),
        "no STOPPING=1 in {rest:?}"
    );
    assert!(!t.socket().exists(), "the status socket is removed on exit");
}

// ---------------------------------------------------------------------------------------------
// /metrics as Prometheus text.

/// One parsed sample.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// A strict parser of the OpenMetrics text format (1.0.0) as the daemon must write it:
/// `# HELP`, `# TYPE`, `# UNIT` at most once per family, before its samples; families
/// contiguous; metric and label names valid; a family with a unit named `..._{unit}`; sample
/// names as the type wants them (a counter's samples `{family}_total`, an info's
/// `{family}_info`, a gauge's `{family}`); label values quoted with `\\`, `\"`, `\n` escapes;
/// no duplicate series; the text ends with `# EOF` and a newline.
fn parse_prometheus(text: &str) -> Result<Vec<Sample>, String> {
    let Some(text) = text.strip_suffix("# EOF\n") else {
        return Err("does not end with \"# EOF\\n\"".into());
    };
    if !text.is_empty() && !text.ends_with('\n') {
        return Err("# EOF is not on a line of its own".into());
    }
    let mut families = Families::default();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let err = |m: String| format!("line {}: {m}: {line:?}", i + 1);
        if let Some(rest) = line.strip_prefix("# ") {
            families.metadata(rest).map_err(err)?;
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            return Err(err("stray comment or blank line".into()));
        }
        out.push(families.sample(line).map_err(err)?);
    }
    Ok(out)
}

/// A metric name (`colon`: `:` allowed) or a label name.
fn name_ok(n: &str, colon: bool) -> bool {
    let mut cs = n.chars();
    cs.next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':'))
        && cs.all(|c| c.is_ascii_alphanumeric() || c == '_' || (colon && c == ':'))
}

/// What [`parse_prometheus`] has seen of the families so far.
#[derive(Default)]
struct Families {
    types: BTreeMap<String, String>,
    /// `"{keyword} {family}"` of each metadata line.
    meta: BTreeSet<String>,
    /// Families with a sample.
    sampled: BTreeSet<String>,
    /// Families another one followed.
    closed: BTreeSet<String>,
    current: Option<String>,
    series: BTreeSet<String>,
}

impl Families {
    /// A `# HELP`, `# TYPE` or `# UNIT` line (`rest` is what follows `# `).
    fn metadata(&mut self, rest: &str) -> Result<(), String> {
        let mut parts = rest.splitn(3, ' ');
        let (kw, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let arg = parts.next().unwrap_or("");
        if !name_ok(name, true) {
            return Err("bad metric name".into());
        }
        if let Some(c) = self.current.replace(name.to_string())
            && c != name
        {
            self.closed.insert(c);
        }
        if self.closed.contains(name) {
            return Err("family is not contiguous".into());
        }
        if self.sampled.contains(name) || !self.meta.insert(format!("{kw} {name}")) {
            return Err("metadata after the samples or repeated".into());
        }
        match kw {
            "HELP" => {}
            "TYPE" => {
                let known = [
                    "counter",
                    "gauge",
                    "info",
                    "stateset",
                    "histogram",
                    "gaugehistogram",
                    "summary",
                    "unknown",
                ];
                if !known.contains(&arg) {
                    return Err("bad type".into());
                }
                self.types.insert(name.to_string(), arg.to_string());
            }
            "UNIT" if !arg.is_empty() && name.ends_with(&format!("_{arg}")) => {}
            _ => return Err("bad metadata line (or a unit the name does not end with)".into()),
        }
        Ok(())
    }

    /// A sample line: named as its family's type wants, labels, a value, a new series.
    fn sample(&mut self, line: &str) -> Result<Sample, String> {
        let name_end = line.find(['{', ' ']).ok_or("no value")?;
        let name = &line[..name_end];
        if !name_ok(name, true) {
            return Err("bad metric name".into());
        }
        let family = self.current.clone().unwrap_or_default();
        let wanted = match self.types.get(&family).map(String::as_str) {
            None => return Err("sample outside its family (no TYPE before it)".into()),
            Some("counter") => format!("{family}_total"),
            Some("info") => format!("{family}_info"),
            Some(_) => family.clone(),
        };
        if name != wanted {
            return Err(format!("sample of family {family} is not named {wanted}"));
        }
        self.sampled.insert(family);
        let (labels, rest) = sample_labels(&line[name_end..])?;
        let value = sample_value(rest)?;
        if !self.series.insert(format!("{name}{labels:?}")) {
            return Err("duplicate series".into());
        }
        Ok(Sample {
            name: name.to_string(),
            labels,
            value,
        })
    }
}

/// The `{k="v",…}` that may start `rest` (the sample line after its name): the labels, and
/// what follows them.
fn sample_labels(rest: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let Some(r) = rest.strip_prefix('{') else {
        return Ok((labels, rest));
    };
    let mut chars = r.char_indices();
    let mut key = String::new();
    let end = loop {
        let (idx, c) = chars.next().ok_or("unterminated labels")?;
        match c {
            '}' if key.is_empty() => break idx,
            '=' => {
                if !name_ok(&key, false) {
                    return Err("bad label name".into());
                }
                let value = label_value(&mut chars)?;
                if labels.insert(std::mem::take(&mut key), value).is_some() {
                    return Err("repeated label".into());
                }
                match chars.next() {
                    Some((_, ',')) => {}
                    Some((i, '}')) => break i,
                    _ => return Err("bad label separator".into()),
                }
            }
            c => key.push(c),
        }
    };
    Ok((labels, &r[end + 1..]))
}

/// A label's value, from its opening quote (right after the `=`) to its closing one.
fn label_value(chars: &mut std::str::CharIndices) -> Result<String, String> {
    if chars.next().map(|(_, c)| c) != Some('"') {
        return Err("label value not quoted".into());
    }
    let mut value = String::new();
    loop {
        match chars.next().map(|(_, c)| c).ok_or("unterminated value")? {
            '\\' => match chars.next().map(|(_, c)| c) {
                Some('\\') => value.push('\\'),
                Some('"') => value.push('"'),
                Some('n') => value.push('\n'),
                _ => return Err("bad escape".into()),
            },
            '"' => return Ok(value),
            '\n' => return Err("raw newline in value".into()),
            c => value.push(c),
        }
    }
}

/// The ` VALUE` that ends a sample line.
fn sample_value(rest: &str) -> Result<f64, String> {
    let value_text = rest.strip_prefix(' ').ok_or("no space before the value")?;
    Ok(match value_text {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|_| "value is not a number")?,
    })
}

fn find<'a>(samples: &'a [Sample], name: &str, labels: &[(&str, &str)]) -> Option<&'a Sample> {
    samples.iter().find(|s| {
        s.name == name
            && labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
    })
}

/// One HTTP/1.1 request over `stream`: the status code, headers and body.
fn http_get<S: Read + Write>(mut stream: S, method: &str, path: &str) -> (u16, String, String) {
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, head.to_string(), body.to_string())
}

#[test]
fn metrics_parse_as_prometheus_text_and_carry_the_figures() {
    let t = Tree::installed();
    let port = common::registry::free_port();
    // An image that cannot be pulled (no CRI there): its state is reported, not fatal.
    t.config(&format!(
        "[daemon]\nmetrics_address = \"127.0.0.1:{port}\"\n\n[prefetch]\nimages = [\"registry.invalid/team/app:1\"]\n\
         cri_endpoint = \"unix://{}\"\nretries = 0\ntimeout_per_image = 5\n",
        t.dir.path().join("no-cri.sock").display()
    ));
    let mut d = Daemon::start(&t, &["--interval", "0.2"], &[]);
    d.wait("ready, image checked", WAIT, |v| {
        v["ready"] == true && v["images"][0]["state"] == "failed"
    });
    let (code, head, body) = scrape_tcp(port, "GET", "/metrics");
    assert_eq!(code, 200, "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text; version=1.0.0"),
        "{head}"
    );
    let samples = parse_prometheus(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    // The same figures as a Prometheus text parser reads them.
    prometheus_parse_reads_the_figures(&body);
    the_strict_parser_reads_the_figures(&samples, &body);
    assert_eq!(scrape_tcp(port, "GET", "/nope").0, 404);
    assert_eq!(scrape_tcp(port, "POST", "/metrics").0, 405);
    let (code, _, body) = scrape_tcp(port, "HEAD", "/metrics");
    assert_eq!((code, body.as_str()), (200, ""));

    // A drift shows up in the figures; a reload moves /metrics to a unix socket.
    drift_shows_and_a_reload_moves_metrics_to_a_unix_socket(&t, &mut d, port);
}

/// One request to `/metrics`' TCP listener on `port`: [`http_get`]'s answer.
fn scrape_tcp(port: u16, method: &str, path: &str) -> (u16, String, String) {
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    http_get(s, method, path)
}

/// The figures of a ready daemon with a failed image, as `prometheus-parse` reads `body`.
fn prometheus_parse_reads_the_figures(body: &str) {
    let promparse = parse_with_prometheus_parse(body);
    let parsed = |name: &str, labels: &[(&str, &str)]| {
        promparse
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| s.value.clone())
            .unwrap_or_else(|| panic!("prometheus-parse found no {name}{labels:?} in\n{body}"))
    };
    use prometheus_parse::Value as P;
    assert_eq!(parsed("soci_agent_ready", &[]), P::Gauge(1.0));
    assert_eq!(
        parsed("soci_agent_check_ok", &[("check", "agent.drift")]),
        P::Gauge(1.0)
    );
    assert_eq!(
        parsed(
            "soci_agent_image_state",
            &[("image", "registry.invalid/team/app:1"), ("state", "failed")]
        ),
        P::Gauge(1.0)
    );
    assert!(matches!(parsed("soci_agent_reconciles_total", &[]), P::Untyped(n) if n >= 1.0));
    assert!(matches!(parsed("soci_agent_info", &[]), P::Untyped(v) if v == 1.0));
    assert!(promparse.docs.contains_key("soci_agent_phase_seconds"));
}

/// The figures of a ready daemon with a failed image, as [`parse_prometheus`] read them from
/// `body` into `samples`: checks, reconciles, repairs, drift, the image, install's run.
fn the_strict_parser_reads_the_figures(samples: &[Sample], body: &str) {
    let value = |name: &str, labels: &[(&str, &str)]| {
        find(samples, name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{body}"))
            .value
    };
    assert_eq!(value("soci_agent_ready", &[]), 1.0);
    assert_eq!(value("soci_agent_check_ok", &[("check", "agent.drift")]), 1.0);
    assert_eq!(value("soci_agent_check_ok", &[("check", "soci-config.parallel")]), 1.0);
    assert_eq!(
        value("soci_agent_check_ok", &[("check", "containerd.snapshotter")]),
        1.0
    );
    assert!(
        find(samples, "soci_agent_check_ok", &[("check", "live.soci-socket")]).is_none(),
        "skipped checks are left out"
    );
    let last = value("soci_agent_last_reconcile_timestamp_seconds", &[]);
    assert!((unix_now() - last).abs() < 60.0, "last reconcile at {last}");
    assert!(value("soci_agent_reconciles_total", &[]) >= 1.0);
    assert_eq!(value("soci_agent_repairs_total", &[]), 0.0);
    assert_eq!(value("soci_agent_file_drifted", &[("path", SOCI_CONFIG)]), 0.0);
    let image = [("image", "registry.invalid/team/app:1"), ("state", "failed")];
    assert_eq!(value("soci_agent_image_state", &image), 1.0);
    assert_eq!(
        value(
            "soci_agent_image_state",
            &[("image", "registry.invalid/team/app:1"), ("state", "hit")]
        ),
        0.0
    );
    assert!(value("soci_agent_image_seconds", &[("image", "registry.invalid/team/app:1")]) >= 0.0);
    // Install's phase timings, from its saved report.
    assert!(
        value(
            "soci_agent_phase_seconds",
            &[("command", "install"), ("phase", "total")]
        ) > 0.0
    );
    assert!(
        find(
            samples,
            "soci_agent_phase_seconds",
            &[("command", "install"), ("phase", "plan")]
        )
        .is_some()
    );
    assert_eq!(value("soci_agent_last_run_exit_code", &[("command", "install")]), 0.0);
}

/// A drifted SOCI config shows in `/metrics`; a reload moves it from TCP `port` to a unix socket.
fn drift_shows_and_a_reload_moves_metrics_to_a_unix_socket(t: &Tree, d: &mut Daemon, port: u16) {
    let edited = format!("{}# local\n", t.read(SOCI_CONFIG));
    t.write(SOCI_CONFIG, &edited, 0o644);
    d.wait("drift", WAIT, |v| check(v, "agent.drift")["verdict"] == "fail");
    let node_sock = "/run/soci-agent/metrics.sock";
    t.config(&format!("[daemon]\nmetrics_address = \"{node_sock}\"\n"));
    d.signal("HUP");
    d.wait("reloaded", WAIT, |v| v["config_generation"] == 2);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the TCP listener is gone"
    );
    let s = UnixStream::connect(t.path(node_sock)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let (code, _, body) = http_get(s, "GET", "/metrics");
    assert_eq!(code, 200);
    let samples = parse_prometheus(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    assert_eq!(
        find(&samples, "soci_agent_check_ok", &[("check", "agent.drift")])
            .unwrap()
            .value,
        0.0
    );
    assert_eq!(
        find(&samples, "soci_agent_file_drifted", &[("path", SOCI_CONFIG)])
            .unwrap()
            .value,
        1.0
    );
    assert_eq!(find(&samples, "soci_agent_config_generation", &[]).unwrap().value, 2.0);
}

#[test]
fn the_prometheus_parser_rejects_what_it_must() {
    let good = "# HELP a x\n# TYPE a counter\na_total{k=\"v\\\"\\n\"} 1\n# HELP i x\n# TYPE i info\ni_info 1\n\
                # TYPE t_seconds gauge\n# UNIT t_seconds seconds\nt_seconds 1.5\n# EOF\n";
    let samples = parse_prometheus(good).unwrap();
    assert_eq!(samples[0].labels["k"], "v\"\n");
    assert_eq!(samples.len(), 3);
    for bad in [
        "a 1\n# EOF\n",                                      // no TYPE
        "# TYPE a gauge\na 1\n",                             // no # EOF
        "# TYPE a gauge\na 1\n# EOF\nb 1\n# EOF\n",          // something after # EOF
        "# TYPE a gauge\na{k=v} 1\n# EOF\n",                 // unquoted
        "# TYPE a gauge\na 1\na 2\n# EOF\n",                 // duplicate series
        "# TYPE a counter\na 1\n# EOF\n",                    // counter sample without _total
        "# TYPE a_total counter\na_total 1\n# EOF\n",        // counter family named _total
        "# TYPE a gauge\n# UNIT a seconds\na 1\n# EOF\n",    // unit not in the name
        "# TYPE a gauge\na x\n# EOF\n",                      // not a number
        "# TYPE a gauge\n# TYPE b gauge\nb 1\na 1\n# EOF\n", // not contiguous
        "# TYPE a gauge\na{k=\"v\"}1\n# EOF\n",              // no space
        "# TYPE a gauge\na{k=\"\\x\"} 1\n# EOF\n",           // bad escape
        "# TYPE a gauge\n# TYPE a gauge\na 1\n# EOF\n",      // repeated TYPE
        "# TYPE a gauge\na 1\n# HELP a x\n# EOF\n",          // HELP after the samples
    ] {
        assert!(parse_prometheus(bad).is_err(), "accepted {bad:?}");
    }
}

/// What a Prometheus-format consumer makes of `text`: the `prometheus-parse` crate, which
/// skips lines it cannot read, so every sample line must come back as a sample.
fn parse_with_prometheus_parse(text: &str) -> prometheus_parse::Scrape {
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("prometheus-parse reads the text");
    let sample_lines = text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count();
    assert_eq!(
        scrape.samples.len(),
        sample_lines,
        "prometheus-parse skipped lines of\n{text}"
    );
    scrape
}

// ---------------------------------------------------------------------------------------------
// Live checks: the REAL containerd with a proxy plugin, the REAL SOCI serving it.

#[test]
fn live_checks_follow_the_snapshotter_and_each_change_is_logged_once() {
    use common::containerd::{Options, Soci};
    let t = Tree::installed();
    let work = tempfile::tempdir().unwrap();
    let soci_dir = work.path().join("soci");
    let soci = soci_dir.join("soci.sock");
    let opts = Options {
        soci: Some(soci.clone()),
        ..Options::default()
    };
    let containerd = Containerd::start_with(&work.path().join("containerd"), opts);
    let address = containerd.socket.clone();
    let mut snapshotter = Soci::start(&soci_dir, common::real::SOCI_VERSION, &address);
    let args = [
        "--interval",
        "0.1",
        "--containerd-socket",
        address.to_str().unwrap(),
        "--soci-socket",
        soci.to_str().unwrap(),
    ];
    let mut d = Daemon::start(&t, &args, &[]);
    let s = d.wait("live checks ok", WAIT, |v| {
        v["ready"] == true && check(v, "live.soci-socket")["verdict"] == "ok"
    });
    let reach = check(&s, "live.containerd-soci");
    assert_eq!(reach["verdict"], "ok", "{reach}");

    snapshotter.stop();
    let s = d.wait("socket down reported", WAIT, |v| {
        check(v, "live.soci-socket")["verdict"] == "fail"
    });
    assert_eq!(check(&s, "live.containerd-soci")["verdict"], "fail");
    let s = d.reconciles_after(&s, 5);
    assert_eq!(check(&s, "live.soci-socket")["verdict"], "fail");
    assert_eq!(
        d.count("check changed", Some("live.soci-socket")),
        1,
        "logged once, not every loop"
    );
    let since = check(&s, "live.soci-socket")["since"].as_f64().unwrap();
    assert!(since <= s["last_reconcile"]["at"].as_f64().unwrap());

    drop(snapshotter);
    let _snapshotter = Soci::start(&soci_dir, common::real::SOCI_VERSION, &address);
    d.wait("socket back", WAIT, |v| check(v, "live.soci-socket")["verdict"] == "ok");
    assert_eq!(d.count("check changed", Some("live.soci-socket")), 2);
    let back = d
        .events()
        .into_iter()
        .filter(|e| e["message"] == "check changed" && e["check"] == "live.soci-socket")
        .map(|e| {
            (
                e["from"].as_str().unwrap().to_string(),
                e["to"].as_str().unwrap().to_string(),
            )
        })
        .collect::<Vec<_>>();
    assert_eq!(back, [("ok".into(), "fail".into()), ("fail".into(), "ok".into())]);
}

// ---------------------------------------------------------------------------------------------
// Warm images and moved tags: containerd's CRI and a real registry.

const PINNED: &str = "io.cri-containerd.pinned=pinned";

fn image<'a>(status: &'a Value, given: &str) -> &'a Value {
    status["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["image"] == given)
        .unwrap_or_else(|| panic!("no image {given} in {status}"))
}

#[test]
fn images_are_kept_warm_and_a_moved_tag_is_pulled_pinned_and_the_old_one_unpinned() {
    let work = tempfile::tempdir().unwrap();
    let containerd = Containerd::start(&work.path().join("containerd"));
    let registry = common::registry::Registry::start_new(&work.path().join("registry"), None);
    containerd.trust_plain_http(&registry.host());
    let first = registry.push_random_image("team/app", "1", 2, 64 * 1024);
    let app = first.reference.clone();
    let t = Tree::bare();
    let prefetch = format!(
        "[prefetch]\npin = true\nretries = 1\ncri_endpoint = \"{}\"\ncontainerd_address = \"{}\"\n",
        containerd.endpoint(),
        containerd.socket.display()
    );
    t.config(&format!(
        "[daemon]\nrefresh = \"1s\"\n\n{prefetch}images = [\"{app}\"]\n"
    ));
    let mut d = Daemon::start(&t, &["--interval", "0.2"], &[]);
    let old_id = pulled_pinned_then_hits(&mut d, &containerd, &first);

    // The tag moves: the new digest is pulled and pinned before anyone asks; the old one unpinned.
    let second = registry.push_random_image("team/app", "1", 2, 64 * 1024);
    a_moved_tag_is_pulled_pinned_and_the_old_one_unpinned(&mut d, &containerd, &first, &second, &old_id);

    // New entries are pulled on reload.
    let other = registry.push_random_image("team/other", "2", 1, 32 * 1024);
    t.config(&format!(
        "[daemon]\nrefresh = \"1s\"\n\n{prefetch}images = [\"{app}\", \"{}\"]\n",
        other.reference
    ));
    d.signal("HUP");
    let s = d.wait("new image pulled", WAIT, |v| {
        v["config_generation"] == 2 && image(v, &other.reference)["pulls"] == 1
    });
    assert_eq!(image(&s, &app)["moves"], 1, "kept what it knew of the old entry");
    assert!(labels(&containerd, &other.reference).contains(PINNED));
}

/// containerd's labels of image record `r`.
fn labels(containerd: &Containerd, r: &str) -> String {
    containerd
        .image_labels(r)
        .unwrap_or_else(|| panic!("no image record {r}"))
}

/// `first` (the tag as pushed) is pulled and pinned, its digest learnt without a move, then
/// checked by digest (hits), pulled once. Returns its image id.
fn pulled_pinned_then_hits(d: &mut Daemon, containerd: &Containerd, first: &Pushed) -> String {
    let app = &first.reference;
    let s = d.wait("pulled and pinned", WAIT, |v| {
        image(v, app)["state"] == "pulled" || image(v, app)["pinned"] == true && image(v, app)["state"] == "hit"
    });
    let old_id = image(&s, app)["image_id"].as_str().unwrap().to_string();
    // The first refresh learns the digest the tag names: no move.
    let s = d.wait("tag resolved", WAIT, |v| image(v, app)["digest"].is_string());
    assert_eq!(image(&s, app)["digest"], first.manifest_digest.as_str(), "{s}");
    assert_eq!(image(&s, app)["moves"], 0);
    assert!(containerd.image_labels(app).unwrap().contains(PINNED));
    // Later checks are hits (one ImageStatus each), by digest.
    let s = d.wait("a hit", WAIT, |v| image(v, app)["state"] == "hit");
    assert_eq!(image(&s, app)["pulls"], 1, "pulled once: {s}");
    old_id
}

/// The tag moved from `first` to `second`: the move is seen, the new digest pulled and pinned,
/// the old digest and the tag's record (still the old image) unpinned.
fn a_moved_tag_is_pulled_pinned_and_the_old_one_unpinned(
    d: &mut Daemon,
    containerd: &Containerd,
    first: &Pushed,
    second: &Pushed,
    old_id: &str,
) {
    let app = &first.reference;
    assert_ne!(second.manifest_digest, first.manifest_digest);
    let s = d.wait("the move seen", WAIT, |v| image(v, app)["moves"] == 1);
    let st = image(&s, app);
    assert_eq!(st["digest"], second.manifest_digest.as_str(), "{st}");
    assert_eq!(st["previous_digest"], first.manifest_digest.as_str(), "{st}");
    assert_ne!(st["image_id"].as_str().unwrap(), old_id);
    assert_eq!(st["pinned"], true);
    let repo = app.rsplit_once(':').unwrap().0;
    let new_ref = format!("{repo}@{}", second.manifest_digest);
    let old_ref = format!("{repo}@{}", first.manifest_digest);
    let labels = |r: &str| labels(containerd, r);
    assert!(
        labels(&new_ref).contains(PINNED),
        "new digest pinned: {}",
        labels(&new_ref)
    );
    assert!(
        !labels(&old_ref).contains(PINNED),
        "old digest unpinned: {}",
        labels(&old_ref)
    );
    assert!(
        !labels(app).contains(PINNED),
        "the tag's record still names the old image: unpinned"
    );
    assert!(d.count("tag moved: new digest pulled", None) == 1, "{}", d.log());
}

// ---------------------------------------------------------------------------------------------
// A booted systemd node: the unit (Type=notify), repairs over D-Bus.

/// `soci-agent daemon --query` inside the node.
fn query_in(node: &common::nspawn::Node) -> Option<Value> {
    let out = node.exec(&["/usr/local/bin/soci-agent", "daemon", "--query"]);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// Polls the node's daemon state until `ok`.
fn wait_in(node: &common::nspawn::Node, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = query_in(node) {
            if ok(&v) {
                return v;
            }
            last = v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within 60 s\nlast status: {}\n{}",
            serde_json::to_string_pretty(&last).unwrap(),
            node.journal()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn booted_node_a_dead_snapshotter_is_started_over_dbus_only_with_repair_on() {
    let booted = boot_with_the_daemon_installed();
    let node = &booted.node;
    the_unit_is_enabled_started_and_ready(node);

    let containerd_before = booted.unit(CONTAINERD).invocation_id;
    let soci_before = booted.unit(SOCI).invocation_id;
    a_dead_snapshotter_is_started_over_dbus(&booted, &containerd_before, &soci_before);
    with_repair_off_a_dead_snapshotter_is_left_down(&booted, &containerd_before);
    restarting_the_snapshotter_restarts_containerd(&booted);
    the_unit_stops_cleanly(&booted);
}

/// A booted node with containerd 2.4.2 and the agent's release installed with `--daemon`
/// (repair on, a 300 ms interval).
fn boot_with_the_daemon_installed() -> Booted {
    let opts = NodeOptions::new()
        // systemd would revive a killed snapshotter itself (Restart=always): this test wants the daemon to.
        .file(
            "/etc/systemd/system/soci-snapshotter.service.d/60-test.conf",
            "[Service]\nRestart=no\n",
        )
        .file(
            AGENT_CONFIG,
            "[daemon]\ninterval = \"300ms\"\nrepair = true\nrepair_backoff = \"1s\"\n",
        )
        // ExecReload= runs /bin/kill (procps or util-linux on real nodes, not in debootstrap's
        // minbase): the shell's builtin stands in.
        .file_mode("/usr/bin/kill", "#!/bin/sh\nkill \"$@\"\n", 0o755);
    let booted = Booted::boot_with(
        with_containerd(opts, "2.4.2", NodeContainerdConfig::Default),
        Boot {
            agent: agent_bin().to_owned(),
            ..Boot::default()
        },
    );
    booted.install_release(&["--daemon"]).expect_code(0);
    booted
}

/// install --daemon wrote, enabled and started the unit (systemd/soci-agent.service); a
/// restart (Type=notify) returns ready, the checks ok, the status socket root's only.
fn the_unit_is_enabled_started_and_ready(node: &Node) {
    assert_eq!(
        node.check(&["systemctl", "is-enabled", "soci-agent.service"]),
        "enabled"
    );
    assert_eq!(node.check(&["systemctl", "is-active", "soci-agent.service"]), "active");
    // Type=notify: `systemctl restart` returns once READY=1 came, after the first reconcile.
    let started = Instant::now();
    node.check(&["systemctl", "restart", "soci-agent.service"]);
    eprintln!("soci-agent.service restarted (READY=1) in {:.2?}", started.elapsed());
    let s = query_in(node).expect("the status socket answers once the unit is started");
    assert!(s["ready"] == true && s["reconciles"].as_u64() >= Some(1), "{s}");
    for id in [
        "live.soci-socket",
        "live.containerd-soci",
        "systemd.soci-service",
        "agent.drift",
    ] {
        assert_eq!(check(&s, id)["verdict"], "ok", "{id}: {}", check(&s, id));
    }
    let mode = node.check(&["stat", "-c", "%a %U", "/run/soci-agent/daemon.sock"]);
    assert_eq!(mode, "600 root");
}

/// Kills the snapshotter with its socket stopped (as when both failed and systemd gave up; with
/// the socket listening, containerd's reconnect would socket-activate it).
fn kill_the_snapshotter(node: &Node) {
    node.check(&["systemctl", "stop", "soci-snapshotter.socket"]);
    node.check(&["systemctl", "kill", "--kill-whom=main", "--signal=KILL", SOCI]);
}

/// Killed with its socket stopped: reported, then started again through D-Bus, socket first;
/// containerd untouched.
fn a_dead_snapshotter_is_started_over_dbus(booted: &Booted, containerd_before: &str, soci_before: &str) {
    let node = &booted.node;
    let unit = |name: &str| booted.unit(name);
    kill_the_snapshotter(node);
    let s = wait_in(node, "snapshotter started by the daemon", |v| {
        v["repairs"]["recent"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["target"] == SOCI && e["action"] == "start" && e["result"] == "ok")
    });
    assert!(
        s["repairs"]["recent"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["target"] == "soci-snapshotter.socket"),
        "{s}"
    );
    assert!(unit("soci-snapshotter.socket").is_active());
    let soci = unit(SOCI);
    assert!(soci.is_active(), "{soci}");
    assert_ne!(soci.invocation_id, soci_before, "a new invocation");
    let containerd = unit(CONTAINERD);
    assert!(containerd.is_active(), "{containerd}");
    assert_eq!(
        containerd.invocation_id, containerd_before,
        "containerd was not restarted"
    );
    // A start can fail (systemd in nspawn sometimes has not yet removed the killed service's
    // cgroup: 219/CGROUP); the next attempt comes after the backoff, within the hourly budget.
    let starts = s["repairs"]["recent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["target"] == SOCI)
        .count();
    assert!(starts <= 3, "{s}");
    wait_in(node, "healthy again", |v| {
        check(v, "systemd.soci-service")["verdict"] == "ok"
    });
}

/// Repair off (applied by `systemctl reload`): a dead snapshotter is reported, not started.
fn with_repair_off_a_dead_snapshotter_is_left_down(booted: &Booted, containerd_before: &str) {
    let node = &booted.node;
    let unit = |name: &str| booted.unit(name);
    std::fs::write(
        node.path(AGENT_CONFIG),
        "[daemon]\ninterval = \"300ms\"\nrepair = false\n",
    )
    .unwrap();
    node.check(&["systemctl", "reload", "soci-agent.service"]);
    let s = wait_in(node, "reloaded", |v| v["config_generation"] == 2);
    let repairs = s["repairs"]["total"].clone();
    kill_the_snapshotter(node);
    let s = wait_in(node, "reported", |v| {
        check(v, "systemd.soci-service")["verdict"] == "fail"
    });
    let n = s["reconciles"].as_u64().unwrap();
    let s = wait_in(node, "more reconciles", |v| v["reconciles"].as_u64().unwrap() >= n + 5);
    assert_eq!(s["repairs"]["total"], repairs, "no repair with repair = false");
    assert!(!unit(SOCI).is_active(), "left down: {}", unit(SOCI));
    assert_eq!(unit(CONTAINERD).invocation_id, containerd_before);
}

/// Why a restart of a running snapshotter needs restart_containerd = true: systemd propagates
/// it to containerd, which Requires= it.
fn restarting_the_snapshotter_restarts_containerd(booted: &Booted) {
    let node = &booted.node;
    let unit = |name: &str| booted.unit(name);
    // (a start right after a kill can meet systemd-in-nspawn's cgroup race, 219/CGROUP: poll)
    let deadline = Instant::now() + Duration::from_secs(30);
    while !node
        .exec(&["systemctl", "start", "soci-snapshotter.socket", SOCI])
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "{SOCI} does not start:\n{}", node.journal());
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = unit(CONTAINERD).invocation_id;
    node.check(&["systemctl", "restart", SOCI]);
    // systemctl waits for its own job; containerd's propagated restart is a job of its own.
    let deadline = Instant::now() + Duration::from_secs(30);
    while unit(CONTAINERD).invocation_id == before {
        assert!(
            Instant::now() < deadline,
            "restarting {SOCI} did not restart containerd: {}",
            unit(CONTAINERD)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM (systemctl stop): a clean exit within the bound.
fn the_unit_stops_cleanly(booted: &Booted) {
    let stopping = Instant::now();
    booted.node.check(&["systemctl", "stop", "soci-agent.service"]);
    assert!(stopping.elapsed() < STOP_BOUND, "stop took {:?}", stopping.elapsed());
    let agent = booted.unit("soci-agent.service");
    assert_eq!(
        (agent.active_state.as_str(), agent.result.as_str()),
        ("inactive", "success"),
        "{agent}"
    );
}

/// 200 clients that hold connections open and dribble a byte a second (slowloris) do not keep
/// scrapes from being answered within a scraper's timeout.
#[test]
fn metrics_are_answered_while_slow_clients_hold_connections() {
    use std::io::Write;
    let t = Tree::installed();
    let port = common::registry::free_port();
    t.config(&format!("[daemon]\nmetrics_address = \"127.0.0.1:{port}\"\n"));
    let mut d = Daemon::start(&t, &["--interval", "1"], &[]);
    d.wait("ready", WAIT, |v| v["ready"] == true);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let dribblers: Vec<_> = (0..200)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // Reconnect whenever the server drops us, as an attacker would.
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
                        continue;
                    };
                    for b in b"GET /metrics HTTP/1.1\r\n" {
                        if stop.load(std::sync::atomic::Ordering::Relaxed) || s.write_all(&[*b]).is_err() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(700));
                    }
                }
            })
        })
        .collect();
    // Let the slow clients take their places first.
    std::thread::sleep(Duration::from_millis(500)); // load injection, not synchronisation
    let mut answered = 0;
    for _ in 0..4 {
        let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (code, head, body) = http_get(s, "GET", "/metrics");
        assert_eq!(code, 200, "{head}");
        parse_prometheus(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
        answered += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in dribblers {
        let _ = t.join();
    }
    assert_eq!(answered, 4);
}
