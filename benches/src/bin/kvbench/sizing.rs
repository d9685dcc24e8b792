//! How much room a run needs: a side's database ([`side_bytes`]), the
//! `budget` configuration's limit and BlobFS's share of it, and the checks,
//! made before any run, that a file system or a `--device` has that room.

use std::path::Path;

use blobstore::util::{human_size, parse_size};

/// Bytes one side's database may take: ~1.1 KB per key (16 + 1000 bytes
/// plus block and index overhead), three times for compaction and the
/// overwrites the timed phases add before compaction catches up (twice was
/// not enough: a 300,000-key run with 8 s phases filled its image), plus
/// 1 GiB for the WAL, memtables' flushes and the file system's own
/// metadata. Rounded up to MiB.
pub(crate) fn side_bytes(keys: u64) -> u64 {
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
pub(crate) fn budget_bytes(arg: &str, keys: u64) -> Result<u64, String> {
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
pub(crate) fn budget_blobfs_cache(budget: u64, block_cache: u64) -> u64 {
    const MEMTABLES: u64 = 128 << 20;
    const APPEND_BUFFERS: u64 = 96 << 20;
    const PROCESS: u64 = 96 << 20;
    budget
        .saturating_sub(block_cache + MEMTABLES + APPEND_BUFFERS + PROCESS)
        .max(16 << 20)
}

/// The bytes free to an unprivileged user on the file system holding
/// `path`.
pub(crate) fn statvfs_avail(path: &Path) -> Result<u64, String> {
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

/// Refuses a `--device` that does not open or cannot hold a side's
/// database, before any run (the device is closed again at once).
pub(crate) fn check_device(spec: &str, need: u64) -> Result<(), String> {
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
