//! The two sides of `kvbench`'s `nvme` configuration on one NVMe
//! controller: BlobFS on one namespace through our userspace driver
//! (the controller bound to `vfio-pci`), ext4 on another namespace of the
//! same size and block size through the kernel's `nvme` driver.
//!
//! A controller belongs to one driver at a time, so the controller is
//! rebound (with the project's `nvme-setup`) whenever the next run is on
//! the other side; ext4 is unmounted before the kernel lets go of the
//! namespace and mounted again after it is back. Nothing here runs a
//! benchmark: [`NvmeSides::prepare`] gets the machine ready for one side's
//! run, [`NvmeSides::release`] leaves it with the kernel.
//!
//! Both namespaces are erased: BlobFS is formatted with `mkfs=force` and
//! ext4 with `mkfs.ext4 -F` on every insert phase.
//!
//! Also here: [`CpuSample`], the whole machine's non-idle CPU time, which
//! both sides' figures are counted with.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::kv::Side;

const PCI: &str = "/sys/bus/pci/devices";

/// A reading of the whole machine's CPU: when it was taken, and how long
/// all CPUs together had been idle (idle + iowait in `/proc/stat`).
///
/// Busy time is the elapsed time times the CPU count minus the idle time
/// that passed: the kernel measures idle time exactly (from the clock, at
/// every idle entry and exit on tickless kernels), while `/proc/stat`'s
/// user and system times are sampled at timer ticks, and a virtual machine
/// under emulation loses ticks: summing those undercounted a polling
/// process's CPU by a third in our TCG guest (less CPU for the whole guest
/// than `getrusage` gave the one process).
#[derive(Clone, Copy, Debug)]
pub struct CpuSample {
    at: Instant,
    idle_s: f64,
    cpus: u32,
}

impl CpuSample {
    /// Reads `/proc/stat` now; `None` when it cannot be read.
    pub fn now() -> Option<CpuSample> {
        let stat = fs::read_to_string("/proc/stat").ok()?;
        let at = Instant::now();
        let (idle, cpus) = parse_idle(&stat)?;
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        Some(CpuSample {
            at,
            idle_s: idle as f64 / if hz > 0 { hz as f64 } else { 100.0 },
            cpus,
        })
    }

    /// Non-idle CPU seconds of the whole machine (every CPU, kernel
    /// threads and interrupts included) from `earlier` to this sample.
    pub fn busy_since(&self, earlier: &CpuSample) -> f64 {
        let wall = self.at.saturating_duration_since(earlier.at).as_secs_f64();
        (wall * self.cpus as f64 - (self.idle_s - earlier.idle_s)).max(0.0)
    }
}

/// Idle + iowait jiffies of all CPUs and the number of CPUs, from the
/// text of `/proc/stat`.
fn parse_idle(stat: &str) -> Option<(u64, u32)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|w| w.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    if f.len() < 5 {
        return None;
    }
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count() as u32;
    (cpus > 0).then_some((f[3] + f[4], cpus))
}

/// Which driver has the controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Kernel,
    Ours,
}

/// One controller, two namespaces, and where ext4 is mounted.
pub struct NvmeSides {
    pci: String,
    blobfs_ns: u32,
    posix_ns: u32,
    mount: PathBuf,
    setup: PathBuf,
}

impl NvmeSides {
    /// The sides of controller `pci` (e.g. `0000:00:04.0`): BlobFS on
    /// namespace `blobfs_ns`, ext4 on `posix_ns` mounted at `mount`, the
    /// controller rebound with the `nvme-setup` binary at `setup`. Touches
    /// nothing; [`NvmeSides::check`] looks before the first run.
    pub fn new(pci: &str, blobfs_ns: u32, posix_ns: u32, mount: PathBuf, setup: PathBuf) -> Self {
        NvmeSides {
            pci: pci.to_string(),
            blobfs_ns,
            posix_ns,
            mount,
            setup,
        }
    }

    /// The device spec of the BlobFS side (`nvme:PCI/ns=N`).
    pub fn blobfs_spec(&self) -> String {
        format!("nvme:{}/ns={}", self.pci, self.blobfs_ns)
    }

