//! `kvbench`: the key-value acceleration benchmark. Is RocksDB faster on
//! BlobFS than on the kernel file system, on the same machine and disk?
//!
//! Runs SPDK's RocksDB suite (insert, overwrite, readwrite, writesync,
//! randread), batched point reads (multiget) and range scans (scan) with
//! `db_bench`, one child process per (configuration, phase,
//! side), the side that goes first alternating from phase to phase, and
//! prints a table per configuration; writes `kvbench.json` and
//! `kvbench.svg` under `--out`. See [`benches::kv`] for the workload.
//!
//! Configurations:
//! - `disk`: BlobFS on `file:<dir>/kvbench.img` (preallocated, O_DIRECT) vs
//!   POSIX in `<dir>/posix-db`, RocksDB defaults;
//! - `direct`: the same, POSIX with O_DIRECT reads, flushes and compactions,
//!   BlobFS with `cache=0`;
//! - `memory`: BlobFS on `shm:/dev/shm/kvbench-<pid>/kvbench.img` vs POSIX
//!   in /dev/shm. A `mem:` device lives only as long as its process, and
//!   every phase is a new `db_bench` that reopens the database the insert
//!   phase built, so BlobFS runs on a `shm:` memory device: its blocks are a
//!   shared mapping of a tmpfs file, which outlives the process, and its
//!   I/O is a memcpy (no syscall, no O_DIRECT, no kernel worker per I/O).
//!   BlobFS runs with `cache=0` there: its blocks are already memory a
//!   memcpy away, and a cache on top only copied them again, with more CPU
//!   per op and a far worse randread p99 at 16 threads in our runs.
//! - `budget`: as `disk`, each db_bench inside a fresh memory cgroup
//!   ([`benches::cgroup`]) whose limit (`--budget`; by default a third of
//!   the database) counts its memory and the page cache it fills, as a
//!   container's limit does; BlobFS's cache is what the budget leaves after
//!   RocksDB's block cache and memtables, BlobFS's append buffers and the
//!   process ([`budget_blobfs_cache`]). The memory column is the cgroup's
//!   peak; a run the OOM killer ends is an error saying so. Needs root.
//! - `nvme` (with `--nvme PCI`, as root): BlobFS on one namespace of an
//!   NVMe controller through our userspace driver vs POSIX on ext4 on
//!   another namespace of the same size and format through the kernel's
//!   `nvme` driver, the controller rebound between the two with
//!   `nvme-setup` for each side's runs (see [`benches::nvme_sides`]). Both
//!   namespaces are erased. BlobFS gets `--blobfs-cache` as in `disk`.
//!
//! `--device SPEC` puts BlobFS's side of `disk`, `direct` and `budget` on
//! any device spec instead of the image file, formatted afresh by the insert
//! phase: a remote namespace (`nvme-tcp:HOST:PORT/NQN/ns=1`), a raw
//! partition (`file:/dev/sdb1`). The POSIX side stays in `--dir`: for a
//! like-for-like remote comparison, mount ext4 on another namespace of the
//! same target through the kernel's initiator (`nvme connect`) and pass
//! that as `--dir`.
//!
//! Every run records the child's own CPU time and the whole machine's
//! (elapsed time times CPUs minus idle time in `/proc/stat`, so kernel
//! threads and interrupts count; see [`benches::nvme_sides::CpuSample`]): ext4's
//! writeback and journal run in kernel threads the child is never charged
//! for, while BlobFS's writer thread and our driver's polling are the
//! child's.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use benches::cgroup::MemCgroup;
use benches::json::Json;
use benches::kv::{self, Config, Phase, RunFigures, Side};
use benches::nvme_sides::{CpuSample, NvmeSides};
use blobstore::util::{format_size, human_size, parse_size};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    about = "RocksDB db_bench on BlobFS vs the kernel file system (SPDK's RocksDB suite), side by side",
    after_help = "Default scale: about 15 minutes on a 2-core machine. --quick: under 3 minutes. \
                  --full: SPDK's CI scale (20 million keys, 20 s phases)."
)]
struct Args {
    /// Keys in the database (db_bench --num) [default: 1500000; --quick 50000; --full 20000000].
    #[arg(long)]
    keys: Option<u64>,
    /// Seconds per timed phase (db_bench --duration) [default: 15; --quick 2; --full 20].
    #[arg(long)]
    duration: Option<u32>,
    /// Thread counts per phase, e.g. `randread=8,readwrite=2` (default: SPDK's 1,1,4,1,16).
    #[arg(long, default_value = "")]
    threads: String,
    /// Configurations to run, in order.
    #[arg(long, default_value = "disk,direct,memory,budget")]
    configs: String,
    /// Phases to run (in this order whatever the order given; a phase's
    /// insert always runs: the others reuse its database). The LZ4 pair
    /// (`insert-lz4`, `randread-lz4`: the same with LZ4 compression) runs in
    /// the `disk` configuration only.
    #[arg(
        long,
        default_value = "insert,overwrite,readwrite,writesync,randread,multiget,scan,insert-lz4,randread-lz4"
    )]
    phases: String,
    /// Directory on the disk under test, for the BlobFS image and the POSIX
    /// database [default: kvbench/ in the cargo target dir].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Where the JSON, the chart and db_bench's logs go [default: kvbench-out/ in the cargo target dir].
    #[arg(long)]
    out: Option<PathBuf>,
    /// RocksDB block cache of both sides (db_bench --cache_size).
    #[arg(long, default_value = "32M")]
    cache_size: String,
    /// BlobFS read cache in the disk and nvme configurations (`cache=` of the URI;
    /// `direct` and `memory` always use 0). The default follows SPDK's RocksDB
    /// test, which gave BlobFS a 4 GiB cache (`CACHE_SIZE=4096`), while POSIX
    /// has the whole page cache; the memory column shows what each side used.
    #[arg(long, default_value = "4G")]
    blobfs_cache: String,
    /// The `budget` configuration's memory limit per db_bench (process
    /// memory and page cache together), e.g. `2G`; `auto` is a third of
    /// the database's size (about 1,100 bytes per key), at least 512 MiB.
    #[arg(long, default_value = "auto")]
    budget: String,
    /// BlobFS's device in the disk, direct and budget configurations
    /// instead of an image file in --dir: any device spec (e.g.
    /// `nvme-tcp:10.0.0.2:4420/nqn.2024-01.io.example:disk1/ns=1`), which the
    /// insert phase formats (everything on it is lost). The POSIX side stays
    /// in --dir.
    #[arg(long)]
    device: Option<String>,
    /// The db_bench binary [default: rocksdb/db_bench in the cargo target dir].
    #[arg(long)]
    db_bench: Option<PathBuf>,
    /// The NVMe controller (PCI address, e.g. 0000:00:04.0) of the `nvme`
    /// configuration. Both of its namespaces named by --nvme-namespaces
    /// are erased.
    #[arg(long)]
    nvme: Option<String>,
    /// The `nvme` configuration's namespaces: BLOBFS,POSIX (same size and
    /// block size).
    #[arg(long, default_value = "1,2")]
    nvme_namespaces: String,
    /// The nvme-setup binary [default: next to kvbench].
    #[arg(long)]
    nvme_setup: Option<PathBuf>,
    /// A run of under 3 minutes (the smoke test of `make test`).
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// SPDK's CI scale: 20 million keys, 20-second phases.
    #[arg(long)]
    full: bool,
}

