//! The Rust `rocksdb` crate on BlobFS: every key checked against a
//! `BTreeMap` model through writes, flushes, compactions, a clean reopen, a
//! reopen after the writer process was killed (WAL recovery, unsynced
//! writes included), a second
//! process locked out of the device, and (with the feature `testing`) an
//! injected device write error and stalled device reads.
//!
//! The crash and lock-out tests run this same binary again as a child
//! process (`BLOBFS_TEST_CHILD` selects what the child does).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use rocksdb::{IteratorMode, Options, WriteBatch, WriteOptions, DB};

const CHILD_ENV: &str = "BLOBFS_TEST_CHILD";
const CHILD_URI_ENV: &str = "BLOBFS_TEST_URI";

fn key(i: u32) -> Vec<u8> {
    format!("key{i:08}").into_bytes()
}

fn value(i: u32, round: u32) -> Vec<u8> {
    let mut v = format!("value-{i}-{round}-").into_bytes();
    v.resize(100, b'a' + (i % 26) as u8);
    v
}

/// Small buffers and levels so a few MB of data spans several levels.
fn small_options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.set_write_buffer_size(64 << 10);
    o.set_max_write_buffer_number(2);
    o.set_target_file_size_base(64 << 10);
    o.set_max_bytes_for_level_base(256 << 10);
    o.set_level_zero_file_num_compaction_trigger(2);
    o.set_level_compaction_dynamic_level_bytes(false);
    o
}

fn verify(db: &DB, model: &BTreeMap<Vec<u8>, Vec<u8>>) {
    let got: Vec<(Vec<u8>, Vec<u8>)> = db
        .iterator(IteratorMode::Start)
        .map(|r| {
            let (k, v) = r.expect("iterate");
            (k.to_vec(), v.to_vec())
        })
        .collect();
    assert_eq!(got.len(), model.len(), "number of keys");
    for ((gk, gv), (mk, mv)) in got.iter().zip(model.iter()) {
        assert_eq!(gk, mk);
        assert_eq!(gv, mv, "value of {}", String::from_utf8_lossy(mk));
    }
    for (k, v) in model.iter().step_by(97) {
        assert_eq!(db.get(k).unwrap().as_deref(), Some(&v[..]));
    }
}

fn files_per_level(db: &DB) -> Vec<u64> {
    (0..7)
        .map(|l| {
            db.property_int_value(&format!("rocksdb.num-files-at-level{l}"))
                .unwrap()
                .unwrap_or(0)
        })
        .collect()
}

#[test]
fn crud_flush_compaction_reopen() {
    let uri = "blobfs://mem:1G;cache=16M";
    let path = "/crud/db";
    let opts = small_options();
    let mut model = BTreeMap::new();
    {
        let db = rocksdb_env::open_db(uri, path, &opts).unwrap();
        // Puts, overwrites and deletes over three rounds, flushing between.
        for round in 0..3u32 {
            for i in (0..20_000u32).filter(|i| i % (round + 1) == 0) {
                db.put(key(i), value(i, round)).unwrap();
                model.insert(key(i), value(i, round));
            }
            for i in (0..20_000u32).filter(|i| i % 7 == round) {
                db.delete(key(i)).unwrap();
                model.remove(&key(i));
            }
            db.flush().unwrap();
        }
        // A write batch: puts and deletes applied atomically.
        let mut batch = WriteBatch::default();
        for i in 20_000..21_000u32 {
            batch.put(key(i), value(i, 9));
            model.insert(key(i), value(i, 9));
        }
        for i in (0..1000u32).step_by(3) {
            batch.delete(key(i));
            model.remove(&key(i));
        }
        db.write(batch).unwrap();
        assert_eq!(db.get(key(20_500)).unwrap(), Some(value(20_500, 9)));
        assert_eq!(db.get(key(3)).unwrap(), None);

        let before = files_per_level(&db);
        db.compact_range::<&[u8], &[u8]>(None, None);
        let after = files_per_level(&db);
        eprintln!("files per level: before compaction {before:?}, after {after:?}");
        assert!(
            before.iter().filter(|&&n| n > 0).count() >= 2,
            "data spans several levels before compaction: {before:?}"
        );
        assert_eq!(after[0], 0, "L0 empty after a full compaction");
        assert!(after.iter().sum::<u64>() > 1, "{after:?}");
        verify(&db, &model);
    }
    // Closed; RocksDB's files are BlobFS files.
    let fs = rocksdb_env::mount(uri).unwrap();
    let names: Vec<String> = fs
        .read_dir(path)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.iter().any(|n| n == "CURRENT"), "{names:?}");
    assert!(names.iter().any(|n| n.ends_with(".sst")), "{names:?}");

    let db = rocksdb_env::open_db(uri, path, &opts).unwrap();
    verify(&db, &model);
    // Writes still work after the reopen.
    db.put(b"after-reopen", b"yes").unwrap();
    assert_eq!(
        db.get(b"after-reopen").unwrap().as_deref(),
        Some(&b"yes"[..])
    );
}

