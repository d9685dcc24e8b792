//! The text and JSON reports: the Markdown table of a configuration
//! ([`table`]), the whole JSON report ([`report_json`]), and the number
//! formats the tables and the chart share.

use std::fmt::Write as _;

use super::figures::RunFigures;
use super::ratio::ratios;
use super::{Config, Phase, Side};
use crate::json::Json;

fn group(n: f64) -> String {
    if !n.is_finite() {
        return "-".to_string();
    }
    let s = format!("{:.0}", n.round());
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

/// A figure as the tables and the chart print it: `-` when not finite,
/// whole with thousands separators from 100 up, one decimal from 10, else
/// two.
pub(super) fn num(n: f64) -> String {
    if !n.is_finite() {
        "-".to_string()
    } else if n >= 100.0 {
        group(n)
    } else if n >= 10.0 {
        format!("{n:.1}")
    } else {
        format!("{n:.2}")
    }
}

fn ratio_str(r: f64) -> String {
    if r.is_finite() {
        format!("{r:.2}x")
    } else {
        "-".to_string()
    }
}

/// The Markdown table of one configuration: a row per (phase, side), the
/// ratios on the BlobFS row.
pub fn table(config: Config, runs: &[RunFigures]) -> String {
    let rs = ratios(runs);
    let mut t = String::new();
    t.push_str("| phase | side | ops/s | p50 µs | p99 µs | p99.9 µs | CPU s/Mops | machine CPU s/Mops | memory MiB | dev reads/op | KiB written/op | ops/s BlobFS/POSIX | p99 BlobFS/POSIX | machine CPU/op BlobFS/POSIX |\n");
    t.push_str(
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for phase in Phase::ALL {
        for side in [Side::BlobFs, Side::Posix] {
            let Some(r) = runs
                .iter()
                .find(|r| r.config == config && r.phase == phase && r.side == side)
            else {
                continue;
            };
            let ratio = rs
                .iter()
                .find(|x| x.config == config && x.phase == phase && side == Side::BlobFs);
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                phase.name(),
                side.name(),
                group(r.result.ops_per_sec),
                num(r.result.latency_us_p50),
                num(r.result.latency_us_p99),
                num(r.result.latency_us_p999),
                num(r.cpu_s_per_mops()),
                num(r.machine_cpu_s_per_mops()),
                group(r.memory_mib()),
                num(r.device_reads_per_op()),
                num(r.device_write_kib_per_op()),
                ratio.map_or(String::new(), |x| ratio_str(x.ops)),
                ratio.map_or(String::new(), |x| ratio_str(x.p99)),
                ratio.map_or(String::new(), |x| ratio_str(x.machine_cpu)),
            );
        }
    }
    t
}

fn run_json(r: &RunFigures) -> Json {
    let mib = |b: u64| Json::Num(b as f64 / (1 << 20) as f64);
    Json::obj([
        ("config", Json::str(r.config.name())),
        ("phase", Json::str(r.phase.name())),
        ("side", Json::str(r.side.name())),
        ("benchmark", Json::str(r.phase.benchmark())),
        (
            "command",
            Json::Arr(r.command.iter().map(|a| Json::str(a.clone())).collect()),
        ),
        ("ops_per_sec", Json::Num(r.result.ops_per_sec)),
        ("micros_per_op", Json::Num(r.result.micros_per_op)),
        ("operations", Json::from(r.result.operations)),
        ("seconds", Json::Num(r.result.seconds)),
        ("latency_us_p50", Json::Num(r.result.latency_us_p50)),
        ("latency_us_p99", Json::Num(r.result.latency_us_p99)),
        ("latency_us_p999", Json::Num(r.result.latency_us_p999)),
        ("cpu_s", Json::Num(r.cpu_s)),
        ("cpu_s_per_mops", Json::Num(r.cpu_s_per_mops())),
        ("machine_cpu_s", Json::Num(r.machine_cpu_s)),
        (
            "machine_cpu_s_per_mops",
            Json::Num(r.machine_cpu_s_per_mops()),
        ),
        ("max_rss_mib", mib(r.max_rss_bytes)),
        ("page_cache_growth_mib", mib(r.page_cache_growth_bytes)),
        ("memory_mib", Json::Num(r.memory_mib())),
        (
            "cgroup_peak_mib",
            r.cgroup_peak_bytes.map_or(Json::Null, mib),
        ),
        ("wall_s", Json::Num(r.wall_s)),
        ("device_reads_per_op", Json::Num(r.device_reads_per_op())),
        (
            "device_write_kib_per_op",
            Json::Num(r.device_write_kib_per_op()),
        ),
        (
            "host_disk",
            match r.disk {
                Some(d) => Json::obj([
                    ("reads", Json::from(d.reads)),
                    ("read_bytes", Json::from(d.read_bytes)),
                    ("writes", Json::from(d.writes)),
                    ("write_bytes", Json::from(d.write_bytes)),
                ]),
                None => Json::Null,
            },
        ),
        (
            "blobfs_metrics",
            Json::Obj(
                r.blobfs_metrics
                    .iter()
                    .map(|(n, v)| (n.clone(), Json::Num(*v)))
                    .collect(),
            ),
        ),
        ("log", Json::str(r.log.clone())),
    ])
}

/// The whole report: `machine` and `params` as the caller describes them,
/// every run, and every ratio.
pub fn report_json(machine: Json, params: Json, runs: &[RunFigures]) -> Json {
    let ratios = ratios(runs)
        .into_iter()
        .map(|r| {
            Json::obj([
                ("config", Json::str(r.config.name())),
                ("phase", Json::str(r.phase.name())),
                ("ops_ratio", Json::Num(r.ops)),
                ("p99_ratio", Json::Num(r.p99)),
                ("cpu_per_op_ratio", Json::Num(r.cpu)),
                ("machine_cpu_per_op_ratio", Json::Num(r.machine_cpu)),
                ("memory_ratio", Json::Num(r.memory)),
            ])
        })
        .collect();
    Json::obj([
        ("benchmark", Json::str("kvbench")),
        ("ratio_definition", Json::str("BlobFS / POSIX")),
        ("machine", machine),
        ("params", params),
        ("runs", Json::Arr(runs.iter().map(run_json).collect())),
        ("ratios", Json::Arr(ratios)),
    ])
}
