//! Blob handles and blob I/O: the data path. It builds on the store
//! (`crate::store`); the store does not depend on it. A handle's metadata
//! operations (resize, sync, inflate) run in a metadata transaction of the
//! store; reads and writes of clusters the blob owns take none.
//!
//! Invariants:
//! - Every I/O is checked against the blob's size before any device
//!   operation is issued: past the end is an error, never a wrap.
//! - The data path holds the blob's metadata lock only to translate blob
//!   offsets into device blocks, never across an await.
//! - A read of a cluster the blob has not allocated returns zeroes without
//!   touching the device.
//! - A write to an unallocated cluster of a thin blob allocates it in a
//!   metadata transaction, zeroes what the write does not cover, writes the
//!   data, and makes the new mapping durable before it completes.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::try_join_all;

use crate::device::{DmaBuf, IoChannel, IoFuture, IoKind, IoOp, Lba, Segment, Segments};
use crate::error::{Error, Result};
use crate::format;
use crate::store::snapshot::ancestor_cluster;
use crate::store::state::{check_xattr, BlobInner, BlobMd, StoreInner};
use crate::store::units::ClusterIdx;
use crate::store::{Blobstore, NO_DATA};
use crate::BlobId;

/// An open blob. Dropping the handle closes it without syncing; call
/// [`Blob::close`] to sync changed metadata first.
pub struct Blob {
    pub(crate) store: Arc<StoreInner>,
    pub(crate) inner: Arc<BlobInner>,
}

/// A contiguous piece of a blob range: device block (None = unallocated),
/// length in units, offset into the caller's buffers in units.
#[derive(Debug, Clone, Copy)]
struct Run {
    lba: Option<Lba>,
    units: u64,
    buf_unit: u64,
}

impl Drop for Blob {
    fn drop(&mut self) {
        self.inner.handles.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The pieces `(buffer index, start, length)` of bytes `[off, off+len)` of
/// `bufs` taken as one buffer.
fn pieces(bufs: &[DmaBuf], off: usize, len: usize) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    let (mut skip, mut left) = (off, len);
    for (i, b) in bufs.iter().enumerate() {
        if left == 0 {
            break;
        }
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let n = (b.len() - skip).min(left);
        out.push((i, skip, n));
        left -= n;
        skip = 0;
    }
    out
}

/// Segments covering bytes `[off, off+len)` of `bufs` taken as one buffer.
fn segments(bufs: &[DmaBuf], off: usize, len: usize) -> Segments {
    if let [b] = bufs {
        return Segments::one(b.segment(off, len));
    }
    pieces(bufs, off, len)
        .into_iter()
        .map(|(i, start, n)| bufs[i].segment(start, n))
        .collect()
}

/// Zeroes bytes `[off, off+len)` of `bufs` taken as one buffer.
fn zero_range(bufs: &mut [DmaBuf], off: usize, len: usize) {
    for (i, start, n) in pieces(bufs, off, len) {
        bufs[i][start..start + n].fill(0);
    }
}

impl Blobstore {
    /// Opens a blob. Handles of one blob share its state; the blob stays
    /// open until every handle is closed or dropped.
    pub async fn open_blob(&self, id: BlobId) -> Result<Blob> {
        let inner = &self.inner;
        inner.page_of(id)?;
        if let Some(b) = inner.open_cached(id) {
            return Ok(Blob::new(inner.clone(), b));
        }
        let txn = inner.begin().await?;
        if let Some(b) = inner.open_cached(id) {
            return Ok(Blob::new(inner.clone(), b));
        }
        let b = txn.load_blob(id).await?;
        b.handles.fetch_add(1, Ordering::AcqRel);
        Ok(Blob::new(inner.clone(), b))
    }
}

impl Blob {
    fn new(store: Arc<StoreInner>, inner: Arc<BlobInner>) -> Blob {
        Blob { store, inner }
    }

    /// The blob's id.
    pub fn id(&self) -> BlobId {
        self.inner.id
    }

    /// Size in clusters.
    pub fn num_clusters(&self) -> u64 {
        self.inner.md.read().num_clusters
    }

    /// Size in metadata-page-sized pages.
    pub fn num_pages(&self) -> u64 {
        self.num_clusters() * self.store.layout().pages_per_cluster()
    }

