//! A fixed-size, log-linear latency histogram (HDR style).
//!
//! Invariants:
//! - Values below `2^SUB_BITS` ns land in exact buckets; above that, each
//!   power of two is split into `2^SUB_BITS` equal buckets, so a reported
//!   percentile is within about 3% (one bucket width) of the true value.
//! - `count` is the sum of all buckets; `min_ns <= max_ns` once a value was
//!   recorded; recording never allocates.

use std::time::Duration;

/// Sub-buckets per power of two, as a power of two (32 → about 3% error).
const SUB_BITS: u32 = 5;
const SUB: usize = 1 << SUB_BITS;
/// Enough buckets for every `u64` nanosecond value.
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB;

/// Latencies of many operations, in nanoseconds, in log-linear buckets.
#[derive(Clone)]
pub struct LatencyHistogram {
    buckets: Box<[u64; BUCKETS]>,
    count: u64,
    sum_ns: u128,
    min_ns: u64,
    max_ns: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram::new()
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LatencyHistogram")
            .field("count", &self.count)
            .field("p50_us", &self.percentile_us(50.0))
            .field("p99_us", &self.percentile_us(99.0))
            .field("max_us", &(self.max_ns as f64 / 1e3))
            .finish()
    }
}

fn bucket_of(ns: u64) -> usize {
    if ns < SUB as u64 {
        return ns as usize;
    }
    let msb = 63 - ns.leading_zeros(); // >= SUB_BITS
    let shift = msb - SUB_BITS;
    let mantissa = ((ns >> shift) as usize) & (SUB - 1);
    (shift as usize + 1) * SUB + mantissa
}

/// The value a bucket stands for: its midpoint (exact for the low buckets).
fn bucket_value(idx: usize) -> u64 {
    if idx < SUB {
        return idx as u64;
    }
    let shift = (idx / SUB - 1) as u32;
    let mantissa = (idx % SUB) as u64;
    let low = (SUB as u64 + mantissa) << shift;
    low + ((1u64 << shift) >> 1)
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> LatencyHistogram {
        LatencyHistogram {
            buckets: Box::new([0; BUCKETS]),
            count: 0,
            sum_ns: 0,
            min_ns: u64::MAX,
            max_ns: 0,
        }
    }

    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        self.record_ns(u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Records one latency given in nanoseconds.
    pub fn record_ns(&mut self, ns: u64) {
        self.buckets[bucket_of(ns)] += 1;
        self.count += 1;
        self.sum_ns += ns as u128;
        self.min_ns = self.min_ns.min(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.sum_ns += other.sum_ns;
        self.min_ns = self.min_ns.min(other.min_ns);
        self.max_ns = self.max_ns.max(other.max_ns);
        debug_assert_eq!(self.count, self.buckets.iter().sum::<u64>());
    }

    /// Number of values recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Mean latency in microseconds (0 when empty).
    pub fn mean_us(&self) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        self.sum_ns as f64 / self.count as f64 / 1e3
    }

    /// Smallest latency recorded, in microseconds (0 when empty).
    pub fn min_us(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.min_ns as f64 / 1e3
        }
    }

    /// Largest latency recorded, in microseconds.
    pub fn max_us(&self) -> f64 {
        self.max_ns as f64 / 1e3
    }

    /// The latency below which `pct` percent of the values lie, in
    /// microseconds (0 when empty). Clamped to the recorded min and max.
    pub fn percentile_us(&self, pct: f64) -> f64 {
        if self.count == 0 {
            return 0.0;
        }
        let rank = ((pct / 100.0) * self.count as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (idx, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let v = bucket_value(idx).clamp(self.min_ns, self.max_ns);
                return v as f64 / 1e3;
            }
        }
        self.max_ns as f64 / 1e3
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for ns in (0..100_000u64).chain([u64::MAX / 2, u64::MAX]) {
            let b = bucket_of(ns);
            assert!(b >= last && b < BUCKETS, "{ns} -> {b}");
            last = b;
            let v = bucket_value(b);
            let err = v.abs_diff(ns) as f64 / (ns.max(1)) as f64;
            assert!(err <= 1.0 / SUB as f64, "{ns} -> {v}");
        }
    }

    #[test]
    fn percentiles() {
        let mut h = LatencyHistogram::new();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count(), 1000);
        let p50 = h.percentile_us(50.0);
        let p99 = h.percentile_us(99.0);
        assert!((p50 - 500.0).abs() / 500.0 < 0.04, "{p50}");
        assert!((p99 - 990.0).abs() / 990.0 < 0.04, "{p99}");
        assert_eq!(h.percentile_us(100.0), 1000.0);
        let mut g = LatencyHistogram::new();
        g.merge(&h);
        g.merge(&h);
        assert_eq!(g.count(), 2000);
        assert!((g.mean_us() - 500.5).abs() < 1e-9);
    }
}
