//! Golden vectors: every payload generated from vLLM's own msgspec structs
//! (fixtures/vllm/kv_events.json) and the payloads captured from a real vLLM
//! 0.32 server must decode to what the fixture says, and re-encode to the
//! same bytes where the fields are all modelled.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use kvgate_wire::vllm::{
    decode_batch, decode_replay_reply, decode_replay_request, encode_batch, encode_pub_frames,
    encode_replay_end, encode_replay_reply, encode_replay_request, parse_pub_frames, EventBatch,
    EventEncoding, ExtraKey, KvEvent, ReplayReply, ReplayReplyGeneration,
};
use serde_json::{json, Map, Value};

const KV_EVENTS: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/vllm/kv_events.json"
));
const REAL_032: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/vllm/real-vllm-0.32-events.txt"
));

/// Fields some vLLM releases send that kvgate does not model; the decoder
/// skips them, so the comparison does too.
const UNMODELLED: &[&str] = &[
    "kv_cache_spec_sliding_window",
    "locality",
    "session_id",
    "lookahead_token_ids",
];

/// Positional field names of the tagged-array form, in struct order.
const STORED_POSITIONS: &[&str] = &[
    "type",
    "block_hashes",
    "parent_block_hash",
    "token_ids",
    "block_size",
    "lora_id",
    "medium",
    "lora_name",
    "extra_keys",
    "group_idx",
    "kv_cache_spec_kind",
    "kv_cache_spec_sliding_window",
];
const REMOVED_POSITIONS: &[&str] = &["type", "block_hashes", "medium", "group_idx"];

struct Case {
    version: String,
    form: &'static str,
    name: String,
    payload: Vec<u8>,
    generic: Value,
}

fn fixture() -> Value {
    serde_json::from_str(KV_EVENTS).unwrap()
}

fn cases() -> Vec<Case> {
    let f = fixture();
    let mut out = Vec::new();
    for v in f["versions"].as_array().unwrap() {
        let version = v["vllm_version"].as_str().unwrap().to_owned();
        for form in ["int_block_hashes", "bytes_block_hashes"] {
            for c in v[form].as_array().unwrap() {
                out.push(Case {
                    version: version.clone(),
                    form,
                    name: c["name"].as_str().unwrap().to_owned(),
                    payload: hex::decode(c["payload_hex"].as_str().unwrap()).unwrap(),
                    generic: c["decoded_generic"].clone(),
                });
            }
        }
    }
    assert!(
        out.len() >= 50,
        "expected the full fixture, got {}",
        out.len()
    );
    out
}

fn real_payloads() -> Vec<(String, Vec<u8>)> {
    REAL_032
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let parts: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(parts.len(), 3, "bad line {l:?}");
            let bytes = hex::decode(parts[2]).unwrap();
            assert_eq!(bytes.len(), parts[1].parse::<usize>().unwrap());
            (parts[0].to_owned(), bytes)
        })
        .collect()
}

/// A fixture hash (int, or `{"bytes_hex": ...}`) folded as the decoder does.
fn fold_json_hash(v: &Value) -> Value {
    match v {
        Value::Object(o) => {
            let b = hex::decode(o["bytes_hex"].as_str().unwrap()).unwrap();
            let tail = &b[b.len().saturating_sub(8)..];
            json!(tail.iter().fold(0u64, |a, &x| (a << 8) | u64::from(x)))
        }
        other => other.clone(),
    }
}

/// A fixture event in map shape, hashes folded, unmodelled fields dropped.
fn normalize_fixture_event(e: &Value) -> Map<String, Value> {
    let mut m = match e {
        Value::Object(o) => o.clone(),
        Value::Array(a) => {
            let names = match a[0].as_str().unwrap() {
                "BlockStored" => STORED_POSITIONS,
                "BlockRemoved" => REMOVED_POSITIONS,
                _ => &["type"][..],
            };
            assert!(a.len() <= names.len(), "unexpected positional field in {e}");
            names
                .iter()
                .zip(a)
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect()
        }
        _ => panic!("event is neither map nor array: {e}"),
    };
    for k in m.keys().cloned().collect::<Vec<_>>() {
        if UNMODELLED.contains(&k.as_str()) {
            m.remove(&k);
        }
    }
    if let Some(hs) = m.get_mut("block_hashes") {
        *hs = Value::Array(hs.as_array().unwrap().iter().map(fold_json_hash).collect());
    }
    if let Some(p) = m.get_mut("parent_block_hash") {
        *p = fold_json_hash(p);
    }
    // Fields absent from older releases decode to their defaults.
    let defaults: &[(&str, Value)] = match m["type"].as_str().unwrap() {
        "BlockStored" => &[
            ("lora_id", Value::Null),
            ("medium", Value::Null),
            ("lora_name", Value::Null),
            ("extra_keys", Value::Null),
            ("group_idx", json!(0)),
            ("kv_cache_spec_kind", Value::Null),
        ],
        "BlockRemoved" => &[("medium", Value::Null), ("group_idx", json!(0))],
        _ => &[],
    };
    for (k, v) in defaults {
        m.entry(*k).or_insert_with(|| v.clone());
    }
    m
}

