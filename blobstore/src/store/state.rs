//! The store's state in memory: its geometry ([`Layout`]), every loaded
//! blob's metadata ([`BlobMd`] inside a [`BlobInner`]) and the store itself
//! ([`StoreInner`]). No I/O happens here.
//!
//! Invariants:
//! - A blob's id and its first metadata page name each other
//!   ([`StoreInner::blob_id`], [`StoreInner::page_of`]).
//! - `BlobMd::clusters` has exactly `num_clusters` entries and
//!   `extent_pages` one per started run of `extent_per_page` of them; while
//!   `map_inline`, no extent page holds the map on disk.
//! - `version == synced_version` and no pending frees and no dirty extent
//!   page mean the metadata on disk is what memory holds.
//! - The fields of [`StoreInner`] are the store's own: only the `store`
//!   modules touch them, and the ones that change metadata do so through a
//!   metadata transaction ([`super::txn::MdTxn`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::alloc::Allocator;
use super::units::{ClusterIdx, PageIdx};
use super::{ClearMethod, LoadReport};
use crate::device::{channel_with_id, BlockDevice, DeviceId, Geometry, IoChannel, Lba};
use crate::error::{Error, Result};
use crate::format::{self, PendingOp, SuperBlock, MAX_XATTR_NAME_LEN, MAX_XATTR_VALUE_LEN};
use crate::metrics::{OpCounter, Shards};
use crate::BlobId;

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
    pub fn md_lba(&self, p: PageIdx) -> Lba {
        Lba((self.md_start + p.get() as u64) * self.blocks_per_page())
    }
    /// Device block of the start of cluster `c`.
    pub fn cluster_lba(&self, c: ClusterIdx) -> Lba {
        Lba(c.get() as u64 * self.units_per_cluster())
    }
    /// True when blobs may keep their cluster map inline (format 3 on).
    pub fn inline_map(&self) -> bool {
        self.version >= format::INLINE_MAP_VERSION
    }
    pub fn from_super(sb: &SuperBlock) -> Layout {
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
    /// Device cluster of each blob cluster; `None` = not allocated (0 on
    /// disk).
    pub clusters: Vec<Option<ClusterIdx>>,
    /// Metadata page of each extent page (`None` if none on disk). All
    /// `None` while `map_inline`.
    pub extent_pages: Vec<Option<PageIdx>>,
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
    pub cont_pages: Vec<PageIdx>,
    pub sequence: u32,
    /// Bumped by every in-memory change; compared with `synced_version`.
    pub version: u64,
    pub synced_version: u64,
    pub pending_free_clusters: Vec<ClusterIdx>,
    pub pending_free_pages: Vec<PageIdx>,
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

    /// Asserts (debug builds) the shape invariants of this module's header,
    /// with `per` cluster entries per extent page. Called where a change to
    /// the map ends.
    pub fn debug_check(&self, per: usize) {
        debug_assert_eq!(self.clusters.len() as u64, self.num_clusters);
        debug_assert_eq!(self.extent_pages.len(), self.clusters.len().div_ceil(per));
        debug_assert!(!self.map_inline || self.extent_pages.iter().all(Option::is_none));
        debug_assert!(self
            .dirty_extents
            .iter()
            .all(|&k| k < self.extent_pages.len()));
        debug_assert!(self.synced_version <= self.version);
    }
}

pub(crate) struct BlobInner {
    pub id: BlobId,
    pub page: PageIdx,
    pub md: RwLock<BlobMd>,
    pub handles: AtomicUsize,
    /// The loaded parent (`md.parent`), so reads resolve without I/O.
    pub parent: RwLock<Option<Arc<BlobInner>>>,
    /// A delete of this blob failed once its first page may have been
    /// zeroed on the device; the next successful sync, which writes that
    /// page again, clears it (see [`super::txn::MdTxn::undo_delete`]).
    pub first_page_doubtful: AtomicBool,
}

