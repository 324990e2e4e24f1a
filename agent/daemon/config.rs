//! The daemon's configuration: the `[daemon]` table of the agent config file,
//! plus the `[prefetch]` table (the images to keep warm, through
//! [`PrefetchOptions::from_config`]) and what install was asked to do (the
//! install record's request over the `[install]` table, through
//! [`InstallSettings::resolve`]: the desired state). Loaded at start and on
//! SIGHUP; a load that fails changes nothing (the caller keeps the old one).
//!
//! ```toml
//! [daemon]
//! interval = "5m"              # reconcile period: "30s", "5m", "1h", "1h30m" or seconds
//! repair = false               # re-write drifted files, (re)start soci-snapshotter.service
//! max_repairs_per_hour = 6     # budget over a sliding hour, every target together
//! repair_backoff = "30s"       # first wait before repairing the same target again (doubles, capped at 1h)
//! restart_containerd = false   # may the loop restart containerd (never without this)
//! refresh = "6h"               # re-resolve tags of [prefetch] images this often (default: never)
//! metrics_address = "127.0.0.1:9400"   # or a unix socket node path; default: off
//! state_socket = "/run/soci-agent/daemon.sock"
//! ```

use crate::paths::DAEMON_STATE_SOCKET;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::install::args::InstallArgs;
use crate::install::options::ShownOption;
use crate::install::settings::InstallSettings;
use crate::prefetch::{PinMode, PrefetchOptions};
use crate::rootfs::Root;

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);
pub const DEFAULT_MAX_REPAIRS_PER_HOUR: u32 = 6;
pub const DEFAULT_REPAIR_BACKOFF: Duration = Duration::from_secs(30);
/// Shortest accepted interval (tests and the soak benchmark go this low).
const MIN_INTERVAL: Duration = Duration::from_millis(1);
/// Shortest accepted refresh period (tests); the jitter spreads a fleet.
const MIN_REFRESH: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read agent config {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("agent config {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("[daemon] {key} = {value:?}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("[prefetch]")]
    Prefetch(#[from] crate::prefetch::OptionsError),
    #[error("[install]")]
    Install(#[from] crate::install::settings::SettingsError),
}

impl crate::exit::ExitKindOf for ConfigError {
    /// The configuration is the operator's to fix: the daemon does not start (exit 2).
    fn exit_kind(&self) -> crate::exit::ExitKind {
        use crate::exit::ExitKind;
        match self {
            ConfigError::Read { .. }
            | ConfigError::Parse { .. }
            | ConfigError::Invalid { .. }
            | ConfigError::Prefetch(_)
            | ConfigError::Install(_) => ExitKind::Usage,
        }
    }
}

/// A duration written as a Go-style string (`"5m"`) or a number of seconds.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum DurationValue {
    Text(String),
    Seconds(f64),
}

impl DurationValue {
    fn parse(&self, key: &'static str) -> Result<Duration, ConfigError> {
        let (shown, parsed) = match self {
            DurationValue::Text(t) => (t.clone(), crate::prefetch::go_duration(t)),
            DurationValue::Seconds(s) => (s.to_string(), Duration::try_from_secs_f64(*s).ok()),
        };
        parsed.ok_or_else(|| ConfigError::Invalid {
            key,
            value: shown,
            reason: "not a duration (e.g. \"30s\", \"5m\", \"1h\", or a number of seconds)".into(),
        })
    }
}

/// The `[daemon]` table as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DaemonFile {
    interval: Option<DurationValue>,
    repair: Option<bool>,
    max_repairs_per_hour: Option<u32>,
    repair_backoff: Option<DurationValue>,
    restart_containerd: Option<bool>,
    refresh: Option<DurationValue>,
    metrics_address: Option<String>,
    state_socket: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct FileConfig {
    #[serde(default)]
    daemon: DaemonFile,
}

/// Where `/metrics` is served.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricsAddress {
    Tcp(SocketAddr),
    /// A host path (the node path resolved under `--root`).
    Unix(PathBuf),
}

