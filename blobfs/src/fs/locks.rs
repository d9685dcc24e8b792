//! File locks ([`BlobFs::lock`]): named, held until dropped. Like POSIX
//! record locks, which belong to the file and not to its name, they move
//! with a rename of the file or of a directory above it.
//!
//! Invariants:
//! - At most one lock per name. The table (`FsInner::locks`) maps each
//!   held lock's number to the name it holds now; a lock's number is never
//!   reused in a mount.
//! - Only a rename moves a lock ([`FsInner::move_locks`], under the `ns`
//!   lock, once the rename is done in memory); a lock on a replaced rename
//!   target stays on its name.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{BlobFs, FsInner};
use crate::error::{Error, Result};
use crate::name::{self, normalize_entry};

/// A held file lock; released on drop. Like a POSIX record lock, which
/// belongs to the file and not to its name, it moves with a rename of the
/// file or of a directory above it.
pub struct FileLock {
    fs: Arc<FsInner>,
    id: u64,
}

impl FileLock {
    /// The locked name (after any rename that moved it).
    pub fn name(&self) -> String {
        self.fs
            .locks
            .lock()
            .get(&self.id)
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        self.fs.locks.lock().remove(&self.id);
    }
}

impl BlobFs {
    /// Takes the lock named `name` (a file need not exist). A second lock of
    /// the same name fails with [`Error::Locked`] until the first is dropped.
    /// A rename of the name (or of a directory above it) moves the lock to
    /// the new name, as a POSIX lock stays with its file; a lock on a
    /// replaced rename target stays on its name.
    pub fn lock(&self, name: &str) -> Result<FileLock> {
        let name = normalize_entry(name)?;
        let mut locks = self.inner.locks.lock();
        if locks.values().any(|n| *n == name) {
            return Err(Error::Locked(name));
        }
        let id = self.inner.next_lock.fetch_add(1, Ordering::Relaxed);
        locks.insert(id, name);
        Ok(FileLock {
            fs: self.inner.clone(),
            id,
        })
    }
}

impl FsInner {
    /// Moves the locks held on `from`, and with `tree` (a directory) on
    /// names below it, to the names a rename of `from` to `to` gives them.
    pub(super) fn move_locks(&self, from: &str, to: &str, tree: bool) {
        for n in self.locks.lock().values_mut() {
            if let Some(moved) = name::rebase(n, from, to).filter(|_| tree || n == from) {
                *n = moved;
            }
        }
    }
}
