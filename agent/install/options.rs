//! What install is asked to do, declared once: [`InstallOptions`] is at the
//! same time the flags and their `SOCI_AGENT_*` variables (clap), the
//! `[install]` table of the agent config file (serde, same key names with `_`)
//! and what the install record keeps of a run (so the daemon, doctor and a
//! later `soci-agent install` without settings want what install was asked
//! for). Adding an option is one field here plus its use in `settings`.
//!
//! Layers, highest first: flags, environment, the config file, the request
//! recorded by the last install that was given settings, the defaults. A run
//! given any node setting (a flag or variable other than the [`RUN_ONLY`]
//! ones) replaces the recorded request as a whole: what is asked now is the
//! whole request.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use serde_json::Value;

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

/// Every install option. `None`/`false` = not given at this layer.
#[derive(Debug, Clone, Default, PartialEq, Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InstallOptions {
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
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub adopt: bool,

    /// containerd version the wiring is written for (MAJOR.MINOR, e.g. 2.2): decides the config format
    /// (version 2 for 1.x, 3 for 2.0-2.3, 4 for 2.4+). [default: detected from /etc/eks/containerd-version.txt,
    /// else `containerd --version`]
    #[arg(long, value_name = "VER", env = "SOCI_AGENT_CONTAINERD_VERSION")]
    pub containerd_version: Option<String>,

    /// Also install and enable soci-agent.service (`soci-agent daemon`: health loop,
    /// repair, warm images, metrics; settings in the [daemon] table of the config).
    #[arg(long, env = "SOCI_AGENT_DAEMON")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub daemon: bool,

    /// Write files only; never talk to systemd (AMI baking, containers).
    #[arg(long, env = "SOCI_AGENT_NO_START")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub no_start: bool,

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

    /// Data volume holding containerd's and SOCI's roots (a snapshot cache): a block device or a
    /// /dev/disk/by-* link; an EBS name such as /dev/xvdb also finds its /dev/nvme*n1 on Nitro.
    /// Mounted by soci-agent-volume.service before either daemon starts, on every boot.
    #[arg(long, value_name = "DEVICE", env = "SOCI_AGENT_DATA_VOLUME")]
    pub data_volume: Option<String>,

    /// Make an ext4 filesystem on a blank --data-volume (a device holding anything is never
    /// formatted). About this run only: never recorded.
    #[arg(long, env = "SOCI_AGENT_FORMAT_DATA_VOLUME")]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub format_data_volume: bool,
}

/// Options about this run only (how it reports, whether it talks to
/// systemd, how it downloads): never recorded, never replayed. An AMI bake's
/// `--no-start` must not stop the node from starting its units later.
pub const RUN_ONLY: &[&str] = &[
    "no_start",
    "output",
    "textfile_dir",
    "http_timeout",
    "retries",
    "format_data_volume",
];

/// Where an option's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    Flag,
    Env,
    File,
    /// Given as a flag to the install that recorded it.
    RecordedFlag,
    /// Given as an environment variable to the install that recorded it.
    RecordedEnv,
    Default,
}

impl Source {
    /// How the source reads in text reports.
    pub fn describe(self) -> &'static str {
        match self {
            Source::Flag => "flag",
            Source::Env => "environment",
            Source::File => "config file",
            Source::RecordedFlag => "flag of the recorded install",
            Source::RecordedEnv => "environment of the recorded install",
            Source::Default => "default",
        }
    }

    /// The source a value given now has once recorded and replayed.
    fn recorded(self) -> Source {
        match self {
            Source::Env | Source::RecordedEnv => Source::RecordedEnv,
            _ => Source::RecordedFlag,
        }
    }
}

/// One option of the recorded request: its value and how it was given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requested {
    pub value: Value,
    pub source: Source,
}

/// Options as key -> value; unset ones (`None`, `false`) are left out.
fn entries(o: &InstallOptions) -> BTreeMap<String, Value> {
    match serde_json::to_value(o) {
        Ok(Value::Object(map)) => map.into_iter().filter(|(_, v)| !v.is_null()).collect(),
        _ => BTreeMap::new(),
    }
}

