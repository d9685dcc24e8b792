//! NVMe/TCP PDUs (NVMe/TCP transport specification 1.0): encoding and
//! parsing, pure functions over bytes (no sockets here), and the typed
//! error for every protocol violation the transport can meet.
//!
//! Every PDU starts with the 8-byte common header:
//!
//! ```text
//! byte 0      1       2      3      4..8
//!      type   flags   hlen   pdo    plen (LE u32: the whole PDU)
//! ```
//!
//! then the rest of its type's fixed header (`hlen` bytes in all), a
//! header digest (CRC-32C of the `hlen` header bytes, 4 bytes LE) when
//! negotiated, padding up to `pdo` (the data offset) for PDUs that carry
//! data, the data, and a data digest (CRC-32C of the data) when
//! negotiated. Type-specific fields after the common header:
//!
//! ```text
//! ICReq/ICResp (hlen 128): 8 pfv u16 | 10 hpda/cpda u8 | 11 digest u8 |
//!                          12 maxr2t/maxh2cdata u32 | reserved to 128
//! CapsuleCmd   (hlen 72):  8 the 64-byte submission queue entry
//! CapsuleResp  (hlen 24):  8 the 16-byte completion queue entry
//! H2CData/C2HData (24):    8 cccid u16 | 10 ttag u16 | 12 datao u32 |
//!                          16 datal u32 | 20 reserved
//! R2T          (hlen 24):  8 cccid u16 | 10 ttag u16 | 12 r2to u32 |
//!                          16 r2tl u32 | 20 reserved
//! TermReq      (hlen 24):  8 fes u16 | 10 fei u32 | 14 reserved; then up
//!                          to 128 bytes of the offending PDU's header
//! ```
//!
//! Invariants:
//! - Parsing never panics on any bytes; each inconsistency is a
//!   [`TcpError`] naming the PDU and the field.
//! - Whatever [`encode_pdu`] writes, [`parse_pdu`] reads back as the same
//!   header and data under the same [`Framing`].
//! - Digests are present exactly when negotiated, on every PDU type that
//!   carries them (never on ICReq, ICResp or the TermReqs); a data digest
//!   only on a PDU with data.

use crc32c::{crc32c, crc32c_append};

use super::super::cmd::{Completion, CQE_BYTES, SQE_BYTES};

/// PDU types (common header byte 0).
pub mod pdu_type {
    /// Initialize Connection Request (host to controller).
    pub const IC_REQ: u8 = 0x00;
    /// Initialize Connection Response (controller to host).
    pub const IC_RESP: u8 = 0x01;
    /// Terminate Connection Request from the host.
    pub const H2C_TERM_REQ: u8 = 0x02;
    /// Terminate Connection Request from the controller.
    pub const C2H_TERM_REQ: u8 = 0x03;
    /// A command capsule (an SQE, maybe with in-capsule data).
    pub const CAPSULE_CMD: u8 = 0x04;
    /// A response capsule (a CQE).
    pub const CAPSULE_RESP: u8 = 0x05;
    /// Write data the controller asked for with an R2T.
    pub const H2C_DATA: u8 = 0x06;
    /// Read data.
    pub const C2H_DATA: u8 = 0x07;
    /// Ready to Transfer: the controller asks for write data.
    pub const R2T: u8 = 0x09;
}

/// Common header flags (byte 1).
pub mod flag {
    /// A header digest follows the header.
    pub const HDGSTF: u8 = 1 << 0;
    /// A data digest follows the data.
    pub const DDGSTF: u8 = 1 << 1;
    /// The last data PDU of a command (or of an R2T's range).
    pub const LAST_PDU: u8 = 1 << 2;
    /// C2HData only, with LAST_PDU: the command succeeded and no response
    /// capsule follows (when the host disabled SQ flow control).
    pub const SUCCESS: u8 = 1 << 3;
}

/// Fatal error status codes of a TermReq (its FES field).
pub mod fes {
    /// A PDU header field is invalid (FEI: its byte offset).
    pub const INVALID_HEADER_FIELD: u16 = 0x01;
    /// A PDU arrived out of sequence.
    pub const PDU_SEQUENCE_ERROR: u16 = 0x02;
    /// A header digest did not match.
    pub const HEADER_DIGEST_ERROR: u16 = 0x03;
    /// Data outside the command's range.
    pub const DATA_OUT_OF_RANGE: u16 = 0x04;
    /// More R2Ts outstanding than MAXR2T allows, or more data than the
    /// limit (R2T limit exceeded, H2C data limit exceeded: both 0x05).
    pub const DATA_LIMIT_EXCEEDED: u16 = 0x05;
    /// An unsupported parameter (ICReq/ICResp).
    pub const UNSUPPORTED_PARAMETER: u16 = 0x06;
}

/// Bytes of the common header.
pub const COMMON_HEADER_BYTES: usize = 8;
/// Bytes of a header or data digest.
pub const DIGEST_BYTES: usize = 4;
/// Header (and whole PDU) length of ICReq and ICResp.
pub const IC_PDU_BYTES: usize = 128;
/// Header length of a command capsule PDU: common header and SQE.
pub const CAPSULE_CMD_HLEN: usize = COMMON_HEADER_BYTES + SQE_BYTES;
/// Header length of a response capsule PDU: common header and CQE.
pub const CAPSULE_RESP_HLEN: usize = COMMON_HEADER_BYTES + CQE_BYTES;
/// Header length of H2CData, C2HData and R2T PDUs.
pub const DATA_HLEN: usize = 24;
/// Header length of the TermReq PDUs.
#[cfg(test)]
pub const TERM_REQ_HLEN: usize = 24;
/// Largest TermReq PDU (header and up to 128 bytes of the bad PDU).
pub const MAX_TERM_REQ_BYTES: usize = 152;
/// Smallest MAXH2CDATA a controller may announce.
pub const MIN_MAXH2CDATA: u32 = 4096;
/// Largest data offset (PDO) a PDU may give: header, digest and padding
/// fit in this many bytes.
pub const MAX_DATA_OFFSET: usize = 256;

