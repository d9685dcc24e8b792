//! What a seed draws, so that a seed replays a run's rounds: the knobs of
//! the whole run ([`RunKnobs`]), of each round ([`RoundKnobs`]) and of each
//! round's db_stress fault injection ([`FaultKnobs`]), each from a stream
//! of its own; and where a mid-I/O power cut lands ([`cut_op`]).

use crate::config::{Config, Mode};

/// The workspace's generator: the same seed gives the same knobs.
struct Rng(blobstore::util::SplitMix64);

impl Rng {
    /// The next 64 random bits.
    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// One of `xs`, each as likely.
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }
    /// A number in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Knobs that hold for the whole run (the expected-values file is sized by
/// them).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RunKnobs {
    /// db_stress's `--max_key`.
    pub(crate) max_key: u64,
    /// db_stress's `--column_families`.
    pub(crate) column_families: u32,
}

/// The run's knobs, drawn from `seed`.
pub(crate) fn run_knobs(seed: u64) -> RunKnobs {
    let mut r = Rng(blobstore::util::SplitMix64::new(seed ^ 0x5eed));
    RunKnobs {
        max_key: r.pick(&[10_000, 50_000, 100_000]),
        column_families: r.pick(&[1, 4]),
    }
}

/// Knobs of one round.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RoundKnobs {
    /// db_stress's `--threads`.
    pub(crate) threads: u32,
    /// How long the workload runs before the kill (`--min-secs` to
    /// `--max-secs`).
    pub(crate) run_secs: f64,
    /// `--disable_wal=1` (never in `strict` mode).
    pub(crate) disable_wal: bool,
    /// db_stress's `--write_buffer_size`.
    pub(crate) write_buffer_size: u64,
    /// db_stress's `--target_file_size_base`.
    pub(crate) target_file_size_base: u64,
    /// db_stress's `--max_bytes_for_level_base`.
    pub(crate) max_bytes_for_level_base: u64,
    /// db_stress's `--flush_one_in`.
    pub(crate) flush_one_in: u32,
    /// db_stress's `--compact_range_one_in`.
    pub(crate) compact_range_one_in: u32,
    /// db_stress's `--sync_wal_one_in`.
    pub(crate) sync_wal_one_in: u32,
    /// Seed of the power cut after this round.
    pub(crate) cut_seed: u64,
    /// Powerloss mode, rounds after the first: stop this round with a
    /// power cut at a device op instead of a timed kill.
    pub(crate) mid_io_cut: bool,
    /// Where in 1..=E the cut lands, as a fraction (see the crate docs in
    /// main.rs).
    pub(crate) cut_point: f64,
    /// `powerloss_cut_when=after` (the cut op is issued) rather than
    /// `before`.
    pub(crate) cut_issued: bool,
    /// `--async_io=1`: db_stress's iterators read ahead through BlobFS's
    /// `ReadAsync`, `Poll` and `AbortIO` (one round in four, as
    /// db_crashtest draws it sometimes). Drawn last, so the draws before it
    /// stay what a seed gave before it was added.
    pub(crate) async_io: bool,
}

/// The knobs of round `round` (the first is 1), drawn from the seed and the
/// round's number.
pub(crate) fn round_knobs(cfg: &Config, round: u32) -> RoundKnobs {
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
pub(crate) struct FaultKnobs {
    pub(crate) read: u32,
    pub(crate) metadata_read: u32,
    pub(crate) write: u32,
    pub(crate) metadata_write: u32,
    pub(crate) open_read: u32,
    pub(crate) open_metadata_read: u32,
    pub(crate) open_write: u32,
    pub(crate) open_metadata_write: u32,
    /// Block cache bytes: db_crashtest's 8 or 32 MiB rather than
    /// db_stress's 2 GiB, so reads reach the file system (and its faults).
    pub(crate) cache_size: u64,
}

impl FaultKnobs {
    /// The db_stress flags, in db_stress's names.
    pub(crate) fn flags(&self) -> [(&'static str, u32); 8] {
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
pub(crate) fn fault_knobs(cfg: &Config, round: u32, k: &RoundKnobs) -> FaultKnobs {
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
    // db_stress's fixed fault seeding (see RESEED_FAULTS_ENV in
    // stress.rs), with which
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

/// The device op a mid-I/O cut lands at: uniform in 1..=`estimate`.
pub(crate) fn cut_op(k: &RoundKnobs, estimate: f64) -> u64 {
    1 + (k.cut_point * estimate.max(1.0)) as u64
}

/// First guess at how many device writes and flushes a round issues (the
/// driver adapts it; see the crate docs in main.rs). A 100-round run of
/// 2-4 s of workload ended near 1,200 (BlobFS batches appends, so a round
/// issues device ops mostly at syncs, memtable and SST writes, and metadata
/// updates); starting low puts the first cuts in the open and lets the
/// estimate grow.
pub(crate) const INITIAL_CUT_ESTIMATE: f64 = 200.0;
