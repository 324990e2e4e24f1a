//! The install record, `/var/lib/soci-agent/record.json`: for every path
//! soci-agent ever changed, how it was before (absent, a backup copy, or a
//! symlink target), the units it enabled, the store entries it created,
//! and the options install was given. Written inside the same transaction as
//! the changes it describes; read by `uninstall` (to put the node back),
//! `boot` (to verify the binary), and the daemon, doctor and later installs
//! (the desired state).

use crate::paths::RECORD;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::install::options::Requested;
use crate::release::Sha256Hex;
use crate::rootfs::{FsError, Root};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Before {
    /// Did not exist: uninstall removes it.
    Absent,
    /// Existed: the original is at `backup`.
    Backup { backup: String },
    /// Was a symlink to `target`.
    Link { target: String },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Node path -> its state before soci-agent first changed it.
    pub paths: BTreeMap<String, Before>,
    /// Units soci-agent enabled that were not enabled before.
    pub enabled_units: BTreeSet<String>,
    /// Store entries (node paths) soci-agent created.
    pub store_entries: BTreeSet<String>,
    /// The binary the SOCI unit runs.
    pub daemon_binary: String,
    /// The snapshotter's `--root` (containerd's `exports.root`).
    #[serde(default)]
    pub soci_root: String,
    /// Its digest when it was adopted (store binaries are checked against
    /// their entry's `release.json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted_sha256: Option<Sha256Hex>,
    /// The SOCI version the unit runs ("" when unknown).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub soci_version: String,
    /// Why that binary was chosen (the --preinstalled policy's decision).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub soci_reason: String,
    /// Node path -> SHA-256 of the file content soci-agent last wrote there:
    /// uninstall removes or restores a file only while it still holds that.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub written: BTreeMap<String, Sha256Hex>,
    /// The install options this node was installed with, as given on the
    /// command line or in the environment (the config file is read again):
    /// the desired state the daemon, doctor and a re-run without settings
    /// work from.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub request: BTreeMap<String, Requested>,
}

/// The SHA-256 of `bytes`, as recorded in [`Record::written`].
pub fn digest(bytes: &[u8]) -> Sha256Hex {
    use sha2::Digest;
    let hex: String = sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
    Sha256Hex::parse(&hex).expect("64 hex digits")
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Read(#[from] FsError),
    #[error("install record {path} is not valid JSON: {message}")]
    Invalid { path: String, message: String },
}

impl Record {
    /// The record under `root`; `None` when soci-agent never installed there.
    pub fn load(root: &Root) -> Result<Option<Record>, RecordError> {
        match root.read_opt(RECORD)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| RecordError::Invalid {
                    path: RECORD.into(),
                    message: e.to_string(),
                }),
        }
    }

    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("record serializes");
        s.push('\n');
        s
    }
}
