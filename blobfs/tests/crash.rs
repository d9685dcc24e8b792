//! BlobFS under power loss: a random file workload runs on a `FaultDevice`
//! that captures crash images at many device operations; each image (with
//! torn and reordered unflushed pages) is mounted and checked against a
//! model of what had returned before the crash:
//! - the file system mounts and the blobstore's invariants hold;
//! - every file's bytes are its own (each byte is a function of the file's
//!   incarnation and offset, so stale or foreign bytes are caught);
//! - a file keeps at least the length its last completed `sync` made
//!   durable (and never more than was written);
//! - a rename is all or nothing: a file is found under its old or its new
//!   name, never both, never neither; a replaced target is either intact or
//!   gone with the rename done;
//! - so is a rename of the directory that holds three of the files (`d`
//!   and `e` in turn): after a crash exactly one of them exists, the
//!   directory before or after the rename, with every file in it;
//! - a completed create or delete is durable.
//!
//! `BLOBFS_CRASH_SEEDS=N` runs more seeds (default 16); `BLOBFS_CRASH_SEED=S` only seed S.

use std::collections::BTreeMap;
use std::sync::Arc;

use blobfs::{BlobFs, MkfsOptions, MountOptions, OpenOptions};
use blobstore::testing::FaultDevice;
use blobstore::{block_on, BlockDevice, MemDevice};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The 8-byte word at `word` of incarnation `inc`.
fn word(inc: u64, word: u64) -> [u8; 8] {
    let mut x = (inc << 40) ^ word ^ 0x5DEE_CE66_D1CE_B00C;
    x ^= x >> 31;
    x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    (x | 1).to_le_bytes() // never all zero
}

fn bytes(inc: u64, from: u64, len: u64) -> Vec<u8> {
    debug_assert!(from.is_multiple_of(8) && len.is_multiple_of(8));
    (from / 8..(from + len) / 8)
        .flat_map(|w| word(inc, w))
        .collect()
}

/// Which incarnation wrote `data`, if every word is that incarnation's.
fn decode(data: &[u8], incs: &[u64]) -> Option<u64> {
    if !data.len().is_multiple_of(8) {
        return None;
    }
    if data.is_empty() {
        return Some(u64::MAX);
    }
    let first: [u8; 8] = data[..8].try_into().unwrap();
    let inc = *incs.iter().find(|&&i| word(i, 0) == first)?;
    data.chunks(8)
        .enumerate()
        .all(|(w, c)| c == word(inc, w as u64))
        .then_some(inc)
}

#[derive(Clone, Debug, Default)]
struct Model {
    /// name -> incarnation
    names: BTreeMap<String, u64>,
    /// incarnation -> (length written, length a completed sync made
    /// durable, largest length that may have reached the disk since)
    lens: BTreeMap<u64, (u64, u64, u64)>,
    /// The directory that holds the slots other than `top`.
    dir: &'static str,
}

/// The two names the directory takes in turn.
const DIRS: [&str; 2] = ["d", "e"];

/// Slot `i` of four: three files in the directory `dir`, one at the top.
fn slot_name(dir: &str, i: usize) -> String {
    match ["a", "b", "c"].get(i) {
        Some(f) => format!("{dir}/{f}"),
        None => "top".to_string(),
    }
}

