//! Format versions and what a blob costs in metadata pages:
//! - an image the format-2 build wrote loads, keeps format 2 (its blobs and
//!   new ones keep their maps in extent pages, so that build still reads
//!   it) and stays consistent;
//! - in format 3 a blob whose record fits one page (a cluster map inline,
//!   BlobFS's xattrs) takes exactly that page, and its map moves to extent
//!   pages when it outgrows the page and back when it fits again, with
//!   every byte intact across clean and dirty loads;
//! - an inline map in a format-2 store is corruption;
//! - a clean load reads the metadata region in large reads, and opening a
//!   blob it read costs no read.

mod common;

use std::sync::Arc;

use blobstore::fuzzing::{SuperBlock, SUPER_BLOCK_LEN};
use blobstore::{
    block_on, device_metrics, BlobId, BlobOptions, Blobstore, BlobstoreOptions, BlockDevice,
    DmaBuf, Error, LoadOptions, MemDevice,
};
use common::pattern;

fn load(dev: &Arc<dyn BlockDevice>) -> blobstore::Result<Blobstore> {
    block_on(Blobstore::load(dev.clone(), LoadOptions::default()))
}

fn version(mem: &MemDevice) -> u32 {
    let mut sb = vec![0u8; SUPER_BLOCK_LEN];
    mem.load_bytes(0, &mut sb);
    SuperBlock::decode(&sb).unwrap().version
}

/// The store is consistent, leaks nothing, and its blobs own `pages`
/// metadata pages in all.
fn consistent(bs: &Blobstore, pages: u64) {
    let rep = block_on(bs.check()).unwrap();
    assert!(rep.is_consistent(), "{:?}", rep.problems);
    assert!(
        rep.leaked_clusters.is_empty() && rep.leaked_md_pages.is_empty(),
        "{rep:?}"
    );
    assert_eq!(rep.md_pages_owned, pages, "{rep:?}");
}

fn read(bs: &Blobstore, id: BlobId, len: usize) -> Vec<u8> {
    let b = block_on(bs.open_blob(id)).unwrap();
    block_on(b.read(0, DmaBuf::new(len).unwrap()))
        .unwrap()
        .to_vec()
}

fn write(bs: &Blobstore, id: BlobId, data: &[u8]) {
    let b = block_on(bs.open_blob(id)).unwrap();
    block_on(b.write(0, DmaBuf::from_slice(data).unwrap())).unwrap();
    block_on(b.close()).unwrap();
}

/// Three blobs of one 64 KiB cluster (xattr "n" = [i], data i + 1) that the
/// format-2 build wrote: they load, new blobs still take an extent page
/// each, and the store stays format 2 through clean and dirty loads.
#[test]
fn a_format_2_store_loads_and_keeps_its_format() {
    let img = common::fixture("format2-blobstore.bsimage");
    let mem = MemDevice::from_image(&img, 512).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(mem.clone());
    assert_eq!(version(&mem), 2);
    let bs = load(&dev).unwrap();
    assert_eq!(bs.load_report(), Default::default());
    let old = bs.blob_ids();
    assert_eq!(old.len(), 3);
    // Each old blob: a first page and an extent page.
    consistent(&bs, 6);
    let free = bs.free_md_pages();
    let new = block_on(bs.create_blob(BlobOptions {
        num_clusters: 1,
        xattrs: vec![("n".into(), vec![9])],
        ..Default::default()
    }))
    .unwrap();
    write(&bs, new, &[10u8; 64 << 10]);
    assert_eq!(bs.free_md_pages(), free - 2, "format 2 keeps extent pages");
    // An old blob's metadata rewritten: still format 2's two pages.
    let b = block_on(bs.open_blob(old[0])).unwrap();
    b.set_xattr("more", b"x").unwrap();
    block_on(b.close()).unwrap();
    consistent(&bs, 8);
    block_on(bs.unload()).unwrap();
    assert_eq!(version(&mem), 2);
    for clean in [true, false] {
        let bs = load(&dev).unwrap();
        consistent(&bs, 8);
        for (i, &id) in old.iter().enumerate() {
            let b = block_on(bs.open_blob(id)).unwrap();
            assert_eq!(b.get_xattr("n"), Some(vec![i as u8]));
            assert!(read(&bs, id, 64 << 10).iter().all(|&x| x == i as u8 + 1));
        }
        assert!(read(&bs, new, 64 << 10).iter().all(|&x| x == 10));
        if clean {
            block_on(bs.unload()).unwrap();
        } else {
            drop(bs);
        }
        assert_eq!(version(&mem), 2);
    }
}

