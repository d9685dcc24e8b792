//! [`IoChannel`], a thread's channel to one device, and [`IoFuture`], the
//! completion of one operation on it. An operation is checked against the
//! geometry, given a slot (its [`Tag`]) and handed to the device's
//! [`ChannelBackend`]; a poll reaps completions into their slots and wakes
//! the futures waiting on them.
//!
//! How the channel keeps the device layer's invariants (see the module docs
//! of [`crate::device`]):
//! - A slot in flight holds its operation, and so the operation's buffers,
//!   until the backend reports it; a future dropped before that marks its
//!   slot abandoned, and the poll that reaps it frees the slot.
//! - `IoChannel::check` runs before the backend sees an operation; one it
//!   refuses takes no slot and its future yields the error.
//! - Only [`IoChannel::poll`] reaps, called by a pending [`IoFuture`] being
//!   polled or by the thread's executors.
//! - [`thread_in_flight`] counts the operations in flight on all of the
//!   thread's channels: one more per submission, one less per completion
//!   reaped.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use super::metrics::DeviceShard;
use super::{ChannelBackend, DmaBuf, Geometry, IoKind, IoOp, Lba, Segments, Tag};
use crate::error::{Error, Result};
use crate::metrics::Stamp;

thread_local! {
    static IN_FLIGHT: Cell<usize> = const { Cell::new(0) };
}

/// Operations submitted on this thread's channels that have not completed.
/// Executors use it to decide between spinning (I/O is pending and only
/// polling completes it) and sleeping.
pub fn thread_in_flight() -> usize {
    IN_FLIGHT.with(|c| c.get())
}

enum Slot {
    Free {
        next: Option<Tag>,
    },
    InFlight {
        /// Held so the op's buffers outlive the device's use of them.
        op: IoOp,
        waker: Option<Waker>,
        abandoned: bool,
        /// When it was submitted.
        start: Stamp,
    },
    Done {
        result: Result<()>,
    },
}

struct ChannelState {
    backend: Box<dyn ChannelBackend>,
    slots: Vec<Slot>,
    free_head: Option<Tag>,
    in_flight: usize,
    /// Wakers of futures completed by a poll, woken after it (kept between
    /// polls so waking allocates nothing).
    wakers: Vec<Waker>,
}

struct ChannelInner {
    geometry: Geometry,
    name: String,
    state: RefCell<ChannelState>,
    /// This channel's shard of the device's counters.
    metrics: Arc<DeviceShard>,
}

/// A thread's channel to one device. Cheap to clone; not `Send`.
#[derive(Clone)]
pub struct IoChannel(Rc<ChannelInner>);

impl IoChannel {
    pub(super) fn new(
        geometry: Geometry,
        name: String,
        backend: Box<dyn ChannelBackend>,
        metrics: Arc<DeviceShard>,
    ) -> IoChannel {
        IoChannel(Rc::new(ChannelInner {
            geometry,
            name,
            metrics,
            state: RefCell::new(ChannelState {
                backend,
                slots: Vec::new(),
                free_head: None,
                in_flight: 0,
                wakers: Vec::new(),
            }),
        }))
    }

    /// The device's geometry.
    pub fn geometry(&self) -> Geometry {
        self.0.geometry
    }

    /// Operations submitted and not yet completed on this channel.
    pub fn in_flight(&self) -> usize {
        self.0.state.borrow().in_flight
    }

    /// Reaps completions and wakes their futures; returns how many.
    pub fn poll(&self) -> usize {
        let mut guard = self.0.state.borrow_mut();
        let st = &mut *guard;
        let slots = &mut st.slots;
        let free_head = &mut st.free_head;
        let mut wakers = std::mem::take(&mut st.wakers);
        let name = &self.0.name;
        let metrics = &self.0.metrics;
        let n = st.backend.reap(&mut |tag, result| {
            if let Err(e) = &result {
                tracing::warn!(device = %name, error = %e, "device I/O failed");
            }
            let Some(slot) = slots.get_mut(tag as usize) else {
                debug_assert!(false, "completion for unknown tag {tag}");
                return;
            };
            let ok = result.is_ok();
            match std::mem::replace(slot, Slot::Done { result }) {
                Slot::InFlight {
                    op,
                    waker,
                    abandoned,
                    start,
                } => {
                    let bytes = op.blocks * u64::from(self.0.geometry.block_size);
                    metrics.op(op.kind).record(start, bytes, ok);
                    if abandoned {
                        *slot = Slot::Free { next: *free_head };
                        *free_head = Some(tag);
                    } else if let Some(w) = waker {
                        wakers.push(w);
                    }
                }
                other => {
                    debug_assert!(false, "completion for a slot not in flight");
                    *slot = other;
                }
            }
        });
        st.in_flight -= n;
        if n > 0 {
            IN_FLIGHT.with(|c| c.set(c.get() - n));
        }
        if wakers.is_empty() {
            st.wakers = wakers;
            return n;
        }
        drop(guard);
        for w in wakers.drain(..) {
            w.wake();
        }
        // A waker may have polled this channel again (and put a list back).
        if let Ok(mut st) = self.0.state.try_borrow_mut() {
            if st.wakers.capacity() < wakers.capacity() {
                st.wakers = wakers;
            }
        }
        n
    }