#[test]
fn two_filesystems_share_one_mount() {
    let uri = "blobfs://mem:256M";
    let mut o = Options::default();
    o.create_if_missing(true);
    let a = rocksdb_env::open_db(uri, "/share/a", &o).unwrap();
    let b = rocksdb_env::open_db(uri, "/share/b", &o).unwrap();
    a.put(b"k", b"a").unwrap();
    b.put(b"k", b"b").unwrap();
    let fs = rocksdb_env::mount(uri).unwrap();
    assert!(fs.exists("share/a/CURRENT") && fs.exists("share/b/CURRENT"));
    // The same DB cannot be opened twice at once: the LOCK is held, and
    // the error is RocksDB's IOError naming the lock file, as on POSIX.
    let e = rocksdb_env::open_db(uri, "/share/a", &o).unwrap_err();
    let rocksdb_env::Error::RocksDb(e) = &e else {
        panic!("not RocksDB's error: {e}")
    };
    assert_eq!(e.kind(), rocksdb::ErrorKind::IOError, "{e}");
    assert!(e.to_string().contains("/share/a/LOCK"), "{e}");
    // Other options for a mounted device are an error naming both, never
    // silently the first mount's.
    for (other, what) in [
        (format!("{uri};cache=1M"), "cache 1048576 asked"),
        (format!("{uri};warm_read=4K"), "warm_read 4096 asked"),
        (
            format!("{uri};mkfs=always"),
            "asks to format a device that is mounted",
        ),
    ] {
        let e = rocksdb_env::mount(&other)
            .err()
            .expect("a conflict")
            .to_string();
        // Both URIs, every option spelled out, and what differs.
        assert!(e.starts_with("blobfs://mem:256M;cache="), "{e}");
        assert!(
            e.contains("already mounted in this process as blobfs://mem:256M;cache=268435456;"),
            "{e}"
        );
        assert!(e.contains(what), "{other}: {e}");
        assert!(rocksdb_env::open_db(&other, "/share/c", &o).is_err());
    }
}

#[test]
fn paths_with_double_slashes_resolve_as_on_posix() {
    let uri = "blobfs://mem:128M";
    let mut o = Options::default();
    o.create_if_missing(true);
    {
        // DBTestBase names start with `/`, so its paths hold `//`.
        let db = rocksdb_env::open_db(uri, "//slashes//db/", &o).unwrap();
        db.put(b"k", b"v").unwrap();
        db.flush().unwrap();
    }
    let fs = rocksdb_env::mount(uri).unwrap();
    assert!(fs.exists("slashes/db/CURRENT"));
    let db = rocksdb_env::open_db(uri, "/slashes/db", &o).unwrap();
    assert_eq!(db.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
}

fn image_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("rocksdb-env-{name}-{}.img", std::process::id()))
}

/// Keys the child writes with a synced WAL before it aborts.
const SYNCED_BATCHES: u32 = 40;
const KEYS_PER_BATCH: u32 = 100;

