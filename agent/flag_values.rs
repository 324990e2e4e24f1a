//! Parsers for flag values shared by several subcommands (a leaf).

/// The longest duration a seconds flag takes (a day).
pub const MAX_SECONDS: f64 = 86_400.0;

/// A seconds flag's value that is not a finite duration in (0, [`MAX_SECONDS`]].
#[derive(Debug, thiserror::Error)]
#[error("{0:?}: give a number of seconds above 0 and at most 86400")]
pub struct SecondsError(String);

/// Parses a duration in seconds for a flag: finite, positive, at most a day
/// (`nan`, `inf`, `-1` and `1e309` are refused, exit 2).
pub fn parse_seconds(value: &str) -> Result<f64, SecondsError> {
    match value.trim().parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs > 0.0 && secs <= MAX_SECONDS => Ok(secs),
        _ => Err(SecondsError(value.to_owned())),
    }
}

/// A node-path flag's value that is not an absolute, printable path.
#[derive(Debug, thiserror::Error)]
#[error("{0:?}: give an absolute path (node paths are resolved under --root)")]
pub struct NodePathError(String);

/// Parses a node path for a flag: absolute and without control characters
/// (an empty or relative value would land in the current directory).
pub fn parse_node_path(value: &str) -> Result<String, NodePathError> {
    if value.starts_with('/') && !value.chars().any(char::is_control) {
        Ok(value.to_owned())
    } else {
        Err(NodePathError(value.to_owned()))
    }
}
