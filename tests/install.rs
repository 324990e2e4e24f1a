//! `soci-agent install` end to end under `--root` (no systemd): the binary
//! is run as a user would run it, and the resulting tree is checked.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::agent_bin;
use common::archive::sha256_hex;
use common::real;
use common::tree::{DEBIAN_CONTAINERD_DEFAULT as DEBIAN_DEFAULT, Tree as Node};

/// The real SOCI release (tests/real/build.sh), so install's `config dump` check runs the real daemon.
const VER: &str = real::SOCI_VERSION;
const ARCHIVE: &str = "soci-snapshotter-0.16.1-linux-amd64-static.tar.gz";

/// The real release archive's bytes.
fn standard_release(version: &str) -> Vec<u8> {
    real::soci_release(version).archive
}

/// The agent's runs on a node tree (`Node::plain()`, `Node::nodeadm(..)`, `Node::debian()`),
/// with a local release archive beside it.
impl Node {
    /// Writes the standard release archive (and its .sha256sum) beside the root.
    fn archive(&self) -> PathBuf {
        self.put_archive(ARCHIVE, &standard_release(VER))
    }
    /// Runs `soci-agent install --root <root> --no-start --arch amd64 <args>`.
    fn install(&self, args: &[&str]) -> Output {
        self.install_env(args, &[])
    }
    fn install_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut full = vec!["--arch", "amd64"];
        full.extend_from_slice(args);
        self.run("install", &full, env)
    }
    /// Runs `soci-agent <sub> --root <root> --no-start <args>` (boot has no --no-start).
    fn run(&self, sub: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(agent_bin());
        cmd.arg(sub)
            .arg("--root")
            .arg(self.root())
            .args(["--log-level", "warn"]);
        if sub != "boot" {
            cmd.arg("--no-start");
        }
        cmd.args(args);
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("SOCI_AGENT_")) {
            cmd.env_remove(k);
        }
        cmd.envs(env.iter().copied());
        cmd.output().unwrap()
    }
    /// Every entry under the root: kind, mode, size, content digest or link
    /// target, mtime. Equal trees mean nothing was touched. The run-report
    /// log (`/var/lib/soci-agent/reports`) is left out: every run appends to it.
    fn tree(&self) -> BTreeMap<PathBuf, String> {
        fn walk(dir: &Path, base: &Path, out: &mut BTreeMap<PathBuf, String>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                let m = std::fs::symlink_metadata(&p).unwrap();
                let rel = p.strip_prefix(base).unwrap().to_path_buf();
                let desc = if m.file_type().is_symlink() {
                    format!("link -> {}", std::fs::read_link(&p).unwrap().display())
                } else if m.is_dir() {
                    walk(&p, base, out);
                    format!("dir {:o}", m.mode() & 0o7777)
                } else {
                    let bytes = std::fs::read(&p).unwrap();
                    format!(
                        "file {:o} {} {} mtime {}.{}",
                        m.mode() & 0o7777,
                        bytes.len(),
                        sha256_hex(&bytes),
                        m.mtime(),
                        m.mtime_nsec()
                    )
                };
                out.insert(rel, desc);
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.root(), &self.root(), &mut out);
        let reports = Path::new("var/lib/soci-agent/reports");
        out.retain(|p, d| !(p.starts_with(reports) || (d.starts_with("dir") && reports.starts_with(p))));
        out
    }
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited")
}

fn assert_code(out: &Output, want: i32) {
    assert_eq!(
        code(out),
        want,
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn action<'a>(report: &'a serde_json::Value, path: &str) -> &'a serde_json::Value {
    report["actions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["path"] == path)
        .unwrap_or_else(|| panic!("no action for {path} in {report:#}"))
}

#[test]
fn plain_host_install_writes_everything_and_second_run_changes_nothing() {
    let node = Node::plain();
    let archive = node.archive();
    let out = node.install(&["--archive", archive.to_str().unwrap(), "--output", "json"]);
    assert_code(&out, 0);
    let report = json(&out);
    assert_eq!(report["changed"], true);
    assert_versioned_store_and_atomic_links(&node, &archive);
    assert_soci_config_is_parallel_with_keychain_and_unpigz(&node);
    assert_containerd_config_is_merged_and_backed_up(&node);
    assert_kubelet_dropin_and_systemd_files(&node);
    second_run_changes_nothing(&node, &archive);
}

/// Versioned store and atomic links.
fn assert_versioned_store_and_atomic_links(node: &Node, archive: &Path) {
    let store = "/usr/local/lib/soci-agent/releases/0.16.1-amd64";
    for bin in ["soci-snapshotter-grpc", "soci"] {
        let m = std::fs::metadata(node.path(&format!("{store}/{bin}"))).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o755, "{bin} mode");
        let link = std::fs::read_link(node.path(&format!("/usr/local/bin/{bin}"))).unwrap();
        assert_eq!(link, PathBuf::from(format!("{store}/{bin}")));
    }
    let manifest: serde_json::Value = serde_json::from_str(&node.read(&format!("{store}/release.json"))).unwrap();
    assert_eq!(manifest["archive_sha256"], sha256_hex(&std::fs::read(archive).unwrap()));
}

/// SOCI config: parallel mode, containerd content store, keychain, unpigz.
fn assert_soci_config_is_parallel_with_keychain_and_unpigz(node: &Node) {
    let cfg: toml_edit::DocumentMut = node.read("/etc/soci-snapshotter-grpc/config.toml").parse().unwrap();
    assert_eq!(
        cfg["pull_modes"]["parallel_pull_unpack"]["enable"].as_bool(),
        Some(true)
    );
    assert_eq!(cfg["content_store"]["type"].as_str(), Some("containerd"));
    assert_eq!(cfg["cri_keychain"]["enable_keychain"].as_bool(), Some(true));
    assert_eq!(
        cfg["pull_modes"]["parallel_pull_unpack"]["max_concurrent_downloads_per_image"].as_integer(),
        Some(20)
    );
    assert_eq!(
        cfg["pull_modes"]["parallel_pull_unpack"]["decompress_streams"]["gzip"]["path"].as_str(),
        Some("/usr/bin/unpigz")
    );
}

