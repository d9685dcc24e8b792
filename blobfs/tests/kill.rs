//! A killed process loses no acknowledged write (POSIX's promise: the page
//! cache outlives the process). A child process writes files without
//! syncing them, through every path that moves unsynced bytes around
//! (write-behind of full buffers, a sync in the middle, a rename, a
//! rename of the directory above an open file, a truncate, a write below
//! the buffer, a delete) and kills itself with
//! SIGKILL; the test mounts the image again and checks every byte and every
//! length. Then: buffers of an earlier mount, or of another file system on
//! the same image, are ignored and said so, never applied.
//!
//! The child is this test binary again (`BLOBFS_KILL_CHILD` says what to
//! do, `BLOBFS_KILL_IMAGE` where).
//!
//! `BLOBFS_KILL_DEVICE=<device spec>` runs the first test on that device
//! instead of an image file: the VM test runs it on an NVMe namespace
//! (`nvme:<pci>/ns=<n>`), where the unsynced memory is hugepages mapped for
//! the controller and the child dies with the controller's queues live.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use blobfs::{BlobFs, MkfsOptions, MountOptions, OpenOptions};
use blobstore::{BlockDevice, FileDevice, FileOptions};

const CHILD_ENV: &str = "BLOBFS_KILL_CHILD";
const IMAGE_ENV: &str = "BLOBFS_KILL_IMAGE";
const DEVICE_ENV: &str = "BLOBFS_KILL_DEVICE";

/// Deterministic bytes of file `seed` at offsets `[from, from + len)`.
fn pattern(seed: u8, from: u64, len: usize) -> Vec<u8> {
    (from..from + len as u64)
        .map(|i| {
            let x = i.wrapping_mul(2_654_435_761) ^ (u64::from(seed) << 17) ^ (i >> 13);
            (x ^ (x >> 7)) as u8
        })
        .collect()
}

