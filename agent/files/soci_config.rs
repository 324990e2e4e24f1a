//! The SOCI snapshotter's `config.toml` with parallel pull/unpack mode on:
//! operator tuning, the rules the daemon enforces (checked before anything is
//! written), version-aware rendering, and reading an existing file back for
//! `doctor`. Pure; no I/O.
//!
//! The daemon silently ignores unknown keys, so a typo is never reported by
//! it: [`unknown_keys`] does that, matching key names case-insensitively as
//! the daemon's TOML decoder (go-toml v2) does. It also refuses to start on
//! some combinations: [`validate`], [`validate_decompressor_path`] and
//! [`check_content_store_rule`] catch them. Parallel mode needs
//! `[content_store] type = "containerd"` or `discard_unpacked_layers = true`;
//! [`render`] always writes containerd, and only keys the target SOCI release
//! ([`SociConfig::version`]) reads ([`KNOWN_KEYS`], [`reads_key`]).

use crate::files::registry_hosts::SociMirror;
use crate::paths::CONTAINERD_SOCKET;
use std::fmt;

use toml_edit::{Array, DocumentMut, Item, TableLike};

use crate::release::{MIN_SOCI_VERSION, Version};

/// First line of every rendered file (fixed, so output is deterministic).
pub const HEADER: &str = "# Written by soci-agent; changes are overwritten on the next install.";

pub const FLAG_MAX_DOWNLOADS: &str = "--max-concurrent-downloads";
pub const FLAG_MAX_DOWNLOADS_PER_IMAGE: &str = "--max-concurrent-downloads-per-image";
pub const FLAG_CHUNK_SIZE: &str = "--concurrent-download-chunk-size";
pub const FLAG_MAX_UNPACKS: &str = "--max-concurrent-unpacks";
pub const FLAG_MAX_UNPACKS_PER_IMAGE: &str = "--max-concurrent-unpacks-per-image";
pub const FLAG_DISCARD_UNPACKED_LAYERS: &str = "--discard-unpacked-layers";

/// Characters SOCI refuses anywhere in a decompressor path (upstream
/// `internal/os/filepath.go` `SanitizeExecutablePath`, 0.11.0-0.16.1).
pub const DECOMPRESSOR_FORBIDDEN_CHARS: &str = "#%{}\\|;&$<>";

const PARALLEL: &str = "pull_modes.parallel_pull_unpack";

/// The daemon's parallel-mode defaults (upstream `config/defaults.go`,
/// identical in 0.11.0-0.16.1): limits <= 0 are unbounded.
const DAEMON_DOWNLOADS_PER_IMAGE: i64 = 3;
const DAEMON_UNPACKS_PER_IMAGE: i64 = 1;

/// Operator tuning; defaults = the EKS AMI's published values (soci.md "Tuning references").
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Tuning {
    /// Global download limit; any value <= 0 (e.g. -1) = unbounded.
    pub max_concurrent_downloads: i64,
    /// Per-image download limit; <= 0 = unbounded. At most a bounded global limit.
    pub max_concurrent_downloads_per_image: i64,
    /// SOCI size grammar, e.g. "16mb"; "" = whole layers.
    pub concurrent_download_chunk_size: String,
    /// Global unpack limit; any value <= 0 (e.g. -1) = unbounded.
    pub max_concurrent_unpacks: i64,
    /// Per-image unpack limit; <= 0 = unbounded. At most a bounded global limit.
    pub max_concurrent_unpacks_per_image: i64,
    pub discard_unpacked_layers: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            max_concurrent_downloads: -1,
            max_concurrent_downloads_per_image: 20,
            concurrent_download_chunk_size: "16mb".to_string(),
            max_concurrent_unpacks: -1,
            max_concurrent_unpacks_per_image: 12,
            discard_unpacked_layers: true,
        }
    }
}

/// A `decompress_streams` entry, e.g. path "/usr/bin/unpigz", args ["-d","-c"].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Decompressor {
    pub path: String,
    pub args: Vec<String>,
}

impl Decompressor {
    /// unpigz decompressing to stdout, as the EKS AMI configures it.
    pub fn unpigz(path: &str) -> Self {
        Decompressor {
            path: path.to_string(),
            args: vec!["-d".to_string(), "-c".to_string()],
        }
    }
}

/// Everything soci-agent writes into `config.toml`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SociConfig {
    pub tuning: Tuning,
    /// `None` by default: the daemon refuses to start when the path does not
    /// exist, so the caller sets it only after checking the file.
    pub gzip: Option<Decompressor>,
    pub containerd_address: String,
    pub image_service_path: String,
    /// The SOCI release the file is for: [`render`] never writes a key it
    /// does not read. Default: [`crate::release::DEFAULT_SOCI_VERSION`].
    #[serde(serialize_with = "as_display")]
    pub version: Version,
    /// Registry -> its mirrors for SOCI's resolver (from containerd's
    /// `hosts.toml`, see [`crate::files::registry_hosts`]); empty: none.
    pub resolver: std::collections::BTreeMap<String, Vec<SociMirror>>,
}

impl Default for SociConfig {
    fn default() -> Self {
        SociConfig {
            tuning: Tuning::default(),
            gzip: None,
            containerd_address: CONTAINERD_SOCKET.to_string(),
            image_service_path: CONTAINERD_SOCKET.to_string(),
            version: default_version(),
            resolver: Default::default(),
        }
    }
}

/// [`crate::release::DEFAULT_SOCI_VERSION`] as a [`Version`].
pub fn default_version() -> Version {
    crate::release::DEFAULT_SOCI_VERSION
        .parse()
        .expect("DEFAULT_SOCI_VERSION is MAJOR.MINOR.PATCH")
}

