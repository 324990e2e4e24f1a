//! The SOCI snapshotter's `config.toml` with parallel pull/unpack mode on:
//! operator tuning, the rules the daemon enforces (checked before anything is
//! written), rendering, and reading an existing file back for `doctor`.
//! Pure; no I/O.
//!
//! The daemon silently ignores unknown keys, so a typo is never reported by
//! it: [`unknown_keys`] does that. It also refuses to start on some
//! combinations: [`validate`] and [`check_content_store_rule`] catch them.
//! Parallel mode needs `[content_store] type = "containerd"` or
//! `discard_unpacked_layers = true`; [`render`] always writes containerd.

use toml_edit::{Array, DocumentMut, Item, TableLike};

/// Where the daemon reads its configuration by default.
pub const CONFIG_PATH: &str = "/etc/soci-snapshotter-grpc/config.toml";
/// containerd's socket; default for both `containerd_address` and `image_service_path`.
pub const DEFAULT_CONTAINERD_ADDRESS: &str = "/run/containerd/containerd.sock";
/// First line of every rendered file (fixed, so output is deterministic).
pub const HEADER: &str = "# Written by soci-agent; changes are overwritten on the next install.";

pub const FLAG_MAX_DOWNLOADS: &str = "--max-concurrent-downloads";
pub const FLAG_MAX_DOWNLOADS_PER_IMAGE: &str = "--max-concurrent-downloads-per-image";
pub const FLAG_CHUNK_SIZE: &str = "--concurrent-download-chunk-size";
pub const FLAG_MAX_UNPACKS: &str = "--max-concurrent-unpacks";
pub const FLAG_MAX_UNPACKS_PER_IMAGE: &str = "--max-concurrent-unpacks-per-image";
pub const FLAG_DISCARD_UNPACKED_LAYERS: &str = "--discard-unpacked-layers";

const PARALLEL: [&str; 2] = ["pull_modes", "parallel_pull_unpack"];

/// Operator tuning; defaults = the EKS AMI's published values (soci.md "Tuning references").
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Tuning {
    /// Global download limit; -1 = unbounded.
    pub max_concurrent_downloads: i64,
    pub max_concurrent_downloads_per_image: i64,
    /// SOCI size grammar, e.g. "16mb"; "" = whole layers.
    pub concurrent_download_chunk_size: String,
    /// Global unpack limit; -1 = unbounded.
    pub max_concurrent_unpacks: i64,
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
}

