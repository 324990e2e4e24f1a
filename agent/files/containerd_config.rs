//! Wiring containerd to the SOCI proxy snapshotter: the edit to
//! `/etc/containerd/config.toml` and the fragment for a nodeadm NodeConfig's
//! `spec.containerd.config`.
//!
//! Pure: text in, text out. The caller reads the file, calls [`merge`] and
//! writes [`Merged::text`] only when [`Merged::changed`] is true.
//!
//! The edit is surgical (toml_edit): only the keys listed by [`owned_keys`]
//! are touched; every other byte (comments, order, whitespace, other plugins)
//! stays. Keys already holding the desired value keep their bytes, so a file
//! that is already wired comes back byte-identical and `merge` is idempotent.
//! The CRI table is chosen from the file's `version` (2: containerd 1.x,
//! 3 and 4: containerd 2.x, same table names); a v3 table is never written
//! into a v2 file or the other way round.
//!
//! The running containerd's version decides what may be written at all
//! ([`Daemon`]): a new file gets the version that containerd writes itself
//! (2 for 1.x, 3 for 2.0-2.3, 4 for 2.4+), and a file the daemon would read
//! wrongly is refused. containerd 2.x migrates a version-2 file at every
//! start, and that migration DROPS `snapshotter` and
//! `disable_snapshot_annotations` when the CRI `containerd` table has no
//! `runtimes` (containerd's `plugins/cri/images` migration returns early), so
//! v2 content is never written for a 2.x daemon.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::ops::Range;

use toml_edit::{Document, DocumentMut, InlineTable, Item, Key, Table, TableLike, Value};

/// First line of a config file soci-agent creates from nothing.
const CREATED_HEADER: &str =
    "# Written by soci-agent: containerd wired to the SOCI snapshotter (parallel pull/unpack).";

/// containerd config file format, read from the file's top-level `version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum ConfigVersion {
    /// `version = 2`: containerd 1.6 / 1.7 (2.x migrates it at every start).
    V2,
    /// `version = 3`: written by containerd 2.0-2.3; 2.4 migrates it.
    V3,
    /// `version = 4`: written by containerd 2.4 (`[grpc]` became a plugin);
    /// containerd 2.0-2.3 refuse it. CRI and proxy tables are as in v3.
    V4,
}

impl ConfigVersion {
    pub fn as_u8(self) -> u8 {
        match self {
            ConfigVersion::V2 => 2,
            ConfigVersion::V3 => 3,
            ConfigVersion::V4 => 4,
        }
    }

    /// The version containerd `major.minor` writes itself (`containerd config default`).
    pub fn written_by(daemon: Daemon) -> ConfigVersion {
        match (daemon.major, daemon.minor) {
            (0 | 1, _) => ConfigVersion::V2,
            (2, 0..=3) => ConfigVersion::V3,
            _ => ConfigVersion::V4,
        }
    }

    /// The newest version containerd `major.minor` can load.
    pub fn newest_read_by(daemon: Daemon) -> ConfigVersion {
        ConfigVersion::written_by(daemon)
    }

    /// Whether this version uses the containerd 2.x table names.
    pub fn is_v3_family(self) -> bool {
        self >= ConfigVersion::V3
    }

    /// Table path (plugin ID included) holding the CRI image settings.
    pub fn cri_images_table(self) -> &'static [&'static str] {
        match self {
            ConfigVersion::V2 => &["plugins", "io.containerd.grpc.v1.cri", "containerd"],
            ConfigVersion::V3 | ConfigVersion::V4 => &["plugins", "io.containerd.cri.v1.images"],
        }
    }
}

/// The containerd that will read the file (`major.minor`), when known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Daemon {
    pub major: u32,
    pub minor: u32,
}

impl fmt::Display for Daemon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

impl fmt::Display for ConfigVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u8())
    }
}

