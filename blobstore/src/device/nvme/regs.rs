//! Controller registers (BAR0) and the enable/disable handshake.
//!
//! Invariants:
//! - Every register access goes through [`Bar`]: volatile MMIO on hardware,
//!   a software controller model in unit tests. Nothing else touches BAR0.
//! - `CC.EN` changes only after `CSTS.RDY` has settled to the previous value,
//!   and every wait is bounded by the timeout `CAP.TO` gives.
//! - Doorbell offsets are computed from `CAP.DSTRD`, never assumed.

use std::time::{Duration, Instant};

use crate::device::Iova;
use crate::error::{Error, Result};

/// Controller Capabilities (64 bits).
pub const CAP: usize = 0x00;
/// Version.
pub const VS: usize = 0x08;
/// Interrupt Mask Set.
pub const INTMS: usize = 0x0C;
/// Controller Configuration.
pub const CC: usize = 0x14;
/// Controller Status.
pub const CSTS: usize = 0x1C;
/// Admin Queue Attributes.
pub const AQA: usize = 0x24;
/// Admin Submission Queue base (64 bits).
pub const ASQ: usize = 0x28;
/// Admin Completion Queue base (64 bits).
pub const ACQ: usize = 0x30;
/// First doorbell.
pub const DOORBELLS: usize = 0x1000;

/// CC.EN.
pub const CC_EN: u32 = 1;
/// CSTS.RDY.
pub const CSTS_RDY: u32 = 1;
/// CSTS.CFS: controller fatal status.
pub const CSTS_CFS: u32 = 1 << 1;

/// 32- and 64-bit access to the controller's register space.
pub trait Bar: Send + Sync {
    /// Reads the 32-bit register at byte offset `off`.
    fn read32(&self, off: usize) -> u32;
    /// Writes the 32-bit register at byte offset `off`.
    fn write32(&self, off: usize, val: u32);
    /// Reads a 64-bit register as two 32-bit halves, low first (the
    /// controller must accept that; some do not take 64-bit accesses).
    fn read64(&self, off: usize) -> u64 {
        self.read32(off) as u64 | (self.read32(off + 4) as u64) << 32
    }
    /// Writes a 64-bit register as two halves, low first.
    fn write64(&self, off: usize, val: u64) {
        self.write32(off, val as u32);
        self.write32(off + 4, (val >> 32) as u32);
    }
}

/// The fields of CAP the driver uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Maximum entries per queue (MQES + 1).
    pub max_queue_entries: u32,
    /// Worst-case time to become ready or not ready.
    pub timeout: Duration,
    /// Bytes between doorbells (4 << DSTRD).
    pub doorbell_stride: usize,
    /// Smallest memory page size, in bytes.
    pub min_page_size: usize,
    /// Largest memory page size, in bytes.
    pub max_page_size: usize,
    /// True when the NVM command set is supported (CSS bit 0).
    pub nvm_command_set: bool,
}

impl Capabilities {
    /// Decodes the raw CAP register.
    pub fn decode(cap: u64) -> Capabilities {
        let to_500ms = (cap >> 24) & 0xff;
        Capabilities {
            max_queue_entries: (cap & 0xffff) as u32 + 1,
            // TO = 0 would mean "no wait"; give a broken value some slack.
            timeout: Duration::from_millis(500 * to_500ms.max(1)),
            doorbell_stride: 4 << ((cap >> 32) & 0xf),
            min_page_size: 1 << (12 + ((cap >> 48) & 0xf)),
            max_page_size: 1 << (12 + ((cap >> 52) & 0xf)),
            nvm_command_set: (cap >> 37) & 1 == 1,
        }
    }

    /// Offset of queue `qid`'s submission tail doorbell.
    pub fn sq_doorbell(&self, qid: u16) -> usize {
        DOORBELLS + (2 * qid as usize) * self.doorbell_stride
    }

    /// Offset of queue `qid`'s completion head doorbell.
    pub fn cq_doorbell(&self, qid: u16) -> usize {
        DOORBELLS + (2 * qid as usize + 1) * self.doorbell_stride
    }
}

/// CC for enabling: NVM command set, 4 KiB pages, round robin, 64-byte
/// submission and 16-byte completion entries.
pub fn cc_enable_value() -> u32 {
    let css_nvm = 0 << 4;
    let mps_4k = 0 << 7;
    let ams_rr = 0 << 11;
    let iosqes = 6 << 16;
    let iocqes = 4 << 20;
    css_nvm | mps_4k | ams_rr | iosqes | iocqes | CC_EN
}

