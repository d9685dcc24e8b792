//! Driving futures on the calling thread.
//!
//! [`block_on`] is the plain way to run any future of this crate: it polls
//! the future, and while the thread has device I/O in flight it polls the
//! thread's channels (only polling completes I/O): first spinning for a few
//! microseconds, then sleeping in the device until a completion arrives
//! (where the device can block, e.g. io_uring). A thread whose recent waits
//! all outlasted the spin many times over (a disk, not memory or a fast
//! NVMe queue) skips the spin and sleeps at once: on a loaded machine the
//! spin only takes the core from the threads that have work. With nothing
//! in flight it parks until woken.
//!
//! [`block_on_deadline`] does the same but gives up at a deadline: the
//! future is dropped, and any device operation it had in flight completes
//! later into memory the channel keeps alive until then (the device layer's
//! invariant), so giving up is always safe. Its waits are bounded by the
//! deadline: it never sleeps in the device, which could outlast it.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use crate::device::{poll_thread_channels, thread_in_flight, wait_thread_channels};

struct ThreadWaker {
    thread: Thread,
    woken: AtomicBool,
}

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// How long [`block_on`] polls a channel with I/O in flight before it
/// sleeps in the device (where the device can block): short I/O completes
/// within the spin, long I/O costs no CPU while it waits, and threads that
/// share a core leave it to the others instead of spinning on it.
const SPIN_BEFORE_BLOCK: Duration = Duration::from_micros(10);

/// A thread whose I/O waits average at least this long sleeps at once
/// instead of spinning first: most of its waits outlast the spin, which
/// then only burns the core (a virtio disk read takes 60-70 us, and the
/// spin was a seventh of a single RocksDB reader's CPU time).
const SLEEP_AT_ONCE_NS: u64 = 2 * SPIN_BEFORE_BLOCK.as_nanos() as u64;

/// Runs `fut` to completion on the calling thread, polling this thread's
/// device channels while it waits.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    match with_waker(fut, None) {
        Some(v) => v,
        // Without a deadline `run` returns only with the future's output.
        None => unreachable!("block_on without a deadline gave up"),
    }
}

/// Runs `fut` on the calling thread as [`block_on`] does, but no later than
/// `deadline`: `None` when the deadline passed first (the future is then
/// dropped; see the module docs for why that is safe). A future that is
/// ready at its first poll is never refused, even past the deadline.
pub fn block_on_deadline<F: Future>(fut: F, deadline: Instant) -> Option<F::Output> {
    with_waker(fut, Some(deadline))
}

/// Longest sleep of a wait with a deadline between two polls of the
/// thread's channels: short enough that a completion is seen soon, long
/// enough that a stalled device does not keep the core busy.
const DEADLINE_NAP: Duration = Duration::from_micros(50);

fn with_waker<F: Future>(fut: F, deadline: Option<Instant>) -> Option<F::Output> {
    // The thread's waker is made once and reused by every (non-nested) call.
    let cached = WAKER.with(|w| w.borrow_mut().take());
    let tw = cached.unwrap_or_else(|| {
        Arc::new(ThreadWaker {
            thread: thread::current(),
            woken: AtomicBool::new(false),
        })
    });
    tw.woken.store(false, Ordering::Relaxed);
    let out = run(fut, &tw, deadline);
    // Clones the future left behind (in a waker it stored somewhere) may
    // still wake it later: that only costs the next call one extra poll.
    WAKER.with(|w| *w.borrow_mut() = Some(tw));
    out
}

thread_local! {
    static WAKER: RefCell<Option<Arc<ThreadWaker>>> = const { RefCell::new(None) };
    /// Moving average (1/8 weight per sample) of how long this thread's
    /// waits for I/O lasted, in nanoseconds.
    static AVG_WAIT_NS: Cell<u64> = const { Cell::new(0) };
}

/// Folds one wait of `ns` into the thread's average.
fn note_wait(ns: u64) {
    AVG_WAIT_NS.with(|a| a.set(a.get() - a.get() / 8 + ns / 8));
}

