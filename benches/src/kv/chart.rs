//! The SVG chart of a whole run ([`chart_svg`]): the ops/s and p99 ratios
//! per phase and configuration, and the latency percentiles of both sides.

use std::fmt::Write as _;

use super::figures::RunFigures;
use super::ratio::{ratios, Ratio};
use super::report::num;
use super::{Config, Phase, Side};

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const CONFIG_COLORS: [&str; Config::ALL.len()] =
    ["#4c72b0", "#dd8452", "#55a868", "#8172b3", "#c44e52"];
const SIDE_COLORS: [(Side, &str); 2] = [(Side::BlobFs, "#4c72b0"), (Side::Posix, "#dd8452")];

/// A bar panel of one ratio per (phase, configuration), with a line at 1.0.
fn ratio_panel(svg: &mut String, y0: f64, title: &str, rs: &[Ratio], pick: fn(&Ratio) -> f64) {
    let (x0, w, h) = (70.0, 860.0, 220.0);
    let max = rs
        .iter()
        .map(pick)
        .filter(|v| v.is_finite())
        .fold(1.5f64, f64::max)
        .min(20.0)
        * 1.1;
    let y = |v: f64| y0 + h - (v.min(max) / max) * h;
    let _ = writeln!(
        svg,
        r#"<text x="{x0}" y="{}" font-size="15" font-weight="bold">{}</text>"#,
        y0 - 12.0,
        esc(title)
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>"##
    );
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" font-size="11" text-anchor="end">{v:.2}</text><line x1="{x0}" x2="{}" y1="{yy}" y2="{yy}" stroke="#eee"/>"##,
            x0 - 5.0,
            y(v) + 4.0,
            x0 + w,
            yy = y(v)
        );
    }
    let _ = writeln!(
        svg,
        r##"<line x1="{x0}" x2="{}" y1="{yy}" y2="{yy}" stroke="#c00" stroke-dasharray="5,3"/>"##,
        x0 + w,
        yy = y(1.0)
    );
    let slot = w / Phase::ALL.len() as f64;
    let bar = slot / (Config::ALL.len() as f64 + 1.0);
    for (pi, phase) in Phase::ALL.into_iter().enumerate() {
        let sx = x0 + pi as f64 * slot;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{}" font-size="12" text-anchor="middle">{}</text>"#,
            sx + slot / 2.0,
            y0 + h + 16.0,
            phase.name()
        );
        for (ci, config) in Config::ALL.into_iter().enumerate() {
            let Some(r) = rs.iter().find(|r| r.phase == phase && r.config == config) else {
                continue;
            };
            let v = pick(r);
            if !v.is_finite() {
                continue;
            }
            let bx = sx + bar / 2.0 + ci as f64 * bar;
            let _ = writeln!(
                svg,
                r#"<rect x="{bx:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} {}: {v:.3}</title></rect><text x="{:.1}" y="{:.1}" font-size="10" text-anchor="middle">{v:.2}</text>"#,
                y(v),
                bar * 0.9,
                y0 + h - y(v),
                CONFIG_COLORS[ci],
                config.name(),
                phase.name(),
                bx + bar * 0.45,
                y(v) - 3.0
            );
        }
    }
}

