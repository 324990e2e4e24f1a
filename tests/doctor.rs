//! `soci-agent doctor` as a user runs it: node trees under `--root` (built by
//! `soci-agent install`, then broken one way per case), `--output json`, and
//! the verdict of each check asserted by id. The live checks run against the
//! REAL containerd v2.4.2 and SOCI v0.16.1 (the rig's builds) started on
//! private paths, with and without a proxy plugin.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use common::archive::{oci_image_tar, standard_release};
use common::booted::Booted;
use common::containerd::{Containerd, Options, Soci};
use common::real;
use common::tree::{DEBIAN_CONTAINERD_DEFAULT as DEBIAN_DEFAULT, Tree as Node};
use serde_json::Value;

const VER: &str = "0.16.1";
const ARCHIVE: &str = "soci-snapshotter-0.16.1-linux-amd64-static.tar.gz";
const V3_PLAIN: &str = include_str!("data/doctor/containerd-v3-plain.toml");
const V3_WIRED: &str = include_str!("data/doctor/containerd-v3-wired.toml");
const V3_TRANSFER: &str = include_str!("data/doctor/containerd-v3-transfer.toml");
const AL2023_UNIT: &str = include_str!("data/doctor/al2023-soci-snapshotter.service");
const FAST_IMAGE_PULL: &str = include_str!("data/doctor/nodeconfig-fast-image-pull.yaml");
const USER_ANCHORS: &str = include_str!("data/doctor/nodeconfig-user-anchors.yaml");
const BOOT_FAILED: &str = include_str!("data/doctor/boot-report-failed.json");
const INSTALL_FAILED: &str = include_str!("data/doctor/install-report-failed.json");

const SOCI_CONFIG: &str = "/etc/soci-snapshotter-grpc/config.toml";
const CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
const SOCI_SOCKET: &str = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock";
const PAUSE_IMAGE: &str = "localhost/kubernetes/pause:latest";

/// The agent's runs on a node tree (`Node::plain()`, `Node::nodeadm(..)`, `Node::debian()`).
impl Node {
    /// Replaces `from` (which must be there) with `to` in a node file.
    fn edit(&self, node_path: &str, from: &str, to: &str) {
        let text = self.read(node_path);
        assert!(text.contains(from), "{node_path} has no {from:?}:\n{text}");
        self.write(node_path, text.replacen(from, to, 1), 0o644);
    }
    /// Saves a run report as the newest of its command.
    fn report(&self, command: &str, json: &str) {
        let millis = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() + 60_000;
        self.write(
            &format!("/var/lib/soci-agent/reports/{command}-{millis}.json"),
            json,
            0o644,
        );
    }
    /// `soci-agent install --no-start --arch amd64 --archive <standard release>`; must succeed.
    fn install(&self, args: &[&str]) {
        let archive = self.put_archive(ARCHIVE, &standard_release(VER));
        let out = agent(&["install", "--no-start", "--arch", "amd64"])
            .arg("--root")
            .arg(self.root())
            .arg("--archive")
            .arg(&archive)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "install failed:\n{}", show(&out));
    }
    /// A copy of the whole tree (links kept as links).
    fn copy(&self) -> Node {
        let n = Node::empty();
        let st = Command::new("cp")
            .arg("-a")
            .arg(self.root())
            .arg(n.root())
            .status()
            .unwrap();
        assert!(st.success());
        n
    }
    /// `soci-agent doctor --root <root> --output json <args>`.
    fn doctor(&self, args: &[&str]) -> Doctor {
        let out = agent(&["doctor", "--output", "json"])
            .arg("--root")
            .arg(self.root())
            .args(args)
            .output()
            .unwrap();
        Doctor::parse(out)
    }
    /// Doctor on the file checks only.
    fn files(&self) -> Doctor {
        self.doctor(&["--no-live"])
    }
}

/// The agent binary with a clean environment (no SOCI_AGENT_* from the caller).
fn agent(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_soci-agent"));
    cmd.args(args).args(["--log-level", "warn"]).stdin(Stdio::null());
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SOCI_AGENT_")) {
        cmd.env_remove(k);
    }
    cmd
}

fn show(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

struct Doctor {
    out: Output,
    report: Value,
}

impl Doctor {
    /// The report of a doctor run; panics unless its stdout is JSON.
    fn parse(out: Output) -> Doctor {
        let report = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("doctor stdout is not JSON ({e}):\n{}", show(&out)));
        Doctor { out, report }
    }
    fn check(&self, id: &str) -> &Value {
        let checks = self.report["checks"].as_array().expect("checks array");
        checks.iter().find(|c| c["id"] == id).unwrap_or_else(|| {
            let ids: Vec<&str> = checks.iter().filter_map(|c| c["id"].as_str()).collect();
            panic!("no check {id}; have {ids:?}")
        })
    }
    fn code(&self) -> i32 {
        self.out.status.code().expect("exited")
    }
    /// `id` has `verdict` and its evidence or advice contains `contains`.
    fn expect(&self, id: &str, verdict: &str, contains: &str) -> Result<(), String> {
        let c = self.check(id);
        let text = format!(
            "{} {}",
            c["evidence"].as_str().unwrap_or(""),
            c["advice"].as_str().unwrap_or("")
        );
        if c["verdict"] != verdict || !text.contains(contains) {
            return Err(format!("{id}: want {verdict} with {contains:?}, got {c}"));
        }
        if c["verdict"] != "ok" && c["verdict"] != "skip" && !c["advice"].is_string() {
            return Err(format!("{id}: a {verdict} without advice: {c}"));
        }
        let want_code = i32::from(self.report["summary"]["fail"].as_u64() != Some(0));
        if self.code() != want_code {
            return Err(format!("exit {} but summary {}", self.code(), self.report["summary"]));
        }
        Ok(())
    }
    fn assert(&self, id: &str, verdict: &str, contains: &str) {
        if let Err(e) = self.expect(id, verdict, contains) {
            panic!(
                "{e}\nfull report:\n{}",
                serde_json::to_string_pretty(&self.report).unwrap()
            );
        }
    }
    fn failing(&self) -> Vec<String> {
        self.report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["verdict"] == "fail")
            .map(|c| c.to_string())
            .collect()
    }
}

