//! `bdevperf` end to end on memory and file devices: every workload runs on
//! its reactors and reports, and bad input is refused with a clear message.

use std::process::{Command, Output};

fn bdevperf(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bdevperf"))
        .args(args)
        .output()
        .expect("running bdevperf")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The IOPS of the `total:` line.
fn total_iops(out: &str) -> u64 {
    let line = out
        .lines()
        .find(|l| l.starts_with("total: "))
        .unwrap_or_else(|| panic!("no total line in:\n{out}"));
    line["total: ".len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad total line {line:?}"))
}

#[test]
fn every_workload_runs_on_its_reactors_and_reports() {
    for (rw, extra) in [
        ("randread", &[][..]),
        ("randwrite", &[][..]),
        ("randrw", &["--mix", "30"][..]),
        ("read", &["--bs", "64K"][..]),
        ("write", &["--bs", "128K", "--threads", "2"][..]),
    ] {
        for idle in ["block", "sleep", "spin"] {
            let mut args = vec![
                "--device",
                "mem:16M",
                "--rw",
                rw,
                "--qd",
                "8",
                "--seconds",
                "0.2",
                "--idle",
                idle,
            ];
            args.extend_from_slice(extra);
            let o = bdevperf(&args);
            let out = text(&o);
            assert!(o.status.success(), "{args:?}:\n{out}");
            assert!(total_iops(&out) > 0, "{args:?}:\n{out}");
            assert!(out.contains("; 0 errors"), "{out}");
            let workers = if extra.contains(&"--threads") { 2 } else { 1 };
            for w in 0..workers {
                assert!(out.contains(&format!("  worker {w}: ")), "{out}");
            }
        }
    }
}

#[test]
fn a_file_device_blocks_in_io_uring_and_completes() {
    let dir = std::env::temp_dir().join(format!("bdevperf-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let spec = format!("file:{}/img?size=32M", dir.display());
    let o = bdevperf(&[
        "--device",
        &spec,
        "--rw",
        "randrw",
        "--threads",
        "2",
        "--seconds",
        "0.3",
    ]);
    let out = text(&o);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(o.status.success(), "{out}");
    assert!(total_iops(&out) > 0, "{out}");
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    for (args, says) in [
        (&["--device", "bogus:1"][..], "unknown scheme"),
        (
            &["--device", "mem:1M", "--bs", "3000"][..],
            "multiple of the block size",
        ),
        (
            &["--device", "mem:1M", "--bs", "2M"][..],
            "fit in the device",
        ),
        (&["--device", "mem:1M", "--bs", "4MB"][..], "ambiguous"),
        (&["--device", "mem:1M", "--qd", "0"][..], "must be positive"),
        (
            &["--device", "mem:1M", "--seconds", "0"][..],
            "must be positive",
        ),
        (
            &["--device", "mem:1M", "--interrupts", "off"][..],
            "apply to nvme: devices",
        ),
        (&["--device", "mem:1M", "--rw", "trim"][..], "invalid value"),
        (&["--device", "mem:1M", "--mix", "101"][..], "101"),
        (&["--device", "mem:1M", "--cores", "0,0"][..], "given twice"),
        (
            &[
                "--device",
                "mem:64K",
                "--rw",
                "write",
                "--bs",
                "64K",
                "--threads",
                "2",
            ][..],
            "do not fit",
        ),
    ] {
        let o = bdevperf(args);
        let out = text(&o);
        assert!(!o.status.success(), "{args:?} was accepted:\n{out}");
        assert!(out.contains(says), "{args:?}: expected {says:?} in:\n{out}");
    }
}
