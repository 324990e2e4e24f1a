//! End to end on an EKS AL2023-shaped node driven by the REAL nodeadm, in the AMI's boot order:
//! `nodeadm-config.service` at boot, then `soci-agent install` (where cloud-final runs user data),
//! then `nodeadm-run.service`. Then: SOCI runs the agent's verified release, containerd and
//! kubelet are wired to it through the NodeConfig drop-in nodeadm merged, a CRI pull through
//! kubelet's `imageServiceEndpoint` lands in the soci snapshotter, and `soci-agent doctor` has no
//! failing check.
//!
//! What is real:
//! - nodeadm, built from amazon-eks-ami 81fec2e8 (`common::real::nodeadm`), run by the AMI's own
//!   `nodeadm-config.service` and `nodeadm-run.service`, unmodified: it reads user data over
//!   IMDSv2, calls EC2 `DescribeInstances`, renders `/etc/containerd/config.toml` and kubelet's
//!   config from user data + `/etc/eks/nodeadm.d/`, restarts containerd and kubelet over D-Bus;
//! - the AMI's `kubelet.service`, `soci-snapshotter.service`/`.socket` (socket enabled, as on
//!   the AMI), `runtime.slice` and containerd's slice drop-in, byte for byte;
//! - systemd 252 (a booted Debian bookworm node, `common::nspawn`), containerd 2.2.9 + ctr,
//!   crictl 1.37.0, SOCI 0.16.1 (installed by the agent from a loopback mirror through its normal
//!   download path) and an older SOCI 0.15.0 preinstalled in `/usr/bin` as the AMI's package,
//!   Debian's docker-registry serving the pulled image, the agent binary.
//!
//! Stand-ins:
//! - AWS: IMDSv2 and the EC2 query API on host loopback (`common::imds`, real wire protocols),
//!   reached through the SDK's own environment variables (`AWS_EC2_METADATA_SERVICE_ENDPOINT`,
//!   `AWS_ENDPOINT_URL_EC2`, `AWS_REGION`, static keys), set by a test drop-in
//!   (`90-e2e-aws-standin.conf`) on the two nodeadm units. The AMI unit files are untouched.
//! - Things the AMI ships that are not under test, as small stub scripts: `/usr/bin/kubelet`
//!   (prints a version, then idles; its command line is what nodeadm passes), `/usr/sbin/iptables`
//!   (kubelet.service's `ExecStartPre`), `/etc/eks/image-credential-provider/ecr-credential-provider`
//!   (nodeadm only checks it exists). `/etc/eks/kubelet-version.txt` and
//!   `/etc/eks/containerd-version.txt` are the files the AMI build writes; `/etc/eks/pause.tar` is
//!   a one-layer OCI archive named like the AMI's pause image.
//! - There is no cloud-init: the test itself takes cloud-final's place. It runs the agent's install
//!   (the command the user data's shell part carries), then starts `nodeadm-run.service` (which
//!   the AMI orders `After=cloud-final.service`) with `--job-mode=ignore-requirements`: its
//!   `Requires=nodeadm-config.service` was met at boot, and a plain start would run the
//!   (by then inactive, oneshot) config unit a second time, which a real boot never does.
//!
//! States are read from the node (files, `/proc`, `systemctl`, `ctr`, `containerd config dump`)
//! and from its systemd over D-Bus from the host, never from log text. Waits are bounded.
//! A failing assertion prints the journal of the node (on drop) and the stand-ins' request log.
//!
//! Needs root, debootstrap, systemd-container (systemd-nspawn), nsenter, docker-registry, and the
//! rig (`tests/real/build.sh`: Go, gcc, zlib1g-dev).

mod common;

use std::fs;
use std::ops::Deref;
use std::time::{Duration, Instant};

use common::al2023::{AWS_DROPIN, CERTS_D, NODEADM_CONFIG, NODEADM_RUN, PAUSE_IMAGE, UNITS, ami_node, user_data};
use common::booted::{
    BOOT, Boot, Booted, CONTAINERD, CONTAINERD_CONFIG, CONTAINERD_DROPIN, NODECONFIG_DROPIN, SERVICE_DROPIN, SOCI,
    SOCKET, STORE_DAEMON, install_argv,
};
use common::imds::{AwsStandIn, Instance, Service};
use common::mirror::Mirror;
use common::nspawn::text;
use common::real;
use common::registry::Registry;
use serde_json::Value;

