//! The blobstore: init, load, unload, and the metadata operations.
//!
//! Invariants:
//! - Metadata operations (create, delete, resize, sync, thin allocation,
//!   super blob) run one at a time per store under `md_lock`, an async lock
//!   that the data path never takes for allocated clusters.
//! - A blob's metadata on disk changes atomically: extent and continuation
//!   pages are written to fresh pages and flushed, then the first page is
//!   rewritten in place and flushed; only then are the old pages and any
//!   clusters the blob gave up returned to the allocator.
//! - A cluster handed to a blob reads as zeroes until the blob writes it.
//! - After a clean unload the bitmaps on disk are exact; loading marks the
//!   store dirty on disk before anything else is written, so a crash after
//!   load makes the next load rebuild the bitmaps from the metadata pages.
//! - A failed delete never leaves memory saying less than the device may
//!   hold: a blob whose first page may have been zeroed stays, with all it
//!   owns, and is written back before unload (or `set_super_blob`) can
//!   describe it as existing; what memory can no longer describe (a
//!   snapshot dropped half way) makes unload leave the store not clean.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use futures::future::try_join_all;
use parking_lot::{Mutex, RwLock};

use crate::alloc::Allocator;
use crate::blob::Blob;
use crate::device::{
    channel, channel_with_id, device_metrics, BlockDevice, DeviceId, DeviceMetrics, DmaBuf,
    Geometry, IoChannel,
};
use crate::error::{Error, Result};
use crate::format::{self, BlobRecord, MaskKind, PageKind, PendingOp, SuperBlock, NO_PAGE};
use crate::mdread::{OwnedMdPage, PageMap};
use crate::metrics::{OpCounter, OpStats, Shards, Stamp};
use crate::BlobId;

/// No caller data for [`StoreInner::sync_blob_locked_with`] (whose outer
/// result is then always `Ok`).
pub(crate) const NO_DATA: Option<
    std::future::Ready<std::result::Result<(), std::convert::Infallible>>,
> = None;

/// Options for [`Blobstore::init`].
#[derive(Clone, Debug)]
pub struct BlobstoreOptions {
    /// Cluster size in bytes (a multiple of the page size). Default 1 MiB.
    pub cluster_size: u32,
    /// Metadata page size in bytes (power of two, 4 KiB to 64 KiB). Default 4 KiB.
    pub page_size: u32,
    /// Metadata pages to reserve; default one per cluster. Every blob needs
    /// at least one.
    pub md_pages: Option<u64>,
    /// Type tag (at most 16 bytes) that `load` can insist on.
    pub bstype: String,
    /// Format even when the device holds a known signature (a file system,
    /// a partition table, a blobstore). Default false: `init` then fails
    /// with [`Error::DeviceNotBlank`] naming what it found.
    pub force: bool,
}

impl Default for BlobstoreOptions {
    fn default() -> Self {
        BlobstoreOptions {
            cluster_size: 1 << 20,
            page_size: 4096,
            md_pages: None,
            bstype: String::new(),
            force: false,
        }
    }
}

/// Options for [`Blobstore::load`].
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Refuse a store whose type tag differs; empty accepts any.
    pub bstype: String,
}

/// Options for [`Blobstore::create_blob`].
#[derive(Clone, Debug, Default)]
pub struct BlobOptions {
    /// Initial size in clusters.
    pub num_clusters: u64,
    /// Allocate clusters on first write instead of up front.
    pub thin_provision: bool,
    /// Extended attributes set at creation.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// Store geometry derived from the super block.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout {
    pub page_size: u32,
    pub cluster_size: u32,
    pub io_unit: u32,
    pub total_clusters: u64,
    pub md_start: u64,
    pub md_len: u64,
    pub mask_start: u64,
    pub reserved_clusters: u32,
    pub extent_per_page: usize,
    /// Format version of the super block (1: no backup super block; 3:
    /// inline cluster maps).
    pub version: u32,
}

impl Layout {
    pub fn blocks_per_page(&self) -> u64 {
        (self.page_size / self.io_unit) as u64
    }
    pub fn units_per_cluster(&self) -> u64 {
        (self.cluster_size / self.io_unit) as u64
    }
    pub fn pages_per_cluster(&self) -> u64 {
        (self.cluster_size / self.page_size) as u64
    }
    /// Device block of metadata page `p`.
    pub fn md_lba(&self, p: u32) -> u64 {
        (self.md_start + p as u64) * self.blocks_per_page()
    }
    pub fn cluster_lba(&self, c: u32) -> u64 {
        c as u64 * self.units_per_cluster()
    }
    /// True when blobs may keep their cluster map inline (format 3 on).
    pub fn inline_map(&self) -> bool {
        self.version >= format::INLINE_MAP_VERSION
    }
    fn from_super(sb: &SuperBlock) -> Layout {
        let pages_total = sb.md_start + sb.md_len;
        let ppc = (sb.cluster_size / sb.page_size) as u64;
        Layout {
            page_size: sb.page_size,
            cluster_size: sb.cluster_size,
            io_unit: sb.io_unit_size,
            total_clusters: sb.total_clusters,
            md_start: sb.md_start,
            md_len: sb.md_len,
            mask_start: sb.mask_start,
            reserved_clusters: pages_total.div_ceil(ppc) as u32,
            extent_per_page: format::extent_entries_per_page(sb.page_size),
            version: sb.version,
        }
    }
}

/// A blob's metadata as held in memory.
#[derive(Clone)]
pub(crate) struct BlobMd {
    pub num_clusters: u64,
    /// Device cluster of each blob cluster; 0 = not allocated.
    pub clusters: Vec<u32>,
    /// Metadata page of each extent page ([`NO_PAGE`] if none on disk).
    /// All [`NO_PAGE`] while `map_inline`.
    pub extent_pages: Vec<u32>,
    /// Extent pages whose entries changed since the last sync.
    pub dirty_extents: BTreeSet<usize>,
    /// The map on disk is inline in the first page's descriptors (format
    /// 3), so no extent page holds it: a sync that moves it to extent pages
    /// writes every one that maps a cluster, not only the dirty ones.
    pub map_inline: bool,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    pub invalid_flags: u64,
    pub data_ro_flags: u64,
    pub md_ro_flags: u64,
    /// Continuation pages on disk, in chain order.
    pub cont_pages: Vec<u32>,
    pub sequence: u32,
    /// Bumped by every in-memory change; compared with `synced_version`.
    pub version: u64,
    pub synced_version: u64,
    pub pending_free_clusters: Vec<u32>,
    pub pending_free_pages: Vec<u32>,
    /// The snapshot unallocated clusters are read from.
    pub parent: Option<BlobId>,
    /// A multi-blob operation in progress (a recovery marker on disk).
    pub pending: Option<PendingOp>,
}

impl BlobMd {
    /// An empty blob's metadata.
    pub fn empty(thin: bool, xattrs: BTreeMap<String, Vec<u8>>) -> BlobMd {
        BlobMd {
            num_clusters: 0,
            clusters: Vec::new(),
            extent_pages: Vec::new(),
            dirty_extents: BTreeSet::new(),
            map_inline: false,
            xattrs,
            invalid_flags: if thin { format::BLOB_INVALID_THIN } else { 0 },
            data_ro_flags: 0,
            md_ro_flags: 0,
            cont_pages: Vec::new(),
            sequence: 0,
            version: 1,
            synced_version: 0,
            pending_free_clusters: Vec::new(),
            pending_free_pages: Vec::new(),
            parent: None,
            pending: None,
        }
    }
    pub fn is_dirty(&self) -> bool {
        self.version != self.synced_version
            || !self.dirty_extents.is_empty()
            || !self.pending_free_clusters.is_empty()
            || !self.pending_free_pages.is_empty()
    }
    pub fn thin(&self) -> bool {
        self.invalid_flags & format::BLOB_INVALID_THIN != 0
    }
    pub fn read_only(&self) -> bool {
        self.data_ro_flags != 0 || self.md_ro_flags != 0
    }
    pub fn touch(&mut self) {
        self.version += 1;
    }
}

pub(crate) struct BlobInner {
    pub id: BlobId,
    pub page: u32,
    pub md: RwLock<BlobMd>,
    pub handles: AtomicUsize,
    /// The loaded parent (`md.parent`), so reads resolve without I/O.
    pub parent: RwLock<Option<Arc<BlobInner>>>,
    /// A delete of this blob failed once its first page may have been
    /// zeroed on the device; the next successful sync, which writes that
    /// page again, clears it (see [`StoreInner::undo_delete_locked`]).
    pub first_page_doubtful: AtomicBool,
}

impl BlobInner {
    pub fn new(id: BlobId, page: u32, md: BlobMd, handles: usize) -> BlobInner {
        BlobInner {
            id,
            page,
            md: RwLock::new(md),
            handles: AtomicUsize::new(handles),
            parent: RwLock::new(None),
            first_page_doubtful: AtomicBool::new(false),
        }
    }
}

