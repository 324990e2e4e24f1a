//! `soci-agent render`: the artifacts that deliver soci-agent to a node,
//! printed on stdout. Pure (no I/O besides the caller printing).
//!
//! - `userdata`: EC2 user data, MIME multipart (boundary `//`, each part
//!   carrying only its `Content-Type`, as Karpenter re-serializes it): a
//!   shell part (template `userdata/bootstrap.sh.in`) that downloads the
//!   agent for the node's arch, verifies its SHA-256 and runs
//!   `soci-agent install`; plus, by default, the NodeConfig drop-in as an
//!   `application/node.eks.aws` part.
//! - `nodeconfig`: the drop-in install writes on nodeadm hosts (same code).
//! - `ec2nodeclass`: a Karpenter `EC2NodeClass` embedding that user data.
//! - `launch-template`: user data for EKS managed node groups; with
//!   `--custom-ami` it also carries the cluster NodeConfig.
//!
//! Every value is validated before anything is printed; a problem is exit 2
//! with the reason on stderr. User data over EC2's 16 KB is refused.

mod data_volume;
mod ec2nodeclass;
mod launch_template;
mod mime;
mod userdata;
mod yaml;

use crate::paths::{SOCI_ROOT, SOCI_SOCKET};
use clap::{Args, Subcommand, ValueEnum};

use crate::files::containerd_config::{ConfigVersion, SociWiring};
use crate::files::soci_config::TuningError;
use crate::release::ReleaseError;

pub use data_volume::DataVolumeArgs;
pub use ec2nodeclass::Ec2NodeClassArgs;
pub use launch_template::LaunchTemplateArgs;
pub use mime::{Part, USER_DATA_LIMIT};
pub use userdata::{BOOTSTRAP_TEMPLATE, CONFIG_MARKER, UserdataArgs};

#[derive(Debug, Clone, Args)]
#[command(
    after_help = "Examples (userdata/README.md lists the commands behind the rendered examples):\n  \
soci-agent render userdata --agent-url 'https://example.com/soci-agent-{arch}' \\\n      \
--agent-sha256-amd64 <hex> --agent-sha256-arm64 <hex> > user-data.mime\n  \
soci-agent render nodeconfig --containerd-version 1.7\n  \
soci-agent render ec2nodeclass --cluster my-cluster --role KarpenterNodeRole-my-cluster \\\n      \
--agent-url 'https://example.com/soci-agent-{arch}' --agent-sha256-amd64 <hex>"
)]
pub struct RenderArgs {
    #[command(subcommand)]
    pub kind: RenderKind,
}

#[derive(Debug, Clone, Subcommand)]
pub enum RenderKind {
    /// EC2 user data (MIME multipart): a shell part that downloads, verifies and
    /// runs `soci-agent install`, plus the NodeConfig drop-in part (AL2023).
    #[command(name = "userdata")]
    Userdata(Box<UserdataArgs>),
    /// The NodeConfig drop-in install writes to /etc/eks/nodeadm.d/50-soci-agent.yaml.
    #[command(name = "nodeconfig")]
    Nodeconfig(NodeconfigArgs),
    /// A Karpenter EC2NodeClass (AL2023, gp3 root volume with high throughput)
    /// embedding the user data.
    #[command(name = "ec2nodeclass")]
    Ec2nodeclass(Box<Ec2NodeClassArgs>),
    /// User data for an EKS managed node group's launch template; with
    /// --custom-ami it carries the cluster NodeConfig too (EKS does not merge then).
    #[command(name = "launch-template")]
    LaunchTemplate(Box<LaunchTemplateArgs>),
}

/// containerd major line on the AMI: table names of the NodeConfig fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ContainerdVersion {
    /// containerd 2.x (current AL2023 AMIs): config version 3, `io.containerd.cri.v1.images`.
    #[value(name = "2")]
    Two,
    /// containerd 1.7 (Kubernetes 1.28/1.29 AMIs): config version 2, `io.containerd.grpc.v1.cri`.
    #[value(name = "1.7")]
    OneSeven,
}

