//! MIME multipart user data in the shape Karpenter re-serializes it to:
//! boundary `//`, each part carrying only its `Content-Type`, LF line ends
//! (cloud-init on AL2023 and nodeadm both accept them).

use super::RenderError;

/// EC2's limit on raw user data (before base64).
pub const USER_DATA_LIMIT: usize = 16 * 1024;

pub const BOUNDARY: &str = "//";
pub const SHELL_SCRIPT: &str = "text/x-shellscript; charset=\"us-ascii\"";
pub const NODE_CONFIG: &str = "application/node.eks.aws";

/// One part: its `Content-Type` header value and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub content_type: &'static str,
    pub body: String,
}

/// Assembles the multipart document. Bodies must be printable ASCII text
/// (plus LF and tab) with no line starting with the boundary delimiter;
/// the renderers only ever pass such text, so anything else is a bug.
pub fn multipart(parts: &[Part]) -> String {
    let delimiter = format!("--{BOUNDARY}");
    let mut out = format!("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"{BOUNDARY}\"\n\n");
    for p in parts {
        assert!(
            p.body
                .bytes()
                .all(|b| b == b'\n' || b == b'\t' || (b' '..=b'~').contains(&b)),
            "MIME part {} is not printable ASCII text",
            p.content_type
        );
        assert!(
            !p.body.lines().any(|l| l.starts_with(&delimiter)),
            "MIME part {} contains the boundary",
            p.content_type
        );
        out.push_str(&delimiter);
        out.push('\n');
        out.push_str("Content-Type: ");
        out.push_str(p.content_type);
        out.push_str("\n\n");
        out.push_str(&p.body);
        if !p.body.ends_with('\n') {
            out.push('\n');
        }
    }
    out.push_str(&delimiter);
    out.push_str("--\n");
    out
}

/// Refuses user data over [`USER_DATA_LIMIT`], naming its size and what
/// makes it large.
pub fn check_size(user_data: &str, prefetch_images: usize) -> Result<(), RenderError> {
    let size = user_data.len();
    if size <= USER_DATA_LIMIT {
        return Ok(());
    }
    let hint = if prefetch_images > 0 {
        format!("; it lists {prefetch_images} --prefetch images: put the list in the AMI or fetch it at boot instead")
    } else {
        String::new()
    };
    Err(RenderError::TooLarge {
        size,
        limit: USER_DATA_LIMIT,
        hint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_delimited_and_closed() {
        let m = multipart(&[
            Part {
                content_type: SHELL_SCRIPT,
                body: "#!/bin/sh\necho hi\n".into(),
            },
            Part {
                content_type: NODE_CONFIG,
                body: "kind: NodeConfig".into(),
            },
        ]);
        assert_eq!(
            m,
            "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"//\"\n\n--//\n\
             Content-Type: text/x-shellscript; charset=\"us-ascii\"\n\n#!/bin/sh\necho hi\n--//\n\
             Content-Type: application/node.eks.aws\n\nkind: NodeConfig\n--//--\n"
        );
    }

    #[test]
    #[should_panic(expected = "boundary")]
    fn a_body_with_the_boundary_is_a_bug() {
        multipart(&[Part {
            content_type: NODE_CONFIG,
            body: "a\n--//\nb\n".into(),
        }]);
    }

    #[test]
    fn size_limit_is_inclusive() {
        assert!(check_size(&"x".repeat(USER_DATA_LIMIT), 0).is_ok());
        let err = check_size(&"x".repeat(USER_DATA_LIMIT + 1), 3).unwrap_err().to_string();
        assert!(err.contains("16385 bytes") && err.contains("3 --prefetch"), "{err}");
    }
}