/// One way to break (or fix) a healthy tree, and the verdict it must give.
#[derive(Clone)]
struct Case {
    name: &'static str,
    mutate: fn(&Node),
    id: &'static str,
    verdict: &'static str,
    contains: &'static str,
}

/// Runs every case on its own copy of `template`; reports all mismatches at once.
fn run_cases(template: &Node, cases: &[Case]) {
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .map(|case| {
                s.spawn(move || {
                    let n = template.copy();
                    (case.mutate)(&n);
                    n.files()
                        .expect(case.id, case.verdict, case.contains)
                        .map_err(|e| format!("[{}] {e}", case.name))
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().unwrap().err()).collect()
    });
    assert!(
        errors.is_empty(),
        "{} case(s) failed:\n{}",
        errors.len(),
        errors.join("\n")
    );
}

fn installed_plain() -> Node {
    let n = Node::plain();
    n.install(&[]);
    n
}

/// A daemon script printing `out` for --version, at a node path.
fn fake_daemon(n: &Node, node_path: &str, out: &str) {
    n.write(node_path, format!("#!/bin/sh\necho \"{out}\"\n"), 0o755);
}

/// A drop-in making the unit run `line`.
fn exec_dropin(n: &Node, line: &str) {
    n.write(
        "/etc/systemd/system/soci-snapshotter.service.d/60-local.conf",
        format!("[Service]\nExecStart=\nExecStart={line}\n"),
        0o644,
    );
}

#[test]
fn a_fresh_install_has_no_failing_check() {
    let n = installed_plain();
    let d = n.files();
    assert!(d.failing().is_empty(), "failing checks:\n{}", d.failing().join("\n"));
    assert_eq!(d.code(), 0, "{}", show(&d.out));
    assert_fresh_checks_are_ok(&d);
    assert_fresh_checks_warn_or_skip(&d);
    assert_summary_counts_every_check(&d);
    assert_status_text_has_a_headline_and_rows(&n);
}

/// Every check of a fresh install that has all it needs is ok, and names its evidence.
fn assert_fresh_checks_are_ok(d: &Doctor) {
    for id in [
        "host.os",
        "host.arch",
        "host.disk",
        "agent.record",
        "soci.binary",
        "soci.version",
        "soci.digest",
        "soci.other-copies",
        "soci-config.parse",
        "soci-config.parallel",
        "soci-config.keys",
        "soci-config.limits",
        "soci-config.chunk-size",
        "soci-config.decompressor",
        "soci-config.content-store",
        "containerd.config-version",
        "containerd.proxy-plugin",
        "containerd.exports-root",
        "containerd.snapshotter",
        "containerd.snapshot-annotations",
        "kubelet.image-service-endpoint",
        "systemd.containerd-dropin",
        "recent.install",
    ] {
        d.assert(id, "ok", "");
    }
    d.assert("soci.version", "ok", "SOCI 0.16.1");
    d.assert("soci.digest", "ok", "release.json");
    d.assert("soci-config.chunk-size", "ok", "16777216 bytes");
    d.assert("recent.install", "ok", "phases:");
}

/// What a fresh install cannot have yet: enabled units, a containerd binary, a bus, sockets.
fn assert_fresh_checks_warn_or_skip(d: &Doctor) {
    // install --no-start enables nothing; the tree has no containerd binary.
    d.assert("systemd.soci-service", "warn", "systemctl enable");
    d.assert("systemd.soci-socket", "warn", "systemctl enable");
    d.assert("systemd.boot-unit", "warn", "systemctl enable soci-agent-boot.service");
    d.assert("containerd.version", "warn", "no containerd binary");
    for id in [
        "host.size",
        "host.storage",
        "systemd.bus",
        "live.soci-socket",
        "live.containerd-soci",
    ] {
        d.assert(id, "skip", "");
    }
    d.assert("nodeadm.dropin", "skip", "not a nodeadm host");
}

/// The summary's counts add up to the number of checks.
fn assert_summary_counts_every_check(d: &Doctor) {
    let s = &d.report["summary"];
    let total: u64 = ["ok", "warn", "fail", "skip"]
        .iter()
        .map(|k| s[k].as_u64().unwrap())
        .sum();
    assert_eq!(total as usize, d.report["checks"].as_array().unwrap().len());
}

/// The same in text: a headline and one row per check.
fn assert_status_text_has_a_headline_and_rows(n: &Node) {
    let out = agent(&["status", "--no-live"])
        .arg("--root")
        .arg(n.root())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("soci-agent doctor: 0 fail, "), "{text}");
    assert!(text.lines().any(|l| l.starts_with("ok      soci.digest")), "{text}");
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("-> systemctl enable")),
        "{text}"
    );
}

#[test]
fn soci_binary_and_config_failures() {
    let template = installed_plain();
    let cases = [
        soci_binary_cases(),
        soci_version_cases(),
        soci_config_value_cases(),
        soci_config_file_cases(),
        agent_record_and_report_cases(),
    ]
    .concat();
    run_cases(&template, &cases);
}

