//! A software NVMe controller: the driver's register/DMA twin. It is what the
//! driver's unit tests run on (every machine, no hardware) and what the
//! `iopath` benchmark counts instructions against; it is not a device users
//! can name in a spec.
//!
//! The model reads submission entries and PRPs out of the DMA pool's memory,
//! checks the PRP rules, executes commands against RAM namespaces at once
//! (when the submission doorbell is written) and posts completions with
//! phase tags. Faults are injected through [`SoftState`]: held reads, fatal
//! status, failing statuses, completions for ids that are not outstanding,
//! aborts that do or do not abort.
//!
//! Optional features ([`SoftFeatures`]): shadow doorbells (Doorbell Buffer
//! Config). With them the model checks that every MMIO doorbell value
//! equals the shadow value, keeps EventIdx as an idle controller does (the
//! value it last saw: every batch needs a doorbell) or, with
//! `shadow_polling`, as a controller that polls the shadow page
//! ([`SoftController::poll_shadow`]) and wants no doorbell at all.
//!
//! Invariants:
//! - Memory is reached only through `DmaPool::translate`: an IOVA outside
//!   the pool is a driver bug and panics the model (a test failure).
//! - Clearing CC.EN drops every queue and every held command, as a
//!   controller reset does; `disabled_with_held` records how many commands
//!   the controller still owned at that moment.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;

use super::cmd::{self, AsyncEvent, Completion};
use super::dma::{DmaPool, NoMapper};
use super::regs::{self, Bar};
use super::{ControllerOptions, NvmeController};
use crate::error::Result;

const PAGE: u64 = 4096;

/// Status code type and code of "Command Abort Requested".
pub const ABORTED: (u8, u8) = (0, 0x07);

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

/// What the software controller offers beyond the basics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SoftFeatures {
    /// Doorbell Buffer Config (OACS bit 8).
    pub shadow_doorbells: bool,
    /// SGL Support as Identify Controller reports it (SGLS bits 1:0: 0
    /// none, 1 any alignment, 2 dword alignment); Read and Write then
    /// accept data block, segment and last segment descriptors.
    pub sgls: u32,
    /// Asynchronous Event Request Limit (zero-based), Identify byte 259.
    pub aerl: u8,
}

impl SoftState {
    /// CC.EN is set.
    pub fn enabled(&self) -> bool {
        self.cc & 1 == 1
    }

    /// CSTS.RDY is set.
    pub fn ready(&self) -> bool {
        self.csts & 1 == 1
    }
}

