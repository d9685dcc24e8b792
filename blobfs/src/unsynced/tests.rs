//! Tests of the unsynced memory: headers and their torn writes, slots
//! freed with and without their headers, orphans, DMA-mapped slots, and a
//! BlobFS on NVMe appending into them.

use super::header::HEADER_LEN;
use super::owner::parse_uuid;
use super::slots::KEEP_FREE;
use super::*;

fn owner(gen: u64) -> Owner {
    Owner {
        boot: [1; 16],
        fs: [2; 16],
        gen,
    }
}

#[test]
fn header_round_trips_and_refuses_damage() {
    let h = Header {
        owner: owner(7),
        blob: 42,
        seq: 9,
        file_off: 4096,
        used: 100,
        file_len: 4196,
    };
    let b = h.encode();
    assert_eq!(Header::decode(&b), Some(h));
    for i in [0, 9, 20, 60, 100, 125] {
        let mut bad = b;
        bad[i] ^= 1;
        assert_eq!(Header::decode(&bad), None, "byte {i} flipped");
    }
    assert_eq!(Header::decode(&[0u8; HEADER_LEN]), None);
}

#[test]
fn a_torn_header_write_leaves_the_previous_one() {
    let u = Arc::new(Unsynced::open(None, None).unwrap());
    u.reset(owner(3)).unwrap();
    let mut buf = u.alloc(8192).unwrap();
    buf[..10].copy_from_slice(b"0123456789");
    u.describe(&buf, 5, 0, 4, 4);
    u.describe(&buf, 5, 0, 10, 10);
    let recs = u.records().unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!((recs[0].header.used, recs[0].header.file_len), (10, 10));
    // A kill in the middle of the next header write: that copy is torn.
    let slot = recs[0].slot;
    let copy = (u.next_seq[slot as usize].load(Ordering::Relaxed) & 1) as usize;
    // SAFETY: the test owns the slot's buffer; a byte of the header
    // copy the next write would go to.
    unsafe { *u.slot_ptr(slot).add(copy * HEADER_LEN + 70) ^= 0xff };
    let recs = u.records().unwrap();
    assert_eq!(recs[0].header.used, 10, "the intact copy is still found");
    let mut data = [0u8; 10];
    u.read_data(&recs[0], &mut data).unwrap();
    assert_eq!(&data, b"0123456789");
    u.retire(&buf);
    assert!(u.records().unwrap().is_empty());
}

#[test]
fn freed_buffers_clear_their_headers_unless_kept() {
    let u = Arc::new(Unsynced::open(None, None).unwrap());
    u.reset(owner(1)).unwrap();
    let a = u.alloc(4096).unwrap();
    let b = u.alloc(4096).unwrap();
    u.describe(&a, 1, 0, 1, 1);
    u.describe(&b, 2, 0, 1, 1);
    drop(a);
    assert_eq!(u.records().unwrap().len(), 1);
    u.keep_on_free();
    drop(b);
    let recs = u.records().unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].header.blob, 2);
}

#[test]
fn orphans_with_nothing_to_write_back_are_collected() {
    let dir = tempfile::tempdir().unwrap();
    let path = |n: &str| dir.path().join(format!("blobstack-{n}.unsynced"));
    // Left by a process that exited with every file synced.
    drop(Unsynced::open(Some(&path("empty")), None).unwrap());
    std::fs::write(path("empty"), b"").unwrap();
    // Left by a process that died with unsynced data.
    let kept = Arc::new(Unsynced::open(Some(&path("data")), None).unwrap());
    kept.reset(owner(1)).unwrap();
    let buf = kept.alloc(4096).unwrap();
    kept.describe(&buf, 7, 0, 10, 10);
    kept.keep_on_free();
    drop(buf);
    drop(kept);
    // Held by a live owner, with nothing in it.
    let live = Unsynced::open(Some(&path("live")), None).unwrap();
    // Not ours at all.
    std::fs::write(dir.path().join("other.txt"), b"x").unwrap();
    let me = Unsynced::open(Some(&path("me")), None).unwrap();
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "blobstack-data.unsynced",
            "blobstack-live.unsynced",
            "blobstack-me.unsynced",
            "other.txt"
        ]
    );
    drop((live, me));
}