const _: () = assert!(CAPSULE_CMD_HLEN == 72);
const _: () = assert!(CAPSULE_RESP_HLEN == 24);
const _: () = assert!(IC_PDU_BYTES + DIGEST_BYTES < MAX_DATA_OFFSET);

/// What both ends of a connection agreed in ICReq/ICResp.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Framing {
    /// Header digests on every PDU type that carries them.
    pub header_digest: bool,
    /// Data digests on every PDU with data.
    pub data_digest: bool,
}

/// The digest byte of ICReq/ICResp: bit 0 header digest, bit 1 data digest.
fn digest_byte(f: Framing) -> u8 {
    f.header_digest as u8 | (f.data_digest as u8) << 1
}

fn digest_framing(b: u8) -> Framing {
    Framing {
        header_digest: b & 1 != 0,
        data_digest: b & 2 != 0,
    }
}

/// Initialize Connection Request fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcReq {
    /// PDU format version (0: version 1.0).
    pub pfv: u16,
    /// Host PDU data alignment, in 4-byte units minus one.
    pub hpda: u8,
    /// Digests the host asks for.
    pub digests: Framing,
    /// Most outstanding R2Ts per command, minus one.
    pub maxr2t: u32,
}

/// Initialize Connection Response fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcResp {
    /// PDU format version.
    pub pfv: u16,
    /// Controller PDU data alignment, in 4-byte units minus one.
    pub cpda: u8,
    /// Digests the controller enabled.
    pub digests: Framing,
    /// Most data bytes in one H2CData PDU.
    pub maxh2cdata: u32,
}

/// The header fields of H2CData and C2HData PDUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataHeader {
    /// Command id of the command the data belongs to.
    pub cccid: u16,
    /// Transfer tag (H2CData: the R2T's; C2HData: reserved).
    pub ttag: u16,
    /// Offset of the data within the command's data.
    pub datao: u32,
    /// Bytes of data in the PDU.
    pub datal: u32,
    /// LAST_PDU flag.
    pub last: bool,
    /// SUCCESS flag (C2HData only).
    pub success: bool,
}

/// R2T fields: the controller asks for `r2tl` bytes at `r2to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct R2t {
    /// Command id.
    pub cccid: u16,
    /// Transfer tag to echo in the H2CData PDUs.
    pub ttag: u16,
    /// Offset within the command's data.
    pub r2to: u32,
    /// Length requested.
    pub r2tl: u32,
}

/// A parsed PDU header (any type); data, if any, is described by [`Plan`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Header {
    /// ICReq.
    IcReq(IcReq),
    /// ICResp.
    IcResp(IcResp),
    /// H2CTermReq or C2HTermReq.
    TermReq {
        /// True for H2CTermReq.
        from_host: bool,
        /// Fatal error status ([`fes`]).
        fes: u16,
        /// Fatal error information (e.g. the offset of a bad field).
        fei: u32,
    },
    /// A command capsule: the SQE as dwords.
    CapsuleCmd([u32; 16]),
    /// A response capsule.
    CapsuleResp(Completion),
    /// H2CData.
    H2cData(DataHeader),
    /// C2HData.
    C2hData(DataHeader),
    /// R2T.
    R2t(R2t),
}

/// Where a PDU's parts are, from its common header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Bytes from the PDU's start to its data (to its end when it has no
    /// data): what [`parse_header`] needs.
    pub header_bytes: usize,
    /// Bytes of data.
    pub data_bytes: usize,
    /// A data digest follows the data.
    pub data_digest: bool,
}

impl Plan {
    /// The whole PDU's length.
    pub fn pdu_bytes(&self) -> usize {
        self.header_bytes + self.data_bytes + if self.data_digest { DIGEST_BYTES } else { 0 }
    }
}

