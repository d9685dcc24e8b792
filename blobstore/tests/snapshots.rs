//! Snapshots, clones, inflate, decouple, delete rules, read-only
//! enforcement, growing the store and clearing freed clusters, under every
//! geometry of `common::configs()` (both block sizes).

mod common;

use std::sync::Arc;

use blobstore::{
    block_on, Blob, BlobId, BlobOptions, Blobstore, BlockDevice, ClearMethod, DmaBuf, Error,
    LoadOptions, MemDevice,
};
use common::*;

fn load(dev: &Arc<dyn BlockDevice>) -> Blobstore {
    block_on(Blobstore::load(dev.clone(), LoadOptions::default())).unwrap()
}

fn read_all(b: &Blob) -> Vec<u8> {
    if b.num_clusters() == 0 {
        return Vec::new();
    }
    block_on(b.read(0, DmaBuf::new(b.size_bytes() as usize).unwrap()))
        .unwrap()
        .to_vec()
}

fn open(bs: &Blobstore, id: BlobId) -> Blob {
    block_on(bs.open_blob(id)).unwrap()
}

fn consistent(bs: &Blobstore, what: &str) {
    let rep = block_on(bs.check()).unwrap();
    assert!(rep.is_consistent(), "{what}: {:?}", rep.problems);
    assert!(
        rep.leaked_clusters.is_empty() && rep.leaked_md_pages.is_empty(),
        "{what}: leaks {rep:?}"
    );
}

/// A thick blob of `n` clusters filled with pattern `seed`.
fn filled(bs: &Blobstore, cfg: Config, n: u64, seed: u64) -> (BlobId, Vec<u8>) {
    let id = block_on(bs.create_blob(BlobOptions {
        num_clusters: n,
        ..Default::default()
    }))
    .unwrap();
    let data = pattern(seed, n as usize * cfg.cluster_size as usize);
    let b = open(bs, id);
    block_on(b.write(0, buf(&data))).unwrap();
    block_on(b.close()).unwrap();
    (id, data)
}

/// Both ways a store comes back: clean unload, and a crash (drop).
fn reload(bs: Blobstore, clean: bool) -> Blobstore {
    let dev = bs.device().clone();
    if clean {
        block_on(bs.unload()).unwrap();
    } else {
        drop(bs);
    }
    load(&dev)
}

#[test]
fn snapshot_takes_the_clusters_and_the_blob_becomes_its_clone() {
    for cfg in configs() {
        for clean in [true, false] {
            let bs = block_on(Blobstore::init(dev(cfg), opts(cfg))).unwrap();
            let cs = cfg.cluster_size as usize;
            let unit = cfg.block_size as usize;
            let (id, data) = filled(&bs, cfg, 4, 1);
            let free = bs.free_clusters();
            let sid =
                block_on(bs.create_snapshot(id, vec![("snap".into(), b"1".to_vec())])).unwrap();
            // No data moved: the snapshot owns what the blob owned.
            assert_eq!(bs.free_clusters(), free);
            let s = open(&bs, sid);
            assert!(s.is_read_only() && s.num_clusters() == 4 && s.allocated_clusters() == 4);
            assert_eq!(s.get_xattr("snap").unwrap(), b"1");
            let b = open(&bs, id);
            assert_eq!(b.parent(), Some(sid));
            assert!(b.is_thin() && b.is_clone());
            assert_eq!(b.allocated_clusters(), 0);
            assert_eq!(read_all(&b), data, "{cfg:?}");
            assert_eq!(bs.clones(sid), vec![id]);
            // First write to a shared cluster copies it: the rest of the
            // cluster keeps the snapshot's data; the snapshot is unchanged.
            let w = pattern(2, 2 * unit);
            block_on(b.write((cs / unit + 1) as u64, buf(&w))).unwrap();
            assert_eq!(b.allocated_clusters(), 1);
            assert_eq!(bs.free_clusters(), free - 1);
            let mut expect = data.clone();
            expect[cs + unit..cs + 3 * unit].copy_from_slice(&w);
            assert_eq!(read_all(&b), expect);
            assert_eq!(read_all(&s), data);
            consistent(&bs, "after copy-on-write");
            drop((b, s));
            let bs = reload(bs, clean);
            consistent(&bs, "reloaded");
            let (b, s) = (open(&bs, id), open(&bs, sid));
            assert_eq!(read_all(&b), expect, "{cfg:?} clean={clean}");
            assert_eq!(read_all(&s), data);
            assert_eq!(b.parent(), Some(sid));
            assert_eq!(bs.clones(sid), vec![id]);
        }
    }
}

