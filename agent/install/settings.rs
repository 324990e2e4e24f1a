//! Install settings. Precedence: flags, then `SOCI_AGENT_*` environment
//! (both through clap), then the `[install]` table of the config file, then
//! defaults. Everything is validated here, before the node is looked at or
//! touched.

use crate::paths::{AGENT_CONFIG, CONTAINERD_CONFIG, SOCI_ROOT};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::files::containerd_config::Daemon;
use crate::files::soci_config::{Tuning, TuningError};
use crate::install::args::InstallArgs;
use crate::install::options::{InstallOptions, Layered, PreinstalledPolicy, Source, WiringMode};
use crate::install::record::Record;
use crate::output::OutputFormat;
use crate::release::{Arch, DEFAULT_RELEASE_URL, DEFAULT_SOCI_VERSION, Flavor, ReleaseError, Sha256Hex, Version};
use crate::rootfs::Root;

pub const DEFAULT_HTTP_TIMEOUT_SECS: f64 = 30.0;
pub const DEFAULT_RETRIES: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read agent config {path}")]
    ReadConfig { path: PathBuf, source: std::io::Error },
    #[error("agent config {path} is not valid: {message}")]
    ParseConfig { path: PathBuf, message: String },
    #[error("{option} {value:?}: {reason}")]
    Invalid {
        option: &'static str,
        value: String,
        reason: String,
    },
    #[error(transparent)]
    Tuning(#[from] TuningError),
    #[error("{option}")]
    Release { option: &'static str, source: ReleaseError },
}

/// The whole agent config file. Other tables belong to other subcommands.
#[derive(Debug, Default, Deserialize)]
struct FileConfig {
    #[serde(default)]
    install: InstallOptions,
}

impl crate::exit::ExitKindOf for SettingsError {
    /// Every settings error is found before the node is touched.
    fn exit_kind(&self) -> crate::exit::ExitKind {
        crate::exit::ExitKind::Usage
    }
}

/// Which gzip decompressor SOCI should run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecompressorChoice {
    /// `/usr/bin/unpigz` when present under the root, else none.
    Auto,
    None,
    Path(String),
}

/// Fully resolved and validated install settings.
#[derive(Debug, Clone)]
pub struct InstallSettings {
    pub root: Root,
    pub config_file: Option<PathBuf>,
    pub soci_version: Version,
    pub release_url: String,
    pub flavor: Flavor,
    pub archive: Option<PathBuf>,
    pub sha256: Option<Sha256Hex>,
    pub arch: Option<Arch>,
    pub soci_root: String,
    pub tuning: Tuning,
    pub decompressor: DecompressorChoice,
    pub containerd_config: String,
    pub wiring: WiringMode,
    /// What to do with a preinstalled SOCI (`--adopt` = keep).
    pub preinstalled: PreinstalledPolicy,
    /// `--containerd-version`: overrides the detected containerd version.
    pub containerd_version: Option<Daemon>,
    /// Install and enable soci-agent.service.
    pub daemon: bool,
    pub no_start: bool,
    pub dry_run: bool,
    pub output: OutputFormat,
    /// node-exporter textfile collector directory (node path), for gauges.
    pub textfile_dir: Option<String>,
    pub http_timeout: Duration,
    pub retries: u32,
    /// `--data-volume`: the device (node path) holding both daemons' roots.
    pub data_volume: Option<String>,
    /// `--format-data-volume`: format it when blank.
    pub format_data_volume: bool,
    /// Things worth saying that do not stop the install (e.g. plain http).
    pub warnings: Vec<String>,
    /// The options as given, layer by layer (what the record keeps of them).
    pub layered: Layered,
}

fn invalid(option: &'static str, value: impl Into<String>, reason: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        option,
        value: value.into(),
        reason: reason.into(),
    }
}

fn absolute(option: &'static str, value: String) -> Result<String, SettingsError> {
    if !value.starts_with('/') {
        return Err(invalid(option, value, "must be an absolute path"));
    }
    Ok(value.trim_end_matches('/').to_string().max("/".to_string()))
}

