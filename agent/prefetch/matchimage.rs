//! kubelet's image matching (`credentialprovider.URLsMatchStr`), used for a
//! credential provider's `matchImages`, for the keys of the `auth` map it
//! returns and for the keys of a docker `config.json`:
//! - the pattern and the image are read as scheme-less URLs (`host[:port]/path`);
//! - ports must be equal (both absent, or the same number);
//! - the hosts must have the same number of dot-separated labels, each label
//!   matched by the pattern's label as a Go `filepath.Match` glob (`*`, `?`,
//!   `[a-z]`, `[^0-9]`, `\` escapes), so `*.dkr.ecr.*.amazonaws.com` matches
//!   `1234.dkr.ecr.us-east-1.amazonaws.com` but not `a.b.dkr.ecr...`;
//! - the pattern's path must be a string prefix of the image's path.

/// Whether `pattern` matches `image` (both `host[:port][/path]`, with an
/// optional `scheme://` prefix, which is ignored).
pub fn matches(pattern: &str, image: &str) -> bool {
    let (p_host, p_port, p_path) = split(pattern);
    let (i_host, i_port, i_path) = split(image);
    if p_port != i_port || !i_path.starts_with(p_path) {
        return false;
    }
    let p_labels: Vec<&str> = p_host.split('.').collect();
    let i_labels: Vec<&str> = i_host.split('.').collect();
    p_labels.len() == i_labels.len()
        && p_labels
            .iter()
            .zip(&i_labels)
            .all(|(p, i)| glob(p.as_bytes(), i.as_bytes()) == Some(true))
}

/// `(host, port, path)`; path keeps its leading `/` (empty when absent).
fn split(s: &str) -> (&str, &str, &str) {
    let s = s.split_once("://").map_or(s, |(_, rest)| rest);
    let (authority, path) = match s.find('/') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => (h, p, path),
        _ => (authority, "", path),
    }
}

/// Go `filepath.Match` on one label (no separators inside): `None` for a
/// malformed pattern, which kubelet treats as no match.
fn glob(p: &[u8], s: &[u8]) -> Option<bool> {
    match p.first() {
        None => Some(s.is_empty()),
        Some(b'*') => {
            let rest = &p[1..];
            // Validate the rest once even when `s` is exhausted, as Go does.
            for i in 0..=s.len() {
                if glob(rest, &s[i..])? {
                    return Some(true);
                }
            }
            Some(false)
        }
        Some(b'?') => Some(!s.is_empty() && glob(&p[1..], &s[1..])?),
        Some(b'[') => {
            let (matched, len) = class(&p[1..], s.first().copied())?;
            Some(!s.is_empty() && matched && glob(&p[1 + len..], &s[1..])?)
        }
        Some(b'\\') => {
            let c = *p.get(1)?;
            Some(s.first() == Some(&c) && glob(&p[2..], &s[1..])?)
        }
        Some(&c) => Some(s.first() == Some(&c) && glob(&p[1..], &s[1..])?),
    }
}

/// A `[...]` class after its `[`: (whether `c` is in it, bytes consumed incl. `]`).
fn class(p: &[u8], c: Option<u8>) -> Option<(bool, usize)> {
    let mut i = 0;
    let negated = p.first() == Some(&b'^');
    if negated {
        i += 1;
    }
    let mut hit = false;
    let mut first = true;
    loop {
        let b = *p.get(i)?;
        if b == b']' && !first {
            i += 1;
            break;
        }
        first = false;
        let lo = escaped(p, &mut i)?;
        let hi = if p.get(i) == Some(&b'-') && p.get(i + 1).is_some_and(|&n| n != b']') {
            i += 1;
            escaped(p, &mut i)?
        } else {
            lo
        };
        if lo > hi {
            return None;
        }
        if c.is_some_and(|c| lo <= c && c <= hi) {
            hit = true;
        }
    }
    Some((hit != negated, i))
}

fn escaped(p: &[u8], i: &mut usize) -> Option<u8> {
    let mut b = *p.get(*i)?;
    if b == b'\\' {
        *i += 1;
        b = *p.get(*i)?;
    } else if b == b'-' || b == b']' {
        return None;
    }
    *i += 1;
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubelet_examples() {
        let ecr = "*.dkr.ecr.*.amazonaws.com";
        assert!(matches(ecr, "123456789012.dkr.ecr.us-east-1.amazonaws.com/app"));
        assert!(!matches(ecr, "a.b.dkr.ecr.us-east-1.amazonaws.com/app"));
        assert!(!matches(ecr, "dkr.ecr.us-east-1.amazonaws.com/app"));
        assert!(matches("*.azurecr.io", "myregistry.azurecr.io/x"));
        assert!(matches("gcr.io", "gcr.io/p/i"));
        assert!(matches("*.*.registry.io", "a.b.registry.io/x"));
        assert!(!matches("*.*.registry.io", "b.registry.io/x"));
        assert!(matches("registry.io:8080/path", "registry.io:8080/path/to/image"));
        assert!(matches("registry.io:8080/path", "registry.io:8080/pathological"));
        assert!(!matches("registry.io:8080/path", "registry.io:8080/other"));
        assert!(!matches("registry.io", "registry.io:8080/x"));
        assert!(!matches("registry.io:8080", "registry.io/x"));
        assert!(matches("127.0.0.1:5000", "127.0.0.1:5000/app"));
        assert!(matches("https://127.0.0.1:5000", "127.0.0.1:5000/app"));
        assert!(matches("reg-?.example", "reg-1.example/x"));
        assert!(matches("reg[0-9].example", "reg7.example/x"));
        assert!(!matches("reg[^0-9].example", "reg7.example/x"));
        assert!(matches("reg\\*.example", "reg*.example/x"));
        assert!(
            !matches("reg[.example", "reg[.example/x"),
            "malformed pattern never matches"
        );
    }
}