/// The controller's registers, queues and fault knobs.
#[derive(Default)]
pub struct SoftState {
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    sqs: Vec<Option<Sq>>,
    cqs: Vec<Option<Cq>>,
    /// Commands held back (never completed until released): (sqid, cid).
    pub held: Vec<(u16, u16)>,
    /// Hold every Read instead of executing it.
    pub hold_reads: bool,
    /// Record opcode and block count of every I/O command in `io_log`.
    pub log_io: bool,
    /// Opcodes and block counts of I/O commands seen (when `log_io`).
    pub io_log: Vec<(u8, u32)>,
    /// CSTS.CFS reads as set (cleared by CC.EN = 0).
    pub fatal: bool,
    /// Statuses (sct, sc, dnr) the next Read/Write commands complete with
    /// instead of executing, one each.
    pub fail_next: VecDeque<(u8, u8, bool)>,
    /// Abort completes a held command with "Command Abort Requested" (else
    /// the Abort says "not aborted" and the command stays held).
    pub abort_completes: bool,
    /// Abort commands are dropped: never executed, never completed.
    pub hold_aborts: bool,
    /// Aborts received.
    pub aborts: u32,
    /// Held commands at the last CC.EN = 0 (None: never disabled).
    pub disabled_with_held: Option<usize>,
    /// Disables (CC.EN 1 -> 0) seen.
    pub disables: u32,
    /// Submission tail doorbell writes to I/O queues.
    pub io_sq_doorbells: u64,
    /// Completion head doorbell writes of I/O queues.
    pub io_cq_doorbells: u64,
    /// Outstanding Asynchronous Event Requests (command ids, oldest first).
    pub aers: VecDeque<u16>,
    /// Events raised and not yet reported (no request outstanding, or
    /// their log page not read since the last one of that page).
    pub pending_events: VecDeque<AsyncEvent>,
    /// Log pages of reported events not yet read (their events masked).
    pub masked_logs: Vec<u8>,
    /// Log pages read (Get Log Page), in order.
    pub log_reads: Vec<u8>,
    /// Asynchronous Event Configuration (Set Features 0x0B).
    pub async_event_config: u32,
    /// Critical warning byte of the SMART log.
    pub critical_warning: u8,
    /// Read/Write commands whose data came in an SGL.
    pub sgl_commands: u64,
    /// Data block descriptors of the last SGL command.
    pub last_sgl_descriptors: usize,
    /// Shadow doorbell and EventIdx pages (Doorbell Buffer Config).
    pub dbbuf: Option<(u64, u64)>,
    /// Doorbell Buffer Config commands accepted.
    pub dbbuf_configs: u32,
    /// With shadow doorbells: act as a controller polling the shadow page
    /// (EventIdx always one behind, so no doorbell is needed; commands run
    /// at [`SoftController::poll_shadow`]).
    pub shadow_polling: bool,
    /// The pieces of the SGL being executed, kept between commands so the
    /// model allocates nothing per I/O either (the zero-allocation tests
    /// count every allocation of the thread the model runs on).
    sgl_scratch: Vec<(u64, u64)>,
}

/// A software NVMe controller over the memory of a `DmaPool`.
pub struct SoftController {
    pool: Arc<DmaPool>,
    /// (block size, bytes) per namespace, namespace id = index + 1.
    pub namespaces: Vec<(u32, Mutex<Vec<u8>>)>,
    mdts: u8,
    oncs: u16,
    features: SoftFeatures,
    /// Registers, queues and fault knobs.
    pub st: Mutex<SoftState>,
}

fn translate(pool: &DmaPool, iova: u64, len: usize) -> *mut u8 {
    pool.translate(iova, len)
        .unwrap_or_else(|| panic!("device access to unmapped IOVA {iova:#x}+{len}"))
}

fn rd(pool: &DmaPool, iova: u64, dst: &mut [u8]) {
    let p = translate(pool, iova, dst.len());
    // SAFETY: translate checked the range lies in a pool mapping; the model
    // plays the device, which may read pool memory at any time.
    unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), dst.len()) };
}

fn wr(pool: &DmaPool, iova: u64, data: &[u8]) {
    let p = translate(pool, iova, data.len());
    // SAFETY: as for `rd`.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
}

fn rd_u64(pool: &DmaPool, iova: u64) -> u64 {
    let mut b = [0u8; 8];
    rd(pool, iova, &mut b);
    u64::from_le_bytes(b)
}

fn rd_u32(pool: &DmaPool, iova: u64) -> u32 {
    let mut b = [0u8; 4];
    rd(pool, iova, &mut b);
    u32::from_le_bytes(b)
}

impl SoftController {
    /// A controller with two namespaces (8 MiB of 512-byte blocks, 16 MiB
    /// of 4 KiB blocks), MDTS `mdts` and ONCS `oncs`, attached as an
    /// [`NvmeController`] named "model".
    pub fn attach(mdts: u8, oncs: u16) -> Result<(Arc<SoftController>, Arc<NvmeController>)> {
        Self::attach_with(mdts, oncs, &[(512, 8 << 20), (4096, 16 << 20)])
    }

