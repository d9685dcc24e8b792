//! DMA memory for NVMe: pinned, IOVA-mapped chunks handed out as [`DmaBuf`]s.
//!
//! Memory comes in 2 MiB chunks (one hugepage when the system has them
//! reserved, else ordinary pages, which the VFIO map pins), each mapped once
//! at an IOVA from [`IovaAllocator`]. Buffers up to a chunk are carved out of
//! chunks page by page; larger ones get a mapping of their own, unmapped when
//! they are freed.
//!
//! Small buffers (up to [`CACHE_MAX_PAGES`] pages) freed on a thread are
//! kept by that thread (up to [`CACHE_PER_THREAD`] of them) for its next
//! allocation of the same size: the I/O path then takes no lock and scans
//! no bitmap. Cached pages stay marked used; they go back to the pool when
//! the cache is full or the thread exits.
//!
//! Freed large buffers keep their mapping (up to [`LARGE_CACHE_MAPPINGS`]
//! of them, [`LARGE_CACHE_BYTES`] in all) for the next large buffer of the
//! same size: no mmap, VFIO map and unmap per large I/O buffer.
//!
//! [`DmaPool::alloc`] zeroes what it lends; [`DmaPool::alloc_for_overwrite`]
//! does not, for buffers the device or the caller overwrites whole (read
//! targets, bounce buffers): their bytes are whatever this process last
//! left there.
//!
//! Invariants:
//! - Every byte of a buffer from the pool lies inside one mapping, so a
//!   buffer is contiguous in IOVA space: `iova(ptr + k) = iova(ptr) + k`.
//! - A page is lent to at most one buffer or one thread cache at a time
//!   (the chunk bitmap), and is zeroed before it is lent to a buffer by
//!   `alloc`. A large mapping is lent to at most one buffer or held by the
//!   large cache, and stays in `large` (mapped) while either holds it.
//! - IOVA ranges never overlap and stay clear of the x86 MSI window below
//!   4 GiB (the allocator starts at 4 GiB).
//! - The pool's memory is only touched through raw pointers here; safe code
//!   reaches it through the `DmaBuf` it was lent to.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ptr::NonNull;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::device::dma::{DmaMapping, DmaRelease};
use crate::device::{DmaBuf, Iova, DMA_ALIGN};
use crate::error::{Error, Result};

/// Bytes per chunk (one x86 hugepage).
pub const CHUNK_BYTES: usize = 2 << 20;
const PAGES_PER_CHUNK: usize = CHUNK_BYTES / DMA_ALIGN;
/// Largest buffer (in pages) a thread cache keeps.
pub const CACHE_MAX_PAGES: usize = 16;
/// Buffers one thread cache keeps.
pub const CACHE_PER_THREAD: usize = 64;
/// First IOVA handed out.
pub const IOVA_BASE: u64 = 1 << 32;
/// End of the IOVA space used (QEMU's intel-iommu has 39 address bits).
pub const IOVA_LIMIT: u64 = 1 << 38;
/// Freed large mappings kept for reuse.
pub const LARGE_CACHE_MAPPINGS: usize = 8;
/// Bytes of freed large mappings kept for reuse, at most.
pub const LARGE_CACHE_BYTES: usize = 64 << 20;

/// Makes memory visible to the device at an IOVA (VFIO DMA map on
/// hardware, nothing in tests).
pub trait DmaMapper: Send + Sync {
    /// Maps `len` bytes at `va` to `iova`.
    ///
    /// # Safety
    /// The memory must stay allocated until `unmap` of the same range, and
    /// must never be the target of a Rust reference while the device may
    /// access it.
    unsafe fn map(&self, va: *mut u8, len: usize, iova: Iova) -> Result<()>;
    /// Removes the mapping made by `map` at `iova`.
    fn unmap(&self, iova: Iova, len: usize) -> Result<()>;
}

/// First-fit allocator of IOVA ranges, coalescing on free.
#[derive(Debug)]
pub struct IovaAllocator {
    /// Free ranges: start -> length.
    free: BTreeMap<u64, u64>,
}

