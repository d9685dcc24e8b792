//! `blobfs-bench`: BlobFS against ext4 (through `std::fs`) doing the same
//! work in the same run: sequential append and read MiB/s, 4 KiB random
//! read IOPS, and create+write+sync+delete cycles per second.
//!
//! BlobFS runs on a file device (an O_DIRECT image) in the same directory as
//! the POSIX files, so both sides use the same disk. Rounds alternate the
//! order of the two sides; the table shows medians and the median of the
//! per-round ratios. Both sides read through their own cache (the page cache
//! for ext4, BlobFS's read cache), as a user of each would.

use std::fs::{self, OpenOptions as StdOpen};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use benches::stats::median;
use blobfs::{BlobFs, MkfsOptions, MountOptions, OpenOptions};
use blobstore::util::SplitMix64;
use blobstore::util::{format_size, parse_size};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "BlobFS vs ext4 (std::fs): sequential and random I/O, metadata cycles")]
struct Args {
    /// Size of the file written and read sequentially, and read randomly.
    #[arg(long, default_value = "256M")]
    file_size: String,
    /// Seconds per random-read and metadata measurement.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Rounds; medians are over rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Directory on the disk under test (default: the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// The four figures of one side in one round.
#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    append_mib_s: f64,
    read_mib_s: f64,
    rand_iops: f64,
    meta_per_s: f64,
}

const CHUNK: usize = 64 << 10;

fn posix_round(dir: &Path, size: u64, secs: f64) -> std::io::Result<Figures> {
    let path = dir.join("data");
    let data = vec![0x5Au8; CHUNK];
    let t = Instant::now();
    let mut f = fs::File::create(&path)?;
    let mut done = 0;
    while done < size {
        f.write_all(&data)?;
        done += CHUNK as u64;
    }
    f.sync_all()?;
    let append = size as f64 / t.elapsed().as_secs_f64() / (1 << 20) as f64;
    let f = fs::File::open(&path)?;
    let mut buf = vec![0u8; CHUNK];
    let t = Instant::now();
    let mut off = 0;
    while off < size {
        f.read_exact_at(&mut buf, off)?;
        off += CHUNK as u64;
    }
    let read = size as f64 / t.elapsed().as_secs_f64() / (1 << 20) as f64;
    let mut rng = SplitMix64::new(7);
    let mut small = [0u8; 4096];
    let (t, mut n) = (Instant::now(), 0u64);
    while t.elapsed().as_secs_f64() < secs {
        for _ in 0..64 {
            f.read_exact_at(&mut small, rng.below(size / 4096) * 4096)?;
        }
        n += 64;
    }
    let rand = n as f64 / t.elapsed().as_secs_f64();
    let d = fs::File::open(dir)?;
    let (t, mut m) = (Instant::now(), 0u64);
    while t.elapsed().as_secs_f64() < secs {
        let p = dir.join(format!("meta{m}"));
        let mut g = StdOpen::new().create_new(true).write(true).open(&p)?;
        g.write_all(&small)?;
        g.sync_all()?;
        d.sync_all()?; // the new name is durable too, as BlobFS's create is
        fs::remove_file(&p)?;
        d.sync_all()?;
        m += 1;
    }
    let meta = m as f64 / t.elapsed().as_secs_f64();
    fs::remove_file(&path)?;
    Ok(Figures {
        append_mib_s: append,
        read_mib_s: read,
        rand_iops: rand,
        meta_per_s: meta,
    })
}

