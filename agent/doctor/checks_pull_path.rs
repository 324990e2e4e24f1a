//! containerd.pull-path and containerd.runtime-platforms: from containerd
//! 2.1 on, CRI pulls go through the transfer service unless a setting forces
//! the local pull path (`disable_snapshot_annotations = false`,
//! `discard_unpacked_layers = true`, a non-default `max_concurrent_downloads`
//! or `use_local_image_pull = true`); each path honours different keys.
//! containerd 2.2 adds per-runtime snapshotters (`runtime_platforms`).

use toml_edit::{DocumentMut, Item};

use super::Check;
use super::node::Node;
use crate::files::containerd_config::ConfigVersion;

const IMAGES: [&str; 2] = ["plugins", "io.containerd.cri.v1.images"];
const IMAGES_SHOWN: &str = "plugins.'io.containerd.cri.v1.images'";
const UNPACK: [&str; 3] = ["plugins", "io.containerd.transfer.v1.local", "unpack_config"];
/// containerd's default `max_concurrent_downloads`.
const DEFAULT_DOWNLOADS: i64 = 3;

fn images_key<'a>(doc: &'a DocumentMut, key: &str) -> Option<&'a Item> {
    get(doc, &[IMAGES[0], IMAGES[1], key])
}

const PULL_PATH_ID: &str = "containerd.pull-path";

/// `containerd.pull-path`: on containerd 2.1+, whichever path CRI pulls take ends in soci.
pub fn pull_path(node: &Node, doc: &DocumentMut, version: ConfigVersion, path: &str) -> Check {
    let c = node.facts.containerd.as_ref();
    if version == ConfigVersion::V2 || c.is_some_and(|c| (c.major, c.minor) < (2, 1)) {
        let which = c.map_or("containerd 1.x".to_string(), |c| format!("containerd {}", c.version));
        return Check::skip(
            PULL_PATH_ID,
            format!(
                "{which}, config version {version}: CRI always takes the local pull path (no transfer service \
                 before 2.1), which honours the CRI snapshotter and disable_snapshot_annotations"
            ),
        );
    }
    let which = c.map_or(
        "containerd version unknown, config version 3: assuming 2.1+".to_string(),
        |c| format!("containerd {}", c.version),
    );
    let triggers = local_pull_triggers(doc);
    if triggers.is_empty() {
        return transfer_service(doc, &which, path);
    }
    Check::ok(
        PULL_PATH_ID,
        format!(
            "{which}: CRI takes the local pull path ({} in {IMAGES_SHOWN}, {path}), which honours its \
             snapshotter, disable_snapshot_annotations, discard_unpacked_layers and max_concurrent_downloads; \
             the transfer service's unpack_config is not used for CRI pulls",
            triggers.join(", ")
        ),
    )
}

/// The CRI image settings that make containerd 2.1+ take the local pull path.
fn local_pull_triggers(doc: &DocumentMut) -> Vec<&'static str> {
    let mut triggers = Vec::new();
    if images_key(doc, "disable_snapshot_annotations").and_then(Item::as_bool) == Some(false) {
        triggers.push("disable_snapshot_annotations = false");
    }
    if images_key(doc, "discard_unpacked_layers").and_then(Item::as_bool) == Some(true) {
        triggers.push("discard_unpacked_layers = true");
    }
    if images_key(doc, "max_concurrent_downloads")
        .and_then(Item::as_integer)
        .is_some_and(|n| n != DEFAULT_DOWNLOADS)
    {
        triggers.push("a non-default max_concurrent_downloads");
    }
    if images_key(doc, "use_local_image_pull").and_then(Item::as_bool) == Some(true) {
        triggers.push("use_local_image_pull = true");
    }
    triggers
}

/// CRI pulls go through the transfer service: ok when its unpack_config unpacks into soci
/// with remote snapshot annotations on.
fn transfer_service(doc: &DocumentMut, which: &str, path: &str) -> Check {
    let unpack_soci = get(doc, &UNPACK).and_then(Item::as_array_of_tables).is_some_and(|a| {
        a.iter()
            .any(|t| t.get("snapshotter").and_then(Item::as_str) == Some("soci"))
    });
    let remote_labels = get(
        doc,
        &["proxy_plugins", "soci", "exports", "enable_remote_snapshot_annotations"],
    )
    .and_then(Item::as_str)
        == Some("true");
    if unpack_soci && remote_labels {
        return Check::ok(
            PULL_PATH_ID,
            format!(
                "{which}: CRI pulls go through the transfer service; [[plugins.'io.containerd.transfer.v1.local'.unpack_config]] \
                 unpacks into soci and exports.enable_remote_snapshot_annotations = \"true\" ({path}); the CRI \
                 snapshotter key is not used for pulls"
            ),
        );
    }
    Check::fail(
        PULL_PATH_ID,
        format!(
            "{which}: nothing in {IMAGES_SHOWN} forces the local pull path, so CRI pulls go through the transfer \
             service, whose unpack_config {} ({path})",
            if unpack_soci {
                "names soci but proxy_plugins.soci.exports has no enable_remote_snapshot_annotations = \"true\""
            } else {
                "does not unpack into soci: images land in overlayfs"
            }
        ),
        format!("set disable_snapshot_annotations = false in {IMAGES_SHOWN} (soci-agent install does)"),
    )
}

pub fn runtime_platforms(doc: &DocumentMut, version: ConfigVersion, path: &str) -> Check {
    const ID: &str = "containerd.runtime-platforms";
    if version == ConfigVersion::V2 {
        return Check::skip(ID, format!("config version 2 ({path}): no per-runtime snapshotters"));
    }
    let Some(table) = images_key(doc, "runtime_platforms").and_then(Item::as_table_like) else {
        return Check::ok(
            ID,
            format!("no {IMAGES_SHOWN}.runtime_platforms ({path}): every runtime uses the CRI snapshotter"),
        );
    };
    let mut other = Vec::new();
    let mut soci = Vec::new();
    for (name, item) in table.iter() {
        match item.get("snapshotter").and_then(Item::as_str) {
            Some("soci") => soci.push(name.to_string()),
            Some(s) => other.push(format!("{name} -> {s}")),
            None => {}
        }
    }
    if other.is_empty() {
        let listed = if soci.is_empty() {
            "none set".to_string()
        } else {
            soci.join(", ")
        };
        return Check::ok(
            ID,
            format!("{IMAGES_SHOWN}.runtime_platforms with soci: {listed} ({path})"),
        );
    }
    Check::warn(
        ID,
        format!(
            "{IMAGES_SHOWN}.runtime_platforms unpack elsewhere: {} ({path})",
            other.join(", ")
        ),
        "pods of those runtime classes do not use SOCI: set snapshotter = \"soci\" there if they should",
    )
}

/// Looks up a dotted path of plain key names (no quoting) in `doc`.
pub(super) fn get<'a>(doc: &'a DocumentMut, path: &[&str]) -> Option<&'a Item> {
    path.iter().try_fold(doc.as_item(), |item, k| item.get(k))
}
