//! The one error type of the command line: what failed, and why.

use std::fmt;
use std::io;

use qed_image::Error;

/// A failed command, printed as `qed: <what failed>: <why>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError {
    what: String,
    why: String,
}

impl CliError {
    /// An error about `what` (a file, an option, an operation) because of `why`.
    pub fn new(what: impl Into<String>, why: impl fmt::Display) -> Self {
        Self {
            what: what.into(),
            why: why.to_string(),
        }
    }

    /// An error with no subject: printed as `qed: <why>`.
    pub fn plain(why: impl fmt::Display) -> Self {
        Self::new(String::new(), why)
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.what.is_empty() {
            f.write_str(&self.why)
        } else {
            write!(f, "{}: {}", self.what, self.why)
        }
    }
}

impl std::error::Error for CliError {}

/// Result of the command-line layer.
pub type CliResult<T> = Result<T, CliError>;

/// The text of an OS error without Rust's ` (os error N)` tail, as `strerror` prints it.
pub fn os_text(e: &io::Error) -> String {
    let text = e.to_string();
    match (e.raw_os_error(), text.rfind(" (os error ")) {
        (Some(_), Some(pos)) => text[..pos].to_string(),
        _ => text,
    }
}

/// Why an image could not be opened, concise: OS errors read like `strerror`, engine errors
/// keep their own wording.
pub fn open_failure(e: &Error) -> String {
    match e {
        Error::Io { source, .. } => os_text(source),
        Error::Backing { path, cause, .. } => {
            format!("backing file '{}': {}", path.display(), open_failure(cause))
        }
        other => other.to_string(),
    }
}

/// The `strerror` text QEMU would print for an engine error (`read failed: <this>`).
pub fn errno_text(e: &Error) -> String {
    match e {
        Error::Io { source, .. } => {
            if source.raw_os_error().is_some() {
                os_text(source)
            } else {
                "Input/output error".to_string()
            }
        }
        Error::Backing { cause, .. } => errno_text(cause),
        Error::OutOfRange { .. } | Error::Poisoned => "Input/output error".to_string(),
        Error::ReadOnly => "Permission denied".to_string(),
        Error::Unsupported(_) => "Operation not supported".to_string(),
        Error::TooLarge { .. } => "Cannot allocate memory".to_string(),
        _ => "Invalid argument".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_forms() {
        assert_eq!(CliError::new("x.qed", "bad").to_string(), "x.qed: bad");
        assert_eq!(CliError::plain("bad").to_string(), "bad");
    }

    #[test]
    fn os_text_strips_code() {
        let e = io::Error::from_raw_os_error(2);
        assert_eq!(os_text(&e), "No such file or directory");
        assert_eq!(os_text(&io::Error::other("custom")), "custom");
    }

    #[test]
    fn errno_texts() {
        let e = Error::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        };
        assert_eq!(errno_text(&e), "Input/output error");
        assert_eq!(errno_text(&Error::ReadOnly), "Permission denied");
    }
}
