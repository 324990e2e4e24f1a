//! Smoke test of the TEST-ONLY SOCI stand-in (`tests/standin`, binary `soci-snapshotter-grpc`):
//! it must look like the real daemon to systemd and containerd before the end-to-end tests ship it
//! in a release archive.
//!
//! - CLI: `--version`/`-version`, unknown flags exit 2.
//! - Start-up: a missing config, `# standin: fail-at-start` and broken TOML each exit 1.
//! - systemd: socket activation (listener as fd 3, `LISTEN_PID`/`LISTEN_FDS`), `READY=1` on an
//!   abstract `NOTIFY_SOCKET`, `STOPPING=1` and exit 0 on SIGTERM.
//! - containerd: the host's Debian containerd (1.6) loads it as proxy snapshotter `soci`, and
//!   `ctr images import --snapshotter soci` unpacks a two-layer OCI image (with a whiteout) built
//!   here; the unpacked tree on disk is checked, a view is a read-only bind mount, and removing the
//!   image makes containerd's GC remove every snapshot (and directory) through the stand-in.
//!
//! Needs root, `/usr/bin/containerd` and `ctr` (Debian `containerd`; `.ci/run` installs it).

mod common;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;
use sha2::{Digest, Sha256};

use common::containerd::{run_bounded, run_ok};
use common::standin::standin_binary;

const PARALLEL_CONFIG: &str = "[pull_modes.parallel_pull_unpack]\nenable = true\n\
                               discard_unpacked_layers = true\n";
const IMAGE: &str = "docker.io/library/standin-smoke:1";
/// Bound for one quick `ctr` call.
const BOUND: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Process helpers: bounded waits, logs in files, kill + reap on drop.

/// A background daemon with stdout+stderr in a log file; killed and reaped on drop.
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, cmd: &mut Command, log: PathBuf) -> Daemon {
        let file = File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Daemon { name, child, log }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Panics (with the log) if the daemon has exited.
    fn assert_running(&mut self) {
        if let Some(s) = self.child.try_wait().unwrap() {
            panic!("{} exited early ({s}); log:\n{}", self.name, self.log());
        }
    }

    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {limit:?}; log:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn sigterm(&self) {
        run_ok(
            Command::new("kill").args(["-TERM", &self.child.id().to_string()]),
            Duration::from_secs(5),
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} log:\n{}", self.name, self.log());
        }
    }
}

/// The receiving end of `NOTIFY_SOCKET`.
struct Notify {
    sock: UnixDatagram,
    env: String,
}

impl Notify {
    fn at_path(path: &Path) -> Notify {
        Notify {
            sock: UnixDatagram::bind(path).unwrap(),
            env: path.to_str().unwrap().to_string(),
        }
    }

    fn abstract_name() -> Notify {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!("soci-standin-smoke-{}-{nanos}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        Notify {
            sock: UnixDatagram::bind_addr(&addr).unwrap(),
            env: format!("@{name}"),
        }
    }

    /// Waits for a datagram holding the line `want`, while `daemon` keeps running.
    fn expect(&self, want: &str, daemon: &mut Daemon, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        loop {
            self.sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            if let Ok(n) = self.sock.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n]).lines().any(|l| l == want) {
                    return;
                }
                continue;
            }
            if !want.starts_with("STOPPING") {
                daemon.assert_running();
            }
            assert!(
                Instant::now() < deadline,
                "no {want} from {} within {limit:?}; log:\n{}",
                daemon.name,
                daemon.log()
            );
        }
    }
}

fn standin_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(standin_binary());
    c.args(args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_PID")
        .env_remove("LISTEN_FDS");
    c
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

// ---------------------------------------------------------------------------------------------

#[test]
fn version_and_flag_errors_look_like_the_real_daemon() {
    let ver = std::env::var("SOCI_STANDIN_VERSION").unwrap_or_else(|_| "0.15.0".into());
    let want = format!("soci-snapshotter-grpc version v{ver} standin\n");
    for flag in ["--version", "-version"] {
        let out = run_bounded(&mut standin_cmd(&[flag]), Duration::from_secs(10));
        assert!(out.status.success(), "{flag}: {}", out.status);
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{flag}");
    }
    let out = run_bounded(&mut standin_cmd(&["--no-such-flag"]), Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2), "unknown flag");
    assert!(String::from_utf8_lossy(&out.stderr).contains("flag provided but not defined: -no-such-flag"));
    let out = run_bounded(&mut standin_cmd(&["--address"]), Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2), "flag without its value");
}

