//! soci-config.*: the SOCI daemon's `config.toml` (the `--config` of the
//! unit's ExecStart, else the default path), read with the daemon's own
//! defaults for missing keys: parses, parallel mode on, keys known, limits
//! consistent, chunk size grammar, decompressors, content store rule. Keys
//! are looked up as the daemon reads them: field names case-insensitively,
//! map keys (`decompress_streams."gzip"`) exactly.

use crate::paths::UNPIGZ;
use std::os::unix::fs::PermissionsExt;

use toml_edit::{DocumentMut, Item};

use super::Check;
use super::node::{Node, Text};
use crate::files::soci_config::{self, Tuning};
use crate::release::Version;

const PARALLEL: &str = "pull_modes.parallel_pull_unpack";

/// The parsed config, for the kubelet check too.
pub fn parsed(node: &Node) -> Option<DocumentMut> {
    node.soci_config.found()?.parse().ok()
}

/// `[cri_keychain] enable_keychain` and `image_service_path`, when the config parses.
pub fn keychain(doc: &DocumentMut) -> bool {
    get(doc, "cri_keychain.enable_keychain")
        .and_then(Item::as_bool)
        .unwrap_or(false)
}

const PARSE_ID: &str = "soci-config.parse";

/// The checks after `soci-config.parse`, skipped when the config cannot be read.
const AFTER_PARSE: [&str; 6] = [
    "soci-config.parallel",
    "soci-config.keys",
    "soci-config.limits",
    "soci-config.chunk-size",
    "soci-config.decompressor",
    "soci-config.content-store",
];

/// `soci-config.parse`, then the checks of the parsed config (all skipped when it cannot be read).
pub fn config_checks(node: &Node) -> Vec<Check> {
    let path = &node.soci_config_path.value;
    let (text, doc) = match parsed_config(node) {
        Ok(parsed) => parsed,
        Err(stopped) => return stopped,
    };
    vec![
        Check::ok(PARSE_ID, format!("{} parses", shown_path(node))),
        parallel(&doc, path),
        keys(text, path, daemon_version(node)),
        limits(&doc, path),
        chunk_size(&doc, path),
        decompressor(node, &doc, path),
        content_store(&doc, path),
    ]
}

/// The config path and where doctor took it from.
fn shown_path(node: &Node) -> String {
    format!("{} ({})", node.soci_config_path.value, node.soci_config_path.source)
}

/// `soci-config.parse` saying why the config cannot be checked, then the rest skipped with `why`.
fn unusable(parse: Check, why: &str) -> Vec<Check> {
    let mut out = vec![parse];
    out.extend(AFTER_PARSE.iter().map(|id| Check::skip(id, why.to_string())));
    out
}

/// The config's text and document, or the checks for a missing, unreadable or invalid file.
fn parsed_config(node: &Node) -> Result<(&str, DocumentMut), Vec<Check>> {
    let shown = shown_path(node);
    let text = match &node.soci_config {
        Text::Found(t) => t,
        Text::Missing => {
            return Err(unusable(
                Check::fail(
                    PARSE_ID,
                    format!(
                        "{shown} does not exist: SOCI 0.10/0.11.0 refuse to start, later ones run without parallel mode"
                    ),
                    "run soci-agent install (it writes the config with parallel mode on)",
                ),
                "no config file (see soci-config.parse)",
            ));
        }
        Text::Unreadable(e) => {
            return Err(unusable(
                Check::skip(PARSE_ID, format!("{shown}: {e}")).advise("run doctor as root"),
                "config unreadable (see soci-config.parse)",
            ));
        }
    };
    let doc = text.parse::<DocumentMut>().map_err(|e| {
        let msg = e.to_string().lines().next().unwrap_or_default().to_string();
        unusable(
            Check::fail(
                PARSE_ID,
                format!("{shown}: not valid TOML: {msg}"),
                "the daemon refuses to start on it: fix the file or re-run soci-agent install",
            ),
            "config does not parse (see soci-config.parse)",
        )
    })?;
    Ok((text, doc))
}

