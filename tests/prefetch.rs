//! `soci-agent prefetch` against real parts: the host's Debian containerd (1.6, CRI plugin on a
//! private socket, `tests/common/containerd.rs`) and Debian's `docker-registry` on a loopback port
//! (`tests/common/registry.rs`), holding small OCI images of random layers built and pushed here.
//! Nothing about either is mocked.
//!
//! - pulls N images, a missing tag and a bad reference fail per image (exit 4), the others succeed;
//!   SOCI's `discard_unpacked_layers = true` serializes images of one repository (issue 2035);
//! - a second run is all cache hits; `--pin` labels every CRI record of each image in containerd,
//!   `--unpin` removes the label; `--platform` on containerd 1.6 reports the other platform as
//!   unsupported;
//! - registry down: a per-image timeout names the last error; then down and brought up while the
//!   agent retries: the pull succeeds after more than one attempt;
//! - credentials: a test credential provider plugin (exec protocol) whose credentials an htpasswd
//!   registry requires -> pulled, the plugin run once per registry (its cache), wrong credentials
//!   -> a clear failure without retries, `--auth-file` -> pulled; no password in stdout, stderr
//!   or the report.
//!
//! Needs root, `/usr/bin/containerd` + `ctr` (containerd), `/usr/bin/docker-registry`
//! (docker-registry) and `htpasswd` (apache2-utils).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use common::containerd::{Containerd, wait_until};
use common::registry::{Pushed, Registry, base64};

const BIN: &str = env!("CARGO_BIN_EXE_soci-agent");
/// Bound for one prefetch run in these tests.
const RUN_BOUND: Duration = Duration::from_secs(90);
const PINNED: &str = "io.cri-containerd.pinned=pinned";

struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl From<Output> for Run {
    fn from(out: Output) -> Run {
        Run {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Run {
    fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("report is not JSON ({e}):\n{}", self.stdout))
    }
    fn show(&self) -> String {
        format!(
            "exit {:?}\nstdout:\n{}\nstderr:\n{}",
            self.code(),
            self.stdout,
            self.stderr
        )
    }
}

/// A node: its `--root` and the containerd serving CRI.
struct Node {
    root: PathBuf,
    containerd: Containerd,
}

impl Node {
    fn new(dir: &Path) -> Node {
        let root = dir.join("node");
        fs::create_dir_all(&root).unwrap();
        Node {
            root,
            containerd: Containerd::start(&dir.join("containerd")),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.args(["--log-level", "info", "prefetch"])
            .args(if args.contains(&"--retries") {
                &[][..]
            } else {
                &["--retries", "2"][..]
            })
            .arg("--root")
            .arg(&self.root)
            .arg("--cri-endpoint")
            .arg(self.containerd.endpoint())
            .arg("--containerd-address")
            .arg(&self.containerd.socket)
            .args(args)
            .env_remove("SOCI_AGENT_LOG")
            .env_remove("SOCI_AGENT_CONFIG")
            .env_remove("SOCI_AGENT_OUTPUT");
        cmd
    }

    fn prefetch(&self, args: &[&str]) -> Run {
        let out = common::containerd::run_bounded(&mut self.command(args), RUN_BOUND);
        Run::from(out)
    }
}

fn image<'a>(report: &'a Value, reference: &str) -> &'a Value {
    report["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["reference"] == reference || i["image"] == reference)
        .unwrap_or_else(|| panic!("{reference} not in report:\n{report:#}"))
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("prefetch-").tempdir_in("/tmp").unwrap()
}

#[test]
fn pulls_reports_failures_then_hits_pins_and_unpins() {
    let t0 = Instant::now();
    let tmp = tempdir();
    let registry = Registry::start_new(&tmp.path().join("registry"), None);
    let web1 = registry.push_random_image("team/web", "1", 3, 256 << 10);
    let web2 = registry.push_random_image("team/web", "2", 2, 256 << 10);
    let api = registry.push_random_image("team/api", "1", 2, 256 << 10);
    let node = Node::new(tmp.path());
    node.containerd.trust_plain_http(&registry.host());
    parallel_mode_discarding_unpacked_layers(&node);

    let missing = format!("{}/team/web:missing", registry.host());
    let bad = format!("{}/Team/Bad:1", registry.host());
    let good = [web1.reference.as_str(), web2.reference.as_str(), api.reference.as_str()];
    let run = pull_three_with_a_missing_a_bad_and_a_duplicate(&node, good, &missing, &bad);
    let report = run.json();
    assert_pulled_and_failed_per_image(&report, good, &missing, &bad);
    assert_one_repository_is_serialized(&report, &registry, &web1, &web2);
    assert_logged_and_in_containerd(&node, &run, good);
    eprintln!("first run: {:.1} s", t0.elapsed().as_secs_f64());

    let digest_ref = second_run_from_a_list_hits_and_pins(&node, tmp.path(), &registry, good, &web1);
    unpin_removes_the_pin_and_pulls_nothing(&node, good, &digest_ref, &missing);
    eprintln!("pulls/hits/pins: {:.1} s", t0.elapsed().as_secs_f64());
}

/// SOCI in parallel mode discarding unpacked layers: team/web's two tags must not overlap.
fn parallel_mode_discarding_unpacked_layers(node: &Node) {
    let soci = node.root.join("etc/soci-snapshotter-grpc");
    fs::create_dir_all(&soci).unwrap();
    fs::write(
        soci.join("config.toml"),
        "[pull_modes.parallel_pull_unpack]\nenable = true\ndiscard_unpacked_layers = true\n",
    )
    .unwrap();
}

/// The good images, a missing tag, a bad reference and a duplicate, three at a time: exit 4.
fn pull_three_with_a_missing_a_bad_and_a_duplicate(node: &Node, good: [&str; 3], missing: &str, bad: &str) -> Run {
    let mut args = good.to_vec();
    args.extend([missing, bad, good[0]]);
    args.extend(["--concurrency", "3", "--output", "json"]);
    let run = node.prefetch(&args);
    assert_eq!(run.code(), 4, "{}", run.show());
    run
}

fn assert_pulled_and_failed_per_image(report: &Value, good: [&str; 3], missing: &str, bad: &str) {
    assert_eq!(report["summary"]["pulled"], 3, "{report:#}");
    assert_eq!(report["summary"]["failed"], 2, "{report:#}");
    assert_eq!(report["summary"]["images"], 5, "duplicate dropped: {report:#}");
    for r in good {
        let i = image(report, r);
        assert_eq!(i["state"], "pulled", "{i:#}");
        assert_eq!(i["attempts"], 1, "{i:#}");
        assert_eq!(i["auth"], "anonymous", "{i:#}");
        assert!(i["bytes"].as_u64().unwrap() > 256 << 10, "{i:#}");
        assert!(i["image_id"].as_str().unwrap().starts_with("sha256:"), "{i:#}");
    }
    let m = image(report, missing);
    assert_eq!(
        (&m["state"], &m["attempts"]),
        (&Value::from("failed"), &Value::from(1)),
        "{m:#}"
    );
    assert!(m["error"].as_str().unwrap().contains("not found"), "{m:#}");
    let b = image(report, bad);
    assert_eq!(b["attempts"], 0, "{b:#}");
    assert!(
        b["error"].as_str().unwrap().contains("invalid image reference"),
        "{b:#}"
    );
}

/// SOCI's `discard_unpacked_layers = true` serializes images of one repository (issue 2035).
fn assert_one_repository_is_serialized(report: &Value, registry: &Registry, web1: &Pushed, web2: &Pushed) {
    let warnings = report["warnings"].to_string();
    assert!(
        warnings.contains("2035") && warnings.contains("same image"),
        "{warnings}"
    );
    assert_eq!(
        report["serialized_repos"],
        serde_json::json!([format!("{}/team/web", registry.host())])
    );
    // ... and they did not overlap (the intervals each image held its slot).
    let span = |r: &str| {
        let i = image(report, r);
        let start = i["started_at"].as_f64().unwrap();
        (start, start + i["seconds"].as_f64().unwrap())
    };
    let (a, b) = (span(&web1.reference), span(&web2.reference));
    assert!(a.1 <= b.0 || b.1 <= a.0, "team/web images overlapped: {a:?} {b:?}");
}

fn assert_logged_and_in_containerd(node: &Node, run: &Run, good: [&str; 3]) {
    // One structured log line per image (stderr is not a terminal), plus the summary.
    let lines: Vec<Value> = run
        .stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for r in good {
        assert!(
            lines
                .iter()
                .any(|l| l["image"] == r && l["state"] == "pulled" && l["bytes"].as_u64() > Some(0)),
            "no log line for {r}:\n{}",
            run.stderr
        );
    }
    let names = node.containerd.image_names();
    for r in good {
        assert!(
            names.iter().any(|n| n == r),
            "{r} not in containerd's k8s.io images: {names:?}"
        );
    }
}

/// Second run, from a list file and the agent config's [prefetch] table: all hits, pinned
/// (text report), and bake mode reports what containerd 1.6 cannot do. Returns web1's digest
/// reference, pinned too.
fn second_run_from_a_list_hits_and_pins(
    node: &Node,
    dir: &Path,
    registry: &Registry,
    good: [&str; 3],
    web1: &Pushed,
) -> String {
    let list = dir.join("images.txt");
    fs::write(
        &list,
        format!(
            "# images to prefetch\n{}\n\n{}  # the API\n{}\n",
            good[0], good[2], good[1]
        ),
    )
    .unwrap();
    let config = dir.join("agent.toml");
    fs::write(
        &config,
        "[install]\nretries = 1\n\n[prefetch]\nimages = [\"ignored:1\"]\npin = true\nconcurrency = 2\n\
         platform = [\"linux/amd64\", \"linux/arm64\", \"linux/arm/v7\"]\n",
    )
    .unwrap();
    let run = node.prefetch(&["--from", list.to_str().unwrap(), "--config", config.to_str().unwrap()]);
    assert_eq!(run.code(), 0, "{}", run.show());
    assert!(
        run.stdout.contains("prefetch: 3 images: 3 hit, 0 pulled, 0 failed"),
        "{}",
        run.show()
    );
    assert_eq!(run.stdout.matches("pinned").count(), 3, "{}", run.show());
    // containerd 2.x fetches the content of the other platforms (1.x could not).
    assert!(run.stdout.contains("linux/arm64: content fetched"), "{}", run.show());
    for r in good {
        let labels = node.containerd.image_labels(r).unwrap();
        assert!(labels.contains(PINNED), "{r}: {labels}");
    }
    // Every CRI record of the image carries it: tag, digest reference and ID.
    let digest_ref = format!("{}/team/web@{}", registry.host(), web1.manifest_digest);
    assert!(node.containerd.image_labels(&digest_ref).unwrap().contains(PINNED));
    digest_ref
}

fn unpin_removes_the_pin_and_pulls_nothing(node: &Node, good: [&str; 3], digest_ref: &str, missing: &str) {
    let mut args = good.to_vec();
    args.extend(["--unpin", "--output", "json"]);
    args.push(missing);
    let run = node.prefetch(&args);
    assert_eq!(run.code(), 0, "{}", run.show());
    let report = run.json();
    assert_eq!(report["summary"]["hit"], 3, "{report:#}");
    assert_eq!(
        image(&report, missing)["state"],
        "absent",
        "unpin pulls nothing: {report:#}"
    );
    for r in good.iter().copied().chain([digest_ref]) {
        let labels = node.containerd.image_labels(r).unwrap();
        assert!(!labels.contains(PINNED), "{r}: {labels}");
        assert!(
            labels.contains("io.cri-containerd.image=managed"),
            "other labels kept: {labels}"
        );
    }
    assert!(node.containerd.image_labels(missing).is_none());
}

#[test]
fn retries_until_the_registry_is_up() {
    let t0 = Instant::now();
    let tmp = tempdir();
    let mut registry = Registry::start_new(&tmp.path().join("registry"), None);
    let app = registry.push_random_image("slow/app", "1", 2, 128 << 10);
    registry.stop();
    let mut node = Node::new(tmp.path());
    node.containerd.trust_plain_http(&registry.host());

    // Down for good: the per-image bound ends it with the last error.
    let run = node.prefetch(&[&app.reference, "--timeout-per-image", "3", "--output", "json"]);
    assert_eq!(run.code(), 4, "{}", run.show());
    let i = run.json()["images"][0].clone();
    let error = i["error"].as_str().unwrap();
    assert!(
        error.contains("timed out after 3 s") && error.contains("connection refused"),
        "{i:#}"
    );
    assert!(i["attempts"].as_u64().unwrap() >= 2, "{i:#}");

    // Down, then up while the agent backs off: the next attempt pulls it.
    let stderr_path = tmp.path().join("prefetch.stderr");
    let stdout_path = tmp.path().join("prefetch.stdout");
    let mut child = node
        .command(&[&app.reference, "--retries", "8", "--output", "json"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(&stdout_path).unwrap())
        .stderr(fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    wait_until(
        "a retry after connection refused",
        Duration::from_secs(30),
        || {
            fs::read_to_string(&stderr_path)
                .unwrap_or_default()
                .contains("transient error, retrying")
        },
        || fs::read_to_string(&stderr_path).unwrap_or_default(),
    );
    registry.start();
    let Some(status) = common::wait_for_exit(&mut child, RUN_BOUND) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "prefetch still running; stderr:\n{}",
            fs::read_to_string(&stderr_path).unwrap()
        );
    };
    let stdout = fs::read_to_string(&stdout_path).unwrap();
    let stderr = fs::read_to_string(&stderr_path).unwrap();
    assert_eq!(status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let i = &report["images"][0];
    assert_eq!(i["state"], "pulled", "{i:#}");
    assert!(i["attempts"].as_u64().unwrap() >= 2, "{i:#}");
    node.containerd.assert_running();
    assert!(node.containerd.image_names().contains(&app.reference));
    eprintln!("retries: {:.1} s", t0.elapsed().as_secs_f64());
}

const USER: &str = "prefetch-user";
const PASSWORD: &str = "pw-Zq81-s3cret-never-logged";
const WRONG: &str = "pw-wrong-Kx02-also-never-logged";

/// Writes the plugin and a CredentialProviderConfig naming it; returns (config, bin dir, request log).
fn credential_provider(dir: &Path, registry: &str, password: &str) -> (PathBuf, PathBuf, PathBuf) {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap();
    let plugin = bin.join("test-credential-provider");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/prefetch/test-credential-provider.sh");
    fs::copy(&script, &plugin).unwrap();
    fs::set_permissions(&plugin, fs::Permissions::from_mode(0o755)).unwrap();
    let log = dir.join("requests.log");
    let config = serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1",
        "kind": "CredentialProviderConfig",
        "providers": [
            {
                "name": "ecr-credential-provider",
                "matchImages": ["*.dkr.ecr.*.amazonaws.com"],
                "defaultCacheDuration": "12h",
                "apiVersion": "credentialprovider.kubelet.k8s.io/v1"
            },
            {
                "name": "test-credential-provider",
                "matchImages": ["127.0.0.1:*", registry],
                "defaultCacheDuration": "1m",
                "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
                "args": ["get-credentials"],
                "env": [
                    {"name": "TEST_CREDENTIAL_REGISTRY", "value": registry},
                    {"name": "TEST_CREDENTIAL_USER", "value": USER},
                    {"name": "TEST_CREDENTIAL_PASSWORD", "value": password},
                    {"name": "TEST_CREDENTIAL_LOG", "value": log.to_str().unwrap()}
                ]
            }
        ]
    });
    let path = dir.join("config.json");
    fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
    (path, bin, log)
}