/// Every way a connection can break the protocol, or end.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TcpError {
    /// A PDU type this transport does not know.
    #[error("unknown PDU type {0:#04x}")]
    UnknownType(u8),
    /// A PDU that must not come from this side, or not now.
    #[error("unexpected {pdu} PDU: {why}")]
    Unexpected {
        /// The PDU's name.
        pdu: &'static str,
        /// Why it was not expected.
        why: String,
    },
    /// HLEN is not the fixed header length of the PDU type.
    #[error("{pdu} PDU with header length {hlen}, expected {expected}")]
    HeaderLength {
        /// The PDU's name.
        pdu: &'static str,
        /// HLEN as received.
        hlen: u8,
        /// The fixed length for the type.
        expected: usize,
    },
    /// PLEN does not fit the header, digests and data.
    #[error("{pdu} PDU with length {plen}: {why}")]
    PduLength {
        /// The PDU's name.
        pdu: &'static str,
        /// PLEN as received.
        plen: u32,
        /// What is wrong with it.
        why: String,
    },
    /// PDO is not where the data can start.
    #[error("{pdu} PDU with data offset {pdo}: {why}")]
    DataOffset {
        /// The PDU's name.
        pdu: &'static str,
        /// PDO as received.
        pdo: u8,
        /// What is wrong with it.
        why: String,
    },
    /// The digest flags do not say what was negotiated.
    #[error("{pdu} PDU with flags {flags:#04x}: digests negotiated header={header} data={data}")]
    DigestFlags {
        /// The PDU's name.
        pdu: &'static str,
        /// The flags byte.
        flags: u8,
        /// Header digests negotiated.
        header: bool,
        /// Data digests negotiated.
        data: bool,
    },
    /// A header digest mismatch.
    #[error("{pdu} PDU header digest {found:#010x}, computed {expected:#010x}")]
    HeaderDigest {
        /// The PDU's name.
        pdu: &'static str,
        /// The digest computed over the header.
        expected: u32,
        /// The digest in the PDU.
        found: u32,
    },
    /// A data digest mismatch.
    #[error("{pdu} PDU data digest {found:#010x}, computed {expected:#010x}")]
    DataDigest {
        /// The PDU's name.
        pdu: &'static str,
        /// The digest computed over the data.
        expected: u32,
        /// The digest in the PDU.
        found: u32,
    },
    /// A data PDU whose DATAL is not the data it carries.
    #[error("{pdu} PDU says {datal} data bytes but carries {carried}")]
    DataLength {
        /// The PDU's name.
        pdu: &'static str,
        /// DATAL as received.
        datal: u32,
        /// Data bytes between PDO and the end.
        carried: usize,
    },
    /// Fewer bytes than the PDU needs (a parser given a short buffer).
    #[error("truncated PDU: {need} bytes needed, {have} given")]
    Truncated {
        /// Bytes the PDU needs.
        need: usize,
        /// Bytes given.
        have: usize,
    },
    /// An ICResp this host cannot work with.
    #[error("unsupported ICResp: {0}")]
    Unsupported(String),
    /// A PDU names a command id that is not outstanding (or not of the
    /// right kind).
    #[error("{pdu} PDU for command id {cid}, which is not {why}")]
    UnknownCid {
        /// The PDU's name.
        pdu: &'static str,
        /// The command id.
        cid: u16,
        /// What the id would have to be.
        why: &'static str,
    },
    /// Data or an R2T outside the command's data.
    #[error(
        "{pdu} PDU for command {cid}: bytes {offset}+{len} are outside its {cmd_len} bytes{why}"
    )]
    DataOutOfRange {
        /// The PDU's name.
        pdu: &'static str,
        /// The command id.
        cid: u16,
        /// Offset given.
        offset: u32,
        /// Length given.
        len: u32,
        /// The command's data length.
        cmd_len: usize,
        /// More detail (empty, or starting with a separator).
        why: &'static str,
    },
    /// A second R2T for a command while the data of its last one has not
    /// gone yet (the host allows one outstanding R2T per command: MAXR2T 0).
    #[error("a second R2T for command {cid} before the data of its last one went (MAXR2T 0)")]
    R2tLimitExceeded {
        /// The command id.
        cid: u16,
    },
    /// The controller terminated the connection with a C2HTermReq.
    #[error("the controller terminated the connection: {} (FES {fes:#x}, FEI {fei:#x})", fes_reason(*fes))]
    TerminatedByController {
        /// Fatal error status.
        fes: u16,
        /// Fatal error information.
        fei: u32,
    },
    /// The controller closed the connection.
    #[error("connection closed by the controller")]
    Closed,
    /// The connection failed (a socket error).
    #[error("connection failed: {0}")]
    Connection(String),
}

impl TcpError {
    /// The FES of the H2CTermReq a host sends for this violation: `None`
    /// when the connection ended on the controller's side, and for a data
    /// digest error, which is no connection error (the spec has the host
    /// fail the command whose data it was and keep the connection).
    pub fn fes(&self) -> Option<u16> {
        Some(match self {
            TcpError::UnknownType(_)
            | TcpError::HeaderLength { .. }
            | TcpError::PduLength { .. }
            | TcpError::DataOffset { .. }
            | TcpError::DigestFlags { .. }
            | TcpError::DataLength { .. }
            | TcpError::Truncated { .. }
            | TcpError::UnknownCid { .. } => fes::INVALID_HEADER_FIELD,
            TcpError::Unexpected { .. } => fes::PDU_SEQUENCE_ERROR,
            TcpError::HeaderDigest { .. } => fes::HEADER_DIGEST_ERROR,
            TcpError::DataOutOfRange { .. } => fes::DATA_OUT_OF_RANGE,
            TcpError::R2tLimitExceeded { .. } => fes::DATA_LIMIT_EXCEEDED,
            TcpError::Unsupported(_) => fes::UNSUPPORTED_PARAMETER,
            TcpError::DataDigest { .. }
            | TcpError::TerminatedByController { .. }
            | TcpError::Closed
            | TcpError::Connection(_) => return None,
        })
    }
}

/// What a TermReq's FES means, in words.
pub fn fes_reason(code: u16) -> &'static str {
    match code {
        fes::INVALID_HEADER_FIELD => "invalid PDU header field",
        fes::PDU_SEQUENCE_ERROR => "PDU sequence error",
        fes::HEADER_DIGEST_ERROR => "header digest error",
        fes::DATA_OUT_OF_RANGE => "data transfer out of range",
        fes::DATA_LIMIT_EXCEEDED => "data transfer limit exceeded",
        fes::UNSUPPORTED_PARAMETER => "unsupported parameter",
        _ => "unknown fatal error status",
    }
}

