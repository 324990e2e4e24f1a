//! A real systemd test node: Debian bookworm booted with `systemd-nspawn`.
//!
//! - [`rootfs_cache`] builds the node's root filesystem once per machine with `debootstrap`
//!   (~40 s, ~400 MB) under `$XDG_CACHE_HOME/soci-agent-test/rootfs-bookworm` (or
//!   `/var/tmp/soci-agent-test/...`). The build runs under a file lock in a temporary directory
//!   that is renamed into place once complete, so parallel tests and test binaries build it once.
//! - [`Node::boot`] copies that tree (`cp -a --reflink=auto`, under a second), applies
//!   [`NodeOptions`] (files to write, paths to remove, read-only binds, a closure), boots it with
//!   `systemd-nspawn -b` in the background and waits until `systemctl is-system-running` says
//!   `running` or `degraded`. Each node has its own machine name and directory, so several may
//!   run at once. The node shares the host's network namespace (a server on the host's
//!   127.0.0.1 is reachable from inside).
//! - Inside the node: [`Node::exec`] / [`Node::sh`] / [`Node::check`] (`nsenter -t <leader> -a`).
//!   Files: [`Node::path`] maps a node path to the host path in the copy; [`Node::share`] is the
//!   host side of the node's `/share`.
//! - The node's system bus is reachable from the host: a host directory is bound onto the node's
//!   `/run/dbus`, so the node's `system_bus_socket` appears at [`Node::bus_socket`]; pass
//!   [`Node::bus_address`] to `Systemd::connect_address`. (The rootfs path itself does not work:
//!   nspawn mounts its own tmpfs on `/run`.) Host root is root in the node (no user namespace).
//! - Dropping the node powers it off (bounded; SIGTERM, then SIGKILL as fallbacks) and deletes
//!   the copy. When the drop happens during a panic (a failing test), the console log and the
//!   last 200 journal lines are printed first; [`Node::journal`] gives them on demand.
//!
//! Own the `Node` in the test function (one `#[test]` with sub-steps per node): a `Node` in a
//! `static` is never dropped, so its container would outlive the test binary.
//!
//! Requires root, `debootstrap` and `systemd-container` (`systemd-nspawn`), and `nsenter`.

use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

/// Debian release of the node.
pub const SUITE: &str = "bookworm";
/// Packages on top of `minbase`. Changing this list rebuilds the cached rootfs.
/// pigz: `/usr/bin/unpigz`, as on the EKS AMIs (SOCI's gzip decompressor).
pub const INCLUDE: &str = "systemd,systemd-sysv,dbus,containerd,ca-certificates,pigz";
/// Debian enables containerd at boot; AL2023 does not (nodeadm starts it). Remove this to mimic AL2023.
pub const CONTAINERD_WANTS: &str = "/etc/systemd/system/multi-user.target.wants/containerd.service";
/// Marker inside a complete rootfs; holds [`INCLUDE`].
const MARKER: &str = ".soci-agent-test-rootfs";
const FALLBACK_MIRROR: &str = "http://deb.debian.org/debian";
const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(90);
const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(120);

/// `$XDG_CACHE_HOME/soci-agent-test` or `/var/tmp/soci-agent-test`.
fn cache_base() -> PathBuf {
    match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("soci-agent-test"),
        _ => PathBuf::from("/var/tmp/soci-agent-test"),
    }
}

