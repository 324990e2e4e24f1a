//! `soci-agent install`'s command line: where and how this run works, plus
//! every install option ([`InstallOptions`], declared once in `options`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;

use crate::install::options::{InstallOptions, Source};

#[derive(Debug, Clone, Default, Args)]
pub struct InstallArgs {
    /// Directory every node path is resolved under (AMI baking, tests). Nothing outside it is touched.
    #[arg(long, value_name = "DIR", env = "SOCI_AGENT_ROOT", default_value = "/")]
    pub root: PathBuf,

    /// Agent config file (TOML, [install] table). [default: /etc/soci-agent/config.toml under --root, when present]
    #[arg(long, value_name = "FILE", env = "SOCI_AGENT_CONFIG")]
    pub config: Option<PathBuf>,

    /// Print the plan with unified diffs and change nothing.
    #[arg(long)]
    pub dry_run: bool,

    #[command(flatten)]
    pub options: InstallOptions,

    /// Which of `options` came from the command line and which from the
    /// environment (filled by the caller from clap's matches; a set option
    /// missing here counts as a flag).
    #[arg(skip)]
    pub sources: BTreeMap<String, Source>,
}