fn blobfs_round(fs: &BlobFs, size: u64, secs: f64) -> blobfs::Result<Figures> {
    let data = vec![0x5Au8; CHUNK];
    let t = Instant::now();
    let f = fs.create("data")?;
    let mut done = 0;
    while done < size {
        f.append(&data)?;
        done += CHUNK as u64;
    }
    f.sync()?;
    let append = size as f64 / t.elapsed().as_secs_f64() / (1 << 20) as f64;
    f.close()?;
    let f = fs.open("data", OpenOptions::read())?;
    let mut buf = vec![0u8; CHUNK];
    let t = Instant::now();
    let mut off = 0;
    while off < size {
        f.read_at(off, &mut buf)?;
        off += CHUNK as u64;
    }
    let read = size as f64 / t.elapsed().as_secs_f64() / (1 << 20) as f64;
    let mut rng = SplitMix64::new(7);
    let mut small = [0u8; 4096];
    let (t, mut n) = (Instant::now(), 0u64);
    while t.elapsed().as_secs_f64() < secs {
        for _ in 0..64 {
            f.read_at(rng.below(size / 4096) * 4096, &mut small)?;
        }
        n += 64;
    }
    let rand = n as f64 / t.elapsed().as_secs_f64();
    drop(f);
    let (t, mut m) = (Instant::now(), 0u64);
    while t.elapsed().as_secs_f64() < secs {
        let name = format!("meta{m}");
        let g = fs.create(&name)?;
        g.append(&small)?;
        g.sync()?;
        g.close()?;
        fs.remove_file(&name)?;
        m += 1;
    }
    let meta = m as f64 / t.elapsed().as_secs_f64();
    fs.remove_file("data")?;
    Ok(Figures {
        append_mib_s: append,
        read_mib_s: read,
        rand_iops: rand,
        meta_per_s: meta,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let size = match parse_size(&args.file_size) {
        Ok(s) if s >= CHUNK as u64 => s / CHUNK as u64 * CHUNK as u64,
        Ok(_) => {
            eprintln!("--file-size must be at least 64K");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("--file-size: {e}");
            return ExitCode::FAILURE;
        }
    };
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = base.join(format!("blobfs-bench-{}", std::process::id()));
    let posix_dir = work.join("posix");
    if let Err(e) = fs::create_dir_all(&posix_dir) {
        eprintln!("cannot make {}: {e}", posix_dir.display());
        return ExitCode::FAILURE;
    }
    let img = work.join("blobfs.img");
    let dev_size = (size * 2 + (256 << 20)).div_ceil(1 << 20) << 20;
    let spec = format!("file:{}?size={dev_size}&prealloc=true", img.display());
    let result = run(&args, size, &spec, &posix_dir);
    let _ = fs::remove_dir_all(&work);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blobfs-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args, size: u64, spec: &str, posix_dir: &Path) -> Result<(), String> {
    let dev = blobstore::device::open_device(spec).map_err(|e| e.to_string())?;
    // The benchmark's scratch image holds the previous run's BlobFS.
    let mkfs = MkfsOptions {
        force: true,
        ..Default::default()
    };
    let fs = BlobFs::mkfs(dev, mkfs, MountOptions::default()).map_err(|e| e.to_string())?;
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for r in 0..args.rounds {
        let mut step = |blob_first: bool| -> Result<(), String> {
            if blob_first {
                ours.push(blobfs_round(&fs, size, args.seconds).map_err(|e| e.to_string())?);
            } else {
                theirs.push(posix_round(posix_dir, size, args.seconds).map_err(|e| e.to_string())?);
            }
            Ok(())
        };
        let blob_first = r % 2 == 0;
        step(blob_first)?;
        step(!blob_first)?;
        let (o, t) = (ours[r], theirs[r]);
        eprintln!(
            "  round {}/{}: append {:.2}x, read {:.2}x, 4K randread {:.2}x, create+sync+delete {:.2}x",
            r + 1,
            args.rounds,
            o.append_mib_s / t.append_mib_s,
            o.read_mib_s / t.read_mib_s,
            o.rand_iops / t.rand_iops,
            o.meta_per_s / t.meta_per_s
        );
    }
    fs.unmount().map_err(|e| e.to_string())?;
    type Pick = fn(&Figures) -> f64;
    let rows: [(&str, &str, Pick); 4] = [
        ("sequential append + sync", "MiB/s", |f| f.append_mib_s),
        ("sequential read (64K)", "MiB/s", |f| f.read_mib_s),
        ("4K random read (QD1)", "IOPS", |f| f.rand_iops),
        ("create+4K+sync+delete", "ops/s", |f| f.meta_per_s),
    ];
    println!();
    println!(
        "BlobFS (file device, O_DIRECT) vs ext4 (std::fs), same disk, {} file, median of {} rounds",
        format_size(size),
        args.rounds
    );
    println!(
        "{:<26} {:>7} {:>12} {:>12} {:>8}",
        "workload", "unit", "ext4", "BlobFS", "ratio"
    );
    for (name, unit, pick) in rows {
        let o: Vec<f64> = ours.iter().map(pick).collect();
        let t: Vec<f64> = theirs.iter().map(pick).collect();
        let ratios: Vec<f64> = o.iter().zip(&t).map(|(a, b)| a / b).collect();
        println!(
            "{:<26} {:>7} {:>12.0} {:>12.0} {:>7.2}x",
            name,
            unit,
            median(&t),
            median(&o),
            median(&ratios)
        );
    }
    Ok(())
}