fn as_display<T: fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TuningError {
    #[error(
        "{per_image_flag} {per_image} exceeds {global_flag} {global}: SOCI refuses to start with a \
         per-image limit above a bounded global one (\"global {kind} limit less than per-image {kind} \
         limit\"); use {global} or less, or -1 (unbounded) for {global_flag}",
        kind = limit_kind(.global_flag)
    )]
    PerImageAboveGlobal {
        per_image_flag: &'static str,
        per_image: i64,
        global_flag: &'static str,
        global: i64,
    },
    #[error("{FLAG_CHUNK_SIZE} {value:?} is not a size SOCI accepts: {hint}")]
    BadChunkSize { value: String, hint: String },
    #[error("{FLAG_CHUNK_SIZE} {value:?} is too large: SOCI's limit is 8589934591gb (2^63 - 1 bytes)")]
    ChunkSizeTooLarge { value: String },
    #[error("[content_store] type {0:?} is unknown: the daemon accepts \"containerd\" or \"soci\"")]
    UnknownContentStore(String),
    #[error(
        "parallel pull/unpack mode needs [content_store] type = \"containerd\" or \
         discard_unpacked_layers = true ({FLAG_DISCARD_UNPACKED_LAYERS}); found type {} with \
         discard_unpacked_layers = false",
        show_store(.content_store_type)
    )]
    ContentStoreRule { content_store_type: String },
    #[error(
        "decompressor path {path:?} contains {chars}: SOCI refuses any of {DECOMPRESSOR_FORBIDDEN_CHARS} \
         in a decompressor path (\"path contains invalid characters\") and does not start; install or \
         link the binary at a plain path such as /usr/bin/unpigz"
    )]
    DecompressorForbiddenChars { path: String, chars: String },
    #[error(
        "decompressor path {0:?} must be absolute, e.g. /usr/bin/unpigz (soci-agent's own rule: SOCI \
         would resolve a relative path against its working directory)"
    )]
    RelativeDecompressor(String),
    #[error("SOCI {0} has no parallel pull/unpack mode: use {MIN_SOCI_VERSION} or newer (--soci-version)")]
    NoParallelMode(Version),
    #[error(
        "SOCI {version} does not read {key} (added in {since}): use --soci-version {since} or newer, or \
         leave the setting at the daemon's default"
    )]
    KeyNotRead {
        key: String,
        version: Version,
        since: Version,
    },
}

/// "download" or "unpack", as the daemon's limit messages say.
fn limit_kind(global_flag: &str) -> &'static str {
    if global_flag == FLAG_MAX_UNPACKS {
        "unpack"
    } else {
        "download"
    }
}

fn show_store(t: &str) -> String {
    match t {
        "" => "\"\" (unset, so soci)".to_string(),
        t => format!("{t:?}"),
    }
}

/// The existing file is not TOML at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("SOCI config is not valid TOML: {0}")]
pub struct ParseError(pub String);

/// Checks the rules the daemon enforces, exactly as it does (upstream
/// `fs/adaptive_fetch_image_layers.go` `checkParallelPullUnpack`,
/// 0.11.0-0.16.1): any limit <= 0 (0, -1, -5) is unbounded, and the only
/// refused combination is a bounded global limit (> 0) with a per-image limit
/// above it; an unbounded per-image limit (<= 0) under a bounded global one
/// is accepted. Then the chunk size must match SOCI's grammar (0.11.x
/// silently ignored a bad one; soci-agent refuses it for every version).
pub fn validate(t: &Tuning) -> Result<(), TuningError> {
    let pairs = [
        (
            FLAG_MAX_DOWNLOADS,
            t.max_concurrent_downloads,
            FLAG_MAX_DOWNLOADS_PER_IMAGE,
            t.max_concurrent_downloads_per_image,
        ),
        (
            FLAG_MAX_UNPACKS,
            t.max_concurrent_unpacks,
            FLAG_MAX_UNPACKS_PER_IMAGE,
            t.max_concurrent_unpacks_per_image,
        ),
    ];
    for (global_flag, global, per_image_flag, per_image) in pairs {
        if global > 0 && per_image > global {
            return Err(TuningError::PerImageAboveGlobal {
                per_image_flag,
                per_image,
                global_flag,
                global,
            });
        }
    }
    parse_chunk_size(&t.concurrent_download_chunk_size).map(|_| ())
}

/// Parses a chunk size in SOCI's grammar
/// `(?i)^\s*(\d+(\.\d+)?)(\s*(gb|mb|kb|b)?)?\s*$` to bytes, with binary units
/// (kb = 1024) and fractions truncated as the daemon does. `None` means the
/// daemon's default, whole layers: the empty string, or a size of 0 bytes.
pub fn parse_chunk_size(s: &str) -> Result<Option<u64>, TuningError> {
    if s.is_empty() {
        return Ok(None);
    }
    let bad = || TuningError::BadChunkSize {
        value: s.to_string(),
        hint: chunk_size_hint(s),
    };
    let rest = trim_re2_space(s);
    let num_len = number_prefix_len(rest).ok_or_else(bad)?;
    let (num, unit) = rest.split_at(num_len);
    let multiplier: u64 = match trim_re2_space(unit).to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1 << 10,
        "mb" => 1 << 20,
        "gb" => 1 << 30,
        _ => return Err(bad()),
    };
    let bytes = num.parse::<f64>().map_err(|_| bad())? * multiplier as f64;
    // The daemon converts to int64; anything from 2^63 on overflows.
    if !bytes.is_finite() || bytes >= 9_223_372_036_854_775_808.0 {
        return Err(TuningError::ChunkSizeTooLarge { value: s.to_string() });
    }
    let bytes = bytes as u64;
    Ok((bytes > 0).then_some(bytes))
}

