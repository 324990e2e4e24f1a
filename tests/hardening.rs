//! Hostile trees and inputs: what an attacker or an unlucky operator hands the agent. Each case
//! states what must hold (nothing written outside `--root`, …) and checks it on the filesystem.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::archive::sha256sum_line;
use common::real;

const VER: &str = real::SOCI_VERSION;

/// A root under a temp dir, a release archive beside it, and an `outside` directory that
/// nothing may touch.
struct Tree {
    dir: tempfile::TempDir,
}

impl Tree {
    fn new() -> Tree {
        let t = Tree {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(t.outside()).unwrap();
        t.write("/etc/os-release", "ID=debian\nVERSION_ID=\"12\"\n");
        t.write("/etc/containerd/config.toml", "version = 2\n");
        let r = real::soci_release(VER);
        std::fs::write(t.archive(), &r.archive).unwrap();
        std::fs::write(
            t.dir.path().join(format!("{}.sha256sum", r.archive_name)),
            sha256sum_line(&r.archive, &r.archive_name),
        )
        .unwrap();
        t
    }
    /// A tree with a successful install done.
    fn installed() -> Tree {
        let t = Tree::new();
        let out = t.install(&[]);
        assert!(out.status.success(), "the first install: {}", show(&out));
        t
    }
    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    /// A directory beside the root (a relative `../../outside` link from `/etc/x` in the root
    /// would reach it if links were followed on the host).
    fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }
    fn archive(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("soci-snapshotter-{VER}-linux-amd64-static.tar.gz"))
    }
    fn path(&self, node_path: &str) -> PathBuf {
        self.root().join(node_path.trim_start_matches('/'))
    }
    fn write(&self, node_path: &str, text: &str) {
        let p = self.path(node_path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    /// Replaces node directory `node_path` by a symlink to `target`.
    fn link_dir(&self, node_path: &str, target: &Path) {
        let p = self.path(node_path);
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, &p).unwrap();
    }
    fn agent(&self, sub: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(common::agent_bin());
        cmd.arg(sub)
            .arg("--root")
            .arg(self.root())
            .args(["--no-start", "--log-level", "warn"])
            .args(args);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SOCI_AGENT_")) {
            cmd.env_remove(k);
        }
        cmd.output().unwrap()
    }
    fn install(&self, args: &[&str]) -> Output {
        let archive = self.archive();
        let mut all = vec!["--arch", "amd64", "--archive", archive.to_str().unwrap()];
        all.extend_from_slice(args);
        self.agent("install", &all)
    }
}

/// Every file under `dir` with its content.
fn files_under(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            if meta.is_dir() {
                walk(&e.path(), out);
            } else {
                out.insert(e.path(), std::fs::read(e.path()).unwrap_or_default());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, &mut out);
    out
}