    /// A controller with the given namespaces (block size, bytes).
    pub fn attach_with(
        mdts: u8,
        oncs: u16,
        namespaces: &[(u32, usize)],
    ) -> Result<(Arc<SoftController>, Arc<NvmeController>)> {
        Self::attach_featured(
            mdts,
            oncs,
            namespaces,
            SoftFeatures::default(),
            ControllerOptions::default(),
        )
    }

    /// A controller offering `features`, attached with the driver's
    /// options `opts`.
    pub fn attach_featured(
        mdts: u8,
        oncs: u16,
        namespaces: &[(u32, usize)],
        features: SoftFeatures,
        opts: ControllerOptions,
    ) -> Result<(Arc<SoftController>, Arc<NvmeController>)> {
        let pool = DmaPool::new(Box::new(NoMapper), false);
        let model = Arc::new(SoftController {
            pool: pool.clone(),
            namespaces: namespaces
                .iter()
                .map(|&(bs, bytes)| (bs, Mutex::new(vec![0u8; bytes])))
                .collect(),
            mdts,
            oncs,
            features,
            st: Mutex::new(SoftState::default()),
        });
        let ctrl = NvmeController::start("model".into(), model.clone(), pool, None, opts)?;
        Ok((model, Arc::new(ctrl)))
    }

    /// The pages a command's PRPs describe, checking the PRP rules, as
    /// (address, bytes) passed to `f` in order.
    fn prp_pages(&self, prp1: u64, prp2: u64, len: u64, mut f: impl FnMut(u64, u64)) {
        assert_eq!(prp1 % 4, 0, "PRP1 not dword aligned");
        let first = (PAGE - prp1 % PAGE).min(len);
        f(prp1, first);
        let mut left = len - first;
        if left == 0 {
            return;
        }
        if left <= PAGE {
            assert_eq!(prp2 % PAGE, 0, "PRP2 entry not page aligned");
            f(prp2, left);
            return;
        }
        assert_eq!(prp2 % 8, 0, "PRP list not qword aligned");
        let n = left.div_ceil(PAGE);
        assert!(n <= 512, "a list longer than one page");
        for i in 0..n {
            let a = rd_u64(&self.pool, prp2 + 8 * i);
            assert_eq!(a % PAGE, 0, "PRP list entry not page aligned");
            let l = left.min(PAGE);
            f(a, l);
            left -= l;
        }
    }

    /// The pieces (address, bytes) an SGL describes, starting with the
    /// descriptor in dwords 6..10 of the command, into `out` (cleared
    /// first); an NVMe status code on a malformed list.
    fn sgl_pieces(
        &self,
        d: &[u32; 16],
        len: u64,
        out: &mut Vec<(u64, u64)>,
    ) -> std::result::Result<(), u8> {
        const DATA_SGL_LENGTH_INVALID: u8 = 0x0f;
        const SGL_DESCRIPTOR_TYPE_INVALID: u8 = 0x11;
        let dword = self.features.sgls & 3 == 2;
        let mut desc = (
            d[6] as u64 | (d[7] as u64) << 32,
            d[8] as u64 | (d[9] as u64) << 32,
        );
        out.clear();
        let mut segments = 0;
        loop {
            let (addr, (n, kind)) = (desc.0, cmd::sgl_descriptor_decode(desc.1));
            match kind {
                cmd::sgl_type::DATA_BLOCK => {
                    if dword && !(addr.is_multiple_of(4) && n.is_multiple_of(4)) {
                        return Err(DATA_SGL_LENGTH_INVALID);
                    }
                    out.push((addr, n as u64));
                    break;
                }
                cmd::sgl_type::SEGMENT | cmd::sgl_type::LAST_SEGMENT => {
                    segments += 1;
                    let count = n as usize / cmd::SGL_DESCRIPTOR_BYTES;
                    if !(n as usize).is_multiple_of(cmd::SGL_DESCRIPTOR_BYTES)
                        || count == 0
                        || segments > 16
                    {
                        return Err(SGL_DESCRIPTOR_TYPE_INVALID);
                    }
                    let mut next = None;
                    for i in 0..count as u64 {
                        let lo = rd_u64(&self.pool, addr + 16 * i);
                        let hi = rd_u64(&self.pool, addr + 16 * i + 8);
                        let (l, t) = cmd::sgl_descriptor_decode(hi);
                        let last = i + 1 == count as u64;
                        match t {
                            cmd::sgl_type::DATA_BLOCK => {
                                if dword && !(lo.is_multiple_of(4) && l.is_multiple_of(4)) {
                                    return Err(DATA_SGL_LENGTH_INVALID);
                                }
                                out.push((lo, l as u64));
                            }
                            cmd::sgl_type::SEGMENT | cmd::sgl_type::LAST_SEGMENT
                                if last && kind == cmd::sgl_type::SEGMENT =>
                            {
                                next = Some((lo, hi));
                            }
                            _ => return Err(SGL_DESCRIPTOR_TYPE_INVALID),
                        }
                    }
                    match next {
                        Some(n) => desc = n,
                        None => break,
                    }
                }
                _ => return Err(SGL_DESCRIPTOR_TYPE_INVALID),
            }
        }
        if out.iter().map(|p| p.1).sum::<u64>() != len {
            return Err(DATA_SGL_LENGTH_INVALID);
        }
        Ok(())
    }

