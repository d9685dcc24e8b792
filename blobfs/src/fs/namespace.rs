//! Namespace operations other than rename: open and create, stat and
//! mtime, listings, directories, deletes.
//!
//! Invariants:
//! - Changes (create, mkdir, rmdir, delete, set_mtime) run one at a time
//!   under `ns`; lookups (stat, exists, listings, and an open's lookup of
//!   an existing file) take only the index's read lock.
//! - A create becomes durable with the one metadata sync of the blob it
//!   makes, which names it (the commit point).
//! - A file deleted while open keeps its blob until the last handle goes:
//!   the delete marks the blob `fs.unlinked`, durably, so a crash does not
//!   bring the name back, and leaves the node in `pending`; the next
//!   namespace change, close or unmount that finds no handle left deletes
//!   the blob (or the next mount does).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use blobstore::{block_on, BlobId};

use super::index::Entry;
use super::{BlobFs, DirEntry, OpenOptions};
use crate::error::{Context, Error, Result};
use crate::fs::file::{File, FileNode, Metadata};
use crate::meta;
use crate::name::{self, normalize, normalize_entry};

impl BlobFs {
    /// Opens (and with `create`, creates) a file.
    pub async fn open_async(&self, name: &str, opts: OpenOptions) -> Result<File> {
        let name = normalize_entry(name)?;
        let fs = &self.inner;
        let existing = fs.lookup(&name);
        let node = match existing {
            Some(Entry::Dir(_)) => return Err(Error::IsADirectory(name)),
            Some(Entry::File(_)) if opts.create_new => return Err(Error::AlreadyExists(name)),
            Some(Entry::File(n)) => n,
            None if !opts.create && !opts.create_new => return Err(Error::NotFound(name)),
            None => {
                let _g = fs.ns.lock().await;
                match fs.lookup(&name) {
                    Some(Entry::File(n)) if !opts.create_new => n,
                    Some(Entry::File(_)) => return Err(Error::AlreadyExists(name)),
                    Some(Entry::Dir(_)) => return Err(Error::IsADirectory(name)),
                    None => {
                        fs.check_parent(&name)?;
                        let e = fs.create_node(&name, meta::KIND_FILE).await?;
                        fs.index.write().insert(name.clone(), e.clone());
                        match e {
                            Entry::File(n) => n,
                            Entry::Dir(_) => unreachable!("created a file"),
                        }
                    }
                }
            }
        };
        let f = fs.handle(node, opts);
        if opts.truncate && opts.write && !f.is_empty() {
            f.truncate_async(0).await?;
        }
        Ok(f)
    }

    /// Synchronous [`BlobFs::open_async`].
    pub fn open(&self, name: &str, opts: OpenOptions) -> Result<File> {
        block_on(self.open_async(name, opts))
    }

    /// Creates a new, empty file for reading and writing; fails if it exists.
    pub fn create(&self, name: &str) -> Result<File> {
        self.open(
            name,
            OpenOptions {
                read: true,
                write: true,
                create_new: true,
                ..Default::default()
            },
        )
    }

    /// Metadata of a file or directory.
    pub fn stat(&self, name: &str) -> Result<Metadata> {
        let name = normalize(name)?;
        if name.is_empty() {
            return Ok(Metadata {
                name,
                is_dir: true,
                len: 0,
                mtime_ns: 0,
                blob_id: self.inner.bs.super_blob().unwrap_or(BlobId(0)),
            });
        }
        match self.inner.lookup(&name) {
            None => Err(Error::NotFound(name)),
            Some(Entry::File(n)) => Ok(Metadata {
                name,
                is_dir: false,
                len: n.len.load(Ordering::Acquire),
                mtime_ns: n.mtime.load(Ordering::Acquire),
                blob_id: n.blob.id(),
            }),
            Some(Entry::Dir(d)) => Ok(Metadata {
                name,
                is_dir: true,
                len: 0,
                mtime_ns: d.mtime.load(Ordering::Acquire),
                blob_id: d.blob.id(),
            }),
        }
    }

    /// Sets the modification time of a file or directory, in nanoseconds
    /// since the Unix epoch, and makes it durable (with a file's data
    /// written before). The root directory has no time of its own: it is
    /// [`Error::InvalidArgument`]. A later write to a file sets its time to
    /// the time of that write, as on any file system.
    pub async fn set_mtime_async(&self, name: &str, mtime_ns: u64) -> Result<()> {
        let name = normalize(name)?;
        if name.is_empty() {
            return Err(Error::InvalidArgument(
                "the root directory has no modification time to set".into(),
            ));
        }
        let fs = &self.inner;
        let _g = fs.ns.lock().await;
        match fs.lookup(&name) {
            None => Err(Error::NotFound(name)),
            Some(Entry::File(n)) => n.set_mtime(fs, mtime_ns).await,
            Some(Entry::Dir(d)) => {
                d.blob
                    .set_xattr(meta::MTIME, &meta::enc_u64(mtime_ns))
                    .ctx(&name)?;
                d.blob.sync_metadata().await.ctx(&name)?;
                d.mtime.store(mtime_ns, Ordering::Release);
                Ok(())
            }
        }
    }