/// The daemon binary in the store, its link and its unit.
fn soci_binary_cases() -> Vec<Case> {
    vec![
        Case {
            name: "store binary changed",
            mutate: |n| {
                let p = n.path("/usr/local/lib/soci-agent/releases/0.16.1-amd64/soci-snapshotter-grpc");
                let mut text = std::fs::read_to_string(&p).unwrap();
                text.push_str("# tampered\n");
                std::fs::write(p, text).unwrap();
            },
            id: "soci.digest",
            verdict: "fail",
            contains: "changed on disk",
        },
        Case {
            name: "link removed",
            mutate: |n| n.remove("/usr/local/bin/soci-snapshotter-grpc"),
            id: "soci.binary",
            verdict: "fail",
            contains: "No such file",
        },
        Case {
            name: "unit removed",
            mutate: |n| n.remove("/etc/systemd/system/soci-snapshotter.service"),
            id: "soci.binary",
            verdict: "fail",
            contains: "no soci-snapshotter.service in /etc/systemd/system",
        },
    ]
}

/// Which binary the unit runs, its version, and other copies on the host.
fn soci_version_cases() -> Vec<Case> {
    vec![
        Case {
            // Under a --root that is not this host, a binary is never run (it would run on the
            // build host): its version is unknown, not guessed from the record.
            name: "another binary via drop-in under a mounted root",
            mutate: |n| {
                fake_daemon(
                    n,
                    "/opt/old/soci-snapshotter-grpc",
                    "soci-snapshotter-grpc version v0.10.0 abc",
                );
                exec_dropin(n, "/opt/old/soci-snapshotter-grpc --address fd://");
            },
            id: "soci.version",
            verdict: "skip",
            contains: "/opt/old/soci-snapshotter-grpc: not run: --root is not this host",
        },
        Case {
            name: "drop-in runs another binary than the record's",
            mutate: |n| {
                fake_daemon(
                    n,
                    "/usr/bin/soci-snapshotter-grpc",
                    "soci-snapshotter-grpc version v0.11.1 rpm",
                );
                exec_dropin(n, "/usr/bin/soci-snapshotter-grpc --address fd://");
            },
            id: "soci.digest",
            verdict: "fail",
            contains: "the install record says /usr/local/bin/soci-snapshotter-grpc",
        },
        Case {
            name: "the record's version under a mounted root",
            mutate: |_| {},
            id: "soci.version",
            verdict: "ok",
            contains: "(from the install record; not run",
        },
        Case {
            name: "RPM copy besides ours",
            mutate: |n| {
                fake_daemon(
                    n,
                    "/usr/bin/soci-snapshotter-grpc",
                    "soci-snapshotter-grpc version v0.9.0 rpm",
                )
            },
            id: "soci.other-copies",
            verdict: "ok",
            contains: "/usr/bin/soci-snapshotter-grpc (SOCI version unknown, the distribution's (RPM) copy)",
        },
    ]
}

/// Values in SOCI's config.toml: key names, parallel mode, limits, chunk size.
fn soci_config_value_cases() -> Vec<Case> {
    vec![
        Case {
            name: "typo in a key",
            mutate: |n| {
                n.edit(
                    SOCI_CONFIG,
                    "max_concurrent_downloads_per_image",
                    "max_concurent_downloads_per_image",
                )
            },
            id: "soci-config.keys",
            verdict: "warn",
            contains: "did you mean max_concurrent_downloads_per_image?",
        },
        Case {
            name: "parallel mode off",
            mutate: |n| n.edit(SOCI_CONFIG, "\nenable = true", "\nenable = false"),
            id: "soci-config.parallel",
            verdict: "fail",
            contains: "= false",
        },
        Case {
            name: "per-image above global",
            mutate: |n| {
                n.edit(
                    SOCI_CONFIG,
                    "max_concurrent_downloads = -1",
                    "max_concurrent_downloads = 10",
                )
            },
            id: "soci-config.limits",
            verdict: "fail",
            contains: "exceeds --max-concurrent-downloads 10",
        },
        Case {
            name: "MiB chunk size",
            mutate: |n| n.edit(SOCI_CONFIG, "\"16mb\"", "\"16MiB\""),
            id: "soci-config.chunk-size",
            verdict: "fail",
            contains: "use 16mb",
        },
    ]
}

/// The decompressor, the content store, and a config that is broken or missing.
fn soci_config_file_cases() -> Vec<Case> {
    vec![
        Case {
            name: "decompressor missing",
            mutate: |n| n.remove("/usr/bin/unpigz"),
            id: "soci-config.decompressor",
            verdict: "fail",
            contains: "refuses to start",
        },
        Case {
            name: "no decompressor configured",
            mutate: |n| {
                let text = n.read(SOCI_CONFIG);
                let cut = text
                    .find("\n[pull_modes.parallel_pull_unpack.decompress_streams.gzip]")
                    .unwrap();
                n.write(SOCI_CONFIG, &text[..cut], 0o644);
            },
            id: "soci-config.decompressor",
            verdict: "warn",
            contains: "though /usr/bin/unpigz exists",
        },
        Case {
            name: "soci content store without discard",
            mutate: |n| {
                n.edit(SOCI_CONFIG, "type = \"containerd\"", "type = \"soci\"");
                n.edit(
                    SOCI_CONFIG,
                    "discard_unpacked_layers = true",
                    "discard_unpacked_layers = false",
                );
            },
            id: "soci-config.content-store",
            verdict: "fail",
            contains: "parallel pull/unpack mode needs",
        },
        Case {
            name: "malformed config",
            mutate: |n| n.write(SOCI_CONFIG, "[content_store\n", 0o644),
            id: "soci-config.parse",
            verdict: "fail",
            contains: "not valid TOML",
        },
        Case {
            name: "config missing",
            mutate: |n| n.remove(SOCI_CONFIG),
            id: "soci-config.parse",
            verdict: "fail",
            contains: "does not exist",
        },
    ]
}

