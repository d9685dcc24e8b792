//! `FileDevice`: a regular file or a block device driven through io_uring
//! with O_DIRECT, one ring per thread.
//!
//! Invariants:
//! - All data I/O bypasses the page cache (O_DIRECT). If the file system
//!   cannot do O_DIRECT with the chosen block size, or io_uring is not
//!   available, [`FileDevice::open`] fails; there is no buffered fallback.
//! - Each backend owns one ring, created by and used on the thread that asked
//!   for it; rings are never shared between threads.
//! - Every SQE pushed is eventually submitted: `reap` hands queued SQEs to the
//!   kernel before it looks for completions, so a thread that only polls
//!   still makes progress.
//! - The kernel never holds more SQEs of a ring than its completion queue
//!   can take (`in_kernel <= cq_capacity`), so completions never overflow.
//! - An operation's iovec array lives in the backend, keyed by tag, until its
//!   last SQE completes (the channel keeps the buffers themselves alive). A
//!   backend dropped with SQEs in the kernel waits for them first.
//! - An operation succeeds only if every one of its SQEs succeeded and every
//!   transfer moved exactly the bytes asked for; a short transfer is an error.
//! - The device holds an exclusive `flock` on the file from `open` until it
//!   is dropped, so two blobstores never share one file.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring, Probe};

use super::lock::{unlock, FileLock};
use super::spec::DeviceSpec;
use super::{BlockDevice, ChannelBackend, DeviceId, DmaBuf, Geometry, IoKind, IoOp, Tag};
use crate::error::{Error, Result};

/// Ring size when the options do not give one.
const DEFAULT_QUEUE_DEPTH: u32 = 128;
/// Largest ring io_uring accepts.
pub(crate) const MAX_QUEUE_DEPTH: u32 = 32768;
/// Advisory largest transfer, reported in the geometry.
const MAX_TRANSFER_BYTES: u32 = 1 << 20;
/// Largest transfer put in one SQE. The kernel caps one read or write near
/// 2 GiB (and an SQE length is 32 bits), so larger ops take several SQEs.
const MAX_SQE_BYTES: usize = 1 << 30;
/// Largest iovec array of one SQE (the kernel's `IOV_MAX`).
const MAX_SQE_IOVECS: usize = 1024;
/// Size of the shared zero buffer used to write zeroes where the file
/// system cannot zero or punch a range itself.
const ZERO_BUF_BYTES: usize = 1 << 20;

/// Options for [`FileDevice::open`]; the query part of a `file:` spec.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// Device size in bytes. A regular file smaller than this is grown
    /// (sparsely); a larger file or block device is used up to this size.
    /// Without it, the size of the existing file or block device is used.
    pub size_bytes: Option<u64>,
    /// Block size, 512 or 4096. Default: the logical block size of a block
    /// device, 4096 for a regular file.
    pub block_size: Option<u32>,
    /// Entries of each thread's ring (default 128).
    pub queue_depth: Option<u32>,
    /// Whether a missing file may be created. Default: created when
    /// `size_bytes` is given. `Some(true)` requires `size_bytes`;
    /// `Some(false)` never creates.
    pub create: Option<bool>,
    /// Write zeroes over the part of a regular file that opening grows, so
    /// the file system under it allocates every block now and later writes
    /// are plain overwrites (no block allocation or extent conversion to
    /// journal at each flush). Default false (the file grows sparsely).
    /// With it, write-zeroes and unmap on the file also write real zeroes
    /// instead of `fallocate(ZERO_RANGE / PUNCH_HOLE)`, which would turn the
    /// range back into unwritten (or missing) extents.
    pub preallocate: Option<bool>,
}

/// What the path names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    RegularFile,
    BlockDevice,
}

/// A regular file or block device driven through io_uring with O_DIRECT.
pub struct FileDevice {
    /// Shared with every backend, so the descriptor outlives in-flight I/O.
    file: Arc<File>,
    path: PathBuf,
    target: Target,
    options: FileOptions,
    queue_depth: u32,
    geometry: Geometry,
    id: DeviceId,
    /// See [`BlockDevice::unsynced_memory`].
    unsynced: PathBuf,
}