impl BlobInner {
    pub fn new(id: BlobId, page: PageIdx, md: BlobMd, handles: usize) -> BlobInner {
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

/// A loaded store: the device, its geometry, the allocator and the cache
/// of loaded blobs.
pub(crate) struct StoreInner {
    pub(super) dev: Arc<dyn BlockDevice>,
    /// `dev.id()`, kept so the data path's channel lookup makes no
    /// virtual call.
    pub(super) dev_id: DeviceId,
    pub(super) geo: Geometry,
    pub(super) layout: Layout,
    pub(super) bstype: [u8; format::BSTYPE_LEN],
    pub(super) alloc: Mutex<Allocator>,
    /// Held by every metadata change; taken only by [`StoreInner::begin`],
    /// which hands out the proof ([`super::txn::MdTxn`]).
    pub(super) md_lock: futures::lock::Mutex<()>,
    pub(super) blobs: Mutex<HashMap<BlobId, Arc<BlobInner>>>,
    pub(super) super_blob: Mutex<u64>,
    pub(super) unloaded: AtomicBool,
    /// Set when a failed operation may have left metadata on the device
    /// that the bitmaps in memory do not describe (a snapshot dropped from
    /// memory whose first page could not be zeroed): unload then leaves the
    /// super block not clean, so the next load rebuilds the bitmaps from a
    /// scan and finishes the operation (FORMAT.md, "Recovery").
    pub(super) needs_scan: AtomicBool,
    /// Clones of each snapshot (built at load from every blob's parent).
    pub(super) clones: Mutex<HashMap<BlobId, BTreeSet<BlobId>>>,
    /// What happens to clusters a blob gives up.
    pub(super) clear_method: Mutex<ClearMethod>,
    /// Metadata syncs, per thread.
    pub(super) md_syncs: Shards<OpCounter>,
    /// What the load that made this store found and repaired.
    pub(super) load_report: Mutex<LoadReport>,
}

/// Why a new blob cannot be made when the metadata region is full, and
/// how to get more (the count is fixed when the store is formatted).
pub(crate) const NO_MD_PAGE: &str = "no metadata page left for a new blob: every metadata page \
     is in use (their number is set at format time: BlobstoreOptions::md_pages, \
     `blobfs mkfs --max-files N`)";

/// [`NO_MD_PAGE`]'s explanation, for a sync that needs more pages.
pub(super) const MD_FULL: &str =
    "every metadata page is in use (their number is set at format time: \
     BlobstoreOptions::md_pages, `blobfs mkfs --max-files N`)";

const BLOB_ID_BASE: u64 = 1 << 32;

impl StoreInner {
    /// A store in memory, before anything is read or written: nothing
    /// allocated but the metadata clusters, no blob cached.
    pub fn new(
        dev: Arc<dyn BlockDevice>,
        layout: Layout,
        bstype: [u8; format::BSTYPE_LEN],
        super_blob: u64,
    ) -> StoreInner {
        StoreInner {
            md_syncs: Shards::new(),
            dev_id: dev.id(),
            geo: dev.geometry(),
            layout,
            bstype,
            alloc: Mutex::new(Allocator::new(
                layout.md_len,
                layout.total_clusters,
                layout.reserved_clusters,
            )),
            md_lock: futures::lock::Mutex::new(()),
            blobs: Mutex::new(HashMap::new()),
            super_blob: Mutex::new(super_blob),
            unloaded: AtomicBool::new(false),
            needs_scan: AtomicBool::new(false),
            clones: Mutex::new(HashMap::new()),
            clear_method: Mutex::new(ClearMethod::None),
            load_report: Mutex::new(LoadReport::default()),
            dev,
        }
    }

    /// This thread's channel to the device; [`Error::Shutdown`] once the
    /// store is unloaded.
    #[inline]
    pub fn chan(&self) -> Result<IoChannel> {
        if self.unloaded.load(Ordering::Acquire) {
            return Err(Error::Shutdown("the blobstore was unloaded".into()));
        }
        channel_with_id(&self.dev, self.dev_id)
    }

    /// The id of the blob whose first page is `page`.
    pub fn blob_id(page: PageIdx) -> BlobId {
        BlobId(BLOB_ID_BASE | page.get() as u64)
    }

    /// The first page of blob `id`; [`Error::NotFound`] for an id no
    /// page of this store can have.
    pub fn page_of(&self, id: BlobId) -> Result<PageIdx> {
        let page = id.0.wrapping_sub(BLOB_ID_BASE);
        if id.0 < BLOB_ID_BASE || page >= self.layout.md_len {
            return Err(Error::NotFound(id));
        }
        Ok(PageIdx::at(page as usize))
    }

    /// The loaded blob `id` with one more open handle, if the cache has
    /// it (counted under the cache's lock, as a delete checks it).
    pub fn open_cached(&self, id: BlobId) -> Option<Arc<BlobInner>> {
        let blobs = self.blobs.lock();
        let b = blobs.get(&id)?;
        b.handles.fetch_add(1, Ordering::AcqRel);
        Some(b.clone())
    }

    /// The device under the store.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// The store's geometry.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The device's geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }
}

/// Checks an xattr name and value against the format's limits.
pub(crate) fn check_xattr(name: &str, value: &[u8]) -> Result<()> {
    if name.is_empty() || name.len() > MAX_XATTR_NAME_LEN {
        return Err(Error::InvalidArgument(format!(
            "xattr name {name:?}: must be 1 to {MAX_XATTR_NAME_LEN} bytes"
        )));
    }
    if value.len() > MAX_XATTR_VALUE_LEN {
        return Err(Error::InvalidArgument(format!(
            "xattr {name:?}: value of {} bytes exceeds {MAX_XATTR_VALUE_LEN}",
            value.len()
        )));
    }
    Ok(())
}
