//! The file system: mkfs, mount, the name index and namespace operations.
//!
//! Invariants:
//! - The index maps every live name to exactly one node; every name's parent
//!   directory is in the index (the root "" always is).
//! - Namespace changes (create, mkdir, rename, delete, rmdir) run one at a
//!   time under `ns`, an async lock; lookups take only the index's read lock
//!   and are O(1).
//! - A create or rename becomes durable with one metadata sync of the blob
//!   it names (the commit point); a replaced rename target is deleted after
//!   that, and a crash in between is resolved at mount by `fs.seq`. A
//!   directory rename commits its directory's blob with an intent marker
//!   (`fs.moved_from`), then renames the entries below it, then clears
//!   the marker; mount finishes any rename it finds marked.
//! - At most one directory rename's marker is set at a time: one that an
//!   error left unfinished (`unfinished`) is finished before the next
//!   directory rename starts, and at unmount.
//! - A file deleted while open keeps its blob until the last handle goes.
//! - A namespace change that syncs a file's metadata (a rename of the file
//!   or of a directory above it) holds that file's write lock around the
//!   sync, taken after `ns` (never the other way round: a file operation
//!   gives up its write lock before it takes `ns`), so the sync never makes
//!   a length durable that the file's own sync set before writing the data.

use crate::metrics::{FsShard, Metrics};
use blobstore::metrics::Shards;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blobstore::{
    block_on, Blob, BlobId, BlobOptions, Blobstore, BlobstoreOptions, BlockDevice, DmaBuf,
    LoadOptions,
};
use parking_lot::{Mutex, RwLock};

use crate::cache::{Cache, CacheStats};
use crate::error::{Context, Error, Result};
use crate::file::{File, FileNode, Metadata, Readahead};
use crate::meta;
use crate::name::{self, normalize, normalize_entry};
use crate::unsynced::{self, Owner, Record, Unsynced, UnsyncedRecovery};

/// Options for [`BlobFs::mount`] (and [`BlobFs::mkfs`], which mounts).
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Memory for the read cache, in bytes; 0 turns the cache off (every
    /// read goes to the device). Default 256 MiB.
    pub cache_bytes: u64,
    /// Bytes per cache chunk (a multiple of the device block). Default 4 KiB:
    /// a random read (a RocksDB block lookup) then reads and keeps only the
    /// blocks it needs, where a larger chunk would read and cache mostly
    /// bytes nobody asked for; sequential reads still go to the device in
    /// one I/O of many chunks (readahead).
    pub cache_chunk_bytes: usize,
    /// While the read cache has room (until it first evicts, and again
    /// once it is below half full), a read that misses it fetches the
    /// aligned extent of this many bytes around the miss in one I/O, so a
    /// cold cache fills at the device's bandwidth rather than one random
    /// chunk at a time; a full cache reads only what a miss needs, so this
    /// never pushes out chunks for bytes nobody asked for. Default 128 KiB
    /// (the kernel's default readahead); up to one chunk turns it off.
    pub warm_read_bytes: u64,
    /// `discard=on`: when a file is deleted (or truncated, or replaced by a
    /// rename), its clusters are unmapped on the device before they return
    /// to the free pool, so a thin-provisioned device, an SSD or a sparse
    /// image file gets the space back at once (as `mount -o discard`).
    /// Each delete then waits for the unmap. Default off: `blobfs trim`
    /// (`Blobstore::trim_free`) does the same for all free space at once.
    pub discard: bool,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            cache_bytes: 256 << 20,
            cache_chunk_bytes: 4 << 10,
            warm_read_bytes: 128 << 10,
            discard: false,
        }
    }
}

/// Metadata pages mkfs adds by default to one per cluster: the root
/// record, directories (a page each and no cluster), and the fresh pages a
/// large file's metadata sync writes before it frees the old ones.
pub const SPARE_MD_PAGES: u64 = 64;

/// Options for [`BlobFs::mkfs`].
#[derive(Clone, Debug)]
pub struct MkfsOptions {
    /// Cluster size of the blobstore (the file allocation unit). Default 1 MiB.
    pub cluster_size: u32,
    /// Metadata pages: one per file or directory (a file of more than about
    /// 900 clusters takes one more per 1,012 clusters). Default: one per
    /// cluster and [`SPARE_MD_PAGES`] more, so files of a cluster or more
    /// each use up every cluster before the pages run out.
    pub md_pages: Option<u64>,
    /// Format even when the device holds a known signature (a file system,
    /// a partition table, a blobstore or BlobFS). Default false: mkfs then
    /// fails with the blobstore's `DeviceNotBlank` naming what it found.
    pub force: bool,
}

impl Default for MkfsOptions {
    fn default() -> Self {
        MkfsOptions {
            cluster_size: 1 << 20,
            md_pages: None,
            force: false,
        }
    }
}

/// How to open a file.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    /// Allow reads.
    pub read: bool,
    /// Allow writes.
    pub write: bool,
    /// Create the file if it does not exist.
    pub create: bool,
    /// Fail if the file exists (with `create`).
    pub create_new: bool,
    /// Cut the file to length 0.
    pub truncate: bool,
    /// Reads through this handle bypass the read cache and readahead, as
    /// `O_DIRECT` bypasses the page cache: each read goes to the device
    /// (whole device blocks around the range asked for) and nothing it reads
    /// is cached. Bytes written and not yet on the device are still read
    /// from memory, so the handle sees every write. For callers that keep
    /// their own cache (RocksDB's `use_direct_reads`). A synchronous read
    /// ([`crate::File::read_at`]) at a block-aligned offset into a
    /// block-aligned buffer of whole blocks goes from the device straight
    /// into the caller's buffer where the device allows it (`file:` through
    /// io_uring, `mem:`), with no DMA buffer between; otherwise, and for
    /// NVMe (which reads only into its own DMA memory), through one.
    pub direct: bool,
}

impl OpenOptions {
    /// Read-only access to an existing file.
    pub fn read() -> Self {
        OpenOptions {
            read: true,
            ..Default::default()
        }
    }
    /// Read-write access, creating the file, truncating it to zero.
    pub fn create_truncate() -> Self {
        OpenOptions {
            read: true,
            write: true,
            create: true,
            truncate: true,
            ..Default::default()
        }
    }
    /// Read-write access to an existing file (appends go to its end).
    pub fn append() -> Self {
        OpenOptions {
            read: true,
            write: true,
            ..Default::default()
        }
    }
}

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Last component of the name.
    pub name: String,
    /// True for a directory.
    pub is_dir: bool,
}

/// Space figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpaceInfo {
    /// Bytes files can use, used or not.
    pub total_bytes: u64,
    /// Bytes free for file data.
    pub free_bytes: u64,
    /// Files and directories.
    pub entries: u64,
    /// Bytes per allocation unit (cluster).
    pub cluster_bytes: u64,
}

pub(crate) struct DirNode {
    blob: blobstore::Blob,
    /// Set at creation, changed only by [`BlobFs::set_mtime_async`].
    mtime: AtomicU64,
}

#[derive(Clone)]
enum Entry {
    File(Arc<FileNode>),
    Dir(Arc<DirNode>),
}

#[derive(Default)]
struct Index {
    entries: HashMap<String, Entry>,
    children: HashMap<String, BTreeSet<String>>,
}

impl Index {
    fn insert(&mut self, name: String, e: Entry) {
        if matches!(e, Entry::Dir(_)) {
            self.children.entry(name.clone()).or_default();
        }
        let parent = name::parent(&name);
        // The parent's key is made only the first time (a mount inserts
        // every name).
        match self.children.get_mut(parent) {
            Some(set) => set.insert(name.clone()),
            None => self
                .children
                .entry(parent.to_string())
                .or_default()
                .insert(name.clone()),
        };
        self.entries.insert(name, e);
    }

    fn remove(&mut self, name: &str) -> Option<Entry> {
        let e = self.entries.remove(name)?;
        if let Some(set) = self.children.get_mut(name::parent(name)) {
            set.remove(name);
        }
        if matches!(e, Entry::Dir(_)) {
            self.children.remove(name);
        }
        Some(e)
    }

