//! An asynchronous, cluster-allocated blobstore on a polled block-device
//! layer, in the line of SPDK's blobstore.
//!
//! Layers, bottom up:
//! - [`device`]: [`BlockDevice`] with per-thread [`IoChannel`]s completed by
//!   polling, and the devices ([`MemDevice`], [`FileDevice`]).
//! - [`exec`] and [`reactor`]: running futures, on any thread with
//!   [`block_on`] or on pinned per-core reactors.
//! - The blobstore itself: [`Blobstore`] (the `store` module tree: every
//!   metadata concern, around one metadata transaction at a time) and the
//!   data path, [`Blob`], built on it.
//! - [`util`]: the one size grammar and seeded generator the workspace uses.
//! - `testing` (cargo feature `testing` only): fault injection and crash
//!   images for tests, out of production builds.
#![deny(missing_docs)]

mod blob;
pub mod device;
mod error;
pub mod exec;
mod format;
pub mod metrics;
pub mod probe;
pub mod reactor;
mod store;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod util;

/// Cluster entries one metadata page of a blob's cluster map holds, with
/// metadata pages of `page_size` bytes: a blob whose map does not fit in
/// its first page takes one more page per this many clusters.
pub fn cluster_map_entries_per_page(page_size: u32) -> usize {
    format::extent_entries_per_page(page_size)
}

/// The on-disk codecs and the NVMe/TCP PDU codec, for the fuzz targets and
/// the tests that forge or damage images. Not an API: it changes with the
/// formats (see `FORMAT.md` for the layouts themselves).
#[doc(hidden)]
pub mod fuzzing {
    #[cfg(feature = "nvme")]
    pub use crate::device::nvme::tcp::pdu::{encode_pdu, parse_header, parse_pdu, plan, Framing};
    pub use crate::format::{
        decode_extent_payload, decode_md_page, encode_md_page, BlobRecord, PageKind, SuperBlock,
        MAX_XATTR_NAME_LEN, MAX_XATTR_VALUE_LEN, NO_PAGE, SUPER_BLOCK_LEN, SUPER_MAGIC,
    };
}

pub use blob::{Blob, BlobIo, Xattrs};
pub use device::IoKind;
pub use device::{
    channel, device_metrics, open_device, BlockDevice, DeviceMetrics, DeviceSpec, DmaBuf,
    FileDevice, FileOptions, Geometry, IoChannel, Lba, MemDevice,
};
#[cfg(feature = "nvme")]
pub use device::{
    ControllerOptions, NvmeController, NvmeDevice, NvmeTcpController, NvmeTcpDevice, TcpOptions,
};
pub use error::{Error, NvmeStatus, Result};
pub use exec::{block_on, block_on_deadline};
pub use probe::Signature;
pub use store::check::CheckReport;
pub use store::repair::{DroppedBlob, RepairReport};
pub use store::trim::TrimReport;
pub use store::{
    BlobOptions, Blobstore, BlobstoreOptions, ClearMethod, LoadOptions, LoadReport, StoreMetrics,
};

/// Identifies a blob within its blobstore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub u64);

impl std::fmt::Display for BlobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}
