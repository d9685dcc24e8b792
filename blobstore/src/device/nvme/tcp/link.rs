//! One NVMe/TCP connection in blocking mode: the connection setup
//! (ICReq/ICResp), and commands run to completion one at a time, as the
//! admin queue and each I/O queue's Fabrics Connect need them.
//!
//! Invariants:
//! - Every exchange (the connection setup, each command) has a deadline,
//!   the admin timeout from its start: each socket read and write waits at
//!   most for the time left, so a silent target, or one that trickles a
//!   byte at a time, gives `Error::Timeout`, never a hang.
//! - A PDU is read whole before it is parsed, its common header first; its
//!   length is bounded (`MAX_BLOCKING_PDU_BYTES`) before any buffer is
//!   sized from it.
//! - A successful completion means all the data asked for came.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::super::cmd::{Command, Completion};
use super::pdu::{
    self, DataHeader, Framing, Header, IcReq, TcpError, COMMON_HEADER_BYTES, MIN_MAXH2CDATA,
};
use super::{sgl, TcpOptions};
use crate::error::{Error, Result};

/// Largest PDU a blocking exchange accepts (admin data is a page or two).
const MAX_BLOCKING_PDU_BYTES: usize = 1 << 20;

/// A connected, initialized NVMe/TCP connection.
pub(crate) struct Link {
    pub(crate) sock: TcpStream,
    /// Digests in use.
    pub(crate) framing: Framing,
    /// Most data in one H2CData PDU.
    pub(crate) maxh2cdata: u32,
    /// Alignment of data in PDUs we send, bytes ((CPDA + 1) * 4).
    pub(crate) h2c_align: usize,
    /// The target, for errors.
    pub(crate) peer: String,
    /// Scratch for encoding PDUs.
    out: Vec<u8>,
    /// How long one exchange may take.
    timeout: Duration,
    /// When the exchange under way must be done, and what it is.
    deadline: Instant,
    what: &'static str,
}

/// An error of a setup exchange with `peer`.
pub(crate) fn setup_error(peer: &str, reason: impl std::fmt::Display) -> Error {
    Error::DeviceFailed {
        device: format!("nvme-tcp:{peer}"),
        reason: reason.to_string(),
    }
}

fn io_error(peer: &str, what: &str, e: std::io::Error) -> Error {
    Error::Os {
        context: format!("nvme-tcp:{peer}: {what}"),
        source: e,
    }
}

impl Link {
    /// Connects to `addr` and negotiates the connection (ICReq/ICResp),
    /// asking for the digests in `opts`.
    pub(crate) fn connect(addr: SocketAddr, peer: &str, opts: &TcpOptions) -> Result<Link> {
        let sock = TcpStream::connect_timeout(&addr, opts.connect_timeout)
            .map_err(|e| io_error(peer, "connect", e))?;
        sock.set_nodelay(true)
            .map_err(|e| io_error(peer, "TCP_NODELAY", e))?;
        let mut link = Link {
            sock,
            framing: Framing::default(),
            maxh2cdata: MIN_MAXH2CDATA,
            h2c_align: 4,
            peer: peer.to_string(),
            out: Vec::with_capacity(2048),
            timeout: opts.admin_timeout,
            deadline: Instant::now(),
            what: "",
        };
        link.begin("connection setup (ICReq)");
        let want = Framing {
            header_digest: opts.header_digest,
            data_digest: opts.data_digest,
        };
        let req = Header::IcReq(IcReq {
            pfv: 0,
            hpda: 0,
            digests: want,
            maxr2t: 0,
        });
        link.out.clear();
        pdu::encode_pdu(&mut link.out, &req, &[], Framing::default(), 4);
        link.send_out()?;
        // The common header first, then the rest as PLEN says: a target
        // that refuses the ICReq answers with a C2HTermReq (24 bytes and
        // up), whose reason is the error, not a wait for 128 bytes.
        let (header, _) = link.recv_pdu()?;
        let Header::IcResp(r) = header else {
            return Err(setup_error(
                peer,
                format!("connection setup: {}", reply_error(&header, "ICResp")),
            ));
        };
        let bad = |why: String| setup_error(peer, TcpError::Unsupported(why));
        if r.pfv != 0 {
            return Err(bad(format!("PDU format version {}", r.pfv)));
        }
        if r.cpda > 31 {
            return Err(bad(format!("CPDA {} above 31", r.cpda)));
        }
        if r.maxh2cdata < MIN_MAXH2CDATA || !r.maxh2cdata.is_multiple_of(4) {
            return Err(bad(format!(
                "MAXH2CDATA {} (at least {MIN_MAXH2CDATA}, a multiple of 4)",
                r.maxh2cdata
            )));
        }
        let extra = (r.digests.header_digest && !want.header_digest)
            || (r.digests.data_digest && !want.data_digest);
        if extra {
            return Err(bad(format!(
                "digests enabled that were not asked for ({:?})",
                r.digests
            )));
        }
        link.framing = r.digests;
        link.maxh2cdata = r.maxh2cdata;
        link.h2c_align = (r.cpda as usize + 1) * 4;
        Ok(link)
    }

