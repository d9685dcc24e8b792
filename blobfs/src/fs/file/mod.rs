//! Files: the node every handle of one file shares ([`FileNode`]), its
//! write buffer, and the read path through the cache.
//!
//! Where things happen:
//! - Here: the node and its write state, and the helpers every part uses.
//! - [`handle`]: [`File`], the public handle, and [`Metadata`];
//!   [`pending_read`]: [`PendingRead`], a read started now and finished
//!   later.
//! - [`read`]: the read path (the write buffer, the cache and readahead,
//!   direct reads).
//! - [`write`](mod@write): appends and positional writes, and the spill of a full
//!   buffer behind the appender.
//! - [`buffer`]: the append buffer's life: loaded, written to the blob,
//!   given back.
//! - [`sync`]: what makes a file durable: sync (with its one-flush tail
//!   check), set_mtime, and truncate.
//! - [`behind`]: one file's write behind the appender, and the waits for
//!   it.
//!
//! Invariants (each module lists its own):
//! - `len` is the file's length as readers see it; `flushed` <= `len`, and
//!   every byte below `flushed` is on the blob. Bytes in `[flushed, len)` live
//!   in the write buffer, which starts at the block-aligned `buf_start ==
//!   flushed`.
//! - Bytes of the blob at or past `len` are never read: every read is
//!   clamped to `len`, and every byte below `len` was written by this file
//!   (appends, positional writes, or the zeroes a growing truncate writes).
//!   That is why new clusters need no zeroing (`Blob::resize_uninit`), and
//!   why no file ever shows bytes of another. A padded tail block is zeroed
//!   past the used part before it is written.
//! - At most one write behind the appender per file is in flight, and its
//!   range is in `behind`; no blob read overlaps that range until the write
//!   has landed.
//! - After `sync` returns, the blob holds every byte below `len` and its
//!   metadata holds `len`, both durable.
//! - Every byte below `len` is in an append buffer (a slot of the mount's
//!   unsynced memory whose header describes it) or on the blob under
//!   durable metadata, so a killed process loses nothing an append
//!   returned for.
//! - Lock order: the file system's `ns` first, then the write lock
//!   (`state`), never the other way round (see [`crate::fs`]).

mod behind;
mod buffer;
mod handle;
mod pending_read;
mod read;
mod sync;
#[cfg(test)]
mod tests;
mod write;

pub use handle::{File, Metadata};
pub use pending_read::PendingRead;
pub(crate) use read::Readahead;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use blobstore::{Blob, DmaBuf};
use parking_lot::RwLock;

use crate::error::{Context, Error, Result};
use behind::Behind;

/// Appends are written to the device in chunks of this many bytes (an
/// append buffer; the unsynced memory's slots are sized by it).
pub(crate) use crate::unsynced::WRITE_CHUNK;

/// The write side of a file, under its write lock ([`FileNode::state`]).
pub(crate) struct WriteState {
    /// Buffer of `WRITE_CHUNK + 2 units` bytes, holding file bytes from `buf_start`.
    buf: Option<DmaBuf>,
    used: usize,
    buf_start: u64,
    /// Bytes at the start of the buffer (block-aligned) that are on the
    /// blob as they are in the buffer: a sync writes only what follows, so
    /// a WAL synced after every record writes its new tail, not the whole
    /// buffer again.
    clean: usize,
    /// Reused DMA memory for writing a part of the buffer that does not
    /// start at its beginning.
    scratch: Option<DmaBuf>,
    synced_len: u64,
    /// Length or mtime changed since the last metadata sync.
    md_dirty: bool,
    /// Data reached the blob since the last device flush.
    data_dirty: bool,
    /// Set when a buffer write failed and unsynced bytes were lost.
    failed: Option<String>,
}

/// One file, as every handle of it shares it: its blob, its length and
/// write state, its write behind the appender.
pub(crate) struct FileNode {
    pub blob: Blob,
    pub behind: Arc<Behind>,
    pub name: RwLock<String>,
    pub len: AtomicU64,
    pub flushed: AtomicU64,
    pub mtime: AtomicU64,
    pub gen: AtomicU64,
    pub handles: AtomicUsize,
    pub unlinked: AtomicBool,
    pub state: futures::lock::Mutex<WriteState>,
    unit: u64,
    cluster: u64,
    cache_id: u64,
}

impl FileNode {
    pub fn new(blob: Blob, name: String, len: u64, mtime: u64, cluster: u64) -> FileNode {
        let unit = blob.io_unit_size() as u64;
        let start = len / unit * unit;
        FileNode {
            blob,
            behind: Arc::default(),
            name: RwLock::new(name),
            len: AtomicU64::new(len),
            flushed: AtomicU64::new(start),
            mtime: AtomicU64::new(mtime),
            gen: AtomicU64::new(0),
            handles: AtomicUsize::new(0),
            unlinked: AtomicBool::new(false),
            state: futures::lock::Mutex::new(WriteState {
                buf: None,
                used: (len - start) as usize,
                buf_start: start,
                clean: 0,
                scratch: None,
                synced_len: len,
                md_dirty: false,
                data_dirty: false,
                failed: None,
            }),
            unit,
            cluster,
            cache_id: {
                static NEXT: AtomicU64 = AtomicU64::new(1);
                NEXT.fetch_add(1, Ordering::Relaxed)
            },
        }
    }

    /// This node's key in the read cache: unique for the life of the
    /// process, so a new file never meets chunks of a deleted one that had
    /// the same blob id.
    pub fn id(&self) -> u64 {
        self.cache_id
    }

    pub fn name(&self) -> String {
        self.name.read().clone()
    }

    fn align_down(&self, v: u64) -> u64 {
        v / self.unit * self.unit
    }

    fn align_up(&self, v: u64) -> u64 {
        v.div_ceil(self.unit) * self.unit
    }

    /// Grows the blob to hold `end` bytes.
    async fn ensure_capacity(&self, end: u64) -> Result<()> {
        if end <= self.blob.size_bytes() {
            return Ok(());
        }
        self.blob
            .resize_uninit(end.div_ceil(self.cluster))
            .await
            .ctx(&self.name())
    }

    fn check_failed(&self, st: &WriteState) -> Result<()> {
        match &st.failed {
            Some(reason) => Err(Error::WriteLost(self.name(), reason.clone())),
            None => Ok(()),
        }
    }

    /// Makes the blob's cluster map durable when it changed, so bytes
    /// written to new clusters can be found after the process dies. The
    /// length is not part of it: only `sync` moves `fs.len` (an unsynced
    /// length lives in the unsynced memory), so after a power cut nothing
    /// past the synced length is ever read.
    async fn persist_clusters(&self) -> Result<()> {
        if self.blob.is_dirty() {
            self.blob
                .sync_metadata_unordered()
                .await
                .ctx(&self.name())?;
        }
        Ok(())
    }
}
