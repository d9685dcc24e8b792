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
//! Invariants:
//! - Parsing never touches the system; it checks everything that can be
//!   checked from the text (units, ranges, block-size multiples) and names the
//!   exact problem in [`Error::BadSpec`].
//! - Display round-trips: `DeviceSpec::parse(&spec.to_string()) == Ok(spec)`
//!   for every spec that `parse` returns.
//! - Without the cargo feature `testing`, no spec reaches the test
//!   machinery: `powerloss=on` is an error that names the feature.

use std::ffi::OsString;
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use super::file::{FileOptions, MAX_QUEUE_DEPTH};

use super::mem::ShmOptions;
use super::{BlockDevice, FileDevice, MemDevice};
use crate::error::{Error, Result};
use crate::util::{format_size, parse_size};

/// Schemes a spec may start with, for error messages.
const SCHEMES: &str = "mem, shm, file, nvme, nvme-tcp";
/// Block size of a `mem:` device when the spec does not give one.
const DEFAULT_MEM_BLOCK_SIZE: u32 = 4096;
/// Namespace of an `nvme:` device when the spec does not give one.
const DEFAULT_NVME_NAMESPACE: u32 = 1;

/// A PCI function address, `DDDD:BB:DD.F` (domain, bus, device, function).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PciAddress {
    /// PCI domain (segment), 16 bits.
    pub domain: u16,
    /// Bus number.
    pub bus: u8,
    /// Device number, 0 to 31.
    pub device: u8,
    /// Function number, 0 to 7.
    pub function: u8,
}

