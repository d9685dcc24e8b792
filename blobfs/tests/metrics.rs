//! `BlobFs::metrics`: every counter moves by what the workload did, WAL
//! syncs apart from the others, the device's I/O and errors included, and
//! the Prometheus text carries the same figures.

use std::sync::Arc;

use blobfs::{BlobFs, Metrics, MkfsOptions, MountOptions, OpenOptions};
use blobstore::testing::FaultDevice;
use blobstore::{BlockDevice, IoKind, MemDevice};

const MIB: u64 = 1 << 20;

fn fault_fs() -> (Arc<FaultDevice>, BlobFs) {
    let mem: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(256 * MIB, 4096).unwrap());
    let fault = Arc::new(FaultDevice::new(mem).unwrap());
    let dev: Arc<dyn BlockDevice> = fault.clone();
    let fs = BlobFs::mkfs(dev, MkfsOptions::default(), MountOptions::default()).unwrap();
    (fault, fs)
}

/// Reads the first 10 MiB of `name` twice, in 1 MiB reads.
fn read_twice(fs: &BlobFs, name: &str) {
    let f = fs.open(name, OpenOptions::read()).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    for _pass in 0..2 {
        for i in 0..10 {
            assert_eq!(f.read_at(i * MIB, &mut buf).unwrap(), MIB as usize);
        }
    }
}

/// The value of the Prometheus sample `name` (no labels) in `text`.
fn sample(text: &str, name: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.split(' ').next() == Some(name))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"));
    line.split(' ').nth(1).unwrap().parse().unwrap()
}

fn check_quantiles(what: &str, s: &blobstore::metrics::OpStats) {
    assert!(s.count > 0, "{what}: no operations");
    assert!(s.max_ns > 0, "{what}: {s:?}");
    assert!(s.p50_ns() <= s.p99_ns(), "{what}");
    assert!(s.p99_ns() <= s.p999_ns(), "{what}");
    assert!(s.p999_ns() <= s.max_ns, "{what}");
    assert!(s.sum_ns >= s.max_ns, "{what}");
    assert!(s.mean_ns() <= s.max_ns, "{what}");
}

#[test]
fn metrics_count_what_the_workload_did() {
    let (fault, fs) = fault_fs();
    let before = fs.metrics();
    assert_eq!(before.appends.count, 0);
    assert_eq!(before.reads.count, 0);
    // The mkfs's own metadata syncs are there already.
    assert!(before.metadata_syncs.count > 0);

    fs.create_dir("db").unwrap();
    let sst = fs.create("db/000008.sst").unwrap();
    let chunk = vec![7u8; 64 << 10];
    for _ in 0..160 {
        sst.append(&chunk).unwrap();
    }
    sst.sync().unwrap();
    let wal = fs.create("db/000007.log").unwrap();
    for _ in 0..20 {
        wal.append(&[1u8; 100]).unwrap();
        wal.sync().unwrap();
    }
    sst.close().unwrap();
    wal.close().unwrap();

    read_twice(&fs, "db/000008.sst");

    let m: Metrics = fs.metrics();
    assert_eq!(m.appends.count, 180);
    assert_eq!(m.appends.bytes, 10 * MIB + 2000);
    assert_eq!(
        m.syncs.count, 1,
        "the SST's one sync (close syncs are not counted)"
    );
    assert_eq!(m.wal_syncs.count, 20);
    assert_eq!(m.reads.count, 20);
    assert_eq!(m.reads.bytes, 20 * MIB);
    // 10 MiB through 4 MiB append buffers: two full ones written behind.
    assert!(m.write_behinds.count >= 2, "{:?}", m.write_behinds);
    assert!(m.write_behinds.bytes >= 8 * MIB);
    // Appends fill the cache: every read hits.
    let chunk = MountOptions::default().cache_chunk_bytes as u64;
    assert_eq!(m.cache.hits, 20 * MIB / chunk, "{:?}", m.cache);
    assert_eq!(m.cache.misses, 0);
    // Every sync that moved a length synced metadata.
    assert!(m.metadata_syncs.count >= before.metadata_syncs.count + 21);
    assert!(m.device.writes.bytes >= 10 * MIB, "{:?}", m.device.writes);
    assert!(m.device.flushes.count >= 21);
    assert!(m.device.reads.count > 0);
    for (what, s) in [
        ("appends", &m.appends),
        ("wal syncs", &m.wal_syncs),
        ("reads", &m.reads),
        ("metadata syncs", &m.metadata_syncs),
        ("device writes", &m.device.writes),
        ("device flushes", &m.device.flushes),
    ] {
        check_quantiles(what, s);
        assert_eq!(s.errors, 0, "{what}");
    }
    assert_eq!(m.space, fs.space());

    let text = m.to_prometheus();
    assert_eq!(sample(&text, "blobfs_append_total"), 180);
    assert_eq!(sample(&text, "blobfs_append_bytes_total"), 10 * MIB + 2000);
    assert_eq!(sample(&text, "blobfs_wal_sync_total"), 20);
    assert_eq!(sample(&text, "blobfs_sync_total"), 1);
    assert_eq!(sample(&text, "blobfs_read_seconds_count"), 20);
    assert_eq!(sample(&text, "blobfs_cache_hits_total"), m.cache.hits);
    assert_eq!(sample(&text, "blobfs_space_free_bytes"), m.space.free_bytes);
    assert_eq!(
        sample(&text, "blobfs_device_write_bytes_total"),
        m.device.writes.bytes
    );
    // Every sample line belongs to a declared metric family.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let name = l.split(['{', ' ']).next().unwrap();
        let family = name
            .strip_suffix("_sum")
            .or_else(|| name.strip_suffix("_count"))
            .filter(|f| text.contains(&format!("# TYPE {f} summary")))
            .unwrap_or(name);
        assert!(text.contains(&format!("# TYPE {family} ")), "{l}");
    }

    // Counts belong to their mount: after a remount the cache starts cold
    // and the file counts at zero (the device's go on).
    fs.unmount().unwrap();
    let dev: Arc<dyn BlockDevice> = fault.clone();
    let fs = BlobFs::mount(dev, MountOptions::default()).unwrap();
    let fresh = fs.metrics();
    assert_eq!(fresh.appends.count, 0);
    assert!(fresh.device.writes.count >= m.device.writes.count);
    read_twice(&fs, "db/000008.sst");
    let r = fs.metrics();
    assert!(r.cache.misses > 0, "{:?}", r.cache);
    assert!(r.cache.hits > 0, "the second pass hits: {:?}", r.cache);
    assert!(r.device.reads.bytes >= fresh.device.reads.bytes + 10 * MIB);

    // Another file system starts at zero.
    let other = BlobFs::mkfs(
        Arc::new(MemDevice::new(64 * MIB, 4096).unwrap()),
        MkfsOptions::default(),
        MountOptions::default(),
    )
    .unwrap();
    assert_eq!(other.metrics().appends.count, 0);
    assert!(other.metrics().device.writes.bytes < m.device.writes.bytes);
}

