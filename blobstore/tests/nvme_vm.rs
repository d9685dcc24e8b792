//! The NVMe driver on a real controller: QEMU's emulated NVMe device inside
//! the test VM (`make test-vm`, `tests/vm/run.sh`), bound to vfio-pci.
//!
//! Every test is `#[ignore]`d: it needs `NVME_TEST_PCI=<pci address>` of a
//! controller bound to vfio-pci with two namespaces (512- and 4096-byte
//! blocks) whose contents it may destroy. The VM runs them with
//! `--ignored --test-threads=1`.
#![cfg(feature = "nvme")]

mod common;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blobstore::{
    block_on, channel, BlobOptions, Blobstore, BlobstoreOptions, BlockDevice, DmaBuf, Error, Lba,
    LoadOptions, NvmeController, NvmeDevice, NvmeStatus,
};
use common::{pattern, Rng};

const NEEDS: &str = "needs NVME_TEST_PCI: a vfio-pci bound NVMe controller (make test-vm)";

fn ctrl() -> Arc<NvmeController> {
    let pci = std::env::var("NVME_TEST_PCI").expect(NEEDS);
    NvmeController::open(&pci).unwrap()
}

/// The namespace with `block_size`-byte blocks.
fn ns(block_size: u32) -> Arc<dyn BlockDevice> {
    let c = ctrl();
    let (nsid, _) = c
        .namespaces()
        .unwrap()
        .into_iter()
        .find(|(_, n)| n.block_size == block_size)
        .expect("namespace with that block size");
    Arc::new(NvmeDevice::from_controller(c, nsid).unwrap())
}

/// How many rounds of 16 large reads the controller-reset check may take to
/// catch some of them inside the controller.
const ROUNDS_TO_CATCH_IN_FLIGHT: u32 = 10;

#[test]
#[ignore = "needs NVME_TEST_PCI: a vfio-pci bound NVMe controller (make test-vm)"]
fn identify_controller_and_namespaces() {
    let c = ctrl();
    let id = c.identity();
    println!(
        "controller {}: model {:?} serial {:?} firmware {:?} vendor {:#06x} mdts {} \
         (max transfer {} KiB) namespaces {} oncs {:#x} vwc {}",
        c.name(),
        id.model,
        id.serial,
        id.firmware,
        id.vendor_id,
        id.mdts,
        c.max_transfer_bytes() >> 10,
        id.nn,
        id.oncs,
        id.volatile_write_cache
    );
    println!(
        "CAP: {:?}; registers by {}; I/O queue pairs granted {}",
        c.capabilities(),
        c.register_access(),
        c.io_queue_pairs()
    );
    let all = c.namespaces().unwrap();
    for (nsid, n) in &all {
        println!(
            "namespace {nsid}: {} blocks of {} bytes ({} MiB), LBA format {} of {:?}, \
             deallocated reads zeroes {}",
            n.size_blocks,
            n.block_size,
            (n.size_blocks * n.block_size as u64) >> 20,
            n.format_index,
            n.formats,
            n.deallocated_reads_zeroes
        );
    }
    let sizes: Vec<u32> = all.iter().map(|(_, n)| n.block_size).collect();
    assert_eq!(
        sizes,
        vec![512, 4096],
        "two namespaces, 512- and 4096-byte blocks"
    );
    let smart = c.smart_log().unwrap();
    println!("SMART: {smart:?}");
    println!("error log entries: {}", c.error_log().unwrap().len());
    let (chunks, huge, _) = c.pool().stats();
    println!("DMA pool: {chunks} chunks of 2 MiB, {huge} on hugepages");
}

