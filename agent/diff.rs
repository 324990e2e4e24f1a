//! Unified diffs for `--dry-run` and reports.

/// A unified diff from `old` (None = file absent) to `new`, with node-path
/// headers. Empty when nothing changes.
pub fn unified(path: &str, old: Option<&str>, new: &str) -> String {
    let old_text = old.unwrap_or("");
    if old == Some(new) {
        return String::new();
    }
    let from = if old.is_some() {
        format!("a{path}")
    } else {
        "/dev/null".to_string()
    };
    similar::TextDiff::from_lines(old_text, new)
        .unified_diff()
        .context_radius(3)
        .header(&from, &format!("b{path}"))
        .to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn diff_shows_changes_only() {
        assert_eq!(super::unified("/x", Some("a\n"), "a\n"), "");
        let d = super::unified("/etc/x", Some("a\nb\n"), "a\nc\n");
        assert!(d.contains("--- a/etc/x") && d.contains("-b") && d.contains("+c"), "{d}");
        assert!(super::unified("/etc/y", None, "n\n").starts_with("--- /dev/null"));
    }
}
