//! `mem:<size>[?bs=512|4096]`: the spec of a
//! [`MemDevice`](crate::device::MemDevice) of `<size>` bytes, parsed and
//! printed.
//!
//! Invariant: the size is a positive multiple of the block size (4096
//! unless `bs=` says otherwise), and printing leaves `bs=` out at 4096.

use std::fmt;

use super::{check_size, parse_block_size, parse_query, DeviceSpec};
use crate::util::{format_size, parse_size};

/// Block size of a `mem:` device when the spec does not give one.
const DEFAULT_MEM_BLOCK_SIZE: u32 = 4096;

/// Parses what follows `mem:`.
pub(super) fn parse(rest: &str) -> std::result::Result<DeviceSpec, String> {
    let (size, query) = match rest.split_once('?') {
        Some((s, q)) => (s, Some(q)),
        None => (rest, None),
    };
    if size.is_empty() {
        return Err("missing size after mem: (e.g. mem:1G)".into());
    }
    let size_bytes = parse_size(size)?;
    let mut block_size = DEFAULT_MEM_BLOCK_SIZE;
    if let Some(q) = query {
        for (key, value) in parse_query(q, "mem", &["bs"])? {
            debug_assert_eq!(key, "bs");
            block_size = parse_block_size(value)?;
        }
    }
    check_size(size_bytes, block_size)?;
    Ok(DeviceSpec::Mem {
        size_bytes,
        block_size,
    })
}

/// Writes the spec of a `mem:` device of `size_bytes` in blocks of
/// `block_size` (in the form [`parse`] reads).
pub(super) fn write(f: &mut fmt::Formatter<'_>, size_bytes: u64, block_size: u32) -> fmt::Result {
    write!(f, "mem:{}", format_size(size_bytes))?;
    if block_size != DEFAULT_MEM_BLOCK_SIZE {
        write!(f, "?bs={block_size}")?;
    }
    Ok(())
}
