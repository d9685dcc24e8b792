//! The `blobfs` tool end to end: the built binary on `file:` images in a
//! temp dir, and a real FUSE mount (`cp -r` in, `diff -r`, unmount, remount,
//! `diff -r` again).
//!
//! The FUSE test needs /dev/fuse and `fusermount3` (Debian's `fuse3`, which
//! `make deps` installs). Without them it fails, loudly; set
//! `BLOBFS_SKIP_FUSE=1` to skip it on purpose.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_blobfs");

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run blobfs")
}

/// Runs a command that must succeed; returns its stdout.
fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "blobfs {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail with exit code 1 and a one-line error
/// (no panic); returns its stderr.
fn fails(args: &[&str]) -> String {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "blobfs {args:?}: {err}");
    assert!(err.starts_with("blobfs: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// Deterministic bytes, different for each seed.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    blobstore::util::SplitMix64::bytes(seed, len)
}

#[test]
fn cli_commands_on_a_file_image() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("fs.img");
    let create = format!("file:{}?size=64M", img.display());
    let dev = format!("file:{}", img.display());
    let dev = dev.as_str();
    let host = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();

    assert!(ok(&["mkfs", &create]).contains("made a BlobFS"));
    // A second mkfs must not erase it silently.
    let err = fails(&["mkfs", dev]);
    let canon = img.canonicalize().unwrap();
    assert_eq!(
        err,
        format!(
            "blobfs: refusing to format file:{}?size=64M&bs=4096: it holds a blobstore of type \
             \"BLOBFS\" (signature at byte 0); use --force (CLI) / mkfs=force (URI) / \
             BlobstoreOptions::force to overwrite it\n",
            canon.display()
        )
    );
    let out = run(&["mkfs", dev, "--force", "--cluster-size", "64K"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("blobfs: erasing a blobstore of type \"BLOBFS\" on {dev} (signature at byte 0)\n")
    );

    let data = pattern(1, 3_000_001);
    std::fs::write(host("in.bin"), &data).unwrap();
    // No parent yet: an error; with -p the parents are made.
    fails(&["import", dev, &host("in.bin"), "db/in.bin"]);
    ok(&["import", dev, &host("in.bin"), "db/in.bin", "-p"]);
    fails(&["import", dev, &host("in.bin"), "db/in.bin"]);
    ok(&["import", dev, &host("in.bin"), "db/in.bin", "--force"]);

    assert_eq!(ok(&["ls", dev]), "db/\n");
    assert_eq!(ok(&["ls", dev, "db"]), "in.bin\n");
    let long = ok(&["ls", dev, "db", "-l"]);
    assert!(
        long.starts_with('-') && long.contains(" 3000001 "),
        "{long}"
    );
    let st = ok(&["stat", dev, "db/in.bin"]);
    assert!(st.contains("length:    3000001 bytes"), "{st}");
    assert!(st.contains("kind:      file"), "{st}");

    let cat = run(&["cat", dev, "db/in.bin"]);
    assert!(cat.status.success());
    assert!(cat.stdout == data, "cat differs");
    ok(&["export", dev, "db/in.bin", &host("out.bin")]);
    // To a device or a pipe: nothing to sync, no error.
    ok(&["export", dev, "db/in.bin", "/dev/null"]);
    // An import that fails part way (here: its source is a directory)
    // leaves nothing under the final name, and no hidden copy.
    let err = fails(&["import", dev, &host(""), "db/half.bin"]);
    assert!(err.contains("reading"), "{err}");
    let listing = ok(&["ls", dev, "db"]);
    assert!(
        listing.contains("in.bin") && !listing.contains("half.bin"),
        "a failed import left a file: {listing}"
    );
    assert!(
        std::fs::read(host("out.bin")).unwrap() == data,
        "export differs"
    );

    ok(&["mv", dev, "db/in.bin", "db/moved.bin"]);
    fails(&["stat", dev, "db/in.bin"]);
    ok(&["mkdir", dev, "logs"]);
    fails(&["mkdir", dev, "logs"]);
    ok(&["mkdir", dev, "a/b/c", "-p"]);
    assert_eq!(
        ok(&["ls", dev, "-R"]),
        "a/\na/b/\na/b/c/\ndb/\ndb/moved.bin\nlogs/\n"
    );
    // A directory moves with what is in it; not into itself.
    ok(&["mv", dev, "a", "z"]);
    assert_eq!(
        ok(&["ls", dev, "-R"]),
        "db/\ndb/moved.bin\nlogs/\nz/\nz/b/\nz/b/c/\n"
    );
    let err = fails(&["mv", dev, "z", "z/b/c/z"]);
    assert!(err.contains("into itself"), "{err}");
    ok(&["mv", dev, "z", "a"]);
    // A prefix that is not a name lists the names it starts.
    assert_eq!(ok(&["ls", dev, "db/mo"]), "db/moved.bin\n");
    fails(&["rm", dev, "a"]);
    ok(&["rm", dev, "-r", "a"]);
    ok(&["rm", dev, "logs"]);
    assert_eq!(ok(&["ls", dev, "-R"]), "db/\ndb/moved.bin\n");

    let info = ok(&["info", dev]);
    assert!(info.contains("cluster size:    64.0 KiB"), "{info}");
    assert!(
        info.contains("files:           1 (and 1 directories)"),
        "{info}"
    );
    let blobs = ok(&["blobs", dev]);
    assert!(blobs.contains("fs.name=\"db/moved.bin\""), "{blobs}");
    assert!(blobs.contains("fs.len=3000001"), "{blobs}");
    let id = blobs
        .lines()
        .find(|l| l.contains("db/moved.bin"))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let dump = ok(&["dump", dev, &id]);
    assert!(dump.contains("fs.len: 3000001"), "{dump}");
    fails(&["dump", dev, "0x7777"]);

    // Errors: clear, exit code 1, no panic.
    fails(&["cat", dev, "nope"]);
    fails(&["info", "mem:"]);
    fails(&["info", &format!("file:{}", host("missing.img"))]);

    // fsck: clean, then damaged.
    let clean = ok(&["fsck", dev]);
    assert!(clean.contains("0 damaged"), "{clean}");
    let marker = pattern(2, 1000);
    std::fs::write(host("small.bin"), &marker).unwrap();
    ok(&["import", dev, &host("small.bin"), "small"]);
    ok(&["fsck", dev]);
    // Find the file's bytes in the image and dirty the block past its end
    // (BlobFS keeps those bytes zero, so growing a file shows zeroes).
    let image = std::fs::read(&img).unwrap();
    let at = image
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("file data in the image");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&[0xAB; 8], (at + 1000 + 100) as u64)
            .unwrap();
        f.sync_all().unwrap();
    }
    let out = run(&["fsck", dev]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("small: byte 1100 past the length 1000"),
        "{stdout}"
    );
    // Wreck the super block: fsck cannot even load the store.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&[0xFF; 64], 0).unwrap();
        f.sync_all().unwrap();
    }
    fails(&["fsck", dev]);
}

