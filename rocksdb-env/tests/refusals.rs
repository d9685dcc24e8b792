//! The `mkfs=` modes of the `blobfs://` URI and the refusals a RocksDB user
//! sees, as exact texts: `rocksdb_env::open_db`'s error, and the status
//! RocksDB itself reports when it builds the Env from an options string.
//!
//! Each test uses its own image file: the mount table is process-wide and
//! keyed by device spec.

use std::path::{Path, PathBuf};

use rocksdb::Options;

fn image(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "rocksdb-env-refusals-{name}-{}.img",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&p);
    p
}

/// A 64 MiB image whose first bytes carry an ext4 super block magic.
fn ext4_image(path: &Path) {
    let mut bytes = vec![0u8; 64 << 20];
    bytes[1080..1082].copy_from_slice(&0xEF53u16.to_le_bytes());
    bytes[1024 + 0x60..1024 + 0x64].copy_from_slice(&0x40u32.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

/// A 64 MiB image holding a blobstore of type "kv" (not BlobFS).
fn foreign_store_image(path: &Path) {
    let dev = blobstore::open_device(&format!("file:{}?size=64M", path.display())).unwrap();
    let bs = blobstore::block_on(blobstore::Blobstore::init(
        dev,
        blobstore::BlobstoreOptions {
            bstype: "kv".into(),
            ..Default::default()
        },
    ))
    .unwrap();
    blobstore::block_on(bs.unload()).unwrap();
}

/// A 64 MiB image holding a BlobFS with one file, `kept`.
fn blobfs_image(path: &Path) {
    let dev = blobstore::open_device(&format!("file:{}?size=64M", path.display())).unwrap();
    let fs = blobfs::BlobFs::mkfs(dev, Default::default(), Default::default()).unwrap();
    fs.create("kept").unwrap().sync().unwrap();
    fs.unmount().unwrap();
}

fn create() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o
}

fn open_err(uri: &str) -> String {
    match rocksdb_env::open_db(uri, "/db", &create()) {
        Ok(_) => panic!("{uri} opened"),
        Err(e) => e.to_string(),
    }
}

/// The status RocksDB reports when it makes the Env for `uri` itself.
fn rocksdb_status(uri: &rocksdb_env::Uri) -> String {
    rocksdb_env::register();
    match Options::default().get_options_from_string(format!("env={}", uri.to_options_value())) {
        Ok(_) => panic!("RocksDB accepted {uri:?}"),
        Err(e) => e.to_string(),
    }
}

fn refusal(name: &Path, what: &str, offset: u64) -> String {
    format!(
        "refusing to format file:{}?size=64M&bs=4096: it holds {what} (signature at byte \
         {offset}); use --force (CLI) / mkfs=force (URI) / BlobstoreOptions::force to overwrite it",
        name.canonicalize().unwrap().display()
    )
}

#[test]
fn if_blank_refuses_a_file_system_and_force_formats_it() {
    let img = image("ext4");
    ext4_image(&img);
    let spec = format!("file:{}", img.display());
    let uri = format!("blobfs://{spec}");
    let why = refusal(&img, "an ext4 file system", 1080);
    assert_eq!(
        open_err(&uri),
        format!("mounting BlobFS on {spec}: mkfs: {why}")
    );
    // Through RocksDB's own Env creation: the same text in its status
    // (RocksDB's options parser reports it as "Invalid argument", followed
    // by the option value it could not use).
    let parsed = rocksdb_env::Uri::parse(&uri).unwrap();
    assert_eq!(
        rocksdb_status(&parsed),
        format!(
            "Invalid argument: mounting BlobFS on {spec}: mkfs: {why}: {}",
            parsed.to_options_value()
        )
    );
    // always refuses it too; never says what is there.
    assert_eq!(
        open_err(&format!("{uri};mkfs=always")),
        format!("mounting BlobFS on {spec}: mkfs: {why}")
    );
    assert_eq!(
        open_err(&format!("{uri};mkfs=never")),
        format!(
            "mounting BlobFS on {spec}: not a BlobFS: file:{}?size=64M&bs=4096 holds an ext4 \
             file system (signature at byte 1080)",
            img.canonicalize().unwrap().display()
        )
    );
    // force formats it, and the DB works.
    let db = rocksdb_env::open_db(&format!("{uri};mkfs=force"), "/db", &create()).unwrap();
    db.put(b"k", b"v").unwrap();
    drop(db);
    std::fs::remove_file(&img).unwrap();
}

#[test]
fn if_blank_and_always_refuse_a_foreign_blobstore() {
    let img = image("kv");
    foreign_store_image(&img);
    let spec = format!("file:{}", img.display());
    let why = refusal(&img, "a blobstore of type \"kv\"", 0);
    for mode in ["", ";mkfs=if-blank", ";mkfs=always"] {
        assert_eq!(
            open_err(&format!("blobfs://{spec}{mode}")),
            format!("mounting BlobFS on {spec}: mkfs: {why}"),
            "mode {mode:?}"
        );
    }
    // The store is untouched by the refusals.
    let dev = blobstore::open_device(&spec).unwrap();
    assert_eq!(
        blobstore::probe::probe_sync(&dev).unwrap().unwrap().what,
        "a blobstore of type \"kv\""
    );
    drop(dev);
    let db =
        rocksdb_env::open_db(&format!("blobfs://{spec};mkfs=force"), "/db", &create()).unwrap();
    drop(db);
    std::fs::remove_file(&img).unwrap();
}

#[test]
fn if_blank_mounts_a_blobfs_and_always_reformats_it() {
    let keep = image("keep");
    blobfs_image(&keep);
    let fs = rocksdb_env::mount(&format!("blobfs://file:{}", keep.display())).unwrap();
    assert!(fs.exists("kept"), "if-blank mounts the BlobFS as it is");
    drop(fs);

    let fresh = image("fresh");
    blobfs_image(&fresh);
    let fs = rocksdb_env::mount(&format!("blobfs://file:{};mkfs=always", fresh.display())).unwrap();
    assert!(!fs.exists("kept"), "always formats a BlobFS of ours");
    drop(fs);

    // A blank device: if-blank formats it; never refuses it.
    let blank = image("blank");
    std::fs::write(&blank, vec![0u8; 64 << 20]).unwrap();
    let spec = format!("file:{}", blank.display());
    assert_eq!(
        open_err(&format!("blobfs://{spec};mkfs=never")),
        format!(
            "mounting BlobFS on {spec}: not a BlobFS: file:{}?size=64M&bs=4096 holds no known \
             signature (blank or unknown data)",
            blank.canonicalize().unwrap().display()
        )
    );
    rocksdb_env::mount(&format!("blobfs://{spec}")).unwrap();
    for p in [keep, fresh, blank] {
        std::fs::remove_file(p).unwrap();
    }
}

#[test]
fn other_specs_of_one_file_do_not_become_a_second_writer() {
    let img = image("twice");
    let link = img.with_extension("link");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&img, &link).unwrap();
    let first = format!("blobfs://file:{}?size=64M", img.display());
    let db = rocksdb_env::open_db(&first, "/db", &create()).unwrap();
    // The same URI shares the mount; the same spec with other BlobFS
    // options is refused, naming both, not silently given the first's.
    let fs = rocksdb_env::mount(&first).unwrap();
    assert!(fs.exists("db/CURRENT"));
    drop(fs);
    let e = rocksdb_env::mount(&format!("{first};cache=1M"))
        .err()
        .expect("other options for a mounted device")
        .to_string();
    assert!(
        e.contains("cache 1048576 asked, 268435456 in force")
            && e.contains(&format!(
                "already mounted in this process as {first};cache=268435456"
            )),
        "{e}"
    );
    // Other specs naming the same file (other device options, a symlink)
    // are other devices: the file lock turns them away.
    for (spec, path) in [
        (format!("file:{}", img.display()), img.clone()),
        (format!("file:{}?qd=64", img.display()), img.clone()),
        (format!("file:{}", link.display()), link.clone()),
    ] {
        assert_eq!(
            open_err(&format!("blobfs://{spec}")),
            format!(
                "device {spec}: busy: {} is in use by another process/blobstore (it holds an \
                 exclusive lock on it)",
                path.display()
            )
        );
    }
    drop(db);
    std::fs::remove_file(&link).unwrap();
    std::fs::remove_file(&img).unwrap();
}
