//! TEST ONLY: a copy-based snapshot store, shaped like containerd's "native" snapshotter.
//!
//! Layout: `<root>/snapshotter/snapshots/<id>/fs` per snapshot, metadata in
//! `<root>/snapshotter/standin-metadata.json` (rewritten atomically after every change).
//! `prepare` copies the parent's tree (`cp -a`), `commit` renames the key to the name and keeps the
//! directory, a view of a committed parent bind-mounts the parent read-only. Every snapshot's
//! directory holds the complete tree, so only the immediate parent is ever copied.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::tonic::Status;
use containerd_snapshots::{Info, Usage};
use serde::{Deserialize, Serialize};

use crate::debug;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    View,
    Active,
    Committed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    id: u64,
    kind: Kind,
    parent: String,
    labels: HashMap<String, String>,
    created_at: SystemTime,
    updated_at: SystemTime,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Meta {
    next_id: u64,
    /// Keyed by the active/view key or the committed name (one namespace, as in containerd).
    snapshots: BTreeMap<String, Record>,
}

pub struct Store {
    snapshots_dir: PathBuf,
    meta_path: PathBuf,
    meta: Meta,
}

/// Store errors, turned into the gRPC codes containerd maps back to its errdefs.
#[derive(Debug)]
pub enum Error {
    NotFound(String),
    AlreadyExists(String),
    FailedPrecondition(String),
    InvalidArgument(String),
    Internal(String),
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::NotFound(m) => Status::not_found(m),
            Error::AlreadyExists(m) => Status::already_exists(m),
            Error::FailedPrecondition(m) => Status::failed_precondition(m),
            Error::InvalidArgument(m) => Status::invalid_argument(m),
            Error::Internal(m) => Status::internal(m),
        }
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Internal(format!("{what}: {e}"))
}

fn mkdir_private(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(path)
}

impl Store {
    /// Opens (or creates) the store under `root`, dropping directories no record refers to
    /// (left by a crash in the middle of a prepare or remove).
    pub fn open(root: &Path) -> io::Result<Store> {
        let base = root.join("snapshotter");
        let snapshots_dir = base.join("snapshots");
        mkdir_private(&snapshots_dir)?;
        let meta_path = base.join("standin-metadata.json");
        let meta = match fs::read(&meta_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(io::Error::other)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Meta::default(),
            Err(e) => return Err(e),
        };
        let known: HashSet<String> = meta.snapshots.values().map(|r| r.id.to_string()).collect();
        for entry in fs::read_dir(&snapshots_dir)? {
            let entry = entry?;
            if !known.contains(entry.file_name().to_string_lossy().as_ref()) {
                debug!("removing orphaned snapshot directory {}", entry.path().display());
                fs::remove_dir_all(entry.path())?;
            }
        }
        Ok(Store {
            snapshots_dir,
            meta_path,
            meta,
        })
    }

    fn persist(&self) -> Result<(), Error> {
        let tmp = self.meta_path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(&self.meta).map_err(|e| internal("encode metadata", e))?;
        fs::write(&tmp, bytes).map_err(|e| internal("write metadata", e))?;
        fs::rename(&tmp, &self.meta_path).map_err(|e| internal("write metadata", e))
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.snapshots_dir.join(id.to_string())
    }

    fn get(&self, key: &str) -> Result<&Record, Error> {
        self.meta
            .snapshots
            .get(key)
            .ok_or_else(|| Error::NotFound(format!("snapshot {key} does not exist")))
    }