/// True when `dir` is in this process's mount table.
fn mounted(dir: &Path) -> bool {
    let dir = dir.canonicalize().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|p| Path::new(p) == dir)
}

/// A running `blobfs mount --foreground`; unmounted (lazily, by force) if a
/// test fails while it is up.
struct Mount {
    child: Option<Child>,
    dir: PathBuf,
}

impl Mount {
    fn new(dev: &str, dir: &Path) -> Mount {
        let child = Command::new(BIN)
            .args(["mount", dev, dir.to_str().unwrap(), "--foreground"])
            .spawn()
            .expect("start blobfs mount");
        let mut m = Mount {
            child: Some(child),
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !mounted(dir) {
            if let Some(st) = m.child.as_mut().unwrap().try_wait().unwrap() {
                m.child = None;
                panic!("blobfs mount exited ({st}) before the mount came up");
            }
            assert!(Instant::now() < deadline, "mount did not come up in 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }

    /// Unmounts as a user would and checks the process ends cleanly.
    fn unmount(mut self) {
        let st = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .status()
            .expect("run fusermount3");
        assert!(st.success(), "fusermount3 -u failed");
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let st = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "blobfs mount did not exit");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(st.success(), "blobfs mount exited with {st}");
        assert!(!mounted(&self.dir));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("fusermount3")
                .arg("-uz")
                .arg(&self.dir)
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn diff(a: &Path, b: &Path) {
    let out = Command::new("diff")
        .arg("-r")
        .arg(a)
        .arg(b)
        .output()
        .expect("run diff");
    assert!(
        out.status.success(),
        "diff -r {} {}:\n{}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn fuse_mount_copy_diff_remount_diff() {
    if std::env::var("BLOBFS_SKIP_FUSE").as_deref() == Ok("1") {
        eprintln!("SKIPPED: the FUSE test, because BLOBFS_SKIP_FUSE=1");
        return;
    }
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: the FUSE test cannot run (set BLOBFS_SKIP_FUSE=1 to skip it)"
    );
    assert!(
        Command::new("fusermount3").arg("-V").output().is_ok(),
        "fusermount3 is missing: install Debian's fuse3 (make deps does) \
         or set BLOBFS_SKIP_FUSE=1 to skip the FUSE test"
    );
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("fs.img");
    ok(&["mkfs", &format!("file:{}?size=256M", img.display())]);
    let dev = format!("file:{}", img.display());

    // A tree with nested directories and files of awkward sizes, ~5 MiB.
    let tree = tmp.path().join("tree");
    let sizes = [
        0usize,
        1,
        511,
        4095,
        4096,
        4097,
        65_537,
        1 << 20,
        (1 << 20) + 3,
        2_500_000,
    ];
    let dirs = ["", "a", "a/b", "a/b/c", "d", "d/e f"];
    for (i, d) in dirs.iter().enumerate() {
        std::fs::create_dir_all(tree.join(d)).unwrap();
        for (j, &len) in sizes.iter().enumerate() {
            // Spread the sizes: each dir gets a few of them.
            if (i + j) % 3 == 0 {
                let seed = (i * 100 + j) as u64;
                std::fs::write(tree.join(d).join(format!("f{j}.bin")), pattern(seed, len)).unwrap();
            }
        }
    }
    std::fs::create_dir_all(tree.join("empty/dir")).unwrap();

    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = Mount::new(&dev, &mnt);
    let st = Command::new("cp")
        .arg("-r")
        .arg(&tree)
        .arg(&mnt)
        .status()
        .unwrap();
    assert!(st.success(), "cp -r into the mount failed");
    diff(&tree, &mnt.join("tree"));
    // Positional writes through the mount: inside the file, at its end, and
    // past it (the gap reads as zeroes), checked against a model.
    {
        use std::os::unix::fs::FileExt;
        let path = mnt.join("pos.bin");
        let mut model = pattern(9, 10_000);
        std::fs::write(&path, &model).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"inside", 5_000).unwrap();
        model[5_000..5_006].copy_from_slice(b"inside");
        f.write_all_at(b"end", 10_000).unwrap();
        model.extend_from_slice(b"end");
        f.write_all_at(b"past", 20_000).unwrap();
        model.resize(20_000, 0);
        model.extend_from_slice(b"past");
        f.set_len(15_000).unwrap();
        model.truncate(15_000);
        drop(f);
        assert!(std::fs::read(&path).unwrap() == model, "positional writes");
        std::fs::rename(&path, mnt.join("tree/renamed.bin")).unwrap();
        std::fs::remove_file(mnt.join("tree/renamed.bin")).unwrap();
    }
    // Directory renames through the mount, one with a file open below it,
    // mirrored on the host tree: the kernel sees the tree under its new
    // names at once, and so does the remount below.
    {
        use std::io::Write;
        let append = |p: PathBuf| std::fs::OpenOptions::new().append(true).open(p).unwrap();
        let mut f = append(mnt.join("tree/a/b/c/f0.bin"));
        std::fs::rename(mnt.join("tree/a"), mnt.join("tree/a2")).unwrap();
        std::fs::rename(tree.join("a"), tree.join("a2")).unwrap();
        f.write_all(b"written after the rename").unwrap();
        drop(f);
        append(tree.join("a2/b/c/f0.bin"))
            .write_all(b"written after the rename")
            .unwrap();
        // Over an empty directory, and refused into itself or over a
        // non-empty one.
        std::fs::rename(mnt.join("tree/d"), mnt.join("tree/empty/dir")).unwrap();
        std::fs::rename(tree.join("d"), tree.join("empty/dir")).unwrap();
        let e = std::fs::rename(mnt.join("tree/a2"), mnt.join("tree/a2/b/x")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
        let e = std::fs::rename(mnt.join("tree/a2"), mnt.join("tree/empty")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY), "{e}");
        diff(&tree, &mnt.join("tree"));
    }
    m.unmount();

    // Everything is on the image: the tool sees it, fsck is happy.
    let ls = ok(&["ls", &dev, "tree/empty/dir/e f"]);
    assert_eq!(ls, "f1.bin\nf4.bin\nf7.bin\n");
    assert!(ok(&["fsck", &dev]).contains("0 damaged"));

    let m = Mount::new(&dev, &mnt);
    diff(&tree, &mnt.join("tree"));
    m.unmount();
}

#[test]
fn cli_refuses_foreign_signatures_and_held_devices() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("ext4.img");
    // An image with an ext4 super block magic and its extents feature.
    let mut bytes = vec![0u8; 16 << 20];
    bytes[1080..1082].copy_from_slice(&0xEF53u16.to_le_bytes());
    bytes[1024 + 0x60..1024 + 0x64].copy_from_slice(&0x40u32.to_le_bytes());
    std::fs::write(&img, &bytes).unwrap();
    let canon = img.canonicalize().unwrap();
    let dev = format!("file:{}", img.display());

    let err = fails(&["mkfs", &dev]);
    assert_eq!(
        err,
        format!(
            "blobfs: refusing to format file:{}?size=16M&bs=4096: it holds an ext4 file system \
             (signature at byte 1080); use --force (CLI) / mkfs=force (URI) / \
             BlobstoreOptions::force to overwrite it\n",
            canon.display()
        )
    );
    let err = fails(&["ls", &dev]);
    assert_eq!(
        err,
        format!(
            "blobfs: mounting {dev}: not a BlobFS: file:{}?size=16M&bs=4096 holds an ext4 file \
             system (signature at byte 1080)\n",
            canon.display()
        )
    );
    // Held by this process: the CLI, another process, gets "in use".
    let held = blobstore::open_device(&dev).unwrap();
    let err = fails(&["mkfs", &dev, "--force"]);
    assert_eq!(
        err,
        format!(
            "blobfs: opening {dev}: busy: {} is in use by another process/blobstore (it holds an \
             exclusive lock on it)\n",
            img.display()
        )
    );
    drop(held);
    ok(&["mkfs", &dev, "--force"]);
    assert_eq!(ok(&["ls", &dev]), "");
}

#[test]
fn df_and_json_output_add_up() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("fs.img");
    let dev = format!("file:{}", img.display());
    ok(&["mkfs", &format!("{dev}?size=64M")]);
    let host = tmp.path().join("data");
    // 1.5 clusters and 0.25 of one (1 MiB clusters): used < allocated.
    std::fs::write(&host, pattern(3, 3 << 19)).unwrap();
    let small = tmp.path().join("small");
    std::fs::write(&small, pattern(4, 1 << 18)).unwrap();
    let h = host.to_str().unwrap();
    ok(&["import", "-p", &dev, h, "db/sst/1.sst"]);
    ok(&["import", "-p", &dev, h, "db/2.sst"]);
    ok(&["import", &dev, small.to_str().unwrap(), "top"]);
    ok(&["mkdir", &dev, "empty"]);

    let df: serde_json::Value = serde_json::from_str(&ok(&["df", &dev, "--json"])).unwrap();
    let entry = |name: &str| {
        df["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {df}"))
            .clone()
    };
    let db = entry("db");
    assert_eq!(db["files"], 2);
    assert_eq!(db["used_bytes"], 2 * (3 << 19));
    assert_eq!(
        db["allocated_bytes"],
        2 * (2 << 20),
        "two clusters per file"
    );
    assert_eq!(entry("empty")["files"], 0);
    assert_eq!(entry("top")["allocated_bytes"], 1 << 20);
    assert_eq!(df["files"], 3);
    assert_eq!(df["used_bytes"], 2 * (3 << 19) + (1 << 18));
    // df of a subdirectory, and its text form.
    let sub: serde_json::Value = serde_json::from_str(&ok(&["df", &dev, "db", "--json"])).unwrap();
    assert_eq!(sub["files"], 2);
    let text = ok(&["df", &dev]);
    assert!(
        text.contains("db/") && text.contains("total of /"),
        "{text}"
    );
    assert!(fails(&["df", &dev, "top"]).contains("not a directory"));

    // ls/stat/info/fsck --json agree with each other and with df.
    let ls: serde_json::Value = serde_json::from_str(&ok(&["ls", &dev, "-R", "--json"])).unwrap();
    let files: Vec<_> = ls
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "file")
        .collect();
    assert_eq!(files.len(), 3, "{ls}");
    let stat: serde_json::Value =
        serde_json::from_str(&ok(&["stat", &dev, "db/2.sst", "--json"])).unwrap();
    assert_eq!(stat["len"], 3 << 19);
    assert_eq!(stat["clusters"], 2);
    assert!(ls.as_array().unwrap().contains(&stat), "{stat} not in {ls}");
    let info: serde_json::Value = serde_json::from_str(&ok(&["info", &dev, "--json"])).unwrap();
    assert_eq!(info["files"], 3);
    assert_eq!(info["directories"], 3);
    assert_eq!(info["free_bytes"], df["fs_free_bytes"]);
    let fsck: serde_json::Value = serde_json::from_str(&ok(&["fsck", &dev, "--json"])).unwrap();
    assert_eq!(fsck["clean"], true);
    assert_eq!(fsck["files"], 3);
    assert_eq!(fsck["file_bytes"], df["used_bytes"]);
    assert_eq!(fsck["findings"], serde_json::json!([]));
}