fn child_writes_then_aborts(uri: &str) -> ! {
    let mut o = Options::default();
    o.create_if_missing(true);
    let db = rocksdb_env::open_db(uri, "/crash/db", &o).unwrap();
    let mut synced = WriteOptions::default();
    synced.set_sync(true);
    for b in 0..SYNCED_BATCHES {
        let mut batch = WriteBatch::default();
        for i in b * KEYS_PER_BATCH..(b + 1) * KEYS_PER_BATCH {
            batch.put(key(i), value(i, 1));
        }
        db.write_opt(batch, &synced).unwrap();
    }
    // Unsynced tail: acknowledged, so it must survive the abort (BlobFS
    // keeps it in unsynced memory, as the page cache would).
    for i in 0..500u32 {
        db.put(key(1_000_000 + i), value(i, 2)).unwrap();
    }
    println!(
        "child: synced {} keys, aborting",
        SYNCED_BATCHES * KEYS_PER_BATCH
    );
    std::process::abort();
}

fn child_probes_device(uri: &str) -> ! {
    match rocksdb_env::mount(uri) {
        Ok(_) => {
            println!("PROBE: mounted");
            std::process::exit(0)
        }
        Err(e) => {
            println!("PROBE: {e}");
            std::process::exit(0)
        }
    }
}

/// Writes 300 synced keys and exits (as db_bench does: `exit`, the DB
/// never closed).
fn child_writes_then_exits(uri: &str) -> ! {
    let db = rocksdb_env::open_db(uri, "/exit/db", &small_options()).unwrap();
    let mut synced = WriteOptions::default();
    synced.set_sync(true);
    for i in 0..300 {
        db.put_opt(key(i), value(i, 0), &synced).unwrap();
    }
    std::mem::forget(db);
    std::process::exit(0)
}

/// Runs this test binary as a child doing `what`.
fn run_child(what: &str, test: &str, uri: &str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, what)
        .env(CHILD_URI_ENV, uri)
        .output()
        .unwrap()
}

/// When run as a child, do the child's job instead of the test.
fn maybe_child() {
    if let (Ok(what), Ok(uri)) = (std::env::var(CHILD_ENV), std::env::var(CHILD_URI_ENV)) {
        match what.as_str() {
            "write-abort" => child_writes_then_aborts(&uri),
            "probe" => child_probes_device(&uri),
            "write-exit" => child_writes_then_exits(&uri),
            other => panic!("unknown child job {other}"),
        }
    }
}

#[test]
fn wal_recovery_after_kill() {
    maybe_child();
    let img = image_path("crash");
    let _ = std::fs::remove_file(&img);
    let uri = format!("blobfs://file:{}?size=512M;mkfs=if-blank", img.display());
    let out = run_child("write-abort", "wal_recovery_after_kill", &uri);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success() && stdout.contains("aborting"),
        "child should abort after writing: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The child never closed the DB; the WAL must bring back every synced key.
    let mut o = Options::default();
    o.create_if_missing(false);
    let db = rocksdb_env::open_db(&uri, "/crash/db", &o).unwrap();
    for i in 0..SYNCED_BATCHES * KEYS_PER_BATCH {
        assert_eq!(db.get(key(i)).unwrap(), Some(value(i, 1)), "key {i}");
    }
    for i in 0..500u32 {
        assert_eq!(
            db.get(key(1_000_000 + i)).unwrap(),
            Some(value(i, 2)),
            "unsynced key {i} was acknowledged before the abort"
        );
    }
    drop(db);
    // RocksDB's Env for this URI lives as long as the process, so the device
    // stays mounted; unmount says so instead of pretending.
    assert!(matches!(
        rocksdb_env::unmount(&uri),
        Err(rocksdb_env::Error::InUse { .. })
    ));
    // What this process left unsynced goes with the image.
    let mem = blobstore::device::unsynced_memory_path_of(&img).unwrap();
    let _ = std::fs::remove_file(mem);
    std::fs::remove_file(&img).unwrap();
}

#[test]
fn second_process_is_locked_out() {
    maybe_child();
    let img = image_path("inuse");
    let _ = std::fs::remove_file(&img);
    let uri = format!("blobfs://file:{}?size=256M", img.display());
    let fs = rocksdb_env::mount(&uri).unwrap();
    fs.create_dir_all("probe").unwrap();
    let out = run_child("probe", "second_process_is_locked_out", &uri);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("PROBE: "), "{stdout}");
    assert!(
        stdout.contains("in use"),
        "a second process must get 'in use', got: {stdout}"
    );
    drop(fs);
    assert!(rocksdb_env::unmount(&uri).unwrap(), "unmounted");
    assert!(
        !rocksdb_env::unmount(&uri).unwrap(),
        "nothing left to unmount"
    );
    std::fs::remove_file(&img).unwrap();
}

