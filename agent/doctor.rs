//! `soci-agent doctor`: placeholder, replaced by the doctor implementation.

#[derive(Debug, Clone, clap::Args)]
pub struct DoctorArgs {}

/// Prints the report; returns the exit code.
pub async fn run(_args: &DoctorArgs) -> u8 {
    0
}
