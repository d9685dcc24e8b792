//! The file commands: mkfs, info, ls, stat, import, export, cat, rm, mv,
//! mkdir. Each mounts the file system, does its work and unmounts, so what
//! it changed is durable when it exits.

use std::io::{Read, Write};
use std::path::Path;

use blobfs::{BlobFs, Error, MkfsOptions, MountOptions, OpenOptions};
use blobstore::block_on;

use crate::util::{fail, human, open_device, print, utc, write_stdout, CliResult, Ctx};

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

pub fn mkfs(spec: &str, cluster_size: u32, force: bool) -> CliResult {
    let dev = open_device(spec)?;
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
            ..Default::default()
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
    fs.unmount().ctx(format!("unmounting {spec}"))?;
    print(&format!(
        "made a BlobFS on {spec}: {} clusters of {}, {} for files\n",
        space.total_bytes / space.cluster_bytes,
        human(space.cluster_bytes),
        human(space.total_bytes)
    ))
}

pub fn info(spec: &str) -> CliResult {
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
        let mut s = String::new();
        s += &format!("device:          {}\n", bs.device().name());
        s += &format!(
            "device size:     {} ({} blocks of {} bytes)\n",
            human(geo.size_bytes()),
            geo.block_count,
            geo.block_size
        );
        s += &format!("cluster size:    {}\n", human(space.cluster_bytes));
        s += &format!("metadata page:   {} bytes\n", bs.page_size());
        s += &format!(
            "clusters:        {} ({} for files, {} for metadata)\n",
            bs.total_clusters(),
            bs.data_clusters(),
            bs.total_clusters() - bs.data_clusters()
        );
        s += &format!(
            "space:           {} total, {} used, {} free\n",
            human(space.total_bytes),
            human(used),
            human(space.free_bytes)
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

fn long_line(m: &blobfs::Metadata, shown: &str) -> String {
    let kind = if m.is_dir { 'd' } else { '-' };
    format!(
        "{kind} {:>12}  {}  {shown}{}\n",
        m.len,
        utc(m.mtime_ns),
        if m.is_dir { "/" } else { "" }
    )
}

pub fn ls(spec: &str, path: &str, long: bool, recursive: bool) -> CliResult {
    with_fs(spec, |fs| {
        let line = |full: &str, shown: &str| -> CliResult<String> {
            let m = fs.stat(full)?;
            Ok(if long {
                long_line(&m, shown)
            } else if m.is_dir {
                format!("{shown}/\n")
            } else {
                format!("{shown}\n")
            })
        };
        let mut out = String::new();
        match fs.stat(path) {
            Ok(m) if m.is_dir && recursive => {
                let prefix = if m.name.is_empty() {
                    String::new()
                } else {
                    format!("{}/", m.name)
                };
                for n in fs.list(&prefix) {
                    out += &line(&n, &n)?;
                }
            }
            Ok(m) if m.is_dir => {
                for e in fs.read_dir(&m.name)? {
                    let full = if m.name.is_empty() {
                        e.name.clone()
                    } else {
                        format!("{}/{}", m.name, e.name)
                    };
                    out += &line(&full, &e.name)?;
                }
            }
            Ok(m) => out += &line(&m.name, &m.name)?,
            Err(Error::NotFound(_)) => {
                // Not a name: list every name that starts with it.
                let names = fs.list(path);
                if names.is_empty() {
                    return fail(format!("{path}: no such file, directory or prefix"));
                }
                for n in names {
                    out += &line(&n, &n)?;
                }
            }
            Err(e) => return Err(e.into()),
        }
        print(&out)
    })
}

pub fn stat(spec: &str, name: &str) -> CliResult {
    with_fs(spec, |fs| {
        let m = fs.stat(name)?;
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
            s += &format!("length:    {} bytes ({})\n", m.len, human(m.len));
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

/// Copies host file `host` to `name`. The bytes go to a hidden name beside
/// it (`.<name>.importing`), are synced, and only then renamed over `name`
/// (atomically): an import that fails or is killed leaves no partial file
/// under the final name, and a retry starts afresh.
pub fn import(spec: &str, host: &Path, name: &str, parents: bool, force: bool) -> CliResult {
    let mut src = std::fs::File::open(host).ctx(host.display())?;
    with_fs(spec, |fs| {
        let norm = blobfs::name::normalize_entry(name)?;
        let parent = blobfs::name::parent(&norm).to_string();
        if parents {
            fs.create_dir_all(&parent)?;
        }
        if !force && fs.exists(&norm) {
            return fail(format!(
                "{norm}: already exists (use --force to replace it)"
            ));
        }
        let base = blobfs::name::base(&norm);
        let tmp = if parent.is_empty() {
            format!(".{base}.importing")
        } else {
            format!("{parent}/.{base}.importing")
        };
        let f = fs.open(&tmp, OpenOptions::create_truncate())?;
        let mut buf = vec![0u8; COPY_CHUNK];
        let copied = (|| -> CliResult {
            loop {
                let n = src
                    .read(&mut buf)
                    .ctx(format!("reading {}", host.display()))?;
                if n == 0 {
                    break;
                }
                f.append(&buf[..n])?;
            }
            f.close()?;
            Ok(())
        })();
        if let Err(e) = copied {
            let _ = fs.remove_file(&tmp);
            return Err(e);
        }
        // Another import may have made `name` meanwhile.
        if !force && fs.exists(&norm) {
            let _ = fs.remove_file(&tmp);
            return fail(format!(
                "{norm}: already exists (use --force to replace it)"
            ));
        }
        fs.rename(&tmp, &norm)?;
        Ok(())
    })
}

/// Streams file `name` into `out`.
fn copy_out(fs: &BlobFs, name: &str, mut out: impl FnMut(&[u8]) -> CliResult) -> CliResult {
    let f = fs.open(name, OpenOptions::read())?;
    let mut buf = vec![0u8; COPY_CHUNK];
    let mut off = 0u64;
    loop {
        let n = f.read_at(off, &mut buf)?;
        if n == 0 {
            break;
        }
        out(&buf[..n])?;
        off += n as u64;
    }
    f.close()?;
    Ok(())
}

pub fn export(spec: &str, name: &str, host: &Path) -> CliResult {
    with_fs(spec, |fs| {
        // Fail on a missing name before creating the host file.
        if fs.stat(name)?.is_dir {
            return fail(format!("{name}: is a directory"));
        }
        let mut dst = std::fs::File::create(host).ctx(host.display())?;
        copy_out(fs, name, |b| {
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
        Ok(())
    })
}

pub fn cat(spec: &str, name: &str) -> CliResult {
    with_fs(spec, |fs| copy_out(fs, name, write_stdout))
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
