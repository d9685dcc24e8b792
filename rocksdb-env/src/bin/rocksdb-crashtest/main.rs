//! The RocksDB crash-test driver, in the style of RocksDB's
//! `tools/db_crashtest.py` (blackbox mode): runs `db_stress` on BlobFS with
//! verification on, SIGKILLs it at a random moment, restarts it on the same
//! database (which verifies it against the expected values kept on the host),
//! and repeats. The kill comes `--min-secs`..`--max-secs` after db_stress
//! prints that its workload started (an open that takes over a minute is
//! killed all the same): counted from the process start, short rounds spent
//! nearly all their time reopening the database and never ran the workload.
//!
//! ```text
//! rocksdb-crashtest --db-stress <path> [--mode kill|powerloss|plain]
//!                   [--rounds N] [--seed S] [--dir DIR] [--min-secs A]
//!                   [--max-secs B] [--size 4G] [--faults]
//!                   [--write-faults N] [--ops N] [--device SPEC]
//! ```
//!
//! The database lives on an image file in `--dir`, or on the device
//! `--device` names (`nvme:<pci>/ns=<n>`, say: the VM test runs kill rounds
//! on NVMe namespaces; not with `powerloss`, which plays the cut on an
//! image file). The first round formats it (`mkfs=force`).
//!
//! Modes:
//! - `kill`: SIGKILL only. BlobFS keeps appends in the process until a sync,
//!   so what RocksDB wrote but did not sync is lost.
//! - `powerloss`: the device runs with `powerloss=on`, and after each kill
//!   [`blobstore::testing::recover`] undoes, keeps or tears every
//!   write no completed device flush made durable, as a power cut would.
//!   A timed SIGKILL seldom finds such writes (BlobFS flushes right after
//!   each sync's writes), so about half the rounds after the first instead
//!   cut mid-I/O: the device spec gets `powerloss_cut_after=N` (and
//!   `powerloss_cut_when=before|after`, drawn from the seed), and db_stress
//!   SIGKILLs itself when its N-th device write or flush is submitted, inside
//!   a sync, a metadata update or a compaction. N is drawn uniformly from
//!   1..=E, where E estimates how many such ops a round issues: E grows by a
//!   quarter after a round whose cut fired and shrinks by a fifth after one
//!   whose timer fired first (N was past the round's ops; the timed kill
//!   then stands in), so about half the cuts fire, spread over the whole
//!   round. The summary counts, for each kind of stop, how many rounds left
//!   unflushed writes and what the power cut did to them.
//! - `plain`: no kill; each round runs `--ops` operations per thread to the
//!   end and must exit 0 (db_crashtest's whitebox rule for a run without a
//!   kill), then the next round reopens and verifies the database.
//!
//! `--faults` turns on db_stress's own fault injection (RocksDB's
//! FaultInjectionTestFS wrapped around our FileSystem), with values drawn
//! per round from the lists db_crashtest uses: read, metadata-read, write
//! and metadata-write faults always on (1 in 32/1000 reads, 1 in 128/1000
//! writes), the four open-time kinds in a third of the rounds each. It needs
//! a db_stress linked with a debug (no NDEBUG) RocksDB: a release one
//! refuses read faults and compiles the per-operation write faults out.
//! db_stress tolerates the faults it injects itself (it retries, or accepts
//! an injected error as the operation's result), so the judgement does not
//! loosen: as db_crashtest.py, a round also fails on any line on stderr.
//! Rounds without a WAL get no write faults (as db_crashtest), rounds with
//! write faults `--max_write_buffer_number=10` (the same), and every fault
//! round db_crashtest's 8 or 32 MiB block cache (db_stress's 2 GiB keeps
//! reads off the file system), 1 MiB compaction readahead and 16 KiB
//! blocks (db_crashtest values;
//! with db_stress's defaults a compaction is one read per 4 KiB block, and at
//! 1 in 32 reads failing it never completes, see `stress_args`). The faults each
//! round injected are counted from db_stress's injected-error log
//! (`/tmp/fault_injection_logs/fault_injection_<pid>_*.bin`, 256-byte
//! records written as they happen, so a SIGKILL keeps them), which the
//! driver deletes once counted. The final verification runs without faults.
//! `--write-faults N` sets the write and metadata-write odds to 1 in N in
//! every round with a WAL (the draws of the other knobs are unchanged, so a
//! seed replays the same rounds with only those odds changed; rounds
//! without a WAL keep theirs, see `fault_knobs`), and keeps WAL writes out
//! of the write faults (RocksDB's recovery from a failed WAL write can
//! retry forever, see `stress_args`).
//!
//! `strict` mode kills as `kill` does, but runs db_stress without
//! `--sync_fault_injection`: then every acknowledged write must be there
//! after the kill, synced or not (what POSIX promises when only the process
//! dies, and what BlobFS keeps in unsynced memory for the next mount); its
//! rounds always keep the WAL.
//!
//! In the other modes only unsynced data may be lost, so their rounds run
//! with `--sync_fault_injection=1`: db_stress then traces its expected state
//! (`MightHaveUnsyncedDataLoss()`) and, at the next open, checks that the
//! database recovered to a prefix of the acknowledged writes, exactly. Some
//! rounds also run with `--disable_wal=1` (with `--atomic_flush=1`, as
//! db_crashtest does), where the memtable is lost and only flushed data must
//! come back. These modes leave SingleDelete out (`--nooverwritepercent=0`;
//! why is in `stress_args`).
//!
//! A round fails when db_stress exits on its own with a non-zero status, or
//! prints a verification failure, corruption or error line (its stdout goes
//! to `round-NNN.log`, its stderr to `round-NNN.err`); the driver then
//! stops, keeps the image, its log and the expected values, and prints how to
//! replay. After the last round a verification-only run checks the final
//! database. Exit status: 0 when every round passed, 1 on a failure, 2 on a
//! usage or setup error.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use blobstore::testing::powerloss;

/// Which crash the driver simulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// SIGKILL of the process.
    Kill,
    /// SIGKILL of the process, and nothing acknowledged may be lost: no
    /// `--sync_fault_injection`, so db_stress expects every write it was
    /// told succeeded, as on POSIX after a process crash; every round keeps
    /// its WAL (without one the memtable is lost on any file system).
    Strict,
    /// SIGKILL, then a simulated power cut on the image.
    PowerLoss,
    /// No kill: every round runs its operations to the end.
    Plain,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Kill => "kill",
            Mode::Strict => "strict",
            Mode::PowerLoss => "powerloss",
            Mode::Plain => "plain",
        }
    }
}

/// How long the final verification-only run may take.
const VERIFY_TIMEOUT_SECS: f64 = 600.0;

/// How long a `plain` round may take to run its operations.
const PLAIN_TIMEOUT_SECS: f64 = 600.0;

/// Command-line settings.
#[derive(Clone, Debug)]
struct Config {
    db_stress: PathBuf,
    mode: Mode,
    rounds: u32,
    seed: u64,
    dir: PathBuf,
    min_secs: f64,
    max_secs: f64,
    size: String,
    /// db_stress's own fault injection on (see the module docs).
    faults: bool,
    /// `--write-faults N`: write and metadata-write faults at 1 in N in
    /// every round with a WAL, instead of db_crashtest's 1 in 128 or 1000.
    write_faults: Option<u32>,
    /// Operations per thread of a `plain` round.
    ops: u64,
    /// A device spec to run on instead of an image file in `dir`.
    device: Option<String>,
}

const USAGE: &str =
    "usage: rocksdb-crashtest --db-stress <path> [--mode kill|strict|powerloss|plain] \
[--rounds N] [--seed S] [--dir DIR] [--min-secs A] [--max-secs B] [--size 4G] [--faults] \
[--write-faults N] [--ops N] [--device SPEC]";

