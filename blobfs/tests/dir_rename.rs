//! Directory rename: POSIX `rename(2)` semantics, open handles and locks
//! across it, and crash atomicity. A power cut (every device operation of
//! the rename captured, with torn and reordered unflushed pages), a killed
//! process (the device stops at every operation, everything submitted
//! before it kept) and an I/O error at every write and flush must each
//! leave, at the next mount, the whole tree under its old name or under
//! its new one: never split, never an entry lost or shown twice.

use std::collections::BTreeMap;
use std::sync::Arc;

use blobfs::fsck::{fsck, Severity};
use blobfs::{meta, BlobFs, Error, MkfsOptions, MountOptions, OpenOptions};
use blobstore::testing::FaultDevice;
use blobstore::{block_on, BlobId, Blobstore, BlockDevice, IoKind, LoadOptions, MemDevice};

/// Bytes that differ from file to file (`seed`) and from offset to offset.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (i.wrapping_mul(2 * seed + 1).rotate_right(7) ^ seed) as u8)
        .collect()
}

/// Runs `f` on the blobstore of `dev` (the file system unmounted), as a
/// crash or damage would leave it, then unloads it.
fn with_store<T>(dev: &Arc<dyn BlockDevice>, f: impl FnOnce(&Blobstore) -> T) -> T {
    let bs = block_on(Blobstore::load(
        dev.clone(),
        LoadOptions {
            bstype: meta::BSTYPE.into(),
        },
    ))
    .unwrap();
    let out = f(&bs);
    block_on(bs.unload()).unwrap();
    out
}

/// Sets xattr `key` of blob `id` to `value`, durably; returns the old value.
fn set_xattr(bs: &Blobstore, id: BlobId, key: &str, value: &[u8]) -> Option<Vec<u8>> {
    let b = block_on(bs.open_blob(id)).unwrap();
    let old = b.get_xattr(key);
    b.set_xattr(key, value).unwrap();
    block_on(b.close()).unwrap();
    old
}

fn mem(block: u32) -> Arc<dyn BlockDevice> {
    Arc::new(MemDevice::new(16 << 20, block).unwrap())
}

fn mkfs(dev: Arc<dyn BlockDevice>) -> BlobFs {
    BlobFs::mkfs(
        dev,
        MkfsOptions {
            cluster_size: 64 << 10,
            md_pages: Some(128),
            ..Default::default()
        },
        MountOptions::default(),
    )
    .unwrap()
}

/// Every name of the file system: `None` for a directory, else the bytes.
type Tree = BTreeMap<String, Option<Vec<u8>>>;

fn tree(fs: &BlobFs) -> Tree {
    fs.list("")
        .into_iter()
        .map(|n| {
            let data = if fs.stat(&n).unwrap().is_dir {
                None
            } else {
                Some(
                    fs.open(&n, OpenOptions::read())
                        .unwrap()
                        .read_all()
                        .unwrap(),
                )
            };
            (n, data)
        })
        .collect()
}

/// The tree under test, relative to its directory: nested directories
/// (one empty), files of a few sizes, one empty.
fn subtree() -> Tree {
    let mut t = Tree::new();
    t.insert("a".into(), Some(pattern(1, 5_000)));
    t.insert("e".into(), None);
    t.insert("s".into(), None);
    t.insert("s/b".into(), Some(pattern(2, 70_000)));
    t.insert("s/c".into(), Some(Vec::new()));
    t.insert("s/u".into(), None);
    t.insert("s/u/deep".into(), Some(pattern(3, 1)));
    t
}

/// Makes `t` (holding [`subtree`]), a file `keep` beside it, and, when
/// `target_dir`, an empty directory `dst`; all synced.
fn build(fs: &BlobFs, target_dir: bool) {
    fs.create_dir("t").unwrap();
    for (n, data) in subtree() {
        let n = format!("t/{n}");
        match data {
            None => fs.create_dir(&n).unwrap(),
            Some(d) => {
                let f = fs.create(&n).unwrap();
                f.append(&d).unwrap();
                f.close().unwrap();
            }
        }
    }
    let f = fs.create("keep").unwrap();
    f.append(b"outside").unwrap();
    f.close().unwrap();
    if target_dir {
        fs.create_dir("dst").unwrap();
    }
}

