//! Snapshots and clones, with SPDK's semantics, and clearing freed clusters.
//!
//! - A snapshot of blob B is a new read-only blob that takes over all of
//!   B's clusters; B becomes a thin clone of it (it owns no cluster and
//!   reads everything through the snapshot). The snapshot inherits B's
//!   parent, so snapshots of clones form chains.
//! - A clone of a read-only blob (a snapshot, or a blob made read-only) is a
//!   new thin blob of the same size whose parent is that blob.
//! - A read of a cluster a blob does not own goes to its parent, then the
//!   parent's parent, and so on; past the end of a parent, or with no
//!   parent at all, it reads zeroes.
//! - The first write to such a cluster copies the parent's cluster into a
//!   fresh one (copy-on-write) and makes the new mapping durable before it
//!   completes, as a thin allocation does.
//! - Inflate gives a blob every cluster (copied from its ancestors, or
//!   zeroed) and drops its parent; decouple copies only the clusters its
//!   parent owns and makes the grandparent its parent.
//! - A snapshot with clones cannot be deleted, except with exactly one
//!   clone: then the clone takes over the snapshot's clusters it does not
//!   own and the snapshot's parent, and the snapshot goes.
//!
//! Invariants:
//! - Every cluster is owned by at most one blob (a snapshot and its clones
//!   never both map one cluster), on disk after recovery and in memory.
//! - A loaded blob has its whole parent chain loaded (`BlobInner::parent`),
//!   so the data path resolves reads without metadata I/O.
//! - `StoreInner::clones` names, for every snapshot, exactly the blobs whose
//!   parent it is.
//! - An operation that changes two blobs writes a recovery marker on the
//!   snapshot first ([`PendingOp`]) and clears it last; load finishes or
//!   undoes whatever a crash interrupted (FORMAT.md, "Recovery").

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::state::{check_xattr, BlobInner, BlobMd, StoreInner};
use super::txn::MdTxn;
use super::units::ClusterIdx;
use super::Blobstore;
use crate::error::{Error, Result};
use crate::format::{self, PendingOp};
use crate::BlobId;

/// Longest parent chain followed (a guard against cycles in bad metadata).
pub(crate) const MAX_CHAIN: usize = 4096;

/// The device cluster a blob reads for its cluster `idx` when it does not
/// own it: the nearest ancestor's, or `None` for zeroes.
pub(crate) fn ancestor_cluster(parent: Option<Arc<BlobInner>>, idx: usize) -> Option<ClusterIdx> {
    let mut cur = parent;
    for _ in 0..MAX_CHAIN {
        let b = cur?;
        {
            let md = b.md.read();
            match md.clusters.get(idx) {
                None => return None,
                Some(&Some(c)) => return Some(c),
                Some(None) => {}
            }
        }
        cur = b.parent.read().clone();
    }
    None
}

impl StoreInner {
    /// Clones of `id`, in id order.
    pub(crate) fn clones_of(&self, id: BlobId) -> Vec<BlobId> {
        self.clones
            .lock()
            .get(&id)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    pub(crate) fn link_clone(&self, parent: Option<BlobId>, clone: BlobId) {
        if let Some(p) = parent {
            self.clones.lock().entry(p).or_default().insert(clone);
        }
    }

    pub(crate) fn unlink_clone(&self, clone: BlobId, parent: Option<BlobId>) {
        if let Some(p) = parent {
            let mut map = self.clones.lock();
            if let Some(set) = map.get_mut(&p) {
                set.remove(&clone);
                if set.is_empty() {
                    map.remove(&p);
                }
            }
        }
    }
}

impl MdTxn<'_> {
    /// Gives `blob` fresh clusters for `fills` (blob cluster index, source),
    /// filled from the source or with zeroes, and records them in memory.
    /// Nothing changes on failure.
    async fn adopt_clusters(
        &self,
        blob: &BlobInner,
        fills: &[(usize, Option<ClusterIdx>)],
    ) -> Result<()> {
        if fills.is_empty() {
            return Ok(());
        }
        let fresh = self.take_clusters(fills.len(), || {
            format!(
                "{} clusters wanted to copy into blob {}",
                fills.len(),
                blob.id
            )
        })?;
        let pairs: Vec<(ClusterIdx, Option<ClusterIdx>)> = fresh
            .iter()
            .zip(fills)
            .map(|(&d, &(_, s))| (d, s))
            .collect();
        if let Err(e) = self.fill_clusters(self.ch(), &pairs).await {
            self.give_back_clusters(&fresh);
            return Err(e);
        }
        let mapped: Vec<(usize, ClusterIdx)> = fills
            .iter()
            .zip(&fresh)
            .map(|(&(i, _), &c)| (i, c))
            .collect();
        self.map_clusters(blob, &mapped);
        Ok(())
    }

