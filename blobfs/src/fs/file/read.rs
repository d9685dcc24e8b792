//! The read path: [`FileNode::read_at`] takes the bytes still in the write
//! buffer from it, and the rest from the blob through the read cache (with
//! readahead for sequential reads, and whole extents while the cache has
//! room), or straight from the device for a `direct` handle or a mount
//! without a cache; [`FileNode::read_direct_into`] reads a direct handle's
//! aligned ranges from the device into the caller's buffer.
//!
//! Invariants:
//! - Every read is clamped to `len`: bytes of the blob at or past it are
//!   never read.
//! - No blob read overlaps a write behind the appender in flight (it waits
//!   for `behind` to be clear of its range); chunks read while the file's
//!   generation moved are not cached.
//! - Each thread keeps one spare read buffer (up to `KEPT_READ_BUF`), so
//!   reads do not allocate and zero DMA memory each time.

use std::sync::atomic::Ordering;

use blobstore::DmaBuf;
use parking_lot::Mutex;

use super::FileNode;
use crate::error::{Error, Result};
use crate::fs::FsInner;

/// Largest readahead window.
pub const MAX_READAHEAD: u64 = 1 << 20;

impl FileNode {
    /// Reads up to `dst.len()` bytes at `off`; returns how many (0 at EOF).
    pub async fn read_at(
        &self,
        fs: &FsInner,
        ra: &Readahead,
        off: u64,
        dst: &mut [u8],
        direct: bool,
    ) -> Result<usize> {
        let len = self.len.load(Ordering::Acquire);
        if off >= len || dst.is_empty() {
            return Ok(0);
        }
        let n = (dst.len() as u64).min(len - off) as usize;
        let end = off + n as u64;
        let mut dev_end = end;
        if end > self.flushed.load(Ordering::Acquire) {
            // Part of the range is in the write buffer.
            let st = self.state.lock().await;
            let start = st.buf_start;
            if end > start {
                let from = off.max(start);
                if let Some(buf) = &st.buf {
                    let s = (from - start) as usize;
                    let e = (end - start) as usize;
                    dst[(from - off) as usize..n].copy_from_slice(&buf[s..e]);
                } else {
                    // Not loaded yet: the partial block is still on the blob.
                    drop(st);
                    return self
                        .read_blob(fs, ra, off, &mut dst[..n], direct)
                        .await
                        .map(|_| n);
                }
                dev_end = from;
            }
        }
        if dev_end > off {
            self.read_blob(fs, ra, off, &mut dst[..(dev_end - off) as usize], direct)
                .await?;
        }
        Ok(n)
    }

    /// A direct handle's read of `[off, ...)` straight from the device
    /// into `dst` (see [`blobstore::Blob::read_into`]), when `off` is on an
    /// io unit, `dst` holds whole units and the bytes asked for are all on
    /// the device (none in the write buffer). `Ok(None)`: the general path
    /// must serve it. The device may fill `dst` beyond the file's end up
    /// to the unit boundary, as an `O_DIRECT` read may.
    pub fn read_direct_into(&self, off: u64, dst: &mut [u8]) -> Result<Option<(usize, bool)>> {
        let len = self.len.load(Ordering::Acquire);
        if off >= len || dst.is_empty() || !off.is_multiple_of(self.unit) {
            return Ok(None);
        }
        let n = (dst.len() as u64).min(len - off);
        let span = self.align_up(off + n) - off;
        if span > dst.len() as u64 || off + span > self.blob.size_bytes() {
            return Ok(None);
        }
        if off + n > self.flushed.load(Ordering::Acquire) {
            // The file's last, partial block: on the blob unless the write
            // buffer holds it (then, or when a writer holds the state, the
            // general path reads it).
            match self.state.try_lock() {
                Some(st) if st.buf.is_none() => {}
                _ => return Ok(None),
            }
        }
        self.behind.clear_blocking(off, off + span);
        let straight = self
            .blob
            .read_into(off / self.unit, &mut dst[..span as usize])
            .map_err(|e| Error::store(&self.name(), e))?;
        Ok(Some((n as usize, straight)))
    }