fn parse_args(args: &[String]) -> Result<Config, String> {
    let mut cfg = Config {
        db_stress: PathBuf::new(),
        mode: Mode::Kill,
        rounds: 5,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000_007)
            .unwrap_or(1),
        dir: std::env::temp_dir().join(format!("rocksdb-crashtest-{}", std::process::id())),
        min_secs: 2.0,
        max_secs: 10.0,
        size: "4G".into(),
        faults: false,
        write_faults: None,
        ops: 5_000,
        device: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        let num = |v: String, what: &str| -> Result<f64, String> {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| format!("{what} {v:?} is not a non-negative number"))
        };
        match flag.as_str() {
            "--db-stress" => cfg.db_stress = PathBuf::from(value()?),
            "--mode" => {
                cfg.mode = match value()?.as_str() {
                    "kill" => Mode::Kill,
                    "strict" => Mode::Strict,
                    "powerloss" => Mode::PowerLoss,
                    "plain" => Mode::Plain,
                    m => {
                        return Err(format!(
                            "--mode {m:?}: expected kill, strict, powerloss or plain"
                        ))
                    }
                }
            }
            "--rounds" => {
                let v = value()?;
                cfg.rounds = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("--rounds {v:?} is not a positive number"))?
            }
            "--seed" => {
                let v = value()?;
                cfg.seed = v
                    .parse()
                    .map_err(|_| format!("--seed {v:?} is not a number"))?
            }
            "--dir" => cfg.dir = PathBuf::from(value()?),
            "--min-secs" => cfg.min_secs = num(value()?, "--min-secs")?,
            "--max-secs" => cfg.max_secs = num(value()?, "--max-secs")?,
            "--size" => cfg.size = value()?,
            "--faults" => cfg.faults = true,
            "--write-faults" => {
                let v = value()?;
                cfg.write_faults = Some(
                    v.parse()
                        .ok()
                        .filter(|&n: &u32| n > 0)
                        .ok_or_else(|| format!("--write-faults {v:?} is not a positive number"))?,
                )
            }
            "--device" => {
                let v = value()?;
                blobstore::device::DeviceSpec::parse(&v)
                    .map_err(|e| format!("--device {v:?}: {e}"))?;
                cfg.device = Some(v)
            }
            "--ops" => {
                let v = value()?;
                cfg.ops = v
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("--ops {v:?} is not a positive number"))?
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if cfg.db_stress.as_os_str().is_empty() {
        return Err(format!("--db-stress is required\n{USAGE}"));
    }
    if cfg.write_faults.is_some() && !cfg.faults {
        return Err("--write-faults needs --faults".into());
    }
    if cfg.device.is_some() && cfg.mode == Mode::PowerLoss {
        return Err("--device: the powerloss mode plays its cuts on an image file".into());
    }
    if cfg.min_secs > cfg.max_secs {
        return Err(format!(
            "--min-secs {} is above --max-secs {}",
            cfg.min_secs, cfg.max_secs
        ));
    }
    Ok(cfg)
}

