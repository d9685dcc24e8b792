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
//! Layout: here the wire format itself (the constants, the header types,
//! and [`plan`], [`parse_header`], [`parse_pdu`] and [`encode_pdu`]),
//! `error` the [`TcpError`] of every violation, and `tests`. The parser
//! and the encoder stay in one module: both follow the byte table above,
//! field by field, and each must read back what the other writes.
//!
//! Invariants:
//! - Parsing never panics on any bytes; each inconsistency is a
//!   [`TcpError`] naming the PDU and the field.
//! - Whatever [`encode_pdu`] writes, [`parse_pdu`] reads back as the same
//!   header and data under the same [`Framing`].
//! - Digests are present exactly when negotiated, on every PDU type that
//!   carries them (never on ICReq, ICResp or the TermReqs); a data digest
//!   only on a PDU with data.

mod error;
#[cfg(test)]
mod tests;

pub use error::TcpError;

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