/// The value the daemon ends up with (case-insensitive field names, the
/// last spelling in the file wins).
fn get<'a>(doc: &'a DocumentMut, dotted: &str) -> Option<&'a Item> {
    soci_config::lookup(doc.as_item(), dotted)
}

/// The version of the binary the unit runs: from host detection, else from
/// the install record when it names the same binary.
fn daemon_version(node: &Node) -> Option<Version> {
    let bin = node.resolve(node.exec.as_ref()?.binary());
    let detected = node
        .facts
        .soci_installed
        .iter()
        .filter(|i| node.resolve(&i.path) == bin)
        .find_map(|i| i.version.as_deref()?.parse().ok());
    let recorded = || match &node.record {
        Ok(Some(r)) if !r.daemon_binary.is_empty() && node.resolve(&r.daemon_binary) == bin => {
            r.soci_version.parse().ok()
        }
        _ => None,
    };
    detected.or_else(recorded)
}

fn parallel(doc: &DocumentMut, path: &str) -> Check {
    const ID: &str = "soci-config.parallel";
    let key = format!("{PARALLEL}.enable");
    match get(doc, &key).map(|i| (i.as_bool(), i)) {
        Some((Some(true), _)) => Check::ok(ID, format!("{key} = true ({path})")),
        Some((Some(false), _)) => Check::fail(
            ID,
            format!("{key} = false ({path})"),
            "parallel pull/unpack mode is off: set it to true (soci-agent install does)",
        ),
        Some((None, item)) => Check::fail(
            ID,
            format!("{key} is {} ({path}), not a boolean", item.type_name()),
            "set it to true",
        ),
        None => Check::fail(
            ID,
            format!("{key} is not set ({path}; the daemon's default is false)"),
            "parallel pull/unpack mode is off: run soci-agent install",
        ),
    }
}

fn keys(text: &str, path: &str, version: Option<Version>) -> Check {
    const ID: &str = "soci-config.keys";
    let against = match version {
        Some(v) => format!("SOCI {v}, the version the unit runs"),
        None => "any SOCI from 0.11.0 on; the daemon's version is unknown".to_string(),
    };
    match soci_config::unknown_keys_for(text, version) {
        Ok(list) if list.is_empty() => Check::ok(
            ID,
            format!("every key in {path} is one the daemon knows (checked against {against})"),
        ),
        Ok(list) => {
            let shown: Vec<String> = list.iter().map(ToString::to_string).collect();
            let advice = if list.iter().any(|k| k.not_read.is_some()) {
                "fix or remove these keys, or upgrade SOCI for the newer ones: the daemon never reports them"
            } else {
                "fix or remove these keys: the daemon never reports them"
            };
            Check::warn(
                ID,
                format!(
                    "unknown to the daemon, silently ignored ({path}; checked against {against}): {}",
                    shown.join("; ")
                ),
                advice,
            )
        }
        Err(e) => Check::skip(ID, e.to_string()),
    }
}

/// A tuning key holding another TOML type than SOCI reads.
#[derive(Debug, thiserror::Error)]
#[error("{PARALLEL}.{key} is {found}, not {want}")]
struct WrongType {
    key: &'static str,
    found: &'static str,
    want: &'static str,
}

/// The effective tuning, with the daemon's defaults for missing keys.
fn tuning(doc: &DocumentMut) -> Result<Tuning, WrongType> {
    let int = |key: &'static str, default: i64| match get(doc, &format!("{PARALLEL}.{key}")) {
        None => Ok(default),
        Some(i) => i.as_integer().ok_or(WrongType {
            key,
            found: i.type_name(),
            want: "an integer",
        }),
    };
    const CHUNK: &str = "concurrent_download_chunk_size";
    let chunk = match get(doc, &format!("{PARALLEL}.{CHUNK}")) {
        None => String::new(),
        Some(i) => i
            .as_str()
            .ok_or(WrongType {
                key: CHUNK,
                found: i.type_name(),
                want: "a string",
            })?
            .to_string(),
    };
    Ok(Tuning {
        max_concurrent_downloads: int("max_concurrent_downloads", -1)?,
        max_concurrent_downloads_per_image: int("max_concurrent_downloads_per_image", 3)?,
        concurrent_download_chunk_size: chunk,
        max_concurrent_unpacks: int("max_concurrent_unpacks", -1)?,
        max_concurrent_unpacks_per_image: int("max_concurrent_unpacks_per_image", 1)?,
        discard_unpacked_layers: get(doc, &format!("{PARALLEL}.discard_unpacked_layers"))
            .and_then(Item::as_bool)
            .unwrap_or(false),
    })
}

