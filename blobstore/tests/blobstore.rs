//! Blobstore behaviour under every geometry in `common::configs()`.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use blobstore::{
    block_on, BlobId, BlobOptions, Blobstore, BlockDevice, DmaBuf, Error, LoadOptions, MemDevice,
};
use common::*;

fn load(dev: &Arc<dyn BlockDevice>) -> blobstore::Result<Blobstore> {
    block_on(Blobstore::load(dev.clone(), LoadOptions::default()))
}

fn read_all(bs: &Blobstore, id: BlobId) -> Vec<u8> {
    block_on(async {
        let b = bs.open_blob(id).await.unwrap();
        let len = b.size_bytes() as usize;
        if len == 0 {
            return Vec::new();
        }
        let out = b.read(0, DmaBuf::new(len).unwrap()).await.unwrap();
        out.to_vec()
    })
}

#[test]
fn data_and_xattrs_survive_unload_and_crash() {
    for cfg in configs() {
        for clean in [true, false] {
            let dev = dev(cfg);
            let bs = block_on(Blobstore::init(dev.clone(), opts(cfg))).unwrap();
            let cs = cfg.cluster_size as usize;
            let (id, data) = block_on(async {
                let id = bs
                    .create_blob(BlobOptions {
                        num_clusters: 3,
                        xattrs: vec![("name".into(), b"first".to_vec())],
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                let b = bs.open_blob(id).await.unwrap();
                let data = pattern(1, 3 * cs);
                b.write(0, buf(&data)).await.unwrap();
                b.set_xattr("color", b"blue").unwrap();
                b.close().await.unwrap();
                (id, data)
            });
            if clean {
                block_on(bs.unload()).unwrap();
            } else {
                drop(bs); // a crash: nothing written after the close's sync
            }
            let bs = load(&dev).unwrap();
            assert_eq!(bs.blob_ids(), vec![id], "{cfg:?} clean={clean}");
            assert_eq!(read_all(&bs, id), data, "{cfg:?} clean={clean}");
            let b = block_on(bs.open_blob(id)).unwrap();
            assert_eq!(b.get_xattr("name").unwrap(), b"first");
            assert_eq!(b.get_xattr("color").unwrap(), b"blue");
            assert_eq!(
                b.xattr_names(),
                vec!["color".to_string(), "name".to_string()]
            );
            assert_eq!(b.num_clusters(), 3);
            assert_eq!(b.size_bytes(), 3 * cs as u64);
            assert_eq!(b.num_io_units(), 3 * cs as u64 / cfg.block_size as u64);
            assert_eq!(b.num_pages(), 3 * cs as u64 / 4096);
            let free = bs.free_clusters();
            assert_eq!(free, bs.data_clusters() - 3);
        }
    }
}

#[test]
fn thin_blobs_read_zeroes_and_allocate_on_write() {
    for cfg in configs() {
        let dev = dev(cfg);
        let bs = block_on(Blobstore::init(dev.clone(), opts(cfg))).unwrap();
        let unit = cfg.block_size as usize;
        let upc = (cfg.cluster_size / cfg.block_size) as u64;
        let free0 = bs.free_clusters();
        let id = block_on(bs.create_blob(BlobOptions {
            num_clusters: 10,
            thin_provision: true,
            ..Default::default()
        }))
        .unwrap();
        assert_eq!(bs.free_clusters(), free0);
        let b = block_on(bs.open_blob(id)).unwrap();
        assert!(b.is_thin());
        assert!(read_all(&bs, id).iter().all(|&x| x == 0));
        // One unit in cluster 4 and a write straddling clusters 6 and 7.
        let one = pattern(2, unit);
        block_on(b.write(4 * upc + 3, buf(&one))).unwrap();
        let two = pattern(3, 2 * unit);
        block_on(b.write(7 * upc - 1, buf(&two))).unwrap();
        assert_eq!(b.allocated_clusters(), 3);
        assert_eq!(bs.free_clusters(), free0 - 3);
        drop(b);
        drop(bs); // crash without any explicit sync: thin writes are durable
        let bs = load(&dev).unwrap();
        let all = read_all(&bs, id);
        let at = |u: u64| u as usize * unit;
        assert_eq!(&all[at(4 * upc + 3)..at(4 * upc + 4)], &one[..]);
        assert_eq!(&all[at(7 * upc - 1)..at(7 * upc + 1)], &two[..]);
        let nonzero = all.iter().filter(|&&x| x != 0).count();
        let expect = one.iter().chain(&two).filter(|&&x| x != 0).count();
        assert_eq!(nonzero, expect, "{cfg:?}: stray bytes in a thin blob");
        assert_eq!(bs.free_clusters(), free0 - 3);
    }
}

/// `Blob::read_into` reads into the caller's memory: straight from the
/// device when the device allows it and the buffer is block-aligned (never
/// for NVMe, which reads only into its own DMA memory), through a DMA
/// buffer otherwise, the same bytes either way, holes of a thin blob as
/// zeroes, across clusters.
#[test]
fn read_into_lands_in_the_callers_memory() {
    for cfg in configs() {
        let dev = dev(cfg);
        let bs = block_on(Blobstore::init(dev.clone(), opts(cfg))).unwrap();
        let unit = cfg.block_size as usize;
        let upc = (cfg.cluster_size / cfg.block_size) as u64;
        let id = block_on(bs.create_blob(BlobOptions {
            num_clusters: 4,
            thin_provision: true,
            ..Default::default()
        }))
        .unwrap();
        let b = block_on(bs.open_blob(id)).unwrap();
        // Cluster 0 and cluster 2 written, cluster 1 a hole; a read from the
        // last unit of cluster 0 to the second unit of cluster 2.
        let c = cfg.cluster_size as usize;
        let d0 = pattern(11, c);
        let d2 = pattern(12, c);
        block_on(b.write(0, buf(&d0))).unwrap();
        block_on(b.write(2 * upc, buf(&d2))).unwrap();
        let from = upc - 1;
        let len = c + 3 * unit;
        let mut want = vec![0u8; len];
        want[..unit].copy_from_slice(&d0[c - unit..]);
        want[unit + c..].copy_from_slice(&d2[..2 * unit]);

        // An aligned buffer (DmaBuf memory, used here only as plain memory).
        let mut aligned = DmaBuf::new(len).unwrap();
        aligned.fill(0xee);
        let straight = b.read_into(from, &mut aligned).unwrap();
        assert_eq!(&aligned[..], &want[..], "{cfg:?}");
        assert_eq!(straight, dev.reads_into_any_memory(), "{cfg:?}");
        // A buffer off the block alignment: always through a DMA buffer.
        let mut backing = vec![0xeeu8; len + 1];
        let odd = &mut backing[1..];
        assert!(!(odd.as_ptr() as usize).is_multiple_of(unit));
        assert!(!b.read_into(from, odd).unwrap(), "{cfg:?}");
        assert_eq!(odd, &want[..], "{cfg:?}");
        // Refused: part of a unit, past the end.
        assert!(matches!(
            b.read_into(0, &mut aligned[..unit - 1]),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            b.read_into(4 * upc - 1, &mut aligned[..2 * unit]),
            Err(Error::OutOfRange { .. })
        ));
    }
}

#[test]
fn resize_grow_and_shrink() {
    for cfg in configs() {
        let dev = dev(cfg);
        let bs = block_on(Blobstore::init(dev.clone(), opts(cfg))).unwrap();
        let cs = cfg.cluster_size as usize;
        let free0 = bs.free_clusters();
        let id = block_on(bs.create_blob(BlobOptions::default())).unwrap();
        let b = block_on(bs.open_blob(id)).unwrap();
        assert_eq!(b.num_clusters(), 0);
        // Larger than one extent page for the small-cluster configs.
        let big = (bs.data_clusters() - 8).min(1500);
        block_on(b.resize(big)).unwrap();
        assert_eq!(bs.free_clusters(), free0 - big);
        let tail = pattern(9, cs);
        block_on(b.write((big - 1) * (cs as u64 / cfg.block_size as u64), buf(&tail))).unwrap();
        block_on(b.sync_metadata()).unwrap();
        block_on(b.resize(2)).unwrap();
        // Shrunk clusters come back only once the shrink is durable.
        assert_eq!(bs.free_clusters(), free0 - big);
        block_on(b.sync_metadata()).unwrap();
        assert_eq!(bs.free_clusters(), free0 - 2);
        block_on(b.resize(4)).unwrap();
        block_on(b.close()).unwrap();
        drop(bs);
        let bs = load(&dev).unwrap();
        assert_eq!(bs.free_clusters(), free0 - 4);
        let all = read_all(&bs, id);
        assert_eq!(all.len(), 4 * cs);
        assert!(
            all.iter().all(|&x| x == 0),
            "{cfg:?}: regrown clusters must read zeroes"
        );
    }
}

#[test]
fn xattrs_limits_and_removal() {
    let cfg = configs()[0];
    let bs = block_on(Blobstore::init(dev(cfg), opts(cfg))).unwrap();
    let id = block_on(bs.create_blob(BlobOptions::default())).unwrap();
    let b = block_on(bs.open_blob(id)).unwrap();
    assert!(matches!(
        b.set_xattr("", b"x"),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        b.set_xattr(&"n".repeat(256), b"x"),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        b.set_xattr("big", &vec![0; 4000]),
        Err(Error::InvalidArgument(_))
    ));
    // Many large xattrs spill into continuation pages.
    for i in 0..20 {
        b.set_xattr(&format!("k{i:02}"), &pattern(i, 3000)).unwrap();
    }
    b.remove_xattr("k05").unwrap();
    assert!(matches!(
        b.remove_xattr("k05"),
        Err(Error::InvalidArgument(_))
    ));
    block_on(b.sync_metadata()).unwrap();
    // Rewriting shorter metadata frees the continuation pages again.
    let pages_used = bs.free_md_pages();
    for i in 0..20 {
        let _ = b.remove_xattr(&format!("k{i:02}"));
    }
    block_on(b.sync_metadata()).unwrap();
    assert!(bs.free_md_pages() > pages_used);
    for i in 0..10 {
        b.set_xattr(&format!("k{i:02}"), &pattern(i, 3000)).unwrap();
    }
    block_on(b.close()).unwrap();
    let dev = bs.device().clone();
    block_on(bs.unload()).unwrap();
    let bs = load(&dev).unwrap();
    let b = block_on(bs.open_blob(id)).unwrap();
    assert_eq!(b.xattr_names().len(), 10);
    assert_eq!(b.get_xattr("k07").unwrap(), pattern(7, 3000));
    assert_eq!(b.get_xattr("k15"), None);
}

#[test]
fn delete_frees_and_never_leaks_old_data() {
    for cfg in configs() {
        let dev = dev(cfg);
        let bs = block_on(Blobstore::init(dev.clone(), opts(cfg))).unwrap();
        let cs = cfg.cluster_size as usize;
        let free0 = bs.free_clusters();
        let n = bs.data_clusters();
        // Fill the whole store with a non-zero pattern, then delete.
        let id = block_on(bs.create_blob(BlobOptions {
            num_clusters: n,
            ..Default::default()
        }))
        .unwrap();
        let b = block_on(bs.open_blob(id)).unwrap();
        let upc = cs as u64 / cfg.block_size as u64;
        for c in 0..n {
            block_on(b.write(c * upc, buf(&vec![0xAB; cs]))).unwrap();
        }
        assert!(matches!(block_on(bs.delete_blob(id)), Err(Error::Busy(_))));
        drop(b);
        block_on(bs.delete_blob(id)).unwrap();
        assert_eq!(bs.free_clusters(), free0);
        assert!(matches!(
            block_on(bs.open_blob(id)),
            Err(Error::NotFound(_))
        ));
        assert!(matches!(
            block_on(bs.delete_blob(id)),
            Err(Error::NotFound(_))
        ));
        let thick = block_on(bs.create_blob(BlobOptions {
            num_clusters: n / 2,
            ..Default::default()
        }))
        .unwrap();
        let thin = block_on(bs.create_blob(BlobOptions {
            num_clusters: n - n / 2,
            thin_provision: true,
            ..Default::default()
        }))
        .unwrap();
        let tb = block_on(bs.open_blob(thin)).unwrap();
        block_on(tb.write(1, buf(&vec![1; cfg.block_size as usize]))).unwrap();
        drop(tb);
        assert!(read_all(&bs, thick).iter().all(|&x| x == 0), "{cfg:?}");
        assert_eq!(
            read_all(&bs, thin).iter().filter(|&&x| x != 0).count(),
            cfg.block_size as usize
        );
        drop(bs);
        let bs = load(&dev).unwrap();
        assert_eq!(bs.blob_ids().len(), 2);
    }
}

#[test]
fn out_of_space_is_clean_and_loses_nothing() {
    for cfg in configs() {
        for clean in [true, false] {
            let dev = dev(cfg);
            let bs = block_on(Blobstore::init(dev.clone(), opts(cfg))).unwrap();
            let cs = cfg.cluster_size as usize;
            let mut blobs = Vec::new();
            let err = loop {
                match block_on(bs.create_blob(BlobOptions {
                    num_clusters: 3,
                    ..Default::default()
                })) {
                    Ok(id) => {
                        let b = block_on(bs.open_blob(id)).unwrap();
                        let data = pattern(id.0, cs);
                        block_on(b.write(0, buf(&data))).unwrap();
                        blobs.push((id, data));
                    }
                    Err(e) => break e,
                }
            };
            assert!(matches!(err, Error::NoSpace(_)), "{err}");
            // A thin blob can be created but its first write finds no room.
            let free = bs.free_clusters();
            let thin = block_on(bs.create_blob(BlobOptions {
                num_clusters: free + 1,
                thin_provision: true,
                ..Default::default()
            }));
            if let Ok(thin) = thin {
                let tb = block_on(bs.open_blob(thin)).unwrap();
                let upc = cs as u64 / cfg.block_size as u64;
                let big = vec![7u8; cs * (free as usize + 1)];
                let e = block_on(tb.write(0, buf(&big))).unwrap_err();
                assert!(matches!(e, Error::NoSpace(_)), "{e}");
                // Nothing was taken by the failed write.
                assert_eq!(bs.free_clusters(), free);
                block_on(tb.write(upc, buf(&vec![7u8; cs]))).ok();
            }
            let e = block_on(async {
                let b = bs.open_blob(blobs[0].0).await?;
                b.resize(b.num_clusters() + free + 1).await
            })
            .unwrap_err();
            assert!(matches!(e, Error::NoSpace(_)), "{e}");
            if clean {
                block_on(bs.unload()).unwrap();
            } else {
                drop(bs);
            }
            let bs = load(&dev).unwrap();
            for (id, data) in &blobs {
                let all = read_all(&bs, *id);
                assert_eq!(&all[..cs], &data[..], "{cfg:?} blob {id}");
            }
        }
    }
}

#[test]
fn damage_is_reported_not_panicked() {
    let cfg = configs()[1];
    let mem_dev = MemDevice::new(cfg.size, cfg.block_size).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(mem_dev.clone());
    // No blobstore at all.
    assert!(matches!(load(&dev), Err(Error::NotABlobstore(_))));
    let bs = block_on(Blobstore::init(dev.clone(), opts(cfg))).unwrap();
    let id = block_on(bs.create_blob(BlobOptions {
        num_clusters: 1,
        xattrs: vec![("a".into(), b"b".to_vec())],
        ..Default::default()
    }))
    .unwrap();
    block_on(bs.unload()).unwrap();
    let image = mem_dev.snapshot();
    // Wrong type tag.
    let e = block_on(Blobstore::load(
        dev.clone(),
        LoadOptions {
            bstype: "other".into(),
        },
    ));
    assert!(matches!(e, Err(Error::WrongType { .. })), "{:?}", e.err());
    assert!(block_on(Blobstore::load(
        dev.clone(),
        LoadOptions {
            bstype: "test".into()
        }
    ))
    .is_ok());
    // A flipped bit in the super block: the backup serves, and the load
    // rewrites the primary.
    let d = MemDevice::from_image(&image, cfg.block_size).unwrap();
    let flip = |off: usize| {
        let mut b = [0u8; 1];
        d.load_bytes(off, &mut b);
        d.store_bytes(off, &[b[0] ^ 1]);
    };
    flip(40);
    let dev: Arc<dyn BlockDevice> = Arc::new(d.clone());
    let bs = load(&dev).unwrap();
    assert!(bs.load_report().super_from_backup.is_some());
    assert_eq!(bs.blob_ids(), vec![id]);
    block_on(bs.unload()).unwrap();
    assert_eq!(load(&dev).unwrap().load_report(), Default::default());
    // Both copies flipped: corrupt.
    flip(40);
    flip(4096 + 40);
    let e = load(&dev).err().unwrap();
    assert!(matches!(e, Error::Corrupt { .. }), "{e}");
    // A flipped bit in the blob's first metadata page: found at open after a
    // clean load, and at load time after a dirty one.
    let md_off = find_md_page(&image, id);
    for dirty in [false, true] {
        let d = MemDevice::from_image(&image, cfg.block_size).unwrap();
        d.store_bytes(md_off + 100, &[0x5A]);
        let dev: Arc<dyn BlockDevice> = Arc::new(d);
        if dirty {
            let bs = load(&dev).unwrap();
            drop(bs); // leaves the store dirty
            let e = load(&dev).err().unwrap();
            assert!(matches!(e, Error::Corrupt { .. }), "{e}");
        } else {
            let bs = load(&dev).unwrap();
            let e = block_on(bs.open_blob(id)).err().unwrap();
            assert!(matches!(e, Error::Corrupt { .. }), "{e}");
        }
    }
    // Garbage everywhere past the super block never panics.
    for seed in 0..20u64 {
        let d = MemDevice::from_image(&image, cfg.block_size).unwrap();
        let noise = pattern(seed, 4096);
        d.store_bytes(4096 * (1 + seed as usize % 8), &noise);
        let dev: Arc<dyn BlockDevice> = Arc::new(d);
        if let Ok(bs) = load(&dev) {
            for id in bs.blob_ids() {
                let _ = block_on(bs.open_blob(id));
            }
        }
    }
}

/// Byte offset of a blob's first metadata page in an image.
fn find_md_page(image: &[u8], id: BlobId) -> usize {
    (0..image.len() / 4096)
        .map(|p| p * 4096)
        .find(|&off| {
            image[off..off + 4] == *b"BSMD"
                && image[off + 6] == 1
                && u64::from_le_bytes(image[off + 8..off + 16].try_into().unwrap()) == id.0
        })
        .expect("first page present")
}

#[test]
fn io_past_the_end_and_bad_buffers_are_refused() {
    for cfg in configs() {
        let bs = block_on(Blobstore::init(dev(cfg), opts(cfg))).unwrap();
        let id = block_on(bs.create_blob(BlobOptions {
            num_clusters: 1,
            ..Default::default()
        }))
        .unwrap();
        let b = block_on(bs.open_blob(id)).unwrap();
        let units = b.num_io_units();
        let unit = cfg.block_size as usize;
        let e = block_on(b.read(units, DmaBuf::new(unit).unwrap())).unwrap_err();
        assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
        let e = block_on(b.write(units - 1, DmaBuf::new(2 * unit).unwrap())).unwrap_err();
        assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
        let e = block_on(b.read(u64::MAX, DmaBuf::new(unit).unwrap())).unwrap_err();
        assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
        let e = block_on(b.read(0, DmaBuf::new(unit + 1).unwrap())).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        let e = block_on(b.unmap(units, 1)).unwrap_err();
        assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
        assert!(matches!(
            block_on(bs.open_blob(BlobId(12345))),
            Err(Error::NotFound(_))
        ));
    }
}

#[test]
fn vectored_io_unmap_and_write_zeroes() {
    for cfg in configs() {
        let bs = block_on(Blobstore::init(dev(cfg), opts(cfg))).unwrap();
        let cs = cfg.cluster_size as usize;
        let unit = cfg.block_size as usize;
        let id = block_on(bs.create_blob(BlobOptions {
            num_clusters: 4,
            ..Default::default()
        }))
        .unwrap();
        let b = block_on(bs.open_blob(id)).unwrap();
        let data = pattern(5, 2 * cs);
        // Three buffers of odd unit counts across a cluster boundary.
        let start = (cs / unit - 3) as u64;
        let a = (cs / unit / 2 - 1).max(1) * unit;
        let bufs = vec![
            buf(&data[..a]),
            buf(&data[a..a + unit]),
            buf(&data[a + unit..cs]),
        ];
        block_on(b.writev(start, bufs)).unwrap();
        let out = block_on(b.readv(
            start,
            vec![DmaBuf::new(unit).unwrap(), DmaBuf::new(cs - unit).unwrap()],
        ))
        .unwrap();
        let got: Vec<u8> = out.iter().flat_map(|x| x.to_vec()).collect();
        assert_eq!(got, &data[..cs]);
        block_on(b.write_zeroes(start + 1, 2)).unwrap();
        block_on(b.unmap(start + 4, 1)).unwrap();
        let all = read_all(&bs, id);
        let s = start as usize * unit;
        assert_eq!(&all[s..s + unit], &data[..unit]);
        assert!(all[s + unit..s + 3 * unit].iter().all(|&x| x == 0));
        assert_eq!(&all[s + 3 * unit..s + 4 * unit], &data[3 * unit..4 * unit]);
        assert!(all[s + 4 * unit..s + 5 * unit].iter().all(|&x| x == 0));
    }
}

#[test]
fn read_only_super_blob_and_iteration() {
    let cfg = configs()[2];
    let dev = dev(cfg);
    let bs = block_on(Blobstore::init(dev.clone(), opts(cfg))).unwrap();
    let ids: Vec<BlobId> = (0..5)
        .map(|_| block_on(bs.create_blob(BlobOptions::default())).unwrap())
        .collect();
    let mut listed = bs.blob_ids();
    listed.sort();
    assert_eq!(listed, ids);
    block_on(bs.set_super_blob(Some(ids[2]))).unwrap();
    assert!(matches!(
        block_on(bs.set_super_blob(Some(BlobId(99)))),
        Err(Error::NotFound(_))
    ));
    let b = block_on(bs.open_blob(ids[1])).unwrap();
    block_on(b.resize(1)).unwrap();
    b.set_read_only();
    block_on(b.close()).unwrap();
    drop(bs);
    let bs = load(&dev).unwrap();
    assert_eq!(bs.super_blob(), Some(ids[2]));
    assert_eq!(bs.bstype(), "test");
    let b = block_on(bs.open_blob(ids[1])).unwrap();
    assert!(b.is_read_only());
    let e = block_on(b.write(0, DmaBuf::new(cfg.block_size as usize).unwrap())).unwrap_err();
    assert!(matches!(e, Error::ReadOnly(_)));
    assert!(matches!(block_on(b.resize(3)), Err(Error::ReadOnly(_))));
    assert!(matches!(b.set_xattr("x", b"y"), Err(Error::ReadOnly(_))));
    drop(b);
    block_on(bs.delete_blob(ids[2])).unwrap();
    assert_eq!(bs.super_blob(), None);
}

#[test]
fn bad_options_are_refused() {
    let cfg = configs()[0];
    let tiny: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20, 512).unwrap());
    let e = block_on(Blobstore::init(tiny, opts(cfg))).err().unwrap();
    assert!(matches!(e, Error::DeviceTooSmall(_)), "{e}");
    let bad =
        |o: blobstore::BlobstoreOptions| block_on(Blobstore::init(dev(cfg), o)).err().unwrap();
    let mut o = opts(cfg);
    o.page_size = 1000;
    assert!(matches!(bad(o), Error::InvalidArgument(_)));
    let mut o = opts(cfg);
    o.cluster_size = 5000;
    assert!(matches!(bad(o), Error::InvalidArgument(_)));
    let mut o = opts(cfg);
    o.bstype = "a type tag that is too long".into();
    assert!(matches!(bad(o), Error::InvalidArgument(_)));
    // A store made on 512-byte blocks does not load on 4096-byte blocks.
    let d512 = MemDevice::new(64 << 20, 512).unwrap();
    let bs = block_on(Blobstore::init(Arc::new(d512.clone()), opts(cfg))).unwrap();
    block_on(bs.unload()).unwrap();
    let d4k: Arc<dyn BlockDevice> =
        Arc::new(MemDevice::from_image(&d512.snapshot(), 4096).unwrap());
    assert!(matches!(load(&d4k), Err(Error::InvalidArgument(_))));
}

