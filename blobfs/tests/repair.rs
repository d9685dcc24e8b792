//! The corruption matrix: a BlobFS with files and directories, each region
//! of its metadata in turn overwritten with random bytes (several seeds),
//! then mount, `fsck` and `fsck --repair`. Mount and fsck may refuse but
//! never panic; after the repair the file system mounts, is clean, and
//! every file whose own metadata was not hit is intact, while a file whose
//! metadata was hit is reported lost (or moved to lost+found). A small
//! file's one metadata page holds its cluster map; a large file's map has
//! extent pages of its own, each a region of the matrix. The table this
//! prints (`cargo test --test repair -- --nocapture`) is the one in the
//! READMEs.

use std::sync::Arc;

use blobfs::fsck::{fsck, fsck_repair, FsckReport, Severity};
use blobfs::{BlobFs, MkfsOptions, MountOptions, OpenOptions};
use blobstore::fuzzing::SuperBlock;
use blobstore::{BlockDevice, MemDevice};
use rand::{Rng, SeedableRng};

const PAGE: usize = 4096;

/// Files and their contents; directories `a`, `b`, `b/c`. `b/big` has
/// 1,280 clusters: more than its first page holds a map of, so its map is
/// in extent pages.
fn files() -> Vec<(&'static str, Vec<u8>)> {
    let fill = |seed: u8, len: usize| (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
    vec![
        ("a/one", fill(3, 10_000)),
        ("a/two", fill(5, 100_000)),
        ("b/big", fill(13, 1280 * CLUSTER as usize)),
        ("b/c/three", fill(7, 3 << 20)),
        ("top", fill(11, 5_000)),
    ]
}

const DIRS: [&str; 3] = ["a", "b", "b/c"];
/// The file whose first metadata page the matrix hits.
const VICTIM: &str = "a/two";
/// The file whose extent page the matrix hits.
const BIG_VICTIM: &str = "b/big";
/// Cluster size of the image: small, so that a file with extent pages
/// fits the device.
const CLUSTER: u32 = 16 << 10;

fn image() -> Vec<u8> {
    let mem = MemDevice::new(64 << 20, 4096).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(mem.clone());
    let fs = BlobFs::mkfs(
        dev,
        MkfsOptions {
            cluster_size: CLUSTER,
            ..Default::default()
        },
        MountOptions::default(),
    )
    .unwrap();
    for d in DIRS {
        fs.create_dir(d).unwrap();
    }
    for (name, data) in files() {
        let f = fs.create(name).unwrap();
        f.append(&data).unwrap();
        f.close().unwrap();
    }
    fs.unmount().unwrap();
    mem.snapshot()
}

/// Byte offset of the metadata page of `kind` (1 first, 3 extent) that
/// belongs to blob `id`.
fn md_page(img: &[u8], id: u64, kind: u8) -> usize {
    (0..img.len() / PAGE)
        .map(|p| p * PAGE)
        .find(|&o| {
            img[o..o + 4] == *b"BSMD"
                && img[o + 6] == kind
                && u64::from_le_bytes(img[o + 8..o + 16].try_into().unwrap()) == id
        })
        .expect("metadata page present")
}

/// The regions of the matrix: name, byte offset of the page to overwrite,
/// and the file whose own metadata is hit, if any.
fn regions(img: &[u8]) -> Vec<(&'static str, usize, Option<&'static str>)> {
    let sb = SuperBlock::decode(&img[..4096]).unwrap();
    let m = sb.mask_start as usize;
    let (pm, cm) = (sb.page_mask_len as usize, sb.cluster_mask_len as usize);
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_image(img, 4096).unwrap());
    let fs = BlobFs::mount(dev, MountOptions::default()).unwrap();
    let victim = fs.stat(VICTIM).unwrap().blob_id.0;
    let big = fs.stat(BIG_VICTIM).unwrap().blob_id.0;
    fs.unmount().unwrap();
    vec![
        ("primary super block", 0, None),
        ("used-page bitmap", m * PAGE, None),
        ("used-cluster bitmap", (m + pm) * PAGE, None),
        ("used-blob-id bitmap", (m + pm + cm) * PAGE, None),
        (
            "super blob (root record) first page",
            md_page(img, sb.super_blob, 1),
            None,
        ),
        (
            "file's metadata page (its map inline)",
            md_page(img, victim, 1),
            Some(VICTIM),
        ),
        (
            "large file's extent page",
            md_page(img, big, 3),
            Some(BIG_VICTIM),
        ),
    ]
}

fn damaged(img: &[u8], off: usize, seed: u64) -> Arc<dyn BlockDevice> {
    let mem = MemDevice::from_image(img, 4096).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let noise: Vec<u8> = (0..PAGE).map(|_| rng.gen()).collect();
    mem.store_bytes(off, &noise);
    Arc::new(mem)
}

fn fsck_says(r: &blobfs::Result<FsckReport>) -> String {
    match r {
        Err(e) => format!("refuses: {e}"),
        Ok(r) => {
            let damage = r
                .findings
                .iter()
                .filter(|f| f.severity == Severity::Damage)
                .count();
            match r.findings.first() {
                None => "clean".into(),
                Some(f) => format!(
                    "{damage} damaged, {} warnings: {}",
                    r.findings.len() - damage,
                    f.what
                ),
            }
        }
    }
}