/// Go RE2's `\s`: tab, newline, form feed, carriage return, space.
fn is_re2_space(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\x0c' | '\r' | ' ')
}

fn trim_re2_space(s: &str) -> &str {
    s.trim_matches(is_re2_space)
}

/// Length of a leading `\d+(\.\d+)?`, if there is one.
fn number_prefix_len(s: &str) -> Option<usize> {
    let digits = |t: &str| t.bytes().take_while(u8::is_ascii_digit).count();
    let int = digits(s);
    if int == 0 {
        return None;
    }
    match s[int..].strip_prefix('.') {
        Some(frac) if digits(frac) > 0 => Some(int + 1 + digits(frac)),
        _ => Some(int),
    }
}

fn chunk_size_hint(s: &str) -> String {
    let t = trim_re2_space(s);
    if t.starts_with('-') {
        return "a chunk size cannot be negative; use \"\" to fetch whole layers".to_string();
    }
    if let Some(n) = number_prefix_len(t) {
        let (num, unit) = t.split_at(n);
        let unit = trim_re2_space(unit);
        let lower = unit.to_ascii_lowercase();
        let base = lower.trim_end_matches("ib").trim_end_matches('i');
        if matches!(base, "k" | "m" | "g") {
            return format!("use {num}{base}b (binary units; {unit} is not accepted by SOCI)");
        }
    }
    "expected a number and an optional unit b, kb, mb or gb (binary units), e.g. \"16mb\", \
     or \"\" for whole layers"
        .to_string()
}

/// Parallel mode needs the containerd content store or discarded layers
/// (the compare is case-sensitive, as the daemon's).
/// soci-agent always writes containerd; `doctor` checks files it finds.
pub fn check_content_store_rule(store_type: &str, discard: bool) -> Result<(), TuningError> {
    let content_store_type = store_type.to_string();
    match store_type {
        "containerd" => Ok(()),
        "" | "soci" if discard => Ok(()),
        "" | "soci" => Err(TuningError::ContentStoreRule { content_store_type }),
        other => Err(TuningError::UnknownContentStore(other.to_string())),
    }
}

/// The daemon's own path rule: none of [`DECOMPRESSOR_FORBIDDEN_CHARS`].
/// A relative path passes it (the daemon resolves it against its working
/// directory).
pub fn check_decompressor_chars(p: &str) -> Result<(), TuningError> {
    let mut chars: Vec<char> = p
        .chars()
        .filter(|c| DECOMPRESSOR_FORBIDDEN_CHARS.contains(*c))
        .collect();
    chars.dedup();
    if chars.is_empty() {
        return Ok(());
    }
    let chars = chars.iter().map(|c| format!("{c:?}")).collect::<Vec<_>>().join(", ");
    Err(TuningError::DecompressorForbiddenChars {
        path: p.to_string(),
        chars,
    })
}

/// [`check_decompressor_chars`] (the daemon's rule), then an absolute path
/// (soci-agent's own, stricter rule). Existence, not being a directory and
/// the exec bit need the filesystem and are the caller's.
pub fn validate_decompressor_path(p: &str) -> Result<(), TuningError> {
    check_decompressor_chars(p)?;
    if !p.starts_with('/') {
        return Err(TuningError::RelativeDecompressor(p.to_string()));
    }
    Ok(())
}

/// The target version has parallel mode, [`validate`],
/// [`validate_decompressor_path`], every key whose value matters is read by
/// the target version; then [`render`].
pub fn render_checked(cfg: &SociConfig) -> Result<String, TuningError> {
    if cfg.version < MIN_SOCI_VERSION {
        return Err(TuningError::NoParallelMode(cfg.version));
    }
    validate(&cfg.tuning)?;
    if let Some(gzip) = &cfg.gzip {
        validate_decompressor_path(&gzip.path)?;
    }
    for section in sections(cfg) {
        for line in section.lines.iter().filter(|l| l.needed) {
            let key = format!("{}.{}", section.table, line.key);
            if reads_key(cfg.version, &key) {
                continue;
            }
            if let Some(since) = first_version(&key) {
                return Err(TuningError::KeyNotRead {
                    key,
                    version: cfg.version,
                    since,
                });
            }
        }
    }
    Ok(render(cfg))
}

struct Line {
    key: &'static str,
    value: String,
    /// Leaving the key out would change what the daemon does (the value is
    /// not the daemon's default, or soci-agent depends on it).
    needed: bool,
}

struct Section {
    comment: Option<&'static str>,
    table: &'static str,
    lines: Vec<Line>,
}

/// What [`render`] writes, before filtering by version.
fn sections(cfg: &SociConfig) -> Vec<Section> {
    let mut out = vec![
        content_store_section(cfg),
        cri_keychain_section(cfg),
        parallel_section(&cfg.tuning),
    ];
    if let Some(gzip) = &cfg.gzip {
        out.push(gzip_section(gzip));
    }
    out
}

/// A string as a TOML value, quoted and escaped.
fn quote(s: &str) -> String {
    toml_edit::Value::from(s).to_string()
}

/// A [`Line`] from its parts.
fn line(key: &'static str, value: String, needed: bool) -> Line {
    Line { key, value, needed }
}

/// `[content_store]`: always the containerd store.
fn content_store_section(cfg: &SociConfig) -> Section {
    Section {
        comment: Some("# Parallel mode reads manifests from containerd's content store."),
        table: "content_store",
        lines: vec![
            line("type", quote("containerd"), true),
            line(
                "containerd_address",
                quote(&cfg.containerd_address),
                cfg.containerd_address != CONTAINERD_SOCKET,
            ),
        ],
    }
}

