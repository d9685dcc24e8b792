//! Device spec strings: one text form that names every kind of device, used
//! by tools, tests and benchmarks alike.
//!
//! ```text
//! mem:<size>[?bs=512|4096]
//! shm:<path>[?size=<size>&bs=512|4096&create=true|false]
//! file:<path>[?size=<size>&bs=512|4096&qd=<n>&create=true|false&powerloss=on
//!              [&powerloss_cut_after=<n>&powerloss_cut_when=before|after]]
//!              (powerloss*: test machinery, feature `testing` only)
//! nvme:<DDDD:BB:DD.F>[/ns=<n>]
//! nvme-tcp:<host>:<port>/<subsystem NQN>[/ns=<n>][?hostnqn=<NQN>&qd=<n>
//!          &digest=none|header|data|both]
//! ```
//!
//! In `nvme-tcp:`, the host is a name, an IPv4 address or a bracketed IPv6
//! address (`[::1]:4420`); the port is required (4420 is the usual one).
//!
//! Sizes are plain bytes or carry a binary suffix: `K`, `M`, `G`, `T` (or
//! `KiB`, `MiB`, `GiB`, `TiB`), e.g. `4G`, `512M`, `1GiB`: the grammar of
//! [`crate::util::parse_size`], the same everywhere. In a `file:` or `shm:` path,
//! `%` and `?` (and bytes that are not UTF-8) are written as `%XX`.
//!
//! Layout: here the grammar every scheme shares (`<scheme>:`, the
//! `?key=value&..` query, sizes, block sizes, `/ns=<n>`), [`DeviceSpec`],
//! and the dispatch to the schemes; then one module per scheme, with how
//! its text parses and prints: `mem`, `shm`, `file` (with `powerloss`),
//! `nvme`, `nvme_tcp`; `path` (the `%XX` escaping of `file:` and `shm:`
//! paths); and `tests`.
//!
//! Invariants:
//! - Parsing never touches the system; it checks everything that can be
//!   checked from the text (units, ranges, block-size multiples) and names the
//!   exact problem in [`Error::BadSpec`].
//! - Display round-trips: `DeviceSpec::parse(&spec.to_string()) == Ok(spec)`
//!   for every spec that `parse` returns.
//! - Without the cargo feature `testing`, no spec reaches the test
//!   machinery: `powerloss=on` is an error that names the feature.

mod file;
mod mem;
mod nvme;
mod nvme_tcp;
mod path;
mod shm;
#[cfg(test)]
mod tests;

pub use nvme::PciAddress;
pub use nvme_tcp::TcpDigest;
#[cfg(feature = "nvme")]
pub(crate) use nvme_tcp::{check_nqn, MAX_NQN_BYTES, MAX_TCP_QUEUE_DEPTH};

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use super::file::FileOptions;
use super::mem::ShmOptions;
use super::{BlockDevice, FileDevice, MemDevice};
use crate::error::{Error, Result};

/// Schemes a spec may start with, for error messages.
const SCHEMES: &str = "mem, shm, file, nvme, nvme-tcp";
/// Namespace of an `nvme:` or `nvme-tcp:` device when the spec does not
/// give one.
const DEFAULT_NVME_NAMESPACE: u32 = 1;

/// A parsed device spec: which device, and how to open it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// `mem:<size>[?bs=<n>]`: a [`MemDevice`].
    Mem {
        /// Size in bytes (a positive multiple of `block_size`).
        size_bytes: u64,
        /// 512 or 4096 (default 4096).
        block_size: u32,
    },
    /// `file:<path>[?size=..&bs=..&qd=..&create=..&prealloc=..]`: a [`FileDevice`].
    File {
        /// The regular file or block device.
        path: PathBuf,
        /// Options from the query part.
        options: FileOptions,
    },
    /// `file:<path>?..&powerloss=on` (feature `testing` only): a
    /// [`FileDevice`] under a
    /// [`PowerLossDevice`](crate::testing::PowerLossDevice), which logs how
    /// to undo every write not yet made durable, for
    /// [`recover`](crate::testing::recover).
    #[cfg(any(test, feature = "testing"))]
    PowerLoss {
        /// The regular file or block device.
        path: PathBuf,
        /// Options from the query part (other than the `powerloss*` ones).
        options: FileOptions,
        /// `powerloss_cut_after=<n>[&powerloss_cut_when=before|after]`: a
        /// test-only self-inflicted power cut (the process SIGKILLs itself
        /// at its n-th write or flush); see [`PowerCut`](crate::testing::PowerCut).
        cut: Option<crate::testing::PowerCut>,
    },
    /// `shm:<path>[?size=..&bs=..&create=..]`: a [`MemDevice`] whose
    /// blocks are a shared mapping of the file (meant for tmpfs, e.g.
    /// /dev/shm), so they outlive the process; see
    /// [`MemDevice::open_shared`].
    Shm {
        /// The file to map.
        path: PathBuf,
        /// Options from the query part.
        options: ShmOptions,
    },
    /// `nvme:<DDDD:BB:DD.F>[/ns=<n>]`: a namespace of an NVMe controller
    /// bound to vfio-pci, through the userspace driver.
    Nvme {
        /// The controller's PCI address.
        addr: PciAddress,
        /// Namespace id, 1 or more (default 1).
        namespace: u32,
    },
    /// `nvme-tcp:<host>:<port>/<NQN>[/ns=<n>][?hostnqn=..&qd=..&digest=..]`:
    /// a namespace of a remote controller over NVMe/TCP.
    NvmeTcp {
        /// `host:port` of the target.
        target: String,
        /// The subsystem's NQN.
        subnqn: String,
        /// Namespace id, 1 or more (default 1).
        namespace: u32,
        /// This host's NQN (default: the system's, see
        /// [`default_host_nqn`](super::nvme::tcp::default_host_nqn)).
        host_nqn: Option<String>,
        /// I/O queue depth per thread (default 128).
        queue_depth: Option<u16>,
        /// Digests to ask for.
        digest: TcpDigest,
    },
}

