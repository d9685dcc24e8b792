//! `Blobstore::repair`: makes a loaded store whose metadata is damaged
//! consistent again, giving up only what the damage already took.
//!
//! It scans the whole metadata region as a dirty load does, keeps every
//! blob whose metadata reads, drops every blob whose metadata does not (its
//! first page is zeroed, so no later scan trips over it), zeroes pages
//! that carry the metadata magic but fail their checks, and rebuilds the
//! three bitmaps in memory from the blobs it kept (the next unload writes
//! them). What each dropped blob's descriptors still said (its xattrs, when
//! its first and continuation pages read) comes back, so a file system on
//! top can say which of its files were lost.

use std::sync::atomic::Ordering;

use super::state::StoreInner;
use super::units::PageIdx;
use super::Blobstore;
use crate::error::{Error, Result};
use crate::BlobId;

/// A blob [`Blobstore::repair`] dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DroppedBlob {
    /// The blob.
    pub id: BlobId,
    /// Why its metadata could not be read.
    pub why: String,
    /// Its xattrs, where its first and continuation pages still decoded
    /// (the damage was in an extent page); empty otherwise.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// What [`Blobstore::repair`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RepairReport {
    /// Blobs whose metadata could not be read, now gone.
    pub dropped: Vec<DroppedBlob>,
    /// Metadata pages that carried the magic but failed their checks (or
    /// were the first page of a dropped blob), now zeroed.
    pub zeroed_pages: Vec<u32>,
    /// Bits of the used-page bitmap that changed in the rebuild.
    pub page_bits_fixed: u64,
    /// Bits of the used-cluster bitmap that changed.
    pub cluster_bits_fixed: u64,
    /// Bits of the blob-id bitmap that changed.
    pub blobid_bits_fixed: u64,
    /// The super blob was among the dropped: the super block names none.
    pub super_blob_dropped: bool,
}

impl RepairReport {
    /// True when the repair changed nothing.
    pub fn is_empty(&self) -> bool {
        *self == RepairReport::default()
    }
}

fn differing(a: &[bool], b: &[bool]) -> u64 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as u64
}

impl Blobstore {
    /// Repairs damaged metadata (see the module notes): every blob that
    /// reads is kept whole, every blob that does not is dropped, and the
    /// bitmaps are rebuilt from what is kept. Run it on a store just
    /// loaded: a blob with open handles is [`Error::Busy`]. A page or
    /// cluster two readable blobs both claim is [`Error::Corrupt`] (which
    /// one owns it, only the blobs' users can say); a blob of a newer
    /// format ([`Error::Unsupported`]) is never dropped.
    pub async fn repair(&self) -> Result<RepairReport> {
        let inner = &self.inner;
        let txn = inner.begin().await?;
        let cached: Vec<_> = inner.blobs.lock().values().cloned().collect();
        if let Some(b) = cached
            .iter()
            .find(|b| b.handles.load(Ordering::Acquire) > 0)
        {
            return Err(Error::Busy(format!("blob {} is open", b.id)));
        }
        // What memory holds goes to the device first: the scan then sees it.
        for b in &cached {
            txn.sync_blob(b).await?;
        }
        let mut rep = RepairReport::default();
        let mut firsts = Vec::new();
        let mut zeroed: Vec<PageIdx> = Vec::new();
        let (found, mut map) = inner.scan_md_pages(txn.ch()).await?;
        for (page, found) in found {
            match found {
                Ok(Some(())) => firsts.push(page),
                Ok(None) => {}
                Err(_) => zeroed.push(page),
            }
        }
        let mut good = Vec::new();
        for &page in &firsts {
            let id = StoreInner::blob_id(page);
            match inner.read_blob_md_from(txn.ch(), page, &mut map).await {
                Ok(md) => good.push((page, md)),
                Err(e @ (Error::Corrupt { .. } | Error::NotFound(_))) => {
                    let xattrs = match inner.read_record(txn.ch(), page).await {
                        Ok((_, rec, _)) => rec.xattrs,
                        Err(_) => Vec::new(),
                    };
                    zeroed.push(page);
                    rep.dropped.push(DroppedBlob {
                        id,
                        why: e.to_string(),
                        xattrs,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        let old = inner.alloc.lock().bits();
        for (page, _) in old.2.iter().enumerate().filter(|(_, &b)| b) {
            let page = PageIdx::at(page);
            if !firsts.contains(&page) {
                rep.dropped.push(DroppedBlob {
                    id: StoreInner::blob_id(page),
                    why: format!("its first page ({page}) is not a readable metadata page"),
                    xattrs: Vec::new(),
                });
            }
        }
        let alloc = inner.claim_all(&good)?;
        let zero = vec![0u8; inner.layout.page_size as usize];
        zeroed.sort_unstable();
        for &p in &zeroed {
            inner
                .write_bytes(txn.ch(), inner.layout.md_lba(p), &zero)
                .await?;
        }
        rep.zeroed_pages = zeroed.iter().map(|p| p.get()).collect();
        if !rep.zeroed_pages.is_empty() {
            txn.ch().flush().await?;
        }
        let new = alloc.bits();
        rep.page_bits_fixed = differing(&old.0, &new.0);
        rep.cluster_bits_fixed = differing(&old.1, &new.1);
        rep.blobid_bits_fixed = differing(&old.2, &new.2);
        *inner.alloc.lock() = alloc;
        {
            let mut blobs = inner.blobs.lock();
            let mut clones = inner.clones.lock();
            for d in &rep.dropped {
                blobs.remove(&d.id);
                clones.remove(&d.id);
                clones.values_mut().for_each(|s| {
                    s.remove(&d.id);
                });
            }
        }
        let sb = *inner.super_blob.lock();
        if sb != 0 && rep.dropped.iter().any(|d| d.id.0 == sb) {
            *inner.super_blob.lock() = 0;
            inner.write_super(txn.ch(), false).await?;
            rep.super_blob_dropped = true;
        }
        if !rep.is_empty() {
            tracing::warn!(
                device = %inner.dev.name(),
                dropped = rep.dropped.len(),
                zeroed_pages = rep.zeroed_pages.len(),
                page_bits = rep.page_bits_fixed,
                cluster_bits = rep.cluster_bits_fixed,
                blobid_bits = rep.blobid_bits_fixed,
                "blobstore repaired: unreadable blobs dropped, bitmaps rebuilt from the rest"
            );
        }
        Ok(rep)
    }
}
