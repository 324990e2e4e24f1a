//! Verify and unpack a SOCI release archive in one streaming pass.
//!
//! The raw `.tar.gz` bytes are hashed as they are read, gunzipped and untarred
//! in the same pass; only the four names of a release are accepted, only as
//! regular files, with normalised modes. Memory stays flat: data moves through
//! a fixed 64 KiB buffer and tar metadata records (PAX, GNU long names) are
//! capped, so a hostile archive cannot make the agent buffer it.
//!
//! The digest is only known once the whole source has been read, so files are
//! written into a scratch directory that the caller throws away unless this
//! returns `Ok`.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use sha2::{Digest, Sha256};
use tar::{Archive, EntryType, PaxExtensions};

use crate::release::{ARCHIVE_ENTRIES, BINARIES, DAEMON_BINARY, Sha256Hex};

/// Largest entry accepted (checked on the header and while copying).
pub const MAX_ENTRY_BYTES: u64 = 256 * 1024 * 1024;
/// Largest tar metadata record (PAX extension, GNU long name) accepted; the
/// tar crate would otherwise read these into memory whole.
pub const MAX_METADATA_BYTES: u64 = 64 * 1024;
/// Most metadata records accepted in one archive (a release needs none).
pub const MAX_METADATA_RECORDS: usize = 32;
/// Largest amount of data accepted after the tar end marker (tar pads to
/// 10 KiB records), and again after the gzip stream. With the caps above this
/// bounds how much a hostile source can make the agent read.
pub const MAX_TRAILING_BYTES: u64 = 1024 * 1024;
const BUF_SIZE: usize = 64 * 1024;

/// One file written into the destination directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtractedFile {
    pub name: String,
    /// SHA-256 of the file content, computed while writing it.
    pub sha256: Sha256Hex,
    pub size: u64,
    /// Permission bits given to the file (0755 for binaries, 0644 otherwise).
    pub mode: u32,
}

/// A verified, unpacked release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    /// SHA-256 of the raw (compressed) archive; equals the expected digest.
    pub archive_sha256: Sha256Hex,
    pub archive_bytes: u64,
    /// In archive order.
    pub files: Vec<ExtractedFile>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The source reader (network, local file) failed; not the archive's fault.
    #[error("reading the release archive failed")]
    Source { source: io::Error },
    #[error("release archive is corrupt or truncated (not a complete gzip'd tar)")]
    Corrupt { source: io::Error },
    #[error("SHA-256 mismatch for the release archive: expected {expected}, got {actual} ({bytes} bytes read)")]
    DigestMismatch {
        expected: Sha256Hex,
        actual: Sha256Hex,
        bytes: u64,
    },
    #[error("refusing archive entry {name:?}: absolute path")]
    AbsolutePath { name: String },
    #[error("refusing archive entry {name:?}: contains a '..' component")]
    ParentDir { name: String },
    #[error("refusing archive entry {name:?}: nested path (a SOCI release is flat)")]
    NestedPath { name: String },
    #[error("refusing archive entry {name:?}: empty or non-UTF-8 name")]
    BadName { name: String },
    #[error("refusing archive entry {name:?}: it is a {kind}; only regular files are allowed")]
    EntryType { name: String, kind: String },
    #[error("refusing archive entry {name:?}: not part of a SOCI release (expected only {})", ARCHIVE_ENTRIES.join(", "))]
    UnexpectedEntry { name: String },
    #[error("refusing archive entry {name:?}: it appears more than once")]
    Duplicate { name: String },
    #[error("refusing archive entry {name:?}: {size} bytes is over the {limit}-byte limit")]
    TooLarge { name: String, size: u64, limit: u64 },
    #[error("refusing archive entry {name:?}: {detail}")]
    BadMetadata { name: String, detail: String },
    #[error("archive entry {name:?} is truncated: header says {expected} bytes, archive holds {actual}")]
    TruncatedEntry { name: String, expected: u64, actual: u64 },
    #[error("release archive has more than {limit} bytes after the {after}")]
    TrailingData { limit: u64, after: &'static str },
    #[error("release archive has no {DAEMON_BINARY}")]
    MissingDaemon,
    #[error("cannot create {path}")]
    CreateFile { path: PathBuf, source: io::Error },
    #[error("cannot write {path}")]
    WriteFile { path: PathBuf, source: io::Error },
    #[error("cannot sync {path} to disk")]
    SyncFile { path: PathBuf, source: io::Error },
}

