//! The driver against the software NVMe controller ([`super::soft`]), its
//! twin of BAR0 and DMA: queue, PRP and command encoding, and the error
//! paths (stray completions, fatal status, timeouts, retries), tested end to
//! end without hardware.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::soft::{SoftController, SoftFeatures};
use super::{ControllerOptions, NvmeController, NvmeDevice};
use crate::device::{channel, BlockDevice, DmaBuf, Lba};
use crate::error::{Error, NvmeStatus};
use crate::{block_on, BlobOptions, Blobstore, BlobstoreOptions, LoadOptions};

fn setup(mdts: u8, oncs: u16) -> (Arc<SoftController>, Arc<NvmeController>) {
    SoftController::attach(mdts, oncs).unwrap()
}

/// A plain controller, one with shadow doorbells and one with SGLs (dword
/// aligned), for tests that must hold on each.
fn setups(mdts: u8, oncs: u16) -> Vec<(Arc<SoftController>, Arc<NvmeController>)> {
    let shadow = setup_featured(mdts, oncs, true, true);
    assert!(shadow.1.shadow_doorbells());
    let sgl = attach(mdts, oncs, sgl_features(2), ControllerOptions::default());
    assert!(sgl.1.uses_sgl());
    vec![setup(mdts, oncs), shadow, sgl]
}

fn attach(
    mdts: u8,
    oncs: u16,
    features: SoftFeatures,
    opts: ControllerOptions,
) -> (Arc<SoftController>, Arc<NvmeController>) {
    SoftController::attach_featured(
        mdts,
        oncs,
        &[(512, 8 << 20), (4096, 16 << 20)],
        features,
        opts,
    )
    .unwrap()
}

fn sgl_features(sgls: u32) -> SoftFeatures {
    SoftFeatures {
        sgls,
        ..Default::default()
    }
}

/// A controller offering shadow doorbells (`offered`), attached with them
/// on or off (`used`).
fn setup_featured(
    mdts: u8,
    oncs: u16,
    offered: bool,
    used: bool,
) -> (Arc<SoftController>, Arc<NvmeController>) {
    attach(
        mdts,
        oncs,
        SoftFeatures {
            shadow_doorbells: offered,
            ..Default::default()
        },
        ControllerOptions {
            shadow_doorbells: used,
            ..Default::default()
        },
    )
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    crate::util::SplitMix64::bytes(seed, len)
}

#[test]
fn bring_up_identify_and_logs() {
    let (_m, ctrl) = setup(5, 0b1100);
    let id = ctrl.identity();
    assert_eq!(
        (id.serial.as_str(), id.model.as_str()),
        ("MODEL001", "Model NVMe")
    );
    assert_eq!(ctrl.max_transfer_bytes(), 128 << 10);
    assert_eq!(ctrl.io_queue_pairs(), 16);
    let ns = ctrl.namespaces().unwrap();
    assert_eq!(ns.len(), 2);
    assert_eq!((ns[0].0, ns[0].1.block_size), (1, 512));
    assert_eq!((ns[1].0, ns[1].1.block_size), (2, 4096));
    assert_eq!(ctrl.smart_log().unwrap().temperature_kelvin, 300);
    assert!(ctrl.error_log().unwrap().is_empty());
    assert!(NvmeDevice::from_controller(ctrl.clone(), 3).is_err());
}

#[test]
fn write_read_back_across_mdts_prp_lists_and_bounces() {
    // 32 KiB per command.
    for (model, ctrl) in setups(3, 0b1100) {
        write_read_back_on(model, ctrl);
    }
}

fn write_read_back_on(model: Arc<SoftController>, ctrl: Arc<NvmeController>) {
    model.st.lock().log_io = true;
    for nsid in [1, 2] {
        let dev: Arc<dyn BlockDevice> =
            Arc::new(NvmeDevice::from_controller(ctrl.clone(), nsid).unwrap());
        let ch = channel(&dev).unwrap();
        let g = dev.geometry();
        let bs = g.block_size as usize;
        let mut x = 7u64;
        for i in 0..60u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let blocks = 1 + (x >> 33) as usize % ((3 << 20) / bs);
            let lba = (x >> 13) % (g.block_count - blocks as u64);
            let data = pattern(i, blocks * bs);
            // Alternate pool buffers (no copy) and heap buffers (bounced).
            let wbuf = if i % 2 == 0 {
                let mut b = dev.alloc_buf(data.len()).unwrap();
                b.copy_from_slice(&data);
                b
            } else {
                DmaBuf::from_slice(&data).unwrap()
            };
            block_on(ch.write(Lba(lba), wbuf)).unwrap();
            let rbuf = if i % 3 == 0 {
                DmaBuf::new(data.len()).unwrap()
            } else {
                dev.alloc_buf(data.len()).unwrap()
            };
            let back = block_on(ch.read(Lba(lba), rbuf)).unwrap();
            assert!(
                back[..] == data[..],
                "ns {nsid} op {i}: {blocks} blocks at {lba}"
            );
            let ns = model.namespaces[nsid as usize - 1].1.lock();
            assert!(ns[lba as usize * bs..][..data.len()] == data[..]);
        }
        // Vectored I/O with pieces that cannot share one PRP list.
        let parts = [bs, 3 * bs, 4096 * 2, bs];
        let bufs: Vec<DmaBuf> = parts
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let mut b = dev.alloc_buf(n).unwrap();
                b.copy_from_slice(&pattern(100 + i as u64, n));
                b
            })
            .collect();
        let all: Vec<u8> = bufs.iter().flat_map(|b| b.to_vec()).collect();
        block_on(ch.writev(Lba(10), bufs)).unwrap();
        let back = block_on(ch.read(Lba(10), dev.alloc_buf(all.len()).unwrap())).unwrap();
        assert!(back[..] == all[..]);
        // Pool pieces joined inside a block cannot be described: bounced.
        let halves: Vec<DmaBuf> = [bs / 2, bs + bs / 2]
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let mut b = dev.alloc_buf(n).unwrap();
                b.copy_from_slice(&pattern(200 + i as u64, n));
                b
            })
            .collect();
        let all: Vec<u8> = halves.iter().flat_map(|b| b.to_vec()).collect();
        block_on(ch.writev(Lba(20), halves)).unwrap();
        let back = block_on(ch.read(Lba(20), dev.alloc_buf(all.len()).unwrap())).unwrap();
        assert!(back[..] == all[..]);
        block_on(ch.flush()).unwrap();
    }
    let log = std::mem::take(&mut model.st.lock().io_log);
    assert!(log.iter().all(|&(_, n)| n as u64 * 512 <= 32 << 10));
}

