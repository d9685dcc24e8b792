//! The `cxx` bridge: what the C++ `FileSystem` in `cpp/` calls.
//!
//! Every call returns a [`ffi::Status`] (never panics across the boundary,
//! never throws): the C++ side turns it into the matching `IOStatus`. The
//! message always names the file. Calls run on the caller's thread and block
//! it until BlobFS is done: reads, syncs and metadata run to completion
//! there. BlobFS hands one thing to another thread: a file's full append
//! buffer, written behind the appender by the mount's writer thread (see
//! `blobfs::fs`), which a sync or read of those bytes, or the file's next
//! full buffer, waits for.

use std::sync::Arc;

use blobfs::{BlobFs, OpenOptions};

use crate::mount::{self, Mount};
use crate::uri::Uri;

#[cxx::bridge(namespace = "blobfs_rocksdb")]
pub(crate) mod ffi {
    /// Outcome kinds, one per `IOStatus` the plugin returns.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Code {
        Ok,
        NotFound,
        NoSpace,
        IoError,
        Corruption,
        NotSupported,
        InvalidArgument,
        Busy,
        TimedOut,
    }

    /// A call's outcome; `message` is empty on success.
    struct Status {
        code: Code,
        message: String,
    }

    /// How a file is opened.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum OpenMode {
        /// Existing file, reads only.
        Read,
        /// Create or truncate; read and write.
        CreateTruncate,
        /// Create if missing, keep contents; read and write (appends at end).
        CreateKeep,
        /// Existing file, keep contents; read and write at any offset.
        ReadWrite,
    }

    /// One request of a `MultiRead`: where and how much (its buffer is
    /// passed beside it).
    struct ReadSpan {
        offset: u64,
        len: usize,
    }

    /// One directory entry with its size (0 for directories).
    struct ChildAttr {
        name: String,
        size_bytes: u64,
    }

    extern "Rust" {
        type Fs;
        type FileHandle;
        type LockHandle;
        type AsyncRead;

        fn fs_open(uri: &str, status: &mut Status) -> Box<Fs>;
        fn describe(self: &Fs) -> String;
        fn open_file(
            self: &Fs,
            name: &str,
            mode: OpenMode,
            direct: bool,
            status: &mut Status,
        ) -> Box<FileHandle>;
        fn file_exists(self: &Fs, name: &str) -> Status;
        fn children(self: &Fs, dir: &str, with_sizes: bool, out: &mut Vec<ChildAttr>) -> Status;
        fn delete_file(self: &Fs, name: &str) -> Status;
        fn create_dir(self: &Fs, name: &str, if_missing: bool) -> Status;
        fn delete_dir(self: &Fs, name: &str) -> Status;
        fn file_size(self: &Fs, name: &str, out: &mut u64) -> Status;
        fn mtime_secs(self: &Fs, name: &str, out: &mut u64) -> Status;
        fn rename(self: &Fs, from: &str, to: &str) -> Status;
        fn is_dir(self: &Fs, name: &str, out: &mut bool) -> Status;
        fn lock(self: &Fs, name: &str, status: &mut Status) -> Box<LockHandle>;
        fn free_bytes(self: &Fs) -> u64;

        fn read_at(
            self: &FileHandle,
            off: u64,
            buf: &mut [u8],
            timeout_us: u64,
            n_read: &mut usize,
        ) -> Status;
        /// # Safety
        /// `bufs` points to `spans.len()` buffers, the i-th of
        /// `spans[i].len` writable bytes, none overlapping another, all
        /// valid for the call.
        unsafe fn multi_read(
            self: &FileHandle,
            spans: &[ReadSpan],
            bufs: *const *mut u8,
            timeout_us: u64,
            got: &mut [usize],
            statuses: &mut Vec<Status>,
        );
        /// # Safety
        /// `buf` is valid for writes of `len` bytes, used by nothing else,
        /// until the returned read is finished (`finish`) or dropped.
        unsafe fn start_read(
            self: &FileHandle,
            off: u64,
            buf: *mut u8,
            len: usize,
        ) -> Box<AsyncRead>;
        fn poll(self: &mut AsyncRead) -> bool;
        fn finish(self: &mut AsyncRead, n_read: &mut usize) -> Status;
        fn abort(self: &mut AsyncRead);
        fn prefetch(self: &FileHandle, off: u64, len: usize) -> Status;
        fn append(self: &FileHandle, data: &[u8]) -> Status;
        fn write_at(self: &FileHandle, off: u64, data: &[u8]) -> Status;
        fn truncate(self: &FileHandle, len: u64) -> Status;
        fn sync(self: &FileHandle) -> Status;
        fn close(self: &mut FileHandle) -> Status;
        fn len(self: &FileHandle) -> u64;
        fn file_id(self: &FileHandle) -> u64;
        fn alignment(self: &FileHandle) -> usize;
    }

    unsafe extern "C++" {
        include!("blobfs_rocksdb.h");

        /// Registers the `blobfs://` FileSystem and Env factories in
        /// RocksDB's default object library (idempotent); returns how many
        /// factories this call added.
        fn register_blobfs() -> i32;

        /// RocksDB C API's Env handle (`rocksdb/c.h`).
        #[namespace = ""]
        type rocksdb_env_t;

        /// A C API handle of the process-lived Env that `env=<options_value>`
        /// names (null with `status` set on failure); the handle does not own
        /// the Env.
        fn new_env_handle(options_value: &str, status: &mut Status) -> *mut rocksdb_env_t;
    }
}

