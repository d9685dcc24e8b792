//! `PowerLossDevice`: a wrapper around a file device that records, in a side
//! log next to the image, how to undo every write that no completed flush
//! has made durable, and [`recover`], which later plays a power cut from
//! that log.
//!
//! Select it from a spec with `powerloss=on`, e.g.
//! `file:/x.img?size=4G&powerloss=on` (only in a build with the `testing`
//! feature: without it the spec parser refuses the option); the log is
//! `/x.img.powerloss` ([`log_path`]), its bytes laid out by
//! [`log_format`].
//!
//! Invariants:
//! - Before a write, write-zeroes or unmap is handed to the device, the old
//!   contents of its range are appended to the log (a plain `write()`, so the
//!   record survives a SIGKILL of the process right after; the machine itself
//!   is assumed not to crash).
//! - A write is durable once a flush submitted after it completed has itself
//!   completed. When every logged write is durable the log is cut back to its
//!   header; otherwise a `flushed` record lists the writes that became
//!   durable.
//! - [`recover`], run while no process has the image open, treats every
//!   write that is not durable as a power cut would: undone, kept, or torn
//!   (each sector old or new at random, from a seed), processing the undo
//!   records newest first, so every outcome is a state a disk with a volatile
//!   write cache could be left in. It then deletes the log.
//! - Opening a device whose log still holds writes that are not durable is
//!   refused (run [`recover`] first), so one crash is never mixed into the
//!   next run's log.
//! - Concurrent overlapping writes (which the blobstore never issues) may
//!   log an old content that already includes the other write.
//!
//! Test only: `powerloss_cut_after=<n>` (with `powerloss_cut_when=before`,
//! the default, or `after`) makes the process SIGKILL itself at the n-th
//! write, write-zeroes, unmap or flush submitted since the device opened
//! ([`PowerCut`]), so a crash test can land its power cut in the middle of
//! a sync, a metadata update or a compaction rather than wherever a timer
//! happens to fire. It kills the whole process that opened the device: use
//! it only in a process that exists to be killed.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

pub mod log_format;

use self::log_format::{
    decode_header, decode_record, encode_header, encode_record, Record, RecordKind, HEADER_LEN,
    MAX_PAYLOAD,
};
use crate::device::{
    BlockDevice, ChannelBackend, DeviceId, DmaBuf, FileLock, Geometry, IoKind, IoOp, Tag,
};
use crate::error::{Error, Result};
use crate::util::SplitMix64;

/// The power-loss log of the image at `image`: the image's path with
/// `.powerloss` appended.
pub fn log_path(image: &Path) -> PathBuf {
    let mut s = OsString::from(image.as_os_str());
    s.push(".powerloss");
    PathBuf::from(s)
}

/// A self-inflicted power cut (test only): the process that opened the
/// device SIGKILLs itself when the `after`-th write-like op or flush since
/// the open is submitted, so that op is the one in flight at the cut.
/// Spec options `powerloss_cut_after=<n>` and
/// `powerloss_cut_when=before|after`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PowerCut {
    /// Which op, counting from 1, triggers the cut (writes, write-zeroes,
    /// unmaps and flushes count; reads do not).
    pub after: u64,
    /// `false` (`before`): the op is not handed to the device (a write has
    /// its undo record logged first). `true` (`after`): the op is handed to
    /// the device and pushed to the kernel, then the process dies with it in
    /// flight.
    pub issued: bool,
}

