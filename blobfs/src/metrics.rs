//! What BlobFS counts ([`crate::BlobFs::metrics`]) and its Prometheus text.
//!
//! File operations are counted in per-thread shards ([`blobstore::metrics`]),
//! so a read or an append writes only its own thread's cache lines; a
//! snapshot folds them.

use std::fmt::Write as _;

use blobstore::metrics::{OpCounter, OpStats};
use blobstore::{DeviceMetrics, StoreMetrics};

use crate::{CacheStats, SpaceInfo};

/// One thread's counters of file operations.
#[derive(Default)]
pub(crate) struct FsShard {
    pub read: OpCounter,
    pub direct_read: OpCounter,
    pub async_read: OpCounter,
    pub append: OpCounter,
    pub sync: OpCounter,
    pub wal_sync: OpCounter,
    pub stall: OpCounter,
    pub behind: OpCounter,
}

/// True for the files whose syncs count as WAL syncs: RocksDB names its
/// write-ahead logs `NNNNNN.log`.
pub(crate) fn is_wal(name: &str) -> bool {
    name.ends_with(".log")
}

/// A snapshot of a mounted BlobFS's figures since the mount (the device's
/// since it was opened). Latencies are in nanoseconds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    /// [`crate::File::read_at`] calls (bytes: what they returned).
    pub reads: OpStats,
    /// The reads among them that went from the device straight into the
    /// caller's buffer (direct handles, on devices that allow it; see
    /// [`crate::OpenOptions::direct`]).
    pub direct_reads: OpStats,
    /// The reads among them started by [`crate::File::start_read`] that
    /// were still in flight when it returned (RocksDB's `ReadAsync` that
    /// overlapped the caller's work); latency from start to finish.
    pub async_reads: OpStats,
    /// Appends and writes ([`crate::File::append`], [`crate::File::write_at`]).
    pub appends: OpStats,
    /// Syncs of files other than WALs.
    pub syncs: OpStats,
    /// Syncs of WAL files (names ending in `.log`).
    pub wal_syncs: OpStats,
    /// Appends or syncs that waited for the file's previous write-behind
    /// (the writer thread was behind); latency is the wait.
    pub write_behind_stalls: OpStats,
    /// Full append buffers written behind their appender.
    pub write_behinds: OpStats,
    /// Metadata syncs of the blobstore (file lengths, names, clusters).
    pub metadata_syncs: OpStats,
    /// The read cache.
    pub cache: CacheStats,
    /// Device I/O (everything on the device, metadata included).
    pub device: DeviceMetrics,
    /// Space now.
    pub space: SpaceInfo,
}

impl Metrics {
    pub(crate) fn fold(
        shards: &[std::sync::Arc<FsShard>],
        store: StoreMetrics,
        cache: CacheStats,
        space: SpaceInfo,
    ) -> Metrics {
        Metrics {
            reads: OpStats::fold(shards, |s| &s.read),
            direct_reads: OpStats::fold(shards, |s| &s.direct_read),
            async_reads: OpStats::fold(shards, |s| &s.async_read),
            appends: OpStats::fold(shards, |s| &s.append),
            syncs: OpStats::fold(shards, |s| &s.sync),
            wal_syncs: OpStats::fold(shards, |s| &s.wal_sync),
            write_behind_stalls: OpStats::fold(shards, |s| &s.stall),
            write_behinds: OpStats::fold(shards, |s| &s.behind),
            metadata_syncs: store.metadata_syncs,
            cache,
            device: store.device,
            space,
        }
    }