/// `[cri_keychain]`: the keychain on, serving the CRI image service.
fn cri_keychain_section(cfg: &SociConfig) -> Section {
    Section {
        comment: Some("# Serve the CRI image service so pulls keep kubelet's registry credentials."),
        table: "cri_keychain",
        lines: vec![
            line("enable_keychain", true.to_string(), true),
            line(
                "image_service_path",
                quote(&cfg.image_service_path),
                cfg.image_service_path != CONTAINERD_SOCKET,
            ),
        ],
    }
}

/// The parallel pull/unpack table: enabled, with every tuning key.
fn parallel_section(t: &Tuning) -> Section {
    let mut lines = vec![line("enable", true.to_string(), true)];
    lines.extend(download_lines(t));
    lines.extend(unpack_lines(t));
    Section {
        comment: Some("# Parallel pull/unpack: no lazy loading; limits are -1 (unbounded) or a count."),
        table: PARALLEL,
        lines,
    }
}

/// The download limits and chunk size of the parallel table.
fn download_lines(t: &Tuning) -> Vec<Line> {
    let chunk_needed = !matches!(parse_chunk_size(&t.concurrent_download_chunk_size), Ok(None));
    vec![
        line(
            "max_concurrent_downloads",
            t.max_concurrent_downloads.to_string(),
            t.max_concurrent_downloads > 0,
        ),
        line(
            "max_concurrent_downloads_per_image",
            t.max_concurrent_downloads_per_image.to_string(),
            t.max_concurrent_downloads_per_image != DAEMON_DOWNLOADS_PER_IMAGE,
        ),
        line(
            "concurrent_download_chunk_size",
            quote(&t.concurrent_download_chunk_size),
            chunk_needed,
        ),
    ]
}

/// The unpack limits and `discard_unpacked_layers` of the parallel table.
fn unpack_lines(t: &Tuning) -> Vec<Line> {
    vec![
        line(
            "max_concurrent_unpacks",
            t.max_concurrent_unpacks.to_string(),
            t.max_concurrent_unpacks > 0,
        ),
        line(
            "max_concurrent_unpacks_per_image",
            t.max_concurrent_unpacks_per_image.to_string(),
            t.max_concurrent_unpacks_per_image != DAEMON_UNPACKS_PER_IMAGE,
        ),
        line(
            "discard_unpacked_layers",
            t.discard_unpacked_layers.to_string(),
            t.discard_unpacked_layers,
        ),
    ]
}

/// The `decompress_streams.gzip` table for an external decompressor.
fn gzip_section(gzip: &Decompressor) -> Section {
    // Not needed: without it the daemon unpacks with Go's gzip.
    let args = toml_edit::Value::from(gzip.args.iter().collect::<Array>()).to_string();
    Section {
        comment: None,
        table: "pull_modes.parallel_pull_unpack.decompress_streams.gzip",
        lines: vec![line("path", quote(&gzip.path), false), line("args", args, false)],
    }
}

/// Renders the complete `config.toml`: deterministic, every tuning key
/// written explicitly, but only keys `cfg.version` reads (a table left
/// without keys is left out). Does not validate (use [`render_checked`],
/// which also refuses a version that lacks a key whose value matters).
pub fn render(cfg: &SociConfig) -> String {
    let mut out = format!("{HEADER}\n");
    for section in sections(cfg) {
        let lines: Vec<&Line> = section
            .lines
            .iter()
            .filter(|l| reads_key(cfg.version, &format!("{}.{}", section.table, l.key)))
            .collect();
        if lines.is_empty() {
            continue;
        }
        out.push('\n');
        if let Some(comment) = section.comment {
            out += comment;
            out.push('\n');
        }
        out += &format!("[{}]\n", section.table);
        for l in lines {
            out += &format!("{} = {}\n", l.key, l.value);
        }
    }
    out + &resolver_tables(&cfg.resolver)
}

/// `[[resolver.host."REGISTRY".mirrors]]` for each registry's mirrors.
fn resolver_tables(resolver: &std::collections::BTreeMap<String, Vec<SociMirror>>) -> String {
    let mut out = String::new();
    if resolver.is_empty() {
        return out;
    }
    out += "\n# From containerd's hosts.toml: SOCI resolves manifests through these hosts (insecure = plain\n\
            # HTTP). In parallel mode it fetches layers from the image's own registry.\n";
    for (registry, mirrors) in resolver {
        for m in mirrors {
            out += &format!("[[resolver.host.{}.mirrors]]\n", quote(registry));
            out += &format!("host = {}\ninsecure = {}\n", quote(&m.host), m.insecure);
        }
    }
    out
}

/// `0.MINOR.PATCH`.
const fn v0(minor: u32, patch: u32) -> Version {
    Version { major: 0, minor, patch }
}

/// A key the daemon reads, and the first release that reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnownKey {
    /// Dotted path. A bare segment is a struct field (matched
    /// case-insensitively, as go-toml v2 does); a quoted one (`"gzip"`) is a
    /// map key, matched exactly; `*` is any map key.
    pub path: &'static str,
    /// First release that reads the key, from 0.11.0 on (the oldest release
    /// with parallel mode, [`MIN_SOCI_VERSION`]): a key older than 0.11.0
    /// says 0.11.0. No key was renamed or removed in 0.11.0-0.16.1.
    pub since: Version,
}

/// `first_version => { "table." => ["key", ...], ... }` to [`KnownKey`]s.
macro_rules! keys {
    ($($since:expr => { $($table:literal => [$($key:literal),* $(,)?],)* },)*) => {
        &[$($($(KnownKey { path: concat!($table, $key), since: $since },)*)*)*]
    };
}

