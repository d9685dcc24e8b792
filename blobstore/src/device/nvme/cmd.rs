//! Command and completion encoding, and the Identify data the driver reads.
//!
//! Invariants:
//! - A submission entry is exactly 64 bytes and a completion entry 16, both
//!   little-endian dwords, built and parsed only here.
//! - Identify data is parsed from bytes with explicit offsets; a short or odd
//!   page gives an error, never a panic.

use crate::device::Iova;
use crate::error::{Error, NvmeStatus, Result};

/// Bytes per submission queue entry.
pub const SQE_BYTES: usize = 64;
/// Bytes per completion queue entry.
pub const CQE_BYTES: usize = 16;

/// Admin opcodes.
pub mod admin_op {
    /// Delete I/O Submission Queue.
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O Completion Queue.
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0C;
    /// Keep Alive (fabrics controllers expect one within KATO).
    pub const KEEP_ALIVE: u8 = 0x18;
    /// Doorbell Buffer Config (shadow doorbells and EventIdx).
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7C;
}

/// NVM command set opcodes.
pub mod io_op {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DSM: u8 = 0x09;
}

/// Identify CNS values.
pub mod cns {
    /// Identify Namespace.
    pub const NAMESPACE: u32 = 0x00;
    /// Identify Controller.
    pub const CONTROLLER: u32 = 0x01;
    /// Active Namespace ID list.
    pub const ACTIVE_NS_LIST: u32 = 0x02;
}

/// SGL descriptor types (the high nibble of a descriptor's last byte).
pub mod sgl_type {
    /// Data Block: `len` bytes of data at `addr`.
    pub const DATA_BLOCK: u8 = 0x0;
    /// Segment: a list of descriptors at `addr`, `len` bytes long, whose
    /// last descriptor may point to the next segment.
    pub const SEGMENT: u8 = 0x2;
    /// Last Segment: a list of descriptors none of which is a segment.
    pub const LAST_SEGMENT: u8 = 0x3;
}

/// Bytes of one SGL descriptor.
pub const SGL_DESCRIPTOR_BYTES: usize = 16;

/// The second quadword of an SGL descriptor (address subtype): length in
/// bytes 8..12, type in the high nibble of byte 15.
pub fn sgl_descriptor_high(len: u32, kind: u8) -> u64 {
    len as u64 | ((kind as u64 & 0xf) << 4) << 56
}

/// Length and type of an SGL descriptor from its second quadword.
pub fn sgl_descriptor_decode(high: u64) -> (u32, u8) {
    (high as u32, (high >> 60) as u8)
}

/// Feature id: Number of Queues.
pub const FEAT_NUM_QUEUES: u32 = 0x07;
/// Log page: Error Information.
pub const LOG_ERROR_INFO: u8 = 0x01;
/// Log page: SMART / Health Information.
pub const LOG_SMART: u8 = 0x02;
/// Log page: Changed Namespace List.
pub const LOG_CHANGED_NS: u8 = 0x04;
/// Feature id: Asynchronous Event Configuration.
pub const FEAT_ASYNC_EVENT_CONFIG: u32 = 0x0B;
/// Asynchronous Event Configuration: every SMART critical warning (bits
/// 7:0) and Namespace Attribute Notices (bit 8).
pub const ASYNC_EVENTS_WANTED: u32 = 0xff | 1 << 8;

/// Asynchronous event types (completion dword 0 bits 2:0).
pub mod event_type {
    /// Error status.
    pub const ERROR: u8 = 0;
    /// SMART / Health status.
    pub const SMART: u8 = 1;
    /// Notice (information 0: namespace attribute changed).
    pub const NOTICE: u8 = 2;
}

/// What an Asynchronous Event Request completion reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AsyncEvent {
    /// Event type ([`event_type`]).
    pub kind: u8,
    /// Event information (type specific).
    pub info: u8,
    /// The log page to read to clear the event (0: none).
    pub log_page: u8,
}

