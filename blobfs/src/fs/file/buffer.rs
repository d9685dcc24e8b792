//! The append buffer's life: loaded on first use (with the partial block
//! at `buf_start`), written to the blob (whole, or only what follows its
//! clean prefix), and given back to the unsynced memory once its bytes are
//! on the blob under durable metadata. Also the wait for the file's write
//! behind the appender, which gives that write's buffer back.
//!
//! Invariants:
//! - The buffer holds file bytes from the block-aligned `buf_start`; its
//!   first `clean` bytes are on the blob as they are in the buffer, so a
//!   sync writes only what follows.
//! - A padded tail block is zeroed past the used part before it is written.
//! - Append buffers are slots of the mount's unsynced memory
//!   ([`crate::unsynced`]), and each one's header describes the file bytes
//!   it holds once an append returns; a buffer is given back only when its
//!   bytes are on the blob under durable metadata, or no longer the file's.
//! - A failed write of the buffer loses the bytes only it held: the file is
//!   marked failed, and every later write or sync reports it until a
//!   truncate.
//! - Bytes written to the blob go to the cache in place of what it held
//!   (write-through), with the write lock held.

use std::sync::atomic::Ordering;

use blobstore::metrics::Stamp;
use blobstore::DmaBuf;

use super::{FileNode, WriteState, WRITE_CHUNK};
use crate::error::{Context, Error, Result};
use crate::fs::FsInner;

