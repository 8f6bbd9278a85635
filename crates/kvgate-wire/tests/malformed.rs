//! Hostile input: the payload decoder faces whatever arrives on the socket, so
//! truncations, wrong types, forged lengths and random bytes must all come back
//! as errors, never as panics or outsized allocations.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kvgate_wire::vllm::{decode_batch, WireError, MAX_EVENTS, MAX_TOKEN_IDS};
use proptest::prelude::*;
use serde_json::Value;

const KV_EVENTS: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/vllm/kv_events.json"
));
const REAL_032: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/vllm/real-vllm-0.32-events.txt"
));

fn payloads() -> Vec<Vec<u8>> {
    let f: Value = serde_json::from_str(KV_EVENTS).unwrap();
    let mut out = Vec::new();
    for v in f["versions"].as_array().unwrap() {
        for form in ["int_block_hashes", "bytes_block_hashes"] {
            for c in v[form].as_array().unwrap() {
                out.push(hex::decode(c["payload_hex"].as_str().unwrap()).unwrap());
            }
        }
    }
    for l in REAL_032
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        out.push(hex::decode(l.split_whitespace().nth(2).unwrap()).unwrap());
    }
    out
}

/// Parsed once: the mutation property runs thousands of cases.
fn cached_payloads() -> &'static [Vec<u8>] {
    static P: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    P.get_or_init(payloads)
}

/// `[ts=1.0, events, 0]` around already-encoded events bytes.
fn batch_with(events: &[u8]) -> Vec<u8> {
    let mut p = vec![0x93, 0xcb];
    p.extend_from_slice(&1.0f64.to_bits().to_be_bytes());
    p.extend_from_slice(events);
    p.push(0x00);
    p
}

/// A fixmap BlockStored event with the given raw field bytes appended.
fn stored_map(fields: &[(&str, &[u8])]) -> Vec<u8> {
    let mut e = vec![0x80 | (fields.len() as u8 + 1)];
    push_str(&mut e, "type");
    push_str(&mut e, "BlockStored");
    for (k, v) in fields {
        push_str(&mut e, k);
        e.extend_from_slice(v);
    }
    e
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    assert!(s.len() < 32);
    out.push(0xa0 | s.len() as u8);
    out.extend_from_slice(s.as_bytes());
}

const HASHES_1: &[u8] = &[0x91, 0x05];
const TOKENS_2: &[u8] = &[0x92, 0x01, 0x02];

#[test]
fn every_proper_prefix_fails_and_full_payload_decodes() {
    for p in payloads() {
        assert!(decode_batch(&p).is_ok());
        for cut in 0..p.len() {
            assert!(
                decode_batch(&p[..cut]).is_err(),
                "prefix {cut}/{} of {} decoded",
                p.len(),
                hex::encode(&p)
            );
        }
    }
}

#[test]
fn trailing_bytes_rejected() {
    for p in payloads() {
        let mut q = p.clone();
        q.push(0xc0);
        assert_eq!(decode_batch(&q), Err(WireError::TrailingBytes(1)));
    }
}

#[test]
fn minimal_map_event_decodes_with_defaults() {
    let e = stored_map(&[
        ("block_hashes", HASHES_1),
        ("token_ids", TOKENS_2),
        ("block_size", &[0x02]),
    ]);
    let mut ev = vec![0x91];
    ev.extend_from_slice(&e);
    let b = decode_batch(&batch_with(&ev)).unwrap();
    let kvgate_wire::vllm::KvEvent::BlockStored(s) = &b.events[0] else {
        panic!("not stored")
    };
    assert_eq!(s.block_hashes, [5]);
    assert_eq!(s.group_idx, 0);
    assert_eq!(s.medium, None);
    assert_eq!(s.extra_keys, None);
}

