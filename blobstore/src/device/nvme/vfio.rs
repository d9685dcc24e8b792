//! VFIO glue: the process's one container, opening a PCI function, BAR0,
//! bus mastering, and the DMA mapper over the container.
//!
//! Invariants:
//! - The process has one VFIO container; every controller's group joins it,
//!   so every DMA pool buffer is visible to every controller at one IOVA.
//! - A controller, once attached, stays attached for the life of the
//!   process (its group keeps the container's IOMMU, hence the pool's
//!   mappings, alive).
//! - BAR0 is only reached through [`Bar`]: an mmap when the kernel allows
//!   it, else `pread`/`pwrite` on the device fd.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};

use super::dma::{DmaMapper, DmaPool};
use super::regs::{Bar, MmioBar};
use crate::device::Iova;
use crate::error::{Error, Result};

const BAR0: u32 = 0;
const CONFIG: u32 = 7;
const REGION_FLAG_MMAP: u32 = 1 << 2;
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
const PCI_CLASS_NVME: u32 = 0x010802;

struct Global {
    container: Arc<VfioContainer>,
    pool: Option<Arc<DmaPool>>,
}

static GLOBAL: Mutex<Option<Global>> = Mutex::new(None);

struct ContainerMapper(Arc<VfioContainer>);

impl DmaMapper for ContainerMapper {
    unsafe fn map(&self, va: *mut u8, len: usize, iova: Iova) -> Result<()> {
        // SAFETY: the caller keeps the memory allocated until unmap and
        // never makes a Rust reference to it while mapped.
        unsafe { self.0.vfio_dma_map(iova.0, len, va) }.map_err(|e| Error::Os {
            context: format!("VFIO DMA map of {len} bytes at IOVA {:#x}: {e}", iova.0),
            source: std::io::Error::other(e.to_string()),
        })
    }
    fn unmap(&self, iova: Iova, len: usize) -> Result<()> {
        self.0.vfio_dma_unmap(iova.0, len).map_err(|e| Error::Os {
            context: format!("VFIO DMA unmap at IOVA {:#x}", iova.0),
            source: std::io::Error::other(e.to_string()),
        })
    }
}

/// An opened PCI function: the VFIO device and its register access.
pub struct VfioPci {
    /// Register access (BAR0).
    pub bar: Arc<dyn Bar>,
    /// The process-wide DMA pool (valid for this device).
    pub pool: Arc<DmaPool>,
    /// Keeps the VFIO device (and its group in the container) open.
    _device: Arc<VfioDevice>,
    mmap: Option<(*mut u8, usize)>,
}

// SAFETY: the raw mmap pointer is only unmapped in Drop; MMIO access is
// thread-safe.
unsafe impl Send for VfioPci {}
// SAFETY: as above.
unsafe impl Sync for VfioPci {}

impl Drop for VfioPci {
    fn drop(&mut self) {
        if let Some((p, len)) = self.mmap {
            // SAFETY: mapped in `open` with this length; the BAR users (the
            // controller) are dropped before this struct's owner lets go.
            unsafe { libc::munmap(p.cast(), len) };
        }
    }
}

fn sysfs(pci: &str) -> PathBuf {
    PathBuf::from("/sys/bus/pci/devices").join(pci)
}

fn os_err(context: String) -> impl FnOnce(vfio_ioctls::VfioError) -> Error {
    move |e| Error::Os {
        context: format!("{context}: {e}"),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Register access through `pread`/`pwrite` on the device fd (when BAR0
/// cannot be mmapped).
struct RegionBar(Arc<VfioDevice>);

impl Bar for RegionBar {
    fn read32(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        self.0.region_read(BAR0, &mut b, off as u64);
        u32::from_le_bytes(b)
    }
    fn write32(&self, off: usize, val: u32) {
        self.0.region_write(BAR0, &val.to_le_bytes(), off as u64);
    }
}

/// Opens the PCI function at `pci` (e.g. `0000:00:04.0`), which must be
/// bound to vfio-pci and be an NVMe controller.
pub fn open(pci: &str) -> Result<VfioPci> {
    let path = sysfs(pci);
    let class = std::fs::read_to_string(path.join("class")).map_err(|e| Error::Os {
        context: format!("reading the PCI class of {pci} (no such device?)"),
        source: e,
    })?;
    let class = u32::from_str_radix(class.trim().trim_start_matches("0x"), 16).unwrap_or(0);
    if class != PCI_CLASS_NVME {
        return Err(Error::InvalidArgument(format!(
            "{pci} is PCI class {class:#08x}, not an NVMe controller (0x010802)"
        )));
    }
    let driver = std::fs::read_link(path.join("driver")).ok();
    if !driver.as_ref().is_some_and(|d| d.ends_with("vfio-pci")) {
        return Err(Error::Busy(format!(
            "{pci} is bound to {:?}, not vfio-pci (run nvme-setup bind {pci})",
            driver.and_then(|d| d.file_name().map(|f| f.to_string_lossy().into_owned()))
        )));
    }
    let mut g = GLOBAL.lock();
    if g.is_none() {
        let container =
            VfioContainer::new(None).map_err(os_err("opening /dev/vfio/vfio".into()))?;
        *g = Some(Global {
            container: Arc::new(container),
            pool: None,
        });
    }
    let global = g.as_mut().expect("set above");
    let ops: Arc<dyn VfioOps> = global.container.clone();
    let device =
        VfioDevice::new(&path, ops, false).map_err(os_err(format!("opening VFIO device {pci}")))?;
    let device = Arc::new(device);
    // The IOMMU is set up once a group is attached: only now can the pool map.
    let pool = global
        .pool
        .get_or_insert_with(|| {
            DmaPool::new(
                Box::new(ContainerMapper(global.container.clone())),
                DmaPool::system_has_hugepages(),
            )
        })
        .clone();
    drop(g);

    // Memory space and bus mastering on, so the controller can DMA.
    let mut cmd = [0u8; 2];
    device.region_read(CONFIG, &mut cmd, PCI_COMMAND);
    let val = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
    device.region_write(CONFIG, &val.to_le_bytes(), PCI_COMMAND);

    let size = device.get_region_size(BAR0) as usize;
    let offset = device.get_region_offset(BAR0);
    let mut mmap = None;
    if device.get_region_flags(BAR0) & REGION_FLAG_MMAP != 0 {
        // The whole BAR, else the register page and the first doorbells
        // (an MSI-X table later in the BAR may not be mappable).
        for len in [size, 0x2000.min(size)] {
            // SAFETY: a shared mapping of the device fd at the BAR's offset;
            // it is only accessed through `MmioBar` with volatile accesses.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    device.as_raw_fd(),
                    offset as libc::off_t,
                )
            };
            if p != libc::MAP_FAILED {
                mmap = Some((p.cast::<u8>(), len));
                break;
            }
        }
    }
    let bar: Arc<dyn Bar> = match mmap {
        // SAFETY: the mapping lives as long as the returned `VfioPci`, whose
        // owner (the controller) drops its `Bar` users first.
        Some((p, len)) => Arc::new(unsafe { MmioBar::new(p, len) }),
        None => Arc::new(RegionBar(device.clone())),
    };
    Ok(VfioPci {
        bar,
        pool,
        _device: device,
        mmap,
    })
}

impl VfioPci {
    /// True when BAR0 is memory-mapped (else register access is by syscall).
    pub fn bar_mmapped(&self) -> bool {
        self.mmap.is_some()
    }
}