/// Waits until `CSTS.RDY` equals `ready`, up to `timeout`.
pub fn wait_ready(bar: &dyn Bar, ready: bool, timeout: Duration, what: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        let csts = bar.read32(CSTS);
        if csts == u32::MAX {
            return Err(Error::DeviceFailed {
                device: what.into(),
                reason: "registers read all ones (device gone?)".into(),
            });
        }
        if (csts & CSTS_RDY != 0) == ready {
            return Ok(());
        }
        if ready && csts & CSTS_CFS != 0 {
            return Err(Error::DeviceFailed {
                device: what.into(),
                reason: "controller fatal status while enabling".into(),
            });
        }
        if start.elapsed() > timeout {
            return Err(Error::DeviceFailed {
                device: what.into(),
                reason: format!(
                    "CSTS.RDY did not become {} within {:?} (CSTS={csts:#x})",
                    ready as u8, timeout
                ),
            });
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Disables the controller (a controller reset) and waits for not-ready.
/// Every queue, admin included, is gone afterwards.
pub fn disable(bar: &dyn Bar, cap: &Capabilities, what: &str) -> Result<()> {
    let cc = bar.read32(CC);
    if cc & CC_EN != 0 {
        // Wait out a pending enable first: clearing EN while RDY is still 0
        // after setting EN is undefined for some controllers.
        let _ = wait_ready(bar, true, cap.timeout, what);
        bar.write32(CC, cc & !CC_EN);
    }
    wait_ready(bar, false, cap.timeout, what)
}

/// Programs the admin queues (`entries` each) and enables the controller.
pub fn enable(
    bar: &dyn Bar,
    cap: &Capabilities,
    asq: Iova,
    acq: Iova,
    entries: u32,
    what: &str,
) -> Result<()> {
    debug_assert!((2..=4096).contains(&entries));
    let n = entries - 1;
    bar.write32(AQA, n << 16 | n);
    bar.write64(ASQ, asq.0);
    bar.write64(ACQ, acq.0);
    // Polled driver: mask every interrupt vector.
    bar.write32(INTMS, u32::MAX);
    bar.write32(CC, cc_enable_value());
    wait_ready(bar, true, cap.timeout, what)
}

/// Volatile access to a mapped BAR.
pub struct MmioBar {
    base: *mut u8,
    len: usize,
}

// SAFETY: MMIO registers are safe to access from any thread; every access is
// a single volatile load or store of an aligned u32.
unsafe impl Send for MmioBar {}
// SAFETY: as above.
unsafe impl Sync for MmioBar {}

impl MmioBar {
    /// Wraps a mapping of `len` bytes of device registers.
    ///
    /// # Safety
    /// `base` must be a live mapping of the BAR of at least `len` bytes that
    /// outlives this value, aligned to 4 bytes.
    pub unsafe fn new(base: *mut u8, len: usize) -> MmioBar {
        MmioBar { base, len }
    }

    fn reg(&self, off: usize) -> *mut u32 {
        assert!(
            off.is_multiple_of(4) && off + 4 <= self.len,
            "register {off:#x} out of the BAR"
        );
        // SAFETY: bounds checked above; the mapping is `len` bytes long.
        unsafe { self.base.add(off).cast::<u32>() }
    }
}

impl Bar for MmioBar {
    fn read32(&self, off: usize) -> u32 {
        // SAFETY: `reg` is an aligned register inside the live mapping.
        unsafe { std::ptr::read_volatile(self.reg(off)) }
    }
    fn write32(&self, off: usize, val: u32) {
        // SAFETY: as for `read32`.
        unsafe { std::ptr::write_volatile(self.reg(off), val) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_fields_decode() {
        // MQES=2047, CQR, TO=15 (7.5 s), DSTRD=1, CSS NVM, MPSMIN 0, MPSMAX 4.
        let cap: u64 = 2047 | 1 << 16 | 15 << 24 | 1 << 32 | 1 << 37 | 4 << 52;
        let c = Capabilities::decode(cap);
        assert_eq!(c.max_queue_entries, 2048);
        assert_eq!(c.timeout, Duration::from_millis(7500));
        assert_eq!(c.doorbell_stride, 8);
        assert_eq!(c.min_page_size, 4096);
        assert_eq!(c.max_page_size, 65536);
        assert!(c.nvm_command_set);
        assert_eq!(c.sq_doorbell(0), 0x1000);
        assert_eq!(c.cq_doorbell(0), 0x1008);
        assert_eq!(c.sq_doorbell(3), 0x1000 + 6 * 8);
        assert_eq!(c.cq_doorbell(3), 0x1000 + 7 * 8);
    }

    #[test]
    fn cc_enable_sets_entry_sizes() {
        let cc = cc_enable_value();
        assert_eq!(cc & 1, 1);
        assert_eq!((cc >> 16) & 0xf, 6);
        assert_eq!((cc >> 20) & 0xf, 4);
        assert_eq!((cc >> 7) & 0xf, 0);
    }
}
