//! RocksDB on BlobFS on a power-loss device (`powerloss=on`): a child process
//! writes synced and unsynced batches and is SIGKILLed; the parent plays a
//! power cut on the image (`blobstore::testing::recover`, several
//! seeds) and reopens the database: every synced key is there, and the
//! database opens without error. A second test cuts power mid-I/O
//! (`powerloss_cut_after=N`: the child SIGKILLs itself at its N-th device
//! write or flush, inside a sync) and checks every batch whose sync returned.

use std::path::PathBuf;
use std::process::Command;

use blobstore::testing::powerloss;
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

const CUT_CHILD_ENV: &str = "POWERLOSS_TEST_CUT_CHILD";
/// Batches the first child writes (no power-loss device).
const BASE_BATCHES: u32 = 10;
/// Batches the cut child writes at most (far more device ops than any cut
/// point below).
const MAX_BATCHES: u32 = 2_000;
const CUT_KEYS_PER_BATCH: u32 = 20;

fn batch_keys(b: u32) -> std::ops::Range<u32> {
    b * CUT_KEYS_PER_BATCH..(b + 1) * CUT_KEYS_PER_BATCH
}

/// The children of [`power_cut_mid_sync_keeps_every_synced_batch`]:
/// `base` creates the database and syncs `BASE_BATCHES` batches; `cut`
/// reopens it on a device that cuts power at its N-th op and syncs batches
/// one by one, writing the number of the last one whose sync returned to
/// `progress`.
fn cut_child(role: &str, uri: &str, progress: &str) -> ! {
    let db = rocksdb_env::open_db(uri, "/cut/db", &options()).unwrap();
    let mut synced = WriteOptions::default();
    synced.set_sync(true);
    let range = if role == "base" {
        0..BASE_BATCHES
    } else {
        BASE_BATCHES..MAX_BATCHES
    };
    for b in range {
        let mut batch = WriteBatch::default();
        for i in batch_keys(b) {
            batch.put(key(i), value(i, b));
        }
        db.write_opt(batch, &synced).unwrap();
        // Replaced in one rename: the cut can kill this process while any
        // thread is here (BlobFS's writer thread and RocksDB's flushes do
        // device I/O too), and a plain write could leave it empty.
        let part = format!("{progress}.part");
        std::fs::write(&part, b.to_string()).unwrap();
        std::fs::rename(&part, progress).unwrap();
    }
    drop(db);
    std::process::exit(0)
}

#[test]
fn power_cut_mid_sync_keeps_every_synced_batch() {
    use std::os::unix::process::ExitStatusExt;
    if let Ok(v) = std::env::var(CUT_CHILD_ENV) {
        let mut parts = v.splitn(3, '\n');
        let (role, uri, progress) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        cut_child(role, uri, progress);
    }
    let child = |role: &str, uri: &str, progress: &std::path::Path| {
        Command::new(std::env::current_exe().unwrap())
            .args([
                "power_cut_mid_sync_keeps_every_synced_batch",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(
                CUT_CHILD_ENV,
                format!("{role}\n{uri}\n{}", progress.display()),
            )
            .output()
            .unwrap()
    };
    let mut unflushed = 0;
    for (case, (after, when)) in [
        (3u64, "before"),
        (20, "after"),
        (60, "before"),
        (150, "after"),
        (400, "before"),
        (900, "after"),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 100 + case as u64;
        let img = image(seed);
        let progress = img.with_extension("progress");
        let _ = std::fs::remove_file(&img);
        let _ = std::fs::remove_file(powerloss::log_path(&img));
        let what = format!("cut at op {after} {when}");
        let plain = format!("blobfs://file:{}?size=256M;mkfs=always", img.display());
        let out = child("base", &plain, &progress);
        assert!(out.status.success(), "{what}: base child {out:?}");
        let cut = format!(
            "blobfs://file:{}?size=256M&powerloss=on&powerloss_cut_after={after}\
             &powerloss_cut_when={when};mkfs=never",
            img.display()
        );
        let out = child("cut", &cut, &progress);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGKILL),
            "{what}: the cut did not fire: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let last: u32 = std::fs::read_to_string(&progress).unwrap().parse().unwrap();
        let report = powerloss::recover(&img, seed).unwrap();
        eprintln!("{what}: last synced batch {last}; {report}");
        unflushed += u32::from(report.writes > 0);
        let uri = format!("blobfs://file:{};mkfs=never", img.display());
        let mut o = options();
        o.create_if_missing(false);
        let db = rocksdb_env::open_db(&uri, "/cut/db", &o).unwrap();
        let present = |b: u32| {
            let got: Vec<bool> = batch_keys(b)
                .map(|i| match db.get(key(i)).unwrap() {
                    Some(v) => {
                        assert_eq!(v, value(i, b), "{what}: key {i}");
                        true
                    }
                    None => false,
                })
                .collect();
            // A write batch is all or nothing.
            assert!(
                got.iter().all(|&x| x) || got.iter().all(|&x| !x),
                "{what}: batch {b} is partly there"
            );
            got[0]
        };
        for b in 0..=last {
            assert!(present(b), "{what}: synced batch {b} (last {last}) lost");
        }
        // The batch being synced at the cut may or may not be there; none
        // after it was written.
        present(last + 1);
        for b in last + 2..(last + 10).min(MAX_BATCHES) {
            assert!(!present(b), "{what}: batch {b} after the cut is there");
        }
        drop(db);
        let _ = std::fs::remove_file(&img);
        let _ = std::fs::remove_file(&progress);
    }
    // Cutting at a device op, rather than at a random moment, finds
    // unflushed writes to act on.
    assert!(unflushed > 0, "no cut found an unflushed write");
}