impl FileNode {
    /// Loads the buffer (and the partial block at `buf_start`) on first use.
    pub(super) async fn buffer<'a>(
        &self,
        st: &'a mut WriteState,
        fs: &FsInner,
    ) -> Result<&'a mut DmaBuf> {
        if st.buf.is_none() {
            let mut b = fs.append_buf(WRITE_CHUNK + 2 * self.unit as usize)?;
            if st.used > 0 {
                let unit = DmaBuf::new(self.unit as usize).ctx(&self.name())?;
                let unit = self
                    .blob
                    .read(st.buf_start / self.unit, unit)
                    .await
                    .ctx(&self.name())?;
                b[..st.used].copy_from_slice(&unit[..st.used]);
            }
            st.buf = Some(b);
            st.clean = 0;
        }
        Ok(st.buf.as_mut().expect("just set"))
    }

    /// Puts `[0, n)` of the buffer (n block-aligned) on the blob at
    /// `buf_start`, writing only what follows its clean prefix.
    pub(super) async fn write_buffer(
        &self,
        st: &mut WriteState,
        n: usize,
        fs: &FsInner,
    ) -> Result<()> {
        debug_assert!((n as u64).is_multiple_of(self.unit));
        debug_assert!((st.clean as u64).is_multiple_of(self.unit));
        let skip = st.clean.min(n);
        if skip == n {
            return Ok(());
        }
        if n > st.used {
            // The padded tail block: zeroes past the file's bytes.
            let used = st.used;
            st.buf.as_mut().expect("buffer loaded")[used..n].fill(0);
        }
        self.ensure_capacity(st.buf_start + n as u64).await?;
        if skip > 0 {
            self.write_buffer_part(st, skip, n).await?;
        } else {
            self.write_buffer_whole(st, n).await?;
        }
        st.clean = n.min(self.align_down(st.used as u64) as usize);
        st.data_dirty = true;
        let (from, to) = (st.buf_start + skip as u64, st.buf_start + n as u64);
        let buf = st.buf.as_ref().expect("buffer restored");
        self.cache_written(fs, from, to, buf, st.buf_start);
        Ok(())
    }

    /// Tells the cache that file bytes `[from, to)` now are `buf`'s (which
    /// holds file bytes from `base`). Write-through: whole cache chunks the
    /// range covers go to the cache in place of what it held, so reading
    /// back what was just written costs no I/O; only the partly written
    /// chunks at the edges are dropped. Call with the write lock held.
    pub(super) fn cache_written(&self, fs: &FsInner, from: u64, to: u64, buf: &[u8], base: u64) {
        let cb = fs.cache.chunk_bytes() as u64;
        let (full_from, full_to) = (from.div_ceil(cb) * cb, to / cb * cb);
        if !fs.cache.enabled() || full_from >= full_to {
            fs.invalidate(self, from, to);
            return;
        }
        fs.invalidate(self, from, full_from);
        fs.invalidate(self, full_to, to);
        for idx in full_from / cb..full_to / cb {
            let s = (idx * cb - base) as usize;
            match fs.cache.chunk(&buf[s..s + cb as usize]) {
                Some(chunk) => fs.cache.put(self.id(), idx, chunk),
                None => fs.invalidate(self, idx * cb, (idx + 1) * cb),
            }
        }
    }

    /// Waits for this file's write-behind, if one is in flight; returns its
    /// buffer for reuse, or marks the file failed (the bytes are lost) and
    /// reports it.
    pub(super) async fn settle(&self, st: &mut WriteState, fs: &FsInner) -> Result<Option<DmaBuf>> {
        let start = Stamp::now();
        let (waited, outcome) = self.behind.idle_timed().await;
        if waited {
            fs.metrics.with(|m| m.stall.record(start, 0, true));
        }
        match outcome {
            Some(Ok(buf)) => Ok(Some(buf)),
            Some(Err(reason)) => {
                st.failed = Some(reason);
                self.check_failed(st).map(|_| None)
            }
            None => Ok(None),
        }
    }

    /// [`FileNode::settle`], giving the written buffer back (its slot of
    /// unsynced memory, pages kept, serves the next buffer).
    pub(super) async fn settle_into(&self, st: &mut WriteState, fs: &FsInner) -> Result<()> {
        if let Some(buf) = self.settle(st, fs).await? {
            fs.give_back_buf(buf);
        }
        Ok(())
    }

    /// After a sync by the file's last writer: gives its append buffer back
    /// (see [`FileNode::settle_into`]), leaving the state a mount leaves (the
    /// partial last block on the blob, loaded again by the next append).
    /// Does nothing unless every byte is on the blob and synced.
    pub async fn release_buffer(&self, fs: &FsInner) {
        let mut st = self.state.lock().await;
        let synced = st.failed.is_none()
            && !st.md_dirty
            && !st.data_dirty
            && self.len.load(Ordering::Acquire) == st.synced_len
            && st.buf_start + st.used as u64 == st.synced_len;
        if synced && self.behind.is_quiet() {
            if let Some(buf) = st.buf.take() {
                fs.give_back_buf(buf);
                // As a mount leaves it: the buffer starts at the last block.
                st.buf_start = self.align_down(st.synced_len);
                st.used = (st.synced_len - st.buf_start) as usize;
                st.clean = 0;
                self.flushed.store(st.buf_start, Ordering::Release);
            }
        }
    }

    /// Writes `[from, to)` of the buffer through the scratch buffer; the
    /// buffer itself stays, so a failure loses nothing.
    async fn write_buffer_part(&self, st: &mut WriteState, from: usize, to: usize) -> Result<()> {
        let len = to - from;
        let mut scratch = match st.scratch.take() {
            Some(b) if b.capacity() >= len => b,
            _ => DmaBuf::new(len).ctx(&self.name())?,
        };
        scratch.set_len(len).ctx(&self.name())?;
        let buf = st.buf.as_ref().expect("buffer loaded");
        scratch.copy_from_slice(&buf[from..to]);
        let at = (st.buf_start + from as u64) / self.unit;
        let scratch = self.blob.write(at, scratch).await.ctx(&self.name())?;
        st.scratch = Some(scratch);
        Ok(())
    }

    /// Writes `[0, n)` of the buffer, lending the buffer itself to the I/O.
    async fn write_buffer_whole(&self, st: &mut WriteState, n: usize) -> Result<()> {
        let mut buf = st.buf.take().expect("buffer loaded");
        let cap = buf.len();
        buf.set_len(n).ctx(&self.name())?;
        let res = self.blob.write(st.buf_start / self.unit, buf).await;
        let mut buf = match res {
            Ok(b) => b,
            Err(e) => {
                // The buffer went with the failed write, and with it bytes
                // held nowhere else: every later write or sync reports the
                // loss (as fsync does on Linux) until the file is truncated.
                st.buf = None;
                st.clean = 0;
                st.failed = Some(e.to_string());
                return Err(Error::store(&self.name(), e));
            }
        };
        buf.set_len(cap).ctx(&self.name())?;
        st.buf = Some(buf);
        Ok(())
    }
}
