//! One load on one target, for profilers: `iopath <raw|blob> <read|write>
//! <queue depth> <ops> [device spec]` (default device `mem:64M`).
//!
//! The measured part is `measured`, never inlined, so a profiler can
//! restrict itself to it, e.g.
//! `valgrind --tool=callgrind --toggle-collect='*iopath*measured*' iopath blob read 1 100000`.

use benches::load::{run_load_blocking, Limit, LoadReport, LoadSpec};
use benches::scenario::BlobVsRaw;
use benches::IoTarget;

#[inline(never)]
fn measured<T: IoTarget>(target: &T, spec: &LoadSpec) -> LoadReport {
    run_load_blocking(target, spec).expect("load")
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: iopath <raw|blob> <read|write> <queue depth> <ops> [spec]";
    let [target, kind, qd, ops, rest @ ..] = &args[..] else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let spec_text = rest.first().map_or("mem:67108864", String::as_str);
    let read_percent = match kind.as_str() {
        "read" => 100,
        "write" => 0,
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let qd: usize = qd.parse().expect("queue depth");
    let ops: u64 = ops.parse().expect("ops");
    let setup = BlobVsRaw::open(spec_text, &Default::default()).expect("open");
    setup.precondition().expect("precondition");
    let spec = LoadSpec::rand_4k(qd, read_percent, Limit::Ops(ops));
    let report = match target.as_str() {
        "raw" => measured(&setup.raw, &setup.raw_spec(&spec)),
        "blob" => measured(&setup.blob, &spec),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let lat = report.latency();
    println!(
        "{target} {kind} qd{qd}: {} ops, {:.0} IOPS, p50 {:.1} us, p99 {:.1} us",
        report.ops(),
        report.iops(),
        lat.percentile_us(50.0),
        lat.percentile_us(99.0)
    );
}
