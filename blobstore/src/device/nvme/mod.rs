//! `NvmeDevice`: a userspace NVMe driver over VFIO, polled, one I/O queue
//! pair per thread and controller, serving every namespace.
//!
//! Layout (all crate-private): `regs` (registers, enable/disable), `cmd`
//! (command and completion encoding, Identify data), `prp` and `sgl` (data
//! pointer planning), `queue` (a queue pair), `shadow` (shadow doorbells),
//! `dma` (IOVA-mapped memory), `vfio` (the VFIO glue), and here the
//! controller (admin commands, asynchronous events, reset) and the
//! per-thread I/O backend.
//!
//! What the driver does with each operation:
//! - Read and Write: with PRPs, split at the transfer limit (MDTS, at most
//!   2 MiB) and wherever the buffers cannot share one PRP list; with SGLs
//!   (when the controller takes them and PRPs cannot describe the op in one
//!   command), split at MDTS only (at most 32 MiB) and every 256 pieces;
//!   memory that is not from the DMA pool is bounced through one pool
//!   buffer (one copy).
//! - Flush: always sent (a no-op for controllers without a volatile cache).
//! - Unmap: Dataset Management with the deallocate attribute when ONCS says
//!   it is supported; otherwise [`Error::Unsupported`].
//! - Write Zeroes: the command when supported; otherwise emulated by writes
//!   from one zeroed pool buffer.
//!
//! The I/O path (SPDK's design): each queue pair has fixed trackers indexed
//! by command id, each with its own PRP list page. A read or write that fits
//! one command goes straight into the ring, its PRPs written into the
//! command and the tracker's page, with no allocation, hashing or lock. The
//! SQ doorbell is written once per batch (at the next reap, whatever was
//! submitted since), the CQ doorbell once per reap, and a reap takes at most
//! `REAP_MAX` completions. With shadow doorbells, a doorbell is a store to
//! the shadow page and an MMIO write only when the controller's EventIdx
//! asks for one.
//!
//! Waiting: the driver polls, but a thread whose only work is to wait for
//! its queue (a BlobFS writer thread behind a multi-MiB write, a RocksDB
//! thread in a sync) need not spin for it. With interrupts on
//! ([`ControllerOptions::interrupts`], the default over VFIO), each I/O
//! completion queue raises an MSI-X vector connected to an eventfd, and
//! the channel's `wait` sleeps on that eventfd once its completion queue
//! is empty; [`crate::exec::block_on`] calls it only after spinning, or at
//! once for a thread whose waits are long. Completions are still found by
//! polling: the interrupt only wakes the thread.
//!
//! Asynchronous event requests stay posted on the admin queue; each event
//! is counted, logged and cleared by reading its log page, and its request
//! posted again, without waiting (see [`NvmeController::async_events`]).
//!
//! Errors, as real controllers produce them:
//! - A completion for a command id that is not outstanding is counted
//!   ([`NvmeController::error_counters`]) and logged; it completes nothing.
//! - A status with DNR clear is retried (the same command, same id) up to
//!   `MAX_RETRIES` times.
//! - A command past its timeout is aborted without waiting for the Abort;
//!   its op is reported as timed out once the command finishes (aborted or
//!   not). If it has not finished one more timeout later, the controller is
//!   reset.
//! - A fatal status (CSTS.CFS) disables the controller (CC.EN = 0, then
//!   CSTS.RDY = 0) before any op is failed.
//!
//! Invariants:
//! - A queue pair belongs to one thread's channels on one controller (one
//!   owner per namespace); the admin queue is shared behind a mutex and only
//!   used for setup, queue creation, Abort, events and logs; the I/O path
//!   only ever try-locks it.
//! - An operation is reported once, and only when the controller no longer
//!   owns any of its commands (they completed, or the controller was
//!   disabled by a reset or after a fatal status): its memory is never
//!   released or reused while the controller may still reach it.
//! - After [`NvmeController::reset`], every command that was in flight is
//!   failed ([`Error::DeviceFailed`], or [`Error::Timeout`] for the one that
//!   timed out) and each thread's queue pair is created again on its next
//!   use.

pub(crate) mod cmd;
pub(crate) mod dma;
pub(crate) mod prp;
pub(crate) mod queue;
pub(crate) mod regs;
pub(crate) mod sgl;
pub(crate) mod shadow;
#[doc(hidden)]
pub mod soft;
pub mod tcp;
#[cfg(test)]
mod tests;
mod vfio;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use self::cmd::{
    cns, event_type, io_op, sgl_type, AsyncEvent, Command, Completion, ControllerIdentity,
    ErrorLogEntry, NamespaceIdentity, SmartLog,
};
use self::dma::DmaPool;
use self::prp::{Transfer, MAX_TRANSFER_BYTES, PAGE};
use self::queue::QueuePair;
use self::regs::{Bar, Capabilities, CSTS, CSTS_CFS};
use self::sgl::{SglTransfer, LIST_DESCRIPTORS, MAX_SGL_TRANSFER_BYTES};
use self::shadow::ShadowDoorbells;
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
/// Admin command ids never taken by commands nobody waits for (Aborts,
/// event requests), so queue creation and resets always find one.
const ADMIN_RESERVED_CIDS: usize = 4;
/// Most Asynchronous Event Requests kept outstanding (AERL + 1 if lower).
const MAX_AERS: usize = 4;

/// What an admin command id is used for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum AdminCid {
    Free,
    /// A caller holds the admin lock and polls for it.
    Waited,
    /// Nobody waits (an Abort, or a command whose wait timed out): freed by
    /// whoever polls the admin queue when it completes.
    Detached,
    /// An Asynchronous Event Request, outstanding until an event.
    Event,
    /// Get Log Page clearing an event, into `AdminState::event_page`.
    EventLog,
}

struct AdminState {
    qp: QueuePair,
    /// One page for Identify and log data.
    page: DmaBuf,
    /// Use of each command id (entries - 1 of them).
    cids: Vec<AdminCid>,
    /// Asynchronous Event Requests to keep outstanding.
    aers_wanted: usize,
    /// Asynchronous Event Requests outstanding.
    aers_posted: usize,
    /// Log pages that events named, not yet read (each read clears its
    /// event, which the controller masks until then).
    logs_to_read: VecDeque<AsyncEvent>,
    /// The event whose log page is being read into `event_page`.
    reading: Option<AsyncEvent>,
    /// Log data for events (nobody waits for it: not `page`).
    event_page: DmaBuf,
}

impl AdminState {
    fn alloc_cid(&mut self, how: AdminCid) -> Option<u16> {
        let cid = self.cids.iter().position(|&c| c == AdminCid::Free)?;
        self.cids[cid] = how;
        Some(cid as u16)
    }

    fn free_cids(&self) -> usize {
        self.cids.iter().filter(|&&c| c == AdminCid::Free).count()
    }

    /// Forgets every command (the controller was disabled).
    fn forget_commands(&mut self) {
        self.cids.fill(AdminCid::Free);
        self.aers_posted = 0;
        self.reading = None;
        self.logs_to_read.clear();
    }
}

/// Controller states (`NvmeController::state`).
mod state {
    /// Enabled and serving I/O.
    pub const LIVE: u8 = 0;
    /// A reset is in progress: channels neither submit nor reap, nor release
    /// any memory of their commands.
    pub const RESETTING: u8 = 1;
    /// Failed and disabled (CSTS.RDY = 0 was seen): the controller no longer
    /// touches memory, so in-flight commands can be failed and their memory
    /// released. A reset brings it back.
    pub const FAILED: u8 = 2;
    /// Failed and it could not be shown disabled: memory of in-flight
    /// commands is never released (their operations are not reported).
    pub const WEDGED: u8 = 3;
}

/// Counters of what went wrong on a controller (error paths only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ErrorCounters {
    /// Completions for a command id that was not outstanding (ignored).
    pub stray_completions: u64,
    /// Commands sent again after a retryable status (DNR clear).
    pub retries: u64,
    /// Abort commands sent for timed-out commands.
    pub aborts: u64,
    /// Controller resets (asked for, or after an abort did not finish).
    pub resets: u64,
    /// Times a fatal status (CSTS.CFS) was seen and the controller disabled.
    pub fatal: u64,
}

/// Asynchronous events the controller reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AsyncEventCounters {
    /// SMART / health events (a critical warning was raised).
    pub smart: u64,
    /// Namespace attribute changed notices.
    pub namespace_changes: u64,
    /// Error status events.
    pub errors: u64,
    /// Any other event.
    pub other: u64,
    /// Critical warning bits of the last SMART log read for an event.
    pub critical_warning: u8,
}

#[derive(Default)]
struct AtomicEventCounters {
    smart: AtomicU64,
    namespace_changes: AtomicU64,
    errors: AtomicU64,
    other: AtomicU64,
    critical_warning: AtomicU8,
}

#[derive(Default)]
struct AtomicCounters {
    stray_completions: AtomicU64,
    retries: AtomicU64,
    aborts: AtomicU64,
    resets: AtomicU64,
    fatal: AtomicU64,
}

