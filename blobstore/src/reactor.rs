//! Per-core reactors, in the line of SPDK's: one thread per core runs a loop
//! that polls its device channels and pollers, runs the messages other
//! threads send it, and runs its ready tasks. It is how one thread keeps many
//! I/Os in flight. Plain [`crate::block_on`] keeps working on any thread.
//!
//! Invariants:
//! - A reactor's tasks, pollers and I/O channels live on its thread only; they
//!   may be `!Send`. Other threads reach a reactor only through its message
//!   queue and through task wakers.
//! - The message path takes no lock: messages and task wakes are pushed onto
//!   lock-free queues (`crossbeam_queue::SegQueue`), and a sleeping reactor is
//!   unparked. A sender never waits for the receiver.
//! - Each loop iteration polls the thread's device channels first, then the
//!   pollers, then a bounded batch of messages, then a bounded batch of ready
//!   tasks, so no message flood or self-waking task starves I/O completion.
//! - With [`IdlePolicy::Sleep`], a reactor sleeps only when no I/O is in flight
//!   on its thread, and no message, wake or poller work was seen for the
//!   configured time. A wake or message pushed after the reactor decided to
//!   sleep unparks it (both sides publish, fence, then check the other).
//!   With [`IdlePolicy::Block`] it also blocks in the device while I/O is in
//!   flight; a message or wake then waits for the next completion.
//! - Once a reactor is closed no message is accepted; every message accepted
//!   before runs exactly once (shutdown drains the queue after the last sender
//!   that saw it open has finished pushing).
//! - At shutdown, unfinished tasks are dropped only after the thread's I/O has
//!   drained (bounded by the drain timeout); their join handles then resolve to
//!   [`Error::Shutdown`]. A join handle resolves exactly once.
//! - A panic in a task, message or poller is caught: the task or poller is
//!   dropped, and the reactor keeps running.
//!
//! ```
//! use blobstore::reactor::{spawn_local, Reactors};
//!
//! let reactors = Reactors::start_unpinned(2)?; // or Reactors::start(&[2, 3])
//! let r0 = reactors.handle(0).unwrap();
//! // The closure runs on the reactor; the future may hold `!Send` state
//! // (I/O channels) and spawn more local tasks.
//! let sum = r0.spawn(|| async {
//!     let parts: Vec<_> = (1..=4u64).map(|i| spawn_local(async move { i * 10 })).collect();
//!     let mut sum = 0;
//!     for p in parts {
//!         sum += p?.await?;
//!     }
//!     Ok::<u64, blobstore::Error>(sum)
//! })?;
//! assert_eq!(sum.join()??, 100);
//! reactors.shutdown()?;
//! # Ok::<(), blobstore::Error>(())
//! ```

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;
use futures::channel::oneshot;
use futures::FutureExt;

use crate::device::{poll_thread_channels, thread_in_flight, wait_thread_channels};
use crate::error::{Error, Result};

/// Messages run per loop iteration at most, before devices are polled again.
const MESSAGE_BATCH: usize = 256;
/// Task polls per loop iteration at most, before devices are polled again.
const TASK_BATCH: usize = 256;
/// Longest sleep of an [`IdlePolicy::Block`] reactor with nothing in flight.
const BLOCK_POLICY_MAX_SLEEP: Duration = Duration::from_millis(1);
/// Idle spins between `yield_now` calls while I/O is in flight and the
/// policy is [`IdlePolicy::Sleep`] (be polite on a shared machine).
const YIELD_EVERY: u32 = 64;

/// What a reactor does when a loop iteration found no work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdlePolicy {
    /// Never sleep: poll continuously, as SPDK does. Lowest latency; burns its
    /// core, so use it only on cores reserved for the reactor.
    Spin,
    /// Spin while I/O is in flight on the thread (only polling completes it,
    /// yielding the core now and then); otherwise, after `after` without work,
    /// park until a message or wake arrives, or `max_sleep` passes (so pollers
    /// still run at least that often).
    Sleep {
        /// Time without any work (and no I/O in flight) before sleeping.
        after: Duration,
        /// Longest single sleep.
        max_sleep: Duration,
    },
    /// As SPDK's interrupt mode: while I/O is in flight, poll for `spin`
    /// (not at all once the thread's recent waits average twice `spin` or
    /// more: a disk, where the spin only burns the core), then block in the
    /// device until one of the thread's operations completes (an NVMe queue's completion interrupt, io_uring's wait);
    /// with nothing in flight, sleep as [`IdlePolicy::Sleep`] does with
    /// `after = spin` and `max_sleep` 1 ms. A waiting core costs no CPU, at
    /// the price of the wake-up latency. A message or wake from another
    /// thread that arrives while the reactor blocks in the device runs
    /// after the next completion (the device's I/O timeout bounds that
    /// wait). Where the device cannot block (memory), the reactor yields
    /// the core instead.
    Block {
        /// Time to poll in-flight I/O before blocking in the device.
        spin: Duration,
    },
}

impl Default for IdlePolicy {
    /// Sleep after 50 µs idle, for at most 1 ms at a time.
    fn default() -> Self {
        IdlePolicy::Sleep {
            after: Duration::from_micros(50),
            max_sleep: Duration::from_millis(1),
        }
    }
}

/// Identifies a registered poller, for [`ReactorHandle::unregister_poller`]
/// and [`unregister_local_poller`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PollerId {
    reactor: u64,
    n: u64,
}

type Message = Box<dyn FnOnce() + Send>;
type LocalPoller = Box<dyn FnMut() -> usize>;
type LocalFuture = Pin<Box<dyn Future<Output = ()>>>;

/// The part of a reactor that any thread may touch. Lock-free.
struct Shared {
    /// Process-unique identity (handles of different `Reactors` never match).
    id: u64,
    /// Position in its `Reactors`.
    index: usize,
    /// The core it is pinned to, if any.
    core: Option<usize>,
    messages: SegQueue<Message>,
    /// Keys of tasks woken, from any thread (including the reactor's own).
    woken: SegQueue<u64>,
    /// Set when no more messages are accepted.
    closed: AtomicBool,
    /// Senders between their `closed` check and the end of their push.
    senders: AtomicUsize,
    /// Set to make the loop begin its shutdown.
    stop: AtomicBool,
    /// True while the reactor is about to park or parked.
    sleeping: AtomicBool,
    /// The reactor thread, set by the thread itself before `start` returns.
    thread: OnceLock<Thread>,
    next_poller: AtomicU64,
}

