//! fsck: checks a BlobFS on a device without mounting it.
//!
//! Mounting repairs what a crash leaves behind (it deletes blobs of files
//! deleted while open, the losers of an interrupted rename, finishes an
//! interrupted directory rename, and recreates missing parent directories), so a check that mounted first would see
//! nothing. This module loads only the blobstore and reads every blob's
//! metadata itself.
//!
//! What it checks, each finding naming the blob:
//! - the super blob exists and carries the BlobFS format version;
//! - every other blob has valid fs xattrs: a normalized UTF-8 `fs.name`, a
//!   `fs.kind` of file or directory, 8-byte `fs.seq` and `fs.mtime`, and for
//!   files an 8-byte `fs.len` no larger than the blob;
//! - bytes past a file's length in its last block are zero (so growing it
//!   can never show stale bytes);
//! - a directory rename marker (`fs.moved_from`) on a directory is the
//!   trace of an interrupted directory rename (a warning naming the old
//!   and new names and how many entries still carry the old one; the next
//!   mount finishes the rename): the checks below see the names as that
//!   mount will. A marker on a file, or one that does not decode, is
//!   damage;
//! - names are unique: several blobs with one name are the trace of an
//!   interrupted rename (a warning; the next mount keeps the highest
//!   `fs.seq`), unless the highest `fs.seq` is shared, which no crash can
//!   produce (damage);
//! - every name's parent is an existing directory;
//! - unsynced memory a process that died with the device left (a warning
//!   per buffer): what the next mount writes back, or ignores as stale;
//! - blobstore level: thick blobs have all their clusters, and the clusters
//!   the blobs hold plus the free ones add up to the store's data clusters,
//!   and `Blobstore::check` (clusters and pages owned once, bitmaps agree).
//!
//! Loading and unloading the blobstore writes its super block (and, after
//! an unclean shutdown, the allocation masks rebuilt from blob metadata);
//! nothing else is written.

use std::collections::HashMap;
use std::sync::Arc;

use blobstore::{block_on, BlobId, Blobstore, BlockDevice, DmaBuf, LoadOptions};

use crate::error::{Context, Error, Result};
use crate::meta;
use crate::name;

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// A state a crash can leave, which the next mount resolves.
    Warning,
    /// Damage: a state correct operation never produces.
    Damage,
}

/// One problem found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Warning or damage.
    pub severity: Severity,
    /// The blob concerned, if one.
    pub blob: Option<BlobId>,
    /// What is wrong, in words.
    pub what: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sev = match self.severity {
            Severity::Warning => "warning",
            Severity::Damage => "damage",
        };
        match self.blob {
            Some(id) => write!(f, "{sev}: blob {id}: {}", self.what),
            None => write!(f, "{sev}: {}", self.what),
        }
    }
}

/// The result of a check.
#[derive(Clone, Debug, Default)]
pub struct FsckReport {
    /// Everything found, warnings and damage.
    pub findings: Vec<Finding>,
    /// Blobs in the store, the super blob included.
    pub blobs: u64,
    /// Files (by name, after resolving duplicate names).
    pub files: u64,
    /// Directories (the root not counted).
    pub dirs: u64,
    /// Sum of the files' lengths.
    pub file_bytes: u64,
    /// Buffers of unsynced file data a dead process left, which the next
    /// mount writes back (each is also a warning finding).
    pub unsynced_buffers: u64,
    /// Their bytes.
    pub unsynced_bytes: u64,
    /// Directory renames a crash interrupted, which the next mount
    /// finishes (each is also a warning finding).
    pub interrupted_renames: u64,
    /// `fsck --repair` only: what the repair did, in words (the findings
    /// are then those of the check after it).
    pub repairs: Vec<String>,
    /// `fsck --repair` only: files and directories whose BlobFS metadata
    /// could not be read, moved to `lost+found/<blob id>` with their data,
    /// each as "old name or blob id -> new name (bytes)".
    pub moved_to_lost_found: Vec<String>,
    /// `fsck --repair` only: blobs whose blobstore metadata could not be
    /// read, dropped with their data (named by `fs.name` where that still
    /// read, else by blob id).
    pub lost: Vec<String>,
}