use ffi::{ChildAttr, Code, OpenMode, ReadSpan, Status};

impl Status {
    fn ok() -> Status {
        Status {
            code: Code::Ok,
            message: String::new(),
        }
    }
    fn new(code: Code, message: String) -> Status {
        Status { code, message }
    }
}

/// The status for a BlobFS error (whose text names the file).
fn status_of(e: blobfs::Error) -> Status {
    use blobfs::Error as E;
    let code = match &e {
        E::NotFound(_) => Code::NotFound,
        E::NoSpace(..) => Code::NoSpace,
        E::Corrupt(_) => Code::Corruption,
        E::Store(_, blobstore::Error::Corrupt { .. }) => Code::Corruption,
        E::Store(_, blobstore::Error::NoSpace(_)) => Code::NoSpace,
        E::Store(_, blobstore::Error::Busy(_)) | E::Locked(_) => Code::Busy,
        E::InvalidName { .. } | E::InvalidArgument(_) | E::BadMode(..) => Code::InvalidArgument,
        E::TimedOut(..) => Code::TimedOut,
        _ => Code::IoError,
    };
    Status::new(code, e.to_string())
}

fn status_from(r: blobfs::Result<()>) -> Status {
    match r {
        Ok(()) => Status::ok(),
        Err(e) => status_of(e),
    }
}

/// A mounted BlobFS as one C++ `FileSystem` object sees it.
pub struct Fs {
    mount: Option<Arc<Mount>>,
}

fn fs_open(uri: &str, status: &mut Status) -> Box<Fs> {
    crate::init_events();
    let parsed = match Uri::parse(uri) {
        Ok(u) => u,
        Err(e) => {
            *status = Status::new(Code::InvalidArgument, e.to_string());
            return Box::new(Fs { mount: None });
        }
    };
    match mount::get(&parsed) {
        Ok(m) => {
            *status = Status::ok();
            Box::new(Fs { mount: Some(m) })
        }
        Err(e) => {
            let code = match &e {
                crate::Error::Mount {
                    source: blobfs::Error::Store(_, blobstore::Error::Busy(_)),
                    ..
                } => Code::Busy,
                crate::Error::Conflict { .. } => Code::InvalidArgument,
                _ => Code::IoError,
            };
            *status = Status::new(code, e.to_string());
            Box::new(Fs { mount: None })
        }
    }
}

