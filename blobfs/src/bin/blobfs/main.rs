//! `blobfs`: the command-line tool of BlobFS.
//!
//! Every command takes a device spec first (`file:/path/img?size=4G`,
//! `mem:1G`; see `blobstore::device::spec`), opens the device, does its one
//! thing and unmounts cleanly. A `mem:` spec is a fresh, empty memory
//! device each time, so the tool is useful on `file:` images and block
//! devices. `file:` devices are opened with O_DIRECT and io_uring and
//! locked exclusively, so a device that a mount (or another command) holds
//! is refused with "busy".
//!
//! Exit codes: 0 success, 1 any error (or damage found by `fsck`), 2 bad
//! usage (from clap). Errors are one line on stderr. `RUST_LOG=info` (or
//! `warn`, `blobstore=debug`, ...) adds the libraries' events on stderr:
//! what a mount or a load found and recovered, refusals, device errors.

mod blobs;
mod fuse;
mod ops;
mod tree;
mod util;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::util::{parse_size, CliResult};

#[derive(Parser)]
#[command(
    name = "blobfs",
    version,
    about = "Make, inspect, check and mount BlobFS file systems",
    long_about = "Make, inspect, check and mount BlobFS file systems.\n\n\
        Every command takes a device spec first: file:<path>[?size=<n>] for an image \
        file or block device (created with the given size if missing), or mem:<size> \
        for a fresh memory device."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

