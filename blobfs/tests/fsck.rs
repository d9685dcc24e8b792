//! fsck finds damage: each test builds a clean BlobFS on a memory device,
//! damages it through the blobstore API (or raw device bytes) the way a bug
//! or a bad disk would, and checks what fsck reports.

use std::sync::Arc;

use blobfs::fsck::{fsck, Severity};
use blobfs::{meta, BlobFs, MkfsOptions, MountOptions, OpenOptions};
use blobstore::{block_on, BlobOptions, Blobstore, BlockDevice, DmaBuf, LoadOptions, MemDevice};

fn fresh() -> (Arc<MemDevice>, Arc<dyn BlockDevice>) {
    let mem = Arc::new(MemDevice::new(64 << 20, 4096).unwrap());
    let dev: Arc<dyn BlockDevice> = mem.clone();
    let fs = BlobFs::mkfs(dev.clone(), MkfsOptions::default(), MountOptions::default()).unwrap();
    fs.create_dir("db").unwrap();
    let f = fs.create("db/data").unwrap();
    f.append(&[7u8; 10_000]).unwrap();
    f.close().unwrap();
    fs.unmount().unwrap();
    (mem, dev)
}

fn load(dev: &Arc<dyn BlockDevice>) -> Blobstore {
    block_on(Blobstore::load(
        dev.clone(),
        LoadOptions {
            bstype: meta::BSTYPE.into(),
        },
    ))
    .unwrap()
}

/// Adds a blob carrying BlobFS xattrs as a buggy writer might.
fn add_claim(dev: &Arc<dyn BlockDevice>, name: &str, kind: u8, seq: u64, len: Option<u64>) {
    let bs = load(dev);
    let mut xattrs = vec![
        (meta::NAME.to_string(), name.as_bytes().to_vec()),
        (meta::KIND.to_string(), vec![kind]),
        (meta::SEQ.to_string(), meta::enc_u64(seq).to_vec()),
        (meta::MTIME.to_string(), meta::enc_u64(1).to_vec()),
    ];
    if let Some(len) = len {
        xattrs.push((meta::LEN.to_string(), meta::enc_u64(len).to_vec()));
    }
    block_on(bs.create_blob(BlobOptions {
        xattrs,
        ..Default::default()
    }))
    .unwrap();
    block_on(bs.unload()).unwrap();
}

fn damage_of(dev: &Arc<dyn BlockDevice>) -> Vec<String> {
    let r = fsck(dev.clone()).unwrap();
    r.findings
        .iter()
        .filter(|f| f.severity == Severity::Damage)
        .map(|f| f.to_string())
        .collect()
}

#[test]
fn clean_file_system_passes() {
    let (_, dev) = fresh();
    let r = fsck(dev.clone()).unwrap();
    assert!(r.is_clean(), "{:?}", r.findings);
    assert!(r.findings.is_empty(), "{:?}", r.findings);
    assert_eq!((r.files, r.dirs, r.file_bytes), (1, 1, 10_000));
    // fsck leaves it mountable and unchanged.
    let fs = BlobFs::mount(dev, MountOptions::default()).unwrap();
    assert_eq!(fs.stat("db/data").unwrap().len, 10_000);
    fs.unmount().unwrap();
}

#[test]
fn missing_parent_is_damage() {
    let (_, dev) = fresh();
    add_claim(&dev, "nodir/file", meta::KIND_FILE, 1000, Some(0));
    let d = damage_of(&dev);
    assert!(
        d.iter().any(|m| m.contains("parent directory \"nodir\"")),
        "{d:?}"
    );
}

#[test]
fn parent_that_is_a_file_is_damage() {
    let (_, dev) = fresh();
    add_claim(&dev, "db/data/inner", meta::KIND_FILE, 1000, Some(0));
    let d = damage_of(&dev);
    assert!(d.iter().any(|m| m.contains("is a file")), "{d:?}");
}

