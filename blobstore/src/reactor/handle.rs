//! Reaching a reactor: [`ReactorHandle`] from any thread, the functions for
//! code running on a reactor thread ([`current`], [`spawn_local`],
//! [`register_local_poller`], [`unregister_local_poller`]), and
//! [`JoinHandle`], a task's output. A join handle resolves exactly once.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::channel::oneshot;
use futures::FutureExt;

use super::local::{current_local, Shared};
use super::{panic_text, LocalFuture, PollerId};
use crate::error::{Error, Result};

/// A reactor, from any thread: send it messages, spawn tasks on it, register
/// pollers. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct ReactorHandle {
    pub(super) shared: Arc<Shared>,
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
    /// Position of this reactor in its [`Reactors`](super::Reactors) (0-based).
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
