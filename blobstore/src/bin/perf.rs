//! `perf`: random or sequential I/O against a block device at a queue depth,
//! like SPDK's `perf`; the same numbers for `MemDevice`, `FileDevice` and
//! `NvmeDevice`.
//!
//! ```text
//! perf --device <spec> [--qd 32] [--bs 4096] [--rw randread] [--mix 70]
//!      [--seconds 10] [--threads 1] [--shadow-doorbells on|off]
//!      [--interrupts on|off]
//! ```
//! `--rw` is one of read, write, randread, randwrite, randrw (`--mix` is the
//! read percentage of randrw). Devices: `mem:<bytes>[/bs=<512|4096>]`,
//! `nvme:<pci>[/ns=<n>]`, or any spec the library's `open_device` takes.
//! Each thread has its own channel (an NVMe queue pair) and keeps `qd`
//! operations in flight; it prints IOPS, MiB/s and latency percentiles.
//! `--shadow-doorbells off` attaches an NVMe controller without shadow
//! doorbells (they are used by default when the controller offers them);
//! `--interrupts off` without completion interrupts (a thread that waits
//! for its queue then always polls; with them it sleeps on the queue's
//! interrupt after a short spin, and perf reports how often it slept).

use std::sync::Arc;
use std::time::{Duration, Instant};

use blobstore::{block_on, channel, BlockDevice, MemDevice};
use futures::stream::{FuturesUnordered, StreamExt};

struct Args {
    device: String,
    qd: usize,
    bs: usize,
    rw: String,
    mix: u64,
    seconds: f64,
    threads: usize,
    shadow_doorbells: bool,
    interrupts: bool,
}

fn on_off(k: &str, v: String) -> Result<bool, String> {
    match v.as_str() {
        "on" => Ok(true),
        "off" => Ok(false),
        o => Err(format!("{k} {o}: on|off")),
    }
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        device: String::new(),
        qd: 32,
        bs: 4096,
        rw: "randread".into(),
        mix: 70,
        seconds: 10.0,
        threads: 1,
        shadow_doorbells: true,
        interrupts: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or_else(|| format!("{k} needs a value"));
        let num = |s: String| s.parse::<u64>().map_err(|e| format!("{s:?}: {e}"));
        match k.as_str() {
            "--device" | "-d" => a.device = v()?,
            "--qd" | "-q" => a.qd = num(v()?)? as usize,
            "--bs" | "-o" => a.bs = num(v()?)? as usize,
            "--rw" | "-w" => a.rw = v()?,
            "--mix" | "-M" => a.mix = num(v()?)?,
            "--seconds" | "-t" => a.seconds = v()?.parse().map_err(|e| format!("seconds: {e}"))?,
            "--threads" | "-c" => a.threads = num(v()?)? as usize,
            "--shadow-doorbells" => a.shadow_doorbells = on_off(&k, v()?)?,
            "--interrupts" => a.interrupts = on_off(&k, v()?)?,
            "--help" | "-h" => return Err(String::new()),
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    if a.device.is_empty() {
        return Err("--device is required".into());
    }
    if !["read", "write", "randread", "randwrite", "randrw"].contains(&a.rw.as_str()) {
        return Err(format!(
            "--rw {}: read|write|randread|randwrite|randrw",
            a.rw
        ));
    }
    if a.qd == 0 || a.threads == 0 || a.bs == 0 || a.mix > 100 {
        return Err("qd, threads and bs must be positive, mix at most 100".into());
    }
    Ok(a)
}

/// The device, and for `nvme:` a report of the controller's interrupt
/// sleeps to print at the end.
type Opened = (Arc<dyn BlockDevice>, Option<Box<dyn Fn() -> String>>);

fn open(spec: &str, shadow_doorbells: bool, interrupts: bool) -> Result<Opened, String> {
    #[cfg(not(feature = "nvme"))]
    let _ = (shadow_doorbells, interrupts);
    if let Some(rest) = spec.strip_prefix("mem:") {
        let (size, bs) = match rest.split_once("/bs=") {
            Some((s, b)) => (s, b.parse::<u32>().map_err(|e| e.to_string())?),
            None => (rest, 4096),
        };
        let size = parse_size(size)?;
        return Ok((
            Arc::new(MemDevice::new(size, bs).map_err(|e| e.to_string())?),
            None,
        ));
    }
    #[cfg(feature = "nvme")]
    if let Some(rest) = spec.strip_prefix("nvme:") {
        let (pci, nsid) = match rest.split_once("/ns=") {
            Some((p, n)) => (p, n.parse::<u32>().map_err(|e| e.to_string())?),
            None => (rest, 1),
        };
        // Attach the controller with the chosen options first; the device
        // then finds it attached.
        let opts = blobstore::ControllerOptions {
            shadow_doorbells,
            interrupts,
            ..Default::default()
        };
        let ctrl = blobstore::NvmeController::open_with(pci, opts).map_err(|e| e.to_string())?;
        println!(
            "controller {pci}: shadow doorbells {} (offered: {}, asked: {})",
            if ctrl.shadow_doorbells() { "on" } else { "off" },
            if ctrl.identity().supports_doorbell_buffer() {
                "yes"
            } else {
                "no"
            },
            if shadow_doorbells { "on" } else { "off" },
        );
        println!(
            "controller {pci}: completion interrupts {} (asked: {})",
            if ctrl.interrupts() { "on" } else { "off" },
            if interrupts { "on" } else { "off" },
        );
        let dev = blobstore::NvmeDevice::open(pci, nsid).map_err(|e| e.to_string())?;
        let report = move || format!("interrupt sleeps: {}", ctrl.interrupt_sleeps());
        return Ok((Arc::new(dev), Some(Box::new(report))));
    }
    let dev = blobstore::device::open_device(spec).map_err(|e| e.to_string())?;
    Ok((dev, None))
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (n, mul) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    n.parse::<u64>()
        .map(|v| v * mul)
        .map_err(|e| format!("size {s:?}: {e}"))
}

struct ThreadResult {
    ops: u64,
    bytes: u64,
    latencies_ns: Vec<u64>,
    errors: u64,
}

fn run_thread(dev: Arc<dyn BlockDevice>, a: &Args, t: usize) -> ThreadResult {
    let ch = channel(&dev).expect("channel");
    let g = dev.geometry();
    let blocks = (a.bs as u64 / g.block_size as u64).max(1);
    let slots = g.block_count / blocks;
    let random = a.rw.starts_with("rand");
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1).wrapping_mul(0x1234_5678_9abc_def1);
    let mut next_rand = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut seq = (t as u64 * slots / a.threads as u64) % slots;
    let deadline = Instant::now() + Duration::from_secs_f64(a.seconds);
    let mut res = ThreadResult {
        ops: 0,
        bytes: 0,
        latencies_ns: Vec::with_capacity(1 << 16),
        errors: 0,
    };
    let bufs: Vec<_> = (0..a.qd)
        .map(|_| dev.alloc_buf(a.bs).expect("DMA buffer"))
        .collect();
    block_on(async {
        let mut inflight = FuturesUnordered::new();
        let mut free = bufs;
        loop {
            while Instant::now() < deadline {
                let Some(buf) = free.pop() else { break };
                let slot = if random {
                    next_rand() % slots
                } else {
                    seq = (seq + 1) % slots;
                    seq
                };
                let read = match a.rw.as_str() {
                    "read" | "randread" => true,
                    "write" | "randwrite" => false,
                    _ => next_rand() % 100 < a.mix,
                };
                let ch = ch.clone();
                let lba = slot * blocks;
                inflight.push(async move {
                    let start = Instant::now();
                    let r = if read {
                        ch.read(lba, buf).await
                    } else {
                        ch.write(lba, buf).await
                    };
                    (start.elapsed(), r)
                });
            }
            let Some((lat, r)) = inflight.next().await else {
                break;
            };
            match r {
                Ok(buf) => {
                    res.ops += 1;
                    res.bytes += buf.len() as u64;
                    res.latencies_ns.push(lat.as_nanos() as u64);
                    free.push(buf);
                }
                Err(e) => {
                    res.errors += 1;
                    eprintln!("I/O error: {e}");
                    if res.errors > 10 {
                        break;
                    }
                    free.push(dev.alloc_buf(a.bs).expect("DMA buffer"));
                }
            }
        }
    });
    res
}