#[test]
fn duplicate_names_warn_or_damage_by_seq() {
    // A higher seq: an interrupted rename, resolved at mount.
    let (_, dev) = fresh();
    add_claim(&dev, "db/data", meta::KIND_FILE, 1000, Some(0));
    let r = fsck(dev.clone()).unwrap();
    assert!(r.is_clean(), "{:?}", r.findings);
    assert!(r
        .findings
        .iter()
        .any(|f| f.severity == Severity::Warning && f.what.contains("interrupted rename")));

    // The same seq twice: no crash can do that.
    let (_, dev) = fresh();
    add_claim(&dev, "x", meta::KIND_FILE, 1000, Some(0));
    add_claim(&dev, "x", meta::KIND_FILE, 1000, Some(0));
    let d = damage_of(&dev);
    assert!(d.iter().any(|m| m.contains("same fs.seq")), "{d:?}");
}

#[test]
fn bad_xattrs_are_damage() {
    let (_, dev) = fresh();
    let bs = load(&dev);
    // No name at all.
    block_on(bs.create_blob(BlobOptions::default())).unwrap();
    // A bad kind.
    block_on(bs.create_blob(BlobOptions {
        xattrs: vec![
            (meta::NAME.into(), b"k".to_vec()),
            (meta::KIND.into(), vec![9]),
        ],
        ..Default::default()
    }))
    .unwrap();
    // A name that is not normalized.
    block_on(bs.create_blob(BlobOptions {
        xattrs: vec![(meta::NAME.into(), b"a//b".to_vec())],
        ..Default::default()
    }))
    .unwrap();
    block_on(bs.unload()).unwrap();
    add_claim(&dev, "nolen", meta::KIND_FILE, 1000, None);
    let d = damage_of(&dev);
    assert!(d.iter().any(|m| m.contains("no fs.name")), "{d:?}");
    assert!(d.iter().any(|m| m.contains("fs.kind")), "{d:?}");
    assert!(d.iter().any(|m| m.contains("invalid name")), "{d:?}");
    assert!(d.iter().any(|m| m.contains("fs.len missing")), "{d:?}");
}

#[test]
fn length_past_blob_is_damage() {
    let (_, dev) = fresh();
    add_claim(&dev, "big", meta::KIND_FILE, 1000, Some(5 << 20));
    let d = damage_of(&dev);
    assert!(
        d.iter().any(|m| m.contains("past the end of its blob")),
        "{d:?}"
    );
}

#[test]
fn nonzero_tail_is_damage() {
    let (_, dev) = fresh();
    let fs = BlobFs::mount(dev.clone(), MountOptions::default()).unwrap();
    let id = fs.stat("db/data").unwrap().blob_id;
    fs.unmount().unwrap();
    let bs = load(&dev);
    let blob = block_on(bs.open_blob(id)).unwrap();
    // 10_000 bytes: block 2 holds bytes 8192..12288; dirty its tail.
    let mut buf = DmaBuf::new(4096).unwrap();
    buf = block_on(blob.read(2, buf)).unwrap();
    buf[4000] = 0xAB;
    block_on(blob.write(2, buf)).unwrap();
    drop(blob);
    block_on(bs.unload()).unwrap();
    let d = damage_of(&dev);
    assert!(
        d.iter()
            .any(|m| m.contains("byte 12192 past the length 10000")),
        "{d:?}"
    );
}

#[test]
fn broken_super_block_falls_back_to_the_backup() {
    let (mem, dev) = fresh();
    mem.store_bytes(0, &[0xFF; 64]);
    let r = fsck(dev.clone()).unwrap();
    assert!(r.is_clean(), "{:?}", r.findings);
    assert!(
        r.findings
            .iter()
            .any(|f| f.what.contains("loaded from the backup super block")),
        "{:?}",
        r.findings
    );
    // The primary was rewritten: a second check finds nothing.
    assert!(fsck(dev.clone()).unwrap().findings.is_empty());
    // Both copies broken: the check cannot run.
    mem.store_bytes(0, &[0xFF; 64]);
    mem.store_bytes(4096, &[0xFF; 64]);
    assert!(fsck(dev).is_err());
}