#[test]
fn many_ops_wrap_the_rings() {
    for (_m, ctrl) in setups(5, 0b1100) {
        many_ops_wrap_the_rings_on(ctrl);
    }
}

fn many_ops_wrap_the_rings_on(ctrl: Arc<NvmeController>) {
    let dev: Arc<dyn BlockDevice> = Arc::new(NvmeDevice::from_controller(ctrl, 2).unwrap());
    let ch = channel(&dev).unwrap();
    block_on(async {
        for round in 0..3u64 {
            // 600 writes at once: more than the ring holds, so commands wait
            // in the pending list and the phase tag flips.
            let futs: Vec<_> = (0..600u64)
                .map(|i| {
                    let mut b = dev.alloc_buf(4096).unwrap();
                    b.copy_from_slice(&pattern(round * 1000 + i, 4096));
                    ch.write(Lba(i), b)
                })
                .collect();
            for f in futures::future::join_all(futs).await {
                f.unwrap();
            }
            for i in (0..600u64).step_by(37) {
                let b = ch.read(Lba(i), dev.alloc_buf(4096).unwrap()).await.unwrap();
                assert!(b[..] == pattern(round * 1000 + i, 4096)[..]);
            }
        }
    });
}

#[test]
fn four_threads_each_with_a_queue_pair() {
    for (_m, ctrl) in setups(5, 0b1100) {
        four_threads_on(ctrl);
    }
}