/// Where the SOCI snapshotter listens and keeps its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SociWiring {
    /// The snapshotter's gRPC socket ([`SOCI_SOCKET`] by default).
    pub address: String,
    /// The snapshotter's `--root` (e.g. `/var/lib/soci-snapshotter-grpc`),
    /// exported to kubelet for disk accounting and image GC.
    pub soci_root: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerdConfigError {
    #[error("cannot parse containerd config {path}: {message}")]
    Parse { path: String, message: String },
    #[error(
        "containerd config {path}: `version` is {found}; soci-agent edits only \
         version 2 (containerd 1.x), 3 and 4 (containerd 2.x) files"
    )]
    UnknownVersion { path: String, found: String },
    #[error(
        "containerd config {path} is version {file} but containerd {daemon} reads at most version {newest}: \
         containerd would refuse to start; convert it by hand, or pass --containerd-version if the \
         detected version is wrong"
    )]
    TooNewForDaemon {
        path: String,
        file: u8,
        daemon: Daemon,
        newest: u8,
    },
    #[error(
        "containerd config {path} is version 2, which containerd {daemon} reads only through a migration at \
         every start{drops}; soci-agent does not write version-2 content for containerd 2.x. Convert the file first: \
         `containerd config migrate > {path}.new`, review it, move it over {path}, and run install again \
         (or move {path} aside and soci-agent writes a version {wanted} file)"
    )]
    V2ForContainerd2 {
        path: String,
        daemon: Daemon,
        wanted: u8,
        /// Filled when this file's migration would drop the owned keys.
        drops: String,
    },
    #[error(
        "no containerd config at {path} and containerd's version is unknown (no /etc/eks/containerd-version.txt \
         and no containerd binary found): cannot tell whether to write version 2 (containerd 1.x), 3 (2.0-2.3) \
         or 4 (2.4+); pass --containerd-version (e.g. 2.2)"
    )]
    UnknownDaemon { path: String },
    #[error("containerd config {path}: cannot set {key}: {reason}")]
    Conflict { path: String, key: String, reason: String },
}

/// Result of [`merge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merged {
    /// The new file content (byte-identical to the input when `!changed`).
    pub text: String,
    /// The version the tables were chosen for.
    pub version: ConfigVersion,
    /// Whether `text` differs from the input (always true when `created`).
    pub changed: bool,
    /// Whether there was no file before.
    pub created: bool,
}

/// The value soci-agent wants under an owned key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedValue {
    Str(String),
    Bool(bool),
}

impl OwnedValue {
    /// Same TOML type and same value (formatting is ignored).
    pub fn matches(&self, value: &Value) -> bool {
        match (self, value) {
            (OwnedValue::Str(want), Value::String(have)) => have.value() == want,
            (OwnedValue::Bool(want), Value::Boolean(have)) => have.value() == want,
            _ => false,
        }
    }

    /// The value as written into a file: strings as basic (`"..."`) strings.
    fn to_value(&self) -> Value {
        match self {
            OwnedValue::Bool(b) => Value::from(*b),
            OwnedValue::Str(s) => basic_string(s).parse().expect("an escaped basic string is valid TOML"),
        }
    }
}

impl fmt::Display for OwnedValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OwnedValue::Str(s) => f.write_str(&basic_string(s)),
            OwnedValue::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// One key soci-agent owns: `path` is the full key path from the document
/// root (tables, plugin IDs as plain names, then the key itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedKey {
    pub path: Vec<&'static str>,
    pub value: OwnedValue,
}

impl OwnedKey {
    /// The path as a TOML dotted key, e.g.
    /// `plugins."io.containerd.grpc.v1.cri".containerd.snapshotter`.
    pub fn dotted(&self) -> String {
        dotted(&self.path)
    }

    /// The item at this key in `root`, walking tables, dotted keys and
    /// inline tables alike.
    pub fn lookup<'a>(&self, root: &'a Table) -> Option<&'a Item> {
        let (leaf, tables) = self.path.split_last()?;
        let mut cur: &dyn TableLike = root;
        for seg in tables {
            cur = cur.get(seg)?.as_table_like()?;
        }
        cur.get(leaf)
    }

    /// Whether `root` already holds the desired value at this key.
    pub fn is_set_in(&self, root: &Table) -> bool {
        self.lookup(root)
            .and_then(Item::as_value)
            .is_some_and(|v| self.value.matches(v))
    }
}

