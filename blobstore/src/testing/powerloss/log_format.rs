//! The byte layout of the power-loss log ([`super::PowerLossDevice`]): a
//! side file next to an image that holds undo records for the writes no
//! completed flush has made durable yet. Every byte of the log is encoded
//! and decoded here, and only here.
//!
//! ```text
//! file: a header, then records back to back
//!   header (24 bytes): magic "BSPWRLOG", version u32, sector size u32,
//!                      reserved u32 (0), crc32c u32 of bytes 0..20
//!   record (40-byte head + payload):
//!     magic "PLRC", kind u8, 3 zero bytes, seq u64, offset u64 (bytes),
//!     range_len u64 (bytes), payload_len u32, crc32c u32 of the head's
//!     first 36 bytes followed by the payload
//!   kinds: 1 undo (payload: the range's old bytes, payload_len == range_len),
//!          2 undo-zero (the range held zeroes; no payload),
//!          3 flushed (payload: u64 seqs a completed flush made durable)
//! ```
//!
//! Invariants:
//! - The header and every record carry a magic and a crc32c (the header a
//!   version too); decoding checks them before it trusts anything else.
//! - All integers are little-endian; no `usize` is ever encoded.
//! - Decoding untrusted bytes never panics: a short header, a bad checksum
//!   or an inconsistent record is [`Error::Corrupt`] naming where and what;
//!   a record cut short at the end of the log is `Ok(None)`.

use crate::error::{Error, Result};

/// Magic of a power-loss log file.
pub const MAGIC: [u8; 8] = *b"BSPWRLOG";
/// Version of the power-loss log layout.
pub const VERSION: u32 = 1;
/// Length of the power-loss log header.
pub const HEADER_LEN: usize = 24;
/// Magic of one power-loss log record.
pub const RECORD_MAGIC: [u8; 4] = *b"PLRC";
/// Length of a power-loss record's head (the payload follows it).
pub const RECORD_HEAD_LEN: usize = 40;
/// Largest payload of one power-loss record (undo data is split into
/// records of at most this size).
pub const MAX_PAYLOAD: usize = 1 << 20;

/// What a power-loss log record says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// The range held the payload before write `seq` was issued.
    Undo,
    /// The range held zeroes before write `seq` was issued.
    UndoZero,
    /// A completed flush made the writes listed in the payload durable.
    Flushed,
}

impl RecordKind {
    fn tag(self) -> u8 {
        match self {
            RecordKind::Undo => 1,
            RecordKind::UndoZero => 2,
            RecordKind::Flushed => 3,
        }
    }
}

/// One record of a power-loss log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// What the record says.
    pub kind: RecordKind,
    /// Sequence number of the write (0 for a flushed record).
    pub seq: u64,
    /// Byte offset of the range on the device.
    pub offset: u64,
    /// Length of the range in bytes.
    pub range_len: u64,
    /// Old bytes (undo) or little-endian u64 seqs (flushed); empty otherwise.
    pub payload: &'a [u8],
}

/// Encodes the header of a power-loss log for a device of `sector`-byte
/// blocks.
pub fn encode_header(sector: u32) -> [u8; HEADER_LEN] {
    let mut b = [0u8; HEADER_LEN];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&sector.to_le_bytes());
    let crc = crc32c::crc32c(&b[..20]);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a power-loss log header; returns the sector size.
pub fn decode_header(buf: &[u8], location: &str) -> Result<u32> {
    let Some(b) = buf.get(..HEADER_LEN) else {
        return Err(Error::corrupt(
            location,
            format!(
                "power-loss log header is {} bytes, expected {HEADER_LEN}",
                buf.len()
            ),
        ));
    };
    if b[0..8] != MAGIC {
        return Err(Error::corrupt(location, "not a power-loss log (bad magic)"));
    }
    let crc = u32::from_le_bytes(b[20..24].try_into().expect("4 bytes"));
    if crc32c::crc32c(&b[..20]) != crc {
        return Err(Error::corrupt(
            location,
            "power-loss log header checksum mismatch",
        ));
    }
    let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(Error::corrupt(
            location,
            format!("power-loss log version {version}, this build reads {VERSION}"),
        ));
    }
    let sector = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
    if sector == 0 || !sector.is_power_of_two() || sector > 1 << 16 {
        return Err(Error::corrupt(
            location,
            format!("power-loss log sector size {sector}"),
        ));
    }
    Ok(sector)
}

