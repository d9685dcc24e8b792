//! Turning an operation's memory into NVMe commands with SGLs, for
//! controllers whose Identify Controller SGLS field says they take them.
//!
//! An SGL data block descriptor names any byte range (dword aligned when
//! SGLS says so), so pieces join anywhere: a vectored buffer whose joins
//! are not on page boundaries still goes in one command, and a command is
//! limited by MDTS, not by what one PRP list page can hold. A command with
//! one piece carries its data block descriptor in the command itself; one
//! with more carries a Last Segment descriptor pointing to its tracker's
//! page, which holds up to [`LIST_DESCRIPTORS`] data block descriptors.
//!
//! Invariants:
//! - [`plan`] only yields commands of whole blocks, at most `max_bytes`
//!   long, with 1 to [`LIST_DESCRIPTORS`] descriptors, each non-empty and
//!   (when `dword`) dword aligned in address and length; together they
//!   cover the memory exactly once, in order.
//! - Memory that cannot be described gives `None` (the caller bounces it):
//!   a misaligned piece when `dword`, or a command that runs out of
//!   descriptors before a block boundary.

use super::cmd::SGL_DESCRIPTOR_BYTES;
use super::prp::PAGE;
use crate::device::Iova;

/// Descriptors in one segment page.
pub const LIST_DESCRIPTORS: usize = PAGE as usize / SGL_DESCRIPTOR_BYTES;
/// The largest transfer one SGL command carries here, whatever MDTS
/// allows (65,536 blocks of 512 bytes: NLB's limit at the smallest block).
pub const MAX_SGL_TRANSFER_BYTES: u64 = 32 << 20;

/// One command's share of an operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SglTransfer {
    /// First block, relative to the operation's first block.
    pub first_block: u64,
    /// Number of blocks.
    pub blocks: u32,
    /// Data block descriptors: (address, bytes).
    pub descriptors: Vec<(u64, u32)>,
}

