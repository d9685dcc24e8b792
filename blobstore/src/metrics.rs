//! Metrics cheap enough to leave on: counts, bytes and latency histograms
//! kept in per-thread shards, folded when someone reads them.
//!
//! A recording thread writes only its own shard (no cache line shared with
//! another recorder), and times with the CPU's time-stamp counter where it
//! is invariant (x86-64: two `rdtsc`s per timed operation, no system call);
//! ticks become nanoseconds when a snapshot is folded. Elsewhere the clock is
//! [`Instant`].
//!
//! Histograms have 8 buckets per power of two, so a quantile read from one
//! is within 12.5% above the true value (it reports its bucket's upper
//! bound), from 1 tick to about 2^43.

use std::any::Any;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use parking_lot::Mutex;

const SUB_BITS: u32 = 3;
const SUB: usize = 1 << SUB_BITS;
/// Buckets of a histogram: exact below `SUB`, then `SUB` per power of two.
const BUCKETS: usize = 41 * SUB;

/// The bucket of `v`.
fn bucket(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let e = 63 - v.leading_zeros();
    let sub = ((v >> (e - SUB_BITS)) as usize) & (SUB - 1);
    (((e - SUB_BITS + 1) as usize) * SUB + sub).min(BUCKETS - 1)
}

/// The largest value bucket `i` holds.
fn bucket_high(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let e = (i / SUB) as u32 + SUB_BITS - 1;
    let width = 1u64 << (e - SUB_BITS);
    (1u64 << e) + (i % SUB) as u64 * width + width - 1
}

/// A point in time on the metrics clock, in ticks.
#[derive(Clone, Copy, Debug)]
pub struct Stamp(u64);

/// Where the clock started: ticks and wall time, to scale ticks to
/// nanoseconds over everything since.
struct Origin {
    ticks: u64,
    at: Instant,
}

fn origin() -> &'static Origin {
    static ORIGIN: OnceLock<Origin> = OnceLock::new();
    ORIGIN.get_or_init(|| Origin {
        ticks: raw_ticks(),
        at: Instant::now(),
    })
}

#[cfg(target_arch = "x86_64")]
fn tsc_usable() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| {
        // An invariant TSC ticks at one rate in every state and on every
        // core; without it fall back to the monotonic clock.
        std::fs::read_to_string("/proc/cpuinfo")
            .map(|c| c.contains(" constant_tsc") && c.contains(" nonstop_tsc"))
            .unwrap_or(false)
    })
}

#[inline(always)]
fn raw_ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        if tsc_usable() {
            // SAFETY: rdtsc has no preconditions; it only reads a counter.
            return unsafe { core::arch::x86_64::_rdtsc() };
        }
    }
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

impl Stamp {
    /// Now.
    #[inline(always)]
    pub fn now() -> Stamp {
        Stamp(raw_ticks())
    }

    /// Ticks from `self` to now.
    #[inline(always)]
    pub fn elapsed_ticks(self) -> u64 {
        raw_ticks().saturating_sub(self.0)
    }
}

/// Nanoseconds per tick, measured over the whole run so far (1 where ticks
/// are nanoseconds).
pub fn ns_per_tick() -> f64 {
    let o = origin();
    let ns = o.at.elapsed().as_nanos() as f64;
    let ticks = raw_ticks().saturating_sub(o.ticks) as f64;
    if ticks < 1e6 || ns < 1e5 {
        // Too early to tell: measure over a short interval instead.
        let (t0, i0) = (raw_ticks(), Instant::now());
        while i0.elapsed().as_micros() < 500 {
            std::hint::spin_loop();
        }
        let t = raw_ticks().saturating_sub(t0) as f64;
        return if t > 0.0 {
            i0.elapsed().as_nanos() as f64 / t
        } else {
            1.0
        };
    }
    ns / ticks
}

/// One kind of operation's counters in one shard: count, bytes, errors and
/// a latency histogram in ticks.
pub struct OpCounter {
    count: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    sum: AtomicU64,
    max: AtomicU64,
    hist: [AtomicU64; BUCKETS],
}

