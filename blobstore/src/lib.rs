//! An asynchronous, cluster-allocated blobstore on a polled block-device
//! layer, in the line of SPDK's blobstore.
//!
//! Layers, bottom up:
//! - [`device`]: [`BlockDevice`] with per-thread [`IoChannel`]s completed by
//!   polling, and the devices ([`MemDevice`], [`FileDevice`]).
//! - [`exec`] and [`reactor`]: running futures, on any thread with
//!   [`block_on`] or on pinned per-core reactors.
//! - The blobstore itself: [`Blobstore`] and [`Blob`].
//! - [`util`]: the one size grammar and seeded generator the workspace uses.
#![deny(missing_docs)]

mod alloc;
mod blob;
mod check;
pub mod device;
mod error;
pub mod exec;
pub mod format;
mod mdread;
pub mod metrics;
pub mod probe;
pub mod reactor;
mod repair;
mod snapshot;
mod store;
mod trim;
pub mod util;

pub use blob::{Blob, BlobIo, Xattrs};
pub use check::CheckReport;
pub use device::fault::{CrashImage, FaultDevice};
pub use device::IoKind;
pub use device::{
    channel, device_metrics, open_device, BlockDevice, DeviceMetrics, DeviceSpec, DmaBuf,
    FileDevice, FileOptions, Geometry, IoChannel, MemDevice,
};
#[cfg(feature = "nvme")]
pub use device::{
    ControllerOptions, NvmeController, NvmeDevice, NvmeTcpController, NvmeTcpDevice, TcpOptions,
};
pub use error::{Error, NvmeStatus, Result};
pub use exec::{block_on, block_on_deadline};
pub use probe::Signature;
pub use repair::{DroppedBlob, RepairReport};
pub use store::{
    BlobOptions, Blobstore, BlobstoreOptions, ClearMethod, LoadOptions, LoadReport, StoreMetrics,
};
pub use trim::TrimReport;

/// Identifies a blob within its blobstore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub u64);

impl std::fmt::Display for BlobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}