impl Shared {
    /// Unparks the reactor if it sleeps. Callers have just pushed to a queue.
    fn notify(&self) {
        // Pairs with the fence in `Local::sleep`: either we see `sleeping`,
        // or the reactor sees what we pushed before it parks.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) {
            if let Some(t) = self.thread.get() {
                t.unpark();
            }
        }
    }

    fn push_message(&self, msg: Message) -> Result<()> {
        self.senders.fetch_add(1, Ordering::SeqCst);
        if self.closed.load(Ordering::SeqCst) {
            self.senders.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::Shutdown(format!(
                "reactor {} no longer accepts messages",
                self.index
            )));
        }
        self.messages.push(msg);
        self.senders.fetch_sub(1, Ordering::SeqCst);
        self.notify();
        Ok(())
    }
}

/// Wakes one task of one reactor; `Send + Sync`, usable from any thread.
struct TaskWaker {
    shared: Arc<Shared>,
    key: u64,
    /// True while the key sits in the wake queue (avoids duplicates).
    queued: AtomicBool,
}

impl Wake for TaskWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            self.shared.woken.push(self.key);
            self.shared.notify();
        }
    }
}

struct TaskEntry {
    /// `None` while the task is being polled.
    future: Option<LocalFuture>,
    waker_state: Arc<TaskWaker>,
    waker: Waker,
}

struct TaskSlot {
    generation: u32,
    entry: Option<TaskEntry>,
}

/// Tasks by key: slot index in the low 32 bits, slot generation in the high
/// 32, so a stale wake for a finished task never runs a newer one.
#[derive(Default)]
struct TaskSlab {
    slots: Vec<TaskSlot>,
    free: Vec<u32>,
    live: usize,
}

fn task_key(index: u32, generation: u32) -> u64 {
    (generation as u64) << 32 | index as u64
}

struct PollerEntry {
    id: PollerId,
    /// `None` while the poller runs.
    poll: Option<LocalPoller>,
    removed: bool,
}

/// The reactor-thread side: tasks and pollers. Not `Send`.
struct Local {
    shared: Arc<Shared>,
    tasks: RefCell<TaskSlab>,
    pollers: RefCell<Vec<PollerEntry>>,
    /// Some poller entry is marked removed and still in the list.
    pollers_removed: Cell<bool>,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Local>>> = const { RefCell::new(None) };
}

