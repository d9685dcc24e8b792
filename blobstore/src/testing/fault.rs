//! `FaultDevice`: a wrapper around any [`BlockDevice`] that injects faults
//! by [`Rule`]s (fail the n-th operation of some kinds once, fail every one
//! after the first n, stall them, lose power at an operation), counts what
//! goes through, and, made with [`FaultDevice::new`], records the crash
//! image a power cut would leave ([`CrashImage`]).
//!
//! Invariants:
//! - Every operation is numbered at submission (from 1, failed ones too);
//!   an image asked for with [`FaultDevice::capture_at`] is taken just
//!   before its operation, then the crash rules are judged, then (with
//!   power) the other rules.
//! - Once crashed (by a crash rule, or on demand), every operation fails,
//!   completions of operations that were in flight report failure, no rule
//!   counts any more, and nothing more becomes durable.
//! - An injected failure fails exactly the operation it fires on, which
//!   then does nothing at all (as SPDK's error injection): a failed write
//!   reaches neither the live image nor the media. It is reported at the
//!   next reap, as the device's own errors are.
//! - A completion is reported no sooner than its operation's stall after
//!   its submission and no sooner than the reap delay's count of reaps
//!   after the inner device reported it; never before the inner device did.
//! - Deterministic: the same operations, rules and seed give the same
//!   failures and the same crash image.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::image::{CrashImage, Recorder};
use super::rules::{Effect, Rule, RuleSet};
use crate::device::{
    BlockDevice, ChannelBackend, DeviceId, DmaBuf, Geometry, IoKind, IoOp, MemDevice, Tag,
};
use crate::error::{Error, Result};

/// What an in-flight tag of a fault backend is.
enum TagInfo {
    /// A write-like op with its ordinal.
    Write(u64),
    /// A flush covering the writes with these ordinals.
    Flush(Vec<u64>),
    /// Anything else.
    Other,
}

struct FaultState {
    /// The crash image, for devices made with [`FaultDevice::new`].
    recorder: Option<Recorder>,
    rules: RuleSet,
    ops: u64,
    writes: u64,
    /// Write-like ops handed to the inner device and not reported yet, and
    /// the most there were at once since the peak was last taken.
    writes_in_flight: u64,
    peak_writes_in_flight: u64,
    /// Reaps a completion waits before it is reported.
    reap_delay: u32,
    flushes_done: u64,
    crashed: bool,
    injected: u64,
}

impl FaultState {
    fn recorder(&mut self) -> Result<&mut Recorder> {
        self.recorder.as_mut().ok_or_else(|| {
            Error::InvalidArgument(
                "this FaultDevice keeps no crash image (made with FaultDevice::without_image)"
                    .into(),
            )
        })
    }
}

/// A fault-injecting, power-loss simulating wrapper; see the module docs.
/// Clones share one device.
#[derive(Clone)]
pub struct FaultDevice {
    inner: Arc<dyn BlockDevice>,
    id: DeviceId,
    state: Arc<Mutex<FaultState>>,
}

impl FaultDevice {
    /// Wraps `inner`, recording the crash image. The device's current
    /// contents become the durable image, so they are read once here and
    /// kept in memory (keep such devices small).
    pub fn new(inner: Arc<dyn BlockDevice>) -> Result<FaultDevice> {
        let recorder = Recorder::read_from(&inner)?;
        Ok(Self::wrap(inner, Some(recorder)))
    }

    /// Wraps `inner` for its rules and counters only: no crash image, so
    /// no copy of the device or of its writes (any size of device). The
    /// crash image methods return an error.
    pub fn without_image(inner: Arc<dyn BlockDevice>) -> FaultDevice {
        Self::wrap(inner, None)
    }

    fn wrap(inner: Arc<dyn BlockDevice>, recorder: Option<Recorder>) -> FaultDevice {
        FaultDevice {
            id: DeviceId::fresh(),
            state: Arc::new(Mutex::new(FaultState {
                recorder,
                rules: RuleSet::default(),
                ops: 0,
                writes: 0,
                writes_in_flight: 0,
                peak_writes_in_flight: 0,
                reap_delay: 0,
                flushes_done: 0,
                crashed: false,
                injected: 0,
            })),
            inner,
        }
    }

    /// Sets the tearing granularity of the crash image (a multiple of the
    /// block size; default [`super::DEFAULT_TEAR_BYTES`]).
    pub fn set_tear_bytes(&self, bytes: usize) -> Result<()> {
        self.state.lock().recorder()?.set_tear_bytes(bytes)
    }

