//! Benchmark: the snapshot cache against a cold pull. One 512 MiB image (4 x 128 MiB random
//! layers) behind nginx with a per-connection `limit_rate` (as S3/ECR serve blobs).
//!
//! - cold node: `install` (no volume), then `prefetch` of the image: a SOCI parallel pull.
//! - builder: `install --data-volume DEV --format-data-volume`, `prefetch`, `cache seal`.
//! - cached node: the volume file copied (= the snapshot restored) and attached;
//!   `install --data-volume DEV`, `cache verify`, `prefetch` of the same image: a hit.
//!
//! Prints prefetch start -> image ready on the cached node over the cold node (goal <= 0.1),
//! and install's wall time with and without the volume, plus what mounting the volume
//! (`systemctl start soci-agent-volume.service` from stopped) and `cache verify` take (goal:
//! together under 1 s). Everything is real: containerd v2.4.2, SOCI v0.16.1, systemd in nspawn
//! nodes, a loop device as the volume. Run as root: `bash bench/cache.sh`. Env: `CACHE_LIMIT`
//! (nginx `limit_rate`, default `25m`), `CACHE_LAYER_MIB` (default 128).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::path::Path;
use std::time::Instant;

use common::booted::{Booted, INSTALLED_AGENT};
use common::loopdev::{Loop, copy_sparse};
use common::nspawn::NodeOptions;
use common::ratelimit::Front;
use common::real::{self, NodeContainerdConfig, with_containerd};
use common::registry::Registry;

const LAYERS: usize = 4;

fn node(front: &str, volume: Option<&Loop>) -> Booted {
    let host = front.to_string();
    let mut opts = with_containerd(NodeOptions::new(), "2.4.2", NodeContainerdConfig::RegistryOnly)
        .prepare(move |root: &Path| real::trust_plain_http(root, &host));
    if let Some(v) = volume {
        opts = opts.bind(&v.device, &v.dev());
    }
    Booted::boot(opts)
}

/// Runs an agent command, asserts its exit code, returns its wall time in seconds.
fn timed(b: &Booted, what: &str, argv: &[&str], code: i32) -> f64 {
    let t = Instant::now();
    let run = b.agent(what, argv);
    let s = t.elapsed().as_secs_f64();
    run.expect_code(code);
    s
}

fn main() {
    let limit = std::env::var("CACHE_LIMIT").unwrap_or_else(|_| "25m".into());
    let layer_mib: usize = std::env::var("CACHE_LAYER_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let base = Path::new("/var/tmp/soci-agent-test");
    std::fs::create_dir_all(base).unwrap();
    let work = tempfile::tempdir_in(base).unwrap();
    let registry = Registry::start_new(&work.path().join("registry"), None);
    eprintln!("bench: pushing one image of {LAYERS} x {layer_mib} MiB random layers");
    let image = registry.push_random_image("big", "v1", LAYERS, layer_mib << 20);
    let front = Front::start(work.path(), &registry.host(), &limit);
    let reference = image.reference.replace(&registry.host(), &front.host());
    let prefetch = [INSTALLED_AGENT, "prefetch", reference.as_str(), "--output", "json"];
    let volume_bytes = (((LAYERS * layer_mib) as u64 * 6) << 20).max(3 << 30);

    // Cold node: no volume.
    let (install_plain, cold) = {
        let b = node(&front.host(), None);
        let t = Instant::now();
        b.install_release(&["--output", "json"]).expect_code(0);
        let install = t.elapsed().as_secs_f64();
        (install, timed(&b, "prefetch (cold)", &prefetch, 0))
    };

    // Builder.
    let builder_file = work.path().join("builder.img");
    {
        let vol = Loop::blank(&builder_file, volume_bytes);
        let b = node(&front.host(), Some(&vol));
        let dev = vol.dev();
        b.install_release(&["--data-volume", &dev, "--format-data-volume", "--output", "json"])
            .expect_code(0);
        timed(&b, "prefetch (builder)", &prefetch, 0);
        timed(&b, "seal", &[INSTALLED_AGENT, "cache", "seal", "--output", "json"], 0);
    }

    // Cached node.
    let node_file = work.path().join("node.img");
    copy_sparse(&builder_file, &node_file);
    let vol = Loop::attach(&node_file);
    let b = node(&front.host(), Some(&vol));
    let dev = vol.dev();
    let t = Instant::now();
    b.install_release(&["--data-volume", &dev, "--output", "json"])
        .expect_code(0);
    let install_volume = t.elapsed().as_secs_f64();
    let blobs_before = front.lines().len();
    let cached = timed(&b, "prefetch (cached)", &prefetch, 0);
    let blobs = Front::blob_gets(&front.lines()[blobs_before..]).len();
    // Mount and verify alone, as at boot (daemons stopped, then started by containerd's Requires=).
    b.stop_the_stack();
    let t = Instant::now();
    b.node.check(&["systemctl", "start", "soci-agent-volume.service"]);
    let mount = t.elapsed().as_secs_f64();
    b.node.check(&["systemctl", "start", "containerd.service"]);
    let verify = timed(
        &b,
        "verify",
        &[INSTALLED_AGENT, "cache", "verify", "--output", "json"],
        0,
    );

    let mib = (LAYERS * layer_mib) as f64;
    println!(
        "snapshot cache vs cold pull: {mib:.0} MiB image ({LAYERS} layers), nginx limit_rate {limit} per connection, one run each:"
    );
    println!("  prefetch start -> image ready, cold node (SOCI parallel pull)  {cold:8.2} s");
    println!(
        "  prefetch start -> image ready, cached node (data volume)       {cached:8.2} s  ({blobs} blob downloads)"
    );
    println!(
        "  ratio cached/cold                                              {:8.3}   (goal <= 0.1)",
        cached / cold
    );
    println!("  install without a volume                                       {install_plain:8.2} s");
    println!("  install with the restored volume                               {install_volume:8.2} s");
    println!(
        "  mount (soci-agent-volume.service start) + cache verify         {:8.2} s  ({mount:.2} + {verify:.2}; goal <= 1 s)",
        mount + verify
    );
}