const VERSION: &str = real::SOCI_VERSION;
/// Bound of a D-Bus call from the host.
const DBUS_BOUND: Duration = Duration::from_secs(60);
/// Bound of `nodeadm-run.service` (nodeadm waits for containerd and kubelet to be active).
const NODEADM_RUN_BOUND: Duration = Duration::from_secs(180);
const KUBELET: &str = "kubelet.service";

const KUBELET_CONFIG: &str = "/etc/kubernetes/kubelet/config.json";
const KUBELET_CONFIG_DIR: &str = "/etc/kubernetes/kubelet/config.json.d";
const NODEADM_CACHE: &str = "/run/eks/nodeadm/config.json";
const SOCI_ENDPOINT: &str = "unix:///run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock";
const CONTAINERD_ENDPOINT: &str = "unix:///run/containerd/containerd.sock";

// ---------------------------------------------------------------------------------------------
// The node and its surroundings.

/// A booted node ([`Booted`]: the agent, D-Bus, the reads) and the servers it talks to.
struct Rig {
    // Field order = drop order: the node goes first (its D-Bus connection before it powers
    // off), the stand-ins and servers after it.
    booted: Booted,
    aws: AwsStandIn,
    mirror: Mirror,
    registry: Registry,
    _registry_dir: tempfile::TempDir,
}

impl Deref for Rig {
    type Target = Booted;
    fn deref(&self) -> &Booted {
        &self.booted
    }
}

impl Rig {
    /// The AWS stand-ins' request log, for assertion messages.
    fn aws_log(&self) -> String {
        self.aws
            .requests()
            .iter()
            .map(|r| format!("  {:?} {} {} -> {}\n", r.service, r.method, r.target, r.status))
            .collect()
    }

    /// Status, journal and the stand-ins' log of a nodeadm unit, for assertion messages.
    fn unit_story(&self, unit: &str) -> String {
        let journal = self
            .node
            .exec(&["journalctl", "-b", "-u", unit, "--no-pager", "-o", "cat"]);
        format!(
            "---- journalctl -u {unit} ----\n{}\n---- AWS stand-ins, requests ----\n{}",
            text(&journal.stdout),
            self.aws_log()
        )
    }
}

// ---------------------------------------------------------------------------------------------
// What the node is given.

/// Boots the node: the AMI's units, real nodeadm (nodeadm-config enabled, so it runs at boot
/// against the AWS stand-ins), the older real SOCI in /usr/bin, containerd 2.2.9 not enabled.
fn boot() -> Rig {
    let started = Instant::now();
    let registry_dir = tempfile::tempdir().unwrap();
    let registry = Registry::start_new(registry_dir.path(), None);
    let mirror = Mirror::start();
    real::soci_release(VERSION).publish(&mirror);
    let install = install_argv(&mirror);
    let aws = AwsStandIn::start(Instance::m5_xlarge(), Some(user_data(&install)));
    let booted = Booted::boot_with(
        ami_node(&aws, registry.host(), true),
        Boot {
            dbus_bound: DBUS_BOUND,
            started: Some(started),
            ..Boot::default()
        },
    );
    Rig {
        booted,
        aws,
        mirror,
        registry,
        _registry_dir: registry_dir,
    }
}

/// kubelet's effective `imageServiceEndpoint` as kubelet merges its files: `config.json`, then
/// `config.json.d/*.conf` in lexical order (later wins). Returns (value, file that set it).
fn kubelet_endpoint(rig: &Rig) -> (Option<(String, String)>, String) {
    let mut files = vec![KUBELET_CONFIG.to_string()];
    let mut dropins: Vec<String> = fs::read_dir(rig.node.path(KUBELET_CONFIG_DIR))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".conf"))
                .collect()
        })
        .unwrap_or_default();
    dropins.sort();
    files.extend(dropins.into_iter().map(|n| format!("{KUBELET_CONFIG_DIR}/{n}")));
    let mut value = None;
    let mut shown = String::new();
    for f in &files {
        let t = rig.read_text(f);
        shown.push_str(&format!("---- {f} ----\n{t}\n"));
        let v: Value = serde_json::from_str(&t).unwrap_or_else(|e| panic!("{f} is not JSON: {e}\n{t}"));
        assert_eq!(v["kind"], "KubeletConfiguration", "{f}\n{t}");
        if let Some(ep) = v["imageServiceEndpoint"].as_str() {
            value = Some((ep.to_string(), f.clone()));
        }
    }
    (value, shown)
}

