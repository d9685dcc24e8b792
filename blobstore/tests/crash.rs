//! Crash consistency, proven at thousands of crash points.
//!
//! Each run drives a random workload (create, resize, write, write-zeroes,
//! unmap, xattrs, read-only, sync, close, delete, super blob, snapshot,
//! clone, unload/reload) against a model, on a [`FaultDevice`]. Crash images
//! are captured at random device operations without stopping the run (each
//! is one crash point), and every run ends in a real crash, after which
//! every I/O fails. Each image is loaded and checked:
//! - the store loads and [`Blobstore::check`] finds no problem and no leak;
//! - every blob's metadata is the one its last completed sync wrote, or the
//!   one the operation in progress was writing;
//! - every io unit reads a value the model allows: the last value known
//!   durable (written, then flushed, with the blob's metadata synced) or a
//!   later one; never another blob's data, never garbage.
//!
//! `CRASH_POINTS=N` sets how many points to run (default 10,000);
//! `CRASH_SEED=S` replays one run.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use blobstore::testing::FaultDevice;
use blobstore::{
    block_on, Blob, BlobId, BlobOptions, Blobstore, BlobstoreOptions, BlockDevice, DmaBuf, Error,
    LoadOptions, MemDevice,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The fixed seed list: run `i` uses `SEEDS[i % len] + (i / len) << 32`.
const SEEDS: [u64; 8] = [
    0x0001,
    0xC0FFEE,
    0xBADC0DE,
    0x5EED_0004,
    0xDEAD_BEEF,
    0x1234_5678,
    0x0F0F_0F0F,
    0x7777,
];
const DEFAULT_POINTS: u64 = 10_000;
const CLUSTER: u32 = 16 << 10;
const DEVICE: u64 = 2 << 20;
const MD_PAGES: u64 = 64;
const STEPS: usize = 48;

#[derive(Clone, PartialEq)]
struct Md {
    clusters: u64,
    thin: bool,
    ro: bool,
    xattrs: BTreeMap<String, Vec<u8>>,
    /// The parent; [`UNKNOWN`] for a blob whose id a failed operation
    /// never returned.
    parent: Option<BlobId>,
}

/// Stands for the id of the blob a crashed snapshot or clone was making.
const UNKNOWN: BlobId = BlobId(u64::MAX);

/// A blob a crashed create, snapshot or clone was making: its metadata and
/// the values its units may read.
type Unknown = (Md, Vec<Vec<(u64, u64)>>);

impl std::fmt::Debug for Md {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{{{} clusters{}{}, xattrs",
            self.clusters,
            if self.thin { " thin" } else { "" },
            if self.ro { " ro" } else { "" }
        )?;
        if let Some(p) = self.parent {
            write!(f, " parent {p}")?;
        }
        for (k, v) in &self.xattrs {
            write!(f, " {k}:{}b/{:08x}", v.len(), crc(v))?;
        }
        write!(f, "}}")
    }
}

fn crc(v: &[u8]) -> u32 {
    v.iter().fold(0x811C_9DC5u32, |h, &b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    })
}

#[derive(Clone, Debug)]
struct BlobModel {
    live: Md,
    durable: Md,
    /// The live metadata differs from the durable one (a sync is due).
    dirty: bool,
    /// Per live cluster: allocated (always true for thick blobs).
    alloc: Vec<bool>,
    /// Per io unit: the values it may read after a crash, as
    /// (value, write ordinal after which it was written); the first is the
    /// last one known durable. A clone's units hold what it reads, its
    /// parent's data included.
    units: Vec<Vec<(u64, u64)>>,
    /// Other metadata a crash in the current operation may leave.
    also: Vec<Md>,
}

#[derive(Clone, Debug, Default)]
struct Model {
    blobs: BTreeMap<BlobId, BlobModel>,
    super_blob: Option<BlobId>,
}

impl Model {
    /// Drops candidates that can no longer be what a crash leaves: once a
    /// blob's metadata is synced and a value's write is durable, nothing
    /// older can come back.
    fn settle(&mut self, watermark: u64, upc: u64) {
        for b in self.blobs.values_mut() {
            b.also.clear();
        }
        for b in self.blobs.values_mut().filter(|b| !b.dirty) {
            b.units.truncate((b.live.clusters * upc) as usize);
            for u in &mut b.units {
                if let Some(i) = u.iter().rposition(|&(_, o)| o <= watermark) {
                    u.drain(..i);
                }
            }
        }
    }
}

/// Fills one io unit with value `v` (0 = zeroes).
fn stamp(v: u64, unit: usize, out: &mut [u8]) {
    for w in out[..unit].chunks_mut(8) {
        w.copy_from_slice(&v.to_le_bytes());
    }
}

/// The value an io unit holds, or None for bytes no write produced.
fn unstamp(b: &[u8]) -> Option<u64> {
    let v = u64::from_le_bytes(b[..8].try_into().unwrap());
    b.chunks(8).all(|w| w == v.to_le_bytes()).then_some(v)
}

