//! [`TcpError`]: every way an NVMe/TCP connection can break the protocol
//! or end, from a bad field in a PDU (the parser's errors) to a PDU that
//! does not fit the queue's state (the I/O queue's) and a closed socket;
//! and the FES of the H2CTermReq the host sends for each.
//!
//! Invariant: [`TcpError::fes`] gives a FES for every violation the host
//! ends the connection over (it sends an H2CTermReq with that FES), and
//! none for a data digest error (only that command fails) or when the
//! connection already ended (a C2HTermReq, a close, a socket error).

use super::{fes, fes_reason};

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
