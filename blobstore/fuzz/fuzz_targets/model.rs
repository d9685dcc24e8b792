//! Model-based fuzzing: fuzzer bytes drive the blob API (create, write,
//! read, resize, delete, sync, snapshot, clone, inflate, decouple, reload)
//! against a `HashMap` model, on a `FaultDevice` that fails the Nth read,
//! write or flush. Until a failure fires, every result and every byte read
//! must match the model; after, nothing may panic, and the store must load
//! and check consistent both from the live image and after a crash.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use blobstore::testing::FaultDevice;
use blobstore::{
    block_on, BlobId, BlobOptions, Blobstore, BlobstoreOptions, BlockDevice, DmaBuf, Error,
    IoKind, LoadOptions, MemDevice,
};
use libfuzzer_sys::fuzz_target;

const CLUSTER: usize = 16 << 10;
const UNIT: usize = 512;

#[derive(Clone)]
struct M {
    data: Vec<u8>,
    ro: bool,
    parent: Option<BlobId>,
}

struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
}

fn pick(model: &HashMap<BlobId, M>, i: u8) -> Option<BlobId> {
    let mut ids: Vec<BlobId> = model.keys().copied().collect();
    ids.sort();
    (!ids.is_empty()).then(|| ids[i as usize % ids.len()])
}

