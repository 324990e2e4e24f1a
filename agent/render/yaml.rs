//! The two YAML pieces the renderers write by hand (serde_yaml is not a
//! runtime dependency): double-quoted scalars and literal block scalars.

/// A double-quoted scalar. JSON string syntax is a subset of YAML's
/// double-quoted style, so serde_json's escaping is exact.
pub fn quote(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// `key: |` followed by `text` as a literal block scalar whose lines are
/// indented by `indent` spaces (the key itself sits at `indent - 2`).
/// The header gets an indentation indicator when the first line starts with
/// a space, and the chomping indicator that reproduces `text`'s trailing
/// newlines exactly. `text` must be printable ASCII plus LF and tab.
pub fn block_scalar(key: &str, text: &str, indent: usize) -> String {
    assert!(indent >= 2, "a block scalar is indented under its key");
    assert!(
        text.bytes()
            .all(|b| b == b'\n' || b == b'\t' || (b' '..=b'~').contains(&b)),
        "block scalar text must be printable ASCII"
    );
    let key_indent = " ".repeat(indent - 2);
    let pad = " ".repeat(indent);
    let indicator = match text.lines().find(|l| !l.is_empty()) {
        Some(l) if l.starts_with(' ') => "2",
        _ => "",
    };
    let chomp = if !text.ends_with('\n') {
        "-"
    } else if text.ends_with("\n\n") || text == "\n" {
        "+"
    } else {
        ""
    };
    let mut out = format!("{key_indent}{key}: |{indicator}{chomp}\n");
    for line in text.lines() {
        if !line.is_empty() {
            out.push_str(&pad);
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_escapes() {
        assert_eq!(quote("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(quote("plain"), "\"plain\"");
    }

    #[test]
    fn block_scalar_headers() {
        assert_eq!(block_scalar("k", "a\n\nb\n", 4), "  k: |\n    a\n\n    b\n");
        assert_eq!(block_scalar("k", "a", 2), "k: |-\n  a\n");
        assert_eq!(block_scalar("k", "a\n\n", 2), "k: |+\n  a\n\n");
        assert_eq!(block_scalar("k", " a\n", 2), "k: |2\n   a\n");
    }
}
