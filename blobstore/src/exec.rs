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
    // The thread's waker is made once and reused by every (non-nested) call.
    let cached = WAKER.with(|w| w.borrow_mut().take());
    let tw = cached.unwrap_or_else(|| {
        Arc::new(ThreadWaker {
            thread: thread::current(),
            woken: AtomicBool::new(false),
        })
    });
    tw.woken.store(false, Ordering::Relaxed);
    let out = run(fut, &tw);
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

fn run<F: Future>(fut: F, tw: &Arc<ThreadWaker>) -> F::Output {
    let waker = Waker::from(tw.clone());
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    let mut idle_spins = 0u32;
    // When this wait for I/O began (the first poll that found nothing).
    let mut idle_since: Option<Instant> = None;
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
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
