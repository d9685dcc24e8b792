//! The writer thread: one per mount, started on the first write behind an
//! appender ([`FsInner::write_behind`]). It writes files' full append
//! buffers to their blobs while appends go on into a second buffer, as the
//! page cache writes back behind a writer.
//!
//! The hand-off stays because a file may be appended on one thread and
//! synced on another, and an `IoChannel` cannot leave its thread: the
//! writer thread owns the one channel that writes every file's full
//! buffers, one write per file at a time (the file keeps that write's
//! range in its `Behind`, see [`crate::fs::file`]).
//!
//! Invariants:
//! - A job's node is let go before the file's waiters are woken, so a
//!   delete waiting for the write finds the node free.
//! - The thread ends when its queue's sender goes; [`Writer::stop`] (run
//!   when the file system goes) waits for what was queued to land, so no
//!   write is in flight once the device is free.
//! - When the thread cannot be started, the buffer goes back to the
//!   caller, which writes it itself.

use std::sync::Arc;

use blobstore::block_on;
use blobstore::metrics::Shards;

use super::FsInner;
use crate::fs::file::FileNode;
use crate::metrics::FsShard;
use crate::unsynced::Unsynced;

/// The writer thread and its queue.
pub(super) struct Writer {
    jobs: std::sync::mpsc::Sender<BehindJob>,
    thread: std::thread::JoinHandle<()>,
}

/// A buffer to write at an io unit of a file's blob, behind its writer.
type BehindJob = (Arc<FileNode>, u64, blobstore::DmaBuf);

/// The writer thread: writes each job's buffer and reports to the file.
fn run_writer(
    jobs: std::sync::mpsc::Receiver<BehindJob>,
    unsynced: Arc<Unsynced>,
    metrics: Arc<Shards<FsShard>>,
) {
    while let Ok((node, lba, buf)) = jobs.recv() {
        let outcome = block_on(node.land_behind(&unsynced, &metrics, lba, buf));
        let behind = node.behind.clone();
        // Let go of the node before waking anyone: a delete waiting for
        // this write then finds the node free.
        drop(node);
        behind.finish(outcome);
    }
}

impl Writer {
    /// Ends the thread once the jobs queued so far have landed.
    pub(super) fn stop(self) {
        drop(self.jobs);
        let _ = self.thread.join();
    }
}

impl FsInner {
    /// Hands a buffer to the writer thread; gives it back when there is no
    /// writer thread (it could not be started).
    pub fn write_behind(
        &self,
        node: Arc<FileNode>,
        lba: u64,
        buf: blobstore::DmaBuf,
    ) -> std::result::Result<(), blobstore::DmaBuf> {
        let mut w = self.writer.lock();
        if w.is_none() {
            let (tx, rx) = std::sync::mpsc::channel();
            let unsynced = self.unsynced.clone();
            let metrics = self.metrics.clone();
            let Ok(thread) = std::thread::Builder::new()
                .name("blobfs-writer".into())
                .spawn(move || run_writer(rx, unsynced, metrics))
            else {
                return Err(buf);
            };
            *w = Some(Writer { jobs: tx, thread });
        }
        let jobs = &w.as_ref().expect("just set").jobs;
        jobs.send((node, lba, buf)).map_err(|e| (e.0).2)
    }
}