/// The whole file system with the tree under `root`; `dst` is there, empty,
/// when it is a target that was not replaced.
fn expected(root: &str, empty_dst: bool) -> Tree {
    let mut t: Tree = subtree()
        .into_iter()
        .map(|(n, d)| (format!("{root}/{n}"), d))
        .collect();
    t.insert(root.into(), None);
    t.insert("keep".into(), Some(b"outside".to_vec()));
    if empty_dst {
        t.insert("dst".into(), None);
    }
    t
}

/// Which side of the rename of `t` to `to` the file system shows: "old"
/// or "new", or what is wrong.
fn side(fs: &BlobFs, to: &str) -> Result<&'static str, String> {
    let got = tree(fs);
    let target_dir = to == "dst";
    if got == expected("t", target_dir) {
        Ok("old")
    } else if got == expected(to, false) {
        Ok("new")
    } else {
        let names: Vec<&String> = got.keys().collect();
        Err(format!("neither the old nor the new tree: {names:?}"))
    }
}

const BLOCKS: [u32; 2] = [4096, 512];

#[test]
fn directory_rename_follows_posix() {
    let dev = mem(4096);
    let fs = mkfs(dev.clone());
    build(&fs, false);
    let blobs0 = fs.blobstore().blob_ids().len();
    // Into itself or below itself.
    for to in ["t/s", "t/s/u/x", "t/new"] {
        match fs.rename("t", to) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("into itself"), "{m}"),
            other => panic!("rename t {to}: {other:?}"),
        }
    }
    assert!(matches!(
        fs.rename("t/s", "t/s/u/s"),
        Err(Error::InvalidArgument(_))
    ));
    // To itself: nothing happens.
    fs.rename("t", "/t/").unwrap();
    assert_eq!(tree(&fs), expected("t", false));
    // Onto a file, onto a non-empty directory, under a missing or file parent.
    assert!(matches!(fs.rename("t", "keep"), Err(Error::NotADirectory(n)) if n == "keep"));
    fs.create_dir("full").unwrap();
    fs.create("full/x").unwrap();
    assert!(matches!(fs.rename("t", "full"), Err(Error::DirectoryNotEmpty(n)) if n == "full"));
    assert!(matches!(fs.rename("t", "nope/t"), Err(Error::NotFound(n)) if n == "nope"));
    assert!(matches!(fs.rename("t", "keep/t"), Err(Error::NotADirectory(n)) if n == "keep"));
    assert!(matches!(
        fs.rename("keep", "t"),
        Err(Error::IsADirectory(_))
    ));
    assert!(matches!(fs.rename("gone", "g2"), Err(Error::NotFound(_))));
    // A rename that would make a name below too long is refused whole.
    let long = "L".repeat(255);
    let deep = format!("a/{long}/{long}/{long}");
    let file = format!("{deep}/{}", "f".repeat(250));
    assert_eq!(file.len(), 1020);
    fs.create_dir_all(&deep).unwrap();
    fs.create(&file).unwrap();
    match fs.rename("a", "abcdefgh") {
        Err(Error::InvalidName { name, .. }) => assert_eq!(name.len(), 1027),
        other => panic!("{other:?}"),
    }
    assert!(fs.exists(&file) && !fs.exists("abcdefgh"));
    fs.remove_file(&file).unwrap();
    for d in [
        deep.clone(),
        format!("a/{long}/{long}"),
        format!("a/{long}"),
        "a".into(),
    ] {
        fs.remove_dir(&d).unwrap();
    }
    fs.remove_file("full/x").unwrap();
    fs.remove_dir("full").unwrap();
    assert_eq!(tree(&fs), expected("t", false));
    assert_eq!(fs.blobstore().blob_ids().len(), blobs0);

    // A plain move: everything below goes along.
    fs.rename("t", "n").unwrap();
    assert_eq!(tree(&fs), expected("n", false));
    let entries: Vec<(String, bool)> = fs
        .read_dir("n/s")
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.is_dir))
        .collect();
    assert_eq!(
        entries,
        vec![("b".into(), false), ("c".into(), false), ("u".into(), true)]
    );
    assert!(matches!(fs.read_dir("t"), Err(Error::NotFound(_))));
    // Over an empty directory, which goes (its blob too).
    fs.create_dir("dst").unwrap();
    fs.rename("n", "dst").unwrap();
    assert_eq!(tree(&fs), expected("dst", false));
    assert_eq!(fs.blobstore().blob_ids().len(), blobs0);
    // Down into another directory, and a sub-directory up to the top.
    fs.create_dir("p").unwrap();
    fs.rename("dst", "p/q").unwrap();
    fs.rename("p/q/s", "s2").unwrap();
    assert!(fs.exists("s2/u/deep") && !fs.exists("p/q/s"));
    fs.rename("s2", "p/q/s").unwrap();
    fs.rename("p/q", "t").unwrap();
    fs.remove_dir("p").unwrap();
    assert_eq!(tree(&fs), expected("t", false));
    fs.rename("t", "final").unwrap();
    fs.unmount().unwrap();

    // The new tree is what the device holds; nothing for fsck to say.
    let r = fsck(dev.clone()).unwrap();
    assert!(r.findings.is_empty(), "{:?}", r.findings);
    assert_eq!(r.interrupted_renames, 0);
    let fs = BlobFs::mount(dev, MountOptions::default()).unwrap();
    assert_eq!(tree(&fs), expected("final", false));
    fs.unmount().unwrap();
}

