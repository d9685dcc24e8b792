//! The events an operator gets with `RUST_LOG`: a clean mount says so; a
//! mount after a process died says what it finished (unsynced bytes
//! written back, a file deleted while open reaped); the blobstore says its
//! load was unclean; a refused mkfs and failed device I/O are warnings.

use std::io::Write;
use std::sync::{Arc, Mutex};

use blobfs::{BlobFs, MkfsOptions, MountOptions};
use blobstore::{BlockDevice, MemDevice};

/// A `tracing` writer into a shared buffer.
#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs `f` with every event of this thread (info and up) captured;
/// returns them as text.
fn events(f: impl FnOnce()) -> String {
    let buf = Buf::default();
    let w = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || w.clone())
        .finish();
    tracing::subscriber::with_default(sub, f);
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    text
}

fn mem() -> Arc<dyn BlockDevice> {
    Arc::new(MemDevice::new(64 << 20, 4096).unwrap())
}

#[test]
fn mounts_say_what_they_found_and_recovered() {
    // A file device: its unsynced memory outlives the "process" (the file
    // system dropped without unmount), as it outlives a killed one.
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("file:{}?size=64M", dir.path().join("fs.img").display());
    let dev = blobstore::device::open_device(&spec).unwrap();
    let fs = BlobFs::mkfs(dev.clone(), MkfsOptions::default(), MountOptions::default()).unwrap();
    let f = fs.create("a").unwrap();
    f.append(&[1u8; 10_000]).unwrap();
    f.close().unwrap();
    fs.unmount().unwrap();

    let clean = events(|| {
        let fs = BlobFs::mount(dev.clone(), MountOptions::default()).unwrap();
        // Unsynced bytes and an open file deleted, then the "process" dies:
        // the file system is dropped without unmounting.
        let f = fs.open("a", blobfs::OpenOptions::append()).unwrap();
        f.append(&[2u8; 5_000]).unwrap();
        let g = fs.create("b").unwrap();
        fs.remove_file("b").unwrap();
        drop((f, g));
        drop(fs); // a crash: no unmount
    });
    assert!(clean.contains("blobstore loaded (clean)"), "{clean}");
    assert!(
        clean.contains("BlobFS mounted") && !clean.contains("unclean"),
        "{clean}"
    );

    let dirty = events(|| {
        let fs = BlobFs::mount(dev.clone(), MountOptions::default()).unwrap();
        assert_eq!(fs.stat("a").unwrap().len, 15_000, "unsynced bytes lost");
        assert!(!fs.exists("b"));
        fs.unmount().unwrap();
    });
    assert!(dirty.contains("WARN"), "{dirty}");
    assert!(
        dirty.contains("blobstore loaded after an unclean stop"),
        "{dirty}"
    );
    assert!(
        dirty.contains("BlobFS mounted after an unclean stop"),
        "{dirty}"
    );
    assert!(dirty.contains("unsynced_files_written_back=1"), "{dirty}");
    assert!(dirty.contains("deleted_while_open_reaped=1"), "{dirty}");
}

#[test]
fn refusals_and_device_errors_are_warnings() {
    let dev = mem();
    BlobFs::mkfs(dev.clone(), MkfsOptions::default(), MountOptions::default())
        .unwrap()
        .unmount()
        .unwrap();
    let refused = events(|| {
        assert!(
            BlobFs::mkfs(dev.clone(), MkfsOptions::default(), MountOptions::default()).is_err()
        );
    });
    assert!(
        refused.contains("refusing to format a device that is not blank"),
        "{refused}"
    );

    let fault = Arc::new(blobstore::testing::FaultDevice::new(mem()).unwrap());
    let d: Arc<dyn BlockDevice> = fault.clone();
    let fs = BlobFs::mkfs(d, MkfsOptions::default(), MountOptions::default()).unwrap();
    let f = fs.create("x").unwrap();
    let failed = events(|| {
        fault.fail_nth(blobstore::IoKind::Write, 1);
        f.append(&[0u8; 8192]).unwrap();
        assert!(
            f.sync().is_err(),
            "the injected write error did not reach sync"
        );
        fault.clear_failures();
        let _ = f.close();
    });
    assert!(failed.contains("device I/O failed"), "{failed}");
}

#[test]
fn fsck_says_clean_or_what_is_damaged() {
    let dev = mem();
    let fs = BlobFs::mkfs(dev.clone(), MkfsOptions::default(), MountOptions::default()).unwrap();
    let f = fs.create("a").unwrap();
    f.append(&[1u8; 5000]).unwrap();
    f.close().unwrap();
    fs.unmount().unwrap();
    let clean = events(|| {
        let r = blobfs::fsck::fsck(dev.clone()).unwrap();
        assert!(r.is_clean());
    });
    assert!(clean.contains("fsck: clean"), "{clean}");
    assert!(clean.contains("files=1"), "{clean}");
    assert!(clean.contains("bytes=5000"), "{clean}");
}