/// The target directory the binary was built into (`<target>/release/kvbench`).
fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent()?.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target"))
}

fn parse_list<T>(s: &str, parse: fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(parse)
        .collect()
}

/// Bytes one side's database may take: ~1.1 KB per key (16 + 1000 bytes
/// plus block and index overhead), three times for compaction and the
/// overwrites the timed phases add before compaction catches up (twice was
/// not enough: a 300,000-key run with 8 s phases filled its image), plus
/// 1 GiB for the WAL, memtables' flushes and the file system's own
/// metadata. Rounded up to MiB.
fn side_bytes(keys: u64) -> u64 {
    let b = keys
        .saturating_mul(1100)
        .saturating_mul(3)
        .saturating_add(1 << 30);
    b.div_ceil(1 << 20) << 20
}

/// The `budget` configuration's limit: `--budget` as given, or for `auto`
/// a third of the database (about 1,100 bytes per key, as in
/// [`side_bytes`]), rounded up to 64 MiB, at least 512 MiB (below that
/// db_bench's own memtables and block cache leave no room for a cache on
/// either side).
fn budget_bytes(arg: &str, keys: u64) -> Result<u64, String> {
    if arg != "auto" {
        let b = parse_size(arg)?;
        if b < 256 << 20 {
            return Err(format!(
                "--budget {arg}: at least 256M (db_bench's memtables alone take 128 MiB)"
            ));
        }
        return Ok(b);
    }
    let third = keys.saturating_mul(1100) / 3;
    Ok((third.div_ceil(64 << 20) << 26).max(512 << 20))
}