/// The cached Debian rootfs for nodes, built on first use (see the module docs).
pub fn rootfs_cache() -> PathBuf {
    let base = cache_base();
    let dir = base.join(format!("rootfs-{SUITE}"));
    if is_complete(&dir) {
        return dir;
    }
    let debootstrap = tool("debootstrap");
    fs::create_dir_all(&base).unwrap_or_else(|e| panic!("create {}: {e}", base.display()));
    let lock_path = base.join(format!("rootfs-{SUITE}.lock"));
    let lock_file = File::create(&lock_path).unwrap_or_else(|e| panic!("create {}: {e}", lock_path.display()));
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("flock {}: {e}", lock_path.display()));
    if is_complete(&dir) {
        return dir; // another test built it while we waited
    }
    // We hold the lock: leftovers of interrupted builds and an outdated tree can go.
    for entry in fs::read_dir(&base).unwrap().flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("rootfs-{SUITE}.tmp-"))
        {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    let _ = fs::remove_dir_all(&dir);

    let tmp = base.join(format!("rootfs-{SUITE}.tmp-{}", std::process::id()));
    let mirror = debian_mirror();
    let log_path = base.join("debootstrap.log");
    let log = File::create(&log_path).unwrap();
    eprintln!(
        "nspawn: building {} with debootstrap from {mirror} (log: {})",
        dir.display(),
        log_path.display()
    );
    let started = Instant::now();
    let status = Command::new(&debootstrap)
        .args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
        .arg(&tmp)
        .arg(&mirror)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap_or_else(|e| panic!("run {}: {e}", debootstrap.display()));
    if !status.success() {
        let _ = fs::remove_dir_all(&tmp);
        panic!(
            "debootstrap {SUITE} from {mirror} failed ({status}); end of {}:\n{}",
            log_path.display(),
            tail(&log_path, 30)
        );
    }
    fs::write(tmp.join(MARKER), INCLUDE).unwrap();
    fs::rename(&tmp, &dir).unwrap_or_else(|e| panic!("rename {} -> {}: {e}", tmp.display(), dir.display()));
    eprintln!("nspawn: rootfs built in {:.1?}", started.elapsed());
    dir
}

fn is_complete(dir: &Path) -> bool {
    fs::read_to_string(dir.join(MARKER)).is_ok_and(|s| s == INCLUDE)
}

/// The Debian mirror apt uses here (the first `bookworm` source in `/etc/apt/sources.list` or
/// `/etc/apt/sources.list.d/`), else `http://deb.debian.org/debian`.
fn debian_mirror() -> String {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    files
        .iter()
        .filter_map(|f| {
            let text = fs::read_to_string(f).ok()?;
            match f.extension().and_then(|e| e.to_str()) {
                Some("sources") => mirror_from_deb822(&text),
                Some("list") | None => mirror_from_one_line(&text),
                _ => None,
            }
        })
        .next()
        .unwrap_or_else(|| FALLBACK_MIRROR.to_owned())
}

/// `deb [opts] URI bookworm main` lines.
pub fn mirror_from_one_line(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let rest = line.strip_prefix("deb ")?.trim_start();
        let rest = match rest.strip_prefix('[') {
            Some(opts) => opts.split_once(']')?.1,
            None => rest,
        };
        let mut words = rest.split_whitespace();
        let (uri, suite) = (words.next()?, words.next()?);
        (suite == SUITE).then(|| uri.trim_end_matches('/').to_owned())
    })
}

/// deb822 stanzas with `Types: deb`, `Suites:` containing `bookworm`.
pub fn mirror_from_deb822(text: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
        };
        let types = field("Types")?;
        let suites = field("Suites")?;
        if !types.split_whitespace().any(|t| t == "deb") || !suites.split_whitespace().any(|s| s == SUITE) {
            return None;
        }
        let uris = field("URIs")?;
        uris.split_whitespace()
            .next()
            .map(|u| u.trim_end_matches('/').to_owned())
    })
}

/// Absolute path of a required tool (PATH plus the sbin directories), or a panic saying what to install.
fn tool(name: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found: install debootstrap and systemd-container; .ci/run does"))
}

/// A closure run on the copy's root before boot.
type Prepare = Box<dyn FnOnce(&Path) + Send>;

/// What to change in a node's copy of the rootfs before it boots.
///
/// ```ignore
/// let node = Node::boot(
///     NodeOptions::new()
///         .al2023_like()
///         .file("/etc/systemd/system/x.service", "[Service]\nExecStart=/bin/true\n")
///         .bind_ro(release_dir, "/opt/soci"),
/// );
/// ```
#[derive(Default)]
pub struct NodeOptions {
    remove: Vec<String>,
    files: Vec<(String, Vec<u8>, u32)>,
    bind_ro: Vec<(PathBuf, String)>,
    bind: Vec<(PathBuf, String)>,
    prepare: Vec<Prepare>,
    boot_timeout: Option<Duration>,
}

