//! The scale of the namespace (issue 22 item 6), not timed (the numbers
//! are `examples/mount_scale.rs`'s):
//! - a small file costs exactly one metadata page, also with a name of a
//!   few hundred bytes;
//! - default mkfs leaves pages for files of one cluster each until every
//!   cluster is used;
//! - a clean mount reads the metadata region in a few large reads and
//!   nothing per file, and writes and flushes only a fixed few; after an
//!   unclean stop (also one a blobstore-level tool has since made clean)
//!   it still checks every file's last synced bytes;
//! - a BlobFS the format-2 build made mounts, works and keeps its format.

use std::sync::Arc;

use blobfs::{BlobFs, MkfsOptions, MountOptions, OpenOptions};
use blobstore::fuzzing::{SuperBlock, SUPER_BLOCK_LEN};
use blobstore::{device_metrics, BlockDevice, MemDevice};

fn mkfs(dev: &Arc<dyn BlockDevice>, cluster_size: u32) -> BlobFs {
    BlobFs::mkfs(
        dev.clone(),
        MkfsOptions {
            cluster_size,
            ..Default::default()
        },
        MountOptions::default(),
    )
    .unwrap()
}

fn mount(dev: &Arc<dyn BlockDevice>) -> BlobFs {
    BlobFs::mount(dev.clone(), MountOptions::default()).unwrap()
}

/// Makes `name` with `len` bytes of `byte`, synced and closed.
fn put(fs: &BlobFs, name: &str, len: usize, byte: u8) -> blobfs::Result<()> {
    let f = fs.create(name)?;
    f.append(&vec![byte; len])?;
    f.close()
}

fn contents(fs: &BlobFs, name: &str) -> Vec<u8> {
    fs.open(name, OpenOptions::read())
        .unwrap()
        .read_all()
        .unwrap()
}

#[test]
fn a_small_file_costs_one_metadata_page() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 20, 4096).unwrap());
    let fs = mkfs(&dev, 64 << 10);
    let long_dir = "d".repeat(200);
    fs.create_dir(&long_dir).unwrap();
    for i in 0..200 {
        let bs = fs.blobstore().clone();
        let before = bs.free_md_pages();
        // Names of 4 to over 400 bytes.
        let name = if i % 2 == 0 {
            format!("{i:03}.sst")
        } else {
            format!("{long_dir}/{}{i:03}.sst", "f".repeat(200))
        };
        put(&fs, &name, 100, i as u8).unwrap();
        assert_eq!(bs.free_md_pages(), before - 1, "{name}");
        // A sync that grows the file, and a rewrite of its metadata on a
        // rename: still the one page.
        let f = fs.open(&name, OpenOptions::append()).unwrap();
        f.append(&[1u8; 50]).unwrap();
        f.sync().unwrap();
        f.close().unwrap();
        let renamed = format!("{name}.x");
        fs.rename(&name, &renamed).unwrap();
        assert_eq!(bs.free_md_pages(), before - 1, "{name}");
    }
    let free = fs.blobstore().free_md_pages();
    fs.unmount().unwrap();
    let fs = mount(&dev);
    assert_eq!(fs.blobstore().free_md_pages(), free);
    assert_eq!(contents(&fs, "000.sst.x").len(), 150);
    fs.unmount().unwrap();
}

/// With default mkfs options (one metadata page per cluster), files of
/// 100 bytes fill every cluster; the error is then out of clusters, with
/// metadata pages left.
#[test]
fn default_mkfs_fills_every_cluster_before_metadata_runs_out() {
    for (size, cluster) in [(64u64 << 20, 1u32 << 20), (32 << 20, 64 << 10)] {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(size, 4096).unwrap());
        let fs = BlobFs::mkfs(
            dev.clone(),
            MkfsOptions {
                cluster_size: cluster,
                ..Default::default()
            },
            MountOptions::default(),
        )
        .unwrap();
        let data_clusters = fs.blobstore().data_clusters();
        let mut made = 0u64;
        let err = loop {
            let name = format!("f{made:05}");
            match put(&fs, &name, 100, 7) {
                Ok(()) => made += 1,
                Err(e) => {
                    let _ = fs.remove_file(&name);
                    break e;
                }
            }
            assert!(made <= data_clusters, "more files than clusters");
        };
        assert!(err.is_no_space(), "{err}");
        let why = err.to_string();
        assert!(!why.contains("metadata page"), "{why}");
        assert_eq!(made, data_clusters, "cluster {cluster}: {why}");
        let bs = fs.blobstore().clone();
        assert_eq!(bs.free_clusters(), 0);
        assert!(bs.free_md_pages() > 0);
        fs.unmount().unwrap();
    }
}

