//! Files: the node every handle of one file shares, its write buffer, and
//! the read path through the cache.
//!
//! Invariants:
//! - `len` is the file's length as readers see it; `flushed` <= `len`, and
//!   every byte below `flushed` is on the blob. Bytes in `[flushed, len)` live
//!   in the write buffer, which starts at the block-aligned `buf_start ==
//!   flushed`.
//! - Bytes of the blob at or past `len` are never read: every read is
//!   clamped to `len`, and every byte below `len` was written by this file
//!   (appends, positional writes, or the zeroes a growing truncate writes).
//!   That is why new clusters need no zeroing (`Blob::resize_uninit`), and
//!   why no file ever shows bytes of another. A padded tail block is zeroed
//!   past the used part before it is written.
//! - Write-behind: a full append buffer goes to the file system's writer
//!   thread while appends go on into a second buffer (as the page cache
//!   writes back behind a writer); at most one such write per file is in
//!   flight, and its range is in `behind`. No blob read overlaps that range
//!   until the write has landed, and every sync, truncate, rewrite below
//!   the buffer, and blob delete waits for it first; its failure is
//!   reported by the next write or sync (the bytes are lost). The hand-off
//!   stays because a file may be appended on one thread and synced on
//!   another, and an `IoChannel` cannot leave its thread: the writer thread
//!   owns the one channel that writes every file's full buffers, one write
//!   per file at a time. Those waits are futures the writer wakes: no
//!   async function blocks its thread on the writer (the one plain caller,
//!   `read_direct_into`, parks its thread; see [`Behind`]). Against the
//!   `Condvar` waits they replaced (kvbench `memory`, BlobFS ops/s, 3
//!   alternating rounds on an otherwise idle machine, 2026-12-07): 1.01x
//!   on readwrite and 1.02x on overwrite, within one build's spread (the
//!   Condvar build's readwrite ranged 56.6k to 71.5k ops/s). An earlier
//!   form of these futures measured 0.72x on readwrite in 2 rounds; this
//!   one differs in that a read takes no lock when no write is in flight
//!   (an atomic `busy` flag) and `read_direct_into` parks instead of
//!   entering `block_on`. RocksDB there waits on the writer at most a few
//!   times a second, and no read found a write in flight.
//! - After `sync` returns, the blob holds every byte below `len` and its
//!   metadata holds `len`, both durable.
//! - Appends copy the caller's bytes once, into DMA memory, and reach the
//!   device in block-aligned chunks of `WRITE_CHUNK` bytes.
//! - Append buffers are slots of the mount's unsynced memory
//!   (`unsynced.rs`), and each one's header describes the file bytes it
//!   holds once an append returns. Every byte below `len` is in such a
//!   buffer or on the blob under durable metadata: a write behind the
//!   appender keeps its slot's header until its bytes and their clusters
//!   are durable (`land_behind`); a spill, a write below the buffer and a
//!   truncate make the blob's state durable before a buffer lets bytes go.
//!   So a killed process loses nothing an append returned for.

use crate::metrics::FsShard;
use blobstore::metrics::{Shards, Stamp};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, Wake, Waker};
use std::time::Duration;

use blobstore::{Blob, DmaBuf};
use parking_lot::{Mutex, RwLock};

use crate::error::{Context, Error, Result};
use crate::fs::FsInner;
use crate::meta;
use crate::unsynced::Unsynced;

/// Appends are written to the device in chunks of this many bytes.
pub const WRITE_CHUNK: usize = 4 << 20;
/// Largest readahead window.
pub const MAX_READAHEAD: u64 = 1 << 20;

pub(crate) struct WriteState {
    /// Buffer of `WRITE_CHUNK + 2 units` bytes, holding file bytes from `buf_start`.
    buf: Option<DmaBuf>,
    used: usize,
    buf_start: u64,
    /// Bytes at the start of the buffer (block-aligned) that are on the
    /// blob as they are in the buffer: a sync writes only what follows, so
    /// a WAL synced after every record writes its new tail, not the whole
    /// buffer again.
    clean: usize,
    /// Reused DMA memory for writing a part of the buffer that does not
    /// start at its beginning.
    scratch: Option<DmaBuf>,
    synced_len: u64,
    /// Length or mtime changed since the last metadata sync.
    md_dirty: bool,
    /// Data reached the blob since the last device flush.
    data_dirty: bool,
    /// Set when a buffer write failed and unsynced bytes were lost.
    failed: Option<String>,
}

/// The write-behind state of one file: which bytes are on their way to the
/// blob, and how the last such write ended.
///
/// Its waits are futures the writer thread wakes when the write ends: an
/// async caller yields its thread (to its reactor, or to `block_on`, which
/// parks it when it has no I/O of its own in flight) instead of blocking
/// it. A plain caller parks on [`Behind::clear_blocking`]. Waiting or not,
/// each check is one lock of `state` (as the `Condvar` it replaces), except
/// the common one of a read when no write is in flight: one load of `busy`.
#[derive(Default)]
pub(crate) struct Behind {
    state: Mutex<BehindState>,
    /// `state.range.is_some()`, written under the lock, so a read that
    /// finds no write in flight need not take it.
    busy: AtomicBool,
}

#[derive(Default)]
struct BehindState {
    /// File bytes `[from, to)` whose write is in flight.
    range: Option<(u64, u64)>,
    /// The last write's outcome: its buffer back, or why it failed.
    done: Option<std::result::Result<DmaBuf, String>>,
    /// What to wake when the write in flight ends: each waiting task once.
    waiters: Vec<Waker>,
}

/// A wait's outcome: the last write's, taken by [`Behind::idle`].
type Outcome = Option<std::result::Result<DmaBuf, String>>;

