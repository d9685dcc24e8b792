//! Damage a load works around: a primary super block that is unreadable
//! (the backup serves and the primary is rewritten), a damaged backup
//! (rewritten), a version-1 store (no backup, loaded as before), and a
//! damaged bitmap of a clean store (every bitmap rebuilt from the blobs'
//! metadata).

mod common;

use std::sync::Arc;

use blobstore::fuzzing::{SuperBlock, SUPER_BLOCK_LEN};
use blobstore::{
    block_on, BlobId, BlobOptions, Blobstore, BlobstoreOptions, BlockDevice, DmaBuf, LoadOptions,
    LoadReport, MemDevice,
};
use rand::{Rng, SeedableRng};

const PAGE: usize = 4096;

/// A clean store with three blobs of one cluster each, filled with their
/// index; returns the device, its image and the blob ids.
fn image() -> (Vec<u8>, Vec<BlobId>) {
    let mem = MemDevice::new(16 << 20, 512).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(mem.clone());
    let bs = block_on(Blobstore::init(
        dev,
        BlobstoreOptions {
            cluster_size: 64 << 10,
            ..Default::default()
        },
    ))
    .unwrap();
    let mut ids = Vec::new();
    for i in 0..3u8 {
        let id = block_on(bs.create_blob(BlobOptions {
            num_clusters: 1,
            xattrs: vec![("n".into(), vec![i])],
            ..Default::default()
        }))
        .unwrap();
        let b = block_on(bs.open_blob(id)).unwrap();
        let buf = DmaBuf::from_slice(&vec![i + 1; 64 << 10]).unwrap();
        block_on(b.write(0, buf)).unwrap();
        block_on(b.close()).unwrap();
        ids.push(id);
    }
    block_on(bs.unload()).unwrap();
    (mem.snapshot(), ids)
}

fn device(image: &[u8]) -> (MemDevice, Arc<dyn BlockDevice>) {
    let mem = MemDevice::from_image(image, 512).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(mem.clone());
    (mem, dev)
}

fn load(dev: &Arc<dyn BlockDevice>) -> blobstore::Result<Blobstore> {
    block_on(Blobstore::load(dev.clone(), LoadOptions::default()))
}

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen()).collect()
}

/// The store on `dev` loads, is consistent and every blob holds its data;
/// returns what the load reported.
fn intact(dev: &Arc<dyn BlockDevice>, ids: &[BlobId]) -> LoadReport {
    let bs = load(dev).unwrap();
    let report = bs.load_report();
    assert_eq!(bs.blob_ids(), ids);
    let rep = block_on(bs.check()).unwrap();
    assert!(rep.is_consistent(), "{:?}", rep.problems);
    assert!(rep.leaked_clusters.is_empty() && rep.leaked_md_pages.is_empty());
    for (i, &id) in ids.iter().enumerate() {
        let b = block_on(bs.open_blob(id)).unwrap();
        assert_eq!(b.get_xattr("n"), Some(vec![i as u8]));
        let got = block_on(b.read(0, DmaBuf::new(64 << 10).unwrap())).unwrap();
        assert!(got.iter().all(|&x| x == i as u8 + 1), "blob {id}");
    }
    block_on(bs.unload()).unwrap();
    report
}

#[test]
fn an_unreadable_primary_super_block_loads_from_the_backup() {
    let (img, ids) = image();
    let damages: Vec<(&str, Vec<u8>)> = vec![
        ("random", noise(1, PAGE)),
        ("zeroes", vec![0; PAGE]),
        // A torn write: the first half new garbage, the rest as it was.
        ("torn", {
            let mut p = img[..PAGE].to_vec();
            p[..PAGE / 2].copy_from_slice(&noise(2, PAGE / 2));
            p[..8].copy_from_slice(b"RBLOBSTR");
            p
        }),
    ];
    for (what, bytes) in damages {
        let (mem, dev) = device(&img);
        mem.store_bytes(0, &bytes);
        let report = intact(&dev, &ids);
        assert!(report.super_from_backup.is_some(), "{what}: {report:?}");
        // The load rewrote the primary: the next load needs no backup.
        assert_eq!(intact(&dev, &ids), LoadReport::default(), "{what}");
        let mut sb = vec![0u8; SUPER_BLOCK_LEN];
        mem.load_bytes(0, &mut sb);
        assert!(SuperBlock::decode(&sb).unwrap().clean, "{what}");
    }
}