// ---------------------------------------------------------------------------------------------

#[test]
fn nodeadm_config_then_install_then_nodeadm_run_wires_soci() {
    let rig = boot();
    let booted = rig.started.elapsed();
    let install = install_argv(&rig.mirror);

    // 1. nodeadm-config ran at boot: user data over IMDSv2, the instance from EC2, the config
    //    files rendered, nothing started.
    rig.step("nodeadm-config.service ran at boot");
    let config_invocation = nodeadm_config_asked_aws_at_boot(&rig);
    let rendered_at_boot = nodeadm_config_rendered_and_started_nothing(&rig);

    // 2. The agent's install, where cloud-final runs the user data's shell part.
    rig.step("soci-agent install (cloud-final's turn)");
    install_wires_the_node_and_starts_nothing(&rig, &install, &rendered_at_boot);

    // 3. nodeadm-run: merges user data + the drop-in, re-renders, starts containerd (whose
    //    Requires= starts SOCI) and kubelet.
    rig.step("nodeadm-run.service");
    nodeadm_run_merges_the_dropin(&rig, &config_invocation);
    rig.step("state after nodeadm-run");
    soci_runs_the_agents_release_in_the_amis_unit(&rig);
    containerd_reads_nodeadms_config_with_soci(&rig);
    let (endpoint, pause_snapshots) = kubelet_serves_images_through_soci(&rig);

    // 4. A pull through kubelet's image endpoint (SOCI's CRI proxy) lands in soci.
    rig.step("crictl pull through the SOCI image endpoint");
    crictl_pull_lands_in_soci(&rig, &endpoint, pause_snapshots);

    // 5. doctor: no failing check.
    rig.step("soci-agent doctor");
    doctor_has_no_failing_check(&rig);

    eprintln!(
        "AWS stand-ins' requests (nodeadm-config, then nodeadm-run):\n{}",
        rig.aws_log()
    );
    eprintln!(
        "nodeadm node: up in {booted:.1?} (nodeadm-config included), whole test {:.1?}",
        rig.started.elapsed()
    );
}

/// `nodeadm-config.service` succeeded at boot with the stand-ins' drop-in, after asking IMDS and
/// EC2 for what nodeadm needs, none refused. Returns its invocation id.
fn nodeadm_config_asked_aws_at_boot(rig: &Rig) -> String {
    let config = rig.unit(NODEADM_CONFIG);
    assert!(
        config.result == "success" && !config.invocation_id.is_empty() && config.active_state != "failed",
        "{NODEADM_CONFIG}: {config}\n{}",
        rig.unit_story(NODEADM_CONFIG)
    );
    assert!(
        config.drop_in_paths.iter().any(|p| p.ends_with(AWS_DROPIN)),
        "{config:?}"
    );
    let config_invocation = config.invocation_id.clone();
    let requests = rig.aws.requests();
    let asked = |service: Service, target: &str| {
        requests
            .iter()
            .any(|r| r.service == service && r.target == target && r.status == 200)
    };
    for (service, target) in [
        (Service::Imds, "/latest/api/token"),
        (Service::Imds, "/latest/user-data"),
        (Service::Imds, "/latest/dynamic/instance-identity/document"),
        (Service::Imds, "/latest/meta-data/mac"),
        (Service::Imds, "/latest/meta-data/local-ipv4"),
        (Service::Ec2, "DescribeInstances"),
    ] {
        assert!(
            asked(service, target),
            "nodeadm-config did not get {service:?} {target}\n{}",
            rig.unit_story(NODEADM_CONFIG)
        );
    }
    let refused: Vec<_> = requests.iter().filter(|r| r.status != 200).collect();
    assert!(
        refused.is_empty(),
        "requests the stand-ins refused: {refused:?}\n{}",
        rig.unit_story(NODEADM_CONFIG)
    );
    config_invocation
}

