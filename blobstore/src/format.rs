//! The on-disk byte layout of the blobstore: every struct that touches the
//! disk is encoded and decoded here, and only here. `FORMAT.md` next to the
//! crate draws the same bytes for humans. Other software's signatures (file
//! systems, partition tables) that `init` refuses to format over are only
//! read, never written, and are tabled in [`crate::probe`].
//!
//! Invariants:
//! - Every encoded struct carries a magic, a version and a crc32c; decoding
//!   checks all three before it looks at anything else.
//! - All integers are little-endian; no `usize` is ever encoded.
//! - Decoding untrusted bytes never panics: a short, torn or garbage buffer is
//!   [`Error::Corrupt`] naming where and what.
//! - Descriptor tags are never reused; an unknown tag is corruption, so an
//!   old binary never misreads a newer store.

use crate::error::{Error, Result};

/// Length of the super block; it sits at the start of page 0.
pub const SUPER_BLOCK_LEN: usize = 4096;
/// Super block magic.
pub const SUPER_MAGIC: [u8; 8] = *b"RBLOBSTR";
/// Current format version, written by this code: 3, a store with a backup
/// super block at page [`BACKUP_SUPER_PAGE`] whose blobs may carry their
/// cluster map inline ([`BlobRecord::cluster_map`]).
pub const FORMAT_VERSION: u32 = 3;
/// The oldest format version this code loads: 1, a store without a backup
/// super block (its first bitmap may start at page 1). Such a store keeps
/// version 1 and gets no backup.
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// First format version with a backup super block.
pub const BACKUP_SUPER_VERSION: u32 = 2;
/// First format version whose blobs may carry their cluster map inline in
/// their descriptors (tag 8, [`BlobRecord::cluster_map`]) instead of in
/// extent pages: a small blob then takes one metadata page. A store of an
/// older version keeps its version, and its blobs keep extent pages, so
/// the builds that made it still read it.
pub const INLINE_MAP_VERSION: u32 = 3;
/// The metadata page that holds the backup super block (format 2 on): a
/// byte-for-byte copy of page 0's super block. Its byte offset is this times
/// the page size, which a reader that cannot read the primary does not
/// know: [`backup_super_candidates`] lists the places to try.
pub const BACKUP_SUPER_PAGE: u64 = 1;
/// Smallest metadata page size.
pub const MIN_PAGE_SIZE: u32 = 4096;
/// Largest metadata page size.
pub const MAX_PAGE_SIZE: u32 = 65536;
/// Length of the blobstore type tag.
pub const BSTYPE_LEN: usize = 16;

/// Metadata page magic.
pub const MD_MAGIC: [u8; 4] = *b"BSMD";
/// Bitmap region magic.
pub const MASK_MAGIC: [u8; 4] = *b"BSMK";
/// Bytes of the metadata page header.
pub const MD_HEADER_LEN: usize = 32;
/// Bytes of the crc32c trailer of pages and regions.
pub const CRC_LEN: usize = 4;
/// Bytes of the bitmap region header.
pub const MASK_HEADER_LEN: usize = 16;
/// Marks "no page" in page links and extent tables.
pub const NO_PAGE: u32 = u32::MAX;
/// Largest xattr name, in bytes.
pub const MAX_XATTR_NAME_LEN: usize = 255;
/// Largest xattr value, in bytes (fits any page size >= 4096).
pub const MAX_XATTR_VALUE_LEN: usize = 3584;
/// Header bytes of an extent page's payload.
pub const EXTENT_HEADER_LEN: usize = 12;

const _: () = assert!(SUPER_BLOCK_LEN == 4096);
const _: () = assert!(SUPER_OFF_CRC + CRC_LEN == SUPER_BLOCK_LEN);
const _: () = assert!(SUPER_OFF_RESERVED <= SUPER_OFF_CRC);
const _: () =
    assert!(MD_HEADER_LEN + 3 + 2 + MAX_XATTR_NAME_LEN + MAX_XATTR_VALUE_LEN + CRC_LEN <= 4096);

// Super block offsets, each derived from the one before.
const SUPER_OFF_MAGIC: usize = 0;
const SUPER_OFF_VERSION: usize = SUPER_OFF_MAGIC + 8;
const SUPER_OFF_FLAGS: usize = SUPER_OFF_VERSION + 4;
const SUPER_OFF_PAGE_SIZE: usize = SUPER_OFF_FLAGS + 4;
const SUPER_OFF_CLUSTER_SIZE: usize = SUPER_OFF_PAGE_SIZE + 4;
const SUPER_OFF_IO_UNIT: usize = SUPER_OFF_CLUSTER_SIZE + 4;
const SUPER_OFF_PAD0: usize = SUPER_OFF_IO_UNIT + 4;
const SUPER_OFF_TOTAL_CLUSTERS: usize = SUPER_OFF_PAD0 + 4;
const SUPER_OFF_MASK_START: usize = SUPER_OFF_TOTAL_CLUSTERS + 8;
const SUPER_OFF_PAGE_MASK_LEN: usize = SUPER_OFF_MASK_START + 8;
const SUPER_OFF_CLUSTER_MASK_LEN: usize = SUPER_OFF_PAGE_MASK_LEN + 8;
const SUPER_OFF_BLOBID_MASK_LEN: usize = SUPER_OFF_CLUSTER_MASK_LEN + 8;
const SUPER_OFF_MD_START: usize = SUPER_OFF_BLOBID_MASK_LEN + 8;
const SUPER_OFF_MD_LEN: usize = SUPER_OFF_MD_START + 8;
const SUPER_OFF_SUPER_BLOB: usize = SUPER_OFF_MD_LEN + 8;
const SUPER_OFF_BSTYPE: usize = SUPER_OFF_SUPER_BLOB + 8;
const SUPER_OFF_RESERVED: usize = SUPER_OFF_BSTYPE + BSTYPE_LEN;
const SUPER_OFF_CRC: usize = SUPER_BLOCK_LEN - CRC_LEN;