impl FileDevice {
    /// Opens (or creates, see [`FileOptions::create`]) `path` for O_DIRECT
    /// I/O and locks it exclusively. Fails with [`Error::Busy`] if another
    /// device holds the lock, and with [`Error::Unsupported`] if io_uring or
    /// O_DIRECT is not available.
    pub fn open(path: impl AsRef<Path>, options: FileOptions) -> Result<FileDevice> {
        let path = path.as_ref();
        let shown = path.display();
        if let Some(bs) = options.block_size {
            if bs != 512 && bs != 4096 {
                return Err(Error::InvalidArgument(format!(
                    "file device {shown}: block size {bs} must be 512 or 4096"
                )));
            }
        }
        let queue_depth = options.queue_depth.unwrap_or(DEFAULT_QUEUE_DEPTH);
        if queue_depth == 0 || queue_depth > MAX_QUEUE_DEPTH {
            return Err(Error::InvalidArgument(format!(
                "file device {shown}: queue depth {queue_depth} is not from 1 to {MAX_QUEUE_DEPTH}"
            )));
        }
        super::open_maybe_creating(
            "file device",
            path,
            options.size_bytes,
            options.create,
            |may_create| Self::open_inner(path, options, queue_depth, may_create),
        )
    }

    fn open_inner(
        path: &Path,
        options: FileOptions,
        queue_depth: u32,
        may_create: bool,
    ) -> Result<FileDevice> {
        let shown = path.display();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(may_create)
            .mode(0o644)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EINVAL) => Error::Unsupported(format!(
                    "{shown}: the file system does not support O_DIRECT, which file devices \
                     require (they never fall back to buffered I/O)"
                )),
                _ if e.kind() == std::io::ErrorKind::NotFound => Error::Os {
                    context: format!("opening file device {shown} (give size=<size> to create it)"),
                    source: e,
                },
                _ => Error::Os {
                    context: format!("opening file device {shown}"),
                    source: e,
                },
            })?;
        let file = FileLock::exclusive(file, path)?;
        let meta = file.metadata().map_err(|e| Error::Os {
            context: format!("stat of file device {shown}"),
            source: e,
        })?;
        let unsynced = super::unsynced_memory_path(&meta);
        let ft = meta.file_type();
        let (target, block_size, size_bytes) = if ft.is_file() {
            let bs = options.block_size.unwrap_or(4096);
            let size = match options.size_bytes {
                Some(size) => {
                    check_multiple(path, size, bs)?;
                    if meta.len() < size {
                        file.set_len(size).map_err(|e| Error::Os {
                            context: format!("growing {shown} to {size} bytes"),
                            source: e,
                        })?;
                        if options.preallocate == Some(true) {
                            fill_zeroes(
                                &file,
                                meta.len() / bs as u64 * bs as u64,
                                size,
                                &shown.to_string(),
                            )?;
                        }
                    }
                    size
                }
                None => {
                    let size = meta.len() / bs as u64 * bs as u64;
                    if size == 0 {
                        return Err(Error::DeviceTooSmall(format!(
                            "{shown} holds {} bytes, less than one {bs}-byte block; give \
                             size=<size> to grow it",
                            meta.len()
                        )));
                    }
                    size
                }
            };
            (Target::RegularFile, bs, size)
        } else if ft.is_block_device() {
            let (logical, dev_bytes) = block_device_shape(&file, path)?;
            let bs = options.block_size.unwrap_or(logical);
            if bs < logical {
                return Err(Error::InvalidArgument(format!(
                    "block size {bs} is smaller than the logical block size {logical} of {shown}"
                )));
            }
            if bs != 512 && bs != 4096 {
                return Err(Error::Unsupported(format!(
                    "{shown} has {bs}-byte logical blocks; only 512 and 4096 are supported"
                )));
            }
            let size = match options.size_bytes {
                Some(size) if size > dev_bytes => {
                    return Err(Error::DeviceTooSmall(format!(
                        "{shown} holds {dev_bytes} bytes, less than the {size} asked for"
                    )))
                }
                Some(size) => {
                    check_multiple(path, size, bs)?;
                    size
                }
                None => dev_bytes / bs as u64 * bs as u64,
            };
            if size == 0 {
                return Err(Error::DeviceTooSmall(format!("{shown} is empty")));
            }
            (Target::BlockDevice, bs, size)
        } else {
            return Err(Error::Unsupported(format!(
                "{shown} is neither a regular file nor a block device"
            )));
        };
        probe_io_uring(queue_depth, path)?;
        probe_direct_read(&file, block_size, path)?;
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(FileDevice {
            file: Arc::new(file.into_file()),
            path,
            target,
            options: FileOptions {
                size_bytes: Some(size_bytes),
                block_size: Some(block_size),
                queue_depth: options.queue_depth,
                create: None,
                preallocate: options.preallocate.filter(|&p| p),
            },
            queue_depth,
            geometry: Geometry {
                block_size,
                block_count: size_bytes / block_size as u64,
                max_transfer_bytes: MAX_TRANSFER_BYTES,
                unmap_reads_zeroes: target == Target::RegularFile,
            },
            id: DeviceId::fresh(),
            unsynced,
        })
    }

    /// The file or block device, as an absolute path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True when the path is a block device rather than a regular file.
    pub fn is_block_device(&self) -> bool {
        self.target == Target::BlockDevice
    }

    /// Entries of each thread's ring.
    pub fn queue_depth(&self) -> u32 {
        self.queue_depth
    }
}