impl AsyncEvent {
    /// Decodes completion dword 0.
    pub fn decode(dw0: u32) -> AsyncEvent {
        AsyncEvent {
            kind: (dw0 & 7) as u8,
            info: (dw0 >> 8) as u8,
            log_page: (dw0 >> 16) as u8,
        }
    }

    /// Completion dword 0 (for the software controller).
    pub fn encode(&self) -> u32 {
        (self.kind & 7) as u32 | (self.info as u32) << 8 | (self.log_page as u32) << 16
    }

    /// Bytes of the log page to read for it.
    pub fn log_bytes(&self) -> u32 {
        match self.log_page {
            LOG_ERROR_INFO | LOG_CHANGED_NS => 4096,
            _ => 512,
        }
    }
}

/// A submission queue entry, as dwords (CID is set at submission).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Command {
    /// Opcode.
    pub opcode: u8,
    /// Namespace id.
    pub nsid: u32,
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2 (second page or PRP list).
    pub prp2: u64,
    /// PRP or SGL for data transfer (PSDT): 0 PRPs; 1 an SGL, its first
    /// descriptor in place of PRP1 and PRP2 (see [`Command::set_sgl`]).
    pub psdt: u8,
    /// Command dwords 10 to 15.
    pub cdw: [u32; 6],
}

impl Command {
    /// The 16 dwords of the entry with command id `cid`.
    pub fn encode(&self, cid: u16) -> [u32; 16] {
        let mut d = [0u32; 16];
        // FUSE = 0; PSDT in bits 15:14.
        d[0] = self.opcode as u32 | ((self.psdt as u32) & 3) << 14 | (cid as u32) << 16;
        d[1] = self.nsid;
        d[6] = self.prp1 as u32;
        d[7] = (self.prp1 >> 32) as u32;
        d[8] = self.prp2 as u32;
        d[9] = (self.prp2 >> 32) as u32;
        d[10..16].copy_from_slice(&self.cdw);
        d
    }

    /// Describes the data with an SGL whose first descriptor (in the
    /// command) is of `kind` ([`sgl_type`]) at `addr`, `len` bytes long.
    pub fn set_sgl(&mut self, addr: u64, len: u32, kind: u8) {
        self.psdt = 1;
        self.prp1 = addr;
        self.prp2 = sgl_descriptor_high(len, kind);
    }

    /// Read or write of `blocks` blocks at `lba` (NLB is zero-based).
    pub fn rw(opcode: u8, nsid: u32, lba: u64, blocks: u32) -> Command {
        debug_assert!((1..=65536).contains(&blocks));
        Command {
            opcode,
            nsid,
            cdw: [lba as u32, (lba >> 32) as u32, blocks - 1, 0, 0, 0],
            ..Default::default()
        }
    }

    /// Flush of namespace `nsid`.
    pub fn flush(nsid: u32) -> Command {
        Command {
            opcode: io_op::FLUSH,
            nsid,
            ..Default::default()
        }
    }

    /// Dataset Management, deallocate, of `ranges` ranges at `list`.
    pub fn deallocate(nsid: u32, list: Iova, ranges: u32) -> Command {
        debug_assert!((1..=256).contains(&ranges));
        Command {
            opcode: io_op::DSM,
            nsid,
            prp1: list.0,
            cdw: [ranges - 1, 1 << 2, 0, 0, 0, 0],
            ..Default::default()
        }
    }

    /// Identify with `cns` into the 4 KiB page at `buf`.
    pub fn identify(cns: u32, nsid: u32, buf: Iova) -> Command {
        Command {
            opcode: admin_op::IDENTIFY,
            nsid,
            prp1: buf.0,
            cdw: [cns, 0, 0, 0, 0, 0],
            ..Default::default()
        }
    }

    /// Set Features, Number of Queues (counts are one-based here).
    pub fn set_num_queues(sq: u16, cq: u16) -> Command {
        Command {
            opcode: admin_op::SET_FEATURES,
            cdw: [
                FEAT_NUM_QUEUES,
                ((cq - 1) as u32) << 16 | (sq - 1) as u32,
                0,
                0,
                0,
                0,
            ],
            ..Default::default()
        }
    }