/// What one mount of `dev` reads, writes and flushes, and the file system.
fn mount_io(dev: &Arc<dyn BlockDevice>) -> (u64, u64, u64, BlobFs) {
    let before = device_metrics(dev.id());
    let fs = mount(dev);
    let after = device_metrics(dev.id());
    (
        after.reads.count - before.reads.count,
        after.writes.count - before.writes.count,
        after.flushes.count - before.flushes.count,
        fs,
    )
}

#[test]
fn a_clean_mount_does_no_per_file_io() {
    const FILES: usize = 2000;
    let mem = MemDevice::new(256 << 20, 4096).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(mem.clone());
    let fs = mkfs(&dev, 64 << 10);
    fs.create_dir("db").unwrap();
    for i in 0..FILES {
        put(&fs, &format!("db/{i:06}.sst"), 100, i as u8).unwrap();
    }
    // Every file's last sync was a small one: each carries the check of
    // its new bytes that a mount after a crash reads.
    let bs = fs.blobstore().clone();
    let tails = bs
        .blob_ids()
        .into_iter()
        .filter(|&id| {
            let b = blobstore::block_on(bs.open_blob(id)).unwrap();
            b.get_xattr(blobfs::meta::TAIL).is_some()
        })
        .count();
    assert_eq!(tails, FILES);
    drop(bs);
    fs.unmount().unwrap();

    let (reads, writes, flushes, fs) = mount_io(&dev);
    // Super block and backup, three bitmaps, the used metadata pages in
    // 4 MiB reads; the "not clean" super block (two copies) and the root
    // record's new mount generation, each flushed.
    assert!(reads <= 10, "{reads} reads");
    assert!(writes <= 4, "{writes} writes");
    assert!(flushes <= 5, "{flushes} flushes");
    assert_eq!(fs.space().entries, FILES as u64 + 1);
    assert_eq!(contents(&fs, "db/000007.sst"), vec![7u8; 100]);

    // A crash (no unmount), then a blobstore-level tool that leaves the
    // store clean (fsck): the mount still checks each file's last bytes.
    drop(fs);
    let rep = blobfs::fsck::fsck(dev.clone()).unwrap();
    assert_eq!(rep.files, FILES as u64);
    let (reads, _, _, fs) = mount_io(&dev);
    assert!(
        reads >= FILES as u64,
        "{reads} reads: the tails were not checked"
    );
    fs.unmount().unwrap();
    // Clean again.
    let (reads, _, _, fs) = mount_io(&dev);
    assert!(reads <= 10, "{reads} reads");
    fs.unmount().unwrap();
}

#[path = "../../blobstore/tests/common/image.rs"]
mod image;

/// The image `tests/images/<name>` (blobstore's sparse test-image layout).
fn fixture(name: &str) -> Vec<u8> {
    image::read_image(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/images")
            .join(name),
    )
}

fn store_version(mem: &MemDevice) -> u32 {
    let mut sb = vec![0u8; SUPER_BLOCK_LEN];
    mem.load_bytes(0, &mut sb);
    SuperBlock::decode(&sb).unwrap().version
}

/// A BlobFS the format-2 build made (64 KiB clusters: `db/`, a file of
/// 100 bytes of 1, one of 150,000 bytes of 0x5a, an empty `db/LOCK`):
/// it mounts, reads, takes new files (two metadata pages each, as that
/// format has it), and stays format 2 across unmounts.
#[test]
fn a_format_2_blobfs_mounts_and_keeps_its_format() {
    let mem = MemDevice::from_image(&fixture("format2-blobfs.bsimage"), 4096).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(mem.clone());
    assert_eq!(store_version(&mem), 2);
    let fs = mount(&dev);
    assert_eq!(
        fs.list(""),
        vec!["db", "db/000001.sst", "db/000002.sst", "db/LOCK"]
    );
    assert_eq!(contents(&fs, "db/000001.sst"), vec![1u8; 100]);
    assert_eq!(contents(&fs, "db/000002.sst"), vec![0x5a; 150_000]);
    assert!(contents(&fs, "db/LOCK").is_empty());
    let before = fs.blobstore().free_md_pages();
    put(&fs, "db/000003.sst", 100, 3).unwrap();
    assert_eq!(fs.blobstore().free_md_pages(), before - 2);
    fs.unmount().unwrap();
    assert_eq!(store_version(&mem), 2);
    let rep = blobfs::fsck::fsck(dev.clone()).unwrap();
    assert!(rep.is_clean(), "{:?}", rep.findings);
    let fs = mount(&dev);
    assert_eq!(contents(&fs, "db/000003.sst"), vec![3u8; 100]);
    assert_eq!(contents(&fs, "db/000002.sst"), vec![0x5a; 150_000]);
    fs.unmount().unwrap();
    assert_eq!(store_version(&mem), 2);
}
