//! One load on one target, for profilers: `iopath <raw|blob> <read|write>
//! <queue depth> <ops> [device]` (default device `mem:64M`).
//!
//! `device` is a device spec, or `soft-nvme`: the NVMe driver on its
//! software controller (`blobstore::device::nvme::soft`, commands completed
//! in memory), one 64 MiB namespace of 4 KiB blocks. That controller is a
//! test and benchmark twin, not a device spec.
//!
//! The measured part is `measured`, never inlined, so a profiler can
//! restrict itself to it, e.g.
//! `valgrind --tool=callgrind --toggle-collect='*iopath*measured*' iopath blob read 1 100000`.
//! `make bench-iopath` (benches/iopath.sh) instead counts whole runs of N
//! and of fewer operations and divides the difference, so setup cancels out;
//! for the driver's own share (`nvme-driver`) it collects only inside the
//! driver's entry points, minus the software controller (see that script).

use std::sync::Arc;

use benches::load::{run_load_blocking, Limit, LoadReport, LoadSpec};
use benches::scenario::BlobVsRaw;
use benches::IoTarget;
use blobstore::BlockDevice;

#[inline(never)]
fn measured<T: IoTarget>(target: &T, spec: &LoadSpec) -> LoadReport {
    run_load_blocking(target, spec).expect("load")
}

fn soft_nvme() -> Arc<dyn BlockDevice> {
    use blobstore::device::nvme::soft::SoftController;
    // MDTS 5: 128 KiB per command; DSM and Write Zeroes.
    let (_model, ctrl) =
        SoftController::attach_with(5, 0b1100, &[(4096, 64 << 20)]).expect("soft controller");
    Arc::new(blobstore::NvmeDevice::from_controller(ctrl, 1).expect("namespace 1"))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: iopath <raw|blob> <read|write> <queue depth> <ops> [spec|soft-nvme]";
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
    let setup = if spec_text == "soft-nvme" {
        BlobVsRaw::on_device(soft_nvme(), spec_text, &Default::default())
    } else {
        BlobVsRaw::open(spec_text, &Default::default())
    }
    .expect("open");
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
