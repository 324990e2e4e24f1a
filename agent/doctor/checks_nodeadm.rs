//! nodeadm.* (EKS AL2023 hosts): our NodeConfig drop-in
//! `/etc/eks/nodeadm.d/50-soci-agent.yaml` (does it wire SOCI with the
//! right table names, and has nodeadm rendered it into containerd's config),
//! and nodeadm's own `FastImagePull` running alongside the agent.

use crate::paths::{NODEADM_CACHE, NODEADM_DROPIN, NODEADM_DROPIN_DIR};
use toml_edit::DocumentMut;

use super::Check;
use super::node::{Node, Text};
use super::yamlish;
use crate::files::containerd_config::{self, ConfigVersion, SociWiring};
use crate::files::nodeconfig::{self};

/// cloud-init's copy of the instance's user data.
const USER_DATA: &str = "/var/lib/cloud/instance/user-data.txt";

pub fn checks(node: &Node) -> Vec<Check> {
    vec![dropin(node), fast_image_pull(node)]
}

/// The table names nodeadm renders for this host (v3 when containerd's version is unknown).
fn version(node: &Node) -> ConfigVersion {
    node.facts.containerd.as_ref().map_or(ConfigVersion::V3, |c| {
        nodeconfig::version_for_containerd(crate::files::containerd_config::Daemon {
            major: c.major,
            minor: c.minor,
        })
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
    let Some(fragment) =
        yamlish::get(&text, &["spec", "containerd", "config"]).and_then(|block| block.parse::<DocumentMut>().ok())
    else {
        return false;
    };
    let wiring = SociWiring {
        address: node.soci_socket.value.clone(),
        soci_root: node.soci_root.value.clone(),
    };
    containerd_config::owned_keys(version(node), &wiring)
        .iter()
        .all(|k| k.is_set_in(fragment.as_table()))
}

fn dropin(node: &Node) -> Check {
    const ID: &str = "nodeadm.dropin";
    if !node.nodeadm() {
        return Check::skip(ID, "not a nodeadm host (no /usr/bin/nodeadm, no /etc/eks/nodeadm.d)");
    }
    let text = match Text::read(&node.root, NODEADM_DROPIN) {
        Text::Found(t) => t,
        Text::Unreadable(e) => return Check::skip(ID, format!("{NODEADM_DROPIN}: {e}")).advise("run doctor as root"),
        Text::Missing if node.agent_installed() => {
            return Check::fail(
                ID,
                format!("no {NODEADM_DROPIN}: nodeadm renders containerd and kubelet without SOCI"),
                "re-run soci-agent install",
            );
        }
        Text::Missing => return Check::skip(ID, format!("no {NODEADM_DROPIN}: soci-agent has not wired this host")),
    };
    let version = version(node);
    let Some(block) = yamlish::get(&text, &["spec", "containerd", "config"]) else {
        return Check::fail(
            ID,
            format!("{NODEADM_DROPIN} has no spec.containerd.config"),
            "re-run soci-agent install",
        );
    };
    let has_v3 = block.contains("io.containerd.cri.v1.images") || block.contains("io.containerd.cri.v1.runtime");
    match version {
        ConfigVersion::V3 if !has_v3 => {
            return Check::fail(
                ID,
                format!(
                    "{NODEADM_DROPIN}: spec.containerd.config has no io.containerd.cri.v1 table, so nodeadm treats it \
                     as version 2 and migrates it on containerd 2.x"
                ),
                "re-run soci-agent install (it writes v3 table names for containerd 2.x)",
            );
        }
        ConfigVersion::V2 if block.contains("io.containerd.cri.v1.") => {
            return Check::fail(
                ID,
                format!("{NODEADM_DROPIN}: version 3 tables in spec.containerd.config, but containerd is 1.x"),
                "re-run soci-agent install (it writes v2 table names for containerd 1.7)",
            );
        }
        _ => {}
    }
    let wiring = SociWiring {
        address: node.soci_socket.value.clone(),
        soci_root: node.soci_root.value.clone(),
    };
    let keys = containerd_config::owned_keys(version, &wiring);
    let fragment: DocumentMut = match block.parse() {
        Ok(d) => d,
        Err(e) => {
            let msg = e.to_string().lines().next().unwrap_or_default().to_string();
            return Check::fail(
                ID,
                format!("{NODEADM_DROPIN}: spec.containerd.config is not TOML: {msg}"),
                "nodeadm skips the drop-in: re-run soci-agent install",
            );
        }
    };
    let missing: Vec<String> = keys
        .iter()
        .filter(|k| !k.is_set_in(fragment.as_table()))
        .map(|k| format!("{} = {}", k.dotted(), k.value))
        .collect();
    if !missing.is_empty() {
        return Check::fail(
            ID,
            format!("{NODEADM_DROPIN} does not set {}", missing.join(", ")),
            "re-run soci-agent install",
        );
    }
    let config_path = &node.containerd_config_path;
    let not_applied: Vec<String> = match node.containerd_config.found().map(str::parse::<DocumentMut>) {
        Some(Ok(doc)) => keys
            .iter()
            .filter(|k| !k.is_set_in(doc.as_table()))
            .map(|k| k.dotted())
            .collect(),
        _ => Vec::new(),
    };
    if !not_applied.is_empty() {
        return Check::warn(
            ID,
            format!(
                "{NODEADM_DROPIN} wires SOCI, but {config_path} (rendered by nodeadm) lacks {}",
                not_applied.join(", ")
            ),
            "nodeadm has not applied the drop-in yet: nodeadm-run re-renders when the merged NodeConfig changes \
             (at the next boot); never run nodeadm init by hand",
        );
    }
    let expected = nodeconfig::render(version, &wiring);
    let rendered = if node.containerd_config.found().is_some() {
        format!("rendered into {config_path}")
    } else {
        format!("{config_path} not rendered yet")
    };
    if text != expected {
        return Check::warn(
            ID,
            format!(
                "{NODEADM_DROPIN} wires SOCI (config version {version}), {rendered}, but differs from what install writes"
            ),
            "re-run soci-agent install to rewrite it; put local NodeConfig changes in another drop-in",
        );
    }
    Check::ok(
        ID,
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

fn fast_image_pull(node: &Node) -> Check {
    const ID: &str = "nodeadm.fast-image-pull";
    if !node.nodeadm() {
        return Check::skip(ID, "not a nodeadm host");
    }
    let mut effective: Option<(bool, String)> = None;
    let mut unreadable = Vec::new();
    for path in sources(node) {
        match Text::read(&node.root, &path) {
            Text::Found(t) => {
                if let Some(on) = yamlish::fast_image_pull(&t) {
                    effective = Some((on, path));
                }
            }
            Text::Unreadable(e) => unreadable.push(format!("{path}: {e}")),
            Text::Missing => {}
        }
    }
    let cached_on = matches!(Text::read(&node.root, NODEADM_CACHE), Text::Found(t) if yamlish::fast_image_pull_on(&t));
    let note = if unreadable.is_empty() {
        String::new()
    } else {
        format!(" (could not read {})", unreadable.join(", "))
    };
    let small = node.root.is_host()
        && (node.facts.cpus < crate::install::plan::MIN_CPUS
            || node
                .facts
                .memory_bytes
                .is_some_and(|m| m < crate::install::plan::MIN_MEMORY_BYTES));
    match effective {
        Some((true, from)) if node.agent_installed() => Check::warn(
            ID,
            format!(
                "featureGates.FastImagePull: true in {from}, which nodeadm merges after soci-agent's {NODEADM_DROPIN}{note}"
            ),
            "nodeadm then rewrites /etc/soci-snapshotter-grpc/config.toml and containerd.service.d/10-soci-snapshotter.conf \
             at every config phase (its fixed tuning wins): drop FastImagePull from that NodeConfig",
        ),
        Some((true, from)) if small => Check::warn(
            ID,
            format!(
                "featureGates.FastImagePull: true in {from}, on {} vCPU{note}",
                node.facts.cpus
            ),
            "nodeadm silently ignores FastImagePull below 4 vCPU / 7 GiB: SOCI is not set up on this instance",
        ),
        Some((true, from)) => Check::ok(
            ID,
            format!(
                "featureGates.FastImagePull: true in {from}: nodeadm manages SOCI (soci-agent is not installed){note}"
            ),
        ),
        Some((false, from)) if from == NODEADM_DROPIN && cached_on => Check::warn(
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