#[test]
fn a_damaged_backup_is_rewritten() {
    let (img, ids) = image();
    let (mem, dev) = device(&img);
    mem.store_bytes(PAGE, &noise(3, PAGE));
    let report = intact(&dev, &ids);
    assert!(report.backup_rewritten.is_some(), "{report:?}");
    assert_eq!(intact(&dev, &ids), LoadReport::default());
    // Both copies gone: the primary's error.
    mem.store_bytes(0, &noise(4, PAGE));
    mem.store_bytes(PAGE, &noise(5, PAGE));
    assert!(load(&dev).is_err());
    // Zeroes in both: not a blobstore at all.
    mem.store_bytes(0, &[0; PAGE]);
    mem.store_bytes(PAGE, &[0; PAGE]);
    assert!(matches!(
        load(&dev),
        Err(blobstore::Error::NotABlobstore(_))
    ));
}

/// A version-1 store (no backup: made here from a version-2 image written
/// by the format-2 build, whose layout is the same but for page 1) loads,
/// says it has no backup, and stays version 1: nothing is written to page 1.
#[test]
fn a_version_1_store_loads_without_a_backup() {
    // What `image()` made with the format-2 build.
    let img = common::fixture("format2-blobstore.bsimage");
    let ids = {
        let (_, dev) = device(&img);
        load(&dev).unwrap().blob_ids()
    };
    assert_eq!(ids.len(), 3);
    let (mem, dev) = device(&img);
    let mut sb = SuperBlock::decode(&img[..SUPER_BLOCK_LEN]).unwrap();
    sb.version = 1;
    mem.store_bytes(0, &sb.encode());
    mem.store_bytes(PAGE, &[0; PAGE]);
    let report = intact(&dev, &ids);
    assert!(report.no_backup, "{report:?}");
    let mut page1 = vec![1u8; PAGE];
    mem.load_bytes(PAGE, &mut page1);
    assert!(
        page1.iter().all(|&b| b == 0),
        "a version-1 store got a backup"
    );
    let mut sb = vec![0u8; SUPER_BLOCK_LEN];
    mem.load_bytes(0, &mut sb);
    assert_eq!(SuperBlock::decode(&sb).unwrap().version, 1);
    // Without a backup, a damaged primary is still the end.
    mem.store_bytes(0, &noise(6, PAGE));
    assert!(load(&dev).is_err());
}

/// Random bytes over each bitmap of a clean store: the load rebuilds every
/// bitmap from the blobs' metadata instead of refusing the store.
#[test]
fn a_damaged_bitmap_is_rebuilt_at_load() {
    let (img, ids) = image();
    let sb = SuperBlock::decode(&img[..SUPER_BLOCK_LEN]).unwrap();
    let first = sb.mask_start;
    let regions = [
        ("pages", first),
        ("clusters", first + sb.page_mask_len),
        ("blob ids", first + sb.page_mask_len + sb.cluster_mask_len),
    ];
    for (what, page) in regions {
        for seed in 0..3 {
            let (mem, dev) = device(&img);
            mem.store_bytes(page as usize * PAGE, &noise(seed, PAGE));
            let report = intact(&dev, &ids);
            assert!(report.bitmap_damaged, "{what} seed {seed}: {report:?}");
            assert!(report.bitmaps_rebuilt.is_some());
            // The unload wrote good bitmaps back.
            assert_eq!(intact(&dev, &ids), LoadReport::default(), "{what}");
        }
    }
}