/// The name of a PDU type, for errors.
pub fn type_name(t: u8) -> &'static str {
    match t {
        pdu_type::IC_REQ => "ICReq",
        pdu_type::IC_RESP => "ICResp",
        pdu_type::H2C_TERM_REQ => "H2CTermReq",
        pdu_type::C2H_TERM_REQ => "C2HTermReq",
        pdu_type::CAPSULE_CMD => "CapsuleCmd",
        pdu_type::CAPSULE_RESP => "CapsuleResp",
        pdu_type::H2C_DATA => "H2CData",
        pdu_type::C2H_DATA => "C2HData",
        pdu_type::R2T => "R2T",
        _ => "unknown",
    }
}

/// Which side sends a PDU type: `Some(true)` the host, `Some(false)` the
/// controller, `None` an unknown type.
fn sent_by_host(t: u8) -> Option<bool> {
    match t {
        pdu_type::IC_REQ | pdu_type::H2C_TERM_REQ | pdu_type::CAPSULE_CMD | pdu_type::H2C_DATA => {
            Some(true)
        }
        pdu_type::IC_RESP
        | pdu_type::C2H_TERM_REQ
        | pdu_type::CAPSULE_RESP
        | pdu_type::C2H_DATA
        | pdu_type::R2T => Some(false),
        _ => None,
    }
}

/// The fixed header length of a known type.
fn fixed_hlen(t: u8) -> usize {
    match t {
        pdu_type::IC_REQ | pdu_type::IC_RESP => IC_PDU_BYTES,
        pdu_type::CAPSULE_CMD => CAPSULE_CMD_HLEN,
        pdu_type::CAPSULE_RESP => CAPSULE_RESP_HLEN,
        _ => DATA_HLEN,
    }
}

/// Types that carry digests when negotiated (all but IC and TermReq).
fn carries_digests(t: u8) -> bool {
    !matches!(
        t,
        pdu_type::IC_REQ | pdu_type::IC_RESP | pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ
    )
}

