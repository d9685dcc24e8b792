//! The load engine: keeps `queue_depth` operations in flight from one
//! thread against an [`IoTarget`] and measures each one.
//!
//! Invariants:
//! - At most `queue_depth` operations are in flight; a new one starts only
//!   when one completes, with that operation's buffer (no allocation per
//!   operation in the engine beyond the executor's task node).
//! - Every operation lies inside the region and is aligned to `block_bytes`
//!   (which is a multiple of the target's unit).
//! - Offsets come from a seeded generator, so a run is repeatable.
//! - The first error stops the run; operations still in flight are
//!   abandoned (the device layer keeps their buffers alive until done).

use std::time::{Duration, Instant};

use blobstore::util::SplitMix64;
use blobstore::{Error, Result};
use futures::stream::{FuturesUnordered, StreamExt};

use crate::hist::LatencyHistogram;
use crate::target::{IoTarget, OpKind};

/// How offsets advance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Uniformly random blocks of the region.
    Random,
    /// Consecutive blocks, wrapping at the end of the region.
    Sequential,
}

/// When a run ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// After this much time (operations in flight then are not counted).
    Time(Duration),
    /// After this many operations have completed.
    Ops(u64),
}

/// A byte range of a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First byte.
    pub offset_bytes: u64,
    /// Length in bytes.
    pub len_bytes: u64,
}

/// What to run.
#[derive(Clone, Copy, Debug)]
pub struct LoadSpec {
    /// Operations kept in flight.
    pub queue_depth: usize,
    /// Bytes per operation.
    pub block_bytes: usize,
    /// Share of reads, 0 to 100; the rest are writes.
    pub read_percent: u8,
    /// How offsets advance.
    pub pattern: Pattern,
    /// Where operations go; `None` is the whole target.
    pub region: Option<Region>,
    /// When to stop.
    pub limit: Limit,
    /// Seed of the offset and mix generator.
    pub seed: u64,
}

impl LoadSpec {
    /// 4 KiB random reads at `queue_depth` for `limit` over the whole target.
    pub fn rand_4k(queue_depth: usize, read_percent: u8, limit: Limit) -> LoadSpec {
        LoadSpec {
            queue_depth,
            block_bytes: 4096,
            read_percent,
            pattern: Pattern::Random,
            region: None,
            limit,
            seed: 0x5eed_b10b,
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug)]
pub struct LoadReport {
    /// Completed reads.
    pub read_ops: u64,
    /// Completed writes.
    pub write_ops: u64,
    /// Bytes moved by completed operations.
    pub bytes: u64,
    /// From the first submission to the last counted completion.
    pub elapsed: Duration,
    /// Latency of each completed read.
    pub read_latency: LatencyHistogram,
    /// Latency of each completed write.
    pub write_latency: LatencyHistogram,
}

impl LoadReport {
    /// Completed operations.
    pub fn ops(&self) -> u64 {
        self.read_ops + self.write_ops
    }