impl PciAddress {
    /// Parses `DDDD:BB:DD.F` (hexadecimal; the function is one digit 0-7).
    fn parse(s: &str) -> std::result::Result<PciAddress, String> {
        let form = "expected a PCI address of the form DDDD:BB:DD.F (hex domain:bus:device.function, e.g. 0000:01:00.0)";
        let bad = |what: &str| format!("PCI address {s:?}: {what}; {form}");
        let parts: Vec<&str> = s.split(':').collect();
        let [domain, bus, dev_fn] = parts[..] else {
            return Err(bad("wrong number of ':' separated parts"));
        };
        let Some((device, function)) = dev_fn.split_once('.') else {
            return Err(bad("missing '.' before the function number"));
        };
        let hex = |field: &str, digits: usize, name: &str| -> std::result::Result<u32, String> {
            if field.len() != digits || !field.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(&format!(
                    "{name} {field:?} is not {digits} hex digit{}",
                    if digits == 1 { "" } else { "s" }
                )));
            }
            u32::from_str_radix(field, 16).map_err(|e| bad(&e.to_string()))
        };
        let domain = hex(domain, 4, "domain")?;
        let bus = hex(bus, 2, "bus")?;
        let device = hex(device, 2, "device")?;
        let function = hex(function, 1, "function")?;
        if device > 0x1f {
            return Err(bad(&format!("device {device:#x} is above 0x1f")));
        }
        if function > 7 {
            return Err(bad(&format!("function {function} is above 7")));
        }
        Ok(PciAddress {
            domain: domain as u16,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// Digests asked for on an `nvme-tcp:` connection (`digest=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TcpDigest {
    /// No digests (the default).
    #[default]
    None,
    /// Header digests.
    Header,
    /// Data digests.
    Data,
    /// Header and data digests.
    Both,
}

impl TcpDigest {
    fn name(self) -> &'static str {
        match self {
            TcpDigest::None => "none",
            TcpDigest::Header => "header",
            TcpDigest::Data => "data",
            TcpDigest::Both => "both",
        }
    }
}

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
            } => {
                write!(f, "mem:{}", format_size(*size_bytes))?;
                if *block_size != DEFAULT_MEM_BLOCK_SIZE {
                    write!(f, "?bs={block_size}")?;
                }
                Ok(())
            }
            DeviceSpec::File { path, options } => {
                write!(f, "file:{}", encode_path(path))?;
                let mut opts = Vec::new();
                if let Some(s) = options.size_bytes {
                    opts.push(format!("size={}", format_size(s)));
                }
                if let Some(bs) = options.block_size {
                    opts.push(format!("bs={bs}"));
                }
                if let Some(qd) = options.queue_depth {
                    opts.push(format!("qd={qd}"));
                }
                if let Some(p) = options.preallocate {
                    opts.push(format!("prealloc={p}"));
                }
                if let Some(c) = options.create {
                    opts.push(format!("create={c}"));
                }
                if !opts.is_empty() {
                    write!(f, "?{}", opts.join("&"))?;
                }
                Ok(())
            }
            DeviceSpec::Shm { path, options } => {
                write!(f, "shm:{}", encode_path(path))?;
                let mut opts = Vec::new();
                if let Some(s) = options.size_bytes {
                    opts.push(format!("size={}", format_size(s)));
                }
                if let Some(bs) = options.block_size {
                    opts.push(format!("bs={bs}"));
                }
                if let Some(c) = options.create {
                    opts.push(format!("create={c}"));
                }
                if !opts.is_empty() {
                    write!(f, "?{}", opts.join("&"))?;
                }
                Ok(())
            }
            #[cfg(any(test, feature = "testing"))]
            DeviceSpec::PowerLoss { path, options, cut } => {
                let file = DeviceSpec::File {
                    path: path.clone(),
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
            DeviceSpec::Nvme { addr, namespace } => {
                write!(f, "nvme:{addr}")?;
                if *namespace != DEFAULT_NVME_NAMESPACE {
                    write!(f, "/ns={namespace}")?;
                }
                Ok(())
            }
            DeviceSpec::NvmeTcp {
                target,
                subnqn,
                namespace,
                host_nqn,
                queue_depth,
                digest,
            } => {
                write!(f, "nvme-tcp:{target}/{subnqn}")?;
                if *namespace != DEFAULT_NVME_NAMESPACE {
                    write!(f, "/ns={namespace}")?;
                }
                let mut opts = Vec::new();
                if let Some(h) = host_nqn {
                    opts.push(format!("hostnqn={h}"));
                }
                if let Some(qd) = queue_depth {
                    opts.push(format!("qd={qd}"));
                }
                if *digest != TcpDigest::None {
                    opts.push(format!("digest={}", digest.name()));
                }
                if !opts.is_empty() {
                    write!(f, "?{}", opts.join("&"))?;
                }
                Ok(())
            }
        }
    }
}

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
        "mem" => parse_mem(rest),
        "file" => parse_file(rest),
        "shm" => parse_shm(rest),
        "nvme" => parse_nvme(rest),
        "nvme-tcp" => parse_nvme_tcp(rest),
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

fn parse_block_size(value: &str) -> std::result::Result<u32, String> {
    match value {
        "512" => Ok(512),
        "4096" | "4K" | "4k" => Ok(4096),
        _ => Err(format!("block size {value:?} must be 512 or 4096")),
    }
}

fn parse_mem(rest: &str) -> std::result::Result<DeviceSpec, String> {
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

fn parse_file(rest: &str) -> std::result::Result<DeviceSpec, String> {
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
                "prealloc" => {
                    options.preallocate = Some(match value {
                        "true" => true,
                        "false" => false,
                        _ => return Err(format!("prealloc={value:?} must be true or false")),
                    })
                }
                "create" => {
                    options.create = Some(match value {
                        "true" => true,
                        "false" => false,
                        _ => return Err(format!("create={value:?} must be true or false")),
                    })
                }
                _ => unreachable!("parse_query let an unknown key through"),
            }
        }
    }
    if let Some(size) = options.size_bytes {
        // Without a block size, 512 is the finest any device may use; the
        // open checks the actual block size again.
        check_size(size, options.block_size.unwrap_or(512))?;
    }
    if options.create == Some(true) && options.size_bytes.is_none() {
        return Err("create=true needs size=<size> to know how large to make the file".into());
    }
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

