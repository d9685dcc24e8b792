//! `nvme-setup`: prepares a machine for the userspace NVMe driver (the job
//! of SPDK's `scripts/setup.sh`). Run as root, once per boot.
//!
//! ```text
//! nvme-setup status                 NVMe functions, their drivers and use
//! nvme-setup bind <pci>|all [--force]  hand functions to vfio-pci
//! nvme-setup unbind <pci>|all       give them back to the kernel driver
//! nvme-setup hugepages <count>      reserve <count> 2 MiB hugepages
//! ```
//!
//! `bind` refuses a function whose namespaces are mounted, used as swap,
//! held by another block device (RAID, LVM, dm) or have mounted partitions,
//! unless `--force` is given.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const PCI: &str = "/sys/bus/pci/devices";
const NVME_CLASS: &str = "0x010802";

fn nvme_functions() -> Vec<String> {
    let mut out: Vec<String> = fs::read_dir(PCI)
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    fs::read_to_string(e.path().join("class")).is_ok_and(|c| c.trim() == NVME_CLASS)
                })
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn driver_of(pci: &str) -> Option<String> {
    fs::read_link(Path::new(PCI).join(pci).join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
}

fn iommu_group(pci: &str) -> Option<String> {
    fs::read_link(Path::new(PCI).join(pci).join("iommu_group"))
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
}

/// Block devices (namespaces and their partitions) the kernel made for `pci`.
fn block_devices(pci: &str) -> Vec<String> {
    let mut out = Vec::new();
    let nvme_dir = Path::new(PCI).join(pci).join("nvme");
    for ctrl in fs::read_dir(&nvme_dir).into_iter().flatten().flatten() {
        for ns in fs::read_dir(ctrl.path()).into_iter().flatten().flatten() {
            let name = ns.file_name().to_string_lossy().into_owned();
            if !name.starts_with("nvme") || !name.contains('n') || !ns.path().join("dev").exists() {
                continue;
            }
            for part in fs::read_dir(ns.path()).into_iter().flatten().flatten() {
                let p = part.file_name().to_string_lossy().into_owned();
                if p.starts_with(&name) {
                    out.push(p);
                }
            }
            out.push(name);
        }
    }
    out
}

/// Why the function must not be taken from the kernel, if it is in use.
fn in_use(pci: &str) -> Vec<String> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let swaps = fs::read_to_string("/proc/swaps").unwrap_or_default();
    let mut why = Vec::new();
    for dev in block_devices(pci) {
        let path = format!("/dev/{dev}");
        for line in mounts.lines() {
            let mut f = line.split_whitespace();
            if f.next() == Some(path.as_str()) {
                why.push(format!("{path} is mounted on {}", f.next().unwrap_or("?")));
            }
        }
        if swaps
            .lines()
            .any(|l| l.split_whitespace().next() == Some(path.as_str()))
        {
            why.push(format!("{path} is in use as swap"));
        }
        let holders = PathBuf::from("/sys/class/block").join(&dev).join("holders");
        for h in fs::read_dir(holders).into_iter().flatten().flatten() {
            why.push(format!(
                "{path} is held by {}",
                h.file_name().to_string_lossy()
            ));
        }
    }
    why
}

fn write(path: impl AsRef<Path>, val: &str) -> Result<(), String> {
    fs::write(path.as_ref(), val)
        .map_err(|e| format!("writing {val:?} to {}: {e}", path.as_ref().display()))
}

fn bind(pci: &str, force: bool) -> Result<(), String> {
    let dir = Path::new(PCI).join(pci);
    if !dir.exists() {
        return Err(format!("{pci}: no such PCI function"));
    }
    if driver_of(pci).as_deref() == Some("vfio-pci") {
        println!(
            "{pci}: already bound to vfio-pci (/dev/vfio/{})",
            iommu_group(pci).unwrap_or_default()
        );
        return Ok(());
    }
    let why = in_use(pci);
    if !why.is_empty() {
        if !force {
            return Err(format!(
                "{pci} is in use, not binding (use --force to override):\n  {}",
                why.join("\n  ")
            ));
        }
        eprintln!(
            "{pci}: in use, binding anyway (--force): {}",
            why.join("; ")
        );
    }
    if iommu_group(pci).is_none() {
        return Err(format!(
            "{pci}: no IOMMU group (enable the IOMMU: intel_iommu=on / amd_iommu=on)"
        ));
    }
    if !Path::new("/sys/bus/pci/drivers/vfio-pci").exists() {
        let _ = std::process::Command::new("modprobe")
            .arg("vfio-pci")
            .status();
        if !Path::new("/sys/bus/pci/drivers/vfio-pci").exists() {
            return Err("the vfio-pci driver is not loaded (modprobe vfio-pci)".into());
        }
    }
    write(dir.join("driver_override"), "vfio-pci")?;
    if let Some(d) = driver_of(pci) {
        write(dir.join("driver").join("unbind"), pci)?;
        println!("{pci}: unbound from {d}");
    }
    write("/sys/bus/pci/drivers_probe", pci)?;
    match driver_of(pci).as_deref() {
        Some("vfio-pci") => {
            let g = iommu_group(pci).unwrap_or_default();
            println!("{pci}: bound to vfio-pci, /dev/vfio/{g}");
            Ok(())
        }
        other => Err(format!(
            "{pci}: bind to vfio-pci failed (driver now {other:?})"
        )),
    }
}

