//! `Blobstore::trim_free`: every free cluster handed back to the device, the
//! blobs' data untouched, and a device that cannot unmap refused cleanly.

mod common;

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use blobstore::device::{ChannelBackend, DeviceId, FileOptions, IoOp, Tag};
use blobstore::{
    block_on, BlobId, BlobOptions, Blobstore, BlobstoreOptions, BlockDevice, DmaBuf, Error,
    FileDevice, Geometry, IoKind, LoadOptions, MemDevice,
};
use common::{buf, pattern};

const CLUSTER: u32 = 64 << 10;

fn store_opts() -> BlobstoreOptions {
    BlobstoreOptions {
        cluster_size: CLUSTER,
        ..Default::default()
    }
}

/// Makes a blob of `clusters` clusters filled with `pattern(seed)`.
fn filled_blob(bs: &Blobstore, clusters: u64, seed: u64) -> (BlobId, Vec<u8>) {
    block_on(async {
        let id = bs
            .create_blob(BlobOptions {
                num_clusters: clusters,
                ..Default::default()
            })
            .await
            .unwrap();
        let b = bs.open_blob(id).await.unwrap();
        let data = pattern(seed, (clusters * CLUSTER as u64) as usize);
        b.write(0, buf(&data)).await.unwrap();
        b.close().await.unwrap();
        (id, data)
    })
}

fn read_blob(bs: &Blobstore, id: BlobId) -> Vec<u8> {
    block_on(async {
        let b = bs.open_blob(id).await.unwrap();
        let out = b
            .read(0, DmaBuf::new(b.size_bytes() as usize).unwrap())
            .await
            .unwrap();
        out.to_vec()
    })
}

#[test]
fn trim_punches_the_free_clusters_of_a_file_image_and_keeps_the_data() {
    let path = std::env::temp_dir().join(format!("blobstore-trim-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let dev: Arc<dyn BlockDevice> = Arc::new(
        FileDevice::open(
            &path,
            FileOptions {
                size_bytes: Some(32 << 20),
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let bs = block_on(Blobstore::init(dev.clone(), store_opts())).unwrap();
    let (keep, kept) = filled_blob(&bs, 40, 1);
    let (gone, _) = filled_blob(&bs, 200, 2);
    let (also_gone, _) = filled_blob(&bs, 50, 3);
    block_on(bs.delete_blob(gone)).unwrap();
    block_on(bs.delete_blob(also_gone)).unwrap();
    let blocks = || std::fs::metadata(&path).unwrap().blocks() * 512;
    let before = blocks();
    assert!(before >= 290 * CLUSTER as u64, "{before} bytes allocated");

    let free = bs.free_clusters();
    let report = block_on(bs.trim_free()).unwrap();
    assert_eq!(report.clusters, free);
    assert_eq!(report.bytes, free * CLUSTER as u64);
    assert!(
        report.runs >= 1 && report.requests >= report.runs,
        "{report:?}"
    );
    let after = blocks();
    assert!(
        after + 250 * CLUSTER as u64 <= before,
        "trim left {after} of {before} bytes allocated"
    );
    // Nothing a blob holds changed, and space still allocates and reads back.
    assert_eq!(read_blob(&bs, keep), kept);
    let (again, data) = filled_blob(&bs, 100, 4);
    assert_eq!(read_blob(&bs, again), data);
    block_on(bs.unload()).unwrap();
    let bs = block_on(Blobstore::load(dev, LoadOptions::default())).unwrap();
    assert_eq!(read_blob(&bs, keep), kept);
    assert_eq!(read_blob(&bs, again), data);
    // Trimming twice is harmless.
    let second = block_on(bs.trim_free()).unwrap();
    assert_eq!(second.clusters, bs.free_clusters());
    block_on(bs.unload()).unwrap();
    std::fs::remove_file(&path).unwrap();
}

/// A memory device whose unmap is not supported (as an NVMe namespace
/// without Dataset Management).
struct NoUnmap(MemDevice);

struct NoUnmapBackend(Box<dyn ChannelBackend>);

impl ChannelBackend for NoUnmapBackend {
    fn submit(&mut self, tag: Tag, op: &IoOp) -> blobstore::Result<()> {
        if op.kind == IoKind::Unmap {
            return Err(Error::Unsupported("no Dataset Management".into()));
        }
        self.0.submit(tag, op)
    }
    fn reap(&mut self, done: &mut dyn FnMut(Tag, blobstore::Result<()>)) -> usize {
        self.0.reap(done)
    }
}

impl BlockDevice for NoUnmap {
    fn geometry(&self) -> Geometry {
        self.0.geometry()
    }
    fn id(&self) -> DeviceId {
        self.0.id()
    }
    fn name(&self) -> String {
        "no-unmap".into()
    }
    fn new_backend(&self) -> blobstore::Result<Box<dyn ChannelBackend>> {
        Ok(Box::new(NoUnmapBackend(self.0.new_backend()?)))
    }
}

#[test]
fn a_device_without_unmap_is_refused_cleanly() {
    let dev: Arc<dyn BlockDevice> = Arc::new(NoUnmap(MemDevice::new(16 << 20, 4096).unwrap()));
    let bs = block_on(Blobstore::init(dev, store_opts())).unwrap();
    let (keep, kept) = filled_blob(&bs, 4, 5);
    let e = block_on(bs.trim_free()).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("no-unmap cannot unmap"), "{msg}");
    // The store goes on working.
    assert_eq!(read_blob(&bs, keep), kept);
    block_on(bs.unload()).unwrap();
}

#[test]
fn trim_on_a_memory_device_reports_every_free_cluster() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(16 << 20, 512).unwrap());
    let bs = block_on(Blobstore::init(dev, store_opts())).unwrap();
    let (a, _) = filled_blob(&bs, 3, 6);
    let (b, data) = filled_blob(&bs, 3, 7);
    block_on(bs.delete_blob(a)).unwrap();
    // The freed clusters sit between used ones: more than one run.
    let report = block_on(bs.trim_free()).unwrap();
    assert_eq!(report.clusters, bs.free_clusters());
    assert!(report.runs >= 2, "{report:?}");
    assert_eq!(read_blob(&bs, b), data);
    block_on(bs.unload()).unwrap();
}
