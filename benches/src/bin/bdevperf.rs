//! `bdevperf`: I/O at a queue depth against any device spec, run the way
//! SPDK's bdevperf runs: one worker per reactor (a thread per core, see
//! `blobstore::reactor`), each a task that keeps `--qd` operations in flight
//! through its own channel (an NVMe queue pair, an io_uring, a TCP
//! connection) with the shared load engine (`benches::load`).
//!
//! ```text
//! bdevperf --device <spec> [--qd 32] [--bs 4K] [--rw randread] [--mix 70]
//!          [--seconds 10] [--threads 1 | --cores 2,3] [--idle block|sleep|spin]
//!          [--shadow-doorbells on|off] [--interrupts on|off]
//! ```
//! The device is any spec `blobstore::open_device` takes (`mem:`, `shm:`,
//! `file:`, `nvme:`, `nvme-tcp:`). `--rw` is read, write (sequential, each
//! worker in its own stripe of the device), randread, randwrite or randrw
//! (`--mix` is its read percentage). `--idle` is what a reactor does while
//! it waits: `block` (default) polls a few microseconds, then sleeps in the
//! device until a completion (NVMe completion interrupts, io_uring's wait);
//! `spin` polls without pause, as SPDK's reactors do; `sleep` polls while
//! I/O is in flight. For `nvme:`, `--shadow-doorbells` and `--interrupts`
//! choose how the controller is attached (both on by default), and the
//! report ends with how often a waiting reactor slept on the interrupt.
//!
//! Output: one line per worker and a total line with IOPS, MiB/s and
//! latency percentiles; the exit status is non-zero on any I/O error.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use benches::{
    run_load, LatencyHistogram, Limit, LoadReport, LoadSpec, Pattern, RawTarget, Region,
};
use blobstore::reactor::{IdlePolicy, Reactors};
use blobstore::util::{human_size, parse_size};
use blobstore::{BlockDevice, DeviceSpec};
use clap::{Parser, ValueEnum};

/// How long a `--idle block` reactor polls in-flight I/O before it sleeps in
/// the device: what `block_on` spins (short I/O completes within it).
const BLOCK_SPIN: Duration = Duration::from_micros(10);

/// The workload kinds, as SPDK's perf and bdevperf name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Rw {
    Read,
    Write,
    Randread,
    Randwrite,
    Randrw,
}

/// What a reactor does while it waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Idle {
    Block,
    Sleep,
    Spin,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Parser, Debug)]
#[command(
    name = "bdevperf",
    about = "I/O at a queue depth against a device spec, one worker task per reactor"
)]
struct Args {
    /// Device spec (mem:, shm:, file:, nvme:, nvme-tcp:).
    #[arg(short = 'd', long)]
    device: String,
    /// Operations each worker keeps in flight.
    #[arg(short = 'q', long, default_value_t = 32)]
    qd: usize,
    /// Bytes per operation (K, M, G suffixes), a multiple of the block size.
    #[arg(short = 'o', long, default_value = "4K", value_parser = parse_size)]
    bs: u64,
    /// Workload.
    #[arg(short = 'w', long, value_enum, default_value_t = Rw::Randread)]
    rw: Rw,
    /// Read percentage of randrw.
    #[arg(short = 'M', long, default_value_t = 70, value_parser = clap::value_parser!(u8).range(0..=100))]
    mix: u8,
    /// Run time in seconds.
    #[arg(short = 't', long, default_value_t = 10.0)]
    seconds: f64,
    /// Workers (reactors), not pinned; see --cores.
    #[arg(short = 'c', long, default_value_t = 1, conflicts_with = "cores")]
    threads: usize,
    /// Cores to pin one reactor each to (e.g. 0,1); overrides --threads.
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
    /// What a reactor does while it waits.
    #[arg(long, value_enum, default_value_t = Idle::Block)]
    idle: Idle,
    /// nvme: only: shadow doorbells when the controller offers them.
    #[arg(long, value_enum)]
    shadow_doorbells: Option<OnOff>,
    /// nvme: only: completion interrupts (a blocked reactor sleeps on them).
    #[arg(long, value_enum)]
    interrupts: Option<OnOff>,
}

/// Reports what the controller of an `nvme:` device does at the end of a
/// run.
type ControllerReport = Box<dyn Fn() -> String>;

/// Attaches the controller of an `nvme:` spec with the asked options (the
/// device then finds it attached) and prints what it took.
fn attach_controller(spec: &DeviceSpec, a: &Args) -> Result<Option<ControllerReport>, String> {
    let DeviceSpec::Nvme { addr, .. } = spec else {
        if a.shadow_doorbells.is_some() || a.interrupts.is_some() {
            return Err(format!(
                "--shadow-doorbells and --interrupts apply to nvme: devices, not {spec}"
            ));
        }
        return Ok(None);
    };
    let on = |o: Option<OnOff>| o != Some(OnOff::Off);
    let opts = blobstore::ControllerOptions {
        shadow_doorbells: on(a.shadow_doorbells),
        interrupts: on(a.interrupts),
        ..Default::default()
    };
    let pci = addr.to_string();
    let ctrl = blobstore::NvmeController::open_with(&pci, opts)
        .map_err(|e| format!("attaching the controller of {spec}: {e}"))?;
    let word = |b: bool| if b { "on" } else { "off" };
    println!(
        "controller {pci}: shadow doorbells {} (offered: {}, asked: {})",
        word(ctrl.shadow_doorbells()),
        if ctrl.identity().supports_doorbell_buffer() {
            "yes"
        } else {
            "no"
        },
        word(opts.shadow_doorbells),
    );
    println!(
        "controller {pci}: completion interrupts {} (asked: {})",
        word(ctrl.interrupts()),
        word(opts.interrupts),
    );
    Ok(Some(Box::new(move || {
        format!("interrupt sleeps: {}", ctrl.interrupt_sleeps())
    })))
}

