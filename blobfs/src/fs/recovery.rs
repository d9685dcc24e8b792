//! What a mount finds on each blob and repairs after an unclean stop: a
//! blob's xattrs read and checked ([`found_entry`]), the last one-flush
//! sync's new bytes checked against the device ([`check_tail`]), what a
//! dead process left in unsynced memory written back ([`write_back`]), and
//! the directory renames a crash interrupted rolled forward
//! ([`roll_forward`], which fsck runs too).
//!
//! Invariants:
//! - Every repair here is durable before it returns: data before the
//!   length that covers it, each with its own metadata sync.
//! - Nothing here touches the name index: the mount (`mount.rs`) builds
//!   the index from what these return.
//! - [`roll_forward`] and [`found_entry`] do no I/O, so fsck can tell what a
//!   mount would do without doing it.

use blobstore::{Blob, BlobId, DmaBuf};

use crate::error::{Context, Error, Result};
use crate::meta;
use crate::name;
use crate::unsynced::{self, Record, Unsynced, UnsyncedRecovery};

/// Checks the bytes a file's last one-flush sync added (its `fs.tail`):
/// returns the length to use, `len` when they are on the blob, else the
/// length before that sync, which it then makes the file's durable length.
pub(super) async fn check_tail(blob: &Blob, len: u64, tail: &[u8], what: &str) -> Result<u64> {
    let (prev, crc) = meta::dec_tail(tail, what)?;
    if prev > len || len - prev > meta::TAIL_MAX {
        return Err(Error::Corrupt(format!(
            "{what}: {} covers bytes {prev}..{len}",
            meta::TAIL
        )));
    }
    let unit = blob.io_unit_size() as u64;
    let (a, b) = (prev / unit * unit, len.div_ceil(unit) * unit);
    let ok = b == a || {
        let buf = DmaBuf::new((b - a) as usize).ctx(what)?;
        let buf = blob.read(a / unit, buf).await.ctx(what)?;
        crc32c::crc32c(&buf[(prev - a) as usize..(len - a) as usize]) == crc
    };
    if ok {
        return Ok(len);
    }
    // A power cut kept the length of a sync whose data did not land.
    blob.set_xattr(meta::LEN, &meta::enc_u64(prev)).ctx(what)?;
    blob.remove_xattr(meta::TAIL).ctx(what)?;
    blob.sync_metadata().await.ctx(what)?;
    Ok(prev)
}

/// Writes back what a dead process left in unsynced memory for one file
/// (`recs`, all of the last mount): each buffer's bytes (a file's buffers
/// never hold different bytes for one offset, so their order does not
/// matter), then the length, synced (ordered: data before length).
/// Returns the file's length. Buffers that do not fit what the device holds
/// are not applied, and said so in `report`.
pub(super) async fn write_back(
    blob: &Blob,
    len: u64,
    mut recs: Vec<Record>,
    region: &Unsynced,
    cluster: u64,
    what: &str,
    report: &mut UnsyncedRecovery,
) -> Result<u64> {
    recs.sort_by_key(|r| r.header.file_off);
    let unit = blob.io_unit_size() as u64;
    let new_len = recs.iter().map(|r| r.header.file_len).max().unwrap_or(len);
    let first = recs.iter().map(|r| r.header.file_off).min().unwrap_or(len);
    let odd = recs.iter().find(|r| {
        let h = &r.header;
        !h.file_off.is_multiple_of(unit)
            || h.used > unsynced::SLOT_DATA as u64
            || h.file_off + h.used > h.file_len
    });
    let refuse = if let Some(r) = odd {
        Some(format!(
            "buffer at file byte {} with {} bytes for a length of {} is not an append buffer",
            r.header.file_off, r.header.used, r.header.file_len
        ))
    } else if new_len < len {
        Some(format!(
            "it says the length is {new_len}, below the synced length {len}"
        ))
    } else if first > len && first > blob.size_bytes() {
        Some(format!(
            "bytes {}..{first} are neither in it nor on the device",
            blob.size_bytes()
        ))
    } else {
        None
    };
    if let Some(why) = refuse {
        report
            .ignored
            .push(format!("{} buffer(s) of {what}: {why}", recs.len()));
        return Ok(len);
    }
    if blob.size_bytes() < new_len {
        blob.resize_uninit(new_len.div_ceil(cluster))
            .await
            .ctx(what)?;
    }
    for r in &recs {
        let used = r.header.used as usize;
        if used == 0 {
            continue;
        }
        let padded = (used as u64).div_ceil(unit) * unit;
        let mut buf = DmaBuf::new(padded as usize).ctx(what)?;
        if padded > used as u64 {
            // The last block keeps what the blob has past these bytes.
            let last = r.header.file_off + padded - unit;
            let blk = DmaBuf::new(unit as usize).ctx(what)?;
            let blk = blob.read(last / unit, blk).await.ctx(what)?;
            buf[(padded - unit) as usize..].copy_from_slice(&blk);
        }
        region.read_data(r, &mut buf[..used])?;
        blob.write(r.header.file_off / unit, buf).await.ctx(what)?;
        report.buffers += 1;
        report.bytes += used as u64;
    }
    blob.set_xattr(meta::LEN, &meta::enc_u64(new_len))
        .ctx(what)?;
    if blob.get_xattr(meta::TAIL).is_some() {
        blob.remove_xattr(meta::TAIL).ctx(what)?;
    }
    blob.sync_metadata().await.ctx(what)?;
    report.files += 1;
    Ok(new_len)
}

