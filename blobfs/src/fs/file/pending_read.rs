//! [`PendingRead`]: a read that [`File::start_read`](super::File::start_read)
//! started, which polls on the thread that started it finish (RocksDB's
//! `ReadAsync`). Its invariants are in its docs.

use std::sync::Arc;

use blobstore::metrics::Stamp;

use crate::error::{Error, Result};
use crate::fs::FsInner;

/// A read started by [`File::start_read`](crate::File::start_read),
/// running on the thread that started it.
///
/// Invariants:
/// - its device operations are on the starting thread's channels, so only
///   that thread can finish it: [`PendingRead::wait`] on another thread
///   refuses instead of waiting for a completion it cannot reap;
/// - once finished (`out` set) the future is gone and `dst` is no longer
///   touched.
pub struct PendingRead {
    fut: Option<std::pin::Pin<Box<dyn std::future::Future<Output = Result<usize>>>>>,
    out: Option<Result<usize>>,
    thread: std::thread::ThreadId,
    fs: Arc<FsInner>,
    /// Set when the read was still in flight as its start returned: it is
    /// counted as an asynchronous read when it finishes.
    started: Option<Stamp>,
}

impl Drop for PendingRead {
    fn drop(&mut self) {
        // A future of another thread's channels may only be dropped there;
        // here it is leaked instead (its device reads complete into memory
        // that thread's channel keeps, and are reaped by its next poll).
        if self.fut.is_some() && std::thread::current().id() != self.thread {
            std::mem::forget(self.fut.take());
        }
    }
}

impl PendingRead {
    /// Starts `fut`, a read of `fs`, on this thread: polls it once, which
    /// submits its device reads, and returns it, finished or running.
    pub(super) fn start(
        fut: impl std::future::Future<Output = Result<usize>> + 'static,
        fs: Arc<FsInner>,
    ) -> PendingRead {
        let mut read = PendingRead {
            fut: Some(Box::pin(fut)),
            out: None,
            thread: std::thread::current().id(),
            fs,
            started: None,
        };
        if !read.poll() {
            read.started = Some(Stamp::now());
        }
        read
    }

    /// Polls the read once without waiting, on the thread that started it
    /// (its device completions are reaped here); true once it is finished.
    pub fn poll(&mut self) -> bool {
        if self.out.is_some() {
            return true;
        }
        let Some(fut) = self.fut.as_mut() else {
            return true;
        };
        if std::thread::current().id() != self.thread {
            return false;
        }
        blobstore::device::poll_thread_channels();
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        if let std::task::Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
            self.finished(r);
            return true;
        }
        // Devices may queue what the poll submitted until their channel is
        // polled (io_uring's submission queue): hand it to the device now,
        // or nothing runs until the caller waits.
        blobstore::device::poll_thread_channels();
        false
    }

    /// Keeps the outcome, and counts an asynchronous read.
    fn finished(&mut self, r: Result<usize>) {
        self.fut = None;
        if let Some(start) = self.started.take() {
            let n = *r.as_ref().unwrap_or(&0) as u64;
            self.fs
                .metrics
                .with(|m| m.async_read.record(start, n, r.is_ok()));
        }
        self.out = Some(r);
    }

    /// Waits for the read and returns the bytes read (fewer than asked
    /// only at the end of the file), or its error. The outcome is given
    /// once; a later call is refused. On a thread other than the one that
    /// started it, refused too: that thread's channels hold its device
    /// reads, and the read stays pending.
    pub fn wait(&mut self) -> Result<usize> {
        if self.out.is_none() {
            if std::thread::current().id() != self.thread {
                return Err(Error::InvalidArgument(
                    "a started read was waited for on a thread other than the one that started it"
                        .into(),
                ));
            }
            if let Some(fut) = self.fut.take() {
                let r = blobstore::block_on(fut);
                self.finished(r);
            }
        }
        self.out.take().unwrap_or_else(|| {
            Err(Error::InvalidArgument(
                "a started read's outcome was already taken".into(),
            ))
        })
    }
}