impl std::fmt::Display for MetricsAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsAddress::Tcp(a) => write!(f, "{a}"),
            MetricsAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Overrides from the command line (they win over the file).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub interval: Option<f64>,
    pub state_socket: Option<PathBuf>,
    pub containerd_socket: Option<PathBuf>,
}

/// Everything one generation of the daemon runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file read; `None` when the default file does not exist (all defaults).
    pub file: Option<PathBuf>,
    pub interval: Duration,
    pub repair: bool,
    pub max_repairs_per_hour: u32,
    pub repair_backoff: Duration,
    pub restart_containerd: bool,
    pub refresh: Option<Duration>,
    pub metrics_address: Option<MetricsAddress>,
    /// Host path of the status socket.
    pub state_socket: PathBuf,
    /// The images to keep warm and how (`images` empty: nothing to warm).
    pub prefetch: PrefetchOptions,
    /// What install would write is computed from these.
    pub install: InstallSettings,
}

/// The summary shown in the status JSON.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Shown {
    pub file: Option<String>,
    pub interval_seconds: f64,
    pub repair: bool,
    pub max_repairs_per_hour: u32,
    pub repair_backoff_seconds: f64,
    pub restart_containerd: bool,
    pub refresh_seconds: Option<f64>,
    pub metrics_address: Option<String>,
    pub images: Vec<String>,
    pub pin: PinMode,
    /// What install was asked to do, each option with where it came from
    /// (unlisted options are at their defaults).
    pub desired: Vec<ShownOption>,
}

impl Config {
    pub fn shown(&self) -> Shown {
        Shown {
            file: self.file.as_ref().map(|p| p.display().to_string()),
            interval_seconds: self.interval.as_secs_f64(),
            repair: self.repair,
            max_repairs_per_hour: self.max_repairs_per_hour,
            repair_backoff_seconds: self.repair_backoff.as_secs_f64(),
            restart_containerd: self.restart_containerd,
            refresh_seconds: self.refresh.map(|d| d.as_secs_f64()),
            metrics_address: self.metrics_address.as_ref().map(ToString::to_string),
            images: self.prefetch.images.clone(),
            pin: self.prefetch.pin,
            desired: self.install.layered.shown(),
        }
    }

    /// What changed from `old`, as `key: old -> new` lines (for the reload log).
    pub fn changes_from(&self, old: &Config) -> Vec<String> {
        let (a, b) = (
            serde_json::to_value(old.shown()).unwrap_or_default(),
            serde_json::to_value(self.shown()).unwrap_or_default(),
        );
        let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else {
            return Vec::new();
        };
        b.iter()
            .filter(|(k, v)| a.get(*k) != Some(v))
            .map(|(k, v)| format!("{k}: {} -> {v}", a.get(k).cloned().unwrap_or_default()))
            .collect()
    }
}

fn invalid(key: &'static str, value: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.into(),
        reason: reason.into(),
    }
}

use crate::install::settings::config_path;

/// What install was asked to do: the request in the install record (flags
/// and `SOCI_AGENT_*` of the install that wrote it) over the config file's
/// `[install]` table over the defaults, as `soci-agent install --no-start`
/// would replay it. The daemon runs, so its own unit is part of that.
fn install_settings(root: &Root, file: Option<&Path>) -> Result<InstallSettings, ConfigError> {
    let mut args = InstallArgs {
        root: root.base().to_path_buf(),
        config: file.map(Path::to_path_buf),
        ..InstallArgs::default()
    };
    // Run-only: talks to no systemd, and replays the record as a whole.
    args.options.no_start = true;
    let mut settings = InstallSettings::resolve(&args)?;
    settings.daemon = true;
    Ok(settings)
}

