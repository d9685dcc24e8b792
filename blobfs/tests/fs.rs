//! BlobFS behaviour: every operation, persistence across unmount and crash,
//! concurrency, and bad input.

use std::sync::Arc;

use blobfs::{BlobFs, Error, MkfsOptions, MountOptions, OpenOptions};
use blobstore::testing::FaultDevice;
use blobstore::{BlockDevice, MemDevice};

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    blobstore::util::SplitMix64::bytes(seed, len)
}

/// The whole of file `name`.
fn contents(fs: &BlobFs, name: &str) -> Vec<u8> {
    fs.open(name, OpenOptions::read())
        .unwrap()
        .read_all()
        .unwrap()
}

fn mem(block: u32, size: u64) -> Arc<dyn BlockDevice> {
    Arc::new(MemDevice::new(size, block).unwrap())
}

/// Mount options under test: the default cache, a tiny cache, no cache.
fn mount_opts() -> Vec<MountOptions> {
    vec![
        MountOptions::default(),
        MountOptions {
            cache_bytes: 256 << 10,
            cache_chunk_bytes: 4096,
            ..Default::default()
        },
        MountOptions {
            cache_bytes: 0,
            ..Default::default()
        },
    ]
}

fn mkfs(dev: &Arc<dyn BlockDevice>, opts: MountOptions) -> BlobFs {
    BlobFs::mkfs(dev.clone(), MkfsOptions::default(), opts).unwrap()
}

/// A BlobFS (default options) on a 64 MiB memory device behind a
/// `FaultDevice`, which counts and fails operations on request.
fn fault_fs() -> (Arc<FaultDevice>, Arc<dyn BlockDevice>, BlobFs) {
    let fault = Arc::new(FaultDevice::new(mem(4096, 64 << 20)).unwrap());
    let dev: Arc<dyn BlockDevice> = fault.clone();
    let fs = mkfs(&dev, MountOptions::default());
    (fault, dev, fs)
}

#[test]
fn file_operations_round_trip() {
    for block in [512, 4096] {
        for opts in mount_opts() {
            let dev = mem(block, 64 << 20);
            let fs = mkfs(&dev, opts.clone());
            fs.create_dir("db").unwrap();
            let f = fs.create("db/000001.log").unwrap();
            // Appends of awkward sizes, crossing blocks, chunks and clusters.
            let data = pattern(1, 3 << 20);
            let mut pos = 0;
            for (i, step) in [1usize, 511, 4097, 65_536, 1 << 20, 7]
                .iter()
                .cycle()
                .enumerate()
            {
                if pos >= data.len() || i > 10_000 {
                    break;
                }
                let n = (*step).min(data.len() - pos);
                f.append(&data[pos..pos + n]).unwrap();
                pos += n;
            }
            assert_eq!(f.len(), data.len() as u64);
            // Reads before and after sync, random and sequential.
            let mut b = vec![0u8; 10_000];
            assert_eq!(f.read_at(123_457, &mut b).unwrap(), 10_000);
            assert_eq!(&b[..], &data[123_457..133_457]);
            f.sync().unwrap();
            assert_eq!(f.read_all().unwrap(), data);
            assert_eq!(f.read_at(data.len() as u64 - 5, &mut b).unwrap(), 5);
            assert_eq!(f.read_at(data.len() as u64 + 5, &mut b).unwrap(), 0);
            // Positional overwrite inside the file, then past the buffer.
            let mut model = data.clone();
            let patch = pattern(2, 9_000);
            f.write_at(1_000_000, &patch).unwrap();
            model[1_000_000..1_009_000].copy_from_slice(&patch);
            f.append(b"tail").unwrap();
            model.extend_from_slice(b"tail");
            let patch2 = pattern(3, 100);
            f.write_at(model.len() as u64 - 50, &patch2).unwrap();
            model.truncate(model.len() - 50);
            model.extend_from_slice(&patch2);
            assert_eq!(f.read_all().unwrap(), model);
            // Truncate down (not on a block edge) and grow again: zeroes.
            f.truncate(700_001).unwrap();
            model.truncate(700_001);
            f.truncate(800_000).unwrap();
            model.resize(800_000, 0);
            assert_eq!(f.read_all().unwrap(), model);
            assert!(matches!(
                f.write_at(900_000, b"x"),
                Err(Error::InvalidArgument(_))
            ));
            f.close().unwrap();
            let st = fs.stat("/db/000001.log").unwrap();
            assert_eq!(st.len, 800_000);
            assert!(!st.is_dir);
            assert!(fs.stat("db").unwrap().is_dir);
            fs.unmount().unwrap();
            let fs = BlobFs::mount(dev.clone(), opts.clone()).unwrap();
            let f = fs.open("db/000001.log", OpenOptions::read()).unwrap();
            assert_eq!(f.read_all().unwrap(), model, "block {block} {opts:?}");
            assert!(matches!(f.append(b"x"), Err(Error::BadMode(..))));
        }
    }
}

