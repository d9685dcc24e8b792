//! The in-memory crash image of a [`FaultDevice`](super::FaultDevice): what
//! the media would hold after a power cut, in the manner of redb's crash
//! backend. The *live* image is the wrapped device itself (what reads see);
//! the *durable* image, kept here, is what survives a power cut right now,
//! and the writes no completed flush has covered yet are *pending*.
//!
//! Invariants:
//! - A write (or unmap, or write-zeroes) becomes durable only when a flush
//!   that was submitted after the write completed, completes. Until then it
//!   is pending: after a crash, any subset of its tear-sized pieces may
//!   have reached the media, in any order ([`CrashImage::materialize`]).
//! - A write the device itself failed may have landed in part: it stays
//!   among the pending writes of every later image.
//! - Pending writes are kept in submission order, with ordinals strictly
//!   increasing; the durable image keeps the device's size.
//! - Deterministic: the same writes and the same seed give the same bytes.

use std::sync::Arc;

use crate::device::{channel, BlockDevice, DmaBuf, IoKind, IoOp, Lba, MemDevice};
use crate::error::{Error, Result};
use crate::exec::block_on;
use crate::util::SplitMix64;

/// Default tearing granularity: writes reach the media in 4 KiB pieces.
pub const DEFAULT_TEAR_BYTES: usize = 4096;

/// A write that is not (yet) durable.
#[derive(Clone, Debug)]
struct PendingWrite {
    /// Write ordinal (1-based, in submission order).
    ordinal: u64,
    /// Byte offset on the device.
    off: usize,
    /// Length in bytes.
    len: usize,
    /// The bytes, or `None` for zeroes (unmap, write-zeroes).
    data: Option<Arc<Vec<u8>>>,
    /// Completed successfully (only completed writes are covered by a flush).
    completed: bool,
}

/// The state of the media at a crash: the durable image plus the writes
/// that may or may not have landed. Turn it into bytes with
/// [`CrashImage::materialize`].
#[derive(Clone, Debug)]
pub struct CrashImage {
    durable: Vec<u8>,
    pending: Vec<PendingWrite>,
    block_size: usize,
    tear_bytes: usize,
}

impl CrashImage {
    /// Number of writes that were not durable at the crash.
    pub fn pending_writes(&self) -> usize {
        self.pending.len()
    }

    /// The bytes on the media after the crash: the durable image plus, for
    /// every pending write, a random subset of its tear-sized pieces, applied
    /// in random order (so writes tear and reorder). `seed` picks the subset.
    pub fn materialize(&self, seed: u64) -> Vec<u8> {
        let mut img = self.durable.clone();
        let mut rng = SplitMix64::new(seed ^ 0x5EED_C0DE);
        // Pieces: (pending index, byte offset, len), split at absolute
        // tear-size boundaries.
        let mut pieces = Vec::new();
        for (i, p) in self.pending.iter().enumerate() {
            let mut pos = p.off;
            let end = p.off + p.len;
            while pos < end {
                let next = ((pos / self.tear_bytes) + 1) * self.tear_bytes;
                let n = next.min(end) - pos;
                if rng.next_u64() & 1 == 1 {
                    pieces.push((i, pos, n));
                }
                pos += n;
            }
        }
        // Fisher-Yates.
        for i in (1..pieces.len()).rev() {
            pieces.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
        }
        for (i, pos, n) in pieces {
            let p = &self.pending[i];
            let dst = &mut img[pos..pos + n];
            match &p.data {
                Some(d) => dst.copy_from_slice(&d[pos - p.off..pos - p.off + n]),
                None => dst.fill(0),
            }
        }
        img
    }

    /// The image as a fresh [`MemDevice`], as after a restart.
    pub fn to_device(&self, seed: u64) -> Result<MemDevice> {
        MemDevice::from_image(&self.materialize(seed), self.block_size as u32)
    }

    /// Only the durable image (every pending write lost).
    pub fn durable(&self) -> &[u8] {
        &self.durable
    }
}

/// Records, for a [`FaultDevice`](super::FaultDevice), the durable image and
/// the pending writes as operations go by; see the module docs.
pub(crate) struct Recorder {
    block_size: usize,
    tear_bytes: usize,
    durable: Vec<u8>,
    /// Pending writes in submission order (failed ones move to `lost`).
    pending: Vec<PendingWrite>,
    /// Failed writes that may have reached the media anyway.
    lost: Vec<PendingWrite>,
    /// Operation numbers to capture an image before, ascending.
    capture_at: Vec<u64>,
    captures: Vec<(u64, CrashImage)>,
}

