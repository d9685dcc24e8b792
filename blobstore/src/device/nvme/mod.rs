//! `NvmeDevice`: a userspace NVMe driver over VFIO, polled, one I/O queue
//! pair per thread.
//!
//! Layout: [`regs`] (registers, enable/disable), [`cmd`] (command and
//! completion encoding, Identify data), [`prp`] (PRP planning), [`queue`]
//! (a queue pair), [`dma`] (IOVA-mapped memory), `vfio` (the VFIO glue),
//! and here the controller (admin commands, reset) and the per-thread I/O
//! backend.
//!
//! What the driver does with each operation:
//! - Read and Write: split at the transfer limit (MDTS, at most 2 MiB) and
//!   wherever the buffers cannot share one PRP list; memory that is not from
//!   the DMA pool is bounced through one pool buffer (one copy).
//! - Flush: always sent (a no-op for controllers without a volatile cache).
//! - Unmap: Dataset Management with the deallocate attribute when ONCS says
//!   it is supported; otherwise [`Error::Unsupported`].
//! - Write Zeroes: the command when supported; otherwise emulated by writes
//!   from one zeroed pool buffer.
//!
//! Invariants:
//! - A queue pair belongs to one thread's channel; the admin queue is shared
//!   behind a mutex and only used for setup, queue creation, Abort and logs.
//! - An operation is reported once: when all its commands completed, or
//!   earlier with an error (timeout, reset, fatal); memory of commands still
//!   owned by the controller is kept alive until they complete or the
//!   controller is reset.
//! - After [`NvmeController::reset`], every command that was in flight is
//!   failed with [`Error::DeviceFailed`] and each thread's queue pair is
//!   created again on its next use.

pub mod cmd;
pub mod dma;
pub mod prp;
pub mod queue;
pub mod regs;
#[doc(hidden)]
pub mod soft;
#[cfg(test)]
mod tests;
mod vfio;

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use self::cmd::{
    cns, io_op, Command, Completion, ControllerIdentity, ErrorLogEntry, NamespaceIdentity, SmartLog,
};
use self::dma::DmaPool;
use self::prp::{Transfer, MAX_TRANSFER_BYTES, PAGE};
use self::queue::QueuePair;
use self::regs::{Bar, Capabilities, CSTS, CSTS_CFS};
use super::{BlockDevice, ChannelBackend, DeviceId, DmaBuf, Geometry, IoKind, IoOp, Segment, Tag};
use crate::error::{Error, Result};

/// Entries of the admin queue pair.
const ADMIN_ENTRIES: u32 = 32;
/// Entries of each I/O queue pair (bounded by CAP.MQES).
const IO_ENTRIES: u32 = 256;
/// Default per-command timeout for I/O.
const DEFAULT_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout for admin commands.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

struct AdminState {
    qp: QueuePair,
    /// One page for Identify and log data.
    page: DmaBuf,
}

/// One NVMe controller, shared by its namespaces' devices.
pub struct NvmeController {
    name: String,
    bar: Arc<dyn Bar>,
    pool: Arc<DmaPool>,
    cap: Capabilities,
    identity: ControllerIdentity,
    max_transfer_bytes: u64,
    io_queue_pairs: u16,
    admin: Mutex<AdminState>,
    qids: Mutex<Vec<bool>>,
    generation: AtomicU64,
    failed: AtomicBool,
    /// A reset is in progress: channels neither submit nor reap.
    resetting: AtomicBool,
    io_timeout_us: AtomicU64,
    _vfio: Option<vfio::VfioPci>,
}

/// Controllers attached by this process, by PCI address (kept for the life
/// of the process: see the `vfio` module).
static CONTROLLERS: Mutex<Vec<(String, Arc<NvmeController>)>> = Mutex::new(Vec::new());

/// Namespaces opened through [`NvmeDevice::open`] (the spec path) in this
/// process, as (PCI address, namespace id): one opener each, so two
/// blobstores never write one namespace. Other processes are kept out by
/// the VFIO group, which the kernel lets one process open at a time.
static CLAIMED: Mutex<Vec<(String, u32)>> = Mutex::new(Vec::new());

/// This process's claim on one namespace, released on drop.
struct NamespaceClaim {
    pci: String,
    nsid: u32,
}

impl NamespaceClaim {
    /// Claims namespace `nsid` of `pci`, or says who holds it.
    fn take(pci: &str, nsid: u32) -> Result<NamespaceClaim> {
        let mut claimed = CLAIMED.lock();
        if claimed.iter().any(|(p, n)| p == pci && *n == nsid) {
            return Err(Error::Busy(format!(
                "nvme:{pci}/ns={nsid} is in use by another device of this process (one opener \
                 per namespace)"
            )));
        }
        claimed.push((pci.to_string(), nsid));
        Ok(NamespaceClaim {
            pci: pci.to_string(),
            nsid,
        })
    }
}

impl Drop for NamespaceClaim {
    fn drop(&mut self) {
        CLAIMED
            .lock()
            .retain(|(p, n)| !(*p == self.pci && *n == self.nsid));
    }
}

