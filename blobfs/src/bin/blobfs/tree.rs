//! Whole trees between a BlobFS and a host directory: `backup` and
//! `restore`. Names, directories, bytes and modification times go across;
//! every file is written under a temporary name and renamed when whole, so
//! an interrupted run leaves no partial file under a real name.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::ops::{export_file, print_json, with_fs, write_via_temp};
use crate::util::{fail, human_size, print, CliResult, Ctx, Progress};

/// What a backup or restore copied.
#[derive(Default)]
struct Summary {
    files: u64,
    bytes: u64,
    directories: u64,
    skipped: u64,
}

impl Summary {
    fn print(&self, verb: &str, from: &str, to: &str, as_json: bool) -> CliResult {
        if as_json {
            return print_json(&json!({
                "from": from,
                "to": to,
                "files": self.files,
                "bytes": self.bytes,
                "directories": self.directories,
                "skipped": self.skipped,
            }));
        }
        let mut s = format!(
            "{verb} {} files ({}, {} bytes) and {} directories from {from} to {to}",
            self.files,
            human_size(self.bytes),
            self.bytes,
            self.directories
        );
        if self.skipped > 0 {
            s += &format!(
                "; skipped {} entries that are not files or directories",
                self.skipped
            );
        }
        print(&(s + "\n"))
    }
}

fn to_ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Sets a host file's or directory's modification time.
fn set_host_mtime(path: &Path, mtime_ns: u64) -> CliResult {
    let t = UNIX_EPOCH + Duration::from_nanos(mtime_ns);
    std::fs::File::open(path)
        .and_then(|f| f.set_modified(t))
        .ctx(format!(
            "setting the modification time of {}",
            path.display()
        ))
}

/// Makes `dir` for a backup: created if missing, else it must be an empty
/// directory (a backup never mixes with or replaces what is there).
fn backup_dir(dir: &Path) -> CliResult {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return fail(format!(
                    "{}: exists and is not empty (back up into a new or empty directory)",
                    dir.display()
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).ctx(format!("creating {}", dir.display()))
        }
        Err(e) => fail(format!("{}: {e}", dir.display())),
    }
}

/// Copies every file and directory of the file system on `spec` into the
/// new (or empty) host directory `dir`, with their modification times.
pub fn backup(spec: &str, dir: &Path, as_json: bool) -> CliResult {
    with_fs(spec, |fs| {
        backup_dir(dir)?;
        // Sorted full names: a directory comes before everything in it.
        let entries = fs
            .list("")
            .iter()
            .map(|n| fs.stat(n))
            .collect::<Result<Vec<_>, _>>()?;
        let total = entries.iter().filter(|m| !m.is_dir).map(|m| m.len).sum();
        let progress = Progress::bytes(total, "backup");
        let mut sum = Summary::default();
        for m in entries.iter() {
            // A damaged image must not send a file outside `dir`.
            if blobfs::name::normalize_entry(&m.name).ok().as_deref() != Some(m.name.as_str()) {
                return fail(format!(
                    "{:?}: not a normalized name (run fsck); nothing more backed up",
                    m.name
                ));
            }
            let host = dir.join(&m.name);
            if m.is_dir {
                std::fs::create_dir_all(&host).ctx(format!("creating {}", host.display()))?;
                sum.directories += 1;
                continue;
            }
            progress.set_message(&m.name);
            let base = blobfs::name::base(&m.name);
            let tmp = host.with_file_name(format!(".{base}.backup-partial"));
            let copied = export_file(fs, &m.name, &tmp, &progress).and_then(|n| {
                std::fs::rename(&tmp, &host).ctx(format!("renaming to {}", host.display()))?;
                Ok(n)
            });
            let n = copied.inspect_err(|_| {
                let _ = std::fs::remove_file(&tmp);
            })?;
            set_host_mtime(&host, m.mtime_ns)?;
            sum.files += 1;
            sum.bytes += n;
        }
        // Directories last, deepest first: making their entries changed
        // their times.
        for m in entries.iter().rev().filter(|m| m.is_dir) {
            set_host_mtime(&dir.join(&m.name), m.mtime_ns)?;
        }
        drop(progress);
        sum.print("backed up", spec, &dir.display().to_string(), as_json)
    })
}