/// Environment variable that turns shadow doorbells off for controllers
/// attached afterwards (`0`, `off` or `no`); see [`ControllerOptions`].
pub const SHADOW_DOORBELLS_ENV: &str = "BLOBSTACK_NVME_SHADOW_DOORBELLS";

/// Environment variable that turns completion interrupts off for
/// controllers attached afterwards (`0`, `off` or `no`): every wait then
/// polls; see [`ControllerOptions::interrupts`].
pub const INTERRUPTS_ENV: &str = "BLOBSTACK_NVME_INTERRUPTS";

/// The longest a waiting thread sleeps on its queue's interrupt before it
/// polls again (timeouts and controller checks run from polls).
const IRQ_WAIT_SLICE_MS: i32 = 10;

/// Choices made when a controller is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControllerOptions {
    /// Use shadow doorbells (Doorbell Buffer Config) when the controller
    /// offers them (OACS bit 8). On by default; off lets `bdevperf` compare.
    pub shadow_doorbells: bool,
    /// Describe data with SGLs when the controller takes them (SGLS);
    /// else, and when off, with PRPs. On by default.
    pub sgl: bool,
    /// Completion interrupts (MSI-X through VFIO) that a thread waiting
    /// for its queue sleeps on instead of spinning. On by default; the
    /// software controller has none.
    pub interrupts: bool,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            shadow_doorbells: true,
            sgl: true,
            interrupts: true,
        }
    }
}

impl ControllerOptions {
    /// The defaults, with [`SHADOW_DOORBELLS_ENV`] and [`INTERRUPTS_ENV`]
    /// applied.
    pub fn from_env() -> ControllerOptions {
        let off = |var: &str| {
            std::env::var(var).is_ok_and(|v| matches!(v.trim(), "0" | "off" | "no" | "false"))
        };
        ControllerOptions {
            shadow_doorbells: !off(SHADOW_DOORBELLS_ENV),
            interrupts: !off(INTERRUPTS_ENV),
            ..ControllerOptions::default()
        }
    }
}

/// One NVMe controller, shared by its namespaces' devices.
pub struct NvmeController {
    name: String,
    bar: Arc<dyn Bar>,
    pool: Arc<DmaPool>,
    cap: Capabilities,
    identity: ControllerIdentity,
    max_transfer_bytes: u64,
    /// Data goes in SGLs (else PRPs).
    sgl: bool,
    io_queue_pairs: u16,
    /// Shadow doorbell pages, when the controller took them.
    shadow: Option<Arc<ShadowDoorbells>>,
    admin: Mutex<AdminState>,
    qids: Mutex<Vec<bool>>,
    generation: AtomicU64,
    /// One of [`state`]'s values.
    state: AtomicU8,
    io_timeout_us: AtomicU64,
    counters: AtomicCounters,
    events: AtomicEventCounters,
    /// One eventfd per connected MSI-X vector (vector 0: admin); empty
    /// without interrupts.
    irqs: Vec<vmm_sys_util::eventfd::EventFd>,
    /// Sleeps of waiting threads on their queue's interrupt.
    irq_sleeps: AtomicU64,
    /// Waiting threads sleep on the interrupt (else they poll).
    irq_waits: std::sync::atomic::AtomicBool,
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
    /// first use and shared afterwards, with [`ControllerOptions::from_env`].
    pub fn open(pci: &str) -> Result<Arc<NvmeController>> {
        NvmeController::open_with(pci, ControllerOptions::from_env())
    }

    /// As [`NvmeController::open`] with `opts`, which only matter when this
    /// call attaches the controller (a controller stays attached for the
    /// life of the process).
    pub fn open_with(pci: &str, opts: ControllerOptions) -> Result<Arc<NvmeController>> {
        let mut all = CONTROLLERS.lock();
        if let Some((_, c)) = all.iter().find(|(p, _)| p == pci) {
            return Ok(c.clone());
        }
        let v = vfio::open(pci)?;
        let (bar, pool) = (v.bar.clone(), v.pool.clone());
        let ctrl = Arc::new(NvmeController::start(pci.into(), bar, pool, Some(v), opts)?);
        all.push((pci.into(), ctrl.clone()));
        Ok(ctrl)
    }

    /// Brings up the controller behind `bar`: disable, admin queue, enable,
    /// Identify, number of queues, shadow doorbells.
    fn start(
        name: String,
        bar: Arc<dyn Bar>,
        pool: Arc<DmaPool>,
        vfio: Option<vfio::VfioPci>,
        opts: ControllerOptions,
    ) -> Result<NvmeController> {
        let cap = Capabilities::decode(bar.read64(regs::CAP));
        if !cap.nvm_command_set || cap.min_page_size > PAGE as usize {
            return Err(Error::Unsupported(format!(
                "{name}: controller without the NVM command set or 4 KiB pages ({cap:?})"
            )));
        }
        let admin_entries = ADMIN_ENTRIES.min(cap.max_queue_entries);
        let qp = QueuePair::new(&pool, &cap, 0, admin_entries, None)?;
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
        let event_page = pool.alloc(PAGE as usize)?;
        let mut ctrl = NvmeController {
            name,
            bar,
            pool,
            cap,
            identity: ControllerIdentity::parse(&[0u8; 4096])?,
            max_transfer_bytes: 0,
            sgl: false,
            io_queue_pairs: 0,
            shadow: None,
            admin: Mutex::new(AdminState {
                qp,
                page,
                cids: vec![AdminCid::Free; admin_entries as usize - 1],
                aers_wanted: 0,
                aers_posted: 0,
                logs_to_read: VecDeque::new(),
                reading: None,
                event_page,
            }),
            qids: Mutex::new(Vec::new()),
            generation: AtomicU64::new(0),
            state: AtomicU8::new(state::LIVE),
            io_timeout_us: AtomicU64::new(DEFAULT_IO_TIMEOUT.as_micros() as u64),
            counters: AtomicCounters::default(),
            events: AtomicEventCounters::default(),
            irqs: Vec::new(),
            irq_sleeps: AtomicU64::new(0),
            irq_waits: std::sync::atomic::AtomicBool::new(true),
            _vfio: vfio,
        };
        let page = ctrl.identify(cns::CONTROLLER, 0)?;
        ctrl.identity = ControllerIdentity::parse(&page)?;
        // One PRP list page describes at most 2 MiB; SGLs only MDTS limits.
        ctrl.sgl = opts.sgl && ctrl.identity.supports_sgl();
        let most = if ctrl.sgl {
            MAX_SGL_TRANSFER_BYTES
        } else {
            MAX_TRANSFER_BYTES
        };
        ctrl.max_transfer_bytes = ctrl
            .identity
            .max_transfer_bytes(cap.min_page_size)
            .map_or(most, |m| (m as u64).min(most));
        ctrl.io_queue_pairs = ctrl.set_num_queues()?;
        *ctrl.qids.lock() = vec![false; ctrl.io_queue_pairs as usize + 1];
        if let (true, Some(v)) = (opts.interrupts, &ctrl._vfio) {
            match v.enable_msix(ctrl.io_queue_pairs as u32 + 1) {
                Ok(fds) => ctrl.irqs = fds,
                Err(e) => eprintln!(
                    "nvme {}: no completion interrupts ({e}): waits poll",
                    ctrl.name
                ),
            }
        }
        if opts.shadow_doorbells && ctrl.identity.supports_doorbell_buffer() {
            let pages = ShadowDoorbells::new(&ctrl.pool, &cap, ctrl.io_queue_pairs)?;
            let cmd = Command::doorbell_buffer_config(pages.shadow_iova(), pages.event_idx_iova());
            match ctrl.admin_cmd(cmd, "doorbell buffer config") {
                Ok(_) => ctrl.shadow = Some(Arc::new(pages)),
                Err(e) => eprintln!(
                    "nvme {}: Doorbell Buffer Config failed ({e}): MMIO doorbells only",
                    ctrl.name
                ),
            }
        }
        {
            let mut st = ctrl.admin.lock();
            st.aers_wanted = (ctrl.identity.aerl as usize + 1).min(MAX_AERS);
            ctrl.enable_async_events(&mut st);
        }
        Ok(ctrl)
    }

    /// Asks for SMART critical warning and namespace attribute events and
    /// posts the event requests (at bring-up and after a reset).
    fn enable_async_events(&self, st: &mut AdminState) {
        let cmd = Command::set_async_event_config(cmd::ASYNC_EVENTS_WANTED);
        if let Err(e) = self.admin_locked(st, cmd, "set features (async events)") {
            eprintln!(
                "nvme {}: asynchronous event configuration refused ({e}): only the controller's \
                 default events are reported",
                self.name
            );
        }
        self.service_events(st);
    }

    /// Events reported so far (each also logged).
    pub fn async_events(&self) -> AsyncEventCounters {
        let e = &self.events;
        AsyncEventCounters {
            smart: e.smart.load(Ordering::Relaxed),
            namespace_changes: e.namespace_changes.load(Ordering::Relaxed),
            errors: e.errors.load(Ordering::Relaxed),
            other: e.other.load(Ordering::Relaxed),
            critical_warning: e.critical_warning.load(Ordering::Relaxed),
        }
    }

