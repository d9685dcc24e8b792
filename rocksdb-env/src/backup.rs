//! RocksDB's `BackupEngine` for a database on BlobFS, with its backups on
//! the host's file system or in BlobFS.
//!
//! The `rocksdb` crate's own `BackupEngine` reads the database and writes
//! the backups through one `Env`; with [`crate::env`] that Env is BlobFS, so
//! it backs up into BlobFS. This type gives the backups an Env of their own
//! (RocksDB's `BackupEngineOptions::backup_env`), so a database on BlobFS can
//! be backed up to a host directory, or to another BlobFS device, and
//! restored from there. Backups are RocksDB's format, incremental as usual
//! (shared SST files are copied once).
//!
//! ```no_run
//! use rocksdb_env::{BackupEngine, BackupTo};
//! let uri = "blobfs://file:/data/app.img?size=8G";
//! let mut opts = rocksdb::Options::default();
//! opts.create_if_missing(true);
//! let db = rocksdb_env::open_db(uri, "/app/db", &opts).unwrap();
//! let mut backups = BackupEngine::open(uri, BackupTo::Host("/backups/app".as_ref())).unwrap();
//! backups.create_new_backup(&db).unwrap();
//! drop(db);
//! backups.restore_latest("/app/db").unwrap();
//! ```

use std::ffi::{c_char, CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr::NonNull;

use librocksdb_sys as ffi;
use rocksdb::AsRawPtr;

use crate::Error;

/// Where a [`BackupEngine`] keeps its backups.
#[derive(Debug, Clone, Copy)]
pub enum BackupTo<'a> {
    /// A directory on the host's file system (RocksDB's default Env);
    /// created if missing.
    Host(&'a Path),
    /// A directory inside BlobFS on `uri`: the database's own mount or
    /// another device.
    BlobFs {
        /// The BlobFS URI (`blobfs://...`).
        uri: &'a str,
        /// The directory inside that BlobFS.
        dir: &'a str,
    },
}

/// One backup, as RocksDB lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    /// The backup's id (increasing).
    pub id: u32,
    /// When it was taken (seconds since the epoch).
    pub timestamp: i64,
    /// Bytes of the files it holds (shared files counted in each backup).
    pub size: u64,
    /// Number of files it holds.
    pub files: u32,
}

/// RocksDB's `BackupEngine` for databases on BlobFS at one URI, with the
/// backups where [`BackupTo`] says.
pub struct BackupEngine {
    raw: NonNull<ffi::rocksdb_backup_engine_t>,
    // RocksDB holds raw pointers to both Envs' objects; the handles keep
    // them alive (ours live for the process anyway; the host's default Env
    // is static).
    _db_env: rocksdb::Env,
    _backup_env: rocksdb::Env,
}

// SAFETY: RocksDB's BackupEngine may be used from any thread (one call at a
// time, which `&mut self` on the mutating calls and RocksDB's own locking of
// the read-only ones provide).
unsafe impl Send for BackupEngine {}

/// Runs a C API call that reports failure through `char** errptr`.
fn call<T>(f: impl FnOnce(*mut *mut c_char) -> T) -> Result<T, Error> {
    let mut err: *mut c_char = std::ptr::null_mut();
    let out = f(&mut err);
    if err.is_null() {
        return Ok(out);
    }
    // SAFETY: RocksDB set `err` to a NUL-terminated string it allocated
    // with malloc, ours to free.
    let msg = unsafe { CStr::from_ptr(err) }
        .to_string_lossy()
        .into_owned();
    unsafe { ffi::rocksdb_free(err.cast()) };
    Err(Error::RocksDbCall(msg))
}

fn c_path(p: &[u8]) -> Result<CString, Error> {
    CString::new(p).map_err(|_| {
        Error::RocksDbCall(format!(
            "{}: a path may not hold a NUL byte",
            String::from_utf8_lossy(p)
        ))
    })
}

impl BackupEngine {
    /// Opens the backups at `to` for databases in BlobFS on `db_uri`
    /// (mounting it on first use), creating the backup directory if it is
    /// missing.
    pub fn open(db_uri: &str, to: BackupTo<'_>) -> Result<Self, Error> {
        let db_env = crate::env(db_uri)?;
        let (backup_env, dir) = match to {
            BackupTo::Host(p) => (rocksdb::Env::new()?, c_path(p.as_os_str().as_bytes())?),
            BackupTo::BlobFs { uri, dir } => (crate::env(uri)?, c_path(dir.as_bytes())?),
        };
        // SAFETY: every pointer below is live for the calls: `dir` and both
        // Env handles are held here, and the options object is destroyed
        // once BackupEngine::Open has copied it.
        let raw = unsafe {
            let opts = ffi::rocksdb_backup_engine_options_create(dir.as_ptr());
            ffi::rocksdb_backup_engine_options_set_env(opts, backup_env.as_raw_ptr());
            let be =
                call(|err| ffi::rocksdb_backup_engine_open_opts(opts, db_env.as_raw_ptr(), err));
            ffi::rocksdb_backup_engine_options_destroy(opts);
            be?
        };
        let raw = NonNull::new(raw)
            .ok_or_else(|| Error::RocksDbCall("BackupEngine::Open returned no engine".into()))?;
        Ok(BackupEngine {
            raw,
            _db_env: db_env,
            _backup_env: backup_env,
        })
    }

