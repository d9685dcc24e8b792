//! `FaultDevice`: a wrapper around any [`BlockDevice`] that simulates power
//! loss and injects I/O errors, for crash and error-path tests.
//!
//! It keeps two images of the device, in the manner of redb's crash backend:
//! the *live* image is the wrapped device itself (what reads see), and the
//! *durable* image is what would survive a power cut right now.
//!
//! Invariants:
//! - A write (or unmap, or write-zeroes) becomes durable only when a flush
//!   that was submitted after the write completed, completes. Until then it
//!   is *pending*: after a crash, any subset of its pages may have reached
//!   the media, in any order ([`CrashImage::materialize`]).
//! - Once crashed (at a chosen operation, or on demand), every operation
//!   fails, completions of operations that were in flight report failure,
//!   and nothing more becomes durable.
//! - An injected error fails exactly the chosen operation, which then does
//!   nothing at all (as SPDK's error injection): a failed write reaches
//!   neither the live image nor the media.
//! - Deterministic: the same operations and the same seed give the same
//!   crash image.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

use super::{channel, BlockDevice, ChannelBackend, DeviceId, Geometry, IoKind, IoOp, Tag};
use super::{DmaBuf, MemDevice};
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

/// What an in-flight tag of a fault backend is.
enum TagInfo {
    /// A write-like op with its ordinal.
    Write(u64),
    /// A flush covering the writes with these ordinals.
    Flush(Vec<u64>),
    /// Anything else.
    Other,
}

/// A one-shot injected failure: the `countdown`-th next op of `kind` fails.
#[derive(Clone, Copy, Debug)]
struct FailRule {
    kind: IoKind,
    countdown: u64,
}

struct FaultState {
    block_size: usize,
    tear_bytes: usize,
    durable: Vec<u8>,
    /// Pending writes in submission order (failed ones move to `lost`).
    pending: Vec<PendingWrite>,
    /// Failed writes that may have reached the media anyway.
    lost: Vec<PendingWrite>,
    ops: u64,
    writes: u64,
    /// Write-like ops handed to the inner device and not reaped yet, and
    /// the most there were at once since the peak was last taken.
    writes_in_flight: u64,
    peak_writes_in_flight: u64,
    /// Reaps a completion waits before it is reported.
    reap_delay: u32,
    flushes_done: u64,
    crash_at: Option<u64>,
    crashed: bool,
    rules: Vec<FailRule>,
    injected: u64,
    capture_at: Vec<u64>,
    captures: Vec<(u64, CrashImage)>,
}

impl FaultState {
    fn image(&self) -> CrashImage {
        CrashImage {
            durable: self.durable.clone(),
            pending: self.pending.iter().chain(&self.lost).cloned().collect(),
            block_size: self.block_size,
            tear_bytes: self.tear_bytes,
        }
    }

    /// Largest ordinal W such that every write numbered W or less is durable.
    fn watermark(&self) -> u64 {
        self.pending
            .first()
            .map_or(self.writes, |p| p.ordinal.saturating_sub(1))
    }

    fn apply_durable(&mut self, covers: &[u64]) {
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
    }
}

/// A power-loss simulating wrapper; see the module docs.
#[derive(Clone)]
pub struct FaultDevice {
    inner: Arc<dyn BlockDevice>,
    id: DeviceId,
    state: Arc<Mutex<FaultState>>,
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

impl FaultDevice {
    /// Wraps `inner`. The device's current contents become the durable
    /// image, so they are read once here (keep test devices small).
    pub fn new(inner: Arc<dyn BlockDevice>) -> Result<FaultDevice> {
        let g = inner.geometry();
        let size = usize::try_from(g.size_bytes())
            .map_err(|_| Error::InvalidArgument("device too large to mirror".into()))?;
        let mut durable = vec![0u8; size];
        let ch = channel(&inner)?;
        let chunk = (1usize << 20).max(g.block_size as usize);
        block_on(async {
            let mut off = 0;
            while off < size {
                let n = chunk.min(size - off);
                let buf = ch
                    .read((off / g.block_size as usize) as u64, DmaBuf::new(n)?)
                    .await?;
                durable[off..off + n].copy_from_slice(&buf);
                off += n;
            }
            Ok::<(), Error>(())
        })?;
        Ok(FaultDevice {
            id: DeviceId::fresh(),
            state: Arc::new(Mutex::new(FaultState {
                block_size: g.block_size as usize,
                tear_bytes: DEFAULT_TEAR_BYTES,
                durable,
                pending: Vec::new(),
                lost: Vec::new(),
                ops: 0,
                writes: 0,
                writes_in_flight: 0,
                peak_writes_in_flight: 0,
                reap_delay: 0,
                flushes_done: 0,
                crash_at: None,
                crashed: false,
                rules: Vec::new(),
                injected: 0,
                capture_at: Vec::new(),
                captures: Vec::new(),
            })),
            inner,
        })
    }