/// Four threads do random I/O, resizes, xattrs, creates and deletes at once;
/// every blob's contents are checked against a per-thread model.
#[test]
fn four_threads_against_a_model() {
    use rand::{Rng, SeedableRng};
    for cfg in [configs()[0], configs()[3], configs()[5]] {
        let dev = dev(cfg);
        let bs = block_on(Blobstore::init(dev.clone(), opts(cfg))).unwrap();
        let shared = block_on(bs.create_blob(BlobOptions {
            num_clusters: 8,
            ..Default::default()
        }))
        .unwrap();
        let unit = cfg.block_size as usize;
        let upc = (cfg.cluster_size / cfg.block_size) as u64;
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let bs = bs.clone();
                std::thread::spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                    let mut model: HashMap<BlobId, Vec<u8>> = HashMap::new();
                    let sh = block_on(bs.open_blob(shared)).unwrap();
                    // Thread t owns cluster 2t..2t+2 of the shared blob.
                    let mut sh_model = vec![0u8; 2 * cfg.cluster_size as usize];
                    for step in 0..150 {
                        match rng.gen_range(0..10) {
                            0 => {
                                let thin = rng.gen_bool(0.5);
                                let n = rng.gen_range(0..4);
                                let id = block_on(bs.create_blob(BlobOptions {
                                    num_clusters: n,
                                    thin_provision: thin,
                                    ..Default::default()
                                }))
                                .unwrap();
                                model.insert(id, vec![0; n as usize * cfg.cluster_size as usize]);
                            }
                            1 if !model.is_empty() => {
                                let id = *model.keys().next().unwrap();
                                block_on(bs.delete_blob(id)).unwrap();
                                model.remove(&id);
                            }
                            2 if !model.is_empty() => {
                                let id = *model.keys().nth(rng.gen_range(0..model.len())).unwrap();
                                let n = rng.gen_range(0..5u64);
                                let b = block_on(bs.open_blob(id)).unwrap();
                                block_on(b.resize(n)).unwrap();
                                b.set_xattr("step", &(step as u32).to_le_bytes()).unwrap();
                                block_on(b.close()).unwrap();
                                model
                                    .get_mut(&id)
                                    .unwrap()
                                    .resize(n as usize * cfg.cluster_size as usize, 0);
                            }
                            3..=5 if !model.is_empty() => {
                                let id = *model.keys().nth(rng.gen_range(0..model.len())).unwrap();
                                let m = model.get_mut(&id).unwrap();
                                let units = (m.len() / unit) as u64;
                                if units == 0 {
                                    continue;
                                }
                                let off = rng.gen_range(0..units);
                                let n = rng.gen_range(1..=(units - off).min(16));
                                let data = pattern(t * 1000 + step, n as usize * unit);
                                let b = block_on(bs.open_blob(id)).unwrap();
                                block_on(b.write(off, buf(&data))).unwrap();
                                m[off as usize * unit..][..data.len()].copy_from_slice(&data);
                            }
                            _ => {
                                let off = rng.gen_range(0..2 * upc - 4);
                                let data = pattern(t * 7777 + step, 4 * unit);
                                block_on(sh.write(2 * t * upc + off, buf(&data))).unwrap();
                                sh_model[off as usize * unit..][..data.len()]
                                    .copy_from_slice(&data);
                                let got = block_on(
                                    sh.read(2 * t * upc, DmaBuf::new(sh_model.len()).unwrap()),
                                )
                                .unwrap();
                                assert_eq!(&got[..], &sh_model[..]);
                            }
                        }
                    }
                    for (id, m) in &model {
                        assert_eq!(&read_all(&bs, *id), m, "thread {t} blob {id}");
                    }
                    model
                })
            })
            .collect();
        let models: Vec<_> = threads.into_iter().map(|h| h.join().unwrap()).collect();
        drop(bs);
        // Everything written and synced must be there after a crash-reload.
        let bs = load(&dev).unwrap();
        for m in &models {
            for (id, data) in m {
                assert_eq!(&read_all(&bs, *id), data);
            }
        }
        let n: usize = models.iter().map(|m| m.len()).sum();
        assert_eq!(bs.blob_ids().len(), n + 1);
    }
}