/// Wakes a thread parked in [`Behind::clear_blocking`].
struct Unpark(std::thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

impl Behind {
    fn start(&self, from: u64, to: u64) {
        let mut s = self.state.lock();
        debug_assert!(s.range.is_none(), "one write-behind per file at a time");
        s.range = Some((from, to));
        self.busy.store(true, Ordering::Release);
    }

    /// Records how the write ended and wakes whoever waits for it.
    pub fn finish(&self, outcome: std::result::Result<DmaBuf, String>) {
        let waiters = {
            let mut s = self.state.lock();
            s.range = None;
            s.done = Some(outcome);
            self.busy.store(false, Ordering::Release);
            std::mem::take(&mut s.waiters)
        };
        // Outside the lock: a woken task may run (and lock) at once.
        waiters.into_iter().for_each(Waker::wake);
    }

    /// `Ready` with `done(state)` once it gives a value; until then `cx`'s
    /// task is among the waiters the end of the write in flight wakes.
    fn poll_until<T>(
        &self,
        cx: &mut TaskContext<'_>,
        done: impl FnOnce(&mut BehindState) -> Option<T>,
    ) -> Poll<T> {
        let mut s = self.state.lock();
        if let Some(v) = done(&mut s) {
            return Poll::Ready(v);
        }
        debug_assert!(s.range.is_some(), "a wait only for a write in flight");
        if !s.waiters.iter().any(|w| w.will_wake(cx.waker())) {
            s.waiters.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Waits until no write is in flight; returns the last one's outcome
    /// (once).
    pub async fn idle(&self) -> Outcome {
        self.idle_timed().await.1
    }

    /// [`Behind::idle`], saying whether it had to wait.
    async fn idle_timed(&self) -> (bool, Outcome) {
        let mut waited = false;
        std::future::poll_fn(|cx| {
            let r = self.poll_until(cx, |s| s.range.is_none().then(|| s.done.take()));
            waited |= r.is_pending();
            r.map(|outcome| (waited, outcome))
        })
        .await
    }

    /// True when no write is in flight and no outcome waits to be taken.
    fn is_quiet(&self) -> bool {
        let s = self.state.lock();
        s.range.is_none() && s.done.is_none()
    }

    /// Whether `s`'s write in flight, if any, keeps off `[from, to)`.
    fn clear_of(s: &BehindState, from: u64, to: u64) -> bool {
        !s.range.is_some_and(|(a, b)| a < to && from < b)
    }

    /// Waits until the write in flight, if any, does not overlap `[from, to)`.
    async fn clear(&self, from: u64, to: u64) {
        // `busy` read without the lock orders as the lock would: a write
        // the caller can know of (it loaded `flushed` or the generation, or
        // took the write state, after `spill` moved them, and `spill`
        // starts the write first) shows here; one it cannot know of leaves
        // the bytes it returns as they were.
        if !self.busy.load(Ordering::Acquire) {
            return;
        }
        std::future::poll_fn(|cx| {
            self.poll_until(cx, |s| Self::clear_of(s, from, to).then_some(()))
        })
        .await
    }

    /// [`Behind::clear`] for a plain (not async) caller: parks the thread
    /// until the writer wakes it. Not `block_on`: that would spin while the
    /// thread has device reads of its own in flight, on a wait for another
    /// thread's write.
    fn clear_blocking(&self, from: u64, to: u64) {
        if !self.busy.load(Ordering::Acquire) {
            return;
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = TaskContext::from_waker(&waker);
        while self
            .poll_until(&mut cx, |s| Self::clear_of(s, from, to).then_some(()))
            .is_pending()
        {
            // A stray unpark only costs another look.
            std::thread::park();
        }
    }
}

pub(crate) struct FileNode {
    pub blob: Blob,
    pub behind: Arc<Behind>,
    pub name: RwLock<String>,
    pub len: AtomicU64,
    pub flushed: AtomicU64,
    pub mtime: AtomicU64,
    pub gen: AtomicU64,
    pub handles: AtomicUsize,
    pub unlinked: AtomicBool,
    pub state: futures::lock::Mutex<WriteState>,
    unit: u64,
    cluster: u64,
    cache_id: u64,
}

impl FileNode {
    pub fn new(blob: Blob, name: String, len: u64, mtime: u64, cluster: u64) -> FileNode {
        let unit = blob.io_unit_size() as u64;
        let start = len / unit * unit;
        FileNode {
            blob,
            behind: Arc::default(),
            name: RwLock::new(name),
            len: AtomicU64::new(len),
            flushed: AtomicU64::new(start),
            mtime: AtomicU64::new(mtime),
            gen: AtomicU64::new(0),
            handles: AtomicUsize::new(0),
            unlinked: AtomicBool::new(false),
            state: futures::lock::Mutex::new(WriteState {
                buf: None,
                used: (len - start) as usize,
                buf_start: start,
                clean: 0,
                scratch: None,
                synced_len: len,
                md_dirty: false,
                data_dirty: false,
                failed: None,
            }),
            unit,
            cluster,
            cache_id: {
                static NEXT: AtomicU64 = AtomicU64::new(1);
                NEXT.fetch_add(1, Ordering::Relaxed)
            },
        }
    }

    /// This node's key in the read cache: unique for the life of the
    /// process, so a new file never meets chunks of a deleted one that had
    /// the same blob id.
    pub fn id(&self) -> u64 {
        self.cache_id
    }

    pub fn name(&self) -> String {
        self.name.read().clone()
    }

    fn align_down(&self, v: u64) -> u64 {
        v / self.unit * self.unit
    }

    fn align_up(&self, v: u64) -> u64 {
        v.div_ceil(self.unit) * self.unit
    }

    /// Loads the buffer (and the partial block at `buf_start`) on first use.
    async fn buffer<'a>(&self, st: &'a mut WriteState, fs: &FsInner) -> Result<&'a mut DmaBuf> {
        if st.buf.is_none() {
            let mut b = fs.append_buf(WRITE_CHUNK + 2 * self.unit as usize)?;
            if st.used > 0 {
                let unit = DmaBuf::new(self.unit as usize).ctx(&self.name())?;
                let unit = self
                    .blob
                    .read(st.buf_start / self.unit, unit)
                    .await
                    .ctx(&self.name())?;
                b[..st.used].copy_from_slice(&unit[..st.used]);
            }
            st.buf = Some(b);
            st.clean = 0;
        }
        Ok(st.buf.as_mut().expect("just set"))
    }

    /// Grows the blob to hold `end` bytes.
    async fn ensure_capacity(&self, end: u64) -> Result<()> {
        if end <= self.blob.size_bytes() {
            return Ok(());
        }
        self.blob
            .resize_uninit(end.div_ceil(self.cluster))
            .await
            .ctx(&self.name())
    }

    fn check_failed(&self, st: &WriteState) -> Result<()> {
        match &st.failed {
            Some(reason) => Err(Error::WriteLost(self.name(), reason.clone())),
            None => Ok(()),
        }
    }

    /// Puts `[0, n)` of the buffer (n block-aligned) on the blob at
    /// `buf_start`, writing only what follows its clean prefix.
    async fn write_buffer(&self, st: &mut WriteState, n: usize, fs: &FsInner) -> Result<()> {
        debug_assert!((n as u64).is_multiple_of(self.unit));
        debug_assert!((st.clean as u64).is_multiple_of(self.unit));
        let skip = st.clean.min(n);
        if skip == n {
            return Ok(());
        }
        if n > st.used {
            // The padded tail block: zeroes past the file's bytes.
            let used = st.used;
            st.buf.as_mut().expect("buffer loaded")[used..n].fill(0);
        }
        self.ensure_capacity(st.buf_start + n as u64).await?;
        if skip > 0 {
            self.write_buffer_part(st, skip, n).await?;
        } else {
            self.write_buffer_whole(st, n).await?;
        }
        st.clean = n.min(self.align_down(st.used as u64) as usize);
        st.data_dirty = true;
        let (from, to) = (st.buf_start + skip as u64, st.buf_start + n as u64);
        let buf = st.buf.as_ref().expect("buffer restored");
        self.cache_written(fs, from, to, buf, st.buf_start);
        Ok(())
    }

    /// Tells the cache that file bytes `[from, to)` now are `buf`'s (which
    /// holds file bytes from `base`). Write-through: whole cache chunks the
    /// range covers go to the cache in place of what it held, so reading
    /// back what was just written costs no I/O; only the partly written
    /// chunks at the edges are dropped. Call with the write lock held.
    fn cache_written(&self, fs: &FsInner, from: u64, to: u64, buf: &[u8], base: u64) {
        let cb = fs.cache.chunk_bytes() as u64;
        let (full_from, full_to) = (from.div_ceil(cb) * cb, to / cb * cb);
        if !fs.cache.enabled() || full_from >= full_to {
            fs.invalidate(self, from, to);
            return;
        }
        fs.invalidate(self, from, full_from);
        fs.invalidate(self, full_to, to);
        for idx in full_from / cb..full_to / cb {
            let s = (idx * cb - base) as usize;
            match fs.cache.chunk(&buf[s..s + cb as usize]) {
                Some(chunk) => fs.cache.put(self.id(), idx, chunk),
                None => fs.invalidate(self, idx * cb, (idx + 1) * cb),
            }
        }
    }

    /// Waits for this file's write-behind, if one is in flight; returns its
    /// buffer for reuse, or marks the file failed (the bytes are lost) and
    /// reports it.
    async fn settle(&self, st: &mut WriteState, fs: &FsInner) -> Result<Option<DmaBuf>> {
        let start = Stamp::now();
        let (waited, outcome) = self.behind.idle_timed().await;
        if waited {
            fs.metrics.with(|m| m.stall.record(start, 0, true));
        }
        match outcome {
            Some(Ok(buf)) => Ok(Some(buf)),
            Some(Err(reason)) => {
                st.failed = Some(reason);
                self.check_failed(st).map(|_| None)
            }
            None => Ok(None),
        }
    }

    /// [`FileNode::settle`], giving the written buffer back (its slot of
    /// unsynced memory, pages kept, serves the next buffer).
    async fn settle_into(&self, st: &mut WriteState, fs: &FsInner) -> Result<()> {
        if let Some(buf) = self.settle(st, fs).await? {
            fs.give_back_buf(buf);
        }
        Ok(())
    }

    /// After a sync by the file's last writer: gives its append buffer back
    /// (see [`FileNode::settle_into`]), leaving the state a mount leaves (the
    /// partial last block on the blob, loaded again by the next append).
    /// Does nothing unless every byte is on the blob and synced.
    pub async fn release_buffer(&self, fs: &FsInner) {
        let mut st = self.state.lock().await;
        let synced = st.failed.is_none()
            && !st.md_dirty
            && !st.data_dirty
            && self.len.load(Ordering::Acquire) == st.synced_len
            && st.buf_start + st.used as u64 == st.synced_len;
        if synced && self.behind.is_quiet() {
            if let Some(buf) = st.buf.take() {
                fs.give_back_buf(buf);
                // As a mount leaves it: the buffer starts at the last block.
                st.buf_start = self.align_down(st.synced_len);
                st.used = (st.synced_len - st.buf_start) as usize;
                st.clean = 0;
                self.flushed.store(st.buf_start, Ordering::Release);
            }
        }
    }

    /// Writes `[from, to)` of the buffer through the scratch buffer; the
    /// buffer itself stays, so a failure loses nothing.
    async fn write_buffer_part(&self, st: &mut WriteState, from: usize, to: usize) -> Result<()> {
        let len = to - from;
        let mut scratch = match st.scratch.take() {
            Some(b) if b.capacity() >= len => b,
            _ => DmaBuf::new(len).ctx(&self.name())?,
        };
        scratch.set_len(len).ctx(&self.name())?;
        let buf = st.buf.as_ref().expect("buffer loaded");
        scratch.copy_from_slice(&buf[from..to]);
        let at = (st.buf_start + from as u64) / self.unit;
        let scratch = self.blob.write(at, scratch).await.ctx(&self.name())?;
        st.scratch = Some(scratch);
        Ok(())
    }

    /// Writes `[0, n)` of the buffer, lending the buffer itself to the I/O.
    async fn write_buffer_whole(&self, st: &mut WriteState, n: usize) -> Result<()> {
        let mut buf = st.buf.take().expect("buffer loaded");
        let cap = buf.len();
        buf.set_len(n).ctx(&self.name())?;
        let res = self.blob.write(st.buf_start / self.unit, buf).await;
        let mut buf = match res {
            Ok(b) => b,
            Err(e) => {
                // The buffer went with the failed write, and with it bytes
                // held nowhere else: every later write or sync reports the
                // loss (as fsync does on Linux) until the file is truncated.
                st.buf = None;
                st.clean = 0;
                st.failed = Some(e.to_string());
                return Err(Error::store(&self.name(), e));
            }
        };
        buf.set_len(cap).ctx(&self.name())?;
        st.buf = Some(buf);
        Ok(())
    }

    /// Writes out every full block of the buffer and goes on with the rest:
    /// behind the writer (on the file system's writer thread) when the
    /// buffer holds nothing already on the blob, else here.
    async fn spill(self: &Arc<Self>, st: &mut WriteState, fs: &FsInner) -> Result<()> {
        let full = st.used / self.unit as usize * self.unit as usize;
        if full == 0 {
            return Ok(());
        }
        let cap = WRITE_CHUNK + 2 * self.unit as usize;
        if st.clean > 0 {
            self.write_buffer(st, full, fs).await?;
            // Those bytes leave the buffer (and its unsynced memory): the
            // clusters under them must be durable first.
            self.persist_clusters().await?;
            let mut next = fs.append_buf(cap)?;
            let tail = st.used - full;
            let old = st.buf.take().expect("buffer loaded");
            next[..tail].copy_from_slice(&old[full..st.used]);
            st.used = tail;
            st.clean = 0;
            st.buf_start += full as u64;
            fs.unsynced.describe(
                &next,
                self.blob.id().0,
                st.buf_start,
                tail,
                self.len.load(Ordering::Acquire),
            );
            st.buf = Some(next);
            fs.give_back_buf(old);
            self.flushed.store(st.buf_start, Ordering::Release);
            return Ok(());
        }
        let spare = self.settle(st, fs).await?;
        let (from, to) = (st.buf_start, st.buf_start + full as u64);
        self.ensure_capacity(to).await?;
        let mut next = match spare {
            Some(b) if b.capacity() >= cap => b,
            other => {
                if let Some(b) = other {
                    fs.give_back_buf(b);
                }
                fs.append_buf(cap)?
            }
        };
        next.set_len(cap).ctx(&self.name())?;
        let mut buf = st.buf.take().expect("buffer loaded");
        let tail = st.used - full;
        next[..tail].copy_from_slice(&buf[full..st.used]);
        buf.set_len(full).ctx(&self.name())?;
        // The bytes stay in unsynced memory until they are on the blob
        // under durable metadata (`land_behind`).
        let len = self.len.load(Ordering::Acquire);
        fs.unsynced
            .describe(&buf, self.blob.id().0, from, full, len);
        fs.unsynced.describe(&next, self.blob.id().0, to, tail, len);
        // Readers keep off the blob's copy of the range until it is there;
        // the cache has the new bytes at once.
        self.behind.start(from, to);
        self.cache_written(fs, from, to, &buf, from);
        st.buf = Some(next);
        st.used = tail;
        st.clean = 0;
        st.buf_start = to;
        st.data_dirty = true;
        self.flushed.store(to, Ordering::Release);
        let lba = from / self.unit;
        if let Err(buf) = fs.write_behind(self.clone(), lba, buf) {
            // No writer thread: write it here.
            let outcome = self.land_behind(&fs.unsynced, &fs.metrics, lba, buf).await;
            self.behind.finish(outcome);
        }
        Ok(())
    }

    /// A write behind the appender: puts `buf` on the blob at `lba`, makes
    /// the clusters under it durable, and only then lets its unsynced
    /// memory go (its bytes are safe from a killed process from there).
    pub async fn land_behind(
        &self,
        unsynced: &Unsynced,
        metrics: &Shards<FsShard>,
        lba: u64,
        buf: DmaBuf,
    ) -> std::result::Result<DmaBuf, String> {
        let start = Stamp::now();
        let bytes = buf.len() as u64;
        let res = async {
            let buf = self.blob.write(lba, buf).await.map_err(|e| e.to_string())?;
            self.persist_clusters().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(buf)
        }
        .await;
        metrics.with(|m| m.behind.record(start, bytes, res.is_ok()));
        let buf = res?;
        unsynced.retire(&buf);
        Ok(buf)
    }

    /// Makes the blob's cluster map durable when it changed, so bytes
    /// written to new clusters can be found after the process dies. The
    /// length is not part of it: only `sync` moves `fs.len` (an unsynced
    /// length lives in the unsynced memory), so after a power cut nothing
    /// past the synced length is ever read.
    async fn persist_clusters(&self) -> Result<()> {
        if self.blob.is_dirty() {
            self.blob
                .sync_metadata_unordered()
                .await
                .ctx(&self.name())?;
        }
        Ok(())
    }

    /// Writes `data` at `off` (at most `len`: no holes through this path).
    pub async fn write_at(self: &Arc<Self>, fs: &FsInner, off: u64, data: &[u8]) -> Result<()> {
        let mut st = self.state.lock().await;
        let st = &mut *st;
        self.check_failed(st)?;
        let len = self.len.load(Ordering::Acquire);
        if off > len {
            return Err(Error::InvalidArgument(format!(
                "{}: write at {off} is past the end ({len})",
                self.name()
            )));
        }
        let end = off + data.len() as u64;
        // Reserve space first, so running out changes nothing.
        self.ensure_capacity(self.align_up(end)).await?;
        if off < st.buf_start {
            // Below the buffer: make everything durable first, so that the
            // buffer (and its unsynced memory) can go, rewrite on the blob,
            // and make that durable too before returning.
            self.sync_locked(st, fs).await?;
            if let Some(buf) = st.buf.take() {
                fs.give_back_buf(buf);
            }
            self.write_through(st, fs, off, data).await?;
            self.len.fetch_max(end, Ordering::AcqRel);
            self.mtime.store(meta::now_ns(), Ordering::Release);
            st.md_dirty = true;
            return self.sync_locked(st, fs).await;
        } else {
            let mut pos = 0;
            while pos < data.len() {
                let at = (off + pos as u64 - st.buf_start) as usize;
                st.clean = st.clean.min(self.align_down(at as u64) as usize);
                let buf = self.buffer(st, fs).await?;
                let room = WRITE_CHUNK + self.unit as usize - at;
                let n = room.min(data.len() - pos);
                buf[at..at + n].copy_from_slice(&data[pos..pos + n]);
                st.used = st.used.max(at + n);
                pos += n;
                self.len
                    .fetch_max(st.buf_start + st.used as u64, Ordering::AcqRel);
                if st.used >= WRITE_CHUNK {
                    self.spill(st, fs).await?;
                }
            }
        }
        let len = self.len.fetch_max(end, Ordering::AcqRel).max(end);
        self.mtime.store(meta::now_ns(), Ordering::Release);
        st.md_dirty = true;
        if let Some(buf) = &st.buf {
            // The bytes are in the buffer: now say so in its header.
            fs.unsynced
                .describe(buf, self.blob.id().0, st.buf_start, st.used, len);
        }
        Ok(())
    }

    /// A write that reaches below the buffer, whose bytes are all on the
    /// blob (synced, the buffer gone): read-modify-write whole blocks on
    /// the blob, then restart the buffer at the end.
    async fn write_through(
        &self,
        st: &mut WriteState,
        fs: &FsInner,
        off: u64,
        data: &[u8],
    ) -> Result<()> {
        debug_assert!(st.buf.is_none());
        let name = self.name();
        let end = off + data.len() as u64;
        let (a, b) = (self.align_down(off), self.align_up(end));
        let mut tmp = DmaBuf::new((b - a) as usize).ctx(&name)?;
        tmp = self.blob.read(a / self.unit, tmp).await.ctx(&name)?;
        tmp[(off - a) as usize..(end - a) as usize].copy_from_slice(data);
        self.blob.write(a / self.unit, tmp).await.ctx(&name)?;
        st.data_dirty = true;
        fs.invalidate(self, a, b);
        // Restart the buffer at the (possibly new) end.
        let len = self.len.load(Ordering::Acquire).max(end);
        st.buf_start = self.align_down(len);
        st.used = (len - st.buf_start) as usize;
        st.clean = 0;
        self.flushed.store(st.buf_start, Ordering::Release);
        Ok(())
    }

    /// Sets the modification time (as `touch -d`) and makes it durable,
    /// with everything written before. A later write sets it to its own time.
    pub async fn set_mtime(&self, fs: &FsInner, mtime_ns: u64) -> Result<()> {
        let mut st = self.state.lock().await;
        self.mtime.store(mtime_ns, Ordering::Release);
        st.md_dirty = true;
        self.sync_locked(&mut st, fs).await
    }

    /// Waits for the file's write-behind and reports whether any write of
    /// its bytes failed (a sync on a volatile device: nothing to write).
    pub async fn settled(&self, fs: &FsInner) -> Result<()> {
        let mut st = self.state.lock().await;
        self.settle_into(&mut st, fs).await?;
        self.check_failed(&st)
    }

    /// Makes data and length durable.
    pub async fn sync(&self, fs: &FsInner) -> Result<()> {
        let mut st = self.state.lock().await;
        self.sync_locked(&mut st, fs).await
    }

    /// [`FileNode::sync`] with the write lock held.
    async fn sync_locked(&self, st: &mut WriteState, fs: &FsInner) -> Result<()> {
        let name = self.name();
        self.settle_into(st, fs).await?;
        self.check_failed(st)?;
        // The buffer's bytes not on the blob yet, padded to a block.
        let pending =
            (st.used > 0 && st.buf.is_some()).then(|| self.align_up(st.used as u64) as usize);
        let len = self.len.load(Ordering::Acquire);
        if st.md_dirty || len != st.synced_len || self.blob.is_dirty() {
            if let Some(padded) = pending {
                // The data write below runs inside the metadata sync, which
                // has captured the metadata: it must not grow the blob.
                self.ensure_capacity(st.buf_start + padded as u64).await?;
            }
            self.blob
                .set_xattr(meta::LEN, &meta::enc_u64(len))
                .ctx(&name)?;
            self.blob
                .set_xattr(
                    meta::MTIME,
                    &meta::enc_u64(self.mtime.load(Ordering::Acquire)),
                )
                .ctx(&name)?;
            let tail = self.tail_check(st, len);
            match tail {
                // A small append: data and length go down with one flush,
                // the length with a checksum of the new bytes for mount.
                Some(tail) => self.blob.set_xattr(meta::TAIL, &tail).ctx(&name)?,
                // Otherwise the metadata sync flushes the device before it
                // writes the blob's first page, so the data is durable
                // before the length.
                None => self.drop_tail_check()?,
            }
            // The data is written alongside the metadata, under one flush.
            let data = pending.map(|padded| self.write_buffer(st, padded, fs));
            self.blob
                .sync_metadata_with(tail.is_none(), data)
                .await?
                .ctx(&name)?;
            st.synced_len = len;
            st.md_dirty = false;
            st.data_dirty = false;
        } else {
            if let Some(padded) = pending {
                self.write_buffer(st, padded, fs).await?;
            }
            if st.data_dirty {
                fs.flush_device()
                    .await
                    .map_err(|e| Error::store(&name, e))?;
                st.data_dirty = false;
            }
        }
        Ok(())
    }

    /// The [`meta::TAIL`] value for a sync to `len`: only when the sync
    /// adds at most [`meta::TAIL_MAX`] bytes, all still in the buffer.
    fn tail_check(&self, st: &WriteState, len: u64) -> Option<[u8; 12]> {
        let prev = st.synced_len;
        if len <= prev || len - prev > meta::TAIL_MAX || prev < st.buf_start || st.failed.is_some()
        {
            return None;
        }
        let buf = st.buf.as_ref()?;
        let (a, b) = (
            (prev - st.buf_start) as usize,
            (len - st.buf_start) as usize,
        );
        let bytes = buf.get(a..b)?;
        Some(meta::enc_tail(prev, crc32c::crc32c(bytes)))
    }

    /// Removes a [`meta::TAIL`] check that no longer describes the last
    /// sync (call before a metadata sync that does not write one).
    fn drop_tail_check(&self) -> Result<()> {
        if self.blob.get_xattr(meta::TAIL).is_some() {
            self.blob.remove_xattr(meta::TAIL).ctx(&self.name())?;
        }
        Ok(())
    }

    /// Zeroes the bytes of the blob's block holding `at` from `at` on;
    /// returns whether it wrote (false when `at` is block-aligned).
    async fn zero_past(&self, at: u64, name: &str) -> Result<bool> {
        let a = self.align_down(at);
        if at == a {
            return Ok(false);
        }
        let mut blk = DmaBuf::new(self.unit as usize).ctx(name)?;
        blk = self.blob.read(a / self.unit, blk).await.ctx(name)?;
        blk[(at - a) as usize..].fill(0);
        self.blob.write(a / self.unit, blk).await.ctx(name)?;
        Ok(true)
    }

    /// Sets the length; new bytes read as zeroes.
    pub async fn truncate(&self, fs: &FsInner, new_len: u64) -> Result<()> {
        let mut st = self.state.lock().await;
        let st = &mut *st;
        let name = self.name();
        // A failed write-behind marks the file failed; the truncate below
        // clears that, as it does for a failed write here.
        let _ = self.settle_into(st, fs).await;
        // Everything durable first, so the blob alone is the truth and the
        // buffer (with its unsynced memory) can go before the length moves.
        if st.failed.is_none() {
            self.sync_locked(st, fs).await?;
        }
        if let Some(buf) = st.buf.take() {
            fs.give_back_buf(buf);
        }
        let len = self.len.load(Ordering::Acquire);
        let old_size = self.blob.size_bytes();
        if new_len > len {
            self.ensure_capacity(self.align_up(new_len)).await?;
        }
        if new_len < len {
            // A shrink is durable when it returns: later writes may reuse
            // the bytes past the new end (the tail block, freed clusters),
            // so the on-disk length must not still cover them.
            self.blob
                .resize(new_len.div_ceil(self.cluster))
                .await
                .ctx(&name)?;
            self.blob
                .set_xattr(meta::LEN, &meta::enc_u64(new_len))
                .ctx(&name)?;
            self.drop_tail_check()?;
            self.blob.sync_metadata().await.ctx(&name)?;
            st.synced_len = new_len;
            // Then the bytes past the new end in its last block become
            // zeroes (past the durable length, so a crash meanwhile shows
            // nothing): every byte of the blob past the length reads as
            // zero (fsck checks it), so no later growth can show them.
            if self.zero_past(new_len, &name).await? {
                st.data_dirty = true;
            }
        } else if new_len > len {
            // Bytes past the old end were never written: write zeroes.
            self.zero_past(len, &name).await?;
            let (from, to) = (self.align_up(len), self.align_up(new_len));
            if to > from {
                self.blob
                    .write_zeroes(from / self.unit, (to - from) / self.unit)
                    .await
                    .ctx(&name)?;
            }
            st.data_dirty = true;
        }
        self.gen.fetch_add(1, Ordering::AcqRel);
        fs.invalidate(
            self,
            self.align_down(new_len.min(len)),
            old_size.max(self.blob.size_bytes()),
        );
        self.len.store(new_len, Ordering::Release);
        st.buf_start = self.align_down(new_len);
        st.used = (new_len - st.buf_start) as usize;
        st.clean = 0;
        self.flushed.store(st.buf_start, Ordering::Release);
        self.mtime.store(meta::now_ns(), Ordering::Release);
        st.md_dirty = true;
        st.failed = None;
        // Durable when it returns: no unsynced memory describes the new
        // length, so a killed process must not lose it.
        self.sync_locked(st, fs).await
    }

    /// Reads up to `dst.len()` bytes at `off`; returns how many (0 at EOF).
    pub async fn read_at(
        &self,
        fs: &FsInner,
        ra: &Readahead,
        off: u64,
        dst: &mut [u8],
        direct: bool,
    ) -> Result<usize> {
        let len = self.len.load(Ordering::Acquire);
        if off >= len || dst.is_empty() {
            return Ok(0);
        }
        let n = (dst.len() as u64).min(len - off) as usize;
        let end = off + n as u64;
        let mut dev_end = end;
        if end > self.flushed.load(Ordering::Acquire) {
            // Part of the range is in the write buffer.
            let st = self.state.lock().await;
            let start = st.buf_start;
            if end > start {
                let from = off.max(start);
                if let Some(buf) = &st.buf {
                    let s = (from - start) as usize;
                    let e = (end - start) as usize;
                    dst[(from - off) as usize..n].copy_from_slice(&buf[s..e]);
                } else {
                    // Not loaded yet: the partial block is still on the blob.
                    drop(st);
                    return self
                        .read_blob(fs, ra, off, &mut dst[..n], direct)
                        .await
                        .map(|_| n);
                }
                dev_end = from;
            }
        }
        if dev_end > off {
            self.read_blob(fs, ra, off, &mut dst[..(dev_end - off) as usize], direct)
                .await?;
        }
        Ok(n)
    }

    /// A direct handle's read of `[off, ...)` straight from the device
    /// into `dst` (see [`blobstore::Blob::read_into`]), when `off` is on an
    /// io unit, `dst` holds whole units and the bytes asked for are all on
    /// the device (none in the write buffer). `Ok(None)`: the general path
    /// must serve it. The device may fill `dst` beyond the file's end up
    /// to the unit boundary, as an `O_DIRECT` read may.
    pub fn read_direct_into(&self, off: u64, dst: &mut [u8]) -> Result<Option<(usize, bool)>> {
        let len = self.len.load(Ordering::Acquire);
        if off >= len || dst.is_empty() || !off.is_multiple_of(self.unit) {
            return Ok(None);
        }
        let n = (dst.len() as u64).min(len - off);
        let span = self.align_up(off + n) - off;
        if span > dst.len() as u64 || off + span > self.blob.size_bytes() {
            return Ok(None);
        }
        if off + n > self.flushed.load(Ordering::Acquire) {
            // The file's last, partial block: on the blob unless the write
            // buffer holds it (then, or when a writer holds the state, the
            // general path reads it).
            match self.state.try_lock() {
                Some(st) if st.buf.is_none() => {}
                _ => return Ok(None),
            }
        }
        self.behind.clear_blocking(off, off + span);
        let straight = self
            .blob
            .read_into(off / self.unit, &mut dst[..span as usize])
            .map_err(|e| Error::store(&self.name(), e))?;
        Ok(Some((n as usize, straight)))
    }

    /// Reads blob bytes `[off, off+dst.len())` through the cache, or
    /// straight from the device when the mount has no cache or the handle
    /// is `direct`.
    async fn read_blob(
        &self,
        fs: &FsInner,
        ra: &Readahead,
        off: u64,
        dst: &mut [u8],
        direct: bool,
    ) -> Result<()> {
        // The name only for errors: taking it costs a lock and a copy.
        let err = |e| Error::store(&self.name(), e);
        let end = off + dst.len() as u64;
        let cache = &fs.cache;
        if !cache.enabled() || direct {
            let (a, b) = (self.align_down(off), self.align_up(end));
            self.behind.clear(a, b).await;
            let buf = read_buf((b - a) as usize).map_err(err)?;
            let buf = self.blob.read(a / self.unit, buf).await.map_err(err)?;
            let buf = ReadBuf(Some(buf));
            dst.copy_from_slice(&buf[(off - a) as usize..(end - a) as usize]);
            return Ok(());
        }
        let cb = cache.chunk_bytes() as u64;
        let first = off / cb;
        let last = (end - 1) / cb;
        let blob_end = self.blob.size_bytes();
        let mut idx = first;
        // Copies what `[off, end)` shares with `bytes`, the blob's bytes at `base`.
        let copy = |dst: &mut [u8], base: u64, bytes: &[u8]| {
            let from = off.max(base);
            let to = end.min(base + bytes.len() as u64);
            if to > from {
                dst[(from - off) as usize..(to - off) as usize]
                    .copy_from_slice(&bytes[(from - base) as usize..(to - base) as usize]);
            }
        };
        while idx <= last {
            let seen = self.gen.load(Ordering::Acquire);
            // The part of `[off, end)` in chunk `idx`.
            let (from, to) = (off.max(idx * cb), end.min((idx + 1) * cb));
            let part = &mut dst[(from - off) as usize..(to - off) as usize];
            if cache.read(self.id(), idx, (from - idx * cb) as usize, part) {
                idx += 1;
                continue;
            }
            // Read this chunk and the following missing ones in one I/O,
            // plus the readahead window when access is sequential; a random
            // read into a cache with room reads the aligned extent around
            // it instead (chunks of it already cached stay as they are).
            let window = ra.window(off, end, cb);
            let extent = if window == 0 { cache.fill_extent() } else { 1 };
            let (start, run_end) = if extent > 1 {
                // Only whole chunks the blob holds for good: none that
                // reaches into the write buffer.
                let settled = self.flushed.load(Ordering::Acquire).min(blob_end) / cb;
                let a = idx / extent * extent;
                (a, (a + extent).min(settled).max(last + 1))
            } else {
                let stop = (last + 1)
                    .max(idx + window / cb)
                    .min(blob_end.div_ceil(cb))
                    .max(idx + 1);
                let mut run_end = idx + 1;
                while run_end < stop && !cache.contains(self.id(), run_end) {
                    run_end += 1;
                }
                (idx, run_end)
            };
            let bytes = ((run_end - start) * cb).min(blob_end - start * cb);
            // After `seen` was taken: a write-behind started since then
            // either shows here or bumped the generation (then the chunks
            // read are not cached).
            self.behind.clear(start * cb, start * cb + bytes).await;
            let buf = read_buf(bytes as usize).map_err(err)?;
            let buf = self
                .blob
                .read(start * cb / self.unit, buf)
                .await
                .map_err(err)?;
            let buf = ReadBuf(Some(buf));
            for (i, piece) in buf.chunks(cb as usize).enumerate() {
                // No memory for a chunk only means it is not cached.
                if let Some(chunk) = cache.chunk(piece) {
                    cache.insert(self.id(), start + i as u64, chunk, &self.gen, seen);
                }
            }
            copy(dst, start * cb, &buf);
            idx = run_end;
        }
        Ok(())
    }
}

/// Largest read buffer a thread keeps for its next read.
const KEPT_READ_BUF: usize = 2 * MAX_READAHEAD as usize;

thread_local! {
    /// The thread's spare read buffer: reads reuse it instead of allocating
    /// (and zeroing) DMA memory each time.
    static SPARE_READ_BUF: std::cell::Cell<Option<DmaBuf>> = const { std::cell::Cell::new(None) };
}

/// A buffer of `len` bytes for a device read: the thread's spare when it is
/// big enough. Its bytes are stale; the read overwrites all of them.
fn read_buf(len: usize) -> blobstore::Result<DmaBuf> {
    if let Some(mut b) = SPARE_READ_BUF.with(|c| c.take()) {
        if b.capacity() >= len {
            b.set_len(len)?;
            return Ok(b);
        }
    }
    DmaBuf::new(len)
}

/// A read buffer that goes back to the thread's spare slot when dropped
/// (unless it is too big to keep).
struct ReadBuf(Option<DmaBuf>);

impl std::ops::Deref for ReadBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            if b.capacity() <= KEPT_READ_BUF {
                SPARE_READ_BUF.with(|c| c.set(Some(b)));
            }
        }
    }
}

