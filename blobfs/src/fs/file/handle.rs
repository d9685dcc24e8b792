//! [`File`], an open file: the public handle over the node every handle
//! of the file shares, with its access mode and the metrics of what goes
//! through it; and [`Metadata`], what a stat gives.
//!
//! Invariants:
//! - A handle counts itself in its node's `handles` from open to drop: a
//!   file deleted while open keeps its blob until that count is 0.
//! - A handle opened for reading only cannot write, and one opened for
//!   writing only cannot read ([`crate::Error::BadMode`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use blobstore::metrics::Stamp;

use super::{FileNode, PendingRead, Readahead};
use crate::error::{Error, Result};
use crate::fs::FsInner;

/// Metadata of a file or directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// Normalized full name.
    pub name: String,
    /// True for a directory.
    pub is_dir: bool,
    /// Length in bytes (0 for directories).
    pub len: u64,
    /// Last modification, nanoseconds since the Unix epoch.
    pub mtime_ns: u64,
    /// The blob that holds it.
    pub blob_id: blobstore::BlobId,
}

/// An open file. Handles are independent; all handles of one file share its
/// data, length and write buffer. Safe to use from any thread.
pub struct File {
    pub(crate) fs: Arc<FsInner>,
    pub(crate) node: Arc<FileNode>,
    pub(crate) read: bool,
    pub(crate) write: bool,
    /// Reads bypass the cache ([`crate::OpenOptions::direct`]).
    pub(crate) direct: bool,
    /// A WAL, by its name when opened (its syncs are counted apart).
    pub(crate) wal: bool,
    pub(crate) ra: Readahead,
}

