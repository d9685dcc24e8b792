//! The store's own device I/O: byte ranges, the super block and its
//! backup, and clearing, zeroing and copying whole clusters.
//!
//! Invariants:
//! - The super block is written before its backup, each made durable
//!   before the next (FORMAT.md, "Backup super block").
//! - A cluster handed to a blob is zeroed or filled before the blob's
//!   metadata names it ([`StoreInner::zero_clusters`],
//!   [`StoreInner::fill_clusters`]).

use futures::future::try_join_all;

use super::state::StoreInner;
use super::units::ClusterIdx;
use super::ClearMethod;
use crate::device::{DmaBuf, IoChannel, Lba};
use crate::error::Result;
use crate::format::{self, SuperBlock};

impl StoreInner {
    /// Writes `bytes` at device block `lba`.
    pub(crate) async fn write_bytes(&self, ch: &IoChannel, lba: Lba, bytes: &[u8]) -> Result<()> {
        let buf = DmaBuf::from_slice(bytes)?;
        ch.write(lba, buf).await.map(|_| ())
    }

    /// Reads `len` bytes from device block `lba`.
    pub(crate) async fn read_bytes(&self, ch: &IoChannel, lba: Lba, len: usize) -> Result<DmaBuf> {
        let buf = self.dev.alloc_buf_for_overwrite(len)?;
        ch.read(lba, buf).await
    }

    fn super_block(&self, clean: bool) -> SuperBlock {
        let l = &self.layout;
        let pmask = format::mask_region_pages(l.md_len, l.page_size);
        let cmask = format::mask_region_pages(l.total_clusters, l.page_size);
        SuperBlock {
            version: l.version,
            clean,
            page_size: l.page_size,
            cluster_size: l.cluster_size,
            io_unit_size: l.io_unit,
            total_clusters: l.total_clusters,
            mask_start: l.mask_start,
            page_mask_len: pmask,
            cluster_mask_len: cmask,
            blobid_mask_len: pmask,
            md_start: l.md_start,
            md_len: l.md_len,
            super_blob: *self.super_blob.lock(),
            bstype: self.bstype,
        }
    }

    /// Writes the super block, then (format 2 on) its backup, each made
    /// durable before the next: a write torn by a power cut leaves the
    /// other copy whole, holding this state or the one before, both of
    /// which load (FORMAT.md, "Backup super block").
    pub(crate) async fn write_super(&self, ch: &IoChannel, clean: bool) -> Result<()> {
        let l = self.layout;
        let mut page = vec![0u8; l.page_size as usize];
        page[..format::SUPER_BLOCK_LEN].copy_from_slice(&self.super_block(clean).encode());
        self.write_bytes(ch, Lba(0), &page).await?;
        ch.flush().await?;
        if l.version >= format::BACKUP_SUPER_VERSION {
            let lba = format::BACKUP_SUPER_PAGE * l.blocks_per_page();
            self.write_bytes(ch, Lba(lba), &page).await?;
            ch.flush().await?;
        }
        Ok(())
    }

    /// Zeroes freshly allocated clusters so they never show old data.
    pub async fn zero_clusters(&self, ch: &IoChannel, clusters: &[ClusterIdx]) -> Result<()> {
        let runs = self.block_runs(clusters);
        try_join_all(runs.into_iter().map(|(lba, n)| ch.write_zeroes(lba, n))).await?;
        Ok(())
    }

    /// `clusters` as `(lba, blocks)` runs, neighbours (in the order given)
    /// merged, so one device request covers each run.
    pub fn block_runs(&self, clusters: &[ClusterIdx]) -> Vec<(Lba, u64)> {
        let upc = self.layout.units_per_cluster();
        let mut runs: Vec<(Lba, u64)> = Vec::new();
        for &c in clusters {
            let lba = self.layout.cluster_lba(c);
            match runs.last_mut() {
                Some((start, n)) if start.plus(*n) == lba => *n += upc,
                _ => runs.push((lba, upc)),
            }
        }
        runs
    }

    /// Clears clusters that no durable metadata references any more, as the
    /// clear method says. Best effort: they are zeroed again when handed
    /// out, so a failure here costs nothing but the clearing.
    pub(crate) async fn clear_clusters(&self, ch: &IoChannel, clusters: &[ClusterIdx]) {
        let method = *self.clear_method.lock();
        if method == ClearMethod::None || clusters.is_empty() {
            return;
        }
        // Neighbouring clusters (a blob's are often in order) go in one
        // request.
        for (lba, blocks) in self.block_runs(clusters) {
            let res = if method == ClearMethod::Unmap && self.geo.unmap_reads_zeroes {
                ch.unmap(lba, blocks).await
            } else {
                ch.write_zeroes(lba, blocks).await
            };
            if res.is_err() {
                return;
            }
        }
    }

    /// Fills fresh clusters: each `(dst, Some(src))` gets a copy of cluster
    /// `src`, each `(dst, None)` gets zeroes.
    pub(crate) async fn fill_clusters(
        &self,
        ch: &IoChannel,
        fills: &[(ClusterIdx, Option<ClusterIdx>)],
    ) -> Result<()> {
        let zeroes: Vec<ClusterIdx> = fills
            .iter()
            .filter(|f| f.1.is_none())
            .map(|f| f.0)
            .collect();
        self.zero_clusters(ch, &zeroes).await?;
        let cs = self.layout.cluster_size as usize;
        let mut buf = None;
        for &(dst, src) in fills {
            let Some(src) = src else { continue };
            let b = match buf.take() {
                Some(b) => b,
                // Read into before it is written from: no zeroing.
                None => self.dev.alloc_buf_for_overwrite(cs)?,
            };
            let b = ch.read(self.layout.cluster_lba(src), b).await?;
            let b = ch.write(self.layout.cluster_lba(dst), b).await?;
            buf = Some(b);
        }
        Ok(())
    }
}
