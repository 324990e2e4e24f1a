//! `prefetch` settings: flags (and `SOCI_AGENT_*` environment), then the
//! `[prefetch]` table of the agent config file, then defaults. The result is
//! a plain [`PrefetchOptions`], which the boot path can also build itself.

use crate::paths::{
    CONTAINERD_SOCKET, CREDENTIAL_PROVIDER_BIN_DIR, CREDENTIAL_PROVIDER_CONFIG, CRI_ENDPOINT, SOCI_CONFIG,
};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::output::OutputFormat;
use crate::rootfs::Root;

pub const DEFAULT_CONCURRENCY: usize = 2;
pub const DEFAULT_TIMEOUT_PER_IMAGE_SECS: f64 = 600.0;
pub const DEFAULT_RETRIES: u32 = 4;
const MAX_CONCURRENCY: usize = 64;

/// Pre-pull images through containerd's CRI into the snapshotter kubelet uses.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(
    after_help = "Examples:\n  soci-agent prefetch public.ecr.aws/org/app:1.2 registry.example/ml/train@sha256:<hex>\n  \
soci-agent prefetch --from /etc/soci-agent/images.txt --concurrency 2 --pin\n\n\
Exit codes: 0 every image present (cache hit) or pulled; 4 some images failed (the report says which); \
2 usage or configuration error."
)]
pub struct PrefetchArgs {
    /// Image references (tag or digest). Without any (and without --from), the config file's `images`.
    #[arg(value_name = "IMAGE")]
    pub images: Vec<String>,

    /// Read more image references from FILE: one per line, `#` comments and blank lines ignored.
    #[arg(long, value_name = "FILE")]
    pub from: Vec<PathBuf>,

    /// Directory node paths are resolved under (config files, SOCI config, credential provider defaults).
    #[arg(long, value_name = "DIR", env = "SOCI_AGENT_ROOT", default_value = "/")]
    pub root: PathBuf,

    /// Agent config file (its `[prefetch]` table: images, concurrency, pin, timeout_per_image, strict, ...).
    /// [default: /etc/soci-agent/config.toml under --root, when present]
    #[arg(long, value_name = "FILE", env = "SOCI_AGENT_CONFIG")]
    pub config: Option<PathBuf>,

    /// Images pulled at once (images of one repo are serialized when SOCI discards unpacked layers). [default: 2]
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,

    /// Label every prefetched image (pulled or already present) io.cri-containerd.pinned=pinned, so
    /// kubelet's image GC keeps it (containerd 1.7+ honours the label).
    #[arg(long, conflicts_with = "unpin")]
    pub pin: bool,

    /// Remove the pinned label from the listed images; pulls nothing.
    #[arg(long)]
    pub unpin: bool,

    /// Bound on one image (status, pull with retries, pin), in seconds. [default: 600]
    #[arg(long, value_name = "SECS")]
    pub timeout_per_image: Option<f64>,

    /// Extra attempts on transient errors (Unavailable, DeadlineExceeded, ResourceExhausted, registry 5xx,
    /// connection errors), with capped exponential backoff. [default: 4]
    #[arg(long, value_name = "N")]
    pub retries: Option<u32>,

    /// CRI runtime endpoint serving runtime.v1.ImageService. [default: unix:///run/containerd/containerd.sock]
    #[arg(long, value_name = "URI", env = "SOCI_AGENT_CRI_ENDPOINT")]
    pub cri_endpoint: Option<String>,

    /// containerd's socket, for pinning and --platform. [default: the --cri-endpoint socket (containerd
    /// serves both on one), or /run/containerd/containerd.sock when that is SOCI's socket]
    #[arg(long, value_name = "PATH", env = "SOCI_AGENT_CONTAINERD_ADDRESS")]
    pub containerd_address: Option<PathBuf>,

    /// docker config.json with registry credentials (`auths.<registry>.auth` or username/password); consulted first.
    #[arg(long, value_name = "FILE")]
    pub auth_file: Option<PathBuf>,

    /// kubelet CredentialProviderConfig (JSON). [default: /etc/eks/image-credential-provider/config.json
    /// under --root, when present]
    #[arg(long, value_name = "FILE")]
    pub image_credential_provider_config: Option<PathBuf>,

    /// Directory of the credential provider plugin binaries. [default: /etc/eks/image-credential-provider
    /// under --root]
    #[arg(long, value_name = "DIR")]
    pub image_credential_provider_bin_dir: Option<PathBuf>,