fn limits(doc: &DocumentMut, path: &str) -> Check {
    const ID: &str = "soci-config.limits";
    let t = match tuning(doc) {
        Ok(t) => t,
        Err(e) => {
            return Check::fail(
                ID,
                format!("{e} ({path})"),
                "the daemon refuses to start: fix the value",
            );
        }
    };
    let evidence = format!(
        "downloads {} global / {} per image, unpacks {} global / {} per image ({path}, daemon defaults for unset keys)",
        t.max_concurrent_downloads,
        t.max_concurrent_downloads_per_image,
        t.max_concurrent_unpacks,
        t.max_concurrent_unpacks_per_image
    );
    let limits_only = Tuning {
        concurrent_download_chunk_size: String::new(),
        ..t
    };
    match soci_config::validate(&limits_only) {
        Ok(()) => Check::ok(ID, evidence),
        Err(e) => Check::fail(
            ID,
            format!("{evidence}: {e}"),
            "fix the limits (soci-agent install validates them)",
        ),
    }
}

fn chunk_size(doc: &DocumentMut, path: &str) -> Check {
    const ID: &str = "soci-config.chunk-size";
    let key = format!("{PARALLEL}.concurrent_download_chunk_size");
    let value = match get(doc, &key) {
        None => {
            return Check::ok(
                ID,
                format!("{key} unset ({path}): whole layers per request (daemon default)"),
            );
        }
        Some(i) => match i.as_str() {
            Some(s) => s.to_string(),
            None => {
                return Check::fail(
                    ID,
                    format!("{key} is {} ({path})", i.type_name()),
                    "use a string such as \"16mb\"",
                );
            }
        },
    };
    match soci_config::parse_chunk_size(&value) {
        Ok(Some(bytes)) => Check::ok(ID, format!("{key} = {value:?} = {bytes} bytes ({path})")),
        Ok(None) => Check::ok(ID, format!("{key} = {value:?} ({path}): whole layers per request")),
        Err(e) => Check::fail(ID, format!("{key} = {value:?} ({path})"), e.to_string()),
    }
}

/// Every `decompress_streams` entry as the daemon decodes the map: the
/// table name matched case-insensitively, entry names exactly (a later entry
/// of the same name replaces an earlier one).
fn decompress_streams(doc: &DocumentMut) -> Vec<(String, &Item)> {
    let mut out: Vec<(String, &Item)> = Vec::new();
    for streams in soci_config::lookup_all(doc.as_item(), &format!("{PARALLEL}.decompress_streams")) {
        let Some(t) = streams.as_table_like() else { continue };
        for (name, entry) in t.iter() {
            match out.iter_mut().find(|(n, _)| n == name) {
                Some(slot) => slot.1 = entry,
                None => out.push((name.to_string(), entry)),
            }
        }
    }
    out
}

const DECOMPRESSOR_ID: &str = "soci-config.decompressor";

/// `soci-config.decompressor`: every `decompress_streams` entry is usable, and unpigz is used when present.
fn decompressor(node: &Node, doc: &DocumentMut, path: &str) -> Check {
    let mut found = Vec::new();
    let mut concerns = Vec::new();
    // The daemon validates every entry's path at start, whatever its name.
    for (kind, t) in decompress_streams(doc) {
        match decompress_entry(node, &kind, t, path, &mut concerns) {
            Ok(shown) => found.push(shown),
            Err(check) => return check,
        }
    }
    if !concerns.is_empty() {
        return Check::warn(
            DECOMPRESSOR_ID,
            format!("{} ({path}): {}", found.join("; "), concerns.join("; ")),
            "use an absolute path and the name gzip or zstd (soci-agent install writes [..decompress_streams.gzip] with /usr/bin/unpigz)",
        );
    }
    if !found.is_empty() {
        return Check::ok(DECOMPRESSOR_ID, format!("{} ({path})", found.join("; ")));
    }
    no_decompress_streams(node, path)
}

