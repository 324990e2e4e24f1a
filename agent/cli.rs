//! Command-line interface (clap derive). Every option names its default and
//! its environment variable; `settings` merges them with the config file.

use crate::paths::PAUSE_ARCHIVE;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
    Install(Box<InstallArgs>),

    /// Undo install: restore every file from the install record, disable the
    /// units soci-agent enabled, restart containerd without SOCI.
    Uninstall(UninstallArgs),

    /// Boot-time tasks (run by soci-agent-boot.service before kubelet): verify
    /// the SOCI binary, import the pause image into the soci snapshotter.
    Boot(BootArgs),

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

    /// Stay on after boot: watch what install set up, repair what the agent
    /// owns, keep the configured images warm, serve Prometheus metrics.
    Daemon(Box<crate::daemon::DaemonArgs>),
}

#[derive(Debug, Clone, Args)]
pub struct UninstallArgs {
    /// Directory every node path is resolved under.
    #[arg(long, value_name = "DIR", env = "SOCI_AGENT_ROOT", default_value = "/")]
    pub root: PathBuf,
    /// Also remove the versioned release store.
    #[arg(long)]
    pub purge: bool,
    /// Restore files only; never talk to systemd.
    #[arg(long, env = "SOCI_AGENT_NO_START")]
    pub no_start: bool,
    /// Print what would be restored and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Report format on stdout. [default: text]
    #[arg(long, value_enum, env = "SOCI_AGENT_OUTPUT")]
    pub output: Option<OutputFormat>,
}

#[derive(Debug, Clone, Args)]
pub struct BootArgs {
    /// Directory every node path is resolved under.
    #[arg(long, value_name = "DIR", env = "SOCI_AGENT_ROOT", default_value = "/")]
    pub root: PathBuf,
    /// The node's pause image archive, imported into the soci snapshotter when present.
    #[arg(long, value_name = "PATH", default_value = PAUSE_ARCHIVE)]
    pub pause_archive: String,
    /// Give up after this many seconds (then exit 0 unless --strict).
    #[arg(long, value_name = "SECS", default_value_t = 600.0)]
    pub timeout: f64,
    /// Exit 1 when a step fails or the time bound is hit (default: log loudly, exit 0 so the node joins).
    #[arg(long)]
    pub strict: bool,
    /// Agent config file ([prefetch] images to pre-pull). [default: /etc/soci-agent/config.toml under --root, when present]
    #[arg(long, value_name = "FILE", env = "SOCI_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Also write this run's figures as Prometheus gauges to DIR/soci_agent_boot.prom (under --root).
    #[arg(long, value_name = "DIR", env = "SOCI_AGENT_TEXTFILE_DIR")]
    pub textfile_dir: Option<String>,
    /// Report format on stdout.
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WiringMode {
    /// nodeadm when /usr/bin/nodeadm or /etc/eks/nodeadm.d exists under the root, else containerd.
    Auto,
    /// Write a NodeConfig drop-in to /etc/eks/nodeadm.d (EKS AL2023).
    Nodeadm,
    /// Edit the containerd config file directly.
    Containerd,
}

/// What install does with a SOCI that came with the node (the AL2023 AMI's package).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PreinstalledPolicy {
    /// Replace a preinstalled SOCI older than 0.16.0 (no fixes for soci-snapshotter issues 2035/2036 or
    /// of unknown version); keep a newer one. With no preinstalled SOCI, install --soci-version.
    Auto,
    /// Keep the preinstalled soci-snapshotter-grpc and download nothing (fails when there is none).
    Keep,
    /// Install --soci-version from the release and run it instead of the preinstalled one.
    Replace,
}

#[derive(Debug, Clone, Default, Args)]
pub struct InstallArgs {
    /// Directory every node path is resolved under (AMI baking, tests). Nothing outside it is touched.
    #[arg(long, value_name = "DIR", env = "SOCI_AGENT_ROOT", default_value = "/")]
    pub root: PathBuf,

    /// Agent config file (TOML, [install] table). [default: /etc/soci-agent/config.toml under --root, when present]
    #[arg(long, value_name = "FILE", env = "SOCI_AGENT_CONFIG")]
    pub config: Option<PathBuf>,

    /// SOCI release to install; 0.11.0 or newer (parallel mode). [default: 0.16.1]
    #[arg(long, value_name = "VER", env = "SOCI_AGENT_SOCI_VERSION")]
    pub soci_version: Option<String>,

    /// Base of the release tree: {URL}/v{VER}/soci-snapshotter-{VER}-linux-{ARCH}-static.tar.gz (+ .sha256sum).
    /// http:// is allowed for mirrors, with a warning. [default: https://github.com/awslabs/soci-snapshotter/releases/download]
    #[arg(long, value_name = "URL", env = "SOCI_AGENT_RELEASE_URL")]
    pub release_url: Option<String>,

    /// Release build: static (fully static, any distro) or dynamic (glibc). [default: static]
    #[arg(long, value_name = "static|dynamic", env = "SOCI_AGENT_FLAVOR")]
    pub flavor: Option<String>,

    /// Install offline from a local release tarball; digest from --sha256 or the sibling PATH.sha256sum.
    #[arg(long, value_name = "PATH", env = "SOCI_AGENT_ARCHIVE")]
    pub archive: Option<PathBuf>,

    /// Operator-pinned SHA-256 of the release tarball; the authority when given (no .sha256sum is fetched).
    #[arg(long, value_name = "HEX", env = "SOCI_AGENT_SHA256")]
    pub sha256: Option<String>,