impl DeviceSpec {
    /// Parses a spec string; see the module docs for the forms.
    pub fn parse(spec: &str) -> Result<DeviceSpec> {
        parse_spec(spec).map_err(|reason| Error::BadSpec {
            spec: spec.to_string(),
            reason,
        })
    }

    /// Opens the device this spec names.
    pub fn open(&self) -> Result<Arc<dyn BlockDevice>> {
        match self {
            DeviceSpec::Mem {
                size_bytes,
                block_size,
            } => Ok(Arc::new(MemDevice::new(*size_bytes, *block_size)?)),
            DeviceSpec::File { path, options } => Ok(Arc::new(FileDevice::open(path, *options)?)),
            DeviceSpec::Shm { path, options } => {
                Ok(Arc::new(MemDevice::open_shared(path, *options)?))
            }
            #[cfg(any(test, feature = "testing"))]
            DeviceSpec::PowerLoss { path, options, cut } => {
                let inner: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(path, *options)?);
                Ok(Arc::new(crate::testing::PowerLossDevice::with_cut(
                    path,
                    inner,
                    self.to_string(),
                    *cut,
                )?))
            }
            #[cfg(feature = "nvme")]
            DeviceSpec::Nvme { addr, namespace } => Ok(Arc::new(crate::device::NvmeDevice::open(
                &addr.to_string(),
                *namespace,
            )?)),
            #[cfg(not(feature = "nvme"))]
            DeviceSpec::Nvme { .. } => Err(Error::Unsupported(format!(
                "this build has no NVMe driver (cargo feature `nvme`); cannot open {self}"
            ))),
            #[cfg(feature = "nvme")]
            DeviceSpec::NvmeTcp {
                target,
                subnqn,
                namespace,
                host_nqn,
                queue_depth,
                digest,
            } => {
                let mut opts = super::nvme::tcp::TcpOptions::default();
                if let Some(h) = host_nqn {
                    opts.host_nqn = h.clone();
                }
                if let Some(qd) = queue_depth {
                    opts.queue_depth = *qd;
                }
                opts.header_digest = matches!(digest, TcpDigest::Header | TcpDigest::Both);
                opts.data_digest = matches!(digest, TcpDigest::Data | TcpDigest::Both);
                Ok(Arc::new(crate::device::NvmeTcpDevice::open(
                    target, subnqn, *namespace, opts,
                )?))
            }
            #[cfg(not(feature = "nvme"))]
            DeviceSpec::NvmeTcp { .. } => Err(Error::Unsupported(format!(
                "this build has no NVMe driver (cargo feature `nvme`); cannot open {self}"
            ))),
        }
    }
}

/// Parses `spec` and opens the device it names.
pub fn open_device(spec: &str) -> Result<Arc<dyn BlockDevice>> {
    DeviceSpec::parse(spec)?.open()
}

impl FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<DeviceSpec> {
        DeviceSpec::parse(s)
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Mem {
                size_bytes,
                block_size,
            } => mem::write(f, *size_bytes, *block_size),
            DeviceSpec::File { path, options } => file::write(f, path, options),
            DeviceSpec::Shm { path, options } => shm::write(f, path, options),
            #[cfg(any(test, feature = "testing"))]
            DeviceSpec::PowerLoss { path, options, cut } => {
                file::write_power_loss(f, path, options, cut.as_ref())
            }
            DeviceSpec::Nvme { addr, namespace } => nvme::write(f, addr, *namespace),
            DeviceSpec::NvmeTcp {
                target,
                subnqn,
                namespace,
                host_nqn,
                queue_depth,
                digest,
            } => nvme_tcp::write(
                f,
                target,
                subnqn,
                *namespace,
                host_nqn.as_deref(),
                *queue_depth,
                *digest,
            ),
        }
    }
}