    /// Size in I/O units (device blocks).
    pub fn num_io_units(&self) -> u64 {
        self.num_clusters() * self.store.layout().units_per_cluster()
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.num_clusters() * self.store.layout().cluster_size as u64
    }

    /// Bytes per I/O unit.
    pub fn io_unit_size(&self) -> u32 {
        self.store.layout().io_unit
    }

    /// Clusters actually allocated (less than the size for thin blobs).
    pub fn allocated_clusters(&self) -> u64 {
        self.inner
            .md
            .read()
            .clusters
            .iter()
            .filter(|c| c.is_some())
            .count() as u64
    }

    /// True for a thin-provisioned blob.
    pub fn is_thin(&self) -> bool {
        self.inner.md.read().thin()
    }

    /// True once [`Blob::set_read_only`] was called (or the store says so).
    pub fn is_read_only(&self) -> bool {
        self.inner.md.read().read_only()
    }

    /// True when in-memory metadata differs from what is on disk.
    pub fn is_dirty(&self) -> bool {
        self.inner.md.read().is_dirty()
    }

    /// Makes the blob read-only (data and metadata); durable at the next sync.
    pub fn set_read_only(&self) {
        let mut md = self.inner.md.write();
        md.data_ro_flags |= format::BLOB_READ_ONLY;
        md.md_ro_flags |= format::BLOB_READ_ONLY;
        md.touch();
    }

    /// Sets an xattr in memory; durable at the next sync.
    pub fn set_xattr(&self, name: &str, value: &[u8]) -> Result<()> {
        check_xattr(name, value)?;
        let mut md = self.inner.md.write();
        if md.read_only() {
            return Err(Error::ReadOnly(self.id()));
        }
        // In place when set already (a length or time updated at every
        // sync): no allocation.
        match md.xattrs.get_mut(name) {
            Some(v) => {
                v.clear();
                v.extend_from_slice(value);
            }
            None => {
                md.xattrs.insert(name.to_string(), value.to_vec());
            }
        }
        md.touch();
        Ok(())
    }

    /// The value of an xattr, if set.
    pub fn get_xattr(&self, name: &str) -> Option<Vec<u8>> {
        self.inner.md.read().xattrs.get(name).cloned()
    }

    /// Removes an xattr; [`Error::InvalidArgument`] if it is not set.
    pub fn remove_xattr(&self, name: &str) -> Result<()> {
        let mut md = self.inner.md.write();
        if md.read_only() {
            return Err(Error::ReadOnly(self.id()));
        }
        if md.xattrs.remove(name).is_none() {
            return Err(Error::InvalidArgument(format!(
                "blob {}: no xattr {name:?}",
                self.id()
            )));
        }
        md.touch();
        Ok(())
    }

    /// Names of all xattrs, sorted.
    pub fn xattr_names(&self) -> Vec<String> {
        self.inner.md.read().xattrs.keys().cloned().collect()
    }

    /// The xattrs, borrowed instead of copied (for reading many blobs'
    /// xattrs, as a mount does). Changes to this blob's metadata wait while
    /// the view lives: drop it soon.
    pub fn xattrs(&self) -> Xattrs<'_> {
        Xattrs {
            md: self.inner.md.read(),
        }
    }

    /// Sets the size in clusters. Growing a thick blob allocates (and zeroes)
    /// clusters now; shrinking frees them at the next sync. Do not shrink
    /// below a range that has I/O in flight.
    pub async fn resize(&self, num_clusters: u64) -> Result<()> {
        let txn = self.store.begin().await?;
        txn.resize(&self.inner, num_clusters, true).await
    }

    /// Like [`Blob::resize`], but clusters added to a thick blob are not
    /// zeroed: they may hold bytes a deleted blob left behind. Only for a
    /// caller that never reads a byte of the new clusters before writing it
    /// (BlobFS clamps reads to a file length that only written bytes reach),
    /// and that saves a full write of every new cluster.
    pub async fn resize_uninit(&self, num_clusters: u64) -> Result<()> {
        let txn = self.store.begin().await?;
        txn.resize(&self.inner, num_clusters, false).await
    }