    /// Backs up `db` (a database on this engine's BlobFS; RocksDB flushes
    /// its memtables first, so the backup needs no WAL) and returns the new
    /// backup's info.
    pub fn create_new_backup(&mut self, db: &rocksdb::DB) -> Result<BackupInfo, Error> {
        // SAFETY: the engine and the DB are open for the call.
        call(|err| unsafe {
            ffi::rocksdb_backup_engine_create_new_backup_flush(
                self.raw.as_ptr(),
                db.as_raw_ptr(),
                1,
                err,
            )
        })?;
        self.backups()
            .pop()
            .ok_or_else(|| Error::RocksDbCall("a new backup is missing from the list".into()))
    }

    /// Every backup, oldest first.
    pub fn backups(&self) -> Vec<BackupInfo> {
        // SAFETY: the info object is read within its lifetime and destroyed
        // once; indices stay below its count.
        unsafe {
            let info = ffi::rocksdb_backup_engine_get_backup_info(self.raw.as_ptr());
            let n = ffi::rocksdb_backup_engine_info_count(info);
            let list = (0..n)
                .map(|i| BackupInfo {
                    id: ffi::rocksdb_backup_engine_info_backup_id(info, i),
                    timestamp: ffi::rocksdb_backup_engine_info_timestamp(info, i),
                    size: ffi::rocksdb_backup_engine_info_size(info, i),
                    files: ffi::rocksdb_backup_engine_info_number_files(info, i),
                })
                .collect();
            ffi::rocksdb_backup_engine_info_destroy(info);
            list
        }
    }

    /// Checks that backup `id`'s files are all there with their recorded
    /// sizes and checksums.
    pub fn verify_backup(&self, id: u32) -> Result<(), Error> {
        // SAFETY: the engine is open.
        call(|err| unsafe { ffi::rocksdb_backup_engine_verify_backup(self.raw.as_ptr(), id, err) })
    }

    /// Deletes all but the `keep` newest backups.
    pub fn purge_old_backups(&mut self, keep: u32) -> Result<(), Error> {
        // SAFETY: the engine is open.
        call(|err| unsafe {
            ffi::rocksdb_backup_engine_purge_old_backups(self.raw.as_ptr(), keep, err)
        })
    }

    /// Restores the newest backup into `db_dir` in this engine's BlobFS
    /// (the database must not be open; what `db_dir` held is replaced).
    pub fn restore_latest(&mut self, db_dir: &str) -> Result<(), Error> {
        self.restore_with(db_dir, None)
    }

    /// Restores backup `id` into `db_dir`, as [`Self::restore_latest`].
    pub fn restore(&mut self, id: u32, db_dir: &str) -> Result<(), Error> {
        self.restore_with(db_dir, Some(id))
    }

    fn restore_with(&mut self, db_dir: &str, id: Option<u32>) -> Result<(), Error> {
        let dir = c_path(db_dir.as_bytes())?;
        // SAFETY: the engine is open, `dir` outlives the call, and the
        // restore options are destroyed once, after it.
        unsafe {
            let opts = ffi::rocksdb_restore_options_create();
            let r = call(|err| match id {
                None => ffi::rocksdb_backup_engine_restore_db_from_latest_backup(
                    self.raw.as_ptr(),
                    dir.as_ptr(),
                    dir.as_ptr(),
                    opts,
                    err,
                ),
                Some(id) => ffi::rocksdb_backup_engine_restore_db_from_backup(
                    self.raw.as_ptr(),
                    dir.as_ptr(),
                    dir.as_ptr(),
                    opts,
                    id,
                    err,
                ),
            });
            ffi::rocksdb_restore_options_destroy(opts);
            r
        }
    }
}

impl Drop for BackupEngine {
    fn drop(&mut self) {
        // SAFETY: closed once, here.
        unsafe { ffi::rocksdb_backup_engine_close(self.raw.as_ptr()) }
    }
}
