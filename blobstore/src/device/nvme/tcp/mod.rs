//! `NvmeTcpDevice`: an NVMe/TCP host transport in userspace, one namespace
//! of a remote controller (Linux `nvmet`, SPDK's `nvmf_tgt`, an array) as
//! a [`BlockDevice`]; spec `nvme-tcp:HOST:PORT/NQN/ns=N`.
//!
//! Layout: `pdu` (PDU encoding and parsing, pure), `link` (a blocking
//! connection: setup and one command at a time, for the admin queue and
//! connecting I/O queues), `io` (the per-thread I/O queue, non-blocking),
//! and here the controller and the device.
//!
//! What opening does: connect the admin queue (ICReq/ICResp, digests as
//! asked), Fabrics Connect (QID 0, dynamic controller: CNTLID 0xFFFF),
//! Property Get CAP, Property Set CC.EN and wait for CSTS.RDY, Identify
//! Controller and Namespace. Each thread's channel is then its own I/O
//! queue on its own TCP connection (Fabrics Connect with the admin
//! queue's CNTLID and a QID of its own), polled by that thread: reads come
//! back as C2HData, writes go in the command capsule when they fit
//! (IOCCSZ, ICDOFF 0) and as H2CData on the target's R2T otherwise.
//!
//! Keep-alive: a small thread per controller sends Keep Alive on the admin
//! queue every KATO/2 and does nothing else; the data path never waits
//! for it (it only shares the admin mutex with setup). A transport error
//! or timeout on the admin queue (a keep-alive's or any command's) closes
//! the admin connection and marks the controller failed
//! ([`NvmeTcpController::is_failed`]): later admin commands fail at once;
//! its I/O queues find out on their own connections.
//!
//! Invariants:
//! - Nothing the network sends makes the host panic or hang: every
//!   protocol violation is a `pdu::TcpError`, every admin exchange and
//!   every I/O command has a deadline.
//! - An operation is reported once; when a connection dies, every
//!   operation on it is reported failed (no memory of an operation is
//!   reached after it is reported: TCP has no DMA, and a dead connection is
//!   never read again).

mod io;
mod link;
pub(crate) mod pdu;
#[cfg(test)]
mod tests;

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::cmd::{
    admin_op, cns, parse_ns_list, Command, Completion, ControllerIdentity, NamespaceIdentity,
};
use crate::device::{BlockDevice, ChannelBackend, DeviceId, Geometry};
use crate::error::{Error, Result};
use link::{setup_error, Link};

/// Default I/O queue depth (commands outstanding per thread).
pub const DEFAULT_QUEUE_DEPTH: u16 = 128;
/// Largest I/O queue depth.
pub const MAX_QUEUE_DEPTH: u16 = crate::device::spec::MAX_TCP_QUEUE_DEPTH;
/// The IANA port of NVMe/TCP I/O controllers.
pub const DEFAULT_PORT: u16 = 4420;
/// Admin queue entries (SQSIZE 31).
const ADMIN_QUEUE_ENTRIES: u16 = 32;
/// Largest NQN, in bytes.
pub const MAX_NQN_BYTES: usize = crate::device::spec::MAX_NQN_BYTES;

/// How to reach and use a controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpOptions {
    /// This host's NQN (default: [`default_host_nqn`]).
    pub host_nqn: String,
    /// I/O queue depth per thread.
    pub queue_depth: u16,
    /// Ask for header digests.
    pub header_digest: bool,
    /// Ask for data digests.
    pub data_digest: bool,
    /// Keep Alive Timeout given to the controller (keep-alives go every
    /// half of it); zero: none.
    pub keep_alive: Duration,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Timeout of each admin exchange (and of connecting an I/O queue).
    pub admin_timeout: Duration,
    /// An I/O command not completed in this time fails its connection.
    pub io_timeout: Duration,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions {
            host_nqn: default_host_nqn(),
            queue_depth: DEFAULT_QUEUE_DEPTH,
            header_digest: false,
            data_digest: false,
            keep_alive: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            admin_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
        }
    }
}