/// Sequential-access detector of one handle: the readahead window doubles
/// while reads continue where the last one stopped.
#[derive(Default)]
pub(crate) struct Readahead {
    state: Mutex<(u64, u64)>,
}

impl Readahead {
    /// Bytes to read ahead for a read of `[off, end)`.
    fn window(&self, off: u64, end: u64, chunk: u64) -> u64 {
        let mut s = self.state.lock();
        let (last_end, window) = *s;
        let w = if off == last_end && off != 0 {
            (window * 2).clamp(2 * chunk, MAX_READAHEAD)
        } else {
            0
        };
        *s = (end, w);
        w
    }

    pub fn note(&self, end: u64) {
        self.state.lock().0 = end;
    }
}

/// Metadata of a file or directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Metadata {
    /// Normalized full name.
    pub name: String,
    /// True for a directory.
    pub is_dir: bool,
    /// Length in bytes (0 for directories).
    pub len: u64,
    /// Last modification, nanoseconds since the Unix epoch.
    pub mtime_ns: u64,
    /// The blob that holds it.
    pub blob_id: blobstore::BlobId,
}

/// A read started by [`File::start_read`], running on the thread that
/// started it.
///
/// Invariants:
/// - its device operations are on the starting thread's channels, so only
///   that thread can finish it: [`PendingRead::wait`] on another thread
///   refuses instead of waiting for a completion it cannot reap;
/// - once finished (`out` set) the future is gone and `dst` is no longer
///   touched.
pub struct PendingRead {
    fut: Option<std::pin::Pin<Box<dyn std::future::Future<Output = Result<usize>>>>>,
    out: Option<Result<usize>>,
    thread: std::thread::ThreadId,
    fs: Arc<FsInner>,
    /// Set when the read was still in flight as its start returned: it is
    /// counted as an asynchronous read when it finishes.
    started: Option<Stamp>,
}

