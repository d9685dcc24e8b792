//! The metadata transaction: [`MdTxn`], the proof that the store's
//! metadata lock is held.
//!
//! Metadata operations (create, delete, resize, sync, thin allocation,
//! snapshots, the super blob, check, repair, trim) run one at a time per
//! store. Each begins with [`StoreInner::begin`], which waits for the
//! store's async metadata lock and returns an `MdTxn`; every function that
//! changes metadata is a method of `MdTxn`, so a caller without the lock
//! cannot call it. The data path takes no transaction for clusters a blob
//! already owns.
//!
//! Invariants:
//! - At most one `MdTxn` of a store exists at a time; it lives on one
//!   thread (it holds that thread's channel) and ends when dropped.
//! - A cluster taken for a blob ([`MdTxn::take_clusters`]) is either
//!   recorded in the blob's map ([`MdTxn::map_clusters`]) or given back
//!   ([`MdTxn::give_back_clusters`]) before the transaction ends.
//! - A map entry is set only where the blob owned no cluster.

use std::ops::Deref;
use std::sync::atomic::Ordering;

use futures::lock::MutexGuard;

use super::state::{BlobInner, StoreInner, NO_MD_PAGE};
use super::units::{ClusterIdx, PageIdx};
use crate::device::IoChannel;
use crate::error::{Error, Result};
use crate::BlobId;

/// Proof that the store's metadata lock is held, with the channel of the
/// thread that holds it. Derefs to the store.
pub(crate) struct MdTxn<'a> {
    store: &'a StoreInner,
    ch: IoChannel,
    _lock: MutexGuard<'a, ()>,
}

impl StoreInner {
    /// Begins a metadata transaction: waits for the metadata lock.
    /// [`Error::Shutdown`] once the store is unloaded.
    pub(crate) async fn begin(&self) -> Result<MdTxn<'_>> {
        let ch = self.chan()?;
        let lock = self.md_lock.lock().await;
        Ok(MdTxn {
            store: self,
            ch,
            _lock: lock,
        })
    }
}

impl Deref for MdTxn<'_> {
    type Target = StoreInner;

    fn deref(&self) -> &StoreInner {
        self.store
    }
}

impl Drop for MdTxn<'_> {
    /// Debug builds check, as the transaction ends, what every metadata
    /// change must leave true across the store.
    fn drop(&mut self) {
        if cfg!(debug_assertions) {
            self.store.debug_check_owners();
        }
    }
}

impl StoreInner {
    /// Asserts (debug builds) that every cluster a loaded blob maps or
    /// still owns (pending free) is in use in the bitmap and owned by no
    /// other loaded blob, and that every page its metadata names is in use.
    fn debug_check_owners(&self) {
        let mut owned: Vec<(ClusterIdx, crate::BlobId)> = Vec::new();
        let mut pages: Vec<PageIdx> = Vec::new();
        for b in self.blobs.lock().values() {
            let md = b.md.read();
            let clusters = md.clusters.iter().flatten();
            let clusters = clusters.chain(&md.pending_free_clusters);
            owned.extend(clusters.map(|&c| (c, b.id)));
            pages.push(b.page);
            pages.extend(md.extent_pages.iter().flatten().chain(&md.cont_pages));
        }
        owned.sort_unstable();
        for w in owned.windows(2) {
            debug_assert!(
                w[0].0 != w[1].0,
                "cluster {} owned by blobs {} and {}",
                w[0].0,
                w[0].1,
                w[1].1
            );
        }
        let a = self.alloc.lock();
        for (c, id) in &owned {
            debug_assert!(
                a.cluster_used(*c),
                "blob {id} maps cluster {c}, which the bitmap says is free"
            );
        }
        for p in pages {
            debug_assert!(
                a.page_used(p),
                "metadata page {p} of a loaded blob is free in the bitmap"
            );
        }
    }
}

