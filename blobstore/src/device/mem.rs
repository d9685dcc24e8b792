//! `MemDevice`: a block device in memory, either in this process's heap
//! (`mem:`, for tests and models) or in a shared mapping of a file (`shm:`,
//! e.g. on tmpfs under /dev/shm), which outlives the process so a later
//! process can open the same blocks again.
//!
//! Invariants:
//! - The contents are split in fixed chunks, each behind its own lock, so
//!   threads working on different regions never contend and overlapping
//!   concurrent writes are ordered per chunk instead of racing. Bytes are
//!   only touched under the chunk's lock (shared for reads, exclusive for
//!   writes), whether they live on the heap or in the mapping.
//! - Operations complete at submission; the completion is reported at the
//!   next poll of the channel, like any other device.
//! - Unmap and write-zeroes both leave zeroes.
//! - A shared device holds an exclusive `flock` on its file from open until
//!   the last [`MemDevice`] clone is dropped (like the file device), so no
//!   other blobstore maps the same blocks meanwhile; the mapping itself is
//!   unmapped when the last channel using it is gone too.
//! - Durability of a shared device: memory is the medium. Every write is in
//!   the file's pages when it completes, so the data survives the process
//!   exiting or being killed, but not a reboot (tmpfs) and, on a disk file
//!   system, not a power cut (nothing forces the pages to the disk). A flush
//!   therefore only orders: it completes after every write completed before
//!   it was submitted, which holds since writes complete at submission.
//! - The file's pages are reserved (`fallocate`) at open, so running out of
//!   room in tmpfs is an open error, not a fault on a later write. They are
//!   mapped into this process 256 KiB at a time, at the first write into
//!   each region (`MADV_POPULATE_WRITE`), not page by page as writes reach
//!   them.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use super::lock::FileLock;
use super::{BlockDevice, ChannelBackend, DeviceId, DeviceSpec, Geometry, IoKind, IoOp, Tag};
use crate::error::{Error, Result};

const CHUNK_BYTES: usize = 1 << 20;
/// How much of a mapped chunk one `MADV_POPULATE_WRITE` maps: large enough
/// that a sequential writer faults rarely, small enough that the write
/// which pays for it (the kernel clears never-written pages) stays short.
const POPULATE_BYTES: usize = 256 << 10;
/// `Chunk::populated` with every region mapped (one bit per region).
const ALL_POPULATED: u8 = (1 << CHUNK_BYTES.div_ceil(POPULATE_BYTES)) - 1;
const _: () = assert!(CHUNK_BYTES.div_ceil(POPULATE_BYTES) < 8);
/// Block size of a shared device when neither the caller nor the spec says.
const DEFAULT_SHM_BLOCK_SIZE: u32 = 4096;

/// One chunk of the contents: `len` bytes at `ptr`, guarded by `lock`.
struct Chunk {
    lock: RwLock<()>,
    ptr: NonNull<u8>,
    len: usize,
    /// Which [`POPULATE_BYTES`] regions of the chunk this process has mapped
    /// for writing (bit `i`: region `i`). The first write into a region of
    /// a mapped chunk maps it whole in one call (`MADV_POPULATE_WRITE`),
    /// instead of taking a page fault on each 4 KiB page as appends reach
    /// it: a log synced every record would otherwise fault once per page,
    /// in the foreground.
    populated: AtomicU8,
}

/// Where the chunks' bytes come from.
enum Backing {
    /// Each chunk is a leaked `Box<[u8]>` (`Box::leak`); `Store::drop`
    /// turns them back into boxes and frees them.
    Heap,
    /// The chunks tile one `MAP_SHARED` mapping of `len` bytes at `addr`;
    /// `Store::drop` unmaps it.
    Mapped { addr: NonNull<u8>, len: usize },
}

struct Store {
    chunks: Vec<Chunk>,
    size: usize,
    backing: Backing,
}