impl Drop for FileDevice {
    fn drop(&mut self) {
        // Channels of this thread or others may keep the descriptor open a
        // while (their cache is cleaned lazily); release the lock now so the
        // file can be opened again as soon as the device is gone.
        unlock(&self.file);
    }
}

impl BlockDevice for FileDevice {
    fn geometry(&self) -> Geometry {
        self.geometry
    }

    fn id(&self) -> DeviceId {
        self.id
    }

    fn name(&self) -> String {
        DeviceSpec::File {
            path: self.path.clone(),
            options: self.options,
        }
        .to_string()
    }

    fn unsynced_memory(&self) -> Option<PathBuf> {
        Some(self.unsynced.clone())
    }

    /// io_uring reads into any block-aligned memory, O_DIRECT or not.
    fn reads_into_any_memory(&self) -> bool {
        true
    }

    fn new_backend(&self) -> Result<Box<dyn ChannelBackend>> {
        let ring = IoUring::new(self.queue_depth).map_err(|e| Error::Os {
            context: format!(
                "setting up an io_uring of {} entries for {}",
                self.queue_depth,
                self.path.display()
            ),
            source: e,
        })?;
        let cq_capacity = ring.params().cq_entries() as usize;
        Ok(Box::new(FileBackend {
            ring,
            fd: self.file.as_raw_fd(),
            _file: self.file.clone(),
            target: self.target,
            block_size: self.geometry.block_size as u64,
            name: self.name(),
            cq_capacity,
            in_kernel: 0,
            ops: HashMap::new(),
            cqes: VecDeque::new(),
            done: VecDeque::new(),
            zeroes: None,
            // A preallocated image stays fully written: see
            // `FileOptions::preallocate`.
            zero_range_works: self.options.preallocate != Some(true),
            punch_hole_works: self.options.preallocate != Some(true),
        }))
    }
}

fn check_multiple(path: &Path, size: u64, bs: u32) -> Result<()> {
    if !size.is_multiple_of(bs as u64) {
        return Err(Error::InvalidArgument(format!(
            "file device {}: size {size} is not a multiple of the block size {bs}",
            path.display()
        )));
    }
    Ok(())
}

