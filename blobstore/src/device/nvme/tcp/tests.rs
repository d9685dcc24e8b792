//! The transport against a small in-process NVMe/TCP target on loopback:
//! the whole I/O path (in-capsule writes, R2T and H2CData, C2HData with and
//! without SUCCESS, digests, multi-command operations) and what a target
//! that breaks the protocol or goes away does to the I/O in flight. The
//! real target (Linux nvmet) is exercised in the VM test.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::pdu::{self, DataHeader, Framing, Header, IcResp, R2t, COMMON_HEADER_BYTES};
use super::*;
use crate::device::{channel, BlockDevice, ChannelBackend, DmaBuf, IoKind, IoOp, Lba, Segments};
use crate::exec::block_on;

const NQN: &str = "nqn.2024-01.io.blobstack:fake";
const BLOCK: usize = 512;
const BLOCKS: usize = 16384; // 8 MiB

/// What the fake target does wrong.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    None,
    /// C2HData for a command id that is not outstanding.
    UnknownCid,
    /// A C2HTermReq in place of read data.
    TermReq,
    /// Closes the connection on a read.
    Close,
    /// Never answers a read.
    Silent,
    /// C2HData past the command's data.
    OutOfRange,
    /// A wrong data digest on read data (C2HData with SUCCESS).
    BadDataDigest,
    /// A wrong data digest on the first of two C2HData PDUs of a read,
    /// then a successful response capsule.
    BadDataDigestThenResp,
    /// One R2T for all of a write's data (maybe more than MAXH2CDATA).
    WholeR2t,
    /// An error status on reads.
    MediaError,
    /// Closes the admin connection at the first Keep Alive.
    CloseOnKeepAlive,
    /// Sends large read data in two bursts with a pause between them (the
    /// host finds its buffer empty in the middle of a PDU's data).
    Trickle,
    /// Answers every read after `SLOW_READ_MS`.
    SlowReads,
    /// Before each write after the first, sends the last write's response
    /// again (a late duplicate).
    StaleResp,
    /// Reports writes that need an R2T done without asking for the data.
    EarlyWriteSuccess,
    /// Answers the ICReq with a C2HTermReq (and keeps the connection open).
    RefuseIcReq,
    /// Sends the answer to Identify Namespace a byte every `TRICKLE_MS`.
    TrickleAdmin,
    /// Reports Identify Namespace successful after half of its data.
    ShortIdentify,
}

/// Pause between the bytes of a [`Fault::TrickleAdmin`] answer.
const TRICKLE_MS: u64 = 100;

/// How long a [`Fault::SlowReads`] target takes per read.
const SLOW_READ_MS: u64 = 1000;

struct Target {
    port: u16,
    disk: Arc<Mutex<Vec<u8>>>,
    /// Read commands seen on I/O queues.
    reads: Arc<AtomicUsize>,
    /// Keep Alive commands seen.
    keep_alives: Arc<AtomicUsize>,
    /// While set, I/O queues read nothing from their sockets.
    paused: Arc<AtomicBool>,
    /// H2CData PDUs received.
    h2c_pdus: Arc<AtomicUsize>,
    /// H2CTermReqs received (each at a PDU boundary: framing held).
    term_reqs: Arc<AtomicUsize>,
}

/// How the fake target is set up.
#[derive(Clone, Copy)]
struct Cfg {
    /// MAXH2CDATA in the ICResp.
    maxh2cdata: u32,
    /// SO_RCVBUF of its sockets (small: the host's sends fill up soon).
    rcvbuf: Option<i32>,
}

const CFG: Cfg = Cfg {
    maxh2cdata: 64 << 10,
    rcvbuf: None,
};

/// State a serving thread shares with the test.
#[derive(Clone)]
struct Shared {
    disk: Arc<Mutex<Vec<u8>>>,
    reads: Arc<AtomicUsize>,
    keep_alives: Arc<AtomicUsize>,
    paused: Arc<AtomicBool>,
    h2c_pdus: Arc<AtomicUsize>,
    term_reqs: Arc<AtomicUsize>,
}

fn target(fault: Fault) -> Target {
    target_cfg(fault, CFG)
}

fn set_buf(fd: std::os::fd::RawFd, opt: libc::c_int, bytes: i32) {
    // SAFETY: a valid socket and a c_int option value.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt");
}

fn target_cfg(fault: Fault, cfg: Cfg) -> Target {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    if let Some(b) = cfg.rcvbuf {
        // Accepted sockets inherit it.
        set_buf(l.as_raw_fd(), libc::SO_RCVBUF, b);
    }
    let port = l.local_addr().unwrap().port();
    let t = Target {
        port,
        disk: Arc::new(Mutex::new(vec![0u8; BLOCK * BLOCKS])),
        reads: Arc::new(AtomicUsize::new(0)),
        keep_alives: Arc::new(AtomicUsize::new(0)),
        paused: Arc::new(AtomicBool::new(false)),
        h2c_pdus: Arc::new(AtomicUsize::new(0)),
        term_reqs: Arc::new(AtomicUsize::new(0)),
    };
    let sh = Shared {
        disk: t.disk.clone(),
        reads: t.reads.clone(),
        keep_alives: t.keep_alives.clone(),
        paused: t.paused.clone(),
        h2c_pdus: t.h2c_pdus.clone(),
        term_reqs: t.term_reqs.clone(),
    };
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let sh = sh.clone();
            std::thread::spawn(move || {
                let _ = serve(s, fault, cfg, &sh);
            });
        }
    });
    t
}

