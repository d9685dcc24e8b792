//! The process-wide mount table: one mount per device, however many
//! RocksDB `FileSystem`s, `Env`s or Rust callers name it.
//!
//! Invariants:
//! - A device spec (canonical form, see [`Uri::mount_key`]) is mounted at
//!   most once per process; later URIs naming it share that mount when
//!   they ask for the same options, and are refused with
//!   [`Error::Conflict`] (naming both) when they do not: a different
//!   cache, warm-read extent, cluster size or fault injection, or a format
//!   (`mkfs=always|force`) the first mount did not ask for.
//! - A mount stays until [`unmount`] finds nothing else holding it; an `Env`
//!   RocksDB built from an options string holds it for the life of the
//!   process (RocksDB keeps raw `Env*` pointers).
//! - A `mem:` spec names one memory device per process, so two DBs opened
//!   with `blobfs://mem:1G` in one process see the same files.
//! - Across processes, the file device's lock makes a second process fail
//!   with "in use" instead of becoming a second writer.

use std::collections::HashMap;
use std::sync::Arc;

use blobfs::{BlobFs, MkfsOptions, MountOptions};
use parking_lot::Mutex;

use crate::uri::{Mkfs, Uri};
use crate::Error;

/// One mounted BlobFS and what it was mounted with.
pub struct Mount {
    /// The file system.
    pub fs: BlobFs,
    /// The URI of the first mount.
    pub uri: Uri,
    /// The fault-injection device under BlobFS, if mounted with
    /// `fault_injection=on` (feature `testing` only).
    #[cfg(feature = "testing")]
    pub faults: Option<blobstore::testing::FaultDevice>,
    /// The metrics endpoint, if mounted with `metrics=HOST:PORT`.
    pub metrics: Option<blobfs::MetricsServer>,
}

static MOUNTS: Mutex<Option<HashMap<String, Arc<Mount>>>> = Mutex::new(None);

/// The mount for `uri`, mounting (and if asked, formatting) on first use.
pub fn get(uri: &Uri) -> Result<Arc<Mount>, Error> {
    // Held across the mount so two threads cannot mount one device twice.
    let mut table = MOUNTS.lock();
    let table = table.get_or_insert_with(HashMap::new);
    if let Some(m) = table.get(uri.mount_key()) {
        if let Some(what) = conflict(&m.uri, uri) {
            return Err(Error::Conflict {
                uri: uri.to_uri(),
                spec: uri.spec.clone(),
                mounted: m.uri.to_uri(),
                what,
            });
        }
        return Ok(m.clone());
    }
    let dev = blobstore::open_device(&uri.spec).map_err(|e| Error::Device {
        spec: uri.spec.clone(),
        reason: e.to_string(),
    })?;
    // Without the feature the URI parser refuses fault_injection=on.
    #[cfg(feature = "testing")]
    let (dev, faults): (Arc<dyn blobstore::BlockDevice>, _) = if uri.fault_injection {
        let f = blobstore::testing::FaultDevice::without_image(dev);
        (Arc::new(f.clone()), Some(f))
    } else {
        (dev, None)
    };
    let mount_opts = MountOptions {
        cache_bytes: uri.cache_bytes,
        warm_read_bytes: uri.warm_read_bytes,
        discard: uri.discard,
        ..Default::default()
    };
    let mkfs_opts = MkfsOptions {
        cluster_size: uri.cluster_bytes,
        ..Default::default()
    };
    let fs = match uri.mkfs {
        Mkfs::Force => BlobFs::mkfs(
            dev,
            MkfsOptions {
                force: true,
                ..mkfs_opts
            },
            mount_opts,
        ),
        Mkfs::Always => {
            // Only a blank device or a BlobFS of ours may be formatted over
            // without asking: anything else goes to the refusing mkfs.
            let ours = blobstore::probe::probe_sync(&dev)
                .map_err(|e| Error::Device {
                    spec: uri.spec.clone(),
                    reason: e.to_string(),
                })?
                .is_none_or(|sig| sig.blobstore_type.as_deref() == Some(blobfs::meta::BSTYPE));
            BlobFs::mkfs(
                dev,
                MkfsOptions {
                    force: ours,
                    ..mkfs_opts
                },
                mount_opts,
            )
        }
        Mkfs::Never => BlobFs::mount(dev, mount_opts),
        // mkfs without force formats only a device with no signature at
        // all, so a foreign blobstore or a file system is refused by it.
        Mkfs::IfBlank => match BlobFs::mount(dev.clone(), mount_opts.clone()) {
            Err(blobfs::Error::NotBlobFs(_)) => BlobFs::mkfs(dev, mkfs_opts, mount_opts),
            other => other,
        },
    }
    .map_err(|e| Error::Mount {
        spec: uri.spec.clone(),
        source: e,
    })?;
    let metrics = match &uri.metrics {
        Some(addr) => match fs.serve_metrics(addr) {
            Ok(s) => Some(s),
            Err(e) => {
                // Leave nothing mounted behind the refusal.
                let _ = fs.unmount();
                return Err(Error::Mount {
                    spec: uri.spec.clone(),
                    source: e,
                });
            }
        },
        None => None,
    };
    let m = Arc::new(Mount {
        fs,
        uri: uri.clone(),
        #[cfg(feature = "testing")]
        faults,
        metrics,
    });
    if let Some(path) = &uri.metrics_file {
        dump_at_exit(&m, path);
    }
    table.insert(uri.mount_key().to_string(), m.clone());
    Ok(m)
}