#[test]
fn synced_data_survives_a_crash_and_unsynced_length_does_not_lie() {
    for block in [512, 4096] {
        let dev = mem(block, 64 << 20);
        let fs = mkfs(&dev, MountOptions::default());
        let f = fs.create("wal").unwrap();
        let a = pattern(4, 1_234_567);
        f.append(&a).unwrap();
        f.sync().unwrap();
        f.append(&pattern(5, 10_000)).unwrap(); // never synced
        let g = fs.create("other").unwrap();
        g.append(b"hello").unwrap();
        g.sync().unwrap();
        drop((f, g));
        drop(fs); // crash: no unmount
        let fs = BlobFs::mount(dev.clone(), MountOptions::default()).unwrap();
        let f = fs.open("wal", OpenOptions::read()).unwrap();
        let got = f.read_all().unwrap();
        // The synced prefix is there; the length is the synced one or covers
        // bytes that really were written, never garbage.
        assert!(got.len() >= a.len());
        assert_eq!(&got[..a.len()], &a[..]);
        if got.len() > a.len() {
            assert_eq!(&got[a.len()..], &pattern(5, 10_000)[..got.len() - a.len()]);
        }
        assert_eq!(
            fs.open("other", OpenOptions::read())
                .unwrap()
                .read_all()
                .unwrap(),
            b"hello"
        );
    }
}

#[test]
fn rename_replaces_atomically_and_delete_while_open() {
    let dev = mem(4096, 64 << 20);
    let fs = mkfs(&dev, MountOptions::default());
    let cur = fs.create("CURRENT").unwrap();
    cur.append(b"MANIFEST-000001\n").unwrap();
    cur.close().unwrap();
    let tmp = fs.create("CURRENT.tmp").unwrap();
    tmp.append(b"MANIFEST-000002\n").unwrap();
    tmp.sync().unwrap();
    let reader = fs.open("CURRENT", OpenOptions::read()).unwrap();
    fs.rename("CURRENT.tmp", "CURRENT").unwrap();
    assert!(!fs.exists("CURRENT.tmp"));
    // The old file stays readable through its handle after being replaced.
    assert_eq!(reader.read_all().unwrap(), b"MANIFEST-000001\n");
    assert_eq!(
        fs.open("CURRENT", OpenOptions::read())
            .unwrap()
            .read_all()
            .unwrap(),
        b"MANIFEST-000002\n"
    );
    // A renamed handle keeps working under the new name.
    tmp.append(b"x").unwrap();
    assert_eq!(tmp.name(), "CURRENT");
    tmp.close().unwrap();
    // Delete while open: data readable until the last close, space returned.
    let free0 = fs.space().free_bytes;
    let big = fs.create("big").unwrap();
    big.append(&pattern(6, 5 << 20)).unwrap();
    big.sync().unwrap();
    let h = fs.open("big", OpenOptions::read()).unwrap();
    fs.remove_file("big").unwrap();
    assert!(!fs.exists("big"));
    assert!(matches!(
        fs.open("big", OpenOptions::read()),
        Err(Error::NotFound(_))
    ));
    assert_eq!(h.read_all().unwrap(), pattern(6, 5 << 20));
    assert!(fs.space().free_bytes < free0);
    drop(big);
    h.close().unwrap();
    assert_eq!(fs.space().free_bytes, free0);
    drop(reader);
    fs.unmount().unwrap();
    let fs = BlobFs::mount(dev.clone(), MountOptions::default()).unwrap();
    assert_eq!(fs.list(""), vec!["CURRENT".to_string()]);
    assert_eq!(
        fs.open("CURRENT", OpenOptions::read())
            .unwrap()
            .read_all()
            .unwrap(),
        b"MANIFEST-000002\nx"
    );
}

#[test]
fn a_crash_with_an_unlinked_open_file_frees_it_at_mount() {
    let dev = mem(512, 64 << 20);
    let fs = mkfs(&dev, MountOptions::default());
    let free0 = fs.space().free_bytes;
    let f = fs.create("gone").unwrap();
    f.append(&pattern(7, 3 << 20)).unwrap();
    f.sync().unwrap();
    fs.remove_file("gone").unwrap();
    drop(f);
    drop(fs); // crash before anyone reaped the blob
    let fs = BlobFs::mount(dev.clone(), MountOptions::default()).unwrap();
    assert!(!fs.exists("gone"));
    assert_eq!(fs.space().free_bytes, free0);
}

#[test]
fn directories_behave_like_posix() {
    let dev = mem(4096, 32 << 20);
    let fs = mkfs(&dev, MountOptions::default());
    assert!(matches!(fs.create("a/b"), Err(Error::NotFound(_))));
    fs.create_dir("a").unwrap();
    assert!(matches!(fs.create_dir("a"), Err(Error::AlreadyExists(_))));
    fs.create_dir_all("a/x/y").unwrap();
    fs.create_dir_all("a/x/y").unwrap();
    fs.create("a/b").unwrap();
    fs.create("a/x/y/z").unwrap();
    let names: Vec<(String, bool)> = fs
        .read_dir("a")
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.is_dir))
        .collect();
    assert_eq!(names, vec![("b".into(), false), ("x".into(), true)]);
    assert_eq!(fs.read_dir("/").unwrap().len(), 1);
    assert!(matches!(fs.read_dir("a/b"), Err(Error::NotADirectory(_))));
    assert!(matches!(fs.read_dir("nope"), Err(Error::NotFound(_))));
    assert!(matches!(
        fs.remove_dir("a/x"),
        Err(Error::DirectoryNotEmpty(_))
    ));
    assert!(matches!(fs.remove_dir("a/b"), Err(Error::NotADirectory(_))));
    assert!(matches!(fs.remove_file("a/x"), Err(Error::IsADirectory(_))));
    assert!(matches!(
        fs.open("a", OpenOptions::read()),
        Err(Error::IsADirectory(_))
    ));
    assert!(matches!(fs.create("a/b/c"), Err(Error::NotADirectory(_))));
    assert!(matches!(
        fs.rename("a/b", "a/x"),
        Err(Error::IsADirectory(_))
    ));
    assert!(matches!(fs.rename("a/b", "q/b"), Err(Error::NotFound(_))));
    fs.remove_file("a/x/y/z").unwrap();
    fs.remove_dir("a/x/y").unwrap();
    assert!(fs.exists("a/x") && !fs.exists("a/x/y"));
    assert_eq!(fs.list("a/"), vec!["a/b".to_string(), "a/x".to_string()]);
    drop(fs);
    let fs = BlobFs::mount(dev.clone(), MountOptions::default()).unwrap();
    assert_eq!(
        fs.list(""),
        vec!["a".to_string(), "a/b".to_string(), "a/x".to_string()]
    );
}

