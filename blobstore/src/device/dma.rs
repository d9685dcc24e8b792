//! DMA-able buffers.
//!
//! Invariants:
//! - A [`DmaBuf`]'s memory is aligned to [`DMA_ALIGN`] and its length is a
//!   multiple of nothing in particular; devices check block multiples.
//! - The memory lives in a reference-counted allocation: a buffer handed to a
//!   device operation stays valid until the device completes, even if the
//!   future that owned it is dropped first.
//! - A `DmaBuf` is the only handle through which safe code can reach the
//!   memory; in-flight device operations reach it through raw segments.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Alignment of every DMA buffer (one 4 KiB page).
pub const DMA_ALIGN: usize = 4096;

/// An I/O virtual address: where a device sees a piece of DMA memory
/// through the IOMMU. Not a pointer in this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Iova(pub u64);

impl Iova {
    /// The address `bytes` further on.
    pub fn offset(self, bytes: u64) -> Iova {
        Iova(self.0 + bytes)
    }
}

/// Gives memory that a [`DmaBuf`] borrowed from a pool back to it (called
/// once, when the last reference to the buffer's memory goes).
pub trait DmaRelease: Send + Sync {
    /// Returns the memory to its owner.
    fn release(&mut self);
}

/// Memory its owner keeps (a shared mapping, say) made reachable by a device
/// at an [`Iova`] (see [`crate::BlockDevice::map_dma`]); the device loses
/// it when this is dropped.
pub struct DmaMapping {
    iova: Iova,
    len: usize,
    unmap: Box<dyn DmaRelease>,
}

impl DmaMapping {
    /// A mapping of `len` bytes seen by the device at `iova`, taken away by
    /// `unmap` on drop.
    pub fn new(iova: Iova, len: usize, unmap: Box<dyn DmaRelease>) -> DmaMapping {
        DmaMapping { iova, len, unmap }
    }

    /// Where the device sees the first byte.
    pub fn iova(&self) -> Iova {
        self.iova
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty mapping.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for DmaMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DmaMapping({} bytes at iova {:#x})",
            self.len, self.iova.0
        )
    }
}

impl Drop for DmaMapping {
    fn drop(&mut self) {
        self.unmap.release();
    }
}

enum AllocOwner {
    /// `alloc_zeroed` with this layout.
    Heap(Layout),
    /// Memory lent by a pool (e.g. VFIO-mapped hugepages, or a caller's
    /// shared mapping).
    Pool(Box<dyn DmaRelease>),
}

/// One zeroed, page-aligned allocation: ordinary heap memory, or memory lent
/// by a device's DMA pool with a known [`Iova`]. Freed (or given back) when
/// the last reference (the buffer or an in-flight operation) goes.
pub(crate) struct DmaAlloc {
    ptr: NonNull<u8>,
    size: usize,
    iova: Option<Iova>,
    owner: AllocOwner,
}

// SAFETY: the allocation is plain memory owned by this struct; access to the
// bytes is coordinated by `DmaBuf` ownership and by the device protocol.
unsafe impl Send for DmaAlloc {}
// SAFETY: as above; `DmaAlloc` itself exposes no interior access.
unsafe impl Sync for DmaAlloc {}

impl Drop for DmaAlloc {
    fn drop(&mut self) {
        match &mut self.owner {
            // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout.
            AllocOwner::Heap(layout) => unsafe { dealloc(self.ptr.as_ptr(), *layout) },
            AllocOwner::Pool(release) => release.release(),
        }
    }
}

/// A page-aligned buffer that devices can read into and write from without a
/// copy. Obtain one from [`crate::BlockDevice::alloc_buf`] or [`DmaBuf::new`].
pub struct DmaBuf {
    alloc: Arc<DmaAlloc>,
    len: usize,
}

impl DmaBuf {
    /// Allocates a zeroed buffer of `len_bytes` bytes, aligned to [`DMA_ALIGN`].
    pub fn new(len_bytes: usize) -> Result<DmaBuf> {
        let size = len_bytes.max(1).div_ceil(DMA_ALIGN) * DMA_ALIGN;
        let layout = Layout::from_size_align(size, DMA_ALIGN)
            .map_err(|e| Error::InvalidArgument(format!("buffer of {len_bytes} bytes: {e}")))?;
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr)
            .ok_or_else(|| Error::NoSpace(format!("cannot allocate a {len_bytes}-byte buffer")))?;
        Ok(DmaBuf {
            alloc: Arc::new(DmaAlloc {
                ptr,
                size,
                iova: None,
                owner: AllocOwner::Heap(layout),
            }),
            len: len_bytes,
        })
    }

