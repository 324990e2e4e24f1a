//! A real containerd (the host's Debian `containerd`, 1.6) on private
//! `--root`/`--state`/socket paths under a test directory, with its CRI
//! plugin serving `runtime.v1.ImageService` on the same socket, and
//! loopback registries trusted over plain HTTP through `config_path`
//! (`hosts/<host:port>/hosts.toml`). The CRI snapshotter is overlayfs when
//! an overlay mount works here, else native.
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
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
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

/// A running containerd with CRI, all state under one directory.
pub struct Containerd {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub hosts_dir: PathBuf,
    daemon: Daemon,
}

impl Containerd {
    /// Starts containerd under `dir` and waits (bounded) until its CRI plugin serves.
    pub fn start(dir: &Path) -> Containerd {
        let bin = Path::new("/usr/bin/containerd");
        assert!(
            bin.exists(),
            "needs Debian's containerd: apt-get install -y containerd (.ci/run does)"
        );
        fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let hosts_dir = dir.join("hosts");
        fs::create_dir_all(&hosts_dir).unwrap();
        let config = dir.join("containerd.toml");
        let p = |d: &str| dir.join(d).to_str().unwrap().to_string();
        fs::write(
            &config,
            format!(
                "version = 2\nroot = {root:?}\nstate = {state:?}\n\n[grpc]\n  address = {sock:?}\n\n\
                 [ttrpc]\n  address = {ttrpc:?}\n\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt:?}\n\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\n  disable_apparmor = true\n  disable_cgroup = true\n\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = {snap:?}\n\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = {hosts:?}\n",
                root = p("root"),
                state = p("state"),
                sock = socket.to_str().unwrap(),
                ttrpc = p("containerd.sock.ttrpc"),
                opt = p("opt"),
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
            Command::new("ctr").arg("--address").arg(&self.socket).args(args),
            Duration::from_secs(60),
        )
    }

    /// `ctr --address SOCKET ARGS...`, which must succeed; its stdout.
    pub fn ctr(&self, args: &[&str]) -> String {
        run_ok(
            Command::new("ctr").arg("--address").arg(&self.socket).args(args),
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
        if let Ok(mounts) = fs::read_to_string("/proc/self/mounts") {
            let prefix = self.dir.to_str().unwrap_or("/nonexistent").to_string();
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
}