/// The workspace's generator: the same seed gives the same knobs.
struct Rng(blobstore::util::SplitMix64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Knobs that hold for the whole run (the expected-values file is sized by
/// them).
#[derive(Clone, Debug, PartialEq)]
struct RunKnobs {
    max_key: u64,
    column_families: u32,
}

fn run_knobs(seed: u64) -> RunKnobs {
    let mut r = Rng(blobstore::util::SplitMix64::new(seed ^ 0x5eed));
    RunKnobs {
        max_key: r.pick(&[10_000, 50_000, 100_000]),
        column_families: r.pick(&[1, 4]),
    }
}

/// Knobs of one round.
#[derive(Clone, Debug, PartialEq)]
struct RoundKnobs {
    threads: u32,
    run_secs: f64,
    disable_wal: bool,
    write_buffer_size: u64,
    target_file_size_base: u64,
    max_bytes_for_level_base: u64,
    flush_one_in: u32,
    compact_range_one_in: u32,
    sync_wal_one_in: u32,
    /// Seed of the power cut after this round.
    cut_seed: u64,
    /// Powerloss mode, rounds after the first: stop this round with a
    /// power cut at a device op instead of a timed kill.
    mid_io_cut: bool,
    /// Where in 1..=E the cut lands, as a fraction (see the module docs).
    cut_point: f64,
    /// `powerloss_cut_when=after` (the cut op is issued) rather than
    /// `before`.
    cut_issued: bool,
    /// `--async_io=1`: db_stress's iterators read ahead through BlobFS's
    /// `ReadAsync`, `Poll` and `AbortIO` (one round in four, as
    /// db_crashtest draws it sometimes). Drawn last, so the draws before it
    /// stay what a seed gave before it was added.
    async_io: bool,
}

fn round_knobs(cfg: &Config, round: u32) -> RoundKnobs {
    let mut r = Rng(blobstore::util::SplitMix64::new(
        cfg.seed.wrapping_mul(1_000_003).wrapping_add(round as u64),
    ));
    RoundKnobs {
        threads: r.pick(&[1, 2, 4]),
        run_secs: cfg.min_secs + r.unit() * (cfg.max_secs - cfg.min_secs),
        disable_wal: r.next().is_multiple_of(5) && cfg.mode != Mode::Strict,
        // Memtables and SSTs past BlobFS's 4 MiB append buffer reach the
        // device before their sync, so a power cut has unflushed writes to
        // act on.
        write_buffer_size: r.pick(&[64 << 10, 1 << 20, 4 << 20, 16 << 20]),
        target_file_size_base: r.pick(&[256 << 10, 2 << 20, 16 << 20]),
        max_bytes_for_level_base: r.pick(&[1 << 20, 10 << 20]),
        flush_one_in: r.pick(&[0, 1_000, 10_000]),
        compact_range_one_in: r.pick(&[0, 1_000, 10_000]),
        sync_wal_one_in: r.pick(&[0, 100, 1_000]),
        cut_seed: r.next(),
        mid_io_cut: cfg.mode == Mode::PowerLoss && round > 1 && r.next() & 1 == 0,
        cut_point: r.unit(),
        cut_issued: r.next() & 1 == 0,
        async_io: r.next().is_multiple_of(4),
    }
}

/// db_stress's fault-injection flags of one round (`--faults`): the
/// `*_fault_one_in` values, 0 for off.
#[derive(Clone, Debug, PartialEq)]
struct FaultKnobs {
    read: u32,
    metadata_read: u32,
    write: u32,
    metadata_write: u32,
    open_read: u32,
    open_metadata_read: u32,
    open_write: u32,
    open_metadata_write: u32,
    /// Block cache bytes: db_crashtest's 8 or 32 MiB rather than
    /// db_stress's 2 GiB, so reads reach the file system (and its faults).
    cache_size: u64,
}

impl FaultKnobs {
    /// The db_stress flags, in db_stress's names.
    fn flags(&self) -> [(&'static str, u32); 8] {
        [
            ("read_fault_one_in", self.read),
            ("metadata_read_fault_one_in", self.metadata_read),
            ("write_fault_one_in", self.write),
            ("metadata_write_fault_one_in", self.metadata_write),
            ("open_read_fault_one_in", self.open_read),
            ("open_metadata_read_fault_one_in", self.open_metadata_read),
            ("open_write_fault_one_in", self.open_write),
            ("open_metadata_write_fault_one_in", self.open_metadata_write),
        ]
    }
}

/// The fault knobs of a round: db_crashtest's value lists (its `0` choices
/// left out of the per-operation kinds, so every round injects), from a
/// stream of its own so that `--faults` leaves the other knobs of a seed as
/// they were. No write faults without a WAL, as db_crashtest.
fn fault_knobs(cfg: &Config, round: u32, k: &RoundKnobs) -> FaultKnobs {
    let mut r = Rng(blobstore::util::SplitMix64::new(
        cfg.seed.wrapping_mul(7_000_003).wrapping_add(round as u64) ^ 0xfa17,
    ));
    let write = cfg.write_faults.unwrap_or(r.pick(&[128, 1_000]));
    let read = r.pick(&[32, 1_000]);
    let metadata_read = r.pick(&[32, 1_000]);
    let drawn = r.pick(&[128, 1_000]);
    // Not in rounds without a WAL: those flush atomically, and RocksDB's
    // recovery from a failed atomic flush can wait forever for the flush it
    // retries (a flush thread waiting to install its result, the recovery
    // thread in WaitForFlushMemTables), on POSIX as on BlobFS; at 1 in 8
    // metadata-write faults it did so in seconds. Those rounds also keep
    // db_stress's fixed fault seeding (see RESEED_FAULTS_ENV), with which
    // it has not been seen at db_crashtest's odds.
    let metadata_write = match cfg.write_faults {
        Some(n) if !k.disable_wal => n,
        _ => drawn,
    };
    FaultKnobs {
        read,
        metadata_read,
        write: if k.disable_wal { 0 } else { write },
        metadata_write,
        open_read: r.pick(&[0, 0, 32]),
        open_metadata_read: r.pick(&[0, 0, 8]),
        open_write: r.pick(&[0, 0, 16]),
        open_metadata_write: r.pick(&[0, 0, 8]),
        cache_size: r.pick(&[8 << 20, 32 << 20]),
    }
}

/// Set in db_stress's environment, our debug db_stress seeds the fault
/// injection of each flush and subcompaction afresh (with `--seed` plus the
/// clock) instead of with `--seed` alone, with which a flush that failed
/// once fails the same way at every retry, forever (cpp/rocksdb-debug.mk).
/// Only in rounds with a WAL: rounds without one flush atomically, and
/// RocksDB's recovery from a failed atomic flush can wait forever on POSIX
/// as on BlobFS (a hang seen at db_crashtest's odds once retries drew
/// fresh faults).
const RESEED_FAULTS_ENV: &str = "BLOBSTACK_RESEED_FAULTS";

/// The device op a mid-I/O cut lands at: uniform in 1..=`estimate`.
fn cut_op(k: &RoundKnobs, estimate: f64) -> u64 {
    1 + (k.cut_point * estimate.max(1.0)) as u64
}

/// First guess at how many device writes and flushes a round issues (the
/// driver adapts it; see the module docs). A 100-round run of 2-4 s of
/// workload ended near 1,200 (BlobFS batches appends, so a round issues
/// device ops mostly at syncs, memtable and SST writes, and metadata
/// updates); starting low puts the first cuts in the open and lets the
/// estimate grow.
const INITIAL_CUT_ESTIMATE: f64 = 200.0;

/// Paths of one run.
struct Paths {
    image: PathBuf,
    expected: PathBuf,
}

impl Paths {
    fn new(dir: &Path) -> Paths {
        Paths {
            image: dir.join("db.img"),
            expected: dir.join("expected"),
        }
    }
}

/// The db_stress arguments of round `round` (1 formats the image), or of
/// the final verification when `knobs` is `None` (`round` 0).
fn stress_args(
    cfg: &Config,
    paths: &Paths,
    run: &RunKnobs,
    knobs: Option<&RoundKnobs>,
    round: u32,
    cut_at: Option<u64>,
) -> Vec<String> {
    let first = round == 1;
    let mut powerloss = if cfg.mode == Mode::PowerLoss {
        "&powerloss=on".to_string()
    } else {
        String::new()
    };
    if let (Some(n), Some(k)) = (cut_at, knobs) {
        let when = if k.cut_issued { "after" } else { "before" };
        let _ = write!(
            powerloss,
            "&powerloss_cut_after={n}&powerloss_cut_when={when}"
        );
    }
    let fs_uri = match &cfg.device {
        // Whatever the device held before (a device is reused from run to
        // run) is formatted over.
        Some(spec) => format!(
            "--fs_uri=blobfs://{spec};mkfs={}",
            if first { "force" } else { "never" }
        ),
        None => format!(
            "--fs_uri=blobfs://file:{}?size={}{powerloss};mkfs={}",
            paths.image.display(),
            cfg.size,
            if first { "always" } else { "never" }
        ),
    };
    let mut a = vec![
        fs_uri,
        "--db=/crashtest".into(),
        format!("--expected_values_dir={}", paths.expected.display()),
        format!("--destroy_db_initially={}", u8::from(first)),
        format!("--max_key={}", run.max_key),
        format!("--column_families={}", run.column_families),
        "--reopen=0".into(),
        "--verify_db_one_in=100000".into(),
        // Same reasons as in cpp/test-rocksdb.sh.
        "--compression_manager=none".into(),
        "--compression_type=none".into(),
        "--clear_column_family_one_in=0".into(),
        "--progress_reports=0".into(),
        // db_stress starts its simulated remote-compaction workers only
        // when it runs operations; with them on (the default, 2) an open
        // that schedules a compaction waits for them forever (most rounds
        // past the first few never got past the open, and a
        // verification-only run hung).
        "--remote_compaction_worker_threads=0".into(),
    ];
    if cfg.mode != Mode::Strict {
        // Only unsynced data can be lost (see the module docs).
        a.push("--sync_fault_injection=1".into());
        // No SingleDelete where recovery is checked as a prefix: RocksDB
        // records a flush's last sequence number as the largest one that
        // survives in its SST, and a SingleDelete that meets its Put in
        // the flushed memtable drops both. When that pair ends the
        // memtable and the kill comes before the next flush, the database
        // reopens at a sequence number below the SingleDelete it holds,
        // and db_stress, which replays its trace up to that number,
        // expects the Put back: a false "Value not found". Seen in a kill
        // round after a no-WAL round (seed 117607499, about 1 run in 26):
        // the Put at sequence 11414 and its SingleDelete at 19625 were both
        // gone, every surviving entry of the SSTs matched the trace at its
        // sequence number, and the MANIFEST said 19624. `strict` mode,
        // which checks every write without a trace, keeps SingleDelete.
        a.push("--nooverwritepercent=0".into());
    }
    // db_stress refuses read faults unless built without NDEBUG; the
    // verification-only run checks the database without faults.
    let faults = match knobs {
        Some(k) if cfg.faults => Some(fault_knobs(cfg, round, k)),
        _ => None,
    };
    match &faults {
        Some(f) => {
            for (name, one_in) in f.flags() {
                a.push(format!("--{name}={one_in}"));
            }
            if f.write > 0 {
                // Background work may stop while the DB resumes after an
                // error (db_crashtest's reason for the same setting).
                a.push("--max_write_buffer_number=10".into());
            }
            if cfg.write_faults.is_some() {
                // RocksDB's auto-recovery from a failed WAL write can retry
                // its flush forever ("Waiting after background flush error:
                // ... failed to write to WAL" once a second): at 1 in 8,
                // 1 of 8 seeds on POSIX and 1 of 8 on BlobFS. db_crashtest
                // keeps WAL writes out of its write faults for this in
                // several configurations; at --write-faults odds we do too.
                a.push("--exclude_wal_from_write_fault_injection=1".into());
            }
            // With db_stress's default of no compaction readahead, every
            // block a compaction reads is one file-system read, each failing
            // with the read-fault odds (db_stress's listener turns them on in
            // compaction threads): a compaction over a few MiB then fails on
            // every retry, and db_stress, which waits for compactions after
            // each open, waits forever (a plain round injected 561 read
            // faults without getting past the open). 1 MiB readahead and
            // 16 KiB blocks (both db_crashtest values) make it a few dozen
            // reads.
            a.push("--compaction_readahead_size=1048576".into());
            a.push("--block_size=16384".into());
            a.push(format!("--cache_size={}", f.cache_size));
        }
        None => {
            a.push("--read_fault_one_in=0".into());
            a.push("--metadata_read_fault_one_in=0".into());
        }
    }
    match knobs {
        Some(k) => {
            if cfg.mode == Mode::Plain {
                a.push(format!("--ops_per_thread={}", cfg.ops));
            } else {
                a.push("--ops_per_thread=100000000".into());
            }
            a.push(format!("--threads={}", k.threads));
            a.push(format!("--async_io={}", u8::from(k.async_io)));
            a.push(format!("--disable_wal={}", u8::from(k.disable_wal)));
            // With several column families and no WAL, only atomic flush
            // keeps recovery a prefix across them (as db_crashtest sets).
            a.push(format!("--atomic_flush={}", u8::from(k.disable_wal)));
            a.push(format!("--write_buffer_size={}", k.write_buffer_size));
            a.push(format!(
                "--target_file_size_base={}",
                k.target_file_size_base
            ));
            a.push(format!(
                "--max_bytes_for_level_base={}",
                k.max_bytes_for_level_base
            ));
            a.push(format!("--flush_one_in={}", k.flush_one_in));
            a.push(format!("--compact_range_one_in={}", k.compact_range_one_in));
            a.push(format!("--sync_wal_one_in={}", k.sync_wal_one_in));
        }
        None => {
            a.push("--verification_only=1".into());
            a.push("--threads=1".into());
            a.push("--ops_per_thread=1".into());
        }
    }
    a
}

/// The count of db_stress's end-of-run statistics line "  : Got errors N
/// times": operations that returned an error db_stress accepted (with
/// `--faults`, the injected ones).
fn stat_errors(line: &str) -> Option<u64> {
    line.trim_start()
        .strip_prefix(':')?
        .trim()
        .strip_prefix("Got errors ")?
        .strip_suffix(" times")?
        .parse()
        .ok()
}

/// A line of db_stress output that means the round failed, as
/// db_crashtest.py judges stderr (any "error" or "fail"), plus corruption.
/// The statistics line [`stat_errors`] fails only when it counts errors
/// with no faults injected (`faults` false).
fn failure_line(line: &str, faults: bool) -> bool {
    if let Some(n) = stat_errors(line) {
        return n > 0 && !faults;
    }
    let l = line.to_ascii_lowercase();
    l.contains("verification failed")
        || l.contains("corruption")
        || l.contains("error")
        || l.contains("fail")
}

/// What happened in one round.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Killed by the driver, as planned.
    Killed,
    /// Exited 0 before the kill.
    CleanExit,
    /// Died of SIGKILL on its own: the device's mid-I/O power cut fired
    /// (only when one was asked for).
    Cut,
    /// Anything else: the reason.
    Failed(String),
}

/// The line db_stress prints when its workload starts (after opening and
/// verifying the database).
const OPS_STARTED: &str = "Starting database operations";

/// How long a round's db_stress may take to open the database before the
/// driver kills it anyway.
const OPEN_LIMIT_SECS: f64 = 60.0;

/// True when the db_stress output in `log` shows the workload started.
fn reached_ops(log: &Path) -> bool {
    std::fs::read_to_string(log).is_ok_and(|t| t.contains(OPS_STARTED))
}

/// Where db_stress's stderr goes: next to `log` (its stdout).
fn err_path(log: &Path) -> PathBuf {
    log.with_extension("err")
}

/// Runs db_stress with `args`, stdout to `log` and stderr to
/// [`err_path`]`(log)`; kills it after `secs`
/// (never when `secs` is `None`), counted from the start of its workload
/// when `from_ops` (so that opening a large database does not eat the
/// round; an open past [`OPEN_LIMIT_SECS`] is killed all the same), else
/// from its start. With `cut`, db_stress dying of SIGKILL on its own is the
/// planned mid-I/O power cut rather than a failure. With `cfg.faults`, any
/// line on stderr fails the round, as in db_crashtest.py (which fails a run
/// on any stderr output whatever the fault settings). Also returns
/// db_stress's process id (none if it did not start).
fn run_stress(
    cfg: &Config,
    args: &[String],
    log: &Path,
    secs: Option<f64>,
    from_ops: bool,
    cut: bool,
) -> (Outcome, Option<u32>) {
    let out = match std::fs::File::create(log) {
        Ok(f) => f,
        Err(e) => {
            return (
                Outcome::Failed(format!("creating {}: {e}", log.display())),
                None,
            )
        }
    };
    let err_log = err_path(log);
    let err = match std::fs::File::create(&err_log) {
        Ok(f) => f,
        Err(e) => {
            let why = format!("creating {}: {e}", err_log.display());
            return (Outcome::Failed(why), None);
        }
    };
    // db_stress writes its progress to a fully buffered stdout, which a
    // SIGKILL throws away: line-buffer it through stdbuf where there is one.
    let stdbuf = Path::new("/usr/bin/stdbuf");
    let mut cmd = if stdbuf.exists() {
        let mut c = Command::new(stdbuf);
        c.arg("-oL").arg(&cfg.db_stress);
        c
    } else {
        Command::new(&cfg.db_stress)
    };
    // Fresh fault draws at every flush retry (our debug db_stress, see
    // cpp/rocksdb-debug.mk), in rounds with a WAL only.
    if cfg.faults && args.iter().any(|a| a == "--disable_wal=0") {
        cmd.env(RESEED_FAULTS_ENV, "1");
    } else {
        cmd.env_remove(RESEED_FAULTS_ENV);
    }
    let mut child = match cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            let why = format!("starting {}: {e}", cfg.db_stress.display());
            return (Outcome::Failed(why), None);
        }
    };
    let pid = Some(child.id());
    let start = Instant::now();
    let mut deadline = if from_ops {
        None
    } else {
        secs.map(|s| start + Duration::from_secs_f64(s))
    };
    let mut polls = 0u64;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) => {}
            Err(e) => return (Outcome::Failed(format!("waiting for db_stress: {e}")), pid),
        }
        if from_ops && deadline.is_none() {
            if let Some(s) = secs {
                // Every 100 ms: the log is a few KiB until the workload runs.
                if polls.is_multiple_of(5) && reached_ops(log) {
                    deadline = Some(Instant::now() + Duration::from_secs_f64(s));
                } else if start.elapsed().as_secs_f64() > OPEN_LIMIT_SECS {
                    deadline = Some(Instant::now());
                }
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break None;
        }
        polls += 1;
        std::thread::sleep(Duration::from_millis(20));
    };
    let outcome = match status {
        None => {
            if let Err(e) = child.kill() {
                return (Outcome::Failed(format!("killing db_stress: {e}")), pid);
            }
            let _ = child.wait();
            Outcome::Killed
        }
        Some(st) if st.success() => Outcome::CleanExit,
        Some(st) if cut && st.signal() == Some(libc::SIGKILL) => Outcome::Cut,
        Some(st) => Outcome::Failed(format!("db_stress exited on its own with {st}")),
    };
    // A verification failure may be printed without a non-zero exit.
    for (path, any_line) in [(log.to_path_buf(), false), (err_log, cfg.faults)] {
        if let Ok(f) = std::fs::File::open(&path) {
            for line in BufReader::new(f).lines().map_while(Result::ok) {
                if failure_line(&line, cfg.faults) || (any_line && !line.trim().is_empty()) {
                    return (Outcome::Failed(format!("db_stress printed: {line}")), pid);
                }
            }
        }
    }
    (outcome, pid)
}

