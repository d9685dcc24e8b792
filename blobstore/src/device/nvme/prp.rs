//! Turning an operation's memory into NVMe commands with PRPs.
//!
//! A PRP data pointer describes a transfer as a list of memory pages: the
//! first entry may start anywhere (dword aligned) and runs to the end of its
//! page; every later entry starts on a page boundary; every entry but the
//! last runs to the end of its page. PRP1 holds the first entry; PRP2 the
//! second, or, when more than two are needed, the address of a page holding
//! entries 2..n (a PRP list).
//!
//! Invariants:
//! - [`plan`] only yields commands whose pieces satisfy the PRP rules above,
//!   whose byte counts are whole blocks, and whose length is at most the
//!   transfer limit; together they cover the memory exactly once, in order.
//! - A list never needs more than one page: the transfer limit is at most
//!   [`MAX_TRANSFER_BYTES`], which touches at most 513 pages.
//! - Memory that cannot be described (a join between pieces that is not on
//!   a page boundary and not on a block boundary, or an address that is not
//!   dword aligned) gives `None`: the caller bounces it through one buffer.

use crate::device::Iova;

/// Bytes of one memory page (CC.MPS = 0).
pub const PAGE: u64 = 4096;
/// PRP entries in one list page.
pub const LIST_ENTRIES: usize = (PAGE / 8) as usize;
/// The largest transfer one command carries here, whatever MDTS allows.
pub const MAX_TRANSFER_BYTES: u64 = 2 << 20;

/// One command's share of an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transfer {
    /// First block, relative to the operation's first block.
    pub first_block: u64,
    /// Number of blocks.
    pub blocks: u32,
    /// PRP entries: the first one may have a page offset, the rest are page
    /// aligned.
    pub entries: Vec<u64>,
}

impl Transfer {
    /// PRP1 and PRP2 for this transfer, writing entries 2..n through
    /// `write_list` (index, entry) when a list is needed; `list` is the list
    /// page's address.
    pub fn prps(&self, list: Iova, mut write_list: impl FnMut(usize, u64)) -> (u64, u64) {
        let e = &self.entries;
        debug_assert!(!e.is_empty() && e.len() <= LIST_ENTRIES + 1);
        match e.len() {
            1 => (e[0], 0),
            2 => (e[0], e[1]),
            _ => {
                for (i, &a) in e[1..].iter().enumerate() {
                    write_list(i, a);
                }
                (e[0], list.0)
            }
        }
    }
}