    /// Bake mode: also fetch these platforms' content into containerd's store (comma-separated,
    /// e.g. linux/amd64,linux/arm64; needs containerd's Transfer service, 1.7+).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub platform: Vec<String>,

    /// Report format on stdout. [default: text]
    #[arg(long, value_enum, env = "SOCI_AGENT_OUTPUT")]
    pub output: Option<OutputFormat>,
}

/// What to do with the pinned label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PinMode {
    /// Leave labels alone.
    #[default]
    Keep,
    /// Set `io.cri-containerd.pinned=pinned` on pulled images and hits.
    Pin,
    /// Remove the label; pull nothing.
    Unpin,
}

/// Everything [`super::prefetch`] needs; no clap. Build it with
/// [`PrefetchOptions::new`] (defaults under a root) or
/// [`PrefetchOptions::from_config`] (plus the `[prefetch]` table).
#[derive(Debug, Clone)]
pub struct PrefetchOptions {
    /// References as given (normalized and deduplicated by `prefetch`).
    pub images: Vec<String>,
    /// Images in flight at once (>= 1).
    pub concurrency: usize,
    pub pin: PinMode,
    /// Bound on one image: status, pull with every retry, pin, platforms.
    pub timeout_per_image: Duration,
    /// Extra attempts per call on transient errors.
    pub retries: u32,
    /// First backoff; doubles per attempt up to 30 s, with jitter.
    pub retry_backoff: Duration,
    /// `unix:///path` (or `/path`) of the CRI ImageService.
    pub cri_endpoint: String,
    /// containerd's socket (pinning, platforms).
    pub containerd_address: PathBuf,
    pub auth_file: Option<PathBuf>,
    /// kubelet `CredentialProviderConfig` (JSON).
    pub credential_provider_config: Option<PathBuf>,
    /// When false, a missing provider config means "no providers" (the default path).
    pub credential_provider_config_required: bool,
    pub credential_provider_bin_dir: PathBuf,
    /// SOCI's config file (read for `discard_unpacked_layers`); a missing file is fine.
    pub soci_config: PathBuf,
    /// Bake mode: platforms (`linux/arm64`) whose content is fetched too.
    pub platforms: Vec<String>,
    /// The operator's wish from `[prefetch] strict`: the boot path fails the
    /// boot on a failed image when true. `prefetch` itself only reports.
    pub strict: bool,
    /// Draw per-image progress on stderr (a TTY); otherwise one log line per image.
    pub progress: bool,
}

impl PrefetchOptions {
    /// Defaults, with node paths resolved under `root`.
    pub fn new(root: &Path) -> Self {
        let root = Root::new(root);
        PrefetchOptions {
            images: Vec::new(),
            concurrency: DEFAULT_CONCURRENCY,
            pin: PinMode::Keep,
            timeout_per_image: Duration::from_secs_f64(DEFAULT_TIMEOUT_PER_IMAGE_SECS),
            retries: DEFAULT_RETRIES,
            retry_backoff: Duration::from_secs(1),
            cri_endpoint: CRI_ENDPOINT.to_string(),
            containerd_address: PathBuf::from(CONTAINERD_SOCKET),
            auth_file: None,
            credential_provider_config: Some(root.path(CREDENTIAL_PROVIDER_CONFIG)),
            credential_provider_config_required: false,
            credential_provider_bin_dir: root.path(CREDENTIAL_PROVIDER_BIN_DIR),
            soci_config: root.path(SOCI_CONFIG),
            platforms: Vec::new(),
            strict: false,
            progress: false,
        }
    }