/// Where db_stress keeps its injected-error logs when it runs on an
/// `--fs_uri` (`GetFaultInjectionLogBaseDir` in db_stress_test_base.cc).
const FAULT_LOG_DIR: &str = "/tmp/fault_injection_logs";

/// Size of one record of db_stress's injected-error log
/// (`InjectedErrorLog::Entry` in utilities/fault_injection_fs.h).
const FAULT_RECORD_LEN: usize = 256;

/// Where the operation name sits in a record, and its length: after the
/// timestamp, thread id (8 bytes each), the 72-byte detail and four one-byte
/// fields.
const FAULT_RECORD_OP: std::ops::Range<usize> = 92..124;

/// Counts the faults db_stress process `pid` injected, by operation name,
/// from its injected-error logs in `dir`, and deletes those logs. Records
/// with a zero timestamp (a file cut short mid-record) are not counted.
fn take_injected_faults(dir: &Path, pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut by_op = std::collections::BTreeMap::new();
    let prefix = format!("fault_injection_{pid}_");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return by_op;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&prefix) || !name.ends_with(".bin") {
            continue;
        }
        if let Ok(bytes) = std::fs::read(e.path()) {
            for rec in bytes.chunks_exact(FAULT_RECORD_LEN) {
                if rec[..8].iter().all(|&b| b == 0) {
                    continue;
                }
                let op = &rec[FAULT_RECORD_OP];
                let end = op.iter().position(|&b| b == 0).unwrap_or(op.len());
                let op = String::from_utf8_lossy(&op[..end]).into_owned();
                *by_op.entry(op).or_insert(0) += 1;
            }
        }
        let _ = std::fs::remove_file(e.path());
    }
    by_op
}

