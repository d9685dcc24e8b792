//! `shm:<path>[?size=..&bs=..&create=..]`: the spec of a
//! [`MemDevice`](crate::device::MemDevice) whose blocks are a shared
//! mapping of a file (see
//! [`MemDevice::open_shared`](crate::device::MemDevice::open_shared)),
//! parsed and printed.
//!
//! Invariants: a size is a positive multiple of the block size (of 512
//! when `bs=` is not given: the open checks the real one), `create=true`
//! needs a size, and printing gives the options in one order (size, bs,
//! create), which [`parse`] reads back.

use std::fmt;
use std::path::Path;

use super::path::{decode_path, encode_path};
use super::{
    check_file_size, parse_block_size, parse_bool, parse_query, size_options, write_query,
    DeviceSpec,
};
use crate::device::mem::ShmOptions;
use crate::util::parse_size;

/// Parses what follows `shm:`.
pub(super) fn parse(rest: &str) -> std::result::Result<DeviceSpec, String> {
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    if path.is_empty() {
        return Err("missing path after shm: (e.g. shm:/dev/shm/blobs.img?size=4G)".into());
    }
    let path = decode_path(path)?;
    let mut options = ShmOptions::default();
    if let Some(q) = query {
        for (key, value) in parse_query(q, "shm", &["size", "bs", "create"])? {
            match key {
                "size" => options.size_bytes = Some(parse_size(value)?),
                "bs" => options.block_size = Some(parse_block_size(value)?),
                "create" => options.create = Some(parse_bool(key, value)?),
                _ => unreachable!("parse_query let an unknown key through"),
            }
        }
    }
    check_file_size(options.size_bytes, options.block_size, options.create)?;
    Ok(DeviceSpec::Shm { path, options })
}

/// Writes the spec of a `shm:` device (in the form [`parse`] reads).
pub(super) fn write(f: &mut fmt::Formatter<'_>, path: &Path, options: &ShmOptions) -> fmt::Result {
    write!(f, "shm:{}", encode_path(path))?;
    let mut opts = size_options(options.size_bytes, options.block_size);
    if let Some(c) = options.create {
        opts.push(format!("create={c}"));
    }
    write_query(f, &opts)
}