fn show(out: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Directories install writes into, each replaced by a link leading out of the root.
const LINKED_DIRS: [&str; 6] = [
    "/etc/containerd",
    "/etc/soci-snapshotter-grpc",
    "/usr/local/bin",
    "/var/lib/soci-agent",
    "/etc/systemd/system",
    "/etc/eks/nodeadm.d",
];

#[test]
fn symlinked_directories_never_lead_writes_out_of_the_root() {
    let mut failures = Vec::new();
    for dir in LINKED_DIRS {
        for absolute in [true, false] {
            let t = Tree::new();
            if dir.starts_with("/etc/eks") {
                t.write("/usr/bin/nodeadm", "#!/bin/sh\n");
                t.write("/etc/eks/containerd-version.txt", "2.2.9\n");
            }
            let target = if absolute {
                // On the build host this is the outside directory; inside the root it must mean
                // <root>/<that path>.
                t.outside()
            } else {
                let depth = dir.matches('/').count();
                PathBuf::from(format!("{}outside", "../".repeat(depth + 1)))
            };
            t.link_dir(dir, &target);
            let out = t.install(&[]);
            let escaped = files_under(&t.outside());
            if !escaped.is_empty() {
                failures.push(format!(
                    "{dir} -> {} wrote outside the root: {:?}\n{}",
                    target.display(),
                    escaped.keys().collect::<Vec<_>>(),
                    show(&out)
                ));
            } else if !out.status.success() && out.status.code() != Some(2) {
                failures.push(format!("{dir} -> {}: {}", target.display(), show(&out)));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_directory_that_becomes_a_link_later_does_not_lead_uninstall_out() {
    let t = Tree::installed();
    // A file outside with the name uninstall --purge would delete, through a link made later.
    let outside_units = t.outside().join("units");
    std::fs::create_dir_all(&outside_units).unwrap();
    for name in [
        "soci-snapshotter.service",
        "soci-snapshotter.socket",
        "soci-agent-boot.service",
    ] {
        std::fs::write(outside_units.join(name), "[Unit]\nDescription=not soci-agent's\n").unwrap();
    }
    let units = t.path("/etc/systemd/system");
    let moved = t.dir.path().join("units-moved");
    std::fs::rename(&units, &moved).unwrap();
    std::os::unix::fs::symlink(&outside_units, &units).unwrap();
    let before = files_under(&t.outside());
    let out = t.agent("uninstall", &["--purge"]);
    assert_eq!(
        files_under(&t.outside()),
        before,
        "uninstall changed files outside the root\n{}",
        show(&out)
    );
    // And the store entry (inside the root) is gone as asked.
    assert!(
        !t.path(&format!("/usr/local/lib/soci-agent/releases/{VER}-amd64"))
            .exists(),
        "{}",
        show(&out)
    );
    let _ = std::fs::set_permissions(&moved, std::fs::Permissions::from_mode(0o755));
}

/// Every directory and file under `dir` that group or others may write.
fn writable_by_others(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            if meta.file_type().is_symlink() {
                continue;
            }
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o022 != 0 {
                out.push(format!("{} {mode:04o}", e.path().display()));
            }
            if meta.is_dir() {
                walk(&e.path(), out);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    out
}

#[test]
fn modes_are_set_explicitly_never_from_the_umask() {
    use std::os::unix::process::CommandExt;
    let t = Tree::new();
    let archive = t.archive();
    let mut cmd = Command::new(common::agent_bin());
    cmd.arg("install")
        .arg("--root")
        .arg(t.root())
        .args(["--no-start", "--log-level", "warn", "--arch", "amd64", "--archive"])
        .arg(&archive);
    // SAFETY: umask is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::stat::umask(nix::sys::stat::Mode::empty());
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let loose = writable_by_others(&t.root());
    assert!(loose.is_empty(), "world- or group-writable under umask 000: {loose:#?}");
}

#[test]
fn a_rewritten_file_keeps_its_owner_and_group() {
    use std::os::unix::fs::MetadataExt;
    let t = Tree::new();
    let config = t.path("/etc/containerd/config.toml");
    std::os::unix::fs::chown(&config, Some(1234), Some(2345)).unwrap();
    let out = t.install(&[]);
    assert!(out.status.success(), "{}", show(&out));
    let meta = std::fs::metadata(&config).unwrap();
    assert!(
        std::fs::read_to_string(&config).unwrap().contains("soci"),
        "the config was rewritten"
    );
    assert_eq!((meta.uid(), meta.gid()), (1234, 2345), "owner and group kept");
}

#[test]
fn a_mounted_image_s_binaries_are_never_run_on_the_build_host() {
    let t = Tree::new();
    let ran = t.dir.path().join("RAN");
    let trap = format!(
        "#!/bin/sh\necho \"$0 $*\" >> {}\necho 'containerd v2.2.9'\n",
        ran.display()
    );
    for bin in [
        "/usr/bin/containerd",
        "/usr/bin/soci-snapshotter-grpc",
        "/usr/local/bin/containerd",
    ] {
        t.write(bin, &trap);
        std::fs::set_permissions(t.path(bin), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let dry = t.install(&["--dry-run", "--containerd-version", "1.7"]);
    let real = t.install(&["--containerd-version", "1.7"]);
    assert!(
        !ran.exists(),
        "install ran programs from inside --root: {}\n{}\n{}",
        std::fs::read_to_string(&ran).unwrap_or_default(),
        show(&dry),
        show(&real)
    );
    assert!(real.status.success(), "{}", show(&real));
}

// ---------------------------------------------------------------------------------------------
// The install lock.

/// The host path of the install lock of the root `t` (named after the root's canonical path).
fn lock_of(t: &Tree) -> PathBuf {
    let canonical = std::fs::canonicalize(t.root()).unwrap();
    let hex = common::archive::sha256_hex(canonical.as_os_str().as_encoded_bytes());
    PathBuf::from(format!("/run/soci-agent/roots/{}.lock", &hex[..16]))
}

#[test]
fn concurrent_installs_into_one_root_serialize_and_converge() {
    for round in 0..3 {
        let t = Tree::new();
        let runs: Vec<Output> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4).map(|_| s.spawn(|| t.install(&["--output", "json"]))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for out in &runs {
            assert!(out.status.success(), "round {round}: {}", show(out));
        }
        // Converged: one more run changes nothing.
        let again = t.install(&["--output", "json"]);
        let report: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
        assert_eq!(
            report["changed"],
            false,
            "round {round}: not converged\n{}",
            show(&again)
        );
    }
}

#[test]
fn the_lock_is_private_and_a_fifo_in_its_place_is_refused() {
    let t = Tree::installed();
    let lock = lock_of(&t);
    assert_eq!(common::mode_of(&lock), 0o600);
    assert_eq!(common::mode_of(lock.parent().unwrap()), 0o700);
    assert!(
        !t.path("/run").exists(),
        "the lock of a mounted root is not written into it"
    );

    let t = Tree::new();
    let _ = std::fs::remove_file(lock_of(&t));
    nix::unistd::mkfifo(&lock_of(&t), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let out = t.install(&[]);
    let _ = std::fs::remove_file(lock_of(&t));
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("not a regular file (a FIFO)"),
        "{}",
        show(&out)
    );
    assert!(
        !t.path("/etc/soci-snapshotter-grpc/config.toml").exists(),
        "changed something"
    );
}

#[test]
fn a_held_lock_is_waited_for_with_a_deadline_that_names_the_holder() {
    use std::io::Write;
    let t = Tree::installed();
    let mut file = std::fs::OpenOptions::new().write(true).open(lock_of(&t)).unwrap();
    file.set_len(0).unwrap();
    writeln!(file, "4242").unwrap();
    let _held = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive).unwrap();
    let mut cmd = Command::new(common::agent_bin());
    let archive = t.archive();
    cmd.arg("install")
        .arg("--root")
        .arg(t.root())
        .args(["--no-start", "--log-level", "warn", "--arch", "amd64", "--archive"])
        .arg(&archive)
        .env("SOCI_AGENT_LOCK_TIMEOUT", "0.5");
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("still held by pid 4242"), "{}", show(&out));
}

// ---------------------------------------------------------------------------------------------
// Bad flags: a clear error, exit 2, nothing written.

#[test]
fn a_bad_log_level_or_a_missing_root_is_a_usage_error() {
    let t = Tree::new();
    let before = files_under(&t.root());
    let bad_level = Command::new(common::agent_bin())
        .args(["install", "--no-start", "--log-level", "bogus[", "--root"])
        .arg(t.root())
        .output()
        .unwrap();
    assert_eq!(bad_level.status.code(), Some(2), "{}", show(&bad_level));
    assert!(String::from_utf8_lossy(&bad_level.stderr).contains("not a log level"));
    assert_eq!(files_under(&t.root()), before);
    let missing = t.dir.path().join("nonexistent");
    for sub in ["install", "uninstall", "boot", "doctor", "prefetch"] {
        let out = Command::new(common::agent_bin())
            .arg(sub)
            .arg("--root")
            .arg(&missing)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{sub}: {}", show(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no such directory"),
            "{sub}: {}",
            show(&out)
        );
        assert!(!missing.exists(), "{sub} created the missing root");
    }
}

/// Every flag of every subcommand fed hostile values: never a panic (exit 101/134), and a refused
/// value is exit 2. `(subcommand, flag)` pairs that take a value.
const VALUED_FLAGS: &[(&str, &str)] = &[
    ("install", "--soci-version"),
    ("install", "--release-url"),
    ("install", "--flavor"),
    ("install", "--sha256"),
    ("install", "--arch"),
    ("install", "--soci-root"),
    ("install", "--max-concurrent-downloads"),
    ("install", "--concurrent-download-chunk-size"),
    ("install", "--decompressor"),
    ("install", "--containerd-config"),
    ("install", "--containerd-version"),
    ("install", "--textfile-dir"),
    ("install", "--http-timeout"),
    ("install", "--retries"),
    ("boot", "--timeout"),
    ("boot", "--pause-archive"),
    ("boot", "--textfile-dir"),
    ("doctor", "--soci-root"),
    ("doctor", "--containerd-config"),
    ("prefetch", "--timeout-per-image"),
    ("prefetch", "--concurrency"),
];

const HOSTILE: &[&str] = &[
    "",
    "relative/dir",
    "/x\ny",
    "nan",
    "inf",
    "-inf",
    "1e309",
    "-1",
    "99999999999999999999",
    "%h$HOME",
];

#[test]
fn hostile_flag_values_never_panic() {
    let t = Tree::new();
    let mut panics = Vec::new();
    for (sub, flag) in VALUED_FLAGS {
        for value in HOSTILE {
            let out = Command::new(common::agent_bin())
                .arg(sub)
                .arg("--root")
                .arg(t.root())
                .arg(format!("{flag}={value}"))
                .args(if *sub == "install" {
                    &["--no-start", "--dry-run"][..]
                } else {
                    &[][..]
                })
                .args(if *sub == "doctor" { &["--no-live"][..] } else { &[][..] })
                .env("SOCI_AGENT_LOCK_TIMEOUT", "1")
                .output()
                .unwrap();
            let code = out.status.code();
            if code.is_none() || code == Some(101) || code == Some(134) {
                panics.push(format!("{sub} {flag}={value:?}: {}", show(&out)));
            }
        }
    }
    assert!(panics.is_empty(), "{} panics:\n{}", panics.len(), panics.join("\n"));
}

#[test]
fn a_rewritten_file_keeps_its_mode() {
    let t = Tree::new();
    let config = t.path("/etc/containerd/config.toml");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    for run in ["install", "re-run"] {
        let out = t.install(&[]);
        assert!(out.status.success(), "{run}: {}", show(&out));
        assert_eq!(common::mode_of(&config), 0o600, "{run}: the mode changed");
    }
    assert!(std::fs::read_to_string(&config).unwrap().contains("soci"));
}

#[test]
fn values_that_would_inject_into_a_unit_file_are_refused() {
    let t = Tree::new();
    let before = files_under(&t.root());
    for root in [
        "/var/lib/x\nExecStartPre=/bin/touch /tmp/INJ",
        "relative/soci",
        "/var/lib/../etc",
    ] {
        let out = t.install(&["--soci-root", root]);
        assert_eq!(out.status.code(), Some(2), "--soci-root {root:?}: {}", show(&out));
    }
    for (flag, value) in [
        ("--release-url", "http://[::1"),
        ("--textfile-dir", ""),
        ("--textfile-dir", "relative/dir"),
    ] {
        let out = t.install(&[flag, value]);
        assert_eq!(out.status.code(), Some(2), "{flag} {value:?}: {}", show(&out));
    }
    assert_eq!(files_under(&t.root()), before, "a refused run changed files");
    // Unusual but valid paths are written quoted and escaped, never split or expanded.
    let out = t.install(&["--soci-root", "/var/lib/with space/%h"]);
    assert!(out.status.success(), "{}", show(&out));
    let unit = std::fs::read_to_string(t.path("/etc/systemd/system/soci-snapshotter.service")).unwrap();
    assert!(
        unit.contains("--root \"/var/lib/with space/%%h\"")
            && unit.contains("RequiresMountsFor=\"/var/lib/with space/%%h\""),
        "{unit}"
    );
}

#[test]
fn uninstall_leaves_a_file_another_tool_rewrote() {
    let t = Tree::installed();
    let socket = t.path("/etc/systemd/system/soci-snapshotter.socket");
    let theirs = "[Unit]\nDescription=rewritten by another tool\n\n[Socket]\nListenStream=/run/other.sock\n";
    std::fs::write(&socket, theirs).unwrap();
    let out = t.agent("uninstall", &[]);
    assert!(out.status.success(), "{}", show(&out));
    assert_eq!(
        std::fs::read_to_string(&socket).unwrap(),
        theirs,
        "another tool's file was removed"
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("left /etc/systemd/system/soci-snapshotter.socket in place"),
        "{}",
        show(&out)
    );
    // What is still soci-agent's own is gone.
    assert!(!t.path("/etc/systemd/system/soci-snapshotter.service").exists());
    assert!(!t.path("/etc/soci-snapshotter-grpc/config.toml").exists());
}

/// Values that are refused outright: exit 2 with the flag named, nothing written.
#[test]
fn bad_flag_values_are_usage_errors_that_change_nothing() {
    let t = Tree::new();
    let before = files_under(&t.root());
    let cases: &[(&str, &str, &str)] = &[
        ("boot", "--timeout", "nan"),
        ("boot", "--timeout", "1e309"),
        ("boot", "--textfile-dir", ""),
        ("boot", "--textfile-dir", "relative/dir"),
        ("doctor", "--soci-root", "relative/soci"),
        ("doctor", "--containerd-config", "etc/containerd/config.toml"),
        ("install", "--soci-root", "/var/lib/x\nExecStartPre=/bin/true"),
        ("install", "--release-url", "http://[::1"),
        ("install", "--textfile-dir", ""),
    ];
    for (sub, flag, value) in cases {
        let out = Command::new(common::agent_bin())
            .arg(sub)
            .arg("--root")
            .arg(t.root())
            .arg(format!("{flag}={value}"))
            .args(if *sub == "install" {
                &["--no-start"][..]
            } else {
                &[][..]
            })
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{sub} {flag}={value:?}: {}", show(&out));
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            said.contains(flag),
            "{sub} {flag}={value:?} does not name the flag: {said}"
        );
    }
    assert_eq!(files_under(&t.root()), before, "a refused run changed files");
}