/// Polls `fut` to completion, or until `deadline` (then `None`).
fn run<F: Future>(fut: F, tw: &Arc<ThreadWaker>, deadline: Option<Instant>) -> Option<F::Output> {
    let waker = Waker::from(tw.clone());
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    let mut idle_spins = 0u32;
    // When this wait for I/O began (the first poll that found nothing).
    let mut idle_since: Option<Instant> = None;
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return Some(v);
        }
        if let Some(d) = deadline {
            let now = Instant::now();
            if now >= d {
                return None;
            }
            if tw.woken.swap(false, Ordering::Acquire) || poll_thread_channels() > 0 {
                idle_since = None;
                continue;
            }
            // Nothing moved: spin a little as block_on does, then nap,
            // never past the deadline (no sleep in the device, which could
            // outlast it).
            let since = *idle_since.get_or_insert(now);
            if thread_in_flight() > 0 && now - since < SPIN_BEFORE_BLOCK {
                std::hint::spin_loop();
                continue;
            }
            let nap = (d - now).min(DEADLINE_NAP);
            if thread_in_flight() > 0 {
                thread::sleep(nap);
            } else {
                thread::park_timeout(nap);
            }
            continue;
        }
        if tw.woken.swap(false, Ordering::Acquire) {
            idle_spins = 0;
            idle_since = None;
            continue;
        }
        if thread_in_flight() > 0 {
            if idle_since.is_none() && AVG_WAIT_NS.with(Cell::get) >= SLEEP_AT_ONCE_NS {
                // Slow I/O: submit and sleep in one call, no spin.
                let start = Instant::now();
                if wait_thread_channels() {
                    idle_since = Some(start);
                    idle_spins = 0;
                }
            }
            // Only polling completes our I/O: poll every channel of the
            // thread, so I/O submitted by other parts of the future progresses.
            if poll_thread_channels() > 0 {
                if let Some(start) = idle_since.take() {
                    note_wait(start.elapsed().as_nanos() as u64);
                } else {
                    note_wait(0);
                }
                idle_spins = 0;
                continue;
            }
            idle_spins += 1;
            if idle_spins.is_multiple_of(16) {
                let start = *idle_since.get_or_insert_with(Instant::now);
                if start.elapsed() >= SPIN_BEFORE_BLOCK {
                    // Sleep in the device until something completes; where
                    // that cannot be done, give the core away instead.
                    if !wait_thread_channels() {
                        thread::yield_now();
                    }
                    continue;
                }
            }
            std::hint::spin_loop();
            continue;
        }
        // Waiting on something another thread will wake (a lock, a message).
        thread::park_timeout(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{channel, BlockDevice, DmaBuf, Lba, MemDevice};
    use crate::testing::FaultDevice;

    #[test]
    fn a_deadline_gives_up_on_a_future_that_never_completes() {
        let start = Instant::now();
        let out = block_on_deadline(
            std::future::pending::<()>(),
            start + Duration::from_millis(30),
        );
        assert!(out.is_none());
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(30),
            "gave up early: {waited:?}"
        );
        // A ready future is never refused, even past its deadline.
        assert_eq!(block_on_deadline(async { 7 }, start), Some(7));
    }

    #[test]
    fn a_read_given_up_at_its_deadline_completes_later_and_frees_its_slot() {
        let mem: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20, 4096).unwrap());
        let fault = Arc::new(FaultDevice::new(mem).unwrap());
        let dev: Arc<dyn BlockDevice> = fault.clone();
        let ch = channel(&dev).unwrap();
        // A device whose completions show only after a million polls.
        fault.set_reap_delay(1_000_000);
        let before = thread_in_flight();
        let read = ch.read(Lba(0), DmaBuf::new(4096).unwrap());
        let start = Instant::now();
        let out = block_on_deadline(read, start + Duration::from_millis(20));
        assert!(out.is_none(), "the stalled read must time out");
        assert!(start.elapsed() < Duration::from_secs(5));
        // The read is still in flight, its buffer kept by the channel.
        assert_eq!(thread_in_flight(), before + 1);
        // Once the device answers, the next wait on this thread reaps it.
        fault.set_reap_delay(0);
        let buf = block_on(ch.read(Lba(1), DmaBuf::new(4096).unwrap())).unwrap();
        assert_eq!(buf.len(), 4096);
        while thread_in_flight() > before {
            poll_thread_channels();
        }
        // And a timed read of a device that answers returns its data.
        let got = block_on_deadline(
            ch.read(Lba(0), DmaBuf::new(4096).unwrap()),
            Instant::now() + Duration::from_secs(5),
        );
        assert!(matches!(got, Some(Ok(b)) if b.len() == 4096));
    }
}
