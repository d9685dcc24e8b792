//! In-memory allocation bitmaps: metadata pages, clusters, blob ids.
//!
//! Invariants:
//! - `free_clusters` and `free_pages` equal the zero bits of their maps.
//! - The clusters that hold the super block, bitmaps and metadata region are
//!   always marked used; nothing ever frees them.
//! - A blob-id bit is set only where the page bit is set too.

use bitvec::prelude::*;

use super::units::{ClusterIdx, PageIdx};

/// The three bitmaps of a loaded store.
pub(crate) struct Allocator {
    pages: BitVec<u64, Lsb0>,
    clusters: BitVec<u64, Lsb0>,
    blobids: BitVec<u64, Lsb0>,
    reserved_clusters: u32,
    free_clusters: u64,
    free_pages: u64,
    cluster_hint: usize,
    page_hint: usize,
}

impl Allocator {
    /// Empty maps with the first `reserved_clusters` clusters in use.
    pub fn new(md_pages: u64, total_clusters: u64, reserved_clusters: u32) -> Allocator {
        let mut clusters = bitvec![u64, Lsb0; 0; total_clusters as usize];
        clusters[..reserved_clusters as usize].fill(true);
        Allocator {
            pages: bitvec![u64, Lsb0; 0; md_pages as usize],
            clusters,
            blobids: bitvec![u64, Lsb0; 0; md_pages as usize],
            reserved_clusters,
            free_clusters: total_clusters - reserved_clusters as u64,
            free_pages: md_pages,
            cluster_hint: reserved_clusters as usize,
            page_hint: 0,
        }
    }

    /// Maps read from a cleanly unloaded store.
    pub fn from_bits(pages: &[bool], clusters: &[bool], blobids: &[bool], reserved: u32) -> Self {
        let mut a = Allocator::new(pages.len() as u64, clusters.len() as u64, reserved);
        for (i, _) in pages.iter().enumerate().filter(|(_, &b)| b) {
            a.pages.set(i, true);
        }
        for (i, _) in clusters.iter().enumerate().filter(|(_, &b)| b) {
            a.clusters.set(i, true);
        }
        for (i, _) in blobids.iter().enumerate().filter(|(_, &b)| b) {
            a.blobids.set(i, true);
        }
        a.free_clusters = a.clusters.count_zeros() as u64;
        a.free_pages = a.pages.count_zeros() as u64;
        a
    }

    pub fn bits(&self) -> (Vec<bool>, Vec<bool>, Vec<bool>) {
        let v = |b: &BitVec<u64, Lsb0>| b.iter().map(|x| *x).collect();
        (v(&self.pages), v(&self.clusters), v(&self.blobids))
    }

    pub fn free_clusters(&self) -> u64 {
        self.free_clusters
    }

    pub fn free_pages(&self) -> u64 {
        self.free_pages
    }

    fn find_zero(map: &BitVec<u64, Lsb0>, hint: usize) -> Option<usize> {
        map[hint..]
            .first_zero()
            .map(|i| i + hint)
            .or_else(|| map[..hint].first_zero())
    }

    /// Takes `n` free clusters, or none at all.
    pub fn alloc_clusters(&mut self, n: usize) -> Option<Vec<ClusterIdx>> {
        if (n as u64) > self.free_clusters {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let c = Self::find_zero(&self.clusters, self.cluster_hint)
                .expect("free count says a cluster is free");
            self.clusters.set(c, true);
            self.cluster_hint = c + 1;
            if self.cluster_hint >= self.clusters.len() {
                self.cluster_hint = self.reserved_clusters as usize;
            }
            out.push(ClusterIdx::new(c as u32).expect("cluster 0 is reserved"));
        }
        self.free_clusters -= n as u64;
        Some(out)
    }

    pub fn free_cluster(&mut self, c: ClusterIdx) {
        let c = c.index();
        debug_assert!(
            c >= self.reserved_clusters as usize,
            "freeing a metadata cluster"
        );
        debug_assert!(self.clusters[c], "double free of cluster {c}");
        if c >= self.reserved_clusters as usize && self.clusters[c] {
            self.clusters.set(c, false);
            self.free_clusters += 1;
        }
    }

    /// The free clusters as `(first, count)` runs of neighbours, in order.
    pub fn free_cluster_runs(&self) -> Vec<(ClusterIdx, u32)> {
        let mut runs: Vec<(ClusterIdx, u32)> = Vec::new();
        for c in self.clusters.iter_zeros() {
            match runs.last_mut() {
                Some((first, n)) if first.index() + *n as usize == c => *n += 1,
                _ => runs.push((ClusterIdx::new(c as u32).expect("cluster 0 is reserved"), 1)),
            }
        }
        runs
    }

