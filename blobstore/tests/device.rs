//! Device-layer tests: every body runs on `MemDevice` (on the heap and in a
//! shared file mapping), `FileDevice` and a preallocated `FileDevice`, each
//! with 512- and 4096-byte blocks.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use blobstore::device::ShmOptions;
use blobstore::{
    block_on, channel, open_device, BlockDevice, DeviceSpec, DmaBuf, Error, FileDevice,
    FileOptions, Lba, MemDevice,
};
use futures::future::join_all;

const DEV_BYTES: u64 = 16 << 20;

/// A path in the temp dir, removed on drop.
struct TempPath(PathBuf);

impl TempPath {
    fn new(what: &str) -> TempPath {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        TempPath(std::env::temp_dir().join(format!(
            "blobstore-device-test-{}-{what}-{n}.img",
            std::process::id()
        )))
    }
    /// A path for a shared memory device: in /dev/shm where there is one
    /// (tmpfs, what `shm:` is for), else in the temp dir.
    fn shm(what: &str) -> TempPath {
        let mut t = TempPath::new(what);
        let shm = Path::new("/dev/shm");
        if shm.is_dir() {
            if let Some(name) = t.0.file_name() {
                t.0 = shm.join(name);
            }
        }
        t
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

fn shm_opts(size: u64, bs: u32) -> ShmOptions {
    ShmOptions {
        size_bytes: Some(size),
        block_size: Some(bs),
        create: None,
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn file_opts(size: u64, bs: u32) -> FileOptions {
    FileOptions {
        size_bytes: Some(size),
        block_size: Some(bs),
        ..FileOptions::default()
    }
}

/// Runs `body` on a memory and a file device, with both block sizes.
fn on_every_device(what: &str, body: impl Fn(&Arc<dyn BlockDevice>)) {
    for bs in [512u32, 4096] {
        let mem: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(DEV_BYTES, bs).unwrap());
        body(&mem);
        let tmp = TempPath::shm(what);
        let shm: Arc<dyn BlockDevice> =
            Arc::new(MemDevice::open_shared(tmp.path(), shm_opts(DEV_BYTES, bs)).unwrap());
        assert_eq!(shm.geometry().block_size, bs);
        assert_eq!(shm.geometry().size_bytes(), DEV_BYTES);
        assert!(shm.name().starts_with("shm:/"), "{}", shm.name());
        body(&shm);
        drop(shm);
        let tmp = TempPath::new(what);
        let file: Arc<dyn BlockDevice> =
            Arc::new(FileDevice::open(tmp.path(), file_opts(DEV_BYTES, bs)).unwrap());
        assert_eq!(file.geometry().block_size, bs);
        assert_eq!(file.geometry().size_bytes(), DEV_BYTES);
        body(&file);
        drop(file);
        let tmp = TempPath::new(what);
        let opts = FileOptions {
            preallocate: Some(true),
            ..file_opts(DEV_BYTES, bs)
        };
        let file: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(tmp.path(), opts).unwrap());
        body(&file);
        drop(file);
        assert_eq!(
            first_hole(tmp.path()),
            DEV_BYTES,
            "a preallocated image must stay fully written ({what}, bs {bs})"
        );
    }
}

/// The offset of the first hole of `path` (its size if it has none). ext4
/// reports unwritten extents (what `fallocate(ZERO_RANGE)` leaves) as holes
/// too, so this catches both punching and zero-ranging.
fn first_hole(path: &Path) -> u64 {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: lseek on a file descriptor we own; no memory is passed.
    let off = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_HOLE) };
    assert!(
        off >= 0,
        "lseek(SEEK_HOLE): {}",
        std::io::Error::last_os_error()
    );
    off as u64
}

/// A buffer whose bytes depend on `seed` and position.
fn pattern(len: usize, seed: u64) -> DmaBuf {
    let data: Vec<u8> = (0..len)
        .map(|i| ((i as u64).wrapping_mul(31) ^ seed.wrapping_mul(0x9e37_79b9)) as u8 | 1)
        .collect();
    DmaBuf::from_slice(&data).unwrap()
}