fn extra_key_json(k: &ExtraKey) -> Value {
    match k {
        ExtraKey::Str(s) => json!(s),
        ExtraKey::Int(i) => json!(i),
        ExtraKey::Bytes(b) => json!({ "bytes_hex": hex::encode(b) }),
        ExtraKey::List(items) => Value::Array(items.iter().map(extra_key_json).collect()),
        ExtraKey::Nil => Value::Null,
    }
}

/// A decoded event in the fixture's generic map shape.
fn event_json(e: &KvEvent) -> Map<String, Value> {
    let v = match e {
        KvEvent::BlockStored(s) => json!({
            "type": "BlockStored",
            "block_hashes": s.block_hashes,
            "parent_block_hash": s.parent_block_hash,
            "token_ids": s.token_ids,
            "block_size": s.block_size,
            "lora_id": s.lora_id,
            "medium": s.medium,
            "lora_name": s.lora_name,
            "extra_keys": s.extra_keys.as_ref().map(|blocks| blocks
                .iter()
                .map(|b| b.as_ref().map(|items| items.iter().map(extra_key_json).collect::<Vec<_>>()))
                .collect::<Vec<_>>()),
            "group_idx": s.group_idx,
            "kv_cache_spec_kind": s.kv_cache_spec_kind,
        }),
        KvEvent::BlockRemoved(r) => json!({
            "type": "BlockRemoved",
            "block_hashes": r.block_hashes,
            "medium": r.medium,
            "group_idx": r.group_idx,
        }),
        KvEvent::AllBlocksCleared => json!({ "type": "AllBlocksCleared" }),
    };
    match v {
        Value::Object(o) => o,
        _ => unreachable!(),
    }
}

fn assert_matches_generic(ctx: &str, batch: &EventBatch, generic: &Value) {
    let g = generic.as_array().unwrap();
    let ts = g[0].as_f64().unwrap();
    assert!(
        (batch.ts - ts).abs() <= ts.abs() * 1e-12,
        "{ctx}: ts {} != {ts}",
        batch.ts
    );
    let evs = g[1].as_array().unwrap();
    assert_eq!(batch.events.len(), evs.len(), "{ctx}: event count");
    for (i, (got, want)) in batch.events.iter().zip(evs).enumerate() {
        let got = event_json(got);
        let want = normalize_fixture_event(want);
        // Field by field, so a failure names the field.
        for (k, w) in &want {
            assert_eq!(got.get(k), Some(w), "{ctx}: event {i} field {k}");
        }
        for k in got.keys() {
            assert!(want.contains_key(k), "{ctx}: event {i} extra field {k}");
        }
    }
    assert_eq!(
        batch.data_parallel_rank,
        g.get(2).and_then(Value::as_i64),
        "{ctx}: dp rank"
    );
}

#[test]
fn every_fixture_payload_decodes_to_its_generic_form() {
    let cases = cases();
    for c in &cases {
        let ctx = format!("{} {} {}", c.version, c.form, c.name);
        let batch = decode_batch(&c.payload).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert_matches_generic(&ctx, &batch, &c.generic);
    }
}

#[test]
fn int_and_bytes_hashes_decode_to_equal_batches() {
    let cases = cases();
    let mut pairs = 0;
    for a in cases.iter().filter(|c| c.form == "int_block_hashes") {
        let b = cases
            .iter()
            .find(|b| b.form == "bytes_block_hashes" && b.version == a.version && b.name == a.name)
            .unwrap();
        assert_eq!(
            decode_batch(&a.payload).unwrap(),
            decode_batch(&b.payload).unwrap(),
            "{} {}",
            a.version,
            a.name
        );
        pairs += 1;
    }
    assert!(pairs >= 25);
}

#[test]
fn all_versions_agree_on_modelled_fields() {
    // The same scenario decodes identically from every release's encoding,
    // except for fields an older release does not send at all.
    let cases = cases();
    let latest: Vec<&Case> = cases.iter().filter(|c| c.version == "0.33.0").collect();
    for c in cases
        .iter()
        .filter(|c| c.version == "0.24.0" || c.version == "0.26.0")
    {
        let l = latest
            .iter()
            .find(|l| l.form == c.form && l.name == c.name)
            .unwrap();
        assert_eq!(
            decode_batch(&c.payload).unwrap(),
            decode_batch(&l.payload).unwrap(),
            "{} {}",
            c.version,
            c.name
        );
    }
}

fn assert_reencodes(version: &str, encoding: EventEncoding) {
    let names = [
        "prefill_3_blocks",
        "lora_salt_two_events",
        "multimodal",
        "remove_and_clear",
        "empty_batch_no_dp",
    ];
    let cases = cases();
    for name in names {
        let c = cases
            .iter()
            .find(|c| c.version == version && c.form == "int_block_hashes" && c.name == name)
            .unwrap();
        let batch = decode_batch(&c.payload).unwrap();
        let out = encode_batch(&batch, encoding);
        assert_eq!(
            hex::encode(&out),
            hex::encode(&c.payload),
            "{version} {name} via {encoding:?}"
        );
    }
}

