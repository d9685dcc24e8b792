//! Per-core reactors, in the line of SPDK's: one thread per core runs a loop
//! that polls its device channels and pollers, runs the messages other
//! threads send it, and runs its ready tasks. It is how one thread keeps many
//! I/Os in flight. Plain [`crate::block_on`] keeps working on any thread.
//!
//! Invariant:
//! - A reactor's tasks, pollers and I/O channels live on its thread only; they
//!   may be `!Send`. Other threads reach a reactor only through its message
//!   queue and through task wakers.
//!
//! The parts, one module each:
//! - `local`: one reactor's thread side: its thread body, the loop itself
//!   (tasks, pollers, messages, idling and shutdown), and the lock-free state
//!   other threads reach it through.
//! - `handle`: [`ReactorHandle`] for other threads, the functions for code
//!   running on a reactor ([`current`], [`spawn_local`], the local pollers)
//!   and [`JoinHandle`].
//! - `set`: [`Reactors`], started by a [`ReactorsBuilder`] (placement,
//!   idle policy, shutdown).
//! - `cores`: [`allowed_cores`] and pinning a thread to a core.
//!
//! They depend one way: `handle` uses `local`, `set` uses `local` and
//! `handle`, and `local` uses `cores`.
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

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

mod cores;
mod handle;
mod local;
mod set;
#[cfg(test)]
mod tests;

pub use cores::allowed_cores;
pub use handle::{
    current, register_local_poller, spawn_local, unregister_local_poller, JoinHandle, ReactorHandle,
};
pub use set::{Reactors, ReactorsBuilder};

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
    /// device until one of the thread's operations completes (an NVMe
    /// queue's completion interrupt, io_uring's wait); with nothing in flight, sleep as [`IdlePolicy::Sleep`] does with
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

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