/// The options holding `map`'s values.
fn from_entries(map: BTreeMap<String, Value>) -> Result<InstallOptions, serde_json::Error> {
    serde_json::from_value(Value::Object(map.into_iter().collect()))
}

/// Every option's key (clap's ids are the field names, as serde's are).
fn known_keys() -> std::collections::BTreeSet<String> {
    let cmd = InstallOptions::augment_args(clap::Command::new("install"));
    cmd.get_arguments().map(|a| a.get_id().to_string()).collect()
}

/// Resolved layers: the options in force and where each set one came from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Layered {
    pub options: InstallOptions,
    pub sources: BTreeMap<String, Source>,
    /// The recorded request was replayed (this run was given no node setting).
    pub replayed: bool,
}

impl Layered {
    /// Stacks `given` (flags and environment, with `given_sources`; a key
    /// missing there counts as a flag) over `file` over `recorded`.
    pub fn stack(
        given: &InstallOptions,
        given_sources: &BTreeMap<String, Source>,
        file: &InstallOptions,
        recorded: &BTreeMap<String, Requested>,
    ) -> Layered {
        let given = entries(given);
        let replay = !given.keys().any(|k| !RUN_ONLY.contains(&k.as_str()));
        let mut values = BTreeMap::new();
        let mut sources = BTreeMap::new();
        if replay {
            let known = known_keys();
            for (k, r) in recorded.iter().filter(|(k, _)| known.contains(k.as_str())) {
                values.insert(k.clone(), r.value.clone());
                sources.insert(k.clone(), r.source.recorded());
            }
        }
        for (k, v) in entries(file) {
            sources.insert(k.clone(), Source::File);
            values.insert(k, v);
        }
        for (k, v) in given {
            sources.insert(k.clone(), given_sources.get(&k).copied().unwrap_or(Source::Flag));
            values.insert(k, v);
        }
        // Recorded values were valid options once; a recorded value this
        // version reads differently drops the recorded layer, not the run.
        let options = from_entries(values.clone()).unwrap_or_else(|_| {
            values.retain(|k, _| !sources.get(k).is_some_and(|s| s.is_recorded()));
            sources.retain(|_, s| !s.is_recorded());
            from_entries(values).unwrap_or_default()
        });
        Layered {
            options,
            sources,
            replayed: replay && !recorded.is_empty(),
        }
    }

    /// The source of option `key` (`Default` when no layer set it).
    pub fn source(&self, key: &str) -> Source {
        self.sources.get(key).copied().unwrap_or(Source::Default)
    }

    /// What the install record keeps: the node options given as flags or
    /// environment (the config file is read again by whoever replays).
    pub fn request(&self) -> BTreeMap<String, Requested> {
        entries(&self.options)
            .into_iter()
            .filter(|(k, _)| !RUN_ONLY.contains(&k.as_str()))
            .filter_map(|(k, value)| {
                let source = match self.source(&k) {
                    Source::Flag | Source::RecordedFlag => Source::Flag,
                    Source::Env | Source::RecordedEnv => Source::Env,
                    Source::File | Source::Default => return None,
                };
                Some((k, Requested { value, source }))
            })
            .collect()
    }

    /// Every set option with its value and source, for reports.
    pub fn shown(&self) -> Vec<ShownOption> {
        entries(&self.options)
            .into_iter()
            .map(|(key, value)| ShownOption {
                source: self.source(&key),
                key,
                value,
            })
            .collect()
    }
}

impl Source {
    pub fn is_recorded(self) -> bool {
        matches!(self, Source::RecordedFlag | Source::RecordedEnv)
    }
}

/// One option as reports show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShownOption {
    pub key: String,
    pub value: Value,
    pub source: Source,
}

