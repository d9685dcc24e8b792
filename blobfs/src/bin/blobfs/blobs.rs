//! Blob-level commands, in the manner of SPDK's `blobcli`: list the blobs,
//! dump one blob's metadata, fsck, and discard a dead process's unsynced
//! memory. They load the blobstore without
//! mounting the file system, so they show the store as it is on the device
//! (mounting would first finish deletes and renames a crash interrupted).

use blobfs::fsck::{fsck as check, Severity};
use blobfs::meta;
use blobstore::{block_on, Blob, BlobId, Blobstore, LoadOptions};

use crate::util::{fail, human_size, open_device, print, utc, CliResult, Ctx, Progress};

/// Loads the blobstore on `spec` (of any type), runs `f`, unloads.
fn with_store<T>(spec: &str, f: impl FnOnce(&Blobstore) -> CliResult<T>) -> CliResult<T> {
    let dev = open_device(spec)?;
    let bs = block_on(Blobstore::load(dev, LoadOptions::default()))
        .ctx(format!("loading the blobstore on {spec}"))?;
    let res = f(&bs);
    let unloaded = block_on(bs.unload()).ctx(format!("unloading {spec}"));
    let v = res?;
    unloaded?;
    Ok(v)
}

/// An xattr value for people: BlobFS's own xattrs decoded, others as text
/// when printable, else hex.
fn show_xattr(name: &str, v: &[u8]) -> String {
    let as_u64 = || <[u8; 8]>::try_from(v).ok().map(u64::from_le_bytes);
    match name {
        meta::NAME => return format!("{:?}", String::from_utf8_lossy(v)),
        meta::KIND => match v {
            [k] if *k == meta::KIND_FILE => return "file".into(),
            [k] if *k == meta::KIND_DIR => return "dir".into(),
            _ => {}
        },
        meta::LEN | meta::SEQ | meta::MOUNT_GEN | meta::CLEAN => {
            if let Some(n) = as_u64() {
                return n.to_string();
            }
        }
        meta::MTIME => {
            if let Some(n) = as_u64() {
                return utc(n);
            }
        }
        meta::TAIL => {
            if let Ok((prev, crc)) = meta::dec_tail(v, "") {
                return format!("from {prev} crc32c {crc:08x}");
            }
        }
        meta::MOVED_FROM => {
            if let Ok((seq, old)) = meta::dec_moved_from(v, "") {
                return format!("{old:?}@{seq}");
            }
        }
        meta::VERSION => {
            if let Ok(b) = <[u8; 4]>::try_from(v) {
                return u32::from_le_bytes(b).to_string();
            }
        }
        _ => {}
    }
    match std::str::from_utf8(v) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => format!("{s:?}"),
        _ => hex(v),
    }
}

fn hex(v: &[u8]) -> String {
    v.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn open(bs: &Blobstore, id: BlobId) -> CliResult<Blob> {
    block_on(bs.open_blob(id)).ctx(format!("blob {id}"))
}

pub fn list(spec: &str) -> CliResult {
    with_store(spec, |bs| {
        let ids = bs.blob_ids();
        let mut s = format!(
            "blobstore type {:?}: {} blobs, cluster {}, {} of {} clusters free, super blob {}\n",
            bs.bstype(),
            ids.len(),
            human_size(bs.cluster_size() as u64),
            bs.free_clusters(),
            bs.data_clusters(),
            bs.super_blob().map_or("none".into(), |b| b.to_string()),
        );
        s += &format!(
            "{:<12} {:>9} {:>9} {:>12}  {:<5} xattrs\n",
            "blob", "clusters", "allocated", "bytes", "thin"
        );
        for id in ids {
            let b = open(bs, id)?;
            let xattrs: Vec<String> = b
                .xattr_names()
                .iter()
                .map(|n| format!("{n}={}", show_xattr(n, &b.get_xattr(n).unwrap_or_default())))
                .collect();
            s += &format!(
                "{:<12} {:>9} {:>9} {:>12}  {:<5} {}\n",
                id.to_string(),
                b.num_clusters(),
                b.allocated_clusters(),
                b.size_bytes(),
                if b.is_thin() { "yes" } else { "no" },
                xattrs.join(" ")
            );
        }
        print(&s)
    })
}

fn parse_blob_id(s: &str) -> CliResult<BlobId> {
    let n = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    };
    n.map(BlobId)
        .map_err(|_| crate::util::CliError(format!("{s:?} is not a blob id (0x1f or 31)")))
}