impl ExtractError {
    /// True when the archive itself was refused (digest, hostile or unexpected
    /// content, corruption, size caps): retrying the same bytes cannot help.
    /// False for local I/O errors and for errors of the source reader.
    pub fn is_verification_failure(&self) -> bool {
        !matches!(
            self,
            ExtractError::Source { .. }
                | ExtractError::CreateFile { .. }
                | ExtractError::WriteFile { .. }
                | ExtractError::SyncFile { .. }
        )
    }
}

/// Reads the gzip'd tar from `source` once: the raw bytes are hashed as they
/// are read, gunzipped and untarred in the same pass into `dest`, an existing
/// empty directory on the same filesystem as the final location. After the
/// tar end the rest of the gzip stream is drained (so a missing trailer or a
/// truncation is detected), then the rest of the raw source, and the digest is
/// compared with `expected`.
///
/// On error every file this call created in `dest` is removed (a file is never
/// left half-written), but the caller must still delete `dest` itself: the
/// directory is scratch space until this returns `Ok`. When the source reader
/// fails, [`ExtractError::Source`] wins over whatever the decoder made of it.
pub fn extract_verified<R: Read>(source: R, dest: &Path, expected: &Sha256Hex) -> Result<Extracted, ExtractError> {
    let mut src = HashingReader {
        inner: source,
        hasher: Sha256::new(),
        bytes: 0,
        failed: None,
    };
    let mut created = Vec::new();
    let result = unpack(&mut src, dest, &mut created).and_then(|files| {
        drain_capped(&mut src, "gzip stream")?;
        Ok(files)
    });
    let result = match (src.failed.take(), result) {
        (Some(source), _) => Err(ExtractError::Source { source }),
        (None, r) => r,
    };
    let result = result.and_then(|files| {
        let actual = Sha256Hex::from_bytes(&src.hasher.finalize_reset());
        if &actual != expected {
            return Err(ExtractError::DigestMismatch {
                expected: expected.clone(),
                actual,
                bytes: src.bytes,
            });
        }
        if !files.iter().any(|f| f.name == DAEMON_BINARY) {
            return Err(ExtractError::MissingDaemon);
        }
        Ok(Extracted {
            archive_sha256: actual,
            archive_bytes: src.bytes,
            files,
        })
    });
    if result.is_err() {
        for path in &created {
            let _ = fs::remove_file(path);
        }
    }
    result
}

/// Hashes and counts every byte read from `inner`; remembers the first error
/// of `inner` so it can be told apart from decoding errors.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    bytes: u64,
    failed: Option<io::Error>,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.hasher.update(&buf[..n]);
                self.bytes += n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let copy = io::Error::new(e.kind(), e.to_string());
                self.failed.get_or_insert(e);
                Err(copy)
            }
        }
    }
}

/// Metadata collected from extension records for the next real entry.
#[derive(Default)]
struct Pending {
    long_name: Option<Vec<u8>>,
    pax_path: Option<Vec<u8>>,
    pax_size: Option<u64>,
}

fn corrupt(source: io::Error) -> ExtractError {
    ExtractError::Corrupt { source }
}

/// Unpacks every entry of the gzip tar stream into `dest`, then checks the gzip trailer.
fn unpack<R: Read>(
    src: &mut HashingReader<R>,
    dest: &Path,
    created: &mut Vec<PathBuf>,
) -> Result<Vec<ExtractedFile>, ExtractError> {
    let mut archive = Archive::new(GzDecoder::new(src));
    let mut files: Vec<ExtractedFile> = Vec::new();
    let mut seen = HashSet::new();
    let mut pending = Pending::default();
    let mut buf = vec![0u8; BUF_SIZE];
    let mut records = 0;
    // Raw iteration: extension records are handled here, with size caps.
    for entry in archive.entries().map_err(corrupt)?.raw(true) {
        let mut entry = entry.map_err(corrupt)?;
        let kind = entry.header().entry_type();
        if is_metadata(kind) {
            take_metadata(&mut entry, kind, &mut records, &mut pending)?;
            continue;
        }
        let meta = std::mem::take(&mut pending);
        let size = entry.size();
        let Some(name) = admit_entry(&entry, kind, meta, &mut seen)? else {
            continue;
        };
        files.push(write_entry(&mut entry, dest, name, size, &mut buf, created)?);
    }
    // Past the tar end: drain the gzip stream so its trailer is checked.
    drain_capped(&mut archive.into_inner(), "tar end marker")?;
    Ok(files)
}