/// Bytes the host file system has allocated for `path`.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn trim_gives_deleted_files_blocks_back_to_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("fs.img");
    let create = format!("file:{}?size=64M", img.display());
    let dev = format!("file:{}", img.display());
    let dev = dev.as_str();
    ok(&["mkfs", &create, "--cluster-size", "64K"]);
    let big = tmp.path().join("big.bin");
    std::fs::write(&big, pattern(9, 20 << 20)).unwrap();
    ok(&["import", dev, big.to_str().unwrap(), "big.bin"]);
    ok(&["import", dev, big.to_str().unwrap(), "d/other.bin", "-p"]);
    ok(&["rm", dev, "big.bin"]);
    let before = allocated(&img);
    let out = ok(&["trim", dev]);
    assert!(
        out.starts_with("trimmed ") && out.contains("free clusters"),
        "{out}"
    );
    let after = allocated(&img);
    assert!(
        after + (18 << 20) <= before,
        "trim left {after} of {before} bytes allocated"
    );
    // The file left is whole, and a second trim (JSON) trims the same.
    assert!(run(&["cat", dev, "d/other.bin"]).stdout == pattern(9, 20 << 20));
    let v: serde_json::Value = serde_json::from_str(&ok(&["trim", dev, "--json"])).unwrap();
    let clusters = v["clusters"].as_u64().unwrap();
    assert!(clusters >= 320, "{v}");
    assert_eq!(v["bytes"].as_u64().unwrap(), clusters * (64 << 10));
    assert!(v["runs"].as_u64().unwrap() >= 1, "{v}");
}

