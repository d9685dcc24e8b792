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
//!   on the blob under durable metadata (`file/` keeps this).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{compiler_fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use blobstore::device::{DmaMapping, DmaRelease, FileLock};
use blobstore::{BlockDevice, DmaBuf};
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::file::WRITE_CHUNK;

/// Bytes of a slot's data area: an append buffer (`WRITE_CHUNK` and two
/// blocks of at most 4 KiB).
pub const SLOT_DATA: usize = WRITE_CHUNK + 8192;
const HEADER_PAGE: usize = 4096;
const SLOT_BYTES: usize = HEADER_PAGE + SLOT_DATA;
/// Most append buffers one mount can hold at once (the mapping reserves
/// address space for this many; memory is taken only by slots in use).
pub const MAX_SLOTS: usize = 4096;
/// Largest page of the file system the memory is on (a hugetlbfs of 2 MiB
/// pages); a larger one would make every buffer take a page of its own.
const MAX_FS_PAGE: usize = 2 << 20;
const HEADER_LEN: usize = 128;
const CRC_AT: usize = 124;
const MAGIC: [u8; 8] = *b"BFSUNSY1";
const VERSION: u32 = 1;
/// Free slots kept with their memory for the next buffers (at most 128
/// MiB); the memory of further ones goes back to the system. With 8, a
/// db_bench fillseq spent 8% of its CPU zeroing slots it had just freed
/// (files close and open in bursts of more than 8 buffers).
const KEEP_FREE: usize = 32;
/// The same on hugepages, which are scarcer (8 slots of 6 MiB).
const KEEP_FREE_HUGE: usize = 8;

const _: () = assert!(SLOT_BYTES.is_multiple_of(4096));
const _: () = assert!(2 * HEADER_LEN <= HEADER_PAGE);

/// Whose unsynced memory a header is: this boot of the machine, this
/// BlobFS, this mount of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The machine's boot id.
    pub boot: [u8; 16],
    /// The BlobFS's id.
    pub fs: [u8; 16],
    /// The mount generation.
    pub gen: u64,
}

/// One slot's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Who wrote it.
    pub owner: Owner,
    /// The file's blob.
    pub blob: u64,
    /// Order of the slot's header writes (the newer of its two copies
    /// wins; a file's slots never hold the same bytes, so their order
    /// does not matter).
    pub seq: u64,
    /// File offset of data byte 0.
    pub file_off: u64,
    /// Data bytes that are the file's.
    pub used: u64,
    /// The file's length.
    pub file_len: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..32].copy_from_slice(&self.owner.boot);
        b[32..48].copy_from_slice(&self.owner.fs);
        b[48..56].copy_from_slice(&self.owner.gen.to_le_bytes());
        b[56..64].copy_from_slice(&self.blob.to_le_bytes());
        b[64..72].copy_from_slice(&self.seq.to_le_bytes());
        b[72..80].copy_from_slice(&self.file_off.to_le_bytes());
        b[80..88].copy_from_slice(&self.used.to_le_bytes());
        b[88..96].copy_from_slice(&self.file_len.to_le_bytes());
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The header in `b`, if it is one (magic, version, crc).
    fn decode(b: &[u8]) -> Option<Header> {
        let b: &[u8; HEADER_LEN] = b.get(..HEADER_LEN)?.try_into().ok()?;
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(b[CRC_AT..].try_into().expect("4 bytes"));
        if b[0..8] != MAGIC
            || b[8..12] != VERSION.to_le_bytes()
            || crc != crc32c::crc32c(&b[..CRC_AT])
        {
            return None;
        }
        Some(Header {
            owner: Owner {
                boot: b[16..32].try_into().expect("16 bytes"),
                fs: b[32..48].try_into().expect("16 bytes"),
                gen: u64_at(48),
            },
            blob: u64_at(56),
            seq: u64_at(64),
            file_off: u64_at(72),
            used: u64_at(80),
            file_len: u64_at(88),
        })
    }

    /// The newer valid header of a header page's two copies.
    fn newest(page: &[u8]) -> Option<(usize, Header)> {
        let a = Header::decode(&page[..HEADER_LEN]).map(|h| (0, h));
        let b = Header::decode(&page[HEADER_LEN..2 * HEADER_LEN]).map(|h| (1, h));
        match (a, b) {
            (Some(a), Some(b)) => Some(if b.1.seq > a.1.seq { b } else { a }),
            (a, b) => a.or(b),
        }
    }
}

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