/// containerd: merged, backed up.
fn assert_containerd_config_is_merged_and_backed_up(node: &Node) {
    let ctd: toml_edit::DocumentMut = node.read("/etc/containerd/config.toml").parse().unwrap();
    assert_eq!(
        ctd["proxy_plugins"]["soci"]["address"].as_str(),
        Some("/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock")
    );
    assert_eq!(
        ctd["proxy_plugins"]["soci"]["exports"]["root"].as_str(),
        Some("/var/lib/soci-snapshotter-grpc")
    );
    let cri = &ctd["plugins"]["io.containerd.grpc.v1.cri"]["containerd"];
    assert_eq!(cri["snapshotter"].as_str(), Some("soci"));
    assert_eq!(cri["disable_snapshot_annotations"].as_bool(), Some(false));
    assert_eq!(
        node.read("/var/lib/soci-agent/backup/etc/containerd/config.toml"),
        DEBIAN_DEFAULT
    );
}

/// kubelet drop-in and systemd files.
fn assert_kubelet_dropin_and_systemd_files(node: &Node) {
    let kubelet: serde_json::Value =
        serde_json::from_str(&node.read("/etc/kubernetes/kubelet/config.json.d/50-soci-agent.conf")).unwrap();
    assert_eq!(
        kubelet["imageServiceEndpoint"],
        "unix:///run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock"
    );
    let unit = node.read("/etc/systemd/system/soci-snapshotter.service");
    assert!(
        unit.contains("ExecStart=/usr/local/bin/soci-snapshotter-grpc --address fd://\n"),
        "{unit}"
    );
    assert!(unit.contains("Type=notify") && unit.contains("Restart=always"));
    assert!(
        node.read("/etc/systemd/system/soci-snapshotter.socket")
            .contains("ListenStream=/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock")
    );
    let dropin = node.read("/etc/systemd/system/containerd.service.d/10-soci-snapshotter.conf");
    assert!(dropin.contains("Requires=soci-snapshotter.service") && dropin.contains("After=soci-snapshotter.service"));
}

/// Second run: nothing changes, byte for byte and mtime for mtime.
fn second_run_changes_nothing(node: &Node, archive: &Path) {
    let before = node.tree();
    let out = node.install(&["--archive", archive.to_str().unwrap(), "--output", "json"]);
    assert_code(&out, 0);
    let report = json(&out);
    assert_eq!(report["changed"], false);
    for a in report["actions"].as_array().unwrap() {
        assert_eq!(a["changed"], false, "{a:#}");
    }
    assert_eq!(node.tree(), before);
}

#[test]
fn dry_run_prints_diffs_and_changes_nothing() {
    let node = Node::plain();
    let archive = node.archive();
    let before = node.tree();
    let out = node.install(&["--archive", archive.to_str().unwrap(), "--dry-run"]);
    assert_code(&out, 0);
    let text = String::from_utf8_lossy(&out.stdout);
    let added = |needle: &str| {
        text.lines()
            .any(|l| l.trim_start().starts_with('+') && l.contains(needle))
    };
    assert!(added("snapshotter = \"soci\""), "{text}");
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with('-') && l.contains("snapshotter = \"overlayfs\"")),
        "{text}"
    );
    assert!(text.contains("--- a/etc/containerd/config.toml"), "{text}");
    assert_eq!(node.tree(), before);
}

#[test]
fn nodeadm_host_gets_a_nodeconfig_dropin_with_v3_tables_for_containerd_2() {
    let node = Node::nodeadm("2.2.1");
    let archive = node.archive();
    let out = node.install(&["--archive", archive.to_str().unwrap(), "--output", "json"]);
    assert_code(&out, 0);
    assert_eq!(json(&out)["plan"]["wiring"], "nodeadm");
    assert!(
        !node.path("/etc/containerd/config.toml").exists(),
        "nodeadm hosts: containerd config is nodeadm's"
    );
    assert!(
        !node
            .path("/etc/kubernetes/kubelet/config.json.d/50-soci-agent.conf")
            .exists()
    );
    let yaml: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&node.read("/etc/eks/nodeadm.d/50-soci-agent.yaml")).unwrap();
    assert_eq!(yaml["apiVersion"].as_str(), Some("node.eks.aws/v1alpha1"));
    assert_eq!(yaml["kind"].as_str(), Some("NodeConfig"));
    assert_eq!(
        yaml["spec"]["kubelet"]["config"]["imageServiceEndpoint"].as_str(),
        Some("unix:///run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock")
    );
    let toml: toml_edit::DocumentMut = yaml["spec"]["containerd"]["config"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        toml["plugins"]["io.containerd.cri.v1.images"]["snapshotter"].as_str(),
        Some("soci")
    );
    assert_eq!(
        toml["plugins"]["io.containerd.cri.v1.images"]["disable_snapshot_annotations"].as_bool(),
        Some(false)
    );
    assert!(toml["plugins"].get("io.containerd.grpc.v1.cri").is_none());
    assert_eq!(toml["proxy_plugins"]["soci"]["type"].as_str(), Some("snapshot"));
}

#[test]
fn nodeadm_host_with_containerd_1_7_gets_v2_tables() {
    let node = Node::nodeadm("1.7.27");
    let archive = node.archive();
    assert_code(&node.install(&["--archive", archive.to_str().unwrap()]), 0);
    let yaml: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&node.read("/etc/eks/nodeadm.d/50-soci-agent.yaml")).unwrap();
    let toml: toml_edit::DocumentMut = yaml["spec"]["containerd"]["config"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        toml["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["snapshotter"].as_str(),
        Some("soci")
    );
    assert!(toml["plugins"].get("io.containerd.cri.v1.images").is_none());
}

