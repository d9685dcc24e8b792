//! The process-wide mount table: one mount per device, however many
//! RocksDB `FileSystem`s, `Env`s or Rust callers name it.
//!
//! Invariants:
//! - A device spec (canonical form, see [`Uri::mount_key`]) is mounted at
//!   most once per process; later URIs naming it share that mount, and the
//!   options of the first mount (cache, mkfs) are the ones in force.
//! - A mount stays for the life of the process (RocksDB keeps raw `Env*`
//!   pointers to it); [`unmount`] releases it explicitly once no DB uses it.
//! - A `mem:` spec names one memory device per process, so two DBs opened
//!   with `blobfs://mem:1G` in one process see the same files.
//! - Across processes, the file device's lock makes a second process fail
//!   with "in use" instead of becoming a second writer.

use std::collections::HashMap;
use std::sync::Arc;

use blobfs::{BlobFs, MkfsOptions, MountOptions};
use parking_lot::Mutex;

use crate::fault::{FaultControl, FaultDevice};
use crate::uri::{Mkfs, Uri};
use crate::Error;

/// One mounted BlobFS and what it was mounted with.
pub struct Mount {
    /// The file system.
    pub fs: BlobFs,
    /// The URI of the first mount.
    pub uri: Uri,
    /// The fault switch, if mounted with `fault_injection=on`.
    pub faults: Option<Arc<FaultControl>>,
}

static MOUNTS: Mutex<Option<HashMap<String, Arc<Mount>>>> = Mutex::new(None);

/// The mount for `uri`, mounting (and if asked, formatting) on first use.
pub fn get(uri: &Uri) -> Result<Arc<Mount>, Error> {
    // Held across the mount so two threads cannot mount one device twice.
    let mut table = MOUNTS.lock();
    let table = table.get_or_insert_with(HashMap::new);
    if let Some(m) = table.get(uri.mount_key()) {
        return Ok(m.clone());
    }
    let dev = blobstore::open_device(&uri.spec).map_err(|e| Error::Device {
        spec: uri.spec.clone(),
        reason: e.to_string(),
    })?;
    let (dev, faults): (Arc<dyn blobstore::BlockDevice>, _) = if uri.fault_injection {
        let (d, c) = FaultDevice::wrap(dev);
        (d, Some(c))
    } else {
        (dev, None)
    };
    let mount_opts = MountOptions {
        cache_bytes: uri.cache_bytes,
        ..Default::default()
    };
    let mkfs_opts = MkfsOptions {
        cluster_size: uri.cluster_bytes,
        ..Default::default()
    };
    let fs = match uri.mkfs {
        Mkfs::Always => BlobFs::mkfs(dev, mkfs_opts, mount_opts),
        Mkfs::Never => BlobFs::mount(dev, mount_opts),
        Mkfs::IfBlank => match BlobFs::mount(dev.clone(), mount_opts.clone()) {
            Err(blobfs::Error::NotBlobFs(_)) => BlobFs::mkfs(dev, mkfs_opts, mount_opts),
            other => other,
        },
    }
    .map_err(|e| Error::Mount {
        spec: uri.spec.clone(),
        source: e,
    })?;
    let m = Arc::new(Mount {
        fs,
        uri: uri.clone(),
        faults,
    });
    table.insert(uri.mount_key().to_string(), m.clone());
    Ok(m)
}

/// Forgets the mount of `uri`'s device and unmounts it if nothing else holds
/// it. Returns false if it was not mounted. Only call this once every DB on
/// the device is closed.
pub fn unmount(uri: &Uri) -> Result<bool, Error> {
    let removed = MOUNTS
        .lock()
        .as_mut()
        .and_then(|t| t.remove(uri.mount_key()));
    let Some(m) = removed else {
        return Ok(false);
    };
    if let Ok(m) = Arc::try_unwrap(m) {
        m.fs.unmount().map_err(|e| Error::Mount {
            spec: uri.spec.clone(),
            source: e,
        })?;
    }
    Ok(true)
}