#[test]
fn open_handles_and_locks_follow_a_directory_rename() {
    let dev = mem(4096);
    let fs = mkfs(dev.clone());
    fs.create_dir_all("db/sub").unwrap();
    let w = fs.create("db/sub/log").unwrap();
    let mut want = pattern(7, 300_000);
    w.append(&want).unwrap();
    w.sync().unwrap();
    w.append(&pattern(8, 5_000)).unwrap(); // unsynced across the rename
    want.extend(pattern(8, 5_000));
    let r = fs.create("db/ro").unwrap();
    r.append(b"read me").unwrap();
    r.close().unwrap();
    let r = fs.open("db/ro", OpenOptions::read()).unwrap();
    fs.create("db/LOCK").unwrap();
    let l = fs.lock("db/LOCK").unwrap();
    let other = fs.lock("elsewhere").unwrap();

    fs.rename("db", "db2").unwrap();

    assert_eq!(w.name(), "db2/sub/log");
    assert_eq!(r.name(), "db2/ro");
    assert_eq!(r.read_all().unwrap(), b"read me");
    assert_eq!(w.read_all().unwrap(), want);
    // Writes, syncs and truncates after it land under the new name.
    w.append(&pattern(9, 100_000)).unwrap();
    want.extend(pattern(9, 100_000));
    w.sync().unwrap();
    w.truncate(200_000).unwrap();
    want.truncate(200_000);
    w.append(b"tail").unwrap();
    want.extend(b"tail");
    assert_eq!(w.read_all().unwrap(), want);
    assert_eq!(
        fs.open("db2/sub/log", OpenOptions::read())
            .unwrap()
            .read_all()
            .unwrap(),
        want
    );
    // The lock moved with its file: the new name is held, the old is free.
    assert_eq!(l.name(), "db2/LOCK");
    assert!(matches!(fs.lock("db2/LOCK"), Err(Error::Locked(n)) if n == "db2/LOCK"));
    drop(fs.lock("db/LOCK").unwrap());
    assert_eq!(other.name(), "elsewhere");
    // A file rename moves it too (and only it).
    let beside = fs.lock("db2/LOCK/x").unwrap();
    fs.rename("db2/LOCK", "db2/LOCK.old").unwrap();
    assert_eq!(l.name(), "db2/LOCK.old");
    assert_eq!(beside.name(), "db2/LOCK/x");
    drop(beside);
    drop(l);
    drop(fs.lock("db2/LOCK.old").unwrap());
    // A directory rename while the file keeps unsynced bytes, then a crash
    // of the process (no unmount): the synced part is under the new name.
    w.sync().unwrap();
    fs.rename("db2", "db3").unwrap();
    assert_eq!(w.name(), "db3/sub/log");
    w.close().unwrap();
    drop((r, other));
    drop(fs);
    let fs = BlobFs::mount(dev.clone(), MountOptions::default()).unwrap();
    assert_eq!(
        fs.list(""),
        ["db3", "db3/LOCK.old", "db3/ro", "db3/sub", "db3/sub/log"]
    );
    assert_eq!(
        fs.open("db3/sub/log", OpenOptions::read())
            .unwrap()
            .read_all()
            .unwrap(),
        want
    );
    fs.unmount().unwrap();
}