/// The tests that inject device faults under BlobFS (`fault_injection=on`:
/// test machinery, in a build with the feature `testing` only).
#[cfg(feature = "testing")]
mod faults {
    use super::*;
    use blobstore::testing::{FaultDevice, Kinds, Rule};
    use blobstore::IoKind;

    #[test]
    fn injected_write_error_reaches_rocksdb() {
        let uri = "blobfs://mem:512M;fault_injection=on";
        let path = "/faults/db";
        let mut o = Options::default();
        o.create_if_missing(true);
        let mut synced = WriteOptions::default();
        synced.set_sync(true);
        let faults = fault_switch(uri);
        {
            let db = rocksdb_env::open_db(uri, path, &o).unwrap();
            for i in 0..100u32 {
                db.put_opt(key(i), value(i, 0), &synced).unwrap();
            }
            faults.arm(Rule::fail_after(
                Kinds::WRITE | Kinds::FLUSH | Kinds::WRITE_ZEROES,
                0,
            ));
            let err = db
                .put_opt(key(100), value(100, 0), &synced)
                .expect_err("a synced write on a failing device must fail");
            eprintln!("RocksDB reported: {err}");
            assert_eq!(err.kind(), rocksdb::ErrorKind::IOError, "{err}");
            assert!(faults.injected_failures() > 0);
            // RocksDB stops taking writes after a WAL sync error.
            assert!(db.put_opt(key(101), value(101, 0), &synced).is_err());
            faults.clear_failures();
        }
        // Reopen on the healed device: every acknowledged write is there.
        let db = rocksdb_env::open_db(uri, path, &o).unwrap();
        for i in 0..100u32 {
            assert_eq!(db.get(key(i)).unwrap(), Some(value(i, 0)), "key {i}");
        }
        db.put_opt(key(200), value(200, 0), &synced).unwrap();
    }

    /// The fault-injection device of a `fault_injection=on` URI.
    fn fault_switch(uri: &str) -> FaultDevice {
        rocksdb_env::fault_device(uri)
            .unwrap()
            .expect("a fault-injection device")
    }

    /// Options creating the database, with table options `t` and no RocksDB
    /// block cache: every block a Get needs is a file-system read.
    fn uncached_options(mut t: rocksdb::BlockBasedOptions) -> Options {
        let mut o = Options::default();
        o.create_if_missing(true);
        t.disable_cache();
        o.set_block_based_table_factory(&t);
        o
    }

    /// RocksDB's read time limits (`ReadOptions::io_timeout`, `deadline`)
    /// reach BlobFS as `IOOptions::timeout`: a read the device has not answered
    /// by then fails with `TimedOut` soon after the limit, not when the device
    /// answers; without a limit the same read waits and succeeds; and once the
    /// device answers again, limited reads succeed.
    #[test]
    fn read_time_limits_are_honoured() {
        use std::time::{Duration, Instant};
        // No BlobFS cache and no block cache, so every Get reads the device.
        // (Each test's device has a size of its own: mounts are shared by
        // spec within the process.)
        let uri = "blobfs://mem:200M;cache=0;fault_injection=on";
        let path = "/timeouts/db";
        let faults = fault_switch(uri);
        let o = uncached_options(rocksdb::BlockBasedOptions::default());
        {
            let db = rocksdb_env::open_db(uri, path, &o).unwrap();
            for i in 0..1000u32 {
                db.put(key(i), value(i, 0)).unwrap();
            }
            db.flush().unwrap();
        }
        // Reopened: the table's index and filter are read at open, before the
        // stall; a Get then reads one data block.
        let db = rocksdb_env::open_db(uri, path, &o).unwrap();
        assert_eq!(db.get(key(1)).unwrap(), Some(value(1, 0)));

        let stall = Duration::from_millis(400);
        faults.arm(Rule::stall(IoKind::Read, stall));
        let mut limited = rocksdb::ReadOptions::default();
        limited.set_io_timeout(20_000);
        let start = Instant::now();
        let err = db
            .get_opt(key(500), &limited)
            .expect_err("a read past its io_timeout must fail");
        let took = start.elapsed();
        eprintln!("RocksDB reported after {took:?}: {err}");
        assert_eq!(err.kind(), rocksdb::ErrorKind::TimedOut, "{err}");
        assert!(
            took < stall,
            "gave up only after the device answered: {took:?}"
        );

        // The same read without a limit waits for the device.
        let start = Instant::now();
        assert_eq!(db.get(key(500)).unwrap(), Some(value(500, 0)));
        assert!(start.elapsed() >= stall / 2, "the stall did not apply");

        // A deadline (absolute, on RocksDB's clock) is honoured as well.
        let mut deadline = rocksdb::ReadOptions::default();
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64;
        deadline.set_deadline(now_us + 20_000);
        let err = db
            .get_opt(key(700), &deadline)
            .expect_err("a read past its deadline must fail");
        assert_eq!(err.kind(), rocksdb::ErrorKind::TimedOut, "{err}");

        // A healthy device again: limited reads succeed, every key is intact.
        faults.clear_stalls();
        for i in (0..1000u32).step_by(37) {
            assert_eq!(
                db.get_opt(key(i), &limited).unwrap(),
                Some(value(i, 0)),
                "key {i}"
            );
        }
    }