/// The install record and the reports of earlier runs.
fn agent_record_and_report_cases() -> Vec<Case> {
    vec![
        Case {
            name: "invalid record",
            mutate: |n| n.write("/var/lib/soci-agent/record.json", "{not json", 0o644),
            id: "agent.record",
            verdict: "fail",
            contains: "not valid JSON",
        },
        Case {
            name: "boot tasks failed",
            mutate: |n| n.report("boot", BOOT_FAILED),
            id: "recent.boot",
            verdict: "fail",
            contains: "pause-image failed 2.5s",
        },
        Case {
            name: "last install failed",
            mutate: |n| n.report("install", INSTALL_FAILED),
            id: "recent.install",
            verdict: "warn",
            contains: "job failed",
        },
    ]
}

#[test]
fn containerd_kubelet_and_systemd_failures() {
    let template = installed_plain();
    let cases = [
        containerd_proxy_plugin_cases(),
        containerd_cri_cases(),
        containerd_version_cases(),
        containerd_pull_path_cases(),
        kubelet_cases(),
        systemd_dropin_and_enable_cases(),
        systemd_socket_and_boot_unit_cases(),
    ]
    .concat();
    run_cases(&template, &cases);
}

/// The proxy plugin: its address, its presence and the root it exports.
fn containerd_proxy_plugin_cases() -> Vec<Case> {
    vec![
        Case {
            name: "proxy address elsewhere",
            mutate: |n| {
                n.edit(
                    CONTAINERD_CONFIG,
                    &format!("address = \"{SOCI_SOCKET}\""),
                    "address = \"/run/other.sock\"",
                )
            },
            id: "containerd.proxy-plugin",
            verdict: "fail",
            contains: "but the daemon serves /run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock",
        },
        Case {
            name: "no proxy plugin",
            mutate: |n| n.write(CONTAINERD_CONFIG, DEBIAN_DEFAULT, 0o644),
            id: "containerd.proxy-plugin",
            verdict: "fail",
            contains: "no [proxy_plugins.soci]",
        },
        Case {
            name: "exports root differs",
            mutate: |n| {
                n.edit(
                    CONTAINERD_CONFIG,
                    "root = \"/var/lib/soci-snapshotter-grpc\"",
                    "root = \"/data/soci\"",
                )
            },
            id: "containerd.exports-root",
            verdict: "fail",
            contains: "= \"/data/soci\"",
        },
        Case {
            name: "daemon root from the unit's ExecStart",
            mutate: |n| {
                exec_dropin(
                    n,
                    "/usr/local/bin/soci-snapshotter-grpc --address fd:// --root /data/soci",
                )
            },
            id: "containerd.exports-root",
            verdict: "fail",
            contains: "--root in ExecStart of /etc/systemd/system/soci-snapshotter.service.d/60-local.conf",
        },
    ]
}

/// The CRI plugin's snapshotter and annotations, and a config that does not parse.
fn containerd_cri_cases() -> Vec<Case> {
    vec![
        Case {
            name: "CRI snapshotter overlayfs",
            mutate: |n| {
                n.edit(
                    CONTAINERD_CONFIG,
                    "snapshotter = \"soci\"",
                    "snapshotter = \"overlayfs\"",
                )
            },
            id: "containerd.snapshotter",
            verdict: "fail",
            contains: "= \"overlayfs\"",
        },
        Case {
            name: "annotations disabled",
            mutate: |n| {
                n.edit(
                    CONTAINERD_CONFIG,
                    "disable_snapshot_annotations = false",
                    "disable_snapshot_annotations = true",
                )
            },
            id: "containerd.snapshot-annotations",
            verdict: "fail",
            contains: "= true",
        },
        Case {
            name: "malformed containerd config",
            mutate: |n| n.write(CONTAINERD_CONFIG, "version = 2\n[plugins\n", 0o644),
            id: "containerd.config-version",
            verdict: "fail",
            contains: "cannot parse",
        },
    ]
}

/// containerd's version against the config's version.
fn containerd_version_cases() -> Vec<Case> {
    vec![
        Case {
            name: "v3 config on containerd 1.7",
            mutate: |n| {
                n.write("/etc/eks/containerd-version.txt", "1.7.27\n", 0o644);
                n.write(CONTAINERD_CONFIG, V3_WIRED, 0o644);
            },
            id: "containerd.config-version",
            verdict: "fail",
            contains: "reads at most version 2",
        },
        Case {
            name: "v2 config on containerd 2.2",
            mutate: |n| n.write("/etc/eks/containerd-version.txt", "2.2.1\n", 0o644),
            id: "containerd.config-version",
            verdict: "warn",
            contains: "migrates version 2",
        },
        Case {
            name: "old containerd",
            mutate: |n| n.write("/etc/eks/containerd-version.txt", "1.7.2\n", 0o644),
            id: "containerd.version",
            verdict: "warn",
            contains: "1.7.16",
        },
        Case {
            name: "current containerd",
            mutate: |n| n.write("/etc/eks/containerd-version.txt", "1.7.27\n", 0o644),
            id: "containerd.version",
            verdict: "ok",
            contains: "containerd 1.7.27 (from /etc/eks/containerd-version.txt)",
        },
    ]
}

