//! The file the unsynced memory lives in (on tmpfs, on hugetlbfs for
//! NVMe, or a memfd): opened and locked for as long as its owner has it,
//! the orphans of processes that are gone collected, and read for valid
//! headers without being mapped ([`scan_path`], which fsck uses).
//!
//! Invariants:
//! - The owner holds the file's exclusive lock for as long as it has it,
//!   so what a live owner holds is never collected: an orphan is deleted
//!   only when no process holds it and it holds no header (nothing to
//!   write back).
//! - Slots are `stride` bytes apart: `SLOT_BYTES` rounded up to the file
//!   system's page, which may be at most `MAX_FS_PAGE`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use blobstore::device::FileLock;

use super::header::{Header, Record, HEADER_PAGE, MAX_SLOTS, SLOT_BYTES};
use super::os_err;
use crate::error::{Error, Result};

/// Largest page of the file system the memory is on (a hugetlbfs of 2 MiB
/// pages); a larger one would make every buffer take a page of its own.
const MAX_FS_PAGE: usize = 2 << 20;

/// Opens (creating it) the unsynced memory at `p` and locks it for as long
/// as this process has it: what a live owner holds is never collected as
/// an orphan. Another process's collector may unlink the file between our
/// open and our lock; then the file is opened again.
pub(super) fn open_locked(p: &Path) -> Result<FileLock> {
    use std::os::unix::fs::MetadataExt;
    let shown = || {
        format!(
            "the unsynced memory {} (its directory is set by {})",
            p.display(),
            blobstore::device::UNSYNCED_DIR_ENV
        )
    };
    for _ in 0..10 {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(p)
            .map_err(|e| os_err(format!("opening {}", shown()), e))?;
        // The device's owner is the only opener; a moment's hold is a
        // collector looking at it.
        let f = FileLock::wait_exclusive(f, p, std::time::Duration::from_secs(1))
            .map_err(|e| Error::Store("unsynced memory".into(), e))?;
        let here = f
            .metadata()
            .map_err(|e| os_err(format!("stat of {}", shown()), e))?;
        match std::fs::metadata(p) {
            Ok(m) if m.ino() == here.ino() && m.dev() == here.dev() => return Ok(f),
            // Unlinked under us: start again (dropping `f` unlocks it).
            _ => continue,
        }
    }
    Err(Error::Store(
        "unsynced memory".into(),
        blobstore::Error::Busy(format!("{} keeps being replaced under us", shown())),
    ))
}

/// Deletes the unsynced-memory files beside `ours` that no process holds
/// and that hold nothing to write back: what processes that exited without
/// an unmount left (the memory of their free buffers). Files with headers
/// stay for their device's next mount (fsck lists them).
pub(super) fn collect_orphans(ours: &Path) {
    let Some(dir) = ours.parent() else { return };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if path == ours || !name.starts_with("blobstack-") || !name.ends_with(".unsynced") {
            continue;
        }
        let Ok(f) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
        else {
            continue;
        };
        // Held: a live owner. The lock is released explicitly on drop.
        let Ok(f) = FileLock::exclusive(f, &path) else {
            continue;
        };
        if matches!(scan_file(&f, &path), Ok(r) if r.is_empty()) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Reads the records of the unsynced-memory file at `path` without taking
/// it over (for fsck): `None` when there is no such file.
pub fn scan_path(path: &Path) -> Result<Option<Vec<Record>>> {
    match File::open(path) {
        Ok(f) => scan_file(&f, path).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(os_err(format!("opening {}", path.display()), e)),
    }
}

/// The distance between slots of the memory file `f`: `SLOT_BYTES` rounded
/// up to its file system's page.
pub(super) fn stride_of(f: &File, path: &Path) -> Result<usize> {
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: fstatfs fills the struct it is given on success.
    if unsafe { libc::fstatfs(f.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(os_err(
            format!("statfs of {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: initialised by the successful call above.
    let page = (unsafe { st.assume_init() }.f_bsize as usize).max(4096);
    if !page.is_power_of_two() || page > MAX_FS_PAGE {
        return Err(Error::InvalidArgument(format!(
            "unsynced memory {}: its file system has {page}-byte pages (at most {MAX_FS_PAGE}; \
             a hugetlbfs of 2 MiB pages or a tmpfs)",
            path.display()
        )));
    }
    Ok(SLOT_BYTES.next_multiple_of(page))
}

/// Valid headers of the slots that hold data (found with SEEK_DATA where
/// the file system tells holes apart, so they are skipped without being
/// read; hugetlbfs does not, and every slot's header page is read).
pub(super) fn scan_file(f: &File, path: &Path) -> Result<Vec<Record>> {
    let fd = f.as_raw_fd();
    let stride = stride_of(f, path)? as u64;
    let len = f
        .metadata()
        .map_err(|e| os_err(format!("stat of {}", path.display()), e))?
        .len()
        .min(stride * MAX_SLOTS as u64);
    let mut out = Vec::new();
    let mut slot = 0u64;
    let mut page = vec![0u8; HEADER_PAGE];
    while slot * stride < len {
        // SAFETY: lseek on an open descriptor; no memory is passed.
        let data = unsafe { libc::lseek(fd, (slot * stride) as i64, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data past here.
        }
        slot = data as u64 / stride;
        if slot >= MAX_SLOTS as u64 {
            break;
        }
        f.read_exact_at(&mut page, slot * stride)
            .map_err(|e| os_err(format!("reading {}", path.display()), e))?;
        if let Some((_, header)) = Header::newest(&page) {
            out.push(Record {
                slot: slot as u32,
                header,
            });
        }
        slot += 1;
    }
    Ok(out)
}