// SAFETY: the raw pointers name memory the store owns (heap chunks or the
// mapping) for its whole life; every access goes through the chunk's lock,
// which gives readers shared and writers exclusive access across threads.
unsafe impl Send for Store {}
// SAFETY: as above.
unsafe impl Sync for Store {}

impl Store {
    /// A zeroed store on the heap.
    fn heap(size: usize) -> Store {
        let n = size.div_ceil(CHUNK_BYTES);
        let chunks = (0..n)
            .map(|i| {
                let len = CHUNK_BYTES.min(size - i * CHUNK_BYTES);
                let bytes: &'static mut [u8] = Box::leak(vec![0u8; len].into_boxed_slice());
                Chunk {
                    lock: RwLock::new(()),
                    ptr: NonNull::from(bytes).cast::<u8>(),
                    len,
                    // The heap is private memory the process owns already.
                    populated: AtomicU8::new(ALL_POPULATED),
                }
            })
            .collect();
        Store {
            chunks,
            size,
            backing: Backing::Heap,
        }
    }

    /// A store over the mapping of `len` bytes at `addr`, which it now owns.
    fn mapped(addr: NonNull<u8>, len: usize) -> Store {
        let n = len.div_ceil(CHUNK_BYTES);
        let chunks = (0..n)
            .map(|i| Chunk {
                lock: RwLock::new(()),
                // SAFETY: i * CHUNK_BYTES < len, so the offset stays inside
                // the mapping, which is not null.
                ptr: unsafe { NonNull::new_unchecked(addr.as_ptr().add(i * CHUNK_BYTES)) },
                len: CHUNK_BYTES.min(len - i * CHUNK_BYTES),
                populated: AtomicU8::new(0),
            })
            .collect();
        Store {
            chunks,
            size: len,
            backing: Backing::Mapped { addr, len },
        }
    }

    /// Runs `f` on chunk `c`'s bytes under its shared lock.
    fn read<R>(&self, c: usize, f: impl FnOnce(&[u8]) -> R) -> R {
        let chunk = &self.chunks[c];
        let _guard = chunk.lock.read();
        // SAFETY: `ptr..ptr+len` is memory the store owns and keeps alive;
        // the shared lock excludes writers in this process, and the file's
        // exclusive flock keeps other blobstores from mapping it meanwhile.
        f(unsafe { std::slice::from_raw_parts(chunk.ptr.as_ptr(), chunk.len) })
    }

    /// Runs `f` on bytes `range` of chunk `c` under the chunk's exclusive
    /// lock.
    fn write<R>(&self, c: usize, range: Range<usize>, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let chunk = &self.chunks[c];
        let _guard = chunk.lock.write();
        chunk.populate(&range);
        // SAFETY: as in `read`; the exclusive lock makes this the only
        // reference to these bytes until `f` returns.
        let bytes = unsafe { std::slice::from_raw_parts_mut(chunk.ptr.as_ptr(), chunk.len) };
        f(&mut bytes[range])
    }

    /// Calls `f(chunk, offset_in_chunk, offset_in_range, len)` for each
    /// chunk piece of `[off, off+len)`.
    fn for_pieces(&self, off: usize, len: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
        let mut done = 0;
        while done < len {
            let pos = off + done;
            let chunk = pos / CHUNK_BYTES;
            let in_chunk = pos % CHUNK_BYTES;
            let n = (CHUNK_BYTES - in_chunk).min(len - done);
            f(chunk, in_chunk, done, n);
            done += n;
        }
    }
}