/// Power cuts at every device operation of the rename of `t` to `to`:
/// returns (crash images, images that showed the new tree, images whose
/// fsck reported an interrupted rename).
fn power_cuts(block: u32, to: &str) -> (usize, usize, usize) {
    const SEEDS: u64 = 3;
    let fault = Arc::new(FaultDevice::new(mem(block)).unwrap());
    let fs = mkfs(fault.clone());
    build(&fs, to == "dst");
    let op0 = fault.op_count();
    fault.capture_at((op0 + 1..op0 + 4000).collect()).unwrap();
    fs.rename("t", to).unwrap();
    let mut images = fault.take_captures();
    assert!(images.len() > 10, "{} ops", images.len());
    images.push((fault.op_count() + 1, fault.crash_image().unwrap()));
    drop(fs);
    let (mut new, mut marked) = (0, 0);
    let mut committed = false;
    let last = images.len() - 1;
    for (i, (op, img)) in images.iter().enumerate() {
        let mut sides = Vec::new();
        for seed in 0..SEEDS {
            let what = format!("block {block}, rename to {to}, crash before op {op}, seed {seed}");
            let dev: Arc<dyn BlockDevice> = Arc::new(img.to_device(seed).unwrap());
            let r = fsck(dev.clone()).unwrap();
            assert!(r.is_clean(), "{what}: fsck: {:?}", r.findings);
            if r.interrupted_renames > 0 {
                marked += 1;
                assert!(r.findings.iter().any(|f| f.severity == Severity::Warning
                    && f.what.contains("interrupted rename of directory \"t\"")));
            }
            let fs = BlobFs::mount(dev.clone(), MountOptions::default()).unwrap();
            let s = side(&fs, to).unwrap_or_else(|e| panic!("{what}: {e}"));
            fs.unmount().unwrap();
            // What the mount finished is durable: a second mount agrees,
            // and nothing is left for fsck to report.
            let r = fsck(dev.clone()).unwrap();
            assert!(
                r.findings.is_empty(),
                "{what}: after mount: {:?}",
                r.findings
            );
            let fs = BlobFs::mount(dev, MountOptions::default()).unwrap();
            assert_eq!(side(&fs, to), Ok(s), "{what}: second mount");
            fs.unmount().unwrap();
            sides.push(s);
        }
        new += sides.iter().filter(|s| **s == "new").count();
        if i == 0 {
            assert!(sides.iter().all(|s| *s == "old"), "before the rename");
        }
        if i == last {
            assert!(sides.iter().all(|s| *s == "new"), "after the rename");
        }
        // Once the new tree is durable (no write pending), no later crash
        // may bring the old one back.
        if committed {
            assert!(sides.iter().all(|s| *s == "new"), "op {op}: went back");
        }
        committed |= img.pending_writes() == 0 && sides.iter().all(|s| *s == "new");
    }
    (images.len() * SEEDS as usize, new, marked)
}

#[test]
fn power_loss_at_every_operation_of_a_directory_rename() {
    for block in BLOCKS {
        for to in ["n", "dst"] {
            let (images, new, marked) = power_cuts(block, to);
            println!(
                "block {block}, rename t -> {to}: {images} crash images, {new} with the new \
                 tree, {marked} with the rename interrupted (fsck)"
            );
            assert!(new > 0 && new < images, "both outcomes occur");
            assert!(marked > 0, "some crashes interrupt the rename");
        }
    }
}

/// Device operations a rename of `t` to `to` takes on a fresh tree.
fn rename_ops(block: u32, to: &str) -> u64 {
    let fault = Arc::new(FaultDevice::new(mem(block)).unwrap());
    let fs = mkfs(fault.clone());
    build(&fs, to == "dst");
    let op0 = fault.op_count();
    fs.rename("t", to).unwrap();
    fault.op_count() - op0
}

