//! The REAL containerd (the rig's v2.4.2 or v2.2.9 build, see [`super::real`])
//! on private `root`/`state`/socket paths under a test directory, with its CRI
//! plugin serving `runtime.v1.ImageService` on the same socket, and
//! loopback registries trusted over plain HTTP through `config_path`
//! (`hosts/<host:port>/hosts.toml`). The CRI snapshotter is overlayfs when
//! an overlay mount works here, else native. Optionally wired to a REAL SOCI
//! ([`Soci`]) through `[proxy_plugins.soci]`.
//!
//! Also the process helpers the prefetch tests share: [`Daemon`] (a
//! background process with its output in a log file, killed on drop) and
//! [`run_bounded`].

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Runs `cmd` to completion, panicking if it takes longer than `limit`.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let Some(status) = super::wait_for_exit(&mut child, limit) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{cmd:?} did not finish within {limit:?}");
    };
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

/// Runs `cmd`, panics unless it succeeds, returns its stdout.
pub fn run_ok(cmd: &mut Command, limit: Duration) -> String {
    let out = run_bounded(cmd, limit);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Polls `ready` every 50 ms until it returns true; panics with `what` and
/// `context()` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} not within {limit:?}\n{}", context());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A background process with stdout+stderr in a log file; killed and reaped on drop.
pub struct Daemon {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    pub fn spawn(name: &str, cmd: &mut Command, log: PathBuf) -> Daemon {
        let file = File::options().create(true).append(true).open(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Daemon {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics (with the log) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(s) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
            panic!("{} exited early ({s}); log:\n{}", self.name, self.log());
        }
    }

    /// Kills and reaps the process.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- {} log:\n{}", self.name, self.log());
        }
    }
}

/// `overlayfs` when an overlay mount works in this environment, else `native`.
pub fn cri_snapshotter() -> &'static str {
    static CHOICE: OnceLock<&'static str> = OnceLock::new();
    CHOICE.get_or_init(|| {
        let base = std::env::temp_dir().join(format!("soci-agent-overlay-probe-{}", std::process::id()));
        let dirs = ["lower", "upper", "work", "merged"].map(|d| base.join(d));
        for d in &dirs {
            fs::create_dir_all(d).unwrap();
        }
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            dirs[0].display(),
            dirs[1].display(),
            dirs[2].display()
        );
        let mounted = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(&dirs[3])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if mounted {
            let _ = Command::new("umount").arg(&dirs[3]).status();
        }
        let _ = fs::remove_dir_all(&base);
        if mounted { "overlayfs" } else { "native" }
    })
}

/// How to start a [`Containerd`].
#[derive(Debug, Clone)]
pub struct Options {
    /// A containerd version the rig builds (see [`super::real::CONTAINERD_VERSIONS`]).
    pub version: &'static str,
    /// `[proxy_plugins.soci]` at this socket (`None`: no proxy plugin).
    pub soci: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            version: super::real::CONTAINERD_VERSIONS[0],
            soci: None,
        }
    }
}

/// A running REAL containerd (the rig's build) with CRI, all state under one directory.
pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub hosts_dir: PathBuf,
    pub version: &'static str,
    daemon: Daemon,
}

impl Containerd {
    /// Starts the newest rig containerd under `dir`, without a proxy plugin.
    pub fn start(dir: &Path) -> Containerd {
        Containerd::start_with(dir, Options::default())
    }