    /// Synchronous [`BlobFs::set_mtime_async`].
    pub fn set_mtime(&self, name: &str, mtime_ns: u64) -> Result<()> {
        block_on(self.set_mtime_async(name, mtime_ns))
    }

    /// True if a file or directory of that name exists.
    pub fn exists(&self, name: &str) -> bool {
        normalize(name).is_ok_and(|n| n.is_empty() || self.inner.lookup(&n).is_some())
    }

    /// All file and directory names that start with `prefix`, sorted.
    pub fn list(&self, prefix: &str) -> Vec<String> {
        let prefix = prefix.trim_start_matches('/');
        let mut v: Vec<String> = self
            .inner
            .index
            .read()
            .entries
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// The entries of directory `dir` ("" or "/" for the root), sorted.
    pub fn read_dir(&self, dir: &str) -> Result<Vec<DirEntry>> {
        let dir = normalize(dir)?;
        let idx = self.inner.index.read();
        if !idx.is_dir(&dir) {
            return Err(match idx.entries.get(&dir) {
                Some(_) => Error::NotADirectory(dir),
                None => Error::NotFound(dir),
            });
        }
        Ok(idx
            .children
            .get(&dir)
            .map(|set| {
                set.iter()
                    .map(|full| DirEntry {
                        name: name::base(full).to_string(),
                        is_dir: idx.is_dir(full),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Creates a directory; its parent must exist.
    pub async fn create_dir_async(&self, dir: &str) -> Result<()> {
        let dir = normalize_entry(dir)?;
        let fs = &self.inner;
        let _g = fs.ns.lock().await;
        if fs.lookup(&dir).is_some() {
            return Err(Error::AlreadyExists(dir));
        }
        fs.check_parent(&dir)?;
        let e = fs.create_node(&dir, meta::KIND_DIR).await?;
        fs.index.write().insert(dir, e);
        Ok(())
    }

    /// Synchronous [`BlobFs::create_dir_async`].
    pub fn create_dir(&self, dir: &str) -> Result<()> {
        block_on(self.create_dir_async(dir))
    }

    /// Creates a directory and any missing parents; fine if it exists.
    pub fn create_dir_all(&self, dir: &str) -> Result<()> {
        let dir = normalize(dir)?;
        let mut path = String::new();
        for comp in dir.split('/').filter(|c| !c.is_empty()) {
            if !path.is_empty() {
                path.push('/');
            }
            path.push_str(comp);
            match self.create_dir(&path) {
                Ok(()) => {}
                Err(Error::AlreadyExists(_)) if self.inner.index.read().is_dir(&path) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Removes an empty directory.
    pub async fn remove_dir_async(&self, dir: &str) -> Result<()> {
        let dir = normalize_entry(dir)?;
        let fs = &self.inner;
        let _g = fs.ns.lock().await;
        let node = match fs.lookup(&dir) {
            None => return Err(Error::NotFound(dir)),
            Some(Entry::File(_)) => return Err(Error::NotADirectory(dir)),
            Some(Entry::Dir(d)) => d,
        };
        if fs
            .index
            .read()
            .children
            .get(&dir)
            .is_some_and(|c| !c.is_empty())
        {
            return Err(Error::DirectoryNotEmpty(dir));
        }
        let id = node.blob.id();
        fs.index.write().remove(&dir);
        drop(node);
        fs.bs.delete_blob(id).await.ctx(&dir)
    }

    /// Synchronous [`BlobFs::remove_dir_async`].
    pub fn remove_dir(&self, dir: &str) -> Result<()> {
        block_on(self.remove_dir_async(dir))
    }

    /// Deletes a file. Open handles keep reading its data until they close.
    pub async fn remove_file_async(&self, name: &str) -> Result<()> {
        let name = normalize_entry(name)?;
        let fs = &self.inner;
        let _g = fs.ns.lock().await;
        let node = match fs.lookup(&name) {
            None => return Err(Error::NotFound(name)),
            Some(Entry::Dir(_)) => return Err(Error::IsADirectory(name)),
            Some(Entry::File(n)) => n,
        };
        fs.index.write().remove(&name);
        self.unlink_node(node, &name).await?;
        fs.reap_pending().await
    }

    /// Synchronous [`BlobFs::remove_file_async`].
    pub fn remove_file(&self, name: &str) -> Result<()> {
        block_on(self.remove_file_async(name))
    }

    /// Drops a node that left the index (ns lock held).
    pub(super) async fn unlink_node(&self, node: Arc<FileNode>, name: &str) -> Result<()> {
        let fs = &self.inner;
        node.unlinked.store(true, Ordering::Release);
        if node.handles.load(Ordering::Acquire) > 0 {
            // Still open: mark it durably so a crash before the last close
            // does not bring the name back.
            node.blob.set_xattr(meta::UNLINKED, &[1]).ctx(name)?;
            node.blob.sync_metadata().await.ctx(name)?;
        }
        fs.pending.lock().push(node);
        Ok(())
    }
}