impl FsckReport {
    /// True when nothing is damaged (warnings allowed).
    pub fn is_clean(&self) -> bool {
        self.findings.iter().all(|f| f.severity != Severity::Damage)
    }

    fn add(&mut self, severity: Severity, blob: Option<BlobId>, what: impl Into<String>) {
        self.findings.push(Finding {
            severity,
            blob,
            what: what.into(),
        });
    }
}

/// Reports what a dead process left in the device's unsynced memory at
/// `path`: buffers the next mount writes back, and stale ones it ignores.
async fn check_unsynced(bs: &Blobstore, path: &std::path::Path, r: &mut FsckReport) -> Result<()> {
    let Some(records) = crate::unsynced::scan_path(path)? else {
        return Ok(());
    };
    let Some(sb) = bs.super_blob() else {
        return Ok(());
    };
    let b = bs.open_blob(sb).await.ctx("super blob")?;
    let here = crate::unsynced::Owner {
        boot: crate::unsynced::boot_id(),
        fs: b
            .get_xattr(meta::FS_ID)
            .and_then(|v| v.try_into().ok())
            .unwrap_or([0; 16]),
        gen: b
            .get_xattr(meta::MOUNT_GEN)
            .and_then(|v| v.try_into().ok())
            .map_or(0, u64::from_le_bytes),
    };
    for rec in records {
        let h = &rec.header;
        let what = format!(
            "unsynced memory {}: file bytes {}..{} (length {})",
            path.display(),
            h.file_off,
            h.file_off + h.used,
            h.file_len
        );
        match crate::unsynced::stale_reason(&h.owner, &here) {
            None => {
                r.unsynced_buffers += 1;
                r.unsynced_bytes += h.used;
                r.add(
                    Severity::Warning,
                    Some(BlobId(h.blob)),
                    format!("{what} of a process that died: the next mount writes them back"),
                );
            }
            Some(why) => r.add(
                Severity::Warning,
                Some(BlobId(h.blob)),
                format!("{what}, {why}: the next mount ignores them"),
            ),
        }
    }
    Ok(())
}

/// One blob that names a file or directory.
struct Claim {
    id: BlobId,
    name: String,
    kind: u8,
    seq: u64,
}

/// Checks the BlobFS on `dev`, which must not be mounted. Returns `Err` only
/// when the check cannot run at all (no BlobFS, unreadable metadata, I/O
/// errors); damage it can describe is in the report.
pub async fn fsck_async(dev: Arc<dyn BlockDevice>) -> Result<FsckReport> {
    let name = dev.name();
    let r = check_device(dev).await?;
    report_event(&name, &r);
    Ok(r)
}

/// [`fsck_async`] without its event (a repair reports once, at its end).
async fn check_device(dev: Arc<dyn BlockDevice>) -> Result<FsckReport> {
    let unsynced = dev.unsynced_memory();
    let bs = load_unmounted(dev).await?;
    let mut res = check_store(&bs).await;
    if let Ok(r) = &mut res {
        note_load_repairs(&bs.load_report(), r);
    }
    if let (Ok(r), Some(path)) = (&mut res, &unsynced) {
        if let Err(e) = check_unsynced(&bs, path, r).await {
            res = Err(e);
        }
    }
    // Unload even after a failed check, so the store is left clean.
    let unloaded = bs.unload().await.ctx("fsck: unloading the blobstore");
    let report = res?;
    unloaded?;
    Ok(report)
}

/// Loads the blobstore of an unmounted BlobFS.
async fn load_unmounted(dev: Arc<dyn BlockDevice>) -> Result<Blobstore> {
    if crate::fs::is_mounted(dev.id()) {
        return Err(Error::store(
            "fsck",
            blobstore::Error::Busy(format!("{} is mounted", dev.name())),
        ));
    }
    match Blobstore::load(
        dev,
        LoadOptions {
            bstype: meta::BSTYPE.into(),
        },
    )
    .await
    {
        Ok(bs) => Ok(bs),
        Err(e @ (blobstore::Error::NotABlobstore(_) | blobstore::Error::WrongType { .. })) => {
            Err(Error::NotBlobFs(e.to_string()))
        }
        Err(e) => Err(Error::store("fsck: loading the blobstore", e)),
    }
}

