//! What the blobstore refuses, with the exact text a caller sees: `init`
//! over a device that holds a known signature (unless forced), `load` of a
//! store of another type, a second opener of a file device in this
//! process or in another one, and the test machinery's spec options in a
//! build without the feature `testing`.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use blobstore::{
    block_on, channel, open_device, Blobstore, BlobstoreOptions, BlockDevice, DeviceSpec, DmaBuf,
    Error, FileDevice, FileOptions, Lba, LoadOptions, MemDevice,
};

fn mem(block: u32) -> Arc<dyn BlockDevice> {
    Arc::new(MemDevice::new(16 << 20, block).unwrap())
}

/// Writes `bytes` at byte `off` of `dev` (read-modify-write of its blocks).
fn poke(dev: &Arc<dyn BlockDevice>, off: usize, bytes: &[u8]) {
    let ch = channel(dev).unwrap();
    let bs = dev.geometry().block_size as usize;
    let first = off / bs;
    let last = (off + bytes.len() - 1) / bs;
    let len = (last - first + 1) * bs;
    let mut buf = block_on(ch.read(Lba(first as u64), DmaBuf::new(len).unwrap()))
        .unwrap()
        .to_vec();
    let at = off - first * bs;
    buf[at..at + bytes.len()].copy_from_slice(bytes);
    block_on(ch.write(Lba(first as u64), DmaBuf::from_slice(&buf).unwrap())).unwrap();
    block_on(ch.flush()).unwrap();
}

fn init(dev: &Arc<dyn BlockDevice>, force: bool) -> blobstore::Result<Blobstore> {
    block_on(Blobstore::init(
        dev.clone(),
        BlobstoreOptions {
            cluster_size: 64 << 10,
            force,
            ..Default::default()
        },
    ))
}

fn refusal(dev: &Arc<dyn BlockDevice>) -> (String, u64, String) {
    match init(dev, false) {
        Err(e @ Error::DeviceNotBlank { .. }) => {
            let text = e.to_string();
            let Error::DeviceNotBlank { what, offset, .. } = e else {
                unreachable!()
            };
            (what, offset, text)
        }
        Err(e) => panic!("expected DeviceNotBlank, got {e}"),
        Ok(_) => panic!("init formatted a device that holds a signature"),
    }
}

/// Bytes to write, by byte offset.
type Pokes = Vec<(usize, Vec<u8>)>;