/// BlobFS's cache in the `budget` configuration: what the budget leaves
/// after RocksDB's block cache, its memtables (db_bench's defaults: two of
/// 64 MiB), BlobFS's append buffers (unsynced memory on tmpfs, charged to
/// the cgroup and never reclaimable: 96 MiB, the buffers of a flush, a
/// compaction and the free ones kept for reuse) and the process itself
/// (96 MiB: code, heap, thread stacks). The POSIX side's page cache gets
/// whatever its process leaves, as the kernel decides.
fn budget_blobfs_cache(budget: u64, block_cache: u64) -> u64 {
    const MEMTABLES: u64 = 128 << 20;
    const APPEND_BUFFERS: u64 = 96 << 20;
    const PROCESS: u64 = 96 << 20;
    budget
        .saturating_sub(block_cache + MEMTABLES + APPEND_BUFFERS + PROCESS)
        .max(16 << 20)
}

/// Removes a BlobFS image and, first, its unsynced memory (what the last
/// db_bench left unsynced, or the free buffers of a process that never
/// unmounted): nothing can mount the image again, and the memory file would
/// otherwise stay on tmpfs until another mount collects it.
fn remove_image(image: &Path) {
    if let Ok(mem) = blobstore::device::unsynced_memory_path_of(image) {
        let _ = fs::remove_file(mem);
    }
    let _ = fs::remove_file(image);
}

fn statvfs_avail(path: &Path) -> Result<u64, String> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("{} has a NUL byte", path.display()))?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out
    // pointer for the duration of the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(format!(
            "statvfs {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// A field of /proc/meminfo, bytes.
fn meminfo(field: &str) -> Option<u64> {
    let s = fs::read_to_string("/proc/meminfo").ok()?;
    s.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

/// The file system type holding `path` (longest mount point prefix in
/// /proc/mounts).
fn fs_type(path: &Path) -> String {
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let Ok(mounts) = fs::read_to_string("/proc/mounts") else {
        return "unknown".into();
    };
    mounts
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (dev, mnt, ty) = (w.next()?, w.next()?, w.next()?);
            path.starts_with(mnt)
                .then(|| (mnt.len(), format!("{ty} ({dev} on {mnt})")))
        })
        .max_by_key(|(n, _)| *n)
        .map_or_else(|| "unknown".into(), |(_, t)| t)
}

fn machine_json(dir: &Path) -> Json {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get() as u64);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    Json::obj([
        ("cpu_model", Json::str(cpu)),
        ("cores", Json::from(cores)),
        ("kernel", Json::str(kernel)),
        (
            "mem_total_mib",
            Json::from(meminfo("MemTotal").unwrap_or(0) >> 20),
        ),
        ("dir", Json::str(dir.display().to_string())),
        ("dir_fs", Json::str(fs_type(dir))),
        ("shm_fs", Json::str(fs_type(Path::new("/dev/shm")))),
    ])
}

