//! What the agent writes on a node, rendered and merged without I/O: SOCI's
//! config, containerd's config, the nodeadm NodeConfig drop-in, kubelet's
//! drop-in and the systemd units. Templates live in the repository's
//! `systemd/` and `nodeconfig/` folders and are embedded at build time.

pub mod containerd_config;
pub mod kubelet;
pub mod nodeconfig;
pub mod registry_hosts;
pub mod soci_config;
pub mod units;
