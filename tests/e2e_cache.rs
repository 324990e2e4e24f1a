//! The snapshot cache end to end, with real containerd v2.4.2 and real SOCI v0.16.1 in booted
//! systemd nodes (nspawn). A loop device bound into the node stands in for the EBS volume
//! (there is no udev in the node; soci-agent-volume.service waits for the device node itself).
//!
//! 1. Builder: a blank 3 GiB volume; `install --data-volume DEV --format-data-volume` formats
//!    and mounts it under both daemons' roots; `boot` imports the AMI's pause image onto the
//!    blank volume; `cache seal` refuses while an image is missing; `prefetch` pulls a 512 MiB image (4 layers)
//!    through CRI into SOCI from a registry behind a per-connection rate limit; `cache seal`
//!    stops the daemons, writes the manifest and unmounts.
//! 2. The volume file is copied (= the snapshot restored) and attached to a fresh node: a
//!    device mounted elsewhere and a read-only one are refused first (exit 2, nothing left
//!    mounted), a snapshotter that cannot start rolls the install back (exit 1, volume
//!    unmounted), then `install --data-volume DEV` exits 0, `cache verify` exits 0, `crictl
//!    inspecti` finds the image, its 4 layers are committed snapshots in soci, `prefetch`
//!    reports a hit, and the registry's front sees zero blob downloads from that node.
//!
//! 3. The builder on an EKS AL2023-shaped node with the real nodeadm (containerd 2.2.9): install
//!    starts nothing; nodeadm-run starts containerd, and the volume unit is active before SOCI
//!    and containerd (systemd's own timestamps); the boot unit imports the AMI's pause image onto
//!    the blank volume; prefetch and seal.
//!
//! Needs root, losetup, nginx, docker-registry and the rig (tests/real/build.sh).

mod common;

use std::path::Path;
use std::time::Instant;

use common::archive::oci_image_tar;
use common::booted::{AgentRun, Booted, INSTALLED_AGENT};
use common::loopdev::{Loop, copy_sparse};
use common::nspawn::{NodeOptions, text};
use common::ratelimit::Front;
use common::real::{self, NodeContainerdConfig, with_containerd};
use common::registry::Registry;

const LAYERS: usize = 4;
const LAYER_MIB: usize = 128;
const VOLUME_BYTES: u64 = 3 << 30;
const LIMIT: &str = "25m";
const PAUSE_IMAGE: &str = "localhost/kubernetes/pause:latest";
/// Test-only drop-in that makes the snapshotter fail to start (no retries).
const FAIL_DROPIN: &str = "/etc/systemd/system/soci-snapshotter.service.d/05-e2e-fail.conf";

/// A node with the rig's containerd 2.4.2 (running at boot), trusting `front` over plain
/// HTTP, with `volumes` bound in at the same paths.
fn node(front: &str, volumes: &[&Loop]) -> Booted {
    let host = front.to_string();
    let mut opts = with_containerd(NodeOptions::new(), "2.4.2", NodeContainerdConfig::RegistryOnly)
        .prepare(move |root: &Path| real::trust_plain_http(root, &host));
    for v in volumes {
        opts = opts.bind(&v.device, &v.dev());
    }
    Booted::boot(opts)
}

fn findmnt(b: &Booted, at: &str) -> String {
    text(&b.node.exec(&["findmnt", "-n", "-o", "SOURCE", at]).stdout)
        .trim()
        .to_string()
}

