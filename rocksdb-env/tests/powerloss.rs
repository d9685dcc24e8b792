//! RocksDB on BlobFS on a power-loss device (`powerloss=on`): a child process
//! writes synced and unsynced batches and is SIGKILLed; the parent plays a
//! power cut on the image (`blobstore::device::powerloss::recover`, several
//! seeds) and reopens the database: every synced key is there, and the
//! database opens without error.

use std::path::PathBuf;
use std::process::Command;

use blobstore::device::powerloss;
use rocksdb::{Options, WriteBatch, WriteOptions};

const CHILD_ENV: &str = "POWERLOSS_TEST_CHILD_URI";
const SYNCED_BATCHES: u32 = 30;
const KEYS_PER_BATCH: u32 = 100;

fn key(i: u32) -> Vec<u8> {
    format!("key{i:08}").into_bytes()
}

fn value(i: u32, round: u32) -> Vec<u8> {
    let mut v = format!("value-{i}-{round}-").into_bytes();
    v.resize(1000, b'a' + (i % 26) as u8);
    v
}

fn options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    // Small memtables: flushes and compactions write SSTs during the run.
    o.set_write_buffer_size(256 << 10);
    o.set_target_file_size_base(256 << 10);
    o
}

/// The child: synced batches, then an unsynced tail, then SIGKILL.
fn child(uri: &str) -> ! {
    let db = rocksdb_env::open_db(uri, "/pl/db", &options()).unwrap();
    let mut synced = WriteOptions::default();
    synced.set_sync(true);
    for b in 0..SYNCED_BATCHES {
        let mut batch = WriteBatch::default();
        for i in b * KEYS_PER_BATCH..(b + 1) * KEYS_PER_BATCH {
            batch.put(key(i), value(i, 1));
        }
        db.write_opt(batch, &synced).unwrap();
    }
    for i in 0..2000u32 {
        db.put(key(1_000_000 + i), value(i, 2)).unwrap();
    }
    println!("child: synced {} keys", SYNCED_BATCHES * KEYS_PER_BATCH);
    // SAFETY: kill takes no pointers.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    unreachable!("SIGKILL returned");
}

fn image(seed: u64) -> PathBuf {
    std::env::temp_dir().join(format!(
        "rocksdb-env-powerloss-{}-{seed}.img",
        std::process::id()
    ))
}

#[test]
fn synced_keys_survive_a_power_cut() {
    use std::os::unix::process::ExitStatusExt;
    if let Ok(uri) = std::env::var(CHILD_ENV) {
        child(&uri);
    }
    for seed in 1..=4u64 {
        let img = image(seed);
        let _ = std::fs::remove_file(&img);
        let _ = std::fs::remove_file(powerloss::log_path(&img));
        let uri = format!(
            "blobfs://file:{}?size=512M&powerloss=on;mkfs=always",
            img.display()
        );
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "synced_keys_survive_a_power_cut",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &uri)
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGKILL),
            "child: {:?}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("child: synced"));
        let report = powerloss::recover(&img, seed).unwrap();
        eprintln!("seed {seed}: {report}");
        // After the cut the image is a plain file device again.
        let uri = format!("blobfs://file:{};mkfs=never", img.display());
        let mut o = options();
        o.create_if_missing(false);
        let db = rocksdb_env::open_db(&uri, "/pl/db", &o).unwrap();
        for i in 0..SYNCED_BATCHES * KEYS_PER_BATCH {
            assert_eq!(
                db.get(key(i)).unwrap(),
                Some(value(i, 1)),
                "key {i}, seed {seed}"
            );
        }
        // Unsynced keys may or may not be there, but whatever is there is
        // what was written.
        for i in 0..2000u32 {
            if let Some(v) = db.get(key(1_000_000 + i)).unwrap() {
                assert_eq!(v, value(i, 2), "unsynced key {i}, seed {seed}");
            }
        }
        drop(db);
        let _ = std::fs::remove_file(&img);
    }
}
