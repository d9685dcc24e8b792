//! Mount time against the number of files (issue 22 item 6): how long a
//! clean `BlobFs::mount` takes with 1,000, 10,000 and 100,000 files of 100
//! bytes, on a memory device and on a file-backed image in a temporary
//! directory (io_uring, O_DIRECT).
//!
//! ```sh
//! cargo run --release -p blobfs --example mount_scale
//! cargo run --release -p blobfs --example mount_scale -- --files 1000,10000 --mounts 3
//! ```
//!
//! `make bench-mount` runs it with the defaults. Options: `--files N,N,..`
//! (default 1000,10000,100000), `--mounts M` (mounts timed per count and
//! device, default 5), `--devices mem,file` (default both), `--dir DIR`
//! (where the file image goes, default the temporary directory),
//! `--cluster-size BYTES` (default 65536: the image stays small while the
//! metadata, what a mount reads, is the same as with 1 MiB clusters) and
//! `--md-pages-per-file N` (metadata pages mkfs reserves per file, default
//! 1, plus spare; a build whose files take two pages needs 2).
//!
//! Each count gets a fresh file system: one directory `db` with the files
//! `db/NNNNNN.sst` in it, each created, appended 100 bytes and closed, as
//! RocksDB's SST files are; then it is unmounted cleanly. It is built on a
//! memory device (fast syncs), whose image is copied, sparsely, into the
//! file for the file device. Every timed mount opens the device afresh, is
//! timed from the call to `BlobFs::mount` to its return, and is unmounted
//! cleanly (untimed) before the next. Prints the median, minimum and
//! maximum per count and device, and the median per file.

use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blobfs::{BlobFs, MkfsOptions, MountOptions};
use blobstore::device::FileOptions;
use blobstore::{BlockDevice, FileDevice, MemDevice};

struct Args {
    files: Vec<u64>,
    mounts: usize,
    devices: Vec<String>,
    dir: std::path::PathBuf,
    cluster_size: u32,
    md_pages_per_file: u64,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        files: vec![1000, 10_000, 100_000],
        mounts: 5,
        devices: vec!["mem".into(), "file".into()],
        dir: std::env::temp_dir(),
        cluster_size: 64 << 10,
        md_pages_per_file: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or_else(|| format!("{k} needs a value"));
        let num = |s: &str| s.parse::<u64>().map_err(|e| format!("{s:?}: {e}"));
        match k.as_str() {
            "--files" => a.files = v()?.split(',').map(num).collect::<Result<_, _>>()?,
            "--mounts" => a.mounts = num(&v()?)?.max(1) as usize,
            "--devices" => a.devices = v()?.split(',').map(str::to_string).collect(),
            "--dir" => a.dir = v()?.into(),
            "--cluster-size" => a.cluster_size = num(&v()?)? as u32,
            "--md-pages-per-file" => a.md_pages_per_file = num(&v()?)?.max(1),
            "--help" | "-h" => return Err(String::new()),
            _ => return Err(format!("unknown argument {k}")),
        }
    }
    if let Some(d) = a.devices.iter().find(|d| *d != "mem" && *d != "file") {
        return Err(format!("device {d:?}: mem or file"));
    }
    Ok(a)
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// A fresh BlobFS with `n` files of 100 bytes, unmounted, on a memory
/// device.
fn build(n: u64, a: &Args) -> Res<MemDevice> {
    let cluster = a.cluster_size as u64;
    // Room for every file's cluster, and metadata pages for every file.
    let md_pages = n * a.md_pages_per_file + 1024;
    let size = ((n + n / 4 + 256) * cluster + md_pages * 4096).next_multiple_of(cluster);
    let mem = MemDevice::new(size, 4096)?;
    let fs = BlobFs::mkfs(
        Arc::new(mem.clone()),
        MkfsOptions {
            cluster_size: a.cluster_size,
            md_pages: Some(md_pages),
            force: false,
        },
        MountOptions::default(),
    )?;
    fs.create_dir("db")?;
    let data = [7u8; 100];
    for i in 0..n {
        let f = fs.create(&format!("db/{i:06}.sst"))?;
        f.append(&data)?;
        f.close()?;
    }
    fs.unmount()?;
    Ok(mem)
}

/// Copies the memory device's image into a new sparse file at `path`
/// (only the 1 MiB pieces that are not all zeroes are written).
fn dump(mem: &MemDevice, path: &std::path::Path) -> Res<()> {
    let size = mem.geometry().size_bytes();
    let mut f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        mem.load_bytes(off as usize, &mut buf[..n]);
        if buf[..n].iter().any(|&b| b != 0) {
            f.seek(SeekFrom::Start(off))?;
            f.write_all(&buf[..n])?;
        }
        off += n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// Times `mounts` clean mounts of the device `open` returns.
fn time_mounts(
    n: u64,
    mounts: usize,
    open: impl Fn() -> Res<Arc<dyn BlockDevice>>,
) -> Res<Vec<Duration>> {
    let mut times = Vec::with_capacity(mounts);
    for _ in 0..mounts {
        let dev = open()?;
        let start = Instant::now();
        let fs = BlobFs::mount(dev, MountOptions::default())?;
        times.push(start.elapsed());
        let entries = fs.space().entries;
        if entries != n + 1 {
            return Err(format!("mounted {entries} entries, expected {}", n + 1).into());
        }
        fs.unmount()?;
    }
    times.sort();
    Ok(times)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!(
        "{cpu}, {cores} cores, {}",
        blobfs::meta::utc(blobfs::meta::now_ns())
    )
}

fn main() -> Res<()> {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("mount_scale: {e}");
            }
            eprintln!(
                "usage: mount_scale [--files 1000,10000,100000] [--mounts 5] \
                 [--devices mem,file] [--dir DIR] [--cluster-size 65536] \
                 [--md-pages-per-file 1]"
            );
            std::process::exit(2);
        }
    };
    println!("# mount_scale: clean BlobFS mount time, files of 100 bytes");
    println!("# {}", machine());
    println!(
        "# cluster {} bytes, {} mounts per row, image for the file device in {}",
        a.cluster_size,
        a.mounts,
        a.dir.display()
    );
    println!(
        "{:>8}  {:>6}  {:>10}  {:>10}  {:>10}  {:>12}",
        "files", "device", "median_s", "min_s", "max_s", "us_per_file"
    );
    for &n in &a.files {
        let built = Instant::now();
        let mem = build(n, &a)?;
        eprintln!("built {n} files in {:.1} s", built.elapsed().as_secs_f64());
        for d in &a.devices {
            let times = if d == "mem" {
                time_mounts(n, a.mounts, || Ok(Arc::new(mem.clone())))?
            } else {
                let path = a
                    .dir
                    .join(format!("mount_scale-{}-{n}.img", std::process::id()));
                dump(&mem, &path)?;
                let times = time_mounts(n, a.mounts, || {
                    Ok(Arc::new(FileDevice::open(&path, FileOptions::default())?))
                });
                let _ = std::fs::remove_file(&path);
                times?
            };
            let median = times[times.len() / 2];
            println!(
                "{n:>8}  {d:>6}  {:>10.4}  {:>10.4}  {:>10.4}  {:>12.2}",
                median.as_secs_f64(),
                times[0].as_secs_f64(),
                times[times.len() - 1].as_secs_f64(),
                median.as_secs_f64() * 1e6 / n.max(1) as f64
            );
        }
    }
    Ok(())
}