/// nodeadm's cache holds the EC2 answer and the cluster; containerd's and kubelet's configs are
/// rendered (containerd's without SOCI); nothing started but the AMI's socket. Returns
/// containerd's config as rendered at boot.
fn nodeadm_config_rendered_and_started_nothing(rig: &Rig) -> String {
    let cache: Value =
        serde_json::from_str(&rig.read_run(NODEADM_CACHE).expect("nodeadm's config cache")).expect("the cache is JSON");
    let instance = rig.aws.instance();
    assert_eq!(
        cache["status"]["instance"]["privateDnsName"], instance.private_dns_name,
        "the EC2 answer in nodeadm's cache: {cache:#}"
    );
    assert_eq!(cache["spec"]["cluster"]["name"], "soci-e2e", "{cache:#}");
    let rendered_at_boot = rig.read_text(CONTAINERD_CONFIG);
    assert!(
        !rendered_at_boot.contains("soci"),
        "no SOCI before the agent:\n{rendered_at_boot}"
    );
    assert!(rig.read(KUBELET_CONFIG).is_some(), "{KUBELET_CONFIG} not rendered");
    assert_eq!(rig.is_active(CONTAINERD), "inactive", "nodeadm-config starts nothing");
    assert_eq!(rig.is_active(KUBELET), "inactive");
    assert_eq!(rig.is_active(SOCI), "inactive");
    assert_eq!(rig.is_active(SOCKET), "active", "the AMI's socket listens from boot");
    rendered_at_boot
}

/// install plans nodeadm wiring and the verified release, writes its drop-ins, leaves
/// containerd's config to nodeadm and starts nothing; doctor only warns until nodeadm-run.
fn install_wires_the_node_and_starts_nothing(rig: &Rig, install: &[String], rendered_at_boot: &str) {
    let run = rig.agent("install", install);
    run.expect_code(0);
    assert_eq!(run.report["plan"]["wiring"], "nodeadm", "{}", run.show());
    assert_eq!(
        run.report["plan"]["soci"]["origin"],
        "release",
        "the AMI's SOCI 0.15.0 is replaced by the verified release\n{}",
        run.show()
    );
    for path in [NODECONFIG_DROPIN, SERVICE_DROPIN, CONTAINERD_DROPIN] {
        assert!(rig.read(path).is_some(), "{path} missing\n{}", run.show());
    }
    assert_eq!(
        rig.read_text(CONTAINERD_CONFIG),
        rendered_at_boot,
        "the agent must leave containerd's config to nodeadm\n{}",
        run.show()
    );
    for unit in [CONTAINERD, SOCI, KUBELET] {
        assert_eq!(
            rig.is_active(unit),
            "inactive",
            "{unit} started by install\n{}",
            run.show()
        );
    }
    let soci = rig.unit(SOCI);
    assert_eq!(soci.unit_file_state, "enabled", "{soci:?}");
    assert!(!soci.need_daemon_reload, "{soci:?}");
    let doctor = rig.doctor();
    for id in ["nodeadm.dropin", "kubelet.image-service-endpoint"] {
        assert_eq!(
            doctor.verdict(id),
            "warn",
            "{id}: before nodeadm-run the drop-in is not applied yet\n{}",
            doctor.show()
        );
    }
    // Waiting for nodeadm-run is not a failure: user data running `install && doctor` passes.
    doctor.expect_no_failing_check("doctor before nodeadm-run");
}

/// `nodeadm-run.service` succeeds without running nodeadm-config again, reads user data (nothing
/// refused) and merges the agent's drop-in into its config.
fn nodeadm_run_merges_the_dropin(rig: &Rig, config_invocation: &str) {
    let requests_before = rig.aws.requests().len();
    let out = rig.node.exec_timeout(
        &["systemctl", "start", "--job-mode=ignore-requirements", NODEADM_RUN],
        NODEADM_RUN_BOUND,
    );
    // systemctl waits for the oneshot's start job and fails unless it succeeded. (Its D-Bus
    // state is gone by then: nothing references the finished unit, so systemd unloads it.)
    assert!(
        out.status.success(),
        "systemctl start {NODEADM_RUN}: {} {}\n{}",
        out.status,
        text(&out.stderr),
        rig.unit_story(NODEADM_RUN)
    );
    assert_eq!(
        rig.unit(NODEADM_CONFIG).invocation_id,
        config_invocation,
        "{NODEADM_CONFIG} ran again"
    );
    let run_requests = &rig.aws.requests()[requests_before..];
    assert!(
        run_requests
            .iter()
            .any(|r| r.target == "/latest/user-data" && r.status == 200),
        "nodeadm-run did not read user data\n{}",
        rig.unit_story(NODEADM_RUN)
    );
    let refused: Vec<_> = run_requests.iter().filter(|r| r.status != 200).collect();
    assert!(
        refused.is_empty(),
        "refused: {refused:?}\n{}",
        rig.unit_story(NODEADM_RUN)
    );
    let cache: Value = serde_json::from_str(&rig.read_run(NODEADM_CACHE).unwrap()).unwrap();
    assert_eq!(
        cache["spec"]["kubelet"]["config"]["imageServiceEndpoint"], SOCI_ENDPOINT,
        "the drop-in is in nodeadm's merged config: {cache:#}"
    );
}