fn read_page(buf: &DmaBuf, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: the admin command that wrote the page completed; `len` is
    // within the page; the copy goes through a raw pointer.
    unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), v.as_mut_ptr(), len) };
    v
}

impl NvmeController {
    /// The controller at PCI address `pci` (bound to vfio-pci), attached on
    /// first use and shared afterwards.
    pub fn open(pci: &str) -> Result<Arc<NvmeController>> {
        let mut all = CONTROLLERS.lock();
        if let Some((_, c)) = all.iter().find(|(p, _)| p == pci) {
            return Ok(c.clone());
        }
        let v = vfio::open(pci)?;
        let (bar, pool) = (v.bar.clone(), v.pool.clone());
        let ctrl = Arc::new(NvmeController::start(pci.into(), bar, pool, Some(v))?);
        all.push((pci.into(), ctrl.clone()));
        Ok(ctrl)
    }

    /// Brings up the controller behind `bar`: disable, admin queue, enable,
    /// Identify, number of queues.
    fn start(
        name: String,
        bar: Arc<dyn Bar>,
        pool: Arc<DmaPool>,
        vfio: Option<vfio::VfioPci>,
    ) -> Result<NvmeController> {
        let cap = Capabilities::decode(bar.read64(regs::CAP));
        if !cap.nvm_command_set || cap.min_page_size > PAGE as usize {
            return Err(Error::Unsupported(format!(
                "{name}: controller without the NVM command set or 4 KiB pages ({cap:?})"
            )));
        }
        let admin_entries = ADMIN_ENTRIES.min(cap.max_queue_entries);
        let qp = QueuePair::new(&pool, &cap, 0, admin_entries)?;
        regs::disable(&*bar, &cap, &name)?;
        regs::enable(
            &*bar,
            &cap,
            qp.sq_iova(),
            qp.cq_iova(),
            admin_entries,
            &name,
        )?;
        let page = pool.alloc(PAGE as usize)?;
        let mut ctrl = NvmeController {
            name,
            bar,
            pool,
            cap,
            identity: ControllerIdentity::parse(&[0u8; 4096])?,
            max_transfer_bytes: 0,
            io_queue_pairs: 0,
            admin: Mutex::new(AdminState { qp, page }),
            qids: Mutex::new(Vec::new()),
            generation: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            resetting: AtomicBool::new(false),
            io_timeout_us: AtomicU64::new(DEFAULT_IO_TIMEOUT.as_micros() as u64),
            _vfio: vfio,
        };
        let page = ctrl.identify(cns::CONTROLLER, 0)?;
        ctrl.identity = ControllerIdentity::parse(&page)?;
        ctrl.max_transfer_bytes = ctrl
            .identity
            .max_transfer_bytes(cap.min_page_size)
            .map_or(MAX_TRANSFER_BYTES, |m| (m as u64).min(MAX_TRANSFER_BYTES));
        ctrl.io_queue_pairs = ctrl.set_num_queues()?;
        *ctrl.qids.lock() = vec![false; ctrl.io_queue_pairs as usize + 1];
        Ok(ctrl)
    }

    fn set_num_queues(&self) -> Result<u16> {
        let c = self.admin_cmd(Command::set_num_queues(64, 64), "set features (queues)")?;
        let granted = ((c.dw0 & 0xffff) as u16).min((c.dw0 >> 16) as u16) + 1;
        Ok(granted.min(64))
    }

    /// PCI address (or test name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What Identify Controller said.
    pub fn identity(&self) -> &ControllerIdentity {
        &self.identity
    }

    /// The decoded CAP register.
    pub fn capabilities(&self) -> Capabilities {
        self.cap
    }

    /// Largest bytes per command the driver sends.
    pub fn max_transfer_bytes(&self) -> u64 {
        self.max_transfer_bytes
    }

    /// I/O queue pairs the controller granted (threads that can do I/O at
    /// once, per controller).
    pub fn io_queue_pairs(&self) -> u16 {
        self.io_queue_pairs
    }