fn parse_cluster(s: &str) -> Result<u32, String> {
    let n = parse_size(s)?;
    u32::try_from(n).map_err(|_| format!("{s:?} is too large for a cluster"))
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?}: use on or off")),
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Make a new, empty BlobFS (erases the device).
    Mkfs {
        /// Device spec, e.g. file:/tmp/fs.img?size=1G
        device: String,
        /// Cluster size: the unit in which files get space.
        #[arg(long, default_value = "1M", value_parser = parse_cluster)]
        cluster_size: u32,
        /// Erase a device that holds a file system, a partition table, a
        /// blobstore or a BlobFS (without it, mkfs refuses and says what it found).
        #[arg(long)]
        force: bool,
        /// Files and directories to leave room for in the metadata region
        /// (like mke2fs's inode count; fixed at format time). Each takes
        /// one metadata page (a file of more than about 900 clusters takes
        /// more, which mkfs allows for). Default: one page per cluster, so
        /// files of a cluster each fill the space before the pages run out.
        #[arg(long)]
        max_files: Option<u64>,
    },
    /// Show geometry, space and the number of files.
    Info {
        /// Device spec
        device: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Space by directory: files, bytes used (their lengths) and bytes
    /// allocated (their clusters) below each entry of a directory.
    Df {
        /// Device spec
        device: String,
        /// Directory whose entries to sum (default: the root).
        dir: Option<String>,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List a directory, a file, or every name starting with a prefix.
    Ls {
        /// Device spec
        device: String,
        /// Directory, file or name prefix (default: the root directory).
        path: Option<String>,
        /// Long listing: kind, size, modification time.
        #[arg(short, long)]
        long: bool,
        /// List everything below the directory, with full names.
        #[arg(short = 'R', long)]
        recursive: bool,
        /// A JSON array of entries (full names, kinds, sizes, times).
        #[arg(long)]
        json: bool,
    },
    /// Show a file's or directory's metadata.
    Stat {
        /// Device spec
        device: String,
        /// Name in the file system
        name: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Copy a host file into the file system.
    Import {
        /// Device spec
        device: String,
        /// File on the host
        host_file: PathBuf,
        /// Name in the file system
        name: String,
        /// Create missing parent directories.
        #[arg(short, long)]
        parents: bool,
        /// Replace an existing file.
        #[arg(short, long)]
        force: bool,
    },
    /// Copy a file out of the file system to a host file.
    Export {
        /// Device spec
        device: String,
        /// Name in the file system
        name: String,
        /// File on the host (created or replaced)
        host_file: PathBuf,
    },
    /// Copy every file and directory, with modification times, into a new
    /// (or empty) host directory.
    Backup {
        /// Device spec
        device: String,
        /// Host directory to create (or an empty one)
        host_dir: PathBuf,
        /// One JSON object (files, bytes, directories) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Copy a host directory tree (as `backup` made it) into the file
    /// system, with modification times; symlinks and special files are
    /// skipped with a warning.
    Restore {
        /// Host directory
        host_dir: PathBuf,
        /// Device spec
        device: String,
        /// Replace files that exist in the file system (without it, restore
        /// refuses before writing anything).
        #[arg(short, long)]
        force: bool,
        /// One JSON object (files, bytes, directories, skipped) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write a file's contents to stdout.
    Cat {
        /// Device spec
        device: String,
        /// Name in the file system
        name: String,
    },
    /// Delete files or empty directories.
    Rm {
        /// Device spec
        device: String,
        /// Names to delete
        #[arg(required = true)]
        names: Vec<String>,
        /// Delete directories with everything in them.
        #[arg(short, long)]
        recursive: bool,
    },
    /// Rename a file or a directory with everything in it (atomically;
    /// replacing an existing target file, or an empty target directory).
    Mv {
        /// Device spec
        device: String,
        /// Current name
        from: String,
        /// New name
        to: String,
    },
    /// Create a directory.
    Mkdir {
        /// Device spec
        device: String,
        /// Directory name
        dir: String,
        /// Create missing parents; no error if it exists.
        #[arg(short, long)]
        parents: bool,
    },
    /// Deallocate every free cluster on the device (as fstrim): a sparse
    /// image file shrinks, an SSD or thin device gets the space back.
    Trim {
        /// Device spec
        device: String,
        /// One JSON object (clusters, bytes, runs, requests) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check the file system without mounting it; exit 1 on damage.
    Fsck {
        /// Device spec
        device: String,
        /// One JSON object (the report and every finding) instead of text;
        /// the exit code still says whether there is damage.
        #[arg(long)]
        json: bool,
        /// Repair, then check again: rebuild damaged bitmaps, drop blobs
        /// whose metadata cannot be read, recreate a lost root record, move
        /// files whose BlobFS metadata cannot be read to lost+found/<blob
        /// id>; report what was done and lost.
        #[arg(long)]
        repair: bool,
    },
    /// Throw away the file data a process that died left unsynced for the
    /// device (the next mount would write it back; fsck lists it).
    DiscardUnsynced {
        /// Device spec
        device: String,
    },
    /// List every blob with its size, allocation and xattrs.
    Blobs {
        /// Device spec
        device: String,
    },
    /// Show one blob's metadata in full.
    Dump {
        /// Device spec
        device: String,
        /// Blob id, hexadecimal (0x..., as `blobs` prints it) or decimal
        blob_id: String,
    },
    /// Mount the file system with FUSE at a directory.
    Mount {
        /// Device spec (a file: image or block device)
        device: String,
        /// Mount point (an existing directory)
        dir: PathBuf,
        /// Stay in the foreground until unmounted (Ctrl-C unmounts).
        #[arg(short, long)]
        foreground: bool,
        /// Read-cache memory.
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        cache: u64,
        /// `on`: unmap a deleted file's clusters on the device before they
        /// are free again (as `mount -o discard`); `off`: leave that to
        /// `blobfs trim`.
        #[arg(long, default_value = "off", value_parser = parse_on_off)]
        discard: bool,
    },
}

fn run(cli: Cli) -> CliResult {
    match cli.cmd {
        Cmd::Mkfs {
            device,
            cluster_size,
            force,
            max_files,
        } => ops::mkfs(&device, cluster_size, force, max_files),
        Cmd::Info { device, json } => ops::info(&device, json),
        Cmd::Df { device, dir, json } => ops::df(&device, dir.as_deref().unwrap_or(""), json),
        Cmd::Ls {
            device,
            path,
            long,
            recursive,
            json,
        } => ops::ls(
            &device,
            path.as_deref().unwrap_or(""),
            long,
            recursive,
            json,
        ),
        Cmd::Stat { device, name, json } => ops::stat(&device, &name, json),
        Cmd::Import {
            device,
            host_file,
            name,
            parents,
            force,
        } => ops::import(&device, &host_file, &name, parents, force),
        Cmd::Export {
            device,
            name,
            host_file,
        } => ops::export(&device, &name, &host_file),
        Cmd::Backup {
            device,
            host_dir,
            json,
        } => tree::backup(&device, &host_dir, json),
        Cmd::Restore {
            host_dir,
            device,
            force,
            json,
        } => tree::restore(&host_dir, &device, force, json),
        Cmd::Cat { device, name } => ops::cat(&device, &name),
        Cmd::Rm {
            device,
            names,
            recursive,
        } => ops::rm(&device, &names, recursive),
        Cmd::Mv { device, from, to } => ops::mv(&device, &from, &to),
        Cmd::Mkdir {
            device,
            dir,
            parents,
        } => ops::mkdir(&device, &dir, parents),
        Cmd::Trim { device, json } => ops::trim(&device, json),
        Cmd::Fsck {
            device,
            json,
            repair,
        } => blobs::fsck(&device, json, repair),
        Cmd::Blobs { device } => blobs::list(&device),
        Cmd::DiscardUnsynced { device } => blobs::discard_unsynced(&device),
        Cmd::Dump { device, blob_id } => blobs::dump(&device, &blob_id),
        Cmd::Mount {
            device,
            dir,
            foreground,
            cache,
            discard,
        } => fuse::mount(&device, &dir, foreground, cache, discard),
    }
}

fn main() -> ExitCode {
    // Events (mount, recovery, fsck, refusals, device errors) on stderr
    // when RUST_LOG asks for them, e.g. RUST_LOG=info; silent otherwise.
    blobfs::stderr_events();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blobfs: {}", e.0);
            ExitCode::from(1)
        }
    }
}
