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
//! rocksdb-crashtest --db-stress <path> [--mode kill|strict|powerloss|plain]
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
//!
//! The modules: [`config`] (the command line), [`knobs`] (what a seed
//! draws for the run, its rounds and their faults), [`command`] (db_stress's
//! arguments), [`stress`] (running db_stress once and judging the round),
//! [`fault_log`] (counting the faults db_stress injected), [`crash_loop`]
//! (the rounds of a run and the power cuts between them) and [`summary`]
//! (the totals printed at the end).

use std::process::ExitCode;

mod command;
mod config;
mod crash_loop;
mod fault_log;
mod knobs;
mod stress;
mod summary;
#[cfg(test)]
mod tests;

use config::parse_args;
use crash_loop::run;

/// Runs the crash test the command line asks for; the exit status is the
/// one the crate docs above give.
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
