//! The file commands: mkfs, info, df, ls, stat, import, export, cat, rm,
//! mv, mkdir, trim. Each mounts the file system, does its work and unmounts, so
//! what it changed is durable when it exits. `--json` output is one JSON
//! value on stdout (an object, or an array for `ls`), sizes in bytes and
//! times in nanoseconds since the Unix epoch beside their UTC text.

use std::io::{Read, Write};
use std::path::Path;

use blobfs::{BlobFs, Error, MkfsOptions, MountOptions, OpenOptions};
use blobstore::block_on;
use serde_json::{json, Value};

use crate::util::{
    fail, human_size, open_device, print, utc, write_stdout, CliResult, Ctx, Progress,
};

/// Bytes moved per read or write when copying.
const COPY_CHUNK: usize = 1 << 20;

/// Mounts the file system on `spec`, runs `f`, and unmounts, also when `f`
/// failed (its error wins).
pub fn with_fs<T>(spec: &str, f: impl FnOnce(&BlobFs) -> CliResult<T>) -> CliResult<T> {
    let dev = open_device(spec)?;
    let fs = BlobFs::mount(dev, MountOptions::default()).ctx(format!("mounting {spec}"))?;
    let res = f(&fs);
    let unmounted = fs.unmount().ctx(format!("unmounting {spec}"));
    let v = res?;
    unmounted?;
    Ok(v)
}

/// Metadata pages a file or directory takes: one, its map of clusters
/// inline, unless the file has so many clusters (about 900 with 4 KiB
/// pages) that its map needs pages of its own (see [`map_pages`]).
const PAGES_PER_FILE: u64 = 1;
/// Pages kept beyond `--max-files`: the root record, and room for the
/// copy-on-write pages of a large file's metadata sync.
const SPARE_PAGES: u64 = blobfs::SPARE_MD_PAGES;

/// Metadata pages the cluster maps of large files can take on a store of
/// `clusters` clusters, at most: a file whose map is not inline takes one
/// page per 1,012 clusters (4 KiB pages), rounded up, and has at least
/// 900 or so, so twice the clusters over 1,012 bounds them all. mkfs keeps
/// them on top of `--max-files` so that large files never run out of
/// metadata pages before the space does.
fn map_pages(clusters: u64) -> u64 {
    let per = blobstore::cluster_map_entries_per_page(4096) as u64;
    (2 * clusters).div_ceil(per)
}

pub fn mkfs(spec: &str, cluster_size: u32, force: bool, max_files: Option<u64>) -> CliResult {
    let dev = open_device(spec)?;
    let clusters = dev.geometry().size_bytes() / cluster_size.max(1) as u64;
    if force {
        // Say what is being erased (mkfs itself refuses without --force).
        if let Some(sig) = blobstore::probe::probe_sync(&dev).ctx(format!("probing {spec}"))? {
            eprintln!(
                "blobfs: erasing {} on {spec} (signature at byte {})",
                sig.what, sig.offset
            );
        }
    }
    let fs = BlobFs::mkfs(
        dev,
        MkfsOptions {
            cluster_size,
            force,
            md_pages: max_files.map(|n| {
                n.saturating_mul(PAGES_PER_FILE)
                    .saturating_add(SPARE_PAGES)
                    .saturating_add(map_pages(clusters))
            }),
        },
        MountOptions::default(),
    )
    .map_err(|e| match e {
        // The blobstore's refusal names the device and the way out already.
        Error::Store(_, inner @ blobstore::Error::DeviceNotBlank { .. }) => {
            crate::util::CliError(inner.to_string())
        }
        e => crate::util::CliError(format!("mkfs on {spec}: {e}")),
    })?;
    let space = fs.space();
    let md_free = fs.blobstore().free_md_pages();
    fs.unmount().ctx(format!("unmounting {spec}"))?;
    print(&format!(
        "made a BlobFS on {spec}: {} clusters of {}, {} for files, room for about {} files \
         ({md_free} metadata pages)\n",
        space.total_bytes / space.cluster_bytes,
        human_size(space.cluster_bytes),
        human_size(space.total_bytes),
        md_free.saturating_sub(map_pages(clusters)) / PAGES_PER_FILE
    ))
}