/// Shortens a cell of the table.
fn cell(s: &str) -> String {
    let s = s.replace('|', "/");
    match s.char_indices().nth(110) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s,
    }
}

#[test]
fn corruption_matrix() {
    let img = image();
    let mut table = vec![
        "| region | mount before repair | fsck says | fsck --repair did | after repair |"
            .to_string(),
        "| --- | --- | --- | --- | --- |".to_string(),
    ];
    for (region, off, victim) in regions(&img) {
        let hits_victim = victim.is_some();
        for seed in 0..4u64 {
            let what = format!("{region}, seed {seed}");
            // Mount and a plain check never panic (each on its own copy:
            // both write).
            let mounted = match BlobFs::mount(damaged(&img, off, seed), MountOptions::default()) {
                Ok(fs) => {
                    fs.unmount().unwrap();
                    "mounts".to_string()
                }
                Err(e) => format!("refuses: {e}"),
            };
            let said = fsck(damaged(&img, off, seed));
            // A plain check reports a file's unreadable metadata as damage
            // (and points at the repair) instead of failing.
            if hits_victim {
                let r = said
                    .as_ref()
                    .unwrap_or_else(|e| panic!("{what}: fsck: {e}"));
                assert!(!r.is_clean(), "{what}");
                assert!(
                    r.findings.iter().any(|f| f.what.contains("--repair")),
                    "{what}: {:?}",
                    r.findings
                );
            }
            let dev = damaged(&img, off, seed);
            let r = fsck_repair(dev.clone()).unwrap_or_else(|e| panic!("{what}: repair: {e}"));
            assert!(r.is_clean(), "{what}: {:?}", r.findings);
            let fs = BlobFs::mount(dev.clone(), MountOptions::default())
                .unwrap_or_else(|e| panic!("{what}: mount after repair: {e}"));
            for d in DIRS {
                assert!(fs.stat(d).unwrap().is_dir, "{what}: {d}");
            }
            let mut lost = Vec::new();
            for (name, data) in files() {
                match fs.open(name, OpenOptions::read()) {
                    Ok(f) => assert!(f.read_all().unwrap() == data, "{what}: {name} differs"),
                    Err(_) => lost.push(name),
                }
            }
            // Exactly the victim is gone when its metadata was hit, and
            // the repair says so; nothing is gone otherwise.
            let expect: Vec<&str> = victim.into_iter().collect();
            assert_eq!(lost, expect, "{what}");
            assert_eq!(r.lost.len(), expect.len(), "{what}: {:?}", r.lost);
            assert!(
                r.moved_to_lost_found.is_empty(),
                "{what}: {:?}",
                r.moved_to_lost_found
            );
            if let (Some(v), true) = (victim, region.contains("extent")) {
                assert!(r.lost[0].starts_with(v), "{what}: {:?}", r.lost);
            }
            let after = if lost.is_empty() {
                "all files intact".to_string()
            } else {
                format!("all intact but {} (reported lost)", lost.join(", "))
            };
            fs.unmount().unwrap();
            // A second repair finds nothing left to do.
            let again = fsck_repair(dev).unwrap();
            assert!(
                again.repairs.is_empty() && again.lost.is_empty() && again.findings.is_empty(),
                "{what}: {again:?}"
            );
            if seed == 0 {
                let did: Vec<String> = r
                    .repairs
                    .iter()
                    .cloned()
                    .chain(r.lost.iter().map(|l| format!("lost: {l}")))
                    .collect();
                let did = if did.is_empty() {
                    "nothing to do".into()
                } else {
                    did.join("; ")
                };
                table.push(format!(
                    "| {region} | {} | {} | {} | {after} |",
                    cell(&mounted),
                    cell(&fsck_says(&said)),
                    cell(&did)
                ));
            }
        }
    }
    println!("{}", table.join("\n"));
}

/// Blobs whose BlobFS metadata does not read but whose data does go to
/// lost+found, named by blob id, with their data.
#[test]
fn unreadable_fs_metadata_moves_to_lost_and_found() {
    let img = image();
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::from_image(&img, 4096).unwrap());
    let fs = BlobFs::mount(dev.clone(), MountOptions::default()).unwrap();
    let id = fs.stat("top").unwrap().blob_id;
    fs.unmount().unwrap();
    {
        let bs = blobstore::block_on(blobstore::Blobstore::load(dev.clone(), Default::default()))
            .unwrap();
        let b = blobstore::block_on(bs.open_blob(id)).unwrap();
        b.set_xattr(blobfs::meta::KIND, &[9]).unwrap();
        blobstore::block_on(b.close()).unwrap();
        blobstore::block_on(bs.unload()).unwrap();
    }
    assert!(BlobFs::mount(dev.clone(), MountOptions::default()).is_err());
    let r = fsck_repair(dev.clone()).unwrap();
    assert!(r.is_clean(), "{:?}", r.findings);
    assert_eq!(r.moved_to_lost_found.len(), 1, "{r:?}");
    let fs = BlobFs::mount(dev, MountOptions::default()).unwrap();
    let got = fs
        .open(&format!("lost+found/{id}"), OpenOptions::read())
        .unwrap()
        .read_all()
        .unwrap();
    assert_eq!(got, files()[4].1);
    assert!(!fs.exists("top"));
    fs.unmount().unwrap();
}