/// The type tag of the super block at the start of `buf`, read without
/// checking the rest (for naming what a device holds, also when its super
/// block is damaged). `None` without the magic or when `buf` is short.
pub fn super_block_type(buf: &[u8]) -> Option<String> {
    if buf.get(..8)? != SUPER_MAGIC {
        return None;
    }
    let tag = buf.get(SUPER_OFF_BSTYPE..SUPER_OFF_BSTYPE + BSTYPE_LEN)?;
    Some(
        String::from_utf8_lossy(tag)
            .trim_end_matches('\0')
            .to_string(),
    )
}

/// Where a backup super block may sit, for each page size a store can have:
/// `(page size, byte offset)`, smallest first. A copy found at one of them
/// counts only if its own page size is that one (see
/// [`SuperBlock::decode_backup`]).
pub fn backup_super_candidates() -> impl Iterator<Item = (u32, u64)> {
    std::iter::successors(Some(MIN_PAGE_SIZE), |&p| {
        (p < MAX_PAGE_SIZE).then_some(p * 2)
    })
    .map(|p| (p, p as u64 * BACKUP_SUPER_PAGE))
}

/// Super block flag: the store was unloaded cleanly and its bitmaps are valid.
pub const SUPER_FLAG_CLEAN: u32 = 1;

/// Blob flags in the "invalid" set: a reader that does not know a bit here
/// must not open the blob.
pub const BLOB_INVALID_THIN: u64 = 1;
/// Blob flag in the "data read-only" and "metadata read-only" sets.
pub const BLOB_READ_ONLY: u64 = 1;

/// The super block, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SuperBlock {
    /// Format version found.
    pub version: u32,
    /// True when bitmaps on disk are valid (clean unload).
    pub clean: bool,
    /// Metadata page size in bytes.
    pub page_size: u32,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Device block size the store was made with.
    pub io_unit_size: u32,
    /// Clusters in the store, metadata clusters included.
    pub total_clusters: u64,
    /// First page of the bitmap regions.
    pub mask_start: u64,
    /// Pages of the used-metadata-page bitmap.
    pub page_mask_len: u64,
    /// Pages of the used-cluster bitmap.
    pub cluster_mask_len: u64,
    /// Pages of the used-blob-id bitmap.
    pub blobid_mask_len: u64,
    /// First page of the metadata region.
    pub md_start: u64,
    /// Pages in the metadata region.
    pub md_len: u64,
    /// The super blob's id, 0 for none.
    pub super_blob: u64,
    /// Type tag given at init, zero padded.
    pub bstype: [u8; BSTYPE_LEN],
}

fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// Little-endian reader over untrusted bytes: every read is bounds checked.
struct Reader<'a, 'l> {
    buf: &'a [u8],
    pos: usize,
    location: &'l str,
}