    /// CPU architecture of the release. [default: detected: x86_64 -> amd64, aarch64 -> arm64]
    #[arg(long, value_name = "amd64|arm64", env = "SOCI_AGENT_ARCH")]
    pub arch: Option<String>,

    /// The snapshotter's state directory: its --root and containerd's proxy_plugins.soci.exports.root.
    /// [default: /var/lib/soci-snapshotter-grpc]
    #[arg(long, value_name = "DIR", env = "SOCI_AGENT_SOCI_ROOT")]
    pub soci_root: Option<String>,

    /// Parallel downloads across all images; <= 0 = unbounded. [default: -1]
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        env = "SOCI_AGENT_MAX_CONCURRENT_DOWNLOADS"
    )]
    pub max_concurrent_downloads: Option<i64>,

    /// Parallel downloads per image; must not exceed a bounded global limit. [default: 20]
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        env = "SOCI_AGENT_MAX_CONCURRENT_DOWNLOADS_PER_IMAGE"
    )]
    pub max_concurrent_downloads_per_image: Option<i64>,

    /// Chunk size of a layer download in SOCI's grammar (e.g. 8mb, 16mb; binary units; "" = whole layer). [default: 16mb]
    #[arg(long, value_name = "SIZE", env = "SOCI_AGENT_CONCURRENT_DOWNLOAD_CHUNK_SIZE")]
    pub concurrent_download_chunk_size: Option<String>,

    /// Parallel layer unpacks across all images; <= 0 = unbounded. [default: -1]
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        env = "SOCI_AGENT_MAX_CONCURRENT_UNPACKS"
    )]
    pub max_concurrent_unpacks: Option<i64>,

    /// Parallel layer unpacks per image; must not exceed a bounded global limit. [default: 12]
    #[arg(
        long,
        value_name = "N",
        allow_negative_numbers = true,
        env = "SOCI_AGENT_MAX_CONCURRENT_UNPACKS_PER_IMAGE"
    )]
    pub max_concurrent_unpacks_per_image: Option<i64>,

    /// Let SOCI skip storing compressed layers in containerd's content store. [default: true]
    #[arg(long, value_name = "true|false", env = "SOCI_AGENT_DISCARD_UNPACKED_LAYERS")]
    pub discard_unpacked_layers: Option<bool>,

    /// gzip decompressor for layer streams (run with -d -c), or "none".
    /// [default: /usr/bin/unpigz when present under --root, else none]
    #[arg(long, value_name = "PATH", env = "SOCI_AGENT_DECOMPRESSOR")]
    pub decompressor: Option<String>,

    /// containerd config file to merge into (non-nodeadm hosts). [default: /etc/containerd/config.toml]
    #[arg(long, value_name = "PATH", env = "SOCI_AGENT_CONTAINERD_CONFIG")]
    pub containerd_config: Option<String>,

    /// How containerd and kubelet are wired. [default: auto]
    #[arg(long, value_enum, env = "SOCI_AGENT_WIRING")]
    pub wiring: Option<WiringMode>,

    /// What to do with a SOCI that came with the node (the AL2023 AMI's /usr/bin/soci-snapshotter-grpc):
    /// auto replaces one older than 0.16.0 with --soci-version and keeps a newer one; keep downloads nothing;
    /// replace always installs --soci-version. The report and doctor say which runs and why. [default: auto]
    #[arg(long, value_enum, env = "SOCI_AGENT_PREINSTALLED")]
    pub preinstalled: Option<PreinstalledPolicy>,

    /// Same as --preinstalled keep (kept for compatibility).
    #[arg(long, env = "SOCI_AGENT_ADOPT")]
    pub adopt: bool,

    /// containerd version the wiring is written for (MAJOR.MINOR, e.g. 2.2): decides the config format
    /// (version 2 for 1.x, 3 for 2.0-2.3, 4 for 2.4+). [default: detected from /etc/eks/containerd-version.txt,
    /// else `containerd --version`]
    #[arg(long, value_name = "VER", env = "SOCI_AGENT_CONTAINERD_VERSION")]
    pub containerd_version: Option<String>,

    /// Also install and enable soci-agent.service (`soci-agent daemon`: health loop,
    /// repair, warm images, metrics; settings in the [daemon] table of the config).
    #[arg(long, env = "SOCI_AGENT_DAEMON")]
    pub daemon: bool,

    /// Write files only; never talk to systemd (AMI baking, containers).
    #[arg(long, env = "SOCI_AGENT_NO_START")]
    pub no_start: bool,

    /// Print the plan with unified diffs and change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Report format on stdout. [default: text]
    #[arg(long, value_enum, env = "SOCI_AGENT_OUTPUT")]
    pub output: Option<OutputFormat>,

    /// Also write this run's figures as Prometheus gauges to DIR/soci_agent_install.prom
    /// (node-exporter textfile collector; resolved under --root).
    #[arg(long, value_name = "DIR", env = "SOCI_AGENT_TEXTFILE_DIR")]
    pub textfile_dir: Option<String>,

    /// Give up on a download that sends nothing for this many seconds (then retry). [default: 30]
    #[arg(long, value_name = "SECS", env = "SOCI_AGENT_HTTP_TIMEOUT")]
    pub http_timeout: Option<f64>,

    /// Extra download attempts on connect errors, timeouts, 429 and 5xx. [default: 4]
    #[arg(long, value_name = "N", env = "SOCI_AGENT_RETRIES")]
    pub retries: Option<u32>,
}
