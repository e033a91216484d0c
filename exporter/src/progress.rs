//! Progress lines on stderr for long operations (export, synth, verification).

use std::io::Write;
use std::time::{Duration, Instant};

/// Prints `label: 42% (1.2 GiB / 2.9 GiB)` at most every 200 ms, then a final line.
#[derive(Debug)]
pub struct Progress {
    label: String,
    last: Option<Instant>,
    started: Instant,
    shown: bool,
}

impl Progress {
    /// A new progress reporter.
    pub fn new(label: &str) -> Progress {
        Progress { label: label.to_string(), last: None, started: Instant::now(), shown: false }
    }

    /// Reports `done` of `total` bytes.
    pub fn update(&mut self, done: u64, total: u64) {
        let now = Instant::now();
        if self.last.is_some_and(|t| now - t < Duration::from_millis(200)) && done < total {
            return;
        }
        self.last = Some(now);
        self.shown = true;
        let pct = if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
        eprint!("\r{}: {pct:5.1}% ({} / {})", self.label, human_bytes(done), human_bytes(total));
        let _ = std::io::stderr().flush();
    }

    /// Ends the line.
    pub fn finish(&mut self) {
        if self.shown {
            eprintln!(" in {:.1} s", self.started.elapsed().as_secs_f64());
        }
    }
}

/// `1.5 GiB`, `12.0 MiB`, `512 B`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}
