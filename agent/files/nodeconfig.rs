//! The NodeConfig drop-in for EKS nodeadm hosts (`/etc/eks/nodeadm.d/`),
//! rendered from `nodeconfig/50-soci-agent.yaml`. nodeadm-run merges it over
//! the user-data NodeConfig and re-renders containerd's config from it, so
//! `/etc/containerd/config.toml` itself is never edited on these hosts. Pure.

use crate::files::containerd_config::{self, ConfigVersion, Daemon, SociWiring};

const TEMPLATE: &str = include_str!("../../nodeconfig/50-soci-agent.yaml");

/// The kubelet endpoint when SOCI's CRI keychain serves images.
pub fn image_service_endpoint(address: &str) -> String {
    format!("unix://{address}")
}

/// Renders the drop-in: the containerd fragment for `version` (v3 table
/// names for containerd 2.x, v2 for 1.7) and kubelet's imageServiceEndpoint.
pub fn render(version: ConfigVersion, wiring: &SociWiring) -> String {
    let fragment = containerd_config::fragment(version, wiring);
    let indented: String = fragment
        .lines()
        .map(|l| {
            if l.is_empty() {
                "\n".to_string()
            } else {
                format!("      {l}\n")
            }
        })
        .collect();
    TEMPLATE
        .replace("@CONTAINERD_CONFIG@\n", &indented)
        .replace("@IMAGE_SERVICE_ENDPOINT@", &image_service_endpoint(&wiring.address))
}

/// Table names for the fragment: nodeadm renders its v3 template (and on
/// containerd 2.4 migrates it to v4) when the fragment names
/// `io.containerd.cri.v1.*`, its v2 template otherwise. v3 names for 2.x, v2
/// for 1.x; the fragment carries no `version` key.
pub fn version_for_containerd(daemon: Daemon) -> ConfigVersion {
    if daemon.major >= 2 {
        ConfigVersion::V3
    } else {
        ConfigVersion::V2
    }
}