fn current_local() -> Option<Rc<Local>> {
    CURRENT.with(|c| c.borrow().clone())
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

impl Local {
    fn spawn_task(&self, future: LocalFuture) {
        let mut tasks = self.tasks.borrow_mut();
        let index = match tasks.free.pop() {
            Some(i) => i,
            None => {
                tasks.slots.push(TaskSlot {
                    generation: 0,
                    entry: None,
                });
                (tasks.slots.len() - 1) as u32
            }
        };
        let slot = &mut tasks.slots[index as usize];
        debug_assert!(slot.entry.is_none(), "free list holds a busy task slot");
        let key = task_key(index, slot.generation);
        let waker_state = Arc::new(TaskWaker {
            shared: self.shared.clone(),
            key,
            queued: AtomicBool::new(true),
        });
        slot.entry = Some(TaskEntry {
            future: Some(future),
            waker: Waker::from(waker_state.clone()),
            waker_state,
        });
        tasks.live += 1;
        drop(tasks);
        // First poll goes through the wake queue like every other.
        self.shared.woken.push(key);
    }

    /// Frees the slot of a finished task (its future is already taken out and
    /// is dropped by the caller, outside the borrow).
    fn remove_task(&self, index: u32) {
        let mut tasks = self.tasks.borrow_mut();
        let slot = &mut tasks.slots[index as usize];
        let entry = slot.entry.take();
        slot.generation = slot.generation.wrapping_add(1);
        tasks.free.push(index);
        tasks.live -= 1;
        drop(tasks);
        drop(entry);
    }

    /// Polls the task with `key` once, if it still exists. True if polled.
    fn run_task(&self, key: u64) -> bool {
        let index = key as u32;
        let generation = (key >> 32) as u32;
        let (mut future, waker) = {
            let mut tasks = self.tasks.borrow_mut();
            let Some(slot) = tasks.slots.get_mut(index as usize) else {
                return false;
            };
            if slot.generation != generation {
                return false;
            }
            let Some(entry) = slot.entry.as_mut() else {
                return false;
            };
            let Some(future) = entry.future.take() else {
                return false;
            };
            // Cleared before polling so a wake during the poll queues it again.
            entry.waker_state.queued.store(false, Ordering::Release);
            (future, entry.waker.clone())
        };
        let mut cx = Context::from_waker(&waker);
        match catch_unwind(AssertUnwindSafe(|| future.as_mut().poll(&mut cx))) {
            Ok(Poll::Pending) => {
                let mut tasks = self.tasks.borrow_mut();
                if let Some(entry) = tasks.slots[index as usize].entry.as_mut() {
                    entry.future = Some(future);
                }
            }
            Ok(Poll::Ready(())) => {
                self.remove_task(index);
                drop(future);
            }
            Err(_) => {
                // The panic hook has reported it; the task's state is unknown.
                self.remove_task(index);
                let _ = catch_unwind(AssertUnwindSafe(move || drop(future)));
            }
        }
        true
    }

    /// Polls the tasks that were ready when called (at most `limit`): a task
    /// that wakes itself runs again next iteration, after the devices and
    /// pollers, not in a loop of its own.
    fn run_ready(&self, limit: usize) -> usize {
        let mut ran = 0;
        for _ in 0..self.shared.woken.len().min(limit) {
            let Some(key) = self.shared.woken.pop() else {
                break;
            };
            if self.run_task(key) {
                ran += 1;
            }
        }
        ran
    }

    fn run_messages(&self, limit: usize) -> usize {
        let mut ran = 0;
        while ran < limit {
            let Some(msg) = self.shared.messages.pop() else {
                break;
            };
            // A panicking message is reported by the hook and otherwise ignored.
            let _ = catch_unwind(AssertUnwindSafe(msg));
            ran += 1;
        }
        ran
    }

    fn add_poller(&self, id: PollerId, poll: LocalPoller) {
        self.pollers.borrow_mut().push(PollerEntry {
            id,
            poll: Some(poll),
            removed: false,
        });
    }

    /// Marks a poller removed and drops its closure unless it is running
    /// (then `run_pollers` drops it when it returns). Entries leave the list
    /// only at the end of a pass, so a pass's indexes stay valid.
    fn remove_poller(&self, id: PollerId) -> bool {
        let mut pollers = self.pollers.borrow_mut();
        let Some(p) = pollers.iter_mut().find(|p| p.id == id && !p.removed) else {
            return false;
        };
        p.removed = true;
        let closure = p.poll.take();
        self.pollers_removed.set(true);
        drop(pollers);
        drop(closure);
        true
    }

    fn run_pollers(&self) -> usize {
        let count = self.pollers.borrow().len();
        let mut work = 0;
        for i in 0..count {
            let taken = {
                let mut pollers = self.pollers.borrow_mut();
                match pollers.get_mut(i) {
                    Some(p) if !p.removed => p.poll.take(),
                    _ => None,
                }
            };
            let Some(mut poll) = taken else { continue };
            let result = catch_unwind(AssertUnwindSafe(&mut poll));
            let keep = {
                let mut pollers = self.pollers.borrow_mut();
                // Pollers are only appended or marked during a pass, so index
                // `i` still holds this poller.
                let entry = &mut pollers[i];
                match result {
                    Ok(n) if !entry.removed => {
                        work += n;
                        entry.poll = Some(poll);
                        None
                    }
                    _ => {
                        // Unregistered while running, or panicked.
                        entry.removed = true;
                        self.pollers_removed.set(true);
                        Some(poll)
                    }
                }
            };
            drop(keep);
        }
        if self.pollers_removed.replace(false) {
            self.pollers.borrow_mut().retain(|p| !p.removed);
        }
        work
    }

    /// Parks the thread unless something arrived; `timeout` bounds the sleep.
    fn sleep(&self, timeout: Duration) {
        let s = &self.shared;
        s.sleeping.store(true, Ordering::Relaxed);
        // Pairs with the fence in `Shared::notify`.
        fence(Ordering::SeqCst);
        if s.messages.is_empty() && s.woken.is_empty() && !s.stop.load(Ordering::Relaxed) {
            thread::park_timeout(timeout);
        }
        s.sleeping.store(false, Ordering::Relaxed);
    }

    /// The reactor loop, until `stop` is set.
    fn run(&self, idle: IdlePolicy) {
        let mut idle_since: Option<Instant> = None;
        let mut idle_spins = 0u32;
        // IdlePolicy::Block: when the current wait for I/O began, and the
        // moving average (1/8 weight) of such waits in nanoseconds.
        let mut io_wait_since: Option<Instant> = None;
        let mut avg_io_wait_ns = 0u64;
        while !self.shared.stop.load(Ordering::Acquire) {
            let mut work = poll_thread_channels();
            work += self.run_pollers();
            work += self.run_messages(MESSAGE_BATCH);
            work += self.run_ready(TASK_BATCH);
            if work > 0 {
                if let Some(t) = io_wait_since.take() {
                    let ns = t.elapsed().as_nanos().min(u64::MAX as u128) as u64;
                    avg_io_wait_ns = avg_io_wait_ns - avg_io_wait_ns / 8 + ns / 8;
                }
                idle_since = None;
                idle_spins = 0;
                continue;
            }
            match idle {
                IdlePolicy::Spin => std::hint::spin_loop(),
                IdlePolicy::Block { spin } => {
                    let now = Instant::now();
                    let since = *idle_since.get_or_insert(now);
                    let in_flight = thread_in_flight() > 0;
                    if in_flight {
                        io_wait_since.get_or_insert(since);
                    }
                    // Waits that outlast the spin many times over (a disk)
                    // skip it: it would only burn the core, as block_on's.
                    let slow = avg_io_wait_ns >= 2 * spin.as_nanos() as u64;
                    if now.duration_since(since) < spin && !(in_flight && slow) {
                        std::hint::spin_loop();
                    } else if in_flight {
                        if !wait_thread_channels() {
                            thread::yield_now();
                        }
                    } else {
                        self.sleep(BLOCK_POLICY_MAX_SLEEP);
                    }
                }
                IdlePolicy::Sleep { after, max_sleep } => {
                    if thread_in_flight() > 0 {
                        // Only polling completes our I/O: keep polling, but
                        // let other threads of a shared core run now and then.
                        idle_since = None;
                        idle_spins += 1;
                        if idle_spins >= YIELD_EVERY {
                            idle_spins = 0;
                            thread::yield_now();
                        } else {
                            std::hint::spin_loop();
                        }
                        continue;
                    }
                    let now = Instant::now();
                    let since = *idle_since.get_or_insert(now);
                    if now.duration_since(since) >= after {
                        self.sleep(max_sleep);
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
        }
    }

    /// Runs the queued messages, drains I/O, drops tasks and pollers. Returns
    /// the number of I/Os still in flight when the drain bound ran out.
    fn shut_down(&self, drain_timeout: Duration) -> usize {
        let s = &self.shared;
        s.closed.store(true, Ordering::SeqCst);
        // Every sender that saw the reactor open pushes before it leaves; once
        // none is left (after `closed` was set), the queue is complete.
        loop {
            let quiet = s.senders.load(Ordering::SeqCst) == 0;
            self.run_messages(usize::MAX);
            if quiet {
                break;
            }
            thread::yield_now();
        }
        let deadline = Instant::now() + drain_timeout;
        while thread_in_flight() > 0 && Instant::now() < deadline {
            if poll_thread_channels() == 0 {
                thread::yield_now();
            }
        }
        let stuck = thread_in_flight();
        // Dropping a task may spawn or drop others: repeat until none is left.
        loop {
            let futures: Vec<LocalFuture> = {
                let mut tasks = self.tasks.borrow_mut();
                let mut out = Vec::new();
                for slot in tasks.slots.iter_mut() {
                    if let Some(entry) = slot.entry.take() {
                        slot.generation = slot.generation.wrapping_add(1);
                        // No task is being polled here, so each has its future.
                        out.extend(entry.future);
                    }
                }
                tasks.free = (0..tasks.slots.len() as u32).collect();
                tasks.live = 0;
                out
            };
            if futures.is_empty() {
                break;
            }
            for f in futures {
                let _ = catch_unwind(AssertUnwindSafe(move || drop(f)));
            }
        }
        let pollers = std::mem::take(&mut *self.pollers.borrow_mut());
        let _ = catch_unwind(AssertUnwindSafe(move || drop(pollers)));
        while s.woken.pop().is_some() {}
        stuck
    }
}

/// A reactor, from any thread: send it messages, spawn tasks on it, register
/// pollers. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct ReactorHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ReactorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReactorHandle")
            .field("index", &self.shared.index)
            .field("core", &self.shared.core)
            .finish()
    }
}

impl ReactorHandle {
    /// Position of this reactor in its [`Reactors`] (0-based).
    pub fn index(&self) -> usize {
        self.shared.index
    }

    /// The core this reactor is pinned to, or `None` when unpinned.
    pub fn core(&self) -> Option<usize> {
        self.shared.core
    }

    /// True when called on this reactor's thread.
    pub fn is_current(&self) -> bool {
        current_local().is_some_and(|l| l.shared.id == self.shared.id)
    }

    /// True once the reactor stopped accepting messages.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Runs `f` on the reactor's thread, after the messages sent before it
    /// (per sender). Never blocks. Fails with [`Error::Shutdown`] once the
    /// reactor is shutting down; `f` is then dropped unrun.
    pub fn send(&self, f: impl FnOnce() + Send + 'static) -> Result<()> {
        self.shared.push_message(Box::new(f))
    }

    /// Builds a future on the reactor's thread with `make` and runs it there
    /// as a local task (it may hold `!Send` state such as I/O channels).
    /// The returned handle resolves to its output, or to [`Error::Shutdown`]
    /// if the task never finishes (reactor shut down, or a panic).
    pub fn spawn<F, Fut>(&self, make: F) -> Result<JoinHandle<Fut::Output>>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future + 'static,
        Fut::Output: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.send(move || {
            let Some(local) = current_local() else {
                debug_assert!(false, "a message ran off its reactor");
                return;
            };
            local.spawn_task(joined(make(), tx));
        })?;
        Ok(JoinHandle {
            rx,
            reactor: self.shared.id,
            reactor_index: self.shared.index,
        })
    }

    /// Registers `poll` to run on every loop iteration of the reactor (in
    /// registration order, after the device channels). It returns how much
    /// work it did; 0 counts as idle. Takes effect when the reactor handles
    /// the message; use [`register_local_poller`] on the reactor itself.
    pub fn register_poller(
        &self,
        poll: impl FnMut() -> usize + Send + 'static,
    ) -> Result<PollerId> {
        let id = PollerId {
            reactor: self.shared.id,
            n: self.shared.next_poller.fetch_add(1, Ordering::Relaxed),
        };
        self.send(move || {
            if let Some(local) = current_local() {
                local.add_poller(id, Box::new(poll));
            }
        })?;
        Ok(id)
    }

    /// Unregisters a poller of this reactor. On the reactor's own thread it
    /// takes effect at once; from elsewhere, when the reactor handles the
    /// message (the poller may run a few more times before). Unknown ids are
    /// ignored.
    pub fn unregister_poller(&self, id: PollerId) -> Result<()> {
        if id.reactor != self.shared.id {
            return Err(Error::InvalidArgument(format!(
                "poller {id:?} does not belong to reactor {}",
                self.shared.index
            )));
        }
        if self.is_current() {
            unregister_local_poller(id);
            return Ok(());
        }
        self.send(move || {
            unregister_local_poller(id);
        })
    }
}

/// Wraps a task so its output (or its panic) reaches the join handle.
fn joined<Fut>(fut: Fut, tx: oneshot::Sender<Result<Fut::Output>>) -> LocalFuture
where
    Fut: Future + 'static,
    Fut::Output: 'static,
{
    Box::pin(async move {
        let out = AssertUnwindSafe(fut)
            .catch_unwind()
            .await
            .map_err(|p| Error::Shutdown(format!("the task panicked: {}", panic_text(p.as_ref()))));
        // The receiver may be gone (a detached task): nothing to report to.
        let _ = tx.send(out);
    })
}

/// The handle of the reactor whose thread calls this, if any.
pub fn current() -> Option<ReactorHandle> {
    current_local().map(|l| ReactorHandle {
        shared: l.shared.clone(),
    })
}

/// Spawns `fut` as a task on the calling reactor thread. Fails with
/// [`Error::InvalidArgument`] when the caller is not a reactor thread.
pub fn spawn_local<Fut>(fut: Fut) -> Result<JoinHandle<Fut::Output>>
where
    Fut: Future + 'static,
    Fut::Output: 'static,
{
    let local = current_local().ok_or_else(|| {
        Error::InvalidArgument("spawn_local called outside a reactor thread".into())
    })?;
    let (tx, rx) = oneshot::channel();
    local.spawn_task(joined(fut, tx));
    Ok(JoinHandle {
        rx,
        reactor: local.shared.id,
        reactor_index: local.shared.index,
    })
}

/// Registers a poller on the calling reactor thread; it may be `!Send`. See
/// [`ReactorHandle::register_poller`].
pub fn register_local_poller(poll: impl FnMut() -> usize + 'static) -> Result<PollerId> {
    let local = current_local().ok_or_else(|| {
        Error::InvalidArgument("register_local_poller called outside a reactor thread".into())
    })?;
    let id = PollerId {
        reactor: local.shared.id,
        n: local.shared.next_poller.fetch_add(1, Ordering::Relaxed),
    };
    local.add_poller(id, Box::new(poll));
    Ok(id)
}

/// Unregisters a poller of the calling reactor thread at once (a poller may
/// unregister itself while it runs). False when the caller is not that
/// poller's reactor thread or the poller is already gone.
pub fn unregister_local_poller(id: PollerId) -> bool {
    match current_local() {
        Some(local) if local.shared.id == id.reactor => local.remove_poller(id),
        _ => false,
    }
}

/// The output of a task spawned on a reactor. Await it from anywhere, or
/// block on it with [`JoinHandle::join`]. `Send` when the output is. Dropping
/// it detaches the task.
#[must_use = "dropping a join handle detaches the task"]
pub struct JoinHandle<T> {
    rx: oneshot::Receiver<Result<T>>,
    reactor: u64,
    reactor_index: usize,
}

impl<T> std::fmt::Debug for JoinHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinHandle")
            .field("reactor", &self.reactor_index)
            .finish()
    }
}

