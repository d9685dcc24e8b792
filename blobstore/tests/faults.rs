//! Injected I/O errors: the Nth read, write or flush of a workload fails.
//! Callers get errors, never a panic, and the store loads afterwards, both
//! from the live image (a restart after the error) and from a crash image.

mod common;

use std::sync::Arc;

use blobstore::testing::FaultDevice;
use blobstore::{
    block_on, BlobOptions, Blobstore, BlobstoreOptions, BlockDevice, DmaBuf, IoKind, LoadOptions,
    MemDevice,
};

const CLUSTER: u32 = 16 << 10;

/// A fixed workload touching every metadata path; returns how many
/// operations failed.
fn workload(dev: &Arc<dyn BlockDevice>, unit: usize) -> usize {
    let errors = std::cell::Cell::new(0);
    let trace = std::env::var_os("FAULT_ONLY").is_some();
    let note = |r: blobstore::Result<()>| {
        if trace {
            eprintln!("op -> {:?}", r.as_ref().err().map(|e| e.to_string()));
        }
        if r.is_err() {
            errors.set(errors.get() + 1);
        }
    };
    let opts = BlobstoreOptions {
        cluster_size: CLUSTER,
        md_pages: Some(64),
        ..Default::default()
    };
    let bs = match block_on(Blobstore::init(dev.clone(), opts)) {
        Ok(bs) => bs,
        Err(_) => return 1,
    };
    block_on(async {
        let mut ids = Vec::new();
        for (i, thin) in [false, true, false].into_iter().enumerate() {
            match bs
                .create_blob(BlobOptions {
                    num_clusters: 2 + i as u64,
                    thin_provision: thin,
                    xattrs: vec![("k".into(), vec![i as u8; 2000])],
                })
                .await
            {
                Ok(id) => ids.push(id),
                Err(_) => errors.set(errors.get() + 1),
            }
        }
        for (i, &id) in ids.iter().enumerate() {
            let b = match bs.open_blob(id).await {
                Ok(b) => b,
                Err(_) => {
                    errors.set(errors.get() + 1);
                    continue;
                }
            };
            let data = common::pattern(i as u64, 3 * unit);
            note(b.write(1, common::buf(&data)).await.map(|_| ()));
            note(b.resize(5).await);
            note(b.set_xattr("big", &vec![3; 3000]));
            note(b.set_xattr("big2", &vec![4; 3000]));
            note(b.sync_metadata().await);
            note(b.write_zeroes(2, 1).await);
            note(b.read(0, DmaBuf::new(4 * unit).unwrap()).await.map(|_| ()));
            note(b.resize(1).await);
            note(b.remove_xattr("big"));
            note(b.close().await);
        }
        // Snapshots and clones: every multi-blob path.
        if let Some(&id) = ids.get(2) {
            let r = bs.create_snapshot(id, vec![]).await;
            if trace {
                eprintln!("snapshot -> {r:?}");
            }
            if let Ok(sid) = r {
                let r = bs.create_clone(sid, vec![]).await;
                if trace {
                    eprintln!("clone -> {r:?}");
                }
                if let Ok(cid) = r {
                    if let Ok(c) = bs.open_blob(cid).await {
                        note(c.write(0, common::buf(&vec![9; unit])).await.map(|_| ()));
                        note(c.write_zeroes(1, 1).await);
                        note(c.decouple_parent().await);
                    }
                    note(bs.delete_blob(cid).await);
                } else {
                    errors.set(errors.get() + 1);
                }
                note(bs.delete_blob(sid).await);
                let r = bs.create_snapshot(id, vec![]).await;
                if trace {
                    eprintln!("snapshot -> {r:?}");
                }
                if let Ok(sid2) = r {
                    if let Ok(b) = bs.open_blob(id).await {
                        note(b.write(1, common::buf(&vec![8; unit])).await.map(|_| ()));
                        note(b.inflate().await);
                    }
                    note(bs.delete_blob(sid2).await);
                } else {
                    errors.set(errors.get() + 1);
                }
            } else {
                errors.set(errors.get() + 1);
            }
        }
        note(bs.set_super_blob(ids.first().copied()).await);
        if let Some(&id) = ids.first() {
            note(bs.delete_blob(id).await);
        }
        if let Some(&id) = ids.get(1) {
            if let Ok(b) = bs.open_blob(id).await {
                b.set_read_only();
                note(b.close().await);
            }
        }
    });
    note(block_on(bs.unload()));
    if let Ok(bs) = block_on(Blobstore::load(dev.clone(), LoadOptions::default())) {
        note(block_on(async {
            let id = bs.create_blob(BlobOptions::default()).await?;
            bs.delete_blob(id).await
        }));
    } else {
        errors.set(errors.get() + 1);
    }
    errors.get()
}

