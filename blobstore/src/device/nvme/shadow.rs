//! Shadow doorbells (Doorbell Buffer Config, NVMe 1.3): a page in DMA
//! memory where the driver keeps every I/O queue's SQ tail and CQ head, and
//! a page where the controller keeps, per queue, the EventIdx: the value
//! after which it wants an MMIO doorbell write again. An emulated
//! controller (QEMU's) reads the shadow page while it is busy anyway, so
//! most MMIO doorbell writes, each a trap to the hypervisor in a VM, are
//! not needed.
//!
//! Both pages have the layout of the doorbell registers: queue `q`'s SQ
//! tail at `2q * stride`, its CQ head at `(2q + 1) * stride` (stride
//! `4 << CAP.DSTRD`). The admin queue (q = 0) always uses MMIO.
//!
//! Invariants:
//! - The rule is virtio's event index: after moving a value from `old` to
//!   `new`, the MMIO doorbell is written when EventIdx lies in `[old, new)`
//!   (modulo 2^16, which also works for ring indices that wrap at the ring
//!   size: a wrap makes the interval cover everything outside `[new, old)`).
//! - Ordering, for the SQ: ring entries, then (store-store) the shadow
//!   tail, then a full fence, then the EventIdx read. The controller does
//!   the mirror image (writes EventIdx, full fence, reads the shadow), so at
//!   least one side sees the other's update: a command is never stranded.
//!   For the CQ: completion reads, then the shadow head, then the fence.
//! - A queue's shadow and EventIdx entries are zero when the controller
//!   creates the queue (a new queue starts at 0; a stale EventIdx from an
//!   earlier queue with the same id could otherwise suppress the first
//!   doorbell forever).
//! - Nothing read from EventIdx can make the driver misbehave: any value
//!   gives "ring" or "do not ring", and a wrong "do not ring" only delays a
//!   controller that promised to poll.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use super::dma::DmaPool;
use super::prp::PAGE;
use super::regs::{Capabilities, DOORBELLS};
use crate::device::{DmaBuf, Iova};
use crate::error::{Error, Result};

/// The virtio event-index rule: true when a value moving from `old` to
/// `new` passed `event_idx` (it lies in `[old, new)`, modulo 2^16).
#[inline]
pub fn needs_doorbell(event_idx: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event_idx).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A controller's shadow doorbell and EventIdx pages.
pub struct ShadowDoorbells {
    shadow: DmaBuf,
    event_idx: DmaBuf,
    /// Bytes of each page in use: every queue id up to the last granted.
    len: usize,
}

impl ShadowDoorbells {
    /// Pages for queue ids `0..=max_qid`, zeroed.
    pub fn new(pool: &Arc<DmaPool>, cap: &Capabilities, max_qid: u16) -> Result<Self> {
        let len = cap.cq_doorbell(max_qid) + 4 - DOORBELLS;
        let bytes = len.next_multiple_of(PAGE as usize);
        let shadow = pool.alloc(bytes)?;
        let event_idx = pool.alloc(bytes)?;
        for b in [&shadow, &event_idx] {
            match b.iova() {
                Some(i) if i.0.is_multiple_of(PAGE) && b.capacity() >= len => {}
                _ => {
                    return Err(Error::InvalidArgument(
                        "shadow doorbell pages must be page-aligned pool memory".into(),
                    ))
                }
            }
            // SAFETY: fresh pool memory of `capacity()` bytes, not yet
            // known to the controller.
            unsafe { std::ptr::write_bytes(b.as_mut_ptr(), 0, b.capacity()) };
        }
        Ok(ShadowDoorbells {
            shadow,
            event_idx,
            len,
        })
    }

    /// IOVA of the shadow doorbell page (PRP1 of Doorbell Buffer Config).
    pub fn shadow_iova(&self) -> Iova {
        self.shadow.iova().expect("checked in new")
    }

    /// IOVA of the EventIdx page (PRP2 of Doorbell Buffer Config).
    pub fn event_idx_iova(&self) -> Iova {
        self.event_idx.iova().expect("checked in new")
    }

    /// Byte offset of a doorbell register's entry in both pages, if the
    /// pages cover it.
    pub fn offset(&self, doorbell: usize) -> Option<usize> {
        let off = doorbell.checked_sub(DOORBELLS)?;
        (off.is_multiple_of(4) && off + 4 <= self.len).then_some(off)
    }

    /// Zeroes the shadow and EventIdx entries at `off` (before the
    /// controller creates the queue).
    pub fn clear(&self, off: usize) {
        assert!(off + 4 <= self.len);
        for b in [&self.shadow, &self.event_idx] {
            // SAFETY: `off + 4 <= len` lies in the page; the controller has
            // no queue using the entry now; aligned u32 volatile store.
            unsafe { std::ptr::write_volatile(b.as_mut_ptr().add(off).cast::<u32>(), 0) };
        }
    }

    /// Stores `new` as the shadow value at `off` (its previous value was
    /// `old`) and says whether the MMIO doorbell must be written too. The
    /// caller ordered its ring accesses before this call.
    #[inline]
    pub fn publish(&self, off: usize, old: u32, new: u32) -> bool {
        debug_assert!(off + 4 <= self.len);
        // SAFETY: `off` came from `offset`, so the aligned u32 lies in the
        // page; the controller only reads it.
        unsafe {
            std::ptr::write_volatile(self.shadow.as_mut_ptr().add(off).cast::<u32>(), new.to_le())
        };
        // Our store before our EventIdx load (the controller orders its
        // EventIdx store before its shadow load the same way).
        fence(Ordering::SeqCst);
        // SAFETY: as above; the controller writes this entry at any time,
        // hence volatile.
        let ev = u32::from_le(unsafe {
            std::ptr::read_volatile(self.event_idx.as_ptr().add(off).cast::<u32>())
        });
        needs_doorbell(ev as u16, new as u16, old as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::needs_doorbell;

    #[test]
    fn the_event_index_rule() {
        // Not wrapped: ring when EventIdx is in [old, new).
        assert!(needs_doorbell(3, 5, 3));
        assert!(needs_doorbell(4, 5, 3));
        assert!(
            !needs_doorbell(5, 5, 3),
            "the controller wants to hear past 5"
        );
        assert!(!needs_doorbell(2, 5, 3), "the controller saw 3 already");
        assert!(!needs_doorbell(0, 0, 0), "nothing moved");
        // Ring indices wrap at the ring size (256 here): 250 -> 4 covers
        // 250..=255 and 0..=3.
        for ev in [250, 255, 0, 3] {
            assert!(needs_doorbell(ev, 4, 250), "{ev}");
        }
        for ev in [4, 100, 249] {
            assert!(!needs_doorbell(ev, 4, 250), "{ev}");
        }
        // And modulo 2^16.
        assert!(needs_doorbell(65535, 1, 65530));
        assert!(!needs_doorbell(2, 1, 65530));
    }
}