    /// Starts the exchange `what`: it must be done within the timeout.
    fn begin(&mut self, what: &'static str) {
        self.what = what;
        self.deadline = Instant::now() + self.timeout;
    }

    fn timed_out(&self) -> Error {
        Error::Timeout {
            op: self.what,
            lba: 0,
            blocks: 0,
            after_ms: self.timeout.as_millis() as u64,
        }
    }

    /// The time left before the deadline, as the socket's read or write
    /// timeout; `Err` when none is left.
    fn arm(&self, write: bool) -> Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.timed_out());
        }
        let r = if write {
            self.sock.set_write_timeout(Some(left))
        } else {
            self.sock.set_read_timeout(Some(left))
        };
        r.map_err(|e| io_error(&self.peer, "socket timeout", e))
    }

    fn send_out(&mut self) -> Result<()> {
        let mut sent = 0;
        while sent < self.out.len() {
            self.arm(true)?;
            let rest = &self.out[sent..];
            // SAFETY: a valid buffer of `rest.len()` bytes. MSG_NOSIGNAL: a
            // target that closed the connection is an error here, not a
            // SIGPIPE that kills a host process whose main is C++ (db_bench).
            let n = unsafe {
                libc::send(
                    self.sock.as_raw_fd(),
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(match e.kind() {
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                        self.timed_out()
                    }
                    _ => io_error(&self.peer, "send", e),
                });
            }
            sent += n as usize;
        }
        Ok(())
    }

    /// Fills `buf` from the socket by the exchange's deadline.
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        let mut got = 0;
        while got < buf.len() {
            self.arm(false)?;
            match self.sock.read(&mut buf[got..]) {
                Ok(0) => return Err(setup_error(&self.peer, TcpError::Closed)),
                Ok(n) => got += n,
                Err(e) => match e.kind() {
                    std::io::ErrorKind::Interrupted => {}
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                        return Err(self.timed_out())
                    }
                    _ => return Err(io_error(&self.peer, "receive", e)),
                },
            }
        }
        Ok(())
    }

    /// Reads one whole PDU from the controller.
    fn recv_pdu(&mut self) -> Result<(Header, Vec<u8>)> {
        let mut common = [0u8; COMMON_HEADER_BYTES];
        self.read_exact(&mut common)?;
        let plan =
            pdu::plan(&common, self.framing, false).map_err(|e| setup_error(&self.peer, e))?;
        let len = plan.pdu_bytes();
        if len > MAX_BLOCKING_PDU_BYTES {
            return Err(setup_error(
                &self.peer,
                format!("a {len}-byte PDU during setup (at most {MAX_BLOCKING_PDU_BYTES})"),
            ));
        }
        let mut buf = vec![0u8; len];
        buf[..COMMON_HEADER_BYTES].copy_from_slice(&common);
        self.read_exact(&mut buf[COMMON_HEADER_BYTES..])?;
        let (h, data) =
            pdu::parse_pdu(&buf, self.framing, false).map_err(|e| setup_error(&self.peer, e))?;
        Ok((h, data.to_vec()))
    }

    /// Runs `cmd` (`what`, for errors) as command `cid` and waits for its
    /// completion, within the timeout: `write` goes in the capsule;
    /// `read_len` bytes come back in C2HData PDUs. Returns the completion
    /// (status unchecked) and the data read, all of it on success. After an
    /// `Err` the connection may be in the middle of a PDU: close it.
    pub(crate) fn exec(
        &mut self,
        cid: u16,
        mut cmd: Command,
        write: &[u8],
        read_len: usize,
        what: &'static str,
    ) -> Result<(Completion, Vec<u8>)> {
        debug_assert!(write.is_empty() || read_len == 0);
        self.begin(what);
        if write.is_empty() {
            sgl::set_transport(&mut cmd, read_len as u32);
        } else {
            sgl::set_in_capsule(&mut cmd, write.len() as u32);
        }
        self.out.clear();
        let data: &[&[u8]] = if write.is_empty() { &[] } else { &[write] };
        pdu::encode_pdu(
            &mut self.out,
            &Header::CapsuleCmd(cmd.encode(cid)),
            data,
            self.framing,
            self.h2c_align,
        );
        self.send_out()?;
        let mut got = vec![0u8; read_len];
        let mut filled = 0usize;
        let short = |filled: usize| TcpError::Unexpected {
            pdu: "CapsuleResp",
            why: format!("success for command {cid} after {filled} of its {read_len} data bytes"),
        };
        loop {
            let (h, data) = self.recv_pdu()?;
            match h {
                Header::CapsuleResp(c) if c.cid == cid => {
                    if c.status().is_ok() && filled != read_len {
                        return Err(setup_error(&self.peer, short(filled)));
                    }
                    return Ok((c, got));
                }
                Header::C2hData(d) if d.cccid == cid => {
                    let end = d.datao as usize + data.len();
                    if d.datao as usize != filled || end > read_len {
                        return Err(setup_error(
                            &self.peer,
                            TcpError::DataOutOfRange {
                                pdu: "C2HData",
                                cid,
                                offset: d.datao,
                                len: d.datal,
                                cmd_len: read_len,
                                why: ", or not in order",
                            },
                        ));
                    }
                    got[filled..end].copy_from_slice(&data);
                    filled = end;
                    if d.success {
                        if filled != read_len {
                            return Err(setup_error(&self.peer, short(filled)));
                        }
                        return Ok((success(cid), got));
                    }
                }
                Header::R2t(r) if r.cccid == cid => {
                    self.send_h2c(cid, r.ttag, r.r2to, r.r2tl, write)?;
                }
                other => {
                    return Err(setup_error(
                        &self.peer,
                        reply_error(&other, "a reply to it"),
                    ));
                }
            }
        }
    }

    /// Sends `write[r2to..r2to + r2tl]` as H2CData PDUs of at most
    /// MAXH2CDATA bytes.
    fn send_h2c(&mut self, cid: u16, ttag: u16, r2to: u32, r2tl: u32, write: &[u8]) -> Result<()> {
        let (start, len) = (r2to as usize, r2tl as usize);
        if len == 0 || start + len > write.len() {
            return Err(setup_error(
                &self.peer,
                TcpError::DataOutOfRange {
                    pdu: "R2T",
                    cid,
                    offset: r2to,
                    len: r2tl,
                    cmd_len: write.len(),
                    why: "",
                },
            ));
        }
        let mut off = start;
        while off < start + len {
            let n = (start + len - off).min(self.maxh2cdata as usize);
            let h = Header::H2cData(DataHeader {
                cccid: cid,
                ttag,
                datao: off as u32,
                datal: n as u32,
                last: off + n == start + len,
                success: false,
            });
            self.out.clear();
            pdu::encode_pdu(
                &mut self.out,
                &h,
                &[&write[off..off + n]],
                self.framing,
                self.h2c_align,
            );
            self.send_out()?;
            off += n;
        }
        Ok(())
    }
}