    /// The wrapped device (the live image).
    pub fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }

    /// Arms `rule`, beside the rules already armed.
    pub fn arm(&self, rule: Rule) {
        self.state.lock().rules.arm(rule);
    }

    /// Makes the `n`-th next operation of `kind` fail (once): shorthand for
    /// [`Rule::fail_nth`]. Several rules may be armed at a time.
    pub fn fail_nth(&self, kind: IoKind, n: u64) {
        self.arm(Rule::fail_nth(kind, n));
    }

    /// Disarms every failure rule ([`Effect::Fail`]).
    pub fn clear_failures(&self) {
        self.state.lock().rules.clear(|e| *e == Effect::Fail);
    }

    /// Disarms every stall rule ([`Effect::Stall`]); operations already
    /// stalled keep their stall.
    pub fn clear_stalls(&self) {
        self.state
            .lock()
            .rules
            .clear(|e| matches!(e, Effect::Stall(_)));
    }

    /// Crashes when the `n`-th operation from now is submitted: that
    /// operation and every later one fail. `n = 1` fails the next one. It
    /// replaces a crash armed before ([`Rule::crash_at`]).
    pub fn crash_after(&self, n: u64) {
        let mut st = self.state.lock();
        st.rules.clear(|e| *e == Effect::Crash);
        st.rules.arm(Rule::crash_at(n));
    }

    /// Crashes now.
    pub fn crash(&self) {
        self.state.lock().crashed = true;
    }

    /// True once crashed.
    pub fn is_crashed(&self) -> bool {
        self.state.lock().crashed
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
    /// `w` is durable once this reaches `w`. Needs the crash image.
    pub fn durable_watermark(&self) -> Result<u64> {
        let mut st = self.state.lock();
        let writes = st.writes;
        Ok(st.recorder()?.watermark(writes))
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

    /// Flushes that completed (with power).
    pub fn flushes_done(&self) -> u64 {
        self.state.lock().flushes_done
    }

    /// Arranges for a crash image to be captured, without stopping the
    /// device, just before each of these operation numbers is submitted
    /// (operation numbers count from 1, as [`FaultDevice::op_count`] does).
    /// Needs the crash image.
    pub fn capture_at(&self, ops: Vec<u64>) -> Result<()> {
        self.state.lock().recorder()?.capture_at(ops);
        Ok(())
    }

    /// Takes the images captured so far, with the operation number each was
    /// taken before (none without a crash image).
    pub fn take_captures(&self) -> Vec<(u64, CrashImage)> {
        let mut st = self.state.lock();
        st.recorder
            .as_mut()
            .map(Recorder::take_captures)
            .unwrap_or_default()
    }

    /// What a crash right now would leave, without crashing. Needs the
    /// crash image.
    pub fn crash_image(&self) -> Result<CrashImage> {
        Ok(self.state.lock().recorder()?.image())
    }

    /// Crashes (if not crashed yet) and returns the device as it comes back
    /// after the power cut, with `seed` choosing which pending pages landed.
    /// Needs the crash image.
    pub fn after_crash(&self, seed: u64) -> Result<MemDevice> {
        let img = {
            let mut st = self.state.lock();
            st.crashed = true;
            st.recorder()?.image()
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
    // Safe to pass on: a failed op never reaches the device, and a held
    // completion is reported only after the device reported it.
    fn reads_into_any_memory(&self) -> bool {
        self.inner.reads_into_any_memory()
    }
}

/// An operation handed to the inner device.
struct InFlight {
    info: TagInfo,
    /// When it was submitted and how long it is stalled (zero: not).
    submitted: Option<Instant>,
    stall: Duration,
}

/// A completion of the inner device not reported yet.
struct Held {
    tag: Tag,
    result: Result<()>,
    /// Reaps it still waits (see [`FaultDevice::set_reap_delay`]).
    reaps: u32,
    flight: Option<InFlight>,
}

impl Held {
    /// True once it may be reported; counts one reap against its delay.
    fn due(&mut self) -> bool {
        if self.reaps > 0 {
            self.reaps -= 1;
            return false;
        }
        match &self.flight {
            Some(InFlight {
                submitted: Some(at),
                stall,
                ..
            }) => at.elapsed() >= *stall,
            _ => true,
        }
    }
}

struct FaultBackend {
    inner: Box<dyn ChannelBackend>,
    state: Arc<Mutex<FaultState>>,
    tags: HashMap<Tag, InFlight>,
    /// Operations failed at submission, reported at the next reap.
    failed: Vec<(Tag, Error)>,
    /// Completions of the inner device not reported yet.
    held: Vec<Held>,
}

impl ChannelBackend for FaultBackend {
    fn submit(&mut self, tag: Tag, op: &IoOp) -> Result<()> {
        let mut st = self.state.lock();
        st.ops += 1;
        let n = st.ops;
        if let Some(rec) = st.recorder.as_mut() {
            rec.before_op(n);
        }
        if st.rules.judge(op.kind, true).crash {
            st.crashed = true;
        }
        if st.crashed {
            self.failed.push((tag, op.error("the device lost power")));
            return Ok(());
        }
        let verdict = st.rules.judge(op.kind, false);
        let is_write = matches!(op.kind, IoKind::Write | IoKind::Unmap | IoKind::WriteZeroes);
        let info = if is_write {
            st.writes += 1;
            debug_assert!(st.writes <= st.ops);
            let ordinal = st.writes;
            if !verdict.fail {
                if let Some(rec) = st.recorder.as_mut() {
                    rec.write_submitted(ordinal, op);
                }
            }
            TagInfo::Write(ordinal)
        } else if op.kind == IoKind::Flush {
            TagInfo::Flush(
                st.recorder
                    .as_ref()
                    .map(Recorder::flush_covers)
                    .unwrap_or_default(),
            )
        } else {
            TagInfo::Other
        };
        if verdict.fail {
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
                let mut st = self.state.lock();
                debug_assert!(st.writes_in_flight > 0);
                st.writes_in_flight = st.writes_in_flight.saturating_sub(1);
            }
            return Err(e);
        }
        let stalled = !verdict.stall.is_zero();
        self.tags.insert(
            tag,
            InFlight {
                info,
                submitted: stalled.then(Instant::now),
                stall: verdict.stall,
            },
        );
        Ok(())
    }

    fn reap(&mut self, done: &mut dyn FnMut(Tag, Result<()>)) -> usize {
        let mut n = 0;
        for (tag, e) in self.failed.drain(..) {
            done(tag, Err(e));
            n += 1;
        }
        let delay = self.state.lock().reap_delay;
        let (held, tags) = (&mut self.held, &mut self.tags);
        self.inner.reap(&mut |tag, result| {
            held.push(Held {
                tag,
                result,
                reaps: delay,
                flight: tags.remove(&tag),
            })
        });
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].due() {
                due.push(self.held.remove(i));
            } else {
                i += 1;
            }
        }
        n += due.len();
        for h in due {
            let info = h.flight.map_or(TagInfo::Other, |f| f.info);
            let result = self.complete(info, h.result);
            done(h.tag, result);
        }
        n
    }
}

