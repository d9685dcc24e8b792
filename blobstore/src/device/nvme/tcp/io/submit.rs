//! Submission: an operation's units into commands (as command ids and
//! room allow), commands into capsules (with their data when it fits in
//! one), the data each R2T asks for into H2CData PDUs, and the PDUs out
//! through the transmit buffer; and the H2CTermReq of a connection the
//! host ends.
//!
//! The transmit buffer is bounded: what the socket took is dropped from
//! its front, and nothing new is encoded into it (no command capsule, no
//! H2CData) while more than [`TX_BACKLOG_MAX`] bytes wait to go. Operations
//! then wait in the pending queue, and R2Ts in the H2CData queue, for the
//! target to read again (or for a command's timeout).
//!
//! Invariants:
//! - The transmit buffer holds whole PDUs only, `tx[..tx_sent]` of them
//!   sent: walking PLENs from `tx_pdu` finds where the PDU being sent ends.
//! - A TermReq goes only at a PDU boundary (or not at all).

use std::net::TcpStream;
use std::os::fd::AsRawFd;

use super::{for_each_piece, slot, Cmd, TcpQueue, FREE_CMD, SLOT_BITS, TX_BACKLOG_MAX};
use crate::device::nvme::cmd::{io_op, Command};
use crate::device::nvme::tcp::pdu::{self, DataHeader, Header, TcpError};
use crate::device::nvme::tcp::sgl;
use crate::device::{IoKind, Tag};

impl TcpQueue {
    /// True while the transmit buffer may take more PDUs.
    fn tx_room(&self) -> bool {
        self.tx.len() - self.tx_sent < TX_BACKLOG_MAX
    }

    /// Turns as many of `tag`'s remaining units into commands as there
    /// are free command ids and room in the transmit buffer; true when all
    /// are issued.
    pub(super) fn issue(&mut self, tag: Tag) -> bool {
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

    /// Fills the transmit buffer while it has room: the H2CData the
    /// target asked for first (its commands hold resources on the target),
    /// then the commands of pending operations.
    pub(super) fn pump(&mut self) {
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

    /// Sends what the transmit buffer holds, as far as the socket takes it.
    pub(super) fn flush_tx(&mut self) -> std::result::Result<(), String> {
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
    pub(super) fn tx_pdu_end(&mut self) -> usize {
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

    /// Sends a H2CTermReq for `e` (best effort, never blocking) before the
    /// connection closes. When the socket has part of a PDU, the rest of
    /// that PDU goes first (the target would read a TermReq in its middle
    /// as its data); if the socket will not take it now, no TermReq goes.
    pub(super) fn terminate(&mut self, e: &TcpError) {
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
