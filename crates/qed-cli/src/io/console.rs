//! Where `qed io` prints: stdout for what qemu-io prints there, stderr for the rest, each
//! line on the stream qemu-io 10 uses for it.

use std::io::Write;

/// The two output streams of one run.
pub struct Console<'a> {
    out: &'a mut dyn Write,
    err: &'a mut dyn Write,
}

impl<'a> Console<'a> {
    /// A console writing to the given streams.
    pub fn new(out: &'a mut dyn Write, err: &'a mut dyn Write) -> Self {
        Self { out, err }
    }

    /// Prints to stdout.
    pub fn out(&mut self, text: &str) {
        // A closed stdout is not the image's problem; the exit code still tells.
        let _ = self.out.write_all(text.as_bytes());
    }

    /// Prints to stderr, after what stdout holds so far.
    pub fn err(&mut self, text: &str) {
        let _ = self.out.flush();
        let _ = self.err.write_all(text.as_bytes());
        let _ = self.err.flush();
    }

    /// An error line as QEMU's `error_report` prints it: `<program>: <text>` on stderr.
    pub fn error(&mut self, text: &str) {
        self.err(&format!("{}: {text}\n", crate::prog()));
    }

    /// An error line qemu-io prints on stderr without its name (`no file open, try 'help
    /// open'`); under the name `qed` it gets the `qed: ` prefix of every error line.
    pub fn bare(&mut self, text: &str) {
        if crate::prog() == "qed" {
            self.error(text);
        } else {
            self.err(&format!("{text}\n"));
        }
    }

    /// The engine's detailed reason for a failure, on stderr, only under the name `qed`:
    /// invoked as `qemu-io`, the output is qemu-io's alone.
    pub fn detail(&mut self, text: &str) {
        if crate::prog() == "qed" {
            self.error(text);
        }
    }

    /// Writes out what stdout buffers (before a prompt, a signal or an abort).
    pub fn flush(&mut self) {
        let _ = self.out.flush();
        let _ = self.err.flush();
    }
}
