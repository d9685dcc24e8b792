//! Unsynced memory: where files' written-but-unsynced bytes live, so that a
//! killed process loses none of them (the promise the kernel's page cache
//! makes to applications on a local file system).
//!
//! Every append buffer is a slot of one shared mapping: of a file named by
//! the device ([`blobstore::BlockDevice::unsynced_memory`]) on tmpfs, or on
//! hugetlbfs for NVMe devices, which outlives the process but not the
//! machine, or of a memfd for devices whose blocks die with the process
//! (or that play power cuts). Appends land in the slot's data area (no
//! extra copy) and then rewrite the slot's header, which says whose bytes
//! the data area holds. The next mount of the device after the process
//! died reads the headers, writes their bytes to the files, syncs, and only
//! then clears the memory (`fs/mount.rs`). Devices that need DMA-mapped
//! memory (NVMe) map each slot while it has memory
//! ([`blobstore::BlockDevice::map_dma`]), so a buffer goes to the device
//! from where the appends landed, with no copy there either.
//!
//! The file: slot `i` at byte `i * stride`, [`MAX_SLOTS`] slots, sparse
//! (only slots that were used take memory). The stride is `SLOT_BYTES`
//! rounded up to the file system's page: the same on tmpfs, 6 MiB on a
//! hugetlbfs of 2 MiB pages.
//!
//! ```text
//! slot:   [0, 4096)           header page: header copy A at 0, copy B at 128
//!         [4096, SLOT_BYTES)  data: file bytes [file_off, file_off + used)
//!         [SLOT_BYTES, stride) unused
//! header (128 bytes, little-endian):
//!    0  magic        "BFSUNSY1"
//!    8  version      u32 = 1
//!   12  reserved     u32 = 0
//!   16  boot id      16 bytes: the machine's boot (a reboot clears tmpfs;
//!                    this also refuses memory kept elsewhere across one)
//!   32  fs id        16 bytes: the BlobFS (`blobfs.id` of its super blob)
//!   48  mount gen    u64: the mount that wrote it (`blobfs.mountgen`)
//!   56  blob id      u64: the file's blob
//!   64  seq          u64: order of this slot's header writes
//!   72  file off     u64: file offset of data byte 0 (block-aligned)
//!   80  used         u64: data bytes that are the file's
//!   88  file len     u64: the file's length when this was written
//!   96  reserved     28 bytes of zero
//!  124  crc32c       u32 of bytes [0, 124)
//! ```
//!
//! Where things happen:
//! - Here: [`Unsynced`], one mount's mapping of the memory (opening it,
//!   reading what a dead owner left, writing and clearing slots' headers),
//!   and [`UnsyncedRecovery`], what a mount did with what it found.
//! - `header.rs`: a slot's geometry and its header's bytes ([`Header`],
//!   [`Record`]).
//! - `owner.rs`: whose memory a header is ([`Owner`]), the ids that say
//!   so, and why a record is not this mount's to apply ([`stale_reason`]).
//! - `slots.rs`: slots handed out as append buffers, and taken back.
//! - `memfile.rs`: the file the memory lives in: opened locked, orphans
//!   collected, read for headers without a mapping ([`scan_path`], which
//!   fsck uses).
//!
//! Invariants:
//! - A slot with a valid header (magic, version and crc) holds file bytes
//!   `[file_off, file_off + used)` of blob `blob` as this mount last
//!   acknowledged them, and that file's length was `file_len`.
//! - A header write goes to the copy that does not hold the slot's newest
//!   header, so a process killed in the middle of one leaves the other
//!   valid; data bytes are stored before the header that covers them.
//! - A slot's header is cleared before the slot serves another file, and
//!   before the file's blob can be deleted, so no header ever describes a
//!   blob id that was reused.
//! - Every byte of a file below its length is in a slot describing it, or
//!   on the blob under durable metadata (`fs/file/` keeps this).

mod header;
mod memfile;
mod owner;
mod slots;
#[cfg(test)]
mod tests;

