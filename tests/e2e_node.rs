//! End to end on a real systemd node with the REAL components: `soci-agent install` inside a
//! booted Debian bookworm node (`common::nspawn`) whose containerd is the rig's v2.4.2 or v2.2.9
//! build (`common::real`), installing the REAL SOCI v0.16.1 release (built by the rig, packed in
//! the upstream layout) from a loopback mirror through its normal download path.
//!
//! One node per `#[test]` (they run in parallel):
//! - [`plain_host_install_pull_noop_boot_unit_and_uninstall`]: containerd 2.4.2 enabled and
//!   running on a version-3 file that only sets the registry `config_path` (and
//!   [`plain_host_on_containerd_22_with_its_default_config`]: the same on 2.2.9 with the file
//!   `containerd config default` writes). Install (case 1), a `crictl pull` from a
//!   loopback registry landing every layer in SOCI in parallel mode, `doctor` with no failing
//!   check, the no-op second run with unchanged InvocationIDs (2), the boot unit importing a
//!   pause image into the soci snapshotter (7), uninstall (5).
//! - [`containerd_22_without_a_config_file_loads_soci`]: containerd 2.2.9 with no config file:
//!   the file the agent creates is one containerd 2.2 reads as is (`containerd config dump`).
//! - [`al2023_shaped_node_is_wired_for_nodeadm_and_nothing_starts`] (3): the AMI's real units
//!   (`soci-snapshotter.service`/`.socket`, containerd's slice drop-in), an older real SOCI
//!   (0.15.0) in `/usr/bin`, nodeadm, containerd 2.2.9 not enabled: the old SOCI is replaced
//!   by the release, drop-ins only, nothing started; then containerd's start (what nodeadm-run
//!   does) brings the snapshotter up through Requires=.
//! - [`broken_snapshotter_rolls_the_node_back`] (4): the real daemon refusing to start (its root
//!   is a file): exit 1 and the node's files byte-identical to before, containerd running unwired.
//! - [`sigkill_mid_install_then_rerun_converges`] (6): the agent killed (SIGKILL) during the
//!   download, right after start and during the systemd step; a re-run ends as case 1. Then
//!   files already wired but containerd still on its old config (a kill between writing and
//!   restarting): a plain run restarts containerd. Uninstall then disables every unit, including
//!   those an interrupted run enabled without recording them.
//!
//! States are read from the node (files, `systemctl`, `ctr`, `containerd config dump`) and from
//! its systemd over D-Bus from the host (`Systemd::unit_state`), never from log text. A failing
//! assertion shows the agent's report and logs; the node's journal is printed when the node drops
//! during the panic.
//!
//! Needs root, debootstrap, systemd-container (systemd-nspawn), nsenter, and the rig
//! (`tests/real/build.sh`: Go, gcc, zlib1g-dev).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Deref;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::archive::{oci_image_tar, sha256_hex};
use common::booted::{
    AGENT, AgentRun, BOOT, Boot, Booted, CONTAINERD, CONTAINERD_CONFIG, CONTAINERD_DROPIN, INSTALLED_AGENT,
    NODECONFIG_DROPIN, SERVICE_DROPIN, SOCI, SOCKET, STORE_DAEMON, install_argv,
};
use common::mirror::{Fault, Mirror};
use common::nspawn::{Node, NodeOptions, children};
use common::real::{self, NodeContainerdConfig, with_containerd};
use common::registry::{Pushed, Registry};
use serde_json::{Value, json};
use soci_agent::systemd::UnitState;

const VERSION: &str = real::SOCI_VERSION;

const SERVICE_PATH: &str = "/etc/systemd/system/soci-snapshotter.service";
const SOCKET_PATH: &str = "/etc/systemd/system/soci-snapshotter.socket";
const BOOT_PATH: &str = "/etc/systemd/system/soci-agent-boot.service";
const RECORD: &str = "/var/lib/soci-agent/record.json";
const SOCI_ROOT: &str = "/var/lib/soci-snapshotter-grpc";
const PAUSE_IMAGE: &str = "localhost/kubernetes/pause:latest";
/// Node directories the agent writes in (compared before and after).
const WATCHED: [&str; 3] = ["/etc", "/usr/local", "/var/lib/soci-agent"];

// ---------------------------------------------------------------------------------------------
// The node with its mirror; agent runs in the background.

/// A booted node ([`Booted`]: the agent, D-Bus, the reads) and the mirror it installs from.
struct Rig {
    // Field order = drop order: the mirror goes first, then the node (its D-Bus connection
    // and runtime before it powers off).
    mirror: Mirror,
    booted: Booted,
}

impl Deref for Rig {
    type Target = Booted;
    fn deref(&self) -> &Booted {
        &self.booted
    }
}

impl Rig {
    /// Starts a mirror serving the real SOCI release, boots a node with `opts` and copies the
    /// agent into its `/share`.
    fn boot(opts: NodeOptions) -> Rig {
        let started = Instant::now();
        let mirror = Mirror::start();
        real::soci_release(VERSION).publish(&mirror);
        let booted = Booted::boot_with(
            opts,
            Boot {
                started: Some(started),
                ..Boot::default()
            },
        );
        Rig { mirror, booted }
    }

