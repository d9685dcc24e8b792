//! What BlobFS refuses, with the exact text the caller sees: mkfs over a
//! device that holds something (unless forced), a mount of something that
//! is not a BlobFS, a second mount of one device in one process (also
//! through another spec or a symlink naming the same file).

use std::sync::Arc;

use blobfs::{BlobFs, MkfsOptions, MountOptions};
use blobstore::{
    block_on, channel, open_device, Blobstore, BlobstoreOptions, BlockDevice, DmaBuf, Lba,
    MemDevice,
};

fn mem() -> Arc<dyn BlockDevice> {
    Arc::new(MemDevice::new(64 << 20, 4096).unwrap())
}

/// Writes `bytes` at byte `off` (within the first block) of `dev`.
fn poke(dev: &Arc<dyn BlockDevice>, off: usize, bytes: &[u8]) {
    let ch = channel(dev).unwrap();
    let bs = dev.geometry().block_size as usize;
    let lba = off / bs;
    let mut block = block_on(ch.read(Lba(lba as u64), DmaBuf::new(bs).unwrap()))
        .unwrap()
        .to_vec();
    block[off % bs..off % bs + bytes.len()].copy_from_slice(bytes);
    block_on(ch.write(Lba(lba as u64), DmaBuf::from_slice(&block).unwrap())).unwrap();
}

fn force() -> MkfsOptions {
    MkfsOptions {
        force: true,
        ..Default::default()
    }
}

#[test]
fn mkfs_refuses_a_file_system_unless_forced() {
    let dev = mem();
    poke(&dev, 1080, &[0x53, 0xEF]);
    let e = BlobFs::mkfs(dev.clone(), MkfsOptions::default(), MountOptions::default())
        .err()
        .expect("mkfs must refuse");
    assert_eq!(
        e.to_string(),
        "mkfs: refusing to format mem:67108864: it holds an ext2 file system (signature at byte \
         1080); use --force (CLI) / mkfs=force (URI) / BlobstoreOptions::force to overwrite it"
    );
    // Nothing was written: the signature is still there.
    assert_eq!(
        blobstore::probe::probe_sync(&dev).unwrap().unwrap().what,
        "an ext2 file system"
    );
    let fs = BlobFs::mkfs(dev.clone(), force(), MountOptions::default()).unwrap();
    fs.create("kept").unwrap().sync().unwrap();
    fs.unmount().unwrap();
    BlobFs::mount(dev, MountOptions::default()).unwrap();
}

#[test]
fn mkfs_refuses_an_existing_blobfs_unless_forced() {
    let dev = mem();
    let fs = BlobFs::mkfs(dev.clone(), MkfsOptions::default(), MountOptions::default()).unwrap();
    fs.create("old").unwrap().sync().unwrap();
    fs.unmount().unwrap();
    let e = BlobFs::mkfs(dev.clone(), MkfsOptions::default(), MountOptions::default())
        .err()
        .expect("mkfs must refuse");
    assert_eq!(
        e.to_string(),
        "mkfs: refusing to format mem:67108864: it holds a blobstore of type \"BLOBFS\" \
         (signature at byte 0); use --force (CLI) / mkfs=force (URI) / BlobstoreOptions::force \
         to overwrite it"
    );
    let fs = BlobFs::mkfs(dev, force(), MountOptions::default()).unwrap();
    assert!(!fs.exists("old"), "force formats");
}

#[test]
fn mount_names_what_the_device_holds() {
    // A blobstore of another type.
    let dev = mem();
    let bs = block_on(Blobstore::init(
        dev.clone(),
        BlobstoreOptions {
            bstype: "kv".into(),
            ..Default::default()
        },
    ))
    .unwrap();
    block_on(bs.unload()).unwrap();
    let e = BlobFs::mount(dev.clone(), MountOptions::default())
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        "not a BlobFS: mem:67108864 holds a blobstore of type \"kv\""
    );
    // mkfs refuses it too, naming the type.
    let e = BlobFs::mkfs(dev, MkfsOptions::default(), MountOptions::default())
        .err()
        .unwrap();
    assert!(
        e.to_string().starts_with(
            "mkfs: refusing to format mem:67108864: it holds a blobstore of type \"kv\""
        ),
        "{e}"
    );

    // A partition table.
    let dev = mem();
    poke(&dev, 512, b"EFI PART");
    let e = BlobFs::mount(dev, MountOptions::default()).err().unwrap();
    assert_eq!(
        e.to_string(),
        "not a BlobFS: mem:67108864 holds a GPT partition table (signature at byte 512)"
    );

    // Nothing at all.
    let e = BlobFs::mount(mem(), MountOptions::default()).err().unwrap();
    assert_eq!(
        e.to_string(),
        "not a BlobFS: mem:67108864 holds no known signature (blank or unknown data)"
    );
}

#[test]
fn second_mount_in_one_process_is_refused() {
    let dev = mem();
    let fs = BlobFs::mkfs(dev.clone(), MkfsOptions::default(), MountOptions::default()).unwrap();
    let e = BlobFs::mount(dev.clone(), MountOptions::default())
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        "mount: busy: mem:67108864 is already mounted"
    );
    let e = BlobFs::mkfs(dev.clone(), force(), MountOptions::default())
        .err()
        .unwrap();
    assert_eq!(e.to_string(), "mkfs: busy: mem:67108864 is mounted");
    fs.unmount().unwrap();
    BlobFs::mount(dev, MountOptions::default()).unwrap();
}

#[test]
fn one_file_through_other_specs_is_in_use() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("fs.img");
    let link = tmp.path().join("link.img");
    std::os::unix::fs::symlink(&img, &link).unwrap();
    let first = open_device(&format!("file:{}?size=64M", img.display())).unwrap();
    let fs = BlobFs::mkfs(first, MkfsOptions::default(), MountOptions::default()).unwrap();
    for other in [
        format!("file:{}", img.display()),
        format!("file:{}?qd=64", img.display()),
        format!("file:{}", link.display()),
    ] {
        let e = open_device(&other).err().expect("a second writer");
        let path = other.trim_start_matches("file:").trim_end_matches("?qd=64");
        assert_eq!(
            e.to_string(),
            format!(
                "busy: {path} is in use by another process/blobstore (it holds an exclusive lock \
                 on it)"
            )
        );
    }
    fs.unmount().unwrap();
    // Once unmounted (and the device dropped), another spec opens it.
    let again = open_device(&format!("file:{}", link.display())).unwrap();
    let fs = BlobFs::mount(again, MountOptions::default()).unwrap();
    fs.unmount().unwrap();
}
