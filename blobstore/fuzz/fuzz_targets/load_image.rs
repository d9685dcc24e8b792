//! Load of an arbitrary image: a small valid store (blobs, xattrs, a
//! snapshot and a clone; clean or dirty) with fuzzer-chosen bytes patched
//! in, or raw fuzzer bytes. Load, check, open and read must return errors,
//! never panic.
#![no_main]

use std::sync::{Arc, OnceLock};

use blobstore::{
    block_on, BlobOptions, Blobstore, BlobstoreOptions, BlockDevice, DmaBuf, LoadOptions, MemDevice,
};
use libfuzzer_sys::fuzz_target;

const SIZE: u64 = 512 << 10;
const CLUSTER: u32 = 16 << 10;

/// Two base images: after a clean unload, and dirty (bitmaps rebuilt).
fn bases() -> &'static [Vec<u8>; 2] {
    static BASES: OnceLock<[Vec<u8>; 2]> = OnceLock::new();
    BASES.get_or_init(|| {
        let make = |clean: bool| {
            let mem = MemDevice::new(SIZE, 512).unwrap();
            let dev: Arc<dyn BlockDevice> = Arc::new(mem.clone());
            let bs = block_on(Blobstore::init(
                dev,
                BlobstoreOptions {
                    cluster_size: CLUSTER,
                    md_pages: Some(16),
                    ..Default::default()
                },
            ))
            .unwrap();
            block_on(async {
                let a = bs
                    .create_blob(BlobOptions {
                        num_clusters: 2,
                        thin_provision: false,
                        xattrs: vec![("name".into(), vec![b'x'; 3000])],
                    })
                    .await
                    .unwrap();
                let b = bs.open_blob(a).await.unwrap();
                b.write(0, DmaBuf::from_slice(&[7u8; 4096]).unwrap())
                    .await
                    .unwrap();
                b.set_xattr("more", &[1u8; 2000]).unwrap();
                b.close().await.unwrap();
                let s = bs.create_snapshot(a, vec![]).await.unwrap();
                let c = bs.create_clone(s, vec![]).await.unwrap();
                bs.set_super_blob(Some(c)).await.unwrap();
                bs.create_blob(BlobOptions {
                    num_clusters: 3,
                    thin_provision: true,
                    xattrs: vec![],
                })
                .await
                .unwrap();
            });
            if clean {
                block_on(bs.unload()).unwrap();
            } else {
                drop(bs);
            }
            mem.snapshot()
        };
        [make(true), make(false)]
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut image = if mode & 1 == 0 {
        bases()[(mode as usize >> 1) & 1].clone()
    } else {
        vec![0u8; SIZE as usize]
    };
    if mode & 1 == 1 {
        let n = rest.len().min(image.len());
        image[..n].copy_from_slice(&rest[..n]);
    } else {
        // Patches: (offset: u24 in 16-byte units, len: u8, bytes).
        let mut r = rest;
        while r.len() >= 4 {
            let off = (u32::from_le_bytes([r[0], r[1], r[2], 0]) as usize * 16) % image.len();
            let len = (r[3] as usize).min(r.len() - 4).min(image.len() - off);
            image[off..off + len].copy_from_slice(&r[4..4 + len]);
            r = &r[4 + len..];
        }
    }
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_image(&image, 512).unwrap());
    let Ok(bs) = block_on(Blobstore::load(dev, LoadOptions::default())) else {
        return;
    };
    let _ = block_on(bs.check());
    for id in bs.blob_ids() {
        block_on(async {
            if let Ok(b) = bs.open_blob(id).await {
                let n = b.size_bytes().min(64 << 10) as usize;
                if n > 0 {
                    let _ = b.read(0, DmaBuf::new(n).unwrap()).await;
                }
                let _ = b.xattr_names();
            }
        });
    }
    let _ = block_on(bs.unload());
});
