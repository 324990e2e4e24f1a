//! Per-image progress on a terminal: one line per image (state, elapsed,
//! reference, last note), redrawn in place on stderr. Off a terminal nothing
//! is drawn; `prefetch` logs one structured line per image instead.

use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

struct Row {
    name: String,
    state: &'static str,
    started: Option<Instant>,
    finished: Option<f64>,
    note: String,
}

pub struct Board {
    enabled: bool,
    rows: Mutex<Vec<Row>>,
    drawn: Mutex<usize>,
}

impl Board {
    pub fn new(names: Vec<String>, enabled: bool) -> Self {
        let rows = names
            .into_iter()
            .map(|name| Row {
                name,
                state: "waiting",
                started: None,
                finished: None,
                note: String::new(),
            })
            .collect();
        Board {
            enabled,
            rows: Mutex::new(rows),
            drawn: Mutex::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Moves row `i` to `state`; the first move starts its clock.
    pub fn set(&self, i: usize, state: &'static str) {
        if let Some(r) = self.rows.lock().expect("board lock").get_mut(i) {
            r.state = state;
            r.started.get_or_insert_with(Instant::now);
            r.note.clear();
        }
    }

    pub fn note(&self, i: usize, note: &str) {
        if let Some(r) = self.rows.lock().expect("board lock").get_mut(i) {
            r.note = note.chars().take(80).collect();
        }
    }

    pub fn finish(&self, i: usize, state: &'static str, seconds: f64) {
        if let Some(r) = self.rows.lock().expect("board lock").get_mut(i) {
            r.state = state;
            r.finished = Some(seconds);
            r.note.clear();
        }
    }

    /// Redraws every row in place (no-op when disabled).
    pub fn draw(&self) {
        if !self.enabled {
            return;
        }
        let width = std::env::var("COLUMNS")
            .ok()
            .and_then(|c| c.parse::<usize>().ok())
            .unwrap_or(120)
            .max(40);
        let rows = self.rows.lock().expect("board lock");
        let mut drawn = self.drawn.lock().expect("board lock");
        let mut out = String::new();
        if *drawn > 0 {
            out.push_str(&format!("\x1b[{}A", *drawn));
        }
        for r in rows.iter() {
            let secs = r
                .finished
                .or_else(|| r.started.map(|s| s.elapsed().as_secs_f64()))
                .unwrap_or(0.0);
            let mut line = format!("{:<9} {:>6.1}s  {}", r.state, secs, r.name);
            if !r.note.is_empty() {
                line.push_str("  ");
                line.push_str(&r.note);
            }
            let line: String = line.chars().take(width - 1).collect();
            out.push_str("\x1b[2K");
            out.push_str(&line);
            out.push('\n');
        }
        *drawn = rows.len();
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(out.as_bytes());
        let _ = err.flush();
    }
}