/// Parses a whole spec: its scheme, then the rest by the scheme's module.
fn parse_spec(spec: &str) -> std::result::Result<DeviceSpec, String> {
    if spec.is_empty() {
        return Err(format!(
            "empty spec; expected <scheme>:<target> with scheme one of {SCHEMES}"
        ));
    }
    let Some((scheme, rest)) = spec.split_once(':') else {
        return Err(format!(
            "missing scheme; expected <scheme>:<target> with scheme one of {SCHEMES}"
        ));
    };
    match scheme {
        "mem" => mem::parse(rest),
        "file" => file::parse(rest),
        "shm" => shm::parse(rest),
        "nvme" => nvme::parse(rest),
        "nvme-tcp" => nvme_tcp::parse(rest),
        other => Err(format!("unknown scheme {other:?} (known: {SCHEMES})")),
    }
}

/// Splits `key=value&key=value` into pairs, rejecting keys not in `known`,
/// duplicates, and empty values.
fn parse_query<'a>(
    query: &'a str,
    scheme: &str,
    known: &[&str],
) -> std::result::Result<Vec<(&'a str, &'a str)>, String> {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for item in query.split('&') {
        let Some((key, value)) = item.split_once('=') else {
            return Err(format!("option {item:?} is not of the form key=value"));
        };
        if !known.contains(&key) {
            return Err(format!(
                "unknown option {key:?} for {scheme}: devices (known: {})",
                known.join(", ")
            ));
        }
        if value.is_empty() {
            return Err(format!("option {key} has an empty value"));
        }
        if pairs.iter().any(|(k, _)| *k == key) {
            return Err(format!("option {key} is given twice"));
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// Parses a `bs=` value: 512 or 4096 (also written `4K`).
fn parse_block_size(value: &str) -> std::result::Result<u32, String> {
    match value {
        "512" => Ok(512),
        "4096" | "4K" | "4k" => Ok(4096),
        _ => Err(format!("block size {value:?} must be 512 or 4096")),
    }
}

/// Checks that a size is positive and a multiple of the block size.
fn check_size(size_bytes: u64, block_size: u32) -> std::result::Result<(), String> {
    if size_bytes == 0 {
        return Err("size must be positive".into());
    }
    if !size_bytes.is_multiple_of(block_size as u64) {
        return Err(format!(
            "size {size_bytes} is not a multiple of the block size {block_size}"
        ));
    }
    Ok(())
}

/// Checks the `size=`, `bs=` and `create=` options of a device kept in a
/// file (`file:` and `shm:`): a size given fits the block size, and
/// `create=true` has a size.
fn check_file_size(
    size_bytes: Option<u64>,
    block_size: Option<u32>,
    create: Option<bool>,
) -> std::result::Result<(), String> {
    if let Some(size) = size_bytes {
        // Without a block size, 512 is the finest any device may use; the
        // open checks the actual block size again.
        check_size(size, block_size.unwrap_or(512))?;
    }
    if create == Some(true) && size_bytes.is_none() {
        return Err("create=true needs size=<size> to know how large to make the file".into());
    }
    Ok(())
}

/// The `size=` and `bs=` options a path-backed device's spec (`file:`,
/// `shm:`) writes first, as [`check_file_size`]'s inputs read back.
fn size_options(size_bytes: Option<u64>, block_size: Option<u32>) -> Vec<String> {
    let mut opts = Vec::new();
    if let Some(s) = size_bytes {
        opts.push(format!("size={}", crate::util::format_size(s)));
    }
    if let Some(bs) = block_size {
        opts.push(format!("bs={bs}"));
    }
    opts
}

/// Writes `opts` as a spec's query (`?a=1&b=2`, the form [`parse_query`]
/// reads); nothing when there are none.
fn write_query(f: &mut fmt::Formatter<'_>, opts: &[String]) -> fmt::Result {
    if opts.is_empty() {
        return Ok(());
    }
    write!(f, "?{}", opts.join("&"))
}

/// Parses the value of option `key` that is `true` or `false`.
fn parse_bool(key: &str, value: &str) -> std::result::Result<bool, String> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("{key}={value:?} must be true or false")),
    }
}

/// Parses `/ns=<n>` (the text after the `/`) into a namespace id.
fn parse_namespace(s: &str, after: &str) -> std::result::Result<u32, String> {
    let Some(n) = s.strip_prefix("ns=") else {
        return Err(format!(
            "unexpected {s:?} after the {after}; expected /ns=<namespace id>"
        ));
    };
    n.parse::<u32>()
        .ok()
        .filter(|&n| n != 0 && n != u32::MAX)
        .ok_or_else(|| {
            format!(
                "namespace id {n:?} is not a number from 1 to {}",
                u32::MAX - 1
            )
        })
}
