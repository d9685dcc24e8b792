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

mod dma;
mod file;
mod lock;
mod mem;
#[cfg(feature = "nvme")]
pub mod nvme;
mod spec;

pub use dma::{DmaBuf, DmaMapping, DmaRelease, Iova, Segment, Segments, DMA_ALIGN};
pub use file::{FileDevice, FileOptions};
pub use lock::{wait_unlocked, FileLock};
pub use mem::{MemDevice, ShmOptions};
#[cfg(feature = "nvme")]
pub use nvme::tcp::{NvmeTcpController, NvmeTcpDevice, TcpOptions};
#[cfg(feature = "nvme")]
pub use nvme::{ControllerOptions, NvmeController, NvmeDevice};
pub use spec::{open_device, DeviceSpec, PciAddress, TcpDigest};

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};

use crate::error::{Error, Result};
use crate::metrics::{OpCounter, OpStats, Shards, Stamp};

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

/// Environment variable naming the directory of unsynced memory files
/// (default `/dev/shm`). It must be a tmpfs: memory that a reboot clears.
pub const UNSYNCED_DIR_ENV: &str = "BLOBSTACK_UNSYNCED_DIR";

/// The unsynced-memory file of the device whose backing file or device
/// node has metadata `meta` (see [`BlockDevice::unsynced_memory`]): named
/// by the file's device and inode numbers, which are stable for as long as
/// the machine runs and the file exists, and which a second open of the
/// same file (under any path) finds again.
pub fn unsynced_memory_path(meta: &std::fs::Metadata) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    unsynced_dir().join(format!(
        "blobstack-{:x}-{:x}.unsynced",
        meta.dev(),
        meta.ino()
    ))
}

/// The directory of unsynced memory files ([`UNSYNCED_DIR_ENV`]).
pub fn unsynced_dir() -> PathBuf {
    std::env::var_os(UNSYNCED_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm"))
}

/// The hugetlbfs mount (of 2 MiB pages) that unsynced memory of NVMe
/// devices goes to, which makes it hugepage DMA memory as the driver's own
/// buffers are: `None` when [`UNSYNCED_DIR_ENV`] is set (it wins), when no
/// hugepages are reserved (`/proc/sys/vm/nr_hugepages`), or when no
/// hugetlbfs of 2 MiB pages is mounted (`nvme-setup hugepages` mounts one
/// at `/dev/hugepages`). Stable across a process restart as long as the
/// reservation and the mount stay, which is what lets the next owner find
/// a dead one's memory.
pub fn huge_unsynced_dir() -> Option<PathBuf> {
    if std::env::var_os(UNSYNCED_DIR_ENV).is_some() {
        return None;
    }
    let reserved = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0);
    if !reserved {
        return None;
    }
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    hugetlbfs_2m_mount(&mounts)
}

/// The first hugetlbfs mount of 2 MiB pages in a `/proc/mounts` text.
fn hugetlbfs_2m_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (dir, fstype, opts) = (f.get(1)?, f.get(2)?, f.get(3)?);
        let two_mib = opts
            .split(',')
            .find_map(|o| o.strip_prefix("pagesize="))
            .is_none_or(|p| p == "2M" || p == "2048k");
        (*fstype == "hugetlbfs" && two_mib).then(|| PathBuf::from(dir.replace("\\040", " ")))
    })
}

/// [`unsynced_memory_path`] of the file at `path`.
pub fn unsynced_memory_path_of(path: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(path).map_err(|e| Error::Os {
        context: format!("stat of {}", path.display()),
        source: e,
    })?;
    Ok(unsynced_memory_path(&meta))
}

/// A thread's channels, with a weak link to each device so channels of
/// dropped devices can be closed. A thread talks to a handful of devices, so
/// a linear scan beats hashing; the channel list is shared as one `Rc` so
/// polling every channel allocates nothing. Const-initialised (no lazy
/// state to test on every access of the data path's lookup).
struct ChannelMap {
    ids: Vec<(DeviceId, Weak<dyn BlockDevice>)>,
    /// `None` until the thread's first channel; then one per `ids` entry.
    chans: Option<Rc<[IoChannel]>>,
}

