//! Power-loss recovery: reading the log a [`PowerLossDevice`] wrote (its
//! bytes as [`log_format`] lays them out) and playing the power cut it
//! records on the image ([`recover`]); and, for the device's open, counting
//! the writes a log still holds that no flush made durable.
//!
//! Invariants:
//! - [`recover`] parses and checks the whole log before it touches the
//!   image, changes the image only under its exclusive lock, and deletes
//!   the log only after the image is synced.
//! - The undo records are played newest first, each write's fate drawn once
//!   from the seed: one seed, one power cut.
//!
//! [`PowerLossDevice`]: super::PowerLossDevice
//! [`log_format`]: super::log_format

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::log_format::{decode_header, decode_record, Record, RecordKind, HEADER_LEN};
use super::log_path;
use crate::device::FileLock;
use crate::error::{Error, Result};
use crate::util::SplitMix64;

/// Reads the log at `path` if it exists: how many logged writes no flush
/// made durable.
pub(super) fn pending_writes(path: &Path) -> Result<Option<u64>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::Os {
                context: format!("reading the power-loss log {}", path.display()),
                source: e,
            })
        }
    };
    let log = parse_log(&bytes, path)?;
    let durable: HashSet<u64> = log.durable;
    let pending: HashSet<u64> = log
        .undo
        .iter()
        .map(|r| r.seq)
        .filter(|s| !durable.contains(s))
        .collect();
    Ok(Some(pending.len() as u64))
}

/// A parsed log.
struct Log<'a> {
    sector: u32,
    /// Undo and undo-zero records, oldest first.
    undo: Vec<Record<'a>>,
    /// Writes a completed flush made durable.
    durable: HashSet<u64>,
    /// The log ends inside a record (its append was cut short, so its write
    /// was never issued).
    torn_tail: bool,
}

fn parse_log<'a>(bytes: &'a [u8], path: &Path) -> Result<Log<'a>> {
    let location = format!("power-loss log {}", path.display());
    // A log created but killed before its header was written had no write
    // issued through it.
    if bytes.is_empty() {
        return Ok(Log {
            sector: 512,
            undo: Vec::new(),
            durable: HashSet::new(),
            torn_tail: false,
        });
    }
    let sector = decode_header(bytes, &location)?;
    let mut log = Log {
        sector,
        undo: Vec::new(),
        durable: HashSet::new(),
        torn_tail: false,
    };
    let mut pos = HEADER_LEN;
    while pos < bytes.len() {
        let at = format!("{location} at byte {pos}");
        match decode_record(&bytes[pos..], &at)? {
            None => {
                log.torn_tail = true;
                break;
            }
            Some((rec, len)) => {
                match rec.kind {
                    RecordKind::Flushed => log.durable.extend(
                        rec.payload
                            .chunks_exact(8)
                            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))),
                    ),
                    RecordKind::Undo | RecordKind::UndoZero => {
                        if !rec.range_len.is_multiple_of(sector as u64)
                            || !rec.offset.is_multiple_of(sector as u64)
                        {
                            return Err(Error::corrupt(
                                at,
                                format!(
                                    "undo range {}+{} is not in whole {sector}-byte sectors",
                                    rec.offset, rec.range_len
                                ),
                            ));
                        }
                        log.undo.push(rec)
                    }
                }
                pos += len;
            }
        }
    }
    Ok(log)
}

/// How long [`recover`] waits for the image's lock to be released.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// What [`recover`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Writes in the log that no completed flush had made durable.
    pub writes: u64,
    /// Of those, writes rolled back entirely (never reached the media).
    pub undone: u64,
    /// Writes kept entirely (reached the media before the cut).
    pub kept: u64,
    /// Writes torn: some sectors old, some new.
    pub torn: u64,
    /// Writes the log shows a completed flush made durable (left alone).
    pub durable: u64,
    /// Bytes written back to the image.
    pub bytes_restored: u64,
    /// The log ended inside a record (an append cut short by the kill; its
    /// write was never issued).
    pub torn_tail: bool,
    /// The killed owner had left unsynced data in memory, which the cut
    /// discarded.
    pub unsynced_memory_lost: bool,
}

