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
//! - Only IOMMU-protected VFIO is used: before anything is opened,
//!   [`check_group`] refuses a function without an IOMMU group, in a
//!   no-IOMMU group (`/dev/vfio/noiommu-N`, where the device could DMA
//!   anywhere in memory), or in a group that is not viable (another device
//!   of the group bound to a host driver). There is no no-IOMMU mode to ask
//!   for: the device can DMA only into the pool's mapped buffers.
//! - A VFIO group is opened by one process at a time (the kernel returns
//!   EBUSY to the second); that is reported as "in use", never retried.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};
use vmm_sys_util::eventfd::EventFd;

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
            context: format!(
                "VFIO DMA map of {len} bytes at IOVA {:#x}: {e} (VFIO pins DMA memory \
                 against the locked-memory limit, `ulimit -l`, {} for this process; \
                 `nvme-setup bind --user` says how to raise it)",
                iova.0,
                memlock_limit()
            ),
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

/// This process's locked-memory limit (RLIMIT_MEMLOCK), for messages.
fn memlock_limit() -> String {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) } != 0 {
        return "unknown".into();
    }
    if r.rlim_cur == libc::RLIM_INFINITY {
        "unlimited".into()
    } else {
        format!("{} KiB", r.rlim_cur / 1024)
    }
}

/// An opened PCI function: the VFIO device and its register access.
pub struct VfioPci {
    /// Register access (BAR0).
    pub bar: Arc<dyn Bar>,
    /// The process-wide DMA pool (valid for this device).
    pub pool: Arc<DmaPool>,
    /// Keeps the VFIO device (and its group in the container) open.
    device: Arc<VfioDevice>,
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

/// Where the kernel shows PCI functions, IOMMU groups and VFIO group
/// nodes: `/sys` and `/dev` on a real system, a temp dir in tests.
pub(crate) struct HostPaths {
    /// The sysfs root (`/sys`).
    pub sys: PathBuf,
    /// The device-node root (`/dev`).
    pub dev: PathBuf,
}

impl HostPaths {
    fn system() -> HostPaths {
        HostPaths {
            sys: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
        }
    }
    fn function(&self, pci: &str) -> PathBuf {
        self.sys.join("bus/pci/devices").join(pci)
    }
}

/// Drivers a device may have and still leave its group viable for VFIO
/// (the kernel's rule: VFIO drivers, pci-stub, and bridges' pcieport).
const VIABLE_DRIVERS: [&str; 3] = ["vfio-pci", "pci-stub", "pcieport"];

fn driver_name(function: &Path) -> Option<String> {
    let link = std::fs::read_link(function.join("driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Checks that `pci` sits in an IOMMU-protected, viable VFIO group whose
/// node exists, and returns the group number. See the module invariants.
pub(crate) fn check_group(paths: &HostPaths, pci: &str) -> Result<u32> {
    const ONLY: &str = "this driver uses only IOMMU-protected VFIO";
    let link = std::fs::read_link(paths.function(pci).join("iommu_group")).map_err(|_| {
        Error::Unsupported(format!(
            "{pci} has no IOMMU group: the IOMMU is off or absent (boot with intel_iommu=on or \
             amd_iommu=on); {ONLY}"
        ))
    })?;
    let name = link
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let group: u32 = name.parse().map_err(|_| {
        Error::Unsupported(format!(
            "{pci}: IOMMU group link {} does not end in a group number",
            link.display()
        ))
    })?;
    let group_dir = paths.sys.join("kernel/iommu_groups").join(&name);
    let group_kind = std::fs::read_to_string(group_dir.join("name")).unwrap_or_default();
    let noiommu_node = paths.dev.join(format!("vfio/noiommu-{group}"));
    if group_kind.trim() == "vfio-noiommu" || noiommu_node.exists() {
        return Err(Error::Unsupported(format!(
            "{pci} is in a no-IOMMU VFIO group ({}): without an IOMMU the device could DMA \
             anywhere in memory, and {ONLY} (turn the IOMMU on; vfio's \
             enable_unsafe_noiommu_mode is not supported)",
            noiommu_node.display()
        )));
    }
    if let Ok(entries) = std::fs::read_dir(group_dir.join("devices")) {
        let mut others: Vec<(String, String)> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let other = e.file_name().to_string_lossy().into_owned();
                let driver = driver_name(&e.path())?;
                (!VIABLE_DRIVERS.contains(&driver.as_str())).then_some((other, driver))
            })
            .collect();
        others.sort();
        if !others.is_empty() {
            let list: Vec<String> = others
                .iter()
                .map(|(o, d)| format!("{o} is bound to {d}"))
                .collect();
            return Err(Error::Busy(format!(
                "{pci}: VFIO group {group} is not viable: {} (bind every device of the group to \
                 vfio-pci with nvme-setup bind, or unbind it)",
                list.join(", ")
            )));
        }
    }
    let node = paths.dev.join(format!("vfio/{group}"));
    if !node.exists() {
        return Err(Error::Unsupported(format!(
            "{pci}: {} does not exist (is {pci} bound to vfio-pci? run nvme-setup bind {pci})",
            node.display()
        )));
    }
    Ok(group)
}

/// The error for a failed open of VFIO group `group`: EBUSY means another
/// process holds the group (the kernel lets one opener in at a time).
pub(crate) fn group_open_error(pci: &str, group: u32, e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::EBUSY) {
        return Error::Busy(format!(
            "nvme:{pci} is in use: its VFIO group /dev/vfio/{group} is held by another process"
        ));
    }
    Error::Os {
        context: format!("opening VFIO group /dev/vfio/{group} of {pci}"),
        source: e,
    }
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
    let host = HostPaths::system();
    let path = host.function(pci);
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
    let group = check_group(&host, pci)?;
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
    let device = VfioDevice::new(&path, ops, false).map_err(|e| match e {
        vfio_ioctls::VfioError::OpenGroup(io, _) => group_open_error(pci, group, io),
        vfio_ioctls::VfioError::GroupViable => Error::Busy(format!(
            "{pci}: VFIO group {group} is not viable (another device of the group is bound to a \
             host driver)"
        )),
        e => os_err(format!("opening VFIO device {pci}"))(e),
    })?;
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
        device,
        mmap,
    })
}

