//! `blobfs mount`: BlobFS through FUSE, for inspection with ordinary tools.
//!
//! The kernel speaks inode numbers; BlobFS speaks names. [`Inodes`] maps
//! one to the other: the root is inode 1, and every name gets a number the
//! first time the kernel sees it (lookup, create, mkdir, readdir). Numbers
//! are never reused, so a stale number can only miss (ENOENT), never reach
//! another file. Open files are BlobFS handles in a table keyed by the FUSE
//! file handle, so a file deleted while open stays readable through them.
//!
//! Invariants:
//! - `by_name` and `by_ino` are inverse maps; a rename moves the number
//!   with the file (with a directory, every number below it too), a
//!   delete drops the name's number.
//! - Every handle in `handles` is closed (synced) by `release` or, for
//!   those the kernel never released, before the file system is unmounted.
//! - The session runs on one thread (FUSE requests one at a time); the
//!   locks exist because fuser's `Filesystem` takes `&self`.
//!
//! Unmounting: `fusermount3 -u <dir>`, `umount <dir>`, or a signal
//! (SIGINT, SIGTERM, SIGHUP) to the mount process, which unmounts the
//! directory itself. Either way the session ends, every handle is closed,
//! and BlobFS is unmounted cleanly (everything synced) before the process
//! exits. Without `--foreground`, the command starts itself again in the
//! foreground as a background process and returns once the mount is up.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blobfs::{BlobFs, Error, File, Metadata, MountOptions, OpenOptions};
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use parking_lot::Mutex;

use crate::util::{fail, open_device, CliResult, Ctx};

/// How long the kernel may cache names and attributes. Every change goes
/// through this process, so the caches stay right; short anyway.
const TTL: Duration = Duration::from_secs(1);
/// Block size reported to `stat` and `statfs`.
const BLOCK: u32 = 4096;

/// Names ⇄ inode numbers.
struct Inodes {
    by_ino: HashMap<u64, String>,
    by_name: HashMap<String, u64>,
    next: u64,
}

impl Inodes {
    fn new() -> Inodes {
        let mut t = Inodes {
            by_ino: HashMap::new(),
            by_name: HashMap::new(),
            next: INodeNo::ROOT.0 + 1,
        };
        t.by_ino.insert(INodeNo::ROOT.0, String::new());
        t.by_name.insert(String::new(), INodeNo::ROOT.0);
        t
    }

    fn ino(&mut self, name: &str) -> u64 {
        if let Some(&i) = self.by_name.get(name) {
            return i;
        }
        let i = self.next;
        self.next += 1;
        self.by_ino.insert(i, name.to_string());
        self.by_name.insert(name.to_string(), i);
        i
    }

    fn forget_name(&mut self, name: &str) {
        if let Some(i) = self.by_name.remove(name) {
            self.by_ino.remove(&i);
        }
    }

    /// `from` (with everything below it when `is_dir`) is now `to`.
    fn rename(&mut self, from: &str, to: &str, is_dir: bool) {
        self.forget_name(to);
        let mut moved = vec![from.to_string()];
        if is_dir {
            let below = format!("{from}/");
            moved.extend(
                self.by_name
                    .keys()
                    .filter(|n| n.starts_with(&below))
                    .cloned(),
            );
        }
        for old in moved {
            let Some(new) = blobfs::name::rebase(&old, from, to) else {
                continue;
            };
            if let Some(i) = self.by_name.remove(&old) {
                self.by_ino.insert(i, new.clone());
                self.by_name.insert(new, i);
            }
        }
    }
}

/// State shared by the FUSE session and the code that unmounts.
struct State {
    fs: BlobFs,
    inodes: Mutex<Inodes>,
    handles: Mutex<HashMap<u64, Arc<File>>>,
    next_fh: AtomicU64,
    uid: u32,
    gid: u32,
    mounted_at: SystemTime,
}

/// The errno a BlobFS error means to a POSIX program.
fn errno(e: &Error) -> Errno {
    match e {
        Error::NotFound(_) => Errno::ENOENT,
        Error::AlreadyExists(_) => Errno::EEXIST,
        Error::IsADirectory(_) => Errno::EISDIR,
        Error::NotADirectory(_) => Errno::ENOTDIR,
        Error::DirectoryNotEmpty(_) => Errno::ENOTEMPTY,
        Error::InvalidName { reason, .. } if reason.contains("longer") => Errno::ENAMETOOLONG,
        Error::InvalidName { .. } | Error::InvalidArgument(_) => Errno::EINVAL,
        Error::BadMode(..) => Errno::EBADF,
        Error::Locked(_) => Errno::EWOULDBLOCK,
        Error::NoSpace(..) => Errno::ENOSPC,
        _ => {
            // Errors a program can only see as EIO: say what they were.
            eprintln!("blobfs: {e}");
            Errno::EIO
        }
    }
}