#[test]
fn device_errors_are_counted() {
    let (fault, fs) = fault_fs();
    let f = fs.create("x.log").unwrap();
    f.append(&[3u8; 4096]).unwrap();
    fault.fail_nth(IoKind::Write, 1);
    assert!(f.sync().is_err());
    let m = fs.metrics();
    assert_eq!(m.wal_syncs.count, 1);
    assert_eq!(m.wal_syncs.errors, 1);
    assert!(m.device.writes.errors >= 1, "{:?}", m.device.writes);
    assert!(
        sample(&m.to_prometheus(), "blobfs_device_write_errors_total") >= 1,
        "{}",
        m.to_prometheus()
    );
}

#[cfg(feature = "prometheus")]
#[test]
fn serve_metrics_answers_scrapes_on_loopback_only() {
    use std::io::{Read, Write};
    let get = |addr: std::net::SocketAddr, path: &str| {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut t = String::new();
        s.read_to_string(&mut t).unwrap();
        t
    };
    let (_fault, fs) = fault_fs();
    let f = fs.create("a.log").unwrap();
    f.append(b"hello").unwrap();
    f.sync().unwrap();
    let server = fs.serve_metrics("127.0.0.1:0").unwrap();
    let text = get(server.addr(), "/metrics");
    assert!(
        text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200"),
        "{text}"
    );
    assert!(text.contains("text/plain; version=0.0.4"), "{text}");
    let body = text.split_once("\r\n\r\n").unwrap().1;
    assert_eq!(sample(body, "blobfs_wal_sync_total"), 1);
    assert_eq!(sample(body, "blobfs_append_bytes_total"), 5);
    assert!(get(server.addr(), "/").contains(" 404 "));
    // Not on the network.
    let e = fs.serve_metrics("0.0.0.0:0").unwrap_err().to_string();
    assert!(e.contains("loopback"), "{e}");
    let e = fs.serve_metrics("nonsense").unwrap_err().to_string();
    assert!(e.contains("HOST:PORT"), "{e}");
    // The server lets the file system go once dropped.
    f.close().unwrap();
    drop(server);
    fs.unmount().unwrap();
}
