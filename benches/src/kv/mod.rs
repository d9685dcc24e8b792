//! The key-value acceleration benchmark (`kvbench`): RocksDB's `db_bench` on
//! BlobFS against the same `db_bench` on the kernel file system, phase by
//! phase, in one invocation.
//!
//! This module holds what does not need a child process; the binary
//! `kvbench` runs the children. Here, the workload: [`Phase`], [`Config`],
//! [`Side`] and the exact `db_bench` flags. In its submodules:
//! - `parse`: the parser of `db_bench`'s output ([`parse_db_bench`]);
//! - `figures`: the per-run figures ([`RunFigures`], [`DiskIo`],
//!   [`parse_prometheus`]);
//! - `ratio`: the BlobFS/POSIX ratios ([`ratios`]);
//! - `report`: the tables ([`table`]) and the JSON report ([`report_json`]);
//! - `chart`: the SVG chart ([`chart_svg`]).
//!
//! Invariants:
//! - both sides of a phase get the same RocksDB flags ([`Phase::flags`]);
//!   only where the files live differs (`--fs_uri` + `--db=/kvbench` for
//!   BlobFS, `--db=<dir>` for POSIX) and, in `direct`, the switch that turns
//!   the page cache off on each side (O_DIRECT flags for POSIX, `cache=0` for
//!   BlobFS); in `memory` BlobFS runs with `cache=0` too, its device being
//!   memory already; in `nvme` BlobFS runs on our userspace driver and
//!   POSIX on ext4 through the kernel's driver, on two namespaces of one
//!   controller;
//! - a ratio is always BlobFS divided by POSIX: above 1.0 is better for
//!   ops/s, below 1.0 is better for latency and CPU.

mod chart;
mod figures;
mod parse;
mod ratio;
mod report;
#[cfg(test)]
mod tests;

pub use chart::chart_svg;
pub use figures::{parse_prometheus, DiskIo, RunFigures};
pub use parse::{parse_db_bench, DbBenchResult};
pub use ratio::{ratios, Ratio};
pub use report::{report_json, table};

/// One phase of SPDK's RocksDB suite (`test/blobfs/rocksdb`), in run order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// `fillseq`, 1 thread, no WAL: builds the database the later phases use.
    Insert,
    /// `overwrite`, 1 thread, no WAL.
    Overwrite,
    /// `readwhilewriting`, 4 threads (plus db_bench's one writer), no WAL.
    Readwrite,
    /// `overwrite` with the WAL and `sync=1`, 1 thread.
    Writesync,
    /// `readrandom`, 16 threads.
    Randread,
    /// `multireadrandom`: batches of 32 keys per `MultiGet`, with
    /// `--async_io=1` (RocksDB reads a batch's blocks in parallel where the
    /// file system offers it), 4 threads.
    Multiget,
    /// `seekrandom` with 100 `Next`s per seek (range scans through
    /// iterators, RocksDB's own readahead), 4 threads.
    Scan,
    /// `fillseq` as `insert`, with LZ4 compression: a fresh database that
    /// `randread-lz4` reads (the `disk` configuration only).
    InsertLz4,
    /// `readrandom` as `randread`, on the LZ4 database.
    RandreadLz4,
}

impl Phase {
    /// All phases in run order: SPDK's five, the batched and range reads,
    /// then the LZ4 pair.
    pub const ALL: [Phase; 9] = [
        Phase::Insert,
        Phase::Overwrite,
        Phase::Readwrite,
        Phase::Writesync,
        Phase::Randread,
        Phase::Multiget,
        Phase::Scan,
        Phase::InsertLz4,
        Phase::RandreadLz4,
    ];