impl Fs {
    fn fs(&self) -> &BlobFs {
        &self
            .mount
            .as_ref()
            .expect("C++ uses an Fs only after fs_open succeeded")
            .fs
    }

    fn cached(&self) -> bool {
        self.mount.as_ref().is_some_and(|m| m.uri.cache_bytes > 0)
    }

    fn describe(&self) -> String {
        match &self.mount {
            Some(m) => format!("blobfs://{}", m.uri.spec),
            None => "blobfs (not mounted)".into(),
        }
    }

    /// Opens `name`; `direct` for RocksDB's direct I/O: reads bypass
    /// BlobFS's cache and must be aligned to the device block.
    fn open_file(
        &self,
        name: &str,
        mode: OpenMode,
        direct: bool,
        status: &mut Status,
    ) -> Box<FileHandle> {
        let mut opts = match mode {
            OpenMode::Read => OpenOptions::read(),
            OpenMode::CreateTruncate => OpenOptions::create_truncate(),
            OpenMode::CreateKeep => OpenOptions {
                read: true,
                write: true,
                create: true,
                ..Default::default()
            },
            OpenMode::ReadWrite => OpenOptions {
                read: true,
                write: true,
                ..Default::default()
            },
            _ => {
                *status = Status::new(Code::InvalidArgument, format!("{name}: bad open mode"));
                return Box::new(FileHandle::none());
            }
        };
        opts.direct = direct;
        match self.fs().open(name, opts) {
            Ok(f) => {
                *status = Status::ok();
                Box::new(FileHandle {
                    file: Some(f),
                    cached: self.cached() && !direct,
                    direct_align: direct.then(|| self.fs().blobstore().io_unit_size() as usize),
                })
            }
            Err(e) => {
                *status = status_of(e);
                Box::new(FileHandle::none())
            }
        }
    }

    fn file_exists(&self, name: &str) -> Status {
        if self.fs().exists(name) {
            Status::ok()
        } else {
            Status::new(Code::NotFound, format!("{name}: no such file or directory"))
        }
    }

    fn children(&self, dir: &str, with_sizes: bool, out: &mut Vec<ChildAttr>) -> Status {
        out.clear();
        let entries = match self.fs().read_dir(dir) {
            Ok(v) => v,
            Err(e) => return status_of(e),
        };
        let prefix = dir.trim_end_matches('/');
        for entry in entries {
            let size_bytes = if with_sizes && !entry.is_dir {
                match self.fs().stat(&format!("{prefix}/{}", entry.name)) {
                    Ok(m) => m.len,
                    // Deleted since the listing: leave it out, as RocksDB does.
                    Err(blobfs::Error::NotFound(_)) => continue,
                    Err(e) => return status_of(e),
                }
            } else {
                0
            };
            out.push(ChildAttr {
                name: entry.name,
                size_bytes,
            });
        }
        Status::ok()
    }

    fn delete_file(&self, name: &str) -> Status {
        status_from(self.fs().remove_file(name))
    }

    fn create_dir(&self, name: &str, if_missing: bool) -> Status {
        if if_missing {
            status_from(self.fs().create_dir_all(name))
        } else {
            status_from(self.fs().create_dir(name))
        }
    }

    fn delete_dir(&self, name: &str) -> Status {
        status_from(self.fs().remove_dir(name))
    }

    fn file_size(&self, name: &str, out: &mut u64) -> Status {
        match self.fs().stat(name) {
            Ok(m) if m.is_dir => Status::new(Code::IoError, format!("{name}: is a directory")),
            Ok(m) => {
                *out = m.len;
                Status::ok()
            }
            Err(e) => status_of(e),
        }
    }

