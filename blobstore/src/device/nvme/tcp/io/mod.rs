//! The per-thread I/O queue: one TCP connection, non-blocking, driven by
//! its owning thread's channel (submit encodes, reap sends and receives).
//!
//! Fixed per-queue trackers indexed by command id, one transmit buffer
//! (sent once per reap, so a batch of submissions is one `send`), one
//! receive buffer parsed in place: reads are copied from it straight into
//! the operation's memory. Nothing is allocated per I/O once the buffers
//! have grown to the working size.
//!
//! Layout: here the queue's state (command trackers, operations), its
//! setup, the [`ChannelBackend`] that drives it, its timeouts and its
//! death; `submit` turns operations into commands and commands (and the
//! write data R2Ts ask for) into PDUs, and sends them; `receive` reads
//! PDUs, lands read data in place, and completes commands.
//!
//! Invariants:
//! - A command id is busy from its capsule's encoding to its completion
//!   (response capsule, or C2HData with SUCCESS), or to the connection's
//!   death; data for it lands only inside its range of its operation.
//! - An operation is reported once all its commands are done, or at once
//!   when the connection dies (then nothing reaches its memory again).
//! - A dead queue reports every later submission as failed.

mod receive;
mod submit;

use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use super::pdu::Framing;
use super::{NvmeTcpController, NvmeTcpDevice};
use crate::device::{ChannelBackend, IoKind, IoOp, Tag};
use crate::error::{Error, Result};
use receive::Rx;

/// Receive buffer size (a PDU header always fits: at most 256 bytes).
const RX_BYTES: usize = 256 << 10;
/// Reaps between timeout checks (issuing reads the clock on its own).
const REAPS_PER_CLOCK: u32 = 32;
/// Wait slice of [`ChannelBackend::wait`], milliseconds.
const WAIT_SLICE_MS: i32 = 10;
/// Unsent bytes in the transmit buffer at which no more command capsules
/// or H2CData are encoded (the buffer then holds at most about twice this
/// and one PDU: see `flush_tx`).
pub(super) const TX_BACKLOG_MAX: usize = 256 << 10;

/// Low bits of a command id: its slot in the trackers; the high bits are
/// a generation, bumped each time the slot is reused, so that a late or
/// duplicated PDU for a finished command never matches the next command
/// in its slot (as Linux's host does).
const SLOT_BITS: u32 = 10;
const SLOT_MASK: u16 = (1 << SLOT_BITS) - 1;
const _: () = assert!(super::MAX_QUEUE_DEPTH as u32 <= 1 << SLOT_BITS);

/// The tracker slot of command id `cid`.
fn slot(cid: u16) -> usize {
    (cid & SLOT_MASK) as usize
}

#[derive(Clone, Copy)]
struct Cmd {
    busy: bool,
    /// The command id on the wire (slot and generation); kept when the
    /// slot is free, for the next generation.
    cid: u16,
    tag: Tag,
    /// Byte offset of this command's data within its operation.
    op_off: usize,
    /// Data bytes (0 for commands without data).
    len: usize,
    /// Reads: bytes received; writes: bytes asked for by R2Ts.
    xfer: usize,
    /// R2T writes: the next byte to encode as H2CData (up to `xfer`).
    h2c_next: usize,
    /// R2T writes: the transfer tag of the last R2T.
    ttag: u16,
    /// R2T writes: in the H2CData queue (an R2T's data not all encoded).
    h2c_queued: bool,
    /// Data goes to the target by R2T (not in the capsule).
    r2t_write: bool,
    /// Expects C2HData.
    read: bool,
    /// When it was issued, ms on the queue's clock (read when the batch of
    /// commands it is part of was issued).
    sent_ms: u64,
    /// Dataset Management range (Unmap commands).
    range: [u8; 16],
    has_range: bool,
}