thread_local! {
    static CHANNELS: RefCell<ChannelMap> = const {
        RefCell::new(ChannelMap {
            ids: Vec::new(),
            chans: None,
        })
    };
    static IN_FLIGHT: Cell<usize> = const { Cell::new(0) };
}

/// Operations submitted on this thread's channels that have not completed.
/// Executors use it to decide between spinning (I/O is pending and only
/// polling completes it) and sleeping.
pub fn thread_in_flight() -> usize {
    IN_FLIGHT.with(|c| c.get())
}

/// The calling thread's channel for `dev`, created on first use.
pub fn channel(dev: &Arc<dyn BlockDevice>) -> Result<IoChannel> {
    channel_with_id(dev, dev.id())
}

/// [`channel`] for a caller that knows `dev`'s id (`id == dev.id()`), as
/// the blob data path does: no virtual call on the way, and (inlined) no
/// `Result` to build when the thread has the channel already.
#[inline]
pub(crate) fn channel_with_id(dev: &Arc<dyn BlockDevice>, id: DeviceId) -> Result<IoChannel> {
    debug_assert_eq!(id, dev.id());
    match thread_channel(id) {
        Some(ch) => Ok(ch),
        None => new_channel(dev, id),
    }
}

/// The calling thread's channel to the device `id`, if it has one.
#[inline]
fn thread_channel(id: DeviceId) -> Option<IoChannel> {
    CHANNELS.with(|m| {
        let m = m.borrow();
        let k = m.ids.iter().position(|(i, _)| *i == id)?;
        m.chans.as_ref()?.get(k).cloned()
    })
}

#[cold]
fn new_channel(dev: &Arc<dyn BlockDevice>, id: DeviceId) -> Result<IoChannel> {
    let backend = dev.new_backend()?;
    let metrics = device_shards(dev, id).add();
    let ch = IoChannel::new(dev.geometry(), dev.name(), backend, metrics);
    CHANNELS.with(|m| {
        let mut guard = m.borrow_mut();
        let m = &mut *guard;
        // Drop channels of devices that are gone, so their fds and rings close.
        let mut ids = Vec::new();
        let mut chans = Vec::new();
        let old = m.chans.take();
        let old = old.as_deref().unwrap_or_default();
        for ((i, w), c) in m.ids.drain(..).zip(old.iter()) {
            if w.strong_count() > 0 || c.in_flight() > 0 {
                ids.push((i, w));
                chans.push(c.clone());
            }
        }
        ids.push((id, Arc::downgrade(dev)));
        chans.push(ch.clone());
        m.ids = ids;
        m.chans = Some(Rc::from(chans));
    });
    Ok(ch)
}

/// The thread's channels (a shared list: cloning it allocates nothing).
fn thread_channels() -> Option<Rc<[IoChannel]>> {
    CHANNELS.with(|m| m.borrow().chans.clone())
}

/// Drives every channel of this thread once; returns completions seen.
pub fn poll_thread_channels() -> usize {
    thread_channels().map_or(0, |chans| chans.iter().map(|c| c.poll()).sum())
}

/// Blocks until an operation of this thread completes, when that can be
/// done without missing anything: exactly one channel of the thread has
/// operations in flight and its backend can block. Returns false (at once)
/// otherwise; the caller then keeps polling.
pub fn wait_thread_channels() -> bool {
    let Some(chans) = thread_channels() else {
        return false;
    };
    let mut busy = chans.iter().filter(|c| c.in_flight() > 0);
    match (busy.next(), busy.next()) {
        (Some(c), None) => c.wait(),
        _ => false,
    }
}

/// One channel's device I/O counters, by [`IoKind`].
#[derive(Default)]
pub struct DeviceShard {
    ops: [OpCounter; 5],
}

impl DeviceShard {
    fn op(&self, kind: IoKind) -> &OpCounter {
        &self.ops[kind as usize]
    }
}