/// One entry of a host tree to restore.
struct HostEntry {
    /// Its name in the file system ('/'-separated, relative to the tree).
    name: String,
    path: PathBuf,
    is_dir: bool,
    len: u64,
    mtime_ns: u64,
}

/// Every directory and regular file below `dir`, parents before their
/// entries, in name order. Symbolic links and special files are skipped
/// with a warning on stderr, and counted in `skipped`.
fn walk_host(dir: &Path, prefix: &str, out: &mut Vec<HostEntry>, skipped: &mut u64) -> CliResult {
    let mut list: Vec<_> = std::fs::read_dir(dir)
        .ctx(dir.display())?
        .collect::<Result<_, _>>()
        .ctx(dir.display())?;
    list.sort_by_key(|e| e.file_name());
    for e in list {
        let path = e.path();
        let Some(base) = e.file_name().to_str().map(str::to_string) else {
            eprintln!("blobfs: skipping {}: its name is not UTF-8", path.display());
            *skipped += 1;
            continue;
        };
        let name = if prefix.is_empty() {
            base
        } else {
            format!("{prefix}/{base}")
        };
        // Not followed: a link is itself the entry.
        let meta = std::fs::symlink_metadata(&path).ctx(path.display())?;
        let kind = meta.file_type();
        if !kind.is_dir() && !kind.is_file() {
            let what = if kind.is_symlink() {
                "a symbolic link"
            } else {
                "not a regular file or directory"
            };
            eprintln!("blobfs: skipping {}: {what}", path.display());
            *skipped += 1;
            continue;
        }
        let mtime_ns = to_ns(meta.modified().ctx(path.display())?);
        out.push(HostEntry {
            name: name.clone(),
            path: path.clone(),
            is_dir: kind.is_dir(),
            len: meta.len(),
            mtime_ns,
        });
        if kind.is_dir() {
            walk_host(&path, &name, out, skipped)?;
        }
    }
    Ok(())
}

/// Copies the host tree `dir` into the file system on `spec`, with names,
/// directories and modification times. Existing directories are merged
/// into; an existing file is an error (before anything is written) unless
/// `force`, which replaces it.
pub fn restore(dir: &Path, spec: &str, force: bool, as_json: bool) -> CliResult {
    if !std::fs::metadata(dir).ctx(dir.display())?.is_dir() {
        return fail(format!("{}: not a directory", dir.display()));
    }
    let mut entries = Vec::new();
    let mut sum = Summary::default();
    walk_host(dir, "", &mut entries, &mut sum.skipped)?;
    with_fs(spec, |fs| {
        for e in &entries {
            blobfs::name::normalize_entry(&e.name).ctx(e.path.display())?;
        }
        if !force {
            let clobbered: Vec<&str> = entries
                .iter()
                .filter(|e| !e.is_dir && fs.exists(&e.name))
                .map(|e| e.name.as_str())
                .collect();
            if let Some(first) = clobbered.first() {
                return fail(format!(
                    "{first}{}: already exists in {spec}; nothing restored \
                     (use --force to replace existing files)",
                    match clobbered.len() {
                        1 => String::new(),
                        n => format!(" and {} more files", n - 1),
                    }
                ));
            }
        }
        let total = entries.iter().filter(|e| !e.is_dir).map(|e| e.len).sum();
        let progress = Progress::bytes(total, "restore");
        for e in &entries {
            if e.is_dir {
                fs.create_dir_all(&e.name)?;
                sum.directories += 1;
                continue;
            }
            progress.set_message(&e.name);
            let mut src = std::fs::File::open(&e.path).ctx(e.path.display())?;
            let n = write_via_temp(
                fs,
                &mut src,
                &e.path,
                &e.name,
                force,
                Some(e.mtime_ns),
                &progress,
            )?;
            sum.files += 1;
            sum.bytes += n;
        }
        // Directories last, once nothing more is made in them.
        for e in entries.iter().filter(|e| e.is_dir) {
            fs.set_mtime(&e.name, e.mtime_ns)?;
        }
        drop(progress);
        sum.print("restored", &dir.display().to_string(), spec, as_json)
    })
}
