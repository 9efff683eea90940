//! Download progress: an indicatif bar on a terminal, periodic plain lines otherwise.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

/// How to report progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Progress {
    /// A bar when stderr is a terminal, plain lines otherwise.
    #[default]
    Auto,
    /// Always the bar.
    Bar,
    /// Always plain lines on stderr.
    Lines,
    /// Nothing (tests, machine output).
    Quiet,
}

impl Progress {
    fn resolved(self) -> Progress {
        match self {
            Progress::Auto if std::io::stderr().is_terminal() => Progress::Bar,
            Progress::Auto => Progress::Lines,
            other => other,
        }
    }

    /// A one-off message (waiting for a lock, retrying, ...).
    pub(crate) fn note(self, msg: &str) {
        if self == Progress::Quiet {
            tracing::info!("{msg}");
        } else {
            eprintln!("kthw-lab: {msg}");
        }
    }
}

/// Reports one transfer.
pub(crate) struct Reporter {
    label: String,
    bar: Option<ProgressBar>,
    lines: bool,
    interval: Duration,
    started: Instant,
    last_line: Instant,
    start_pos: u64,
    total: Option<u64>,
    pos: u64,
}

impl Reporter {
    pub(crate) fn new(mode: Progress, label: &str, interval: Duration) -> Reporter {
        let mode = mode.resolved();
        let bar = (mode == Progress::Bar).then(|| {
            let bar = ProgressBar::new(0);
            let style = ProgressStyle::with_template(
                "{msg} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(label.to_string());
            bar
        });
        let now = Instant::now();
        Reporter {
            label: label.to_string(),
            bar,
            lines: mode == Progress::Lines,
            interval,
            started: now,
            last_line: now,
            start_pos: 0,
            total: None,
            pos: 0,
        }
    }

    /// A (re)started transfer: `pos` bytes already present, `total` if known.
    pub(crate) fn start(&mut self, pos: u64, total: Option<u64>) {
        self.pos = pos;
        self.start_pos = pos;
        self.total = total;
        self.started = Instant::now();
        if let Some(bar) = &self.bar {
            bar.set_length(total.unwrap_or(0));
            bar.set_position(pos);
            bar.reset_eta();
        }
        if self.lines {
            let from = if pos > 0 {
                format!(" resuming at {}", HumanBytes(pos))
            } else {
                String::new()
            };
            let size = total
                .map(|t| format!(" ({})", HumanBytes(t)))
                .unwrap_or_default();
            eprintln!("kthw-lab: downloading {}{size}{from}", self.label);
        }
    }

    pub(crate) fn advance(&mut self, n: u64) {
        self.pos += n;
        if let Some(bar) = &self.bar {
            bar.set_position(self.pos);
        }
        if self.lines && self.last_line.elapsed() >= self.interval {
            self.last_line = Instant::now();
            let rate = self.rate();
            match self.total {
                Some(t) if t > 0 => eprintln!(
                    "kthw-lab: {}: {} of {} ({}%), {}/s",
                    self.label,
                    HumanBytes(self.pos),
                    HumanBytes(t),
                    self.pos * 100 / t,
                    HumanBytes(rate)
                ),
                _ => eprintln!(
                    "kthw-lab: {}: {}, {}/s",
                    self.label,
                    HumanBytes(self.pos),
                    HumanBytes(rate)
                ),
            }
        }
    }

    fn rate(&self) -> u64 {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        ((self.pos - self.start_pos) as f64 / secs) as u64
    }

    pub(crate) fn println(&self, msg: &str) {
        match &self.bar {
            Some(bar) => bar.println(format!("kthw-lab: {msg}")),
            None if self.lines => eprintln!("kthw-lab: {msg}"),
            None => tracing::info!("{msg}"),
        }
    }

    pub(crate) fn finish(&self, what: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        if self.lines || self.bar.is_some() {
            eprintln!(
                "kthw-lab: {} {what}: {} in {:.1}s ({}/s)",
                self.label,
                HumanBytes(self.pos - self.start_pos),
                self.started.elapsed().as_secs_f64(),
                HumanBytes(self.rate())
            );
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}