#[test]
fn clones_read_their_parent_and_copy_on_write() {
    for cfg in configs() {
        let bs = block_on(Blobstore::init(dev(cfg), opts(cfg))).unwrap();
        let cs = cfg.cluster_size as usize;
        let unit = cfg.block_size as usize;
        let (id, data) = filled(&bs, cfg, 3, 3);
        // Only read-only blobs can be cloned.
        let e = block_on(bs.create_clone(id, vec![])).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        let sid = block_on(bs.create_snapshot(id, vec![])).unwrap();
        let c1 = block_on(bs.create_clone(sid, vec![("c".into(), b"1".to_vec())])).unwrap();
        let c2 = block_on(bs.create_clone(sid, vec![])).unwrap();
        let mut clones = vec![id, c1, c2];
        clones.sort();
        assert_eq!(bs.clones(sid), clones);
        let (b1, b2) = (open(&bs, c1), open(&bs, c2));
        assert_eq!(b1.get_xattr("c").unwrap(), b"1");
        assert_eq!((b1.num_clusters(), b1.allocated_clusters()), (3, 0));
        assert_eq!(read_all(&b1), data);
        // Writes to one clone are seen by no one else.
        let w = pattern(4, unit);
        block_on(b1.write(0, buf(&w))).unwrap();
        let mut e1 = data.clone();
        e1[..unit].copy_from_slice(&w);
        assert_eq!(read_all(&b1), e1);
        assert_eq!(read_all(&b2), data);
        assert_eq!(read_all(&open(&bs, sid)), data);
        // Write-zeroes and unmap on a clone read back as zeroes without
        // touching the parent.
        block_on(b2.write_zeroes(1, 1)).unwrap();
        block_on(b2.unmap((cs / unit) as u64, 2)).unwrap();
        let mut e2 = data.clone();
        e2[unit..2 * unit].fill(0);
        e2[cs..cs + 2 * unit].fill(0);
        assert_eq!(read_all(&b2), e2);
        assert_eq!(read_all(&open(&bs, sid)), data);
        // A clone grown past its parent reads zeroes there.
        block_on(b1.resize(5)).unwrap();
        let all = read_all(&b1);
        assert!(all[3 * cs..].iter().all(|&x| x == 0));
        // A clone of a blob made read-only.
        let (rid, rdata) = filled(&bs, cfg, 1, 5);
        let r = open(&bs, rid);
        r.set_read_only();
        block_on(r.sync_metadata()).unwrap();
        let rc = block_on(bs.create_clone(rid, vec![])).unwrap();
        assert_eq!(read_all(&open(&bs, rc)), rdata);
        consistent(&bs, "clones");
        drop((b1, b2, r));
        let bs = reload(bs, false);
        consistent(&bs, "clones reloaded");
        let (b1, b2) = (open(&bs, c1), open(&bs, c2));
        assert_eq!(&read_all(&b1)[..3 * cs], &e1[..]);
        assert_eq!(read_all(&b2), e2);
        assert_eq!(bs.clones(sid), clones);
        assert_eq!(bs.clones(rid), vec![rc]);
    }
}