/// containerd 2.2's pull paths: local, through the transfer service, per runtime class.
fn containerd_pull_path_cases() -> Vec<Case> {
    vec![
        Case {
            name: "2.2 local pull path",
            mutate: |n| {
                n.write("/etc/eks/containerd-version.txt", "2.2.1\n", 0o644);
                n.write(CONTAINERD_CONFIG, V3_WIRED, 0o644);
            },
            id: "containerd.pull-path",
            verdict: "ok",
            contains: "local pull path (disable_snapshot_annotations = false, discard_unpacked_layers = true",
        },
        Case {
            name: "2.2 transfer service into soci",
            mutate: |n| {
                n.write("/etc/eks/containerd-version.txt", "2.2.1\n", 0o644);
                n.write(CONTAINERD_CONFIG, V3_TRANSFER, 0o644);
            },
            id: "containerd.pull-path",
            verdict: "ok",
            contains: "go through the transfer service",
        },
        Case {
            name: "2.2 transfer service into overlayfs",
            mutate: |n| {
                n.write("/etc/eks/containerd-version.txt", "2.2.1\n", 0o644);
                n.write(
                    CONTAINERD_CONFIG,
                    V3_TRANSFER.replace(
                        "platform = \"linux\"\nsnapshotter = \"soci\"",
                        "platform = \"linux\"\nsnapshotter = \"overlayfs\"",
                    ),
                    0o644,
                );
            },
            id: "containerd.pull-path",
            verdict: "fail",
            contains: "images land in overlayfs",
        },
        Case {
            name: "runtime class unpacking elsewhere",
            mutate: |n| {
                n.write("/etc/eks/containerd-version.txt", "2.2.1\n", 0o644);
                let extra =
                    "\n[plugins.'io.containerd.cri.v1.images'.runtime_platforms.kata]\nsnapshotter = \"overlayfs\"\n";
                n.write(CONTAINERD_CONFIG, format!("{V3_WIRED}{extra}"), 0o644);
            },
            id: "containerd.runtime-platforms",
            verdict: "warn",
            contains: "kata -> overlayfs",
        },
    ]
}

/// kubelet's imageServiceEndpoint: its drop-in, a later one, the keychain behind it.
fn kubelet_cases() -> Vec<Case> {
    vec![
        Case {
            name: "kubelet drop-in removed",
            mutate: |n| n.remove("/etc/kubernetes/kubelet/config.json.d/50-soci-agent.conf"),
            id: "kubelet.image-service-endpoint",
            verdict: "fail",
            contains: "imageServiceEndpoint unset",
        },
        Case {
            name: "a later kubelet drop-in wins",
            mutate: |n| {
                n.write(
                    "/etc/kubernetes/kubelet/config.json.d/90-other.conf",
                    "{\"imageServiceEndpoint\": \"unix:///run/containerd/containerd.sock\"}\n",
                    0o644,
                )
            },
            id: "kubelet.image-service-endpoint",
            verdict: "fail",
            contains: "90-other.conf",
        },
        Case {
            name: "endpoint set, keychain off",
            mutate: |n| n.edit(SOCI_CONFIG, "enable_keychain = true", "enable_keychain = false"),
            id: "kubelet.image-service-endpoint",
            verdict: "fail",
            contains: "serves no image service",
        },
        Case {
            name: "no kubelet",
            mutate: |n| n.remove("/etc/kubernetes"),
            id: "kubelet.image-service-endpoint",
            verdict: "skip",
            contains: "no kubelet configuration",
        },
    ]
}

/// containerd's drop-in ordering it after SOCI, and the units enabled.
fn systemd_dropin_and_enable_cases() -> Vec<Case> {
    vec![
        Case {
            name: "containerd drop-in removed",
            mutate: |n| n.remove("/etc/systemd/system/containerd.service.d/10-soci-snapshotter.conf"),
            id: "systemd.containerd-dropin",
            verdict: "fail",
            contains: "may start before or without SOCI",
        },
        Case {
            name: "containerd drop-in without After",
            mutate: |n| {
                n.write(
                    "/etc/systemd/system/containerd.service.d/10-soci-snapshotter.conf",
                    "[Unit]\nRequires=soci-snapshotter.service\n",
                    0o644,
                )
            },
            id: "systemd.containerd-dropin",
            verdict: "fail",
            contains: "but no After=",
        },
        Case {
            name: "units enabled",
            mutate: |n| {
                n.symlink(
                    "/etc/systemd/system/soci-snapshotter.service",
                    "/etc/systemd/system/multi-user.target.wants/soci-snapshotter.service",
                );
                n.symlink(
                    "/etc/systemd/system/soci-snapshotter.socket",
                    "/etc/systemd/system/sockets.target.wants/soci-snapshotter.socket",
                );
            },
            id: "systemd.soci-service",
            verdict: "ok",
            contains: "multi-user.target.wants/soci-snapshotter.service",
        },
    ]
}

/// The socket unit and the boot unit (needed where a pause archive is loaded).
fn systemd_socket_and_boot_unit_cases() -> Vec<Case> {
    vec![
        Case {
            name: "socket unit removed under fd://",
            mutate: |n| n.remove("/etc/systemd/system/soci-snapshotter.socket"),
            id: "systemd.soci-socket",
            verdict: "warn",
            contains: "no soci-snapshotter.socket",
        },
        Case {
            name: "boot unit removed",
            mutate: |n| n.remove("/etc/systemd/system/soci-agent-boot.service"),
            id: "systemd.boot-unit",
            verdict: "fail",
            contains: "no soci-agent-boot.service",
        },
        Case {
            name: "pause archive, boot unit never runs",
            mutate: |n| n.write("/etc/eks/pause.tar", "", 0o644),
            id: "systemd.boot-unit",
            verdict: "fail",
            contains: "NotReady",
        },
        Case {
            name: "boot unit wanted by kubelet",
            mutate: |n| {
                n.write("/etc/eks/pause.tar", "", 0o644);
                n.write(
                    "/etc/systemd/system/kubelet.service.d/50-soci-agent-boot.conf",
                    "[Unit]\nWants=soci-agent-boot.service\nAfter=soci-agent-boot.service\n",
                    0o644,
                );
            },
            id: "systemd.boot-unit",
            verdict: "ok",
            contains: "wanted by kubelet.service",
        },
    ]
}

