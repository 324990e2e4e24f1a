//! The command line's top level (clap derive): global flags and the
//! subcommands. Each subcommand's flags live next to its code.

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (default SOCI snapshotter ",
    crate::default_soci_version!(),
    ")"
);

#[derive(Debug, Parser)]
#[command(
    name = "soci-agent",
    version = LONG_VERSION,
    about = "Install and wire the SOCI snapshotter (parallel pull/unpack mode) on a Kubernetes node",
    long_about = "soci-agent installs the SOCI snapshotter in parallel pull/unpack mode on a \
Kubernetes node, verifies what it downloads, writes a validated SOCI config, wires containerd \
and kubelet to it (through a NodeConfig drop-in on EKS nodeadm hosts) and installs its systemd \
units. Every file change is atomic, backed up, and shown with --dry-run first.\n\n\
Exit codes: 0 done or nothing to do; 1 failed, node left as it was; 2 usage or validation \
error; 3 verification failed (checksum or archive refused); 4 prefetch: some images failed. \
doctor exits 1 when a check fails.",
    after_help = "Examples:\n  soci-agent install\n  soci-agent install --root /mnt/image --no-start\n  \
soci-agent install --dry-run\n  soci-agent install --archive ./soci-snapshotter-0.15.0-linux-amd64-static.tar.gz --sha256 <hex>"
)]
pub struct Cli {
    /// Log filter: error, warn, info, debug, trace (or a tracing directive).
    #[arg(long, global = true, default_value = "info", env = "SOCI_AGENT_LOG_LEVEL")]
    pub log_level: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Detect the node, install a verified SOCI release, write its config and
    /// wire containerd, kubelet and systemd. Idempotent.
    #[command(
        long_about = "Detect the node (arch, OS, nodeadm, containerd, a preinstalled SOCI), \
download and verify the SOCI release (pinned --sha256 or the published .sha256sum), install it \
into a versioned store with atomic symlinks, write /etc/soci-snapshotter-grpc/config.toml with \
parallel pull/unpack mode, and wire containerd (config merge, or a NodeConfig drop-in on nodeadm \
hosts), kubelet and the systemd units.\n\nSettings come from flags, then SOCI_AGENT_* environment \
variables, then the [install] table of the config file, then the defaults shown here.\n\n\
A second run with the same inputs changes nothing and says so."
    )]
    Install(Box<crate::install::args::InstallArgs>),

    /// Undo install: restore every file from the install record, disable the
    /// units soci-agent enabled, restart containerd without SOCI.
    Uninstall(crate::uninstall::UninstallArgs),

    /// Boot-time tasks (run by soci-agent-boot.service before kubelet): verify
    /// the SOCI binary, import the pause image into the soci snapshotter.
    Boot(crate::boot::BootArgs),

    /// Pre-pull images through containerd's CRI into the snapshotter kubelet
    /// uses, skipping what the node already has (an attached snapshot cache).
    Prefetch(Box<crate::prefetch::PrefetchArgs>),

    /// Render the artifacts that deliver soci-agent: EC2 user data (MIME),
    /// the NodeConfig drop-in, a Karpenter EC2NodeClass, launch-template user data.
    Render(Box<crate::render::RenderArgs>),

    /// Explain the node's SOCI state: each check with a verdict, the evidence
    /// and what to do. Read-only.
    #[command(visible_alias = "status")]
    Doctor(Box<crate::doctor::DoctorArgs>),

    /// The snapshot cache on a data volume: seal it on a builder, verify it on a node.
    Cache(Box<crate::cache::CacheArgs>),

    /// Stay on after boot: watch what install set up, repair what the agent
    /// owns, keep the configured images warm, serve Prometheus metrics.
    Daemon(Box<crate::daemon::DaemonArgs>),
}

impl Cli {
    /// Parses the process arguments (exits with clap's message and code 2 on
    /// a usage error), noting for install which options came from flags and
    /// which from the environment.
    pub fn parse_with_sources() -> Cli {
        let matches = Cli::command().get_matches();
        let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        if let (Command::Install(args), Some(("install", m))) = (&mut cli.command, matches.subcommand()) {
            args.sources = crate::install::options::given_sources(m);
        }
        cli
    }
}

impl Command {
    /// `--root` must name an existing directory: a typo must not become a
    /// new tree, nor "nothing to do".
    pub fn check_root(&self) -> Result<(), RootError> {
        let root = match self {
            Command::Install(a) => &a.root,
            Command::Uninstall(a) => &a.root,
            Command::Boot(a) => &a.root,
            Command::Prefetch(a) => &a.root,
            Command::Doctor(a) => &a.root,
            Command::Daemon(a) => &a.root,
            Command::Cache(a) => a.root(),
            Command::Render(_) => return Ok(()),
        };
        if root.is_dir() {
            Ok(())
        } else {
            Err(RootError(root.clone()))
        }
    }
}

/// A `--root` that is not a directory.
#[derive(Debug, thiserror::Error)]
#[error("--root {}: no such directory (it must be the node's root, e.g. / or a mounted image)", .0.display())]
pub struct RootError(pub std::path::PathBuf);