const FREE_CMD: Cmd = Cmd {
    busy: false,
    cid: 0,
    tag: 0,
    op_off: 0,
    len: 0,
    xfer: 0,
    h2c_next: 0,
    ttag: 0,
    h2c_queued: false,
    r2t_write: false,
    read: false,
    sent_ms: 0,
    range: [0; 16],
    has_range: false,
};

struct Op {
    active: bool,
    kind: IoKind,
    lba: u64,
    blocks: u64,
    /// The operation's memory (pointer, length), in order.
    segs: Vec<(*mut u8, usize)>,
    /// Units (bytes for reads and writes, blocks otherwise; 1 for flush)
    /// in all, and already turned into commands.
    total: u64,
    issued: u64,
    /// Commands outstanding.
    out: u32,
    error: Option<Error>,
}

/// One thread's I/O queue on a controller: its connection, its command
/// trackers and operations, and its transmit and receive buffers.
pub(super) struct TcpQueue {
    ctrl: Arc<NvmeTcpController>,
    name: String,
    nsid: u32,
    qid: u16,
    block_size: u64,
    max_cmd_bytes: usize,
    in_capsule_bytes: usize,
    dsm: bool,
    write_zeroes: bool,
    sock: TcpStream,
    framing: Framing,
    maxh2cdata: u32,
    h2c_align: usize,
    cmds: Vec<Cmd>,
    /// Free slots of `cmds`.
    free: Vec<u16>,
    ops: Vec<Op>,
    /// Operations with commands still to issue, oldest first.
    pending: VecDeque<Tag>,
    /// R2T writes with data asked for and not yet encoded, oldest first
    /// (each command at most once: MAXR2T is 1).
    h2c: VecDeque<u16>,
    done: Vec<(Tag, Result<()>)>,
    /// Encoded PDUs; `tx[..tx_sent]` has gone to the socket.
    tx: Vec<u8>,
    tx_sent: usize,
    /// Where a PDU starts in `tx`; walking PDU lengths from it reaches the
    /// end of the PDU being sent (see `tx_pdu_end`).
    tx_pdu: usize,
    /// Bytes the socket took in all, and that count at the last tick that
    /// saw it move (or found nothing to send), at `tx_moved_ms`.
    tx_total: u64,
    tx_seen: u64,
    tx_moved_ms: u64,
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    rx_state: Rx,
    /// Why the connection is dead.
    dead: Option<String>,
    busy: usize,
    clock: Instant,
    now_ms: u64,
    reaps: u32,
    timeout_ms: u64,
}

impl TcpQueue {
    pub(super) fn new(dev: &NvmeTcpDevice) -> Result<TcpQueue> {
        let ctrl = dev.ctrl.clone();
        let depth = ctrl
            .opts
            .queue_depth
            .min((ctrl.max_queue_entries.saturating_sub(1)).max(1) as u16);
        let qid = ctrl.alloc_qid()?;
        let link = match ctrl.connect_io_queue(qid, depth) {
            Ok(l) => l,
            Err(e) => {
                ctrl.free_qid(qid);
                return Err(e);
            }
        };
        if let Err(e) = link.sock.set_nonblocking(true) {
            ctrl.free_qid(qid);
            return Err(Error::Os {
                context: format!("nvme-tcp:{}: non-blocking socket", ctrl.name()),
                source: e,
            });
        }
        let mut cmds = vec![FREE_CMD; depth as usize];
        cmds.shrink_to_fit();
        Ok(TcpQueue {
            name: format!("nvme-tcp:{}/ns={}", ctrl.name(), dev.nsid),
            nsid: dev.nsid,
            qid,
            block_size: dev.geometry.block_size as u64,
            // Not capped by MAXH2CDATA: an R2T's data goes in as many
            // H2CData PDUs as that takes (a multiple of the block size).
            max_cmd_bytes: dev.max_cmd_bytes,
            in_capsule_bytes: ctrl.in_capsule_bytes,
            dsm: dev.dsm,
            write_zeroes: dev.write_zeroes,
            framing: link.framing,
            maxh2cdata: link.maxh2cdata,
            h2c_align: link.h2c_align,
            sock: link.sock,
            cmds,
            free: (0..depth).rev().collect(),
            ops: Vec::new(),
            pending: VecDeque::new(),
            h2c: VecDeque::new(),
            done: Vec::new(),
            tx: Vec::with_capacity(64 << 10),
            tx_sent: 0,
            tx_pdu: 0,
            tx_total: 0,
            tx_seen: 0,
            tx_moved_ms: 0,
            rx: vec![0u8; RX_BYTES].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            rx_state: Rx::Header,
            dead: None,
            busy: 0,
            clock: Instant::now(),
            now_ms: 0,
            reaps: 0,
            timeout_ms: ctrl.opts.io_timeout.as_millis() as u64,
            ctrl,
        })
    }