/// Kills this process at once (SIGKILL: no destructors, no flushes), as a
/// power cut would stop it. Only [`PowerCut`] calls it.
fn cut_power_now() -> ! {
    // SAFETY: kill and getpid take no pointers.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    // SIGKILL cannot be caught; the process stops before kill returns to
    // user code in practice, but nothing must run on if it did not yet.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// Bookkeeping shared by every channel of one device.
struct LogState {
    /// The log, opened for appending.
    file: File,
    /// Sequence number of the next logged write.
    next_seq: u64,
    /// Logged writes not yet made durable (in flight, completed, or covered
    /// by a flush that has not completed).
    outstanding: u64,
    /// Completed writes that no flush has been submitted for.
    completed: Vec<u64>,
}

struct Shared {
    /// The image, opened without O_DIRECT, to read old contents.
    image: File,
    log_path: PathBuf,
    log: Mutex<LogState>,
    /// The self-inflicted power cut, if any.
    cut: Option<PowerCut>,
    /// Write-like ops and flushes submitted since the open.
    ops: AtomicU64,
}

impl Shared {
    /// Counts one write-like op or flush; true when it is the one the
    /// power cut waits for.
    fn is_cut_op(&self) -> bool {
        let n = self.ops.fetch_add(1, Ordering::Relaxed) + 1;
        self.cut.is_some_and(|c| c.after == n)
    }

    fn log_err(&self, what: &str, e: std::io::Error) -> Error {
        Error::Os {
            context: format!("{what} power-loss log {}", self.log_path.display()),
            source: e,
        }
    }

    /// Appends undo records for a write-like op at byte `offset`, `len`
    /// bytes; returns its sequence number.
    fn log_write(&self, kind: IoKind, offset: u64, len: u64) -> Result<u64> {
        let mut st = self.log.lock();
        let seq = st.next_seq;
        let mut chunk = vec![0u8; (len as usize).min(MAX_PAYLOAD)];
        let mut out = Vec::with_capacity(chunk.len() + 64);
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = ((end - pos) as usize).min(MAX_PAYLOAD);
            let buf = &mut chunk[..n];
            self.image.read_exact_at(buf, pos).map_err(|e| Error::Os {
                context: format!(
                    "reading the old contents of bytes {pos}+{n} for the power-loss log {}",
                    self.log_path.display()
                ),
                source: e,
            })?;
            let zero = buf.iter().all(|&b| b == 0);
            // Zeroing a range that holds zeroes changes nothing to undo.
            if !(zero && kind != IoKind::Write) {
                encode_record(
                    &Record {
                        kind: if zero {
                            RecordKind::UndoZero
                        } else {
                            RecordKind::Undo
                        },
                        seq,
                        offset: pos,
                        range_len: n as u64,
                        payload: if zero { &[] } else { buf },
                    },
                    &mut out,
                );
            }
            pos += n as u64;
            if out.len() >= MAX_PAYLOAD || pos >= end {
                st.file
                    .write_all(&out)
                    .map_err(|e| self.log_err("appending to", e))?;
                out.clear();
            }
        }
        st.next_seq += 1;
        st.outstanding += 1;
        debug_assert!(st.outstanding < st.next_seq);
        Ok(seq)
    }

    /// A write finished (successfully or not): a later flush covers it.
    fn write_done(&self, seq: u64) {
        self.log.lock().completed.push(seq);
    }

    /// The writes a flush submitted now covers.
    fn flush_started(&self) -> Vec<u64> {
        std::mem::take(&mut self.log.lock().completed)
    }

    /// A flush failed: its writes wait for the next one.
    fn flush_failed(&self, covered: Vec<u64>) {
        self.log.lock().completed.extend(covered);
    }

    /// A flush completed: its writes are durable.
    fn flush_done(&self, covered: &[u64]) -> Result<()> {
        let mut st = self.log.lock();
        // Every write a flush covers was logged and is not durable yet.
        debug_assert!(st.outstanding >= covered.len() as u64);
        st.outstanding = st.outstanding.saturating_sub(covered.len() as u64);
        if st.outstanding == 0 {
            // Everything logged is durable: back to an empty log.
            st.file
                .set_len(HEADER_LEN as u64)
                .map_err(|e| self.log_err("truncating", e))?;
        } else if !covered.is_empty() {
            let payload: Vec<u8> = covered.iter().flat_map(|s| s.to_le_bytes()).collect();
            let mut out = Vec::new();
            for part in payload.chunks(MAX_PAYLOAD) {
                encode_record(
                    &Record {
                        kind: RecordKind::Flushed,
                        seq: 0,
                        offset: 0,
                        range_len: 0,
                        payload: part,
                    },
                    &mut out,
                );
            }
            st.file
                .write_all(&out)
                .map_err(|e| self.log_err("appending to", e))?;
        }
        Ok(())
    }
}

/// A file device whose writes are logged for [`recover`]; see the module
/// docs.
pub struct PowerLossDevice {
    inner: Arc<dyn BlockDevice>,
    name: String,
    id: DeviceId,
    shared: Arc<Shared>,
}

impl PowerLossDevice {
    /// Wraps `inner`, the device opened on the file `image`, logging to
    /// [`log_path`]`(image)`. `name` is the spec shown in messages. Fails
    /// when the log holds writes that are not durable (run [`recover`]).
    pub fn new(image: &Path, inner: Arc<dyn BlockDevice>, name: String) -> Result<PowerLossDevice> {
        Self::with_cut(image, inner, name, None)
    }

    /// [`new`](Self::new), with an optional self-inflicted power cut
    /// (test only: it SIGKILLs the process; see [`PowerCut`]).
    pub fn with_cut(
        image: &Path,
        inner: Arc<dyn BlockDevice>,
        name: String,
        cut: Option<PowerCut>,
    ) -> Result<PowerLossDevice> {
        let log_path = log_path(image);
        let sector = inner.geometry().block_size;
        if let Some(pending) = pending_writes(&log_path)? {
            if pending > 0 {
                return Err(Error::Busy(format!(
                    "the power-loss log {} holds {pending} write(s) that no flush made durable, \
                     left by a process that stopped: run power-loss recovery on {} first \
                     (or delete the log to treat the stop as a process crash only)",
                    log_path.display(),
                    image.display()
                )));
            }
        }
        let os = |what: &str, p: &Path| {
            let what = what.to_string();
            let p = p.display().to_string();
            move |e| Error::Os {
                context: format!("{what} {p}"),
                source: e,
            }
        };
        let image_file = File::open(image).map_err(os("opening for the power-loss log", image))?;
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o644)
            .open(&log_path)
            .map_err(os("creating the power-loss log", &log_path))?;
        file.write_all(&encode_header(sector))
            .map_err(os("writing the power-loss log", &log_path))?;
        // Appends go to the end even after a truncation to the header.
        // SAFETY: fcntl on a descriptor we own, no pointers.
        let fd = file.as_raw_fd();
        let rc = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            if flags < 0 {
                flags
            } else {
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_APPEND)
            }
        };
        if rc < 0 {
            return Err(Error::last_os(format!(
                "setting O_APPEND on the power-loss log {}",
                log_path.display()
            )));
        }
        Ok(PowerLossDevice {
            inner,
            name,
            id: DeviceId::fresh(),
            shared: Arc::new(Shared {
                image: image_file,
                log_path,
                log: Mutex::new(LogState {
                    file,
                    next_seq: 1,
                    outstanding: 0,
                    completed: Vec::new(),
                }),
                cut,
                ops: AtomicU64::new(0),
            }),
        })
    }

    /// The log this device writes.
    pub fn log_path(&self) -> &Path {
        &self.shared.log_path
    }
}

