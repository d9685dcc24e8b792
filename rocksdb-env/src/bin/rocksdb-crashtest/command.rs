//! db_stress's command line: where a run keeps its files ([`Paths`]) and
//! the arguments of a round or of the final verification
//! ([`stress_args`]), with why each flag is set.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::config::{Config, Mode};
use crate::knobs::{fault_knobs, RoundKnobs, RunKnobs};

/// Paths of one run.
pub(crate) struct Paths {
    /// The image file BlobFS runs on (unless `--device` names a device).
    pub(crate) image: PathBuf,
    /// db_stress's `--expected_values_dir`.
    pub(crate) expected: PathBuf,
}

impl Paths {
    /// The paths of a run in `dir`.
    pub(crate) fn new(dir: &Path) -> Paths {
        Paths {
            image: dir.join("db.img"),
            expected: dir.join("expected"),
        }
    }
}

/// The db_stress arguments of round `round` (1 formats the image), or of
/// the final verification when `knobs` is `None` (`round` 0).
pub(crate) fn stress_args(
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
        // Only unsynced data can be lost (see the crate docs in main.rs).
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
