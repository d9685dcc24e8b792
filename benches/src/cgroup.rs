//! Memory cgroups for `kvbench`'s `budget` configuration: one fresh cgroup
//! per `db_bench` run, with a memory limit that counts the process's memory
//! and the page cache it fills, as a container's limit does.
//!
//! Both cgroup versions: v1 (`memory.limit_in_bytes` under the `memory`
//! hierarchy, `memory.max_usage_in_bytes`, `oom_kill` in
//! `memory.oom_control`) and v2 (`memory.max`, `memory.peak`, `oom_kill` in
//! `memory.events`). A fresh cgroup per run makes its peak that run's peak
//! on both versions (v2 kernels before 6.12 cannot reset `memory.peak`).
//!
//! Invariants:
//! - a child joins the cgroup between `fork` and `exec`
//!   ([`MemCgroup::join_before_exec`]), so every page it touches is charged;
//! - the cgroup directory is removed when the value is dropped (its
//!   remaining page cache charges move to the parent).

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Which interface the machine's memory controller speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// Where the machine's memory controller is mounted, and its version.
fn memory_root() -> Result<(PathBuf, Version), String> {
    let v1 = Path::new("/sys/fs/cgroup/memory");
    if v1.join("memory.limit_in_bytes").exists() {
        return Ok((v1.to_path_buf(), Version::V1));
    }
    let v2 = Path::new("/sys/fs/cgroup");
    let controllers = fs::read_to_string(v2.join("cgroup.controllers")).unwrap_or_default();
    if controllers.split_whitespace().any(|c| c == "memory") {
        // Children get the memory controller only when the parent hands
        // it down.
        let sub = v2.join("cgroup.subtree_control");
        let on = fs::read_to_string(&sub).unwrap_or_default();
        if !on.split_whitespace().any(|c| c == "memory") {
            fs::write(&sub, "+memory")
                .map_err(|e| format!("enabling the memory controller in {}: {e}", sub.display()))?;
        }
        return Ok((v2.to_path_buf(), Version::V2));
    }
    Err("no memory cgroup controller: neither /sys/fs/cgroup/memory (v1) nor \"memory\" in /sys/fs/cgroup/cgroup.controllers (v2)".into())
}

/// A memory cgroup with a limit, removed on drop.
#[derive(Debug)]
pub struct MemCgroup {
    dir: PathBuf,
    version: Version,
    limit: u64,
}

impl MemCgroup {
    /// Creates cgroup `name` under the memory controller with a limit of
    /// `limit_bytes` (memory and page cache together). Needs root (or a
    /// delegated cgroup subtree).
    pub fn create(name: &str, limit_bytes: u64) -> Result<MemCgroup, String> {
        if name.is_empty() || name.contains('/') {
            return Err(format!("cgroup name {name:?}: one path component"));
        }
        let (root, version) = memory_root()?;
        let dir = root.join(name);
        if dir.exists() {
            // Left by an earlier run that died: empty, so it can go.
            let _ = fs::remove_dir(&dir);
        }
        fs::create_dir(&dir).map_err(|e| {
            format!(
                "creating the memory cgroup {}: {e} (the budget configuration needs root)",
                dir.display()
            )
        })?;
        let cg = MemCgroup {
            dir,
            version,
            limit: limit_bytes,
        };
        let file = match version {
            Version::V1 => "memory.limit_in_bytes",
            Version::V2 => "memory.max",
        };
        cg.write(file, &limit_bytes.to_string())?;
        // The kernel may round the limit to pages; it must not ignore it.
        let set = cg.read_u64(file)?;
        if set > limit_bytes || set + 4096 < limit_bytes {
            return Err(format!(
                "{}: asked for {limit_bytes} bytes, the kernel keeps {set}",
                cg.dir.join(file).display()
            ));
        }
        Ok(cg)
    }