#[test]
#[ignore = "needs NVME_TEST_PCI: a vfio-pci bound NVMe controller (make test-vm)"]
fn write_read_back_flush_deallocate_write_zeroes() {
    for bs in [512u32, 4096] {
        let dev = ns(bs);
        let g = dev.geometry();
        let ch = channel(&dev).unwrap();
        let bsz = bs as usize;
        let mut rng = Rng::new(0x5eed + bs as u64);
        let max_blocks = (6 << 20) / bsz; // several MiB: beyond MDTS, PRP lists
        let t0 = Instant::now();
        let mut bytes = 0;
        for i in 0..40u64 {
            let blocks = match i % 4 {
                0 => 1,
                1 => 1 + rng.below(16) as usize,
                _ => 1 + rng.below(max_blocks as u64) as usize,
            };
            let lba = rng.below(g.block_count - blocks as u64);
            let data = pattern(rng.next_u64(), blocks * bsz);
            // Pool buffers go to the device directly; heap ones are bounced.
            let wbuf = if i % 3 == 2 {
                DmaBuf::from_slice(&data).unwrap()
            } else {
                let mut b = dev.alloc_buf(data.len()).unwrap();
                b.copy_from_slice(&data);
                b
            };
            block_on(ch.write(Lba(lba), wbuf)).unwrap();
            let back = block_on(ch.read(Lba(lba), dev.alloc_buf(data.len()).unwrap())).unwrap();
            assert!(back[..] == data[..], "bs {bs}: {blocks} blocks at {lba}");
            bytes += 2 * data.len();
        }
        block_on(ch.flush()).unwrap();
        println!(
            "bs {bs}: 40 random write/read-back pairs, 1 block to 6 MiB, {} MiB in {:?}",
            bytes >> 20,
            t0.elapsed()
        );
        // Deallocate, then read.
        let n = (1 << 20) / bs as u64;
        block_on(ch.write(
            Lba(0),
            DmaBuf::from_slice(&pattern(1, (n * bs as u64) as usize)).unwrap(),
        ))
        .unwrap();
        match block_on(ch.unmap(Lba(0), n)) {
            Ok(()) => {
                let b = block_on(ch.read(Lba(0), dev.alloc_buf((n * bs as u64) as usize).unwrap()))
                    .unwrap();
                if g.unmap_reads_zeroes {
                    assert!(b.iter().all(|&x| x == 0), "deallocated blocks read zeroes");
                }
                println!(
                    "bs {bs}: deallocate ok (reads zeroes: {})",
                    g.unmap_reads_zeroes
                );
            }
            Err(Error::Unsupported(m)) => println!("bs {bs}: deallocate unsupported: {m}"),
            Err(e) => panic!("deallocate: {e}"),
        }
        // Write zeroes, then read.
        let data = pattern(2, (n * bs as u64) as usize);
        block_on(ch.write(Lba(n), DmaBuf::from_slice(&data).unwrap())).unwrap();
        block_on(ch.write_zeroes(Lba(n + 1), n - 2)).unwrap();
        let b = block_on(ch.read(Lba(n), dev.alloc_buf(data.len()).unwrap())).unwrap();
        assert!(b[..bsz] == data[..bsz]);
        assert!(b[bsz..data.len() - bsz].iter().all(|&x| x == 0));
        assert!(b[data.len() - bsz..] == data[data.len() - bsz..]);
        println!("bs {bs}: write zeroes ok");
    }
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// 16 writes and reads of 4 MiB through `block_on`, read back and
/// checked; returns the thread CPU and wall time spent in the waits alone
/// (not the test's own copying and comparing).
fn big_ops_waiting(dev: &Arc<dyn BlockDevice>, seed: u64) -> (Duration, Duration) {
    let ch = channel(dev).unwrap();
    let (mut cpu, mut wall) = (Duration::ZERO, Duration::ZERO);
    let mut timed = |f: &mut dyn FnMut()| {
        let (c0, t0) = (thread_cpu(), Instant::now());
        f();
        cpu += thread_cpu() - c0;
        wall += t0.elapsed();
    };
    for i in 0..16u64 {
        let data = pattern(seed + i, 4 << 20);
        let mut b = dev.alloc_buf(data.len()).unwrap();
        b.copy_from_slice(&data);
        let mut b = Some(b);
        timed(&mut || {
            block_on(ch.write(Lba(i * 1024), b.take().unwrap())).unwrap();
        });
        let mut back = Some(dev.alloc_buf(data.len()).unwrap());
        timed(&mut || {
            back = Some(block_on(ch.read(Lba(i * 1024), back.take().unwrap())).unwrap());
        });
        let back = back.unwrap();
        assert!(back[..] == data[..], "4 MiB at block {}", i * 1024);
    }
    (cpu, wall)
}

#[test]
#[ignore = "needs NVME_TEST_PCI: a vfio-pci bound NVMe controller (make test-vm)"]
fn a_waiting_thread_sleeps_on_the_completion_interrupt() {
    let c = ctrl();
    assert!(
        c.interrupts(),
        "completion interrupts (MSI-X through VFIO) should be on by default"
    );
    let dev = ns(4096);
    // 4 MiB ops (8 commands each here) outlast block_on's spin many times
    // over: the thread sleeps on its queue's interrupt, and every op still
    // completes with the right bytes. The same ops polled spend a larger
    // share of their waits on the CPU.
    let slept0 = c.interrupt_sleeps();
    let (cpu, wall) = big_ops_waiting(&dev, 0x1dea);
    let slept = c.interrupt_sleeps() - slept0;
    c.set_interrupt_waits(false);
    let (pcpu, pwall) = big_ops_waiting(&dev, 0x2dea);
    c.set_interrupt_waits(true);
    assert_eq!(
        c.interrupt_sleeps() - slept0,
        slept,
        "polled waits do not sleep"
    );
    let share = |c: Duration, w: Duration| c.as_secs_f64() / w.as_secs_f64().max(1e-9);
    println!(
        "32 ops of 4 MiB: {slept} sleeps on the interrupt, waits {cpu:?} of thread CPU in {wall:?} \
         ({:.0}%); polled {pcpu:?} in {pwall:?} ({:.0}%)",
        100.0 * share(cpu, wall),
        100.0 * share(pcpu, pwall)
    );
    assert!(slept > 0, "the waits never slept on the interrupt");
    assert!(
        share(cpu, wall) < share(pcpu, pwall),
        "sleeping on the interrupt should take a smaller share of the waits' time on the CPU than polling"
    );
}

#[test]
#[ignore = "needs NVME_TEST_PCI: a vfio-pci bound NVMe controller (make test-vm)"]
fn four_threads_queue_depth_32_checked() {
    let dev = ns(4096);
    let t0 = Instant::now();
    let ops_per_lane = 100u64;
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let ch = channel(&dev).unwrap();
                let lane_blocks = 64u64;
                // 32 lanes in flight at once, each on its own blocks, each
                // checking what it reads against what it wrote.
                let lanes = (0..32u64).map(|l| {
                    let ch = ch.clone();
                    let dev = dev.clone();
                    async move {
                        let base = (t * 32 + l) * lane_blocks;
                        let mut model = vec![0u64; lane_blocks as usize];
                        let mut rng = Rng::new(t * 1000 + l + 1);
                        for _ in 0..ops_per_lane {
                            let at = rng.below(lane_blocks - 4);
                            let n = 1 + rng.below(4);
                            if rng.below(2) == 0 {
                                let mut b = dev.alloc_buf(n as usize * 4096).unwrap();
                                for k in 0..n as usize {
                                    let seed = rng.next_u64() | 1;
                                    model[at as usize + k] = seed;
                                    b[k * 4096..(k + 1) * 4096]
                                        .copy_from_slice(&pattern(seed, 4096));
                                }
                                ch.write(Lba(base + at), b).await.unwrap();
                            } else {
                                let b = ch
                                    .read(Lba(base + at), dev.alloc_buf(n as usize * 4096).unwrap())
                                    .await
                                    .unwrap();
                                for k in 0..n as usize {
                                    let seed = model[at as usize + k];
                                    let got = &b[k * 4096..(k + 1) * 4096];
                                    if seed != 0 {
                                        assert!(
                                            got == &pattern(seed, 4096)[..],
                                            "thread {t} lane {l}"
                                        );
                                    }
                                }
                            }
                        }
                        // Finally the whole lane, against the model.
                        let all = ch
                            .read(
                                Lba(base),
                                dev.alloc_buf(lane_blocks as usize * 4096).unwrap(),
                            )
                            .await
                            .unwrap();
                        for (k, &seed) in model.iter().enumerate() {
                            if seed != 0 {
                                let got = &all[k * 4096..(k + 1) * 4096];
                                assert!(got == &pattern(seed, 4096)[..], "thread {t} lane {l}");
                            }
                        }
                    }
                });
                block_on(futures::future::join_all(lanes));
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let ops = 4 * 32 * (ops_per_lane + 1);
    println!(
        "4 threads x QD32: {ops} checked random ops in {:?}",
        t0.elapsed()
    );
}

#[test]
#[ignore = "needs NVME_TEST_PCI: a vfio-pci bound NVMe controller (make test-vm)"]
fn errors_are_typed_and_the_device_keeps_working() {
    let c = ctrl();
    let dev = ns(512);
    let ch = channel(&dev).unwrap();
    let check = |what: &str| {
        let data = pattern(what.len() as u64, 4096);
        block_on(ch.write(Lba(8), DmaBuf::from_slice(&data).unwrap())).unwrap();
        let b = block_on(ch.read(Lba(8), dev.alloc_buf(4096).unwrap())).unwrap();
        assert!(b[..] == data[..], "device works after {what}");
    };
    // LBA out of range: caught before the device, and by the controller.
    let n = dev.geometry().block_count;
    let r = block_on(ch.read(Lba(n - 1), dev.alloc_buf(1024).unwrap()));
    println!("read past the end (driver check): {r:?}");
    assert!(matches!(r, Err(Error::OutOfRange { .. })));
    let nsid = c.namespaces().unwrap()[0].0;
    let wide: Arc<dyn BlockDevice> = Arc::new(NvmeDevice::unchecked(c.clone(), nsid, 512, n * 4));
    let r = block_on(
        channel(&wide)
            .unwrap()
            .read(Lba(n + 10), wide.alloc_buf(512).unwrap()),
    );
    println!("read past the end (controller check): {r:?}");
    assert!(matches!(
        r,
        Err(Error::Nvme {
            status: NvmeStatus::LbaOutOfRange,
            ..
        })
    ));
    check("LBA out of range");
    // Unknown namespaces: an inactive id (at most NN: the spec's answer is
    // Invalid Field) and an id past NN (Invalid Namespace or Format).
    assert!(NvmeDevice::from_controller(c.clone(), 77).is_err());
    let past = c.identity().nn + 1000;
    for (nsid, want) in [
        (77, NvmeStatus::InvalidField),
        (past, NvmeStatus::InvalidNamespace),
    ] {
        let ghost: Arc<dyn BlockDevice> =
            Arc::new(NvmeDevice::unchecked(c.clone(), nsid, 512, 1000));
        let r = block_on(
            channel(&ghost)
                .unwrap()
                .read(Lba(0), ghost.alloc_buf(512).unwrap()),
        );
        println!("read of namespace {nsid}: {r:?}");
        assert!(
            matches!(r, Err(Error::Nvme { status, nsid: n, .. }) if status == want && n == nsid)
        );
        check("unknown namespace");
    }
    // Command timeout: a deadline no command can meet. The driver sees
    // time pass in clock ticks while it reaps (a tick is at least 100 us
    // and 32 reaps; under a zero timeout a command is late at the first
    // tick after its own), so the reads are polled without pause
    // (`block_on` may sleep between polls), eight 4 MiB reads at once.
    let mut timed_out = None;
    for _ in 0..20 {
        c.set_io_timeout(Duration::ZERO);
        let reads: Vec<_> = (0..8)
            .map(|_| ch.read(Lba(0), dev.alloc_buf(4 << 20).unwrap()))
            .collect();
        let results = spin_on(futures::future::join_all(reads));
        c.set_io_timeout(Duration::from_secs(30));
        if let Some(e) = results.into_iter().find_map(|r| r.err()) {
            timed_out = Some(e);
            break;
        }
    }
    println!("read with a zero timeout: {timed_out:?}");
    assert!(matches!(timed_out, Some(Error::Timeout { op: "read", .. })));
    check("a timeout");
    println!("error log entries now: {}", c.error_log().unwrap().len());
    // The timed-out commands were aborted without blocking the thread (or,
    // if an Abort did not land, the controller was reset); a real
    // controller's completions never look stray to the driver.
    let counters = c.error_counters();
    println!("error counters: {counters:?}");
    assert!(counters.aborts >= 1, "a timed-out command was aborted");
    assert_eq!(counters.stray_completions, 0);
    assert_eq!(counters.fatal, 0);
}

fn opts() -> BlobstoreOptions {
    BlobstoreOptions {
        cluster_size: 1 << 20,
        bstype: "nvme-vm".into(),
        // The namespaces are scratch space that earlier tests wrote.
        force: true,
        ..Default::default()
    }
}

#[test]
#[ignore = "needs NVME_TEST_PCI: a vfio-pci bound NVMe controller (make test-vm)"]
fn blobstore_persists_across_unload_crash_and_controller_reset() {
    for bs in [512u32, 4096] {
        let dev = ns(bs);
        let c = ctrl();
        let store = block_on(Blobstore::init(dev.clone(), opts())).unwrap();
        let data = pattern(bs as u64, 3 << 20);
        let id = block_on(async {
            let id = store
                .create_blob(BlobOptions {
                    num_clusters: 3,
                    xattrs: vec![("name".into(), b"on nvme".to_vec())],
                    ..Default::default()
                })
                .await
                .unwrap();
            let b = store.open_blob(id).await.unwrap();
            let mut buf = dev.alloc_buf(data.len()).unwrap();
            buf.copy_from_slice(&data);
            b.write(0, buf).await.unwrap();
            b.close().await.unwrap();
            id
        });
        block_on(store.unload()).unwrap();
        c.reset().unwrap();
        // Load after the reset; then a thin blob written while loaded, a
        // reset while I/O is in flight, and a dirty load.
        let store = block_on(Blobstore::load(dev.clone(), LoadOptions::default())).unwrap();
        assert_eq!(store.blob_ids(), vec![id]);
        let thin = block_on(async {
            let b = store.open_blob(id).await.unwrap();
            assert_eq!(b.get_xattr("name").unwrap(), b"on nvme");
            let back = b.read(0, dev.alloc_buf(data.len()).unwrap()).await.unwrap();
            assert!(
                back[..] == data[..],
                "bs {bs}: data after unload + reset + load"
            );
            let thin = store
                .create_blob(BlobOptions {
                    num_clusters: 4,
                    thin_provision: true,
                    ..Default::default()
                })
                .await
                .unwrap();
            let t = store.open_blob(thin).await.unwrap();
            t.write(7, DmaBuf::from_slice(&pattern(9, 8192)).unwrap())
                .await
                .unwrap();
            t.sync_metadata().await.unwrap();
            thin
        });
        // In-flight reads, then a reset: they fail cleanly, nothing hangs.
        // The emulated controller runs on its own host thread and sometimes
        // finishes every read before the reset lands; a round that caught
        // none proves nothing, so try again (each round's errors are still
        // checked) until one catches reads inside the controller.
        let ch = channel(&dev).unwrap();
        let mut caught = None;
        for round in 1..=ROUNDS_TO_CATCH_IN_FLIGHT {
            let inflight: Vec<_> = (0..16u64)
                .map(|i| Box::pin(ch.read(Lba(i * 256), dev.alloc_buf(8 << 20).unwrap())))
                .collect();
            // Poll each once: that submits it (more commands than the ring
            // holds, so some wait in the driver too).
            let waker = futures::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            let mut results = Vec::new();
            let mut waiting = Vec::new();
            for mut f in inflight {
                match f.as_mut().poll(&mut cx) {
                    std::task::Poll::Ready(r) => results.push(r),
                    std::task::Poll::Pending => waiting.push(f),
                }
            }
            let pending = waiting.len();
            c.reset().unwrap();
            results.extend(block_on(futures::future::join_all(waiting)));
            let failed = results.iter().filter(|r| r.is_err()).count();
            for r in &results {
                if let Err(e) = r {
                    assert!(matches!(e, Error::DeviceFailed { .. }), "{e}");
                }
            }
            println!(
                "bs {bs} round {round}: 16 reads of 8 MiB submitted, {pending} pending after \
                 their first poll; at the reset {failed} were still in the controller and \
                 failed with DeviceFailed, the others had completed"
            );
            if failed > 0 {
                caught = Some(round);
                break;
            }
        }
        assert!(
            caught.is_some(),
            "bs {bs}: in {ROUNDS_TO_CATCH_IN_FLIGHT} rounds no read was still in flight at the reset"
        );
        drop(store); // a crash: no unload
        let store = block_on(Blobstore::load(dev.clone(), LoadOptions::default())).unwrap();
        let mut ids = store.blob_ids();
        ids.sort();
        assert_eq!(ids, vec![id, thin]);
        block_on(async {
            let b = store.open_blob(id).await.unwrap();
            let back = b.read(0, dev.alloc_buf(data.len()).unwrap()).await.unwrap();
            assert!(back[..] == data[..]);
            let t = store.open_blob(thin).await.unwrap();
            let unit = t.io_unit_size() as usize;
            let back = t
                .read(0, dev.alloc_buf(unit * 7 + 8192).unwrap())
                .await
                .unwrap();
            assert!(back[..unit * 7].iter().all(|&x| x == 0));
            assert!(back[unit * 7..] == pattern(9, 8192)[..]);
        });
        block_on(store.unload()).unwrap();
        println!("bs {bs}: blobstore init/write/unload/reset/load/crash/load verified");
    }
}

const CHILD_ENV: &str = "NVME_VM_CHILD_OPEN";

/// One opener per namespace: a second `NvmeDevice::open` in this process
/// and an open from another process (this binary, re-run as a child while
/// this process holds the VFIO group) both get "in use".
#[test]
#[ignore]
fn second_open_is_in_use() {
    let pci = std::env::var("NVME_TEST_PCI").expect(NEEDS);
    if std::env::var(CHILD_ENV).is_ok() {
        match NvmeDevice::open(&pci, 1) {
            Ok(_) => println!("CHILD: opened"),
            Err(e) => println!("CHILD: {e}"),
        }
        std::process::exit(0);
    }
    let first = NvmeDevice::open(&pci, 1).unwrap();
    let e = NvmeDevice::open(&pci, 1).err().expect("a second opener");
    assert_eq!(
        e.to_string(),
        format!(
            "busy: nvme:{pci}/ns=1 is in use by another device of this process (one opener per \
             namespace)"
        )
    );
    // Through a spec, too.
    let e = blobstore::open_device(&format!("nvme:{pci}/ns=1"))
        .err()
        .expect("a second opener");
    assert!(matches!(e, Error::Busy(_)), "{e}");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "second_open_is_in_use",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("CHILD: ").map(|(_, r)| r.to_string()))
        .unwrap_or_else(|| panic!("no child line: {stdout}"));
    let group = std::fs::read_link(format!("/sys/bus/pci/devices/{pci}/iommu_group"))
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert_eq!(
        line,
        format!(
            "busy: nvme:{pci} is in use: its VFIO group /dev/vfio/{group} is held by another \
             process"
        )
    );
    drop(first);
    // Once dropped, this process opens it again.
    NvmeDevice::open(&pci, 1).unwrap();
}

/// Polls `f` until it is ready, never sleeping: every poll reaps the
/// channel (the driver's clock advances only while it reaps).
fn spin_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}