    fn mtime_secs(&self, name: &str, out: &mut u64) -> Status {
        match self.fs().stat(name) {
            Ok(m) => {
                *out = m.mtime_ns / 1_000_000_000;
                Status::ok()
            }
            Err(e) => status_of(e),
        }
    }

    fn rename(&self, from: &str, to: &str) -> Status {
        status_from(self.fs().rename(from, to))
    }

    fn is_dir(&self, name: &str, out: &mut bool) -> Status {
        match self.fs().stat(name) {
            Ok(m) => {
                *out = m.is_dir;
                Status::ok()
            }
            Err(e) => status_of(e),
        }
    }

    fn lock(&self, name: &str, status: &mut Status) -> Box<LockHandle> {
        // Like POSIX, the lock file exists while held (RocksDB lists it).
        if !self.fs().exists(name) {
            match self.fs().open(
                name,
                OpenOptions {
                    read: true,
                    write: true,
                    create: true,
                    ..Default::default()
                },
            ) {
                Ok(f) => {
                    if let Err(e) = f.close() {
                        *status = status_of(e);
                        return Box::new(LockHandle { _lock: None });
                    }
                }
                Err(e) => {
                    *status = status_of(e);
                    return Box::new(LockHandle { _lock: None });
                }
            }
        }
        match self.fs().lock(name) {
            Ok(l) => {
                *status = Status::ok();
                Box::new(LockHandle { _lock: Some(l) })
            }
            Err(e) => {
                *status = status_of(e);
                Box::new(LockHandle { _lock: None })
            }
        }
    }

    fn free_bytes(&self) -> u64 {
        self.fs().space().free_bytes
    }
}

/// An open file; `None` after close or a failed open.
pub struct FileHandle {
    file: Option<blobfs::File>,
    /// The mount has a read cache and the handle uses it, so prefetching
    /// warms it.
    cached: bool,
    /// For a direct-I/O handle, the alignment its reads must have (the
    /// device block); `None` for a buffered one.
    direct_align: Option<usize>,
}

/// A held lock, released when C++ drops it.
pub struct LockHandle {
    _lock: Option<blobfs::FileLock>,
}

/// A read started by RocksDB's `ReadAsync` (`FileHandle::start_read`):
/// refused up front, running, or finished.
pub struct AsyncRead {
    /// Why it was refused before it started (the outcome `finish` gives).
    refused: Option<Status>,
    read: Option<blobfs::PendingRead>,
}

impl AsyncRead {
    /// Reaps completions without waiting; true once the read is finished
    /// (then `finish` returns at once).
    fn poll(&mut self) -> bool {
        self.read.as_mut().is_none_or(blobfs::PendingRead::poll)
    }

    /// Waits for the read; `n_read` is the bytes read.
    fn finish(&mut self, n_read: &mut usize) -> Status {
        *n_read = 0;
        if let Some(st) = self.refused.take() {
            return st;
        }
        let Some(read) = self.read.as_mut() else {
            return Status::new(Code::IoError, "asynchronous read already finished".into());
        };
        let r = read.wait();
        self.read = None;
        match r {
            Ok(n) => {
                *n_read = n;
                Status::ok()
            }
            Err(e) => status_of(e),
        }
    }

    /// Gives the read up: its buffer is not written from now on (device
    /// reads land in the channel's own memory, which outlives them).
    fn abort(&mut self) {
        self.read = None;
    }
}

/// Bytes read per step when prefetching.
const PREFETCH_STEP_BYTES: usize = 256 << 10;

impl FileHandle {
    fn none() -> FileHandle {
        FileHandle {
            file: None,
            cached: false,
            direct_align: None,
        }
    }

    /// The alignment RocksDB must give direct-I/O buffers, offsets and
    /// lengths: the device block for a direct handle (1 otherwise).
    fn alignment(&self) -> usize {
        self.direct_align.unwrap_or(1)
    }