impl IovaAllocator {
    /// An allocator of `[base, limit)`.
    pub fn new(base: u64, limit: u64) -> IovaAllocator {
        IovaAllocator {
            free: BTreeMap::from([(base, limit - base)]),
        }
    }

    /// `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> Option<Iova> {
        debug_assert!(align.is_power_of_two() && len > 0);
        let (start, flen, at) = self.free.iter().find_map(|(&s, &l)| {
            let at = s.next_multiple_of(align);
            (at + len <= s + l).then_some((s, l, at))
        })?;
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - start);
        }
        if at + len < start + flen {
            self.free.insert(at + len, start + flen - at - len);
        }
        Some(Iova(at))
    }

    /// Gives back a range from `alloc`.
    pub fn free(&mut self, iova: Iova, len: u64) {
        let (mut start, mut len) = (iova.0, len);
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            debug_assert!(ps + pl <= start, "double free of IOVA {start:#x}");
            if ps + pl == start {
                self.free.remove(&ps);
                start = ps;
                len += pl;
            }
        }
        if let Some(&nl) = self.free.get(&(start + len)) {
            self.free.remove(&(start + len));
            len += nl;
        }
        self.free.insert(start, len);
    }

    /// Bytes free.
    #[cfg(test)]
    pub fn free_bytes(&self) -> u64 {
        self.free.values().sum()
    }
}

/// Anonymous memory from mmap: hugepages when possible.
struct Mapping {
    va: NonNull<u8>,
    len: usize,
    hugepages: bool,
}

impl Mapping {
    fn new(len: usize, try_huge: bool) -> Result<Mapping> {
        let base = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE;
        let attempts: &[(i32, bool)] = if try_huge {
            &[(base | libc::MAP_HUGETLB, true), (base, false)]
        } else {
            &[(base, false)]
        };
        for &(flags, hugepages) in attempts {
            // SAFETY: an anonymous mapping at an address the kernel picks;
            // no existing memory is affected.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                let va = NonNull::new(p.cast::<u8>()).expect("mmap never returns null");
                return Ok(Mapping { va, len, hugepages });
            }
        }
        Err(Error::last_os(format!("mmap of {len} bytes of DMA memory")))
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the range came from mmap in `Mapping::new` and no buffer
        // refers to it any more (the pool drops mappings last).
        unsafe { libc::munmap(self.va.as_ptr().cast(), self.len) };
    }
}

struct Chunk {
    mem: Mapping,
    iova: Iova,
    used: [u64; PAGES_PER_CHUNK / 64],
}

impl Chunk {
    fn is_used(&self, page: usize) -> bool {
        self.used[page / 64] >> (page % 64) & 1 == 1
    }
    fn set(&mut self, first: usize, n: usize, used: bool) {
        for p in first..first + n {
            debug_assert_ne!(self.is_used(p), used);
            if used {
                self.used[p / 64] |= 1 << (p % 64);
            } else {
                self.used[p / 64] &= !(1 << (p % 64));
            }
        }
    }
    fn find_free(&self, n: usize) -> Option<usize> {
        let mut run = 0;
        for p in 0..PAGES_PER_CHUNK {
            if self.is_used(p) {
                run = 0;
            } else {
                run += 1;
                if run == n {
                    return Some(p + 1 - n);
                }
            }
        }
        None
    }
}

struct PoolState {
    chunks: Vec<Chunk>,
    large: HashMap<u64, Mapping>,
    /// Memory of callers mapped with [`DmaPool::map_external`]: IOVA ->
    /// (address, length).
    external: BTreeMap<u64, (usize, usize)>,
    iovas: IovaAllocator,
}

/// The DMA memory of every NVMe controller of the process (they share one
/// VFIO container, hence one IOVA space).
pub struct DmaPool {
    mapper: Box<dyn DmaMapper>,
    state: Mutex<PoolState>,
    /// Freed large mappings, still mapped and in `PoolState::large`, as
    /// (IOVA, bytes). Locked only with `state` held.
    large_free: Mutex<Vec<(Iova, usize)>>,
    try_huge: bool,
}