impl MdTxn<'_> {
    /// The channel of the thread that holds the transaction.
    pub(crate) fn ch(&self) -> &IoChannel {
        &self.ch
    }

    /// A free metadata page for a new blob's first page, marked as a blob
    /// id; [`Error::NoSpace`] when the metadata region is full.
    pub(crate) fn take_first_page(&self) -> Result<PageIdx> {
        let mut a = self.alloc.lock();
        let p = a
            .alloc_pages(1)
            .ok_or_else(|| Error::NoSpace(NO_MD_PAGE.into()))?[0];
        a.set_blobid(p, true);
        Ok(p)
    }

    /// Gives back the first page of a blob whose creation was taken back
    /// (the page is zeroed on the device, or never named anything).
    pub(crate) fn give_back_first_page(&self, page: PageIdx) {
        let mut a = self.alloc.lock();
        a.set_blobid(page, false);
        a.free_page(page);
    }

    /// `n` free clusters, not yet zeroed; `why` says what
    /// wants them when there are not enough ([`Error::NoSpace`]).
    pub(crate) fn take_clusters(
        &self,
        n: usize,
        why: impl FnOnce() -> String,
    ) -> Result<Vec<ClusterIdx>> {
        self.alloc
            .lock()
            .alloc_clusters(n)
            .ok_or_else(|| Error::NoSpace(why()))
    }

    /// Gives back clusters [`MdTxn::take_clusters`] took that no blob
    /// ended up mapping.
    pub(crate) fn give_back_clusters(&self, clusters: &[ClusterIdx]) {
        let mut a = self.alloc.lock();
        clusters.iter().for_each(|&c| a.free_cluster(c));
    }

    /// Records fresh clusters in `blob`'s map: `(blob cluster index, device
    /// cluster)`, each where the blob owned none. Durable at the next sync.
    pub(crate) fn map_clusters(&self, blob: &BlobInner, fresh: &[(usize, ClusterIdx)]) {
        let per = self.layout.extent_per_page;
        let mut md = blob.md.write();
        for &(idx, c) in fresh {
            debug_assert_eq!(
                md.clusters[idx], None,
                "cluster {idx} of {} mapped twice",
                blob.id
            );
            debug_assert!(
                c.get() >= self.layout.reserved_clusters
                    && (c.get() as u64) < self.layout.total_clusters
            );
            md.clusters[idx] = Some(c);
            md.dirty_extents.insert(idx / per);
        }
        md.touch();
        md.debug_check(per);
    }

    /// Sets a blob's size in clusters.
    pub(crate) async fn resize(&self, blob: &BlobInner, n: u64, zero: bool) -> Result<()> {
        let per = self.layout.extent_per_page;
        let (old, thin) = {
            let md = blob.md.read();
            if md.read_only() {
                return Err(Error::ReadOnly(blob.id));
            }
            (md.num_clusters, md.thin())
        };
        if n > self.layout.total_clusters {
            return Err(Error::NoSpace(format!(
                "blob {} cannot hold {n} clusters: the store has {}",
                blob.id, self.layout.total_clusters
            )));
        }
        let mut fresh = Vec::new();
        if n > old && !thin {
            let want = (n - old) as usize;
            fresh = self.alloc.lock().alloc_clusters(want).ok_or_else(|| {
                Error::NoSpace(format!("{want} clusters wanted to grow blob {}", blob.id))
            })?;
            let zeroed = if zero {
                self.zero_clusters(self.ch(), &fresh).await
            } else {
                Ok(())
            };
            if let Err(e) = zeroed {
                let mut a = self.alloc.lock();
                fresh.iter().for_each(|&c| a.free_cluster(c));
                return Err(e);
            }
        }
        let mut md = blob.md.write();
        let n_us = n as usize;
        if n < old {
            let gone: Vec<ClusterIdx> = md.clusters.drain(n_us..).flatten().collect();
            md.pending_free_clusters.extend(gone);
            let keep = n_us.div_ceil(per);
            let gone_pages: Vec<PageIdx> = md.extent_pages.drain(keep..).flatten().collect();
            md.pending_free_pages.extend(gone_pages);
            md.dirty_extents.retain(|&k| k < keep);
            if !n_us.is_multiple_of(per) {
                md.dirty_extents.insert(keep - 1);
            }
        } else if n > old {
            md.clusters.resize(n_us, None);
            md.extent_pages.resize(n_us.div_ceil(per), None);
            for (i, c) in fresh.into_iter().enumerate() {
                let idx = old as usize + i;
                md.clusters[idx] = Some(c);
                md.dirty_extents.insert(idx / per);
            }
            // A partial last extent page changes length when the blob grows.
            if !(old as usize).is_multiple_of(per) {
                md.dirty_extents.insert(old as usize / per);
            }
        }
        md.num_clusters = n;
        md.touch();
        md.debug_check(per);
        Ok(())
    }

    /// Zeroes the first page of a blob whose creation failed, durably;
    /// false if that failed too (the page may then still hold the blob).
    pub(crate) async fn undo_first_page(&self, page: PageIdx) -> bool {
        let zero = vec![0u8; self.layout.page_size as usize];
        self.write_bytes(self.ch(), self.layout.md_lba(page), &zero)
            .await
            .is_ok()
            && self.ch().flush().await.is_ok()
    }

    /// Takes back, in memory, a delete of `blob` that failed once it may
    /// have changed the blob's first page on the device (zeroed it, or
    /// written a removal marker into it). The blob stays, with all its pages
    /// and clusters, and with the super block's name if it had it
    /// (`was_super`); its metadata is marked changed, so its first page is
    /// written again: here if the device lets us, else at its next sync,
    /// at the latest at unload, which syncs every blob before it writes the
    /// bitmaps and the super block. Until then `set_super_blob` syncs it
    /// before naming it. A crash before that leaves the blob deleted or
    /// whole, both of which load.
    pub(crate) async fn undo_delete(&self, blob: &BlobInner, was_super: bool) {
        blob.md.write().touch();
        blob.first_page_doubtful.store(true, Ordering::Release);
        if was_super {
            *self.super_blob.lock() = blob.id.0;
        }
        // Best effort: on an error the blob stays changed (and doubtful),
        // for the next sync or unload.
        if self.sync_blob(blob).await.is_ok() && was_super {
            // The blob is durable again, so the super block may name it.
            let _ = self.write_super(self.ch(), false).await;
        }
    }

    /// Makes the super block stop naming `id`, durably, before `id` goes:
    /// a super block naming a missing blob would not load. True if `id` was
    /// the super blob.
    pub(crate) async fn retire_super_blob(&self, id: BlobId) -> Result<bool> {
        let was_super = {
            let mut sb = self.super_blob.lock();
            let was = *sb == id.0;
            if was {
                *sb = 0;
            }
            was
        };
        if was_super {
            if let Err(e) = self.write_super(self.ch(), false).await {
                *self.super_blob.lock() = id.0;
                return Err(e);
            }
        }
        Ok(was_super)
    }
}
