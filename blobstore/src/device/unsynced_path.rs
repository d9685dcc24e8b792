//! Where a device's unsynced memory lives (see
//! [`BlockDevice::unsynced_memory`](super::BlockDevice::unsynced_memory)):
//! the path of a file of memory that outlives its owning process but not
//! the machine, in a tmpfs directory ([`UNSYNCED_DIR_ENV`], default
//! `/dev/shm`) or, for NVMe devices, on a hugetlbfs mount of 2 MiB pages
//! ([`huge_unsynced_dir`]).
//!
//! Invariants:
//! - The same backing file, opened under any path, gives the same
//!   unsynced-memory path for as long as the machine runs and the file
//!   exists: the next owner after a killed one finds its memory there.
//! - These functions only name files; none creates or removes one.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Environment variable naming the directory of unsynced memory files
/// (default `/dev/shm`). It must be a tmpfs: memory that a reboot clears.
pub const UNSYNCED_DIR_ENV: &str = "BLOBSTACK_UNSYNCED_DIR";

/// The unsynced-memory file of the device whose backing file or device
/// node has metadata `meta` (see [`BlockDevice::unsynced_memory`]): named
/// by the file's device and inode numbers, which are stable for as long as
/// the machine runs and the file exists, and which a second open of the
/// same file (under any path) finds again.
///
/// [`BlockDevice::unsynced_memory`]: super::BlockDevice::unsynced_memory
pub fn unsynced_memory_path(meta: &std::fs::Metadata) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    unsynced_dir().join(format!(
        "blobstack-{:x}-{:x}.unsynced",
        meta.dev(),
        meta.ino()
    ))
}

/// The directory of unsynced memory files ([`UNSYNCED_DIR_ENV`]).
pub fn unsynced_dir() -> PathBuf {
    std::env::var_os(UNSYNCED_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm"))
}

/// The hugetlbfs mount (of 2 MiB pages) that unsynced memory of NVMe
/// devices goes to, which makes it hugepage DMA memory as the driver's own
/// buffers are: `None` when [`UNSYNCED_DIR_ENV`] is set (it wins), when no
/// hugepages are reserved (`/proc/sys/vm/nr_hugepages`), or when no
/// hugetlbfs of 2 MiB pages is mounted (`nvme-setup hugepages` mounts one
/// at `/dev/hugepages`). Stable across a process restart as long as the
/// reservation and the mount stay, which is what lets the next owner find
/// a dead one's memory.
pub fn huge_unsynced_dir() -> Option<PathBuf> {
    if std::env::var_os(UNSYNCED_DIR_ENV).is_some() {
        return None;
    }
    let reserved = std::fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0);
    if !reserved {
        return None;
    }
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    hugetlbfs_2m_mount(&mounts)
}

/// The first hugetlbfs mount of 2 MiB pages in a `/proc/mounts` text.
fn hugetlbfs_2m_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (dir, fstype, opts) = (f.get(1)?, f.get(2)?, f.get(3)?);
        let two_mib = opts
            .split(',')
            .find_map(|o| o.strip_prefix("pagesize="))
            .is_none_or(|p| p == "2M" || p == "2048k");
        (*fstype == "hugetlbfs" && two_mib).then(|| PathBuf::from(dir.replace("\\040", " ")))
    })
}

/// [`unsynced_memory_path`] of the file at `path`.
pub fn unsynced_memory_path_of(path: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(path).map_err(|e| Error::Os {
        context: format!("stat of {}", path.display()),
        source: e,
    })?;
    Ok(unsynced_memory_path(&meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_hugetlbfs_of_2mib_pages_is_the_unsynced_dir() {
        let mounts = "tmpfs /dev/shm tmpfs rw,nosuid 0 0\n\
                      hugetlbfs /mnt/huge1g hugetlbfs rw,relatime,pagesize=1024M 0 0\n\
                      hugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\n\
                      hugetlbfs /other hugetlbfs rw 0 0\n";
        assert_eq!(
            hugetlbfs_2m_mount(mounts),
            Some(PathBuf::from("/dev/hugepages"))
        );
        assert_eq!(
            hugetlbfs_2m_mount("none /my\\040pages hugetlbfs rw 0 0\n"),
            Some(PathBuf::from("/my pages"))
        );
        assert_eq!(hugetlbfs_2m_mount("tmpfs /dev/shm tmpfs rw 0 0\n"), None);
    }
}