#[test]
fn names_locks_and_refusals() {
    let dev = mem(4096, 32 << 20);
    let fs = mkfs(&dev, MountOptions::default());
    for bad in ["", "/", "a//b", "a/../b", "./x", "a\0b"] {
        assert!(
            matches!(fs.create(bad), Err(Error::InvalidName { .. })),
            "{bad:?}"
        );
    }
    assert!(matches!(
        fs.create(&"n".repeat(256)),
        Err(Error::InvalidName { .. })
    ));
    fs.create(&"n".repeat(255)).unwrap();
    assert!(matches!(
        fs.create(&"n".repeat(255)),
        Err(Error::AlreadyExists(_))
    ));
    assert!(matches!(
        fs.open("missing", OpenOptions::read()),
        Err(Error::NotFound(_))
    ));
    assert!(matches!(fs.remove_file("missing"), Err(Error::NotFound(_))));
    assert!(matches!(fs.rename("missing", "x"), Err(Error::NotFound(_))));
    let l = fs.lock("LOCK").unwrap();
    assert!(matches!(fs.lock("LOCK"), Err(Error::Locked(_))));
    drop(l);
    let _l = fs.lock("LOCK").unwrap();
    // A second mount of a mounted device is refused.
    let e = BlobFs::mount(dev.clone(), MountOptions::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("already mounted"), "{e}");
    // A device that holds no BlobFS.
    let e = BlobFs::mount(mem(4096, 32 << 20), MountOptions::default())
        .err()
        .unwrap();
    assert!(matches!(e, Error::NotBlobFs(_)), "{e}");
    // Busy unmount while files are open.
    let f = fs.create("open").unwrap();
    let e = fs.clone().unmount().err().unwrap();
    assert!(e.to_string().contains("still open"), "{e}");
    drop(f);
}

#[test]
fn out_of_space_is_clean_and_loses_nothing() {
    let dev = mem(4096, 24 << 20);
    let fs = mkfs(&dev, MountOptions::default());
    let mut kept = Vec::new();
    let mut i = 0;
    let err = loop {
        let name = format!("f{i}");
        let f = fs.create(&name).unwrap();
        let data = pattern(i, 700_000);
        match f.append(&data).and_then(|_| f.sync()) {
            Ok(()) => kept.push((name, data)),
            Err(e) => break e,
        }
        i += 1;
    };
    assert!(err.is_no_space(), "{err}");
    drop(fs);
    let fs = BlobFs::mount(dev.clone(), MountOptions::default()).unwrap();
    for (name, data) in &kept {
        assert_eq!(
            &fs.open(name, OpenOptions::read())
                .unwrap()
                .read_all()
                .unwrap(),
            data
        );
    }
    // Deleting makes room again.
    fs.remove_file(&kept[0].0).unwrap();
    let f = fs.create("again").unwrap();
    f.append(&pattern(99, 500_000)).unwrap();
    f.sync().unwrap();
}

