//! Criterion benches: raw device vs blob, 4 KiB random reads and writes at
//! queue depth 1 and 32 from one thread, on a memory device and (when it
//! opens) a file device; and the metadata cycle.
//!
//! One criterion iteration is one I/O (or one metadata cycle), so the time
//! per iteration is 1 / IOPS; compare `raw` and `blob` within a group.
//! Set `BLOBSTORE_BENCH_DIR` to put the file image elsewhere than the
//! system temp dir.

use std::time::Duration;

use benches::load::{run_load_blocking, Limit, LoadSpec};
use benches::scenario::{metadata_cycle, resolve_device, run_repeated, BlobVsRaw};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const DEVICE_BYTES: u64 = 256 << 20;

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

fn bench_device(c: &mut Criterion, entry: &str) {
    let parent = std::env::var_os("BLOBSTORE_BENCH_DIR")
        .map(Into::into)
        .unwrap_or_else(std::env::temp_dir);
    let (spec, _dir) = match resolve_device(entry, DEVICE_BYTES, &parent) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("{entry}: skipped: {e}");
            return;
        }
    };
    let setup = match BlobVsRaw::open(&spec, &Default::default()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{entry}: skipped: cannot open {spec}: {e}");
            return;
        }
    };
    setup.precondition().expect("precondition");

    for qd in [1usize, 32] {
        for (workload, read_percent) in [("randread", 100u8), ("randwrite", 0)] {
            let mut group = c.benchmark_group(format!("{entry}/qd{qd}/{workload}_4k"));
            group.throughput(Throughput::Elements(1));
            let spec = |ops| LoadSpec::rand_4k(qd, read_percent, Limit::Ops(ops));
            group.bench_function("raw", |b| {
                b.iter_custom(|iters| {
                    run_load_blocking(&setup.raw, &setup.raw_spec(&spec(iters)))
                        .expect("raw load")
                        .elapsed
                })
            });
            group.bench_function("blob", |b| {
                b.iter_custom(|iters| {
                    run_load_blocking(&setup.blob, &spec(iters))
                        .expect("blob load")
                        .elapsed
                })
            });
            group.finish();
        }
    }

    let mut group = c.benchmark_group(format!("{entry}/metadata"));
    group.throughput(Throughput::Elements(1));
    group.bench_function("create_resize_sync_delete", |b| {
        b.iter_custom(|iters| {
            run_repeated(Limit::Ops(iters), |_| metadata_cycle(&setup.store))
                .expect("metadata cycle")
                .elapsed
        })
    });
    group.finish();
    drop(setup); // before `_dir` removes the image
}

fn blobstore_benches(c: &mut Criterion) {
    bench_device(c, "mem");
    bench_device(c, "file");
}

criterion_group! {
    name = benches;
    config = config();
    targets = blobstore_benches
}
criterion_main!(benches);