#[test]
fn init_refuses_every_known_signature_unless_forced() {
    let mut mbr_entry = [0u8; 16];
    mbr_entry[4] = 0x83;
    mbr_entry[8..12].copy_from_slice(&2048u32.to_le_bytes());
    mbr_entry[12..16].copy_from_slice(&4096u32.to_le_bytes());
    let cases: Vec<(&str, Pokes, &str, u64)> = vec![
        (
            "ext2",
            vec![(1080, vec![0x53, 0xEF])],
            "an ext2 file system",
            1080,
        ),
        (
            "ext4",
            vec![
                (1080, vec![0x53, 0xEF]),
                (1120, 0x2c2u32.to_le_bytes().to_vec()),
            ],
            "an ext4 file system",
            1080,
        ),
        ("xfs", vec![(0, b"XFSB".to_vec())], "an XFS file system", 0),
        (
            "btrfs",
            vec![(65600, b"_BHRfS_M".to_vec())],
            "a btrfs file system",
            65600,
        ),
        (
            "mbr",
            vec![(446, mbr_entry.to_vec()), (510, vec![0x55, 0xAA])],
            "a DOS (MBR) partition table",
            510,
        ),
        (
            "gpt512",
            vec![(512, b"EFI PART".to_vec())],
            "a GPT partition table",
            512,
        ),
        (
            "gpt4k",
            vec![(4096, b"EFI PART".to_vec())],
            "a GPT partition table",
            4096,
        ),
        (
            "swap",
            vec![(4086, b"SWAPSPACE2".to_vec())],
            "a Linux swap area",
            4086,
        ),
        (
            "luks",
            vec![(0, b"LUKS\xba\xbe".to_vec())],
            "a LUKS encrypted volume",
            0,
        ),
        (
            "iso",
            vec![(32769, b"CD001".to_vec())],
            "an ISO 9660 file system",
            32769,
        ),
        (
            "fat32",
            vec![(82, b"FAT32   ".to_vec()), (510, vec![0x55, 0xAA])],
            "a FAT32 file system",
            82,
        ),
        (
            "fat16",
            vec![(54, b"FAT16   ".to_vec()), (510, vec![0x55, 0xAA])],
            "a FAT16 file system",
            54,
        ),
        (
            "ntfs",
            vec![(3, b"NTFS    ".to_vec())],
            "an NTFS file system",
            3,
        ),
        (
            "spdk",
            vec![(0, b"SPDKBLOB".to_vec())],
            "an SPDK blobstore",
            0,
        ),
    ];
    for block in [512, 4096] {
        for (name, pokes, what, offset) in &cases {
            let dev = mem(block);
            for (off, bytes) in pokes {
                poke(&dev, *off, bytes);
            }
            let (w, o, text) = refusal(&dev);
            assert_eq!(
                (w.as_str(), o),
                (*what, *offset),
                "{name} on {block}-byte blocks"
            );
            assert_eq!(
                text,
                format!(
                    "refusing to format mem:16777216: it holds {what} (signature at byte \
                     {offset}); use --force (CLI) / mkfs=force (URI) / BlobstoreOptions::force \
                     to overwrite it"
                )
            );
            // Forced, it formats and the store loads.
            let bs = init(&dev, true).unwrap();
            block_on(bs.unload()).unwrap();
            block_on(Blobstore::load(dev, LoadOptions::default())).unwrap();
        }
    }
    // A blank device formats without force.
    init(&mem(4096), false).unwrap();
}

#[test]
fn init_refuses_an_existing_blobstore() {
    let dev = mem(4096);
    let bs = block_on(Blobstore::init(
        dev.clone(),
        BlobstoreOptions {
            bstype: "kv".into(),
            ..Default::default()
        },
    ))
    .unwrap();
    block_on(bs.unload()).unwrap();
    assert_eq!(
        init(&dev, false).err().unwrap().to_string(),
        "refusing to format mem:16777216: it holds a blobstore of type \"kv\" (signature at \
         byte 0); use --force (CLI) / mkfs=force (URI) / BlobstoreOptions::force to overwrite it"
    );
    let bs = init(&dev, true).unwrap();
    block_on(bs.unload()).unwrap();
    assert_eq!(
        init(&dev, false).err().unwrap().to_string(),
        "refusing to format mem:16777216: it holds an untyped blobstore (signature at byte 0); \
         use --force (CLI) / mkfs=force (URI) / BlobstoreOptions::force to overwrite it"
    );
}

#[test]
fn load_refuses_a_foreign_type() {
    let dev = mem(4096);
    let bs = block_on(Blobstore::init(
        dev.clone(),
        BlobstoreOptions {
            bstype: "kv".into(),
            ..Default::default()
        },
    ))
    .unwrap();
    block_on(bs.unload()).unwrap();
    let e = block_on(Blobstore::load(
        dev.clone(),
        LoadOptions {
            bstype: "BLOBFS".into(),
        },
    ))
    .err()
    .unwrap();
    assert_eq!(
        e.to_string(),
        "blobstore type mismatch: the device holds type \"kv\", expected \"BLOBFS\""
    );
    // The refusal wrote nothing: the right type (and any type) still loads.
    let bs = block_on(Blobstore::load(
        dev.clone(),
        LoadOptions {
            bstype: "kv".into(),
        },
    ))
    .unwrap();
    assert_eq!(bs.bstype(), "kv");
    block_on(bs.unload()).unwrap();
    block_on(Blobstore::load(dev, LoadOptions::default())).unwrap();
}