/// A device's I/O, folded over every thread's channel to it: count, bytes,
/// errors and latency (submission to completion seen by a poll) by kind.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceMetrics {
    /// Reads.
    pub reads: OpStats,
    /// Writes.
    pub writes: OpStats,
    /// Flushes.
    pub flushes: OpStats,
    /// Deallocations.
    pub unmaps: OpStats,
    /// Writes of zeroes.
    pub write_zeroes: OpStats,
}

/// The counters of each open device (dropped with the device).
type DeviceShardList = Vec<(DeviceId, Weak<dyn BlockDevice>, Arc<Shards<DeviceShard>>)>;

static DEVICE_SHARDS: parking_lot::Mutex<DeviceShardList> = parking_lot::Mutex::new(Vec::new());

/// The counters of `dev` (whose id is `id`), created on first use.
fn device_shards(dev: &Arc<dyn BlockDevice>, id: DeviceId) -> Arc<Shards<DeviceShard>> {
    let mut all = DEVICE_SHARDS.lock();
    all.retain(|(_, d, _)| d.strong_count() > 0);
    if let Some((_, _, s)) = all.iter().find(|(i, _, _)| *i == id) {
        return s.clone();
    }
    let s = Arc::new(Shards::new());
    all.push((id, Arc::downgrade(dev), s.clone()));
    s
}

/// The I/O figures of the device `id` so far (every thread's channel;
/// zeroes for a device no thread has used).
pub fn device_metrics(id: DeviceId) -> DeviceMetrics {
    let shards = DEVICE_SHARDS
        .lock()
        .iter()
        .find(|(i, _, _)| *i == id)
        .map(|(_, _, s)| s.all())
        .unwrap_or_default();
    let fold = |k: IoKind| OpStats::fold(&shards, |s: &DeviceShard| s.op(k));
    DeviceMetrics {
        reads: fold(IoKind::Read),
        writes: fold(IoKind::Write),
        flushes: fold(IoKind::Flush),
        unmaps: fold(IoKind::Unmap),
        write_zeroes: fold(IoKind::WriteZeroes),
    }
}

enum Slot {
    Free {
        next: Option<Tag>,
    },
    InFlight {
        /// Held so the op's buffers outlive the device's use of them.
        op: IoOp,
        waker: Option<Waker>,
        abandoned: bool,
        /// When it was submitted.
        start: Stamp,
    },
    Done {
        result: Result<()>,
    },
}

struct ChannelState {
    backend: Box<dyn ChannelBackend>,
    slots: Vec<Slot>,
    free_head: Option<Tag>,
    in_flight: usize,
    /// Wakers of futures completed by a poll, woken after it (kept between
    /// polls so waking allocates nothing).
    wakers: Vec<Waker>,
}

struct ChannelInner {
    geometry: Geometry,
    name: String,
    state: RefCell<ChannelState>,
    /// This channel's shard of the device's counters.
    metrics: Arc<DeviceShard>,
}

/// A thread's channel to one device. Cheap to clone; not `Send`.
#[derive(Clone)]
pub struct IoChannel(Rc<ChannelInner>);

impl IoChannel {
    fn new(
        geometry: Geometry,
        name: String,
        backend: Box<dyn ChannelBackend>,
        metrics: Arc<DeviceShard>,
    ) -> IoChannel {
        IoChannel(Rc::new(ChannelInner {
            geometry,
            name,
            metrics,
            state: RefCell::new(ChannelState {
                backend,
                slots: Vec::new(),
                free_head: None,
                in_flight: 0,
                wakers: Vec::new(),
            }),
        }))
    }

    /// The device's geometry.
    pub fn geometry(&self) -> Geometry {
        self.0.geometry
    }

    /// Operations submitted and not yet completed on this channel.
    pub fn in_flight(&self) -> usize {
        self.0.state.borrow().in_flight
    }