pub(crate) use header::WRITE_CHUNK;
pub use header::{Header, Record, MAX_SLOTS, SLOT_DATA};
pub use memfile::scan_path;
pub use owner::{boot_id, hex, random_id, stale_reason, Owner};

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use blobstore::device::FileLock;
use blobstore::{BlockDevice, DmaBuf};
use parking_lot::Mutex;

use crate::error::{Error, Result};
use header::{HEADER_LEN, HEADER_PAGE, SLOT_BYTES};
use memfile::{collect_orphans, open_locked, scan_file, stride_of};
use slots::{Slots, KEEP_FREE, KEEP_FREE_HUGE};

/// What a mount did with the unsynced memory a dead process left.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnsyncedRecovery {
    /// Where it was looked for (`None`: the device keeps its owner's
    /// unsynced data in process memory, see
    /// [`blobstore::BlockDevice::unsynced_memory`]).
    pub path: Option<PathBuf>,
    /// Files whose unsynced bytes were written back and synced.
    pub files: u64,
    /// Buffers applied.
    pub buffers: u64,
    /// File bytes written back.
    pub bytes: u64,
    /// Buffers not applied, each with why (another boot, another file
    /// system, an earlier mount, a file that no longer exists).
    pub ignored: Vec<String>,
}

impl std::fmt::Display for UnsyncedRecovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} unsynced buffer(s) of {} file(s) written back ({} bytes); {} ignored",
            self.buffers,
            self.files,
            self.bytes,
            self.ignored.len()
        )?;
        for why in &self.ignored {
            write!(f, "\n  ignored: {why}")?;
        }
        Ok(())
    }
}

fn os_err(what: String, e: std::io::Error) -> Error {
    Error::Store(
        "unsynced memory".into(),
        blobstore::Error::Os {
            context: what,
            source: e,
        },
    )
}

/// The unsynced memory of one mount.
pub struct Unsynced {
    /// Locked (released explicitly on drop), so no collector takes it.
    file: FileLock,
    /// The tmpfs file; `None` for a memfd.
    path: Option<PathBuf>,
    base: NonNull<u8>,
    /// Bytes from one slot to the next.
    stride: usize,
    /// Free slots kept populated.
    keep_free: usize,
    /// The device that maps slots for DMA (`None`: no device will).
    dma: Option<Arc<dyn BlockDevice>>,
    /// Set once, when the mount has dealt with what it found.
    owner: OnceLock<Owner>,
    slots: Mutex<Slots>,
    /// Per slot, the seq of its next header write (whose parity picks the
    /// copy). Only the slot's owner writes it: plain loads and stores, no
    /// read-modify-write on the append path.
    next_seq: Box<[AtomicU64]>,
    /// Set when the file system goes away without unmounting: buffers freed
    /// after that keep their headers for the next mount.
    keep: AtomicBool,
}

// SAFETY: `base` is a shared mapping owned by this struct; slot memory is
// reached only through the `DmaBuf` that owns the slot, and headers only by
// the holder of that buffer (under the file's write lock) or while no
// buffer exists.
unsafe impl Send for Unsynced {}
// SAFETY: as above; shared state is behind mutexes and atomics.
unsafe impl Sync for Unsynced {}

