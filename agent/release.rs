//! Naming of SOCI releases: versions, architectures, flavors, URLs and the
//! published `.sha256sum` format. Pure; no I/O.

pub mod extract;
pub mod fetch;
pub mod store;

use std::fmt;
use std::str::FromStr;

/// Expands to the default SOCI version as a literal (for `concat!`).
#[macro_export]
macro_rules! default_soci_version {
    () => {
        "0.16.1"
    };
}
/// Newest SOCI release recorded in the reference; the default `--soci-version`.
pub const DEFAULT_SOCI_VERSION: &str = default_soci_version!();
/// Parallel pull/unpack mode first shipped in this release.
pub const MIN_SOCI_VERSION: Version = Version {
    major: 0,
    minor: 11,
    patch: 0,
};
/// First release with the fixes for soci-snapshotter issues 2035 (shared
/// layers + discarded layers: "compressed digests did not match") and 2036
/// (concurrent pulls of one image crashing the daemon). `--preinstalled auto`
/// replaces a preinstalled SOCI older than this.
pub const FIXED_SOCI_VERSION: Version = Version {
    major: 0,
    minor: 16,
    patch: 0,
};
/// Default base of the release tree.
pub const DEFAULT_RELEASE_URL: &str = "https://github.com/awslabs/soci-snapshotter/releases/download";

/// The only entry names a release archive may contain.
pub const ARCHIVE_ENTRIES: [&str; 4] = ["soci-snapshotter-grpc", "soci", "THIRD_PARTY_LICENSES", "NOTICE.md"];
/// Entries installed as executables into the versioned store.
pub const BINARIES: [&str; 2] = ["soci-snapshotter-grpc", "soci"];
/// The daemon binary; a release without it is refused.
pub const DAEMON_BINARY: &str = "soci-snapshotter-grpc";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReleaseError {
    #[error("invalid SOCI version {0:?}: expected MAJOR.MINOR.PATCH, e.g. 0.15.0")]
    BadVersion(String),
    #[error("SOCI {0} has no parallel pull/unpack mode; use {MIN_SOCI_VERSION} or newer")]
    TooOld(Version),
    #[error("unsupported architecture {0:?}: soci-agent supports amd64 (x86_64) and arm64 (aarch64)")]
    BadArch(String),
    #[error("invalid flavor {0:?}: expected static or dynamic")]
    BadFlavor(String),
    #[error("invalid SHA-256 digest {0:?}: expected 64 hex characters")]
    BadDigest(String),
    #[error("checksum file for {expected}: {reason}")]
    BadChecksumFile { expected: String, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl FromStr for Version {
    type Err = ReleaseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ReleaseError::BadVersion(s.to_string());
        let t = s.trim().strip_prefix('v').unwrap_or(s.trim());
        let mut parts = t.split('.');
        let mut next = || -> Result<u32, ReleaseError> {
            let p = parts.next().ok_or_else(bad)?;
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) || p.len() > 6 {
                return Err(bad());
            }
            p.parse().map_err(|_| bad())
        };
        let v = Version {
            major: next()?,
            minor: next()?,
            patch: next()?,
        };
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(v)
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

impl Version {
    /// Parses and refuses releases without parallel mode.
    pub fn parse_supported(s: &str) -> Result<Self, ReleaseError> {
        let v: Version = s.parse()?;
        if v < MIN_SOCI_VERSION {
            return Err(ReleaseError::TooOld(v));
        }
        Ok(v)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    /// Maps a kernel machine name (`uname -m`) to a release architecture.
    pub fn from_machine(machine: &str) -> Result<Self, ReleaseError> {
        match machine {
            "x86_64" | "amd64" => Ok(Arch::Amd64),
            "aarch64" | "arm64" => Ok(Arch::Arm64),
            other => Err(ReleaseError::BadArch(other.to_string())),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }
}

impl FromStr for Arch {
    type Err = ReleaseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "amd64" => Ok(Arch::Amd64),
            "arm64" => Ok(Arch::Arm64),
            other => Err(ReleaseError::BadArch(other.to_string())),
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flavor {
    #[default]
    Static,
    Dynamic,
}

impl FromStr for Flavor {
    type Err = ReleaseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "static" => Ok(Flavor::Static),
            "dynamic" => Ok(Flavor::Dynamic),
            other => Err(ReleaseError::BadFlavor(other.to_string())),
        }
    }
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Flavor::Static => "static",
            Flavor::Dynamic => "dynamic",
        })
    }
}

/// A SHA-256 digest as 64 lowercase hex characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sha256Hex(String);

impl Sha256Hex {
    pub fn parse(s: &str) -> Result<Self, ReleaseError> {
        let t = s.trim();
        let t = t.strip_prefix("sha256:").unwrap_or(t);
        if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ReleaseError::BadDigest(s.to_string()));
        }
        Ok(Sha256Hex(t.to_ascii_lowercase()))
    }
    pub fn from_bytes(bytes: &[u8]) -> Self {
        use std::fmt::Write;
        let mut s = String::with_capacity(64);
        for b in bytes {
            let _ = write!(s, "{b:02x}");
        }
        Sha256Hex(s)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Sha256Hex {
    type Error = ReleaseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Sha256Hex::parse(&s)
    }
}