fn read_back(dev: &Arc<dyn BlockDevice>, lba: u64, bytes: usize) -> DmaBuf {
    let ch = channel(dev).unwrap();
    block_on(ch.read(Lba(lba), DmaBuf::new(bytes).unwrap())).unwrap()
}

#[test]
fn write_read_round_trip() {
    on_every_device("round-trip", |dev| {
        let bs = dev.geometry().block_size as usize;
        let ch = channel(dev).unwrap();
        let data = pattern(2 * bs, 7);
        block_on(ch.write(Lba(3), DmaBuf::from_slice(&data).unwrap())).unwrap();
        assert_eq!(&read_back(dev, 3, 2 * bs)[..], &data[..], "{}", dev.name());
        // Untouched blocks read as zeroes.
        assert!(read_back(dev, 5, bs).iter().all(|&b| b == 0));
        // A large single buffer, several times the max transfer size.
        let big = pattern(3 << 20, 8);
        let lba = (4 << 20) / bs as u64;
        block_on(ch.write(Lba(lba), DmaBuf::from_slice(&big).unwrap())).unwrap();
        assert_eq!(&read_back(dev, lba, 3 << 20)[..], &big[..]);
    });
}

#[test]
fn vectored_read_write() {
    on_every_device("vectored", |dev| {
        let bs = dev.geometry().block_size as usize;
        let ch = channel(dev).unwrap();
        let parts = vec![pattern(bs, 1), pattern(2 * bs, 2), pattern(bs, 3)];
        let expected: Vec<u8> = parts.iter().flat_map(|b| b.to_vec()).collect();
        block_on(ch.writev(Lba(10), parts)).unwrap();
        let got = block_on(ch.readv(
            Lba(10),
            vec![DmaBuf::new(2 * bs).unwrap(), DmaBuf::new(2 * bs).unwrap()],
        ))
        .unwrap();
        let got: Vec<u8> = got.iter().flat_map(|b| b.to_vec()).collect();
        assert_eq!(got, expected, "{}", dev.name());

        // More segments than one io_uring SQE takes (IOV_MAX = 1024).
        let many: Vec<DmaBuf> = (0..1100).map(|i| pattern(bs, 100 + i)).collect();
        let expected: Vec<u8> = many.iter().flat_map(|b| b.to_vec()).collect();
        block_on(ch.writev(Lba(20), many)).unwrap();
        let got = block_on(ch.readv(
            Lba(20),
            (0..1100).map(|_| DmaBuf::new(bs).unwrap()).collect(),
        ))
        .unwrap();
        let got: Vec<u8> = got.iter().flat_map(|b| b.to_vec()).collect();
        assert!(
            got == expected,
            "{}: 1100-segment round trip differs",
            dev.name()
        );
    });
}

#[test]
fn flush() {
    on_every_device("flush", |dev| {
        let bs = dev.geometry().block_size as usize;
        let ch = channel(dev).unwrap();
        block_on(ch.write(Lba(0), pattern(bs, 4))).unwrap();
        block_on(ch.flush()).unwrap();
        assert_eq!(&read_back(dev, 0, bs)[..], &pattern(bs, 4)[..]);
    });
}

#[test]
fn unmap_reads_zeroes() {
    on_every_device("unmap", |dev| {
        let bs = dev.geometry().block_size as usize;
        assert!(dev.geometry().unmap_reads_zeroes);
        let ch = channel(dev).unwrap();
        // Cover whole 4 KiB file-system blocks and partial ones.
        block_on(ch.write(Lba(8), pattern(16 * bs, 5))).unwrap();
        block_on(ch.unmap(Lba(9), 13)).unwrap();
        let got = read_back(dev, 8, 16 * bs);
        let want = pattern(16 * bs, 5);
        assert_eq!(&got[..bs], &want[..bs]);
        assert!(got[bs..14 * bs].iter().all(|&b| b == 0), "{}", dev.name());
        assert_eq!(&got[14 * bs..], &want[14 * bs..]);
    });
}