fn unbind(pci: &str) -> Result<(), String> {
    let dir = Path::new(PCI).join(pci);
    write(dir.join("driver_override"), "\n")?;
    if driver_of(pci).is_some() {
        write(dir.join("driver").join("unbind"), pci)?;
    }
    let _ = write("/sys/bus/pci/drivers_probe", pci);
    println!("{pci}: now bound to {:?}", driver_of(pci));
    Ok(())
}

fn hugepages(count: u64) -> Result<(), String> {
    let path = "/proc/sys/vm/nr_hugepages";
    write(path, &count.to_string())?;
    let got: u64 = fs::read_to_string(path)
        .map_err(|e| e.to_string())?
        .trim()
        .parse()
        .unwrap_or(0);
    println!("hugepages: {got} x 2 MiB reserved ({} MiB)", got * 2);
    if got < count {
        return Err(format!(
            "only {got} of {count} hugepages could be reserved (memory fragmented?)"
        ));
    }
    if got > 0 {
        mount_hugetlbfs()?;
    }
    Ok(())
}

/// Where hugepage files go: BlobFS keeps the unsynced data of `nvme:`
/// devices there (DMA memory that outlives the process), so a hugetlbfs of
/// 2 MiB pages must be mounted. Mounts one at `/dev/hugepages` if none is.
fn mount_hugetlbfs() -> Result<(), String> {
    if let Some(dir) = blobstore::device::huge_unsynced_dir() {
        println!("hugetlbfs: {}", dir.display());
        return Ok(());
    }
    if std::env::var_os(blobstore::device::UNSYNCED_DIR_ENV).is_some() {
        return Ok(());
    }
    let dir = "/dev/hugepages";
    fs::create_dir_all(dir).map_err(|e| format!("creating {dir}: {e}"))?;
    // SAFETY: NUL-terminated strings; no memory is handed over.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            c"/dev/hugepages".as_ptr(),
            c"hugetlbfs".as_ptr(),
            0,
            c"pagesize=2M,mode=1770".as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "mounting hugetlbfs at {dir}: {}",
            std::io::Error::last_os_error()
        ));
    }
    println!("hugetlbfs: mounted at {dir}");
    Ok(())
}

fn status() {
    let fns = nvme_functions();
    if fns.is_empty() {
        println!("no NVMe functions (PCI class {NVME_CLASS})");
    }
    for pci in fns {
        let why = in_use(&pci);
        println!(
            "{pci}  driver {:<10} iommu group {:<4} {}",
            driver_of(&pci).unwrap_or_else(|| "-".into()),
            iommu_group(&pci).unwrap_or_else(|| "-".into()),
            if why.is_empty() {
                "not in use".to_string()
            } else {
                why.join("; ")
            }
        );
    }
    let huge = fs::read_to_string("/proc/sys/vm/nr_hugepages").unwrap_or_default();
    println!("hugepages reserved: {}", huge.trim());
    println!(
        "unsynced memory of nvme: devices: {}",
        blobstore::device::huge_unsynced_dir()
            .unwrap_or_else(blobstore::device::unsynced_dir)
            .display()
    );
}

fn targets(arg: &str) -> Vec<String> {
    if arg == "all" {
        nvme_functions()
    } else {
        vec![arg.to_string()]
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let force = args.iter().any(|a| a == "--force");
    let pos: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(|s| s.as_str())
        .collect();
    let res = match pos.as_slice() {
        ["status"] | [] => {
            status();
            Ok(())
        }
        ["bind", what] => targets(what).iter().try_for_each(|p| bind(p, force)),
        ["unbind", what] => targets(what).iter().try_for_each(|p| unbind(p)),
        ["hugepages", n] => n.parse().map_err(|e| format!("count {n:?}: {e}")).and_then(hugepages),
        _ => Err("usage: nvme-setup status | bind <pci>|all [--force] | unbind <pci>|all | hugepages <count>".into()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nvme-setup: {e}");
            ExitCode::FAILURE
        }
    }
}