const AMI_UNIT: &str = "[Unit]\nDescription=soci snapshotter containerd plugin\n\n[Service]\nType=notify\nExecStart=/usr/bin/soci-snapshotter-grpc --address fd://\nRestart=no\n\n[Install]\nWantedBy=multi-user.target\n";

/// A nodeadm host (containerd 2.2.1) with a SOCI in `/usr/bin` that says it is `version`.
fn nodeadm_with_soci(version: &str) -> Node {
    let node = Node::nodeadm("2.2.1");
    node.write(
        "/usr/bin/soci-snapshotter-grpc",
        format!("#!/bin/sh\necho 'soci-snapshotter-grpc version v{version} abc'\n"),
        0o755,
    );
    node
}

/// The report lists the SOCI in `/usr/bin` among the installed ones, its version unknown (not run).
fn assert_usr_bin_soci_not_run(report: &serde_json::Value) {
    let installed = report["host"]["soci_installed"].as_array().unwrap();
    assert!(
        installed
            .iter()
            .any(|i| i["path"] == "/usr/bin/soci-snapshotter-grpc" && i["version"].is_null()),
        "{report:#}"
    );
}

#[test]
fn preinstalled_unit_is_kept_and_overridden_by_a_dropin() {
    let node = nodeadm_with_soci("0.12.0");
    node.write("/etc/systemd/system/soci-snapshotter.service", AMI_UNIT, 0o644);
    let archive = node.archive();
    let out = node.install(&[
        "--archive",
        archive.to_str().unwrap(),
        "--output",
        "json",
        "--soci-root",
        "/data/soci",
    ]);
    assert_code(&out, 0);
    assert_eq!(node.read("/etc/systemd/system/soci-snapshotter.service"), AMI_UNIT);
    assert!(!node.path("/etc/systemd/system/soci-snapshotter.socket").exists());
    let dropin = node.read("/etc/systemd/system/soci-snapshotter.service.d/50-soci-agent.conf");
    assert!(
        dropin
            .contains("ExecStart=\nExecStart=/usr/local/bin/soci-snapshotter-grpc --address fd:// --root /data/soci\n"),
        "{dropin}"
    );
    assert!(dropin.contains("Restart=always") && dropin.contains("RequiresMountsFor=/data/soci"));
    assert_usr_bin_soci_not_run(&json(&out));
}

#[test]
fn adopt_keeps_the_preinstalled_binary_and_downloads_nothing() {
    let node = nodeadm_with_soci("0.12.0");
    node.write("/etc/systemd/system/soci-snapshotter.service", AMI_UNIT, 0o644);
    // An unreachable mirror proves nothing is fetched.
    let out = node.install(&["--adopt", "--release-url", "http://127.0.0.1:9", "--output", "json"]);
    assert_code(&out, 0);
    assert!(!node.path("/usr/local/lib/soci-agent").exists());
    assert!(!node.path("/usr/local/bin/soci-snapshotter-grpc").exists());
    let dropin = node.read("/etc/systemd/system/soci-snapshotter.service.d/50-soci-agent.conf");
    assert!(
        dropin.contains("ExecStart=/usr/bin/soci-snapshotter-grpc --address fd://\n"),
        "{dropin}"
    );
}

#[test]
fn adopt_under_a_mounted_root_never_runs_the_image_s_binary() {
    // Asked for its version, this binary would say 0.9.0 (no parallel mode) and be refused; under
    // a --root that is not this host it is never run, so its version is unknown and kept as asked.
    let node = nodeadm_with_soci("0.9.0");
    let out = node.install(&["--adopt", "--output", "json"]);
    assert_code(&out, 0);
    assert_usr_bin_soci_not_run(&json(&out));
}

#[test]
fn bottlerocket_is_refused_with_a_pointer() {
    let node = Node::bottlerocket();
    let archive = node.archive();
    let before = node.tree();
    let out = node.install(&["--archive", archive.to_str().unwrap(), "--output", "json"]);
    assert_code(&out, 2);
    assert!(json(&out)["error"].as_str().unwrap().contains("settings API"));
    assert_eq!(node.tree(), before);
}

#[test]
fn wrong_pinned_digest_exits_3_and_installs_nothing() {
    let node = Node::plain();
    let archive = node.archive();
    let before = node.tree();
    let wrong = "0".repeat(64);
    let out = node.install(&[
        "--archive",
        archive.to_str().unwrap(),
        "--sha256",
        &wrong,
        "--output",
        "json",
    ]);
    assert_code(&out, 3);
    assert_eq!(node.tree(), before, "a refused archive leaves the node as it was");
}

#[test]
fn malformed_containerd_config_exits_2_and_is_untouched() {
    let node = Node::plain();
    node.write("/etc/containerd/config.toml", "version = 2\n[plugins\nbroken", 0o644);
    let archive = node.archive();
    let before = node.tree();
    let out = node.install(&["--archive", archive.to_str().unwrap()]);
    assert_code(&out, 2);
    assert_eq!(node.tree(), before);
    let node = Node::plain();
    node.write("/etc/containerd/config.toml", "version = 7\n", 0o644);
    let before = node.tree();
    assert_code(&node.install(&["--archive", node.archive().to_str().unwrap()]), 2);
    // the archive written beside the root is outside the tree
    assert_eq!(node.tree(), before);
}