fn read_pdu(s: &mut TcpStream, f: Framing) -> std::io::Result<(Header, Vec<u8>)> {
    let mut common = [0u8; COMMON_HEADER_BYTES];
    s.read_exact(&mut common)?;
    let p = pdu::plan(&common, f, true).expect("host PDU header");
    let mut buf = vec![0u8; p.pdu_bytes()];
    buf[..8].copy_from_slice(&common);
    s.read_exact(&mut buf[8..])?;
    let (h, data) = pdu::parse_pdu(&buf, f, true).expect("host PDU");
    Ok((h, data.to_vec()))
}

fn resp(cid: u16, dw0: u32, sct: u8, sc: u8) -> Header {
    Header::CapsuleResp(Completion {
        dw0,
        sq_head: 0,
        sq_id: 0,
        cid,
        phase: false,
        sc,
        sct,
        dnr: true,
    })
}

fn serve(mut s: TcpStream, fault: Fault, cfg: Cfg, sh: &Shared) -> std::io::Result<()> {
    let (disk, reads, keep_alives) = (&*sh.disk, &*sh.reads, &*sh.keep_alives);
    let h2c_pdus = &*sh.h2c_pdus;
    let mut out = Vec::new();
    let (h, _) = read_pdu(&mut s, Framing::default())?;
    let Header::IcReq(req) = h else {
        panic!("no ICReq")
    };
    let f = req.digests;
    if fault == Fault::RefuseIcReq {
        let h = Header::TermReq {
            from_host: false,
            fes: pdu::fes::UNSUPPORTED_PARAMETER,
            fei: 11,
        };
        pdu::encode_pdu(&mut out, &h, &[], Framing::default(), 4);
        s.write_all(&out)?;
        std::thread::sleep(Duration::from_secs(5));
        return Ok(());
    }
    pdu::encode_pdu(
        &mut out,
        &Header::IcResp(IcResp {
            pfv: 0,
            cpda: 0,
            digests: f,
            maxh2cdata: cfg.maxh2cdata,
        }),
        &[],
        Framing::default(),
        4,
    );
    let mut qid = 0;
    let mut sqflow_off = false;
    // Commands that came while a write waited for its data.
    let mut backlog = std::collections::VecDeque::new();
    let mut last_write = None;
    loop {
        s.write_all(&out)?;
        out.clear();
        while qid != 0 && sh.paused.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        let (h, data) = match backlog.pop_front() {
            Some(p) => p,
            None => read_pdu(&mut s, f)?,
        };
        if let Header::TermReq { .. } = h {
            sh.term_reqs.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        }
        let Header::CapsuleCmd(d) = h else {
            panic!("expected a command, got {h:?}")
        };
        let (opcode, cid) = (d[0] as u8, (d[0] >> 16) as u16);
        let sgl_len = d[8] as usize;
        let lba = d[10] as usize | (d[11] as usize) << 32;
        let blocks = (d[12] & 0xffff) as usize + 1;
        let send_data = |out: &mut Vec<u8>, bytes: &[u8], success: bool| {
            let h = Header::C2hData(DataHeader {
                cccid: cid,
                ttag: 0,
                datao: 0,
                datal: bytes.len() as u32,
                last: true,
                success,
            });
            pdu::encode_pdu(out, &h, &[bytes], f, 4);
        };
        match (qid, opcode) {
            (_, 0x7F) => match d[1] as u8 {
                0x01 => {
                    qid = (d[10] >> 16) as u16;
                    sqflow_off = (d[11] >> 16) & 4 != 0;
                    assert_eq!(&data[256..256 + NQN.len()], NQN.as_bytes());
                    pdu::encode_pdu(&mut out, &resp(cid, 1, 0, 0), &[], f, 4);
                }
                0x04 => {
                    // CAP: MQES 255, TO 1; CSTS: ready.
                    let v = if d[11] == 0 { 255 | 1 << 24 } else { 1 };
                    pdu::encode_pdu(&mut out, &resp(cid, v, 0, 0), &[], f, 4);
                }
                _ => pdu::encode_pdu(&mut out, &resp(cid, 0, 0, 0), &[], f, 4),
            },
            (0, 0x06) => {
                let mut page = vec![0u8; 4096];
                if d[10] == 1 {
                    page[516..520].copy_from_slice(&1u32.to_le_bytes());
                    page[520] = 0b1100; // DSM, Write Zeroes
                                        // IOCCSZ: the SQE and 8 KiB.
                    page[1792..1796].copy_from_slice(&(((64 + 8192) / 16) as u32).to_le_bytes());
                } else if d[10] == 2 {
                    page[0] = 1; // the active namespace list: 1
                } else {
                    page[0..8].copy_from_slice(&(BLOCKS as u64).to_le_bytes());
                    page[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
                }
                let page = if fault == Fault::ShortIdentify && d[10] == 0 {
                    &page[..2048]
                } else {
                    &page[..]
                };
                send_data(&mut out, page, false);
                pdu::encode_pdu(&mut out, &resp(cid, 0, 0, 0), &[], f, 4);
                if fault == Fault::TrickleAdmin && d[10] == 0 {
                    // Never silent for long, never done: stops only when the
                    // host closes the connection.
                    for b in out.drain(..) {
                        s.write_all(&[b])?;
                        std::thread::sleep(Duration::from_millis(TRICKLE_MS));
                    }
                }
            }
            (0, 0x18) => {
                keep_alives.fetch_add(1, Ordering::SeqCst);
                if fault == Fault::CloseOnKeepAlive {
                    return Ok(());
                }
                pdu::encode_pdu(&mut out, &resp(cid, 0, 0, 0), &[], f, 4);
            }
            (0, _) => pdu::encode_pdu(&mut out, &resp(cid, 0, 0, 0), &[], f, 4),
            (_, 0x02) => {
                let n = reads.fetch_add(1, Ordering::SeqCst);
                if fault == Fault::SlowReads {
                    std::thread::sleep(Duration::from_millis(SLOW_READ_MS));
                }
                let bytes = disk.lock().unwrap()[lba * BLOCK..(lba + blocks) * BLOCK].to_vec();
                assert_eq!(bytes.len(), sgl_len);
                // Let the first read of each connection through, so faults
                // hit a queue in use.
                let fault = if n.is_multiple_of(2) {
                    Fault::None
                } else {
                    fault
                };
                match fault {
                    Fault::UnknownCid => {
                        let h = Header::C2hData(DataHeader {
                            cccid: cid ^ 0x200,
                            ttag: 0,
                            datao: 0,
                            datal: 512,
                            last: true,
                            success: false,
                        });
                        pdu::encode_pdu(&mut out, &h, &[&bytes[..512]], f, 4);
                    }
                    Fault::TermReq => {
                        let h = Header::TermReq {
                            from_host: false,
                            fes: pdu::fes::DATA_OUT_OF_RANGE,
                            fei: 0,
                        };
                        pdu::encode_pdu(&mut out, &h, &[], f, 4);
                    }
                    Fault::Close => return Ok(()),
                    Fault::Silent => {}
                    Fault::OutOfRange => {
                        let mut more = bytes.clone();
                        more.extend_from_slice(&[0; 512]);
                        send_data(&mut out, &more, false);
                    }
                    Fault::BadDataDigest => {
                        send_data(&mut out, &bytes, sqflow_off);
                        let n = out.len();
                        out[n - 1] ^= 0xff;
                    }
                    Fault::BadDataDigestThenResp => {
                        let half = bytes.len() / 2;
                        for (at, last) in [(0, false), (half, true)] {
                            let h = Header::C2hData(DataHeader {
                                cccid: cid,
                                ttag: 0,
                                datao: at as u32,
                                datal: half as u32,
                                last,
                                success: false,
                            });
                            pdu::encode_pdu(&mut out, &h, &[&bytes[at..at + half]], f, 4);
                            if at == 0 {
                                let n = out.len();
                                out[n - 2] ^= 0x10;
                            }
                        }
                        pdu::encode_pdu(&mut out, &resp(cid, 0, 0, 0), &[], f, 4);
                    }
                    Fault::MediaError => {
                        pdu::encode_pdu(&mut out, &resp(cid, 0, 2, 0x81), &[], f, 4);
                    }
                    Fault::None
                    | Fault::WholeR2t
                    | Fault::CloseOnKeepAlive
                    | Fault::Trickle
                    | Fault::SlowReads
                    | Fault::StaleResp
                    | Fault::EarlyWriteSuccess
                    | Fault::RefuseIcReq
                    | Fault::TrickleAdmin
                    | Fault::ShortIdentify => {
                        // Big reads in two PDUs, to cover datao.
                        if bytes.len() > 8192 {
                            let h = Header::C2hData(DataHeader {
                                cccid: cid,
                                ttag: 0,
                                datao: 0,
                                datal: 4096,
                                last: false,
                                success: false,
                            });
                            pdu::encode_pdu(&mut out, &h, &[&bytes[..4096]], f, 4);
                            let h = Header::C2hData(DataHeader {
                                cccid: cid,
                                ttag: 0,
                                datao: 4096,
                                datal: bytes.len() as u32 - 4096,
                                last: true,
                                success: sqflow_off,
                            });
                            pdu::encode_pdu(&mut out, &h, &[&bytes[4096..]], f, 4);
                        } else {
                            send_data(&mut out, &bytes, sqflow_off);
                        }
                        if !sqflow_off {
                            pdu::encode_pdu(&mut out, &resp(cid, 0, 0, 0), &[], f, 4);
                        }
                        if fault == Fault::Trickle && bytes.len() > 8192 {
                            let cut = out.len() / 3;
                            s.write_all(&out[..cut])?;
                            std::thread::sleep(Duration::from_millis(30));
                            out.drain(..cut);
                        }
                    }
                }
            }
            (_, 0x01) if fault == Fault::EarlyWriteSuccess && data.is_empty() => {
                pdu::encode_pdu(&mut out, &resp(cid, 0, 0, 0), &[], f, 4);
            }
            (_, 0x01) => {
                if let Some(last) = last_write
                    .replace(cid)
                    .filter(|_| fault == Fault::StaleResp)
                {
                    pdu::encode_pdu(&mut out, &resp(last, 0, 0, 0), &[], f, 4);
                    s.write_all(&out)?;
                    out.clear();
                    std::thread::sleep(Duration::from_millis(50));
                }
                let bytes = if data.is_empty() {
                    // Ask for the data (two R2Ts for large writes).
                    let mut got = Vec::new();
                    while got.len() < sgl_len {
                        let want = if fault == Fault::WholeR2t {
                            sgl_len
                        } else {
                            (sgl_len - got.len()).min(32 << 10)
                        };
                        let h = Header::R2t(R2t {
                            cccid: cid,
                            ttag: 7,
                            r2to: got.len() as u32,
                            r2tl: want as u32,
                        });
                        pdu::encode_pdu(&mut out, &h, &[], f, 4);
                        s.write_all(&out)?;
                        out.clear();
                        let end = got.len() + want;
                        while got.len() < end {
                            let (h, d) = read_pdu(&mut s, f)?;
                            if let Header::CapsuleCmd(_) = h {
                                backlog.push_back((h, d));
                                continue;
                            }
                            let Header::H2cData(dh) = h else {
                                panic!("expected H2CData, got {h:?}")
                            };
                            assert_eq!((dh.cccid, dh.ttag, dh.datao as usize), (cid, 7, got.len()));
                            assert!(
                                d.len() <= cfg.maxh2cdata as usize,
                                "H2CData over MAXH2CDATA"
                            );
                            assert_eq!(dh.last, got.len() + d.len() == end, "LAST_PDU");
                            h2c_pdus.fetch_add(1, Ordering::SeqCst);
                            got.extend_from_slice(&d);
                        }
                    }
                    got
                } else {
                    data
                };
                assert_eq!(bytes.len(), blocks * BLOCK);
                disk.lock().unwrap()[lba * BLOCK..(lba + blocks) * BLOCK].copy_from_slice(&bytes);
                pdu::encode_pdu(&mut out, &resp(cid, 0, 0, 0), &[], f, 4);
            }
            (_, 0x08) => {
                disk.lock().unwrap()[lba * BLOCK..(lba + blocks) * BLOCK].fill(0);
                pdu::encode_pdu(&mut out, &resp(cid, 0, 0, 0), &[], f, 4);
            }
            (_, 0x09) => {
                let n = u32::from_le_bytes(data[4..8].try_into().unwrap()) as usize;
                let at = u64::from_le_bytes(data[8..16].try_into().unwrap()) as usize;
                disk.lock().unwrap()[at * BLOCK..(at + n) * BLOCK].fill(0);
                pdu::encode_pdu(&mut out, &resp(cid, 0, 0, 0), &[], f, 4);
            }
            _ => pdu::encode_pdu(&mut out, &resp(cid, 0, 0, 0), &[], f, 4),
        }
    }
}

fn open(t: &Target, digest: bool, io_timeout: Duration) -> Arc<dyn BlockDevice> {
    Arc::new(open_with(t, digest, 8, io_timeout))
}

fn open_with(t: &Target, digest: bool, depth: u16, io_timeout: Duration) -> NvmeTcpDevice {
    let opts = TcpOptions {
        header_digest: digest,
        data_digest: digest,
        queue_depth: depth,
        io_timeout,
        ..Default::default()
    };
    NvmeTcpDevice::open(&format!("127.0.0.1:{}", t.port), NQN, 1, opts).unwrap()
}

/// An operation on `buf` (all of it) at `lba`, for driving a queue by hand.
fn op_on(kind: IoKind, lba: u64, buf: &DmaBuf) -> IoOp {
    IoOp {
        kind,
        lba: Lba(lba),
        blocks: (buf.len() / BLOCK) as u64,
        segs: Segments::one(buf.segment(0, buf.len())),
    }
}

/// Reaps (and waits) until `n` more operations of `q` are reported, or
/// `within` passes; returns what was reported.
fn reap_until(
    q: &mut io::TcpQueue,
    n: usize,
    within: Duration,
) -> Vec<(crate::device::Tag, crate::error::Result<()>)> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        q.reap(&mut |tag, r| got.push((tag, r)));
        if got.len() < n {
            q.wait();
        }
    }
    got
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i * 31 + seed * 7 + i / 512) as u8)
        .collect()
}

