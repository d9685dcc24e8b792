//! `Blobstore::check`: an fsck-like verifier of the store's metadata.
//!
//! It reads every metadata page from the device, decodes every blob it
//! finds, and checks what the store promises:
//! - every cluster is owned by at most one blob, and every owned cluster and
//!   metadata page is marked used in the allocator;
//! - no metadata page is shared by two blobs or used twice by one;
//! - the blob-id bitmap names exactly the blobs whose first page is on disk;
//! - the metadata clusters are marked used, and the free counters agree with
//!   the bitmaps;
//! - the super blob, if set, exists, and so does every blob's parent.
//!
//! Used but unowned clusters and pages are *leaks*: reported, not errors
//! (an I/O error in the middle of a metadata sync leaks on purpose rather
//! than risk a reuse; the next dirty load reclaims them). A blob with
//! unsynced changes is checked in its in-memory form too, so its pending
//! clusters are not reported as leaks.

use std::collections::HashMap;

use super::state::StoreInner;
use super::units::{ClusterIdx, PageIdx};
use super::Blobstore;
use crate::error::Result;
use crate::format::{self, PageKind};
use crate::BlobId;

/// What [`Blobstore::check`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Blobs found on disk.
    pub blobs: u64,
    /// Clusters owned by blobs.
    pub clusters_owned: u64,
    /// Metadata pages owned by blobs.
    pub md_pages_owned: u64,
    /// Clusters marked used that no blob owns.
    pub leaked_clusters: Vec<u32>,
    /// Metadata pages marked used that no blob owns.
    pub leaked_md_pages: Vec<u32>,
    /// Broken invariants, each naming where and what.
    pub problems: Vec<String>,
}

