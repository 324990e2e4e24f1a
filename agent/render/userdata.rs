//! `render userdata`: the bootstrap shell part (from
//! `userdata/bootstrap.sh.in`) and the NodeConfig part, in MIME.

use crate::paths::{NODEADM_DROPIN, SOCI_ROOT};
use clap::Args;

use super::mime::{self, NODE_CONFIG, Part, SHELL_SCRIPT};
use super::{ContainerdVersion, RenderError, Rendered, check_soci_root, invalid, is_printable_word, wiring};
use crate::files::soci_config::{self, Tuning};
use crate::release::{DEFAULT_SOCI_VERSION, Sha256Hex, Version};

/// The shell template, kept as a file so operators can read it.
pub const BOOTSTRAP_TEMPLATE: &str = include_str!("../../userdata/bootstrap.sh.in");

/// First line of the agent config the script writes; the script rewrites a
/// config.toml only when it starts with this line (or does not exist).
pub const CONFIG_MARKER: &str =
    "# Written by soci-agent user data (soci-agent render); rewritten when the user data changes.";

const ARCHES: [&str; 2] = ["amd64", "arm64"];
/// Above this size a note warns that Karpenter's or EKS's merged NodeConfig may not fit.
const HEADROOM_NOTE: usize = 12 * 1024;

#[derive(Debug, Clone, Args)]
pub struct UserdataArgs {
    /// URL of the soci-agent binary; `{arch}` is replaced by amd64 or arm64, chosen on the node
    /// from `uname -m`. https:// (http:// allowed with a note: the digest still pins the binary).
    /// Without `{arch}` the render must be for one arch (only one --agent-sha256-ARCH): with both
    /// digests it is refused, since both arches would download the same binary.
    #[arg(long, value_name = "URL")]
    pub agent_url: String,

    /// SHA-256 of the amd64 soci-agent binary. Nodes of an arch without a digest refuse to run.
    #[arg(long, value_name = "HEX")]
    pub agent_sha256_amd64: Option<String>,

    /// SHA-256 of the arm64 soci-agent binary. At least one of the two digests is required.
    #[arg(long, value_name = "HEX")]
    pub agent_sha256_arm64: Option<String>,

    /// SOCI release the node installs (always passed to install, so the pins below stay valid).
    #[arg(long, value_name = "VER", default_value = DEFAULT_SOCI_VERSION)]
    pub soci_version: String,

    /// Pinned SHA-256 of the amd64 SOCI release tarball (install --sha256 on amd64 nodes).
    /// [default: the published .sha256sum]
    #[arg(long, value_name = "HEX")]
    pub soci_sha256_amd64: Option<String>,

    /// Pinned SHA-256 of the arm64 SOCI release tarball (install --sha256 on arm64 nodes).
    /// [default: the published .sha256sum]
    #[arg(long, value_name = "HEX")]
    pub soci_sha256_arm64: Option<String>,

    /// Base of the SOCI release tree, passed to install. [default: install's, GitHub releases]
    #[arg(long, value_name = "URL")]
    pub release_url: Option<String>,

    /// The snapshotter's state directory, passed to install and used in the NodeConfig part.
    /// [default: /var/lib/soci-snapshotter-grpc]
    #[arg(long, value_name = "DIR")]
    pub soci_root: Option<String>,

    /// install: parallel downloads across all images; <= 0 = unbounded. Validated now. [default: -1]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub max_concurrent_downloads: Option<i64>,

    /// install: parallel downloads per image, <= a bounded global limit. Validated now. [default: 20]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub max_concurrent_downloads_per_image: Option<i64>,

    /// install: layer download chunk size in SOCI's grammar (8mb, 1.5gb). Validated now. [default: 16mb]
    #[arg(long, value_name = "SIZE")]
    pub concurrent_download_chunk_size: Option<String>,

    /// install: parallel unpacks across all images; <= 0 = unbounded. Validated now. [default: -1]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub max_concurrent_unpacks: Option<i64>,

    /// install: parallel unpacks per image, <= a bounded global limit. Validated now. [default: 12]
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    pub max_concurrent_unpacks_per_image: Option<i64>,