impl<'a, 'l> Reader<'a, 'l> {
    fn new(buf: &'a [u8], location: &'l str) -> Self {
        Reader {
            buf,
            pos: 0,
            location,
        }
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(Error::corrupt(
                self.location,
                format!("truncated: need {n} bytes at offset {}", self.pos),
            ));
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.bytes(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(
            self.bytes(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.bytes(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.bytes(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

fn check_crc(buf: &[u8], location: &str) -> Result<()> {
    if buf.len() < CRC_LEN {
        return Err(Error::corrupt(location, "too short to hold a checksum"));
    }
    let (body, tail) = buf.split_at(buf.len() - CRC_LEN);
    let stored = u32::from_le_bytes(tail.try_into().expect("4 bytes"));
    let actual = crc32c::crc32c(body);
    if stored != actual {
        return Err(Error::corrupt(
            location,
            format!("checksum mismatch (stored {stored:#010x}, computed {actual:#010x})"),
        ));
    }
    Ok(())
}

fn seal_crc(buf: &mut [u8]) {
    let n = buf.len() - CRC_LEN;
    let crc = crc32c::crc32c(&buf[..n]);
    put_u32(buf, n, crc);
}

impl SuperBlock {
    /// Encodes into exactly [`SUPER_BLOCK_LEN`] bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SUPER_BLOCK_LEN];
        b[SUPER_OFF_MAGIC..SUPER_OFF_MAGIC + 8].copy_from_slice(&SUPER_MAGIC);
        put_u32(&mut b, SUPER_OFF_VERSION, self.version);
        put_u32(
            &mut b,
            SUPER_OFF_FLAGS,
            if self.clean { SUPER_FLAG_CLEAN } else { 0 },
        );
        put_u32(&mut b, SUPER_OFF_PAGE_SIZE, self.page_size);
        put_u32(&mut b, SUPER_OFF_CLUSTER_SIZE, self.cluster_size);
        put_u32(&mut b, SUPER_OFF_IO_UNIT, self.io_unit_size);
        put_u64(&mut b, SUPER_OFF_TOTAL_CLUSTERS, self.total_clusters);
        put_u64(&mut b, SUPER_OFF_MASK_START, self.mask_start);
        put_u64(&mut b, SUPER_OFF_PAGE_MASK_LEN, self.page_mask_len);
        put_u64(&mut b, SUPER_OFF_CLUSTER_MASK_LEN, self.cluster_mask_len);
        put_u64(&mut b, SUPER_OFF_BLOBID_MASK_LEN, self.blobid_mask_len);
        put_u64(&mut b, SUPER_OFF_MD_START, self.md_start);
        put_u64(&mut b, SUPER_OFF_MD_LEN, self.md_len);
        put_u64(&mut b, SUPER_OFF_SUPER_BLOB, self.super_blob);
        b[SUPER_OFF_BSTYPE..SUPER_OFF_BSTYPE + BSTYPE_LEN].copy_from_slice(&self.bstype);
        seal_crc(&mut b);
        b
    }

    /// Decodes and checks a super block. A buffer without the magic is
    /// [`Error::NotABlobstore`]; anything else wrong is [`Error::Corrupt`].
    pub fn decode(buf: &[u8]) -> Result<SuperBlock> {
        const LOC: &str = "super block";
        if buf.len() < SUPER_BLOCK_LEN {
            return Err(Error::corrupt(LOC, format!("only {} bytes", buf.len())));
        }
        let buf = &buf[..SUPER_BLOCK_LEN];
        if buf[..8] != SUPER_MAGIC {
            return Err(Error::NotABlobstore("no blobstore magic in block 0".into()));
        }
        check_crc(buf, LOC)?;
        let mut r = Reader::new(buf, LOC);
        r.bytes(8)?;
        let version = r.u32()?;
        if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(Error::corrupt(
                LOC,
                format!(
                    "format version {version}, this build reads \
                     {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}"
                ),
            ));
        }
        let flags = r.u32()?;
        if flags & !SUPER_FLAG_CLEAN != 0 {
            return Err(Error::corrupt(LOC, format!("unknown flags {flags:#x}")));
        }
        let sb = SuperBlock {
            version,
            clean: flags & SUPER_FLAG_CLEAN != 0,
            page_size: r.u32()?,
            cluster_size: r.u32()?,
            io_unit_size: {
                let v = r.u32()?;
                r.u32()?;
                v
            },
            total_clusters: r.u64()?,
            mask_start: r.u64()?,
            page_mask_len: r.u64()?,
            cluster_mask_len: r.u64()?,
            blobid_mask_len: r.u64()?,
            md_start: r.u64()?,
            md_len: r.u64()?,
            super_blob: r.u64()?,
            bstype: r.bytes(BSTYPE_LEN)?.try_into().expect("16 bytes"),
        };
        sb.validate()?;
        Ok(sb)
    }

    /// Decodes the copy found at the backup place of `page_size`-byte
    /// pages ([`backup_super_candidates`]): besides every check of
    /// [`SuperBlock::decode`], the copy must be of a format that has a
    /// backup and say that page size, so a copy is never taken from a place
    /// its own store would not put it.
    pub fn decode_backup(buf: &[u8], page_size: u32) -> Result<SuperBlock> {
        const LOC: &str = "backup super block";
        let sb = SuperBlock::decode(buf).map_err(|e| match e {
            Error::NotABlobstore(_) => Error::corrupt(LOC, "no blobstore magic"),
            Error::Corrupt { what, .. } => Error::corrupt(LOC, what),
            e => e,
        })?;
        if sb.version < BACKUP_SUPER_VERSION || sb.page_size != page_size {
            return Err(Error::corrupt(
                LOC,
                format!(
                    "a version {} super block of {}-byte pages at the backup place of \
                     {page_size}-byte pages",
                    sb.version, sb.page_size
                ),
            ));
        }
        Ok(sb)
    }

    /// True when the store keeps a backup super block at page
    /// [`BACKUP_SUPER_PAGE`] (format 2 on).
    pub fn has_backup(&self) -> bool {
        self.version >= BACKUP_SUPER_VERSION
    }

    /// True when the store's blobs may carry their cluster map inline
    /// (format [`INLINE_MAP_VERSION`] on).
    pub fn has_inline_map(&self) -> bool {
        self.version >= INLINE_MAP_VERSION
    }

    /// The first page a bitmap may start at: after the super block, and
    /// after its backup where the format has one.
    pub fn first_mask_page(version: u32) -> u64 {
        if version >= BACKUP_SUPER_VERSION {
            BACKUP_SUPER_PAGE + 1
        } else {
            1
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::corrupt("super block", what));
        if !self.page_size.is_power_of_two()
            || !(MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&self.page_size)
        {
            return bad(format!("page size {}", self.page_size));
        }
        if self.io_unit_size != 512 && self.io_unit_size != 4096 {
            return bad(format!("io unit size {}", self.io_unit_size));
        }
        if self.cluster_size == 0 || !self.cluster_size.is_multiple_of(self.page_size) {
            return bad(format!(
                "cluster size {} is not a multiple of the page size {}",
                self.cluster_size, self.page_size
            ));
        }
        if self.total_clusters == 0 || self.total_clusters > u32::MAX as u64 {
            return bad(format!("cluster count {}", self.total_clusters));
        }
        if self.md_len == 0 || self.md_len >= NO_PAGE as u64 {
            return bad(format!("metadata page count {}", self.md_len));
        }
        let pages_per_cluster = (self.cluster_size / self.page_size) as u64;
        let total_pages = self.total_clusters.checked_mul(pages_per_cluster);
        let masks_end = self
            .mask_start
            .checked_add(self.page_mask_len)
            .and_then(|v| v.checked_add(self.cluster_mask_len))
            .and_then(|v| v.checked_add(self.blobid_mask_len));
        let md_end = self.md_start.checked_add(self.md_len);
        match (total_pages, masks_end, md_end) {
            (Some(t), Some(m), Some(e))
                if self.mask_start >= Self::first_mask_page(self.version)
                    && m <= self.md_start
                    && e <= t =>
            {
                Ok(())
            }
            _ => bad("bitmap or metadata region outside the store".into()),
        }
    }
}

/// Which bitmap a mask region holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MaskKind {
    /// Used metadata pages.
    Pages = 1,
    /// Used clusters.
    Clusters = 2,
    /// Used blob ids (metadata pages that start a blob).
    BlobIds = 3,
}

/// Pages a mask region of `bits` bits takes.
pub fn mask_region_pages(bits: u64, page_size: u32) -> u64 {
    (MASK_HEADER_LEN as u64 + bits.div_ceil(8) + CRC_LEN as u64).div_ceil(page_size as u64)
}

/// Encodes a bitmap region (bit `i` is bit `i % 8` of byte `i / 8`).
pub fn encode_mask(kind: MaskKind, bits: &[bool], page_size: u32) -> Vec<u8> {
    let pages = mask_region_pages(bits.len() as u64, page_size);
    let mut b = vec![0u8; (pages * page_size as u64) as usize];
    b[..4].copy_from_slice(&MASK_MAGIC);
    b[4] = kind as u8;
    put_u64(&mut b, 8, bits.len() as u64);
    for (i, _) in bits.iter().enumerate().filter(|(_, &v)| v) {
        b[MASK_HEADER_LEN + i / 8] |= 1 << (i % 8);
    }
    seal_crc(&mut b);
    b
}

/// Decodes a bitmap region that must hold `kind` with exactly `bits` bits.
pub fn decode_mask(buf: &[u8], kind: MaskKind, bits: u64) -> Result<Vec<bool>> {
    let loc = format!("{kind:?} bitmap");
    if buf.len() < 4 || buf[..4] != MASK_MAGIC {
        return Err(Error::corrupt(&loc, "bad magic"));
    }
    check_crc(buf, &loc)?;
    let mut r = Reader::new(buf, &loc);
    r.bytes(4)?;
    let k = r.u8()?;
    if k != kind as u8 {
        return Err(Error::corrupt(&loc, format!("holds kind {k}")));
    }
    r.bytes(3)?;
    let n = r.u64()?;
    if n != bits {
        return Err(Error::corrupt(&loc, format!("{n} bits, expected {bits}")));
    }
    let body = r.bytes(bits.div_ceil(8) as usize)?;
    Ok((0..bits as usize)
        .map(|i| body[i / 8] & (1 << (i % 8)) != 0)
        .collect())
}

/// Kind of a metadata page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PageKind {
    /// First page of a blob; its index is the blob's id.
    First = 1,
    /// Continuation of a blob's descriptor stream.
    Continuation = 2,
    /// A run of the blob's cluster map.
    Extent = 3,
}

/// A decoded metadata page header plus its payload.
#[derive(Debug)]
pub struct MdPage<'a> {
    /// Kind of page.
    pub kind: PageKind,
    /// Blob the page belongs to.
    pub blob_id: u64,
    /// Metadata generation that wrote it.
    pub sequence: u32,
    /// Next continuation page, or [`NO_PAGE`].
    pub next: u32,
    /// Used payload bytes.
    pub payload: &'a [u8],
}

/// Payload bytes a metadata page of `page_size` holds.
pub fn md_payload_len(page_size: u32) -> usize {
    page_size as usize - MD_HEADER_LEN - CRC_LEN
}

/// Cluster entries one extent page holds.
pub fn extent_entries_per_page(page_size: u32) -> usize {
    (md_payload_len(page_size) - EXTENT_HEADER_LEN) / 4
}

/// Encodes one metadata page of `page_size` bytes.
pub fn encode_md_page(
    kind: PageKind,
    blob_id: u64,
    sequence: u32,
    next: u32,
    payload: &[u8],
    page_size: u32,
) -> Vec<u8> {
    let mut b = vec![0u8; page_size as usize];
    encode_md_page_into(&mut b, kind, blob_id, sequence, next, payload);
    b
}

/// [`encode_md_page`] into `b` (one page, whatever it held before), e.g. a
/// reused device buffer: every byte of it is written.
pub fn encode_md_page_into(
    b: &mut [u8],
    kind: PageKind,
    blob_id: u64,
    sequence: u32,
    next: u32,
    payload: &[u8],
) {
    debug_assert!(payload.len() <= md_payload_len(b.len() as u32));
    b[..MD_HEADER_LEN].fill(0);
    b[MD_HEADER_LEN + payload.len()..].fill(0);
    b[..4].copy_from_slice(&MD_MAGIC);
    put_u16(b, 4, 1);
    b[6] = kind as u8;
    put_u64(b, 8, blob_id);
    put_u32(b, 16, sequence);
    put_u32(b, 20, next);
    put_u32(b, 24, payload.len() as u32);
    b[MD_HEADER_LEN..MD_HEADER_LEN + payload.len()].copy_from_slice(payload);
    seal_crc(b);
}

/// True when `buf` starts like a metadata page (used by the dirty-load scan
/// to skip never-written pages quickly).
pub fn looks_like_md_page(buf: &[u8]) -> bool {
    buf.len() >= 4 && buf[..4] == MD_MAGIC
}

/// Decodes and checks a metadata page read from `location`.
pub fn decode_md_page<'a>(buf: &'a [u8], location: &str) -> Result<MdPage<'a>> {
    if !looks_like_md_page(buf) {
        return Err(Error::corrupt(location, "not a metadata page (bad magic)"));
    }
    check_crc(buf, location)?;
    let mut r = Reader::new(buf, location);
    r.bytes(4)?;
    let version = r.u16()?;
    if version != 1 {
        return Err(Error::corrupt(location, format!("page version {version}")));
    }
    let kind = match r.u8()? {
        1 => PageKind::First,
        2 => PageKind::Continuation,
        3 => PageKind::Extent,
        k => return Err(Error::corrupt(location, format!("unknown page kind {k}"))),
    };
    r.u8()?;
    let blob_id = r.u64()?;
    let sequence = r.u32()?;
    let next = r.u32()?;
    let used = r.u32()? as usize;
    r.u32()?;
    if used > buf.len().saturating_sub(MD_HEADER_LEN + CRC_LEN) {
        return Err(Error::corrupt(location, format!("payload length {used}")));
    }
    Ok(MdPage {
        kind,
        blob_id,
        sequence,
        next,
        payload: r.bytes(used)?,
    })
}

