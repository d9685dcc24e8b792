//! Everything measured about one `db_bench` run ([`RunFigures`]), and the
//! readers of what the machine and BlobFS counted while it ran: the
//! kernel's disk counters ([`DiskIo`], `/proc/diskstats`) and BlobFS's
//! metrics ([`parse_prometheus`]).

use super::parse::DbBenchResult;
use super::{Config, Phase, Side};

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