#[test]
fn refuses_a_mounted_device() {
    let (_, dev) = fresh();
    let fs = BlobFs::mount(dev.clone(), MountOptions::default()).unwrap();
    assert!(fsck(dev).is_err());
    fs.unmount().unwrap();
}

/// Mounts the BlobFS on `dev`, reads file `name` whole, unmounts.
fn mount_and_read(dev: &Arc<dyn BlockDevice>, name: &str) -> Vec<u8> {
    let fs = BlobFs::mount(dev.clone(), MountOptions::default()).unwrap();
    let got = fs
        .open(name, OpenOptions::read())
        .unwrap()
        .read_all()
        .unwrap();
    fs.unmount().unwrap();
    got
}

/// Returns the blob of BlobFS file `name` in a loaded store.
fn blob_of(bs: &Blobstore, name: &str) -> blobstore::Blob {
    for id in bs.blob_ids() {
        let b = block_on(bs.open_blob(id)).unwrap();
        if b.get_xattr(meta::NAME).as_deref() == Some(name.as_bytes()) {
            return b;
        }
    }
    panic!("no blob named {name}");
}

/// A small sync commits data and length with one flush and records a
/// checksum of the new bytes: when a power cut keeps the length but not
/// the data (played here by overwriting those bytes on the device after
/// the cut), mount rolls the length back to the sync before, and makes
/// that durable; when the data did land, the length stands. (A clean
/// unmount flushes every file's bytes, so only a stop that was not clean
/// leaves the check to do: the cut is a drop without unmount.)
#[test]
fn one_flush_sync_whose_data_did_not_land_rolls_back_at_mount() {
    let mem = MemDevice::new(64 << 20, 4096).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(mem.clone());
    let fs = BlobFs::mkfs(dev.clone(), MkfsOptions::default(), MountOptions::default()).unwrap();
    let f = fs.create("wal").unwrap();
    let first = vec![1u8; 100_000];
    f.append(&first).unwrap();
    f.sync().unwrap(); // 100,000 bytes: more than a one-flush sync takes
    f.append(&[2u8; 3_000]).unwrap();
    f.sync().unwrap(); // 3,000 bytes: one flush, checked at mount
    drop(f);
    drop(fs); // the power cut
    let cut = mem.snapshot();
    {
        let bs = load(&dev);
        let b = blob_of(&bs, "wal");
        let (prev, _) = meta::dec_tail(&b.get_xattr(meta::TAIL).unwrap(), "wal").unwrap();
        assert_eq!(prev, 100_000);
    }
    // The data landed: the length stands.
    let got = mount_and_read(&dev, "wal");
    assert_eq!(got.len(), 103_000);
    assert!(got[100_000..].iter().all(|&b| b == 2));
    // The same cut, but the block holding bytes 98,304..103,000 reads as
    // it did before the sync's data write (zeroes past 100,000).
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_image(&cut, 4096).unwrap());
    {
        let bs = load(&dev);
        let b = blob_of(&bs, "wal");
        let mut blk = DmaBuf::new(4096).unwrap();
        blk = block_on(b.read(24, blk)).unwrap();
        blk[100_000 - 98_304..].fill(0);
        block_on(b.write(24, blk)).unwrap();
    }
    let got = mount_and_read(&dev, "wal");
    assert_eq!(got, first, "rolled back to the previous sync's length");
    // The rollback is durable and the check is gone.
    let bs = load(&dev);
    let b = blob_of(&bs, "wal");
    assert!(b.get_xattr(meta::TAIL).is_none());
    assert_eq!(
        meta::dec_u64(b.get_xattr(meta::LEN), meta::LEN, "wal").unwrap(),
        100_000
    );
}