/// A path that lands in a unit file: absolute, normalized, printable
/// (quoting and specifiers are handled when the unit is written).
fn unit_path(option: &'static str, value: String) -> Result<String, SettingsError> {
    crate::files::units::check_unit_path(option, &value).map_err(|e| invalid(option, value.clone(), e.to_string()))?;
    Ok(value)
}

/// The agent config file every subcommand reads: `--config` as given, else
/// the default under the root when it exists.
pub fn config_path(root: &Root, explicit: Option<&Path>) -> Option<PathBuf> {
    match explicit {
        Some(p) => Some(p.to_path_buf()),
        None => Some(root.resolve(AGENT_CONFIG)).filter(|p| p.exists()),
    }
}

fn read_file_config(args: &InstallArgs, root: &Root) -> Result<(Option<PathBuf>, InstallOptions), SettingsError> {
    let Some(path) = config_path(root, args.config.as_deref()) else {
        return Ok((None, InstallOptions::default()));
    };
    let text = std::fs::read_to_string(&path).map_err(|source| SettingsError::ReadConfig {
        path: path.clone(),
        source,
    })?;
    let cfg = toml_edit::de::from_str::<FileConfig>(&text).map_err(|e| SettingsError::ParseConfig {
        path: path.clone(),
        message: e.to_string().trim().to_string(),
    })?;
    Ok((Some(path), cfg.install))
}

/// The request recorded by the last install given settings (empty when
/// none, or when the record cannot be read: install reports that itself).
fn recorded_request(root: &Root) -> std::collections::BTreeMap<String, crate::install::options::Requested> {
    Record::load(root).ok().flatten().map(|r| r.request).unwrap_or_default()
}

impl InstallSettings {
    /// Stacks flags/env (already in `args`) over the config file over the
    /// recorded request over the defaults, and validates the result.
    pub fn resolve(args: &InstallArgs) -> Result<Self, SettingsError> {
        let root = checked_root(args)?;
        let (config_file, file) = read_file_config(args, &root)?;
        let layered = Layered::stack(&args.options, &args.sources, &file, &recorded_request(&root));
        let o = &layered.options;
        let mut warnings = Vec::new();
        let version = o.soci_version.clone().unwrap_or(DEFAULT_SOCI_VERSION.to_string());
        let soci_version = named("--soci-version", Version::parse_supported(&version))?;
        let release_url = https_release_url(o.release_url.clone(), &mut warnings)?;
        let flavor = named("--flavor", o.flavor.as_deref().unwrap_or("static").parse())?;
        let sha256 = named("--sha256", o.sha256.as_deref().map(Sha256Hex::parse).transpose())?;
        let arch = named("--arch", o.arch.as_deref().map(str::parse).transpose())?;
        let archive = existing_archive(o.archive.clone(), layered.source("archive"))?;
        let soci_root = o.soci_root.clone().unwrap_or(SOCI_ROOT.into());
        let soci_root = unit_path("--soci-root", absolute("--soci-root", soci_root)?)?;
        let containerd_config = o.containerd_config.clone().unwrap_or(CONTAINERD_CONFIG.into());
        let containerd_config = absolute("--containerd-config", containerd_config)?;
        let tuning = merged_tuning(o)?;
        let decompressor = decompressor_choice(&root, o.decompressor.as_deref())?;
        let http_timeout = bounded_http_timeout(o.http_timeout)?;
        let retries = bounded_retries(o.retries)?;
        let no_start = no_start_for_root(args, o.no_start, &root)?;
        let preinstalled = preinstalled_policy(o, archive.is_some() || sha256.is_some())?;
        let containerd_version = o.containerd_version.as_deref().map(parse_containerd_version);
        let data_volume = data_volume(o)?;
        Ok(InstallSettings {
            root,
            config_file,
            soci_version,
            release_url,
            flavor,
            archive,
            sha256,
            arch,
            soci_root,
            tuning,
            decompressor,
            containerd_config,
            wiring: o.wiring.unwrap_or(WiringMode::Auto),
            preinstalled,
            containerd_version: containerd_version.transpose()?,
            daemon: o.daemon,
            no_start,
            dry_run: args.dry_run,
            output: o.output.unwrap_or(OutputFormat::Text),
            textfile_dir: o
                .textfile_dir
                .clone()
                .map(|d| absolute("--textfile-dir", d))
                .transpose()?,
            http_timeout,
            retries,
            data_volume,
            format_data_volume: o.format_data_volume,
            warnings,
            layered,
        })
    }
}

