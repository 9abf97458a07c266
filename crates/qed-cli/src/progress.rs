//! `-p`: a percentage on stderr, laid out as qemu-img lays out its progress
//! (`    (12.00/100%)` rewritten in place), shown only when stderr is a terminal.

use std::io::{IsTerminal, Write};

/// Progress of one command.
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    /// The last whole percent printed.
    shown: Option<u64>,
}

impl Progress {
    /// Progress as `-p` asks (`requested`), shown when stderr is a terminal.
    pub fn new(requested: bool) -> Self {
        Self {
            enabled: requested && std::io::stderr().is_terminal(),
            shown: None,
        }
    }

    /// `done` of `total` bytes are covered.
    pub fn update(&mut self, done: u64, total: u64) {
        if !self.enabled {
            return;
        }
        let percent = if total == 0 {
            100
        } else {
            (u128::from(done.min(total)) * 100 / u128::from(total)) as u64
        };
        if self.shown != Some(percent) {
            self.shown = Some(percent);
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "    ({percent}.00/100%)\r");
            let _ = err.flush();
        }
    }

    /// The command finished: the last line stays.
    pub fn finish(&mut self) {
        if self.enabled {
            self.update(1, 1);
            eprintln!();
            self.enabled = false;
        }
    }
}