/// A device on the NVMe driver's software controller, which reaches
/// memory only through the IOVAs its pool mapped.
fn soft_nvme(
    bytes: usize,
) -> (
    Arc<blobstore::NvmeController>,
    Arc<dyn blobstore::BlockDevice>,
) {
    let (_model, ctrl) =
        blobstore::device::nvme::soft::SoftController::attach_with(5, 0, &[(4096, bytes)]).unwrap();
    let dev = blobstore::NvmeDevice::from_controller(ctrl.clone(), 1).unwrap();
    (ctrl, Arc::new(dev))
}

#[test]
fn slots_are_dma_mapped_for_the_device_and_unmapped_before_they_go() {
    let (ctrl, dev) = soft_nvme(16 << 20);
    let u = Arc::new(Unsynced::open(None, Some(dev.clone())).unwrap());
    u.reset(owner(1)).unwrap();
    let mut buf = u.alloc(8192).unwrap();
    let iova = buf.iova().expect("a slot mapped for the device");
    assert_eq!(
        ctrl.pool().translate(iova.0, SLOT_DATA),
        Some(buf.as_ptr().cast_mut()),
        "the device sees the slot's own bytes"
    );
    for (i, b) in buf.iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    let want = buf.to_vec();
    // The driver sends the slot itself (its IOVA); the software
    // controller would panic on memory the pool did not map.
    let ch = blobstore::device::channel(&dev).unwrap();
    let buf = blobstore::block_on(ch.write(blobstore::Lba(8), buf)).unwrap();
    let back =
        blobstore::block_on(ch.read(blobstore::Lba(8), dev.alloc_buf(8192).unwrap())).unwrap();
    assert_eq!(&back[..], &want[..]);
    drop(buf);
    // Slots beyond those kept populated give their memory back, and
    // the device loses them first.
    let bufs: Vec<DmaBuf> = (0..KEEP_FREE + 2).map(|_| u.alloc(4096).unwrap()).collect();
    let iovas: Vec<_> = bufs.iter().map(|b| b.iova().unwrap()).collect();
    drop(bufs);
    let mapped = iovas
        .iter()
        .filter(|i| ctrl.pool().translate(i.0, 4096).is_some())
        .count();
    assert_eq!(mapped, KEEP_FREE, "mapped slots after the frees");
    drop(u);
    assert!(
        iovas
            .iter()
            .all(|i| ctrl.pool().translate(i.0, 4096).is_none()),
        "the memory is unmapped when it goes"
    );
}

#[test]
fn a_blobfs_on_nvme_appends_into_mapped_slots_and_reads_back() {
    let (_ctrl, dev) = soft_nvme(64 << 20);
    let fs = crate::BlobFs::mkfs(
        dev.clone(),
        crate::MkfsOptions::default(),
        crate::MountOptions::default(),
    )
    .unwrap();
    let data: Vec<u8> = (0..(9 << 20) + 12_345).map(|i| (i % 241) as u8).collect();
    {
        let f = fs
            .open("wal", crate::OpenOptions::create_truncate())
            .unwrap();
        for piece in data.chunks(100_003) {
            f.append(piece).unwrap();
        }
        f.sync().unwrap();
    }
    fs.unmount().unwrap();
    let fs = crate::BlobFs::mount(dev, crate::MountOptions::default()).unwrap();
    let got = fs
        .open("wal", crate::OpenOptions::read())
        .unwrap()
        .read_all()
        .unwrap();
    assert!(got == data, "file bytes after remount");
}

#[test]
fn boot_ids_parse() {
    assert_eq!(
        parse_uuid("00112233-4455-6677-8899-aabbccddeeff"),
        Some([
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff
        ])
    );
    assert_eq!(parse_uuid("nonsense"), None);
}