impl<T> JoinHandle<T> {
    /// Blocks the calling thread until the task finishes (with
    /// [`crate::block_on`]). On the task's own reactor thread this would
    /// deadlock, so it fails with [`Error::Busy`] there; await the handle
    /// instead. On another reactor's thread it works but stalls that reactor.
    pub fn join(self) -> Result<T> {
        if current_local().is_some_and(|l| l.shared.id == self.reactor) {
            return Err(Error::Busy(format!(
                "join on reactor {}'s own thread would deadlock; await the handle",
                self.reactor_index
            )));
        }
        crate::block_on(self)
    }
}

impl<T> Future for JoinHandle<T> {
    type Output = Result<T>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<T>> {
        let index = self.reactor_index;
        self.rx.poll_unpin(cx).map(|r| match r {
            Ok(out) => out,
            Err(oneshot::Canceled) => Err(Error::Shutdown(format!(
                "reactor {index} dropped the task before it finished"
            ))),
        })
    }
}

/// Cores the calling thread may run on (its `sched_getaffinity` mask).
pub fn allowed_cores() -> Result<Vec<usize>> {
    // SAFETY: `cpu_set_t` is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe `set`, which outlives the call;
    // pid 0 is the calling thread.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(Error::last_os("sched_getaffinity"));
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below CPU_SETSIZE, inside the set.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Pins the calling thread to `core` (checked below CPU_SETSIZE by callers).
fn pin_current_thread(core: usize) -> Result<()> {
    // SAFETY: as in `allowed_cores`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `core` < CPU_SETSIZE (checked by the builder), inside the set.
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: the pointer and size describe `set`; pid 0 is this thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        let source = std::io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::EINVAL) {
            let allowed = allowed_cores().unwrap_or_default();
            return Err(Error::InvalidArgument(format!(
                "core {core} is not in the cores this thread may use {allowed:?} ({source})"
            )));
        }
        return Err(Error::Os {
            context: format!("pinning a reactor to core {core}"),
            source,
        });
    }
    Ok(())
}