    /// install: SOCI does not keep compressed layers in containerd's content store. [default: true]
    #[arg(long, value_name = "true|false")]
    pub discard_unpacked_layers: Option<bool>,

    /// Image to pre-pull (repeatable); the script writes the list to
    /// /etc/soci-agent/config.toml as [prefetch] images = [...] before install.
    #[arg(long = "prefetch", value_name = "IMAGE")]
    pub prefetch: Vec<String>,

    /// Add the NodeConfig drop-in as an application/node.eks.aws part, so nodeadm has the SOCI
    /// wiring from its first pass (on for EKS AL2023; set false for AMIs without nodeadm).
    #[arg(
        long,
        value_name = "BOOL",
        default_value_t = true,
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub nodeconfig_part: bool,

    /// containerd on the AMI, for the NodeConfig part: 2 (v3 table names) or 1.7 (v2).
    #[arg(long, value_enum, default_value = "2")]
    pub containerd_version: ContainerdVersion,

    /// install --data-volume: the device holding a snapshot cache (e.g. /dev/xvdb), mounted under
    /// containerd's and SOCI's roots before they start.
    #[arg(long, value_name = "DEVICE")]
    pub data_volume: Option<String>,

    /// install --format-data-volume (set by --data-volume-size without a snapshot).
    #[arg(skip)]
    pub format_data_volume: bool,
}

/// Everything the shell and NodeConfig parts need, validated.
#[derive(Debug)]
struct Checked {
    agent_urls: [String; 2],
    agent_sha256: [Option<Sha256Hex>; 2],
    soci_sha256: [Option<Sha256Hex>; 2],
    install_args: Vec<String>,
    agent_config: Option<String>,
    prefetch_count: usize,
    soci_root: String,
}

pub(super) fn render(a: &UserdataArgs) -> Result<Rendered, RenderError> {
    let mut notes = Vec::new();
    let text = build(a, Vec::new(), &mut notes)?;
    Ok(Rendered { text, notes })
}

/// The user data: `leading` parts (e.g. the cluster NodeConfig), the shell
/// part, then the SOCI NodeConfig part when enabled. Size-checked.
pub(super) fn build(a: &UserdataArgs, leading: Vec<Part>, notes: &mut Vec<String>) -> Result<String, RenderError> {
    let c = check(a, notes)?;
    let mut parts = leading;
    parts.push(Part {
        content_type: SHELL_SCRIPT,
        body: shell_script(&c),
    });
    if a.nodeconfig_part {
        parts.push(Part {
            content_type: NODE_CONFIG,
            body: nodeconfig_part(a.containerd_version, &c.soci_root),
        });
    }
    let text = mime::multipart(&parts);
    mime::check_size(&text, c.prefetch_count)?;
    if text.len() > HEADROOM_NOTE {
        notes.push(format!(
            "the user data is {} bytes: where Karpenter or EKS merge their NodeConfig into it (cluster CA, \
             2-3 KB), the result must still fit in EC2's {}",
            text.len(),
            mime::USER_DATA_LIMIT
        ));
    }
    Ok(text)
}

/// Validates every option (notes say what is allowed but worth knowing).
fn check(a: &UserdataArgs, notes: &mut Vec<String>) -> Result<Checked, RenderError> {
    let (agent_urls, agent_sha256) = check_agent(a, notes)?;
    let (version, soci_sha256) = check_soci_release(a, notes)?;
    let mut install_args = vec![format!("--soci-version={version}")];
    if let Some(u) = &a.release_url {
        let u = check_url("--release-url", u, notes)?;
        install_args.push(format!("--release-url={}", u.trim_end_matches('/')));
    }
    let soci_root = match &a.soci_root {
        Some(r) => {
            let r = check_soci_root(r)?;
            install_args.push(format!("--soci-root={r}"));
            r
        }
        None => SOCI_ROOT.to_string(),
    };
    install_args.extend(tuning_args(a)?);
    if let Some(d) = &a.data_volume {
        if !d.starts_with("/dev/") || !is_printable_word(d) {
            return Err(invalid(
                "--data-volume",
                d,
                "must be a device path under /dev, printable ASCII without spaces",
            ));
        }
        install_args.push(format!("--data-volume={d}"));
        if a.format_data_volume {
            install_args.push("--format-data-volume".into());
        }
    }

    let images = check_images(&a.prefetch)?;
    Ok(Checked {
        agent_urls,
        agent_sha256,
        soci_sha256,
        install_args,
        agent_config: (!images.is_empty()).then(|| agent_config(&images)),
        prefetch_count: images.len(),
        soci_root,
    })
}