    /// Where the POSIX side's database lives (on the mounted ext4).
    pub fn posix_db(&self) -> PathBuf {
        self.mount.join("posix-db")
    }

    /// Hands the controller to the kernel and checks that both namespaces
    /// are there with the same size and block size, at least `need_bytes`
    /// each. Returns a line describing them.
    pub fn check(&self, need_bytes: u64) -> Result<String, String> {
        let dir = Path::new(PCI).join(&self.pci);
        if !dir.exists() {
            return Err(format!("--nvme {}: no such PCI function", self.pci));
        }
        let class = fs::read_to_string(dir.join("class")).unwrap_or_default();
        if class.trim() != "0x010802" {
            return Err(format!(
                "--nvme {}: not an NVMe controller (PCI class {}, NVMe is 0x010802)",
                self.pci,
                class.trim()
            ));
        }
        if !self.setup.is_file() {
            return Err(format!(
                "nvme-setup not found at {} (cargo build --release -p blobstore --bins, or --nvme-setup PATH)",
                self.setup.display()
            ));
        }
        if self.blobfs_ns == self.posix_ns {
            return Err(format!(
                "--nvme-namespaces: the sides need two namespaces, got {} twice",
                self.blobfs_ns
            ));
        }
        self.to_kernel()?;
        let mut shape = Vec::new();
        for ns in [self.blobfs_ns, self.posix_ns] {
            let dev = self.block_device(ns)?;
            let sys = Path::new("/sys/block").join(&dev);
            let read = |f: &str| -> Result<u64, String> {
                let p = sys.join(f);
                fs::read_to_string(&p)
                    .map_err(|e| format!("{}: {e}", p.display()))?
                    .trim()
                    .parse()
                    .map_err(|_| format!("{}: not a number", p.display()))
            };
            let bytes = read("size")? * 512;
            let lbs = read("queue/logical_block_size")?;
            if bytes < need_bytes {
                return Err(format!(
                    "namespace {ns} ({dev}) has {} MiB; the keys asked for need {} MiB per side",
                    bytes >> 20,
                    need_bytes >> 20
                ));
            }
            shape.push((ns, dev, bytes, lbs));
        }
        let (a, b) = (&shape[0], &shape[1]);
        if (a.2, a.3) != (b.2, b.3) {
            return Err(format!(
                "namespaces {} ({} MiB, {}-byte blocks) and {} ({} MiB, {}-byte blocks) differ: the sides need the same size and format",
                a.0,
                a.2 >> 20,
                a.3,
                b.0,
                b.2 >> 20,
                b.3
            ));
        }
        Ok(format!(
            "controller {}: BlobFS on namespace {} (our driver), ext4 on namespace {} ({}, kernel nvme driver); {} MiB each, {}-byte blocks",
            self.pci,
            a.0,
            b.0,
            b.1,
            a.2 >> 20,
            a.3
        ))
    }

    /// Gets the machine ready for a run of `side`; `fresh` (the insert
    /// phase) makes a new file system on the side's namespace first (ext4
    /// here; BlobFS formats itself, `mkfs=force` in its URI).
    pub fn prepare(&self, side: Side, fresh: bool) -> Result<(), String> {
        match side {
            Side::BlobFs => {
                self.unmount()?;
                if self.owner() != Owner::Ours {
                    // --force: the other namespace holds the POSIX side's
                    // ext4 (unmounted), which nvme-setup refuses to take
                    // from the kernel otherwise.
                    self.nvme_setup(&["bind", &self.pci, "--force"])?;
                }
                Ok(())
            }
            Side::Posix => {
                self.to_kernel()?;
                let dev = format!("/dev/{}", self.block_device(self.posix_ns)?);
                if fresh {
                    self.unmount()?;
                    // Inode tables and journal written now, not by a kernel
                    // thread during the runs.
                    run(
                        "mkfs.ext4",
                        &[
                            "-F",
                            "-q",
                            "-E",
                            "lazy_itable_init=0,lazy_journal_init=0",
                            &dev,
                        ],
                    )?;
                }
                if !self.mounted() {
                    fs::create_dir_all(&self.mount)
                        .map_err(|e| format!("creating {}: {e}", self.mount.display()))?;
                    run(
                        "mount",
                        &["-t", "ext4", &dev, &self.mount.display().to_string()],
                    )?;
                }
                Ok(())
            }
        }
    }