/// The chart: ops/s ratio and p99 ratio per phase and configuration, and
/// the latency percentiles (p50, p99, p99.9, log scale) of both sides.
pub fn chart_svg(runs: &[RunFigures]) -> String {
    let rs = ratios(runs);
    let (width, height) = (960.0, 1060.0);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="70" y="24" font-size="17" font-weight="bold">kvbench: RocksDB db_bench on BlobFS vs POSIX (ratio = BlobFS / POSIX)</text>"#
    );
    for (ci, config) in Config::ALL.into_iter().enumerate() {
        let _ = writeln!(
            svg,
            r#"<rect x="{}" y="34" width="12" height="12" fill="{}"/><text x="{}" y="45" font-size="12">{}</text>"#,
            70 + ci * 110,
            CONFIG_COLORS[ci],
            86 + ci * 110,
            config.name()
        );
    }
    ratio_panel(&mut svg, 80.0, "ops/s ratio (higher is better)", &rs, |r| {
        r.ops
    });
    ratio_panel(
        &mut svg,
        380.0,
        "p99 latency ratio (lower is better)",
        &rs,
        |r| r.p99,
    );

    // Latency percentiles, log scale: a column per (config, phase), a
    // marker per (side, percentile).
    let (x0, y0, w, h) = (70.0, 680.0, 860.0, 300.0);
    let _ = writeln!(
        svg,
        r#"<text x="{x0}" y="{}" font-size="15" font-weight="bold">latency percentiles, µs (log scale)</text><text x="380" y="{}" font-size="12">circle p50, square p99, triangle p99.9</text>"#,
        y0 - 12.0,
        y0 - 15.0
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>"##
    );
    let lat: Vec<f64> = runs
        .iter()
        .flat_map(|r| {
            [
                r.result.latency_us_p50,
                r.result.latency_us_p99,
                r.result.latency_us_p999,
            ]
        })
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    // Decades from the smallest to the largest latency, 0.1 µs to 10 s at
    // most, so the axis loop below is short whatever the input.
    let lo = lat
        .iter()
        .cloned()
        .fold(f64::INFINITY, f64::min)
        .clamp(0.1, 1e7)
        .log10()
        .floor();
    let hi = lat
        .iter()
        .cloned()
        .fold(1.0f64, f64::max)
        .clamp(1.0, 1e7)
        .log10()
        .ceil()
        .max(lo + 1.0);
    let y = |v: f64| y0 + h - (v.max(1e-3).log10() - lo) / (hi - lo) * h;
    let mut d = lo;
    while d <= hi {
        let v = 10f64.powf(d);
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" font-size="11" text-anchor="end">{}</text><line x1="{x0}" x2="{}" y1="{yy}" y2="{yy}" stroke="#eee"/>"##,
            x0 - 5.0,
            y(v) + 4.0,
            num(v),
            x0 + w,
            yy = y(v)
        );
        d += 1.0;
    }
    let columns: Vec<(Config, Phase)> = Config::ALL
        .into_iter()
        .flat_map(|c| Phase::ALL.into_iter().map(move |p| (c, p)))
        .filter(|(c, p)| runs.iter().any(|r| r.config == *c && r.phase == *p))
        .collect();
    let slot = w / columns.len().max(1) as f64;
    for (i, (config, phase)) in columns.iter().enumerate() {
        let cx = x0 + (i as f64 + 0.5) * slot;
        let _ = writeln!(
            svg,
            r#"<text x="{cx:.1}" y="{:.1}" font-size="10" text-anchor="end" transform="rotate(-40 {cx:.1} {:.1})">{} {}</text>"#,
            y0 + h + 14.0,
            y0 + h + 14.0,
            config.name(),
            phase.name()
        );
        for (si, (side, color)) in SIDE_COLORS.into_iter().enumerate() {
            let Some(r) = runs
                .iter()
                .find(|r| r.config == *config && r.phase == *phase && r.side == side)
            else {
                continue;
            };
            let mx = cx + (si as f64 - 0.5) * slot * 0.35;
            let (p50, p99, p999) = (
                y(r.result.latency_us_p50),
                y(r.result.latency_us_p99),
                y(r.result.latency_us_p999),
            );
            let _ = writeln!(
                svg,
                r#"<g fill="{color}"><title>{} {} {}: p50 {} p99 {} p99.9 {} µs</title><circle cx="{mx:.1}" cy="{p50:.1}" r="4"/><rect x="{:.1}" y="{:.1}" width="8" height="8"/><path d="M{:.1} {:.1} l5 9 h-10 z"/></g>"#,
                config.name(),
                phase.name(),
                side.name(),
                num(r.result.latency_us_p50),
                num(r.result.latency_us_p99),
                num(r.result.latency_us_p999),
                mx - 4.0,
                p99 - 4.0,
                mx,
                p999 - 5.0
            );
        }
    }
    for (si, (side, color)) in SIDE_COLORS.into_iter().enumerate() {
        let _ = writeln!(
            svg,
            r#"<rect x="{}" y="{}" width="12" height="12" fill="{color}"/><text x="{}" y="{}" font-size="12">{}</text>"#,
            // Right of the title and the marker key, not over them.
            700 + si * 110,
            y0 - 26.0,
            716 + si * 110,
            y0 - 15.0,
            side.name()
        );
    }
    svg.push_str("</svg>\n");
    svg
}