/// 4 threads append to their own files while 4 read them and one renames
/// and deletes; every byte is checked.
#[test]
fn appenders_readers_and_a_renamer_at_once() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dev = mem(4096, 256 << 20);
    let fs = mkfs(
        &dev,
        MountOptions {
            cache_bytes: 8 << 20,
            cache_chunk_bytes: 16 << 10,
            ..Default::default()
        },
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let fs = fs.clone();
            std::thread::spawn(move || {
                let f = fs.create(&format!("w{t}")).unwrap();
                let data = pattern(100 + t, 6 << 20);
                let mut pos = 0;
                let mut n = 1000 + t as usize * 777;
                while pos < data.len() {
                    let k = n.min(data.len() - pos);
                    f.append(&data[pos..pos + k]).unwrap();
                    pos += k;
                    n = (n * 7 + 13) % 200_000 + 1;
                    if pos % 3 == 0 {
                        f.sync().unwrap();
                    }
                }
                f.close().unwrap();
                data
            })
        })
        .collect();
    let readers: Vec<_> = (0..4u64)
        .map(|t| {
            let fs = fs.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let data = pattern(100 + t, 6 << 20);
                let mut checks = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let Ok(f) = fs.open(&format!("w{t}"), OpenOptions::read()) else {
                        continue;
                    };
                    let len = f.len() as usize;
                    if len == 0 {
                        continue;
                    }
                    let off = (checks as usize * 7919) % len;
                    let mut b = vec![0u8; 64 << 10];
                    let n = f.read_at(off as u64, &mut b).unwrap();
                    assert_eq!(&b[..n], &data[off..off + n], "reader {t} at {off}");
                    checks += 1;
                }
                checks
            })
        })
        .collect();
    let renamer = {
        let fs = fs.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                let f = fs.create(&format!("tmp{i}")).unwrap();
                f.append(&pattern(i, 10_000)).unwrap();
                f.close().unwrap();
                fs.rename(&format!("tmp{i}"), "target").unwrap();
                let got = fs
                    .open("target", OpenOptions::read())
                    .unwrap()
                    .read_all()
                    .unwrap();
                assert_eq!(got, pattern(i, 10_000));
                if i.is_multiple_of(3) {
                    fs.remove_file("target").unwrap();
                }
                i += 1;
            }
            i
        })
    };
    let datas: Vec<Vec<u8>> = writers.into_iter().map(|h| h.join().unwrap()).collect();
    stop.store(true, Ordering::Release);
    let checks: u64 = readers.into_iter().map(|h| h.join().unwrap()).sum();
    let renames = renamer.join().unwrap();
    assert!(checks > 0 && renames > 0);
    for (t, d) in datas.iter().enumerate() {
        let f = fs.open(&format!("w{t}"), OpenOptions::read()).unwrap();
        assert_eq!(&f.read_all().unwrap(), d);
    }
    drop(fs);
    let fs = BlobFs::mount(dev, MountOptions::default()).unwrap();
    for (t, d) in datas.iter().enumerate() {
        let f = fs.open(&format!("w{t}"), OpenOptions::read()).unwrap();
        assert_eq!(&f.read_all().unwrap(), d);
    }
}

/// A new file that reuses a deleted file's blob id never sees its cached
/// chunks, and a rewritten file never sees its own old bytes.
#[test]
fn cache_never_serves_another_files_bytes() {
    let dev = mem(4096, 64 << 20);
    let fs = mkfs(&dev, MountOptions::default());
    for round in 0..5u64 {
        let f = fs.create("x").unwrap();
        let data = pattern(round, 300_000);
        f.append(&data).unwrap();
        f.sync().unwrap();
        // Read through the cache (fills it), then replace the file.
        assert_eq!(f.read_all().unwrap(), data);
        f.close().unwrap();
        let g = fs.open("x", OpenOptions::read()).unwrap();
        assert_eq!(g.read_all().unwrap(), data, "round {round}");
        drop(g);
        fs.remove_file("x").unwrap();
    }
    let f = fs.create("y").unwrap();
    f.append(&pattern(50, 100_000)).unwrap();
    f.write_at(10, &pattern(51, 70_000)).unwrap();
    let mut model = pattern(50, 100_000);
    model[10..70_010].copy_from_slice(&pattern(51, 70_000));
    assert_eq!(f.read_all().unwrap(), model);
    f.truncate(5).unwrap();
    f.truncate(90_000).unwrap();
    model.truncate(5);
    model.resize(90_000, 0);
    assert_eq!(f.read_all().unwrap(), model);
}

/// A dying disk (every write and flush failing from some point, the rule
/// `fault_injection=on` arms under RocksDB): the sync fails, and once the
/// disk is healed a new file syncs and what was synced before reads back.
#[test]
fn a_dying_disk_fails_syncs_until_healed() {
    use blobstore::testing::{Kinds, Rule};
    let (fault, _dev, fs) = fault_fs();
    let f = fs.create("a").unwrap();
    f.append(b"kept").unwrap();
    f.sync().unwrap();
    fault.arm(Rule::fail_after(
        Kinds::WRITE | Kinds::FLUSH | Kinds::WRITE_ZEROES,
        0,
    ));
    // The append may fail at once or leave the failure to the sync.
    let _ = f.append(&[7u8; 8192]);
    assert!(f.sync().is_err(), "sync on a failing device must fail");
    assert!(fault.injected_failures() > 0);
    fault.clear_failures();
    let g = fs.create("b").unwrap();
    g.append(b"fine").unwrap();
    g.sync().unwrap();
    let mut b = [0u8; 4];
    assert_eq!(f.read_at(0, &mut b).unwrap(), 4);
    assert_eq!(&b, b"kept");
}

/// An append buffer written behind the appender fails on the device: the
/// next sync reports the loss, so does every write until a truncate, and
/// another file synced before is intact.
#[test]
fn failed_write_behind_is_reported_by_the_next_sync() {
    use blobstore::IoKind;
    let (fault, dev, fs) = fault_fs();
    let kept = fs.create("kept").unwrap();
    kept.append(&pattern(1, 100_000)).unwrap();
    kept.close().unwrap();
    let f = fs.create("lost").unwrap();
    fault.fail_nth(IoKind::Write, 1);
    // Past the 4 MiB buffer: its full blocks go behind, and that write fails.
    f.append(&pattern(2, 5 << 20)).unwrap();
    let err = f.sync().unwrap_err();
    assert!(
        matches!(&err, Error::WriteLost(name, _) if name == "lost"),
        "{err}"
    );
    assert_eq!(fault.injected_failures(), 1);
    assert!(matches!(f.append(b"more"), Err(Error::WriteLost(..))));
    assert!(matches!(f.sync(), Err(Error::WriteLost(..))));
    f.truncate(0).unwrap();
    f.append(b"again").unwrap();
    f.close().unwrap();
    let read = |name: &str| {
        fs.open(name, OpenOptions::read())
            .unwrap()
            .read_all()
            .unwrap()
    };
    assert_eq!(read("kept"), pattern(1, 100_000));
    assert_eq!(read("lost"), b"again");
    drop(fs);
    let fs = BlobFs::mount(dev, MountOptions::default()).unwrap();
    let read = |name: &str| {
        fs.open(name, OpenOptions::read())
            .unwrap()
            .read_all()
            .unwrap()
    };
    assert_eq!(read("kept"), pattern(1, 100_000));
    assert_eq!(read("lost"), b"again");
}