#[test]
fn write_zeroes() {
    on_every_device("zeroes", |dev| {
        let bs = dev.geometry().block_size as usize;
        let ch = channel(dev).unwrap();
        block_on(ch.write(Lba(40), pattern(4 * bs, 6))).unwrap();
        block_on(ch.write_zeroes(Lba(41), 2)).unwrap();
        let got = read_back(dev, 40, 4 * bs);
        let want = pattern(4 * bs, 6);
        assert_eq!(&got[..bs], &want[..bs]);
        assert!(got[bs..3 * bs].iter().all(|&b| b == 0), "{}", dev.name());
        assert_eq!(&got[3 * bs..], &want[3 * bs..]);
        // A large range.
        let blocks = (4 << 20) / bs as u64;
        block_on(ch.write(Lba(blocks), pattern(4 << 20, 9))).unwrap();
        block_on(ch.write_zeroes(Lba(blocks), blocks)).unwrap();
        assert!(read_back(dev, blocks, 4 << 20).iter().all(|&b| b == 0));
    });
}

#[test]
fn past_the_end_is_out_of_range() {
    on_every_device("range", |dev| {
        let g = dev.geometry();
        let bs = g.block_size as usize;
        let ch = channel(dev).unwrap();
        let last = g.block_count - 1;
        block_on(ch.write(Lba(last), pattern(bs, 1))).unwrap();
        let r = block_on(ch.read(Lba(last), DmaBuf::new(2 * bs).unwrap()));
        assert!(matches!(r, Err(Error::OutOfRange { .. })), "{r:?}");
        let r = block_on(ch.write(Lba(g.block_count), pattern(bs, 1)));
        assert!(matches!(r, Err(Error::OutOfRange { .. })), "{r:?}");
        let r = block_on(ch.unmap(Lba(last), 2));
        assert!(matches!(r, Err(Error::OutOfRange { .. })), "{r:?}");
        let r = block_on(ch.write_zeroes(Lba(u64::MAX), 2));
        assert!(matches!(r, Err(Error::OutOfRange { .. })), "{r:?}");
    });
}

#[test]
fn partial_block_is_an_error() {
    on_every_device("partial", |dev| {
        let bs = dev.geometry().block_size as usize;
        let ch = channel(dev).unwrap();
        let r = block_on(ch.write(Lba(0), pattern(bs + 1, 1)));
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        let r = block_on(ch.read(Lba(0), DmaBuf::new(bs - 1).unwrap()));
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        let r = block_on(ch.read(Lba(0), DmaBuf::new(0).unwrap()));
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
        let r = block_on(ch.unmap(Lba(0), 0));
        assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    });
}

/// 32 writes, then 32 reads, all in flight at once from one thread.
fn many_in_flight(dev: &Arc<dyn BlockDevice>) {
    let bs = dev.geometry().block_size as usize;
    let ch = channel(dev).unwrap();
    let writes: Vec<_> = (0..32u64)
        .map(|i| ch.write(Lba(100 + 3 * i), pattern(2 * bs, 1000 + i)))
        .collect();
    for r in block_on(join_all(writes)) {
        r.unwrap();
    }
    let reads: Vec<_> = (0..32u64)
        .map(|i| ch.read(Lba(100 + 3 * i), DmaBuf::new(2 * bs).unwrap()))
        .collect();
    for (i, r) in block_on(join_all(reads)).into_iter().enumerate() {
        assert_eq!(
            &r.unwrap()[..],
            &pattern(2 * bs, 1000 + i as u64)[..],
            "op {i}"
        );
    }
    assert_eq!(ch.in_flight(), 0);
}

#[test]
fn thirty_two_in_flight() {
    on_every_device("inflight", many_in_flight);
}

#[test]
fn queue_smaller_than_the_load() {
    // A 4-entry ring (8 CQEs) with 32 ops queued: the SQ fills, and the
    // backend must submit and reap internally to make room.
    for bs in [512, 4096] {
        let tmp = TempPath::new("smallq");
        let opts = FileOptions {
            queue_depth: Some(4),
            ..file_opts(DEV_BYTES, bs)
        };
        let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(tmp.path(), opts).unwrap());
        assert!(dev.name().contains("qd=4"), "{}", dev.name());
        many_in_flight(&dev);
    }
}