/// Checks and repairs the BlobFS on `dev`, which must not be mounted, then
/// checks it again; the report is that of the second check, with what the
/// repair did in [`FsckReport::repairs`], [`FsckReport::moved_to_lost_found`]
/// and [`FsckReport::lost`]. The repair:
/// - loads the store, which falls back to the backup super block and
///   rebuilds damaged bitmaps (rewriting both);
/// - drops blobs whose blobstore metadata cannot be read and rebuilds the
///   bitmaps from the rest (`Blobstore::repair`), naming the files lost;
/// - recreates the root record (super blob) if it was lost;
/// - moves every blob whose BlobFS metadata (name, kind, sequence, time,
///   length) cannot be read to `lost+found/<blob id>`, as a file holding
///   its data (its length where that still reads, else the whole blob).
///
/// What it does not repair stays damage in the report (two blobs claiming
/// one cluster, a name claimed twice with one sequence number).
pub async fn fsck_repair_async(dev: Arc<dyn BlockDevice>) -> Result<FsckReport> {
    let bs = load_unmounted(dev.clone()).await?;
    let mut load = FsckReport::default();
    note_load_repairs(&bs.load_report(), &mut load);
    let res = repair_store(&bs).await;
    let unloaded = bs.unload().await.ctx("fsck: unloading the blobstore");
    let (mut repairs, moved, lost) = res?;
    unloaded?;
    let mut r = check_device(dev.clone()).await?;
    repairs.splice(0..0, load.findings.into_iter().map(|f| f.what));
    r.repairs = repairs;
    r.moved_to_lost_found = moved;
    r.lost = lost;
    report_event(&dev.name(), &r);
    Ok(r)
}

/// Synchronous [`fsck_repair_async`].
pub fn fsck_repair(dev: Arc<dyn BlockDevice>) -> Result<FsckReport> {
    block_on(fsck_repair_async(dev))
}

/// Name of the directory repaired files go to.
pub const LOST_FOUND: &str = "lost+found";

/// Why blob `blob`'s BlobFS metadata does not read, or `None` with its
/// sequence number when it does.
fn bad_fs_metadata(blob: &blobstore::Blob) -> std::result::Result<u64, String> {
    let name = match blob.get_xattr(meta::NAME).map(String::from_utf8) {
        Some(Ok(n)) if name::normalize_entry(&n).ok().as_deref() == Some(n.as_str()) => n,
        Some(Ok(n)) => return Err(format!("invalid name {n:?}")),
        _ => return Err(format!("no valid {}", meta::NAME)),
    };
    let kind = match blob.get_xattr(meta::KIND).as_deref() {
        Some([k]) if *k == meta::KIND_FILE || *k == meta::KIND_DIR => *k,
        _ => return Err(format!("{name}: bad {}", meta::KIND)),
    };
    let seq =
        meta::dec_u64(blob.get_xattr(meta::SEQ), meta::SEQ, &name).map_err(|e| e.to_string())?;
    meta::dec_u64(blob.get_xattr(meta::MTIME), meta::MTIME, &name).map_err(|e| e.to_string())?;
    if kind == meta::KIND_FILE {
        let len = meta::dec_u64(blob.get_xattr(meta::LEN), meta::LEN, &name)
            .map_err(|e| e.to_string())?;
        if len > blob.size_bytes() {
            return Err(format!("{name}: length {len} past the end of its blob"));
        }
    }
    Ok(seq)
}