impl Chunk {
    /// Maps the regions of `range` this process has not mapped yet (call
    /// under the write lock).
    fn populate(&self, range: &Range<usize>) {
        if range.is_empty() {
            return;
        }
        let (first, last) = (
            range.start / POPULATE_BYTES,
            (range.end - 1) / POPULATE_BYTES,
        );
        let want = (first..=last).fold(0u8, |m, i| m | 1 << i);
        let have = self.populated.load(Ordering::Relaxed);
        if want & !have == 0 {
            return;
        }
        for i in (first..=last).filter(|i| have & (1 << i) == 0) {
            let start = i * POPULATE_BYTES;
            // SAFETY: `start..start+len` lies inside the chunk, which lies
            // inside the store's mapping. The advice only maps pages (the
            // file's are reserved at open); it changes no byte. A kernel
            // without it (before 5.14) says EINVAL, and the pages then
            // fault in one by one as before.
            unsafe {
                libc::madvise(
                    self.ptr.as_ptr().add(start).cast(),
                    POPULATE_BYTES.min(self.len - start),
                    libc::MADV_POPULATE_WRITE,
                )
            };
        }
        self.populated.fetch_or(want, Ordering::Relaxed);
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        match self.backing {
            Backing::Heap => {
                for chunk in &self.chunks {
                    let raw = std::ptr::slice_from_raw_parts_mut(chunk.ptr.as_ptr(), chunk.len);
                    // SAFETY: `Store::heap` made this pointer by leaking a
                    // `Box<[u8]>` of exactly `len` bytes, and
                    // nothing uses it after the store is dropped.
                    drop(unsafe { Box::from_raw(raw) });
                }
            }
            Backing::Mapped { addr, len } => {
                // SAFETY: `addr..addr+len` is the mapping `mmap` returned to
                // `MemDevice::open_shared`; no chunk is used after the store
                // is dropped. munmap only fails on bad arguments.
                unsafe { libc::munmap(addr.as_ptr().cast(), len) };
            }
        }
    }
}

/// Options for [`MemDevice::open_shared`]; the query part of a `shm:` spec.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShmOptions {
    /// Device size in bytes. A file smaller than this is grown; a larger
    /// one is used up to this size. Without it, the size of the existing
    /// file is used (it must then be a positive multiple of the block size).
    pub size_bytes: Option<u64>,
    /// Block size, 512 or 4096 (default 4096).
    pub block_size: Option<u32>,
    /// Whether a missing file may be created. Default: created when
    /// `size_bytes` is given. `Some(true)` requires `size_bytes`;
    /// `Some(false)` never creates.
    pub create: Option<bool>,
}

/// The file behind a shared device. Held by the [`MemDevice`] clones only
/// (not by channels), so dropping the last clone releases the exclusive
/// lock at once, even while a channel still cached on some thread keeps the
/// mapping (and with it the open file description) alive.
struct SharedFile {
    /// Held for its lock; the mapping needs no descriptor.
    _file: FileLock,
    path: PathBuf,
    options: ShmOptions,
    /// See [`BlockDevice::unsynced_memory`].
    unsynced: PathBuf,
}

/// A block device in memory with 512- or 4096-byte blocks: on the heap
/// ([`MemDevice::new`]) or in a shared mapping of a file
/// ([`MemDevice::open_shared`]). See the module docs for durability.
#[derive(Clone)]
pub struct MemDevice {
    store: Arc<Store>,
    geometry: Geometry,
    id: DeviceId,
    /// The file of a shared device; `None` on the heap.
    shared: Option<Arc<SharedFile>>,
}

fn check_block_size(block_size: u32) -> Result<()> {
    if block_size != 512 && block_size != 4096 {
        return Err(Error::InvalidArgument(format!(
            "block size {block_size}: must be 512 or 4096"
        )));
    }
    Ok(())
}

fn geometry(size_bytes: u64, block_size: u32) -> Geometry {
    Geometry {
        block_size,
        block_count: size_bytes / block_size as u64,
        max_transfer_bytes: 1 << 20,
        unmap_reads_zeroes: true,
    }
}

impl MemDevice {
    /// A zeroed device of `size_bytes` (a multiple of `block_size`) on the heap.
    pub fn new(size_bytes: u64, block_size: u32) -> Result<MemDevice> {
        check_block_size(block_size)?;
        if size_bytes == 0 || !size_bytes.is_multiple_of(block_size as u64) {
            return Err(Error::InvalidArgument(format!(
                "memory device size {size_bytes} is not a positive multiple of {block_size}"
            )));
        }
        let size = usize::try_from(size_bytes)
            .map_err(|_| Error::InvalidArgument(format!("size {size_bytes} too large")))?;
        Ok(MemDevice {
            store: Arc::new(Store::heap(size)),
            geometry: geometry(size_bytes, block_size),
            id: DeviceId::fresh(),
            shared: None,
        })
    }