/// The keys soci-agent owns for `version`, in the order [`merge`] and
/// [`fragment`] write them: the CRI image settings, then the proxy plugin.
pub fn owned_keys(version: ConfigVersion, wiring: &SociWiring) -> Vec<OwnedKey> {
    let key = |path: &[&'static str], leaf: &'static str, value: OwnedValue| {
        let mut path = path.to_vec();
        path.push(leaf);
        OwnedKey { path, value }
    };
    let cri = version.cri_images_table();
    let soci = &["proxy_plugins", "soci"];
    let exports = &["proxy_plugins", "soci", "exports"];
    vec![
        key(cri, "snapshotter", OwnedValue::Str("soci".into())),
        key(cri, "disable_snapshot_annotations", OwnedValue::Bool(false)),
        key(soci, "type", OwnedValue::Str("snapshot".into())),
        key(soci, "address", OwnedValue::Str(wiring.address.clone())),
        key(exports, "root", OwnedValue::Str(wiring.soci_root.clone())),
    ]
}

/// Reads the top-level `version`: `Ok(None)` only for a document with no
/// keys or tables at all (empty, whitespace or comments).
pub fn detect_version(text: &str, path: &str) -> Result<Option<ConfigVersion>, ContainerdConfigError> {
    version_of(&parse(text, path)?, path)
}

/// Wires `existing` (the current file content, `None` when there is no file)
/// to SOCI, for the containerd `daemon` that will read it (`None`: unknown).
/// `path` is only used in error messages. On error the caller must leave the
/// file alone.
pub fn merge(
    existing: Option<&str>,
    path: &str,
    wiring: &SociWiring,
    daemon: Option<Daemon>,
) -> Result<Merged, ContainerdConfigError> {
    let new_version = || {
        daemon
            .map(ConfigVersion::written_by)
            .ok_or_else(|| ContainerdConfigError::UnknownDaemon { path: path.to_owned() })
    };
    let Some(text) = existing else {
        let version = new_version()?;
        return Ok(Merged {
            text: created_file(version, wiring),
            version,
            changed: true,
            created: true,
        });
    };
    let (bom, text) = split_bom(text);
    let mut doc = parse(text, path)?;
    let Some(version) = version_of(&doc, path)? else {
        return Ok(append_to_comments(bom, text, new_version()?, wiring));
    };
    if let Some(daemon) = daemon {
        check_readable(&doc, version, daemon, path)?;
    }
    check_not_foreign(&doc, path)?;
    let changed = apply(&mut doc, version, wiring, path)?;
    Ok(Merged {
        text: merged_text(bom, text, &doc, changed),
        version,
        changed,
        created: false,
    })
}

/// Splits off a UTF-8 byte-order mark, kept as it was (the TOML parser does not take it).
fn split_bom(text: &str) -> (&'static str, &str) {
    match text.strip_prefix('\u{feff}') {
        Some(rest) => ("\u{feff}", rest),
        None => ("", text),
    }
}

/// A file of nothing but comments: keeps them, appends a fresh file after them.
fn append_to_comments(bom: &str, text: &str, version: ConfigVersion, wiring: &SociWiring) -> Merged {
    let mut out = text.to_owned();
    if !out.trim().is_empty() {
        out.truncate(out.trim_end().len());
        out.push_str("\n\n");
    }
    out.push_str(&created_file(version, wiring));
    Merged {
        text: format!("{bom}{out}"),
        version,
        changed: true,
        created: false,
    }
}

/// The merged file: `doc` with the input's headers and line endings, or the input unchanged.
fn merged_text(bom: &str, text: &str, doc: &DocumentMut, changed: bool) -> String {
    if changed {
        format!(
            "{bom}{}",
            restore_line_endings(text, restore_headers(text, doc.to_string()))
        )
    } else {
        format!("{bom}{text}")
    }
}

/// The TOML for a NodeConfig's `spec.containerd.config` (no `version` key;
/// nodeadm merges it into its own template): the CRI table for `version`,
/// then the `proxy_plugins.soci` block.
pub fn fragment(version: ConfigVersion, wiring: &SociWiring) -> String {
    let mut doc = DocumentMut::new();
    apply(&mut doc, version, wiring, "<fragment>").expect("an empty document has no conflicts");
    doc.to_string()
}

/// A new file: header comment, version, owned tables.
fn created_file(version: ConfigVersion, wiring: &SociWiring) -> String {
    let tables = fragment(version, wiring);
    format!("{CREATED_HEADER}\nversion = {version}\n\n{tables}")
}

/// Refuses a `[proxy_plugins.soci]` of another type: someone else's plugin
/// under that name, which soci-agent must not take over.
fn check_not_foreign(doc: &DocumentMut, path: &str) -> Result<(), ContainerdConfigError> {
    let ty = doc
        .get("proxy_plugins")
        .and_then(|p| p.get("soci"))
        .and_then(|s| s.get("type"));
    let found = match ty {
        None => return Ok(()),
        Some(t) if t.as_str() == Some("snapshot") => return Ok(()),
        Some(t) => t.as_str(),
    };
    Err(ContainerdConfigError::Conflict {
        path: path.to_owned(),
        key: "proxy_plugins.soci.type".to_owned(),
        reason: format!(
            "it is {}: another plugin is registered as `soci`; soci-agent will not replace it \
                 (rename that plugin, or remove the block if it is stale)",
            found.map_or_else(|| "not a string".to_owned(), |f| format!("{f:?}"))
        ),
    })
}

/// Refuses a file `daemon` cannot load, or loads through the v2 migration.
fn check_readable(
    doc: &DocumentMut,
    version: ConfigVersion,
    daemon: Daemon,
    path: &str,
) -> Result<(), ContainerdConfigError> {
    let newest = ConfigVersion::newest_read_by(daemon);
    if version > newest {
        return Err(ContainerdConfigError::TooNewForDaemon {
            path: path.to_owned(),
            file: version.as_u8(),
            daemon,
            newest: newest.as_u8(),
        });
    }
    if version == ConfigVersion::V2 && daemon.major >= 2 {
        let drops = if v2_migration_drops_owned_keys(doc) {
            ", and with no `runtimes` table under [plugins.\"io.containerd.grpc.v1.cri\".containerd] that \
             migration drops `snapshotter` and `disable_snapshot_annotations` (pods would pull with overlayfs)"
                .to_string()
        } else {
            String::new()
        };
        return Err(ContainerdConfigError::V2ForContainerd2 {
            path: path.to_owned(),
            daemon,
            wanted: ConfigVersion::written_by(daemon).as_u8(),
            drops,
        });
    }
    Ok(())
}

/// containerd 2.x's v2 -> v3 migration of the CRI image settings copies
/// `containerd.snapshotter` and `disable_snapshot_annotations` only when the
/// v2 `[plugins."io.containerd.grpc.v1.cri".containerd]` table has a
/// `runtimes` table (it returns early otherwise: checked on 2.2.9 and 2.4.2).
pub fn v2_migration_drops_owned_keys(doc: &DocumentMut) -> bool {
    let containerd = doc
        .get("plugins")
        .and_then(|p| p.get("io.containerd.grpc.v1.cri"))
        .and_then(|c| c.get("containerd"));
    !containerd
        .and_then(|c| c.get("runtimes"))
        .is_some_and(Item::is_table_like)
}

fn parse(text: &str, path: &str) -> Result<DocumentMut, ContainerdConfigError> {
    text.parse::<DocumentMut>().map_err(|e| {
        let before = text.get(..e.span().map_or(0, |s| s.start)).unwrap_or(text);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        ContainerdConfigError::Parse {
            path: path.to_owned(),
            message: format!("line {line}, column {column}: {}", e.message().trim_end()),
        }
    })
}

fn version_of(doc: &DocumentMut, path: &str) -> Result<Option<ConfigVersion>, ContainerdConfigError> {
    let unknown = |found: String| ContainerdConfigError::UnknownVersion {
        path: path.to_owned(),
        found,
    };
    match doc.get("version") {
        None if doc.is_empty() => Ok(None),
        None => Err(unknown("missing (containerd reads that as version 1)".into())),
        Some(item) => match item.as_integer() {
            Some(2) => Ok(Some(ConfigVersion::V2)),
            Some(3) => Ok(Some(ConfigVersion::V3)),
            Some(4) => Ok(Some(ConfigVersion::V4)),
            _ => Err(unknown(match item.as_value() {
                Some(v) => {
                    let mut v = v.clone();
                    v.decor_mut().clear();
                    v.to_string()
                }
                None => format!("({})", item.type_name()),
            })),
        },
    }
}

/// How the table being walked is written, which decides how a missing child
/// table is created.
#[derive(Clone, Copy)]
enum Style {
    /// The root or a `[header]` table: children get their own header.
    Header,
    /// Defined by dotted keys (`a.b.c = 1`): children stay dotted.
    Dotted,
    /// `{ ... }`: children are nested inline tables.
    Inline,
}

/// Sets every owned key in `doc`; returns whether anything changed.
fn apply(
    doc: &mut DocumentMut,
    version: ConfigVersion,
    wiring: &SociWiring,
    path: &str,
) -> Result<bool, ContainerdConfigError> {
    let mut next_position = max_position(doc.as_table()) + 1;
    let mut changed = false;
    for owned in owned_keys(version, wiring) {
        if owned.is_set_in(doc.as_table()) {
            continue;
        }
        let (cur, style) = owned_table(doc, &owned, version, path, &mut next_position)?;
        set_owned_value(cur, style, &owned, path)?;
        changed = true;
    }
    Ok(changed)
}

/// A [`ContainerdConfigError::Conflict`] at the first `depth + 1` segments of `owned`.
fn conflict(path: &str, owned: &OwnedKey, depth: usize, reason: String) -> ContainerdConfigError {
    ContainerdConfigError::Conflict {
        path: path.to_owned(),
        key: dotted(&owned.path[..=depth]),
        reason,
    }
}

/// The table that holds `owned`'s leaf, created (like its neighbours) where
/// missing, and the style its children get.
fn owned_table<'a>(
    doc: &'a mut DocumentMut,
    owned: &OwnedKey,
    version: ConfigVersion,
    path: &str,
    next_position: &mut isize,
) -> Result<(&'a mut dyn TableLike, Style), ContainerdConfigError> {
    let (_, tables) = owned.path.split_last().expect("owned paths are not empty");
    let mut cur: &mut dyn TableLike = doc.as_table_mut();
    let mut style = Style::Header;
    for (depth, seg) in tables.iter().enumerate() {
        let is_leaf_table = depth + 1 == tables.len();
        if cur.get(seg).is_none() {
            let table = new_table(style, is_leaf_table, next_position);
            insert_new(cur, style, table_key(seg, version), table);
        }
        let item = cur.get_mut(seg).expect("inserted above");
        if !item.is_table_like() {
            let reason = format!("it is {}, not a table", article(item.type_name()));
            return Err(conflict(path, owned, depth, reason));
        }
        style = child_style(item, is_leaf_table, next_position);
        cur = item.as_table_like_mut().expect("checked table-like above");
    }
    Ok((cur, style))
}

