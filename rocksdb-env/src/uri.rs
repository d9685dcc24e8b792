//! The `blobfs://` URI: which device, and how to mount it.
//!
//! ```text
//! blobfs://<device spec>[;<option>=<value>]...
//!
//!   cache=<size>            read cache of the mount (default 256M; 0 = off)
//!   warm_read=<size>        until the cache first evicts, a miss reads the
//!                           aligned extent of this size around it
//!                           (default 128K; 0 = only what is asked)
//!   mkfs=if-blank|never|always|force
//!                           when to format at the first mount in this
//!                           process (default if-blank), see below
//!   cluster=<size>          cluster size when formatting (default 1M)
//!   fault_injection=on      put a fault-injecting wrapper under BlobFS
//!                           (tests, feature `testing` only: a build
//!                           without it refuses the option; armed through
//!                           `fault_device`)
//!   discard=on              unmap a deleted file's clusters on the device
//!                           before reuse (SSDs, thin devices, sparse
//!                           images get the space back; default off)
//!   metrics=<host>:<port>   serve the mount's metrics in Prometheus' text
//!                           format at http://<host>:<port>/metrics; the
//!                           host must be a loopback address (127.0.0.1,
//!                           ::1, localhost); port 0 picks a free one
//!   metrics_file=<path>     write the mount's metrics (the same text) to
//!                           this host file when the process exits (and at
//!                           unmount): benchmarks read what a whole run did
//! ```
//!
//! The mkfs modes, and what each does with what the device holds:
//!
//! | device holds | if-blank | never | always | force |
//! | --- | --- | --- | --- | --- |
//! | nothing known (no signature) | format | refuse | format | format |
//! | a BlobFS | mount | mount | format | format |
//! | another blobstore, a file system, a partition table | refuse | refuse | refuse | format |
//!
//! "Nothing known" means none of the signatures of `blobstore::probe` in the
//! first 68 KiB (an all-zero device, or data we do not recognise). A
//! refusal is the mount's error, naming what was found, e.g. `refusing to
//! format file:/x.img?bs=4096: it holds an ext4 file system (signature at
//! byte 1080); use --force (CLI) / mkfs=force (URI) / ...`. `always` is
//! for tests and benchmarks that want a fresh BlobFS each run; `force` is
//! the only mode that erases something that is not ours.
//!
//! The device spec is the blobstore's (`mem:1G`, `file:/x.img?size=8G`), so
//! it may carry its own `?`, `=` and `&`; `;` starts the BlobFS options.
//! Inside a RocksDB options string (`env=...`) a value must not contain `=`
//! or `;`, so there `%3D` and `%3B` stand for them; the parser decodes both
//! everywhere (device specs never need those two escapes for themselves).
//!
//! Invariants: parsing never touches the system; [`Uri::mount_key`] is the
//! same for two URIs exactly when they name the same device, so one process
//! mounts a device once.

use blobfs::MountOptions;
use blobstore::device::DeviceSpec;
use blobstore::util::parse_size;

/// The scheme prefix, as registered in RocksDB's object library.
pub const SCHEME: &str = "blobfs://";

/// When to format the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mkfs {
    /// Mount a BlobFS; format a device with no known signature; refuse
    /// anything else (another blobstore, a file system, a partition table).
    IfBlank,
    /// Never format; mounting a device without BlobFS fails.
    Never,
    /// Format at the first mount in this process a device that is blank or
    /// holds a BlobFS; refuse anything else.
    Always,
    /// Format at the first mount in this process, whatever the device holds.
    Force,
}

/// A parsed `blobfs://` URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uri {
    /// The device spec, in its canonical form.
    pub spec: String,
    /// Read-cache bytes.
    pub cache_bytes: u64,
    /// `warm_read`: the extent a cache miss reads while the cache has room.
    pub warm_read_bytes: u64,
    /// When to format.
    pub mkfs: Mkfs,
    /// Cluster size for mkfs, in bytes.
    pub cluster_bytes: u32,
    /// Wrap the device with the fault injector (always false without the
    /// feature `testing`).
    pub fault_injection: bool,
    /// Where to serve the mount's metrics (`HOST:PORT`, loopback only).
    pub metrics: Option<String>,
    /// Unmap deleted files' clusters ([`MountOptions::discard`]).
    pub discard: bool,
    /// Where to write the metrics at exit (a host path).
    pub metrics_file: Option<String>,
}

/// A URI that does not parse, with the reason.
#[derive(Debug, thiserror::Error)]
#[error("bad blobfs URI {uri:?}: {reason}")]
pub struct UriError {
    /// The URI as given.
    pub uri: String,
    /// What is wrong.
    pub reason: String,
}

