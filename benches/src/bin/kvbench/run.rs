//! One `db_bench` child, run and measured ([`Bench::run`]): its exact
//! command line, a cold page cache, its log, a fresh memory cgroup in
//! `budget`, the progress line, and the figures of [`RunFigures`] (its own
//! CPU and peak memory from `wait4`, the machine's CPU, the page cache's
//! growth, the disk's I/O, BlobFS's metrics).

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use benches::cgroup::MemCgroup;
use benches::kv::{self, Config, Phase, RunFigures, Side};
use benches::nvme_sides::CpuSample;
use blobstore::util::format_size;

use crate::layout::Layout;
use crate::machine::{disk_sample, drop_caches, meminfo, Dropped};

/// Everything that stays the same across runs.
pub(crate) struct Bench {
    /// The db_bench binary.
    pub(crate) db_bench: PathBuf,
    /// Keys in the database (`--num`).
    pub(crate) keys: u64,
    /// Seconds per timed phase (`--duration`).
    pub(crate) duration: u32,
    /// The thread counts `--threads` gave; other phases run SPDK's.
    pub(crate) threads: Vec<(Phase, u32)>,
    /// RocksDB's block cache of both sides, bytes.
    pub(crate) cache_bytes: u64,
    /// Where the logs and BlobFS's metrics go.
    pub(crate) out: PathBuf,
    /// Whether runs still drop the page cache first (cleared when it
    /// cannot be dropped).
    pub(crate) can_drop_caches: bool,
    /// When the runs started (the total time of the progress line and the
    /// report).
    pub(crate) started: Instant,
    /// The `budget` configuration's memory limit, bytes.
    pub(crate) budget: u64,
}

impl Bench {
    /// The thread count of `phase`: `--threads`, else SPDK's.
    pub(crate) fn threads(&self, phase: Phase) -> u32 {
        self.threads
            .iter()
            .find(|(p, _)| *p == phase)
            .map_or(phase.default_threads(), |(_, n)| *n)
    }

    /// The child's command line, program first.
    fn command(&self, config: Config, phase: Phase, side: Side, layout: &Layout) -> Vec<String> {
        let mut cmd = vec![self.db_bench.display().to_string()];
        cmd.extend(phase.flags(
            self.keys,
            self.duration,
            self.threads(phase),
            self.cache_bytes,
        ));
        match side {
            Side::BlobFs => {
                cmd.push(format!(
                    "--fs_uri={};metrics_file={}",
                    layout.uri(phase.fresh()),
                    self.metrics_path(config, phase).display()
                ));
                cmd.push("--db=/kvbench".to_string());
            }
            Side::Posix => {
                cmd.extend(config.posix_flags());
                cmd.push(format!("--db={}", layout.posix_db.display()));
            }
        }
        cmd
    }

    /// Where the BlobFS side's db_bench leaves its metrics at exit.
    fn metrics_path(&self, config: Config, phase: Phase) -> PathBuf {
        self.out
            .join(format!("{}-{}-blobfs.prom", config.name(), phase.name()))
    }