    /// Makes the blob's metadata (size, xattrs, flags, cluster map) durable.
    pub async fn sync_metadata(&self) -> Result<()> {
        let txn = self.store.begin().await?;
        txn.sync_blob(&self.inner).await
    }

    /// [`Blob::sync_metadata`] with one device flush instead of two where
    /// the metadata needs no fresh page (only the first page changes, e.g.
    /// xattrs of the same sizes, no new clusters): the first page is
    /// written without the barrier before it, so after a power cut it may
    /// be durable while data this blob wrote before the call is not. For a
    /// caller that can tell after a crash whether that data made it (BlobFS
    /// keeps a checksum of a sync's new bytes next to the length). When a
    /// fresh page is needed, or the sync frees clusters or pages, this is
    /// exactly [`Blob::sync_metadata`]. Durable when it returns, as that.
    pub async fn sync_metadata_unordered(&self) -> Result<()> {
        match self.sync_metadata_with(false, NO_DATA).await {
            Ok(res) => res,
            Err(never) => match never {},
        }
    }

    /// [`Blob::sync_metadata`] (`ordered`) or
    /// [`Blob::sync_metadata_unordered`] (not), running the caller's data
    /// write `data` alongside the metadata writes, so that one device flush
    /// makes both durable and the data costs no round trip of its own.
    /// With `ordered` (or whenever the unordered sync falls back to the
    /// ordered one) the data is still durable before the first page is
    /// written. The future must not change this blob's metadata (resize,
    /// xattrs): the metadata was captured before it runs. Nor may it write
    /// clusters a thin blob has not allocated yet: that allocation takes the
    /// metadata lock this sync holds, and would wait for it forever.
    ///
    /// The outer `Err` is the data's error: the metadata may then be
    /// written or not (without `ordered`, the first page may be on the
    /// device), but the sync did not complete. The inner result is the
    /// metadata sync's. With clean metadata the data runs alone, then the
    /// device is flushed.
    pub async fn sync_metadata_with<E>(
        &self,
        ordered: bool,
        data: Option<impl std::future::Future<Output = std::result::Result<(), E>>>,
    ) -> std::result::Result<Result<()>, E> {
        let txn = match self.store.begin().await {
            Ok(txn) => txn,
            Err(e) => return Ok(Err(e)),
        };
        txn.sync_blob_with(&self.inner, ordered, data).await
    }

    /// The snapshot this blob reads unallocated clusters from, if any.
    pub fn parent(&self) -> Option<BlobId> {
        self.inner.md.read().parent
    }

    /// True for a blob with a parent (a clone, or a snapshotted blob).
    pub fn is_clone(&self) -> bool {
        self.parent().is_some()
    }

    /// Open handles of this blob (for diagnostics).
    pub fn open_handles(&self) -> usize {
        self.inner.handles.load(Ordering::Acquire)
    }

    /// Gives the blob every cluster it does not own, filled with what it
    /// reads there now (its ancestors' data or zeroes), and drops its
    /// parent: the blob becomes thick and independent. Durable on return.
    pub async fn inflate(&self) -> Result<()> {
        let txn = self.store.begin().await?;
        txn.inflate(&self.inner).await
    }

    /// Copies the clusters the blob's parent owns (and the blob does not)
    /// into the blob and makes the parent's parent its parent, so the blob
    /// no longer depends on its parent. Durable on return.
    pub async fn decouple_parent(&self) -> Result<()> {
        let txn = self.store.begin().await?;
        txn.decouple_parent(&self.inner).await
    }

    /// Syncs changed metadata, then closes the handle.
    pub async fn close(self) -> Result<()> {
        if self.is_dirty() {
            self.sync_metadata().await?;
        }
        Ok(())
    }

    fn check_range(&self, md_clusters: u64, offset: u64, units: u64) -> Result<()> {
        let size = md_clusters * self.store.layout().units_per_cluster();
        if units == 0 || offset.checked_add(units).is_none_or(|e| e > size) {
            return Err(Error::OutOfRange {
                what: format!("blob {} (in io units)", self.id()),
                offset,
                len: units,
                size,
            });
        }
        Ok(())
    }

    /// `units_of` for one buffer.
    #[inline]
    fn units_of_one(&self, buf: &DmaBuf) -> Result<u64> {
        let unit = self.store.layout().io_unit as usize;
        if buf.is_empty() || !buf.len().is_multiple_of(unit) {
            return self.units_of(std::slice::from_ref(buf));
        }
        Ok((buf.len() / unit) as u64)
    }