#[test]
fn invalid_settings_exit_2_before_anything_changes() {
    let node = Node::plain();
    let archive = node.archive();
    let a = archive.to_str().unwrap();
    let before = node.tree();
    for args in [
        vec![
            "--max-concurrent-downloads",
            "10",
            "--max-concurrent-downloads-per-image",
            "20",
        ],
        vec![
            "--max-concurrent-unpacks",
            "4",
            "--max-concurrent-unpacks-per-image",
            "8",
        ],
        vec!["--concurrent-download-chunk-size", "16MiB"],
        // SOCI reads any limit <= 0 as unbounded; a bounded global below per-image is what it refuses.
        vec![
            "--max-concurrent-downloads",
            "25",
            "--max-concurrent-downloads-per-image",
            "30",
        ],
        vec!["--soci-version", "0.10.0"],
        vec!["--arch", "riscv64"],
        vec!["--decompressor", "/usr/bin/pigz-missing"],
        vec!["--flavor", "musl"],
        vec!["--sha256", "abc"],
        vec!["--release-url", "ftp://mirror"],
    ] {
        let mut full = vec!["--archive", a];
        full.extend(args.iter().copied());
        let out = node.install(&full);
        assert_code(&out, 2);
        assert!(
            !out.stderr.is_empty() || !out.stdout.is_empty(),
            "{args:?} must say why"
        );
    }
    assert_eq!(node.tree(), before);
}

#[test]
fn settings_precedence_is_flag_then_env_then_file_then_default() {
    let node = Node::plain();
    let archive = node.archive();
    let a = archive.to_str().unwrap();
    node.write(
        "/etc/soci-agent/config.toml",
        "[install]\nmax_concurrent_downloads_per_image = 5\nconcurrent_download_chunk_size = \"8mb\"\n",
        0o644,
    );
    let per_image = |node: &Node| -> i64 {
        let cfg: toml_edit::DocumentMut = node.read("/etc/soci-snapshotter-grpc/config.toml").parse().unwrap();
        cfg["pull_modes"]["parallel_pull_unpack"]["max_concurrent_downloads_per_image"]
            .as_integer()
            .unwrap()
    };
    assert_code(&node.install(&["--archive", a]), 0);
    assert_eq!(per_image(&node), 5, "file over default");
    let cfg = node.read("/etc/soci-snapshotter-grpc/config.toml");
    assert!(cfg.contains("\"8mb\""), "{cfg}");
    assert_code(
        &node.install_env(
            &["--archive", a],
            &[("SOCI_AGENT_MAX_CONCURRENT_DOWNLOADS_PER_IMAGE", "6")],
        ),
        0,
    );
    assert_eq!(per_image(&node), 6, "env over file");
    assert_code(
        &node.install_env(
            &["--archive", a, "--max-concurrent-downloads-per-image", "7"],
            &[("SOCI_AGENT_MAX_CONCURRENT_DOWNLOADS_PER_IMAGE", "6")],
        ),
        0,
    );
    assert_eq!(per_image(&node), 7, "flag over env");
    node.write(
        "/etc/soci-agent/config.toml",
        "[install]\nmax_concurent_downloads = 5\n",
        0o644,
    );
    assert_code(&node.install(&["--archive", a]), 2);
}

/// The record keeps what install was given (flags, env); a later run given no node setting
/// replays it (and changes nothing), a run given any replaces it as a whole.
#[test]
fn a_run_without_settings_replays_the_recorded_request() {
    let node = Node::plain();
    let archive = node.archive();
    let a = archive.to_str().unwrap();
    let unpacks = |node: &Node| {
        let cfg: toml_edit::DocumentMut = node.read("/etc/soci-snapshotter-grpc/config.toml").parse().unwrap();
        cfg["pull_modes"]["parallel_pull_unpack"]["max_concurrent_unpacks_per_image"].as_integer()
    };
    let first = node.install_env(
        &["--archive", a, "--max-concurrent-unpacks-per-image", "3"],
        &[("SOCI_AGENT_DECOMPRESSOR", "none")],
    );
    assert_code(&first, 0);
    assert_eq!(unpacks(&node), Some(3));
    let record: serde_json::Value = serde_json::from_str(&node.read("/var/lib/soci-agent/record.json")).unwrap();
    let request = &record["request"];
    assert_eq!(request["max_concurrent_unpacks_per_image"]["value"], 3, "{record:#}");
    assert_eq!(request["max_concurrent_unpacks_per_image"]["source"], "flag");
    assert_eq!(request["decompressor"]["source"], "env", "{record:#}");
    assert!(
        request.get("no_start").is_none(),
        "run-only options are not recorded: {record:#}"
    );

    // No node setting (--no-start and --output are about this run only): replayed, nothing changes.
    let before = node.tree();
    let replay = node.run("install", &["--output", "json"], &[]);
    assert_code(&replay, 0);
    assert_eq!(node.tree(), before, "a replay changes nothing");
    let notes = json(&replay)["notes"].to_string();
    assert!(
        notes.contains("replaying") && notes.contains("max_concurrent_unpacks_per_image=3"),
        "{notes}"
    );

    // Any setting given replaces the request: the per-image limit is back to its default.
    assert_code(&node.install(&["--archive", a]), 0);
    assert_eq!(unpacks(&node), Some(12));
    let record: serde_json::Value = serde_json::from_str(&node.read("/var/lib/soci-agent/record.json")).unwrap();
    assert!(
        record["request"].get("max_concurrent_unpacks_per_image").is_none(),
        "{record:#}"
    );
    assert!(record["request"].get("decompressor").is_none(), "{record:#}");
}

#[test]
fn changing_tuning_rewrites_the_config_but_keeps_the_release() {
    let node = Node::plain();
    let archive = node.archive();
    let a = archive.to_str().unwrap();
    assert_code(&node.install(&["--archive", a]), 0);
    let out = node.install(&[
        "--archive",
        a,
        "--max-concurrent-unpacks-per-image",
        "4",
        "--output",
        "json",
    ]);
    assert_code(&out, 0);
    let report = json(&out);
    assert_eq!(
        action(&report, "/etc/soci-snapshotter-grpc/config.toml")["action"],
        "update"
    );
    assert_eq!(
        action(&report, "/usr/local/lib/soci-agent/releases/0.16.1-amd64")["action"],
        "keep_release"
    );
    assert_eq!(action(&report, "/etc/containerd/config.toml")["changed"], false);
}

