//! `kvbench`: the key-value acceleration benchmark. Is RocksDB faster on
//! BlobFS than on the kernel file system, on the same machine and disk?
//!
//! Runs SPDK's RocksDB suite (insert, overwrite, readwrite, writesync,
//! randread), batched point reads (multiget) and range scans (scan) with
//! `db_bench`, one child process per (configuration, phase,
//! side), the side that goes first alternating from phase to phase, and
//! prints a table per configuration; writes `kvbench.json` and
//! `kvbench.svg` under `--out`. See [`benches::kv`] for the workload.
//!
//! Configurations:
//! - `disk`: BlobFS on `file:<dir>/kvbench.img` (preallocated, O_DIRECT) vs
//!   POSIX in `<dir>/posix-db`, RocksDB defaults;
//! - `direct`: the same, POSIX with O_DIRECT reads, flushes and compactions,
//!   BlobFS with `cache=0`;
//! - `memory`: BlobFS on `shm:/dev/shm/kvbench-<pid>/kvbench.img` vs POSIX
//!   in /dev/shm. A `mem:` device lives only as long as its process, and
//!   every phase is a new `db_bench` that reopens the database the insert
//!   phase built, so BlobFS runs on a `shm:` memory device: its blocks are a
//!   shared mapping of a tmpfs file, which outlives the process, and its
//!   I/O is a memcpy (no syscall, no O_DIRECT, no kernel worker per I/O).
//!   BlobFS runs with `cache=0` there: its blocks are already memory a
//!   memcpy away, and a cache on top only copied them again, with more CPU
//!   per op and a far worse randread p99 at 16 threads in our runs.
//! - `budget`: as `disk`, each db_bench inside a fresh memory cgroup
//!   ([`benches::cgroup`]) whose limit (`--budget`; by default a third of
//!   the database) counts its memory and the page cache it fills, as a
//!   container's limit does; BlobFS's cache is what the budget leaves after
//!   RocksDB's block cache and memtables, BlobFS's append buffers and the
//!   process ([`budget_blobfs_cache`]). The memory column is the cgroup's
//!   peak; a run the OOM killer ends is an error saying so. Needs root.
//! - `nvme` (with `--nvme PCI`, as root): BlobFS on one namespace of an
//!   NVMe controller through our userspace driver vs POSIX on ext4 on
//!   another namespace of the same size and format through the kernel's
//!   `nvme` driver, the controller rebound between the two with
//!   `nvme-setup` for each side's runs (see [`benches::nvme_sides`]). Both
//!   namespaces are erased. BlobFS gets `--blobfs-cache` as in `disk`.
//!
//! `--device SPEC` puts BlobFS's side of `disk`, `direct` and `budget` on
//! any device spec instead of the image file, formatted afresh by the insert
//! phase: a remote namespace (`nvme-tcp:HOST:PORT/NQN/ns=1`), a raw
//! partition (`file:/dev/sdb1`). The POSIX side stays in `--dir`: for a
//! like-for-like remote comparison, mount ext4 on another namespace of the
//! same target through the kernel's initiator (`nvme connect`) and pass
//! that as `--dir`.
//!
//! Every run records the child's own CPU time and the whole machine's
//! (elapsed time times CPUs minus idle time in `/proc/stat`, so kernel
//! threads and interrupts count; see [`benches::nvme_sides::CpuSample`]): ext4's
//! writeback and journal run in kernel threads the child is never charged
//! for, while BlobFS's writer thread and our driver's polling are the
//! child's.
//!
//! The binary's modules: [`args`] (the command line and its defaults),
//! [`sizing`] (how much room a run needs, and the checks that it is there),
//! [`machine`] (what kvbench reads of the machine, and dropping the page
//! cache), [`layout`] (where each configuration keeps its two databases),
//! [`run`](mod@run) (one `db_bench` child, run and measured); this file checks the
//! arguments, runs every configuration and phase, and writes the report.

mod args;
mod layout;
mod machine;
mod run;
mod sizing;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use benches::json::Json;
use benches::kv::{self, Config, Phase, RunFigures, Side};
use benches::nvme_sides::NvmeSides;
use blobstore::util::{format_size, human_size, parse_size};
use clap::Parser;