#[test]
fn four_threads_one_device() {
    on_every_device("threads", |dev| {
        let bs = dev.geometry().block_size as usize;
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let dev = dev.clone();
                s.spawn(move || {
                    let ch = channel(&dev).unwrap();
                    let base = 1000 + t * 200;
                    for round in 0..10u64 {
                        let writes: Vec<_> = (0..8u64)
                            .map(|i| {
                                ch.write(
                                    Lba(base + i * 4),
                                    pattern(4 * bs, t * 1000 + round * 10 + i),
                                )
                            })
                            .collect();
                        for r in block_on(join_all(writes)) {
                            r.unwrap();
                        }
                        let reads: Vec<_> = (0..8u64)
                            .map(|i| ch.read(Lba(base + i * 4), DmaBuf::new(4 * bs).unwrap()))
                            .collect();
                        for (i, r) in block_on(join_all(reads)).into_iter().enumerate() {
                            let want = pattern(4 * bs, t * 1000 + round * 10 + i as u64);
                            assert_eq!(&r.unwrap()[..], &want[..], "thread {t} round {round}");
                        }
                    }
                    block_on(ch.flush()).unwrap();
                });
            }
        });
    });
}

#[test]
fn second_open_is_busy() {
    let tmp = TempPath::new("busy");
    let first = FileDevice::open(tmp.path(), file_opts(1 << 20, 4096)).unwrap();
    match FileDevice::open(tmp.path(), FileOptions::default()) {
        Err(Error::Busy(m)) => assert!(m.contains("in use by another process/blobstore"), "{m}"),
        other => panic!("expected Busy, got {:?}", other.map(|d| d.name())),
    }
    // Through a spec too.
    let spec = format!("file:{}", tmp.path().display());
    assert!(matches!(open_device(&spec), Err(Error::Busy(_))));
    drop(first);
    FileDevice::open(tmp.path(), FileOptions::default()).unwrap();
}

#[test]
fn shm_second_open_is_busy() {
    let tmp = TempPath::shm("shm-busy");
    let first = MemDevice::open_shared(tmp.path(), shm_opts(1 << 20, 4096)).unwrap();
    match MemDevice::open_shared(tmp.path(), ShmOptions::default()) {
        Err(Error::Busy(m)) => assert!(m.contains("in use by another process/blobstore"), "{m}"),
        other => panic!("expected Busy, got {:?}", other.map(|d| d.name())),
    }
    // Through a spec too, and against a file device on the same file.
    let spec = format!("shm:{}", tmp.path().display());
    assert!(matches!(open_device(&spec), Err(Error::Busy(_))));
    let file = format!("file:{}", tmp.path().display());
    assert!(matches!(open_device(&file), Err(Error::Busy(_))));
    // A clone keeps the lock; the last one dropped releases it.
    let clone = first.clone();
    drop(first);
    assert!(matches!(open_device(&spec), Err(Error::Busy(_))));
    drop(clone);
    MemDevice::open_shared(tmp.path(), ShmOptions::default()).unwrap();
}