/// Prints `v` as JSON on stdout.
pub fn print_json(v: &Value) -> CliResult {
    let text = serde_json::to_string_pretty(v).ctx("encoding JSON")?;
    print(&format!("{text}\n"))
}

pub fn info(spec: &str, as_json: bool) -> CliResult {
    with_fs(spec, |fs| {
        let bs = fs.blobstore();
        let geo = bs.device().geometry();
        let space = fs.space();
        let names = fs.list("");
        let dirs = names
            .iter()
            .filter(|n| fs.stat(n).is_ok_and(|m| m.is_dir))
            .count();
        let used = space.total_bytes - space.free_bytes;
        if as_json {
            return print_json(&json!({
                "device": bs.device().name(),
                "device_bytes": geo.size_bytes(),
                "block_size": geo.block_size,
                "blocks": geo.block_count,
                "cluster_bytes": space.cluster_bytes,
                "metadata_page_bytes": bs.page_size(),
                "clusters": bs.total_clusters(),
                "data_clusters": bs.data_clusters(),
                "metadata_clusters": bs.total_clusters() - bs.data_clusters(),
                "total_bytes": space.total_bytes,
                "used_bytes": used,
                "free_bytes": space.free_bytes,
                "free_metadata_pages": bs.free_md_pages(),
                "files": names.len() - dirs,
                "directories": dirs,
            }));
        }
        let mut s = String::new();
        s += &format!("device:          {}\n", bs.device().name());
        s += &format!(
            "device size:     {} ({} blocks of {} bytes)\n",
            human_size(geo.size_bytes()),
            geo.block_count,
            geo.block_size
        );
        s += &format!("cluster size:    {}\n", human_size(space.cluster_bytes));
        s += &format!("metadata page:   {} bytes\n", bs.page_size());
        s += &format!(
            "clusters:        {} ({} for files, {} for metadata)\n",
            bs.total_clusters(),
            bs.data_clusters(),
            bs.total_clusters() - bs.data_clusters()
        );
        s += &format!(
            "space:           {} total, {} used, {} free\n",
            human_size(space.total_bytes),
            human_size(used),
            human_size(space.free_bytes)
        );
        s += &format!("metadata pages:  {} free\n", bs.free_md_pages());
        s += &format!(
            "files:           {} (and {} directories)\n",
            names.len() - dirs,
            dirs
        );
        print(&s)
    })
}

/// A file's or directory's metadata as JSON (`allocated_bytes`: the
/// clusters it holds).
fn meta_json(fs: &BlobFs, m: &blobfs::Metadata) -> CliResult<Value> {
    let blob = block_on(fs.blobstore().open_blob(m.blob_id))?;
    let cluster = fs.space().cluster_bytes;
    Ok(json!({
        "name": if m.name.is_empty() { "/" } else { &m.name },
        "kind": if m.is_dir { "directory" } else { "file" },
        "len": m.len,
        "mtime_ns": m.mtime_ns,
        "mtime": utc(m.mtime_ns),
        "blob": m.blob_id.to_string(),
        "clusters": blob.num_clusters(),
        "allocated_bytes": blob.allocated_clusters() * cluster,
    }))
}

fn long_line(m: &blobfs::Metadata, shown: &str) -> String {
    let kind = if m.is_dir { 'd' } else { '-' };
    format!(
        "{kind} {:>12}  {}  {shown}{}\n",
        m.len,
        utc(m.mtime_ns),
        if m.is_dir { "/" } else { "" }
    )
}