/// Worker `i`'s share of the work: the whole device for random patterns,
/// its own stripe for sequential ones (so workers do not read each other's
/// blocks in lockstep).
fn worker_spec(a: &Args, workers: usize, i: usize, size: u64) -> Result<LoadSpec, String> {
    let (read_percent, pattern) = match a.rw {
        Rw::Read => (100, Pattern::Sequential),
        Rw::Write => (0, Pattern::Sequential),
        Rw::Randread => (100, Pattern::Random),
        Rw::Randwrite => (0, Pattern::Random),
        Rw::Randrw => (a.mix, Pattern::Random),
    };
    let region = match pattern {
        Pattern::Random => None,
        Pattern::Sequential => {
            let stripe = size / workers as u64 / a.bs * a.bs;
            if stripe == 0 {
                return Err(format!(
                    "{workers} sequential workers of --bs {} do not fit in {}",
                    human_size(a.bs),
                    human_size(size)
                ));
            }
            Some(Region {
                offset_bytes: i as u64 * stripe,
                len_bytes: stripe,
            })
        }
    };
    Ok(LoadSpec {
        queue_depth: a.qd,
        block_bytes: a.bs as usize,
        read_percent,
        pattern,
        region,
        limit: Limit::Time(Duration::from_secs_f64(a.seconds)),
        seed: 0x5eed_b10b ^ (i as u64 + 1).wrapping_mul(0x1234_5678_9abc_def1),
    })
}

fn run(a: &Args) -> Result<bool, String> {
    if a.qd == 0 || a.threads == 0 || a.bs == 0 || !a.seconds.is_finite() || a.seconds <= 0.0 {
        return Err("--qd, --threads, --bs and --seconds must be positive".into());
    }
    let spec = DeviceSpec::parse(&a.device).map_err(|e| e.to_string())?;
    let report = attach_controller(&spec, a)?;
    let dev: Arc<dyn BlockDevice> = spec
        .open()
        .map_err(|e| format!("opening {}: {e}", a.device))?;
    let g = dev.geometry();
    if !a.bs.is_multiple_of(g.block_size as u64) || a.bs > g.size_bytes() {
        return Err(format!(
            "--bs {} must be a multiple of the block size {} and fit in the device ({})",
            a.bs,
            g.block_size,
            human_size(g.size_bytes())
        ));
    }
    let workers = if a.cores.is_empty() {
        a.threads
    } else {
        a.cores.len()
    };
    let specs = (0..workers)
        .map(|i| worker_spec(a, workers, i, g.size_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
    let idle = match a.idle {
        Idle::Block => IdlePolicy::Block { spin: BLOCK_SPIN },
        Idle::Sleep => IdlePolicy::default(),
        Idle::Spin => IdlePolicy::Spin,
    };
    let builder = Reactors::builder()
        .idle_policy(idle)
        .thread_name("bdevperf");
    let builder = if a.cores.is_empty() {
        builder.unpinned(workers)
    } else {
        builder.pinned(&a.cores)
    };
    let reactors = builder
        .start()
        .map_err(|e| format!("starting reactors: {e}"))?;
    println!(
        "device {} ({}, {}-byte blocks): {} bs={} qd={} workers={} on {} seconds={}{}",
        dev.name(),
        human_size(g.size_bytes()),
        g.block_size,
        a.rw.to_possible_value()
            .map_or_else(String::new, |v| v.get_name().to_string()),
        a.bs,
        a.qd,
        workers,
        if a.cores.is_empty() {
            "unpinned reactors".to_string()
        } else {
            format!("reactors pinned to cores {:?}", a.cores)
        },
        a.seconds,
        if a.rw == Rw::Randrw {
            format!(" mix={}% reads", a.mix)
        } else {
            String::new()
        }
    );
    let mut handles = Vec::new();
    for (h, spec) in reactors.handles().iter().zip(specs) {
        let dev = dev.clone();
        let handle = h
            .spawn(move || async move {
                let target = RawTarget::new(dev)?;
                run_load(&target, &spec).await
            })
            .map_err(|e| format!("starting a worker: {e}"))?;
        handles.push(handle);
    }
    let results: Vec<blobstore::Result<LoadReport>> = handles
        .into_iter()
        .map(|h| h.join().and_then(|r| r))
        .collect();
    let shutdown = reactors.shutdown();
    let mut latency = LatencyHistogram::new();
    let (mut iops, mut mib_s, mut errors) = (0.0, 0.0, 0);
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(r) => {
                println!("  worker {i}: {} ops, {:.0} IOPS", r.ops(), r.iops());
                iops += r.iops();
                mib_s += r.mib_per_s();
                latency.merge(&r.latency());
            }
            Err(e) => {
                println!("  worker {i}: I/O error: {e}");
                errors += 1;
            }
        }
    }
    println!(
        "total: {iops:.0} IOPS, {mib_s:.2} MiB/s, latency us: avg {:.1} p50 {:.1} p99 {:.1} \
         p99.9 {:.1} max {:.1}; {errors} errors",
        latency.mean_us(),
        latency.percentile_us(50.0),
        latency.percentile_us(99.0),
        latency.percentile_us(99.9),
        latency.max_us(),
    );
    if let Some(r) = report {
        println!("{}", r());
    }
    shutdown.map_err(|e| format!("stopping reactors: {e}"))?;
    Ok(errors == 0)
}

fn main() -> ExitCode {
    let a = Args::parse();
    match run(&a) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bdevperf: {e}");
            ExitCode::FAILURE
        }
    }
}