#[test]
fn a_tampered_store_is_reinstalled() {
    let node = Node::plain();
    let archive = node.archive();
    let a = archive.to_str().unwrap();
    assert_code(&node.install(&["--archive", a]), 0);
    let bin = node.path("/usr/local/lib/soci-agent/releases/0.16.1-amd64/soci-snapshotter-grpc");
    std::fs::write(&bin, "#!/bin/sh\necho evil\n").unwrap();
    let out = node.install(&["--archive", a, "--output", "json"]);
    assert_code(&out, 0);
    assert_eq!(
        action(&json(&out), "/usr/local/lib/soci-agent/releases/0.16.1-amd64")["action"],
        "install_release"
    );
    assert!(!std::fs::read(&bin).unwrap().windows(4).any(|w| w == b"evil"));
}

#[test]
fn a_failure_mid_apply_rolls_everything_back() {
    let node = Node::plain();
    let archive = node.archive();
    // A file where a directory must go: the containerd drop-in cannot be written,
    // after the release, links and SOCI config were already applied.
    node.write("/etc/systemd/system/containerd.service.d", "in the way\n", 0o644);
    let before = node.tree();
    let out = node.install(&["--archive", archive.to_str().unwrap(), "--output", "json"]);
    assert_code(&out, 1);
    let report = json(&out);
    assert!(
        report["error"].as_str().unwrap().contains("containerd.service.d"),
        "{report:#}"
    );
    assert_eq!(node.tree(), before, "the node ends as it started");
}

/// Publishes the standard release on a loopback mirror.
fn mirror_with_release() -> (common::mirror::Mirror, String, Vec<u8>) {
    let mirror = common::mirror::Mirror::start();
    let bytes = standard_release(VER);
    let path = mirror.publish(VER, ARCHIVE, &bytes);
    (mirror, path, bytes)
}

#[test]
fn install_from_a_mirror_verifies_against_the_published_checksum_and_retries() {
    let node = Node::plain();
    let (mirror, path, bytes) = mirror_with_release();
    mirror.fault(&path, common::mirror::Fault::Status(503));
    let url = mirror.base_url();
    let out = node.install(&["--release-url", &url, "--output", "json", "--retries", "2"]);
    assert_code(&out, 0);
    assert_eq!(mirror.requests(&path), 2, "one 503, one success");
    let report = json(&out);
    assert_eq!(report["release"]["archive_sha256"], sha256_hex(&bytes));
    assert_eq!(
        report["release"]["verified_against"],
        mirror.url(&format!("{path}.sha256sum"))
    );
    // Second run: the verified store is kept, nothing is fetched again.
    let before = node.tree();
    let out = node.install(&["--release-url", &url, "--output", "json"]);
    assert_code(&out, 0);
    assert_eq!(json(&out)["changed"], false);
    assert_eq!(mirror.requests(&path), 2);
    assert_eq!(node.tree(), before);
}

#[test]
fn a_published_checksum_that_disagrees_exits_3() {
    let node = Node::plain();
    let (mirror, path, _) = mirror_with_release();
    mirror.put(
        &format!("{path}.sha256sum"),
        format!("{}  {ARCHIVE}\n", "ab".repeat(32)),
    );
    let before = node.tree();
    let out = node.install(&["--release-url", &mirror.base_url(), "--output", "json"]);
    assert_code(&out, 3);
    assert_eq!(node.tree(), before);
}

#[test]
fn a_pinned_digest_needs_no_checksum_file() {
    let node = Node::plain();
    let (mirror, path, bytes) = mirror_with_release();
    mirror.fault(&format!("{path}.sha256sum"), common::mirror::Fault::NotFound);
    let out = node.install(&["--release-url", &mirror.base_url(), "--sha256", &sha256_hex(&bytes)]);
    assert_code(&out, 0);
    assert_eq!(mirror.requests(&format!("{path}.sha256sum")), 0);
}

#[test]
fn missing_release_and_unreachable_mirror_exit_1_and_change_nothing() {
    let node = Node::plain();
    let mirror = common::mirror::Mirror::start();
    let before = node.tree();
    let out = node.install(&["--release-url", &mirror.base_url(), "--output", "json"]);
    assert_code(&out, 1);
    let err = json(&out)["error"].as_str().unwrap().to_string();
    assert!(err.contains("404") && err.contains(".sha256sum"), "{err}");
    assert_eq!(node.tree(), before);

    // A port nothing listens on: connect errors are retried, then exit 1.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = node.install(&[
        "--release-url",
        &format!("http://127.0.0.1:{port}"),
        "--retries",
        "1",
        "--output",
        "json",
    ]);
    assert_code(&out, 1);
    assert!(
        json(&out)["error"]
            .as_str()
            .unwrap()
            .contains(&format!("127.0.0.1:{port}"))
    );
    assert_eq!(node.tree(), before);
}

/// `install --dry-run` asks the mirror whether the release is there (HEAD of the archive and
/// of its `.sha256sum`), downloads nothing, and fails as the real run would when it is not.
#[test]
fn a_dry_run_checks_the_release_exists_without_downloading_it() {
    let node = Node::plain();
    let (mirror, path, _) = mirror_with_release();
    let before = node.tree();
    let out = node.install(&["--release-url", &mirror.base_url(), "--dry-run", "--output", "json"]);
    assert_code(&out, 0);
    let sum = format!("{path}.sha256sum");
    assert_eq!(
        (mirror.requests_by("HEAD", &path), mirror.requests_by("HEAD", &sum)),
        (1, 1),
        "one HEAD each"
    );
    assert_eq!(
        (mirror.requests_by("GET", &path), mirror.requests_by("GET", &sum)),
        (0, 0),
        "nothing downloaded"
    );
    assert!(
        json(&out)["notes"].to_string().contains("not downloaded"),
        "{}",
        json(&out)
    );

    // A mirror without this version: the dry run fails, naming the URL, and changes nothing.
    let out = node.install(&[
        "--release-url",
        &mirror.base_url(),
        "--soci-version",
        "0.15.0",
        "--dry-run",
        "--output",
        "json",
    ]);
    assert_code(&out, 1);
    let err = json(&out)["error"].as_str().unwrap().to_string();
    assert!(err.contains("404") && err.contains("0.15.0"), "{err}");
    assert_eq!(node.tree(), before);
}