/// The store on `dev` loads, is consistent, and every blob reads.
fn loads_and_reads(dev: Arc<dyn BlockDevice>, what: &str) {
    let bs = match block_on(Blobstore::load(dev, LoadOptions::default())) {
        Ok(bs) => bs,
        // Nothing was ever made durable (init failed early).
        Err(blobstore::Error::NotABlobstore(_)) => return,
        Err(e) => panic!("{what}: load: {e}"),
    };
    let rep = block_on(bs.check()).unwrap();
    assert!(rep.is_consistent(), "{what}: {:?}", rep.problems);
    for id in bs.blob_ids() {
        block_on(async {
            let b = bs.open_blob(id).await.expect("open");
            if b.num_clusters() > 0 {
                b.read(0, DmaBuf::new(b.size_bytes() as usize).unwrap())
                    .await
                    .expect("read");
            }
        });
    }
}

#[test]
fn nth_io_errors_are_errors_and_the_store_still_loads() {
    let mut fired_total = 0;
    // A burst of 3 makes the clean-up after the first failure fail too.
    for (block, burst) in [(512u32, 1), (4096, 1), (512, 3), (4096, 3)] {
        for kind in [
            IoKind::Read,
            IoKind::Write,
            IoKind::Flush,
            IoKind::WriteZeroes,
        ] {
            for n in 1.. {
                // FAULT_ONLY=Flush:28:512:1 replays one case.
                let only = std::env::var("FAULT_ONLY").ok();
                if only.is_some_and(|o| o != format!("{kind:?}:{n}:{block}:{burst}")) {
                    if n > 500 {
                        break;
                    }
                    continue;
                }
                let mem = MemDevice::new(2 << 20, block).unwrap();
                let fault = FaultDevice::new(Arc::new(mem)).unwrap();
                let dev: Arc<dyn BlockDevice> = Arc::new(fault.clone());
                for k in 0..burst {
                    fault.fail_nth(kind, n + k);
                }
                let errors = workload(&dev, block as usize);
                let fired = fault.injected_failures();
                if fired == 0 {
                    assert_eq!(errors, 0, "{kind:?} #{n}: errors without a failure");
                    break;
                }
                fired_total += 1;
                assert!(
                    errors > 0,
                    "{kind:?} #{n} on {block}: the failure was swallowed"
                );
                fault.clear_failures();
                let what = format!("{kind:?} #{n} (burst {burst}) on {block}-byte blocks");
                loads_and_reads(dev.clone(), &format!("{what}, live"));
                let crashed = fault.after_crash(n).unwrap();
                loads_and_reads(Arc::new(crashed), &format!("{what}, after a crash"));
            }
        }
    }
    println!("injected I/O errors: {fired_total} failure points, 0 panics");
    assert!(fired_total > 100 || std::env::var_os("FAULT_ONLY").is_some());
}

/// Which delete [`every_failing_op_of_a_delete_leaves_a_store_that_loads`]
/// runs.
#[derive(Clone, Copy, Debug)]
enum Victim {
    /// A plain blob that is also the super blob, its clusters cleared with
    /// write-zeroes on delete.
    Plain,
    /// A snapshot (also the super blob) with exactly one clone: deleted into
    /// the clone, its clusters unmapped.
    Snapshot,
}

/// What a blob must hold: its data pattern seed and its xattrs.
struct Expect {
    id: blobstore::BlobId,
    data: Vec<u8>,
    xattrs: Vec<(String, Vec<u8>)>,
}

const DELETE_CLUSTERS: u64 = 3;