impl Default for OpCounter {
    fn default() -> OpCounter {
        OpCounter {
            count: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
            hist: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// Adds `v` to a counter only its shard's thread writes (a plain load and
/// store: no locked instruction; a rare second writer can lose an update,
/// never corrupt one).
#[inline(always)]
fn bump(c: &AtomicU64, v: u64) {
    c.store(c.load(Relaxed).wrapping_add(v), Relaxed);
}

impl OpCounter {
    /// Records one operation of `bytes` that started at `start`; `ok` false
    /// counts an error (its latency is recorded all the same).
    #[inline]
    pub fn record(&self, start: Stamp, bytes: u64, ok: bool) {
        self.record_ticks(start.elapsed_ticks(), bytes, ok);
    }

    /// [`OpCounter::record`] with the latency already measured, in ticks.
    #[inline]
    pub fn record_ticks(&self, ticks: u64, bytes: u64, ok: bool) {
        bump(&self.count, 1);
        bump(&self.bytes, bytes);
        if !ok {
            bump(&self.errors, 1);
        }
        bump(&self.sum, ticks);
        if ticks > self.max.load(Relaxed) {
            self.max.store(ticks, Relaxed);
        }
        bump(&self.hist[bucket(ticks)], 1);
    }

    /// Adds this shard's figures to `acc` (still in ticks).
    fn fold_into(&self, acc: &mut OpStats) {
        acc.count += self.count.load(Relaxed);
        acc.bytes += self.bytes.load(Relaxed);
        acc.errors += self.errors.load(Relaxed);
        acc.sum_ns += self.sum.load(Relaxed);
        acc.max_ns = acc.max_ns.max(self.max.load(Relaxed));
        if acc.hist.len() != BUCKETS {
            acc.hist = vec![0; BUCKETS];
        }
        for (a, h) in acc.hist.iter_mut().zip(&self.hist) {
            *a += h.load(Relaxed);
        }
    }
}

/// One kind of operation, folded over every thread: what a snapshot shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OpStats {
    /// Operations.
    pub count: u64,
    /// Bytes they moved.
    pub bytes: u64,
    /// Operations that failed.
    pub errors: u64,
    /// Total latency, nanoseconds.
    pub sum_ns: u64,
    /// Largest latency, nanoseconds.
    pub max_ns: u64,
    /// Quantiles: the latency (ns) at or below which lies each fraction.
    hist: Vec<u64>,
    /// Nanoseconds per histogram tick.
    scale: f64,
}

impl OpStats {
    /// Folds `op` of every shard (`pick` chooses it from a shard).
    pub fn fold<T>(shards: &[Arc<T>], pick: impl Fn(&T) -> &OpCounter) -> OpStats {
        let mut s = OpStats::default();
        for sh in shards {
            pick(sh).fold_into(&mut s);
        }
        s.scaled(ns_per_tick())
    }

    fn scaled(mut self, scale: f64) -> OpStats {
        self.sum_ns = (self.sum_ns as f64 * scale) as u64;
        self.max_ns = (self.max_ns as f64 * scale) as u64;
        self.scale = scale;
        self
    }

    /// The latency (ns) at or below which a fraction `q` (0..=1) of the
    /// operations completed: the upper bound of the bucket it falls in
    /// (within 12.5%), never above [`OpStats::max_ns`]; 0 with no
    /// operations.
    pub fn quantile_ns(&self, q: f64) -> u64 {
        let total: u64 = self.hist.iter().sum();
        if total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &n) in self.hist.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let ns = (bucket_high(i) as f64 * self.scale) as u64;
                return ns.min(self.max_ns);
            }
        }
        self.max_ns
    }

    /// Median latency, nanoseconds.
    pub fn p50_ns(&self) -> u64 {
        self.quantile_ns(0.5)
    }

    /// 99th percentile latency, nanoseconds.
    pub fn p99_ns(&self) -> u64 {
        self.quantile_ns(0.99)
    }

    /// 99.9th percentile latency, nanoseconds.
    pub fn p999_ns(&self) -> u64 {
        self.quantile_ns(0.999)
    }

    /// Mean latency, nanoseconds (0 with no operations).
    pub fn mean_ns(&self) -> u64 {
        self.sum_ns.checked_div(self.count).unwrap_or(0)
    }

    /// The histogram's buckets with their upper bounds in nanoseconds, for
    /// an exporter: `(upper bound, operations in the bucket)`, empty
    /// buckets left out.
    pub fn buckets_ns(&self) -> Vec<(u64, u64)> {
        self.hist
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .map(|(i, &n)| ((bucket_high(i) as f64 * self.scale) as u64, n))
            .collect()
    }
}

