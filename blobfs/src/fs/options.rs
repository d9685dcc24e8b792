//! The options and small value types of the public API: how to mount
//! ([`MountOptions`]), format ([`MkfsOptions`]) and open a file
//! ([`OpenOptions`]), and what a listing ([`DirEntry`]) and the space
//! figures ([`SpaceInfo`]) return. Plain data: no I/O, no locks.

/// Options for [`BlobFs::mount`](crate::BlobFs::mount) (and
/// [`BlobFs::mkfs`](crate::BlobFs::mkfs), which mounts).
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

/// Options for [`BlobFs::mkfs`](crate::BlobFs::mkfs).
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
