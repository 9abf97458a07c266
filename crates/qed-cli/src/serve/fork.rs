//! `qed serve --fork`.

use std::io::{BufRead, Write};

use crate::error::{CliError, CliResult};

/// What the background process prints on its stdout once it listens.
pub const READY: &str = "ready";
/// The prefix of a line the background process passes on for stderr before it is ready.
pub const STDERR_LINE: &str = "stderr ";

/// `--fork`: runs the same command again without it, in the background, and returns once the
/// child listens (it says so on its stdout) with exit status 0, or with the child's status if
/// it failed first. Until then the child's stderr is passed on; afterwards the child holds
/// neither of the parent's output streams, so `$(qed serve --fork ...)` returns. Safe Rust
/// cannot fork; a new process does the same.
pub fn fork() -> CliResult<i32> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe().map_err(|e| CliError::new("--fork", e))?;
    let mut argv = std::env::args_os();
    // The child is started under the name this process was started as: under `qemu-nbd`
    // its arguments are qemu-nbd's, without the `serve` that `qed` needs.
    let name = argv.next().unwrap_or_else(|| "qed".into());
    let args: Vec<std::ffi::OsString> = argv
        .filter(|a| a != "--fork")
        .chain([std::ffi::OsString::from("--notify-ready")])
        .collect();
    let mut child = Command::new(exe)
        .arg0(name)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CliError::new("--fork", e))?;
    let relay = child.stderr.take().map(|err| {
        std::thread::spawn(move || {
            let mut err = std::io::BufReader::new(err);
            let mut line = String::new();
            // Lines the child prints while starting; ends when the parent exits.
            while matches!(err.read_line(&mut line), Ok(n) if n > 0) {
                let _ = std::io::stderr().write_all(line.as_bytes());
                line.clear();
            }
        })
    });
    // The child's stdout says "ready" once it listens; before that it may pass on lines for
    // stderr (warnings) there, so that they are printed before this process exits.
    if let Some(out) = child.stdout.take() {
        let mut out = std::io::BufReader::new(out);
        let mut line = String::new();
        while matches!(out.read_line(&mut line), Ok(n) if n > 0) {
            if line.trim_end() == READY {
                return Ok(0);
            }
            match line.strip_prefix(STDERR_LINE) {
                Some(text) => {
                    let _ = std::io::stderr().write_all(text.as_bytes());
                }
                None => break,
            }
            line.clear();
        }
    }
    let status = child.wait().map_err(|e| CliError::new("--fork", e))?;
    if let Some(relay) = relay {
        let _ = relay.join();
    }
    Ok(status.code().unwrap_or(1))
}
