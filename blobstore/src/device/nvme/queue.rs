//! A submission/completion queue pair, polled by its owner.
//!
//! Invariants:
//! - At most `entries - 1` commands are outstanding (a full ring is
//!   `tail + 1 == head`); each carries a command id from this pair's free
//!   list, unique among the outstanding ones.
//! - Entries are written to DMA memory with volatile stores before the tail
//!   doorbell (a release fence orders them); a completion is consumed only
//!   when its phase tag matches, and its other fields are read after the
//!   tag (an acquire fence).
//! - The completion head doorbell is written once per poll that consumed
//!   entries.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use super::cmd::{Command, Completion, CQE_BYTES, SQE_BYTES};
use super::dma::DmaPool;
use super::regs::{Bar, Capabilities};
use crate::device::{DmaBuf, Iova};
use crate::error::Result;

/// One queue pair (the admin pair has id 0).
pub struct QueuePair {
    /// Queue id (same for the SQ and its CQ).
    pub qid: u16,
    entries: u32,
    sq: DmaBuf,
    cq: DmaBuf,
    sq_tail: u32,
    /// Last SQ head the controller reported.
    sq_head: u32,
    cq_head: u32,
    phase: bool,
    sq_doorbell: usize,
    cq_doorbell: usize,
    free_cids: Vec<u16>,
    outstanding: usize,
}

impl QueuePair {
    /// Allocates the rings of a pair with `entries` slots each.
    pub fn new(pool: &Arc<DmaPool>, cap: &Capabilities, qid: u16, entries: u32) -> Result<Self> {
        debug_assert!((2..=4096).contains(&entries));
        let sq = pool.alloc(entries as usize * SQE_BYTES)?;
        let cq = pool.alloc(entries as usize * CQE_BYTES)?;
        Ok(QueuePair {
            qid,
            entries,
            sq,
            cq,
            sq_tail: 0,
            sq_head: 0,
            cq_head: 0,
            phase: true,
            sq_doorbell: cap.sq_doorbell(qid),
            cq_doorbell: cap.cq_doorbell(qid),
            free_cids: (0..entries as u16 - 1).rev().collect(),
            outstanding: 0,
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

    /// Commands submitted and not completed.
    pub fn outstanding(&self) -> usize {
        self.outstanding
    }

    /// True when no command can be submitted now.
    pub fn is_full(&self) -> bool {
        self.free_cids.is_empty() || (self.sq_tail + 1) % self.entries == self.sq_head
    }

    /// Forgets every outstanding command and clears the rings (after a
    /// controller reset, before the queues are created again).
    pub fn reset(&mut self) {
        // SAFETY: the controller is disabled, so it no longer touches the
        // rings; the ring is `entries * CQE_BYTES` bytes of pool memory.
        unsafe { std::ptr::write_bytes(self.cq.as_mut_ptr(), 0, self.cq.capacity()) };
        self.sq_tail = 0;
        self.sq_head = 0;
        self.cq_head = 0;
        self.phase = true;
        self.free_cids = (0..self.entries as u16 - 1).rev().collect();
        self.outstanding = 0;
    }

    /// The command id the next [`QueuePair::push`] will use.
    pub fn next_cid(&self) -> Option<u16> {
        if self.is_full() {
            None
        } else {
            self.free_cids.last().copied()
        }
    }

    /// Puts `cmd` in the ring without ringing the doorbell; returns its
    /// command id, or `None` when the ring is full.
    pub fn push(&mut self, cmd: &Command) -> Option<u16> {
        if self.is_full() {
            return None;
        }
        let cid = self.free_cids.pop().expect("checked above");
        let dwords = cmd.encode(cid);
        let base = self.sq.as_mut_ptr().cast::<u32>();
        for (i, d) in dwords.iter().enumerate() {
            // SAFETY: slot `sq_tail` < entries lies inside the ring; the
            // controller does not read it before the doorbell says so.
            unsafe {
                std::ptr::write_volatile(base.add(self.sq_tail as usize * 16 + i), d.to_le())
            };
        }
        self.sq_tail = (self.sq_tail + 1) % self.entries;
        self.outstanding += 1;
        Some(cid)
    }

    /// Tells the controller about every pushed entry.
    pub fn ring(&self, bar: &dyn Bar) {
        // Entries must be in memory before the controller sees the tail.
        fence(Ordering::SeqCst);
        bar.write32(self.sq_doorbell, self.sq_tail);
    }

    /// Consumes available completions, calling `f` for each; returns how
    /// many. The command id is free again once `f` returns.
    pub fn poll(&mut self, bar: &dyn Bar, mut f: impl FnMut(Completion)) -> usize {
        let base = self.cq.as_ptr().cast::<u32>();
        let mut n = 0;
        loop {
            let at = self.cq_head as usize * 4;
            // SAFETY: entry `cq_head` lies inside the ring; volatile because
            // the controller writes it behind our back.
            let dw3 = u32::from_le(unsafe { std::ptr::read_volatile(base.add(at + 3)) });
            if ((dw3 >> 16) & 1 == 1) != self.phase {
                break;
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
            self.sq_head = c.sq_head as u32 % self.entries;
            n += 1;
            if self.outstanding > 0 && c.cid < self.entries as u16 - 1 {
                self.outstanding -= 1;
                f(c);
                self.free_cids.push(c.cid);
            }
        }
        if n > 0 {
            bar.write32(self.cq_doorbell, self.cq_head);
        }
        n
    }
}