    /// Opens (or creates, see [`ShmOptions::create`]) `path` and maps it
    /// shared, so the device's blocks are the file's bytes: another process
    /// opening the same path later sees every completed write. Meant for a
    /// file on tmpfs (e.g. under /dev/shm), where the pages are the memory.
    /// Locks the file exclusively: fails with [`Error::Busy`] if another
    /// device holds it. The file must not be truncated by anyone while the
    /// device is open (the mapping would fault).
    pub fn open_shared(path: impl AsRef<Path>, options: ShmOptions) -> Result<MemDevice> {
        let path = path.as_ref();
        let shown = path.display();
        if let Some(bs) = options.block_size {
            check_block_size(bs)
                .map_err(|e| Error::InvalidArgument(format!("shm device {shown}: {e}")))?;
        }
        super::open_maybe_creating(
            "shm device",
            path,
            options.size_bytes,
            options.create,
            |may_create| Self::open_shared_inner(path, options, may_create),
        )
    }

    fn open_shared_inner(path: &Path, options: ShmOptions, may_create: bool) -> Result<MemDevice> {
        let shown = path.display();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(may_create)
            .mode(0o644)
            .open(path)
            .map_err(|e| Error::Os {
                context: if e.kind() == std::io::ErrorKind::NotFound {
                    format!("opening shm device {shown} (give size=<size> to create it)")
                } else {
                    format!("opening shm device {shown}")
                },
                source: e,
            })?;
        let file = FileLock::exclusive(file, path)?;
        let meta = file.metadata().map_err(|e| Error::Os {
            context: format!("stat of shm device {shown}"),
            source: e,
        })?;
        if !meta.file_type().is_file() {
            return Err(Error::Unsupported(format!(
                "{shown} is not a regular file; shm devices map a file (e.g. under /dev/shm)"
            )));
        }
        let bs = options.block_size.unwrap_or(DEFAULT_SHM_BLOCK_SIZE);
        let size_bytes = match options.size_bytes {
            Some(size) => {
                if !size.is_multiple_of(bs as u64) {
                    return Err(Error::InvalidArgument(format!(
                        "shm device {shown}: size {size} is not a multiple of the block size {bs}"
                    )));
                }
                if meta.len() < size {
                    file.set_len(size).map_err(|e| Error::Os {
                        context: format!("growing {shown} to {size} bytes"),
                        source: e,
                    })?;
                }
                size
            }
            None => {
                let len = meta.len();
                if len < bs as u64 {
                    return Err(Error::DeviceTooSmall(format!(
                        "{shown} holds {len} bytes, less than one {bs}-byte block; give \
                         size=<size> to grow it"
                    )));
                }
                if !len.is_multiple_of(bs as u64) {
                    return Err(Error::InvalidArgument(format!(
                        "shm device {shown}: the file holds {len} bytes, not a multiple of the \
                         block size {bs}; give size=<size> (a multiple of {bs}) to use part of it"
                    )));
                }
                len
            }
        };
        let size = usize::try_from(size_bytes).map_err(|_| {
            Error::InvalidArgument(format!("shm device {shown}: size {size_bytes} too large"))
        })?;
        reserve(&file, size_bytes, path)?;
        // SAFETY: a fresh shared read-write mapping of `size` bytes of an
        // open descriptor (a positive length, checked above); no existing
        // memory is touched. The result is checked against MAP_FAILED.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(Error::Os {
                context: format!("mapping {size_bytes} bytes of shm device {shown}"),
                source: std::io::Error::last_os_error(),
            });
        }
        let Some(addr) = NonNull::new(addr.cast::<u8>()) else {
            return Err(Error::Unsupported(format!(
                "mapping {shown}: the kernel returned address 0"
            )));
        };
        let store = Store::mapped(addr, size);
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(MemDevice {
            store: Arc::new(store),
            geometry: geometry(size_bytes, bs),
            id: DeviceId::fresh(),
            shared: Some(Arc::new(SharedFile {
                _file: file,
                path,
                unsynced: super::unsynced_memory_path(&meta),
                options: ShmOptions {
                    size_bytes: Some(size_bytes),
                    block_size: Some(bs),
                    create: None,
                },
            })),
        })
    }

    /// The mapped file of a shared device (absolute), `None` on the heap.
    pub fn shared_path(&self) -> Option<&Path> {
        self.shared.as_ref().map(|s| s.path.as_path())
    }

    /// A device holding `image` (e.g. a [`MemDevice::snapshot`]), as after a restart.
    pub fn from_image(image: &[u8], block_size: u32) -> Result<MemDevice> {
        let dev = MemDevice::new(image.len() as u64, block_size)?;
        dev.store_bytes(0, image);
        Ok(dev)
    }

    /// A copy of the whole contents.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.store.size];
        self.load_bytes(0, &mut out);
        out
    }

    /// Copies bytes out of the device at a byte offset (test helper).
    pub fn load_bytes(&self, off: usize, dst: &mut [u8]) {
        self.store.for_pieces(off, dst.len(), |c, ic, at, n| {
            self.store.read(c, |chunk| {
                dst[at..at + n].copy_from_slice(&chunk[ic..ic + n])
            });
        });
    }

    /// Copies bytes into the device at a byte offset (test helper, e.g. to
    /// corrupt metadata on purpose).
    pub fn store_bytes(&self, off: usize, src: &[u8]) {
        self.store.for_pieces(off, src.len(), |c, ic, at, n| {
            self.store
                .write(c, ic..ic + n, |b| b.copy_from_slice(&src[at..at + n]));
        });
    }
}