fn parse_shm(rest: &str) -> std::result::Result<DeviceSpec, String> {
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
                "create" => {
                    options.create = Some(match value {
                        "true" => true,
                        "false" => false,
                        _ => return Err(format!("create={value:?} must be true or false")),
                    })
                }
                _ => unreachable!("parse_query let an unknown key through"),
            }
        }
    }
    if let Some(size) = options.size_bytes {
        // Without a block size, 512 is the finest the device may use; the
        // open checks the actual block size again.
        check_size(size, options.block_size.unwrap_or(512))?;
    }
    if options.create == Some(true) && options.size_bytes.is_none() {
        return Err("create=true needs size=<size> to know how large to make the file".into());
    }
    Ok(DeviceSpec::Shm { path, options })
}

/// Largest `qd=` of an `nvme-tcp:` device.
pub(crate) const MAX_TCP_QUEUE_DEPTH: u16 = 1024;
/// Largest NQN, in bytes.
pub(crate) const MAX_NQN_BYTES: usize = 223;

/// Checks an NQN's text: 1 to 223 bytes of printable ASCII.
pub(crate) fn check_nqn(nqn: &str) -> std::result::Result<(), String> {
    if nqn.is_empty() || nqn.len() > MAX_NQN_BYTES {
        return Err(format!(
            "NQN {nqn:?} must be 1 to {MAX_NQN_BYTES} bytes long"
        ));
    }
    if !nqn.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "NQN {nqn:?} must be printable ASCII without spaces"
        ));
    }
    Ok(())
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

fn parse_nvme_tcp(rest: &str) -> std::result::Result<DeviceSpec, String> {
    let form = "expected nvme-tcp:<host>:<port>/<subsystem NQN>[/ns=<n>] \
                (e.g. nvme-tcp:10.0.0.2:4420/nqn.2024-01.io.example:disk1/ns=1)";
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let Some((target, path)) = main.split_once('/') else {
        return Err(format!("missing /<subsystem NQN> after the target; {form}"));
    };
    let Some((host, port)) = target.rsplit_once(':') else {
        return Err(format!("target {target:?} has no :<port>; {form}"));
    };
    let bracketed = host.starts_with('[') && host.ends_with(']') && host.len() > 2;
    if host.is_empty() || (host.contains(':') && !bracketed) {
        return Err(format!(
            "host {host:?} is empty, or an IPv6 address without [brackets]; {form}"
        ));
    }
    if port.parse::<u16>().ok().filter(|&p| p != 0).is_none() {
        return Err(format!("port {port:?} is not a number from 1 to 65535"));
    }
    let (subnqn, ns) = match path.split_once('/') {
        Some((n, s)) => (n, Some(s)),
        None => (path, None),
    };
    if subnqn.is_empty() {
        return Err(format!("missing subsystem NQN after the target; {form}"));
    }
    check_nqn(subnqn)?;
    let namespace = match ns {
        None => DEFAULT_NVME_NAMESPACE,
        Some(s) => parse_namespace(s, "subsystem NQN")?,
    };
    let (mut host_nqn, mut queue_depth, mut digest) = (None, None, TcpDigest::None);
    if let Some(q) = query {
        for (key, value) in parse_query(q, "nvme-tcp", &["hostnqn", "qd", "digest"])? {
            match key {
                "hostnqn" => {
                    check_nqn(value)?;
                    host_nqn = Some(value.to_string());
                }
                "qd" => {
                    let max = MAX_TCP_QUEUE_DEPTH;
                    queue_depth = Some(
                        value
                            .parse::<u16>()
                            .ok()
                            .filter(|&n| n != 0 && n <= max)
                            .ok_or_else(|| {
                                format!("qd={value:?} is not a number from 1 to {max}")
                            })?,
                    );
                }
                "digest" => {
                    digest = match value {
                        "none" => TcpDigest::None,
                        "header" => TcpDigest::Header,
                        "data" => TcpDigest::Data,
                        "both" => TcpDigest::Both,
                        _ => {
                            return Err(format!(
                                "digest={value:?} must be none, header, data or both"
                            ))
                        }
                    }
                }
                _ => unreachable!("parse_query let an unknown key through"),
            }
        }
    }
    Ok(DeviceSpec::NvmeTcp {
        target: target.to_string(),
        subnqn: subnqn.to_string(),
        namespace,
        host_nqn,
        queue_depth,
        digest,
    })
}