    fn exec_admin(&self, st: &mut SoftState, d: &[u32; 16]) -> (u8, u8, u32) {
        let prp1 = d[6] as u64 | (d[7] as u64) << 32;
        match d[0] as u8 {
            cmd::admin_op::IDENTIFY => {
                let mut page = vec![0u8; 4096];
                match d[10] & 0xff {
                    cmd::cns::CONTROLLER => {
                        page[4..12].copy_from_slice(b"MODEL001");
                        page[24..34].copy_from_slice(b"Model NVMe");
                        page[77] = self.mdts;
                        page[259] = self.features.aerl;
                        page[536..540].copy_from_slice(&self.features.sgls.to_le_bytes());
                        if self.features.shadow_doorbells {
                            page[256..258].copy_from_slice(&(1u16 << 8).to_le_bytes());
                        }
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
            cmd::admin_op::SET_FEATURES if d[10] & 0xff == cmd::FEAT_ASYNC_EVENT_CONFIG => {
                st.async_event_config = d[11];
                (0, 0, 0)
            }
            cmd::admin_op::SET_FEATURES => (0, 0, 15 << 16 | 15),
            cmd::admin_op::CREATE_CQ => {
                let qid = d[10] as u16 as usize;
                let size = (d[10] >> 16) + 1;
                if st.cqs.len() <= qid {
                    st.cqs.resize_with(qid + 1, || None);
                }
                st.cqs[qid] = Some(Cq {
                    base: prp1,
                    size,
                    tail: 0,
                    phase: true,
                });
                (0, 0, 0)
            }
            cmd::admin_op::CREATE_SQ => {
                let qid = d[10] as u16 as usize;
                let cqid = (d[11] >> 16) as u16;
                if st.cqs.get(cqid as usize).is_none_or(|c| c.is_none()) {
                    return (1, 0x00, 0); // completion queue invalid
                }
                if st.sqs.len() <= qid {
                    st.sqs.resize_with(qid + 1, || None);
                }
                st.sqs[qid] = Some(Sq {
                    base: prp1,
                    size: (d[10] >> 16) + 1,
                    head: 0,
                    cqid,
                });
                if let Some((dbs, _)) = st.dbbuf {
                    for db in [2 * qid as u64, 2 * qid as u64 + 1] {
                        let v = rd_u32(&self.pool, dbs + 4 * db);
                        assert_eq!(v, 0, "shadow doorbell {db} not cleared before queue {qid}");
                    }
                    self.set_event_idx(st, qid as u16);
                }
                (0, 0, 0)
            }
            cmd::admin_op::DELETE_SQ => {
                let qid = d[10] as u16;
                if let Some(s) = st.sqs.get_mut(qid as usize) {
                    *s = None;
                }
                st.held.retain(|&(q, _)| q != qid);
                (0, 0, 0)
            }
            cmd::admin_op::DELETE_CQ => {
                if let Some(c) = st.cqs.get_mut(d[10] as u16 as usize) {
                    *c = None;
                }
                (0, 0, 0)
            }
            cmd::admin_op::GET_LOG_PAGE => {
                let bytes = ((d[10] >> 16) + 1) * 4;
                let mut page = vec![0u8; bytes as usize];
                let lid = d[10] as u8;
                if lid == cmd::LOG_SMART {
                    page[0] = st.critical_warning;
                    page[1..3].copy_from_slice(&300u16.to_le_bytes());
                    page[3] = 100;
                }
                st.log_reads.push(lid);
                // Reading the page clears (unmasks) its event.
                st.masked_logs.retain(|&l| l != lid);
                wr(&self.pool, prp1, &page);
                (0, 0, 0)
            }
            cmd::admin_op::DOORBELL_BUFFER_CONFIG => {
                let eis = d[8] as u64 | (d[9] as u64) << 32;
                if !self.features.shadow_doorbells {
                    return (0, 0x01, 0);
                }
                if !prp1.is_multiple_of(PAGE) || !eis.is_multiple_of(PAGE) {
                    return (0, 0x02, 0);
                }
                st.dbbuf = Some((prp1, eis));
                st.dbbuf_configs += 1;
                (0, 0, 0)
            }
            cmd::admin_op::ABORT => {
                st.aborts += 1;
                let (sqid, cid) = (d[10] as u16, (d[10] >> 16) as u16);
                let at = st.held.iter().position(|&h| h == (sqid, cid));
                match at {
                    Some(i) if st.abort_completes => {
                        st.held.remove(i);
                        self.post(st, sqid, cid, (ABORTED.0, ABORTED.1, 0), true);
                        (0, 0, 0)
                    }
                    _ => (0, 0, 1),
                }
            }
            _ => (0, 0x01, 0),
        }
    }

    fn exec_io(&self, st: &mut SoftState, d: &[u32; 16]) -> Option<(u8, u8, u32)> {
        let opcode = d[0] as u8;
        let nsid = d[1] as usize;
        let prp1 = d[6] as u64 | (d[7] as u64) << 32;
        let prp2 = d[8] as u64 | (d[9] as u64) << 32;
        if nsid == 0 || nsid > self.namespaces.len() {
            return Some((0, 0x0b, 0));
        }
        let (bs, data) = &self.namespaces[nsid - 1];
        let bs = *bs as u64;
        let lba = d[10] as u64 | (d[11] as u64) << 32;
        let nlb = (d[12] & 0xffff) as u64 + 1;
        match opcode {
            cmd::io_op::READ | cmd::io_op::WRITE => {
                if st.log_io {
                    st.io_log.push((opcode, nlb as u32));
                }
                if let Some((sct, sc, _)) = st.fail_next.front().copied() {
                    st.fail_next.pop_front();
                    return Some((sct, sc, 0));
                }
                if opcode == cmd::io_op::READ && st.hold_reads {
                    return None;
                }
                let mut data = data.lock();
                if lba + nlb > data.len() as u64 / bs {
                    return Some((0, 0x80, 0));
                }
                let limit = PAGE << self.mdts;
                assert!(nlb * bs <= limit, "transfer beyond MDTS");
                let mut at = (lba * bs) as usize;
                let mut copy = |a: u64, l: u64| {
                    let l = l as usize;
                    if opcode == cmd::io_op::READ {
                        wr(&self.pool, a, &data[at..at + l]);
                    } else {
                        rd(&self.pool, a, &mut data[at..at + l]);
                    }
                    at += l;
                };
                match (d[0] >> 14) & 3 {
                    0 => self.prp_pages(prp1, prp2, nlb * bs, copy),
                    1 => {
                        assert!(self.features.sgls & 3 != 0, "SGL not advertised");
                        st.sgl_commands += 1;
                        let mut pieces = std::mem::take(&mut st.sgl_scratch);
                        let walked = self.sgl_pieces(d, nlb * bs, &mut pieces);
                        if walked.is_ok() {
                            st.last_sgl_descriptors = pieces.len();
                            pieces.iter().for_each(|&(a, l)| copy(a, l));
                        }
                        st.sgl_scratch = pieces;
                        if let Err(sc) = walked {
                            return Some((0, sc, 0));
                        }
                    }
                    psdt => panic!("PSDT {psdt}: the driver sends no metadata SGLs"),
                }
                Some((0, 0, 0))
            }
            cmd::io_op::FLUSH => Some((0, 0, 0)),
            cmd::io_op::WRITE_ZEROES => {
                assert!(self.oncs & 8 != 0, "write zeroes not advertised");
                let mut data = data.lock();
                if lba + nlb > data.len() as u64 / bs {
                    return Some((0, 0x80, 0));
                }
                data[(lba * bs) as usize..((lba + nlb) * bs) as usize].fill(0);
                Some((0, 0, 0))
            }
            cmd::io_op::DSM => {
                assert!(self.oncs & 4 != 0, "DSM not advertised");
                let nr = (d[10] & 0xff) as usize + 1;
                let mut ranges = vec![0u8; nr * 16];
                rd(&self.pool, prp1, &mut ranges);
                let mut data = data.lock();
                for r in ranges.chunks_exact(16) {
                    let n = u32::from_le_bytes(r[4..8].try_into().expect("4 bytes")) as u64;
                    let s = u64::from_le_bytes(r[8..16].try_into().expect("8 bytes"));
                    if s + n > data.len() as u64 / bs {
                        return Some((0, 0x80, 0));
                    }
                    data[(s * bs) as usize..((s + n) * bs) as usize].fill(0);
                }
                Some((0, 0, 0))
            }
            _ => Some((0, 0x01, 0)),
        }
    }

    /// Posts a completion for `cid` of `sqid` on its completion queue.
    fn post(&self, st: &mut SoftState, sqid: u16, cid: u16, status: (u8, u8, u32), dnr: bool) {
        let (sct, sc, dw0) = status;
        let Some(sq) = st.sqs.get(sqid as usize).and_then(|s| s.as_ref()) else {
            return;
        };
        let (sq_head, cqid) = (sq.head, sq.cqid);
        let Some(cq) = st.cqs.get_mut(cqid as usize).and_then(|c| c.as_mut()) else {
            return;
        };
        let c = Completion {
            dw0,
            sq_head: sq_head as u16,
            sq_id: sqid,
            cid,
            phase: cq.phase,
            sc,
            sct,
            dnr,
        };
        let d = c.encode();
        let mut bytes = [0u8; 16];
        for (i, x) in d.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&x.to_le_bytes());
        }
        wr(&self.pool, cq.base + cq.tail as u64 * 16, &bytes);
        cq.tail += 1;
        if cq.tail == cq.size {
            cq.tail = 0;
            cq.phase = !cq.phase;
        }
    }

    fn ring(&self, st: &mut SoftState, sqid: u16, tail: u32) {
        loop {
            let Some(sq) = st.sqs.get_mut(sqid as usize).and_then(|s| s.as_mut()) else {
                return;
            };
            if sq.head == tail {
                return;
            }
            let mut raw = [0u8; 64];
            rd(&self.pool, sq.base + sq.head as u64 * 64, &mut raw);
            sq.head = if sq.head + 1 == sq.size {
                0
            } else {
                sq.head + 1
            };
            let mut d = [0u32; 16];
            for (i, x) in d.iter_mut().enumerate() {
                *x = u32::from_le_bytes(raw[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
            }
            let cid = (d[0] >> 16) as u16;
            if sqid == 0 {
                if d[0] as u8 == cmd::admin_op::ABORT && st.hold_aborts {
                    st.aborts += 1;
                    continue;
                }
                if d[0] as u8 == cmd::admin_op::ASYNC_EVENT_REQUEST {
                    if st.aers.len() > self.features.aerl as usize {
                        // Asynchronous Event Request Limit Exceeded.
                        self.post(st, 0, cid, (1, 0x05, 0), true);
                    } else {
                        st.aers.push_back(cid);
                    }
                    continue;
                }
                let r = self.exec_admin(st, &d);
                self.post(st, sqid, cid, r, r.0 != 0 || r.1 != 0);
                continue;
            }
            // An injected failure decides DNR; the controller's own errors
            // set it.
            let injected_dnr = st.fail_next.front().map(|f| f.2);
            match self.exec_io(st, &d) {
                Some(r) => {
                    let failed = r.0 != 0 || r.1 != 0;
                    let dnr = failed && injected_dnr.unwrap_or(true);
                    self.post(st, sqid, cid, r, dnr);
                }
                None => st.held.push((sqid, cid)),
            }
        }
    }

    /// Writes queue `qid`'s EventIdx entries: the SQ tail and CQ head last
    /// seen (idle: the next move needs a doorbell), or one behind them
    /// (polling: no doorbell needed).
    #[cold]
    fn set_event_idx(&self, st: &mut SoftState, qid: u16) {
        let Some((dbs, eis)) = st.dbbuf else { return };
        let polling = st.shadow_polling;
        let behind = |v: u32, size: u32| if polling { (v + size - 1) % size } else { v };
        if let Some(sq) = st.sqs.get(qid as usize).and_then(|s| s.as_ref()) {
            let v = behind(sq.head, sq.size);
            wr(&self.pool, eis + 8 * qid as u64, &v.to_le_bytes());
            let cq_size = st
                .cqs
                .get(sq.cqid as usize)
                .and_then(|c| c.as_ref())
                .map_or(1, |c| c.size);
            let cqid = sq.cqid as u64;
            let head = rd_u32(&self.pool, dbs + 8 * cqid + 4);
            assert!(head < cq_size, "shadow CQ head {head} past the ring");
            let v = behind(head, cq_size);
            wr(&self.pool, eis + 8 * cqid + 4, &v.to_le_bytes());
        }
    }

    /// Checks that an MMIO doorbell value is the shadow's (the driver
    /// writes the shadow first).
    #[cold]
    fn check_shadow(&self, st: &SoftState, idx: usize, val: u32) {
        let Some((dbs, _)) = st.dbbuf else { return };
        let shadow = rd_u32(&self.pool, dbs + 4 * idx as u64);
        assert_eq!(
            shadow, val,
            "doorbell {idx}: MMIO value is not the shadow's"
        );
    }

    /// Plays a controller that polls the shadow doorbells: runs every I/O
    /// submission queue up to its shadow tail.
    pub fn poll_shadow(&self) {
        let mut st = self.st.lock();
        let Some((dbs, _)) = st.dbbuf else { return };
        for qid in 1..st.sqs.len() as u16 {
            let Some(size) = st.sqs[qid as usize].as_ref().map(|s| s.size) else {
                continue;
            };
            let tail = rd_u32(&self.pool, dbs + 8 * qid as u64);
            assert!(tail < size, "shadow SQ tail {tail} past the ring");
            self.ring(&mut st, qid, tail);
            self.set_event_idx(&mut st, qid);
        }
    }

    /// Raises an asynchronous event: reported on an outstanding request
    /// once none of the same log page is waiting to be read.
    pub fn raise_event(&self, ev: AsyncEvent) {
        let mut st = self.st.lock();
        st.pending_events.push_back(ev);
        self.deliver_events(&mut st);
    }

    /// Reports pending events on outstanding requests.
    fn deliver_events(&self, st: &mut SoftState) {
        while !st.aers.is_empty() {
            let masked = &st.masked_logs;
            let Some(i) = st
                .pending_events
                .iter()
                .position(|e| !masked.contains(&e.log_page))
            else {
                return;
            };
            let ev = st.pending_events.remove(i).expect("found");
            let cid = st.aers.pop_front().expect("not empty");
            st.masked_logs.push(ev.log_page);
            self.post(st, 0, cid, (0, 0, ev.encode()), false);
        }
    }

    /// I/O submission queues the controller has now.
    pub fn io_queues(&self) -> usize {
        let st = self.st.lock();
        st.sqs.iter().skip(1).filter(|q| q.is_some()).count()
    }

    /// Completes every held command successfully (their data untouched).
    pub fn release_held(&self) {
        let mut st = self.st.lock();
        st.hold_reads = false;
        for (sqid, cid) in std::mem::take(&mut st.held) {
            self.post(&mut st, sqid, cid, (0, 0, 0), false);
        }
    }

    /// Posts a successful completion for `cid` of `sqid` whether or not
    /// such a command is outstanding (a misbehaving controller).
    pub fn post_stray(&self, sqid: u16, cid: u16) {
        let mut st = self.st.lock();
        self.post(&mut st, sqid, cid, (0, 0, 0), false);
    }
}

impl Bar for SoftController {
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
            o if o >= regs::DOORBELLS => {
                let idx = (o - regs::DOORBELLS) / 4;
                let qid = (idx / 2) as u16;
                let shadowed = qid != 0 && st.dbbuf.is_some();
                if shadowed {
                    self.check_shadow(&st, idx, val);
                }
                if idx.is_multiple_of(2) {
                    if qid != 0 {
                        st.io_sq_doorbells += 1;
                    }
                    self.ring(&mut st, qid, val);
                    if qid == 0 {
                        // New requests, or a log read that unmasked events.
                        self.deliver_events(&mut st);
                    }
                } else if qid != 0 {
                    st.io_cq_doorbells += 1;
                }
                if shadowed {
                    self.set_event_idx(&mut st, qid);
                }
            }
            regs::CC => {
                let was = st.cc & 1;
                st.cc = val;
                if val & 1 == 1 && was == 0 {
                    let (sq, cq) = ((st.aqa & 0xfff) + 1, ((st.aqa >> 16) & 0xfff) + 1);
                    let (asq, acq) = (st.asq, st.acq);
                    st.cqs = vec![Some(Cq {
                        base: acq,
                        size: cq,
                        tail: 0,
                        phase: true,
                    })];
                    st.sqs = vec![Some(Sq {
                        base: asq,
                        size: sq,
                        head: 0,
                        cqid: 0,
                    })];
                    st.csts = 1;
                } else if val & 1 == 0 {
                    if was == 1 {
                        st.disables += 1;
                        st.disabled_with_held = Some(st.held.len());
                    }
                    st.sqs.clear();
                    st.cqs.clear();
                    st.held.clear();
                    st.dbbuf = None;
                    st.aers.clear();
                    st.masked_logs.clear();
                    st.fatal = false;
                    st.csts = 0;
                }
            }
            regs::AQA => st.aqa = val,
            regs::ASQ => st.asq = st.asq & !0xffff_ffff | val as u64,
            o if o == regs::ASQ + 4 => st.asq = st.asq & 0xffff_ffff | (val as u64) << 32,
            regs::ACQ => st.acq = st.acq & !0xffff_ffff | val as u64,
            o if o == regs::ACQ + 4 => st.acq = st.acq & 0xffff_ffff | (val as u64) << 32,
            _ => {}
        }
    }
}