    /// Reads blob bytes `[off, off+dst.len())` through the cache, or
    /// straight from the device when the mount has no cache or the handle
    /// is `direct`.
    async fn read_blob(
        &self,
        fs: &FsInner,
        ra: &Readahead,
        off: u64,
        dst: &mut [u8],
        direct: bool,
    ) -> Result<()> {
        // The name only for errors: taking it costs a lock and a copy.
        let err = |e| Error::store(&self.name(), e);
        let end = off + dst.len() as u64;
        let cache = &fs.cache;
        if !cache.enabled() || direct {
            let (a, b) = (self.align_down(off), self.align_up(end));
            self.behind.clear(a, b).await;
            let buf = read_buf((b - a) as usize).map_err(err)?;
            let buf = self.blob.read(a / self.unit, buf).await.map_err(err)?;
            let buf = ReadBuf(Some(buf));
            dst.copy_from_slice(&buf[(off - a) as usize..(end - a) as usize]);
            return Ok(());
        }
        let cb = cache.chunk_bytes() as u64;
        let first = off / cb;
        let last = (end - 1) / cb;
        let blob_end = self.blob.size_bytes();
        let mut idx = first;
        // Copies what `[off, end)` shares with `bytes`, the blob's bytes at `base`.
        let copy = |dst: &mut [u8], base: u64, bytes: &[u8]| {
            let from = off.max(base);
            let to = end.min(base + bytes.len() as u64);
            if to > from {
                dst[(from - off) as usize..(to - off) as usize]
                    .copy_from_slice(&bytes[(from - base) as usize..(to - base) as usize]);
            }
        };
        while idx <= last {
            let seen = self.gen.load(Ordering::Acquire);
            // The part of `[off, end)` in chunk `idx`.
            let (from, to) = (off.max(idx * cb), end.min((idx + 1) * cb));
            let part = &mut dst[(from - off) as usize..(to - off) as usize];
            if cache.read(self.id(), idx, (from - idx * cb) as usize, part) {
                idx += 1;
                continue;
            }
            // Read this chunk and the following missing ones in one I/O,
            // plus the readahead window when access is sequential; a random
            // read into a cache with room reads the aligned extent around
            // it instead (chunks of it already cached stay as they are).
            let window = ra.window(off, end, cb);
            let extent = if window == 0 { cache.fill_extent() } else { 1 };
            let (start, run_end) = if extent > 1 {
                // Only whole chunks the blob holds for good: none that
                // reaches into the write buffer.
                let settled = self.flushed.load(Ordering::Acquire).min(blob_end) / cb;
                let a = idx / extent * extent;
                (a, (a + extent).min(settled).max(last + 1))
            } else {
                let stop = (last + 1)
                    .max(idx + window / cb)
                    .min(blob_end.div_ceil(cb))
                    .max(idx + 1);
                let mut run_end = idx + 1;
                while run_end < stop && !cache.contains(self.id(), run_end) {
                    run_end += 1;
                }
                (idx, run_end)
            };
            let bytes = ((run_end - start) * cb).min(blob_end - start * cb);
            // After `seen` was taken: a write-behind started since then
            // either shows here or bumped the generation (then the chunks
            // read are not cached).
            self.behind.clear(start * cb, start * cb + bytes).await;
            let buf = read_buf(bytes as usize).map_err(err)?;
            let buf = self
                .blob
                .read(start * cb / self.unit, buf)
                .await
                .map_err(err)?;
            let buf = ReadBuf(Some(buf));
            for (i, piece) in buf.chunks(cb as usize).enumerate() {
                // No memory for a chunk only means it is not cached.
                if let Some(chunk) = cache.chunk(piece) {
                    cache.insert(self.id(), start + i as u64, chunk, &self.gen, seen);
                }
            }
            copy(dst, start * cb, &buf);
            idx = run_end;
        }
        Ok(())
    }
}

/// Largest read buffer a thread keeps for its next read.
const KEPT_READ_BUF: usize = 2 * MAX_READAHEAD as usize;

thread_local! {
    /// The thread's spare read buffer: reads reuse it instead of allocating
    /// (and zeroing) DMA memory each time.
    static SPARE_READ_BUF: std::cell::Cell<Option<DmaBuf>> = const { std::cell::Cell::new(None) };
}

/// A buffer of `len` bytes for a device read: the thread's spare when it is
/// big enough. Its bytes are stale; the read overwrites all of them.
fn read_buf(len: usize) -> blobstore::Result<DmaBuf> {
    if let Some(mut b) = SPARE_READ_BUF.with(|c| c.take()) {
        if b.capacity() >= len {
            b.set_len(len)?;
            return Ok(b);
        }
    }
    DmaBuf::new(len)
}

/// A read buffer that goes back to the thread's spare slot when dropped
/// (unless it is too big to keep).
struct ReadBuf(Option<DmaBuf>);

impl std::ops::Deref for ReadBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            if b.capacity() <= KEPT_READ_BUF {
                SPARE_READ_BUF.with(|c| c.set(Some(b)));
            }
        }
    }
}

/// Sequential-access detector of one handle: the readahead window doubles
/// while reads continue where the last one stopped.
#[derive(Default)]
pub(crate) struct Readahead {
    state: Mutex<(u64, u64)>,
}

impl Readahead {
    /// Bytes to read ahead for a read of `[off, end)`.
    fn window(&self, off: u64, end: u64, chunk: u64) -> u64 {
        let mut s = self.state.lock();
        let (last_end, window) = *s;
        let w = if off == last_end && off != 0 {
            (window * 2).clamp(2 * chunk, MAX_READAHEAD)
        } else {
            0
        };
        *s = (end, w);
        w
    }

    pub fn note(&self, end: u64) {
        self.state.lock().0 = end;
    }
}