    fn units_of(&self, bufs: &[DmaBuf]) -> Result<u64> {
        let bytes: usize = bufs.iter().map(|b| b.len()).sum();
        let unit = self.store.layout().io_unit as usize;
        if bytes == 0 || !bytes.is_multiple_of(unit) || bufs.iter().any(|b| b.len() % unit != 0) {
            return Err(Error::InvalidArgument(format!(
                "buffers of {bytes} bytes: each must be a positive multiple of the io unit {unit}"
            )));
        }
        Ok((bytes / unit) as u64)
    }

    /// Translates a checked range into runs; also returns the indices of
    /// clusters the blob does not own. With `through_parents`, clusters the
    /// blob does not own map to the nearest ancestor's (for reads).
    fn map(
        &self,
        offset: u64,
        units: u64,
        through_parents: bool,
    ) -> Result<(Vec<Run>, Vec<usize>)> {
        let parent = if through_parents {
            self.inner.parent.read().clone()
        } else {
            None
        };
        let md = self.inner.md.read();
        self.check_range(md.num_clusters, offset, units)?;
        let upc = self.store.layout().units_per_cluster();
        let mut runs: Vec<Run> = Vec::new();
        let mut missing = Vec::new();
        let mut pos = offset;
        while pos < offset + units {
            let idx = (pos / upc) as usize;
            let within = pos % upc;
            let n = (upc - within).min(offset + units - pos);
            let own = md.clusters[idx];
            if own.is_none() {
                missing.push(idx);
            }
            let c = match own {
                None if parent.is_some() => ancestor_cluster(parent.clone(), idx),
                c => c,
            };
            let lba = c.map(|c| self.store.layout().cluster_lba(c).plus(within));
            let buf_unit = pos - offset;
            match runs.last_mut() {
                Some(r)
                    if match (r.lba, lba) {
                        (Some(a), Some(b)) => a.plus(r.units) == b,
                        (None, None) => true,
                        _ => false,
                    } =>
                {
                    r.units += n
                }
                _ => runs.push(Run {
                    lba,
                    units: n,
                    buf_unit,
                }),
            }
            pos += n;
        }
        Ok((runs, missing))
    }

    async fn submit_runs(
        &self,
        ch: &IoChannel,
        kind: IoKind,
        runs: &[Run],
        bufs: &[DmaBuf],
    ) -> Result<()> {
        let unit = self.store.layout().io_unit as usize;
        if let [r] = runs {
            // The common case: one contiguous piece, no join.
            let Some(lba) = r.lba else { return Ok(()) };
            return ch
                .submit(IoOp {
                    kind,
                    lba,
                    blocks: r.units,
                    segs: segments(bufs, r.buf_unit as usize * unit, r.units as usize * unit),
                })
                .await;
        }
        let ops = runs.iter().filter_map(|r| {
            let lba = r.lba?;
            Some(ch.submit(IoOp {
                kind,
                lba,
                blocks: r.units,
                segs: segments(bufs, r.buf_unit as usize * unit, r.units as usize * unit),
            }))
        });
        try_join_all(ops).await?;
        Ok(())
    }

    /// Reads into `bufs` (in order) starting at io unit `offset`.
    pub async fn readv(&self, offset: u64, mut bufs: Vec<DmaBuf>) -> Result<Vec<DmaBuf>> {
        let units = self.units_of(&bufs)?;
        let (runs, _) = self.map(offset, units, true)?;
        let unit = self.store.layout().io_unit as usize;
        for r in runs.iter().filter(|r| r.lba.is_none()) {
            zero_range(
                &mut bufs,
                r.buf_unit as usize * unit,
                r.units as usize * unit,
            );
        }
        let ch = self.store.chan()?;
        self.submit_runs(&ch, IoKind::Read, &runs, &bufs).await?;
        Ok(bufs)
    }

