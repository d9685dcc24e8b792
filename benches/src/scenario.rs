//! Ready-made setups shared by the `blobstore-bench` table and the criterion
//! benches: one device, a blobstore on it with one thick blob covering most
//! of the device, and a raw region of the same size for the baseline.
//!
//! Invariants:
//! - The raw region is the last `blob size` bytes of the device, so it never
//!   touches the blobstore's metadata (at the front) and overlaps the blob's
//!   clusters almost entirely: both runs hit the same media.
//! - After [`BlobVsRaw::precondition`] every byte of the blob and of the raw
//!   region has been written once, so reads hit allocated, written blocks.
//! - `spare_clusters` stay free for the metadata benchmark.

use std::cell::Cell;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blobstore::device::open_device;
use blobstore::{BlobOptions, Blobstore, BlobstoreOptions, BlockDevice, Error, Result};

use crate::hist::LatencyHistogram;
use crate::load::{run_load_blocking, Limit, LoadSpec, Pattern, Region};
use crate::target::{BlobTarget, IoTarget, OpKind, RawTarget};
use blobstore::util::SplitMix64;

/// How to build a [`BlobVsRaw`].
#[derive(Clone, Debug)]
pub struct SetupOptions {
    /// Blobstore options (cluster and page size).
    pub store: BlobstoreOptions,
    /// Clusters left free after the big blob (the metadata benchmark needs
    /// 4 at a time).
    pub spare_clusters: u64,
}

impl Default for SetupOptions {
    fn default() -> Self {
        SetupOptions {
            // The benchmark formats its scratch device on every run.
            store: BlobstoreOptions {
                force: true,
                ..Default::default()
            },
            spare_clusters: 16,
        }
    }
}

/// A device, a blobstore on it, a thick blob and the matching raw region.
pub struct BlobVsRaw {
    /// The device spec it was opened from.
    pub spec: String,
    /// The device.
    pub dev: Arc<dyn BlockDevice>,
    /// The store.
    pub store: Blobstore,
    /// The device through this thread's channel.
    pub raw: RawTarget,
    /// The big blob.
    pub blob: BlobTarget,
    /// Where raw I/O goes: as large as the blob, at the end of the device.
    pub raw_region: Region,
}

impl BlobVsRaw {
    /// Opens `spec`, initialises a blobstore on it (erasing it) and creates
    /// the thick blob. Does not precondition.
    pub fn open(spec: &str, opts: &SetupOptions) -> Result<BlobVsRaw> {
        BlobVsRaw::on_device(open_device(spec)?, spec, opts)
    }

    /// As [`BlobVsRaw::open`], on a device already open (`spec` names it in
    /// reports).
    pub fn on_device(
        dev: Arc<dyn BlockDevice>,
        spec: &str,
        opts: &SetupOptions,
    ) -> Result<BlobVsRaw> {
        blobstore::block_on(async {
            let store = Blobstore::init(dev.clone(), opts.store.clone()).await?;
            let free = store.free_clusters();
            if free <= opts.spare_clusters {
                return Err(Error::NoSpace(format!(
                    "{spec}: {free} free clusters, need more than {} spare",
                    opts.spare_clusters
                )));
            }
            let id = store
                .create_blob(BlobOptions {
                    num_clusters: free - opts.spare_clusters,
                    ..BlobOptions::default()
                })
                .await?;
            let blob = BlobTarget::new(store.open_blob(id).await?, dev.clone());
            let raw = RawTarget::new(dev.clone())?;
            let len_bytes = blob.size_bytes();
            let raw_region = Region {
                offset_bytes: raw.size_bytes() - len_bytes,
                len_bytes,
            };
            Ok(BlobVsRaw {
                spec: spec.to_string(),
                dev,
                store,
                raw,
                blob,
                raw_region,
            })
        })
    }

    /// Writes the whole blob and the whole raw region once, sequentially in
    /// 1 MiB writes; returns the time it took.
    pub fn precondition(&self) -> Result<Duration> {
        let t0 = Instant::now();
        let chunk = 1usize << 20;
        let spec = |len_bytes: u64| LoadSpec {
            queue_depth: 4,
            block_bytes: chunk,
            read_percent: 0,
            pattern: Pattern::Sequential,
            region: None,
            limit: Limit::Ops(len_bytes / chunk as u64),
            seed: 1,
        };
        run_load_blocking(&self.blob, &spec(self.blob.size_bytes()))?;
        run_load_blocking(
            &self.raw,
            &LoadSpec {
                region: Some(self.raw_region),
                ..spec(self.raw_region.len_bytes)
            },
        )?;
        blobstore::block_on(self.raw.channel().flush())?;
        Ok(t0.elapsed())
    }

