//! The key-value acceleration benchmark (`kvbench`): RocksDB's `db_bench` on
//! BlobFS against the same `db_bench` on the kernel file system, phase by
//! phase, in one invocation.
//!
//! This module holds what does not need a child process: the workload
//! ([`Phase`], [`Config`], [`Side`] and the exact `db_bench` flags), the
//! parser of `db_bench`'s output ([`parse_db_bench`]), the per-run figures
//! ([`RunFigures`]), the BlobFS/POSIX ratios ([`ratios`]), the tables
//! ([`table`]), the JSON report ([`report_json`]) and the SVG chart
//! ([`chart_svg`]). The binary `kvbench` runs the children.
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

use std::fmt::Write as _;

use crate::json::Json;

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

/// What `db_bench` printed about one benchmark.
#[derive(Clone, Debug, PartialEq)]
pub struct DbBenchResult {
    /// Microseconds per operation (db_bench's own figure, per thread).
    pub micros_per_op: f64,
    /// Operations per second over all threads.
    pub ops_per_sec: f64,
    /// Seconds the benchmark ran.
    pub seconds: f64,
    /// Operations done (for `readwhilewriting`: the reads).
    pub operations: u64,
    /// Median latency, µs.
    pub latency_us_p50: f64,
    /// 99th percentile latency, µs.
    pub latency_us_p99: f64,
    /// 99.9th percentile latency, µs.
    pub latency_us_p999: f64,
}

/// Parses `db_bench`'s output for `benchmark`: the result line
/// (`<name> : <x> micros/op <n> ops/sec <s> seconds <k> operations; ...`)
/// and the first `Percentiles:` line after it (needs `--histogram=1`).
pub fn parse_db_bench(output: &str, benchmark: &str) -> Result<DbBenchResult, String> {
    let mut lines = output.lines();
    let result_line = lines
        .by_ref()
        .find(|l| {
            let mut parts = l.splitn(2, ':');
            parts.next().map(str::trim) == Some(benchmark)
                && parts.next().is_some_and(|rest| rest.contains("micros/op"))
        })
        .ok_or_else(|| format!("no result line for {benchmark:?} in db_bench's output"))?;
    let words: Vec<&str> = result_line
        .split(|c: char| c.is_whitespace() || c == ';')
        .filter(|w| !w.is_empty())
        .collect();
    // The number just before the given unit word.
    let before = |unit: &str| -> Result<f64, String> {
        let i = words
            .iter()
            .position(|w| *w == unit)
            .ok_or_else(|| format!("no {unit:?} in result line {result_line:?}"))?;
        words
            .get(i.wrapping_sub(1))
            .and_then(|w| w.parse::<f64>().ok())
            .ok_or_else(|| format!("no number before {unit:?} in result line {result_line:?}"))
    };
    let micros_per_op = before("micros/op")?;
    let ops_per_sec = before("ops/sec")?;
    let seconds = before("seconds")?;
    let operations = before("operations")? as u64;
    let pct_line = lines
        .find(|l| l.trim_start().starts_with("Percentiles:"))
        .ok_or_else(|| {
            format!(
                "no \"Percentiles:\" line after the {benchmark:?} result (is --histogram=1 set?)"
            )
        })?;
    let pct_words: Vec<&str> = pct_line.split_whitespace().collect();
    let pct = |label: &str| -> Result<f64, String> {
        let i = pct_words
            .iter()
            .position(|w| *w == label)
            .ok_or_else(|| format!("no {label} in {pct_line:?}"))?;
        pct_words
            .get(i + 1)
            .and_then(|w| w.parse::<f64>().ok())
            .ok_or_else(|| format!("no number after {label} in {pct_line:?}"))
    };
    Ok(DbBenchResult {
        micros_per_op,
        ops_per_sec,
        seconds,
        operations,
        latency_us_p50: pct("P50:")?,
        latency_us_p99: pct("P99:")?,
        latency_us_p999: pct("P99.9:")?,
    })
}

/// Everything measured about one `db_bench` run.
#[derive(Clone, Debug, PartialEq)]
pub struct RunFigures {
    /// The configuration.
    pub config: Config,
    /// The phase.
    pub phase: Phase,
    /// The side.
    pub side: Side,
    /// The exact command line (program first).
    pub command: Vec<String>,
    /// What db_bench reported.
    pub result: DbBenchResult,
    /// User + system CPU seconds of the child (all its threads).
    pub cpu_s: f64,
    /// Non-idle CPU seconds of the whole machine while the child ran
    /// (elapsed time times CPUs minus the idle and iowait time in
    /// `/proc/stat`): the kernel's writeback, journal and completion work
    /// that the child is never charged for counts here. Meaningful on an
    /// otherwise idle machine.
    pub machine_cpu_s: f64,
    /// The child's peak resident set, bytes.
    pub max_rss_bytes: u64,
    /// Growth of the kernel's page cache (`Cached` in /proc/meminfo) over
    /// the run, bytes; 0 when it shrank.
    pub page_cache_growth_bytes: u64,
    /// In the `budget` configuration: the peak memory the child's cgroup
    /// was charged (process memory and page cache,
    /// `memory.max_usage_in_bytes` or `memory.peak`), bytes.
    pub cgroup_peak_bytes: Option<u64>,
    /// Wall-clock seconds of the whole child (open, run, close).
    pub wall_s: f64,
    /// Where the child's output was kept.
    pub log: String,
    /// The host disk holding the side's files, its I/O while the child ran
    /// (`/proc/diskstats`); `None` where the files live on no disk the
    /// kernel counts (tmpfs, our NVMe driver).
    pub disk: Option<DiskIo>,
    /// BlobFS side: every sample of BlobFS's metrics at the child's exit
    /// (Prometheus text, `metrics_file=`); empty on the POSIX side.
    pub blobfs_metrics: Vec<(String, f64)>,
}

