//! The NVMe/TCP transport against a real target: the Linux kernel's
//! `nvmet` + `nvmet-tcp` inside the test VM (`make test-vm`,
//! `tests/vm/run.sh`), serving a subsystem on 127.0.0.1 with two
//! namespaces (512- and 4096-byte blocks) whose contents the tests may
//! destroy.
//!
//! Every test is `#[ignore]`d: it needs `NVME_TCP_TEST_SPEC`
//! (`nvme-tcp:HOST:PORT/NQN`) and, for the target-goes-away test,
//! `NVME_TCP_TEST_CONFIGFS` (the nvmet configfs directory; the port is
//! `ports/1`). The VM runs them with `--ignored --test-threads=1`.
#![cfg(feature = "nvme")]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blobstore::{
    block_on, channel, open_device, BlobOptions, Blobstore, BlobstoreOptions, BlockDevice,
    DeviceSpec, DmaBuf, Error, Lba, LoadOptions, NvmeStatus, NvmeTcpController, NvmeTcpDevice,
    TcpOptions,
};
use common::{pattern, Rng};

const NEEDS: &str = "needs NVME_TCP_TEST_SPEC: an nvmet-tcp target (make test-vm)";

/// The spec's target, subsystem NQN and the spec text.
fn spec() -> (String, String, String) {
    let text = std::env::var("NVME_TCP_TEST_SPEC").expect(NEEDS);
    match DeviceSpec::parse(&text).unwrap() {
        DeviceSpec::NvmeTcp { target, subnqn, .. } => (target, subnqn, text),
        other => panic!("NVME_TCP_TEST_SPEC is not nvme-tcp: {other:?}"),
    }
}

fn ctrl_with(opts: TcpOptions) -> Arc<NvmeTcpController> {
    let (target, nqn, _) = spec();
    NvmeTcpController::connect(&target, &nqn, opts).unwrap()
}

/// The namespace with `block_size`-byte blocks.
fn ns_with(block_size: u32, opts: TcpOptions) -> Arc<dyn BlockDevice> {
    let c = ctrl_with(opts);
    let nsid = c
        .namespaces()
        .unwrap()
        .into_iter()
        .find(|(_, ns)| ns.block_size == block_size)
        .expect("namespace with that block size")
        .0;
    Arc::new(NvmeTcpDevice::from_controller(c, nsid).unwrap())
}

#[test]
#[ignore = "needs NVME_TCP_TEST_SPEC: an nvmet-tcp target (make test-vm)"]
fn identify_controller_and_namespaces() {
    let c = ctrl_with(TcpOptions::default());
    let id = c.identity();
    println!(
        "controller {} cntlid {}: model {:?} serial {:?} firmware {:?} mdts {} namespaces {} \
         oncs {:#x} vwc {} in-capsule {} bytes",
        c.name(),
        c.cntlid(),
        id.model,
        id.serial,
        id.firmware,
        id.mdts,
        id.nn,
        id.oncs,
        id.volatile_write_cache,
        c.in_capsule_bytes()
    );
    let mut sizes = Vec::new();
    for (nsid, n) in c.namespaces().unwrap() {
        println!(
            "namespace {nsid}: {} blocks of {} bytes ({} MiB), deallocated reads zeroes {}",
            n.size_blocks,
            n.block_size,
            (n.size_blocks * n.block_size as u64) >> 20,
            n.deallocated_reads_zeroes
        );
        sizes.push(n.block_size);
    }
    assert_eq!(
        sizes,
        vec![512, 4096],
        "two namespaces, 512- and 4096-byte blocks"
    );
    assert_ne!(
        c.cntlid(),
        0xFFFF,
        "the target gave the admin queue a controller id"
    );
    assert!(
        c.in_capsule_bytes() >= 4096,
        "nvmet takes in-capsule writes"
    );
    assert!(!c.is_failed());
}

