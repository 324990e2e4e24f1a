//! nodeadm.* (EKS AL2023 hosts): our NodeConfig drop-in
//! `/etc/eks/nodeadm.d/50-soci-agent.yaml` (does it wire SOCI with the
//! right table names, and has nodeadm rendered it into containerd's config),
//! and nodeadm's own `FastImagePull` running alongside the agent.

use crate::paths::{NODEADM_CACHE, NODEADM_DROPIN, NODEADM_DROPIN_DIR};
use toml_edit::DocumentMut;

use super::Check;
use super::node::{Node, Text, containerd_daemon};
use super::nodeconfig_yaml::Documents;
use crate::files::containerd_config::{self, ConfigVersion, OwnedKey, SociWiring};
use crate::files::nodeconfig::{self};

/// cloud-init's copy of the instance's user data.
const USER_DATA: &str = "/var/lib/cloud/instance/user-data.txt";

pub fn checks(node: &Node) -> Vec<Check> {
    vec![dropin(node), fast_image_pull(node)]
}

/// The table names nodeadm renders for this host (v3 when containerd's version is unknown).
fn version(node: &Node) -> ConfigVersion {
    node.facts.containerd.as_ref().map_or(ConfigVersion::V3, |c| {
        nodeconfig::version_for_containerd(containerd_daemon(c))
    })
}

/// Whether the agent's NodeConfig drop-in sets every key soci-agent owns in
/// containerd's config (so a rendered config that lacks them is waiting for
/// nodeadm-run, not broken).
pub(super) fn dropin_wires_soci(node: &Node) -> bool {
    if !node.nodeadm() {
        return false;
    }
    let Text::Found(text) = Text::read(&node.root, NODEADM_DROPIN) else {
        return false;
    };
    let Some(fragment) = Documents::parse(&text)
        .ok()
        .and_then(|d| d.string(&["spec", "containerd", "config"]))
        .and_then(|block| block.parse::<DocumentMut>().ok())
    else {
        return false;
    };
    containerd_config::owned_keys(version(node), &node.soci_wiring())
        .iter()
        .all(|k| k.is_set_in(fragment.as_table()))
}

const DROPIN_ID: &str = "nodeadm.dropin";
const REINSTALL: &str = "re-run soci-agent install";

/// `nodeadm.dropin`: the agent's NodeConfig drop-in wires SOCI as install writes it, and nodeadm applied it.
fn dropin(node: &Node) -> Check {
    if !node.nodeadm() {
        return Check::skip(
            DROPIN_ID,
            "not a nodeadm host (no /usr/bin/nodeadm, no /etc/eks/nodeadm.d)",
        );
    }
    match dropin_verdict(node) {
        Ok(check) | Err(check) => check,
    }
}

/// Walks the drop-in from its text to what nodeadm rendered; `Err` is the first check that stops there.
fn dropin_verdict(node: &Node) -> Result<Check, Check> {
    let text = dropin_text(node)?;
    let version = version(node);
    let block = containerd_block(&text, version)?;
    let wiring = node.soci_wiring();
    let keys = containerd_config::owned_keys(version, &wiring);
    require_owned_keys(&block, &keys)?;
    require_rendered(node, &keys)?;
    Ok(as_install_writes(node, &text, version, &wiring))
}

/// The drop-in's text, or the check saying why there is none to look at.
fn dropin_text(node: &Node) -> Result<String, Check> {
    match Text::read(&node.root, NODEADM_DROPIN) {
        Text::Found(t) => Ok(t),
        Text::Unreadable(e) => {
            Err(Check::skip(DROPIN_ID, format!("{NODEADM_DROPIN}: {e}")).advise("run doctor as root"))
        }
        Text::Missing if node.agent_installed() => Err(Check::fail(
            DROPIN_ID,
            format!("no {NODEADM_DROPIN}: nodeadm renders containerd and kubelet without SOCI"),
            REINSTALL,
        )),
        Text::Missing => Err(Check::skip(
            DROPIN_ID,
            format!("no {NODEADM_DROPIN}: soci-agent has not wired this host"),
        )),
    }
}

