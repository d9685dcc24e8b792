//! One load on one target, for profilers: `iopath <raw|blob> <read|write>
//! <queue depth> <ops> [device]` (default device `mem:64M`).
//!
//! `fs-straight` and `fs-bounce` (reads, queue depth 1) read 4 KiB at random
//! block offsets of a 32 MiB BlobFS file through a direct handle: with
//! `File::read_at`, which lands the device's bytes straight in the caller's
//! buffer where the device allows it, and with `File::read_at_async`, which
//! reads into a DMA buffer and copies (the path every direct read took
//! before): the A/B of that change.
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

/// `ops` direct 4 KiB reads of a BlobFS file on `spec`, straight or through
/// a DMA buffer.
fn fs_reads(spec: &str, straight: bool, ops: u64) {
    use blobfs::{BlobFs, MkfsOptions, MountOptions, OpenOptions};
    const FILE: u64 = 32 << 20;
    let dev = blobstore::device::open_device(spec).expect("device");
    let fs = BlobFs::mkfs(dev, MkfsOptions::default(), MountOptions::default()).expect("mkfs");
    let f = fs.create("data").expect("create");
    let chunk = vec![0x5au8; 1 << 20];
    for _ in 0..FILE / chunk.len() as u64 {
        f.append(&chunk).expect("append");
    }
    f.sync().expect("sync");
    f.close().expect("close");
    let mut o = OpenOptions::read();
    o.direct = true;
    let f = fs.open("data", o).expect("open");
    let buf = blobstore::DmaBuf::new(4096).expect("buffer");
    let n = measured_fs(&f, straight, ops, buf);
    println!(
        "fs-{} read qd1: {n} ops",
        if straight { "straight" } else { "bounce" }
    );
    drop(f);
    fs.unmount().expect("unmount");
}

#[inline(never)]
fn measured_fs(f: &blobfs::File, straight: bool, ops: u64, mut buf: blobstore::DmaBuf) -> u64 {
    let mut rng = blobstore::util::SplitMix64::new(7);
    let blocks = (32 << 20) / 4096;
    for _ in 0..ops {
        let off = rng.below(blocks) * 4096;
        let n = if straight {
            f.read_at(off, &mut buf)
        } else {
            blobstore::block_on(f.read_at_async(off, &mut buf))
        }
        .expect("read");
        assert_eq!(n, 4096);
    }
    ops
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: iopath <raw|blob|fs-straight|fs-bounce> <read|write> <queue depth> <ops> [spec|soft-nvme]";
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
    if let Some(how) = target.strip_prefix("fs-") {
        if kind != "read" || qd != 1 || !matches!(how, "straight" | "bounce") {
            eprintln!("{usage}");
            std::process::exit(2);
        }
        return fs_reads(spec_text, how == "straight", ops);
    }
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