/// Random writes of 1 block to 6 MiB (in-capsule, R2T, several commands),
/// each read back; flush, deallocate, write zeroes.
fn write_read_back(dev: &Arc<dyn BlockDevice>, seed: u64) {
    let g = dev.geometry();
    let ch = channel(dev).unwrap();
    let bsz = g.block_size as usize;
    let mut rng = Rng::new(seed);
    let max_blocks = (6 << 20) / bsz;
    let t0 = Instant::now();
    let mut bytes = 0;
    for i in 0..30u64 {
        let blocks = match i % 4 {
            0 => 1,
            1 => 1 + rng.below(16) as usize,
            2 => 1 + rng.below(512) as usize,
            _ => 1 + rng.below(max_blocks as u64) as usize,
        };
        let lba = rng.below(g.block_count - blocks as u64);
        let data = pattern(seed + i, blocks * bsz);
        block_on(ch.write(Lba(lba), DmaBuf::from_slice(&data).unwrap())).unwrap();
        let back = block_on(ch.read(Lba(lba), dev.alloc_buf(data.len()).unwrap())).unwrap();
        assert!(
            back[..] == data[..],
            "{}: {blocks} blocks at {lba}",
            dev.name()
        );
        bytes += 2 * data.len();
    }
    block_on(ch.flush()).unwrap();
    println!(
        "{}: 30 writes and reads, {} MiB, in {:?}",
        dev.name(),
        bytes >> 20,
        t0.elapsed()
    );
    let data = pattern(seed, 64 * bsz);
    block_on(ch.write(Lba(64), DmaBuf::from_slice(&data).unwrap())).unwrap();
    block_on(ch.write_zeroes(Lba(64), 32)).unwrap();
    block_on(ch.unmap(Lba(96), 32)).unwrap();
    let back = block_on(ch.read(Lba(64), dev.alloc_buf(64 * bsz).unwrap())).unwrap();
    assert!(back[..32 * bsz].iter().all(|&b| b == 0), "write zeroes");
    if g.unmap_reads_zeroes {
        assert!(back[32 * bsz..].iter().all(|&b| b == 0), "deallocated");
    }
}

#[test]
#[ignore = "needs NVME_TCP_TEST_SPEC: an nvmet-tcp target (make test-vm)"]
fn write_read_back_flush_deallocate_write_zeroes() {
    for bs in [512u32, 4096] {
        write_read_back(&ns_with(bs, TcpOptions::default()), 0x5eed + bs as u64);
    }
}

#[test]
#[ignore = "needs NVME_TCP_TEST_SPEC: an nvmet-tcp target (make test-vm)"]
fn header_and_data_digests_against_the_target() {
    let opts = TcpOptions {
        header_digest: true,
        data_digest: true,
        ..Default::default()
    };
    write_read_back(&ns_with(4096, opts), 0xd1);
}