/// I/O the kernel counted on one disk (`/proc/diskstats` deltas).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DiskIo {
    /// Reads completed.
    pub reads: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Writes completed.
    pub writes: u64,
    /// Bytes written.
    pub write_bytes: u64,
}

impl DiskIo {
    /// The counters of one `/proc/diskstats` line (sectors are 512 bytes).
    pub fn parse_line(line: &str) -> Option<(u32, u32, DiskIo)> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let n = |i: usize| f.get(i)?.parse::<u64>().ok();
        Some((
            n(0)? as u32,
            n(1)? as u32,
            DiskIo {
                reads: n(3)?,
                read_bytes: n(5)? * 512,
                writes: n(7)?,
                write_bytes: n(9)? * 512,
            },
        ))
    }

    /// What happened between `before` and `self`.
    pub fn since(&self, before: &DiskIo) -> DiskIo {
        DiskIo {
            reads: self.reads.saturating_sub(before.reads),
            read_bytes: self.read_bytes.saturating_sub(before.read_bytes),
            writes: self.writes.saturating_sub(before.writes),
            write_bytes: self.write_bytes.saturating_sub(before.write_bytes),
        }
    }
}

/// The samples of a Prometheus text exposition: `name{labels}` and value,
/// comments left out.
pub fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

impl RunFigures {
    /// CPU seconds per million operations.
    pub fn cpu_s_per_mops(&self) -> f64 {
        if self.result.operations == 0 {
            return f64::NAN;
        }
        self.cpu_s / (self.result.operations as f64 / 1e6)
    }

    /// The whole machine's CPU seconds per million operations.
    pub fn machine_cpu_s_per_mops(&self) -> f64 {
        if self.result.operations == 0 {
            return f64::NAN;
        }
        self.machine_cpu_s / (self.result.operations as f64 / 1e6)
    }

    /// Memory used, MiB: the cgroup's peak where the run had one (`budget`),
    /// else the child's peak RSS plus the page-cache growth.
    pub fn memory_mib(&self) -> f64 {
        let bytes = self
            .cgroup_peak_bytes
            .unwrap_or(self.max_rss_bytes + self.page_cache_growth_bytes);
        bytes as f64 / (1 << 20) as f64
    }

    /// A BlobFS metric sample by name (`None` on the POSIX side).
    pub fn blobfs_metric(&self, name: &str) -> Option<f64> {
        self.blobfs_metrics
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }

    /// The device I/O of the run, reads and bytes written: BlobFS's own
    /// device counters on the BlobFS side (what it submitted, whatever the
    /// device), the kernel's disk counters on the POSIX side.
    fn device_io(&self) -> Option<(f64, f64)> {
        match self.side {
            Side::BlobFs => Some((
                self.blobfs_metric("blobfs_device_read_total")?,
                self.blobfs_metric("blobfs_device_write_bytes_total")?,
            )),
            Side::Posix => self.disk.map(|d| (d.reads as f64, d.write_bytes as f64)),
        }
    }

    /// Device reads per operation (NaN when not measured).
    pub fn device_reads_per_op(&self) -> f64 {
        match self.device_io() {
            Some((r, _)) if self.result.operations > 0 => r / self.result.operations as f64,
            _ => f64::NAN,
        }
    }

    /// KiB written to the device per operation: the write amplification a
    /// user compares (NaN when not measured).
    pub fn device_write_kib_per_op(&self) -> f64 {
        match self.device_io() {
            Some((_, w)) if self.result.operations > 0 => {
                w / 1024.0 / self.result.operations as f64
            }
            _ => f64::NAN,
        }
    }
}

/// BlobFS divided by POSIX for one phase of one configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ratio {
    /// The configuration.
    pub config: Config,
    /// The phase.
    pub phase: Phase,
    /// ops/s ratio: above 1.0 means BlobFS is faster.
    pub ops: f64,
    /// p99 latency ratio: below 1.0 means BlobFS's tail is shorter.
    pub p99: f64,
    /// CPU per operation ratio (the child's own): below 1.0 means BlobFS
    /// uses less CPU.
    pub cpu: f64,
    /// The whole machine's CPU per operation ratio: below 1.0 means less.
    pub machine_cpu: f64,
    /// Memory ratio: below 1.0 means BlobFS uses less memory.
    pub memory: f64,
}