#[test]
fn missing_required_field_and_missing_type_rejected() {
    let e = stored_map(&[("block_hashes", HASHES_1), ("block_size", &[0x02])]);
    let mut ev = vec![0x91];
    ev.extend_from_slice(&e);
    assert!(matches!(
        decode_batch(&batch_with(&ev)),
        Err(WireError::Invalid {
            field: "token_ids",
            ..
        })
    ));
    // A map without "type".
    let mut ev = vec![0x91, 0x81];
    push_str(&mut ev, "block_hashes");
    ev.extend_from_slice(HASHES_1);
    assert!(matches!(
        decode_batch(&batch_with(&ev)),
        Err(WireError::Invalid { field: "type", .. })
    ));
}

#[test]
fn wrong_types_rejected() {
    let bad: &[(&str, &[u8])] = &[
        ("block_hashes", &[0xa1, b'x']),             // str instead of array
        ("block_hashes", &[0x91, 0xca, 0, 0, 0, 0]), // float hash
        ("token_ids", &[0x91, 0xa1, b'x']),          // str token
        ("token_ids", &[0x91, 0xff]),                // negative token
        ("token_ids", &[0x91, 0xcf, 0, 0, 0, 1, 0, 0, 0, 0]), // > u32::MAX
        ("block_size", &[0xc3]),                     // bool
        ("medium", &[0x01]),                         // int instead of str
        ("medium", &[0xa2, 0xff, 0xfe]),             // not utf-8
        ("extra_keys", &[0x91, 0x91, 0xca, 0, 0, 0, 0]), // float item
        ("extra_keys", &[0x91, 0x91, 0x80]),         // map item
        ("extra_keys", &[0x91, 0x91, 0xc3]),         // bool item
        ("extra_keys", &[0x91, 0xa1, b'x']),         // block entry not an array
        ("group_idx", &[0xff]),                      // negative
    ];
    for (k, v) in bad {
        let mut fields: Vec<(&str, &[u8])> = vec![
            ("block_hashes", HASHES_1),
            ("token_ids", TOKENS_2),
            ("block_size", &[0x02]),
        ];
        fields.retain(|(f, _)| f != k);
        fields.push((k, v));
        let mut ev = vec![0x91];
        ev.extend_from_slice(&stored_map(&fields));
        let r = decode_batch(&batch_with(&ev));
        assert!(r.is_err(), "{k} = {} decoded: {r:?}", hex::encode(v));
    }
    // Top level: not an array, too short, ts not a number, events not an array.
    for p in [
        &[0x80][..],
        &[0x91, 0x00],
        &[0x92, 0xa1, b'x', 0x90],
        &[0x92, 0x00, 0x80],
        &[0x93, 0x00, 0x90, 0xa1, b'x'],
        &[0x92, 0x00, 0x91, 0x01],
        &[0x92, 0x00, 0x91, 0x91, 0xa3, b'F', b'o', b'o'],
        &[0x92, 0x00, 0x91, 0x90],
        &[0x92, 0x00, 0x91, 0xc1],
    ] {
        assert!(decode_batch(p).is_err(), "{} decoded", hex::encode(p));
    }
}

#[test]
fn unknown_event_type_named() {
    let p = [0x92, 0x00, 0x91, 0x91, 0xa3, b'F', b'o', b'o'];
    assert_eq!(
        decode_batch(&p),
        Err(WireError::UnknownEventType("Foo".to_owned()))
    );
}

#[test]
fn tolerant_forms_accepted() {
    // Int and float32 timestamps, missing dp rank, extra trailing batch fields.
    let ok: &[&[u8]] = &[
        &[0x92, 0x05, 0x90],
        &[0x92, 0xca, 0x3f, 0x80, 0, 0, 0x90],
        &[0x94, 0x05, 0x90, 0xc0, 0x81, 0xa1, b'k', 0x92, 0xc3, 0xc0],
        // AllBlocksCleared map with an unknown nested field before "type".
        &[
            0x92, 0x00, 0x91, 0x82, 0xa1, b'z', 0x91, 0x81, 0x01, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0,
            0xa4, b't', b'y', b'p', b'e', 0xb0, b'A', b'l', b'l', b'B', b'l', b'o', b'c', b'k',
            b's', b'C', b'l', b'e', b'a', b'r', b'e', b'd',
        ],
    ];
    for p in ok {
        assert!(
            decode_batch(p).is_ok(),
            "{} failed: {:?}",
            hex::encode(p),
            decode_batch(p)
        );
    }
}