    /// `soci-agent install` from the mirror, inside the node.
    fn install(&self) -> AgentRun {
        self.agent("install", &install_argv(&self.mirror))
    }

    /// Asserts the end state of a good install on a plain host (case 1).
    fn assert_installed_and_healthy(&self, ctx: &str) {
        assert_eq!(self.is_active(SOCI), "active", "{ctx}: systemctl is-active {SOCI}");
        assert_eq!(
            self.is_active(CONTAINERD),
            "active",
            "{ctx}: systemctl is-active containerd"
        );
        let soci = self.unit(SOCI);
        assert!(soci.is_active() && soci.sub_state == "running", "{ctx}: {SOCI}: {soci}");
        assert_eq!(soci.unit_file_state, "enabled", "{ctx}: {SOCI} is not enabled");
        assert_eq!(
            self.unit(SOCKET).unit_file_state,
            "enabled",
            "{ctx}: {SOCKET} is not enabled"
        );
        // The unit runs the verified store binary.
        let exe = self.exe(soci.main_pid);
        assert_eq!(exe, STORE_DAEMON, "{ctx}: {SOCI} runs {exe}");
        // containerd loaded the proxy plugin and reaches it.
        self.assert_soci_plugin_ok(ctx);
        self.node
            .check(&["ctr", "-n", "k8s.io", "snapshots", "--snapshotter", "soci", "ls"]);
        self.assert_containerd_reads_soci(ctx);
    }

    /// Starts an install in the background; see [`Background`].
    fn install_in_background(&self) -> Background {
        let argv = install_argv(&self.mirror);
        // Output into files, not pipes: nobody reads while it runs, and a full pipe would block it.
        let (stdout, stderr) = (tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap());
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(self.node.leader().to_string())
            .arg("-a")
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(stdout.try_clone().unwrap())
            .stderr(stderr.try_clone().unwrap());
        let nsenter = cmd.spawn().expect("spawn nsenter");
        // nsenter forks into the node's pid namespace: the agent is its child.
        let deadline = Instant::now() + Duration::from_secs(10);
        let agent_pid = loop {
            if let Some(pid) = children(nsenter.id()).into_iter().next() {
                break pid;
            }
            assert!(Instant::now() < deadline, "no agent process under nsenter after 10 s");
            std::thread::sleep(Duration::from_millis(2));
        };
        Background {
            nsenter,
            agent_pid,
            started: Instant::now(),
            output: [stdout, stderr],
        }
    }
}

/// An agent run started with [`Rig::install_in_background`].
struct Background {
    nsenter: Child,
    /// Host pid of the agent process (nsenter's child).
    agent_pid: u32,
    started: Instant,
    /// Its stdout and stderr (unnamed temp files).
    output: [fs::File; 2],
}

impl Background {
    fn running(&self) -> bool {
        // A zombie (not yet reaped by nsenter) counts as dead.
        fs::read_to_string(format!("/proc/{}/stat", self.agent_pid)).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
    }

    /// Its stdout and stderr so far.
    fn output(&self) -> String {
        let [out, err] = self.output.each_ref().map(|f| {
            let mut text = String::new();
            let mut f = f.try_clone().unwrap();
            f.seek(SeekFrom::Start(0)).unwrap();
            f.read_to_string(&mut text).unwrap();
            text
        });
        format!("stdout:\n{out}\nstderr:\n{err}")
    }