    fn info(key: &str, r: &Record) -> Info {
        Info {
            kind: match r.kind {
                Kind::View => containerd_snapshots::Kind::View,
                Kind::Active => containerd_snapshots::Kind::Active,
                Kind::Committed => containerd_snapshots::Kind::Committed,
            },
            name: key.to_string(),
            parent: r.parent.clone(),
            labels: r.labels.clone(),
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }

    /// The tree a snapshot's mount shows: its own, or for a view of a committed parent, the parent's.
    fn mount_source(&self, r: &Record) -> Result<PathBuf, Error> {
        if r.kind == Kind::View && !r.parent.is_empty() {
            return Ok(self.dir(self.get(&r.parent)?.id).join("fs"));
        }
        Ok(self.dir(r.id).join("fs"))
    }

    fn mounts_of(&self, r: &Record) -> Result<Vec<Mount>, Error> {
        let mode = if r.kind == Kind::View { "ro" } else { "rw" };
        Ok(vec![Mount {
            r#type: "bind".into(),
            source: self.mount_source(r)?.to_string_lossy().into_owned(),
            target: String::new(),
            options: vec!["rbind".into(), mode.into()],
        }])
    }

    pub fn stat(&self, key: &str) -> Result<Info, Error> {
        Ok(Self::info(key, self.get(key)?))
    }

    pub fn list(&self) -> Vec<Info> {
        self.meta.snapshots.iter().map(|(k, r)| Self::info(k, r)).collect()
    }

    /// Only labels are mutable; `fieldpaths` empty means "replace all labels".
    pub fn update(&mut self, info: Info, fieldpaths: Vec<String>) -> Result<Info, Error> {
        let mut r = self.get(&info.name)?.clone();
        if fieldpaths.is_empty() {
            r.labels = info.labels;
        } else {
            for path in fieldpaths {
                if path == "labels" {
                    r.labels = info.labels.clone();
                } else if let Some(label) = path.strip_prefix("labels.") {
                    match info.labels.get(label) {
                        Some(v) => r.labels.insert(label.to_string(), v.clone()),
                        None => r.labels.remove(label),
                    };
                } else {
                    return Err(Error::InvalidArgument(format!(
                        "cannot update {path:?} field of snapshot"
                    )));
                }
            }
        }
        r.updated_at = SystemTime::now();
        self.meta.snapshots.insert(info.name.clone(), r.clone());
        self.persist()?;
        Ok(Self::info(&info.name, &r))
    }

    /// Disk use of the snapshot's own tree (a view of a committed parent owns none).
    pub fn usage(&self, key: &str) -> Result<Usage, Error> {
        let r = self.get(key)?;
        if r.kind == Kind::View && !r.parent.is_empty() {
            return Ok(Usage::default());
        }
        disk_usage(&self.dir(r.id).join("fs")).map_err(|e| internal("usage", e))
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, Error> {
        let r = self.get(key)?;
        if r.kind == Kind::Committed {
            return Err(Error::FailedPrecondition(format!(
                "snapshot {key} is committed, not active"
            )));
        }
        self.mounts_of(r)
    }

    /// `prepare` (Active) and `view` (View).
    pub fn create(
        &mut self,
        kind: Kind,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Error> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("snapshot key must not be empty".into()));
        }
        if self.meta.snapshots.contains_key(&key) {
            return Err(Error::AlreadyExists(format!("snapshot {key} already exists")));
        }
        let parent_dir = if parent.is_empty() {
            None
        } else {
            let p = self.get(&parent)?;
            if p.kind != Kind::Committed {
                return Err(Error::InvalidArgument(format!(
                    "parent {parent} is not a committed snapshot"
                )));
            }
            Some(self.dir(p.id).join("fs"))
        };
        let id = self.meta.next_id;
        self.meta.next_id += 1;
        let now = SystemTime::now();
        let record = Record {
            id,
            kind,
            parent,
            labels,
            created_at: now,
            updated_at: now,
        };

        // A view of a committed parent shows the parent itself; anything else gets its own tree,
        // built under a temporary name and renamed into place.
        if kind == Kind::Active || parent_dir.is_none() {
            let tmp = self.snapshots_dir.join(format!("new-{id}"));
            let built = self.build_tree(&tmp, parent_dir.as_deref());
            if let Err(e) = built.and_then(|()| fs::rename(&tmp, self.dir(id))) {
                let _ = fs::remove_dir_all(&tmp);
                return Err(internal(&format!("create snapshot {key}"), e));
            }
        }
        let mounts = self.mounts_of(&record)?;
        self.meta.snapshots.insert(key.clone(), record);
        if let Err(e) = self.persist() {
            self.meta.snapshots.remove(&key);
            let _ = fs::remove_dir_all(self.dir(id));
            return Err(e);
        }
        Ok(mounts)
    }

    fn build_tree(&self, tmp: &Path, parent_fs: Option<&Path>) -> io::Result<()> {
        mkdir_private(tmp)?;
        let fs_dir = tmp.join("fs");
        let Some(parent_fs) = parent_fs else {
            return fs::DirBuilder::new().mode(0o755).create(&fs_dir);
        };
        // GNU cp keeps owners, modes, times, links, special files and (best effort) xattrs.
        let out = Command::new("cp")
            .arg("-a")
            .arg("--reflink=auto")
            .arg(parent_fs)
            .arg(&fs_dir)
            .output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "cp -a {} failed ({}): {}",
                parent_fs.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    pub fn commit(&mut self, name: String, key: &str, labels: HashMap<String, String>) -> Result<(), Error> {
        let r = self.get(key)?;
        if r.kind != Kind::Active {
            return Err(Error::FailedPrecondition(format!("snapshot {key} is not active")));
        }
        if self.meta.snapshots.contains_key(&name) {
            return Err(Error::AlreadyExists(format!("snapshot {name} already exists")));
        }
        let old = self.meta.snapshots.remove(key).expect("checked above");
        let now = SystemTime::now();
        let committed = Record {
            kind: Kind::Committed,
            labels,
            created_at: now,
            updated_at: now,
            ..old.clone()
        };
        self.meta.snapshots.insert(name.clone(), committed);
        if let Err(e) = self.persist() {
            self.meta.snapshots.remove(&name);
            self.meta.snapshots.insert(key.to_string(), old);
            return Err(e);
        }
        Ok(())
    }

    pub fn remove(&mut self, key: &str) -> Result<(), Error> {
        let id = self.get(key)?.id;
        if self.meta.snapshots.values().any(|r| r.parent == key) {
            return Err(Error::FailedPrecondition(format!(
                "cannot remove snapshot {key}: it has children"
            )));
        }
        let old = self.meta.snapshots.remove(key).expect("checked above");
        if let Err(e) = self.persist() {
            self.meta.snapshots.insert(key.to_string(), old);
            return Err(e);
        }
        match fs::remove_dir_all(self.dir(id)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(internal(&format!("remove snapshot {key}"), e)),
            _ => Ok(()),
        }
    }
}

/// Allocated bytes and inodes under `root`, hard links counted once (like containerd's DiskUsage).
fn disk_usage(root: &Path) -> io::Result<Usage> {
    let mut seen = HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let md = fs::symlink_metadata(&path)?;
        if seen.insert((md.dev(), md.ino())) {
            usage.inodes += 1;
            usage.size += i64::try_from(md.blocks() * 512).unwrap_or(i64::MAX);
        }
        if md.is_dir() {
            for entry in fs::read_dir(&path)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok(usage)
}