fn four_threads_on(ctrl: Arc<NvmeController>) {
    let dev: Arc<dyn BlockDevice> = Arc::new(NvmeDevice::from_controller(ctrl, 1).unwrap());
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let ch = channel(&dev).unwrap();
                let region = 1024 * t; // disjoint 512 KiB regions
                block_on(async {
                    let futs: Vec<_> = (0..32u64)
                        .map(|i| {
                            let mut b = dev.alloc_buf(16 * 512).unwrap();
                            b.copy_from_slice(&pattern(t * 100 + i, 16 * 512));
                            ch.write(Lba(region + i * 16), b)
                        })
                        .collect();
                    for f in futures::future::join_all(futs).await {
                        f.unwrap();
                    }
                    for i in 0..32u64 {
                        let b = ch
                            .read(Lba(region + i * 16), dev.alloc_buf(8192).unwrap())
                            .await
                            .unwrap();
                        assert!(b[..] == pattern(t * 100 + i, 8192)[..]);
                    }
                });
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn unmap_and_write_zeroes_native_and_emulated() {
    for oncs in [0b1100u16, 0] {
        let (_m, ctrl) = setup(5, oncs);
        let nd = NvmeDevice::from_controller(ctrl, 2).unwrap();
        assert_eq!(nd.supports_unmap(), oncs != 0);
        let dev: Arc<dyn BlockDevice> = Arc::new(nd);
        let ch = channel(&dev).unwrap();
        let data = pattern(5, 64 * 4096);
        block_on(ch.write(Lba(0), DmaBuf::from_slice(&data).unwrap())).unwrap();
        block_on(ch.write_zeroes(Lba(8), 40)).unwrap();
        let b = block_on(ch.read(Lba(0), dev.alloc_buf(data.len()).unwrap())).unwrap();
        assert!(b[..8 * 4096] == data[..8 * 4096]);
        assert!(b[8 * 4096..48 * 4096].iter().all(|&x| x == 0));
        assert!(b[48 * 4096..] == data[48 * 4096..]);
        let r = block_on(ch.unmap(Lba(0), 4));
        if oncs != 0 {
            r.unwrap();
            assert!(dev.geometry().unmap_reads_zeroes);
            let b = block_on(ch.read(Lba(0), dev.alloc_buf(4 * 4096).unwrap())).unwrap();
            assert!(b.iter().all(|&x| x == 0));
        } else {
            assert!(matches!(r, Err(Error::Unsupported(_))), "{r:?}");
        }
    }
}

#[test]
fn controller_errors_are_typed_and_the_device_keeps_working() {
    let (_m, ctrl) = setup(5, 0b1100);
    let good: Arc<dyn BlockDevice> =
        Arc::new(NvmeDevice::from_controller(ctrl.clone(), 1).unwrap());
    let ghost: Arc<dyn BlockDevice> = Arc::new(NvmeDevice::unchecked(ctrl.clone(), 9, 512, 1000));
    let r = block_on(
        channel(&ghost)
            .unwrap()
            .read(Lba(0), ghost.alloc_buf(512).unwrap()),
    );
    assert!(
        matches!(
            r,
            Err(Error::Nvme {
                status: NvmeStatus::InvalidNamespace,
                nsid: 9,
                ..
            })
        ),
        "{r:?}"
    );
    let big: Arc<dyn BlockDevice> = Arc::new(NvmeDevice::unchecked(ctrl.clone(), 1, 512, 1 << 40));
    let r = block_on(
        channel(&big)
            .unwrap()
            .read(Lba(1 << 30), big.alloc_buf(512).unwrap()),
    );
    assert!(
        matches!(
            r,
            Err(Error::Nvme {
                status: NvmeStatus::LbaOutOfRange,
                ..
            })
        ),
        "{r:?}"
    );
    let ch = channel(&good).unwrap();
    let r = block_on(ch.read(
        Lba(good.geometry().block_count),
        good.alloc_buf(512).unwrap(),
    ));
    assert!(
        matches!(r, Err(Error::OutOfRange { .. })),
        "checked before the device"
    );
    block_on(ch.write(Lba(3), DmaBuf::from_slice(&[7u8; 512]).unwrap())).unwrap();
    let b = block_on(ch.read(Lba(3), good.alloc_buf(512).unwrap())).unwrap();
    assert!(b.iter().all(|&x| x == 7));
}

#[test]
fn timeout_fails_the_op_keeps_memory_and_recovers() {
    let (model, ctrl) = setup(5, 0b1100);
    let dev: Arc<dyn BlockDevice> = Arc::new(NvmeDevice::from_controller(ctrl.clone(), 1).unwrap());
    let ch = channel(&dev).unwrap();
    block_on(ch.write(Lba(0), DmaBuf::from_slice(&[1u8; 4096]).unwrap())).unwrap();
    model.st.lock().hold_reads = true;
    ctrl.set_io_timeout(Duration::from_millis(20));
    let r = block_on(ch.read(Lba(0), dev.alloc_buf(4096).unwrap()));
    assert!(matches!(r, Err(Error::Timeout { op: "read", .. })), "{r:?}");
    // The controller finishes the command late: it is dropped quietly.
    model.release_held();
    ctrl.set_io_timeout(Duration::from_secs(5));
    let b = block_on(ch.read(Lba(0), dev.alloc_buf(4096).unwrap())).unwrap();
    assert!(b.iter().all(|&x| x == 1));
}

#[test]
fn reset_fails_in_flight_and_queues_come_back() {
    for (model, ctrl) in setups(5, 0b1100) {
        reset_fails_in_flight_on(model, ctrl);
    }
}

fn reset_fails_in_flight_on(model: Arc<SoftController>, ctrl: Arc<NvmeController>) {
    let shadow = ctrl.shadow_doorbells();
    let dev: Arc<dyn BlockDevice> = Arc::new(NvmeDevice::from_controller(ctrl.clone(), 2).unwrap());
    let ch = channel(&dev).unwrap();
    block_on(ch.write(Lba(5), DmaBuf::from_slice(&[9u8; 4096]).unwrap())).unwrap();
    model.st.lock().hold_reads = true;
    let fut = ch.read(Lba(5), dev.alloc_buf(4096).unwrap());
    let mut fut = Box::pin(fut);
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    ctrl.reset().unwrap();
    let r = block_on(fut);
    assert!(matches!(r, Err(Error::DeviceFailed { .. })), "{r:?}");
    model.st.lock().hold_reads = false;
    let b = block_on(ch.read(Lba(5), dev.alloc_buf(4096).unwrap())).unwrap();
    assert!(b.iter().all(|&x| x == 9));
    // A fatal status is reported, and a reset clears it.
    model.st.lock().fatal = true;
    model.st.lock().hold_reads = true;
    ctrl.set_io_timeout(Duration::from_millis(5));
    let r = block_on(ch.read(Lba(5), dev.alloc_buf(4096).unwrap()));
    assert!(matches!(r, Err(Error::DeviceFailed { .. })), "{r:?}");
    assert!(ctrl.is_failed());
    ctrl.reset().unwrap();
    model.st.lock().hold_reads = false;
    ctrl.set_io_timeout(Duration::from_secs(5));
    let b = block_on(ch.read(Lba(5), dev.alloc_buf(4096).unwrap())).unwrap();
    assert!(b.iter().all(|&x| x == 9));
    // Each reset gave the controller its shadow pages again.
    assert_eq!(model.st.lock().dbbuf_configs, if shadow { 3 } else { 0 });
}

#[test]
fn blobstore_persists_on_the_model_across_a_reset() {
    let (_m, ctrl) = setup(5, 0b1100);
    for nsid in [1, 2] {
        let dev: Arc<dyn BlockDevice> =
            Arc::new(NvmeDevice::from_controller(ctrl.clone(), nsid).unwrap());
        let opts = BlobstoreOptions {
            cluster_size: 64 << 10,
            bstype: "nvme".into(),
            ..Default::default()
        };
        let bs = block_on(Blobstore::init(dev.clone(), opts)).unwrap();
        let data = pattern(nsid as u64, 3 * (64 << 10));
        let id = block_on(async {
            let id = bs
                .create_blob(BlobOptions {
                    num_clusters: 3,
                    ..Default::default()
                })
                .await
                .unwrap();
            let b = bs.open_blob(id).await.unwrap();
            b.write(0, DmaBuf::from_slice(&data).unwrap())
                .await
                .unwrap();
            b.close().await.unwrap();
            id
        });
        block_on(bs.unload()).unwrap();
        ctrl.reset().unwrap();
        let bs = block_on(Blobstore::load(dev.clone(), LoadOptions::default())).unwrap();
        assert_eq!(bs.blob_ids(), vec![id]);
        let back = block_on(async {
            let b = bs.open_blob(id).await.unwrap();
            b.read(0, dev.alloc_buf(data.len()).unwrap()).await.unwrap()
        });
        assert!(back[..] == data[..]);
    }
}

#[test]
fn a_namespace_has_one_opener_per_process() {
    // The claim NvmeDevice::open takes (the controller itself needs
    // hardware; the VM test opens a real one twice).
    let pci = "test:claims";
    let first = super::controller::NamespaceClaim::take(pci, 1).unwrap();
    let other_ns = super::controller::NamespaceClaim::take(pci, 2).unwrap();
    let e = super::controller::NamespaceClaim::take(pci, 1)
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        "busy: nvme:test:claims/ns=1 is in use by another device of this process (one opener \
         per namespace)"
    );
    drop(first);
    let again = super::controller::NamespaceClaim::take(pci, 1).unwrap();
    drop((again, other_ns));
}

/// Polls `fut` to completion by hand, checking that no single poll blocks
/// the thread for long; returns the output and the longest poll.
fn drive<F: Future>(fut: F) -> (F::Output, Duration) {
    let mut fut = std::pin::pin!(fut);
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    let mut longest = Duration::ZERO;
    let start = std::time::Instant::now();
    loop {
        let t = std::time::Instant::now();
        let r = fut.as_mut().poll(&mut cx);
        longest = longest.max(t.elapsed());
        if let std::task::Poll::Ready(v) = r {
            return (v, longest);
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "operation never finished"
        );
    }
}

