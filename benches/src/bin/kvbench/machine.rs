//! What `kvbench` reads of the machine (`/proc/meminfo`, `/proc/mounts`,
//! `/proc/diskstats`, the CPU model and kernel for the report, the clock)
//! and the one thing it does to it before each run: dropping the page cache.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use benches::json::Json;
use benches::kv;

/// A field of /proc/meminfo, bytes.
pub(crate) fn meminfo(field: &str) -> Option<u64> {
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
pub(crate) fn fs_type(path: &Path) -> String {
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

/// The machine for the report: CPU model, cores, kernel, memory, and the
/// file systems of `dir` and /dev/shm.
pub(crate) fn machine_json(dir: &Path) -> Json {
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
pub(crate) fn utc_now() -> String {
    blobfs::meta::utc(blobfs::meta::now_ns())
}

/// How dropping the page cache went.
pub(crate) enum Dropped {
    /// The page cache was dropped.
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
pub(crate) fn drop_caches() -> Dropped {
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

/// The `/proc/diskstats` counters of disk `(major, minor)`.
pub(crate) fn disk_sample((major, minor): (u32, u32)) -> Option<kv::DiskIo> {
    let text = fs::read_to_string("/proc/diskstats").ok()?;
    text.lines()
        .filter_map(kv::DiskIo::parse_line)
        .find(|(a, b, _)| (*a, *b) == (major, minor))
        .map(|(_, _, d)| d)
}