#[test]
fn thin_blobs_and_chains_read_zeroes_or_the_nearest_ancestor() {
    for cfg in configs() {
        let bs = block_on(Blobstore::init(dev(cfg), opts(cfg))).unwrap();
        let cs = cfg.cluster_size as usize;
        let upc = (cs / cfg.block_size as usize) as u64;
        // A thin blob with cluster 1 written: the rest reads zeroes.
        let id = block_on(bs.create_blob(BlobOptions {
            num_clusters: 3,
            thin_provision: true,
            ..Default::default()
        }))
        .unwrap();
        let b = open(&bs, id);
        let one = pattern(6, cs);
        block_on(b.write(upc, buf(&one))).unwrap();
        let s1 = block_on(bs.create_snapshot(id, vec![])).unwrap();
        // Cluster 2 written after the first snapshot, then a second one.
        let two = pattern(7, cs);
        block_on(b.write(2 * upc, buf(&two))).unwrap();
        let s2 = block_on(bs.create_snapshot(id, vec![])).unwrap();
        assert_eq!(open(&bs, s2).parent(), Some(s1));
        assert_eq!(b.parent(), Some(s2));
        assert_eq!(bs.clones(s1), vec![s2]);
        let mut expect = vec![0u8; cs];
        expect.extend_from_slice(&one);
        expect.extend_from_slice(&two);
        assert_eq!(read_all(&b), expect, "{cfg:?}");
        // The first snapshot still reads what it held.
        let mut e1 = vec![0u8; cs];
        e1.extend_from_slice(&one);
        e1.extend(vec![0u8; cs]);
        assert_eq!(read_all(&open(&bs, s1)), e1);
        // Copy-on-write of a cluster no ancestor has: zeroes around the write.
        block_on(b.write(3, buf(&pattern(8, cfg.block_size as usize)))).unwrap();
        let all = read_all(&b);
        assert_eq!(
            all[..cs].iter().filter(|&&x| x != 0).count(),
            pattern(8, cfg.block_size as usize)
                .iter()
                .filter(|&&x| x != 0)
                .count()
        );
        consistent(&bs, "chain");
    }
}

#[test]
fn snapshots_are_read_only() {
    for cfg in configs() {
        let bs = block_on(Blobstore::init(dev(cfg), opts(cfg))).unwrap();
        let (id, _) = filled(&bs, cfg, 2, 9);
        let sid = block_on(bs.create_snapshot(id, vec![])).unwrap();
        let s = open(&bs, sid);
        let unit = DmaBuf::new(cfg.block_size as usize).unwrap();
        let ro = |e: Error| assert!(matches!(e, Error::ReadOnly(_)), "{e}");
        ro(block_on(s.write(0, unit)).unwrap_err());
        ro(block_on(s.write_zeroes(0, 1)).unwrap_err());
        ro(block_on(s.unmap(0, 1)).unwrap_err());
        ro(block_on(s.resize(5)).unwrap_err());
        ro(s.set_xattr("a", b"b").unwrap_err());
        ro(s.remove_xattr("a").unwrap_err());
        ro(block_on(s.inflate()).unwrap_err());
        ro(block_on(s.decouple_parent()).unwrap_err());
        // A snapshot of a snapshot makes no sense: clone it instead.
        let e = block_on(bs.create_snapshot(sid, vec![])).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
        drop(s);
        let bs = reload(bs, true);
        let s = open(&bs, sid);
        assert!(s.is_read_only());
        ro(block_on(s.resize(1)).unwrap_err());
    }
}

