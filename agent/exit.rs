//! Exit codes shared by every subcommand. They are part of the CLI contract.

/// What a run ended with; `main` turns it into the process exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitKind {
    /// 0: done, or nothing to do.
    Ok,
    /// 1: failed; the node was left as it was.
    Failed,
    /// 2: usage or validation error; nothing was changed.
    Usage,
    /// 3: verification failed (checksum or archive refused); nothing was installed.
    Verification,
}

impl ExitKind {
    pub fn code(self) -> u8 {
        match self {
            ExitKind::Ok => 0,
            ExitKind::Failed => 1,
            ExitKind::Usage => 2,
            ExitKind::Verification => 3,
        }
    }
}

/// A failure with the exit code it maps to. Built at subcommand level from
/// the module errors, so each module keeps its own error type.
#[derive(Debug)]
pub struct Failure {
    pub kind: ExitKind,
    pub error: Box<dyn std::error::Error + Send + Sync>,
}

impl Failure {
    pub fn new(kind: ExitKind, error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Failure {
            kind,
            error: error.into(),
        }
    }
    pub fn usage(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Failure::new(ExitKind::Usage, error)
    }
    pub fn failed(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Failure::new(ExitKind::Failed, error)
    }
    /// The error and its sources, joined with ": ".
    pub fn chain(&self) -> String {
        error_chain(self.error.as_ref())
    }
}

/// Renders an error with its whole `source()` chain, skipping repeats.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut cur = error.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}