    /// The phase's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Insert => "insert",
            Phase::Overwrite => "overwrite",
            Phase::Readwrite => "readwrite",
            Phase::Writesync => "writesync",
            Phase::Randread => "randread",
            Phase::Multiget => "multiget",
            Phase::Scan => "scan",
            Phase::InsertLz4 => "insert-lz4",
            Phase::RandreadLz4 => "randread-lz4",
        }
    }

    /// Parses a phase name.
    pub fn parse(s: &str) -> Result<Phase, String> {
        Phase::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Phase::ALL.iter().map(|p| p.name()).collect();
                format!("unknown phase {s:?} (phases: {})", names.join(", "))
            })
    }

    /// The `db_bench` benchmark the phase runs (the name on its result line).
    pub fn benchmark(self) -> &'static str {
        match self {
            Phase::Insert | Phase::InsertLz4 => "fillseq",
            Phase::Overwrite | Phase::Writesync => "overwrite",
            Phase::Readwrite => "readwhilewriting",
            Phase::Randread | Phase::RandreadLz4 => "readrandom",
            Phase::Multiget => "multireadrandom",
            Phase::Scan => "seekrandom",
        }
    }

    /// The phase that builds the database this phase uses (itself for the
    /// two inserts, which start from an empty one).
    pub fn builds_on(self) -> Phase {
        match self {
            Phase::InsertLz4 | Phase::RandreadLz4 => Phase::InsertLz4,
            _ => Phase::Insert,
        }
    }

    /// Whether the phase starts from a fresh, empty database.
    pub fn fresh(self) -> bool {
        self.builds_on() == self
    }

    /// Whether the phase runs in `config`: the LZ4 pair shows compression's
    /// cost on one configuration, `disk`, where RocksDB users run it.
    pub fn runs_in(self, config: Config) -> bool {
        match self {
            Phase::InsertLz4 | Phase::RandreadLz4 => config == Config::Disk,
            _ => true,
        }
    }

    /// SPDK's thread count for the phase.
    pub fn default_threads(self) -> u32 {
        match self {
            Phase::Insert | Phase::InsertLz4 | Phase::Overwrite | Phase::Writesync => 1,
            Phase::Readwrite | Phase::Multiget | Phase::Scan => 4,
            Phase::Randread | Phase::RandreadLz4 => 16,
        }
    }

    /// Whether the phase runs for a fixed time (`--duration`); `insert`
    /// writes every key once instead.
    pub fn timed(self) -> bool {
        !self.fresh()
    }

    /// The RocksDB flags of the phase, the same on both sides: SPDK's common
    /// flags (16-byte keys, 1000-byte values, 4 KiB blocks, 10 bloom bits, no
    /// compression but LZ4 in the LZ4 pair, 64 MiB target files, statistics
    /// and histograms) and the phase's own. `keys` is `--num`, `duration_s` applies to timed phases,
    /// `cache_bytes` is RocksDB's block cache.
    pub fn flags(self, keys: u64, duration_s: u32, threads: u32, cache_bytes: u64) -> Vec<String> {
        let mut f: Vec<String> = [
            "--key_size=16",
            "--value_size=1000",
            "--block_size=4096",
            "--bloom_bits=10",
            "--target_file_size_base=67108864",
            "--statistics=1",
            "--histogram=1",
            // Identical key sequences on both sides.
            "--seed=1",
            // No carriage-return progress lines in the captured output.
            "--progress_reports=0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let lz4 = self.builds_on() == Phase::InsertLz4;
        f.push(format!(
            "--compression_type={}",
            if lz4 { "lz4" } else { "none" }
        ));
        f.push(format!("--cache_size={cache_bytes}"));
        f.push(format!("--num={keys}"));
        f.push(format!("--benchmarks={}", self.benchmark()));
        f.push(format!("--threads={threads}"));
        if self.timed() {
            f.push(format!("--duration={duration_s}"));
        }
        let (wal_off, sync) = match self {
            Phase::Writesync => (false, true),
            _ => (true, false),
        };
        f.push(format!("--disable_wal={}", u8::from(wal_off)));
        f.push(format!("--sync={}", u8::from(sync)));
        f.push(format!("--use_existing_db={}", u8::from(!self.fresh())));
        match self {
            Phase::Multiget => {
                f.push("--batch_size=32".into());
                f.push("--async_io=1".into());
            }
            Phase::Scan => f.push("--seek_nexts=100".into()),
            _ => {}
        }
        f
    }
}

/// Where the two sides keep their files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Config {
    /// BlobFS on an image file vs POSIX in a directory of the same disk,
    /// RocksDB defaults (POSIX goes through the page cache).
    Disk,
    /// No OS page cache on either side: POSIX with O_DIRECT reads, flushes
    /// and compactions; BlobFS (always O_DIRECT) with its own cache off.
    Direct,
    /// Memory: BlobFS on a `shm:` device (a shared mapping of a tmpfs
    /// file, I/O by memcpy; BlobFS cache off) vs POSIX on tmpfs.
    Memory,
    /// An NVMe controller: BlobFS on one namespace through the userspace
    /// driver (`nvme:`) vs POSIX on ext4 on another namespace of the same
    /// size and format through the kernel's `nvme` driver, the controller
    /// rebound between vfio-pci and nvme for each side's runs.
    Nvme,
    /// A fixed memory budget, as RocksDB runs in production containers:
    /// both sides as in `disk`, each `db_bench` inside the same memory
    /// cgroup (v1 `memory.limit_in_bytes` or v2 `memory.max`) whose limit
    /// counts the process's memory and the page cache it fills, with a
    /// database about three times the budget; BlobFS's cache sized so the
    /// BlobFS side fits the same budget.
    Budget,
}

impl Config {
    /// All configurations in run order.
    pub const ALL: [Config; 5] = [
        Config::Disk,
        Config::Direct,
        Config::Memory,
        Config::Budget,
        Config::Nvme,
    ];

    /// The configuration's name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Config::Disk => "disk",
            Config::Direct => "direct",
            Config::Memory => "memory",
            Config::Nvme => "nvme",
            Config::Budget => "budget",
        }
    }

    /// Parses a configuration name.
    pub fn parse(s: &str) -> Result<Config, String> {
        Config::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Config::ALL.iter().map(|c| c.name()).collect();
                format!(
                    "unknown configuration {s:?} (configurations: {})",
                    names.join(", ")
                )
            })
    }

    /// Flags only the POSIX side gets in this configuration.
    pub fn posix_flags(self) -> Vec<String> {
        match self {
            Config::Direct => vec![
                "--use_direct_reads=1".to_string(),
                "--use_direct_io_for_flush_and_compaction=1".to_string(),
            ],
            Config::Disk | Config::Memory | Config::Nvme | Config::Budget => Vec::new(),
        }
    }
}

/// One of the two file systems under RocksDB.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// RocksDB on BlobFS through the `blobfs://` plugin.
    BlobFs,
    /// RocksDB on the kernel file system through its default env.
    Posix,
}

impl Side {
    /// The side's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Side::BlobFs => "BlobFS",
            Side::Posix => "POSIX",
        }
    }

    /// The other side.
    pub fn other(self) -> Side {
        match self {
            Side::BlobFs => Side::Posix,
            Side::Posix => Side::BlobFs,
        }
    }
}
