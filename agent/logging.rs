//! tracing setup: human lines on a TTY, one JSON object per line otherwise
//! (journald and CloudWatch friendly). Logs go to stderr; reports to stdout.

use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// A `--log-level` (or `SOCI_AGENT_LOG`) that is not a tracing filter.
#[derive(Debug, thiserror::Error)]
#[error(
    "{source_name} {value:?} is not a log level or tracing filter (error, warn, info, debug, trace, or e.g. soci_agent=debug): {reason}"
)]
pub struct LevelError {
    source_name: &'static str,
    value: String,
    reason: String,
}

/// Parses the filter: `SOCI_AGENT_LOG` when set, else `level`.
pub fn filter(level: &str) -> Result<EnvFilter, LevelError> {
    let (source_name, value) = match std::env::var("SOCI_AGENT_LOG") {
        Ok(v) => ("SOCI_AGENT_LOG", v),
        Err(_) => ("--log-level", level.to_owned()),
    };
    EnvFilter::builder().parse(&value).map_err(|e| LevelError {
        source_name,
        value: value.clone(),
        reason: e.to_string(),
    })
}

/// `level` is a tracing filter (`info`, `debug`, `soci_agent=trace`…);
/// `SOCI_AGENT_LOG` overrides it. Refused (nothing set up) when it does not parse.
pub fn init(level: &str) -> Result<(), LevelError> {
    let filter = filter(level)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        let _ = builder.with_target(false).without_time().try_init();
    } else {
        let _ = builder.json().flatten_event(true).with_current_span(false).try_init();
    }
    Ok(())
}
