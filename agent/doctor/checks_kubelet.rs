//! kubelet.image-service-endpoint: with SOCI's `[cri_keychain]` on, kubelet
//! must send image calls to the SOCI socket (so pull credentials reach it);
//! with it off, it must not. The value is read where kubelet reads it
//! (`config.json`, then `config.json.d/*.conf` in lexical order) and, on
//! nodeadm hosts, where nodeadm takes it from (NodeConfig drop-ins).

use super::Check;
use super::node::{Node, Text};
use super::nodeconfig_yaml::Documents;
use crate::paths::{KUBELET_CONFIG, KUBELET_DROPIN_DIR, NODEADM_DROPIN_DIR};
use NODEADM_DROPIN_DIR as NODEADM_DIR;

const ID: &str = "kubelet.image-service-endpoint";
const KEY: &str = "imageServiceEndpoint";

/// `*.ext` files of a node directory, sorted by name (node paths).
fn files(node: &Node, dir: &str, exts: &[&str]) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(node.root.path(dir)) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| exts.iter().any(|x| n.ends_with(x)))
        .collect();
    names.sort();
    names.into_iter().map(|n| format!("{dir}/{n}")).collect()
}

fn endpoint_in(text: &str, nodeconfig: bool) -> Option<String> {
    let json: Option<serde_json::Value> = serde_json::from_str(text).ok();
    match (json, nodeconfig) {
        (Some(v), false) => v[KEY].as_str().map(str::to_string),
        (Some(v), true) => v["spec"]["kubelet"]["config"][KEY].as_str().map(str::to_string),
        (None, false) => Documents::parse(text).ok()?.string(&[KEY]),
        (None, true) => Documents::parse(text).ok()?.string(&["spec", "kubelet", "config", KEY]),
    }
}

/// A value of `imageServiceEndpoint` and the file it came from (with a note).
type Setting = (String, String);

/// The last value set across `paths`, with its file; and whether any file exists.
fn last_set(node: &Node, paths: &[String], nodeconfig: bool) -> (Option<Setting>, bool, Vec<String>) {
    let (mut value, mut any, mut unreadable) = (None, false, Vec::new());
    for p in paths {
        match Text::read(&node.root, p) {
            Text::Found(t) => {
                any = true;
                if let Some(v) = endpoint_in(&t, nodeconfig) {
                    value = Some((v, p.clone()));
                }
            }
            Text::Unreadable(e) => unreadable.push(format!("{p}: {e}")),
            Text::Missing => {}
        }
    }
    (value, any, unreadable)
}

/// Where `imageServiceEndpoint` is set: kubelet's own files and, on nodeadm hosts, the NodeConfig drop-ins.
struct Endpoints {
    /// The value kubelet's files set.
    kubelet: Option<Setting>,
    /// Whether any kubelet configuration file exists.
    kubelet_files: bool,
    /// The value the NodeConfig drop-ins set.
    nodeadm: Option<Setting>,
    /// Files that exist but could not be read, with why.
    unreadable: Vec<String>,
}

impl Endpoints {
    /// Reads kubelet's config and drop-ins, then (on nodeadm hosts) the NodeConfig drop-ins.
    fn read(node: &Node) -> Self {
        let mut kubelet_paths = vec![KUBELET_CONFIG.to_string()];
        kubelet_paths.extend(files(node, KUBELET_DROPIN_DIR, &[".conf"]));
        let (kubelet, kubelet_files, mut unreadable) = last_set(node, &kubelet_paths, false);
        let (nodeadm, _, more) = if node.nodeadm() {
            last_set(node, &files(node, NODEADM_DIR, &[".yaml", ".yml", ".json"]), true)
        } else {
            (None, false, Vec::new())
        };
        unreadable.extend(more);
        Endpoints {
            kubelet,
            kubelet_files,
            nodeadm,
            unreadable,
        }
    }

    /// What kubelet uses: its files' value; before nodeadm renders them, the NodeConfig's.
    fn effective(&self) -> Option<Setting> {
        if self.kubelet_files {
            return self.kubelet.clone();
        }
        self.nodeadm
            .as_ref()
            .map(|(v, path)| (v.clone(), format!("{path} (nodeadm writes it into kubelet's config)")))
    }
}

/// `imageServiceEndpoint = value (file)`, or what unset means.
fn shown(setting: Option<&Setting>) -> String {
    match setting {
        Some((v, src)) => format!("{KEY} = {v} ({src})"),
        None => format!("{KEY} unset (kubelet uses containerd's socket)"),
    }
}

/// `kubelet.image-service-endpoint`: kubelet names the SOCI socket exactly when SOCI's keychain is on.
pub fn image_service_endpoint(node: &Node) -> Check {
    let Some(doc) = super::checks_soci_config::parsed(node) else {
        return Check::skip(
            ID,
            "the SOCI config is missing or invalid (see soci-config.parse): cri_keychain unknown",
        );
    };
    let found = Endpoints::read(node);
    if found.kubelet.is_none() && found.nodeadm.is_none() && !found.unreadable.is_empty() {
        return Check::skip(ID, found.unreadable.join(", ")).advise("run doctor as root");
    }
    let want = crate::files::nodeconfig::image_service_endpoint(&node.soci_socket.value);
    let keychain = super::checks_soci_config::keychain(&doc);
    let keychain_s = format!(
        "[cri_keychain] enable_keychain = {keychain} ({})",
        node.soci_config_path.value
    );
    let effective = found.effective();
    let current = shown(effective.as_ref());
    match (keychain, effective.as_ref().is_some_and(|(v, _)| *v == want)) {
        (false, true) => Check::fail(
            ID,
            format!("{current}, but {keychain_s}"),
            "SOCI serves no image service without its keychain: set enable_keychain = true, or drop imageServiceEndpoint",
        ),
        (false, false) => Check::ok(ID, format!("{current}; {keychain_s}: credentials are not proxied")),
        (true, true) => Check::ok(ID, format!("{current} = the SOCI socket; {keychain_s}")),
        (true, false) => not_the_soci_socket(&found, effective.as_ref(), &want, &keychain_s),
    }
}

/// The keychain is on but kubelet does not use the SOCI socket (`want`): not applied yet,
/// not configured here, or wrong.
fn not_the_soci_socket(found: &Endpoints, effective: Option<&Setting>, want: &str, keychain_s: &str) -> Check {
    if let Some((v, nodeconfig)) = &found.nodeadm
        && v == want
        && found.kubelet_files
    {
        return Check::warn(
            ID,
            format!("{}, while {nodeconfig} sets {want}", shown(found.kubelet.as_ref())),
            "nodeadm has not applied the NodeConfig drop-in yet: it does at the next nodeadm-run (boot)",
        );
    }
    if !found.kubelet_files && effective.is_none() {
        return Check::skip(ID, format!("no kubelet configuration under the root; {keychain_s}"))
            .advise(format!("set {KEY}: {want} in kubelet's configuration"));
    }
    Check::fail(
        ID,
        format!("{}, but {keychain_s}", shown(effective)),
        format!(
            "kubelet's pull credentials never reach SOCI (private registries fail): set {KEY}: {want} \
             (soci-agent install writes {KUBELET_DROPIN_DIR}/50-soci-agent.conf)"
        ),
    )
}