/// Waits until no process holds the lock of `image` (how long a killed
/// db_stress keeps it: the kernel tears its io_uring down after the process
/// is reaped, and the file's lock goes with the ring's last reference).
fn wait_unlocked(image: &Path) -> Result<(), String> {
    blobstore::device::wait_unlocked(image, LOCK_WAIT)
        .map_err(|e| format!("after db_stress was killed: {e}"))
}

/// How long a killed db_stress may keep its image locked.
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// What the power cuts after one kind of stop found and did.
#[derive(Default, Debug)]
struct CutTotals {
    /// Rounds stopped this way whose image went through recovery.
    rounds: u32,
    /// Of those, rounds with writes no completed flush covered.
    with_unflushed: u32,
    /// Unflushed writes and their fates, summed.
    writes: u64,
    undone: u64,
    kept: u64,
    torn: u64,
}

impl CutTotals {
    fn add(&mut self, r: &powerloss::RecoveryReport) {
        self.rounds += 1;
        self.with_unflushed += u32::from(r.writes > 0);
        self.writes += r.writes;
        self.undone += r.undone;
        self.kept += r.kept;
        self.torn += r.torn;
    }

    fn line(&self) -> String {
        format!(
            "{} of {} rounds had unflushed writes; {} writes: {} undone, {} kept, {} torn",
            self.with_unflushed, self.rounds, self.writes, self.undone, self.kept, self.torn
        )
    }
}

/// Totals of a run.
#[derive(Default, Debug)]
struct Summary {
    rounds: u32,
    kills: u32,
    clean_exits: u32,
    failures: u32,
    /// Rounds that planned a mid-I/O power cut.
    cuts_planned: u32,
    /// Of those, rounds whose cut fired (the others ended on the timer).
    cuts_fired: u32,
    /// Power cuts after timed kills.
    after_kill: CutTotals,
    /// Power cuts at a device op.
    mid_io: CutTotals,
    /// The last estimate of device ops per round.
    cut_estimate: f64,
    /// Rounds whose db_stress got past opening the database.
    reached_ops: u32,
    /// `plain` rounds that ran all their operations and exited 0.
    completed: u32,
    /// `--faults`: rounds in which db_stress injected at least one fault.
    rounds_with_faults: u32,
    /// `--faults`: injected faults by operation, over all rounds.
    faults: std::collections::BTreeMap<String, u64>,
    /// Operations that returned an error db_stress accepted, from the
    /// statistics of rounds that ran to the end ([`stat_errors`]).
    accepted_errors: u64,
}

fn print_summary(cfg: &Config, s: &Summary, elapsed: Duration, run: &RunKnobs) {
    let mut t = String::new();
    let _ = writeln!(t, "== crash test summary");
    let _ = writeln!(
        t,
        "mode:                   {}{}",
        cfg.mode.name(),
        if cfg.faults {
            ", db_stress faults on"
        } else {
            ""
        }
    );
    let _ = writeln!(t, "seed:                   {}", cfg.seed);
    let _ = writeln!(
        t,
        "keys, column families:  {}, {}",
        run.max_key, run.column_families
    );
    let _ = writeln!(t, "rounds:                 {}", s.rounds);
    if cfg.mode == Mode::Plain {
        let _ = writeln!(t, "ran to the end:         {}", s.completed);
    } else {
        let _ = writeln!(t, "kills:                  {}", s.kills);
        let _ = writeln!(t, "clean exits:            {}", s.clean_exits);
    }
    let _ = writeln!(t, "verification failures:  {}", s.failures);
    let _ = writeln!(t, "rounds past the open:   {}", s.reached_ops);
    if cfg.mode == Mode::PowerLoss {
        let _ = writeln!(
            t,
            "mid-I/O cuts:           {} planned, {} fired, {} ended on the timer \
             (last estimate {:.0} device ops per round)",
            s.cuts_planned,
            s.cuts_fired,
            s.cuts_planned - s.cuts_fired,
            s.cut_estimate
        );
        let _ = writeln!(t, "power cuts, mid-I/O:    {}", s.mid_io.line());
        let _ = writeln!(t, "power cuts, timed kill: {}", s.after_kill.line());
    }
    if cfg.faults {
        let total: u64 = s.faults.values().sum();
        let ops: Vec<String> = s.faults.iter().map(|(op, n)| format!("{op} {n}")).collect();
        let _ = writeln!(
            t,
            "injected faults:        {total} in {} rounds ({})",
            s.rounds_with_faults,
            ops.join(", ")
        );
    }
    if cfg.mode == Mode::Plain {
        let _ = writeln!(t, "errors db_stress saw:   {}", s.accepted_errors);
    }
    let _ = writeln!(t, "time:                   {:.0} s", elapsed.as_secs_f64());
    print!("{t}");
}

fn shell_quote(args: &[String]) -> String {
    args.iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Takes the lock of a run directory for the whole run: two runs in one
/// directory would delete and reformat each other's image (seen with two
/// `make crashtest-rocksdb` on one machine sharing the default directory).
fn lock_dir(dir: &Path) -> Result<std::fs::File, String> {
    use std::os::unix::io::AsRawFd;
    let path = dir.join("lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor we own; no pointers.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(format!(
            "another rocksdb-crashtest is running in {} (it holds {}); give this run another --dir",
            dir.display(),
            path.display()
        ));
    }
    Ok(f)
}