#[test]
fn nodeadm_hosts() {
    let template = Node::nodeadm("2.2.1");
    template.install(&[]);
    assert_a_fresh_nodeadm_install_passes(&template);
    let cases = [
        nodeadm_render_cases(),
        nodeadm_dropin_cases(),
        nodeadm_fast_image_pull_cases(),
        nodeadm_kubelet_and_unit_cases(),
    ]
    .concat();
    run_cases(&template, &cases);
    fast_image_pull_is_fine_where_nodeadm_manages_soci_alone();
}

/// Installed on a nodeadm host before nodeadm runs: no check fails; what nodeadm renders waits for it.
fn assert_a_fresh_nodeadm_install_passes(template: &Node) {
    let d = template.files();
    assert!(d.failing().is_empty(), "failing checks:\n{}", d.failing().join("\n"));
    d.assert("nodeadm.dropin", "ok", "not rendered yet");
    d.assert("containerd.config-version", "skip", "nodeadm renders it");
    d.assert(
        "kubelet.image-service-endpoint",
        "ok",
        "50-soci-agent.yaml (nodeadm writes it",
    );
    d.assert(
        "nodeadm.fast-image-pull",
        "ok",
        "FastImagePull: false in /etc/eks/nodeadm.d/50-soci-agent.yaml",
    );
    d.assert("containerd.version", "ok", "2.2.1");
}

/// containerd's config rendered by nodeadm, before or after the drop-in.
fn nodeadm_render_cases() -> Vec<Case> {
    vec![
        Case {
            name: "rendered with SOCI",
            mutate: |n| n.write(CONTAINERD_CONFIG, V3_WIRED, 0o644),
            id: "nodeadm.dropin",
            verdict: "ok",
            contains: "rendered into /etc/containerd/config.toml",
        },
        Case {
            name: "rendered before the drop-in",
            mutate: |n| n.write(CONTAINERD_CONFIG, V3_PLAIN, 0o644),
            id: "nodeadm.dropin",
            verdict: "warn",
            contains: "nodeadm has not applied the drop-in yet",
        },
        Case {
            name: "rendered before the drop-in: CRI check waits for nodeadm-run",
            mutate: |n| n.write(CONTAINERD_CONFIG, V3_PLAIN, 0o644),
            id: "containerd.snapshotter",
            verdict: "warn",
            contains: "snapshotter unset (/etc/containerd/config.toml): CRI pulls use overlayfs, not SOCI (not applied yet",
        },
        Case {
            name: "rendered without SOCI and no drop-in: CRI check fails",
            mutate: |n| {
                n.write(CONTAINERD_CONFIG, V3_PLAIN, 0o644);
                n.remove("/etc/eks/nodeadm.d/50-soci-agent.yaml");
            },
            id: "containerd.snapshotter",
            verdict: "fail",
            contains: "plugins.\"io.containerd.cri.v1.images\".snapshotter unset",
        },
        Case {
            name: "rendered before the drop-in: pull path",
            mutate: |n| n.write(CONTAINERD_CONFIG, V3_PLAIN, 0o644),
            id: "containerd.pull-path",
            verdict: "ok",
            contains: "discard_unpacked_layers = true",
        },
    ]
}

/// The agent's NodeConfig drop-in edited, removed or in the wrong table names.
fn nodeadm_dropin_cases() -> Vec<Case> {
    vec![
        Case {
            name: "v2 table names on containerd 2",
            mutate: |n| {
                let p = "/etc/eks/nodeadm.d/50-soci-agent.yaml";
                let text = n.read(p).replace(
                    "'io.containerd.cri.v1.images'",
                    "\"io.containerd.grpc.v1.cri\".containerd",
                );
                n.write(p, &text, 0o644);
            },
            id: "nodeadm.dropin",
            verdict: "fail",
            contains: "treats it as version 2",
        },
        Case {
            name: "drop-in edited",
            mutate: |n| {
                n.edit(
                    "/etc/eks/nodeadm.d/50-soci-agent.yaml",
                    "kind: NodeConfig\n",
                    "kind: NodeConfig\n# local edit\n",
                )
            },
            id: "nodeadm.dropin",
            verdict: "warn",
            contains: "differs from what install writes",
        },
        Case {
            name: "drop-in removed",
            mutate: |n| n.remove("/etc/eks/nodeadm.d/50-soci-agent.yaml"),
            id: "nodeadm.dropin",
            verdict: "fail",
            contains: "without SOCI",
        },
    ]
}

/// FastImagePull set elsewhere: overridden by the agent's drop-in or merged after it.
fn nodeadm_fast_image_pull_cases() -> Vec<Case> {
    vec![
        Case {
            name: "FastImagePull in a drop-in the agent's overrides",
            mutate: |n| n.write("/etc/eks/nodeadm.d/10-user.yaml", FAST_IMAGE_PULL, 0o644),
            id: "nodeadm.fast-image-pull",
            verdict: "ok",
            contains: "false in /etc/eks/nodeadm.d/50-soci-agent.yaml",
        },
        Case {
            name: "FastImagePull in a drop-in merged after the agent's",
            mutate: |n| n.write("/etc/eks/nodeadm.d/60-user.yaml", FAST_IMAGE_PULL, 0o644),
            id: "nodeadm.fast-image-pull",
            verdict: "warn",
            contains: "60-user.yaml, which nodeadm merges after",
        },
        Case {
            name: "FastImagePull in nodeadm's cache",
            mutate: |n| {
                n.write(
                    "/run/eks/nodeadm/config.json",
                    "{\"spec\":{\"featureGates\":{\"FastImagePull\":true}}}",
                    0o644,
                )
            },
            id: "nodeadm.fast-image-pull",
            verdict: "warn",
            contains: "/run/eks/nodeadm/config.json",
        },
    ]
}

