//! The driver against the software NVMe controller ([`super::soft`]), its
//! twin of BAR0 and DMA: queue, PRP and command encoding tested end to end
//! without hardware.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::soft::SoftController;
use super::{NvmeController, NvmeDevice};
use crate::device::{channel, BlockDevice, DmaBuf};
use crate::error::{Error, NvmeStatus};
use crate::{block_on, BlobOptions, Blobstore, BlobstoreOptions, LoadOptions};

fn setup(mdts: u8, oncs: u16) -> (Arc<SoftController>, Arc<NvmeController>) {
    SoftController::attach(mdts, oncs).unwrap()
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
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
    let (model, ctrl) = setup(3, 0b1100); // 32 KiB per command
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
            block_on(ch.write(lba, wbuf)).unwrap();
            let rbuf = if i % 3 == 0 {
                DmaBuf::new(data.len()).unwrap()
            } else {
                dev.alloc_buf(data.len()).unwrap()
            };
            let back = block_on(ch.read(lba, rbuf)).unwrap();
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
        block_on(ch.writev(10, bufs)).unwrap();
        let back = block_on(ch.read(10, dev.alloc_buf(all.len()).unwrap())).unwrap();
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
        block_on(ch.writev(20, halves)).unwrap();
        let back = block_on(ch.read(20, dev.alloc_buf(all.len()).unwrap())).unwrap();
        assert!(back[..] == all[..]);
        block_on(ch.flush()).unwrap();
    }
    let log = std::mem::take(&mut model.st.lock().io_log);
    assert!(log.iter().all(|&(_, n)| n as u64 * 512 <= 32 << 10));
}

#[test]
fn many_ops_wrap_the_rings() {
    let (_m, ctrl) = setup(5, 0b1100);
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
                    ch.write(i, b)
                })
                .collect();
            for f in futures::future::join_all(futs).await {
                f.unwrap();
            }
            for i in (0..600u64).step_by(37) {
                let b = ch.read(i, dev.alloc_buf(4096).unwrap()).await.unwrap();
                assert!(b[..] == pattern(round * 1000 + i, 4096)[..]);
            }
        }
    });
}

#[test]
fn four_threads_each_with_a_queue_pair() {
    let (_m, ctrl) = setup(5, 0b1100);
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
                            ch.write(region + i * 16, b)
                        })
                        .collect();
                    for f in futures::future::join_all(futs).await {
                        f.unwrap();
                    }
                    for i in 0..32u64 {
                        let b = ch
                            .read(region + i * 16, dev.alloc_buf(8192).unwrap())
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
        block_on(ch.write(0, DmaBuf::from_slice(&data).unwrap())).unwrap();
        block_on(ch.write_zeroes(8, 40)).unwrap();
        let b = block_on(ch.read(0, dev.alloc_buf(data.len()).unwrap())).unwrap();
        assert!(b[..8 * 4096] == data[..8 * 4096]);
        assert!(b[8 * 4096..48 * 4096].iter().all(|&x| x == 0));
        assert!(b[48 * 4096..] == data[48 * 4096..]);
        let r = block_on(ch.unmap(0, 4));
        if oncs != 0 {
            r.unwrap();
            assert!(dev.geometry().unmap_reads_zeroes);
            let b = block_on(ch.read(0, dev.alloc_buf(4 * 4096).unwrap())).unwrap();
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
            .read(0, ghost.alloc_buf(512).unwrap()),
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
            .read(1 << 30, big.alloc_buf(512).unwrap()),
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
    let r = block_on(ch.read(good.geometry().block_count, good.alloc_buf(512).unwrap()));
    assert!(
        matches!(r, Err(Error::OutOfRange { .. })),
        "checked before the device"
    );
    block_on(ch.write(3, DmaBuf::from_slice(&[7u8; 512]).unwrap())).unwrap();
    let b = block_on(ch.read(3, good.alloc_buf(512).unwrap())).unwrap();
    assert!(b.iter().all(|&x| x == 7));
}

#[test]
fn timeout_fails_the_op_keeps_memory_and_recovers() {
    let (model, ctrl) = setup(5, 0b1100);
    let dev: Arc<dyn BlockDevice> = Arc::new(NvmeDevice::from_controller(ctrl.clone(), 1).unwrap());
    let ch = channel(&dev).unwrap();
    block_on(ch.write(0, DmaBuf::from_slice(&[1u8; 4096]).unwrap())).unwrap();
    model.st.lock().hold_reads = true;
    ctrl.set_io_timeout(Duration::from_millis(20));
    let r = block_on(ch.read(0, dev.alloc_buf(4096).unwrap()));
    assert!(matches!(r, Err(Error::Timeout { op: "read", .. })), "{r:?}");
    // The controller finishes the command late: it is dropped quietly.
    model.release_held();
    ctrl.set_io_timeout(Duration::from_secs(5));
    let b = block_on(ch.read(0, dev.alloc_buf(4096).unwrap())).unwrap();
    assert!(b.iter().all(|&x| x == 1));
}

#[test]
fn reset_fails_in_flight_and_queues_come_back() {
    let (model, ctrl) = setup(5, 0b1100);
    let dev: Arc<dyn BlockDevice> = Arc::new(NvmeDevice::from_controller(ctrl.clone(), 2).unwrap());
    let ch = channel(&dev).unwrap();
    block_on(ch.write(5, DmaBuf::from_slice(&[9u8; 4096]).unwrap())).unwrap();
    model.st.lock().hold_reads = true;
    let fut = ch.read(5, dev.alloc_buf(4096).unwrap());
    let mut fut = Box::pin(fut);
    let waker = futures::task::noop_waker();
    let mut cx = std::task::Context::from_waker(&waker);
    assert!(fut.as_mut().poll(&mut cx).is_pending());
    ctrl.reset().unwrap();
    let r = block_on(fut);
    assert!(matches!(r, Err(Error::DeviceFailed { .. })), "{r:?}");
    model.st.lock().hold_reads = false;
    let b = block_on(ch.read(5, dev.alloc_buf(4096).unwrap())).unwrap();
    assert!(b.iter().all(|&x| x == 9));
    // A fatal status is reported, and a reset clears it.
    model.st.lock().fatal = true;
    model.st.lock().hold_reads = true;
    ctrl.set_io_timeout(Duration::from_millis(5));
    let r = block_on(ch.read(5, dev.alloc_buf(4096).unwrap()));
    assert!(matches!(r, Err(Error::DeviceFailed { .. })), "{r:?}");
    assert!(ctrl.is_failed());
    ctrl.reset().unwrap();
    model.st.lock().hold_reads = false;
    ctrl.set_io_timeout(Duration::from_secs(5));
    let b = block_on(ch.read(5, dev.alloc_buf(4096).unwrap())).unwrap();
    assert!(b.iter().all(|&x| x == 9));
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
    let first = super::NamespaceClaim::take(pci, 1).unwrap();
    let other_ns = super::NamespaceClaim::take(pci, 2).unwrap();
    let e = super::NamespaceClaim::take(pci, 1).err().unwrap();
    assert_eq!(
        e.to_string(),
        "busy: nvme:test:claims/ns=1 is in use by another device of this process (one opener \
         per namespace)"
    );
    drop(first);
    let again = super::NamespaceClaim::take(pci, 1).unwrap();
    drop((again, other_ns));
}