/// Files far larger than the append buffer, read back while their buffers
/// are written behind: every read sees the bytes appended, with the cache
/// on and off, and so does a new mount.
#[test]
fn reads_while_buffers_are_written_behind() {
    for opts in mount_opts() {
        let dev = mem(4096, 256 << 20);
        let fs = mkfs(&dev, opts);
        let data = pattern(7, 37 << 20);
        let f = fs.create("big").unwrap();
        let mut pos = 0;
        let mut step = 1 << 20;
        while pos < data.len() {
            let n = step.min(data.len() - pos);
            f.append(&data[pos..pos + n]).unwrap();
            pos += n;
            // Read back the most recent 256 KiB and a range further back.
            let r = fs.open("big", OpenOptions::read()).unwrap();
            for at in [pos.saturating_sub(256 << 10), pos / 3] {
                let mut b = vec![0u8; 256 << 10];
                let got = r.read_at(at as u64, &mut b).unwrap();
                assert_eq!(&b[..got], &data[at..at + got], "at {at} after {pos}");
            }
            step = (step * 5 / 3) % (3 << 20) + 4093;
        }
        f.close().unwrap();
        drop(fs);
        let fs = BlobFs::mount(dev, MountOptions::default()).unwrap();
        let all = fs
            .open("big", OpenOptions::read())
            .unwrap()
            .read_all()
            .unwrap();
        assert!(all == data, "data differs after remount");
    }
}

/// A file deleted (and its handle dropped) right after appends left a
/// buffer on its way to the device: the delete waits for that write before
/// the clusters are freed, so a file that gets them next reads only its
/// own bytes, and nothing of either is lost over a remount.
#[test]
fn delete_right_after_write_behind_frees_clusters_safely() {
    let dev = mem(4096, 64 << 20);
    let fs = mkfs(&dev, MountOptions::default());
    for round in 0..6u64 {
        let f = fs.create("doomed").unwrap();
        f.append(&pattern(round, (9 << 20) + 123)).unwrap();
        fs.remove_file("doomed").unwrap();
        drop(f);
        let g = fs.create(&format!("next{round}")).unwrap();
        let data = pattern(100 + round, (5 << 20) + 77);
        g.append(&data).unwrap();
        g.close().unwrap();
        let got = fs
            .open(&format!("next{round}"), OpenOptions::read())
            .unwrap()
            .read_all()
            .unwrap();
        assert!(got == data, "round {round}: next{round} differs");
        fs.remove_file(&format!("next{round}")).unwrap();
    }
    let keep = pattern(999, 3 << 20);
    let k = fs.create("keep").unwrap();
    k.append(&keep).unwrap();
    k.close().unwrap();
    fs.unmount().unwrap();
    let fs = BlobFs::mount(dev, MountOptions::default()).unwrap();
    let got = fs
        .open("keep", OpenOptions::read())
        .unwrap()
        .read_all()
        .unwrap();
    assert!(got == keep);
    assert!(fs.open("doomed", OpenOptions::read()).is_err());
}

/// A small append's sync costs one device flush (data and metadata
/// together, checked at mount); a large one, or one that needs a new
/// cluster, keeps the flush between data and metadata.
#[test]
fn small_syncs_take_one_flush() {
    let (fault, _dev, fs) = fault_fs();
    let f = fs.create("wal").unwrap();
    f.append(&pattern(1, 200_000)).unwrap();
    let before = fault.flushes_done();
    f.sync().unwrap();
    assert_eq!(fault.flushes_done() - before, 2, "a 200,000-byte sync");
    for i in 0..20u64 {
        f.append(&pattern(i, 1_000)).unwrap();
        let before = fault.flushes_done();
        f.sync().unwrap();
        assert_eq!(fault.flushes_done() - before, 1, "sync {i} of 1,000 bytes");
    }
    f.close().unwrap();
}

/// A sync does not wait for its data write before it writes the metadata:
/// the new bytes and the blob's first page are on the device at once, under
/// the one flush that follows (a WAL sync costs one write round trip, not
/// two), and what it synced is all there after a remount.
#[test]
fn sync_writes_data_and_metadata_together() {
    let (fault, dev, fs) = fault_fs();
    let f = fs.create("wal").unwrap();
    // The first sync gives the file its first cluster (a fresh page).
    let mut want = pattern(0, 100);
    f.append(&want).unwrap();
    f.sync().unwrap();
    // Writes take time, as on a disk: a write is seen done only at the
    // second poll after it could be.
    fault.set_reap_delay(2);
    for i in 0..20u64 {
        let rec = pattern(i, 1_000);
        f.append(&rec).unwrap();
        want.extend_from_slice(&rec);
        fault.take_peak_writes_in_flight();
        let writes = fault.writes_submitted();
        f.sync().unwrap();
        assert_eq!(
            fault.writes_submitted() - writes,
            2,
            "sync {i}: data + first page"
        );
        assert_eq!(
            fault.take_peak_writes_in_flight(),
            2,
            "sync {i}: the data and metadata writes overlap"
        );
    }
    // A large sync takes the ordered path (data durable before the first
    // page: two flushes), its data written inside the metadata sync too.
    let big = pattern(99, 3 << 20);
    f.append(&big).unwrap();
    want.extend_from_slice(&big);
    let before = fault.flushes_done();
    f.sync().unwrap();
    assert_eq!(fault.flushes_done() - before, 2, "a 3 MiB sync");
    f.close().unwrap();
    fs.unmount().unwrap();
    let fs = BlobFs::mount(dev, MountOptions::default()).unwrap();
    assert_eq!(contents(&fs, "wal"), want);
}