/// Encodes an extent page payload: entries for blob clusters starting at
/// `first_cluster` (0 = not allocated).
pub fn encode_extent_payload(first_cluster: u64, entries: &[u32]) -> Vec<u8> {
    let mut b = vec![0u8; EXTENT_HEADER_LEN + entries.len() * 4];
    put_u64(&mut b, 0, first_cluster);
    put_u32(&mut b, 8, entries.len() as u32);
    for (i, e) in entries.iter().enumerate() {
        put_u32(&mut b, EXTENT_HEADER_LEN + i * 4, *e);
    }
    b
}

/// Decodes an extent page payload into `(first_cluster, entries)`.
pub fn decode_extent_payload(payload: &[u8], location: &str) -> Result<(u64, Vec<u32>)> {
    let mut r = Reader::new(payload, location);
    let first = r.u64()?;
    let n = r.u32()? as usize;
    if n > r.remaining() / 4 {
        return Err(Error::corrupt(
            location,
            format!("{n} extent entries do not fit"),
        ));
    }
    let entries = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>>>()?;
    Ok((first, entries))
}

/// Descriptor tags. Numbers are never reused.
mod tag {
    pub const FLAGS: u8 = 1;
    pub const SIZE: u8 = 2;
    pub const EXTENT_TABLE: u8 = 3;
    pub const XATTR: u8 = 4;
    /// The blob reads unallocated clusters from this blob (a snapshot).
    pub const PARENT: u8 = 5;
    /// This snapshot of the named blob is being made (recovery marker).
    pub const SNAPSHOT_PENDING: u8 = 6;
    /// This snapshot is being deleted into its one clone (recovery marker).
    pub const REMOVAL_PENDING: u8 = 7;
    /// The cluster map itself, instead of an extent table (format 3).
    pub const CLUSTER_MAP: u8 = 8;
}

