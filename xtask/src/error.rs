//! The error type of xtask: a message for the user, plus the one case that has its own exit
//! status (host tools missing and not installable by us).

use std::fmt;

/// Why an xtask command could not do its job (as opposed to tests that ran and failed, which
/// are results, not errors).
#[derive(Debug)]
pub enum Error {
    /// System tools are missing and we are not root: the message holds the command to run.
    /// Exit status 2.
    MissingTools(String),
    /// Anything else, with enough context to act on. Exit status 1.
    Failed(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::MissingTools(message) | Error::Failed(message) => f.write_str(message),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Builds an [`Error::Failed`] from anything printable.
pub fn failed(message: impl Into<String>) -> Error {
    Error::Failed(message.into())
}

/// Adds "what we were doing" to I/O errors, which on their own do not name the file.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Context<T> for std::io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|err| Error::Failed(format!("{}: {err}", what())))
    }
}