    /// A buffer over pool memory: `capacity` bytes at `ptr`, seen by devices
    /// at `iova`, given back through `release` when the last reference goes.
    ///
    /// # Safety
    /// `ptr` must be aligned to [`DMA_ALIGN`], valid for reads and writes of
    /// `capacity` bytes that are initialised, and owned by this buffer alone
    /// until `release` runs.
    pub(crate) unsafe fn from_pool(
        ptr: NonNull<u8>,
        capacity: usize,
        len_bytes: usize,
        iova: Option<Iova>,
        release: Box<dyn DmaRelease>,
    ) -> DmaBuf {
        debug_assert!(len_bytes <= capacity);
        debug_assert_eq!(ptr.as_ptr() as usize % DMA_ALIGN, 0);
        DmaBuf {
            alloc: Arc::new(DmaAlloc {
                ptr,
                size: capacity,
                iova,
                owner: AllocOwner::Pool(release),
            }),
            len: len_bytes,
        }
    }

    /// A buffer over memory its caller owns (a slot of a shared mapping,
    /// say): `capacity` bytes at `ptr`, of which the first `len_bytes` are
    /// visible, given back through `release` when the last reference goes
    /// (the buffer's, or an in-flight operation's). `iova` is where the
    /// device that will do I/O with it sees `ptr`, when the memory was
    /// mapped for it ([`crate::BlockDevice::map_dma`]); devices that need
    /// IOVA-mapped memory copy buffers without one through their own.
    ///
    /// # Safety
    /// `ptr` must be aligned to [`DMA_ALIGN`], valid for reads and writes of
    /// `capacity` initialised bytes, and reached by nobody else until
    /// `release` runs; with an `iova`, the mapping it comes from must cover
    /// `capacity` bytes and outlive the buffer and every I/O on it.
    pub unsafe fn from_external(
        ptr: NonNull<u8>,
        capacity: usize,
        len_bytes: usize,
        iova: Option<Iova>,
        release: Box<dyn DmaRelease>,
    ) -> Result<DmaBuf> {
        if len_bytes > capacity || !(ptr.as_ptr() as usize).is_multiple_of(DMA_ALIGN) {
            return Err(Error::InvalidArgument(format!(
                "external buffer of {capacity} bytes at {:p}: length {len_bytes} or alignment",
                ptr.as_ptr()
            )));
        }
        // SAFETY: the caller's promises are from_pool's.
        Ok(unsafe { DmaBuf::from_pool(ptr, capacity, len_bytes, iova, release) })
    }

    /// Where devices see the first byte, when the memory is IOVA-mapped
    /// (buffers from an NVMe device's `alloc_buf`); `None` for heap memory.
    pub fn iova(&self) -> Option<Iova> {
        self.alloc.iova
    }

    /// Allocates a buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Result<DmaBuf> {
        let mut b = DmaBuf::new(data.len())?;
        b.copy_from_slice(data);
        Ok(b)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Address of the first byte (for devices).
    pub fn as_ptr(&self) -> *const u8 {
        self.alloc.ptr.as_ptr()
    }

    /// Shrinks or grows the visible length within the allocated capacity.
    pub fn set_len(&mut self, len_bytes: usize) -> Result<()> {
        if len_bytes > self.alloc.size {
            return Err(Error::InvalidArgument(format!(
                "set_len {len_bytes} beyond capacity {}",
                self.alloc.size
            )));
        }
        self.len = len_bytes;
        Ok(())
    }

    /// Capacity of the underlying allocation in bytes.
    pub fn capacity(&self) -> usize {
        self.alloc.size
    }

    /// Address of the first byte, for a device that writes into the buffer
    /// (the pointer is derived from the allocation, not from a reference).
    #[cfg_attr(not(feature = "nvme"), allow(dead_code))]
    pub(crate) fn as_mut_ptr(&self) -> *mut u8 {
        self.alloc.ptr.as_ptr()
    }

    /// Raw segment covering `range` of this buffer, keeping the memory alive
    /// for as long as the segment exists.
    pub(crate) fn segment(&self, start: usize, len: usize) -> Segment {
        debug_assert!(start + len <= self.len);
        Segment {
            // SAFETY: start + len is within the allocation (asserted above and
            // guaranteed by callers, which slice by the buffer's length).
            ptr: unsafe { self.alloc.ptr.as_ptr().add(start) },
            len,
            _keep: Some(self.alloc.clone()),
        }
    }
}

impl std::ops::Deref for DmaBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the allocation holds at least `len` initialised bytes; the
        // `&self` borrow keeps the buffer from being handed to a device.
        unsafe { std::slice::from_raw_parts(self.alloc.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for DmaBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`; `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.alloc.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaBuf").field("len", &self.len).finish()
    }
}

/// A piece of DMA memory that an in-flight operation reads or writes. It
/// keeps its allocation alive (unless it borrows memory of its caller, for
/// `Blob::read_into`); it is not a Rust reference to the bytes.
pub struct Segment {
    ptr: *mut u8,
    len: usize,
    /// The allocation kept alive; `None` for borrowed memory.
    _keep: Option<Arc<DmaAlloc>>,
}