/// kubelet rendered early, and the AL2023 RPM unit under the agent's drop-in.
fn nodeadm_kubelet_and_unit_cases() -> Vec<Case> {
    vec![
        Case {
            name: "kubelet rendered before the drop-in",
            mutate: |n| {
                n.write(
                    "/etc/kubernetes/kubelet/config.json",
                    "{\"kind\":\"KubeletConfiguration\"}\n",
                    0o644,
                )
            },
            id: "kubelet.image-service-endpoint",
            verdict: "warn",
            contains: "has not applied the NodeConfig drop-in",
        },
        Case {
            name: "AL2023 RPM unit with our drop-in",
            mutate: |n| {
                n.write("/etc/systemd/system/soci-snapshotter.service", AL2023_UNIT, 0o644);
                n.write(
                    "/etc/systemd/system/soci-snapshotter.service.d/50-soci-agent.conf",
                    "[Service]\nExecStart=\nExecStart=/usr/local/bin/soci-snapshotter-grpc --address fd://\n",
                    0o644,
                );
            },
            id: "soci.binary",
            verdict: "ok",
            contains: "ExecStart in /etc/systemd/system/soci-snapshotter.service.d/50-soci-agent.conf",
        },
    ]
}

/// nodeadm manages SOCI alone: FastImagePull is fine there.
fn fast_image_pull_is_fine_where_nodeadm_manages_soci_alone() {
    let alone = Node::nodeadm("2.2.1");
    alone.write("/etc/eks/nodeadm.d/10-user.yaml", FAST_IMAGE_PULL, 0o644);
    alone
        .files()
        .assert("nodeadm.fast-image-pull", "ok", "soci-agent is not installed");
}

/// User NodeConfigs as users write them (anchors, flow style, block scalars, two documents,
/// MIME user data) are read as YAML, not scanned as text.
#[test]
fn nodeconfigs_with_anchors_block_scalars_and_documents() {
    let installed = Node::nodeadm("2.2.1");
    installed.install(&[]);
    installed.write("/etc/eks/nodeadm.d/60-user.yaml", USER_ANCHORS, 0o644);
    installed.files().assert(
        "nodeadm.fast-image-pull",
        "warn",
        "FastImagePull: true in /etc/eks/nodeadm.d/60-user.yaml, which nodeadm merges after",
    );

    // The same NodeConfig as the second part of MIME user data, after a shell part.
    let alone = Node::nodeadm("2.2.1");
    let user_data = format!(
        "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"//\"\n\n--//\n\
         Content-Type: text/x-shellscript; charset=\"us-ascii\"\n\n#!/bin/bash\necho 'FastImagePull: false'\n\n--//\n\
         Content-Type: application/node.eks.aws\n\n{USER_ANCHORS}\n--//--\n"
    );
    alone.write("/var/lib/cloud/instance/user-data.txt", &user_data, 0o600);
    alone.files().assert(
        "nodeadm.fast-image-pull",
        "ok",
        "FastImagePull: true in /var/lib/cloud/instance/user-data.txt: nodeadm manages SOCI",
    );

    // Broken YAML is named, not taken for "not set".
    let broken = Node::nodeadm("2.2.1");
    broken.write("/etc/eks/nodeadm.d/10-user.yaml", "spec: {featureGates: [\n", 0o644);
    broken.files().assert(
        "nodeadm.fast-image-pull",
        "ok",
        "could not read /etc/eks/nodeadm.d/10-user.yaml: not valid YAML",
    );
}

#[test]
fn bottlerocket_and_bare_trees() {
    let br = Node::bottlerocket();
    let d = br.files();
    d.assert("host.os", "skip", "settings API");
    assert_eq!(d.report["checks"].as_array().unwrap().len(), 1, "{}", d.report);
    assert_eq!(d.code(), 0);

    let bare = Node::debian();
    bare.remove("/etc/os-release");
    let d = bare.files();
    d.assert("host.os", "skip", "no /etc/os-release");
    d.assert("agent.record", "skip", "has not installed");
    d.assert("soci.binary", "fail", "no soci-snapshotter.service");
    d.assert("containerd.config-version", "fail", "defaults");
    d.assert("systemd.boot-unit", "skip", "has not installed");
    assert_eq!(d.code(), 1);
}

#[test]
fn an_unreachable_bus_falls_back_to_unit_files() {
    let n = installed_plain();
    let bus = format!("unix:path={}", n.dir.path().join("no-bus.sock").display());
    let d = n.doctor(&["--bus-address", &bus]);
    d.assert("systemd.bus", "skip", "no bus at");
    d.assert("systemd.soci-service", "warn", "(unit files)");
    // Live, but the tree's sockets do not exist: skipped, not failed.
    d.assert("live.soci-socket", "skip", "not running here");
    d.assert("live.containerd-soci", "skip", "not running here");
}