/// A fresh store on a memory device of `size` bytes (4 KiB blocks).
fn new_store(size: u64, opts: BlobstoreOptions) -> (MemDevice, Arc<dyn BlockDevice>, Blobstore) {
    let mem = MemDevice::new(size, 4096).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(mem.clone());
    let bs = block_on(Blobstore::init(dev.clone(), opts)).unwrap();
    (mem, dev, bs)
}

/// Blobs of one cluster with file-system-like xattrs (a name of a few
/// hundred bytes): exactly one metadata page each, through syncs, clean
/// and dirty loads.
#[test]
fn a_one_cluster_blob_takes_one_page() {
    let (mem, dev, bs) = new_store(
        32 << 20,
        BlobstoreOptions {
            cluster_size: 64 << 10,
            ..Default::default()
        },
    );
    assert_eq!(version(&mem), 3);
    let mut ids = Vec::new();
    for i in 0..40u64 {
        let free = bs.free_md_pages();
        let name = format!("{}/{i:06}.sst", "d".repeat(300));
        let id = block_on(bs.create_blob(BlobOptions {
            num_clusters: 1,
            xattrs: vec![
                ("fs.name".into(), name.into_bytes()),
                ("fs.len".into(), 100u64.to_le_bytes().to_vec()),
            ],
            ..Default::default()
        }))
        .unwrap();
        write(&bs, id, &pattern(i, 64 << 10));
        let b = block_on(bs.open_blob(id)).unwrap();
        b.set_xattr("fs.mtime", &i.to_le_bytes()).unwrap();
        block_on(b.close()).unwrap();
        assert_eq!(bs.free_md_pages(), free - 1, "blob {i}");
        ids.push(id);
    }
    consistent(&bs, 40);
    block_on(bs.unload()).unwrap();
    for clean in [true, false] {
        let bs = load(&dev).unwrap();
        consistent(&bs, 40);
        for (i, &id) in ids.iter().enumerate() {
            assert_eq!(read(&bs, id, 64 << 10), pattern(i as u64, 64 << 10));
        }
        if clean {
            block_on(bs.unload()).unwrap();
        } else {
            drop(bs);
        }
    }
}

/// A blob's map moves to extent pages when the record outgrows the first
/// page (a large xattr, many clusters) and back inline when it fits again;
/// each move frees what the old form held, and data and metadata survive
/// clean and dirty loads at every step.
#[test]
fn the_map_moves_to_extent_pages_and_back() {
    let cluster = 16 << 10;
    let (mem, dev, bs) = new_store(
        64 << 20,
        BlobstoreOptions {
            cluster_size: cluster,
            ..Default::default()
        },
    );
    // 200 clusters: 807 bytes of map inline, too many next to a 3,584-byte
    // xattr in one page.
    let id = block_on(bs.create_blob(BlobOptions {
        num_clusters: 200,
        ..Default::default()
    }))
    .unwrap();
    let data = pattern(7, 200 * cluster as usize);
    write(&bs, id, &data);
    let mut bs = Some(bs);
    // (change, metadata pages the blob takes after it, clusters)
    let steps: Vec<(&str, u64, u64)> = vec![
        ("inline", 1, 200),
        ("big xattr", 2, 200),
        ("no big xattr", 1, 200),
        ("grow", 3, 1500),
        ("shrink", 1, 10),
        ("grow a small blob", 1, 12),
    ];
    for (i, &(what, pages, clusters)) in steps.iter().enumerate() {
        let store = bs.take().unwrap();
        let b = block_on(store.open_blob(id)).unwrap();
        match i {
            1 => b.set_xattr("big", &[3u8; 3584]).unwrap(),
            2 => b.remove_xattr("big").unwrap(),
            3..=5 => block_on(b.resize(clusters)).unwrap(),
            _ => {}
        }
        block_on(b.close()).unwrap();
        consistent(&store, pages);
        assert_eq!(
            store.free_md_pages(),
            mem_md_len(&mem) - pages,
            "{what}: free pages"
        );
        // A crash right after the sync, and a clean stop: both load the same.
        drop(store);
        for clean in [false, true] {
            let store = load(&dev).unwrap();
            consistent(&store, pages);
            let b = block_on(store.open_blob(id)).unwrap();
            assert_eq!(b.num_clusters(), clusters, "{what}");
            assert_eq!(b.get_xattr("big").is_some(), i == 1, "{what}");
            let keep = data.len().min(10 * cluster as usize);
            assert_eq!(read(&store, id, keep), data[..keep], "{what}");
            drop(b);
            if clean {
                bs = Some(store);
            } else {
                block_on(store.unload()).unwrap();
            }
        }
    }
}

