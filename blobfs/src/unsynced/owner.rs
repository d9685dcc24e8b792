//! Whose unsynced memory a header is ([`Owner`]: this boot of the
//! machine, this BlobFS, this mount of it), the ids that say so, and why a
//! record another owner wrote is not this mount's to apply
//! ([`stale_reason`]).
//!
//! Invariants:
//! - A mount applies only the records of this boot, this file system and
//!   the last mount's generation; any other it reports, with why, and
//!   never applies.

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::os_err;
use crate::error::Result;

/// Whose unsynced memory a header is: this boot of the machine, this
/// BlobFS, this mount of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// The machine's boot id.
    pub boot: [u8; 16],
    /// The BlobFS's id.
    pub fs: [u8; 16],
    /// The mount generation.
    pub gen: u64,
}

/// Why a record written by `found` is not this mount's to apply (`here` is
/// the device's boot, file system and generation), or `None` when it is.
pub fn stale_reason(found: &Owner, here: &Owner) -> Option<String> {
    if found.boot != here.boot {
        Some("written before the machine rebooted".into())
    } else if found.fs != here.fs {
        Some(format!(
            "written for another file system (id {}, this one is {})",
            hex(&found.fs),
            hex(&here.fs)
        ))
    } else if found.gen != here.gen {
        Some(format!(
            "written by mount generation {}, not by the last mount ({})",
            found.gen, here.gen
        ))
    } else {
        None
    }
}

/// This machine's boot id (zeroes where the kernel does not say).
pub fn boot_id() -> [u8; 16] {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    parse_uuid(text.trim()).unwrap_or([0; 16])
}

pub(super) fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = s.bytes().filter(|c| *c != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// 16 random bytes (a new BlobFS's id).
pub fn random_id() -> Result<[u8; 16]> {
    let mut id = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|f| f.read_exact_at(&mut id, 0))
        .map_err(|e| os_err("reading /dev/urandom".into(), e))?;
    Ok(id)
}

/// Hex of an id, for messages.
pub fn hex(id: &[u8]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}