/// The repair steps of [`fsck_repair_async`] on a loaded store: what was
/// done, what was moved to lost+found, what was lost.
async fn repair_store(bs: &Blobstore) -> Result<(Vec<String>, Vec<String>, Vec<String>)> {
    let (mut repairs, mut moved, mut lost) = (Vec::new(), Vec::new(), Vec::new());
    let old_root = bs.super_blob();
    let rep = bs.repair().await.ctx("fsck --repair")?;
    // The root record, if dropped, is named below with its recreation.
    for d in rep.dropped.iter().filter(|d| Some(d.id) != old_root) {
        let name = d
            .xattrs
            .iter()
            .find(|(k, _)| k == meta::NAME)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
        lost.push(match name {
            Some(n) => format!("{n} (blob {}): {}", d.id, d.why),
            None => format!("blob {}: {}", d.id, d.why),
        });
    }
    let bits = rep.page_bits_fixed + rep.cluster_bits_fixed + rep.blobid_bits_fixed;
    if bits > 0 {
        repairs.push(format!(
            "bitmaps rebuilt from the metadata: {} page, {} cluster and {} blob-id bits corrected",
            rep.page_bits_fixed, rep.cluster_bits_fixed, rep.blobid_bits_fixed
        ));
    }
    if !rep.zeroed_pages.is_empty() {
        repairs.push(format!(
            "{} damaged metadata pages zeroed",
            rep.zeroed_pages.len()
        ));
    }
    let now = meta::now_ns();
    if bs.super_blob().is_none() {
        let sb = bs
            .create_blob(blobstore::BlobOptions {
                xattrs: vec![
                    (
                        meta::VERSION.into(),
                        meta::FORMAT_VERSION.to_le_bytes().to_vec(),
                    ),
                    (meta::FS_ID.into(), crate::unsynced::random_id()?.to_vec()),
                ],
                ..Default::default()
            })
            .await
            .ctx("fsck --repair: recreating the root record")?;
        bs.set_super_blob(Some(sb))
            .await
            .ctx("fsck --repair: recreating the root record")?;
        repairs.push(format!(
            "root record (super blob) {}: recreated as blob {sb}",
            if rep.super_blob_dropped {
                "unreadable"
            } else {
                "missing"
            }
        ));
    }
    let sb = bs.super_blob();
    let mut max_seq = 0;
    let mut bad = Vec::new();
    let mut have_lost_found = false;
    for id in bs.blob_ids() {
        if Some(id) == sb {
            continue;
        }
        let blob = bs.open_blob(id).await.ctx(&format!("blob {id}"))?;
        if blob.get_xattr(meta::UNLINKED).is_some() {
            continue;
        }
        match bad_fs_metadata(&blob) {
            Ok(seq) => {
                max_seq = max_seq.max(seq);
                have_lost_found |= blob.get_xattr(meta::NAME).as_deref()
                    == Some(LOST_FOUND.as_bytes())
                    && blob.get_xattr(meta::KIND).as_deref() == Some(&[meta::KIND_DIR][..]);
            }
            Err(why) => bad.push((blob, why)),
        }
    }
    if !bad.is_empty() && !have_lost_found {
        max_seq += 1;
        bs.create_blob(blobstore::BlobOptions {
            xattrs: vec![
                (meta::NAME.into(), LOST_FOUND.as_bytes().to_vec()),
                (meta::KIND.into(), vec![meta::KIND_DIR]),
                (meta::SEQ.into(), meta::enc_u64(max_seq).to_vec()),
                (meta::MTIME.into(), meta::enc_u64(now).to_vec()),
            ],
            ..Default::default()
        })
        .await
        .ctx("fsck --repair: creating lost+found")?;
        repairs.push(format!("created {LOST_FOUND}/"));
    }
    for (blob, why) in bad {
        let id = blob.id();
        let old = blob
            .get_xattr(meta::NAME)
            .and_then(|n| String::from_utf8(n).ok())
            .unwrap_or_else(|| format!("blob {id}"));
        let len = meta::dec_u64(blob.get_xattr(meta::LEN), meta::LEN, &old)
            .ok()
            .filter(|&l| l <= blob.size_bytes())
            .unwrap_or(blob.size_bytes());
        let new = format!("{LOST_FOUND}/{id}");
        max_seq += 1;
        let what = format!("fsck --repair: moving blob {id} to {new}");
        for (k, v) in [
            (meta::NAME, new.as_bytes().to_vec()),
            (meta::KIND, vec![meta::KIND_FILE]),
            (meta::SEQ, meta::enc_u64(max_seq).to_vec()),
            (meta::MTIME, meta::enc_u64(now).to_vec()),
            (meta::LEN, meta::enc_u64(len).to_vec()),
        ] {
            blob.set_xattr(k, &v).ctx(&what)?;
        }
        for k in [meta::MOVED_FROM, meta::TAIL] {
            if blob.get_xattr(k).is_some() {
                blob.remove_xattr(k).ctx(&what)?;
            }
        }
        blob.sync_metadata().await.ctx(&what)?;
        moved.push(format!("{old} -> {new} ({len} bytes; {why})"));
    }
    Ok((repairs, moved, lost))
}

