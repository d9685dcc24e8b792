//! Shared helpers for the blobstore integration tests.
#![allow(dead_code)]

use std::sync::Arc;

mod image;

use std::sync::atomic::{AtomicU64, Ordering};

use blobstore::device::FileOptions;
use blobstore::{BlockDevice, DmaBuf, FileDevice, Lba, MemDevice};

/// One device + store geometry to run a test body under.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub file: bool,
    pub block_size: u32,
    pub cluster_size: u32,
    pub size: u64,
}

/// The geometries every test runs under: both block sizes, two cluster sizes.
pub fn configs() -> Vec<Config> {
    let c = |file, block_size, cluster_size, size| Config {
        file,
        block_size,
        cluster_size,
        size,
    };
    vec![
        c(false, 512, 1 << 20, 64 << 20),
        c(false, 4096, 1 << 20, 64 << 20),
        c(false, 512, 64 << 10, 128 << 20),
        c(false, 4096, 16 << 10, 64 << 20),
        c(true, 512, 1 << 20, 64 << 20),
        c(true, 4096, 64 << 10, 64 << 20),
    ]
}

/// A fresh device for `cfg`: in memory, or an io_uring file device on an
/// unlinked temporary file (its descriptor keeps it alive; nothing to clean);
/// or, when `BLOBSTORE_TEST_NVME` names a PCI address (the VM test sets it),
/// the first `cfg.size` bytes of the namespace with `cfg.block_size`-byte
/// blocks on that NVMe controller, zeroed; or, when
/// `BLOBSTORE_TEST_NVME_TCP` holds an `nvme-tcp:HOST:PORT/NQN` spec, the
/// same window of the remote namespace with that block size.
pub fn dev(cfg: Config) -> Arc<dyn BlockDevice> {
    #[cfg(feature = "nvme")]
    if let Ok(pci) = std::env::var("BLOBSTORE_TEST_NVME") {
        return nvme_window(&pci, cfg);
    }
    #[cfg(feature = "nvme")]
    if let Ok(spec) = std::env::var("BLOBSTORE_TEST_NVME_TCP") {
        return nvme_tcp_window(&spec, cfg);
    }
    if !cfg.file {
        return Arc::new(MemDevice::new(cfg.size, cfg.block_size).unwrap());
    }
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "blobstore-test-{}-{}.img",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let dev = FileDevice::open(
        &path,
        FileOptions {
            size_bytes: Some(cfg.size),
            block_size: Some(cfg.block_size),
            ..Default::default()
        },
    )
    .unwrap();
    std::fs::remove_file(&path).unwrap();
    Arc::new(dev)
}

#[cfg(feature = "nvme")]
fn nvme_window(pci: &str, cfg: Config) -> Arc<dyn BlockDevice> {
    use blobstore::{NvmeController, NvmeDevice};
    let ctrl = NvmeController::open(pci).unwrap();
    let (nsid, ns) = ctrl
        .namespaces()
        .unwrap()
        .into_iter()
        .find(|(_, ns)| ns.block_size == cfg.block_size)
        .expect("a namespace with the block size of the config");
    let blocks = window_blocks(cfg, nsid, ns.size_blocks);
    zeroed(Arc::new(NvmeDevice::unchecked(
        ctrl,
        nsid,
        cfg.block_size,
        blocks,
    )))
}

/// Blocks of a namespace window for `cfg` (checked against the
/// namespace's `size_blocks`).
fn window_blocks(cfg: Config, nsid: u32, size_blocks: u64) -> u64 {
    let blocks = cfg.size / cfg.block_size as u64;
    assert!(
        blocks <= size_blocks,
        "namespace {nsid} is smaller than {cfg:?}"
    );
    blocks
}

/// `dev` after writing zeroes over all of it.
fn zeroed(dev: Arc<dyn BlockDevice>) -> Arc<dyn BlockDevice> {
    let ch = blobstore::channel(&dev).unwrap();
    blobstore::block_on(ch.write_zeroes(Lba(0), dev.geometry().block_count)).unwrap();
    dev
}

#[cfg(feature = "nvme")]
fn nvme_tcp_window(spec: &str, cfg: Config) -> Arc<dyn BlockDevice> {
    use blobstore::{DeviceSpec, NvmeTcpController, NvmeTcpDevice, TcpOptions};
    let DeviceSpec::NvmeTcp { target, subnqn, .. } = DeviceSpec::parse(spec).unwrap() else {
        panic!("BLOBSTORE_TEST_NVME_TCP is not an nvme-tcp: spec: {spec}");
    };
    let ctrl = NvmeTcpController::connect(&target, &subnqn, TcpOptions::default()).unwrap();
    let (nsid, ns) = ctrl
        .namespaces()
        .unwrap()
        .into_iter()
        .find(|(_, ns)| ns.block_size == cfg.block_size)
        .expect("a namespace with the block size of the config");
    let blocks = window_blocks(cfg, nsid, ns.size_blocks);
    zeroed(Arc::new(NvmeTcpDevice::unchecked(
        ctrl,
        nsid,
        cfg.block_size,
        blocks,
    )))
}

/// Options for `cfg`.
pub fn opts(cfg: Config) -> blobstore::BlobstoreOptions {
    blobstore::BlobstoreOptions {
        cluster_size: cfg.cluster_size,
        bstype: "test".into(),
        ..Default::default()
    }
}

/// The workspace's seeded generator, for test workloads.
pub use blobstore::util::SplitMix64 as Rng;

/// A deterministic pattern for a seed, so data can be checked without being
/// kept.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    Rng::bytes(seed, len)
}

pub fn buf(data: &[u8]) -> DmaBuf {
    DmaBuf::from_slice(data).unwrap()
}

/// The image `tests/images/<name>` (layout in `image.rs`;
/// `tests/images/README.md` says how each image was made).
pub fn fixture(name: &str) -> Vec<u8> {
    image::read_image(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/images")
            .join(name),
    )
}
