//! Reading one blob's metadata from the device: its first page, its
//! continuation chain and its extent pages, each checked, into a
//! [`BlobMd`]. Reading needs no transaction: a load reads before anyone
//! else can use the store, and everyone else reads under one.
//!
//! Invariants:
//! - Every page read is checked (magic, checksum, kind, owner, sequence)
//!   before a byte of it is used; a chain is at most as long as the
//!   metadata region, and every page and cluster it names lies in the store.
//! - Errors name the page and the blob ([`md_loc`]).

use std::collections::BTreeSet;

use super::mdread::{OwnedMdPage, PageMap};
use super::state::{BlobMd, StoreInner};
use super::units::{cluster_map_from_raw, PageIdx};
use crate::device::IoChannel;
use crate::error::{Error, Result};
use crate::format::{self, BlobRecord, PageKind};
use crate::BlobId;

/// How errors name metadata page `p` of blob `id`.
fn md_loc(p: PageIdx, id: BlobId) -> String {
    format!("metadata page {p} (blob {id})")
}

impl StoreInner {
    /// Loads a blob's metadata from disk .
    pub(crate) async fn read_blob_md(&self, ch: &IoChannel, page: PageIdx) -> Result<BlobMd> {
        self.read_blob_md_from(ch, page, &mut PageMap::default())
            .await
    }

    /// [`StoreInner::read_blob_md`], taking its pages from `map` where the
    /// bulk read of a load has them.
    pub(crate) async fn read_blob_md_from(
        &self,
        ch: &IoChannel,
        page: PageIdx,
        map: &mut PageMap,
    ) -> Result<BlobMd> {
        let (sequence, rec, cont_pages) = self.read_record_from(ch, page, map).await?;
        self.md_from_record(ch, page, sequence, rec, cont_pages, map)
            .await
    }

    /// Metadata page `p` of blob `id`: from `map` when it holds it, else
    /// read from the device and checked.
    async fn md_page(
        &self,
        ch: &IoChannel,
        p: PageIdx,
        id: BlobId,
        map: &mut PageMap,
    ) -> Result<OwnedMdPage> {
        if let Some(page) = map.take(p) {
            return Ok(page);
        }
        let l = self.layout;
        let buf = self
            .read_bytes(ch, l.md_lba(p), l.page_size as usize)
            .await?;
        let page = format::decode_md_page(&buf, &md_loc(p, id))?;
        Ok(OwnedMdPage::from_page(&page))
    }

    /// A blob's descriptors as its first and continuation pages hold them
    /// (its extent pages not read): the sequence, the record and the
    /// continuation pages.
    pub(crate) async fn read_record(
        &self,
        ch: &IoChannel,
        page: PageIdx,
    ) -> Result<(u32, BlobRecord, Vec<PageIdx>)> {
        self.read_record_from(ch, page, &mut PageMap::default())
            .await
    }

    /// [`StoreInner::read_record`], taking pages from `map` where it has
    /// them.
    async fn read_record_from(
        &self,
        ch: &IoChannel,
        page: PageIdx,
        map: &mut PageMap,
    ) -> Result<(u32, BlobRecord, Vec<PageIdx>)> {
        let l = self.layout;
        let id = Self::blob_id(page);
        let fp = self.md_page(ch, page, id, map).await?;
        if fp.kind != PageKind::First || fp.blob_id != id.0 {
            return Err(Error::NotFound(id));
        }
        let mut payloads = vec![fp.payload];
        let mut cont_pages = Vec::new();
        let mut next = PageIdx::new(fp.next);
        while let Some(next_page) = next {
            if next_page.get() as u64 >= l.md_len || cont_pages.len() as u64 >= l.md_len {
                return Err(Error::corrupt(
                    md_loc(page, id),
                    format!("bad chain link {next_page}"),
                ));
            }
            let p = self.md_page(ch, next_page, id, map).await?;
            if p.kind != PageKind::Continuation || p.blob_id != id.0 || p.sequence != fp.sequence {
                return Err(Error::corrupt(
                    md_loc(next_page, id),
                    "continuation page does not belong",
                ));
            }
            payloads.push(p.payload);
            cont_pages.push(next_page);
            next = PageIdx::new(p.next);
        }
        let slices: Vec<&[u8]> = payloads.iter().map(|p| p.as_slice()).collect();
        // Named only on failure: a load decodes every blob.
        let rec = BlobRecord::decode(&slices, "").map_err(|e| match e {
            Error::Corrupt { what, .. } => Error::corrupt(md_loc(page, id), what),
            e => e,
        })?;
        Ok((fp.sequence, rec, cont_pages))
    }