/// Which options clap took from the command line and which from the
/// environment (`matches` of the install subcommand).
pub fn given_sources(matches: &clap::ArgMatches) -> BTreeMap<String, Source> {
    use clap::parser::ValueSource;
    matches
        .ids()
        .filter_map(|id| match matches.value_source(id.as_str()) {
            Some(ValueSource::CommandLine) => Some((id.to_string(), Source::Flag)),
            Some(ValueSource::EnvVariable) => Some((id.to_string(), Source::Env)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(f: impl FnOnce(&mut InstallOptions)) -> InstallOptions {
        let mut o = InstallOptions::default();
        f(&mut o);
        o
    }

    fn recorded(pairs: &[(&str, &str, Source)]) -> BTreeMap<String, Requested> {
        pairs
            .iter()
            .map(|(k, v, source)| {
                let value = Value::String(v.to_string());
                (k.to_string(), Requested { value, source: *source })
            })
            .collect()
    }

    #[test]
    fn flags_over_env_over_file_over_record() {
        let given = opts(|o| {
            o.soci_version = Some("0.16.1".into());
            o.release_url = Some("https://m".into());
        });
        let sources = BTreeMap::from([("release_url".to_string(), Source::Env)]);
        let file = opts(|o| {
            o.soci_version = Some("0.15.0".into());
            o.flavor = Some("dynamic".into());
        });
        let rec = recorded(&[("arch", "arm64", Source::Flag)]);
        let l = Layered::stack(&given, &sources, &file, &rec);
        assert_eq!(l.options.soci_version.as_deref(), Some("0.16.1"));
        assert_eq!(l.options.flavor.as_deref(), Some("dynamic"));
        assert_eq!(l.options.arch, None, "settings given now replace the recorded request");
        assert!(!l.replayed);
        assert_eq!(
            (
                l.source("soci_version"),
                l.source("release_url"),
                l.source("flavor"),
                l.source("arch")
            ),
            (Source::Flag, Source::Env, Source::File, Source::Default)
        );
        // The record keeps what was given, not what the file says.
        let req = l.request();
        assert_eq!(req.keys().collect::<Vec<_>>(), ["release_url", "soci_version"]);
        assert_eq!(req["release_url"].source, Source::Env);
    }

    #[test]
    fn no_node_setting_replays_the_record() {
        let given = opts(|o| {
            o.no_start = true;
            o.output = Some(OutputFormat::Json);
        });
        let rec = recorded(&[
            ("soci_version", "0.16.1", Source::Flag),
            ("release_url", "http://m", Source::Env),
        ]);
        let file = opts(|o| o.release_url = Some("https://file".into()));
        let l = Layered::stack(&given, &BTreeMap::new(), &file, &rec);
        assert!(l.replayed);
        assert_eq!(l.options.soci_version.as_deref(), Some("0.16.1"));
        assert_eq!(
            l.options.release_url.as_deref(),
            Some("https://file"),
            "the file is over the record"
        );
        assert_eq!(l.source("soci_version"), Source::RecordedFlag);
        assert!(l.options.no_start);
        // Replaying and recording again changes nothing; run-only options are never recorded.
        let again = l.request();
        assert_eq!(again["soci_version"], rec["soci_version"]);
        assert!(!again.contains_key("no_start") && !again.contains_key("output"));
        assert!(!again.contains_key("release_url"), "now from the file");
    }

    #[test]
    fn a_recorded_key_this_version_does_not_know_is_dropped() {
        let rec = recorded(&[
            ("soci_version", "0.16.1", Source::Flag),
            ("gone_option", "x", Source::Flag),
        ]);
        let l = Layered::stack(
            &InstallOptions::default(),
            &BTreeMap::new(),
            &InstallOptions::default(),
            &rec,
        );
        assert_eq!(l.options.soci_version.as_deref(), Some("0.16.1"));
        assert_eq!(l.source("gone_option"), Source::Default);
        assert!(!l.request().contains_key("gone_option"));
    }

    #[test]
    fn the_file_table_is_the_same_declaration() {
        let o: InstallOptions =
            toml_edit::de::from_str("soci_version = \"0.16.1\"\ndaemon = true\nwiring = \"nodeadm\"\n").unwrap();
        assert_eq!(
            (o.soci_version.as_deref(), o.daemon, o.wiring),
            (Some("0.16.1"), true, Some(WiringMode::Nodeadm))
        );
        let err = toml_edit::de::from_str::<InstallOptions>("soci_versoin = \"1\"\n").unwrap_err();
        assert!(err.to_string().contains("soci_versoin"), "{err}");
    }
}