use args::{parse_list, target_dir, Args};
use layout::{BlobDevice, Layout};
use machine::{fs_type, machine_json, meminfo, utc_now};
use run::Bench;
use sizing::{budget_blobfs_cache, budget_bytes, check_device, side_bytes, statvfs_avail};

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nkvbench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let (def_keys, def_duration) = if args.quick {
        (50_000, 2)
    } else if args.full {
        (20_000_000, 20)
    } else {
        (1_500_000, 15)
    };
    let keys = args.keys.unwrap_or(def_keys);
    let duration = args.duration.unwrap_or(def_duration);
    if keys == 0 || duration == 0 {
        return Err("--keys and --duration must be at least 1".into());
    }
    let mut configs = parse_list(&args.configs, Config::parse)?;
    let mut seen = Vec::new();
    configs.retain(|c| {
        let first = !seen.contains(c);
        seen.push(*c);
        first
    });
    let mut phases = parse_list(&args.phases, Phase::parse)?;
    if configs.is_empty() || phases.is_empty() {
        return Err("--configs and --phases must name at least one".into());
    }
    for base in phases.iter().map(|p| p.builds_on()).collect::<Vec<_>>() {
        if !phases.contains(&base) {
            eprintln!(
                "note: adding the {} phase: the phases after it reuse the database it builds",
                base.name()
            );
            phases.push(base);
        }
    }
    // SPDK's order whatever the order given.
    phases.sort_by_key(|p| Phase::ALL.iter().position(|x| x == p));
    phases.dedup();
    let threads = parse_list(&args.threads, |s| {
        let (p, n) = s
            .split_once('=')
            .ok_or_else(|| format!("--threads wants phase=N items, got {s:?}"))?;
        let n: u32 = n
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("--threads: {n:?} is not a positive thread count"))?;
        Ok((Phase::parse(p)?, n))
    })?;
    let cache_bytes = parse_size(&args.cache_size)?;
    let blobfs_cache_bytes = parse_size(&args.blobfs_cache)?;
    let budget = budget_bytes(&args.budget, keys)?;
    let budget_cache = budget_blobfs_cache(budget, cache_bytes);

    let target = target_dir();
    let db_bench = args
        .db_bench
        .clone()
        .unwrap_or_else(|| target.join("rocksdb").join("db_bench"));
    if !db_bench.is_file() {
        return Err(format!(
            "db_bench not found at {}: build it with `make rocksdb-tools` (same CARGO_TARGET_DIR), or pass --db-bench PATH",
            db_bench.display()
        ));
    }
    let dir = args.dir.clone().unwrap_or_else(|| target.join("kvbench"));
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| target.join("kvbench-out"));
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    fs::create_dir_all(&out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let dir = fs::canonicalize(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let out = fs::canonicalize(&out).map_err(|e| format!("{}: {e}", out.display()))?;

    // Room for both sides of every configuration asked for, checked up
    // front so a long run does not die half way.
    let per_side = side_bytes(keys);
    let shm = PathBuf::from("/dev/shm").join(format!("kvbench-{}", std::process::id()));
    let mut nvme_sides = None;
    if let Some(spec) = &args.device {
        if configs
            .iter()
            .any(|c| matches!(c, Config::Disk | Config::Direct | Config::Budget))
        {
            check_device(spec, per_side)?;
        }
    }
    for config in &configs {
        match config {
            Config::Disk | Config::Direct | Config::Budget => {
                let avail = statvfs_avail(&dir)?;
                let need = if args.device.is_some() {
                    per_side
                } else {
                    2 * per_side
                };
                if avail < need {
                    return Err(format!(
                        "configuration {}: {} keys need about {} for the BlobFS image and {} for the POSIX database, but {} has {} free; use fewer --keys, another --dir, or leave {} out of --configs",
                        config.name(), keys, human_size(per_side), human_size(per_side), dir.display(), human_size(avail), config.name()
                    ));
                }
            }
            Config::Nvme => {
                let pci = args.nvme.as_deref().ok_or(
                    "configuration nvme needs --nvme PCI (the controller whose namespaces it erases)",
                )?;
                let ns: Vec<u32> = parse_list(&args.nvme_namespaces, |s| {
                    s.parse::<u32>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("--nvme-namespaces: {s:?} is not a namespace id"))
                })?;
                let [blobfs_ns, posix_ns] = ns[..] else {
                    return Err("--nvme-namespaces wants two ids, BLOBFS,POSIX".into());
                };
                let setup = args.nvme_setup.clone().unwrap_or_else(|| {
                    std::env::current_exe()
                        .ok()
                        .and_then(|e| Some(e.parent()?.join("nvme-setup")))
                        .unwrap_or_else(|| PathBuf::from("nvme-setup"))
                });
                let sides = NvmeSides::new(pci, blobfs_ns, posix_ns, dir.join("nvme-ext4"), setup);
                eprintln!("kvbench nvme: {}", sides.check(per_side)?);
                nvme_sides = Some(sides);
            }
            Config::Memory => {
                let avail_shm = statvfs_avail(Path::new("/dev/shm"))?;
                let avail_mem = meminfo("MemAvailable").unwrap_or(0);
                let need = 2 * per_side + (1 << 30);
                if avail_shm < 2 * per_side || avail_mem < need {
                    return Err(format!(
                        "configuration memory: {} keys need about {} in /dev/shm for both sides plus 1 GiB for the processes, but /dev/shm has {} free and MemAvailable is {}; use fewer --keys or leave memory out of --configs",
                        keys, human_size(2 * per_side), human_size(avail_shm), human_size(avail_mem)
                    ));
                }
            }
        }
    }

    let started_at = utc_now();
    eprintln!(
        "kvbench: {} keys, {} s per timed phase, configs {}, phases {}; db_bench {}; dir {} ({}); out {}",
        keys,
        duration,
        configs.iter().map(|c| c.name()).collect::<Vec<_>>().join(","),
        phases.iter().map(|p| p.name()).collect::<Vec<_>>().join(","),
        db_bench.display(),
        dir.display(),
        fs_type(&dir),
        out.display()
    );
    let mut bench = Bench {
        db_bench,
        keys,
        duration,
        threads: threads.clone(),
        cache_bytes,
        out: out.clone(),
        can_drop_caches: true,
        started: Instant::now(),
        budget,
    };
    let mut runs: Vec<RunFigures> = Vec::new();
    let mut failure = None;
    'configs: for (ci, &config) in configs.iter().enumerate() {
        let layout = match config {
            Config::Disk | Config::Direct | Config::Budget => Layout {
                device: match &args.device {
                    Some(spec) => BlobDevice::Spec(spec.clone()),
                    None => BlobDevice::File {
                        image: dir.join("kvbench.img"),
                        bytes: per_side,
                    },
                },
                blobfs_cache: match config {
                    Config::Direct => "0".into(),
                    Config::Budget => format_size(budget_cache),
                    _ => format_size(blobfs_cache_bytes),
                },
                posix_db: dir.join("posix-db"),
            },
            Config::Memory => {
                fs::create_dir_all(&shm).map_err(|e| format!("creating {}: {e}", shm.display()))?;
                Layout {
                    device: BlobDevice::Shm {
                        image: shm.join("kvbench.img"),
                        bytes: per_side,
                    },
                    // The device is memory already: see the module docs.
                    blobfs_cache: "0".into(),
                    posix_db: shm.join("posix-db"),
                }
            }
            Config::Nvme => {
                let sides = nvme_sides
                    .take()
                    .ok_or("configuration nvme: controller not checked")?;
                Layout {
                    posix_db: sides.posix_db(),
                    device: BlobDevice::Nvme(sides),
                    blobfs_cache: format_size(blobfs_cache_bytes),
                }
            }
        };
        let phases: Vec<Phase> = phases
            .iter()
            .copied()
            .filter(|p| p.runs_in(config))
            .collect();
        for (pi, &phase) in phases.iter().enumerate() {
            // Alternate which side goes first, phase by phase and across
            // configurations.
            let first = if (ci + pi) % 2 == 0 {
                Side::BlobFs
            } else {
                Side::Posix
            };
            for side in [first, first.other()] {
                let label = format!(
                    "[{}/{} {}] {} {}/{} {}",
                    ci + 1,
                    configs.len(),
                    config.name(),
                    phase.name(),
                    pi + 1,
                    phases.len(),
                    side.name()
                );
                match bench.run(config, phase, side, &layout, &label) {
                    Ok(r) => {
                        eprintln!(
                            "\r{label}: {} ops/s, p99 {:.1} µs, {:.1} s          ",
                            r.result.ops_per_sec as u64, r.result.latency_us_p99, r.wall_s
                        );
                        runs.push(r);
                    }
                    Err(e) => {
                        failure = Some(e);
                        layout.clean();
                        break 'configs;
                    }
                }
            }
        }
        layout.clean();
    }
    let _ = fs::remove_dir_all(&shm);
    let total_s = bench.started.elapsed().as_secs_f64();

    let params = Json::obj([
        ("keys", Json::from(keys)),
        ("duration_s", Json::from(u64::from(duration))),
        (
            "threads",
            Json::obj(
                phases
                    .iter()
                    .map(|&p| (p.name(), Json::from(u64::from(bench.threads(p))))),
            ),
        ),
        (
            "configs",
            Json::Arr(configs.iter().map(|c| Json::str(c.name())).collect()),
        ),
        (
            "phases",
            Json::Arr(phases.iter().map(|p| Json::str(p.name())).collect()),
        ),
        ("cache_size_bytes", Json::from(cache_bytes)),
        ("blobfs_cache_bytes", Json::from(blobfs_cache_bytes)),
        ("budget_bytes", Json::from(budget)),
        ("budget_blobfs_cache_bytes", Json::from(budget_cache)),
        ("image_bytes", Json::from(per_side)),
        (
            "page_cache_dropped_before_each_run",
            Json::Bool(bench.can_drop_caches),
        ),
        ("started", Json::str(started_at.clone())),
        ("total_s", Json::Num(total_s)),
        ("complete", Json::Bool(failure.is_none())),
    ]);
    let report = kv::report_json(machine_json(&dir), params, &runs);
    let json_path = out.join("kvbench.json");
    let svg_path = out.join("kvbench.svg");
    fs::write(&json_path, format!("{report}\n"))
        .map_err(|e| format!("writing {}: {e}", json_path.display()))?;
    fs::write(&svg_path, kv::chart_svg(&runs))
        .map_err(|e| format!("writing {}: {e}", svg_path.display()))?;

    println!(
        "\nkvbench, {started_at}: {keys} keys, {duration} s per timed phase, RocksDB block cache {}; ratio = BlobFS / POSIX",
        format_size(cache_bytes)
    );
    if configs.contains(&Config::Budget) {
        println!(
            "budget: each db_bench in a memory cgroup of {} (process and page cache), BlobFS cache {}; memory MiB is the cgroup's peak",
            format_size(budget),
            format_size(budget_cache)
        );
    }
    for config in &configs {
        if !runs.iter().any(|r| r.config == *config) {
            continue;
        }
        println!("\n### {}\n", config.name());
        print!("{}", kv::table(*config, &runs));
    }
    println!(
        "\ntotal {:.0} s; JSON {}; chart {}",
        total_s,
        json_path.display(),
        svg_path.display()
    );
    if !bench.can_drop_caches {
        println!("(the page cache could not be dropped between runs)");
    }
    match failure {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_spec_is_formatted_by_the_insert_phase_only() {
        let layout = Layout {
            device: BlobDevice::Spec("nvme-tcp:10.0.0.2:4420/nqn.2024-01.io.example:d/ns=1".into()),
            blobfs_cache: "1G".into(),
            posix_db: PathBuf::from("/mnt/ext4/posix-db"),
        };
        assert_eq!(
            layout.uri(true),
            "blobfs://nvme-tcp:10.0.0.2:4420/nqn.2024-01.io.example:d/ns=1;cache=1G;mkfs=force"
        );
        assert!(layout.uri(false).ends_with(";cache=1G;mkfs=never"));
        assert_eq!(layout.disk_of(Side::BlobFs), None);
    }

    #[test]
    fn a_device_that_is_unknown_or_too_small_is_refused_up_front() {
        let e = check_device("floppy:1", 1 << 20).unwrap_err();
        assert!(
            e.contains("--device floppy:1") && e.contains("unknown scheme"),
            "{e}"
        );
        let e = check_device("mem:16M", 1 << 30).unwrap_err();
        assert!(e.contains("too small"), "{e}");
        check_device("mem:16M", 8 << 20).unwrap();
    }
}