struct Stats {
    /// Operations that completed, by kind.
    done: Mutex<BTreeMap<String, u64>>,
    points: AtomicU64,
    crashes: AtomicU64,
    violations: Mutex<Vec<String>>,
}

#[derive(Clone, Copy)]
struct Geo {
    block: u32,
    upc: u64,
}

impl Geo {
    fn unit(&self) -> usize {
        self.block as usize
    }
}

/// Loads `dev` and checks it against the model before and after the
/// operation that was in progress. `unknown` is the metadata of a blob a
/// create in progress was making (its id unknown).
fn verify(
    dev: MemDevice,
    geo: Geo,
    before: &Model,
    after: &Model,
    unknown: Option<&Unknown>,
) -> Result<(), String> {
    let dev: Arc<dyn BlockDevice> = Arc::new(dev);
    let bs = block_on(Blobstore::load(dev, LoadOptions::default()))
        .map_err(|e| format!("load failed: {e}"))?;
    let rep = block_on(bs.check()).map_err(|e| format!("check failed: {e}"))?;
    if !rep.is_consistent() {
        return Err(format!("check: {:?}", rep.problems));
    }
    if !rep.leaked_clusters.is_empty() || !rep.leaked_md_pages.is_empty() {
        return Err(format!(
            "leaks: clusters {:?}, md pages {:?}",
            rep.leaked_clusters, rep.leaked_md_pages
        ));
    }
    let sb = bs.super_blob();
    if sb != before.super_blob && sb != after.super_blob {
        return Err(format!(
            "super blob {sb:?}, expected {:?} or {:?}",
            before.super_blob, after.super_blob
        ));
    }
    let loaded = bs.blob_ids();
    let mut ids: Vec<BlobId> = before
        .blobs
        .keys()
        .chain(after.blobs.keys())
        .copied()
        .collect();
    ids.sort();
    ids.dedup();
    let extra: Vec<BlobId> = loaded
        .iter()
        .filter(|id| !ids.contains(id))
        .copied()
        .collect();
    let unknown_id = match (&extra[..], unknown) {
        ([], _) => None,
        ([id], Some((md, units))) => {
            let (got, data) = read_blob(&bs, *id, geo)?;
            if &got != md {
                return Err(format!("half-made blob {id}: {got:?}, expected {md:?}"));
            }
            check_units(*id, &data, units)?;
            Some(*id)
        }
        _ => return Err(format!("blobs {extra:?} appeared from nowhere")),
    };
    // The unknown blob's id, wherever the model names it.
    let known = |md: &Md| {
        let mut md = md.clone();
        if md.parent == Some(UNKNOWN) {
            md.parent = unknown_id.or(Some(UNKNOWN));
        }
        md
    };
    for id in ids {
        let mut states: Vec<Option<Md>> = [before, after]
            .iter()
            .map(|m| m.blobs.get(&id).map(|b| known(&b.durable)))
            .collect();
        if let Some(b) = after.blobs.get(&id) {
            states.extend(b.also.iter().map(|m| Some(known(m))));
        }
        if !loaded.contains(&id) {
            if states.contains(&None) {
                continue;
            }
            return Err(format!("blob {id} is lost"));
        }
        let (got, data) = read_blob(&bs, id, geo)?;
        if !states.contains(&Some(got.clone())) {
            return Err(format!(
                "blob {id}: metadata {got:?}, expected one of {states:?}"
            ));
        }
        let units = &after
            .blobs
            .get(&id)
            .or(before.blobs.get(&id))
            .expect("in one of the models")
            .units;
        check_units(id, &data, units)?;
    }
    Ok(())
}

/// Every unit read one of the values the model allows.
fn check_units(id: BlobId, data: &[u64], units: &[Vec<(u64, u64)>]) -> Result<(), String> {
    for (u, v) in data.iter().enumerate() {
        let Some(cands) = units.get(u) else {
            return Err(format!("blob {id}: unit {u} beyond the model"));
        };
        if !cands.iter().any(|&(c, _)| c == *v) {
            return Err(format!(
                "blob {id} unit {u}: read value {v:#x}, allowed {:?}",
                cands.iter().map(|c| c.0).collect::<Vec<_>>()
            ));
        }
    }
    Ok(())
}