/// The drop-in's `spec.containerd.config`, when present and named for `version`'s tables.
fn containerd_block(text: &str, version: ConfigVersion) -> Result<String, Check> {
    let docs = Documents::parse(text).map_err(|e| {
        Check::fail(
            DROPIN_ID,
            format!("{NODEADM_DROPIN}: {}", crate::exit::error_chain(&e)),
            "nodeadm cannot read the drop-in: re-run soci-agent install",
        )
    })?;
    let Some(block) = docs.string(&["spec", "containerd", "config"]) else {
        return Err(Check::fail(
            DROPIN_ID,
            format!("{NODEADM_DROPIN} has no spec.containerd.config"),
            REINSTALL,
        ));
    };
    let has_v3 = block.contains("io.containerd.cri.v1.images") || block.contains("io.containerd.cri.v1.runtime");
    match version {
        ConfigVersion::V3 if !has_v3 => Err(Check::fail(
            DROPIN_ID,
            format!(
                "{NODEADM_DROPIN}: spec.containerd.config has no io.containerd.cri.v1 table, so nodeadm treats it \
                 as version 2 and migrates it on containerd 2.x"
            ),
            "re-run soci-agent install (it writes v3 table names for containerd 2.x)",
        )),
        ConfigVersion::V2 if block.contains("io.containerd.cri.v1.") => Err(Check::fail(
            DROPIN_ID,
            format!("{NODEADM_DROPIN}: version 3 tables in spec.containerd.config, but containerd is 1.x"),
            "re-run soci-agent install (it writes v2 table names for containerd 1.7)",
        )),
        _ => Ok(block),
    }
}

/// Fails unless `block` parses as TOML and sets every key soci-agent owns.
fn require_owned_keys(block: &str, keys: &[OwnedKey]) -> Result<(), Check> {
    let fragment: DocumentMut = block.parse().map_err(|e: toml_edit::TomlError| {
        let msg = e.to_string().lines().next().unwrap_or_default().to_string();
        Check::fail(
            DROPIN_ID,
            format!("{NODEADM_DROPIN}: spec.containerd.config is not TOML: {msg}"),
            "nodeadm skips the drop-in: re-run soci-agent install",
        )
    })?;
    let missing: Vec<String> = keys
        .iter()
        .filter(|k| !k.is_set_in(fragment.as_table()))
        .map(|k| format!("{} = {}", k.dotted(), k.value))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Check::fail(
        DROPIN_ID,
        format!("{NODEADM_DROPIN} does not set {}", missing.join(", ")),
        REINSTALL,
    ))
}

/// Warns when containerd's rendered config lacks owned keys: nodeadm has not applied the drop-in yet.
fn require_rendered(node: &Node, keys: &[OwnedKey]) -> Result<(), Check> {
    let not_applied: Vec<String> = match node.containerd_config.found().map(str::parse::<DocumentMut>) {
        Some(Ok(doc)) => keys
            .iter()
            .filter(|k| !k.is_set_in(doc.as_table()))
            .map(|k| k.dotted())
            .collect(),
        _ => Vec::new(),
    };
    if not_applied.is_empty() {
        return Ok(());
    }
    Err(Check::warn(
        DROPIN_ID,
        format!(
            "{NODEADM_DROPIN} wires SOCI, but {} (rendered by nodeadm) lacks {}",
            node.containerd_config_path,
            not_applied.join(", ")
        ),
        "nodeadm has not applied the drop-in yet: nodeadm-run re-renders when the merged NodeConfig changes \
         (at the next boot); never run nodeadm init by hand",
    ))
}

/// Ok when the drop-in is byte for byte what install writes, else a warning.
fn as_install_writes(node: &Node, text: &str, version: ConfigVersion, wiring: &SociWiring) -> Check {
    let config_path = &node.containerd_config_path;
    let rendered = if node.containerd_config.found().is_some() {
        format!("rendered into {config_path}")
    } else {
        format!("{config_path} not rendered yet")
    };
    if text != nodeconfig::render(version, wiring) {
        return Check::warn(
            DROPIN_ID,
            format!(
                "{NODEADM_DROPIN} wires SOCI (config version {version}), {rendered}, but differs from what install writes"
            ),
            "re-run soci-agent install to rewrite it; put local NodeConfig changes in another drop-in",
        );
    }
    Check::ok(
        DROPIN_ID,
        format!("{NODEADM_DROPIN} (config version {version}) as install writes it, {rendered}"),
    )
}

/// NodeConfig sources in nodeadm's merge order (later wins): user data,
/// then the drop-ins in lexical order.
fn sources(node: &Node) -> Vec<String> {
    let mut list = vec![USER_DATA.to_string()];
    if let Ok(entries) = std::fs::read_dir(node.root.path(NODEADM_DROPIN_DIR)) {
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml") || n.ends_with(".json"))
            .collect();
        names.sort();
        list.extend(names.into_iter().map(|n| format!("{NODEADM_DROPIN_DIR}/{n}")));
    }
    list
}

