//! What the store's tests share: an LMCache-style client over a raw socket,
//! a store on a loopback port, and contracts with the gateway's salts.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use kvgate_auth::{AuthConfig, KeyRef, Sentinel};
use kvgate_store::protocol::{CLIENT_HEADER_LEN, SERVER_HEADER_LEN};
use kvgate_store::{ChunkKey, ChunkMeta, Command, Reply, Request, Store};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub mod redis_server;
pub mod redis_store;

/// The meta every test PUT carries (a bf16 KV_2LTD chunk).
pub const META: ChunkMeta = ChunkMeta {
    fmt: 1,
    dtype: 3,
    shape: [2, 2, 256, 64],
};

/// A request header as LMCache's connector writes it.
pub fn header(command: Command, key: ChunkKey, length: u32) -> [u8; CLIENT_HEADER_LEN] {
    Request {
        command,
        length,
        meta: if command == Command::Put {
            META
        } else {
            ChunkMeta::EMPTY
        },
        location: 0,
        key,
    }
    .encode()
}

pub async fn reply(s: &mut TcpStream) -> Reply {
    let mut h = [0u8; SERVER_HEADER_LEN];
    s.read_exact(&mut h).await.unwrap();
    Reply::decode(&h)
}

/// A PUT (no reply comes).
pub async fn put(s: &mut TcpStream, k: ChunkKey, data: &[u8]) {
    s.write_all(&header(Command::Put, k, data.len() as u32))
        .await
        .unwrap();
    s.write_all(data).await.unwrap();
}

/// EXIST's reply code.
pub async fn exist(s: &mut TcpStream, k: ChunkKey) -> i32 {
    s.write_all(&header(Command::Exist, k, 0)).await.unwrap();
    reply(s).await.code
}

/// A GET: the chunk's meta and bytes, or None on a miss.
pub async fn get(s: &mut TcpStream, k: ChunkKey) -> Option<(ChunkMeta, Vec<u8>)> {
    s.write_all(&header(Command::Get, k, 0)).await.unwrap();
    let r = reply(s).await;
    if r.code != 200 {
        return None;
    }
    let mut data = vec![0u8; r.length as usize];
    s.read_exact(&mut data).await.unwrap();
    Some((r.meta, data))
}

/// PUTs get no reply: a HEALTH round trip says the store has taken them.
pub async fn sync(s: &mut TcpStream) {
    let k = ChunkKey::parse("m@1@0@0@half").unwrap();
    s.write_all(&header(Command::Health, k, 0)).await.unwrap();
    reply(s).await;
}

/// Serves `store`'s shared `lm://` listener on a loopback port.
pub async fn serve_store(store: Arc<Store>) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(kvgate_store::serve(l, store));
    addr
}

/// Contracts for `(api key, contract)` pairs, keys from a master key in `dir`.
pub fn contracts(dir: &Path, keys: &[(&str, &str)]) -> AuthConfig {
    let master = dir.join("master.key");
    std::fs::write(&master, "store test master key material").unwrap();
    AuthConfig::for_api_keys(keys, KeyRef::File(master))
}

/// The salt the gateway puts in `kv_transfer_params` for `api_key`'s requests.
pub fn gateway_salt(cfg: &AuthConfig, api_key: &str) -> String {
    let s = Sentinel::new(cfg).unwrap();
    let p = s.authenticate(Some(&format!("Bearer {api_key}"))).unwrap();
    let a = s.authorize(p, "m").unwrap();
    s.admit(a, 1).unwrap().cache_salt
}

/// The store's `/metrics`, from its admin listener on a loopback port.
pub async fn admin_metrics(store: Arc<Store>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = l.local_addr().unwrap();
    let router = kvgate_store::admin::router(store, None, "svc");
    tokio::spawn(async move { axum::serve(l, router).await.unwrap() });
    reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