    /// Reads `dst.len()` bytes starting at io unit `offset` straight into
    /// `dst`, without a DMA buffer between, when the device reads into any
    /// memory ([`crate::BlockDevice::reads_into_any_memory`]: io_uring,
    /// RAM) and `dst` starts on a device block; otherwise through a DMA
    /// buffer and one copy. Returns which of the two it did (true: straight).
    ///
    /// It blocks the calling thread (as [`crate::block_on`]) until every
    /// device operation it started has completed, whatever their outcome,
    /// so the device never touches `dst` after it returns. That is why this
    /// is not `async`: a future can be dropped while its I/O is in flight.
    pub fn read_into(&self, offset: u64, dst: &mut [u8]) -> Result<bool> {
        let unit = self.store.layout().io_unit as usize;
        if dst.is_empty() || !dst.len().is_multiple_of(unit) {
            return Err(Error::InvalidArgument(format!(
                "read of {} bytes from blob {}: not a whole number of {unit}-byte io units",
                dst.len(),
                self.id()
            )));
        }
        let block = self.store.device().geometry().block_size as usize;
        if !self.store.device().reads_into_any_memory()
            || !(dst.as_ptr() as usize).is_multiple_of(block)
        {
            let buf = self.store.device().alloc_buf_for_overwrite(dst.len())?;
            let buf = crate::block_on(self.read(offset, buf))?;
            dst.copy_from_slice(&buf);
            return Ok(false);
        }
        let units = (dst.len() / unit) as u64;
        if let Some(lba) = self.map_one(offset, units, false)? {
            // The common case: one piece of one cluster, one op.
            let op = IoOp {
                kind: IoKind::Read,
                lba,
                blocks: units,
                // SAFETY: the segment is exactly `dst`, borrowed mutably
                // and untouched until `block_on` below has seen the op
                // complete (its future is not dropped before that).
                segs: Segments::one(unsafe { Segment::borrowed(dst.as_mut_ptr(), dst.len()) }),
            };
            crate::block_on(self.store.chan()?.submit_owned(op))?;
            return Ok(true);
        }
        let (runs, _) = self.map(offset, units, true)?;
        let ch = self.store.chan()?;
        // Never-written units read as zeroes; filled before any op starts.
        for r in runs.iter().filter(|r| r.lba.is_none()) {
            let at = r.buf_unit as usize * unit;
            dst[at..at + r.units as usize * unit].fill(0);
        }
        let base = dst.as_mut_ptr();
        let mut ops = Vec::with_capacity(runs.len());
        for r in &runs {
            let Some(lba) = r.lba else { continue };
            let (at, len) = (r.buf_unit as usize * unit, r.units as usize * unit);
            debug_assert!(at + len <= dst.len());
            ops.push(ch.submit(IoOp {
                kind: IoKind::Read,
                lba,
                blocks: r.units,
                // SAFETY: `[at, at+len)` lies in `dst` (the runs cover the
                // read's units, `dst` has that many), no run overlaps
                // another, and `dst` stays borrowed mutably, untouched,
                // while `join_all` below waits for every op to complete
                // before this returns.
                segs: Segments::one(unsafe { Segment::borrowed(base.add(at), len) }),
            }));
        }
        // Every op, not the first error: each must be done before `dst` is
        // handed back.
        let results = crate::block_on(futures::future::join_all(ops));
        results.into_iter().collect::<Result<Vec<()>>>()?;
        Ok(true)
    }

    /// The device block of io unit `offset` when `units` units from there
    /// lie in one cluster the blob owns (the common case of the data path:
    /// no run list, no parent lookup); `None` when the general path must
    /// decide. Checks the range, and for a `write` that the blob is
    /// writable (under the same lock).
    #[inline(always)]
    fn map_one(&self, offset: u64, units: u64, write: bool) -> Result<Option<Lba>> {
        let md = self.inner.md.read();
        if write && md.read_only() {
            return Err(Error::ReadOnly(self.id()));
        }
        self.check_range(md.num_clusters, offset, units)?;
        let upc = self.store.layout().units_per_cluster();
        let (idx, within) = ((offset / upc) as usize, offset % upc);
        if within + units > upc {
            return Ok(None);
        }
        Ok(md.clusters[idx].map(|c| self.store.layout().cluster_lba(c).plus(within)))
    }

