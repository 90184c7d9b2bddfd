//! Standard output for the verbs: locked while a verb prints, and a reader
//! that went away (`skymirror get replicas | head -3`) told apart from a real
//! failure to write.
//!
//! `println!` panics when stdout is a pipe whose reader has closed it (Rust
//! ignores SIGPIPE, so the write fails with `EPIPE`). The verbs print through
//! [`Stdout`] with `write!` and `writeln!` instead, and a closed pipe comes
//! back as [`PrintError::Closed`], which the binary turns into a quiet exit
//! with [`CLOSED_EXIT_STATUS`].

use std::fmt;
use std::io::{ErrorKind, Write};

/// Exit status of a command whose output was closed by its reader: 128 +
/// SIGPIPE, what a shell reports for a tool that SIGPIPE killed.
pub const CLOSED_EXIT_STATUS: i32 = 141;

/// Why printing failed.
#[derive(Debug, thiserror::Error)]
pub enum PrintError {
    /// The reader closed its end of the pipe. Not a failure of the command:
    /// it ends quietly, like `head` taking what it wanted.
    #[error("standard output was closed by its reader")]
    Closed,
    /// Any other write error (a full disk, a revoked terminal): reported.
    /// The reason is in the message rather than a source, so `{:#}` prints
    /// it once.
    #[error("cannot write to standard output: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for PrintError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == ErrorKind::BrokenPipe {
            PrintError::Closed
        } else {
            PrintError::Io(e)
        }
    }
}

/// Whether `e` is a command's output closed by its reader: the command then
/// exits quietly with [`CLOSED_EXIT_STATUS`] instead of reporting an error.
pub fn output_closed(e: &anyhow::Error) -> bool {
    matches!(e.downcast_ref::<PrintError>(), Some(PrintError::Closed))
}

/// The process's standard output, locked for as long as a verb prints.
///
/// Take it after the verb's last request to the daemon (it is not `Send`, and
/// holding it across an await would keep stdout locked while waiting).
#[derive(Debug)]
pub struct Stdout {
    /// The lock, so a verb's lines are written without relocking each time.
    lock: std::io::StdoutLock<'static>,
}

impl Stdout {
    /// Locks standard output.
    pub fn lock() -> Self {
        Stdout {
            lock: std::io::stdout().lock(),
        }
    }

    /// What `write!` and `writeln!` call: prints formatted text.
    pub fn write_fmt(&mut self, args: fmt::Arguments<'_>) -> Result<(), PrintError> {
        Ok(self.lock.write_fmt(args)?)
    }

    /// Prints bytes as they are (replica output).
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<(), PrintError> {
        Ok(self.lock.write_all(bytes)?)
    }

    /// Writes out what is buffered (stdout is line-buffered): before waiting
    /// for more to print, and at the end of a verb.
    pub fn flush(&mut self) -> Result<(), PrintError> {
        Ok(self.lock.flush()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_pipe_is_a_closed_output_and_nothing_else_is() {
        let closed = PrintError::from(std::io::Error::from(ErrorKind::BrokenPipe));
        assert!(matches!(closed, PrintError::Closed));
        assert!(output_closed(&anyhow::Error::from(closed)));
        assert!(output_closed(
            &anyhow::Error::from(PrintError::Closed).context("printing the replicas")
        ));

        let full = PrintError::from(std::io::Error::from(ErrorKind::StorageFull));
        assert!(matches!(full, PrintError::Io(_)), "{full:?}");
        let full = anyhow::Error::from(full);
        assert!(!output_closed(&full));
        assert_eq!(
            format!("{full:#}"),
            format!(
                "cannot write to standard output: {}",
                std::io::Error::from(ErrorKind::StorageFull)
            )
        );
        // A broken pipe elsewhere (the connection to the daemon) is an error.
        assert!(!output_closed(&anyhow::Error::from(std::io::Error::from(
            ErrorKind::BrokenPipe
        ))));
    }
}