/// Every entry of an image as (name, kind, len, mtime_ns), from `ls -R --json`.
fn tree_of(dev: &str) -> Vec<(String, String, u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(&ok(&["ls", dev, "-R", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_string(),
                e["kind"].as_str().unwrap().to_string(),
                e["len"].as_u64().unwrap(),
                e["mtime_ns"].as_u64().unwrap(),
            )
        })
        .collect()
}

fn host_mtime_ns(p: &Path) -> u64 {
    let t = std::fs::metadata(p).unwrap().modified().unwrap();
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
}

fn set_host_mtime(p: &Path, ns: u64) {
    let t = std::time::UNIX_EPOCH + Duration::from_nanos(ns);
    std::fs::File::open(p).unwrap().set_modified(t).unwrap();
}

#[test]
fn backup_then_restore_keeps_names_directories_bytes_and_times() {
    let tmp = tempfile::tempdir().unwrap();
    let mk = |n: &str| {
        let img = tmp.path().join(n);
        ok(&["mkfs", &format!("file:{}?size=64M", img.display())]);
        format!("file:{}", img.display())
    };
    let (a, b) = (mk("a.img"), mk("b.img"));

    // A host tree with files, empty and nested directories, odd times.
    let src = tmp.path().join("src");
    let files: [(&str, usize); 5] = [
        ("top.txt", 10),
        ("db/000001.sst", 3_000_001),
        ("db/CURRENT", 16),
        ("db/archive/old.log", 0),
        ("logs/2024/x y.log", 70_000),
    ];
    for (i, (name, len)) in files.iter().enumerate() {
        let p = src.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, pattern(i as u64 + 20, *len)).unwrap();
        set_host_mtime(
            &p,
            1_000_000_000_123_456_789 + i as u64 * 86_400_000_000_007,
        );
    }
    std::fs::create_dir_all(src.join("empty")).unwrap();
    for (i, d) in ["db/archive", "db", "logs/2024", "logs", "empty"]
        .iter()
        .enumerate()
    {
        set_host_mtime(&src.join(d), 900_000_000_000_000_001 + i as u64 * 1_000_003);
    }
    // A symlink on the host is skipped, with a warning.
    std::os::unix::fs::symlink("top.txt", src.join("link")).unwrap();

    let out = run(&["restore", src.to_str().unwrap(), &a]);
    assert!(out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("skipping") && err.contains("symbolic link"),
        "{err}"
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.starts_with("restored 5 files"), "{said}");
    let tree_a = tree_of(&a);
    assert!(!tree_a.iter().any(|e| e.0 == "link"), "{tree_a:?}");
    for (name, len) in files {
        let e = tree_a.iter().find(|e| e.0 == name).unwrap();
        assert_eq!((e.1.as_str(), e.2), ("file", len as u64), "{name}");
        assert_eq!(e.3, host_mtime_ns(&src.join(name)), "{name}");
        assert!(run(&["cat", &a, name]).stdout == std::fs::read(src.join(name)).unwrap());
    }
    let empty = tree_a.iter().find(|e| e.0 == "empty").unwrap();
    assert_eq!(
        (empty.1.as_str(), empty.3),
        ("directory", host_mtime_ns(&src.join("empty")))
    );
    let db = tree_a.iter().find(|e| e.0 == "db").unwrap();
    assert_eq!(db.3, host_mtime_ns(&src.join("db")));

    // Backup into a new directory, then restore that into a fresh image.
    let bak = tmp.path().join("bak");
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["backup", &a, bak.to_str().unwrap(), "--json"])).unwrap();
    assert_eq!(v["files"], 5);
    assert_eq!(v["directories"], 5);
    let total: usize = files.iter().map(|f| f.1).sum();
    assert_eq!(v["bytes"], total as u64);
    for e in &tree_a {
        let p = bak.join(&e.0);
        assert_eq!(host_mtime_ns(&p), e.3, "{}", e.0);
        assert_eq!(p.is_dir(), e.1 == "directory", "{}", e.0);
        if e.1 == "file" {
            assert!(std::fs::read(&p).unwrap() == run(&["cat", &a, &e.0]).stdout);
        }
    }
    // No temporary names left behind.
    let listing = Command::new("find").arg(&bak).output().unwrap();
    assert!(!String::from_utf8_lossy(&listing.stdout).contains("partial"));

    ok(&["restore", bak.to_str().unwrap(), &b]);
    assert_eq!(tree_of(&b), tree_a);
    for e in tree_a.iter().filter(|e| e.1 == "file") {
        assert!(run(&["cat", &b, &e.0]).stdout == run(&["cat", &a, &e.0]).stdout);
    }

    // A backup never writes into a directory that holds something.
    let err = fails(&["backup", &a, bak.to_str().unwrap()]);
    assert!(err.contains("not empty"), "{err}");
}