fn parse_nvme(rest: &str) -> std::result::Result<DeviceSpec, String> {
    let (addr, suffix) = match rest.split_once('/') {
        Some((a, s)) => (a, Some(s)),
        None => (rest, None),
    };
    if addr.is_empty() {
        return Err("missing PCI address after nvme: (e.g. nvme:0000:01:00.0)".into());
    }
    let addr = PciAddress::parse(addr)?;
    let namespace = match suffix {
        None => DEFAULT_NVME_NAMESPACE,
        Some(s) => parse_namespace(s, "PCI address")?,
    };
    Ok(DeviceSpec::Nvme { addr, namespace })
}

/// Path text with `%`, `?` and control characters as `%XX`; a path that is
/// not UTF-8 has each of its non-ASCII bytes escaped too.
fn encode_path(path: &std::path::Path) -> String {
    let escape = |b: u8| b == b'%' || b == b'?' || b.is_ascii_control();
    let mut out = String::new();
    match path.to_str() {
        Some(text) => {
            for c in text.chars() {
                if c.is_ascii() && escape(c as u8) {
                    out.push_str(&format!("%{:02X}", c as u32));
                } else {
                    out.push(c);
                }
            }
        }
        None => {
            for &b in path.as_os_str().as_bytes() {
                if escape(b) || !b.is_ascii() {
                    out.push_str(&format!("%{b:02X}"));
                } else {
                    out.push(b as char);
                }
            }
        }
    }
    out
}