    /// Deletes snapshot `snap` into its only clone.
    pub(crate) async fn delete_into_clone(
        &self,
        snap: &Arc<BlobInner>,
        clone_id: BlobId,
    ) -> Result<()> {
        let clone = self.load_blob(clone_id).await?;
        let was_super = self.retire_super_blob(snap.id).await?;
        // (a) The marker: from here on, load finishes the removal as soon
        // as no blob names the snapshot as its parent.
        snap.md.write().pending = Some(PendingOp::Removal);
        snap.md.write().touch();
        if let Err(e) = self.sync_blob(snap).await {
            // The marker may be on the device or not; the snapshot stays
            // (load keeps it while its clone names it) and is written again
            // without the marker.
            snap.md.write().pending = None;
            self.undo_delete(snap, was_super).await;
            return Err(e);
        }
        // (b) The clone takes what it reads through the snapshot.
        let per = self.layout.extent_per_page;
        let (snap_md, mut taken) = {
            let smd = snap.md.read().clone();
            let mut cmd = clone.md.write();
            let mut taken = Vec::new();
            let n = cmd.clusters.len().min(smd.clusters.len());
            for idx in 0..n {
                if let (None, Some(c)) = (cmd.clusters[idx], smd.clusters[idx]) {
                    cmd.clusters[idx] = Some(c);
                    cmd.dirty_extents.insert(idx / per);
                    taken.push(c);
                }
            }
            cmd.parent = smd.parent;
            cmd.touch();
            cmd.debug_check(per);
            (smd, taken)
        };
        *clone.parent.write() = snap.parent.read().clone();
        self.unlink_clone(clone_id, Some(snap.id));
        self.link_clone(snap_md.parent, clone_id);
        self.unlink_clone(snap.id, snap_md.parent);
        // From here on the snapshot is gone from memory whatever happens:
        // on an error its pages stay allocated (a leak the next load's
        // recovery reclaims), never reused while the disk may name them.
        self.blobs.lock().remove(&snap.id);
        self.alloc.lock().set_blobid(snap.page, false);
        let finished = async {
            self.sync_blob(&clone).await?;
            // (c) The snapshot goes.
            let zero = vec![0u8; self.layout.page_size as usize];
            self.write_bytes(self.ch(), self.layout.md_lba(snap.page), &zero)
                .await?;
            self.ch().flush().await
        }
        .await;
        if let Err(e) = finished {
            // The snapshot's first page, with its marker, may stay on the
            // device, which the bitmaps in memory no longer say: the next
            // load must scan, and it then discards the snapshot once the
            // clone (still changed in memory, synced at the latest by
            // unload) no longer names it, or keeps it if the clone does.
            self.needs_scan.store(true, Ordering::Release);
            return Err(e);
        }
        taken.sort_unstable();
        let freed: Vec<ClusterIdx> = snap_md
            .clusters
            .iter()
            .flatten()
            .copied()
            .filter(|c| taken.binary_search(c).is_err())
            .collect();
        self.clear_clusters(self.ch(), &freed).await;
        let mut a = self.alloc.lock();
        freed.iter().for_each(|&c| a.free_cluster(c));
        snap_md
            .extent_pages
            .iter()
            .flatten()
            .chain(&snap_md.cont_pages)
            .chain(&snap_md.pending_free_pages)
            .for_each(|&p| a.free_page(p));
        a.free_page(snap.page);
        a.check();
        Ok(())
    }