/// Block-layer ioctl numbers (`linux/fs.h`); libc lacks some of them. The
/// encoding of `_IO`/`_IOR` differs on a few architectures.
mod blk {
    #[cfg(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc",
        target_arch = "sparc64"
    ))]
    const DIR: (u32, u32) = (0x2000_0000, 0x4000_0000);
    #[cfg(not(any(
        target_arch = "powerpc",
        target_arch = "powerpc64",
        target_arch = "mips",
        target_arch = "mips64",
        target_arch = "sparc",
        target_arch = "sparc64"
    )))]
    const DIR: (u32, u32) = (0, 0x8000_0000);
    /// `_IO(0x12, nr)`.
    const fn io(nr: u32) -> u32 {
        DIR.0 | 0x1200 | nr
    }
    /// `_IOR(0x12, nr, u64)`.
    const fn ior_u64(nr: u32) -> u32 {
        DIR.1 | (8 << 16) | 0x1200 | nr
    }
    pub const BLKSSZGET: u32 = io(104);
    pub const BLKGETSIZE64: u32 = ior_u64(114);
    pub const BLKDISCARD: u32 = io(119);
}

/// Logical block size and size in bytes of a block device.
fn block_device_shape(file: &File, path: &Path) -> Result<(u32, u64)> {
    let fd = file.as_raw_fd();
    let mut logical: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points to
    // a live local.
    if unsafe { libc::ioctl(fd, blk::BLKSSZGET as _, &mut logical as *mut libc::c_int) } < 0 {
        return Err(Error::last_os(format!(
            "reading the logical block size of {} (BLKSSZGET)",
            path.display()
        )));
    }
    let mut bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // to a live local.
    if unsafe { libc::ioctl(fd, blk::BLKGETSIZE64 as _, &mut bytes as *mut u64) } < 0 {
        return Err(Error::last_os(format!(
            "reading the size of {} (BLKGETSIZE64)",
            path.display()
        )));
    }
    let logical = u32::try_from(logical).unwrap_or(0);
    if logical == 0 {
        return Err(Error::Unsupported(format!(
            "{} reports no logical block size",
            path.display()
        )));
    }
    Ok((logical, bytes))
}

/// Sets up a ring like the backends will and checks it supports every
/// opcode they use, so a missing io_uring shows at open, not at first I/O.
fn probe_io_uring(queue_depth: u32, path: &Path) -> Result<()> {
    let ring = IoUring::new(queue_depth).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSYS | libc::EPERM | libc::EACCES) => Error::Unsupported(format!(
            "io_uring is not available ({e}); file devices need it (see the \
             kernel.io_uring_disabled sysctl and seccomp policy); opening {}",
            path.display()
        )),
        _ => Error::Os {
            context: format!(
                "setting up an io_uring of {queue_depth} entries for {} (is the locked-memory \
                 limit too low?)",
                path.display()
            ),
            source: e,
        },
    })?;
    let mut probe = Probe::new();
    ring.submitter().register_probe(&mut probe).map_err(|e| {
        Error::Unsupported(format!(
            "probing io_uring opcodes failed ({e}); file devices need Linux 5.6 or later"
        ))
    })?;
    let needed = [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Readv::CODE, "READV"),
        (opcode::Writev::CODE, "WRITEV"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::Fallocate::CODE, "FALLOCATE"),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(Error::Unsupported(format!(
                "this kernel's io_uring lacks the {name} operation that file devices need"
            )));
        }
    }
    Ok(())
}

/// Reads the first block with O_DIRECT, so a block size finer than the file
/// system or device allows shows at open.
fn probe_direct_read(file: &File, block_size: u32, path: &Path) -> Result<()> {
    let mut buf = DmaBuf::new(block_size as usize)?;
    let dst: &mut [u8] = &mut buf;
    // SAFETY: `dst` is a live, exclusively borrowed buffer of `dst.len()`
    // bytes for the duration of the call.
    let n = unsafe { libc::pread(file.as_raw_fd(), dst.as_mut_ptr().cast(), dst.len(), 0) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            return Err(Error::Unsupported(format!(
                "O_DIRECT reads of {block_size}-byte blocks fail on {} (EINVAL): the file \
                 system or device needs a coarser alignment; try bs=4096",
                path.display()
            )));
        }
        return Err(Error::Os {
            context: format!("test read of block 0 of {}", path.display()),
            source: e,
        });
    }
    if n as usize != block_size as usize {
        return Err(Error::Io {
            op: IoKind::Read.name(),
            lba: 0,
            blocks: 1,
            reason: format!(
                "test read of {} returned {n} of {block_size} bytes",
                path.display()
            ),
        });
    }
    Ok(())
}