/// How `asked` differs from the options `mounted` is in force with, if it
/// does in a way the shared mount cannot honour.
fn conflict(mounted: &Uri, asked: &Uri) -> Option<String> {
    let differ =
        |what: &str, a: u64, b: u64| (a != b).then(|| format!("{what} {b} asked, {a} in force"));
    differ("cache", mounted.cache_bytes, asked.cache_bytes)
        .or_else(|| differ("warm_read", mounted.warm_read_bytes, asked.warm_read_bytes))
        .or_else(|| {
            differ(
                "cluster",
                mounted.cluster_bytes.into(),
                asked.cluster_bytes.into(),
            )
        })
        .or_else(|| {
            let words = |what: &str, a: &str, b: &str| {
                (a != b).then(|| format!("{what}={b} asked, {a} in force"))
            };
            let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "(none)".into());
            words(
                "fault_injection",
                on_off(mounted.fault_injection),
                on_off(asked.fault_injection),
            )
            .or_else(|| words("discard", on_off(mounted.discard), on_off(asked.discard)))
            .or_else(|| {
                words(
                    "metrics_file",
                    &opt(&mounted.metrics_file),
                    &opt(&asked.metrics_file),
                )
            })
            .or_else(|| words("metrics", &opt(&mounted.metrics), &opt(&asked.metrics)))
        })
        .or_else(|| {
            // A later URI may not ask to format what is mounted (unless it
            // is the very URI that mounted it: each FileSystem RocksDB makes
            // from one URI string opens it again).
            (matches!(asked.mkfs, Mkfs::Always | Mkfs::Force) && asked.mkfs != mounted.mkfs)
                .then(|| "asks to format a device that is mounted".to_string())
        })
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// Unmounts `uri`'s device. Returns false if this process has not mounted
/// it, and [`Error::InUse`] (leaving it mounted) while a RocksDB
/// `FileSystem` or `Env` still holds it (an `Env` RocksDB created from an
/// options string lives for the process, so a device used through
/// [`crate::open_db`] stays mounted until exit). Drop `BlobFs` handles from
/// [`crate::mount()`] first: BlobFS's own unmount decides about those.
pub fn unmount(uri: &Uri) -> Result<bool, Error> {
    let mut table = MOUNTS.lock();
    let Some(table) = table.as_mut() else {
        return Ok(false);
    };
    let Some(m) = table.remove(uri.mount_key()) else {
        return Ok(false);
    };
    match Arc::try_unwrap(m) {
        // The endpoint goes first: a scrape in flight holds the mount.
        Ok(Mount { fs, metrics, .. }) => {
            drop(metrics);
            if let Some(path) = &uri.metrics_file {
                write_metrics(&fs, path);
            }
            fs.unmount()
        }
        .map(|()| true)
        .map_err(|e| Error::Mount {
            spec: uri.spec.clone(),
            source: e,
        }),
        Err(m) => {
            let holders = Arc::strong_count(&m) - 1;
            table.insert(uri.mount_key().to_string(), m);
            Err(Error::InUse {
                spec: uri.spec.clone(),
                holders,
            })
        }
    }
}

/// Mounts whose metrics go to a file when the process exits.
static EXIT_DUMPS: Mutex<Vec<(std::sync::Weak<Mount>, String)>> = Mutex::new(Vec::new());

/// Writes `m`'s metrics to `path` when the process exits normally
/// (`exit`, the end of `main`: how db_bench ends), if it is still mounted.
fn dump_at_exit(m: &Arc<Mount>, path: &str) {
    static REGISTER: std::sync::Once = std::sync::Once::new();
    EXIT_DUMPS
        .lock()
        .push((Arc::downgrade(m), path.to_string()));
    REGISTER.call_once(|| {
        extern "C" fn at_exit() {
            // try_lock: a thread that exits while holding the table must
            // not hang the process's exit.
            let Some(dumps) = EXIT_DUMPS.try_lock() else {
                return;
            };
            for (m, path) in dumps.iter() {
                if let Some(m) = m.upgrade() {
                    write_metrics(&m.fs, path);
                }
            }
        }
        // SAFETY: `at_exit` is a plain function that lives for the
        // program; atexit only records its address.
        if unsafe { libc::atexit(at_exit) } != 0 {
            tracing::warn!("metrics_file: atexit refused the handler; no metrics at exit");
        }
    });
}

/// Writes `fs`'s metrics to `path` (through a temporary name, so a reader
/// never sees half a file); a failure is an event, not an error.
fn write_metrics(fs: &BlobFs, path: &str) {
    let tmp = format!("{path}.tmp");
    let res = std::fs::write(&tmp, fs.metrics().to_prometheus())
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = res {
        tracing::warn!(path, error = %e, "could not write the metrics file");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_uri_with_other_switches_is_a_conflict_naming_them() {
        let base = Uri::parse("blobfs://mem:64M").unwrap();
        let with = |opt: &str| Uri::parse(&format!("blobfs://mem:64M;{opt}")).unwrap();
        assert_eq!(conflict(&base, &base), None);
        let c = |opt: &str| conflict(&base, &with(opt)).unwrap();
        assert_eq!(c("discard=on"), "discard=on asked, off in force");
        // The test machinery's switch (a build without it refuses it).
        if cfg!(feature = "testing") {
            assert_eq!(
                c("fault_injection=on"),
                "fault_injection=on asked, off in force"
            );
        }
        assert_eq!(
            c("metrics=127.0.0.1:9"),
            "metrics=127.0.0.1:9 asked, (none) in force"
        );
        assert_eq!(
            conflict(&with("metrics_file=/a"), &with("metrics_file=/b")).unwrap(),
            "metrics_file=/b asked, /a in force"
        );
    }
}
