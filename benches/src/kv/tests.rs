//! The tests of the whole `kv` module, on captured `db_bench` output and
//! made-up runs.

use super::*;
use crate::json::Json;

/// Captured from this repository's db_bench (RocksDB 11.8.1), fillseq on
/// ext4, 20,000 keys; the histogram body is shortened.
const FILLSEQ: &str = "\
RocksDB:    version 11.8.1
Date:       Wed Nov 25 14:37:52 2026
CPU:        2 * AMD EPYC
Keys:       16 bytes each (+ 0 bytes user-defined timestamp)
Values:     1000 bytes each (500 bytes after compression)
Entries:    20000
------------------------------------------------
DB path: [/tmp/kvb-probe/db]
fillseq      :       3.178 micros/op 314149 ops/sec 0.064 seconds 20000 operations;  304.4 MB/s
Microseconds per write:
Count: 20000 Average: 3.1734  StdDev: 41.15
Min: 1  Median: 1.5339  Max: 5731
Percentiles: P50: 1.53 P75: 3.58 P99: 9.59 P99.9: 45.56 P99.99: 725.00
------------------------------------------------------
[       0,       1 ]     4767  23.835%  23.835% #####
(       1,       2 ]     9802  49.010%  72.845% ##########

STATISTICS:
rocksdb.block.cache.miss COUNT : 0
rocksdb.db.get.micros P50 : 0.000000 P95 : 0.000000 P99 : 0.000000 P100 : 0.000000 COUNT : 0 SUM : 0
";

/// Captured: readwhilewriting, 4 threads, on the DB above.
const READWHILEWRITING: &str = "\
Entries:    20000
------------------------------------------------
DB path: [/tmp/kvb-probe/db]
readwhilewriting :      10.758 micros/op 369979 ops/sec 2.014 seconds 744996 operations;  358.5 MB/s (184999 of 184999 found)

Microseconds per read:
Count: 744996 Average: 10.7843  StdDev: 248.08
Min: 0  Median: 2.8088  Max: 45038
Percentiles: P50: 2.81 P75: 4.34 P99: 14.77 P99.9: 2700.27 P99.99: 9741.15
------------------------------------------------------
[       0,       1 ]    18817   2.526%   2.526% #
";

/// Captured: overwrite with sync=1 (the writesync phase).
const WRITESYNC: &str = "\
DB path: [/tmp/kvb-probe/db]
overwrite    :     236.003 micros/op 4237 ops/sec 2.124 seconds 8999 operations;    4.1 MB/s
Microseconds per write:
Count: 8999 Average: 236.0795  StdDev: 537.35
Min: 144  Median: 217.1708  Max: 37185
Percentiles: P50: 217.17 P75: 246.00 P99: 378.61 P99.9: 4402.20 P99.99: 34701.70
";

#[test]
fn parses_fillseq() {
    let r = parse_db_bench(FILLSEQ, "fillseq").unwrap();
    assert_eq!(
        r,
        DbBenchResult {
            micros_per_op: 3.178,
            ops_per_sec: 314149.0,
            seconds: 0.064,
            operations: 20000,
            latency_us_p50: 1.53,
            latency_us_p99: 9.59,
            latency_us_p999: 45.56,
        }
    );
}

#[test]
fn parses_readwhilewriting_and_writesync() {
    let r = parse_db_bench(READWHILEWRITING, "readwhilewriting").unwrap();
    assert_eq!(r.ops_per_sec, 369979.0);
    assert_eq!(r.operations, 744996);
    assert_eq!(r.seconds, 2.014);
    assert_eq!(
        (r.latency_us_p50, r.latency_us_p99, r.latency_us_p999),
        (2.81, 14.77, 2700.27)
    );
    let w = parse_db_bench(WRITESYNC, "overwrite").unwrap();
    assert_eq!(w.ops_per_sec, 4237.0);
    assert_eq!(w.latency_us_p99, 378.61);
    assert_eq!(w.latency_us_p999, 4402.20);
}

