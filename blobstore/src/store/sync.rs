//! A blob's metadata sync, in three steps:
//!
//! 1. [`SyncPlan::capture`] (no I/O): from the metadata in memory, which
//!    pages the new metadata takes (fresh continuation and extent pages,
//!    the first page in place), their bytes, and what the old metadata
//!    held that the new one will not.
//! 2. [`MdTxn::write_plan`]: the fresh pages (with the caller's data where
//!    a barrier follows), a flush, then the first page in place and a
//!    flush: the commit point.
//! 3. [`MdTxn::adopt`]: memory takes the new state, and only then are the
//!    old pages and the clusters the blob gave up released.
//!
//! Invariants:
//! - A page is released only once no durable metadata can name it: after
//!   the first page that stops naming it is durable. A failed write keeps
//!   every page of both states allocated (a leak the next dirty load
//!   reclaims, never a reuse); only pages the device never saw referenced
//!   (fresh pages before the first page was written) go back.
//! - Data the blob wrote before an ordered sync is durable before its first
//!   page is written (the barrier).
//! - A sync adopts exactly what it captured: changes made while it wrote
//!   (a later version, more dirty extents) stay dirty for the next one.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::Ordering;

use futures::future::try_join_all;
use parking_lot::Mutex;

use super::alloc::Allocator;
use super::state::{BlobInner, BlobMd, Layout, MD_FULL};
use super::txn::MdTxn;
use super::units::{raw_cluster_map, raw_page, ClusterIdx, PageIdx};
use crate::device::DmaBuf;
use crate::error::{Error, Result};
use crate::format::{self, PageKind, NO_PAGE};
use crate::metrics::Stamp;
use crate::BlobId;

/// No caller data for [`MdTxn::sync_blob_with`] (whose outer result is
/// then always `Ok`).
pub(crate) const NO_DATA: Option<
    std::future::Ready<std::result::Result<(), std::convert::Infallible>>,
> = None;

thread_local! {
    /// The first-page buffer of this thread's last metadata sync, for the
    /// next one: a sync writes a first page every time (a log synced per
    /// record writes one per record), and a fresh aligned, zeroed buffer
    /// for each showed in profiles.
    static SPARE_MD_PAGE: std::cell::RefCell<Option<DmaBuf>> =
        const { std::cell::RefCell::new(None) };
}

/// A device buffer of one metadata page of `len` bytes, reused where this
/// thread has one (its contents are stale: the encoder writes every byte).
fn md_page_buf(len: usize) -> Result<DmaBuf> {
    match SPARE_MD_PAGE.with(|s| s.borrow_mut().take()) {
        Some(mut b) if b.capacity() >= len => {
            b.set_len(len)?;
            Ok(b)
        }
        _ => DmaBuf::new(len),
    }
}

/// Keeps a written first page's buffer for [`md_page_buf`].
fn give_back_md_page(buf: DmaBuf) {
    SPARE_MD_PAGE.with(|s| *s.borrow_mut() = Some(buf));
}

/// One sync of one blob, decided before any I/O.
pub(super) struct SyncPlan {
    /// Fresh pages and their bytes: continuation pages, then extent pages.
    fresh: Vec<(PageIdx, Vec<u8>)>,
    /// The extent table the blob has once the first page is durable.
    extent_pages: Vec<Option<PageIdx>>,
    /// The continuation chain it has then.
    cont_pages: Vec<PageIdx>,
    /// Pages the old metadata holds and the new one does not.
    to_free: Vec<PageIdx>,
    /// The metadata version captured.
    version: u64,
    /// The sequence number the new pages carry.
    sequence: u32,
    /// Extent pages that were dirty when captured.
    dirty: BTreeSet<usize>,
    /// How many of the pending cluster and page frees it carries out.
    freed_clusters: usize,
    freed_pages: usize,
    /// The map goes inline in the first page.
    inline: bool,
}