/// A store on a fault device holding the victim and three other blobs,
/// every blob with data and continuation-page xattrs, all closed and
/// synced. Returns the device, the store, the victim and the others.
fn delete_fixture(
    block: u32,
    victim: Victim,
) -> (
    FaultDevice,
    Arc<dyn BlockDevice>,
    Blobstore,
    Expect,
    Vec<Expect>,
) {
    let mem = MemDevice::new(4 << 20, block).unwrap();
    let fault = FaultDevice::new(Arc::new(mem)).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(fault.clone());
    let opts = BlobstoreOptions {
        cluster_size: CLUSTER,
        md_pages: Some(64),
        ..Default::default()
    };
    let bs = block_on(Blobstore::init(dev.clone(), opts)).unwrap();
    let len = DELETE_CLUSTERS as usize * CLUSTER as usize;
    let mut blobs: Vec<Expect> = Vec::new();
    block_on(async {
        for seed in 1..=4u64 {
            let xattrs = vec![
                ("a".to_string(), common::pattern(seed + 100, 3000)),
                ("b".to_string(), common::pattern(seed + 200, 3000)),
            ];
            let id = bs
                .create_blob(BlobOptions {
                    num_clusters: DELETE_CLUSTERS,
                    thin_provision: false,
                    xattrs: xattrs.clone(),
                })
                .await
                .unwrap();
            let b = bs.open_blob(id).await.unwrap();
            let data = common::pattern(seed, len);
            b.write(0, common::buf(&data)).await.unwrap();
            b.sync_metadata().await.unwrap();
            b.close().await.unwrap();
            blobs.push(Expect { id, data, xattrs });
        }
        let victim = match victim {
            Victim::Plain => {
                bs.set_clear_method(blobstore::ClearMethod::WriteZeroes);
                blobs.remove(0)
            }
            Victim::Snapshot => {
                bs.set_clear_method(blobstore::ClearMethod::Unmap);
                let origin = &mut blobs[0];
                let xattrs = vec![("s".to_string(), common::pattern(300, 3000))];
                let sid = bs.create_snapshot(origin.id, xattrs.clone()).await.unwrap();
                // The clone owns its first cluster; it reads the rest
                // through the snapshot, which gives them to it on delete.
                let b = bs.open_blob(origin.id).await.unwrap();
                let mine = common::pattern(400, CLUSTER as usize);
                b.write(0, common::buf(&mine)).await.unwrap();
                b.sync_metadata().await.unwrap();
                b.close().await.unwrap();
                let snap = Expect {
                    id: sid,
                    data: origin.data.clone(),
                    xattrs,
                };
                origin.data[..mine.len()].copy_from_slice(&mine);
                snap
            }
        };
        bs.set_super_blob(Some(victim.id)).await.unwrap();
        (fault, dev, bs, victim, blobs)
    })
}

/// The store on `dev` loads and is consistent, every other blob holds its
/// data and xattrs, and the victim is either gone or whole; returns whether
/// the victim is still there. `what` names the case in a failure.
fn delete_outcome(
    dev: Arc<dyn BlockDevice>,
    victim: &Expect,
    others: &[Expect],
    what: &str,
) -> bool {
    let bs = match block_on(Blobstore::load(dev, LoadOptions::default())) {
        Ok(bs) => bs,
        Err(e) => panic!("{what}: load: {e}"),
    };
    let rep = block_on(bs.check()).unwrap();
    assert!(rep.is_consistent(), "{what}: {:?}", rep.problems);
    let ids = bs.blob_ids();
    let whole = |e: &Expect| {
        block_on(async {
            let b = bs
                .open_blob(e.id)
                .await
                .unwrap_or_else(|err| panic!("{what}: open {}: {err}", e.id));
            let got = b
                .read(0, DmaBuf::new(e.data.len()).unwrap())
                .await
                .unwrap_or_else(|err| panic!("{what}: read {}: {err}", e.id));
            assert!(got[..] == e.data[..], "{what}: blob {} data differs", e.id);
            for (k, v) in &e.xattrs {
                assert_eq!(
                    b.get_xattr(k).as_ref(),
                    Some(v),
                    "{what}: blob {} xattr {k}",
                    e.id
                );
            }
            b.close().await.unwrap();
        })
    };
    for e in others {
        assert!(ids.contains(&e.id), "{what}: blob {} is gone", e.id);
        whole(e);
    }
    let there = ids.contains(&victim.id);
    if there {
        whole(victim);
    } else {
        assert_ne!(bs.super_blob(), Some(victim.id), "{what}: super blob gone");
    }
    block_on(bs.unload()).unwrap_or_else(|e| panic!("{what}: unload: {e}"));
    there
}

