//! A slot's geometry and its header's bytes: the constants that place a
//! slot's header page and data area, [`Header`] and its encoding (the
//! layout that the module's docs and FORMAT.md give), and [`Record`], a
//! slot found with a valid header. No I/O.
//!
//! Invariants:
//! - A header is valid only with its magic, its version and its crc32c; a
//!   slot's newest header is the valid one of its two copies with the
//!   higher `seq`.
//! - Both copies fit in the header page, and a slot is a whole number of
//!   4 KiB pages (checked when the crate builds).

use super::Owner;

/// Appends are written to the device in chunks of this many bytes: an
/// append buffer holds one chunk (plus a block at each end), and a slot's
/// data area holds one append buffer.
pub(crate) const WRITE_CHUNK: usize = 4 << 20;

/// Bytes of a slot's data area: an append buffer (`WRITE_CHUNK` and two
/// blocks of at most 4 KiB).
pub const SLOT_DATA: usize = WRITE_CHUNK + 8192;
pub(super) const HEADER_PAGE: usize = 4096;
pub(super) const SLOT_BYTES: usize = HEADER_PAGE + SLOT_DATA;
/// Most append buffers one mount can hold at once (the mapping reserves
/// address space for this many; memory is taken only by slots in use).
pub const MAX_SLOTS: usize = 4096;
pub(super) const HEADER_LEN: usize = 128;
const CRC_AT: usize = 124;
const MAGIC: [u8; 8] = *b"BFSUNSY1";
const VERSION: u32 = 1;

const _: () = assert!(SLOT_BYTES.is_multiple_of(4096));
const _: () = assert!(2 * HEADER_LEN <= HEADER_PAGE);

/// One slot's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Who wrote it.
    pub owner: Owner,
    /// The file's blob.
    pub blob: u64,
    /// Order of the slot's header writes (the newer of its two copies
    /// wins; a file's slots never hold the same bytes, so their order
    /// does not matter).
    pub seq: u64,
    /// File offset of data byte 0.
    pub file_off: u64,
    /// Data bytes that are the file's.
    pub used: u64,
    /// The file's length.
    pub file_len: u64,
}

impl Header {
    pub(super) fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..32].copy_from_slice(&self.owner.boot);
        b[32..48].copy_from_slice(&self.owner.fs);
        b[48..56].copy_from_slice(&self.owner.gen.to_le_bytes());
        b[56..64].copy_from_slice(&self.blob.to_le_bytes());
        b[64..72].copy_from_slice(&self.seq.to_le_bytes());
        b[72..80].copy_from_slice(&self.file_off.to_le_bytes());
        b[80..88].copy_from_slice(&self.used.to_le_bytes());
        b[88..96].copy_from_slice(&self.file_len.to_le_bytes());
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The header in `b`, if it is one (magic, version, crc).
    pub(super) fn decode(b: &[u8]) -> Option<Header> {
        let b: &[u8; HEADER_LEN] = b.get(..HEADER_LEN)?.try_into().ok()?;
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(b[CRC_AT..].try_into().expect("4 bytes"));
        if b[0..8] != MAGIC
            || b[8..12] != VERSION.to_le_bytes()
            || crc != crc32c::crc32c(&b[..CRC_AT])
        {
            return None;
        }
        Some(Header {
            owner: Owner {
                boot: b[16..32].try_into().expect("16 bytes"),
                fs: b[32..48].try_into().expect("16 bytes"),
                gen: u64_at(48),
            },
            blob: u64_at(56),
            seq: u64_at(64),
            file_off: u64_at(72),
            used: u64_at(80),
            file_len: u64_at(88),
        })
    }

    /// The newer valid header of a header page's two copies.
    pub(super) fn newest(page: &[u8]) -> Option<(usize, Header)> {
        let a = Header::decode(&page[..HEADER_LEN]).map(|h| (0, h));
        let b = Header::decode(&page[HEADER_LEN..2 * HEADER_LEN]).map(|h| (1, h));
        match (a, b) {
            (Some(a), Some(b)) => Some(if b.1.seq > a.1.seq { b } else { a }),
            (a, b) => a.or(b),
        }
    }
}

/// A slot found with a valid header.
#[derive(Clone, Copy, Debug)]
pub struct Record {
    /// The slot.
    pub slot: u32,
    /// Its newest valid header.
    pub header: Header,
}
