//! Running db_stress once ([`run_stress`]): started with its stdout and
//! stderr in files, killed on time (counted from the start of its workload
//! where asked), and the round judged from how it ended ([`Outcome`]) and
//! from what it printed ([`failure_line`]).

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::Config;

/// Set in db_stress's environment, our debug db_stress seeds the fault
/// injection of each flush and subcompaction afresh (with `--seed` plus the
/// clock) instead of with `--seed` alone, with which a flush that failed
/// once fails the same way at every retry, forever (cpp/rocksdb-debug.mk).
/// Only in rounds with a WAL: rounds without one flush atomically, and
/// RocksDB's recovery from a failed atomic flush can wait forever on POSIX
/// as on BlobFS (a hang seen at db_crashtest's odds once retries drew
/// fresh faults).
const RESEED_FAULTS_ENV: &str = "BLOBSTACK_RESEED_FAULTS";

/// The count of db_stress's end-of-run statistics line "  : Got errors N
/// times": operations that returned an error db_stress accepted (with
/// `--faults`, the injected ones).
pub(crate) fn stat_errors(line: &str) -> Option<u64> {
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
pub(crate) fn failure_line(line: &str, faults: bool) -> bool {
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
pub(crate) enum Outcome {
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
pub(crate) const OPS_STARTED: &str = "Starting database operations";

/// How long a round's db_stress may take to open the database before the
/// driver kills it anyway.
const OPEN_LIMIT_SECS: f64 = 60.0;

/// True when the db_stress output in `log` shows the workload started.
pub(crate) fn reached_ops(log: &Path) -> bool {
    std::fs::read_to_string(log).is_ok_and(|t| t.contains(OPS_STARTED))
}

/// Where db_stress's stderr goes: next to `log` (its stdout).
pub(crate) fn err_path(log: &Path) -> PathBuf {
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
pub(crate) fn run_stress(
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