#[test]
fn inflate_and_decouple_parent() {
    for cfg in configs() {
        for clean in [true, false] {
            let bs = block_on(Blobstore::init(dev(cfg), opts(cfg))).unwrap();
            let cs = cfg.cluster_size as usize;
            let upc = (cs / cfg.block_size as usize) as u64;
            let (id, data) = filled(&bs, cfg, 3, 10);
            let s1 = block_on(bs.create_snapshot(id, vec![])).unwrap();
            let b = open(&bs, id);
            let w = pattern(11, cs);
            block_on(b.write(upc, buf(&w))).unwrap();
            let s2 = block_on(bs.create_snapshot(id, vec![])).unwrap();
            let mut expect = data.clone();
            expect[cs..2 * cs].copy_from_slice(&w);
            // Decouple: the blob copies what s2 owns (cluster 1) and hangs
            // off s1 directly.
            let free = bs.free_clusters();
            block_on(b.decouple_parent()).unwrap();
            assert_eq!(b.parent(), Some(s1));
            assert_eq!(b.allocated_clusters(), 1);
            assert_eq!(bs.free_clusters(), free - 1);
            assert!(bs.clones(s2).is_empty());
            let mut s1_clones = vec![id, s2];
            s1_clones.sort();
            assert_eq!(bs.clones(s1), s1_clones);
            assert_eq!(read_all(&b), expect, "{cfg:?}");
            // Nothing depends on s2 any more: it can go.
            block_on(bs.delete_blob(s2)).unwrap();
            // Inflate: the blob gets every cluster and no parent.
            block_on(b.inflate()).unwrap();
            assert_eq!(b.parent(), None);
            assert!(!b.is_thin());
            assert_eq!(b.allocated_clusters(), 3);
            assert_eq!(read_all(&b), expect);
            assert!(bs.clones(s1).is_empty());
            let e = block_on(b.decouple_parent()).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
            consistent(&bs, "inflated");
            drop(b);
            let bs = reload(bs, clean);
            consistent(&bs, "inflated, reloaded");
            let b = open(&bs, id);
            assert_eq!(read_all(&b), expect);
            assert_eq!(b.parent(), None);
            drop(b);
            // s1 has no clones now: it deletes like any blob.
            block_on(bs.delete_blob(s1)).unwrap();
            assert_eq!(read_all(&open(&bs, id)), expect);
            consistent(&bs, "s1 deleted");
        }
    }
}

#[test]
fn delete_rules_for_snapshots() {
    for cfg in configs() {
        for clean in [true, false] {
            let bs = block_on(Blobstore::init(dev(cfg), opts(cfg))).unwrap();
            let cs = cfg.cluster_size as usize;
            let upc = (cs / cfg.block_size as usize) as u64;
            let free0 = bs.free_clusters();
            let (id, data) = filled(&bs, cfg, 3, 12);
            let sid = block_on(bs.create_snapshot(id, vec![])).unwrap();
            let c = block_on(bs.create_clone(sid, vec![])).unwrap();
            // Two clones: the snapshot stays.
            let e = block_on(bs.delete_blob(sid)).unwrap_err();
            assert!(matches!(e, Error::Busy(_)), "{e}");
            block_on(bs.delete_blob(c)).unwrap();
            // One clone, which wrote its own cluster 0: deleting the
            // snapshot gives the clone clusters 1 and 2 and frees the
            // snapshot's cluster 0.
            let b = open(&bs, id);
            let w = pattern(13, cs);
            block_on(b.write(0, buf(&w))).unwrap();
            assert_eq!(bs.free_clusters(), free0 - 4);
            block_on(bs.set_super_blob(Some(sid))).unwrap();
            block_on(bs.delete_blob(sid)).unwrap();
            assert_eq!(bs.super_blob(), None);
            assert_eq!(bs.free_clusters(), free0 - 3);
            assert_eq!(b.parent(), None);
            assert_eq!(b.allocated_clusters(), 3);
            let mut expect = data.clone();
            expect[..cs].copy_from_slice(&w);
            assert_eq!(read_all(&b), expect, "{cfg:?}");
            assert!(matches!(
                block_on(bs.open_blob(sid)),
                Err(Error::NotFound(_))
            ));
            consistent(&bs, "snapshot deleted into its clone");
            // An open snapshot can't be deleted.
            let sid2 = block_on(bs.create_snapshot(id, vec![])).unwrap();
            let s2 = open(&bs, sid2);
            let e = block_on(bs.delete_blob(sid2)).unwrap_err();
            assert!(matches!(e, Error::Busy(_)), "{e}");
            drop(s2);
            // Deleting the clone leaves the snapshot with none.
            drop(b);
            block_on(bs.delete_blob(id)).unwrap();
            assert!(bs.clones(sid2).is_empty());
            assert_eq!(read_all(&open(&bs, sid2)), expect);
            let _ = upc;
            let bs = reload(bs, clean);
            consistent(&bs, "reloaded");
            assert_eq!(bs.blob_ids(), vec![sid2]);
            block_on(bs.delete_blob(sid2)).unwrap();
            assert_eq!(bs.free_clusters(), free0);
        }
    }
}