/// The style children of the table-like `item` get; an implicit leaf table
/// gets its own header.
fn child_style(item: &mut Item, is_leaf_table: bool, next_position: &mut isize) -> Style {
    match item {
        Item::Table(t) if t.is_dotted() => Style::Dotted,
        Item::Table(t) => {
            // A table only implied by a sub-table header (`[a.b]`
            // implies `a`) needs its own header once it holds keys.
            if is_leaf_table && t.is_implicit() {
                t.set_implicit(false);
                t.set_position(Some(*next_position));
                *next_position += 1;
            }
            Style::Header
        }
        _ => Style::Inline,
    }
}

/// Sets `owned`'s leaf in `cur`, keeping the decor of a value it replaces.
fn set_owned_value(
    cur: &mut dyn TableLike,
    style: Style,
    owned: &OwnedKey,
    path: &str,
) -> Result<(), ContainerdConfigError> {
    let leaf = owned.path.last().expect("owned paths are not empty");
    let depth = owned.path.len() - 1;
    let mut value = owned.value.to_value();
    match cur.get_mut(leaf) {
        Some(Item::Value(old)) => {
            // Keep the comments and spacing around the old value.
            *value.decor_mut() = old.decor().clone();
            *old = value;
        }
        Some(item @ (Item::Table(_) | Item::ArrayOfTables(_))) => {
            let reason = format!(
                "it is {}, soci-agent needs the value {}",
                article(item.type_name()),
                owned.value
            );
            return Err(conflict(path, owned, depth, reason));
        }
        Some(Item::None) | None => insert_new(cur, style, Key::new(*leaf), Item::Value(value)),
    }
    Ok(())
}