/// Every key SOCI 0.11.0-0.16.1 reads, with the first release that reads it.
/// Read from the structs and `toml:` tags in upstream `config/*.go`
/// (`config.go`, `service.go`, `fs.go`, `resolver.go`, `pull_modes.go`,
/// `parallel.go`) at v0.11.0, v0.11.1, v0.12.0, v0.12.1, v0.13.0, v0.14.0,
/// v0.14.1, v0.15.0, v0.16.0 and v0.16.1. Embedded structs without a tag are
/// flattened; fields without a tag use the Go field name (`[http]`).
pub const KNOWN_KEYS: &[KnownKey] = keys! {
    v0(11, 0) => {
        "" => [
            "debug", "metrics_address", "metrics_network", "no_prometheus", "debug_address",
            "metadata_store", "skip_check_snapshotter_supported", "max_concurrency",
            // FSConfig, embedded at the top level.
            "http_cache_type", "filesystem_cache_type", "resolve_result_entry",
            "disable_verification", "mount_timeout_sec", "fuse_metrics_emit_wait_duration_sec",
        ],
        "content_store." => ["type", "containerd_address"],
        "pull_modes.soci_v1." => ["enable"],
        "pull_modes.soci_v2." => ["enable"],
        "pull_modes.parallel_pull_unpack." => [
            "enable", "max_concurrent_downloads", "max_concurrent_downloads_per_image",
            "concurrent_download_chunk_size", "max_concurrent_unpacks",
            "max_concurrent_unpacks_per_image", "discard_unpacked_layers",
        ],
        // A map; the daemon uses only these two names (others: a warning at start).
        "pull_modes.parallel_pull_unpack.decompress_streams.\"gzip\"." => ["path", "args"],
        "pull_modes.parallel_pull_unpack.decompress_streams.\"zstd\"." => ["path", "args"],
        "cri_keychain." => ["enable_keychain", "image_service_path"],
        "kubeconfig_keychain." => ["enable_keychain", "kubeconfig_path"],
        "resolver.host.*.mirrors." => ["host", "insecure", "request_timeout_sec"],
        "snapshotter." => ["min_layer_size", "allow_invalid_mounts_on_restart"],
        // Go field names without toml tags.
        "http." => [
            "MaxRetries", "MinWaitMsec", "MaxWaitMsec", "DialTimeoutMsec",
            "ResponseHeaderTimeoutMsec", "RequestTimeoutMsec",
        ],
        "blob." => [
            "valid_interval", "check_always", "fetching_timeout_sec", "force_single_range_mode",
            "max_retries", "min_wait_msec", "max_wait_msec", "max_span_verification_retries",
        ],
        "directory_cache." => ["max_lru_cache_entry", "max_cache_fds", "sync_add", "direct"],
        "fuse." => ["attr_timeout", "entry_timeout", "negative_timeout", "log_fuse_operations"],
        "background_fetch." => [
            "disable", "silence_period_msec", "fetch_period_msec", "max_queue_size",
            "emit_metric_period_sec",
        ],
    },
    v0(13, 0) => {
        "prefetch." => ["enable", "max_concurrency"],
    },
    v0(14, 0) => {
        "pull_modes.parallel_pull_unpack." => ["experimental_parallel_pull_as_fallback"],
    },
    v0(15, 0) => {
        "" => ["metadata_db_no_sync", "metadata_insertion_chunk_size"],
        "background_fetch." => ["drop_policy"],
        "resolver." => ["auth_client_ttl_sec", "enable_auth_client_sharing"],
    },
    v0(16, 0) => {
        "resolver." => ["custom_headers"],
    },
};

/// One segment of a dotted path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seg<'a> {
    /// A struct field: matched case-insensitively.
    Field(&'a str),
    /// A map key: matched exactly.
    MapKey(&'a str),
    /// Any map key.
    AnyMapKey,
}

impl Seg<'_> {
    /// Whether a key as written in a file selects this segment.
    fn matches(&self, key: &str) -> bool {
        match self {
            Seg::Field(name) => fold_eq(name, key),
            Seg::MapKey(name) => *name == key,
            Seg::AnyMapKey => true,
        }
    }

    fn text(&self) -> &str {
        match self {
            Seg::Field(s) | Seg::MapKey(s) => s,
            Seg::AnyMapKey => "*",
        }
    }
}

/// Splits a dotted path; a `"quoted"` segment (which may hold dots) is a
/// map key, `*` any map key, anything else a field name.
fn split_dotted(path: &str) -> Vec<Seg<'_>> {
    let mut out = Vec::new();
    let mut rest = path;
    loop {
        let (seg, after) = match rest.strip_prefix('"') {
            Some(quoted) => {
                let end = quoted.find('"').unwrap_or(quoted.len());
                (Seg::MapKey(&quoted[..end]), quoted.get(end + 1..).unwrap_or(""))
            }
            None => {
                let end = rest.find('.').unwrap_or(rest.len());
                let seg = match &rest[..end] {
                    "*" => Seg::AnyMapKey,
                    s => Seg::Field(s),
                };
                (seg, &rest[end..])
            }
        };
        out.push(seg);
        match after.strip_prefix('.') {
            Some(next) => rest = next,
            None => return out,
        }
    }
}

/// go-toml v2's case folding (Go `strings.ToLower`) as far as it can make a
/// key equal an ASCII field name: ASCII letters, KELVIN SIGN (U+212A) to `k`
/// and LATIN CAPITAL LETTER I WITH DOT ABOVE (U+0130) to `i`.
fn fold(c: char) -> char {
    match c {
        '\u{212A}' => 'k',
        '\u{0130}' => 'i',
        c => c.to_ascii_lowercase(),
    }
}

/// Case-insensitive key comparison as the daemon's TOML decoder does it.
fn fold_eq(a: &str, b: &str) -> bool {
    a.chars().map(fold).eq(b.chars().map(fold))
}