/// containerd's `hosts.toml` mirrors and plain-HTTP registries are carried into SOCI's resolver
/// (the real SOCI's `config dump` accepts the file: install checks it), and doctor warns that
/// SOCI fetches layers past the mirror.
#[test]
fn registry_mirrors_of_hosts_toml_reach_soci_s_resolver() {
    let node = Node::plain();
    let archive = node.archive();
    containerd_with_a_mirror_and_a_plain_http_registry(&node);
    let out = node.install(&["--archive", archive.to_str().unwrap(), "--output", "json"]);
    assert_code(&out, 0);
    let cfg: toml_edit::DocumentMut = node.read("/etc/soci-snapshotter-grpc/config.toml").parse().unwrap();
    assert_eq!(
        resolver_mirrors(&cfg, "docker.io"),
        [("https://mirror.internal:8443".to_string(), false)]
    );
    assert_eq!(
        resolver_mirrors(&cfg, "10.0.0.5:5000"),
        [("http://10.0.0.5:5000".to_string(), true)]
    );
    assert!(json(&out)["notes"].to_string().contains("hosts.toml"), "{}", json(&out));
    doctor_warns_that_soci_fetches_past_the_mirror(&node);
}

/// containerd's config path `/etc/containerd/certs.d`: a mirror for docker.io, a plain-HTTP registry.
fn containerd_with_a_mirror_and_a_plain_http_registry(node: &Node) {
    node.write(
        "/etc/containerd/config.toml",
        "version = 3\n[plugins.'io.containerd.cri.v1.images'.registry]\nconfig_path = '/etc/containerd/certs.d'\n",
        0o644,
    );
    node.write(
        "/etc/containerd/certs.d/docker.io/hosts.toml",
        "server = \"https://registry-1.docker.io\"\n[host.\"https://mirror.internal:8443\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
        0o644,
    );
    node.write(
        "/etc/containerd/certs.d/10.0.0.5:5000/hosts.toml",
        "server = \"http://10.0.0.5:5000\"\n",
        0o644,
    );
}

/// (host, insecure) of each mirror SOCI's resolver has for `registry`.
fn resolver_mirrors(cfg: &toml_edit::DocumentMut, registry: &str) -> Vec<(String, bool)> {
    cfg["resolver"]["host"][registry]["mirrors"]
        .as_array_of_tables()
        .map(|a| {
            a.iter()
                .map(|t| {
                    (
                        t["host"].as_str().unwrap().to_string(),
                        t["insecure"].as_bool().unwrap(),
                    )
                })
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
}

fn doctor_warns_that_soci_fetches_past_the_mirror(node: &Node) {
    let doctor = Command::new(agent_bin())
        .args(["doctor", "--output", "json", "--no-live", "--root"])
        .arg(node.root())
        .output()
        .unwrap();
    let report = json(&doctor);
    let check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "containerd.registry-mirrors")
        .cloned()
        .unwrap_or_else(|| panic!("no mirror check: {report:#}"));
    assert_eq!(check["verdict"], "warn", "{check:#}");
    let evidence = check["evidence"].as_str().unwrap();
    assert!(
        evidence.contains("docker.io (mirrors mirror.internal:8443)") && !evidence.contains("does not list"),
        "{evidence}"
    );
}

/// Files and links only (directories soci-agent created may stay).
fn files(tree: &BTreeMap<PathBuf, String>) -> BTreeMap<PathBuf, String> {
    tree.iter()
        .filter(|(_, d)| !d.starts_with("dir"))
        .map(|(p, d)| (p.clone(), d.clone()))
        .collect()
}

#[test]
fn uninstall_restores_every_file_and_purge_removes_the_store() {
    let node = Node::plain();
    node.write("/usr/local/bin/soci", "#!/bin/sh\necho an older soci CLI\n", 0o755);
    let archive = node.archive();
    let before = node.tree();
    assert_code(&node.install(&["--archive", archive.to_str().unwrap()]), 0);
    assert!(node.path("/var/lib/soci-agent/record.json").exists());
    assert!(
        std::fs::symlink_metadata(node.path("/usr/local/bin/soci"))
            .unwrap()
            .file_type()
            .is_symlink()
    );

    let dry = node.run("uninstall", &["--dry-run", "--output", "json"], &[]);
    assert_code(&dry, 0);
    assert_eq!(action(&json(&dry), "/etc/containerd/config.toml")["action"], "restore");
    let out = node.run("uninstall", &["--output", "json"], &[]);
    assert_code(&out, 0);
    let after = files(&node.tree());
    let store: Vec<_> = after
        .keys()
        .filter(|p| p.starts_with("usr/local/lib/soci-agent"))
        .cloned()
        .collect();
    assert!(!store.is_empty(), "the store is kept without --purge");
    let without_store: BTreeMap<_, _> = after
        .into_iter()
        .filter(|(p, _)| !p.starts_with("usr/local/lib/soci-agent"))
        .collect();
    assert_eq!(without_store, files(&before), "every file as it was before install");

    // Again with --purge: nothing of soci-agent's is left.
    assert_code(&node.install(&["--archive", archive.to_str().unwrap()]), 0);
    assert_code(&node.run("uninstall", &["--purge"], &[]), 0);
    assert_eq!(files(&node.tree()), files(&before));
    // Nothing recorded: a no-op.
    assert_code(&node.run("uninstall", &[], &[]), 0);
}

/// `uninstall` keeps the store and points at `--purge`; `uninstall --purge` afterwards (no
/// record left) must still remove it, not answer "nothing to uninstall".
#[test]
fn purge_after_a_plain_uninstall_removes_the_store() {
    let node = Node::plain();
    let archive = node.archive();
    let before = node.tree();
    assert_code(&node.install(&["--archive", archive.to_str().unwrap()]), 0);
    let out = node.run("uninstall", &[], &[]);
    assert_code(&out, 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("--purge"), "{out:?}");
    let entry = node.path(&format!("/usr/local/lib/soci-agent/releases/{VER}-amd64"));
    assert!(entry.join("release.json").exists(), "the store is kept without --purge");

    let dry = node.run("uninstall", &["--purge", "--dry-run", "--output", "json"], &[]);
    assert_code(&dry, 0);
    assert!(entry.join("release.json").exists(), "--dry-run changes nothing");
    assert!(dry_text_names(&dry, &entry), "{}", String::from_utf8_lossy(&dry.stdout));

    let out = node.run("uninstall", &["--purge", "--output", "json"], &[]);
    assert_code(&out, 0);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("nothing to uninstall"), "{text}");
    assert!(text.contains("purged /usr/local/lib/soci-agent/releases/"), "{text}");
    assert_eq!(json(&out)["changed"], true, "{text}");
    assert!(!entry.exists(), "{text}");
    assert_eq!(files(&node.tree()), files(&before));
    // Nothing recorded and nothing stored: a no-op, even with --purge.
    let again = node.run("uninstall", &["--purge", "--output", "json"], &[]);
    assert_code(&again, 0);
    assert_eq!(json(&again)["changed"], false);
}