/// Appends the encoding of `rec` to `out`.
pub fn encode_record(rec: &Record<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&RECORD_MAGIC);
    out.extend_from_slice(&[rec.kind.tag(), 0, 0, 0]);
    out.extend_from_slice(&rec.seq.to_le_bytes());
    out.extend_from_slice(&rec.offset.to_le_bytes());
    out.extend_from_slice(&rec.range_len.to_le_bytes());
    out.extend_from_slice(&(rec.payload.len() as u32).to_le_bytes());
    let mut crc = crc32c::crc32c(&out[start..]);
    crc = crc32c::crc32c_append(crc, rec.payload);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(rec.payload);
}

/// Decodes the record at the start of `buf`: `Ok(None)` when `buf` ends
/// inside it (a record whose append was cut short), otherwise the record and
/// its encoded length. A complete record that fails its checks is
/// [`Error::Corrupt`].
pub fn decode_record<'a>(buf: &'a [u8], location: &str) -> Result<Option<(Record<'a>, usize)>> {
    let Some(h) = buf.get(..RECORD_HEAD_LEN) else {
        return Ok(None);
    };
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    if h[0..4] != RECORD_MAGIC {
        return Err(Error::corrupt(location, "bad power-loss record magic"));
    }
    let payload_len = u32::from_le_bytes(h[32..36].try_into().expect("4 bytes")) as usize;
    if payload_len > MAX_PAYLOAD {
        return Err(Error::corrupt(
            location,
            format!("power-loss record payload of {payload_len} bytes is over the limit"),
        ));
    }
    let total = RECORD_HEAD_LEN + payload_len;
    let Some(payload) = buf.get(RECORD_HEAD_LEN..total) else {
        return Ok(None);
    };
    let crc = u32::from_le_bytes(h[36..40].try_into().expect("4 bytes"));
    if crc32c::crc32c_append(crc32c::crc32c(&h[..36]), payload) != crc {
        return Err(Error::corrupt(
            location,
            "power-loss record checksum mismatch",
        ));
    }
    let kind = match h[4] {
        1 => RecordKind::Undo,
        2 => RecordKind::UndoZero,
        3 => RecordKind::Flushed,
        t => {
            return Err(Error::corrupt(
                location,
                format!("unknown power-loss record kind {t}"),
            ))
        }
    };
    let rec = Record {
        kind,
        seq: u64_at(8),
        offset: u64_at(16),
        range_len: u64_at(24),
        payload,
    };
    let consistent = match kind {
        RecordKind::Undo => rec.range_len == payload_len as u64 && payload_len > 0,
        RecordKind::UndoZero => payload_len == 0 && rec.range_len > 0,
        RecordKind::Flushed => payload_len.is_multiple_of(8),
    };
    if !consistent || rec.offset.checked_add(rec.range_len).is_none() {
        return Err(Error::corrupt(
            location,
            format!(
                "power-loss record {kind:?} with range {}+{} and {payload_len} payload bytes",
                rec.offset, rec.range_len
            ),
        ));
    }
    Ok(Some((rec, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_records_round_trip_and_damage_is_named() {
        let h = encode_header(4096);
        assert_eq!(decode_header(&h, "log").unwrap(), 4096);
        let mut bad = h;
        bad[13] ^= 1;
        let err = decode_header(&bad, "log").unwrap_err().to_string();
        assert!(err.contains("checksum mismatch"), "{err}");
        assert!(decode_header(&h[..10], "log").is_err());

        let old = [7u8; 512];
        let rec = Record {
            kind: RecordKind::Undo,
            seq: 3,
            offset: 8192,
            range_len: 512,
            payload: &old,
        };
        let mut out = Vec::new();
        encode_record(&rec, &mut out);
        assert_eq!(out.len(), RECORD_HEAD_LEN + 512);
        assert_eq!(decode_record(&out, "log").unwrap(), Some((rec, out.len())));
        // Cut short: not there yet, not corrupt.
        assert_eq!(decode_record(&out[..out.len() - 1], "log").unwrap(), None);
        assert_eq!(decode_record(&out[..5], "log").unwrap(), None);
        let mut bad = out.clone();
        bad[RECORD_HEAD_LEN + 9] ^= 1;
        assert!(matches!(
            decode_record(&bad, "log"),
            Err(Error::Corrupt { .. })
        ));
        // An undo record whose payload does not match its range.
        let mut out = Vec::new();
        encode_record(
            &Record {
                range_len: 1024,
                ..rec
            },
            &mut out,
        );
        let err = decode_record(&out, "log").unwrap_err().to_string();
        assert!(err.contains("Undo with range 8192+1024"), "{err}");
    }
}