// SAFETY: the raw pointers inside the state are only used under the mutex or
// by the buffer that owns the range.
unsafe impl Send for DmaPool {}
// SAFETY: as above.
unsafe impl Sync for DmaPool {}

impl DmaPool {
    /// A pool mapping its memory through `mapper`; `try_huge` asks for
    /// hugepage-backed chunks first.
    pub fn new(mapper: Box<dyn DmaMapper>, try_huge: bool) -> Arc<DmaPool> {
        Arc::new(DmaPool {
            mapper,
            state: Mutex::new(PoolState {
                chunks: Vec::new(),
                large: HashMap::new(),
                external: BTreeMap::new(),
                iovas: IovaAllocator::new(IOVA_BASE, IOVA_LIMIT),
            }),
            large_free: Mutex::new(Vec::new()),
            try_huge,
        })
    }

    /// True when hugepages are reserved on this system
    /// (`/proc/sys/vm/nr_hugepages` > 0).
    pub fn system_has_hugepages() -> bool {
        std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .is_some_and(|n| n > 0)
    }

    /// (chunks, how many of them are hugepages, large mappings).
    pub fn stats(&self) -> (usize, usize, usize) {
        let st = self.state.lock();
        let huge = st.chunks.iter().filter(|c| c.mem.hugepages).count();
        (st.chunks.len(), huge, st.large.len())
    }

    fn map_new(&self, st: &mut PoolState, len: usize) -> Result<(Mapping, Iova)> {
        let mem = Mapping::new(len, self.try_huge)?;
        let iova = st
            .iovas
            .alloc(len as u64, CHUNK_BYTES as u64)
            .ok_or_else(|| Error::NoSpace("IOVA space for DMA memory".into()))?;
        // SAFETY: `mem` is a fresh mapping that the pool keeps until after
        // the unmap; no reference to it exists.
        if let Err(e) = unsafe { self.mapper.map(mem.va.as_ptr(), len, iova) } {
            st.iovas.free(iova, len as u64);
            return Err(e);
        }
        Ok((mem, iova))
    }

    /// A zeroed buffer of `len_bytes` whose memory the device can reach.
    pub fn alloc(self: &Arc<Self>, len_bytes: usize) -> Result<DmaBuf> {
        self.lend(len_bytes, true)
    }

    /// As [`DmaPool::alloc`], without zeroing: for a buffer that will be
    /// overwritten whole (a read target, a bounce buffer). Its bytes are
    /// whatever this process last left in that memory.
    pub fn alloc_for_overwrite(self: &Arc<Self>, len_bytes: usize) -> Result<DmaBuf> {
        self.lend(len_bytes, false)
    }

