//! containerd.*: its version, and its config file (`--containerd-config`)
//! read the way containerd reads it: the format version, `proxy_plugins.soci`
//! (address = the socket the SOCI unit serves, exports.root = its --root),
//! the CRI snapshotter and snapshot annotations under the table for the
//! file's version, and on containerd >= 2.1 which pull path CRI takes.

use crate::paths::CONTAINERD_VERSION_FILE;
use toml_edit::{DocumentMut, Item};

use super::Check;
use super::checks_pull_path::get;
use super::node::{Node, Text, containerd_daemon};
use crate::files::containerd_config::{self, ConfigVersion, OwnedKey};
use crate::host::ContainerdVersion;

const IDS: [&str; 7] = [
    "containerd.legacy-tables",
    "containerd.proxy-plugin",
    "containerd.exports-root",
    "containerd.snapshotter",
    "containerd.snapshot-annotations",
    "containerd.pull-path",
    "containerd.runtime-platforms",
];

/// `containerd.version`, then the checks of its config (skipped when the config is unusable).
pub fn checks(node: &Node) -> Vec<Check> {
    let mut out = vec![version(node)];
    match parsed_config(node) {
        Ok((doc, version)) => out.extend(config_checks(node, &doc, version)),
        Err(stopped) => out.extend(stopped),
    }
    out
}

/// containerd's config parsed, with its format version; or the checks saying why not.
fn parsed_config(node: &Node) -> Result<(DocumentMut, ConfigVersion), Vec<Check>> {
    let text = config_text(node)?;
    let version = detected_version(text, &node.containerd_config_path)?;
    Ok((text.parse().expect("detect_version parsed it"), version))
}

/// `containerd.config-version` saying why the config cannot be checked, then every config check skipped.
fn unusable(config_version: Check, why: String) -> Vec<Check> {
    let mut out = vec![config_version];
    out.extend(IDS.iter().map(|id| Check::skip(id, why.clone())));
    out
}

/// The config file's text, or the checks for a file that is unreadable or missing.
fn config_text(node: &Node) -> Result<&str, Vec<Check>> {
    let path = &node.containerd_config_path;
    match &node.containerd_config {
        Text::Found(t) => Ok(t),
        Text::Unreadable(e) => Err(unusable(
            Check::skip("containerd.config-version", format!("{path}: {e}")).advise("run doctor as root"),
            format!("{path} unreadable"),
        )),
        Text::Missing if node.nodeadm() => Err(unusable(
            Check::skip(
                "containerd.config-version",
                format!("no {path} yet: nodeadm renders it from the NodeConfig at boot (see nodeadm.dropin)"),
            ),
            format!("no {path} yet"),
        )),
        Text::Missing => Err(unusable(
            Check::fail(
                "containerd.config-version",
                format!("no {path}: containerd runs with its defaults, which know nothing of soci"),
                "run soci-agent install (it writes a minimal wired config)",
            ),
            format!("no {path}"),
        )),
    }
}

/// The config's format version, or the checks for an empty or malformed file.
fn detected_version(text: &str, path: &str) -> Result<ConfigVersion, Vec<Check>> {
    match containerd_config::detect_version(text, path) {
        Ok(Some(v)) => Ok(v),
        Ok(None) => Err(unusable(
            Check::fail(
                "containerd.config-version",
                format!("{path} is empty: containerd runs with its defaults"),
                "run soci-agent install",
            ),
            format!("{path} is empty"),
        )),
        Err(e) => Err(unusable(
            Check::fail(
                "containerd.config-version",
                e.to_string(),
                "containerd refuses a malformed config: fix the file (install leaves it untouched)",
            ),
            format!("{path} does not parse"),
        )),
    }
}

/// The checks of a parsed config, failures softened while nodeadm-run has yet to render it.
fn config_checks(node: &Node, doc: &DocumentMut, version: ConfigVersion) -> Vec<Check> {
    let path = &node.containerd_config_path;
    let keys = containerd_config::owned_keys(version, &node.soci_wiring());
    let out = vec![
        config_version(node, doc, version, path),
        legacy_tables(node, doc, version, path),
        proxy_plugin(node, doc, &keys, path),
        exports_root(node, doc, &keys[4], path),
        snapshotter(doc, &keys[0], path),
        annotations(doc, &keys[1], path),
        super::checks_pull_path::pull_path(node, doc, version, path),
        super::checks_pull_path::runtime_platforms(doc, version, path),
    ];
    if super::checks_nodeadm::dropin_wires_soci(node) {
        return out.into_iter().map(|c| pending_nodeadm_run(c, path)).collect();
    }
    out
}