    /// Takes the admin queue's completions now: events are counted, their
    /// log pages read and their requests posted again. I/O threads do this
    /// on their own every timeout tick while they have commands
    /// outstanding; a caller with no I/O may call it now and then.
    pub fn poll_events(&self) {
        self.drain_admin(&mut self.admin.lock());
    }

    /// Takes the admin queue's completions (a live controller only), then
    /// does what events need.
    fn drain_admin(&self, st: &mut AdminState) {
        if self.state.load(Ordering::Acquire) != state::LIVE {
            return;
        }
        while let Some(c) = st.qp.next_completion() {
            self.admin_completion(st, &c, None);
        }
        st.qp.release_completions(&*self.bar);
        self.service_events(st);
    }

    /// Sends what events need without waiting: the next event log page
    /// read, and event requests up to `aers_wanted`, leaving
    /// `ADMIN_RESERVED_CIDS` ids free.
    fn service_events(&self, st: &mut AdminState) {
        if self.state.load(Ordering::Acquire) != state::LIVE {
            return;
        }
        if st.reading.is_none() && st.free_cids() > ADMIN_RESERVED_CIDS {
            if let Some(ev) = st.logs_to_read.pop_front() {
                let iova = st.event_page.iova().expect("pool memory");
                let cmd = Command::get_log_page(ev.log_page, ev.log_bytes(), iova);
                let cid = st.alloc_cid(AdminCid::EventLog).expect("a free id");
                if st.qp.push(&cmd, cid) {
                    st.reading = Some(ev);
                } else {
                    st.cids[cid as usize] = AdminCid::Free;
                    st.logs_to_read.push_front(ev);
                }
            }
        }
        while st.aers_posted < st.aers_wanted && st.free_cids() > ADMIN_RESERVED_CIDS {
            let cid = st.alloc_cid(AdminCid::Event).expect("a free id");
            if !st.qp.push(&Command::async_event_request(), cid) {
                st.cids[cid as usize] = AdminCid::Free;
                break;
            }
            st.aers_posted += 1;
        }
        st.qp.ring(&*self.bar);
    }

    /// An event request completed: counts and logs the event and queues
    /// the read of the log page it names.
    fn async_event(&self, st: &mut AdminState, c: &Completion) {
        st.aers_posted -= 1;
        if let Err(status) = c.status() {
            // Aborted, or more requests than the controller takes: keep
            // one fewer outstanding so a refusing controller is not asked
            // again and again.
            st.aers_wanted = st.aers_wanted.saturating_sub(1);
            eprintln!(
                "nvme {}: asynchronous event request failed ({status:?}); keeping {} posted",
                self.name, st.aers_wanted
            );
            return;
        }
        let ev = AsyncEvent::decode(c.dw0);
        let e = &self.events;
        let what = match (ev.kind, ev.info) {
            (event_type::SMART, _) => {
                e.smart.fetch_add(1, Ordering::Relaxed);
                "SMART/health warning"
            }
            (event_type::NOTICE, 0) => {
                e.namespace_changes.fetch_add(1, Ordering::Relaxed);
                "namespace attribute changed"
            }
            (event_type::ERROR, _) => {
                e.errors.fetch_add(1, Ordering::Relaxed);
                "error status"
            }
            _ => {
                e.other.fetch_add(1, Ordering::Relaxed);
                "event"
            }
        };
        eprintln!(
            "nvme {}: asynchronous {what} (type {}, info {:#x}, log page {:#x})",
            self.name, ev.kind, ev.info, ev.log_page
        );
        if ev.log_page != 0 {
            st.logs_to_read.push_back(ev);
        }
    }

    /// The log page read for an event completed: the event is cleared.
    fn event_log_read(&self, st: &mut AdminState, c: &Completion) {
        let Some(ev) = st.reading.take() else { return };
        if let Err(status) = c.status() {
            eprintln!(
                "nvme {}: reading log page {:#x} for an event failed ({status:?})",
                self.name, ev.log_page
            );
            return;
        }
        if ev.log_page == cmd::LOG_SMART {
            let page = read_page(&st.event_page, 512);
            if let Ok(smart) = SmartLog::parse(&page) {
                self.events
                    .critical_warning
                    .store(smart.critical_warning, Ordering::Relaxed);
                eprintln!(
                    "nvme {}: SMART critical warning {:#04x}, {} K, spare {}%",
                    self.name,
                    smart.critical_warning,
                    smart.temperature_kelvin,
                    smart.available_spare_pct
                );
            }
        }
    }

    /// True when data is described with SGLs (the controller takes them
    /// and [`ControllerOptions::sgl`] was on), else with PRPs.
    pub fn uses_sgl(&self) -> bool {
        self.sgl
    }

