//! The per-thread I/O queue: one TCP connection, non-blocking, driven by
//! its owning thread's channel (submit encodes, reap sends and receives).
//!
//! Fixed per-queue trackers indexed by command id, one transmit buffer
//! (sent once per reap, so a batch of submissions is one `send`), one
//! receive buffer parsed in place: reads are copied from it straight into
//! the operation's memory. Nothing is allocated per I/O once the buffers
//! have grown to the working size.
//!
//! The transmit buffer is bounded: what the socket took is dropped from
//! its front, and nothing new is encoded into it (no command capsule, no
//! H2CData) while more than [`TX_BACKLOG_MAX`] bytes wait to go. Operations
//! then wait in the pending queue, and R2Ts in the H2CData queue, for the
//! target to read again (or for a command's timeout).
//!
//! Invariants:
//! - A command id is busy from its capsule's encoding to its completion
//!   (response capsule, or C2HData with SUCCESS), or to the connection's
//!   death; data for it lands only inside its range of its operation.
//! - An operation is reported once all its commands are done, or at once
//!   when the connection dies (then nothing reaches its memory again).
//! - A dead queue reports every later submission as failed.

use std::collections::VecDeque;
use std::io::Read;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Instant;

use super::super::cmd::{io_op, Command, Completion};
use super::link::{header_name, success};
use super::pdu::{self, DataHeader, Framing, Header, TcpError, COMMON_HEADER_BYTES};
use super::{sgl, NvmeTcpController, NvmeTcpDevice};
use crate::device::{ChannelBackend, IoKind, IoOp, Tag};
use crate::error::{Error, Result};

/// Receive buffer size (a PDU header always fits: at most 256 bytes).
const RX_BYTES: usize = 256 << 10;
/// Reaps between timeout checks (issuing reads the clock on its own).
const REAPS_PER_CLOCK: u32 = 32;
/// Most `recv` calls per reap.
const RECVS_PER_REAP: usize = 8;
/// Data still to come of a C2HData at which, with nothing buffered, it is
/// received straight into the read's memory.
const DIRECT_RECV_MIN: usize = 16 << 10;
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

