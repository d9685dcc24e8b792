//! The RocksDB features users reach for, on BlobFS, through the `rocksdb`
//! crate this crate re-exports: checkpoints, backups (to the host and to
//! BlobFS) and restores, transactions (pessimistic and optimistic), column
//! families, integrated BlobDB, ingestion of SST files written by
//! `SstFileWriter`, the compression libraries, and direct I/O. Each test
//! checks the data, not only that the call returned.

use std::collections::BTreeMap;

use rocksdb_env::rocksdb::{
    self, checkpoint::Checkpoint, DBCompressionType, OptimisticTransactionDB, Options,
    SstFileWriter, TransactionDB, TransactionDBOptions, DB,
};
use rocksdb_env::{BackupEngine, BackupTo};

fn key(i: u32) -> Vec<u8> {
    format!("key{i:08}").into_bytes()
}

fn value(i: u32, tag: &str) -> Vec<u8> {
    let mut v = format!("{tag}-{i}-").into_bytes();
    v.resize(200, b'a' + (i % 26) as u8);
    v
}

fn opts() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    o.set_write_buffer_size(256 << 10);
    o
}

/// Every key of `db` against `model`, in order.
fn assert_db_holds(db: &DB, model: &BTreeMap<Vec<u8>, Vec<u8>>) {
    let got: BTreeMap<Vec<u8>, Vec<u8>> = db
        .iterator(rocksdb::IteratorMode::Start)
        .map(|r| {
            let (k, v) = r.expect("iterate");
            (k.to_vec(), v.to_vec())
        })
        .collect();
    assert_eq!(got.len(), model.len(), "number of keys");
    assert!(got == *model, "the database differs from the model");
}

/// A database on `uri` at `path` holding `n` keys tagged `tag`, flushed
/// half way, and the model of it.
fn filled(uri: &str, path: &str, n: u32, tag: &str) -> (DB, BTreeMap<Vec<u8>, Vec<u8>>) {
    let db = rocksdb_env::open_db(uri, path, &opts()).unwrap();
    let mut model = BTreeMap::new();
    for i in 0..n {
        db.put(key(i), value(i, tag)).unwrap();
        model.insert(key(i), value(i, tag));
        if i == n / 2 {
            db.flush().unwrap();
        }
    }
    (db, model)
}

#[test]
fn checkpoint_opens_as_the_database_it_copied() {
    let uri = "blobfs://mem:512M;cache=8M";
    let (db, mut model) = filled(uri, "/ck/db", 5_000, "a");
    Checkpoint::new(&db)
        .unwrap()
        .create_checkpoint("/ck/snap")
        .unwrap();
    // Later writes reach the database, not the checkpoint.
    db.put(b"after", b"x").unwrap();
    drop(db);
    let fs = rocksdb_env::mount(uri).unwrap();
    assert!(
        fs.read_dir("ck")
            .unwrap()
            .iter()
            .all(|e| e.name != "snap.tmp"),
        "the checkpoint's temporary directory is left behind"
    );
    let snap = rocksdb_env::open_db(uri, "/ck/snap", &opts()).unwrap();
    assert_db_holds(&snap, &model);
    drop(snap);
    let db = rocksdb_env::open_db(uri, "/ck/db", &opts()).unwrap();
    model.insert(b"after".to_vec(), b"x".to_vec());
    assert_db_holds(&db, &model);
}