/// A cold cache fills by extents: while it has room, a random read that
/// misses fetches the aligned `warm_read_bytes` around it in one device
/// read, so later reads there are hits; once it is full, a miss reads only
/// the chunks it needs. The bytes are right either way.
#[test]
fn a_cold_cache_fills_by_extents_until_it_is_full() {
    const EXTENT: u64 = 128 << 10;
    const CACHE: u64 = 8 << 20;
    let (fault, dev, fs) = fault_fs();
    let data = pattern(5, 24 << 20);
    let f = fs.create("sst").unwrap();
    f.append(&data).unwrap();
    f.close().unwrap();
    fs.unmount().unwrap();
    let opts = MountOptions {
        cache_bytes: CACHE,
        cache_chunk_bytes: 4096,
        warm_read_bytes: EXTENT,
        ..Default::default()
    };
    let fs = BlobFs::mount(dev, opts).unwrap();
    let f = fs.open("sst", OpenOptions::read()).unwrap();
    // Reads `len` bytes at `off`; returns the device ops it took.
    let read = |off: u64, len: usize| {
        let mut buf = vec![0u8; len];
        let ops = fault.op_count();
        assert_eq!(f.read_at(off, &mut buf).unwrap(), len);
        assert_eq!(&buf[..], &data[off as usize..off as usize + len]);
        fault.op_count() - ops
    };
    // A block that straddles two chunks, in the middle of an extent: one
    // read brings the whole extent.
    assert_eq!(read(3 * EXTENT + 50_000, 4_200), 1);
    assert_eq!(fs.cache_stats().bytes, EXTENT, "one whole extent cached");
    for off in [3 * EXTENT, 4 * EXTENT - 4_200, 3 * EXTENT + 77_777] {
        assert_eq!(read(off, 4_200), 0, "a hit at {off}");
    }
    // Random misses in other extents, up to half the cache: one device read
    // each, and then every other block of those extents is a hit.
    let extents: Vec<u64> = (0..CACHE / EXTENT / 2)
        .map(|i| (i * 37 + 5) % 192)
        .collect();
    for &e in &extents {
        let ops = read(e * EXTENT + 9_000, 100);
        assert!(ops <= 1, "extent {e}: {ops} reads");
    }
    for &e in &extents {
        assert_eq!(read(e * EXTENT + 100_000, 4_200), 0, "extent {e} is cached");
    }
    // Fill the cache (three times over); once it evicts, a miss reads only
    // what it needs.
    for e in 0..192 {
        read(e * EXTENT + 60_000, 100);
    }
    let full = fs.cache_stats().bytes;
    assert!(full > CACHE / 2 && full <= CACHE, "cache filled: {full}");
    for i in 0..16u64 {
        let off = (24 << 20) - (i + 1) * 700_001;
        let before = fs.cache_stats();
        let ops = read(off, 4_200);
        let after = fs.cache_stats();
        if after.misses > before.misses {
            assert_eq!(ops, 1);
            assert!(
                after.bytes <= before.bytes + 2 * 4096,
                "{off}: only the chunks asked for"
            );
        }
    }
    assert!(fs.cache_stats().bytes <= CACHE);
}

/// A closed file's append buffer goes to the next file written: the new
/// file shows none of the old one's bytes, the closed file reads the same
/// (its last block now from the device), and appending to it again after a
/// reopen picks up its partial last block; all of it across a remount.
#[test]
fn append_buffers_move_between_files_without_their_bytes() {
    let (_fault, dev, fs) = fault_fs();
    let a_bytes = pattern(1, (5 << 20) + 1234);
    let a = fs.create("a").unwrap();
    for piece in a_bytes.chunks(100_000) {
        a.append(piece).unwrap();
    }
    a.close().unwrap();
    let b = fs.create("b").unwrap();
    let b_bytes = pattern(2, 3_000);
    b.append(&b_bytes).unwrap();
    b.sync().unwrap();
    let a = fs.open("a", OpenOptions::read()).unwrap();
    assert_eq!(a.read_all().unwrap(), a_bytes);
    let a2 = fs.open("a", OpenOptions::append()).unwrap();
    let more = pattern(3, 5_000);
    a2.append(&more).unwrap();
    a2.close().unwrap();
    b.close().unwrap();
    let mut a_all = a_bytes.clone();
    a_all.extend_from_slice(&more);
    assert_eq!(a.read_all().unwrap(), a_all);
    drop(a);
    fs.unmount().unwrap();
    let fs = BlobFs::mount(dev, MountOptions::default()).unwrap();
    assert_eq!(contents(&fs, "a"), a_all);
    assert_eq!(contents(&fs, "b"), b_bytes);
}