#[test]
fn killed_process_at_every_operation_of_a_directory_rename() {
    for block in BLOCKS {
        for to in ["n", "dst"] {
            let ops = rename_ops(block, to);
            let mut outcomes = BTreeMap::new();
            for k in 1..=ops + 1 {
                let fault = Arc::new(FaultDevice::new(mem(block)).unwrap());
                let fs = mkfs(fault.clone());
                build(&fs, to == "dst");
                // The device stops at the rename's k-th operation: the
                // rename fails there, the process dies with it, and what
                // it had submitted stays (as in the page cache).
                fault.crash_after(k);
                let res = fs.rename("t", to);
                drop(fs);
                let dev = fault.inner().clone();
                let what = format!("block {block}, rename to {to}, killed at op {k}");
                let r = fsck(dev.clone()).unwrap();
                assert!(r.is_clean(), "{what}: {:?}", r.findings);
                let fs = BlobFs::mount(dev, MountOptions::default()).unwrap();
                let s = side(&fs, to).unwrap_or_else(|e| panic!("{what}: {e}"));
                if res.is_ok() {
                    assert_eq!(s, "new", "{what}: the rename returned Ok");
                }
                *outcomes.entry(s).or_insert(0) += 1;
                fs.unmount().unwrap();
            }
            println!("block {block}, rename t -> {to}: {ops} operations, {outcomes:?}");
            assert!(outcomes.len() == 2, "{outcomes:?}");
        }
    }
}

#[test]
fn io_error_at_every_write_and_flush_of_a_directory_rename() {
    for to in ["n", "dst"] {
        for kind in [IoKind::Write, IoKind::Flush] {
            let mut outcomes = BTreeMap::new();
            for n in 1.. {
                let fault = Arc::new(FaultDevice::new(mem(4096)).unwrap());
                let fs = mkfs(fault.clone());
                build(&fs, to == "dst");
                fault.fail_nth(kind, n);
                let res = fs.rename("t", to);
                if fault.injected_failures() == 0 {
                    res.unwrap();
                    break;
                }
                fault.clear_failures();
                let what = format!("rename to {to}, {kind:?} {n} fails");
                // In memory: all or nothing, and done when it said Ok.
                let s = side(&fs, to).unwrap_or_else(|e| panic!("{what}: {e}"));
                if res.is_ok() {
                    assert_eq!(s, "new", "{what}");
                }
                *outcomes.entry((s, res.is_ok())).or_insert(0) += 1;
                // The unmount finishes what the error left; the device then
                // holds what memory showed, with no marker left.
                fs.unmount()
                    .unwrap_or_else(|e| panic!("{what}: unmount: {e}"));
                let r = fsck(fault.clone()).unwrap_or_else(|e| panic!("{what}: fsck: {e}"));
                assert!(r.is_clean(), "{what}: {:?}", r.findings);
                assert_eq!(r.interrupted_renames, 0, "{what}: {:?}", r.findings);
                let fs = BlobFs::mount(fault.clone(), MountOptions::default()).unwrap();
                assert_eq!(side(&fs, to), Ok(s), "{what}: after remount");
                fs.unmount().unwrap();
            }
            println!("rename t -> {to}, {kind:?} errors: {outcomes:?}");
            assert!(
                outcomes.contains_key(&("old", false)) && outcomes.contains_key(&("new", false)),
                "errors before and after the commit point: {outcomes:?}"
            );
        }
    }
}

#[test]
fn an_error_after_the_commit_is_finished_by_the_next_directory_rename() {
    // The first flush that fails after the commit point.
    let (fault, fs) = (1..)
        .find_map(|n| {
            let fault = Arc::new(FaultDevice::new(mem(4096)).unwrap());
            let fs = mkfs(fault.clone());
            build(&fs, false);
            fault.fail_nth(IoKind::Flush, n);
            let failed = fs.rename("t", "n").is_err();
            assert!(fault.injected_failures() == 1, "no error after the commit");
            (failed && side(&fs, "n") == Ok("new")).then_some((fault, fs))
        })
        .unwrap();
    // The marker is still on the device; a crash now would be rolled
    // forward. The next directory rename finishes it first.
    fs.create_dir("x").unwrap();
    fs.rename("x", "y").unwrap();
    fs.create_dir("t").unwrap(); // the old name, free again
    drop(fs); // a crash: nothing unmounted
    let r = fsck(fault.clone()).unwrap();
    assert_eq!(r.interrupted_renames, 0, "{:?}", r.findings);
    let fs = BlobFs::mount(fault.clone(), MountOptions::default()).unwrap();
    let mut want = expected("n", false);
    want.insert("t".into(), None);
    want.insert("y".into(), None);
    assert_eq!(tree(&fs), want);
    fs.unmount().unwrap();
}