    async fn md_from_record(
        &self,
        ch: &IoChannel,
        page: PageIdx,
        sequence: u32,
        rec: BlobRecord,
        cont_pages: Vec<PageIdx>,
        map: &mut PageMap,
    ) -> Result<BlobMd> {
        let l = self.layout;
        let id = Self::blob_id(page);
        let per = l.extent_per_page;
        let loc = |p: PageIdx| md_loc(p, id);
        if rec.invalid_flags & !format::BLOB_INVALID_THIN != 0 {
            return Err(Error::Unsupported(format!(
                "blob {id} has unknown invalid flags {:#x}",
                rec.invalid_flags
            )));
        }
        let bad_cluster =
            |c: u32| c != 0 && (c < l.reserved_clusters || c as u64 >= l.total_clusters);
        let map_inline = !rec.cluster_map.is_empty();
        if map_inline {
            if !l.inline_map() {
                return Err(Error::corrupt(
                    loc(page),
                    format!(
                        "an inline cluster map in a store of format {} (inline maps came \
                         with format {})",
                        l.version,
                        format::INLINE_MAP_VERSION
                    ),
                ));
            }
            if rec.cluster_map.len() as u64 != rec.num_clusters
                || rec.num_clusters > l.total_clusters
            {
                return Err(Error::corrupt(
                    loc(page),
                    format!(
                        "{} clusters with an inline map of {}",
                        rec.num_clusters,
                        rec.cluster_map.len()
                    ),
                ));
            }
            if let Some(c) = rec.cluster_map.iter().find(|&&c| bad_cluster(c)) {
                return Err(Error::corrupt(
                    loc(page),
                    format!("cluster {c} out of range"),
                ));
            }
        } else if rec.num_clusters > l.total_clusters
            || rec.extent_table.len() as u64 != rec.num_clusters.div_ceil(per as u64)
        {
            return Err(Error::corrupt(
                loc(page),
                format!(
                    "{} clusters with {} extent pages",
                    rec.num_clusters,
                    rec.extent_table.len()
                ),
            ));
        }
        let n = rec.num_clusters as usize;
        let (clusters, extent_pages) = if map_inline {
            (rec.cluster_map, vec![None; n.div_ceil(per)])
        } else {
            let mut clusters = vec![0u32; n];
            let mut extent_pages = vec![None; rec.extent_table.len()];
            for (k, &ep) in rec.extent_table.iter().enumerate() {
                let Some(ep) = PageIdx::new(ep) else {
                    continue;
                };
                if ep.get() as u64 >= l.md_len {
                    return Err(Error::corrupt(
                        loc(page),
                        format!("extent page {ep} out of range"),
                    ));
                }
                extent_pages[k] = Some(ep);
                let p = self.md_page(ch, ep, id, map).await?;
                if p.kind != PageKind::Extent || p.blob_id != id.0 {
                    return Err(Error::corrupt(
                        loc(ep),
                        "extent page does not belong to the blob",
                    ));
                }
                let (first, entries) = format::decode_extent_payload(&p.payload, &loc(ep))?;
                let want = per.min(n - k * per);
                if first != (k * per) as u64 || entries.len() != want {
                    return Err(Error::corrupt(
                        loc(ep),
                        "extent page covers the wrong clusters",
                    ));
                }
                for (i, &c) in entries.iter().enumerate() {
                    if bad_cluster(c) {
                        return Err(Error::corrupt(loc(ep), format!("cluster {c} out of range")));
                    }
                    clusters[k * per + i] = c;
                }
            }
            (clusters, extent_pages)
        };
        Ok(BlobMd {
            num_clusters: rec.num_clusters,
            clusters: cluster_map_from_raw(clusters),
            extent_pages,
            dirty_extents: BTreeSet::new(),
            map_inline,
            xattrs: rec.xattrs.into_iter().collect(),
            invalid_flags: rec.invalid_flags,
            data_ro_flags: rec.data_ro_flags,
            md_ro_flags: rec.md_ro_flags,
            cont_pages,
            sequence,
            version: 0,
            synced_version: 0,
            pending_free_clusters: Vec::new(),
            pending_free_pages: Vec::new(),
            parent: rec.parent.map(BlobId),
            pending: rec.pending,
        })
    }
}