#[test]
fn direct_handles_read_the_device_and_leave_the_cache_alone() {
    let fault = Arc::new(FaultDevice::new(mem(4096, 64 << 20)).unwrap());
    let dev: Arc<dyn BlockDevice> = fault.clone();
    let fs = mkfs(&dev, MountOptions::default());
    let data = pattern(9, 3 << 20);
    let w = fs.create("f").unwrap();
    w.append(&data[..2 << 20]).unwrap();
    // Closed, so the first 2 MiB are on the device only (an open writer's
    // buffer would still serve them from memory).
    w.close().unwrap();
    let w = fs.open("f", OpenOptions::append()).unwrap();
    // Appended, not synced: a direct reader sees it too.
    w.append(&data[2 << 20..]).unwrap();
    let direct = fs
        .open(
            "f",
            OpenOptions {
                direct: true,
                ..OpenOptions::read()
            },
        )
        .unwrap();
    let cached = fs.open("f", OpenOptions::read()).unwrap();
    let mut buf = vec![0u8; 64 << 10];
    for round in 0..2 {
        for off in [0u64, 1 << 20, (2 << 20) - 4096, (3 << 20) - (64 << 10)] {
            let (stats, ops) = (fs.cache_stats(), fault.op_count());
            assert_eq!(direct.read_at(off, &mut buf).unwrap(), buf.len());
            assert_eq!(&buf[..], &data[off as usize..off as usize + buf.len()]);
            assert_eq!(fs.cache_stats(), stats, "a direct read touched the cache");
            // Every direct read of device bytes goes to the device, even
            // after a buffered read cached them (round 1).
            if off + (buf.len() as u64) <= 2 << 20 {
                assert!(
                    fault.op_count() > ops,
                    "direct read at {off} in round {round}"
                );
            }
            assert_eq!(cached.read_at(off, &mut buf).unwrap(), buf.len());
        }
    }
    assert!(
        fs.cache_stats().bytes > 0,
        "the buffered reads cached nothing"
    );
    for f in [direct, cached, w] {
        f.close().unwrap();
    }
}

/// Polls `fut` once on this thread with a waker that does nothing, then
/// this thread's device channels (only polling completes I/O): a test
/// steps several operations in an order of its choosing.
fn step<F: std::future::Future>(fut: std::pin::Pin<&mut F>) -> std::task::Poll<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let p = fut.poll(&mut cx);
    blobstore::device::poll_thread_channels();
    p
}

/// A rename of a file whose sync has set the new length in memory but not
/// yet written the data must not make that length durable first: a crash
/// right after the rename returns shows the file (under either name) with
/// a length its durable bytes back. The three operations are stepped on one
/// thread so the interleaving is the bad one every time: another file's
/// sync holds the blobstore's metadata lock while `a`'s sync sets its
/// length and then waits for that lock; the rename is given the lock
/// first as soon as it is free.
#[test]
fn a_file_rename_never_makes_a_length_durable_before_its_data() {
    use std::pin::pin;
    let (fault, _dev, fs) = fault_fs();
    let old = pattern(1, 4096);
    let more = pattern(3, 128 << 10); // past what a tail check covers
    let a = fs.create("a").unwrap();
    a.append(&old).unwrap();
    a.sync().unwrap();
    let b = fs.create("b").unwrap();
    b.append(&pattern(2, 4096)).unwrap();
    b.sync().unwrap();
    // Buffered, not on the device: `a` grows inside its first cluster, so
    // its sync takes no metadata lock before it sets the length.
    a.append(&more).unwrap();
    b.append(&pattern(4, 8192)).unwrap();
    // Each completion waits a few polls, so b's sync holds the lock a while.
    fault.set_reap_delay(3);
    let image = {
        let mut hold = pin!(b.sync_async());
        let mut sync = pin!(a.sync_async());
        let mut rename = pin!(fs.rename_async("a", "a2"));
        assert!(
            step(hold.as_mut()).is_pending(),
            "b's sync waits for its I/O"
        );
        assert!(
            step(sync.as_mut()).is_pending(),
            "a's sync waits for the lock"
        );
        while step(hold.as_mut()).is_pending() {}
        let (mut renamed, mut synced, mut image) = (false, false, None);
        for _ in 0..100_000 {
            if !renamed {
                if let std::task::Poll::Ready(r) = step(rename.as_mut()) {
                    r.unwrap();
                    renamed = true;
                    image = Some(fault.crash_image().unwrap());
                }
            }
            if !synced {
                if let std::task::Poll::Ready(r) = step(sync.as_mut()) {
                    r.unwrap();
                    synced = true;
                }
            }
            if renamed && synced {
                break;
            }
        }
        assert!(renamed && synced, "the rename and the sync never finished");
        image.unwrap()
    };
    fault.set_reap_delay(0);
    let mut want = old.clone();
    want.extend_from_slice(&more);
    for seed in 0..8 {
        let what = format!("crash right after the rename (seed {seed})");
        let dev: Arc<dyn BlockDevice> = Arc::new(image.to_device(seed).unwrap());
        let fs = BlobFs::mount(dev, MountOptions::default()).unwrap();
        let names: Vec<String> = ["a", "a2"]
            .into_iter()
            .filter(|n| fs.exists(n))
            .map(String::from)
            .collect();
        assert_eq!(names.len(), 1, "{what}: {names:?}");
        let got = contents(&fs, &names[0]);
        assert!(
            got.len() == old.len() || got.len() == want.len(),
            "{what}: length {}",
            got.len()
        );
        assert!(
            got[..] == want[..got.len()],
            "{what}: {} shows {} bytes it never had on the device",
            names[0],
            got.len() - old.len()
        );
        fs.unmount().unwrap();
    }
    drop((a, b));
    fs.unmount().unwrap();
}