    fn is_dir(&self, name: &str) -> bool {
        name.is_empty() || matches!(self.entries.get(name), Some(Entry::Dir(_)))
    }

    /// Every name below directory `dir` (not `dir` itself), each directory
    /// before what is in it.
    fn below(&self, dir: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_string()];
        while let Some(d) = todo.pop() {
            for c in self.children.get(&d).into_iter().flatten() {
                out.push(c.clone());
                if self.children.contains_key(c) {
                    todo.push(c.clone());
                }
            }
        }
        out
    }

    /// Moves directory `from`, with everything below it, to `to` (which
    /// must be free, its parent a directory), and gives each file node its
    /// new name.
    fn move_tree(&mut self, from: &str, to: &str) {
        let names: Vec<String> = std::iter::once(from.to_string())
            .chain(self.below(from))
            .collect();
        let moved: Vec<(String, Entry)> = names
            .iter()
            .filter_map(|n| Some((name::rebase(n, from, to)?, self.remove(n)?)))
            .collect();
        debug_assert_eq!(moved.len(), names.len(), "every name below {from}");
        debug_assert!(!self.entries.contains_key(to) && self.is_dir(name::parent(to)));
        for (n, e) in moved {
            if let Entry::File(f) = &e {
                *f.name.write() = n.clone();
            }
            self.insert(n, e);
        }
    }
}

pub(crate) struct FsInner {
    bs: Blobstore,
    device_id: blobstore::device::DeviceId,
    pub ns: futures::lock::Mutex<()>,
    index: RwLock<Index>,
    seq: AtomicU64,
    pub cache: Cache,
    /// Held locks: lock number -> the name it holds, which a rename moves.
    locks: Mutex<HashMap<u64, String>>,
    next_lock: AtomicU64,
    /// Directory renames whose commit is durable but whose entries' new
    /// names, or the clearing of the `fs.moved_from` marker, failed: the
    /// directory's name and blob. Finished before the next directory rename
    /// and at unmount (and by the next mount after a crash).
    unfinished: Mutex<Vec<(String, BlobId)>>,
    pending: Mutex<Vec<Arc<FileNode>>>,
    /// The writer thread's queue (started on first use): appends' full
    /// buffers go there to be written behind the appender.
    writer: Mutex<Option<Writer>>,
    /// Where append buffers live: memory that outlives the process (see
    /// `unsynced.rs`). Its free slots keep their pages for the next files,
    /// so a new WAL or SST file does not fault in and zero a fresh 4 MiB.
    pub unsynced: Arc<Unsynced>,
    /// What this mount found in the unsynced memory a dead process left.
    recovery: UnsyncedRecovery,
    /// File operations counted per thread ([`BlobFs::metrics`]).
    pub metrics: Arc<Shards<FsShard>>,
    /// This mount's generation (`blobfs.mountgen`), which a clean unmount
    /// writes as `blobfs.clean`.
    mount_gen: u64,
    /// The device keeps nothing past a power cut ([`BlockDevice::volatile`]):
    /// [`crate::File::sync`] then writes nothing, the unsynced memory being
    /// as durable as the device.
    pub volatile: bool,
}

/// The writer thread and its queue.
struct Writer {
    jobs: std::sync::mpsc::Sender<BehindJob>,
    thread: std::thread::JoinHandle<()>,
}

/// A buffer to write at an io unit of a file's blob, behind its writer.
type BehindJob = (Arc<FileNode>, u64, blobstore::DmaBuf);

/// The writer thread: writes each job's buffer and reports to the file.
fn run_writer(
    jobs: std::sync::mpsc::Receiver<BehindJob>,
    unsynced: Arc<Unsynced>,
    metrics: Arc<Shards<FsShard>>,
) {
    while let Ok((node, lba, buf)) = jobs.recv() {
        let outcome = block_on(node.land_behind(&unsynced, &metrics, lba, buf));
        let behind = node.behind.clone();
        // Let go of the node before waking anyone: a delete waiting for
        // this write then finds the node free.
        drop(node);
        behind.finish(outcome);
    }
}

static MOUNTED: Mutex<Vec<blobstore::device::DeviceId>> = Mutex::new(Vec::new());

/// True while a BlobFS is mounted on device `id` in this process.
pub(crate) fn is_mounted(id: blobstore::device::DeviceId) -> bool {
    MOUNTED.lock().contains(&id)
}

impl Drop for FsInner {
    fn drop(&mut self) {
        // Gone without an unmount (an unmount retires every header first):
        // what was not synced stays for the next mount, as after a crash.
        self.unsynced.keep_on_free();
        // Writes behind still in flight finish before the device is free.
        if let Some(w) = self.writer.get_mut().take() {
            drop(w.jobs);
            let _ = w.thread.join();
        }
        MOUNTED.lock().retain(|d| *d != self.device_id);
    }
}

impl FsInner {
    /// Hands a buffer to the writer thread; gives it back when there is no
    /// writer thread (it could not be started).
    pub fn write_behind(
        &self,
        node: Arc<FileNode>,
        lba: u64,
        buf: blobstore::DmaBuf,
    ) -> std::result::Result<(), blobstore::DmaBuf> {
        let mut w = self.writer.lock();
        if w.is_none() {
            let (tx, rx) = std::sync::mpsc::channel();
            let unsynced = self.unsynced.clone();
            let metrics = self.metrics.clone();
            let Ok(thread) = std::thread::Builder::new()
                .name("blobfs-writer".into())
                .spawn(move || run_writer(rx, unsynced, metrics))
            else {
                return Err(buf);
            };
            *w = Some(Writer { jobs: tx, thread });
        }
        let jobs = &w.as_ref().expect("just set").jobs;
        jobs.send((node, lba, buf)).map_err(|e| (e.0).2)
    }

    /// An append buffer of `len` bytes in unsynced memory, with no header
    /// yet. Its bytes are stale; the appender writes before it reads them.
    pub fn append_buf(&self, len: usize) -> Result<blobstore::DmaBuf> {
        self.unsynced.alloc(len)
    }

    /// Gives an append buffer back: its bytes are on the blob under durable
    /// metadata (or no longer the file's), so its header goes, and its slot
    /// serves the next [`FsInner::append_buf`].
    pub fn give_back_buf(&self, buf: blobstore::DmaBuf) {
        self.unsynced.retire(&buf);
    }

    /// Marks bytes `[from, to)` of a file as changed on the blob: bumps
    /// its generation, then drops the cached chunks that cover them.
    pub fn invalidate(&self, node: &FileNode, from: u64, to: u64) {
        node.gen.fetch_add(1, Ordering::AcqRel);
        if to > from {
            let cb = self.cache.chunk_bytes() as u64;
            self.cache.invalidate(node.id(), from / cb, (to - 1) / cb);
        }
    }

    pub async fn flush_device(&self) -> blobstore::Result<()> {
        blobstore::channel(self.bs.device())?.flush().await
    }