/// The ratios of every (configuration, phase) that has both sides, in the
/// order the runs were made.
pub fn ratios(runs: &[RunFigures]) -> Vec<Ratio> {
    let mut out: Vec<Ratio> = Vec::new();
    for b in runs.iter().filter(|r| r.side == Side::BlobFs) {
        if out
            .iter()
            .any(|r| r.config == b.config && r.phase == b.phase)
        {
            continue;
        }
        let Some(p) = runs
            .iter()
            .find(|r| r.side == Side::Posix && r.config == b.config && r.phase == b.phase)
        else {
            continue;
        };
        out.push(Ratio {
            config: b.config,
            phase: b.phase,
            ops: b.result.ops_per_sec / p.result.ops_per_sec,
            p99: b.result.latency_us_p99 / p.result.latency_us_p99,
            cpu: b.cpu_s_per_mops() / p.cpu_s_per_mops(),
            machine_cpu: b.machine_cpu_s_per_mops() / p.machine_cpu_s_per_mops(),
            memory: b.memory_mib() / p.memory_mib(),
        });
    }
    out
}

fn group(n: f64) -> String {
    if !n.is_finite() {
        return "-".to_string();
    }
    let s = format!("{:.0}", n.round());
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

fn num(n: f64) -> String {
    if !n.is_finite() {
        "-".to_string()
    } else if n >= 100.0 {
        group(n)
    } else if n >= 10.0 {
        format!("{n:.1}")
    } else {
        format!("{n:.2}")
    }
}

fn ratio_str(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}x")
    } else {
        "-".to_string()
    }
}

/// The Markdown table of one configuration: a row per (phase, side), the
/// ratios on the BlobFS row.
pub fn table(config: Config, runs: &[RunFigures]) -> String {
    let rs = ratios(runs);
    let mut t = String::new();
    t.push_str("| phase | side | ops/s | p50 µs | p99 µs | p99.9 µs | CPU s/Mops | machine CPU s/Mops | memory MiB | dev reads/op | KiB written/op | ops/s BlobFS/POSIX | p99 BlobFS/POSIX | machine CPU/op BlobFS/POSIX |\n");
    t.push_str(
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for phase in Phase::ALL {
        for side in [Side::BlobFs, Side::Posix] {
            let Some(r) = runs
                .iter()
                .find(|r| r.config == config && r.phase == phase && r.side == side)
            else {
                continue;
            };
            let ratio = rs
                .iter()
                .find(|x| x.config == config && x.phase == phase && side == Side::BlobFs);
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                phase.name(),
                side.name(),
                group(r.result.ops_per_sec),
                num(r.result.latency_us_p50),
                num(r.result.latency_us_p99),
                num(r.result.latency_us_p999),
                num(r.cpu_s_per_mops()),
                num(r.machine_cpu_s_per_mops()),
                group(r.memory_mib()),
                num(r.device_reads_per_op()),
                num(r.device_write_kib_per_op()),
                ratio.map_or(String::new(), |x| ratio_str(x.ops)),
                ratio.map_or(String::new(), |x| ratio_str(x.p99)),
                ratio.map_or(String::new(), |x| ratio_str(x.machine_cpu)),
            );
        }
    }
    t
}

fn run_json(r: &RunFigures) -> Json {
    let mib = |b: u64| Json::Num(b as f64 / (1 << 20) as f64);
    Json::obj([
        ("config", Json::str(r.config.name())),
        ("phase", Json::str(r.phase.name())),
        ("side", Json::str(r.side.name())),
        ("benchmark", Json::str(r.phase.benchmark())),
        (
            "command",
            Json::Arr(r.command.iter().map(|a| Json::str(a.clone())).collect()),
        ),
        ("ops_per_sec", Json::Num(r.result.ops_per_sec)),
        ("micros_per_op", Json::Num(r.result.micros_per_op)),
        ("operations", Json::from(r.result.operations)),
        ("seconds", Json::Num(r.result.seconds)),
        ("latency_us_p50", Json::Num(r.result.latency_us_p50)),
        ("latency_us_p99", Json::Num(r.result.latency_us_p99)),
        ("latency_us_p999", Json::Num(r.result.latency_us_p999)),
        ("cpu_s", Json::Num(r.cpu_s)),
        ("cpu_s_per_mops", Json::Num(r.cpu_s_per_mops())),
        ("machine_cpu_s", Json::Num(r.machine_cpu_s)),
        (
            "machine_cpu_s_per_mops",
            Json::Num(r.machine_cpu_s_per_mops()),
        ),
        ("max_rss_mib", mib(r.max_rss_bytes)),
        ("page_cache_growth_mib", mib(r.page_cache_growth_bytes)),
        ("memory_mib", Json::Num(r.memory_mib())),
        (
            "cgroup_peak_mib",
            r.cgroup_peak_bytes.map_or(Json::Null, mib),
        ),
        ("wall_s", Json::Num(r.wall_s)),
        ("device_reads_per_op", Json::Num(r.device_reads_per_op())),
        (
            "device_write_kib_per_op",
            Json::Num(r.device_write_kib_per_op()),
        ),
        (
            "host_disk",
            match r.disk {
                Some(d) => Json::obj([
                    ("reads", Json::from(d.reads)),
                    ("read_bytes", Json::from(d.read_bytes)),
                    ("writes", Json::from(d.writes)),
                    ("write_bytes", Json::from(d.write_bytes)),
                ]),
                None => Json::Null,
            },
        ),
        (
            "blobfs_metrics",
            Json::Obj(
                r.blobfs_metrics
                    .iter()
                    .map(|(n, v)| (n.clone(), Json::Num(*v)))
                    .collect(),
            ),
        ),
        ("log", Json::str(r.log.clone())),
    ])
}