/// Every write and flush of a `remove_dir` and of a `remove_file` fails in
/// turn: the error is reported, and after the unmount (and after a crash
/// right after the failure) the file system passes fsck and mounts, with
/// the other file intact and the removed entry gone or whole (gone when the
/// removal returned `Ok`).
#[test]
fn an_io_error_in_a_removal_leaves_a_file_system_that_mounts() {
    use blobstore::IoKind;
    let keep = pattern(11, 70_000);
    let gone = pattern(12, 9000);
    let mut errors = 0;
    for dir in [true, false] {
        for kind in [IoKind::Write, IoKind::Flush] {
            for n in 1.. {
                let (fault, dev, fs) = fault_fs();
                let f = fs.create("keep").unwrap();
                f.append(&keep).unwrap();
                f.close().unwrap();
                fs.create_dir("d").unwrap();
                let f = fs.create("f").unwrap();
                f.append(&gone).unwrap();
                f.close().unwrap();
                let name = if dir { "d" } else { "f" };
                fault.fail_nth(kind, n);
                let res = if dir {
                    fs.remove_dir(name)
                } else {
                    fs.remove_file(name)
                };
                fault.clear_failures();
                if fault.injected_failures() == 0 {
                    res.unwrap();
                    break;
                }
                errors += usize::from(res.is_err());
                let what = format!("remove {name}, {kind:?} {n} fails ({res:?})");
                let crash = fault.crash_image().unwrap();
                fs.unmount()
                    .unwrap_or_else(|e| panic!("{what}: unmount: {e}"));
                let report =
                    blobfs::fsck::fsck(dev.clone()).unwrap_or_else(|e| panic!("{what}: fsck: {e}"));
                assert!(report.is_clean(), "{what}: {:?}", report.findings);
                let crashed: Arc<dyn BlockDevice> = Arc::new(crash.to_device(n).unwrap());
                for (dev, when) in [(dev, "unmounted"), (crashed, "crashed")] {
                    let fs = BlobFs::mount(dev, MountOptions::default())
                        .unwrap_or_else(|e| panic!("{what}, {when}: mount: {e}"));
                    assert_eq!(contents(&fs, "keep"), keep, "{what}, {when}");
                    if fs.exists(name) {
                        assert!(res.is_err(), "{what}, {when}: removed, and back");
                        if !dir {
                            assert_eq!(contents(&fs, name), gone, "{what}, {when}");
                        }
                    }
                    fs.unmount().unwrap();
                }
            }
        }
    }
    assert!(errors > 0);
}

/// Device writes and flushes so far.
fn device_io(dev: &Arc<dyn BlockDevice>) -> (u64, u64) {
    let m = blobstore::device::device_metrics(dev.id());
    (m.writes.count, m.flushes.count)
}

/// A sync on a shared-memory device (`shm:`, whose blocks live exactly as
/// long as the mount's unsynced memory) writes nothing, as tmpfs's fsync,
/// and the appends still survive a mount that dies without unmounting; on a
/// heap device (whose blocks outlive the mount's memory) the same sync
/// writes the data and the length.
#[test]
fn a_sync_on_shared_memory_writes_nothing_and_loses_nothing() {
    let path = format!("/dev/shm/blobfs-test-volatile-{}.img", std::process::id());
    let spec = format!("shm:{path}?size=64M&create=true");
    let open = || blobstore::device::open_device(&spec).unwrap();
    let dev = open();
    assert!(dev.volatile());
    let unsynced = dev.unsynced_memory();
    let fs = mkfs(&dev, MountOptions::default());
    let f = fs.create("wal").unwrap();
    let a = pattern(7, 300_000);
    f.append(&a).unwrap();
    let before = device_io(&dev);
    f.sync().unwrap();
    assert_eq!(device_io(&dev), before, "the sync wrote to the device");
    f.append(&a[..1000]).unwrap();
    f.sync().unwrap();
    drop(f);
    drop(fs); // dies without unmounting
    drop(dev);
    let dev = open();
    let fs = BlobFs::mount(dev.clone(), MountOptions::default()).unwrap();
    assert_eq!(fs.unsynced_recovery().files, 1);
    let mut want = a.clone();
    want.extend_from_slice(&a[..1000]);
    assert_eq!(contents(&fs, "wal"), want);
    fs.unmount().unwrap();
    drop(dev);
    let _ = std::fs::remove_file(&path);
    if let Some(p) = unsynced {
        let _ = std::fs::remove_file(p);
    }

    let dev = mem(4096, 64 << 20);
    assert!(!dev.volatile());
    let fs = mkfs(&dev, MountOptions::default());
    let f = fs.create("wal").unwrap();
    f.append(&a).unwrap();
    let before = device_io(&dev);
    f.sync().unwrap();
    let after = device_io(&dev);
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "{before:?} {after:?}"
    );
}
