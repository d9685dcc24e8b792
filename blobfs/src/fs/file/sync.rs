//! What makes a file durable: [`FileNode::sync`] (data and length, under
//! one device flush where it can), [`FileNode::set_mtime`], and
//! [`FileNode::truncate`], which is durable when it returns.
//!
//! Invariants:
//! - After `sync` returns, the blob holds every byte below `len` and its
//!   metadata holds `len`, both durable.
//! - A sync sets the length before it writes the data, which goes down
//!   inside the metadata sync: under one flush with a checksum of the new
//!   bytes (`fs.tail`, checked at mount) when it adds at most
//!   `meta::TAIL_MAX` bytes, all still in the buffer; else after a flush
//!   that makes the data durable before the length. A rename that syncs
//!   the file's metadata holds its write lock meanwhile, so that sync never
//!   makes such a length durable before its data (see [`crate::fs`]).
//! - A shrink is durable before the bytes past the new end in its last
//!   block become zeroes: every byte of the blob past the length reads as
//!   zero, so no later growth can show them.

use std::sync::atomic::Ordering;

use blobstore::DmaBuf;

use super::{FileNode, WriteState};
use crate::error::{Context, Error, Result};
use crate::fs::FsInner;
use crate::meta;

impl FileNode {
    /// Sets the modification time (as `touch -d`) and makes it durable,
    /// with everything written before. A later write sets it to its own time.
    pub async fn set_mtime(&self, fs: &FsInner, mtime_ns: u64) -> Result<()> {
        let mut st = self.state.lock().await;
        self.mtime.store(mtime_ns, Ordering::Release);
        st.md_dirty = true;
        self.sync_locked(&mut st, fs).await
    }

    /// Waits for the file's write-behind and reports whether any write of
    /// its bytes failed (a sync on a volatile device: nothing to write).
    pub async fn settled(&self, fs: &FsInner) -> Result<()> {
        let mut st = self.state.lock().await;
        self.settle_into(&mut st, fs).await?;
        self.check_failed(&st)
    }

    /// Makes data and length durable.
    pub async fn sync(&self, fs: &FsInner) -> Result<()> {
        let mut st = self.state.lock().await;
        self.sync_locked(&mut st, fs).await
    }

    /// [`FileNode::sync`] with the write lock held.
    pub(super) async fn sync_locked(&self, st: &mut WriteState, fs: &FsInner) -> Result<()> {
        let name = self.name();
        self.settle_into(st, fs).await?;
        self.check_failed(st)?;
        // The buffer's bytes not on the blob yet, padded to a block.
        let pending =
            (st.used > 0 && st.buf.is_some()).then(|| self.align_up(st.used as u64) as usize);
        let len = self.len.load(Ordering::Acquire);
        if st.md_dirty || len != st.synced_len || self.blob.is_dirty() {
            if let Some(padded) = pending {
                // The data write below runs inside the metadata sync, which
                // has captured the metadata: it must not grow the blob.
                self.ensure_capacity(st.buf_start + padded as u64).await?;
            }
            self.blob
                .set_xattr(meta::LEN, &meta::enc_u64(len))
                .ctx(&name)?;
            self.blob
                .set_xattr(
                    meta::MTIME,
                    &meta::enc_u64(self.mtime.load(Ordering::Acquire)),
                )
                .ctx(&name)?;
            let tail = self.tail_check(st, len);
            match tail {
                // A small append: data and length go down with one flush,
                // the length with a checksum of the new bytes for mount.
                Some(tail) => self.blob.set_xattr(meta::TAIL, &tail).ctx(&name)?,
                // Otherwise the metadata sync flushes the device before it
                // writes the blob's first page, so the data is durable
                // before the length.
                None => self.drop_tail_check()?,
            }
            // The data is written alongside the metadata, under one flush.
            let data = pending.map(|padded| self.write_buffer(st, padded, fs));
            self.blob
                .sync_metadata_with(tail.is_none(), data)
                .await?
                .ctx(&name)?;
            st.synced_len = len;
            st.md_dirty = false;
            st.data_dirty = false;
        } else {
            if let Some(padded) = pending {
                self.write_buffer(st, padded, fs).await?;
            }
            if st.data_dirty {
                fs.flush_device()
                    .await
                    .map_err(|e| Error::store(&name, e))?;
                st.data_dirty = false;
            }
        }
        Ok(())
    }