/// Metadata pages of the store on `mem`.
fn mem_md_len(mem: &MemDevice) -> u64 {
    let mut sb = vec![0u8; SUPER_BLOCK_LEN];
    mem.load_bytes(0, &mut sb);
    SuperBlock::decode(&sb).unwrap().md_len
}

/// A store that says format 2 but holds a blob with an inline map (format
/// 3's): the blob is corrupt, reported at open after a clean load and at
/// load after a dirty one, never misread.
#[test]
fn an_inline_map_in_a_format_2_store_is_corruption() {
    let (mem, dev, bs) = new_store(
        16 << 20,
        BlobstoreOptions {
            cluster_size: 64 << 10,
            ..Default::default()
        },
    );
    let id = block_on(bs.create_blob(BlobOptions {
        num_clusters: 1,
        ..Default::default()
    }))
    .unwrap();
    block_on(bs.unload()).unwrap();
    let mut sb = vec![0u8; SUPER_BLOCK_LEN];
    mem.load_bytes(0, &mut sb);
    let mut sb = SuperBlock::decode(&sb).unwrap();
    sb.version = 2;
    let page = sb.page_size as usize;
    mem.store_bytes(0, &sb.encode());
    mem.store_bytes(page, &sb.encode());
    let image = mem.snapshot();
    let bs = load(&dev).unwrap();
    let e = block_on(bs.open_blob(id)).err().unwrap();
    assert!(
        matches!(&e, Error::Corrupt { what, .. } if what.contains("inline cluster map")),
        "{e}"
    );
    drop(bs); // not clean
    let e = load(&dev).err().unwrap();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    // The clean image again: unchanged by the refusals.
    let again: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_image(&image, 4096).unwrap());
    assert!(load(&again).is_ok());
}

/// A clean load of 3,000 blobs reads the metadata region in a handful of
/// large reads, not one per page, and then opening every blob reads
/// nothing more.
#[test]
fn a_clean_load_reads_the_metadata_region_in_large_reads() {
    let (mem, _dev, bs) = new_store(
        256 << 20,
        BlobstoreOptions {
            cluster_size: 16 << 10,
            md_pages: Some(4096),
            ..Default::default()
        },
    );
    let ids: Vec<BlobId> = (0..3000u32)
        .map(|i| {
            block_on(bs.create_blob(BlobOptions {
                num_clusters: 1,
                xattrs: vec![("n".into(), i.to_le_bytes().to_vec())],
                ..Default::default()
            }))
            .unwrap()
        })
        .collect();
    block_on(bs.unload()).unwrap();
    for clean in [true, false] {
        // A fresh device over the same bytes: its counters start at zero.
        let mem = MemDevice::from_image(&mem.snapshot(), 4096).unwrap();
        let dev: Arc<dyn BlockDevice> = Arc::new(mem.clone());
        if !clean {
            drop(load(&dev).unwrap());
        }
        let before = device_metrics(dev.id()).reads.count;
        let bs = load(&dev).unwrap();
        let reads = device_metrics(dev.id()).reads.count - before;
        // Super block and backup, three bitmaps (clean), a few 4 MiB
        // reads of 3,000 used pages (dirty: of the whole 16 MiB region).
        assert!(reads <= 20, "clean={clean}: {reads} reads");
        for (i, &id) in ids.iter().enumerate() {
            let b = block_on(bs.open_blob(id)).unwrap();
            assert_eq!(b.get_xattr("n"), Some((i as u32).to_le_bytes().to_vec()));
        }
        let reads = device_metrics(dev.id()).reads.count - before;
        assert!(reads <= 20, "clean={clean}: {reads} reads after opening");
        block_on(bs.unload()).unwrap();
    }
}
