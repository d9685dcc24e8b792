//! `nvme-tcp:<host>:<port>/<subsystem NQN>[/ns=<n>][?hostnqn=..&qd=..&digest=..]`:
//! the spec of a namespace of a remote controller over NVMe/TCP, parsed
//! and printed, with the NQN and queue-depth limits the transport checks
//! too (`crate::device::nvme::tcp` uses them from here).
//!
//! Invariants:
//! - The host is a name, an IPv4 address or a bracketed IPv6 address, and
//!   the port is required (1 to 65535).
//! - NQNs (the subsystem's and `hostnqn=`) are 1 to [`MAX_NQN_BYTES`] bytes
//!   of printable ASCII; `qd=` is 1 to [`MAX_TCP_QUEUE_DEPTH`].
//! - Printing leaves out what is at its default (namespace 1, no digests)
//!   and gives the options in one order (hostnqn, qd, digest), which
//!   [`parse`] reads back.

use std::fmt;

use super::{parse_namespace, parse_query, write_query, DeviceSpec, DEFAULT_NVME_NAMESPACE};

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
    /// The `digest=` value that asks for these digests.
    fn name(self) -> &'static str {
        match self {
            TcpDigest::None => "none",
            TcpDigest::Header => "header",
            TcpDigest::Data => "data",
            TcpDigest::Both => "both",
        }
    }
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

/// Parses what follows `nvme-tcp:`.
pub(super) fn parse(rest: &str) -> std::result::Result<DeviceSpec, String> {
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

/// Writes the spec of namespace `namespace` of subsystem `subnqn` at
/// `target` with its options (in the form [`parse`] reads).
pub(super) fn write(
    f: &mut fmt::Formatter<'_>,
    target: &str,
    subnqn: &str,
    namespace: u32,
    host_nqn: Option<&str>,
    queue_depth: Option<u16>,
    digest: TcpDigest,
) -> fmt::Result {
    write!(f, "nvme-tcp:{target}/{subnqn}")?;
    if namespace != DEFAULT_NVME_NAMESPACE {
        write!(f, "/ns={namespace}")?;
    }
    let mut opts = Vec::new();
    if let Some(h) = host_nqn {
        opts.push(format!("hostnqn={h}"));
    }
    if let Some(qd) = queue_depth {
        opts.push(format!("qd={qd}"));
    }
    if digest != TcpDigest::None {
        opts.push(format!("digest={}", digest.name()));
    }
    write_query(f, &opts)
}
