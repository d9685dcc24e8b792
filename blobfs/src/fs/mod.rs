//! The file system: the mounted [`BlobFs`], and the state its clones, its
//! files and its writer thread share ([`FsInner`]).
//!
//! Where things happen:
//! - [`options`]: the mount, mkfs and open options; listing and space
//!   figures.
//! - [`mount`]: mkfs, mount (which builds the name index and finishes
//!   what an unclean stop left) and unmount; [`recovery`]: the checks and
//!   repairs a mount makes on each blob, some of which fsck shares.
//! - [`index`]: the name index, in memory.
//! - [`namespace`]: open, create, stat, mtime, listings, directories,
//!   deletes; [`rename`]: atomic rename of a file or of a directory tree.
//! - [`locks`]: file locks, which move with renames.
//! - [`writer`]: the writer thread, which writes appends' full buffers
//!   behind the appender.
//! - [`file`]: a file of the mount: its node in the index, its reads,
//!   appends and syncs, and the handles callers hold. A child of this
//!   module because a file is part of a mount: the index holds its node and
//!   its handle holds the mount.
//! - Here: the shared state, and what every part uses of it (lookups,
//!   creating a node, deleting the blobs of files deleted while open,
//!   making handles), and the small accessors of [`BlobFs`].
//!
//! Invariants (each module lists its own):
//! - The index maps every live name to exactly one node; every name's parent
//!   directory is in the index (the root "" always is).
//! - Namespace changes (create, mkdir, rename, delete, rmdir) run one at a
//!   time under `ns`, an async lock; lookups take only the index's read lock
//!   and are O(1).
//! - Lock order: `ns` first, then a file's write lock (never the other way
//!   round: a file operation gives up its write lock before it takes `ns`).
//! - A file deleted while open keeps its blob until the last handle goes.

pub(crate) mod file;
mod index;
mod locks;
mod mount;
mod namespace;
mod options;
mod recovery;
mod rename;
mod writer;

pub use locks::FileLock;
pub(crate) use mount::is_mounted;
pub use options::{DirEntry, MkfsOptions, MountOptions, OpenOptions, SpaceInfo, SPARE_MD_PAGES};
pub(crate) use recovery::{roll_forward, Moved};

use crate::metrics::{FsShard, Metrics};
use blobstore::metrics::Shards;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blobstore::{BlobId, BlobOptions, Blobstore};
use parking_lot::{Mutex, RwLock};

use crate::cache::{Cache, CacheStats};
use crate::error::{Context, Error, Result};
use crate::meta;
use crate::name;
use crate::unsynced::{Unsynced, UnsyncedRecovery};
use file::{File, FileNode, Readahead};
use index::{DirNode, Entry, Index};
use writer::Writer;

/// The state of one mount, shared by the clones of its [`BlobFs`], its
/// files, its file locks and its writer thread.
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
    /// `unsynced/`). Its free slots keep their pages for the next files,
    /// so a new WAL or SST file does not fault in and zero a fresh 4 MiB.
    pub unsynced: Arc<Unsynced>,
    /// What this mount found in the unsynced memory a dead process left.
    recovery: UnsyncedRecovery,
    /// File operations counted per thread ([`BlobFs::metrics`]).
    pub metrics: Arc<Shards<FsShard>>,
    /// This mount's generation (`blobfs.mountgen`), which a clean unmount
    /// writes as `blobfs.clean`.
    mount_gen: u64,
    /// The device keeps nothing past a power cut
    /// ([`BlockDevice::volatile`](blobstore::BlockDevice::volatile)):
    /// [`crate::File::sync`] then writes nothing, the unsynced memory being
    /// as durable as the device.
    pub volatile: bool,
}

impl Drop for FsInner {
    fn drop(&mut self) {
        // Gone without an unmount (an unmount retires every header first):
        // what was not synced stays for the next mount, as after a crash.
        self.unsynced.keep_on_free();
        // Writes behind still in flight finish before the device is free.
        if let Some(w) = self.writer.get_mut().take() {
            w.stop();
        }
        mount::MOUNTED.lock().retain(|d| *d != self.device_id);
    }
}

impl FsInner {
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

impl BlobFs {
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
