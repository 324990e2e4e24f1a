//! `soci-agent daemon`: placeholder, replaced by the daemon implementation.

#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {}

/// Runs until SIGTERM; returns the exit code.
pub async fn run(_args: &DaemonArgs) -> u8 {
    0
}
