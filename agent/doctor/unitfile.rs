//! Reading systemd unit files under the root the way systemd combines them:
//! the first fragment on the search path, then every `NAME.d/*.conf` drop-in
//! (a name in a higher-precedence directory masks the same name lower down),
//! in file-name order. Enough to resolve `ExecStart=` (an empty assignment
//! resets the list), dependency lists and `[Socket] ListenStream=`.

use std::collections::BTreeMap;

use crate::rootfs::Root;

/// Where unit files live, highest precedence first.
pub const SEARCH_PATH: [&str; 4] = [
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
];

/// A unit's files as systemd would load them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitFiles {
    pub name: String,
    /// Node path and text of the fragment, when there is one.
    pub fragment: Option<(String, String)>,
    /// The fragment is a link to `/dev/null`.
    pub masked: bool,
    /// Node path and text of every drop-in, in the order systemd applies them.
    pub dropins: Vec<(String, String)>,
    /// Files that exist but could not be read (path: error).
    pub unreadable: Vec<String>,
}

/// The effective `ExecStart=` of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecStart {
    /// Node path of the file holding the winning line.
    pub source: String,
    /// The command line as written (prefixes like `-` or `+` removed).
    pub line: String,
    pub argv: Vec<String>,
}

impl ExecStart {
    pub fn binary(&self) -> &str {
        self.argv.first().map_or("", String::as_str)
    }
    /// The value of `--flag VALUE` or `--flag=VALUE` (also `-flag`, as Go's flag package takes).
    pub fn flag(&self, flag: &str) -> Option<&str> {
        let bare = flag.trim_start_matches('-');
        let mut it = self.argv.iter().skip(1);
        while let Some(a) = it.next() {
            let name = a.trim_start_matches('-');
            if !a.starts_with('-') {
                continue;
            }
            if name == bare {
                return it.next().map(String::as_str);
            }
            if let Some(v) = name.strip_prefix(bare).and_then(|r| r.strip_prefix('=')) {
                return Some(v);
            }
        }
        None
    }
}

/// `name.d/*.conf` as (path, text), sorted by file name; the first directory to hold a
/// name wins. Files that cannot be read go to `unreadable`.
fn load_dropins(root: &Root, name: &str, unreadable: &mut Vec<String>) -> Vec<(String, String)> {
    let mut dropins: BTreeMap<String, (String, String)> = BTreeMap::new();
    for dir in SEARCH_PATH {
        let d = format!("{dir}/{name}.d");
        let Ok(entries) = std::fs::read_dir(root.path(&d)) else {
            continue;
        };
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            if !file.ends_with(".conf") || dropins.contains_key(&file) {
                continue;
            }
            let path = format!("{d}/{file}");
            match std::fs::read_to_string(e.path()) {
                Ok(text) => {
                    dropins.insert(file, (path, text));
                }
                Err(err) => unreadable.push(format!("{path}: {err}")),
            }
        }
    }
    dropins.into_values().collect()
}

impl UnitFiles {
    /// Loads `name` (e.g. `soci-snapshotter.service`) from under `root`.
    pub fn load(root: &Root, name: &str) -> Self {
        let mut unit = UnitFiles {
            name: name.to_string(),
            ..UnitFiles::default()
        };
        unit.load_fragment(root);
        unit.dropins = load_dropins(root, name, &mut unit.unreadable);
        unit
    }