/// A multi-blob operation that was in progress when the record was written;
/// see FORMAT.md, "Recovery".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PendingOp {
    /// The blob is a snapshot of `origin` whose creation has not finished.
    Snapshot {
        /// The blob the snapshot was taken of.
        origin: u64,
    },
    /// The blob is a snapshot being deleted into its only clone.
    Removal,
}

/// Everything a blob's descriptor stream says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlobRecord {
    /// Flags a reader must understand to open the blob.
    pub invalid_flags: u64,
    /// Flags that make the data read-only.
    pub data_ro_flags: u64,
    /// Flags that make the metadata read-only.
    pub md_ro_flags: u64,
    /// Size in clusters.
    pub num_clusters: u64,
    /// Metadata page of each extent page, [`NO_PAGE`] where none is needed.
    /// Empty when the map is inline ([`BlobRecord::cluster_map`]).
    pub extent_table: Vec<u32>,
    /// The cluster map inline (format `INLINE_MAP_VERSION` on): the
    /// device cluster of each blob cluster, 0 where none is allocated.
    /// Empty when the map is in extent pages, or the blob has no clusters;
    /// never both this and [`BlobRecord::extent_table`].
    pub cluster_map: Vec<u32>,
    /// Extended attributes, in name order.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// The snapshot this blob reads its unallocated clusters from.
    pub parent: Option<u64>,
    /// A multi-blob operation in progress, if any.
    pub pending: Option<PendingOp>,
}

/// The scalar parts of a blob record, for [`encode_blob_payloads`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobHeader {
    /// Flags a reader must understand to open the blob.
    pub invalid_flags: u64,
    /// Flags that make the data read-only.
    pub data_ro_flags: u64,
    /// Flags that make the metadata read-only.
    pub md_ro_flags: u64,
    /// Size in clusters.
    pub num_clusters: u64,
    /// The snapshot this blob reads its unallocated clusters from.
    pub parent: Option<u64>,
    /// A multi-blob operation in progress, if any.
    pub pending: Option<PendingOp>,
}

/// Builds page payloads descriptor by descriptor, straight into the pages:
/// a descriptor that does not fit the current page starts the next one.
struct PayloadWriter {
    cap: usize,
    pages: Vec<Vec<u8>>,
}

impl PayloadWriter {
    /// Appends descriptor `tag` with a body of `len` bytes that `body`
    /// writes (exactly `len` of them).
    fn desc(&mut self, tag: u8, len: usize, body: impl FnOnce(&mut Vec<u8>)) {
        debug_assert!(len <= u16::MAX as usize && 3 + len <= self.cap);
        if self.pages.last().expect("one page").len() + 3 + len > self.cap {
            self.pages.push(Vec::with_capacity(self.cap));
        }
        let page = self.pages.last_mut().expect("one page");
        let start = page.len();
        page.push(tag);
        page.extend_from_slice(&(len as u16).to_le_bytes());
        body(page);
        debug_assert_eq!(page.len() - start, 3 + len, "descriptor {tag} length");
    }
}

/// Bytes of a descriptor with a body of `body` bytes.
const fn desc_len(body: usize) -> usize {
    3 + body
}

/// Entries of one EXTENT_TABLE or CLUSTER_MAP descriptor (after its u32
/// first index) that fit one page's payload of `cap` bytes.
fn entries_per_desc(cap: usize) -> usize {
    (cap - desc_len(4)) / 4
}

/// True when a blob's whole descriptor stream, with its map of `clusters`
/// clusters inline (tag CLUSTER_MAP), fits its first page: the blob then
/// takes one metadata page. Counts exactly what [`encode_blob_payloads`]
/// writes for it.
pub fn inline_map_fits<'a>(
    h: &BlobHeader,
    clusters: usize,
    xattrs: impl Iterator<Item = (&'a str, &'a [u8])>,
    page_size: u32,
) -> bool {
    let cap = md_payload_len(page_size);
    if clusters > entries_per_desc(cap) {
        return false;
    }
    let mut len = desc_len(24) + desc_len(8);
    if clusters > 0 {
        len += desc_len(4 + 4 * clusters);
    }
    for (name, value) in xattrs {
        len += desc_len(2 + name.len() + value.len());
        if len > cap {
            return false;
        }
    }
    if h.parent.is_some() {
        len += desc_len(8);
    }
    len += match h.pending {
        Some(PendingOp::Snapshot { .. }) => desc_len(8),
        Some(PendingOp::Removal) => desc_len(0),
        None => 0,
    };
    len <= cap
}