    /// Blocks until an operation completes (see [`ChannelBackend::wait`]);
    /// false when the backend cannot block.
    pub(super) fn wait(&self) -> bool {
        let Ok(mut st) = self.0.state.try_borrow_mut() else {
            return false;
        };
        st.in_flight > 0 && st.backend.wait()
    }

    /// Ok when the operation fits the geometry; the error is built out of
    /// line (the data path only tests).
    #[inline(always)]
    fn check(&self, kind: IoKind, lba: Lba, blocks: u64, bytes: usize) -> Result<()> {
        let g = self.0.geometry;
        let in_range = lba
            .get()
            .checked_add(blocks)
            .is_some_and(|e| e <= g.block_count);
        let sized = if matches!(kind, IoKind::Read | IoKind::Write) {
            bytes != 0 && bytes.is_multiple_of(g.block_size as usize)
        } else {
            kind == IoKind::Flush || blocks != 0
        };
        if in_range && sized {
            return Ok(());
        }
        Err(self.refusal(kind, lba, blocks, bytes))
    }

    /// Why [`IoChannel::check`] refused an operation.
    #[cold]
    fn refusal(&self, kind: IoKind, lba: Lba, blocks: u64, bytes: usize) -> Error {
        let g = self.0.geometry;
        if lba
            .get()
            .checked_add(blocks)
            .is_none_or(|e| e > g.block_count)
        {
            return Error::OutOfRange {
                what: format!("{} on device {}", kind.name(), self.0.name),
                offset: lba.get(),
                len: blocks,
                size: g.block_count,
            };
        }
        if matches!(kind, IoKind::Read | IoKind::Write) {
            return Error::InvalidArgument(format!(
                "{} of {bytes} bytes is not a positive multiple of the block size {}",
                kind.name(),
                g.block_size
            ));
        }
        Error::InvalidArgument(format!("{} of 0 blocks", kind.name()))
    }

    /// Starts a checked operation and returns the future for its completion.
    pub(crate) fn submit(&self, op: IoOp) -> IoFuture {
        match self.start(op) {
            Ok(tag) => IoFuture {
                chan: Some(self.clone()),
                tag,
                early: None,
            },
            Err(e) => IoFuture::failed(e),
        }
    }

    /// [`IoChannel::submit`] by a caller that hands over its reference to
    /// the channel (the future keeps it): no reference count taken and
    /// dropped again.
    #[inline(always)]
    pub(crate) fn submit_owned(self, op: IoOp) -> IoFuture {
        match self.start(op) {
            Ok(tag) => IoFuture {
                chan: Some(self),
                tag,
                early: None,
            },
            Err(e) => IoFuture::failed(e),
        }
    }

    /// Checks `op`, takes a slot for it and hands it to the backend;
    /// returns its tag.
    #[inline(always)]
    fn start(&self, op: IoOp) -> Result<Tag> {
        let bytes: usize = op.segs.iter().map(|s| s.len()).sum();
        let blocks = if matches!(op.kind, IoKind::Read | IoKind::Write) {
            (bytes / self.0.geometry.block_size as usize) as u64
        } else {
            op.blocks
        };
        self.check(op.kind, op.lba, blocks, bytes)?;
        let op = IoOp { blocks, ..op };
        let mut st = self.0.state.borrow_mut();
        let tag = match st.free_head {
            Some(t) => {
                st.free_head = match st.slots[t as usize] {
                    Slot::Free { next } => next,
                    _ => unreachable!("free list holds a busy slot"),
                };
                t
            }
            None => {
                st.slots.push(Slot::Free { next: None });
                (st.slots.len() - 1) as Tag
            }
        };
        let start = Stamp::now();
        if let Err(e) = st.backend.submit(tag, &op) {
            st.slots[tag as usize] = Slot::Free { next: st.free_head };
            st.free_head = Some(tag);
            return Err(e);
        }
        st.slots[tag as usize] = Slot::InFlight {
            op,
            waker: None,
            abandoned: false,
            start,
        };
        st.in_flight += 1;
        IN_FLIGHT.with(|c| c.set(c.get() + 1));
        Ok(tag)
    }

    /// The segments of `bufs`, one whole buffer each.
    #[inline]
    fn buf_segments(bufs: &[DmaBuf]) -> Segments {
        match bufs {
            // The data path's case: no iterator to collect.
            [b] => Segments::one(b.segment(0, b.len())),
            _ => bufs.iter().map(|b| b.segment(0, b.len())).collect(),
        }
    }