/// A scratch directory under the rig's base (volume files, the registry).
fn workdir() -> tempfile::TempDir {
    let base = Path::new("/var/tmp/soci-agent-test");
    std::fs::create_dir_all(base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

/// `soci-agent prefetch REFERENCE` with the installed agent.
fn prefetch(b: &Booted, reference: &str) -> AgentRun {
    b.agent(
        "prefetch",
        &[INSTALLED_AGENT, "prefetch", reference, "--output", "json"],
    )
}

/// `soci-agent cache verify` with the installed agent.
fn verify(b: &Booted) -> AgentRun {
    b.agent("verify", &[INSTALLED_AGENT, "cache", "verify", "--output", "json"])
}

/// `soci-agent cache seal` with the installed agent.
fn seal(b: &Booted) -> AgentRun {
    b.agent("seal", &[INSTALLED_AGENT, "cache", "seal", "--output", "json"])
}

/// `soci-agent boot` with the installed agent.
fn boot(b: &Booted) -> AgentRun {
    b.agent("boot", &[INSTALLED_AGENT, "boot", "--output", "json"])
}

/// `df --output=FIELD` of the mounted volume, in bytes.
fn volume_df(b: &Booted, field: &str) -> u64 {
    let out = b
        .node
        .check(&["df", &format!("--output={field}"), "-B1", "/var/lib/soci-agent/volume"]);
    out.lines().last().unwrap().trim().parse().unwrap()
}

#[test]
fn snapshot_cache_built_sealed_and_attached_to_a_fresh_node() {
    let work = workdir();
    let registry = Registry::start_new(&work.path().join("registry"), None);
    eprintln!("-- pushing a {LAYERS} x {LAYER_MIB} MiB image");
    let image = registry.push_random_image("big", "v1", LAYERS, LAYER_MIB << 20);
    let small = registry.push_random_image("small", "v1", 2, 8 << 20);
    let front = Front::start(work.path(), &registry.host(), LIMIT);
    let reference = image.reference.replace(&registry.host(), &front.host());
    let small_ref = small.reference.replace(&registry.host(), &front.host());

    // 1. The builder.
    let builder_file = work.path().join("builder.img");
    let cold_s = builder_installs_prefetches_and_seals(&builder_file, &front, &reference);

    // 2. The snapshot restored on a fresh node.
    let vol = restored_snapshot(&builder_file, &work.path().join("node.img"));
    let ro = read_only_volume(&work.path().join("ro.img"));
    let blobs_before = front.lines().len();
    let n = node(&front.host(), &[&vol, &ro]);
    let dev = vol.dev();
    bad_volumes_are_refused(&n, &ro, &dev);
    a_snapshotter_that_cannot_start_is_rolled_back(&n, &dev);
    let install_s = the_restored_snapshot_installs(&n, &dev);
    cache_verify_and_doctor_agree(&n);
    starting_containerd_alone_mounts_the_volume_first(&n, &dev);
    the_image_is_there_in_soci(&n, &reference);
    let cached_s = prefetch_is_a_hit(&n, &front, blobs_before, &reference);
    a_full_volume_fails_prefetch(&n, &small_ref);
    an_unreadable_cache_gets_fresh_roots(&n);
    uninstall_releases_the_volume(&n);

    eprintln!(
        "e2e_cache: prefetch cold {cold_s:.2}s, cached {cached_s:.2}s (ratio {:.3}); install with the volume {install_s:.1}s",
        cached_s / cold_s
    );
}

// ---------------------------------------------------------------------------------------------
// 1. The builder.

/// A blank volume at `file`: installed, the pause image imported, `reference` prefetched cold,
/// sealed. Returns the cold prefetch's seconds.
fn builder_installs_prefetches_and_seals(file: &Path, front: &Front, reference: &str) -> f64 {
    let vol = Loop::blank(file, VOLUME_BYTES);
    let b = node(&front.host(), &[&vol]);
    builder_formats_and_mounts_the_volume(&b, &vol);
    builder_boot_imports_the_pause_image(&b);
    seal_refuses_while_an_image_is_missing(&b, reference);
    let cold_s = builder_prefetches_cold(&b, reference);
    builder_seals(&b, reference);
    cold_s
}

fn builder_formats_and_mounts_the_volume(b: &Booted, vol: &Loop) {
    b.step("builder: install --data-volume --format-data-volume");
    let dev = vol.dev();
    let run = b.install_release(&["--data-volume", &dev, "--format-data-volume", "--output", "json"]);
    run.expect_code(0);
    assert_eq!(b.is_active("soci-agent-volume.service"), "active", "{}", run.show());
    assert_eq!(findmnt(b, "/var/lib/soci-agent/volume"), dev);
    for root in ["/var/lib/containerd", "/var/lib/soci-snapshotter-grpc"] {
        assert!(
            findmnt(b, root).starts_with(&dev),
            "{root} is not on the volume: {}",
            findmnt(b, root)
        );
    }
    b.assert_soci_plugin_ok("builder");
}

fn builder_boot_imports_the_pause_image(b: &Booted) {
    b.step("builder: boot imports the AMI's pause image onto the blank volume");
    std::fs::create_dir_all(b.node.path("/etc/eks")).unwrap();
    std::fs::write(b.node.path("/etc/eks/pause.tar"), oci_image_tar(PAUSE_IMAGE)).unwrap();
    let boot = boot(b);
    boot.expect_code(0);
    let steps = boot.report["steps"].as_array().unwrap();
    assert!(
        steps.iter().any(|s| s["name"] == "pause-image" && s["status"] == "ok"),
        "{}",
        boot.show()
    );
    b.assert_image_in_soci(PAUSE_IMAGE);
}

fn seal_refuses_while_an_image_is_missing(b: &Booted, reference: &str) {
    b.step("builder: seal refuses while an image is missing, and stops nothing");
    let missing = b.agent(
        "seal",
        &[INSTALLED_AGENT, "cache", "seal", "--output", "json", reference],
    );
    missing.expect_code(1);
    assert_eq!(missing.report["missing"][0], reference, "{}", missing.show());
    assert_eq!(b.is_active("containerd.service"), "active");
}

/// Returns the prefetch's seconds.
fn builder_prefetches_cold(b: &Booted, reference: &str) -> f64 {
    b.step("builder: prefetch (cold, rate-limited registry)");
    let t = Instant::now();
    let pre = prefetch(b, reference);
    let cold_s = t.elapsed().as_secs_f64();
    pre.expect_code(0);
    assert_eq!(pre.report["images"][0]["state"], "pulled", "{}", pre.show());
    let (committed, list) = b.soci_committed();
    assert_eq!(
        committed,
        LAYERS + 1,
        "the image's layers and the pause image's:\n{list}"
    );
    cold_s
}

fn builder_seals(b: &Booted, reference: &str) {
    b.step("builder: cache seal");
    let seal = seal(b);
    seal.expect_code(0);
    let m = &seal.report["manifest"];
    assert_eq!(m["images"][0]["image"], reference, "{}", seal.show());
    assert_eq!(m["containerd_version"], "2.4.2", "{}", seal.show());
    assert_eq!(m["soci_version"], "0.16.1", "{}", seal.show());
    assert_eq!(m["filesystem"]["kind"], "ext4", "{}", seal.show());
    assert!(
        seal.report["next_steps"][0]
            .as_str()
            .unwrap()
            .contains("aws ec2 create-snapshot --volume-id"),
        "{}",
        seal.show()
    );
    for unit in [
        "containerd.service",
        "soci-snapshotter.service",
        "soci-agent-volume.service",
    ] {
        assert_ne!(b.is_active(unit), "active", "{unit} still active after seal");
    }
    assert_eq!(
        findmnt(b, "/var/lib/soci-agent/volume"),
        "",
        "volume still mounted after seal"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. The snapshot restored on a fresh node.

/// The builder's volume file copied to `file` (the snapshot restored), attached.
fn restored_snapshot(builder_file: &Path, file: &Path) -> Loop {
    copy_sparse(builder_file, file);
    // The node's volume is larger than the builder's (--data-volume-size over the snapshot's).
    std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .unwrap()
        .set_len(VOLUME_BYTES + (1 << 30))
        .unwrap();
    Loop::attach(file)
}

/// A read-only volume (an ext4 image at `file` attached read-only).
fn read_only_volume(file: &Path) -> Loop {
    std::fs::File::create(file).unwrap().set_len(64 << 20).unwrap();
    let mk = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(file)
        .status()
        .unwrap();
    assert!(mk.success());
    let out = std::process::Command::new("losetup")
        .args(["--find", "--show", "--read-only"])
        .arg(file)
        .output()
        .unwrap();
    assert!(out.status.success());
    Loop {
        device: String::from_utf8_lossy(&out.stdout).trim().into(),
        file: file.to_path_buf(),
    }
}

fn bad_volumes_are_refused(n: &Booted, ro: &Loop, dev: &str) {
    n.step("node: bad input is refused, nothing left mounted");
    let run = n.install_release(&["--data-volume", &ro.dev(), "--output", "json"]);
    run.expect_code(2);
    assert!(
        run.report["error"].as_str().unwrap_or("").contains("read-only"),
        "{}",
        run.show()
    );
    n.node.check(&["mkdir", "-p", "/mnt/elsewhere"]);
    n.node.check(&["mount", dev, "/mnt/elsewhere"]);
    let run = n.install_release(&["--data-volume", dev, "--output", "json"]);
    run.expect_code(2);
    assert!(
        run.report["error"]
            .as_str()
            .unwrap_or("")
            .contains("mounted at /mnt/elsewhere"),
        "{}",
        run.show()
    );
    n.node.check(&["umount", "/mnt/elsewhere"]);
    assert_eq!(findmnt(n, "/var/lib/containerd"), "", "something left mounted");
}

fn a_snapshotter_that_cannot_start_is_rolled_back(n: &Booted, dev: &str) {
    n.step("node: a snapshotter that cannot start: rolled back, the volume unmounted");
    std::fs::create_dir_all(n.node.path(FAIL_DROPIN).parent().unwrap()).unwrap();
    std::fs::write(
        n.node.path(FAIL_DROPIN),
        "[Service]\nExecStartPre=/bin/false\nRestart=no\n",
    )
    .unwrap();
    let run = n.install_release(&["--data-volume", dev, "--output", "json"]);
    run.expect_code(1);
    assert_eq!(
        findmnt(n, "/var/lib/soci-agent/volume"),
        "",
        "volume left mounted: {}",
        run.show()
    );
    assert_eq!(findmnt(n, "/var/lib/containerd"), "", "{}", run.show());
    assert!(
        !n.exists("/etc/systemd/system/soci-agent-volume.service"),
        "{}",
        run.show()
    );
    assert_eq!(n.is_active("containerd.service"), "active", "{}", run.show());
    std::fs::remove_file(n.node.path(FAIL_DROPIN)).unwrap();
    n.node.check(&["systemctl", "daemon-reload"]);
}

/// Returns the install's seconds.
fn the_restored_snapshot_installs(n: &Booted, dev: &str) -> f64 {
    n.step("node: install --data-volume (the restored snapshot)");
    let t = Instant::now();
    let run = n.install_release(&["--data-volume", dev, "--output", "json"]);
    let install_s = t.elapsed().as_secs_f64();
    run.expect_code(0);
    assert!(
        !run.report["actions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["action"] == "format"),
        "a restored volume must not be formatted: {}",
        run.show()
    );
    assert_eq!(findmnt(n, "/var/lib/soci-agent/volume"), dev);
    let size = volume_df(n, "size");
    assert!(
        size > VOLUME_BYTES + (1 << 29),
        "the filesystem was not grown to the volume: {size} bytes"
    );
    install_s
}

fn cache_verify_and_doctor_agree(n: &Booted) {
    n.step("node: cache verify");
    let v = verify(n);
    v.expect_code(0);
    assert_eq!(v.report["hits"], 1, "{}", v.show());
    assert_eq!(v.report["misses"], 0, "{}", v.show());

    n.step("node: doctor's cache group");
    let d = n.doctor();
    for id in ["cache.volume", "cache.manifest", "cache.images", "cache.space"] {
        assert_eq!(d.verdict(id), "ok", "{id}: {}", d.show());
    }
}

fn starting_containerd_alone_mounts_the_volume_first(n: &Booted, dev: &str) {
    n.step("node: every boot: starting containerd alone mounts the volume first");
    n.stop_the_stack();
    assert_eq!(findmnt(n, "/var/lib/soci-agent/volume"), "", "stop did not unmount");
    assert_eq!(findmnt(n, "/var/lib/containerd"), "");
    n.node.check(&["systemctl", "start", "containerd.service"]);
    assert_eq!(findmnt(n, "/var/lib/soci-agent/volume"), dev);
    assert!(findmnt(n, "/var/lib/containerd").starts_with(dev));
}

fn the_image_is_there_in_soci(n: &Booted, reference: &str) {
    n.step("node: the image is there, in soci");
    n.node.check(&["crictl", "inspecti", reference]);
    let (committed, list) = n.soci_committed();
    assert_eq!(
        committed,
        LAYERS + 1,
        "the image's layers and the pause image's:\n{list}"
    );
    assert!(
        n.images().iter().any(|i| i == PAUSE_IMAGE),
        "the pause image travelled too"
    );
}

/// Prefetch and boot's run hit the cache, no blob fetched past the front's first
/// `blobs_before` lines. Returns the prefetch's seconds.
fn prefetch_is_a_hit(n: &Booted, front: &Front, blobs_before: usize, reference: &str) -> f64 {
    n.step("node: prefetch is a hit");
    let t = Instant::now();
    let pre = prefetch(n, reference);
    let cached_s = t.elapsed().as_secs_f64();
    pre.expect_code(0);
    assert_eq!(pre.report["images"][0]["state"], "hit", "{}", pre.show());
    let lines = front.lines();
    let blobs = Front::blob_gets(&lines[blobs_before.min(lines.len())..]);
    assert!(
        blobs.is_empty(),
        "the cached node downloaded blobs:\n{}",
        blobs.join("\n")
    );
    // Boot's own run: verify, then prefetch of the misses (none).
    let boot = boot(n);
    boot.expect_code(0);
    let steps = boot.report["steps"].as_array().unwrap();
    let cache = steps
        .iter()
        .find(|s| s["name"] == "cache")
        .unwrap_or_else(|| panic!("{}", boot.show()));
    assert_eq!(cache["status"], "ok", "{}", boot.show());
    cached_s
}

fn a_full_volume_fails_prefetch(n: &Booted, small_ref: &str) {
    n.step("node: a full volume during prefetch: exit 4, the error says so");
    let avail = volume_df(n, "avail");
    let filler = "/var/lib/soci-agent/volume/filler";
    n.node
        .check(&["fallocate", "-l", &(avail - (1 << 20)).to_string(), filler]);
    let full = prefetch(n, small_ref);
    full.expect_code(4);
    let warnings = full.report["warnings"].to_string();
    assert!(warnings.contains("is full"), "{}", full.show());
    n.node.check(&["rm", "-f", filler]);
}

fn an_unreadable_cache_gets_fresh_roots(n: &Booted) {
    n.step("node: a cache written by a containerd this node cannot read: warning, fresh roots, prefetch");
    let manifest = "/var/lib/soci-agent/volume/soci-agent-cache.json";
    n.node.check(&[
        "sed",
        "-i",
        "s/\"containerd_version\": \"2.4.2\"/\"containerd_version\": \"1.7.27\"/",
        manifest,
    ]);
    n.stop_the_stack();
    n.node.check(&["systemctl", "start", "containerd.service"]);
    let bound = findmnt(n, "/var/lib/containerd");
    assert!(bound.contains("unreadable-cache-fallback"), "{bound}");
    let v = verify(n);
    v.expect_code(4);
    assert!(
        v.report["warnings"][0].as_str().unwrap_or("").contains("1.7.27"),
        "{}",
        v.show()
    );
    let boot = boot(n);
    boot.expect_code(0);
    let steps = boot.report["steps"].as_array().unwrap();
    let pre = steps.iter().find(|s| s["name"] == "prefetch").unwrap();
    assert_eq!(pre["status"], "ok", "{}", boot.show());
    assert!(pre["detail"].as_str().unwrap().contains("1 pulled"), "{}", boot.show());
    verify(n).expect_code(0);
}

fn uninstall_releases_the_volume(n: &Booted) {
    n.step("node: uninstall releases the volume; containerd runs on its own directory again");
    let un = n.agent(
        "uninstall",
        &[INSTALLED_AGENT, "uninstall", "--output", "json", "--log-level", "warn"],
    );
    un.expect_code(0);
    assert_eq!(findmnt(n, "/var/lib/soci-agent/volume"), "", "{}", un.show());
    assert_eq!(findmnt(n, "/var/lib/containerd"), "", "{}", un.show());
    assert_eq!(n.is_active("containerd.service"), "active", "{}", un.show());
    assert!(!n.exists("/etc/systemd/system/soci-agent-volume.service"));
}

// ---------------------------------------------------------------------------------------------
// The same builder on an EKS AL2023-shaped node driven by the real nodeadm (the AMI's units,
// IMDS/EC2 stand-ins; set up as in tests/e2e_nodeadm.rs): install runs where cloud-final would
// and starts nothing; nodeadm-run starts containerd, whose Requires= mounts the volume first.

mod al2023 {
    use std::time::Duration;

    use super::common::al2023::{ami_node, user_data};
    use super::common::booted::{Boot, Booted};
    use super::common::imds::{AwsStandIn, Instance};
    use super::common::loopdev::Loop;

    pub use super::common::al2023::{CONTAINERD_VERSION, NODEADM_RUN};

    /// The node (nodeadm-config ran at boot) and its AWS stand-in; `volume` bound in.
    pub fn boot(front: &str, volume: &Loop) -> (Booted, AwsStandIn) {
        let aws = AwsStandIn::start(Instance::m5_xlarge(), Some(user_data(&[])));
        let opts = ami_node(&aws, front.to_string(), false).bind(&volume.device, &volume.dev());
        let booted = Booted::boot_with(
            opts,
            Boot {
                dbus_bound: Duration::from_secs(60),
                ..Boot::default()
            },
        );
        (booted, aws)
    }
}

#[test]
fn al2023_builder_nodeadm_run_mounts_the_volume_before_containerd() {
    let work = workdir();
    let registry = Registry::start_new(&work.path().join("registry"), None);
    let small = registry.push_random_image("small", "v1", 2, 8 << 20);
    let vol = Loop::blank(&work.path().join("al2023.img"), 1 << 30);
    let (n, _aws) = al2023::boot(&registry.host(), &vol);
    let dev = vol.dev();
    al2023_install_starts_nothing(&n, &dev);
    al2023_nodeadm_run_mounts_the_volume_first(&n, &dev);
    al2023_boot_unit_imported_the_pause_image(&n);
    al2023_prefetch_and_seal(&n, &small.reference);
}

fn al2023_install_starts_nothing(n: &Booted, dev: &str) {
    n.step("al2023: install --data-volume --format-data-volume (cloud-final's turn) starts nothing");
    let run = n.install_release(&["--data-volume", dev, "--format-data-volume", "--output", "json"]);
    run.expect_code(0);
    assert_eq!(run.report["plan"]["wiring"], "nodeadm", "{}", run.show());
    for unit in [
        "containerd.service",
        "soci-snapshotter.service",
        "soci-agent-volume.service",
    ] {
        assert_eq!(
            n.is_active(unit),
            "inactive",
            "{unit} started by install\n{}",
            run.show()
        );
    }
    assert_eq!(findmnt(n, "/var/lib/soci-agent/volume"), "");
}

/// systemd's `ActiveEnterTimestampMonotonic` of `unit` (0 when it never started).
fn active_since(n: &Booted, unit: &str) -> u64 {
    text(
        &n.node
            .exec(&["systemctl", "show", "-P", "ActiveEnterTimestampMonotonic", unit])
            .stdout,
    )
    .trim()
    .parse::<u64>()
    .unwrap_or(0)
}

fn al2023_nodeadm_run_mounts_the_volume_first(n: &Booted, dev: &str) {
    n.step("al2023: nodeadm-run starts containerd; the volume is mounted first");
    let out = n.node.exec_timeout(
        &[
            "systemctl",
            "start",
            "--job-mode=ignore-requirements",
            al2023::NODEADM_RUN,
        ],
        std::time::Duration::from_secs(180),
    );
    assert!(out.status.success(), "nodeadm-run: {}", text(&out.stderr));
    assert_eq!(findmnt(n, "/var/lib/soci-agent/volume"), dev);
    for root in ["/var/lib/containerd", "/var/lib/soci-snapshotter-grpc"] {
        assert!(findmnt(n, root).starts_with(dev), "{root}: {}", findmnt(n, root));
    }
    let (volume_at, soci_at, containerd_at) = (
        active_since(n, "soci-agent-volume.service"),
        active_since(n, "soci-snapshotter.service"),
        active_since(n, "containerd.service"),
    );
    assert!(
        volume_at > 0 && volume_at <= soci_at && soci_at <= containerd_at,
        "order: volume {volume_at}, soci {soci_at}, containerd {containerd_at}"
    );
    n.assert_soci_plugin_ok("al2023 after nodeadm-run");
}

fn al2023_boot_unit_imported_the_pause_image(n: &Booted) {
    n.step("al2023: the boot unit imported the AMI's pause image onto the blank volume");
    // kubelet's drop-in pulls soci-agent-boot.service in before kubelet (nodeadm restarts it).
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while n.is_active("soci-agent-boot.service") != "active" && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(n.is_active("soci-agent-boot.service"), "active");
    n.assert_image_in_soci(PAUSE_IMAGE);
}

fn al2023_prefetch_and_seal(n: &Booted, reference: &str) {
    n.step("al2023: prefetch and seal");
    let pre = prefetch(n, reference);
    pre.expect_code(0);
    let seal = seal(n);
    seal.expect_code(0);
    assert_eq!(
        seal.report["manifest"]["containerd_version"],
        al2023::CONTAINERD_VERSION,
        "{}",
        seal.show()
    );
    assert_eq!(findmnt(n, "/var/lib/soci-agent/volume"), "", "{}", seal.show());
}