#[test]
fn restore_refuses_to_clobber_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("fs.img");
    ok(&["mkfs", &format!("file:{}?size=64M", img.display())]);
    let dev = format!("file:{}", img.display());
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/a"), b"new a").unwrap();
    std::fs::write(src.join("d/b"), b"new b").unwrap();
    let old = tmp.path().join("old");
    std::fs::write(&old, b"old b").unwrap();
    ok(&["import", &dev, old.to_str().unwrap(), "d/b", "-p"]);

    let err = fails(&["restore", src.to_str().unwrap(), &dev]);
    assert!(err.contains("d/b: already exists"), "{err}");
    assert!(err.contains("--force"), "{err}");
    // Nothing was written: not even the file that did not clash.
    assert_eq!(ok(&["ls", &dev, "d"]), "b\n");
    assert_eq!(run(&["cat", &dev, "d/b"]).stdout, b"old b");

    let out = ok(&["restore", src.to_str().unwrap(), &dev, "--force"]);
    assert!(out.starts_with("restored 2 files"), "{out}");
    assert_eq!(run(&["cat", &dev, "d/b"]).stdout, b"new b");
    assert_eq!(run(&["cat", &dev, "d/a"]).stdout, b"new a");
    assert_eq!(ok(&["ls", &dev, "d"]), "a\nb\n");
}