/// VFIO's interrupt index of MSI-X (`VFIO_PCI_MSIX_IRQ_INDEX`).
const MSIX_IRQ_INDEX: u32 = 2;

impl VfioPci {
    /// Connects MSI-X vectors `0..n` of the function to one eventfd each
    /// (non-blocking), `n` being `want` or the function's vector count if
    /// lower; the i-th eventfd counts vector i's interrupts. All at once:
    /// kernels before 6.5 cannot add vectors to enabled MSI-X later.
    pub fn enable_msix(&self, want: u32) -> Result<Vec<EventFd>> {
        let have = self
            .device
            .get_irq_info(MSIX_IRQ_INDEX)
            .map_or(0, |i| i.count);
        let n = want.min(have);
        if n == 0 {
            return Err(Error::Unsupported(
                "the function has no MSI-X vectors".into(),
            ));
        }
        let fds = (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| Error::Os {
                context: "creating eventfds for MSI-X".into(),
                source: e,
            })?;
        self.device
            .enable_msix(fds.iter().collect())
            .map_err(os_err(format!("enabling {n} MSI-X vectors")))?;
        Ok(fds)
    }

    /// True when BAR0 is memory-mapped (else register access is by syscall).
    pub fn bar_mmapped(&self) -> bool {
        self.mmap.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /sys and /dev under a temp dir (removed on drop).
    struct Host {
        root: PathBuf,
        paths: HostPaths,
    }

    impl Drop for Host {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    const PCI: &str = "0000:00:04.0";

    impl Host {
        fn new() -> Host {
            use std::sync::atomic::{AtomicU32, Ordering};
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let root = std::env::temp_dir().join(format!(
                "blobstore-vfio-host-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&root);
            let paths = HostPaths {
                sys: root.join("sys"),
                dev: root.join("dev"),
            };
            std::fs::create_dir_all(paths.sys.join("bus/pci/devices")).unwrap();
            std::fs::create_dir_all(paths.dev.join("vfio")).unwrap();
            Host { root, paths }
        }
        /// Adds function `pci` bound to `driver`, in IOMMU group `group`.
        fn function(&self, pci: &str, driver: &str, group: Option<u32>) {
            let f = self.paths.sys.join("devices/pci0000:00").join(pci);
            std::fs::create_dir_all(&f).unwrap();
            std::os::unix::fs::symlink(&f, self.paths.function(pci)).unwrap();
            let drv = self.paths.sys.join("bus/pci/drivers").join(driver);
            std::fs::create_dir_all(&drv).unwrap();
            std::os::unix::fs::symlink(&drv, f.join("driver")).unwrap();
            if let Some(g) = group {
                let gdir = self.paths.sys.join(format!("kernel/iommu_groups/{g}"));
                std::fs::create_dir_all(gdir.join("devices")).unwrap();
                std::os::unix::fs::symlink(&gdir, f.join("iommu_group")).unwrap();
                std::os::unix::fs::symlink(&f, gdir.join("devices").join(pci)).unwrap();
            }
        }
        fn node(&self, name: &str) {
            std::fs::write(self.paths.dev.join("vfio").join(name), b"").unwrap();
        }
        fn group_name(&self, group: u32, name: &str) {
            let gdir = self.paths.sys.join(format!("kernel/iommu_groups/{group}"));
            std::fs::write(gdir.join("name"), name).unwrap();
        }
    }

    fn refusal(h: &Host) -> String {
        check_group(&h.paths, PCI).unwrap_err().to_string()
    }

    #[test]
    fn a_protected_viable_group_passes() {
        let h = Host::new();
        h.function(PCI, "vfio-pci", Some(7));
        h.function("0000:00:04.1", "vfio-pci", Some(7));
        h.function("0000:00:01.0", "pcieport", Some(7));
        h.node("7");
        assert_eq!(check_group(&h.paths, PCI).unwrap(), 7);
    }

    #[test]
    fn no_iommu_group_is_refused() {
        let h = Host::new();
        h.function(PCI, "vfio-pci", None);
        assert_eq!(
            refusal(&h),
            "unsupported: 0000:00:04.0 has no IOMMU group: the IOMMU is off or absent (boot with \
             intel_iommu=on or amd_iommu=on); this driver uses only IOMMU-protected VFIO"
        );
    }

    #[test]
    fn a_no_iommu_group_is_refused() {
        // Seen two ways: the group's name, and the noiommu-N node.
        for by_name in [true, false] {
            let h = Host::new();
            h.function(PCI, "vfio-pci", Some(3));
            if by_name {
                h.group_name(3, "vfio-noiommu\n");
            } else {
                h.node("noiommu-3");
            }
            assert_eq!(
                refusal(&h),
                format!(
                    "unsupported: 0000:00:04.0 is in a no-IOMMU VFIO group ({}): without an \
                     IOMMU the device could DMA anywhere in memory, and this driver uses only \
                     IOMMU-protected VFIO (turn the IOMMU on; vfio's \
                     enable_unsafe_noiommu_mode is not supported)",
                    h.paths.dev.join("vfio/noiommu-3").display()
                )
            );
        }
    }

    #[test]
    fn a_group_shared_with_a_host_driver_is_not_viable() {
        let h = Host::new();
        h.function(PCI, "vfio-pci", Some(5));
        h.function("0000:00:04.1", "e1000e", Some(5));
        h.node("5");
        assert_eq!(
            refusal(&h),
            "busy: 0000:00:04.0: VFIO group 5 is not viable: 0000:00:04.1 is bound to e1000e \
             (bind every device of the group to vfio-pci with nvme-setup bind, or unbind it)"
        );
    }

    #[test]
    fn a_missing_group_node_is_named() {
        let h = Host::new();
        h.function(PCI, "vfio-pci", Some(9));
        assert_eq!(
            refusal(&h),
            format!(
                "unsupported: 0000:00:04.0: {} does not exist (is 0000:00:04.0 bound to \
                 vfio-pci? run nvme-setup bind 0000:00:04.0)",
                h.paths.dev.join("vfio/9").display()
            )
        );
    }

    #[test]
    fn a_group_held_elsewhere_is_in_use() {
        let busy = std::io::Error::from_raw_os_error(libc::EBUSY);
        assert_eq!(
            group_open_error(PCI, 7, busy).to_string(),
            "busy: nvme:0000:00:04.0 is in use: its VFIO group /dev/vfio/7 is held by another \
             process"
        );
        let gone = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert!(matches!(group_open_error(PCI, 7, gone), Error::Os { .. }));
    }
}