    /// Create I/O Completion Queue `qid` of `entries` entries at `base`,
    /// physically contiguous; with `vector`, its completions raise that
    /// MSI-X vector (interrupts enabled), else interrupts are off.
    pub fn create_cq(qid: u16, entries: u32, base: Iova, vector: Option<u16>) -> Command {
        // PC (bit 0), IEN (bit 1), IV (bits 31:16).
        let cdw11 = match vector {
            Some(v) => (v as u32) << 16 | 0b11,
            None => 1,
        };
        Command {
            opcode: admin_op::CREATE_CQ,
            prp1: base.0,
            cdw: [(entries - 1) << 16 | qid as u32, cdw11, 0, 0, 0, 0],
            ..Default::default()
        }
    }

    /// Create I/O Submission Queue `qid` bound to completion queue `cqid`.
    pub fn create_sq(qid: u16, entries: u32, base: Iova, cqid: u16) -> Command {
        Command {
            opcode: admin_op::CREATE_SQ,
            prp1: base.0,
            cdw: [
                (entries - 1) << 16 | qid as u32,
                (cqid as u32) << 16 | 1,
                0,
                0,
                0,
                0,
            ],
            ..Default::default()
        }
    }

    /// Delete I/O Submission (`sq`) or Completion queue `qid`.
    pub fn delete_queue(sq: bool, qid: u16) -> Command {
        Command {
            opcode: if sq {
                admin_op::DELETE_SQ
            } else {
                admin_op::DELETE_CQ
            },
            cdw: [qid as u32, 0, 0, 0, 0, 0],
            ..Default::default()
        }
    }

    /// Get Log Page `lid` of `bytes` bytes (a multiple of 4, at most one
    /// page) into `buf`, for all namespaces.
    pub fn get_log_page(lid: u8, bytes: u32, buf: Iova) -> Command {
        let numd = bytes / 4 - 1;
        Command {
            opcode: admin_op::GET_LOG_PAGE,
            nsid: u32::MAX,
            prp1: buf.0,
            cdw: [(numd & 0xffff) << 16 | lid as u32, numd >> 16, 0, 0, 0, 0],
            ..Default::default()
        }
    }

    /// Doorbell Buffer Config: the shadow doorbell page at `shadow` and the
    /// EventIdx page at `event_idx` (both page aligned), laid out as the
    /// doorbell registers are (queue `q`'s SQ tail at `2q * stride`, its CQ
    /// head at `(2q + 1) * stride`).
    pub fn doorbell_buffer_config(shadow: Iova, event_idx: Iova) -> Command {
        Command {
            opcode: admin_op::DOORBELL_BUFFER_CONFIG,
            prp1: shadow.0,
            prp2: event_idx.0,
            ..Default::default()
        }
    }

    /// Asynchronous Event Request (completes when an event happens).
    pub fn async_event_request() -> Command {
        Command {
            opcode: admin_op::ASYNC_EVENT_REQUEST,
            ..Default::default()
        }
    }

    /// Set Features, Asynchronous Event Configuration, to `events`.
    pub fn set_async_event_config(events: u32) -> Command {
        Command {
            opcode: admin_op::SET_FEATURES,
            cdw: [FEAT_ASYNC_EVENT_CONFIG, events, 0, 0, 0, 0],
            ..Default::default()
        }
    }

    /// Abort command `cid` of submission queue `sqid`.
    pub fn abort(sqid: u16, cid: u16) -> Command {
        Command {
            opcode: admin_op::ABORT,
            cdw: [(cid as u32) << 16 | sqid as u32, 0, 0, 0, 0, 0],
            ..Default::default()
        }
    }
}

