//! The blobstore core: everything about metadata, and the public
//! [`Blobstore`] handle. The data path ([`crate::blob`]) builds on this
//! module; nothing here depends on it.
//!
//! Where things happen:
//! - [`state`]: the store and its blobs in memory (no I/O).
//! - [`txn`]: the metadata transaction, [`txn::MdTxn`], which proves the
//!   store's metadata lock is held; every metadata change is one of its
//!   methods.
//! - [`sync`]: a blob's metadata sync: the plan (pure), its write, and its
//!   adoption.
//! - [`blobs`]: create, load, delete, the super blob.
//! - [`snapshot`]: snapshots and clones, multi-blob transactions.
//! - [`read`] and [`mdread`]: reading one blob's metadata, and the
//!   metadata region in bulk.
//! - [`init`] and [`load`]: formatting and the clean unload; load and
//!   recovery.
//! - [`alloc`]: the page, cluster and blob-id bitmaps.
//! - [`units`]: device cluster numbers as a type.
//! - [`io`]: the store's own device I/O (super block, clusters).
//! - [`check`], [`repair`], [`trim`]: verifying, repairing and trimming a
//!   loaded store.
//!
//! Invariants (each module lists its own):
//! - Metadata operations run one at a time per store, each inside one
//!   [`txn::MdTxn`]; the data path takes none for allocated clusters.
//! - A blob's metadata on disk changes atomically (FORMAT.md, "Metadata
//!   sync"), and nothing it gave up is reused before that change is durable.
//! - A cluster handed to a blob reads as zeroes until the blob writes it.

mod alloc;
mod blobs;
pub(crate) mod check;
mod init;
mod io;
mod load;
mod mdread;
mod read;
pub(crate) mod repair;
pub(crate) mod snapshot;
pub(crate) mod state;
mod sync;
pub(crate) mod trim;
pub(crate) mod txn;
pub(crate) mod units;

use std::sync::Arc;

use crate::device::{device_metrics, BlockDevice, DeviceMetrics};
use crate::metrics::OpStats;
use crate::BlobId;
use state::StoreInner;

pub(crate) use sync::NO_DATA;

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
    /// with [`Error::DeviceNotBlank`](crate::Error::DeviceNotBlank) naming what it found.
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

/// A blobstore's figures so far ([`Blobstore::metrics`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoreMetrics {
    /// Metadata syncs (every
    /// [`Blob::sync_metadata`](crate::Blob::sync_metadata) and its
    /// variants, and the store's own), with their latency; bytes are 0.
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

impl Blobstore {
    /// Metadata syncs and device I/O so far (see [`crate::metrics`]).
    pub fn metrics(&self) -> StoreMetrics {
        StoreMetrics {
            metadata_syncs: OpStats::fold(&self.inner.md_syncs.all(), |c| c),
            device: device_metrics(self.inner.dev_id),
        }
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

    /// The clones of snapshot `id` (empty for a blob with none).
    pub fn clones(&self, id: BlobId) -> Vec<BlobId> {
        self.inner.clones_of(id)
    }

    /// Sets what happens to clusters blobs give up (on delete and shrink).
    /// Not persistent; the default is [`ClearMethod::None`].
    pub fn set_clear_method(&self, method: ClearMethod) {
        *self.inner.clear_method.lock() = method;
    }
}