/// Per-thread shards of `T`, one per thread that records, kept after the
/// thread ends (its counts still count).
pub struct Shards<T> {
    id: u64,
    all: Mutex<Vec<Arc<T>>>,
}

thread_local! {
    /// This thread's shard of each live [`Shards`], by id.
    static LOCAL: RefCell<Vec<(u64, Arc<dyn Any + Send + Sync>)>> = const { RefCell::new(Vec::new()) };
}

impl<T: Default + Send + Sync + 'static> Default for Shards<T> {
    fn default() -> Shards<T> {
        Shards::new()
    }
}

impl<T: Default + Send + Sync + 'static> Shards<T> {
    /// No shards yet.
    pub fn new() -> Shards<T> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        // The clock's origin, from before anything is timed (see
        // `ns_per_tick`), so the hot path need not check for it.
        let _ = origin();
        Shards {
            id: NEXT.fetch_add(1, Relaxed),
            all: Mutex::new(Vec::new()),
        }
    }

    /// A new shard, not tied to a thread (for an owner that is itself
    /// per-thread, such as an I/O channel).
    pub fn add(&self) -> Arc<T> {
        let s = Arc::new(T::default());
        self.all.lock().push(s.clone());
        s
    }

    /// Runs `f` on this thread's shard (created on first use). The shard
    /// is used in place, with no reference count taken: this is on every
    /// counted operation's path.
    #[inline]
    pub fn with<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        let mut f = Some(f);
        let hit = LOCAL.with(|l| {
            let l = l.try_borrow().ok()?;
            let (_, s) = l.iter().find(|(id, _)| *id == self.id)?;
            let t = s.downcast_ref::<T>()?;
            f.take().map(|f| f(t))
        });
        if let Some(r) = hit {
            return r;
        }
        let s = self.add();
        LOCAL.with(|l| {
            if let Ok(mut l) = l.try_borrow_mut() {
                // Shards whose set is gone (only this list holds them).
                l.retain(|(_, s)| Arc::strong_count(s) > 1);
                l.push((self.id, s.clone()));
            }
        });
        match f {
            Some(f) => f(&s),
            // `hit` is None only when `f` was never called.
            None => unreachable!("a shard's closure ran and returned nothing"),
        }
    }

    /// Every shard so far.
    pub fn all(&self) -> Vec<Arc<T>> {
        self.all.lock().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut last = 0;
        for i in 1..BUCKETS {
            assert!(bucket_high(i) > bucket_high(i - 1), "{i}");
            assert_eq!(bucket(bucket_high(i)), i, "{i}");
            assert_eq!(bucket(bucket_high(i - 1) + 1), i, "{i}");
            last = bucket_high(i);
        }
        assert!(last >= (1 << 43) - 1);
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
        for v in [0, 1, 7, 8, 9, 100, 1000, 123_456_789] {
            let b = bucket(v);
            assert!(v <= bucket_high(b));
            // Within 12.5% above.
            assert!(bucket_high(b) as f64 <= v as f64 * 1.125 + 1.0, "{v}");
        }
    }

    #[derive(Default)]
    struct Two {
        a: OpCounter,
    }

    #[test]
    fn shards_fold_counts_from_every_thread() {
        let s = Arc::new(Shards::<Two>::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..1000u64 {
                        s.with(|sh| {
                            sh.a.record_ticks(if t == 0 { i } else { 10 }, 2, i % 10 != 0)
                        });
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut f = OpStats::default();
        for sh in s.all() {
            sh.a.fold_into(&mut f);
        }
        assert_eq!(s.all().len(), 4, "one shard per thread");
        assert_eq!(f.count, 4000);
        assert_eq!(f.bytes, 8000);
        assert_eq!(f.errors, 400);
        assert_eq!(f.max_ns, 999);
        let f = f.scaled(1.0);
        // 3000 of 4000 at 10, the rest spread over 0..1000.
        assert_eq!(f.p50_ns(), 10);
        let p99 = f.p99_ns();
        assert!((959..=999).contains(&p99), "{p99}");
        assert_eq!(f.quantile_ns(1.0), 999);
    }

    #[test]
    fn the_clock_ticks_forward_and_scales_to_wall_time() {
        let s = Stamp::now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let ns = s.elapsed_ticks() as f64 * ns_per_tick();
        assert!((15e6..2e9).contains(&ns), "{ns}");
    }
}
