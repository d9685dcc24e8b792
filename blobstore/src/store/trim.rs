//! Trimming: handing every free cluster back to the device (`fstrim` for a
//! blobstore), so a thin-provisioned device, an SSD or a sparse image file
//! gets the space that deleted blobs left behind.
//!
//! Invariant: a trim is one metadata transaction ([`super::txn::MdTxn`])
//! from the moment it reads the free clusters until its last unmap
//! completes. Clusters are only handed out (create, resize, thin
//! allocation, snapshots) in a transaction, so no
//! cluster being unmapped can meanwhile be given to a blob and written.
//! Clusters that are free in memory are referenced by no durable metadata
//! (a blob's clusters return to the allocator only after the metadata that
//! released them is durable), and a cluster is zeroed again whenever it is
//! handed out, so unmapping one never changes what any blob reads.

use super::Blobstore;
use crate::error::{Error, Result};

/// Largest single unmap request a trim sends, in bytes. Large, so a mostly
/// empty device takes few requests; bounded, so one request stays well
/// inside what every backend takes in one command (the device layer splits
/// further where it must).
const MAX_TRIM_REQUEST_BYTES: u64 = 1 << 30;

/// What [`Blobstore::trim_free`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrimReport {
    /// Free clusters unmapped.
    pub clusters: u64,
    /// Bytes unmapped (`clusters` times the cluster size).
    pub bytes: u64,
    /// Runs of neighbouring free clusters (each one or more requests).
    pub runs: u64,
    /// Unmap requests sent to the device.
    pub requests: u64,
}

impl Blobstore {
    /// Deallocates every free cluster on the device, in runs of
    /// neighbouring clusters and requests of up to 1 GiB, and reports how
    /// much it trimmed. Allocation waits meanwhile (the metadata lock is
    /// held), reads and writes of blobs do not.
    ///
    /// A device without an unmap operation (an NVMe namespace without
    /// Dataset Management) fails with [`Error::Unsupported`] naming the
    /// device, before anything was trimmed. A `file:` image punches holes
    /// (it writes zeroes instead where its file system cannot punch, or
    /// when it was opened with `preallocate`); a block device discards.
    pub async fn trim_free(&self) -> Result<TrimReport> {
        let inner = &self.inner;
        let txn = inner.begin().await?;
        let runs = inner.alloc.lock().free_cluster_runs();
        // Blocks per cluster (the io unit is the device block).
        let upc = inner.layout.units_per_cluster();
        let cluster_bytes = inner.layout.cluster_size as u64;
        let per_request = (MAX_TRIM_REQUEST_BYTES / cluster_bytes).max(1);
        let mut report = TrimReport::default();
        for (first, count) in runs {
            let mut done = 0u64;
            while done < count as u64 {
                let n = per_request.min(count as u64 - done);
                let lba = inner.layout.cluster_lba(first).plus(done * upc);
                txn.ch().unmap(lba, n * upc).await.map_err(|e| match e {
                    Error::Unsupported(why) => Error::Unsupported(format!(
                        "trim: {} cannot unmap ({why}); trimmed {} clusters before",
                        self.device().name(),
                        report.clusters
                    )),
                    e => e,
                })?;
                done += n;
                report.clusters += n;
                report.requests += 1;
            }
            report.runs += 1;
        }
        report.bytes = report.clusters * cluster_bytes;
        Ok(report)
    }
}