/// Reads one metadata record (at most [`MAX_METADATA_RECORDS`]) into `pending`.
fn take_metadata<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    kind: EntryType,
    records: &mut usize,
    pending: &mut Pending,
) -> Result<(), ExtractError> {
    let header_name = lossy(&entry.path_bytes());
    *records += 1;
    if *records > MAX_METADATA_RECORDS {
        let detail = format!("more than {MAX_METADATA_RECORDS} metadata records");
        return Err(ExtractError::BadMetadata {
            name: header_name,
            detail,
        });
    }
    let data = read_metadata(entry, &header_name)?;
    match kind {
        EntryType::GNULongName => pending.long_name = Some(trim_nul(data)),
        EntryType::XHeader => parse_pax(&data, &header_name, pending)?,
        _ => {} // global PAX records and GNU long link names: not needed
    }
    Ok(())
}

/// The checked name of a file entry (with its metadata applied); `None` for
/// the archive's `./` root directory, allowed once.
fn admit_entry<R: Read>(
    entry: &tar::Entry<'_, R>,
    kind: EntryType,
    meta: Pending,
    seen: &mut HashSet<String>,
) -> Result<Option<String>, ExtractError> {
    let raw_name = meta
        .pax_path
        .or(meta.long_name)
        .unwrap_or_else(|| entry.path_bytes().into_owned());
    let size = entry.size();
    if meta.pax_size.is_some_and(|s| s != size) {
        let detail = "PAX size disagrees with the tar header".to_string();
        return Err(ExtractError::BadMetadata {
            name: lossy(&raw_name),
            detail,
        });
    }
    let Some(name) = check_name(&raw_name, kind)? else {
        // The `./` root directory: once, without data to skip over.
        if size != 0 || !seen.insert(".".to_string()) {
            let detail = "repeated or non-empty root directory entry".to_string();
            return Err(ExtractError::BadMetadata {
                name: lossy(&raw_name),
                detail,
            });
        }
        return Ok(None);
    };
    check_file_entry(name, size, seen).map(Some)
}

/// A file entry must be expected, not seen before, and at most [`MAX_ENTRY_BYTES`].
fn check_file_entry(name: String, size: u64, seen: &mut HashSet<String>) -> Result<String, ExtractError> {
    if !ARCHIVE_ENTRIES.contains(&name.as_str()) {
        return Err(ExtractError::UnexpectedEntry { name });
    }
    if !seen.insert(name.clone()) {
        return Err(ExtractError::Duplicate { name });
    }
    if size > MAX_ENTRY_BYTES {
        return Err(ExtractError::TooLarge {
            name,
            size,
            limit: MAX_ENTRY_BYTES,
        });
    }
    Ok(name)
}

/// Reads `r` to its end, refusing more than [`MAX_TRAILING_BYTES`].
fn drain_capped(r: &mut impl Read, after: &'static str) -> Result<(), ExtractError> {
    let n = io::copy(&mut r.by_ref().take(MAX_TRAILING_BYTES + 1), &mut io::sink()).map_err(corrupt)?;
    if n > MAX_TRAILING_BYTES {
        return Err(ExtractError::TrailingData {
            limit: MAX_TRAILING_BYTES,
            after,
        });
    }
    Ok(())
}

fn is_metadata(kind: EntryType) -> bool {
    kind.is_pax_local_extensions()
        || kind.is_pax_global_extensions()
        || kind.is_gnu_longname()
        || kind.is_gnu_longlink()
}