#[test]
fn refuses_to_start_on_a_missing_failing_or_broken_config() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("soci.sock");
    let root = tmp.path().join("root");
    let start = |config: &Path| {
        run_bounded(
            &mut standin_cmd(&["--address", p(&sock), "--root", p(&root), "--config", p(config)]),
            Duration::from_secs(10),
        )
    };

    let out = start(&tmp.path().join("missing.toml"));
    assert_eq!(out.status.code(), Some(1), "missing config");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("failed to load config file") && err.contains("missing.toml"),
        "{err}"
    );

    let failing = tmp.path().join("failing.toml");
    fs::write(&failing, format!("{PARALLEL_CONFIG}# standin: fail-at-start\n")).unwrap();
    let out = start(&failing);
    assert_eq!(out.status.code(), Some(1), "fail-at-start marker");
    assert!(String::from_utf8_lossy(&out.stderr).contains("fail-at-start"));

    let broken = tmp.path().join("broken.toml");
    fs::write(&broken, "[pull_modes.parallel_pull_unpack\nenable = true\n").unwrap();
    let out = start(&broken);
    assert_eq!(out.status.code(), Some(1), "broken TOML");
    assert!(String::from_utf8_lossy(&out.stderr).contains("failed to parse config file"));

    assert!(!sock.exists(), "a refused start must not listen");
}

#[test]
fn socket_activation_readiness_and_sigterm() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("config.toml");
    fs::write(&config, PARALLEL_CONFIG).unwrap();
    let sock_path = tmp.path().join("activated.sock");
    let listener = UnixListener::bind(&sock_path).unwrap();
    let notify = Notify::abstract_name();

    // systemd's protocol: the listener as fd 3, LISTEN_FDS=1 and LISTEN_PID = the daemon's pid.
    // The pid is only known after fork, so a shell exports its own `$$` and execs the daemon.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "export LISTEN_PID=$$; exec \"$0\" \"$@\""])
        .arg(standin_binary())
        .args([
            "--address",
            "fd://",
            "--root",
            p(&tmp.path().join("root")),
            "--config",
            p(&config),
        ])
        .env("LISTEN_FDS", "1")
        .env_remove("LISTEN_PID")
        .env("NOTIFY_SOCKET", &notify.env);
    let fd = listener.as_raw_fd();
    // SAFETY: only dup2/fcntl (async-signal-safe) run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            use nix::fcntl::{FcntlArg, FdFlag, fcntl};
            use std::os::fd::BorrowedFd;
            let src = BorrowedFd::borrow_raw(fd);
            if fd == 3 {
                fcntl(src, FcntlArg::F_SETFD(FdFlag::empty()))?;
            } else {
                // dup2 leaves the new fd without FD_CLOEXEC; it must stay open for the daemon.
                std::mem::forget(nix::unistd::dup2_raw(src, 3)?);
            }
            Ok(())
        });
    }
    let mut daemon = Daemon::spawn("stand-in (socket-activated)", &mut cmd, tmp.path().join("standin.log"));
    notify.expect("READY=1", &mut daemon, Duration::from_secs(20));

    // The daemon serves HTTP/2 (gRPC) on the inherited socket: send the client preface and an
    // empty SETTINGS frame, expect the server's SETTINGS frame (type 4) first.
    let mut conn = UnixStream::connect(&sock_path).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    let mut frame_header = [0u8; 9];
    conn.read_exact(&mut frame_header)
        .expect("an HTTP/2 frame from the stand-in");
    assert_eq!(frame_header[3], 4, "first server frame is SETTINGS: {frame_header:?}");
    drop(conn);

    let log = daemon.log();
    assert!(log.contains("Parallel image pull enabled"), "{log}");
    assert!(
        log.contains("passed by systemd") && !log.contains("falling back"),
        "{log}"
    );

    daemon.sigterm();
    notify.expect("STOPPING=1", &mut daemon, Duration::from_secs(10));
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit after SIGTERM: {status}; log:\n{}", daemon.log());
}

