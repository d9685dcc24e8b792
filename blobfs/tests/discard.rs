//! `MountOptions::discard` (`discard=on`): deleting a file unmaps its
//! clusters, so a sparse `file:` image gives the blocks back to the host at
//! once; without it the blocks stay allocated until a trim.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use blobfs::{BlobFs, MkfsOptions, MountOptions};
use blobstore::{BlockDevice, FileDevice, FileOptions};

const FILE_BYTES: usize = 24 << 20;

fn open(path: &Path) -> Arc<dyn BlockDevice> {
    Arc::new(
        FileDevice::open(
            path,
            FileOptions {
                size_bytes: Some(64 << 20),
                ..Default::default()
            },
        )
        .unwrap(),
    )
}

/// Bytes the host file system has allocated for `path`.
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// Makes a BlobFS, writes one big file, remounts with `discard` and
/// deletes it; returns the image's allocated bytes before and after the
/// delete.
fn delete_with(discard: bool) -> (u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fs.img");
    let fs = BlobFs::mkfs(
        open(&img),
        MkfsOptions {
            cluster_size: 64 << 10,
            ..Default::default()
        },
        MountOptions::default(),
    )
    .unwrap();
    let f = fs.create("big").unwrap();
    f.append(&vec![0x5A; FILE_BYTES]).unwrap();
    f.close().unwrap();
    let keep = fs.create("keep").unwrap();
    keep.append(b"still here").unwrap();
    keep.close().unwrap();
    fs.unmount().unwrap();

    let before = allocated(&img);
    let opts = MountOptions {
        discard,
        ..Default::default()
    };
    let fs = BlobFs::mount(open(&img), opts).unwrap();
    fs.remove_file("big").unwrap();
    fs.unmount().unwrap();
    let after = allocated(&img);

    // The file system is whole either way.
    let fs = BlobFs::mount(open(&img), MountOptions::default()).unwrap();
    assert!(!fs.exists("big"));
    let keep = fs.open("keep", blobfs::OpenOptions::read()).unwrap();
    assert_eq!(keep.read_all().unwrap(), b"still here");
    keep.close().unwrap();
    fs.unmount().unwrap();
    (before, after)
}

#[test]
fn discard_on_gives_a_deleted_files_blocks_back_to_the_image() {
    let (before, after) = delete_with(true);
    assert!(
        before >= FILE_BYTES as u64,
        "the file's bytes were never allocated: {before}"
    );
    assert!(
        after + FILE_BYTES as u64 * 9 / 10 <= before,
        "discard=on: {after} of {before} bytes still allocated"
    );
}

#[test]
fn discard_off_leaves_the_blocks_allocated() {
    let (before, after) = delete_with(false);
    assert!(
        after + FILE_BYTES as u64 / 10 >= before,
        "discard=off gave blocks back: {after} of {before}"
    );
}