/// Adds `key = item` to `table`, formatted like its neighbours.
fn insert_new(table: &mut dyn TableLike, style: Style, mut key: Key, mut item: Item) {
    if let Style::Inline = style {
        // The space before `}` is the last value's suffix: keep it last.
        let last = table.iter_mut().last().and_then(|(_, i)| i.as_value_mut());
        if let (Some(last), Some(value)) = (last, item.as_value_mut())
            && let Some(suffix) = last.decor().suffix().cloned()
        {
            last.decor_mut().set_suffix("");
            value.decor_mut().set_suffix(suffix);
        }
    } else if item.is_value() {
        // Indent like the last key of the same table.
        let values = table.get_values();
        let prefix = values
            .last()
            .and_then(|(path, _)| path.last()?.leaf_decor().prefix()?.as_str());
        let indent = prefix.and_then(|p| p.rsplit('\n').next());
        if let Some(indent) = indent.filter(|i| i.chars().all(|c| c == ' ' || c == '\t')) {
            key.leaf_decor_mut().set_prefix(indent.to_owned());
        }
    }
    table.entry_format(&key).or_insert(item);
}

fn new_table(style: Style, is_leaf_table: bool, next_position: &mut isize) -> Item {
    match style {
        Style::Inline => Item::Value(Value::InlineTable(InlineTable::new())),
        Style::Dotted => {
            let mut t = Table::new();
            t.set_implicit(true);
            t.set_dotted(true);
            Item::Table(t)
        }
        Style::Header => {
            let mut t = Table::new();
            // Intermediate tables stay implicit: no empty `[plugins]` header.
            t.set_implicit(!is_leaf_table);
            t.set_position(Some(*next_position));
            *next_position += 1;
            Item::Table(t)
        }
    }
}