/// Configures and starts a set of reactors. See [`Reactors::builder`].
#[derive(Clone, Debug)]
pub struct ReactorsBuilder {
    placement: Vec<Option<usize>>,
    idle: IdlePolicy,
    drain_timeout: Duration,
    name: String,
}

impl ReactorsBuilder {
    /// One reactor per entry of `cores`, each pinned to that core.
    pub fn pinned(mut self, cores: &[usize]) -> Self {
        self.placement = cores.iter().map(|&c| Some(c)).collect();
        self
    }

    /// `count` reactors, not pinned (the scheduler places them).
    pub fn unpinned(mut self, count: usize) -> Self {
        self.placement = vec![None; count];
        self
    }

    /// What idle reactors do (default: [`IdlePolicy::default`]).
    pub fn idle_policy(mut self, idle: IdlePolicy) -> Self {
        self.idle = idle;
        self
    }

    /// How long shutdown waits for a reactor's in-flight I/O before dropping
    /// its tasks anyway (default 5 s). Buffers stay valid either way: an
    /// abandoned operation keeps its memory alive until it completes.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Thread name prefix (default `reactor`; threads are `<prefix>-<index>`).
    pub fn thread_name(mut self, prefix: impl Into<String>) -> Self {
        self.name = prefix.into();
        self
    }

    fn check(&self) -> Result<()> {
        if self.placement.is_empty() {
            return Err(Error::InvalidArgument("no reactor to start".into()));
        }
        let cores: Vec<usize> = self.placement.iter().flatten().copied().collect();
        if cores.is_empty() {
            return Ok(());
        }
        let mut seen = HashSet::new();
        for &c in &cores {
            if c >= libc::CPU_SETSIZE as usize {
                return Err(Error::InvalidArgument(format!(
                    "core {c} is beyond the largest core number {}",
                    libc::CPU_SETSIZE - 1
                )));
            }
            if !seen.insert(c) {
                return Err(Error::InvalidArgument(format!(
                    "core {c} is given twice: one reactor per core"
                )));
            }
        }
        // Membership in the allowed set is left to the kernel (each reactor
        // thread pins itself): the caller's own mask may be narrower than
        // what the process may use.
        Ok(())
    }

    /// Starts the reactor threads; returns once every one runs (and is
    /// pinned). If any fails to start, those started are shut down again.
    pub fn start(self) -> Result<Reactors> {
        self.check()?;
        let mut reactors = Reactors {
            handles: Vec::new(),
            threads: Vec::new(),
        };
        let mut first_error = None;
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        for (index, &core) in self.placement.iter().enumerate() {
            static NEXT_ID: AtomicU64 = AtomicU64::new(1);
            let shared = Arc::new(Shared {
                id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
                index,
                core,
                messages: SegQueue::new(),
                woken: SegQueue::new(),
                closed: AtomicBool::new(false),
                senders: AtomicUsize::new(0),
                stop: AtomicBool::new(false),
                sleeping: AtomicBool::new(false),
                thread: OnceLock::new(),
                next_poller: AtomicU64::new(0),
            });
            let (idle, drain) = (self.idle, self.drain_timeout);
            let thread_shared = shared.clone();
            let ready = ready_tx.clone();
            let spawned = thread::Builder::new()
                .name(format!("{}-{index}", self.name))
                .spawn(move || reactor_main(thread_shared, idle, drain, ready));
            match spawned {
                Ok(t) => {
                    reactors.handles.push(ReactorHandle { shared });
                    reactors.threads.push(Some(t));
                }
                Err(e) => {
                    first_error = Some(Error::Os {
                        context: format!("spawning reactor thread {index}"),
                        source: e,
                    });
                    break;
                }
            }
        }
        drop(ready_tx);
        for _ in 0..reactors.threads.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => {
                    first_error.get_or_insert(Error::Shutdown(
                        "a reactor thread died while starting".into(),
                    ));
                }
            }
        }
        match first_error {
            None => Ok(reactors),
            Some(e) => {
                let _ = reactors.stop_and_join();
                Err(e)
            }
        }
    }
}

fn reactor_main(
    shared: Arc<Shared>,
    idle: IdlePolicy,
    drain_timeout: Duration,
    ready: mpsc::Sender<Result<()>>,
) -> usize {
    let _ = shared.thread.set(thread::current());
    if let Some(core) = shared.core {
        if let Err(e) = pin_current_thread(core) {
            let _ = ready.send(Err(e));
            return 0;
        }
    }
    let local = Rc::new(Local {
        shared,
        tasks: RefCell::new(TaskSlab::default()),
        pollers: RefCell::new(Vec::new()),
        pollers_removed: Cell::new(false),
    });
    CURRENT.with(|c| *c.borrow_mut() = Some(local.clone()));
    let _ = ready.send(Ok(()));
    drop(ready);
    local.run(idle);
    let stuck = local.shut_down(drain_timeout);
    CURRENT.with(|c| c.borrow_mut().take());
    stuck
}

/// A set of running reactors, one thread each. Shut down by
/// [`Reactors::shutdown`] or on drop.
pub struct Reactors {
    handles: Vec<ReactorHandle>,
    threads: Vec<Option<thread::JoinHandle<usize>>>,
}

impl std::fmt::Debug for Reactors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reactors")
            .field("reactors", &self.handles)
            .finish()
    }
}

impl Reactors {
    /// A builder: pinned or not, idle policy, drain timeout.
    pub fn builder() -> ReactorsBuilder {
        ReactorsBuilder {
            placement: Vec::new(),
            idle: IdlePolicy::default(),
            drain_timeout: Duration::from_secs(5),
            name: "reactor".into(),
        }
    }

    /// Starts one reactor per entry of `cores`, each pinned to its core, with
    /// default settings. Fails if a core is repeated or not allowed.
    pub fn start(cores: &[usize]) -> Result<Reactors> {
        Reactors::builder().pinned(cores).start()
    }

    /// Starts `count` unpinned reactors with default settings.
    pub fn start_unpinned(count: usize) -> Result<Reactors> {
        Reactors::builder().unpinned(count).start()
    }

