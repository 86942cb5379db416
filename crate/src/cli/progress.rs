//! Progress on stderr for downloads, loading, batches and conversion.

use std::io::IsTerminal;

/// A percentage on stderr: redrawn in place on a terminal, and a final line when done (the only
/// line when stderr is a log or a pipe).
pub struct ProgressLine {
    terminal: bool,
    last_percent: std::cell::Cell<u64>,
}

impl Default for ProgressLine {
    fn default() -> Self {
        Self { terminal: std::io::stderr().is_terminal(), last_percent: std::cell::Cell::new(u64::MAX) }
    }
}

impl ProgressLine {
    pub fn update(&self, done: u64, total: u64, live: impl FnOnce(u64) -> String, finished: impl FnOnce() -> String) {
        let percent = if total == 0 { 100 } else { done * 100 / total };
        if percent == self.last_percent.replace(percent) {
            return;
        }
        if self.terminal {
            eprint!("\rdsocr: {}", live(percent));
        }
        if done >= total {
            if self.terminal {
                eprintln!();
            }
            eprintln!("dsocr: {}", finished());
        }
    }
}

/// `[####······] 3/10 ETA 1m20s` for the batch's file `done + 1` of `total`.
pub fn batch_progress(done: usize, total: usize, elapsed: std::time::Duration) -> String {
    const WIDTH: usize = 20;
    let filled = done * WIDTH / total.max(1);
    let bar = format!("[{}{}]", "#".repeat(filled), "·".repeat(WIDTH - filled));
    let eta = if done == 0 {
        String::new()
    } else {
        let seconds = (elapsed.as_secs_f64() / done as f64 * (total - done) as f64).round() as u64;
        format!(" ETA {}m{:02}s", seconds / 60, seconds % 60)
    };
    format!("{bar} {}/{total}{eta}", done + 1)
}