impl NodeOptions {
    pub fn new() -> Self {
        Self::default()
    }
    /// Do not start containerd at boot, as on AL2023 (removes [`CONTAINERD_WANTS`]).
    pub fn al2023_like(self) -> Self {
        self.remove(CONTAINERD_WANTS)
    }
    /// Delete `node_path` (file, symlink or directory) from the copy; missing is fine.
    pub fn remove(mut self, node_path: &str) -> Self {
        self.remove.push(node_path.to_owned());
        self
    }
    /// Write a file (mode 0644, parents created) into the copy.
    pub fn file(self, node_path: &str, contents: impl AsRef<[u8]>) -> Self {
        self.file_mode(node_path, contents, 0o644)
    }
    /// Write a file with `mode` (e.g. 0o755 for a script) into the copy.
    pub fn file_mode(mut self, node_path: &str, contents: impl AsRef<[u8]>, mode: u32) -> Self {
        self.files
            .push((node_path.to_owned(), contents.as_ref().to_vec(), mode));
        self
    }
    /// Bind a host path read-only at `node_path` (`--bind-ro=HOST:NODE`).
    pub fn bind_ro(mut self, host: impl Into<PathBuf>, node_path: &str) -> Self {
        self.bind_ro.push((host.into(), node_path.to_owned()));
        self
    }
    /// Bind a host path read-write at `node_path` (`--bind=HOST:NODE`), e.g. a loop device
    /// standing in for an EBS volume (there is no udev in the node: its `.device` unit never
    /// turns active, the device node itself works).
    pub fn bind(mut self, host: impl Into<PathBuf>, node_path: &str) -> Self {
        self.bind.push((host.into(), node_path.to_owned()));
        self
    }
    /// Run `f` with the host path of the copy's root, after removals and files, before boot.
    pub fn prepare(mut self, f: impl FnOnce(&Path) + Send + 'static) -> Self {
        self.prepare.push(Box::new(f));
        self
    }
    /// Bound on reaching `running`/`degraded` (default 90 s).
    pub fn boot_timeout(mut self, limit: Duration) -> Self {
        self.boot_timeout = Some(limit);
        self
    }
}

/// A booted systemd node (see the module docs). Powered off and deleted on drop.
pub struct Node {
    name: String,
    dir: tempfile::TempDir,
    nspawn: Child,
    leader: u32,
}

impl Node {
    /// Copies the cached rootfs, applies `opts`, boots it and waits until systemd reports
    /// `running` or `degraded`. Panics (with the console log) when that does not happen in time.
    pub fn boot(opts: NodeOptions) -> Node {
        let cache = rootfs_cache();
        let nspawn_bin = tool("systemd-nspawn");
        tool("nsenter");
        let nodes = cache_base().join("nodes");
        fs::create_dir_all(&nodes).unwrap();
        let dir = tempfile::Builder::new().prefix("node-").tempdir_in(&nodes).unwrap();
        let root = dir.path().join("rootfs");
        let copied = Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&cache)
            .arg(&root)
            .status()
            .unwrap();
        assert!(
            copied.success(),
            "cp -a {} {}: {copied}",
            cache.display(),
            root.display()
        );
        let _ = fs::remove_file(root.join(MARKER));
        for sub in ["share", "dbus"] {
            fs::create_dir(dir.path().join(sub)).unwrap();
        }