pub(crate) struct StoreInner {
    pub dev: Arc<dyn BlockDevice>,
    /// `dev.id()`, kept so the data path's channel lookup makes no
    /// virtual call.
    pub dev_id: DeviceId,
    pub geo: Geometry,
    pub layout: Layout,
    pub bstype: [u8; format::BSTYPE_LEN],
    pub alloc: Mutex<Allocator>,
    pub md_lock: futures::lock::Mutex<()>,
    pub blobs: Mutex<HashMap<BlobId, Arc<BlobInner>>>,
    pub super_blob: Mutex<u64>,
    pub unloaded: AtomicBool,
    /// Set when a failed operation may have left metadata on the device
    /// that the bitmaps in memory do not describe (a snapshot dropped from
    /// memory whose first page could not be zeroed): unload then leaves the
    /// super block not clean, so the next load rebuilds the bitmaps from a
    /// scan and finishes the operation (FORMAT.md, "Recovery").
    pub needs_scan: AtomicBool,
    /// Clones of each snapshot (built at load from every blob's parent).
    pub clones: Mutex<HashMap<BlobId, BTreeSet<BlobId>>>,
    /// What happens to clusters a blob gives up.
    pub clear_method: Mutex<ClearMethod>,
    /// Metadata syncs, per thread.
    pub md_syncs: Shards<OpCounter>,
    /// What the load that made this store found and repaired.
    pub load_report: Mutex<LoadReport>,
}

/// Why a new blob cannot be made when the metadata region is full, and
/// how to get more (the count is fixed when the store is formatted).
pub(crate) const NO_MD_PAGE: &str = "no metadata page left for a new blob: every metadata page \
     is in use (their number is set at format time: BlobstoreOptions::md_pages, \
     `blobfs mkfs --max-files N`)";

/// [`NO_MD_PAGE`]'s explanation, for a sync that needs more pages.
const MD_FULL: &str = "every metadata page is in use (their number is set at format time: \
     BlobstoreOptions::md_pages, `blobfs mkfs --max-files N`)";

/// A blobstore's figures so far ([`Blobstore::metrics`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoreMetrics {
    /// Metadata syncs (every [`Blob::sync_metadata`] and its variants, and
    /// the store's own), with their latency; bytes are 0.
    pub metadata_syncs: OpStats,
    /// The device's I/O, every user of it included.
    pub device: DeviceMetrics,
}

/// What [`Blobstore::load`] found damaged or missing and worked around
/// (each also a `tracing` event); see [`Blobstore::load_report`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// The primary super block could not be read (why): the store was
    /// loaded from the backup super block and the primary rewritten.
    pub super_from_backup: Option<String>,
    /// The primary was fine but the backup super block was not (why): the
    /// load rewrote it.
    pub backup_rewritten: Option<String>,
    /// The store is of format version 1, which has no backup super block.
    pub no_backup: bool,
    /// The bitmaps were rebuilt from every blob's metadata (why: an
    /// unclean stop, a recovery marker, or a damaged bitmap).
    pub bitmaps_rebuilt: Option<String>,
    /// True when a bitmap on disk was damaged (so `bitmaps_rebuilt` is a
    /// repair, not the recovery of an unclean stop).
    pub bitmap_damaged: bool,
}

/// What the store does with the clusters a blob gives up (on delete and on
/// shrink), once the metadata that released them is durable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClearMethod {
    /// Leave the old bytes (they are zeroed when the cluster is handed out
    /// again, so no blob ever reads them).
    #[default]
    None,
    /// Deallocate them on the device (thin-provisioned devices get the space back).
    Unmap,
    /// Overwrite them with zeroes.
    WriteZeroes,
}

/// A loaded blobstore. Cheap to clone; safe to use from any thread (each
/// thread does its I/O on its own channel).
#[derive(Clone)]
pub struct Blobstore {
    pub(crate) inner: Arc<StoreInner>,
}

const BLOB_ID_BASE: u64 = 1 << 32;

/// How errors name metadata page `p` of blob `id`.
fn md_loc(p: u32, id: BlobId) -> String {
    format!("metadata page {p} (blob {id})")
}

thread_local! {
    /// The first-page buffer of this thread's last metadata sync, for the
    /// next one: a sync writes a first page every time (a log synced per
    /// record writes one per record), and a fresh aligned, zeroed buffer
    /// for each showed in profiles.
    static SPARE_MD_PAGE: std::cell::RefCell<Option<DmaBuf>> =
        const { std::cell::RefCell::new(None) };
}

/// A device buffer of one metadata page of `len` bytes, reused where this
/// thread has one (its contents are stale: the encoder writes every byte).
fn md_page_buf(len: usize) -> Result<DmaBuf> {
    match SPARE_MD_PAGE.with(|s| s.borrow_mut().take()) {
        Some(mut b) if b.capacity() >= len => {
            b.set_len(len)?;
            Ok(b)
        }
        _ => DmaBuf::new(len),
    }
}

/// Keeps a written first page's buffer for [`md_page_buf`].
fn give_back_md_page(buf: DmaBuf) {
    SPARE_MD_PAGE.with(|s| *s.borrow_mut() = Some(buf));
}

impl StoreInner {
    #[inline]
    pub fn chan(&self) -> Result<IoChannel> {
        if self.unloaded.load(Ordering::Acquire) {
            return Err(Error::Shutdown("the blobstore was unloaded".into()));
        }
        channel_with_id(&self.dev, self.dev_id)
    }

    pub fn blob_id(page: u32) -> BlobId {
        BlobId(BLOB_ID_BASE | page as u64)
    }

    pub fn page_of(&self, id: BlobId) -> Result<u32> {
        let page = id.0.wrapping_sub(BLOB_ID_BASE);
        if id.0 < BLOB_ID_BASE || page >= self.layout.md_len {
            return Err(Error::NotFound(id));
        }
        Ok(page as u32)
    }

    pub(crate) async fn write_bytes(&self, ch: &IoChannel, lba: u64, bytes: &[u8]) -> Result<()> {
        let buf = DmaBuf::from_slice(bytes)?;
        ch.write(lba, buf).await.map(|_| ())
    }

    pub(crate) async fn read_bytes(&self, ch: &IoChannel, lba: u64, len: usize) -> Result<DmaBuf> {
        let buf = self.dev.alloc_buf_for_overwrite(len)?;
        ch.read(lba, buf).await
    }

    fn super_block(&self, clean: bool) -> SuperBlock {
        let l = &self.layout;
        let pmask = format::mask_region_pages(l.md_len, l.page_size);
        let cmask = format::mask_region_pages(l.total_clusters, l.page_size);
        SuperBlock {
            version: l.version,
            clean,
            page_size: l.page_size,
            cluster_size: l.cluster_size,
            io_unit_size: l.io_unit,
            total_clusters: l.total_clusters,
            mask_start: l.mask_start,
            page_mask_len: pmask,
            cluster_mask_len: cmask,
            blobid_mask_len: pmask,
            md_start: l.md_start,
            md_len: l.md_len,
            super_blob: *self.super_blob.lock(),
            bstype: self.bstype,
        }
    }

    /// Writes the super block, then (format 2 on) its backup, each made
    /// durable before the next: a write torn by a power cut leaves the
    /// other copy whole, holding this state or the one before, both of
    /// which load (FORMAT.md, "Backup super block").
    pub(crate) async fn write_super(&self, ch: &IoChannel, clean: bool) -> Result<()> {
        let l = self.layout;
        let mut page = vec![0u8; l.page_size as usize];
        page[..format::SUPER_BLOCK_LEN].copy_from_slice(&self.super_block(clean).encode());
        self.write_bytes(ch, 0, &page).await?;
        ch.flush().await?;
        if l.version >= format::BACKUP_SUPER_VERSION {
            let lba = format::BACKUP_SUPER_PAGE * l.blocks_per_page();
            self.write_bytes(ch, lba, &page).await?;
            ch.flush().await?;
        }
        Ok(())
    }

    /// Zeroes the first page of a blob whose creation failed, durably;
    /// false if that failed too (the page may then still hold the blob).
    pub(crate) async fn undo_first_page(&self, ch: &IoChannel, page: u32) -> bool {
        let zero = vec![0u8; self.layout.page_size as usize];
        self.write_bytes(ch, self.layout.md_lba(page), &zero)
            .await
            .is_ok()
            && ch.flush().await.is_ok()
    }

    /// Takes back, in memory, a delete of `blob` that failed once it may
    /// have changed the blob's first page on the device (zeroed it, or
    /// written a removal marker into it). The blob stays, with all its pages
    /// and clusters, and with the super block's name if it had it
    /// (`was_super`); its metadata is marked changed, so its first page is
    /// written again: here if the device lets us, else at its next sync,
    /// at the latest at unload, which syncs every blob before it writes the
    /// bitmaps and the super block. Until then `set_super_blob` syncs it
    /// before naming it. A crash before that leaves the blob deleted or
    /// whole, both of which load.
    pub(crate) async fn undo_delete_locked(
        &self,
        ch: &IoChannel,
        blob: &BlobInner,
        was_super: bool,
    ) {
        blob.md.write().touch();
        blob.first_page_doubtful.store(true, Ordering::Release);
        if was_super {
            *self.super_blob.lock() = blob.id.0;
        }
        // Best effort: on an error the blob stays changed (and doubtful),
        // for the next sync or unload.
        if self.sync_blob_locked(ch, blob).await.is_ok() && was_super {
            // The blob is durable again, so the super block may name it.
            let _ = self.write_super(ch, false).await;
        }
    }