    /// Reaps completions and wakes their futures; returns how many.
    pub fn poll(&self) -> usize {
        let mut guard = self.0.state.borrow_mut();
        let st = &mut *guard;
        let slots = &mut st.slots;
        let free_head = &mut st.free_head;
        let mut wakers = std::mem::take(&mut st.wakers);
        let name = &self.0.name;
        let metrics = &self.0.metrics;
        let n = st.backend.reap(&mut |tag, result| {
            if let Err(e) = &result {
                tracing::warn!(device = %name, error = %e, "device I/O failed");
            }
            let Some(slot) = slots.get_mut(tag as usize) else {
                debug_assert!(false, "completion for unknown tag {tag}");
                return;
            };
            let ok = result.is_ok();
            match std::mem::replace(slot, Slot::Done { result }) {
                Slot::InFlight {
                    op,
                    waker,
                    abandoned,
                    start,
                } => {
                    let bytes = op.blocks * u64::from(self.0.geometry.block_size);
                    metrics.op(op.kind).record(start, bytes, ok);
                    if abandoned {
                        *slot = Slot::Free { next: *free_head };
                        *free_head = Some(tag);
                    } else if let Some(w) = waker {
                        wakers.push(w);
                    }
                }
                other => {
                    debug_assert!(false, "completion for a slot not in flight");
                    *slot = other;
                }
            }
        });
        st.in_flight -= n;
        if n > 0 {
            IN_FLIGHT.with(|c| c.set(c.get() - n));
        }
        if wakers.is_empty() {
            st.wakers = wakers;
            return n;
        }
        drop(guard);
        for w in wakers.drain(..) {
            w.wake();
        }
        // A waker may have polled this channel again (and put a list back).
        if let Ok(mut st) = self.0.state.try_borrow_mut() {
            if st.wakers.capacity() < wakers.capacity() {
                st.wakers = wakers;
            }
        }
        n
    }

    /// Blocks until an operation completes (see [`ChannelBackend::wait`]);
    /// false when the backend cannot block.
    fn wait(&self) -> bool {
        let Ok(mut st) = self.0.state.try_borrow_mut() else {
            return false;
        };
        st.in_flight > 0 && st.backend.wait()
    }

    /// Ok when the operation fits the geometry; the error is built out of
    /// line (the data path only tests).
    #[inline(always)]
    fn check(&self, kind: IoKind, lba: Lba, blocks: u64, bytes: usize) -> Result<()> {
        let g = self.0.geometry;
        let in_range = lba
            .get()
            .checked_add(blocks)
            .is_some_and(|e| e <= g.block_count);
        let sized = if matches!(kind, IoKind::Read | IoKind::Write) {
            bytes != 0 && bytes.is_multiple_of(g.block_size as usize)
        } else {
            kind == IoKind::Flush || blocks != 0
        };
        if in_range && sized {
            return Ok(());
        }
        Err(self.refusal(kind, lba, blocks, bytes))
    }

    /// Why [`IoChannel::check`] refused an operation.
    #[cold]
    fn refusal(&self, kind: IoKind, lba: Lba, blocks: u64, bytes: usize) -> Error {
        let g = self.0.geometry;
        if lba
            .get()
            .checked_add(blocks)
            .is_none_or(|e| e > g.block_count)
        {
            return Error::OutOfRange {
                what: format!("{} on device {}", kind.name(), self.0.name),
                offset: lba.get(),
                len: blocks,
                size: g.block_count,
            };
        }
        if matches!(kind, IoKind::Read | IoKind::Write) {
            return Error::InvalidArgument(format!(
                "{} of {bytes} bytes is not a positive multiple of the block size {}",
                kind.name(),
                g.block_size
            ));
        }
        Error::InvalidArgument(format!("{} of 0 blocks", kind.name()))
    }

    /// Starts a checked operation and returns the future for its completion.
    pub(crate) fn submit(&self, op: IoOp) -> IoFuture {
        match self.start(op) {
            Ok(tag) => IoFuture {
                chan: Some(self.clone()),
                tag,
                early: None,
            },
            Err(e) => IoFuture::failed(e),
        }
    }

