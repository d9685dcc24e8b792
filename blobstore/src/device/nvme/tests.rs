//! The driver against a software NVMe controller: the `#[cfg(test)]` twin of
//! BAR0 and DMA. The model reads submission entries and PRPs out of the DMA
//! pool's memory, checks the PRP rules, executes against RAM namespaces and
//! posts completions with phase tags, so queue, PRP and command encoding are
//! tested end to end without hardware.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::dma::{DmaPool, NoMapper};
use super::regs::{self, Bar};
use super::{cmd, NvmeController, NvmeDevice};
use crate::device::{channel, BlockDevice, DmaBuf};
use crate::error::{Error, NvmeStatus};
use crate::{block_on, BlobOptions, Blobstore, BlobstoreOptions, LoadOptions};

const PAGE: u64 = 4096;

struct Sq {
    base: u64,
    size: u32,
    head: u32,
    cqid: u16,
}

struct Cq {
    base: u64,
    size: u32,
    tail: u32,
    phase: bool,
}

#[derive(Default)]
struct ModelState {
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    sqs: HashMap<u16, Sq>,
    cqs: HashMap<u16, Cq>,
    /// Commands held back (never completed until released): (sqid, cid).
    held: Vec<(u16, u16)>,
    hold_reads: bool,
    /// Opcodes and block counts of I/O commands seen.
    io_log: Vec<(u8, u32)>,
    fatal: bool,
}

struct Model {
    pool: Arc<DmaPool>,
    namespaces: Vec<(u32, Mutex<Vec<u8>>)>,
    mdts: u8,
    oncs: u16,
    st: Mutex<ModelState>,
}

fn rd(pool: &DmaPool, iova: u64, len: usize) -> Vec<u8> {
    let p = pool
        .translate(iova, len)
        .expect("device read of unmapped IOVA");
    let mut v = vec![0u8; len];
    // SAFETY: translate checked the range lies in a pool mapping.
    unsafe { std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), len) };
    v
}

fn wr(pool: &DmaPool, iova: u64, data: &[u8]) {
    let p = pool
        .translate(iova, data.len())
        .expect("device write to unmapped IOVA");
    // SAFETY: as above.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
}

impl Model {
    fn new(pool: Arc<DmaPool>, mdts: u8, oncs: u16) -> Arc<Model> {
        Arc::new(Model {
            pool,
            namespaces: vec![
                (512, Mutex::new(vec![0u8; 8 << 20])),
                (4096, Mutex::new(vec![0u8; 16 << 20])),
            ],
            mdts,
            oncs,
            st: Mutex::new(ModelState::default()),
        })
    }

    /// The pages a command's PRPs describe, checking the PRP rules.
    fn prp_pages(&self, prp1: u64, prp2: u64, len: u64) -> Vec<(u64, u64)> {
        assert_eq!(prp1 % 4, 0, "PRP1 not dword aligned");
        let first = (PAGE - prp1 % PAGE).min(len);
        let mut out = vec![(prp1, first)];
        let mut left = len - first;
        if left == 0 {
            return out;
        }
        if left <= PAGE {
            assert_eq!(prp2 % PAGE, 0, "PRP2 entry not page aligned");
            out.push((prp2, left));
            return out;
        }
        assert_eq!(prp2 % 8, 0, "PRP list not qword aligned");
        let n = left.div_ceil(PAGE) as usize;
        assert!(n <= 512, "a list longer than one page");
        let list = rd(&self.pool, prp2, n * 8);
        for e in list.chunks_exact(8) {
            let a = u64::from_le_bytes(e.try_into().unwrap());
            assert_eq!(a % PAGE, 0, "PRP list entry not page aligned");
            let l = left.min(PAGE);
            out.push((a, l));
            left -= l;
        }
        out
    }

