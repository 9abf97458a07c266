//! `-p`: progress of a long command.
//!
//! Run as `qed`, a bar on stderr (bytes done, rate, time left), drawn only when stderr is a
//! terminal. Run as `qemu-img`, what qemu-img prints: `    (12.00/100%)` rewritten in place on
//! stdout, terminal or not, so that scripts reading it see the same text.

use std::io::Write;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Debug)]
enum Shown {
    /// Nothing (`-p` not given).
    Off,
    /// qemu-img's percentages; the last whole percent printed.
    Percent(Option<u64>),
    /// A bar.
    Bar(ProgressBar),
}

/// Progress of one command.
#[derive(Debug)]
pub struct Progress {
    shown: Shown,
}

impl Progress {
    /// Progress as `-p` asks (`requested`).
    pub fn new(requested: bool) -> Self {
        let shown = if !requested {
            Shown::Off
        } else if crate::prog() == "qed" {
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{bar:40} {percent:>3}% {binary_bytes}/{binary_total_bytes} \
                 {binary_bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            Shown::Bar(bar)
        } else {
            Shown::Percent(None)
        };
        let mut progress = Self { shown };
        if matches!(progress.shown, Shown::Percent(_)) {
            // qemu-img starts at 0%.
            progress.update(0, 1);
        }
        progress
    }

    /// `done` of `total` bytes are covered.
    pub fn update(&mut self, done: u64, total: u64) {
        match &mut self.shown {
            Shown::Off => {}
            Shown::Bar(bar) => {
                bar.set_length(total);
                bar.set_position(done.min(total));
            }
            Shown::Percent(shown) => {
                let percent = if total == 0 {
                    100
                } else {
                    (u128::from(done.min(total)) * 100 / u128::from(total)) as u64
                };
                if *shown != Some(percent) {
                    *shown = Some(percent);
                    let mut out = std::io::stdout().lock();
                    let _ = write!(out, "    ({percent}.00/100%)\r");
                    let _ = out.flush();
                }
            }
        }
    }

    /// The command finished: the last line stays.
    pub fn finish(&mut self) {
        match std::mem::replace(&mut self.shown, Shown::Off) {
            Shown::Off => {}
            Shown::Bar(bar) => {
                let total = bar.length().unwrap_or(0);
                bar.set_position(total);
                bar.finish();
            }
            Shown::Percent(shown) => {
                self.shown = Shown::Percent(shown);
                self.update(1, 1);
                let _ = writeln!(std::io::stdout());
                self.shown = Shown::Off;
            }
        }
    }
}