fn decode_path(s: &str) -> std::result::Result<PathBuf, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            let b = hex
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    format!("bad escape at byte {i} of the path: '%' must be followed by two hex digits (write a literal '%' as %25)")
                })?;
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(PathBuf::from(OsString::from_vec(out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(spec: &str) -> String {
        match DeviceSpec::parse(spec) {
            Err(Error::BadSpec { spec: s, reason }) => {
                assert_eq!(s, spec);
                reason
            }
            other => panic!("{spec:?}: expected BadSpec, got {other:?}"),
        }
    }

    fn round_trip(spec: &DeviceSpec) {
        let text = spec.to_string();
        assert_eq!(&DeviceSpec::parse(&text).unwrap(), spec, "{text}");
    }

    #[test]
    fn mem_specs() {
        assert_eq!(
            DeviceSpec::parse("mem:64M").unwrap(),
            DeviceSpec::Mem {
                size_bytes: 64 << 20,
                block_size: 4096
            }
        );
        let s: DeviceSpec = "mem:1536?bs=512".parse().unwrap();
        assert_eq!(
            s,
            DeviceSpec::Mem {
                size_bytes: 1536,
                block_size: 512
            }
        );
        assert_eq!(s.to_string(), "mem:1536?bs=512");
        round_trip(&s);
        round_trip(&DeviceSpec::parse("mem:1G?bs=4096").unwrap());
        assert_eq!(
            DeviceSpec::parse("mem:1G?bs=4096").unwrap().to_string(),
            "mem:1G"
        );
    }

    #[test]
    fn file_specs() {
        let s = DeviceSpec::parse("file:/tmp/a.img?size=4G&bs=512&qd=64&create=true").unwrap();
        assert_eq!(
            s,
            DeviceSpec::File {
                path: "/tmp/a.img".into(),
                options: FileOptions {
                    size_bytes: Some(4 << 30),
                    block_size: Some(512),
                    queue_depth: Some(64),
                    create: Some(true),
                    preallocate: None,
                }
            }
        );
        assert_eq!(
            s.to_string(),
            "file:/tmp/a.img?size=4G&bs=512&qd=64&create=true"
        );
        round_trip(&s);
        let plain = DeviceSpec::parse("file:/dev/nvme0n1").unwrap();
        assert_eq!(plain.to_string(), "file:/dev/nvme0n1");
        round_trip(&plain);
        let odd = DeviceSpec::parse("file:/tmp/what%3F%25/x?size=1M").unwrap();
        let DeviceSpec::File { path, .. } = &odd else {
            unreachable!()
        };
        assert_eq!(path, std::path::Path::new("/tmp/what?%/x"));
        round_trip(&odd);
        let utf8 = DeviceSpec::File {
            path: "/tmp/ünï?cödé%".into(),
            options: FileOptions::default(),
        };
        round_trip(&utf8);
        let raw = DeviceSpec::File {
            path: PathBuf::from(OsString::from_vec(b"/tmp/\xff\xfe\n".to_vec())),
            options: FileOptions::default(),
        };
        round_trip(&raw);
    }

    #[test]
    fn nvme_specs() {
        let s = DeviceSpec::parse("nvme:0000:01:00.0").unwrap();
        assert_eq!(
            s,
            DeviceSpec::Nvme {
                addr: PciAddress {
                    domain: 0,
                    bus: 1,
                    device: 0,
                    function: 0
                },
                namespace: 1
            }
        );
        round_trip(&s);
        let s = DeviceSpec::parse("nvme:10DE:Af:1f.7/ns=3").unwrap();
        assert_eq!(s.to_string(), "nvme:10de:af:1f.7/ns=3");
        round_trip(&s);
        // No such PCI function here: a clear error naming it, not a panic.
        match s.open() {
            Err(e) => assert!(e.to_string().contains("10de:af:1f.7"), "{e}"),
            Ok(d) => panic!("opened {}", d.name()),
        }
    }

    #[test]
    fn scheme_errors() {
        assert!(reason("").contains("empty spec"));
        assert!(reason("/dev/sda").contains("missing scheme"));
        let r = reason("disk:/dev/sda");
        assert!(
            r.contains("unknown scheme \"disk\"") && r.contains("mem, shm, file, nvme"),
            "{r}"
        );
    }

    #[test]
    fn mem_errors() {
        assert!(reason("mem:").contains("missing size"));
        assert!(reason("mem:lots").contains("does not start with a number"));
        assert!(reason("mem:4Q").contains("unknown unit"));
        assert!(reason("mem:0").contains("must be positive"));
        assert!(reason("mem:1000").contains("not a multiple of the block size 4096"));
        assert!(reason("mem:1000?bs=512").contains("not a multiple of the block size 512"));
        assert!(reason("mem:1M?bs=1024").contains("must be 512 or 4096"));
        let r = reason("mem:1M?qd=4");
        assert!(
            r.contains("unknown option \"qd\" for mem:") && r.contains("known: bs"),
            "{r}"
        );
        assert!(reason("mem:1M?bs").contains("not of the form key=value"));
        assert!(reason("mem:1M?bs=").contains("empty value"));
        assert!(reason("mem:1M?bs=512&bs=512").contains("given twice"));
    }

    #[test]
    fn file_errors() {
        assert!(reason("file:").contains("missing path"));
        assert!(reason("file:?size=1M").contains("missing path"));
        assert!(reason("file:/x?size=big").contains("does not start with a number"));
        assert!(reason("file:/x?size=0").contains("must be positive"));
        assert!(reason("file:/x?size=1000").contains("not a multiple of the block size 512"));
        assert!(
            reason("file:/x?size=1536&bs=4096").contains("not a multiple of the block size 4096")
        );
        assert!(reason("file:/x?bs=2048").contains("must be 512 or 4096"));
        assert!(reason("file:/x?qd=0").contains("from 1 to"));
        assert!(reason("file:/x?qd=many").contains("from 1 to"));
        assert!(reason("file:/x?qd=100000").contains("from 1 to"));
        assert!(reason("file:/x?create=yes").contains("must be true or false"));
        assert!(reason("file:/x?create=true").contains("needs size"));
        let r = reason("file:/x?sz=1M");
        assert!(
            r.contains("unknown option \"sz\"") && r.contains("size, bs, qd, create"),
            "{r}"
        );
        assert!(reason("file:/x?size=1M&size=2M").contains("given twice"));
        assert!(reason("file:/x%zz").contains("bad escape"));
        assert!(reason("file:/x%2").contains("bad escape"));
    }

    #[test]
    fn shm_specs() {
        let s = DeviceSpec::parse("shm:/dev/shm/a.img?size=8G&bs=512&create=true").unwrap();
        assert_eq!(
            s,
            DeviceSpec::Shm {
                path: "/dev/shm/a.img".into(),
                options: ShmOptions {
                    size_bytes: Some(8 << 30),
                    block_size: Some(512),
                    create: Some(true),
                }
            }
        );
        assert_eq!(
            s.to_string(),
            "shm:/dev/shm/a.img?size=8G&bs=512&create=true"
        );
        round_trip(&s);
        // Options in another order come back in the canonical one.
        assert_eq!(
            DeviceSpec::parse("shm:/x?create=false&bs=4K&size=1048576")
                .unwrap()
                .to_string(),
            "shm:/x?size=1M&bs=4096&create=false"
        );
        let plain = DeviceSpec::parse("shm:/dev/shm/b.img").unwrap();
        assert_eq!(plain.to_string(), "shm:/dev/shm/b.img");
        round_trip(&plain);
        let odd = DeviceSpec::parse("shm:/dev/shm/what%3F%25?size=1M").unwrap();
        let DeviceSpec::Shm { path, .. } = &odd else {
            unreachable!()
        };
        assert_eq!(path, std::path::Path::new("/dev/shm/what?%"));
        round_trip(&odd);
        round_trip(&DeviceSpec::Shm {
            path: PathBuf::from(OsString::from_vec(b"/tmp/\xff?\n".to_vec())),
            options: ShmOptions::default(),
        });
    }

    #[test]
    fn shm_errors() {
        assert!(reason("shm:").contains("missing path after shm:"));
        assert!(reason("shm:?size=1M").contains("missing path"));
        assert!(reason("shm:/x?size=big").contains("does not start with a number"));
        assert!(reason("shm:/x?size=0").contains("must be positive"));
        assert!(reason("shm:/x?size=1000").contains("not a multiple of the block size 512"));
        assert!(
            reason("shm:/x?size=1536&bs=4096").contains("not a multiple of the block size 4096")
        );
        assert!(reason("shm:/x?bs=2048").contains("must be 512 or 4096"));
        assert!(reason("shm:/x?create=yes").contains("must be true or false"));
        assert!(reason("shm:/x?create=true").contains("needs size"));
        let r = reason("shm:/x?qd=4");
        assert!(
            r.contains("unknown option \"qd\" for shm:") && r.contains("known: size, bs, create"),
            "{r}"
        );
        assert!(reason("shm:/x?size=1M&size=2M").contains("given twice"));
        assert!(reason("shm:/x%zz").contains("bad escape"));
    }

    #[test]
    fn nvme_errors() {
        assert!(reason("nvme:").contains("missing PCI address"));
        assert!(reason("nvme:01:00.0").contains("wrong number of ':'"));
        assert!(reason("nvme:0000:01:00").contains("missing '.'"));
        assert!(reason("nvme:000:01:00.0").contains("domain \"000\" is not 4 hex digits"));
        assert!(reason("nvme:0000:1:00.0").contains("bus \"1\" is not 2 hex digits"));
        assert!(reason("nvme:0000:01:0g.0").contains("device \"0g\" is not 2 hex digits"));
        assert!(reason("nvme:0000:01:00.10").contains("function \"10\" is not 1 hex digit"));
        assert!(reason("nvme:0000:01:20.0").contains("above 0x1f"));
        assert!(reason("nvme:0000:01:00.8").contains("above 7"));
        assert!(reason("nvme:0000:01:00.0/nsid=1").contains("expected /ns="));
        assert!(reason("nvme:0000:01:00.0/ns=0").contains("from 1 to"));
        assert!(reason("nvme:0000:01:00.0/ns=x").contains("from 1 to"));
    }

    #[test]
    fn nvme_tcp_specs() {
        let s = DeviceSpec::parse("nvme-tcp:127.0.0.1:4420/nqn.2024-01.io.blobstack:t1").unwrap();
        assert_eq!(
            s,
            DeviceSpec::NvmeTcp {
                target: "127.0.0.1:4420".into(),
                subnqn: "nqn.2024-01.io.blobstack:t1".into(),
                namespace: 1,
                host_nqn: None,
                queue_depth: None,
                digest: TcpDigest::None,
            }
        );
        assert_eq!(
            s.to_string(),
            "nvme-tcp:127.0.0.1:4420/nqn.2024-01.io.blobstack:t1"
        );
        round_trip(&s);
        let full = "nvme-tcp:[fe80::1]:4421/nqn.x:y/ns=2?hostnqn=nqn.2014-08.org.nvmexpress:uuid:1&qd=64&digest=both";
        let s = DeviceSpec::parse(full).unwrap();
        assert_eq!(s.to_string(), full);
        let DeviceSpec::NvmeTcp {
            target,
            namespace,
            queue_depth,
            digest,
            ..
        } = &s
        else {
            unreachable!()
        };
        assert_eq!(
            (target.as_str(), *namespace, *queue_depth, *digest),
            ("[fe80::1]:4421", 2, Some(64), TcpDigest::Both)
        );
        round_trip(&s);
        round_trip(&DeviceSpec::parse("nvme-tcp:target.example:4420/nqn.a?digest=header").unwrap());
        // Nothing listens there: a clear error naming the target, no panic.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        match open_device(&format!("nvme-tcp:127.0.0.1:{port}/nqn.a:b")) {
            Err(e) => assert!(e.to_string().contains(&format!("127.0.0.1:{port}")), "{e}"),
            Ok(d) => panic!("opened {}", d.name()),
        }
    }

    #[test]
    fn nvme_tcp_errors() {
        assert!(reason("nvme-tcp:").contains("missing /<subsystem NQN>"));
        assert!(reason("nvme-tcp:10.0.0.1:4420").contains("missing /<subsystem NQN>"));
        assert!(reason("nvme-tcp:10.0.0.1/nqn.a").contains("has no :<port>"));
        assert!(reason("nvme-tcp::4420/nqn.a").contains("is empty"));
        assert!(reason("nvme-tcp:fe80::1:4420/nqn.a").contains("without [brackets]"));
        assert!(reason("nvme-tcp:h:0/nqn.a").contains("from 1 to 65535"));
        assert!(reason("nvme-tcp:h:99999/nqn.a").contains("from 1 to 65535"));
        assert!(reason("nvme-tcp:h:4420/").contains("missing subsystem NQN"));
        assert!(reason("nvme-tcp:h:4420//ns=1").contains("missing subsystem NQN"));
        assert!(reason(&format!("nvme-tcp:h:4420/{}", "n".repeat(224))).contains("1 to 223 bytes"));
        assert!(reason("nvme-tcp:h:4420/nqn.a/nsid=1").contains("expected /ns="));
        assert!(reason("nvme-tcp:h:4420/nqn.a/ns=0").contains("from 1 to"));
        assert!(reason("nvme-tcp:h:4420/nqn.a?qd=0")
            .contains("qd=\"0\" is not a number from 1 to 1024"));
        assert!(reason("nvme-tcp:h:4420/nqn.a?qd=2000").contains("from 1 to 1024"));
        assert!(reason("nvme-tcp:h:4420/nqn.a?digest=crc").contains("none, header, data or both"));
        assert!(reason("nvme-tcp:h:4420/nqn.a?hostnqn=a\tb").contains("printable ASCII"));
        let r = reason("nvme-tcp:h:4420/nqn.a?bs=512");
        assert!(
            r.contains("unknown option \"bs\" for nvme-tcp:") && r.contains("hostnqn, qd, digest"),
            "{r}"
        );
        assert!(reason("nvme-tcp:h:4420/nqn.a?qd=1&qd=2").contains("given twice"));
        assert!(reason("nvmetcp:h:4420/nqn.a").contains("nvme-tcp"));
    }

    #[test]
    fn open_mem() {
        let dev = open_device("mem:1M?bs=512").unwrap();
        assert_eq!(dev.geometry().block_size, 512);
        assert_eq!(dev.geometry().size_bytes(), 1 << 20);
        assert!(matches!(open_device("mem:x"), Err(Error::BadSpec { .. })));
    }
}
