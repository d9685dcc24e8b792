//! Reading the metadata region in bulk, for load: large sequential reads,
//! several in flight, instead of one read per page; the pages that decode
//! go into a [`PageMap`] that the per-blob readers take them from.
//!
//! Invariants:
//! - The map holds only pages that decoded (magic, checksum, header), with
//!   the bytes the device held when they were read; nothing writes the
//!   metadata region while a load reads it. A page that did not decode, or
//!   was not read, is read again on its own by whoever needs it, whose
//!   checks then report it exactly as a load that read page by page did.
//! - A page is handed out at most once ([`PageMap::take`]): a page that two
//!   blobs claim is read from the device again for the second one.
//! - Reads cover whole pages, are at most [`READ_BYTES`] long, and run
//!   [`READS_IN_FLIGHT`] at a time; pages reach the caller in page order.

use std::cell::RefCell;

use futures::stream::{self, StreamExt};

use super::alloc::Allocator;
use crate::device::{DmaBuf, IoChannel};
use crate::error::{Error, Result};

use super::state::StoreInner;
use super::units::PageIdx;
use crate::format::{self, MdPage, PageKind};

/// Bytes of one read of the metadata region: large enough that a device
/// streams it, small enough that a few in flight cost little memory.
pub(crate) const READ_BYTES: usize = 4 << 20;
/// Reads in flight: the next ones stream while the last one is decoded.
const READS_IN_FLIGHT: usize = 4;
/// Free pages between two used ones that a read spans rather than being
/// split in two (64 KiB of 4 KiB pages: cheaper read than skipped).
const GAP_PAGES: u32 = 16;

/// A decoded metadata page that owns its payload.
#[derive(Debug)]
pub(crate) struct OwnedMdPage {
    pub kind: PageKind,
    pub blob_id: u64,
    pub sequence: u32,
    pub next: u32,
    pub payload: Vec<u8>,
}

impl OwnedMdPage {
    pub fn from_page(p: &MdPage<'_>) -> OwnedMdPage {
        OwnedMdPage {
            kind: p.kind,
            blob_id: p.blob_id,
            sequence: p.sequence,
            next: p.next,
            payload: p.payload.to_vec(),
        }
    }
}

/// Metadata pages read in bulk and decoded, by page index.
#[derive(Debug, Default)]
pub(crate) struct PageMap {
    /// Sorted by page; `None` once taken.
    pages: Vec<(PageIdx, Option<OwnedMdPage>)>,
}

impl PageMap {
    /// Page `page`, if the bulk read decoded it and nobody took it yet.
    pub fn take(&mut self, page: PageIdx) -> Option<OwnedMdPage> {
        let i = self.pages.binary_search_by_key(&page, |e| e.0).ok()?;
        self.pages[i].1.take()
    }

    /// Keeps `bytes`, page `page`, if it decodes. Pages come in order.
    pub fn insert(&mut self, page: PageIdx, bytes: &[u8]) {
        debug_assert!(self.pages.last().is_none_or(|l| l.0 < page));
        if !format::looks_like_md_page(bytes) {
            return;
        }
        // The location names nothing: a page that fails is dropped here
        // and read again by its reader, whose error names it.
        if let Ok(p) = format::decode_md_page(bytes, "") {
            self.push(page, &p);
        }
    }

    /// Keeps `p`, page `page`, decoded already. Pages come in order.
    pub fn push(&mut self, page: PageIdx, p: &MdPage<'_>) {
        debug_assert!(self.pages.last().is_none_or(|l| l.0 < page));
        self.pages.push((page, Some(OwnedMdPage::from_page(p))));
    }

    /// Pages held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.pages.iter().filter(|p| p.1.is_some()).count()
    }
}

impl StoreInner {
    /// Metadata pages per read.
    fn pages_per_read(&self) -> u32 {
        (READ_BYTES / self.layout.page_size as usize).max(1) as u32
    }