#[test]
fn init_on_a_file_names_the_file() {
    let tmp = TempImage::new("ext4");
    std::fs::write(&tmp.0, vec![0u8; 8 << 20]).unwrap();
    let dev = open_device(&format!("file:{}", tmp.0.display())).unwrap();
    poke(&dev, 1080, &[0x53, 0xEF]);
    poke(&dev, 1024 + 0x60, &0x40u32.to_le_bytes());
    let canon = tmp.0.canonicalize().unwrap();
    assert_eq!(
        init(&dev, false).err().unwrap().to_string(),
        format!(
            "refusing to format file:{}?size=8M&bs=4096: it holds an ext4 file system (signature \
             at byte 1080); use --force (CLI) / mkfs=force (URI) / BlobstoreOptions::force to \
             overwrite it",
            canon.display()
        )
    );
}

/// A temp image path, removed on drop.
struct TempImage(std::path::PathBuf);

impl TempImage {
    fn new(name: &str) -> TempImage {
        let p = std::env::temp_dir().join(format!(
            "blobstore-refusals-{name}-{}.img",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&p);
        TempImage(p)
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const CHILD_ENV: &str = "BLOBSTORE_REFUSALS_CHILD_OPEN";

/// In a child run: open the file device and print what happened.
fn maybe_child() {
    if let Ok(path) = std::env::var(CHILD_ENV) {
        match FileDevice::open(&path, FileOptions::default()) {
            Ok(_) => println!("CHILD: opened"),
            Err(e) => println!("CHILD: {e}"),
        }
        std::process::exit(0);
    }
}

/// Runs this test binary as a child that opens `path`; returns its line.
fn child_open(test: &str, path: &Path) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.split_once("CHILD: ").map(|(_, rest)| rest))
        .unwrap_or_else(|| panic!("no child line in {stdout}"))
        .to_string()
}

#[test]
fn a_file_device_has_one_opener() {
    maybe_child();
    let tmp = TempImage::new("lock");
    let opts = FileOptions {
        size_bytes: Some(4 << 20),
        ..Default::default()
    };
    let first = FileDevice::open(&tmp.0, opts).unwrap();
    let in_use = format!(
        "busy: {} is in use by another process/blobstore (it holds an exclusive lock on it)",
        tmp.0.display()
    );
    // This process, directly and through a spec with other options.
    let e = FileDevice::open(&tmp.0, FileOptions::default())
        .err()
        .unwrap();
    assert_eq!(e.to_string(), in_use);
    let e = open_device(&format!("file:{}?qd=8", tmp.0.display()))
        .err()
        .unwrap();
    assert_eq!(e.to_string(), in_use);
    // Another process.
    assert_eq!(child_open("a_file_device_has_one_opener", &tmp.0), in_use);
    drop(first);
    assert_eq!(child_open("a_file_device_has_one_opener", &tmp.0), "opened");
    FileDevice::open(&tmp.0, FileOptions::default()).unwrap();
}

/// `powerloss=on` (the power-loss device of `blobstore::testing`) is
/// reached only in a build with the feature `testing`; without it the spec
/// is refused with a message naming the feature, and `powerloss=off` is a
/// plain file device either way.
#[test]
fn powerloss_spec_needs_the_testing_feature() {
    let spec = "file:/tmp/never-opened.img?size=1M&powerloss=on&powerloss_cut_after=3";
    let parsed = DeviceSpec::parse(spec);
    if cfg!(feature = "testing") {
        let shown = parsed.unwrap().to_string();
        assert!(
            shown.contains("&powerloss=on&powerloss_cut_after=3"),
            "{shown}"
        );
    } else {
        let err = parsed.unwrap_err();
        assert!(matches!(err, Error::BadSpec { .. }), "{err}");
        let err = err.to_string();
        assert!(err.contains("powerloss=on is test machinery"), "{err}");
        assert!(err.contains("feature `testing`"), "{err}");
    }
    assert!(matches!(
        DeviceSpec::parse("file:/tmp/x.img?powerloss=off").unwrap(),
        DeviceSpec::File { .. }
    ));
}