impl BlockDevice for PowerLossDevice {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn id(&self) -> DeviceId {
        self.id
    }
    fn name(&self) -> String {
        self.name.clone()
    }
    /// The image's: until [`recover`] plays the power cut (which discards
    /// it, as a power cut loses memory), a killed owner's unsynced data is
    /// there for the next, as on the plain device.
    fn unsynced_memory(&self) -> Option<PathBuf> {
        self.inner.unsynced_memory()
    }
    fn new_backend(&self) -> Result<Box<dyn ChannelBackend>> {
        Ok(Box::new(PowerLossBackend {
            inner: self.inner.new_backend()?,
            shared: self.shared.clone(),
            block_size: self.inner.geometry().block_size as u64,
            tags: HashMap::new(),
        }))
    }
    fn alloc_buf(&self, len_bytes: usize) -> Result<DmaBuf> {
        self.inner.alloc_buf(len_bytes)
    }
    fn alloc_buf_for_overwrite(&self, len_bytes: usize) -> Result<DmaBuf> {
        self.inner.alloc_buf_for_overwrite(len_bytes)
    }
}

/// What an in-flight tag is.
enum TagInfo {
    /// A logged write-like op.
    Write(u64),
    /// A flush and the writes it covers.
    Flush(Vec<u64>),
}

struct PowerLossBackend {
    inner: Box<dyn ChannelBackend>,
    shared: Arc<Shared>,
    block_size: u64,
    tags: HashMap<Tag, TagInfo>,
}

impl PowerLossBackend {
    /// The power cut of [`PowerCut`]: for `issued`, hands `op` to the
    /// device and lets the inner backend push it to the kernel (its
    /// completions, and any others, are dropped: the process ends here);
    /// then SIGKILLs the process.
    fn cut_power(&mut self, tag: Tag, op: &IoOp) -> ! {
        if self.shared.cut.is_some_and(|c| c.issued) && self.inner.submit(tag, op).is_ok() {
            self.inner.reap(&mut |_, _| {});
        }
        cut_power_now()
    }
}

impl ChannelBackend for PowerLossBackend {
    fn submit(&mut self, tag: Tag, op: &IoOp) -> Result<()> {
        match op.kind {
            IoKind::Read => self.inner.submit(tag, op),
            IoKind::Write | IoKind::WriteZeroes | IoKind::Unmap => {
                let cut = self.shared.is_cut_op();
                let seq = self.shared.log_write(
                    op.kind,
                    op.lba.get() * self.block_size,
                    op.blocks * self.block_size,
                )?;
                if cut {
                    self.cut_power(tag, op);
                }
                if let Err(e) = self.inner.submit(tag, op) {
                    // Not started: undoing it later restores what is there.
                    self.shared.write_done(seq);
                    return Err(e);
                }
                self.tags.insert(tag, TagInfo::Write(seq));
                Ok(())
            }
            IoKind::Flush => {
                let cut = self.shared.is_cut_op();
                let covered = self.shared.flush_started();
                if cut {
                    self.cut_power(tag, op);
                }
                if let Err(e) = self.inner.submit(tag, op) {
                    self.shared.flush_failed(covered);
                    return Err(e);
                }
                self.tags.insert(tag, TagInfo::Flush(covered));
                Ok(())
            }
        }
    }

    fn reap(&mut self, done: &mut dyn FnMut(Tag, Result<()>)) -> usize {
        let shared = &self.shared;
        let tags = &mut self.tags;
        self.inner.reap(&mut |tag, result| match tags.remove(&tag) {
            // A failed write may have changed the range all the same; it
            // stays undoable until a flush covers it.
            Some(TagInfo::Write(seq)) => {
                shared.write_done(seq);
                done(tag, result);
            }
            Some(TagInfo::Flush(covered)) => match result {
                Ok(()) => done(tag, shared.flush_done(&covered)),
                Err(e) => {
                    shared.flush_failed(covered);
                    done(tag, Err(e));
                }
            },
            None => done(tag, result),
        })
    }
}

/// Reads the log at `path` if it exists: how many logged writes no flush
/// made durable.
fn pending_writes(path: &Path) -> Result<Option<u64>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::Os {
                context: format!("reading the power-loss log {}", path.display()),
                source: e,
            })
        }
    };
    let log = parse_log(&bytes, path)?;
    let durable: HashSet<u64> = log.durable;
    let pending: HashSet<u64> = log
        .undo
        .iter()
        .map(|r| r.seq)
        .filter(|s| !durable.contains(s))
        .collect();
    Ok(Some(pending.len() as u64))
}