/// SOCI runs the agent's release: the AMI's unit, kept as is, with the agent's drop-in.
fn soci_runs_the_agents_release_in_the_amis_unit(rig: &Rig) {
    let soci = rig.unit(SOCI);
    assert!(
        soci.is_active() && soci.sub_state == "running",
        "{SOCI}: {soci}\n{}",
        rig.unit_story(NODEADM_RUN)
    );
    assert!(soci.drop_in_paths.iter().any(|p| p == SERVICE_DROPIN), "{soci:?}");
    let exe = rig.exe(soci.main_pid);
    assert_eq!(exe, STORE_DAEMON, "{SOCI} runs {exe}, not the agent's release");
    let ami = real::ami_runtime().join("rootfs/etc/systemd/system");
    for name in common::al2023::AMI_UNITS {
        assert_eq!(
            rig.read(&format!("{UNITS}/{name}")),
            fs::read(ami.join(name)).ok(),
            "the AMI's {name} must stay byte-identical"
        );
    }
    assert!(
        rig.read("/usr/bin/soci-snapshotter-grpc").is_some(),
        "the AMI's binary stays"
    );
    assert!(rig.unit(SOCKET).is_active());
    let containerd = rig.unit(CONTAINERD);
    assert!(containerd.is_active(), "{CONTAINERD}: {containerd}");
    assert!(
        containerd.drop_in_paths.iter().any(|p| p == CONTAINERD_DROPIN),
        "{containerd:?}"
    );
    rig.assert_soci_plugin_ok("after nodeadm-run");
}

/// containerd's config, as nodeadm rendered it and containerd reads it.
fn containerd_reads_nodeadms_config_with_soci(rig: &Rig) {
    let (doc, dump) = rig.assert_containerd_reads_soci("after nodeadm-run");
    assert_eq!(
        doc["proxy_plugins"]["soci"]["exports"]["root"].as_str(),
        Some("/var/lib/soci-snapshotter-grpc"),
        "{dump}"
    );
    let images = &doc["plugins"]["io.containerd.cri.v1.images"];
    assert_eq!(
        images["registry"]["config_path"].as_str(),
        Some(CERTS_D),
        "the user data's registry config_path survives the merge\n{dump}"
    );
    assert_eq!(
        images["pinned_images"]["sandbox"].as_str(),
        Some(PAUSE_IMAGE),
        "nodeadm's template\n{dump}"
    );
}

/// kubelet: running with nodeadm's files, which point its image service at SOCI; the pause
/// image already in soci. Returns the endpoint and the pause image's soci snapshots.
fn kubelet_serves_images_through_soci(rig: &Rig) -> (String, usize) {
    let kubelet = rig.unit(KUBELET);
    assert!(kubelet.is_active(), "{KUBELET}: {kubelet}");
    let args = rig.cmdline(kubelet.main_pid);
    for want in [
        format!("--config={KUBELET_CONFIG}"),
        format!("--config-dir={KUBELET_CONFIG_DIR}"),
    ] {
        assert!(args.contains(&want), "kubelet runs without {want}: {args:?}");
    }
    let (endpoint, files) = kubelet_endpoint(rig);
    let endpoint = endpoint.unwrap_or_else(|| panic!("imageServiceEndpoint unset in kubelet's config\n{files}"));
    assert_eq!(endpoint.0, SOCI_ENDPOINT, "set by {}\n{files}", endpoint.1);
    let base: Value = serde_json::from_str(&rig.read_text(KUBELET_CONFIG)).unwrap();
    assert_eq!(base["containerRuntimeEndpoint"], CONTAINERD_ENDPOINT, "{files}");

    // The agent's boot unit (wanted by kubelet) put the pause image into soci before kubelet.
    let boot_unit = rig.unit(BOOT);
    assert_eq!(
        (boot_unit.active_state.as_str(), boot_unit.result.as_str()),
        ("active", "success"),
        "{BOOT}: {boot_unit}"
    );
    let pause_snapshots = rig.assert_image_in_soci(PAUSE_IMAGE);
    (endpoint.0, pause_snapshots)
}