    fn device_failed(&self, reason: &str) -> Error {
        Error::DeviceFailed {
            device: self.name.clone(),
            reason: reason.to_string(),
        }
    }

    /// The connection is dead: every operation fails, now and later.
    fn kill(&mut self, why: String, timed_out: Option<Tag>) {
        tracing::warn!(device = %self.name, qid = self.qid, reason = %why, "nvme-tcp I/O queue failed");
        if self.dead.is_none() {
            let _ = self.sock.shutdown(std::net::Shutdown::Both);
        }
        let reason = format!("I/O queue {} lost: {why}", self.qid);
        for (tag, op) in self.ops.iter_mut().enumerate() {
            if !op.active {
                continue;
            }
            op.active = false;
            let e = if timed_out == Some(tag as Tag) {
                Error::Timeout {
                    op: op.kind.name(),
                    lba: op.lba,
                    blocks: op.blocks,
                    after_ms: self.timeout_ms,
                }
            } else {
                Error::DeviceFailed {
                    device: self.name.clone(),
                    reason: reason.clone(),
                }
            };
            self.done.push((tag as Tag, Err(e)));
        }
        self.cmds.fill(FREE_CMD);
        self.free = (0..self.cmds.len() as u16).rev().collect();
        self.pending.clear();
        self.h2c.clear();
        self.busy = 0;
        self.tx.clear();
        self.tx_sent = 0;
        self.tx_pdu = 0;
        self.dead = Some(reason);
    }

    fn clock_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    fn tick(&mut self) {
        self.now_ms = self.clock_ms();
        if self.tx_sent == self.tx.len() || self.tx_total != self.tx_seen {
            self.tx_seen = self.tx_total;
            self.tx_moved_ms = self.now_ms;
        } else if self.now_ms.saturating_sub(self.tx_moved_ms) > self.timeout_ms {
            // Nothing outstanding may time out (all done, the rest waiting
            // to go), yet the target reads nothing: that fails too.
            self.kill(
                format!("the target took no data for {} ms", self.timeout_ms),
                None,
            );
            return;
        }
        if self.busy == 0 {
            return;
        }
        let late = self
            .cmds
            .iter()
            .find(|c| c.busy && self.now_ms.saturating_sub(c.sent_ms) > self.timeout_ms);
        if let Some(c) = late {
            let tag = c.tag;
            self.kill(
                format!("a command got no answer within {} ms", self.timeout_ms),
                Some(tag),
            );
        }
    }
}

/// Calls `f(ptr, len)` for the pieces of `segs` covering bytes
/// `off..off + len` of their concatenation.
fn for_each_piece(
    segs: &[(*mut u8, usize)],
    mut off: usize,
    mut len: usize,
    mut f: impl FnMut(*mut u8, usize),
) {
    for &(p, l) in segs {
        if len == 0 {
            return;
        }
        if off >= l {
            off -= l;
            continue;
        }
        let n = (l - off).min(len);
        // SAFETY (of the pointer arithmetic): `off < l`, inside the segment.
        f(unsafe { p.add(off) }, n);
        off = 0;
        len -= n;
    }
    debug_assert_eq!(len, 0, "range past the operation's memory");
}

