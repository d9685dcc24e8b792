//! The parser of `db_bench`'s output: the figures of one benchmark's result
//! line and its latency percentiles.

/// What `db_bench` printed about one benchmark.
#[derive(Clone, Debug, PartialEq)]
pub struct DbBenchResult {
    /// Microseconds per operation (db_bench's own figure, per thread).
    pub micros_per_op: f64,
    /// Operations per second over all threads.
    pub ops_per_sec: f64,
    /// Seconds the benchmark ran.
    pub seconds: f64,
    /// Operations done (for `readwhilewriting`: the reads).
    pub operations: u64,
    /// Median latency, µs.
    pub latency_us_p50: f64,
    /// 99th percentile latency, µs.
    pub latency_us_p99: f64,
    /// 99.9th percentile latency, µs.
    pub latency_us_p999: f64,
}

/// Parses `db_bench`'s output for `benchmark`: the result line
/// (`<name> : <x> micros/op <n> ops/sec <s> seconds <k> operations; ...`)
/// and the first `Percentiles:` line after it (needs `--histogram=1`).
pub fn parse_db_bench(output: &str, benchmark: &str) -> Result<DbBenchResult, String> {
    let mut lines = output.lines();
    let result_line = lines
        .by_ref()
        .find(|l| {
            let mut parts = l.splitn(2, ':');
            parts.next().map(str::trim) == Some(benchmark)
                && parts.next().is_some_and(|rest| rest.contains("micros/op"))
        })
        .ok_or_else(|| format!("no result line for {benchmark:?} in db_bench's output"))?;
    let words: Vec<&str> = result_line
        .split(|c: char| c.is_whitespace() || c == ';')
        .filter(|w| !w.is_empty())
        .collect();
    // The number just before the given unit word.
    let before = |unit: &str| -> Result<f64, String> {
        let i = words
            .iter()
            .position(|w| *w == unit)
            .ok_or_else(|| format!("no {unit:?} in result line {result_line:?}"))?;
        words
            .get(i.wrapping_sub(1))
            .and_then(|w| w.parse::<f64>().ok())
            .ok_or_else(|| format!("no number before {unit:?} in result line {result_line:?}"))
    };
    let micros_per_op = before("micros/op")?;
    let ops_per_sec = before("ops/sec")?;
    let seconds = before("seconds")?;
    let operations = before("operations")? as u64;
    let pct_line = lines
        .find(|l| l.trim_start().starts_with("Percentiles:"))
        .ok_or_else(|| {
            format!(
                "no \"Percentiles:\" line after the {benchmark:?} result (is --histogram=1 set?)"
            )
        })?;
    let pct_words: Vec<&str> = pct_line.split_whitespace().collect();
    let pct = |label: &str| -> Result<f64, String> {
        let i = pct_words
            .iter()
            .position(|w| *w == label)
            .ok_or_else(|| format!("no {label} in {pct_line:?}"))?;
        pct_words
            .get(i + 1)
            .and_then(|w| w.parse::<f64>().ok())
            .ok_or_else(|| format!("no number after {label} in {pct_line:?}"))
    };
    Ok(DbBenchResult {
        micros_per_op,
        ops_per_sec,
        seconds,
        operations,
        latency_us_p50: pct("P50:")?,
        latency_us_p99: pct("P99:")?,
        latency_us_p999: pct("P99.9:")?,
    })
}
