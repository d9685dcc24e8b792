//! The metadata page, descriptor and extent decoders on arbitrary bytes:
//! never panic, and a record they accept round-trips.
#![no_main]

use blobstore::fuzzing::{
    decode_extent_payload, decode_md_page, encode_md_page, BlobRecord, PageKind, NO_PAGE,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The raw page, as read from disk.
    if let Ok(page) = decode_md_page(data, "fuzz") {
        let _ = decode_extent_payload(page.payload, "fuzz");
        let _ = BlobRecord::decode(&[page.payload], "fuzz");
    }
    // The same bytes framed as a page with a valid magic and checksum, so
    // the header checks behind them are explored too.
    let mut framed = vec![0u8; 4096];
    let n = data.len().min(4096 - 8);
    framed[4..4 + n].copy_from_slice(&data[..n]);
    framed[..4].copy_from_slice(b"BSMD");
    let crc = crc32c::crc32c(&framed[..4092]);
    framed[4092..].copy_from_slice(&crc.to_le_bytes());
    if let Ok(page) = decode_md_page(&framed, "framed") {
        let _ = decode_extent_payload(page.payload, "framed");
        let _ = BlobRecord::decode(&[page.payload], "framed");
    }
    // The payload decoders on the bytes directly (past the page checksum).
    let _ = decode_extent_payload(data, "fuzz");
    let (a, b) = data.split_at(data.len() / 2);
    if let Ok(rec) = BlobRecord::decode(&[a, b], "fuzz") {
        // What decodes, encodes into pages that decode to the same record
        // (unless it is too big for any page: then encoding is not asked).
        if rec.xattrs.iter().all(|(n, v)| {
            !n.is_empty()
                && n.len() <= blobstore::fuzzing::MAX_XATTR_NAME_LEN
                && v.len() <= blobstore::fuzzing::MAX_XATTR_VALUE_LEN
        }) {
            let payloads = rec.encode_payloads(4096);
            let pages: Vec<Vec<u8>> = payloads
                .iter()
                .map(|p| encode_md_page(PageKind::Continuation, 1, 1, NO_PAGE, p, 4096))
                .collect();
            let decoded: Vec<_> = pages
                .iter()
                .map(|p| decode_md_page(p, "re").expect("own page decodes"))
                .collect();
            let slices: Vec<&[u8]> = decoded.iter().map(|p| p.payload).collect();
            assert_eq!(BlobRecord::decode(&slices, "re").expect("own record"), rec);
        }
    }
});
