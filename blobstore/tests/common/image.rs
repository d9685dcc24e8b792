//! The sparse test-image layout of `tests/images/*.bsimage`, decoded.
//! Shared by blobstore's tests (`common`) and BlobFS's (`#[path]`).

use std::path::Path;

/// The image stored sparse at `path`: magic `BSIMAGE1`, image size u64,
/// page size u32, record count u32, then per record a page index u64 and a
/// kind byte: 0, the page's bytes follow; 1, one byte follows that every
/// byte of the page holds. Pages without a record are zero.
pub fn read_image(path: &Path) -> Vec<u8> {
    let raw = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let u64_at = |o: usize| u64::from_le_bytes(raw[o..o + 8].try_into().unwrap());
    let u32_at = |o: usize| u32::from_le_bytes(raw[o..o + 4].try_into().unwrap());
    assert_eq!(&raw[..8], b"BSIMAGE1", "{}", path.display());
    let (size, page, count) = (u64_at(8) as usize, u32_at(16) as usize, u32_at(20));
    let mut img = vec![0u8; size];
    let mut at = 24;
    for _ in 0..count {
        let off = u64_at(at) as usize * page;
        let kind = raw[at + 8];
        at += 9;
        if kind == 0 {
            img[off..off + page].copy_from_slice(&raw[at..at + page]);
            at += page;
        } else {
            img[off..off + page].fill(raw[at]);
            at += 1;
        }
    }
    assert_eq!(at, raw.len(), "{}: trailing bytes", path.display());
    img
}