impl ChannelBackend for TcpQueue {
    fn submit(&mut self, tag: Tag, op: &IoOp) -> Result<()> {
        if let Some(why) = &self.dead {
            return Err(self.device_failed(why));
        }
        match op.kind {
            IoKind::Unmap if !self.dsm => {
                return Err(Error::Unsupported(format!(
                    "{}: the controller has no Dataset Management (unmap)",
                    self.name
                )))
            }
            IoKind::WriteZeroes if !self.write_zeroes => {
                return Err(Error::Unsupported(format!(
                    "{}: the controller has no Write Zeroes",
                    self.name
                )))
            }
            _ => {}
        }
        // A command's timeout counts from now, not from the last reap's
        // clock (a thread may have been busy elsewhere since).
        self.now_ms = self.clock_ms();
        let t = tag as usize;
        if self.ops.len() <= t {
            self.ops.resize_with(t + 1, || Op {
                active: false,
                kind: IoKind::Flush,
                lba: 0,
                blocks: 0,
                segs: Vec::new(),
                total: 0,
                issued: 0,
                out: 0,
                error: None,
            });
        }
        let o = &mut self.ops[t];
        debug_assert!(!o.active, "tag {tag} reused while in flight");
        o.active = true;
        o.kind = op.kind;
        o.lba = op.lba.get();
        o.blocks = op.blocks;
        o.segs.clear();
        o.segs.extend(op.segs.iter().map(|s| (s.ptr(), s.len())));
        o.total = match op.kind {
            IoKind::Read | IoKind::Write => o.segs.iter().map(|s| s.1 as u64).sum(),
            IoKind::Flush => 1,
            IoKind::Unmap | IoKind::WriteZeroes => op.blocks,
        };
        o.issued = 0;
        o.out = 0;
        o.error = None;
        if !self.pending.is_empty() || !self.issue(tag) {
            self.pending.push_back(tag);
        }
        Ok(())
    }

    fn reap(&mut self, done: &mut dyn FnMut(Tag, Result<()>)) -> usize {
        if self.dead.is_none() {
            if let Err(why) = self.flush_tx() {
                self.kill(why, None);
            }
        }
        if self.dead.is_none() && self.busy > 0 {
            if let Err(e) = self.receive() {
                self.terminate(&e);
                self.kill(e.to_string(), None);
            }
        }
        if self.dead.is_none() {
            self.pump();
            self.reaps += 1;
            if self.reaps >= REAPS_PER_CLOCK {
                self.reaps = 0;
                self.tick();
            }
        }
        let n = self.done.len();
        for (tag, r) in self.done.drain(..) {
            done(tag, r);
        }
        n
    }

    fn wait(&mut self) -> bool {
        let idle = self.busy == 0 && self.pending.is_empty();
        if self.dead.is_some() || !self.done.is_empty() || idle {
            return true;
        }
        let mut events = libc::POLLIN;
        if self.tx_sent < self.tx.len() {
            events |= libc::POLLOUT;
        }
        let mut fd = libc::pollfd {
            fd: self.sock.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut fd, 1, WAIT_SLICE_MS) };
        self.tick();
        true
    }
}

#[cfg(test)]
impl TcpQueue {
    /// The transmit buffer's length and unsent bytes, operations pending
    /// and free command ids.
    pub(super) fn tx_state(&self) -> (usize, usize, usize, usize) {
        (
            self.tx.len(),
            self.tx.len() - self.tx_sent,
            self.pending.len(),
            self.free.len(),
        )
    }

    pub(super) fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// True when the socket has part of a PDU.
    pub(super) fn tx_mid_pdu(&mut self) -> bool {
        self.tx_pdu_end() != self.tx_sent
    }

    /// What `reap` does on a protocol violation.
    pub(super) fn fail_for_test(&mut self, e: super::pdu::TcpError) {
        self.terminate(&e);
        self.kill(e.to_string(), None);
    }
}

impl Drop for TcpQueue {
    fn drop(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        self.ctrl.free_qid(self.qid);
    }
}
