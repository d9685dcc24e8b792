//! The device layer: a small block-device interface with per-thread,
//! polled I/O channels.
//!
//! Invariants:
//! - A channel belongs to the thread that created it ([`IoChannel`] is not
//!   `Send`); the channel's queue, trackers and counters are the thread's
//!   own, so submitting and completing take no lock of the device layer
//!   shared with other threads. A backend's medium may arbitrate inside:
//!   `MemDevice` copies under a per-MiB-chunk `RwLock` (readers share it,
//!   a writer of that chunk excludes them), as a drive arbitrates
//!   internally; io_uring and NVMe queues take none.
//! - An operation's buffers stay alive until the device completes it, even if
//!   the future waiting for it is dropped.
//! - Every operation is checked against the geometry before it reaches a
//!   backend: block-multiple lengths, nothing past the last block.
//! - Completion happens only when the owning thread polls the channel
//!   ([`IoChannel::poll`], or any pending [`IoFuture`] being polled).
//!
//! Layout: this file holds the device layer's types ([`Geometry`],
//! [`DeviceId`], [`IoKind`], [`Lba`], [`IoOp`]) and its two traits
//! ([`BlockDevice`], [`ChannelBackend`]); `channel` holds [`IoChannel`] and
//! [`IoFuture`] (slots, submission, completion); `registry` the calling
//! thread's channels ([`channel()`], [`poll_thread_channels`],
//! [`wait_thread_channels`]); `metrics` the I/O counters
//! ([`device_metrics`]); `unsynced_path` where unsynced memory lives
//! ([`unsynced_memory_path`]); `dma` the buffers; `spec` the device specs
//! ([`open_device`]); `file`, `mem` and `nvme` the devices; `lock` the file
//! locks.

mod channel;
mod dma;
mod file;
mod lock;
mod mem;
mod metrics;
#[cfg(feature = "nvme")]
pub mod nvme;
mod registry;
mod spec;
mod unsynced_path;

pub use channel::{thread_in_flight, IoChannel, IoFuture};
pub use dma::{DmaBuf, DmaMapping, DmaRelease, Iova, Segment, Segments, DMA_ALIGN};
pub use file::{FileDevice, FileOptions};
pub use lock::{wait_unlocked, FileLock};
pub use mem::{MemDevice, ShmOptions};
pub use metrics::{device_metrics, DeviceMetrics, DeviceShard};
#[cfg(feature = "nvme")]
pub use nvme::tcp::{NvmeTcpController, NvmeTcpDevice, TcpOptions};
#[cfg(feature = "nvme")]
pub use nvme::{ControllerOptions, NvmeController, NvmeDevice};
pub(crate) use registry::channel_with_id;
pub use registry::{channel, poll_thread_channels, wait_thread_channels};
pub use spec::{open_device, DeviceSpec, PciAddress, TcpDigest};
pub use unsynced_path::{
    huge_unsynced_dir, unsynced_dir, unsynced_memory_path, unsynced_memory_path_of,
    UNSYNCED_DIR_ENV,
};

use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Shape of a block device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per block (the I/O unit): 512 or 4096.
    pub block_size: u32,
    /// Number of blocks.
    pub block_count: u64,
    /// Largest single transfer the device takes, in bytes (advisory: the
    /// device layer splits larger operations itself).
    pub max_transfer_bytes: u32,
    /// True when an unmapped range is guaranteed to read back as zeroes.
    pub unmap_reads_zeroes: bool,
}

impl Geometry {
    /// Device size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.block_count * self.block_size as u64
    }
}

/// Unique identity of one device instance (keys the per-thread channel cache).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DeviceId(u64);

impl DeviceId {
    /// A fresh id, never handed out before in this process.
    pub fn fresh() -> DeviceId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        DeviceId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// What an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    /// Read blocks into the segments.
    Read,
    /// Write the segments to blocks.
    Write,
    /// Make every completed write durable.
    Flush,
    /// Deallocate blocks.
    Unmap,
    /// Set blocks to zero.
    WriteZeroes,
}

impl IoKind {
    /// Lower-case name, for errors.
    pub fn name(self) -> &'static str {
        match self {
            IoKind::Read => "read",
            IoKind::Write => "write",
            IoKind::Flush => "flush",
            IoKind::Unmap => "unmap",
            IoKind::WriteZeroes => "write_zeroes",
        }
    }
}

/// A device block address: a block number, in the device's blocks
/// ([`Geometry::block_size`] bytes each). Blob offsets (io units) and
/// byte offsets are other units; a store turns its clusters and metadata
/// pages into one of these where it calls the device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lba(pub u64);