impl CheckReport {
    /// True when no invariant is broken (leaks are allowed).
    pub fn is_consistent(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Blobstore {
    /// Verifies the store's metadata against its allocator; see
    /// [`CheckReport`]. Runs under the metadata lock, so it sees no
    /// metadata operation half done. Device errors are returned as errors;
    /// undecodable metadata is a problem in the report.
    pub async fn check(&self) -> Result<CheckReport> {
        let inner = &self.inner;
        let txn = inner.begin().await?;
        let l = inner.layout;
        let ps = l.page_size as usize;
        let mut rep = CheckReport::default();
        // Owner of each page and cluster.
        let mut page_owner: HashMap<PageIdx, BlobId> = HashMap::new();
        let mut cluster_owner: HashMap<ClusterIdx, BlobId> = HashMap::new();
        let mut on_disk = Vec::new();
        let chunk_pages = ((1usize << 20) / ps).max(1) as u64;
        let mut p = 0u64;
        while p < l.md_len {
            let n = chunk_pages.min(l.md_len - p);
            let buf = inner
                .read_bytes(txn.ch(), l.md_lba(PageIdx::at(p as usize)), n as usize * ps)
                .await?;
            for i in 0..n as usize {
                let bytes = &buf[i * ps..(i + 1) * ps];
                let page = PageIdx::at(p as usize + i);
                if !format::looks_like_md_page(bytes) {
                    continue;
                }
                match format::decode_md_page(bytes, &format!("metadata page {page}")) {
                    Ok(mp) if mp.kind == PageKind::First => on_disk.push(page),
                    Ok(_) => {}
                    Err(e) => rep.problems.push(e.to_string()),
                }
            }
            p += n;
        }
        let cached: HashMap<BlobId, _> = inner.blobs.lock().clone();
        let alloc_bits = inner.alloc.lock().bits();
        let (pages_used, clusters_used, blobids) = &alloc_bits;
        for &first in &on_disk {
            let id = StoreInner::blob_id(first);
            if !blobids[first.index()] {
                rep.problems.push(format!(
                    "blob {id}: first page {first} is on disk but not in the blob-id bitmap"
                ));
            }
            let md = match inner.read_blob_md(txn.ch(), first).await {
                Ok(md) => md,
                Err(e) => {
                    rep.problems.push(format!("blob {id}: {e}"));
                    continue;
                }
            };
            rep.blobs += 1;
            if let Some(p) = md.parent {
                let exists = inner.page_of(p).is_ok_and(|pp| on_disk.contains(&pp));
                if !exists {
                    rep.problems
                        .push(format!("blob {id}: parent {p} does not exist"));
                }
            }
            let mut pages: Vec<PageIdx> = vec![first];
            pages.extend(md.cont_pages.iter().chain(md.extent_pages.iter().flatten()));
            let mut clusters: Vec<ClusterIdx> = md.clusters.iter().flatten().copied().collect();
            if let Some(b) = cached.get(&id) {
                let m = b.md.read();
                pages.extend(m.cont_pages.iter().chain(m.extent_pages.iter().flatten()));
                pages.extend(&m.pending_free_pages);
                clusters.extend(m.clusters.iter().flatten().chain(&m.pending_free_clusters));
            }
            pages.sort_unstable();
            pages.dedup();
            clusters.sort_unstable();
            clusters.dedup();
            for p in pages {
                if p.get() as u64 >= l.md_len {
                    rep.problems
                        .push(format!("blob {id}: metadata page {p} out of range"));
                    continue;
                }
                if let Some(other) = page_owner.insert(p, id) {
                    rep.problems.push(format!(
                        "metadata page {p} is owned by blobs {other} and {id}"
                    ));
                }
                if !pages_used[p.index()] {
                    rep.problems
                        .push(format!("blob {id}: metadata page {p} is marked free"));
                }
            }
            for c in clusters {
                if (c.get() as u64) >= l.total_clusters || c.get() < l.reserved_clusters {
                    rep.problems
                        .push(format!("blob {id}: cluster {c} out of range"));
                    continue;
                }
                if let Some(other) = cluster_owner.insert(c, id) {
                    rep.problems
                        .push(format!("cluster {c} is owned by blobs {other} and {id}"));
                }
                if !clusters_used[c.index()] {
                    rep.problems
                        .push(format!("blob {id}: cluster {c} is marked free"));
                }
            }
        }
        for (page, _) in blobids.iter().enumerate().filter(|(_, &b)| b) {
            let page = PageIdx::at(page);
            if !on_disk.contains(&page) {
                rep.problems.push(format!(
                    "blob-id bitmap names blob {} but its first page is not on disk",
                    StoreInner::blob_id(page)
                ));
            }
        }
        for (c, _) in clusters_used
            .iter()
            .enumerate()
            .take(l.reserved_clusters as usize)
            .filter(|(_, &used)| !used)
        {
            rep.problems
                .push(format!("metadata cluster {c} is marked free"));
        }
        rep.leaked_clusters = (l.reserved_clusters as usize..clusters_used.len())
            .filter_map(|c| ClusterIdx::new(c as u32))
            .filter(|c| clusters_used[c.index()] && !cluster_owner.contains_key(c))
            .map(ClusterIdx::get)
            .collect();
        rep.leaked_md_pages = (0..pages_used.len())
            .filter(|&p| pages_used[p] && !page_owner.contains_key(&PageIdx::at(p)))
            .map(|p| p as u32)
            .collect();
        rep.clusters_owned = cluster_owner.len() as u64;
        rep.md_pages_owned = page_owner.len() as u64;
        {
            let a = inner.alloc.lock();
            let free_c = clusters_used.iter().filter(|&&b| !b).count() as u64;
            let free_p = pages_used.iter().filter(|&&b| !b).count() as u64;
            if a.free_clusters() != free_c || a.free_pages() != free_p {
                rep.problems.push(format!(
                    "free counters ({} clusters, {} pages) disagree with the bitmaps ({free_c}, {free_p})",
                    a.free_clusters(),
                    a.free_pages()
                ));
            }
        }
        let sb = *inner.super_blob.lock();
        if sb != 0
            && !inner
                .page_of(BlobId(sb))
                .is_ok_and(|p| on_disk.contains(&p))
        {
            rep.problems
                .push(format!("super blob {sb:#x} does not exist"));
        }
        Ok(rep)
    }
}