impl Drop for PendingRead {
    fn drop(&mut self) {
        // A future of another thread's channels may only be dropped there;
        // here it is leaked instead (its device reads complete into memory
        // that thread's channel keeps, and are reaped by its next poll).
        if self.fut.is_some() && std::thread::current().id() != self.thread {
            std::mem::forget(self.fut.take());
        }
    }
}

impl PendingRead {
    /// Polls the read once without waiting, on the thread that started it
    /// (its device completions are reaped here); true once it is finished.
    pub fn poll(&mut self) -> bool {
        if self.out.is_some() {
            return true;
        }
        let Some(fut) = self.fut.as_mut() else {
            return true;
        };
        if std::thread::current().id() != self.thread {
            return false;
        }
        blobstore::device::poll_thread_channels();
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        if let std::task::Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
            self.finished(r);
            return true;
        }
        // Devices may queue what the poll submitted until their channel is
        // polled (io_uring's submission queue): hand it to the device now,
        // or nothing runs until the caller waits.
        blobstore::device::poll_thread_channels();
        false
    }

    /// Keeps the outcome, and counts an asynchronous read.
    fn finished(&mut self, r: Result<usize>) {
        self.fut = None;
        if let Some(start) = self.started.take() {
            let n = *r.as_ref().unwrap_or(&0) as u64;
            self.fs
                .metrics
                .with(|m| m.async_read.record(start, n, r.is_ok()));
        }
        self.out = Some(r);
    }

    /// Waits for the read and returns the bytes read (fewer than asked
    /// only at the end of the file), or its error. The outcome is given
    /// once; a later call is refused. On a thread other than the one that
    /// started it, refused too: that thread's channels hold its device
    /// reads, and the read stays pending.
    pub fn wait(&mut self) -> Result<usize> {
        if self.out.is_none() {
            if std::thread::current().id() != self.thread {
                return Err(Error::InvalidArgument(
                    "a started read was waited for on a thread other than the one that started it"
                        .into(),
                ));
            }
            if let Some(fut) = self.fut.take() {
                let r = blobstore::block_on(fut);
                self.finished(r);
            }
        }
        self.out.take().unwrap_or_else(|| {
            Err(Error::InvalidArgument(
                "a started read's outcome was already taken".into(),
            ))
        })
    }
}

