//! The one error type of BlobFS.

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in a file-system call. Each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No file or directory of that name.
    #[error("{0}: no such file or directory")]
    NotFound(String),
    /// The name is taken.
    #[error("{0}: already exists")]
    AlreadyExists(String),
    /// A directory was found where a file is needed.
    #[error("{0}: is a directory")]
    IsADirectory(String),
    /// A file (or nothing) was found where a directory is needed.
    #[error("{0}: not a directory")]
    NotADirectory(String),
    /// The directory still has entries.
    #[error("{0}: directory not empty")]
    DirectoryNotEmpty(String),
    /// The name breaks the naming rules.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Which rule it breaks.
        reason: String,
    },
    /// The handle was not opened for this kind of access.
    #[error("{0}: not opened for {1}")]
    BadMode(String, &'static str),
    /// The file is locked by another holder.
    #[error("{0}: already locked")]
    Locked(String),
    /// An argument is out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// The device holds something that is not a BlobFS.
    #[error("not a BlobFS: {0}")]
    NotBlobFs(String),
    /// The store is full.
    #[error("{0}: out of space ({1})")]
    NoSpace(String, blobstore::Error),
    /// File-system metadata on the device is damaged.
    #[error("corrupt file-system metadata: {0}")]
    Corrupt(String),
    /// An earlier write of buffered data failed, so bytes written but not
    /// synced were lost; reported by every later write and sync until the
    /// file is truncated.
    #[error("{0}: an earlier write failed and unsynced data was lost: {1}")]
    WriteLost(String, String),
    /// An error from the blobstore, with the file it concerns.
    #[error("{0}: {1}")]
    Store(String, #[source] blobstore::Error),
    /// A read with a time limit did not complete within it (the device
    /// operation, if any, completes later and is dropped).
    #[error("{0}: read timed out after {1:?}")]
    TimedOut(String, std::time::Duration),
}

impl Error {
    /// Wraps a blobstore error for file `name`, keeping out-of-space and
    /// corruption recognisable.
    pub fn store(name: &str, e: blobstore::Error) -> Error {
        match e {
            blobstore::Error::NoSpace(_) => Error::NoSpace(name.to_string(), e),
            other => Error::Store(name.to_string(), other),
        }
    }

    /// True for errors that mean "out of space".
    pub fn is_no_space(&self) -> bool {
        matches!(self, Error::NoSpace(..))
    }
}

/// Adds the file name to a blobstore result.
pub(crate) trait Context<T> {
    fn ctx(self, name: &str) -> Result<T>;
}

impl<T> Context<T> for blobstore::Result<T> {
    fn ctx(self, name: &str) -> Result<T> {
        self.map_err(|e| Error::store(name, e))
    }
}
