//! `soci-agent install`'s flags. Every option names its default and its
//! environment variable; `settings` merges them with the config file.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::output::OutputFormat;

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

    /// Data volume holding containerd's and SOCI's roots (a snapshot cache): a block device or a
    /// /dev/disk/by-* link; an EBS name such as /dev/xvdb also finds its /dev/nvme*n1 on Nitro.
    /// Mounted by soci-agent-volume.service before either daemon starts, on every boot.
    #[arg(long, value_name = "DEVICE", env = "SOCI_AGENT_DATA_VOLUME")]
    pub data_volume: Option<String>,

    /// Make an ext4 filesystem on a blank --data-volume (a device holding anything is never formatted).
    #[arg(long, env = "SOCI_AGENT_FORMAT_DATA_VOLUME")]
    pub format_data_volume: bool,

    /// Give up on a download that sends nothing for this many seconds (then retry). [default: 30]
    #[arg(long, value_name = "SECS", env = "SOCI_AGENT_HTTP_TIMEOUT")]
    pub http_timeout: Option<f64>,

    /// Extra download attempts on connect errors, timeouts, 429 and 5xx. [default: 4]
    #[arg(long, value_name = "N", env = "SOCI_AGENT_RETRIES")]
    pub retries: Option<u32>,
}
