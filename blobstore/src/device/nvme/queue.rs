//! A submission/completion queue pair, polled by its owner.
//!
//! The pair only moves entries: command ids are the owner's (the I/O
//! backend's trackers, the admin queue's table), and so is deciding whether
//! a completion belongs to anything.
//!
//! Invariants:
//! - At most `entries - 1` entries are in the submission ring (a full ring
//!   is `tail + 1 == head`, `head` as the controller last reported it).
//! - Entries are written to DMA memory with volatile stores before the tail
//!   doorbell (a release fence orders them); the doorbell is written only
//!   when the tail moved since the last write (one write per batch).
//! - A completion is consumed only when its phase tag matches, and its other
//!   fields are read after the tag (an acquire fence); the head doorbell is
//!   written once per [`QueuePair::release_completions`] that follows
//!   consumed entries (one write per reap).
//! - With shadow doorbells ([`super::shadow`]), every tail and head goes
//!   to the shadow page first, and the MMIO doorbell is written only when
//!   the controller's EventIdx asks for it.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use super::cmd::{Command, Completion, CQE_BYTES, SQE_BYTES};
use super::dma::DmaPool;
use super::regs::{Bar, Capabilities};
use super::shadow::ShadowDoorbells;
use crate::device::{DmaBuf, Iova};
use crate::error::{Error, Result};

/// A queue's entries in the shadow doorbell and EventIdx pages.
struct Shadow {
    pages: Arc<ShadowDoorbells>,
    sq: usize,
    cq: usize,
}

/// One queue pair (the admin pair has id 0).
pub struct QueuePair {
    /// Queue id (same for the SQ and its CQ).
    pub qid: u16,
    entries: u32,
    sq: DmaBuf,
    cq: DmaBuf,
    sq_tail: u32,
    /// The tail the doorbell last told the controller.
    sq_tail_rung: u32,
    /// Last SQ head the controller reported.
    sq_head: u32,
    cq_head: u32,
    /// Completions consumed since the head doorbell was last written.
    cq_unreleased: bool,
    /// The head the doorbell (or its shadow) last told the controller.
    cq_head_rung: u32,
    shadow: Option<Shadow>,
    phase: bool,
    sq_doorbell: usize,
    cq_doorbell: usize,
}

/// Orders the entry stores before the doorbell store. On x86-64, stores are
/// not reordered with other stores (uncached MMIO included), so a compiler
/// fence suffices; elsewhere, a full fence.
#[inline(always)]
fn doorbell_fence() {
    #[cfg(target_arch = "x86_64")]
    std::sync::atomic::compiler_fence(Ordering::Release);
    #[cfg(not(target_arch = "x86_64"))]
    fence(Ordering::SeqCst);
}