/// A parsed log.
struct Log<'a> {
    sector: u32,
    /// Undo and undo-zero records, oldest first.
    undo: Vec<Record<'a>>,
    /// Writes a completed flush made durable.
    durable: HashSet<u64>,
    /// The log ends inside a record (its append was cut short, so its write
    /// was never issued).
    torn_tail: bool,
}

fn parse_log<'a>(bytes: &'a [u8], path: &Path) -> Result<Log<'a>> {
    let location = format!("power-loss log {}", path.display());
    // A log created but killed before its header was written had no write
    // issued through it.
    if bytes.is_empty() {
        return Ok(Log {
            sector: 512,
            undo: Vec::new(),
            durable: HashSet::new(),
            torn_tail: false,
        });
    }
    let sector = decode_header(bytes, &location)?;
    let mut log = Log {
        sector,
        undo: Vec::new(),
        durable: HashSet::new(),
        torn_tail: false,
    };
    let mut pos = HEADER_LEN;
    while pos < bytes.len() {
        let at = format!("{location} at byte {pos}");
        match decode_record(&bytes[pos..], &at)? {
            None => {
                log.torn_tail = true;
                break;
            }
            Some((rec, len)) => {
                match rec.kind {
                    RecordKind::Flushed => log.durable.extend(
                        rec.payload
                            .chunks_exact(8)
                            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
                    ),
                    RecordKind::Undo | RecordKind::UndoZero => {
                        if !rec.range_len.is_multiple_of(sector as u64)
                            || !rec.offset.is_multiple_of(sector as u64)
                        {
                            return Err(Error::corrupt(
                                at,
                                format!(
                                    "undo range {}+{} is not in whole {sector}-byte sectors",
                                    rec.offset, rec.range_len
                                ),
                            ));
                        }
                        log.undo.push(rec)
                    }
                }
                pos += len;
            }
        }
    }
    Ok(log)
}

/// How long [`recover`] waits for the image's lock to be released.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What [`recover`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Writes in the log that no completed flush had made durable.
    pub writes: u64,
    /// Of those, writes rolled back entirely (never reached the media).
    pub undone: u64,
    /// Writes kept entirely (reached the media before the cut).
    pub kept: u64,
    /// Writes torn: some sectors old, some new.
    pub torn: u64,
    /// Writes the log shows a completed flush made durable (left alone).
    pub durable: u64,
    /// Bytes written back to the image.
    pub bytes_restored: u64,
    /// The log ended inside a record (an append cut short by the kill; its
    /// write was never issued).
    pub torn_tail: bool,
    /// The killed owner had left unsynced data in memory, which the cut
    /// discarded.
    pub unsynced_memory_lost: bool,
}

impl std::fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} unflushed write(s): {} undone, {} kept, {} torn; {} durable; {} bytes restored{}",
            self.writes,
            self.undone,
            self.kept,
            self.torn,
            self.durable,
            self.bytes_restored,
            if self.torn_tail {
                "; log ended inside a record"
            } else {
                ""
            }
        )
    }
}

/// What the power cut does to one write.
#[derive(Clone, Copy)]
enum Fate {
    Undo,
    Keep,
    Tear,
}

