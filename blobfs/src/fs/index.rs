//! The name index: every live name and its node, in memory, built at mount.
//!
//! Invariants:
//! - The index maps every live name to exactly one node; every name's parent
//!   directory is in the index (the root "" always is), and `children`
//!   holds, for each directory, the full names directly in it.
//! - It does no I/O and takes no lock of its own: the file system holds it
//!   in an `RwLock`, read for lookups (O(1)), written by the mount that
//!   builds it and then only by the namespace changes, which run one at a
//!   time under the `ns` lock (see the parent module).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::fs::file::FileNode;
use crate::name;

/// A directory: its blob and its modification time.
pub(crate) struct DirNode {
    pub(super) blob: blobstore::Blob,
    /// Set at creation, changed only by
    /// [`BlobFs::set_mtime_async`](crate::BlobFs::set_mtime_async).
    pub(super) mtime: AtomicU64,
}

/// What a name in the index is.
#[derive(Clone)]
pub(super) enum Entry {
    File(Arc<FileNode>),
    Dir(Arc<DirNode>),
}

/// Every live name, and the names in each directory.
#[derive(Default)]
pub(super) struct Index {
    pub(super) entries: HashMap<String, Entry>,
    pub(super) children: HashMap<String, BTreeSet<String>>,
}

impl Index {
    pub(super) fn insert(&mut self, name: String, e: Entry) {
        if matches!(e, Entry::Dir(_)) {
            self.children.entry(name.clone()).or_default();
        }
        let parent = name::parent(&name);
        // The parent's key is made only the first time (a mount inserts
        // every name).
        match self.children.get_mut(parent) {
            Some(set) => set.insert(name.clone()),
            None => self
                .children
                .entry(parent.to_string())
                .or_default()
                .insert(name.clone()),
        };
        self.entries.insert(name, e);
    }

    pub(super) fn remove(&mut self, name: &str) -> Option<Entry> {
        let e = self.entries.remove(name)?;
        if let Some(set) = self.children.get_mut(name::parent(name)) {
            set.remove(name);
        }
        if matches!(e, Entry::Dir(_)) {
            self.children.remove(name);
        }
        Some(e)
    }

    pub(super) fn is_dir(&self, name: &str) -> bool {
        name.is_empty() || matches!(self.entries.get(name), Some(Entry::Dir(_)))
    }

    /// Every name below directory `dir` (not `dir` itself), each directory
    /// before what is in it.
    pub(super) fn below(&self, dir: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_string()];
        while let Some(d) = todo.pop() {
            for c in self.children.get(&d).into_iter().flatten() {
                out.push(c.clone());
                if self.children.contains_key(c) {
                    todo.push(c.clone());
                }
            }
        }
        out
    }

    /// Moves directory `from`, with everything below it, to `to` (which
    /// must be free, its parent a directory), and gives each file node its
    /// new name.
    pub(super) fn move_tree(&mut self, from: &str, to: &str) {
        let names: Vec<String> = std::iter::once(from.to_string())
            .chain(self.below(from))
            .collect();
        let moved: Vec<(String, Entry)> = names
            .iter()
            .filter_map(|n| Some((name::rebase(n, from, to)?, self.remove(n)?)))
            .collect();
        debug_assert_eq!(moved.len(), names.len(), "every name below {from}");
        debug_assert!(!self.entries.contains_key(to) && self.is_dir(name::parent(to)));
        for (n, e) in moved {
            if let Entry::File(f) = &e {
                *f.name.write() = n.clone();
            }
            self.insert(n, e);
        }
    }
}