// SAFETY: a segment is an address plus a keep-alive; the memory is plain heap
// memory that may be touched from any thread under the device protocol.
unsafe impl Send for Segment {}

impl Segment {
    /// Start address.
    pub fn ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty segment.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where devices see the segment's first byte, when its memory is
    /// IOVA-mapped; `None` for heap memory (a device then bounces it).
    pub fn iova(&self) -> Option<Iova> {
        let keep = self._keep.as_ref()?;
        let base = keep.iova?;
        Some(base.offset(self.ptr as u64 - keep.ptr.as_ptr() as u64))
    }

    /// A segment over `len` bytes at `ptr`, memory its caller owns (not a
    /// DMA allocation: no IOVA, nothing kept alive), for devices that reach
    /// any memory ([`crate::BlockDevice::reads_into_any_memory`]).
    ///
    /// # Safety
    /// The memory must stay valid, and untouched by anything else, until
    /// the operation that carries the segment has completed: its future
    /// must be polled to completion, never dropped while in flight.
    pub(crate) unsafe fn borrowed(ptr: *mut u8, len: usize) -> Segment {
        Segment {
            ptr,
            len,
            _keep: None,
        }
    }

    /// Another handle on the same memory, keeping the allocation alive (a
    /// device holds one while a timed-out command may still transfer).
    #[cfg_attr(not(feature = "nvme"), allow(dead_code))]
    pub(crate) fn clone_ref(&self) -> Segment {
        Segment {
            ptr: self.ptr,
            len: self.len,
            _keep: self._keep.clone(),
        }
    }

    /// Copies `src` into the segment at `offset`.
    ///
    /// # Safety
    /// No other access to this memory may run concurrently (the device
    /// protocol: the segment belongs to one in-flight operation).
    pub unsafe fn write_at(&self, offset: usize, src: &[u8]) {
        assert!(
            offset + src.len() <= self.len,
            "segment write out of bounds"
        );
        // SAFETY: bounds checked above; exclusivity is the caller's promise.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(offset), src.len()) }
    }

    /// Copies from the segment at `offset` into `dst`.
    ///
    /// # Safety
    /// As for [`Segment::write_at`].
    pub unsafe fn read_at(&self, offset: usize, dst: &mut [u8]) {
        assert!(offset + dst.len() <= self.len, "segment read out of bounds");
        // SAFETY: bounds checked above; exclusivity is the caller's promise.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), dst.as_mut_ptr(), dst.len()) }
    }

    /// Fills the segment with zero bytes.
    ///
    /// # Safety
    /// As for [`Segment::write_at`].
    pub unsafe fn zero(&self) {
        // SAFETY: the whole segment is in bounds; exclusivity as above.
        unsafe { std::ptr::write_bytes(self.ptr, 0, self.len) }
    }
}

/// The memory of one operation: its segments, in order. One segment (the
/// common case) is held inline, so building an operation allocates
/// nothing; more go in a `Vec`. Reads as a slice of [`Segment`].
pub struct Segments(SegmentsRepr);

enum SegmentsRepr {
    None,
    One(Segment),
    Many(Vec<Segment>),
}

impl Segments {
    /// No memory (flush, unmap, write zeroes).
    pub fn none() -> Segments {
        Segments(SegmentsRepr::None)
    }

    /// One segment.
    pub fn one(seg: Segment) -> Segments {
        Segments(SegmentsRepr::One(seg))
    }
}

impl std::ops::Deref for Segments {
    type Target = [Segment];
    fn deref(&self) -> &[Segment] {
        match &self.0 {
            SegmentsRepr::None => &[],
            SegmentsRepr::One(s) => std::slice::from_ref(s),
            SegmentsRepr::Many(v) => v,
        }
    }
}

impl<'a> IntoIterator for &'a Segments {
    type Item = &'a Segment;
    type IntoIter = std::slice::Iter<'a, Segment>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl From<Vec<Segment>> for Segments {
    fn from(mut v: Vec<Segment>) -> Segments {
        match v.len() {
            0 => Segments::none(),
            1 => Segments::one(v.pop().expect("one")),
            _ => Segments(SegmentsRepr::Many(v)),
        }
    }
}

impl FromIterator<Segment> for Segments {
    fn from_iter<I: IntoIterator<Item = Segment>>(iter: I) -> Segments {
        let mut it = iter.into_iter();
        let Some(first) = it.next() else {
            return Segments::none();
        };
        let Some(second) = it.next() else {
            return Segments::one(first);
        };
        let mut v = vec![first, second];
        v.extend(it);
        Segments(SegmentsRepr::Many(v))
    }
}
