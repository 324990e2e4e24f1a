//! Image references, normalized the way containerd's CRI and kubelet do it
//! (the distribution `reference` grammar): `nginx` is
//! `docker.io/library/nginx:latest`, `host:5000/app` keeps its registry, a
//! digest reference keeps its digest.

use std::fmt;

/// A parsed, validated image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// Registry host with optional port (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// Repository path inside the registry (`library/nginx`, `ml/train`).
    pub repository: String,
    pub tag: Option<String>,
    /// `algorithm:hex`.
    pub digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {reference:?}: {reason}")]
pub struct RefError {
    pub reference: String,
    pub reason: &'static str,
}

const MAX_NAME: usize = 255;

impl ImageRef {
    /// Parses and normalizes `text` (docker.io and `library/` defaults, tag
    /// `latest` when neither tag nor digest is given).
    pub fn parse(text: &str) -> Result<ImageRef, RefError> {
        let err = |reason| RefError {
            reference: text.to_string(),
            reason,
        };
        if text.is_empty() {
            return Err(err("empty"));
        }
        if text.trim() != text {
            return Err(err("surrounding whitespace"));
        }
        let (name, tag, digest) = split_reference(text).map_err(err)?;
        let (registry, repository) = locate(name).map_err(err)?;
        let tag = match (tag, digest) {
            (None, None) => Some("latest".to_string()),
            (t, _) => t.map(str::to_string),
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest: digest.map(str::to_string),
        })
    }

    /// `registry/repository`: what two images "in the same repo" share.
    pub fn repo(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

/// `name[:tag][@digest]` into its checked parts (a tag follows the last ':' after the last '/').
fn split_reference(text: &str) -> Result<(&str, Option<&str>, Option<&str>), &'static str> {
    let (name_tag, digest) = match text.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (text, None),
    };
    if let Some(d) = digest {
        check_digest(d)?;
    }
    let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match name_tag[last_slash..].rfind(':') {
        Some(i) => (&name_tag[..last_slash + i], Some(&name_tag[last_slash + i + 1..])),
        None => (name_tag, None),
    };
    if let Some(t) = tag {
        check_tag(t)?;
    }
    Ok((name, tag, digest))
}

/// The registry (docker.io when the name has none; its aliases folded) and the checked
/// repository path (`library/` added for docker.io's official images).
fn locate(name: &str) -> Result<(String, String), &'static str> {
    if name.len() > MAX_NAME {
        return Err("repository name longer than 255 characters");
    }
    let (registry, path) = match name.split_once('/') {
        Some((first, rest)) if is_domain(first) => (first, rest),
        _ => ("docker.io", name),
    };
    check_domain(registry)?;
    let registry = match registry {
        "index.docker.io" | "registry-1.docker.io" => "docker.io",
        _ => registry,
    };
    let repository = if registry == "docker.io" && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_string()
    };
    for component in repository.split('/') {
        check_path_component(component)?;
    }
    Ok((registry.to_string(), repository))
}

/// The normalized reference: `registry/repository[:tag][@digest]`.
impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// The distribution rule: the first component names a registry when it has
/// a `.` or `:`, is `localhost`, or has an uppercase letter.
fn is_domain(first: &str) -> bool {
    first.contains(['.', ':']) || first == "localhost" || first.chars().any(|c| c.is_ascii_uppercase())
}

fn check_domain(domain: &str) -> Result<(), &'static str> {
    let (host, port) = match domain.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (domain, None),
    };
    if let Some(p) = port
        && (p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("registry port is not a number");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.split('.').all(label_ok) {
        Ok(())
    } else {
        Err("registry host is not a valid domain name")
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn check_path_component(c: &str) -> Result<(), &'static str> {
    const BAD: &str = "repository path must be lowercase letters, digits and single . _ __ or - separators";
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return Err(BAD);
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return Err(BAD);
        }
    }
    Ok(())
}

/// `[\w][\w.-]{0,127}`
fn check_tag(t: &str) -> Result<(), &'static str> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = t.as_bytes();
    if b.is_empty() || b.len() > 128 || !word(b[0]) || !b.iter().all(|&x| word(x) || x == b'.' || x == b'-') {
        return Err("tag must be 1-128 of [A-Za-z0-9_.-], not starting with . or -");
    }
    Ok(())
}

fn check_digest(d: &str) -> Result<(), &'static str> {
    let Some((alg, hex)) = d.split_once(':') else {
        return Err("digest must be algorithm:hex");
    };
    let hex_ok = |n: usize| hex.len() == n && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    match alg {
        "sha256" if hex_ok(64) => Ok(()),
        "sha512" if hex_ok(128) => Ok(()),
        "sha256" | "sha512" => Err("digest hex has the wrong length or is not lowercase hex"),
        _ => Err("digest algorithm must be sha256 or sha512"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        ImageRef::parse(s).unwrap().to_string()
    }

    #[test]
    fn normalizes_like_containerd() {
        assert_eq!(norm("nginx"), "docker.io/library/nginx:latest");
        assert_eq!(norm("nginx:1.25"), "docker.io/library/nginx:1.25");
        assert_eq!(norm("bitnami/redis"), "docker.io/bitnami/redis:latest");
        assert_eq!(norm("index.docker.io/library/x:1"), "docker.io/library/x:1");
        assert_eq!(norm("127.0.0.1:5000/app:1"), "127.0.0.1:5000/app:1");
        assert_eq!(norm("localhost/app"), "localhost/app:latest");
        assert_eq!(norm("public.ecr.aws/org/app:1.2"), "public.ecr.aws/org/app:1.2");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(
            norm(&format!("registry.example/ml/train@{d}")),
            format!("registry.example/ml/train@{d}")
        );
        assert_eq!(norm(&format!("r.io/a:t@{d}")), format!("r.io/a:t@{d}"));
        let r = ImageRef::parse("host:5000/a/b:t").unwrap();
        assert_eq!((r.registry.as_str(), r.repo().as_str()), ("host:5000", "host:5000/a/b"));
    }

    #[test]
    fn refuses_bad_references() {
        for bad in [
            "",
            "upper/Case",
            "r.io/App:1",
            "r.io/a:",
            "r.io/a:-x",
            "r.io/a@sha256:abc",
            "r.io/a@md5:00",
            "r.io//a",
            "r.io/a..b",
            "r.io:x/a",
            " a",
            "a b",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(ImageRef::parse("a__b/c-d--e/f.g_h").is_ok());
    }
}