    pub(crate) fn submit_bufs(&self, kind: IoKind, lba: Lba, bufs: &[DmaBuf]) -> IoFuture {
        self.submit(IoOp {
            kind,
            lba,
            blocks: 0,
            segs: Self::buf_segments(bufs),
        })
    }

    /// [`IoChannel::submit_bufs`] of one buffer, handing over the channel
    /// reference ([`IoChannel::submit_owned`]).
    pub(crate) fn submit_buf_owned(self, kind: IoKind, lba: Lba, buf: &DmaBuf) -> IoFuture {
        self.submit_owned(IoOp {
            kind,
            lba,
            blocks: 0,
            segs: Segments::one(buf.segment(0, buf.len())),
        })
    }

    /// Reads `buf.len()` bytes starting at block `lba` into `buf`.
    pub async fn read(&self, lba: Lba, buf: DmaBuf) -> Result<DmaBuf> {
        let bufs = [buf];
        self.submit_bufs(IoKind::Read, lba, &bufs).await?;
        let [buf] = bufs;
        Ok(buf)
    }

    /// Writes `buf` to the blocks starting at `lba`.
    pub async fn write(&self, lba: Lba, buf: DmaBuf) -> Result<DmaBuf> {
        let bufs = [buf];
        self.submit_bufs(IoKind::Write, lba, &bufs).await?;
        let [buf] = bufs;
        Ok(buf)
    }

    /// Reads consecutive blocks starting at `lba` into `bufs`, in order.
    pub async fn readv(&self, lba: Lba, bufs: Vec<DmaBuf>) -> Result<Vec<DmaBuf>> {
        self.submit_bufs(IoKind::Read, lba, &bufs).await?;
        Ok(bufs)
    }

    /// Writes `bufs`, in order, to consecutive blocks starting at `lba`.
    pub async fn writev(&self, lba: Lba, bufs: Vec<DmaBuf>) -> Result<Vec<DmaBuf>> {
        self.submit_bufs(IoKind::Write, lba, &bufs).await?;
        Ok(bufs)
    }

    /// Makes every write completed before this call durable.
    pub fn flush(&self) -> IoFuture {
        self.submit(IoOp {
            kind: IoKind::Flush,
            lba: Lba(0),
            blocks: 0,
            segs: Segments::none(),
        })
    }

    /// Deallocates `blocks` blocks at `lba` (reads back zeroes when the
    /// geometry says `unmap_reads_zeroes`).
    pub fn unmap(&self, lba: Lba, blocks: u64) -> IoFuture {
        self.submit(IoOp {
            kind: IoKind::Unmap,
            lba,
            blocks,
            segs: Segments::none(),
        })
    }

    /// Sets `blocks` blocks at `lba` to zero.
    pub fn write_zeroes(&self, lba: Lba, blocks: u64) -> IoFuture {
        self.submit(IoOp {
            kind: IoKind::WriteZeroes,
            lba,
            blocks,
            segs: Segments::none(),
        })
    }
}

/// Completion of one device operation. Polling it polls its channel.
#[must_use = "an I/O future does nothing useful unless awaited"]
pub struct IoFuture {
    chan: Option<IoChannel>,
    tag: Tag,
    /// An error found before submission (boxed: the future stays small,
    /// and it is moved by every executor).
    early: Option<Box<Error>>,
}

impl IoFuture {
    /// A future that yields `e` (an operation refused before submission).
    pub(crate) fn failed(e: Error) -> IoFuture {
        IoFuture {
            chan: None,
            tag: 0,
            early: Some(Box::new(e)),
        }
    }
}

impl Future for IoFuture {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let Some(chan) = self.chan.clone() else {
            return Poll::Ready(match self.early.take() {
                Some(e) => Err(*e),
                None => Err(Error::Shutdown("I/O future polled after completion".into())),
            });
        };
        chan.poll();
        let mut st = chan.0.state.borrow_mut();
        let st = &mut *st;
        let tag = self.tag;
        let slot = &mut st.slots[tag as usize];
        match slot {
            Slot::InFlight { waker, .. } => {
                if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    *waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Slot::Done { .. } => {
                let Slot::Done { result } =
                    std::mem::replace(slot, Slot::Free { next: st.free_head })
                else {
                    unreachable!()
                };
                st.free_head = Some(tag);
                drop(self.chan.take());
                Poll::Ready(result)
            }
            Slot::Free { .. } => Poll::Ready(Err(Error::Shutdown("I/O slot lost".into()))),
        }
    }
}

impl Drop for IoFuture {
    fn drop(&mut self) {
        let Some(chan) = self.chan.take() else { return };
        let mut st = chan.0.state.borrow_mut();
        let st = &mut *st;
        let slot = &mut st.slots[self.tag as usize];
        match slot {
            Slot::InFlight { abandoned, .. } => *abandoned = true,
            Slot::Done { .. } => {
                *slot = Slot::Free { next: st.free_head };
                st.free_head = Some(self.tag);
            }
            Slot::Free { .. } => {}
        }
    }
}