/// On a nodeadm host whose drop-in wires SOCI, a rendered config without the
/// wiring is waiting for nodeadm-run (user data runs before it): a warning,
/// not a failure.
fn pending_nodeadm_run(check: Check, path: &str) -> Check {
    const PENDING: [&str; 4] = [
        "containerd.proxy-plugin",
        "containerd.exports-root",
        "containerd.snapshotter",
        "containerd.snapshot-annotations",
    ];
    if check.verdict != super::Verdict::Fail || !PENDING.contains(&check.id) {
        return check;
    }
    Check::warn(
        check.id,
        format!("{} (not applied yet: see nodeadm.dropin)", check.evidence),
        format!(
            "nodeadm-run renders {path} from the NodeConfig drop-in before it starts containerd; \
             never edit it by hand on a nodeadm host"
        ),
    )
}

fn version(node: &Node) -> Check {
    const ID: &str = "containerd.version";
    let Some(v) = &node.facts.containerd else {
        return Check::warn(
            ID,
            format!("no {} and no containerd binary under the root", CONTAINERD_VERSION_FILE),
            "install containerd (1.7.16 or newer, or 2.x)",
        );
    };
    let patch: u32 = v.version.split('.').nth(2).and_then(|p| p.parse().ok()).unwrap_or(0);
    let evidence = format!("containerd {} (from {})", v.version, v.source);
    if (v.major, v.minor, patch) < (1, 7, 16) {
        return Check::warn(
            ID,
            evidence,
            "containerd before 1.7.16 runs no image GC and enforces no storage limits for proxy snapshotters: \
             upgrade to 1.7.16+ or 2.x",
        );
    }
    Check::ok(ID, evidence)
}

fn config_version(node: &Node, doc: &DocumentMut, version: ConfigVersion, path: &str) -> Check {
    const ID: &str = "containerd.config-version";
    let evidence = format!("version = {version} ({path})");
    let Some(c) = &node.facts.containerd else {
        return Check::ok(ID, evidence);
    };
    let daemon = containerd_daemon(c);
    let newest = ConfigVersion::newest_read_by(daemon);
    if version > newest {
        return Check::fail(
            ID,
            format!(
                "{evidence}, but containerd is {}: it reads at most version {newest}",
                c.version
            ),
            format!("containerd refuses to start with this file: write it as version {newest}"),
        );
    }
    if version == ConfigVersion::V2 && c.major >= 2 {
        return v2_on_containerd_2(doc, &evidence, c, path);
    }
    Check::ok(ID, format!("{evidence}, containerd {}", c.version))
}

/// A version 2 file on containerd 2.x: migrated at every start, and broken when the
/// migration drops the keys soci-agent owns.
fn v2_on_containerd_2(doc: &DocumentMut, evidence: &str, c: &ContainerdVersion, path: &str) -> Check {
    const ID: &str = "containerd.config-version";
    let daemon = containerd_daemon(c);
    if containerd_config::v2_migration_drops_owned_keys(doc) {
        return Check::fail(
            ID,
            format!(
                "{evidence}, containerd is {}: its v2 migration drops `snapshotter` and \
                 `disable_snapshot_annotations` when [plugins.\"io.containerd.grpc.v1.cri\".containerd] has no \
                 `runtimes` table, so CRI pulls use overlayfs whatever this file says",
                c.version
            ),
            format!(
                "convert the file: `containerd config migrate > {path}.new`, review, move it into place, then \
                 run soci-agent install (it edits version {} files)",
                ConfigVersion::written_by(daemon)
            ),
        );
    }
    Check::warn(
        ID,
        format!("{evidence}, containerd is {}", c.version),
        "containerd 2.x migrates version 2 at every start; move to version 3 tables \
         (plugins.'io.containerd.cri.v1.images'): `containerd config migrate`",
    )
}

/// Keys containerd 2.x still reads under `plugins."io.containerd.grpc.v1.cri"` in a v3/v4 file.
const CRI_SERVER_KEYS: [&str; 6] = [
    "disable_tcp_service",
    "stream_server_address",
    "stream_server_port",
    "stream_idle_timeout",
    "enable_tls_streaming",
    "x509_key_pair_streaming",
];