    /// `spec` aimed at the raw region.
    pub fn raw_spec(&self, spec: &LoadSpec) -> LoadSpec {
        LoadSpec {
            region: Some(self.raw_region),
            ..*spec
        }
    }
}

/// Timing of an operation repeated one at a time.
#[derive(Clone, Debug)]
pub struct RepeatReport {
    /// Completed repetitions.
    pub count: u64,
    /// Time for all of them.
    pub elapsed: Duration,
    /// Latency of each.
    pub latency: LatencyHistogram,
}

impl RepeatReport {
    /// Repetitions per second.
    pub fn per_sec(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Runs `op` one at a time until `limit`, on the calling thread.
pub fn run_repeated<F, Fut>(limit: Limit, mut op: F) -> Result<RepeatReport>
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    blobstore::block_on(async {
        let mut report = RepeatReport {
            count: 0,
            elapsed: Duration::ZERO,
            latency: LatencyHistogram::new(),
        };
        let start = Instant::now();
        loop {
            let done = match limit {
                Limit::Ops(n) => report.count >= n,
                Limit::Time(d) => start.elapsed() >= d,
            };
            if done {
                break;
            }
            let t0 = Instant::now();
            op(report.count).await?;
            report.latency.record(t0.elapsed());
            report.count += 1;
        }
        report.elapsed = start.elapsed();
        Ok(report)
    })
}

/// One metadata cycle: create a 1-cluster thick blob, open it, resize it to
/// 4 clusters, sync its metadata, close it and delete it.
pub async fn metadata_cycle(store: &Blobstore) -> Result<()> {
    let id = store
        .create_blob(BlobOptions {
            num_clusters: 1,
            ..BlobOptions::default()
        })
        .await?;
    let blob = store.open_blob(id).await?;
    blob.resize(4).await?;
    blob.sync_metadata().await?;
    drop(blob);
    store.delete_blob(id).await
}

/// The baseline for metadata cycles: synced 4 KiB writes (a write, then a
/// flush) at random blocks of `region` through the raw device, one at a
/// time until `limit`.
pub fn run_synced_writes(raw: &RawTarget, region: Region, limit: Limit) -> Result<RepeatReport> {
    let block = 4096u64;
    let blocks = region.len_bytes / block;
    if blocks == 0 {
        return Err(Error::InvalidArgument(format!(
            "region of {} bytes holds no 4 KiB block",
            region.len_bytes
        )));
    }
    let slot = Cell::new(Some(raw.alloc_buf(block as usize)?));
    let slot = &slot;
    run_repeated(limit, |i| async move {
        let off = region.offset_bytes + SplitMix64::new(i).below(blocks) * block;
        let buf = slot.take().expect("one synced write at a time");
        let buf = raw.io(OpKind::Write, off, buf).await?;
        slot.set(Some(buf));
        raw.channel().flush().await
    })
}

/// A directory removed, with its contents, when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a fresh directory in `parent`.
    pub fn new(parent: &Path) -> std::io::Result<TempDir> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = parent.join(format!(
            "blobstore-bench-{}-{nanos:08x}",
            std::process::id()
        ));
        std::fs::create_dir(&path)?;
        Ok(TempDir(path))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("warning: could not remove {}: {e}", self.0.display());
        }
    }
}

/// Turns a device name into a spec: `mem` is a memory device of
/// `size_bytes`, `file` an image of `size_bytes` in a fresh directory under
/// `parent` (returned, so it is removed when dropped: drop the device
/// first), and anything else is taken as a spec as is.
pub fn resolve_device(
    entry: &str,
    size_bytes: u64,
    parent: &Path,
) -> Result<(String, Option<TempDir>)> {
    match entry {
        "mem" => Ok((format!("mem:{size_bytes}"), None)),
        "file" => {
            let dir = TempDir::new(parent).map_err(|e| {
                Error::InvalidArgument(format!(
                    "cannot create a directory for the file device in {}: {e}",
                    parent.display()
                ))
            })?;
            let path = dir.path().join("device.img");
            let text = path.to_str().filter(|p| !p.contains(['%', '?']));
            let Some(text) = text else {
                return Err(Error::InvalidArgument(format!(
                    "file device path {} needs escaping; pick another --dir",
                    path.display()
                )));
            };
            Ok((format!("file:{text}?size={size_bytes}"), Some(dir)))
        }
        spec => Ok((spec.to_string(), None)),
    }
}
