//! YAML output through `serde_yaml_ng`: the renderers describe their objects
//! as serde structs and this writes them (quoting where YAML needs it,
//! multi-line strings as literal block scalars), after a comment header.

use serde::Serialize;

/// `value` as one YAML document, preceded by `header` lines as `# ` comments.
pub fn document<T: Serialize>(header: &[&str], value: &T) -> String {
    let mut out: String = header.iter().map(|l| format!("# {l}\n")).collect();
    // Structs of strings, numbers and booleans always serialize.
    out.push_str(&serde_yaml_ng::to_string(value).expect("a render object serializes to YAML"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Doc {
        name: &'static str,
        tricky: &'static str,
        text: &'static str,
    }

    #[test]
    fn quotes_what_needs_it_and_keeps_text_exact() {
        let d = Doc {
            name: "plain",
            tricky: "true",
            text: "line 1\n  indented \"q\"\n\nlast\n",
        };
        let y = document(&["made by a test"], &d);
        assert!(y.starts_with("# made by a test\nname: plain\n"), "{y}");
        assert!(y.contains("tricky: 'true'\n"), "{y}");
        assert!(y.contains("text: |\n"), "{y}");
        let back: serde_yaml_ng::Value = serde_yaml_ng::from_str(&y).unwrap();
        assert_eq!(back["tricky"].as_str(), Some("true"));
        assert_eq!(back["text"].as_str(), Some(d.text));
    }
}