    fn exec_admin(&self, st: &mut ModelState, d: &[u32; 16]) -> (u8, u8, u32) {
        let prp1 = d[6] as u64 | (d[7] as u64) << 32;
        match d[0] as u8 {
            cmd::admin_op::IDENTIFY => {
                let mut page = vec![0u8; 4096];
                match d[10] & 0xff {
                    cmd::cns::CONTROLLER => {
                        page[4..12].copy_from_slice(b"MODEL001");
                        page[24..34].copy_from_slice(b"Model NVMe");
                        page[77] = self.mdts;
                        page[516..520]
                            .copy_from_slice(&(self.namespaces.len() as u32).to_le_bytes());
                        page[520..522].copy_from_slice(&self.oncs.to_le_bytes());
                        page[525] = 1;
                    }
                    cmd::cns::NAMESPACE => {
                        let nsid = d[1] as usize;
                        if nsid == 0 || nsid > self.namespaces.len() {
                            return (0, 0x0b, 0);
                        }
                        let (bs, data) = &self.namespaces[nsid - 1];
                        let blocks = data.lock().len() as u64 / *bs as u64;
                        page[0..8].copy_from_slice(&blocks.to_le_bytes());
                        page[8..16].copy_from_slice(&blocks.to_le_bytes());
                        page[25] = 1;
                        page[26] = if *bs == 512 { 0 } else { 1 };
                        page[33] = 1;
                        page[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
                        page[132..136].copy_from_slice(&(12u32 << 16).to_le_bytes());
                    }
                    cmd::cns::ACTIVE_NS_LIST => {
                        for i in 0..self.namespaces.len() {
                            page[i * 4..i * 4 + 4].copy_from_slice(&(i as u32 + 1).to_le_bytes());
                        }
                    }
                    _ => return (0, 0x02, 0),
                }
                wr(&self.pool, prp1, &page);
                (0, 0, 0)
            }
            cmd::admin_op::SET_FEATURES => (0, 0, 15 << 16 | 15),
            cmd::admin_op::CREATE_CQ => {
                let qid = d[10] as u16;
                let size = (d[10] >> 16) + 1;
                st.cqs.insert(
                    qid,
                    Cq {
                        base: prp1,
                        size,
                        tail: 0,
                        phase: true,
                    },
                );
                (0, 0, 0)
            }
            cmd::admin_op::CREATE_SQ => {
                let qid = d[10] as u16;
                let cqid = (d[11] >> 16) as u16;
                if !st.cqs.contains_key(&cqid) {
                    return (1, 0x00, 0); // completion queue invalid
                }
                st.sqs.insert(
                    qid,
                    Sq {
                        base: prp1,
                        size: (d[10] >> 16) + 1,
                        head: 0,
                        cqid,
                    },
                );
                (0, 0, 0)
            }
            cmd::admin_op::DELETE_SQ => {
                st.sqs.remove(&(d[10] as u16));
                (0, 0, 0)
            }
            cmd::admin_op::DELETE_CQ => {
                st.cqs.remove(&(d[10] as u16));
                (0, 0, 0)
            }
            cmd::admin_op::GET_LOG_PAGE => {
                let bytes = ((d[10] >> 16) + 1) * 4;
                let mut page = vec![0u8; bytes as usize];
                if d[10] & 0xff == cmd::LOG_SMART as u32 {
                    page[1..3].copy_from_slice(&300u16.to_le_bytes());
                    page[3] = 100;
                }
                wr(&self.pool, prp1, &page);
                (0, 0, 0)
            }
            cmd::admin_op::ABORT => (0, 0, 1),
            _ => (0, 0x01, 0),
        }
    }

    fn exec_io(&self, st: &mut ModelState, d: &[u32; 16]) -> Option<(u8, u8, u32)> {
        let opcode = d[0] as u8;
        let nsid = d[1] as usize;
        let prp1 = d[6] as u64 | (d[7] as u64) << 32;
        let prp2 = d[8] as u64 | (d[9] as u64) << 32;
        if nsid == 0 || nsid > self.namespaces.len() {
            return Some((0, 0x0b, 0));
        }
        let (bs, data) = &self.namespaces[nsid - 1];
        let bs = *bs as u64;
        let mut data = data.lock();
        let blocks_total = data.len() as u64 / bs;
        let lba = d[10] as u64 | (d[11] as u64) << 32;
        let nlb = (d[12] & 0xffff) as u64 + 1;
        let in_range = |lba: u64, n: u64| lba + n <= blocks_total;
        match opcode {
            cmd::io_op::READ | cmd::io_op::WRITE => {
                st.io_log.push((opcode, nlb as u32));
                if opcode == cmd::io_op::READ && st.hold_reads {
                    return None;
                }
                if !in_range(lba, nlb) {
                    return Some((0, 0x80, 0));
                }
                let limit = PAGE << self.mdts;
                assert!(nlb * bs <= limit, "transfer beyond MDTS");
                let mut at = (lba * bs) as usize;
                for (a, l) in self.prp_pages(prp1, prp2, nlb * bs) {
                    let l = l as usize;
                    if opcode == cmd::io_op::READ {
                        wr(&self.pool, a, &data[at..at + l]);
                    } else {
                        data[at..at + l].copy_from_slice(&rd(&self.pool, a, l));
                    }
                    at += l;
                }
                Some((0, 0, 0))
            }
            cmd::io_op::FLUSH => Some((0, 0, 0)),
            cmd::io_op::WRITE_ZEROES => {
                assert!(self.oncs & 8 != 0, "write zeroes not advertised");
                if !in_range(lba, nlb) {
                    return Some((0, 0x80, 0));
                }
                data[(lba * bs) as usize..((lba + nlb) * bs) as usize].fill(0);
                Some((0, 0, 0))
            }
            cmd::io_op::DSM => {
                assert!(self.oncs & 4 != 0, "DSM not advertised");
                let nr = (d[10] & 0xff) as usize + 1;
                let ranges = rd(&self.pool, prp1, nr * 16);
                for r in ranges.chunks_exact(16) {
                    let n = u32::from_le_bytes(r[4..8].try_into().unwrap()) as u64;
                    let s = u64::from_le_bytes(r[8..16].try_into().unwrap());
                    if !in_range(s, n) {
                        return Some((0, 0x80, 0));
                    }
                    data[(s * bs) as usize..((s + n) * bs) as usize].fill(0);
                }
                Some((0, 0, 0))
            }
            _ => Some((0, 0x01, 0)),
        }
    }

    fn post(&self, st: &mut ModelState, sqid: u16, cid: u16, (sct, sc, dw0): (u8, u8, u32)) {
        let sq_head = st.sqs.get(&sqid).map_or(0, |s| s.head);
        let cqid = st.sqs.get(&sqid).map_or(0, |s| s.cqid);
        let Some(cq) = st.cqs.get_mut(&cqid) else {
            return;
        };
        let c = cmd::Completion {
            dw0,
            sq_head: sq_head as u16,
            sq_id: sqid,
            cid,
            phase: cq.phase,
            sc,
            sct,
            dnr: sc != 0,
        };
        let bytes: Vec<u8> = c.encode().iter().flat_map(|x| x.to_le_bytes()).collect();
        wr(&self.pool, cq.base + cq.tail as u64 * 16, &bytes);
        cq.tail += 1;
        if cq.tail == cq.size {
            cq.tail = 0;
            cq.phase = !cq.phase;
        }
    }

    fn ring(&self, st: &mut ModelState, sqid: u16, tail: u32) {
        loop {
            let Some(sq) = st.sqs.get_mut(&sqid) else {
                return;
            };
            if sq.head == tail {
                return;
            }
            let raw = rd(&self.pool, sq.base + sq.head as u64 * 64, 64);
            sq.head = (sq.head + 1) % sq.size;
            let mut d = [0u32; 16];
            for (i, x) in d.iter_mut().enumerate() {
                *x = u32::from_le_bytes(raw[i * 4..i * 4 + 4].try_into().unwrap());
            }
            let cid = (d[0] >> 16) as u16;
            let result = if sqid == 0 {
                Some(self.exec_admin(st, &d))
            } else {
                self.exec_io(st, &d)
            };
            match result {
                Some(r) => self.post(st, sqid, cid, r),
                None => st.held.push((sqid, cid)),
            }
        }
    }

    /// Completes every held command successfully (their data untouched).
    fn release_held(&self) {
        let mut st = self.st.lock();
        st.hold_reads = false;
        for (sqid, cid) in std::mem::take(&mut st.held) {
            self.post(&mut st, sqid, cid, (0, 0, 0));
        }
    }
}

impl Bar for Model {
    fn read32(&self, off: usize) -> u32 {
        let st = self.st.lock();
        // MQES 1023, TO 1 (500 ms), DSTRD 0, NVM command set.
        let cap: u64 = 1023 | 1 << 24 | 1 << 37;
        match off {
            regs::CAP => cap as u32,
            o if o == regs::CAP + 4 => (cap >> 32) as u32,
            regs::VS => 0x0001_0400,
            regs::CC => st.cc,
            regs::CSTS => st.csts | if st.fatal { regs::CSTS_CFS } else { 0 },
            _ => 0,
        }
    }

