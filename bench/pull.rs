//! Benchmark: a CRI pull of a 1 GiB image (4 x 256 MiB random layers) from a registry whose
//! every connection is rate-limited (nginx `limit_rate`, as S3/ECR serve blobs), on one booted
//! node, side by side: first plain containerd (overlayfs), then through SOCI parallel
//! pull/unpack as `soci-agent install` wired it. Prints both wall times, the ratio (goal
//! <= 0.25) and the aggregate bandwidth each reached against the per-connection limit.
//!
//! Everything is real: containerd v2.4.2, crictl v1.37.0 and SOCI v0.16.1 from the rig
//! (`tests/real/build.sh`), Debian's docker-registry and nginx, systemd in an nspawn node.
//! Run as root: `bash bench/pull.sh` (or `cargo bench --bench pull`). Env: `PULL_LIMIT`
//! (nginx `limit_rate`, default `25m`), `PULL_LAYER_MIB` (default 256), `PULL_INSTALL_ARGS`
//! (extra `soci-agent install` flags, e.g. tuning, default none).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::mirror::Mirror;
use common::nspawn::{Node, NodeOptions, text};
use common::ratelimit::Front;
use common::real::{self, NodeContainerdConfig};
use common::registry::Registry;

const LAYERS: usize = 4;
const PULL_BOUND: Duration = Duration::from_secs(900);

fn main() {
    let limit = std::env::var("PULL_LIMIT").unwrap_or_else(|_| "25m".into());
    let layer_mib: usize = std::env::var("PULL_LAYER_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let work = tempfile::tempdir().unwrap();

    let registry = Registry::start_new(&work.path().join("registry"), None);
    eprintln!("bench: pushing two images of {LAYERS} x {layer_mib} MiB random layers");
    let plain = registry.push_random_image("big", "plain", LAYERS, layer_mib << 20);
    let soci = registry.push_random_image("big", "soci", LAYERS, layer_mib << 20);
    let nginx = Front::start(work.path(), &registry.host(), &limit);
    let front = nginx.host();

    let opts = real::with_containerd(NodeOptions::new(), "2.4.2", NodeContainerdConfig::RegistryOnly);
    let host = front.clone();
    let node = Node::boot(opts.prepare(move |root: &Path| real::trust_plain_http(root, &host)));
    let by_front = |p: &common::registry::Pushed| p.reference.replace(&registry.host(), &front);

    let plain_s = pull(&node, &by_front(&plain));
    eprintln!("bench: plain containerd (overlayfs): {plain_s:.1} s");

    let mirror = Mirror::start();
    real::soci_release(real::SOCI_VERSION).publish(&mirror);
    fs::copy(env!("CARGO_BIN_EXE_soci-agent"), node.share().join("soci-agent")).unwrap();
    let extra = std::env::var("PULL_INSTALL_ARGS").unwrap_or_default();
    let base_url = mirror.base_url();
    let mut install = vec![
        "/share/soci-agent",
        "install",
        "--release-url",
        &base_url,
        "--soci-version",
        real::SOCI_VERSION,
        "--log-level",
        "warn",
    ];
    install.extend(extra.split_whitespace());
    node.check(&install);
    let soci_s = pull(&node, &by_front(&soci));
    let snapshots = node.check(&["ctr", "-n", "k8s.io", "snapshots", "--snapshotter", "soci", "ls"]);
    let in_soci = snapshots
        .lines()
        .filter(|l| l.split_whitespace().last() == Some("Committed"))
        .count();
    assert_eq!(in_soci, LAYERS, "the SOCI pull did not land in soci:\n{snapshots}");
    eprintln!("bench: SOCI parallel pull/unpack: {soci_s:.1} s");

    let mib = (LAYERS * layer_mib) as f64;
    println!("pull of {mib:.0} MiB ({LAYERS} layers), nginx limit_rate {limit} per connection, 2 runs on one node:");
    println!(
        "  plain containerd (overlayfs)   {plain_s:7.1} s  {:6.1} MiB/s",
        mib / plain_s
    );
    println!(
        "  SOCI parallel pull/unpack      {soci_s:7.1} s  {:6.1} MiB/s",
        mib / soci_s
    );
    println!(
        "  ratio SOCI/plain               {:7.2}   (goal <= 0.25)",
        soci_s / plain_s
    );
}

/// `crictl pull REF` inside the node; its wall time in seconds.
fn pull(node: &Node, reference: &str) -> f64 {
    let started = Instant::now();
    let out = node.exec_timeout(&["crictl", "--timeout=900s", "pull", reference], PULL_BOUND);
    let secs = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "crictl pull {reference}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    secs
}
