//! `soci-agent prefetch`: placeholder, replaced by the prefetch implementation.

#[derive(Debug, Clone, clap::Args)]
pub struct PrefetchArgs {}

pub async fn run(_args: &PrefetchArgs) -> u8 {
    0
}