/// The agent binary's URL per arch and its digests (at least one), with notes on what is missing.
fn check_agent(
    a: &UserdataArgs,
    notes: &mut Vec<String>,
) -> Result<([String; 2], [Option<Sha256Hex>; 2]), RenderError> {
    let url = check_url("--agent-url", &a.agent_url, notes)?;
    let agent_sha256 = [
        digest("--agent-sha256-amd64", &a.agent_sha256_amd64)?,
        digest("--agent-sha256-arm64", &a.agent_sha256_arm64)?,
    ];
    if agent_sha256.iter().all(Option::is_none) {
        return Err(RenderError::Missing {
            option: "--agent-sha256-amd64 or --agent-sha256-arm64",
            reason: "(the script never runs an unverified binary)",
        });
    }
    for (arch, d) in ARCHES.iter().zip(&agent_sha256) {
        if d.is_none() {
            notes.push(format!(
                "no --agent-sha256-{arch}: {arch} nodes will refuse to run the agent"
            ));
        }
    }
    if !url.contains("{arch}") && agent_sha256.iter().all(Option::is_some) {
        return Err(invalid(
            "--agent-url",
            &url,
            "has no {arch}, but both --agent-sha256-amd64 and --agent-sha256-arm64 are given: amd64 and arm64 \
             nodes would download the same file, which matches one digest at most. Put {arch} in the URL \
             (replaced by amd64 or arm64 on the node), or render for one arch (give only its digest)",
        ));
    }
    Ok((ARCHES.map(|arch| url.replace("{arch}", arch)), agent_sha256))
}

/// The SOCI release and its pinned tarball digests, with a note per arch left to the published sum.
fn check_soci_release(
    a: &UserdataArgs,
    notes: &mut Vec<String>,
) -> Result<(Version, [Option<Sha256Hex>; 2]), RenderError> {
    let version = Version::parse_supported(&a.soci_version).map_err(|source| RenderError::Release {
        option: "--soci-version",
        source,
    })?;
    let soci_sha256 = [
        digest("--soci-sha256-amd64", &a.soci_sha256_amd64)?,
        digest("--soci-sha256-arm64", &a.soci_sha256_arm64)?,
    ];
    if soci_sha256.iter().any(Option::is_some) {
        for (arch, d) in ARCHES.iter().zip(&soci_sha256) {
            if d.is_none() {
                notes.push(format!(
                    "no --soci-sha256-{arch}: {arch} nodes check SOCI {version} against the published .sha256sum"
                ));
            }
        }
    }
    Ok((version, soci_sha256))
}

fn digest(option: &'static str, value: &Option<String>) -> Result<Option<Sha256Hex>, RenderError> {
    value
        .as_deref()
        .map(Sha256Hex::parse)
        .transpose()
        .map_err(|source| RenderError::Release { option, source })
}

/// https:// or http:// (with a note), printable ASCII without spaces.
pub(super) fn check_url(option: &'static str, value: &str, notes: &mut Vec<String>) -> Result<String, RenderError> {
    if !is_printable_word(value) {
        return Err(invalid(
            option,
            value,
            "must be printable ASCII without spaces or quotes",
        ));
    }
    let rest = if let Some(rest) = value.strip_prefix("https://") {
        rest
    } else if let Some(rest) = value.strip_prefix("http://") {
        notes.push(format!(
            "{option} {value} is plain http: only the pinned digests make it trustworthy"
        ));
        rest
    } else {
        return Err(invalid(
            option,
            value,
            "must start with https:// (or http:// for a mirror)",
        ));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(invalid(option, value, "has no host"));
    }
    Ok(value.to_string())
}