struct Known {
    segs: Vec<Seg<'static>>,
    since: Version,
}

fn known() -> Vec<Known> {
    KNOWN_KEYS
        .iter()
        .map(|k| Known {
            segs: split_dotted(k.path),
            since: k.since,
        })
        .collect()
}

/// The first release that reads `path` (a key, or a table: its oldest key),
/// `None` for a path no release reads. `path` is dotted; quote a map key
/// that holds dots (`resolver.host."r.example.com".mirrors.host`). Field
/// names match case-insensitively, map keys (`decompress_streams.gzip`) exactly.
pub fn first_version(path: &str) -> Option<Version> {
    let want = split_dotted(path);
    known()
        .into_iter()
        .filter(|k| k.segs.len() >= want.len() && want.iter().zip(&k.segs).all(|(w, s)| s.matches(w.text())))
        .map(|k| k.since)
        .min()
}

/// Whether SOCI `version` reads the key (or table) at `path` (see
/// [`first_version`]). Pure; false for releases before 0.11.0, which the
/// table does not cover.
pub fn reads_key(version: Version, path: &str) -> bool {
    first_version(path).is_some_and(|since| since <= version)
}

/// A known key that the target release does not read yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct NotRead {
    /// The release the file is checked against.
    #[serde(serialize_with = "as_display")]
    pub target: Version,
    /// The first release that reads the key.
    #[serde(serialize_with = "as_display")]
    pub added_in: Version,
}

/// A key (or a whole table) the daemon would silently ignore.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UnknownKey {
    /// Dotted path as found, e.g. `pull_modes.parallel_pull_unpack.max_concurent_downloads`.
    pub path: String,
    /// A known key name in the same table within edit distance 2, or the full
    /// dotted path when the same name belongs in another table.
    pub suggestion: Option<String>,
    /// Set when the key is known, but only to releases after the target one.
    pub not_read: Option<NotRead>,
}

impl fmt::Display for UnknownKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.not_read, &self.suggestion) {
            (Some(n), _) => write!(
                f,
                "{}: not read by SOCI {} (added in {})",
                self.path, n.target, n.added_in
            ),
            (None, Some(s)) => write!(f, "{} (did you mean {s}?)", self.path),
            (None, None) => f.write_str(&self.path),
        }
    }
}

/// Finds keys and tables every SOCI release from 0.11.0 on would ignore, in
/// file order. An unknown table is reported once, not key by key.
pub fn unknown_keys(text: &str) -> Result<Vec<UnknownKey>, ParseError> {
    unknown_keys_for(text, None)
}

/// [`unknown_keys`] for one release: with `Some(version)`, a key only later
/// releases read is reported too, with [`UnknownKey::not_read`] set, and
/// suggestions name only keys that release reads. A version before 0.11.0
/// (outside the table) is treated as `None`.
pub fn unknown_keys_for(text: &str, version: Option<Version>) -> Result<Vec<UnknownKey>, ParseError> {
    let doc = parse(text)?;
    let version = version.filter(|v| *v >= MIN_SOCI_VERSION);
    let known = known();
    let refs: Vec<&Known> = known.iter().collect();
    let mut out = Vec::new();
    walk(doc.as_table(), &mut Vec::new(), &refs, version, &mut out);
    Ok(out)
}

/// `known` holds the known paths under `path`.
fn walk(
    table: &dyn TableLike,
    path: &mut Vec<String>,
    known: &[&Known],
    version: Option<Version>,
    out: &mut Vec<UnknownKey>,
) {
    let depth = path.len();
    for (key, item) in table.iter() {
        path.push(key.to_string());
        let under: Vec<&Known> = known.iter().copied().filter(|k| k.segs[depth].matches(key)).collect();
        let read: Vec<&Known> = under
            .iter()
            .copied()
            .filter(|k| version.is_none_or(|v| k.since <= v))
            .collect();
        let found = |suggestion, not_read| UnknownKey {
            path: path.join("."),
            suggestion,
            not_read,
        };
        if under.is_empty() {
            report(out, found(suggest(known, depth, key, version), None));
        } else if read.is_empty() {
            let added_in = under.iter().map(|k| k.since).min();
            let not_read = version
                .zip(added_in)
                .map(|(target, added_in)| NotRead { target, added_in });
            report(out, found(None, not_read));
        } else if under.iter().all(|k| k.segs.len() > depth + 1) {
            // All versions below: a deeper key may be one this version lacks.
            for sub in tables_in(item) {
                walk(sub, path, &under, version, out);
            }
        }
        path.pop();
    }
}

fn report(out: &mut Vec<UnknownKey>, k: UnknownKey) {
    if !out.iter().any(|o| o.path == k.path) {
        out.push(k);
    }
}

/// A table, or each table of an array of tables (`mirrors`).
fn tables_in(item: &Item) -> Vec<&dyn TableLike> {
    if let Some(t) = item.as_table_like() {
        return vec![t];
    }
    if let Some(a) = item.as_array_of_tables() {
        return a.iter().map(|t| t as &dyn TableLike).collect();
    }
    match item.as_array() {
        Some(a) => a
            .iter()
            .filter_map(|v| v.as_inline_table())
            .map(|t| t as &dyn TableLike)
            .collect(),
        None => Vec::new(),
    }
}