    /// Deletes the blobs of unlinked files nobody holds any more.
    pub async fn reap_pending(&self) -> Result<()> {
        let ready: Vec<Arc<FileNode>> = {
            let mut p = self.pending.lock();
            let (ready, keep) = std::mem::take(&mut *p)
                .into_iter()
                .partition(|n| n.handles.load(Ordering::Acquire) == 0);
            *p = keep;
            ready
        };
        for node in ready {
            // Its blob's clusters must not be freed under a write in flight.
            node.behind.idle().await;
            let id = node.blob.id();
            let name = node.name();
            match Arc::try_unwrap(node) {
                Ok(n) => {
                    let cb = self.cache.chunk_bytes() as u64;
                    let size = n.blob.size_bytes();
                    if size > 0 {
                        self.cache.invalidate(n.id(), 0, (size - 1) / cb);
                    }
                    drop(n);
                    self.bs.delete_blob(id).await.ctx(&name)?;
                }
                Err(n) => self.pending.lock().push(n),
            }
        }
        Ok(())
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::AcqRel)
    }

    fn lookup(&self, name: &str) -> Option<Entry> {
        self.index.read().entries.get(name).cloned()
    }

    fn check_parent(&self, name: &str) -> Result<()> {
        let parent = name::parent(name);
        if !self.index.read().is_dir(parent) {
            return Err(match self.lookup(parent) {
                Some(_) => Error::NotADirectory(parent.to_string()),
                None => Error::NotFound(parent.to_string()),
            });
        }
        Ok(())
    }

    async fn create_node(&self, name: &str, kind: u8) -> Result<Entry> {
        let now = meta::now_ns();
        let mut xattrs = vec![
            (meta::NAME.to_string(), name.as_bytes().to_vec()),
            (meta::KIND.to_string(), vec![kind]),
            (
                meta::SEQ.to_string(),
                meta::enc_u64(self.next_seq()).to_vec(),
            ),
            (meta::MTIME.to_string(), meta::enc_u64(now).to_vec()),
        ];
        if kind == meta::KIND_FILE {
            xattrs.push((meta::LEN.to_string(), meta::enc_u64(0).to_vec()));
        }
        let id = self
            .bs
            .create_blob(BlobOptions {
                num_clusters: 0,
                thin_provision: false,
                xattrs,
            })
            .await
            .ctx(name)?;
        let blob = self.bs.open_blob(id).await.ctx(name)?;
        Ok(if kind == meta::KIND_FILE {
            Entry::File(Arc::new(FileNode::new(
                blob,
                name.to_string(),
                0,
                now,
                self.bs.cluster_size() as u64,
            )))
        } else {
            Entry::Dir(Arc::new(DirNode {
                blob,
                mtime: AtomicU64::new(now),
            }))
        })
    }

    /// Moves the locks held on `from`, and with `tree` (a directory) on
    /// names below it, to the names a rename of `from` to `to` gives them.
    fn move_locks(&self, from: &str, to: &str, tree: bool) {
        for n in self.locks.lock().values_mut() {
            if let Some(moved) = name::rebase(n, from, to).filter(|_| tree || n == from) {
                *n = moved;
            }
        }
    }

    /// Makes entry `e`'s name `name` durable. A file's write lock is held
    /// meanwhile: a sync of the file sets its length before it writes its
    /// data, and a metadata sync of ours in between would make that length
    /// durable over bytes not written yet.
    async fn sync_name(&self, name: &str, e: &Entry) -> Result<()> {
        let (blob, _st) = match e {
            Entry::File(n) => (&n.blob, Some(n.state.lock().await)),
            Entry::Dir(d) => (&d.blob, None),
        };
        blob.set_xattr(meta::NAME, name.as_bytes()).ctx(name)?;
        blob.sync_metadata().await.ctx(name)
    }

    /// Finishes the durable part of directory `dir`'s rename (its blob
    /// `dir_blob` holds the `fs.moved_from` marker, durable): every entry
    /// below it gets its name made durable, then the marker goes.
    async fn finish_move(&self, dir: &str, dir_blob: &Blob) -> Result<()> {
        let below: Vec<(String, Entry)> = {
            let idx = self.index.read();
            idx.below(dir)
                .into_iter()
                .filter_map(|n| idx.entries.get(&n).cloned().map(|e| (n, e)))
                .collect()
        };
        for (n, e) in &below {
            self.sync_name(n, e).await?;
        }
        if dir_blob.get_xattr(meta::MOVED_FROM).is_some() {
            dir_blob.remove_xattr(meta::MOVED_FROM).ctx(dir)?;
        }
        dir_blob.sync_metadata().await.ctx(dir)
    }

    /// Finishes the directory renames an error left unfinished (ns lock
    /// held); those that fail again stay for the next try.
    async fn finish_unfinished(&self) -> Result<()> {
        let todo = std::mem::take(&mut *self.unfinished.lock());
        let mut first_err = None;
        for (dir, id) in todo {
            // Gone (removed, with its marker) when no longer there.
            let Some(Entry::Dir(d)) = self.lookup(&dir) else {
                continue;
            };
            if d.blob.id() != id {
                continue;
            }
            if let Err(e) = self.finish_move(&dir, &d.blob).await {
                first_err.get_or_insert(e);
                self.unfinished.lock().push((dir, id));
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn handle(self: &Arc<Self>, node: Arc<FileNode>, opts: OpenOptions) -> File {
        node.handles.fetch_add(1, Ordering::AcqRel);
        let node_name = node.name();
        File {
            fs: self.clone(),
            node,
            read: opts.read || !opts.write,
            write: opts.write,
            direct: opts.direct,
            wal: crate::metrics::is_wal(&node_name),
            ra: Readahead::default(),
        }
    }
}

/// A mounted BlobFS. Cheap to clone; safe to share between threads.
///
/// Every operation has an async form (`*_async`) and a synchronous one that
/// runs it on the calling thread with [`blobstore::block_on`].
#[derive(Clone)]
pub struct BlobFs {
    inner: Arc<FsInner>,
}

/// A held file lock; released on drop. Like a POSIX record lock, which
/// belongs to the file and not to its name, it moves with a rename of the
/// file or of a directory above it.
pub struct FileLock {
    fs: Arc<FsInner>,
    id: u64,
}

impl FileLock {
    /// The locked name (after any rename that moved it).
    pub fn name(&self) -> String {
        self.fs
            .locks
            .lock()
            .get(&self.id)
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        self.fs.locks.lock().remove(&self.id);
    }
}

/// Checks the bytes a file's last one-flush sync added (its `fs.tail`):
/// returns the length to use, `len` when they are on the blob, else the
/// length before that sync, which it then makes the file's durable length.
async fn check_tail(blob: &Blob, len: u64, tail: &[u8], what: &str) -> Result<u64> {
    let (prev, crc) = meta::dec_tail(tail, what)?;
    if prev > len || len - prev > meta::TAIL_MAX {
        return Err(Error::Corrupt(format!(
            "{what}: {} covers bytes {prev}..{len}",
            meta::TAIL
        )));
    }
    let unit = blob.io_unit_size() as u64;
    let (a, b) = (prev / unit * unit, len.div_ceil(unit) * unit);
    let ok = b == a || {
        let buf = DmaBuf::new((b - a) as usize).ctx(what)?;
        let buf = blob.read(a / unit, buf).await.ctx(what)?;
        crc32c::crc32c(&buf[(prev - a) as usize..(len - a) as usize]) == crc
    };
    if ok {
        return Ok(len);
    }
    // A power cut kept the length of a sync whose data did not land.
    blob.set_xattr(meta::LEN, &meta::enc_u64(prev)).ctx(what)?;
    blob.remove_xattr(meta::TAIL).ctx(what)?;
    blob.sync_metadata().await.ctx(what)?;
    Ok(prev)
}

/// Writes back what a dead process left in unsynced memory for one file
/// (`recs`, all of the last mount): each buffer's bytes (a file's buffers
/// never hold different bytes for one offset, so their order does not
/// matter), then the length, synced (ordered: data before length).
/// Returns the file's length. Buffers that do not fit what the device holds
/// are not applied, and said so in `report`.
async fn write_back(
    blob: &Blob,
    len: u64,
    mut recs: Vec<Record>,
    region: &Unsynced,
    cluster: u64,
    what: &str,
    report: &mut UnsyncedRecovery,
) -> Result<u64> {
    recs.sort_by_key(|r| r.header.file_off);
    let unit = blob.io_unit_size() as u64;
    let new_len = recs.iter().map(|r| r.header.file_len).max().unwrap_or(len);
    let first = recs.iter().map(|r| r.header.file_off).min().unwrap_or(len);
    let odd = recs.iter().find(|r| {
        let h = &r.header;
        !h.file_off.is_multiple_of(unit)
            || h.used > unsynced::SLOT_DATA as u64
            || h.file_off + h.used > h.file_len
    });
    let refuse = if let Some(r) = odd {
        Some(format!(
            "buffer at file byte {} with {} bytes for a length of {} is not an append buffer",
            r.header.file_off, r.header.used, r.header.file_len
        ))
    } else if new_len < len {
        Some(format!(
            "it says the length is {new_len}, below the synced length {len}"
        ))
    } else if first > len && first > blob.size_bytes() {
        Some(format!(
            "bytes {}..{first} are neither in it nor on the device",
            blob.size_bytes()
        ))
    } else {
        None
    };
    if let Some(why) = refuse {
        report
            .ignored
            .push(format!("{} buffer(s) of {what}: {why}", recs.len()));
        return Ok(len);
    }
    if blob.size_bytes() < new_len {
        blob.resize_uninit(new_len.div_ceil(cluster))
            .await
            .ctx(what)?;
    }
    for r in &recs {
        let used = r.header.used as usize;
        if used == 0 {
            continue;
        }
        let padded = (used as u64).div_ceil(unit) * unit;
        let mut buf = DmaBuf::new(padded as usize).ctx(what)?;
        if padded > used as u64 {
            // The last block keeps what the blob has past these bytes.
            let last = r.header.file_off + padded - unit;
            let blk = DmaBuf::new(unit as usize).ctx(what)?;
            let blk = blob.read(last / unit, blk).await.ctx(what)?;
            buf[(padded - unit) as usize..].copy_from_slice(&blk);
        }
        region.read_data(r, &mut buf[..used])?;
        blob.write(r.header.file_off / unit, buf).await.ctx(what)?;
        report.buffers += 1;
        report.bytes += used as u64;
    }
    blob.set_xattr(meta::LEN, &meta::enc_u64(new_len))
        .ctx(what)?;
    if blob.get_xattr(meta::TAIL).is_some() {
        blob.remove_xattr(meta::TAIL).ctx(what)?;
    }
    blob.sync_metadata().await.ctx(what)?;
    report.files += 1;
    Ok(new_len)
}

/// Why the device on which a mount found no BlobFS is not one, naming what
/// it holds (shown after "not a BlobFS: "): `file:/x.img holds a blobstore
/// of type "kv"`, `... holds an ext4 file system (signature at byte 1080)`,
/// `... holds no known signature (blank or unknown data)`.
pub(crate) async fn not_blobfs_reason(dev: &Arc<dyn BlockDevice>, e: blobstore::Error) -> String {
    let name = dev.name();
    if let blobstore::Error::WrongType { found, .. } = &e {
        return format!(
            "{name} holds {}",
            blobstore::probe::describe_blobstore(found)
        );
    }
    match blobstore::probe::probe(dev).await {
        Ok(Some(sig)) => format!(
            "{name} holds {} (signature at byte {})",
            sig.what, sig.offset
        ),
        Ok(None) => format!("{name} holds no known signature (blank or unknown data)"),
        Err(_) => format!("{name}: {e}"),
    }
}

/// A directory rename a crash interrupted: the `fs.moved_from` marker on
/// directory blob `dir` (see [`meta`]).
pub(crate) struct Moved {
    /// The directory's blob.
    pub dir: BlobId,
    /// The rename's sequence number.
    pub seq: u64,
    /// The directory's old name.
    pub old: String,
}

impl Moved {
    /// The marker `v` found on blob `id` of kind `kind` (`what` names it in
    /// errors): only a directory carries one.
    pub fn decode(id: BlobId, kind: u8, v: &[u8], what: &str) -> Result<Moved> {
        if kind != meta::KIND_DIR {
            return Err(Error::Corrupt(format!(
                "{what}: a file with the directory rename marker {}",
                meta::MOVED_FROM
            )));
        }
        let (seq, old) = meta::dec_moved_from(v, what)?;
        Ok(Moved { dir: id, seq, old })
    }
}

/// Finishes, in `names` (each blob's id, `fs.seq` and name), the directory
/// renames that `marks` say were interrupted: every name below a mark's
/// old name with a lower `fs.seq` than the mark's (a name given before
/// that rename) moves below the directory's name. Oldest mark first (it
/// sorts `marks`). Returns, for each mark in that order, the indices of
/// the names it changed. Names that would break the naming rules are
/// [`Error::Corrupt`]: no rename makes them.
pub(crate) fn roll_forward(
    marks: &mut [Moved],
    names: &mut [(BlobId, u64, &mut String)],
) -> Result<Vec<Vec<usize>>> {
    marks.sort_by_key(|m| m.seq);
    let mut out = Vec::with_capacity(marks.len());
    for m in marks.iter() {
        let Some(to) = names
            .iter()
            .find(|(id, ..)| *id == m.dir)
            .map(|(_, _, n)| n.to_string())
        else {
            out.push(Vec::new());
            continue;
        };
        if name::is_within(&to, &m.old) {
            return Err(Error::Corrupt(format!(
                "blob {}: directory {to} was moved from {:?}, which holds it",
                m.dir, m.old
            )));
        }
        let mut changed = Vec::new();
        for (i, (id, seq, n)) in names.iter_mut().enumerate() {
            if *id == m.dir || *seq >= m.seq || n.as_str() == m.old {
                continue;
            }
            if let Some(new) = name::rebase(n, &m.old, &to) {
                if new.len() > name::MAX_NAME_LEN {
                    return Err(Error::Corrupt(format!(
                        "blob {id}: {n} would become {new}, longer than {} bytes",
                        name::MAX_NAME_LEN
                    )));
                }
                **n = new;
                changed.push(i);
            }
        }
        out.push(changed);
    }
    Ok(out)
}

struct Found {
    id: BlobId,
    blob: blobstore::Blob,
    name: String,
    kind: u8,
    seq: u64,
    len: u64,
    mtime: u64,
}

/// What blob `id`'s xattrs say about its file or directory, checked (the
/// length against the blob's size). Errors name the blob, and its name
/// once that is known.
fn found_entry(id: BlobId, blob: blobstore::Blob) -> Result<Found> {
    let corrupt = |name: &str, why: String| {
        let at = if name.is_empty() {
            format!("blob {id}")
        } else {
            format!("blob {id} ({name})")
        };
        Error::Corrupt(format!("{at}: {why}"))
    };
    let (name, kind, seq, mtime, len) = {
        let md = blob.xattrs();
        let name = md
            .get(meta::NAME)
            .and_then(|n| std::str::from_utf8(n).ok())
            .ok_or_else(|| corrupt("", "no valid name".into()))?
            .to_string();
        let kind = match md.get(meta::KIND) {
            Some([k]) if *k == meta::KIND_FILE || *k == meta::KIND_DIR => *k,
            _ => return Err(corrupt(&name, "bad kind".into())),
        };
        let u64_of = |key: &str| -> Result<u64> {
            let v = md
                .get(key)
                .ok_or_else(|| corrupt(&name, format!("xattr {key} missing")))?;
            let b: [u8; 8] = v
                .try_into()
                .map_err(|_| corrupt(&name, format!("xattr {key} is {} bytes, not 8", v.len())))?;
            Ok(u64::from_le_bytes(b))
        };
        let seq = u64_of(meta::SEQ)?;
        let mtime = u64_of(meta::MTIME)?;
        let len = if kind == meta::KIND_FILE {
            u64_of(meta::LEN)?
        } else {
            0
        };
        (name, kind, seq, mtime, len)
    };
    if len > blob.size_bytes() {
        return Err(corrupt(
            &name,
            format!("length {len} exceeds its {} bytes", blob.size_bytes()),
        ));
    }
    Ok(Found {
        id,
        blob,
        name,
        kind,
        seq,
        len,
        mtime,
    })
}

impl BlobFs {
    /// Makes a new, empty BlobFS on `dev` and mounts it. Refuses a device
    /// that holds a known signature (a file system, a partition table, any
    /// blobstore, an older BlobFS) unless `mkfs.force` is set.
    pub async fn mkfs_async(
        dev: Arc<dyn BlockDevice>,
        mkfs: MkfsOptions,
        opts: MountOptions,
    ) -> Result<BlobFs> {
        if MOUNTED.lock().contains(&dev.id()) {
            return Err(Error::store(
                "mkfs",
                blobstore::Error::Busy(format!("{} is mounted", dev.name())),
            ));
        }
        let bs = Blobstore::init(
            dev.clone(),
            BlobstoreOptions {
                cluster_size: mkfs.cluster_size,
                md_pages: Some(mkfs.md_pages.unwrap_or_else(|| {
                    let clusters = dev.geometry().size_bytes() / mkfs.cluster_size.max(1) as u64;
                    clusters + SPARE_MD_PAGES
                })),
                bstype: meta::BSTYPE.into(),
                force: mkfs.force,
                ..Default::default()
            },
        )
        .await
        .ctx("mkfs")?;
        let sb = bs
            .create_blob(BlobOptions {
                xattrs: vec![
                    (
                        meta::VERSION.into(),
                        meta::FORMAT_VERSION.to_le_bytes().to_vec(),
                    ),
                    (meta::FS_ID.into(), unsynced::random_id()?.to_vec()),
                ],
                ..Default::default()
            })
            .await
            .ctx("mkfs")?;
        bs.set_super_blob(Some(sb)).await.ctx("mkfs")?;
        bs.unload().await.ctx("mkfs")?;
        Self::mount_async(dev, opts).await
    }

    /// Synchronous [`BlobFs::mkfs_async`].
    pub fn mkfs(
        dev: Arc<dyn BlockDevice>,
        mkfs: MkfsOptions,
        opts: MountOptions,
    ) -> Result<BlobFs> {
        block_on(Self::mkfs_async(dev, mkfs, opts))
    }

    /// Mounts the BlobFS on `dev`: loads the blobstore, reads every file's
    /// metadata into the name index, finishes deletes and renames that a
    /// crash interrupted.
    pub async fn mount_async(dev: Arc<dyn BlockDevice>, opts: MountOptions) -> Result<BlobFs> {
        let unit = dev.geometry().block_size as usize;
        if opts.cache_chunk_bytes == 0 || !opts.cache_chunk_bytes.is_multiple_of(unit) {
            return Err(Error::InvalidArgument(format!(
                "cache chunk of {} bytes is not a multiple of the block size {unit}",
                opts.cache_chunk_bytes
            )));
        }
        {
            let mut m = MOUNTED.lock();
            if m.contains(&dev.id()) {
                return Err(Error::store(
                    "mount",
                    blobstore::Error::Busy(format!("{} is already mounted", dev.name())),
                ));
            }
            m.push(dev.id());
        }
        let device_id = dev.id();
        let res = Self::mount_inner(dev, opts).await;
        if res.is_err() {
            MOUNTED.lock().retain(|d| *d != device_id);
        }
        res
    }

    async fn mount_inner(dev: Arc<dyn BlockDevice>, opts: MountOptions) -> Result<BlobFs> {
        let device_id = dev.id();
        let bs = match Blobstore::load(
            dev.clone(),
            LoadOptions {
                bstype: meta::BSTYPE.into(),
            },
        )
        .await
        {
            Ok(bs) => bs,
            Err(e @ (blobstore::Error::NotABlobstore(_) | blobstore::Error::WrongType { .. })) => {
                return Err(Error::NotBlobFs(not_blobfs_reason(&dev, e).await))
            }
            Err(e) => return Err(Error::store("mount", e)),
        };
        if opts.discard {
            // Deletes (also those the mount finishes below) and shrinks
            // unmap clusters before the allocator gets them back.
            bs.set_clear_method(blobstore::ClearMethod::Unmap);
        }
        let sb = bs
            .super_blob()
            .ok_or_else(|| Error::Corrupt("no super blob".into()))?;
        let sb_blob = bs.open_blob(sb).await.ctx("super blob")?;
        let v = sb_blob.get_xattr(meta::VERSION);
        if v.as_deref() != Some(&meta::FORMAT_VERSION.to_le_bytes()[..]) {
            return Err(Error::Corrupt(format!("unsupported BlobFS version {v:?}")));
        }
        let fs_id: [u8; 16] = match sb_blob.get_xattr(meta::FS_ID) {
            Some(v) => v.as_slice().try_into().map_err(|_| {
                Error::Corrupt(format!(
                    "super blob: {} is {} bytes, not 16",
                    meta::FS_ID,
                    v.len()
                ))
            })?,
            // A BlobFS made before ids: it gets one now (synced below).
            None => unsynced::random_id()?,
        };
        let gen = match sb_blob.get_xattr(meta::MOUNT_GEN) {
            Some(v) => meta::dec_u64(Some(v), meta::MOUNT_GEN, "super blob")?,
            None => 0,
        };
        let here = Owner {
            boot: unsynced::boot_id(),
            fs: fs_id,
            gen,
        };
        // The last mount was unmounted cleanly: every file's bytes were
        // flushed, so no `fs.tail` needs checking against the device.
        let clean = sb_blob.get_xattr(meta::CLEAN).as_deref() == Some(&meta::enc_u64(gen)[..]);
        // What a process that died with this device left in memory: this
        // mount's to write back if the last mount wrote it.
        let mut recovery = UnsyncedRecovery {
            path: dev.unsynced_memory(),
            ..Default::default()
        };
        let region = Arc::new(Unsynced::open(recovery.path.as_deref(), Some(dev.clone()))?);
        let mut by_blob: HashMap<u64, Vec<Record>> = HashMap::new();
        for rec in region.records()? {
            match unsynced::stale_reason(&rec.header.owner, &here) {
                None => by_blob.entry(rec.header.blob).or_default().push(rec),
                Some(why) => recovery.ignored.push(format!(
                    "buffer of blob {} (file bytes {}..{}): {why}",
                    rec.header.blob,
                    rec.header.file_off,
                    rec.header.file_off + rec.header.used
                )),
            }
        }
        let mut found: Vec<Found> = Vec::new();
        let mut marks: Vec<Moved> = Vec::new();
        let mut max_seq = 0;
        // What this mount finished for a stop that was not clean (events).
        let mut reaped_unlinked = 0usize;
        let mut replaced_names = 0usize;
        for id in bs.blob_ids() {
            if id == sb {
                continue;
            }
            // Names for errors are made only on the way out: a mount goes
            // through every file.
            let what = || format!("blob {id}");
            let blob = bs
                .open_blob(id)
                .await
                .map_err(|e| Error::store(&what(), e))?;
            if blob.get_xattr(meta::UNLINKED).is_some() {
                drop(blob);
                bs.delete_blob(id).await.ctx(&what())?;
                reaped_unlinked += 1;
                continue;
            }
            let mut f = found_entry(id, blob)?;
            if !clean {
                if let Some(tail) = f.blob.get_xattr(meta::TAIL) {
                    let what = format!("{} ({})", what(), f.name);
                    f.len = check_tail(&f.blob, f.len, &tail, &what).await?;
                }
            }
            if f.kind == meta::KIND_FILE {
                if let Some(recs) = by_blob.remove(&id.0) {
                    let what = format!("{} ({})", what(), f.name);
                    let cluster = bs.cluster_size() as u64;
                    f.len =
                        write_back(&f.blob, f.len, recs, &region, cluster, &what, &mut recovery)
                            .await?;
                }
            }
            if let Some(m) = f.blob.get_xattr(meta::MOVED_FROM) {
                marks.push(Moved::decode(
                    id,
                    f.kind,
                    &m,
                    &format!("{} ({})", what(), f.name),
                )?);
            }
            max_seq = max_seq.max(f.seq);
            found.push(f);
        }
        for (blob, recs) in by_blob {
            for rec in recs {
                recovery.ignored.push(format!(
                    "buffer of blob {blob} (file bytes {}..{}): no such file any more \
                     (deleted, or not a file)",
                    rec.header.file_off,
                    rec.header.file_off + rec.header.used
                ));
            }
        }
        // Directory renames a crash interrupted: every entry below the old
        // name gets its new name, synced, before the marker goes.
        let finished_renames = marks.len();
        if !marks.is_empty() {
            let mut names: Vec<(BlobId, u64, &mut String)> = found
                .iter_mut()
                .map(|f| (f.id, f.seq, &mut f.name))
                .collect();
            let moved: BTreeSet<usize> = roll_forward(&mut marks, &mut names)?
                .into_iter()
                .flatten()
                .collect();
            for i in moved {
                let f = &found[i];
                f.blob
                    .set_xattr(meta::NAME, f.name.as_bytes())
                    .ctx(&f.name)?;
                f.blob.sync_metadata().await.ctx(&f.name)?;
            }
            for m in &marks {
                if let Some(f) = found.iter().find(|f| f.id == m.dir) {
                    f.blob.remove_xattr(meta::MOVED_FROM).ctx(&f.name)?;
                    f.blob.sync_metadata().await.ctx(&f.name)?;
                }
            }
        }
        // By name (parents before what is in them), the newest of a name
        // first: see the winners below.
        found.sort_unstable_by(|a, b| a.name.cmp(&b.name).then(b.seq.cmp(&a.seq)));
        // Everything applied is synced: only now does the memory go, and a
        // new generation starts, so what an earlier mount wrote is stale
        // from here on.
        sb_blob.set_xattr(meta::FS_ID, &fs_id).ctx("super blob")?;
        sb_blob
            .set_xattr(meta::MOUNT_GEN, &meta::enc_u64(gen + 1))
            .ctx("super blob")?;
        sb_blob.sync_metadata().await.ctx("super blob")?;
        drop(sb_blob);
        region.reset(Owner {
            gen: gen + 1,
            ..here
        })?;
        let inner = Arc::new(FsInner {
            cache: Cache::new(
                opts.cache_bytes,
                opts.cache_chunk_bytes,
                opts.warm_read_bytes,
            ),
            bs: bs.clone(),
            device_id,
            ns: futures::lock::Mutex::new(()),
            index: RwLock::new(Index::default()),
            seq: AtomicU64::new(max_seq + 1),
            locks: Mutex::new(HashMap::new()),
            next_lock: AtomicU64::new(0),
            unfinished: Mutex::new(Vec::new()),
            pending: Mutex::new(Vec::new()),
            writer: Mutex::new(None),
            unsynced: region,
            recovery,
            metrics: Arc::new(Shards::new()),
            mount_gen: gen + 1,
            volatile: dev.volatile(),
        });
        // Two blobs with one name: a rename over an existing file crashed
        // before deleting the old one. The newer one wins.
        let mut winners: Vec<Found> = Vec::with_capacity(found.len());
        for f in found {
            if winners.last().is_none_or(|w| w.name != f.name) {
                winners.push(f);
                continue;
            }
            let id = f.id;
            drop(f.blob);
            bs.delete_blob(id).await.ctx(&f.name)?;
            replaced_names += 1;
        }
        // Parents first (sorted above), so every name's parent is in the
        // index.
        debug_assert!(winners.windows(2).all(|w| w[0].name < w[1].name));
        let fs = BlobFs { inner };
        let mut orphans = Vec::new();
        {
            let mut idx = fs.inner.index.write();
            let cluster = bs.cluster_size() as u64;
            for f in winners {
                if !name::is_normal_entry(&f.name) {
                    return Err(Error::Corrupt(format!(
                        "blob {}: bad name {:?}",
                        f.id, f.name
                    )));
                }
                let e = if f.kind == meta::KIND_FILE {
                    Entry::File(Arc::new(FileNode::new(
                        f.blob,
                        f.name.clone(),
                        f.len,
                        f.mtime,
                        cluster,
                    )))
                } else {
                    Entry::Dir(Arc::new(DirNode {
                        blob: f.blob,
                        mtime: AtomicU64::new(f.mtime),
                    }))
                };
                if !idx.is_dir(name::parent(&f.name)) {
                    orphans.push(f.name.clone());
                }
                idx.insert(f.name, e);
            }
        }
        let orphaned = orphans.len();
        for o in orphans {
            // A parent can only be missing after damage; recreate it so the
            // file stays reachable (fsck reports it).
            let mut missing = Vec::new();
            let mut p = name::parent(&o).to_string();
            while !fs.inner.index.read().is_dir(&p) {
                missing.push(p.clone());
                p = name::parent(&p).to_string();
            }
            for d in missing.into_iter().rev() {
                let e = fs.inner.create_node(&d, meta::KIND_DIR).await?;
                fs.inner.index.write().insert(d, e);
            }
        }
        let r = &fs.inner.recovery;
        let entries = fs.inner.index.read().entries.len();
        if reaped_unlinked + replaced_names + orphaned + finished_renames > 0
            || r.buffers > 0
            || !r.ignored.is_empty()
        {
            tracing::warn!(
                device = %bs.device().name(),
                entries,
                unsynced_files_written_back = r.files,
                unsynced_bytes_written_back = r.bytes,
                unsynced_buffers_ignored = r.ignored.len(),
                directory_renames_finished = finished_renames,
                deleted_while_open_reaped = reaped_unlinked,
                replaced_by_rename_reaped = replaced_names,
                parents_recreated = orphaned,
                "BlobFS mounted after an unclean stop; finished what it left"
            );
        } else {
            tracing::info!(device = %bs.device().name(), entries, "BlobFS mounted");
        }
        Ok(fs)
    }

    /// Synchronous [`BlobFs::mount_async`].
    pub fn mount(dev: Arc<dyn BlockDevice>, opts: MountOptions) -> Result<BlobFs> {
        block_on(Self::mount_async(dev, opts))
    }

    /// Syncs every file and unmounts cleanly. Fails with `Busy` while other
    /// clones of this `BlobFs` or open files still exist.
    pub async fn unmount_async(self) -> Result<()> {
        let inner = self.inner;
        {
            let _g = inner.ns.lock().await;
            inner.finish_unfinished().await?;
            let nodes: Vec<Arc<FileNode>> = inner
                .index
                .read()
                .entries
                .values()
                .filter_map(|e| match e {
                    Entry::File(n) => Some(n.clone()),
                    Entry::Dir(_) => None,
                })
                .collect();
            for n in nodes {
                n.sync(&inner).await?;
            }
            inner.reap_pending().await?;
            // Every file is synced: nothing in unsynced memory is needed.
            inner.unsynced.retire_all();
        }
        let inner = Arc::try_unwrap(inner).map_err(|_| {
            Error::store(
                "unmount",
                blobstore::Error::Busy("files or clones of the file system are still open".into()),
            )
        })?;
        // Nothing can write any more: say so for the next mount, which
        // then need not check files' last bytes against the device.
        let bs = inner.bs.clone();
        let sb = bs
            .super_blob()
            .ok_or_else(|| Error::Corrupt("no super blob".into()))?;
        let sb_blob = bs.open_blob(sb).await.ctx("super blob")?;
        sb_blob
            .set_xattr(meta::CLEAN, &meta::enc_u64(inner.mount_gen))
            .ctx("super blob")?;
        sb_blob.sync_metadata().await.ctx("super blob")?;
        drop(sb_blob);
        drop(inner);
        bs.unload().await.ctx("unmount")
    }

    /// What this mount found in the unsynced memory of a process that died
    /// with the device (written back, or ignored and why).
    pub fn unsynced_recovery(&self) -> &UnsyncedRecovery {
        &self.inner.recovery
    }

    /// Synchronous [`BlobFs::unmount_async`].
    pub fn unmount(self) -> Result<()> {
        block_on(self.unmount_async())
    }

    /// Opens (and with `create`, creates) a file.
    pub async fn open_async(&self, name: &str, opts: OpenOptions) -> Result<File> {
        let name = normalize_entry(name)?;
        let fs = &self.inner;
        let existing = fs.lookup(&name);
        let node = match existing {
            Some(Entry::Dir(_)) => return Err(Error::IsADirectory(name)),
            Some(Entry::File(_)) if opts.create_new => return Err(Error::AlreadyExists(name)),
            Some(Entry::File(n)) => n,
            None if !opts.create && !opts.create_new => return Err(Error::NotFound(name)),
            None => {
                let _g = fs.ns.lock().await;
                match fs.lookup(&name) {
                    Some(Entry::File(n)) if !opts.create_new => n,
                    Some(Entry::File(_)) => return Err(Error::AlreadyExists(name)),
                    Some(Entry::Dir(_)) => return Err(Error::IsADirectory(name)),
                    None => {
                        fs.check_parent(&name)?;
                        let e = fs.create_node(&name, meta::KIND_FILE).await?;
                        fs.index.write().insert(name.clone(), e.clone());
                        match e {
                            Entry::File(n) => n,
                            Entry::Dir(_) => unreachable!("created a file"),
                        }
                    }
                }
            }
        };
        let f = fs.handle(node, opts);
        if opts.truncate && opts.write && !f.is_empty() {
            f.truncate_async(0).await?;
        }
        Ok(f)
    }

    /// Synchronous [`BlobFs::open_async`].
    pub fn open(&self, name: &str, opts: OpenOptions) -> Result<File> {
        block_on(self.open_async(name, opts))
    }

    /// Creates a new, empty file for reading and writing; fails if it exists.
    pub fn create(&self, name: &str) -> Result<File> {
        self.open(
            name,
            OpenOptions {
                read: true,
                write: true,
                create_new: true,
                ..Default::default()
            },
        )
    }

    /// Metadata of a file or directory.
    pub fn stat(&self, name: &str) -> Result<Metadata> {
        let name = normalize(name)?;
        if name.is_empty() {
            return Ok(Metadata {
                name,
                is_dir: true,
                len: 0,
                mtime_ns: 0,
                blob_id: self.inner.bs.super_blob().unwrap_or(BlobId(0)),
            });
        }
        match self.inner.lookup(&name) {
            None => Err(Error::NotFound(name)),
            Some(Entry::File(n)) => Ok(Metadata {
                name,
                is_dir: false,
                len: n.len.load(Ordering::Acquire),
                mtime_ns: n.mtime.load(Ordering::Acquire),
                blob_id: n.blob.id(),
            }),
            Some(Entry::Dir(d)) => Ok(Metadata {
                name,
                is_dir: true,
                len: 0,
                mtime_ns: d.mtime.load(Ordering::Acquire),
                blob_id: d.blob.id(),
            }),
        }
    }

    /// Sets the modification time of a file or directory, in nanoseconds
    /// since the Unix epoch, and makes it durable (with a file's data
    /// written before). The root directory has no time of its own: it is
    /// [`Error::InvalidArgument`]. A later write to a file sets its time to
    /// the time of that write, as on any file system.
    pub async fn set_mtime_async(&self, name: &str, mtime_ns: u64) -> Result<()> {
        let name = normalize(name)?;
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "the root directory has no modification time to set".into(),
            ));
        }
        let fs = &self.inner;
        let _g = fs.ns.lock().await;
        match fs.lookup(&name) {
            None => Err(Error::NotFound(name)),
            Some(Entry::File(n)) => n.set_mtime(fs, mtime_ns).await,
            Some(Entry::Dir(d)) => {
                d.blob
                    .set_xattr(meta::MTIME, &meta::enc_u64(mtime_ns))
                    .ctx(&name)?;
                d.blob.sync_metadata().await.ctx(&name)?;
                d.mtime.store(mtime_ns, Ordering::Release);
                Ok(())
            }
        }
    }

    /// Synchronous [`BlobFs::set_mtime_async`].
    pub fn set_mtime(&self, name: &str, mtime_ns: u64) -> Result<()> {
        block_on(self.set_mtime_async(name, mtime_ns))
    }

    /// True if a file or directory of that name exists.
    pub fn exists(&self, name: &str) -> bool {
        normalize(name).is_ok_and(|n| n.is_empty() || self.inner.lookup(&n).is_some())
    }

    /// All file and directory names that start with `prefix`, sorted.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        let prefix = prefix.trim_start_matches('/');
        let mut v: Vec<String> = self
            .inner
            .index
            .read()
            .entries
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// The entries of directory `dir` ("" or "/" for the root), sorted.
    pub fn read_dir(&self, dir: &str) -> Result<Vec<DirEntry>> {
        let dir = normalize(dir)?;
        let idx = self.inner.index.read();
        if !idx.is_dir(&dir) {
            return Err(match idx.entries.get(&dir) {
                Some(_) => Error::NotADirectory(dir),
                None => Error::NotFound(dir),
            });
        }
        Ok(idx
            .children
            .get(&dir)
            .map(|set| {
                set.iter()
                    .map(|full| DirEntry {
                        name: name::base(full).to_string(),
                        is_dir: idx.is_dir(full),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Creates a directory; its parent must exist.
    pub async fn create_dir_async(&self, dir: &str) -> Result<()> {
        let dir = normalize_entry(dir)?;
        let fs = &self.inner;
        let _g = fs.ns.lock().await;
        if fs.lookup(&dir).is_some() {
            return Err(Error::AlreadyExists(dir));
        }
        fs.check_parent(&dir)?;
        let e = fs.create_node(&dir, meta::KIND_DIR).await?;
        fs.index.write().insert(dir, e);
        Ok(())
    }

    /// Synchronous [`BlobFs::create_dir_async`].
    pub fn create_dir(&self, dir: &str) -> Result<()> {
        block_on(self.create_dir_async(dir))
    }

    /// Creates a directory and any missing parents; fine if it exists.
    pub fn create_dir_all(&self, dir: &str) -> Result<()> {
        let dir = normalize(dir)?;
        let mut path = String::new();
        for comp in dir.split('/').filter(|c| !c.is_empty()) {
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(comp);
            match self.create_dir(&path) {
                Ok(()) => {}
                Err(Error::AlreadyExists(_)) if self.inner.index.read().is_dir(&path) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Removes an empty directory.
    pub async fn remove_dir_async(&self, dir: &str) -> Result<()> {
        let dir = normalize_entry(dir)?;
        let fs = &self.inner;
        let _g = fs.ns.lock().await;
        let node = match fs.lookup(&dir) {
            None => return Err(Error::NotFound(dir)),
            Some(Entry::File(_)) => return Err(Error::NotADirectory(dir)),
            Some(Entry::Dir(d)) => d,
        };
        if fs
            .index
            .read()
            .children
            .get(&dir)
            .is_some_and(|c| !c.is_empty())
        {
            return Err(Error::DirectoryNotEmpty(dir));
        }
        let id = node.blob.id();
        fs.index.write().remove(&dir);
        drop(node);
        fs.bs.delete_blob(id).await.ctx(&dir)
    }

    /// Synchronous [`BlobFs::remove_dir_async`].
    pub fn remove_dir(&self, dir: &str) -> Result<()> {
        block_on(self.remove_dir_async(dir))
    }

    /// Deletes a file. Open handles keep reading its data until they close.
    pub async fn remove_file_async(&self, name: &str) -> Result<()> {
        let name = normalize_entry(name)?;
        let fs = &self.inner;
        let _g = fs.ns.lock().await;
        let node = match fs.lookup(&name) {
            None => return Err(Error::NotFound(name)),
            Some(Entry::Dir(_)) => return Err(Error::IsADirectory(name)),
            Some(Entry::File(n)) => n,
        };
        fs.index.write().remove(&name);
        self.unlink_node(node, &name).await?;
        fs.reap_pending().await
    }

    /// Synchronous [`BlobFs::remove_file_async`].
    pub fn remove_file(&self, name: &str) -> Result<()> {
        block_on(self.remove_file_async(name))
    }

    /// Drops a node that left the index (ns lock held).
    async fn unlink_node(&self, node: Arc<FileNode>, name: &str) -> Result<()> {
        let fs = &self.inner;
        node.unlinked.store(true, Ordering::Release);
        if node.handles.load(Ordering::Acquire) > 0 {
            // Still open: mark it durably so a crash before the last close
            // does not bring the name back.
            node.blob.set_xattr(meta::UNLINKED, &[1]).ctx(name)?;
            node.blob.sync_metadata().await.ctx(name)?;
        }
        fs.pending.lock().push(node);
        Ok(())
    }

    /// Renames a file or a directory atomically, as POSIX `rename(2)`.
    ///
    /// A file replaces an existing target file (a directory target is
    /// [`Error::IsADirectory`]). A directory moves with everything below
    /// it; its target must not exist or be an empty directory, which it
    /// replaces ([`Error::DirectoryNotEmpty`] otherwise, and
    /// [`Error::NotADirectory`] for a file); a directory cannot move into
    /// itself or below itself ([`Error::InvalidArgument`]). The target's
    /// parent must be a directory. Renaming a name to itself does nothing.
    ///
    /// Open files keep working and what they write later is kept under
    /// their new names; locks ([`BlobFs::lock`]) move with their names.
    /// After a crash at any point, the next mount finds the whole file or
    /// tree under the old name or under the new one, never both, never
    /// split. An error after a directory rename's commit point leaves it
    /// done in memory and durable, with its last steps finished by the
    /// next directory rename, the unmount or the next mount.
    pub async fn rename_async(&self, from: &str, to: &str) -> Result<()> {
        let from = normalize_entry(from)?;
        let to = normalize_entry(to)?;
        let fs = &self.inner;
        let _g = fs.ns.lock().await;
        let node = match fs.lookup(&from) {
            None => return Err(Error::NotFound(from)),
            Some(Entry::Dir(d)) => return self.rename_dir(&from, &to, d).await,
            Some(Entry::File(n)) => n,
        };
        if from == to {
            return Ok(());
        }
        let replaced = match fs.lookup(&to) {
            Some(Entry::Dir(_)) => return Err(Error::IsADirectory(to)),
            Some(Entry::File(n)) => Some(n),
            None => None,
        };
        fs.check_parent(&to)?;
        let seq = fs.next_seq();
        {
            // The file's write lock over the metadata sync (after the ns
            // lock, as everywhere): a sync of the file sets its length
            // before it writes its data, and our sync in between would make
            // that length durable over bytes not written yet (see
            // `sync_name`).
            let _st = node.state.lock().await;
            node.blob.set_xattr(meta::NAME, to.as_bytes()).ctx(&from)?;
            node.blob
                .set_xattr(meta::SEQ, &meta::enc_u64(seq))
                .ctx(&from)?;
            if let Err(e) = node.blob.sync_metadata().await.ctx(&from) {
                // Not committed: put the old name back in memory.
                let _ = node.blob.set_xattr(meta::NAME, from.as_bytes());
                return Err(e);
            }
        }
        {
            let mut idx = fs.index.write();
            idx.remove(&from);
            if replaced.is_some() {
                idx.remove(&to);
            }
            *node.name.write() = to.clone();
            idx.insert(to.clone(), Entry::File(node));
        }
        fs.move_locks(&from, &to, false);
        if let Some(old) = replaced {
            self.unlink_node(old, &to).await?;
        }
        fs.reap_pending().await
    }

    /// [`BlobFs::rename_async`] of directory `from` (ns lock held).
    ///
    /// The commit point is one metadata sync of the directory's blob: its
    /// new name and `fs.seq`, with the intent marker `fs.moved_from`
    /// naming the old name (see [`meta`]). Then each entry below gets its
    /// new name, synced; then the marker goes. A mount that finds the
    /// marker finishes the rename before anything else.
    async fn rename_dir(&self, from: &str, to: &str, dir: Arc<DirNode>) -> Result<()> {
        let fs = &self.inner;
        if from == to {
            return Ok(());
        }
        if name::is_within(to, from) {
            return Err(Error::InvalidArgument(format!(
                "cannot move directory {from} into itself ({to} is below it)"
            )));
        }
        let replaced = match fs.lookup(to) {
            Some(Entry::File(_)) => return Err(Error::NotADirectory(to.to_string())),
            Some(Entry::Dir(d)) => {
                let empty = fs
                    .index
                    .read()
                    .children
                    .get(to)
                    .is_none_or(|c| c.is_empty());
                if !empty {
                    return Err(Error::DirectoryNotEmpty(to.to_string()));
                }
                Some(d)
            }
            None => None,
        };
        fs.check_parent(to)?;
        let below = fs.index.read().below(from);
        if let Some(long) = below
            .iter()
            .filter_map(|n| name::rebase(n, from, to))
            .find(|n| n.len() > name::MAX_NAME_LEN)
        {
            return Err(Error::InvalidName {
                name: long,
                reason: format!(
                    "the rename would make it longer than {} bytes",
                    name::MAX_NAME_LEN
                ),
            });
        }
        // One rename with its marker at a time: an earlier one's first.
        fs.finish_unfinished().await?;
        let seq = fs.next_seq();
        let old_seq = dir.blob.get_xattr(meta::SEQ);
        let commit = async {
            dir.blob.set_xattr(meta::NAME, to.as_bytes()).ctx(from)?;
            dir.blob
                .set_xattr(meta::SEQ, &meta::enc_u64(seq))
                .ctx(from)?;
            dir.blob
                .set_xattr(meta::MOVED_FROM, &meta::enc_moved_from(seq, from))
                .ctx(from)?;
            dir.blob.sync_metadata().await.ctx(from)
        };
        if let Err(e) = commit.await {
            // Not committed: the old metadata back in memory, and on the
            // device too if it can take it (the failed sync may have
            // landed).
            let _ = dir.blob.set_xattr(meta::NAME, from.as_bytes());
            if let Some(s) = old_seq {
                let _ = dir.blob.set_xattr(meta::SEQ, &s);
            }
            if dir.blob.get_xattr(meta::MOVED_FROM).is_some() {
                let _ = dir.blob.remove_xattr(meta::MOVED_FROM);
            }
            let _ = dir.blob.sync_metadata().await;
            return Err(e);
        }
        // Committed: the rename is done, in memory from here on.
        {
            let mut idx = fs.index.write();
            if replaced.is_some() {
                idx.remove(to);
            }
            idx.move_tree(from, to);
        }
        fs.move_locks(from, to, true);
        let finished = fs.finish_move(to, &dir.blob).await;
        if finished.is_err() {
            fs.unfinished.lock().push((to.to_string(), dir.blob.id()));
        }
        let deleted = match replaced {
            // Its name is taken by a higher `fs.seq`: a crash before this
            // delete leaves it to the next mount to delete.
            Some(old) => {
                let id = old.blob.id();
                drop(old);
                fs.bs.delete_blob(id).await.ctx(to)
            }
            None => Ok(()),
        };
        finished.and(deleted)
    }

    /// Synchronous [`BlobFs::rename_async`].
    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        block_on(self.rename_async(from, to))
    }

    /// Takes the lock named `name` (a file need not exist). A second lock of
    /// the same name fails with [`Error::Locked`] until the first is dropped.
    /// A rename of the name (or of a directory above it) moves the lock to
    /// the new name, as a POSIX lock stays with its file; a lock on a
    /// replaced rename target stays on its name.
    pub fn lock(&self, name: &str) -> Result<FileLock> {
        let name = normalize_entry(name)?;
        let mut locks = self.inner.locks.lock();
        if locks.values().any(|n| *n == name) {
            return Err(Error::Locked(name));
        }
        let id = self.inner.next_lock.fetch_add(1, Ordering::Relaxed);
        locks.insert(id, name);
        Ok(FileLock {
            fs: self.inner.clone(),
            id,
        })
    }

    /// Space and entry counts.
    pub fn space(&self) -> SpaceInfo {
        let bs = &self.inner.bs;
        let cs = bs.cluster_size() as u64;
        SpaceInfo {
            total_bytes: bs.data_clusters() * cs,
            free_bytes: bs.free_clusters() * cs,
            entries: self.inner.index.read().entries.len() as u64,
            cluster_bytes: cs,
        }
    }

    /// The file system `inner` belongs to.
    #[cfg(feature = "prometheus")]
    pub(crate) fn from_inner(inner: Arc<FsInner>) -> BlobFs {
        BlobFs { inner }
    }

    /// A reference that does not keep the file system mounted.
    #[cfg(feature = "prometheus")]
    pub(crate) fn downgrade(&self) -> std::sync::Weak<FsInner> {
        Arc::downgrade(&self.inner)
    }

    /// What the file system has done since the mount: file reads,
    /// appends, syncs (WALs apart), write-behinds and their stalls, metadata
    /// syncs, the cache, the device's I/O and the space, with latency
    /// quantiles ([`Metrics`]; [`Metrics::to_prometheus`] renders it).
    /// Counting is always on: per-thread counters, folded here.
    pub fn metrics(&self) -> Metrics {
        Metrics::fold(
            &self.inner.metrics.all(),
            self.inner.bs.metrics(),
            self.inner.cache.stats(),
            self.space(),
        )
    }

    /// Read-cache statistics.
    pub fn cache_stats(&self) -> CacheStats {
        self.inner.cache.stats()
    }

    /// The blobstore under the file system.
    pub fn blobstore(&self) -> &Blobstore {
        &self.inner.bs
    }
}