/// A blob's metadata and the value of each of its io units.
fn read_blob(bs: &Blobstore, id: BlobId, geo: Geo) -> Result<(Md, Vec<u64>), String> {
    block_on(async {
        let b = bs
            .open_blob(id)
            .await
            .map_err(|e| format!("open {id}: {e}"))?;
        let md = Md {
            clusters: b.num_clusters(),
            thin: b.is_thin(),
            ro: b.is_read_only(),
            parent: b.parent(),
            xattrs: b
                .xattr_names()
                .into_iter()
                .map(|n| {
                    let v = b.get_xattr(&n).unwrap();
                    (n, v)
                })
                .collect(),
        };
        let mut vals = Vec::new();
        if md.clusters > 0 {
            let buf = DmaBuf::new(b.size_bytes() as usize).unwrap();
            let buf = b
                .read(0, buf)
                .await
                .map_err(|e| format!("read {id}: {e}"))?;
            for (u, chunk) in buf.chunks(geo.unit()).enumerate() {
                vals.push(unstamp(chunk).ok_or_else(|| format!("blob {id} unit {u}: garbage"))?);
            }
        }
        Ok((md, vals))
    })
}

/// One operation of the workload.
#[derive(Debug, Clone)]
enum Op {
    Create {
        clusters: u64,
        thin: bool,
        xattr: bool,
    },
    Resize(usize, u64),
    Write(usize, u64, u64),
    Zero(usize, u64, u64, bool),
    SetXattr(usize, u8, usize),
    RemoveXattr(usize, u8),
    Sync(usize),
    Close(usize),
    DropHandle(usize),
    Delete(usize),
    ReadOnly(usize),
    SetSuper(Option<usize>),
    Read(usize),
    Unload,
    Reopen,
    Snapshot(usize),
    Clone(usize),
    Inflate(usize),
    Decouple(usize),
}

struct Run {
    seed: u64,
    rng: StdRng,
    geo: Geo,
    fault: FaultDevice,
    dev: Arc<dyn BlockDevice>,
    bs: Option<Blobstore>,
    handles: HashMap<BlobId, Blob>,
    model: Model,
    next_value: u64,
}

/// Why an operation did not do what the model said.
enum Outcome {
    Done,
    /// Refused with no effect (no space, read-only, bad argument).
    Refused,
    /// The device failed (a crash).
    Failed(Error),
    /// A create, snapshot or clone failed; the blob it was making.
    CreateFailed(Error, Unknown),
}

impl Run {
    fn new(seed: u64, old_image: Option<&[u8]>) -> Run {
        let block = if seed & 1 == 0 { 4096 } else { 512 };
        let mem = MemDevice::new(DEVICE, block).unwrap();
        if let Some(img) = old_image {
            mem.store_bytes(0, img);
        }
        let fault = FaultDevice::new(Arc::new(mem)).unwrap();
        let dev: Arc<dyn BlockDevice> = Arc::new(fault.clone());
        Run {
            seed,
            rng: StdRng::seed_from_u64(seed),
            geo: Geo {
                block,
                upc: (CLUSTER / block) as u64,
            },
            fault,
            dev,
            bs: None,
            handles: HashMap::new(),
            model: Model::default(),
            next_value: seed << 20 | 1,
        }
    }

    fn bs(&self) -> &Blobstore {
        self.bs.as_ref().expect("store loaded")
    }

    fn handle(&mut self, id: BlobId) -> Result<&Blob, Error> {
        if !self.handles.contains_key(&id) {
            let b = block_on(self.bs().open_blob(id))?;
            self.handles.insert(id, b);
        }
        Ok(&self.handles[&id])
    }

    /// A blob for which `want` holds, else any blob.
    fn pick_where(&mut self, i: usize, want: impl Fn(&BlobModel) -> bool) -> Option<BlobId> {
        let some: Vec<BlobId> = self
            .model
            .blobs
            .iter()
            .filter(|(_, b)| want(b))
            .map(|(&id, _)| id)
            .collect();
        if some.is_empty() {
            self.pick(i)
        } else {
            Some(some[i % some.len()])
        }
    }

    fn pick(&mut self, i: usize) -> Option<BlobId> {
        let n = self.model.blobs.len();
        (n > 0).then(|| *self.model.blobs.keys().nth(i % n).unwrap())
    }

    fn random_op(&mut self) -> Op {
        let r = &mut self.rng;
        let i = r.gen_range(0..1000);
        let few = self.model.blobs.len() < 2 && r.gen_bool(0.5);
        match if few { 0 } else { r.gen_range(0..100) } {
            0..=9 if self.model.blobs.len() < 6 => Op::Create {
                clusters: r.gen_range(0..=3),
                thin: r.gen_bool(0.5),
                xattr: r.gen_bool(0.3),
            },
            10..=19 => Op::Resize(i, r.gen_range(0..=4)),
            20..=44 => Op::Write(i, r.gen_range(0..10_000), r.gen_range(1..=6)),
            45..=49 => Op::Zero(i, r.gen_range(0..10_000), r.gen_range(1..=4), r.gen()),
            50..=57 => Op::SetXattr(i, r.gen_range(0..4), r.gen_range(0..3000)),
            58..=60 => Op::RemoveXattr(i, r.gen_range(0..4)),
            61..=69 => Op::Sync(i),
            70..=74 => Op::Close(i),
            75..=77 => Op::DropHandle(i),
            78..=83 => Op::Delete(i),
            84 => Op::ReadOnly(i),
            85..=87 => Op::SetSuper(r.gen_bool(0.8).then_some(i)),
            88..=91 => Op::Read(i),
            92..=94 => Op::Snapshot(i),
            95 | 96 => Op::Clone(i),
            97 => Op::Inflate(i),
            98 => Op::Decouple(i),
            _ if r.gen_bool(0.5) => Op::Unload,
            _ => Op::Reopen,
        }
    }