/// Splits memory `pieces` (address, bytes), holding whole blocks of
/// `block_size` in total, into commands of at most `max_bytes` each
/// (a multiple of the block size, at most [`MAX_TRANSFER_BYTES`]).
pub fn plan(pieces: &[(Iova, u64)], block_size: u64, max_bytes: u64) -> Option<Vec<Transfer>> {
    debug_assert!(max_bytes >= block_size && max_bytes.is_multiple_of(block_size));
    debug_assert!(max_bytes <= MAX_TRANSFER_BYTES);
    let mut out = Vec::new();
    let mut cur = Transfer {
        first_block: 0,
        blocks: 0,
        entries: Vec::new(),
    };
    let mut cur_bytes = 0u64; // bytes in `cur`
    let mut done_bytes = 0u64; // bytes in finished commands
    let mut last_end: Option<u64> = None; // end address of cur's last chunk
    let close = |cur: &mut Transfer, cur_bytes: &mut u64, done: &mut u64, out: &mut Vec<_>| {
        if *cur_bytes == 0 {
            return true;
        }
        if !cur_bytes.is_multiple_of(block_size) {
            return false;
        }
        let next = Transfer {
            first_block: (*done + *cur_bytes) / block_size,
            blocks: 0,
            entries: Vec::new(),
        };
        let mut t = std::mem::replace(cur, next);
        t.blocks = (*cur_bytes / block_size) as u32;
        *done += *cur_bytes;
        *cur_bytes = 0;
        out.push(t);
        true
    };
    for &(iova, len) in pieces {
        if iova.0 % 4 != 0 {
            return None;
        }
        let mut addr = iova.0;
        let end = iova.0 + len;
        while addr < end {
            let page_end = (addr / PAGE + 1) * PAGE;
            let mut chunk = page_end.min(end) - addr;
            // A chunk may join the current command only at page boundaries.
            let joins = match last_end {
                None => true,
                Some(e) => e.is_multiple_of(PAGE) && addr.is_multiple_of(PAGE),
            };
            if !joins && !close(&mut cur, &mut cur_bytes, &mut done_bytes, &mut out) {
                return None;
            }
            if cur_bytes + chunk > max_bytes {
                chunk = max_bytes - cur_bytes;
            }
            cur.entries.push(addr);
            cur_bytes += chunk;
            addr += chunk;
            last_end = Some(addr);
            if cur_bytes == max_bytes {
                let closed = close(&mut cur, &mut cur_bytes, &mut done_bytes, &mut out);
                debug_assert!(closed, "max_bytes is a block multiple");
                last_end = None;
            }
        }
    }
    if !close(&mut cur, &mut cur_bytes, &mut done_bytes, &mut out) {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_rules(ts: &[Transfer], pieces: &[(Iova, u64)], bs: u64, max: u64) {
        // Re-derive the byte stream from the entries and compare with pieces.
        let mut want: Vec<u64> = Vec::new();
        for &(a, l) in pieces {
            want.extend((0..l).step_by(512).map(|o| a.0 + o));
        }
        let mut got: Vec<u64> = Vec::new();
        let mut block = 0;
        for t in ts {
            assert_eq!(t.first_block, block);
            block += t.blocks as u64;
            let bytes = t.blocks as u64 * bs;
            assert!(bytes <= max && bytes > 0);
            assert!(t.entries.len() <= LIST_ENTRIES + 1);
            let mut left = bytes;
            for (i, &e) in t.entries.iter().enumerate() {
                if i > 0 {
                    assert_eq!(e % PAGE, 0, "entry {i} not page aligned");
                }
                let n = ((e / PAGE + 1) * PAGE - e).min(left);
                if i + 1 < t.entries.len() {
                    assert_eq!((e + n) % PAGE, 0, "entry {i} does not run to page end");
                }
                got.extend((0..n).step_by(512).map(|o| e + o));
                left -= n;
            }
            assert_eq!(left, 0, "entries do not cover the command");
        }
        assert_eq!(got, want);
    }

    #[test]
    fn one_page_and_two_pages() {
        let p = [(Iova(0x10000), 4096)];
        let t = plan(&p, 512, 128 << 10).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].entries, vec![0x10000]);
        assert_eq!(t[0].prps(Iova(0xf000), |_, _| panic!()), (0x10000, 0));
        let p = [(Iova(0x10200), 4096)];
        let t = plan(&p, 512, 128 << 10).unwrap();
        assert_eq!(t[0].entries, vec![0x10200, 0x11000]);
        assert_eq!(t[0].prps(Iova(0xf000), |_, _| panic!()), (0x10200, 0x11000));
    }

    #[test]
    fn list_for_long_transfers() {
        let p = [(Iova(0x100000), 64 << 10)];
        let t = plan(&p, 4096, 128 << 10).unwrap();
        assert_eq!(t.len(), 1);
        let mut list = vec![0u64; LIST_ENTRIES];
        let (p1, p2) = t[0].prps(Iova(0x7000), |i, a| list[i] = a);
        assert_eq!((p1, p2), (0x100000, 0x7000));
        assert_eq!(
            &list[..15],
            &(1..16).map(|i| 0x100000 + i * 4096).collect::<Vec<_>>()[..]
        );
        check_rules(&t, &p, 4096, 128 << 10);
    }

    #[test]
    fn split_at_the_transfer_limit() {
        let p = [(Iova(0x200200), 3 << 20)];
        let t = plan(&p, 512, 512 << 10).unwrap();
        assert_eq!(t.len(), 6);
        check_rules(&t, &p, 512, 512 << 10);
        let t = plan(&p, 512, MAX_TRANSFER_BYTES).unwrap();
        assert_eq!(t[0].entries.len(), 513, "mid-page start touches 513 pages");
        check_rules(&t, &p, 512, MAX_TRANSFER_BYTES);
    }

    #[test]
    fn pieces_join_on_pages_or_split_on_blocks() {
        // Page-aligned pieces join into one command.
        let p = [(Iova(0x1000), 8192), (Iova(0x9000), 4096)];
        let t = plan(&p, 512, 1 << 20).unwrap();
        assert_eq!(t.len(), 1);
        check_rules(&t, &p, 512, 1 << 20);
        // A piece ending mid-page: the next command starts there.
        let p = [
            (Iova(0x1000), 1536),
            (Iova(0x9000), 4096),
            (Iova(0x20200), 512),
        ];
        let t = plan(&p, 512, 1 << 20).unwrap();
        assert_eq!(t.len(), 3);
        check_rules(&t, &p, 512, 1 << 20);
        // A join inside a block cannot be described.
        let p = [(Iova(0x1000), 256), (Iova(0x9000), 256)];
        assert_eq!(plan(&p, 512, 1 << 20), None);
        // Nor an address that is not dword aligned.
        assert_eq!(plan(&[(Iova(0x1002), 512)], 512, 1 << 20), None);
    }

    #[test]
    fn random_layouts_obey_the_rules() {
        let mut rng = crate::util::SplitMix64::new(0x1234_5678_9abc_def1);
        let mut rnd = |n: u64| rng.below(n);
        for _ in 0..2000 {
            let bs = if rnd(2) == 0 { 512 } else { 4096 };
            let max = bs.max(4096) * (1 + rnd(512));
            let n = 1 + rnd(4);
            let mut pieces = Vec::new();
            let mut base = 0x100000u64;
            for _ in 0..n {
                let off = rnd(8) * bs;
                let len = (1 + rnd(600)) * bs;
                pieces.push((Iova(base + off), len));
                base += (off + len + PAGE) / PAGE * PAGE + PAGE * rnd(3);
            }
            if let Some(t) = plan(&pieces, bs, max.min(MAX_TRANSFER_BYTES)) {
                check_rules(&t, &pieces, bs, max.min(MAX_TRANSFER_BYTES));
            } else {
                // Only block-sized pieces at block offsets: always describable.
                panic!("block-aligned pieces must plan: {pieces:x?}");
            }
        }
    }
}