#[test]
fn reencode_matches_vllm_0_33_bytes() {
    assert_reencodes("0.33.0", EventEncoding::MapV033);
}

#[test]
fn reencode_matches_vllm_0_24_and_0_26_bytes() {
    assert_reencodes("0.24.0", EventEncoding::Map);
    assert_reencodes("0.26.0", EventEncoding::Map);
}

#[test]
fn reencode_matches_vllm_0_23_tagged_array_bytes() {
    assert_reencodes("0.23.0", EventEncoding::TaggedArray);
}

#[test]
fn encode_decode_round_trips_every_fixture_batch() {
    for c in cases() {
        let batch = decode_batch(&c.payload).unwrap();
        for enc in [
            EventEncoding::Map,
            EventEncoding::MapV033,
            EventEncoding::TaggedArray,
        ] {
            let back = decode_batch(&encode_batch(&batch, enc)).unwrap();
            assert_eq!(
                back, batch,
                "{} {} {} via {enc:?}",
                c.version, c.form, c.name
            );
        }
    }
}

#[test]
fn real_vllm_0_32_payloads_decode_and_reencode() {
    let real = real_payloads();
    assert_eq!(real.len(), 3);
    for (kind, payload) in &real {
        let batch = decode_batch(payload).unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(batch.events.len(), 1, "{kind}");
        let got = match &batch.events[0] {
            KvEvent::BlockStored(s) => {
                assert_eq!(s.block_size, 32);
                assert_eq!(s.token_ids.len(), 32);
                assert_eq!(s.block_hashes.len(), 1);
                assert!(s.parent_block_hash.is_some());
                assert_eq!(s.medium.as_deref(), Some("GPU"));
                assert_eq!(s.extra_keys, Some(vec![None]));
                assert_eq!(s.kv_cache_spec_kind.as_deref(), Some("full_attention"));
                "BlockStored"
            }
            KvEvent::BlockRemoved(r) => {
                assert_eq!(r.block_hashes.len(), 1);
                assert_eq!(r.medium.as_deref(), Some("GPU"));
                "BlockRemoved"
            }
            KvEvent::AllBlocksCleared => "AllBlocksCleared",
        };
        assert_eq!(got, kind);
        assert_eq!(batch.data_parallel_rank, Some(0));
        assert_eq!(
            hex::encode(encode_batch(&batch, EventEncoding::Map)),
            hex::encode(payload),
            "{kind}"
        );
    }
}

fn zmq_frames(v: &Value) -> Vec<Vec<u8>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|f| hex::decode(f.as_str().unwrap()).unwrap())
        .collect()
}

#[test]
fn zmq_pub_frame_example() {
    let f = fixture();
    let frames = zmq_frames(&f["zmq"]["pub_frame_example_seq2"]["frames_hex"]);
    let p = parse_pub_frames(&frames).unwrap();
    assert_eq!(p.topic, b"kv-events");
    assert_eq!(p.seq, 2);
    assert_eq!(p.payload, b"<payload>");
    assert_eq!(encode_pub_frames(&p.topic, p.seq, &p.payload), frames);
    assert!(parse_pub_frames(&frames[..2]).is_err());
    let short: [&[u8]; 3] = [b"t", &[0; 7], b"p"];
    assert!(parse_pub_frames(&short).is_err());
}

#[test]
fn zmq_replay_request_example() {
    let f = fixture();
    let frames = zmq_frames(&f["zmq"]["replay_request_from_DEALER"]["frames_hex"]);
    assert_eq!(decode_replay_request(&frames).unwrap(), 2);
    assert_eq!(encode_replay_request(2), frames);
    assert!(decode_replay_request(&frames[1..]).is_err());
    let bad_delim: [&[u8]; 2] = [b"x", &frames[1]];
    assert!(decode_replay_request(&bad_delim).is_err());
}

#[test]
fn zmq_replay_reply_examples_both_generations() {
    let f = fixture();
    for (key, generation, topic) in [
        (
            "replay_reply_v0_26_plus",
            ReplayReplyGeneration::WithTopic,
            Some(b"kv-events".to_vec()),
        ),
        (
            "replay_reply_up_to_v0_25",
            ReplayReplyGeneration::NoTopic,
            None,
        ),
    ] {
        let frames = zmq_frames(&f["zmq"][key]["frames_hex"]);
        let end = zmq_frames(&f["zmq"][key]["end_marker_hex"]);
        assert_eq!(
            decode_replay_reply(&frames).unwrap(),
            ReplayReply::Batch {
                topic: topic.clone(),
                seq: 2,
                payload: b"<payload>".to_vec()
            },
            "{key}"
        );
        assert_eq!(
            decode_replay_reply(&end).unwrap(),
            ReplayReply::End,
            "{key}"
        );
        let t = topic.unwrap_or_default();
        assert_eq!(
            encode_replay_reply(generation, &t, 2, b"<payload>"),
            frames,
            "{key}"
        );
        assert_eq!(encode_replay_end(generation), end, "{key}");
    }
    let two: [&[u8]; 2] = [b"", &[0; 8]];
    assert!(decode_replay_reply(&two).is_err());
}