impl FaultBackend {
    /// Accounts for the completion of an op the inner device reported
    /// with `result`; returns the result to report.
    fn complete(&self, info: TagInfo, result: Result<()>) -> Result<()> {
        let mut guard = self.state.lock();
        let st = &mut *guard;
        if let TagInfo::Write(_) = info {
            debug_assert!(st.writes_in_flight > 0);
            st.writes_in_flight = st.writes_in_flight.saturating_sub(1);
        }
        if st.crashed {
            return Err(Error::Io {
                op: "completion",
                lba: 0,
                blocks: 0,
                reason: "the device lost power".into(),
            });
        }
        match (&info, &result, st.recorder.as_mut()) {
            (TagInfo::Write(ord), Ok(()), Some(rec)) => rec.write_completed(*ord),
            // A write the device itself failed may have landed in part.
            (TagInfo::Write(ord), Err(_), Some(rec)) => rec.write_failed(*ord),
            (TagInfo::Flush(covers), Ok(()), rec) => {
                if let Some(rec) = rec {
                    rec.flush_completed(covers);
                }
                st.flushes_done += 1;
            }
            _ => {}
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{channel, Lba};
    use crate::exec::block_on;
    use crate::testing::Kinds;

    /// A fault device on 64 KiB of memory (with the crash image if
    /// `image`), and the same as a `dyn BlockDevice`.
    fn dev_with(image: bool) -> (FaultDevice, Arc<dyn BlockDevice>) {
        let mem: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 10, 512).unwrap());
        let f = if image {
            FaultDevice::new(mem).unwrap()
        } else {
            FaultDevice::without_image(mem)
        };
        let d: Arc<dyn BlockDevice> = Arc::new(f.clone());
        (f, d)
    }

    fn dev() -> (FaultDevice, Arc<dyn BlockDevice>) {
        dev_with(true)
    }