    /// Reads `buf.len()` bytes starting at io unit `offset`. The I/O is
    /// submitted when this is called (when it fits one command), so the
    /// future need not be polled for the device to start.
    #[inline]
    pub fn read(&self, offset: u64, buf: DmaBuf) -> BlobIo<'_> {
        self.one(IoKind::Read, offset, buf)
    }

    /// Writes `buf` starting at io unit `offset`.
    #[inline]
    pub fn write(&self, offset: u64, buf: DmaBuf) -> BlobIo<'_> {
        self.one(IoKind::Write, offset, buf)
    }

    /// One buffer's I/O: when it lies in one allocated cluster, the
    /// channel's I/O future itself (no async state machine around it);
    /// otherwise the vectored path, boxed, whose state would make every
    /// future (moved around by executors) several times larger.
    fn one(&self, kind: IoKind, offset: u64, buf: DmaBuf) -> BlobIo<'_> {
        let write = kind == IoKind::Write;
        let direct = self
            .units_of_one(&buf)
            .and_then(|units| self.map_one(offset, units, write))
            .map(|lba| lba.map(|lba| (lba, self.store.chan())));
        let state = match direct {
            Ok(Some((lba, Ok(ch)))) => BlobIoState::Direct {
                io: ch.submit_buf_owned(kind, lba, &buf),
                buf: Some(buf),
            },
            Ok(Some((_, Err(e)))) | Err(e) => BlobIoState::Direct {
                io: IoFuture::failed(e),
                buf: None,
            },
            Ok(None) if write => BlobIoState::General(Box::pin(self.writev(offset, vec![buf]))),
            Ok(None) => BlobIoState::General(Box::pin(self.readv(offset, vec![buf]))),
        };
        BlobIo { state }
    }

    /// Writes `bufs` (in order) starting at io unit `offset`.
    pub async fn writev(&self, offset: u64, bufs: Vec<DmaBuf>) -> Result<Vec<DmaBuf>> {
        let units = self.units_of(&bufs)?;
        if self.is_read_only() {
            return Err(Error::ReadOnly(self.id()));
        }
        let ch = self.store.chan()?;
        let (runs, missing) = self.map(offset, units, false)?;
        if missing.is_empty() {
            self.submit_runs(&ch, IoKind::Write, &runs, &bufs).await?;
            return Ok(bufs);
        }
        // Thin allocation: a metadata transaction, serialized with every
        // other metadata change.
        let txn = self.store.begin().await?;
        let (runs, missing) = self.map(offset, units, false)?;
        if missing.is_empty() {
            drop(txn);
            self.submit_runs(&ch, IoKind::Write, &runs, &bufs).await?;
            return Ok(bufs);
        }
        let fresh = txn.take_clusters(missing.len(), || {
            format!(
                "{} clusters wanted by a write to thin blob {}",
                missing.len(),
                self.id()
            )
        })?;
        let layout = self.store.layout();
        let upc = layout.units_per_cluster();
        // What the write does not cover gets what the blob read there
        // before: its ancestors' data (copy-on-write) or zeroes.
        let parent = self.inner.parent.read().clone();
        let mut fills = Vec::new();
        for (&idx, &c) in missing.iter().zip(&fresh) {
            let (cs, ce) = (idx as u64 * upc, (idx as u64 + 1) * upc);
            if offset > cs || offset + units < ce {
                fills.push((c, ancestor_cluster(parent.clone(), idx)));
            }
        }
        // Point the runs that hit missing clusters at the fresh ones.
        let fresh_of: std::collections::HashMap<usize, ClusterIdx> =
            missing.iter().copied().zip(fresh.iter().copied()).collect();
        let mut new_runs = Vec::with_capacity(runs.len());
        let mut pos = offset;
        while pos < offset + units {
            let idx = (pos / upc) as usize;
            let within = pos % upc;
            let n = (upc - within).min(offset + units - pos);
            let c = match fresh_of.get(&idx) {
                Some(&c) => c,
                // Under the transaction, every cluster not missing is
                // allocated: a hole here is a bug, reported, not a panic.
                None => match self.inner.md.read().clusters[idx] {
                    Some(c) => c,
                    None => {
                        debug_assert!(false, "cluster {idx} of {} unmapped", self.id());
                        txn.give_back_clusters(&fresh);
                        return Err(Error::corrupt(
                            format!("blob {}", self.id()),
                            format!("cluster {idx} lost its mapping during a write"),
                        ));
                    }
                },
            };
            new_runs.push(Run {
                lba: Some(layout.cluster_lba(c).plus(within)),
                units: n,
                buf_unit: pos - offset,
            });
            pos += n;
        }
        let res = async {
            txn.fill_clusters(txn.ch(), &fills).await?;
            self.submit_runs(txn.ch(), IoKind::Write, &new_runs, &bufs)
                .await
        }
        .await;
        if let Err(e) = res {
            txn.give_back_clusters(&fresh);
            return Err(e);
        }
        let mapped: Vec<(usize, ClusterIdx)> = missing.iter().copied().zip(fresh).collect();
        txn.map_clusters(&self.inner, &mapped);
        txn.sync_blob(&self.inner).await?;
        Ok(bufs)
    }

    async fn zero_like(&self, offset: u64, units: u64, unmap: bool) -> Result<()> {
        if self.is_read_only() {
            return Err(Error::ReadOnly(self.id()));
        }
        if self.is_clone() {
            // Clusters it does not own read its parent's data: zeroes must be
            // written (copy-on-write) for the range to read back as zeroes.
            let upc = self.store.layout().units_per_cluster();
            let unit = self.store.layout().io_unit as u64;
            {
                let md = self.inner.md.read();
                self.check_range(md.num_clusters, offset, units)?;
            }
            let mut pos = offset;
            while pos < offset + units {
                let n = (upc - pos % upc).min(offset + units - pos);
                self.write(pos, DmaBuf::new((n * unit) as usize)?).await?;
                pos += n;
            }
            return Ok(());
        }
        let (runs, _) = self.map(offset, units, false)?;
        let ch = self.store.chan()?;
        let use_unmap = unmap && self.store.geometry().unmap_reads_zeroes;
        let ops = runs.iter().filter_map(|r| {
            let lba = r.lba?;
            Some(if use_unmap {
                ch.unmap(lba, r.units)
            } else {
                ch.write_zeroes(lba, r.units)
            })
        });
        try_join_all(ops).await?;
        Ok(())
    }

    /// Deallocates `units` io units at `offset` on the device; the range
    /// reads back as zeroes afterwards.
    pub async fn unmap(&self, offset: u64, units: u64) -> Result<()> {
        self.zero_like(offset, units, true).await
    }

    /// Sets `units` io units at `offset` to zero.
    pub async fn write_zeroes(&self, offset: u64, units: u64) -> Result<()> {
        self.zero_like(offset, units, false).await
    }
}