/// This host's NQN: `/etc/nvme/hostnqn` when it exists (nvme-cli's), else
/// a UUID NQN derived from `/etc/machine-id` (or the boot id).
pub fn default_host_nqn() -> String {
    if let Ok(s) = std::fs::read_to_string("/etc/nvme/hostnqn") {
        let s = s.trim();
        if !s.is_empty() && s.len() <= MAX_NQN_BYTES {
            return s.to_string();
        }
    }
    let seed = ["/etc/machine-id", "/proc/sys/kernel/random/boot_id"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    let id = host_id(seed.trim());
    format!("nqn.2014-08.org.nvmexpress:uuid:{}", uuid_text(&id))
}

/// A 16-byte host identifier derived from `seed` (stable for a seed).
fn host_id(seed: &str) -> [u8; 16] {
    let mut id = [0u8; 16];
    for (i, chunk) in id.chunks_mut(4).enumerate() {
        let c = crc32c::crc32c_append((i as u32).wrapping_mul(0x9E37_79B9), seed.as_bytes());
        chunk.copy_from_slice(&c.to_le_bytes());
    }
    // A version 4 / variant 1 UUID layout.
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

fn uuid_text(id: &[u8; 16]) -> String {
    let h: Vec<String> = id.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

use crate::device::spec::check_nqn;

/// SGL descriptors in a command capsule (dwords 6 to 9, PSDT 01b).
pub(crate) mod sgl {
    use super::Command;

    /// Data Block descriptor, Offset subtype: in-capsule data.
    const IN_CAPSULE: u8 = 0x01;
    /// Transport SGL Data Block descriptor (transport specific subtype
    /// 0xA): data by C2HData or R2T/H2CData.
    const TRANSPORT: u8 = 0x5A;

    fn set(cmd: &mut Command, len: u32, id: u8) {
        cmd.psdt = 1;
        cmd.prp1 = 0;
        cmd.prp2 = len as u64 | (id as u64) << 56;
    }

    /// `len` bytes of data follow the command in its capsule.
    pub fn set_in_capsule(cmd: &mut Command, len: u32) {
        set(cmd, len, IN_CAPSULE);
    }

    /// `len` bytes of data go through data PDUs (0 for no data).
    pub fn set_transport(cmd: &mut Command, len: u32) {
        set(cmd, len, TRANSPORT);
    }
}

/// Fabrics commands (opcode 0x7F; the command type in byte 4).
mod fabrics {
    use super::Command;

    /// The Fabrics opcode.
    const OPCODE: u8 = 0x7F;
    const PROPERTY_SET: u32 = 0x00;
    const CONNECT: u32 = 0x01;
    const PROPERTY_GET: u32 = 0x04;
    /// Bytes of the Connect command's data.
    pub const CONNECT_DATA_BYTES: usize = 1024;
    /// CATTR bit 2: SQ flow control disabled (no SQHD to track; C2HData
    /// may carry SUCCESS in place of a response capsule).
    pub const DISABLE_SQ_FLOW: u8 = 1 << 2;

    /// Connect queue `qid` of `sqsize` (zero-based) entries.
    pub fn connect(qid: u16, sqsize: u16, cattr: u8, kato_ms: u32) -> Command {
        Command {
            opcode: OPCODE,
            // Byte 4 is the Fabrics command type (where NSID would be).
            nsid: CONNECT,
            // RECFMT 0 | QID; SQSIZE | CATTR; KATO.
            cdw: [
                (qid as u32) << 16,
                sqsize as u32 | (cattr as u32) << 16,
                kato_ms,
                0,
                0,
                0,
            ],
            ..Default::default()
        }
    }

    /// The Connect data: host id, controller id, subsystem and host NQNs.
    pub fn connect_data(
        host_id: &[u8; 16],
        cntlid: u16,
        subnqn: &str,
        hostnqn: &str,
    ) -> [u8; CONNECT_DATA_BYTES] {
        let mut d = [0u8; CONNECT_DATA_BYTES];
        d[..16].copy_from_slice(host_id);
        d[16..18].copy_from_slice(&cntlid.to_le_bytes());
        let sub = subnqn.as_bytes();
        let host = hostnqn.as_bytes();
        // Both are at most 223 bytes (checked when parsed): NUL-terminated
        // in their 256-byte fields.
        d[256..256 + sub.len().min(255)].copy_from_slice(&sub[..sub.len().min(255)]);
        d[512..512 + host.len().min(255)].copy_from_slice(&host[..host.len().min(255)]);
        d
    }

    /// Property Get of the 4- or 8-byte property at `offset`.
    pub fn property_get(offset: u32, eight: bool) -> Command {
        Command {
            opcode: OPCODE,
            nsid: PROPERTY_GET,
            cdw: [eight as u32, offset, 0, 0, 0, 0],
            ..Default::default()
        }
    }

    /// Property Set of the 4-byte property at `offset`.
    pub fn property_set(offset: u32, value: u32) -> Command {
        Command {
            opcode: OPCODE,
            nsid: PROPERTY_SET,
            cdw: [0, offset, value, 0, 0, 0],
            ..Default::default()
        }
    }
}

/// Property offsets (the PCIe register offsets).
mod prop {
    pub const CAP: u32 = 0x00;
    pub const CC: u32 = 0x14;
    pub const CSTS: u32 = 0x1C;
    /// CC: EN, I/O SQ entry size 2^6, I/O CQ entry size 2^4, NVM command
    /// set, 4 KiB pages.
    pub const CC_ENABLE: u32 = 1 | 6 << 16 | 4 << 20;
    pub const CSTS_RDY: u32 = 1;
    pub const CSTS_CFS: u32 = 2;
}

/// The admin queue: its connection and the next command id.
struct Admin {
    link: Link,
    next_cid: u16,
    /// Why the connection was closed: after a transport error (a timeout
    /// or a bad PDU, maybe mid-PDU) the stream is no longer framed, and a
    /// late answer could match a later command id; nothing goes on it again.
    closed: Option<String>,
    /// The controller's failed flag, set when the connection is closed.
    failed: Arc<AtomicBool>,
}

impl Admin {
    /// Runs an admin command; `Err` for a transport failure (which closes
    /// the admin connection and marks the controller failed) or an error
    /// status (`what` names the command).
    fn run(
        &mut self,
        cmd: Command,
        write: &[u8],
        read_len: usize,
        what: &'static str,
    ) -> Result<(Completion, Vec<u8>)> {
        if let Some(why) = &self.closed {
            return Err(setup_error(
                &self.link.peer,
                format!("{what}: the admin queue closed after an earlier error ({why})"),
            ));
        }
        self.next_cid = (self.next_cid + 1) % ADMIN_QUEUE_ENTRIES;
        let (c, data) = match self.link.exec(self.next_cid, cmd, write, read_len, what) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(target = %self.link.peer, error = %e, "nvme-tcp admin queue closed");
                let _ = self.link.sock.shutdown(std::net::Shutdown::Both);
                self.closed = Some(e.to_string());
                self.failed.store(true, Ordering::Relaxed);
                return Err(e);
            }
        };
        status_ok(&c, &self.link.peer, what)?;
        Ok((c, data))
    }
}

/// `Ok` when `c` succeeded, else an error naming the command.
fn status_ok(c: &Completion, peer: &str, what: &str) -> Result<()> {
    c.status()
        .map_err(|s| setup_error(peer, format!("{what} failed: {s}")))
}

/// A remote NVMe controller reached over NVMe/TCP: its admin queue, what
/// Identify said, and the keep-alive thread.
pub struct NvmeTcpController {
    addr: SocketAddr,
    /// `HOST:PORT` as given.
    peer: String,
    subnqn: String,
    opts: TcpOptions,
    host_id: [u8; 16],
    cntlid: u16,
    identity: ControllerIdentity,
    /// Most write data sent in a command capsule (0: none).
    in_capsule_bytes: usize,
    /// Controller's MQES + 1.
    max_queue_entries: u32,
    admin: Arc<Mutex<Admin>>,
    /// I/O queue ids in use (index = qid - 1).
    qids: Mutex<Vec<bool>>,
    failed: Arc<AtomicBool>,
    keep_alive: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

impl NvmeTcpController {
    /// Connects to the controller of subsystem `subnqn` at `target`
    /// (`HOST:PORT`) and enables it.
    pub fn connect(target: &str, subnqn: &str, opts: TcpOptions) -> Result<Arc<NvmeTcpController>> {
        check_nqn(subnqn).map_err(Error::InvalidArgument)?;
        check_nqn(&opts.host_nqn).map_err(Error::InvalidArgument)?;
        if opts.queue_depth == 0 || opts.queue_depth > MAX_QUEUE_DEPTH {
            return Err(Error::InvalidArgument(format!(
                "queue depth {} is not from 1 to {MAX_QUEUE_DEPTH}",
                opts.queue_depth
            )));
        }
        let addr = target
            .to_socket_addrs()
            .map_err(|e| Error::Os {
                context: format!("nvme-tcp: resolving {target}"),
                source: e,
            })?
            .next()
            .ok_or_else(|| setup_error(target, "the host name has no address"))?;
        let host_id = host_id(&opts.host_nqn);
        let mut link = Link::connect(addr, target, &opts)?;
        let data = fabrics::connect_data(&host_id, 0xFFFF, subnqn, &opts.host_nqn);
        let kato_ms = opts.keep_alive.as_millis().min(u32::MAX as u128) as u32;
        let connect = fabrics::connect(0, ADMIN_QUEUE_ENTRIES - 1, 0, kato_ms);
        let (c, _) = link.exec(0, connect, &data, 0, "Fabrics Connect")?;
        connect_status(&c, target, subnqn, &opts.host_nqn)?;
        let cntlid = c.dw0 as u16;
        let failed = Arc::new(AtomicBool::new(false));
        let mut admin = Admin {
            link,
            next_cid: 0,
            closed: None,
            failed: failed.clone(),
        };
        let cap = property_get(&mut admin, prop::CAP, true)?;
        let max_queue_entries = (cap & 0xffff) as u32 + 1;
        // CAP.TO: worst-case time to ready, in 500 ms units.
        let ready_timeout = Duration::from_millis(((cap >> 24) & 0xff).max(2) * 500);
        admin.run(
            fabrics::property_set(prop::CC, prop::CC_ENABLE),
            &[],
            0,
            "Property Set CC.EN",
        )?;
        let start = Instant::now();
        loop {
            let csts = property_get(&mut admin, prop::CSTS, false)? as u32;
            if csts & prop::CSTS_CFS != 0 {
                return Err(setup_error(
                    target,
                    "controller fatal status while enabling",
                ));
            }
            if csts & prop::CSTS_RDY != 0 {
                break;
            }
            if start.elapsed() > ready_timeout {
                return Err(setup_error(
                    target,
                    format!(
                        "controller not ready {} ms after CC.EN",
                        ready_timeout.as_millis()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let (_, page) = admin.run(
            Command::identify(cns::CONTROLLER, 0, crate::device::Iova(0)),
            &[],
            4096,
            "Identify Controller",
        )?;
        let identity = ControllerIdentity::parse(&page)?;
        // IOCCSZ (16-byte units, the SQE included) and ICDOFF.
        let ioccsz = u32::from_le_bytes([page[1792], page[1793], page[1794], page[1795]]) as usize;
        let icdoff = u16::from_le_bytes([page[1800], page[1801]]);
        let in_capsule_bytes = if icdoff == 0 {
            (ioccsz * 16).saturating_sub(64)
        } else {
            0
        };
        let admin = Arc::new(Mutex::new(admin));
        let keep_alive = (!opts.keep_alive.is_zero())
            .then(|| spawn_keep_alive(admin.clone(), failed.clone(), opts.keep_alive / 2, target))
            .transpose()?;
        tracing::info!(
            target = %target, subnqn, cntlid, model = %identity.model,
            in_capsule_bytes, "nvme-tcp controller connected"
        );
        Ok(Arc::new(NvmeTcpController {
            addr,
            peer: target.to_string(),
            subnqn: subnqn.to_string(),
            host_id,
            cntlid,
            identity,
            in_capsule_bytes,
            max_queue_entries,
            admin,
            qids: Mutex::new(Vec::new()),
            failed,
            keep_alive,
            opts,
        }))
    }

    /// `HOST:PORT/NQN`, as in the spec.
    pub fn name(&self) -> String {
        format!("{}/{}", self.peer, self.subnqn)
    }

    /// What Identify Controller said.
    pub fn identity(&self) -> &ControllerIdentity {
        &self.identity
    }

    /// The controller id the target gave the admin connection.
    pub fn cntlid(&self) -> u16 {
        self.cntlid
    }

    /// Most write data sent inside a command capsule (from IOCCSZ).
    pub fn in_capsule_bytes(&self) -> usize {
        self.in_capsule_bytes
    }

    /// True once the admin connection failed (a keep-alive, or any admin
    /// command, met a transport error or timeout) and was closed.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// The options in use.
    pub fn options(&self) -> &TcpOptions {
        &self.opts
    }

    /// Identify Namespace `nsid`: `None` for an inactive namespace.
    pub fn namespace(&self, nsid: u32) -> Result<Option<NamespaceIdentity>> {
        let mut admin = self.admin.lock();
        let (_, page) = admin.run(
            Command::identify(cns::NAMESPACE, nsid, crate::device::Iova(0)),
            &[],
            4096,
            "Identify Namespace",
        )?;
        NamespaceIdentity::parse(&page)
    }

    /// The active namespaces (Identify, active namespace id list) and what
    /// Identify Namespace says of each.
    pub fn namespaces(&self) -> Result<Vec<(u32, NamespaceIdentity)>> {
        let (_, page) = self.admin.lock().run(
            Command::identify(cns::ACTIVE_NS_LIST, 0, crate::device::Iova(0)),
            &[],
            4096,
            "Identify Active Namespace List",
        )?;
        let mut out = Vec::new();
        for nsid in parse_ns_list(&page) {
            if let Some(ns) = self.namespace(nsid)? {
                out.push((nsid, ns));
            }
        }
        Ok(out)
    }

    /// Takes a free I/O queue id.
    fn alloc_qid(&self) -> Result<u16> {
        let mut q = self.qids.lock();
        let i = match q.iter().position(|used| !used) {
            Some(i) => i,
            None => {
                q.push(false);
                q.len() - 1
            }
        };
        if i >= u16::MAX as usize - 1 {
            return Err(Error::Busy(format!(
                "{}: no I/O queue id left",
                self.name()
            )));
        }
        q[i] = true;
        Ok(i as u16 + 1)
    }

    fn free_qid(&self, qid: u16) {
        if let Some(used) = self.qids.lock().get_mut(qid as usize - 1) {
            *used = false;
        }
    }

    /// Connects I/O queue `qid` on a connection of its own.
    fn connect_io_queue(&self, qid: u16, depth: u16) -> Result<Link> {
        let mut link = Link::connect(self.addr, &self.peer, &self.opts)?;
        let data = fabrics::connect_data(
            &self.host_id,
            self.cntlid,
            &self.subnqn,
            &self.opts.host_nqn,
        );
        let connect = fabrics::connect(qid, depth, fabrics::DISABLE_SQ_FLOW, 0);
        let (c, _) = link.exec(0, connect, &data, 0, "Fabrics Connect")?;
        connect_status(&c, &self.peer, &self.subnqn, &self.opts.host_nqn)?;
        Ok(link)
    }
}

/// The error of a failed Fabrics Connect, with what its status means.
fn connect_status(c: &Completion, peer: &str, subnqn: &str, hostnqn: &str) -> Result<()> {
    if c.status().is_ok() {
        return Ok(());
    }
    let why = match (c.sct, c.sc) {
        (1, 0x80) => "incompatible format",
        (1, 0x81) => "controller busy",
        (1, 0x82) => "invalid parameters (no such subsystem, or this host is not allowed)",
        (1, 0x83) => "restart discovery",
        (1, 0x84) => "invalid host (not allowed on this subsystem)",
        _ => "error",
    };
    Err(setup_error(
        peer,
        format!(
            "Fabrics Connect to {subnqn} as {hostnqn} refused: {why} ({})",
            c.status().err().map(|s| s.to_string()).unwrap_or_default()
        ),
    ))
}

fn property_get(admin: &mut Admin, offset: u32, eight: bool) -> Result<u64> {
    let (c, _) = admin.run(fabrics::property_get(offset, eight), &[], 0, "Property Get")?;
    // The value is in completion dwords 0 and 1; `Completion` keeps dword
    // 0, which holds every 4-byte property and CAP's fields we use (MQES,
    // TO) .
    Ok(c.dw0 as u64)
}

fn spawn_keep_alive(
    admin: Arc<Mutex<Admin>>,
    failed: Arc<AtomicBool>,
    every: Duration,
    target: &str,
) -> Result<(mpsc::Sender<()>, JoinHandle<()>)> {
    let (stop, stopped) = mpsc::channel::<()>();
    let target = target.to_string();
    let handle = std::thread::Builder::new()
        .name("nvme-tcp-keepalive".into())
        .spawn(move || loop {
            match stopped.recv_timeout(every) {
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
            let keep_alive = Command {
                opcode: admin_op::KEEP_ALIVE,
                ..Default::default()
            };
            if let Err(e) = admin.lock().run(keep_alive, &[], 0, "Keep Alive") {
                tracing::warn!(target = %target, error = %e, "nvme-tcp keep-alive failed");
                failed.store(true, Ordering::Relaxed);
                return;
            }
        })
        .map_err(|e| Error::Os {
            context: "spawning the nvme-tcp keep-alive thread".into(),
            source: e,
        })?;
    Ok((stop, handle))
}

impl Drop for NvmeTcpController {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.keep_alive.take() {
            drop(stop);
            let _ = handle.join();
        }
        // Closing the admin connection ends the controller on the target.
    }
}

/// One namespace of a remote controller as a [`BlockDevice`].
pub struct NvmeTcpDevice {
    ctrl: Arc<NvmeTcpController>,
    nsid: u32,
    geometry: Geometry,
    dsm: bool,
    write_zeroes: bool,
    /// Most bytes per command.
    max_cmd_bytes: usize,
    id: DeviceId,
}

impl NvmeTcpDevice {
    /// Namespace `nsid` of the controller of `subnqn` at `target`
    /// (`HOST:PORT`).
    pub fn open(target: &str, subnqn: &str, nsid: u32, opts: TcpOptions) -> Result<NvmeTcpDevice> {
        NvmeTcpDevice::from_controller(NvmeTcpController::connect(target, subnqn, opts)?, nsid)
    }

    /// Namespace `nsid` of a connected controller.
    pub fn from_controller(ctrl: Arc<NvmeTcpController>, nsid: u32) -> Result<NvmeTcpDevice> {
        if nsid == 0 || nsid > ctrl.identity.nn {
            return Err(Error::InvalidArgument(format!(
                "nvme-tcp:{}: namespace {nsid} does not exist (the controller has {})",
                ctrl.name(),
                ctrl.identity.nn
            )));
        }
        let ns = ctrl.namespace(nsid)?.ok_or_else(|| {
            Error::InvalidArgument(format!(
                "nvme-tcp:{}: namespace {nsid} is not active",
                ctrl.name()
            ))
        })?;
        if ns.metadata_bytes != 0 || !(ns.block_size == 512 || ns.block_size == 4096) {
            return Err(Error::Unsupported(format!(
                "nvme-tcp:{}: namespace {nsid} has {}-byte blocks with {} metadata bytes (512 \
                 or 4096 without metadata supported)",
                ctrl.name(),
                ns.block_size,
                ns.metadata_bytes
            )));
        }
        Ok(NvmeTcpDevice::with_shape(
            ctrl,
            nsid,
            ns.block_size,
            ns.size_blocks,
            ns.deallocated_reads_zeroes,
        ))
    }

    /// The first `blocks` blocks of namespace `nsid`, trusted without
    /// asking the controller (tests use a window of a namespace).
    #[doc(hidden)]
    pub fn unchecked(
        ctrl: Arc<NvmeTcpController>,
        nsid: u32,
        block_size: u32,
        blocks: u64,
    ) -> Self {
        NvmeTcpDevice::with_shape(ctrl, nsid, block_size, blocks, false)
    }

    fn with_shape(
        ctrl: Arc<NvmeTcpController>,
        nsid: u32,
        block_size: u32,
        blocks: u64,
        dealloc_zeroes: bool,
    ) -> NvmeTcpDevice {
        let dsm = ctrl.identity.supports_dsm();
        // MDTS (in 4 KiB units here: CAP.MPSMIN is 4 KiB on fabrics), at
        // most 65536 blocks (NLB), and at most 1 MiB so one command never
        // holds the connection for long; whole blocks, so a command's LBA
        // and its data's offset agree. MAXH2CDATA plays no part: an R2T's
        // data goes in as many H2CData PDUs as it takes.
        let bs = block_size as usize;
        let mdts = ctrl.identity.max_transfer_bytes(4096).unwrap_or(usize::MAX);
        let max_cmd_bytes = (mdts.min(65536 * bs).min(1 << 20) / bs * bs).max(bs);
        NvmeTcpDevice {
            geometry: Geometry {
                block_size,
                block_count: blocks,
                max_transfer_bytes: max_cmd_bytes as u32,
                unmap_reads_zeroes: dsm && dealloc_zeroes,
            },
            dsm,
            write_zeroes: ctrl.identity.supports_write_zeroes(),
            max_cmd_bytes,
            ctrl,
            nsid,
            id: DeviceId::fresh(),
        }
    }

    /// The controller.
    pub fn controller(&self) -> &Arc<NvmeTcpController> {
        &self.ctrl
    }

    /// The namespace id.
    pub fn nsid(&self) -> u32 {
        self.nsid
    }
}

impl BlockDevice for NvmeTcpDevice {
    fn geometry(&self) -> Geometry {
        self.geometry
    }
    fn id(&self) -> DeviceId {
        self.id
    }
    fn name(&self) -> String {
        format!("nvme-tcp:{}/ns={}", self.ctrl.name(), self.nsid)
    }
    fn new_backend(&self) -> Result<Box<dyn ChannelBackend>> {
        Ok(Box::new(io::TcpQueue::new(self)?))
    }
    /// Data is copied to and from the socket: any memory will do.
    fn reads_into_any_memory(&self) -> bool {
        true
    }
    /// A tmpfs file named by the target, subsystem and namespace: what a
    /// killed owner wrote and had not synced is found there by the next.
    fn unsynced_memory(&self) -> Option<std::path::PathBuf> {
        let name: String = format!("{}-ns{}", self.ctrl.name(), self.nsid)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        Some(crate::device::unsynced_dir().join(format!("blobstack-nvmetcp-{name}.unsynced")))
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn fabrics_commands_put_fields_where_the_spec_says() {
        let d = fabrics::connect(3, 127, fabrics::DISABLE_SQ_FLOW, 10_000).encode(9);
        assert_eq!(d[0], 0x7F | 9 << 16);
        assert_eq!(d[1] & 0xff, 0x01, "FCTYPE Connect in byte 4");
        assert_eq!(d[10], 3 << 16, "RECFMT 0, QID 3");
        assert_eq!(d[11], 127 | 4 << 16, "SQSIZE, CATTR");
        assert_eq!(d[12], 10_000, "KATO");
        let d = fabrics::property_get(prop::CAP, true).encode(1);
        assert_eq!((d[1] & 0xff, d[10], d[11]), (0x04, 1, 0));
        let d = fabrics::property_set(prop::CC, prop::CC_ENABLE).encode(1);
        assert_eq!(
            (d[1] & 0xff, d[10], d[11], d[12]),
            (0x00, 0, 0x14, 0x0046_0001)
        );
        let data = fabrics::connect_data(&[7; 16], 0xFFFF, "nqn.sub", "nqn.host");
        assert_eq!(&data[..16], &[7; 16]);
        assert_eq!(&data[16..18], &[0xff, 0xff]);
        assert_eq!(&data[256..264], b"nqn.sub\0");
        assert_eq!(&data[512..521], b"nqn.host\0");
        let mut c = Command::rw(0x02, 1, 0, 8);
        sgl::set_transport(&mut c, 4096);
        let d = c.encode(0);
        assert_eq!(d[0] >> 14 & 3, 1, "PSDT: SGL");
        assert_eq!((d[6], d[7], d[8], d[9]), (0, 0, 4096, 0x5A << 24));
        sgl::set_in_capsule(&mut c, 512);
        assert_eq!(c.encode(0)[9], 0x01 << 24);
    }

    #[test]
    fn host_identity_is_stable_and_well_formed() {
        assert_eq!(host_id("abc"), host_id("abc"));
        assert_ne!(host_id("abc"), host_id("abd"));
        let nqn = default_host_nqn();
        assert!(check_nqn(&nqn).is_ok(), "{nqn}");
        assert_eq!(uuid_text(&[0xab; 16]).len(), 36);
        assert!(check_nqn("").is_err());
        assert!(check_nqn("has space").is_err());
        assert!(check_nqn(&"n".repeat(224)).is_err());
    }

    #[test]
    fn nothing_listening_is_a_clear_error() {
        // A port on this machine nobody listens on: bind one, then close it.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let e = NvmeTcpDevice::open(
            &format!("127.0.0.1:{port}"),
            "nqn.2024-01.test:sub",
            1,
            TcpOptions::default(),
        )
        .err()
        .expect("no target");
        assert!(e.to_string().contains("connect"), "{e}");
    }
}