    fn lend(self: &Arc<Self>, len_bytes: usize, zero: bool) -> Result<DmaBuf> {
        let pages = len_bytes.max(1).div_ceil(DMA_ALIGN);
        if pages <= CACHE_MAX_PAGES {
            if let Some(c) = take_cached(self, pages) {
                if zero {
                    // SAFETY: the cached pages are lent to no buffer (the
                    // cache held them) and lie inside a live chunk mapping.
                    unsafe { std::ptr::write_bytes(c.ptr.as_ptr(), 0, pages * DMA_ALIGN) };
                }
                // SAFETY: as for a fresh lease below: aligned, initialised,
                // owned by this buffer until the lease is released.
                return Ok(unsafe {
                    DmaBuf::from_pool(
                        c.ptr,
                        pages * DMA_ALIGN,
                        len_bytes,
                        Some(c.iova),
                        Box::new(c.lease),
                    )
                });
            }
        }
        let mut st = self.state.lock();
        let (ptr, iova, release): (NonNull<u8>, Iova, Box<dyn DmaRelease>) =
            if pages <= PAGES_PER_CHUNK {
                let found = st
                    .chunks
                    .iter()
                    .enumerate()
                    .find_map(|(i, c)| c.find_free(pages).map(|p| (i, p)));
                let (ci, first) = match found {
                    Some(f) => f,
                    None => {
                        let (mem, iova) = self.map_new(&mut st, CHUNK_BYTES)?;
                        st.chunks.push(Chunk {
                            mem,
                            iova,
                            used: [0; PAGES_PER_CHUNK / 64],
                        });
                        (st.chunks.len() - 1, 0)
                    }
                };
                let c = &mut st.chunks[ci];
                c.set(first, pages, true);
                // SAFETY: first + pages <= PAGES_PER_CHUNK, inside the chunk.
                let ptr = unsafe { c.mem.va.as_ptr().add(first * DMA_ALIGN) };
                let iova = c.iova.offset((first * DMA_ALIGN) as u64);
                let lease = ChunkLease {
                    pool: self.clone(),
                    chunk: ci,
                    first,
                    pages,
                    ptr: NonNull::new(ptr).expect("inside a mapping"),
                    iova,
                };
                (
                    NonNull::new(ptr).expect("inside a mapping"),
                    iova,
                    Box::new(lease),
                )
            } else {
                let len = pages.div_ceil(PAGES_PER_CHUNK) * CHUNK_BYTES;
                let reused = {
                    let mut free = self.large_free.lock();
                    let at = free.iter().position(|&(_, l)| l == len);
                    at.map(|i| free.swap_remove(i).0)
                };
                let (ptr, iova) = match reused.and_then(|i| st.large.get(&i.0).map(|m| (m.va, i))) {
                    Some(found) => found,
                    None => {
                        let (mem, iova) = self.map_new(&mut st, len)?;
                        let ptr = mem.va;
                        st.large.insert(iova.0, mem);
                        (ptr, iova)
                    }
                };
                let lease = LargeLease {
                    pool: self.clone(),
                    iova,
                    len,
                };
                (ptr, iova, Box::new(lease))
            };
        drop(st);
        if zero {
            // SAFETY: the pages are lent to this buffer alone (bitmap or own
            // mapping) and lie inside a live mapping.
            unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, pages * DMA_ALIGN) };
        }
        // SAFETY: aligned (page offsets of page-aligned mappings), valid and
        // initialised for pages * DMA_ALIGN bytes, owned by this buffer
        // until the lease is released.
        Ok(unsafe { DmaBuf::from_pool(ptr, pages * DMA_ALIGN, len_bytes, Some(iova), release) })
    }

    /// Maps `len` bytes at `ptr`, memory the caller owns, at a fresh IOVA
    /// (2 MiB-aligned, so hugepages stay whole in the IOMMU), until the
    /// returned mapping is dropped.
    ///
    /// # Safety
    /// As [`crate::BlockDevice::map_dma`]: the memory stays mapped, with the
    /// same pages behind it, until the mapping is dropped.
    pub unsafe fn map_external(
        self: &Arc<Self>,
        ptr: NonNull<u8>,
        len: usize,
    ) -> Result<DmaMapping> {
        if len == 0 || !(ptr.as_ptr() as usize).is_multiple_of(DMA_ALIGN) {
            return Err(Error::InvalidArgument(format!(
                "DMA map of {len} bytes at {:p}: empty or not page-aligned",
                ptr.as_ptr()
            )));
        }
        let len = len.div_ceil(DMA_ALIGN) * DMA_ALIGN;
        let mut st = self.state.lock();
        let iova = st
            .iovas
            .alloc(len as u64, CHUNK_BYTES as u64)
            .ok_or_else(|| Error::NoSpace("IOVA space for DMA memory".into()))?;
        // SAFETY: the caller keeps the memory mapped until the mapping is
        // dropped, which unmaps it first.
        if let Err(e) = unsafe { self.mapper.map(ptr.as_ptr(), len, iova) } {
            st.iovas.free(iova, len as u64);
            return Err(e);
        }
        st.external.insert(iova.0, (ptr.as_ptr() as usize, len));
        Ok(DmaMapping::new(
            iova,
            len,
            Box::new(ExternalLease {
                pool: self.clone(),
                iova,
                len,
            }),
        ))
    }

    /// Takes `len` bytes at `iova` away from the device and frees the IOVA
    /// range (the caller drops its own record of the mapping).
    fn unmap_locked(&self, st: &mut PoolState, iova: Iova, len: usize) {
        let _ = self.mapper.unmap(iova, len);
        st.iovas.free(iova, len as u64);
    }

    /// Where `len` bytes at `iova` are in this process, if the pool mapped
    /// them (the software controller, [`super::soft`], plays the device
    /// through it).
    #[doc(hidden)]
    pub fn translate(&self, iova: u64, len: usize) -> Option<*mut u8> {
        let st = self.state.lock();
        let inside =
            |base: Iova, mlen: usize| iova >= base.0 && iova + len as u64 <= base.0 + mlen as u64;
        for c in &st.chunks {
            if inside(c.iova, CHUNK_BYTES) {
                // SAFETY: inside the chunk's mapping.
                return Some(unsafe { c.mem.va.as_ptr().add((iova - c.iova.0) as usize) });
            }
        }
        for (&base, m) in &st.large {
            if inside(Iova(base), m.len) {
                // SAFETY: inside the large mapping.
                return Some(unsafe { m.va.as_ptr().add((iova - base) as usize) });
            }
        }
        let (&base, &(va, mlen)) = st.external.range(..=iova).next_back()?;
        inside(Iova(base), mlen).then(|| (va + (iova - base) as usize) as *mut u8)
    }
}