impl SyncPlan {
    /// Plans the sync of `md` (blob `id`), taking its fresh pages from
    /// `alloc`; also returns the first page's bytes, in a device buffer.
    /// [`Error::NoSpace`] when the metadata region is full, with nothing
    /// taken.
    pub(super) fn capture(
        md: &BlobMd,
        id: BlobId,
        l: &Layout,
        alloc: &Mutex<Allocator>,
    ) -> Result<(SyncPlan, DmaBuf)> {
        let per = l.extent_per_page;
        let header = format::BlobHeader {
            invalid_flags: md.invalid_flags,
            data_ro_flags: md.data_ro_flags,
            md_ro_flags: md.md_ro_flags,
            num_clusters: md.num_clusters,
            parent: md.parent.map(|p| p.0),
            pending: md.pending,
        };
        let xattrs = || md.xattrs.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
        // The map goes inline when the whole record then fits the first
        // page (format 3): the blob takes that one page.
        let inline = l.inline_map()
            && format::inline_map_fits(&header, md.clusters.len(), xattrs(), l.page_size);
        md.debug_check(per);
        // Extent pages to write: the changed ones, or every one when no
        // extent page holds the map on disk yet (it was inline).
        let rewrite: Vec<usize> = if inline {
            Vec::new()
        } else if md.map_inline {
            (0..md.extent_pages.len()).collect()
        } else {
            md.dirty_extents.iter().copied().collect()
        };
        let mut table = if inline {
            vec![None; md.extent_pages.len()]
        } else {
            md.extent_pages.clone()
        };
        let mut extent_payloads = Vec::new();
        for &k in &rewrite {
            let end = (k * per + per).min(md.clusters.len());
            let entries = &md.clusters[k * per..end];
            if entries.iter().all(Option::is_none) {
                table[k] = None;
            } else {
                let entries = raw_cluster_map(entries);
                extent_payloads.push((k, format::encode_extent_payload((k * per) as u64, entries)));
            }
        }
        let full = || {
            Error::NoSpace(format!(
                "no metadata page left to sync blob {id}: {MD_FULL}"
            ))
        };
        let mut a = alloc.lock();
        let ext_pages = a.alloc_pages(extent_payloads.len()).ok_or_else(full)?;
        for ((k, _), &p) in extent_payloads.iter().zip(&ext_pages) {
            table[*k] = Some(p);
        }
        let payloads = if inline {
            let map = raw_cluster_map(&md.clusters);
            format::encode_blob_payloads(&header, &[], map, xattrs(), l.page_size)
        } else {
            let raw_table: Vec<u32> = table.iter().copied().map(raw_page).collect();
            format::encode_blob_payloads(&header, &raw_table, &[], xattrs(), l.page_size)
        };
        debug_assert!(
            !inline || payloads.len() == 1,
            "an inline map that does not fit"
        );
        let Some(conts) = a.alloc_pages(payloads.len() - 1) else {
            ext_pages.iter().for_each(|&p| a.free_page(p));
            return Err(full());
        };
        let seq = md.sequence.wrapping_add(1);
        // The first page goes straight into a device buffer.
        let mut first = match md_page_buf(l.page_size as usize) {
            Ok(b) => b,
            Err(e) => {
                ext_pages.iter().chain(&conts).for_each(|&p| a.free_page(p));
                return Err(e);
            }
        };
        drop(a);
        format::encode_md_page_into(
            &mut first,
            PageKind::First,
            id.0,
            seq,
            raw_page(conts.first().copied()),
            &payloads[0],
        );
        let page = |kind, next, payload: &[u8]| {
            format::encode_md_page(kind, id.0, seq, next, payload, l.page_size)
        };
        let mut fresh: Vec<(PageIdx, Vec<u8>)> = payloads
            .iter()
            .enumerate()
            .skip(1)
            .map(|(i, payload)| {
                let next = raw_page(conts.get(i).copied());
                (conts[i - 1], page(PageKind::Continuation, next, payload))
            })
            .collect();
        fresh.extend(
            ext_pages
                .iter()
                .zip(&extent_payloads)
                .map(|(&p, (_, payload))| (p, page(PageKind::Extent, NO_PAGE, payload))),
        );
        // What the durable metadata holds now and the new one will not:
        // the old continuation pages, the old extent pages rewritten (all
        // of them when the map moves inline), pages a shrink gave up.
        let mut to_free: Vec<PageIdx> = md.cont_pages.clone();
        if inline {
            to_free.extend(md.extent_pages.iter().flatten());
        } else {
            to_free.extend(rewrite.iter().filter_map(|&k| md.extent_pages[k]));
        }
        to_free.extend_from_slice(&md.pending_free_pages);
        let plan = SyncPlan {
            fresh,
            extent_pages: table,
            cont_pages: conts,
            to_free,
            version: md.version,
            sequence: seq,
            dirty: md.dirty_extents.clone(),
            freed_clusters: md.pending_free_clusters.len(),
            freed_pages: md.pending_free_pages.len(),
            inline,
        };
        Ok((plan, first))
    }