/// `YYYY-MM-DD HH:MM:SS UTC` from the system clock.
fn utc_now() -> String {
    blobfs::meta::utc(blobfs::meta::now_ns())
}

/// How dropping the page cache went.
enum Dropped {
    Yes,
    /// Not permitted (not root, read-only /proc).
    Denied,
    /// `sync` or the drop did not finish in time (a busy shared disk).
    TimedOut,
}

/// Flushes dirty data and drops the page cache, so every run starts cold.
/// Done in a child shell with a time limit: on a machine whose disk other
/// processes keep busy, `sync` can block for minutes in the kernel, and a
/// benchmark must not hang on it (the child is left to finish on its own).
fn drop_caches() -> Dropped {
    let child = Command::new("sh")
        .args(["-c", "sync && echo 3 > /proc/sys/vm/drop_caches"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        return Dropped::Denied;
    };
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(30) {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Dropped::Yes,
            Ok(Some(_)) | Err(_) => return Dropped::Denied,
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    Dropped::TimedOut
}

/// Where one configuration keeps its two databases.
struct Layout {
    /// The device BlobFS runs on.
    device: BlobDevice,
    /// BlobFS read cache (`cache=` in the URI).
    blobfs_cache: String,
    /// The POSIX database directory.
    posix_db: PathBuf,
}

/// The device BlobFS opens.
enum BlobDevice {
    /// `file:<image>?size=..&prealloc=true`: io_uring + O_DIRECT on a
    /// preallocated image file.
    File { image: PathBuf, bytes: u64 },
    /// `shm:<image>?size=..`: a shared mapping of the file (memory), I/O by
    /// memcpy.
    Shm { image: PathBuf, bytes: u64 },
    /// A namespace through our userspace NVMe driver, the other side on
    /// ext4 on the same controller.
    Nvme(NvmeSides),
    /// A device spec the user gave (`--device`): formatted by the insert
    /// phase, never removed.
    Spec(String),
}

impl Layout {
    /// The BlobFS URI; `fresh` (the insert phase) formats a new BlobFS:
    /// `always` on an image file, `force` on an NVMe namespace, which may
    /// hold anything (a BlobFS of an earlier run, ext4 of another): --nvme
    /// gave it to the benchmark.
    fn uri(&self, fresh: bool) -> String {
        let (spec, mkfs) = match &self.device {
            BlobDevice::File { image, bytes } => (
                format!(
                    "file:{}?size={}&prealloc=true",
                    image.display(),
                    format_size(*bytes)
                ),
                "always",
            ),
            BlobDevice::Shm { image, bytes } => (
                format!("shm:{}?size={}", image.display(), format_size(*bytes)),
                "always",
            ),
            BlobDevice::Nvme(n) => (n.blobfs_spec(), "force"),
            BlobDevice::Spec(spec) => (spec.clone(), "force"),
        };
        let mkfs = if fresh { mkfs } else { "never" };
        format!("blobfs://{spec};cache={};mkfs={mkfs}", self.blobfs_cache)
    }

    /// The host disk (major, minor) that holds `side`'s files, if the
    /// kernel counts one for it in `/proc/diskstats` (not tmpfs, not a
    /// namespace our driver owns).
    fn disk_of(&self, side: Side) -> Option<(u32, u32)> {
        let path = match (&self.device, side) {
            (BlobDevice::Nvme(_) | BlobDevice::Spec(_), Side::BlobFs) => return None,
            (BlobDevice::File { image, .. } | BlobDevice::Shm { image, .. }, Side::BlobFs) => {
                image.clone()
            }
            (_, Side::Posix) => self.posix_db.clone(),
        };
        // The nearest ancestor that exists (the database may not yet).
        let meta = path.ancestors().find_map(|p| fs::metadata(p).ok())?;
        use std::os::unix::fs::MetadataExt;
        let dev = meta.dev();
        let id = (libc::major(dev), libc::minor(dev));
        disk_sample(id).map(|_| id)
    }

    /// Gets the machine ready for a run of `side` of `phase` (a fresh
    /// database on the insert phase).
    fn prepare(&self, side: Side, phase: Phase) -> Result<(), String> {
        let fresh = phase.fresh();
        match (&self.device, side) {
            (BlobDevice::Nvme(n), _) => n.prepare(side, fresh)?,
            (BlobDevice::File { image, .. } | BlobDevice::Shm { image, .. }, Side::BlobFs) => {
                if fresh {
                    remove_image(image);
                }
            }
            (BlobDevice::Spec(_), Side::BlobFs) | (_, Side::Posix) => {}
        }
        if fresh && side == Side::Posix {
            let _ = fs::remove_dir_all(&self.posix_db);
        }
        Ok(())
    }

    fn clean(&self) {
        let _ = fs::remove_dir_all(&self.posix_db);
        match &self.device {
            BlobDevice::File { image, .. } | BlobDevice::Shm { image, .. } => remove_image(image),
            BlobDevice::Nvme(n) => {
                if let Err(e) = n.release() {
                    eprintln!("\nnote: leaving the NVMe controller: {e}");
                }
            }
            BlobDevice::Spec(_) => {}
        }
    }
}

/// Refuses a `--device` that does not open or cannot hold a side's
/// database, before any run (the device is closed again at once).
fn check_device(spec: &str, need: u64) -> Result<(), String> {
    let dev = blobstore::device::open_device(spec).map_err(|e| format!("--device {spec}: {e}"))?;
    let size = dev.geometry().size_bytes();
    if size < need {
        return Err(format!(
            "--device {spec}: {} is too small for this many keys (about {} for BlobFS); use fewer --keys",
            human_size(size),
            human_size(need)
        ));
    }
    Ok(())
}

/// Everything that stays the same across runs.
struct Bench {
    db_bench: PathBuf,
    keys: u64,
    duration: u32,
    threads: Vec<(Phase, u32)>,
    cache_bytes: u64,
    out: PathBuf,
    can_drop_caches: bool,
    started: Instant,
    /// The `budget` configuration's memory limit, bytes.
    budget: u64,
}

impl Bench {
    fn threads(&self, phase: Phase) -> u32 {
        self.threads
            .iter()
            .find(|(p, _)| *p == phase)
            .map_or(phase.default_threads(), |(_, n)| *n)
    }

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
    fn run(
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

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The `/proc/diskstats` counters of disk `(major, minor)`.
fn disk_sample((major, minor): (u32, u32)) -> Option<kv::DiskIo> {
    let text = fs::read_to_string("/proc/diskstats").ok()?;
    text.lines()
        .filter_map(kv::DiskIo::parse_line)
        .find(|(a, b, _)| (*a, *b) == (major, minor))
        .map(|(_, _, d)| d)
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nkvbench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let (def_keys, def_duration) = if args.quick {
        (50_000, 2)
    } else if args.full {
        (20_000_000, 20)
    } else {
        (1_500_000, 15)
    };
    let keys = args.keys.unwrap_or(def_keys);
    let duration = args.duration.unwrap_or(def_duration);
    if keys == 0 || duration == 0 {
        return Err("--keys and --duration must be at least 1".into());
    }
    let mut configs = parse_list(&args.configs, Config::parse)?;
    let mut seen = Vec::new();
    configs.retain(|c| {
        let first = !seen.contains(c);
        seen.push(*c);
        first
    });
    let mut phases = parse_list(&args.phases, Phase::parse)?;
    if configs.is_empty() || phases.is_empty() {
        return Err("--configs and --phases must name at least one".into());
    }
    for base in phases.iter().map(|p| p.builds_on()).collect::<Vec<_>>() {
        if !phases.contains(&base) {
            eprintln!(
                "note: adding the {} phase: the phases after it reuse the database it builds",
                base.name()
            );
            phases.push(base);
        }
    }
    // SPDK's order whatever the order given.
    phases.sort_by_key(|p| Phase::ALL.iter().position(|x| x == p));
    phases.dedup();
    let threads = parse_list(&args.threads, |s| {
        let (p, n) = s
            .split_once('=')
            .ok_or_else(|| format!("--threads wants phase=N items, got {s:?}"))?;
        let n: u32 = n
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("--threads: {n:?} is not a positive thread count"))?;
        Ok((Phase::parse(p)?, n))
    })?;
    let cache_bytes = parse_size(&args.cache_size)?;
    let blobfs_cache_bytes = parse_size(&args.blobfs_cache)?;
    let budget = budget_bytes(&args.budget, keys)?;
    let budget_cache = budget_blobfs_cache(budget, cache_bytes);

    let target = target_dir();
    let db_bench = args
        .db_bench
        .clone()
        .unwrap_or_else(|| target.join("rocksdb").join("db_bench"));
    if !db_bench.is_file() {
        return Err(format!(
            "db_bench not found at {}: build it with `make rocksdb-tools` (same CARGO_TARGET_DIR), or pass --db-bench PATH",
            db_bench.display()
        ));
    }
    let dir = args.dir.clone().unwrap_or_else(|| target.join("kvbench"));
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| target.join("kvbench-out"));
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    fs::create_dir_all(&out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let dir = fs::canonicalize(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let out = fs::canonicalize(&out).map_err(|e| format!("{}: {e}", out.display()))?;

    // Room for both sides of every configuration asked for, checked up
    // front so a long run does not die half way.
    let per_side = side_bytes(keys);
    let shm = PathBuf::from("/dev/shm").join(format!("kvbench-{}", std::process::id()));
    let mut nvme_sides = None;
    if let Some(spec) = &args.device {
        if configs
            .iter()
            .any(|c| matches!(c, Config::Disk | Config::Direct | Config::Budget))
        {
            check_device(spec, per_side)?;
        }
    }
    for config in &configs {
        match config {
            Config::Disk | Config::Direct | Config::Budget => {
                let avail = statvfs_avail(&dir)?;
                let need = if args.device.is_some() {
                    per_side
                } else {
                    2 * per_side
                };
                if avail < need {
                    return Err(format!(
                        "configuration {}: {} keys need about {} for the BlobFS image and {} for the POSIX database, but {} has {} free; use fewer --keys, another --dir, or leave {} out of --configs",
                        config.name(), keys, human_size(per_side), human_size(per_side), dir.display(), human_size(avail), config.name()
                    ));
                }
            }
            Config::Nvme => {
                let pci = args.nvme.as_deref().ok_or(
                    "configuration nvme needs --nvme PCI (the controller whose namespaces it erases)",
                )?;
                let ns: Vec<u32> = parse_list(&args.nvme_namespaces, |s| {
                    s.parse::<u32>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("--nvme-namespaces: {s:?} is not a namespace id"))
                })?;
                let [blobfs_ns, posix_ns] = ns[..] else {
                    return Err("--nvme-namespaces wants two ids, BLOBFS,POSIX".into());
                };
                let setup = args.nvme_setup.clone().unwrap_or_else(|| {
                    std::env::current_exe()
                        .ok()
                        .and_then(|e| Some(e.parent()?.join("nvme-setup")))
                        .unwrap_or_else(|| PathBuf::from("nvme-setup"))
                });
                let sides = NvmeSides::new(pci, blobfs_ns, posix_ns, dir.join("nvme-ext4"), setup);
                eprintln!("kvbench nvme: {}", sides.check(per_side)?);
                nvme_sides = Some(sides);
            }
            Config::Memory => {
                let avail_shm = statvfs_avail(Path::new("/dev/shm"))?;
                let avail_mem = meminfo("MemAvailable").unwrap_or(0);
                let need = 2 * per_side + (1 << 30);
                if avail_shm < 2 * per_side || avail_mem < need {
                    return Err(format!(
                        "configuration memory: {} keys need about {} in /dev/shm for both sides plus 1 GiB for the processes, but /dev/shm has {} free and MemAvailable is {}; use fewer --keys or leave memory out of --configs",
                        keys, human_size(2 * per_side), human_size(avail_shm), human_size(avail_mem)
                    ));
                }
            }
        }
    }

    let started_at = utc_now();
    eprintln!(
        "kvbench: {} keys, {} s per timed phase, configs {}, phases {}; db_bench {}; dir {} ({}); out {}",
        keys,
        duration,
        configs.iter().map(|c| c.name()).collect::<Vec<_>>().join(","),
        phases.iter().map(|p| p.name()).collect::<Vec<_>>().join(","),
        db_bench.display(),
        dir.display(),
        fs_type(&dir),
        out.display()
    );
    let mut bench = Bench {
        db_bench,
        keys,
        duration,
        threads: threads.clone(),
        cache_bytes,
        out: out.clone(),
        can_drop_caches: true,
        started: Instant::now(),
        budget,
    };
    let mut runs: Vec<RunFigures> = Vec::new();
    let mut failure = None;
    'configs: for (ci, &config) in configs.iter().enumerate() {
        let layout = match config {
            Config::Disk | Config::Direct | Config::Budget => Layout {
                device: match &args.device {
                    Some(spec) => BlobDevice::Spec(spec.clone()),
                    None => BlobDevice::File {
                        image: dir.join("kvbench.img"),
                        bytes: per_side,
                    },
                },
                blobfs_cache: match config {
                    Config::Direct => "0".into(),
                    Config::Budget => format_size(budget_cache),
                    _ => format_size(blobfs_cache_bytes),
                },
                posix_db: dir.join("posix-db"),
            },
            Config::Memory => {
                fs::create_dir_all(&shm).map_err(|e| format!("creating {}: {e}", shm.display()))?;
                Layout {
                    device: BlobDevice::Shm {
                        image: shm.join("kvbench.img"),
                        bytes: per_side,
                    },
                    // The device is memory already: see the module docs.
                    blobfs_cache: "0".into(),
                    posix_db: shm.join("posix-db"),
                }
            }
            Config::Nvme => {
                let sides = nvme_sides
                    .take()
                    .ok_or("configuration nvme: controller not checked")?;
                Layout {
                    posix_db: sides.posix_db(),
                    device: BlobDevice::Nvme(sides),
                    blobfs_cache: format_size(blobfs_cache_bytes),
                }
            }
        };
        let phases: Vec<Phase> = phases
            .iter()
            .copied()
            .filter(|p| p.runs_in(config))
            .collect();
        for (pi, &phase) in phases.iter().enumerate() {
            // Alternate which side goes first, phase by phase and across
            // configurations.
            let first = if (ci + pi) % 2 == 0 {
                Side::BlobFs
            } else {
                Side::Posix
            };
            for side in [first, first.other()] {
                let label = format!(
                    "[{}/{} {}] {} {}/{} {}",
                    ci + 1,
                    configs.len(),
                    config.name(),
                    phase.name(),
                    pi + 1,
                    phases.len(),
                    side.name()
                );
                match bench.run(config, phase, side, &layout, &label) {
                    Ok(r) => {
                        eprintln!(
                            "\r{label}: {} ops/s, p99 {:.1} µs, {:.1} s          ",
                            r.result.ops_per_sec as u64, r.result.latency_us_p99, r.wall_s
                        );
                        runs.push(r);
                    }
                    Err(e) => {
                        failure = Some(e);
                        layout.clean();
                        break 'configs;
                    }
                }
            }
        }
        layout.clean();
    }
    let _ = fs::remove_dir_all(&shm);
    let total_s = bench.started.elapsed().as_secs_f64();

    let params = Json::obj([
        ("keys", Json::from(keys)),
        ("duration_s", Json::from(u64::from(duration))),
        (
            "threads",
            Json::obj(
                phases
                    .iter()
                    .map(|&p| (p.name(), Json::from(u64::from(bench.threads(p))))),
            ),
        ),
        (
            "configs",
            Json::Arr(configs.iter().map(|c| Json::str(c.name())).collect()),
        ),
        (
            "phases",
            Json::Arr(phases.iter().map(|p| Json::str(p.name())).collect()),
        ),
        ("cache_size_bytes", Json::from(cache_bytes)),
        ("blobfs_cache_bytes", Json::from(blobfs_cache_bytes)),
        ("budget_bytes", Json::from(budget)),
        ("budget_blobfs_cache_bytes", Json::from(budget_cache)),
        ("image_bytes", Json::from(per_side)),
        (
            "page_cache_dropped_before_each_run",
            Json::Bool(bench.can_drop_caches),
        ),
        ("started", Json::str(started_at.clone())),
        ("total_s", Json::Num(total_s)),
        ("complete", Json::Bool(failure.is_none())),
    ]);
    let report = kv::report_json(machine_json(&dir), params, &runs);
    let json_path = out.join("kvbench.json");
    let svg_path = out.join("kvbench.svg");
    fs::write(&json_path, format!("{report}\n"))
        .map_err(|e| format!("writing {}: {e}", json_path.display()))?;
    fs::write(&svg_path, kv::chart_svg(&runs))
        .map_err(|e| format!("writing {}: {e}", svg_path.display()))?;

    println!(
        "\nkvbench, {started_at}: {keys} keys, {duration} s per timed phase, RocksDB block cache {}; ratio = BlobFS / POSIX",
        format_size(cache_bytes)
    );
    if configs.contains(&Config::Budget) {
        println!(
            "budget: each db_bench in a memory cgroup of {} (process and page cache), BlobFS cache {}; memory MiB is the cgroup's peak",
            format_size(budget),
            format_size(budget_cache)
        );
    }
    for config in &configs {
        if !runs.iter().any(|r| r.config == *config) {
            continue;
        }
        println!("\n### {}\n", config.name());
        print!("{}", kv::table(*config, &runs));
    }
    println!(
        "\ntotal {:.0} s; JSON {}; chart {}",
        total_s,
        json_path.display(),
        svg_path.display()
    );
    if !bench.can_drop_caches {
        println!("(the page cache could not be dropped between runs)");
    }
    match failure {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_spec_is_formatted_by_the_insert_phase_only() {
        let layout = Layout {
            device: BlobDevice::Spec("nvme-tcp:10.0.0.2:4420/nqn.2024-01.io.example:d/ns=1".into()),
            blobfs_cache: "1G".into(),
            posix_db: PathBuf::from("/mnt/ext4/posix-db"),
        };
        assert_eq!(
            layout.uri(true),
            "blobfs://nvme-tcp:10.0.0.2:4420/nqn.2024-01.io.example:d/ns=1;cache=1G;mkfs=force"
        );
        assert!(layout.uri(false).ends_with(";cache=1G;mkfs=never"));
        assert_eq!(layout.disk_of(Side::BlobFs), None);
    }

    #[test]
    fn a_device_that_is_unknown_or_too_small_is_refused_up_front() {
        let e = check_device("floppy:1", 1 << 20).unwrap_err();
        assert!(
            e.contains("--device floppy:1") && e.contains("unknown scheme"),
            "{e}"
        );
        let e = check_device("mem:16M", 1 << 30).unwrap_err();
        assert!(e.contains("too small"), "{e}");
        check_device("mem:16M", 8 << 20).unwrap();
    }
}