#[test]
fn huge_declared_lengths_fail_fast() {
    // array32 / map32 / str32 / bin32 headers claiming ~4 billion items with
    // nothing behind them: must fail on the length check, not allocate.
    let headers: &[&[u8]] = &[
        &[0xdd, 0xff, 0xff, 0xff, 0xff],
        &[0xdf, 0xff, 0xff, 0xff, 0xff],
        &[0xdb, 0xff, 0xff, 0xff, 0xff],
        &[0xc6, 0xff, 0xff, 0xff, 0xff],
        &[0xc9, 0xff, 0xff, 0xff, 0xff, 0x01],
    ];
    let start = std::time::Instant::now();
    for h in headers {
        // As the whole payload, as the events array, as a block's hashes and
        // tokens, and as an unknown field's value.
        assert!(decode_batch(h).is_err());
        assert!(decode_batch(&batch_with(h)).is_err());
        for field in ["block_hashes", "token_ids", "extra_keys", "mystery"] {
            let mut ev = vec![0x91];
            ev.extend_from_slice(&stored_map(&[(field, h)]));
            assert!(decode_batch(&batch_with(&ev)).is_err());
        }
    }
    assert!(start.elapsed() < std::time::Duration::from_secs(1));

    // Over the limits with enough bytes behind them to pass the length check.
    let mut ev = vec![0xdd];
    ev.extend_from_slice(&((MAX_EVENTS + 1) as u32).to_be_bytes());
    ev.extend(std::iter::repeat_n(0x90, MAX_EVENTS + 1));
    assert!(matches!(
        decode_batch(&batch_with(&ev)),
        Err(WireError::TooLarge {
            field: "events",
            ..
        })
    ));
    let mut toks = vec![0xdd];
    toks.extend_from_slice(&((MAX_TOKEN_IDS + 1) as u32).to_be_bytes());
    toks.extend(std::iter::repeat_n(0x01, MAX_TOKEN_IDS + 1));
    let mut ev = vec![0x91];
    ev.extend_from_slice(&stored_map(&[("token_ids", &toks)]));
    assert!(matches!(
        decode_batch(&batch_with(&ev)),
        Err(WireError::TooLarge {
            field: "token_ids",
            ..
        })
    ));
}

#[test]
fn deep_nesting_rejected_without_stack_overflow() {
    for depth in [40usize, 100_000] {
        let mut v = vec![0x91; depth];
        v.push(0xc0);
        // Nested inside an unknown field, and inside extra_keys.
        let mut ev = vec![0x91];
        ev.extend_from_slice(&stored_map(&[("mystery", &v)]));
        assert!(decode_batch(&batch_with(&ev)).is_err());
        let mut ek = vec![0x91, 0x91];
        ek.extend_from_slice(&v);
        let mut ev = vec![0x91];
        ev.extend_from_slice(&stored_map(&[
            ("block_hashes", HASHES_1),
            ("token_ids", TOKENS_2),
            ("block_size", &[0x02]),
            ("extra_keys", &ek),
        ]));
        assert!(decode_batch(&batch_with(&ev)).is_err());
    }
}

/// Tiny deterministic mutator shared by the mutation property.
fn mutate(p: &mut Vec<u8>, ops: &[(u8, usize, u8)]) {
    for &(op, pos, byte) in ops {
        let len = p.len();
        match op % 4 {
            0 if len > 0 => p[pos % len] ^= 1 << (byte % 8),
            1 => p.insert(pos % (len + 1), byte),
            2 if len > 0 => {
                p.remove(pos % len);
            }
            3 if len > 0 => p[pos % len] = byte,
            _ => {}
        }
    }
}

proptest! {
    #[test]
    fn random_bytes_never_panic(v in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_batch(&v);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn mutated_fixtures_never_panic(
        which in any::<prop::sample::Index>(),
        ops in proptest::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..8),
    ) {
        let all = cached_payloads();
        let mut p = all[which.index(all.len())].clone();
        mutate(&mut p, &ops);
        let _ = decode_batch(&p);
    }
}