#[test]
fn shm_reopen_after_drop_sees_the_data() {
    for bs in [512u32, 4096] {
        let tmp = TempPath::shm("shm-reopen");
        let data = pattern(8 * bs as usize, 43);
        let last_lba = DEV_BYTES / bs as u64 - 2;
        {
            let dev: Arc<dyn BlockDevice> =
                Arc::new(MemDevice::open_shared(tmp.path(), shm_opts(DEV_BYTES, bs)).unwrap());
            let ch = channel(&dev).unwrap();
            block_on(ch.write(Lba(77), DmaBuf::from_slice(&data).unwrap())).unwrap();
            // Across a chunk boundary and at the very end.
            block_on(ch.write(Lba(last_lba), pattern(2 * bs as usize, 44))).unwrap();
            block_on(ch.write_zeroes(Lba(78), 2)).unwrap();
            block_on(ch.flush()).unwrap();
            // The channel stays in this thread's cache; dropping the device
            // must still release the file.
        }
        // No size: the existing file's size is used.
        let opts = ShmOptions {
            block_size: Some(bs),
            ..ShmOptions::default()
        };
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::open_shared(tmp.path(), opts).unwrap());
        assert_eq!(dev.geometry().size_bytes(), DEV_BYTES);
        let got = read_back(&dev, 77, data.len());
        let b = bs as usize;
        assert_eq!(&got[..b], &data[..b]);
        assert!(got[b..3 * b].iter().all(|&x| x == 0));
        assert_eq!(&got[3 * b..], &data[3 * b..]);
        assert_eq!(
            &read_back(&dev, last_lba, 2 * b)[..],
            &pattern(2 * b, 44)[..]
        );
        // The bytes are the file's: a plain read of the file sees them.
        drop(dev);
        let file = std::fs::read(tmp.path()).unwrap();
        assert_eq!(file.len() as u64, DEV_BYTES);
        assert_eq!(&file[77 * b..78 * b], &data[..b]);
    }
}

#[test]
fn shm_open_options_and_errors() {
    let tmp = TempPath::shm("shm-opts");
    // Missing file without a size: not created.
    match MemDevice::open_shared(tmp.path(), ShmOptions::default()) {
        Err(Error::Os { source, context }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound, "{context}");
            assert!(context.contains("size="), "{context}");
        }
        other => panic!("expected Os NotFound, got {:?}", other.map(|d| d.name())),
    }
    // create=false with a size does not create either.
    let opts = ShmOptions {
        create: Some(false),
        ..shm_opts(1 << 20, 4096)
    };
    assert!(MemDevice::open_shared(tmp.path(), opts).is_err());
    assert!(!tmp.path().exists());
    // Bad sizes and block sizes, and create without a size.
    for opts in [
        shm_opts(6144, 4096),
        shm_opts(0, 4096),
        shm_opts(1 << 20, 1024),
        ShmOptions {
            create: Some(true),
            ..ShmOptions::default()
        },
    ] {
        let r = MemDevice::open_shared(tmp.path(), opts);
        assert!(
            matches!(r, Err(Error::InvalidArgument(_))),
            "{opts:?}: {:?}",
            r.map(|d| d.name())
        );
        assert!(!tmp.path().exists(), "a failed open leaves no file behind");
    }
    // An existing file that is not a block multiple, without a size.
    std::fs::write(tmp.path(), vec![1u8; 4096 + 512]).unwrap();
    match MemDevice::open_shared(tmp.path(), ShmOptions::default()) {
        Err(Error::InvalidArgument(m)) => {
            assert!(m.contains("not a multiple of the block size 4096"), "{m}")
        }
        other => panic!(
            "expected InvalidArgument, got {:?}",
            other.map(|d| d.name())
        ),
    }
    assert!(tmp.path().exists(), "an existing file is left alone");
    // With 512-byte blocks the same file is fine, and keeps its bytes.
    let dev = MemDevice::open_shared(
        tmp.path(),
        ShmOptions {
            block_size: Some(512),
            ..ShmOptions::default()
        },
    )
    .unwrap();
    assert_eq!(dev.geometry().block_count, 9);
    assert!(dev.snapshot().iter().all(|&b| b == 1));
    drop(dev);
    // Too small: empty, or less than a block.
    for len in [0usize, 100] {
        std::fs::write(tmp.path(), vec![0u8; len]).unwrap();
        let r = MemDevice::open_shared(tmp.path(), ShmOptions::default());
        assert!(
            matches!(r, Err(Error::DeviceTooSmall(_))),
            "{len}: {:?}",
            r.map(|d| d.name())
        );
    }
    // A smaller file is grown to the size asked for; the name is a spec
    // that names the same device.
    let dev = MemDevice::open_shared(
        tmp.path(),
        ShmOptions {
            size_bytes: Some(1 << 20),
            ..ShmOptions::default()
        },
    )
    .unwrap();
    assert_eq!(dev.geometry().block_size, 4096);
    assert_eq!(dev.geometry().block_count, 256);
    assert_eq!(std::fs::metadata(tmp.path()).unwrap().len(), 1 << 20);
    let name = dev.name();
    assert!(
        name.starts_with("shm:/") && name.ends_with("?size=1M&bs=4096"),
        "{name}"
    );
    let spec = DeviceSpec::parse(&name).unwrap();
    drop(dev);
    let again = spec.open().unwrap();
    assert_eq!(again.geometry().block_count, 256);
    assert_eq!(again.name(), name);
    drop(again);
    // Not a regular file.
    let r = MemDevice::open_shared(std::env::temp_dir(), ShmOptions::default());
    assert!(r.is_err());
    // A directory that does not exist: not creatable, a clear error.
    let r = MemDevice::open_shared(
        tmp.path().join("no-such-dir/x.img"),
        shm_opts(1 << 20, 4096),
    );
    match r {
        Err(e @ Error::Os { .. }) => assert!(e.to_string().contains("shm device"), "{e}"),
        other => panic!("expected Os, got {:?}", other.map(|d| d.name())),
    }
}