/// The tuning flags given, validated together with the defaults for the
/// rest (the same rules install applies), as `--flag=value` arguments.
fn tuning_args(a: &UserdataArgs) -> Result<Vec<String>, RenderError> {
    soci_config::validate(&tuning(a))?;
    if let Some(s) = &a.concurrent_download_chunk_size
        && !s.bytes().all(|b| b == b' ' || b.is_ascii_graphic())
    {
        return Err(invalid(soci_config::FLAG_CHUNK_SIZE, s, "must be printable ASCII"));
    }
    let given = [
        (
            soci_config::FLAG_MAX_DOWNLOADS,
            a.max_concurrent_downloads.map(|v| v.to_string()),
        ),
        (
            soci_config::FLAG_MAX_DOWNLOADS_PER_IMAGE,
            a.max_concurrent_downloads_per_image.map(|v| v.to_string()),
        ),
        (soci_config::FLAG_CHUNK_SIZE, a.concurrent_download_chunk_size.clone()),
        (
            soci_config::FLAG_MAX_UNPACKS,
            a.max_concurrent_unpacks.map(|v| v.to_string()),
        ),
        (
            soci_config::FLAG_MAX_UNPACKS_PER_IMAGE,
            a.max_concurrent_unpacks_per_image.map(|v| v.to_string()),
        ),
        (
            soci_config::FLAG_DISCARD_UNPACKED_LAYERS,
            a.discard_unpacked_layers.map(|v| v.to_string()),
        ),
    ];
    Ok(given
        .into_iter()
        .filter_map(|(flag, v)| Some(format!("{flag}={}", v?)))
        .collect())
}

/// The tuning the flags ask for, defaults for the rest.
fn tuning(a: &UserdataArgs) -> Tuning {
    let d = Tuning::default();
    Tuning {
        max_concurrent_downloads: a.max_concurrent_downloads.unwrap_or(d.max_concurrent_downloads),
        max_concurrent_downloads_per_image: a
            .max_concurrent_downloads_per_image
            .unwrap_or(d.max_concurrent_downloads_per_image),
        concurrent_download_chunk_size: a
            .concurrent_download_chunk_size
            .clone()
            .unwrap_or(d.concurrent_download_chunk_size),
        max_concurrent_unpacks: a.max_concurrent_unpacks.unwrap_or(d.max_concurrent_unpacks),
        max_concurrent_unpacks_per_image: a
            .max_concurrent_unpacks_per_image
            .unwrap_or(d.max_concurrent_unpacks_per_image),
        discard_unpacked_layers: a.discard_unpacked_layers.unwrap_or(d.discard_unpacked_layers),
    }
}

/// Image references: `[A-Za-z0-9._/:@-]`, starting with a letter or digit,
/// at most 512 characters. Duplicates are dropped (first one kept).
fn check_images(images: &[String]) -> Result<Vec<String>, RenderError> {
    let mut out: Vec<String> = Vec::new();
    for i in images {
        let ok = (1..=512).contains(&i.len())
            && i.as_bytes()[0].is_ascii_alphanumeric()
            && i.bytes().all(|b| b.is_ascii_alphanumeric() || b"._/:@-".contains(&b));
        if !ok {
            return Err(invalid(
                "--prefetch",
                i,
                "not an image reference (letters, digits and . _ / : @ -, e.g. public.ecr.aws/docker/library/python:3.12)",
            ));
        }
        if !out.contains(i) {
            out.push(i.clone());
        }
    }
    Ok(out)
}

/// `/etc/soci-agent/config.toml` with the prefetch list (TOML strings via
/// toml_edit, so the escaping is TOML's own).
fn agent_config(images: &[String]) -> String {
    let mut s = format!("{CONFIG_MARKER}\n[prefetch]\nimages = [\n");
    for i in images {
        s.push_str("    ");
        s.push_str(&toml_edit::Value::from(i.as_str()).to_string());
        s.push_str(",\n");
    }
    s.push(']');
    s
}