    /// Operations per second.
    pub fn iops(&self) -> f64 {
        self.ops() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Throughput in MiB/s.
    pub fn mib_per_s(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency of every operation, reads and writes together.
    pub fn latency(&self) -> LatencyHistogram {
        let mut h = self.read_latency.clone();
        h.merge(&self.write_latency);
        h
    }
}

/// Chooses each operation's kind and offset.
struct OpGen {
    rng: SplitMix64,
    region: Region,
    block_bytes: u64,
    blocks: u64,
    next_seq: u64,
    pattern: Pattern,
    read_percent: u64,
}

impl OpGen {
    fn next(&mut self) -> (OpKind, u64) {
        let block = match self.pattern {
            Pattern::Random => self.rng.below(self.blocks),
            Pattern::Sequential => {
                let b = self.next_seq;
                self.next_seq = (b + 1) % self.blocks;
                b
            }
        };
        let kind = match self.read_percent {
            100 => OpKind::Read,
            0 => OpKind::Write,
            p => {
                if self.rng.below(100) < p {
                    OpKind::Read
                } else {
                    OpKind::Write
                }
            }
        };
        (kind, self.region.offset_bytes + block * self.block_bytes)
    }
}

fn checked_gen<T: IoTarget>(target: &T, spec: &LoadSpec) -> Result<OpGen> {
    let bad = |what: String| {
        Err(Error::InvalidArgument(format!(
            "{}: {what}",
            target.label()
        )))
    };
    let unit = target.unit_bytes();
    let block = spec.block_bytes as u64;
    if spec.queue_depth == 0 {
        return bad("queue depth 0".into());
    }
    if block == 0 || !block.is_multiple_of(unit) {
        return bad(format!(
            "block size {block} is not a positive multiple of the unit {unit}"
        ));
    }
    if spec.read_percent > 100 {
        return bad(format!("read share {}% is above 100%", spec.read_percent));
    }
    let region = spec.region.unwrap_or(Region {
        offset_bytes: 0,
        len_bytes: target.size_bytes(),
    });
    let end = region.offset_bytes.checked_add(region.len_bytes);
    if end.is_none_or(|e| e > target.size_bytes()) || !region.offset_bytes.is_multiple_of(unit) {
        return bad(format!(
            "region {}+{} is unaligned or past the end ({} bytes)",
            region.offset_bytes,
            region.len_bytes,
            target.size_bytes()
        ));
    }
    let blocks = region.len_bytes / block;
    if blocks == 0 {
        return bad(format!(
            "region of {} bytes holds no {block}-byte block",
            region.len_bytes
        ));
    }
    Ok(OpGen {
        rng: SplitMix64::new(spec.seed),
        region,
        block_bytes: block,
        blocks,
        next_seq: 0,
        pattern: spec.pattern,
        read_percent: spec.read_percent as u64,
    })
}

/// Runs `spec` against `target` on the calling thread's executor. Await it
/// inside [`blobstore::block_on`] (or a reactor task); see [`run_load_blocking`].
pub async fn run_load<T: IoTarget>(target: &T, spec: &LoadSpec) -> Result<LoadReport> {
    let mut gen = checked_gen(target, spec)?;
    let mut bufs = Vec::with_capacity(spec.queue_depth);
    for i in 0..spec.queue_depth {
        let mut b = target.alloc_buf(spec.block_bytes)?;
        // Non-zero data, different per buffer, so nothing can shortcut zeroes.
        b.iter_mut()
            .enumerate()
            .for_each(|(j, x)| *x = (i + j) as u8 | 1);
        bufs.push(b);
    }
    let (max_ops, deadline) = match spec.limit {
        Limit::Ops(n) => (n, None),
        Limit::Time(d) => (u64::MAX, Some(d)),
    };
    let mut report = LoadReport {
        read_ops: 0,
        write_ops: 0,
        bytes: 0,
        elapsed: Duration::ZERO,
        read_latency: LatencyHistogram::new(),
        write_latency: LatencyHistogram::new(),
    };
    let start_op = |kind: OpKind, off: u64, buf| async move {
        let t0 = Instant::now();
        let res = target.io(kind, off, buf).await;
        (kind, t0, res)
    };
    let mut in_flight = FuturesUnordered::new();
    let start = Instant::now();
    let mut started = 0u64;
    for buf in bufs {
        if started == max_ops {
            break;
        }
        let (kind, off) = gen.next();
        in_flight.push(start_op(kind, off, buf));
        started += 1;
    }
    let mut last = start;
    while let Some((kind, t0, res)) = in_flight.next().await {
        let now = Instant::now();
        if deadline.is_some_and(|d| now - start > d) {
            break;
        }
        let buf = res?;
        last = now;
        let lat = now - t0;
        match kind {
            OpKind::Read => {
                report.read_ops += 1;
                report.read_latency.record(lat);
            }
            OpKind::Write => {
                report.write_ops += 1;
                report.write_latency.record(lat);
            }
        }
        report.bytes += buf.len() as u64;
        if started < max_ops {
            let (kind, off) = gen.next();
            in_flight.push(start_op(kind, off, buf));
            started += 1;
        }
    }
    report.elapsed = last - start;
    Ok(report)
}

/// [`run_load`] on the calling thread, polling its channels until done.
pub fn run_load_blocking<T: IoTarget>(target: &T, spec: &LoadSpec) -> Result<LoadReport> {
    blobstore::block_on(run_load(target, spec))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use blobstore::{BlockDevice, MemDevice};

    use super::*;
    use crate::target::RawTarget;

    fn mem_target(size: u64) -> RawTarget {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(size, 4096).unwrap());
        RawTarget::new(dev).unwrap()
    }

    #[test]
    fn counts_ops_and_bytes() {
        let t = mem_target(1 << 20);
        for qd in [1, 3, 32] {
            let mut spec = LoadSpec::rand_4k(qd, 50, Limit::Ops(1000));
            spec.seed = qd as u64;
            let r = run_load_blocking(&t, &spec).unwrap();
            assert_eq!(r.ops(), 1000);
            assert_eq!(r.bytes, 1000 * 4096);
            assert!(r.read_ops > 300 && r.write_ops > 300, "{r:?}");
            assert_eq!(r.latency().count(), 1000);
            assert!(r.iops() > 0.0);
        }
    }

    #[test]
    fn fewer_ops_than_queue_depth() {
        let t = mem_target(1 << 20);
        let r = run_load_blocking(&t, &LoadSpec::rand_4k(32, 100, Limit::Ops(5))).unwrap();
        assert_eq!(r.ops(), 5);
    }

    #[test]
    fn sequential_writes_cover_the_region() {
        let t = mem_target(1 << 20);
        let spec = LoadSpec {
            pattern: Pattern::Sequential,
            region: Some(Region {
                offset_bytes: 64 << 10,
                len_bytes: 256 << 10,
            }),
            block_bytes: 64 << 10,
            ..LoadSpec::rand_4k(2, 0, Limit::Ops(4))
        };
        run_load_blocking(&t, &spec).unwrap();
        let check = blobstore::block_on(async {
            let whole = t.alloc_buf(1 << 20).unwrap();
            t.io(OpKind::Read, 0, whole).await.unwrap()
        });
        assert!(check[..64 << 10].iter().all(|&b| b == 0));
        assert!(check[64 << 10..320 << 10].iter().all(|&b| b != 0));
        assert!(check[320 << 10..].iter().all(|&b| b == 0));
    }

    #[test]
    fn time_limit_stops() {
        let t = mem_target(1 << 20);
        let spec = LoadSpec::rand_4k(4, 100, Limit::Time(Duration::from_millis(50)));
        let r = run_load_blocking(&t, &spec).unwrap();
        assert!(r.ops() > 0);
        assert!(r.elapsed <= Duration::from_millis(50), "{:?}", r.elapsed);
    }

    #[test]
    fn rejects_bad_specs() {
        let t = mem_target(1 << 20);
        let mut spec = LoadSpec::rand_4k(0, 100, Limit::Ops(1));
        assert!(run_load_blocking(&t, &spec).is_err());
        spec.queue_depth = 1;
        spec.block_bytes = 1000;
        assert!(run_load_blocking(&t, &spec).is_err());
        spec.block_bytes = 4096;
        spec.region = Some(Region {
            offset_bytes: 4096,
            len_bytes: 1 << 20,
        });
        assert!(run_load_blocking(&t, &spec).is_err());
    }
}