/// One `decompress_streams` entry shown as `kind: path args`, noting what the daemon
/// ignores or resolves oddly in `concerns`; `Err` when the daemon refuses to start on it.
fn decompress_entry(
    node: &Node,
    kind: &str,
    t: &Item,
    path: &str,
    concerns: &mut Vec<String>,
) -> Result<String, Check> {
    let table = format!("{PARALLEL}.decompress_streams.{kind}");
    let Some(p) = soci_config::lookup(t, "path").and_then(Item::as_str) else {
        return Err(Check::fail(
            DECOMPRESSOR_ID,
            format!("[{table}] has no path ({path})"),
            "the daemon refuses to start: set path to an absolute executable",
        ));
    };
    // A relative path works against the daemon's working directory (/ under systemd).
    if !p.starts_with('/') {
        concerns.push(format!(
            "[{table}] path = {p:?} is relative: the daemon resolves it against its working directory (/ under systemd)"
        ));
    }
    require_executable(node, p, &format!("[{table}] path = {p:?} ({path})"))?;
    if !matches!(kind, "gzip" | "zstd") {
        concerns.push(format!(
            "[{table}] is not used: the daemon only uses \"gzip\" and \"zstd\" (exact case) and logs a warning"
        ));
    }
    let args = soci_config::lookup(t, "args")
        .and_then(Item::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    Ok(format!("{kind}: {p} {args}").trim_end().to_string())
}

/// Fails unless the decompressor path `p` (shown as `setting`) has only characters the
/// daemon accepts and, taken from `/`, names an executable file.
fn require_executable(node: &Node, p: &str, setting: &str) -> Result<(), Check> {
    if let Err(e) = soci_config::check_decompressor_chars(p) {
        return Err(Check::fail(DECOMPRESSOR_ID, setting.to_string(), e.to_string()));
    }
    let absolute = if p.starts_with('/') {
        p.to_string()
    } else {
        format!("/{p}")
    };
    match std::fs::metadata(node.host_path(&node.resolve(&absolute))) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(Check::fail(
            DECOMPRESSOR_ID,
            format!("{setting} is not an executable file"),
            "the daemon refuses to start: fix the path, or install pigz",
        )),
        Err(e) => Err(Check::fail(
            DECOMPRESSOR_ID,
            format!("{setting}: {e}"),
            "the daemon refuses to start: install pigz (unpigz) or remove the table",
        )),
    }
}

/// No `decompress_streams` at all: Go's gzip unpacks layers, whether or not unpigz is there.
fn no_decompress_streams(node: &Node, path: &str) -> Check {
    let unpigz = UNPIGZ;
    if node.host_path(unpigz).is_file() {
        Check::warn(
            DECOMPRESSOR_ID,
            format!("no decompress_streams in {path}, though {unpigz} exists"),
            "re-run soci-agent install to use unpigz (multi-threaded gzip) for layer unpacks",
        )
    } else {
        Check::warn(
            DECOMPRESSOR_ID,
            format!("no decompress_streams in {path} and no {unpigz}: Go's single-threaded gzip unpacks layers"),
            "install pigz and re-run soci-agent install",
        )
    }
}

fn content_store(doc: &DocumentMut, path: &str) -> Check {
    const ID: &str = "soci-config.content-store";
    let store = get(doc, "content_store.type").and_then(Item::as_str).unwrap_or("");
    let discard = get(doc, &format!("{PARALLEL}.discard_unpacked_layers"))
        .and_then(Item::as_bool)
        .unwrap_or(false);
    let evidence = format!(
        "content_store.type = {} and discard_unpacked_layers = {discard} ({path})",
        if store.is_empty() {
            "unset (soci)".to_string()
        } else {
            format!("{store:?}")
        }
    );
    match soci_config::check_content_store_rule(store, discard) {
        Ok(()) => Check::ok(ID, evidence),
        Err(e) => Check::fail(ID, evidence, e.to_string()),
    }
}