    /// Zeroes freshly allocated clusters so they never show old data.
    pub async fn zero_clusters(&self, ch: &IoChannel, clusters: &[u32]) -> Result<()> {
        let runs = self.block_runs(clusters);
        try_join_all(runs.into_iter().map(|(lba, n)| ch.write_zeroes(lba, n))).await?;
        Ok(())
    }

    /// `clusters` as `(lba, blocks)` runs, neighbours (in the order given)
    /// merged, so one device request covers each run.
    pub fn block_runs(&self, clusters: &[u32]) -> Vec<(u64, u64)> {
        let upc = self.layout.units_per_cluster();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &c in clusters {
            let lba = self.layout.cluster_lba(c);
            match runs.last_mut() {
                Some((start, n)) if *start + *n == lba => *n += upc,
                _ => runs.push((lba, upc)),
            }
        }
        runs
    }

    /// Loads a blob's metadata from disk (md_lock held by the caller).
    pub(crate) async fn read_blob_md(&self, ch: &IoChannel, page: u32) -> Result<BlobMd> {
        self.read_blob_md_from(ch, page, &mut PageMap::default())
            .await
    }

    /// [`StoreInner::read_blob_md`], taking its pages from `map` where the
    /// bulk read of a load has them.
    pub(crate) async fn read_blob_md_from(
        &self,
        ch: &IoChannel,
        page: u32,
        map: &mut PageMap,
    ) -> Result<BlobMd> {
        let (sequence, rec, cont_pages) = self.read_record_from(ch, page, map).await?;
        self.md_from_record(ch, page, sequence, rec, cont_pages, map)
            .await
    }

    /// Metadata page `p` of blob `id`: from `map` when it holds it, else
    /// read from the device and checked.
    async fn md_page(
        &self,
        ch: &IoChannel,
        p: u32,
        id: BlobId,
        map: &mut PageMap,
    ) -> Result<OwnedMdPage> {
        if let Some(page) = map.take(p) {
            return Ok(page);
        }
        let l = self.layout;
        let buf = self
            .read_bytes(ch, l.md_lba(p), l.page_size as usize)
            .await?;
        let page = format::decode_md_page(&buf, &md_loc(p, id))?;
        Ok(OwnedMdPage::from_page(&page))
    }

    /// A blob's descriptors as its first and continuation pages hold them
    /// (its extent pages not read): the sequence, the record and the
    /// continuation pages.
    pub(crate) async fn read_record(
        &self,
        ch: &IoChannel,
        page: u32,
    ) -> Result<(u32, BlobRecord, Vec<u32>)> {
        self.read_record_from(ch, page, &mut PageMap::default())
            .await
    }

    /// [`StoreInner::read_record`], taking pages from `map` where it has
    /// them.
    async fn read_record_from(
        &self,
        ch: &IoChannel,
        page: u32,
        map: &mut PageMap,
    ) -> Result<(u32, BlobRecord, Vec<u32>)> {
        let l = self.layout;
        let id = Self::blob_id(page);
        let fp = self.md_page(ch, page, id, map).await?;
        if fp.kind != PageKind::First || fp.blob_id != id.0 {
            return Err(Error::NotFound(id));
        }
        let mut payloads = vec![fp.payload];
        let mut cont_pages = Vec::new();
        let mut next = fp.next;
        while next != NO_PAGE {
            if next as u64 >= l.md_len || cont_pages.len() as u64 >= l.md_len {
                return Err(Error::corrupt(
                    md_loc(page, id),
                    format!("bad chain link {next}"),
                ));
            }
            let p = self.md_page(ch, next, id, map).await?;
            if p.kind != PageKind::Continuation || p.blob_id != id.0 || p.sequence != fp.sequence {
                return Err(Error::corrupt(
                    md_loc(next, id),
                    "continuation page does not belong",
                ));
            }
            payloads.push(p.payload);
            cont_pages.push(next);
            next = p.next;
        }
        let slices: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
        // Named only on failure: a load decodes every blob.
        let rec = BlobRecord::decode(&slices, "").map_err(|e| match e {
            Error::Corrupt { what, .. } => Error::corrupt(md_loc(page, id), what),
            e => e,
        })?;
        Ok((fp.sequence, rec, cont_pages))
    }

    async fn md_from_record(
        &self,
        ch: &IoChannel,
        page: u32,
        sequence: u32,
        rec: BlobRecord,
        cont_pages: Vec<u32>,
        map: &mut PageMap,
    ) -> Result<BlobMd> {
        let l = self.layout;
        let id = Self::blob_id(page);
        let per = l.extent_per_page;
        let loc = |p: u32| md_loc(p, id);
        if rec.invalid_flags & !format::BLOB_INVALID_THIN != 0 {
            return Err(Error::Unsupported(format!(
                "blob {id} has unknown invalid flags {:#x}",
                rec.invalid_flags
            )));
        }
        let bad_cluster =
            |c: u32| c != 0 && (c < l.reserved_clusters || c as u64 >= l.total_clusters);
        let map_inline = !rec.cluster_map.is_empty();
        if map_inline {
            if !l.inline_map() {
                return Err(Error::corrupt(
                    loc(page),
                    format!(
                        "an inline cluster map in a store of format {} (inline maps came \
                         with format {})",
                        l.version,
                        format::INLINE_MAP_VERSION
                    ),
                ));
            }
            if rec.cluster_map.len() as u64 != rec.num_clusters
                || rec.num_clusters > l.total_clusters
            {
                return Err(Error::corrupt(
                    loc(page),
                    format!(
                        "{} clusters with an inline map of {}",
                        rec.num_clusters,
                        rec.cluster_map.len()
                    ),
                ));
            }
            if let Some(c) = rec.cluster_map.iter().find(|&&c| bad_cluster(c)) {
                return Err(Error::corrupt(
                    loc(page),
                    format!("cluster {c} out of range"),
                ));
            }
        } else if rec.num_clusters > l.total_clusters
            || rec.extent_table.len() as u64 != rec.num_clusters.div_ceil(per as u64)
        {
            return Err(Error::corrupt(
                loc(page),
                format!(
                    "{} clusters with {} extent pages",
                    rec.num_clusters,
                    rec.extent_table.len()
                ),
            ));
        }
        let n = rec.num_clusters as usize;
        let (clusters, extent_pages) = if map_inline {
            (rec.cluster_map, vec![NO_PAGE; n.div_ceil(per)])
        } else {
            let mut clusters = vec![0u32; n];
            for (k, &ep) in rec.extent_table.iter().enumerate() {
                if ep == NO_PAGE {
                    continue;
                }
                if ep as u64 >= l.md_len {
                    return Err(Error::corrupt(
                        loc(page),
                        format!("extent page {ep} out of range"),
                    ));
                }
                let p = self.md_page(ch, ep, id, map).await?;
                if p.kind != PageKind::Extent || p.blob_id != id.0 {
                    return Err(Error::corrupt(
                        loc(ep),
                        "extent page does not belong to the blob",
                    ));
                }
                let (first, entries) = format::decode_extent_payload(&p.payload, &loc(ep))?;
                let want = per.min(n - k * per);
                if first != (k * per) as u64 || entries.len() != want {
                    return Err(Error::corrupt(
                        loc(ep),
                        "extent page covers the wrong clusters",
                    ));
                }
                for (i, &c) in entries.iter().enumerate() {
                    if bad_cluster(c) {
                        return Err(Error::corrupt(loc(ep), format!("cluster {c} out of range")));
                    }
                    clusters[k * per + i] = c;
                }
            }
            (clusters, rec.extent_table)
        };
        Ok(BlobMd {
            num_clusters: rec.num_clusters,
            clusters,
            extent_pages,
            dirty_extents: BTreeSet::new(),
            map_inline,
            xattrs: rec.xattrs.into_iter().collect(),
            invalid_flags: rec.invalid_flags,
            data_ro_flags: rec.data_ro_flags,
            md_ro_flags: rec.md_ro_flags,
            cont_pages,
            sequence,
            version: 0,
            synced_version: 0,
            pending_free_clusters: Vec::new(),
            pending_free_pages: Vec::new(),
            parent: rec.parent.map(BlobId),
            pending: rec.pending,
        })
    }

    /// Writes a blob's metadata atomically (md_lock held by the caller).
    pub async fn sync_blob_locked(&self, ch: &IoChannel, blob: &BlobInner) -> Result<()> {
        match self.sync_blob_locked_with(ch, blob, true, NO_DATA).await {
            Ok(res) => res,
            Err(never) => match never {},
        }
    }

