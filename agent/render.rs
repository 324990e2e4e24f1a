//! `soci-agent render`: placeholder, replaced by the render implementation.

#[derive(Debug, Clone, clap::Args)]
pub struct RenderArgs {}

/// Returns what to print on stdout and the exit code.
pub fn run(_args: &RenderArgs) -> (String, u8) {
    (String::new(), 0)
}