/// A completion queue entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Command-specific dword 0.
    pub dw0: u32,
    /// Submission queue head pointer at completion.
    pub sq_head: u16,
    /// Submission queue the command came from.
    pub sq_id: u16,
    /// Command id.
    pub cid: u16,
    /// Phase tag.
    pub phase: bool,
    /// Status code.
    pub sc: u8,
    /// Status code type.
    pub sct: u8,
    /// Do Not Retry.
    pub dnr: bool,
}

impl Completion {
    /// Parses the four dwords of an entry.
    pub fn decode(d: [u32; 4]) -> Completion {
        let status = d[3] >> 16;
        Completion {
            dw0: d[0],
            sq_head: d[2] as u16,
            sq_id: (d[2] >> 16) as u16,
            cid: d[3] as u16,
            phase: status & 1 == 1,
            sc: (status >> 1) as u8,
            sct: ((status >> 9) & 0x7) as u8,
            dnr: status >> 15 == 1,
        }
    }

    /// The entry as dwords (for the software controller).
    pub fn encode(&self) -> [u32; 4] {
        let status = self.phase as u32
            | (self.sc as u32) << 1
            | (self.sct as u32 & 7) << 9
            | (self.dnr as u32) << 15;
        [
            self.dw0,
            0,
            self.sq_head as u32 | (self.sq_id as u32) << 16,
            self.cid as u32 | status << 16,
        ]
    }

    /// `Ok` for success, else the typed status.
    pub fn status(&self) -> std::result::Result<(), NvmeStatus> {
        if self.sc == 0 && self.sct == 0 {
            Ok(())
        } else {
            Err(NvmeStatus::from_codes(self.sct, self.sc))
        }
    }
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
fn ascii(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches([' ', '\0'])
        .to_string()
}

fn check_page(page: &[u8], what: &str) -> Result<()> {
    if page.len() < 4096 {
        return Err(Error::corrupt(
            what.to_string(),
            format!("identify data is {} bytes, not 4096", page.len()),
        ));
    }
    Ok(())
}

/// What Identify Controller says, the parts the driver uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerIdentity {
    /// PCI vendor id.
    pub vendor_id: u16,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// Maximum data transfer size as a power of two of the minimum page
    /// size; 0 means no limit.
    pub mdts: u8,
    /// Controller id.
    pub cntlid: u16,
    /// Asynchronous Event Request Limit (zero-based: AERL + 1 requests may
    /// be outstanding).
    pub aerl: u8,
    /// Number of namespaces (largest valid namespace id).
    pub nn: u32,
    /// Optional Admin Command Support (OACS).
    pub oacs: u16,
    /// Optional NVM commands supported (ONCS).
    pub oncs: u16,
    /// SGL Support (SGLS).
    pub sgls: u32,
    /// A volatile write cache is present (Flush does something).
    pub volatile_write_cache: bool,
}

impl ControllerIdentity {
    /// Parses an Identify Controller page.
    pub fn parse(page: &[u8]) -> Result<ControllerIdentity> {
        check_page(page, "identify controller")?;
        Ok(ControllerIdentity {
            vendor_id: le16(page, 0),
            serial: ascii(&page[4..24]),
            model: ascii(&page[24..64]),
            firmware: ascii(&page[64..72]),
            mdts: page[77],
            cntlid: le16(page, 78),
            aerl: page[259],
            nn: le32(page, 516),
            oacs: le16(page, 256),
            oncs: le16(page, 520),
            sgls: le32(page, 536),
            volatile_write_cache: page[525] & 1 == 1,
        })
    }

    /// Doorbell Buffer Config (shadow doorbells) is supported (OACS bit 8).
    pub fn supports_doorbell_buffer(&self) -> bool {
        self.oacs & (1 << 8) != 0
    }

    /// SGLs are supported for the NVM command set (SGLS bits 1:0 are 01b,
    /// any alignment, or 10b, dword alignment and granularity).
    pub fn supports_sgl(&self) -> bool {
        matches!(self.sgls & 3, 1 | 2)
    }

    /// SGL data blocks must start and end on dword boundaries.
    pub fn sgl_needs_dword_alignment(&self) -> bool {
        self.sgls & 3 == 2
    }

