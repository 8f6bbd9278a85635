#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The wire format against vectors made by LMCache 0.5.6's own protocol and
//! key classes (`tests/fixtures/lmcache_protocol.json`).

use kvgate_store::protocol::{CLIENT_HEADER_LEN, SERVER_HEADER_LEN};
use kvgate_store::{ChunkKey, ChunkMeta, Command, ProtocolError, Reply, Request};
use serde_json::Value;

fn vectors() -> Value {
    serde_json::from_str(include_str!("fixtures/lmcache_protocol.json")).unwrap()
}

fn enum_code(v: &Value, table: &str, name: &str) -> i32 {
    v["enums"][table][name].as_i64().unwrap() as i32
}

#[test]
fn sizes_are_lmcaches() {
    let v = vectors();
    assert_eq!(v["ClientMetaMessage_packlength"], CLIENT_HEADER_LEN);
    assert_eq!(v["ServerMetaMessage_packlength"], SERVER_HEADER_LEN);
    assert_eq!(v["MAX_KEY_LENGTH"], kvgate_store::key::MAX_KEY_LEN);
}

#[test]
fn every_key_parses_and_prints_back_exactly() {
    let v = vectors();
    for k in v["keys"].as_array().unwrap() {
        let s = k["to_string"].as_str().unwrap();
        let key = ChunkKey::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(key.to_string(), s);
        assert_eq!(key.model, k["model_name"].as_str().unwrap());
        assert_eq!(key.world_size, k["world_size"].as_u64().unwrap() as u32);
        assert_eq!(key.worker_id, k["worker_id"].as_u64().unwrap() as u32);
        assert_eq!(key.chunk_hash, k["chunk_hash"].as_i64().unwrap(), "{s}");
        assert_eq!(key.layer_id.map(u64::from), k["layer_id"].as_u64());
        let tags: Vec<(String, String)> = k["tags"]
            .as_array()
            .map(|t| {
                t.iter()
                    .map(|p| (p[0].as_str().unwrap().into(), p[1].as_str().unwrap().into()))
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(key.tags, tags);
    }
}

#[test]
fn keys_outside_the_grammar_are_refused_without_echoing_them() {
    let long = format!("m@1@0@ab@half@cachesalt%{}", "s".repeat(150));
    for bad in [
        "",
        "m@1@0@ab",
        "@1@0@ab@half",
        "m@x@0@ab@half",
        "m@1@0@zz@half",
        "m@1@0@ab@",
        "m@1@0@-0@half",
        "m@01@0@ab@half",
        "m@1@0@00ab@half",
        "m@1@0@ab@half@7@8",
        "m@1@0@ab@half@tag",
        "m@1@0@ab@half@%v",
        "m@1@0@10000000000000000@half",
        "m\u{0}x@1@0@ab@half",
        "m@1@0@ab@half@user%a\nb",
        long.as_str(),
    ] {
        let e = ChunkKey::parse(bad)
            .err()
            .unwrap_or_else(|| panic!("{bad} parsed"));
        assert!(!e.to_string().contains("cachesalt%"), "{e}");
    }
    let salted = ChunkKey::parse("m@1@0@ab@half@cachesalt%0123abcd").unwrap();
    assert_eq!(salted.tag("cachesalt"), Some("0123abcd"));
}

#[test]
fn request_headers_decode_and_encode_as_lmcache_writes_them() {
    let v = vectors();
    for m in v["client_messages"].as_array().unwrap() {
        let bytes: [u8; CLIENT_HEADER_LEN] = hex::decode(m["hex"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        let req = Request::decode(&bytes).unwrap();
        let command = enum_code(&v, "ClientCommand", m["command"].as_str().unwrap());
        assert_eq!(req.command.code(), command);
        assert_eq!(u64::from(req.length), m["length"].as_u64().unwrap());
        assert_eq!(
            req.meta.fmt,
            enum_code(&v, "MemoryFormat", m["fmt"].as_str().unwrap())
        );
        assert_eq!(
            req.meta.dtype,
            enum_code(&v, "DTYPE_TO_INT", m["dtype"].as_str().unwrap())
        );
        let shape: Vec<i32> = m["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap() as i32)
            .collect();
        assert_eq!(req.meta.shape.to_vec(), shape);
        assert_eq!(req.key.to_string(), m["key"].as_str().unwrap());
        assert_eq!(req.encode(), bytes, "{}", m["name"]);
    }
}

#[test]
fn reply_headers_are_byte_for_byte_lmcaches() {
    let v = vectors();
    let by_name = |n: &str| -> Vec<u8> {
        let m = v["server_messages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == n)
            .unwrap();
        hex::decode(m["hex"].as_str().unwrap()).unwrap()
    };
    assert_eq!(Reply::FAIL.encode().to_vec(), by_name("get_miss"));
    assert_eq!(Reply::FAIL.encode().to_vec(), by_name("exist_no"));
    assert_eq!(Reply::OK.encode().to_vec(), by_name("exist_yes"));
    assert_eq!(Reply::OK.encode().to_vec(), by_name("health_ok"));
    let hit = Reply::hit(
        33554432,
        ChunkMeta {
            fmt: 1,
            dtype: 3,
            shape: [2, 32, 256, 1024],
        },
    );
    assert_eq!(hit.encode().to_vec(), by_name("get_hit"));
    assert_eq!(Reply::decode(&hit.encode()), hit);
}

#[test]
fn bad_headers_are_errors_not_panics() {
    let good = Request {
        command: Command::Get,
        length: 0,
        meta: ChunkMeta::EMPTY,
        location: 0,
        key: ChunkKey::parse("m@1@0@ab@half").unwrap(),
    }
    .encode();
    let mut unknown = good;
    unknown[0] = 9;
    assert_eq!(
        Request::decode(&unknown),
        Err(ProtocolError::UnknownCommand(9))
    );
    let mut negative = good;
    negative[0] = 1;
    negative[4..8].copy_from_slice(&(-5i32).to_le_bytes());
    assert_eq!(
        Request::decode(&negative),
        Err(ProtocolError::NegativeLength(-5))
    );
    let mut get_with_payload = good;
    get_with_payload[4..8].copy_from_slice(&7i32.to_le_bytes());
    assert!(matches!(
        Request::decode(&get_with_payload),
        Err(ProtocolError::UnexpectedPayload(Command::Get, 7))
    ));
    let mut not_utf8 = good;
    not_utf8[36] = 0xff;
    assert_eq!(Request::decode(&not_utf8), Err(ProtocolError::KeyNotUtf8));
    // Every byte string of the header's size decodes or fails cleanly.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..20_000 {
        let mut buf = good;
        for _ in 0..4 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf[(x % CLIENT_HEADER_LEN as u64) as usize] = (x >> 32) as u8;
        }
        let _ = Request::decode(&buf);
    }
}
