//! `soci-agent cache`: the snapshot cache, images on an attached data volume
//! that holds both containerd's and SOCI's roots (in parallel pull/unpack
//! mode the unpacked layers live in SOCI's root, so both must travel
//! together).
//!
//! - builder: `install --data-volume DEV --format-data-volume`, `prefetch`,
//!   then `cache seal` (checks the images, stops the daemons, writes the
//!   manifest, prints the snapshot command);
//! - nodes: `install --data-volume DEV`, then `cache verify` (also run by
//!   `boot`, which prefetches only the misses);
//! - `cache mount` / `cache unmount` are what `soci-agent-volume.service`
//!   runs before containerd and SOCI start.
//!
//! Wing: `device` (find, probe, format), `volume` (mounts, growth), `manifest` (the file and
//! the compatibility rule), `units`, `seal`, `verify`, `node` (CRI and
//! versions).

pub mod device;
pub mod manifest;
pub mod node;
pub mod seal;
pub mod units;
pub mod verify;
pub mod volume;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::exit::ExitKindOf;
use crate::output::OutputFormat;
use crate::paths::{CACHE_MANIFEST, SOCI_ROOT, VOLUME_MOUNT};
use crate::rootfs::Root;

#[derive(Debug, Clone, Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

/// Flags every cache subcommand takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Directory every node path is resolved under.
    #[arg(long, value_name = "DIR", env = "SOCI_AGENT_ROOT", default_value = "/")]
    pub root: PathBuf,
    /// Report format on stdout.
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Subcommand)]
pub enum CacheCommand {
    /// Builder: check the pulled images through CRI, stop containerd and SOCI over D-Bus, write
    /// the manifest soci-agent-cache.json at the volume's top, sync, unmount, and print the
    /// snapshot command. Exit 0; 1 when an image is missing or no data volume is mounted.
    Seal(seal::SealArgs),
    /// Which manifest images this node has (CRI ImageStatus): hits and misses. Exit 0 when all
    /// hit, 4 when some miss (or the cache was written by daemons this node cannot read), 2
    /// without a readable manifest.
    Verify(verify::VerifyArgs),
    /// Mount the data volume and bind containerd's and SOCI's roots onto it (run by
    /// soci-agent-volume.service before either daemon starts).
    Mount(MountArgs),
    /// Undo `cache mount` (soci-agent-volume.service's ExecStop).
    Unmount(UnmountArgs),
}

#[derive(Debug, Clone, Args)]
pub struct MountArgs {
    #[command(flatten)]
    pub common: Common,
    /// The data volume: a block device or a /dev/disk/by-* link; an EBS name (/dev/xvdb) also
    /// finds its NVMe namespace on Nitro instances.
    #[arg(long, value_name = "DEVICE")]
    pub device: String,
    /// SOCI's root, bound onto the volume's soci-snapshotter-grpc/.
    #[arg(long, value_name = "DIR", default_value = SOCI_ROOT, value_parser = crate::flag_values::parse_node_path)]
    pub soci_root: String,
    /// Wait this long for the device to appear.
    #[arg(long, value_name = "SECS", default_value_t = 120.0, value_parser = crate::flag_values::parse_seconds)]
    pub wait: f64,
}

#[derive(Debug, Clone, Args)]
pub struct UnmountArgs {
    #[command(flatten)]
    pub common: Common,
    /// SOCI's root, bound onto the volume's soci-snapshotter-grpc/.
    #[arg(long, value_name = "DIR", default_value = SOCI_ROOT, value_parser = crate::flag_values::parse_node_path)]
    pub soci_root: String,
}

impl CacheArgs {
    pub fn root(&self) -> &PathBuf {
        match &self.command {
            CacheCommand::Seal(a) => &a.common.root,
            CacheCommand::Verify(a) => &a.common.root,
            CacheCommand::Mount(a) => &a.common.root,
            CacheCommand::Unmount(a) => &a.common.root,
        }
    }
}