    fn write32(&self, off: usize, val: u32) {
        let mut st = self.st.lock();
        match off {
            regs::CC => {
                let was = st.cc & 1;
                st.cc = val;
                if val & 1 == 1 && was == 0 {
                    let (sq, cq) = ((st.aqa & 0xfff) + 1, ((st.aqa >> 16) & 0xfff) + 1);
                    let (asq, acq) = (st.asq, st.acq);
                    st.cqs.insert(
                        0,
                        Cq {
                            base: acq,
                            size: cq,
                            tail: 0,
                            phase: true,
                        },
                    );
                    st.sqs.insert(
                        0,
                        Sq {
                            base: asq,
                            size: sq,
                            head: 0,
                            cqid: 0,
                        },
                    );
                    st.csts = 1;
                } else if val & 1 == 0 {
                    st.sqs.clear();
                    st.cqs.clear();
                    st.held.clear();
                    st.fatal = false;
                    st.csts = 0;
                }
            }
            regs::AQA => st.aqa = val,
            regs::ASQ => st.asq = st.asq & !0xffff_ffff | val as u64,
            o if o == regs::ASQ + 4 => st.asq = st.asq & 0xffff_ffff | (val as u64) << 32,
            regs::ACQ => st.acq = st.acq & !0xffff_ffff | val as u64,
            o if o == regs::ACQ + 4 => st.acq = st.acq & 0xffff_ffff | (val as u64) << 32,
            o if o >= regs::DOORBELLS => {
                let idx = (o - regs::DOORBELLS) / 4;
                if idx.is_multiple_of(2) {
                    self.ring(&mut st, (idx / 2) as u16, val);
                }
            }
            _ => {}
        }
    }
}

fn setup(mdts: u8, oncs: u16) -> (Arc<Model>, Arc<NvmeController>) {
    let pool = DmaPool::new(Box::new(NoMapper), false);
    let model = Model::new(pool.clone(), mdts, oncs);
    let ctrl = NvmeController::start("model".into(), model.clone(), pool, None).unwrap();
    (model, Arc::new(ctrl))
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
    let log = model.st.lock().io_log.clone();
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