impl QueuePair {
    /// Allocates the rings of a pair with `entries` slots each; its
    /// doorbells go through `shadow` when given (I/O queues only), whose
    /// entries for this queue are cleared here.
    pub fn new(
        pool: &Arc<DmaPool>,
        cap: &Capabilities,
        qid: u16,
        entries: u32,
        shadow: Option<&Arc<ShadowDoorbells>>,
    ) -> Result<Self> {
        debug_assert!((2..=4096).contains(&entries));
        let shadow = match shadow {
            None => None,
            Some(pages) => {
                let at = |db| {
                    pages.offset(db).ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "queue {qid} is past the shadow doorbell pages"
                        ))
                    })
                };
                let (sq, cq) = (at(cap.sq_doorbell(qid))?, at(cap.cq_doorbell(qid))?);
                pages.clear(sq);
                pages.clear(cq);
                Some(Shadow {
                    pages: pages.clone(),
                    sq,
                    cq,
                })
            }
        };
        let sq = pool.alloc(entries as usize * SQE_BYTES)?;
        let cq = pool.alloc(entries as usize * CQE_BYTES)?;
        Ok(QueuePair {
            qid,
            entries,
            sq,
            cq,
            sq_tail: 0,
            sq_tail_rung: 0,
            sq_head: 0,
            cq_head: 0,
            cq_unreleased: false,
            cq_head_rung: 0,
            shadow,
            phase: true,
            sq_doorbell: cap.sq_doorbell(qid),
            cq_doorbell: cap.cq_doorbell(qid),
        })
    }

    /// Slots per ring.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// IOVA of the submission ring.
    pub fn sq_iova(&self) -> Iova {
        self.sq.iova().expect("pool memory")
    }

    /// IOVA of the completion ring.
    pub fn cq_iova(&self) -> Iova {
        self.cq.iova().expect("pool memory")
    }

    /// True when the submission ring has no free slot.
    #[inline]
    pub fn sq_full(&self) -> bool {
        let next = if self.sq_tail + 1 == self.entries {
            0
        } else {
            self.sq_tail + 1
        };
        next == self.sq_head
    }

    /// Forgets every entry and clears the rings (after a controller reset,
    /// before the queues are created again).
    pub fn reset(&mut self) {
        // SAFETY: the controller is disabled (or no longer has this queue),
        // so it does not touch the ring; the ring is `entries * CQE_BYTES`
        // bytes of pool memory.
        unsafe { std::ptr::write_bytes(self.cq.as_mut_ptr(), 0, self.cq.capacity()) };
        self.sq_tail = 0;
        self.sq_tail_rung = 0;
        self.sq_head = 0;
        self.cq_head = 0;
        self.cq_unreleased = false;
        self.cq_head_rung = 0;
        self.phase = true;
        if let Some(s) = &self.shadow {
            s.pages.clear(s.sq);
            s.pages.clear(s.cq);
        }
    }

    /// Puts `cmd` with command id `cid` in the ring without ringing the
    /// doorbell; false when the ring is full.
    #[inline]
    pub fn push(&mut self, cmd: &Command, cid: u16) -> bool {
        if self.sq_full() {
            return false;
        }
        let dwords = cmd.encode(cid);
        // SAFETY: slot `sq_tail` < entries lies inside the ring.
        let slot = unsafe {
            self.sq
                .as_mut_ptr()
                .cast::<u32>()
                .add(self.sq_tail as usize * 16)
        };
        for (i, d) in dwords.iter().enumerate() {
            // SAFETY: dword `i` < 16 of the slot; the controller does not
            // read the slot before the doorbell says so.
            unsafe { std::ptr::write_volatile(slot.add(i), d.to_le()) };
        }
        self.sq_tail = if self.sq_tail + 1 == self.entries {
            0
        } else {
            self.sq_tail + 1
        };
        true
    }

    /// Tells the controller about every pushed entry (nothing when none was
    /// pushed since the last ring).
    #[inline]
    pub fn ring(&mut self, bar: &dyn Bar) {
        if self.sq_tail != self.sq_tail_rung {
            doorbell_fence();
            let old = std::mem::replace(&mut self.sq_tail_rung, self.sq_tail);
            if let Some(s) = &self.shadow {
                if !s.pages.publish(s.sq, old, self.sq_tail) {
                    return; // the controller is still reading the shadow
                }
            }
            bar.write32(self.sq_doorbell, self.sq_tail);
        }
    }

    /// Entries pushed and not yet announced by [`QueuePair::ring`].
    pub fn unrung(&self) -> bool {
        self.sq_tail != self.sq_tail_rung
    }

    /// True when the controller has posted a completion not consumed yet
    /// (nothing is consumed).
    #[inline]
    pub fn completion_posted(&self) -> bool {
        let base = self.cq.as_ptr().cast::<u32>();
        let at = self.cq_head as usize * 4;
        // SAFETY: as in `next_completion`.
        let dw3 = u32::from_le(unsafe { std::ptr::read_volatile(base.add(at + 3)) });
        ((dw3 >> 16) & 1 == 1) == self.phase
    }

    /// Consumes the next completion, if the controller posted one. The
    /// head doorbell is written by [`QueuePair::release_completions`].
    #[inline]
    pub fn next_completion(&mut self) -> Option<Completion> {
        let base = self.cq.as_ptr().cast::<u32>();
        let at = self.cq_head as usize * 4;
        // SAFETY: entry `cq_head` < entries lies inside the ring; volatile
        // because the controller writes it behind our back.
        let dw3 = u32::from_le(unsafe { std::ptr::read_volatile(base.add(at + 3)) });
        if ((dw3 >> 16) & 1 == 1) != self.phase {
            return None;
        }
        fence(Ordering::Acquire);
        let mut d = [0u32; 4];
        for (i, x) in d.iter_mut().enumerate().take(3) {
            // SAFETY: as above.
            *x = u32::from_le(unsafe { std::ptr::read_volatile(base.add(at + i)) });
        }
        d[3] = dw3;
        let c = Completion::decode(d);
        self.cq_head += 1;
        if self.cq_head == self.entries {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        // A head out of range is the controller's bug: keep the old one.
        if (c.sq_head as u32) < self.entries {
            self.sq_head = c.sq_head as u32;
        }
        self.cq_unreleased = true;
        Some(c)
    }

    /// Writes the completion head doorbell if entries were consumed since
    /// the last call.
    #[inline]
    pub fn release_completions(&mut self, bar: &dyn Bar) {
        if self.cq_unreleased {
            self.cq_unreleased = false;
            let old = std::mem::replace(&mut self.cq_head_rung, self.cq_head);
            if let Some(s) = &self.shadow {
                // The completions were read before the head says so.
                doorbell_fence();
                if !s.pages.publish(s.cq, old, self.cq_head) {
                    return;
                }
            }
            bar.write32(self.cq_doorbell, self.cq_head);
        }
    }
}
