//! Reception: PDUs read from the socket into the receive buffer (or a
//! large read's data straight into its memory), checked and parsed in
//! place, read data copied where it belongs, R2Ts queued for `submit`,
//! and commands completed.
//!
//! Invariants:
//! - A PDU is acted on once its header is whole and checked; a PDU for a
//!   command id that is not outstanding, or data outside its command's
//!   range or out of order, is an error that kills the connection.
//! - A data digest error fails only the read it belongs to.

use std::io::Read;
use std::os::fd::AsRawFd;

use super::{for_each_piece, slot, Cmd, TcpQueue, FREE_CMD};
use crate::device::nvme::cmd::Completion;
use crate::device::nvme::tcp::link::{header_name, success};
use crate::device::nvme::tcp::pdu::{self, DataHeader, Header, TcpError, COMMON_HEADER_BYTES};
use crate::error::Error;

/// Most `recv` calls per reap.
const RECVS_PER_REAP: usize = 8;
/// Data still to come of a C2HData at which, with nothing buffered, it is
/// received straight into the read's memory.
const DIRECT_RECV_MIN: usize = 16 << 10;

/// Where the receive side is in the PDU stream.
pub(super) enum Rx {
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

impl TcpQueue {
    /// Receives and handles PDUs; `Err` kills the connection.
    pub(super) fn receive(&mut self) -> std::result::Result<(), TcpError> {
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
}

fn success_completion(cid: u16) -> Completion {
    success(cid)
}