/// A directory rename a crash interrupted: the `fs.moved_from` marker on
/// directory blob `dir` (see [`meta`]).
pub(crate) struct Moved {
    /// The directory's blob.
    pub dir: BlobId,
    /// The rename's sequence number.
    pub seq: u64,
    /// The directory's old name.
    pub old: String,
}

impl Moved {
    /// The marker `v` found on blob `id` of kind `kind` (`what` names it in
    /// errors): only a directory carries one.
    pub fn decode(id: BlobId, kind: u8, v: &[u8], what: &str) -> Result<Moved> {
        if kind != meta::KIND_DIR {
            return Err(Error::Corrupt(format!(
                "{what}: a file with the directory rename marker {}",
                meta::MOVED_FROM
            )));
        }
        let (seq, old) = meta::dec_moved_from(v, what)?;
        Ok(Moved { dir: id, seq, old })
    }
}

/// Finishes, in `names` (each blob's id, `fs.seq` and name), the directory
/// renames that `marks` say were interrupted: every name below a mark's
/// old name with a lower `fs.seq` than the mark's (a name given before
/// that rename) moves below the directory's name. Oldest mark first (it
/// sorts `marks`). Returns, for each mark in that order, the indices of
/// the names it changed. Names that would break the naming rules are
/// [`Error::Corrupt`]: no rename makes them.
pub(crate) fn roll_forward(
    marks: &mut [Moved],
    names: &mut [(BlobId, u64, &mut String)],
) -> Result<Vec<Vec<usize>>> {
    marks.sort_by_key(|m| m.seq);
    let mut out = Vec::with_capacity(marks.len());
    for m in marks.iter() {
        let Some(to) = names
            .iter()
            .find(|(id, ..)| *id == m.dir)
            .map(|(_, _, n)| n.to_string())
        else {
            out.push(Vec::new());
            continue;
        };
        if name::is_within(&to, &m.old) {
            return Err(Error::Corrupt(format!(
                "blob {}: directory {to} was moved from {:?}, which holds it",
                m.dir, m.old
            )));
        }
        let mut changed = Vec::new();
        for (i, (id, seq, n)) in names.iter_mut().enumerate() {
            if *id == m.dir || *seq >= m.seq || n.as_str() == m.old {
                continue;
            }
            if let Some(new) = name::rebase(n, &m.old, &to) {
                if new.len() > name::MAX_NAME_LEN {
                    return Err(Error::Corrupt(format!(
                        "blob {id}: {n} would become {new}, longer than {} bytes",
                        name::MAX_NAME_LEN
                    )));
                }
                **n = new;
                changed.push(i);
            }
        }
        out.push(changed);
    }
    Ok(out)
}

/// A blob's file or directory as its xattrs describe it.
pub(super) struct Found {
    pub(super) id: BlobId,
    pub(super) blob: blobstore::Blob,
    pub(super) name: String,
    pub(super) kind: u8,
    pub(super) seq: u64,
    pub(super) len: u64,
    pub(super) mtime: u64,
}

/// What blob `id`'s xattrs say about its file or directory, checked (the
/// length against the blob's size). Errors name the blob, and its name
/// once that is known.
pub(super) fn found_entry(id: BlobId, blob: blobstore::Blob) -> Result<Found> {
    let corrupt = |name: &str, why: String| {
        let at = if name.is_empty() {
            format!("blob {id}")
        } else {
            format!("blob {id} ({name})")
        };
        Error::Corrupt(format!("{at}: {why}"))
    };
    let (name, kind, seq, mtime, len) = {
        let md = blob.xattrs();
        let name = md
            .get(meta::NAME)
            .and_then(|n| std::str::from_utf8(n).ok())
            .ok_or_else(|| corrupt("", "no valid name".into()))?
            .to_string();
        let kind = match md.get(meta::KIND) {
            Some([k]) if *k == meta::KIND_FILE || *k == meta::KIND_DIR => *k,
            _ => return Err(corrupt(&name, "bad kind".into())),
        };
        let u64_of = |key: &str| -> Result<u64> {
            let v = md
                .get(key)
                .ok_or_else(|| corrupt(&name, format!("xattr {key} missing")))?;
            let b: [u8; 8] = v
                .try_into()
                .map_err(|_| corrupt(&name, format!("xattr {key} is {} bytes, not 8", v.len())))?;
            Ok(u64::from_le_bytes(b))
        };
        let seq = u64_of(meta::SEQ)?;
        let mtime = u64_of(meta::MTIME)?;
        let len = if kind == meta::KIND_FILE {
            u64_of(meta::LEN)?
        } else {
            0
        };
        (name, kind, seq, mtime, len)
    };
    if len > blob.size_bytes() {
        return Err(corrupt(
            &name,
            format!("length {len} exceeds its {} bytes", blob.size_bytes()),
        ));
    }
    Ok(Found {
        id,
        blob,
        name,
        kind,
        seq,
        len,
        mtime,
    })
}
