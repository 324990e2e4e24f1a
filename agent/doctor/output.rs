//! The text report: a headline with the counts, then one row per check
//! (verdict, id, evidence) and, under a row that is not ok, its advice.

use std::fmt::Write;

use super::{Report, Verdict};

pub fn table(report: &Report) -> String {
    let s = &report.summary;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "soci-agent doctor: {} fail, {} warn, {} ok, {} skip (exit {})",
        s.fail,
        s.warn,
        s.ok,
        s.skip,
        report.exit_code()
    );
    let width = report.checks.iter().map(|c| c.id.len()).max().unwrap_or(0);
    let _ = writeln!(out, "{:<7} {:<width$}  EVIDENCE", "VERDICT", "CHECK");
    for c in &report.checks {
        let verdict = match c.verdict {
            Verdict::Fail | Verdict::Warn => c.verdict.as_str().to_ascii_uppercase(),
            v => v.as_str().to_string(),
        };
        let _ = writeln!(out, "{verdict:<7} {:<width$}  {}", c.id, c.evidence);
        if let Some(a) = &c.advice {
            let _ = writeln!(out, "{:<7} {:<width$}  -> {a}", "", "");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::{Check, Report};

    #[test]
    fn rows_and_advice() {
        let r = Report::new(vec![
            Check::ok("a.b", "fine"),
            Check::fail("a.longer", "broken", "fix it"),
        ]);
        let t = r.to_text();
        assert!(
            t.starts_with("soci-agent doctor: 1 fail, 0 warn, 1 ok, 0 skip (exit 1)\n"),
            "{t}"
        );
        assert!(t.contains("\nok      a.b       fine\n"), "{t}");
        assert!(
            t.contains("\nFAIL    a.longer  broken\n                  -> fix it\n"),
            "{t}"
        );
    }
}