/// Whether a report names the store entry it would purge.
fn dry_text_names(out: &Output, entry: &Path) -> bool {
    let name = entry.file_name().unwrap().to_string_lossy().into_owned();
    String::from_utf8_lossy(&out.stdout).contains(&format!("would purge /usr/local/lib/soci-agent/releases/{name}"))
}

/// On an empty root: the node line reads "unknown OS, arch ..." (no stray space), a failed run
/// still leaves its report, and the README's table of files install writes lists the reports.
#[test]
fn empty_root_node_line_and_failed_runs_leave_their_report() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| install_under(dir.path(), args);
    // An archive beside the root: the dry run does not ask the network.
    let beside = tempfile::tempdir().unwrap();
    let archive = release_archive_in(beside.path());
    let dry = run(&[
        "--dry-run",
        "--containerd-version",
        "2.2",
        "--archive",
        archive.to_str().unwrap(),
    ]);
    assert_code(&dry, 0);
    assert_node_line_reads_unknown_os_without_stray_spaces(&dry);

    let failed = run(&[]);
    assert_code(&failed, 2);
    assert_the_failed_run_left_its_report(dir.path());
    assert_readme_lists_the_reports_among_the_files_install_writes();
}

/// `soci-agent install --root <root> --no-start <args>`, without the caller's config or output.
fn install_under(root: &Path, args: &[&str]) -> Output {
    Command::new(agent_bin())
        .arg("install")
        .arg("--root")
        .arg(root)
        .args(["--no-start"])
        .args(args)
        .env_remove("SOCI_AGENT_CONFIG")
        .env_remove("SOCI_AGENT_OUTPUT")
        .output()
        .unwrap()
}

/// The real release archive and its `.sha256sum` in `dir`; returns the archive's path.
fn release_archive_in(dir: &Path) -> PathBuf {
    let release = real::soci_release(VER);
    let archive = dir.join(&release.archive_name);
    std::fs::write(&archive, &release.archive).unwrap();
    std::fs::write(
        dir.join(format!("{}.sha256sum", release.archive_name)),
        &release.sha256sum,
    )
    .unwrap();
    archive
}

fn assert_node_line_reads_unknown_os_without_stray_spaces(dry: &Output) {
    let text = String::from_utf8_lossy(&dry.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("node: "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.starts_with("node: unknown OS, arch "), "{line}");
    assert!(!line.contains(" ,") && !line.contains("  "), "stray space: {line:?}");
}

fn assert_the_failed_run_left_its_report(root: &Path) {
    let reports = root.join("var/lib/soci-agent/reports");
    let saved: Vec<_> = std::fs::read_dir(&reports)
        .unwrap_or_else(|e| panic!("{}: {e}", reports.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("install-") && n.ends_with(".json"))
        .collect();
    assert!(
        !saved.is_empty(),
        "no report of the failed run in {}",
        reports.display()
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(reports.join(&saved[0])).unwrap()).unwrap();
    assert_eq!(report["exit_code"], 2, "{report:#}");
}

fn assert_readme_lists_the_reports_among_the_files_install_writes() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let table = readme
        .split("## Files install writes")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("README has the table of files install writes");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("| `/var/lib/soci-agent/reports/*.json`")),
        "{table}"
    );
}