    /// Number of reactors.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// True when there is no reactor (never for a started set).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The reactor at `index`.
    pub fn handle(&self, index: usize) -> Option<&ReactorHandle> {
        self.handles.get(index)
    }

    /// All reactors, by index.
    pub fn handles(&self) -> &[ReactorHandle] {
        &self.handles
    }

    /// Stops every reactor: no new messages are accepted, each runs the
    /// messages already queued, waits for its in-flight I/O (up to the drain
    /// timeout), drops its unfinished tasks (their join handles resolve to
    /// [`Error::Shutdown`]) and exits. Fails if a reactor thread died or left
    /// I/O in flight, after all were stopped. Called from a reactor thread of
    /// this set, it cannot wait for that thread and fails with
    /// [`Error::Busy`] (the others are still joined).
    pub fn shutdown(mut self) -> Result<()> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<()> {
        // Close all first, so messages between reactors are refused alike.
        for h in &self.handles {
            h.shared.closed.store(true, Ordering::SeqCst);
        }
        for h in &self.handles {
            h.shared.stop.store(true, Ordering::Release);
            h.shared.notify();
            // `notify` only unparks a sleeper; a thread about to sleep sees
            // `stop` in its re-check.
            if let Some(t) = h.shared.thread.get() {
                t.unpark();
            }
        }
        let mut result = Ok(());
        for (h, slot) in self.handles.iter().zip(self.threads.iter_mut()) {
            let Some(t) = slot.take() else { continue };
            let index = h.shared.index;
            if h.is_current() {
                // Joining ourselves would deadlock; this thread exits its loop
                // when the current message or task returns.
                result = result.and(Err(Error::Busy(format!(
                    "reactor {index} cannot join itself; it stops after this call returns"
                ))));
                continue;
            }
            let r = match t.join() {
                Ok(0) => Ok(()),
                Ok(n) => Err(Error::Shutdown(format!(
                    "reactor {index} dropped its tasks with {n} I/Os still in flight"
                ))),
                Err(p) => Err(Error::Shutdown(format!(
                    "reactor {index} thread panicked: {}",
                    panic_text(p.as_ref())
                ))),
            };
            result = result.and(r);
        }
        result
    }
}

impl Drop for Reactors {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{BlockDevice, ChannelBackend, DeviceId, Geometry, IoOp, Lba, Tag};
    use crate::{block_on, channel, DmaBuf, MemDevice};
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc::RecvTimeoutError;

    const WAIT: Duration = Duration::from_secs(20);

    fn unpinned(count: usize) -> Reactors {
        Reactors::start_unpinned(count).expect("start reactors")
    }

    /// A memory device whose channels hold completions back until `batch`
    /// operations are outstanding (or the oldest waited `hold`), so a test
    /// can see how many I/Os a thread really keeps in flight.
    struct HeldDevice {
        inner: MemDevice,
        id: DeviceId,
        batch: usize,
        hold: Duration,
        max_outstanding: Arc<AtomicUsize>,
    }

    struct HeldBackend {
        inner: Box<dyn ChannelBackend>,
        batch: usize,
        hold: Duration,
        held: Vec<(Tag, Result<()>)>,
        outstanding: usize,
        oldest: Option<Instant>,
        max_outstanding: Arc<AtomicUsize>,
    }

    impl BlockDevice for HeldDevice {
        fn geometry(&self) -> Geometry {
            self.inner.geometry()
        }
        fn id(&self) -> DeviceId {
            self.id
        }
        fn name(&self) -> String {
            format!("held:{}", self.inner.name())
        }
        fn new_backend(&self) -> Result<Box<dyn ChannelBackend>> {
            Ok(Box::new(HeldBackend {
                inner: self.inner.new_backend()?,
                batch: self.batch,
                hold: self.hold,
                held: Vec::new(),
                outstanding: 0,
                oldest: None,
                max_outstanding: self.max_outstanding.clone(),
            }))
        }
    }

    impl ChannelBackend for HeldBackend {
        fn submit(&mut self, tag: Tag, op: &IoOp) -> Result<()> {
            self.inner.submit(tag, op)?;
            self.outstanding += 1;
            self.max_outstanding
                .fetch_max(self.outstanding, Ordering::Relaxed);
            self.oldest.get_or_insert_with(Instant::now);
            Ok(())
        }

        fn reap(&mut self, done: &mut dyn FnMut(Tag, Result<()>)) -> usize {
            let held = &mut self.held;
            self.inner.reap(&mut |t, r| held.push((t, r)));
            let due = self.oldest.is_some_and(|t| t.elapsed() >= self.hold);
            if held.is_empty() || (held.len() < self.batch && !due) {
                return 0;
            }
            let n = held.len();
            for (t, r) in held.drain(..) {
                done(t, r);
            }
            self.outstanding -= n;
            self.oldest = (self.outstanding > 0).then(Instant::now);
            n
        }
    }

    fn held_device(
        batch: usize,
        hold: Duration,
    ) -> (Arc<dyn BlockDevice>, MemDevice, Arc<AtomicUsize>) {
        let mem = MemDevice::new(8 << 20, 4096).unwrap();
        let max = Arc::new(AtomicUsize::new(0));
        let dev: Arc<dyn BlockDevice> = Arc::new(HeldDevice {
            inner: mem.clone(),
            id: DeviceId::fresh(),
            batch,
            hold,
            max_outstanding: max.clone(),
        });
        (dev, mem, max)
    }

    /// Forwards a counter back and forth between two reactors.
    fn hop(
        all: Arc<Vec<ReactorHandle>>,
        left: usize,
        expected: usize,
        done: mpsc::Sender<std::result::Result<(), String>>,
    ) {
        let here = current().map(|h| h.index());
        if here != Some(expected) {
            let _ = done.send(Err(format!("hop {left} ran on {here:?}, not {expected}")));
            return;
        }
        if left == 0 {
            let _ = done.send(Ok(()));
            return;
        }
        let next = 1 - expected;
        let target = all[next].clone();
        let sent = target.send(move || hop(all, left - 1, next, done.clone()));
        if let Err(e) = sent {
            panic!("send failed: {e}");
        }
    }

    #[test]
    fn ping_pong_10000_hops() {
        let r = unpinned(2);
        let all = Arc::new(r.handles().to_vec());
        let (tx, rx) = mpsc::channel();
        let first = all.clone();
        all[0].send(move || hop(first, 10_000, 0, tx)).unwrap();
        assert_eq!(rx.recv_timeout(WAIT), Ok(Ok(())));
        r.shutdown().unwrap();
    }

