//! The set of reactors: [`Reactors`], started by a [`ReactorsBuilder`]
//! (placement, idle policy, drain timeout, thread names) and stopped by
//! [`Reactors::shutdown`] or on drop. Core affinity is in `cores.rs`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread;
use std::time::Duration;

use crossbeam_queue::SegQueue;

use super::handle::ReactorHandle;
use super::local::{reactor_main, Shared};
use super::{panic_text, IdlePolicy};
use crate::error::{Error, Result};

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