fn check_image(dev: Arc<dyn BlockDevice>, done: &Model, next: &Model) -> Result<(), String> {
    let fs = BlobFs::mount(dev, MountOptions::default()).map_err(|e| format!("mount: {e}"))?;
    let rep = block_on(fs.blobstore().check()).map_err(|e| format!("check: {e}"))?;
    if !rep.is_consistent() {
        return Err(format!("blobstore check: {:?}", rep.problems));
    }
    // The directory under one name, before or after its rename: never
    // both (a split tree), never neither.
    let dirs: Vec<&str> = DIRS.into_iter().filter(|d| fs.exists(d)).collect();
    if dirs.len() != 1 || (dirs[0] != done.dir && dirs[0] != next.dir) {
        return Err(format!(
            "directories {dirs:?}, expected {} or {}",
            done.dir, next.dir
        ));
    }
    let incs: Vec<u64> = done.lens.keys().chain(next.lens.keys()).copied().collect();
    let mut found: BTreeMap<u64, (String, u64)> = BTreeMap::new();
    for name in fs.list("") {
        if fs.stat(&name).unwrap().is_dir {
            continue;
        }
        let f = fs
            .open(&name, OpenOptions::read())
            .map_err(|e| e.to_string())?;
        let data = f.read_all().map_err(|e| format!("read {name}: {e}"))?;
        if data.is_empty() {
            // An empty file says nothing about who it is; it must be a
            // known name whose incarnation was never synced with data.
            let ok = [done, next]
                .iter()
                .any(|m| m.names.get(&name).is_some_and(|i| m.lens[i].1 == 0));
            if !ok {
                return Err(format!("{name} is empty but should hold synced data"));
            }
            continue;
        }
        let inc = decode(&data, &incs).ok_or_else(|| {
            let first: [u8; 8] = data[..8].try_into().unwrap();
            let owner = incs.iter().find(|&&i| word(i, 0) == first);
            let bad = owner.and_then(|&i| {
                data.chunks(8)
                    .enumerate()
                    .position(|(w, c)| c != word(i, w as u64))
            });
            format!(
                "{name}: bytes that belong to no incarnation (len {}, first word of {owner:?}, \
                 first foreign byte at {:?})",
                data.len(),
                bad.map(|w| w * 8)
            )
        })?;
        if found
            .insert(inc, (name.clone(), data.len() as u64))
            .is_some()
        {
            return Err(format!("incarnation {inc} is found under two names"));
        }
    }
    for (&inc, &(written, synced, most)) in &done.lens {
        let name_done = done.names.iter().find(|(_, &i)| i == inc).map(|(n, _)| n);
        let name_next = next.names.iter().find(|(_, &i)| i == inc).map(|(n, _)| n);
        let (w2, s2, m2) = next
            .lens
            .get(&inc)
            .copied()
            .unwrap_or((written, synced, most));
        let need = synced.min(s2);
        match found.get(&inc) {
            Some((name, len)) => {
                if Some(name) != name_done && Some(name) != name_next {
                    return Err(format!("incarnation {inc} found as {name}, expected {name_done:?} or {name_next:?}"));
                }
                let top = most.max(m2).max(written).max(w2);
                if *len < need || *len > top {
                    return Err(format!(
                        "{name}: length {len}, synced {need}, at most {top}"
                    ));
                }
            }
            None => {
                if need > 0 && name_done.is_some() && name_next.is_some() {
                    return Err(format!(
                        "incarnation {inc} ({name_done:?}) with {need} synced bytes is gone"
                    ));
                }
            }
        }
    }
    Ok(())
}