    /// [`IoChannel::submit`] by a caller that hands over its reference to
    /// the channel (the future keeps it): no reference count taken and
    /// dropped again.
    #[inline(always)]
    pub(crate) fn submit_owned(self, op: IoOp) -> IoFuture {
        match self.start(op) {
            Ok(tag) => IoFuture {
                chan: Some(self),
                tag,
                early: None,
            },
            Err(e) => IoFuture::failed(e),
        }
    }

    /// Checks `op`, takes a slot for it and hands it to the backend;
    /// returns its tag.
    #[inline(always)]
    fn start(&self, op: IoOp) -> Result<Tag> {
        let bytes: usize = op.segs.iter().map(|s| s.len()).sum();
        let blocks = if matches!(op.kind, IoKind::Read | IoKind::Write) {
            (bytes / self.0.geometry.block_size as usize) as u64
        } else {
            op.blocks
        };
        self.check(op.kind, op.lba, blocks, bytes)?;
        let op = IoOp { blocks, ..op };
        let mut st = self.0.state.borrow_mut();
        let tag = match st.free_head {
            Some(t) => {
                st.free_head = match st.slots[t as usize] {
                    Slot::Free { next } => next,
                    _ => unreachable!("free list holds a busy slot"),
                };
                t
            }
            None => {
                st.slots.push(Slot::Free { next: None });
                (st.slots.len() - 1) as Tag
            }
        };
        let start = Stamp::now();
        if let Err(e) = st.backend.submit(tag, &op) {
            st.slots[tag as usize] = Slot::Free { next: st.free_head };
            st.free_head = Some(tag);
            return Err(e);
        }
        st.slots[tag as usize] = Slot::InFlight {
            op,
            waker: None,
            abandoned: false,
            start,
        };
        st.in_flight += 1;
        IN_FLIGHT.with(|c| c.set(c.get() + 1));
        Ok(tag)
    }

    /// The segments of `bufs`, one whole buffer each.
    #[inline]
    fn buf_segments(bufs: &[DmaBuf]) -> Segments {
        match bufs {
            // The data path's case: no iterator to collect.
            [b] => Segments::one(b.segment(0, b.len())),
            _ => bufs.iter().map(|b| b.segment(0, b.len())).collect(),
        }
    }

    pub(crate) fn submit_bufs(&self, kind: IoKind, lba: Lba, bufs: &[DmaBuf]) -> IoFuture {
        self.submit(IoOp {
            kind,
            lba,
            blocks: 0,
            segs: Self::buf_segments(bufs),
        })
    }

    /// [`IoChannel::submit_bufs`] of one buffer, handing over the channel
    /// reference ([`IoChannel::submit_owned`]).
    pub(crate) fn submit_buf_owned(self, kind: IoKind, lba: Lba, buf: &DmaBuf) -> IoFuture {
        self.submit_owned(IoOp {
            kind,
            lba,
            blocks: 0,
            segs: Segments::one(buf.segment(0, buf.len())),
        })
    }

    /// Reads `buf.len()` bytes starting at block `lba` into `buf`.
    pub async fn read(&self, lba: Lba, buf: DmaBuf) -> Result<DmaBuf> {
        let bufs = [buf];
        self.submit_bufs(IoKind::Read, lba, &bufs).await?;
        let [buf] = bufs;
        Ok(buf)
    }

    /// Writes `buf` to the blocks starting at `lba`.
    pub async fn write(&self, lba: Lba, buf: DmaBuf) -> Result<DmaBuf> {
        let bufs = [buf];
        self.submit_bufs(IoKind::Write, lba, &bufs).await?;
        let [buf] = bufs;
        Ok(buf)
    }

    /// Reads consecutive blocks starting at `lba` into `bufs`, in order.
    pub async fn readv(&self, lba: Lba, bufs: Vec<DmaBuf>) -> Result<Vec<DmaBuf>> {
        self.submit_bufs(IoKind::Read, lba, &bufs).await?;
        Ok(bufs)
    }