    /// RocksDB's `MultiRead`: every request's device reads submitted
    /// before any is waited for (see `blobfs::File::read_many`), each
    /// request with its own status and length; a time limit covers the
    /// whole batch.
    ///
    /// # Safety
    /// As declared in the bridge: `bufs` holds `spans.len()` valid,
    /// distinct buffers of the spans' lengths.
    unsafe fn multi_read(
        &self,
        spans: &[ReadSpan],
        bufs: *const *mut u8,
        timeout_us: u64,
        got: &mut [usize],
        statuses: &mut Vec<Status>,
    ) {
        statuses.clear();
        let n = spans.len().min(got.len());
        // SAFETY: the caller passes one pointer per span.
        let ptrs = unsafe { std::slice::from_raw_parts(bufs, n) };
        let Some(file) = &self.file else {
            got.fill(0);
            statuses.extend((0..n).map(|_| Status::new(Code::IoError, "file is closed".into())));
            return;
        };
        // A request refused up front keeps its place with its status in
        // `refused`; the others are read together.
        let mut reqs: Vec<(u64, &mut [u8])> = Vec::with_capacity(n);
        let mut refused: Vec<Option<Status>> = Vec::with_capacity(n);
        for (span, &p) in spans.iter().zip(ptrs) {
            if p.is_null() {
                refused.push(Some(Status::new(
                    Code::InvalidArgument,
                    "MultiRead request with a null buffer".into(),
                )));
                continue;
            }
            // SAFETY: a valid buffer of `span.len` bytes that no other
            // request shares, alive for the call (the caller's promise).
            let buf = unsafe { std::slice::from_raw_parts_mut(p, span.len) };
            let st = self.misaligned(span.offset, buf);
            if st.is_none() {
                reqs.push((span.offset, buf));
            }
            refused.push(st);
        }
        let mut results = match timeout_us {
            0 => file.read_many(&mut reqs),
            us => file.read_many_timeout(&mut reqs, std::time::Duration::from_micros(us)),
        }
        .into_iter();
        for (i, refusal) in refused.into_iter().enumerate() {
            let st = match refusal {
                Some(st) => {
                    got[i] = 0;
                    st
                }
                None => match results.next() {
                    Some(Ok(k)) => {
                        got[i] = k;
                        Status::ok()
                    }
                    Some(Err(e)) => {
                        got[i] = 0;
                        status_of(e)
                    }
                    None => {
                        got[i] = 0;
                        Status::new(Code::IoError, "MultiRead lost a result".into())
                    }
                },
            };
            statuses.push(st);
        }
    }

    /// RocksDB's `ReadAsync`: `len` bytes at `off` into `buf`, the device
    /// reads submitted before this returns (see `blobfs::File::start_read`).
    ///
    /// # Safety
    /// As declared in the bridge.
    unsafe fn start_read(&self, off: u64, buf: *mut u8, len: usize) -> Box<AsyncRead> {
        let refuse = |st: Status| {
            Box::new(AsyncRead {
                refused: Some(st),
                read: None,
            })
        };
        if buf.is_null() && len > 0 {
            return refuse(Status::new(
                Code::InvalidArgument,
                "ReadAsync into a null buffer".into(),
            ));
        }
        let Some(file) = &self.file else {
            return refuse(Status::new(Code::IoError, "file is closed".into()));
        };
        if len > 0 {
            // SAFETY: the caller's promise; only its address and length
            // are looked at here.
            let view = unsafe { std::slice::from_raw_parts(buf, len) };
            if let Some(st) = self.misaligned(off, view) {
                return refuse(st);
            }
        }
        Box::new(AsyncRead {
            refused: None,
            // SAFETY: forwarded from the caller.
            read: Some(unsafe { file.start_read(off, buf, len) }),
        })
    }

