//! Benchmarks of the storage stack, and the load engine they share.
//!
//! - [`load`]: keeps a queue depth of operations in flight from one thread
//!   against any [`IoTarget`] and reports IOPS, MiB/s and latency
//!   percentiles ([`LatencyHistogram`]).
//! - [`target`]: the targets, a raw device ([`RawTarget`]) and a blob
//!   ([`BlobTarget`]).
//! - [`scenario`]: the blobstore-versus-raw-device setup and the metadata
//!   cycle used by `blobstore-bench` and the criterion benches.
//! - [`kv`]: the key-value acceleration benchmark (`kvbench`): `db_bench`
//!   phases on BlobFS vs POSIX, its output parser, ratios, tables, JSON
//!   and chart.
//! - [`cgroup`]: the memory cgroups of `kvbench`'s `budget` configuration.
//! - [`nvme_sides`]: the two sides of `kvbench`'s `nvme` configuration on
//!   one controller (rebinding it between our driver and the kernel's),
//!   and the whole machine's CPU time from `/proc/stat`.
//! - [`stats`] and [`json`]: medians and a small JSON writer for reports.
//!
//! Speed is always reported as a ratio against a baseline measured in the
//! same process: the machines are shared and noisy.
#![deny(missing_docs)]

pub mod cgroup;
pub mod hist;
pub mod json;
pub mod kv;
pub mod load;
pub mod nvme_sides;
pub mod scenario;
pub mod stats;
pub mod target;

pub use hist::LatencyHistogram;
pub use load::{run_load, run_load_blocking, Limit, LoadReport, LoadSpec, Pattern, Region};
pub use target::{BlobTarget, IoTarget, OpKind, RawTarget};