fn read_metadata<R: Read>(entry: &mut tar::Entry<'_, R>, name: &str) -> Result<Vec<u8>, ExtractError> {
    let size = entry.size();
    if size > MAX_METADATA_BYTES {
        let detail = format!("{size}-byte metadata record is over the {MAX_METADATA_BYTES}-byte limit");
        return Err(ExtractError::BadMetadata {
            name: name.to_string(),
            detail,
        });
    }
    let mut data = Vec::with_capacity(size as usize);
    entry.read_to_end(&mut data).map_err(corrupt)?;
    if data.len() as u64 != size {
        return Err(ExtractError::TruncatedEntry {
            name: name.to_string(),
            expected: size,
            actual: data.len() as u64,
        });
    }
    Ok(data)
}

fn trim_nul(mut data: Vec<u8>) -> Vec<u8> {
    while data.last() == Some(&0) {
        data.pop();
    }
    data
}

fn parse_pax(data: &[u8], name: &str, pending: &mut Pending) -> Result<(), ExtractError> {
    let bad = |detail: String| ExtractError::BadMetadata {
        name: name.to_string(),
        detail,
    };
    for ext in PaxExtensions::new(data) {
        let ext = ext.map_err(|e| bad(format!("malformed PAX record: {e}")))?;
        match ext.key_bytes() {
            b"path" => pending.pax_path = Some(ext.value_bytes().to_vec()),
            b"size" => {
                let size = ext.value().ok().and_then(|v| v.parse().ok());
                pending.pax_size = Some(size.ok_or_else(|| bad("malformed PAX size".to_string()))?);
            }
            _ => {}
        }
    }
    Ok(())
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Applies the naming and type rules. `Ok(None)` means "skip": the archive's
/// own `./` root directory, the only directory allowed.
fn check_name(raw: &[u8], kind: EntryType) -> Result<Option<String>, ExtractError> {
    let name = || lossy(raw);
    if raw.first() == Some(&b'/') {
        return Err(ExtractError::AbsolutePath { name: name() });
    }
    if raw.split(|b| *b == b'/').any(|c| c == b"..") {
        return Err(ExtractError::ParentDir { name: name() });
    }
    let stripped = raw.strip_prefix(b"./").unwrap_or(raw);
    if stripped.is_empty() || stripped == b"." {
        if kind == EntryType::Directory {
            return Ok(None);
        }
        return Err(ExtractError::BadName { name: name() });
    }
    if stripped.contains(&b'/') {
        return Err(ExtractError::NestedPath { name: name() });
    }
    let Ok(clean) = std::str::from_utf8(stripped) else {
        return Err(ExtractError::BadName { name: name() });
    };
    if kind != EntryType::Regular {
        return Err(ExtractError::EntryType {
            name: clean.to_string(),
            kind: kind_name(kind),
        });
    }
    Ok(Some(clean.to_string()))
}

fn kind_name(kind: EntryType) -> String {
    match kind {
        EntryType::Symlink => "symbolic link".into(),
        EntryType::Link => "hard link".into(),
        EntryType::Char => "character device".into(),
        EntryType::Block => "block device".into(),
        EntryType::Fifo => "FIFO".into(),
        EntryType::Directory => "directory".into(),
        EntryType::Continuous => "contiguous file".into(),
        EntryType::GNUSparse => "sparse file".into(),
        other => format!("entry of type {:?}", other.as_byte() as char),
    }
}

/// Mode given to an extracted file; modes stored in the archive are ignored.
pub fn normalised_mode(name: &str) -> u32 {
    if BINARIES.contains(&name) { 0o755 } else { 0o644 }
}

/// Writes one file entry to `dest` with its normalised mode, hashing it.
fn write_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    dest: &Path,
    name: String,
    size: u64,
    buf: &mut [u8],
    created: &mut Vec<PathBuf>,
) -> Result<ExtractedFile, ExtractError> {
    let path = dest.join(&name);
    let mode = normalised_mode(&name);
    let mut file = create_entry_file(&path, mode, created)?;
    let (written, sha256) = copy_hashed(entry, &mut file, &path, &name, buf)?;
    if written != size {
        return Err(ExtractError::TruncatedEntry {
            name,
            expected: size,
            actual: written,
        });
    }
    sync(&file, &path)?;
    Ok(ExtractedFile {
        name,
        sha256,
        size,
        mode,
    })
}