    /// True when I/O queues use shadow doorbells (the controller offers
    /// them and [`ControllerOptions::shadow_doorbells`] was on).
    pub fn shadow_doorbells(&self) -> bool {
        self.shadow.is_some()
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

    /// Sets the per-command I/O timeout (every command outstanding from now
    /// on). A command past it is aborted; if it has not finished one more
    /// timeout later, the controller is reset.
    pub fn set_io_timeout(&self, t: Duration) {
        self.io_timeout_us
            .store(t.as_micros() as u64, Ordering::Relaxed);
    }

    /// True once the controller reported a fatal status or a reset failed
    /// (until a reset succeeds).
    pub fn is_failed(&self) -> bool {
        matches!(
            self.state.load(Ordering::Acquire),
            state::FAILED | state::WEDGED
        )
    }

    /// What went wrong so far.
    pub fn error_counters(&self) -> ErrorCounters {
        let c = &self.counters;
        ErrorCounters {
            stray_completions: c.stray_completions.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            aborts: c.aborts.load(Ordering::Relaxed),
            resets: c.resets.load(Ordering::Relaxed),
            fatal: c.fatal.load(Ordering::Relaxed),
        }
    }

    fn failed_error(&self, reason: &str) -> Error {
        Error::DeviceFailed {
            device: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// Counts and reports a completion for a command id of queue `qid` that
    /// is not outstanding. It completes nothing.
    fn stray_completion(&self, qid: u16, c: &Completion) {
        let n = self
            .counters
            .stray_completions
            .fetch_add(1, Ordering::Relaxed);
        if n < 16 {
            eprintln!(
                "nvme {}: ignored a completion for command id {} on queue {qid} (sq {}), which                  is not outstanding",
                self.name, c.cid, c.sq_id
            );
        }
    }

    /// Reads CSTS: true on a fatal status (or registers reading all ones).
    fn fatal_status(&self) -> bool {
        let csts = self.bar.read32(CSTS);
        csts == u32::MAX || csts & CSTS_CFS != 0
    }

    /// After a fatal status: disables the controller (CC.EN = 0, then waits
    /// for CSTS.RDY = 0) so it stops touching memory, and only then marks it
    /// failed, which lets every channel fail its commands and release their
    /// memory. If the controller does not become not-ready, it is marked
    /// wedged and that memory is never released.
    fn disable_after_fatal(&self) {
        let mut st = self.admin.lock();
        if self.state.load(Ordering::Acquire) != state::LIVE {
            return; // another thread got here first, or a reset runs
        }
        self.state.store(state::RESETTING, Ordering::Release);
        self.counters.fatal.fetch_add(1, Ordering::Relaxed);
        eprintln!(
            "nvme {}: controller fatal status: disabling it; in-flight commands fail",
            self.name
        );
        let disabled = regs::disable(&*self.bar, &self.cap, &self.name);
        st.qp.reset();
        st.forget_commands();
        let next = match disabled {
            Ok(()) => state::FAILED,
            Err(e) => {
                eprintln!(
                    "nvme {}: the controller did not stop after its fatal status ({e}): memory                      of its in-flight commands is kept",
                    self.name
                );
                state::WEDGED
            }
        };
        self.state.store(next, Ordering::Release);
    }

    fn admin_cmd(&self, cmd: Command, what: &str) -> Result<Completion> {
        let mut st = self.admin.lock();
        self.admin_locked(&mut st, cmd, what)
    }

    /// Takes one admin completion: true when it is for `waited`; frees
    /// detached ids; counts strays.
    fn admin_completion(&self, st: &mut AdminState, c: &Completion, waited: Option<u16>) -> bool {
        match st.cids.get(c.cid as usize) {
            Some(AdminCid::Waited) if Some(c.cid) == waited => {
                st.cids[c.cid as usize] = AdminCid::Free;
                true
            }
            Some(AdminCid::Detached) => {
                st.cids[c.cid as usize] = AdminCid::Free;
                false
            }
            Some(AdminCid::Event) => {
                st.cids[c.cid as usize] = AdminCid::Free;
                self.async_event(st, c);
                false
            }
            Some(AdminCid::EventLog) => {
                st.cids[c.cid as usize] = AdminCid::Free;
                self.event_log_read(st, c);
                false
            }
            _ => {
                self.stray_completion(0, c);
                false
            }
        }
    }

    fn admin_locked(&self, st: &mut AdminState, cmd: Command, what: &str) -> Result<Completion> {
        let busy = || Error::Busy(format!("{}: admin queue full", self.name));
        if !st.cids.contains(&AdminCid::Free) {
            // Detached commands (Aborts) may have finished unseen.
            while let Some(c) = st.qp.next_completion() {
                self.admin_completion(st, &c, None);
            }
            st.qp.release_completions(&*self.bar);
        }
        let cid = st.alloc_cid(AdminCid::Waited).ok_or_else(busy)?;
        if !st.qp.push(&cmd, cid) {
            st.cids[cid as usize] = AdminCid::Free;
            return Err(busy());
        }
        st.qp.ring(&*self.bar);
        let start = Instant::now();
        loop {
            let mut got = None;
            while let Some(c) = st.qp.next_completion() {
                if self.admin_completion(st, &c, Some(cid)) {
                    got = Some(c);
                }
            }
            st.qp.release_completions(&*self.bar);
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
                // A late completion frees the id.
                st.cids[cid as usize] = AdminCid::Detached;
                if self.fatal_status() {
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

    /// Sends an admin command nobody waits for, if the admin queue is free
    /// now (never blocks the caller): true when it was sent.
    fn admin_detached(&self, cmd: Command) -> bool {
        let Some(mut st) = self.admin.try_lock() else {
            return false;
        };
        if self.state.load(Ordering::Acquire) != state::LIVE {
            return false;
        }
        // Free the ids of earlier detached commands that finished; keep
        // some ids for commands that are waited for.
        while let Some(c) = st.qp.next_completion() {
            self.admin_completion(&mut st, &c, None);
        }
        st.qp.release_completions(&*self.bar);
        self.service_events(&mut st);
        if st.free_cids() <= ADMIN_RESERVED_CIDS {
            return false;
        }
        let Some(cid) = st.alloc_cid(AdminCid::Detached) else {
            return false;
        };
        if !st.qp.push(&cmd, cid) {
            st.cids[cid as usize] = AdminCid::Free;
            return false;
        }
        st.qp.ring(&*self.bar);
        true
    }

    /// Consumes admin completions if the admin queue is free now (frees the
    /// ids of detached commands).
    fn poll_admin(&self) {
        if let Some(mut st) = self.admin.try_lock() {
            self.drain_admin(&mut st);
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

    /// Asks the controller to abort command `cid` of queue `sqid` and waits
    /// for its answer; true when it says it did (Completion dword 0 bit 0
    /// clear). The I/O path does not use this: it sends Aborts without
    /// waiting.
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
        let was = self.state.swap(state::RESETTING, Ordering::AcqRel);
        self.counters.resets.fetch_add(1, Ordering::Relaxed);
        let res = self.reset_locked(&mut st, was);
        match &res {
            Ok(()) => {
                self.state.store(state::LIVE, Ordering::Release);
                // Event requests go only to a live controller.
                self.service_events(&mut st);
            }
            Err(_) => {
                // Disabled unless the disable itself failed.
                let disabled = self.bar.read32(CSTS) & regs::CSTS_RDY == 0;
                let next = if disabled || was == state::FAILED {
                    state::FAILED
                } else {
                    state::WEDGED
                };
                self.state.store(next, Ordering::Release);
            }
        }
        res
    }

    fn reset_locked(&self, st: &mut AdminState, was: u8) -> Result<()> {
        if was == state::LIVE {
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
        regs::disable(&*self.bar, &self.cap, &self.name)?;
        st.qp.reset();
        st.forget_commands();
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
        if let Some(pages) = &self.shadow {
            // A reset forgets the pages; every I/O queue is created again
            // afterwards, its entries cleared first.
            let cmd = Command::doorbell_buffer_config(pages.shadow_iova(), pages.event_idx_iova());
            self.admin_locked(st, cmd, "doorbell buffer config")?;
        }
        self.enable_async_events(st);
        self.generation.fetch_add(1, Ordering::AcqRel);
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

    /// The MSI-X vector of I/O queue `qid`'s completions: its own while
    /// there are vectors enough, else shared (a shared vector only wakes a
    /// waiter for nothing now and then); `None` without interrupts.
    fn irq_vector(&self, qid: u16) -> Option<u16> {
        match self.irqs.len() {
            0 => None,
            1 => Some(0),
            n => Some(1 + (qid - 1) % (n as u16 - 1)),
        }
    }

    /// How many times a thread waiting for its queue slept on the queue's
    /// completion interrupt (0 without interrupts).
    pub fn interrupt_sleeps(&self) -> u64 {
        self.irq_sleeps.load(Ordering::Relaxed)
    }

    /// True when I/O completions raise interrupts that waiting threads
    /// sleep on (see [`ControllerOptions::interrupts`]).
    pub fn interrupts(&self) -> bool {
        !self.irqs.is_empty() && self.irq_waits.load(Ordering::Relaxed)
    }

    /// Lets waiting threads sleep on the completion interrupts (`true`, as
    /// at attach) or makes them poll (`false`) from their next wait on;
    /// the interrupts themselves stay enabled. Does nothing on a
    /// controller without interrupts.
    pub fn set_interrupt_waits(&self, on: bool) {
        self.irq_waits.store(on, Ordering::Relaxed);
    }

    /// Creates the controller side of `qp` (completion queue, then
    /// submission queue).
    fn create_io_queues(&self, qp: &QueuePair) -> Result<()> {
        let (qid, n) = (qp.qid, qp.entries());
        let cq = Command::create_cq(qid, n, qp.cq_iova(), self.irq_vector(qid));
        self.admin_cmd(cq, "create I/O CQ")?;
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
        DOORBELL_BUFFER_CONFIG => "doorbell buffer config",
        ASYNC_EVENT_REQUEST => "asynchronous event request",
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
    /// (an unknown namespace, an LBA past the end). For tests only.
    #[doc(hidden)]
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
        Ok(Box::new(NamespaceBackend::new(self)?))
    }
    fn alloc_buf(&self, len_bytes: usize) -> Result<DmaBuf> {
        self.ctrl.pool.alloc(len_bytes)
    }
    fn alloc_buf_for_overwrite(&self, len_bytes: usize) -> Result<DmaBuf> {
        self.ctrl.pool.alloc_for_overwrite(len_bytes)
    }
    /// For a namespace opened through [`NvmeDevice::open`] (which holds it
    /// for this process alone): a file named by the controller's PCI
    /// address and the namespace, on hugetlbfs when the system has
    /// hugepages reserved and mounted (see [`super::huge_unsynced_dir`]),
    /// else on tmpfs. Its owner maps it for DMA with
    /// [`BlockDevice::map_dma`], so appends go to the device from where
    /// they landed.
    fn unsynced_memory(&self) -> Option<std::path::PathBuf> {
        self._claim.as_ref()?;
        let dir = super::huge_unsynced_dir().unwrap_or_else(super::unsynced_dir);
        Some(dir.join(format!(
            "blobstack-nvme-{}-ns{}.unsynced",
            self.ctrl.name, self.nsid
        )))
    }
    /// Maps the memory in the controller's IOVA space (VFIO DMA map; on
    /// the software controller, its translation table).
    unsafe fn map_dma(
        &self,
        ptr: std::ptr::NonNull<u8>,
        len: usize,
    ) -> Result<Option<crate::device::DmaMapping>> {
        // SAFETY: the caller's promise is map_external's.
        unsafe { self.ctrl.pool.map_external(ptr, len) }.map(Some)
    }
}

/// Most completions one reap takes (the rest wait for the next reap).
const REAP_MAX: usize = 64;
/// Times a command that failed with a retryable status (DNR clear) is sent
/// again before its error is reported.
const MAX_RETRIES: u8 = 3;
/// Reaps between clock reads while commands are outstanding.
const REAPS_PER_CLOCK: u32 = 32;
/// Timeouts are counted in ticks of `io_timeout / TICKS_PER_TIMEOUT`.
const TICKS_PER_TIMEOUT: u64 = 8;
/// No tracker (end of the free list).
const NO_TRACKER: u16 = u16::MAX;

/// What a command carries besides its dwords.
enum CmdData {
    None,
    Prp(Transfer),
    Sgl(SglTransfer),
    /// One deallocate range, written into the command's page.
    Range {
        lba: u64,
        blocks: u32,
    },
}

/// A command of a multi-command (or bounced, or backlogged) operation not
/// yet in the ring.
struct PendingCmd {
    owner: u16,
    tag: Tag,
    cmd: Command,
    data: CmdData,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TrackerState {
    Free,
    /// The controller owns the command.
    Active,
    /// Timed out; an Abort was sent for it.
    Aborting,
}

/// One command id of the queue pair: the command the controller holds
/// under it, and (implicitly, page `cid` of `pages`) its PRP list page.
#[derive(Clone, Copy)]
struct Tracker {
    state: TrackerState,
    /// The namespace channel ([`Owner`]) the command's operation is of.
    owner: u16,
    /// The operation (channel tag) the command belongs to.
    tag: Tag,
    /// Times the command was sent again after a retryable status.
    retries: u8,
    /// Tick of the submission (or of the Abort).
    tick: u64,
    /// The command as sent, for retries.
    cmd: Command,
    /// Next free tracker when this one is free.
    next_free: u16,
}

/// What the backend keeps of a channel operation until it reports it.
struct OpState {
    live: bool,
    kind: IoKind,
    lba: u64,
    blocks: u64,
    /// Commands not yet completed (pending or outstanding).
    remaining: u32,
    error: Option<Error>,
    /// A command of the op timed out (reported as a timeout).
    timed_out: bool,
    /// The pool buffer standing in for memory that is not DMA-able.
    bounce: Option<DmaBuf>,
    /// Where a bounced read is copied back to.
    segs: Vec<Segment>,
}

impl OpState {
    fn idle() -> OpState {
        OpState {
            live: false,
            kind: IoKind::Flush,
            lba: 0,
            blocks: 0,
            remaining: 0,
            error: None,
            timed_out: false,
            bounce: None,
            segs: Vec::new(),
        }
    }
}

/// One namespace channel served by a thread's queue pair.
struct Owner {
    /// A [`NamespaceBackend`] uses this slot.
    live: bool,
    nsid: u32,
    block_size: u64,
    /// Indexed by the channel's tag.
    ops: Vec<OpState>,
    /// Its ops finished while it was not the one reaping (or failed
    /// outside a reap), reported by its next reap.
    ready: Vec<(Tag, Result<()>)>,
}

/// A thread's I/O queue pair on one controller, serving the thread's
/// channels of every namespace of it (each a [`NamespaceBackend`], an
/// [`Owner`] here).
///
/// Invariants:
/// - A tracker is `Free` exactly when it is on the free list; `active`
///   counts the others, and the controller may hold a command only under
///   an `Active` or `Aborting` tracker.
/// - An op is reported once, and only when none of its commands is owned
///   by the controller any more: all completed, or the controller was
///   disabled (fatal status, reset). Only then may its memory (held by the
///   channel, or the bounce buffer held here) be released or reused.
/// - The steady-state path (one command per op, DMA-able memory) allocates
///   nothing, hashes nothing and takes no lock: the command and its PRPs
///   go straight into the ring and the tracker's page, and completions are
///   handed to the channel as they are read.
/// - A completion goes to the channel that reaps when its op is that
///   channel's (`cur`), else to its owner's `ready` list: every op is
///   reported once, by its own channel.
struct NvmeBackend {
    ctrl: Arc<NvmeController>,
    /// The owner on whose behalf `submit` or `reap` runs now.
    cur: u16,
    owners: Vec<Owner>,
    /// Entries in all owners' `ready` lists (so a reap looks at its list
    /// only when there is something).
    ready_count: usize,
    max_transfer_bytes: u64,
    /// Largest PRP command (one list page).
    prp_max_bytes: u64,
    /// Data in SGLs when PRPs cannot describe it in one command.
    sgl: bool,
    /// SGL data blocks must be dword aligned.
    sgl_dword: bool,
    dsm: bool,
    write_zeroes: bool,
    qp: QueuePair,
    generation: u64,
    /// One page per command id: its PRP list or its deallocate range.
    pages: DmaBuf,
    pages_iova: u64,
    trackers: Box<[Tracker]>,
    free_head: u16,
    /// Trackers not free.
    active: usize,
    /// Trackers aborting.
    aborting: usize,
    /// Commands waiting for a tracker or ring slot, in order.
    pending: VecDeque<PendingCmd>,
    zeroes: Option<DmaBuf>,
    reaps_since_clock: u32,
    /// Timeout ticks seen (see `check_clock`).
    tick: u64,
    tick_started: Option<Instant>,
    /// The eventfd of this queue's completion interrupt (the controller's,
    /// which the `ctrl` Arc keeps open), if it has one.
    irq_fd: Option<std::os::fd::RawFd>,
}

impl NvmeBackend {
    fn new(ctrl: Arc<NvmeController>) -> Result<NvmeBackend> {
        if ctrl.state.load(Ordering::Acquire) != state::LIVE {
            return Err(ctrl.failed_error("controller failed or resetting; reset it first"));
        }
        let entries = IO_ENTRIES.min(ctrl.cap.max_queue_entries);
        let qid = ctrl.alloc_qid()?;
        let made = QueuePair::new(&ctrl.pool, &ctrl.cap, qid, entries, ctrl.shadow.as_ref())
            .and_then(|qp| {
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
        // As many trackers as the ring can hold commands.
        let n = (entries - 1) as u16;
        let trackers = (0..n)
            .map(|i| Tracker {
                state: TrackerState::Free,
                owner: 0,
                tag: 0,
                retries: 0,
                tick: 0,
                cmd: Command::default(),
                next_free: if i + 1 < n { i + 1 } else { NO_TRACKER },
            })
            .collect();
        Ok(NvmeBackend {
            cur: 0,
            owners: Vec::new(),
            ready_count: 0,
            max_transfer_bytes: ctrl.max_transfer_bytes,
            prp_max_bytes: ctrl.max_transfer_bytes.min(MAX_TRANSFER_BYTES),
            sgl: ctrl.sgl,
            sgl_dword: ctrl.identity.sgl_needs_dword_alignment(),
            dsm: ctrl.identity.supports_dsm(),
            write_zeroes: ctrl.identity.supports_write_zeroes(),
            qp,
            generation,
            pages_iova: pages.iova().expect("pool memory").0,
            pages,
            trackers,
            free_head: 0,
            active: 0,
            aborting: 0,
            pending: VecDeque::new(),
            zeroes: None,
            reaps_since_clock: 0,
            tick: 0,
            tick_started: None,
            irq_fd: ctrl
                .irq_vector(qid)
                .map(|v| std::os::fd::AsRawFd::as_raw_fd(&ctrl.irqs[v as usize])),
            ctrl,
        })
    }

    fn page_iova(&self, cid: u16) -> u64 {
        self.pages_iova + cid as u64 * PAGE
    }

    fn write_page_u64(&self, cid: u16, index: usize, val: u64) {
        debug_assert!(index < (PAGE / 8) as usize);
        let base = self.pages.as_mut_ptr().cast::<u64>();
        // SAFETY: page `cid` of the per-command pages, entry `index` < 512;
        // the controller reads it only after the doorbell for this command.
        unsafe { std::ptr::write_volatile(base.add(cid as usize * 512 + index), val.to_le()) };
    }

    /// A slot for namespace `nsid` (`block_size` bytes per block); its
    /// index names it in trackers and pending commands.
    fn add_owner(&mut self, nsid: u32, block_size: u64) -> u16 {
        let o = Owner {
            live: true,
            nsid,
            block_size,
            ops: Vec::new(),
            ready: Vec::new(),
        };
        match self.owners.iter().position(|o| !o.live) {
            Some(i) => {
                self.owners[i] = o;
                i as u16
            }
            None => {
                self.owners.push(o);
                (self.owners.len() - 1) as u16
            }
        }
    }

    /// True while an op of `owner` has not been reported.
    fn owner_busy(&self, owner: u16) -> bool {
        let o = &self.owners[owner as usize];
        o.ops.iter().any(|op| op.live) || !o.ready.is_empty()
    }

    /// Block size of the current owner's namespace.
    #[inline]
    fn block_size(&self) -> u64 {
        self.owners[self.cur as usize].block_size
    }

    fn op_slot(&mut self, tag: Tag) -> &mut OpState {
        let ops = &mut self.owners[self.cur as usize].ops;
        let i = tag as usize;
        if i >= ops.len() {
            ops.resize_with(i + 1, OpState::idle);
        }
        &mut ops[i]
    }

    /// Takes a free tracker for `cmd` of op `tag` and puts the command in
    /// the ring (the doorbell is rung by the next reap). The caller checked
    /// that a tracker is free and the ring has room.
    fn start_command(&mut self, cid: u16, owner: u16, tag: Tag, cmd: Command) {
        debug_assert_eq!(cid, self.free_head);
        let t = &mut self.trackers[cid as usize];
        debug_assert_eq!(t.state, TrackerState::Free);
        self.free_head = t.next_free;
        *t = Tracker {
            state: TrackerState::Active,
            owner,
            tag,
            retries: 0,
            tick: self.tick,
            cmd,
            next_free: NO_TRACKER,
        };
        self.active += 1;
        let pushed = self.qp.push(&cmd, cid);
        debug_assert!(pushed, "caller checked the ring");
    }

    fn free_tracker(&mut self, cid: u16) {
        let t = &mut self.trackers[cid as usize];
        debug_assert_ne!(t.state, TrackerState::Free);
        if t.state == TrackerState::Aborting {
            self.aborting -= 1;
        }
        t.state = TrackerState::Free;
        t.next_free = self.free_head;
        self.free_head = cid;
        self.active -= 1;
    }

    /// Writes the PRPs of `segs` (whole blocks of `bs` bytes) for command
    /// `cid` (its list into the tracker's page) when they fit one command;
    /// returns (PRP1, PRP2, bytes), or `None` when the op needs the general
    /// planner.
    #[inline]
    fn direct_prps(&self, cid: u16, segs: &[Segment], bs: u64) -> Option<(u64, u64, u64)> {
        let (mut n, mut prp1, mut second, mut total, mut last_end) = (0usize, 0, 0, 0u64, 0);
        for s in segs {
            let start = s.iova()?.0;
            let len = s.len() as u64;
            let joins = if n == 0 {
                start % 4 == 0
            } else {
                last_end % PAGE == 0 && start % PAGE == 0
            };
            total += len;
            if !joins || total > self.max_transfer_bytes {
                return None;
            }
            let end = start + len;
            let mut addr = start;
            while addr < end {
                match n {
                    0 => prp1 = addr,
                    _ if n > prp::LIST_ENTRIES => return None,
                    _ => {
                        if n == 1 {
                            second = addr;
                        }
                        self.write_page_u64(cid, n - 1, addr);
                    }
                }
                n += 1;
                addr = (addr / PAGE + 1) * PAGE;
            }
            last_end = end;
        }
        if n == 0 || !total.is_multiple_of(bs) {
            return None;
        }
        let prp2 = match n {
            1 => 0,
            2 => second,
            _ => self.page_iova(cid),
        };
        Some((prp1, prp2, total))
    }

    /// Writes the SGL of `segs` (whole blocks of `bs` bytes) for command
    /// `cid` (its descriptors into the tracker's page when there are
    /// several) when they fit one command; returns the command's descriptor
    /// (address, length, type) and the bytes, or `None` when the op needs
    /// the general planner.
    fn direct_sgl(&self, cid: u16, segs: &[Segment], bs: u64) -> Option<(u64, u32, u8, u64)> {
        if segs.is_empty() || segs.len() > LIST_DESCRIPTORS {
            return None;
        }
        let mut total = 0u64;
        for (i, s) in segs.iter().enumerate() {
            let (addr, len) = (s.iova()?.0, s.len() as u64);
            if len == 0 || len > self.max_transfer_bytes {
                return None;
            }
            if self.sgl_dword && !(addr.is_multiple_of(4) && len.is_multiple_of(4)) {
                return None;
            }
            total += len;
            if segs.len() > 1 {
                self.write_page_u64(cid, 2 * i, addr);
                let high = cmd::sgl_descriptor_high(len as u32, sgl_type::DATA_BLOCK);
                self.write_page_u64(cid, 2 * i + 1, high);
            }
        }
        if total > self.max_transfer_bytes || !total.is_multiple_of(bs) {
            return None;
        }
        if segs.len() == 1 {
            let addr = segs[0].iova()?.0;
            return Some((addr, total as u32, sgl_type::DATA_BLOCK, total));
        }
        let list_bytes = (segs.len() * cmd::SGL_DESCRIPTOR_BYTES) as u32;
        Some((
            self.page_iova(cid),
            list_bytes,
            sgl_type::LAST_SEGMENT,
            total,
        ))
    }

    /// The commands for `pieces` of pool memory: SGLs when the controller
    /// takes them, else PRPs; `None` when they cannot be described.
    /// Each as (first block relative to the op, blocks, data pointer).
    fn plan_transfers(
        &self,
        pieces: &[(crate::device::Iova, u64)],
    ) -> Option<Vec<(u64, u32, CmdData)>> {
        let bs = self.block_size();
        if self.sgl {
            let plan = sgl::plan(pieces, bs, self.max_transfer_bytes, self.sgl_dword)?;
            return Some(
                plan.into_iter()
                    .map(|t| (t.first_block, t.blocks, CmdData::Sgl(t)))
                    .collect(),
            );
        }
        let plan = prp::plan(pieces, bs, self.prp_max_bytes)?;
        Some(
            plan.into_iter()
                .map(|t| (t.first_block, t.blocks, CmdData::Prp(t)))
                .collect(),
        )
    }

    /// The steady-state path: a read or write that fits one command goes
    /// straight into the ring. False when it does not (nothing changed).
    #[inline]
    fn submit_direct(&mut self, tag: Tag, op: &IoOp) -> bool {
        let cid = self.free_head;
        if cid == NO_TRACKER || self.qp.sq_full() || !self.pending.is_empty() {
            return false;
        }
        let opcode = if op.kind == IoKind::Read {
            io_op::READ
        } else {
            io_op::WRITE
        };
        let (nsid, bs) = {
            let o = &self.owners[self.cur as usize];
            (o.nsid, o.block_size)
        };
        let mut cmd;
        if let Some((prp1, prp2, bytes)) = self.direct_prps(cid, &op.segs, bs) {
            cmd = Command::rw(opcode, nsid, op.lba, (bytes / bs) as u32);
            cmd.prp1 = prp1;
            cmd.prp2 = prp2;
        } else if self.sgl {
            let Some((addr, len, kind, bytes)) = self.direct_sgl(cid, &op.segs, bs) else {
                return false;
            };
            cmd = Command::rw(opcode, nsid, op.lba, (bytes / bs) as u32);
            cmd.set_sgl(addr, len, kind);
        } else {
            return false;
        }
        let o = self.op_slot(tag);
        debug_assert!(!o.live, "tag {tag} reused while live");
        o.live = true;
        o.kind = op.kind;
        o.lba = op.lba;
        o.blocks = op.blocks;
        o.remaining = 1;
        o.error = None;
        o.timed_out = false;
        self.start_command(cid, self.cur, tag, cmd);
        true
    }

    /// The general path: builds the commands of `op` (into `pending`) and
    /// its state.
    fn plan(&mut self, tag: Tag, op: &IoOp) -> Result<()> {
        let (owner, nsid) = (self.cur, self.owners[self.cur as usize].nsid);
        let bs = self.block_size();
        let mut cmds: Vec<(Command, CmdData)> = Vec::new();
        let mut bounce = None;
        let mut copy_back = Vec::new();
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
                let plan = pieces.and_then(|p| self.plan_transfers(&p));
                let plan = match plan {
                    Some(p) => p,
                    None => {
                        // Not pool memory (or not describable): one copy.
                        // The copy (write) or the device (read) fills it.
                        let total: usize = op.segs.iter().map(|s| s.len()).sum();
                        let b = self.ctrl.pool.alloc_for_overwrite(total)?;
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
                        } else {
                            copy_back = op.segs.iter().map(|s| s.clone_ref()).collect();
                        }
                        let iova = b.iova().expect("pool memory");
                        let p = self
                            .plan_transfers(&[(iova, total as u64)])
                            .expect("one pool buffer always plans");
                        bounce = Some(b);
                        p
                    }
                };
                for (first_block, blocks, data) in plan {
                    let cmd = Command::rw(opcode, nsid, op.lba + first_block, blocks);
                    cmds.push((cmd, data));
                }
            }
            IoKind::Flush => cmds.push((Command::flush(nsid), CmdData::None)),
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
                    let cmd = Command::deallocate(nsid, crate::device::Iova(0), 1);
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
                        let cmd = Command::rw(io_op::WRITE_ZEROES, nsid, op.lba + at, n);
                        cmds.push((cmd, CmdData::None));
                        at += n as u64;
                    }
                } else {
                    // Emulated: writes from one zeroed buffer.
                    let max = self.prp_max_bytes;
                    if self.zeroes.is_none() {
                        self.zeroes = Some(self.ctrl.pool.alloc(max as usize)?);
                    }
                    let iova = self.zeroes.as_ref().and_then(|z| z.iova()).expect("pool");
                    while at < op.blocks {
                        let n = (op.blocks - at).min(max / bs);
                        let t = prp::plan(&[(iova, n * bs)], bs, max)
                            .expect("one pool buffer always plans")
                            .remove(0);
                        let cmd = Command::rw(io_op::WRITE, nsid, op.lba + at, n as u32);
                        cmds.push((cmd, CmdData::Prp(t)));
                        at += n;
                    }
                }
            }
        }
        let o = self.op_slot(tag);
        debug_assert!(!o.live, "tag {tag} reused while live");
        *o = OpState {
            live: true,
            kind: op.kind,
            lba: op.lba,
            blocks: op.blocks,
            remaining: cmds.len() as u32,
            error: None,
            timed_out: false,
            bounce,
            segs: copy_back,
        };
        for (cmd, data) in cmds {
            self.pending.push_back(PendingCmd {
                owner,
                tag,
                cmd,
                data,
            });
        }
        Ok(())
    }

    /// Moves pending commands into the ring while trackers and slots last.
    fn push_pending(&mut self) {
        while self.free_head != NO_TRACKER && !self.qp.sq_full() {
            let Some(p) = self.pending.pop_front() else {
                break;
            };
            let Some(op) = self.owners[p.owner as usize].ops.get_mut(p.tag as usize) else {
                continue;
            };
            if !op.live {
                continue;
            }
            if op.error.is_some() || op.timed_out {
                // The operation already failed: do not send the rest.
                op.remaining -= 1;
                if op.remaining == 0 {
                    let r = self.finish(p.owner, p.tag);
                    self.push_ready(p.owner, p.tag, r);
                }
                continue;
            }
            // The command's page is its tracker's.
            let mut cmd = p.cmd;
            let cid = self.free_head;
            match &p.data {
                CmdData::None => {}
                CmdData::Prp(t) => {
                    let list = crate::device::Iova(self.page_iova(cid));
                    let (p1, p2) = t.prps(list, |i, a| self.write_page_u64(cid, i, a));
                    cmd.prp1 = p1;
                    cmd.prp2 = p2;
                }
                CmdData::Sgl(t) => match t.descriptors[..] {
                    [(addr, len)] => cmd.set_sgl(addr, len, sgl_type::DATA_BLOCK),
                    ref ds => {
                        for (i, &(addr, len)) in ds.iter().enumerate() {
                            self.write_page_u64(cid, 2 * i, addr);
                            let high = cmd::sgl_descriptor_high(len, sgl_type::DATA_BLOCK);
                            self.write_page_u64(cid, 2 * i + 1, high);
                        }
                        let list_bytes = (ds.len() * cmd::SGL_DESCRIPTOR_BYTES) as u32;
                        cmd.set_sgl(self.page_iova(cid), list_bytes, sgl_type::LAST_SEGMENT);
                    }
                },
                CmdData::Range { lba, blocks } => {
                    // Context attributes 0, length, starting LBA.
                    self.write_page_u64(cid, 0, (*blocks as u64) << 32);
                    self.write_page_u64(cid, 1, *lba);
                    cmd.prp1 = self.page_iova(cid);
                }
            }
            self.start_command(cid, p.owner, p.tag, cmd);
        }
    }

    /// The op's result; marks it reported. Copies a bounced read back.
    #[inline]
    fn finish(&mut self, owner: u16, tag: Tag) -> Result<()> {
        let op = &mut self.owners[owner as usize].ops[tag as usize];
        debug_assert!(op.live);
        op.live = false;
        if !op.timed_out && op.error.is_none() && op.bounce.is_none() {
            return Ok(());
        }
        self.finish_slow(owner, tag)
    }

    #[cold]
    fn finish_slow(&mut self, owner: u16, tag: Tag) -> Result<()> {
        let after_ms = self.ctrl.io_timeout().as_millis() as u64;
        let op = &mut self.owners[owner as usize].ops[tag as usize];
        let bounce = op.bounce.take();
        let segs = std::mem::take(&mut op.segs);
        if op.timed_out {
            op.error = None;
            return Err(Error::Timeout {
                op: op.kind.name(),
                lba: op.lba,
                blocks: op.blocks,
                after_ms,
            });
        }
        if let Some(e) = op.error.take() {
            return Err(e);
        }
        if let Some(b) = &bounce {
            let mut at = 0;
            for s in &segs {
                // SAFETY: the read completed, so the controller is done with
                // the bounce buffer; the segment belongs to this op.
                unsafe { s.write_at(0, std::slice::from_raw_parts(b.as_ptr().add(at), s.len())) };
                at += s.len();
            }
        }
        Ok(())
    }

    /// One completion of the I/O queue: 1 when it finished an op (handed to
    /// `done`), else 0.
    #[inline]
    fn complete(&mut self, c: Completion, done: &mut dyn FnMut(Tag, Result<()>)) -> usize {
        let cid = c.cid;
        let known = self
            .trackers
            .get(cid as usize)
            .is_some_and(|t| t.state != TrackerState::Free);
        if !known || c.sq_id != self.qp.qid {
            self.ctrl.stray_completion(self.qp.qid, &c);
            return 0;
        }
        let t = &mut self.trackers[cid as usize];
        let (owner, tag) = (t.owner, t.tag);
        let aborting = t.state == TrackerState::Aborting;
        if let Err(status) = c.status() {
            if !aborting && !c.dnr && t.retries < MAX_RETRIES && !self.qp.sq_full() {
                // Retryable: the same command again, under the same id.
                t.retries += 1;
                t.tick = self.tick;
                let cmd = t.cmd;
                self.qp.push(&cmd, cid);
                self.ctrl.counters.retries.fetch_add(1, Ordering::Relaxed);
                return 0;
            }
            let o = &mut self.owners[owner as usize];
            let (nsid, op) = (o.nsid, &mut o.ops[tag as usize]);
            if !aborting {
                op.error.get_or_insert(Error::Nvme {
                    op: op.kind.name(),
                    nsid,
                    lba: op.lba,
                    blocks: op.blocks,
                    status,
                });
            }
        }
        self.free_tracker(cid);
        let op = &mut self.owners[owner as usize].ops[tag as usize];
        op.remaining -= 1;
        if op.remaining > 0 {
            return 0;
        }
        let r = self.finish(owner, tag);
        if owner == self.cur {
            done(tag, r);
            return 1;
        }
        // Another namespace's channel on this queue reports it.
        self.push_ready(owner, tag, r);
        0
    }

    /// Fails every op the backend holds (reported by the next reap). Only
    /// called once the controller no longer owns any of their commands.
    fn fail_all(&mut self, reason: &str) {
        for cid in 0..self.trackers.len() {
            let t = self.trackers[cid];
            if t.state != TrackerState::Free {
                if t.state == TrackerState::Aborting {
                    self.owners[t.owner as usize].ops[t.tag as usize].timed_out = true;
                }
                self.free_tracker(cid as u16);
            }
        }
        debug_assert_eq!((self.active, self.aborting), (0, 0));
        self.pending.clear();
        for owner in 0..self.owners.len() {
            for tag in 0..self.owners[owner].ops.len() {
                let op = &mut self.owners[owner].ops[tag];
                if !op.live {
                    continue;
                }
                op.error.get_or_insert_with(|| Error::DeviceFailed {
                    device: self.ctrl.name.clone(),
                    reason: reason.to_string(),
                });
                let r = self.finish(owner as u16, tag as Tag);
                self.push_ready(owner as u16, tag as Tag, r);
            }
        }
    }

    /// Follows the controller's state: fails everything once a reset or a
    /// fatal status has stopped the controller, and creates the queue pair
    /// again after a reset. Ok when the queue pair can be used.
    #[inline]
    fn check_controller(&mut self) -> Result<()> {
        let st = self.ctrl.state.load(Ordering::Acquire);
        let gen = self.ctrl.generation.load(Ordering::Acquire);
        if st == state::LIVE && gen == self.generation {
            return Ok(());
        }
        self.controller_changed(st, gen)
    }

    #[cold]
    fn controller_changed(&mut self, st: u8, gen: u64) -> Result<()> {
        match st {
            state::RESETTING => {
                // The controller may still be using our memory: fail nothing
                // until it is disabled and the reset is done.
                Err(self.ctrl.failed_error("controller reset in progress"))
            }
            state::WEDGED => Err(self.ctrl.failed_error(
                "controller failed and did not stop: its in-flight commands keep their memory",
            )),
            state::FAILED => {
                self.fail_all("controller fatal status: the controller was disabled; reset it");
                Err(self.ctrl.failed_error("controller failed; reset it"))
            }
            _ => {
                self.fail_all("controller reset while the operation was in flight");
                self.qp.reset();
                self.ctrl.create_io_queues(&self.qp)?;
                self.generation = gen;
                Ok(())
            }
        }
    }

    /// Reads the clock now and then; on each timeout tick checks for a
    /// fatal status, aborts commands past their timeout without waiting,
    /// and resets the controller when an aborted command has not finished
    /// one more timeout later.
    #[cold]
    fn check_clock(&mut self) {
        let now = Instant::now();
        let timeout = self.ctrl.io_timeout();
        let tick_len = (timeout / TICKS_PER_TIMEOUT as u32).max(Duration::from_micros(100));
        // Each tick is at least `tick_len` long (the first after an idle
        // spell may be shorter), so a command is past its timeout once
        // TICKS_PER_TIMEOUT + 1 ticks passed since its own.
        match self.tick_started {
            Some(t0) if now.duration_since(t0) < tick_len => return,
            _ => {}
        }
        self.tick += 1;
        self.tick_started = Some(now);
        if self.ctrl.fatal_status() {
            self.ctrl.disable_after_fatal();
            return;
        }
        // Abort completions and asynchronous events.
        self.ctrl.poll_admin();
        // Ticks a timeout lasts: TICKS_PER_TIMEOUT, or fewer when the tick's
        // floor makes each tick longer than timeout / TICKS_PER_TIMEOUT (a
        // zero timeout: none, so the first tick after a command's own finds
        // it late, as "a deadline no command can meet" asks).
        let ticks =
            (timeout.as_nanos().div_ceil(tick_len.as_nanos()) as u64).min(TICKS_PER_TIMEOUT);
        let limit = ticks + 1;
        let mut reset = false;
        for cid in 0..self.trackers.len() {
            let t = self.trackers[cid];
            if self.tick - t.tick < limit {
                continue;
            }
            match t.state {
                TrackerState::Active => {
                    // Past its deadline: a timeout, however it ends.
                    self.owners[t.owner as usize].ops[t.tag as usize].timed_out = true;
                    let abort = Command::abort(self.qp.qid, cid as u16);
                    if self.ctrl.admin_detached(abort) {
                        self.ctrl.counters.aborts.fetch_add(1, Ordering::Relaxed);
                        let t = &mut self.trackers[cid];
                        t.state = TrackerState::Aborting;
                        t.tick = self.tick;
                        self.aborting += 1;
                    } else if self.tick - t.tick >= 2 * limit {
                        // No Abort could be sent for a whole timeout.
                        reset = true;
                    }
                }
                TrackerState::Aborting => reset = true,
                TrackerState::Free => {}
            }
        }
        if reset {
            eprintln!(
                "nvme {}: an aborted command of queue {} did not finish: resetting the controller",
                self.ctrl.name, self.qp.qid
            );
            if let Err(e) = self.ctrl.reset() {
                eprintln!("nvme {}: reset failed: {e}", self.ctrl.name);
            }
        }
    }
}

impl NvmeBackend {
    /// Starts `op` of the current owner (`cur`).
    #[inline]
    fn submit(&mut self, tag: Tag, op: &IoOp) -> Result<()> {
        self.check_controller()?;
        if matches!(op.kind, IoKind::Read | IoKind::Write) && self.submit_direct(tag, op) {
            return Ok(());
        }
        self.plan(tag, op)?;
        self.push_pending();
        Ok(())
    }

    /// Reaps the queue for the current owner (`cur`): its ops go to
    /// `done`, other owners' to their `ready` lists.
    fn reap(&mut self, done: &mut dyn FnMut(Tag, Result<()>)) -> usize {
        let usable = self.check_controller().is_ok();
        let mut n = self.drain_ready(done);
        if !usable {
            return n;
        }
        // Submissions since the last reap: one doorbell write for all.
        self.qp.ring(&*self.ctrl.bar);
        let mut taken = 0;
        while taken < REAP_MAX {
            let Some(c) = self.qp.next_completion() else {
                break;
            };
            taken += 1;
            n += self.complete(c, done);
        }
        self.qp.release_completions(&*self.ctrl.bar);
        if !self.pending.is_empty() {
            self.push_pending();
        }
        if self.active > 0 {
            self.reaps_since_clock += 1;
            if self.reaps_since_clock >= REAPS_PER_CLOCK {
                self.reaps_since_clock = 0;
                self.check_clock();
                let _ = self.check_controller();
            }
        }
        // Retries and backlog pushed above.
        if self.qp.unrung() && self.check_controller().is_ok() {
            self.qp.ring(&*self.ctrl.bar);
        }
        n + self.drain_ready(done)
    }

    /// Sleeps on the queue's completion interrupt until an op of the
    /// current owner has finished (it then waits in the owner's ready list
    /// for the next reap), or at most `IRQ_WAIT_SLICE_MS`; false without
    /// interrupts (the caller polls). Completions that only finish a part
    /// of an op (a multi-command transfer) are taken here and the thread
    /// sleeps again, instead of waking its caller for each. Interrupts
    /// counted before the queue was last looked at are drained first, so
    /// a sleep ends only for a completion posted after the look (or a
    /// shared vector's).
    fn wait(&mut self) -> bool {
        let Some(fd) = self.irq_fd else {
            return false;
        };
        if !self.ctrl.irq_waits.load(Ordering::Relaxed) {
            return false;
        }
        loop {
            if self.active == 0 || self.check_controller().is_err() {
                return true;
            }
            let cur = self.cur as usize;
            let mut mine = std::mem::take(&mut self.owners[cur].ready);
            let had = mine.len();
            // Rings what was submitted, takes what completed: the current
            // owner's finished ops go to `mine`, others' to their lists.
            self.reap(&mut |t, r| mine.push((t, r)));
            let finished = mine.len() - had;
            self.ready_count += finished;
            self.owners[cur].ready = mine;
            if finished > 0 || !self.owners[cur].ready.is_empty() {
                return true;
            }
            let mut count = 0u64;
            // SAFETY: a non-blocking eventfd the controller keeps open;
            // reads 8 bytes into `count`. EAGAIN (nothing counted) is fine.
            unsafe { libc::read(fd, (&mut count as *mut u64).cast(), 8) };
            if self.qp.completion_posted() {
                continue;
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            self.ctrl.irq_sleeps.fetch_add(1, Ordering::Relaxed);
            // SAFETY: one valid pollfd for the duration of the call.
            if unsafe { libc::poll(&mut pfd, 1, IRQ_WAIT_SLICE_MS) } <= 0 {
                // The slice ran out (or a signal): let the caller poll.
                return true;
            }
        }
    }

    /// Leaves a finished op for its owner's next reap.
    fn push_ready(&mut self, owner: u16, tag: Tag, r: Result<()>) {
        self.owners[owner as usize].ready.push((tag, r));
        self.ready_count += 1;
    }

    /// Reports the current owner's ops that finished elsewhere.
    #[inline]
    fn drain_ready(&mut self, done: &mut dyn FnMut(Tag, Result<()>)) -> usize {
        if self.ready_count == 0 {
            return 0;
        }
        let ready = &mut self.owners[self.cur as usize].ready;
        let mut n = 0;
        while let Some((t, r)) = ready.pop() {
            done(t, r);
            n += 1;
        }
        self.ready_count -= n;
        n
    }
}

thread_local! {
    /// This thread's queue pairs, one per controller (keyed by the
    /// controller's address, which the queue's `Arc` keeps alive).
    static THREAD_QUEUES: RefCell<Vec<(usize, Weak<RefCell<NvmeBackend>>)>> =
        const { RefCell::new(Vec::new()) };
}

/// A thread's channel on one namespace: its share ([`Owner`]) of the
/// thread's queue pair on the controller, created with the first channel
/// of the thread on any namespace of it and deleted with the last.
struct NamespaceBackend {
    queue: Rc<RefCell<NvmeBackend>>,
    owner: u16,
}

impl NamespaceBackend {
    fn new(dev: &NvmeDevice) -> Result<NamespaceBackend> {
        let key = Arc::as_ptr(&dev.ctrl) as usize;
        let found = THREAD_QUEUES.with(|t| {
            t.borrow()
                .iter()
                .find(|(k, _)| *k == key)
                .and_then(|(_, w)| w.upgrade())
        });
        let queue = match found {
            Some(q) => q,
            None => {
                let q = Rc::new(RefCell::new(NvmeBackend::new(dev.ctrl.clone())?));
                THREAD_QUEUES.with(|t| {
                    let mut t = t.borrow_mut();
                    t.retain(|(_, w)| w.strong_count() > 0);
                    t.push((key, Rc::downgrade(&q)));
                });
                q
            }
        };
        let owner = queue
            .borrow_mut()
            .add_owner(dev.nsid, dev.geometry.block_size as u64);
        Ok(NamespaceBackend { queue, owner })
    }
}

impl ChannelBackend for NamespaceBackend {
    #[inline]
    fn submit(&mut self, tag: Tag, op: &IoOp) -> Result<()> {
        let mut q = self.queue.borrow_mut();
        q.cur = self.owner;
        q.submit(tag, op)
    }

    #[inline]
    fn reap(&mut self, done: &mut dyn FnMut(Tag, Result<()>)) -> usize {
        let mut q = self.queue.borrow_mut();
        q.cur = self.owner;
        q.reap(done)
    }

    fn wait(&mut self) -> bool {
        let mut q = self.queue.borrow_mut();
        // Another namespace's finished ops of this thread wait in their
        // owner's list: this owner's reap reports its own at once.
        if !q.owners[self.owner as usize].ready.is_empty() {
            return true;
        }
        q.wait()
    }
}

impl Drop for NamespaceBackend {
    fn drop(&mut self) {
        let mut q = self.queue.borrow_mut();
        q.cur = self.owner;
        // The queue outlives this channel: its ops' memory must not be
        // released while the controller may still reach it, so wait for
        // them (timeouts, aborts and resets bound the wait); a wedged
        // controller keeps it.
        while q.owner_busy(self.owner) && q.ctrl.state.load(Ordering::Acquire) != state::WEDGED {
            q.reap(&mut |_, _| {});
            std::hint::spin_loop();
        }
        let o = &mut q.owners[self.owner as usize];
        o.live = false;
        o.ops = Vec::new();
        let left = std::mem::take(&mut o.ready).len();
        q.ready_count -= left;
    }
}

impl Drop for NvmeBackend {
    fn drop(&mut self) {
        if self.ctrl.state.load(Ordering::Acquire) == state::LIVE
            && self.ctrl.generation.load(Ordering::Acquire) == self.generation
        {
            self.ctrl.delete_io_queues(self.qp.qid);
        }
        self.ctrl.free_qid(self.qp.qid);
    }
}
