//! `blobstore-bench`: 4 KiB random read and write IOPS through the blobstore
//! against the raw device in the same run, at several queue depths from one
//! thread, plus metadata cycles per second; prints a table of medians.
//!
//! Each pair (raw, blob) runs alternately for several rounds, the order
//! flipping every round, so drift on a shared machine hits both alike; the
//! ratio is the median of the per-round ratios.
//!
//! Exit status: 0 when the memory device ran (or, if it was not asked for,
//! when every device asked for ran); a device that cannot be opened is
//! reported and skipped.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use benches::json::Json;
use benches::load::{run_load_blocking, Limit, LoadReport, LoadSpec};
use benches::scenario::{
    metadata_cycle, resolve_device, run_repeated, run_synced_writes, BlobVsRaw, RepeatReport,
};
use benches::stats::median;
use blobstore::util::{format_size, parse_size};
use blobstore::Result;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    about = "Blobstore vs raw device: random I/O IOPS and metadata ops/s, as medians of alternating rounds"
)]
struct Args {
    /// Devices to run: `mem`, `file` (an image in --dir, removed after), or
    /// any device spec (e.g. `file:/dev/nvme0n1`), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "mem,file")]
    devices: Vec<String>,
    /// Seconds per measurement (each round measures raw and blob once per case).
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Rounds per case; medians are over rounds.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Size of the `mem` and `file` devices (K, M, G, T suffixes).
    #[arg(long, default_value = "1G")]
    size: String,
    /// Queue depths, comma separated.
    #[arg(long = "qd", value_delimiter = ',', default_value = "1,32")]
    queue_depths: Vec<usize>,
    /// Bytes per I/O (K, M suffixes).
    #[arg(long, default_value = "4K")]
    block_size: String,
    /// Directory for the `file` device's image (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Also write the results as JSON to this path.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One measured side (raw or blob) of one round.
#[derive(Clone, Copy, Debug)]
struct Sample {
    iops: f64,
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
}

impl From<&LoadReport> for Sample {
    fn from(r: &LoadReport) -> Sample {
        let lat = r.latency();
        Sample {
            iops: r.iops(),
            mib_s: r.mib_per_s(),
            p50_us: lat.percentile_us(50.0),
            p99_us: lat.percentile_us(99.0),
            p999_us: lat.percentile_us(99.9),
        }
    }
}

fn median_of(samples: &[Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    median(&samples.iter().map(f).collect::<Vec<_>>())
}

fn side_json(samples: &[Sample]) -> Json {
    Json::obj([
        ("iops_median", median_of(samples, |s| s.iops).into()),
        ("mib_s_median", median_of(samples, |s| s.mib_s).into()),
        ("p50_us_median", median_of(samples, |s| s.p50_us).into()),
        ("p99_us_median", median_of(samples, |s| s.p99_us).into()),
        ("p999_us_median", median_of(samples, |s| s.p999_us).into()),
        (
            "iops_rounds",
            Json::Arr(samples.iter().map(|s| s.iops.into()).collect()),
        ),
    ])
}

fn lat_str(samples: &[Sample]) -> String {
    format!(
        "{:.1}/{:.1}/{:.1}",
        median_of(samples, |s| s.p50_us),
        median_of(samples, |s| s.p99_us),
        median_of(samples, |s| s.p999_us)
    )
}

/// One (queue depth, workload) case across rounds.
struct Case {
    queue_depth: usize,
    workload: &'static str,
    read_percent: u8,
    raw: Vec<Sample>,
    blob: Vec<Sample>,
}

impl Case {
    fn ratios(&self) -> Vec<f64> {
        self.raw
            .iter()
            .zip(&self.blob)
            .map(|(r, b)| b.iops / r.iops)
            .collect()
    }
}

/// Metadata cycles and their baseline across rounds.
#[derive(Default)]
struct Metadata {
    cycles_per_s: Vec<f64>,
    cycle_p50_us: Vec<f64>,
    cycle_p99_us: Vec<f64>,
    synced_writes_per_s: Vec<f64>,
}

impl Metadata {
    fn ratios(&self) -> Vec<f64> {
        self.cycles_per_s
            .iter()
            .zip(&self.synced_writes_per_s)
            .map(|(c, w)| c / w)
            .collect()
    }
}

enum Outcome {
    Ran {
        precondition: Duration,
        cases: Vec<Case>,
        metadata: Metadata,
    },
    /// The device could not be opened (e.g. not built yet).
    Unavailable(String),
    /// It opened but a measurement failed.
    Failed(String),
}

struct DeviceRun {
    label: String,
    spec: String,
    outcome: Outcome,
}

fn measure(
    setup: &BlobVsRaw,
    args: &Args,
    block_bytes: usize,
    limit: Limit,
) -> Result<(Vec<Case>, Metadata)> {
    let mut cases = Vec::new();
    for &qd in &args.queue_depths {
        for (workload, read_percent) in [("randread", 100u8), ("randwrite", 0)] {
            cases.push(Case {
                queue_depth: qd,
                workload,
                read_percent,
                raw: Vec::new(),
                blob: Vec::new(),
            });
        }
    }
    let mut md = Metadata::default();
    for round in 0..args.rounds {
        eprint!("  round {}/{}:", round + 1, args.rounds);
        for (i, case) in cases.iter_mut().enumerate() {
            let spec = LoadSpec {
                block_bytes,
                seed: (round * 1000 + i) as u64,
                ..LoadSpec::rand_4k(case.queue_depth, case.read_percent, limit)
            };
            let raw_spec = setup.raw_spec(&spec);
            // Flip the order every round so drift is shared.
            if round % 2 == 0 {
                case.raw
                    .push((&run_load_blocking(&setup.raw, &raw_spec)?).into());
                case.blob
                    .push((&run_load_blocking(&setup.blob, &spec)?).into());
            } else {
                case.blob
                    .push((&run_load_blocking(&setup.blob, &spec)?).into());
                case.raw
                    .push((&run_load_blocking(&setup.raw, &raw_spec)?).into());
            }
            let (r, b) = (case.raw.last().unwrap(), case.blob.last().unwrap());
            eprint!(
                " qd{} {} {:.2}x;",
                case.queue_depth,
                case.workload,
                b.iops / r.iops
            );
        }
        let cycles = || run_repeated(limit, |_| metadata_cycle(&setup.store));
        let synced = || run_synced_writes(&setup.raw, setup.raw_region, limit);
        let (c, w): (RepeatReport, RepeatReport) = if round % 2 == 0 {
            let w = synced()?;
            (cycles()?, w)
        } else {
            let c = cycles()?;
            (c, synced()?)
        };
        md.cycles_per_s.push(c.per_sec());
        md.cycle_p50_us.push(c.latency.percentile_us(50.0));
        md.cycle_p99_us.push(c.latency.percentile_us(99.0));
        md.synced_writes_per_s.push(w.per_sec());
        eprintln!(" md {:.0}/s", c.per_sec());
    }
    Ok((cases, md))
}

fn run_device(entry: &str, args: &Args, size: u64, block_bytes: usize, limit: Limit) -> DeviceRun {
    let parent = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let label = entry.to_string();
    let (spec, _dir) = match resolve_device(entry, size, &parent) {
        Ok(x) => x,
        Err(e) => {
            return DeviceRun {
                label,
                spec: entry.to_string(),
                outcome: Outcome::Unavailable(e.to_string()),
            }
        }
    };
    let run = |outcome| DeviceRun {
        label: label.clone(),
        spec: spec.clone(),
        outcome,
    };
    eprintln!("{label}: opening {spec}");
    let setup = match BlobVsRaw::open(&spec, &Default::default()) {
        Ok(s) => s,
        Err(e) => return run(Outcome::Unavailable(e.to_string())),
    };
    eprintln!(
        "{label}: blob of {} clusters ({}), raw region {}+{}; preconditioning",
        setup.blob.blob().num_clusters(),
        format_size(setup.raw_region.len_bytes),
        setup.raw_region.offset_bytes,
        setup.raw_region.len_bytes
    );
    let precondition = match setup.precondition() {
        Ok(t) => t,
        Err(e) => return run(Outcome::Failed(format!("preconditioning: {e}"))),
    };
    eprintln!(
        "{label}: preconditioned in {:.1} s",
        precondition.as_secs_f64()
    );
    match measure(&setup, args, block_bytes, limit) {
        Ok((cases, metadata)) => run(Outcome::Ran {
            precondition,
            cases,
            metadata,
        }),
        Err(e) => {
            eprintln!();
            run(Outcome::Failed(e.to_string()))
        }
    }
    // `setup` (and so the device) drops before `_dir` removes the image.
}

fn print_table(runs: &[DeviceRun], args: &Args, block_bytes: usize) {
    println!();
    println!(
        "blobstore vs raw device: {} random I/O, one thread, median of {} rounds x {:.1} s (raw and blob alternate)",
        format_size(block_bytes as u64),
        args.rounds,
        args.seconds
    );
    println!(
        "{:<6} {:>3} {:<9} {:>10} {:>10} {:>8}  {:>22}  {:>22}",
        "device",
        "qd",
        "workload",
        "raw IOPS",
        "blob IOPS",
        "blob/raw",
        "raw p50/p99/p99.9 us",
        "blob p50/p99/p99.9 us"
    );
    for run in runs {
        match &run.outcome {
            Outcome::Ran { cases, .. } => {
                for c in cases {
                    println!(
                        "{:<6} {:>3} {:<9} {:>10.0} {:>10.0} {:>7.2}x  {:>22}  {:>22}",
                        run.label,
                        c.queue_depth,
                        c.workload,
                        median_of(&c.raw, |s| s.iops),
                        median_of(&c.blob, |s| s.iops),
                        median(&c.ratios()),
                        lat_str(&c.raw),
                        lat_str(&c.blob)
                    );
                }
            }
            Outcome::Unavailable(e) => {
                println!("{:<6} not run: cannot open {}: {e}", run.label, run.spec)
            }
            Outcome::Failed(e) => println!("{:<6} FAILED on {}: {e}", run.label, run.spec),
        }
    }
    println!();
    println!(
        "metadata cycle = create (1 cluster) + open + resize to 4 + sync_metadata + close + delete; \
         baseline = one synced 4 KiB raw write (write + flush)"
    );
    println!(
        "{:<6} {:>12} {:>10} {:>10} {:>16} {:>14}",
        "device", "cycles/s", "p50 us", "p99 us", "synced writes/s", "cycles/synced"
    );
    for run in runs {
        if let Outcome::Ran { metadata: m, .. } = &run.outcome {
            println!(
                "{:<6} {:>12.0} {:>10.1} {:>10.1} {:>16.0} {:>13.3}x",
                run.label,
                median(&m.cycles_per_s),
                median(&m.cycle_p50_us),
                median(&m.cycle_p99_us),
                median(&m.synced_writes_per_s),
                median(&m.ratios())
            );
        }
    }
}

fn to_json(runs: &[DeviceRun], args: &Args, size: u64, block_bytes: usize) -> Json {
    let devices = runs
        .iter()
        .map(|run| {
            let mut fields = vec![
                ("device".to_string(), Json::str(&run.label)),
                ("spec".to_string(), Json::str(&run.spec)),
            ];
            match &run.outcome {
                Outcome::Ran {
                    precondition,
                    cases,
                    metadata: m,
                } => {
                    fields.push(("status".into(), Json::str("ok")));
                    fields.push(("precondition_s".into(), precondition.as_secs_f64().into()));
                    let io = cases
                        .iter()
                        .map(|c| {
                            Json::obj([
                                ("queue_depth", (c.queue_depth as u64).into()),
                                ("workload", Json::str(c.workload)),
                                ("raw", side_json(&c.raw)),
                                ("blob", side_json(&c.blob)),
                                ("blob_over_raw_median", median(&c.ratios()).into()),
                                (
                                    "blob_over_raw_rounds",
                                    Json::Arr(c.ratios().into_iter().map(Json::from).collect()),
                                ),
                            ])
                        })
                        .collect();
                    fields.push(("io".into(), Json::Arr(io)));
                    let arr = |v: &[f64]| Json::Arr(v.iter().map(|&x| x.into()).collect());
                    fields.push((
                        "metadata".into(),
                        Json::obj([
                            ("cycles_per_s_median", median(&m.cycles_per_s).into()),
                            ("cycle_p50_us_median", median(&m.cycle_p50_us).into()),
                            ("cycle_p99_us_median", median(&m.cycle_p99_us).into()),
                            (
                                "synced_writes_per_s_median",
                                median(&m.synced_writes_per_s).into(),
                            ),
                            (
                                "cycles_over_synced_writes_median",
                                median(&m.ratios()).into(),
                            ),
                            ("cycles_per_s_rounds", arr(&m.cycles_per_s)),
                            ("synced_writes_per_s_rounds", arr(&m.synced_writes_per_s)),
                        ]),
                    ));
                }
                Outcome::Unavailable(e) => {
                    fields.push(("status".into(), Json::str("unavailable")));
                    fields.push(("error".into(), Json::str(e)));
                }
                Outcome::Failed(e) => {
                    fields.push(("status".into(), Json::str("failed")));
                    fields.push(("error".into(), Json::str(e)));
                }
            }
            Json::Obj(fields)
        })
        .collect();
    Json::obj([
        ("bench", Json::str("blobstore-bench")),
        ("block_bytes", (block_bytes as u64).into()),
        ("device_size_bytes", size.into()),
        ("seconds_per_measurement", args.seconds.into()),
        ("rounds", (args.rounds as u64).into()),
        ("devices", Json::Arr(devices)),
    ])
}

fn main() -> ExitCode {
    let args = Args::parse();
    let fail = |msg: String| {
        eprintln!("blobstore-bench: {msg}");
        ExitCode::from(2)
    };
    let size = match parse_size(&args.size) {
        Ok(s) => s,
        Err(e) => return fail(format!("--size: {e}")),
    };
    let block_bytes = match parse_size(&args.block_size) {
        Ok(b) if b > 0 && b <= 1 << 30 => b as usize,
        Ok(b) => return fail(format!("--block-size {b}: must be 1 byte to 1 GiB")),
        Err(e) => return fail(format!("--block-size: {e}")),
    };
    if !(args.seconds > 0.0 && args.seconds.is_finite()) {
        return fail(format!("--seconds {}: must be positive", args.seconds));
    }
    if args.rounds == 0 || args.queue_depths.contains(&0) || args.devices.is_empty() {
        return fail("--rounds, --qd and --devices must be positive / non-empty".into());
    }
    let limit = Limit::Time(Duration::from_secs_f64(args.seconds));

    let runs: Vec<DeviceRun> = args
        .devices
        .iter()
        .map(|d| run_device(d.trim(), &args, size, block_bytes, limit))
        .collect();
    print_table(&runs, &args, block_bytes);

    if let Some(path) = &args.json {
        let text = to_json(&runs, &args, size, block_bytes).to_string();
        match std::fs::write(path, text + "\n") {
            Ok(()) => println!("\nresults written to {}", path.display()),
            Err(e) => return fail(format!("cannot write {}: {e}", path.display())),
        }
    }

    let ran = |r: &DeviceRun| matches!(r.outcome, Outcome::Ran { .. });
    let mem_runs: Vec<&DeviceRun> = runs.iter().filter(|r| r.label == "mem").collect();
    let ok = if mem_runs.is_empty() {
        runs.iter().all(ran)
    } else {
        mem_runs.iter().all(|r| ran(r))
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