impl Uri {
    /// Parses a URI; a bare device spec (no `blobfs://`) is accepted too.
    pub fn parse(uri: &str) -> Result<Uri, UriError> {
        let bad = |reason: String| UriError {
            uri: uri.to_string(),
            reason,
        };
        let decoded = uri.replace("%3D", "=").replace("%3d", "=");
        let decoded = decoded.replace("%3B", ";").replace("%3b", ";");
        let body = decoded.strip_prefix(SCHEME).unwrap_or(&decoded);
        let mut parts = body.split(';');
        let spec_text = parts.next().unwrap_or_default();
        if spec_text.is_empty() {
            return Err(bad("no device spec after blobfs://".into()));
        }
        let spec = DeviceSpec::parse(spec_text).map_err(|e| bad(e.to_string()))?;
        let mut out = Uri {
            spec: spec.to_string(),
            cache_bytes: 256 << 20,
            warm_read_bytes: MountOptions::default().warm_read_bytes,
            mkfs: Mkfs::IfBlank,
            cluster_bytes: 1 << 20,
            fault_injection: false,
            metrics: None,
            discard: false,
            metrics_file: None,
        };
        for opt in parts.filter(|p| !p.is_empty()) {
            let (key, value) = opt
                .split_once('=')
                .ok_or_else(|| bad(format!("option {opt:?} is not key=value")))?;
            match key {
                "cache" => out.cache_bytes = parse_size(value).map_err(&bad)?,
                "warm_read" => out.warm_read_bytes = parse_size(value).map_err(&bad)?,
                "cluster" => {
                    let v = parse_size(value).map_err(&bad)?;
                    out.cluster_bytes = u32::try_from(v)
                        .map_err(|_| bad(format!("cluster size {value} is too large")))?;
                }
                "mkfs" => {
                    out.mkfs = match value {
                        "if-blank" => Mkfs::IfBlank,
                        "never" => Mkfs::Never,
                        "always" => Mkfs::Always,
                        "force" => Mkfs::Force,
                        _ => {
                            return Err(bad(format!(
                                "mkfs={value}: expected if-blank, never, always or force"
                            )))
                        }
                    }
                }
                "fault_injection" => out.fault_injection = fault_injection(value).map_err(&bad)?,
                "discard" => out.discard = on_off(key, value).map_err(&bad)?,
                "metrics_file" => {
                    if value.is_empty() {
                        return Err(bad("metrics_file= needs a path".into()));
                    }
                    out.metrics_file = Some(value.to_string());
                }
                "metrics" => {
                    if value.rsplit_once(':').is_none_or(|(h, p)| h.is_empty() || p.is_empty()) {
                        return Err(bad(format!(
                            "metrics={value}: expected HOST:PORT, e.g. 127.0.0.1:9464"
                        )));
                    }
                    out.metrics = Some(value.to_string());
                }
                _ => {
                    return Err(bad(format!(
                        "unknown option {key:?} (known: cache, warm_read, cluster, mkfs, fault_injection, discard, metrics, metrics_file)"
                    )))
                }
            }
        }
        Ok(out)
    }

    /// The key of the process-wide mount table: the canonical device spec.
    pub fn mount_key(&self) -> &str {
        &self.spec
    }

    /// This URI in the form RocksDB options strings accept (`=` and `;`
    /// escaped), e.g. for `env=<this>`.
    pub fn to_options_value(&self) -> String {
        self.to_uri().replace('=', "%3D").replace(';', "%3B")
    }

    /// This URI with every option spelled out, as a reader would write it
    /// (for messages).
    pub fn to_uri(&self) -> String {
        let mut s = format!("{SCHEME}{}", self.spec);
        s.push_str(&format!(";cache={}", self.cache_bytes));
        s.push_str(&format!(";warm_read={}", self.warm_read_bytes));
        s.push_str(&format!(";cluster={}", self.cluster_bytes));
        s.push_str(match self.mkfs {
            Mkfs::IfBlank => ";mkfs=if-blank",
            Mkfs::Never => ";mkfs=never",
            Mkfs::Always => ";mkfs=always",
            Mkfs::Force => ";mkfs=force",
        });
        if self.fault_injection {
            s.push_str(";fault_injection=on");
        }
        if self.discard {
            s.push_str(";discard=on");
        }
        if let Some(m) = &self.metrics {
            s.push_str(&format!(";metrics={m}"));
        }
        if let Some(f) = &self.metrics_file {
            s.push_str(&format!(";metrics_file={f}"));
        }
        s
    }
}