/// Warnings for what loading the store found and worked around (the load
/// itself repaired these on the device).
fn note_load_repairs(l: &blobstore::LoadReport, r: &mut FsckReport) {
    if let Some(why) = &l.super_from_backup {
        r.add(
            Severity::Warning,
            None,
            format!(
                "primary super block unreadable ({why}): loaded from the backup super block, \
                 primary rewritten"
            ),
        );
    }
    if let Some(why) = &l.backup_rewritten {
        r.add(
            Severity::Warning,
            None,
            format!("backup super block damaged ({why}): rewritten from the primary"),
        );
    }
    if l.bitmap_damaged {
        let why = l.bitmaps_rebuilt.as_deref().unwrap_or("damaged bitmap");
        r.add(
            Severity::Warning,
            None,
            format!("{why}: every bitmap rebuilt from the blobs' metadata"),
        );
    }
}

/// Synchronous [`fsck_async`].
pub fn fsck(dev: Arc<dyn BlockDevice>) -> Result<FsckReport> {
    block_on(fsck_async(dev))
}

/// The event an operator sees for a finished check (or repair): info when
/// clean, a warning with the damage otherwise.
fn report_event(dev: &str, r: &FsckReport) {
    let damage = r
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Damage)
        .count();
    let warnings = r.findings.len() - damage;
    let repaired = r.repairs.len() + r.moved_to_lost_found.len() + r.lost.len();
    if damage == 0 {
        tracing::info!(
            device = dev,
            files = r.files,
            dirs = r.dirs,
            bytes = r.file_bytes,
            warnings,
            repaired,
            "fsck: clean"
        );
    } else {
        let first = r
            .findings
            .iter()
            .find(|f| f.severity == Severity::Damage)
            .map(|f| f.what.as_str())
            .unwrap_or_default();
        tracing::warn!(
            device = dev,
            damage,
            warnings,
            repaired,
            first,
            "fsck: damage found"
        );
    }
}

/// Blob `id`, or `None` with a damage finding when its blobstore metadata
/// does not read (a device error is still the check's error).
async fn readable(
    bs: &Blobstore,
    id: BlobId,
    r: &mut FsckReport,
) -> Result<Option<blobstore::Blob>> {
    match bs.open_blob(id).await {
        Ok(b) => Ok(Some(b)),
        Err(e @ blobstore::Error::Corrupt { .. }) => {
            r.add(
                Severity::Damage,
                Some(id),
                format!("blob {id}: metadata does not read ({e}); `fsck --repair` drops it"),
            );
            Ok(None)
        }
        Err(e) => Err(e).ctx(&format!("blob {id}")),
    }
}