    /// Finishes an interrupted snapshot by clearing its marker.
    pub(crate) async fn clear_marker(&self, blob: &BlobInner) -> Result<()> {
        if blob.md.read().pending.is_none() {
            return Ok(());
        }
        {
            let mut md = blob.md.write();
            md.pending = None;
            md.touch();
        }
        self.sync_blob(blob).await
    }

    /// Creates a blob from `md` (a fresh first page) and syncs it. If that
    /// fails and the first page can't be taken back, a clone is kept (its
    /// creation's outcome is unknown, as after a crash) and a snapshot's
    /// page stays allocated (load discards it: its origin never named it).
    async fn create_from_md(
        &self,
        md: BlobMd,
        parent: Option<Arc<BlobInner>>,
    ) -> Result<Arc<BlobInner>> {
        let keep_on_failure = md.pending.is_none();
        let page = self.take_first_page()?;
        let id = StoreInner::blob_id(page);
        let blob = Arc::new(BlobInner::new(id, page, md, 0));
        *blob.parent.write() = parent;
        if let Err(e) = self.sync_blob(&blob).await {
            if self.undo_first_page(page).await {
                self.give_back_first_page(page);
            } else if keep_on_failure {
                let parent = blob.md.read().parent;
                self.blobs.lock().insert(id, blob);
                self.link_clone(parent, id);
            }
            return Err(e);
        }
        self.blobs.lock().insert(id, blob.clone());
        Ok(blob)
    }

    /// [`crate::Blob::inflate`] of `b`.
    pub(crate) async fn inflate(&self, b: &BlobInner) -> Result<()> {
        if b.md.read().read_only() {
            return Err(Error::ReadOnly(b.id));
        }
        let parent = b.parent.read().clone();
        let fills: Vec<(usize, Option<ClusterIdx>)> = {
            let md = b.md.read();
            (0..md.clusters.len())
                .filter(|&i| md.clusters[i].is_none())
                .map(|i| (i, ancestor_cluster(parent.clone(), i)))
                .collect()
        };
        self.adopt_clusters(b, &fills).await?;
        let old_parent = {
            let mut md = b.md.write();
            md.invalid_flags &= !format::BLOB_INVALID_THIN;
            md.touch();
            md.parent.take()
        };
        *b.parent.write() = None;
        self.unlink_clone(b.id, old_parent);
        self.sync_blob(b).await
    }

    /// [`crate::Blob::decouple_parent`] of `b`.
    pub(crate) async fn decouple_parent(&self, b: &BlobInner) -> Result<()> {
        if b.md.read().read_only() {
            return Err(Error::ReadOnly(b.id));
        }
        let Some(parent) = b.parent.read().clone() else {
            return Err(Error::InvalidArgument(format!(
                "blob {} has no parent",
                b.id
            )));
        };
        let fills: Vec<(usize, Option<ClusterIdx>)> = {
            let md = b.md.read();
            let pmd = parent.md.read();
            (0..md.clusters.len().min(pmd.clusters.len()))
                .filter(|&i| md.clusters[i].is_none() && pmd.clusters[i].is_some())
                .map(|i| (i, pmd.clusters[i]))
                .collect()
        };
        self.adopt_clusters(b, &fills).await?;
        let grandparent = parent.md.read().parent;
        {
            let mut md = b.md.write();
            md.parent = grandparent;
            md.touch();
        }
        *b.parent.write() = parent.parent.read().clone();
        self.unlink_clone(b.id, Some(parent.id));
        self.link_clone(grandparent, b.id);
        self.sync_blob(b).await
    }
}

