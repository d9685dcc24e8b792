//! Device spec strings (filled in by its own change).

use std::sync::Arc;

use super::{BlockDevice, MemDevice};
use crate::error::{Error, Result};

/// A parsed device spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSpec {
    /// `mem:<size>`
    Mem {
        /// Size in bytes.
        size_bytes: u64,
    },
}

/// Opens the device a spec names.
pub fn open_device(spec: &str) -> Result<Arc<dyn BlockDevice>> {
    match spec
        .strip_prefix("mem:")
        .and_then(|s| s.parse::<u64>().ok())
    {
        Some(n) => Ok(Arc::new(MemDevice::new(n, 4096)?)),
        None => Err(Error::BadSpec {
            spec: spec.into(),
            reason: "not yet".into(),
        }),
    }
}
