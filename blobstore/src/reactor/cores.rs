//! Core affinity: the cores a thread may run on ([`allowed_cores`]) and
//! pinning a reactor's thread to one. No reactor state: the loop (`local.rs`)
//! pins its thread, the set (`set.rs`) checks placements against the mask.

use crate::error::{Error, Result};

/// Cores the calling thread may run on (its `sched_getaffinity` mask).
pub fn allowed_cores() -> Result<Vec<usize>> {
    // SAFETY: `cpu_set_t` is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe `set`, which outlives the call;
    // pid 0 is the calling thread.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(Error::last_os("sched_getaffinity"));
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` is below CPU_SETSIZE, inside the set.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Pins the calling thread to `core` (checked below CPU_SETSIZE by callers).
pub(super) fn pin_current_thread(core: usize) -> Result<()> {
    // SAFETY: as in `allowed_cores`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `core` < CPU_SETSIZE (checked by the builder), inside the set.
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: the pointer and size describe `set`; pid 0 is this thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        let source = std::io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::EINVAL) {
            let allowed = allowed_cores().unwrap_or_default();
            return Err(Error::InvalidArgument(format!(
                "core {core} is not in the cores this thread may use {allowed:?} ({source})"
            )));
        }
        return Err(Error::Os {
            context: format!("pinning a reactor to core {core}"),
            source,
        });
    }
    Ok(())
}
