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

pub mod boot;
pub mod cli;
pub mod daemon;
pub mod diff;
pub mod doctor;
pub mod exit;
pub mod files;
pub mod health;
pub mod history;
pub mod host;
pub mod install;
pub mod logging;
pub mod output;
pub mod paths;
pub mod prefetch;
pub mod release;
pub mod render;
pub mod rootfs;
pub mod systemd;
pub mod uninstall;