impl Unsynced {
    /// Opens (creating it if missing) the unsynced memory at `path`, or a
    /// private one (a memfd) when `path` is `None`. The caller must own the
    /// device the file belongs to (hold its lock). Slots are mapped for DMA
    /// by `dma` (the device buffers will be written to) where it wants them
    /// mapped.
    pub fn open(path: Option<&Path>, dma: Option<Arc<dyn BlockDevice>>) -> Result<Unsynced> {
        let file = match path {
            Some(p) => {
                let f = open_locked(p)?;
                collect_orphans(p);
                f
            }
            None => {
                // SAFETY: a NUL-terminated name and plain flags.
                let fd =
                    unsafe { libc::memfd_create(c"blobfs-unsynced".as_ptr(), libc::MFD_CLOEXEC) };
                if fd < 0 {
                    return Err(os_err(
                        "creating the unsynced memory (memfd)".into(),
                        std::io::Error::last_os_error(),
                    ));
                }
                // SAFETY: a fresh descriptor that nothing else owns.
                let f = unsafe { File::from_raw_fd(fd) };
                FileLock::exclusive(f, Path::new("memfd"))
                    .map_err(|e| Error::Store("unsynced memory".into(), e))?
            }
        };
        let shown = || path.map_or_else(|| "memfd".to_string(), |p| p.display().to_string());
        let stride = stride_of(&file, Path::new(&shown()))?;
        let region = stride * MAX_SLOTS;
        let len = file
            .metadata()
            .map_err(|e| os_err(format!("stat of {}", shown()), e))?
            .len();
        if len != region as u64 {
            // Sparse: the size reserves no memory.
            file.set_len(region as u64)
                .map_err(|e| os_err(format!("sizing {}", shown()), e))?;
        }
        // SAFETY: a fresh shared mapping of an open descriptor sized above;
        // checked against MAP_FAILED. No reservation (MAP_NORESERVE): slots
        // get memory one by one (`populate`).
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                region,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(os_err(
                format!("mapping {}", shown()),
                std::io::Error::last_os_error(),
            ));
        }
        let base = NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| Error::InvalidArgument(format!("mapping {}: address 0", shown())))?;
        Ok(Unsynced {
            file,
            path: path.map(Path::to_path_buf),
            base,
            stride,
            keep_free: if stride > SLOT_BYTES {
                KEEP_FREE_HUGE
            } else {
                KEEP_FREE
            },
            dma,
            owner: OnceLock::new(),
            slots: Mutex::new(Slots {
                free_populated: Vec::new(),
                free_bare: Vec::new(),
                next_new: 0,
                populated: vec![false; MAX_SLOTS],
                mapped: (0..MAX_SLOTS).map(|_| None).collect(),
            }),
            next_seq: (0..MAX_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            keep: AtomicBool::new(false),
        })
    }

    /// Where it lives (`None` for a memfd).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The slots holding a valid header (what a dead owner left).
    pub fn records(&self) -> Result<Vec<Record>> {
        let shown = self.path.clone().unwrap_or_else(|| PathBuf::from("memfd"));
        scan_file(&self.file, &shown)
    }

    /// Copies a record's data bytes (`dst.len()` of them, at most `used`)
    /// into `dst`.
    pub fn read_data(&self, rec: &Record, dst: &mut [u8]) -> Result<()> {
        if dst.len() as u64 > rec.header.used || dst.len() > SLOT_DATA {
            return Err(Error::Corrupt(format!(
                "unsynced slot {}: {} bytes asked of {} used",
                rec.slot,
                dst.len(),
                rec.header.used
            )));
        }
        let at = rec.slot as u64 * self.stride as u64 + HEADER_PAGE as u64;
        self.file
            .read_exact_at(dst, at)
            .map_err(|e| os_err(format!("reading unsynced slot {}", rec.slot), e))
    }

    /// Forgets everything the memory holds (after it was applied, or to
    /// discard it) and makes `owner` the writer of every header from now.
    /// Once per mount, before the first buffer is handed out.
    pub fn reset(&self, owner: Owner) -> Result<()> {
        // Nothing is mapped yet (no slot was handed out); were anything
        // mapped, it would have to go before its memory.
        self.slots.lock().mapped.iter_mut().for_each(|m| *m = None);
        self.punch(0, self.stride * MAX_SLOTS)?;
        let mut s = self.slots.lock();
        debug_assert!(
            s.free_populated.is_empty() && s.free_bare.is_empty() && s.next_new == 0,
            "reset after use"
        );
        s.populated.iter_mut().for_each(|p| *p = false);
        self.owner
            .set(owner)
            .map_err(|_| Error::InvalidArgument("unsynced memory: its owner is already set".into()))
    }

    fn punch(&self, at: usize, len: usize) -> Result<()> {
        // SAFETY: fallocate on an open descriptor; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                at as i64,
                len as i64,
            )
        };
        if rc != 0 {
            return Err(os_err(
                "freeing unsynced memory".into(),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    fn slot_ptr(&self, slot: u32) -> *mut u8 {
        debug_assert!((slot as usize) < MAX_SLOTS);
        // SAFETY: the slot lies inside the mapping (slot < MAX_SLOTS).
        unsafe { self.base.as_ptr().add(slot as usize * self.stride) }
    }

    /// The slot whose data area `buf` is, if it is one of ours.
    fn slot_of(&self, buf: &DmaBuf) -> Option<u32> {
        let data0 = self.base.as_ptr() as usize + HEADER_PAGE;
        let off = (buf.as_ptr() as usize).checked_sub(data0)?;
        (off.is_multiple_of(self.stride) && off / self.stride < MAX_SLOTS)
            .then_some((off / self.stride) as u32)
    }

    /// Records that `buf` holds file bytes `[file_off, file_off + used)` of
    /// `blob`, whose length is `file_len`. Call after the bytes are in the
    /// buffer. Does nothing for a buffer that is not ours, or before
    /// [`Unsynced::reset`] named the owner.
    pub fn describe(&self, buf: &DmaBuf, blob: u64, file_off: u64, used: usize, file_len: u64) {
        let Some(slot) = self.slot_of(buf) else {
            debug_assert!(false, "an append buffer outside the unsynced memory");
            return;
        };
        let Some(&owner) = self.owner.get() else {
            return;
        };
        debug_assert!(used <= buf.capacity() && file_off + used as u64 <= file_len);
        let next = &self.next_seq[slot as usize];
        let seq = next.load(Ordering::Relaxed);
        next.store(seq + 1, Ordering::Relaxed);
        let header = Header {
            owner,
            blob,
            seq,
            file_off,
            used: used as u64,
            file_len,
        }
        .encode();
        let copy = seq & 1;
        // The data the header covers is stored before the header.
        compiler_fence(Ordering::Release);
        // SAFETY: the header page of a slot this buffer owns; nothing else
        // writes it while the buffer exists (the holder of the buffer is
        // the only writer), and `copy * 128 + 128 <= 4096`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                header.as_ptr(),
                self.slot_ptr(slot).add(copy as usize * HEADER_LEN),
                HEADER_LEN,
            );
        }
    }

    /// Clears the header of `buf`'s slot: its bytes are on the blob under
    /// durable metadata, or no longer the file's.
    pub fn retire(&self, buf: &DmaBuf) {
        if let Some(slot) = self.slot_of(buf) {
            self.clear_header(slot);
        }
    }

    pub(super) fn clear_header(&self, slot: u32) {
        compiler_fence(Ordering::Release);
        let p = self.slot_ptr(slot);
        // SAFETY: the slot's header page, inside the mapping and backed
        // (slots are populated before use); its owner is the caller.
        unsafe {
            std::ptr::write_bytes(p, 0, 8);
            std::ptr::write_bytes(p.add(HEADER_LEN), 0, 8);
        }
    }

    /// Clears every header (a clean unmount, after every file synced).
    pub fn retire_all(&self) {
        let s = self.slots.lock();
        for slot in 0..s.next_new {
            if s.populated[slot as usize] {
                self.clear_header(slot);
            }
        }
    }

    /// From now on, freed buffers keep their headers: the file system is
    /// going away without an unmount, and what it did not sync stays for
    /// the next mount, as it would after a crash.
    pub fn keep_on_free(&self) {
        self.keep.store(true, Ordering::Release);
    }

    fn any_header(&self) -> bool {
        self.records().map_or(true, |r| !r.is_empty())
    }
}

impl Drop for Unsynced {
    fn drop(&mut self) {
        if let Some(p) = &self.path {
            if !self.any_header() {
                let _ = std::fs::remove_file(p);
            }
        }
        // The device lets go of the memory before it goes.
        self.slots.get_mut().mapped.clear();
        // SAFETY: the mapping made in `open`, of that length; no buffer can
        // outlive this (each holds an Arc of it).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.stride * MAX_SLOTS);
        }
    }
}