    fn write_ordinal(&self) -> u64 {
        self.fault.writes_submitted()
    }

    /// Runs one op; updates the model to what it would do if it completes.
    fn apply(&mut self, op: &Op) -> Outcome {
        let geo = self.geo;
        let upc = geo.upc;
        let unit = geo.unit();
        macro_rules! blob_or_done {
            ($i:expr) => {
                match self.pick($i) {
                    Some(id) => id,
                    None => return Outcome::Done,
                }
            };
        }
        macro_rules! io {
            ($e:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(e) => return Outcome::Failed(e),
                }
            };
        }
        match *op {
            Op::Create {
                clusters,
                thin,
                xattr,
            } => {
                let xattrs: BTreeMap<String, Vec<u8>> = if xattr {
                    [("name".to_string(), vec![7u8; 100])].into()
                } else {
                    BTreeMap::new()
                };
                let md = Md {
                    clusters,
                    thin,
                    ro: false,
                    xattrs: xattrs.clone(),
                    parent: None,
                };
                let res = block_on(self.bs().create_blob(BlobOptions {
                    num_clusters: clusters,
                    thin_provision: thin,
                    xattrs: xattrs.into_iter().collect(),
                }));
                let id = match res {
                    Ok(id) => id,
                    Err(Error::NoSpace(_)) => return Outcome::Refused,
                    Err(e) => {
                        let units = vec![vec![(0, 0)]; (clusters * upc) as usize];
                        return Outcome::CreateFailed(e, (md, units));
                    }
                };
                let w = self.write_ordinal();
                self.model.blobs.insert(
                    id,
                    BlobModel {
                        live: md.clone(),
                        durable: md,
                        dirty: false,
                        alloc: vec![!thin; clusters as usize],
                        units: vec![vec![(0, w)]; (clusters * upc) as usize],
                        also: Vec::new(),
                    },
                );
            }
            Op::Resize(i, n) => {
                let id = blob_or_done!(i);
                let b = io!(self.handle(id));
                match block_on(b.resize(n)) {
                    Ok(()) => {}
                    Err(Error::NoSpace(_)) | Err(Error::ReadOnly(_)) => return Outcome::Refused,
                    Err(e) => return Outcome::Failed(e),
                }
                let w = self.write_ordinal();
                // Regrown clusters a clone does not own read its parent.
                let inherited: Vec<u64> = match self.model.blobs[&id].live.parent {
                    Some(p) => self.model.blobs[&p]
                        .units
                        .iter()
                        .map(|c| c.last().unwrap().0)
                        .collect(),
                    None => Vec::new(),
                };
                let m = self.model.blobs.get_mut(&id).unwrap();
                let old = m.live.clusters;
                m.live.clusters = n;
                m.dirty = true;
                m.alloc.resize(n as usize, !m.live.thin);
                if n > old {
                    for u in old * upc..n * upc {
                        let v = inherited.get(u as usize).copied().unwrap_or(0);
                        match m.units.get_mut(u as usize) {
                            Some(c) => c.push((v, w)),
                            None => m.units.push(vec![(v, w)]),
                        }
                    }
                }
            }
            Op::Write(i, off, len) | Op::Zero(i, off, len, _) => {
                let id = blob_or_done!(i);
                let size = self.model.blobs[&id].live.clusters * upc;
                if size == 0 {
                    return Outcome::Done;
                }
                let off = off % size;
                let len = len.min(size - off);
                let values: Vec<u64> = match op {
                    Op::Write(..) => (0..len)
                        .map(|_| {
                            self.next_value += 1;
                            self.next_value
                        })
                        .collect(),
                    _ => vec![0; len as usize],
                };
                let b = io!(self.handle(id));
                let res = match *op {
                    Op::Write(..) => {
                        let mut bytes = vec![0u8; len as usize * unit];
                        for (k, v) in values.iter().enumerate() {
                            stamp(*v, unit, &mut bytes[k * unit..]);
                        }
                        block_on(b.write(off, DmaBuf::from_slice(&bytes).unwrap())).map(|_| ())
                    }
                    Op::Zero(.., true) => block_on(b.unmap(off, len)),
                    _ => block_on(b.write_zeroes(off, len)),
                };
                match res {
                    Ok(()) => {}
                    Err(Error::NoSpace(_)) | Err(Error::ReadOnly(_)) => return Outcome::Refused,
                    Err(e) => {
                        // Model it as done: the crash check allows both.
                        self.model_write(id, off, &values, matches!(op, Op::Write(..)));
                        return Outcome::Failed(e);
                    }
                }
                self.model_write(id, off, &values, matches!(op, Op::Write(..)));
            }
            Op::SetXattr(i, k, len) => {
                let id = blob_or_done!(i);
                let name = format!("x{k}");
                let value = common::pattern(len as u64, len);
                let b = io!(self.handle(id));
                match b.set_xattr(&name, &value) {
                    Ok(()) => {}
                    Err(Error::ReadOnly(_)) => return Outcome::Refused,
                    Err(e) => return Outcome::Failed(e),
                }
                let m = self.model.blobs.get_mut(&id).unwrap();
                m.live.xattrs.insert(name, value);
                m.dirty = true;
            }
            Op::RemoveXattr(i, k) => {
                let id = blob_or_done!(i);
                let name = format!("x{k}");
                let b = io!(self.handle(id));
                match b.remove_xattr(&name) {
                    Ok(()) => {}
                    Err(Error::ReadOnly(_)) | Err(Error::InvalidArgument(_)) => {
                        return Outcome::Refused
                    }
                    Err(e) => return Outcome::Failed(e),
                }
                let m = self.model.blobs.get_mut(&id).unwrap();
                m.live.xattrs.remove(&name);
                m.dirty = true;
            }
            Op::Sync(i) | Op::Close(i) => {
                let id = blob_or_done!(i);
                let res = if matches!(op, Op::Close(_)) {
                    io!(self.handle(id));
                    let b = self.handles.remove(&id).unwrap();
                    block_on(b.close())
                } else {
                    let b = io!(self.handle(id));
                    block_on(b.sync_metadata())
                };
                self.model_synced(id);
                io!(res);
            }
            Op::DropHandle(i) => {
                let id = blob_or_done!(i);
                self.handles.remove(&id);
            }
            Op::Delete(i) => {
                let id = blob_or_done!(i);
                self.handles.remove(&id);
                let res = block_on(self.bs().delete_blob(id));
                if let Err(Error::Busy(_)) = res {
                    return Outcome::Refused;
                }
                let clones: Vec<BlobId> = self
                    .model
                    .blobs
                    .iter()
                    .filter(|(_, b)| b.live.parent == Some(id))
                    .map(|(&c, _)| c)
                    .collect();
                assert!(
                    clones.len() <= 1,
                    "seed {}: deleted a snapshot with clones",
                    self.seed
                );
                let gone = self.model.blobs.remove(&id).unwrap();
                if let Some(&c) = clones.first() {
                    // The clone takes the snapshot's clusters and parent.
                    let m = self.model.blobs.get_mut(&c).unwrap();
                    for (a, &s) in m.alloc.iter_mut().zip(&gone.alloc) {
                        *a |= s;
                    }
                    m.live.parent = gone.live.parent;
                    m.durable = m.live.clone();
                    m.dirty = false;
                }
                if self.model.super_blob == Some(id) {
                    self.model.super_blob = None;
                }
                io!(res);
            }
            Op::ReadOnly(i) => {
                let id = blob_or_done!(i);
                let b = io!(self.handle(id));
                b.set_read_only();
                let res = block_on(b.sync_metadata());
                let m = self.model.blobs.get_mut(&id).unwrap();
                m.live.ro = true;
                self.model_synced(id);
                io!(res);
            }
            Op::SetSuper(i) => {
                let id = match i {
                    Some(i) => Some(blob_or_done!(i)),
                    None => None,
                };
                let res = block_on(self.bs().set_super_blob(id));
                self.model.super_blob = id;
                io!(res);
            }
            Op::Read(i) => {
                let id = blob_or_done!(i);
                let (md, data) = match read_blob(self.bs(), id, geo) {
                    Ok(x) => x,
                    Err(e) => return Outcome::Failed(Error::InvalidArgument(e)),
                };
                let m = &self.model.blobs[&id];
                assert_eq!(md, m.live, "seed {}: live metadata of {id}", self.seed);
                for (u, v) in data.iter().enumerate() {
                    let last = m.units[u].last().unwrap().0;
                    assert_eq!(*v, last, "seed {}: live read of {id} unit {u}", self.seed);
                }
            }
            Op::Snapshot(i) => {
                let id = blob_or_done!(i);
                // Sync first, so a refused snapshot changes nothing more.
                let h = io!(self.handle(id));
                let res = block_on(h.sync_metadata());
                self.model_synced(id);
                io!(res);
                let b = &self.model.blobs[&id];
                let xattrs: BTreeMap<String, Vec<u8>> = [("snap".to_string(), vec![1])].into();
                let smd = Md {
                    clusters: b.live.clusters,
                    thin: b.live.thin,
                    ro: true,
                    xattrs: xattrs.clone(),
                    parent: b.live.parent,
                };
                let snap = BlobModel {
                    live: smd.clone(),
                    durable: smd.clone(),
                    dirty: false,
                    alloc: b.alloc.clone(),
                    units: b.units.clone(),
                    also: Vec::new(),
                };
                let res = block_on(self.bs().create_snapshot(id, xattrs.into_iter().collect()));
                let sid = match res {
                    Ok(sid) => sid,
                    Err(Error::InvalidArgument(_)) | Err(Error::NoSpace(_)) => {
                        return Outcome::Refused
                    }
                    Err(e) => {
                        self.model_snapshotted(id, UNKNOWN);
                        return Outcome::CreateFailed(e, (smd, snap.units));
                    }
                };
                self.model_snapshotted(id, sid);
                self.model.blobs.insert(sid, snap);
            }
            Op::Clone(i) => {
                let Some(sid) = self.pick_where(i, |b| b.live.ro) else {
                    return Outcome::Done;
                };
                let s = &self.model.blobs[&sid];
                let md = Md {
                    clusters: s.live.clusters,
                    thin: true,
                    ro: false,
                    xattrs: BTreeMap::new(),
                    parent: Some(sid),
                };
                let clone = BlobModel {
                    live: md.clone(),
                    durable: md.clone(),
                    dirty: false,
                    alloc: vec![false; s.live.clusters as usize],
                    units: s.units.clone(),
                    also: Vec::new(),
                };
                let cid = match block_on(self.bs().create_clone(sid, vec![])) {
                    Ok(cid) => cid,
                    Err(Error::InvalidArgument(_)) | Err(Error::NoSpace(_)) => {
                        return Outcome::Refused
                    }
                    Err(e) => return Outcome::CreateFailed(e, (md, clone.units)),
                };
                self.model.blobs.insert(cid, clone);
            }
            Op::Inflate(i) | Op::Decouple(i) => {
                let Some(id) = self.pick_where(i, |b| b.live.parent.is_some() && !b.live.ro) else {
                    return Outcome::Done;
                };
                let inflate = matches!(op, Op::Inflate(_));
                let b = io!(self.handle(id));
                let res = if inflate {
                    block_on(b.inflate())
                } else {
                    block_on(b.decouple_parent())
                };
                match res {
                    Err(Error::ReadOnly(_))
                    | Err(Error::InvalidArgument(_))
                    | Err(Error::NoSpace(_)) => return Outcome::Refused,
                    _ => {}
                }
                let parent = self.model.blobs[&id].live.parent;
                let (palloc, grandparent) = match parent {
                    Some(p) => {
                        let pm = &self.model.blobs[&p];
                        (pm.alloc.clone(), pm.live.parent)
                    }
                    None => (Vec::new(), None),
                };
                let m = self.model.blobs.get_mut(&id).unwrap();
                if inflate {
                    m.alloc.iter_mut().for_each(|a| *a = true);
                    m.live.parent = None;
                    m.live.thin = false;
                } else {
                    for (a, &p) in m.alloc.iter_mut().zip(&palloc) {
                        *a |= p;
                    }
                    m.live.parent = grandparent;
                }
                m.durable = m.live.clone();
                m.dirty = false;
                io!(res);
            }
            Op::Unload | Op::Reopen => {
                self.handles.clear();
                let ids: Vec<BlobId> = self.model.blobs.keys().copied().collect();
                let bs = self.bs.take().unwrap();
                if matches!(op, Op::Unload) {
                    let res = block_on(bs.unload());
                    ids.iter().for_each(|&id| self.model_synced(id));
                    io!(res);
                } else {
                    // A restart without power loss: sync what is dirty first
                    // (the model cannot say what an unsynced change undoes).
                    for &id in &ids {
                        let res = block_on(async { bs.open_blob(id).await?.close().await });
                        self.model_synced(id);
                        if let Err(e) = res {
                            self.bs = Some(bs);
                            return Outcome::Failed(e);
                        }
                    }
                    drop(bs);
                }
                let bs = io!(block_on(Blobstore::load(
                    self.dev.clone(),
                    LoadOptions::default()
                )));
                self.bs = Some(bs);
            }
        }
        Outcome::Done
    }

    /// The blob gave its clusters to snapshot `sid` and became its clone.
    fn model_snapshotted(&mut self, id: BlobId, sid: BlobId) {
        let m = self.model.blobs.get_mut(&id).unwrap();
        // The snapshot syncs the blob first: its live metadata may be what
        // a crash leaves.
        m.also.push(m.live.clone());
        m.alloc.iter_mut().for_each(|a| *a = false);
        m.live.thin = true;
        m.live.parent = Some(sid);
        m.durable = m.live.clone();
        m.dirty = false;
    }

    fn model_synced(&mut self, id: BlobId) {
        if let Some(m) = self.model.blobs.get_mut(&id) {
            m.durable = m.live.clone();
            m.dirty = false;
        }
    }

    fn model_write(&mut self, id: BlobId, off: u64, values: &[u64], is_write: bool) {
        let upc = self.geo.upc;
        let w = self.write_ordinal();
        let m = self.model.blobs.get_mut(&id).unwrap();
        // A clone zeroes by writing (copy-on-write), so it allocates too.
        let allocates = is_write || m.live.parent.is_some();
        let mut allocated = false;
        for (k, &v) in values.iter().enumerate() {
            let u = off as usize + k;
            m.units[u].push((v, w));
            let c = u / upc as usize;
            if allocates && !m.alloc[c] {
                m.alloc[c] = true;
                allocated = true;
            }
        }
        if allocated {
            // A thin allocation syncs the whole blob.
            m.durable = m.live.clone();
            m.dirty = false;
        }
    }
}

