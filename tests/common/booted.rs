//! A booted systemd node ([`nspawn::Node`](super::nspawn::Node)) ready for the agent: the agent
//! binary copied into its `/share`, a D-Bus connection to its systemd from the host, and the
//! reads the end-to-end tests make of it (unit states over D-Bus, `systemctl is-active`, node
//! files, `ctr`, `containerd config dump`).
//!
//! - [`Booted::boot`] / [`Booted::boot_with`] boot the node; [`Booted::step`] prints a step with
//!   the time since the test's start.
//! - [`Booted::agent`] runs an agent command inside the node and parses its JSON report into an
//!   [`AgentRun`] (whose [`AgentRun::show`] is the assertion message: report and logs);
//!   [`Booted::doctor`] and [`Booted::install_release`] are the common agent runs.
//! - Dropping a `Booted` closes the D-Bus connection and its runtime, then powers the node off.
//!
//! Test files that need more around the node (a mirror, AWS stand-ins) wrap a `Booted` in their
//! own rig and `Deref` to it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use soci_agent::systemd::{Systemd, UnitState};

use super::mirror::Mirror;
use super::nspawn::{Node, NodeOptions, text};
use super::real;

/// The agent binary, as copied into the node's `/share`.
pub const AGENT: &str = "/share/soci-agent";
/// The agent as `install` puts it on the node.
pub const INSTALLED_AGENT: &str = "/usr/local/bin/soci-agent";
/// Bound of one agent run inside the node (its own waits are 90 s per job, 60 s health).
pub const RUN_BOUND: Duration = Duration::from_secs(240);
/// Default bound of a D-Bus call from the host.
pub const DBUS_BOUND: Duration = Duration::from_secs(30);

pub const SOCI: &str = "soci-snapshotter.service";
pub const SOCKET: &str = "soci-snapshotter.socket";
pub const CONTAINERD: &str = "containerd.service";
pub const BOOT: &str = "soci-agent-boot.service";
pub const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
pub const SERVICE_DROPIN: &str = "/etc/systemd/system/soci-snapshotter.service.d/50-soci-agent.conf";
pub const CONTAINERD_DROPIN: &str = "/etc/systemd/system/containerd.service.d/10-soci-snapshotter.conf";
pub const NODECONFIG_DROPIN: &str = "/etc/eks/nodeadm.d/50-soci-agent.yaml";
/// The daemon of the release [`real::SOCI_VERSION`] in the agent's store.
pub const STORE_DAEMON: &str = "/usr/local/lib/soci-agent/releases/0.16.1-amd64/soci-snapshotter-grpc";
pub const SOCI_SOCKET: &str = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock";

/// How [`Booted::boot_with`] sets the node up beyond its [`NodeOptions`].
pub struct Boot {
    /// The agent binary copied into `/share` (default: the one cargo built for this test).
    pub agent: PathBuf,
    /// Bound of every D-Bus call from the host.
    pub dbus_bound: Duration,
    /// Origin of [`Booted::step`]'s clock (default: when the boot starts), e.g. before servers
    /// the node needs were started.
    pub started: Option<Instant>,
}

impl Default for Boot {
    fn default() -> Self {
        Boot {
            agent: PathBuf::from(env!("CARGO_BIN_EXE_soci-agent")),
            dbus_bound: DBUS_BOUND,
            started: None,
        }
    }
}

/// A booted node, the agent in its `/share`, and a D-Bus connection to its systemd from the host.
pub struct Booted {
    // Field order = drop order: the bus connection and runtime go before the node powers off.
    pub sd: Systemd,
    pub rt: tokio::runtime::Runtime,
    pub node: Node,
    pub started: Instant,
}

impl Booted {
    /// Stops containerd, the snapshotter (its socket too, which would start it again) and the
    /// data-volume unit: the daemons' databases closed, the volume unmounted.
    pub fn stop_the_stack(&self) {
        self.node.check(&[
            "systemctl",
            "stop",
            "containerd.service",
            "soci-snapshotter.socket",
            "soci-snapshotter.service",
            "soci-agent-volume.service",
        ]);
    }