/// Simulates a power cut on the image at `image` from its power-loss log
/// ([`log_path`]): every write no completed flush made durable is undone,
/// kept or torn per sector, chosen from `seed`; then the image is synced and
/// the log deleted. Run it while no process has the image open (it takes the
/// same lock as the file device, waits a few seconds for a process that was
/// just killed to release it, and fails with [`Error::Busy`] otherwise).
/// A missing log, or one whose records fail their checks, is an error and
/// leaves the image untouched.
pub fn recover(image: &Path, seed: u64) -> Result<RecoveryReport> {
    let path = log_path(image);
    let bytes = std::fs::read(&path).map_err(|e| Error::Os {
        context: format!(
            "reading the power-loss log {} (was {} opened with powerloss=on, and not recovered since?)",
            path.display(),
            image.display()
        ),
        source: e,
    })?;
    let log = parse_log(&bytes, &path)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(|e| Error::Os {
            context: format!("opening {} for power-loss recovery", image.display()),
            source: e,
        })?;
    // A process just killed may hold the lock a moment longer (the kernel
    // tears its io_uring down after it is reaped): wait for that, not for a
    // live owner. The lock is released explicitly when `file` is dropped.
    let file = FileLock::wait_exclusive(file, image, LOCK_WAIT)?;
    let mut report = RecoveryReport {
        torn_tail: log.torn_tail,
        ..RecoveryReport::default()
    };
    let sector = log.sector as usize;
    // The same seed gives the same power cut.
    let mut rng = SplitMix64::new(seed);
    let mut fates: HashMap<u64, Fate> = HashMap::new();
    let mut durable_seen: HashSet<u64> = HashSet::new();
    let os = |what: &str, off: u64, e| Error::Os {
        context: format!(
            "{what} {} at byte {off} during power-loss recovery",
            image.display()
        ),
        source: e,
    };
    let zeroes = vec![0u8; sector];
    for rec in log.undo.iter().rev() {
        if log.durable.contains(&rec.seq) {
            durable_seen.insert(rec.seq);
            continue;
        }
        let fate = *fates
            .entry(rec.seq)
            .or_insert_with(|| match rng.next_u64() % 3 {
                0 => Fate::Undo,
                1 => Fate::Keep,
                _ => Fate::Tear,
            });
        let sectors = (rec.range_len as usize) / sector;
        for i in 0..sectors {
            let restore = match fate {
                Fate::Undo => true,
                Fate::Keep => false,
                Fate::Tear => rng.next_u64() & 1 == 0,
            };
            if !restore {
                continue;
            }
            let old = match rec.kind {
                RecordKind::Undo => &rec.payload[i * sector..(i + 1) * sector],
                _ => &zeroes[..],
            };
            let off = rec.offset + (i * sector) as u64;
            file.write_all_at(old, off)
                .map_err(|e| os("writing", off, e))?;
            report.bytes_restored += sector as u64;
        }
    }
    for fate in fates.values() {
        match fate {
            Fate::Undo => report.undone += 1,
            Fate::Keep => report.kept += 1,
            Fate::Tear => report.torn += 1,
        }
    }
    report.writes = fates.len() as u64;
    report.durable = durable_seen.len() as u64;
    file.sync_all().map_err(|e| os("syncing", 0, e))?;
    // The cut takes the machine's memory with it: the owner's unsynced data
    // (see `BlockDevice::unsynced_memory`) is gone, as after a reboot.
    let unsynced =
        crate::device::unsynced_memory_path(&file.metadata().map_err(|e| os("stat of", 0, e))?);
    match std::fs::remove_file(&unsynced) {
        Ok(()) => report.unsynced_memory_lost = true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Error::Os {
                context: format!("deleting the unsynced memory {}", unsynced.display()),
                source: e,
            })
        }
    }
    std::fs::remove_file(&path).map_err(|e| Error::Os {
        context: format!("deleting the power-loss log {}", path.display()),
        source: e,
    })?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Lba;
    use crate::device::{channel, open_device};
    use crate::exec::block_on;
    use std::sync::atomic::{AtomicU64, Ordering};

    const BS: usize = 4096;
    const SECTORS: usize = 8;

    /// A fresh image path (no file yet) and its cleanup.
    struct Img(PathBuf);
    impl Img {
        fn new() -> Img {
            static N: AtomicU64 = AtomicU64::new(0);
            let p = std::env::temp_dir().join(format!(
                "powerloss-test-{}-{}.img",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_file(&p);
            let _ = std::fs::remove_file(log_path(&p));
            Img(p)
        }
        fn spec(&self) -> String {
            format!("file:{}?size=1M&powerloss=on", self.0.display())
        }
        fn bytes(&self) -> Vec<u8> {
            std::fs::read(&self.0).unwrap()
        }
    }
    impl Drop for Img {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
            let _ = std::fs::remove_file(log_path(&self.0));
        }
    }

    fn buf(dev: &Arc<dyn BlockDevice>, len: usize, byte: u8) -> DmaBuf {
        let mut b = dev.alloc_buf(len).unwrap();
        b.fill(byte);
        b
    }

    /// Opens the image, runs `ops` on its channel, drops the device with no
    /// further flush (the process "stops").
    fn run(img: &Img, ops: impl FnOnce(&Arc<dyn BlockDevice>)) {
        let dev = open_device(&img.spec()).unwrap();
        ops(&dev);
        drop(dev);
    }

    fn write(dev: &Arc<dyn BlockDevice>, sector: u64, n: usize, byte: u8) {
        let ch = channel(dev).unwrap();
        block_on(ch.write(Lba(sector), buf(dev, n * BS, byte))).unwrap();
    }

    fn flush(dev: &Arc<dyn BlockDevice>) {
        block_on(channel(dev).unwrap().flush()).unwrap();
    }

    /// Writes 0x11 over the first `SECTORS` sectors, flushes, overwrites
    /// them with 0x22 and stops without a flush.
    fn flushed_then_overwritten(img: &Img) {
        run(img, |dev| {
            write(dev, 0, SECTORS, 0x11);
            flush(dev);
            write(dev, 0, SECTORS, 0x22);
        });
    }

    /// The fill byte of each of the first `SECTORS` sectors (panics on a
    /// sector that is not uniform: recovery works in whole sectors).
    fn sectors(img: &Img) -> Vec<u8> {
        let b = img.bytes();
        (0..SECTORS)
            .map(|i| {
                let s = &b[i * BS..(i + 1) * BS];
                assert!(s.iter().all(|&x| x == s[0]), "sector {i} is mixed");
                s[0]
            })
            .collect()
    }

    #[test]
    fn spec_round_trips_and_rejects_bad_values() {
        let spec = "file:/tmp/x.img?size=4G&powerloss=on";
        let parsed = DeviceSpec::parse(spec).unwrap();
        assert!(matches!(parsed, DeviceSpec::PowerLoss { cut: None, .. }));
        assert_eq!(parsed.to_string(), spec);
        let spec =
            "file:/tmp/x.img?size=4G&powerloss=on&powerloss_cut_after=17&powerloss_cut_when=after";
        let parsed = DeviceSpec::parse(spec).unwrap();
        assert!(matches!(
            parsed,
            DeviceSpec::PowerLoss {
                cut: Some(PowerCut {
                    after: 17,
                    issued: true
                }),
                ..
            }
        ));
        assert_eq!(parsed.to_string(), spec);
        // `before` is the default.
        assert!(matches!(
            DeviceSpec::parse("file:/x?powerloss=on&powerloss_cut_after=3").unwrap(),
            DeviceSpec::PowerLoss {
                cut: Some(PowerCut {
                    after: 3,
                    issued: false
                }),
                ..
            }
        ));
        for (bad, why) in [
            ("file:/x?powerloss_cut_after=3", "need powerloss=on"),
            (
                "file:/x?powerloss=off&powerloss_cut_after=3",
                "need powerloss=on",
            ),
            (
                "file:/x?powerloss=on&powerloss_cut_after=0",
                "must be a positive number",
            ),
            (
                "file:/x?powerloss=on&powerloss_cut_after=x",
                "must be a positive number",
            ),
            (
                "file:/x?powerloss=on&powerloss_cut_when=after",
                "needs powerloss_cut_after",
            ),
            (
                "file:/x?powerloss=on&powerloss_cut_after=1&powerloss_cut_when=now",
                "must be before or after",
            ),
        ] {
            let err = DeviceSpec::parse(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        assert!(matches!(
            DeviceSpec::parse("file:/tmp/x.img?powerloss=off").unwrap(),
            DeviceSpec::File { .. }
        ));
        let err = DeviceSpec::parse("file:/tmp/x.img?powerloss=yes").unwrap_err();
        assert!(
            err.to_string()
                .contains("powerloss=\"yes\" must be on or off"),
            "{err}"
        );
    }

    use crate::device::DeviceSpec;

    #[test]
    fn flushed_write_survives_every_seed() {
        for seed in 0..20 {
            let img = Img::new();
            run(&img, |dev| {
                write(dev, 0, SECTORS, 0xaa);
                flush(dev);
            });
            let r = recover(&img.0, seed).unwrap();
            assert_eq!(r.writes, 0, "{r}");
            assert_eq!(sectors(&img), vec![0xaa; SECTORS]);
            assert!(!log_path(&img.0).exists());
        }
    }

    #[test]
    fn unflushed_write_comes_back_old_new_or_torn() {
        let (mut old, mut new, mut torn) = (0, 0, 0);
        for seed in 0..30 {
            let img = Img::new();
            flushed_then_overwritten(&img);
            // Before recovery the image holds what the process wrote.
            assert_eq!(sectors(&img), vec![0x22; SECTORS]);
            let r = recover(&img.0, seed).unwrap();
            assert_eq!(r.writes, 1, "{r}");
            let s = sectors(&img);
            assert!(s.iter().all(|&b| b == 0x11 || b == 0x22), "{s:?}");
            if s.iter().all(|&b| b == 0x11) {
                old += 1;
            } else if s.iter().all(|&b| b == 0x22) {
                new += 1;
            } else {
                torn += 1;
                assert_eq!(r.torn, 1, "{r}");
            }
        }
        assert!(
            old > 0 && new > 0 && torn > 0,
            "old {old} new {new} torn {torn}"
        );
    }

    #[test]
    fn overlapping_unflushed_writes_leave_one_of_their_values() {
        let mut seen = HashSet::new();
        for seed in 0..40 {
            let img = Img::new();
            run(&img, |dev| {
                write(dev, 0, SECTORS, 0x11);
                flush(dev);
                write(dev, 0, SECTORS, 0x22);
                write(dev, 2, 4, 0x33);
            });
            recover(&img.0, seed).unwrap();
            let s = sectors(&img);
            for (i, &b) in s.iter().enumerate() {
                let ok = if (2..6).contains(&i) {
                    [0x11, 0x22, 0x33].contains(&b)
                } else {
                    [0x11, 0x22].contains(&b)
                };
                assert!(ok, "sector {i} = {b:#x} in {s:?}");
                seen.insert((i, b));
            }
        }
        // Every value each sector could hold showed up for some seed.
        for i in 2..6 {
            for b in [0x11, 0x22, 0x33] {
                assert!(seen.contains(&(i, b)), "sector {i} never {b:#x}");
            }
        }
    }

    #[test]
    fn zeroes_and_unmap_are_undone_too() {
        let mut old = false;
        for seed in 0..20 {
            let img = Img::new();
            run(&img, |dev| {
                write(dev, 0, SECTORS, 0x44);
                flush(dev);
                let ch = channel(dev).unwrap();
                block_on(ch.write_zeroes(Lba(0), 4)).unwrap();
                block_on(ch.unmap(Lba(4), 4)).unwrap();
            });
            recover(&img.0, seed).unwrap();
            let s = sectors(&img);
            assert!(s.iter().all(|&b| b == 0x44 || b == 0), "{s:?}");
            old |= s.iter().all(|&b| b == 0x44);
        }
        assert!(old, "no seed restored the zeroed sectors");
    }

    #[test]
    fn write_before_a_flush_completes_after_it_is_durable_only_when_covered() {
        // A write completed, flushed; another completed after the flush:
        // only the second is at risk.
        for seed in 0..10 {
            let img = Img::new();
            run(&img, |dev| {
                write(dev, 0, 4, 0x55);
                flush(dev);
                write(dev, 4, 4, 0x66);
            });
            recover(&img.0, seed).unwrap();
            let s = sectors(&img);
            assert_eq!(&s[..4], &[0x55; 4]);
            assert!(s[4..].iter().all(|&b| b == 0x66 || b == 0), "{s:?}");
        }
    }

    #[test]
    fn missing_log_is_a_clear_error() {
        let img = Img::new();
        std::fs::write(&img.0, vec![0u8; 4096]).unwrap();
        let err = recover(&img.0, 1).unwrap_err().to_string();
        assert!(err.contains("reading the power-loss log"), "{err}");
        assert!(err.contains("opened with powerloss=on"), "{err}");
    }

    #[test]
    fn corrupt_log_is_refused_and_the_image_left_alone() {
        let img = Img::new();
        flushed_then_overwritten(&img);
        let lp = log_path(&img.0);
        let mut log = std::fs::read(&lp).unwrap();
        let mid = HEADER_LEN + 100;
        log[mid] ^= 0xff;
        std::fs::write(&lp, &log).unwrap();
        let err = recover(&img.0, 1).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        assert_eq!(sectors(&img), vec![0x22; SECTORS]);
        // A bad header too.
        log[0] = b'X';
        std::fs::write(&lp, &log).unwrap();
        let err = recover(&img.0, 1).unwrap_err().to_string();
        assert!(err.contains("not a power-loss log"), "{err}");
    }

    #[test]
    fn torn_tail_record_is_ignored() {
        let img = Img::new();
        flushed_then_overwritten(&img);
        let lp = log_path(&img.0);
        let log = std::fs::read(&lp).unwrap();
        // Cut inside the record of the unflushed write: that write was never
        // issued as far as the log knows, so it is left as it is.
        std::fs::write(&lp, &log[..log.len() - 10]).unwrap();
        let r = recover(&img.0, 1).unwrap();
        assert!(r.torn_tail);
        assert_eq!(r.writes, 0);
    }

    #[test]
    fn open_refuses_a_log_with_pending_writes() {
        let img = Img::new();
        run(&img, |dev| write(dev, 0, 1, 0x77));
        let err = open_device(&img.spec()).err().expect("open must fail");
        assert!(matches!(err, Error::Busy(_)), "{err}");
        assert!(err.to_string().contains("run power-loss recovery"), "{err}");
        recover(&img.0, 0).unwrap();
        drop(open_device(&img.spec()).unwrap());
    }

    #[test]
    fn recover_refuses_an_image_in_use() {
        let img = Img::new();
        let dev = open_device(&img.spec()).unwrap();
        write(&dev, 0, 1, 0x77);
        let err = recover(&img.0, 0).unwrap_err();
        assert!(matches!(err, Error::Busy(_)), "{err}");
        drop(dev);
        recover(&img.0, 0).unwrap();
    }

    /// The child half of [`power_cut_option_kills_at_the_nth_op`]: runs
    /// write 0x11 (op 1), flush (2), write 0x22 (3), write 0x33 over the
    /// first half (4), flush (5) on the device `spec`, noting after each op
    /// how many completed; exits 0 if no cut came.
    fn cut_child(spec: &str, done: &Path) -> ! {
        let dev = open_device(spec).unwrap();
        let ch = channel(&dev).unwrap();
        let note = |n: u32| std::fs::write(done, n.to_string()).unwrap();
        block_on(async {
            ch.write(Lba(0), buf(&dev, SECTORS * BS, 0x11))
                .await
                .unwrap();
            note(1);
            ch.flush().await.unwrap();
            note(2);
            ch.write(Lba(0), buf(&dev, SECTORS * BS, 0x22))
                .await
                .unwrap();
            note(3);
            ch.write(Lba(0), buf(&dev, SECTORS / 2 * BS, 0x33))
                .await
                .unwrap();
            note(4);
            ch.flush().await.unwrap();
            note(5);
        });
        std::process::exit(0)
    }

    #[test]
    fn power_cut_option_kills_at_the_nth_op() {
        use std::os::unix::process::ExitStatusExt;
        const CHILD: &str = "POWERLOSS_TEST_CUT_SPEC";
        if let Some(spec) = std::env::var_os(CHILD) {
            let spec = spec.into_string().unwrap();
            let done = std::env::var_os("POWERLOSS_TEST_CUT_DONE").unwrap();
            cut_child(&spec, Path::new(&done));
        }
        let mut seen = HashSet::new();
        for (after, when) in [(2u64, "before"), (2, "after"), (4, "before"), (4, "after")] {
            for seed in 0..8 {
                let img = Img::new();
                let done = img.0.with_extension("done");
                let spec = format!(
                    "{}&powerloss_cut_after={after}&powerloss_cut_when={when}",
                    img.spec()
                );
                let status = std::process::Command::new(std::env::current_exe().unwrap())
                    .args([
                        "testing::powerloss::tests::power_cut_option_kills_at_the_nth_op",
                        "--exact",
                        "--test-threads=1",
                    ])
                    .env(CHILD, &spec)
                    .env("POWERLOSS_TEST_CUT_DONE", &done)
                    .stdout(std::process::Stdio::null())
                    .status()
                    .unwrap();
                let what = format!("cut after {after} {when}, seed {seed}");
                assert_eq!(status.signal(), Some(libc::SIGKILL), "{what}: {status:?}");
                // The ops before the cut completed, the cut one did not.
                let n: u64 = std::fs::read_to_string(&done).unwrap().parse().unwrap();
                std::fs::remove_file(&done).unwrap();
                assert_eq!(n, after - 1, "{what}");
                let before = sectors(&img);
                let r = recover(&img.0, seed).unwrap();
                let s = sectors(&img);
                if after == 2 {
                    // Cut at the first flush: the first write never became
                    // durable.
                    assert_eq!(before, vec![0x11; SECTORS], "{what}");
                    assert_eq!(r.writes, 1, "{what}: {r}");
                    assert!(s.iter().all(|&b| b == 0 || b == 0x11), "{what}: {s:?}");
                } else {
                    // Cut at the 0x33 write: it was logged (so it can be
                    // undone) along with the unflushed 0x22 write.
                    assert_eq!(r.writes, 2, "{what}: {r}");
                    if when == "before" {
                        // Never handed to the device.
                        assert_eq!(before, vec![0x22; SECTORS], "{what}");
                    }
                    for (i, &b) in s.iter().enumerate() {
                        let ok = if i < SECTORS / 2 {
                            [0x11, 0x22, 0x33].contains(&b)
                        } else {
                            [0x11, 0x22].contains(&b)
                        };
                        assert!(ok, "{what}: sector {i} = {b:#x} in {s:?}");
                        seen.insert((after, i, b));
                    }
                }
                assert!(!log_path(&img.0).exists());
            }
        }
        // The power cut reached back past the cut op: some seed restored the
        // last flushed value, some kept the cut write.
        assert!(seen.contains(&(4, 0, 0x11)), "{seen:?}");
        assert!(seen.contains(&(4, 0, 0x33)), "{seen:?}");
    }

    /// The child half of [`blobstore_on_powerloss_keeps_synced_blobs`]:
    /// formats the image, makes one blob durable, changes more without a
    /// flush, and SIGKILLs itself.
    fn blobstore_child(image: &Path) -> ! {
        use crate::{BlobOptions, Blobstore, BlobstoreOptions};
        let spec = format!("file:{}?size=64M&powerloss=on", image.display());
        let dev = open_device(&spec).unwrap();
        block_on(async {
            let bs = Blobstore::init(dev.clone(), BlobstoreOptions::default())
                .await
                .unwrap();
            let len = bs.cluster_size() as usize;
            let opts = || BlobOptions {
                num_clusters: 1,
                ..Default::default()
            };
            // Written, its metadata synced, the device flushed: durable.
            let synced = bs.create_blob(opts()).await.unwrap();
            let b = bs.open_blob(synced).await.unwrap();
            b.write(0, buf(&dev, len, 0x5a)).await.unwrap();
            b.sync_metadata().await.unwrap();
            channel(&dev).unwrap().flush().await.unwrap();
            std::fs::write(image.with_extension("id"), synced.0.to_string()).unwrap();
            // Then an overwrite and more blobs, never flushed.
            b.write(0, buf(&dev, len / 2, 0xa5)).await.unwrap();
            for _ in 0..3 {
                let id = bs.create_blob(opts()).await.unwrap();
                let u = bs.open_blob(id).await.unwrap();
                u.write(0, buf(&dev, len, 0x77)).await.unwrap();
                u.sync_metadata().await.unwrap();
            }
        });
        // SAFETY: kill takes no pointers.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        unreachable!("SIGKILL returned");
    }

    #[test]
    fn blobstore_on_powerloss_keeps_synced_blobs() {
        use crate::{BlobId, Blobstore, LoadOptions};
        use std::os::unix::process::ExitStatusExt;
        const CHILD: &str = "POWERLOSS_TEST_CHILD_IMAGE";
        if let Some(image) = std::env::var_os(CHILD) {
            blobstore_child(Path::new(&image));
        }
        let mut fates = [0u64; 3];
        for seed in 0..6 {
            let img = Img::new();
            let status = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "testing::powerloss::tests::blobstore_on_powerloss_keeps_synced_blobs",
                    "--exact",
                    "--test-threads=1",
                ])
                .env(CHILD, &img.0)
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
            let id_file = img.0.with_extension("id");
            let synced = BlobId(std::fs::read_to_string(&id_file).unwrap().parse().unwrap());
            std::fs::remove_file(&id_file).unwrap();
            let r = recover(&img.0, seed).unwrap();
            assert!(r.writes > 0, "{r}");
            fates[0] += r.undone;
            fates[1] += r.kept;
            fates[2] += r.torn;
            let dev = open_device(&format!("file:{}", img.0.display())).unwrap();
            block_on(async {
                let bs = Blobstore::load(dev.clone(), LoadOptions::default())
                    .await
                    .unwrap();
                let len = bs.cluster_size() as usize;
                let b = bs.open_blob(synced).await.unwrap();
                let got = b.read(0, dev.alloc_buf(len).unwrap()).await.unwrap();
                let got = &got[..];
                // The first half holds, sector by sector, the flushed bytes
                // or the unflushed overwrite; the second half was never
                // overwritten.
                assert!(got[..len / 2].iter().all(|&x| x == 0x5a || x == 0xa5));
                assert!(got[len / 2..].iter().all(|&x| x == 0x5a));
                b.close().await.unwrap();
                bs.unload().await.unwrap();
            });
        }
        assert!(fates.iter().all(|&n| n > 0), "undone/kept/torn: {fates:?}");
    }
}
