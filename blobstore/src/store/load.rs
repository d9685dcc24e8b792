//! Loading a store: the super block (or its backup), the bitmaps after a
//! clean unload, or, after an unclean stop or with damage, a scan of the
//! metadata region that rebuilds them from every blob's metadata and
//! finishes or undoes what a crash interrupted (FORMAT.md, "Recovery").
//!
//! Invariants:
//! - Nothing is written before the store is known to be ours, of a
//!   supported format, and whole enough to load.
//! - Loading marks the store dirty on disk before anything else is
//!   written, so a crash after load makes the next load rebuild the
//!   bitmaps from the metadata pages.
//! - After a rebuild every page and cluster a blob names is claimed
//!   exactly once ([`StoreInner::claim_all`]); a double claim is damage.
//! - A blob carrying a recovery marker is discarded or finished before
//!   the store is handed out.

use std::collections::HashMap;
use std::sync::Arc;

use super::alloc::Allocator;
use super::mdread::PageMap;
use super::state::{BlobInner, BlobMd, Layout, StoreInner};
use super::units::PageIdx;
use super::{Blobstore, LoadOptions, LoadReport};
use crate::device::{channel, BlockDevice, IoChannel, Lba};
use crate::error::{Error, Result};
use crate::format::{self, MaskKind, PendingOp, SuperBlock};
use crate::BlobId;

impl Blobstore {
    /// Loads the blobstore on `dev`. After a clean unload the bitmaps are read
    /// back; otherwise they are rebuilt from every blob's metadata.
    pub async fn load(dev: Arc<dyn BlockDevice>, opts: LoadOptions) -> Result<Blobstore> {
        Self::load_inner(dev, opts, false).await
    }

    /// Loads the blobstore on `dev` and grows it to cover the whole device,
    /// when the device has grown since the store was made (SPDK's
    /// `spdk_bs_grow`). The new clusters are free. The super block write is
    /// the commit point: a crash leaves the old size or the new one. The
    /// store can grow as far as its cluster bitmap region, sized at init in
    /// whole pages, has bits for (32,640 clusters per 4 KiB page).
    pub async fn grow(dev: Arc<dyn BlockDevice>, opts: LoadOptions) -> Result<Blobstore> {
        Self::load_inner(dev, opts, true).await
    }