    /// [`StoreInner::sync_blob_locked`], with two options.
    ///
    /// `ordered` false: when the sync needs no fresh metadata page and frees
    /// nothing, the barrier before the first page is skipped (see
    /// `Blob::sync_metadata_unordered`).
    ///
    /// `data`: the caller's data write, run alongside the metadata writes
    /// that come before the sync's last flush, so that flush covers it (with
    /// a barrier, the writes of fresh pages, so the data is durable before
    /// the first page; without one, the first page itself). Its error comes
    /// back as the outer `Err`; then the first page is not written after it
    /// where a barrier was due, and nothing is adopted. When the metadata is
    /// clean the data runs alone, followed by a flush.
    pub async fn sync_blob_locked_with<E>(
        &self,
        ch: &IoChannel,
        blob: &BlobInner,
        ordered: bool,
        data: Option<impl Future<Output = std::result::Result<(), E>>>,
    ) -> std::result::Result<Result<()>, E> {
        let start = Stamp::now();
        let res = self.sync_blob_untimed(ch, blob, ordered, data).await;
        self.md_syncs
            .with(|c| c.record(start, 0, matches!(res, Ok(Ok(())))));
        res
    }

    /// [`StoreInner::sync_blob_locked_with`] without counting it.
    async fn sync_blob_untimed<E>(
        &self,
        ch: &IoChannel,
        blob: &BlobInner,
        ordered: bool,
        data: Option<impl Future<Output = std::result::Result<(), E>>>,
    ) -> std::result::Result<Result<()>, E> {
        let had_data = data.is_some();
        let mut data = pin!(async move {
            match data {
                Some(d) => d.await,
                None => Ok(()),
            }
        });
        let l = self.layout;
        let per = l.extent_per_page;
        let id = blob.id;
        // Only a sync (under md_lock, held here) makes metadata clean.
        if !blob.md.read().is_dirty() {
            data.await?;
            return Ok(if had_data { ch.flush().await } else { Ok(()) });
        }
        // 1. Capture what to write, and take fresh pages for it.
        let (first_page, cont_writes, extent_writes, new_table, new_conts, to_free, captured) = {
            let md = blob.md.read();
            let header = format::BlobHeader {
                invalid_flags: md.invalid_flags,
                data_ro_flags: md.data_ro_flags,
                md_ro_flags: md.md_ro_flags,
                num_clusters: md.num_clusters,
                parent: md.parent.map(|p| p.0),
                pending: md.pending,
            };
            let xattrs = || md.xattrs.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
            // The map goes inline when the whole record then fits the
            // first page (format 3): the blob takes that one page.
            let inline = l.inline_map()
                && format::inline_map_fits(&header, md.clusters.len(), xattrs(), l.page_size);
            debug_assert!(!md.map_inline || md.extent_pages.iter().all(|&p| p == NO_PAGE));
            // Extent pages to write: the changed ones, or every one when no
            // extent page holds the map on disk yet (it was inline).
            let rewrite: Vec<usize> = if inline {
                Vec::new()
            } else if md.map_inline {
                (0..md.extent_pages.len()).collect()
            } else {
                md.dirty_extents.iter().copied().collect()
            };
            let mut table = if inline {
                vec![NO_PAGE; md.extent_pages.len()]
            } else {
                md.extent_pages.clone()
            };
            let mut extent_payloads = Vec::new();
            for &k in &rewrite {
                let end = (k * per + per).min(md.clusters.len());
                let entries = &md.clusters[k * per..end];
                if entries.iter().all(|&c| c == 0) {
                    table[k] = NO_PAGE;
                } else {
                    extent_payloads
                        .push((k, format::encode_extent_payload((k * per) as u64, entries)));
                }
            }
            let mut alloc = self.alloc.lock();
            let Some(ext_pages) = alloc.alloc_pages(extent_payloads.len()) else {
                return Ok(Err(Error::NoSpace(format!(
                    "no metadata page left to sync blob {id}: {MD_FULL}"
                ))));
            };
            for ((k, _), &p) in extent_payloads.iter().zip(&ext_pages) {
                table[*k] = p;
            }
            let payloads = if inline {
                format::encode_blob_payloads(&header, &[], &md.clusters, xattrs(), l.page_size)
            } else {
                format::encode_blob_payloads(&header, &table, &[], xattrs(), l.page_size)
            };
            debug_assert!(
                !inline || payloads.len() == 1,
                "an inline map that does not fit"
            );
            let Some(conts) = alloc.alloc_pages(payloads.len() - 1) else {
                for p in ext_pages {
                    alloc.free_page(p);
                }
                return Ok(Err(Error::NoSpace(format!(
                    "no metadata page left to sync blob {id}: {MD_FULL}"
                ))));
            };
            drop(alloc);
            let seq = md.sequence.wrapping_add(1);
            // The first page goes straight into a device buffer.
            let mut first = match md_page_buf(l.page_size as usize) {
                Ok(b) => b,
                Err(e) => return Ok(Err(e)),
            };
            format::encode_md_page_into(
                &mut first,
                PageKind::First,
                id.0,
                seq,
                conts.first().copied().unwrap_or(NO_PAGE),
                &payloads[0],
            );
            let pages = payloads.iter().enumerate().skip(1).map(|(i, payload)| {
                let next = conts.get(i).copied().unwrap_or(NO_PAGE);
                format::encode_md_page(
                    PageKind::Continuation,
                    id.0,
                    seq,
                    next,
                    payload,
                    l.page_size,
                )
            });
            let cont_writes: Vec<(u32, Vec<u8>)> = conts.iter().copied().zip(pages).collect();
            let extent_writes: Vec<(u32, Vec<u8>)> = ext_pages
                .iter()
                .zip(&extent_payloads)
                .map(|(&p, (_, payload))| {
                    (
                        p,
                        format::encode_md_page(
                            PageKind::Extent,
                            id.0,
                            seq,
                            NO_PAGE,
                            payload,
                            l.page_size,
                        ),
                    )
                })
                .collect();
            // What the durable metadata holds now and the new one will not:
            // the old continuation pages, the old extent pages rewritten
            // (all of them when the map moves inline), pages a shrink gave up.
            let mut to_free: Vec<u32> = md.cont_pages.clone();
            if inline {
                to_free.extend(md.extent_pages.iter().filter(|&&p| p != NO_PAGE));
            } else {
                to_free.extend(
                    rewrite
                        .iter()
                        .map(|&k| md.extent_pages[k])
                        .filter(|&p| p != NO_PAGE),
                );
            }
            to_free.extend_from_slice(&md.pending_free_pages);
            let frees = !md.pending_free_clusters.is_empty() || !md.pending_free_pages.is_empty();
            let captured = (
                md.version,
                seq,
                md.dirty_extents.clone(),
                md.pending_free_clusters.len(),
                md.pending_free_pages.len(),
                frees,
                inline,
            );
            (
                first,
                cont_writes,
                extent_writes,
                table,
                conts,
                to_free,
                captured,
            )
        };
        let new_pages: Vec<u32> = cont_writes
            .iter()
            .chain(&extent_writes)
            .map(|(p, _)| *p)
            .collect();
        // A barrier before the first page even with no fresh pages: data
        // the blob wrote before this sync must be durable before the first
        // page can point at it (BlobFS relies on this for its lengths),
        // unless the caller checks that itself (`ordered` false) and the
        // first page references nothing new: no fresh page, nothing freed,
        // and no cluster map change (an inline map can name new clusters
        // without a fresh page).
        let barrier = ordered || !new_pages.is_empty() || captured.5 || !captured.2.is_empty();
        let free_new_pages = |pages: Vec<u32>| {
            let mut alloc = self.alloc.lock();
            for p in pages {
                alloc.free_page(p);
            }
        };
        // 2. Fresh pages first (with the caller's data where a barrier
        // follows), made durable.
        let fresh = try_join_all(
            cont_writes
                .iter()
                .chain(&extent_writes)
                .map(|(p, bytes)| self.write_bytes(ch, l.md_lba(*p), bytes)),
        );
        let mut res = if barrier {
            let (d, w) = futures::join!(data.as_mut(), fresh);
            if let Err(e) = d {
                free_new_pages(new_pages);
                return Err(e);
            }
            match w {
                Ok(_) => ch.flush().await,
                Err(e) => Err(e),
            }
        } else {
            // No fresh pages to write (else there would be a barrier).
            debug_assert!(new_pages.is_empty());
            Ok(())
        };
        if let Err(e) = res {
            free_new_pages(new_pages);
            return Ok(Err(e));
        }
        // 3. The first page, in place: the commit point (with the caller's
        // data where no barrier came before). On failure the new pages may
        // or may not be referenced on disk, so keep both sets allocated (a
        // leak the next dirty load reclaims, never a reuse).
        let first = async {
            ch.write(l.md_lba(blob.page), first_page)
                .await
                .map(give_back_md_page)
        };
        res = if barrier {
            first.await
        } else {
            let (d, w) = futures::join!(data.as_mut(), first);
            d?;
            w
        };
        if let Err(e) = res {
            return Ok(Err(e));
        }
        if let Err(e) = ch.flush().await {
            return Ok(Err(e));
        }
        // 4. Adopt the new state and release what the old one held.
        let (version, seq, dirty, n_clusters, n_pages, _, inline) = captured;
        let freed_clusters = {
            let mut md = blob.md.write();
            md.extent_pages = new_table;
            md.map_inline = inline;
            md.cont_pages = new_conts;
            md.sequence = seq;
            md.synced_version = version;
            for k in dirty {
                md.dirty_extents.remove(&k);
            }
            md.pending_free_pages.drain(..n_pages);
            md.pending_free_clusters
                .drain(..n_clusters)
                .collect::<Vec<_>>()
        };
        // The first page is on the device again, whatever a failed delete
        // did to it.
        blob.first_page_doubtful.store(false, Ordering::Release);
        self.clear_clusters(ch, &freed_clusters).await;
        let mut alloc = self.alloc.lock();
        for p in to_free {
            alloc.free_page(p);
        }
        for c in freed_clusters {
            alloc.free_cluster(c);
        }
        alloc.check();
        Ok(Ok(()))
    }