pub fn ls(spec: &str, path: &str, long: bool, recursive: bool, as_json: bool) -> CliResult {
    with_fs(spec, |fs| {
        // (full name, name as shown) of every entry to list.
        let mut shown: Vec<(String, String)> = Vec::new();
        match fs.stat(path) {
            Ok(m) if m.is_dir && recursive => {
                let prefix = if m.name.is_empty() {
                    String::new()
                } else {
                    format!("{}/", m.name)
                };
                shown.extend(fs.list(&prefix).into_iter().map(|n| (n.clone(), n)));
            }
            Ok(m) if m.is_dir => {
                for e in fs.read_dir(&m.name)? {
                    let full = if m.name.is_empty() {
                        e.name.clone()
                    } else {
                        format!("{}/{}", m.name, e.name)
                    };
                    shown.push((full, e.name));
                }
            }
            Ok(m) => shown.push((m.name.clone(), m.name)),
            Err(Error::NotFound(_)) => {
                // Not a name: list every name that starts with it.
                let names = fs.list(path);
                if names.is_empty() {
                    return fail(format!("{path}: no such file, directory or prefix"));
                }
                shown.extend(names.into_iter().map(|n| (n.clone(), n)));
            }
            Err(e) => return Err(e.into()),
        }
        if as_json {
            let list = shown
                .iter()
                .map(|(full, _)| meta_json(fs, &fs.stat(full)?))
                .collect::<CliResult<Vec<Value>>>()?;
            return print_json(&Value::Array(list));
        }
        let mut out = String::new();
        for (full, name) in &shown {
            let m = fs.stat(full)?;
            out += &if long {
                long_line(&m, name)
            } else if m.is_dir {
                format!("{name}/\n")
            } else {
                format!("{name}\n")
            };
        }
        print(&out)
    })
}

/// Space below each entry of `dir`: files, the bytes they hold (lengths)
/// and the bytes their clusters take (allocation).
pub fn df(spec: &str, dir: &str, as_json: bool) -> CliResult {
    with_fs(spec, |fs| {
        let m = fs.stat(dir)?;
        if !m.is_dir {
            return fail(format!("{dir}: not a directory"));
        }
        let cluster = fs.space().cluster_bytes;
        // (files, used bytes, allocated bytes) of one name: itself if a
        // file, everything below it if a directory.
        let usage = |name: &str| -> CliResult<(u64, u64, u64)> {
            let m = fs.stat(name)?;
            let names = if m.is_dir {
                fs.list(&format!("{name}/"))
            } else {
                vec![name.to_string()]
            };
            let mut t = (0, 0, 0);
            for n in names {
                let m = fs.stat(&n)?;
                if m.is_dir {
                    continue;
                }
                let blob = block_on(fs.blobstore().open_blob(m.blob_id))?;
                t.0 += 1;
                t.1 += m.len;
                t.2 += blob.allocated_clusters() * cluster;
            }
            Ok(t)
        };
        let mut rows = Vec::new();
        for e in fs.read_dir(&m.name)? {
            let full = if m.name.is_empty() {
                e.name.clone()
            } else {
                format!("{}/{}", m.name, e.name)
            };
            let (files, used, allocated) = usage(&full)?;
            rows.push((full, e.is_dir, files, used, allocated));
        }
        let sum = rows
            .iter()
            .fold((0, 0, 0), |a, r| (a.0 + r.2, a.1 + r.3, a.2 + r.4));
        let space = fs.space();
        let free_md = fs.blobstore().free_md_pages();
        if as_json {
            let entries: Vec<Value> = rows
                .iter()
                .map(|(name, is_dir, files, used, allocated)| {
                    json!({
                        "name": name,
                        "kind": if *is_dir { "directory" } else { "file" },
                        "files": files,
                        "used_bytes": used,
                        "allocated_bytes": allocated,
                    })
                })
                .collect();
            return print_json(&json!({
                "dir": if m.name.is_empty() { "/" } else { &m.name },
                "entries": entries,
                "files": sum.0,
                "used_bytes": sum.1,
                "allocated_bytes": sum.2,
                "fs_total_bytes": space.total_bytes,
                "fs_free_bytes": space.free_bytes,
                "fs_free_metadata_pages": free_md,
            }));
        }
        let mut out = format!(
            "{:>8} {:>12} {:>12}  {}\n",
            "files", "used", "allocated", "name"
        );
        for (name, is_dir, files, used, allocated) in &rows {
            out += &format!(
                "{files:>8} {:>12} {:>12}  {name}{}\n",
                human_size(*used),
                human_size(*allocated),
                if *is_dir { "/" } else { "" }
            );
        }
        out += &format!(
            "{:>8} {:>12} {:>12}  total of {}\n",
            sum.0,
            human_size(sum.1),
            human_size(sum.2),
            if m.name.is_empty() { "/" } else { &m.name }
        );
        out += &format!(
            "file system: {} total, {} free; {} metadata pages free\n",
            human_size(space.total_bytes),
            human_size(space.free_bytes),
            free_md
        );
        print(&out)
    })
}