/// toml_edit prints each header with the quoting of every key's first
/// appearance: after `[plugins.'x']`, `[plugins."x".registry]` would come out
/// as `[plugins.'x'.registry]`. Put the input's own header text back (same
/// key path, so same meaning).
fn restore_headers(input: &str, mut output: String) -> String {
    let Ok(before) = Document::parse(input) else {
        return output;
    };
    let mut originals: HashMap<Vec<&str>, VecDeque<&str>> = HashMap::new();
    for (path, span) in headers(before.as_table(), &mut Vec::new()) {
        originals.entry(path).or_default().push_back(&input[span]);
    }
    let mut edits: Vec<(Range<usize>, &str)> = match Document::parse(output.as_str()) {
        Ok(after) => headers(after.as_table(), &mut Vec::new())
            .into_iter()
            .filter_map(|(path, span)| Some((span, originals.get_mut(&path)?.pop_front()?)))
            .filter(|(span, text)| output[span.clone()] != **text)
            .collect(),
        Err(_) => return output,
    };
    edits.sort_by_key(|(span, _)| std::cmp::Reverse(span.start));
    for (span, text) in edits {
        output.replace_range(span, text);
    }
    output
}

/// toml_edit writes `\n` line endings; give a CRLF file its CRLF back.
fn restore_line_endings(input: &str, output: String) -> String {
    let crlf = input.matches("\r\n").count();
    if crlf > 0 && crlf == input.matches('\n').count() {
        output.replace("\r\n", "\n").replace('\n', "\r\n")
    } else {
        output
    }
}

/// Key path and `[header]` span of every explicit table, in document order.
fn headers<'a>(table: &'a Table, path: &mut Vec<&'a str>) -> Vec<(Vec<&'a str>, Range<usize>)> {
    let mut out = Vec::new();
    for (key, item) in table.iter() {
        path.push(key);
        for t in child_tables(item) {
            if let Some(span) = t.span().filter(|_| !t.is_implicit() && !t.is_dotted()) {
                out.push((path.clone(), span));
            }
            out.extend(headers(t, path));
        }
        path.pop();
    }
    out
}

/// The largest document position of any table, so new tables go last.
fn max_position(table: &Table) -> isize {
    let tables = table.iter().flat_map(|(_, item)| child_tables(item));
    tables
        .map(|t| t.position().unwrap_or(0).max(max_position(t)))
        .max()
        .unwrap_or(0)
}

fn child_tables(item: &Item) -> Vec<&Table> {
    match item {
        Item::Table(t) => vec![t],
        Item::ArrayOfTables(a) => a.iter().collect(),
        _ => vec![],
    }
}

/// A key for a table we may create: plugin IDs quoted the way each
/// containerd generation prints them (`"..."` in v2, `'...'` in v3).
fn table_key(name: &str, version: ConfigVersion) -> Key {
    if is_bare(name) {
        return Key::new(name);
    }
    let repr = match version {
        ConfigVersion::V2 => basic_string(name),
        ConfigVersion::V3 | ConfigVersion::V4 => format!("'{name}'"),
    };
    Key::parse(&repr)
        .ok()
        .and_then(|mut keys| keys.pop())
        .unwrap_or_else(|| Key::new(name))
}

