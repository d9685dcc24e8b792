//! One reactor's thread side: the lock-free [`Shared`] state any thread may
//! touch, the task slab and its wakers, the pollers, and [`Local`] with the
//! loop and its shutdown. [`reactor_main`] is the body of a reactor thread.
//!
//! Invariants:
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
//!   [`Error::Shutdown`].
//! - A panic in a task, message or poller is caught: the task or poller is
//!   dropped, and the reactor keeps running.

use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crossbeam_queue::SegQueue;

use super::cores::pin_current_thread;
use super::{IdlePolicy, LocalFuture, LocalPoller, Message, PollerId};
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

/// The part of a reactor that any thread may touch. Lock-free.
pub(super) struct Shared {
    /// Process-unique identity (handles of different `Reactors` never match).
    pub(super) id: u64,
    /// Position in its `Reactors`.
    pub(super) index: usize,
    /// The core it is pinned to, if any.
    pub(super) core: Option<usize>,
    pub(super) messages: SegQueue<Message>,
    /// Keys of tasks woken, from any thread (including the reactor's own).
    pub(super) woken: SegQueue<u64>,
    /// Set when no more messages are accepted.
    pub(super) closed: AtomicBool,
    /// Senders between their `closed` check and the end of their push.
    pub(super) senders: AtomicUsize,
    /// Set to make the loop begin its shutdown.
    pub(super) stop: AtomicBool,
    /// True while the reactor is about to park or parked.
    pub(super) sleeping: AtomicBool,
    /// The reactor thread, set by the thread itself before `start` returns.
    pub(super) thread: OnceLock<Thread>,
    pub(super) next_poller: AtomicU64,
}

impl Shared {
    /// Unparks the reactor if it sleeps. Callers have just pushed to a queue.
    pub(super) fn notify(&self) {
        // Pairs with the fence in `Local::sleep`: either we see `sleeping`,
        // or the reactor sees what we pushed before it parks.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) {
            if let Some(t) = self.thread.get() {
                t.unpark();
            }
        }
    }

    pub(super) fn push_message(&self, msg: Message) -> Result<()> {
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
pub(super) struct Local {
    pub(super) shared: Arc<Shared>,
    tasks: RefCell<TaskSlab>,
    pollers: RefCell<Vec<PollerEntry>>,
    /// Some poller entry is marked removed and still in the list.
    pollers_removed: Cell<bool>,
}

thread_local! {
    static CURRENT: RefCell<Option<Rc<Local>>> = const { RefCell::new(None) };
}

pub(super) fn current_local() -> Option<Rc<Local>> {
    CURRENT.with(|c| c.borrow().clone())
}

impl Local {
    pub(super) fn spawn_task(&self, future: LocalFuture) {
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

    pub(super) fn add_poller(&self, id: PollerId, poll: LocalPoller) {
        self.pollers.borrow_mut().push(PollerEntry {
            id,
            poll: Some(poll),
            removed: false,
        });
    }

    /// Marks a poller removed and drops its closure unless it is running
    /// (then `run_pollers` drops it when it returns). Entries leave the list
    /// only at the end of a pass, so a pass's indexes stay valid.
    pub(super) fn remove_poller(&self, id: PollerId) -> bool {
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

pub(super) fn reactor_main(
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