/// Why a record written by `found` is not this mount's to apply (`here` is
/// the device's boot, file system and generation), or `None` when it is.
pub fn stale_reason(found: &Owner, here: &Owner) -> Option<String> {
    if found.boot != here.boot {
        Some("written before the machine rebooted".into())
    } else if found.fs != here.fs {
        Some(format!(
            "written for another file system (id {}, this one is {})",
            hex(&found.fs),
            hex(&here.fs)
        ))
    } else if found.gen != here.gen {
        Some(format!(
            "written by mount generation {}, not by the last mount ({})",
            found.gen, here.gen
        ))
    } else {
        None
    }
}

/// A slot found with a valid header.
#[derive(Clone, Copy, Debug)]
pub struct Record {
    /// The slot.
    pub slot: u32,
    /// Its newest valid header.
    pub header: Header,
}

/// This machine's boot id (zeroes where the kernel does not say).
pub fn boot_id() -> [u8; 16] {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    parse_uuid(text.trim()).unwrap_or([0; 16])
}

fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = s.bytes().filter(|c| *c != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// 16 random bytes (a new BlobFS's id).
pub fn random_id() -> Result<[u8; 16]> {
    let mut id = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|f| f.read_exact_at(&mut id, 0))
        .map_err(|e| os_err("reading /dev/urandom".into(), e))?;
    Ok(id)
}

/// Hex of an id, for messages.
pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
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