    /// Runs one db_bench child and measures it.
    pub(crate) fn run(
        &mut self,
        config: Config,
        phase: Phase,
        side: Side,
        layout: &Layout,
        label: &str,
    ) -> Result<RunFigures, String> {
        let cmd = self.command(config, phase, side, layout);
        layout
            .prepare(side, phase)
            .map_err(|e| format!("{label}: {e}"))?;
        if self.can_drop_caches {
            let why = match drop_caches() {
                Dropped::Yes => None,
                Dropped::Denied => Some("writing /proc/sys/vm/drop_caches failed: not root?"),
                Dropped::TimedOut => Some("sync + drop_caches took over 30 s: the disk is busy"),
            };
            if let Some(why) = why {
                self.can_drop_caches = false;
                eprintln!(
                    "\nnote: cannot drop the page cache ({why}); the remaining runs do not drop it"
                );
            }
        }
        let log_path = self.out.join(format!(
            "{}-{}-{}.log",
            config.name(),
            phase.name(),
            side.name().to_lowercase()
        ));
        let log = fs::File::create(&log_path)
            .map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        let cached_before = meminfo("Cached").unwrap_or(0);
        let disk = layout.disk_of(side);
        let disk_before = disk.and_then(disk_sample);
        let metrics_path = self.metrics_path(config, phase);
        let _ = fs::remove_file(&metrics_path);
        // A fresh cgroup per run: its peak is this run's.
        let cgroup = match config {
            Config::Budget => Some(
                MemCgroup::create(&format!("kvbench-{}", std::process::id()), self.budget)
                    .map_err(|e| format!("{label}: {e}"))?,
            ),
            _ => None,
        };
        let mut command = Command::new(&cmd[0]);
        command
            .args(&cmd[1..])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        if let Some(cg) = &cgroup {
            cg.join_before_exec(&mut command)
                .map_err(|e| format!("{label}: {e}"))?;
        }
        let busy_before = CpuSample::now();
        let t0 = Instant::now();
        let child = command
            .spawn()
            .map_err(|e| format!("{label}: starting {}: {e}", cmd[0]))?;
        let pid = child.id() as libc::pid_t;

        // The progress line, until the child ends.
        let done = Arc::new(AtomicBool::new(false));
        let ticker = {
            let done = done.clone();
            let label = label.to_string();
            let total = self.started;
            std::thread::spawn(move || {
                while !done.load(Ordering::Relaxed) {
                    eprint!(
                        "\r{label}: {:5.1} s  (total {:6.1} s)   ",
                        t0.elapsed().as_secs_f64(),
                        total.elapsed().as_secs_f64()
                    );
                    let _ = std::io::stderr().flush();
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
        };
        let mut status = 0;
        // SAFETY: `rusage` is a plain C struct; wait4 fills it for our own
        // child `pid`, which std has not reaped (we never call wait on it).
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let rc = loop {
            let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
            if rc == -1 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted
            {
                continue;
            }
            break rc;
        };
        let wall_s = t0.elapsed().as_secs_f64();
        let busy_after = CpuSample::now();
        let disk_after = disk.and_then(disk_sample);
        done.store(true, Ordering::Relaxed);
        let _ = ticker.join();
        drop(child);
        if rc != pid {
            return Err(format!(
                "{label}: waiting for db_bench: {}",
                std::io::Error::last_os_error()
            ));
        }
        let cached_after = meminfo("Cached").unwrap_or(0);
        let output = read_log(&log_path)?;
        let exit = std::process::ExitStatus::from_raw(status);
        let cgroup_peak_bytes = cgroup.as_ref().and_then(MemCgroup::peak);
        if let Some(cg) = cgroup.as_ref().filter(|cg| cg.oom_kills() > 0) {
            return Err(format!(
                "{label}: the OOM killer ended db_bench in its memory cgroup of {} ({exit})\ncommand: {}\nlast lines of its output ({}):\n{}",
                format_size(cg.limit()),
                cmd.join(" "),
                log_path.display(),
                tail(&output, 25)
            ));
        }
        if !exit.success() {
            return Err(format!(
                "{label}: db_bench failed ({exit})\ncommand: {}\nlast lines of its output ({}):\n{}",
                cmd.join(" "),
                log_path.display(),
                tail(&output, 25)
            ));
        }
        let result = kv::parse_db_bench(&output, phase.benchmark()).map_err(|e| {
            format!(
                "{label}: {e}\ncommand: {}\nlast lines of its output ({}):\n{}",
                cmd.join(" "),
                log_path.display(),
                tail(&output, 25)
            )
        })?;
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Ok(RunFigures {
            config,
            phase,
            side,
            command: cmd,
            result,
            cpu_s: tv(ru.ru_utime) + tv(ru.ru_stime),
            machine_cpu_s: match (busy_before, busy_after) {
                (Some(a), Some(b)) => b.busy_since(&a),
                _ => f64::NAN,
            },
            max_rss_bytes: ru.ru_maxrss.max(0) as u64 * 1024,
            page_cache_growth_bytes: cached_after.saturating_sub(cached_before),
            cgroup_peak_bytes,
            wall_s,
            log: log_path.display().to_string(),
            disk: match (disk_before, disk_after) {
                (Some(a), Some(b)) => Some(b.since(&a)),
                _ => None,
            },
            blobfs_metrics: match side {
                Side::BlobFs => match fs::read_to_string(&metrics_path) {
                    Ok(t) => kv::parse_prometheus(&t),
                    Err(e) => {
                        eprintln!(
                            "\nnote: {label}: no BlobFS metrics ({}: {e})",
                            metrics_path.display()
                        );
                        Vec::new()
                    }
                },
                Side::Posix => Vec::new(),
            },
        })
    }
}

/// The child's log, its first 64 MiB at most.
fn read_log(path: &Path) -> Result<String, String> {
    let mut f = fs::File::open(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    // The statistics dump can be long; the figures are near its start.
    let len = f.seek(SeekFrom::End(0)).unwrap_or(0);
    f.seek(SeekFrom::Start(0))
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut bytes = Vec::with_capacity(len.min(64 << 20) as usize);
    f.take(64 << 20)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The last `n` lines of `s`.
fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