    /// A batched `MultiGet` reaches BlobFS as one `MultiRead` per table file,
    /// and BlobFS submits all of its reads before waiting for any: on a device
    /// whose every read takes 150 ms, 16 keys in 16 separate blocks come back
    /// in about one read's time, not sixteen.
    #[test]
    fn multi_get_reads_a_batch_in_parallel() {
        use std::time::{Duration, Instant};
        // No BlobFS cache and no block cache: every block is a device read.
        let uri = "blobfs://mem:176M;cache=0;fault_injection=on";
        let path = "/multiget/db";
        let faults = fault_switch(uri);
        let mut t = rocksdb::BlockBasedOptions::default();
        t.set_block_size(4096);
        let o = uncached_options(t);
        // One key per block: 4000-byte values.
        let big = |i: u32| {
            let mut v = value(i, 7);
            v.resize(4000, b'0' + (i % 10) as u8);
            v
        };
        let db = rocksdb_env::open_db(uri, path, &o).unwrap();
        for i in 0..1000u32 {
            db.put(key(i), big(i)).unwrap();
        }
        db.flush().unwrap();
        // Opens the table (index and filter read before the stall).
        assert_eq!(db.get(key(0)).unwrap(), Some(big(0)));
        // Every 37th key: no two in adjacent blocks, so RocksDB cannot merge
        // their reads into one.
        let keys: Vec<Vec<u8>> = (1..=16u32).map(|j| key(j * 37)).collect();
        let stall = Duration::from_millis(150);
        faults.arm(Rule::stall(IoKind::Read, stall));
        let start = Instant::now();
        let got = db.multi_get(&keys);
        let took = start.elapsed();
        faults.clear_stalls();
        for (j, r) in (1..=16u32).zip(&got) {
            let v = r.as_ref().unwrap().as_ref().expect("found");
            assert_eq!(&v[..], &big(j * 37)[..], "key {}", j * 37);
        }
        eprintln!("16 keys in 16 blocks, reads stalled {stall:?}: MultiGet took {took:?}");
        assert!(took >= stall, "the stall did not apply: {took:?}");
        assert!(
            took < stall * 4,
            "the batch's reads were waited for one by one: {took:?}"
        );
    }
}