#[test]
fn parse_errors_say_what_is_missing() {
    // The wrong benchmark: the statistics lines ("rocksdb.db.get.micros
    // P50 : ...") must not be taken for a result line.
    let e = parse_db_bench(FILLSEQ, "readrandom").unwrap_err();
    assert!(e.contains("no result line for \"readrandom\""), "{e}");
    let no_hist = FILLSEQ.replace("Percentiles:", "Pct:");
    let e = parse_db_bench(&no_hist, "fillseq").unwrap_err();
    assert!(e.contains("Percentiles"), "{e}");
    let e = parse_db_bench("fillseq : x micros/op\n", "fillseq").unwrap_err();
    assert!(e.contains("no number before \"micros/op\""), "{e}");
}

fn run(config: Config, phase: Phase, side: Side, ops: f64, p99: f64, cpu_s: f64) -> RunFigures {
    RunFigures {
        config,
        phase,
        side,
        command: vec!["db_bench".into(), "--num=10".into()],
        result: DbBenchResult {
            micros_per_op: 1.0,
            ops_per_sec: ops,
            seconds: 1.0,
            operations: ops as u64,
            latency_us_p50: 1.0,
            latency_us_p99: p99,
            latency_us_p999: p99 * 2.0,
        },
        cpu_s,
        // The kernel's threads: more of them on the POSIX side.
        machine_cpu_s: cpu_s + if side == Side::Posix { 1.0 } else { 0.5 },
        max_rss_bytes: 100 << 20,
        page_cache_growth_bytes: if side == Side::Posix { 50 << 20 } else { 0 },
        cgroup_peak_bytes: None,
        wall_s: 1.5,
        log: "x.log".into(),
        disk: (side == Side::Posix).then_some(DiskIo {
            reads: ops as u64 / 2,
            read_bytes: 0,
            writes: 10,
            write_bytes: ops as u64 * 2048,
        }),
        blobfs_metrics: if side == Side::BlobFs {
            parse_prometheus(
                "# TYPE blobfs_device_read_total counter\nblobfs_device_read_total 5\n\
                 blobfs_device_write_bytes_total 1024\nblobfs_read_seconds{quantile=\"0.5\"} 0.000001\n",
            )
        } else {
            Vec::new()
        },
    }
}

#[test]
fn ratios_pair_the_sides_of_each_phase() {
    let runs = vec![
        run(
            Config::Disk,
            Phase::Insert,
            Side::BlobFs,
            200_000.0,
            10.0,
            1.0,
        ),
        run(
            Config::Disk,
            Phase::Insert,
            Side::Posix,
            100_000.0,
            20.0,
            1.0,
        ),
        run(
            Config::Disk,
            Phase::Randread,
            Side::Posix,
            400_000.0,
            8.0,
            4.0,
        ),
        run(
            Config::Disk,
            Phase::Randread,
            Side::BlobFs,
            300_000.0,
            12.0,
            1.5,
        ),
        // A phase with one side only has no ratio.
        run(Config::Memory, Phase::Insert, Side::BlobFs, 1.0, 1.0, 1.0),
    ];
    let rs = ratios(&runs);
    assert_eq!(rs.len(), 2);
    assert_eq!((rs[0].config, rs[0].phase), (Config::Disk, Phase::Insert));
    assert_eq!(rs[0].ops, 2.0);
    assert_eq!(rs[0].p99, 0.5);
    // CPU per op: 1 s / 0.2 Mops = 5 vs 1 s / 0.1 Mops = 10.
    assert_eq!(rs[0].cpu, 0.5);
    // The machine's: 1.5 s / 0.2 Mops = 7.5 vs 2 s / 0.1 Mops = 20.
    assert_eq!(rs[0].machine_cpu, 0.375);
    assert_eq!(rs[0].memory, 100.0 / 150.0);
    assert_eq!(rs[1].phase, Phase::Randread);
    assert_eq!(rs[1].ops, 0.75);
    assert_eq!(rs[1].p99, 1.5);
    // 1.5 s / 0.3 Mops = 5 vs 4 s / 0.4 Mops = 10.
    assert!((rs[1].cpu - 0.5).abs() < 1e-12);

    let t = table(Config::Disk, &runs);
    assert!(
        t.contains(
            "| insert | BlobFS | 200,000 | 1.00 | 10.0 | 20.0 | 5.00 | 7.50 | 100 | 0.00 | 0.00 | 2.00x | 0.50x | 0.38x |"
        ),
        "{t}"
    );
    assert!(
        t.contains(
            "| insert | POSIX | 100,000 | 1.00 | 20.0 | 40.0 | 10.0 | 20.0 | 150 | 0.50 | 2.00 |  |  |  |"
        ),
        "{t}"
    );
    assert!(t.contains("| randread | BlobFS | 300,000 |"), "{t}");
    // Only the asked configuration's rows.
    assert_eq!(t.lines().count(), 2 + 4);
}