pub fn stat(spec: &str, name: &str, as_json: bool) -> CliResult {
    with_fs(spec, |fs| {
        let m = fs.stat(name)?;
        if as_json {
            return print_json(&meta_json(fs, &m)?);
        }
        let mut s = String::new();
        s += &format!(
            "name:      {}\n",
            if m.name.is_empty() { "/" } else { &m.name }
        );
        s += &format!(
            "kind:      {}\n",
            if m.is_dir { "directory" } else { "file" }
        );
        if !m.is_dir {
            s += &format!("length:    {} bytes ({})\n", m.len, human_size(m.len));
        }
        s += &format!("modified:  {} ({} ns)\n", utc(m.mtime_ns), m.mtime_ns);
        s += &format!("blob:      {}\n", m.blob_id);
        let blob = block_on(fs.blobstore().open_blob(m.blob_id))?;
        s += &format!(
            "clusters:  {} ({} allocated, {} bytes of space)\n",
            blob.num_clusters(),
            blob.allocated_clusters(),
            blob.size_bytes()
        );
        drop(blob);
        print(&s)
    })
}

/// Fails if `norm` exists and `force` does not allow replacing it.
fn refuse_existing(fs: &BlobFs, norm: &str, force: bool) -> CliResult {
    if !force && fs.exists(norm) {
        return fail(format!(
            "{norm}: already exists (use --force to replace it)"
        ));
    }
    Ok(())
}

/// Writes everything `src` (host file `host`) yields to file `norm`, whose
/// parent exists. The bytes go to a hidden name beside it
/// (`.<name>.importing`), are synced, get `mtime_ns` if given, and only
/// then are renamed over `norm` (atomically): a copy that fails or is
/// killed leaves no partial file under the final name, and a retry starts
/// afresh. Returns the bytes copied.
pub(crate) fn write_via_temp(
    fs: &BlobFs,
    src: &mut dyn Read,
    host: &Path,
    norm: &str,
    force: bool,
    mtime_ns: Option<u64>,
    progress: &Progress,
) -> CliResult<u64> {
    let parent = blobfs::name::parent(norm);
    let base = blobfs::name::base(norm);
    let tmp = if parent.is_empty() {
        format!(".{base}.importing")
    } else {
        format!("{parent}/.{base}.importing")
    };
    let f = fs.open(&tmp, OpenOptions::create_truncate())?;
    let mut buf = vec![0u8; COPY_CHUNK];
    let copied = (|| -> CliResult<u64> {
        let mut total = 0u64;
        loop {
            let n = src
                .read(&mut buf)
                .ctx(format!("reading {}", host.display()))?;
            if n == 0 {
                break;
            }
            f.append(&buf[..n])?;
            progress.inc(n as u64);
            total += n as u64;
        }
        f.close()?;
        if let Some(t) = mtime_ns {
            fs.set_mtime(&tmp, t)?;
        }
        Ok(total)
    })();
    let total = match copied {
        Ok(total) => total,
        Err(e) => {
            let _ = fs.remove_file(&tmp);
            return Err(e);
        }
    };
    // Another command may have made `norm` meanwhile.
    if let Err(e) = refuse_existing(fs, norm, force) {
        let _ = fs.remove_file(&tmp);
        return Err(e);
    }
    fs.rename(&tmp, norm)?;
    Ok(total)
}

/// Copies host file `host` to `name` (see [`write_via_temp`]).
pub fn import(spec: &str, host: &Path, name: &str, parents: bool, force: bool) -> CliResult {
    let mut src = std::fs::File::open(host).ctx(host.display())?;
    let total = src.metadata().map_or(0, |m| m.len());
    with_fs(spec, |fs| {
        let norm = blobfs::name::normalize_entry(name)?;
        if parents {
            fs.create_dir_all(blobfs::name::parent(&norm))?;
        }
        refuse_existing(fs, &norm, force)?;
        let progress = Progress::bytes(total, &norm);
        write_via_temp(fs, &mut src, host, &norm, force, None, &progress)?;
        Ok(())
    })
}