impl File {
    /// Current length in bytes.
    pub fn len(&self) -> u64 {
        self.node.len.load(Ordering::Acquire)
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file's current name.
    pub fn name(&self) -> String {
        self.node.name()
    }

    /// Metadata, as [`crate::BlobFs::stat`] gives it.
    pub fn metadata(&self) -> Metadata {
        Metadata {
            name: self.name(),
            is_dir: false,
            len: self.len(),
            mtime_ns: self.node.mtime.load(Ordering::Acquire),
            blob_id: self.node.blob.id(),
        }
    }

    fn check(&self, write: bool) -> Result<()> {
        if write && !self.write {
            return Err(Error::BadMode(self.name(), "writing"));
        }
        if !write && !self.read {
            return Err(Error::BadMode(self.name(), "reading"));
        }
        Ok(())
    }

    /// Reads at `off` into `dst`; returns the bytes read (0 at the end).
    pub async fn read_at_async(&self, off: u64, dst: &mut [u8]) -> Result<usize> {
        self.check(false)?;
        let start = Stamp::now();
        let res = self
            .node
            .read_at(&self.fs, &self.ra, off, dst, self.direct)
            .await;
        let n = *res.as_ref().unwrap_or(&0);
        self.fs
            .metrics
            .with(|m| m.read.record(start, n as u64, res.is_ok()));
        let n = res?;
        self.ra.note(off + n as u64);
        Ok(n)
    }

    /// Starts a read of `len` bytes at `off` into `dst` and returns it
    /// running: its device reads are submitted before this returns, and
    /// the caller does other work until [`PendingRead::poll`] or
    /// [`PendingRead::wait`] finishes it (RocksDB's `ReadAsync`). A read
    /// served from memory (the cache, the write buffer) is finished on
    /// return.
    ///
    /// The bytes land in `dst` only while the read is polled: device reads
    /// go to the device's own buffers and are copied by the poll that
    /// finds them complete, so dropping the read unfinished leaves `dst`
    /// untouched from then on.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes, and not used by
    /// anything else, until the returned read finishes or is dropped.
    pub unsafe fn start_read(&self, off: u64, dst: *mut u8, len: usize) -> PendingRead {
        let check = self.check(false);
        let (fs, node, direct) = (self.fs.clone(), self.node.clone(), self.direct);
        let fut = async move {
            check?;
            if len == 0 {
                return Ok(0);
            }
            // SAFETY: the caller's promise: valid and ours until the read
            // finishes or is dropped, which ends this future.
            let dst = unsafe { std::slice::from_raw_parts_mut(dst, len) };
            let start = Stamp::now();
            // Its own readahead state: RocksDB's asynchronous reads are
            // its readahead already.
            let res = node
                .read_at(&fs, &Readahead::default(), off, dst, direct)
                .await;
            let n = *res.as_ref().unwrap_or(&0);
            fs.metrics
                .with(|m| m.read.record(start, n as u64, res.is_ok()));
            res
        };
        PendingRead::start(fut, self.fs.clone())
    }

    /// Synchronous [`File::read_at_async`]. On a direct handle, an aligned
    /// read goes from the device straight into `dst` where the device
    /// allows it (see [`crate::OpenOptions::direct`]).
    pub fn read_at(&self, off: u64, dst: &mut [u8]) -> Result<usize> {
        if self.direct {
            self.check(false)?;
            let start = Stamp::now();
            let res = self.node.read_direct_into(off, dst);
            if !matches!(res, Ok(None)) {
                let n = res.as_ref().map_or(0, |r| r.map_or(0, |(n, _)| n as u64));
                let straight = matches!(res, Ok(Some((_, true))));
                let ticks = start.elapsed_ticks();
                self.fs.metrics.with(|m| {
                    m.read.record_ticks(ticks, n, res.is_ok());
                    if straight {
                        m.direct_read.record_ticks(ticks, n, true);
                    }
                });
                let (n, _) = res?.unwrap_or_default();
                self.ra.note(off + n as u64);
                return Ok(n);
            }
        }
        blobstore::block_on(self.read_at_async(off, dst))
    }

    /// [`File::read_at`] within `timeout`: [`Error::TimedOut`] when the
    /// device has not answered by then (what RocksDB's `io_timeout` and
    /// `deadline` ask of a read). Bytes the cache or the write buffer holds
    /// are returned at once. A read given up on leaves `dst` unspecified and
    /// changes nothing else: its device operation completes later into
    /// memory of its own, and what it read is not cached.
    pub fn read_at_timeout(&self, off: u64, dst: &mut [u8], timeout: Duration) -> Result<usize> {
        let mut one = [(off, dst)];
        let mut res = self.read_many_timeout(&mut one, timeout);
        res.pop()
            .unwrap_or_else(|| Err(Error::TimedOut(self.name(), timeout)))
    }

    /// Reads several ranges, each `(offset, buffer)` as [`File::read_at`]
    /// would, with every device read of the batch submitted before any is
    /// waited for, so the device queue sees the whole batch (what RocksDB's
    /// `MultiRead` asks for). Each range gets its own result, in order.
    pub fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Vec<Result<usize>> {
        let reads = reqs
            .iter_mut()
            .map(|(off, dst)| self.read_at_async(*off, dst));
        blobstore::block_on(futures::future::join_all(reads))
    }

    /// [`File::read_many`] within `timeout` for the whole batch: when it
    /// passes first, every range of the batch fails with
    /// [`Error::TimedOut`] (as [`File::read_at_timeout`]).
    pub fn read_many_timeout(
        &self,
        reqs: &mut [(u64, &mut [u8])],
        timeout: Duration,
    ) -> Vec<Result<usize>> {
        let n = reqs.len();
        let start = Stamp::now();
        let deadline = std::time::Instant::now() + timeout;
        let reads = reqs
            .iter_mut()
            .map(|(off, dst)| self.read_at_async(*off, dst));
        match blobstore::block_on_deadline(futures::future::join_all(reads), deadline) {
            Some(results) => results,
            None => {
                // Each counted as a failed read of the time it took.
                let ticks = start.elapsed_ticks();
                self.fs.metrics.with(|m| {
                    for _ in 0..n {
                        m.read.record_ticks(ticks, 0, false);
                    }
                });
                (0..n)
                    .map(|_| Err(Error::TimedOut(self.name(), timeout)))
                    .collect()
            }
        }
    }

    /// Reads the whole file.
    pub fn read_all(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.len() as usize];
        let mut pos = 0;
        while pos < out.len() {
            let n = self.read_at(pos as u64, &mut out[pos..])?;
            if n == 0 {
                out.truncate(pos);
                break;
            }
            pos += n;
        }
        Ok(out)
    }