/// What one SQE of an operation does, to judge its completion.
#[derive(Clone, Copy, Debug)]
enum Step {
    /// A read or write that must move exactly `bytes`.
    Transfer { bytes: u32 },
    /// `fallocate(ZERO_RANGE)`; falls back to writes if not supported.
    ZeroRange,
    /// `fallocate(PUNCH_HOLE)`; falls back to writes if not supported.
    PunchHole,
}

/// An operation with SQEs in the ring.
struct InFlight {
    kind: IoKind,
    lba: u64,
    blocks: u64,
    /// Read by the kernel until the op's SQEs complete; never resized after
    /// its SQEs are built, so their pointers into it stay valid.
    _iovecs: Vec<libc::iovec>,
    /// One entry per SQE pushed, indexed by the low half of `user_data`.
    steps: Vec<Step>,
    /// SQEs pushed and not yet completed.
    outstanding: usize,
    /// The first failure; reported when the last SQE completes.
    error: Option<Error>,
}

/// One thread's ring on a [`FileDevice`].
struct FileBackend {
    ring: IoUring,
    fd: RawFd,
    /// Keeps `fd` open while this backend lives.
    _file: Arc<File>,
    target: Target,
    block_size: u64,
    name: String,
    cq_capacity: usize,
    /// SQEs pushed (queued or submitted) whose CQE has not been collected.
    in_kernel: usize,
    ops: HashMap<Tag, InFlight>,
    /// CQEs taken off the ring, not yet processed: `(user_data, result)`.
    cqes: VecDeque<(u64, i32)>,
    /// Finished operations, to report at the next `reap`.
    done: VecDeque<(Tag, Result<()>)>,
    /// Source of zero writes; only ever read by the kernel.
    zeroes: Option<DmaBuf>,
    zero_range_works: bool,
    punch_hole_works: bool,
}

fn user_data(tag: Tag, step: usize) -> u64 {
    ((tag as u64) << 32) | step as u64
}

fn is_retryable(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
    )
}

impl FileBackend {
    /// Submits queued SQEs, waiting for `want` completions. Transient errors
    /// count as success: the SQEs stay queued and the next call retries.
    fn submit_queued(&mut self, want: usize) -> Result<()> {
        match self.ring.submit_and_wait(want) {
            Ok(_) => Ok(()),
            Err(e) if is_retryable(&e) => Ok(()),
            Err(e) => Err(Error::Os {
                context: format!("submitting to the io_uring of {}", self.name),
                source: e,
            }),
        }
    }

    /// Moves CQEs off the ring into `self.cqes` (no processing, so this is
    /// safe to call in the middle of a submission).
    fn collect_cqes(&mut self) {
        for cqe in self.ring.completion() {
            self.cqes.push_back((cqe.user_data(), cqe.result()));
            self.in_kernel -= 1;
        }
    }

    /// Pushes one SQE, making room if the SQ is full or the CQ could
    /// overflow. `entry` must point only at memory that stays valid until its
    /// completion is collected.
    fn push(&mut self, entry: &squeue::Entry) -> Result<()> {
        for _ in 0..10_000 {
            if self.in_kernel < self.cq_capacity {
                // SAFETY: every pointer in the entry (iovec arrays held in
                // `self.ops`, op segments held by the channel, the zero
                // buffer held in `self.zeroes`) stays valid until the CQE is
                // collected, and `Drop` waits for all CQEs.
                if unsafe { self.ring.submission().push(entry) }.is_ok() {
                    self.in_kernel += 1;
                    return Ok(());
                }
                // SQ full: hand the queued SQEs to the kernel to free slots.
                self.submit_queued(0)?;
            } else {
                // As many SQEs in flight as the CQ holds: wait for one.
                self.submit_queued(1)?;
            }
            self.collect_cqes();
        }
        Err(Error::Busy(format!(
            "the io_uring of {} makes no progress",
            self.name
        )))
    }

