//! soci-agent: installs the SOCI snapshotter in parallel pull/unpack mode on
//! Kubernetes nodes, wires containerd and kubelet to it, and explains what it
//! did.
//!
//! Wings (see README "Code map"):
//! - what the agent writes (pure): `soci_config`, `containerd_config`,
//!   `nodeconfig`, `kubelet`, `units`, `release`
//! - how it changes a node: `rootfs`, `fetch`, `extract`, `apply`
//! - what it knows: `settings`, `host`, `plan`
//! - what it tells: `report`, `diff`

pub mod activate;
pub mod apply;
pub mod boot;
pub mod cli;
pub mod containerd_config;
pub mod daemon;
pub mod diff;
pub mod doctor;
pub mod exit;
pub mod extract;
pub mod fetch;
pub mod health;
pub mod host;
pub mod install;
pub mod kubelet;
pub mod logging;
pub mod nodeconfig;
pub mod paths;
pub mod plan;
pub mod prefetch;
pub mod record;
pub mod release;
pub mod render;
pub mod report;
pub mod reports;
pub mod rootfs;
pub mod settings;
pub mod soci_config;
pub mod store;
pub mod systemd;
pub mod uninstall;
pub mod units;
