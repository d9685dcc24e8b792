//! Writes: appends and positional writes ([`FileNode::write_at`]) land in
//! the append buffer; a full buffer spills to the blob behind the appender.
//!
//! Invariants:
//! - Appends copy the caller's bytes once, into DMA memory, and reach the
//!   device in block-aligned chunks of `WRITE_CHUNK` bytes.
//! - Write-behind: a full append buffer goes to the file system's writer
//!   thread while appends go on into a second buffer (as the page cache
//!   writes back behind a writer); at most one such write per file is in
//!   flight, and its range is in `behind` (see `behind.rs`). Its failure is
//!   reported by the next write or sync (the bytes are lost). Why a thread
//!   of its own: the file system's `writer.rs`.
//! - Every byte below `len` is in an append buffer or on the blob under
//!   durable metadata: a write behind the appender keeps its slot's header
//!   until its bytes and their clusters are durable (`land_behind`); a
//!   spill and a write below the buffer make the blob's state durable
//!   before a buffer lets bytes go. So a killed process loses nothing an
//!   append returned for.
//! - A write below the buffer goes through the blob and is durable when it
//!   returns.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use blobstore::metrics::{Shards, Stamp};
use blobstore::DmaBuf;

use super::{FileNode, WriteState, WRITE_CHUNK};
use crate::error::{Context, Error, Result};
use crate::fs::FsInner;
use crate::meta;
use crate::metrics::FsShard;
use crate::unsynced::Unsynced;

impl FileNode {
    /// Writes out every full block of the buffer and goes on with the rest:
    /// behind the writer (on the file system's writer thread) when the
    /// buffer holds nothing already on the blob, else here.
    async fn spill(self: &Arc<Self>, st: &mut WriteState, fs: &FsInner) -> Result<()> {
        let full = st.used / self.unit as usize * self.unit as usize;
        if full == 0 {
            return Ok(());
        }
        let cap = WRITE_CHUNK + 2 * self.unit as usize;
        if st.clean > 0 {
            self.write_buffer(st, full, fs).await?;
            // Those bytes leave the buffer (and its unsynced memory): the
            // clusters under them must be durable first.
            self.persist_clusters().await?;
            let mut next = fs.append_buf(cap)?;
            let tail = st.used - full;
            let old = st.buf.take().expect("buffer loaded");
            next[..tail].copy_from_slice(&old[full..st.used]);
            st.used = tail;
            st.clean = 0;
            st.buf_start += full as u64;
            fs.unsynced.describe(
                &next,
                self.blob.id().0,
                st.buf_start,
                tail,
                self.len.load(Ordering::Acquire),
            );
            st.buf = Some(next);
            fs.give_back_buf(old);
            self.flushed.store(st.buf_start, Ordering::Release);
            return Ok(());
        }
        let spare = self.settle(st, fs).await?;
        let (from, to) = (st.buf_start, st.buf_start + full as u64);
        self.ensure_capacity(to).await?;
        let mut next = match spare {
            Some(b) if b.capacity() >= cap => b,
            other => {
                if let Some(b) = other {
                    fs.give_back_buf(b);
                }
                fs.append_buf(cap)?
            }
        };
        next.set_len(cap).ctx(&self.name())?;
        let mut buf = st.buf.take().expect("buffer loaded");
        let tail = st.used - full;
        next[..tail].copy_from_slice(&buf[full..st.used]);
        buf.set_len(full).ctx(&self.name())?;
        // The bytes stay in unsynced memory until they are on the blob
        // under durable metadata (`land_behind`).
        let len = self.len.load(Ordering::Acquire);
        fs.unsynced
            .describe(&buf, self.blob.id().0, from, full, len);
        fs.unsynced.describe(&next, self.blob.id().0, to, tail, len);
        // Readers keep off the blob's copy of the range until it is there;
        // the cache has the new bytes at once.
        self.behind.start(from, to);
        self.cache_written(fs, from, to, &buf, from);
        st.buf = Some(next);
        st.used = tail;
        st.clean = 0;
        st.buf_start = to;
        st.data_dirty = true;
        self.flushed.store(to, Ordering::Release);
        let lba = from / self.unit;
        if let Err(buf) = fs.write_behind(self.clone(), lba, buf) {
            // No writer thread: write it here.
            let outcome = self.land_behind(&fs.unsynced, &fs.metrics, lba, buf).await;
            self.behind.finish(outcome);
        }
        Ok(())
    }