/// `--data-volume` (a device path that lands in a unit file); `--format-data-volume` needs one.
fn data_volume(o: &InstallOptions) -> Result<Option<String>, SettingsError> {
    let data_volume = o
        .data_volume
        .clone()
        .map(|d| unit_path("--data-volume", d))
        .transpose()?;
    if o.format_data_volume && data_volume.is_none() {
        return Err(invalid(
            "--format-data-volume",
            "true",
            "formats the --data-volume: give one",
        ));
    }
    Ok(data_volume)
}

/// A release value's parse result, its error naming the option.
fn named<T>(option: &'static str, parsed: Result<T, ReleaseError>) -> Result<T, SettingsError> {
    parsed.map_err(|source| SettingsError::Release { option, source })
}

/// `--root`: an existing directory.
fn checked_root(args: &InstallArgs) -> Result<Root, SettingsError> {
    let root = Root::new(&args.root);
    if !args.root.is_absolute() && !args.root.exists() {
        return Err(invalid(
            "--root",
            args.root.display().to_string(),
            "directory does not exist",
        ));
    }
    if !args.root.is_dir() {
        return Err(invalid("--root", args.root.display().to_string(), "not a directory"));
    }
    Ok(root)
}

/// `--release-url` without its trailing `/`: https, or plain http with a
/// warning.
fn https_release_url(value: Option<String>, warnings: &mut Vec<String>) -> Result<String, SettingsError> {
    let release_url = value.unwrap_or(DEFAULT_RELEASE_URL.to_string());
    let release_url = release_url.trim_end_matches('/').to_string();
    if release_url.starts_with("http://") {
        warnings.push(format!(
            "--release-url {release_url} is plain http: the download is only as trustworthy as the digest it is checked against; pin one with --sha256"
        ));
    } else if !release_url.starts_with("https://") {
        return Err(invalid(
            "--release-url",
            release_url,
            "must start with https:// (or http:// for a mirror)",
        ));
    }
    match reqwest::Url::parse(&release_url) {
        Ok(u) if u.host_str().is_some() => Ok(release_url),
        Ok(_) => Err(invalid("--release-url", release_url, "names no host")),
        Err(e) => Err(invalid("--release-url", release_url, format!("is not a URL: {e}"))),
    }
}

/// `--archive`: a file that exists, when given now. A recorded archive may
/// be gone (the release is in the store by then): the plan needs it only
/// when the store lacks the release, and says so.
fn existing_archive(archive: Option<PathBuf>, source: Source) -> Result<Option<PathBuf>, SettingsError> {
    if let Some(a) = &archive
        && matches!(source, Source::Flag | Source::Env | Source::File)
        && !a.is_file()
    {
        return Err(invalid("--archive", a.display().to_string(), "no such file"));
    }
    Ok(archive)
}

/// SOCI's parallel-mode limits: each as given, else the default;
/// validated together.
fn merged_tuning(o: &InstallOptions) -> Result<Tuning, SettingsError> {
    let d = Tuning::default();
    // Every limit has the same name in the options and `Tuning`.
    macro_rules! merged {
        ($($limit:ident),*) => {
            Tuning { $($limit: o.$limit.clone().unwrap_or(d.$limit)),* }
        };
    }
    let tuning = merged!(
        max_concurrent_downloads,
        max_concurrent_downloads_per_image,
        concurrent_download_chunk_size,
        max_concurrent_unpacks,
        max_concurrent_unpacks_per_image,
        discard_unpacked_layers
    );
    crate::files::soci_config::validate(&tuning)?;
    Ok(tuning)
}

/// `--decompressor`: `auto`, `none` (or empty), or an executable under the root.
fn decompressor_choice(root: &Root, value: Option<&str>) -> Result<DecompressorChoice, SettingsError> {
    Ok(match value {
        None | Some("auto") => DecompressorChoice::Auto,
        Some("none") | Some("") => DecompressorChoice::None,
        Some(p) => {
            crate::files::soci_config::validate_decompressor_path(p)?;
            check_executable(root, p)?;
            DecompressorChoice::Path(p.to_string())
        }
    })
}