fn init_opts() -> BlobstoreOptions {
    BlobstoreOptions {
        cluster_size: CLUSTER,
        md_pages: Some(MD_PAGES),
        bstype: "crash".into(),
        // The crash runs init over an older store on purpose.
        force: true,
        ..Default::default()
    }
}

/// An image holding an older store with blobs and data, to init over.
fn old_store_image(block: u32) -> Vec<u8> {
    let mem = MemDevice::new(DEVICE, block).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(mem.clone());
    let mut o = init_opts();
    o.bstype = "old".into();
    let bs = block_on(Blobstore::init(dev, o)).unwrap();
    for i in 0..4u64 {
        let id = block_on(bs.create_blob(BlobOptions {
            num_clusters: 2,
            ..Default::default()
        }))
        .unwrap();
        let b = block_on(bs.open_blob(id)).unwrap();
        block_on(b.write(0, common::buf(&vec![0xEE ^ i as u8; CLUSTER as usize]))).unwrap();
    }
    drop(bs); // dirty: the next load rebuilds from these pages
    mem.snapshot()
}

/// Checks the images captured during one operation.
fn check_captures(
    run: &mut Run,
    before: &Model,
    after: &Model,
    unknown: Option<&Unknown>,
    stats: &Stats,
    violations: &mut Vec<String>,
) {
    let seed = run.seed;
    for (opno, img) in run.fault.take_captures() {
        stats.points.fetch_add(1, Ordering::Relaxed);
        let img_seed = seed ^ opno.wrapping_mul(0x9E37_79B9);
        let dev = img.to_device(img_seed).unwrap();
        if let Err(e) = verify(dev, run.geo, before, after, unknown) {
            violations.push(format!(
                "seed {seed:#x} crash before device op {opno} (image seed {img_seed:#x}): {e}"
            ));
        }
    }
}

