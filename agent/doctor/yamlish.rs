//! Just enough YAML to read NodeConfig drop-ins and kubelet drop-ins without
//! a YAML dependency: nested block maps, plain or quoted scalars, and `|` /
//! `>` block scalars. Lists, anchors and flow collections are skipped.

/// Every scalar found, as (key path, value), in file order.
pub fn values(text: &str) -> Vec<(Vec<String>, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with('-') || trimmed == "---" {
            continue;
        }
        let indent = line.len() - line.trim_start_matches(' ').len();
        let Some((key, value)) = split_key(trimmed) else {
            continue;
        };
        while stack.last().is_some_and(|(ind, _)| *ind >= indent) {
            stack.pop();
        }
        let mut path: Vec<String> = stack.iter().map(|(_, k)| k.clone()).collect();
        path.push(key.clone());
        if value.starts_with('|') || value.starts_with('>') {
            out.push((path, block_scalar(&lines, &mut i, indent, &value)));
        } else if value.is_empty() {
            stack.push((indent, key));
        } else {
            out.push((path, unquote(&value)));
        }
    }
    out
}

/// The block scalar (`|` or `>` in `header`) starting at `lines[*i]`, under a key indented
/// `indent`; advances `i` past it.
fn block_scalar(lines: &[&str], i: &mut usize, indent: usize, header: &str) -> String {
    let mut block = Vec::new();
    let mut block_indent = None;
    while *i < lines.len() {
        let l = lines[*i];
        let ind = l.len() - l.trim_start_matches(' ').len();
        if !l.trim().is_empty() && ind <= indent {
            break;
        }
        if !l.trim().is_empty() && block_indent.is_none() {
            block_indent = Some(ind);
        }
        block.push(l);
        *i += 1;
    }
    let cut = block_indent.unwrap_or(0);
    let mut s: String = block
        .iter()
        .map(|l| format!("{}\n", l.get(cut..).unwrap_or("")))
        .collect();
    while s.ends_with("\n\n") {
        s.pop();
    }
    if header.contains('-') {
        s = s.trim_end_matches('\n').to_string();
    }
    s
}

/// The last value at exactly `path`.
pub fn get(text: &str, path: &[&str]) -> Option<String> {
    values(text)
        .into_iter()
        .filter(|(p, _)| p.iter().map(String::as_str).eq(path.iter().copied()))
        .map(|(_, v)| v)
        .next_back()
}

fn split_key(line: &str) -> Option<(String, String)> {
    let (key, rest) = if let Some(q) = line.strip_prefix('"') {
        let end = q.find('"')?;
        (q[..end].to_string(), q[end + 1..].strip_prefix(':')?)
    } else if let Some(q) = line.strip_prefix('\'') {
        let end = q.find('\'')?;
        (q[..end].to_string(), q[end + 1..].strip_prefix(':')?)
    } else {
        let pos = line.find(": ").or_else(|| line.strip_suffix(':').map(|k| k.len()))?;
        (line[..pos].trim().to_string(), &line[pos + 1..])
    };
    let mut value = rest.trim().to_string();
    if !value.starts_with(['"', '\''])
        && let Some(pos) = value.find(" #")
    {
        value.truncate(pos);
        value = value.trim_end().to_string();
    }
    Some((key, value))
}

fn unquote(v: &str) -> String {
    let t = v.trim();
    for q in ['"', '\''] {
        if let Some(inner) = t.strip_prefix(q).and_then(|s| s.strip_suffix(q)) {
            return inner.to_string();
        }
    }
    t.to_string()
}

/// `FastImagePull: true` (YAML) or `"FastImagePull": true` (JSON) anywhere in `text`.
pub fn fast_image_pull_on(text: &str) -> bool {
    fast_image_pull(text) == Some(true)
}

/// The last `FastImagePull: true|false` in a NodeConfig (YAML or JSON), if any.
pub fn fast_image_pull(text: &str) -> Option<bool> {
    text.match_indices("FastImagePull")
        .filter_map(|(pos, m)| {
            let rest = text[pos + m.len()..].trim_start_matches(['"', '\'']);
            let rest = rest.trim_start().strip_prefix(':')?;
            let v = rest.trim_start().trim_start_matches(['"', '\'']);
            if v.get(..4).is_some_and(|w| w.eq_ignore_ascii_case("true")) {
                Some(true)
            } else if v.get(..5).is_some_and(|w| w.eq_ignore_ascii_case("false")) {
                Some(false)
            } else {
                None
            }
        })
        .last()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DROPIN: &str = "# c\napiVersion: node.eks.aws/v1alpha1\nkind: NodeConfig\nspec:\n  containerd:\n    config: |\n      [proxy_plugins.soci]\n        type = \"snapshot\"\n\n      [x]\n  kubelet:\n    config:\n      imageServiceEndpoint: unix:///run/s.sock # here\n  featureGates:\n    FastImagePull: true\n";

    #[test]
    fn reads_block_scalars_and_nested_keys() {
        assert_eq!(
            get(DROPIN, &["spec", "containerd", "config"]).unwrap(),
            "[proxy_plugins.soci]\n  type = \"snapshot\"\n\n[x]\n"
        );
        assert_eq!(
            get(DROPIN, &["spec", "kubelet", "config", "imageServiceEndpoint"]).unwrap(),
            "unix:///run/s.sock"
        );
        assert_eq!(get(DROPIN, &["kind"]).unwrap(), "NodeConfig");
        assert!(fast_image_pull_on(DROPIN));
        assert!(fast_image_pull_on("{\"featureGates\":{\"FastImagePull\" : true}}"));
        assert!(!fast_image_pull_on("featureGates:\n  FastImagePull: false\n"));
    }
}