    /// Defaults overlaid with the `[prefetch]` table of `config` (or of
    /// `/etc/soci-agent/config.toml` under `root`, when it exists).
    pub fn from_config(root: &Path, config: Option<&Path>) -> Result<Self, OptionsError> {
        let args = PrefetchArgs {
            root: root.to_path_buf(),
            config: config.map(Path::to_path_buf),
            ..PrefetchArgs::default()
        };
        Ok(resolve(&args)?.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error("cannot read {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("agent config {path} is not valid: {message}")]
    ParseConfig { path: PathBuf, message: String },
    #[error("{option} {value:?}: {reason}")]
    Invalid {
        option: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl crate::exit::ExitKindOf for OptionsError {
    /// The options or the config file are the operator's to fix; nothing was pulled (exit 2).
    fn exit_kind(&self) -> crate::exit::ExitKind {
        use crate::exit::ExitKind;
        match self {
            OptionsError::Read { .. } | OptionsError::ParseConfig { .. } | OptionsError::Invalid { .. } => {
                ExitKind::Usage
            }
        }
    }
}

/// The `[prefetch]` table; keys are the flag names with `_`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrefetchFile {
    images: Option<Vec<String>>,
    concurrency: Option<usize>,
    pin: Option<bool>,
    unpin: Option<bool>,
    timeout_per_image: Option<f64>,
    strict: Option<bool>,
    retries: Option<u32>,
    cri_endpoint: Option<String>,
    containerd_address: Option<PathBuf>,
    auth_file: Option<PathBuf>,
    image_credential_provider_config: Option<PathBuf>,
    image_credential_provider_bin_dir: Option<PathBuf>,
    platform: Option<Vec<String>>,
    output: Option<OutputFormat>,
}

#[derive(Debug, Default, Deserialize)]
struct FileConfig {
    #[serde(default)]
    prefetch: PrefetchFile,
}

fn read_config(args: &PrefetchArgs, root: &Root) -> Result<PrefetchFile, OptionsError> {
    let Some(path) = crate::install::settings::config_path(root, args.config.as_deref()) else {
        return Ok(PrefetchFile::default());
    };
    let text = std::fs::read_to_string(&path).map_err(|source| OptionsError::Read {
        path: path.clone(),
        source,
    })?;
    let cfg = toml_edit::de::from_str::<FileConfig>(&text).map_err(|e| OptionsError::ParseConfig {
        path,
        message: e.to_string().trim().to_string(),
    })?;
    Ok(cfg.prefetch)
}

/// Image references from a list file: one per line, `#` comments.
pub fn read_image_list(path: &Path) -> Result<Vec<String>, OptionsError> {
    let text = std::fs::read_to_string(path).map_err(|source| OptionsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text
        .lines()
        .map(|l| l.split_once('#').map_or(l, |(before, _)| before).trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// Flags over the config file over defaults; the report format too.
pub fn resolve(args: &PrefetchArgs) -> Result<(PrefetchOptions, OutputFormat), OptionsError> {
    let root = Root::new(&args.root);
    let file = read_config(args, &root)?;
    let mut o = PrefetchOptions::new(&args.root);
    o.images = images(args, file.images)?;
    o.concurrency = concurrency(args.concurrency.or(file.concurrency).unwrap_or(DEFAULT_CONCURRENCY))?;
    o.pin = pin_mode(args, file.pin.unwrap_or(false), file.unpin.unwrap_or(false))?;
    o.timeout_per_image = timeout_per_image(
        args.timeout_per_image
            .or(file.timeout_per_image)
            .unwrap_or(DEFAULT_TIMEOUT_PER_IMAGE_SECS),
    )?;
    o.retries = args.retries.or(file.retries).unwrap_or(DEFAULT_RETRIES);
    o.cri_endpoint = args
        .cri_endpoint
        .clone()
        .or(file.cri_endpoint)
        .unwrap_or(CRI_ENDPOINT.into());
    o.containerd_address = args
        .containerd_address
        .clone()
        .or(file.containerd_address)
        .unwrap_or_else(|| containerd_for(&o.cri_endpoint));
    o.auth_file = args.auth_file.clone().or(file.auth_file);
    let provider_config = args.image_credential_provider_config.clone();
    if let Some(p) = provider_config.or(file.image_credential_provider_config) {
        o.credential_provider_config = Some(p);
        o.credential_provider_config_required = true;
    }
    let provider_bin_dir = args.image_credential_provider_bin_dir.clone();
    if let Some(d) = provider_bin_dir.or(file.image_credential_provider_bin_dir) {
        o.credential_provider_bin_dir = d;
    }
    o.platforms = platforms(&args.platform, file.platform)?;
    o.strict = file.strict.unwrap_or(false);
    o.progress = std::io::stderr().is_terminal();
    let output = args.output.or(file.output).unwrap_or(OutputFormat::Text);
    Ok((o, output))
}

/// containerd's socket when only the CRI endpoint was given: containerd serves CRI and its own
/// API on one socket, so it is the endpoint's; SOCI's socket (its CRI keychain) serves only CRI,
/// so pins then go to containerd's default socket.
fn containerd_for(cri_endpoint: &str) -> PathBuf {
    match super::cri::socket_path(cri_endpoint) {
        Ok(path) if !path.starts_with(super::SOCI_RUN_DIR) => path,
        _ => PathBuf::from(CONTAINERD_SOCKET),
    }
}

/// The arguments and `--from` lists; the file's `images` only when neither was given.
fn images(args: &PrefetchArgs, from_file: Option<Vec<String>>) -> Result<Vec<String>, OptionsError> {
    let mut images = args.images.clone();
    for list in &args.from {
        images.extend(read_image_list(list)?);
    }
    if images.is_empty() && args.from.is_empty() {
        images = from_file.unwrap_or_default();
    }
    Ok(images)
}

/// Images in flight at once: 1 to [`MAX_CONCURRENCY`].
fn concurrency(n: usize) -> Result<usize, OptionsError> {
    if n == 0 || n > MAX_CONCURRENCY {
        return Err(OptionsError::Invalid {
            option: "--concurrency",
            value: n.to_string(),
            reason: "must be between 1 and 64",
        });
    }
    Ok(n)
}

/// `--unpin`, else `--pin`, else the file's `pin`/`unpin` (not both).
fn pin_mode(args: &PrefetchArgs, pin: bool, unpin: bool) -> Result<PinMode, OptionsError> {
    if args.unpin {
        return Ok(PinMode::Unpin);
    }
    if args.pin {
        return Ok(PinMode::Pin);
    }
    match (pin, unpin) {
        (true, true) => Err(OptionsError::Invalid {
            option: "pin/unpin",
            value: "true/true".into(),
            reason: "pin and unpin cannot both be set",
        }),
        (true, false) => Ok(PinMode::Pin),
        (false, true) => Ok(PinMode::Unpin),
        (false, false) => Ok(PinMode::Keep),
    }
}

/// The bound on one image: more than 0 and at most a day, in seconds.
fn timeout_per_image(secs: f64) -> Result<Duration, OptionsError> {
    if !(secs.is_finite() && secs > 0.0 && secs <= 86400.0) {
        return Err(OptionsError::Invalid {
            option: "--timeout-per-image",
            value: secs.to_string(),
            reason: "must be a number of seconds between 0 and 86400",
        });
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `--platform` (else the file's `platform`), trimmed, blanks dropped, each `os/arch[/variant]`.
fn platforms(flags: &[String], from_file: Option<Vec<String>>) -> Result<Vec<String>, OptionsError> {
    let given = if flags.is_empty() {
        from_file.unwrap_or_default()
    } else {
        flags.to_vec()
    };
    let platforms: Vec<String> = given
        .iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    if let Some(p) = platforms.iter().find(|p| super::bake::parse_platform(p).is_err()) {
        return Err(OptionsError::Invalid {
            option: "--platform",
            value: p.clone(),
            reason: "must be os/arch[/variant], e.g. linux/arm64",
        });
    }
    Ok(platforms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_and_flags() {
        let dir = std::env::temp_dir().join(format!("soci-agent-prefetch-opts-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("etc/soci-agent")).unwrap();
        std::fs::write(
            dir.join("etc/soci-agent/config.toml"),
            "[install]\nretries = 1\n\n[prefetch]\nimages = [\"a:1\", \"b:2\"]\nconcurrency = 3\npin = true\n\
             timeout_per_image = 30\nstrict = true\n",
        )
        .unwrap();
        let o = PrefetchOptions::from_config(&dir, None).unwrap();
        assert_eq!(o.images, ["a:1", "b:2"]);
        assert_eq!((o.concurrency, o.pin, o.strict), (3, PinMode::Pin, true));
        assert_eq!(o.timeout_per_image, Duration::from_secs(30));
        assert_eq!(o.soci_config, dir.join("etc/soci-snapshotter-grpc/config.toml"));
        let args = PrefetchArgs {
            root: dir.clone(),
            images: vec!["c:3".into()],
            concurrency: Some(1),
            unpin: true,
            ..PrefetchArgs::default()
        };
        let (o, _) = resolve(&args).unwrap();
        assert_eq!(
            (o.images.as_slice(), o.concurrency, o.pin),
            (&["c:3".to_string()][..], 1, PinMode::Unpin)
        );
        std::fs::write(dir.join("etc/soci-agent/config.toml"), "[prefetch]\ncolor = 1\n").unwrap();
        assert!(matches!(
            PrefetchOptions::from_config(&dir, None),
            Err(OptionsError::ParseConfig { .. })
        ));
        let args = PrefetchArgs {
            root: dir.clone(),
            config: Some(dir.join("none.toml")),
            ..PrefetchArgs::default()
        };
        assert!(matches!(resolve(&args), Err(OptionsError::Read { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