/// Reserves the first `size` bytes of `file` in its file system, so a full
/// tmpfs fails the open instead of faulting a later write into a hole. A
/// file system without `fallocate` is used as it is.
fn reserve(file: &File, size: u64, path: &Path) -> Result<()> {
    let len = libc::off_t::try_from(size).map_err(|_| {
        Error::InvalidArgument(format!(
            "shm device {}: size {size} too large",
            path.display()
        ))
    })?;
    loop {
        // SAFETY: fallocate on a descriptor we hold open; no memory is passed.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP) => return Ok(()),
            _ => {
                return Err(Error::Os {
                    context: format!(
                        "reserving {size} bytes for shm device {} (is its file system full?)",
                        path.display()
                    ),
                    source: e,
                })
            }
        }
    }
}

impl BlockDevice for MemDevice {
    fn geometry(&self) -> Geometry {
        self.geometry
    }
    fn id(&self) -> DeviceId {
        self.id
    }
    fn name(&self) -> String {
        match &self.shared {
            Some(s) => DeviceSpec::Shm {
                path: s.path.clone(),
                options: s.options,
            }
            .to_string(),
            None => format!("mem:{}", self.geometry.size_bytes()),
        }
    }
    fn unsynced_memory(&self) -> Option<PathBuf> {
        self.shared.as_ref().map(|s| s.unsynced.clone())
    }
    /// A shared device's blocks are a tmpfs file beside its unsynced
    /// memory: both survive a killed process and neither a reboot, and no
    /// flush forces them anywhere (see the module docs). A heap device's
    /// blocks can outlive a mount's unsynced memory (a mount dropped
    /// without unmounting, the device kept), so it says false.
    fn volatile(&self) -> bool {
        self.shared.is_some()
    }
    /// A read is a copy into whatever memory the segment names.
    fn reads_into_any_memory(&self) -> bool {
        true
    }
    fn new_backend(&self) -> Result<Box<dyn ChannelBackend>> {
        Ok(Box::new(MemBackend {
            store: self.store.clone(),
            block_size: self.geometry.block_size as usize,
            done: VecDeque::new(),
        }))
    }
}

