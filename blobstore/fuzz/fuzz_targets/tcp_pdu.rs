//! The NVMe/TCP PDU parser on arbitrary bytes, as either side would read
//! them, under every digest framing: never panics; a PDU it accepts encodes
//! back (under the same framing) to one that parses to the same header and
//! data; and the header plan never promises more than the parse needs.
#![no_main]

use blobstore::fuzzing::{encode_pdu, parse_header, parse_pdu, plan, Framing};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, bytes)) = data.split_first() else {
        return;
    };
    let framing = Framing {
        header_digest: sel & 1 != 0,
        data_digest: sel & 2 != 0,
    };
    let from_host = sel & 4 != 0;
    if let Ok(p) = plan(bytes, framing, from_host) {
        if bytes.len() >= p.header_bytes {
            // The plan's header part is enough for the header parser: any
            // error now is about the fields, never a short buffer.
            if let Err(e) = parse_header(&bytes[..p.header_bytes], framing, from_host) {
                assert!(!e.to_string().contains("truncated"), "{e}");
            }
        }
    }
    if let Ok((header, payload)) = parse_pdu(bytes, framing, from_host) {
        let mut again = Vec::new();
        let align = 4usize << (sel >> 6);
        encode_pdu(&mut again, &header, &[payload], framing, align);
        let (h2, p2) = parse_pdu(&again, framing, from_host).expect("a re-encoded PDU parses");
        assert_eq!(h2, header);
        assert_eq!(p2, payload);
    }
});
