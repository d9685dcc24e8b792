//! Rename ([`BlobFs::rename`]): atomic, of a file (replacing an existing
//! target file) or of a directory with everything below it.
//!
//! Invariants:
//! - A rename becomes durable with one metadata sync of the blob it names
//!   (the commit point); a replaced target is deleted after that, and a
//!   crash in between is resolved at mount by `fs.seq`.
//! - A directory rename commits its directory's blob with an intent marker
//!   (`fs.moved_from`), then renames the entries below it, then clears the
//!   marker; mount finishes any rename it finds marked.
//! - At most one directory rename's marker is set at a time: one that an
//!   error left unfinished (`unfinished`) is finished before the next
//!   directory rename starts, and at unmount.
//! - A rename that syncs a file's metadata (a rename of the file or of a
//!   directory above it) holds that file's write lock around the sync,
//!   taken after `ns` (never the other way round: a file operation gives
//!   up its write lock before it takes `ns`), so the sync never makes a
//!   length durable that the file's own sync set before writing the data.
//! - Open files keep working under their new names, and locks move with
//!   their names (see `locks.rs`).

use std::sync::Arc;

use blobstore::{block_on, Blob};

use super::index::{DirNode, Entry};
use super::{BlobFs, FsInner};
use crate::error::{Context, Error, Result};
use crate::meta;
use crate::name::{self, normalize_entry};

impl BlobFs {
    /// Renames a file or a directory atomically, as POSIX `rename(2)`.
    ///
    /// A file replaces an existing target file (a directory target is
    /// [`Error::IsADirectory`]). A directory moves with everything below
    /// it; its target must not exist or be an empty directory, which it
    /// replaces ([`Error::DirectoryNotEmpty`] otherwise, and
    /// [`Error::NotADirectory`] for a file); a directory cannot move into
    /// itself or below itself ([`Error::InvalidArgument`]). The target's
    /// parent must be a directory. Renaming a name to itself does nothing.
    ///
    /// Open files keep working and what they write later is kept under
    /// their new names; locks ([`BlobFs::lock`]) move with their names.
    /// After a crash at any point, the next mount finds the whole file or
    /// tree under the old name or under the new one, never both, never
    /// split. An error after a directory rename's commit point leaves it
    /// done in memory and durable, with its last steps finished by the
    /// next directory rename, the unmount or the next mount.
    pub async fn rename_async(&self, from: &str, to: &str) -> Result<()> {
        let from = normalize_entry(from)?;
        let to = normalize_entry(to)?;
        let fs = &self.inner;
        let _g = fs.ns.lock().await;
        let node = match fs.lookup(&from) {
            None => return Err(Error::NotFound(from)),
            Some(Entry::Dir(d)) => return self.rename_dir(&from, &to, d).await,
            Some(Entry::File(n)) => n,
        };
        if from == to {
            return Ok(());
        }
        let replaced = match fs.lookup(&to) {
            Some(Entry::Dir(_)) => return Err(Error::IsADirectory(to)),
            Some(Entry::File(n)) => Some(n),
            None => None,
        };
        fs.check_parent(&to)?;
        let seq = fs.next_seq();
        {
            // The file's write lock over the metadata sync (after the ns
            // lock, as everywhere): a sync of the file sets its length
            // before it writes its data, and our sync in between would make
            // that length durable over bytes not written yet (see
            // `sync_name`).
            let _st = node.state.lock().await;
            node.blob.set_xattr(meta::NAME, to.as_bytes()).ctx(&from)?;
            node.blob
                .set_xattr(meta::SEQ, &meta::enc_u64(seq))
                .ctx(&from)?;
            if let Err(e) = node.blob.sync_metadata().await.ctx(&from) {
                // Not committed: put the old name back in memory.
                let _ = node.blob.set_xattr(meta::NAME, from.as_bytes());
                return Err(e);
            }
        }
        {
            let mut idx = fs.index.write();
            idx.remove(&from);
            if replaced.is_some() {
                idx.remove(&to);
            }
            *node.name.write() = to.clone();
            idx.insert(to.clone(), Entry::File(node));
        }
        fs.move_locks(&from, &to, false);
        if let Some(old) = replaced {
            self.unlink_node(old, &to).await?;
        }
        fs.reap_pending().await
    }