/// Reads and validates everything; changes nothing.
pub fn load(root: &Root, o: &Overrides) -> Result<Config, ConfigError> {
    let file = config_path(root, o.config.as_deref());
    let table = read_table(file.as_deref())?;
    let interval = interval(o, &table)?;
    let max_repairs_per_hour = max_repairs_per_hour(&table)?;
    let repair_backoff = match &table.repair_backoff {
        Some(v) => v.parse("repair_backoff")?,
        None => DEFAULT_REPAIR_BACKOFF,
    };
    let refresh = refresh(&table)?;
    let metrics_address = metrics_address(root, &table)?;
    let state_socket = state_socket(root, o, &table)?;
    let prefetch = prefetch_options(root, file.as_deref(), o)?;
    let install = install_settings(root, file.as_deref())?;
    Ok(Config {
        file,
        interval,
        repair: table.repair.unwrap_or(false),
        max_repairs_per_hour,
        repair_backoff,
        restart_containerd: table.restart_containerd.unwrap_or(false),
        refresh,
        metrics_address,
        state_socket,
        prefetch,
        install,
    })
}

/// The `[daemon]` table of `file`; all defaults without a file.
fn read_table(file: Option<&Path>) -> Result<DaemonFile, ConfigError> {
    let Some(path) = file else {
        return Ok(DaemonFile::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let parsed = toml_edit::de::from_str::<FileConfig>(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string().trim().to_string(),
    })?;
    Ok(parsed.daemon)
}

/// The reconcile period: `--interval`, else `[daemon] interval`, else the default; at least 1ms.
fn interval(o: &Overrides, table: &DaemonFile) -> Result<Duration, ConfigError> {
    let interval = match (o.interval, &table.interval) {
        (Some(secs), _) => Duration::try_from_secs_f64(secs)
            .map_err(|_| invalid("interval", secs.to_string(), "not a number of seconds"))?,
        (None, Some(v)) => v.parse("interval")?,
        (None, None) => DEFAULT_INTERVAL,
    };
    if interval < MIN_INTERVAL {
        return Err(invalid("interval", format!("{interval:?}"), "must be at least 1ms"));
    }
    Ok(interval)
}

/// `[daemon] max_repairs_per_hour`, at most 3600.
fn max_repairs_per_hour(table: &DaemonFile) -> Result<u32, ConfigError> {
    let max = table.max_repairs_per_hour.unwrap_or(DEFAULT_MAX_REPAIRS_PER_HOUR);
    if max > 3600 {
        return Err(invalid("max_repairs_per_hour", max.to_string(), "at most 3600"));
    }
    Ok(max)
}

/// `[daemon] refresh`: `None` when absent or zero, else at least [`MIN_REFRESH`].
fn refresh(table: &DaemonFile) -> Result<Option<Duration>, ConfigError> {
    let Some(v) = &table.refresh else {
        return Ok(None);
    };
    match v.parse("refresh")? {
        d if d.is_zero() => Ok(None),
        d if d < MIN_REFRESH => Err(invalid("refresh", format!("{d:?}"), "at least 1s (or 0 for never)")),
        d => Ok(Some(d)),
    }
}

/// `[daemon] metrics_address`: off, an absolute unix socket node path, or HOST:PORT.
fn metrics_address(root: &Root, table: &DaemonFile) -> Result<Option<MetricsAddress>, ConfigError> {
    match table.metrics_address.as_deref().map(str::trim) {
        None | Some("") | Some("off") => Ok(None),
        Some(p) if p.starts_with('/') => Ok(Some(MetricsAddress::Unix(root.path(p)))),
        Some(a) => a.parse().map(|a| Some(MetricsAddress::Tcp(a))).map_err(|_| {
            invalid(
                "metrics_address",
                a,
                "must be HOST:PORT (e.g. 127.0.0.1:9400) or an absolute unix socket path",
            )
        }),
    }
}

/// The status socket's host path: `--state-socket`, else `[daemon] state_socket` under the root.
fn state_socket(root: &Root, o: &Overrides, table: &DaemonFile) -> Result<PathBuf, ConfigError> {
    match (&o.state_socket, &table.state_socket) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(p)) if p.starts_with('/') => Ok(root.path(p)),
        (None, Some(p)) => Err(invalid("state_socket", p.as_str(), "must be an absolute path")),
        (None, None) => Ok(root.path(DAEMON_STATE_SOCKET)),
    }
}