    /// SIGKILLs the agent itself and checks it died.
    fn kill(mut self, point: &str) {
        if !self.running() {
            let status = self.nsenter.wait().unwrap();
            panic!(
                "{point}: the agent ended ({status}) before the kill; output:\n{}",
                self.output()
            );
        }
        let status = Command::new("kill")
            .args(["-KILL", &self.agent_pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -KILL {}", self.agent_pid);
        let status = common::wait_for_exit(&mut self.nsenter, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{point}: nsenter still waiting 10 s after the kill"));
        assert!(
            !Path::new(&format!("/proc/{}", self.agent_pid)).exists(),
            "{point}: agent pid {} still exists after SIGKILL",
            self.agent_pid
        );
        // nsenter re-raises its child's signal: the agent died of SIGKILL, it did not exit.
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(9),
            "{point}: the agent was not killed by SIGKILL ({status}); output:\n{}",
            self.output()
        );
        eprintln!(
            "   killed the agent {:.2}s after start ({point})",
            self.started.elapsed().as_secs_f64()
        );
    }
}

/// Whether a containerd config mentions soci at all.
fn mentions_soci(config: Option<&[u8]>) -> bool {
    config.is_some_and(|c| String::from_utf8_lossy(c).contains("soci"))
}

/// Content + mode of every file, target of every link, mode of every directory under the given
/// node directories (host side of the copy), keyed by node path.
fn tree(node: &Node, dirs: &[&str]) -> BTreeMap<String, String> {
    fn walk(dir: &Path, node_dir: &str, out: &mut BTreeMap<String, String>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let path = e.path();
            let node_path = format!("{node_dir}/{}", e.file_name().to_string_lossy());
            let meta = fs::symlink_metadata(&path).unwrap();
            let mode = meta.permissions().mode() & 0o7777;
            let desc = if meta.file_type().is_symlink() {
                format!("link -> {}", fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                walk(&path, &node_path, out);
                format!("dir {mode:04o}")
            } else if meta.is_file() {
                format!("file {mode:04o} sha256 {}", sha256_hex(&fs::read(&path).unwrap()))
            } else {
                format!("special {mode:04o}")
            };
            out.insert(node_path, desc);
        }
    }
    let mut out = BTreeMap::new();
    for d in dirs {
        let host = node.path(d);
        if fs::symlink_metadata(&host).is_ok() {
            out.insert(d.to_string(), "root".into());
        }
        walk(&host, d, &mut out);
    }
    out
}

/// [`tree`] without the agent's run reports (`/var/lib/soci-agent/reports/`, kept on purpose
/// after a failed run too, for diagnosis), nor `/var/lib/soci-agent` when they are all it holds.
fn tree_without_reports(node: &Node, dirs: &[&str]) -> BTreeMap<String, String> {
    const STATE: &str = "/var/lib/soci-agent";
    let reports = format!("{STATE}/reports");
    let mut t = tree(node, dirs);
    t.retain(|p, _| *p != reports && !p.starts_with(&format!("{reports}/")));
    if !t.keys().any(|p| p.starts_with(&format!("{STATE}/"))) {
        t.remove(STATE);
    }
    t
}

/// Human listing of what differs between two [`tree`]s.
fn tree_diff(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for (k, v) in before {
        match after.get(k) {
            None => out.push_str(&format!("  - {k} ({v})\n")),
            Some(w) if w != v => out.push_str(&format!("  ~ {k}: {v} -> {w}\n")),
            _ => {}
        }
    }
    for (k, v) in after {
        if !before.contains_key(k) {
            out.push_str(&format!("  + {k} ({v})\n"));
        }
    }
    out
}

/// Node paths under `dirs` whose name carries the agent's temp marker.
fn temp_leftovers(node: &Node, dirs: &[&str]) -> Vec<String> {
    tree(node, dirs)
        .into_keys()
        .filter(|p| p.rsplit('/').next().is_some_and(|n| n.contains(".soci-agent-tmp")))
        .collect()
}

/// Enabled-unit symlinks (in `*.wants`/`*.requires` under /etc/systemd/system) named `unit`.
fn wants_links(node: &Node, unit: &str) -> Vec<String> {
    tree(node, &["/etc/systemd/system"])
        .into_iter()
        .filter(|(p, desc)| desc.starts_with("link") && p.ends_with(&format!("/{unit}")) && p.contains(".wants/"))
        .map(|(p, desc)| format!("{p} {desc}"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Cases 1, 2, 7, 5 on plain nodes: containerd 2.4.2 with a version-3 file that only sets the
// registry path, containerd 2.2.9 with its own default config.

#[test]
fn plain_host_install_pull_noop_boot_unit_and_uninstall() {
    plain_host("2.4.2", NodeContainerdConfig::RegistryOnly);
}

#[test]
fn plain_host_on_containerd_22_with_its_default_config() {
    plain_host("2.2.9", NodeContainerdConfig::Default);
}

/// Cases 1, 1b, 2, 2b, 7, 5 on a node running containerd `version` with `config`.
fn plain_host(version: &'static str, config: NodeContainerdConfig) {
    let registry_dir = tempfile::tempdir().unwrap();
    let registry = Registry::start_new(registry_dir.path(), None);
    let image = registry.push_random_image("app", "v1", 4, 1 << 20);
    let host = registry.host();
    let opts = with_containerd(NodeOptions::new(), version, config)
        .prepare(move |root: &Path| real::trust_plain_http(root, &host));
    let rig = Rig::boot(opts);
    let booted = rig.started.elapsed();
    assert_eq!(rig.is_active(CONTAINERD), "active", "containerd runs at boot");
    assert_eq!(rig.soci_plugin(), None, "no soci snapshotter before install");
    let config_before = rig.read(CONTAINERD_CONFIG);
    let containerd_before = rig.unit(CONTAINERD);

    fresh_install_on_a_plain_host(&rig, &containerd_before);
    a_cri_pull_lands_every_layer_in_soci(&rig, &image);
    let ids_before = the_second_run_is_a_noop(&rig);
    install_daemon_restarts_nothing_else(&rig, &ids_before);
    the_boot_unit_imports_the_pause_image(&rig);
    uninstall_puts_the_node_back(&rig, &config_before);
    eprintln!(
        "plain host (containerd {version}): node up in {booted:.1?}, whole test {:.1?}",
        rig.started.elapsed()
    );
}

/// 1. Fresh install.
fn fresh_install_on_a_plain_host(rig: &Rig, containerd_before: &UnitState) {
    rig.step("case 1: fresh install on a plain host");
    let run = rig.install();
    run.expect_code(0);
    assert_eq!(run.report["changed"], true, "{}", run.show());
    rig.assert_installed_and_healthy("after install");
    let restarted = run.restarted();
    assert!(
        restarted.iter().any(|u| u == CONTAINERD) && restarted.iter().any(|u| u == SOCI),
        "report.systemd.restarted should name containerd and soci: {restarted:?}\n{}",
        run.show()
    );
    assert_eq!(
        run.systemd()["health"]["loaded"],
        true,
        "report.systemd.health\n{}",
        run.show()
    );
    assert_ne!(
        rig.unit(CONTAINERD).invocation_id,
        containerd_before.invocation_id,
        "containerd was not restarted"
    );
    assert!(
        run.systemd()["enabled"]
            .as_array()
            .is_some_and(|e| e.contains(&json!(SOCI)) && e.contains(&json!(BOOT))),
        "report.systemd.enabled\n{}",
        run.show()
    );
    for path in [
        SERVICE_PATH,
        SOCKET_PATH,
        BOOT_PATH,
        CONTAINERD_DROPIN,
        "/usr/local/bin/soci-agent",
    ] {
        assert!(rig.exists(path), "{path} missing after install");
    }
}

/// 1b. A CRI pull lands every layer in SOCI, through parallel pull/unpack.
fn a_cri_pull_lands_every_layer_in_soci(rig: &Rig, image: &Pushed) {
    rig.step("case 1b: crictl pull from a loopback registry");
    rig.node.check(&["crictl", "pull", &image.reference]);
    let (committed, snapshots) = rig.soci_committed();
    assert_eq!(committed, image.layer_digests.len(), "soci snapshots:\n{snapshots}");
    // Parallel mode with discard_unpacked_layers: SOCI fetched and unpacked the layers itself;
    // their compressed blobs never entered containerd's content store.
    let content = rig.node.check(&["ctr", "-n", "k8s.io", "content", "ls", "-q"]);
    assert!(
        content.contains(&image.manifest_digest),
        "manifest not in content:\n{content}"
    );
    for layer in &image.layer_digests {
        assert!(
            !content.contains(layer.as_str()),
            "{layer} kept in containerd's content store"
        );
    }
    let journal = rig.node.check(&["journalctl", "-u", SOCI, "--no-pager", "-o", "cat"]);
    assert_eq!(
        journal.matches("preparing snapshot with parallel pull/unpack").count(),
        image.layer_digests.len(),
        "SOCI's log:\n{journal}"
    );
    // The daemon itself accepts the config the agent wrote, parallel mode on.
    let dump = rig.node.check(&[STORE_DAEMON, "config", "dump"]);
    let dump: toml_edit::DocumentMut = dump.parse().expect("SOCI dumps TOML");
    assert_eq!(
        dump["pull_modes"]["parallel_pull_unpack"]["enable"].as_bool(),
        Some(true),
        "{dump}"
    );
    rig.doctor().expect_no_failing_check("doctor");
}

/// InvocationIDs of (soci, containerd).
fn invocation_ids(rig: &Rig) -> (String, String) {
    (rig.unit(SOCI).invocation_id, rig.unit(CONTAINERD).invocation_id)
}

/// 2. The second run changes nothing and restarts nothing. Returns the
///    InvocationIDs of soci and containerd from before it.
fn the_second_run_is_a_noop(rig: &Rig) -> (String, String) {
    rig.step("case 2: second run is a no-op");
    let ids_before = invocation_ids(rig);
    let second = rig.install();
    second.expect_code(0);
    assert_eq!(second.report["changed"], false, "{}", second.show());
    let changed: Vec<&Value> = second.report["actions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["changed"] != false)
        .collect();
    assert!(changed.is_empty(), "actions changed on the second run: {changed:?}");
    assert_eq!(second.restarted(), Vec::<String>::new(), "{}", second.show());
    let ids_after = invocation_ids(rig);
    assert_eq!(
        ids_after, ids_before,
        "InvocationIDs (soci, containerd) changed on a no-op run"
    );
    rig.assert_installed_and_healthy("after the second run");
    ids_before
}

/// 2b. `install --daemon` adds and starts soci-agent.service, restarting nothing else.
fn install_daemon_restarts_nothing_else(rig: &Rig, ids_before: &(String, String)) {
    rig.step("case 2b: install --daemon starts the daemon and restarts nothing else");
    let mut argv = install_argv(&rig.mirror);
    argv.push("--daemon".into());
    let with_daemon = rig.agent("install", &argv);
    with_daemon.expect_code(0);
    assert_eq!(rig.is_active("soci-agent.service"), "active", "{}", with_daemon.show());
    let ids_daemon = invocation_ids(rig);
    assert_eq!(
        &ids_daemon, ids_before,
        "adding the daemon restarted soci or containerd"
    );
}

/// 7. The boot unit imports the node's pause image into the soci snapshotter.
fn the_boot_unit_imports_the_pause_image(rig: &Rig) {
    rig.step("case 7: soci-agent-boot.service imports /etc/eks/pause.tar");
    fs::create_dir_all(rig.node.path("/etc/eks")).unwrap();
    fs::write(rig.node.path("/etc/eks/pause.tar"), oci_image_tar(PAUSE_IMAGE)).unwrap();
    let images_before = rig.images();
    assert!(!images_before.iter().any(|l| l == PAUSE_IMAGE), "{images_before:?}");
    rig.start(BOOT);
    let boot = rig.unit(BOOT);
    assert_eq!(
        (
            boot.active_state.as_str(),
            boot.sub_state.as_str(),
            boot.result.as_str()
        ),
        ("active", "exited", "success"),
        "{BOOT}: {boot}"
    );
    rig.assert_image_in_soci(PAUSE_IMAGE);
    // SOCI holds the unpacked layer: the import went through the daemon.
    let unpacked = rig.node.check(&[
        "sh",
        "-c",
        "ls /var/lib/soci-snapshotter-grpc/snapshotter/snapshots/*/fs/pause",
    ]);
    assert!(!unpacked.is_empty());
    let boot_cli = rig.agent(
        "boot --strict",
        &[INSTALLED_AGENT, "boot", "--strict", "--output", "json"],
    );
    boot_cli.expect_code(0);
    for (name, want) in [("verify-binary", "ok"), ("pause-image", "ok")] {
        let step = boot_cli.report["steps"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == name))
            .unwrap_or_else(|| panic!("no {name} step\n{}", boot_cli.show()));
        assert_eq!(step["status"], want, "{name}\n{}", boot_cli.show());
    }
}

/// 5. Uninstall puts the node back.
fn uninstall_puts_the_node_back(rig: &Rig, config_before: &Option<Vec<u8>>) {
    rig.step("case 5: uninstall");
    let un = rig.agent("uninstall", &[AGENT, "uninstall", "--output", "json"]);
    un.expect_code(0);
    assert_eq!(
        &rig.read(CONTAINERD_CONFIG),
        config_before,
        "containerd config not byte-identical to before install"
    );
    for path in [
        SERVICE_PATH,
        SOCKET_PATH,
        BOOT_PATH,
        CONTAINERD_DROPIN,
        "/usr/local/bin/soci-agent",
        "/usr/local/bin/soci-snapshotter-grpc",
        "/etc/soci-snapshotter-grpc/config.toml",
        RECORD,
    ] {
        assert!(!rig.exists(path), "{path} left after uninstall\n{}", un.show());
    }
    for unit in [SOCI, SOCKET, BOOT] {
        assert_eq!(
            wants_links(&rig.node, unit),
            Vec::<String>::new(),
            "{unit} still enabled"
        );
        let state = rig.unit(unit);
        assert!(!state.is_active(), "{unit} still active after uninstall: {state}");
        assert_eq!(
            state.load_state, "not-found",
            "{unit} still loadable after uninstall: {state:?}"
        );
    }
    assert_eq!(rig.is_active(SOCI), "inactive");
    assert_eq!(rig.is_active(CONTAINERD), "active", "containerd runs after uninstall");
    assert_eq!(rig.soci_plugin(), None, "containerd still lists the soci snapshotter");
    let containerd = rig.unit(CONTAINERD);
    assert!(
        !containerd.drop_in_paths.iter().any(|p| p.contains("soci")),
        "containerd still has soci drop-ins loaded: {:?}",
        containerd.drop_in_paths
    );
}

// ---------------------------------------------------------------------------------------------
// containerd 2.2 with no config file.

#[test]
fn containerd_22_without_a_config_file_loads_soci() {
    let rig = Rig::boot(with_containerd(NodeOptions::new(), "2.2.9", NodeContainerdConfig::None));
    assert!(!rig.exists(CONTAINERD_CONFIG));
    rig.step("install on containerd 2.2.9 with no config file");
    let run = rig.install();
    run.expect_code(0);
    let config = rig.read_text(CONTAINERD_CONFIG);
    assert!(
        config.starts_with("version = 3") || config.contains("\nversion = 3"),
        "{config}"
    );
    rig.assert_installed_and_healthy("containerd 2.2.9, no config file before");
    let un = rig.agent("uninstall", &[AGENT, "uninstall", "--output", "json"]);
    un.expect_code(0);
    assert!(
        !rig.exists(CONTAINERD_CONFIG),
        "the created config is removed again\n{}",
        un.show()
    );
    assert_eq!(rig.soci_plugin(), None);
    eprintln!("containerd 2.2.9 without config: {:.1?}", rig.started.elapsed());
}

// ---------------------------------------------------------------------------------------------
// Case 3: an AL2023-shaped node.

#[test]
fn al2023_shaped_node_is_wired_for_nodeadm_and_nothing_starts() {
    let rig = Rig::boot(al2023_shaped_node());
    let booted = rig.started.elapsed();
    assert_eq!(
        rig.is_active(CONTAINERD),
        "inactive",
        "containerd is not started at boot here"
    );
    assert_eq!(rig.is_active(SOCKET), "active", "the AMI's socket listens from boot");
    assert_eq!(rig.is_active(SOCI), "inactive");
    let config_before = rig.read(CONTAINERD_CONFIG);
    let ami_unit_before = rig.read(SERVICE_PATH);

    let run = install_wires_the_node_for_nodeadm(&rig, &config_before, &ami_unit_before);
    the_nodeconfig_dropin_selects_soci(&rig);
    enabled_and_reloaded_nothing_started(&rig, &run);
    containerd_s_start_brings_the_snapshotter_up(&rig);
    eprintln!(
        "AL2023-shaped: node up in {booted:.1?}, whole test {:.1?}",
        rig.started.elapsed()
    );
}

/// The AMI's real units, an older real SOCI in /usr/bin, a nodeadm stub, containerd 2.2.9 not
/// enabled, the AMI's socket enabled.
fn al2023_shaped_node() -> NodeOptions {
    let ami = real::ami_runtime().join("rootfs/etc/systemd/system");
    let ami_file = |name: &str| fs::read(ami.join(name)).unwrap_or_else(|e| panic!("AMI {name}: {e}"));
    let old = real::soci_daemon(real::SOCI_OLD_VERSION);
    with_containerd(NodeOptions::new().al2023_like(), "2.2.9", NodeContainerdConfig::None)
        .file(SERVICE_PATH, ami_file("soci-snapshotter.service"))
        .file(SOCKET_PATH, ami_file("soci-snapshotter.socket"))
        .file("/etc/systemd/system/runtime.slice", ami_file("runtime.slice"))
        .file(
            "/etc/systemd/system/containerd.service.d/00-runtime-slice.conf",
            ami_file("containerd.service.d/00-runtime-slice.conf"),
        )
        .file_mode("/usr/bin/soci-snapshotter-grpc", fs::read(&old).unwrap(), 0o755)
        .file_mode("/usr/bin/soci", fs::read(old.with_file_name("soci")).unwrap(), 0o755)
        .file_mode("/usr/bin/nodeadm", "#!/bin/sh\necho \"nodeadm stub $*\" >&2\n", 0o755)
        .file("/etc/eks/containerd-version.txt", "2.2.9\n")
        .prepare(|root: &Path| {
            fs::create_dir_all(root.join("etc/eks/nodeadm.d")).unwrap();
            let wants = root.join("etc/systemd/system/sockets.target.wants");
            fs::create_dir_all(&wants).unwrap();
            std::os::unix::fs::symlink(SOCKET_PATH, wants.join(SOCKET)).unwrap();
        })
}

fn install_wires_the_node_for_nodeadm(
    rig: &Rig,
    config_before: &Option<Vec<u8>>,
    ami_unit_before: &Option<Vec<u8>>,
) -> AgentRun {
    rig.step("case 3: install on an AL2023-shaped node");
    let run = rig.install();
    run.expect_code(0);
    assert_eq!(run.report["plan"]["wiring"], "nodeadm", "{}", run.show());
    // The AMI's SOCI 0.15.0 predates fixes the agent needs: replaced by the verified release.
    assert_eq!(run.report["plan"]["soci"]["origin"], "release", "{}", run.show());
    for path in [SERVICE_DROPIN, CONTAINERD_DROPIN, NODECONFIG_DROPIN] {
        assert!(rig.exists(path), "{path} missing\n{}", run.show());
    }
    assert_eq!(
        &rig.read(SERVICE_PATH),
        ami_unit_before,
        "the AMI's unit must be kept as is"
    );
    assert!(!rig.exists(BOOT_PATH) || rig.unit(BOOT).unit_file_state != "enabled");
    assert_eq!(
        &rig.read(CONTAINERD_CONFIG),
        config_before,
        "nodeadm owns containerd's config"
    );
    run
}

/// Version-3 table names for containerd 2.2 in the NodeConfig drop-in.
fn the_nodeconfig_dropin_selects_soci(rig: &Rig) {
    let yaml: serde_yaml_ng::Value =
        serde_yaml_ng::from_slice(&rig.read(NODECONFIG_DROPIN).unwrap()).expect("NodeConfig drop-in is YAML");
    let fragment = yaml["spec"]["containerd"]["config"]
        .as_str()
        .unwrap_or_else(|| panic!("no spec.containerd.config in {yaml:?}"));
    let doc: toml_edit::DocumentMut = fragment.parse().expect("containerd fragment is TOML");
    assert_eq!(
        doc["plugins"]["io.containerd.cri.v1.images"]["snapshotter"].as_str(),
        Some("soci"),
        "{fragment}"
    );
}

/// Enabled and reloaded, nothing started.
fn enabled_and_reloaded_nothing_started(rig: &Rig, run: &AgentRun) {
    assert!(
        run.steps().iter().any(|s| s.contains("nodeadm")),
        "report.systemd.steps should say nodeadm: {:?}",
        run.steps()
    );
    assert_eq!(run.restarted(), Vec::<String>::new(), "{}", run.show());
    assert_eq!(
        rig.is_active(CONTAINERD),
        "inactive",
        "containerd must not be started\n{}",
        run.show()
    );
    assert_eq!(
        rig.is_active(SOCI),
        "inactive",
        "the snapshotter must not be started\n{}",
        run.show()
    );
    let soci = rig.unit(SOCI);
    assert_eq!(soci.unit_file_state, "enabled", "{SOCI}: {soci:?}");
    assert!(
        soci.drop_in_paths.iter().any(|p| p == SERVICE_DROPIN),
        "drop-in not loaded: {soci:?}"
    );
    assert!(!soci.need_daemon_reload, "{SOCI} needs a daemon-reload");
    assert_eq!(rig.unit(SOCKET).unit_file_state, "enabled");
    assert!(rig.unit(SOCKET).is_active());
    let containerd = rig.unit(CONTAINERD);
    assert!(
        containerd.drop_in_paths.iter().any(|p| p == CONTAINERD_DROPIN) && !containerd.need_daemon_reload,
        "containerd drop-in not loaded: {containerd:?}"
    );
}

/// What nodeadm-run does next: start containerd. Its Requires= brings up the snapshotter,
/// running the binary from the agent's drop-in, with its listener from the AMI's socket.
fn containerd_s_start_brings_the_snapshotter_up(rig: &Rig) {
    rig.step("case 3: containerd's start (as nodeadm-run) brings the snapshotter up");
    rig.start(CONTAINERD);
    let soci = rig.unit(SOCI);
    assert!(soci.is_active(), "{SOCI} not started by containerd's Requires=: {soci}");
    let exe = rig.exe(soci.main_pid);
    assert_eq!(exe, STORE_DAEMON, "the drop-in's ExecStart is not in effect");
}

// ---------------------------------------------------------------------------------------------
// Case 4: a snapshotter that cannot start.

#[test]
fn broken_snapshotter_rolls_the_node_back() {
    // The real daemon cannot create its root (a file is in the way) and exits at start.
    let opts = with_containerd(NodeOptions::new(), "2.4.2", NodeContainerdConfig::Default)
        .file(SOCI_ROOT, "not a directory\n");
    let rig = Rig::boot(opts);
    let booted = rig.started.elapsed();
    assert_eq!(rig.is_active(CONTAINERD), "active");
    let before = tree_without_reports(&rig.node, &WATCHED);
    let config_before = rig.read(CONTAINERD_CONFIG);

    let run = install_fails_naming_the_start(&rig);
    the_files_are_as_before(&rig, &run, &before, &config_before);
    the_snapshotter_is_down_and_containerd_unwired(&rig, &run);
    // Still down a while later: nothing (auto-restart, socket) brings the broken unit back.
    assert_ne!(rig.is_active(SOCI), "active");
    eprintln!(
        "broken snapshotter: node up in {booted:.1?}, whole test {:.1?}",
        rig.started.elapsed()
    );
}

fn install_fails_naming_the_start(rig: &Rig) -> AgentRun {
    rig.step("case 4: install with a snapshotter that cannot start");
    let run = rig.install();
    run.expect_code(1);
    let error = run.report["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(SOCI) && error.contains("start"),
        "the error should name the failing step (starting {SOCI}): {error:?}\n{}",
        run.show()
    );
    assert_eq!(run.report["exit_code"], 1);
    run
}

fn the_files_are_as_before(
    rig: &Rig,
    run: &AgentRun,
    before: &BTreeMap<String, String>,
    config_before: &Option<Vec<u8>>,
) {
    let after = tree_without_reports(&rig.node, &WATCHED);
    assert!(
        *before == after,
        "files differ after the rollback:\n{}\n{}",
        tree_diff(before, &after),
        run.show()
    );
    assert_eq!(&rig.read(CONTAINERD_CONFIG), config_before);
}

fn the_snapshotter_is_down_and_containerd_unwired(rig: &Rig, run: &AgentRun) {
    let soci = rig.unit(SOCI);
    assert!(
        !soci.is_active() && soci.active_state != "activating",
        "{SOCI} after the rollback: {soci}\n{}",
        run.show()
    );
    assert_ne!(rig.is_active(SOCI), "active");
    assert_eq!(
        rig.is_active(CONTAINERD),
        "active",
        "containerd must run again after the rollback\n{}",
        run.show()
    );
    let containerd = rig.unit(CONTAINERD);
    assert!(
        !containerd.drop_in_paths.iter().any(|p| p.contains("soci")),
        "containerd still has the soci drop-in loaded: {:?}",
        containerd.drop_in_paths
    );
    assert_eq!(rig.soci_plugin(), None, "containerd is still wired to soci");
    assert!(!mentions_soci(rig.read(CONTAINERD_CONFIG).as_deref()));
    for unit in [SOCI, SOCKET, BOOT] {
        assert_eq!(
            wants_links(&rig.node, unit),
            Vec::<String>::new(),
            "{unit} left enabled"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Case 6: SIGKILL mid-install, then a re-run converges.

/// Test-only drop-in that slows the snapshotter's start (a window to kill the agent in).
const SLOW_START_DROPIN: &str = "/etc/systemd/system/soci-snapshotter.service.d/05-e2e-slow-start.conf";

#[test]
fn sigkill_mid_install_then_rerun_converges() {
    let opts = with_containerd(NodeOptions::new(), "2.4.2", NodeContainerdConfig::Default)
        .file(SLOW_START_DROPIN, "[Service]\nExecStartPre=/bin/sleep 3\n");
    let rig = Rig::boot(opts);
    let booted = rig.started.elapsed();
    let archive_path = format!("/v{VERSION}/{}", real::soci_release(VERSION).archive_name);
    let config_before = rig.read(CONTAINERD_CONFIG);

    sigkill_during_the_download(&rig, &archive_path);
    sigkill_right_after_start(&rig);
    sigkill_during_the_systemd_step(&rig);
    the_rerun_converges(&rig);
    files_wired_but_containerd_not_restarted_yet(&rig, &config_before);
    uninstall_after_the_interrupted_runs(&rig, &config_before);
    eprintln!(
        "SIGKILL: node up in {booted:.1?}, whole test {:.1?}",
        rig.started.elapsed()
    );
}

/// a. During the download: the mirror holds the first byte back; kill once the request is in.
fn sigkill_during_the_download(rig: &Rig, archive_path: &str) {
    rig.step("case 6a: SIGKILL during the download");
    rig.mirror
        .fault(archive_path, Fault::SlowFirstByte(Duration::from_secs(20)));
    let requests = rig.mirror.requests(archive_path);
    let bg = rig.install_in_background();
    let deadline = Instant::now() + Duration::from_secs(60);
    while rig.mirror.requests(archive_path) == requests {
        assert!(bg.running(), "the agent ended before downloading");
        assert!(Instant::now() < deadline, "no archive request within 60 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    bg.kill("during the download");
}

/// b. Right after start.
fn sigkill_right_after_start(rig: &Rig) {
    rig.step("case 6b: SIGKILL right after start");
    let bg = rig.install_in_background();
    std::thread::sleep(Duration::from_millis(150)); // injection delay, not synchronisation
    bg.kill("right after start");
}

/// c. During the systemd step: once the agent has enabled the snapshotter unit.
/// A test drop-in (ExecStartPre=sleep) holds the snapshotter's start job open; the agent is
/// killed while it waits for that job, with containerd stopped by the restart it propagates.
fn sigkill_during_the_systemd_step(rig: &Rig) {
    rig.step("case 6c: SIGKILL during the systemd step");
    let bg = rig.install_in_background();
    let deadline = Instant::now() + Duration::from_secs(120);
    while rig.unit(SOCI).active_state != "activating" {
        assert!(bg.running(), "the agent ended before starting {SOCI}");
        assert!(Instant::now() < deadline, "{SOCI} not activating within 120 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    bg.kill("during the systemd step");
    let soci = rig.unit(SOCI);
    assert_eq!(
        soci.active_state, "activating",
        "the kill did not land during the start job: {soci}"
    );
    fs::remove_file(rig.node.path(SLOW_START_DROPIN)).unwrap();
    fs::remove_dir(rig.node.path(SLOW_START_DROPIN).parent().unwrap()).unwrap();
}

/// The re-run converges to the state of a clean install.
fn the_rerun_converges(rig: &Rig) {
    rig.step("case 6: re-run after the kills");
    let run = rig.install();
    run.expect_code(0);
    rig.assert_installed_and_healthy("re-run after SIGKILLs");
    let leftovers = temp_leftovers(&rig.node, &WATCHED);
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    // And it stays converged: one more run is a no-op.
    let again = rig.install();
    again.expect_code(0);
    assert_eq!(again.report["changed"], false, "{}", again.show());
    assert_eq!(again.restarted(), Vec::<String>::new(), "{}", again.show());
}

/// d. The files already wired but containerd still running its old config, as after a run
/// killed between writing the files and restarting containerd (or `install --no-start` on a
/// running node): the plan sees no change, yet containerd must be restarted.
fn files_wired_but_containerd_not_restarted_yet(rig: &Rig, config_before: &Option<Vec<u8>>) {
    rig.step("case 6d: files wired, containerd not restarted yet");
    fs::write(rig.node.path(CONTAINERD_CONFIG), config_before.as_deref().unwrap()).unwrap();
    rig.restart(CONTAINERD);
    assert_eq!(rig.soci_plugin(), None, "containerd restarted with its original config");
    let mut argv = install_argv(&rig.mirror);
    argv.push("--no-start".into());
    rig.agent("install --no-start", &argv).expect_code(0);
    let containerd_before = rig.unit(CONTAINERD);
    let run = rig.install();
    run.expect_code(0);
    assert_ne!(
        rig.unit(CONTAINERD).invocation_id,
        containerd_before.invocation_id,
        "containerd runs a config without soci but was not restarted\n{}",
        run.show()
    );
    rig.assert_installed_and_healthy("after files wired without a containerd restart");
}

/// Uninstall undoes what the interrupted runs did too (units enabled by a run killed before
/// it could record them included).
fn uninstall_after_the_interrupted_runs(rig: &Rig, config_before: &Option<Vec<u8>>) {
    rig.step("case 6: uninstall after the interrupted runs");
    let un = rig.agent("uninstall", &[AGENT, "uninstall", "--output", "json"]);
    un.expect_code(0);
    assert_eq!(
        &rig.read(CONTAINERD_CONFIG),
        config_before,
        "containerd config after uninstall"
    );
    for unit in [SOCI, SOCKET, BOOT] {
        assert_eq!(
            wants_links(&rig.node, unit),
            Vec::<String>::new(),
            "{unit} left enabled after uninstall\n{}",
            un.show()
        );
        assert_eq!(rig.unit(unit).load_state, "not-found", "{unit} after uninstall");
    }
    assert_eq!(rig.is_active(CONTAINERD), "active");
    assert_eq!(rig.soci_plugin(), None);
}
