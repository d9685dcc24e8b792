//! Driving futures on the calling thread.
//!
//! [`block_on`] is the plain way to run any future of this crate: it polls
//! the future, and while the thread has device I/O in flight it keeps polling
//! (only polling completes I/O); with nothing in flight it parks until woken.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::Duration;

use crate::device::{poll_thread_channels, thread_in_flight};

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

/// Runs `fut` to completion on the calling thread, polling this thread's
/// device channels while it waits.
pub fn block_on<F: Future>(fut: F) -> F::Output {
    let tw = Arc::new(ThreadWaker {
        thread: thread::current(),
        woken: AtomicBool::new(false),
    });
    let waker = Waker::from(tw.clone());
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    let mut idle_spins = 0u32;
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        if tw.woken.swap(false, Ordering::Acquire) {
            idle_spins = 0;
            continue;
        }
        if thread_in_flight() > 0 {
            // Only polling completes our I/O: poll every channel of the
            // thread, so I/O submitted by other parts of the future progresses.
            if poll_thread_channels() == 0 {
                idle_spins += 1;
                if idle_spins.is_multiple_of(64) {
                    thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
            continue;
        }
        // Waiting on something another thread will wake (a lock, a message).
        thread::park_timeout(Duration::from_millis(1));
    }
}
