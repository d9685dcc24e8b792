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
//!
//! Layout: this file holds the device ([`PowerLossDevice`], its channel
//! backend, the undo log it writes, and [`PowerCut`]); `recover` reads the
//! log back and plays the power cut ([`recover`], [`RecoveryReport`]);
//! [`log_format`] lays out the log's bytes.

use std::collections::HashMap;
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
mod recover;
#[cfg(test)]
mod tests;

pub use self::recover::{recover, RecoveryReport};

use self::log_format::{encode_header, encode_record, Record, RecordKind, HEADER_LEN, MAX_PAYLOAD};
use self::recover::pending_writes;
use crate::device::{BlockDevice, ChannelBackend, DeviceId, DmaBuf, Geometry, IoKind, IoOp, Tag};
use crate::error::{Error, Result};

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
