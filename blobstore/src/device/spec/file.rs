//! `file:<path>[?size=..&bs=..&qd=..&create=..&prealloc=..]`: the spec of
//! a [`FileDevice`](crate::device::FileDevice), parsed and printed; and
//! its test-machinery form `powerloss=on` (with
//! `powerloss_cut_after`/`powerloss_cut_when`), which wraps the file
//! device in a [`PowerLossDevice`](crate::testing::PowerLossDevice) in
//! builds with the cargo feature `testing`.
//!
//! Invariants:
//! - A size is a positive multiple of the block size (of 512 when `bs=` is
//!   not given: the open checks the real one), and `create=true` needs a
//!   size.
//! - Without the feature `testing`, `powerloss=on` is an error that names
//!   the feature; the `powerloss_cut_*` options need `powerloss=on`.
//! - Printing gives the options in one order (size, bs, qd, prealloc,
//!   create, then the `powerloss*` ones), which [`parse`] reads back.

use std::fmt;
use std::path::{Path, PathBuf};

use super::path::{decode_path, encode_path};
use super::{
    check_file_size, parse_block_size, parse_bool, parse_query, size_options, write_query,
    DeviceSpec,
};
use crate::device::file::{FileOptions, MAX_QUEUE_DEPTH};
use crate::util::parse_size;

/// Parses what follows `file:`.
pub(super) fn parse(rest: &str) -> std::result::Result<DeviceSpec, String> {
    let (path, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    if path.is_empty() {
        return Err("missing path after file: (e.g. file:/var/lib/blobs.img?size=4G)".into());
    }
    let path = decode_path(path)?;
    let mut options = FileOptions::default();
    let mut powerloss = false;
    let mut cut_after: Option<u64> = None;
    let mut cut_issued: Option<bool> = None;
    if let Some(q) = query {
        for (key, value) in parse_query(
            q,
            "file",
            &[
                "size",
                "bs",
                "qd",
                "create",
                "prealloc",
                "powerloss",
                "powerloss_cut_after",
                "powerloss_cut_when",
            ],
        )? {
            match key {
                "powerloss_cut_after" => {
                    cut_after =
                        Some(value.parse().ok().filter(|&n: &u64| n > 0).ok_or_else(|| {
                            format!("powerloss_cut_after={value:?} must be a positive number")
                        })?)
                }
                "powerloss_cut_when" => {
                    cut_issued = Some(match value {
                        "before" => false,
                        "after" => true,
                        _ => {
                            return Err(format!(
                                "powerloss_cut_when={value:?} must be before or after"
                            ))
                        }
                    })
                }
                "powerloss" => {
                    powerloss = match value {
                        "on" => true,
                        "off" => false,
                        _ => return Err(format!("powerloss={value:?} must be on or off")),
                    }
                }
                "size" => options.size_bytes = Some(parse_size(value)?),
                "bs" => options.block_size = Some(parse_block_size(value)?),
                "qd" => {
                    let qd: u32 = value
                        .parse()
                        .ok()
                        .filter(|q| (1..=MAX_QUEUE_DEPTH).contains(q))
                        .ok_or_else(|| {
                            format!(
                                "queue depth {value:?} is not a number from 1 to {MAX_QUEUE_DEPTH}"
                            )
                        })?;
                    options.queue_depth = Some(qd);
                }
                "prealloc" => options.preallocate = Some(parse_bool(key, value)?),
                "create" => options.create = Some(parse_bool(key, value)?),
                _ => unreachable!("parse_query let an unknown key through"),
            }
        }
    }
    check_file_size(options.size_bytes, options.block_size, options.create)?;
    if !powerloss && (cut_after.is_some() || cut_issued.is_some()) {
        return Err("powerloss_cut_after and powerloss_cut_when need powerloss=on".into());
    }
    if cut_issued.is_some() && cut_after.is_none() {
        return Err("powerloss_cut_when needs powerloss_cut_after=<n>".into());
    }
    if powerloss {
        return power_loss_spec(path, options, cut_after, cut_issued.unwrap_or(false));
    }
    Ok(DeviceSpec::File { path, options })
}

/// `file:<path>?..&powerloss=on`, with its power cut if any.
#[cfg(any(test, feature = "testing"))]
fn power_loss_spec(
    path: PathBuf,
    options: FileOptions,
    cut_after: Option<u64>,
    issued: bool,
) -> std::result::Result<DeviceSpec, String> {
    let cut = cut_after.map(|after| crate::testing::PowerCut { after, issued });
    Ok(DeviceSpec::PowerLoss { path, options, cut })
}

/// `powerloss=on` in a build without the test machinery: refused, naming
/// the feature that has it.
#[cfg(not(any(test, feature = "testing")))]
fn power_loss_spec(
    _: PathBuf,
    _: FileOptions,
    _: Option<u64>,
    _: bool,
) -> std::result::Result<DeviceSpec, String> {
    Err(
        "powerloss=on is test machinery that this build lacks: build blobstore with \
         its cargo feature `testing` (rocksdb-env: `--features testing`)"
            .into(),
    )
}

/// Writes the spec of a `file:` device (in the form [`parse`] reads).
pub(super) fn write(f: &mut fmt::Formatter<'_>, path: &Path, options: &FileOptions) -> fmt::Result {
    write!(f, "file:{}", encode_path(path))?;
    let mut opts = size_options(options.size_bytes, options.block_size);
    if let Some(qd) = options.queue_depth {
        opts.push(format!("qd={qd}"));
    }
    if let Some(p) = options.preallocate {
        opts.push(format!("prealloc={p}"));
    }
    if let Some(c) = options.create {
        opts.push(format!("create={c}"));
    }
    write_query(f, &opts)
}

/// Writes the spec of a `file:` device under the power-loss device: the
/// `file:` spec with `powerloss=on` and its power cut, if any.
#[cfg(any(test, feature = "testing"))]
pub(super) fn write_power_loss(
    f: &mut fmt::Formatter<'_>,
    path: &Path,
    options: &FileOptions,
    cut: Option<&crate::testing::PowerCut>,
) -> fmt::Result {
    let file = DeviceSpec::File {
        path: path.to_path_buf(),
        options: *options,
    }
    .to_string();
    let sep = if file.contains('?') { '&' } else { '?' };
    write!(f, "{file}{sep}powerloss=on")?;
    if let Some(c) = cut {
        write!(
            f,
            "&powerloss_cut_after={}&powerloss_cut_when={}",
            c.after,
            if c.issued { "after" } else { "before" }
        )?;
    }
    Ok(())
}