/// One run of the workload, with its crash points.
fn run_one(seed: u64, old: &HashMap<u32, Vec<u8>>, stats: &Stats) {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xA5A5);
    let block = if seed & 1 == 0 { 4096 } else { 512 };
    let over_old = rng.gen_bool(0.2);
    let mut run = Run::new(seed, over_old.then(|| old[&block].as_slice()));
    // Crash points: random device operations, denser at the start so init
    // and the first metadata writes are covered often.
    let mut at = Vec::new();
    let mut n = 0u64;
    while n < 4000 {
        n += if n < 8 { 1 } else { rng.gen_range(1..=18) };
        at.push(n);
    }
    run.fault.capture_at(at).unwrap();
    let crash_step = rng.gen_range(0..=STEPS);
    let mut violations = Vec::new();
    // Init: before it the device holds nothing or the old store.
    let bs = block_on(Blobstore::init(run.dev.clone(), init_opts())).unwrap();
    for (opno, img) in run.fault.take_captures() {
        stats.points.fetch_add(1, Ordering::Relaxed);
        let dev: Arc<dyn BlockDevice> = Arc::new(img.to_device(seed ^ opno).unwrap());
        match block_on(Blobstore::load(dev, LoadOptions::default())) {
            Err(Error::NotABlobstore(_)) => {}
            Ok(bs) if bs.bstype() == "old" => {}
            Ok(bs) => {
                let rep = block_on(bs.check()).unwrap();
                if !bs.blob_ids().is_empty() || !rep.is_consistent() {
                    violations.push(format!(
                        "seed {seed:#x} crash in init before op {opno}: new store shows {} blobs {:?}",
                        bs.blob_ids().len(),
                        rep.problems
                    ));
                }
            }
            Err(e) => violations.push(format!(
                "seed {seed:#x} crash in init before op {opno}: load: {e}"
            )),
        }
    }
    run.bs = Some(bs);
    let mut crashed = false;
    for step in 0..=STEPS {
        if step == crash_step {
            run.fault.crash_after(rng.gen_range(1..=12));
        }
        let op = if step == STEPS {
            Op::Sync(0)
        } else {
            run.random_op()
        };
        let before = run.model.clone();
        let outcome = run.apply(&op);
        if matches!(outcome, Outcome::Done) {
            let name = format!("{op:?}");
            let name = name.split(['(', ' ']).next().unwrap_or("?").to_string();
            *stats.done.lock().unwrap().entry(name).or_default() += 1;
        }
        let (err, unknown) = match outcome {
            Outcome::Done => (None, None),
            // Refusals come before any model change.
            Outcome::Refused => (None, None),
            Outcome::Failed(e) => (Some(e), None),
            Outcome::CreateFailed(e, md) => (Some(e), Some(md)),
        };
        let after = run.model.clone();
        if std::env::var_os("CRASH_TRACE").is_some() {
            println!(
                "step {step} {op:?} -> err {:?}; device ops now {}; blobs {:?}",
                err.as_ref().map(|e| e.to_string()),
                run.fault.op_count(),
                run.model.blobs.keys().collect::<Vec<_>>()
            );
        }
        check_captures(
            &mut run,
            &before,
            &after,
            unknown.as_ref(),
            stats,
            &mut violations,
        );
        if let Some(e) = err {
            if !run.fault.is_crashed() {
                violations.push(format!("seed {seed:#x} step {step} {op:?}: {e}"));
                break;
            }
            // The real crash: the store must fail, not panic, from here on.
            crashed = true;
            if let Some(bs) = run.bs.as_ref() {
                assert!(block_on(bs.create_blob(BlobOptions::default())).is_err());
                for b in run.handles.values() {
                    let _ = block_on(b.sync_metadata());
                    let _ = block_on(b.write(0, DmaBuf::new(run.geo.unit()).unwrap()));
                }
            }
            run.handles.clear();
            run.bs = None;
            stats.points.fetch_add(1, Ordering::Relaxed);
            stats.crashes.fetch_add(1, Ordering::Relaxed);
            let dev = run.fault.after_crash(seed ^ 0xC4A5).unwrap();
            if let Err(e) = verify(dev, run.geo, &before, &after, unknown.as_ref()) {
                violations.push(format!(
                    "seed {seed:#x} real crash in step {step} {op:?}: {e}"
                ));
            }
            break;
        }
        let wm = run.fault.durable_watermark().unwrap();
        run.model.settle(wm, run.geo.upc);
    }
    if !crashed && violations.is_empty() {
        // The crash was armed past the end: crash now.
        let model = run.model.clone();
        run.handles.clear();
        run.bs = None;
        stats.points.fetch_add(1, Ordering::Relaxed);
        stats.crashes.fetch_add(1, Ordering::Relaxed);
        let dev = run.fault.after_crash(seed ^ 0xC4A5).unwrap();
        if let Err(e) = verify(dev, run.geo, &model, &model, None) {
            violations.push(format!("seed {seed:#x} crash at the end: {e}"));
        }
    }
    stats.violations.lock().unwrap().extend(violations);
}