    /// The limit, bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Makes `cmd`'s child join this cgroup after `fork`, before `exec`:
    /// from its first page on, everything it touches is charged here.
    pub fn join_before_exec(&self, cmd: &mut Command) -> Result<(), String> {
        let procs = CString::new(self.dir.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|_| format!("{} has a NUL byte", self.dir.display()))?;
        // SAFETY: the closure runs in the forked child before exec and
        // calls only async-signal-safe functions (open, write, close) on
        // memory allocated before the fork; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" is the writing process itself.
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n == 1 {
                    Ok(())
                } else {
                    Err(err)
                }
            });
        }
        Ok(())
    }

    /// The most memory the cgroup was ever charged, bytes.
    pub fn peak(&self) -> Option<u64> {
        let file = match self.version {
            Version::V1 => "memory.max_usage_in_bytes",
            Version::V2 => "memory.peak",
        };
        self.read_u64(file).ok()
    }

    /// How many processes the kernel's OOM killer killed in the cgroup.
    pub fn oom_kills(&self) -> u64 {
        let file = match self.version {
            Version::V1 => "memory.oom_control",
            Version::V2 => "memory.events",
        };
        fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|t| keyed_u64(&t, "oom_kill"))
            .unwrap_or(0)
    }

    fn write(&self, file: &str, value: &str) -> Result<(), String> {
        let path = self.dir.join(file);
        fs::write(&path, value).map_err(|e| format!("writing {value:?} to {}: {e}", path.display()))
    }

    fn read_u64(&self, file: &str) -> Result<u64, String> {
        let path = self.dir.join(file);
        let text =
            fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let t = text.trim();
        if t == "max" {
            return Ok(u64::MAX);
        }
        t.parse()
            .map_err(|_| format!("{}: {t:?} is not a number", path.display()))
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // Fails while a process is still inside: the rest of a pipeline
        // whose member the OOM killer ended is still exiting. Waits up to
        // 5 s for it; after that the directory is left for the next run
        // of the same name to remove.
        let t = std::time::Instant::now();
        while fs::remove_dir(&self.dir).is_err()
            && self.dir.exists()
            && t.elapsed() < std::time::Duration::from_secs(5)
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// The value of `key` in a `key value` per line file (`memory.events`,
/// `memory.oom_control`).
fn keyed_u64(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next()? == key).then(|| w.next()?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_keyed_counters() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed_u64(v1, "oom_kill"), Some(3));
        let v2 = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(keyed_u64(v2, "oom_kill"), Some(1));
        assert_eq!(keyed_u64(v2, "missing"), None);
        assert_eq!(keyed_u64("oom_kill x\n", "oom_kill"), None);
    }

    /// On a machine where we may create cgroups (root with a memory
    /// controller): a child inside one is charged there, and the limit
    /// holds it (a child that asks for more than the limit is OOM-killed).
    #[test]
    fn children_are_charged_and_limited() {
        let name = format!("kvbench-test-{}", std::process::id());
        let cg = match MemCgroup::create(&name, 64 << 20) {
            Ok(cg) => cg,
            Err(e) => {
                eprintln!("skipping: {e}");
                return;
            }
        };
        assert_eq!(cg.limit(), 64 << 20);
        // 16 MiB of touched memory fits.
        let mut small = Command::new("sh");
        small.args(["-c", "head -c 16777216 /dev/zero | tail -c 1 >/dev/null"]);
        cg.join_before_exec(&mut small).unwrap();
        assert!(small.status().unwrap().success());
        let peak = cg.peak().unwrap();
        assert!(peak > 0 && peak <= 64 << 20, "peak {peak}");
        assert_eq!(cg.oom_kills(), 0);
        // 256 MiB held at once does not: the OOM killer ends it.
        let mut big = Command::new("sh");
        big.args([
            "-c",
            "x=$(head -c 268435456 /dev/zero | tr '\\0' a); echo ${#x}",
        ]);
        cg.join_before_exec(&mut big).unwrap();
        let st = big.status().unwrap();
        assert!(!st.success(), "a child over the limit succeeded");
        assert!(cg.oom_kills() >= 1, "no OOM kill counted");
        let dir = cg.dir.clone();
        drop(cg);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