    async fn load_inner(
        dev: Arc<dyn BlockDevice>,
        opts: LoadOptions,
        grow: bool,
    ) -> Result<Blobstore> {
        let geo = dev.geometry();
        let ch = channel(&dev)?;
        let mut report = LoadReport::default();
        let sb = read_super_blocks(&dev, &ch, &mut report).await?;
        let found = String::from_utf8_lossy(&sb.bstype)
            .trim_end_matches('\0')
            .to_string();
        if !opts.bstype.is_empty() && opts.bstype != found {
            return Err(Error::WrongType {
                found,
                expected: opts.bstype,
            });
        }
        if sb.io_unit_size != geo.block_size {
            return Err(Error::InvalidArgument(format!(
                "the store was made on {}-byte blocks; this device has {}-byte blocks",
                sb.io_unit_size, geo.block_size
            )));
        }
        if sb
            .total_clusters
            .checked_mul(sb.cluster_size as u64)
            .is_none_or(|b| b > geo.size_bytes())
        {
            return Err(Error::DeviceTooSmall(format!(
                "the store spans {} clusters of {} bytes; the device has {} bytes",
                sb.total_clusters,
                sb.cluster_size,
                geo.size_bytes()
            )));
        }
        let mut layout = Layout::from_super(&sb);
        let fits = geo.size_bytes() / sb.cluster_size as u64;
        if grow && fits > sb.total_clusters {
            let room = sb.cluster_mask_len;
            if format::mask_region_pages(fits, sb.page_size) > room || fits > u32::MAX as u64 {
                return Err(Error::NoSpace(format!(
                    "cannot grow to {fits} clusters: the cluster bitmap has {room} pages"
                )));
            }
            layout.total_clusters = fits;
        }
        let inner = Arc::new(StoreInner::new(dev, layout, sb.bstype, sb.super_blob));
        // Every blob's metadata: from the blob-id bitmap after a clean
        // unload, from a scan of the metadata region otherwise (or when a
        // recovery marker says an operation was cut short).
        let mut clean = None;
        let masks = if sb.clean {
            match inner.read_masks(&ch, &sb).await {
                Ok(alloc) => Some(alloc),
                // Every bitmap can be rebuilt from the blobs' metadata, as
                // after an unclean stop: damage to one is no reason to
                // refuse the store.
                Err(e @ Error::Corrupt { .. }) => {
                    tracing::warn!(
                        device = %inner.dev.name(),
                        error = %e,
                        "a bitmap of a clean blobstore is damaged: rebuilding every bitmap \
                         from the blobs' metadata"
                    );
                    report.bitmap_damaged = true;
                    report.bitmaps_rebuilt = Some(format!("damaged bitmap: {e}"));
                    None
                }
                Err(e) => return Err(e),
            }
        } else {
            report.bitmaps_rebuilt = Some("the store was not unloaded cleanly".into());
            None
        };
        if let Some(alloc) = masks {
            let pages: Vec<PageIdx> = alloc.blobids().collect();
            // Every used page in large reads, not a read per page.
            let mut map = inner.read_used_pages(&ch, &alloc).await?;
            // A blob whose metadata is damaged is reported when opened,
            // as before; it names no parent here.
            let mut blobs = Vec::with_capacity(pages.len());
            for p in pages {
                match inner.read_blob_md_from(&ch, p, &mut map).await {
                    Ok(md) => blobs.push((p, md)),
                    Err(Error::Corrupt { .. }) | Err(Error::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
            if blobs.iter().all(|(_, md)| md.pending.is_none()) {
                clean = Some((alloc, blobs));
            } else {
                report.bitmaps_rebuilt = Some("a blob carries a recovery marker".into());
            }
        }
        let was_clean = clean.is_some();
        let (alloc, mut blobs, discard, finish) = match clean {
            Some((alloc, blobs)) => (alloc, blobs, Vec::new(), Vec::new()),
            None => {
                let (pages, mut map) = inner.scan_first_pages(&ch).await?;
                let mut blobs = inner.read_blobs(&ch, &pages, &mut map).await?;
                let (discard, finish) = resolve_pending(&blobs);
                blobs.retain(|(p, _)| !discard.contains(p));
                (inner.claim_all(&blobs)?, blobs, discard, finish)
            }
        };
        if was_clean {
            tracing::info!(device = %inner.dev.name(), blobs = blobs.len(), "blobstore loaded (clean)");
        } else {
            tracing::warn!(
                device = %inner.dev.name(),
                blobs = blobs.len(),
                discarded = discard.len(),
                finished = finish.len(),
                why = report.bitmaps_rebuilt.as_deref().unwrap_or(""),
                "blobstore loaded after an unclean stop or damaged bitmap: bitmaps rebuilt from every blob's \
                 metadata, blobs whose creation or deletion was cut short discarded, cut-short \
                 resizes and syncs finished"
            );
        }
        *inner.alloc.lock() = alloc;
        *inner.load_report.lock() = report;
        for (page, md) in &blobs {
            inner.link_clone(md.parent, StoreInner::blob_id(*page));
        }
        // Kept: opening a blob then reads nothing (a file system opens
        // every one at mount).
        inner.cache_loaded(std::mem::take(&mut blobs));
        let sbid = sb.super_blob;
        if sbid != 0 {
            let ok = inner
                .page_of(BlobId(sbid))
                .is_ok_and(|p| inner.alloc.lock().is_blobid(p));
            if !ok {
                return Err(Error::corrupt(
                    "super block",
                    format!("super blob {sbid:#x} does not exist"),
                ));
            }
        }
        inner.write_super(&ch, false).await?;
        // Finish what a crash interrupted: discarded blobs lose their first
        // page (nothing else of theirs is claimed), kept ones their marker.
        let zero = vec![0u8; layout.page_size as usize];
        for &p in &discard {
            inner.write_bytes(&ch, layout.md_lba(p), &zero).await?;
        }
        if !discard.is_empty() {
            ch.flush().await?;
        }
        if !finish.is_empty() {
            let txn = inner.begin().await?;
            for p in finish {
                let b = txn.load_blob(StoreInner::blob_id(p)).await?;
                txn.clear_marker(&b).await?;
            }
        }
        Ok(Blobstore { inner })
    }
}

impl StoreInner {
    async fn read_masks(&self, ch: &IoChannel, sb: &SuperBlock) -> Result<Allocator> {
        let l = self.layout;
        let ps = l.page_size as u64;
        let bpp = l.blocks_per_page();
        let mut start = sb.mask_start;
        let mut read = |len: u64| {
            let lba = start * bpp;
            start += len;
            self.read_bytes(ch, Lba(lba), (len * ps) as usize)
        };
        let pages = read(sb.page_mask_len).await?;
        let clusters = read(sb.cluster_mask_len).await?;
        let blobids = read(sb.blobid_mask_len).await?;
        let pages = format::decode_mask(&pages, MaskKind::Pages, sb.md_len)?;
        let mut clusters = format::decode_mask(&clusters, MaskKind::Clusters, sb.total_clusters)?;
        // A grown store has more clusters than its bitmap on disk: all free.
        clusters.resize(l.total_clusters as usize, false);
        let blobids = format::decode_mask(&blobids, MaskKind::BlobIds, sb.md_len)?;
        if clusters[..l.reserved_clusters as usize].iter().any(|b| !b) {
            return Err(Error::corrupt(
                "Clusters bitmap",
                "a metadata cluster is marked free",
            ));
        }
        if blobids.iter().zip(&pages).any(|(&b, &p)| b && !p) {
            return Err(Error::corrupt("BlobIds bitmap", "a blob id on a free page"));
        }
        Ok(Allocator::from_bits(
            &pages,
            &clusters,
            &blobids,
            l.reserved_clusters,
        ))
    }

    /// Pages in the metadata region that hold a blob's first page (the
    /// dirty-load scan), and every page that decoded, for reading the
    /// blobs without another read per page.
    async fn scan_first_pages(&self, ch: &IoChannel) -> Result<(Vec<PageIdx>, PageMap)> {
        let mut firsts = Vec::new();
        let (found, map) = self.scan_md_pages(ch).await?;
        for (page, found) in found {
            // Writes are atomic per page, so a page that carries the
            // magic and fails its checks is damage, not a torn write:
            // report it rather than silently dropping a blob.
            if found?.is_some() {
                firsts.push(page);
            }
        }
        Ok((firsts, map))
    }

    /// Every blob's metadata, as on disk, its pages from `map` where it
    /// has them.
    async fn read_blobs(
        &self,
        ch: &IoChannel,
        pages: &[PageIdx],
        map: &mut PageMap,
    ) -> Result<Vec<(PageIdx, BlobMd)>> {
        let mut out = Vec::with_capacity(pages.len());
        for &p in pages {
            out.push((p, self.read_blob_md_from(ch, p, map).await?));
        }
        Ok(out)
    }

    /// Puts the blobs a load read into the cache, each with its parent
    /// chain linked, so that opening one costs no device read. A blob
    /// whose chain does not resolve to blobs read here (a parent missing
    /// or unreadable, or a chain longer than the longest followed: a
    /// cycle) stays out: opening it reads it again and says why, as before.
    fn cache_loaded(&self, blobs: Vec<(PageIdx, BlobMd)>) {
        if blobs.iter().all(|(_, md)| md.parent.is_none()) {
            // No snapshots or clones (a file system's store): no chains.
            let mut cache = self.blobs.lock();
            cache.reserve(blobs.len());
            for (p, md) in blobs {
                let id = Self::blob_id(p);
                cache.insert(id, Arc::new(BlobInner::new(id, p, md, 0)));
            }
            return;
        }
        let by_id: HashMap<BlobId, Arc<BlobInner>> = blobs
            .into_iter()
            .map(|(p, md)| {
                let id = Self::blob_id(p);
                (id, Arc::new(BlobInner::new(id, p, md, 0)))
            })
            .collect();
        // Whether each blob's chain resolves, found once per blob.
        let mut resolves: HashMap<BlobId, bool> = HashMap::with_capacity(by_id.len());
        for &start in by_id.keys() {
            let mut chain = Vec::new();
            let mut cur = start;
            let verdict = loop {
                if let Some(&v) = resolves.get(&cur) {
                    break v;
                }
                let Some(b) = by_id.get(&cur) else {
                    break false;
                };
                if chain.len() > super::snapshot::MAX_CHAIN {
                    break false;
                }
                chain.push(cur);
                match b.md.read().parent {
                    None => break true,
                    Some(p) => cur = p,
                }
            };
            for id in chain {
                resolves.insert(id, verdict);
            }
        }
        let mut cache = self.blobs.lock();
        cache.reserve(by_id.len());
        for (id, b) in &by_id {
            if !resolves[id] {
                continue;
            }
            let parent = b.md.read().parent;
            if let Some(p) = parent {
                *b.parent.write() = Some(by_id[&p].clone());
            }
            cache.insert(*id, b.clone());
        }
    }

    /// Bitmaps rebuilt from every blob's metadata after an unclean stop.
    pub(crate) fn claim_all(&self, blobs: &[(PageIdx, BlobMd)]) -> Result<Allocator> {
        let l = self.layout;
        let mut alloc = Allocator::new(l.md_len, l.total_clusters, l.reserved_clusters);
        for (first, md) in blobs {
            let id = Self::blob_id(*first);
            let dup = |what: String| {
                Error::corrupt(format!("blob {id}"), format!("{what} is claimed twice"))
            };
            if !alloc.claim_page(*first) {
                return Err(dup(format!("metadata page {first}")));
            }
            alloc.set_blobid(*first, true);
            for &p in md.cont_pages.iter().chain(md.extent_pages.iter().flatten()) {
                if !alloc.claim_page(p) {
                    return Err(dup(format!("metadata page {p}")));
                }
            }
            for &c in md.clusters.iter().flatten() {
                if !alloc.claim_cluster(c) {
                    return Err(dup(format!("cluster {c}")));
                }
            }
        }
        alloc.check();
        Ok(alloc)
    }
}

/// Reads the super block for a load: the primary, else (format 2 on) the
/// backup, trying each place a backup can have ([`format::backup_super_candidates`]).
/// Notes in `report` which copy served and, with a readable primary of
/// format 2, whether the backup needs the rewrite every load gives it.
/// Without a usable copy the primary's error is returned (a blank device
/// stays [`Error::NotABlobstore`]).
async fn read_super_blocks(
    dev: &Arc<dyn BlockDevice>,
    ch: &IoChannel,
    report: &mut LoadReport,
) -> Result<SuperBlock> {
    let block = dev.geometry().block_size as u64;
    let size = dev.geometry().size_bytes();
    let read_at = |off: u64| async move {
        let buf = dev.alloc_buf_for_overwrite(format::SUPER_BLOCK_LEN)?;
        ch.read(Lba(off / block), buf).await
    };
    let primary = SuperBlock::decode(&read_at(0).await?);
    match primary {
        Ok(sb) if sb.has_backup() => {
            let off = format::BACKUP_SUPER_PAGE * sb.page_size as u64;
            let backup = SuperBlock::decode_backup(&read_at(off).await?, sb.page_size);
            if let Err(e) = backup {
                tracing::warn!(
                    device = %dev.name(),
                    error = %e,
                    "the backup super block is damaged: rewriting it from the primary"
                );
                report.backup_rewritten = Some(e.to_string());
            }
            Ok(sb)
        }
        Ok(sb) => {
            tracing::info!(
                device = %dev.name(),
                version = sb.version,
                "blobstore of format version 1: it has no backup super block (loaded as before)"
            );
            report.no_backup = true;
            Ok(sb)
        }
        Err(primary_err) => {
            for (ps, off) in format::backup_super_candidates() {
                if off + format::SUPER_BLOCK_LEN as u64 > size {
                    break;
                }
                if let Ok(sb) = SuperBlock::decode_backup(&read_at(off).await?, ps) {
                    tracing::warn!(
                        device = %dev.name(),
                        error = %primary_err,
                        "the primary super block is unreadable: loaded from the backup super \
                         block; the primary is rewritten"
                    );
                    report.super_from_backup = Some(primary_err.to_string());
                    return Ok(sb);
                }
            }
            Err(primary_err)
        }
    }
}

/// What load does about the recovery markers it finds (FORMAT.md,
/// "Recovery"): the first pages of blobs to discard, and the blobs whose
/// marker only needs clearing.
fn resolve_pending(blobs: &[(PageIdx, BlobMd)]) -> (Vec<PageIdx>, Vec<PageIdx>) {
    let parents: HashMap<BlobId, Option<BlobId>> = blobs
        .iter()
        .map(|(p, md)| (StoreInner::blob_id(*p), md.parent))
        .collect();
    let (mut discard, mut finish) = (Vec::new(), Vec::new());
    for (page, md) in blobs {
        let id = StoreInner::blob_id(*page);
        let gone = match md.pending {
            None => continue,
            // The snapshot counts once its origin names it as its parent.
            Some(PendingOp::Snapshot { origin }) => {
                parents.get(&BlobId(origin)).is_some_and(|&p| p != Some(id))
            }
            // The removal counts once no clone names it any more.
            Some(PendingOp::Removal) => !parents.values().any(|&p| p == Some(id)),
        };
        if gone {
            discard.push(*page);
        } else {
            finish.push(*page);
        }
    }
    (discard, finish)
}