/// Splits memory `pieces` (address, bytes), holding whole blocks of
/// `block_size` in total, into SGL commands of at most `max_bytes` each (a
/// multiple of the block size, at most [`MAX_SGL_TRANSFER_BYTES`]).
pub fn plan(
    pieces: &[(Iova, u64)],
    block_size: u64,
    max_bytes: u64,
    dword: bool,
) -> Option<Vec<SglTransfer>> {
    debug_assert!(max_bytes >= block_size && max_bytes.is_multiple_of(block_size));
    debug_assert!(max_bytes <= MAX_SGL_TRANSFER_BYTES);
    let mut out = Vec::new();
    let mut cur = SglTransfer {
        first_block: 0,
        blocks: 0,
        descriptors: Vec::new(),
    };
    let mut cur_bytes = 0u64;
    let mut done_bytes = 0u64;
    for &(iova, len) in pieces {
        if dword && (!iova.0.is_multiple_of(4) || !len.is_multiple_of(4)) {
            return None;
        }
        let (mut addr, end) = (iova.0, iova.0.checked_add(len)?);
        while addr < end {
            let mut chunk = (end - addr).min(max_bytes - cur_bytes);
            let contiguous = cur
                .descriptors
                .last()
                .is_some_and(|&(a, l)| a + l as u64 == addr);
            if !contiguous && cur.descriptors.len() + 1 == LIST_DESCRIPTORS {
                // The last descriptor: the command must end on a block
                // boundary inside this chunk.
                let upto = (cur_bytes + chunk) / block_size * block_size;
                if upto <= cur_bytes {
                    return None;
                }
                chunk = upto - cur_bytes;
            }
            match cur.descriptors.last_mut() {
                Some(last) if contiguous => last.1 += chunk as u32,
                _ => cur.descriptors.push((addr, chunk as u32)),
            }
            cur_bytes += chunk;
            addr += chunk;
            if cur_bytes == max_bytes || cur.descriptors.len() == LIST_DESCRIPTORS {
                debug_assert!(cur_bytes.is_multiple_of(block_size));
                cur.first_block = done_bytes / block_size;
                cur.blocks = (cur_bytes / block_size) as u32;
                done_bytes += cur_bytes;
                cur_bytes = 0;
                out.push(std::mem::replace(
                    &mut cur,
                    SglTransfer {
                        first_block: 0,
                        blocks: 0,
                        descriptors: Vec::new(),
                    },
                ));
            }
        }
    }
    if cur_bytes > 0 {
        if !cur_bytes.is_multiple_of(block_size) {
            return None;
        }
        cur.first_block = done_bytes / block_size;
        cur.blocks = (cur_bytes / block_size) as u32;
        out.push(cur);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checks the invariants and that the commands cover `pieces` in order.
    fn check(ts: &[SglTransfer], pieces: &[(Iova, u64)], bs: u64, max: u64, dword: bool) {
        let mut want: Vec<(u64, u64)> = Vec::new();
        for &(a, l) in pieces {
            if l > 0 {
                want.push((a.0, l));
            }
        }
        let mut got: Vec<(u64, u64)> = Vec::new();
        let mut block = 0;
        for t in ts {
            assert_eq!(t.first_block, block);
            let bytes: u64 = t.descriptors.iter().map(|d| d.1 as u64).sum();
            assert_eq!(bytes, t.blocks as u64 * bs);
            assert!(bytes > 0 && bytes <= max);
            assert!((1..=LIST_DESCRIPTORS).contains(&t.descriptors.len()));
            for &(a, l) in &t.descriptors {
                assert!(l > 0);
                if dword {
                    assert!(a % 4 == 0 && l % 4 == 0);
                }
                match got.last_mut() {
                    Some(g) if g.0 + g.1 == a => g.1 += l as u64,
                    _ => got.push((a, l as u64)),
                }
            }
            block += t.blocks as u64;
        }
        // Merge adjacent wanted pieces the same way.
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (a, l) in want {
            match merged.last_mut() {
                Some(g) if g.0 + g.1 == a => g.1 += l,
                _ => merged.push((a, l)),
            }
        }
        assert_eq!(got, merged);
    }

    #[test]
    fn one_piece_is_one_descriptor_per_command() {
        let p = [(Iova(0x10_0000), 5 << 20)];
        let ts = plan(&p, 4096, 4 << 20, true).unwrap();
        assert_eq!(ts.len(), 2, "split at max_bytes only");
        assert_eq!(ts[0].descriptors, vec![(0x10_0000, 4 << 20)]);
        check(&ts, &p, 4096, 4 << 20, true);
    }

    #[test]
    fn unaligned_joins_share_a_command() {
        // 512-byte blocks; joins inside pages and inside blocks.
        let p = [
            (Iova(0x1000_0100), 300),
            (Iova(0x2000_0000), 724),
            (Iova(0x3000_0804), 1024),
        ];
        let ts = plan(&p, 512, 1 << 20, true).unwrap();
        assert_eq!(ts.len(), 1);
        assert_eq!(ts[0].descriptors.len(), 3);
        check(&ts, &p, 512, 1 << 20, true);
        // Not dword aligned: only without the alignment rule.
        let odd = [(Iova(0x1000_0001), 511), (Iova(0x2000_0000), 1)];
        assert!(plan(&odd, 512, 1 << 20, true).is_none());
        check(
            &plan(&odd, 512, 1 << 20, false).unwrap(),
            &odd,
            512,
            1 << 20,
            false,
        );
        // Not whole blocks in total.
        assert!(plan(&[(Iova(0x1000), 700)], 512, 1 << 20, false).is_none());
    }

    #[test]
    fn many_pieces_close_commands_at_block_boundaries() {
        // 600 pieces of 1,000 bytes: each command ends where its last
        // descriptor reaches a block boundary.
        let p: Vec<(Iova, u64)> = (0..600u64)
            .map(|i| (Iova(0x1_0000_0000 + i * 0x10000), 1000))
            .collect();
        // (A 500-byte block, so boundaries fall inside pieces; the limit a
        // whole number of blocks, as plan asks.)
        let ts = plan(&p, 500, 1_000_000, true).unwrap();
        assert!(ts.len() >= 3);
        check(&ts, &p, 500, 1_000_000, true);
        // 256 pieces of 4 bytes cannot reach a 512-byte block boundary.
        let tiny: Vec<(Iova, u64)> = (0..300u64)
            .map(|i| (Iova(0x1_0000_0000 + i * 64), 4))
            .collect();
        assert!(plan(&tiny, 512, 1 << 20, true).is_none());
    }

    #[test]
    fn random_layouts_keep_the_rules() {
        let mut rng = crate::util::SplitMix64::new(0x2545_F491_4F6C_DD1D);
        let mut next = move || rng.next_u64();
        for _ in 0..2000 {
            let bs = if next() % 2 == 0 { 512 } else { 4096 };
            let max = bs * (1 + next() % 512);
            let dword = next() % 2 == 0;
            let n = 1 + next() % 40;
            let mut p: Vec<(Iova, u64)> = (0..n)
                .map(|_| {
                    let a = 0x1_0000_0000 + (next() % (1 << 24)) * 4;
                    let l = 4 * (1 + next() % 2048);
                    (Iova(a), l)
                })
                .collect();
            let total: u64 = p.iter().map(|x| x.1).sum();
            let pad = (bs - total % bs) % bs;
            if pad > 0 {
                p.push((Iova(0x9_0000_0000), pad));
            }
            // At most 41 pieces: never out of descriptors.
            let ts = plan(&p, bs, max, dword).expect("describable");
            check(&ts, &p, bs, max, dword);
        }
    }
}
