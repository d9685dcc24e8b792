//! Where one configuration keeps its two databases ([`Layout`]): the
//! device BlobFS opens ([`BlobDevice`]) and its URI, the POSIX directory,
//! and getting both ready for a run and cleaned up after the last.

use std::fs;
use std::path::{Path, PathBuf};

use benches::kv::{Phase, Side};
use benches::nvme_sides::NvmeSides;
use blobstore::util::format_size;

use crate::machine::disk_sample;

/// Where one configuration keeps its two databases.
pub(crate) struct Layout {
    /// The device BlobFS runs on.
    pub(crate) device: BlobDevice,
    /// BlobFS read cache (`cache=` in the URI).
    pub(crate) blobfs_cache: String,
    /// The POSIX database directory.
    pub(crate) posix_db: PathBuf,
}

/// The device BlobFS opens.
pub(crate) enum BlobDevice {
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
    pub(crate) fn uri(&self, fresh: bool) -> String {
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
    pub(crate) fn disk_of(&self, side: Side) -> Option<(u32, u32)> {
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
    pub(crate) fn prepare(&self, side: Side, phase: Phase) -> Result<(), String> {
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

    /// Cleans up after the configuration's runs: removes the POSIX database
    /// and BlobFS's image file; an NVMe controller is left with the kernel
    /// ([`NvmeSides::release`]), a `--device` as it is.
    pub(crate) fn clean(&self) {
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