    /// The unit file the first search directory holds (or that it is masked there).
    fn load_fragment(&mut self, root: &Root) {
        for dir in SEARCH_PATH {
            let path = format!("{dir}/{}", self.name);
            let host = root.path(&path);
            if std::fs::read_link(&host).is_ok_and(|t| t == std::path::Path::new("/dev/null")) {
                self.masked = true;
                break;
            }
            match std::fs::read_to_string(&host) {
                Ok(text) => {
                    self.fragment = Some((path, text));
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => self.unreadable.push(format!("{path}: {e}")),
            }
        }
    }

    pub fn exists(&self) -> bool {
        self.fragment.is_some()
    }

    /// Every `(file, section, key, value)` in the order systemd applies them.
    pub fn directives(&self) -> Vec<(String, String, String, String)> {
        let mut out = Vec::new();
        for (path, text) in self.fragment.iter().chain(&self.dropins) {
            for (section, key, value) in parse(text) {
                out.push((path.clone(), section, key, value));
            }
        }
        out
    }

    /// The effective ExecStart (the last one standing after resets).
    pub fn exec_start(&self) -> Option<ExecStart> {
        let mut list: Vec<(String, String)> = Vec::new();
        for (path, section, key, value) in self.directives() {
            if section != "Service" || key != "ExecStart" {
                continue;
            }
            if value.trim().is_empty() {
                list.clear();
            } else {
                list.push((path, value));
            }
        }
        let (source, value) = list.pop()?;
        let line = value.trim_start_matches(['-', '@', ':', '+', '!']).trim().to_string();
        Some(ExecStart {
            source,
            argv: split_words(&line),
            line,
        })
    }

    /// Space-separated list values of `[section] key=` across all files, each
    /// with the file it came from (an empty assignment resets the list).
    pub fn list(&self, section: &str, key: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (path, s, k, value) in self.directives() {
            if s != section || k != key {
                continue;
            }
            if value.trim().is_empty() {
                out.clear();
            }
            out.extend(value.split_whitespace().map(|v| (path.clone(), v.to_string())));
        }
        out
    }
}

/// `[Install]`-style enablement symlinks for `name`: `*.wants/` and
/// `*.requires/` entries in the search path (node paths).
pub fn enablement_links(root: &Root, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    for dir in SEARCH_PATH {
        let Ok(entries) = std::fs::read_dir(root.path(dir)) else {
            continue;
        };
        let mut dirs: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".wants") || n.ends_with(".requires"))
            .collect();
        dirs.sort();
        for d in dirs {
            let link = format!("{dir}/{d}/{name}");
            if root.exists(&link) {
                out.push(link);
            }
        }
    }
    out
}

/// `(section, key, value)` of a unit file: comments, blank lines and line
/// continuations handled; no specifier expansion.
pub fn parse(text: &str) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let mut section = String::new();
    let mut pending = String::new();
    for raw in text.lines() {
        let line = raw.trim();
        if pending.is_empty() && (line.starts_with('#') || line.starts_with(';')) {
            continue;
        }
        if let Some(cont) = line.strip_suffix('\\') {
            pending.push_str(cont);
            pending.push(' ');
            continue;
        }
        let full = std::mem::take(&mut pending) + line;
        let full = full.trim();
        if let Some(name) = full.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            section = name.to_string();
        } else if let Some((k, v)) = full.split_once('=') {
            out.push((section.clone(), k.trim().to_string(), v.trim().to_string()));
        }
    }
    out
}

/// Splits a command line into words: whitespace-separated, with `"..."` and
/// `'...'` quoting and backslash escapes inside double quotes.
pub fn split_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' => {
                in_word = true;
                while let Some(q) = chars.next() {
                    if q == c {
                        break;
                    }
                    if q == '\\' && c == '"' {
                        cur.extend(chars.next());
                    } else {
                        cur.push(q);
                    }
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_start_resets_and_flags() {
        let unit = UnitFiles {
            name: "x.service".into(),
            fragment: Some((
                "/usr/lib/systemd/system/x.service".into(),
                "[Service]\nExecStart=/usr/bin/a --address fd://\n".into(),
            )),
            dropins: vec![(
                "/etc/systemd/system/x.service.d/50.conf".into(),
                "[Service]\nExecStart=\nExecStart=-/usr/local/bin/b \\\n  --address fd:// --root=/data/s\n".into(),
            )],
            ..UnitFiles::default()
        };
        let e = unit.exec_start().unwrap();
        assert_eq!(e.source, "/etc/systemd/system/x.service.d/50.conf");
        assert_eq!(e.binary(), "/usr/local/bin/b");
        assert_eq!(e.flag("--root"), Some("/data/s"));
        assert_eq!(e.flag("--address"), Some("fd://"));
        assert_eq!(e.flag("--config"), None);
    }

    #[test]
    fn words_and_lists() {
        assert_eq!(split_words(r#"a "b c" 'd e'f"#), vec!["a", "b c", "d ef"]);
        let unit = UnitFiles {
            fragment: Some(("f".into(), "[Unit]\nRequires=a b\nRequires=c\n".into())),
            ..UnitFiles::default()
        };
        let names: Vec<String> = unit.list("Unit", "Requires").into_iter().map(|(_, v)| v).collect();
        assert_eq!(names, vec!["a", "b", "c"]);
    }
}
