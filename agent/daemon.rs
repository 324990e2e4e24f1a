//! `soci-agent daemon`: not implemented yet (issue 7). The subcommand exists
//! so the CLI shape is stable; it refuses to run rather than pretend.

#[derive(Debug, Clone, clap::Args)]
pub struct DaemonArgs {}

/// Refuses: the daemon is not implemented in this build.
pub async fn run(_args: &DaemonArgs) -> u8 {
    eprintln!("soci-agent daemon: not implemented in this build yet; use `soci-agent doctor` and the boot unit");
    2
}