#[test]
fn containerd_imports_an_image_through_the_standin() {
    let containerd = Path::new("/usr/bin/containerd");
    assert!(
        containerd.exists(),
        "needs Debian's containerd: apt-get install -y containerd (.ci/run does)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();

    // The stand-in, on a plain socket path, ready when it says so.
    let soci_sock = d.join("soci.sock");
    let soci_root = d.join("soci-root");
    let config = d.join("soci-config.toml");
    fs::write(&config, PARALLEL_CONFIG).unwrap();
    let notify = Notify::at_path(&d.join("notify.sock"));
    let start_standin = |log: &str| {
        let args = [
            "--address",
            p(&soci_sock),
            "--root",
            p(&soci_root),
            "--config",
            p(&config),
        ];
        let mut cmd = standin_cmd(&args);
        cmd.args(["--log-level", "debug"]).env("NOTIFY_SOCKET", &notify.env);
        Daemon::spawn("stand-in", &mut cmd, d.join(log))
    };
    let mut standin = start_standin("standin.log");
    notify.expect("READY=1", &mut standin, Duration::from_secs(20));
    assert!(standin.log().contains("Parallel image pull enabled"));

    // containerd with everything under the temp dir and no CRI.
    let address = d.join("containerd.sock");
    let containerd_config = d.join("containerd.toml");
    fs::write(
        &containerd_config,
        format!(
            "version = 2\nroot = {root:?}\nstate = {state:?}\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n\
             [grpc]\n  address = {address:?}\n\n[ttrpc]\n  address = {ttrpc:?}\n\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = {opt:?}\n\n\
             [proxy_plugins.soci]\n  type = \"snapshot\"\n  address = {soci:?}\n",
            root = p(&d.join("containerd-root")),
            state = p(&d.join("containerd-state")),
            address = p(&address),
            ttrpc = format!("{}.ttrpc", p(&address)),
            opt = p(&d.join("containerd-opt")),
            soci = p(&soci_sock),
        ),
    )
    .unwrap();
    let mut daemon = Daemon::spawn(
        "containerd",
        Command::new(containerd).arg("--config").arg(&containerd_config),
        d.join("containerd.log"),
    );
    let ctr = |args: &[&str]| {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(&address).args(args);
        c
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !run_bounded(&mut ctr(&["version"]), Duration::from_secs(10))
        .status
        .success()
    {
        daemon.assert_running();
        assert!(
            Instant::now() < deadline,
            "containerd not serving after 30 s; log:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let plugins = run_ok(&mut ctr(&["plugins", "ls"]), Duration::from_secs(20));
    let soci_line = plugins.lines().find(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.first() == Some(&"io.containerd.snapshotter.v1") && f.get(1) == Some(&"soci")
    });
    assert!(
        soci_line.is_some_and(|l| l.trim_end().ends_with("ok")),
        "soci plugin not ok:\n{plugins}"
    );
    eprintln!("{}", soci_line.unwrap());

    // Import (and so unpack) a two-layer image through the stand-in.
    let image = d.join("image.tar");
    fs::write(&image, oci_image_tar()).unwrap();
    run_ok(
        &mut ctr(&["-n", "k8s.io", "images", "import", "--snapshotter", "soci", p(&image)]),
        Duration::from_secs(60),
    );
    let images = run_ok(
        &mut ctr(&["-n", "k8s.io", "images", "ls", "-q"]),
        Duration::from_secs(20),
    );
    assert!(images.lines().any(|l| l == IMAGE), "image not imported:\n{images}");
    let snapshots = run_ok(
        &mut ctr(&["-n", "k8s.io", "snapshots", "--snapshotter", "soci", "ls"]),
        Duration::from_secs(20),
    );
    let committed = snapshots
        .lines()
        .filter(|l| l.split_whitespace().last() == Some("Committed"))
        .count();
    assert_eq!(committed, 2, "one committed snapshot per layer expected:\n{snapshots}");
    eprintln!("{snapshots}");

    // The top layer's snapshot holds both layers applied, the whiteout honoured.
    let top = fs::read_dir(soci_root.join("snapshotter/snapshots"))
        .unwrap()
        .map(|e| e.unwrap().path().join("fs"))
        .find(|fs_dir| fs_dir.join("etc/standin-second").exists())
        .unwrap_or_else(|| panic!("no snapshot holds the second layer; stand-in log:\n{}", standin.log()));
    assert_eq!(
        fs::read_to_string(top.join("etc/standin-hello")).unwrap(),
        "hello from layer 1\n"
    );
    assert_eq!(
        fs::read_to_string(top.join("etc/standin-second")).unwrap(),
        "hello from layer 2\n"
    );
    assert!(!top.join("etc/gone").exists(), "whiteout of etc/gone not applied");

    // A read-only view of the top layer is a read-only bind mount of its tree. (Not removed by
    // hand: nothing roots it, so containerd's GC may take it at any time; the GC below does.)
    let top_key = snapshots
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() == 3 && f[2] == "Committed")
        .map(|f| f[0].to_string())
        .expect("a committed snapshot with a parent");
    let soci_snapshots = |args: &[&str]| {
        let mut c = ctr(&["-n", "k8s.io", "snapshots", "--snapshotter", "soci"]);
        c.args(args);
        c
    };

    // Restarted, the stand-in still has every snapshot (metadata persisted), and containerd
    // reconnects to it on its own (calls fail as Unavailable until it has).
    standin.sigterm();
    notify.expect("STOPPING=1", &mut standin, BOUND);
    assert!(
        standin.wait_exit(BOUND).success(),
        "stand-in exit after SIGTERM; log:\n{}",
        standin.log()
    );
    standin = start_standin("standin-2.log");
    notify.expect("READY=1", &mut standin, BOUND);
    let deadline = Instant::now() + BOUND;
    let usage = loop {
        let out = run_bounded(&mut soci_snapshots(&["usage", &top_key]), BOUND);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "usage after restart: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    // `KEY SIZE INODES`: the top tree has /, etc/ and two files.
    let inodes = usage
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_default();
    assert_eq!(inodes, "4", "usage of {top_key}:\n{usage}");
    let view = run_ok(
        &mut soci_snapshots(&["view", "--mounts", "standin-view", &top_key]),
        BOUND,
    );
    let mounts: serde_json::Value = serde_json::from_str(&view).unwrap_or_else(|e| panic!("{e}: {view}"));
    assert_eq!(mounts[0]["Type"], "bind", "{view}");
    assert_eq!(mounts[0]["Source"], p(&top), "{view}");
    assert_eq!(mounts[0]["Options"], json!(["rbind", "ro"]), "{view}");

    // Removing the image lets containerd's GC remove every snapshot through the stand-in.
    run_ok(
        &mut ctr(&["-n", "k8s.io", "images", "rm", "--sync", IMAGE]),
        Duration::from_secs(60),
    );
    let snapshots_dir = soci_root.join("snapshotter/snapshots");
    let deadline = Instant::now() + Duration::from_secs(20);
    while fs::read_dir(&snapshots_dir).unwrap().count() > 0 {
        assert!(
            Instant::now() < deadline,
            "snapshot directories left 20 s after GC; log:\n{}",
            standin.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = run_ok(&mut soci_snapshots(&["ls"]), BOUND);
    assert_eq!(left.lines().count(), 1, "snapshots left after GC:\n{left}");

    drop(daemon);
    standin.assert_running();
}

// ---------------------------------------------------------------------------------------------
// A small OCI image layout tarball: two gzip'd layers, the second one whiting out a file.

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn tar_of(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match data {
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, name, std::io::empty()).unwrap();
            }
            Some(data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, *data).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = GzEncoder::new(Vec::new(), Compression::default());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

fn oci_image_tar() -> Vec<u8> {
    let layers = [
        tar_of(&[
            ("etc/", None),
            ("etc/standin-hello", Some(b"hello from layer 1\n")),
            ("etc/gone", Some(b"whited out by layer 2\n")),
        ]),
        tar_of(&[
            ("etc/", None),
            ("etc/standin-second", Some(b"hello from layer 2\n")),
            ("etc/.wh.gone", Some(b"")),
        ]),
    ];
    let mut blobs: Vec<Vec<u8>> = Vec::new();
    let mut layer_descs = Vec::new();
    let mut diff_ids = Vec::new();
    for layer in &layers {
        let gz = gzip(layer);
        diff_ids.push(format!("sha256:{}", sha256_hex(layer)));
        layer_descs.push(json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{}", sha256_hex(&gz)),
            "size": gz.len(),
        }));
        blobs.push(gz);
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let config = serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": format!("sha256:{}", sha256_hex(&config)),
            "size": config.len(),
        },
        "layers": layer_descs,
    }))
    .unwrap();
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", sha256_hex(&manifest)),
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": IMAGE,
                "org.opencontainers.image.ref.name": "1",
            },
        }],
    }))
    .unwrap();
    blobs.push(config);
    blobs.push(manifest);

    let mut files: Vec<(String, Vec<u8>)> = vec![
        ("oci-layout".into(), br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
        ("index.json".into(), index),
    ];
    files.extend(
        blobs
            .into_iter()
            .map(|b| (format!("blobs/sha256/{}", sha256_hex(&b)), b)),
    );
    let mut entries: Vec<(&str, Option<&[u8]>)> = vec![("blobs/", None), ("blobs/sha256/", None)];
    entries.extend(files.iter().map(|(n, d)| (n.as_str(), Some(d.as_slice()))));
    tar_of(&entries)
}