#[test]
fn reopen_after_drop_sees_the_data() {
    for bs in [512u32, 4096] {
        let tmp = TempPath::new("reopen");
        let data = pattern(8 * bs as usize, 42);
        {
            let dev: Arc<dyn BlockDevice> =
                Arc::new(FileDevice::open(tmp.path(), file_opts(DEV_BYTES, bs)).unwrap());
            let ch = channel(&dev).unwrap();
            block_on(ch.write(Lba(77), DmaBuf::from_slice(&data).unwrap())).unwrap();
            block_on(ch.flush()).unwrap();
            // The channel stays in this thread's cache; dropping the device
            // must still release the file.
        }
        // No size: the existing file's size is used.
        let opts = FileOptions {
            block_size: Some(bs),
            ..FileOptions::default()
        };
        let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(tmp.path(), opts).unwrap());
        assert_eq!(dev.geometry().size_bytes(), DEV_BYTES);
        assert_eq!(&read_back(&dev, 77, data.len())[..], &data[..]);
    }
}

#[test]
fn file_open_options_and_errors() {
    let tmp = TempPath::new("opts");
    // Missing file without a size: not created.
    match FileDevice::open(tmp.path(), FileOptions::default()) {
        Err(Error::Os { source, context }) => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound, "{context}");
            assert!(context.contains("size="), "{context}");
        }
        other => panic!("expected Os NotFound, got {:?}", other.map(|d| d.name())),
    }
    assert!(!tmp.path().exists());
    // create=false with a size does not create either.
    let opts = FileOptions {
        create: Some(false),
        ..file_opts(1 << 20, 4096)
    };
    assert!(FileDevice::open(tmp.path(), opts).is_err());
    assert!(!tmp.path().exists());
    // A size that is not a block multiple.
    let r = FileDevice::open(tmp.path(), file_opts(6144, 4096));
    assert!(
        matches!(r, Err(Error::InvalidArgument(_))),
        "{:?}",
        r.map(|d| d.name())
    );
    assert!(!tmp.path().exists(), "a failed open leaves no file behind");
    // Default block size of a regular file is 4096; a smaller file is grown.
    std::fs::write(tmp.path(), vec![1u8; 8192]).unwrap();
    let dev = FileDevice::open(
        tmp.path(),
        FileOptions {
            size_bytes: Some(1 << 20),
            ..FileOptions::default()
        },
    )
    .unwrap();
    assert_eq!(dev.geometry().block_size, 4096);
    assert_eq!(dev.geometry().block_count, 256);
    assert_eq!(std::fs::metadata(tmp.path()).unwrap().len(), 1 << 20);
    assert!(!dev.is_block_device());
    assert_eq!(dev.queue_depth(), 128);
    // The name is a spec that names the same device.
    let name = dev.name();
    assert!(
        name.starts_with("file:/") && name.contains("?size=1M&bs=4096"),
        "{name}"
    );
    let spec = DeviceSpec::parse(&name).unwrap();
    drop(dev);
    let again = spec.open().unwrap();
    assert_eq!(again.geometry().block_count, 256);
    assert_eq!(again.name(), name);
    drop(again);
    // An empty file without a size is too small.
    std::fs::write(tmp.path(), b"").unwrap();
    let r = FileDevice::open(tmp.path(), FileOptions::default());
    assert!(
        matches!(r, Err(Error::DeviceTooSmall(_))),
        "{:?}",
        r.map(|d| d.name())
    );
    // Not a file or block device.
    let r = FileDevice::open(std::env::temp_dir(), FileOptions::default());
    assert!(r.is_err());
}

