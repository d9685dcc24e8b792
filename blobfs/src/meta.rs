//! How BlobFS keeps its metadata in blob xattrs: the one place that knows
//! those bytes (drawn in this crate's `FORMAT.md`, with the unsynced
//! memory of `unsynced/`).
//!
//! Every file and directory is one blob with these xattrs:
//! - `fs.name`: the normalized full name, UTF-8.
//! - `fs.kind`: one byte, 1 = file, 2 = directory.
//! - `fs.len`: file length in bytes, u64 little-endian (files only).
//! - `fs.seq`: u64 little-endian; each create and rename takes the next
//!   number (a directory rename numbers the directory; the entries below
//!   it keep theirs), so when a crash leaves two blobs claiming one name (a rename
//!   over an existing file that did not get to delete the old one), the
//!   higher number wins and the other is deleted at mount.
//! - `fs.mtime`: modification time, u64 little-endian nanoseconds since the
//!   Unix epoch.
//! - `fs.unlinked`: present (one byte) on a file deleted while open; such a
//!   blob is deleted at the next mount.
//! - `fs.tail` (files, optional): 12 bytes, the length before the last sync
//!   (`prev_len`, u64 little-endian) and the CRC-32C of the file's bytes
//!   `[prev_len, fs.len)` (u32 little-endian). A small sync that grows a
//!   file commits its data and its metadata with one device flush, so a
//!   power cut can leave the metadata durable without the data; mount
//!   checks those bytes and, when they do not match, rolls the length back
//!   to `prev_len` (durable since the sync before). Syncs that do not write
//!   it remove it. A mount after a clean unmount (`blobfs.clean` below)
//!   checks none: that unmount flushed every file's bytes.
//! - `fs.moved_from` (directories, optional): the intent of a directory
//!   rename in progress, on the renamed directory's own blob: the rename's
//!   sequence number (u64 little-endian, the `fs.seq` the rename gave the
//!   directory) followed by the directory's old full name (UTF-8). It is
//!   synced together with the directory's new `fs.name` and `fs.seq` (one
//!   blob, one atomic metadata write: the commit point of the rename);
//!   then each entry below the directory gets its new `fs.name` (its
//!   `fs.seq` unchanged); then the marker is removed. A mount that finds
//!   it finishes the rename first: every blob whose name is below the old
//!   name and whose `fs.seq` is lower than the marker's (so it existed
//!   before the rename; anything named there later has a higher number)
//!   is renamed below the directory's name, synced, and only then is the
//!   marker removed. So a crash at any point leaves the whole tree under
//!   one name: the old one when the commit did not land, else the new.
//!
//! The super blob carries `blobfs.version` (u32 little-endian, now 1),
//! `blobfs.id` (16 random bytes chosen at mkfs, or at the first mount of an
//! older BlobFS: the file system's identity in its unsynced memory) and
//! `blobfs.mountgen` (u64 little-endian, one more at every mount: unsynced
//! memory written by any other mount than the last is stale) and, once a
//! mount has been unmounted cleanly, `blobfs.clean` (u64 little-endian, the
//! generation of that mount: written after every file was synced and
//! nothing could write any more, so when it equals `blobfs.mountgen` no
//! mount has run since and every file's bytes are on the device; a build
//! that does not know it never writes it, and a mount always moves
//! `blobfs.mountgen` on, so a stale value never matches).

use crate::error::{Error, Result};

/// Xattr: full name.
pub const NAME: &str = "fs.name";
/// Xattr: kind byte.
pub const KIND: &str = "fs.kind";
/// Xattr: length.
pub const LEN: &str = "fs.len";
/// Xattr: create/rename sequence number.
pub const SEQ: &str = "fs.seq";
/// Xattr: modification time.
pub const MTIME: &str = "fs.mtime";
/// Xattr: the last sync's new bytes, for mount to check (see above).
pub const TAIL: &str = "fs.tail";
/// Largest sync (bytes added since the last one) committed with one flush
/// and a [`TAIL`] check: mount reads this much per file at most.
pub const TAIL_MAX: u64 = 64 << 10;
/// Xattr: deleted while open.
pub const UNLINKED: &str = "fs.unlinked";
/// Xattr: a directory rename in progress (see above).
pub const MOVED_FROM: &str = "fs.moved_from";
/// Super blob xattr: format version.
pub const VERSION: &str = "blobfs.version";
/// Super blob xattr: the file system's id (16 bytes).
pub const FS_ID: &str = "blobfs.id";
/// Super blob xattr: the mount generation.
pub const MOUNT_GEN: &str = "blobfs.mountgen";
/// Super blob xattr: the generation of the last mount unmounted cleanly.
pub const CLEAN: &str = "blobfs.clean";
/// The format version written by this code.
pub const FORMAT_VERSION: u32 = 1;
/// Blobstore type tag of a BlobFS.
pub const BSTYPE: &str = "BLOBFS";

/// Kind byte of a file.
pub const KIND_FILE: u8 = 1;
/// Kind byte of a directory.
pub const KIND_DIR: u8 = 2;

/// Encodes a u64 xattr value.
pub fn enc_u64(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

/// Decodes a u64 xattr value of blob `what`.
pub fn dec_u64(v: Option<Vec<u8>>, key: &str, what: &str) -> Result<u64> {
    let v = v.ok_or_else(|| Error::Corrupt(format!("{what}: xattr {key} missing")))?;
    let b: [u8; 8] = v
        .as_slice()
        .try_into()
        .map_err(|_| Error::Corrupt(format!("{what}: xattr {key} is {} bytes, not 8", v.len())))?;
    Ok(u64::from_le_bytes(b))
}

/// Encodes a [`TAIL`] value.
pub fn enc_tail(prev_len: u64, crc: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&prev_len.to_le_bytes());
    b[8..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a [`TAIL`] value of blob `what`: `(prev_len, crc)`.
pub fn dec_tail(v: &[u8], what: &str) -> Result<(u64, u32)> {
    let b: &[u8; 12] = v.try_into().map_err(|_| {
        Error::Corrupt(format!("{what}: xattr {TAIL} is {} bytes, not 12", v.len()))
    })?;
    let (prev, crc) = b.split_at(8);
    Ok((
        u64::from_le_bytes(prev.try_into().expect("8 bytes")),
        u32::from_le_bytes(crc.try_into().expect("4 bytes")),
    ))
}

/// Encodes a [`MOVED_FROM`] value: the rename's sequence number, then the
/// directory's old name.
pub fn enc_moved_from(seq: u64, old: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + old.len());
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(old.as_bytes());
    v
}

/// Decodes a [`MOVED_FROM`] value of blob `what`: `(seq, old name)`. The
/// old name must be a valid, normalized entry name.
pub fn dec_moved_from(v: &[u8], what: &str) -> Result<(u64, String)> {
    let bad = |why: &str| Error::Corrupt(format!("{what}: xattr {MOVED_FROM} {why}"));
    if v.len() <= 8 {
        return Err(bad(&format!("is {} bytes, too short", v.len())));
    }
    let (seq, old) = v.split_at(8);
    let seq = u64::from_le_bytes(seq.try_into().map_err(|_| bad("has no sequence number"))?);
    let old = std::str::from_utf8(old).map_err(|_| bad("names no UTF-8 name"))?;
    if crate::name::normalize_entry(old).ok().as_deref() != Some(old) {
        return Err(bad(&format!("names an invalid name {old:?}")));
    }
    Ok((seq, old.to_string()))
}

/// `YYYY-MM-DD HH:MM:SS UTC` for a time in nanoseconds since the Unix
/// epoch (mtimes in listings, report stamps).
pub fn utc(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Now, in nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