enum Rx {
    /// Waiting for a PDU header.
    Header,
    /// Receiving C2HData for `cid`: `left` bytes to go, at `off` within
    /// the command's data.
    Data {
        cid: u16,
        off: usize,
        left: usize,
        crc: u32,
        digest: bool,
        success: bool,
    },
    /// The data digest of the C2HData just received.
    Digest { cid: u16, crc: u32, success: bool },
}

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

    /// True while the transmit buffer may take more PDUs.
    fn tx_room(&self) -> bool {
        self.tx.len() - self.tx_sent < TX_BACKLOG_MAX
    }

    /// Turns as many of `tag`'s remaining units into commands as there
    /// are free command ids and room in the transmit buffer; true when all
    /// are issued.
    fn issue(&mut self, tag: Tag) -> bool {
        loop {
            let op = &self.ops[tag as usize];
            if op.issued >= op.total {
                return true;
            }
            let Some(&free) = self.free.last() else {
                return false;
            };
            if !self.tx_room() {
                return false;
            }
            let last = self.cmds[free as usize].cid >> SLOT_BITS;
            let generation = (last + 1) % (1 << (16 - SLOT_BITS));
            let cid = free | generation << SLOT_BITS;
            let bs = self.block_size;
            let left = op.total - op.issued;
            let (units, cmd, mut c) = match op.kind {
                IoKind::Read | IoKind::Write => {
                    let bytes = left.min(self.max_cmd_bytes as u64);
                    let lba = op.lba + op.issued / bs;
                    let opcode = if op.kind == IoKind::Read {
                        io_op::READ
                    } else {
                        io_op::WRITE
                    };
                    let cmd = Command::rw(opcode, self.nsid, lba, (bytes / bs) as u32);
                    let c = Cmd {
                        busy: true,
                        tag,
                        op_off: op.issued as usize,
                        len: bytes as usize,
                        read: op.kind == IoKind::Read,
                        r2t_write: op.kind == IoKind::Write
                            && bytes as usize > self.in_capsule_bytes,
                        ..FREE_CMD
                    };
                    (bytes, cmd, c)
                }
                IoKind::Flush => (
                    1,
                    Command::flush(self.nsid),
                    Cmd {
                        busy: true,
                        tag,
                        ..FREE_CMD
                    },
                ),
                IoKind::WriteZeroes => {
                    let blocks = left.min(65536);
                    let lba = op.lba + op.issued;
                    let cmd = Command::rw(io_op::WRITE_ZEROES, self.nsid, lba, blocks as u32);
                    (
                        blocks,
                        cmd,
                        Cmd {
                            busy: true,
                            tag,
                            ..FREE_CMD
                        },
                    )
                }
                IoKind::Unmap => {
                    let blocks = left.min(u32::MAX as u64);
                    let lba = op.lba + op.issued;
                    let mut range = [0u8; 16];
                    range[4..8].copy_from_slice(&(blocks as u32).to_le_bytes());
                    range[8..16].copy_from_slice(&lba.to_le_bytes());
                    let cmd = Command {
                        opcode: io_op::DSM,
                        nsid: self.nsid,
                        // One range; attribute: deallocate.
                        cdw: [0, 1 << 2, 0, 0, 0, 0],
                        ..Default::default()
                    };
                    let c = Cmd {
                        busy: true,
                        tag,
                        len: 16,
                        r2t_write: 16 > self.in_capsule_bytes,
                        range,
                        has_range: true,
                        ..FREE_CMD
                    };
                    (blocks, cmd, c)
                }
            };
            self.free.pop();
            c.sent_ms = self.now_ms;
            c.cid = cid;
            self.cmds[slot(cid)] = c;
            self.encode_capsule(cid, cmd);
            let op = &mut self.ops[tag as usize];
            op.issued += units;
            op.out += 1;
            self.busy += 1;
        }
    }

    /// Appends command `cid`'s capsule (with its data when it goes in the
    /// capsule) to the transmit buffer.
    fn encode_capsule(&mut self, cid: u16, mut cmd: Command) {
        let c = self.cmds[slot(cid)];
        let in_capsule = c.len > 0 && !c.read && !c.r2t_write;
        if in_capsule {
            sgl::set_in_capsule(&mut cmd, c.len as u32);
        } else {
            sgl::set_transport(&mut cmd, c.len as u32);
        }
        let header = Header::CapsuleCmd(cmd.encode(cid));
        if !in_capsule {
            pdu::encode_pdu(&mut self.tx, &header, &[], self.framing, self.h2c_align);
            return;
        }
        self.encode_with_data(&header, cid, 0, c.len);
    }

    /// Encodes `header` with bytes `off..off + len` of command `cid`'s data.
    fn encode_with_data(&mut self, header: &Header, cid: u16, off: usize, len: usize) {
        let c = &self.cmds[slot(cid)];
        if c.has_range {
            let range = c.range;
            pdu::encode_pdu(
                &mut self.tx,
                header,
                &[&range[off..off + len]],
                self.framing,
                self.h2c_align,
            );
            return;
        }
        let op = &self.ops[c.tag as usize];
        let mut pieces: [&[u8]; 4] = [&[]; 4];
        let mut n = 0;
        let mut many = Vec::new();
        for_each_piece(&op.segs, c.op_off + off, len, |p, l| {
            // SAFETY: the segment belongs to this in-flight write; the
            // device only reads it until the operation is reported.
            let s = unsafe { std::slice::from_raw_parts(p as *const u8, l) };
            if n < pieces.len() {
                pieces[n] = s;
            } else {
                if many.is_empty() {
                    many.extend_from_slice(&pieces);
                }
                many.push(s);
            }
            n += 1;
        });
        let data: &[&[u8]] = if n <= pieces.len() {
            &pieces[..n]
        } else {
            &many
        };
        pdu::encode_pdu(&mut self.tx, header, data, self.framing, self.h2c_align);
    }

    /// Sends what the transmit buffer holds, as far as the socket takes it.
    fn flush_tx(&mut self) -> std::result::Result<(), String> {
        while self.tx_sent < self.tx.len() {
            let rest = &self.tx[self.tx_sent..];
            // SAFETY: a valid buffer of `rest.len()` bytes; MSG_NOSIGNAL: a
            // closed peer is an error, not SIGPIPE.
            let n = unsafe {
                libc::send(
                    self.sock.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    self.compact_tx();
                    return Ok(());
                }
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("send: {e}"));
            }
            self.tx_sent += n as usize;
            self.tx_total += n as u64;
        }
        self.tx.clear();
        self.tx_sent = 0;
        self.tx_pdu = 0;
        Ok(())
    }

    /// Moves `tx_pdu` to the first PDU boundary at or after `tx_sent` (the
    /// end of the PDU the socket has part of, or `tx_sent` itself) and
    /// returns it. The buffer holds whole PDUs only: each PLEN leads to
    /// the next.
    fn tx_pdu_end(&mut self) -> usize {
        while self.tx_pdu < self.tx_sent {
            let at = self.tx_pdu;
            let Some(p) = self.tx.get(at + 4..at + 8) else {
                break;
            };
            let plen = u32::from_le_bytes([p[0], p[1], p[2], p[3]]) as usize;
            if plen == 0 {
                break;
            }
            self.tx_pdu += plen;
        }
        debug_assert!(self.tx_pdu >= self.tx_sent && self.tx_pdu <= self.tx.len());
        self.tx_pdu
    }

    /// Drops the sent front of the transmit buffer once it is at least as
    /// long as the unsent rest: each byte moves at most once per byte sent
    /// (amortised), and the buffer stays under twice its unsent bytes.
    fn compact_tx(&mut self) {
        if self.tx_sent > 0 && self.tx_sent >= self.tx.len() - self.tx_sent {
            self.tx_pdu = self.tx_pdu_end().saturating_sub(self.tx_sent);
            self.tx.drain(..self.tx_sent);
            self.tx_sent = 0;
        }
    }

    /// Receives and handles PDUs; `Err` kills the connection.
    fn receive(&mut self) -> std::result::Result<(), TcpError> {
        for _ in 0..RECVS_PER_REAP {
            self.parse_buffered()?;
            if self.rx_start == self.rx_end {
                self.rx_start = 0;
                self.rx_end = 0;
            } else if self.rx_end == self.rx.len() {
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
            }
            if self.rx_start == self.rx_end {
                match self.recv_direct()? {
                    Some(true) => continue,
                    Some(false) => return Ok(()),
                    None => {}
                }
            }
            match self.sock.read(&mut self.rx[self.rx_end..]) {
                Ok(0) => return Err(TcpError::Closed),
                Ok(n) => {
                    self.rx_end += n;
                    if self.rx_end < self.rx.len() {
                        // The socket had less than the buffer's room: it is
                        // drained, and another recv would only say so.
                        return self.parse_buffered();
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(TcpError::Connection(e.to_string())),
            }
        }
        self.parse_buffered()
    }

    /// Handles every whole piece of PDU in the receive buffer.
    fn parse_buffered(&mut self) -> std::result::Result<(), TcpError> {
        loop {
            let avail = self.rx_end - self.rx_start;
            match self.rx_state {
                Rx::Header => {
                    if avail < COMMON_HEADER_BYTES {
                        return Ok(());
                    }
                    let at = self.rx_start;
                    let plan =
                        pdu::plan(&self.rx[at..at + COMMON_HEADER_BYTES], self.framing, false)?;
                    if avail < plan.header_bytes {
                        return Ok(());
                    }
                    let (header, plan) = pdu::parse_header(
                        &self.rx[at..at + plan.header_bytes],
                        self.framing,
                        false,
                    )?;
                    self.rx_start += plan.header_bytes;
                    self.on_header(header, plan.data_digest)?;
                }
                Rx::Data {
                    cid,
                    off,
                    left,
                    crc,
                    digest,
                    ..
                } => {
                    if avail == 0 {
                        return Ok(());
                    }
                    let n = avail.min(left);
                    let bytes = &self.rx[self.rx_start..self.rx_start + n];
                    let c = self.cmds[slot(cid)];
                    let op = &self.ops[c.tag as usize];
                    let mut at = 0;
                    for_each_piece(&op.segs, c.op_off + off, n, |p, l| {
                        // SAFETY: the piece lies in this in-flight read's
                        // memory (range checked against the command when
                        // the header came); nothing else touches it.
                        unsafe { std::ptr::copy_nonoverlapping(bytes[at..].as_ptr(), p, l) };
                        at += l;
                    });
                    let crc = if digest {
                        crc32c::crc32c_append(crc, bytes)
                    } else {
                        crc
                    };
                    self.rx_start += n;
                    self.data_received(n, crc);
                }
                Rx::Digest { cid, crc, success } => {
                    if avail < pdu::DIGEST_BYTES {
                        return Ok(());
                    }
                    let at = self.rx_start;
                    let checked = pdu::check_data_digest("C2HData", crc, &self.rx[at..at + 4]);
                    self.rx_start += 4;
                    self.rx_state = Rx::Header;
                    if let Err(e) = checked {
                        // The PDU was framed right, only its data is bad:
                        // that read fails, the connection goes on (as the
                        // spec has it; Linux's host does the same).
                        self.fail_command(cid, format!("data digest error: {e}"));
                    }
                    self.data_done(cid, success);
                }
            }
        }
    }

    /// `n` more bytes of the C2HData being received have landed; `crc` is
    /// the data digest so far (with them).
    fn data_received(&mut self, n: usize, crc: u32) {
        let Rx::Data {
            cid,
            off,
            left,
            digest,
            success,
            ..
        } = self.rx_state
        else {
            debug_assert!(false, "data outside a C2HData");
            return;
        };
        debug_assert!(n <= left);
        self.rx_state = if n < left {
            Rx::Data {
                cid,
                off: off + n,
                left: left - n,
                crc,
                digest,
                success,
            }
        } else if digest {
            Rx::Digest { cid, crc, success }
        } else {
            self.data_done(cid, success);
            Rx::Header
        };
    }

    /// With the receive buffer empty in the middle of a large C2HData,
    /// receives straight into the read's memory (no copy through the
    /// buffer). `None` when that does not apply; else whether the socket
    /// may have more.
    fn recv_direct(&mut self) -> std::result::Result<Option<bool>, TcpError> {
        let Rx::Data {
            cid,
            off,
            left,
            crc,
            digest,
            ..
        } = self.rx_state
        else {
            return Ok(None);
        };
        if left < DIRECT_RECV_MIN {
            return Ok(None);
        }
        let c = self.cmds[slot(cid)];
        let mut piece = None;
        for_each_piece(
            &self.ops[c.tag as usize].segs,
            c.op_off + off,
            left,
            |p, l| {
                piece.get_or_insert((p, l));
            },
        );
        let Some((p, l)) = piece else { return Ok(None) };
        // SAFETY: `p..p + l` lies in this in-flight read's memory, inside the
        // command's range (checked when the C2HData header came); nothing
        // else touches it until the read is reported. Raw recv: the memory
        // may not be initialised.
        let n = unsafe { libc::recv(self.sock.as_raw_fd(), p.cast(), l, libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.kind() {
                std::io::ErrorKind::WouldBlock => Ok(Some(false)),
                std::io::ErrorKind::Interrupted => Ok(Some(true)),
                _ => Err(TcpError::Connection(e.to_string())),
            };
        }
        if n == 0 {
            return Err(TcpError::Closed);
        }
        let n = n as usize;
        let crc = if digest {
            // SAFETY: recv initialised these `n` bytes of the piece.
            crc32c::crc32c_append(crc, unsafe { std::slice::from_raw_parts(p, n) })
        } else {
            crc
        };
        self.data_received(n, crc);
        Ok(Some(n == l))
    }

    fn data_done(&mut self, cid: u16, success: bool) {
        if success {
            self.complete(success_completion(cid));
        }
    }

    fn on_header(&mut self, header: Header, digest: bool) -> std::result::Result<(), TcpError> {
        match header {
            Header::CapsuleResp(c) => {
                self.check_cid("CapsuleResp", c.cid, |_| true, "an outstanding command")?;
                let cmd = self.cmds[slot(c.cid)];
                // Success means all the data moved: every byte of a read
                // came, every byte of an R2T write was asked for and sent.
                let moved = if cmd.read || cmd.r2t_write {
                    cmd.xfer
                } else {
                    cmd.len
                };
                if c.status().is_ok() && (moved != cmd.len || cmd.h2c_queued) {
                    return Err(TcpError::Unexpected {
                        pdu: "CapsuleResp",
                        why: format!(
                            "success for {} command {} after {moved} of its {} bytes{}",
                            if cmd.read { "read" } else { "write" },
                            c.cid,
                            cmd.len,
                            if cmd.h2c_queued {
                                " (and before the last R2T's data went)"
                            } else {
                                ""
                            }
                        ),
                    });
                }
                self.complete(c);
                Ok(())
            }
            Header::C2hData(d) => self.on_c2h(d, digest),
            Header::R2t(r) => {
                self.check_cid(
                    "R2T",
                    r.cccid,
                    |c| c.r2t_write,
                    "a write waiting for an R2T",
                )?;
                let c = self.cmds[slot(r.cccid)];
                // R2TL may exceed MAXH2CDATA: the data then goes in several
                // H2CData PDUs (`encode_h2c`), as the spec has the host do.
                let (off, len) = (r.r2to as usize, r.r2tl as usize);
                if len == 0 || off != c.xfer || off + len > c.len {
                    return Err(TcpError::DataOutOfRange {
                        pdu: "R2T",
                        cid: r.cccid,
                        offset: r.r2to,
                        len: r.r2tl,
                        cmd_len: c.len,
                        why: ", or not where the last R2T ended",
                    });
                }
                if c.h2c_queued {
                    // We said MAXR2T 0: one R2T outstanding per command,
                    // and the last one's data has not even been encoded.
                    return Err(TcpError::R2tLimitExceeded { cid: r.cccid });
                }
                let c = &mut self.cmds[slot(r.cccid)];
                c.xfer = off + len;
                c.h2c_next = off;
                c.ttag = r.ttag;
                c.h2c_queued = true;
                self.h2c.push_back(r.cccid);
                Ok(())
            }
            Header::TermReq { fes, fei, .. } => Err(TcpError::TerminatedByController { fes, fei }),
            other => Err(TcpError::Unexpected {
                pdu: header_name(&other),
                why: "on an I/O queue".into(),
            }),
        }
    }

    fn on_c2h(&mut self, d: DataHeader, digest: bool) -> std::result::Result<(), TcpError> {
        self.check_cid("C2HData", d.cccid, |c| c.read, "an outstanding read")?;
        let c = self.cmds[slot(d.cccid)];
        let (off, len) = (d.datao as usize, d.datal as usize);
        if off != c.xfer || off + len > c.len || (d.success && off + len != c.len) {
            return Err(TcpError::DataOutOfRange {
                pdu: "C2HData",
                cid: d.cccid,
                offset: d.datao,
                len: d.datal,
                cmd_len: c.len,
                why: ", or not in order, or SUCCESS before the last byte",
            });
        }
        self.cmds[slot(d.cccid)].xfer = off + len;
        self.rx_state = Rx::Data {
            cid: d.cccid,
            off,
            left: len,
            crc: 0,
            digest,
            success: d.success,
        };
        Ok(())
    }

    fn check_cid(
        &self,
        pdu: &'static str,
        cid: u16,
        ok: impl Fn(&Cmd) -> bool,
        why: &'static str,
    ) -> std::result::Result<(), TcpError> {
        match self.cmds.get(slot(cid)) {
            Some(c) if c.busy && c.cid == cid && ok(c) => Ok(()),
            _ => Err(TcpError::UnknownCid { pdu, cid, why }),
        }
    }

    /// Command `cid` (outstanding) failed on the host's side for `why`:
    /// its operation will fail with that error when its commands are done.
    fn fail_command(&mut self, cid: u16, why: String) {
        let c = &self.cmds[slot(cid)];
        let op = &mut self.ops[c.tag as usize];
        tracing::warn!(device = %self.name, qid = self.qid, cid, reason = %why, "nvme-tcp command failed");
        if op.error.is_none() {
            op.error = Some(Error::Io {
                op: op.kind.name(),
                lba: op.lba,
                blocks: op.blocks,
                reason: format!("{}: command {cid}: {why}", self.name),
            });
        }
    }

    /// Encodes the next H2CData PDU (at most MAXH2CDATA bytes) of the R2T
    /// of command `cid`; true when that R2T's data is all encoded.
    fn encode_h2c(&mut self, cid: u16) -> bool {
        let c = self.cmds[slot(cid)];
        if !c.busy || c.cid != cid || !c.h2c_queued {
            debug_assert!(false, "command {cid} in the H2CData queue");
            return true;
        }
        let off = c.h2c_next;
        let n = (c.xfer - off).min(self.maxh2cdata as usize);
        let last = off + n == c.xfer;
        let h = Header::H2cData(DataHeader {
            cccid: cid,
            ttag: c.ttag,
            datao: off as u32,
            datal: n as u32,
            last,
            success: false,
        });
        self.encode_with_data(&h, cid, off, n);
        let c = &mut self.cmds[slot(cid)];
        c.h2c_next = off + n;
        c.h2c_queued = !last;
        last
    }

    /// Command `c.cid` finished with `c`'s status.
    fn complete(&mut self, c: Completion) {
        let cmd = std::mem::replace(
            &mut self.cmds[slot(c.cid)],
            Cmd {
                cid: c.cid,
                ..FREE_CMD
            },
        );
        debug_assert!(cmd.busy && cmd.cid == c.cid);
        if cmd.h2c_queued {
            // Done (an error status, say) before its data went: the data
            // never will, and the id may be reused at once.
            self.h2c.retain(|&q| q != c.cid);
        }
        self.free.push(slot(c.cid) as u16);
        self.busy -= 1;
        let op = &mut self.ops[cmd.tag as usize];
        op.out -= 1;
        if let Err(status) = c.status() {
            if op.error.is_none() {
                op.error = Some(Error::Nvme {
                    op: op.kind.name(),
                    nsid: self.nsid,
                    lba: op.lba,
                    blocks: op.blocks,
                    status,
                });
            }
        }
        if op.out == 0 && op.issued >= op.total {
            op.active = false;
            let r = op.error.take().map_or(Ok(()), Err);
            self.done.push((cmd.tag, r));
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

    /// Sends a H2CTermReq for `e` (best effort, never blocking) before the
    /// connection closes. When the socket has part of a PDU, the rest of
    /// that PDU goes first (the target would read a TermReq in its middle
    /// as its data); if the socket will not take it now, no TermReq goes.
    fn terminate(&mut self, e: &TcpError) {
        let Some(fes) = e.fes() else { return };
        let end = self.tx_pdu_end();
        let rest = self.tx.get(self.tx_sent..end).unwrap_or_default();
        if send_now(&self.sock, rest) < rest.len() {
            return;
        }
        self.tx_sent = end;
        let mut out = Vec::new();
        let h = Header::TermReq {
            from_host: true,
            fes,
            fei: 0,
        };
        pdu::encode_pdu(&mut out, &h, &[], self.framing, 4);
        // A failure changes nothing: the connection closes next.
        send_now(&self.sock, &out);
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

    /// Fills the transmit buffer while it has room: the H2CData the
    /// target asked for first (its commands hold resources on the target),
    /// then the commands of pending operations.
    fn pump(&mut self) {
        while self.tx_room() {
            let Some(&cid) = self.h2c.front() else { break };
            if self.encode_h2c(cid) {
                self.h2c.pop_front();
            }
        }
        self.issue_pending();
    }

    fn issue_pending(&mut self) {
        if self.pending.is_empty() || self.free.is_empty() || !self.tx_room() {
            return;
        }
        // One clock read per batch: what is issued now is stamped now.
        self.now_ms = self.clock_ms();
        while let Some(&tag) = self.pending.front() {
            if !self.issue(tag) {
                return;
            }
            self.pending.pop_front();
        }
    }
}

/// Sends as much of `b` as the socket takes now; returns how much.
fn send_now(sock: &TcpStream, b: &[u8]) -> usize {
    let mut sent = 0;
    while sent < b.len() {
        let rest = &b[sent..];
        // SAFETY: a valid buffer of `rest.len()` bytes; MSG_NOSIGNAL: a
        // closed peer is an error, not SIGPIPE.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        sent += n as usize;
    }
    sent
}

fn success_completion(cid: u16) -> Completion {
    success(cid)
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
    pub(super) fn fail_for_test(&mut self, e: TcpError) {
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