impl From<Sha256Hex> for String {
    fn from(d: Sha256Hex) -> String {
        d.0
    }
}

impl fmt::Display for Sha256Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One release artifact: version, architecture and flavor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseSpec {
    pub version: Version,
    pub arch: Arch,
    pub flavor: Flavor,
}

impl ReleaseSpec {
    /// `soci-snapshotter-{VER}-linux-{ARCH}[-static].tar.gz`
    pub fn archive_name(&self) -> String {
        let suffix = match self.flavor {
            Flavor::Static => "-static",
            Flavor::Dynamic => "",
        };
        format!("soci-snapshotter-{}-linux-{}{}.tar.gz", self.version, self.arch, suffix)
    }
    /// `{base}/v{VER}/{archive}`
    pub fn archive_url(&self, base: &str) -> String {
        format!(
            "{}/v{}/{}",
            base.trim_end_matches('/'),
            self.version,
            self.archive_name()
        )
    }
    pub fn checksum_url(&self, base: &str) -> String {
        format!("{}.sha256sum", self.archive_url(base))
    }
    /// Directory name in the versioned store: `{VER}-{ARCH}`.
    pub fn store_name(&self) -> String {
        format!("{}-{}", self.version, self.arch)
    }
}

/// Parses `sha256sum` output for `expected_name`: `<64 hex>  <name>` (also
/// accepts the binary-mode marker `*name` and a bare digest line).
pub fn parse_sha256sum(text: &str, expected_name: &str) -> Result<Sha256Hex, ReleaseError> {
    let bad = |reason: &str| ReleaseError::BadChecksumFile {
        expected: expected_name.to_string(),
        reason: reason.to_string(),
    };
    let mut found = None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let mut it = line.splitn(2, char::is_whitespace);
        let digest = it.next().unwrap_or_default();
        let name = it.next().map(|n| n.trim_start().trim_start_matches('*'));
        let digest = Sha256Hex::parse(digest)
            .map_err(|_| bad(&format!("line {line:?} does not start with a SHA-256 digest")))?;
        match name {
            None | Some("") => found = found.or(Some(digest)),
            Some(n) if n.rsplit('/').next() == Some(expected_name) => return Ok(digest),
            Some(_) => {}
        }
    }
    found.ok_or_else(|| bad("no digest for this file name"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_urls_follow_release_layout() {
        let spec = ReleaseSpec {
            version: "0.11.1".parse().unwrap(),
            arch: Arch::Amd64,
            flavor: Flavor::Dynamic,
        };
        assert_eq!(spec.archive_name(), "soci-snapshotter-0.11.1-linux-amd64.tar.gz");
        let spec = ReleaseSpec {
            flavor: Flavor::Static,
            arch: Arch::Arm64,
            ..spec
        };
        assert_eq!(
            spec.archive_url("https://example.org/dl/"),
            "https://example.org/dl/v0.11.1/soci-snapshotter-0.11.1-linux-arm64-static.tar.gz"
        );
        assert!(spec.checksum_url("http://m").ends_with("-static.tar.gz.sha256sum"));
        assert_eq!(spec.store_name(), "0.11.1-arm64");
    }

    #[test]
    fn versions_below_parallel_mode_are_refused() {
        assert_eq!(
            Version::parse_supported("0.10.9"),
            Err(ReleaseError::TooOld("0.10.9".parse().unwrap()))
        );
        assert!(Version::parse_supported("v0.11.0").is_ok());
        assert!(Version::parse_supported("1.2").is_err());
        assert!(Version::parse_supported("0.15.0-rc1").is_err());
    }

    #[test]
    fn arch_mapping() {
        assert_eq!(Arch::from_machine("x86_64").unwrap(), Arch::Amd64);
        assert_eq!(Arch::from_machine("aarch64").unwrap(), Arch::Arm64);
        assert!(Arch::from_machine("riscv64").is_err());
    }

    #[test]
    fn sha256sum_parsing() {
        let d = "3f5a".repeat(16);
        let name = "soci-snapshotter-0.11.1-linux-amd64.tar.gz";
        assert_eq!(parse_sha256sum(&format!("{d}  {name}\n"), name).unwrap().as_str(), d);
        assert_eq!(
            parse_sha256sum(&format!("{}  *{name}\n", d.to_uppercase()), name)
                .unwrap()
                .as_str(),
            d
        );
        assert!(parse_sha256sum(&format!("{d}  other.tar.gz\n"), name).is_err());
        assert!(parse_sha256sum("not a digest  x\n", name).is_err());
        assert!(parse_sha256sum("", name).is_err());
    }
}
