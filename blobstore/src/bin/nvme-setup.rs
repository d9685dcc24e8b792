//! `nvme-setup`: prepares a machine for the userspace NVMe driver (the job
//! of SPDK's `scripts/setup.sh`). Run as root, once per boot.
//!
//! ```text
//! nvme-setup status                 NVMe functions, their drivers and use
//! nvme-setup bind <pci>|all [--force] [--user USER]
//!                                   hand functions to vfio-pci (and their
//!                                   VFIO group devices to USER)
//! nvme-setup unbind <pci>|all       give them back to the kernel driver
//! nvme-setup hugepages <count>      reserve <count> 2 MiB hugepages
//! ```
//!
//! `bind` refuses, unless `--force` is given: a function that is not an
//! NVMe controller (PCI class 0x010802: a typo must not take a NIC, a GPU
//! or the host bridge from the kernel), and a controller whose namespaces
//! are mounted, used as swap, held by another block device (RAID, LVM, dm),
//! have mounted partitions, or hold a partition table, a file system, swap
//! or anything else but a blobstore of ours (what `mkfs` would refuse to
//! format over).
//!
//! `--user USER` lets the database run without root: the function's
//! `/dev/vfio/<group>` goes to USER (and USER's group), and the locked-memory
//! limit USER gets (`ulimit -l`, which VFIO's DMA map counts pinned memory
//! against) is checked against the hugepages reserved; when it is lower,
//! `bind` says what to change.

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

