//! `kvbench`'s command line ([`Args`]) and where its defaults come from
//! (the cargo target directory the binary was built into).

use std::path::{Path, PathBuf};

use clap::Parser;

// No doc comment on `Args`: clap would print it in `--help`.
#[derive(Parser, Debug)]
#[command(
    about = "RocksDB db_bench on BlobFS vs the kernel file system (SPDK's RocksDB suite), side by side",
    after_help = "Default scale: about 15 minutes on a 2-core machine. --quick: under 3 minutes. \
                  --full: SPDK's CI scale (20 million keys, 20 s phases)."
)]
pub(crate) struct Args {
    /// Keys in the database (db_bench --num) [default: 1500000; --quick 50000; --full 20000000].
    #[arg(long)]
    pub(crate) keys: Option<u64>,
    /// Seconds per timed phase (db_bench --duration) [default: 15; --quick 2; --full 20].
    #[arg(long)]
    pub(crate) duration: Option<u32>,
    /// Thread counts per phase, e.g. `randread=8,readwrite=2` (default: SPDK's 1,1,4,1,16).
    #[arg(long, default_value = "")]
    pub(crate) threads: String,
    /// Configurations to run, in order.
    #[arg(long, default_value = "disk,direct,memory,budget")]
    pub(crate) configs: String,
    /// Phases to run (in this order whatever the order given; a phase's
    /// insert always runs: the others reuse its database). The LZ4 pair
    /// (`insert-lz4`, `randread-lz4`: the same with LZ4 compression) runs in
    /// the `disk` configuration only.
    #[arg(
        long,
        default_value = "insert,overwrite,readwrite,writesync,randread,multiget,scan,insert-lz4,randread-lz4"
    )]
    pub(crate) phases: String,
    /// Directory on the disk under test, for the BlobFS image and the POSIX
    /// database [default: kvbench/ in the cargo target dir].
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// Where the JSON, the chart and db_bench's logs go [default: kvbench-out/ in the cargo target dir].
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// RocksDB block cache of both sides (db_bench --cache_size).
    #[arg(long, default_value = "32M")]
    pub(crate) cache_size: String,
    /// BlobFS read cache in the disk and nvme configurations (`cache=` of the URI;
    /// `direct` and `memory` always use 0). The default follows SPDK's RocksDB
    /// test, which gave BlobFS a 4 GiB cache (`CACHE_SIZE=4096`), while POSIX
    /// has the whole page cache; the memory column shows what each side used.
    #[arg(long, default_value = "4G")]
    pub(crate) blobfs_cache: String,
    /// The `budget` configuration's memory limit per db_bench (process
    /// memory and page cache together), e.g. `2G`; `auto` is a third of
    /// the database's size (about 1,100 bytes per key), at least 512 MiB.
    #[arg(long, default_value = "auto")]
    pub(crate) budget: String,
    /// BlobFS's device in the disk, direct and budget configurations
    /// instead of an image file in --dir: any device spec (e.g.
    /// `nvme-tcp:10.0.0.2:4420/nqn.2024-01.io.example:disk1/ns=1`), which the
    /// insert phase formats (everything on it is lost). The POSIX side stays
    /// in --dir.
    #[arg(long)]
    pub(crate) device: Option<String>,
    /// The db_bench binary [default: rocksdb/db_bench in the cargo target dir].
    #[arg(long)]
    pub(crate) db_bench: Option<PathBuf>,
    /// The NVMe controller (PCI address, e.g. 0000:00:04.0) of the `nvme`
    /// configuration. Both of its namespaces named by --nvme-namespaces
    /// are erased.
    #[arg(long)]
    pub(crate) nvme: Option<String>,
    /// The `nvme` configuration's namespaces: BLOBFS,POSIX (same size and
    /// block size).
    #[arg(long, default_value = "1,2")]
    pub(crate) nvme_namespaces: String,
    /// The nvme-setup binary [default: next to kvbench].
    #[arg(long)]
    pub(crate) nvme_setup: Option<PathBuf>,
    /// A run of under 3 minutes (the smoke test of `make test`).
    #[arg(long, conflicts_with = "full")]
    pub(crate) quick: bool,
    /// SPDK's CI scale: 20 million keys, 20-second phases.
    #[arg(long)]
    pub(crate) full: bool,
}

/// The target directory the binary was built into (`<target>/release/kvbench`).
pub(crate) fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent()?.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// The items of a comma-separated list, each parsed by `parse`; empty
/// items are skipped.
pub(crate) fn parse_list<T>(
    s: &str,
    parse: fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(parse)
        .collect()
}