    /// Registers `tag` and pushes its SQEs. Returns an error only if nothing
    /// was pushed (the op did not start).
    fn start(
        &mut self,
        tag: Tag,
        op: &IoOp,
        iovecs: Vec<libc::iovec>,
        sqes: Vec<(squeue::Entry, Step)>,
    ) -> Result<()> {
        debug_assert!(
            !self.ops.contains_key(&tag),
            "tag {tag} reused while in flight"
        );
        self.ops.insert(
            tag,
            InFlight {
                kind: op.kind,
                lba: op.lba.get(),
                blocks: op.blocks,
                _iovecs: iovecs,
                steps: Vec::with_capacity(sqes.len()),
                outstanding: 0,
                error: None,
            },
        );
        if let Err(e) = self.push_steps(tag, sqes) {
            let started = self.ops.get(&tag).is_some_and(|o| o.outstanding > 0);
            if !started {
                self.ops.remove(&tag);
                return Err(e);
            }
            // Some SQEs are in the kernel: the op ends when they complete.
            if let Some(o) = self.ops.get_mut(&tag) {
                o.error.get_or_insert(e);
            }
        }
        Ok(())
    }

    /// Pushes SQEs for an op already in `self.ops`; stops at the first
    /// failure.
    fn push_steps(&mut self, tag: Tag, sqes: Vec<(squeue::Entry, Step)>) -> Result<()> {
        for (entry, step) in sqes {
            let Some(index) = self.ops.get(&tag).map(|o| o.steps.len()) else {
                debug_assert!(false, "pushing steps for unknown tag {tag}");
                return Ok(());
            };
            self.push(&entry.user_data(user_data(tag, index)))?;
            if let Some(o) = self.ops.get_mut(&tag) {
                o.steps.push(step);
                o.outstanding += 1;
            }
        }
        Ok(())
    }

    fn start_transfer(&mut self, tag: Tag, op: &IoOp) -> Result<()> {
        // One iovec per segment, split where a segment exceeds one SQE.
        let mut iovecs = Vec::with_capacity(op.segs.len());
        for seg in &op.segs {
            let mut off = 0;
            while off < seg.len() {
                let len = (seg.len() - off).min(MAX_SQE_BYTES);
                iovecs.push(libc::iovec {
                    // SAFETY: off < seg.len(), so the address is inside the segment.
                    iov_base: unsafe { seg.ptr().add(off) }.cast(),
                    iov_len: len,
                });
                off += len;
            }
        }
        let fd = types::Fd(self.fd);
        let mut pos = op.lba.get() * self.block_size;
        let mut sqes = Vec::new();
        let mut i = 0;
        while i < iovecs.len() {
            let mut j = i;
            let mut bytes = 0usize;
            while j < iovecs.len()
                && j - i < MAX_SQE_IOVECS
                && bytes + iovecs[j].iov_len <= MAX_SQE_BYTES
            {
                bytes += iovecs[j].iov_len;
                j += 1;
            }
            debug_assert!(j > i, "an iovec larger than one SQE");
            let n = (j - i) as u32;
            let len = bytes as u32;
            let entry = match (op.kind, n) {
                (IoKind::Read, 1) => opcode::Read::new(fd, iovecs[i].iov_base.cast(), len)
                    .offset(pos)
                    .build(),
                (IoKind::Write, 1) => opcode::Write::new(fd, iovecs[i].iov_base.cast(), len)
                    .offset(pos)
                    .build(),
                (IoKind::Read, _) => opcode::Readv::new(fd, iovecs[i..].as_ptr(), n)
                    .offset(pos)
                    .build(),
                _ => opcode::Writev::new(fd, iovecs[i..].as_ptr(), n)
                    .offset(pos)
                    .build(),
            };
            sqes.push((entry, Step::Transfer { bytes: len }));
            pos += bytes as u64;
            i = j;
        }
        self.start(tag, op, iovecs, sqes)
    }