    #[test]
    fn writes_are_durable_only_after_a_later_flush() {
        let (f, d) = dev();
        let ch = channel(&d).unwrap();
        block_on(async {
            ch.write(Lba(0), DmaBuf::from_slice(&[1u8; 8192]).unwrap())
                .await
                .unwrap();
            assert_eq!(f.durable_watermark().unwrap(), 0);
            assert!(f.crash_image().unwrap().durable()[..8192]
                .iter()
                .all(|&b| b == 0));
            ch.flush().await.unwrap();
            assert_eq!(f.durable_watermark().unwrap(), 1);
            ch.write(Lba(16), DmaBuf::from_slice(&[2u8; 8192]).unwrap())
                .await
                .unwrap();
        });
        let img = f.crash_image().unwrap();
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
            ch.write(Lba(0), DmaBuf::from_slice(&[3u8; 512]).unwrap())
                .await
                .unwrap();
            assert!(ch.flush().await.is_err());
            assert!(ch.read(Lba(0), DmaBuf::new(512).unwrap()).await.is_err());
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
            assert!(ch.read(Lba(0), DmaBuf::new(512).unwrap()).await.is_ok());
            assert!(ch.read(Lba(0), DmaBuf::new(512).unwrap()).await.is_err());
            assert!(ch.read(Lba(0), DmaBuf::new(512).unwrap()).await.is_ok());
            assert!(ch.flush().await.is_err());
            assert!(ch.flush().await.is_ok());
        });
        assert_eq!(f.injected_failures(), 2);
    }

    #[test]
    fn captures_do_not_stop_the_device() {
        let (f, d) = dev();
        let ch = channel(&d).unwrap();
        f.capture_at(vec![2, 3]).unwrap();
        block_on(async {
            ch.write(Lba(0), DmaBuf::from_slice(&[4u8; 512]).unwrap())
                .await
                .unwrap();
            ch.flush().await.unwrap();
            ch.write(Lba(1), DmaBuf::from_slice(&[5u8; 512]).unwrap())
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

    #[test]
    fn fail_after_lets_n_through_then_fails_until_cleared() {
        let (f, d) = dev_with(false);
        let ch = channel(&d).unwrap();
        f.arm(Rule::fail_after(
            Kinds::WRITE | Kinds::FLUSH | Kinds::WRITE_ZEROES,
            2,
        ));
        let w = |b: u8| ch.write(Lba(0), DmaBuf::from_slice(&[b; 512]).unwrap());
        block_on(async {
            assert!(w(1).await.is_ok());
            assert!(ch.flush().await.is_ok());
            assert!(w(2).await.is_err());
            assert!(ch.write_zeroes(Lba(0), 1).await.is_err());
            // Reads and unmaps are not selected.
            assert!(ch.read(Lba(0), DmaBuf::new(512).unwrap()).await.is_ok());
            assert!(ch.unmap(Lba(1), 1).await.is_ok());
            // The failed write never reached the device.
            let got = ch.read(Lba(0), DmaBuf::new(512).unwrap()).await.unwrap();
            assert_eq!(got[0], 1);
            f.clear_failures();
            assert!(w(3).await.is_ok());
        });
        assert_eq!(f.injected_failures(), 2);
    }

    #[test]
    fn stalled_reads_complete_after_their_stall() {
        use std::time::{Duration, Instant};
        let (f, d) = dev_with(false);
        let ch = channel(&d).unwrap();
        let stall = Duration::from_millis(30);
        f.arm(Rule::stall(IoKind::Read, stall));
        let start = Instant::now();
        block_on(ch.read(Lba(0), DmaBuf::new(512).unwrap())).unwrap();
        assert!(start.elapsed() >= stall);
        // Writes are not stalled; after clearing, reads are not either.
        f.clear_stalls();
        let start = Instant::now();
        block_on(ch.write(Lba(0), DmaBuf::from_slice(&[1u8; 512]).unwrap())).unwrap();
        block_on(ch.read(Lba(0), DmaBuf::new(512).unwrap())).unwrap();
        assert!(start.elapsed() < stall);
    }

    #[test]
    fn without_image_the_image_calls_are_errors() {
        let (f, _) = dev_with(false);
        for err in [
            f.crash_image().err(),
            f.after_crash(1).err(),
            f.durable_watermark().err(),
            f.capture_at(vec![1]).err(),
            f.set_tear_bytes(4096).err(),
        ] {
            let err = err.expect("an error").to_string();
            assert!(err.contains("keeps no crash image"), "{err}");
        }
        assert!(f.take_captures().is_empty());
    }
}