struct MemBackend {
    store: Arc<Store>,
    block_size: usize,
    done: VecDeque<Tag>,
}

impl ChannelBackend for MemBackend {
    fn submit(&mut self, tag: Tag, op: &IoOp) -> Result<()> {
        let off = op.lba.get() as usize * self.block_size;
        let st = &self.store;
        match op.kind {
            IoKind::Read | IoKind::Write => {
                let mut pos = off;
                for seg in &op.segs {
                    st.for_pieces(pos, seg.len(), |c, ic, at, n| {
                        if op.kind == IoKind::Read {
                            st.read(c, |chunk| {
                                // SAFETY: the segment belongs to this in-flight op.
                                unsafe { seg.write_at(at, &chunk[ic..ic + n]) }
                            })
                        } else {
                            st.write(c, ic..ic + n, |b| {
                                // SAFETY: as above.
                                unsafe { seg.read_at(at, b) }
                            })
                        }
                    });
                    pos += seg.len();
                }
            }
            IoKind::Unmap | IoKind::WriteZeroes => {
                st.for_pieces(off, op.blocks as usize * self.block_size, |c, ic, _, n| {
                    st.write(c, ic..ic + n, |b| b.fill(0));
                });
            }
            // Writes complete at submission, in the memory that is the
            // medium: nothing is left to make durable (see the module docs).
            IoKind::Flush => {}
        }
        self.done.push_back(tag);
        Ok(())
    }

    fn reap(&mut self, done: &mut dyn FnMut(Tag, Result<()>)) -> usize {
        let n = self.done.len();
        for tag in self.done.drain(..) {
            done(tag, Ok(()));
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// How many of chunk `c`'s pages this process has mapped (present in
    /// its page table, from `/proc/self/pagemap`).
    fn mapped_pages(store: &Store, c: usize) -> usize {
        let page = 4096usize;
        let chunk = &store.chunks[c];
        let first = chunk.ptr.as_ptr() as usize / page;
        let n = chunk.len / page;
        let mut entries = vec![0u8; n * 8];
        File::open("/proc/self/pagemap")
            .unwrap()
            .read_exact_at(&mut entries, first as u64 * 8)
            .unwrap();
        entries
            .chunks_exact(8)
            .filter(|e| u64::from_le_bytes((*e).try_into().unwrap()) >> 63 == 1)
            .count()
    }

    #[test]
    fn a_shared_region_is_mapped_whole_at_its_first_write() {
        let path = std::env::temp_dir().join(format!("blobstore-mem-pop-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let dev = MemDevice::open_shared(
            &path,
            ShmOptions {
                size_bytes: Some(3 * CHUNK_BYTES as u64),
                block_size: Some(4096),
                create: Some(true),
            },
        )
        .unwrap();
        std::fs::remove_file(&path).unwrap();
        let region = POPULATE_BYTES / 4096;
        assert_eq!(mapped_pages(&dev.store, 1), 0, "nothing touched yet");
        dev.store.write(1, 8192..12288, |b| b.fill(7));
        assert_eq!(mapped_pages(&dev.store, 1), region, "the first region");
        // A write across a region boundary maps the regions it touches.
        let edge = 2 * POPULATE_BYTES;
        dev.store.write(1, edge - 4096..edge + 4096, |b| b.fill(8));
        assert_eq!(mapped_pages(&dev.store, 1), 3 * region);
        assert_eq!(mapped_pages(&dev.store, 2), 0, "other chunks wait");
        assert!(dev.store.read(1, |b| b[..8192].iter().all(|&x| x == 0)
            && b[8192..12288].iter().all(|&x| x == 7)
            && b[12288..edge - 4096].iter().all(|&x| x == 0)
            && b[edge - 4096..edge + 4096].iter().all(|&x| x == 8)
            && b[edge + 4096..].iter().all(|&x| x == 0)));
    }
}
