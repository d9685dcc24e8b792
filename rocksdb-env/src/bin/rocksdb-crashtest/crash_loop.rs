//! The crash loop ([`run`]): a run's directory (locked for the run, its
//! old image and expected values cleared), the rounds of the chosen mode
//! (each db_stress killed on time, cut mid-I/O or run to its end), the
//! power cut played on the image after each round of `powerloss`, the
//! final verification, and what a failure prints to replay it.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use blobstore::testing::powerloss;

use crate::command::{stress_args, Paths};
use crate::config::{Config, Mode};
use crate::fault_log::{take_injected_faults, FAULT_LOG_DIR};
use crate::knobs::{cut_op, round_knobs, run_knobs, INITIAL_CUT_ESTIMATE};
use crate::stress::{err_path, reached_ops, run_stress, stat_errors, Outcome};
use crate::summary::{print_summary, Summary};

/// How long the final verification-only run may take.
const VERIFY_TIMEOUT_SECS: f64 = 600.0;

/// How long a `plain` round may take to run its operations.
const PLAIN_TIMEOUT_SECS: f64 = 600.0;

/// Waits until no process holds the lock of `image` (how long a killed
/// db_stress keeps it: the kernel tears its io_uring down after the process
/// is reaped, and the file's lock goes with the ring's last reference).
fn wait_unlocked(image: &Path) -> Result<(), String> {
    blobstore::device::wait_unlocked(image, LOCK_WAIT)
        .map_err(|e| format!("after db_stress was killed: {e}"))
}

/// How long a killed db_stress may keep its image locked.
const LOCK_WAIT: Duration = Duration::from_secs(30);

/// `args` quoted for a POSIX shell, each in single quotes: the db_stress
/// command a failure prints, to paste.
fn shell_quote(args: &[String]) -> String {
    args.iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Takes the lock of a run directory for the whole run: two runs in one
/// directory would delete and reformat each other's image (seen with two
/// `make crashtest-rocksdb` on one machine sharing the default directory).
pub(crate) fn lock_dir(dir: &Path) -> Result<std::fs::File, String> {
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

/// Runs the crash test `cfg` asks for, printing a line per round and the
/// summary. `Ok` holds the totals, a failure included (it has been printed
/// with how to replay it); `Err` a setup error (the directory, its lock,
/// clearing an earlier run's files).
pub(crate) fn run(cfg: &Config) -> Result<Summary, String> {
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
            // Aim for about half the cuts firing (see the crate docs in
            // main.rs).
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