fn time(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

impl State {
    fn attr(&self, ino: u64, m: &Metadata) -> FileAttr {
        // The root has no blob of its own to carry a time: show the mount's.
        let t = if m.name.is_empty() {
            self.mounted_at
        } else {
            time(m.mtime_ns)
        };
        FileAttr {
            ino: INodeNo(ino),
            size: m.len,
            blocks: m.len.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: if m.is_dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if m.is_dir { 0o755 } else { 0o644 },
            nlink: if m.is_dir { 2 } else { 1 },
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        }
    }

    fn name_of(&self, ino: INodeNo) -> Result<String, Errno> {
        self.inodes
            .lock()
            .by_ino
            .get(&ino.0)
            .cloned()
            .ok_or(Errno::ENOENT)
    }

    /// Full name of `name` in directory `parent`.
    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<String, Errno> {
        let dir = self.name_of(parent)?;
        let name = name.to_str().ok_or(Errno::EINVAL)?;
        Ok(if dir.is_empty() {
            name.to_string()
        } else {
            format!("{dir}/{name}")
        })
    }

    /// Attributes of a name, giving it an inode number.
    fn entry(&self, name: &str) -> Result<FileAttr, Errno> {
        let m = self.fs.stat(name).map_err(|e| errno(&e))?;
        let ino = self.inodes.lock().ino(&m.name);
        Ok(self.attr(ino, &m))
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<File>, Errno> {
        self.handles.lock().get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn add_handle(&self, f: File) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Arc::new(f));
        fh
    }

    fn close(&self, f: Arc<File>) -> Result<(), Errno> {
        match Arc::try_unwrap(f) {
            Ok(f) => f.close().map_err(|e| errno(&e)),
            // A request still uses it; its drop releases the handle.
            Err(_) => Ok(()),
        }
    }

    fn getattr(&self, ino: INodeNo, fh: Option<FileHandle>) -> Result<FileAttr, Errno> {
        if let Some(f) = fh.and_then(|fh| self.handles.lock().get(&fh.0).cloned()) {
            return Ok(self.attr(ino.0, &f.metadata()));
        }
        let name = self.name_of(ino)?;
        let m = self.fs.stat(&name).map_err(|e| errno(&e))?;
        Ok(self.attr(ino.0, &m))
    }

    fn truncate(&self, ino: INodeNo, fh: Option<FileHandle>, size: u64) -> Result<(), Errno> {
        let e = |e: Error| errno(&e);
        match fh.and_then(|fh| self.handles.lock().get(&fh.0).cloned()) {
            Some(f) => f.truncate(size).map_err(e),
            None => {
                let f = self
                    .fs
                    .open(&self.name_of(ino)?, OpenOptions::append())
                    .map_err(e)?;
                f.truncate(size).map_err(e)?;
                f.close().map_err(e)
            }
        }
    }

    fn read(&self, fh: FileHandle, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let f = self.handle(fh)?;
        let want = (size as u64).min(f.len().saturating_sub(offset)) as usize;
        let mut buf = vec![0u8; want];
        let mut got = 0;
        while got < want {
            let n = f
                .read_at(offset + got as u64, &mut buf[got..])
                .map_err(|e| errno(&e))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        buf.truncate(got);
        Ok(buf)
    }

    fn write(&self, fh: FileHandle, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let f = self.handle(fh)?;
        let e = |e: Error| errno(&e);
        // BlobFS writes at most at the end; a write past it leaves a hole,
        // which reads as zeroes once the file is grown to it.
        if offset > f.len() {
            f.truncate(offset).map_err(e)?;
        }
        f.write_at(offset, data).map_err(e)?;
        Ok(data.len() as u32)
    }

    fn rename(&self, from: &str, to: &str, flags: RenameFlags) -> Result<(), Errno> {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return Err(Errno::EINVAL);
        }
        if flags.contains(RenameFlags::RENAME_NOREPLACE) && self.fs.exists(to) {
            return Err(Errno::EEXIST);
        }
        let is_dir = self.fs.stat(from).map_err(|e| errno(&e))?.is_dir;
        self.fs.rename(from, to).map_err(|e| errno(&e))?;
        self.inodes.lock().rename(from, to, is_dir);
        Ok(())
    }
}

/// The fuser adapter: a thin shell over [`State`].
struct FuseFs(Arc<State>);

impl Filesystem for FuseFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.0.child(parent, name).and_then(|n| self.0.entry(&n)) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.0.getattr(ino, fh) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // Mode, owner and times are not stored: accepted and ignored, so
        // `cp -p` and `touch` work. Size truncates.
        let res = match size {
            Some(size) => self.0.truncate(ino, fh, size),
            None => Ok(()),
        };
        match res.and_then(|()| self.0.getattr(ino, fh)) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let res = self.0.child(parent, name).and_then(|n| {
            self.0.fs.create_dir(&n).map_err(|e| errno(&e))?;
            self.0.entry(&n)
        });
        match res {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.0.child(parent, name).and_then(|n| {
            self.0.fs.remove_file(&n).map_err(|e| errno(&e))?;
            self.0.inodes.lock().forget_name(&n);
            Ok(())
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let res = self.0.child(parent, name).and_then(|n| {
            self.0.fs.remove_dir(&n).map_err(|e| errno(&e))?;
            self.0.inodes.lock().forget_name(&n);
            Ok(())
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let res = self.0.child(parent, name).and_then(|from| {
            let to = self.0.child(newparent, newname)?;
            self.0.rename(&from, &to, flags)
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let opts = match flags.acc_mode() {
            OpenAccMode::O_RDONLY => OpenOptions::read(),
            _ => OpenOptions::append(),
        };
        let res = self
            .0
            .name_of(ino)
            .and_then(|n| self.0.fs.open(&n, opts).map_err(|e| errno(&e)));
        match res {
            Ok(f) => reply.opened(FileHandle(self.0.add_handle(f)), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let opts = OpenOptions {
            read: true,
            write: true,
            create: true,
            create_new: flags & libc::O_EXCL != 0,
            truncate: flags & libc::O_TRUNC != 0,
            direct: false,
        };
        let res = self.0.child(parent, name).and_then(|n| {
            let f = self.0.fs.open(&n, opts).map_err(|e| errno(&e))?;
            let ino = self.0.inodes.lock().ino(&n);
            let attr = self.0.attr(ino, &f.metadata());
            Ok((attr, self.0.add_handle(f)))
        });
        match res {
            Ok((a, fh)) => {
                reply.created(&TTL, &a, Generation(0), FileHandle(fh), FopenFlags::empty())
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.0.read(fh, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.0.write(fh, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) of a written file reports write errors here.
        match self
            .0
            .handle(fh)
            .and_then(|f| f.sync().map_err(|e| errno(&e)))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self
            .0
            .handle(fh)
            .and_then(|f| f.sync().map_err(|e| errno(&e)))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let f = self.0.handles.lock().remove(&fh.0);
        match f.map_or(Ok(()), |f| self.0.close(f)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let res = self.0.name_of(ino).and_then(|dir| {
            let entries = self.0.fs.read_dir(&dir).map_err(|e| errno(&e))?;
            let mut inodes = self.0.inodes.lock();
            let parent = inodes.ino(blobfs::name::parent(&dir));
            let mut all = vec![
                (ino.0, FileType::Directory, ".".to_string()),
                (parent, FileType::Directory, "..".to_string()),
            ];
            for e in entries {
                let full = if dir.is_empty() {
                    e.name.clone()
                } else {
                    format!("{dir}/{}", e.name)
                };
                let kind = if e.is_dir {
                    FileType::Directory
                } else {
                    FileType::RegularFile
                };
                all.push((inodes.ino(&full), kind, e.name));
            }
            Ok(all)
        });
        match res {
            Ok(all) => {
                for (i, (ino, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
                    // The offset of an entry is where the next read starts.
                    if reply.add(INodeNo(ino), i as u64 + 1, kind, &name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.0.fs.space();
        let free_md = self.0.fs.blobstore().free_md_pages();
        let b = BLOCK as u64;
        reply.statfs(
            s.total_bytes / b,
            s.free_bytes / b,
            s.free_bytes / b,
            s.entries + free_md,
            free_md,
            BLOCK,
            blobfs::name::MAX_COMPONENT_LEN as u32,
            BLOCK,
        );
    }
}

/// True when `dir` is a mount point, by `/proc/self/mountinfo` (which never
/// blocks on a file system that is still starting).
pub fn is_mount_point(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| unescape_mount_path(p) == dir.as_os_str().to_string_lossy())
}

/// Undoes the octal escapes (`\040` for a space) of mountinfo paths.
fn unescape_mount_path(p: &str) -> String {
    let b = p.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Signals that unmount: blocked in every thread (set before any thread
/// starts, so all inherit it) and taken by one waiting thread instead.
fn unmount_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset only write the set we own, which is
    // fully initialised by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

pub fn mount(
    spec: &str,
    dir: &Path,
    foreground: bool,
    cache_bytes: u64,
    discard: bool,
) -> CliResult {
    if !dir.is_dir() {
        return fail(format!("{}: not a directory", dir.display()));
    }
    if !foreground {
        return spawn_background(dir);
    }
    let signals = unmount_signals();
    // SAFETY: blocks signals for this thread only; `signals` is a valid set.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };
    if rc != 0 {
        return fail(format!("blocking signals: error {rc}"));
    }
    let dev = open_device(spec)?;
    let fs = BlobFs::mount(
        dev,
        MountOptions {
            cache_bytes,
            discard,
            ..Default::default()
        },
    )
    .ctx(format!("mounting {spec}"))?;
    let me = std::fs::metadata("/proc/self").ctx("reading /proc/self")?;
    let state = Arc::new(State {
        fs,
        inodes: Mutex::new(Inodes::new()),
        handles: Mutex::new(HashMap::new()),
        next_fh: AtomicU64::new(1),
        uid: me.uid(),
        gid: me.gid(),
        mounted_at: SystemTime::now(),
    });
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(spec.to_string()),
        MountOption::Subtype("blobfs".into()),
        MountOption::RW,
    ];
    config.n_threads = Some(1);
    let session = fuser::Session::new(FuseFs(state.clone()), dir, &config);
    let mut session = match session {
        Ok(s) => s,
        Err(e) => {
            let _ = unmount_blobfs(state);
            return fail(format!(
                "FUSE mount of {} failed: {e} (is /dev/fuse usable and fusermount3 installed?)",
                dir.display()
            ));
        }
    };
    let mut unmounter = session.unmount_callable();
    let shown = dir.display().to_string();
    std::thread::spawn(move || loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: `signals` is a valid set and `sig` a valid out-pointer.
        if unsafe { libc::sigwait(&signals, &mut sig) } != 0 {
            return;
        }
        eprintln!("blobfs: signal {sig}: unmounting {shown}");
        match unmounter.unmount() {
            Ok(()) => return,
            Err(e) => eprintln!("blobfs: unmounting {shown}: {e}"),
        }
    });
    eprintln!("blobfs: {spec} mounted at {}", dir.display());
    let ran = session.run();
    // The session is over and dropped its `FuseFs`: close what the kernel
    // left open, then unmount BlobFS so everything is synced.
    let unmounted = unmount_blobfs(state);
    ran.ctx("FUSE session")?;
    unmounted?;
    eprintln!("blobfs: {spec} unmounted cleanly");
    Ok(())
}

fn unmount_blobfs(state: Arc<State>) -> CliResult {
    let handles: Vec<Arc<File>> = state.handles.lock().drain().map(|(_, f)| f).collect();
    for f in handles {
        if let Err(e) = state.close(f) {
            eprintln!("blobfs: closing a file at unmount: {e:?}");
        }
    }
    let Ok(state) = Arc::try_unwrap(state) else {
        return fail("the FUSE session still holds the file system; not unmounted cleanly");
    };
    state.fs.unmount().ctx("unmounting BlobFS")
}

/// Starts `blobfs mount --foreground` with the same arguments as a
/// background process and waits until the directory is mounted.
fn spawn_background(dir: &Path) -> CliResult {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().ctx("finding the blobfs executable")?;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    args.push("--foreground".into());
    let mut child = std::process::Command::new(exe)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        // Its own process group: a Ctrl-C meant for this shell command does
        // not reach it.
        .process_group(0)
        .spawn()
        .ctx("starting the mount process")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().ctx("waiting for the mount process")? {
            return fail(format!(
                "the mount process exited ({status}) before mounting"
            ));
        }
        if is_mount_point(dir) {
            println!(
                "mounted at {} (process {}); unmount with: fusermount3 -u {}",
                dir.display(),
                child.id(),
                dir.display()
            );
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return fail("the mount did not come up within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