    /// How registers are reached: "mmap" (BAR0 mapped), "syscall"
    /// (pread/pwrite on the VFIO device), or "model" (unit tests).
    pub fn register_access(&self) -> &'static str {
        match &self._vfio {
            Some(v) if v.bar_mmapped() => "mmap",
            Some(_) => "syscall",
            None => "model",
        }
    }

    /// The DMA pool buffers for this controller come from.
    pub fn pool(&self) -> &Arc<DmaPool> {
        &self.pool
    }

    /// Per-command I/O timeout.
    pub fn io_timeout(&self) -> Duration {
        Duration::from_micros(self.io_timeout_us.load(Ordering::Relaxed))
    }

    /// Sets the per-command I/O timeout (commands submitted from now on).
    pub fn set_io_timeout(&self, t: Duration) {
        self.io_timeout_us
            .store(t.as_micros() as u64, Ordering::Relaxed);
    }

    /// True once the controller reported a fatal status (until a reset).
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn failed_error(&self, reason: &str) -> Error {
        Error::DeviceFailed {
            device: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// Reads CSTS; marks the controller failed on a fatal status.
    fn check_fatal(&self) -> bool {
        let csts = self.bar.read32(CSTS);
        if csts == u32::MAX || csts & CSTS_CFS != 0 {
            self.failed.store(true, Ordering::Release);
            return true;
        }
        false
    }

    fn admin_cmd(&self, cmd: Command, what: &str) -> Result<Completion> {
        let mut st = self.admin.lock();
        self.admin_locked(&mut st, cmd, what)
    }

    fn admin_locked(&self, st: &mut AdminState, cmd: Command, what: &str) -> Result<Completion> {
        let cid = st
            .qp
            .push(&cmd)
            .ok_or_else(|| Error::Busy(format!("{}: admin queue full", self.name)))?;
        st.qp.ring(&*self.bar);
        let start = Instant::now();
        let mut got = None;
        loop {
            st.qp.poll(&*self.bar, |c| {
                if c.cid == cid {
                    got = Some(c);
                }
            });
            if let Some(c) = got {
                return match c.status() {
                    Ok(()) => Ok(c),
                    Err(status) => Err(Error::Nvme {
                        op: admin_name(cmd.opcode),
                        nsid: cmd.nsid,
                        lba: 0,
                        blocks: 0,
                        status,
                    }),
                };
            }
            if start.elapsed() > ADMIN_TIMEOUT {
                if self.check_fatal() {
                    return Err(self.failed_error(&format!("fatal status during {what}")));
                }
                return Err(Error::Timeout {
                    op: admin_name(cmd.opcode),
                    lba: 0,
                    blocks: 0,
                    after_ms: ADMIN_TIMEOUT.as_millis() as u64,
                });
            }
            std::hint::spin_loop();
        }
    }

    /// Runs Identify with `cns` for `nsid` and returns the 4 KiB page.
    pub fn identify(&self, cns: u32, nsid: u32) -> Result<Vec<u8>> {
        let mut st = self.admin.lock();
        let iova = st.page.iova().expect("pool memory");
        self.admin_locked(&mut st, Command::identify(cns, nsid, iova), "identify")?;
        Ok(read_page(&st.page, PAGE as usize))
    }

    /// Active namespaces with what Identify Namespace says about each.
    pub fn namespaces(&self) -> Result<Vec<(u32, NamespaceIdentity)>> {
        let ids = cmd::parse_ns_list(&self.identify(cns::ACTIVE_NS_LIST, 0)?);
        let mut out = Vec::new();
        for id in ids {
            if let Some(ns) = NamespaceIdentity::parse(&self.identify(cns::NAMESPACE, id)?)? {
                out.push((id, ns));
            }
        }
        Ok(out)
    }

    fn log_page(&self, lid: u8, bytes: u32) -> Result<Vec<u8>> {
        let mut st = self.admin.lock();
        let iova = st.page.iova().expect("pool memory");
        self.admin_locked(
            &mut st,
            Command::get_log_page(lid, bytes, iova),
            "get log page",
        )?;
        Ok(read_page(&st.page, bytes as usize))
    }

    /// The SMART / Health log.
    pub fn smart_log(&self) -> Result<SmartLog> {
        SmartLog::parse(&self.log_page(cmd::LOG_SMART, 512)?)
    }

    /// Used entries of the Error Information log (first page of it).
    pub fn error_log(&self) -> Result<Vec<ErrorLogEntry>> {
        Ok(ErrorLogEntry::parse_all(
            &self.log_page(cmd::LOG_ERROR_INFO, PAGE as u32)?,
        ))
    }

    /// Asks the controller to abort command `cid` of queue `sqid`; true when
    /// it says it did (Completion dword 0 bit 0 clear).
    pub fn abort(&self, sqid: u16, cid: u16) -> Result<bool> {
        let c = self.admin_cmd(Command::abort(sqid, cid), "abort")?;
        Ok(c.dw0 & 1 == 0)
    }

    /// Resets the controller: disable, enable, queues again. Every command in
    /// flight fails with [`Error::DeviceFailed`]; each thread's queue pair
    /// is created again on its next use.
    ///
    /// Like Linux's driver, a live controller first has its I/O queues
    /// deleted (aborting their commands) and is disabled only then; some
    /// controllers (QEMU 7.2's model among them) mishandle a disable with
    /// I/O still running.
    pub fn reset(&self) -> Result<()> {
        let mut st = self.admin.lock();
        self.resetting.store(true, Ordering::Release);
        let res = self.reset_locked(&mut st);
        if res.is_err() {
            self.failed.store(true, Ordering::Release);
        }
        self.resetting.store(false, Ordering::Release);
        res
    }

    fn reset_locked(&self, st: &mut AdminState) -> Result<()> {
        if !self.is_failed() {
            let qids: Vec<u16> = {
                let q = self.qids.lock();
                (1..q.len()).filter(|&i| q[i]).map(|i| i as u16).collect()
            };
            for qid in qids {
                // Best effort: the disable below removes them anyway.
                let _ = self.admin_locked(st, Command::delete_queue(true, qid), "delete I/O SQ");
                let _ = self.admin_locked(st, Command::delete_queue(false, qid), "delete I/O CQ");
            }
        }
        self.failed.store(true, Ordering::Release);
        regs::disable(&*self.bar, &self.cap, &self.name)?;
        st.qp.reset();
        let entries = st.qp.entries();
        regs::enable(
            &*self.bar,
            &self.cap,
            st.qp.sq_iova(),
            st.qp.cq_iova(),
            entries,
            &self.name,
        )?;
        let granted = {
            let c = self.admin_locked(st, Command::set_num_queues(64, 64), "set features")?;
            ((c.dw0 & 0xffff) as u16).min((c.dw0 >> 16) as u16) + 1
        };
        if granted < self.io_queue_pairs {
            return Err(self.failed_error("fewer queues granted after reset"));
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.failed.store(false, Ordering::Release);
        Ok(())
    }

    fn alloc_qid(&self) -> Result<u16> {
        let mut q = self.qids.lock();
        let free = (1..q.len()).find(|&i| !q[i]).ok_or_else(|| {
            Error::Busy(format!(
                "{}: all {} I/O queue pairs are in use (one per thread)",
                self.name, self.io_queue_pairs
            ))
        })?;
        q[free] = true;
        Ok(free as u16)
    }

    fn free_qid(&self, qid: u16) {
        self.qids.lock()[qid as usize] = false;
    }

    /// Creates the controller side of `qp` (completion queue, then
    /// submission queue).
    fn create_io_queues(&self, qp: &QueuePair) -> Result<()> {
        let (qid, n) = (qp.qid, qp.entries());
        self.admin_cmd(Command::create_cq(qid, n, qp.cq_iova()), "create I/O CQ")?;
        if let Err(e) = self.admin_cmd(
            Command::create_sq(qid, n, qp.sq_iova(), qid),
            "create I/O SQ",
        ) {
            let _ = self.admin_cmd(Command::delete_queue(false, qid), "delete I/O CQ");
            return Err(e);
        }
        Ok(())
    }

    fn delete_io_queues(&self, qid: u16) {
        let _ = self.admin_cmd(Command::delete_queue(true, qid), "delete I/O SQ");
        let _ = self.admin_cmd(Command::delete_queue(false, qid), "delete I/O CQ");
    }
}

fn admin_name(opcode: u8) -> &'static str {
    use cmd::admin_op::*;
    match opcode {
        DELETE_SQ => "delete I/O SQ",
        CREATE_SQ => "create I/O SQ",
        GET_LOG_PAGE => "get log page",
        DELETE_CQ => "delete I/O CQ",
        CREATE_CQ => "create I/O CQ",
        IDENTIFY => "identify",
        ABORT => "abort",
        SET_FEATURES => "set features",
        _ => "admin command",
    }
}

/// One namespace of an NVMe controller as a [`BlockDevice`].
pub struct NvmeDevice {
    ctrl: Arc<NvmeController>,
    nsid: u32,
    geometry: Geometry,
    dsm: bool,
    write_zeroes: bool,
    id: DeviceId,
    /// Held when opened through [`NvmeDevice::open`].
    _claim: Option<NamespaceClaim>,
}

impl NvmeDevice {
    /// Namespace `nsid` of the controller at PCI address `pci` (bound to
    /// vfio-pci). The spec form is `nvme:<pci>[/ns=<n>]`. Fails with
    /// [`Error::Busy`] ("in use") while this process has the namespace open
    /// through another `NvmeDevice::open`, or another process holds the
    /// controller's VFIO group.
    pub fn open(pci: &str, nsid: u32) -> Result<NvmeDevice> {
        let claim = NamespaceClaim::take(pci, nsid)?;
        let mut dev = NvmeDevice::from_controller(NvmeController::open(pci)?, nsid)?;
        dev._claim = Some(claim);
        Ok(dev)
    }

    /// Namespace `nsid` of an attached controller. Takes no claim: the
    /// caller decides who else may use the namespace (tests share one).
    pub fn from_controller(ctrl: Arc<NvmeController>, nsid: u32) -> Result<NvmeDevice> {
        if nsid == 0 || nsid > ctrl.identity.nn {
            return Err(Error::InvalidArgument(format!(
                "{}: namespace {nsid} does not exist (the controller has {})",
                ctrl.name, ctrl.identity.nn
            )));
        }
        let page = ctrl.identify(cns::NAMESPACE, nsid)?;
        let ns = NamespaceIdentity::parse(&page)?.ok_or_else(|| {
            Error::InvalidArgument(format!("{}: namespace {nsid} is not active", ctrl.name))
        })?;
        if ns.metadata_bytes != 0 || !(ns.block_size == 512 || ns.block_size == 4096) {
            return Err(Error::Unsupported(format!(
                "{}: namespace {nsid} has {}-byte blocks with {} metadata bytes (512 or 4096 \
                 without metadata supported)",
                ctrl.name, ns.block_size, ns.metadata_bytes
            )));
        }
        Ok(NvmeDevice::with_shape(
            ctrl,
            nsid,
            ns.block_size,
            ns.size_blocks,
            ns.deallocated_reads_zeroes,
        ))
    }

    /// A device for namespace `nsid` with the given shape, trusted without
    /// asking the controller: for exercising the controller's own checks
    /// (an unknown namespace, an LBA past the end).
    pub fn unchecked(ctrl: Arc<NvmeController>, nsid: u32, block_size: u32, blocks: u64) -> Self {
        NvmeDevice::with_shape(ctrl, nsid, block_size, blocks, false)
    }

    fn with_shape(
        ctrl: Arc<NvmeController>,
        nsid: u32,
        block_size: u32,
        blocks: u64,
        dealloc_zeroes: bool,
    ) -> NvmeDevice {
        let dsm = ctrl.identity.supports_dsm();
        NvmeDevice {
            geometry: Geometry {
                block_size,
                block_count: blocks,
                max_transfer_bytes: ctrl.max_transfer_bytes as u32,
                unmap_reads_zeroes: dsm && dealloc_zeroes,
            },
            dsm,
            write_zeroes: ctrl.identity.supports_write_zeroes(),
            ctrl,
            nsid,
            id: DeviceId::fresh(),
            _claim: None,
        }
    }

    /// The controller.
    pub fn controller(&self) -> &Arc<NvmeController> {
        &self.ctrl
    }

    /// The namespace id.
    pub fn nsid(&self) -> u32 {
        self.nsid
    }

    /// True when Unmap is a Dataset Management deallocate (else
    /// unsupported).
    pub fn supports_unmap(&self) -> bool {
        self.dsm
    }

    /// True when Write Zeroes is the NVMe command (else emulated).
    pub fn native_write_zeroes(&self) -> bool {
        self.write_zeroes
    }
}

impl BlockDevice for NvmeDevice {
    fn geometry(&self) -> Geometry {
        self.geometry
    }
    fn id(&self) -> DeviceId {
        self.id
    }
    fn name(&self) -> String {
        format!("nvme:{}/ns={}", self.ctrl.name, self.nsid)
    }
    fn new_backend(&self) -> Result<Box<dyn ChannelBackend>> {
        Ok(Box::new(NvmeBackend::new(self)?))
    }
    fn alloc_buf(&self, len_bytes: usize) -> Result<DmaBuf> {
        self.ctrl.pool.alloc(len_bytes)
    }
}

/// What a command carries besides its dwords.
enum CmdData {
    None,
    Prp(Transfer),
    /// One deallocate range, written into the command's page.
    Range {
        lba: u64,
        blocks: u32,
    },
}

struct PendingCmd {
    tag: Tag,
    cmd: Command,
    data: CmdData,
}

struct CmdSlot {
    tag: Tag,
    deadline: Instant,
    /// The operation was already reported (timeout); the memory is kept
    /// alive here until the controller lets go of the command.
    zombie: Option<Rc<KeepAlive>>,
}

struct KeepAlive {
    _segs: Vec<Segment>,
    _bounce: Option<DmaBuf>,
}

struct OpState {
    kind: IoKind,
    lba: u64,
    blocks: u64,
    /// Commands not yet completed (pending or outstanding).
    remaining: usize,
    error: Option<Error>,
    segs: Vec<Segment>,
    bounce: Option<DmaBuf>,
}

/// A thread's I/O queue pair on one namespace.
struct NvmeBackend {
    ctrl: Arc<NvmeController>,
    nsid: u32,
    block_size: u64,
    dsm: bool,
    write_zeroes: bool,
    qp: QueuePair,
    generation: u64,
    /// One page per command id: its PRP list or its deallocate range.
    pages: DmaBuf,
    slots: Vec<Option<CmdSlot>>,
    ops: HashMap<Tag, OpState>,
    pending: VecDeque<PendingCmd>,
    zeroes: Option<DmaBuf>,
    polls_since_check: u32,
    /// A submission happened since the last deadline check.
    check_due: bool,
    /// Earliest deadline of the commands the controller holds (a bound:
    /// it may belong to a command that completed since).
    next_deadline: Option<Instant>,
    /// Failed ops waiting for the next reap to report them.
    stale: Vec<Tag>,
}

impl NvmeBackend {
    fn new(dev: &NvmeDevice) -> Result<NvmeBackend> {
        let ctrl = dev.ctrl.clone();
        if ctrl.is_failed() {
            return Err(ctrl.failed_error("controller failed; reset it first"));
        }
        let entries = IO_ENTRIES.min(ctrl.cap.max_queue_entries);
        let qid = ctrl.alloc_qid()?;
        let made = QueuePair::new(&ctrl.pool, &ctrl.cap, qid, entries).and_then(|qp| {
            let pages = ctrl.pool.alloc(entries as usize * PAGE as usize)?;
            let generation = ctrl.generation.load(Ordering::Acquire);
            ctrl.create_io_queues(&qp)?;
            Ok((qp, pages, generation))
        });
        let (qp, pages, generation) = match made {
            Ok(m) => m,
            Err(e) => {
                ctrl.free_qid(qid);
                return Err(e);
            }
        };
        Ok(NvmeBackend {
            nsid: dev.nsid,
            block_size: dev.geometry.block_size as u64,
            dsm: dev.dsm,
            write_zeroes: dev.write_zeroes,
            slots: (0..entries).map(|_| None).collect(),
            qp,
            generation,
            pages,
            ops: HashMap::new(),
            pending: VecDeque::new(),
            zeroes: None,
            polls_since_check: 0,
            check_due: false,
            next_deadline: None,
            stale: Vec::new(),
            ctrl,
        })
    }

    fn page_iova(&self, cid: u16) -> u64 {
        self.pages.iova().expect("pool memory").0 + cid as u64 * PAGE
    }

    fn write_page_u64(&self, cid: u16, index: usize, val: u64) {
        debug_assert!(index < (PAGE / 8) as usize);
        let base = self.pages.as_mut_ptr().cast::<u64>();
        // SAFETY: page `cid` of the per-command pages, entry `index` < 512;
        // the controller reads it only after the doorbell for this command.
        unsafe { std::ptr::write_volatile(base.add(cid as usize * 512 + index), val.to_le()) };
    }

    /// Builds the commands of `op` (into `pending`) and its state.
    fn plan(&mut self, tag: Tag, op: &IoOp) -> Result<()> {
        let bs = self.block_size;
        let mut cmds: Vec<(Command, CmdData)> = Vec::new();
        let mut bounce = None;
        match op.kind {
            IoKind::Read | IoKind::Write => {
                let opcode = if op.kind == IoKind::Read {
                    io_op::READ
                } else {
                    io_op::WRITE
                };
                let pieces: Option<Vec<_>> = op
                    .segs
                    .iter()
                    .map(|s| s.iova().map(|i| (i, s.len() as u64)))
                    .collect();
                let max = self.ctrl.max_transfer_bytes;
                let plan = pieces.and_then(|p| prp::plan(&p, bs, max));
                let plan = match plan {
                    Some(p) => p,
                    None => {
                        // Not pool memory (or not describable): one copy.
                        let total: usize = op.segs.iter().map(|s| s.len()).sum();
                        let b = self.ctrl.pool.alloc(total)?;
                        if op.kind == IoKind::Write {
                            let mut at = 0;
                            for s in &op.segs {
                                // SAFETY: the segment belongs to this op; the
                                // bounce buffer is ours and not yet handed on.
                                unsafe {
                                    s.read_at(
                                        0,
                                        std::slice::from_raw_parts_mut(
                                            b.as_mut_ptr().add(at),
                                            s.len(),
                                        ),
                                    )
                                };
                                at += s.len();
                            }
                        }
                        let iova = b.iova().expect("pool memory");
                        let p = prp::plan(&[(iova, total as u64)], bs, max)
                            .expect("one pool buffer always plans");
                        bounce = Some(b);
                        p
                    }
                };
                for t in plan {
                    let cmd = Command::rw(opcode, self.nsid, op.lba + t.first_block, t.blocks);
                    cmds.push((cmd, CmdData::Prp(t)));
                }
            }
            IoKind::Flush => cmds.push((Command::flush(self.nsid), CmdData::None)),
            IoKind::Unmap => {
                if !self.dsm {
                    return Err(Error::Unsupported(format!(
                        "{}: the controller has no Dataset Management (unmap)",
                        self.ctrl.name
                    )));
                }
                let mut at = 0;
                while at < op.blocks {
                    let n = (op.blocks - at).min(u32::MAX as u64) as u32;
                    let cmd = Command::deallocate(self.nsid, crate::device::Iova(0), 1);
                    cmds.push((
                        cmd,
                        CmdData::Range {
                            lba: op.lba + at,
                            blocks: n,
                        },
                    ));
                    at += n as u64;
                }
            }
            IoKind::WriteZeroes => {
                let mut at = 0;
                if self.write_zeroes {
                    while at < op.blocks {
                        let n = (op.blocks - at).min(65536) as u32;
                        let cmd = Command::rw(io_op::WRITE_ZEROES, self.nsid, op.lba + at, n);
                        cmds.push((cmd, CmdData::None));
                        at += n as u64;
                    }
                } else {
                    // Emulated: writes from one zeroed buffer.
                    let max = self.ctrl.max_transfer_bytes;
                    if self.zeroes.is_none() {
                        self.zeroes = Some(self.ctrl.pool.alloc(max as usize)?);
                    }
                    let iova = self.zeroes.as_ref().and_then(|z| z.iova()).expect("pool");
                    while at < op.blocks {
                        let n = (op.blocks - at).min(max / bs);
                        let t = prp::plan(&[(iova, n * bs)], bs, max)
                            .expect("one pool buffer always plans")
                            .remove(0);
                        let cmd = Command::rw(io_op::WRITE, self.nsid, op.lba + at, n as u32);
                        cmds.push((cmd, CmdData::Prp(t)));
                        at += n;
                    }
                }
            }
        }
        self.ops.insert(
            tag,
            OpState {
                kind: op.kind,
                lba: op.lba,
                blocks: op.blocks,
                remaining: cmds.len(),
                error: None,
                segs: op.segs.iter().map(|s| s.clone_ref()).collect(),
                bounce,
            },
        );
        for (cmd, data) in cmds {
            self.pending.push_back(PendingCmd { tag, cmd, data });
        }
        Ok(())
    }

    /// Moves pending commands into the ring while there is room.
    fn push_pending(&mut self, finished: &mut Vec<Tag>) {
        let mut pushed = false;
        while !self.qp.is_full() {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let Some(op) = self.ops.get_mut(&p.tag) else {
                continue;
            };
            if op.error.is_some() {
                // The operation already failed: do not send the rest.
                op.remaining -= 1;
                if op.remaining == 0 {
                    finished.push(p.tag);
                }
                continue;
            }
            // The command's page is its command id's: fill it for the id
            // the push below will take.
            let mut cmd = p.cmd;
            let cid = self.qp.next_cid().expect("not full");
            match &p.data {
                CmdData::None => {}
                CmdData::Prp(t) => {
                    let list = crate::device::Iova(self.page_iova(cid));
                    let mut entries = Vec::new();
                    let (p1, p2) = t.prps(list, |i, a| entries.push((i, a)));
                    for (i, a) in entries {
                        self.write_page_u64(cid, i, a);
                    }
                    cmd.prp1 = p1;
                    cmd.prp2 = p2;
                }
                CmdData::Range { lba, blocks } => {
                    // Context attributes 0, length, starting LBA.
                    self.write_page_u64(cid, 0, (*blocks as u64) << 32);
                    self.write_page_u64(cid, 1, *lba);
                    cmd.prp1 = self.page_iova(cid);
                }
            }
            let pushed_cid = self.qp.push(&cmd);
            debug_assert_eq!(pushed_cid, Some(cid));
            let deadline = Instant::now() + self.ctrl.io_timeout();
            self.next_deadline = Some(self.next_deadline.map_or(deadline, |d| d.min(deadline)));
            self.slots[cid as usize] = Some(CmdSlot {
                tag: p.tag,
                deadline,
                zombie: None,
            });
            pushed = true;
        }
        if pushed {
            self.qp.ring(&*self.ctrl.bar);
        }
    }

    fn fail_all(&mut self, err: impl Fn() -> Error, finished: &mut Vec<(Tag, Result<()>)>) {
        self.pending.clear();
        for s in self.slots.iter_mut() {
            *s = None;
        }
        for (tag, _) in self.ops.drain() {
            finished.push((tag, Err(err())));
        }
    }

    /// Handles a reset or failure of the controller seen by this thread.
    fn check_controller(&mut self, finished: &mut Vec<(Tag, Result<()>)>) -> Result<()> {
        if self.ctrl.resetting.load(Ordering::Acquire) {
            // The controller may still be using our memory: fail nothing
            // until it is disabled and the reset is done.
            return Err(self.ctrl.failed_error("controller reset in progress"));
        }
        let gen = self.ctrl.generation.load(Ordering::Acquire);
        if gen != self.generation {
            let name = self.ctrl.name.clone();
            self.fail_all(
                || Error::DeviceFailed {
                    device: name.clone(),
                    reason: "controller reset while the operation was in flight".into(),
                },
                finished,
            );
            self.qp.reset();
            self.ctrl.create_io_queues(&self.qp)?;
            self.generation = gen;
        }
        if self.ctrl.is_failed() {
            let name = self.ctrl.name.clone();
            self.fail_all(
                || Error::DeviceFailed {
                    device: name.clone(),
                    reason: "controller fatal status".into(),
                },
                finished,
            );
            return Err(self.ctrl.failed_error("controller failed; reset it"));
        }
        Ok(())
    }

    fn finish(&mut self, tag: Tag) -> Option<(Tag, Result<()>)> {
        let op = self.ops.remove(&tag)?;
        if let Some(e) = op.error {
            return Some((tag, Err(e)));
        }
        if op.kind == IoKind::Read {
            if let Some(b) = &op.bounce {
                let mut at = 0;
                for s in &op.segs {
                    // SAFETY: the read completed, so the controller is done
                    // with the bounce buffer; the segment belongs to this op.
                    unsafe {
                        s.write_at(0, std::slice::from_raw_parts(b.as_ptr().add(at), s.len()))
                    };
                    at += s.len();
                }
            }
        }
        Some((tag, Ok(())))
    }

    fn check_timeouts(&mut self, finished: &mut Vec<(Tag, Result<()>)>) {
        let now = Instant::now();
        let mut expired = Vec::new();
        for (cid, s) in self.slots.iter().enumerate() {
            if let Some(s) = s {
                if s.zombie.is_none() && now >= s.deadline {
                    expired.push((cid as u16, s.tag));
                }
            }
        }
        self.next_deadline = self
            .slots
            .iter()
            .flatten()
            .filter(|s| s.zombie.is_none() && !expired.iter().any(|&(_, t)| s.tag == t))
            .map(|s| s.deadline)
            .min();
        if expired.is_empty() {
            return;
        }
        if self.ctrl.check_fatal() {
            let name = self.ctrl.name.clone();
            self.fail_all(
                || Error::DeviceFailed {
                    device: name.clone(),
                    reason: "controller fatal status".into(),
                },
                finished,
            );
            return;
        }
        let after_ms = self.ctrl.io_timeout().as_millis() as u64;
        for (cid, tag) in expired {
            let keep = match self.ops.remove(&tag) {
                Some(op) => {
                    finished.push((
                        tag,
                        Err(Error::Timeout {
                            op: op.kind.name(),
                            lba: op.lba,
                            blocks: op.blocks,
                            after_ms,
                        }),
                    ));
                    Rc::new(KeepAlive {
                        _segs: op.segs,
                        _bounce: op.bounce,
                    })
                }
                None => Rc::new(KeepAlive {
                    _segs: Vec::new(),
                    _bounce: None,
                }),
            };
            // Every command of the op still owned by the controller keeps
            // the op's memory alive; pending ones are dropped.
            for s in self.slots.iter_mut().flatten() {
                if s.tag == tag && s.zombie.is_none() {
                    s.zombie = Some(keep.clone());
                }
            }
            self.pending.retain(|p| p.tag != tag);
            let _ = self.ctrl.abort(self.qp.qid, cid);
        }
    }
}

impl ChannelBackend for NvmeBackend {
    fn submit(&mut self, tag: Tag, op: &IoOp) -> Result<()> {
        let mut failed = Vec::new();
        let state = self.check_controller(&mut failed);
        for (t, r) in failed {
            // Reported by the next reap: kept as failed ops with no commands.
            self.stale.push(t);
            self.ops.insert(
                t,
                OpState {
                    kind: IoKind::Flush,
                    lba: 0,
                    blocks: 0,
                    remaining: 0,
                    error: r.err(),
                    segs: Vec::new(),
                    bounce: None,
                },
            );
        }
        state?;
        self.plan(tag, op)?;
        self.check_due = true;
        let mut finished = Vec::new();
        self.push_pending(&mut finished);
        debug_assert!(finished.is_empty());
        Ok(())
    }

    fn reap(&mut self, done: &mut dyn FnMut(Tag, Result<()>)) -> usize {
        let mut finished: Vec<(Tag, Result<()>)> = Vec::new();
        // Ops failed while nothing was submitted (see `submit`).
        for t in std::mem::take(&mut self.stale) {
            finished.extend(self.finish(t));
        }
        if self.check_controller(&mut finished).is_ok() {
            let mut completed: Vec<Completion> = Vec::new();
            self.qp.poll(&*self.ctrl.bar, |c| completed.push(c));
            let mut ended = Vec::new();
            for c in completed {
                let Some(slot) = self.slots.get_mut(c.cid as usize).and_then(|s| s.take()) else {
                    continue;
                };
                if slot.zombie.is_some() {
                    continue;
                }
                let Some(op) = self.ops.get_mut(&slot.tag) else {
                    continue;
                };
                if let Err(status) = c.status() {
                    op.error.get_or_insert(Error::Nvme {
                        op: op.kind.name(),
                        nsid: self.nsid,
                        lba: op.lba,
                        blocks: op.blocks,
                        status,
                    });
                }
                op.remaining -= 1;
                if op.remaining == 0 {
                    ended.push(slot.tag);
                }
            }
            self.push_pending(&mut ended);
            for t in ended {
                finished.extend(self.finish(t));
            }
            // Deadlines are checked at the first poll after a submission and
            // then every few polls (a clock read is not free); the slots are
            // scanned only once the earliest deadline has passed.
            if self.qp.outstanding() > 0 {
                self.polls_since_check += 1;
                if self.check_due || self.polls_since_check >= 32 {
                    self.polls_since_check = 0;
                    self.check_due = false;
                    if self.next_deadline.is_some_and(|d| Instant::now() >= d) {
                        self.check_timeouts(&mut finished);
                    }
                }
            }
        }
        let count = finished.len();
        for (t, r) in finished {
            done(t, r);
        }
        count
    }
}

impl Drop for NvmeBackend {
    fn drop(&mut self) {
        if !self.ctrl.is_failed() && self.ctrl.generation.load(Ordering::Acquire) == self.generation
        {
            self.ctrl.delete_io_queues(self.qp.qid);
        }
        self.ctrl.free_qid(self.qp.qid);
    }
}
