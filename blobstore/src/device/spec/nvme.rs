//! `nvme:<DDDD:BB:DD.F>[/ns=<n>]`: the spec of a namespace of a PCI NVMe
//! controller (the userspace driver over VFIO), parsed and printed, with
//! its [`PciAddress`].
//!
//! Invariants: a PCI address has 4, 2, 2 and 1 hex digits, a device
//! number up to 0x1f and a function up to 7; it prints in lower case, and
//! `/ns=` is left out for namespace 1.

use std::fmt;

use super::{parse_namespace, DeviceSpec, DEFAULT_NVME_NAMESPACE};

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

/// Parses what follows `nvme:`.
pub(super) fn parse(rest: &str) -> std::result::Result<DeviceSpec, String> {
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

/// Writes the spec of namespace `namespace` of the controller at `addr`
/// (in the form [`parse`] reads).
pub(super) fn write(f: &mut fmt::Formatter<'_>, addr: &PciAddress, namespace: u32) -> fmt::Result {
    write!(f, "nvme:{addr}")?;
    if namespace != DEFAULT_NVME_NAMESPACE {
        write!(f, "/ns={namespace}")?;
    }
    Ok(())
}