/// v2 CRI settings left in a v3/v4 file: containerd 2.x ignores them (on
/// nodeadm hosts, user data written with v2 names ends up like this once the
/// drop-in's v3 names make nodeadm render its v3 template).
fn legacy_tables(node: &Node, doc: &DocumentMut, version: ConfigVersion, path: &str) -> Check {
    const ID: &str = "containerd.legacy-tables";
    if !version.is_v3_family() {
        return Check::skip(ID, format!("version = {version}: the v2 CRI table is the right one"));
    }
    let Some(cri) = get(doc, &["plugins", "io.containerd.grpc.v1.cri"]).and_then(Item::as_table_like) else {
        return Check::ok(ID, format!("no leftover v2 CRI settings in {path}"));
    };
    let mut lost = Vec::new();
    for (key, item) in cri.iter() {
        if !CRI_SERVER_KEYS.contains(&key) {
            leaf_paths(&format!("plugins.\"io.containerd.grpc.v1.cri\".{key}"), item, &mut lost);
        }
    }
    if lost.is_empty() {
        return Check::ok(ID, format!("no leftover v2 CRI settings in {path}"));
    }
    let origin = if node.nodeadm() {
        " (on nodeadm hosts: user-data NodeConfig written with version 2 names, rendered into nodeadm's v3 template)"
    } else {
        ""
    };
    let shown: Vec<&str> = lost.iter().take(8).map(String::as_str).collect();
    let more = if lost.len() > 8 {
        format!(" and {} more", lost.len() - 8)
    } else {
        String::new()
    };
    Check::warn(
        ID,
        format!(
            "{path} is version {version} but sets {}{more} under the v2 CRI plugin, which containerd 2.x ignores{origin}",
            shown.join(", ")
        ),
        "move them to their version 3 tables (plugins.'io.containerd.cri.v1.images' / \
         plugins.'io.containerd.cri.v1.runtime'): e.g. containerd.discard_unpacked_layers -> images.discard_unpacked_layers, \
         registry.config_path -> images.registry.config_path",
    )
}

/// Dotted paths of every value under `item` (tables walked).
fn leaf_paths(prefix: &str, item: &Item, out: &mut Vec<String>) {
    match item.as_table_like() {
        Some(t) => {
            for (k, v) in t.iter() {
                leaf_paths(&format!("{prefix}.{k}"), v, out);
            }
        }
        None => out.push(prefix.to_string()),
    }
}

/// The value at `key`, shown as written (`"soci"`, `false`), or why not.
fn shown(doc: &DocumentMut, key: &OwnedKey) -> Option<String> {
    let item = key.lookup(doc.as_table())?;
    Some(match item.as_value() {
        Some(v) => v.to_string().trim().to_string(),
        None => format!("a {}", item.type_name()),
    })
}

fn proxy_plugin(node: &Node, doc: &DocumentMut, keys: &[OwnedKey], path: &str) -> Check {
    const ID: &str = "containerd.proxy-plugin";
    let (ty, address) = (&keys[2], &keys[3]);
    if doc.get("proxy_plugins").and_then(|p| p.get("soci")).is_none() {
        return Check::fail(
            ID,
            format!("no [proxy_plugins.soci] in {path}"),
            "containerd does not know the soci snapshotter: run soci-agent install",
        );
    }
    if !ty.is_set_in(doc.as_table()) {
        return Check::fail(
            ID,
            format!(
                "proxy_plugins.soci.type = {} ({path})",
                shown(doc, ty).unwrap_or("unset".into())
            ),
            "set type = \"snapshot\"",
        );
    }
    let found = shown(doc, address).unwrap_or("unset".into());
    if !address.is_set_in(doc.as_table()) {
        return Check::fail(
            ID,
            format!(
                "proxy_plugins.soci.address = {found} ({path}), but the daemon serves {} ({})",
                node.soci_socket.value, node.soci_socket.source
            ),
            format!("set address = \"{}\" (soci-agent install does)", node.soci_socket.value),
        );
    }
    Check::ok(
        ID,
        format!(
            "proxy_plugins.soci: type \"snapshot\", address {found} ({path}) = the daemon's socket ({})",
            node.soci_socket.source
        ),
    )
}