/// What a PCI function is, from its class code (`0x010802`), for messages.
fn class_name(class: &str) -> String {
    let code = u32::from_str_radix(class.trim().trim_start_matches("0x"), 16).unwrap_or(u32::MAX);
    let base = match code >> 16 {
        0x01 => "a storage controller",
        0x02 => "a network controller",
        0x03 => "a display controller (GPU)",
        0x04 => "a multimedia controller",
        0x05 => "a memory controller",
        0x06 if code >> 8 == 0x0600 => "a host bridge",
        0x06 => "a bridge",
        0x07 => "a communication controller",
        0x08 => "a system peripheral",
        0x0c if code >> 8 == 0x0c03 => "a USB controller",
        0x0c => "a serial bus controller",
        _ => "a PCI function",
    };
    format!("{base} (class {})", class.trim())
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

/// What the namespace block devices of `pci` hold that is not ours (a
/// partition table, a file system, swap, a foreign blobstore), from their
/// first bytes, as `mkfs` probes before it formats.
fn foreign_data(pci: &str) -> Vec<String> {
    use std::io::Read;
    let mut why = Vec::new();
    for dev in block_devices(pci) {
        // Namespaces only: a partition's table is at its namespace's start.
        if Path::new("/sys/class/block")
            .join(&dev)
            .join("partition")
            .exists()
        {
            continue;
        }
        let path = format!("/dev/{dev}");
        let mut head = Vec::new();
        match fs::File::open(&path).and_then(|f| {
            f.take(blobstore::probe::PROBE_LEN as u64)
                .read_to_end(&mut head)
        }) {
            Ok(_) => match blobstore::probe::identify(&head) {
                Some(sig) if sig.blobstore_type.is_none() => why.push(format!(
                    "{path} holds {} (at byte {})",
                    sig.what, sig.offset
                )),
                _ => {}
            },
            Err(e) => why.push(format!("{path} cannot be read to check what it holds: {e}")),
        }
    }
    why
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

/// Hands the VFIO group device of `pci` (bound to vfio-pci) to `user`, and
/// checks the locked-memory limit `user` gets.
fn give_to_user(pci: &str, user: &str) -> Result<(), String> {
    let group = iommu_group(pci).ok_or_else(|| format!("{pci}: no IOMMU group"))?;
    let dev = format!("/dev/vfio/{group}");
    let name = std::ffi::CString::new(user).map_err(|_| format!("user {user:?}"))?;
    // SAFETY: a NUL-terminated name; the result is read at once, before
    // any other passwd call.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return Err(format!("--user {user}: no such user"));
    }
    // SAFETY: non-null, points at libc's static passwd entry.
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    std::os::unix::fs::chown(&dev, Some(uid), Some(gid))
        .map_err(|e| format!("giving {dev} to {user}: {e}"))?;
    println!("{dev}: owned by {user} (uid {uid}, gid {gid})");
    // What the user's processes may lock: ask a shell of theirs, as the
    // limit comes from their session (limits.conf, the service unit).
    let limit = std::process::Command::new("su")
        .args([user, "-s", "/bin/sh", "-c", "ulimit -l"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let huge_mib = fs::read_to_string("/proc/sys/vm/nr_hugepages")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 2;
    let need_kib = huge_mib.max(64) * 1024;
    match limit.as_deref() {
        Some("unlimited") => println!("{user}: locked-memory limit unlimited"),
        Some(l) => match l.parse::<u64>() {
            Ok(kib) if kib >= need_kib => println!("{user}: locked-memory limit {kib} KiB"),
            _ => eprintln!(
                "warning: {user}'s locked-memory limit is {l} KiB; VFIO pins the driver's DMA \
                 memory against it (at least the {} MiB of hugepages reserved). Raise it: \
                 `{user} - memlock unlimited` in /etc/security/limits.conf, \
                 LimitMEMLOCK=infinity in a systemd unit, or `ulimit -l unlimited` as root \
                 before dropping to {user}",
                need_kib / 1024
            ),
        },
        None => eprintln!(
            "warning: could not read {user}'s locked-memory limit (`su {user} -c 'ulimit -l'`); \
             the driver needs at least {} MiB",
            need_kib / 1024
        ),
    }
    Ok(())
}

fn bind(pci: &str, force: bool, user: Option<&str>) -> Result<(), String> {
    bind_to_vfio(pci, force)?;
    match user {
        Some(u) => give_to_user(pci, u),
        None => Ok(()),
    }
}

fn bind_to_vfio(pci: &str, force: bool) -> Result<(), String> {
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
    let class = fs::read_to_string(dir.join("class")).unwrap_or_default();
    if class.trim() != NVME_CLASS {
        let id = |f: &str| {
            fs::read_to_string(dir.join(f))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let what = format!(
            "{pci} is {}, vendor {} device {}, driver {}",
            class_name(&class),
            id("vendor"),
            id("device"),
            driver_of(pci).unwrap_or_else(|| "none".into())
        );
        if !force {
            return Err(format!(
                "{what}: not an NVMe controller ({NVME_CLASS}), not binding (use --force to override)"
            ));
        }
        eprintln!("{what}: not an NVMe controller, binding anyway (--force)");
    }
    let mut why = in_use(pci);
    why.extend(foreign_data(pci));
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
            // Sticky and open to all, as /dev/shm: a database running as
            // its own user creates its unsynced memory here.
            c"pagesize=2M,mode=1777".as_ptr().cast(),
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
        let mut why = in_use(&pci);
        why.extend(foreign_data(&pci));
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
    let user = args
        .iter()
        .position(|a| a == "--user")
        .map(|i| args.get(i + 1).map(String::as_str));
    if user == Some(None) {
        eprintln!("nvme-setup: --user needs a user name");
        return ExitCode::FAILURE;
    }
    let user = user.flatten();
    let pos: Vec<&str> = args
        .iter()
        .enumerate()
        .filter(|(i, a)| !a.starts_with("--") && (*i == 0 || args[i - 1] != "--user"))
        .map(|(_, s)| s.as_str())
        .collect();
    let res = match pos.as_slice() {
        ["status"] | [] => {
            status();
            Ok(())
        }
        ["bind", what] => targets(what)
            .iter()
            .try_for_each(|p| bind(p, force, user)),
        ["unbind", what] => targets(what).iter().try_for_each(|p| unbind(p)),
        ["hugepages", n] => n.parse().map_err(|e| format!("count {n:?}: {e}")).and_then(hugepages),
        _ => Err("usage: nvme-setup status | bind <pci>|all [--force] [--user USER] | unbind <pci>|all | hugepages <count>".into()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nvme-setup: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_named_for_the_refusal() {
        assert_eq!(class_name("0x060000\n"), "a host bridge (class 0x060000)");
        assert_eq!(
            class_name("0x020000"),
            "a network controller (class 0x020000)"
        );
        assert_eq!(
            class_name("0x030000"),
            "a display controller (GPU) (class 0x030000)"
        );
        assert_eq!(class_name("0x0c0330"), "a USB controller (class 0x0c0330)");
        assert_eq!(
            class_name("0x010601"),
            "a storage controller (class 0x010601)"
        );
        assert_eq!(class_name("junk"), "a PCI function (class junk)");
    }
}