/// `allow_mmap_reads` makes RocksDB read with a null buffer and keep the
/// slice it gets back (PlainTable reads a whole file that way): on BlobFS
/// such files are served from a mapping the file object owns, for the
/// plain table and for block-based tables alike, across a flush, a
/// compaction and a reopen.
#[test]
fn mmap_reads_serve_plain_and_block_tables() {
    use rocksdb::{KeyEncodingType, PlainTableFactoryOptions, SliceTransform};
    for plain in [true, false] {
        // Its own memory device: one mount per device and process, and
        // the fault test's `mem:512M` has other options.
        let uri = "blobfs://mem:384M;cache=8M";
        let path = if plain { "/mmap/plain" } else { "/mmap/block" };
        let mut opts = small_options();
        opts.set_allow_mmap_reads(true);
        if plain {
            opts.set_prefix_extractor(SliceTransform::create_fixed_prefix(3));
            opts.set_plain_table_factory(&PlainTableFactoryOptions {
                user_key_length: 0,
                bloom_bits_per_key: 10,
                hash_table_ratio: 0.75,
                index_sparseness: 16,
                huge_page_tlb_size: 0,
                encoding_type: KeyEncodingType::Plain,
                full_scan_mode: false,
                store_index_in_file: false,
            });
        }
        let mut model = BTreeMap::new();
        {
            let db = rocksdb_env::open_db(uri, path, &opts).unwrap();
            for round in 0..2u32 {
                for i in (0..5_000u32).filter(|i| i % (round + 2) == 0) {
                    db.put(key(i), value(i, round)).unwrap();
                    model.insert(key(i), value(i, round));
                }
                db.flush().unwrap();
            }
            db.compact_range::<&[u8], &[u8]>(None, None);
            assert!(
                files_per_level(&db).iter().sum::<u64>() > 0,
                "no table files"
            );
            verify(&db, &model);
        }
        let db = rocksdb_env::open_db(uri, path, &opts).unwrap();
        verify(&db, &model);
        assert_eq!(db.get(key(1)).unwrap(), None);
    }
}

/// GET `path` from `127.0.0.1:port`; the status line and the body.
fn http_get(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// The value of the Prometheus sample `name` (no labels) in `text`.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.split(' ').next() == Some(name))
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
}

#[test]
fn metrics_endpoint_serves_what_rocksdb_did() {
    // A free port: bind, note it, let it go.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = format!("blobfs://mem:96M;metrics=127.0.0.1:{port}");
    let db = rocksdb_env::open_db(&uri, "/metrics/db", &small_options()).unwrap();
    let mut synced = WriteOptions::default();
    synced.set_sync(true);
    for i in 0..200 {
        db.put_opt(key(i), value(i, 0), &synced).unwrap();
    }
    db.flush().unwrap();
    let (status, text) = http_get(port, "/metrics");
    assert!(status.contains("200"), "{status}");
    // Every synced put synced the WAL; the flush synced an SST.
    assert!(sample(&text, "blobfs_wal_sync_total") >= 200.0, "{text}");
    assert!(sample(&text, "blobfs_append_total") >= 200.0);
    assert!(sample(&text, "blobfs_sync_total") >= 1.0);
    assert!(sample(&text, "blobfs_device_flush_total") >= 200.0);
    assert!(text.contains("# TYPE blobfs_wal_sync_seconds summary"));
    assert!(text.contains("blobfs_wal_sync_seconds{quantile=\"0.99\"} "));
    assert!(sample(&text, "blobfs_space_free_bytes") > 0.0);
    let (status, _) = http_get(port, "/other");
    assert!(status.contains("404"), "{status}");
    drop(db);

    // Only a loopback address, and a clear error otherwise.
    let refusal = |uri: &str, path: &str| match rocksdb_env::open_db(uri, path, &small_options()) {
        Ok(_) => panic!("{uri} was accepted"),
        Err(e) => e.to_string(),
    };
    let e = refusal("blobfs://mem:80M;metrics=192.0.2.1:9464", "/m2");
    assert!(e.contains("loopback"), "{e}");
    let e = refusal("blobfs://mem:80M;metrics=9464", "/m3");
    assert!(e.contains("HOST:PORT"), "{e}");
}

#[test]
fn metrics_file_is_written_at_exit() {
    maybe_child();
    let prom = image_path("metrics-file").with_extension("prom");
    let _ = std::fs::remove_file(&prom);
    let uri = format!("blobfs://mem:72M;metrics_file={}", prom.display());
    let out = run_child("write-exit", "metrics_file_is_written_at_exit", &uri);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&prom).expect("the metrics file after exit");
    assert!(sample(&text, "blobfs_wal_sync_total") >= 300.0, "{text}");
    assert!(
        sample(&text, "blobfs_device_flush_total") >= 300.0,
        "{text}"
    );
    let _ = std::fs::remove_file(&prom);
}