impl Recorder {
    /// Starts from the current contents of `dev`, read once here.
    pub fn read_from(dev: &Arc<dyn BlockDevice>) -> Result<Recorder> {
        let g = dev.geometry();
        let size = usize::try_from(g.size_bytes())
            .map_err(|_| Error::InvalidArgument("device too large to mirror".into()))?;
        let mut durable = vec![0u8; size];
        let ch = channel(dev)?;
        let chunk = (1usize << 20).max(g.block_size as usize);
        block_on(async {
            let mut off = 0;
            while off < size {
                let n = chunk.min(size - off);
                let buf = ch
                    .read(Lba((off / g.block_size as usize) as u64), DmaBuf::new(n)?)
                    .await?;
                durable[off..off + n].copy_from_slice(&buf);
                off += n;
            }
            Ok::<(), Error>(())
        })?;
        Ok(Recorder {
            block_size: g.block_size as usize,
            tear_bytes: DEFAULT_TEAR_BYTES,
            durable,
            pending: Vec::new(),
            lost: Vec::new(),
            capture_at: Vec::new(),
            captures: Vec::new(),
        })
    }

    /// Sets the tearing granularity: a positive multiple of the block size.
    pub fn set_tear_bytes(&mut self, bytes: usize) -> Result<()> {
        if bytes == 0 || !bytes.is_multiple_of(self.block_size) {
            return Err(Error::InvalidArgument(format!(
                "tear size {bytes} is not a multiple of the block size {}",
                self.block_size
            )));
        }
        self.tear_bytes = bytes;
        Ok(())
    }

    /// What a crash right now would leave.
    pub fn image(&self) -> CrashImage {
        CrashImage {
            durable: self.durable.clone(),
            pending: self.pending.iter().chain(&self.lost).cloned().collect(),
            block_size: self.block_size,
            tear_bytes: self.tear_bytes,
        }
    }

    /// Largest ordinal W such that every write numbered W or less is
    /// durable, `writes` having been submitted.
    pub fn watermark(&self, writes: u64) -> u64 {
        self.pending
            .first()
            .map_or(writes, |p| p.ordinal.saturating_sub(1))
    }

    /// Captures images before these operation numbers.
    pub fn capture_at(&mut self, mut ops: Vec<u64>) {
        ops.sort_unstable();
        ops.dedup();
        self.capture_at = ops;
    }

    /// Captures an image if one was asked for before operation `n`.
    pub fn before_op(&mut self, n: u64) {
        if self.capture_at.first() == Some(&n) {
            self.capture_at.remove(0);
            let img = self.image();
            self.captures.push((n, img));
        }
    }

    /// The images captured so far.
    pub fn take_captures(&mut self) -> Vec<(u64, CrashImage)> {
        std::mem::take(&mut self.captures)
    }

    /// A write-like op with ordinal `ordinal` was handed to the device
    /// (it may fail there, or complete).
    pub fn write_submitted(&mut self, ordinal: u64, op: &IoOp) {
        debug_assert!(self.pending.last().is_none_or(|p| p.ordinal < ordinal));
        let bs = self.block_size;
        let len = op.blocks as usize * bs;
        let data = (op.kind == IoKind::Write).then(|| Arc::new(copy_segments(op, len)));
        self.pending.push(PendingWrite {
            ordinal,
            off: op.lba.get() as usize * bs,
            len,
            data,
            completed: false,
        });
    }

    /// The ordinals a flush submitted now covers: the completed writes.
    pub fn flush_covers(&self) -> Vec<u64> {
        self.pending
            .iter()
            .filter(|p| p.completed)
            .map(|p| p.ordinal)
            .collect()
    }

    /// Write `ordinal` completed successfully.
    pub fn write_completed(&mut self, ordinal: u64) {
        if let Some(p) = self.pending.iter_mut().find(|p| p.ordinal == ordinal) {
            p.completed = true;
        }
    }

    /// Write `ordinal` failed on the device: it may have landed in part.
    pub fn write_failed(&mut self, ordinal: u64) {
        if let Some(i) = self.pending.iter().position(|p| p.ordinal == ordinal) {
            let p = self.pending.remove(i);
            self.lost.push(p);
        }
    }

    /// A flush covering `covers` (ascending ordinals) completed: those
    /// writes are durable.
    pub fn flush_completed(&mut self, covers: &[u64]) {
        let size = self.durable.len();
        // Completion order equals submission order for what a flush covers
        // (all completed); apply in ordinal order so later writes win.
        let mut i = 0;
        while i < self.pending.len() {
            let p = &self.pending[i];
            if covers.binary_search(&p.ordinal).is_ok() {
                let p = self.pending.remove(i);
                let dst = &mut self.durable[p.off..p.off + p.len];
                match &p.data {
                    Some(d) => dst.copy_from_slice(d),
                    None => dst.fill(0),
                }
            } else {
                i += 1;
            }
        }
        debug_assert_eq!(self.durable.len(), size);
        debug_assert!(self.pending.windows(2).all(|w| w[0].ordinal < w[1].ordinal));
    }
}

/// The bytes `op` writes (`len` of them).
fn copy_segments(op: &IoOp, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut at = 0;
    for seg in &op.segs {
        // SAFETY: the segment belongs to this op, which is being submitted;
        // nothing else touches its memory until the op completes.
        unsafe { seg.read_at(0, &mut data[at..at + seg.len()]) };
        at += seg.len();
    }
    data
}