impl Lba {
    /// The block number.
    #[inline]
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The block `blocks` blocks further on (wrapping on overflow, which
    /// the channel's range check then refuses).
    #[inline]
    pub const fn plus(self, blocks: u64) -> Lba {
        Lba(self.0.wrapping_add(blocks))
    }
}

impl std::fmt::Display for Lba {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// One operation as a backend sees it.
pub struct IoOp {
    /// What to do.
    pub kind: IoKind,
    /// First block.
    pub lba: Lba,
    /// Number of blocks (0 for flush).
    pub blocks: u64,
    /// Memory for reads and writes, in order; their lengths add up to
    /// `blocks * block_size`. Empty for the other kinds.
    pub segs: Segments,
}

impl IoOp {
    /// A device error for this operation.
    pub fn error(&self, reason: impl Into<String>) -> Error {
        Error::Io {
            op: self.kind.name(),
            lba: self.lba.get(),
            blocks: self.blocks,
            reason: reason.into(),
        }
    }
}

/// Identifies one in-flight operation within its channel.
pub type Tag = u32;

/// The per-thread engine of a device: a queue pair, an io_uring, or plain
/// memory copies. Implemented by each device; driven by [`IoChannel`].
pub trait ChannelBackend {
    /// Starts `op`. The op's segments stay valid until `reap` reports `tag`.
    /// An `Err` here means the op was not started.
    fn submit(&mut self, tag: Tag, op: &IoOp) -> Result<()>;
    /// Reports completed operations through `done`; returns how many. Never
    /// blocks.
    fn reap(&mut self, done: &mut dyn FnMut(Tag, Result<()>)) -> usize;
    /// Blocks the thread until at least one operation of this backend has
    /// completed (so the next [`ChannelBackend::reap`] reports something),
    /// or returns at once when nothing is in flight. Returns false when the
    /// backend cannot block (the default): the caller must keep polling.
    fn wait(&mut self) -> bool {
        false
    }
}

/// A block device: geometry, buffers, and per-thread channels.
pub trait BlockDevice: Send + Sync + 'static {
    /// The device's shape.
    fn geometry(&self) -> Geometry;
    /// This instance's identity.
    fn id(&self) -> DeviceId;
    /// A human-readable name (its spec).
    fn name(&self) -> String;
    /// Creates a new channel engine for the calling thread. Called once per
    /// thread by [`channel`]; use that instead.
    fn new_backend(&self) -> Result<Box<dyn ChannelBackend>>;
    /// Allocates a DMA-able buffer for this device.
    fn alloc_buf(&self, len_bytes: usize) -> Result<DmaBuf> {
        DmaBuf::new(len_bytes)
    }
    /// As [`BlockDevice::alloc_buf`], for a buffer the caller overwrites
    /// whole (a read target): it need not be zeroed, and on devices with
    /// their own DMA memory it is not (its bytes are stale data of this
    /// process). The default zeroes.
    fn alloc_buf_for_overwrite(&self, len_bytes: usize) -> Result<DmaBuf> {
        self.alloc_buf(len_bytes)
    }
    /// True when reads can land in any memory of this process, aligned to
    /// the block size (io_uring, RAM copies): [`crate::Blob::read_into`]
    /// then reads straight into its caller's buffer. False (the default)
    /// for devices that need their own DMA memory (NVMe through VFIO) and
    /// for wrappers that do not say.
    fn reads_into_any_memory(&self) -> bool {
        false
    }
    /// True when the device's blocks survive exactly what its unsynced
    /// memory ([`BlockDevice::unsynced_memory`]) survives: memory is the
    /// medium and lives beside it (`shm:`: both tmpfs files, kept across a
    /// killed process, lost with the machine, and a flush only orders; see
    /// [`MemDevice`]). A sync then has nothing to make more durable:
    /// BlobFS's syncs write nothing, as tmpfs's fsync. False (the default)
    /// for devices with a persistent medium, for devices that play power
    /// cuts, for a heap `mem:` device (its blocks can outlive a mount), and
    /// for wrappers that do not say.
    fn volatile(&self) -> bool {
        false
    }
    /// Where the device's owner keeps what it wrote and has not synced yet,
    /// in memory that outlives the owning process but not the machine (a
    /// file on tmpfs, see [`unsynced_memory_path`]), as the kernel's page
    /// cache does for a file: the next owner after a crash of the process
    /// finds it there. `None` (the default) for devices whose blocks die
    /// with the process (RAM) or that play a power cut (which loses that
    /// memory too): their owners keep such data in plain memory.
    fn unsynced_memory(&self) -> Option<PathBuf> {
        None
    }
    /// Makes `len` bytes at `ptr`, memory its caller owns (a slot of the
    /// [`BlockDevice::unsynced_memory`] mapping, say), reachable by the
    /// device without a copy for as long as the returned mapping lives:
    /// buffers over it made with [`DmaBuf::from_external`] and the mapping's
    /// IOVA go to the device as they are. `Ok(None)` (the default): the
    /// device reaches any memory (io_uring, RAM), or copies through its own
    /// buffers.
    ///
    /// # Safety
    /// The memory must stay mapped, and keep the same pages behind it (no
    /// hole punched, no `munmap`), until the mapping is dropped; the
    /// mapping must be dropped before then.
    unsafe fn map_dma(&self, ptr: NonNull<u8>, len: usize) -> Result<Option<DmaMapping>> {
        let _ = (ptr, len);
        Ok(None)
    }
}

/// The checks and the clean-up that `file:` and `shm:` share around opening
/// a path that may be created: a given size must be positive, `create=true`
/// needs a size, a file is created only with a size and without
/// `create=false`, and a file this call created is removed again if the
/// open fails (no device ever used it). `open` gets whether it may create.
fn open_maybe_creating<T>(
    kind: &str,
    path: &std::path::Path,
    size_bytes: Option<u64>,
    create: Option<bool>,
    open: impl FnOnce(bool) -> Result<T>,
) -> Result<T> {
    let shown = path.display();
    if size_bytes == Some(0) {
        return Err(Error::InvalidArgument(format!(
            "{kind} {shown}: size must be positive"
        )));
    }
    if create == Some(true) && size_bytes.is_none() {
        return Err(Error::InvalidArgument(format!(
            "{kind} {shown}: create needs a size"
        )));
    }
    let may_create = size_bytes.is_some() && create != Some(false);
    let existed = path.symlink_metadata().is_ok();
    let result = open(may_create);
    if result.is_err() && may_create && !existed {
        let _ = std::fs::remove_file(path);
    }
    result
}