impl Drop for DmaPool {
    fn drop(&mut self) {
        let st = self.state.get_mut();
        for c in &st.chunks {
            let _ = self.mapper.unmap(c.iova, CHUNK_BYTES);
        }
        // Only cached large mappings are left (a lent one holds the pool).
        for &(iova, len) in self.large_free.get_mut().iter() {
            let _ = self.mapper.unmap(iova, len);
        }
    }
}

struct ChunkLease {
    pool: Arc<DmaPool>,
    chunk: usize,
    first: usize,
    pages: usize,
    ptr: NonNull<u8>,
    iova: Iova,
}

// SAFETY: the lease is a claim on pages of the pool; the pointer is only
// used to hand the same pages out again.
unsafe impl Send for ChunkLease {}
// SAFETY: as above; a lease exposes no access to the memory.
unsafe impl Sync for ChunkLease {}

impl ChunkLease {
    fn give_back(&self) {
        self.pool.state.lock().chunks[self.chunk].set(self.first, self.pages, false);
    }
}

impl DmaRelease for ChunkLease {
    fn release(&mut self) {
        if self.pages <= CACHE_MAX_PAGES {
            let kept = FREED
                .try_with(|f| {
                    let mut f = f.borrow_mut();
                    if f.len() >= CACHE_PER_THREAD {
                        return false;
                    }
                    f.push(Cached(Some(CachedRun {
                        lease: ChunkLease {
                            pool: self.pool.clone(),
                            ..*self
                        },
                        ptr: self.ptr,
                        iova: self.iova,
                    })));
                    true
                })
                .unwrap_or(false);
            if kept {
                return;
            }
        }
        self.give_back();
    }
}

/// A freed small buffer's pages, kept by the thread that freed them.
struct CachedRun {
    lease: ChunkLease,
    ptr: NonNull<u8>,
    iova: Iova,
}

/// Gives the pages back to their pool when the cache lets go of them (the
/// thread exits) without lending them again.
struct Cached(Option<CachedRun>);

impl Drop for Cached {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            c.lease.give_back();
        }
    }
}