/// Streams file `name` into `out`.
fn copy_out(
    fs: &BlobFs,
    name: &str,
    progress: &Progress,
    mut out: impl FnMut(&[u8]) -> CliResult,
) -> CliResult<u64> {
    let f = fs.open(name, OpenOptions::read())?;
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut off = 0u64;
    loop {
        let n = f.read_at(off, &mut buf)?;
        if n == 0 {
            break;
        }
        out(&buf[..n])?;
        progress.inc(n as u64);
        off += n as u64;
    }
    f.close()?;
    Ok(off)
}

/// Copies file `name` to host file `host` (created or replaced) and syncs
/// it; returns the bytes copied.
pub(crate) fn export_file(
    fs: &BlobFs,
    name: &str,
    host: &Path,
    progress: &Progress,
) -> CliResult<u64> {
    let mut dst = std::fs::File::create(host).ctx(host.display())?;
    let n = copy_out(fs, name, progress, |b| {
        dst.write_all(b).ctx(format!("writing {}", host.display()))
    })?;
    // A regular file is synced; a pipe or a device (/dev/null, a tty)
    // has nothing to sync and refuses fsync.
    let regular = dst
        .metadata()
        .ctx(format!("stat of {}", host.display()))?
        .file_type()
        .is_file();
    if regular {
        dst.sync_all().ctx(format!("syncing {}", host.display()))?;
    }
    Ok(n)
}

pub fn export(spec: &str, name: &str, host: &Path) -> CliResult {
    with_fs(spec, |fs| {
        // Fail on a missing name before creating the host file.
        let m = fs.stat(name)?;
        if m.is_dir {
            return fail(format!("{name}: is a directory"));
        }
        export_file(fs, name, host, &Progress::bytes(m.len, &m.name))?;
        Ok(())
    })
}

pub fn cat(spec: &str, name: &str) -> CliResult {
    with_fs(spec, |fs| {
        copy_out(fs, name, &Progress::hidden(), write_stdout)?;
        Ok(())
    })
}

pub fn rm(spec: &str, names: &[String], recursive: bool) -> CliResult {
    with_fs(spec, |fs| {
        for name in names {
            let m = fs.stat(name)?;
            if !m.is_dir {
                fs.remove_file(&m.name)?;
                continue;
            }
            if m.name.is_empty() {
                return fail("refusing to remove the root directory");
            }
            if recursive {
                // Deepest names first, so directories are empty when reached.
                let mut below = fs.list(&format!("{}/", m.name));
                below.sort_by(|a, b| b.cmp(a));
                for n in below {
                    if fs.stat(&n)?.is_dir {
                        fs.remove_dir(&n)?;
                    } else {
                        fs.remove_file(&n)?;
                    }
                }
            }
            fs.remove_dir(&m.name)?;
        }
        Ok(())
    })
}

pub fn mv(spec: &str, from: &str, to: &str) -> CliResult {
    with_fs(spec, |fs| Ok(fs.rename(from, to)?))
}

pub fn mkdir(spec: &str, dir: &str, parents: bool) -> CliResult {
    with_fs(spec, |fs| {
        if parents {
            fs.create_dir_all(dir)?;
        } else {
            fs.create_dir(dir)?;
        }
        Ok(())
    })
}

/// Unmaps every free cluster of the device (as `fstrim`), after mounting,
/// so deletes a crash cut short are finished and their clusters trimmed.
pub fn trim(spec: &str, as_json: bool) -> CliResult {
    with_fs(spec, |fs| {
        let r = block_on(fs.blobstore().trim_free()).map_err(|e| match e {
            blobstore::Error::Unsupported(why) => {
                crate::util::CliError(format!("{spec}: not supported: {why}"))
            }
            e => crate::util::CliError(format!("trimming {spec}: {e}")),
        })?;
        if as_json {
            return print_json(&json!({
                "device": spec,
                "clusters": r.clusters,
                "bytes": r.bytes,
                "runs": r.runs,
                "requests": r.requests,
            }));
        }
        print(&format!(
            "trimmed {} free clusters ({}) in {} runs on {spec}\n",
            r.clusters,
            human_size(r.bytes),
            r.runs
        ))
    })
}
