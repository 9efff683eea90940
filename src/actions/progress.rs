//! What the user sees while a lab is built: one live line per node and per phase
//! on a terminal, plain timestamped lines otherwise (logs, CI, pipes).

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A cheap handle; clones share the same output.
#[derive(Clone)]
pub struct Progress(Arc<Inner>);

struct Inner {
    multi: Option<MultiProgress>,
    start: Instant,
    /// Plain lines kept in memory instead of printed (tests).
    captured: Option<Mutex<Vec<String>>>,
}

/// A node's (or a task's) status line.
pub struct Line {
    bar: Option<ProgressBar>,
    name: String,
    start: Instant,
    progress: Progress,
}

impl Progress {
    /// Live lines when stderr is a terminal, plain lines otherwise.
    pub fn new() -> Progress {
        let live = std::io::stderr().is_terminal() && std::env::var_os("KTHW_LAB_PLAIN").is_none();
        Progress(Arc::new(Inner {
            multi: live.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            start: Instant::now(),
            captured: None,
        }))
    }

    /// Plain lines, kept in memory (for tests).
    pub fn capturing() -> Progress {
        Progress(Arc::new(Inner {
            multi: None,
            start: Instant::now(),
            captured: Some(Mutex::new(Vec::new())),
        }))
    }

    pub fn captured(&self) -> Vec<String> {
        self.0
            .captured
            .as_ref()
            .map(|c| c.lock().expect("progress lock").clone())
            .unwrap_or_default()
    }

    /// A line that stays on screen.
    pub fn println(&self, msg: &str) {
        match &self.0.multi {
            Some(m) => {
                let _ = m.println(msg);
            }
            None => self.plain(msg),
        }
    }

    fn plain(&self, msg: &str) {
        match &self.0.captured {
            Some(c) => c.lock().expect("progress lock").push(msg.to_string()),
            None => {
                let s = self.0.start.elapsed().as_secs_f64();
                eprintln!("[{s:7.1}s] {msg}");
            }
        }
    }

    /// Start a live line for `name` (a node or a task).
    pub fn line(&self, name: &str, msg: &str) -> Line {
        let bar = self.0.multi.as_ref().map(|m| {
            let b = m.add(ProgressBar::new_spinner());
            b.set_style(
                ProgressStyle::with_template("  {spinner} {prefix:<12} {msg} ({elapsed})")
                    .expect("valid template"),
            );
            b.set_prefix(name.to_string());
            b.set_message(msg.to_string());
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        if bar.is_none() {
            self.plain(&format!("  {name}: {msg}"));
        }
        Line {
            bar,
            name: name.to_string(),
            start: Instant::now(),
            progress: self.clone(),
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}

impl Line {
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Update the message (plain mode prints it).
    pub fn set(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.set_message(msg.to_string()),
            None => self.progress.plain(&format!("  {}: {msg}", self.name)),
        }
    }

    fn finish(self, mark: &str, msg: &str) {
        let secs = self.start.elapsed().as_secs_f64();
        match &self.bar {
            Some(b) => {
                b.finish_and_clear();
                self.progress
                    .println(&format!("  {mark} {:<12} {msg} ({secs:.1} s)", self.name));
            }
            None => self
                .progress
                .plain(&format!("  {}: {msg} ({secs:.1} s)", self.name)),
        }
    }

    pub fn done(self, msg: &str) {
        self.finish("✓", msg);
    }

    pub fn fail(self, msg: &str) {
        self.finish("✗", &format!("failed: {msg}"));
    }
}