async fn check_store(bs: &Blobstore) -> Result<FsckReport> {
    use Severity::{Damage, Warning};
    let mut r = FsckReport::default();
    let sb = bs.super_blob();
    match sb {
        None => r.add(Damage, None, "no super blob (the BlobFS root record)"),
        Some(id) => {
            let b = match readable(bs, id, &mut r).await? {
                Some(b) => b,
                None => return Ok(r),
            };
            let v = b.get_xattr(meta::VERSION);
            if v.as_deref() != Some(&meta::FORMAT_VERSION.to_le_bytes()[..]) {
                r.add(
                    Damage,
                    Some(id),
                    format!(
                        "super blob: {} is {v:?}, expected version {}",
                        meta::VERSION,
                        meta::FORMAT_VERSION
                    ),
                );
            }
        }
    }
    let unit = bs.io_unit_size() as u64;
    let mut allocated = 0u64;
    let mut claims: Vec<Claim> = Vec::new();
    let mut marks: Vec<crate::fs::Moved> = Vec::new();
    let ids = bs.blob_ids();
    r.blobs = ids.len() as u64;
    for id in ids {
        let Some(blob) = readable(bs, id, &mut r).await? else {
            continue;
        };
        let alloc = blob.allocated_clusters();
        allocated += alloc;
        if !blob.is_thin() && alloc != blob.num_clusters() {
            r.add(
                Damage,
                Some(id),
                format!(
                    "thick blob of {} clusters has only {alloc} allocated",
                    blob.num_clusters()
                ),
            );
        }
        if Some(id) == sb {
            continue;
        }
        if blob.get_xattr(meta::UNLINKED).is_some() {
            r.add(
                Warning,
                Some(id),
                "a file deleted while open; the next mount deletes its blob",
            );
            continue;
        }
        let name = match blob.get_xattr(meta::NAME).map(String::from_utf8) {
            None => {
                r.add(Damage, Some(id), format!("no {} xattr", meta::NAME));
                continue;
            }
            Some(Err(_)) => {
                r.add(Damage, Some(id), format!("{} is not UTF-8", meta::NAME));
                continue;
            }
            Some(Ok(n)) => n,
        };
        if name::normalize_entry(&name).ok().as_deref() != Some(name.as_str()) {
            r.add(Damage, Some(id), format!("invalid name {name:?}"));
            continue;
        }
        let kind = match blob.get_xattr(meta::KIND).as_deref() {
            Some([k]) if *k == meta::KIND_FILE || *k == meta::KIND_DIR => *k,
            other => {
                r.add(
                    Damage,
                    Some(id),
                    format!("{name}: {} is {other:?}, not [1] or [2]", meta::KIND),
                );
                continue;
            }
        };
        let what = name.clone();
        let seq = match meta::dec_u64(blob.get_xattr(meta::SEQ), meta::SEQ, &what) {
            Ok(s) => s,
            Err(e) => {
                r.add(Damage, Some(id), e.to_string());
                continue;
            }
        };
        if let Err(e) = meta::dec_u64(blob.get_xattr(meta::MTIME), meta::MTIME, &what) {
            r.add(Damage, Some(id), e.to_string());
        }
        if let Some(v) = blob.get_xattr(meta::MOVED_FROM) {
            match crate::fs::Moved::decode(id, kind, &v, &what) {
                Ok(m) => marks.push(m),
                Err(e) => r.add(Damage, Some(id), e.to_string()),
            }
        }
        if kind == meta::KIND_FILE {
            match meta::dec_u64(blob.get_xattr(meta::LEN), meta::LEN, &what) {
                Err(e) => r.add(Damage, Some(id), e.to_string()),
                Ok(len) if len > blob.size_bytes() => r.add(
                    Damage,
                    Some(id),
                    format!(
                        "{name}: length {len} is past the end of its blob ({} bytes)",
                        blob.size_bytes()
                    ),
                ),
                Ok(len) => {
                    if len % unit != 0 {
                        let block = len / unit;
                        let buf = DmaBuf::new(unit as usize).ctx(&name)?;
                        let buf = blob.read(block, buf).await.ctx(&name)?;
                        let from = (len % unit) as usize;
                        if let Some(i) = buf[from..].iter().position(|&b| b != 0) {
                            r.add(
                                Damage,
                                Some(id),
                                format!(
                                    "{name}: byte {} past the length {len} is not zero",
                                    len + i as u64
                                ),
                            );
                        }
                    }
                    r.file_bytes += len;
                }
            }
        }
        claims.push(Claim {
            id,
            name,
            kind,
            seq,
        });
    }

    // Interrupted directory renames: names as the next mount makes them.
    if !marks.is_empty() {
        let mut names: Vec<(BlobId, u64, &mut String)> = claims
            .iter_mut()
            .map(|c| (c.id, c.seq, &mut c.name))
            .collect();
        match crate::fs::roll_forward(&mut marks, &mut names) {
            Ok(moved) => {
                for (m, moved) in marks.iter().zip(moved) {
                    let to = claims
                        .iter()
                        .find(|c| c.id == m.dir)
                        .map_or("?", |c| c.name.as_str());
                    r.interrupted_renames += 1;
                    r.add(
                        Warning,
                        Some(m.dir),
                        format!(
                            "{to}: an interrupted rename of directory {:?} ({} {}): {} entries \
                             below it still carry the old name; the next mount finishes it",
                            m.old,
                            meta::MOVED_FROM,
                            m.seq,
                            moved.len()
                        ),
                    );
                }
            }
            Err(e) => r.add(Damage, None, e.to_string()),
        }
    }

    // Names: group the claims, keep the winner of each group.
    let mut by_name: HashMap<String, Vec<Claim>> = HashMap::new();
    for c in claims {
        by_name.entry(c.name.clone()).or_default().push(c);
    }
    let mut winners: HashMap<String, u8> = HashMap::new();
    for (name, mut group) in by_name {
        group.sort_by_key(|c| std::cmp::Reverse(c.seq));
        if group.len() > 1 {
            if group[0].seq == group[1].seq {
                let ids: Vec<String> = group
                    .iter()
                    .filter(|c| c.seq == group[0].seq)
                    .map(|c| c.id.to_string())
                    .collect();
                r.add(
                    Damage,
                    None,
                    format!(
                        "{name}: blobs {} all claim it with the same {} {}",
                        ids.join(", "),
                        meta::SEQ,
                        group[0].seq
                    ),
                );
            } else {
                for loser in &group[1..] {
                    r.add(
                        Warning,
                        Some(loser.id),
                        format!(
                            "{name}: left by an interrupted rename ({} {} loses to blob {} \
                             with {}); the next mount deletes it",
                            meta::SEQ,
                            loser.seq,
                            group[0].id,
                            group[0].seq
                        ),
                    );
                }
            }
        }
        winners.insert(name, group[0].kind);
    }
    let mut names: Vec<(&String, &u8)> = winners.iter().collect();
    names.sort();
    for (name, kind) in names {
        if *kind == meta::KIND_FILE {
            r.files += 1;
        } else {
            r.dirs += 1;
        }
        let parent = name::parent(name);
        if parent.is_empty() {
            continue;
        }
        match winners.get(parent) {
            None => r.add(
                Damage,
                None,
                format!("{name}: parent directory {parent:?} does not exist"),
            ),
            Some(&k) if k != meta::KIND_DIR => r.add(
                Damage,
                None,
                format!("{name}: parent {parent:?} is a file, not a directory"),
            ),
            Some(_) => {}
        }
    }

    // The blobstore's own invariants: every cluster and metadata page owned
    // once, bitmaps agreeing with the metadata.
    match bs.check().await {
        Ok(rep) => {
            for p in rep.problems {
                r.add(Damage, None, format!("blobstore: {p}"));
            }
            if !rep.leaked_clusters.is_empty() || !rep.leaked_md_pages.is_empty() {
                r.add(
                    Warning,
                    None,
                    format!(
                        "blobstore: {} clusters and {} metadata pages marked used that no blob \
                         owns (reclaimed by the next load after an unclean stop)",
                        rep.leaked_clusters.len(),
                        rep.leaked_md_pages.len()
                    ),
                );
            }
        }
        Err(e) => r.add(Damage, None, format!("blobstore check failed: {e}")),
    }
    // Blobstore accounting through the public API.
    let free = bs.free_clusters();
    let data = bs.data_clusters();
    if allocated + free != data {
        r.add(
            Damage,
            None,
            format!(
                "cluster accounting: blobs hold {allocated} clusters and {free} are free, \
                 but the store has {data} data clusters"
            ),
        );
    }
    Ok(r)
}