#[test]
fn backups_to_the_host_and_to_blobfs_restore_every_key() {
    let uri = "blobfs://mem:768M;cache=8M";
    let other = "blobfs://mem:224M;cache=8M";
    let host = tempdir("host-backups");
    let (db, model1) = filled(uri, "/bk/db", 4_000, "one");

    let mut to_host = BackupEngine::open(uri, BackupTo::Host(&host)).unwrap();
    // Each test has a mem: size of its own: one device each per process.
    let mut to_blobfs = BackupEngine::open(
        uri,
        BackupTo::BlobFs {
            uri: other,
            dir: "/backups/db",
        },
    )
    .unwrap();
    let first = to_host.create_new_backup(&db).unwrap();
    to_blobfs.create_new_backup(&db).unwrap();
    assert!(first.files > 0 && first.size > 0, "{first:?}");
    // The host backup really is on the host, the other in the other BlobFS.
    assert!(host.join("meta").is_dir(), "no backup meta dir on the host");
    let other_fs = rocksdb_env::mount(other).unwrap();
    assert!(other_fs.read_dir("backups/db").unwrap().len() >= 2);

    // A second generation; then the live database is destroyed.
    let mut model2 = model1.clone();
    for i in 0..1_000 {
        db.put(key(i), value(i, "two")).unwrap();
        model2.insert(key(i), value(i, "two"));
    }
    db.delete(key(3_999)).unwrap();
    model2.remove(&key(3_999));
    let second = to_host.create_new_backup(&db).unwrap();
    assert!(second.id > first.id);
    assert_eq!(to_host.backups().len(), 2);
    to_host.verify_backup(first.id).unwrap();
    to_host.verify_backup(second.id).unwrap();
    drop(db);
    DB::destroy(&rocksdb_env::options_for(uri, &opts()).unwrap(), "/bk/db").unwrap();

    // Restores into BlobFS: the newest from the host, an older one by id,
    // and the copy kept in the other BlobFS.
    to_host.restore_latest("/bk/db").unwrap();
    let db = rocksdb_env::open_db(uri, "/bk/db", &opts()).unwrap();
    assert_db_holds(&db, &model2);
    drop(db);
    to_host.restore(first.id, "/bk/first").unwrap();
    let db = rocksdb_env::open_db(uri, "/bk/first", &opts()).unwrap();
    assert_db_holds(&db, &model1);
    drop(db);
    to_blobfs.restore_latest("/bk/from-blobfs").unwrap();
    let db = rocksdb_env::open_db(uri, "/bk/from-blobfs", &opts()).unwrap();
    assert_db_holds(&db, &model1);
    drop(db);

    to_host.purge_old_backups(1).unwrap();
    assert_eq!(to_host.backups().len(), 1);
    assert!(to_host.verify_backup(first.id).is_err());
    let _ = std::fs::remove_dir_all(&host);
}

#[test]
fn the_crates_own_backup_engine_takes_our_env() {
    let uri = "blobfs://mem:320M;cache=8M";
    let (db, model) = filled(uri, "/own/db", 2_000, "own");
    let env = rocksdb_env::env(uri).unwrap();
    let bopts = rocksdb::backup::BackupEngineOptions::new("/own/backups").unwrap();
    let mut engine = rocksdb::backup::BackupEngine::open(&bopts, &env).unwrap();
    engine.create_new_backup_flush(&db, true).unwrap();
    drop(db);
    engine
        .restore_from_latest_backup(
            "/own/restored",
            "/own/restored",
            &rocksdb::backup::RestoreOptions::default(),
        )
        .unwrap();
    // The backup and the restore are inside BlobFS, not on the host.
    assert!(!std::path::Path::new("/own/backups").exists());
    let fs = rocksdb_env::mount(uri).unwrap();
    assert!(fs.read_dir("own/backups").is_ok());
    let db = rocksdb_env::open_db(uri, "/own/restored", &opts()).unwrap();
    assert_db_holds(&db, &model);
}