/// An open file. Handles are independent; all handles of one file share its
/// data, length and write buffer. Safe to use from any thread.
pub struct File {
    pub(crate) fs: Arc<FsInner>,
    pub(crate) node: Arc<FileNode>,
    pub(crate) read: bool,
    pub(crate) write: bool,
    /// Reads bypass the cache ([`crate::OpenOptions::direct`]).
    pub(crate) direct: bool,
    /// A WAL, by its name when opened (its syncs are counted apart).
    pub(crate) wal: bool,
    pub(crate) ra: Readahead,
}

impl File {
    /// Current length in bytes.
    pub fn len(&self) -> u64 {
        self.node.len.load(Ordering::Acquire)
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file's current name.
    pub fn name(&self) -> String {
        self.node.name()
    }

    /// Metadata, as [`crate::BlobFs::stat`] gives it.
    pub fn metadata(&self) -> Metadata {
        Metadata {
            name: self.name(),
            is_dir: false,
            len: self.len(),
            mtime_ns: self.node.mtime.load(Ordering::Acquire),
            blob_id: self.node.blob.id(),
        }
    }

    fn check(&self, write: bool) -> Result<()> {
        if write && !self.write {
            return Err(Error::BadMode(self.name(), "writing"));
        }
        if !write && !self.read {
            return Err(Error::BadMode(self.name(), "reading"));
        }
        Ok(())
    }

    /// Reads at `off` into `dst`; returns the bytes read (0 at the end).
    pub async fn read_at_async(&self, off: u64, dst: &mut [u8]) -> Result<usize> {
        self.check(false)?;
        let start = Stamp::now();
        let res = self
            .node
            .read_at(&self.fs, &self.ra, off, dst, self.direct)
            .await;
        let n = *res.as_ref().unwrap_or(&0);
        self.fs
            .metrics
            .with(|m| m.read.record(start, n as u64, res.is_ok()));
        let n = res?;
        self.ra.note(off + n as u64);
        Ok(n)
    }

    /// Starts a read of `len` bytes at `off` into `dst` and returns it
    /// running: its device reads are submitted before this returns, and
    /// the caller does other work until [`PendingRead::poll`] or
    /// [`PendingRead::wait`] finishes it (RocksDB's `ReadAsync`). A read
    /// served from memory (the cache, the write buffer) is finished on
    /// return.
    ///
    /// The bytes land in `dst` only while the read is polled: device reads
    /// go to the device's own buffers and are copied by the poll that
    /// finds them complete, so dropping the read unfinished leaves `dst`
    /// untouched from then on.
    ///
    /// # Safety
    /// `dst` must be valid for writes of `len` bytes, and not used by
    /// anything else, until the returned read finishes or is dropped.
    pub unsafe fn start_read(&self, off: u64, dst: *mut u8, len: usize) -> PendingRead {
        let check = self.check(false);
        let (fs, node, direct) = (self.fs.clone(), self.node.clone(), self.direct);
        let fut = async move {
            check?;
            if len == 0 {
                return Ok(0);
            }
            // SAFETY: the caller's promise: valid and ours until the read
            // finishes or is dropped, which ends this future.
            let dst = unsafe { std::slice::from_raw_parts_mut(dst, len) };
            let start = Stamp::now();
            // Its own readahead state: RocksDB's asynchronous reads are
            // its readahead already.
            let res = node
                .read_at(&fs, &Readahead::default(), off, dst, direct)
                .await;
            let n = *res.as_ref().unwrap_or(&0);
            fs.metrics
                .with(|m| m.read.record(start, n as u64, res.is_ok()));
            res
        };
        let mut read = PendingRead {
            fut: Some(Box::pin(fut)),
            out: None,
            thread: std::thread::current().id(),
            fs: self.fs.clone(),
            started: None,
        };
        if !read.poll() {
            read.started = Some(Stamp::now());
        }
        read
    }

    /// Synchronous [`File::read_at_async`]. On a direct handle, an aligned
    /// read goes from the device straight into `dst` where the device
    /// allows it (see [`crate::OpenOptions::direct`]).
    pub fn read_at(&self, off: u64, dst: &mut [u8]) -> Result<usize> {
        if self.direct {
            self.check(false)?;
            let start = Stamp::now();
            let res = self.node.read_direct_into(off, dst);
            if !matches!(res, Ok(None)) {
                let n = res.as_ref().map_or(0, |r| r.map_or(0, |(n, _)| n as u64));
                let straight = matches!(res, Ok(Some((_, true))));
                let ticks = start.elapsed_ticks();
                self.fs.metrics.with(|m| {
                    m.read.record_ticks(ticks, n, res.is_ok());
                    if straight {
                        m.direct_read.record_ticks(ticks, n, true);
                    }
                });
                let (n, _) = res?.unwrap_or_default();
                self.ra.note(off + n as u64);
                return Ok(n);
            }
        }
        blobstore::block_on(self.read_at_async(off, dst))
    }

    /// [`File::read_at`] within `timeout`: [`Error::TimedOut`] when the
    /// device has not answered by then (what RocksDB's `io_timeout` and
    /// `deadline` ask of a read). Bytes the cache or the write buffer holds
    /// are returned at once. A read given up on leaves `dst` unspecified and
    /// changes nothing else: its device operation completes later into
    /// memory of its own, and what it read is not cached.
    pub fn read_at_timeout(&self, off: u64, dst: &mut [u8], timeout: Duration) -> Result<usize> {
        let mut one = [(off, dst)];
        let mut res = self.read_many_timeout(&mut one, timeout);
        res.pop()
            .unwrap_or_else(|| Err(Error::TimedOut(self.name(), timeout)))
    }

    /// Reads several ranges, each `(offset, buffer)` as [`File::read_at`]
    /// would, with every device read of the batch submitted before any is
    /// waited for, so the device queue sees the whole batch (what RocksDB's
    /// `MultiRead` asks for). Each range gets its own result, in order.
    pub fn read_many(&self, reqs: &mut [(u64, &mut [u8])]) -> Vec<Result<usize>> {
        let reads = reqs
            .iter_mut()
            .map(|(off, dst)| self.read_at_async(*off, dst));
        blobstore::block_on(futures::future::join_all(reads))
    }

    /// [`File::read_many`] within `timeout` for the whole batch: when it
    /// passes first, every range of the batch fails with
    /// [`Error::TimedOut`] (as [`File::read_at_timeout`]).
    pub fn read_many_timeout(
        &self,
        reqs: &mut [(u64, &mut [u8])],
        timeout: Duration,
    ) -> Vec<Result<usize>> {
        let n = reqs.len();
        let start = Stamp::now();
        let deadline = std::time::Instant::now() + timeout;
        let reads = reqs
            .iter_mut()
            .map(|(off, dst)| self.read_at_async(*off, dst));
        match blobstore::block_on_deadline(futures::future::join_all(reads), deadline) {
            Some(results) => results,
            None => {
                // Each counted as a failed read of the time it took.
                let ticks = start.elapsed_ticks();
                self.fs.metrics.with(|m| {
                    for _ in 0..n {
                        m.read.record_ticks(ticks, 0, false);
                    }
                });
                (0..n)
                    .map(|_| Err(Error::TimedOut(self.name(), timeout)))
                    .collect()
            }
        }
    }

    /// Reads the whole file.
    pub fn read_all(&self) -> Result<Vec<u8>> {
        let mut out = vec![0u8; self.len() as usize];
        let mut pos = 0;
        while pos < out.len() {
            let n = self.read_at(pos as u64, &mut out[pos..])?;
            if n == 0 {
                out.truncate(pos);
                break;
            }
            pos += n;
        }
        Ok(out)
    }

    /// Appends `data` at the end.
    pub async fn append_async(&self, data: &[u8]) -> Result<()> {
        self.check(true)?;
        let off = self.len();
        self.write_counted(off, data).await
    }

    /// Writes through the node, counted as an append.
    async fn write_counted(&self, off: u64, data: &[u8]) -> Result<()> {
        let start = Stamp::now();
        let res = self.node.write_at(&self.fs, off, data).await;
        self.fs
            .metrics
            .with(|m| m.append.record(start, data.len() as u64, res.is_ok()));
        res
    }

    /// Synchronous [`File::append_async`].
    pub fn append(&self, data: &[u8]) -> Result<()> {
        blobstore::block_on(self.append_async(data))
    }

    /// Writes `data` at `off`, which may be at most the current length.
    pub async fn write_at_async(&self, off: u64, data: &[u8]) -> Result<()> {
        self.check(true)?;
        self.write_counted(off, data).await
    }

    /// Synchronous [`File::write_at_async`].
    pub fn write_at(&self, off: u64, data: &[u8]) -> Result<()> {
        blobstore::block_on(self.write_at_async(off, data))
    }

    /// Sets the length; growth reads as zeroes.
    pub async fn truncate_async(&self, len: u64) -> Result<()> {
        self.check(true)?;
        self.node.truncate(&self.fs, len).await
    }

    /// Synchronous [`File::truncate_async`].
    pub fn truncate(&self, len: u64) -> Result<()> {
        blobstore::block_on(self.truncate_async(len))
    }

    /// Makes all data and the length durable: as durable as the device is.
    /// On a device whose blocks live exactly as long as its unsynced memory
    /// (`shm:`, [`blobstore::BlockDevice::volatile`]) every acknowledged
    /// append already is, and a killed process's next mount writes it
    /// back, so the sync writes nothing (as tmpfs's fsync); it still waits
    /// for the file's write-behind and reports one that failed.
    pub async fn sync_async(&self) -> Result<()> {
        let start = Stamp::now();
        let res = if self.fs.volatile {
            self.node.settled(&self.fs).await
        } else {
            self.node.sync(&self.fs).await
        };
        let ok = res.is_ok();
        self.fs.metrics.with(|m| {
            let c = if self.wal { &m.wal_sync } else { &m.sync };
            c.record(start, 0, ok)
        });
        res
    }

    /// Synchronous [`File::sync_async`].
    pub fn sync(&self) -> Result<()> {
        blobstore::block_on(self.sync_async())
    }

    /// Syncs (if opened for writing) and closes the handle.
    pub async fn close_async(self) -> Result<()> {
        if self.write {
            self.node.sync(&self.fs).await?;
            if self.node.handles.load(Ordering::Acquire) == 1 {
                self.node.release_buffer(&self.fs).await;
            }
        }
        let fs = self.fs.clone();
        let unlinked = self.node.unlinked.load(Ordering::Acquire);
        drop(self);
        if unlinked {
            let _g = fs.ns.lock().await;
            fs.reap_pending().await?;
        }
        Ok(())
    }

    /// Synchronous [`File::close_async`].
    pub fn close(self) -> Result<()> {
        blobstore::block_on(self.close_async())
    }
}

impl Drop for File {
    fn drop(&mut self) {
        // An unlinked file's blob is deleted by the next namespace change,
        // close or unmount that finds no handle left (or at the next mount).
        self.node.handles.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Runs `wait` and, beside it on the same thread, a task that lets a
    /// writer thread end the write `b` has in flight: with a wait that
    /// blocked its thread, that task never ran (the writer gives up after
    /// a while and says so).
    fn ends_beside(b: &Arc<Behind>, wait: impl std::future::Future<Output = ()>) {
        let (tx, rx) = mpsc::channel::<()>();
        let writer = {
            let b = b.clone();
            std::thread::spawn(move || {
                let told = rx.recv_timeout(Duration::from_secs(10)).is_ok();
                b.finish(Err("the test's write".into()));
                told
            })
        };
        blobstore::block_on(futures::future::join(wait, async move {
            tx.send(()).expect("writer thread");
        }));
        assert!(writer.join().unwrap(), "the wait blocked its thread");
    }

    #[test]
    fn waits_for_the_writer_yield_their_thread() {
        let b = Arc::new(Behind::default());
        b.start(0, 8192);
        ends_beside(&b, async {
            let outcome = b.idle().await;
            assert!(matches!(outcome, Some(Err(ref e)) if e == "the test's write"));
        });
        assert!(b.is_quiet(), "the outcome was taken");

        b.start(4096, 8192);
        // Clear of the write at once: no wait.
        blobstore::block_on(b.clear(0, 4096));
        ends_beside(&b, b.clear(0, 4097));
        assert!(!b.busy.load(Ordering::Acquire));
    }

    #[test]
    fn a_plain_wait_parks_until_the_write_ends() {
        let b = Arc::new(Behind::default());
        b.start(0, 4096);
        b.clear_blocking(4096, 8192);
        let writer = {
            let b = b.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                b.finish(Err("late".into()));
            })
        };
        let start = std::time::Instant::now();
        b.clear_blocking(0, 1);
        assert!(start.elapsed() >= Duration::from_millis(15));
        writer.join().unwrap();
        assert!(matches!(
            blobstore::block_on(b.idle()),
            Some(Err(ref e)) if e == "late"
        ));
    }
}