    /// Writes `bufs`, in order, to consecutive blocks starting at `lba`.
    pub async fn writev(&self, lba: Lba, bufs: Vec<DmaBuf>) -> Result<Vec<DmaBuf>> {
        self.submit_bufs(IoKind::Write, lba, &bufs).await?;
        Ok(bufs)
    }

    /// Makes every write completed before this call durable.
    pub fn flush(&self) -> IoFuture {
        self.submit(IoOp {
            kind: IoKind::Flush,
            lba: Lba(0),
            blocks: 0,
            segs: Segments::none(),
        })
    }

    /// Deallocates `blocks` blocks at `lba` (reads back zeroes when the
    /// geometry says `unmap_reads_zeroes`).
    pub fn unmap(&self, lba: Lba, blocks: u64) -> IoFuture {
        self.submit(IoOp {
            kind: IoKind::Unmap,
            lba,
            blocks,
            segs: Segments::none(),
        })
    }

    /// Sets `blocks` blocks at `lba` to zero.
    pub fn write_zeroes(&self, lba: Lba, blocks: u64) -> IoFuture {
        self.submit(IoOp {
            kind: IoKind::WriteZeroes,
            lba,
            blocks,
            segs: Segments::none(),
        })
    }
}

/// Completion of one device operation. Polling it polls its channel.
#[must_use = "an I/O future does nothing useful unless awaited"]
pub struct IoFuture {
    chan: Option<IoChannel>,
    tag: Tag,
    /// An error found before submission (boxed: the future stays small,
    /// and it is moved by every executor).
    early: Option<Box<Error>>,
}

impl IoFuture {
    /// A future that yields `e` (an operation refused before submission).
    pub(crate) fn failed(e: Error) -> IoFuture {
        IoFuture {
            chan: None,
            tag: 0,
            early: Some(Box::new(e)),
        }
    }
}

impl Future for IoFuture {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let Some(chan) = self.chan.clone() else {
            return Poll::Ready(match self.early.take() {
                Some(e) => Err(*e),
                None => Err(Error::Shutdown("I/O future polled after completion".into())),
            });
        };
        chan.poll();
        let mut st = chan.0.state.borrow_mut();
        let st = &mut *st;
        let tag = self.tag;
        let slot = &mut st.slots[tag as usize];
        match slot {
            Slot::InFlight { waker, .. } => {
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Slot::Done { .. } => {
                let Slot::Done { result } =
                    std::mem::replace(slot, Slot::Free { next: st.free_head })
                else {
                    unreachable!()
                };
                st.free_head = Some(tag);
                drop(self.chan.take());
                Poll::Ready(result)
            }
            Slot::Free { .. } => Poll::Ready(Err(Error::Shutdown("I/O slot lost".into()))),
        }
    }
}

impl Drop for IoFuture {
    fn drop(&mut self) {
        let Some(chan) = self.chan.take() else { return };
        let mut st = chan.0.state.borrow_mut();
        let st = &mut *st;
        let slot = &mut st.slots[self.tag as usize];
        match slot {
            Slot::InFlight { abandoned, .. } => *abandoned = true,
            Slot::Done { .. } => {
                *slot = Slot::Free { next: st.free_head };
                st.free_head = Some(self.tag);
            }
            Slot::Free { .. } => {}
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_hugetlbfs_of_2mib_pages_is_the_unsynced_dir() {
        let mounts = "tmpfs /dev/shm tmpfs rw,nosuid 0 0\n\
                      hugetlbfs /mnt/huge1g hugetlbfs rw,relatime,pagesize=1024M 0 0\n\
                      hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n\
                      hugetlbfs /other hugetlbfs rw 0 0\n";
        assert_eq!(
            hugetlbfs_2m_mount(mounts),
            Some(PathBuf::from("/dev/hugepages"))
        );
        assert_eq!(
            hugetlbfs_2m_mount("none /my\\040pages hugetlbfs rw 0 0\n"),
            Some(PathBuf::from("/my pages"))
        );
        assert_eq!(hugetlbfs_2m_mount("tmpfs /dev/shm tmpfs rw 0 0\n"), None);
    }
}