    /// Unmounts ext4 and leaves the controller with the kernel.
    pub fn release(&self) -> Result<(), String> {
        self.unmount()?;
        self.to_kernel()
    }

    fn owner(&self) -> Owner {
        let drv = fs::read_link(Path::new(PCI).join(&self.pci).join("driver")).ok();
        match drv.as_deref().and_then(Path::file_name) {
            Some(n) if n == "vfio-pci" => Owner::Ours,
            _ => Owner::Kernel,
        }
    }

    fn to_kernel(&self) -> Result<(), String> {
        if self.owner() == Owner::Ours {
            self.nvme_setup(&["unbind", &self.pci])?;
        }
        // The kernel probes the controller and scans its namespaces
        // asynchronously.
        let t = Instant::now();
        loop {
            let ready = [self.blobfs_ns, self.posix_ns].iter().all(|&ns| {
                self.block_device(ns)
                    .is_ok_and(|d| Path::new("/dev").join(d).exists())
            });
            if ready {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "{}: the kernel's nvme driver did not bring up namespaces {} and {} within 30 s",
                    self.pci, self.blobfs_ns, self.posix_ns
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The kernel's block device name of namespace `nsid` (e.g. `nvme0n2`).
    fn block_device(&self, nsid: u32) -> Result<String, String> {
        let nvme = Path::new(PCI).join(&self.pci).join("nvme");
        for ctrl in fs::read_dir(&nvme).into_iter().flatten().flatten() {
            for ns in fs::read_dir(ctrl.path()).into_iter().flatten().flatten() {
                let id = fs::read_to_string(ns.path().join("nsid")).unwrap_or_default();
                if ns.path().join("dev").exists() && id.trim() == nsid.to_string() {
                    return Ok(ns.file_name().to_string_lossy().into_owned());
                }
            }
        }
        Err(format!(
            "{}: no block device for namespace {nsid} (is the controller with the kernel's nvme driver, and does it have that namespace?)",
            self.pci
        ))
    }

    fn mounted(&self) -> bool {
        let Ok(mounts) = fs::read_to_string("/proc/mounts") else {
            return false;
        };
        let want = fs::canonicalize(&self.mount).unwrap_or_else(|_| self.mount.clone());
        mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .any(|m| Path::new(m) == want)
    }

    fn unmount(&self) -> Result<(), String> {
        if self.mounted() {
            run("umount", &[&self.mount.display().to_string()])?;
        }
        Ok(())
    }

    fn nvme_setup(&self, args: &[&str]) -> Result<(), String> {
        run(&self.setup.display().to_string(), args)
    }
}

/// Runs a command to completion; its output is kept for the error.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {program}: {e}"))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{program} {} failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_is_elapsed_time_times_cpus_minus_idle() {
        let stat = "cpu  100 2 30 5000 40 6 7 8 9 10\ncpu0 50 1 15 2500 20 3 3 4 0 0\ncpu1 50 1 15 2500 20 3 4 4 0 0\nintr 1\n";
        assert_eq!(parse_idle(stat), Some((5040, 2)));
        assert_eq!(parse_idle("cpu  1 2 3\n"), None);
        assert_eq!(parse_idle("intr 1\n"), None);
        let t = Instant::now();
        let a = CpuSample {
            at: t,
            idle_s: 10.0,
            cpus: 2,
        };
        let b = CpuSample {
            at: t + Duration::from_secs(3),
            idle_s: 11.5,
            cpus: 2,
        };
        // 3 s on 2 CPUs, 1.5 s of it idle.
        assert_eq!(b.busy_since(&a), 4.5);
        let now = CpuSample::now().expect("/proc/stat");
        assert!(now.cpus >= 1);
        // Spin a little: some busy time must show.
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(50) {
            std::hint::spin_loop();
        }
        let later = CpuSample::now().unwrap();
        assert!(later.busy_since(&now) >= 0.0);
    }
}