    fn prefetch(&self, off: u64, len: usize) -> Status {
        if !self.cached {
            return Status::new(
                Code::NotSupported,
                "prefetch: the BlobFS mount has no read cache (cache=0)".into(),
            );
        }
        let mut buf = vec![0u8; len.min(PREFETCH_STEP_BYTES)];
        let mut done = 0usize;
        while done < len {
            let step = (len - done).min(buf.len());
            let mut n = 0;
            let st = self.read_at(off + done as u64, &mut buf[..step], 0, &mut n);
            if st.code != Code::Ok {
                return st;
            }
            if n < step {
                break;
            }
            done += n;
        }
        Status::ok()
    }

    fn with<T>(&self, f: impl FnOnce(&blobfs::File) -> blobfs::Result<T>) -> Result<T, Status> {
        match &self.file {
            Some(file) => f(file).map_err(status_of),
            None => Err(Status::new(Code::IoError, "file is closed".into())),
        }
    }

    /// Reads `buf.len()` bytes at `off` (fewer only at the end of the
    /// file); with `timeout_us` > 0 (RocksDB's `IOOptions::timeout`) the
    /// whole read gives up with `TimedOut` when the device has not answered
    /// within that many microseconds.
    /// The refusal of a direct read that is not aligned, as O_DIRECT
    /// requires of POSIX reads (a caller that forgot would otherwise pass
    /// here and fail elsewhere); `None` for an aligned or buffered read.
    fn misaligned(&self, off: u64, buf: &[u8]) -> Option<Status> {
        let a = self.direct_align?;
        let aligned = off.is_multiple_of(a as u64)
            && buf.len().is_multiple_of(a)
            && (buf.as_ptr() as usize).is_multiple_of(a);
        (!aligned).then(|| {
            Status::new(
                Code::InvalidArgument,
                format!(
                    "direct read of {} bytes at {off} into {:p}: not aligned to {a} bytes",
                    buf.len(),
                    buf.as_ptr()
                ),
            )
        })
    }

    fn read_at(&self, off: u64, buf: &mut [u8], timeout_us: u64, n_read: &mut usize) -> Status {
        if let Some(st) = self.misaligned(off, buf) {
            *n_read = 0;
            return st;
        }
        // One call fills the whole buffer unless the end of the file comes
        // first (BlobFS reads short only there).
        let r = self.with(|f| match timeout_us {
            0 => f.read_at(off, buf),
            us => f.read_at_timeout(off, buf, std::time::Duration::from_micros(us)),
        });
        match r {
            Ok(n) => {
                *n_read = n;
                Status::ok()
            }
            Err(s) => {
                *n_read = 0;
                s
            }
        }
    }

    fn append(&self, data: &[u8]) -> Status {
        self.with(|f| f.append(data))
            .err()
            .unwrap_or_else(Status::ok)
    }

    fn write_at(&self, off: u64, data: &[u8]) -> Status {
        self.with(|f| {
            // BlobFS writes at most at the end; a hole reads as zeroes.
            if off > f.len() {
                f.truncate(off)?;
            }
            f.write_at(off, data)
        })
        .err()
        .unwrap_or_else(Status::ok)
    }

    fn truncate(&self, len: u64) -> Status {
        self.with(|f| f.truncate(len))
            .err()
            .unwrap_or_else(Status::ok)
    }

    fn sync(&self) -> Status {
        self.with(|f| f.sync()).err().unwrap_or_else(Status::ok)
    }

    fn close(&mut self) -> Status {
        match self.file.take() {
            Some(f) => status_from(f.close()),
            None => Status::ok(),
        }
    }

    fn len(&self) -> u64 {
        self.file.as_ref().map_or(0, |f| f.len())
    }

    fn file_id(&self) -> u64 {
        self.file.as_ref().map_or(0, |f| f.metadata().blob_id.0)
    }
}

/// Registers the factories (see [`crate::register`]).
/// A C API Env handle for the Env of `env=<options_value>` (see
/// `new_env_handle`), or RocksDB's message.
pub(crate) fn env_handle(
    options_value: &str,
) -> Result<*mut librocksdb_sys::rocksdb_env_t, String> {
    let mut status = Status::ok();
    let raw = ffi::new_env_handle(options_value, &mut status);
    if status.code != Code::Ok || raw.is_null() {
        return Err(status.message);
    }
    Ok(raw.cast())
}