/// A mount that finds a directory rename's marker moves only what was
/// below the old name before the rename: a directory made under the old
/// name afterwards (a higher `fs.seq`) stays where it is.
#[test]
fn mount_finishes_a_marked_rename_and_leaves_newer_names_alone() {
    let dev = mem(4096);
    let fs = mkfs(dev.clone());
    build(&fs, false);
    fs.rename("t", "n").unwrap();
    fs.create_dir("t").unwrap();
    fs.create("t/new").unwrap();
    let dir = fs.stat("n").unwrap().blob_id;
    let back: Vec<(BlobId, String)> = fs
        .list("n/")
        .into_iter()
        .map(|n| (fs.stat(&n).unwrap().blob_id, n.replacen("n/", "t/", 1)))
        .collect();
    fs.unmount().unwrap();
    // Undo the entries' renames on the device and set the marker, as a
    // crash right after the commit point leaves them.
    let seq = with_store(&dev, |bs| {
        for (id, old) in &back {
            set_xattr(bs, *id, meta::NAME, old.as_bytes());
        }
        let b = block_on(bs.open_blob(dir)).unwrap();
        let seq = meta::dec_u64(b.get_xattr(meta::SEQ), meta::SEQ, "n").unwrap();
        drop(b);
        set_xattr(bs, dir, meta::MOVED_FROM, &meta::enc_moved_from(seq, "t"));
        seq
    });

    let r = fsck(dev.clone()).unwrap();
    assert!(r.is_clean(), "{:?}", r.findings);
    assert_eq!(r.interrupted_renames, 1);
    let warn: Vec<String> = r.findings.iter().map(|f| f.to_string()).collect();
    assert!(
        warn.iter().any(|w| w.contains(&format!(
            "n: an interrupted rename of directory \"t\" (fs.moved_from {seq}): {} entries",
            back.len()
        ))),
        "{warn:?}"
    );
    assert_eq!((r.files, r.dirs), (6, 5), "{warn:?}");
    let fs = BlobFs::mount(dev.clone(), MountOptions::default()).unwrap();
    let mut want = expected("n", false);
    want.insert("t".into(), None);
    want.insert("t/new".into(), Some(Vec::new()));
    assert_eq!(tree(&fs), want);
    fs.unmount().unwrap();
    assert!(fsck(dev).unwrap().findings.is_empty());
}

#[test]
fn a_bad_rename_marker_is_damage_not_a_panic() {
    for (on_file, value) in [
        (true, meta::enc_moved_from(1, "t")),
        (false, vec![1, 2, 3]),
        (false, meta::enc_moved_from(1, "a//b")),
        (false, meta::enc_moved_from(1, "")),
    ] {
        let dev = mem(4096);
        let fs = mkfs(dev.clone());
        build(&fs, false);
        let id = fs
            .stat(if on_file { "keep" } else { "t/s" })
            .unwrap()
            .blob_id;
        fs.unmount().unwrap();
        with_store(&dev, |bs| set_xattr(bs, id, meta::MOVED_FROM, &value));
        let r = fsck(dev.clone()).unwrap();
        assert!(
            r.findings
                .iter()
                .any(|f| f.severity == Severity::Damage && f.what.contains(meta::MOVED_FROM)),
            "{:?}",
            r.findings
        );
        match BlobFs::mount(dev, MountOptions::default()) {
            Err(Error::Corrupt(m)) => assert!(m.contains(meta::MOVED_FROM), "{m}"),
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("mounted with a bad marker {value:?}"),
        }
    }
}