#[test]
fn a_stray_completion_is_counted_and_completes_nothing() {
    let (model, ctrl) = setup(5, 0b1100);
    let dev: Arc<dyn BlockDevice> = Arc::new(NvmeDevice::from_controller(ctrl.clone(), 2).unwrap());
    let ch = channel(&dev).unwrap();
    block_on(ch.write(Lba(3), DmaBuf::from_slice(&pattern(3, 4096)).unwrap())).unwrap();
    model.st.lock().hold_reads = true;
    let mut held = Box::pin(ch.read(Lba(3), dev.alloc_buf(4096).unwrap()));
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(held.as_mut().poll(&mut cx).is_pending());
    // Completions for ids that are not outstanding: the one the held read
    // does not use, and one past every id.
    let qid = model.st.lock().held[0].0;
    let held_cid = model.st.lock().held[0].1;
    model.post_stray(qid, held_cid + 1);
    model.post_stray(qid, 4000);
    for _ in 0..10 {
        assert!(
            held.as_mut().poll(&mut cx).is_pending(),
            "a stray completed it"
        );
    }
    assert_eq!(ctrl.error_counters().stray_completions, 2);
    model.st.lock().hold_reads = false;
    // Ids stay unique: many ops at once all land where they should.
    block_on(async {
        let writes: Vec<_> = (0..100u64)
            .map(|i| ch.write(Lba(100 + i), DmaBuf::from_slice(&pattern(i, 4096)).unwrap()))
            .collect();
        for w in futures::future::join_all(writes).await {
            w.unwrap();
        }
        let reads: Vec<_> = (0..100u64)
            .map(|i| ch.read(Lba(100 + i), dev.alloc_buf(4096).unwrap()))
            .collect();
        for (i, r) in futures::future::join_all(reads)
            .await
            .into_iter()
            .enumerate()
        {
            assert!(r.unwrap()[..] == pattern(i as u64, 4096)[..], "op {i}");
        }
    });
    // Its own completion (the model posts it without moving data) ends it.
    model.release_held();
    block_on(held).unwrap();
    assert_eq!(ctrl.error_counters().stray_completions, 2);
}

#[test]
fn fatal_status_disables_the_controller_before_failing_commands() {
    let (model, ctrl) = setup(5, 0b1100);
    let dev: Arc<dyn BlockDevice> = Arc::new(NvmeDevice::from_controller(ctrl.clone(), 2).unwrap());
    let ch = channel(&dev).unwrap();
    block_on(ch.write(Lba(5), DmaBuf::from_slice(&[9u8; 4096]).unwrap())).unwrap();
    ctrl.set_io_timeout(Duration::from_millis(40));
    model.st.lock().hold_reads = true;
    let reads: Vec<_> = (0..3)
        .map(|_| ch.read(Lba(5), dev.alloc_buf(4096).unwrap()))
        .collect();
    model.st.lock().fatal = true;
    for r in block_on(futures::future::join_all(reads)) {
        let e = r.unwrap_err();
        assert!(
            matches!(&e, Error::DeviceFailed { reason, .. } if reason.contains("fatal")),
            "{e:?}"
        );
        // The op's memory is released when it is reported: by then the
        // controller is disabled and not ready.
        let st = model.st.lock();
        assert!(!st.enabled() && !st.ready());
    }
    {
        let st = model.st.lock();
        assert_eq!(st.disables, 1);
        assert_eq!(
            st.disabled_with_held,
            Some(3),
            "disabled while it still held the three reads"
        );
    }
    assert!(ctrl.is_failed());
    assert_eq!(ctrl.error_counters().fatal, 1);
    let r = block_on(ch.read(Lba(5), dev.alloc_buf(4096).unwrap()));
    assert!(matches!(r, Err(Error::DeviceFailed { .. })), "{r:?}");
    ctrl.reset().unwrap();
    model.st.lock().hold_reads = false;
    let b = block_on(ch.read(Lba(5), dev.alloc_buf(4096).unwrap())).unwrap();
    assert!(b.iter().all(|&x| x == 9));
}

#[test]
fn a_timed_out_command_is_aborted_and_reported_when_the_abort_lands() {
    let (model, ctrl) = setup(5, 0b1100);
    let dev: Arc<dyn BlockDevice> = Arc::new(NvmeDevice::from_controller(ctrl.clone(), 1).unwrap());
    let ch = channel(&dev).unwrap();
    block_on(ch.write(Lba(0), DmaBuf::from_slice(&[1u8; 4096]).unwrap())).unwrap();
    {
        let mut st = model.st.lock();
        st.hold_reads = true;
        st.abort_completes = true;
    }
    ctrl.set_io_timeout(Duration::from_millis(20));
    let (r, _) = drive(ch.read(Lba(0), dev.alloc_buf(4096).unwrap()));
    assert!(matches!(r, Err(Error::Timeout { op: "read", .. })), "{r:?}");
    assert_eq!(model.st.lock().aborts, 1);
    let c = ctrl.error_counters();
    assert_eq!((c.aborts, c.resets), (1, 0), "the abort sufficed: no reset");
    assert_eq!(model.st.lock().disables, 0);
    model.st.lock().hold_reads = false;
    let b = block_on(ch.read(Lba(0), dev.alloc_buf(4096).unwrap())).unwrap();
    assert!(b.iter().all(|&x| x == 1));
}

#[test]
fn an_abort_that_does_not_land_resets_the_controller_without_blocking() {
    let (model, ctrl) = setup(5, 0b1100);
    let dev: Arc<dyn BlockDevice> = Arc::new(NvmeDevice::from_controller(ctrl.clone(), 1).unwrap());
    let ch = channel(&dev).unwrap();
    block_on(ch.write(Lba(0), DmaBuf::from_slice(&[1u8; 4096]).unwrap())).unwrap();
    {
        let mut st = model.st.lock();
        st.hold_reads = true;
        st.hold_aborts = true;
    }
    ctrl.set_io_timeout(Duration::from_millis(30));
    let timed_out = ch.read(Lba(0), dev.alloc_buf(4096).unwrap());
    let (r, longest) = drive(timed_out);
    assert!(matches!(r, Err(Error::Timeout { op: "read", .. })), "{r:?}");
    // The Abort never completes: waiting for it (the admin timeout is 10 s)
    // would block the thread; only the reset's own handshake may take time.
    assert!(
        longest < Duration::from_secs(2),
        "a poll blocked for {longest:?}"
    );
    let c = ctrl.error_counters();
    assert_eq!((c.aborts, c.resets), (1, 1));
    {
        let st = model.st.lock();
        assert_eq!(st.disables, 1);
        assert!(st.held.is_empty() && st.enabled());
    }
    model.st.lock().hold_reads = false;
    ctrl.set_io_timeout(Duration::from_secs(5));
    let b = block_on(ch.read(Lba(0), dev.alloc_buf(4096).unwrap())).unwrap();
    assert!(b.iter().all(|&x| x == 1));
}