    /// Appends `data` at the end.
    pub async fn append_async(&self, data: &[u8]) -> Result<()> {
        self.check(true)?;
        let off = self.len();
        self.write_counted(off, data).await
    }

    /// Writes through the node, counted as an append.
    async fn write_counted(&self, off: u64, data: &[u8]) -> Result<()> {
        let start = Stamp::now();
        let res = self.node.write_at(&self.fs, off, data).await;
        self.fs
            .metrics
            .with(|m| m.append.record(start, data.len() as u64, res.is_ok()));
        res
    }

    /// Synchronous [`File::append_async`].
    pub fn append(&self, data: &[u8]) -> Result<()> {
        blobstore::block_on(self.append_async(data))
    }

    /// Writes `data` at `off`, which may be at most the current length.
    pub async fn write_at_async(&self, off: u64, data: &[u8]) -> Result<()> {
        self.check(true)?;
        self.write_counted(off, data).await
    }

    /// Synchronous [`File::write_at_async`].
    pub fn write_at(&self, off: u64, data: &[u8]) -> Result<()> {
        blobstore::block_on(self.write_at_async(off, data))
    }

    /// Sets the length; growth reads as zeroes.
    pub async fn truncate_async(&self, len: u64) -> Result<()> {
        self.check(true)?;
        self.node.truncate(&self.fs, len).await
    }

    /// Synchronous [`File::truncate_async`].
    pub fn truncate(&self, len: u64) -> Result<()> {
        blobstore::block_on(self.truncate_async(len))
    }

    /// Makes all data and the length durable: as durable as the device is.
    /// On a device whose blocks live exactly as long as its unsynced memory
    /// (`shm:`, [`blobstore::BlockDevice::volatile`]) every acknowledged
    /// append already is, and a killed process's next mount writes it
    /// back, so the sync writes nothing (as tmpfs's fsync); it still waits
    /// for the file's write-behind and reports one that failed.
    pub async fn sync_async(&self) -> Result<()> {
        let start = Stamp::now();
        let res = if self.fs.volatile {
            self.node.settled(&self.fs).await
        } else {
            self.node.sync(&self.fs).await
        };
        let ok = res.is_ok();
        self.fs.metrics.with(|m| {
            let c = if self.wal { &m.wal_sync } else { &m.sync };
            c.record(start, 0, ok)
        });
        res
    }

    /// Synchronous [`File::sync_async`].
    pub fn sync(&self) -> Result<()> {
        blobstore::block_on(self.sync_async())
    }

    /// Syncs (if opened for writing) and closes the handle.
    pub async fn close_async(self) -> Result<()> {
        if self.write {
            self.node.sync(&self.fs).await?;
            if self.node.handles.load(Ordering::Acquire) == 1 {
                self.node.release_buffer(&self.fs).await;
            }
        }
        let fs = self.fs.clone();
        let unlinked = self.node.unlinked.load(Ordering::Acquire);
        drop(self);
        if unlinked {
            let _g = fs.ns.lock().await;
            fs.reap_pending().await?;
        }
        Ok(())
    }

    /// Synchronous [`File::close_async`].
    pub fn close(self) -> Result<()> {
        blobstore::block_on(self.close_async())
    }
}

impl Drop for File {
    fn drop(&mut self) {
        // An unlinked file's blob is deleted by the next namespace change,
        // close or unmount that finds no handle left (or at the next mount).
        self.node.handles.fetch_sub(1, Ordering::AcqRel);
    }
}