#[test]
fn clear_on_delete_zeroes_or_unmaps_freed_clusters() {
    for cfg in [configs()[0], configs()[1]] {
        for method in [
            ClearMethod::None,
            ClearMethod::Unmap,
            ClearMethod::WriteZeroes,
        ] {
            let mem_dev = MemDevice::new(cfg.size, cfg.block_size).unwrap();
            let dev: Arc<dyn BlockDevice> = Arc::new(mem_dev.clone());
            let bs = block_on(Blobstore::init(dev, opts(cfg))).unwrap();
            bs.set_clear_method(method);
            let n = bs.data_clusters();
            let id = block_on(bs.create_blob(BlobOptions {
                num_clusters: n,
                ..Default::default()
            }))
            .unwrap();
            let b = open(&bs, id);
            let cs = cfg.cluster_size as usize;
            let upc = (cs / cfg.block_size as usize) as u64;
            for c in 0..n {
                block_on(b.write(c * upc, buf(&vec![0xAB; cs]))).unwrap();
            }
            // Shrinking frees clusters too, once the shrink is durable.
            block_on(b.resize(n / 2)).unwrap();
            block_on(b.sync_metadata()).unwrap();
            drop(b);
            block_on(bs.delete_blob(id)).unwrap();
            let image = mem_dev.snapshot();
            let data_start = (cfg.size as usize / cs - n as usize) * cs;
            let left = image[data_start..].iter().filter(|&&x| x == 0xAB).count();
            if method == ClearMethod::None {
                assert!(left > 0);
            } else {
                assert_eq!(left, 0, "{cfg:?} {method:?}");
            }
        }
    }
}

#[test]
fn grow_when_the_device_grows() {
    for cfg in configs() {
        for clean in [true, false] {
            let small = MemDevice::new(cfg.size, cfg.block_size).unwrap();
            let dev: Arc<dyn BlockDevice> = Arc::new(small.clone());
            let bs = block_on(Blobstore::init(dev.clone(), opts(cfg))).unwrap();
            let (id, data) = filled(&bs, cfg, 2, 14);
            let (total0, free0) = (bs.total_clusters(), bs.free_clusters());
            if clean {
                block_on(bs.unload()).unwrap();
            } else {
                drop(bs);
            }
            // Same size: nothing to grow.
            let bs = block_on(Blobstore::grow(dev.clone(), LoadOptions::default())).unwrap();
            assert_eq!(bs.total_clusters(), total0);
            drop(bs);
            let big = MemDevice::new(2 * cfg.size, cfg.block_size).unwrap();
            big.store_bytes(0, &small.snapshot());
            let big: Arc<dyn BlockDevice> = Arc::new(big);
            // Plain load keeps the old size.
            assert_eq!(load(&big).total_clusters(), total0);
            let bs = block_on(Blobstore::grow(big.clone(), LoadOptions::default())).unwrap();
            assert_eq!(bs.total_clusters(), 2 * total0);
            assert_eq!(bs.free_clusters(), free0 + total0);
            consistent(&bs, "grown");
            // The new clusters are usable and the old data is there.
            let all = block_on(bs.create_blob(BlobOptions {
                num_clusters: bs.free_clusters(),
                ..Default::default()
            }))
            .unwrap();
            assert_eq!(bs.free_clusters(), 0);
            assert_eq!(read_all(&open(&bs, id)), data);
            let bs = reload(bs, clean);
            assert_eq!(bs.total_clusters(), 2 * total0);
            assert_eq!(bs.free_clusters(), 0);
            assert_eq!(read_all(&open(&bs, id)), data);
            consistent(&bs, "grown, reloaded");
            let _ = all;
        }
    }
}