/// Encodes a blob record as page payloads (see [`BlobRecord::encode_payloads`])
/// from its parts, borrowed: the store's metadata sync encodes straight from
/// a blob's in-memory state instead of copying it into a [`BlobRecord`]
/// first. The cluster map goes either in extent pages, named by
/// `extent_table`, or inline as `cluster_map` (the store passes one of them
/// empty; a test that forges damage may pass both, which decode refuses).
/// `xattrs` come in name order.
pub fn encode_blob_payloads<'a>(
    h: &BlobHeader,
    extent_table: &[u32],
    cluster_map: &[u32],
    xattrs: impl Iterator<Item = (&'a str, &'a [u8])>,
    page_size: u32,
) -> Vec<Vec<u8>> {
    let cap = md_payload_len(page_size);
    let mut w = PayloadWriter {
        cap,
        pages: vec![Vec::with_capacity(cap)],
    };
    w.desc(tag::FLAGS, 24, |p| {
        for v in [h.invalid_flags, h.data_ro_flags, h.md_ro_flags] {
            p.extend_from_slice(&v.to_le_bytes());
        }
    });
    w.desc(tag::SIZE, 8, |p| {
        p.extend_from_slice(&h.num_clusters.to_le_bytes())
    });
    let per_desc = entries_per_desc(cap);
    for (t, entries) in [
        (tag::EXTENT_TABLE, extent_table),
        (tag::CLUSTER_MAP, cluster_map),
    ] {
        for (chunk_idx, chunk) in entries.chunks(per_desc).enumerate() {
            w.desc(t, 4 + chunk.len() * 4, |p| {
                p.extend_from_slice(&((chunk_idx * per_desc) as u32).to_le_bytes());
                for e in chunk {
                    p.extend_from_slice(&e.to_le_bytes());
                }
            });
        }
    }
    for (name, value) in xattrs {
        debug_assert!(name.len() <= MAX_XATTR_NAME_LEN && value.len() <= MAX_XATTR_VALUE_LEN);
        w.desc(tag::XATTR, 2 + name.len() + value.len(), |p| {
            p.extend_from_slice(&(name.len() as u16).to_le_bytes());
            p.extend_from_slice(name.as_bytes());
            p.extend_from_slice(value);
        });
    }
    if let Some(parent) = h.parent {
        w.desc(tag::PARENT, 8, |p| {
            p.extend_from_slice(&parent.to_le_bytes())
        });
    }
    match h.pending {
        Some(PendingOp::Snapshot { origin }) => w.desc(tag::SNAPSHOT_PENDING, 8, |p| {
            p.extend_from_slice(&origin.to_le_bytes())
        }),
        Some(PendingOp::Removal) => w.desc(tag::REMOVAL_PENDING, 0, |_| {}),
        None => {}
    }
    w.pages
}

impl BlobRecord {
    /// The record's scalar parts.
    pub fn header(&self) -> BlobHeader {
        BlobHeader {
            invalid_flags: self.invalid_flags,
            data_ro_flags: self.data_ro_flags,
            md_ro_flags: self.md_ro_flags,
            num_clusters: self.num_clusters,
            parent: self.parent,
            pending: self.pending,
        }
    }

    /// Encodes the record as page payloads: the first is the first page's,
    /// the rest go to continuation pages. Descriptors never straddle pages;
    /// a long extent table or cluster map is split into several descriptors.
    pub fn encode_payloads(&self, page_size: u32) -> Vec<Vec<u8>> {
        encode_blob_payloads(
            &self.header(),
            &self.extent_table,
            &self.cluster_map,
            self.xattrs.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
            page_size,
        )
    }