    #[test]
    fn one_task_keeps_32_ios_in_flight() {
        const TASKS: usize = 32;
        const BLOCKS_EACH: u64 = 8;
        let (dev, mem, max) = held_device(TASKS, Duration::from_millis(200));
        let r = unpinned(1);
        let task_dev = dev.clone();
        let h = r.handle(0).unwrap().spawn(move || async move {
            let ch = channel(&task_dev)?;
            let mut subs = Vec::new();
            for t in 0..TASKS {
                let ch = ch.clone();
                subs.push(spawn_local(async move {
                    for b in 0..BLOCKS_EACH {
                        let lba = t as u64 * BLOCKS_EACH + b;
                        let buf = DmaBuf::from_slice(&[(lba % 251) as u8 + 1; 4096])?;
                        ch.write(Lba(lba), buf).await?;
                    }
                    for b in 0..BLOCKS_EACH {
                        let lba = t as u64 * BLOCKS_EACH + b;
                        let buf = ch.read(Lba(lba), DmaBuf::new(4096)?).await?;
                        if buf.iter().any(|&x| x != (lba % 251) as u8 + 1) {
                            return Err(Error::corrupt(format!("block {lba}"), "bad pattern"));
                        }
                    }
                    Ok::<(), Error>(())
                })?);
            }
            for res in futures::future::join_all(subs).await {
                res??;
            }
            Ok::<usize, Error>(thread_in_flight())
        });
        assert_eq!(h.unwrap().join().unwrap().unwrap(), 0);
        assert_eq!(max.load(Ordering::Relaxed), TASKS, "I/Os in flight at once");
        let mut byte = [0u8; 1];
        for lba in 0..TASKS as u64 * BLOCKS_EACH {
            mem.load_bytes(lba as usize * 4096 + 4095, &mut byte);
            assert_eq!(byte[0], (lba % 251) as u8 + 1, "block {lba}");
        }
        r.shutdown().unwrap();
    }

    #[test]
    fn block_on_works_beside_reactors() {
        let mem = MemDevice::new(4 << 20, 512).unwrap();
        let dev: Arc<dyn BlockDevice> = Arc::new(mem.clone());
        let r = unpinned(2);
        let mut handles = Vec::new();
        for (i, h) in r.handles().iter().enumerate() {
            let dev = dev.clone();
            handles.push(
                h.spawn(move || async move {
                    let ch = channel(&dev)?;
                    for k in 0..200u64 {
                        let lba = i as u64 * 1000 + k;
                        ch.write(Lba(lba), DmaBuf::from_slice(&[i as u8 + 1; 512])?)
                            .await?;
                    }
                    Ok::<(), Error>(())
                })
                .unwrap(),
            );
        }
        // Meanwhile, a plain thread does its own I/O with block_on.
        let ch = channel(&dev).unwrap();
        for k in 0..200u64 {
            let buf = DmaBuf::from_slice(&[9u8; 512]).unwrap();
            block_on(ch.write(Lba(5000 + k), buf)).unwrap();
            let back = block_on(ch.read(Lba(5000 + k), DmaBuf::new(512).unwrap())).unwrap();
            assert!(back.iter().all(|&x| x == 9));
        }
        for h in handles {
            block_on(h).unwrap().unwrap();
        }
        let snap = mem.snapshot();
        assert!(snap[1000 * 512..1200 * 512].iter().all(|&x| x == 2));
        r.shutdown().unwrap();
    }

    #[test]
    fn block_policy_waits_in_the_device_and_still_runs_messages() {
        // A file device blocks in io_uring; memory cannot block, so the
        // reactor yields instead. Either way the I/O completes, checked.
        let path = std::env::temp_dir().join(format!("reactor-block-{}", std::process::id()));
        let file: Arc<dyn BlockDevice> = Arc::new(
            crate::device::FileDevice::open(
                &path,
                crate::device::FileOptions {
                    size_bytes: Some(4 << 20),
                    create: Some(true),
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        let _ = std::fs::remove_file(&path);
        let mem: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(4 << 20, 4096).unwrap());
        let r = Reactors::builder()
            .unpinned(1)
            .idle_policy(IdlePolicy::Block {
                spin: Duration::from_micros(5),
            })
            .start()
            .unwrap();
        for dev in [file, mem] {
            let h = r
                .handle(0)
                .unwrap()
                .spawn(move || async move {
                    let ch = channel(&dev)?;
                    for k in 0..100u64 {
                        let data = vec![(k % 251) as u8 + 1; 4096];
                        ch.write(Lba(k * 8), DmaBuf::from_slice(&data)?).await?;
                        let back = ch.read(Lba(k * 8), DmaBuf::new(4096)?).await?;
                        assert!(back[..] == data[..], "block {k}");
                    }
                    Ok::<(), Error>(())
                })
                .unwrap();
            h.join().unwrap().unwrap();
        }
        // Idle now: a message from another thread still arrives promptly.
        let (tx, rx) = mpsc::channel();
        r.handle(0)
            .unwrap()
            .send(move || tx.send(7).unwrap())
            .unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(7));
        r.shutdown().unwrap();
    }

    #[test]
    fn wake_from_plain_thread_unparks_a_sleeping_reactor() {
        // With a 30 s sleep bound, only the unpark can make this quick.
        let r = Reactors::builder()
            .unpinned(1)
            .idle_policy(IdlePolicy::Sleep {
                after: Duration::from_micros(10),
                max_sleep: Duration::from_secs(30),
            })
            .start()
            .unwrap();
        for round in 0..20u32 {
            let (tx, rx) = oneshot::channel::<u32>();
            let h = r
                .handle(0)
                .unwrap()
                .spawn(move || async move { rx.await.map(|v| v + 1).ok() })
                .unwrap();
            let t0 = Instant::now();
            let waker = thread::spawn(move || {
                thread::sleep(Duration::from_millis(5));
                tx.send(round).unwrap();
            });
            assert_eq!(h.join().unwrap(), Some(round + 1));
            assert!(t0.elapsed() < Duration::from_secs(5), "wake was lost");
            waker.join().unwrap();
        }
        // A message to the sleeping reactor arrives promptly too.
        let (tx, rx) = mpsc::channel();
        thread::sleep(Duration::from_millis(5));
        r.handle(0)
            .unwrap()
            .send(move || tx.send(()).unwrap())
            .unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(5)), Ok(()));
        // Shutdown wakes it as well.
        let t0 = Instant::now();
        r.shutdown().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn pollers_register_and_unregister() {
        let r = unpinned(1);
        let h = r.handle(0).unwrap().clone();
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = runs.clone();
        let id = h
            .register_poller(move || {
                counted.fetch_add(1, Ordering::Relaxed);
                0
            })
            .unwrap();
        let t0 = Instant::now();
        while runs.load(Ordering::Relaxed) < 20 {
            assert!(t0.elapsed() < WAIT, "poller never ran");
            thread::sleep(Duration::from_millis(1));
        }
        h.unregister_poller(id).unwrap();
        // Messages run in order: once this one ran, the poller is gone.
        h.spawn(|| async {}).unwrap().join().unwrap();
        let after = runs.load(Ordering::Relaxed);
        thread::sleep(Duration::from_millis(20));
        assert_eq!(runs.load(Ordering::Relaxed), after);

        // A local, !Send poller that unregisters itself after 5 runs, and
        // one poller per reactor rejected on the wrong reactor.
        let local_runs = h
            .spawn(|| async {
                let runs = Rc::new(Cell::new(0usize));
                let me: Rc<Cell<Option<PollerId>>> = Rc::new(Cell::new(None));
                let (r2, me2) = (runs.clone(), me.clone());
                let id = register_local_poller(move || {
                    r2.set(r2.get() + 1);
                    if r2.get() == 5 {
                        assert!(unregister_local_poller(me2.get().unwrap()));
                    }
                    1
                })?;
                me.set(Some(id));
                // Let the reactor loop run the poller a while.
                for _ in 0..50 {
                    yield_once().await;
                }
                assert!(!unregister_local_poller(id), "already gone");
                Ok::<usize, Error>(runs.get())
            })
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(local_runs, 5);
        assert!(register_local_poller(|| 0).is_err(), "not a reactor thread");
        r.shutdown().unwrap();
    }