    /// The [`meta::TAIL`] value for a sync to `len`: only when the sync
    /// adds at most [`meta::TAIL_MAX`] bytes, all still in the buffer.
    fn tail_check(&self, st: &WriteState, len: u64) -> Option<[u8; 12]> {
        let prev = st.synced_len;
        if len <= prev || len - prev > meta::TAIL_MAX || prev < st.buf_start || st.failed.is_some()
        {
            return None;
        }
        let buf = st.buf.as_ref()?;
        let (a, b) = (
            (prev - st.buf_start) as usize,
            (len - st.buf_start) as usize,
        );
        let bytes = buf.get(a..b)?;
        Some(meta::enc_tail(prev, crc32c::crc32c(bytes)))
    }

    /// Removes a [`meta::TAIL`] check that no longer describes the last
    /// sync (call before a metadata sync that does not write one).
    fn drop_tail_check(&self) -> Result<()> {
        if self.blob.get_xattr(meta::TAIL).is_some() {
            self.blob.remove_xattr(meta::TAIL).ctx(&self.name())?;
        }
        Ok(())
    }

    /// Zeroes the bytes of the blob's block holding `at` from `at` on;
    /// returns whether it wrote (false when `at` is block-aligned).
    async fn zero_past(&self, at: u64, name: &str) -> Result<bool> {
        let a = self.align_down(at);
        if at == a {
            return Ok(false);
        }
        let mut blk = DmaBuf::new(self.unit as usize).ctx(name)?;
        blk = self.blob.read(a / self.unit, blk).await.ctx(name)?;
        blk[(at - a) as usize..].fill(0);
        self.blob.write(a / self.unit, blk).await.ctx(name)?;
        Ok(true)
    }

    /// Sets the length; new bytes read as zeroes.
    pub async fn truncate(&self, fs: &FsInner, new_len: u64) -> Result<()> {
        let mut st = self.state.lock().await;
        let st = &mut *st;
        let name = self.name();
        // A failed write-behind marks the file failed; the truncate below
        // clears that, as it does for a failed write here.
        let _ = self.settle_into(st, fs).await;
        // Everything durable first, so the blob alone is the truth and the
        // buffer (with its unsynced memory) can go before the length moves.
        if st.failed.is_none() {
            self.sync_locked(st, fs).await?;
        }
        if let Some(buf) = st.buf.take() {
            fs.give_back_buf(buf);
        }
        let len = self.len.load(Ordering::Acquire);
        let old_size = self.blob.size_bytes();
        if new_len > len {
            self.ensure_capacity(self.align_up(new_len)).await?;
        }
        if new_len < len {
            // A shrink is durable when it returns: later writes may reuse
            // the bytes past the new end (the tail block, freed clusters),
            // so the on-disk length must not still cover them.
            self.blob
                .resize(new_len.div_ceil(self.cluster))
                .await
                .ctx(&name)?;
            self.blob
                .set_xattr(meta::LEN, &meta::enc_u64(new_len))
                .ctx(&name)?;
            self.drop_tail_check()?;
            self.blob.sync_metadata().await.ctx(&name)?;
            st.synced_len = new_len;
            // Then the bytes past the new end in its last block become
            // zeroes (past the durable length, so a crash meanwhile shows
            // nothing): every byte of the blob past the length reads as
            // zero (fsck checks it), so no later growth can show them.
            if self.zero_past(new_len, &name).await? {
                st.data_dirty = true;
            }
        } else if new_len > len {
            // Bytes past the old end were never written: write zeroes.
            self.zero_past(len, &name).await?;
            let (from, to) = (self.align_up(len), self.align_up(new_len));
            if to > from {
                self.blob
                    .write_zeroes(from / self.unit, (to - from) / self.unit)
                    .await
                    .ctx(&name)?;
            }
            st.data_dirty = true;
        }
        self.gen.fetch_add(1, Ordering::AcqRel);
        fs.invalidate(
            self,
            self.align_down(new_len.min(len)),
            old_size.max(self.blob.size_bytes()),
        );
        self.len.store(new_len, Ordering::Release);
        st.buf_start = self.align_down(new_len);
        st.used = (new_len - st.buf_start) as usize;
        st.clean = 0;
        self.flushed.store(st.buf_start, Ordering::Release);
        self.mtime.store(meta::now_ns(), Ordering::Release);
        st.md_dirty = true;
        st.failed = None;
        // Durable when it returns: no unsynced memory describes the new
        // length, so a killed process must not lose it.
        self.sync_locked(st, fs).await
    }
}