/// The nearest sibling name within edit distance 2, else the full path of a
/// known key with this exact name in another table (only keys `version` reads).
fn suggest(siblings: &[&Known], depth: usize, key: &str, version: Option<Version>) -> Option<String> {
    let readable = |since: Version| version.is_none_or(|v| since <= v);
    let lower: String = key.chars().map(fold).collect();
    let distance = |name: &str| edit_distance(&lower, &name.chars().map(fold).collect::<String>());
    let nearest = siblings
        .iter()
        .filter(|k| readable(k.since) && k.segs[depth] != Seg::AnyMapKey)
        .map(|k| k.segs[depth].text())
        .filter(|name| distance(name) <= 2)
        .min_by_key(|name| distance(name));
    let elsewhere = || {
        KNOWN_KEYS
            .iter()
            .filter(|k| readable(k.since))
            .find(|k| k.path.rsplit('.').next().is_some_and(|n| fold_eq(n, key)))
            .map(|k| k.path.to_string())
    };
    nearest.map(str::to_string).or_else(elsewhere)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn parse(text: &str) -> Result<DocumentMut, ParseError> {
    text.parse::<DocumentMut>()
        .map_err(|e| ParseError(e.to_string().trim_end().to_string()))
}

/// Every item at dotted `path` under `root`, in document order, matched as
/// the daemon matches keys: field names case-insensitively, quoted map keys
/// (`decompress_streams."gzip"`) exactly. Several items appear when a file
/// spells a key in more than one case (`enable` and `Enable`).
pub fn lookup_all<'a>(root: &'a Item, path: &str) -> Vec<&'a Item> {
    fn collect<'a>(item: &'a Item, segs: &[Seg<'_>], out: &mut Vec<&'a Item>) {
        let Some((seg, rest)) = segs.split_first() else {
            out.push(item);
            return;
        };
        if let Some(t) = item.as_table_like() {
            for (k, child) in t.iter() {
                if seg.matches(k) {
                    collect(child, rest, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    collect(root, &split_dotted(path), &mut out);
    out
}

/// The value the daemon ends up with at `path` (see [`lookup_all`]): the
/// last one in the file wins, as in go-toml v2.
pub fn lookup<'a>(root: &'a Item, path: &str) -> Option<&'a Item> {
    lookup_all(root, path).pop()
}

/// Reads a file back into the config soci-agent would have rendered for it:
/// `Some` only when the content store is containerd, the keychain and
/// parallel mode are enabled and every tuning key is present with its type
/// (the effective tuning for `doctor`); `None` for any other shape. Keys
/// match as the daemon matches them ([`lookup`]). The file does not say which
/// release it is for: `version` is [`default_version`].
pub fn read_back(text: &str) -> Result<Option<SociConfig>, ParseError> {
    Ok(read_doc(parse(text)?.as_item()))
}

fn read_doc(doc: &Item) -> Option<SociConfig> {
    let string = |item: &Item, key: &str| lookup(item, key)?.as_str().map(str::to_string);
    let on = |key: &str| lookup(doc, key)?.as_bool();
    let int = |key: &str| lookup(doc, &format!("{PARALLEL}.{key}"))?.as_integer();
    let ours = string(doc, "content_store.type")? == "containerd"
        && on("cri_keychain.enable_keychain")?
        && on(&format!("{PARALLEL}.enable"))?;
    if !ours {
        return None;
    }
    let strings = |item: &Item| {
        item.as_array()?
            .iter()
            .map(|a| a.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
    };
    let gzip = match lookup(doc, &format!("{PARALLEL}.decompress_streams.\"gzip\"")) {
        None => None,
        Some(gz) => Some(Decompressor {
            path: string(gz, "path")?,
            args: strings(lookup(gz, "args")?)?,
        }),
    };
    let tuning = Tuning {
        max_concurrent_downloads: int("max_concurrent_downloads")?,
        max_concurrent_downloads_per_image: int("max_concurrent_downloads_per_image")?,
        concurrent_download_chunk_size: string(doc, &format!("{PARALLEL}.concurrent_download_chunk_size"))?,
        max_concurrent_unpacks: int("max_concurrent_unpacks")?,
        max_concurrent_unpacks_per_image: int("max_concurrent_unpacks_per_image")?,
        discard_unpacked_layers: on(&format!("{PARALLEL}.discard_unpacked_layers"))?,
    };
    Some(SociConfig {
        tuning,
        gzip,
        containerd_address: string(doc, "content_store.containerd_address")?,
        image_service_path: string(doc, "cri_keychain.image_service_path")?,
        version: default_version(),
        resolver: read_resolver(doc),
    })
}

/// The `[[resolver.host."REGISTRY".mirrors]]` tables.
fn read_resolver(doc: &Item) -> std::collections::BTreeMap<String, Vec<SociMirror>> {
    let Some(hosts) = doc
        .get("resolver")
        .and_then(|r| r.get("host"))
        .and_then(Item::as_table_like)
    else {
        return Default::default();
    };
    let mirrors = |item: &Item| -> Vec<SociMirror> {
        let Some(tables) = item.get("mirrors").and_then(Item::as_array_of_tables) else {
            return Vec::new();
        };
        let each = tables.iter().filter_map(|t| {
            Some(SociMirror {
                host: t.get("host")?.as_str()?.to_string(),
                insecure: t.get("insecure").and_then(Item::as_bool).unwrap_or(false),
            })
        });
        each.collect()
    };
    hosts
        .iter()
        .map(|(registry, item)| (registry.to_string(), mirrors(item)))
        .filter(|(_, m)| !m.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_helpers() {
        assert_eq!(number_prefix_len("1.5 GB"), Some(3));
        assert_eq!(number_prefix_len("1.mb"), Some(1));
        assert_eq!(number_prefix_len(".5"), None);
        assert_eq!(trim_re2_space("\t\x0c 16mb\r\n"), "16mb");
        assert_eq!(trim_re2_space("\u{0b}16mb"), "\u{0b}16mb"); // RE2's \s has no \v
        assert_eq!(edit_distance("max_concurent_downloads", "max_concurrent_downloads"), 1);
        assert_eq!(edit_distance("gzp", "gzip"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(
            chunk_size_hint("8 Ki"),
            "use 8kb (binary units; Ki is not accepted by SOCI)"
        );
    }

    #[test]
    fn folding_matches_go_toml() {
        assert!(fold_eq("enable", "Enable"));
        assert!(fold_eq("enable_keychain", "ENABLE_KEYCHAIN"));
        // Go's strings.ToLower maps these two to ASCII (checked against go-toml v2.4.3).
        assert!(fold_eq("enable_keychain", "enable_\u{212A}eychain"));
        assert!(fold_eq("enable_keychain", "enable_keycha\u{0130}n"));
        assert!(!fold_eq("enable_keychain", "enable_keycha\u{0131}n"));
        assert!(!fold_eq("enable", "enabl"));
        assert!(Seg::Field("enable").matches("ENABLE"));
        assert!(!Seg::MapKey("gzip").matches("GZIP"));
        assert!(Seg::AnyMapKey.matches("anything"));
    }

    #[test]
    fn dotted_paths_split() {
        use Seg::{AnyMapKey, Field, MapKey};
        assert_eq!(split_dotted("a.b"), [Field("a"), Field("b")]);
        assert_eq!(
            split_dotted("resolver.host.\"r.example.com\".mirrors"),
            [
                Field("resolver"),
                Field("host"),
                MapKey("r.example.com"),
                Field("mirrors")
            ]
        );
        assert_eq!(split_dotted("x.*.y"), [Field("x"), AnyMapKey, Field("y")]);
        assert_eq!(split_dotted("\"gzip\""), [MapKey("gzip")]);
    }

    #[test]
    fn limits_follow_the_daemon() {
        let t = |dl: i64, dl_img: i64, up: i64, up_img: i64| Tuning {
            max_concurrent_downloads: dl,
            max_concurrent_downloads_per_image: dl_img,
            max_concurrent_unpacks: up,
            max_concurrent_unpacks_per_image: up_img,
            ..Tuning::default()
        };
        for v in [0, -1, -5, i64::MIN] {
            assert_eq!(validate(&t(v, v, v, v)), Ok(()), "{v}");
            assert_eq!(validate(&t(v, 1000, v, 1000)), Ok(()), "{v}");
            // An unbounded per-image limit under a bounded global one is accepted.
            assert_eq!(validate(&t(4, v, 4, v)), Ok(()), "{v}");
        }
        assert_eq!(validate(&t(4, 4, 1, 1)), Ok(()));
        let err = validate(&t(4, 8, -1, 1)).unwrap_err();
        assert!(matches!(
            err,
            TuningError::PerImageAboveGlobal {
                per_image: 8,
                global: 4,
                ..
            }
        ));
        assert!(
            err.to_string()
                .contains("global download limit less than per-image download limit")
        );
        let err = validate(&t(-1, 3, 2, 3)).unwrap_err();
        assert!(
            err.to_string()
                .contains("global unpack limit less than per-image unpack limit")
        );
        assert!(
            err.to_string()
                .starts_with("--max-concurrent-unpacks-per-image 3 exceeds --max-concurrent-unpacks 2")
        );
    }

    #[test]
    fn decompressor_chars() {
        for c in DECOMPRESSOR_FORBIDDEN_CHARS.chars() {
            let p = format!("/usr/bin/un{c}pigz");
            assert!(
                matches!(
                    validate_decompressor_path(&p),
                    Err(TuningError::DecompressorForbiddenChars { .. })
                ),
                "{p}"
            );
            // The daemon's rule applies to relative paths too.
            assert!(check_decompressor_chars(&format!("bin/{c}")).is_err());
        }
        assert_eq!(check_decompressor_chars("bin/unpigz"), Ok(()));
        assert_eq!(validate_decompressor_path("/opt/un pigz (1)/x-y_z.+@!~"), Ok(()));
    }

    #[test]
    fn version_table() {
        let releases = [v0(11, 0), v0(13, 0), v0(14, 0), v0(15, 0), v0(16, 0)];
        for k in KNOWN_KEYS {
            assert!(releases.contains(&k.since), "{}: {}", k.path, k.since);
            assert_eq!(first_version(k.path), Some(k.since), "{}", k.path);
        }
        assert_eq!(first_version("prefetch"), Some(v0(13, 0)));
        assert_eq!(first_version("resolver"), Some(v0(11, 0)));
        assert_eq!(first_version("Resolver.Custom_Headers"), Some(v0(16, 0)));
        assert_eq!(
            first_version("pull_modes.parallel_pull_unpack.decompress_streams.gzip.path"),
            Some(v0(11, 0))
        );
        assert_eq!(
            first_version("pull_modes.parallel_pull_unpack.decompress_streams.GZIP.path"),
            None
        );
        assert_eq!(
            first_version("resolver.host.\"r.example.com\".mirrors.insecure"),
            Some(v0(11, 0))
        );
        assert_eq!(first_version("nope"), None);
        assert!(reads_key(
            v0(14, 1),
            "pull_modes.parallel_pull_unpack.experimental_parallel_pull_as_fallback"
        ));
        assert!(!reads_key(
            v0(13, 0),
            "pull_modes.parallel_pull_unpack.experimental_parallel_pull_as_fallback"
        ));
        assert!(!reads_key(v0(10, 0), "debug"));
        assert_eq!(default_version(), v0(16, 1));
    }

    #[test]
    fn render_below_parallel_mode() {
        let old = SociConfig {
            version: v0(10, 0),
            ..SociConfig::default()
        };
        assert_eq!(render(&old), format!("{HEADER}\n"));
        assert_eq!(render_checked(&old), Err(TuningError::NoParallelMode(v0(10, 0))));
    }
}