    /// Sets a blob's size in clusters (md_lock held by the caller).
    pub async fn resize_locked(
        &self,
        ch: &IoChannel,
        blob: &BlobInner,
        n: u64,
        zero: bool,
    ) -> Result<()> {
        let per = self.layout.extent_per_page;
        let (old, thin) = {
            let md = blob.md.read();
            if md.read_only() {
                return Err(Error::ReadOnly(blob.id));
            }
            (md.num_clusters, md.thin())
        };
        if n > self.layout.total_clusters {
            return Err(Error::NoSpace(format!(
                "blob {} cannot hold {n} clusters: the store has {}",
                blob.id, self.layout.total_clusters
            )));
        }
        let mut fresh = Vec::new();
        if n > old && !thin {
            let want = (n - old) as usize;
            fresh = self.alloc.lock().alloc_clusters(want).ok_or_else(|| {
                Error::NoSpace(format!("{want} clusters wanted to grow blob {}", blob.id))
            })?;
            let zeroed = if zero {
                self.zero_clusters(ch, &fresh).await
            } else {
                Ok(())
            };
            if let Err(e) = zeroed {
                let mut a = self.alloc.lock();
                fresh.iter().for_each(|&c| a.free_cluster(c));
                return Err(e);
            }
        }
        let mut md = blob.md.write();
        let n_us = n as usize;
        if n < old {
            let gone: Vec<u32> = md.clusters.drain(n_us..).filter(|&c| c != 0).collect();
            md.pending_free_clusters.extend(gone);
            let keep = n_us.div_ceil(per);
            let gone_pages: Vec<u32> = md
                .extent_pages
                .drain(keep..)
                .filter(|&p| p != NO_PAGE)
                .collect();
            md.pending_free_pages.extend(gone_pages);
            md.dirty_extents.retain(|&k| k < keep);
            if !n_us.is_multiple_of(per) {
                md.dirty_extents.insert(keep - 1);
            }
        } else if n > old {
            md.clusters.resize(n_us, 0);
            md.extent_pages.resize(n_us.div_ceil(per), NO_PAGE);
            for (i, c) in fresh.into_iter().enumerate() {
                let idx = old as usize + i;
                md.clusters[idx] = c;
                md.dirty_extents.insert(idx / per);
            }
            // A partial last extent page changes length when the blob grows.
            if !(old as usize).is_multiple_of(per) {
                md.dirty_extents.insert(old as usize / per);
            }
        }
        md.num_clusters = n;
        md.touch();
        Ok(())
    }
}

impl Blobstore {
    /// Metadata syncs and device I/O so far (see [`crate::metrics`]).
    pub fn metrics(&self) -> StoreMetrics {
        StoreMetrics {
            metadata_syncs: OpStats::fold(&self.inner.md_syncs.all(), |c| c),
            device: device_metrics(self.inner.dev_id),
        }
    }

    /// Makes a new, empty blobstore on `dev`. Unless `opts.force` is set,
    /// first probes the device ([`crate::probe`]) and fails with
    /// [`Error::DeviceNotBlank`] if it holds a known signature, our own
    /// blobstores included; with `force`, whatever it held is overwritten.
    pub async fn init(dev: Arc<dyn BlockDevice>, opts: BlobstoreOptions) -> Result<Blobstore> {
        let geo = dev.geometry();
        let ps = opts.page_size;
        if !ps.is_power_of_two() || !(4096..=65536).contains(&ps) || ps < geo.block_size {
            return Err(Error::InvalidArgument(format!(
                "page size {ps}: must be a power of two from 4096 to 65536"
            )));
        }
        if opts.cluster_size == 0 || !opts.cluster_size.is_multiple_of(ps) {
            return Err(Error::InvalidArgument(format!(
                "cluster size {} is not a multiple of the page size {ps}",
                opts.cluster_size
            )));
        }
        if opts.bstype.len() > format::BSTYPE_LEN {
            return Err(Error::InvalidArgument(format!(
                "type tag {:?} is longer than {} bytes",
                opts.bstype,
                format::BSTYPE_LEN
            )));
        }
        let total_clusters = geo.size_bytes() / opts.cluster_size as u64;
        if total_clusters > u32::MAX as u64 {
            return Err(Error::InvalidArgument(format!(
                "{total_clusters} clusters: use a larger cluster size"
            )));
        }
        let md_len = opts.md_pages.unwrap_or(total_clusters).max(1);
        if md_len >= NO_PAGE as u64 {
            return Err(Error::InvalidArgument(format!("{md_len} metadata pages")));
        }
        let pmask = format::mask_region_pages(md_len, ps);
        let cmask = format::mask_region_pages(total_clusters, ps);
        let mask_start = SuperBlock::first_mask_page(format::FORMAT_VERSION);
        let md_start = mask_start + 2 * pmask + cmask;
        let ppc = (opts.cluster_size / ps) as u64;
        let reserved = (md_start + md_len).div_ceil(ppc);
        if reserved >= total_clusters {
            return Err(Error::DeviceTooSmall(format!(
                "{} bytes hold {total_clusters} clusters of {}, and the metadata needs {reserved}",
                geo.size_bytes(),
                opts.cluster_size
            )));
        }
        if !opts.force {
            if let Some(sig) = crate::probe::probe(&dev).await? {
                tracing::warn!(
                    device = %dev.name(),
                    holds = %sig.what,
                    offset = sig.offset,
                    "refusing to format a device that is not blank"
                );
                return Err(Error::DeviceNotBlank {
                    device: dev.name(),
                    what: sig.what,
                    offset: sig.offset,
                });
            }
        }
        let mut bstype = [0u8; format::BSTYPE_LEN];
        bstype[..opts.bstype.len()].copy_from_slice(opts.bstype.as_bytes());
        let sb = SuperBlock {
            version: format::FORMAT_VERSION,
            clean: false,
            page_size: ps,
            cluster_size: opts.cluster_size,
            io_unit_size: geo.block_size,
            total_clusters,
            mask_start,
            page_mask_len: pmask,
            cluster_mask_len: cmask,
            blobid_mask_len: pmask,
            md_start,
            md_len,
            super_blob: 0,
            bstype,
        };
        let layout = Layout::from_super(&sb);
        let inner = Arc::new(StoreInner {
            md_syncs: Shards::new(),
            dev_id: dev.id(),
            geo,
            layout,
            bstype,
            alloc: Mutex::new(Allocator::new(
                md_len,
                total_clusters,
                layout.reserved_clusters,
            )),
            md_lock: futures::lock::Mutex::new(()),
            blobs: Mutex::new(HashMap::new()),
            super_blob: Mutex::new(0),
            unloaded: AtomicBool::new(false),
            needs_scan: AtomicBool::new(false),
            clones: Mutex::new(HashMap::new()),
            clear_method: Mutex::new(ClearMethod::None),
            load_report: Mutex::new(LoadReport::default()),
            dev,
        });
        let ch = inner.chan()?;
        // Old metadata pages on the device must not look like blobs, and a
        // crash in the middle must leave either the old store intact or no
        // store at all, never the new super block over old metadata: first
        // retire the old super block durably, then clear the rest durably,
        // and only then write the new super block.
        // An old store's backup super block goes first, durably (only
        // where one is found: the places between hold its metadata, which
        // must stay whole while its primary does), then its primary.
        let bpp = layout.blocks_per_page();
        let block = geo.block_size as u64;
        let mut retired = false;
        for (page_size, off) in format::backup_super_candidates() {
            if off + format::SUPER_BLOCK_LEN as u64 > geo.size_bytes() {
                break;
            }
            let len = format::SUPER_BLOCK_LEN;
            let buf = inner.read_bytes(&ch, off / block, len).await?;
            if SuperBlock::decode_backup(&buf, page_size).is_ok() {
                ch.write_zeroes(off / block, len as u64 / block).await?;
                retired = true;
            }
        }
        if retired {
            ch.flush().await?;
        }
        ch.write_zeroes(0, bpp).await?;
        ch.flush().await?;
        ch.write_zeroes(bpp, (md_start + md_len - 1) * bpp).await?;
        ch.flush().await?;
        inner.write_super(&ch, false).await?;
        Ok(Blobstore { inner })
    }

    /// Loads the blobstore on `dev`. After a clean unload the bitmaps are read
    /// back; otherwise they are rebuilt from every blob's metadata.
    pub async fn load(dev: Arc<dyn BlockDevice>, opts: LoadOptions) -> Result<Blobstore> {
        Self::load_inner(dev, opts, false).await
    }

