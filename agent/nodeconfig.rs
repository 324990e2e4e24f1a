//! The NodeConfig drop-in for EKS nodeadm hosts (`/etc/eks/nodeadm.d/`),
//! rendered from `nodeconfig/50-soci-agent.yaml`. nodeadm-run merges it over
//! the user-data NodeConfig and re-renders containerd's config from it, so
//! `/etc/containerd/config.toml` itself is never edited on these hosts. Pure.

use crate::containerd_config::{self, ConfigVersion, SociWiring};

pub const DROPIN_DIR: &str = "/etc/eks/nodeadm.d";
pub const DROPIN_PATH: &str = "/etc/eks/nodeadm.d/50-soci-agent.yaml";
const TEMPLATE: &str = include_str!("../nodeconfig/50-soci-agent.yaml");

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

/// containerd config format for a containerd version string ("2.2.1", "1.7.27").
pub fn version_for_containerd(major: u32) -> ConfigVersion {
    if major >= 2 {
        ConfigVersion::V3
    } else {
        ConfigVersion::V2
    }
}