        let in_root = |p: &str| root.join(p.trim_start_matches('/'));
        for p in &opts.remove {
            let p = in_root(p);
            let _ = fs::remove_file(&p).or_else(|_| fs::remove_dir_all(&p));
        }
        for (p, contents, mode) in &opts.files {
            let p = in_root(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
            fs::set_permissions(&p, fs::Permissions::from_mode(*mode)).unwrap();
        }
        for f in opts.prepare {
            f(&root);
        }

        let name = format!("soci-test-{:08x}", fastrand::u32(..));
        let log_path = dir.path().join("console.log");
        let log = File::create(&log_path).unwrap();
        let mut cmd = Command::new(nspawn_bin);
        cmd.arg("-D")
            .arg(&root)
            .args(["--register=no", "--keep-unit", "-b", &format!("--machine={name}")])
            .arg(bind_arg("--bind", &dir.path().join("share"), "/share"))
            .arg(bind_arg("--bind", &dir.path().join("dbus"), "/run/dbus"));
        for (host, node_path) in &opts.bind_ro {
            cmd.arg(bind_arg("--bind-ro", host, node_path));
        }
        for (host, node_path) in &opts.bind {
            cmd.arg(bind_arg("--bind", host, node_path));
        }
        let started = Instant::now();
        let nspawn = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn systemd-nspawn");
        let mut node = Node {
            name,
            dir,
            nspawn,
            leader: 0,
        };
        let deadline = started + opts.boot_timeout.unwrap_or(DEFAULT_BOOT_TIMEOUT);
        node.leader = node.wait_for_leader(deadline);
        node.wait_until_up(deadline);
        eprintln!(
            "nspawn: node {} up in {:.1?} (leader pid {})",
            node.name,
            started.elapsed(),
            node.leader
        );
        node
    }

