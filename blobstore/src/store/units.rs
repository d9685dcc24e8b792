//! The units that cross the store's internal APIs, as types: a device
//! cluster number ([`ClusterIdx`]) and a metadata page number
//! ([`PageIdx`]). Crate-internal; the public API keeps blob offsets in io
//! units (`u64`).
//!
//! Device block addresses are [`crate::device::Lba`], in blocks of the
//! store's io unit (`Layout::io_unit` bytes, the device's block size):
//! [`super::state::Layout::cluster_lba`] and
//! [`super::state::Layout::md_lba`] turn a cluster or a page into one.
//!
//! The on-disk encoding stays raw integers ([`crate::format`] is the
//! layout): a cluster map entry is a `u32` with 0 for "not allocated", a
//! page link a `u32` with [`format::NO_PAGE`] for "none". Conversion
//! happens only where the codec is called, with the helpers here.
//!
//! Invariants:
//! - A [`ClusterIdx`] is never 0: cluster 0 holds the super block, so no
//!   blob maps it, and `Option<ClusterIdx>` (4 bytes, the bits of the
//!   on-disk `u32`) is a cluster map entry with `None` for "not allocated".
//! - A [`PageIdx`] is never [`format::NO_PAGE`]; `Option<PageIdx>` is a
//!   page link, `None` for "none". Whether it lies inside the metadata
//!   region is checked where a page number comes from disk (a load, a
//!   chain walk), not by the type.

use std::fmt;
use std::num::NonZeroU32;

use crate::format;

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

/// A metadata page number: an index into the metadata region.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct PageIdx(u32);

impl PageIdx {
    /// Page `p` of the metadata region, or `None` for [`format::NO_PAGE`]
    /// (a page link's "none" on disk).
    #[inline]
    pub fn new(p: u32) -> Option<PageIdx> {
        (p != format::NO_PAGE).then_some(PageIdx(p))
    }

    /// Page `i` of a bitmap or a region walk: an index the store made
    /// itself, below the region's length, so never [`format::NO_PAGE`].
    #[inline]
    pub fn at(i: usize) -> PageIdx {
        debug_assert!(i < format::NO_PAGE as usize, "page index {i} out of range");
        PageIdx(i as u32)
    }

    /// The page number.
    #[inline]
    pub fn get(self) -> u32 {
        self.0
    }

    /// The page `n` pages after this one, in a range the store made.
    #[inline]
    pub fn plus(self, n: u32) -> PageIdx {
        PageIdx::at(self.index() + n as usize)
    }

    /// The page number as an index into a bitmap.
    #[inline]
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for PageIdx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A page link in its on-disk encoding: [`format::NO_PAGE`] for none.
#[inline]
pub(crate) fn raw_page(p: Option<PageIdx>) -> u32 {
    p.map_or(format::NO_PAGE, PageIdx::get)
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

    #[test]
    fn page_links_keep_the_on_disk_encoding() {
        assert_eq!(PageIdx::new(format::NO_PAGE), None);
        let p = PageIdx::new(5).unwrap();
        assert_eq!((p.get(), p.index()), (5, 5));
        assert_eq!(raw_page(Some(p)), 5);
        assert_eq!(raw_page(None), format::NO_PAGE);
        assert_eq!(PageIdx::at(0), PageIdx::new(0).unwrap());
    }
}