const FAST_IMAGE_PULL_ID: &str = "nodeadm.fast-image-pull";

/// `nodeadm.fast-image-pull`: whether nodeadm's own SOCI setup (FastImagePull) is on, and what that means here.
fn fast_image_pull(node: &Node) -> Check {
    const ID: &str = FAST_IMAGE_PULL_ID;
    if !node.nodeadm() {
        return Check::skip(ID, "not a nodeadm host");
    }
    let (effective, note) = effective_fast_image_pull(node);
    match effective {
        Some((true, from)) => fast_image_pull_on(node, &from, &note),
        Some((false, from)) if from == NODEADM_DROPIN && cached_fast_image_pull_on(node) => Check::warn(
            ID,
            format!(
                "soci-agent's {NODEADM_DROPIN} turns FastImagePull off, but nodeadm's last render ({NODEADM_CACHE}) had it on"
            ),
            "nodeadm-run re-renders when the merged NodeConfig changed (it does so before starting containerd); \
             until then nodeadm's SOCI files may be in place: re-run soci-agent install after it",
        ),
        Some((false, from)) => Check::ok(ID, format!("featureGates.FastImagePull: false in {from}{note}")),
        None => Check::ok(
            ID,
            format!("featureGates.FastImagePull is not enabled in any NodeConfig source{note}"),
        ),
    }
}

/// The last `FastImagePull` setting across the NodeConfig sources (value, file), and a
/// note naming the sources that could not be read (empty when none).
fn effective_fast_image_pull(node: &Node) -> (Option<(bool, String)>, String) {
    let mut effective: Option<(bool, String)> = None;
    let mut unreadable = Vec::new();
    for path in sources(node) {
        match Text::read(&node.root, &path) {
            Text::Found(t) => match Documents::parse(&t) {
                Ok(docs) => {
                    if let Some(on) = docs.fast_image_pull() {
                        effective = Some((on, path));
                    }
                }
                Err(e) => unreadable.push(format!("{path}: {}", crate::exit::error_chain(&e))),
            },
            Text::Unreadable(e) => unreadable.push(format!("{path}: {e}")),
            Text::Missing => {}
        }
    }
    let note = if unreadable.is_empty() {
        String::new()
    } else {
        format!(" (could not read {})", unreadable.join(", "))
    };
    (effective, note)
}

/// nodeadm's last render (its cache) had `FastImagePull` on.
fn cached_fast_image_pull_on(node: &Node) -> bool {
    matches!(Text::read(&node.root, NODEADM_CACHE),
        Text::Found(t) if Documents::parse(&t).is_ok_and(|d| d.fast_image_pull() == Some(true)))
}

/// The running host is below the size nodeadm sets SOCI up on.
fn below_fast_image_pull_size(node: &Node) -> bool {
    node.root.is_host()
        && (node.facts.cpus < crate::install::plan::MIN_CPUS
            || node
                .facts
                .memory_bytes
                .is_some_and(|m| m < crate::install::plan::MIN_MEMORY_BYTES))
}

/// The verdict when `from` (the last source setting it) turns `FastImagePull` on.
fn fast_image_pull_on(node: &Node, from: &str, note: &str) -> Check {
    if node.agent_installed() {
        return Check::warn(
            FAST_IMAGE_PULL_ID,
            format!(
                "featureGates.FastImagePull: true in {from}, which nodeadm merges after soci-agent's {NODEADM_DROPIN}{note}"
            ),
            "nodeadm then rewrites /etc/soci-snapshotter-grpc/config.toml and containerd.service.d/10-soci-snapshotter.conf \
             at every config phase (its fixed tuning wins): drop FastImagePull from that NodeConfig",
        );
    }
    if below_fast_image_pull_size(node) {
        return Check::warn(
            FAST_IMAGE_PULL_ID,
            format!(
                "featureGates.FastImagePull: true in {from}, on {} vCPU{note}",
                node.facts.cpus
            ),
            "nodeadm silently ignores FastImagePull below 4 vCPU / 7 GiB: SOCI is not set up on this instance",
        );
    }
    Check::ok(
        FAST_IMAGE_PULL_ID,
        format!("featureGates.FastImagePull: true in {from}: nodeadm manages SOCI (soci-agent is not installed){note}"),
    )
}
