//! Format, mount and unmount: [`BlobFs::mkfs`], [`BlobFs::mount`] and the
//! clean [`BlobFs::unmount`].
//!
//! A mount loads the blobstore, reads every blob's xattrs, finishes what an
//! unclean stop left (with the checks and repairs of `recovery.rs`), and
//! builds the name index from what it found.
//!
//! Invariants:
//! - One mount per device in this process (`MOUNTED`, which fsck asks
//!   through [`is_mounted`]); mkfs refuses a mounted device.
//! - A mount finishes every directory rename it finds marked before it
//!   builds the index, and two blobs with one name (a rename over an
//!   existing file that a crash stopped before it deleted the old one) are
//!   resolved by `fs.seq`: the newer one wins, the other is deleted.
//! - Everything a mount writes back or repairs is synced before the
//!   unsynced memory is cleared and a new mount generation starts, so what
//!   an earlier mount wrote is stale from then on.
//! - An unmount syncs every file, then writes the mount's generation as
//!   `blobfs.clean`, so the next mount need not check files' last bytes
//!   against the device.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use blobstore::metrics::Shards;
use blobstore::{
    block_on, BlobId, BlobOptions, Blobstore, BlobstoreOptions, BlockDevice, LoadOptions,
};
use parking_lot::{Mutex, RwLock};

use super::index::{DirNode, Entry, Index};
use super::recovery::{check_tail, found_entry, roll_forward, write_back, Found, Moved};
use super::{BlobFs, FsInner, MkfsOptions, MountOptions, SPARE_MD_PAGES};
use crate::cache::Cache;
use crate::error::{Context, Error, Result};
use crate::fs::file::FileNode;
use crate::meta;
use crate::name;
use crate::unsynced::{self, Owner, Record, Unsynced, UnsyncedRecovery};

/// The devices a BlobFS of this process is mounted on.
pub(super) static MOUNTED: Mutex<Vec<blobstore::device::DeviceId>> = Mutex::new(Vec::new());

/// True while a BlobFS is mounted on device `id` in this process.
pub(crate) fn is_mounted(id: blobstore::device::DeviceId) -> bool {
    MOUNTED.lock().contains(&id)
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
}