/// POSIX shell single quoting.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn shell_script(c: &Checked) -> String {
    let opt = |d: &Option<Sha256Hex>| sh_quote(d.as_ref().map_or("", Sha256Hex::as_str));
    let install_args: Vec<String> = c.install_args.iter().map(|a| sh_quote(a)).collect();
    fill(
        BOOTSTRAP_TEMPLATE,
        &[
            ("AGENT_URL_AMD64", sh_quote(&c.agent_urls[0])),
            ("AGENT_URL_ARM64", sh_quote(&c.agent_urls[1])),
            ("AGENT_SHA256_AMD64", opt(&c.agent_sha256[0])),
            ("AGENT_SHA256_ARM64", opt(&c.agent_sha256[1])),
            ("SOCI_SHA256_AMD64", opt(&c.soci_sha256[0])),
            ("SOCI_SHA256_ARM64", opt(&c.soci_sha256[1])),
            ("AGENT_CONFIG", sh_quote(c.agent_config.as_deref().unwrap_or(""))),
            ("INSTALL_ARGS", install_args.join(" ")),
        ],
    )
}

/// Replaces every `@NAME@` in `template` in one pass (values are never
/// scanned again). Every name must occur; an unknown `@NAME@` is a bug.
fn fill(template: &str, values: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(template.len() + 1024);
    let mut used = vec![false; values.len()];
    let mut rest = template;
    while let Some(start) = rest.find('@') {
        out.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let name_len = after
            .bytes()
            .take_while(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_')
            .count();
        if name_len > 0 && after.as_bytes().get(name_len) == Some(&b'@') {
            let name = &after[..name_len];
            let i = values
                .iter()
                .position(|(n, _)| *n == name)
                .unwrap_or_else(|| panic!("template placeholder @{name}@ has no value"));
            out.push_str(&values[i].1);
            used[i] = true;
            rest = &after[name_len + 1..];
        } else {
            out.push('@');
            rest = after;
        }
    }
    out.push_str(rest);
    if let Some(i) = used.iter().position(|u| !u) {
        panic!("template has no @{}@ placeholder", values[i].0);
    }
    out
}

/// The agent's NodeConfig drop-in (same renderer as install), with a header
/// that says what it is doing in user data.
fn nodeconfig_part(version: ContainerdVersion, soci_root: &str) -> String {
    let dropin = crate::files::nodeconfig::render(version.config_version(), &wiring(soci_root));
    let body: String = dropin
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .flat_map(|l| [l, "\n"])
        .collect();
    format!(
        "# soci-agent: containerd and kubelet wired to the SOCI snapshotter (the drop-in the agent\n\
         # writes to {}), so nodeadm has it from its first pass.\n{body}",
        NODEADM_DROPIN
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_is_single_pass_and_complete() {
        let t = "a=@A@ b=@B@ mail@example.com @ @x@";
        let out = fill(t, &[("A", "@B@".into()), ("B", "2".into())]);
        assert_eq!(out, "a=@B@ b=2 mail@example.com @ @x@");
    }

    #[test]
    #[should_panic(expected = "no @C@")]
    fn fill_refuses_an_unused_value() {
        fill("@A@", &[("A", String::new()), ("C", String::new())]);
    }

    #[test]
    fn template_placeholders_match() {
        let out = fill(
            BOOTSTRAP_TEMPLATE,
            &[
                "AGENT_URL_AMD64",
                "AGENT_URL_ARM64",
                "AGENT_SHA256_AMD64",
                "AGENT_SHA256_ARM64",
                "SOCI_SHA256_AMD64",
                "SOCI_SHA256_ARM64",
                "AGENT_CONFIG",
                "INSTALL_ARGS",
            ]
            .map(|n| (n, "''".to_string())),
        );
        assert!(out.starts_with("#!/bin/sh\n"));
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(sh_quote("a'b"), r"'a'\''b'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn images_are_checked_and_deduplicated() {
        let ok = check_images(&["a/b:1".into(), "r.io/x@sha256:ab".into(), "a/b:1".into()]).unwrap();
        assert_eq!(ok, ["a/b:1", "r.io/x@sha256:ab"]);
        for bad in ["", "-x", "a b", "a'b", "a\"b", "x;rm"] {
            assert!(check_images(&[bad.to_string()]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn agent_config_is_toml_with_the_marker() {
        let c = agent_config(&["a/b:1".into()]);
        assert!(c.starts_with(CONFIG_MARKER));
        let doc: toml_edit::DocumentMut = c.parse().unwrap();
        assert_eq!(doc["prefetch"]["images"][0].as_str(), Some("a/b:1"));
    }
}
