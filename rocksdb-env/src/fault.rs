//! A fault-injecting wrapper under BlobFS, for the error-path tests.
//!
//! `blobfs://<spec>;fault_injection=on` mounts BlobFS on a [`FaultDevice`]
//! around the real device. While disarmed it passes every operation through
//! unchanged. Armed with [`FaultControl::fail_writes_after`], it lets `n`
//! more device writes (and flushes) through and then fails every later one
//! with an I/O error until disarmed, the way a dying disk does. With
//! [`FaultControl::stall_reads`] every device read takes at least that long
//! to complete, the way a disk retrying a bad sector does (for RocksDB's
//! read time limits).
//!
//! Invariant: an injected failure is reported at submit time, so the device
//! under the wrapper never sees a failed operation (nothing half-written).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blobstore::device::{BlockDevice, ChannelBackend, DeviceId, Geometry, IoKind, IoOp, Tag};
use blobstore::{DmaBuf, Result};

/// Shared switch of one [`FaultDevice`].
#[derive(Debug, Default)]
pub struct FaultControl {
    armed: AtomicBool,
    /// Writes still allowed while armed.
    allowance: AtomicU64,
    /// Operations failed so far.
    injected: AtomicU64,
    /// Least time a read takes, in microseconds (0: as the device answers).
    read_stall_us: AtomicU64,
}

impl FaultControl {
    /// After `n` more device writes or flushes, fail every later one.
    pub fn fail_writes_after(&self, n: u64) {
        self.allowance.store(n, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }

    /// Let every operation through again.
    pub fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }

    /// Make every device read submitted from now on complete no sooner than
    /// `stall` after its submission (`Duration::ZERO` to stop).
    pub fn stall_reads(&self, stall: Duration) {
        let us = u64::try_from(stall.as_micros()).unwrap_or(u64::MAX);
        self.read_stall_us.store(us, Ordering::SeqCst);
    }

    /// How many operations were failed on purpose.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    /// True if this write or flush must fail.
    fn should_fail(&self) -> bool {
        if !self.armed.load(Ordering::Acquire) {
            return false;
        }
        let allowed = self
            .allowance
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| a.checked_sub(1))
            .is_ok();
        if !allowed {
            self.injected.fetch_add(1, Ordering::AcqRel);
        }
        !allowed
    }
}

/// A device that forwards to `inner` and fails writes when told to.
pub struct FaultDevice {
    inner: Arc<dyn BlockDevice>,
    id: DeviceId,
    control: Arc<FaultControl>,
}

impl FaultDevice {
    /// Wraps `inner`; the returned control arms and disarms it.
    pub fn wrap(inner: Arc<dyn BlockDevice>) -> (Arc<FaultDevice>, Arc<FaultControl>) {
        let control = Arc::new(FaultControl::default());
        let dev = Arc::new(FaultDevice {
            inner,
            id: DeviceId::fresh(),
            control: control.clone(),
        });
        (dev, control)
    }
}

impl BlockDevice for FaultDevice {
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn id(&self) -> DeviceId {
        self.id
    }
    fn name(&self) -> String {
        format!("{} (fault injection)", self.inner.name())
    }
    fn new_backend(&self) -> Result<Box<dyn ChannelBackend>> {
        Ok(Box::new(FaultBackend {
            inner: self.inner.new_backend()?,
            control: self.control.clone(),
            stalled: Vec::new(),
            held: Vec::new(),
        }))
    }
    fn alloc_buf(&self, len_bytes: usize) -> Result<DmaBuf> {
        self.inner.alloc_buf(len_bytes)
    }
    // Safe to pass on: a failure is refused before the device starts the
    // op, and a stalled read completes only after the device did.
    fn reads_into_any_memory(&self) -> bool {
        self.inner.reads_into_any_memory()
    }
}

struct FaultBackend {
    inner: Box<dyn ChannelBackend>,
    control: Arc<FaultControl>,
    /// Stalled reads in flight: tag and the moment it may complete.
    stalled: Vec<(Tag, Instant)>,
    /// Completions of stalled reads not yet due.
    held: Vec<(Tag, Result<()>, Instant)>,
}

impl ChannelBackend for FaultBackend {
    fn submit(&mut self, tag: Tag, op: &IoOp) -> Result<()> {
        let is_write = matches!(op.kind, IoKind::Write | IoKind::Flush | IoKind::WriteZeroes);
        if is_write && self.control.should_fail() {
            return Err(op.error("injected fault (fault_injection=on)"));
        }
        self.inner.submit(tag, op)?;
        let stall = self.control.read_stall_us.load(Ordering::Acquire);
        if stall > 0 && matches!(op.kind, IoKind::Read) {
            self.stalled
                .push((tag, Instant::now() + Duration::from_micros(stall)));
        }
        Ok(())
    }
    fn reap(&mut self, done: &mut dyn FnMut(Tag, Result<()>)) -> usize {
        if self.stalled.is_empty() && self.held.is_empty() {
            return self.inner.reap(done);
        }
        let (stalled, held) = (&mut self.stalled, &mut self.held);
        let mut n = self.inner.reap(&mut |tag, result| match stalled
            .iter()
            .position(|(t, _)| *t == tag)
        {
            Some(i) => {
                let (_, due) = stalled.swap_remove(i);
                held.push((tag, result, due));
            }
            None => done(tag, result),
        });
        let now = Instant::now();
        let mut i = 0;
        while i < self.held.len() {
            if self.held[i].2 <= now {
                let (tag, result, _) = self.held.swap_remove(i);
                done(tag, result);
                n += 1;
            } else {
                i += 1;
            }
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blobfs::{BlobFs, MkfsOptions, MountOptions};
    use blobstore::device::MemDevice;

    #[test]
    fn armed_device_fails_writes_until_disarmed() {
        let mem: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 20, 4096).unwrap());
        let (dev, control) = FaultDevice::wrap(mem);
        let fs = BlobFs::mkfs(dev, MkfsOptions::default(), MountOptions::default()).unwrap();
        let f = fs.create("a").unwrap();
        f.append(b"kept").unwrap();
        f.sync().unwrap();

        control.fail_writes_after(0);
        // The append may fail at once or leave the failure to the sync.
        let _ = f.append(&[7u8; 8192]);
        assert!(f.sync().is_err(), "sync on a failing device must fail");
        assert!(control.injected() > 0);

        control.disarm();
        let g = fs.create("b").unwrap();
        g.append(b"fine").unwrap();
        g.sync().unwrap();
        assert_eq!(f.read_at(0, &mut [0u8; 4]).unwrap(), 4);
    }
}