/// The `[prefetch]` options the warmer uses: no progress board, pulls through `--containerd-socket`.
fn prefetch_options(root: &Root, file: Option<&Path>, o: &Overrides) -> Result<PrefetchOptions, ConfigError> {
    let mut prefetch = PrefetchOptions::from_config(root.base(), file)?;
    prefetch.progress = false;
    if let Some(sock) = &o.containerd_socket {
        prefetch.cri_endpoint = format!("unix://{}", sock.display());
        prefetch.containerd_address = sock.clone();
    }
    Ok(prefetch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::AGENT_CONFIG;

    fn tree(config: &str) -> (tempfile::TempDir, Root) {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path());
        std::fs::create_dir_all(root.path("/etc/soci-agent")).unwrap();
        std::fs::write(root.path(AGENT_CONFIG), config).unwrap();
        (d, root)
    }

    #[test]
    fn defaults_without_a_file() {
        let d = tempfile::tempdir().unwrap();
        let root = Root::new(d.path());
        let c = load(&root, &Overrides::default()).unwrap();
        assert_eq!(c.file, None);
        assert_eq!(
            (c.interval, c.repair, c.max_repairs_per_hour),
            (DEFAULT_INTERVAL, false, 6)
        );
        assert_eq!(
            (c.restart_containerd, c.refresh, c.metrics_address.clone()),
            (false, None, None)
        );
        assert_eq!(c.state_socket, root.path(DAEMON_STATE_SOCKET));
        assert!(c.prefetch.images.is_empty());
    }

    #[test]
    fn the_daemon_table_and_overrides() {
        let (_d, root) = tree(
            "[install]\nretries = 1\n\n[daemon]\ninterval = \"1h30m\"\nrepair = true\nmax_repairs_per_hour = 2\n\
             refresh = \"6h\"\nmetrics_address = \"127.0.0.1:9400\"\nrestart_containerd = true\n\n\
             [prefetch]\nimages = [\"a:1\"]\npin = true\n",
        );
        let c = load(&root, &Overrides::default()).unwrap();
        assert_eq!(c.interval, Duration::from_secs(5400));
        assert!(c.repair && c.restart_containerd);
        assert_eq!(c.max_repairs_per_hour, 2);
        assert_eq!(c.refresh, Some(Duration::from_secs(6 * 3600)));
        assert_eq!(
            c.metrics_address,
            Some(MetricsAddress::Tcp("127.0.0.1:9400".parse().unwrap()))
        );
        assert_eq!(
            (c.prefetch.images.as_slice(), c.prefetch.pin),
            (&["a:1".to_string()][..], PinMode::Pin)
        );
        assert_eq!(c.install.retries, 1);
        assert!(c.install.daemon, "the daemon's own unit is among what install wrote");
        let o = Overrides {
            interval: Some(0.01),
            ..Overrides::default()
        };
        assert_eq!(load(&root, &o).unwrap().interval, Duration::from_millis(10));
    }

    #[test]
    fn numbers_are_seconds_and_unix_metrics_are_node_paths() {
        let (_d, root) = tree("[daemon]\ninterval = 30\nmetrics_address = \"/run/soci-agent/metrics.sock\"\n");
        let c = load(&root, &Overrides::default()).unwrap();
        assert_eq!(c.interval, Duration::from_secs(30));
        assert_eq!(
            c.metrics_address,
            Some(MetricsAddress::Unix(root.path("/run/soci-agent/metrics.sock")))
        );
    }

    #[test]
    fn errors_name_the_key() {
        for (text, want) in [
            ("[daemon]\ninterval = \"5 minutes\"\n", "[daemon] interval"),
            ("[daemon]\nrefresh = \"0.5s\"\n", "[daemon] refresh"),
            (
                "[daemon]\nmetrics_address = \"localhost\"\n",
                "[daemon] metrics_address",
            ),
            ("[daemon]\ncolour = 1\n", "unknown field"),
            ("[daemon\n", "is not valid"),
            ("[prefetch]\nconcurrency = 0\n", "[prefetch]"),
            ("[install]\nsoci_version = \"0.1.0\"\n", "[install]"),
        ] {
            let (_d, root) = tree(text);
            let e = crate::exit::error_chain(&load(&root, &Overrides::default()).unwrap_err());
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