    /// Dataset Management is supported.
    pub fn supports_dsm(&self) -> bool {
        self.oncs & (1 << 2) != 0
    }

    /// Write Zeroes is supported.
    pub fn supports_write_zeroes(&self) -> bool {
        self.oncs & (1 << 3) != 0
    }

    /// Largest transfer in bytes, given the minimum page size.
    pub fn max_transfer_bytes(&self, min_page_size: usize) -> Option<usize> {
        if self.mdts == 0 || self.mdts > 20 {
            None
        } else {
            Some(min_page_size << self.mdts)
        }
    }
}

/// What Identify Namespace says, the parts the driver uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceIdentity {
    /// Namespace size in blocks.
    pub size_blocks: u64,
    /// Capacity in blocks.
    pub capacity_blocks: u64,
    /// Bytes per block of the format in use.
    pub block_size: u32,
    /// Metadata bytes per block of the format in use.
    pub metadata_bytes: u16,
    /// Index of the format in use.
    pub format_index: u8,
    /// Every supported format as (block size, metadata bytes).
    pub formats: Vec<(u32, u16)>,
    /// Deallocated blocks read as zeroes (DLFEAT bits 2:0 = 001b).
    pub deallocated_reads_zeroes: bool,
}

impl NamespaceIdentity {
    /// Parses an Identify Namespace page; `None` for an inactive namespace
    /// (all zero).
    pub fn parse(page: &[u8]) -> Result<Option<NamespaceIdentity>> {
        check_page(page, "identify namespace")?;
        let size_blocks = le64(page, 0);
        if size_blocks == 0 {
            return Ok(None);
        }
        let nlbaf = page[25] as usize + 1;
        let flbas = page[26];
        let format_index = (flbas & 0xf) | ((flbas >> 5) & 0x3) << 4;
        let formats: Vec<(u32, u16)> = (0..nlbaf.min(64))
            .map(|i| {
                let f = le32(page, 128 + 4 * i);
                let lbads = (f >> 16) & 0xff;
                let size = if (9..=16).contains(&lbads) {
                    1u32 << lbads
                } else {
                    0
                };
                (size, f as u16)
            })
            .collect();
        let Some(&(block_size, metadata_bytes)) = formats.get(format_index as usize) else {
            return Err(Error::corrupt(
                "identify namespace",
                format!("format index {format_index} past {nlbaf} formats"),
            ));
        };
        if block_size == 0 {
            return Err(Error::corrupt(
                "identify namespace",
                format!("format {format_index} has an invalid block size"),
            ));
        }
        Ok(Some(NamespaceIdentity {
            size_blocks,
            capacity_blocks: le64(page, 8),
            block_size,
            metadata_bytes,
            format_index,
            formats,
            deallocated_reads_zeroes: page[33] & 0x7 == 1,
        }))
    }
}

/// Parses an active namespace id list (ascending, zero-terminated).
pub fn parse_ns_list(page: &[u8]) -> Vec<u32> {
    page.chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .take_while(|&id| id != 0)
        .collect()
}

/// The SMART / Health log, the fields worth printing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SmartLog {
    /// Critical warning bits.
    pub critical_warning: u8,
    /// Composite temperature, kelvin.
    pub temperature_kelvin: u16,
    /// Available spare, percent.
    pub available_spare_pct: u8,
    /// Percentage used.
    pub percent_used: u8,
    /// Data units read (thousands of 512-byte units), low 64 bits.
    pub data_units_read: u64,
    /// Data units written, low 64 bits.
    pub data_units_written: u64,
    /// Media and data integrity errors, low 64 bits.
    pub media_errors: u64,
}

impl SmartLog {
    /// Parses the 512-byte log page.
    pub fn parse(page: &[u8]) -> Result<SmartLog> {
        if page.len() < 512 {
            return Err(Error::corrupt("SMART log", "shorter than 512 bytes"));
        }
        Ok(SmartLog {
            critical_warning: page[0],
            temperature_kelvin: le16(page, 1),
            available_spare_pct: page[3],
            percent_used: page[5],
            data_units_read: le64(page, 32),
            data_units_written: le64(page, 48),
            media_errors: le64(page, 160),
        })
    }
}