#[test]
fn open_device_specs() {
    let tmp = TempPath::new("spec");
    let dev = open_device(&format!(
        "file:{}?size=2M&bs=512&qd=16",
        tmp.path().display()
    ))
    .unwrap();
    assert_eq!(dev.geometry().block_size, 512);
    assert_eq!(dev.geometry().block_count, 4096);
    many_in_flight(&dev);
    let mem = open_device("mem:8M?bs=512").unwrap();
    assert_eq!(mem.geometry().size_bytes(), 8 << 20);
    // No such PCI function on this machine: an error that names it.
    let e = open_device("nvme:0000:01:00.0/ns=1")
        .err()
        .expect("no NVMe device here");
    assert!(e.to_string().contains("0000:01:00.0"), "{e}");
}

/// Runs the basic bodies on a real block device when one is named, e.g.
/// `BLOBSTORE_TEST_BLOCKDEV=/dev/loop0` (its contents are overwritten).
#[test]
fn block_device_if_given() {
    let Ok(path) = std::env::var("BLOBSTORE_TEST_BLOCKDEV") else {
        return;
    };
    let dev: Arc<dyn BlockDevice> =
        Arc::new(FileDevice::open(&path, FileOptions::default()).unwrap());
    eprintln!("testing {}: {:?}", dev.name(), dev.geometry());
    assert!(!dev.geometry().unmap_reads_zeroes);
    let bs = dev.geometry().block_size as usize;
    let ch = channel(&dev).unwrap();
    block_on(ch.write(Lba(1), pattern(4 * bs, 3))).unwrap();
    assert_eq!(&read_back(&dev, 1, 4 * bs)[..], &pattern(4 * bs, 3)[..]);
    block_on(ch.write_zeroes(Lba(2), 2)).unwrap();
    let got = read_back(&dev, 1, 4 * bs);
    assert!(got[bs..3 * bs].iter().all(|&b| b == 0));
    block_on(ch.unmap(Lba(1), 4)).unwrap();
    block_on(ch.flush()).unwrap();
    many_in_flight(&dev);
    assert!(matches!(
        FileDevice::open(&path, FileOptions::default()),
        Err(Error::Busy(_))
    ));
}

/// tmpfs cannot `fallocate(ZERO_RANGE)`: write-zeroes must fall back to
/// writing zeroes (skipped where /dev/shm is missing or lacks O_DIRECT).
#[test]
fn write_zeroes_fallback_on_tmpfs() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        return;
    }
    let path = shm.join(format!(
        "blobstore-device-test-{}-tmpfs.img",
        std::process::id()
    ));
    let tmp = TempPath(path);
    let dev: Arc<dyn BlockDevice> = match FileDevice::open(tmp.path(), file_opts(4 << 20, 4096)) {
        Ok(d) => Arc::new(d),
        Err(Error::Unsupported(m)) => {
            eprintln!("skipped: {m}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let bs = 4096;
    let ch = channel(&dev).unwrap();
    for round in 0..2 {
        block_on(ch.write(Lba(0), pattern(300 * bs, round))).unwrap();
        // Larger than the 1 MiB zero buffer, so several writes.
        block_on(ch.write_zeroes(Lba(1), 298)).unwrap();
        block_on(ch.unmap(Lba(0), 1)).unwrap();
        let got = read_back(&dev, 0, 300 * bs);
        let want = pattern(300 * bs, round);
        assert!(got[..299 * bs].iter().all(|&b| b == 0), "round {round}");
        assert_eq!(&got[299 * bs..], &want[299 * bs..]);
    }
}