/// A borrowed view of a blob's xattrs ([`Blob::xattrs`]).
pub struct Xattrs<'a> {
    md: parking_lot::RwLockReadGuard<'a, BlobMd>,
}

impl Xattrs<'_> {
    /// The value of an xattr, if set.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.md.xattrs.get(name).map(Vec::as_slice)
    }

    /// Every xattr, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.md
            .xattrs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
    }
}

/// The future of [`Blob::read`] and [`Blob::write`]: the buffer back once
/// the I/O is done.
pub struct BlobIo<'a> {
    state: BlobIoState<'a>,
}

/// The vectored path's future.
type VectoredIo<'a> = Pin<Box<dyn Future<Output = Result<Vec<DmaBuf>>> + 'a>>;

enum BlobIoState<'a> {
    /// One command on the channel; the buffer waits here for it. An I/O
    /// refused before any command is a failed channel future (its error
    /// boxed there) without a buffer: the future stays small, and it is
    /// moved by every executor.
    Direct { io: IoFuture, buf: Option<DmaBuf> },
    /// Across clusters, unallocated, or a snapshot's: the vectored path.
    General(VectoredIo<'a>),
}

impl Future for BlobIo<'_> {
    type Output = Result<DmaBuf>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<DmaBuf>> {
        match &mut self.get_mut().state {
            BlobIoState::Direct { io, buf } => match Pin::new(io).poll(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(())) => Poll::Ready(buf.take().ok_or_else(polled_after_completion)),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            },
            BlobIoState::General(f) => f
                .as_mut()
                .poll(cx)
                .map(|r| r.map(|mut v| v.pop().expect("one buffer in, one out"))),
        }
    }
}

fn polled_after_completion() -> Error {
    Error::Shutdown("blob I/O future polled after completion".into())
}