/// Parses `fault_injection=<switch>`: on only in a build with the test
/// machinery (feature `testing`).
fn fault_injection(value: &str) -> Result<bool, String> {
    let on = on_off("fault_injection", value)?;
    if on && !cfg!(feature = "testing") {
        return Err(
            "fault_injection=on is test machinery that this build lacks: build \
             rocksdb-env with its cargo feature `testing`"
                .into(),
        );
    }
    Ok(on)
}

/// Parses a switch: `on`/`true`/`1` or `off`/`false`/`0`.
fn on_off(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" | "1" => Ok(true),
        "off" | "false" | "0" => Ok(false),
        _ => Err(format!("{key}={value}: expected on or off")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_takes_host_and_port_and_round_trips() {
        let u = Uri::parse("blobfs://mem:64M;metrics=127.0.0.1:9464").unwrap();
        assert_eq!(u.metrics.as_deref(), Some("127.0.0.1:9464"));
        assert_eq!(Uri::parse(&u.to_uri()).unwrap(), u);
        assert_eq!(Uri::parse("blobfs://mem:64M").unwrap().metrics, None);
        let f = Uri::parse("blobfs://mem:64M;metrics_file=/tmp/x.prom").unwrap();
        assert_eq!(f.metrics_file.as_deref(), Some("/tmp/x.prom"));
        assert_eq!(Uri::parse(&f.to_uri()).unwrap(), f);
        let d = Uri::parse("blobfs://mem:64M;discard=on").unwrap();
        assert!(d.discard);
        assert_eq!(Uri::parse(&d.to_uri()).unwrap(), d);
        let e = Uri::parse("blobfs://mem:64M;discard=maybe").unwrap_err();
        assert!(e.to_string().contains("expected on or off"), "{e}");
        for bad in ["9464", ":9464", "localhost:"] {
            let e = Uri::parse(&format!("blobfs://mem:64M;metrics={bad}")).unwrap_err();
            assert!(e.to_string().contains("HOST:PORT"), "{e}");
        }
    }

    #[test]
    fn plain_spec_and_options() {
        let u = Uri::parse("blobfs://mem:64M;cache=8M;mkfs=always").unwrap();
        assert_eq!(u.cache_bytes, 8 << 20);
        assert_eq!(u.mkfs, Mkfs::Always);
        assert!(!u.fault_injection);
        assert_eq!(Uri::parse("mem:64M").unwrap().mount_key(), u.mount_key());
    }

    #[test]
    fn file_spec_keeps_its_query() {
        let u = Uri::parse("blobfs://file:/tmp/x.img?size=1G;cache=0").unwrap();
        assert!(u.spec.starts_with("file:/tmp/x.img"), "{}", u.spec);
        assert!(u.spec.contains("size="), "{}", u.spec);
        assert_eq!(u.cache_bytes, 0);
    }

    #[test]
    fn options_value_round_trips() {
        let u = Uri::parse("blobfs://file:/tmp/y.img?size=1G;mkfs=never;discard=on").unwrap();
        let v = u.to_options_value();
        assert!(!v.contains('=') && !v.contains(';'), "{v}");
        assert_eq!(Uri::parse(&v).unwrap(), u);
    }

    #[test]
    fn fault_injection_needs_the_testing_feature() {
        let r = Uri::parse("blobfs://mem:64M;fault_injection=on");
        if cfg!(feature = "testing") {
            let u = r.unwrap();
            assert!(u.fault_injection);
            assert_eq!(Uri::parse(&u.to_options_value()).unwrap(), u);
        } else {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("feature `testing`"), "{e}");
        }
        let off = Uri::parse("blobfs://mem:64M;fault_injection=off").unwrap();
        assert!(!off.fault_injection);
    }

    #[test]
    fn errors_name_the_problem() {
        let e = Uri::parse("blobfs://mem:64M;cache=lots").unwrap_err();
        assert!(e.to_string().contains("cache") || e.to_string().contains("lots"));
        assert!(Uri::parse("blobfs://").is_err());
        assert!(Uri::parse("blobfs://mem:64M;colour=blue").is_err());
        let e = Uri::parse("blobfs://mem:64M;mkfs=maybe").unwrap_err();
        assert_eq!(
            e.to_string(),
            "bad blobfs URI \"blobfs://mem:64M;mkfs=maybe\": mkfs=maybe: expected if-blank, \
             never, always or force"
        );
        let f = Uri::parse("blobfs://mem:64M;mkfs=force").unwrap();
        assert_eq!(f.mkfs, Mkfs::Force);
        assert_eq!(Uri::parse(&f.to_options_value()).unwrap(), f);
    }
}