/// The whole report: `machine` and `params` as the caller describes them,
/// every run, and every ratio.
pub fn report_json(machine: Json, params: Json, runs: &[RunFigures]) -> Json {
    let ratios = ratios(runs)
        .into_iter()
        .map(|r| {
            Json::obj([
                ("config", Json::str(r.config.name())),
                ("phase", Json::str(r.phase.name())),
                ("ops_ratio", Json::Num(r.ops)),
                ("p99_ratio", Json::Num(r.p99)),
                ("cpu_per_op_ratio", Json::Num(r.cpu)),
                ("machine_cpu_per_op_ratio", Json::Num(r.machine_cpu)),
                ("memory_ratio", Json::Num(r.memory)),
            ])
        })
        .collect();
    Json::obj([
        ("benchmark", Json::str("kvbench")),
        ("ratio_definition", Json::str("BlobFS / POSIX")),
        ("machine", machine),
        ("params", params),
        ("runs", Json::Arr(runs.iter().map(run_json).collect())),
        ("ratios", Json::Arr(ratios)),
    ])
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const CONFIG_COLORS: [&str; Config::ALL.len()] =
    ["#4c72b0", "#dd8452", "#55a868", "#8172b3", "#c44e52"];
const SIDE_COLORS: [(Side, &str); 2] = [(Side::BlobFs, "#4c72b0"), (Side::Posix, "#dd8452")];

/// A bar panel of one ratio per (phase, configuration), with a line at 1.0.
fn ratio_panel(svg: &mut String, y0: f64, title: &str, rs: &[Ratio], pick: fn(&Ratio) -> f64) {
    let (x0, w, h) = (70.0, 860.0, 220.0);
    let max = rs
        .iter()
        .map(pick)
        .filter(|v| v.is_finite())
        .fold(1.5f64, f64::max)
        .min(20.0)
        * 1.1;
    let y = |v: f64| y0 + h - (v.min(max) / max) * h;
    let _ = writeln!(
        svg,
        r#"<text x="{x0}" y="{}" font-size="15" font-weight="bold">{}</text>"#,
        y0 - 12.0,
        esc(title)
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>"##
    );
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" font-size="11" text-anchor="end">{v:.2}</text><line x1="{x0}" x2="{}" y1="{yy}" y2="{yy}" stroke="#eee"/>"##,
            x0 - 5.0,
            y(v) + 4.0,
            x0 + w,
            yy = y(v)
        );
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{x0}" x2="{}" y1="{yy}" y2="{yy}" stroke="#c00" stroke-dasharray="5,3"/>"##,
        x0 + w,
        yy = y(1.0)
    );
    let slot = w / Phase::ALL.len() as f64;
    let bar = slot / (Config::ALL.len() as f64 + 1.0);
    for (pi, phase) in Phase::ALL.into_iter().enumerate() {
        let sx = x0 + pi as f64 * slot;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" font-size="12" text-anchor="middle">{}</text>"#,
            sx + slot / 2.0,
            y0 + h + 16.0,
            phase.name()
        );
        for (ci, config) in Config::ALL.into_iter().enumerate() {
            let Some(r) = rs.iter().find(|r| r.phase == phase && r.config == config) else {
                continue;
            };
            let v = pick(r);
            if !v.is_finite() {
                continue;
            }
            let bx = sx + bar / 2.0 + ci as f64 * bar;
            let _ = writeln!(
                svg,
                r#"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {}: {v:.3}</title></rect><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{v:.2}</text>"#,
                y(v),
                bar * 0.9,
                y0 + h - y(v),
                CONFIG_COLORS[ci],
                config.name(),
                phase.name(),
                bx + bar * 0.45,
                y(v) - 3.0
            );
        }
    }
}