pub(crate) fn register() -> i32 {
    crate::init_events();
    ffi::register_blobfs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_rw_files_open_existing_files_only() {
        let mut st = Status::ok();
        let fs = fs_open("blobfs://mem:32M;mkfs=always", &mut st);
        assert_eq!(st.code, Code::Ok, "{}", st.message);
        // NewRandomRWFile's mode: a missing file is NotFound, not created.
        let h = fs.open_file("/rw/missing", OpenMode::ReadWrite, false, &mut st);
        assert_eq!(st.code, Code::NotFound, "{}", st.message);
        assert!(h.file.is_none());
        assert_eq!(fs.file_exists("/rw/missing").code, Code::NotFound);
        // An existing one opens for reads and writes at any offset.
        assert_eq!(fs.create_dir("/rw", true).code, Code::Ok);
        let w = fs.open_file("/rw/f", OpenMode::CreateKeep, false, &mut st);
        assert_eq!(w.append(b"0123456789").code, Code::Ok);
        assert_eq!(w.sync().code, Code::Ok);
        let h = fs.open_file("/rw/f", OpenMode::ReadWrite, false, &mut st);
        assert_eq!(st.code, Code::Ok, "{}", st.message);
        assert_eq!(h.write_at(2, b"ab").code, Code::Ok);
        let mut buf = [0u8; 10];
        let mut n = 0;
        assert_eq!(h.read_at(0, &mut buf, 0, &mut n).code, Code::Ok);
        assert_eq!(&buf[..n], b"01ab456789");
    }

    #[test]
    fn multi_read_gives_each_request_its_own_bytes_and_status() {
        let mut st = Status::ok();
        let fs = fs_open("blobfs://mem:40M;mkfs=always", &mut st);
        assert_eq!(st.code, Code::Ok, "{}", st.message);
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let w = fs.open_file("/m", OpenMode::CreateKeep, false, &mut st);
        assert_eq!(w.append(&data).code, Code::Ok);
        assert_eq!(w.sync().code, Code::Ok);
        let h = fs.open_file("/m", OpenMode::Read, false, &mut st);
        assert_eq!(st.code, Code::Ok, "{}", st.message);
        // In the middle, at the start, across the end, past the end, and a
        // request without a buffer between them.
        let spans = [
            (5_000u64, 3_000usize),
            (0, 100),
            (19_990, 50),
            (30_000, 10),
            (7, 8),
        ];
        let mut bufs: Vec<Vec<u8>> = spans.iter().map(|&(_, l)| vec![0xee; l]).collect();
        let mut ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
        ptrs[4] = std::ptr::null_mut();
        let rs: Vec<ReadSpan> = spans
            .iter()
            .map(|&(offset, len)| ReadSpan { offset, len })
            .collect();
        let mut got = vec![usize::MAX; spans.len()];
        let mut statuses = Vec::new();
        // SAFETY: one valid, distinct buffer per span (or null).
        unsafe { h.multi_read(&rs, ptrs.as_ptr(), 0, &mut got, &mut statuses) };
        let codes: Vec<Code> = statuses.iter().map(|s| s.code).collect();
        assert_eq!(
            codes,
            [
                Code::Ok,
                Code::Ok,
                Code::Ok,
                Code::Ok,
                Code::InvalidArgument
            ]
        );
        assert_eq!(got, [3_000, 100, 10, 0, 0]);
        for (i, &(off, _)) in spans.iter().enumerate().take(4) {
            let o = off as usize;
            assert_eq!(
                &bufs[i][..got[i]],
                &data[o.min(data.len())..o.min(data.len()) + got[i]]
            );
        }
    }
}