    /// Starts containerd under `dir` (config version 3) and waits (bounded) until its CRI
    /// plugin serves.
    pub fn start_with(dir: &Path, opts: Options) -> Containerd {
        let bin = super::real::containerd(opts.version);
        fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let hosts_dir = dir.join("hosts");
        fs::create_dir_all(&hosts_dir).unwrap();
        let config = dir.join("containerd.toml");
        let p = |d: &str| dir.join(d).to_str().unwrap().to_string();
        let proxy = opts.soci.as_ref().map_or(String::new(), |s| {
            format!(
                "\n[proxy_plugins.soci]\n  type = \"snapshot\"\n  address = {:?}\n",
                s.to_str().unwrap()
            )
        });
        fs::write(
            &config,
            format!(
                "version = 3\nroot = {root:?}\nstate = {state:?}\n\n[grpc]\n  address = {sock:?}\n\n\
                 [ttrpc]\n  address = {ttrpc:?}\n\n\
                 [plugins.'io.containerd.nri.v1.nri']\n  disable = true\n\n\
                 [plugins.'io.containerd.cri.v1.runtime']\n  disable_apparmor = true\n\n\
                 [plugins.'io.containerd.cri.v1.images']\n  snapshotter = {snap:?}\n\n\
                 [plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = {hosts:?}\n{proxy}",
                root = p("root"),
                state = p("state"),
                sock = socket.to_str().unwrap(),
                ttrpc = p("containerd.sock.ttrpc"),
                snap = cri_snapshotter(),
                hosts = hosts_dir.to_str().unwrap(),
            ),
        )
        .unwrap();
        let daemon = Daemon::spawn(
            "containerd",
            Command::new(bin).arg("--config").arg(&config),
            dir.join("containerd.log"),
        );
        let mut c = Containerd {
            dir: dir.to_path_buf(),
            socket,
            hosts_dir,
            version: opts.version,
            daemon,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            c.daemon.assert_running();
            let out = c.ctr_output(&["plugins", "ls"]);
            let plugins = String::from_utf8_lossy(&out.stdout).into_owned();
            let cri_ok = plugins.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.first() == Some(&"io.containerd.grpc.v1") && f.get(1) == Some(&"cri") && f.last() == Some(&"ok")
            });
            if out.status.success() && cri_ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "containerd's CRI not serving after 30 s; plugins:\n{plugins}\nlog:\n{}",
                c.daemon.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c
    }

    /// Stops the daemon (its state stays).
    pub fn stop(&mut self) {
        self.daemon.stop();
    }

    /// Trusts `host` (`127.0.0.1:PORT`) over plain HTTP for CRI pulls.
    pub fn trust_plain_http(&self, host: &str) {
        let d = self.hosts_dir.join(host);
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join("hosts.toml"),
            format!(
                "server = \"http://{host}\"\n\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  \
                 skip_verify = true\n"
            ),
        )
        .unwrap();
    }

    /// `unix://` endpoint for `--cri-endpoint`.
    pub fn endpoint(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    fn ctr_output(&self, args: &[&str]) -> Output {
        run_bounded(
            Command::new(super::real::ctr(self.version))
                .arg("--address")
                .arg(&self.socket)
                .args(args),
            Duration::from_secs(60),
        )
    }

    /// `ctr --address SOCKET ARGS...`, which must succeed; its stdout.
    pub fn ctr(&self, args: &[&str]) -> String {
        run_ok(
            Command::new(super::real::ctr(self.version))
                .arg("--address")
                .arg(&self.socket)
                .args(args),
            Duration::from_secs(120),
        )
    }

    /// Names of the images in namespace `k8s.io`.
    pub fn image_names(&self) -> Vec<String> {
        self.ctr(&["-n", "k8s.io", "images", "ls", "-q"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// The labels column of `ctr -n k8s.io images ls` for `name` (`None` when absent).
    pub fn image_labels(&self, name: &str) -> Option<String> {
        let out = self.ctr(&["-n", "k8s.io", "images", "ls", &format!("name=={name}")]);
        // Columns: REF TYPE DIGEST SIZE(two words) PLATFORMS LABELS
        out.lines().skip(1).find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.first() == Some(&name)).then(|| f.last().unwrap_or(&"").to_string())
        })
    }

    pub fn log(&self) -> String {
        self.daemon.log()
    }

    pub fn assert_running(&mut self) {
        self.daemon.assert_running();
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.daemon.stop();
        // Unpacking may leave nothing mounted, but be sure before the temp dir goes.
        unmount_under(&self.dir);
    }
}

/// The REAL `soci-snapshotter-grpc` (a rig build) on a private socket and root under `dir`, in
/// parallel pull/unpack mode with containerd's content store at `containerd` (it need not be up
/// yet: SOCI dials it when it pulls).
pub struct Soci {
    pub socket: PathBuf,
    pub root: PathBuf,
    pub config: PathBuf,
    daemon: Daemon,
}

impl Soci {
    pub fn start(dir: &Path, version: &str, containerd: &Path) -> Soci {
        fs::create_dir_all(dir).unwrap();
        let socket = dir.join("soci.sock");
        let root = dir.join("soci-root");
        let config = dir.join("soci.toml");
        fs::write(
            &config,
            format!(
                "[pull_modes.parallel_pull_unpack]\nenable = true\ndiscard_unpacked_layers = true\n\n\
                 [content_store]\ntype = \"containerd\"\ncontainerd_address = {:?}\n",
                containerd.to_str().unwrap()
            ),
        )
        .unwrap();
        let mut s = Soci {
            daemon: Soci::spawn(dir, version, &socket, &root, &config),
            socket,
            root,
            config,
        };
        s.wait_serving();
        s
    }

    fn spawn(dir: &Path, version: &str, socket: &Path, root: &Path, config: &Path) -> Daemon {
        let mut cmd = Command::new(super::real::soci_daemon(version));
        cmd.arg("--address")
            .arg(socket)
            .arg("--root")
            .arg(root)
            .arg("--config")
            .arg(config)
            .args(["--log-level", "debug"])
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDS");
        Daemon::spawn("soci-snapshotter-grpc", &mut cmd, dir.join("soci.log"))
    }

    fn wait_serving(&mut self) {
        let socket = self.socket.clone();
        let log = self.daemon.log.clone();
        wait_until(
            "SOCI serving its socket",
            Duration::from_secs(30),
            || {
                self.daemon.assert_running();
                std::os::unix::net::UnixStream::connect(&socket).is_ok()
            },
            || fs::read_to_string(&log).unwrap_or_default(),
        );
    }

    /// Stops the daemon and removes its socket file.
    pub fn stop(&mut self) {
        self.daemon.stop();
        let _ = fs::remove_file(&self.socket);
    }

    pub fn log(&self) -> String {
        self.daemon.log()
    }
}

impl Drop for Soci {
    fn drop(&mut self) {
        self.stop();
        unmount_under(&self.root);
    }
}

/// Lazily unmounts everything mounted under `dir`, deepest first.
fn unmount_under(dir: &Path) {
    if let Ok(mounts) = fs::read_to_string("/proc/self/mounts") {
        let prefix = dir.to_str().unwrap_or("/nonexistent").to_string();
        let mut ours: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&prefix))
            .collect();
        ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in ours {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}