/// Opens (creating it) the unsynced memory at `p` and locks it for as long
/// as this process has it: what a live owner holds is never collected as
/// an orphan. Another process's collector may unlink the file between our
/// open and our lock; then the file is opened again.
fn open_locked(p: &Path) -> Result<FileLock> {
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
fn collect_orphans(ours: &Path) {
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
fn stride_of(f: &File, path: &Path) -> Result<usize> {
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
fn scan_file(f: &File, path: &Path) -> Result<Vec<Record>> {
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

struct Slots {
    /// Free slots with their memory (at most `KEEP_FREE`): handed out
    /// first, so a new buffer costs no zeroing of 4 MiB.
    free_populated: Vec<u32>,
    /// Free slots whose memory went back to the system.
    free_bare: Vec<u32>,
    /// Slots below this have been handed out at least once.
    next_new: u32,
    /// Which slots have memory behind them (allocated, not punched).
    populated: Vec<bool>,
    /// Each populated slot's DMA mapping, for devices that need one; dropped
    /// before the slot's memory is punched.
    mapped: Vec<Option<DmaMapping>>,
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

    /// A buffer of `len` bytes (at most [`SLOT_DATA`]) in a free slot with
    /// no header. Its bytes are stale: the appender writes before it reads.
    pub fn alloc(self: &Arc<Self>, len: usize) -> Result<DmaBuf> {
        if len > SLOT_DATA {
            return Err(Error::InvalidArgument(format!(
                "append buffer of {len} bytes: at most {SLOT_DATA}"
            )));
        }
        let slot = {
            let mut s = self.slots.lock();
            match s.free_populated.pop().or_else(|| s.free_bare.pop()) {
                Some(slot) => slot,
                None if (s.next_new as usize) < MAX_SLOTS => {
                    s.next_new += 1;
                    s.next_new - 1
                }
                None => {
                    return Err(Error::NoSpace(
                        "unsynced memory".into(),
                        blobstore::Error::NoSpace(format!(
                            "all {MAX_SLOTS} append buffers are in use (files written and \
                             not synced)"
                        )),
                    ))
                }
            }
        };
        let iova = match self.populate(slot) {
            Ok(iova) => iova,
            Err(e) => {
                self.free_slot(slot);
                return Err(e);
            }
        };
        let ptr = self.slot_ptr(slot);
        // SAFETY: `ptr + HEADER_PAGE` is page-aligned (slots and the header
        // page are page multiples), inside the mapping, backed by memory
        // (populated above), and this slot is out of the free list until
        // the release runs; its DMA mapping (if any) covers the slot and
        // is dropped only when the slot's memory goes, which a slot in use
        // never does.
        unsafe {
            DmaBuf::from_external(
                NonNull::new_unchecked(ptr.add(HEADER_PAGE)),
                SLOT_DATA,
                len,
                iova.map(|i| i.offset(HEADER_PAGE as u64)),
                Box::new(SlotRelease {
                    region: self.clone(),
                    slot,
                }),
            )
        }
        .map_err(|e| Error::store("unsynced memory", e))
    }

    /// Gives the slot memory from tmpfs (or hugetlbfs) up front, so running
    /// out of it is a clear error here rather than a SIGBUS at the first
    /// append, and maps it for DMA where the device wants that: the slot's
    /// IOVA, if it has one.
    fn populate(&self, slot: u32) -> Result<Option<blobstore::device::Iova>> {
        if !self.slots.lock().populated[slot as usize] {
            self.allocate(slot)?;
        }
        let mut s = self.slots.lock();
        if s.mapped[slot as usize].is_none() {
            if let Some(dev) = &self.dma {
                let ptr = NonNull::new(self.slot_ptr(slot)).expect("inside the mapping");
                // SAFETY: the slot is populated, and its mapping is dropped
                // (`free_slot`, `reset`, drop) before its memory is punched
                // or unmapped.
                s.mapped[slot as usize] = unsafe { dev.map_dma(ptr, self.stride) }
                    .map_err(|e| Error::store("mapping an append buffer for DMA", e))?;
            }
        }
        Ok(s.mapped[slot as usize].as_ref().map(DmaMapping::iova))
    }

    fn allocate(&self, slot: u32) -> Result<()> {
        let at = slot as usize * self.stride;
        // SAFETY: fallocate on an open descriptor; no memory is passed.
        let rc =
            unsafe { libc::fallocate(self.file.as_raw_fd(), 0, at as i64, self.stride as i64) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            let hint = if self.stride > SLOT_BYTES {
                " (hugepages: reserve more with `nvme-setup hugepages`, or set \
                 BLOBSTACK_UNSYNCED_DIR=/dev/shm)"
            } else {
                ""
            };
            return Err(Error::NoSpace(
                "unsynced memory".into(),
                blobstore::Error::NoSpace(format!("no room for an append buffer: {e}{hint}")),
            ));
        }
        // Map the slot's pages in one call rather than one fault per page
        // (best effort: older kernels lack it, and faults then do it).
        // SAFETY: the range is inside our mapping and backed (allocated
        // above); the advice changes no contents.
        unsafe {
            libc::madvise(
                self.slot_ptr(slot).cast(),
                self.stride,
                libc::MADV_POPULATE_WRITE,
            );
        }
        self.slots.lock().populated[slot as usize] = true;
        Ok(())
    }

    fn free_slot(&self, slot: u32) {
        let mut s = self.slots.lock();
        let mut keep = s.populated[slot as usize] && s.free_populated.len() < self.keep_free;
        if s.populated[slot as usize] && !keep {
            // The device lets go of the memory before it goes.
            s.mapped[slot as usize] = None;
            keep = self
                .punch(slot as usize * self.stride, self.stride)
                .is_err();
        }
        if keep {
            s.free_populated.push(slot);
        } else {
            s.populated[slot as usize] = false;
            s.free_bare.push(slot);
        }
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

    fn clear_header(&self, slot: u32) {
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

/// Gives a slot back when the last reference to its buffer goes.
struct SlotRelease {
    region: Arc<Unsynced>,
    slot: u32,
}

impl DmaRelease for SlotRelease {
    fn release(&mut self) {
        if !self.region.keep.load(Ordering::Acquire) {
            self.region.clear_header(self.slot);
            self.region.free_slot(self.slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(gen: u64) -> Owner {
        Owner {
            boot: [1; 16],
            fs: [2; 16],
            gen,
        }
    }

    #[test]
    fn header_round_trips_and_refuses_damage() {
        let h = Header {
            owner: owner(7),
            blob: 42,
            seq: 9,
            file_off: 4096,
            used: 100,
            file_len: 4196,
        };
        let b = h.encode();
        assert_eq!(Header::decode(&b), Some(h));
        for i in [0, 9, 20, 60, 100, 125] {
            let mut bad = b;
            bad[i] ^= 1;
            assert_eq!(Header::decode(&bad), None, "byte {i} flipped");
        }
        assert_eq!(Header::decode(&[0u8; HEADER_LEN]), None);
    }

    #[test]
    fn a_torn_header_write_leaves_the_previous_one() {
        let u = Arc::new(Unsynced::open(None, None).unwrap());
        u.reset(owner(3)).unwrap();
        let mut buf = u.alloc(8192).unwrap();
        buf[..10].copy_from_slice(b"0123456789");
        u.describe(&buf, 5, 0, 4, 4);
        u.describe(&buf, 5, 0, 10, 10);
        let recs = u.records().unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!((recs[0].header.used, recs[0].header.file_len), (10, 10));
        // A kill in the middle of the next header write: that copy is torn.
        let slot = recs[0].slot;
        let copy = (u.next_seq[slot as usize].load(Ordering::Relaxed) & 1) as usize;
        // SAFETY: the test owns the slot's buffer; a byte of the header
        // copy the next write would go to.
        unsafe { *u.slot_ptr(slot).add(copy * HEADER_LEN + 70) ^= 0xff };
        let recs = u.records().unwrap();
        assert_eq!(recs[0].header.used, 10, "the intact copy is still found");
        let mut data = [0u8; 10];
        u.read_data(&recs[0], &mut data).unwrap();
        assert_eq!(&data, b"0123456789");
        u.retire(&buf);
        assert!(u.records().unwrap().is_empty());
    }

    #[test]
    fn freed_buffers_clear_their_headers_unless_kept() {
        let u = Arc::new(Unsynced::open(None, None).unwrap());
        u.reset(owner(1)).unwrap();
        let a = u.alloc(4096).unwrap();
        let b = u.alloc(4096).unwrap();
        u.describe(&a, 1, 0, 1, 1);
        u.describe(&b, 2, 0, 1, 1);
        drop(a);
        assert_eq!(u.records().unwrap().len(), 1);
        u.keep_on_free();
        drop(b);
        let recs = u.records().unwrap();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].header.blob, 2);
    }

    #[test]
    fn orphans_with_nothing_to_write_back_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(format!("blobstack-{n}.unsynced"));
        // Left by a process that exited with every file synced.
        drop(Unsynced::open(Some(&path("empty")), None).unwrap());
        std::fs::write(path("empty"), b"").unwrap();
        // Left by a process that died with unsynced data.
        let kept = Arc::new(Unsynced::open(Some(&path("data")), None).unwrap());
        kept.reset(owner(1)).unwrap();
        let buf = kept.alloc(4096).unwrap();
        kept.describe(&buf, 7, 0, 10, 10);
        kept.keep_on_free();
        drop(buf);
        drop(kept);
        // Held by a live owner, with nothing in it.
        let live = Unsynced::open(Some(&path("live")), None).unwrap();
        // Not ours at all.
        std::fs::write(dir.path().join("other.txt"), b"x").unwrap();
        let me = Unsynced::open(Some(&path("me")), None).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "blobstack-data.unsynced",
                "blobstack-live.unsynced",
                "blobstack-me.unsynced",
                "other.txt"
            ]
        );
        drop((live, me));
    }

    /// A device on the NVMe driver's software controller, which reaches
    /// memory only through the IOVAs its pool mapped.
    fn soft_nvme(
        bytes: usize,
    ) -> (
        Arc<blobstore::NvmeController>,
        Arc<dyn blobstore::BlockDevice>,
    ) {
        let (_model, ctrl) =
            blobstore::device::nvme::soft::SoftController::attach_with(5, 0, &[(4096, bytes)])
                .unwrap();
        let dev = blobstore::NvmeDevice::from_controller(ctrl.clone(), 1).unwrap();
        (ctrl, Arc::new(dev))
    }

    #[test]
    fn slots_are_dma_mapped_for_the_device_and_unmapped_before_they_go() {
        let (ctrl, dev) = soft_nvme(16 << 20);
        let u = Arc::new(Unsynced::open(None, Some(dev.clone())).unwrap());
        u.reset(owner(1)).unwrap();
        let mut buf = u.alloc(8192).unwrap();
        let iova = buf.iova().expect("a slot mapped for the device");
        assert_eq!(
            ctrl.pool().translate(iova.0, SLOT_DATA),
            Some(buf.as_ptr().cast_mut()),
            "the device sees the slot's own bytes"
        );
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i * 7 % 251) as u8;
        }
        let want = buf.to_vec();
        // The driver sends the slot itself (its IOVA); the software
        // controller would panic on memory the pool did not map.
        let ch = blobstore::device::channel(&dev).unwrap();
        let buf = blobstore::block_on(ch.write(8, buf)).unwrap();
        let back = blobstore::block_on(ch.read(8, dev.alloc_buf(8192).unwrap())).unwrap();
        assert_eq!(&back[..], &want[..]);
        drop(buf);
        // Slots beyond those kept populated give their memory back, and
        // the device loses them first.
        let bufs: Vec<DmaBuf> = (0..KEEP_FREE + 2).map(|_| u.alloc(4096).unwrap()).collect();
        let iovas: Vec<_> = bufs.iter().map(|b| b.iova().unwrap()).collect();
        drop(bufs);
        let mapped = iovas
            .iter()
            .filter(|i| ctrl.pool().translate(i.0, 4096).is_some())
            .count();
        assert_eq!(mapped, KEEP_FREE, "mapped slots after the frees");
        drop(u);
        assert!(
            iovas
                .iter()
                .all(|i| ctrl.pool().translate(i.0, 4096).is_none()),
            "the memory is unmapped when it goes"
        );
    }

    #[test]
    fn a_blobfs_on_nvme_appends_into_mapped_slots_and_reads_back() {
        let (_ctrl, dev) = soft_nvme(64 << 20);
        let fs = crate::BlobFs::mkfs(
            dev.clone(),
            crate::MkfsOptions::default(),
            crate::MountOptions::default(),
        )
        .unwrap();
        let data: Vec<u8> = (0..(9 << 20) + 12_345).map(|i| (i % 241) as u8).collect();
        {
            let f = fs
                .open("wal", crate::OpenOptions::create_truncate())
                .unwrap();
            for piece in data.chunks(100_003) {
                f.append(piece).unwrap();
            }
            f.sync().unwrap();
        }
        fs.unmount().unwrap();
        let fs = crate::BlobFs::mount(dev, crate::MountOptions::default()).unwrap();
        let got = fs
            .open("wal", crate::OpenOptions::read())
            .unwrap()
            .read_all()
            .unwrap();
        assert!(got == data, "file bytes after remount");
    }

    #[test]
    fn boot_ids_parse() {
        assert_eq!(
            parse_uuid("00112233-4455-6677-8899-aabbccddeeff"),
            Some([
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff
            ])
        );
        assert_eq!(parse_uuid("nonsense"), None);
    }
}
