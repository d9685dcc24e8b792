//! The BlobFS/POSIX ratios of each phase: always BlobFS divided by POSIX,
//! so above 1.0 is better for ops/s, below 1.0 is better for latency, CPU
//! and memory.

use super::figures::RunFigures;
use super::{Config, Phase, Side};

/// BlobFS divided by POSIX for one phase of one configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ratio {
    /// The configuration.
    pub config: Config,
    /// The phase.
    pub phase: Phase,
    /// ops/s ratio: above 1.0 means BlobFS is faster.
    pub ops: f64,
    /// p99 latency ratio: below 1.0 means BlobFS's tail is shorter.
    pub p99: f64,
    /// CPU per operation ratio (the child's own): below 1.0 means BlobFS
    /// uses less CPU.
    pub cpu: f64,
    /// The whole machine's CPU per operation ratio: below 1.0 means less.
    pub machine_cpu: f64,
    /// Memory ratio: below 1.0 means BlobFS uses less memory.
    pub memory: f64,
}

/// The ratios of every (configuration, phase) that has both sides, in the
/// order the runs were made.
pub fn ratios(runs: &[RunFigures]) -> Vec<Ratio> {
    let mut out: Vec<Ratio> = Vec::new();
    for b in runs.iter().filter(|r| r.side == Side::BlobFs) {
        if out
            .iter()
            .any(|r| r.config == b.config && r.phase == b.phase)
        {
            continue;
        }
        let Some(p) = runs
            .iter()
            .find(|r| r.side == Side::Posix && r.config == b.config && r.phase == b.phase)
        else {
            continue;
        };
        out.push(Ratio {
            config: b.config,
            phase: b.phase,
            ops: b.result.ops_per_sec / p.result.ops_per_sec,
            p99: b.result.latency_us_p99 / p.result.latency_us_p99,
            cpu: b.cpu_s_per_mops() / p.cpu_s_per_mops(),
            machine_cpu: b.machine_cpu_s_per_mops() / p.machine_cpu_s_per_mops(),
            memory: b.memory_mib() / p.memory_mib(),
        });
    }
    out
}
