//! The super block decoder on arbitrary bytes: never panics, and whatever
//! it accepts encodes back to bytes that decode to the same value.
#![no_main]

use blobstore::fuzzing::{SuperBlock, SUPER_BLOCK_LEN, SUPER_MAGIC};
use crc32c::crc32c;
use libfuzzer_sys::fuzz_target;

fn round_trip(data: &[u8]) {
    if let Ok(sb) = SuperBlock::decode(data) {
        let again = SuperBlock::decode(&sb.encode()).expect("re-encoded super block decodes");
        assert_eq!(again, sb);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip(data);
    // Past the magic and checksum too: give the fields a valid frame.
    let mut b = vec![0u8; SUPER_BLOCK_LEN];
    let n = data.len().min(SUPER_BLOCK_LEN - 12);
    b[8..8 + n].copy_from_slice(&data[..n]);
    b[..8].copy_from_slice(&SUPER_MAGIC);
    let crc = crc32c(&b[..SUPER_BLOCK_LEN - 4]);
    b[SUPER_BLOCK_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
    round_trip(&b);
});
