//! `cache seal`, on the builder once its images are pulled: checks them
//! through CRI, stops kubelet, containerd and SOCI over D-Bus (their bolt
//! databases closed), writes the manifest at the volume's top, syncs,
//! unmounts, and prints the snapshot command.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use super::manifest::{CachedImage, Filesystem, Manifest, SCHEMA};
use super::{Common, device, manifest_path, node, volume};
use crate::paths::{
    CONTAINERD_SERVICE, KUBELET_SERVICE, SOCI_SERVICE, SOCI_SOCKET_UNIT, VOLUME_LABEL, VOLUME_MOUNT, VOLUME_SERVICE,
};
use crate::rootfs::Root;
use crate::systemd::{Systemd, SystemdError};

#[derive(Debug, Clone, Args)]
pub struct SealArgs {
    #[command(flatten)]
    pub common: Common,
    /// Images the cache must hold (tag or digest). [default: those of the last `prefetch` run,
    /// else every image CRI lists]
    #[arg(value_name = "IMAGE")]
    pub images: Vec<String>,
    /// Read more image references from FILE (one per line, `#` comments).
    #[arg(long, value_name = "FILE")]
    pub from: Vec<PathBuf>,
    /// Leave the volume mounted after writing the manifest (the daemons are stopped either way).
    #[arg(long)]
    pub keep_mounted: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct SealReport {
    pub command: &'static str,
    pub exit_code: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<Manifest>,
    pub missing: Vec<String>,
    pub stopped: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<String>,
    pub next_steps: Vec<String>,
    pub warnings: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub seconds: f64,
}

impl SealReport {
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        if let Some(e) = &self.error {
            out.push_str(&format!("soci-agent cache seal: {e}\n"));
        }
        for m in &self.missing {
            out.push_str(&format!("  missing {m}\n"));
        }
        for w in &self.warnings {
            out.push_str(&format!("warning: {w}\n"));
        }
        if let Some(m) = &self.manifest {
            for i in &m.images {
                out.push_str(&format!("  cached  {} {} {}\n", i.image, i.digest, i.platform));
            }
            out.push_str(&format!(
                "sealed {} ({} images; {} {}, {:.2} GiB used of {:.2} GiB) in {:.1}s; stopped {}\n",
                manifest_path(),
                m.images.len(),
                m.filesystem.kind,
                m.filesystem.label,
                gib(m.filesystem.used_bytes),
                gib(m.filesystem.size_bytes),
                self.seconds,
                self.stopped.join(", ")
            ));
        }
        for s in &self.next_steps {
            out.push_str(&format!("next: {s}\n"));
        }
        out
    }
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

/// Why `cache seal` stopped (the report's `error`).
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("no data volume is mounted at {mountpoint}: run soci-agent install --data-volume DEVICE first")]
    NotMounted { mountpoint: &'static str },
    #[error(transparent)]
    ImageList(#[from] crate::prefetch::OptionsError),
    #[error(transparent)]
    Cri(#[from] node::CriError),
    #[error("no image to seal: prefetch some first, or name them")]
    NoImages,
    #[error("{count} image(s) are not present through CRI: prefetch them first; nothing was stopped")]
    Missing { count: usize },
    #[error("cannot reach systemd to stop the daemons")]
    ReachSystemd {
        #[source]
        source: SystemdError,
    },
    #[error("cannot tell whether {unit} runs")]
    UnitState {
        unit: &'static str,
        #[source]
        source: SystemdError,
    },
    #[error("stopping {unit}")]
    Stop {
        unit: &'static str,
        #[source]
        source: SystemdError,
    },
    #[error(transparent)]
    WriteManifest(crate::rootfs::FsError),
}

impl crate::exit::ExitKindOf for SealError {
    /// Every seal failure leaves the node as it was for what it did not reach: exit 1.
    fn exit_kind(&self) -> crate::exit::ExitKind {
        use crate::exit::ExitKind;
        match self {
            SealError::NotMounted { .. }
            | SealError::ImageList(_)
            | SealError::Cri(_)
            | SealError::NoImages
            | SealError::Missing { .. }
            | SealError::ReachSystemd { .. }
            | SealError::UnitState { .. }
            | SealError::Stop { .. }
            | SealError::WriteManifest(_) => ExitKind::Failed,
        }
    }
}

fn failed(mut r: SealReport, started: Instant, error: SealError) -> SealReport {
    use crate::exit::ExitKindOf;
    r.exit_code = error.exit_kind().code();
    r.error = Some(crate::exit::error_chain(&error));
    r.seconds = started.elapsed().as_secs_f64();
    r
}

/// The images to seal: given, else the last prefetch run's, else all.
async fn wanted(
    args: &SealArgs,
    root: &Root,
    client: &k8s_cri::v1::image_service_client::ImageServiceClient<tonic::transport::Channel>,
) -> Result<Vec<String>, SealError> {
    let mut images = args.images.clone();
    for f in &args.from {
        images.extend(crate::prefetch::read_image_list(f)?);
    }
    if !images.is_empty() {
        return Ok(images);
    }
    if let Some((_, last)) = crate::history::latest(root, "prefetch")
        && let Some(list) = last["images"].as_array()
    {
        let named: Vec<String> = list
            .iter()
            .filter_map(|i| i["reference"].as_str().or(i["image"].as_str()).map(String::from))
            .collect();
        if !named.is_empty() {
            return Ok(named);
        }
    }
    Ok(node::list(client)
        .await?
        .into_iter()
        .filter_map(|i| i.repo_tags.first().or(i.repo_digests.first()).cloned())
        .collect())
}

pub async fn seal(args: &SealArgs) -> SealReport {
    let started = Instant::now();
    let mut r = SealReport {
        command: "cache seal",
        exit_code: 0,
        manifest: None,
        missing: Vec::new(),
        stopped: Vec::new(),
        volume_id: None,
        next_steps: Vec::new(),
        warnings: Vec::new(),
        error: None,
        seconds: 0.0,
    };
    if let Err(e) = run(args, &mut r).await {
        return failed(r, started, e);
    }
    r.seconds = started.elapsed().as_secs_f64();
    r
}

/// The steps of a seal, in order; the first failure ends it.
async fn run(args: &SealArgs, r: &mut SealReport) -> Result<(), SealError> {
    let root = Root::new(&args.common.root);
    // 1. The volume must be mounted where the daemons keep their roots.
    let mp = root.path(VOLUME_MOUNT);
    let vol = volume::mount_at(&volume::mounts(), &mp).ok_or(SealError::NotMounted {
        mountpoint: VOLUME_MOUNT,
    })?;
    // 2. Every image present through CRI.
    let client = node::cri(&root, None)?;
    let images = wanted(args, &root, &client).await?;
    let cached = present(&client, &images, r).await?;
    let versions = node::versions(&root).await;
    // 3. Stop the daemons so their databases are closed.
    stop_daemons(r).await?;
    // 4. The manifest, synced.
    let m = Manifest {
        schema: SCHEMA,
        images: cached,
        containerd_version: versions.containerd.unwrap_or_else(|| "unknown".into()),
        soci_version: versions.soci.unwrap_or_else(|| "unknown".into()),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        created: now_rfc3339(),
        filesystem: filesystem(&root, &vol, &mp),
    };
    crate::rootfs::write_atomic(&root.path(manifest_path()), m.to_json().as_bytes(), 0o644)
        .map_err(SealError::WriteManifest)?;
    sync_fs(&mp);
    r.volume_id = device::ebs_volume_id(vol.dev);
    r.next_steps = next_steps(&m, r.volume_id.as_deref());
    r.manifest = Some(m);
    // 5. Unmounted, so the snapshot is of a clean filesystem.
    if !args.keep_mounted {
        match stop_unit(VOLUME_SERVICE).await {
            Ok(()) => r.stopped.push(VOLUME_SERVICE.into()),
            Err(e) => r.warnings.push(format!(
                "the volume stays mounted ({}); it is synced, so a snapshot is still consistent",
                crate::exit::error_chain(&e)
            )),
        }
    }
    Ok(())
}

/// Each wanted image as CRI sees it; the missing ones are listed in the report and fail the seal.
async fn present(
    client: &k8s_cri::v1::image_service_client::ImageServiceClient<tonic::transport::Channel>,
    images: &[String],
    r: &mut SealReport,
) -> Result<Vec<CachedImage>, SealError> {
    let mut cached = Vec::new();
    for image in images {
        match node::status(client, image).await {
            Ok(Some(found)) => cached.push(CachedImage {
                image: image.clone(),
                digest: found.id.clone(),
                repo_digests: found.repo_digests.clone(),
                platform: node::platform(),
                size: found.size,
            }),
            Ok(None) => r.missing.push(image.clone()),
            Err(e) => r.missing.push(format!("{image} ({})", crate::exit::error_chain(&e))),
        }
    }
    if !r.missing.is_empty() {
        return Err(SealError::Missing { count: r.missing.len() });
    }
    if cached.is_empty() {
        return Err(SealError::NoImages);
    }
    Ok(cached)
}

async fn stop_unit(unit: &str) -> Result<(), SystemdError> {
    let sd = Systemd::connect(Duration::from_secs(10)).await?;
    sd.stop(unit).await
}

/// Stops kubelet (when loaded), containerd, SOCI and its socket (which would start it again).
async fn stop_daemons(r: &mut SealReport) -> Result<(), SealError> {
    let sd = Systemd::connect(Duration::from_secs(10))
        .await
        .map_err(|source| SealError::ReachSystemd { source })?;
    for unit in [KUBELET_SERVICE, CONTAINERD_SERVICE, SOCI_SOCKET_UNIT, SOCI_SERVICE] {
        let state = sd
            .unit_state(unit)
            .await
            .map_err(|source| SealError::UnitState { unit, source })?;
        if state.load_state == "not-found" || !state.is_active() {
            continue;
        }
        sd.stop(unit).await.map_err(|source| SealError::Stop { unit, source })?;
        r.stopped.push(unit.to_string());
    }
    Ok(())
}

fn filesystem(root: &Root, vol: &crate::mountinfo::Mount, mp: &std::path::Path) -> Filesystem {
    let (size, used, _) = volume::space(mp).unwrap_or_default();
    let dev = device::Device {
        given: vol.source.clone(),
        used: vol.source.clone(),
        note: None,
        rdev: Some(vol.dev),
    };
    let (label, uuid) = match device::probe(root, &dev) {
        Ok(device::Content::Filesystem { label, uuid, .. }) => (label, uuid),
        _ => (VOLUME_LABEL.to_string(), String::new()),
    };
    Filesystem {
        kind: vol.fstype.clone(),
        label,
        uuid,
        size_bytes: size,
        used_bytes: used,
    }
}

fn sync_fs(mp: &std::path::Path) {
    if let Ok(f) = std::fs::File::open(mp) {
        let _ = nix::unistd::syncfs(&f);
    }
}

/// The snapshot command, and how to size and attach volumes made from it.
fn next_steps(m: &Manifest, volume_id: Option<&str>) -> Vec<String> {
    let used = gib(m.filesystem.used_bytes);
    // Room for pods' writable layers and for boot to prefetch a few misses.
    let size = ((used * 1.5).ceil() as u64).max(gib(m.filesystem.size_bytes).ceil() as u64);
    vec![
        format!(
            "aws ec2 create-snapshot --volume-id {} --description \"soci-agent cache: {} image(s), containerd {}, SOCI {}\" \
             --tag-specifications 'ResourceType=snapshot,Tags=[{{Key=soci-agent-cache,Value={}}}]'",
            volume_id.unwrap_or("<VOLUME_ID>"),
            m.images.len(),
            m.containerd_version,
            m.soci_version,
            m.created
        ),
        format!(
            "the volume holds {used:.2} GiB (SOCI's root holds about 2x the image size with discard_unpacked_layers); \
             give nodes at least {size}Gi: soci-agent render ec2nodeclass --data-volume-snapshot snap-... --data-volume-size {size}Gi"
        ),
        "consider EBS Fast Snapshot Restore for the snapshot: without it the first reads of a restored volume are slow"
            .into(),
    ]
}

/// Now in RFC 3339 UTC, without a date crate.
fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn time_format() {
        let t = super::now_rfc3339();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'));
    }
}