/// Types that may carry data.
fn may_carry_data(t: u8) -> bool {
    matches!(
        t,
        pdu_type::CAPSULE_CMD | pdu_type::H2C_DATA | pdu_type::C2H_DATA
    )
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Checks the common header (the first 8 bytes of `common`) of a PDU
/// sent by the host (`from_host`) or the controller, under `framing`, and
/// says where its parts are.
pub fn plan(common: &[u8], framing: Framing, from_host: bool) -> Result<Plan, TcpError> {
    if common.len() < COMMON_HEADER_BYTES {
        return Err(TcpError::Truncated {
            need: COMMON_HEADER_BYTES,
            have: common.len(),
        });
    }
    let (t, flags, hlen, pdo) = (common[0], common[1], common[2], common[3]);
    let plen = le32(common, 4);
    let pdu = type_name(t);
    match sent_by_host(t) {
        None => return Err(TcpError::UnknownType(t)),
        Some(h) if h != from_host => {
            return Err(TcpError::Unexpected {
                pdu,
                why: format!(
                    "it is sent by the {}",
                    if h { "host" } else { "controller" }
                ),
            })
        }
        Some(_) => {}
    }
    let expected = fixed_hlen(t);
    if hlen as usize != expected {
        return Err(TcpError::HeaderLength {
            pdu,
            hlen,
            expected,
        });
    }
    let plen_err = |why: String| TcpError::PduLength { pdu, plen, why };
    let pdo_err = |why: String| TcpError::DataOffset { pdu, pdo, why };
    let hlen = hlen as usize;
    if !carries_digests(t) {
        if flags & (flag::HDGSTF | flag::DDGSTF) != 0 {
            return Err(TcpError::DigestFlags {
                pdu,
                flags,
                header: false,
                data: false,
            });
        }
        if pdo != 0 {
            return Err(pdo_err("this PDU type carries no data".into()));
        }
        let max = if t == pdu_type::H2C_TERM_REQ || t == pdu_type::C2H_TERM_REQ {
            MAX_TERM_REQ_BYTES
        } else {
            hlen
        };
        if (plen as usize) < hlen || plen as usize > max {
            return Err(plen_err(format!("expected {hlen} to {max}")));
        }
        return Ok(Plan {
            header_bytes: plen as usize,
            data_bytes: 0,
            data_digest: false,
        });
    }
    let hd = flags & flag::HDGSTF != 0;
    let dd = flags & flag::DDGSTF != 0;
    let digests_wrong = hd != framing.header_digest || (dd && !framing.data_digest);
    if digests_wrong {
        return Err(TcpError::DigestFlags {
            pdu,
            flags,
            header: framing.header_digest,
            data: framing.data_digest,
        });
    }
    let head = hlen + if hd { DIGEST_BYTES } else { 0 };
    let plen_u = plen as usize;
    if !may_carry_data(t) || (t == pdu_type::CAPSULE_CMD && plen_u == head) {
        if dd {
            return Err(TcpError::DigestFlags {
                pdu,
                flags,
                header: framing.header_digest,
                data: framing.data_digest,
            });
        }
        if pdo != 0 {
            return Err(pdo_err("the PDU carries no data".into()));
        }
        if plen_u != head {
            return Err(plen_err(format!("expected {head} (header and digest)")));
        }
        return Ok(Plan {
            header_bytes: head,
            data_bytes: 0,
            data_digest: false,
        });
    }
    // A PDU with data: the data digest flag must be set when negotiated.
    if dd != framing.data_digest {
        return Err(TcpError::DigestFlags {
            pdu,
            flags,
            header: framing.header_digest,
            data: framing.data_digest,
        });
    }
    let pdo_u = pdo as usize;
    if pdo_u < head {
        return Err(pdo_err(format!(
            "the header and its digest take {head} bytes"
        )));
    }
    if !pdo_u.is_multiple_of(4) {
        return Err(pdo_err("not a multiple of 4".into()));
    }
    let tail = if dd { DIGEST_BYTES } else { 0 };
    if plen_u <= pdo_u + tail {
        return Err(plen_err(format!(
            "no data after the data offset {pdo_u} (and digest)"
        )));
    }
    Ok(Plan {
        header_bytes: pdo_u,
        data_bytes: plen_u - pdo_u - tail,
        data_digest: dd,
    })
}

/// Parses the header part of a PDU (its first `plan.header_bytes` bytes,
/// checked by [`plan`] with the same arguments): verifies the header
/// digest and reads the type's fields.
pub fn parse_header(
    bytes: &[u8],
    framing: Framing,
    from_host: bool,
) -> Result<(Header, Plan), TcpError> {
    let p = plan(bytes, framing, from_host)?;
    if bytes.len() < p.header_bytes {
        return Err(TcpError::Truncated {
            need: p.header_bytes,
            have: bytes.len(),
        });
    }
    let t = bytes[0];
    let flags = bytes[1];
    let hlen = bytes[2] as usize;
    let pdu = type_name(t);
    if flags & flag::HDGSTF != 0 {
        let expected = crc32c(&bytes[..hlen]);
        let found = le32(bytes, hlen);
        if expected != found {
            return Err(TcpError::HeaderDigest {
                pdu,
                expected,
                found,
            });
        }
    }
    let data_header = || DataHeader {
        cccid: le16(bytes, 8),
        ttag: le16(bytes, 10),
        datao: le32(bytes, 12),
        datal: le32(bytes, 16),
        last: flags & flag::LAST_PDU != 0,
        success: flags & flag::SUCCESS != 0,
    };
    let header = match t {
        pdu_type::IC_REQ => Header::IcReq(IcReq {
            pfv: le16(bytes, 8),
            hpda: bytes[10],
            digests: digest_framing(bytes[11]),
            maxr2t: le32(bytes, 12),
        }),
        pdu_type::IC_RESP => Header::IcResp(IcResp {
            pfv: le16(bytes, 8),
            cpda: bytes[10],
            digests: digest_framing(bytes[11]),
            maxh2cdata: le32(bytes, 12),
        }),
        pdu_type::H2C_TERM_REQ | pdu_type::C2H_TERM_REQ => Header::TermReq {
            from_host: t == pdu_type::H2C_TERM_REQ,
            fes: le16(bytes, 8),
            fei: le32(bytes, 10),
        },
        pdu_type::CAPSULE_CMD => {
            let mut d = [0u32; 16];
            for (i, v) in d.iter_mut().enumerate() {
                *v = le32(bytes, COMMON_HEADER_BYTES + 4 * i);
            }
            Header::CapsuleCmd(d)
        }
        pdu_type::CAPSULE_RESP => {
            let mut d = [0u32; 4];
            for (i, v) in d.iter_mut().enumerate() {
                *v = le32(bytes, COMMON_HEADER_BYTES + 4 * i);
            }
            Header::CapsuleResp(Completion::decode(d))
        }
        pdu_type::H2C_DATA | pdu_type::C2H_DATA => {
            let h = data_header();
            if h.datal as usize != p.data_bytes {
                return Err(TcpError::DataLength {
                    pdu,
                    datal: h.datal,
                    carried: p.data_bytes,
                });
            }
            if h.success && (t == pdu_type::H2C_DATA || !h.last) {
                return Err(TcpError::Unexpected {
                    pdu,
                    why: "SUCCESS flag without LAST_PDU, or on H2CData".into(),
                });
            }
            if t == pdu_type::H2C_DATA {
                Header::H2cData(h)
            } else {
                Header::C2hData(h)
            }
        }
        pdu_type::R2T => Header::R2t(R2t {
            cccid: le16(bytes, 8),
            ttag: le16(bytes, 10),
            r2to: le32(bytes, 12),
            r2tl: le32(bytes, 16),
        }),
        other => return Err(TcpError::UnknownType(other)),
    };
    Ok((header, p))
}

/// Parses one whole PDU (exactly `buf`, header to data digest): its header
/// and its data, the data digest verified.
pub fn parse_pdu(
    buf: &[u8],
    framing: Framing,
    from_host: bool,
) -> Result<(Header, &[u8]), TcpError> {
    let (header, p) = parse_header(buf, framing, from_host)?;
    let need = p.pdu_bytes();
    if buf.len() != need {
        return Err(if buf.len() < need {
            TcpError::Truncated {
                need,
                have: buf.len(),
            }
        } else {
            TcpError::PduLength {
                pdu: type_name(buf[0]),
                plen: le32(buf, 4),
                why: format!("{} bytes given", buf.len()),
            }
        });
    }
    let data = &buf[p.header_bytes..p.header_bytes + p.data_bytes];
    if p.data_digest {
        check_data_digest(type_name(buf[0]), crc32c(data), &buf[need - DIGEST_BYTES..])?;
    }
    Ok((header, data))
}

/// Compares a data digest computed over the data with the 4 bytes received.
pub fn check_data_digest(pdu: &'static str, expected: u32, digest: &[u8]) -> Result<(), TcpError> {
    let found = le32(digest, 0);
    if expected != found {
        return Err(TcpError::DataDigest {
            pdu,
            expected,
            found,
        });
    }
    Ok(())
}

/// Type-specific header bytes, built on the stack (no allocation per PDU).
struct Fields {
    bytes: [u8; IC_PDU_BYTES - COMMON_HEADER_BYTES],
    len: usize,
}

impl Fields {
    fn extend_from_slice(&mut self, s: &[u8]) {
        self.bytes[self.len..self.len + s.len()].copy_from_slice(s);
        self.len += s.len();
    }
    fn push(&mut self, b: u8) {
        self.extend_from_slice(&[b]);
    }
}

/// The type-specific header bytes (after the common header, as long as
/// the type's fixed header) and flags of `h`, for [`encode_pdu`].
fn specific(h: &Header) -> (u8, u8, Fields) {
    let mut b = Fields {
        bytes: [0; IC_PDU_BYTES - COMMON_HEADER_BYTES],
        len: 0,
    };
    let (t, flags) = match h {
        Header::IcReq(r) => {
            b.extend_from_slice(&r.pfv.to_le_bytes());
            b.push(r.hpda);
            b.push(digest_byte(r.digests));
            b.extend_from_slice(&r.maxr2t.to_le_bytes());
            (pdu_type::IC_REQ, 0)
        }
        Header::IcResp(r) => {
            b.extend_from_slice(&r.pfv.to_le_bytes());
            b.push(r.cpda);
            b.push(digest_byte(r.digests));
            b.extend_from_slice(&r.maxh2cdata.to_le_bytes());
            (pdu_type::IC_RESP, 0)
        }
        Header::TermReq {
            from_host,
            fes,
            fei,
        } => {
            b.extend_from_slice(&fes.to_le_bytes());
            b.extend_from_slice(&fei.to_le_bytes());
            let t = if *from_host {
                pdu_type::H2C_TERM_REQ
            } else {
                pdu_type::C2H_TERM_REQ
            };
            (t, 0)
        }
        Header::CapsuleCmd(d) => {
            d.iter().for_each(|v| b.extend_from_slice(&v.to_le_bytes()));
            (pdu_type::CAPSULE_CMD, 0)
        }
        Header::CapsuleResp(c) => {
            c.encode()
                .iter()
                .for_each(|v| b.extend_from_slice(&v.to_le_bytes()));
            (pdu_type::CAPSULE_RESP, 0)
        }
        Header::H2cData(d) | Header::C2hData(d) => {
            b.extend_from_slice(&d.cccid.to_le_bytes());
            b.extend_from_slice(&d.ttag.to_le_bytes());
            b.extend_from_slice(&d.datao.to_le_bytes());
            b.extend_from_slice(&d.datal.to_le_bytes());
            let f =
                if d.last { flag::LAST_PDU } else { 0 } | if d.success { flag::SUCCESS } else { 0 };
            let t = if matches!(h, Header::H2cData(_)) {
                pdu_type::H2C_DATA
            } else {
                pdu_type::C2H_DATA
            };
            (t, f)
        }
        Header::R2t(r) => {
            b.extend_from_slice(&r.cccid.to_le_bytes());
            b.extend_from_slice(&r.ttag.to_le_bytes());
            b.extend_from_slice(&r.r2to.to_le_bytes());
            b.extend_from_slice(&r.r2tl.to_le_bytes());
            (pdu_type::R2T, 0)
        }
    };
    // The rest of the fixed header is reserved: zeroes.
    b.len = fixed_hlen(t) - COMMON_HEADER_BYTES;
    (t, flags, b)
}

/// Appends the PDU `h` with `data` (the pieces in order; empty for none)
/// to `out`, with digests as `framing` says and the data at an offset
/// that is a multiple of `align` bytes (4 or more; the peer's PDA).
/// TermReqs take `data` as the offending header they carry.
pub fn encode_pdu(out: &mut Vec<u8>, h: &Header, data: &[&[u8]], framing: Framing, align: usize) {
    let (t, flags, spec) = specific(h);
    let hlen = COMMON_HEADER_BYTES + spec.len;
    let data_len: usize = data.iter().map(|d| d.len()).sum();
    let digests = carries_digests(t);
    let hd = digests && framing.header_digest;
    let dd = digests && framing.data_digest && data_len > 0;
    let head = hlen + if hd { DIGEST_BYTES } else { 0 };
    let pdo = if data_len > 0 && digests {
        head.next_multiple_of(align.max(4))
    } else {
        0
    };
    let data_at = if pdo > 0 { pdo } else { head };
    let plen = data_at + data_len + if dd { DIGEST_BYTES } else { 0 };
    debug_assert!(pdo <= MAX_DATA_OFFSET);
    let start = out.len();
    let f = flags | if hd { flag::HDGSTF } else { 0 } | if dd { flag::DDGSTF } else { 0 };
    out.extend_from_slice(&[t, f, hlen as u8, pdo as u8]);
    out.extend_from_slice(&(plen as u32).to_le_bytes());
    out.extend_from_slice(&spec.bytes[..spec.len]);
    if hd {
        let digest = crc32c(&out[start..start + hlen]);
        out.extend_from_slice(&digest.to_le_bytes());
    }
    out.resize(start + data_at, 0);
    let mut crc = 0;
    for d in data {
        out.extend_from_slice(d);
        if dd {
            crc = crc32c_append(crc, d);
        }
    }
    if dd {
        out.extend_from_slice(&crc.to_le_bytes());
    }
    debug_assert_eq!(out.len() - start, plen);
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Framing; 4] = [
        Framing {
            header_digest: false,
            data_digest: false,
        },
        Framing {
            header_digest: true,
            data_digest: false,
        },
        Framing {
            header_digest: false,
            data_digest: true,
        },
        Framing {
            header_digest: true,
            data_digest: true,
        },
    ];

    fn samples() -> Vec<(Header, Vec<u8>, bool)> {
        let data = |n: usize| (0..n).map(|i| (i * 7 + 3) as u8).collect::<Vec<u8>>();
        let mut sqe = [0u32; 16];
        sqe.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as u32 * 0x0101_0101);
        vec![
            (
                Header::IcReq(IcReq {
                    pfv: 0,
                    hpda: 0,
                    digests: ALL[3],
                    maxr2t: 0,
                }),
                vec![],
                true,
            ),
            (
                Header::IcResp(IcResp {
                    pfv: 0,
                    cpda: 1,
                    digests: ALL[1],
                    maxh2cdata: 0x40_0000,
                }),
                vec![],
                false,
            ),
            (
                Header::TermReq {
                    from_host: true,
                    fes: fes::HEADER_DIGEST_ERROR,
                    fei: 0,
                },
                data(24),
                true,
            ),
            (
                Header::TermReq {
                    from_host: false,
                    fes: fes::INVALID_HEADER_FIELD,
                    fei: 4,
                },
                vec![],
                false,
            ),
            (Header::CapsuleCmd(sqe), vec![], true),
            (Header::CapsuleCmd(sqe), data(4096), true),
            (
                Header::CapsuleResp(Completion {
                    dw0: 7,
                    sq_head: 3,
                    sq_id: 1,
                    cid: 9,
                    phase: false,
                    sc: 0x80,
                    sct: 0,
                    dnr: true,
                }),
                vec![],
                false,
            ),
            (
                Header::H2cData(DataHeader {
                    cccid: 5,
                    ttag: 2,
                    datao: 8192,
                    datal: 1000,
                    last: true,
                    success: false,
                }),
                data(1000),
                true,
            ),
            (
                Header::C2hData(DataHeader {
                    cccid: 65535,
                    ttag: 0,
                    datao: 0,
                    datal: 512,
                    last: true,
                    success: true,
                }),
                data(512),
                false,
            ),
            (
                Header::R2t(R2t {
                    cccid: 1,
                    ttag: 77,
                    r2to: 4096,
                    r2tl: 65536,
                }),
                vec![],
                false,
            ),
        ]
    }

    #[test]
    fn every_pdu_round_trips_under_every_framing_and_alignment() {
        for framing in ALL {
            for align in [4, 8, 32] {
                for (h, data, from_host) in samples() {
                    let mut out = vec![0xEE]; // encoding appends
                    encode_pdu(&mut out, &h, &[&data], framing, align);
                    let pdu = &out[1..];
                    let (back, got) = parse_pdu(pdu, framing, from_host)
                        .unwrap_or_else(|e| panic!("{h:?} {framing:?}: {e}"));
                    assert_eq!(back, h);
                    let is_term = matches!(h, Header::TermReq { .. });
                    if is_term {
                        // TermReq data is part of its header part.
                        assert_eq!(pdu.len(), TERM_REQ_HLEN + data.len());
                    } else {
                        assert_eq!(got, &data[..]);
                    }
                    let p = plan(pdu, framing, from_host).unwrap();
                    assert_eq!(p.pdu_bytes(), pdu.len());
                    if !data.is_empty() && !is_term {
                        assert_eq!(p.header_bytes % align, 0, "data aligned");
                    }
                    // The other side never accepts it.
                    assert!(matches!(
                        plan(pdu, framing, !from_host),
                        Err(TcpError::Unexpected { .. })
                    ));
                }
            }
        }
    }

    #[test]
    fn data_split_in_pieces_encodes_as_one() {
        let f = ALL[3];
        let h = Header::H2cData(DataHeader {
            cccid: 1,
            ttag: 1,
            datao: 0,
            datal: 10,
            last: false,
            success: false,
        });
        let (mut a, mut b) = (Vec::new(), Vec::new());
        encode_pdu(&mut a, &h, &[b"0123456789"], f, 4);
        encode_pdu(&mut b, &h, &[b"012", b"", b"3456789"], f, 4);
        assert_eq!(a, b);
    }

    fn c2h_data(framing: Framing) -> Vec<u8> {
        let mut out = Vec::new();
        let h = Header::C2hData(DataHeader {
            cccid: 3,
            ttag: 0,
            datao: 0,
            datal: 64,
            last: true,
            success: false,
        });
        encode_pdu(&mut out, &h, &[&[0x5a; 64]], framing, 4);
        out
    }

    #[test]
    fn digest_mismatches_are_caught() {
        let f = ALL[3];
        let mut pdu = c2h_data(f);
        pdu[9] ^= 1; // a header byte
        assert!(matches!(
            parse_pdu(&pdu, f, false),
            Err(TcpError::HeaderDigest { pdu: "C2HData", .. })
        ));
        let mut pdu = c2h_data(f);
        let n = pdu.len();
        pdu[n - 10] ^= 0x80; // a data byte
        let e = parse_pdu(&pdu, f, false).unwrap_err();
        assert!(matches!(e, TcpError::DataDigest { .. }), "{e}");
        // A data digest error fails the command, not the connection: no
        // TermReq (and never FES 0x03, which is the header digest's).
        assert_eq!(e.fes(), None);
        let h = parse_pdu(&c2h_data(f)[..], f, false).map(|_| ());
        assert_eq!(h, Ok(()));
        let mut pdu = c2h_data(f);
        pdu[9] ^= 1;
        assert_eq!(
            parse_pdu(&pdu, f, false).unwrap_err().fes(),
            Some(fes::HEADER_DIGEST_ERROR)
        );
    }

    #[test]
    fn digest_flags_must_match_the_negotiation() {
        let pdu = c2h_data(ALL[0]);
        for f in &ALL[1..] {
            assert!(matches!(
                plan(&pdu, *f, false),
                Err(TcpError::DigestFlags { .. })
            ));
        }
        // A data digest on a PDU without data.
        let mut r2t = Vec::new();
        let h = Header::R2t(R2t {
            cccid: 0,
            ttag: 0,
            r2to: 0,
            r2tl: 4096,
        });
        encode_pdu(&mut r2t, &h, &[], ALL[2], 4);
        r2t[1] |= flag::DDGSTF;
        assert!(matches!(
            plan(&r2t, ALL[2], false),
            Err(TcpError::DigestFlags { .. })
        ));
        // Digest flags on an ICResp.
        let mut ic = Vec::new();
        encode_pdu(&mut ic, &samples()[1].0, &[], ALL[3], 4);
        ic[1] = flag::HDGSTF;
        assert!(matches!(
            plan(&ic, ALL[3], false),
            Err(TcpError::DigestFlags { .. })
        ));
    }

    #[test]
    fn bad_types_lengths_and_offsets_are_typed_errors() {
        let f = ALL[0];
        let good = c2h_data(f);
        let with = |at: usize, v: u8| {
            let mut p = good.clone();
            p[at] = v;
            p
        };
        assert_eq!(
            plan(&with(0, 0x08), f, false),
            Err(TcpError::UnknownType(0x08))
        );
        assert_eq!(
            plan(&with(0, 0x42), f, false),
            Err(TcpError::UnknownType(0x42))
        );
        assert!(matches!(
            plan(&with(2, 23), f, false),
            Err(TcpError::HeaderLength {
                hlen: 23,
                expected: 24,
                ..
            })
        ));
        assert!(matches!(
            plan(&with(3, 8), f, false),
            Err(TcpError::DataOffset { pdo: 8, .. })
        ));
        assert!(matches!(
            plan(&with(3, 26), f, false),
            Err(TcpError::DataOffset { pdo: 26, .. })
        ));
        // PLEN leaving no data after PDO.
        let mut p = good.clone();
        p[4..8].copy_from_slice(&24u32.to_le_bytes());
        assert!(matches!(
            plan(&p, f, false),
            Err(TcpError::PduLength { plen: 24, .. })
        ));
        // DATAL disagreeing with PLEN.
        let mut p = good.clone();
        p[16..20].copy_from_slice(&65u32.to_le_bytes());
        assert!(matches!(
            parse_header(&p, f, false),
            Err(TcpError::DataLength {
                datal: 65,
                carried: 64,
                ..
            })
        ));
        // SUCCESS without LAST_PDU.
        let p = with(1, flag::SUCCESS);
        assert!(matches!(
            parse_header(&p, f, false),
            Err(TcpError::Unexpected { pdu: "C2HData", .. })
        ));
        // A response capsule with a PLEN past its header.
        let mut resp = Vec::new();
        encode_pdu(&mut resp, &samples()[6].0, &[], f, 4);
        resp[4] += 4;
        assert!(matches!(
            plan(&resp, f, false),
            Err(TcpError::PduLength { .. })
        ));
        // A TermReq longer than the most it may carry.
        let mut term = Vec::new();
        encode_pdu(&mut term, &samples()[3].0, &[&[0; 128]], f, 4);
        assert!(plan(&term, f, false).is_ok());
        term[4..8].copy_from_slice(&153u32.to_le_bytes());
        assert!(matches!(
            plan(&term, f, false),
            Err(TcpError::PduLength { plen: 153, .. })
        ));
        // Short and long buffers.
        assert!(matches!(
            plan(&good[..7], f, false),
            Err(TcpError::Truncated { need: 8, have: 7 })
        ));
        assert!(matches!(
            parse_pdu(&good[..good.len() - 1], f, false),
            Err(TcpError::Truncated { .. })
        ));
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(
            parse_pdu(&long, f, false),
            Err(TcpError::PduLength { .. })
        ));
    }

    #[test]
    fn term_req_reasons_are_named() {
        let e = TcpError::TerminatedByController {
            fes: fes::DATA_OUT_OF_RANGE,
            fei: 0,
        };
        assert!(e.to_string().contains("data transfer out of range"), "{e}");
        assert_eq!(e.fes(), None);
        assert!(fes_reason(0x77).contains("unknown"));
        assert_eq!(
            TcpError::R2tLimitExceeded { cid: 1 }.fes(),
            Some(fes::DATA_LIMIT_EXCEEDED)
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic sweep (the fuzz target does the real work).
        let mut rng = crate::util::SplitMix64::new(0x1234_5678_9abc_def0);
        for len in 0..300 {
            for _ in 0..20 {
                let mut b = vec![0u8; len];
                rng.fill(&mut b);
                if len > 3 {
                    b[0] %= 10; // mostly known types
                    b[2] = [24, 72, 128][len % 3];
                }
                for f in ALL {
                    for side in [false, true] {
                        let _ = parse_pdu(&b, f, side);
                        let _ = parse_header(&b, f, side);
                    }
                }
            }
        }
    }
}
