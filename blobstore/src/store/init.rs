//! Writing a whole store: formatting a device ([`Blobstore::init`]) and
//! the clean unload ([`Blobstore::unload`]).
//!
//! Invariants:
//! - A crash during init leaves either the old store intact or no store
//!   at all, never the new super block over old metadata: the old super
//!   blocks are retired durably, then the metadata region is cleared
//!   durably, and only then is the new super block written.
//! - After a clean unload the bitmaps on disk are exact: every blob is
//!   synced before they are written, and they are durable before the
//!   super block says clean.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::state::{BlobInner, Layout, StoreInner};
use super::{Blobstore, BlobstoreOptions};
use crate::device::{BlockDevice, Lba};
use crate::error::{Error, Result};
use crate::format::{self, MaskKind, SuperBlock, NO_PAGE};

impl Blobstore {
    /// Makes a new, empty blobstore on `dev`. Unless `opts.force` is set,
    /// first probes the device ([`crate::probe`]) and fails with
    /// [`Error::DeviceNotBlank`] if it holds a known signature, our own
    /// blobstores included; with `force`, whatever it held is overwritten.
    pub async fn init(dev: Arc<dyn BlockDevice>, opts: BlobstoreOptions) -> Result<Blobstore> {
        let geo = dev.geometry();
        let ps = opts.page_size;
        if !ps.is_power_of_two() || !(4096..=65536).contains(&ps) || ps < geo.block_size {
            return Err(Error::InvalidArgument(format!(
                "page size {ps}: must be a power of two from 4096 to 65536"
            )));
        }
        if opts.cluster_size == 0 || !opts.cluster_size.is_multiple_of(ps) {
            return Err(Error::InvalidArgument(format!(
                "cluster size {} is not a multiple of the page size {ps}",
                opts.cluster_size
            )));
        }
        if opts.bstype.len() > format::BSTYPE_LEN {
            return Err(Error::InvalidArgument(format!(
                "type tag {:?} is longer than {} bytes",
                opts.bstype,
                format::BSTYPE_LEN
            )));
        }
        let total_clusters = geo.size_bytes() / opts.cluster_size as u64;
        if total_clusters > u32::MAX as u64 {
            return Err(Error::InvalidArgument(format!(
                "{total_clusters} clusters: use a larger cluster size"
            )));
        }
        let md_len = opts.md_pages.unwrap_or(total_clusters).max(1);
        if md_len >= NO_PAGE as u64 {
            return Err(Error::InvalidArgument(format!("{md_len} metadata pages")));
        }
        let pmask = format::mask_region_pages(md_len, ps);
        let cmask = format::mask_region_pages(total_clusters, ps);
        let mask_start = SuperBlock::first_mask_page(format::FORMAT_VERSION);
        let md_start = mask_start + 2 * pmask + cmask;
        let ppc = (opts.cluster_size / ps) as u64;
        let reserved = (md_start + md_len).div_ceil(ppc);
        if reserved >= total_clusters {
            return Err(Error::DeviceTooSmall(format!(
                "{} bytes hold {total_clusters} clusters of {}, and the metadata needs {reserved}",
                geo.size_bytes(),
                opts.cluster_size
            )));
        }
        if !opts.force {
            if let Some(sig) = crate::probe::probe(&dev).await? {
                tracing::warn!(
                    device = %dev.name(),
                    holds = %sig.what,
                    offset = sig.offset,
                    "refusing to format a device that is not blank"
                );
                return Err(Error::DeviceNotBlank {
                    device: dev.name(),
                    what: sig.what,
                    offset: sig.offset,
                });
            }
        }
        let mut bstype = [0u8; format::BSTYPE_LEN];
        bstype[..opts.bstype.len()].copy_from_slice(opts.bstype.as_bytes());
        let sb = SuperBlock {
            version: format::FORMAT_VERSION,
            clean: false,
            page_size: ps,
            cluster_size: opts.cluster_size,
            io_unit_size: geo.block_size,
            total_clusters,
            mask_start,
            page_mask_len: pmask,
            cluster_mask_len: cmask,
            blobid_mask_len: pmask,
            md_start,
            md_len,
            super_blob: 0,
            bstype,
        };
        let layout = Layout::from_super(&sb);
        let inner = Arc::new(StoreInner::new(dev, layout, bstype, 0));
        let ch = inner.chan()?;
        // Old metadata pages on the device must not look like blobs, and a
        // crash in the middle must leave either the old store intact or no
        // store at all, never the new super block over old metadata: first
        // retire the old super block durably, then clear the rest durably,
        // and only then write the new super block.
        // An old store's backup super block goes first, durably (only
        // where one is found: the places between hold its metadata, which
        // must stay whole while its primary does), then its primary.
        let bpp = layout.blocks_per_page();
        let block = geo.block_size as u64;
        let mut retired = false;
        for (page_size, off) in format::backup_super_candidates() {
            if off + format::SUPER_BLOCK_LEN as u64 > geo.size_bytes() {
                break;
            }
            let len = format::SUPER_BLOCK_LEN;
            let buf = inner.read_bytes(&ch, Lba(off / block), len).await?;
            if SuperBlock::decode_backup(&buf, page_size).is_ok() {
                ch.write_zeroes(Lba(off / block), len as u64 / block)
                    .await?;
                retired = true;
            }
        }
        if retired {
            ch.flush().await?;
        }
        ch.write_zeroes(Lba(0), bpp).await?;
        ch.flush().await?;
        ch.write_zeroes(Lba(bpp), (md_start + md_len - 1) * bpp)
            .await?;
        ch.flush().await?;
        inner.write_super(&ch, false).await?;
        Ok(Blobstore { inner })
    }

    /// Syncs every changed blob, writes the bitmaps and marks the store clean.
    /// The store can't be used afterwards (its handles return `Shutdown`).
    pub async fn unload(self) -> Result<()> {
        let inner = &self.inner;
        let txn = inner.begin().await?;
        let blobs: Vec<Arc<BlobInner>> = inner.blobs.lock().values().cloned().collect();
        for b in blobs {
            txn.sync_blob(&b).await?;
        }
        let ch = txn.ch();
        if inner.needs_scan.load(Ordering::Acquire) {
            // The bitmaps would not describe what is on the device: leave
            // the super block not clean (as load wrote it) for a rebuild.
            inner.unloaded.store(true, Ordering::Release);
            return Ok(());
        }
        let l = inner.layout;
        let (pages, clusters, blobids) = inner.alloc.lock().bits();
        let mut region = format::encode_mask(MaskKind::Pages, &pages, l.page_size);
        region.extend(format::encode_mask(
            MaskKind::Clusters,
            &clusters,
            l.page_size,
        ));
        region.extend(format::encode_mask(
            MaskKind::BlobIds,
            &blobids,
            l.page_size,
        ));
        inner
            .write_bytes(ch, Lba(l.mask_start * l.blocks_per_page()), &region)
            .await?;
        ch.flush().await?;
        inner.write_super(ch, true).await?;
        inner.unloaded.store(true, Ordering::Release);
        Ok(())
    }
}