    /// Boots a node with `opts` and the defaults of [`Boot`].
    pub fn boot(opts: NodeOptions) -> Booted {
        Booted::boot_with(opts, Boot::default())
    }

    /// Boots a node with `opts`, copies the agent into its `/share` and connects to its systemd.
    pub fn boot_with(opts: NodeOptions, boot: Boot) -> Booted {
        let started = boot.started.unwrap_or_else(Instant::now);
        let node = Node::boot(opts);
        let agent = node.share().join("soci-agent");
        fs::copy(&boot.agent, &agent).expect("copy the agent into the node's /share");
        fs::set_permissions(&agent, fs::Permissions::from_mode(0o755)).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let sd = rt
            .block_on(Systemd::connect_address(&node.bus_address(), boot.dbus_bound))
            .expect("connect to the node's systemd from the host");
        Booted { sd, rt, node, started }
    }

    /// Prints a step of the test, with the time since its start.
    pub fn step(&self, name: &str) {
        eprintln!("-- [{:6.1}s] {name}", self.started.elapsed().as_secs_f64());
    }

    // -----------------------------------------------------------------------------------------
    // Agent runs.

    /// Runs `argv` (an agent command with `--output json`) inside the node, bounded by
    /// [`RUN_BOUND`]; the report is its stdout as JSON (`{"unparsed_stdout": …}` otherwise).
    pub fn agent<S: AsRef<str>>(&self, what: &str, argv: &[S]) -> AgentRun {
        let argv: Vec<&str> = argv.iter().map(AsRef::as_ref).collect();
        let started = Instant::now();
        let out = self.node.exec_timeout(&argv, RUN_BOUND);
        let report =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|_| json!({ "unparsed_stdout": text(&out.stdout) }));
        let steps = report["systemd"]["steps"]
            .as_array()
            .map(|s| {
                format!(
                    "; systemd: {}",
                    s.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" | ")
                )
            })
            .unwrap_or_default();
        eprintln!(
            "   {what}: {} in {:.1}s{steps}",
            out.status,
            started.elapsed().as_secs_f64()
        );
        AgentRun {
            what: what.to_owned(),
            out,
            report,
        }
    }

    /// `soci-agent doctor --output json` of the installed agent (root `/`, the node's bus, live
    /// checks).
    pub fn doctor(&self) -> AgentRun {
        self.agent(
            "doctor",
            &[INSTALLED_AGENT, "doctor", "--output", "json", "--log-level", "warn"],
        )
    }

    /// `soci-agent install <extra> --archive <the real SOCI release>` from `/share` (the release
    /// [`real::SOCI_VERSION`] is put there first).
    pub fn install_release(&self, extra: &[&str]) -> AgentRun {
        let archive = format!("/share/{}", real::release_into(&self.node.share(), real::SOCI_VERSION));
        let mut argv = vec![AGENT, "install"];
        argv.extend_from_slice(extra);
        argv.extend(["--archive", &archive, "--log-level", "warn"]);
        self.agent("install", &argv)
    }

    // -----------------------------------------------------------------------------------------
    // Units.

    /// The unit's state from the node's systemd, over D-Bus.
    pub fn unit(&self, name: &str) -> UnitState {
        self.rt
            .block_on(self.sd.unit_state(name))
            .unwrap_or_else(|e| panic!("unit_state({name}) over D-Bus: {e}"))
    }

    /// `systemctl is-active UNIT` inside the node (its stdout, trimmed).
    pub fn is_active(&self, unit: &str) -> String {
        text(&self.node.exec(&["systemctl", "is-active", unit]).stdout)
            .trim()
            .to_owned()
    }

    /// Starts `unit` over D-Bus (waits for its job); panics when that fails.
    pub fn start(&self, unit: &str) {
        self.rt
            .block_on(self.sd.start(unit))
            .unwrap_or_else(|e| panic!("start {unit}: {e}"));
    }

    /// Restarts `unit` over D-Bus (waits for its job); panics when that fails.
    pub fn restart(&self, unit: &str) {
        self.rt
            .block_on(self.sd.restart(unit))
            .unwrap_or_else(|e| panic!("restart {unit}: {e}"));
    }

    // -----------------------------------------------------------------------------------------
    // Files and processes.

    /// Node file bytes (host side of the copy; not for `/run`); `None` when absent.
    pub fn read(&self, node_path: &str) -> Option<Vec<u8>> {
        fs::read(self.node.path(node_path)).ok()
    }

    /// A node file as text; panics when it is absent.
    pub fn read_text(&self, node_path: &str) -> String {
        String::from_utf8(
            self.read(node_path)
                .unwrap_or_else(|| panic!("{node_path} missing in the node")),
        )
        .unwrap()
    }

    /// A file under the node's `/run` (a tmpfs inside the node), read from inside.
    pub fn read_run(&self, node_path: &str) -> Option<String> {
        let out = self.node.exec(&["cat", node_path]);
        out.status.success().then(|| text(&out.stdout))
    }

    /// Whether `node_path` exists (a dangling link counts).
    pub fn exists(&self, node_path: &str) -> bool {
        fs::symlink_metadata(self.node.path(node_path)).is_ok()
    }

    /// The executable a node process runs (`readlink /proc/PID/exe`).
    pub fn exe(&self, pid: u32) -> String {
        self.node.check(&["readlink", &format!("/proc/{pid}/exe")])
    }

    /// A node process's command line (NUL-separated in /proc), as arguments.
    pub fn cmdline(&self, pid: u32) -> Vec<String> {
        let out = self.node.check(&["cat", &format!("/proc/{pid}/cmdline")]);
        out.split('\0').filter(|s| !s.is_empty()).map(str::to_owned).collect()
    }

    // -----------------------------------------------------------------------------------------
    // containerd and the soci snapshotter.

    /// The `ctr plugins ls` line of the `soci` snapshotter, if containerd lists one.
    pub fn soci_plugin(&self) -> Option<String> {
        let plugins = self.node.check(&["ctr", "plugins", "ls"]);
        plugins
            .lines()
            .find(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.first() == Some(&"io.containerd.snapshotter.v1") && f.get(1) == Some(&"soci")
            })
            .map(str::to_owned)
    }

    /// Asserts containerd lists the `soci` snapshotter with status `ok`.
    pub fn assert_soci_plugin_ok(&self, ctx: &str) {
        let line = self.soci_plugin();
        assert!(
            line.as_deref()
                .is_some_and(|l| l.split_whitespace().last() == Some("ok")),
            "{ctx}: ctr plugins ls: soci snapshotter not ok: {line:?}"
        );
    }

    /// Committed snapshots in the soci snapshotter (namespace k8s.io), and the listing.
    pub fn soci_committed(&self) -> (usize, String) {
        let list = self
            .node
            .check(&["ctr", "-n", "k8s.io", "snapshots", "--snapshotter", "soci", "ls"]);
        let n = list
            .lines()
            .skip(1)
            .filter(|l| l.split_whitespace().last() == Some("Committed"))
            .count();
        (n, list)
    }

    /// Image names in containerd's `k8s.io` namespace (`ctr images ls -q`).
    pub fn images(&self) -> Vec<String> {
        self.node
            .check(&["ctr", "-n", "k8s.io", "images", "ls", "-q"])
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Asserts `image` is an image in containerd's `k8s.io` namespace, unpacked in the soci
    /// snapshotter (committed snapshots there); returns how many snapshots soci holds.
    pub fn assert_image_in_soci(&self, image: &str) -> usize {
        let images = self.images();
        assert!(images.iter().any(|l| l == image), "{image} not imported: {images:?}");
        let (committed, list) = self.soci_committed();
        assert!(
            committed >= 1,
            "{image}: no committed snapshot in the soci snapshotter:\n{list}"
        );
        committed
    }

    /// `containerd config dump` inside the node (what containerd makes of its config file,
    /// after its own migration) wires `soci` as proxy snapshotter and CRI snapshotter. Returns
    /// the dump (parsed, and as text) for further checks.
    pub fn assert_containerd_reads_soci(&self, ctx: &str) -> (toml_edit::DocumentMut, String) {
        let dump = self.node.check(&["containerd", "config", "dump"]);
        let doc: toml_edit::DocumentMut = dump
            .parse()
            .unwrap_or_else(|e| panic!("{ctx}: config dump does not parse: {e}\n{dump}"));
        let soci = &doc["proxy_plugins"]["soci"];
        let images = &doc["plugins"]["io.containerd.cri.v1.images"];
        for (what, got, want) in [
            ("proxy_plugins.soci.type", soci["type"].as_str(), "snapshot"),
            ("proxy_plugins.soci.address", soci["address"].as_str(), SOCI_SOCKET),
            ("CRI snapshotter", images["snapshotter"].as_str(), "soci"),
        ] {
            assert_eq!(got, Some(want), "{ctx}: {what}\n{dump}");
        }
        assert_eq!(
            images["disable_snapshot_annotations"].as_bool(),
            Some(false),
            "{ctx}: disable_snapshot_annotations\n{dump}"
        );
        (doc, dump)
    }
}