#[test]
fn retryable_statuses_are_retried_a_bounded_number_of_times() {
    let (model, ctrl) = setup(5, 0b1100);
    let dev: Arc<dyn BlockDevice> = Arc::new(NvmeDevice::from_controller(ctrl.clone(), 2).unwrap());
    let ch = channel(&dev).unwrap();
    let attempts = |f: &dyn Fn()| {
        model.st.lock().io_log.clear();
        f();
        model.st.lock().io_log.len()
    };
    model.st.lock().log_io = true;
    // Namespace Not Ready twice, DNR clear: the write goes through.
    let n = attempts(&|| {
        model
            .st
            .lock()
            .fail_next
            .extend([(0, 0x82, false), (0, 0x82, false)]);
        block_on(ch.write(Lba(7), DmaBuf::from_slice(&[4u8; 4096]).unwrap())).unwrap();
    });
    assert_eq!(n, 3);
    assert_eq!(ctrl.error_counters().retries, 2);
    let b = block_on(ch.read(Lba(7), dev.alloc_buf(4096).unwrap())).unwrap();
    assert!(b.iter().all(|&x| x == 4));
    // Always failing: bounded, then the status is reported.
    let n = attempts(&|| {
        model
            .st
            .lock()
            .fail_next
            .extend(std::iter::repeat_n((0, 0x82, false), 20));
        let r = block_on(ch.read(Lba(7), dev.alloc_buf(4096).unwrap()));
        assert!(matches!(r, Err(Error::Nvme { op: "read", .. })), "{r:?}");
    });
    assert_eq!(n, 1 + super::io::MAX_RETRIES as usize);
    model.st.lock().fail_next.clear();
    // DNR set: not retried.
    let n = attempts(&|| {
        model.st.lock().fail_next.push_back((2, 0x81, true));
        let r = block_on(ch.read(Lba(7), dev.alloc_buf(4096).unwrap()));
        assert!(
            matches!(
                r,
                Err(Error::Nvme {
                    status: NvmeStatus::UnrecoveredReadError,
                    ..
                })
            ),
            "{r:?}"
        );
    });
    assert_eq!(n, 1);
}

/// Allocations made by this thread (the counting allocator below).
mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static ALLOCS: Cell<u64> = const { Cell::new(0) };
    }

    pub struct Counting;

    // SAFETY: forwards to the system allocator; the thread-local counter
    // is a const-initialised Cell without a destructor, so touching it
    // never allocates.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            ALLOCS.with(|c| c.set(c.get() + 1));
            // SAFETY: the caller's layout, as GlobalAlloc requires.
            unsafe { System.alloc(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            // SAFETY: `p` came from `alloc` with layout `l`.
            unsafe { System.dealloc(p, l) }
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
            ALLOCS.with(|c| c.set(c.get() + 1));
            // SAFETY: as for `dealloc`.
            unsafe { System.realloc(p, l, n) }
        }
    }

    pub fn allocations() -> u64 {
        ALLOCS.with(|c| c.get())
    }
}

#[global_allocator]
static COUNTING: counting::Counting = counting::Counting;

/// The controllers the zero-allocation tests run on: plain, shadow
/// doorbells, SGLs (dword aligned).
fn named_setups() -> Vec<(&'static str, Arc<SoftController>, Arc<NvmeController>)> {
    ["plain", "shadow doorbells", "SGL"]
        .into_iter()
        .zip(setups(5, 0b1100))
        .map(|(name, (model, ctrl))| (name, model, ctrl))
        .collect()
}

#[test]
fn steady_state_io_on_the_driver_allocates_nothing() {
    use crate::device::{IoKind, IoOp, Segments};
    for (name, model, ctrl) in named_setups() {
        let sgl = ctrl.uses_sgl();
        let dev = NvmeDevice::from_controller(ctrl, 2).unwrap();
        let mut backend = dev.new_backend().unwrap();
        let bufs: Vec<DmaBuf> = (0..4).map(|_| dev.alloc_buf(4096).unwrap()).collect();
        // 4 KiB in one piece (PRPs); on the SGL controller in two halves
        // that join mid-page, which PRPs cannot describe in one command
        // and one SGL command (its descriptor list in the tracker's page)
        // can: the direct SGL path.
        let segs = |i: usize| -> Segments {
            if sgl {
                [
                    bufs[i].segment(0, 2048),
                    bufs[(i + 1) % 4].segment(2048, 2048),
                ]
                .into_iter()
                .collect()
            } else {
                Segments::one(bufs[i].segment(0, 4096))
            }
        };
        let ops: Vec<IoOp> = [IoKind::Write, IoKind::Read]
            .iter()
            .flat_map(|&kind| {
                (0..4).map(move |i| IoOp {
                    kind,
                    lba: Lba(8 * i as u64),
                    blocks: 1,
                    segs: segs(i),
                })
            })
            .collect();
        let mut run = |rounds: usize, qd: usize| {
            let mut done = 0;
            for round in 0..rounds {
                for (k, op) in ops.iter().enumerate().skip(round % 2 * 4).take(qd) {
                    backend.submit(k as u32, op).unwrap();
                }
                let mut left = qd;
                while left > 0 {
                    left -= backend.reap(&mut |_, r| {
                        r.unwrap();
                        done += 1;
                    });
                }
            }
            done
        };
        run(100, 4); // warm up: op table, rings
        for qd in [1, 4] {
            let sgl_before = model.st.lock().sgl_commands;
            let before = counting::allocations();
            let done = run(5000, qd);
            let allocs = counting::allocations() - before;
            assert_eq!(done, 5000 * qd);
            assert_eq!(
                allocs, 0,
                "{name}: {allocs} allocations in {done} I/Os at queue depth {qd}"
            );
            let sgl_commands = model.st.lock().sgl_commands - sgl_before;
            assert_eq!(sgl_commands, if sgl { done as u64 } else { 0 }, "{name}");
        }
    }
}