    /// Pending once, waking itself: lets the reactor loop go round.
    async fn yield_once() {
        let mut yielded = false;
        futures::future::poll_fn(|cx| {
            if yielded {
                Poll::Ready(())
            } else {
                yielded = true;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        })
        .await
    }

    #[test]
    fn shutdown_runs_queued_messages_and_cancels_pending_tasks() {
        let (dev, _mem, _max) = held_device(1000, Duration::from_millis(100));
        let r = Reactors::builder()
            .unpinned(2)
            .drain_timeout(Duration::from_secs(10))
            .start()
            .unwrap();
        let h0 = r.handle(0).unwrap().clone();
        // Tasks that never finish: one on nothing, one on held-back I/O.
        let forever = h0.spawn(futures::future::pending::<()>).unwrap();
        let io_dev = dev.clone();
        let (started_tx, started_rx) = mpsc::channel();
        let io = h0
            .spawn(move || async move {
                let ch = channel(&io_dev)?;
                let writes: Vec<_> = (0..4).map(|lba| ch.write_zeroes(Lba(lba), 1)).collect();
                started_tx.send(thread_in_flight()).unwrap();
                futures::future::join_all(writes).await;
                futures::future::pending::<()>().await;
                Ok::<(), Error>(())
            })
            .unwrap();
        assert_eq!(started_rx.recv_timeout(WAIT), Ok(4));
        // Keep reactor 1 busy so that messages queue up behind it.
        let h1 = r.handle(1).unwrap().clone();
        h1.send(|| thread::sleep(Duration::from_millis(100)))
            .unwrap();
        let ran = Arc::new(AtomicUsize::new(0));
        for _ in 0..10 {
            let ran = ran.clone();
            h1.send(move || {
                ran.fetch_add(1, Ordering::SeqCst);
            })
            .unwrap();
        }
        let t0 = Instant::now();
        r.shutdown().unwrap();
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert_eq!(ran.load(Ordering::SeqCst), 10, "queued messages ran");
        assert!(matches!(forever.join(), Err(Error::Shutdown(_))));
        assert!(matches!(block_on(io), Err(Error::Shutdown(_))));
        assert!(matches!(h0.send(|| {}), Err(Error::Shutdown(_))));
        assert!(h0.spawn(|| async {}).is_err());
        assert!(h0.is_closed());
    }

    #[test]
    fn panics_are_contained_and_reported() {
        let r = unpinned(1);
        let h = r.handle(0).unwrap();
        let bad = h.spawn(|| async { panic!("boom") }).unwrap();
        let err = bad.join().unwrap_err();
        assert!(err.to_string().contains("boom"), "{err}");
        h.send(|| panic!("message boom")).unwrap();
        h.register_poller(|| panic!("poller boom")).unwrap();
        // The reactor still works.
        assert_eq!(h.spawn(|| async { 7 }).unwrap().join().unwrap(), 7);
        r.shutdown().unwrap();
    }

    #[test]
    fn join_on_own_reactor_is_refused_and_spawn_local_needs_a_reactor() {
        assert!(matches!(
            spawn_local(async {}),
            Err(Error::InvalidArgument(_))
        ));
        assert!(current().is_none());
        let r = unpinned(1);
        let h = r.handle(0).unwrap();
        let res = h
            .spawn(|| async {
                let inner = spawn_local(async { 1 }).unwrap();
                let refused = matches!(inner.join(), Err(Error::Busy(_)));
                let again = spawn_local(async { 2 }).unwrap().await.unwrap();
                (refused, again, current().unwrap().is_current())
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(res, (true, 2, true));
        r.shutdown().unwrap();
    }

    #[test]
    fn spin_policy_and_drop_shut_down() {
        let r = Reactors::builder()
            .unpinned(1)
            .idle_policy(IdlePolicy::Spin)
            .start()
            .unwrap();
        let h = r.handle(0).unwrap().spawn(|| async { 3 }).unwrap();
        assert_eq!(h.join().unwrap(), 3);
        let pending = r
            .handle(0)
            .unwrap()
            .spawn(futures::future::pending::<()>)
            .unwrap();
        drop(r);
        assert!(matches!(pending.join(), Err(Error::Shutdown(_))));
    }

    #[test]
    fn pinning_checks_cores() {
        let allowed = allowed_cores().unwrap();
        assert!(!allowed.is_empty());
        assert!(matches!(
            Reactors::start(&[]),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            Reactors::start(&[100_000]),
            Err(Error::InvalidArgument(_))
        ));
        let c = allowed[0];
        assert!(matches!(
            Reactors::start(&[c, c]),
            Err(Error::InvalidArgument(_))
        ));
        if let Some(missing) = (0..libc::CPU_SETSIZE as usize).find(|c| !allowed.contains(c)) {
            let err = Reactors::start(&[missing]).unwrap_err();
            assert!(err.to_string().contains("not in"), "{err}");
        }
        let r = Reactors::start(&[c]).unwrap();
        assert_eq!(r.handle(0).unwrap().core(), Some(c));
        let seen = r
            .handle(0)
            .unwrap()
            .spawn(|| async { allowed_cores() })
            .unwrap()
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(seen, vec![c]);
        r.shutdown().unwrap();
    }

    #[test]
    fn handles_are_send_and_sync() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>() {}
        send_sync::<ReactorHandle>();
        send::<JoinHandle<u32>>();
        send::<Reactors>();
        let _ = RecvTimeoutError::Timeout;
    }
}
