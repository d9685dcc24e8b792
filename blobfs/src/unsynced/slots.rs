//! Slots handed out as append buffers ([`Unsynced::alloc`]), and taken
//! back when a buffer goes.
//!
//! Invariants:
//! - A slot gets its memory (and its DMA mapping, where the device wants
//!   one) before it is handed out, so running out is an error of the
//!   allocation, not a SIGBUS at an append.
//! - A slot's header is cleared when its buffer goes, before the slot
//!   serves another file, unless the file system is going away without an
//!   unmount: then it keeps its header for the next mount.
//! - A slot's DMA mapping is dropped before its memory is punched or
//!   unmapped. Up to `keep_free` free slots keep their memory for the next
//!   buffers; the others give it back (where the file system lets them).

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use blobstore::device::{DmaMapping, DmaRelease};
use blobstore::DmaBuf;

use super::header::{HEADER_PAGE, MAX_SLOTS, SLOT_BYTES, SLOT_DATA};
use super::Unsynced;
use crate::error::{Error, Result};

/// Free slots kept with their memory for the next buffers (at most 128
/// MiB); the memory of further ones goes back to the system. With 8, a
/// db_bench fillseq spent 8% of its CPU zeroing slots it had just freed
/// (files close and open in bursts of more than 8 buffers).
pub(super) const KEEP_FREE: usize = 32;
/// The same on hugepages, which are scarcer (8 slots of 6 MiB).
pub(super) const KEEP_FREE_HUGE: usize = 8;

/// Which slots are free, and which have memory behind them.
pub(super) struct Slots {
    /// Free slots with their memory (at most `KEEP_FREE`): handed out
    /// first, so a new buffer costs no zeroing of 4 MiB.
    pub(super) free_populated: Vec<u32>,
    /// Free slots whose memory went back to the system.
    pub(super) free_bare: Vec<u32>,
    /// Slots below this have been handed out at least once.
    pub(super) next_new: u32,
    /// Which slots have memory behind them (allocated, not punched).
    pub(super) populated: Vec<bool>,
    /// Each populated slot's DMA mapping, for devices that need one; dropped
    /// before the slot's memory is punched.
    pub(super) mapped: Vec<Option<DmaMapping>>,
}

impl Unsynced {
    /// A buffer of `len` bytes (at most [`SLOT_DATA`]) in a free slot with
    /// no header. Its bytes are stale: the appender writes before it reads.
    pub fn alloc(self: &Arc<Self>, len: usize) -> Result<DmaBuf> {
        if len > SLOT_DATA {
            return Err(Error::InvalidArgument(format!(
                "append buffer of {len} bytes: at most {SLOT_DATA}"
            )));
        }
        let slot = {
            let mut s = self.slots.lock();
            match s.free_populated.pop().or_else(|| s.free_bare.pop()) {
                Some(slot) => slot,
                None if (s.next_new as usize) < MAX_SLOTS => {
                    s.next_new += 1;
                    s.next_new - 1
                }
                None => {
                    return Err(Error::NoSpace(
                        "unsynced memory".into(),
                        blobstore::Error::NoSpace(format!(
                            "all {MAX_SLOTS} append buffers are in use (files written and \
                             not synced)"
                        )),
                    ))
                }
            }
        };
        let iova = match self.populate(slot) {
            Ok(iova) => iova,
            Err(e) => {
                self.free_slot(slot);
                return Err(e);
            }
        };
        let ptr = self.slot_ptr(slot);
        // SAFETY: `ptr + HEADER_PAGE` is page-aligned (slots and the header
        // page are page multiples), inside the mapping, backed by memory
        // (populated above), and this slot is out of the free list until
        // the release runs; its DMA mapping (if any) covers the slot and
        // is dropped only when the slot's memory goes, which a slot in use
        // never does.
        unsafe {
            DmaBuf::from_external(
                NonNull::new_unchecked(ptr.add(HEADER_PAGE)),
                SLOT_DATA,
                len,
                iova.map(|i| i.offset(HEADER_PAGE as u64)),
                Box::new(SlotRelease {
                    region: self.clone(),
                    slot,
                }),
            )
        }
        .map_err(|e| Error::store("unsynced memory", e))
    }

    /// Gives the slot memory from tmpfs (or hugetlbfs) up front, so running
    /// out of it is a clear error here rather than a SIGBUS at the first
    /// append, and maps it for DMA where the device wants that: the slot's
    /// IOVA, if it has one.
    fn populate(&self, slot: u32) -> Result<Option<blobstore::device::Iova>> {
        if !self.slots.lock().populated[slot as usize] {
            self.allocate(slot)?;
        }
        let mut s = self.slots.lock();
        if s.mapped[slot as usize].is_none() {
            if let Some(dev) = &self.dma {
                let ptr = NonNull::new(self.slot_ptr(slot)).expect("inside the mapping");
                // SAFETY: the slot is populated, and its mapping is dropped
                // (`free_slot`, `reset`, drop) before its memory is punched
                // or unmapped.
                s.mapped[slot as usize] = unsafe { dev.map_dma(ptr, self.stride) }
                    .map_err(|e| Error::store("mapping an append buffer for DMA", e))?;
            }
        }
        Ok(s.mapped[slot as usize].as_ref().map(DmaMapping::iova))
    }

    fn allocate(&self, slot: u32) -> Result<()> {
        let at = slot as usize * self.stride;
        // SAFETY: fallocate on an open descriptor; no memory is passed.
        let rc =
            unsafe { libc::fallocate(self.file.as_raw_fd(), 0, at as i64, self.stride as i64) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            let hint = if self.stride > SLOT_BYTES {
                " (hugepages: reserve more with `nvme-setup hugepages`, or set \
                 BLOBSTACK_UNSYNCED_DIR=/dev/shm)"
            } else {
                ""
            };
            return Err(Error::NoSpace(
                "unsynced memory".into(),
                blobstore::Error::NoSpace(format!("no room for an append buffer: {e}{hint}")),
            ));
        }
        // Map the slot's pages in one call rather than one fault per page
        // (best effort: older kernels lack it, and faults then do it).
        // SAFETY: the range is inside our mapping and backed (allocated
        // above); the advice changes no contents.
        unsafe {
            libc::madvise(
                self.slot_ptr(slot).cast(),
                self.stride,
                libc::MADV_POPULATE_WRITE,
            );
        }
        self.slots.lock().populated[slot as usize] = true;
        Ok(())
    }

    fn free_slot(&self, slot: u32) {
        let mut s = self.slots.lock();
        let mut keep = s.populated[slot as usize] && s.free_populated.len() < self.keep_free;
        if s.populated[slot as usize] && !keep {
            // The device lets go of the memory before it goes.
            s.mapped[slot as usize] = None;
            keep = self
                .punch(slot as usize * self.stride, self.stride)
                .is_err();
        }
        if keep {
            s.free_populated.push(slot);
        } else {
            s.populated[slot as usize] = false;
            s.free_bare.push(slot);
        }
    }
}

/// Gives a slot back when the last reference to its buffer goes.
struct SlotRelease {
    region: Arc<Unsynced>,
    slot: u32,
}

impl DmaRelease for SlotRelease {
    fn release(&mut self) {
        if !self.region.keep.load(Ordering::Acquire) {
            self.region.clear_header(self.slot);
            self.region.free_slot(self.slot);
        }
    }
}