impl std::fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} unflushed write(s): {} undone, {} kept, {} torn; {} durable; {} bytes restored{}",
            self.writes,
            self.undone,
            self.kept,
            self.torn,
            self.durable,
            self.bytes_restored,
            if self.torn_tail {
                "; log ended inside a record"
            } else {
                ""
            }
        )
    }
}

/// What the power cut does to one write.
#[derive(Clone, Copy)]
enum Fate {
    Undo,
    Keep,
    Tear,
}

/// Simulates a power cut on the image at `image` from its power-loss log
/// ([`log_path`]): every write no completed flush made durable is undone,
/// kept or torn per sector, chosen from `seed`; then the image is synced and
/// the log deleted. Run it while no process has the image open (it takes the
/// same lock as the file device, waits a few seconds for a process that was
/// just killed to release it, and fails with [`Error::Busy`] otherwise).
/// A missing log, or one whose records fail their checks, is an error and
/// leaves the image untouched.
pub fn recover(image: &Path, seed: u64) -> Result<RecoveryReport> {
    let path = log_path(image);
    let bytes = std::fs::read(&path).map_err(|e| Error::Os {
        context: format!(
            "reading the power-loss log {} (was {} opened with powerloss=on, and not recovered since?)",
            path.display(),
            image.display()
        ),
        source: e,
    })?;
    let log = parse_log(&bytes, &path)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(|e| Error::Os {
            context: format!("opening {} for power-loss recovery", image.display()),
            source: e,
        })?;
    // A process just killed may hold the lock a moment longer (the kernel
    // tears its io_uring down after it is reaped): wait for that, not for a
    // live owner. The lock is released explicitly when `file` is dropped.
    let file = FileLock::wait_exclusive(file, image, LOCK_WAIT)?;
    let mut report = RecoveryReport {
        torn_tail: log.torn_tail,
        ..RecoveryReport::default()
    };
    let sector = log.sector as usize;
    // The same seed gives the same power cut.
    let mut rng = SplitMix64::new(seed);
    let mut fates: HashMap<u64, Fate> = HashMap::new();
    let mut durable_seen: HashSet<u64> = HashSet::new();
    let os = |what: &str, off: u64, e| Error::Os {
        context: format!(
            "{what} {} at byte {off} during power-loss recovery",
            image.display()
        ),
        source: e,
    };
    let zeroes = vec![0u8; sector];
    for rec in log.undo.iter().rev() {
        if log.durable.contains(&rec.seq) {
            durable_seen.insert(rec.seq);
            continue;
        }
        let fate = *fates
            .entry(rec.seq)
            .or_insert_with(|| match rng.next_u64() % 3 {
                0 => Fate::Undo,
                1 => Fate::Keep,
                _ => Fate::Tear,
            });
        let sectors = (rec.range_len as usize) / sector;
        for i in 0..sectors {
            let restore = match fate {
                Fate::Undo => true,
                Fate::Keep => false,
                Fate::Tear => rng.next_u64() & 1 == 0,
            };
            if !restore {
                continue;
            }
            let old = match rec.kind {
                RecordKind::Undo => &rec.payload[i * sector..(i + 1) * sector],
                _ => &zeroes[..],
            };
            let off = rec.offset + (i * sector) as u64;
            file.write_all_at(old, off)
                .map_err(|e| os("writing", off, e))?;
            report.bytes_restored += sector as u64;
        }
    }
    for fate in fates.values() {
        match fate {
            Fate::Undo => report.undone += 1,
            Fate::Keep => report.kept += 1,
            Fate::Tear => report.torn += 1,
        }
    }
    report.writes = fates.len() as u64;
    report.durable = durable_seen.len() as u64;
    file.sync_all().map_err(|e| os("syncing", 0, e))?;
    // The cut takes the machine's memory with it: the owner's unsynced data
    // (see `BlockDevice::unsynced_memory`) is gone, as after a reboot.
    let unsynced =
        crate::device::unsynced_memory_path(&file.metadata().map_err(|e| os("stat of", 0, e))?);
    match std::fs::remove_file(&unsynced) {
        Ok(()) => report.unsynced_memory_lost = true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Error::Os {
                context: format!("deleting the unsynced memory {}", unsynced.display()),
                source: e,
            })
        }
    }
    std::fs::remove_file(&path).map_err(|e| Error::Os {
        context: format!("deleting the power-loss log {}", path.display()),
        source: e,
    })?;
    Ok(report)
}
