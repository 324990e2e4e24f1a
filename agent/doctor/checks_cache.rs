//! cache.*: the snapshot cache on a data volume (install --data-volume):
//! the volume mounted where the daemons expect it, the manifest, which of its
//! images this node has (live), and the volume's free space.

use std::path::Path;

use super::node::{Node, Text};
use super::unitfile::UnitFiles;
use super::{Check, DoctorContext};
use crate::cache::manifest::{Manifest, incompatibility};
use crate::cache::volume::{self, Layout};
use crate::paths::{CONTAINERD_ROOT, VOLUME_MOUNT, VOLUME_SERVICE};

/// Free space below which the volume is a warning (boot prefetches misses onto it).
const LOW_FREE_BYTES: u64 = 2 << 30;

pub async fn checks(ctx: &DoctorContext, node: &Node) -> Vec<Check> {
    let unit = UnitFiles::load(&node.root, VOLUME_SERVICE);
    let Some(exec) = unit.exec_start().filter(|_| unit.exists()) else {
        return vec![Check::skip(
            "cache.volume",
            format!("no {VOLUME_SERVICE}: no data volume configured (soci-agent install --data-volume DEVICE)"),
        )];
    };
    let device = exec.flag("--device").unwrap_or("?").to_string();
    let layout = Layout::new(&node.root, &node.soci_root.value);
    let host = node.root.is_host();
    let not_host = |id| Check::skip(id, format!("{device}: --root is not this host's /: mounts not checked"));
    let mut out = vec![if host {
        mounted(&device, &layout, &node.soci_root.value)
    } else {
        not_host("cache.volume")
    }];
    let manifest = manifest_check(node);
    out.push(manifest.0);
    out.push(images(ctx, node, manifest.1.as_ref()).await);
    out.push(if host {
        space(&layout.mountpoint)
    } else {
        not_host("cache.space")
    });
    out
}

/// cache.volume: the volume at its mount point, both roots bound from it.
fn mounted(device: &str, layout: &Layout, soci_root: &str) -> Check {
    const ID: &str = "cache.volume";
    let table = volume::mounts();
    let Some(vol) = volume::mount_at(&table, &layout.mountpoint) else {
        return Check::fail(
            ID,
            format!("{device} is not mounted at {VOLUME_MOUNT}"),
            format!(
                "systemctl status {VOLUME_SERVICE}; journalctl -u {VOLUME_SERVICE} (containerd and SOCI require it and stay down without it)"
            ),
        );
    };
    let off: Vec<String> = layout
        .binds
        .iter()
        .filter(|(_, target)| volume::mount_at(&table, target).is_none_or(|m| m.dev != vol.dev))
        .map(|(_, t)| t.display().to_string())
        .collect();
    if !off.is_empty() {
        return Check::fail(
            ID,
            format!(
                "{} ({}) is mounted at {VOLUME_MOUNT}, but {} not bound from it",
                vol.source,
                vol.fstype,
                off.join(" and ")
            ),
            format!("systemctl restart {VOLUME_SERVICE} containerd (the daemons use what is mounted when they start)"),
        );
    }
    Check::ok(
        ID,
        format!(
            "{device}: {} ({}) at {VOLUME_MOUNT}; {CONTAINERD_ROOT} and {soci_root} bound from it",
            vol.source, vol.fstype
        ),
    )
}

/// cache.manifest: present, readable, written by daemons this node reads.
fn manifest_check(node: &Node) -> (Check, Option<Manifest>) {
    const ID: &str = "cache.manifest";
    let path = crate::cache::manifest_path();
    match Text::read(&node.root, &path) {
        Text::Missing => (
            Check::warn(
                ID,
                format!("no {path}: the volume was never sealed (a builder, or a blank volume)"),
                "on a builder: soci-agent prefetch, then soci-agent cache seal; on a node: attach a volume restored from a sealed snapshot",
            ),
            None,
        ),
        Text::Unreadable(e) => (
            Check::skip(ID, format!("{path}: {e}")).advise("run doctor as root"),
            None,
        ),
        Text::Found(text) => match Manifest::parse(&path, &text) {
            Err(e) => (
                Check::fail(
                    ID,
                    e.to_string(),
                    "re-seal the cache on a builder (soci-agent cache seal)",
                ),
                None,
            ),
            Ok(m) => {
                let c = node.facts.containerd.as_ref().map(|c| c.version.clone());
                let s = node.facts.soci_installed.iter().find_map(|i| i.version.clone());
                let evidence = format!(
                    "{path}: {} image(s), sealed {} with containerd {}, SOCI {}",
                    m.images.len(),
                    m.created,
                    m.containerd_version,
                    m.soci_version
                );
                let check = match incompatibility(&m, c.as_deref(), s.as_deref()) {
                    Some(why) => Check::warn(
                        ID,
                        format!("{evidence}; {why}"),
                        "rebuild the snapshot with this node's containerd and SOCI: until then boot prefetches every image",
                    ),
                    None => Check::ok(ID, evidence),
                };
                (check, Some(m))
            }
        },
    }
}

/// cache.images: hits and misses through CRI (live).
async fn images(ctx: &DoctorContext, node: &Node, m: Option<&Manifest>) -> Check {
    const ID: &str = "cache.images";
    if !ctx.live {
        return Check::skip(ID, "--no-live: CRI not asked");
    }
    if m.is_none() {
        return Check::skip(ID, "no readable manifest");
    }
    let v = crate::cache::verify::verify(&node.root, None).await;
    let evidence = format!("{} hit, {} miss through CRI ImageStatus", v.hits, v.misses);
    if v.misses == 0 {
        Check::ok(ID, evidence)
    } else {
        let missing = v.missing().join(", ");
        Check::warn(
            ID,
            format!("{evidence}: {missing}"),
            "boot prefetches the misses; soci-agent cache verify shows why each one missed",
        )
    }
}

/// cache.space: free space on the volume.
fn space(mountpoint: &Path) -> Check {
    const ID: &str = "cache.space";
    let Some((total, used, avail)) = volume::space(mountpoint) else {
        return Check::skip(ID, format!("cannot stat {VOLUME_MOUNT}"));
    };
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let evidence = format!(
        "{:.1} GiB free of {:.1} GiB ({:.1} GiB used) on {VOLUME_MOUNT}",
        gib(avail),
        gib(total),
        gib(used)
    );
    if avail < LOW_FREE_BYTES || avail * 10 < total {
        Check::warn(
            ID,
            evidence,
            "grow the volume (--data-volume-size) or cache fewer images: pulls and pods' writable layers land here too",
        )
    } else {
        Check::ok(ID, evidence)
    }
}