fn main() -> std::process::ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("perf: {e}");
            }
            eprintln!(
                "usage: perf --device <spec> [--qd N] [--bs BYTES] \
                 [--rw read|write|randread|randwrite|randrw] [--mix READ%] [--seconds S] [--threads N] [--shadow-doorbells on|off] [--interrupts on|off]"
            );
            return std::process::ExitCode::FAILURE;
        }
    };
    let (dev, report) = match open(&a.device, a.shadow_doorbells, a.interrupts) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("perf: opening {}: {e}", a.device);
            return std::process::ExitCode::FAILURE;
        }
    };
    let g = dev.geometry();
    if a.bs % g.block_size as usize != 0 {
        eprintln!(
            "perf: --bs {} is not a multiple of the block size {}",
            a.bs, g.block_size
        );
        return std::process::ExitCode::FAILURE;
    }
    println!(
        "device {} ({} MiB, {}-byte blocks): {} bs={} qd={} threads={} seconds={}{}",
        dev.name(),
        g.size_bytes() >> 20,
        g.block_size,
        a.rw,
        a.bs,
        a.qd,
        a.threads,
        a.seconds,
        if a.rw == "randrw" {
            format!(" mix={}% reads", a.mix)
        } else {
            String::new()
        }
    );
    let start = Instant::now();
    let a = Arc::new(a);
    let handles: Vec<_> = (0..a.threads)
        .map(|t| {
            let dev = dev.clone();
            let a = a.clone();
            std::thread::spawn(move || run_thread(dev, &a, t))
        })
        .collect();
    let results: Vec<ThreadResult> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let secs = start.elapsed().as_secs_f64();
    let mut lat: Vec<u64> = results
        .iter()
        .flat_map(|r| r.latencies_ns.iter().copied())
        .collect();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return 0.0;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i] as f64 / 1000.0
    };
    for (t, r) in results.iter().enumerate() {
        println!(
            "  thread {t}: {} ops, {:.0} IOPS",
            r.ops,
            r.ops as f64 / secs
        );
    }
    let ops: u64 = results.iter().map(|r| r.ops).sum();
    let bytes: u64 = results.iter().map(|r| r.bytes).sum();
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    let avg = if lat.is_empty() {
        0.0
    } else {
        lat.iter().sum::<u64>() as f64 / lat.len() as f64 / 1000.0
    };
    println!(
        "total: {:.0} IOPS, {:.2} MiB/s, latency us: avg {:.1} p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1}; {} errors",
        ops as f64 / secs,
        bytes as f64 / secs / (1 << 20) as f64,
        avg,
        pct(0.50),
        pct(0.99),
        pct(0.999),
        lat.last().copied().unwrap_or(0) as f64 / 1000.0,
        errors
    );
    if let Some(r) = report {
        println!("{}", r());
    }
    if errors > 0 {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