/// The whole data path on the calling thread: blob reads and writes and
/// raw channel reads and writes through [`block_on`], at queue depth 1 and
/// 4, with a second device's channel in use at the same time (on NVMe a
/// second namespace of the controller, so the thread's one queue pair
/// reaps completions for the other channel too), on every controller
/// setup and on `MemDevice`.
#[test]
fn steady_state_data_path_allocates_nothing() {
    /// What runs on, the device with the blob, the other device.
    type Case = (String, Arc<dyn BlockDevice>, Arc<dyn BlockDevice>);
    let mut cases: Vec<Case> = named_setups()
        .into_iter()
        .map(|(name, _model, ctrl)| {
            let ns2: Arc<dyn BlockDevice> =
                Arc::new(NvmeDevice::from_controller(ctrl.clone(), 2).unwrap());
            let ns1: Arc<dyn BlockDevice> = Arc::new(NvmeDevice::from_controller(ctrl, 1).unwrap());
            (format!("nvme ({name})"), ns2, ns1)
        })
        .collect();
    let mem =
        |size| -> Arc<dyn BlockDevice> { Arc::new(crate::MemDevice::new(size, 4096).unwrap()) };
    cases.push(("mem".into(), mem(16 << 20), mem(1 << 20)));
    for (name, dev, other) in cases {
        let opts = BlobstoreOptions {
            cluster_size: 1 << 20,
            ..Default::default()
        };
        let bs = block_on(Blobstore::init(dev.clone(), opts)).unwrap();
        let blob = block_on(async {
            let id = bs
                .create_blob(BlobOptions {
                    num_clusters: 4,
                    ..Default::default()
                })
                .await
                .unwrap();
            bs.open_blob(id).await.unwrap()
        });
        let raw = channel(&dev).unwrap();
        let other = channel(&other).unwrap();
        // A block of the blob's own data region, for the raw I/O: read and
        // written back unchanged, so the store is not disturbed.
        let raw_lba = dev.geometry().block_count - 1;
        let mut bufs: Vec<Option<DmaBuf>> =
            (0..4).map(|_| Some(dev.alloc_buf(4096).unwrap())).collect();
        let mut run = |n: u64| {
            for i in 0..n {
                let at = (i * 7) % 1000;
                let [b0, b1, b2, b3] = [0, 1, 2, 3].map(|k| bufs[k].take().unwrap());
                // Queue depth 1: blob write and read, raw read and write.
                let b0 = block_on(blob.write(at, b0)).unwrap();
                let b0 = block_on(blob.read(at, b0)).unwrap();
                let b1 = block_on(raw.read(Lba(raw_lba), b1)).unwrap();
                let b1 = block_on(raw.write(Lba(raw_lba), b1)).unwrap();
                // Queue depth 4, two channels: their completions share a
                // queue pair on NVMe.
                let (r0, r1, r2, r3) = block_on(async {
                    futures::join!(
                        blob.write(at, b0),
                        other.read(Lba(i % 64), b1),
                        blob.read((at + 500) % 1000, b2),
                        other.write(Lba(64 + i % 64), b3),
                    )
                });
                for (k, r) in [r0, r1, r2, r3].into_iter().enumerate() {
                    bufs[k] = Some(r.unwrap());
                }
            }
        };
        run(100);
        let before = counting::allocations();
        run(1000);
        let allocs = counting::allocations() - before;
        assert_eq!(
            allocs, 0,
            "{name}: {allocs} allocations in 8000 I/Os (blob, raw channel, two channels at queue depth 4)"
        );
    }
}

#[test]
fn doorbells_are_written_once_per_batch_and_reaps_are_bounded() {
    use crate::device::{IoKind, IoOp, Segments};
    let (model, ctrl) = setup(5, 0b1100);
    let dev = NvmeDevice::from_controller(ctrl, 2).unwrap();
    let mut backend = dev.new_backend().unwrap();
    let bufs: Vec<DmaBuf> = (0..200).map(|_| dev.alloc_buf(4096).unwrap()).collect();
    let ops: Vec<IoOp> = bufs
        .iter()
        .enumerate()
        .map(|(i, b)| IoOp {
            kind: IoKind::Write,
            lba: Lba(i as u64),
            blocks: 1,
            segs: Segments::one(b.segment(0, 4096)),
        })
        .collect();
    let doorbells = || {
        let st = model.st.lock();
        (st.io_sq_doorbells, st.io_cq_doorbells)
    };
    // Eight submissions: nothing reaches the controller until the reap,
    // which rings the SQ once and the CQ once.
    for (k, op) in ops.iter().take(8).enumerate() {
        backend.submit(k as u32, op).unwrap();
    }
    assert_eq!(doorbells(), (0, 0), "no doorbell at submission");
    let mut done = 0;
    done += backend.reap(&mut |_, r| r.unwrap());
    assert_eq!(done, 8);
    assert_eq!(
        doorbells(),
        (1, 1),
        "one SQ and one CQ doorbell for the batch"
    );
    // 200 at once: a reap takes at most REAP_MAX completions.
    for (k, op) in ops.iter().enumerate() {
        backend.submit(k as u32, op).unwrap();
    }
    let first = backend.reap(&mut |_, r| r.unwrap());
    assert_eq!(first, super::io::REAP_MAX);
    let mut total = first;
    while total < 200 {
        total += backend.reap(&mut |_, r| r.unwrap());
    }
    assert_eq!(total, 200);
}

#[test]
fn shadow_doorbells_ring_only_when_the_event_index_asks() {
    use crate::device::{IoKind, IoOp, Segments};
    let (model, ctrl) = setup_featured(5, 0b1100, true, true);
    assert!(ctrl.shadow_doorbells());
    assert_eq!(model.st.lock().dbbuf_configs, 1);
    let dev = NvmeDevice::from_controller(ctrl, 2).unwrap();
    let mut backend = dev.new_backend().unwrap();
    let bufs: Vec<DmaBuf> = (0..100)
        .map(|i| {
            let mut b = dev.alloc_buf(4096).unwrap();
            b.copy_from_slice(&pattern(i, 4096));
            b
        })
        .collect();
    let write = |i: usize| IoOp {
        kind: IoKind::Write,
        lba: Lba(i as u64),
        blocks: 1,
        segs: Segments::one(bufs[i].segment(0, 4096)),
    };
    let doorbells = || {
        let st = model.st.lock();
        (st.io_sq_doorbells, st.io_cq_doorbells)
    };
    let reap_all = |backend: &mut Box<dyn crate::device::ChannelBackend>| {
        let mut n = 0;
        for _ in 0..4 {
            n += backend.reap(&mut |_, r| r.unwrap());
        }
        n
    };
    // An idle controller (EventIdx = what it last saw) needs a doorbell
    // for each batch: one SQ and one CQ write, as without shadows.
    for k in 0..8 {
        backend.submit(k as u32, &write(k)).unwrap();
    }
    assert_eq!(reap_all(&mut backend), 8);
    assert_eq!(doorbells(), (1, 1));
    // A polling controller keeps EventIdx behind: batches reach it through
    // the shadow page alone, across ring wrap-arounds (3,000 commands on a
    // 256-entry ring).
    model.st.lock().shadow_polling = true;
    model.poll_shadow();
    for round in 0..30 {
        for k in 0..100 {
            backend.submit(k as u32, &write(k)).unwrap();
        }
        assert_eq!(reap_all(&mut backend), 0, "round {round}: nothing ran yet");
        model.poll_shadow();
        assert_eq!(reap_all(&mut backend), 100, "round {round}");
    }
    assert_eq!(doorbells(), (1, 1), "no MMIO doorbell while it polls");
    // Idle again: the next batch rings.
    model.st.lock().shadow_polling = false;
    model.poll_shadow();
    for k in 0..8 {
        backend.submit(k as u32, &write(k)).unwrap();
    }
    assert_eq!(reap_all(&mut backend), 8);
    assert_eq!(doorbells(), (2, 2));
    let data = model.namespaces[1].1.lock();
    for (i, b) in bufs.iter().enumerate() {
        assert!(data[i * 4096..(i + 1) * 4096] == b[..], "block {i}");
    }
}

