//! One namespace as a [`BlockDevice`] ([`NvmeDevice`]), and a thread's
//! channel on it ([`NamespaceBackend`]): its share of the thread's queue
//! pair on the controller.
//!
//! Invariant: a thread has one queue pair per controller, shared by its
//! channels on every namespace of it, created with the first and deleted
//! with the last.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::cmd::{cns, NamespaceIdentity};

use super::controller::NamespaceClaim;
use super::io::NvmeBackend;
use super::*;

/// One namespace of an NVMe controller as a [`BlockDevice`].
pub struct NvmeDevice {
    ctrl: Arc<NvmeController>,
    nsid: u32,
    geometry: Geometry,
    dsm: bool,
    write_zeroes: bool,
    id: DeviceId,
    /// Held when opened through [`NvmeDevice::open`].
    _claim: Option<NamespaceClaim>,
}

impl NvmeDevice {
    /// Namespace `nsid` of the controller at PCI address `pci` (bound to
    /// vfio-pci). The spec form is `nvme:<pci>[/ns=<n>]`. Fails with
    /// [`Error::Busy`] ("in use") while this process has the namespace open
    /// through another `NvmeDevice::open`, or another process holds the
    /// controller's VFIO group.
    pub fn open(pci: &str, nsid: u32) -> Result<NvmeDevice> {
        let claim = NamespaceClaim::take(pci, nsid)?;
        let mut dev = NvmeDevice::from_controller(NvmeController::open(pci)?, nsid)?;
        dev._claim = Some(claim);
        Ok(dev)
    }

    /// Namespace `nsid` of an attached controller. Takes no claim: the
    /// caller decides who else may use the namespace (tests share one).
    pub fn from_controller(ctrl: Arc<NvmeController>, nsid: u32) -> Result<NvmeDevice> {
        if nsid == 0 || nsid > ctrl.identity.nn {
            return Err(Error::InvalidArgument(format!(
                "{}: namespace {nsid} does not exist (the controller has {})",
                ctrl.name, ctrl.identity.nn
            )));
        }
        let page = ctrl.identify(cns::NAMESPACE, nsid)?;
        let ns = NamespaceIdentity::parse(&page)?.ok_or_else(|| {
            Error::InvalidArgument(format!("{}: namespace {nsid} is not active", ctrl.name))
        })?;
        if ns.metadata_bytes != 0 || !(ns.block_size == 512 || ns.block_size == 4096) {
            return Err(Error::Unsupported(format!(
                "{}: namespace {nsid} has {}-byte blocks with {} metadata bytes (512 or 4096 \
                 without metadata supported)",
                ctrl.name, ns.block_size, ns.metadata_bytes
            )));
        }
        Ok(NvmeDevice::with_shape(
            ctrl,
            nsid,
            ns.block_size,
            ns.size_blocks,
            ns.deallocated_reads_zeroes,
        ))
    }

    /// A device for namespace `nsid` with the given shape, trusted without
    /// asking the controller: for exercising the controller's own checks
    /// (an unknown namespace, an LBA past the end). For tests only.
    #[doc(hidden)]
    pub fn unchecked(ctrl: Arc<NvmeController>, nsid: u32, block_size: u32, blocks: u64) -> Self {
        NvmeDevice::with_shape(ctrl, nsid, block_size, blocks, false)
    }

    fn with_shape(
        ctrl: Arc<NvmeController>,
        nsid: u32,
        block_size: u32,
        blocks: u64,
        dealloc_zeroes: bool,
    ) -> NvmeDevice {
        let dsm = ctrl.identity.supports_dsm();
        NvmeDevice {
            geometry: Geometry {
                block_size,
                block_count: blocks,
                max_transfer_bytes: ctrl.max_transfer_bytes as u32,
                unmap_reads_zeroes: dsm && dealloc_zeroes,
            },
            dsm,
            write_zeroes: ctrl.identity.supports_write_zeroes(),
            ctrl,
            nsid,
            id: DeviceId::fresh(),
            _claim: None,
        }
    }

    /// The controller.
    pub fn controller(&self) -> &Arc<NvmeController> {
        &self.ctrl
    }

    /// The namespace id.
    pub fn nsid(&self) -> u32 {
        self.nsid
    }

    /// True when Unmap is a Dataset Management deallocate (else
    /// unsupported).
    pub fn supports_unmap(&self) -> bool {
        self.dsm
    }

    /// True when Write Zeroes is the NVMe command (else emulated).
    pub fn native_write_zeroes(&self) -> bool {
        self.write_zeroes
    }
}