    /// Finds the node's PID 1: the child of systemd-nspawn that is PID 1 in its own namespace.
    fn wait_for_leader(&mut self, deadline: Instant) -> u32 {
        let nspawn_pid = self.nspawn.id();
        loop {
            if let Some(status) = self.nspawn.try_wait().unwrap() {
                panic!(
                    "systemd-nspawn exited during boot ({status}); console:\n{}",
                    self.console()
                );
            }
            if let Some(pid) = children(nspawn_pid).into_iter().find(|&c| is_ns_init(c)) {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "node {}: no PID 1 appeared; console:\n{}",
                self.name,
                self.console()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `systemctl is-system-running --wait` until `running`/`degraded` or the deadline.
    fn wait_until_up(&mut self, deadline: Instant) {
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(status) = self.nspawn.try_wait().unwrap() {
                panic!(
                    "systemd-nspawn exited during boot ({status}); console:\n{}",
                    self.console()
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let secs = left.as_secs().max(1).to_string();
            let argv = ["timeout", &secs, "systemctl", "is-system-running", "--wait"];
            if let Ok(out) = run_bounded(self.nsenter(&argv), left + Duration::from_secs(2)) {
                last = format!("{}{}", text(&out.stdout).trim(), text(&out.stderr).trim());
                match text(&out.stdout).trim() {
                    "running" => return,
                    "degraded" => {
                        let failed = self.exec(&["systemctl", "--failed", "--no-legend", "--plain"]);
                        eprintln!(
                            "nspawn: node {} is degraded; failed units:\n{}",
                            self.name,
                            text(&failed.stdout)
                        );
                        return;
                    }
                    _ => {}
                }
            }
            thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "node {} not up in time (last: {last:?}); console:\n{}",
            self.name,
            self.console()
        );
    }

    /// The `--machine` name (also the node's hostname).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Host pid of the node's PID 1 (its systemd).
    pub fn leader(&self) -> u32 {
        self.leader
    }
    /// Host path of the node's root directory.
    pub fn root(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }
    /// Host path of `node_path` inside the node (`/etc/x` -> `<copy>/etc/x`). Not for `/run`,
    /// `/tmp` or `/share`, which are mounts inside the node (use [`Node::share`] for `/share`).
    pub fn path(&self, node_path: &str) -> PathBuf {
        self.root().join(node_path.trim_start_matches('/'))
    }
    /// Host side of the node's `/share` (read-write).
    pub fn share(&self) -> PathBuf {
        self.dir.path().join("share")
    }
    /// Host path of the node's `/run/dbus/system_bus_socket`.
    pub fn bus_socket(&self) -> PathBuf {
        self.dir.path().join("dbus/system_bus_socket")
    }
    /// D-Bus address of the node's system bus, for `Systemd::connect_address`.
    pub fn bus_address(&self) -> String {
        format!("unix:path={}", self.bus_socket().display())
    }

    /// Runs `argv` inside the node (all its namespaces), bounded by 120 s (panics beyond).
    pub fn exec(&self, argv: &[&str]) -> Output {
        self.exec_timeout(argv, DEFAULT_EXEC_TIMEOUT)
    }
    /// Like [`Node::exec`] with a given bound.
    pub fn exec_timeout(&self, argv: &[&str], limit: Duration) -> Output {
        run_bounded(self.nsenter(argv), limit).unwrap_or_else(|e| panic!("node {}: {argv:?}: {e}", self.name))
    }
    /// Runs `sh -c script` inside the node.
    pub fn sh(&self, script: &str) -> Output {
        self.exec(&["sh", "-c", script])
    }
    /// Runs `argv` inside the node, panics unless it succeeds, returns its trimmed stdout.
    pub fn check(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        assert!(
            out.status.success(),
            "node {}: {argv:?} failed ({}):\n{}{}",
            self.name,
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout).trim().to_owned()
    }

    /// The end of the console log and the last 200 lines of the node's journal.
    pub fn journal(&self) -> String {
        let journal = run_bounded(
            self.nsenter(&["sh", "-c", "journalctl -b --no-pager | tail -n 200"]),
            Duration::from_secs(20),
        )
        .map(|o| text(&o.stdout))
        .unwrap_or_else(|e| format!("(journalctl: {e})"));
        format!(
            "---- node {} console (end) ----\n{}\n---- journal (last 200 lines) ----\n{journal}",
            self.name,
            tail(&self.dir.path().join("console.log"), 60)
        )
    }

    fn console(&self) -> String {
        tail(&self.dir.path().join("console.log"), 80)
    }

    fn nsenter(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t").arg(self.leader.to_string()).arg("-a").args(argv);
        cmd
    }

    /// Powers the node off: `systemctl poweroff`, then SIGTERM to nspawn, then SIGKILL, each bounded.
    fn shutdown(&mut self) {
        if self.nspawn.try_wait().ok().flatten().is_some() {
            return;
        }
        if self.leader != 0 {
            let _ = run_bounded(
                self.nsenter(&["systemctl", "poweroff", "--no-block"]),
                Duration::from_secs(10),
            );
            if self.wait_exit(Duration::from_secs(30)) {
                return;
            }
        }
        eprintln!("nspawn: node {} did not power off; sending SIGTERM", self.name);
        let _ = Command::new("kill")
            .args(["-TERM", &self.nspawn.id().to_string()])
            .status();
        if self.wait_exit(Duration::from_secs(10)) {
            return;
        }
        if self.leader != 0 {
            let _ = Command::new("kill").args(["-KILL", &self.leader.to_string()]).status();
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }

    fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.nspawn.try_wait().ok().flatten().is_some() {
                return true;
            }
            thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if thread::panicking() && self.leader != 0 {
            eprintln!("{}", self.journal());
        }
        self.shutdown();
        // `self.dir` (the copy, share and bus directories) is removed when it drops.
    }
}

fn bind_arg(flag: &str, host: &Path, node_path: &str) -> String {
    format!("{flag}={}:{node_path}", host.display())
}

/// Pids of the direct children of `pid` (all its threads).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|t| fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Whether `pid` is PID 1 of a nested pid namespace (`NSpid: <host pid> 1`).
fn is_ns_init(pid: u32) -> bool {
    let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .is_some_and(|ids| ids.split_whitespace().count() > 1 && ids.split_whitespace().last() == Some("1"))
}

/// Runs `cmd` with piped output; kills it (SIGKILL) and returns an error after `limit`.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Result<Output, String> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn {cmd:?}: {e}"))?;
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || tx.send(child.wait_with_output()));
    match rx.recv_timeout(limit) {
        Ok(out) => out.map_err(|e| format!("wait: {e}")),
        Err(_) => {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            Err(format!("still running after {limit:?}; killed"))
        }
    }
}

/// Lossy UTF-8 of command output.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The last `n` lines of a file ("" when unreadable).
fn tail(path: &Path, n: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