#[test]
fn reads_and_writes_of_every_shape_reach_the_target() {
    for digest in [false, true] {
        let t = target(Fault::None);
        let dev = open(&t, digest, Duration::from_secs(30));
        assert_eq!(dev.geometry().block_size, 512);
        assert_eq!(dev.geometry().block_count, BLOCKS as u64);
        assert!(
            dev.name().starts_with("nvme-tcp:127.0.0.1:"),
            "{}",
            dev.name()
        );
        let ch = channel(&dev).unwrap();
        // In-capsule (4 KiB, 8 KiB), R2T (12 KiB, 100 KiB: several R2Ts),
        // several commands (3 MiB).
        for (i, blocks) in [8usize, 16, 24, 200, 6144].into_iter().enumerate() {
            let lba = (i * 977) % (BLOCKS - blocks);
            let data = pattern(i + digest as usize, blocks * BLOCK);
            block_on(ch.write(Lba(lba as u64), DmaBuf::from_slice(&data).unwrap())).unwrap();
            assert_eq!(
                &t.disk.lock().unwrap()[lba * BLOCK..(lba + blocks) * BLOCK],
                &data[..],
                "write of {blocks} blocks landed"
            );
            let back =
                block_on(ch.read(Lba(lba as u64), DmaBuf::new(data.len()).unwrap())).unwrap();
            assert!(back[..] == data[..], "read of {blocks} blocks");
        }
        // Several segments in one operation.
        let parts = [pattern(9, 4096), pattern(10, 16384), pattern(11, 512)];
        let bufs: Vec<DmaBuf> = parts
            .iter()
            .map(|p| DmaBuf::from_slice(p).unwrap())
            .collect();
        block_on(ch.writev(Lba(100), bufs)).unwrap();
        let outs = vec![
            DmaBuf::new(512).unwrap(),
            DmaBuf::new(16384).unwrap(),
            DmaBuf::new(4096).unwrap(),
        ];
        let outs = block_on(ch.readv(Lba(100), outs)).unwrap();
        let all: Vec<u8> = outs.iter().flat_map(|b| b.to_vec()).collect();
        assert_eq!(all, parts.concat());
        block_on(ch.flush()).unwrap();
        block_on(ch.write_zeroes(Lba(100), 8)).unwrap();
        block_on(ch.unmap(Lba(108), 8)).unwrap();
        assert!(t.disk.lock().unwrap()[100 * BLOCK..116 * BLOCK]
            .iter()
            .all(|&b| b == 0));
        assert_ne!(t.disk.lock().unwrap()[116 * BLOCK], 0);
    }
}