/// The chart: ops/s ratio and p99 ratio per phase and configuration, and
/// the latency percentiles (p50, p99, p99.9, log scale) of both sides.
pub fn chart_svg(runs: &[RunFigures]) -> String {
    let rs = ratios(runs);
    let (width, height) = (960.0, 1060.0);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="70" y="24" font-size="17" font-weight="bold">kvbench: RocksDB db_bench on BlobFS vs POSIX (ratio = BlobFS / POSIX)</text>"#
    );
    for (ci, config) in Config::ALL.into_iter().enumerate() {
        let _ = writeln!(
            svg,
            r#"<rect x="{}" y="34" width="12" height="12" fill="{}"/><text x="{}" y="45" font-size="12">{}</text>"#,
            70 + ci * 110,
            CONFIG_COLORS[ci],
            86 + ci * 110,
            config.name()
        );
    }
    ratio_panel(&mut svg, 80.0, "ops/s ratio (higher is better)", &rs, |r| {
        r.ops
    });
    ratio_panel(
        &mut svg,
        380.0,
        "p99 latency ratio (lower is better)",
        &rs,
        |r| r.p99,
    );

    // Latency percentiles, log scale: a column per (config, phase), a
    // marker per (side, percentile).
    let (x0, y0, w, h) = (70.0, 680.0, 860.0, 300.0);
    let _ = writeln!(
        svg,
        r#"<text x="{x0}" y="{}" font-size="15" font-weight="bold">latency percentiles, µs (log scale)</text><text x="380" y="{}" font-size="12">circle p50, square p99, triangle p99.9</text>"#,
        y0 - 12.0,
        y0 - 15.0
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>"##
    );
    let lat: Vec<f64> = runs
        .iter()
        .flat_map(|r| {
            [
                r.result.latency_us_p50,
                r.result.latency_us_p99,
                r.result.latency_us_p999,
            ]
        })
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    // Decades from the smallest to the largest latency, 0.1 µs to 10 s at
    // most, so the axis loop below is short whatever the input.
    let lo = lat
        .iter()
        .cloned()
        .fold(f64::INFINITY, f64::min)
        .clamp(0.1, 1e7)
        .log10()
        .floor();
    let hi = lat
        .iter()
        .cloned()
        .fold(1.0f64, f64::max)
        .clamp(1.0, 1e7)
        .log10()
        .ceil()
        .max(lo + 1.0);
    let y = |v: f64| y0 + h - (v.max(1e-3).log10() - lo) / (hi - lo) * h;
    let mut d = lo;
    while d <= hi {
        let v = 10f64.powf(d);
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" font-size="11" text-anchor="end">{}</text><line x1="{x0}" x2="{}" y1="{yy}" y2="{yy}" stroke="#eee"/>"##,
            x0 - 5.0,
            y(v) + 4.0,
            num(v),
            x0 + w,
            yy = y(v)
        );
        d += 1.0;
    }
    let columns: Vec<(Config, Phase)> = Config::ALL
        .into_iter()
        .flat_map(|c| Phase::ALL.into_iter().map(move |p| (c, p)))
        .filter(|(c, p)| runs.iter().any(|r| r.config == *c && r.phase == *p))
        .collect();
    let slot = w / columns.len().max(1) as f64;
    for (i, (config, phase)) in columns.iter().enumerate() {
        let cx = x0 + (i as f64 + 0.5) * slot;
        let _ = writeln!(
            svg,
            r#"<text x="{cx:.1}" y="{:.1}" font-size="10" text-anchor="end" transform="rotate(-40 {cx:.1} {:.1})">{} {}</text>"#,
            y0 + h + 14.0,
            y0 + h + 14.0,
            config.name(),
            phase.name()
        );
        for (si, (side, color)) in SIDE_COLORS.into_iter().enumerate() {
            let Some(r) = runs
                .iter()
                .find(|r| r.config == *config && r.phase == *phase && r.side == side)
            else {
                continue;
            };
            let mx = cx + (si as f64 - 0.5) * slot * 0.35;
            let (p50, p99, p999) = (
                y(r.result.latency_us_p50),
                y(r.result.latency_us_p99),
                y(r.result.latency_us_p999),
            );
            let _ = writeln!(
                svg,
                r#"<g fill="{color}"><title>{} {} {}: p50 {} p99 {} p99.9 {} µs</title><circle cx="{mx:.1}" cy="{p50:.1}" r="4"/><rect x="{:.1}" y="{:.1}" width="8" height="8"/><path d="M{:.1} {:.1} l5 9 h-10 z"/></g>"#,
                config.name(),
                phase.name(),
                side.name(),
                num(r.result.latency_us_p50),
                num(r.result.latency_us_p99),
                num(r.result.latency_us_p999),
                mx - 4.0,
                p99 - 4.0,
                mx,
                p999 - 5.0
            );
        }
    }
    for (si, (side, color)) in SIDE_COLORS.into_iter().enumerate() {
        let _ = writeln!(
            svg,
            r#"<rect x="{}" y="{}" width="12" height="12" fill="{color}"/><text x="{}" y="{}" font-size="12">{}</text>"#,
            // Right of the title and the marker key, not over them.
            700 + si * 110,
            y0 - 26.0,
            716 + si * 110,
            y0 - 15.0,
            side.name()
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from this repository's db_bench (RocksDB 11.8.1), fillseq on
    /// ext4, 20,000 keys; the histogram body is shortened.
    const FILLSEQ: &str = "\
RocksDB:    version 11.8.1
Date:       Wed Nov 25 14:37:52 2026
CPU:        2 * AMD EPYC
Keys:       16 bytes each (+ 0 bytes user-defined timestamp)
Values:     1000 bytes each (500 bytes after compression)
Entries:    20000
------------------------------------------------
DB path: [/tmp/kvb-probe/db]
fillseq      :       3.178 micros/op 314149 ops/sec 0.064 seconds 20000 operations;  304.4 MB/s
Microseconds per write:
Count: 20000 Average: 3.1734  StdDev: 41.15
Min: 1  Median: 1.5339  Max: 5731
Percentiles: P50: 1.53 P75: 3.58 P99: 9.59 P99.9: 45.56 P99.99: 725.00
------------------------------------------------------
[       0,       1 ]     4767  23.835%  23.835% #####
(       1,       2 ]     9802  49.010%  72.845% ##########

STATISTICS:
rocksdb.block.cache.miss COUNT : 0
rocksdb.db.get.micros P50 : 0.000000 P95 : 0.000000 P99 : 0.000000 P100 : 0.000000 COUNT : 0 SUM : 0
";

    /// Captured: readwhilewriting, 4 threads, on the DB above.
    const READWHILEWRITING: &str = "\
Entries:    20000
------------------------------------------------
DB path: [/tmp/kvb-probe/db]
readwhilewriting :      10.758 micros/op 369979 ops/sec 2.014 seconds 744996 operations;  358.5 MB/s (184999 of 184999 found)

Microseconds per read:
Count: 744996 Average: 10.7843  StdDev: 248.08
Min: 0  Median: 2.8088  Max: 45038
Percentiles: P50: 2.81 P75: 4.34 P99: 14.77 P99.9: 2700.27 P99.99: 9741.15
------------------------------------------------------
[       0,       1 ]    18817   2.526%   2.526% #
";

    /// Captured: overwrite with sync=1 (the writesync phase).
    const WRITESYNC: &str = "\
DB path: [/tmp/kvb-probe/db]
overwrite    :     236.003 micros/op 4237 ops/sec 2.124 seconds 8999 operations;    4.1 MB/s
Microseconds per write:
Count: 8999 Average: 236.0795  StdDev: 537.35
Min: 144  Median: 217.1708  Max: 37185
Percentiles: P50: 217.17 P75: 246.00 P99: 378.61 P99.9: 4402.20 P99.99: 34701.70
";

    #[test]
    fn parses_fillseq() {
        let r = parse_db_bench(FILLSEQ, "fillseq").unwrap();
        assert_eq!(
            r,
            DbBenchResult {
                micros_per_op: 3.178,
                ops_per_sec: 314149.0,
                seconds: 0.064,
                operations: 20000,
                latency_us_p50: 1.53,
                latency_us_p99: 9.59,
                latency_us_p999: 45.56,
            }
        );
    }

    #[test]
    fn parses_readwhilewriting_and_writesync() {
        let r = parse_db_bench(READWHILEWRITING, "readwhilewriting").unwrap();
        assert_eq!(r.ops_per_sec, 369979.0);
        assert_eq!(r.operations, 744996);
        assert_eq!(r.seconds, 2.014);
        assert_eq!(
            (r.latency_us_p50, r.latency_us_p99, r.latency_us_p999),
            (2.81, 14.77, 2700.27)
        );
        let w = parse_db_bench(WRITESYNC, "overwrite").unwrap();
        assert_eq!(w.ops_per_sec, 4237.0);
        assert_eq!(w.latency_us_p99, 378.61);
        assert_eq!(w.latency_us_p999, 4402.20);
    }

    #[test]
    fn parse_errors_say_what_is_missing() {
        // The wrong benchmark: the statistics lines ("rocksdb.db.get.micros
        // P50 : ...") must not be taken for a result line.
        let e = parse_db_bench(FILLSEQ, "readrandom").unwrap_err();
        assert!(e.contains("no result line for \"readrandom\""), "{e}");
        let no_hist = FILLSEQ.replace("Percentiles:", "Pct:");
        let e = parse_db_bench(&no_hist, "fillseq").unwrap_err();
        assert!(e.contains("Percentiles"), "{e}");
        let e = parse_db_bench("fillseq : x micros/op\n", "fillseq").unwrap_err();
        assert!(e.contains("no number before \"micros/op\""), "{e}");
    }

    fn run(config: Config, phase: Phase, side: Side, ops: f64, p99: f64, cpu_s: f64) -> RunFigures {
        RunFigures {
            config,
            phase,
            side,
            command: vec!["db_bench".into(), "--num=10".into()],
            result: DbBenchResult {
                micros_per_op: 1.0,
                ops_per_sec: ops,
                seconds: 1.0,
                operations: ops as u64,
                latency_us_p50: 1.0,
                latency_us_p99: p99,
                latency_us_p999: p99 * 2.0,
            },
            cpu_s,
            // The kernel's threads: more of them on the POSIX side.
            machine_cpu_s: cpu_s + if side == Side::Posix { 1.0 } else { 0.5 },
            max_rss_bytes: 100 << 20,
            page_cache_growth_bytes: if side == Side::Posix { 50 << 20 } else { 0 },
            cgroup_peak_bytes: None,
            wall_s: 1.5,
            log: "x.log".into(),
            disk: (side == Side::Posix).then_some(DiskIo {
                reads: ops as u64 / 2,
                read_bytes: 0,
                writes: 10,
                write_bytes: ops as u64 * 2048,
            }),
            blobfs_metrics: if side == Side::BlobFs {
                parse_prometheus(
                    "# TYPE blobfs_device_read_total counter\nblobfs_device_read_total 5\n\
                     blobfs_device_write_bytes_total 1024\nblobfs_read_seconds{quantile=\"0.5\"} 0.000001\n",
                )
            } else {
                Vec::new()
            },
        }
    }

    #[test]
    fn ratios_pair_the_sides_of_each_phase() {
        let runs = vec![
            run(
                Config::Disk,
                Phase::Insert,
                Side::BlobFs,
                200_000.0,
                10.0,
                1.0,
            ),
            run(
                Config::Disk,
                Phase::Insert,
                Side::Posix,
                100_000.0,
                20.0,
                1.0,
            ),
            run(
                Config::Disk,
                Phase::Randread,
                Side::Posix,
                400_000.0,
                8.0,
                4.0,
            ),
            run(
                Config::Disk,
                Phase::Randread,
                Side::BlobFs,
                300_000.0,
                12.0,
                1.5,
            ),
            // A phase with one side only has no ratio.
            run(Config::Memory, Phase::Insert, Side::BlobFs, 1.0, 1.0, 1.0),
        ];
        let rs = ratios(&runs);
        assert_eq!(rs.len(), 2);
        assert_eq!((rs[0].config, rs[0].phase), (Config::Disk, Phase::Insert));
        assert_eq!(rs[0].ops, 2.0);
        assert_eq!(rs[0].p99, 0.5);
        // CPU per op: 1 s / 0.2 Mops = 5 vs 1 s / 0.1 Mops = 10.
        assert_eq!(rs[0].cpu, 0.5);
        // The machine's: 1.5 s / 0.2 Mops = 7.5 vs 2 s / 0.1 Mops = 20.
        assert_eq!(rs[0].machine_cpu, 0.375);
        assert_eq!(rs[0].memory, 100.0 / 150.0);
        assert_eq!(rs[1].phase, Phase::Randread);
        assert_eq!(rs[1].ops, 0.75);
        assert_eq!(rs[1].p99, 1.5);
        // 1.5 s / 0.3 Mops = 5 vs 4 s / 0.4 Mops = 10.
        assert!((rs[1].cpu - 0.5).abs() < 1e-12);

        let t = table(Config::Disk, &runs);
        assert!(
            t.contains(
                "| insert | BlobFS | 200,000 | 1.00 | 10.0 | 20.0 | 5.00 | 7.50 | 100 | 0.00 | 0.00 | 2.00x | 0.50x | 0.38x |"
            ),
            "{t}"
        );
        assert!(
            t.contains(
                "| insert | POSIX | 100,000 | 1.00 | 20.0 | 40.0 | 10.0 | 20.0 | 150 | 0.50 | 2.00 |  |  |  |"
            ),
            "{t}"
        );
        assert!(t.contains("| randread | BlobFS | 300,000 |"), "{t}");
        // Only the asked configuration's rows.
        assert_eq!(t.lines().count(), 2 + 4);
    }

    #[test]
    fn json_holds_runs_commands_and_ratios() {
        let runs = vec![
            run(
                Config::Direct,
                Phase::Overwrite,
                Side::Posix,
                1000.0,
                300.0,
                2.0,
            ),
            run(
                Config::Direct,
                Phase::Overwrite,
                Side::BlobFs,
                1500.0,
                150.0,
                1.0,
            ),
        ];
        let j = report_json(
            Json::obj([("cores", Json::from(2u64))]),
            Json::obj([("keys", Json::from(10u64))]),
            &runs,
        )
        .to_string();
        assert!(j.starts_with(r#"{"benchmark":"kvbench","ratio_definition":"BlobFS / POSIX","machine":{"cores":2},"params":{"keys":10},"runs":[{"config":"direct","phase":"overwrite","side":"POSIX","benchmark":"overwrite","command":["db_bench","--num=10"],"ops_per_sec":1000,"#), "{j}");
        assert!(j.contains(r#""memory_mib":150,"#), "{j}");
        assert!(j.ends_with(r#""ratios":[{"config":"direct","phase":"overwrite","ops_ratio":1.5,"p99_ratio":0.5,"cpu_per_op_ratio":0.3333333333333333,"machine_cpu_per_op_ratio":0.3333333333333333,"memory_ratio":0.6666666666666666}]}"#), "{j}");
    }

    #[test]
    fn flags_are_spdks_and_the_same_for_both_sides() {
        let f = Phase::Writesync.flags(1000, 20, 1, 8 << 20);
        for want in [
            "--key_size=16",
            "--value_size=1000",
            "--block_size=4096",
            "--bloom_bits=10",
            "--compression_type=none",
            "--target_file_size_base=67108864",
            "--statistics=1",
            "--histogram=1",
            "--benchmarks=overwrite",
            "--duration=20",
            "--disable_wal=0",
            "--sync=1",
            "--use_existing_db=1",
            "--num=1000",
            "--cache_size=8388608",
        ] {
            assert!(f.iter().any(|x| x == want), "{want} missing from {f:?}");
        }
        let i = Phase::Insert.flags(1000, 20, 1, 0);
        assert!(i.iter().any(|x| x == "--use_existing_db=0"));
        assert!(i.iter().any(|x| x == "--disable_wal=1"));
        assert!(!i.iter().any(|x| x.starts_with("--duration")));
        assert!(Phase::Randread
            .flags(1, 1, 16, 0)
            .contains(&"--threads=16".to_string()));
        assert_eq!(Phase::parse("readwrite"), Ok(Phase::Readwrite));
        // The LZ4 pair: its own fresh database, compressed, disk only.
        let l = Phase::InsertLz4.flags(1000, 20, 1, 0);
        assert!(l.iter().any(|x| x == "--compression_type=lz4"));
        assert!(l.iter().any(|x| x == "--use_existing_db=0"));
        let r = Phase::RandreadLz4.flags(1000, 20, 16, 0);
        assert!(r.iter().any(|x| x == "--compression_type=lz4"));
        assert!(r.iter().any(|x| x == "--use_existing_db=1"));
        assert!(r.iter().any(|x| x == "--benchmarks=readrandom"));
        assert_eq!(Phase::RandreadLz4.builds_on(), Phase::InsertLz4);
        assert!(Phase::RandreadLz4.runs_in(Config::Disk));
        assert!(!Phase::InsertLz4.runs_in(Config::Memory));
        assert!(Phase::parse("fill").is_err());
        assert_eq!(Config::parse("memory"), Ok(Config::Memory));
    }

    #[test]
    fn device_io_per_op_comes_from_blobfs_metrics_and_diskstats() {
        let line = "   8       0 sda 1000 3 16000 50 200 9 40960 70 0 100 120 0 0 0 0";
        let (maj, min, d) = DiskIo::parse_line(line).unwrap();
        assert_eq!((maj, min), (8, 0));
        assert_eq!(d.reads, 1000);
        assert_eq!(d.read_bytes, 16000 * 512);
        assert_eq!(d.writes, 200);
        assert_eq!(d.write_bytes, 40960 * 512);
        let later = DiskIo { reads: 1500, ..d };
        assert_eq!(later.since(&d).reads, 500);
        assert!(DiskIo::parse_line("garbage").is_none());

        let m =
            parse_prometheus("# HELP x y\nx_total 3\nx_seconds{quantile=\"0.5\"} 0.25\nbad line\n");
        assert_eq!(
            m,
            vec![
                ("x_total".to_string(), 3.0),
                ("x_seconds{quantile=\"0.5\"}".to_string(), 0.25)
            ]
        );

        let b = run(Config::Disk, Phase::Randread, Side::BlobFs, 10.0, 1.0, 1.0);
        assert_eq!(b.device_reads_per_op(), 0.5);
        assert_eq!(b.device_write_kib_per_op(), 0.1);
        let p = run(Config::Disk, Phase::Randread, Side::Posix, 10.0, 1.0, 1.0);
        assert_eq!(p.device_reads_per_op(), 0.5);
        assert_eq!(p.device_write_kib_per_op(), 2.0);
        let none = RunFigures {
            disk: None,
            ..p.clone()
        };
        assert!(none.device_reads_per_op().is_nan());
        let t = table(Config::Disk, &[b.clone(), p]);
        assert!(t.contains("dev reads/op | KiB written/op"), "{t}");
        assert!(
            t.contains("| 0.50 | 0.10 |") || t.contains("| 0.5 | 0.1 |"),
            "{t}"
        );
        let j = report_json(Json::Null, Json::Null, &[b]).to_string();
        assert!(j.contains("\"blobfs_device_read_total\":5"), "{j}");
        assert!(j.contains("\"device_reads_per_op\":0.5"), "{j}");
    }

    #[test]
    fn chart_of_no_runs_is_an_empty_svg() {
        // A run that failed at its first db_bench still writes a chart.
        let svg = chart_svg(&[]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(!svg.contains("<title>"));
        let mut huge = run(Config::Disk, Phase::Insert, Side::Posix, 1.0, 1e300, 1.0);
        huge.result.latency_us_p50 = 0.0;
        assert!(chart_svg(&[huge]).len() < 100_000);
    }

    #[test]
    fn chart_is_an_svg_with_every_ratio() {
        let runs = vec![
            run(
                Config::Memory,
                Phase::Randread,
                Side::Posix,
                1000.0,
                300.0,
                2.0,
            ),
            run(
                Config::Memory,
                Phase::Randread,
                Side::BlobFs,
                1500.0,
                150.0,
                1.0,
            ),
        ];
        let svg = chart_svg(&runs);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(
            svg.contains("<title>memory randread: 1.500</title>"),
            "{svg}"
        );
        assert!(
            svg.contains("<title>memory randread: 0.500</title>"),
            "{svg}"
        );
        assert!(
            svg.contains("memory randread BlobFS: p50 1.00 p99 150 p99.9 300 µs"),
            "{svg}"
        );
    }
}