    /// A write behind the appender: puts `buf` on the blob at `lba`, makes
    /// the clusters under it durable, and only then lets its unsynced
    /// memory go (its bytes are safe from a killed process from there).
    pub async fn land_behind(
        &self,
        unsynced: &Unsynced,
        metrics: &Shards<FsShard>,
        lba: u64,
        buf: DmaBuf,
    ) -> std::result::Result<DmaBuf, String> {
        let start = Stamp::now();
        let bytes = buf.len() as u64;
        let res = async {
            let buf = self.blob.write(lba, buf).await.map_err(|e| e.to_string())?;
            self.persist_clusters().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(buf)
        }
        .await;
        metrics.with(|m| m.behind.record(start, bytes, res.is_ok()));
        let buf = res?;
        unsynced.retire(&buf);
        Ok(buf)
    }

    /// Writes `data` at `off` (at most `len`: no holes through this path).
    pub async fn write_at(self: &Arc<Self>, fs: &FsInner, off: u64, data: &[u8]) -> Result<()> {
        let mut st = self.state.lock().await;
        let st = &mut *st;
        self.check_failed(st)?;
        let len = self.len.load(Ordering::Acquire);
        if off > len {
            return Err(Error::InvalidArgument(format!(
                "{}: write at {off} is past the end ({len})",
                self.name()
            )));
        }
        let end = off + data.len() as u64;
        // Reserve space first, so running out changes nothing.
        self.ensure_capacity(self.align_up(end)).await?;
        if off < st.buf_start {
            // Below the buffer: make everything durable first, so that the
            // buffer (and its unsynced memory) can go, rewrite on the blob,
            // and make that durable too before returning.
            self.sync_locked(st, fs).await?;
            if let Some(buf) = st.buf.take() {
                fs.give_back_buf(buf);
            }
            self.write_through(st, fs, off, data).await?;
            self.len.fetch_max(end, Ordering::AcqRel);
            self.mtime.store(meta::now_ns(), Ordering::Release);
            st.md_dirty = true;
            return self.sync_locked(st, fs).await;
        } else {
            let mut pos = 0;
            while pos < data.len() {
                let at = (off + pos as u64 - st.buf_start) as usize;
                st.clean = st.clean.min(self.align_down(at as u64) as usize);
                let buf = self.buffer(st, fs).await?;
                let room = WRITE_CHUNK + self.unit as usize - at;
                let n = room.min(data.len() - pos);
                buf[at..at + n].copy_from_slice(&data[pos..pos + n]);
                st.used = st.used.max(at + n);
                pos += n;
                self.len
                    .fetch_max(st.buf_start + st.used as u64, Ordering::AcqRel);
                if st.used >= WRITE_CHUNK {
                    self.spill(st, fs).await?;
                }
            }
        }
        let len = self.len.fetch_max(end, Ordering::AcqRel).max(end);
        self.mtime.store(meta::now_ns(), Ordering::Release);
        st.md_dirty = true;
        if let Some(buf) = &st.buf {
            // The bytes are in the buffer: now say so in its header.
            fs.unsynced
                .describe(buf, self.blob.id().0, st.buf_start, st.used, len);
        }
        Ok(())
    }

    /// A write that reaches below the buffer, whose bytes are all on the
    /// blob (synced, the buffer gone): read-modify-write whole blocks on
    /// the blob, then restart the buffer at the end.
    async fn write_through(
        &self,
        st: &mut WriteState,
        fs: &FsInner,
        off: u64,
        data: &[u8],
    ) -> Result<()> {
        debug_assert!(st.buf.is_none());
        let name = self.name();
        let end = off + data.len() as u64;
        let (a, b) = (self.align_down(off), self.align_up(end));
        let mut tmp = DmaBuf::new((b - a) as usize).ctx(&name)?;
        tmp = self.blob.read(a / self.unit, tmp).await.ctx(&name)?;
        tmp[(off - a) as usize..(end - a) as usize].copy_from_slice(data);
        self.blob.write(a / self.unit, tmp).await.ctx(&name)?;
        st.data_dirty = true;
        fs.invalidate(self, a, b);
        // Restart the buffer at the (possibly new) end.
        let len = self.len.load(Ordering::Acquire).max(end);
        st.buf_start = self.align_down(len);
        st.used = (len - st.buf_start) as usize;
        st.clean = 0;
        self.flushed.store(st.buf_start, Ordering::Release);
        Ok(())
    }
}