pub fn dump(spec: &str, id: &str) -> CliResult {
    let id = parse_blob_id(id)?;
    with_store(spec, |bs| {
        if !bs.blob_ids().contains(&id) {
            return fail(format!("blob {id}: no such blob"));
        }
        let b = open(bs, id)?;
        let mut s = String::new();
        s += &format!("blob:           {id} ({})\n", id.0);
        if bs.super_blob() == Some(id) {
            s += "role:           super blob (BlobFS root record)\n";
        }
        s += &format!(
            "size:           {} clusters, {} pages, {} io units of {} bytes, {} bytes\n",
            b.num_clusters(),
            b.num_pages(),
            b.num_io_units(),
            b.io_unit_size(),
            b.size_bytes()
        );
        s += &format!("allocated:      {} clusters\n", b.allocated_clusters());
        s += &format!("thin:           {}\n", b.is_thin());
        s += &format!("read-only:      {}\n", b.is_read_only());
        s += &format!("xattrs:         {}\n", b.xattr_names().len());
        for n in b.xattr_names() {
            let v = b.get_xattr(&n).unwrap_or_default();
            s += &format!(
                "  {n}: {} ({} bytes: {})\n",
                show_xattr(&n, &v),
                v.len(),
                hex(&v[..v.len().min(64)])
            );
        }
        print(&s)
    })
}

pub fn fsck(spec: &str, as_json: bool, repair: bool) -> CliResult {
    let dev = open_device(spec)?;
    let progress = Progress::spinner(&format!("checking {spec}"));
    let r = if repair {
        blobfs::fsck::fsck_repair(dev).ctx(format!("fsck --repair {spec}"))?
    } else {
        check(dev).ctx(format!("fsck {spec}"))?
    };
    drop(progress);
    if as_json {
        let findings: Vec<serde_json::Value> = r
            .findings
            .iter()
            .map(|f| {
                serde_json::json!({
                    "severity": match f.severity {
                        Severity::Warning => "warning",
                        Severity::Damage => "damage",
                    },
                    "blob": f.blob.map(|b| b.to_string()),
                    "what": f.what,
                })
            })
            .collect();
        crate::ops::print_json(&serde_json::json!({
            "device": spec,
            "clean": r.is_clean(),
            "blobs": r.blobs,
            "files": r.files,
            "directories": r.dirs,
            "file_bytes": r.file_bytes,
            "unsynced_buffers": r.unsynced_buffers,
            "unsynced_bytes": r.unsynced_bytes,
            "interrupted_renames": r.interrupted_renames,
            "findings": findings,
            "repaired": repair,
            "repairs": r.repairs,
            "moved_to_lost_found": r.moved_to_lost_found,
            "lost": r.lost,
        }))?;
        if !r.is_clean() {
            return fail(format!("{spec}: the file system is damaged"));
        }
        return Ok(());
    }
    let mut s = String::new();
    for what in &r.repairs {
        s += &format!("repaired: {what}\n");
    }
    for what in &r.moved_to_lost_found {
        s += &format!("moved to lost+found: {what}\n");
    }
    for what in &r.lost {
        s += &format!("lost: {what}\n");
    }
    for f in &r.findings {
        s += &format!("{f}\n");
    }
    let damage = r
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Damage)
        .count();
    s += &format!(
        "{spec}: {} blobs, {} files ({}), {} directories; {} damaged, {} warnings\n",
        r.blobs,
        r.files,
        human_size(r.file_bytes),
        r.dirs,
        damage,
        r.findings.len() - damage
    );
    print(&s)?;
    if !r.is_clean() {
        return fail(format!(
            "{spec}: the file system is damaged ({damage} problems)"
        ));
    }
    Ok(())
}

/// Deletes the unsynced memory a process that died left for the device
/// (what the next mount would write back), saying what it held. Opening
/// the device takes its lock, so no live owner loses anything.
pub fn discard_unsynced(spec: &str) -> CliResult {
    let dev = open_device(spec)?;
    let Some(path) = dev.unsynced_memory() else {
        return print(&format!(
            "{spec}: this device keeps no unsynced memory (it dies with its process)\n"
        ));
    };
    let shown = path.display();
    match blobfs::unsynced::scan_path(&path).ctx(format!("reading {shown}"))? {
        None => print(&format!("{spec}: no unsynced memory ({shown})\n")),
        Some(recs) => {
            let bytes: u64 = recs.iter().map(|r| r.header.used).sum();
            std::fs::remove_file(&path).ctx(format!("deleting {shown}"))?;
            print(&format!(
                "{spec}: discarded {} buffer(s) holding {} of unsynced file data ({shown})\n",
                recs.len(),
                human_size(bytes)
            ))
        }
    }
}