    /// The used metadata pages as `(first, count)` ranges to read: pages at
    /// most `gap` pages apart share a range (the pages between are read
    /// too: cheaper than another request), and no range is longer than
    /// `max` pages.
    pub fn used_page_ranges(&self, gap: u32, max: u32) -> Vec<(PageIdx, u32)> {
        debug_assert!(max > 0);
        let mut ranges: Vec<(PageIdx, u32)> = Vec::new();
        for p in self.pages.iter_ones() {
            let p = PageIdx::at(p);
            match ranges.last_mut() {
                Some((first, n))
                    if p.get() - (first.get() + *n) <= gap && p.get() - first.get() < max =>
                {
                    *n = p.get() - first.get() + 1
                }
                _ => ranges.push((p, 1)),
            }
        }
        ranges
    }

    /// Marks a cluster used during a rebuild; false if it already was.
    pub fn claim_cluster(&mut self, c: ClusterIdx) -> bool {
        let c = c.index();
        if c >= self.clusters.len() || self.clusters[c] {
            return false;
        }
        self.clusters.set(c, true);
        self.free_clusters -= 1;
        true
    }

    /// Takes `n` free metadata pages, or none at all.
    pub fn alloc_pages(&mut self, n: usize) -> Option<Vec<PageIdx>> {
        if (n as u64) > self.free_pages {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let p = Self::find_zero(&self.pages, self.page_hint)
                .expect("free count says a page is free");
            self.pages.set(p, true);
            self.page_hint = (p + 1) % self.pages.len();
            out.push(PageIdx::at(p));
        }
        self.free_pages -= n as u64;
        Some(out)
    }

    pub fn free_page(&mut self, p: PageIdx) {
        let p = p.index();
        debug_assert!(self.pages[p], "double free of md page {p}");
        debug_assert!(!self.blobids[p], "freeing the first page of a live blob");
        if self.pages[p] {
            self.pages.set(p, false);
            self.free_pages += 1;
        }
    }

    /// Marks a page used during a rebuild; false if it already was.
    pub fn claim_page(&mut self, p: PageIdx) -> bool {
        let p = p.index();
        if p >= self.pages.len() || self.pages[p] {
            return false;
        }
        self.pages.set(p, true);
        self.free_pages -= 1;
        true
    }

    pub fn set_blobid(&mut self, p: PageIdx, used: bool) {
        debug_assert!(!used || self.pages[p.index()]);
        self.blobids.set(p.index(), used);
    }

    pub fn is_blobid(&self, p: PageIdx) -> bool {
        self.blobids.get(p.index()).is_some_and(|b| *b)
    }

    pub fn blobids(&self) -> impl Iterator<Item = PageIdx> + '_ {
        self.blobids.iter_ones().map(PageIdx::at)
    }

    /// True when cluster `c` is in use.
    pub fn cluster_used(&self, c: ClusterIdx) -> bool {
        self.clusters.get(c.index()).is_some_and(|b| *b)
    }

    /// True when metadata page `p` is in use.
    pub fn page_used(&self, p: PageIdx) -> bool {
        self.pages.get(p.index()).is_some_and(|b| *b)
    }

    /// Debug check of the counters.
    pub fn check(&self) {
        debug_assert_eq!(self.free_clusters, self.clusters.count_zeros() as u64);
        debug_assert_eq!(self.free_pages, self.pages.count_zeros() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_page_ranges_span_small_gaps_and_split_long_runs() {
        let mut a = Allocator::new(100, 10, 1);
        for p in [0, 1, 2, 5, 30, 31, 60] {
            assert!(a.claim_page(PageIdx::at(p)));
        }
        let ranges = |gap, max| -> Vec<(u32, u32)> {
            let r = a.used_page_ranges(gap, max);
            r.into_iter().map(|(p, n)| (p.get(), n)).collect()
        };
        assert_eq!(ranges(3, 100), vec![(0, 6), (30, 2), (60, 1)]);
        assert_eq!(ranges(0, 2), vec![(0, 2), (2, 1), (5, 1), (30, 2), (60, 1)]);
        assert!(Allocator::new(8, 10, 1).used_page_ranges(4, 4).is_empty());
    }
}