#[test]
fn large_reads_arriving_in_bursts_land_intact() {
    for digest in [false, true] {
        let t = target(Fault::Trickle);
        let dev = open(&t, digest, Duration::from_secs(30));
        let ch = channel(&dev).unwrap();
        let data = pattern(5, 1 << 20);
        block_on(ch.write(Lba(64), DmaBuf::from_slice(&data).unwrap())).unwrap();
        for _ in 0..3 {
            let back = block_on(ch.read(Lba(64), DmaBuf::new(data.len()).unwrap())).unwrap();
            assert!(back[..] == data[..], "digest {digest}");
        }
        // Three 1 MiB reads, one command each.
        assert_eq!(t.reads.load(Ordering::SeqCst), 3);
    }
}

#[test]
fn many_operations_in_flight_on_several_threads() {
    let t = target(Fault::None);
    let dev = open(&t, false, Duration::from_secs(30));
    let threads: Vec<_> = (0..3)
        .map(|th| {
            let dev = dev.clone();
            std::thread::spawn(move || {
                let ch = channel(&dev).unwrap();
                // 20 operations at once on a queue of depth 8: some wait
                // for command ids.
                let base = th * 4096;
                let futs: Vec<_> = (0..20)
                    .map(|k| {
                        let data = pattern(th * 100 + k, 8 * BLOCK);
                        let ch = ch.clone();
                        async move {
                            ch.write(
                                Lba((base + k * 8) as u64),
                                DmaBuf::from_slice(&data).unwrap(),
                            )
                            .await
                            .unwrap();
                        }
                    })
                    .collect();
                block_on(futures::future::join_all(futs));
                for k in 0..20 {
                    let b = block_on(
                        ch.read(Lba((base + k * 8) as u64), DmaBuf::new(8 * BLOCK).unwrap()),
                    )
                    .unwrap();
                    assert!(b[..] == pattern(th * 100 + k, 8 * BLOCK)[..]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// A read after a good one meets `fault`: the error it gives, in bounded
/// time; later operations on the queue fail too (unless the fault is a
/// plain status).
fn fault_error(fault: Fault, digest: bool) -> String {
    let t = target(fault);
    let dev = open(&t, digest, Duration::from_millis(1500));
    let ch = channel(&dev).unwrap();
    block_on(ch.write(Lba(0), DmaBuf::from_slice(&pattern(1, 4096)).unwrap())).unwrap();
    // The first read passes.
    block_on(ch.read(Lba(0), DmaBuf::new(4096).unwrap())).unwrap();
    let start = Instant::now();
    let e = block_on(ch.read(Lba(0), DmaBuf::new(4096).unwrap())).unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{fault:?} took {:?}",
        start.elapsed()
    );
    assert!(t.reads.load(Ordering::SeqCst) >= 2);
    let after = block_on(ch.read(Lba(0), DmaBuf::new(4096).unwrap()));
    if matches!(
        fault,
        Fault::MediaError | Fault::BadDataDigest | Fault::BadDataDigestThenResp
    ) {
        // A status error, or bad data (a data digest error), fails that
        // operation only.
        let back = after.unwrap_or_else(|e| panic!("{fault:?}: the queue goes on: {e}"));
        assert!(back[..] == pattern(1, 4096)[..], "{fault:?}");
    } else {
        let a = after.unwrap_err().to_string();
        assert!(a.contains("lost"), "{fault:?}: later I/O: {a}");
    }
    e.to_string()
}

#[test]
fn target_misbehaviour_fails_the_io_with_a_clear_error() {
    let cases = [
        (Fault::UnknownCid, false, "not an outstanding read"),
        (Fault::TermReq, false, "data transfer out of range"),
        (Fault::Close, false, "connection closed by the controller"),
        (Fault::Silent, false, "device timeout"),
        (Fault::OutOfRange, false, "outside its 4096 bytes"),
        (Fault::BadDataDigest, true, "data digest error"),
        (Fault::BadDataDigestThenResp, true, "data digest error"),
        (Fault::MediaError, false, "UnrecoveredReadError"),
    ];
    for (fault, digest, want) in cases {
        let e = fault_error(fault, digest);
        assert!(e.contains(want), "{fault:?}: {e}");
    }
}

#[test]
fn a_command_issued_after_an_idle_spell_gets_its_whole_timeout() {
    // Each read takes the target SLOW_READ_MS; the I/O timeout is twice
    // that. Read A goes out, the thread does something else (no reap) for
    // longer than A takes, then submits read B: B's timeout must count
    // from B's submission, not from the last time the queue read its clock.
    let t = target(Fault::SlowReads);
    let dev = open_with(&t, false, 8, Duration::from_millis(2 * SLOW_READ_MS));
    let mut q = io::TcpQueue::new(&dev).unwrap();
    let (a, b) = (DmaBuf::new(4096).unwrap(), DmaBuf::new(4096).unwrap());
    q.submit(1, &op_on(IoKind::Read, 0, &a)).unwrap();
    // One reap sends A's capsule.
    assert_eq!(q.reap(&mut |_, _| panic!("nothing done yet")), 0);
    std::thread::sleep(Duration::from_millis(SLOW_READ_MS * 3 / 2));
    q.submit(2, &op_on(IoKind::Read, 8, &b)).unwrap();
    let mut got = reap_until(&mut q, 2, Duration::from_millis(6 * SLOW_READ_MS));
    got.sort_by_key(|g| g.0);
    assert_eq!(got.len(), 2);
    for (tag, r) in got {
        assert!(r.is_ok(), "read {tag}: {}", r.unwrap_err());
    }
}

#[test]
fn a_target_that_stops_reading_holds_submissions_back_not_the_transmit_buffer() {
    for resume in [true, false] {
        let cfg = Cfg {
            rcvbuf: Some(16 << 10),
            ..CFG
        };
        let t = target_cfg(Fault::None, cfg);
        let dev = open_with(&t, false, 128, Duration::from_millis(1500));
        let mut q = io::TcpQueue::new(&dev).unwrap();
        set_buf(q.socket().as_raw_fd(), libc::SO_SNDBUF, 16 << 10);
        t.paused.store(true, Ordering::SeqCst);
        // 128 in-capsule writes of 8 KiB, 1 MiB in all: far more than the
        // socket buffers and the backlog cap hold.
        let n = 128;
        let bufs: Vec<DmaBuf> = (0..n)
            .map(|i| DmaBuf::from_slice(&pattern(i, 8192)).unwrap())
            .collect();
        let pdu_max = 8192 + 256;
        let bound = 2 * (io::TX_BACKLOG_MAX + pdu_max);
        for (i, b) in bufs.iter().enumerate() {
            q.submit(i as u32, &op_on(IoKind::Write, i as u64 * 16, b))
                .unwrap();
            assert!(q.tx_state().0 <= bound);
        }
        // The target's thread was already waiting for the first command
        // when it was paused: that one may complete.
        let mut got = Vec::new();
        for _ in 0..100 {
            q.reap(&mut |tag, r| got.push((tag, r)));
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            got.len() <= 1,
            "{} done while the target reads nothing",
            got.len()
        );
        let (len, unsent, pending, free) = q.tx_state();
        assert!(len <= bound, "transmit buffer {len} bytes");
        assert!(unsent >= io::TX_BACKLOG_MAX, "{unsent} bytes unsent");
        assert!(
            pending > 0 && free > 0,
            "held back by the backlog cap, not by command ids: {pending} pending, {free} free"
        );
        if resume {
            t.paused.store(false, Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(30);
            while got.len() < n && Instant::now() < deadline {
                q.reap(&mut |tag, r| got.push((tag, r)));
                assert!(q.tx_state().0 <= bound);
                q.wait();
            }
            assert_eq!(got.len(), n);
            assert!(got.iter().all(|g| g.1.is_ok()));
            let disk = t.disk.lock().unwrap();
            for i in 0..n {
                let at = i * 16 * BLOCK;
                assert!(disk[at..at + 8192] == pattern(i, 8192)[..], "write {i}");
            }
        } else {
            // The target never reads again: everything fails, the oldest
            // commands with the timeout, in bounded time.
            let rest = reap_until(&mut q, n - got.len(), Duration::from_secs(10));
            assert_eq!(got.len() + rest.len(), n);
            assert!(rest.iter().all(|g| g.1.is_err()));
            assert!(rest
                .iter()
                .any(|g| matches!(g.1, Err(Error::Timeout { .. }))));
            t.paused.store(false, Ordering::SeqCst);
        }
    }
}

#[test]
fn responses_that_cannot_be_true_fail_the_queue_not_complete_the_wrong_command() {
    // A late duplicate of a write's response, arriving once the next write
    // took its slot: the generation in the command id tells them apart.
    let t = target(Fault::StaleResp);
    let dev = open_with(&t, false, 1, Duration::from_secs(5));
    let mut q = io::TcpQueue::new(&dev).unwrap();
    let (a, b) = (
        DmaBuf::from_slice(&pattern(1, 4096)).unwrap(),
        DmaBuf::from_slice(&pattern(2, 4096)).unwrap(),
    );
    q.submit(1, &op_on(IoKind::Write, 0, &a)).unwrap();
    let got = reap_until(&mut q, 1, Duration::from_secs(5));
    assert!(matches!(got[..], [(1, Ok(()))]));
    q.submit(2, &op_on(IoKind::Write, 8, &b)).unwrap();
    let got = reap_until(&mut q, 1, Duration::from_secs(5));
    let [(2, Err(e))] = &got[..] else {
        panic!("the duplicate must not complete write 2")
    };
    assert!(e.to_string().contains("not an outstanding command"), "{e}");

    // Success for a write that needs an R2T, with no R2T: its data never
    // moved.
    let t = target(Fault::EarlyWriteSuccess);
    let dev = open(&t, false, Duration::from_secs(5));
    let ch = channel(&dev).unwrap();
    let e =
        block_on(ch.write(Lba(0), DmaBuf::from_slice(&pattern(3, 64 << 10)).unwrap())).unwrap_err();
    assert!(
        e.to_string().contains("success for write command")
            && e.to_string().contains("after 0 of its 65536 bytes"),
        "{e}"
    );
}

#[test]
fn a_term_req_never_lands_in_the_middle_of_a_pdu() {
    let cfg = Cfg {
        rcvbuf: Some(16 << 10),
        ..CFG
    };
    let t = target_cfg(Fault::None, cfg);
    let dev = open_with(&t, false, 64, Duration::from_secs(30));
    let mut q = io::TcpQueue::new(&dev).unwrap();
    set_buf(q.socket().as_raw_fd(), libc::SO_SNDBUF, 16 << 10);
    t.paused.store(true, Ordering::SeqCst);
    let bufs: Vec<DmaBuf> = (0..64)
        .map(|i| DmaBuf::from_slice(&pattern(i, 8192)).unwrap())
        .collect();
    for (i, b) in bufs.iter().enumerate() {
        q.submit(i as u32, &op_on(IoKind::Write, i as u64 * 16, b))
            .unwrap();
    }
    let mut done = 0;
    for _ in 0..20 {
        done += q.reap(&mut |_, _| {});
        std::thread::sleep(Duration::from_millis(1));
    }
    // The socket is full, with part of a PDU in it.
    assert!(q.tx_mid_pdu());
    // The target reads what the socket has (and waits for the rest of
    // that PDU); then the host meets a violation.
    t.paused.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    q.fail_for_test(pdu::TcpError::UnknownType(0x42));
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.term_reqs.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        t.term_reqs.load(Ordering::SeqCst),
        1,
        "the target found no H2CTermReq at a PDU boundary"
    );
    done += reap_until(&mut q, 64 - done, Duration::from_secs(1)).len();
    assert_eq!(done, 64);
}

#[test]
fn a_bad_data_digest_fails_only_its_read() {
    for fault in [Fault::BadDataDigest, Fault::BadDataDigestThenResp] {
        let t = target(fault);
        let dev = open(&t, true, Duration::from_secs(5));
        let ch = channel(&dev).unwrap();
        let data = pattern(3, 8192);
        block_on(ch.write(Lba(8), DmaBuf::from_slice(&data).unwrap())).unwrap();
        // Reads alternate: good, bad digest, good, ...
        for i in 0..4 {
            let r = block_on(ch.read(Lba(8), DmaBuf::new(data.len()).unwrap()));
            if i % 2 == 0 {
                assert!(r.unwrap()[..] == data[..], "{fault:?} read {i}");
            } else {
                let e = r.unwrap_err();
                assert!(
                    matches!(e, Error::Io { .. }) && e.to_string().contains("data digest error"),
                    "{fault:?}: {e}"
                );
            }
        }
    }
}

#[test]
fn an_r2t_beyond_maxh2cdata_goes_in_several_h2cdata_pdus() {
    // MAXH2CDATA 5000: a multiple of 4 and of no block size. Commands stay
    // whole blocks (their size does not depend on it), and one R2T for a
    // whole 1 MiB command is answered with H2CData PDUs of at most 5000
    // bytes (the fake target checks each, and LAST_PDU on the last).
    for digest in [false, true] {
        let cfg = Cfg {
            maxh2cdata: 5000,
            ..CFG
        };
        let t = target_cfg(Fault::WholeR2t, cfg);
        let dev: Arc<dyn BlockDevice> = Arc::new(open_with(&t, digest, 8, Duration::from_secs(30)));
        let g = dev.geometry();
        assert_eq!(g.max_transfer_bytes, 1 << 20);
        let ch = channel(&dev).unwrap();
        for (i, blocks) in [24usize, 200, 4096 + 7].into_iter().enumerate() {
            let lba = 3 + i * 5000;
            let data = pattern(i + 40, blocks * BLOCK);
            block_on(ch.write(Lba(lba as u64), DmaBuf::from_slice(&data).unwrap())).unwrap();
            assert!(
                t.disk.lock().unwrap()[lba * BLOCK..(lba + blocks) * BLOCK] == data[..],
                "write of {blocks} blocks landed where it belongs"
            );
            let back =
                block_on(ch.read(Lba(lba as u64), DmaBuf::new(data.len()).unwrap())).unwrap();
            assert!(back[..] == data[..], "read of {blocks} blocks");
        }
        // R2Ts of 12 KiB, 100 KiB, and 1 MiB twice (the last 3.5 KiB of
        // the 2 MiB write go in its capsule): at 5000 bytes a PDU.
        let want: usize = [12288usize, 102400, 1 << 20, 1 << 20]
            .iter()
            .map(|b| b.div_ceil(5000))
            .sum();
        assert_eq!(t.h2c_pdus.load(Ordering::SeqCst), want);
    }
}

#[test]
fn a_missing_namespace_is_refused_clearly() {
    let t = target(Fault::None);
    let ctrl =
        NvmeTcpController::connect(&format!("127.0.0.1:{}", t.port), NQN, TcpOptions::default())
            .unwrap();
    assert_eq!(ctrl.cntlid(), 1);
    assert_eq!(ctrl.in_capsule_bytes(), 8192);
    let all = ctrl.namespaces().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!((all[0].0, all[0].1.block_size), (1, 512));
    let e = NvmeTcpDevice::from_controller(ctrl, 2).err().unwrap();
    assert!(e.to_string().contains("namespace 2 does not exist"), "{e}");
}

#[test]
fn an_admin_command_has_a_deadline_and_its_failure_closes_the_admin_queue() {
    let t = target(Fault::TrickleAdmin);
    let opts = TcpOptions {
        admin_timeout: Duration::from_millis(10 * TRICKLE_MS),
        keep_alive: Duration::ZERO,
        ..Default::default()
    };
    let ctrl = NvmeTcpController::connect(&format!("127.0.0.1:{}", t.port), NQN, opts).unwrap();
    assert!(!ctrl.is_failed());
    // The answer comes a byte per TRICKLE_MS: no read waits the whole
    // timeout, but the command as a whole must end by it.
    let start = Instant::now();
    let e = ctrl.namespace(1).unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(e, Error::Timeout { op: "Identify Namespace", after_ms, .. } if after_ms == 10 * TRICKLE_MS),
        "{e}"
    );
    assert!(took < Duration::from_millis(15 * TRICKLE_MS), "{took:?}");
    // The admin connection is mid-PDU now: closed, the controller failed,
    // and the next command says so at once (no late bytes taken for its
    // answer).
    assert!(ctrl.is_failed());
    let start = Instant::now();
    let e = ctrl.namespace(1).unwrap_err();
    assert!(start.elapsed() < Duration::from_millis(TRICKLE_MS));
    assert!(e.to_string().contains("admin queue closed"), "{e}");
    // Dropping it does not wait on anything.
    let start = Instant::now();
    drop(ctrl);
    assert!(start.elapsed() < Duration::from_millis(TRICKLE_MS));
}

#[test]
fn an_admin_success_without_all_its_data_is_an_error() {
    let t = target(Fault::ShortIdentify);
    let ctrl =
        NvmeTcpController::connect(&format!("127.0.0.1:{}", t.port), NQN, TcpOptions::default())
            .unwrap();
    let e = ctrl.namespace(1).unwrap_err();
    assert!(
        e.to_string().contains("after 2048 of its 4096 data bytes"),
        "{e}"
    );
}

#[test]
fn a_refused_icreq_is_reported_with_its_reason_at_once() {
    let t = target(Fault::RefuseIcReq);
    let opts = TcpOptions {
        admin_timeout: Duration::from_secs(3),
        ..Default::default()
    };
    let start = Instant::now();
    let e = NvmeTcpController::connect(&format!("127.0.0.1:{}", t.port), NQN, opts)
        .err()
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "waited for 128 bytes"
    );
    assert!(e.to_string().contains("unsupported parameter"), "{e}");
}

#[test]
fn keep_alives_go_on_the_admin_queue_and_a_lost_one_marks_the_controller_failed() {
    let opts = TcpOptions {
        keep_alive: Duration::from_millis(200),
        ..Default::default()
    };
    let t = target(Fault::None);
    let target_addr = format!("127.0.0.1:{}", t.port);
    let ctrl = NvmeTcpController::connect(&target_addr, NQN, opts.clone()).unwrap();
    std::thread::sleep(Duration::from_millis(650));
    let n = t.keep_alives.load(Ordering::SeqCst);
    assert!(
        (3..=8).contains(&n),
        "{n} keep-alives in 650 ms at one per 100 ms"
    );
    assert!(!ctrl.is_failed());
    // Dropping the controller stops its keep-alive thread at once.
    let start = Instant::now();
    drop(ctrl);
    assert!(start.elapsed() < Duration::from_millis(500));
    let n = t.keep_alives.load(Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        t.keep_alives.load(Ordering::SeqCst),
        n,
        "no keep-alive after the drop"
    );

    let t = target(Fault::CloseOnKeepAlive);
    let ctrl = NvmeTcpController::connect(&format!("127.0.0.1:{}", t.port), NQN, opts).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ctrl.is_failed() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ctrl.is_failed(), "a keep-alive the target never answered");
}