    /// Loads the blobstore on `dev` and grows it to cover the whole device,
    /// when the device has grown since the store was made (SPDK's
    /// `spdk_bs_grow`). The new clusters are free. The super block write is
    /// the commit point: a crash leaves the old size or the new one. The
    /// store can grow as far as its cluster bitmap region, sized at init in
    /// whole pages, has bits for (32,640 clusters per 4 KiB page).
    pub async fn grow(dev: Arc<dyn BlockDevice>, opts: LoadOptions) -> Result<Blobstore> {
        Self::load_inner(dev, opts, true).await
    }

    async fn load_inner(
        dev: Arc<dyn BlockDevice>,
        opts: LoadOptions,
        grow: bool,
    ) -> Result<Blobstore> {
        let geo = dev.geometry();
        let ch = channel(&dev)?;
        let mut report = LoadReport::default();
        let sb = read_super_blocks(&dev, &ch, &mut report).await?;
        let found = String::from_utf8_lossy(&sb.bstype)
            .trim_end_matches('\0')
            .to_string();
        if !opts.bstype.is_empty() && opts.bstype != found {
            return Err(Error::WrongType {
                found,
                expected: opts.bstype,
            });
        }
        if sb.io_unit_size != geo.block_size {
            return Err(Error::InvalidArgument(format!(
                "the store was made on {}-byte blocks; this device has {}-byte blocks",
                sb.io_unit_size, geo.block_size
            )));
        }
        if sb
            .total_clusters
            .checked_mul(sb.cluster_size as u64)
            .is_none_or(|b| b > geo.size_bytes())
        {
            return Err(Error::DeviceTooSmall(format!(
                "the store spans {} clusters of {} bytes; the device has {} bytes",
                sb.total_clusters,
                sb.cluster_size,
                geo.size_bytes()
            )));
        }
        let mut layout = Layout::from_super(&sb);
        let fits = geo.size_bytes() / sb.cluster_size as u64;
        if grow && fits > sb.total_clusters {
            let room = sb.cluster_mask_len;
            if format::mask_region_pages(fits, sb.page_size) > room || fits > u32::MAX as u64 {
                return Err(Error::NoSpace(format!(
                    "cannot grow to {fits} clusters: the cluster bitmap has {room} pages"
                )));
            }
            layout.total_clusters = fits;
        }
        let inner = Arc::new(StoreInner {
            md_syncs: Shards::new(),
            dev_id: dev.id(),
            geo,
            layout,
            bstype: sb.bstype,
            alloc: Mutex::new(Allocator::new(
                sb.md_len,
                layout.total_clusters,
                layout.reserved_clusters,
            )),
            md_lock: futures::lock::Mutex::new(()),
            blobs: Mutex::new(HashMap::new()),
            super_blob: Mutex::new(sb.super_blob),
            unloaded: AtomicBool::new(false),
            needs_scan: AtomicBool::new(false),
            clones: Mutex::new(HashMap::new()),
            clear_method: Mutex::new(ClearMethod::None),
            load_report: Mutex::new(LoadReport::default()),
            dev,
        });
        // Every blob's metadata: from the blob-id bitmap after a clean
        // unload, from a scan of the metadata region otherwise (or when a
        // recovery marker says an operation was cut short).
        let mut clean = None;
        let masks = if sb.clean {
            match inner.read_masks(&ch, &sb).await {
                Ok(alloc) => Some(alloc),
                // Every bitmap can be rebuilt from the blobs' metadata, as
                // after an unclean stop: damage to one is no reason to
                // refuse the store.
                Err(e @ Error::Corrupt { .. }) => {
                    tracing::warn!(
                        device = %inner.dev.name(),
                        error = %e,
                        "a bitmap of a clean blobstore is damaged: rebuilding every bitmap \
                         from the blobs' metadata"
                    );
                    report.bitmap_damaged = true;
                    report.bitmaps_rebuilt = Some(format!("damaged bitmap: {e}"));
                    None
                }
                Err(e) => return Err(e),
            }
        } else {
            report.bitmaps_rebuilt = Some("the store was not unloaded cleanly".into());
            None
        };
        if let Some(alloc) = masks {
            let pages: Vec<u32> = alloc.blobids().collect();
            // Every used page in large reads, not a read per page.
            let mut map = inner.read_used_pages(&ch, &alloc).await?;
            // A blob whose metadata is damaged is reported when opened,
            // as before; it names no parent here.
            let mut blobs = Vec::with_capacity(pages.len());
            for p in pages {
                match inner.read_blob_md_from(&ch, p, &mut map).await {
                    Ok(md) => blobs.push((p, md)),
                    Err(Error::Corrupt { .. }) | Err(Error::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            if blobs.iter().all(|(_, md)| md.pending.is_none()) {
                clean = Some((alloc, blobs));
            } else {
                report.bitmaps_rebuilt = Some("a blob carries a recovery marker".into());
            }
        }
        let was_clean = clean.is_some();
        let (alloc, mut blobs, discard, finish) = match clean {
            Some((alloc, blobs)) => (alloc, blobs, Vec::new(), Vec::new()),
            None => {
                let (pages, mut map) = inner.scan_first_pages(&ch).await?;
                let mut blobs = inner.read_blobs(&ch, &pages, &mut map).await?;
                let (discard, finish) = resolve_pending(&blobs);
                blobs.retain(|(p, _)| !discard.contains(p));
                (inner.claim_all(&blobs)?, blobs, discard, finish)
            }
        };
        if was_clean {
            tracing::info!(device = %inner.dev.name(), blobs = blobs.len(), "blobstore loaded (clean)");
        } else {
            tracing::warn!(
                device = %inner.dev.name(),
                blobs = blobs.len(),
                discarded = discard.len(),
                finished = finish.len(),
                why = report.bitmaps_rebuilt.as_deref().unwrap_or(""),
                "blobstore loaded after an unclean stop or damaged bitmap: bitmaps rebuilt from every blob's \
                 metadata, blobs whose creation or deletion was cut short discarded, cut-short \
                 resizes and syncs finished"
            );
        }
        *inner.alloc.lock() = alloc;
        *inner.load_report.lock() = report;
        for (page, md) in &blobs {
            inner.link_clone(md.parent, StoreInner::blob_id(*page));
        }
        // Kept: opening a blob then reads nothing (a file system opens
        // every one at mount).
        inner.cache_loaded(std::mem::take(&mut blobs));
        let sbid = sb.super_blob;
        if sbid != 0 {
            let ok = inner
                .page_of(BlobId(sbid))
                .is_ok_and(|p| inner.alloc.lock().is_blobid(p));
            if !ok {
                return Err(Error::corrupt(
                    "super block",
                    format!("super blob {sbid:#x} does not exist"),
                ));
            }
        }
        inner.write_super(&ch, false).await?;
        // Finish what a crash interrupted: discarded blobs lose their first
        // page (nothing else of theirs is claimed), kept ones their marker.
        let zero = vec![0u8; layout.page_size as usize];
        for &p in &discard {
            inner.write_bytes(&ch, layout.md_lba(p), &zero).await?;
        }
        if !discard.is_empty() {
            ch.flush().await?;
        }
        for p in finish {
            let b = inner.load_blob_locked(&ch, StoreInner::blob_id(p)).await?;
            inner.clear_marker_locked(&ch, &b).await?;
        }
        Ok(Blobstore { inner })
    }

    /// Syncs every changed blob, writes the bitmaps and marks the store clean.
    /// The store can't be used afterwards (its handles return `Shutdown`).
    pub async fn unload(self) -> Result<()> {
        let inner = &self.inner;
        let ch = inner.chan()?;
        let _g = inner.md_lock.lock().await;
        let blobs: Vec<Arc<BlobInner>> = inner.blobs.lock().values().cloned().collect();
        for b in blobs {
            inner.sync_blob_locked(&ch, &b).await?;
        }
        if inner.needs_scan.load(Ordering::Acquire) {
            // The bitmaps would not describe what is on the device: leave
            // the super block not clean (as load wrote it) for a rebuild.
            inner.unloaded.store(true, Ordering::Release);
            return Ok(());
        }
        let l = inner.layout;
        let (pages, clusters, blobids) = inner.alloc.lock().bits();
        let mut region = format::encode_mask(MaskKind::Pages, &pages, l.page_size);
        region.extend(format::encode_mask(
            MaskKind::Clusters,
            &clusters,
            l.page_size,
        ));
        region.extend(format::encode_mask(
            MaskKind::BlobIds,
            &blobids,
            l.page_size,
        ));
        inner
            .write_bytes(&ch, l.mask_start * l.blocks_per_page(), &region)
            .await?;
        ch.flush().await?;
        inner.write_super(&ch, true).await?;
        inner.unloaded.store(true, Ordering::Release);
        Ok(())
    }

    /// Creates a blob and makes its metadata durable; returns its id.
    pub async fn create_blob(&self, opts: BlobOptions) -> Result<BlobId> {
        let inner = &self.inner;
        for (name, value) in &opts.xattrs {
            crate::blob::check_xattr(name, value)?;
        }
        let ch = inner.chan()?;
        let _g = inner.md_lock.lock().await;
        let page = {
            let mut a = inner.alloc.lock();
            let p = a
                .alloc_pages(1)
                .ok_or_else(|| Error::NoSpace(NO_MD_PAGE.into()))?[0];
            a.set_blobid(p, true);
            p
        };
        let id = StoreInner::blob_id(page);
        let blob = Arc::new(BlobInner::new(
            id,
            page,
            BlobMd::empty(opts.thin_provision, opts.xattrs.into_iter().collect()),
            0,
        ));
        let res = async {
            inner
                .resize_locked(&ch, &blob, opts.num_clusters, true)
                .await?;
            inner.sync_blob_locked(&ch, &blob).await
        }
        .await;
        if let Err(e) = res {
            // The first page may have reached the disk: take it back before
            // giving anything away, or keep the blob (its creation's outcome
            // is unknown, as after a crash) rather than reuse what it names.
            if !inner.undo_first_page(&ch, page).await {
                inner.blobs.lock().insert(id, blob);
                return Err(e);
            }
            let md = blob.md.read();
            let mut a = inner.alloc.lock();
            md.clusters
                .iter()
                .filter(|&&c| c != 0)
                .for_each(|&c| a.free_cluster(c));
            a.set_blobid(page, false);
            a.free_page(page);
            return Err(e);
        }
        inner.blobs.lock().insert(id, blob);
        Ok(id)
    }

    /// Opens a blob. Handles of one blob share its state; the blob stays
    /// open until every handle is closed or dropped.
    pub async fn open_blob(&self, id: BlobId) -> Result<Blob> {
        let inner = &self.inner;
        inner.page_of(id)?;
        if let Some(b) = inner.blobs.lock().get(&id) {
            b.handles.fetch_add(1, Ordering::AcqRel);
            return Ok(Blob::new(inner.clone(), b.clone()));
        }
        let ch = inner.chan()?;
        let _g = inner.md_lock.lock().await;
        if let Some(b) = inner.blobs.lock().get(&id) {
            b.handles.fetch_add(1, Ordering::AcqRel);
            return Ok(Blob::new(inner.clone(), b.clone()));
        }
        let b = inner.load_blob_locked(&ch, id).await?;
        b.handles.fetch_add(1, Ordering::AcqRel);
        Ok(Blob::new(inner.clone(), b))
    }

    /// Deletes a closed blob and frees its clusters and pages. A blob with
    /// open handles is [`Error::Busy`].
    pub async fn delete_blob(&self, id: BlobId) -> Result<()> {
        let inner = &self.inner;
        let page = inner.page_of(id)?;
        let ch = inner.chan()?;
        let _g = inner.md_lock.lock().await;
        if let Some(b) = inner.blobs.lock().get(&id) {
            if b.handles.load(Ordering::Acquire) > 0 {
                return Err(Error::Busy(format!("blob {id} is open")));
            }
        }
        if !inner.alloc.lock().is_blobid(page) {
            return Err(Error::NotFound(id));
        }
        let blob = inner.load_blob_locked(&ch, id).await?;
        let clones = inner.clones_of(id);
        match clones.len() {
            0 => {}
            1 => return inner.delete_into_clone_locked(&ch, &blob, clones[0]).await,
            n => {
                return Err(Error::Busy(format!(
                    "snapshot {id} has {n} clones; only a snapshot with at most one can be deleted"
                )))
            }
        }
        let md = blob.md.read().clone();
        let was_super = inner.retire_super_blob(&ch, id).await?;
        let zero = vec![0u8; inner.layout.page_size as usize];
        let zeroed = async {
            inner
                .write_bytes(&ch, inner.layout.md_lba(page), &zero)
                .await?;
            ch.flush().await
        }
        .await;
        if let Err(e) = zeroed {
            // The zeroed page may reach the media (now or with any later
            // flush) or not: keep the blob and write it again.
            inner.undo_delete_locked(&ch, &blob, was_super).await;
            return Err(e);
        }
        inner.blobs.lock().remove(&id);
        inner.unlink_clone(id, md.parent);
        let freed: Vec<u32> = md
            .clusters
            .iter()
            .chain(&md.pending_free_clusters)
            .copied()
            .filter(|&c| c != 0)
            .collect();
        inner.clear_clusters(&ch, &freed).await;
        {
            let mut a = inner.alloc.lock();
            freed.iter().for_each(|&c| a.free_cluster(c));
            md.extent_pages
                .iter()
                .chain(&md.cont_pages)
                .chain(&md.pending_free_pages)
                .filter(|&&p| p != NO_PAGE)
                .for_each(|&p| a.free_page(p));
            a.set_blobid(page, false);
            a.free_page(page);
            a.check();
        }
        Ok(())
    }

    /// Every blob in the store, in id order.
    pub fn blob_ids(&self) -> Vec<BlobId> {
        self.inner
            .alloc
            .lock()
            .blobids()
            .map(StoreInner::blob_id)
            .collect()
    }

    /// Records `id` (or none) as the super blob, durably.
    pub async fn set_super_blob(&self, id: Option<BlobId>) -> Result<()> {
        let inner = &self.inner;
        let ch = inner.chan()?;
        let _g = inner.md_lock.lock().await;
        if let Some(id) = id {
            let p = inner.page_of(id)?;
            if !inner.alloc.lock().is_blobid(p) {
                return Err(Error::NotFound(id));
            }
            // A blob whose failed delete may have zeroed its first page must
            // be on the device again before the super block names it.
            let doubtful = inner
                .blobs
                .lock()
                .get(&id)
                .filter(|b| b.first_page_doubtful.load(Ordering::Acquire))
                .cloned();
            if let Some(b) = doubtful {
                inner.sync_blob_locked(&ch, &b).await?;
            }
        }
        *inner.super_blob.lock() = id.map_or(0, |b| b.0);
        inner.write_super(&ch, false).await
    }

    /// What the load that made this store found damaged or missing and
    /// worked around: a super block read from its backup, bitmaps rebuilt.
    pub fn load_report(&self) -> LoadReport {
        self.inner.load_report.lock().clone()
    }

    /// The super blob, if one is set.
    pub fn super_blob(&self) -> Option<BlobId> {
        let v = *self.inner.super_blob.lock();
        (v != 0).then_some(BlobId(v))
    }

    /// Free clusters.
    pub fn free_clusters(&self) -> u64 {
        self.inner.alloc.lock().free_clusters()
    }

    /// All clusters, metadata clusters included.
    pub fn total_clusters(&self) -> u64 {
        self.inner.layout.total_clusters
    }

    /// Clusters that blobs can use (all but the metadata clusters).
    pub fn data_clusters(&self) -> u64 {
        self.inner.layout.total_clusters - self.inner.layout.reserved_clusters as u64
    }

    /// Free metadata pages (each blob needs at least one).
    pub fn free_md_pages(&self) -> u64 {
        self.inner.alloc.lock().free_pages()
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u32 {
        self.inner.layout.cluster_size
    }

    /// Metadata page size in bytes.
    pub fn page_size(&self) -> u32 {
        self.inner.layout.page_size
    }

    /// I/O unit (device block) size in bytes.
    pub fn io_unit_size(&self) -> u32 {
        self.inner.layout.io_unit
    }

    /// The store's type tag.
    pub fn bstype(&self) -> String {
        String::from_utf8_lossy(&self.inner.bstype)
            .trim_end_matches('\0')
            .to_string()
    }

    /// The device under the store.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.inner.dev
    }
}

impl StoreInner {
    async fn read_masks(&self, ch: &IoChannel, sb: &SuperBlock) -> Result<Allocator> {
        let l = self.layout;
        let ps = l.page_size as u64;
        let bpp = l.blocks_per_page();
        let mut start = sb.mask_start;
        let mut read = |len: u64| {
            let lba = start * bpp;
            start += len;
            self.read_bytes(ch, lba, (len * ps) as usize)
        };
        let pages = read(sb.page_mask_len).await?;
        let clusters = read(sb.cluster_mask_len).await?;
        let blobids = read(sb.blobid_mask_len).await?;
        let pages = format::decode_mask(&pages, MaskKind::Pages, sb.md_len)?;
        let mut clusters = format::decode_mask(&clusters, MaskKind::Clusters, sb.total_clusters)?;
        // A grown store has more clusters than its bitmap on disk: all free.
        clusters.resize(l.total_clusters as usize, false);
        let blobids = format::decode_mask(&blobids, MaskKind::BlobIds, sb.md_len)?;
        if clusters[..l.reserved_clusters as usize].iter().any(|b| !b) {
            return Err(Error::corrupt(
                "Clusters bitmap",
                "a metadata cluster is marked free",
            ));
        }
        if blobids.iter().zip(&pages).any(|(&b, &p)| b && !p) {
            return Err(Error::corrupt("BlobIds bitmap", "a blob id on a free page"));
        }
        Ok(Allocator::from_bits(
            &pages,
            &clusters,
            &blobids,
            l.reserved_clusters,
        ))
    }

    /// Pages in the metadata region that hold a blob's first page (the
    /// dirty-load scan), and every page that decoded, for reading the
    /// blobs without another read per page.
    async fn scan_first_pages(&self, ch: &IoChannel) -> Result<(Vec<u32>, PageMap)> {
        let mut firsts = Vec::new();
        let (found, map) = self.scan_md_pages(ch).await?;
        for (page, found) in found {
            // Writes are atomic per page, so a page that carries the
            // magic and fails its checks is damage, not a torn write:
            // report it rather than silently dropping a blob.
            if found?.is_some() {
                firsts.push(page);
            }
        }
        Ok((firsts, map))
    }

    /// Every page of the metadata region that carries the metadata magic,
    /// decoded: `Some(())` for a blob's first page (at the page its id
    /// names), `None` for another kind, an error for a page that fails its
    /// checks or a first page naming another blob. Also the pages that
    /// decoded, for the blobs' readers. The whole region is read in large
    /// reads ([`crate::mdread`]).
    pub(crate) async fn scan_md_pages(
        &self,
        ch: &IoChannel,
    ) -> Result<(Vec<(u32, Result<Option<()>>)>, PageMap)> {
        let mut out = Vec::new();
        let mut map = PageMap::default();
        let whole = [(0, self.layout.md_len as u32)];
        self.for_each_md_page(ch, &whole, |page, bytes| {
            if !format::looks_like_md_page(bytes) {
                return;
            }
            let loc = || format!("metadata page {page}");
            let found = match format::decode_md_page(bytes, "") {
                Err(Error::Corrupt { what, .. }) => Err(Error::corrupt(loc(), what)),
                Err(e) => Err(e),
                Ok(fp) => {
                    map.push(page, &fp);
                    if fp.kind != PageKind::First {
                        Ok(None)
                    } else if fp.blob_id != Self::blob_id(page).0 {
                        Err(Error::corrupt(
                            loc(),
                            format!("first page names blob {:#x}", fp.blob_id),
                        ))
                    } else {
                        Ok(Some(()))
                    }
                }
            };
            out.push((page, found));
        })
        .await?;
        Ok((out, map))
    }

    /// Every blob's metadata, as on disk, its pages from `map` where it
    /// has them.
    async fn read_blobs(
        &self,
        ch: &IoChannel,
        pages: &[u32],
        map: &mut PageMap,
    ) -> Result<Vec<(u32, BlobMd)>> {
        let mut out = Vec::with_capacity(pages.len());
        for &p in pages {
            out.push((p, self.read_blob_md_from(ch, p, map).await?));
        }
        Ok(out)
    }

    /// Puts the blobs a load read into the cache, each with its parent
    /// chain linked, so that opening one costs no device read. A blob
    /// whose chain does not resolve to blobs read here (a parent missing
    /// or unreadable, or a chain longer than the longest followed: a
    /// cycle) stays out: opening it reads it again and says why, as before.
    fn cache_loaded(&self, blobs: Vec<(u32, BlobMd)>) {
        if blobs.iter().all(|(_, md)| md.parent.is_none()) {
            // No snapshots or clones (a file system's store): no chains.
            let mut cache = self.blobs.lock();
            cache.reserve(blobs.len());
            for (p, md) in blobs {
                let id = Self::blob_id(p);
                cache.insert(id, Arc::new(BlobInner::new(id, p, md, 0)));
            }
            return;
        }
        let by_id: HashMap<BlobId, Arc<BlobInner>> = blobs
            .into_iter()
            .map(|(p, md)| {
                let id = Self::blob_id(p);
                (id, Arc::new(BlobInner::new(id, p, md, 0)))
            })
            .collect();
        // Whether each blob's chain resolves, found once per blob.
        let mut resolves: HashMap<BlobId, bool> = HashMap::with_capacity(by_id.len());
        for &start in by_id.keys() {
            let mut chain = Vec::new();
            let mut cur = start;
            let verdict = loop {
                if let Some(&v) = resolves.get(&cur) {
                    break v;
                }
                let Some(b) = by_id.get(&cur) else {
                    break false;
                };
                if chain.len() > crate::snapshot::MAX_CHAIN {
                    break false;
                }
                chain.push(cur);
                match b.md.read().parent {
                    None => break true,
                    Some(p) => cur = p,
                }
            };
            for id in chain {
                resolves.insert(id, verdict);
            }
        }
        let mut cache = self.blobs.lock();
        cache.reserve(by_id.len());
        for (id, b) in &by_id {
            if !resolves[id] {
                continue;
            }
            let parent = b.md.read().parent;
            if let Some(p) = parent {
                *b.parent.write() = Some(by_id[&p].clone());
            }
            cache.insert(*id, b.clone());
        }
    }

    /// Bitmaps rebuilt from every blob's metadata after an unclean stop.
    pub(crate) fn claim_all(&self, blobs: &[(u32, BlobMd)]) -> Result<Allocator> {
        let l = self.layout;
        let mut alloc = Allocator::new(l.md_len, l.total_clusters, l.reserved_clusters);
        for (first, md) in blobs {
            let id = Self::blob_id(*first);
            let dup = |what: String| {
                Error::corrupt(format!("blob {id}"), format!("{what} is claimed twice"))
            };
            if !alloc.claim_page(*first) {
                return Err(dup(format!("metadata page {first}")));
            }
            alloc.set_blobid(*first, true);
            for &p in md.cont_pages.iter().chain(&md.extent_pages) {
                if p != NO_PAGE && !alloc.claim_page(p) {
                    return Err(dup(format!("metadata page {p}")));
                }
            }
            for &c in md.clusters.iter().filter(|&&c| c != 0) {
                if !alloc.claim_cluster(c) {
                    return Err(dup(format!("cluster {c}")));
                }
            }
        }
        alloc.check();
        Ok(alloc)
    }
}

/// Reads the super block for a load: the primary, else (format 2 on) the
/// backup, trying each place a backup can have ([`format::backup_super_candidates`]).
/// Notes in `report` which copy served and, with a readable primary of
/// format 2, whether the backup needs the rewrite every load gives it.
/// Without a usable copy the primary's error is returned (a blank device
/// stays [`Error::NotABlobstore`]).
async fn read_super_blocks(
    dev: &Arc<dyn BlockDevice>,
    ch: &IoChannel,
    report: &mut LoadReport,
) -> Result<SuperBlock> {
    let block = dev.geometry().block_size as u64;
    let size = dev.geometry().size_bytes();
    let read_at = |off: u64| async move {
        let buf = dev.alloc_buf_for_overwrite(format::SUPER_BLOCK_LEN)?;
        ch.read(off / block, buf).await
    };
    let primary = SuperBlock::decode(&read_at(0).await?);
    match primary {
        Ok(sb) if sb.has_backup() => {
            let off = format::BACKUP_SUPER_PAGE * sb.page_size as u64;
            let backup = SuperBlock::decode_backup(&read_at(off).await?, sb.page_size);
            if let Err(e) = backup {
                tracing::warn!(
                    device = %dev.name(),
                    error = %e,
                    "the backup super block is damaged: rewriting it from the primary"
                );
                report.backup_rewritten = Some(e.to_string());
            }
            Ok(sb)
        }
        Ok(sb) => {
            tracing::info!(
                device = %dev.name(),
                version = sb.version,
                "blobstore of format version 1: it has no backup super block (loaded as before)"
            );
            report.no_backup = true;
            Ok(sb)
        }
        Err(primary_err) => {
            for (ps, off) in format::backup_super_candidates() {
                if off + format::SUPER_BLOCK_LEN as u64 > size {
                    break;
                }
                if let Ok(sb) = SuperBlock::decode_backup(&read_at(off).await?, ps) {
                    tracing::warn!(
                        device = %dev.name(),
                        error = %primary_err,
                        "the primary super block is unreadable: loaded from the backup super \
                         block; the primary is rewritten"
                    );
                    report.super_from_backup = Some(primary_err.to_string());
                    return Ok(sb);
                }
            }
            Err(primary_err)
        }
    }
}

/// What load does about the recovery markers it finds (FORMAT.md,
/// "Recovery"): the first pages of blobs to discard, and the blobs whose
/// marker only needs clearing.
fn resolve_pending(blobs: &[(u32, BlobMd)]) -> (Vec<u32>, Vec<u32>) {
    let parents: HashMap<BlobId, Option<BlobId>> = blobs
        .iter()
        .map(|(p, md)| (StoreInner::blob_id(*p), md.parent))
        .collect();
    let (mut discard, mut finish) = (Vec::new(), Vec::new());
    for (page, md) in blobs {
        let id = StoreInner::blob_id(*page);
        let gone = match md.pending {
            None => continue,
            // The snapshot counts once its origin names it as its parent.
            Some(PendingOp::Snapshot { origin }) => {
                parents.get(&BlobId(origin)).is_some_and(|&p| p != Some(id))
            }
            // The removal counts once no clone names it any more.
            Some(PendingOp::Removal) => !parents.values().any(|&p| p == Some(id)),
        };
        if gone {
            discard.push(*page);
        } else {
            finish.push(*page);
        }
    }
    (discard, finish)
}