    /// Decodes the concatenated descriptor payloads of a blob's first and
    /// continuation pages.
    pub fn decode(payloads: &[&[u8]], location: &str) -> Result<BlobRecord> {
        let mut rec = BlobRecord::default();
        let (mut saw_flags, mut saw_size) = (false, false);
        for payload in payloads {
            let mut r = Reader::new(payload, location);
            while r.remaining() > 0 {
                let t = r.u8()?;
                let len = r.u16()? as usize;
                let body = r.bytes(len)?;
                let mut b = Reader::new(body, location);
                match t {
                    tag::FLAGS => {
                        rec.invalid_flags = b.u64()?;
                        rec.data_ro_flags = b.u64()?;
                        rec.md_ro_flags = b.u64()?;
                        saw_flags = true;
                    }
                    tag::SIZE => {
                        rec.num_clusters = b.u64()?;
                        saw_size = true;
                    }
                    tag::EXTENT_TABLE | tag::CLUSTER_MAP => {
                        let (entries, what) = if t == tag::EXTENT_TABLE {
                            (&mut rec.extent_table, "extent table")
                        } else {
                            (&mut rec.cluster_map, "cluster map")
                        };
                        let start = b.u32()? as usize;
                        if start != entries.len() || !b.remaining().is_multiple_of(4) {
                            return Err(Error::corrupt(location, format!("{what} out of order")));
                        }
                        entries.reserve(b.remaining() / 4);
                        while b.remaining() > 0 {
                            entries.push(b.u32()?);
                        }
                    }
                    tag::XATTR => {
                        let nlen = b.u16()? as usize;
                        let name = std::str::from_utf8(b.bytes(nlen)?)
                            .map_err(|_| Error::corrupt(location, "xattr name is not UTF-8"))?;
                        let value = b.bytes(b.remaining())?;
                        rec.xattrs.push((name.to_string(), value.to_vec()));
                    }
                    tag::PARENT => {
                        if rec.parent.is_some() {
                            return Err(Error::corrupt(location, "two parent descriptors"));
                        }
                        rec.parent = Some(b.u64()?);
                    }
                    tag::SNAPSHOT_PENDING | tag::REMOVAL_PENDING => {
                        if rec.pending.is_some() {
                            return Err(Error::corrupt(location, "two pending descriptors"));
                        }
                        rec.pending = Some(if t == tag::REMOVAL_PENDING {
                            PendingOp::Removal
                        } else {
                            PendingOp::Snapshot { origin: b.u64()? }
                        });
                    }
                    other => {
                        return Err(Error::corrupt(
                            location,
                            format!("unknown descriptor tag {other}"),
                        ))
                    }
                }
            }
        }
        if !saw_flags || !saw_size {
            return Err(Error::corrupt(location, "flags or size descriptor missing"));
        }
        if !rec.extent_table.is_empty() && !rec.cluster_map.is_empty() {
            return Err(Error::corrupt(
                location,
                "both an extent table and an inline cluster map",
            ));
        }
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_encodes_the_same_over_stale_bytes() {
        let payload = [7u8; 100];
        let fresh = encode_md_page(PageKind::First, 3, 9, 17, &payload, 4096);
        for stale in [0x00u8, 0xab, 0xff] {
            let mut b = vec![stale; 4096];
            encode_md_page_into(&mut b, PageKind::First, 3, 9, 17, &payload);
            assert_eq!(b, fresh, "over {stale:#x}");
        }
    }

    fn sb() -> SuperBlock {
        SuperBlock {
            version: FORMAT_VERSION,
            clean: true,
            page_size: 4096,
            cluster_size: 1 << 20,
            io_unit_size: 512,
            total_clusters: 64,
            mask_start: 2,
            page_mask_len: 1,
            cluster_mask_len: 1,
            blobid_mask_len: 1,
            md_start: 5,
            md_len: 64,
            super_blob: 0,
            bstype: *b"test\0\0\0\0\0\0\0\0\0\0\0\0",
        }
    }

    #[test]
    fn super_block_round_trips() {
        let s = sb();
        assert_eq!(SuperBlock::decode(&s.encode()).unwrap(), s);
    }

    /// Version 1 (no backup, bitmaps from page 1) still decodes and
    /// encodes as version 1; version 2 keeps page 1 for the backup, and so
    /// does version 3, which adds inline cluster maps; no other version is
    /// read.
    #[test]
    fn super_block_versions() {
        let v1 = SuperBlock {
            version: 1,
            mask_start: 1,
            ..sb()
        };
        assert_eq!(SuperBlock::decode(&v1.encode()).unwrap(), v1);
        assert!(!v1.has_backup() && sb().has_backup());
        let v2 = SuperBlock { version: 2, ..sb() };
        assert_eq!(SuperBlock::decode(&v2.encode()).unwrap(), v2);
        assert!(v2.has_backup() && !v2.has_inline_map());
        assert!(!v1.has_inline_map() && sb().has_inline_map());
        for version in [2, 3] {
            let on_page_1 = SuperBlock {
                version,
                mask_start: 1,
                ..sb()
            };
            assert!(SuperBlock::decode(&on_page_1.encode()).is_err());
        }
        let v4 = SuperBlock { version: 4, ..sb() };
        assert!(SuperBlock::decode(&v4.encode()).is_err());
        let v0 = SuperBlock { version: 0, ..sb() };
        assert!(SuperBlock::decode(&v0.encode()).is_err());
    }

    #[test]
    fn backup_is_taken_only_from_its_own_place() {
        let enc = sb().encode();
        assert_eq!(SuperBlock::decode_backup(&enc, 4096).unwrap(), sb());
        assert!(SuperBlock::decode_backup(&enc, 8192).is_err());
        let v1 = SuperBlock {
            version: 1,
            mask_start: 1,
            ..sb()
        };
        assert!(SuperBlock::decode_backup(&v1.encode(), 4096).is_err());
        assert!(matches!(
            SuperBlock::decode_backup(&[0u8; 4096], 4096),
            Err(Error::Corrupt { .. })
        ));
        let places: Vec<(u32, u64)> = backup_super_candidates().collect();
        assert_eq!(
            places,
            vec![
                (4096, 4096),
                (8192, 8192),
                (16384, 16384),
                (32768, 32768),
                (65536, 65536)
            ]
        );
    }

    #[test]
    fn super_block_rejects_damage() {
        let good = sb().encode();
        assert!(matches!(
            SuperBlock::decode(&vec![0u8; 4096]),
            Err(Error::NotABlobstore(_))
        ));
        for i in (8..4096).step_by(97) {
            let mut b = good.clone();
            b[i] ^= 0x40;
            assert!(
                matches!(SuperBlock::decode(&b), Err(Error::Corrupt { .. })),
                "byte {i}"
            );
        }
        assert!(SuperBlock::decode(&good[..100]).is_err());
    }

    #[test]
    fn mask_round_trips_and_checks_kind() {
        let bits: Vec<bool> = (0..1000).map(|i| i % 3 == 0).collect();
        let enc = encode_mask(MaskKind::Clusters, &bits, 4096);
        assert_eq!(decode_mask(&enc, MaskKind::Clusters, 1000).unwrap(), bits);
        assert!(decode_mask(&enc, MaskKind::Pages, 1000).is_err());
        assert!(decode_mask(&enc, MaskKind::Clusters, 999).is_err());
    }

    /// The bytes of a record's payloads are the format: a blob with xattrs,
    /// a long extent table, a parent and a pending operation encodes to
    /// exactly these pages (a checksum of them, taken when the encoder
    /// wrote each descriptor into its own buffer first).
    #[test]
    fn record_payload_bytes_do_not_change() {
        let rec = BlobRecord {
            invalid_flags: BLOB_INVALID_THIN,
            data_ro_flags: 3,
            md_ro_flags: 0,
            num_clusters: 123_456,
            extent_table: (0..3000).map(|i| i * 7 + 1).collect(),
            cluster_map: vec![],
            xattrs: (0..40)
                .map(|i| (format!("x{i:03}"), vec![i as u8; i * 37 % 700]))
                .collect(),
            parent: Some(0x1_0000_0003),
            pending: Some(PendingOp::Removal),
        };
        let payloads = rec.encode_payloads(4096);
        let lens: Vec<usize> = payloads.iter().map(Vec::len).collect();
        let crc = payloads.iter().fold(0, |c, p| crc32c::crc32c_append(c, p));
        assert_eq!(
            (lens, crc),
            (
                vec![38, 4059, 4059, 4041, 3882, 3918, 3796, 1400],
                0x446f_a9a3
            )
        );
    }

    #[test]
    fn record_round_trips_across_pages() {
        let rec = BlobRecord {
            invalid_flags: BLOB_INVALID_THIN,
            data_ro_flags: 0,
            md_ro_flags: 0,
            num_clusters: 5_000_000,
            extent_table: (0..5000).collect(),
            cluster_map: vec![],
            xattrs: vec![("name".into(), vec![7; 3000]), ("b".into(), vec![])],
            parent: Some(0x1_0000_0007),
            pending: Some(PendingOp::Snapshot {
                origin: 0x1_0000_0009,
            }),
        };
        let payloads = rec.encode_payloads(4096);
        assert!(payloads.len() > 3);
        let pages: Vec<Vec<u8>> = payloads
            .iter()
            .map(|p| encode_md_page(PageKind::Continuation, 9, 1, NO_PAGE, p, 4096))
            .collect();
        let decoded: Vec<MdPage> = pages
            .iter()
            .map(|p| decode_md_page(p, "test").unwrap())
            .collect();
        let slices: Vec<&[u8]> = decoded.iter().map(|p| p.payload).collect();
        assert_eq!(BlobRecord::decode(&slices, "test").unwrap(), rec);
    }

    /// A small blob's inline cluster map: these exact bytes (tag 8, first
    /// index, one u32 per cluster, where the extent table would be), one
    /// page, and the same record back.
    #[test]
    fn inline_cluster_map_bytes_and_round_trip() {
        let rec = BlobRecord {
            num_clusters: 3,
            cluster_map: vec![17, 0, 0x0102_0304],
            xattrs: vec![("fs.name".into(), b"db/000001.sst".to_vec())],
            ..Default::default()
        };
        let payloads = rec.encode_payloads(4096);
        assert_eq!(payloads.len(), 1);
        let mut want = vec![1, 24, 0];
        want.extend([0u8; 24]);
        want.extend([2, 8, 0, 3, 0, 0, 0, 0, 0, 0, 0]);
        want.extend([8, 16, 0, 0, 0, 0, 0, 17, 0, 0, 0, 0, 0, 0, 0, 4, 3, 2, 1]);
        want.extend([4, 22, 0, 7, 0]);
        want.extend(b"fs.namedb/000001.sst");
        assert_eq!(payloads[0], want);
        assert_eq!(BlobRecord::decode(&[&payloads[0]], "t").unwrap(), rec);
        // A long map spans descriptors, in order, and comes back whole.
        let long = BlobRecord {
            num_clusters: 5000,
            cluster_map: (0..5000).map(|i| i * 3).collect(),
            ..Default::default()
        };
        let payloads = long.encode_payloads(4096);
        assert!(payloads.len() > 4);
        let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        assert_eq!(BlobRecord::decode(&slices, "t").unwrap(), long);
    }

    /// Both an extent table and an inline map, or map pieces out of order:
    /// corruption, never a guess.
    #[test]
    fn inline_cluster_map_refusals() {
        let both = BlobRecord {
            num_clusters: 1,
            extent_table: vec![5],
            cluster_map: vec![9],
            ..Default::default()
        };
        let payloads = both.encode_payloads(4096);
        let err = BlobRecord::decode(&[&payloads[0]], "t").unwrap_err();
        assert!(err.to_string().contains("both"), "{err}");
        let mut p = BlobRecord {
            num_clusters: 1,
            cluster_map: vec![9],
            ..Default::default()
        }
        .encode_payloads(4096)
        .remove(0);
        // The map descriptor's first index (after FLAGS and SIZE) says 1.
        let at = desc_len(24) + desc_len(8) + 3;
        p[at] = 1;
        let err = BlobRecord::decode(&[&p], "t").unwrap_err();
        assert!(
            err.to_string().contains("cluster map out of order"),
            "{err}"
        );
    }

    /// `inline_map_fits` says yes exactly when the inline encoding is one
    /// page, over map sizes, xattr sizes, parents, markers and page sizes.
    #[test]
    fn inline_map_fits_matches_the_encoding() {
        for page_size in [4096u32, 16384] {
            let cap = md_payload_len(page_size);
            for clusters in [0usize, 1, 2, 100, 900, 1000, 1012, 1013, 4000, 16380] {
                for value_len in [0usize, 100, 300, 1500, 3584] {
                    for (parent, pending) in [
                        (None, None),
                        (Some(9), Some(PendingOp::Removal)),
                        (Some(9), Some(PendingOp::Snapshot { origin: 3 })),
                    ] {
                        let rec = BlobRecord {
                            num_clusters: clusters as u64,
                            cluster_map: vec![7; clusters],
                            xattrs: vec![
                                ("fs.name".into(), vec![b'n'; value_len]),
                                ("fs.len".into(), vec![0; 8]),
                            ],
                            parent,
                            pending,
                            ..Default::default()
                        };
                        let xattrs = rec.xattrs.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
                        let fits = inline_map_fits(&rec.header(), clusters, xattrs, page_size);
                        let one = rec.encode_payloads(page_size).len() == 1;
                        assert_eq!(
                            fits, one,
                            "page {page_size} cap {cap} clusters {clusters} value {value_len}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn extent_payload_round_trips() {
        let e: Vec<u32> = (0..extent_entries_per_page(4096) as u32).collect();
        let p = encode_extent_payload(1012, &e);
        assert!(p.len() <= md_payload_len(4096));
        assert_eq!(decode_extent_payload(&p, "t").unwrap(), (1012, e));
        assert!(decode_extent_payload(&p[..5], "t").is_err());
    }

    #[test]
    fn garbage_never_panics() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..2000 {
            let n = rng.gen_range(0..5000);
            let mut b: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
            if n >= 4 && rng.gen_bool(0.5) {
                b[..4].copy_from_slice(&MD_MAGIC);
            }
            let _ = decode_md_page(&b, "fuzz");
            let _ = SuperBlock::decode(&b);
            let _ = decode_mask(&b, MaskKind::Pages, rng.gen_range(0..100));
            let _ = decode_extent_payload(&b, "fuzz");
            let _ = BlobRecord::decode(&[&b], "fuzz");
        }
    }
}