/// The image file at `img`, or the device `img` names when it is a device
/// spec ([`DEVICE_ENV`]).
fn open_dev(img: &Path) -> Arc<dyn BlockDevice> {
    if !img.is_absolute() {
        return blobstore::device::open_device(&img.to_string_lossy()).unwrap();
    }
    Arc::new(
        FileDevice::open(
            img,
            FileOptions {
                size_bytes: Some(256 << 20),
                create: Some(true),
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

/// Appends `len` bytes of file `seed`'s pattern in uneven pieces.
fn append(f: &blobfs::File, seed: u8, len: usize) {
    let mut at = f.len();
    let end = at + len as u64;
    let mut piece = 1;
    while at < end {
        let n = (piece * 7919 % 300_000 + 1).min((end - at) as usize);
        f.append(&pattern(seed, at, n)).unwrap();
        at += n as u64;
        piece += 1;
    }
}

/// What the child leaves, as the model the parent checks: name -> bytes.
fn child_work(fs: &BlobFs) -> BTreeMap<String, Vec<u8>> {
    let mut want = BTreeMap::new();
    let open = |name: &str| fs.open(name, OpenOptions::create_truncate()).unwrap();
    // Three write-behinds and a partial buffer, never synced.
    let a = open("a");
    append(&a, 1, 13 << 20);
    want.insert("a".to_string(), pattern(1, 0, 13 << 20));
    // Synced, then a little more in the same buffer.
    let b = open("b");
    append(&b, 2, 100_000);
    b.sync().unwrap();
    append(&b, 2, 3_000);
    want.insert("b".into(), pattern(2, 0, 103_000));
    // A sync mid-buffer, then a spill of a buffer with a clean prefix.
    let c = open("c");
    append(&c, 3, 3 << 20);
    c.sync().unwrap();
    append(&c, 3, (3 << 20) + 777);
    want.insert("c".into(), pattern(3, 0, (6 << 20) + 777));
    // A rename while unsynced, and more appends after it.
    fs.create_dir("d").unwrap();
    let old = open("d/old");
    append(&old, 4, 50_000);
    fs.rename("d/old", "d/new").unwrap();
    append(&old, 4, 10_001);
    want.insert("d/new".into(), pattern(4, 0, 60_001));
    // A directory renamed under an open, unsynced file (with a write-behind
    // before and a partial buffer after), and its old name made again.
    fs.create_dir_all("m/sub").unwrap();
    let moved = open("m/sub/f");
    append(&moved, 8, 5 << 20);
    fs.rename("m", "n").unwrap();
    append(&moved, 8, 7_777);
    fs.create_dir("m").unwrap();
    want.insert("n/sub/f".into(), pattern(8, 0, (5 << 20) + 7_777));
    // A truncate between appends.
    let t = open("t");
    append(&t, 5, 2 << 20);
    t.truncate((1 << 20) + 123).unwrap();
    append(&t, 5, 5_000);
    want.insert("t".into(), pattern(5, 0, (1 << 20) + 5_123));
    // A write below the buffer, then appends.
    let w = open("w");
    append(&w, 6, 5 << 20);
    let patch = vec![0xA5u8; 100];
    w.write_at(1_000, &patch).unwrap();
    append(&w, 6, 4_321);
    let mut wb = pattern(6, 0, (5 << 20) + 4_321);
    wb[1_000..1_100].copy_from_slice(&patch);
    want.insert("w".into(), wb);
    // Unsynced, then deleted: must not come back.
    let gone = open("gone");
    append(&gone, 7, 1 << 20);
    drop(gone);
    fs.remove_file("gone").unwrap();
    // An empty file.
    drop(open("empty"));
    want.insert("empty".into(), Vec::new());
    // Keep every handle open (a crash does not close files).
    std::mem::forget((a, b, c, old, moved, t, w));
    want
}

fn check(fs: &BlobFs, want: &BTreeMap<String, Vec<u8>>) {
    let mut names: Vec<String> = fs
        .list("")
        .into_iter()
        .filter(|n| !fs.stat(n).unwrap().is_dir)
        .collect();
    names.sort();
    assert_eq!(names, want.keys().cloned().collect::<Vec<_>>(), "files");
    for (name, bytes) in want {
        let f = fs.open(name, OpenOptions::read()).unwrap();
        assert_eq!(f.len(), bytes.len() as u64, "length of {name}");
        let got = f.read_all().unwrap();
        if let Some(i) = got.iter().zip(bytes).position(|(a, b)| a != b) {
            panic!("{name}: byte {i} is {:#x}, want {:#x}", got[i], bytes[i]);
        }
    }
}

fn run_child(job: &str, test: &str, img: &Path) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, job)
        .env(IMAGE_ENV, img)
        .output()
        .unwrap()
}

/// In the child: do the job, print the model's size, and die by SIGKILL.
fn maybe_child() {
    let (Ok(job), Ok(img)) = (std::env::var(CHILD_ENV), std::env::var(IMAGE_ENV)) else {
        return;
    };
    if job == "mkfs" {
        format(Path::new(&img));
        std::process::exit(0);
    }
    let dev = open_dev(Path::new(&img));
    let fs = BlobFs::mount(dev, MountOptions::default()).unwrap();
    match job.as_str() {
        "work" => {
            let want = child_work(&fs);
            println!("child: {} files written, killing myself", want.len());
        }
        "one" => {
            let f = fs.open("s", OpenOptions::create_truncate()).unwrap();
            append(&f, 9, 300_000);
            std::mem::forget(f);
            println!("child: wrote s, killing myself");
        }
        other => panic!("unknown child job {other}"),
    }
    // SAFETY: sending a signal to this process; nothing after it runs.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    unreachable!("SIGKILL");
}

fn image(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("blobfs-kill-{name}-{}.img", std::process::id()))
}

/// A fresh BlobFS on `img`. On a device (not an image file) in a child
/// process: an NVMe controller stays attached to the process that opened
/// it (its VFIO group) for that process's life, and the child that is
/// killed must open it next.
fn mkfs(img: &Path, test: &str) {
    if img.is_absolute() {
        let _ = std::fs::remove_file(img);
        format(img);
    } else {
        let out = run_child("mkfs", test, img);
        assert!(
            out.status.success(),
            "mkfs child: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn format(img: &Path) {
    BlobFs::mkfs(
        open_dev(img),
        MkfsOptions {
            // A device is reused from run to run.
            force: !img.is_absolute(),
            ..MkfsOptions::default()
        },
        MountOptions::default(),
    )
    .unwrap()
    .unmount()
    .unwrap();
}

fn killed(out: &std::process::Output) {
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "child must die by SIGKILL: {:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn unsynced_path(img: &Path) -> PathBuf {
    if !img.is_absolute() {
        return open_dev(img)
            .unsynced_memory()
            .expect("a device with unsynced memory");
    }
    blobstore::device::unsynced_memory_path_of(img).unwrap()
}

#[test]
fn a_killed_process_loses_no_acknowledged_write() {
    maybe_child();
    let img = std::env::var(DEVICE_ENV).map_or_else(|_| image("work"), PathBuf::from);
    let test = "a_killed_process_loses_no_acknowledged_write";
    mkfs(&img, test);
    let out = run_child("work", test, &img);
    killed(&out);
    assert!(
        unsynced_path(&img).exists(),
        "the child left its unsynced memory"
    );
    eprintln!("unsynced memory: {}", unsynced_path(&img).display());
    // The same model the child built (it is deterministic).
    let want = {
        let scratch = BlobFs::mkfs(
            Arc::new(blobstore::MemDevice::new(256 << 20, 4096).unwrap()),
            MkfsOptions::default(),
            MountOptions::default(),
        )
        .unwrap();
        child_work(&scratch)
    };
    // fsck, which does not mount, lists what the next mount writes back.
    let report = blobfs::fsck::fsck(open_dev(&img)).unwrap();
    assert!(report.is_clean(), "{:?}", report.findings);
    assert!(report.unsynced_buffers >= 6, "{:?}", report.findings);
    assert!(report
        .findings
        .iter()
        .any(|f| f.what.contains("the next mount writes them back")));
    let fs = BlobFs::mount(open_dev(&img), MountOptions::default()).unwrap();
    let rep = fs.unsynced_recovery().clone();
    eprintln!("{rep}");
    assert_eq!(rep.buffers, report.unsynced_buffers, "{rep}");
    assert_eq!(rep.bytes, report.unsynced_bytes, "{rep}");
    assert!(rep.ignored.is_empty(), "nothing is stale: {rep}");
    assert!(rep.files >= 6 && rep.bytes > 0, "{rep}");
    check(&fs, &want);
    assert!(!fs.exists("gone") && !fs.exists("d/old"));
    fs.unmount().unwrap();
    assert!(
        !unsynced_path(&img).exists(),
        "a clean unmount leaves no unsynced memory"
    );
    // What was written back is durable: a second mount finds it all and
    // nothing to write back.
    let fs = BlobFs::mount(open_dev(&img), MountOptions::default()).unwrap();
    assert_eq!(fs.unsynced_recovery().files, 0);
    check(&fs, &want);
    fs.unmount().unwrap();
    if img.is_absolute() {
        std::fs::remove_file(&img).unwrap();
    }
}

#[test]
fn stale_or_foreign_unsynced_memory_is_never_applied() {
    maybe_child();
    let img = image("stale");
    let test = "stale_or_foreign_unsynced_memory_is_never_applied";
    mkfs(&img, test);
    killed(&run_child("one", test, &img));
    let mem = unsynced_path(&img);
    // Set aside as it is: a sparse file (16 GiB long, a few MiB in use).
    let saved = mem.with_extension("saved");
    copy_sparse(&mem, &saved);
    // The first mount writes it back (generation g -> g + 1) ...
    let fs = BlobFs::mount(open_dev(&img), MountOptions::default()).unwrap();
    assert_eq!(fs.unsynced_recovery().files, 1);
    let s = fs.open("s", OpenOptions::append()).unwrap();
    assert_eq!(s.read_all().unwrap(), pattern(9, 0, 300_000));
    // ... and the file changes after it.
    s.truncate(10).unwrap();
    s.close().unwrap();
    fs.unmount().unwrap();
    assert!(!mem.exists());
    // The old buffers come back (kept somewhere, restored by hand): they
    // are of an earlier mount, so they are reported and not applied.
    copy_sparse(&saved, &mem);
    let fs = BlobFs::mount(open_dev(&img), MountOptions::default()).unwrap();
    let rep = fs.unsynced_recovery().clone();
    assert_eq!((rep.files, rep.buffers), (0, 0), "{rep}");
    assert!(
        !rep.ignored.is_empty() && rep.ignored.iter().all(|w| w.contains("generation")),
        "{rep}"
    );
    assert_eq!(
        fs.open("s", OpenOptions::read())
            .unwrap()
            .read_all()
            .unwrap(),
        pattern(9, 0, 10)
    );
    fs.unmount().unwrap();
    assert!(!mem.exists(), "ignored memory is freed, not kept");
    // A new file system on the same image: the buffers are foreign.
    copy_sparse(&saved, &mem);
    let fs = BlobFs::mkfs(
        open_dev(&img),
        MkfsOptions {
            force: true,
            ..Default::default()
        },
        MountOptions::default(),
    )
    .unwrap();
    let rep = fs.unsynced_recovery().clone();
    assert_eq!(rep.files, 0, "{rep}");
    assert!(
        !rep.ignored.is_empty()
            && rep
                .ignored
                .iter()
                .all(|w| w.contains("another file system")),
        "{rep}"
    );
    assert!(!fs.exists("s"));
    fs.unmount().unwrap();
    // fsck says they are stale; the CLI throws them away on request.
    copy_sparse(&saved, &mem);
    let report = blobfs::fsck::fsck(open_dev(&img)).unwrap();
    assert_eq!(report.unsynced_buffers, 0);
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.what.contains("another file system") && f.what.contains("ignores")),
        "{:?}",
        report.findings
    );
    let out = Command::new(env!("CARGO_BIN_EXE_blobfs"))
        .arg("discard-unsynced")
        .arg(format!("file:{}", img.display()))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("discarded 1 buffer(s)"),
        "{said}"
    );
    assert!(!mem.exists());
    std::fs::remove_file(&img).unwrap();
    std::fs::remove_file(&saved).unwrap();
}

/// Copies a sparse file, landing it under its name in one rename: a mount
/// elsewhere collects unsynced files that hold no header, which a copy
/// still being written would look like.
fn copy_sparse(from: &Path, to: &Path) {
    let part = to.with_extension("part");
    let st = Command::new("cp")
        .arg("--sparse=always")
        .arg(from)
        .arg(&part)
        .status()
        .unwrap();
    assert!(st.success(), "cp {} {}", from.display(), part.display());
    std::fs::rename(&part, to).unwrap();
}
