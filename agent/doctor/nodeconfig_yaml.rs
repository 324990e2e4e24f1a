//! NodeConfig and kubelet sources read as nodeadm reads them, with
//! `serde_yaml_ng`: YAML or JSON (anchors and aliases, `<<` merge keys, flow
//! style, block scalars, comments, several `---` documents in one file), and
//! user data in MIME multipart form (parsed with `mail-parser`), whose
//! `application/node.eks.aws` parts are NodeConfigs. Later documents win,
//! as in nodeadm's merge.

use serde::Deserialize;
use serde_yaml_ng::Value;

/// NodeConfig's MIME type in user data.
const NODECONFIG_MIME: &str = "application/node.eks.aws";

/// Why a source could not be read as NodeConfig documents.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("not valid YAML")]
    Yaml(#[source] serde_yaml_ng::Error),
    #[error("MIME user data that does not parse as multipart")]
    Mime,
    #[error("a {NODECONFIG_MIME} part is not UTF-8")]
    NotUtf8,
}

/// The documents of one source, in order (empty documents left out).
#[derive(Debug, Default)]
pub struct Documents(Vec<Value>);

impl Documents {
    /// Reads `text`: MIME multipart user data, else YAML/JSON documents.
    pub fn parse(text: &str) -> Result<Self, ReadError> {
        if is_mime(text) {
            return Self::parse_mime(text);
        }
        let mut docs = Vec::new();
        Self::push_yaml(text, &mut docs)?;
        Ok(Documents(docs))
    }

    fn push_yaml(text: &str, docs: &mut Vec<Value>) -> Result<(), ReadError> {
        for de in serde_yaml_ng::Deserializer::from_str(text) {
            let mut doc = Value::deserialize(de).map_err(ReadError::Yaml)?;
            doc.apply_merge().map_err(ReadError::Yaml)?;
            if !doc.is_null() {
                docs.push(doc);
            }
        }
        Ok(())
    }

    /// The NodeConfig parts of MIME user data (shell parts and the like are not NodeConfigs).
    fn parse_mime(text: &str) -> Result<Self, ReadError> {
        use mail_parser::{MessageParser, MimeHeaders};
        let msg = MessageParser::default().parse(text.as_bytes()).ok_or(ReadError::Mime)?;
        let mut docs = Vec::new();
        for part in msg.parts.iter() {
            let Some(ct) = part.content_type() else { continue };
            let mime = format!("{}/{}", ct.c_type, ct.c_subtype.as_deref().unwrap_or(""));
            if !mime.eq_ignore_ascii_case(NODECONFIG_MIME) {
                continue;
            }
            let body = std::str::from_utf8(part.contents()).map_err(|_| ReadError::NotUtf8)?;
            Self::push_yaml(body, &mut docs)?;
        }
        Ok(Documents(docs))
    }

    /// The value at `path` in the last document that has one.
    pub fn get(&self, path: &[&str]) -> Option<&Value> {
        self.0.iter().rev().find_map(|doc| {
            path.iter()
                .try_fold(doc, |v, key| v.as_mapping()?.get(*key))
                .filter(|v| !v.is_null())
        })
    }

    /// The string at `path` (a scalar shown as text), if any.
    pub fn string(&self, path: &[&str]) -> Option<String> {
        match self.get(path)? {
            Value::String(s) => Some(s.clone()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }

    /// `spec.featureGates.FastImagePull`, when set to a boolean.
    pub fn fast_image_pull(&self) -> Option<bool> {
        match self.get(&["spec", "featureGates", "FastImagePull"])? {
            Value::Bool(b) => Some(*b),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
    }
}

/// User data in MIME form starts with its headers (`MIME-Version` or `Content-Type`).
fn is_mime(text: &str) -> bool {
    let first = text.trim_start().lines().next().unwrap_or("");
    let name = first.split(':').next().unwrap_or("").trim();
    ["mime-version", "content-type"]
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DROPIN: &str = "# c\napiVersion: node.eks.aws/v1alpha1\nkind: NodeConfig\nspec:\n  containerd:\n    config: |\n      [proxy_plugins.soci]\n        type = \"snapshot\"\n\n      [x]\n  kubelet:\n    config:\n      imageServiceEndpoint: unix:///run/s.sock # here\n  featureGates:\n    FastImagePull: true\n";

    #[test]
    fn reads_block_scalars_and_nested_keys() {
        let d = Documents::parse(DROPIN).unwrap();
        assert_eq!(
            d.string(&["spec", "containerd", "config"]).unwrap(),
            "[proxy_plugins.soci]\n  type = \"snapshot\"\n\n[x]\n"
        );
        assert_eq!(
            d.string(&["spec", "kubelet", "config", "imageServiceEndpoint"])
                .unwrap(),
            "unix:///run/s.sock"
        );
        assert_eq!(d.string(&["kind"]).unwrap(), "NodeConfig");
        assert_eq!(d.fast_image_pull(), Some(true));
        let json = Documents::parse("{\"spec\":{\"featureGates\":{\"FastImagePull\" : true}}}").unwrap();
        assert_eq!(json.fast_image_pull(), Some(true));
        let off = Documents::parse("spec:\n  featureGates: {FastImagePull: false}\n").unwrap();
        assert_eq!(off.fast_image_pull(), Some(false));
    }

    #[test]
    fn anchors_merge_keys_flow_style_and_later_documents_win() {
        let text = "x-gates: &gates\n  FastImagePull: true\nspec:\n  featureGates:\n    <<: *gates\n  \
                    kubelet: {config: {imageServiceEndpoint: 'unix:///a.sock'}}\n---\n# the second document\n\
                    spec:\n  kubelet:\n    config:\n      imageServiceEndpoint: >-\n        unix:///b.sock\n";
        let d = Documents::parse(text).unwrap();
        assert_eq!(d.fast_image_pull(), Some(true), "through the merge key");
        assert_eq!(
            d.string(&["spec", "kubelet", "config", "imageServiceEndpoint"])
                .unwrap(),
            "unix:///b.sock",
            "the later document wins"
        );
    }

    #[test]
    fn mime_user_data_yields_its_nodeconfig_parts() {
        let mime = "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"//\"\n\n--//\n\
                    Content-Type: text/x-shellscript\n\n#!/bin/sh\necho FastImagePull: false\n--//\n\
                    Content-Type: application/node.eks.aws\n\n---\napiVersion: node.eks.aws/v1alpha1\nkind: NodeConfig\n\
                    spec:\n  featureGates:\n    FastImagePull: true\n\n--//--\n";
        let d = Documents::parse(mime).unwrap();
        assert_eq!(d.fast_image_pull(), Some(true));
        assert_eq!(d.string(&["kind"]).unwrap(), "NodeConfig");
    }

    #[test]
    fn broken_yaml_is_an_error() {
        let e = Documents::parse("spec: [unclosed\n").unwrap_err();
        assert!(e.to_string().starts_with("not valid YAML"), "{e}");
    }
}