fn assert_no_secret(run: &Run) {
    for secret in [PASSWORD, WRONG, &base64(format!("{USER}:{PASSWORD}").as_bytes())] {
        assert!(
            !run.stdout.contains(secret) && !run.stderr.contains(secret),
            "a secret leaked into the output:\n{}",
            run.show()
        );
    }
}

#[test]
fn credentials_from_a_provider_plugin_and_an_auth_file() {
    let t0 = Instant::now();
    let tmp = tempdir();
    let registry = Registry::start_new(&tmp.path().join("registry"), Some((USER, PASSWORD)));
    let one = registry.push_random_image("private/one", "1", 2, 128 << 10);
    let two = registry.push_random_image("private/two", "1", 2, 128 << 10);
    let three = registry.push_random_image("private/three", "1", 1, 128 << 10);
    let node = Node::new(tmp.path());
    node.containerd.trust_plain_http(&registry.host());
    let host = registry.host();

    anonymous_is_refused_without_retries(&node, &one.reference);
    provider_credentials_pull_with_one_plugin_run(&node, tmp.path(), &host, [&one.reference, &two.reference]);
    let (config, bin, _) = credential_provider(&tmp.path().join("wrong"), &host, WRONG);
    wrong_credentials_fail_without_retries(&node, &three.reference, &config, &bin);
    an_auth_file_comes_before_the_provider(&node, tmp.path(), &host, &three.reference, &config, &bin);
    a_yaml_provider_config_is_exit_2(&node, tmp.path(), &one.reference);
    eprintln!("credentials: {:.1} s", t0.elapsed().as_secs_f64());
}

