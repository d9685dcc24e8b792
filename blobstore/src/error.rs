//! The one error type of the blobstore crate.
//!
//! Every variant says what failed and where (blob id, page, offset), so a
//! caller can print it as is. Anything read from a disk or passed in by a
//! caller that is wrong turns into one of these, never a panic.

use crate::BlobId;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the device layer and the blobstore.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The device reported an error for an operation.
    #[error("device I/O error: {op} at block {lba} ({blocks} blocks): {reason}")]
    Io {
        /// The operation that failed (`read`, `write`, `flush`, ...).
        op: &'static str,
        /// First block of the operation.
        lba: u64,
        /// Number of blocks of the operation.
        blocks: u64,
        /// What the device said.
        reason: String,
    },
    /// Bytes read from the device are not what the format says they must be.
    #[error("corrupt metadata in {location}: {what}")]
    Corrupt {
        /// Where the bad bytes are (e.g. "super block", "metadata page 17").
        location: String,
        /// What is wrong with them.
        what: String,
    },
    /// The device holds no blobstore (no super block magic).
    #[error("the device holds no blobstore: {0}")]
    NotABlobstore(String),
    /// The blobstore on the device has a different type tag than requested.
    #[error("blobstore type mismatch: the device holds type {found:?}, expected {expected:?}")]
    WrongType {
        /// Type tag found on the device.
        found: String,
        /// Type tag the caller asked for.
        expected: String,
    },
    /// No free cluster or metadata page is left.
    #[error("out of space: {0}")]
    NoSpace(String),
    /// The blob does not exist.
    #[error("blob {0} not found")]
    NotFound(BlobId),
    /// An I/O or resize reaches past the end of a blob or device.
    #[error("{what}: range {offset}+{len} is past the end ({size})")]
    OutOfRange {
        /// What was addressed (blob or device).
        what: String,
        /// Start of the range, in the unit of `what`.
        offset: u64,
        /// Length of the range, in the unit of `what`.
        len: u64,
        /// Size of `what`, in the same unit.
        size: u64,
    },
    /// A caller passed an argument that is not valid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A blob is read-only and the operation would change it.
    #[error("blob {0} is read-only")]
    ReadOnly(BlobId),
    /// The object is in use (an open blob that is being deleted, a claimed device).
    #[error("busy: {0}")]
    Busy(String),
    /// The device or this build does not support the operation.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A device spec string could not be parsed.
    #[error("bad device spec {spec:?}: {reason}")]
    BadSpec {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The device is too small for what was asked.
    #[error("device too small: {0}")]
    DeviceTooSmall(String),
    /// An operating-system call failed while opening or setting up a device.
    #[error("{context}: {source}")]
    Os {
        /// What we were doing.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The reactor or a channel was shut down while an operation waited on it.
    #[error("shut down: {0}")]
    Shutdown(String),
}

impl Error {
    /// Shorthand for a [`Error::Corrupt`].
    pub fn corrupt(location: impl Into<String>, what: impl Into<String>) -> Self {
        Error::Corrupt {
            location: location.into(),
            what: what.into(),
        }
    }

    /// Shorthand for an [`Error::Os`] from the last OS error.
    pub fn last_os(context: impl Into<String>) -> Self {
        Error::Os {
            context: context.into(),
            source: std::io::Error::last_os_error(),
        }
    }
}
