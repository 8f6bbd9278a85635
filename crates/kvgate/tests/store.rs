#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `kvgate store` as a process: configured by env, it answers LMCache's
//! HEALTH and keeps a chunk between two connections.

use std::time::{Duration, Instant};

use kvgate_store::protocol::SERVER_HEADER_LEN;
use kvgate_store::{ChunkKey, ChunkMeta, Command, Reply, Request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;
use common::*;

fn header(command: Command, length: u32) -> [u8; 186] {
    Request {
        command,
        length,
        meta: ChunkMeta::EMPTY,
        location: 0,
        key: ChunkKey::parse("/models/tiny@1@0@-5a@bfloat16").unwrap(),
    }
    .encode()
}

async fn reply(s: &mut TcpStream) -> Reply {
    let mut h = [0u8; SERVER_HEADER_LEN];
    s.read_exact(&mut h).await.unwrap();
    Reply::decode(&h)
}

#[tokio::test]
async fn the_store_process_serves_lm_clients() {
    let port = free_port();
    let admin_port = free_port();
    let _proc = Kill(
        std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
            .arg("store")
            .env("KVGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("KVGATE_ADMIN_LISTEN", format!("127.0.0.1:{admin_port}"))
            .env("KVGATE_STORE_MEMORY_BYTES", "134217728")
            .env("KVGATE_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    let mut s = loop {
        match TcpStream::connect(("127.0.0.1", port)).await {
            Ok(s) => break s,
            Err(_) if t.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("store did not start: {e}"),
        }
    };
    s.write_all(&header(Command::Health, 0)).await.unwrap();
    assert_eq!(reply(&mut s).await, Reply::OK);
    s.write_all(&header(Command::Put, 4)).await.unwrap();
    s.write_all(b"kv!!").await.unwrap();
    // PUT has no reply: a HEALTH round trip says the store has taken it
    // before another connection asks for it.
    s.write_all(&header(Command::Health, 0)).await.unwrap();
    assert_eq!(reply(&mut s).await, Reply::OK);
    drop(s);
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(&header(Command::Get, 0)).await.unwrap();
    let r = reply(&mut s).await;
    assert_eq!((r.code, r.length), (200, 4));
    let mut got = [0u8; 4];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"kv!!");
    let ready: serde_json::Value = reqwest::get(format!("http://127.0.0.1:{admin_port}/ready"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["bytes"], 4);
    // A config that cannot work is refused at start.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .arg("store")
        .env("KVGATE_STORE_MEMORY_BYTES", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("memory_bytes"));
    // So is a Redis tier named both as one server and as a cluster.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("store.yaml");
    std::fs::write(
        &cfg,
        "redis: {url: 'redis://127.0.0.1:1', cluster: ['redis://127.0.0.1:2'], max_bytes: 1000}\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .args(["store", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exactly one of url"), "{err}");
}
