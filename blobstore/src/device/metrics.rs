//! Device I/O metrics: each channel counts its device's operations in a
//! [`DeviceShard`] of its own (threads share no counter on the data path),
//! and [`device_metrics`] folds a device's shards into [`DeviceMetrics`].
//!
//! Invariants:
//! - A device's counters are found by its [`DeviceId`] in one process-wide
//!   list; the counters of dropped devices leave it when a thread next opens
//!   a channel, and until then [`device_metrics`] still reports them.

use std::sync::{Arc, Weak};

use super::{BlockDevice, DeviceId, IoKind};
use crate::metrics::{OpCounter, OpStats, Shards};

/// One channel's device I/O counters, by [`IoKind`].
#[derive(Default)]
pub struct DeviceShard {
    ops: [OpCounter; 5],
}

impl DeviceShard {
    /// The counter of `kind`. Called on every completion, now from another
    /// module (`channel.rs`): inline, so the split costs the data path
    /// nothing.
    #[inline]
    pub(super) fn op(&self, kind: IoKind) -> &OpCounter {
        &self.ops[kind as usize]
    }
}

/// A device's I/O, folded over every thread's channel to it: count, bytes,
/// errors and latency (submission to completion seen by a poll) by kind.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DeviceMetrics {
    /// Reads.
    pub reads: OpStats,
    /// Writes.
    pub writes: OpStats,
    /// Flushes.
    pub flushes: OpStats,
    /// Deallocations.
    pub unmaps: OpStats,
    /// Writes of zeroes.
    pub write_zeroes: OpStats,
}

/// The counters of each open device (dropped with the device).
type DeviceShardList = Vec<(DeviceId, Weak<dyn BlockDevice>, Arc<Shards<DeviceShard>>)>;

static DEVICE_SHARDS: parking_lot::Mutex<DeviceShardList> = parking_lot::Mutex::new(Vec::new());

/// The counters of `dev` (whose id is `id`), created on first use.
pub(super) fn device_shards(dev: &Arc<dyn BlockDevice>, id: DeviceId) -> Arc<Shards<DeviceShard>> {
    let mut all = DEVICE_SHARDS.lock();
    all.retain(|(_, d, _)| d.strong_count() > 0);
    if let Some((_, _, s)) = all.iter().find(|(i, _, _)| *i == id) {
        return s.clone();
    }
    let s = Arc::new(Shards::new());
    all.push((id, Arc::downgrade(dev), s.clone()));
    s
}

/// The I/O figures of the device `id` so far (every thread's channel;
/// zeroes for a device no thread has used).
pub fn device_metrics(id: DeviceId) -> DeviceMetrics {
    let shards = DEVICE_SHARDS
        .lock()
        .iter()
        .find(|(i, _, _)| *i == id)
        .map(|(_, _, s)| s.all())
        .unwrap_or_default();
    let fold = |k: IoKind| OpStats::fold(&shards, |s: &DeviceShard| s.op(k));
    DeviceMetrics {
        reads: fold(IoKind::Read),
        writes: fold(IoKind::Write),
        flushes: fold(IoKind::Flush),
        unmaps: fold(IoKind::Unmap),
        write_zeroes: fold(IoKind::WriteZeroes),
    }
}