thread_local! {
    static FREED: RefCell<Vec<Cached>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `pages` pages of `pool` from this thread's cache.
fn take_cached(pool: &Arc<DmaPool>, pages: usize) -> Option<CachedRun> {
    FREED
        .try_with(|f| {
            let mut f = f.borrow_mut();
            let at = f.iter().rposition(|c| {
                c.0.as_ref()
                    .is_some_and(|r| r.lease.pages == pages && Arc::ptr_eq(&r.lease.pool, pool))
            })?;
            f.swap_remove(at).0.take()
        })
        .ok()
        .flatten()
}

struct LargeLease {
    pool: Arc<DmaPool>,
    iova: Iova,
    len: usize,
}

impl DmaRelease for LargeLease {
    fn release(&mut self) {
        let mut st = self.pool.state.lock();
        {
            let mut free = self.pool.large_free.lock();
            let cached: usize = free.iter().map(|f| f.1).sum();
            if free.len() < LARGE_CACHE_MAPPINGS && cached + self.len <= LARGE_CACHE_BYTES {
                // Kept mapped for the next large buffer of this size.
                free.push((self.iova, self.len));
                return;
            }
        }
        self.pool.unmap_locked(&mut st, self.iova, self.len);
        st.large.remove(&self.iova.0);
    }
}

/// A caller's memory mapped by [`DmaPool::map_external`].
struct ExternalLease {
    pool: Arc<DmaPool>,
    iova: Iova,
    len: usize,
}

impl DmaRelease for ExternalLease {
    fn release(&mut self) {
        let mut st = self.pool.state.lock();
        self.pool.unmap_locked(&mut st, self.iova, self.len);
        st.external.remove(&self.iova.0);
    }
}

/// A mapper that maps nothing (memory the software controller reaches
/// through [`DmaPool::translate`]).
#[doc(hidden)]
pub struct NoMapper;

impl DmaMapper for NoMapper {
    unsafe fn map(&self, _va: *mut u8, _len: usize, _iova: Iova) -> Result<()> {
        Ok(())
    }
    fn unmap(&self, _iova: Iova, _len: usize) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iova_allocator_aligns_splits_and_coalesces() {
        let mut a = IovaAllocator::new(0x1000, 0x100000);
        let total = a.free_bytes();
        let x = a.alloc(0x3000, 0x10000).unwrap();
        assert_eq!(x, Iova(0x10000));
        let y = a.alloc(0x1000, 0x1000).unwrap();
        assert_eq!(y, Iova(0x1000), "first fit uses the gap before x");
        let z = a.alloc(0x20000, 0x10000).unwrap();
        assert_eq!(z, Iova(0x20000));
        assert!(a.alloc(0x200000, 0x1000).is_none());
        a.free(x, 0x3000);
        a.free(z, 0x20000);
        a.free(y, 0x1000);
        assert_eq!(a.free_bytes(), total);
        assert_eq!(a.free.len(), 1, "all ranges coalesced");
    }

    #[test]
    fn pool_buffers_are_contiguous_zeroed_and_reused() {
        let pool = DmaPool::new(Box::new(NoMapper), false);
        let mut a = pool.alloc(4096).unwrap();
        let b = pool.alloc(10000).unwrap();
        assert_eq!(b.capacity(), 3 * 4096);
        let (ia, ib) = (a.iova().unwrap(), b.iova().unwrap());
        assert_eq!(ia.0 % 4096, 0);
        assert_eq!(ib, ia.offset(4096), "second buffer follows the first");
        assert_eq!(pool.translate(ib.0, 10000), Some(b.as_ptr() as *mut u8));
        a.fill(0xAB);
        let seg = b.segment(512, 1024);
        assert_eq!(seg.iova(), Some(ib.offset(512)));
        drop(a);
        let c = pool.alloc(4096).unwrap();
        assert_eq!(c.iova(), Some(ia), "freed pages are reused");
        assert!(c.iter().all(|&x| x == 0), "reused pages are zeroed");
        let big = pool.alloc(5 << 20).unwrap();
        assert_eq!(pool.stats(), (1, 0, 1));
        assert_eq!(big.iova().unwrap().0 % CHUNK_BYTES as u64, 0);
        drop(big);
        assert_eq!(pool.stats(), (1, 0, 1), "kept mapped for reuse");
        // A full chunk makes the pool grow.
        let fill = pool.alloc(CHUNK_BYTES).unwrap();
        assert_eq!(pool.stats().0, 2);
        drop((fill, b, c));
    }

    fn used_pages(pool: &DmaPool) -> usize {
        let st = pool.state.lock();
        st.chunks
            .iter()
            .map(|c| (0..PAGES_PER_CHUNK).filter(|&p| c.is_used(p)).count())
            .sum()
    }

    #[test]
    fn freed_small_buffers_stay_with_their_thread_until_it_exits() {
        let pool = DmaPool::new(Box::new(NoMapper), false);
        let mut a = pool.alloc(8192).unwrap();
        let ia = a.iova().unwrap();
        a.fill(0xCD);
        drop(a);
        assert_eq!(used_pages(&pool), 2, "kept by this thread's cache");
        // Another thread does not get them: it takes pages from the pool.
        let p2 = pool.clone();
        let other = std::thread::spawn(move || {
            let b = p2.alloc(8192).unwrap();
            let ib = b.iova().unwrap();
            drop(b); // cached by that thread, given back when it exits
            ib
        })
        .join()
        .unwrap();
        assert_ne!(other, ia);
        assert_eq!(
            used_pages(&pool),
            2,
            "the exited thread gave its pages back"
        );
        // This thread gets its own back, zeroed, without the pool.
        let c = pool.alloc(8000).unwrap();
        assert_eq!(c.iova(), Some(ia));
        assert!(c.iter().all(|&x| x == 0));
        // Large buffers are never cached.
        let big = pool.alloc((CACHE_MAX_PAGES + 1) * DMA_ALIGN).unwrap();
        drop(big);
        assert_eq!(used_pages(&pool), 2);
        drop(c);
    }
}

#[cfg(test)]
mod reuse_tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts maps and unmaps.
    struct CountingMapper(Arc<(AtomicUsize, AtomicUsize)>);

    impl DmaMapper for CountingMapper {
        unsafe fn map(&self, _va: *mut u8, _len: usize, _iova: Iova) -> Result<()> {
            self.0 .0.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn unmap(&self, _iova: Iova, _len: usize) -> Result<()> {
            self.0 .1.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    #[test]
    fn large_mappings_are_reused_not_mapped_per_buffer() {
        let counts = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
        let pool = DmaPool::new(Box::new(CountingMapper(counts.clone())), false);
        let maps = || counts.0.load(Ordering::Relaxed);
        let unmaps = || counts.1.load(Ordering::Relaxed);
        let mut first = pool.alloc(5 << 20).unwrap();
        let iova = first.iova().unwrap();
        first.fill(0x5A);
        drop(first);
        assert_eq!((maps(), unmaps()), (1, 0));
        for _ in 0..100 {
            let b = pool.alloc(5 << 20).unwrap();
            assert_eq!(b.iova(), Some(iova), "the same mapping again");
            assert!(b.iter().all(|&x| x == 0), "alloc still zeroes");
        }
        assert_eq!((maps(), unmaps()), (1, 0), "no map or unmap per buffer");
        // Another size maps its own; the cache is bounded.
        let bufs: Vec<DmaBuf> = (0..LARGE_CACHE_MAPPINGS + 2)
            .map(|_| pool.alloc(6 << 20).unwrap())
            .collect();
        drop(bufs);
        let cached: usize = pool.large_free.lock().iter().map(|f| f.1).sum();
        assert!(pool.large_free.lock().len() <= LARGE_CACHE_MAPPINGS);
        assert!(cached <= LARGE_CACHE_BYTES);
        assert!(unmaps() >= 2, "past the bound, mappings are unmapped");
        drop(pool);
        assert_eq!(maps(), unmaps(), "everything unmapped with the pool");
    }

    #[test]
    fn buffers_for_overwrite_are_not_zeroed() {
        let pool = DmaPool::new(Box::new(NoMapper), false);
        for len in [4096, 3 << 20] {
            let mut a = pool.alloc(len).unwrap();
            let iova = a.iova();
            a.fill(0x77);
            drop(a);
            let b = pool.alloc_for_overwrite(len).unwrap();
            assert_eq!(b.iova(), iova);
            assert!(b.iter().all(|&x| x == 0x77), "{len}: left as it was");
            drop(b);
            let c = pool.alloc(len).unwrap();
            assert!(c.iter().all(|&x| x == 0), "{len}: alloc zeroes");
        }
    }
}
