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

/// An error that ends a run, and the exit code it means. Each such error
/// type implements it beside its definition (naming every variant, so a new
/// one must be placed); subcommands take their exit code from here only.
pub trait ExitKindOf: std::error::Error {
    fn exit_kind(&self) -> ExitKind;
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