/// `--http-timeout`, else [`DEFAULT_HTTP_TIMEOUT_SECS`]: more than 0, at most 3600 seconds.
fn bounded_http_timeout(secs: Option<f64>) -> Result<Duration, SettingsError> {
    let secs = secs.unwrap_or(DEFAULT_HTTP_TIMEOUT_SECS);
    if !(secs.is_finite() && secs > 0.0 && secs <= 3600.0) {
        return Err(invalid(
            "--http-timeout",
            secs.to_string(),
            "must be between 0 and 3600 seconds",
        ));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `--retries`, else [`DEFAULT_RETRIES`]: at most 20.
fn bounded_retries(retries: Option<u32>) -> Result<u32, SettingsError> {
    let retries = retries.unwrap_or(DEFAULT_RETRIES);
    if retries > 20 {
        return Err(invalid("--retries", retries.to_string(), "at most 20"));
    }
    Ok(retries)
}

/// `--no-start`, required when installing into another root (its units
/// cannot be started from here), except for a dry run.
fn no_start_for_root(args: &InstallArgs, no_start: bool, root: &Root) -> Result<bool, SettingsError> {
    if !root.is_host() && !no_start && !args.dry_run {
        return Err(invalid(
            "--root",
            args.root.display().to_string(),
            "installing into another root cannot start its units: add --no-start",
        ));
    }
    Ok(no_start)
}

/// `--preinstalled` (`--adopt` means keep); keep cannot go with a release
/// pinned by `--archive` or `--sha256`.
fn preinstalled_policy(o: &InstallOptions, pins_release: bool) -> Result<PreinstalledPolicy, SettingsError> {
    let preinstalled = match (o.preinstalled, o.adopt) {
        (Some(p), false) | (Some(p @ PreinstalledPolicy::Keep), true) => p,
        (None, true) => PreinstalledPolicy::Keep,
        (None, false) => PreinstalledPolicy::Auto,
        (Some(p), true) => {
            return Err(invalid(
                "--adopt",
                "true",
                format!("means --preinstalled keep, which contradicts --preinstalled {p:?}"),
            ));
        }
    };
    if preinstalled == PreinstalledPolicy::Keep && pins_release {
        return Err(invalid(
            "--preinstalled",
            "keep",
            "keeps the preinstalled binary; it cannot be combined with --archive or --sha256",
        ));
    }
    Ok(preinstalled)
}

/// `--containerd-version`: `2.2`, `v2.4.2`, `1.7.27`.
fn parse_containerd_version(value: &str) -> Result<Daemon, SettingsError> {
    let bad = || {
        invalid(
            "--containerd-version",
            value,
            "expected MAJOR.MINOR or MAJOR.MINOR.PATCH, e.g. 2.2 or 1.7.27",
        )
    };
    let t = value.trim().strip_prefix('v').unwrap_or(value.trim());
    let mut parts = t.split('.');
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    if parts.clone().count() > 1 || parts.any(|p| p.parse::<u32>().is_err()) || !(1..=2).contains(&major) {
        return Err(bad());
    }
    Ok(Daemon { major, minor })
}

/// The decompressor must exist under the root and be executable, or the
/// daemon refuses to start.
fn check_executable(root: &Root, node_path: &str) -> Result<(), SettingsError> {
    use std::os::unix::fs::PermissionsExt;
    let p = root.path(node_path);
    match std::fs::metadata(&p) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(invalid(
            "--decompressor",
            node_path,
            format!("{} is not an executable file", p.display()),
        )),
        Err(_) => Err(invalid(
            "--decompressor",
            node_path,
            format!("{} does not exist (use \"none\" to go without)", p.display()),
        )),
    }
}

/// The `.sha256sum` sibling of a local archive.
pub fn sibling_checksum(archive: &Path) -> PathBuf {
    let mut s = archive.as_os_str().to_owned();
    s.push(".sha256sum");
    PathBuf::from(s)
}