impl Blobstore {
    /// Takes a snapshot of blob `id`: a new read-only blob holding the
    /// blob's current contents (it takes over all the blob's clusters) and
    /// `xattrs`; the blob becomes a thin clone of it. Returns the snapshot.
    /// A read-only blob can't be snapshotted (clone it instead).
    pub async fn create_snapshot(
        &self,
        id: BlobId,
        xattrs: Vec<(String, Vec<u8>)>,
    ) -> Result<BlobId> {
        for (n, v) in &xattrs {
            check_xattr(n, v)?;
        }
        let inner = &self.inner;
        let txn = inner.begin().await?;
        let blob = txn.load_blob(id).await?;
        if blob.md.read().read_only() {
            return Err(Error::InvalidArgument(format!(
                "blob {id} is read-only: clone it instead of taking a snapshot"
            )));
        }
        // What the snapshot takes must be exactly what is on disk.
        txn.sync_blob(&blob).await?;
        let per = inner.layout.extent_per_page;
        let (smd, old_parent) = {
            let b = blob.md.read();
            let n_ext = b.extent_pages.len();
            let mut s = BlobMd::empty(b.thin(), xattrs.into_iter().collect());
            s.invalid_flags = b.invalid_flags;
            s.data_ro_flags = format::BLOB_READ_ONLY;
            s.md_ro_flags = format::BLOB_READ_ONLY;
            s.num_clusters = b.num_clusters;
            s.clusters = b.clusters.clone();
            s.extent_pages = vec![None; n_ext];
            s.dirty_extents = (0..n_ext)
                .filter(|&k| s.clusters[k * per..].iter().take(per).any(Option::is_some))
                .collect();
            s.parent = b.parent;
            s.pending = Some(PendingOp::Snapshot { origin: id.0 });
            (s, b.parent)
        };
        // (a) The snapshot, marked: until the blob names it as its parent,
        // load discards it (both map the same clusters meanwhile).
        let parent_link = blob.parent.read().clone();
        let snap = txn.create_from_md(smd, parent_link).await?;
        let sid = snap.id;
        // (b) The blob gives its clusters to the snapshot.
        {
            let mut m = blob.md.write();
            let n_ext = m.extent_pages.len();
            m.clusters.iter_mut().for_each(|c| *c = None);
            m.dirty_extents = (0..n_ext).collect();
            m.invalid_flags |= format::BLOB_INVALID_THIN;
            m.parent = Some(sid);
            m.touch();
        }
        *blob.parent.write() = Some(snap.clone());
        inner.unlink_clone(id, old_parent);
        inner.link_clone(old_parent, sid);
        inner.link_clone(Some(sid), id);
        txn.sync_blob(&blob).await?;
        // (c) Done: clear the marker.
        txn.clear_marker(&snap).await?;
        Ok(sid)
    }

    /// Creates a thin clone of the read-only blob `id` (a snapshot, or a
    /// blob made read-only): same size, reads the parent's data until
    /// written. Returns the clone.
    pub async fn create_clone(&self, id: BlobId, xattrs: Vec<(String, Vec<u8>)>) -> Result<BlobId> {
        for (n, v) in &xattrs {
            check_xattr(n, v)?;
        }
        let inner = &self.inner;
        let txn = inner.begin().await?;
        let snap = txn.load_blob(id).await?;
        if !snap.md.read().read_only() {
            return Err(Error::InvalidArgument(format!(
                "blob {id} is not read-only: only snapshots and read-only blobs can be cloned"
            )));
        }
        // A snapshot whose creation was interrupted after its origin adopted
        // it is complete: clear the marker before anything else names it.
        txn.clear_marker(&snap).await?;
        let per = inner.layout.extent_per_page;
        let mut md = BlobMd::empty(true, xattrs.into_iter().collect());
        let n = snap.md.read().num_clusters;
        md.num_clusters = n;
        md.clusters = vec![None; n as usize];
        md.extent_pages = vec![None; (n as usize).div_ceil(per)];
        md.parent = Some(id);
        let clone = txn.create_from_md(md, Some(snap)).await?;
        inner.link_clone(Some(id), clone.id);
        Ok(clone.id)
    }
}