/// `soci-agent install --release-url <mirror> --soci-version <real release> --output json`, as
/// run inside a node.
pub fn install_argv(mirror: &Mirror) -> Vec<String> {
    [
        AGENT,
        "install",
        "--release-url",
        &mirror.base_url(),
        "--soci-version",
        real::SOCI_VERSION,
        "--output",
        "json",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// One agent run inside the node: its output and its report (stdout as JSON).
pub struct AgentRun {
    pub what: String,
    pub out: Output,
    pub report: Value,
}

impl AgentRun {
    pub fn code(&self) -> Option<i32> {
        self.out.status.code()
    }

    /// The report and stderr (the agent's logs), for assertion messages.
    pub fn show(&self) -> String {
        format!(
            "---- {} ({}) report ----\n{}\n---- stderr (agent logs) ----\n{}",
            self.what,
            self.out.status,
            serde_json::to_string_pretty(&self.report).unwrap_or_else(|_| text(&self.out.stdout)),
            text(&self.out.stderr)
        )
    }

    pub fn expect_code(&self, want: i32) -> &Self {
        assert_eq!(self.code(), Some(want), "{}: exit code\n{}", self.what, self.show());
        self
    }

    // install reports

    /// The report's `systemd` step.
    pub fn systemd(&self) -> &Value {
        &self.report["systemd"]
    }

    /// Units the systemd step (re)started.
    pub fn restarted(&self) -> Vec<String> {
        self.systemd()["restarted"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| p[0].as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    }

    /// What the systemd step did, in order.
    pub fn steps(&self) -> Vec<String> {
        self.systemd()["steps"]
            .as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    }

    // doctor reports

    /// doctor: the verdict of check `id`.
    pub fn verdict(&self, id: &str) -> String {
        self.report["checks"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["id"] == id))
            .and_then(|c| c["verdict"].as_str())
            .unwrap_or_else(|| panic!("doctor has no check {id}\n{}", self.show()))
            .to_owned()
    }

    /// doctor: asserts no check fails and the exit code is 0.
    pub fn expect_no_failing_check(&self, ctx: &str) -> &Self {
        let failing = self.failing();
        assert!(
            failing.is_empty(),
            "{ctx}: failing checks {failing:#?}\n{}",
            self.show()
        );
        self.expect_code(0)
    }

    /// doctor: the checks with verdict `fail`.
    pub fn failing(&self) -> Vec<&Value> {
        self.report["checks"]
            .as_array()
            .map(|c| c.iter().filter(|c| c["verdict"] == "fail").collect())
            .unwrap_or_default()
    }
}
