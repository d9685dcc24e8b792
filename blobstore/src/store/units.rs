//! A unit that crosses the store's internal APIs, as a type: a device
//! cluster number ([`ClusterIdx`]). Crate-internal; the public API keeps
//! blob offsets in io units (`u64`).
//!
//! Metadata page numbers are still bare `u32` ([`crate::format::NO_PAGE`]
//! for "none"), and device block addresses bare `u64`:
//! [`super::state::Layout::cluster_lba`] turns a [`ClusterIdx`] into one, in
//! blocks of the store's io unit (`Layout::io_unit` bytes), which is what
//! the device channel takes.
//!
//! The on-disk encoding stays raw integers ([`crate::format`] is the
//! layout): a cluster map entry is a `u32` with 0 for "not allocated".
//! Conversion happens only where the codec is called, with the helpers
//! here.
//!
//! Invariant: a [`ClusterIdx`] is never 0: cluster 0 holds the super block,
//! so no blob maps it, and `Option<ClusterIdx>` (4 bytes, the bits of the
//! on-disk `u32`) is a cluster map entry with `None` for "not allocated".

use std::fmt;
use std::num::NonZeroU32;

/// A device cluster a blob can map: never 0 (the super block's cluster).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(transparent)]
pub(crate) struct ClusterIdx(NonZeroU32);

impl ClusterIdx {
    /// Cluster `c`, or `None` for 0 (the on-disk "not allocated").
    #[inline]
    pub fn new(c: u32) -> Option<ClusterIdx> {
        NonZeroU32::new(c).map(ClusterIdx)
    }

    /// The cluster number.
    #[inline]
    pub fn get(self) -> u32 {
        self.0.get()
    }

    /// The cluster number as an index into a bitmap.
    #[inline]
    pub fn index(self) -> usize {
        self.0.get() as usize
    }
}

impl fmt::Display for ClusterIdx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A cluster map in its on-disk encoding, for the codec, without a copy.
pub(crate) fn raw_cluster_map(map: &[Option<ClusterIdx>]) -> &[u32] {
    // SAFETY: `ClusterIdx` is a `repr(transparent)` `NonZeroU32`, so
    // `Option<ClusterIdx>` has the size, alignment and bits of a `u32`
    // (`None` is 0), as the standard library guarantees for `Option` of
    // such a type; every bit pattern is a valid `u32`.
    unsafe { std::slice::from_raw_parts(map.as_ptr().cast::<u32>(), map.len()) }
}

/// A cluster map decoded from disk (0 = not allocated) as the store holds it.
pub(crate) fn cluster_map_from_raw(raw: Vec<u32>) -> Vec<Option<ClusterIdx>> {
    raw.into_iter().map(ClusterIdx::new).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_map_entries_keep_the_on_disk_bits() {
        assert_eq!(std::mem::size_of::<Option<ClusterIdx>>(), 4);
        let map = [ClusterIdx::new(7), None, ClusterIdx::new(u32::MAX)];
        assert_eq!(raw_cluster_map(&map), &[7, 0, u32::MAX]);
        assert_eq!(cluster_map_from_raw(vec![7, 0, u32::MAX]), map);
    }
}