    /// Write SQEs of the zero buffer covering `blocks` blocks at `lba`.
    fn zero_writes(&mut self, lba: u64, blocks: u64) -> Result<Vec<(squeue::Entry, Step)>> {
        if self.zeroes.is_none() {
            self.zeroes = Some(DmaBuf::new(ZERO_BUF_BYTES)?);
        }
        let src = self
            .zeroes
            .as_ref()
            .map_or(std::ptr::null(), |z| z.as_ptr());
        let fd = types::Fd(self.fd);
        let mut pos = lba * self.block_size;
        let end = pos + blocks * self.block_size;
        let mut sqes = Vec::new();
        while pos < end {
            let len = (end - pos).min(ZERO_BUF_BYTES as u64) as u32;
            let entry = opcode::Write::new(fd, src, len).offset(pos).build();
            sqes.push((entry, Step::Transfer { bytes: len }));
            pos += len as u64;
        }
        Ok(sqes)
    }

    fn fallocate(&self, op: &IoOp, mode: i32) -> squeue::Entry {
        opcode::Fallocate::new(types::Fd(self.fd), op.blocks * self.block_size)
            .offset(op.lba.get() * self.block_size)
            .mode(mode | libc::FALLOC_FL_KEEP_SIZE)
            .build()
    }

    /// Discards a range of a block device, synchronously.
    fn discard(&self, op: &IoOp) -> Result<()> {
        let range: [u64; 2] = [op.lba.get() * self.block_size, op.blocks * self.block_size];
        // SAFETY: BLKDISCARD reads two u64s through the pointer, which points
        // to a live local array.
        let r = unsafe { libc::ioctl(self.fd, blk::BLKDISCARD as _, range.as_ptr()) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // Unmap on a block device is a hint (the geometry does not
            // promise zeroes): a device that cannot discard keeps its data.
            Some(libc::EOPNOTSUPP) => Ok(()),
            _ => Err(op.error(format!("BLKDISCARD: {e} on {}", self.name))),
        }
    }

    /// Judges one CQE and finishes its op when it was the last.
    fn process(&mut self, data: u64, res: i32) {
        let tag = (data >> 32) as Tag;
        let index = data as u32 as usize;
        let Some(op) = self.ops.get_mut(&tag) else {
            debug_assert!(false, "completion for unknown tag {tag}");
            return;
        };
        op.outstanding -= 1;
        let (step, lba, blocks) = (op.steps[index], op.lba, op.blocks);
        let failure = match step {
            Step::ZeroRange | Step::PunchHole if res == -libc::EOPNOTSUPP => {
                // The file system cannot do it in place: write zeroes instead
                // (same result; later ops go straight to writes).
                match step {
                    Step::ZeroRange => self.zero_range_works = false,
                    _ => self.punch_hole_works = false,
                }
                match self.zero_writes(lba, blocks) {
                    Ok(sqes) => self.push_steps(tag, sqes).err(),
                    Err(e) => Some(e),
                }
            }
            _ if res < 0 => {
                let e = std::io::Error::from_raw_os_error(-res);
                Some(self.op_error(tag, format!("{e} on {}", self.name)))
            }
            Step::Transfer { bytes } if res as u32 != bytes => Some(self.op_error(
                tag,
                format!(
                    "short transfer: {res} of {bytes} bytes (part {index}) on {}",
                    self.name
                ),
            )),
            _ => None,
        };
        let Some(op) = self.ops.get_mut(&tag) else {
            return;
        };
        if let Some(e) = failure {
            op.error.get_or_insert(e);
        }
        if op.outstanding == 0 {
            if let Some(op) = self.ops.remove(&tag) {
                self.done.push_back((tag, op.error.map_or(Ok(()), Err)));
            }
        }
    }

    fn op_error(&self, tag: Tag, reason: String) -> Error {
        let (kind, lba, blocks) = self
            .ops
            .get(&tag)
            .map_or((IoKind::Read, 0, 0), |o| (o.kind, o.lba, o.blocks));
        Error::Io {
            op: kind.name(),
            lba,
            blocks,
            reason,
        }
    }
}