    /// [`BlobFs::rename_async`] of directory `from` (ns lock held).
    ///
    /// The commit point is one metadata sync of the directory's blob: its
    /// new name and `fs.seq`, with the intent marker `fs.moved_from`
    /// naming the old name (see [`meta`]). Then each entry below gets its
    /// new name, synced; then the marker goes. A mount that finds the
    /// marker finishes the rename before anything else.
    async fn rename_dir(&self, from: &str, to: &str, dir: Arc<DirNode>) -> Result<()> {
        let fs = &self.inner;
        if from == to {
            return Ok(());
        }
        if name::is_within(to, from) {
            return Err(Error::InvalidArgument(format!(
                "cannot move directory {from} into itself ({to} is below it)"
            )));
        }
        let replaced = match fs.lookup(to) {
            Some(Entry::File(_)) => return Err(Error::NotADirectory(to.to_string())),
            Some(Entry::Dir(d)) => {
                let empty = fs
                    .index
                    .read()
                    .children
                    .get(to)
                    .is_none_or(|c| c.is_empty());
                if !empty {
                    return Err(Error::DirectoryNotEmpty(to.to_string()));
                }
                Some(d)
            }
            None => None,
        };
        fs.check_parent(to)?;
        let below = fs.index.read().below(from);
        if let Some(long) = below
            .iter()
            .filter_map(|n| name::rebase(n, from, to))
            .find(|n| n.len() > name::MAX_NAME_LEN)
        {
            return Err(Error::InvalidName {
                name: long,
                reason: format!(
                    "the rename would make it longer than {} bytes",
                    name::MAX_NAME_LEN
                ),
            });
        }
        // One rename with its marker at a time: an earlier one's first.
        fs.finish_unfinished().await?;
        let seq = fs.next_seq();
        let old_seq = dir.blob.get_xattr(meta::SEQ);
        let commit = async {
            dir.blob.set_xattr(meta::NAME, to.as_bytes()).ctx(from)?;
            dir.blob
                .set_xattr(meta::SEQ, &meta::enc_u64(seq))
                .ctx(from)?;
            dir.blob
                .set_xattr(meta::MOVED_FROM, &meta::enc_moved_from(seq, from))
                .ctx(from)?;
            dir.blob.sync_metadata().await.ctx(from)
        };
        if let Err(e) = commit.await {
            // Not committed: the old metadata back in memory, and on the
            // device too if it can take it (the failed sync may have
            // landed).
            let _ = dir.blob.set_xattr(meta::NAME, from.as_bytes());
            if let Some(s) = old_seq {
                let _ = dir.blob.set_xattr(meta::SEQ, &s);
            }
            if dir.blob.get_xattr(meta::MOVED_FROM).is_some() {
                let _ = dir.blob.remove_xattr(meta::MOVED_FROM);
            }
            let _ = dir.blob.sync_metadata().await;
            return Err(e);
        }
        // Committed: the rename is done, in memory from here on.
        {
            let mut idx = fs.index.write();
            if replaced.is_some() {
                idx.remove(to);
            }
            idx.move_tree(from, to);
        }
        fs.move_locks(from, to, true);
        let finished = fs.finish_move(to, &dir.blob).await;
        if finished.is_err() {
            fs.unfinished.lock().push((to.to_string(), dir.blob.id()));
        }
        let deleted = match replaced {
            // Its name is taken by a higher `fs.seq`: a crash before this
            // delete leaves it to the next mount to delete.
            Some(old) => {
                let id = old.blob.id();
                drop(old);
                fs.bs.delete_blob(id).await.ctx(to)
            }
            None => Ok(()),
        };
        finished.and(deleted)
    }

    /// Synchronous [`BlobFs::rename_async`].
    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        block_on(self.rename_async(from, to))
    }
}

impl FsInner {
    /// Makes entry `e`'s name `name` durable. A file's write lock is held
    /// meanwhile: a sync of the file sets its length before it writes its
    /// data, and a metadata sync of ours in between would make that length
    /// durable over bytes not written yet.
    async fn sync_name(&self, name: &str, e: &Entry) -> Result<()> {
        let (blob, _st) = match e {
            Entry::File(n) => (&n.blob, Some(n.state.lock().await)),
            Entry::Dir(d) => (&d.blob, None),
        };
        blob.set_xattr(meta::NAME, name.as_bytes()).ctx(name)?;
        blob.sync_metadata().await.ctx(name)
    }

    /// Finishes the durable part of directory `dir`'s rename (its blob
    /// `dir_blob` holds the `fs.moved_from` marker, durable): every entry
    /// below it gets its name made durable, then the marker goes.
    async fn finish_move(&self, dir: &str, dir_blob: &Blob) -> Result<()> {
        let below: Vec<(String, Entry)> = {
            let idx = self.index.read();
            idx.below(dir)
                .into_iter()
                .filter_map(|n| idx.entries.get(&n).cloned().map(|e| (n, e)))
                .collect()
        };
        for (n, e) in &below {
            self.sync_name(n, e).await?;
        }
        if dir_blob.get_xattr(meta::MOVED_FROM).is_some() {
            dir_blob.remove_xattr(meta::MOVED_FROM).ctx(dir)?;
        }
        dir_blob.sync_metadata().await.ctx(dir)
    }

    /// Finishes the directory renames an error left unfinished (ns lock
    /// held); those that fail again stay for the next try.
    pub(super) async fn finish_unfinished(&self) -> Result<()> {
        let todo = std::mem::take(&mut *self.unfinished.lock());
        let mut first_err = None;
        for (dir, id) in todo {
            // Gone (removed, with its marker) when no longer there.
            let Some(Entry::Dir(d)) = self.lookup(&dir) else {
                continue;
            };
            if d.blob.id() != id {
                continue;
            }
            if let Err(e) = self.finish_move(&dir, &d.blob).await {
                first_err.get_or_insert(e);
                self.unfinished.lock().push((dir, id));
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