#[test]
fn crash_points() {
    let target: u64 = std::env::var("CRASH_POINTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_POINTS);
    let replay: Option<u64> = std::env::var("CRASH_SEED").ok().and_then(|s| {
        let s = s.trim_start_matches("0x");
        u64::from_str_radix(s, 16).ok()
    });
    let old: HashMap<u32, Vec<u8>> = [512, 4096].map(|b| (b, old_store_image(b))).into();
    let stats = Stats {
        done: Mutex::new(BTreeMap::new()),
        points: AtomicU64::new(0),
        crashes: AtomicU64::new(0),
        violations: Mutex::new(Vec::new()),
    };
    let runs = AtomicU64::new(0);
    let start = std::time::Instant::now();
    if let Some(seed) = replay {
        run_one(seed, &old, &stats);
        runs.store(1, Ordering::Relaxed);
    } else {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
        std::thread::scope(|s| {
            for _ in 0..threads {
                s.spawn(|| {
                    while stats.points.load(Ordering::Relaxed) < target {
                        let i = runs.fetch_add(1, Ordering::Relaxed);
                        let seed = SEEDS[(i % SEEDS.len() as u64) as usize]
                            .wrapping_add((i / SEEDS.len() as u64) << 32);
                        run_one(seed, &old, &stats);
                    }
                });
            }
        });
    }
    let v = stats.violations.lock().unwrap();
    println!(
        "crash test: {} crash points ({} real crashes) in {} runs, {} violations, {:.1}s; \
         seeds {:x?} + (round << 32)",
        stats.points.load(Ordering::Relaxed),
        stats.crashes.load(Ordering::Relaxed),
        runs.load(Ordering::Relaxed),
        v.len(),
        start.elapsed().as_secs_f64(),
        SEEDS
    );
    println!("operations completed: {:?}", stats.done.lock().unwrap());
    for line in v.iter().take(20) {
        println!("VIOLATION {line}");
    }
    assert!(
        v.is_empty(),
        "{} violations; replay one with CRASH_SEED",
        v.len()
    );
}