/// `sync_metadata_with` runs the caller's data write inside the sync: when
/// it succeeds, data and metadata are both there after a crash; when it
/// fails, the error comes back as the outer result and an ordered sync
/// commits nothing (the blob still has its old metadata on disk and stays
/// dirty), so a plain sync afterwards commits the change.
#[test]
fn sync_with_data_commits_both_or_reports_the_data_error() {
    for cfg in configs() {
        let dev = dev(cfg);
        let bs = block_on(Blobstore::init(dev.clone(), opts(cfg))).unwrap();
        let cs = cfg.cluster_size as usize;
        let data = pattern(7, cs);
        let id = block_on(async {
            let id = bs
                .create_blob(BlobOptions {
                    num_clusters: 1,
                    ..Default::default()
                })
                .await
                .unwrap();
            let b = bs.open_blob(id).await.unwrap();
            b.sync_metadata().await.unwrap();
            // Both kinds of sync with a data write that works.
            for (i, ordered) in [(1u8, true), (2, false)] {
                b.set_xattr("len", &[i; 8]).unwrap();
                let write = async { b.write(0, buf(&data)).await.map(|_| ()) };
                b.sync_metadata_with(ordered, Some(write))
                    .await
                    .unwrap()
                    .unwrap();
                assert!(!b.is_dirty());
            }
            // An ordered sync whose data write fails commits nothing.
            b.set_xattr("len", &[3; 8]).unwrap();
            let failing = async { Err::<(), &str>("the data write failed") };
            let got = b.sync_metadata_with(true, Some(failing)).await;
            assert!(
                matches!(got, Err("the data write failed")),
                "{cfg:?}: {got:?}"
            );
            assert!(b.is_dirty(), "{cfg:?}: nothing adopted");
            id
        });
        drop(bs); // a crash
        let bs = load(&dev).unwrap();
        assert_eq!(read_all(&bs, id), data, "{cfg:?}");
        let len = |bs: &Blobstore| block_on(bs.open_blob(id)).unwrap().get_xattr("len");
        assert_eq!(
            len(&bs),
            Some(vec![2; 8]),
            "{cfg:?}: the last committed sync"
        );
        // The change the failed sync carried commits with the next one.
        block_on(async {
            let b = bs.open_blob(id).await.unwrap();
            b.set_xattr("len", &[3; 8]).unwrap();
            b.sync_metadata().await.unwrap();
        });
        drop(bs);
        assert_eq!(len(&load(&dev).unwrap()), Some(vec![3; 8]), "{cfg:?}");
    }
}
