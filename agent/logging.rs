//! tracing setup: human lines on a TTY, one JSON object per line otherwise
//! (journald and CloudWatch friendly). Logs go to stderr; reports to stdout.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// `level` is a tracing filter (`info`, `debug`, `soci_agent=trace`…);
/// `SOCI_AGENT_LOG` overrides it.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_env("SOCI_AGENT_LOG")
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        let _ = builder.with_target(false).without_time().try_init();
    } else {
        let _ = builder.json().flatten_event(true).with_current_span(false).try_init();
    }
}
