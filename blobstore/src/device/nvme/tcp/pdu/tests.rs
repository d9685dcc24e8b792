//! The PDU layout against itself and against bad bytes: every PDU type
//! round-trips under every framing and alignment, each inconsistency is
//! its typed error, and arbitrary bytes never panic.

use super::*;

const ALL: [Framing; 4] = [
    Framing {
        header_digest: false,
        data_digest: false,
    },
    Framing {
        header_digest: true,
        data_digest: false,
    },
    Framing {
        header_digest: false,
        data_digest: true,
    },
    Framing {
        header_digest: true,
        data_digest: true,
    },
];

fn samples() -> Vec<(Header, Vec<u8>, bool)> {
    let data = |n: usize| (0..n).map(|i| (i * 7 + 3) as u8).collect::<Vec<u8>>();
    let mut sqe = [0u32; 16];
    sqe.iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = i as u32 * 0x0101_0101);
    vec![
        (
            Header::IcReq(IcReq {
                pfv: 0,
                hpda: 0,
                digests: ALL[3],
                maxr2t: 0,
            }),
            vec![],
            true,
        ),
        (
            Header::IcResp(IcResp {
                pfv: 0,
                cpda: 1,
                digests: ALL[1],
                maxh2cdata: 0x40_0000,
            }),
            vec![],
            false,
        ),
        (
            Header::TermReq {
                from_host: true,
                fes: fes::HEADER_DIGEST_ERROR,
                fei: 0,
            },
            data(24),
            true,
        ),
        (
            Header::TermReq {
                from_host: false,
                fes: fes::INVALID_HEADER_FIELD,
                fei: 4,
            },
            vec![],
            false,
        ),
        (Header::CapsuleCmd(sqe), vec![], true),
        (Header::CapsuleCmd(sqe), data(4096), true),
        (
            Header::CapsuleResp(Completion {
                dw0: 7,
                sq_head: 3,
                sq_id: 1,
                cid: 9,
                phase: false,
                sc: 0x80,
                sct: 0,
                dnr: true,
            }),
            vec![],
            false,
        ),
        (
            Header::H2cData(DataHeader {
                cccid: 5,
                ttag: 2,
                datao: 8192,
                datal: 1000,
                last: true,
                success: false,
            }),
            data(1000),
            true,
        ),
        (
            Header::C2hData(DataHeader {
                cccid: 65535,
                ttag: 0,
                datao: 0,
                datal: 512,
                last: true,
                success: true,
            }),
            data(512),
            false,
        ),
        (
            Header::R2t(R2t {
                cccid: 1,
                ttag: 77,
                r2to: 4096,
                r2tl: 65536,
            }),
            vec![],
            false,
        ),
    ]
}

#[test]
fn every_pdu_round_trips_under_every_framing_and_alignment() {
    for framing in ALL {
        for align in [4, 8, 32] {
            for (h, data, from_host) in samples() {
                let mut out = vec![0xEE]; // encoding appends
                encode_pdu(&mut out, &h, &[&data], framing, align);
                let pdu = &out[1..];
                let (back, got) = parse_pdu(pdu, framing, from_host)
                    .unwrap_or_else(|e| panic!("{h:?} {framing:?}: {e}"));
                assert_eq!(back, h);
                let is_term = matches!(h, Header::TermReq { .. });
                if is_term {
                    // TermReq data is part of its header part.
                    assert_eq!(pdu.len(), TERM_REQ_HLEN + data.len());
                } else {
                    assert_eq!(got, &data[..]);
                }
                let p = plan(pdu, framing, from_host).unwrap();
                assert_eq!(p.pdu_bytes(), pdu.len());
                if !data.is_empty() && !is_term {
                    assert_eq!(p.header_bytes % align, 0, "data aligned");
                }
                // The other side never accepts it.
                assert!(matches!(
                    plan(pdu, framing, !from_host),
                    Err(TcpError::Unexpected { .. })
                ));
            }
        }
    }
}

#[test]
fn data_split_in_pieces_encodes_as_one() {
    let f = ALL[3];
    let h = Header::H2cData(DataHeader {
        cccid: 1,
        ttag: 1,
        datao: 0,
        datal: 10,
        last: false,
        success: false,
    });
    let (mut a, mut b) = (Vec::new(), Vec::new());
    encode_pdu(&mut a, &h, &[b"0123456789"], f, 4);
    encode_pdu(&mut b, &h, &[b"012", b"", b"3456789"], f, 4);
    assert_eq!(a, b);
}

fn c2h_data(framing: Framing) -> Vec<u8> {
    let mut out = Vec::new();
    let h = Header::C2hData(DataHeader {
        cccid: 3,
        ttag: 0,
        datao: 0,
        datal: 64,
        last: true,
        success: false,
    });
    encode_pdu(&mut out, &h, &[&[0x5a; 64]], framing, 4);
    out
}

#[test]
fn digest_mismatches_are_caught() {
    let f = ALL[3];
    let mut pdu = c2h_data(f);
    pdu[9] ^= 1; // a header byte
    assert!(matches!(
        parse_pdu(&pdu, f, false),
        Err(TcpError::HeaderDigest { pdu: "C2HData", .. })
    ));
    let mut pdu = c2h_data(f);
    let n = pdu.len();
    pdu[n - 10] ^= 0x80; // a data byte
    let e = parse_pdu(&pdu, f, false).unwrap_err();
    assert!(matches!(e, TcpError::DataDigest { .. }), "{e}");
    // A data digest error fails the command, not the connection: no
    // TermReq (and never FES 0x03, which is the header digest's).
    assert_eq!(e.fes(), None);
    let h = parse_pdu(&c2h_data(f)[..], f, false).map(|_| ());
    assert_eq!(h, Ok(()));
    let mut pdu = c2h_data(f);
    pdu[9] ^= 1;
    assert_eq!(
        parse_pdu(&pdu, f, false).unwrap_err().fes(),
        Some(fes::HEADER_DIGEST_ERROR)
    );
}