#[test]
#[ignore = "needs NVME_TCP_TEST_SPEC: an nvmet-tcp target (make test-vm)"]
fn four_threads_queue_depth_32_checked() {
    let dev = ns_with(4096, TcpOptions::default());
    let g = dev.geometry();
    let per_thread = g.block_count / 4;
    let t0 = Instant::now();
    let ops = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (dev, ops) = (dev.clone(), ops.clone());
            std::thread::spawn(move || {
                let ch = channel(&dev).unwrap();
                let base = t * per_thread;
                for round in 0..4u64 {
                    let lbas: Vec<u64> = (0..32).map(|k| base + k * 8 + round).collect();
                    let writes: Vec<_> = lbas
                        .iter()
                        .map(|&lba| {
                            let data = pattern(lba ^ round, 4096 * (1 + (lba % 3) as usize));
                            ch.write(Lba(lba), DmaBuf::from_slice(&data).unwrap())
                        })
                        .collect();
                    for r in block_on(futures::future::join_all(writes)) {
                        r.unwrap();
                    }
                    let reads: Vec<_> = lbas
                        .iter()
                        .map(|&lba| {
                            ch.read(
                                Lba(lba),
                                DmaBuf::new(4096 * (1 + (lba % 3) as usize)).unwrap(),
                            )
                        })
                        .collect();
                    for (lba, r) in lbas.iter().zip(block_on(futures::future::join_all(reads))) {
                        let b = r.unwrap();
                        assert!(
                            b[..] == pattern(lba ^ round, b.len())[..],
                            "thread {t} lba {lba}"
                        );
                    }
                    ops.fetch_add(64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    println!(
        "4 threads, QD32: {} checked ops in {:?}",
        ops.load(Ordering::Relaxed),
        t0.elapsed()
    );
}

#[test]
#[ignore = "needs NVME_TCP_TEST_SPEC: an nvmet-tcp target (make test-vm)"]
fn errors_are_typed_and_the_device_keeps_working() {
    let (target, nqn, text) = spec();
    let dev = ns_with(512, TcpOptions::default());
    let ch = channel(&dev).unwrap();
    let n = dev.geometry().block_count;
    // Past the end: refused before the wire, and by the target.
    let r = block_on(ch.read(Lba(n - 1), DmaBuf::new(1024).unwrap()));
    assert!(matches!(r, Err(Error::OutOfRange { .. })), "{r:?}");
    let c = ctrl_with(TcpOptions::default());
    let nsid = c
        .namespaces()
        .unwrap()
        .into_iter()
        .find(|(_, ns)| ns.block_size == 512)
        .unwrap()
        .0;
    let wide: Arc<dyn BlockDevice> =
        Arc::new(NvmeTcpDevice::unchecked(c.clone(), nsid, 512, n * 4));
    let r = block_on(
        channel(&wide)
            .unwrap()
            .read(Lba(n + 10), DmaBuf::new(512).unwrap()),
    );
    println!("read past the end (target's check): {r:?}");
    // nvmet checks the range on a file namespace; on a block device the
    // block layer fails the I/O, which nvmet reports as an internal error.
    assert!(
        matches!(
            r,
            Err(Error::Nvme {
                status: NvmeStatus::LbaOutOfRange | NvmeStatus::InternalError,
                nsid: 1,
                ..
            })
        ),
        "{r:?}"
    );
    // The queue still works after an error status.
    let data = pattern(3, 4096);
    block_on(ch.write(Lba(8), DmaBuf::from_slice(&data).unwrap())).unwrap();
    assert!(block_on(ch.read(Lba(8), DmaBuf::new(4096).unwrap())).unwrap()[..] == data[..]);
    // A namespace that does not exist.
    let e = NvmeTcpDevice::from_controller(c, 77).err().unwrap();
    println!("namespace 77: {e}");
    assert!(e.to_string().contains("namespace 77"), "{e}");
    // A subsystem that does not exist: the target refuses the connect.
    let e = NvmeTcpController::connect(
        &target,
        "nqn.2024-01.io.blobstack:nosuch",
        TcpOptions::default(),
    )
    .err()
    .unwrap();
    println!("wrong NQN: {e}");
    assert!(e.to_string().contains("Fabrics Connect"), "{e}");
    // A port nothing listens on.
    let (host, _) = target.rsplit_once(':').unwrap();
    let e = open_device(&format!("nvme-tcp:{host}:4999/{nqn}"))
        .err()
        .unwrap();
    println!("wrong port: {e}");
    assert!(e.to_string().contains("connect"), "{e}");
    // The spec as given opens (namespace 1).
    let d = open_device(&text).unwrap();
    assert!(d.name().starts_with("nvme-tcp:"), "{}", d.name());
}

fn opts() -> BlobstoreOptions {
    BlobstoreOptions {
        cluster_size: 1 << 20,
        bstype: "tcpvm".into(),
        force: true,
        ..Default::default()
    }
}

/// The port's link to the subsystem in nvmet's configfs.
fn port_link() -> (std::path::PathBuf, std::path::PathBuf) {
    let (_, nqn, _) = spec();
    let root = std::path::PathBuf::from(
        std::env::var("NVME_TCP_TEST_CONFIGFS").expect("needs NVME_TCP_TEST_CONFIGFS"),
    );
    (
        root.join("ports/1/subsystems").join(&nqn),
        root.join("subsystems").join(&nqn),
    )
}

/// Links the subsystem (`.0`) to the port (`.1`) again when dropped.
struct Relink(std::path::PathBuf, std::path::PathBuf);

impl Drop for Relink {
    fn drop(&mut self) {
        if let Err(e) = std::os::unix::fs::symlink(&self.0, &self.1) {
            eprintln!("linking {} again: {e}", self.1.display());
        }
    }
}

#[test]
#[ignore = "needs NVME_TCP_TEST_SPEC: an nvmet-tcp target (make test-vm)"]
fn target_going_away_fails_io_and_a_reopen_loads_cleanly() {
    let (_, _, text) = spec();
    let spec2 = format!("{text}/ns=2");
    let dev = open_device(&spec2).unwrap();
    let bs = block_on(Blobstore::init(dev.clone(), opts())).unwrap();
    let id = block_on(bs.create_blob(BlobOptions {
        num_clusters: 4,
        ..Default::default()
    }))
    .unwrap();
    let kept = Arc::new(pattern(77, 4 << 20));
    block_on(async {
        let b = bs.open_blob(id).await.unwrap();
        b.write(0, DmaBuf::from_slice(&kept).unwrap())
            .await
            .unwrap();
        b.close().await.unwrap();
    });
    block_on(bs.unload()).unwrap();
    drop(dev);
    // I/O on two threads, then the port loses the subsystem mid-I/O.
    let dev = open_device(&spec2).unwrap();
    let bs = Arc::new(block_on(Blobstore::load(dev.clone(), LoadOptions::default())).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..2u64)
        .map(|t| {
            let (bs, stop, kept) = (bs.clone(), stop.clone(), kept.clone());
            std::thread::spawn(move || -> (u64, Option<(String, Instant)>) {
                let mut done = 0;
                let b = match block_on(bs.open_blob(id)) {
                    Ok(b) => b,
                    Err(e) => return (0, Some((e.to_string(), Instant::now()))),
                };
                let unit = b.io_unit_size() as u64;
                while !stop.load(Ordering::Relaxed) {
                    let off = ((done + t) % 4) << 20;
                    let r = block_on(b.read(off / unit, DmaBuf::new(1 << 20).unwrap()));
                    match r {
                        Ok(got) => {
                            assert!(got[..] == kept[off as usize..off as usize + (1 << 20)]);
                            done += 1;
                        }
                        Err(e) => return (done, Some((e.to_string(), Instant::now()))),
                    }
                }
                (done, None)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (link, subsys) = port_link();
    std::fs::remove_file(&link).expect("remove the port's subsystem link");
    // Whatever happens next, the target comes back for the tests after.
    let relink = Relink(subsys.clone(), link.clone());
    let gone = Instant::now();
    // Every worker ends with an error in bounded time (no hang, no panic).
    let deadline = Instant::now() + Duration::from_secs(40);
    while workers.iter().any(|w| !w.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let mut last = Duration::ZERO;
    for w in workers {
        let (done, err) = w.join().expect("no panic in the I/O threads");
        let (err, at) = err.expect("I/O failed after the target went away");
        println!("worker: {done} reads before the target went away, then: {err}");
        assert!(
            err.contains("lost") || err.contains("timeout") || err.contains("closed"),
            "{err}"
        );
        last = last.max(at.saturating_duration_since(gone));
    }
    println!("all I/O failed within {last:?} of the port losing the subsystem");
    assert!(last < Duration::from_secs(35), "bounded by the I/O timeout");
    // Writes fail too, with errors.
    let e = block_on(async {
        let b = bs.open_blob(id).await?;
        b.write(0, DmaBuf::from_slice(&kept[..4096]).unwrap()).await
    });
    assert!(e.is_err(), "a write to a target that went away fails");
    drop(bs);
    drop(dev);
    // A new open while the target is away fails clearly.
    let e = open_device(&spec2).err().expect("no target");
    println!("open while away: {e}");
    // The target comes back: a fresh open loads the store, data intact.
    drop(relink);
    assert!(link.exists(), "the subsystem is linked to the port again");
    let mut dev = None;
    for _ in 0..50 {
        match open_device(&spec2) {
            Ok(d) => {
                dev = Some(d);
                break;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    let dev = dev.expect("the target came back");
    let bs = block_on(Blobstore::load(dev.clone(), LoadOptions::default())).unwrap();
    assert_eq!(bs.blob_ids(), vec![id]);
    let got = block_on(async {
        let b = bs.open_blob(id).await.unwrap();
        b.read(0, DmaBuf::new(kept.len()).unwrap()).await.unwrap()
    });
    assert!(got[..] == kept[..], "data back after the target returned");
    let report = block_on(bs.check()).unwrap();
    println!("after reconnect: {report:?}");
    block_on(bs.unload()).unwrap();
}