#[test]
fn shadow_doorbells_are_used_only_when_offered_and_wanted() {
    for (offered, used) in [(true, false), (false, true), (false, false)] {
        let (model, ctrl) = setup_featured(5, 0b1100, offered, used);
        assert!(!ctrl.shadow_doorbells());
        assert_eq!(model.st.lock().dbbuf_configs, 0);
        let dev: Arc<dyn BlockDevice> = Arc::new(NvmeDevice::from_controller(ctrl, 2).unwrap());
        let ch = channel(&dev).unwrap();
        block_on(ch.write(Lba(3), DmaBuf::from_slice(&pattern(3, 4096)).unwrap())).unwrap();
        let b = block_on(ch.read(Lba(3), dev.alloc_buf(4096).unwrap())).unwrap();
        assert!(b[..] == pattern(3, 4096)[..]);
        assert!(model.st.lock().io_sq_doorbells >= 2);
    }
}

#[test]
fn sgl_commands_cross_two_mib_and_unaligned_joins() {
    // MDTS 10: 4 MiB. PRPs stop at 2 MiB (one list page); SGLs do not.
    let (_p, prp_ctrl) = attach(10, 0b1100, SoftFeatures::default(), Default::default());
    assert!(!prp_ctrl.uses_sgl());
    assert_eq!(prp_ctrl.max_transfer_bytes(), 2 << 20);
    let no = ControllerOptions {
        sgl: false,
        ..Default::default()
    };
    let (_q, refused) = attach(10, 0b1100, sgl_features(1), no);
    assert!(!refused.uses_sgl(), "turned off by the option");
    let (model, ctrl) = attach(10, 0b1100, sgl_features(1), Default::default());
    assert!(ctrl.uses_sgl());
    assert_eq!(ctrl.max_transfer_bytes(), 4 << 20);
    model.st.lock().log_io = true;
    let dev: Arc<dyn BlockDevice> = Arc::new(NvmeDevice::from_controller(ctrl.clone(), 2).unwrap());
    let ch = channel(&dev).unwrap();
    // 4 MiB in one command each way.
    let data = pattern(1, 4 << 20);
    let mut b = dev.alloc_buf(data.len()).unwrap();
    b.copy_from_slice(&data);
    block_on(ch.write(Lba(8), b)).unwrap();
    let back = block_on(ch.read(Lba(8), dev.alloc_buf(data.len()).unwrap())).unwrap();
    assert!(back[..] == data[..]);
    {
        let mut st = model.st.lock();
        let log = std::mem::take(&mut st.io_log);
        assert_eq!(log, vec![(0x01, 1024), (0x02, 1024)]);
        assert_eq!((st.sgl_commands, st.last_sgl_descriptors), (2, 1));
    }
    // Pieces joined inside pages and inside blocks (512-byte blocks): one
    // command, one descriptor per piece, no bounce.
    let dev1: Arc<dyn BlockDevice> = Arc::new(NvmeDevice::from_controller(ctrl, 1).unwrap());
    let ch1 = channel(&dev1).unwrap();
    let parts = [300usize, 724, 1500, 548];
    let bufs: Vec<DmaBuf> = parts
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let mut b = dev1.alloc_buf(n).unwrap();
            b.copy_from_slice(&pattern(10 + i as u64, n));
            b
        })
        .collect();
    let all: Vec<u8> = bufs.iter().flat_map(|b| b.to_vec()).collect();
    block_on(ch1.writev(Lba(40), bufs)).unwrap();
    {
        let mut st = model.st.lock();
        assert_eq!(std::mem::take(&mut st.io_log), vec![(0x01, 6)]);
        assert_eq!(st.last_sgl_descriptors, 4);
    }
    let back = block_on(ch1.read(Lba(40), dev1.alloc_buf(all.len()).unwrap())).unwrap();
    assert!(back[..] == all[..]);
    assert!(model.namespaces[0].1.lock()[40 * 512..][..all.len()] == all[..]);
}

#[test]
fn sgl_pieces_off_dword_boundaries_are_bounced_when_the_controller_asks() {
    let (model, ctrl) = attach(5, 0b1100, sgl_features(2), Default::default());
    assert!(ctrl.identity().sgl_needs_dword_alignment());
    let dev: Arc<dyn BlockDevice> = Arc::new(NvmeDevice::from_controller(ctrl, 1).unwrap());
    let ch = channel(&dev).unwrap();
    // 301 + 211 bytes: the join is not on a dword, so one bounce buffer
    // (a single descriptor) carries the block.
    let bufs: Vec<DmaBuf> = [301usize, 211]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let mut b = dev.alloc_buf(n).unwrap();
            b.copy_from_slice(&pattern(20 + i as u64, n));
            b
        })
        .collect();
    let all: Vec<u8> = bufs.iter().flat_map(|b| b.to_vec()).collect();
    block_on(ch.writev(Lba(3), bufs)).unwrap();
    assert_eq!(model.st.lock().last_sgl_descriptors, 1);
    let back = block_on(ch.read(Lba(3), dev.alloc_buf(512).unwrap())).unwrap();
    assert!(back[..] == all[..]);
    // Dword-aligned pieces go as they are.
    let bufs: Vec<DmaBuf> = [200usize, 312]
        .iter()
        .map(|&n| dev.alloc_buf(n).unwrap())
        .collect();
    block_on(ch.writev(Lba(4), bufs)).unwrap();
    assert_eq!(model.st.lock().last_sgl_descriptors, 2);
}