/// One Error Information log entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorLogEntry {
    /// Error count (0: entry unused).
    pub error_count: u64,
    /// Submission queue id.
    pub sqid: u16,
    /// Command id.
    pub cid: u16,
    /// Status field (without the phase bit).
    pub status: u16,
    /// LBA.
    pub lba: u64,
    /// Namespace.
    pub nsid: u32,
}

impl ErrorLogEntry {
    /// Parses the used entries of an Error Information log page.
    pub fn parse_all(page: &[u8]) -> Vec<ErrorLogEntry> {
        page.chunks_exact(64)
            .map(|e| ErrorLogEntry {
                error_count: le64(e, 0),
                sqid: le16(e, 8),
                cid: le16(e, 10),
                status: le16(e, 12) >> 1,
                lba: le64(e, 16),
                nsid: le32(e, 24),
            })
            .filter(|e| e.error_count != 0)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_command_layout() {
        let mut c = Command::rw(io_op::READ, 1, 0x1_2345_6789, 8);
        c.prp1 = 0xdead_b000;
        c.prp2 = 0x1_0000_2000;
        let d = c.encode(0x42);
        assert_eq!(d[0], 0x02 | 0x42 << 16);
        assert_eq!(d[1], 1);
        assert_eq!((d[6], d[7]), (0xdead_b000, 0));
        assert_eq!((d[8], d[9]), (0x2000, 1));
        assert_eq!((d[10], d[11]), (0x2345_6789, 1));
        assert_eq!(d[12], 7, "NLB is zero-based");
    }

    #[test]
    fn admin_command_layouts() {
        let d = Command::create_cq(3, 256, Iova(0x10000), None).encode(1);
        assert_eq!(d[0] & 0xff, 0x05);
        assert_eq!(d[10], 255 << 16 | 3);
        assert_eq!(d[11], 1, "physically contiguous, no interrupts");
        let d = Command::create_cq(3, 256, Iova(0x10000), Some(2)).encode(1);
        assert_eq!(d[11], 2 << 16 | 0b11, "vector 2, interrupts enabled");
        let d = Command::create_sq(3, 256, Iova(0x20000), 3).encode(2);
        assert_eq!(d[10], 255 << 16 | 3);
        assert_eq!(d[11], 3 << 16 | 1);
        let d = Command::set_num_queues(8, 8).encode(0);
        assert_eq!((d[10], d[11]), (7, 7 << 16 | 7));
        let d = Command::get_log_page(LOG_SMART, 512, Iova(0x3000)).encode(0);
        assert_eq!(d[10], 127 << 16 | 2);
        let d = Command::abort(5, 77).encode(0);
        assert_eq!(d[10], 77 << 16 | 5);
        let d = Command::deallocate(2, Iova(0x4000), 3).encode(0);
        assert_eq!((d[1], d[10], d[11]), (2, 2, 4));
        let d = Command::doorbell_buffer_config(Iova(0x1_0000_5000), Iova(0x6000)).encode(3);
        assert_eq!(d[0], 0x7C | 3 << 16);
        assert_eq!((d[6], d[7], d[8], d[9]), (0x5000, 1, 0x6000, 0));
        let d = Command::set_async_event_config(ASYNC_EVENTS_WANTED).encode(1);
        assert_eq!((d[0] & 0xff, d[10], d[11]), (0x09, 0x0B, 0x1ff));
        assert_eq!(Command::async_event_request().encode(4)[0], 0x0C | 4 << 16);
        let e = AsyncEvent::decode(0x04_00_02);
        assert_eq!(
            (e.kind, e.info, e.log_page),
            (event_type::NOTICE, 0, LOG_CHANGED_NS)
        );
        assert_eq!(AsyncEvent::decode(e.encode()), e);
        let mut c = Command::rw(io_op::WRITE, 1, 0, 8);
        c.set_sgl(0x1_0000_2000, 4096, sgl_type::LAST_SEGMENT);
        let d = c.encode(9);
        assert_eq!(d[0], 0x01 | 1 << 14 | 9 << 16, "PSDT 01b");
        assert_eq!((d[6], d[7], d[8], d[9]), (0x2000, 1, 4096, 0x30 << 24));
        assert_eq!(
            sgl_descriptor_decode(sgl_descriptor_high(4096, 3)),
            (4096, 3)
        );
    }

    #[test]
    fn completion_round_trip_and_status() {
        let c = Completion {
            dw0: 9,
            sq_head: 17,
            sq_id: 2,
            cid: 300,
            phase: true,
            sc: 0x80,
            sct: 0,
            dnr: true,
        };
        assert_eq!(Completion::decode(c.encode()), c);
        assert_eq!(c.status(), Err(NvmeStatus::LbaOutOfRange));
        let ok = Completion { sc: 0, ..c };
        assert_eq!(ok.status(), Ok(()));
        let media = Completion {
            sct: 2,
            sc: 0x81,
            ..c
        };
        assert_eq!(media.status(), Err(NvmeStatus::UnrecoveredReadError));
        let odd = Completion {
            sct: 1,
            sc: 0x0c,
            ..c
        };
        assert_eq!(odd.status(), Err(NvmeStatus::Other { sct: 1, sc: 0x0c }));
    }

    #[test]
    fn identify_pages_parse() {
        let mut p = vec![0u8; 4096];
        p[4..12].copy_from_slice(b"SER123  ");
        p[24..30].copy_from_slice(b"MODEL ");
        p[77] = 5;
        p[516..520].copy_from_slice(&2u32.to_le_bytes());
        p[520] = 0b1100;
        p[525] = 1;
        let c = ControllerIdentity::parse(&p).unwrap();
        assert_eq!((c.serial.as_str(), c.model.as_str()), ("SER123", "MODEL"));
        assert_eq!(c.max_transfer_bytes(4096), Some(128 << 10));
        assert!(c.supports_dsm() && c.supports_write_zeroes() && c.volatile_write_cache);
        assert!(!c.supports_doorbell_buffer() && !c.supports_sgl());
        assert_eq!(c.aerl, 0);
        p[536] = 2;
        let c2 = ControllerIdentity::parse(&p).unwrap();
        assert!(c2.supports_sgl() && c2.sgl_needs_dword_alignment());
        p[536] = 3; // reserved
        assert!(!ControllerIdentity::parse(&p).unwrap().supports_sgl());
        p[536] = 0;
        p[257] = 1; // OACS bit 8
        assert!(ControllerIdentity::parse(&p)
            .unwrap()
            .supports_doorbell_buffer());
        assert!(ControllerIdentity::parse(&p[..100]).is_err());

        let mut n = vec![0u8; 4096];
        assert_eq!(NamespaceIdentity::parse(&n).unwrap(), None);
        n[0..8].copy_from_slice(&1000u64.to_le_bytes());
        n[25] = 1; // two formats
        n[26] = 1; // using format 1
        n[33] = 1;
        n[128..132].copy_from_slice(&(9u32 << 16).to_le_bytes());
        n[132..136].copy_from_slice(&(12u32 << 16).to_le_bytes());
        let ns = NamespaceIdentity::parse(&n).unwrap().unwrap();
        assert_eq!((ns.size_blocks, ns.block_size), (1000, 4096));
        assert_eq!(ns.formats, vec![(512, 0), (4096, 0)]);
        assert!(ns.deallocated_reads_zeroes);
        n[26] = 5; // past the formats: an error, not a panic
        assert!(NamespaceIdentity::parse(&n).is_err());

        let mut l = vec![0u8; 4096];
        l[0..4].copy_from_slice(&1u32.to_le_bytes());
        l[4..8].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(parse_ns_list(&l), vec![1, 2]);
    }
}