/// Creates a new file at `path` with exactly `mode`, noting it in `created`.
fn create_entry_file(path: &Path, mode: u32, created: &mut Vec<PathBuf>) -> Result<File, ExtractError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| ExtractError::CreateFile {
            path: path.to_path_buf(),
            source,
        })?;
    created.push(path.to_path_buf());
    // fchmod: the umask must not change the normalised mode.
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(|source| ExtractError::WriteFile {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(file)
}

/// Copies the entry's data into `file`, refusing more than [`MAX_ENTRY_BYTES`];
/// returns the byte count and SHA-256.
fn copy_hashed<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    file: &mut File,
    path: &Path,
    name: &str,
    buf: &mut [u8],
) -> Result<(u64, Sha256Hex), ExtractError> {
    let mut hasher = Sha256::new();
    let mut written = 0u64;
    loop {
        let n = entry.read(buf).map_err(corrupt)?;
        if n == 0 {
            break;
        }
        written += n as u64;
        if written > MAX_ENTRY_BYTES {
            return Err(ExtractError::TooLarge {
                name: name.to_string(),
                size: written,
                limit: MAX_ENTRY_BYTES,
            });
        }
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n]).map_err(|source| ExtractError::WriteFile {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok((written, Sha256Hex::from_bytes(&hasher.finalize())))
}

fn sync(file: &File, path: &Path) -> Result<(), ExtractError> {
    file.sync_all().map_err(|source| ExtractError::SyncFile {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_rules() {
        let reg = EntryType::Regular;
        assert_eq!(check_name(b"soci", reg).unwrap().as_deref(), Some("soci"));
        assert_eq!(check_name(b"./NOTICE.md", reg).unwrap().as_deref(), Some("NOTICE.md"));
        assert_eq!(check_name(b"./", EntryType::Directory).unwrap(), None);
        assert_eq!(check_name(b".", EntryType::Directory).unwrap(), None);
        assert!(matches!(
            check_name(b"/soci", reg),
            Err(ExtractError::AbsolutePath { .. })
        ));
        assert!(matches!(
            check_name(b"../soci", reg),
            Err(ExtractError::ParentDir { .. })
        ));
        assert!(matches!(
            check_name(b"a/../soci", reg),
            Err(ExtractError::ParentDir { .. })
        ));
        assert!(matches!(
            check_name(b"bin/soci", reg),
            Err(ExtractError::NestedPath { .. })
        ));
        assert!(matches!(
            check_name(b"././soci", reg),
            Err(ExtractError::NestedPath { .. })
        ));
        assert!(matches!(
            check_name(b"soci/", EntryType::Directory),
            Err(ExtractError::NestedPath { .. })
        ));
        assert!(matches!(check_name(b"./", reg), Err(ExtractError::BadName { .. })));
        assert!(matches!(check_name(b"", reg), Err(ExtractError::BadName { .. })));
        assert!(matches!(
            check_name(b"so\xffci", reg),
            Err(ExtractError::BadName { .. })
        ));
        assert!(matches!(
            check_name(b"soci", EntryType::Symlink),
            Err(ExtractError::EntryType { .. })
        ));
        assert!(matches!(
            check_name(b"soci", EntryType::Directory),
            Err(ExtractError::EntryType { .. })
        ));
    }

    #[test]
    fn modes_are_normalised() {
        assert_eq!(normalised_mode("soci-snapshotter-grpc"), 0o755);
        assert_eq!(normalised_mode("soci"), 0o755);
        assert_eq!(normalised_mode("NOTICE.md"), 0o644);
    }

    #[test]
    fn source_errors_are_not_verification_failures() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::ConnectionReset, "peer went away"))
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let expected = Sha256Hex::parse(&"0".repeat(64)).unwrap();
        let err = extract_verified(Failing, dir.path(), &expected).unwrap_err();
        assert!(matches!(err, ExtractError::Source { .. }), "{err:?}");
        assert!(!err.is_verification_failure());
    }

    #[test]
    fn garbage_is_a_verification_failure() {
        let dir = tempfile::tempdir().unwrap();
        let expected = Sha256Hex::parse(&"0".repeat(64)).unwrap();
        let err = extract_verified(&b"not a gzip stream at all"[..], dir.path(), &expected).unwrap_err();
        assert!(matches!(err, ExtractError::Corrupt { .. }), "{err:?}");
        assert!(err.is_verification_failure());
    }
}
