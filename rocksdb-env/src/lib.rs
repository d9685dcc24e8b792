//! RocksDB on BlobFS: the Rust side of the RocksDB `FileSystem` plugin and a
//! one-call way to open a [`rocksdb::DB`] on a BlobFS device.
//!
//! Layers (see `DESIGN.md`): the C++ `FileSystem` in `cpp/` is a thin shell
//! whose every method calls the bridge module's functions through `cxx`; those call
//! BlobFS on the caller's thread. The C++ side registers `blobfs://` in
//! RocksDB's object library for both `FileSystem` (`--fs_uri`,
//! `TEST_FS_URI`) and `Env` (the `env=` option), so db_bench, db_stress,
//! env_basic_test and the Rust `rocksdb` crate all reach BlobFS the same way.
//!
//! The URI syntax is in [`uri`]. One process mounts a device once (see
//! [`mod@mount`]); a second process that opens the same file device fails with
//! "in use".
//!
//! ```no_run
//! let mut opts = rocksdb::Options::default();
//! opts.create_if_missing(true);
//! let db = rocksdb_env::open_db("blobfs://mem:256M", "/db", &opts).unwrap();
//! db.put(b"k", b"v").unwrap();
//! ```
#![deny(missing_docs)]

pub mod backup;
mod bridge;
pub mod mount;
pub mod uri;

/// The `rocksdb` crate this crate is built with (one RocksDB, with its
/// compression libraries): use it from here rather than pinning a second
/// copy, whose types would not mix with these.
pub use rocksdb;

pub use backup::{BackupEngine, BackupInfo, BackupTo};
pub use uri::{Mkfs, Uri, UriError, SCHEME};

// The READMEs' Rust snippets, compiled and run as this crate's doctests
// (`cargo test --doc`), so the examples a newcomer copies stay true.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
struct RootReadme;
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ThisReadme;

/// What can go wrong opening RocksDB on BlobFS.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URI does not parse.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// The device could not be opened (missing file, in use by another
    /// process, ...).
    #[error("device {spec}: {reason}")]
    Device {
        /// The device spec.
        spec: String,
        /// Why.
        reason: String,
    },
    /// BlobFS could not be mounted or formatted on the device.
    #[error("mounting BlobFS on {spec}: {source}")]
    Mount {
        /// The device spec.
        spec: String,
        /// BlobFS's error.
        #[source]
        source: blobfs::Error,
    },
    /// The device is still held (see [`unmount`]).
    #[error("{spec} is still in use by {holders} holder(s); it stays mounted")]
    InUse {
        /// The device spec.
        spec: String,
        /// References other than the mount table's.
        holders: usize,
    },
    /// The device is already mounted in this process with other options
    /// (one mount per device: see [`mod@mount`]).
    #[error("{uri}: {spec} is already mounted in this process as {mounted}: {what}")]
    Conflict {
        /// The URI asked for.
        uri: String,
        /// The device spec.
        spec: String,
        /// The URI the device was mounted with.
        mounted: String,
        /// Which option differs.
        what: String,
    },
    /// RocksDB refused the options or the open.
    #[error("rocksdb: {0}")]
    RocksDb(#[from] rocksdb::Error),
    /// A RocksDB call made through its C API failed (RocksDB's message).
    #[error("rocksdb: {0}")]
    RocksDbCall(String),
}

/// Sends BlobFS's and the blobstore's events (mounts and what they
/// recovered, refusals, device errors) to stderr when `RUST_LOG` is set and
/// the program has no `tracing` subscriber of its own, so db_bench and
/// db_stress users see them too. Called at registration and at every
/// mount through RocksDB; does its work once.
pub fn init_events() {
    blobfs::stderr_events();
}

/// Registers `blobfs://` in RocksDB's default object library. Idempotent;
/// the other functions here call it. Needed before RocksDB parses a
/// `blobfs://` URI that this crate did not hand it.
pub fn register() {
    bridge::register();
}

/// The BlobFS mounted for `uri` (mounting it on first use), for Rust code
/// that wants to look at the files RocksDB wrote.
pub fn mount(uri: &str) -> Result<blobfs::BlobFs, Error> {
    let u = Uri::parse(uri)?;
    Ok(mount::get(&u)?.fs.clone())
}

/// `base` with its `env` set to BlobFS on `uri`. Options that `base` holds
/// by reference (custom comparators, merge operators) must outlive the DB.
pub fn options_for(uri: &str, base: &rocksdb::Options) -> Result<rocksdb::Options, Error> {
    register();
    let u = Uri::parse(uri)?;
    // Mount here so errors come back typed, not as RocksDB's string.
    mount::get(&u)?;
    let mut base = base.clone();
    Ok(base.get_options_from_string(format!("env={}", u.to_options_value()))?)
}

/// A [`rocksdb::Env`] on BlobFS at `uri`, for the RocksDB APIs that take an
/// `Env` rather than options (the crate's `BackupEngine`, or
/// [`BackupEngine`] here). It is the same process-lived Env that
/// [`options_for`] gives RocksDB, so files written through either are one
/// file system; dropping it does not unmount anything.
pub fn env(uri: &str) -> Result<rocksdb::Env, Error> {
    register();
    let u = Uri::parse(uri)?;
    mount::get(&u)?;
    let raw = bridge::env_handle(&u.to_options_value()).map_err(Error::RocksDbCall)?;
    // SAFETY: `raw` is a fresh rocksdb_env_t from the C++ side, owned by
    // nobody else; it does not own its Env (is_default), so the crate's
    // rocksdb_env_destroy frees only the handle.
    Ok(unsafe { rocksdb::Env::from_raw(raw) })
}

/// Opens (with `create_if_missing` in `options`, creates) the RocksDB
/// database at `path` inside BlobFS on `uri`.
pub fn open_db(uri: &str, path: &str, options: &rocksdb::Options) -> Result<rocksdb::DB, Error> {
    let opts = options_for(uri, options)?;
    Ok(rocksdb::DB::open(&opts, path)?)
}

/// The fault-injection device under `uri`'s BlobFS (mounting it on first
/// use), if it was mounted with `fault_injection=on`: arm its rules to fail
/// or stall device operations (feature `testing` only).
#[cfg(feature = "testing")]
pub fn fault_device(uri: &str) -> Result<Option<blobstore::testing::FaultDevice>, Error> {
    let u = Uri::parse(uri)?;
    Ok(mount::get(&u)?.faults.clone())
}

/// Unmounts `uri`'s device if this process mounted it and nothing holds it
/// any more (see [`mount::unmount`]). Returns false if it was not mounted.
pub fn unmount(uri: &str) -> Result<bool, Error> {
    mount::unmount(&Uri::parse(uri)?)
}