fn is_bare(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn dotted(path: &[&str]) -> String {
    let quote = |s: &&str| {
        if is_bare(s) { s.to_string() } else { basic_string(s) }
    };
    path.iter().map(quote).collect::<Vec<_>>().join(".")
}

/// `s` as a TOML basic string, quotes included.
fn basic_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn article(type_name: &str) -> String {
    let an = type_name.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} {type_name}", if an { "an" } else { "a" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paths::SOCI_SOCKET;

    fn wiring() -> SociWiring {
        SociWiring {
            address: SOCI_SOCKET.into(),
            soci_root: "/var/lib/soci-snapshotter-grpc".into(),
        }
    }

    #[test]
    fn detects_versions() {
        let v = |text: &str| detect_version(text, "f").map_err(|e| e.to_string());
        assert_eq!(v("version = 2\n"), Ok(Some(ConfigVersion::V2)));
        assert_eq!(v("# c\nversion = 3 # x\n[a]\n"), Ok(Some(ConfigVersion::V3)));
        assert_eq!(v("version = 4\n"), Ok(Some(ConfigVersion::V4)));
        assert_eq!(v(""), Ok(None));
        assert_eq!(v("  \n# only a comment\n"), Ok(None));
        for (text, found) in [
            ("version = 1", "`version` is 1;"),
            ("version = 5 # c", "`version` is 5;"),
            ("version = '3'", "`version` is '3';"),
            ("[plugins]", "`version` is missing"),
        ] {
            let err = v(text).unwrap_err();
            assert!(err.contains(found), "{text}: {err}");
        }
        let err = v("version = 2\nx = [\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn strings_are_written_as_escaped_basic_strings() {
        let odd = SociWiring {
            address: r#"/run/a "b"\c.sock"#.into(),
            soci_root: "/var/lib/it's".into(),
        };
        let d = Some(Daemon { major: 1, minor: 7 });
        let text = merge(None, "f", &odd, d).unwrap().text;
        assert!(text.contains(r#"address = "/run/a \"b\"\\c.sock""#), "{text}");
        assert!(text.contains(r#"root = "/var/lib/it's""#), "{text}");
        assert!(!merge(Some(&text), "f", &odd, d).unwrap().changed);
    }

    #[test]
    fn new_files_get_the_version_their_daemon_writes() {
        let d = |major, minor| Some(Daemon { major, minor });
        for (daemon, version) in [
            (d(1, 7), "version = 2"),
            (d(2, 2), "version = 3"),
            (d(2, 4), "version = 4"),
        ] {
            let m = merge(None, "f", &wiring(), daemon).unwrap();
            assert!(m.text.contains(&format!("\n{version}\n")), "{daemon:?}: {}", m.text);
        }
        let err = merge(None, "f", &wiring(), None).unwrap_err().to_string();
        assert!(err.contains("--containerd-version"), "{err}");
    }

    #[test]
    fn files_the_daemon_reads_wrongly_are_refused() {
        let d = |major, minor| Some(Daemon { major, minor });
        let v2 = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nsnapshotter = \"overlayfs\"\n";
        let err = merge(Some(v2), "f", &wiring(), d(2, 2)).unwrap_err().to_string();
        assert!(err.contains("config migrate") && err.contains("drops"), "{err}");
        let with_runtimes = format!("{v2}[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n");
        let err = merge(Some(&with_runtimes), "f", &wiring(), d(2, 4))
            .unwrap_err()
            .to_string();
        assert!(err.contains("config migrate") && !err.contains("drops"), "{err}");
        assert!(merge(Some(v2), "f", &wiring(), d(1, 7)).unwrap().changed);
        let err = merge(Some("version = 4\n"), "f", &wiring(), d(2, 2))
            .unwrap_err()
            .to_string();
        assert!(err.contains("reads at most version 3"), "{err}");
        let err = merge(Some("version = 3\n"), "f", &wiring(), d(1, 7))
            .unwrap_err()
            .to_string();
        assert!(err.contains("reads at most version 2"), "{err}");
        assert!(merge(Some("version = 3\n"), "f", &wiring(), d(2, 4)).is_ok());
    }

    #[test]
    fn crlf_files_keep_crlf() {
        let input = "version = 2\r\n# c\r\n[proxy_plugins.soci]\r\ntype = \"snapshot\"\r\n";
        let out = merge(Some(input), "f", &wiring(), None).unwrap().text;
        assert!(out.starts_with(input), "{out:?}");
        assert_eq!(out.matches('\n').count(), out.matches("\r\n").count());
    }
}
