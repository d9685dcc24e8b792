//! Blobs as the store keeps them: create, load (from the cache, or from
//! disk with the parent chain), delete, and the super blob.
//!
//! Invariants:
//! - A blob's first page is durable before its id is handed out, and
//!   zeroed durably before any of its pages or clusters is reused.
//! - A failed create or delete never leaves memory saying less than the
//!   device may hold: a blob whose first page may be on the device (or may
//!   have been zeroed) stays, with everything it owns.
//! - The super block names only a blob whose first page is durable.
//! - A loaded blob has its whole parent chain loaded, so the data path
//!   resolves reads without metadata I/O.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::snapshot::MAX_CHAIN;
use super::state::{check_xattr, BlobInner, BlobMd, StoreInner};
use super::txn::MdTxn;
use super::units::ClusterIdx;
use super::{BlobOptions, Blobstore};
use crate::error::{Error, Result};
use crate::BlobId;

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + 'a>>;

impl Blobstore {
    /// Creates a blob and makes its metadata durable; returns its id.
    pub async fn create_blob(&self, opts: BlobOptions) -> Result<BlobId> {
        let inner = &self.inner;
        for (name, value) in &opts.xattrs {
            check_xattr(name, value)?;
        }
        let txn = inner.begin().await?;
        let page = txn.take_first_page()?;
        let id = StoreInner::blob_id(page);
        let blob = Arc::new(BlobInner::new(
            id,
            page,
            BlobMd::empty(opts.thin_provision, opts.xattrs.into_iter().collect()),
            0,
        ));
        let res = async {
            txn.resize(&blob, opts.num_clusters, true).await?;
            txn.sync_blob(&blob).await
        }
        .await;
        if let Err(e) = res {
            // The first page may have reached the disk: take it back before
            // giving anything away, or keep the blob (its creation's outcome
            // is unknown, as after a crash) rather than reuse what it names.
            if !txn.undo_first_page(page).await {
                inner.blobs.lock().insert(id, blob);
                return Err(e);
            }
            let owned: Vec<ClusterIdx> =
                blob.md.read().clusters.iter().flatten().copied().collect();
            txn.give_back_clusters(&owned);
            txn.give_back_first_page(page);
            return Err(e);
        }
        inner.blobs.lock().insert(id, blob);
        Ok(id)
    }

    /// Deletes a closed blob and frees its clusters and pages. A blob with
    /// open handles is [`Error::Busy`].
    pub async fn delete_blob(&self, id: BlobId) -> Result<()> {
        let inner = &self.inner;
        let page = inner.page_of(id)?;
        let txn = inner.begin().await?;
        if let Some(b) = inner.blobs.lock().get(&id) {
            if b.handles.load(Ordering::Acquire) > 0 {
                return Err(Error::Busy(format!("blob {id} is open")));
            }
        }
        if !inner.alloc.lock().is_blobid(page) {
            return Err(Error::NotFound(id));
        }
        let blob = txn.load_blob(id).await?;
        let clones = inner.clones_of(id);
        match clones.len() {
            0 => {}
            1 => return txn.delete_into_clone(&blob, clones[0]).await,
            n => {
                return Err(Error::Busy(format!(
                    "snapshot {id} has {n} clones; only a snapshot with at most one can be deleted"
                )))
            }
        }
        let md = blob.md.read().clone();
        let was_super = txn.retire_super_blob(id).await?;
        let zero = vec![0u8; inner.layout.page_size as usize];
        let zeroed = async {
            inner
                .write_bytes(txn.ch(), inner.layout.md_lba(page), &zero)
                .await?;
            txn.ch().flush().await
        }
        .await;
        if let Err(e) = zeroed {
            // The zeroed page may reach the media (now or with any later
            // flush) or not: keep the blob and write it again.
            txn.undo_delete(&blob, was_super).await;
            return Err(e);
        }
        inner.blobs.lock().remove(&id);
        inner.unlink_clone(id, md.parent);
        let freed: Vec<ClusterIdx> = md
            .clusters
            .iter()
            .flatten()
            .chain(&md.pending_free_clusters)
            .copied()
            .collect();
        inner.clear_clusters(txn.ch(), &freed).await;
        {
            let mut a = inner.alloc.lock();
            freed.iter().for_each(|&c| a.free_cluster(c));
            md.extent_pages
                .iter()
                .flatten()
                .chain(&md.cont_pages)
                .chain(&md.pending_free_pages)
                .for_each(|&p| a.free_page(p));
            a.set_blobid(page, false);
            a.free_page(page);
            a.check();
        }
        Ok(())
    }

    /// Records `id` (or none) as the super blob, durably.
    pub async fn set_super_blob(&self, id: Option<BlobId>) -> Result<()> {
        let inner = &self.inner;
        let txn = inner.begin().await?;
        if let Some(id) = id {
            let p = inner.page_of(id)?;
            if !inner.alloc.lock().is_blobid(p) {
                return Err(Error::NotFound(id));
            }
            // A blob whose failed delete may have zeroed its first page must
            // be on the device again before the super block names it.
            let doubtful = inner
                .blobs
                .lock()
                .get(&id)
                .filter(|b| b.first_page_doubtful.load(Ordering::Acquire))
                .cloned();
            if let Some(b) = doubtful {
                txn.sync_blob(&b).await?;
            }
        }
        *inner.super_blob.lock() = id.map_or(0, |b| b.0);
        inner.write_super(txn.ch(), false).await
    }
}

impl MdTxn<'_> {
    /// The cached blob, or its metadata read from disk together with its
    /// parent chain.
    pub(crate) fn load_blob(&self, id: BlobId) -> BoxFut<'_, Arc<BlobInner>> {
        self.load_chain(id, 0)
    }

    fn load_chain(&self, id: BlobId, depth: usize) -> BoxFut<'_, Arc<BlobInner>> {
        Box::pin(async move {
            if let Some(b) = self.blobs.lock().get(&id) {
                return Ok(b.clone());
            }
            let page = self.page_of(id)?;
            if !self.alloc.lock().is_blobid(page) {
                return Err(Error::NotFound(id));
            }
            if depth > MAX_CHAIN {
                return Err(Error::corrupt(
                    format!("blob {id}"),
                    "parent chain too long (a cycle?)",
                ));
            }
            let md = self.read_blob_md(self.ch(), page).await?;
            let parent = md.parent;
            let b = Arc::new(BlobInner::new(id, page, md, 0));
            if let Some(p) = parent {
                let pb = self.load_chain(p, depth + 1).await.map_err(|e| match e {
                    Error::NotFound(_) => {
                        Error::corrupt(format!("blob {id}"), format!("parent {p} does not exist"))
                    }
                    e => e,
                })?;
                *b.parent.write() = Some(pb);
            }
            let mut blobs = self.blobs.lock();
            Ok(blobs.entry(id).or_insert(b).clone())
        })
    }
}