#[test]
fn little_space_under_the_soci_root_fails() {
    let n = installed_plain();
    let dir = n.path("/var/lib/soci-snapshotter-grpc");
    std::fs::create_dir_all(&dir).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipping: cannot mount a tmpfs here (needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(dir);
    n.files().assert("host.disk", "fail", "tmpfs on tmpfs");
}

// ---------------------------------------------------------------------------------------------
// Live checks: the REAL containerd and SOCI (rig builds) on private paths.

fn live(n: &Node, containerd: &Path, soci: &Path) -> Doctor {
    n.doctor(&[
        "--containerd-socket",
        containerd.to_str().unwrap(),
        "--soci-socket",
        soci.to_str().unwrap(),
    ])
}

#[test]
fn live_containerd_without_a_proxy_plugin() {
    let n = installed_plain();
    let tmp = tempfile::tempdir().unwrap();
    let c = Containerd::start(&tmp.path().join("containerd"));
    let d = live(&n, &c.socket, &tmp.path().join("nobody.sock"));
    d.assert("live.containerd-soci", "fail", "lists no soci snapshotter");
    d.assert("live.soci-socket", "fail", "no socket at");
    d.assert("live.pause-image", "skip", "no /etc/eks/pause.tar");
    assert_eq!(d.code(), 1);
}

#[test]
fn live_containerd_with_nothing_serving_soci() {
    let n = installed_plain();
    let tmp = tempfile::tempdir().unwrap();
    let soci = tmp.path().join("soci.sock");
    let opts = Options {
        soci: Some(soci.clone()),
        ..Options::default()
    };
    let c = Containerd::start_with(&tmp.path().join("containerd"), opts);
    let d = live(&n, &c.socket, &soci);
    d.assert("live.containerd-soci", "fail", "lists soci but cannot reach it");
    d.assert("live.soci-socket", "fail", "no socket at");
}

/// `ctr images import --local` of the pause archive into k8s.io, unpacked by `snapshotter`.
fn import_pause(c: &Containerd, tar: &str, snapshotter: &str) {
    c.ctr(&[
        "-n",
        "k8s.io",
        "images",
        "import",
        "--local",
        "--snapshotter",
        snapshotter,
        tar,
    ]);
}

#[test]
fn live_real_soci_serving_and_the_pause_image() {
    let n = installed_plain();
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let soci_dir = d.join("soci");
    let opts = Options {
        soci: Some(soci_dir.join("soci.sock")),
        ..Options::default()
    };
    let c = Containerd::start_with(&d.join("containerd"), opts);
    let mut soci = Soci::start(&soci_dir, real::SOCI_VERSION, &c.socket);
    let pause = oci_image_tar(PAUSE_IMAGE);
    std::fs::create_dir_all(n.path("/etc/eks")).unwrap();
    std::fs::write(n.path("/etc/eks/pause.tar"), &pause).unwrap();

    // A SOCI that holds no snapshot yet answers, and that is healthy.
    let report = live(&n, &c.socket, &soci.socket);
    report.assert("live.soci-socket", "ok", "accepted a connection");
    report.assert("live.containerd-soci", "ok", "answers Snapshots.List");
    report.assert("live.pause-image", "fail", "not in containerd's k8s.io namespace");

    let tar = d.join("pause.tar");
    std::fs::write(&tar, &pause).unwrap();
    let tar = tar.to_str().unwrap();
    import_pause(&c, tar, "native");
    live(&n, &c.socket, &soci.socket).assert("live.pause-image", "fail", "not unpacked in soci (unpacked in: native)");
    import_pause(&c, tar, "soci");
    let report = live(&n, &c.socket, &soci.socket);
    report.assert("live.pause-image", "ok", "is unpacked in soci (snapshot sha256:");
    report.assert("live.containerd-soci", "ok", "reaches it (Snapshots.Stat of sha256:");
    // The snapshot is SOCI's own, not containerd's.
    assert!(
        c.ctr(&["-n", "k8s.io", "snapshots", "--snapshotter", "soci", "ls"])
            .lines()
            .count()
            > 1
    );
    assert!(soci.root.join("snapshotter/metadata.db").exists());

    // The daemon goes away: containerd still lists soci, but a Stat through it fails.
    soci.stop();
    let report = live(&n, &c.socket, &soci.socket);
    report.assert("live.soci-socket", "fail", "no socket at");
    report.assert(
        "live.containerd-soci",
        "fail",
        "lists soci but cannot reach it (Snapshots.",
    );
}

// ---------------------------------------------------------------------------------------------
// A booted systemd node: doctor inside it, over its D-Bus, with real containerd 2.4.2 and SOCI.

/// `soci-agent doctor --output json` run inside the node (root `/`, the system bus, live checks).
fn doctor_in(booted: &Booted) -> Doctor {
    Doctor::parse(booted.doctor().out)
}

#[test]
fn booted_node_over_dbus() {
    use common::nspawn::NodeOptions;
    let opts = real::with_containerd(NodeOptions::new(), "2.4.2", real::NodeContainerdConfig::Default);
    let booted = Booted::boot(opts);
    let node = &booted.node;
    booted.install_release(&[]).expect_code(0);
    // The boot unit runs once by hand (no pause archive on Debian: verify only).
    node.check(&["systemctl", "start", "soci-agent-boot.service"]);

    let d = doctor_in(&booted);
    assert!(
        d.failing().is_empty(),
        "failing checks:\n{}\n{}",
        d.failing().join("\n"),
        node.journal()
    );
    d.assert(
        "systemd.bus",
        "ok",
        "systemd answers on unix:path=/run/dbus/system_bus_socket",
    );
    d.assert("systemd.soci-service", "ok", "ActiveState=active");
    d.assert("systemd.soci-socket", "ok", "(D-Bus)");
    d.assert("systemd.boot-unit", "ok", "UnitFileState=enabled (D-Bus)");
    d.assert("systemd.boot-result", "ok", "Result=success");
    d.assert("systemd.containerd-dropin", "ok", "10-soci-snapshotter.conf");
    d.assert("live.soci-socket", "ok", "accepted a connection");
    d.assert("live.containerd-soci", "ok", "lists soci");
    d.assert("soci.version", "ok", "0.16.1");
    d.assert("soci.digest", "ok", "release.json");
    let size = d.check("host.size");
    assert!(
        size["evidence"].as_str().unwrap().contains("vCPU") && size["verdict"] != "skip",
        "{size}"
    );

    // A snapshotter that refuses to start (SOCI cannot parse its config): the unit fails.
    let cfg = "/etc/soci-snapshotter-grpc/config.toml";
    let text = std::fs::read_to_string(node.path(cfg)).unwrap();
    std::fs::write(node.path(cfg), format!("{text}\nthis is not toml\n")).unwrap();
    let _ = node.exec(&["systemctl", "restart", "soci-snapshotter.service"]);
    let d = doctor_in(&booted);
    d.assert("systemd.soci-service", "fail", "Result=exit-code");
    assert_eq!(d.code(), 1);
}
