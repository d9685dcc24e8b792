//! The calling thread's channels: [`channel`] finds, or opens on first use,
//! the thread's [`IoChannel`] to a device; [`poll_thread_channels`] and
//! [`wait_thread_channels`] drive every channel of the thread, as the
//! executors do.
//!
//! Invariants:
//! - One channel per thread and device, in a thread-local map: the data
//!   path's lookup takes no lock and allocates nothing.
//! - A channel leaves the map once its device is dropped and nothing is in
//!   flight on it, checked when the thread next opens a channel (so its fds
//!   and rings close).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::{Arc, Weak};

use super::channel::IoChannel;
use super::metrics::device_shards;
use super::{BlockDevice, DeviceId};
use crate::error::Result;

/// A thread's channels, with a weak link to each device so channels of
/// dropped devices can be closed. A thread talks to a handful of devices, so
/// a linear scan beats hashing; the channel list is shared as one `Rc` so
/// polling every channel allocates nothing. Const-initialised (no lazy
/// state to test on every access of the data path's lookup).
struct ChannelMap {
    ids: Vec<(DeviceId, Weak<dyn BlockDevice>)>,
    /// `None` until the thread's first channel; then one per `ids` entry.
    chans: Option<Rc<[IoChannel]>>,
}

thread_local! {
    static CHANNELS: RefCell<ChannelMap> = const {
        RefCell::new(ChannelMap {
            ids: Vec::new(),
            chans: None,
        })
    };
}

/// The calling thread's channel for `dev`, created on first use.
pub fn channel(dev: &Arc<dyn BlockDevice>) -> Result<IoChannel> {
    channel_with_id(dev, dev.id())
}

/// [`channel`] for a caller that knows `dev`'s id (`id == dev.id()`), as
/// the blob data path does: no virtual call on the way, and (inlined) no
/// `Result` to build when the thread has the channel already.
#[inline]
pub(crate) fn channel_with_id(dev: &Arc<dyn BlockDevice>, id: DeviceId) -> Result<IoChannel> {
    debug_assert_eq!(id, dev.id());
    match thread_channel(id) {
        Some(ch) => Ok(ch),
        None => new_channel(dev, id),
    }
}

/// The calling thread's channel to the device `id`, if it has one.
#[inline]
fn thread_channel(id: DeviceId) -> Option<IoChannel> {
    CHANNELS.with(|m| {
        let m = m.borrow();
        let k = m.ids.iter().position(|(i, _)| *i == id)?;
        m.chans.as_ref()?.get(k).cloned()
    })
}

#[cold]
fn new_channel(dev: &Arc<dyn BlockDevice>, id: DeviceId) -> Result<IoChannel> {
    let backend = dev.new_backend()?;
    let metrics = device_shards(dev, id).add();
    let ch = IoChannel::new(dev.geometry(), dev.name(), backend, metrics);
    CHANNELS.with(|m| {
        let mut guard = m.borrow_mut();
        let m = &mut *guard;
        // Drop channels of devices that are gone, so their fds and rings close.
        let mut ids = Vec::new();
        let mut chans = Vec::new();
        let old = m.chans.take();
        let old = old.as_deref().unwrap_or_default();
        for ((i, w), c) in m.ids.drain(..).zip(old.iter()) {
            if w.strong_count() > 0 || c.in_flight() > 0 {
                ids.push((i, w));
                chans.push(c.clone());
            }
        }
        ids.push((id, Arc::downgrade(dev)));
        chans.push(ch.clone());
        m.ids = ids;
        m.chans = Some(Rc::from(chans));
    });
    Ok(ch)
}

/// The thread's channels (a shared list: cloning it allocates nothing).
fn thread_channels() -> Option<Rc<[IoChannel]>> {
    CHANNELS.with(|m| m.borrow().chans.clone())
}

/// Drives every channel of this thread once; returns completions seen.
pub fn poll_thread_channels() -> usize {
    thread_channels().map_or(0, |chans| chans.iter().map(|c| c.poll()).sum())
}

/// Blocks until an operation of this thread completes, when that can be
/// done without missing anything: exactly one channel of the thread has
/// operations in flight and its backend can block. Returns false (at once)
/// otherwise; the caller then keeps polling.
pub fn wait_thread_channels() -> bool {
    let Some(chans) = thread_channels() else {
        return false;
    };
    let mut busy = chans.iter().filter(|c| c.in_flight() > 0);
    match (busy.next(), busy.next()) {
        (Some(c), None) => c.wait(),
        _ => false,
    }
}