    /// Reads the metadata pages of `ranges` (`(first, count)`, in order) in
    /// reads of at most [`READ_BYTES`], [`READS_IN_FLIGHT`] at a time, and
    /// hands each page to `f` with its index, in order.
    pub(crate) async fn for_each_md_page(
        &self,
        ch: &IoChannel,
        ranges: &[(PageIdx, u32)],
        mut f: impl FnMut(PageIdx, &[u8]),
    ) -> Result<()> {
        let l = self.layout;
        let ps = l.page_size as usize;
        let per_read = self.pages_per_read();
        debug_assert!(ranges
            .iter()
            .all(|&(p, n)| p.get() as u64 + n as u64 <= l.md_len));
        let reads = ranges.iter().flat_map(move |&(first, n)| {
            (0..n)
                .step_by(per_read as usize)
                .map(move |off| (first.plus(off), per_read.min(n - off)))
        });
        // Buffers go round: a fresh one each time would be zeroed and
        // faulted in for every read.
        let spare: RefCell<Vec<DmaBuf>> = RefCell::new(Vec::new());
        let spare = &spare;
        let mut bufs = stream::iter(reads)
            .map(|(first, n)| async move {
                let len = n as usize * ps;
                let reused = spare.borrow_mut().pop();
                let buf = match reused {
                    Some(mut b) if b.capacity() >= len => {
                        b.set_len(len)?;
                        b
                    }
                    _ => self.dev.alloc_buf_for_overwrite(len)?,
                };
                let buf = ch.read(l.md_lba(first), buf).await?;
                Ok::<_, crate::Error>((first, buf))
            })
            .buffered(READS_IN_FLIGHT);
        while let Some(read) = bufs.next().await {
            let (first, buf) = read?;
            for (i, bytes) in buf.chunks_exact(ps).enumerate() {
                f(first.plus(i as u32), bytes);
            }
            spare.borrow_mut().push(buf);
        }
        Ok(())
    }

    /// The pages `alloc` marks used, read in bulk: every one that decodes
    /// (a clean load's view of the metadata region).
    pub(crate) async fn read_used_pages(
        &self,
        ch: &IoChannel,
        alloc: &Allocator,
    ) -> Result<PageMap> {
        let ranges = alloc.used_page_ranges(GAP_PAGES, self.pages_per_read());
        let mut map = PageMap::default();
        map.pages
            .reserve(ranges.iter().map(|r| r.1 as usize).sum::<usize>());
        self.for_each_md_page(ch, &ranges, |page, bytes| map.insert(page, bytes))
            .await?;
        Ok(map)
    }

    /// Every page of the metadata region that carries the metadata magic,
    /// decoded: `Some(())` for a blob's first page (at the page its id
    /// names), `None` for another kind, an error for a page that fails its
    /// checks or a first page naming another blob. Also the pages that
    /// decoded, for the blobs' readers. The whole region is read in large
    /// reads (this module).
    pub(crate) async fn scan_md_pages(
        &self,
        ch: &IoChannel,
    ) -> Result<(Vec<(PageIdx, Result<Option<()>>)>, PageMap)> {
        let mut out = Vec::new();
        let mut map = PageMap::default();
        let whole = [(PageIdx::at(0), self.layout.md_len as u32)];
        self.for_each_md_page(ch, &whole, |page, bytes| {
            if !format::looks_like_md_page(bytes) {
                return;
            }
            let loc = || format!("metadata page {page}");
            let found = match format::decode_md_page(bytes, "") {
                Err(Error::Corrupt { what, .. }) => Err(Error::corrupt(loc(), what)),
                Err(e) => Err(e),
                Ok(fp) => {
                    map.push(page, &fp);
                    if fp.kind != PageKind::First {
                        Ok(None)
                    } else if fp.blob_id != Self::blob_id(page).0 {
                        Err(Error::corrupt(
                            loc(),
                            format!("first page names blob {:#x}", fp.blob_id),
                        ))
                    } else {
                        Ok(Some(()))
                    }
                }
            };
            out.push((page, found));
        })
        .await?;
        Ok((out, map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{encode_md_page, NO_PAGE};

    #[test]
    fn a_page_map_keeps_what_decodes_and_hands_it_out_once() {
        let mut map = PageMap::default();
        let good = encode_md_page(PageKind::First, 7, 1, NO_PAGE, b"abc", 4096);
        let mut torn = good.clone();
        torn[100] ^= 1;
        let at = PageIdx::at;
        map.insert(at(3), &good);
        map.insert(at(4), &torn);
        map.insert(at(5), &[0u8; 4096]);
        map.insert(at(9), &good);
        assert_eq!(map.len(), 2);
        let p = map.take(at(3)).unwrap();
        assert_eq!(
            (p.kind, p.blob_id, &p.payload[..]),
            (PageKind::First, 7, &b"abc"[..])
        );
        assert!(map.take(at(3)).is_none());
        assert!(map.take(at(4)).is_none() && map.take(at(5)).is_none());
        assert!(map.take(at(8)).is_none() && map.take(at(9)).is_some());
    }
}