impl BlockDevice for NvmeDevice {
    fn geometry(&self) -> Geometry {
        self.geometry
    }
    fn id(&self) -> DeviceId {
        self.id
    }
    fn name(&self) -> String {
        format!("nvme:{}/ns={}", self.ctrl.name, self.nsid)
    }
    fn new_backend(&self) -> Result<Box<dyn ChannelBackend>> {
        Ok(Box::new(NamespaceBackend::new(self)?))
    }
    fn alloc_buf(&self, len_bytes: usize) -> Result<DmaBuf> {
        self.ctrl.pool.alloc(len_bytes)
    }
    fn alloc_buf_for_overwrite(&self, len_bytes: usize) -> Result<DmaBuf> {
        self.ctrl.pool.alloc_for_overwrite(len_bytes)
    }
    /// For a namespace opened through [`NvmeDevice::open`] (which holds it
    /// for this process alone): a file named by the controller's PCI
    /// address and the namespace, on hugetlbfs when the system has
    /// hugepages reserved and mounted (see [`crate::device::huge_unsynced_dir`]),
    /// else on tmpfs. Its owner maps it for DMA with
    /// [`BlockDevice::map_dma`], so appends go to the device from where
    /// they landed.
    fn unsynced_memory(&self) -> Option<std::path::PathBuf> {
        self._claim.as_ref()?;
        let dir = crate::device::huge_unsynced_dir().unwrap_or_else(crate::device::unsynced_dir);
        Some(dir.join(format!(
            "blobstack-nvme-{}-ns{}.unsynced",
            self.ctrl.name, self.nsid
        )))
    }
    /// Maps the memory in the controller's IOVA space (VFIO DMA map; on
    /// the software controller, its translation table).
    unsafe fn map_dma(
        &self,
        ptr: std::ptr::NonNull<u8>,
        len: usize,
    ) -> Result<Option<crate::device::DmaMapping>> {
        // SAFETY: the caller's promise is map_external's.
        unsafe { self.ctrl.pool.map_external(ptr, len) }.map(Some)
    }
}

thread_local! {
    /// This thread's queue pairs, one per controller (keyed by the
    /// controller's address, which the queue's `Arc` keeps alive).
    static THREAD_QUEUES: RefCell<Vec<(usize, Weak<RefCell<NvmeBackend>>)>> =
        const { RefCell::new(Vec::new()) };
}

/// A thread's channel on one namespace: its share ([`Owner`]) of the
/// thread's queue pair on the controller, created with the first channel
/// of the thread on any namespace of it and deleted with the last.
struct NamespaceBackend {
    queue: Rc<RefCell<NvmeBackend>>,
    owner: u16,
}

impl NamespaceBackend {
    pub(super) fn new(dev: &NvmeDevice) -> Result<NamespaceBackend> {
        let key = Arc::as_ptr(&dev.ctrl) as usize;
        let found = THREAD_QUEUES.with(|t| {
            t.borrow()
                .iter()
                .find(|(k, _)| *k == key)
                .and_then(|(_, w)| w.upgrade())
        });
        let queue = match found {
            Some(q) => q,
            None => {
                let q = Rc::new(RefCell::new(NvmeBackend::new(dev.ctrl.clone())?));
                THREAD_QUEUES.with(|t| {
                    let mut t = t.borrow_mut();
                    t.retain(|(_, w)| w.strong_count() > 0);
                    t.push((key, Rc::downgrade(&q)));
                });
                q
            }
        };
        let owner = queue
            .borrow_mut()
            .add_owner(dev.nsid, dev.geometry.block_size as u64);
        Ok(NamespaceBackend { queue, owner })
    }
}

impl ChannelBackend for NamespaceBackend {
    #[inline]
    fn submit(&mut self, tag: Tag, op: &IoOp) -> Result<()> {
        let mut q = self.queue.borrow_mut();
        q.cur = self.owner;
        q.submit(tag, op)
    }

    #[inline]
    fn reap(&mut self, done: &mut dyn FnMut(Tag, Result<()>)) -> usize {
        let mut q = self.queue.borrow_mut();
        q.cur = self.owner;
        q.reap(done)
    }

    fn wait(&mut self) -> bool {
        let mut q = self.queue.borrow_mut();
        // Another namespace's finished ops of this thread wait in their
        // owner's list: this owner's reap reports its own at once.
        if !q.owners[self.owner as usize].ready.is_empty() {
            return true;
        }
        q.wait()
    }
}

impl Drop for NamespaceBackend {
    fn drop(&mut self) {
        let mut q = self.queue.borrow_mut();
        q.cur = self.owner;
        // The queue outlives this channel: its ops' memory must not be
        // released while the controller may still reach it, so wait for
        // them (timeouts, aborts and resets bound the wait); a wedged
        // controller keeps it.
        while q.owner_busy(self.owner) && q.ctrl.state.load(Ordering::Acquire) != state::WEDGED {
            q.reap(&mut |_, _| {});
            std::hint::spin_loop();
        }
        let o = &mut q.owners[self.owner as usize];
        o.live = false;
        o.ops = Vec::new();
        let left = std::mem::take(&mut o.ready).len();
        q.ready_count -= left;
    }
}