#[test]
fn no_progress_output_when_stderr_is_not_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("fs.img");
    ok(&["mkfs", &format!("file:{}?size=64M", img.display())]);
    let dev = format!("file:{}", img.display());
    let data = tmp.path().join("data");
    std::fs::write(&data, pattern(3, 5 << 20)).unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("f"), pattern(4, 3 << 20)).unwrap();
    let out_file = tmp.path().join("out");
    let bak = tmp.path().join("bak");
    // run() gives the command a pipe for stderr: nothing but errors may
    // appear there, and nothing (not a bar, not a control sequence) on stdout
    // but the commands' own output.
    for args in [
        vec!["import", &dev, data.to_str().unwrap(), "big"],
        vec!["export", &dev, "big", out_file.to_str().unwrap()],
        vec!["restore", src.to_str().unwrap(), &dev],
        vec!["backup", &dev, bak.to_str().unwrap()],
        vec!["fsck", &dev],
    ] {
        let out = run(&args);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(
            out.stderr.is_empty(),
            "{args:?} wrote to stderr: {:?}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !out.stdout.contains(&0x1b),
            "{args:?}: escape sequences on stdout"
        );
    }
}

#[test]
fn mkfs_max_files_sizes_the_metadata_region_and_running_out_says_how_to_get_more() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("fs.img");
    let create = format!("file:{}?size=64M", img.display());
    let dev = format!("file:{}", img.display());
    let out = ok(&[
        "mkfs",
        &create,
        "--cluster-size",
        "64K",
        "--max-files",
        "40",
    ]);
    assert!(out.contains("room for about 103 files"), "{out}");
    let info: serde_json::Value = serde_json::from_str(&ok(&["info", &dev, "--json"])).unwrap();
    let free = info["free_metadata_pages"].as_u64().unwrap();
    // 40 files of one page, 64 spare, 3 for the maps of large files on
    // 1,024 clusters, minus the root record's.
    assert_eq!(free, 40 + 64 + 3 - 1);

    let fs = blobfs::BlobFs::mount(
        blobstore::open_device(&dev).unwrap(),
        blobfs::MountOptions::default(),
    )
    .unwrap();
    let mut made = 0;
    let err = loop {
        // The file's one page, taken when it is made.
        let res = fs.create(&format!("f{made}")).and_then(|f| {
            f.append(&[7u8; 100])?;
            f.close()
        });
        match res {
            Ok(()) => made += 1,
            Err(e) => break e.to_string(),
        }
        assert!(made < 1000, "the metadata region never filled");
    };
    // A page each: as many files as pages.
    assert_eq!(made as u64, free, "{err}");
    assert!(err.contains("--max-files"), "{err}");
    // The file that did not fit was never made; the rest unmount and stay.
    assert!(!fs.exists(&format!("f{made}")));
    fs.unmount().unwrap();
    let ls = ok(&["ls", &dev]);
    assert_eq!(ls.lines().count(), made, "{ls}");
}
