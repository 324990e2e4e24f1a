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
//! Needs root, losetup, nginx, docker-registry and the rig (tests/real/build.sh).

mod common;

use std::path::Path;
use std::time::Instant;

use common::archive::oci_image_tar;
use common::booted::{AGENT, Booted, INSTALLED_AGENT};
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

#[test]
fn snapshot_cache_built_sealed_and_attached_to_a_fresh_node() {
    let base = Path::new("/var/tmp/soci-agent-test");
    std::fs::create_dir_all(base).unwrap();
    let work = tempfile::tempdir_in(base).unwrap();
    let registry = Registry::start_new(&work.path().join("registry"), None);
    eprintln!("-- pushing a {LAYERS} x {LAYER_MIB} MiB image");
    let image = registry.push_random_image("big", "v1", LAYERS, LAYER_MIB << 20);
    let small = registry.push_random_image("small", "v1", 2, 8 << 20);
    let front = Front::start(work.path(), &registry.host(), LIMIT);
    let reference = image.reference.replace(&registry.host(), &front.host());
    let small_ref = small.reference.replace(&registry.host(), &front.host());

    // 1. The builder.
    let builder_file = work.path().join("builder.img");
    let cold_s;
    {
        let vol = Loop::blank(&builder_file, VOLUME_BYTES);
        let b = node(&front.host(), &[&vol]);
        b.step("builder: install --data-volume --format-data-volume");
        let dev = vol.dev();
        let run = b.install_release(&["--data-volume", &dev, "--format-data-volume", "--output", "json"]);
        run.expect_code(0);
        assert_eq!(b.is_active("soci-agent-volume.service"), "active", "{}", run.show());
        assert_eq!(findmnt(&b, "/var/lib/soci-agent/volume"), dev);
        for root in ["/var/lib/containerd", "/var/lib/soci-snapshotter-grpc"] {
            assert!(
                findmnt(&b, root).starts_with(&dev),
                "{root} is not on the volume: {}",
                findmnt(&b, root)
            );
        }
        b.assert_soci_plugin_ok("builder");

        b.step("builder: boot imports the AMI's pause image onto the blank volume");
        std::fs::create_dir_all(b.node.path("/etc/eks")).unwrap();
        std::fs::write(b.node.path("/etc/eks/pause.tar"), oci_image_tar(PAUSE_IMAGE)).unwrap();
        let boot = b.agent("boot", &[INSTALLED_AGENT, "boot", "--output", "json"]);
        boot.expect_code(0);
        let steps = boot.report["steps"].as_array().unwrap();
        assert!(
            steps.iter().any(|s| s["name"] == "pause-image" && s["status"] == "ok"),
            "{}",
            boot.show()
        );
        b.assert_image_in_soci(PAUSE_IMAGE);

        b.step("builder: seal refuses while an image is missing, and stops nothing");
        let missing = b.agent(
            "seal",
            &[INSTALLED_AGENT, "cache", "seal", "--output", "json", &reference],
        );
        missing.expect_code(1);
        assert_eq!(missing.report["missing"][0], reference.as_str(), "{}", missing.show());
        assert_eq!(b.is_active("containerd.service"), "active");

        b.step("builder: prefetch (cold, rate-limited registry)");
        let t = Instant::now();
        let pre = b.agent(
            "prefetch",
            &[INSTALLED_AGENT, "prefetch", &reference, "--output", "json"],
        );
        cold_s = t.elapsed().as_secs_f64();
        pre.expect_code(0);
        assert_eq!(pre.report["images"][0]["state"], "pulled", "{}", pre.show());
        let (committed, list) = b.soci_committed();
        assert_eq!(
            committed,
            LAYERS + 1,
            "the image's layers and the pause image's:\n{list}"
        );

        b.step("builder: cache seal");
        let seal = b.agent("seal", &[INSTALLED_AGENT, "cache", "seal", "--output", "json"]);
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
            findmnt(&b, "/var/lib/soci-agent/volume"),
            "",
            "volume still mounted after seal"
        );
    }

    // 2. The snapshot restored on a fresh node.
    let node_file = work.path().join("node.img");
    copy_sparse(&builder_file, &node_file);
    // The node's volume is larger than the builder's (--data-volume-size over the snapshot's).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&node_file)
        .unwrap()
        .set_len(VOLUME_BYTES + (1 << 30))
        .unwrap();
    let vol = Loop::attach(&node_file);
    // A read-only volume (an ext4 image attached read-only).
    let ro_file = work.path().join("ro.img");
    std::fs::File::create(&ro_file).unwrap().set_len(64 << 20).unwrap();
    let mk = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&ro_file)
        .status()
        .unwrap();
    assert!(mk.success());
    let ro = {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show", "--read-only"])
            .arg(&ro_file)
            .output()
            .unwrap();
        assert!(out.status.success());
        Loop {
            device: String::from_utf8_lossy(&out.stdout).trim().into(),
            file: ro_file.clone(),
        }
    };
    let blobs_before = front.lines().len();
    let n = node(&front.host(), &[&vol, &ro]);
    let dev = vol.dev();

    n.step("node: bad input is refused, nothing left mounted");
    let run = n.install_release(&["--data-volume", &ro.dev(), "--output", "json"]);
    run.expect_code(2);
    assert!(
        run.report["error"].as_str().unwrap_or("").contains("read-only"),
        "{}",
        run.show()
    );
    n.node.check(&["mkdir", "-p", "/mnt/elsewhere"]);
    n.node.check(&["mount", &dev, "/mnt/elsewhere"]);
    let run = n.install_release(&["--data-volume", &dev, "--output", "json"]);
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
    assert_eq!(findmnt(&n, "/var/lib/containerd"), "", "something left mounted");

    n.step("node: a snapshotter that cannot start: rolled back, the volume unmounted");
    std::fs::create_dir_all(n.node.path(FAIL_DROPIN).parent().unwrap()).unwrap();
    std::fs::write(
        n.node.path(FAIL_DROPIN),
        "[Service]\nExecStartPre=/bin/false\nRestart=no\n",
    )
    .unwrap();
    let run = n.install_release(&["--data-volume", &dev, "--output", "json"]);
    run.expect_code(1);
    assert_eq!(
        findmnt(&n, "/var/lib/soci-agent/volume"),
        "",
        "volume left mounted: {}",
        run.show()
    );
    assert_eq!(findmnt(&n, "/var/lib/containerd"), "", "{}", run.show());
    assert!(
        !n.exists("/etc/systemd/system/soci-agent-volume.service"),
        "{}",
        run.show()
    );
    assert_eq!(n.is_active("containerd.service"), "active", "{}", run.show());
    std::fs::remove_file(n.node.path(FAIL_DROPIN)).unwrap();
    n.node.check(&["systemctl", "daemon-reload"]);

    n.step("node: install --data-volume (the restored snapshot)");
    let t = Instant::now();
    let run = n.install_release(&["--data-volume", &dev, "--output", "json"]);
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
    assert_eq!(findmnt(&n, "/var/lib/soci-agent/volume"), dev);
    let size = n
        .node
        .check(&["df", "--output=size", "-B1", "/var/lib/soci-agent/volume"]);
    let size: u64 = size.lines().last().unwrap().trim().parse().unwrap();
    assert!(
        size > VOLUME_BYTES + (1 << 29),
        "the filesystem was not grown to the volume: {size} bytes"
    );

    n.step("node: cache verify");
    let v = n.agent("verify", &[INSTALLED_AGENT, "cache", "verify", "--output", "json"]);
    v.expect_code(0);
    assert_eq!(v.report["hits"], 1, "{}", v.show());
    assert_eq!(v.report["misses"], 0, "{}", v.show());

    n.step("node: doctor's cache group");
    let d = n.doctor();
    for id in ["cache.volume", "cache.manifest", "cache.images", "cache.space"] {
        assert_eq!(d.verdict(id), "ok", "{id}: {}", d.show());
    }

    n.step("node: every boot: starting containerd alone mounts the volume first");
    n.node.check(&[
        "systemctl",
        "stop",
        "containerd.service",
        "soci-snapshotter.socket",
        "soci-snapshotter.service",
        "soci-agent-volume.service",
    ]);
    assert_eq!(findmnt(&n, "/var/lib/soci-agent/volume"), "", "stop did not unmount");
    assert_eq!(findmnt(&n, "/var/lib/containerd"), "");
    n.node.check(&["systemctl", "start", "containerd.service"]);
    assert_eq!(findmnt(&n, "/var/lib/soci-agent/volume"), dev);
    assert!(findmnt(&n, "/var/lib/containerd").starts_with(&dev));

    n.step("node: the image is there, in soci");
    n.node.check(&["crictl", "inspecti", &reference]);
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

    n.step("node: prefetch is a hit");
    let t = Instant::now();
    let pre = n.agent(
        "prefetch",
        &[INSTALLED_AGENT, "prefetch", &reference, "--output", "json"],
    );
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
    let boot = n.agent("boot", &[INSTALLED_AGENT, "boot", "--output", "json"]);
    boot.expect_code(0);
    let steps = boot.report["steps"].as_array().unwrap();
    let cache = steps
        .iter()
        .find(|s| s["name"] == "cache")
        .unwrap_or_else(|| panic!("{}", boot.show()));
    assert_eq!(cache["status"], "ok", "{}", boot.show());

    n.step("node: a full volume during prefetch: exit 4, the error says so");
    let avail = n
        .node
        .check(&["df", "--output=avail", "-B1", "/var/lib/soci-agent/volume"]);
    let avail: u64 = avail.lines().last().unwrap().trim().parse().unwrap();
    let filler = "/var/lib/soci-agent/volume/filler";
    n.node
        .check(&["fallocate", "-l", &(avail - (1 << 20)).to_string(), filler]);
    let full = n.agent(
        "prefetch",
        &[INSTALLED_AGENT, "prefetch", &small_ref, "--output", "json"],
    );
    full.expect_code(4);
    let warnings = full.report["warnings"].to_string();
    assert!(warnings.contains("is full"), "{}", full.show());
    n.node.check(&["rm", "-f", filler]);

    n.step("node: a cache written by a containerd this node cannot read: warning, fresh roots, prefetch");
    let manifest = "/var/lib/soci-agent/volume/soci-agent-cache.json";
    n.node.check(&[
        "sed",
        "-i",
        "s/\"containerd_version\": \"2.4.2\"/\"containerd_version\": \"1.7.27\"/",
        manifest,
    ]);
    n.node.check(&[
        "systemctl",
        "stop",
        "containerd.service",
        "soci-snapshotter.socket",
        "soci-snapshotter.service",
        "soci-agent-volume.service",
    ]);
    n.node.check(&["systemctl", "start", "containerd.service"]);
    let bound = findmnt(&n, "/var/lib/containerd");
    assert!(bound.contains("unreadable-cache-fallback"), "{bound}");
    let v = n.agent("verify", &[INSTALLED_AGENT, "cache", "verify", "--output", "json"]);
    v.expect_code(4);
    assert!(
        v.report["warnings"][0].as_str().unwrap_or("").contains("1.7.27"),
        "{}",
        v.show()
    );
    let boot = n.agent("boot", &[INSTALLED_AGENT, "boot", "--output", "json"]);
    boot.expect_code(0);
    let steps = boot.report["steps"].as_array().unwrap();
    let pre = steps.iter().find(|s| s["name"] == "prefetch").unwrap();
    assert_eq!(pre["status"], "ok", "{}", boot.show());
    assert!(pre["detail"].as_str().unwrap().contains("1 pulled"), "{}", boot.show());
    n.agent("verify", &[INSTALLED_AGENT, "cache", "verify", "--output", "json"])
        .expect_code(0);

    n.step("node: uninstall releases the volume; containerd runs on its own directory again");
    let un = n.agent(
        "uninstall",
        &[INSTALLED_AGENT, "uninstall", "--output", "json", "--log-level", "warn"],
    );
    un.expect_code(0);
    assert_eq!(findmnt(&n, "/var/lib/soci-agent/volume"), "", "{}", un.show());
    assert_eq!(findmnt(&n, "/var/lib/containerd"), "", "{}", un.show());
    assert_eq!(n.is_active("containerd.service"), "active", "{}", un.show());
    assert!(!n.exists("/etc/systemd/system/soci-agent-volume.service"));

    eprintln!(
        "e2e_cache: prefetch cold {cold_s:.2}s, cached {cached_s:.2}s (ratio {:.3}); install with the volume {install_s:.1}s",
        cached_s / cold_s
    );
    let _ = AGENT;
}