    /// Sets the tearing granularity (a multiple of the block size; default
    /// [`DEFAULT_TEAR_BYTES`]).
    pub fn set_tear_bytes(&self, bytes: usize) -> Result<()> {
        let mut st = self.state.lock();
        if bytes == 0 || !bytes.is_multiple_of(st.block_size) {
            return Err(Error::InvalidArgument(format!(
                "tear size {bytes} is not a multiple of the block size {}",
                st.block_size
            )));
        }
        st.tear_bytes = bytes;
        Ok(())
    }

    /// The wrapped device (the live image).
    pub fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }

    /// Crashes when the `n`-th operation from now is submitted: that
    /// operation and every later one fail. `n = 1` fails the next one.
    pub fn crash_after(&self, n: u64) {
        let mut st = self.state.lock();
        st.crash_at = Some(st.ops + n.max(1));
    }

    /// Crashes now.
    pub fn crash(&self) {
        self.state.lock().crashed = true;
    }

    /// True once crashed.
    pub fn is_crashed(&self) -> bool {
        self.state.lock().crashed
    }

    /// Makes the `n`-th next operation of `kind` fail (once). Several rules
    /// may be armed at a time.
    pub fn fail_nth(&self, kind: IoKind, n: u64) {
        self.state.lock().rules.push(FailRule {
            kind,
            countdown: n.max(1),
        });
    }

    /// Disarms every injected failure that has not fired yet.
    pub fn clear_failures(&self) {
        self.state.lock().rules.clear();
    }

    /// Injected failures that have fired so far.
    pub fn injected_failures(&self) -> u64 {
        self.state.lock().injected
    }

    /// Operations submitted so far (all kinds, failed ones included).
    pub fn op_count(&self) -> u64 {
        self.state.lock().ops
    }

    /// Write-like operations (write, unmap, write-zeroes) submitted so far;
    /// each has an ordinal from 1 up.
    pub fn writes_submitted(&self) -> u64 {
        self.state.lock().writes
    }

    /// The largest write ordinal W such that every write numbered W or
    /// less is durable. A write that returned when `writes_submitted()` was
    /// `w` is durable once this reaches `w`.
    pub fn durable_watermark(&self) -> u64 {
        self.state.lock().watermark()
    }

    /// Makes every channel report each completion only at the `reaps`-th
    /// poll after the one that could first have reported it (default 0), as
    /// a device whose I/O takes time: a caller that submits two writes
    /// before it waits then has both in flight at once, which a memory
    /// device, completing at once, never shows.
    pub fn set_reap_delay(&self, reaps: u32) {
        self.state.lock().reap_delay = reaps;
    }

    /// The most write-like operations that were in flight on the device at
    /// once since the last call (or since the device was made); resets the
    /// count. Shows whether a caller overlaps its writes or waits for each.
    pub fn take_peak_writes_in_flight(&self) -> u64 {
        let mut st = self.state.lock();
        let peak = st.peak_writes_in_flight;
        st.peak_writes_in_flight = st.writes_in_flight;
        peak
    }

    /// Flushes that completed and made their writes durable.
    pub fn flushes_done(&self) -> u64 {
        self.state.lock().flushes_done
    }

    /// Arranges for a crash image to be captured, without stopping the
    /// device, just before each of these operation numbers is submitted
    /// (operation numbers count from 1, as [`FaultDevice::op_count`] does).
    pub fn capture_at(&self, mut ops: Vec<u64>) {
        ops.sort_unstable();
        ops.dedup();
        self.state.lock().capture_at = ops;
    }

    /// Takes the images captured so far, with the operation number each was
    /// taken before.
    pub fn take_captures(&self) -> Vec<(u64, CrashImage)> {
        std::mem::take(&mut self.state.lock().captures)
    }

    /// What a crash right now would leave, without crashing.
    pub fn crash_image(&self) -> CrashImage {
        self.state.lock().image()
    }

    /// Crashes (if not crashed yet) and returns the device as it comes back
    /// after the power cut, with `seed` choosing which pending pages landed.
    pub fn after_crash(&self, seed: u64) -> Result<MemDevice> {
        let img = {
            let mut st = self.state.lock();
            st.crashed = true;
            st.image()
        };
        img.to_device(seed)
    }
}