fn exports_root(node: &Node, doc: &DocumentMut, key: &OwnedKey, path: &str) -> Check {
    const ID: &str = "containerd.exports-root";
    let want = &node.soci_root.value;
    match shown(doc, key) {
        _ if key.is_set_in(doc.as_table()) => Check::ok(
            ID,
            format!(
                "proxy_plugins.soci.exports.root = \"{want}\" ({path}) = the daemon's root ({})",
                node.soci_root.source
            ),
        ),
        None => Check::warn(
            ID,
            format!("proxy_plugins.soci.exports.root unset ({path})"),
            format!("set it to \"{want}\": kubelet uses it for disk accounting and image GC"),
        ),
        Some(found) => Check::fail(
            ID,
            format!(
                "proxy_plugins.soci.exports.root = {found} ({path}), but the daemon's root is {want} ({})",
                node.soci_root.source
            ),
            format!("set it to \"{want}\" (or pass --soci-root if doctor guessed wrong)"),
        ),
    }
}

fn snapshotter(doc: &DocumentMut, key: &OwnedKey, path: &str) -> Check {
    const ID: &str = "containerd.snapshotter";
    let dotted = key.dotted();
    match shown(doc, key) {
        _ if key.is_set_in(doc.as_table()) => Check::ok(ID, format!("{dotted} = \"soci\" ({path})")),
        None => Check::fail(
            ID,
            format!("{dotted} unset ({path}): CRI pulls use overlayfs, not SOCI"),
            "set snapshotter = \"soci\" (soci-agent install does)",
        ),
        Some(found) => Check::fail(
            ID,
            format!("{dotted} = {found} ({path}): CRI pulls do not use SOCI"),
            "set snapshotter = \"soci\"",
        ),
    }
}

fn annotations(doc: &DocumentMut, key: &OwnedKey, path: &str) -> Check {
    const ID: &str = "containerd.snapshot-annotations";
    let dotted = key.dotted();
    if key.is_set_in(doc.as_table()) {
        return Check::ok(ID, format!("{dotted} = false ({path})"));
    }
    let found = shown(doc, key).unwrap_or_else(|| "unset (default true)".into());
    Check::fail(
        ID,
        format!("{dotted} = {found} ({path}): parallel mode gets no image and layer labels"),
        "set disable_snapshot_annotations = false (soci-agent install does)",
    )
}

/// `containerd.registry-mirrors`: containerd's `hosts.toml` mirrors that SOCI
/// bypasses. In parallel mode SOCI fetches layers from the image's own
/// registry; it resolves manifests through a mirror only when its own config
/// lists it (`[[resolver.host."R".mirrors]]`, which install writes).
pub fn registry_mirrors(node: &Node) -> Check {
    const ID: &str = "containerd.registry-mirrors";
    let (hosts, errors) = crate::host::registry_hosts(&node.root, &node.containerd_config_path);
    let mut bypassed = Vec::new();
    let mut not_listed = Vec::new();
    let soci = match &node.soci_config {
        Text::Found(t) => crate::files::soci_config::read_back(t).ok().flatten(),
        _ => None,
    };
    for r in &hosts {
        let mirrors = r.mirrors();
        if !mirrors.is_empty() {
            bypassed.push(format!("{} (mirrors {})", r.registry, mirrors.join(", ")));
        }
        let want = r.soci_mirrors();
        let have = soci.as_ref().and_then(|c| c.resolver.get(&r.registry));
        if !want.is_empty() && have != Some(&want) {
            not_listed.push(r.registry.clone());
        }
    }
    let mut evidence: Vec<String> = errors.iter().map(ToString::to_string).collect();
    evidence.extend(hosts.iter().flat_map(|r| r.not_carried()));
    if !bypassed.is_empty() {
        evidence.insert(
            0,
            format!(
                "SOCI fetches layers past containerd's registry mirrors, from the image's own registry: {}",
                bypassed.join("; ")
            ),
        );
    }
    if !not_listed.is_empty() {
        evidence.push(format!(
            "SOCI's config does not list the hosts.toml hosts of {}",
            not_listed.join(", ")
        ));
    }
    if evidence.is_empty() {
        return Check::ok(
            ID,
            format!("{} registry host file(s); no mirror SOCI would bypass", hosts.len()),
        );
    }
    let advice = if not_listed.is_empty() {
        "layer traffic goes to the registries themselves (size egress and rate limits for that); \
         manifests do go through the mirrors"
    } else {
        "re-run soci-agent install: it carries hosts.toml mirrors and plain-HTTP registries into SOCI's resolver"
    };
    Check::warn(ID, evidence.join("; "), advice)
}