/// Every device operation of a delete fails in turn (the Nth one, once):
/// the delete reports the error, and afterwards the store loads, from the
/// live device after a clean unload and from crash images taken right after
/// the failure, with every other blob intact and the deleted one either
/// gone or whole (gone when the delete reported success). A retried delete
/// then succeeds for good.
#[test]
fn every_failing_op_of_a_delete_leaves_a_store_that_loads() {
    let (mut cases, mut errors) = (0, 0);
    // A burst of 3 makes the delete's own clean-up after the first failure
    // (writing the blob back) fail too.
    for (block, burst) in [(512u32, 1), (4096, 1), (512, 3)] {
        for victim in [Victim::Plain, Victim::Snapshot] {
            for kind in [
                IoKind::Read,
                IoKind::Write,
                IoKind::Flush,
                IoKind::WriteZeroes,
                IoKind::Unmap,
            ] {
                for n in 1.. {
                    let (fault, dev, bs, v, others) = delete_fixture(block, victim);
                    let arm = |f: &FaultDevice| (0..burst).for_each(|k| f.fail_nth(kind, n + k));
                    arm(&fault);
                    let res = block_on(bs.delete_blob(v.id));
                    fault.clear_failures();
                    if fault.injected_failures() == 0 {
                        res.unwrap();
                        break;
                    }
                    cases += 1;
                    let what = format!(
                        "{victim:?} delete, {kind:?} #{n} (burst {burst}) failing on {block}-byte blocks"
                    );
                    // Clearing freed clusters is best effort (they are
                    // zeroed again when handed out): a failure there leaves
                    // the delete done and reports no error.
                    let done = res.is_ok();
                    errors += usize::from(!done);
                    let crash = fault.crash_image().unwrap();
                    for retry in [false, true] {
                        let (dev, bs) = if retry {
                            // The same failure again, then a retry.
                            let (fault, dev, bs, _, _) = delete_fixture(block, victim);
                            arm(&fault);
                            assert_eq!(block_on(bs.delete_blob(v.id)).is_ok(), done, "{what}");
                            fault.clear_failures();
                            match block_on(bs.delete_blob(v.id)) {
                                Ok(()) | Err(blobstore::Error::NotFound(_)) => {}
                                Err(e) => panic!("{what}: retry: {e}"),
                            }
                            (dev, bs)
                        } else {
                            (dev.clone(), bs.clone())
                        };
                        block_on(bs.unload()).unwrap_or_else(|e| panic!("{what}: unload: {e}"));
                        let what = format!("{what}, retry {retry}, unloaded");
                        let there = delete_outcome(dev.clone(), &v, &others, &what);
                        assert!(
                            !((retry || done) && there),
                            "{what}: the delete (done: {done}) did not happen"
                        );
                        // Loads again after its own clean unload, the same way.
                        assert_eq!(
                            delete_outcome(dev, &v, &others, &what),
                            there,
                            "{what}: reload"
                        );
                    }
                    for seed in 0..4 {
                        let what = format!("{what}, crashed right after (seed {seed})");
                        let dev = Arc::new(crash.to_device(seed).unwrap());
                        let there = delete_outcome(dev, &v, &others, &what);
                        assert!(!(done && there), "{what}: a done delete did not last");
                    }
                }
            }
        }
    }
    println!("delete failure points: {cases}, {errors} of them reported");
    assert!(cases > 20 && errors > 10);
}

/// A blob whose delete failed, and whose writing back failed too, is written
/// back before the super block names it again: a crash right after
/// `set_super_blob` never leaves a super block naming a zeroed first page.
#[test]
fn a_half_deleted_blob_is_written_back_before_it_becomes_the_super_blob() {
    for block in [512u32, 4096] {
        let (fault, _dev, bs, v, others) = delete_fixture(block, Victim::Plain);
        block_on(bs.set_super_blob(None)).unwrap();
        // Flush 1 is the zeroed first page's; 2 and 3 fail the write-back.
        (1..=3).for_each(|n| fault.fail_nth(IoKind::Flush, n));
        assert!(block_on(bs.delete_blob(v.id)).is_err());
        assert_eq!(fault.injected_failures(), 2, "the write-back was tried");
        fault.clear_failures();
        block_on(bs.set_super_blob(Some(v.id))).unwrap();
        let crash = fault.crash_image().unwrap();
        for seed in 0..8 {
            let what = format!("{block}-byte blocks, crashed after set_super_blob (seed {seed})");
            let dev = Arc::new(crash.to_device(seed).unwrap());
            assert!(
                delete_outcome(dev, &v, &others, &what),
                "{what}: the blob is gone"
            );
        }
    }
}