fuzz_target!(|data: &[u8]| {
    let mut r = Bytes(data);
    let mem = MemDevice::new(1 << 20, 512).unwrap();
    let fault = FaultDevice::new(Arc::new(mem)).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(fault.clone());
    let mut bs = block_on(Blobstore::init(
        dev.clone(),
        BlobstoreOptions {
            cluster_size: CLUSTER as u32,
            md_pages: Some(32),
            ..Default::default()
        },
    ))
    .unwrap();
    // Up to two injected failures.
    for _ in 0..2 {
        let (Some(k), Some(n)) = (r.next(), r.next()) else {
            return;
        };
        let kind = match k % 5 {
            0 => continue,
            1 => IoKind::Read,
            2 => IoKind::Write,
            3 => IoKind::Flush,
            _ => IoKind::WriteZeroes,
        };
        fault.fail_nth(kind, n as u64 + 1);
    }
    let mut model: HashMap<BlobId, M> = HashMap::new();
    let mut gone: HashSet<BlobId> = HashSet::new();
    let mut stamp = 1u8;
    while let (Some(op), Some(a), Some(b)) = (r.next(), r.next(), r.next()) {
        // Until a failure fires (this op's included), results are exact.
        let exact_now = || fault.injected_failures() == 0;
        let clones = |m: &HashMap<BlobId, M>, id: BlobId| {
            m.values().filter(|x| x.parent == Some(id)).count()
        };
        match op % 11 {
            0 => {
                let n = (a % 4) as u64;
                match block_on(bs.create_blob(BlobOptions {
                    num_clusters: n,
                    thin_provision: b & 1 == 1,
                    xattrs: vec![],
                })) {
                    Ok(id) => {
                        model.insert(
                            id,
                            M {
                                data: vec![0; n as usize * CLUSTER],
                                ro: false,
                                parent: None,
                            },
                        );
                    }
                    Err(Error::NoSpace(_)) => {}
                    Err(e) => assert!(!exact_now(), "create: {e}"),
                }
            }
            1 | 2 => {
                let Some(id) = pick(&model, a) else { continue };
                let m = model.get_mut(&id).unwrap();
                let units = m.data.len() / UNIT;
                if units == 0 {
                    continue;
                }
                let off = (b as usize * 7) % units;
                let len = (1 + (a as usize % 9)).min(units - off);
                stamp = stamp.wrapping_add(1).max(1);
                let bytes = vec![stamp; len * UNIT];
                let res = block_on(async {
                    let h = bs.open_blob(id).await?;
                    if op % 11 == 1 {
                        h.write(off as u64, DmaBuf::from_slice(&bytes)?).await?;
                    } else {
                        h.write_zeroes(off as u64, len as u64).await?;
                    }
                    Ok::<(), Error>(())
                });
                match res {
                    Ok(()) => {
                        let fill = if op % 11 == 1 { stamp } else { 0 };
                        m.data[off * UNIT..(off + len) * UNIT].fill(fill);
                    }
                    Err(Error::ReadOnly(_)) if m.ro => {}
                    Err(Error::NoSpace(_)) => {}
                    Err(e) => assert!(!exact_now(), "write: {e}"),
                }
            }
            3 => {
                let Some(id) = pick(&model, a) else { continue };
                let res = block_on(async {
                    let h = bs.open_blob(id).await?;
                    if h.size_bytes() == 0 {
                        return Ok(Vec::new());
                    }
                    Ok::<_, Error>(
                        h.read(0, DmaBuf::new(h.size_bytes() as usize)?)
                            .await?
                            .to_vec(),
                    )
                });
                match res {
                    Ok(got) => {
                        if exact_now() {
                            assert!(got == model[&id].data, "blob {id} reads wrong data");
                        }
                    }
                    Err(e) => assert!(!exact_now(), "read: {e}"),
                }
            }
            4 => {
                let Some(id) = pick(&model, a) else { continue };
                let n = (b % 5) as usize;
                let res = block_on(async { bs.open_blob(id).await?.resize(n as u64).await });
                let inherit = match model[&id].parent {
                    Some(p) => model[&p].data.clone(),
                    None => Vec::new(),
                };
                let m = model.get_mut(&id).unwrap();
                match res {
                    Ok(()) => {
                        // Regrown clusters of a clone read its parent again.
                        let old = m.data.len();
                        m.data.resize(n * CLUSTER, 0);
                        for i in old..m.data.len().min(inherit.len()) {
                            m.data[i] = inherit[i];
                        }
                    }
                    Err(Error::ReadOnly(_)) if m.ro => {}
                    Err(Error::NoSpace(_)) => {}
                    Err(e) => assert!(!exact_now(), "resize: {e}"),
                }
            }
            5 => {
                let Some(id) = pick(&model, a) else { continue };
                let n = clones(&model, id);
                match block_on(bs.delete_blob(id)) {
                    Ok(()) => {
                        assert!(!exact_now() || n <= 1, "deleted a snapshot with {n} clones");
                        let m = model.remove(&id).unwrap();
                        for x in model.values_mut().filter(|x| x.parent == Some(id)) {
                            x.parent = m.parent;
                        }
                        gone.insert(id);
                    }
                    Err(Error::Busy(_)) if n > 1 => {}
                    Err(e) => assert!(!exact_now(), "delete: {e}"),
                }
            }
            6 => {
                let Some(id) = pick(&model, a) else { continue };
                let res = block_on(async { bs.open_blob(id).await?.sync_metadata().await });
                if let Err(e) = res {
                    assert!(!exact_now(), "sync: {e}");
                }
            }
            7 => {
                let Some(id) = pick(&model, a) else { continue };
                match block_on(bs.create_snapshot(id, vec![])) {
                    Ok(sid) => {
                        let m = model.get_mut(&id).unwrap();
                        let snap = M {
                            data: m.data.clone(),
                            ro: true,
                            parent: m.parent,
                        };
                        m.parent = Some(sid);
                        model.insert(sid, snap);
                    }
                    Err(Error::InvalidArgument(_)) if model[&id].ro => {}
                    Err(Error::NoSpace(_)) => {}
                    Err(e) => assert!(!exact_now(), "snapshot: {e}"),
                }
            }
            8 => {
                let Some(id) = pick(&model, a) else { continue };
                match block_on(bs.create_clone(id, vec![])) {
                    Ok(cid) => {
                        let data = model[&id].data.clone();
                        model.insert(
                            cid,
                            M {
                                data,
                                ro: false,
                                parent: Some(id),
                            },
                        );
                    }
                    Err(Error::InvalidArgument(_)) if !model[&id].ro => {}
                    Err(Error::NoSpace(_)) => {}
                    Err(e) => assert!(!exact_now(), "clone: {e}"),
                }
            }
            9 => {
                let Some(id) = pick(&model, a) else { continue };
                let inflate = b & 1 == 0;
                let res = block_on(async {
                    let h = bs.open_blob(id).await?;
                    if inflate {
                        h.inflate().await
                    } else {
                        h.decouple_parent().await
                    }
                });
                let parent = model[&id].parent;
                match res {
                    Ok(()) => {
                        let pp = parent.and_then(|p| model[&p].parent);
                        model.get_mut(&id).unwrap().parent = if inflate { None } else { pp };
                    }
                    Err(Error::ReadOnly(_)) if model[&id].ro => {}
                    Err(Error::InvalidArgument(_)) if !inflate && parent.is_none() => {}
                    Err(Error::NoSpace(_)) => {}
                    Err(e) => assert!(!exact_now(), "inflate/decouple: {e}"),
                }
            }
            _ => {
                // Restart: unload, or sync everything and just drop.
                if a & 1 == 1 {
                    for &id in model.keys() {
                        let res = block_on(async { bs.open_blob(id).await?.sync_metadata().await });
                        if let Err(e) = res {
                            assert!(!exact_now(), "sync: {e}");
                        }
                    }
                }
                let old = bs.clone();
                let unload = if a & 1 == 0 {
                    block_on(old.unload())
                } else {
                    drop(old);
                    Ok(())
                };
                if let Err(e) = unload {
                    assert!(!exact_now(), "unload: {e}");
                }
                match block_on(Blobstore::load(dev.clone(), LoadOptions::default())) {
                    Ok(b) => bs = b,
                    Err(e) => {
                        assert!(!exact_now(), "load: {e}");
                        break;
                    }
                }
            }
        }
    }
    let _ = gone;
    drop(bs);
    fault.clear_failures();
    let live: Arc<dyn BlockDevice> = fault.inner().clone();
    consistent_after(live, "live");
    let crashed: Arc<dyn BlockDevice> = Arc::new(fault.after_crash(data.len() as u64).unwrap());
    consistent_after(crashed, "after a crash");
});

/// The store on `dev` loads and checks consistent.
fn consistent_after(dev: Arc<dyn BlockDevice>, what: &str) {
    let bs = block_on(Blobstore::load(dev, LoadOptions::default()))
        .unwrap_or_else(|e| panic!("{what}: load: {e}"));
    let rep = block_on(bs.check()).unwrap();
    assert!(rep.is_consistent(), "{what}: {:?}", rep.problems);
}
