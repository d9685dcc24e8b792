//! The controller: bring-up, admin commands (the shared admin queue),
//! asynchronous events, error counters, and reset.
//!
//! Invariants:
//! - The admin queue is shared behind a mutex and only used for setup,
//!   queue creation, Abort, events and logs; the I/O path only ever
//!   try-locks it.
//! - After [`NvmeController::reset`], every command that was in flight is
//!   failed and each thread's queue pair is created again on its next use.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::cmd::{
    cns, event_type, AsyncEvent, Command, Completion, ControllerIdentity, ErrorLogEntry,
    NamespaceIdentity, SmartLog,
};
use super::dma::DmaPool;
use super::prp::{MAX_TRANSFER_BYTES, PAGE};
use super::queue::QueuePair;
use super::regs::{Bar, Capabilities, CSTS, CSTS_CFS};
use super::sgl::MAX_SGL_TRANSFER_BYTES;
use super::shadow::ShadowDoorbells;

use super::*;

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
pub(super) struct AtomicCounters {
    stray_completions: AtomicU64,
    pub(super) retries: AtomicU64,
    pub(super) aborts: AtomicU64,
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
pub(super) const IRQ_WAIT_SLICE_MS: i32 = 10;

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
    pub(super) name: String,
    pub(super) bar: Arc<dyn Bar>,
    pub(super) pool: Arc<DmaPool>,
    pub(super) cap: Capabilities,
    pub(super) identity: ControllerIdentity,
    pub(super) max_transfer_bytes: u64,
    /// Data goes in SGLs (else PRPs).
    pub(super) sgl: bool,
    io_queue_pairs: u16,
    /// Shadow doorbell pages, when the controller took them.
    pub(super) shadow: Option<Arc<ShadowDoorbells>>,
    admin: Mutex<AdminState>,
    qids: Mutex<Vec<bool>>,
    pub(super) generation: AtomicU64,
    /// One of [`state`]'s values.
    pub(super) state: AtomicU8,
    io_timeout_us: AtomicU64,
    pub(super) counters: AtomicCounters,
    events: AtomicEventCounters,
    /// One eventfd per connected MSI-X vector (vector 0: admin); empty
    /// without interrupts.
    pub(super) irqs: Vec<vmm_sys_util::eventfd::EventFd>,
    /// Sleeps of waiting threads on their queue's interrupt.
    pub(super) irq_sleeps: AtomicU64,
    /// Waiting threads sleep on the interrupt (else they poll).
    pub(super) irq_waits: std::sync::atomic::AtomicBool,
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
pub(super) struct NamespaceClaim {
    pci: String,
    nsid: u32,
}

impl NamespaceClaim {
    /// Claims namespace `nsid` of `pci`, or says who holds it.
    pub(super) fn take(pci: &str, nsid: u32) -> Result<NamespaceClaim> {
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
    pub(super) fn start(
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

    pub(super) fn failed_error(&self, reason: &str) -> Error {
        Error::DeviceFailed {
            device: self.name.clone(),
            reason: reason.into(),
        }
    }

    /// Counts and reports a completion for a command id of queue `qid` that
    /// is not outstanding. It completes nothing.
    pub(super) fn stray_completion(&self, qid: u16, c: &Completion) {
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
    pub(super) fn fatal_status(&self) -> bool {
        let csts = self.bar.read32(CSTS);
        csts == u32::MAX || csts & CSTS_CFS != 0
    }

    /// After a fatal status: disables the controller (CC.EN = 0, then waits
    /// for CSTS.RDY = 0) so it stops touching memory, and only then marks it
    /// failed, which lets every channel fail its commands and release their
    /// memory. If the controller does not become not-ready, it is marked
    /// wedged and that memory is never released.
    pub(super) fn disable_after_fatal(&self) {
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
    pub(super) fn admin_detached(&self, cmd: Command) -> bool {
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
    pub(super) fn poll_admin(&self) {
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

    pub(super) fn alloc_qid(&self) -> Result<u16> {
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

    pub(super) fn free_qid(&self, qid: u16) {
        self.qids.lock()[qid as usize] = false;
    }

    /// The MSI-X vector of I/O queue `qid`'s completions: its own while
    /// there are vectors enough, else shared (a shared vector only wakes a
    /// waiter for nothing now and then); `None` without interrupts.
    pub(super) fn irq_vector(&self, qid: u16) -> Option<u16> {
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
    pub(super) fn create_io_queues(&self, qp: &QueuePair) -> Result<()> {
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

    pub(super) fn delete_io_queues(&self, qid: u16) {
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