fn run(cfg: &Config) -> Result<Summary, String> {
    std::fs::create_dir_all(&cfg.dir)
        .map_err(|e| format!("creating {}: {e}", cfg.dir.display()))?;
    let _lock = lock_dir(&cfg.dir)?;
    let paths = Paths::new(&cfg.dir);
    // A fresh image and expected state: mkfs must not meet an old store, nor
    // the new image the unsynced memory an earlier failed run left.
    if let Ok(mem) = blobstore::device::unsynced_memory_path_of(&paths.image) {
        let _ = std::fs::remove_file(mem);
    }
    for p in [&paths.image, &powerloss::log_path(&paths.image)] {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("removing {}: {e}", p.display())),
        }
    }
    let _ = std::fs::remove_dir_all(&paths.expected);
    std::fs::create_dir_all(&paths.expected)
        .map_err(|e| format!("creating {}: {e}", paths.expected.display()))?;
    let run = run_knobs(cfg.seed);
    println!(
        "crash test: mode {}{}, {} rounds, seed {}, {} keys, {} column families, in {}",
        cfg.mode.name(),
        if cfg.faults {
            " with db_stress faults"
        } else {
            ""
        },
        cfg.rounds,
        cfg.seed,
        run.max_key,
        run.column_families,
        cfg.dir.display()
    );
    let start = Instant::now();
    let mut s = Summary {
        cut_estimate: INITIAL_CUT_ESTIMATE,
        ..Summary::default()
    };
    let replay = format!(
        "replay: rocksdb-crashtest --db-stress {} --mode {} --seed {} --rounds {} --min-secs {} --max-secs {} --size {}{} \
         (the knobs follow from the seed; kill moments are timing-dependent, and so are the \
         mid-I/O cut points, which follow the adaptive estimate: the db_stress command below \
         names the round's)",
        cfg.db_stress.display(),
        cfg.mode.name(),
        cfg.seed,
        cfg.rounds,
        cfg.min_secs,
        cfg.max_secs,
        cfg.size,
        if cfg.faults {
            format!(" --faults --ops {}", cfg.ops)
        } else {
            String::new()
        }
    );
    let fail = |s: &mut Summary, round: String, why: String, args: &[String], log: &Path| {
        s.failures += 1;
        println!("FAILED {round}: {why}");
        println!(
            "  log: {} (stderr: {})",
            log.display(),
            err_path(log).display()
        );
        println!(
            "  image, log and expected values kept in {}",
            cfg.dir.display()
        );
        println!(
            "  db_stress command: {} {}",
            cfg.db_stress.display(),
            shell_quote(args)
        );
        println!("  {replay}");
    };
    for round in 1..=cfg.rounds {
        let k = round_knobs(cfg, round);
        let cut_at = k.mid_io_cut.then(|| cut_op(&k, s.cut_estimate));
        let args = stress_args(cfg, &paths, &run, Some(&k), round, cut_at);
        let log = cfg.dir.join(format!("round-{round:03}.log"));
        let (outcome, pid) = if cfg.mode == Mode::Plain {
            let (o, pid) = run_stress(cfg, &args, &log, Some(PLAIN_TIMEOUT_SECS), false, false);
            // A plain round must run to its end: exit 0, nothing else.
            let o = match o {
                Outcome::CleanExit => Outcome::CleanExit,
                Outcome::Failed(why) => Outcome::Failed(why),
                Outcome::Killed | Outcome::Cut => {
                    Outcome::Failed(format!("did not finish within {PLAIN_TIMEOUT_SECS} s"))
                }
            };
            (o, pid)
        } else {
            run_stress(cfg, &args, &log, Some(k.run_secs), true, cut_at.is_some())
        };
        s.reached_ops += u32::from(reached_ops(&log));
        s.accepted_errors += std::fs::read_to_string(&log)
            .map(|t| t.lines().filter_map(stat_errors).sum::<u64>())
            .unwrap_or(0);
        s.rounds += 1;
        let mut line = if cfg.mode == Mode::Plain {
            format!(
                "round {round:3}: {} ops x {} threads{}{}: ",
                cfg.ops,
                k.threads,
                if k.disable_wal { ", no WAL" } else { "" },
                if k.async_io { ", async I/O" } else { "" }
            )
        } else {
            format!(
                "round {round:3}: {:.1} s, {} threads{}{}: ",
                k.run_secs,
                k.threads,
                if k.disable_wal { ", no WAL" } else { "" },
                if k.async_io { ", async I/O" } else { "" }
            )
        };
        if let (true, Some(pid)) = (cfg.faults, pid) {
            let by_op = take_injected_faults(Path::new(FAULT_LOG_DIR), pid);
            let n: u64 = by_op.values().sum();
            s.rounds_with_faults += u32::from(n > 0);
            for (op, c) in by_op {
                *s.faults.entry(op).or_insert(0) += c;
            }
            let _ = write!(line, "{n} faults injected: ");
        }
        if let Some(n) = cut_at {
            s.cuts_planned += 1;
            let when = if k.cut_issued { "after" } else { "before" };
            let _ = write!(line, "cut planned at device op {n} ({when} issue): ");
            // Aim for about half the cuts firing (see the module docs).
            match outcome {
                Outcome::Cut => s.cut_estimate *= 1.25,
                Outcome::Killed | Outcome::CleanExit => {
                    s.cut_estimate = (s.cut_estimate * 0.8).max(16.0)
                }
                Outcome::Failed(_) => {}
            }
        }
        let mid_io = outcome == Outcome::Cut;
        match outcome {
            Outcome::Cut => {
                s.cuts_fired += 1;
                line.push_str("cut fired");
            }
            Outcome::Killed => {
                s.kills += 1;
                line.push_str("killed");
            }
            Outcome::CleanExit if cfg.mode == Mode::Plain => {
                s.completed += 1;
                line.push_str("ran to the end");
            }
            Outcome::CleanExit => {
                s.clean_exits += 1;
                line.push_str("exited 0 before the kill");
            }
            Outcome::Failed(why) => {
                println!("{line}FAILED");
                fail(&mut s, format!("round {round}"), why, &args, &log);
                print_summary(cfg, &s, start.elapsed(), &run);
                return Ok(s);
            }
        }
        // A device (NVMe: its VFIO group) is free once db_stress is
        // reaped, which it is by now.
        if let Err(e) = match cfg.device {
            Some(_) => Ok(()),
            None => wait_unlocked(&paths.image),
        } {
            println!("{line}");
            fail(&mut s, format!("after round {round}"), e, &args, &log);
            print_summary(cfg, &s, start.elapsed(), &run);
            return Ok(s);
        }
        if cfg.mode == Mode::PowerLoss {
            if powerloss::log_path(&paths.image).exists() {
                match powerloss::recover(&paths.image, k.cut_seed) {
                    Ok(r) => {
                        let _ = write!(line, "; power cut (seed {}): {r}", k.cut_seed);
                        if mid_io {
                            s.mid_io.add(&r);
                        } else {
                            s.after_kill.add(&r);
                        }
                    }
                    Err(e) => {
                        println!("{line}");
                        fail(
                            &mut s,
                            format!("power cut after round {round}"),
                            e.to_string(),
                            &args,
                            &log,
                        );
                        print_summary(cfg, &s, start.elapsed(), &run);
                        return Ok(s);
                    }
                }
            } else {
                line.push_str("; no power-loss log (killed before the device opened)");
            }
        }
        println!("{line}");
    }
    // The final check, as db_crashtest's last run: verification only.
    let args = stress_args(cfg, &paths, &run, None, 0, None);
    let log = cfg.dir.join("verify.log");
    match run_stress(cfg, &args, &log, Some(VERIFY_TIMEOUT_SECS), false, false).0 {
        Outcome::CleanExit => println!("final verification: passed"),
        Outcome::Failed(why) => fail(&mut s, "final verification".into(), why, &args, &log),
        // No cut was asked for, so run_stress reports a self-kill as a
        // failure and never returns Cut here.
        Outcome::Killed | Outcome::Cut => fail(
            &mut s,
            "final verification".into(),
            format!("did not finish within {VERIFY_TIMEOUT_SECS} s"),
            &args,
            &log,
        ),
    }
    if cfg.mode == Mode::PowerLoss {
        // The verification run flushed at close; its log must be empty.
        let _ = powerloss::recover(&paths.image, 0);
    }
    print_summary(cfg, &s, start.elapsed(), &run);
    if s.failures == 0 {
        // The image's unsynced memory (what db_stress left unsynced at its
        // last exit) goes with it, before the inode can be reused.
        if let Ok(mem) = blobstore::device::unsynced_memory_path_of(&paths.image) {
            let _ = std::fs::remove_file(mem);
        }
        let _ = std::fs::remove_file(&paths.image);
        let _ = std::fs::remove_file(powerloss::log_path(&paths.image));
        let _ = std::fs::remove_dir_all(&paths.expected);
    }
    Ok(s)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match parse_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(&cfg) {
        Ok(s) if s.failures == 0 => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("rocksdb-crashtest: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: &[&str]) -> Config {
        let mut a: Vec<String> = vec!["--db-stress".into(), "/bin/true".into()];
        a.extend(extra.iter().map(|s| s.to_string()));
        parse_args(&a).unwrap()
    }

    #[test]
    fn args_parse_and_reject() {
        let c = cfg(&["--mode", "powerloss", "--rounds", "7", "--seed", "42"]);
        assert_eq!((c.mode, c.rounds, c.seed), (Mode::PowerLoss, 7, 42));
        let bad = |a: &[&str]| parse_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(bad(&["--mode", "kill"])
            .unwrap_err()
            .contains("--db-stress is required"));
        assert!(bad(&["--db-stress", "x", "--mode", "crash"])
            .unwrap_err()
            .contains("expected kill, strict, powerloss or plain"));
        assert!(bad(&["--db-stress", "x", "--rounds", "0"])
            .unwrap_err()
            .contains("not a positive number"));
        assert!(
            bad(&["--db-stress", "x", "--min-secs", "5", "--max-secs", "1"])
                .unwrap_err()
                .contains("above --max-secs")
        );
    }

    #[test]
    fn knobs_follow_the_seed_and_stay_in_range() {
        let c = cfg(&["--seed", "9", "--min-secs", "2", "--max-secs", "4"]);
        assert_eq!(round_knobs(&c, 3), round_knobs(&c, 3));
        assert_eq!(run_knobs(9), run_knobs(9));
        let mut wal_off = 0;
        for r in 1..200 {
            let k = round_knobs(&c, r);
            assert!((2.0..=4.0).contains(&k.run_secs), "{k:?}");
            wal_off += u32::from(k.disable_wal);
        }
        assert!(wal_off > 0 && wal_off < 100, "{wal_off}");
    }

    #[test]
    fn strict_rounds_expect_every_acknowledged_write_and_keep_the_wal() {
        let c = cfg(&["--mode", "strict"]);
        let p = Paths::new(Path::new("/w"));
        let run = run_knobs(1);
        for r in 1..100 {
            let k = round_knobs(&c, r);
            assert!(!k.disable_wal && !k.mid_io_cut, "{k:?}");
            let a = stress_args(&c, &p, &run, Some(&k), r, None);
            assert!(a.contains(&"--disable_wal=0".to_string()));
            assert!(!a.iter().any(|x| x.starts_with("--sync_fault_injection")));
            assert!(!a[0].contains("powerloss"));
        }
        let kill = stress_args(&cfg(&[]), &p, &run, Some(&round_knobs(&c, 1)), 1, None);
        assert!(kill.contains(&"--sync_fault_injection=1".to_string()));
        assert!(kill.contains(&"--nooverwritepercent=0".to_string()));
        let strict = stress_args(&c, &p, &run, Some(&round_knobs(&c, 1)), 1, None);
        assert!(!strict.iter().any(|x| x.starts_with("--nooverwritepercent")));
    }

    #[test]
    fn a_device_is_formatted_over_once_and_refused_for_power_cuts() {
        let spec = "nvme:0000:00:03.0/ns=2";
        let c = cfg(&["--mode", "strict", "--device", spec]);
        let p = Paths::new(Path::new("/w"));
        let run = run_knobs(1);
        let k = round_knobs(&c, 1);
        let first = stress_args(&c, &p, &run, Some(&k), 1, None);
        assert_eq!(first[0], format!("--fs_uri=blobfs://{spec};mkfs=force"));
        let later = stress_args(&c, &p, &run, Some(&k), 2, None);
        assert_eq!(later[0], format!("--fs_uri=blobfs://{spec};mkfs=never"));
        let bad = |a: &[&str]| parse_args(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert!(
            bad(&["--db-stress", "x", "--mode", "powerloss", "--device", spec])
                .unwrap_err()
                .contains("image file")
        );
        assert!(bad(&["--db-stress", "x", "--device", "floppy:0"])
            .unwrap_err()
            .contains("--device"));
    }

    #[test]
    fn rounds_use_mkfs_once_and_the_powerloss_option_in_its_mode() {
        let c = cfg(&["--mode", "powerloss"]);
        let p = Paths::new(Path::new("/w"));
        let run = run_knobs(1);
        let k = round_knobs(&c, 1);
        let first = stress_args(&c, &p, &run, Some(&k), 1, None);
        assert!(
            first[0].ends_with("?size=4G&powerloss=on;mkfs=always"),
            "{}",
            first[0]
        );
        assert!(first.contains(&"--destroy_db_initially=1".to_string()));
        assert!(first.contains(&"--sync_fault_injection=1".to_string()));
        let later = stress_args(&c, &p, &run, Some(&k), 2, None);
        assert!(later[0].ends_with(";mkfs=never"));
        assert!(later.contains(&"--destroy_db_initially=0".to_string()));
        let verify = stress_args(&c, &p, &run, None, 0, None);
        assert!(verify.contains(&"--verification_only=1".to_string()));
        let kill = stress_args(&cfg(&[]), &p, &run, Some(&k), 1, None);
        assert!(!kill[0].contains("powerloss"));
        let mut k = k;
        k.cut_issued = true;
        let cut = stress_args(&c, &p, &run, Some(&k), 2, Some(123));
        assert!(
            cut[0].ends_with(
                "?size=4G&powerloss=on&powerloss_cut_after=123&powerloss_cut_when=after;mkfs=never"
            ),
            "{}",
            cut[0]
        );
        // The device accepts the spec the driver writes.
        let spec = cut[0]
            .trim_start_matches("--fs_uri=blobfs://")
            .trim_end_matches(";mkfs=never");
        assert!(matches!(
            blobstore::device::DeviceSpec::parse(spec).unwrap(),
            blobstore::device::DeviceSpec::PowerLoss { cut: Some(_), .. }
        ));
    }

    #[test]
    fn faults_add_db_stress_fault_flags_to_rounds_only() {
        let p = Paths::new(Path::new("/w"));
        let run = run_knobs(3);
        let plain = cfg(&["--seed", "3"]);
        let faulty = cfg(&["--seed", "3", "--faults"]);
        let has = |a: &[String], f: &str| a.iter().any(|x| x == f);
        let value = |a: &[String], name: &str| -> Option<u32> {
            a.iter()
                .find_map(|x| x.strip_prefix(&format!("--{name}=")))
                .map(|v| v.parse().unwrap())
        };
        let (mut with_wal, mut without_wal, mut open_faults) = (0, 0, 0);
        for round in 1..60 {
            // --faults leaves the other knobs of a seed as they were.
            let k = round_knobs(&faulty, round);
            assert_eq!(k, round_knobs(&plain, round));
            let off = stress_args(&plain, &p, &run, Some(&k), round, None);
            assert!(has(&off, "--read_fault_one_in=0"));
            assert!(value(&off, "write_fault_one_in").is_none());
            let on = stress_args(&faulty, &p, &run, Some(&k), round, None);
            assert!(has(&on, "--sync_fault_injection=1"));
            let f = fault_knobs(&faulty, round, &k);
            for (name, one_in) in f.flags() {
                assert_eq!(value(&on, name), Some(one_in), "{name}");
            }
            assert!([32, 1000].contains(&f.read) && [32, 1000].contains(&f.metadata_read));
            assert!([128, 1000].contains(&f.metadata_write));
            if k.disable_wal {
                without_wal += 1;
                assert_eq!(f.write, 0, "no write faults without a WAL");
                assert!(!has(&on, "--max_write_buffer_number=10"));
                assert!(has(&on, "--compaction_readahead_size=1048576"));
                assert!(has(&on, &format!("--cache_size={}", f.cache_size)));
                assert!([8 << 20, 32 << 20].contains(&f.cache_size));
            } else {
                with_wal += 1;
                assert!([128, 1000].contains(&f.write));
                assert!(has(&on, "--max_write_buffer_number=10"));
            }
            open_faults += u32::from(f.open_read + f.open_write > 0);
        }
        assert!(with_wal > 0 && without_wal > 0 && open_faults > 0);
        // The final verification runs without faults.
        let verify = stress_args(&faulty, &p, &run, None, 0, None);
        assert!(has(&verify, "--read_fault_one_in=0"));
        assert!(value(&verify, "write_fault_one_in").is_none());
        // Plain rounds run a bounded number of operations.
        let c = cfg(&["--mode", "plain", "--ops", "777"]);
        let k = round_knobs(&c, 1);
        assert!(has(
            &stress_args(&c, &p, &run, Some(&k), 1, None),
            "--ops_per_thread=777"
        ));
        assert!(
            parse_args(&["--db-stress".into(), "x".into(), "--ops".into(), "0".into()])
                .unwrap_err()
                .contains("not a positive number")
        );
    }

    #[test]
    fn write_faults_override_only_the_write_odds() {
        let base = cfg(&["--seed", "9", "--faults"]);
        let eight = cfg(&["--seed", "9", "--faults", "--write-faults", "8"]);
        let mut with_wal = 0;
        for round in 1..40 {
            let k = round_knobs(&base, round);
            assert_eq!(k, round_knobs(&eight, round));
            let (b, e) = (
                fault_knobs(&base, round, &k),
                fault_knobs(&eight, round, &k),
            );
            if k.disable_wal {
                // No WAL: no write faults, metadata-write faults at the
                // drawn odds (see fault_knobs).
                assert_eq!((e.write, e.metadata_write), (0, b.metadata_write));
            } else {
                assert_eq!((e.write, e.metadata_write), (8, 8));
            }
            with_wal += u32::from(!k.disable_wal);
            // Every other knob is drawn as without the override.
            assert_eq!(
                FaultKnobs {
                    write: b.write,
                    metadata_write: b.metadata_write,
                    ..e
                },
                b
            );
        }
        assert!(with_wal > 0);
        let (p, run) = (Paths::new(Path::new("/w")), run_knobs(9));
        let k = round_knobs(&eight, 1);
        let wal_out = "--exclude_wal_from_write_fault_injection=1".to_string();
        assert!(stress_args(&eight, &p, &run, Some(&k), 1, None).contains(&wal_out));
        assert!(!stress_args(&base, &p, &run, Some(&k), 1, None).contains(&wal_out));
        let err = |a: &[&str]| {
            let mut v = vec!["--db-stress".to_string(), "x".into()];
            v.extend(a.iter().map(|s| s.to_string()));
            parse_args(&v).unwrap_err()
        };
        assert!(err(&["--write-faults", "8"]).contains("needs --faults"));
        assert!(err(&["--faults", "--write-faults", "0"]).contains("not a positive number"));
    }

    #[test]
    fn injected_faults_are_counted_by_operation_and_their_logs_removed() {
        let dir = std::env::temp_dir().join(format!("crashtest-finj-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let record = |ts: u64, op: &str| {
            let mut r = vec![0u8; FAULT_RECORD_LEN];
            r[..8].copy_from_slice(&ts.to_le_bytes());
            r[FAULT_RECORD_OP][..op.len()].copy_from_slice(op.as_bytes());
            r
        };
        let mut mine = Vec::new();
        mine.extend(record(1, "Read"));
        mine.extend(record(2, "Append"));
        mine.extend(record(3, "Read"));
        mine.extend(record(0, "")); // never written
        mine.extend(&[7u8; 100]); // cut short
        std::fs::write(dir.join("fault_injection_4242_17_db.bin"), &mine).unwrap();
        std::fs::write(
            dir.join("fault_injection_4242_18_db.bin"),
            record(5, "Sync"),
        )
        .unwrap();
        let other = dir.join("fault_injection_42421_1_db.bin");
        std::fs::write(&other, record(9, "Read")).unwrap();
        let got = take_injected_faults(&dir, 4242);
        let want: Vec<(String, u64)> =
            vec![("Append".into(), 1), ("Read".into(), 2), ("Sync".into(), 1)];
        assert_eq!(got.into_iter().collect::<Vec<_>>(), want);
        assert!(!dir.join("fault_injection_4242_17_db.bin").exists());
        assert!(other.exists(), "another process's log stays");
        assert!(take_injected_faults(&dir, 4242).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mid_io_cuts_take_about_half_the_later_powerloss_rounds() {
        let pl = cfg(&["--mode", "powerloss", "--seed", "5"]);
        let kill = cfg(&["--mode", "kill", "--seed", "5"]);
        assert!(!round_knobs(&pl, 1).mid_io_cut, "round 1 runs mkfs");
        let (mut cuts, mut issued) = (0, 0);
        let mut points = Vec::new();
        for r in 2..202 {
            let k = round_knobs(&pl, r);
            assert!(!round_knobs(&kill, r).mid_io_cut);
            if k.mid_io_cut {
                cuts += 1;
                issued += u32::from(k.cut_issued);
                let n = cut_op(&k, 1000.0);
                assert!((1..=1000).contains(&n), "{n}");
                points.push(n);
            }
        }
        assert!((60..140).contains(&cuts), "{cuts} of 200");
        assert!(issued > 0 && issued < cuts, "{issued} of {cuts}");
        // Spread over the whole range, not bunched at one end.
        assert!(points.iter().any(|&n| n < 200) && points.iter().any(|&n| n > 800));
    }

    #[test]
    fn two_runs_cannot_share_a_directory() {
        let dir = std::env::temp_dir().join(format!("crashtest-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let held = lock_dir(&dir).unwrap();
        let err = lock_dir(&dir).unwrap_err();
        assert!(
            err.contains("another rocksdb-crashtest is running"),
            "{err}"
        );
        drop(held);
        drop(lock_dir(&dir).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failure_lines_are_recognised() {
        for faults in [false, true] {
            assert!(failure_line(
                "Verification failed for column family 0 key 12",
                faults
            ));
            assert!(failure_line("Corruption: block checksum mismatch", faults));
            assert!(failure_line("Error opening DB: IO error", faults));
            assert!(!failure_line("Verification successful", faults));
            assert!(!failure_line(
                "2025/01/01 Starting database operations",
                faults
            ));
            assert!(!failure_line("            : Got errors 0 times", faults));
        }
        // Errors db_stress accepted are the injected ones, or a failure.
        assert!(failure_line("            : Got errors 3 times", false));
        assert!(!failure_line("            : Got errors 3 times", true));
        assert_eq!(stat_errors("            : Got errors 17 times"), Some(17));
        assert_eq!(stat_errors("Got errors 17 times"), None);
    }

    #[test]
    fn a_child_that_fails_or_prints_an_error_fails_the_round() {
        let dir = std::env::temp_dir().join(format!("crashtest-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("x.log");
        let mut c = cfg(&[]);
        c.db_stress = "/bin/sh".into();
        let sh = |script: &str| vec!["-c".to_string(), script.to_string()];
        assert_eq!(
            run_stress(&c, &sh("exit 0"), &log, Some(5.0), false, false).0,
            Outcome::CleanExit
        );
        assert_eq!(
            run_stress(&c, &sh("sleep 30"), &log, Some(0.2), false, false).0,
            Outcome::Killed
        );
        assert!(matches!(
            run_stress(&c, &sh("exit 3"), &log, Some(5.0), false, false).0,
            Outcome::Failed(w) if w.contains("exited on its own")
        ));
        assert!(matches!(
            run_stress(&c, &sh("echo 'Verification failed: key 7'"), &log, Some(5.0), false, false).0,
            Outcome::Failed(w) if w.contains("Verification failed")
        ));
        // A self-inflicted SIGKILL is the planned cut only when one was
        // asked for.
        assert_eq!(
            run_stress(&c, &sh("kill -9 $$"), &log, Some(5.0), false, true).0,
            Outcome::Cut
        );
        assert!(matches!(
            run_stress(&c, &sh("kill -9 $$"), &log, Some(5.0), false, false).0,
            Outcome::Failed(w) if w.contains("exited on its own")
        ));
        assert!(matches!(
            run_stress(&c, &sh("exit 3"), &log, Some(5.0), false, true).0,
            Outcome::Failed(_)
        ));
        // Counted from the workload's start: a slow open does not eat the
        // round, and the kill still comes.
        let t = Instant::now();
        let script = format!("sleep 0.6; echo '{OPS_STARTED}'; sleep 30");
        assert_eq!(
            run_stress(&c, &sh(&script), &log, Some(0.3), true, false).0,
            Outcome::Killed
        );
        let took = t.elapsed().as_secs_f64();
        assert!((0.9..10.0).contains(&took), "{took}");
        assert!(reached_ops(&log));
        assert_eq!(
            run_stress(&c, &sh("exit 0"), &log, Some(0.3), true, false).0,
            Outcome::CleanExit
        );
        assert!(!reached_ops(&log));
        // Stderr goes to its own file. Without --faults only an error line
        // there fails the round; with them any line does, as db_crashtest.
        assert_eq!(
            run_stress(
                &c,
                &sh("echo 'a warning' >&2"),
                &log,
                Some(5.0),
                false,
                false
            )
            .0,
            Outcome::CleanExit
        );
        assert!(std::fs::read_to_string(err_path(&log))
            .unwrap()
            .contains("a warning"));
        assert!(matches!(
            run_stress(&c, &sh("echo 'IO error: x' >&2"), &log, Some(5.0), false, false).0,
            Outcome::Failed(w) if w.contains("IO error")
        ));
        c.faults = true;
        assert!(matches!(
            run_stress(&c, &sh("echo 'a warning' >&2"), &log, Some(5.0), false, false).0,
            Outcome::Failed(w) if w.contains("a warning")
        ));
        let (outcome, pid) = run_stress(&c, &sh("exit 0"), &log, Some(5.0), false, false);
        assert_eq!(outcome, Outcome::CleanExit);
        assert!(pid.is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