/// A successful completion of `cid` (for C2HData with SUCCESS).
pub(crate) fn success(cid: u16) -> Completion {
    Completion {
        dw0: 0,
        sq_head: 0,
        sq_id: 0,
        cid,
        phase: false,
        sc: 0,
        sct: 0,
        dnr: false,
    }
}

/// The error for a PDU `h` that came instead of `expected`.
fn reply_error(h: &Header, expected: &str) -> TcpError {
    match h {
        Header::TermReq { fes, fei, .. } => TcpError::TerminatedByController {
            fes: *fes,
            fei: *fei,
        },
        other => TcpError::Unexpected {
            pdu: header_name(other),
            why: format!("waiting for {expected}"),
        },
    }
}

/// The PDU name of a parsed header.
pub(crate) fn header_name(h: &Header) -> &'static str {
    match h {
        Header::IcReq(_) => "ICReq",
        Header::IcResp(_) => "ICResp",
        Header::TermReq {
            from_host: true, ..
        } => "H2CTermReq",
        Header::TermReq { .. } => "C2HTermReq",
        Header::CapsuleCmd(_) => "CapsuleCmd",
        Header::CapsuleResp(_) => "CapsuleResp",
        Header::H2cData(_) => "H2CData",
        Header::C2hData(_) => "C2HData",
        Header::R2t(_) => "R2T",
    }
}
