//! The driver's unit tests: the command line, the knobs a seed draws,
//! db_stress's arguments, running and judging db_stress (with `/bin/sh`
//! standing in for it), the injected-fault count and the run directory's
//! lock.

use std::path::Path;
use std::time::Instant;

use crate::command::{stress_args, Paths};
use crate::config::{parse_args, Config, Mode};
use crate::crash_loop::lock_dir;
use crate::fault_log::{take_injected_faults, FAULT_RECORD_LEN, FAULT_RECORD_OP};
use crate::knobs::{cut_op, fault_knobs, round_knobs, run_knobs, FaultKnobs};
use crate::stress::{
    err_path, failure_line, reached_ops, run_stress, stat_errors, Outcome, OPS_STARTED,
};

/// A [`Config`] from `--db-stress /bin/true` and `extra`.
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