impl BlockDevice for FaultDevice {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn id(&self) -> DeviceId {
        self.id
    }
    fn name(&self) -> String {
        format!("fault:{}", self.inner.name())
    }
    fn new_backend(&self) -> Result<Box<dyn ChannelBackend>> {
        Ok(Box::new(FaultBackend {
            inner: self.inner.new_backend()?,
            state: self.state.clone(),
            tags: HashMap::new(),
            failed: Vec::new(),
            held: Vec::new(),
        }))
    }
    fn alloc_buf(&self, len_bytes: usize) -> Result<DmaBuf> {
        self.inner.alloc_buf(len_bytes)
    }
    fn alloc_buf_for_overwrite(&self, len_bytes: usize) -> Result<DmaBuf> {
        self.inner.alloc_buf_for_overwrite(len_bytes)
    }
}

struct FaultBackend {
    inner: Box<dyn ChannelBackend>,
    state: Arc<Mutex<FaultState>>,
    tags: HashMap<Tag, TagInfo>,
    /// Operations failed at submission, reported at the next reap.
    failed: Vec<(Tag, Error)>,
    /// Completions of the inner device not reported yet, each with the
    /// reaps it still waits (see [`FaultDevice::set_reap_delay`]).
    held: Vec<(Tag, Result<()>, u32)>,
}

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

impl ChannelBackend for FaultBackend {
    fn submit(&mut self, tag: Tag, op: &IoOp) -> Result<()> {
        let mut st = self.state.lock();
        st.ops += 1;
        let n = st.ops;
        if st.capture_at.first() == Some(&n) {
            st.capture_at.remove(0);
            let img = st.image();
            st.captures.push((n, img));
        }
        if st.crash_at == Some(n) {
            st.crashed = true;
        }
        if st.crashed {
            self.failed.push((tag, op.error("the device lost power")));
            return Ok(());
        }
        let mut fail = false;
        for r in st.rules.iter_mut().filter(|r| r.kind == op.kind) {
            r.countdown -= 1;
            if r.countdown == 0 {
                fail = true;
            }
        }
        st.rules.retain(|r| r.countdown > 0);
        let is_write = matches!(op.kind, IoKind::Write | IoKind::Unmap | IoKind::WriteZeroes);
        let bs = st.block_size;
        let info = if is_write {
            st.writes += 1;
            let len = op.blocks as usize * bs;
            let data = (op.kind == IoKind::Write).then(|| Arc::new(copy_segments(op, len)));
            let w = PendingWrite {
                ordinal: st.writes,
                off: op.lba as usize * bs,
                len,
                data,
                completed: false,
            };
            if !fail {
                st.pending.push(w);
            }
            TagInfo::Write(st.writes)
        } else if op.kind == IoKind::Flush {
            let covers = st
                .pending
                .iter()
                .filter(|p| p.completed)
                .map(|p| p.ordinal)
                .collect();
            TagInfo::Flush(covers)
        } else {
            TagInfo::Other
        };
        if fail {
            st.injected += 1;
            self.failed.push((tag, op.error("injected I/O error")));
            return Ok(());
        }
        if is_write {
            st.writes_in_flight += 1;
            st.peak_writes_in_flight = st.peak_writes_in_flight.max(st.writes_in_flight);
        }
        drop(st);
        if let Err(e) = self.inner.submit(tag, op) {
            if is_write {
                self.state.lock().writes_in_flight -= 1;
            }
            return Err(e);
        }
        self.tags.insert(tag, info);
        Ok(())
    }

