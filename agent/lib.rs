//! soci-agent: installs the SOCI snapshotter in parallel pull/unpack mode on
//! Kubernetes nodes, wires containerd and kubelet to it, and explains what it
//! did.
//!
//! Wings (folders; see README "Where things are"):
//! - subcommands: `install` (args, settings, plan, apply, activate, report,
//!   record), `uninstall`, `boot`, `doctor`, `daemon`, `prefetch`, `render`,
//!   `cache` (the snapshot cache on a data volume: volume, manifest, seal, verify)
//! - what the agent writes (pure): `files` (soci_config, containerd_config,
//!   nodeconfig, kubelet, units)
//! - releases: `release` (fetch, extract, store)
//! - leaves: `paths`, `rootfs`, `systemd`, `host`, `health`, `history`,
//!   `output`, `diff`, `logging`, `exit`

pub mod boot;
pub mod cache;
pub mod cli;
pub mod daemon;
pub mod diff;
pub mod doctor;
pub mod exit;
pub mod files;
pub mod flag_values;
pub mod health;
pub mod history;
pub mod host;
pub mod install;
pub mod logging;
pub mod mountinfo;
pub mod output;
pub mod paths;
pub mod prefetch;
pub mod release;
pub mod render;
pub mod rootfs;
pub mod systemd;
pub mod uninstall;