impl ChannelBackend for FileBackend {
    fn submit(&mut self, tag: Tag, op: &IoOp) -> Result<()> {
        match op.kind {
            IoKind::Read | IoKind::Write => self.start_transfer(tag, op),
            IoKind::Flush => {
                // fdatasync on this thread, as the kernel's own file systems
                // do: io_uring would hand the fsync to a kernel worker
                // thread, and on a busy machine waiting for that thread to
                // be scheduled cost more than the flush itself (a RocksDB
                // WAL sync does two flushes). The caller waits for the flush
                // either way; ops already in the ring keep going meanwhile.
                // SAFETY: `fd` stays open while this backend lives (`_file`).
                let r = unsafe { libc::fdatasync(self.fd) };
                let result = if r == 0 {
                    Ok(())
                } else {
                    let e = std::io::Error::last_os_error();
                    Err(op.error(format!("fdatasync: {e} on {}", self.name)))
                };
                self.done.push_back((tag, result));
                Ok(())
            }
            IoKind::Unmap if self.target == Target::BlockDevice => {
                let result = self.discard(op);
                self.done.push_back((tag, result));
                Ok(())
            }
            IoKind::Unmap if self.punch_hole_works => {
                let entry = self.fallocate(op, libc::FALLOC_FL_PUNCH_HOLE);
                self.start(tag, op, Vec::new(), vec![(entry, Step::PunchHole)])
            }
            IoKind::WriteZeroes if self.zero_range_works => {
                let entry = self.fallocate(op, libc::FALLOC_FL_ZERO_RANGE);
                self.start(tag, op, Vec::new(), vec![(entry, Step::ZeroRange)])
            }
            IoKind::Unmap | IoKind::WriteZeroes => {
                let sqes = self.zero_writes(op.lba.get(), op.blocks)?;
                self.start(tag, op, Vec::new(), sqes)
            }
        }
    }

    fn reap(&mut self, done: &mut dyn FnMut(Tag, Result<()>)) -> usize {
        // A failed submit leaves the SQEs queued; the next reap retries.
        if !self.ring.submission().is_empty() {
            let _ = self.submit_queued(0);
        }
        self.collect_cqes();
        while let Some((data, res)) = self.cqes.pop_front() {
            self.process(data, res);
        }
        // Processing may have queued fallback writes: start them now.
        if !self.ring.submission().is_empty() {
            let _ = self.submit_queued(0);
        }
        let n = self.done.len();
        for (tag, result) in self.done.drain(..) {
            done(tag, result);
        }
        n
    }

    fn wait(&mut self) -> bool {
        if !self.done.is_empty() || !self.cqes.is_empty() || self.in_kernel == 0 {
            // Something to report already, or nothing the kernel could
            // complete: the caller's next poll decides.
            return true;
        }
        // Submits what is queued and sleeps in the kernel until a CQE is
        // posted (one that is already there returns at once).
        match self.ring.submit_and_wait(1) {
            Ok(_) => true,
            Err(e) if is_retryable(&e) => true,
            Err(_) => false,
        }
    }
}

impl Drop for FileBackend {
    fn drop(&mut self) {
        // The kernel may still read iovecs and buffers of ops in flight;
        // wait until it is done with all of them.
        while self.in_kernel > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if is_retryable(&e) => {}
                Err(_) => break,
            }
            self.collect_cqes();
        }
    }
}

/// Writes zeroes over `[from, to)` of an O_DIRECT file (`from` and `to`
/// multiples of the block size), then syncs it.
fn fill_zeroes(file: &std::fs::File, from: u64, to: u64, shown: &str) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let zeros = super::DmaBuf::new(1 << 20)?;
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], pos).map_err(|e| Error::Os {
            context: format!("preallocating {shown} at byte {pos}"),
            source: e,
        })?;
        pos += n as u64;
    }
    file.sync_all().map_err(|e| Error::Os {
        context: format!("syncing {shown} after preallocation"),
        source: e,
    })
}