    /// Whether the first page must wait for a flush of everything before
    /// it. Always when `ordered`: data the blob wrote before this sync must
    /// be durable before the first page can point at it (BlobFS relies on
    /// this for its lengths). Otherwise only when the first page references
    /// something new: a fresh page, something freed, or a cluster map
    /// change (an inline map can name new clusters without a fresh page).
    fn barrier(&self, ordered: bool) -> bool {
        ordered
            || !self.fresh.is_empty()
            || self.freed_clusters > 0
            || self.freed_pages > 0
            || !self.dirty.is_empty()
    }

    /// Gives the fresh pages back: the device never saw them referenced.
    fn release_fresh(&self, alloc: &Mutex<Allocator>) {
        let mut a = alloc.lock();
        self.fresh.iter().for_each(|&(p, _)| a.free_page(p));
    }
}

/// How a sync with the caller's data failed.
enum SyncFailed<E> {
    /// The caller's data write failed.
    Data(E),
    /// The metadata write failed.
    Metadata(Error),
}

impl MdTxn<'_> {
    /// Writes a blob's metadata atomically.
    pub(crate) async fn sync_blob(&self, blob: &BlobInner) -> Result<()> {
        match self.sync_blob_with(blob, true, NO_DATA).await {
            Ok(res) => res,
            Err(never) => match never {},
        }
    }

    /// [`MdTxn::sync_blob`], with two options.
    ///
    /// `ordered` false: when the sync needs no fresh metadata page and frees
    /// nothing, the barrier before the first page is skipped (see
    /// `Blob::sync_metadata_unordered`).
    ///
    /// `data`: the caller's data write, run alongside the metadata writes
    /// that come before the sync's last flush, so that flush covers it (with
    /// a barrier, the writes of fresh pages, so the data is durable before
    /// the first page; without one, the first page itself). Its error comes
    /// back as the outer `Err`; then the first page is not written after it
    /// where a barrier was due, and nothing is adopted. When the metadata is
    /// clean the data runs alone, followed by a flush.
    pub(crate) async fn sync_blob_with<E>(
        &self,
        blob: &BlobInner,
        ordered: bool,
        data: Option<impl Future<Output = std::result::Result<(), E>>>,
    ) -> std::result::Result<Result<()>, E> {
        let start = Stamp::now();
        let res = self.sync_untimed(blob, ordered, data).await;
        self.md_syncs.with(|c| c.record(start, 0, res.is_ok()));
        match res {
            Ok(()) => Ok(Ok(())),
            Err(SyncFailed::Data(e)) => Err(e),
            Err(SyncFailed::Metadata(e)) => Ok(Err(e)),
        }
    }

    /// [`MdTxn::sync_blob_with`] without counting it.
    async fn sync_untimed<E>(
        &self,
        blob: &BlobInner,
        ordered: bool,
        data: Option<impl Future<Output = std::result::Result<(), E>>>,
    ) -> std::result::Result<(), SyncFailed<E>> {
        let had_data = data.is_some();
        let data = async move {
            match data {
                Some(d) => d.await,
                None => Ok(()),
            }
        };
        // Only a sync (in a transaction, held here) makes metadata clean.
        if !blob.md.read().is_dirty() {
            data.await.map_err(SyncFailed::Data)?;
            if had_data {
                self.ch().flush().await.map_err(SyncFailed::Metadata)?;
            }
            return Ok(());
        }
        let (plan, first) = SyncPlan::capture(&blob.md.read(), blob.id, &self.layout, &self.alloc)
            .map_err(SyncFailed::Metadata)?;
        self.write_plan(blob, &plan, first, ordered, data).await?;
        self.adopt(blob, plan).await;
        Ok(())
    }

    /// Writes what `plan` says, with `first_page` its first page: the fresh
    /// pages (with the caller's `data` where a barrier follows) and a flush,
    /// then the first page in place (with `data` where no barrier came
    /// before) and a flush. On failure
    /// the fresh pages go back only where the device never saw the first
    /// page that names them.
    async fn write_plan<E>(
        &self,
        blob: &BlobInner,
        plan: &SyncPlan,
        first_page: DmaBuf,
        ordered: bool,
        data: impl Future<Output = std::result::Result<(), E>>,
    ) -> std::result::Result<(), SyncFailed<E>> {
        let ch = self.ch();
        let l = self.layout;
        let mut data = pin!(data);
        let barrier = plan.barrier(ordered);
        // 1. Fresh pages first (with the caller's data where a barrier
        // follows), made durable.
        if barrier {
            let fresh = try_join_all(
                plan.fresh
                    .iter()
                    .map(|(p, bytes)| self.write_bytes(ch, l.md_lba(*p), bytes)),
            );
            let (d, w) = futures::join!(data.as_mut(), fresh);
            let res = match (d, w) {
                (Err(e), _) => Err(SyncFailed::Data(e)),
                (Ok(()), Err(e)) => Err(SyncFailed::Metadata(e)),
                (Ok(()), Ok(_)) => ch.flush().await.map_err(SyncFailed::Metadata),
            };
            if res.is_err() {
                plan.release_fresh(&self.alloc);
                return res;
            }
        } else {
            // No fresh pages to write (else there would be a barrier).
            debug_assert!(plan.fresh.is_empty());
        }
        // 2. The first page, in place: the commit point. On failure the
        // fresh pages may or may not be referenced on disk, so both sets
        // stay allocated (a leak the next dirty load reclaims, never a
        // reuse).
        let first = async {
            ch.write(l.md_lba(blob.page), first_page)
                .await
                .map(give_back_md_page)
        };
        if barrier {
            first.await.map_err(SyncFailed::Metadata)?;
        } else {
            let (d, w) = futures::join!(data.as_mut(), first);
            d.map_err(SyncFailed::Data)?;
            w.map_err(SyncFailed::Metadata)?;
        }
        ch.flush().await.map_err(SyncFailed::Metadata)
    }

    /// Memory takes the state `plan` wrote, then what the old state held
    /// goes: the clusters the blob gave up (cleared as the store's clear
    /// method says) and the pages no durable metadata names any more.
    async fn adopt(&self, blob: &BlobInner, plan: SyncPlan) {
        let freed_clusters = {
            let mut md = blob.md.write();
            md.extent_pages = plan.extent_pages;
            md.map_inline = plan.inline;
            md.cont_pages = plan.cont_pages;
            md.sequence = plan.sequence;
            md.synced_version = plan.version;
            for k in &plan.dirty {
                md.dirty_extents.remove(k);
            }
            md.pending_free_pages.drain(..plan.freed_pages);
            let freed: Vec<ClusterIdx> = md
                .pending_free_clusters
                .drain(..plan.freed_clusters)
                .collect();
            md.debug_check(self.layout.extent_per_page);
            freed
        };
        // The first page is on the device again, whatever a failed delete
        // did to it.
        blob.first_page_doubtful.store(false, Ordering::Release);
        self.clear_clusters(self.ch(), &freed_clusters).await;
        let mut a = self.alloc.lock();
        for p in plan.to_free {
            a.free_page(p);
        }
        for c in freed_clusters {
            a.free_cluster(c);
        }
        a.check();
    }
}