#[test]
fn digest_flags_must_match_the_negotiation() {
    let pdu = c2h_data(ALL[0]);
    for f in &ALL[1..] {
        assert!(matches!(
            plan(&pdu, *f, false),
            Err(TcpError::DigestFlags { .. })
        ));
    }
    // A data digest on a PDU without data.
    let mut r2t = Vec::new();
    let h = Header::R2t(R2t {
        cccid: 0,
        ttag: 0,
        r2to: 0,
        r2tl: 4096,
    });
    encode_pdu(&mut r2t, &h, &[], ALL[2], 4);
    r2t[1] |= flag::DDGSTF;
    assert!(matches!(
        plan(&r2t, ALL[2], false),
        Err(TcpError::DigestFlags { .. })
    ));
    // Digest flags on an ICResp.
    let mut ic = Vec::new();
    encode_pdu(&mut ic, &samples()[1].0, &[], ALL[3], 4);
    ic[1] = flag::HDGSTF;
    assert!(matches!(
        plan(&ic, ALL[3], false),
        Err(TcpError::DigestFlags { .. })
    ));
}

#[test]
fn bad_types_lengths_and_offsets_are_typed_errors() {
    let f = ALL[0];
    let good = c2h_data(f);
    let with = |at: usize, v: u8| {
        let mut p = good.clone();
        p[at] = v;
        p
    };
    assert_eq!(
        plan(&with(0, 0x08), f, false),
        Err(TcpError::UnknownType(0x08))
    );
    assert_eq!(
        plan(&with(0, 0x42), f, false),
        Err(TcpError::UnknownType(0x42))
    );
    assert!(matches!(
        plan(&with(2, 23), f, false),
        Err(TcpError::HeaderLength {
            hlen: 23,
            expected: 24,
            ..
        })
    ));
    assert!(matches!(
        plan(&with(3, 8), f, false),
        Err(TcpError::DataOffset { pdo: 8, .. })
    ));
    assert!(matches!(
        plan(&with(3, 26), f, false),
        Err(TcpError::DataOffset { pdo: 26, .. })
    ));
    // PLEN leaving no data after PDO.
    let mut p = good.clone();
    p[4..8].copy_from_slice(&24u32.to_le_bytes());
    assert!(matches!(
        plan(&p, f, false),
        Err(TcpError::PduLength { plen: 24, .. })
    ));
    // DATAL disagreeing with PLEN.
    let mut p = good.clone();
    p[16..20].copy_from_slice(&65u32.to_le_bytes());
    assert!(matches!(
        parse_header(&p, f, false),
        Err(TcpError::DataLength {
            datal: 65,
            carried: 64,
            ..
        })
    ));
    // SUCCESS without LAST_PDU.
    let p = with(1, flag::SUCCESS);
    assert!(matches!(
        parse_header(&p, f, false),
        Err(TcpError::Unexpected { pdu: "C2HData", .. })
    ));
    // A response capsule with a PLEN past its header.
    let mut resp = Vec::new();
    encode_pdu(&mut resp, &samples()[6].0, &[], f, 4);
    resp[4] += 4;
    assert!(matches!(
        plan(&resp, f, false),
        Err(TcpError::PduLength { .. })
    ));
    // A TermReq longer than the most it may carry.
    let mut term = Vec::new();
    encode_pdu(&mut term, &samples()[3].0, &[&[0; 128]], f, 4);
    assert!(plan(&term, f, false).is_ok());
    term[4..8].copy_from_slice(&153u32.to_le_bytes());
    assert!(matches!(
        plan(&term, f, false),
        Err(TcpError::PduLength { plen: 153, .. })
    ));
    // Short and long buffers.
    assert!(matches!(
        plan(&good[..7], f, false),
        Err(TcpError::Truncated { need: 8, have: 7 })
    ));
    assert!(matches!(
        parse_pdu(&good[..good.len() - 1], f, false),
        Err(TcpError::Truncated { .. })
    ));
    let mut long = good.clone();
    long.push(0);
    assert!(matches!(
        parse_pdu(&long, f, false),
        Err(TcpError::PduLength { .. })
    ));
}

#[test]
fn term_req_reasons_are_named() {
    let e = TcpError::TerminatedByController {
        fes: fes::DATA_OUT_OF_RANGE,
        fei: 0,
    };
    assert!(e.to_string().contains("data transfer out of range"), "{e}");
    assert_eq!(e.fes(), None);
    assert!(fes_reason(0x77).contains("unknown"));
    assert_eq!(
        TcpError::R2tLimitExceeded { cid: 1 }.fes(),
        Some(fes::DATA_LIMIT_EXCEEDED)
    );
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A small deterministic sweep (the fuzz target does the real work).
    let mut rng = crate::util::SplitMix64::new(0x1234_5678_9abc_def0);
    for len in 0..300 {
        for _ in 0..20 {
            let mut b = vec![0u8; len];
            rng.fill(&mut b);
            if len > 3 {
                b[0] %= 10; // mostly known types
                b[2] = [24, 72, 128][len % 3];
            }
            for f in ALL {
                for side in [false, true] {
                    let _ = parse_pdu(&b, f, side);
                    let _ = parse_header(&b, f, side);
                }
            }
        }
    }
}