#[test]
fn async_events_are_counted_cleared_and_their_requests_posted_again() {
    use super::cmd::{event_type, AsyncEvent, LOG_CHANGED_NS, LOG_SMART};
    let features = SoftFeatures {
        aerl: 3,
        ..Default::default()
    };
    let (model, ctrl) = attach(5, 0b1100, features, Default::default());
    {
        let st = model.st.lock();
        assert_eq!(st.aers.len(), 4, "AERL + 1 requests posted");
        assert_eq!(
            st.async_event_config, 0x1ff,
            "critical warnings and notices"
        );
    }
    let settle = |what: &str, done: &dyn Fn() -> bool| {
        for _ in 0..100 {
            ctrl.poll_events();
            if done() {
                // The model ran the driver's last commands at once; take
                // their completions.
                ctrl.poll_events();
                return;
            }
        }
        panic!("{what}: not settled");
    };
    let smart = AsyncEvent {
        kind: event_type::SMART,
        info: 1, // temperature threshold
        log_page: LOG_SMART,
    };
    // A SMART warning: counted, its log read (which clears it), and the
    // request posted again.
    model.st.lock().critical_warning = 0x02;
    model.raise_event(smart);
    settle("smart", &|| {
        let st = model.st.lock();
        st.log_reads == [LOG_SMART] && st.aers.len() == 4
    });
    let ev = ctrl.async_events();
    assert_eq!((ev.smart, ev.critical_warning), (1, 0x02));
    // Two more before the driver looks: the second waits (masked) until
    // the first one's log is read.
    model.raise_event(smart);
    model.raise_event(smart);
    assert_eq!(model.st.lock().pending_events.len(), 1);
    settle("two smart", &|| {
        let st = model.st.lock();
        st.log_reads.len() == 3 && st.pending_events.is_empty() && st.aers.len() == 4
    });
    assert_eq!(ctrl.async_events().smart, 3);
    // A namespace change notice reads the Changed Namespace List.
    model.raise_event(AsyncEvent {
        kind: event_type::NOTICE,
        info: 0,
        log_page: LOG_CHANGED_NS,
    });
    settle("notice", &|| {
        let st = model.st.lock();
        st.log_reads.last() == Some(&LOG_CHANGED_NS) && st.aers.len() == 4
    });
    let ev = ctrl.async_events();
    assert_eq!((ev.namespace_changes, ev.smart, ev.other), (1, 3, 0));
    // A reset drops the requests; they are posted again.
    ctrl.reset().unwrap();
    assert_eq!(model.st.lock().aers.len(), 4);
    // I/O still works alongside them.
    let dev: Arc<dyn BlockDevice> = Arc::new(NvmeDevice::from_controller(ctrl, 2).unwrap());
    let ch = channel(&dev).unwrap();
    block_on(ch.write(Lba(1), DmaBuf::from_slice(&pattern(1, 4096)).unwrap())).unwrap();
}

#[test]
fn one_queue_pair_per_thread_serves_every_namespace() {
    use crate::device::{IoKind, IoOp, Segments};
    let (model, ctrl) = setup(5, 0b1100);
    let ns1 = NvmeDevice::from_controller(ctrl.clone(), 1).unwrap();
    let ns2 = NvmeDevice::from_controller(ctrl.clone(), 2).unwrap();
    let mut b1 = ns1.new_backend().unwrap();
    let mut b2 = ns2.new_backend().unwrap();
    assert_eq!(model.io_queues(), 1, "both namespaces on one queue pair");
    // Another thread gets its own.
    let other = NvmeDevice::from_controller(ctrl.clone(), 1).unwrap();
    let m = model.clone();
    std::thread::spawn(move || {
        let _b = other.new_backend().unwrap();
        assert_eq!(m.io_queues(), 2);
    })
    .join()
    .unwrap();
    assert_eq!(
        model.io_queues(),
        1,
        "deleted with the thread's last channel"
    );
    // The same tag on both channels; each channel reports only its own
    // ops, whichever reaps the completions.
    let (d1, d2) = (pattern(1, 4096), pattern(2, 4096));
    let buf = |d: &[u8]| {
        let mut b = ctrl.pool().alloc(4096).unwrap();
        b.copy_from_slice(d);
        b
    };
    let (w1, w2) = (buf(&d1), buf(&d2));
    let op = |b: &DmaBuf, blocks| IoOp {
        kind: IoKind::Write,
        lba: Lba(16),
        blocks,
        segs: Segments::one(b.segment(0, 4096)),
    };
    model.st.lock().hold_reads = true;
    let r1 = ctrl.pool().alloc(4096).unwrap();
    let read1 = IoOp {
        kind: IoKind::Read,
        lba: Lba(16),
        blocks: 8,
        segs: Segments::one(r1.segment(0, 4096)),
    };
    b1.submit(0, &op(&w1, 8)).unwrap();
    b2.submit(0, &op(&w2, 1)).unwrap();
    b1.submit(1, &read1).unwrap();
    let mut seen2 = Vec::new();
    b2.reap(&mut |t, r| seen2.push((t, r.is_ok())));
    assert_eq!(seen2, vec![(0, true)], "only its own write");
    let mut seen1 = Vec::new();
    b1.reap(&mut |t, r| seen1.push((t, r.is_ok())));
    assert_eq!(
        seen1,
        vec![(0, true)],
        "its write, reaped by the other channel"
    );
    // The held read completes while the other channel reaps (the model
    // completes held commands without running them).
    model.release_held();
    b2.reap(&mut |_, _| panic!("nothing of channel 2 is in flight"));
    let mut seen1 = Vec::new();
    b1.reap(&mut |t, r| seen1.push((t, r.is_ok())));
    assert_eq!(
        seen1,
        vec![(1, true)],
        "its held read (completed untouched)"
    );
    assert!(model.namespaces[0].1.lock()[16 * 512..][..4096] == d1[..]);
    assert!(model.namespaces[1].1.lock()[16 * 4096..][..4096] == d2[..]);
    drop(b1);
    assert_eq!(model.io_queues(), 1, "still serving namespace 2");
    drop(b2);
    assert_eq!(model.io_queues(), 0);
}