    fn reap(&mut self, done: &mut dyn FnMut(Tag, Result<()>)) -> usize {
        let mut n = 0;
        for (tag, e) in self.failed.drain(..) {
            done(tag, Err(e));
            n += 1;
        }
        let delay = self.state.lock().reap_delay;
        let held = &mut self.held;
        self.inner
            .reap(&mut |tag, result| held.push((tag, result, delay)));
        let mut due = Vec::new();
        self.held.retain_mut(|(tag, result, wait)| {
            if *wait > 0 {
                *wait -= 1;
                return true;
            }
            due.push((*tag, std::mem::replace(result, Ok(()))));
            false
        });
        let state = &self.state;
        let tags = &mut self.tags;
        n += due.len();
        due.into_iter().for_each(|(tag, result)| {
            let info = tags.remove(&tag).unwrap_or(TagInfo::Other);
            let mut st = state.lock();
            if let TagInfo::Write(_) = info {
                st.writes_in_flight -= 1;
            }
            if st.crashed {
                drop(st);
                done(
                    tag,
                    Err(Error::Io {
                        op: "completion",
                        lba: 0,
                        blocks: 0,
                        reason: "the device lost power".into(),
                    }),
                );
                return;
            }
            if result.is_ok() {
                match info {
                    TagInfo::Write(ord) => {
                        if let Some(p) = st.pending.iter_mut().find(|p| p.ordinal == ord) {
                            p.completed = true;
                        }
                    }
                    TagInfo::Flush(covers) => {
                        st.apply_durable(&covers);
                        st.flushes_done += 1;
                    }
                    TagInfo::Other => {}
                }
            } else if let TagInfo::Write(ord) = info {
                // A write the device itself failed may have landed in part.
                if let Some(i) = st.pending.iter().position(|p| p.ordinal == ord) {
                    let p = st.pending.remove(i);
                    st.lost.push(p);
                }
            }
            drop(st);
            done(tag, result);
        });
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::channel;

    fn dev() -> (FaultDevice, Arc<dyn BlockDevice>) {
        let mem: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 10, 512).unwrap());
        let f = FaultDevice::new(mem).unwrap();
        let d: Arc<dyn BlockDevice> = Arc::new(f.clone());
        (f, d)
    }

    #[test]
    fn writes_are_durable_only_after_a_later_flush() {
        let (f, d) = dev();
        let ch = channel(&d).unwrap();
        block_on(async {
            ch.write(0, DmaBuf::from_slice(&[1u8; 8192]).unwrap())
                .await
                .unwrap();
            assert_eq!(f.durable_watermark(), 0);
            assert!(f.crash_image().durable()[..8192].iter().all(|&b| b == 0));
            ch.flush().await.unwrap();
            assert_eq!(f.durable_watermark(), 1);
            ch.write(16, DmaBuf::from_slice(&[2u8; 8192]).unwrap())
                .await
                .unwrap();
        });
        let img = f.crash_image();
        assert!(img.durable()[..8192].iter().all(|&b| b == 1));
        assert!(img.durable()[8192..16384].iter().all(|&b| b == 0));
        // Over many seeds, every subset of the two pending pages shows up.
        let mut seen = std::collections::HashSet::new();
        for seed in 0..64 {
            let m = img.materialize(seed);
            seen.insert((m[8192], m[12288]));
            assert!(
                m[8192..12288].iter().all(|&b| b == m[8192]),
                "torn inside a page"
            );
        }
        assert_eq!(seen.len(), 4);
        // Same seed, same image.
        assert_eq!(img.materialize(5), img.materialize(5));
    }

    #[test]
    fn crash_point_fails_everything_after_it() {
        let (f, d) = dev();
        let ch = channel(&d).unwrap();
        f.crash_after(2);
        block_on(async {
            ch.write(0, DmaBuf::from_slice(&[3u8; 512]).unwrap())
                .await
                .unwrap();
            assert!(ch.flush().await.is_err());
            assert!(ch.read(0, DmaBuf::new(512).unwrap()).await.is_err());
        });
        assert!(f.is_crashed());
        // The flush failed, so the write is at most pending.
        let m = f.after_crash(1).unwrap();
        let mut b = [0u8; 1];
        m.load_bytes(0, &mut b);
        assert!(b[0] == 0 || b[0] == 3);
    }

    #[test]
    fn nth_failures_fire_once() {
        let (f, d) = dev();
        let ch = channel(&d).unwrap();
        f.fail_nth(IoKind::Read, 2);
        f.fail_nth(IoKind::Flush, 1);
        block_on(async {
            assert!(ch.read(0, DmaBuf::new(512).unwrap()).await.is_ok());
            assert!(ch.read(0, DmaBuf::new(512).unwrap()).await.is_err());
            assert!(ch.read(0, DmaBuf::new(512).unwrap()).await.is_ok());
            assert!(ch.flush().await.is_err());
            assert!(ch.flush().await.is_ok());
        });
        assert_eq!(f.injected_failures(), 2);
    }

    #[test]
    fn captures_do_not_stop_the_device() {
        let (f, d) = dev();
        let ch = channel(&d).unwrap();
        f.capture_at(vec![2, 3]);
        block_on(async {
            ch.write(0, DmaBuf::from_slice(&[4u8; 512]).unwrap())
                .await
                .unwrap();
            ch.flush().await.unwrap();
            ch.write(1, DmaBuf::from_slice(&[5u8; 512]).unwrap())
                .await
                .unwrap();
        });
        let caps = f.take_captures();
        assert_eq!(caps.iter().map(|c| c.0).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(caps[0].1.pending_writes(), 1);
        assert_eq!(caps[1].1.pending_writes(), 0);
        assert_eq!(caps[1].1.durable()[0], 4);
        assert!(!f.is_crashed());
    }
}