/// `crictl pull` through `endpoint`: one soci snapshot per layer more, the layers' files
/// unpacked in SOCI's store, the image listed through SOCI.
fn crictl_pull_lands_in_soci(rig: &Rig, endpoint: &str, pause_snapshots: usize) {
    let image = rig.registry.push_random_image("app", "v1", 4, 1 << 20);
    let out = rig.node.exec_timeout(
        &["crictl", "--image-endpoint", endpoint, "pull", &image.reference],
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "crictl pull through {}: {}\n{}{}",
        endpoint,
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    let (committed, list) = rig.soci_committed();
    assert_eq!(
        committed,
        pause_snapshots + image.layer_digests.len(),
        "soci snapshots after the pull:\n{list}"
    );
    // The layers' files are in SOCI's own store (each test layer holds data/app-v1-N.bin).
    let unpacked = rig.node.check(&[
        "sh",
        "-c",
        "ls /var/lib/soci-snapshotter-grpc/snapshotter/snapshots/*/fs/data/",
    ]);
    for i in 0..image.layer_digests.len() {
        assert!(
            unpacked.lines().any(|l| l == format!("app-v1-{i}.bin")),
            "layer {i} not unpacked by SOCI:\n{unpacked}"
        );
    }
    let listed = rig.node.check(&[
        "crictl",
        "--image-endpoint",
        SOCI_ENDPOINT,
        "images",
        "--digests",
        "--no-trunc",
    ]);
    assert!(
        listed.contains("127.0.0.1") && listed.contains(&image.manifest_digest),
        "crictl images through SOCI:\n{listed}"
    );
}

/// doctor: no failing check, the nodeadm and live checks ok; the checks not ok are shown.
fn doctor_has_no_failing_check(rig: &Rig) {
    let doctor = rig.doctor();
    doctor.expect_no_failing_check("doctor");
    for id in [
        "nodeadm.dropin",
        "kubelet.image-service-endpoint",
        "live.containerd-soci",
        "live.pause-image",
    ] {
        assert_eq!(doctor.verdict(id), "ok", "{id}\n{}", doctor.show());
    }
    let not_ok: Vec<String> = doctor.report["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["verdict"] != "ok")
        .map(|c| {
            let f = |k: &str| c[k].as_str().unwrap_or("?").to_owned();
            format!("  {} {}: {}", f("verdict"), f("id"), f("evidence"))
        })
        .collect();
    eprintln!("doctor, checks not ok (none fails):\n{}", not_ok.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// The daemon on the same node: its desired state is what install was asked to do.

const AGENT_CONFIG: &str = "/etc/soci-agent/config.toml";
const AGENT_SERVICE: &str = "soci-agent.service";
const SOCI_CONFIG: &str = "/etc/soci-snapshotter-grpc/config.toml";
/// How long a repair may take to show (the bound: within 30 s, at a 2 s interval).
const REPAIR_BOUND: Duration = Duration::from_secs(30);

/// `soci-agent daemon --query` inside the node, as JSON.
fn daemon_state(rig: &Rig) -> Value {
    let out = rig.node.exec(&[common::booted::INSTALLED_AGENT, "daemon", "--query"]);
    assert!(
        out.status.success(),
        "daemon --query: {} {}",
        out.status,
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("daemon --query is not JSON: {e}"))
}

/// Polls the daemon's state until `done` holds (bounded; `what` names the wait in the panic).
fn wait_state(rig: &Rig, what: &str, bound: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + bound;
    loop {
        let state = daemon_state(rig);
        if done(&state) {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {bound:?}\nlast state: {state:#}\n{}",
            rig.unit_story(AGENT_SERVICE)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Polls node state until `done` holds (bounded).
fn wait_until(rig: &Rig, what: &str, bound: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + bound;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {bound:?}\ndaemon: {:#}\n{}",
            daemon_state(rig),
            rig.unit_story(AGENT_SERVICE)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The verdict of check `id` in the daemon's state.
fn check_verdict(state: &Value, id: &str) -> String {
    state["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["id"] == id))
        .map(|c| {
            format!(
                "{}: {}",
                c["verdict"].as_str().unwrap_or("?"),
                c["evidence"].as_str().unwrap_or("")
            )
        })
        .unwrap_or_else(|| format!("no check {id}"))
}

/// `/metrics` over HTTP from the host, parsed by a Prometheus text-format parser.
fn scrape(port: u16) -> prometheus_parse::Scrape {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to /metrics");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read /metrics");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let lines = body.lines().map(|l| Ok(l.to_owned()));
    prometheus_parse::Scrape::parse(lines).expect("/metrics parses as Prometheus text")
}

fn metric(scrape: &prometheus_parse::Scrape, name: &str) -> f64 {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name)
        .unwrap_or_else(|| panic!("no sample {name} in /metrics"));
    match sample.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        ref other => panic!("{name}: {other:?}"),
    }
}

/// User data's way: `install --release-url M --soci-version V --daemon` with a config file that
/// holds only a `[daemon]` table. The daemon must then want what install was asked (no drift),
/// restart nothing while idle, start a stopped snapshotter, bring back containerd when stopping
/// the snapshotter took it down, put back the SOCI config byte for byte, and count its repairs
/// in `/metrics`.
#[test]
fn the_daemon_holds_the_node_to_what_install_was_asked() {
    let rig = boot();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    fs::create_dir_all(rig.node.path("/etc/soci-agent")).unwrap();
    fs::write(
        rig.node.path(AGENT_CONFIG),
        format!("[daemon]\ninterval = \"2s\"\nrepair = true\nmetrics_address = \"127.0.0.1:{port}\"\n"),
    )
    .unwrap();

    rig.step("install --daemon, then nodeadm-run");
    install_daemon_which_waits_for_nodeadm_run(&rig);
    rig.step("no drift right after install with flags");
    let first = no_drift_right_after_install(&rig);
    rig.step("idle: no restart of SOCI or containerd");
    let containerd_run = idle_restarts_nothing(&rig, &first);
    rig.step("a stopped snapshotter, containerd left running");
    stopped_snapshotter_comes_back_alone(&rig, &containerd_run);
    rig.step("systemctl stop soci-snapshotter: containerd goes down with it");
    stopped_snapshotter_and_containerd_come_back(&rig);
    rig.step("a drifted SOCI config is put back byte for byte");
    drifted_soci_config_is_put_back(&rig);
    rig.step("/metrics counts the repairs");
    metrics_count_the_repairs(&rig, port);
}

/// `install --daemon`: the daemon reconciles, but starts neither containerd nor SOCI before
/// `nodeadm-run.service`, which then starts both.
fn install_daemon_which_waits_for_nodeadm_run(rig: &Rig) {
    let mut install = install_argv(&rig.mirror);
    install.push("--daemon".into());
    let run = rig.agent("install", &install);
    run.expect_code(0);
    // The daemon may run before nodeadm-run: containerd (never started since boot) and the
    // snapshotter are nodeadm-run's to start, after it has rendered the config.
    if !rig.unit(AGENT_SERVICE).is_active() {
        rig.start(AGENT_SERVICE);
    }
    let early = wait_state(rig, "two reconciles before nodeadm-run", REPAIR_BOUND, |s| {
        s["reconciles"].as_u64() >= Some(2)
    });
    assert_eq!(
        rig.is_active(CONTAINERD),
        "inactive",
        "the daemon started containerd before nodeadm-run"
    );
    assert_eq!(
        rig.is_active(SOCI),
        "inactive",
        "the daemon started SOCI before nodeadm-run"
    );
    assert_eq!(early["repairs"]["total"], 0, "{early:#}");
    let out = rig.node.exec_timeout(
        &["systemctl", "start", "--job-mode=ignore-requirements", NODEADM_RUN],
        NODEADM_RUN_BOUND,
    );
    assert!(out.status.success(), "{NODEADM_RUN}\n{}", rig.unit_story(NODEADM_RUN));
    assert!(rig.unit(CONTAINERD).is_active() && rig.unit(SOCI).is_active());
}

/// The daemon wants what install was asked (no drift), its flags recorded as such. Returns the
/// state it showed.
fn no_drift_right_after_install(rig: &Rig) -> Value {
    let first = wait_state(rig, "two reconciles", REPAIR_BOUND, |s| {
        s["reconciles"].as_u64() >= Some(2)
    });
    let drift = check_verdict(&first, "agent.drift");
    assert!(drift.starts_with("ok"), "agent.drift after install: {drift}\n{first:#}");
    let desired = first["config"]["desired"].as_array().cloned().unwrap_or_default();
    let source = |key: &str| {
        desired
            .iter()
            .find(|o| o["key"] == key)
            .map(|o| (o["value"].clone(), o["source"].clone()))
    };
    assert_eq!(
        source("soci_version"),
        Some((Value::from(VERSION), Value::from("recorded-flag"))),
        "{desired:?}"
    );
    assert_eq!(source("release_url").map(|v| v.1), Some(Value::from("recorded-flag")));
    first
}

/// Three more reconciles with nothing drifted: no repair, SOCI and containerd not restarted.
/// Returns containerd's invocation id.
fn idle_restarts_nothing(rig: &Rig, first: &Value) -> String {
    let (soci_run, containerd_run) = (rig.unit(SOCI).invocation_id, rig.unit(CONTAINERD).invocation_id);
    let seen = first["reconciles"].as_u64().unwrap();
    let idle = wait_state(rig, "three more reconciles", REPAIR_BOUND, |s| {
        s["reconciles"].as_u64() >= Some(seen + 3)
    });
    assert_eq!(idle["repairs"]["total"], 0, "{idle:#}");
    assert_eq!(
        rig.unit(SOCI).invocation_id,
        soci_run,
        "SOCI restarted while nothing drifted"
    );
    assert_eq!(
        rig.unit(CONTAINERD).invocation_id,
        containerd_run,
        "containerd restarted while idle"
    );
    containerd_run
}

/// The snapshotter (and its socket) stopped with containerd left running: started again,
/// containerd not restarted.
fn stopped_snapshotter_comes_back_alone(rig: &Rig, containerd_run: &str) {
    let out = rig
        .node
        .exec(&["systemctl", "stop", "--job-mode=ignore-dependencies", SOCKET, SOCI]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!rig.unit(SOCI).is_active() && rig.unit(CONTAINERD).is_active());
    wait_until(rig, "the snapshotter running again", REPAIR_BOUND, || {
        rig.unit(SOCI).is_active() && rig.unit(SOCKET).is_active()
    });
    assert_eq!(
        rig.unit(CONTAINERD).invocation_id,
        containerd_run,
        "starting the snapshotter must not restart containerd"
    );
}

/// `systemctl stop soci-snapshotter` takes containerd down too: both running again.
fn stopped_snapshotter_and_containerd_come_back(rig: &Rig) {
    let out = rig.node.exec(&["systemctl", "stop", SOCI]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let containerd = rig.unit(CONTAINERD);
    assert!(!containerd.is_active(), "Requires= stops containerd too: {containerd}");
    wait_until(
        rig,
        "containerd and the snapshotter running again",
        REPAIR_BOUND,
        || rig.unit(SOCI).is_active() && rig.unit(CONTAINERD).is_active(),
    );
}

/// A hand-edited SOCI config is put back byte for byte.
fn drifted_soci_config_is_put_back(rig: &Rig) {
    let written = rig.read(SOCI_CONFIG).expect("install wrote the SOCI config");
    fs::write(
        rig.node.path(SOCI_CONFIG),
        b"# edited by hand\n[pull_modes.parallel_pull_unpack]\nenable = false\n",
    )
    .unwrap();
    wait_until(rig, "the SOCI config restored", REPAIR_BOUND, || {
        rig.read(SOCI_CONFIG).as_deref() == Some(written.as_slice())
    });
}

/// `/metrics` counts the repairs: at least the three above, and no fewer than the status shows.
fn metrics_count_the_repairs(rig: &Rig, port: u16) {
    let state = daemon_state(rig);
    let scrape = scrape(port);
    let repairs = metric(&scrape, "soci_agent_repairs_total");
    assert!(repairs >= 3.0, "repairs counted: {repairs}\n{state:#}");
    let counted = state["repairs"]["total"].as_f64().unwrap_or(f64::MAX);
    assert!(repairs >= counted, "/metrics {repairs} < status {counted}\n{state:#}");
}