/// `--image-credential-provider-config <config> --image-credential-provider-bin-dir <bin>`.
fn provider_args<'a>(config: &'a Path, bin: &'a Path) -> [&'a str; 4] {
    [
        "--image-credential-provider-config",
        config.to_str().unwrap(),
        "--image-credential-provider-bin-dir",
        bin.to_str().unwrap(),
    ]
}

/// Anonymous: the registry refuses, clearly and without retries.
fn anonymous_is_refused_without_retries(node: &Node, reference: &str) {
    let run = node.prefetch(&[reference, "--output", "json"]);
    assert_eq!(run.code(), 4, "{}", run.show());
    let i = run.json()["images"][0].clone();
    assert_eq!(
        (&i["auth"], &i["attempts"]),
        (&Value::from("anonymous"), &Value::from(1)),
        "{i:#}"
    );
    // containerd 2.x: "pull access denied, ... authorization failed: no basic auth credentials".
    assert!(i["error"].as_str().unwrap().contains("authorization failed"), "{i:#}");
}

/// The plugin's credentials: both images pulled, the plugin run once (cacheKeyType Registry).
fn provider_credentials_pull_with_one_plugin_run(node: &Node, dir: &Path, host: &str, images: [&str; 2]) {
    let (config, bin, log) = credential_provider(&dir.join("provider"), host, PASSWORD);
    let mut args = vec![images[0], images[1], "--output", "json"];
    args.extend(provider_args(&config, &bin));
    let run = node.prefetch(&args);
    assert_eq!(run.code(), 0, "{}", run.show());
    assert_no_secret(&run);
    let report = run.json();
    for r in images {
        let i = image(&report, r);
        assert_eq!(i["state"], "pulled", "{i:#}");
        assert_eq!(i["auth"], "credential-provider:test-credential-provider", "{i:#}");
    }
    let requests: Vec<Value> = fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(requests.len(), 1, "cached per registry: {requests:?}");
    assert_eq!(requests[0]["apiVersion"], "credentialprovider.kubelet.k8s.io/v1");
    assert!(
        requests[0]["image"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{host}/private/"))
    );
}

/// Wrong credentials: a clear per-image failure, not retried, no secret shown.
fn wrong_credentials_fail_without_retries(node: &Node, reference: &str, config: &Path, bin: &Path) {
    let mut args = vec![reference];
    args.extend(provider_args(config, bin));
    let run = node.prefetch(&args);
    assert_eq!(run.code(), 4, "{}", run.show());
    assert_no_secret(&run);
    assert!(
        run.stdout.contains("failed") && run.stdout.contains("401 Unauthorized"),
        "{}",
        run.show()
    );
    assert!(
        !run.stderr.contains("retrying"),
        "authorization failures are not retried:\n{}",
        run.show()
    );
}

/// An explicit docker config.json comes first, even with a provider configured.
fn an_auth_file_comes_before_the_provider(
    node: &Node,
    dir: &Path,
    host: &str,
    reference: &str,
    config: &Path,
    bin: &Path,
) {
    let auth_file = dir.join("auth.json");
    let auth = base64(format!("{USER}:{PASSWORD}").as_bytes());
    fs::write(
        &auth_file,
        format!("{{\"auths\":{{\"http://{host}\":{{\"auth\":\"{auth}\"}}}}}}"),
    )
    .unwrap();
    let mut args = vec![reference, "--auth-file", auth_file.to_str().unwrap()];
    args.extend(provider_args(config, bin));
    args.extend(["--output", "json"]);
    let run = node.prefetch(&args);
    assert_eq!(run.code(), 0, "{}", run.show());
    assert_no_secret(&run);
    let i = run.json()["images"][0].clone();
    assert_eq!(
        (&i["state"], &i["auth"]),
        (&Value::from("pulled"), &Value::from("auth-file")),
        "{i:#}"
    );
}

/// A provider config that is not JSON is a configuration error (exit 2), nothing pulled.
fn a_yaml_provider_config_is_exit_2(node: &Node, dir: &Path, reference: &str) {
    let yaml = dir.join("provider.yaml");
    fs::write(
        &yaml,
        "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\n",
    )
    .unwrap();
    let run = node.prefetch(&[reference, "--image-credential-provider-config", yaml.to_str().unwrap()]);
    assert_eq!(run.code(), 2, "{}", run.show());
    assert!(run.stdout.contains("YAML is not supported"), "{}", run.show());
}

#[test]
fn boot_pulls_the_configured_images_and_saves_the_report() {
    let tmp = tempdir();
    let registry = Registry::start_new(&tmp.path().join("registry"), None);
    let app = registry.push_random_image("boot/app", "1", 2, 128 << 10);
    let node = Node::new(tmp.path());
    node.containerd.trust_plain_http(&registry.host());
    let config = tmp.path().join("agent.toml");
    fs::write(
        &config,
        format!(
            "[prefetch]\nimages = [{:?}]\ncri_endpoint = {:?}\ncontainerd_address = {:?}\nretries = 2\n",
            app.reference,
            node.containerd.endpoint(),
            node.containerd.socket.display().to_string()
        ),
    )
    .unwrap();
    let out = common::containerd::run_bounded(
        Command::new(BIN)
            .args(["--log-level", "info", "boot", "--output", "json", "--root"])
            .arg(&node.root)
            .arg("--config")
            .arg(&config),
        RUN_BOUND,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // No install record here: verify-binary fails, which is logged and, without --strict, exit 0.
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let step = report["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "prefetch"))
        .cloned();
    let step = step.unwrap_or_else(|| panic!("no prefetch step in {report:#}"));
    assert_eq!(step["status"], "ok", "{report:#}");
    assert!(step["detail"].as_str().unwrap().contains("1 pulled"), "{step:#}");
    let reports: Vec<String> = fs::read_dir(node.root.join("var/lib/soci-agent/reports"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(reports.iter().any(|n| n.starts_with("prefetch-")), "{reports:?}");
    assert!(reports.iter().any(|n| n.starts_with("boot-")), "{reports:?}");
}

/// A missing socket is not transient: prefetch stops at once, naming the socket and the flag
/// that sets it, and its JSON and text reports agree.
#[test]
fn a_missing_socket_fails_fast_naming_it_and_the_flag() {
    let tmp = tempdir();
    let root = tmp.path().join("node");
    fs::create_dir_all(&root).unwrap();
    let cri = tmp.path().join("no-containerd.sock");
    let run = |extra: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.args(["prefetch", "registry.invalid/team/app:1", "--root"])
            .arg(&root)
            .args(extra)
            .env_remove("SOCI_AGENT_CONFIG")
            .env_remove("SOCI_AGENT_OUTPUT");
        let started = Instant::now();
        let out = common::containerd::run_bounded(&mut cmd, RUN_BOUND);
        let run = Run::from(out);
        (run, started.elapsed())
    };
    let endpoint = format!("unix://{}", cri.display());
    let (json_run, took) = run(&["--cri-endpoint", &endpoint, "--output", "json"]);
    assert!(took < Duration::from_secs(5), "took {took:?}\n{}", json_run.show());
    assert_eq!(json_run.code(), 2, "{}", json_run.show());
    let report = json_run.json();
    let error = report["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {report:#}"));
    assert!(error.contains(&cri.display().to_string()), "{error}");
    assert!(error.contains("--cri-endpoint"), "{error}");
    assert!(error.contains("containerd"), "what to do: {error}");
    let (text_run, _) = run(&["--cri-endpoint", &endpoint]);
    assert_eq!(text_run.code(), 2, "{}", text_run.show());
    assert!(text_run.stdout.contains(error), "{}", text_run.show());
    assert!(!text_run.stdout.contains("attempts"), "{}", text_run.show());

    // The CRI socket is there, containerd's (for --pin) is not: that one is named.
    let listener = std::os::unix::net::UnixListener::bind(&cri).unwrap();
    let ctrd = tmp.path().join("no-ctrd.sock");
    let (pin_run, took) = run(&[
        "--cri-endpoint",
        &endpoint,
        "--containerd-address",
        ctrd.to_str().unwrap(),
        "--pin",
        "--output",
        "json",
    ]);
    drop(listener);
    assert!(took < Duration::from_secs(5), "took {took:?}\n{}", pin_run.show());
    assert_eq!(pin_run.code(), 2, "{}", pin_run.show());
    let error = pin_run.json()["error"].as_str().unwrap().to_string();
    assert!(
        error.contains(&ctrd.display().to_string()) && error.contains("--containerd-address"),
        "{error}"
    );
}

/// `--cri-endpoint` alone is enough: containerd serves CRI and its own API on one socket, so
/// pins go to the same socket (not to /run/containerd/containerd.sock).
#[test]
fn one_cri_endpoint_is_enough_to_pull_and_pin() {
    let tmp = tempdir();
    let registry = Registry::start_new(&tmp.path().join("registry"), None);
    let app = registry.push_random_image("team/app", "1", 1, 64 << 10);
    let node = Node::new(tmp.path());
    node.containerd.trust_plain_http(&registry.host());
    let mut cmd = Command::new(BIN);
    cmd.args([
        "prefetch",
        &app.reference,
        "--pin",
        "--retries",
        "0",
        "--output",
        "json",
        "--root",
    ])
    .arg(&node.root)
    .arg("--cri-endpoint")
    .arg(node.containerd.endpoint())
    .env_remove("SOCI_AGENT_CONFIG")
    .env_remove("SOCI_AGENT_CONTAINERD_ADDRESS")
    .env_remove("SOCI_AGENT_OUTPUT");
    let out = common::containerd::run_bounded(&mut cmd, RUN_BOUND);
    let run = Run::from(out);
    assert_eq!(run.code(), 0, "{}", run.show());
    let i = image(&run.json(), &app.reference).clone();
    assert_eq!(
        (&i["state"], &i["pinned"]),
        (&Value::from("pulled"), &Value::from(true)),
        "{i:#}"
    );
    assert!(node.containerd.image_labels(&app.reference).unwrap().contains(PINNED));
}