#[test]
fn transactions_commit_roll_back_and_conflict() {
    let uri = "blobfs://mem:200M;cache=8M";
    let o = rocksdb_env::options_for(uri, &opts()).unwrap();
    {
        let db: TransactionDB =
            TransactionDB::open(&o, &TransactionDBOptions::default(), "/tx/db").unwrap();
        let t1 = db.transaction();
        t1.put(b"a", b"1").unwrap();
        t1.put(b"b", b"1").unwrap();
        // Pessimistic: a second writer of a locked key times out.
        let t2 = db.transaction();
        assert!(t2.put(b"a", b"2").is_err(), "t2 wrote a key t1 holds");
        t1.commit().unwrap();
        t2.rollback().unwrap();
        let t3 = db.transaction();
        t3.put(b"c", b"3").unwrap();
        t3.rollback().unwrap();
        assert_eq!(db.get(b"a").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(db.get(b"c").unwrap(), None);
    }
    // Committed data survives a reopen; the rolled back write does not.
    let db: TransactionDB =
        TransactionDB::open(&o, &TransactionDBOptions::default(), "/tx/db").unwrap();
    assert_eq!(db.get(b"b").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(db.get(b"c").unwrap(), None);
    drop(db);

    let odb: OptimisticTransactionDB = OptimisticTransactionDB::open(&o, "/tx/odb").unwrap();
    odb.put(b"k", b"0").unwrap();
    let t1 = odb.transaction();
    let t2 = odb.transaction();
    assert_eq!(
        t1.get_for_update(b"k", true).unwrap().as_deref(),
        Some(&b"0"[..])
    );
    t1.put(b"k", b"1").unwrap();
    t2.put(b"k", b"2").unwrap();
    t2.commit().unwrap();
    // Optimistic: t1 read k before t2's commit changed it, so t1 fails.
    assert!(
        t1.commit().is_err(),
        "a conflicting optimistic commit went in"
    );
    assert_eq!(odb.get(b"k").unwrap().as_deref(), Some(&b"2"[..]));
}

#[test]
fn column_families_keep_their_own_keys_across_reopen() {
    let uri = "blobfs://mem:208M;cache=8M";
    let mut o = rocksdb_env::options_for(uri, &opts()).unwrap();
    o.create_missing_column_families(true);
    let cfs = ["hot", "cold"];
    {
        let mut db = DB::open_cf(&o, "/cf/db", cfs).unwrap();
        for (n, cf) in cfs.iter().enumerate() {
            let h = db.cf_handle(cf).unwrap();
            for i in 0..2_000u32 {
                db.put_cf(&h, key(i), value(i, cf)).unwrap();
            }
            if n == 0 {
                db.flush_cf(&h).unwrap();
            }
        }
        db.put(b"default-key", b"d").unwrap();
        db.drop_cf("cold").unwrap();
        db.create_cf("new", &o).unwrap();
        let h = db.cf_handle("new").unwrap();
        db.put_cf(&h, b"n", b"v").unwrap();
    }
    let names = DB::list_cf(&o, "/cf/db").unwrap();
    assert_eq!(names, ["default", "hot", "new"]);
    let db = DB::open_cf(&o, "/cf/db", ["hot", "new"]).unwrap();
    let hot = db.cf_handle("hot").unwrap();
    for i in (0..2_000u32).step_by(37) {
        assert_eq!(db.get_cf(&hot, key(i)).unwrap(), Some(value(i, "hot")));
        assert_eq!(db.get(key(i)).unwrap(), None, "a hot key in default");
    }
    let new = db.cf_handle("new").unwrap();
    assert_eq!(db.get_cf(&new, b"n").unwrap().as_deref(), Some(&b"v"[..]));
    assert_eq!(db.get(b"default-key").unwrap().as_deref(), Some(&b"d"[..]));
}

#[test]
fn integrated_blob_db_keeps_large_values_in_blob_files() {
    let uri = "blobfs://mem:384M;cache=8M";
    let mut o = opts();
    o.set_enable_blob_files(true);
    o.set_min_blob_size(1024);
    o.set_enable_blob_gc(true);
    let db = rocksdb_env::open_db(uri, "/blob/db", &o).unwrap();
    let mut model = BTreeMap::new();
    for i in 0..3_000u32 {
        // Every third value is large enough to go to a blob file.
        let mut v = value(i, "blob");
        if i % 3 == 0 {
            v.resize(4096, b'0' + (i % 10) as u8);
        }
        db.put(key(i), &v).unwrap();
        model.insert(key(i), v);
    }
    db.flush().unwrap();
    db.compact_range::<&[u8], &[u8]>(None, None);
    assert_db_holds(&db, &model);
    let fs = rocksdb_env::mount(uri).unwrap();
    let blob_files = fs
        .read_dir("blob/db")
        .unwrap()
        .into_iter()
        .filter(|e| e.name.ends_with(".blob"))
        .count();
    assert!(blob_files > 0, "no .blob file in BlobFS");
    drop(db);
    let db = rocksdb_env::open_db(uri, "/blob/db", &o).unwrap();
    assert_db_holds(&db, &model);
}

#[test]
fn sst_files_from_sst_file_writer_are_ingested() {
    let uri = "blobfs://mem:216M;cache=8M";
    let o = rocksdb_env::options_for(uri, &opts()).unwrap();
    // Two external files written into BlobFS by SstFileWriter (which, as
    // on POSIX, does not create their directory).
    rocksdb_env::mount(uri)
        .unwrap()
        .create_dir_all("ingest/in")
        .unwrap();
    let mut model = BTreeMap::new();
    for (n, range) in [(0u32..1_000), (1_000u32..2_500)].into_iter().enumerate() {
        let mut w = SstFileWriter::create(&o);
        w.open(format!("/ingest/in/{n}.sst")).unwrap();
        for i in range {
            w.put(key(i), value(i, "sst")).unwrap();
            model.insert(key(i), value(i, "sst"));
        }
        w.finish().unwrap();
    }
    let db = DB::open(&o, "/ingest/db").unwrap();
    db.put(key(5_000), b"live").unwrap();
    model.insert(key(5_000), b"live".to_vec());
    db.ingest_external_file(vec!["/ingest/in/0.sst", "/ingest/in/1.sst"])
        .unwrap();
    assert_db_holds(&db, &model);
    drop(db);
    let db = DB::open(&o, "/ingest/db").unwrap();
    assert_db_holds(&db, &model);
}

#[test]
fn every_compression_library_is_linked_and_compresses() {
    let uri = "blobfs://mem:448M;cache=8M";
    // Default options use Snappy, as db_bench's do.
    let kinds = [
        ("default", None),
        ("lz4", Some(DBCompressionType::Lz4)),
        ("zstd", Some(DBCompressionType::Zstd)),
        ("zlib", Some(DBCompressionType::Zlib)),
        ("snappy", Some(DBCompressionType::Snappy)),
    ];
    for (name, kind) in kinds {
        let mut o = opts();
        if let Some(k) = kind {
            o.set_compression_type(k);
        }
        let path = format!("/compress/{name}");
        let db = rocksdb_env::open_db(uri, &path, &o).unwrap();
        let mut model = BTreeMap::new();
        for i in 0..5_000u32 {
            // Highly compressible: 200 bytes of mostly one letter.
            db.put(key(i), value(i, "c")).unwrap();
            model.insert(key(i), value(i, "c"));
        }
        db.flush().unwrap();
        let sst = db
            .property_int_value("rocksdb.total-sst-files-size")
            .unwrap()
            .unwrap();
        let raw: u64 = model.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
        assert!(
            sst * 3 < raw,
            "{name}: {sst} bytes of SST for {raw} bytes of data: not compressed"
        );
        drop(db);
        let db = rocksdb_env::open_db(uri, &path, &o).unwrap();
        assert_db_holds(&db, &model);
    }
}

/// Direct reads go around BlobFS's cache, from the device straight into
/// RocksDB's aligned buffers (no DMA buffer between) on a memory and on an
/// io_uring file device; buffered reads use the cache.
#[test]
fn direct_io_reads_around_the_blobfs_cache_and_buffered_reads_use_it() {
    let dir = tempdir("direct");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("direct.img");
    let on_file = format!("blobfs://file:{}?size=232M;cache=16M", img.display());
    for uri in ["blobfs://mem:232M;cache=16M", on_file.as_str()] {
        direct_and_buffered_reads_on(uri);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn direct_and_buffered_reads_on(uri: &str) {
    // The two sides share one mount (one cache), one after the other.
    let fs = rocksdb_env::mount(uri).unwrap();
    for direct in [true, false] {
        let path = format!("/direct/{direct}");
        let mut o = opts();
        o.set_use_direct_reads(direct);
        o.set_use_direct_io_for_flush_and_compaction(direct);
        // No RocksDB block cache: every Get reads the file system.
        let mut t = rocksdb::BlockBasedOptions::default();
        t.disable_cache();
        o.set_block_based_table_factory(&t);
        let mut model = BTreeMap::new();
        {
            let db = rocksdb_env::open_db(uri, &path, &o).unwrap();
            for i in 0..20_000u32 {
                db.put(key(i), value(i, "d")).unwrap();
                model.insert(key(i), value(i, "d"));
            }
            db.flush().unwrap();
            db.compact_range::<&[u8], &[u8]>(None, None);
        }
        // No compaction while the Gets are counted: one writes a table and
        // reads back its tail while that is still in BlobFS's write buffer
        // (a read the general path serves).
        o.set_disable_auto_compactions(true);
        let db = rocksdb_env::open_db(uri, &path, &o).unwrap();
        let before = fs.cache_stats();
        let m0 = fs.metrics();
        let gets = (0..20_000u32).step_by(7).len() as u64;
        for i in (0..20_000u32).step_by(7) {
            assert_eq!(
                db.get(key(i)).unwrap(),
                Some(value(i, "d")),
                "direct={direct}"
            );
        }
        let after = fs.cache_stats();
        let lookups = (after.hits + after.misses) - (before.hits + before.misses);
        let m1 = fs.metrics();
        let reads = m1.reads.count - m0.reads.count;
        let straight = m1.direct_reads.count - m0.direct_reads.count;
        if direct {
            assert_eq!(lookups, 0, "direct reads went through BlobFS's cache");
            // Every read went from the device into RocksDB's buffer (a Get
            // reads a data block, unless RocksDB's own prefetch buffer
            // still holds it).
            assert_eq!(straight, reads, "{uri}: reads through a DMA buffer");
            assert!(
                straight >= gets / 2,
                "{uri}: {straight} reads for {gets} Gets"
            );
        } else {
            assert_eq!(straight, 0, "{uri}: a buffered read went around the cache");
            assert!(
                lookups > 1_000,
                "buffered reads missed the cache: {lookups}"
            );
        }
        assert_db_holds(&db, &model);
    }
}

/// RocksDB's iterators with `async_io` read ahead through `ReadAsync`
/// (BlobFS advertises kAsyncIO): on an io_uring file device, without
/// BlobFS's cache, the readahead is still in flight when `ReadAsync`
/// returns and the iterator works meanwhile; every key comes back right.
/// The same scan without `async_io` starts no asynchronous read.
#[test]
fn iterators_read_ahead_asynchronously() {
    let dir = tempdir("async");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("async.img");
    let uri = format!("blobfs://file:{}?size=232M;cache=0", img.display());
    let fs = rocksdb_env::mount(&uri).unwrap();
    let mut o = opts();
    // No RocksDB block cache: every block of the scan is read from BlobFS.
    let mut t = rocksdb::BlockBasedOptions::default();
    t.disable_cache();
    o.set_block_based_table_factory(&t);
    let mut model = BTreeMap::new();
    {
        let db = rocksdb_env::open_db(&uri, "/async", &o).unwrap();
        for i in 0..40_000u32 {
            db.put(key(i), value(i, "a")).unwrap();
            model.insert(key(i), value(i, "a"));
        }
        db.flush().unwrap();
        db.compact_range::<&[u8], &[u8]>(None, None);
    }
    o.set_disable_auto_compactions(true);
    let db = rocksdb_env::open_db(&uri, "/async", &o).unwrap();
    let scan = |async_io: bool| {
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_async_io(async_io);
        let m0 = fs.metrics();
        let got: BTreeMap<Vec<u8>, Vec<u8>> = db
            .iterator_opt(rocksdb::IteratorMode::Start, ro)
            .map(|r| {
                let (k, v) = r.expect("iterate");
                (k.to_vec(), v.to_vec())
            })
            .collect();
        assert!(
            got == model,
            "async_io={async_io}: the scan differs from the model"
        );
        let m1 = fs.metrics();
        (
            m1.async_reads.count - m0.async_reads.count,
            m1.reads.count - m0.reads.count,
        )
    };
    let (overlapped, reads) = scan(true);
    eprintln!("async_io scan: {overlapped} of {reads} reads overlapped");
    assert!(
        overlapped >= 5,
        "{overlapped} of {reads} reads were in flight when ReadAsync returned"
    );
    let (overlapped, reads) = scan(false);
    assert_eq!(
        overlapped, 0,
        "a scan without async_io overlapped {reads} reads"
    );
    drop(db);
    drop(fs);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fresh host directory for this test process.
fn tempdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("rocksdb-env-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}