/// Node path of the manifest.
pub fn manifest_path() -> String {
    format!("{VOLUME_MOUNT}/{CACHE_MANIFEST}")
}

/// The subcommand; prints its report and returns the exit code.
pub async fn run(args: &CacheArgs) -> u8 {
    match &args.command {
        CacheCommand::Seal(a) => {
            let report = seal::seal(a).await;
            print(a.common.output, &report, report.to_text());
            report.exit_code
        }
        CacheCommand::Verify(a) => {
            let report = verify::verify(&Root::new(&a.common.root), a.cri_endpoint.as_deref()).await;
            print(a.common.output, &report, report.to_text());
            report.exit_code
        }
        CacheCommand::Mount(a) => mount(a).await,
        CacheCommand::Unmount(a) => {
            let layout = volume::Layout::new(&Root::new(&a.common.root), &a.soci_root);
            match volume::unmount(&layout) {
                Ok(gone) => {
                    println!(
                        "unmounted: {}",
                        if gone.is_empty() {
                            "nothing".into()
                        } else {
                            gone.join(", ")
                        }
                    );
                    0
                }
                Err(e) => {
                    eprintln!("soci-agent cache unmount: {}", crate::exit::error_chain(&e));
                    1
                }
            }
        }
    }
}

fn print<T: serde::Serialize>(output: OutputFormat, report: &T, text: String) {
    match output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(report).expect("report serializes")),
        OutputFormat::Text => print!("{text}"),
    }
}

/// `cache mount`: finds the device (waiting for it), mounts, binds. When the
/// manifest was written by daemons this node cannot read, fresh directories
/// of the volume are bound instead (the daemons start empty and `boot`
/// prefetches), never the old ones (which could crash-loop them).
async fn mount(a: &MountArgs) -> u8 {
    let root = Root::new(&a.common.root);
    let started = std::time::Instant::now();
    let dev = match device::wait_for_device(&root, &a.device, Duration::from_secs_f64(a.wait)) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("soci-agent cache mount: {}", crate::exit::error_chain(&e));
            return e.exit_kind().code();
        }
    };
    let mut layout = volume::Layout::new(&root, &a.soci_root);
    // The manifest can only be read once mounted: mount, read, rebind if needed.
    let result = volume::mount(&root, &dev, &layout);
    let mut done = match result {
        Ok(d) => d,
        Err(e) => {
            eprintln!("soci-agent cache mount: {}", crate::exit::error_chain(&e));
            return e.exit_kind().code();
        }
    };
    if let Some(why) = incompatible_cache(&root, &a.soci_root).await {
        tracing::warn!(
            "{why}: binding fresh directories of the data volume instead of the cached ones; boot prefetches the images"
        );
        let _ = volume::unmount(&layout);
        layout = volume::Layout::fallback(&root, &a.soci_root);
        done = match volume::mount(&root, &dev, &layout) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("soci-agent cache mount: {}", crate::exit::error_chain(&e));
                return 1;
            }
        };
    }
    for n in done.note.iter().chain(&done.grown) {
        tracing::info!("{n}");
    }
    println!(
        "data volume {} ({}) mounted in {:.2}s; mounted now: {}",
        done.device,
        done.fs,
        started.elapsed().as_secs_f64(),
        if done.mounted.is_empty() {
            "nothing (already in place)".into()
        } else {
            done.mounted.join(", ")
        }
    );
    0
}

/// Why this node's daemons cannot read the cache on the mounted volume, if so.
async fn incompatible_cache(root: &Root, _soci_root: &str) -> Option<String> {
    let text = root.read_string_opt(manifest_path()).ok().flatten()?;
    let m = manifest::Manifest::parse(&manifest_path(), &text).ok()?;
    let versions = node::versions(root).await;
    manifest::incompatibility(&m, versions.containerd.as_deref(), versions.soci.as_deref())
}
