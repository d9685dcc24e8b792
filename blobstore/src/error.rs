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
    /// `init` found a signature on the device (a file system, a partition
    /// table, a blobstore) and was not asked to overwrite it.
    #[error(
        "refusing to format {device}: it holds {what} (signature at byte {offset}); use --force \
         (CLI) / mkfs=force (URI) / BlobstoreOptions::force to overwrite it"
    )]
    DeviceNotBlank {
        /// The device (its spec).
        device: String,
        /// What it holds, e.g. "an ext4 file system".
        what: String,
        /// Byte offset of the signature found.
        offset: u64,
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
    /// A device did not complete an operation within its timeout. The
    /// operation failed; the device was asked to abort it.
    #[error("device timeout: {op} at block {lba} ({blocks} blocks) not done after {after_ms} ms")]
    Timeout {
        /// The operation that timed out.
        op: &'static str,
        /// First block of the operation.
        lba: u64,
        /// Number of blocks of the operation.
        blocks: u64,
        /// The timeout that expired, in milliseconds.
        after_ms: u64,
    },
    /// An NVMe command completed with an error status.
    #[error("NVMe {op} at block {lba} ({blocks} blocks) on namespace {nsid}: {status}")]
    Nvme {
        /// The operation that failed.
        op: &'static str,
        /// Namespace the command addressed.
        nsid: u32,
        /// First block of the operation.
        lba: u64,
        /// Number of blocks of the operation.
        blocks: u64,
        /// The status the controller returned.
        status: NvmeStatus,
    },
    /// The device failed as a whole (an NVMe controller reported a fatal
    /// status, or was reset while the operation was in flight).
    #[error("device {device} failed: {reason}")]
    DeviceFailed {
        /// The device (its spec or PCI address).
        device: String,
        /// What happened.
        reason: String,
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

/// An NVMe completion status (status code type and status code), with the
/// codes a caller acts on named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NvmeStatus {
    /// Generic 0x01: the controller does not implement the opcode.
    InvalidOpcode,
    /// Generic 0x02: a field of the command is invalid.
    InvalidField,
    /// Generic 0x04: the data transfer failed (e.g. a DMA fault).
    DataTransferError,
    /// Generic 0x06: internal controller error.
    InternalError,
    /// Generic 0x07: aborted on request (an Abort command).
    AbortRequested,
    /// Generic 0x08: aborted because its submission queue was deleted.
    AbortedSqDeleted,
    /// Generic 0x0B: the namespace does not exist or its format is invalid.
    InvalidNamespace,
    /// Generic 0x80: the LBA range goes past the namespace's size.
    LbaOutOfRange,
    /// Generic 0x81: the namespace's capacity is exhausted.
    CapacityExceeded,
    /// Generic 0x82: the namespace is not ready.
    NamespaceNotReady,
    /// Media 0x80: write fault.
    WriteFault,
    /// Media 0x81: unrecovered read error.
    UnrecoveredReadError,
    /// Anything else, as the raw status code type and status code.
    Other {
        /// Status code type (0 generic, 1 command specific, 2 media, ...).
        sct: u8,
        /// Status code.
        sc: u8,
    },
}

impl NvmeStatus {
    /// The typed status for a non-zero (sct, sc) pair.
    pub fn from_codes(sct: u8, sc: u8) -> NvmeStatus {
        match (sct, sc) {
            (0, 0x01) => NvmeStatus::InvalidOpcode,
            (0, 0x02) => NvmeStatus::InvalidField,
            (0, 0x04) => NvmeStatus::DataTransferError,
            (0, 0x06) => NvmeStatus::InternalError,
            (0, 0x07) => NvmeStatus::AbortRequested,
            (0, 0x08) => NvmeStatus::AbortedSqDeleted,
            (0, 0x0B) => NvmeStatus::InvalidNamespace,
            (0, 0x80) => NvmeStatus::LbaOutOfRange,
            (0, 0x81) => NvmeStatus::CapacityExceeded,
            (0, 0x82) => NvmeStatus::NamespaceNotReady,
            (2, 0x80) => NvmeStatus::WriteFault,
            (2, 0x81) => NvmeStatus::UnrecoveredReadError,
            (sct, sc) => NvmeStatus::Other { sct, sc },
        }
    }
}

impl std::fmt::Display for NvmeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NvmeStatus::Other { sct, sc } => write!(f, "status type {sct:#x} code {sc:#04x}"),
            named => write!(f, "{named:?}"),
        }
    }
}
