//! BlobFS: a flat, crash-safe file system on the blobstore.
//!
//! One blob per file; the name, length and modification time live in the
//! blob's xattrs (see [`meta`]), and an in-memory index built at mount makes
//! lookups O(1). Names are `/`-separated paths; directories are entries of
//! their own, as RocksDB and POSIX users expect.
//!
//! Guarantees: after [`File::sync`] returns, the file's data and length up
//! to that point survive a crash; [`BlobFs::rename`] is atomic, also when it
//! replaces an existing file, and for a directory with everything below it
//! (after a crash at any point the whole tree is under the old name or
//! under the new one, never split: see [`meta::MOVED_FROM`]); a file
//! deleted while open stays readable through its handles, and one open
//! under a renamed directory keeps working under its new name; no file
//! ever shows another file's bytes.
//!
//! What was written and not synced lives in memory that outlives the
//! process but not the machine ([`unsynced`]): when the process dies, the
//! next mount writes it back, so a crash of the process loses no
//! acknowledged write (as the page cache promises on a local file system);
//! a power cut loses it, and only synced data survives, as on POSIX.
#![deny(missing_docs)]

mod cache;
mod error;
#[cfg(feature = "prometheus")]
mod exporter;
mod fs;
pub mod fsck;
pub mod meta;
pub mod metrics;
pub mod name;
pub mod unsynced;

pub use cache::CacheStats;
pub use error::{Error, Result};
#[cfg(feature = "prometheus")]
pub use exporter::MetricsServer;
pub use fs::file::{File, Metadata, PendingRead};
pub use fs::{
    BlobFs, DirEntry, FileLock, MkfsOptions, MountOptions, OpenOptions, SpaceInfo, SPARE_MD_PAGES,
};
pub use metrics::Metrics;
pub use unsynced::UnsyncedRecovery;

/// Sends BlobFS's and the blobstore's events (mounts and what they
/// recovered, refusals, device errors) to stderr when `RUST_LOG` is set
/// (`info`, `warn`, `blobfs=debug`, ...) and the program has no `tracing`
/// subscriber of its own; colours only on a terminal. Does its work once
/// per process; later calls return at once.
#[cfg(feature = "stderr-events")]
pub fn stderr_events() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_writer(std::io::stderr)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .try_init();
        }
    });
}
