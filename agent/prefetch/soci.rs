//! What `prefetch` reads from SOCI's `config.toml`, and the guard for
//! upstream soci-snapshotter issue 2035: with parallel pull/unpack and
//! `discard_unpacked_layers = true`, images sharing layers fail when pulled
//! concurrently ("compressed digests did not match"), so images of one
//! registry repository are pulled one at a time.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::{PrefetchOptions, PrefetchReport};

/// What `prefetch` needs to know from SOCI's config file.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SociFacts {
    /// Parallel pull/unpack is on with `discard_unpacked_layers = true`.
    pub discards_unpacked_layers: bool,
    /// `[cri_keychain] enable_keychain = true`: SOCI learns pull credentials
    /// only from CRI pulls made through its own socket.
    pub cri_keychain: bool,
}

/// Why SOCI's `config.toml` could not be read (a warning: the guards are then off).
#[derive(Debug, thiserror::Error)]
pub enum SociConfigError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The parser's one-line message (its full display quotes the file).
    #[error("{} is not valid TOML: {message}", path.display())]
    Parse { path: PathBuf, message: String },
}

/// Reads SOCI's `config.toml`; a missing file is all `false`.
pub fn read_soci_config(path: &Path) -> Result<SociFacts, SociConfigError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(SociFacts::default()),
        Err(source) => {
            return Err(SociConfigError::Read {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| SociConfigError::Parse {
        path: path.to_path_buf(),
        message: e.message().to_string(),
    })?;
    let flag = |table: &[&str], key: &str| {
        let mut item = doc.as_item();
        for t in table {
            match item.get(t) {
                Some(i) => item = i,
                None => return false,
            }
        }
        item.get(key).and_then(|v| v.as_bool()).unwrap_or(false)
    };
    let par = ["pull_modes", "parallel_pull_unpack"];
    Ok(SociFacts {
        discards_unpacked_layers: flag(&par, "enable") && flag(&par, "discard_unpacked_layers"),
        cri_keychain: flag(&["cri_keychain"], "enable_keychain"),
    })
}

/// The issue-2035 guard: when SOCI discards unpacked layers in parallel
/// mode, one lock per repository holding two or more of `repos` (one entry
/// per image).
pub(super) fn serialization(
    opts: &PrefetchOptions,
    soci: &Result<SociFacts, SociConfigError>,
    repos: &[String],
    report: &mut PrefetchReport,
) -> HashMap<String, tokio::sync::Mutex<()>> {
    let mut by_repo: BTreeMap<String, usize> = BTreeMap::new();
    for r in repos {
        *by_repo.entry(r.clone()).or_default() += 1;
    }
    let shared: Vec<String> = by_repo.into_iter().filter(|(_, n)| *n > 1).map(|(r, _)| r).collect();
    if shared.is_empty() || opts.concurrency == 1 {
        return HashMap::new();
    }
    match soci {
        Ok(facts) if !facts.discards_unpacked_layers => HashMap::new(),
        Ok(_) => {
            for repo in &shared {
                report.warnings.push(format!(
                    "SOCI parallel mode runs with discard_unpacked_layers = true: images of {repo} are \
                     pulled one at a time (shared layers fail concurrently, soci-snapshotter issue 2035)"
                ));
            }
            report.serialized_repos = shared.clone();
            shared.into_iter().map(|r| (r, tokio::sync::Mutex::new(()))).collect()
        }
        Err(e) => {
            report.warnings.push(format!(
                "{}; images of one repository are not serialized",
                crate::exit::error_chain(e)
            ));
            HashMap::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_soci_config() {
        let dir = std::env::temp_dir().join(format!("soci-agent-prefetch-soci-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("config.toml");
        assert_eq!(read_soci_config(&f).unwrap(), SociFacts::default());
        std::fs::write(
            &f,
            "[pull_modes.parallel_pull_unpack]\nenable = true\ndiscard_unpacked_layers = true\n\
             [cri_keychain]\nenable_keychain = true\n",
        )
        .unwrap();
        let on = SociFacts {
            discards_unpacked_layers: true,
            cri_keychain: true,
        };
        assert_eq!(read_soci_config(&f).unwrap(), on);
        std::fs::write(
            &f,
            "[pull_modes.parallel_pull_unpack]\nenable = false\ndiscard_unpacked_layers = true\n",
        )
        .unwrap();
        assert_eq!(read_soci_config(&f).unwrap(), SociFacts::default());
        std::fs::write(&f, "[pull_modes\n").unwrap();
        assert!(matches!(read_soci_config(&f), Err(SociConfigError::Parse { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