#[test]
fn boot_verifies_the_binary_against_the_record() {
    let node = Node::plain();
    let archive = node.archive();
    assert_code(&node.install(&["--archive", archive.to_str().unwrap()]), 0);
    let out = node.run("boot", &["--output", "json"], &[]);
    assert_code(&out, 0);
    let report = json(&out);
    let step = |r: &serde_json::Value, name: &str| {
        r["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(step(&report, "verify-binary")["status"], "ok", "{report:#}");
    assert_eq!(step(&report, "pause-image")["status"], "skipped");

    std::fs::write(
        node.path("/usr/local/lib/soci-agent/releases/0.16.1-amd64/soci-snapshotter-grpc"),
        "tampered",
    )
    .unwrap();
    let out = node.run("boot", &["--output", "json"], &[]);
    assert_code(&out, 0);
    assert_eq!(step(&json(&out), "verify-binary")["status"], "failed");
    assert_code(&node.run("boot", &["--strict"], &[]), 1);
    let boots = std::fs::read_dir(node.path("/var/lib/soci-agent/reports"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("boot-"))
        .count();
    assert_eq!(boots, 3, "every boot run saves its report");
}

/// Content, mode and link targets only (a crashed-then-rerun install may
/// differ from a clean one in mtimes, nothing else).
fn shape(tree: &BTreeMap<PathBuf, String>) -> BTreeMap<PathBuf, String> {
    tree.iter()
        .filter(|(_, d)| !d.starts_with("dir"))
        .map(|(p, d)| (p.clone(), d.split(" mtime ").next().unwrap().to_string()))
        .collect()
}

#[test]
fn sigkill_at_any_point_then_rerun_converges_to_a_clean_install() {
    // A release with a large CLI entry widens the window where a kill lands mid-extraction.
    let big = common::archive::noise(8 << 20, 7);
    let daemon = common::archive::daemon_script(VER);
    let bytes = common::archive::release_tar_gz(&[
        ("soci-snapshotter-grpc", &daemon),
        ("soci", &big),
        ("THIRD_PARTY_LICENSES", b"licenses\n"),
        ("NOTICE.md", b"notice\n"),
    ]);
    // One archive path for every node: release.json records where the digest came from.
    let shared = Node::empty();
    let archive = shared.put_archive(ARCHIVE, &bytes);
    let write_archive = |_: &Node| archive.clone();
    let reference = Node::plain();
    let before = shape(&reference.tree());
    let a = write_archive(&reference);
    assert_code(&reference.install(&["--archive", a.to_str().unwrap()]), 0);
    let want = shape(&reference.tree());

    for delay_ms in [0u64, 10, 60, 200, 500] {
        let node = Node::plain();
        let a = write_archive(&node);
        sigkill_an_install_after(&node, &a, delay_ms);
        let out = node.install(&["--archive", a.to_str().unwrap()]);
        assert_code(&out, 0);
        assert_rerun_equals_a_clean_install(&node, &want, delay_ms);
        // The record is consistent: uninstall puts every original file back.
        assert_code(&node.run("uninstall", &["--purge"], &[]), 0);
        assert_eq!(
            shape(&node.tree()),
            before,
            "kill after {delay_ms} ms: uninstall did not restore the node"
        );
    }
}

/// Starts an install from `archive` and SIGKILLs it `delay_ms` later, wherever it is.
fn sigkill_an_install_after(node: &Node, archive: &Path, delay_ms: u64) {
    let mut child = Command::new(agent_bin())
        .arg("install")
        .arg("--root")
        .arg(node.root())
        .args([
            "--no-start",
            "--arch",
            "amd64",
            "--log-level",
            "error",
            "--archive",
            archive.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // The fault injection point, not a synchronisation: kill wherever it is.
    std::thread::sleep(std::time::Duration::from_millis(delay_ms));
    child.kill().ok(); // SIGKILL
    child.wait().unwrap();
}

/// No temp files left, and every file as one clean run leaves it (`want`).
fn assert_rerun_equals_a_clean_install(node: &Node, want: &BTreeMap<PathBuf, String>, delay_ms: u64) {
    let got = shape(&node.tree());
    let stray: Vec<_> = got
        .keys()
        .filter(|p| p.to_string_lossy().contains(".soci-agent-tmp"))
        .collect();
    assert!(stray.is_empty(), "kill after {delay_ms} ms left temp files: {stray:?}");
    let differs: Vec<_> = want
        .keys()
        .chain(got.keys())
        .filter(|k| want.get(*k) != got.get(*k))
        .map(|k| format!("{}: clean {:?} vs rerun {:?}", k.display(), want.get(k), got.get(k)))
        .collect();
    assert!(
        differs.is_empty(),
        "kill after {delay_ms} ms, then a rerun differs from one clean run:\n{}",
        differs.join("\n")
    );
}

#[test]
fn every_run_saves_its_report_and_textfile_gauges() {
    let node = Node::plain();
    let archive = node.archive();
    let a = archive.to_str().unwrap();
    assert_code(
        &node.install(&["--archive", a, "--textfile-dir", "/var/lib/node_exporter"]),
        0,
    );
    assert_code(
        &node.install(&["--archive", a, "--textfile-dir", "/var/lib/node_exporter"]),
        0,
    );
    let reports: Vec<_> = std::fs::read_dir(node.path("/var/lib/soci-agent/reports"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(reports.len(), 2, "one report per run");
    let prom = node.read("/var/lib/node_exporter/soci_agent_install.prom");
    assert!(
        prom.contains("soci_agent_last_run_exit_code{command=\"install\"} 0\n"),
        "{prom}"
    );
    assert!(
        prom.contains("soci_agent_phase_seconds{command=\"install\",phase=\"release\"}"),
        "{prom}"
    );
    // A usage error is not a run: nothing saved.
    assert_code(&node.install(&["--archive", a, "--soci-version", "0.1.0"]), 2);
    assert_eq!(
        std::fs::read_dir(node.path("/var/lib/soci-agent/reports"))
            .unwrap()
            .count(),
        2
    );
}

#[test]
fn daemon_flag_installs_the_daemon_unit_and_uninstall_removes_it() {
    let node = Node::plain();
    let archive = node.archive();
    let a = archive.to_str().unwrap();
    assert_code(&node.install(&["--archive", a]), 0);
    assert!(
        !node.path("/etc/systemd/system/soci-agent.service").exists(),
        "only with --daemon"
    );
    assert_code(&node.install(&["--archive", a, "--daemon"]), 0);
    let unit = node.read("/etc/systemd/system/soci-agent.service");
    assert!(
        unit.contains("ExecStart=/usr/local/bin/soci-agent daemon") && unit.contains("Type=notify"),
        "{unit}"
    );
    let out = node.install(&["--archive", a, "--daemon", "--output", "json"]);
    assert_code(&out, 0);
    assert_eq!(json(&out)["changed"], false);
    assert_code(&node.run("uninstall", &[], &[]), 0);
    assert!(!node.path("/etc/systemd/system/soci-agent.service").exists());
}