#[test]
fn json_holds_runs_commands_and_ratios() {
    let runs = vec![
        run(
            Config::Direct,
            Phase::Overwrite,
            Side::Posix,
            1000.0,
            300.0,
            2.0,
        ),
        run(
            Config::Direct,
            Phase::Overwrite,
            Side::BlobFs,
            1500.0,
            150.0,
            1.0,
        ),
    ];
    let j = report_json(
        Json::obj([("cores", Json::from(2u64))]),
        Json::obj([("keys", Json::from(10u64))]),
        &runs,
    )
    .to_string();
    assert!(j.starts_with(r#"{"benchmark":"kvbench","ratio_definition":"BlobFS / POSIX","machine":{"cores":2},"params":{"keys":10},"runs":[{"config":"direct","phase":"overwrite","side":"POSIX","benchmark":"overwrite","command":["db_bench","--num=10"],"ops_per_sec":1000,"#), "{j}");
    assert!(j.contains(r#""memory_mib":150,"#), "{j}");
    assert!(j.ends_with(r#""ratios":[{"config":"direct","phase":"overwrite","ops_ratio":1.5,"p99_ratio":0.5,"cpu_per_op_ratio":0.3333333333333333,"machine_cpu_per_op_ratio":0.3333333333333333,"memory_ratio":0.6666666666666666}]}"#), "{j}");
}

#[test]
fn flags_are_spdks_and_the_same_for_both_sides() {
    let f = Phase::Writesync.flags(1000, 20, 1, 8 << 20);
    for want in [
        "--key_size=16",
        "--value_size=1000",
        "--block_size=4096",
        "--bloom_bits=10",
        "--compression_type=none",
        "--target_file_size_base=67108864",
        "--statistics=1",
        "--histogram=1",
        "--benchmarks=overwrite",
        "--duration=20",
        "--disable_wal=0",
        "--sync=1",
        "--use_existing_db=1",
        "--num=1000",
        "--cache_size=8388608",
    ] {
        assert!(f.iter().any(|x| x == want), "{want} missing from {f:?}");
    }
    let i = Phase::Insert.flags(1000, 20, 1, 0);
    assert!(i.iter().any(|x| x == "--use_existing_db=0"));
    assert!(i.iter().any(|x| x == "--disable_wal=1"));
    assert!(!i.iter().any(|x| x.starts_with("--duration")));
    assert!(Phase::Randread
        .flags(1, 1, 16, 0)
        .contains(&"--threads=16".to_string()));
    assert_eq!(Phase::parse("readwrite"), Ok(Phase::Readwrite));
    // The LZ4 pair: its own fresh database, compressed, disk only.
    let l = Phase::InsertLz4.flags(1000, 20, 1, 0);
    assert!(l.iter().any(|x| x == "--compression_type=lz4"));
    assert!(l.iter().any(|x| x == "--use_existing_db=0"));
    let r = Phase::RandreadLz4.flags(1000, 20, 16, 0);
    assert!(r.iter().any(|x| x == "--compression_type=lz4"));
    assert!(r.iter().any(|x| x == "--use_existing_db=1"));
    assert!(r.iter().any(|x| x == "--benchmarks=readrandom"));
    assert_eq!(Phase::RandreadLz4.builds_on(), Phase::InsertLz4);
    assert!(Phase::RandreadLz4.runs_in(Config::Disk));
    assert!(!Phase::InsertLz4.runs_in(Config::Memory));
    assert!(Phase::parse("fill").is_err());
    assert_eq!(Config::parse("memory"), Ok(Config::Memory));
}

#[test]
fn device_io_per_op_comes_from_blobfs_metrics_and_diskstats() {
    let line = "   8       0 sda 1000 3 16000 50 200 9 40960 70 0 100 120 0 0 0 0";
    let (maj, min, d) = DiskIo::parse_line(line).unwrap();
    assert_eq!((maj, min), (8, 0));
    assert_eq!(d.reads, 1000);
    assert_eq!(d.read_bytes, 16000 * 512);
    assert_eq!(d.writes, 200);
    assert_eq!(d.write_bytes, 40960 * 512);
    let later = DiskIo { reads: 1500, ..d };
    assert_eq!(later.since(&d).reads, 500);
    assert!(DiskIo::parse_line("garbage").is_none());

    let m = parse_prometheus("# HELP x y\nx_total 3\nx_seconds{quantile=\"0.5\"} 0.25\nbad line\n");
    assert_eq!(
        m,
        vec![
            ("x_total".to_string(), 3.0),
            ("x_seconds{quantile=\"0.5\"}".to_string(), 0.25)
        ]
    );

    let b = run(Config::Disk, Phase::Randread, Side::BlobFs, 10.0, 1.0, 1.0);
    assert_eq!(b.device_reads_per_op(), 0.5);
    assert_eq!(b.device_write_kib_per_op(), 0.1);
    let p = run(Config::Disk, Phase::Randread, Side::Posix, 10.0, 1.0, 1.0);
    assert_eq!(p.device_reads_per_op(), 0.5);
    assert_eq!(p.device_write_kib_per_op(), 2.0);
    let none = RunFigures {
        disk: None,
        ..p.clone()
    };
    assert!(none.device_reads_per_op().is_nan());
    let t = table(Config::Disk, &[b.clone(), p]);
    assert!(t.contains("dev reads/op | KiB written/op"), "{t}");
    assert!(
        t.contains("| 0.50 | 0.10 |") || t.contains("| 0.5 | 0.1 |"),
        "{t}"
    );
    let j = report_json(Json::Null, Json::Null, &[b]).to_string();
    assert!(j.contains("\"blobfs_device_read_total\":5"), "{j}");
    assert!(j.contains("\"device_reads_per_op\":0.5"), "{j}");
}

#[test]
fn chart_of_no_runs_is_an_empty_svg() {
    // A run that failed at its first db_bench still writes a chart.
    let svg = chart_svg(&[]);
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(!svg.contains("<title>"));
    let mut huge = run(Config::Disk, Phase::Insert, Side::Posix, 1.0, 1e300, 1.0);
    huge.result.latency_us_p50 = 0.0;
    assert!(chart_svg(&[huge]).len() < 100_000);
}

#[test]
fn chart_is_an_svg_with_every_ratio() {
    let runs = vec![
        run(
            Config::Memory,
            Phase::Randread,
            Side::Posix,
            1000.0,
            300.0,
            2.0,
        ),
        run(
            Config::Memory,
            Phase::Randread,
            Side::BlobFs,
            1500.0,
            150.0,
            1.0,
        ),
    ];
    let svg = chart_svg(&runs);
    assert!(svg.starts_with("<svg"));
    assert!(svg.trim_end().ends_with("</svg>"));
    assert!(
        svg.contains("<title>memory randread: 1.500</title>"),
        "{svg}"
    );
    assert!(
        svg.contains("<title>memory randread: 0.500</title>"),
        "{svg}"
    );
    assert!(
        svg.contains("memory randread BlobFS: p50 1.00 p99 150 p99.9 300 µs"),
        "{svg}"
    );
}