impl Default for SociConfig {
    fn default() -> Self {
        SociConfig {
            tuning: Tuning::default(),
            gzip: None,
            containerd_address: DEFAULT_CONTAINERD_ADDRESS.to_string(),
            image_service_path: DEFAULT_CONTAINERD_ADDRESS.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TuningError {
    #[error("{flag} {value} is not a valid limit: use -1 for unbounded or a count of 1 or more")]
    BadLimit { flag: &'static str, value: i64 },
    #[error(
        "{per_image_flag} {} exceeds {global_flag} {global}: the daemon refuses a per-image \
         limit above a global limit (use {global} or less)",
        show_limit(*.per_image)
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
    #[error("decompressor path {0:?} must be absolute, e.g. /usr/bin/unpigz")]
    RelativeDecompressor(String),
}

fn show_limit(v: i64) -> String {
    match v {
        -1 => "-1 (unbounded)".to_string(),
        v => v.to_string(),
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

/// Checks the rules the daemon enforces (or that make a value meaningless):
/// every limit is -1 (unbounded) or >= 1; a per-image limit is at most its
/// bounded global limit (an unbounded per-image limit under a bounded global
/// one counts as above it); the chunk size matches SOCI's grammar.
pub fn validate(t: &Tuning) -> Result<(), TuningError> {
    use TuningError::{BadLimit, PerImageAboveGlobal};
    let downloads = (FLAG_MAX_DOWNLOADS, t.max_concurrent_downloads);
    let downloads_per_image = (FLAG_MAX_DOWNLOADS_PER_IMAGE, t.max_concurrent_downloads_per_image);
    let unpacks = (FLAG_MAX_UNPACKS, t.max_concurrent_unpacks);
    let unpacks_per_image = (FLAG_MAX_UNPACKS_PER_IMAGE, t.max_concurrent_unpacks_per_image);
    for (flag, value) in [downloads, downloads_per_image, unpacks, unpacks_per_image] {
        if value != -1 && value < 1 {
            return Err(BadLimit { flag, value });
        }
    }
    for ((global_flag, global), (per_image_flag, per_image)) in
        [(downloads, downloads_per_image), (unpacks, unpacks_per_image)]
    {
        if global != -1 && (per_image == -1 || per_image > global) {
            return Err(PerImageAboveGlobal {
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

/// Parallel mode needs the containerd content store or discarded layers.
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

/// Existence and executability need the filesystem and are the caller's.
pub fn validate_decompressor_path(p: &str) -> Result<(), TuningError> {
    let absolute = p.starts_with('/');
    absolute
        .then_some(())
        .ok_or_else(|| TuningError::RelativeDecompressor(p.to_string()))
}

/// [`validate`] and [`validate_decompressor_path`], then [`render`].
pub fn render_checked(cfg: &SociConfig) -> Result<String, TuningError> {
    validate(&cfg.tuning)?;
    if let Some(gzip) = &cfg.gzip {
        validate_decompressor_path(&gzip.path)?;
    }
    Ok(render(cfg))
}

/// Renders the complete `config.toml`: deterministic, every tuning key
/// written explicitly. Does not validate (use [`render_checked`]).
pub fn render(cfg: &SociConfig) -> String {
    let t = &cfg.tuning;
    let quote = |s: &str| toml_edit::Value::from(s).to_string();
    let mut out = format!(
        "{HEADER}

# Parallel mode reads manifests from containerd's content store.
[content_store]
type = \"containerd\"
containerd_address = {containerd_address}

# Serve the CRI image service so pulls keep kubelet's registry credentials.
[cri_keychain]
enable_keychain = true
image_service_path = {image_service_path}

# Parallel pull/unpack: no lazy loading; limits are -1 (unbounded) or a count.
[pull_modes.parallel_pull_unpack]
enable = true
max_concurrent_downloads = {}
max_concurrent_downloads_per_image = {}
concurrent_download_chunk_size = {chunk_size}
max_concurrent_unpacks = {}
max_concurrent_unpacks_per_image = {}
discard_unpacked_layers = {}
",
        t.max_concurrent_downloads,
        t.max_concurrent_downloads_per_image,
        t.max_concurrent_unpacks,
        t.max_concurrent_unpacks_per_image,
        t.discard_unpacked_layers,
        containerd_address = quote(&cfg.containerd_address),
        image_service_path = quote(&cfg.image_service_path),
        chunk_size = quote(&t.concurrent_download_chunk_size),
    );
    if let Some(gzip) = &cfg.gzip {
        let args = toml_edit::Value::from(gzip.args.iter().collect::<Array>());
        let path = quote(&gzip.path);
        let table = "[pull_modes.parallel_pull_unpack.decompress_streams.gzip]";
        out += &format!("\n{table}\npath = {path}\nargs = {args}\n");
    }
    out
}

/// Dotted paths from a table prefix and its key names.
macro_rules! keys {
    ($($table:literal => [$($key:literal),* $(,)?],)*) => { &[$($(concat!($table, $key),)*)*] };
}

/// Every key the daemon knows, as dotted paths, read from the structs in
/// upstream `config/*.go` (parallel mode as of v0.14+). Keys match
/// case-insensitively, as go-toml does. A
/// table listed by itself (`resolver`, registry host maps) is accepted with
/// its whole subtree unvalidated.
pub const KNOWN_KEYS: &[&str] = keys! {
    "" => [
        "debug", "metrics_address", "metrics_network", "no_prometheus", "debug_address",
        "metadata_store", "skip_check_snapshotter_supported", "max_concurrency",
        // FSConfig, embedded at the top level.
        "http_cache_type", "filesystem_cache_type", "resolve_result_entry",
        "disable_verification", "mount_timeout_sec", "fuse_metrics_emit_wait_duration_sec",
        "resolver", // registry host maps: the whole subtree, unvalidated
    ],
    "content_store." => ["type", "containerd_address"],
    "pull_modes.soci_v1." => ["enable"],
    "pull_modes.soci_v2." => ["enable"],
    "pull_modes.parallel_pull_unpack." => [
        "enable", "max_concurrent_downloads", "max_concurrent_downloads_per_image",
        "concurrent_download_chunk_size", "max_concurrent_unpacks",
        "max_concurrent_unpacks_per_image", "discard_unpacked_layers",
        "experimental_parallel_pull_as_fallback", // v0.14.0+
    ],
    "pull_modes.parallel_pull_unpack.decompress_streams.gzip." => ["path", "args"],
    "pull_modes.parallel_pull_unpack.decompress_streams.zstd." => ["path", "args"],
    "cri_keychain." => ["enable_keychain", "image_service_path"],
    "kubeconfig_keychain." => ["enable_keychain", "kubeconfig_path"],
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
};

/// A key (or a whole table) the daemon would silently ignore.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UnknownKey {
    /// Dotted path as found, e.g. `pull_modes.parallel_pull_unpack.max_concurent_downloads`.
    pub path: String,
    /// A known key name in the same table within edit distance 2, or the full
    /// dotted path when the same name belongs in another table.
    pub suggestion: Option<String>,
}

/// Finds keys and tables the daemon would ignore, in file order. An unknown
/// table is reported once, not key by key.
pub fn unknown_keys(text: &str) -> Result<Vec<UnknownKey>, ParseError> {
    let doc = parse(text)?;
    let known: Vec<KnownPath> = KNOWN_KEYS.iter().map(|k| k.split('.').collect()).collect();
    let mut out = Vec::new();
    walk(doc.as_table(), &mut Vec::new(), &known, &mut out);
    Ok(out)
}

type KnownPath = Vec<&'static str>;

/// `known` holds the known paths under `path`.
fn walk(table: &dyn TableLike, path: &mut Vec<String>, known: &[KnownPath], out: &mut Vec<UnknownKey>) {
    let depth = path.len();
    for (key, item) in table.iter() {
        let under: Vec<KnownPath> = known
            .iter()
            .filter(|k| k[depth].eq_ignore_ascii_case(key))
            .cloned()
            .collect();
        path.push(key.to_string());
        let is_table = under.iter().all(|k| k.len() > depth + 1);
        if under.is_empty() {
            out.push(UnknownKey {
                path: path.join("."),
                suggestion: suggest(known, depth, key),
            });
        } else if let Some(sub) = item.as_table_like().filter(|_| is_table) {
            walk(sub, path, &under, out);
        }
        path.pop();
    }
}

/// The nearest sibling name within edit distance 2, else the full path of a
/// known key with this exact name in another table.
fn suggest(siblings: &[KnownPath], depth: usize, key: &str) -> Option<String> {
    let lower = key.to_ascii_lowercase();
    let distance = |k: &&KnownPath| edit_distance(&lower, &k[depth].to_ascii_lowercase());
    let nearest = siblings.iter().filter(|k| distance(k) <= 2).min_by_key(distance);
    let same_name = |k: &&&str| k.rsplit('.').next().is_some_and(|n| n.eq_ignore_ascii_case(key));
    let elsewhere = || KNOWN_KEYS.iter().find(same_name).map(|k| k.to_string());
    nearest.map(|k| k[depth].to_string()).or_else(elsewhere)
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

/// Reads a file back into the config soci-agent would have rendered for it:
/// `Some` only when the content store is containerd, the keychain and
/// parallel mode are enabled and every tuning key is present with its type
/// (the effective tuning for `doctor`); `None` for any other shape.
pub fn read_back(text: &str) -> Result<Option<SociConfig>, ParseError> {
    Ok(read_doc(parse(text)?.as_item()))
}

fn read_doc(doc: &Item) -> Option<SociConfig> {
    let (store, keychain) = (doc.get("content_store")?, doc.get("cri_keychain")?);
    let par = doc.get(PARALLEL[0])?.get(PARALLEL[1])?;
    let string = |item: &Item, key: &str| item.get(key)?.as_str().map(str::to_string);
    let on = |item: &Item, key: &str| item.get(key)?.as_bool();
    let int = |key: &str| par.get(key)?.as_integer();
    let ours = string(store, "type")? == "containerd" && on(keychain, "enable_keychain")? && on(par, "enable")?;
    if !ours {
        return None;
    }
    let strings = |item: &Item| {
        item.as_array()?
            .iter()
            .map(|a| a.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
    };
    let gzip = match par.get("decompress_streams").and_then(|d| d.get("gzip")) {
        None => None,
        Some(gz) => Some(Decompressor {
            path: string(gz, "path")?,
            args: strings(gz.get("args")?)?,
        }),
    };
    let tuning = Tuning {
        max_concurrent_downloads: int("max_concurrent_downloads")?,
        max_concurrent_downloads_per_image: int("max_concurrent_downloads_per_image")?,
        concurrent_download_chunk_size: string(par, "concurrent_download_chunk_size")?,
        max_concurrent_unpacks: int("max_concurrent_unpacks")?,
        max_concurrent_unpacks_per_image: int("max_concurrent_unpacks_per_image")?,
        discard_unpacked_layers: on(par, "discard_unpacked_layers")?,
    };
    Some(SociConfig {
        tuning,
        gzip,
        containerd_address: string(store, "containerd_address")?,
        image_service_path: string(keychain, "image_service_path")?,
    })
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
}