    /// The operations, each with its Prometheus name and help text.
    fn ops(&self) -> [(&'static str, &'static str, &OpStats); 13] {
        [
            ("blobfs_read", "File reads", &self.reads),
            (
                "blobfs_direct_read",
                "File reads straight from the device into the caller's buffer",
                &self.direct_reads,
            ),
            (
                "blobfs_async_read",
                "File reads still in flight when their asynchronous start returned",
                &self.async_reads,
            ),
            ("blobfs_append", "File appends and writes", &self.appends),
            ("blobfs_sync", "Syncs of files other than WALs", &self.syncs),
            ("blobfs_wal_sync", "Syncs of WAL files", &self.wal_syncs),
            (
                "blobfs_write_behind_stall",
                "Waits for a file's previous write-behind",
                &self.write_behind_stalls,
            ),
            (
                "blobfs_write_behind",
                "Append buffers written behind the appender",
                &self.write_behinds,
            ),
            (
                "blobfs_metadata_sync",
                "Blobstore metadata syncs",
                &self.metadata_syncs,
            ),
            ("blobfs_device_read", "Device reads", &self.device.reads),
            ("blobfs_device_write", "Device writes", &self.device.writes),
            (
                "blobfs_device_flush",
                "Device flushes",
                &self.device.flushes,
            ),
            (
                "blobfs_device_unmap",
                "Device deallocations",
                &self.device.unmaps,
            ),
        ]
    }

    /// The snapshot in Prometheus' text exposition format (version 0.0.4):
    /// per operation a counter of operations, bytes and errors and a
    /// summary of latency in seconds (quantiles 0.5, 0.99, 0.999, sum,
    /// count), then the cache's counters and the space gauges.
    pub fn to_prometheus(&self) -> String {
        let mut t = String::new();
        for (name, help, s) in self.ops() {
            let _ = writeln!(
                t,
                "# HELP {name}_total {help}.\n# TYPE {name}_total counter"
            );
            let _ = writeln!(t, "{name}_total {}", s.count);
            let _ = writeln!(
                t,
                "# HELP {name}_bytes_total Bytes moved by: {help}.\n# TYPE {name}_bytes_total counter"
            );
            let _ = writeln!(t, "{name}_bytes_total {}", s.bytes);
            let _ = writeln!(
                t,
                "# HELP {name}_errors_total Failed: {help}.\n# TYPE {name}_errors_total counter"
            );
            let _ = writeln!(t, "{name}_errors_total {}", s.errors);
            let _ = writeln!(
                t,
                "# HELP {name}_seconds Latency of: {help}.\n# TYPE {name}_seconds summary"
            );
            for (q, v) in [(0.5, s.p50_ns()), (0.99, s.p99_ns()), (0.999, s.p999_ns())] {
                let _ = writeln!(t, "{name}_seconds{{quantile=\"{q}\"}} {}", secs(v));
            }
            let _ = writeln!(t, "{name}_seconds_sum {}", secs(s.sum_ns));
            let _ = writeln!(t, "{name}_seconds_count {}", s.count);
        }
        let counters = [
            (
                "blobfs_cache_hits_total",
                "Read-cache lookups that hit",
                self.cache.hits,
            ),
            (
                "blobfs_cache_misses_total",
                "Read-cache lookups that missed",
                self.cache.misses,
            ),
            (
                "blobfs_cache_evictions_total",
                "Read-cache chunks evicted",
                self.cache.evictions,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                t,
                "# HELP {name} {help}.\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let gauges = [
            (
                "blobfs_cache_bytes",
                "Bytes in the read cache",
                self.cache.bytes,
            ),
            (
                "blobfs_space_total_bytes",
                "Bytes files can use",
                self.space.total_bytes,
            ),
            (
                "blobfs_space_free_bytes",
                "Bytes free for file data",
                self.space.free_bytes,
            ),
            (
                "blobfs_space_used_bytes",
                "Bytes allocated to files and directories",
                self.space.total_bytes - self.space.free_bytes.min(self.space.total_bytes),
            ),
            (
                "blobfs_entries",
                "Files and directories",
                self.space.entries,
            ),
        ];
        for (name, help, v) in gauges {
            let _ = writeln!(t, "# HELP {name} {help}.\n# TYPE {name} gauge\n{name} {v}");
        }
        t
    }
}

/// Nanoseconds as seconds, for Prometheus.
fn secs(ns: u64) -> String {
    format!("{:.9}", ns as f64 / 1e9)
}