fn run_seed(seed: u64) -> (usize, Vec<String>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let block = if seed.is_multiple_of(2) { 4096 } else { 512 };
    let mem = Arc::new(MemDevice::new(24 << 20, block).unwrap());
    let fault = Arc::new(FaultDevice::new(mem).unwrap());
    let dev: Arc<dyn BlockDevice> = fault.clone();
    let fs = BlobFs::mkfs(
        dev,
        MkfsOptions {
            cluster_size: 64 << 10,
            md_pages: Some(256),
            ..Default::default()
        },
        MountOptions::default(),
    )
    .unwrap();
    fs.create_dir("d").unwrap();
    let mut model = Model {
        dir: DIRS[0],
        ..Model::default()
    };
    // Snapshots of the model after each call, with the device operation
    // count when it returned.
    let mut history: Vec<(u64, Model)> = vec![(fault.op_count(), model.clone())];
    let mut next_inc = 1u64;
    let mut at = Vec::new();
    let mut n = fault.op_count();
    while n < fault.op_count() + 3000 {
        n += rng.gen_range(1..=4);
        at.push(n);
    }
    fault.capture_at(at).unwrap();
    let mut open: BTreeMap<String, blobfs::File> = BTreeMap::new();
    for _ in 0..120 {
        let slot = slot_name(model.dir, rng.gen_range(0..4));
        match rng.gen_range(0..21) {
            0..=7 => {
                // Append (creating the file if missing).
                if !model.names.contains_key(&slot) {
                    let f = fs.create(&slot).unwrap();
                    model.names.insert(slot.clone(), next_inc);
                    model.lens.insert(next_inc, (0, 0, 0));
                    next_inc += 1;
                    open.insert(slot.clone(), f);
                }
                let inc = model.names[&slot];
                let f = match open.get(&slot) {
                    Some(f) => f,
                    None => {
                        let f = fs.open(&slot, OpenOptions::append()).unwrap();
                        open.entry(slot.clone()).or_insert(f)
                    }
                };
                let len = model.lens[&inc].0;
                let add = rng.gen_range(1..=20_000u64) * 8;
                f.append(&bytes(inc, len, add)).unwrap();
                let l = model.lens.get_mut(&inc).unwrap();
                l.0 += add;
                l.2 = l.2.max(l.0);
            }
            8..=11 => {
                if let (Some(&inc), Some(f)) = (model.names.get(&slot), open.get(&slot)) {
                    f.sync().unwrap();
                    let l = model.lens.get_mut(&inc).unwrap();
                    *l = (l.0, l.0, l.0);
                }
            }
            12..=13 => {
                let to = slot_name(model.dir, rng.gen_range(0..4));
                if model.names.contains_key(&slot) && to != slot {
                    fs.rename(&slot, &to).unwrap();
                    let inc = model.names.remove(&slot).unwrap();
                    if let Some(old) = model.names.insert(to.clone(), inc) {
                        model.lens.remove(&old);
                    }
                    open.remove(&to);
                    if let Some(f) = open.remove(&slot) {
                        open.insert(to, f);
                    }
                }
            }
            14..=15 => {
                if let Some(inc) = model.names.remove(&slot) {
                    fs.remove_file(&slot).unwrap();
                    model.lens.remove(&inc);
                    open.remove(&slot);
                }
            }
            16..=17 => {
                if let (Some(&inc), Some(f)) = (model.names.get(&slot), open.get(&slot)) {
                    let len = model.lens[&inc].0;
                    let new = rng.gen_range(0..=len / 8) * 8;
                    f.truncate(new).unwrap();
                    // A shrink is durable when truncate returns.
                    let l = model.lens.get_mut(&inc).unwrap();
                    *l = (new, new, new);
                }
            }
            20 => {
                // The directory, with its files, open ones too.
                let to = if model.dir == DIRS[0] {
                    DIRS[1]
                } else {
                    DIRS[0]
                };
                fs.rename(model.dir, to).unwrap();
                let moved = |n: &String| {
                    n.strip_prefix(model.dir)
                        .filter(|r| r.starts_with('/'))
                        .map_or_else(|| n.clone(), |r| format!("{to}{r}"))
                };
                model.names = model.names.iter().map(|(n, i)| (moved(n), *i)).collect();
                open = open.into_iter().map(|(n, f)| (moved(&n), f)).collect();
                model.dir = to;
            }
            _ => {
                if let Some(f) = open.remove(&slot) {
                    let inc = model.names[&slot];
                    f.close().unwrap();
                    let l = model.lens.get_mut(&inc).unwrap();
                    *l = (l.0, l.0, l.0);
                }
            }
        }
        history.push((fault.op_count(), model.clone()));
    }
    drop(open);
    let captures = fault.take_captures();
    let mut violations = Vec::new();
    let points = captures.len();
    for (opno, img) in captures {
        // Captured just before op `opno`: calls that returned with at most
        // opno-1 operations are complete; the one after may be partial.
        let i = history
            .iter()
            .rposition(|(ops, _)| *ops < opno)
            .unwrap_or(0);
        let done = &history[i].1;
        let next = history.get(i + 1).map_or(done, |(_, m)| m);
        let dev: Arc<dyn BlockDevice> =
            Arc::new(img.to_device(seed.wrapping_mul(31) ^ opno).unwrap());
        if let Err(e) = check_image(dev, done, next) {
            violations.push(format!("seed {seed} crash before op {opno}: {e}"));
        }
    }
    (points, violations)
}

#[test]
fn blobfs_survives_power_loss_at_every_sampled_point() {
    let seeds: u64 = std::env::var("BLOBFS_CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let mut points = 0;
    let mut violations = Vec::new();
    let only: Option<u64> = std::env::var("BLOBFS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    for seed in (0..seeds).filter(|s| only.is_none_or(|o| o == *s)) {
        let (p, v) = run_seed(seed);
        points += p;
        violations.extend(v);
    }
    println!(
        "blobfs crash test: {seeds} seeds (0..{seeds}), {points} crash points, {} violations",
        violations.len()
    );
    for v in violations.iter().take(20) {
        println!("  {v}");
    }
    assert!(points >= 1000, "too few crash points: {points}");
    assert!(violations.is_empty(), "{} violations", violations.len());
}