impl ContainerdVersion {
    pub fn config_version(self) -> ConfigVersion {
        match self {
            ContainerdVersion::Two => ConfigVersion::V3,
            ContainerdVersion::OneSeven => ConfigVersion::V2,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct NodeconfigArgs {
    /// containerd on the AMI: 2 (v3 table names) or 1.7 (v2 table names).
    #[arg(long, value_enum, default_value = "2")]
    pub containerd_version: ContainerdVersion,
    /// The snapshotter's state directory (containerd's proxy_plugins.soci.exports.root).
    #[arg(long, value_name = "DIR", default_value = SOCI_ROOT)]
    pub soci_root: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("{option} {value:?}: {reason}")]
    Invalid {
        option: &'static str,
        value: String,
        reason: String,
    },
    #[error("{option}")]
    Release { option: &'static str, source: ReleaseError },
    #[error(transparent)]
    Tuning(#[from] TuningError),
    #[error("{option} is required {reason}")]
    Missing { option: &'static str, reason: &'static str },
    #[error("the user data is {size} bytes, over EC2's limit of {limit} bytes (16 KB, raw, before base64){hint}")]
    TooLarge { size: usize, limit: usize, hint: String },
}

impl crate::exit::ExitKindOf for RenderError {
    /// Rendering only reads its options: every failure is the operator's to fix (exit 2).
    fn exit_kind(&self) -> crate::exit::ExitKind {
        use crate::exit::ExitKind;
        match self {
            RenderError::Invalid { .. }
            | RenderError::Release { .. }
            | RenderError::Tuning(_)
            | RenderError::Missing { .. }
            | RenderError::TooLarge { .. } => ExitKind::Usage,
        }
    }
}

pub(crate) fn invalid(option: &'static str, value: &str, reason: impl Into<String>) -> RenderError {
    RenderError::Invalid {
        option,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// What a render produced: the text for stdout and notes for stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub notes: Vec<String>,
}

/// Returns what to print on stdout and the exit code (0, or 2 with the
/// reason already printed on stderr). Notes go to stderr.
pub fn run(args: &RenderArgs) -> (String, u8) {
    match render(args) {
        Ok(r) => {
            for n in &r.notes {
                eprintln!("soci-agent render: note: {n}");
            }
            (r.text, 0)
        }
        Err(e) => {
            eprintln!("soci-agent render: error: {}", crate::exit::error_chain(&e));
            (String::new(), crate::exit::ExitKindOf::exit_kind(&e).code())
        }
    }
}

/// Validates the options and renders the artifact.
pub fn render(args: &RenderArgs) -> Result<Rendered, RenderError> {
    match &args.kind {
        RenderKind::Userdata(a) => userdata::render(a),
        RenderKind::Nodeconfig(a) => render_nodeconfig(a),
        RenderKind::Ec2nodeclass(a) => ec2nodeclass::render(a),
        RenderKind::LaunchTemplate(a) => launch_template::render(a),
    }
}

fn render_nodeconfig(a: &NodeconfigArgs) -> Result<Rendered, RenderError> {
    let soci_root = check_soci_root(&a.soci_root)?;
    Ok(Rendered {
        text: crate::files::nodeconfig::render(a.containerd_version.config_version(), &wiring(&soci_root)),
        notes: Vec::new(),
    })
}

/// The wiring install uses: the fixed socket, and `soci_root`.
fn wiring(soci_root: &str) -> SociWiring {
    SociWiring {
        address: SOCI_SOCKET.to_string(),
        soci_root: soci_root.to_string(),
    }
}

/// An absolute path without whitespace or control characters (it ends up in
/// TOML, YAML, a shell script and systemd units); trailing `/` dropped.
fn check_soci_root(value: &str) -> Result<String, RenderError> {
    if !value.starts_with('/') {
        return Err(invalid("--soci-root", value, "must be an absolute path"));
    }
    if !is_printable_word(value) {
        return Err(invalid(
            "--soci-root",
            value,
            "must be printable ASCII without spaces or quotes",
        ));
    }
    let trimmed = value.trim_end_matches('/');
    Ok(if trimmed.is_empty() { "/".into() } else { trimmed.into() })
}

/// Printable ASCII, no whitespace, no quotes or backslashes.
/// `NGi` or `NTi` in GiB.
fn parse_size(v: &str) -> Option<u64> {
    let (n, mult) = if let Some(n) = v.strip_suffix("Gi") {
        (n, 1)
    } else {
        (v.strip_suffix("Ti")?, 1024)
    };
    if n.is_empty() || n.len() > 6 || !n.bytes().all(|c| c.is_ascii_digit()) || n.starts_with('0') {
        return None;
    }
    n.parse::<u64>().ok().map(|n| n * mult)
}

fn is_printable_word(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'\'' | b'"' | b'\\'))
}
