//! Injected I/O errors: the Nth read, write or flush of a workload fails.
//! Callers get errors, never a panic, and the store loads afterwards, both
//! from the live image (a restart after the error) and from a crash image.

mod common;

use std::sync::Arc;

use blobstore::{
    block_on, BlobOptions, Blobstore, BlobstoreOptions, BlockDevice, DmaBuf, FaultDevice, IoKind,
    LoadOptions, MemDevice,
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
