#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The `lm://` listener over real sockets, as LMCache's connector uses it:
//! PUTs back to back without replies, EXIST then GET, the exact miss bytes,
//! LRU eviction by bytes, bad input closing only its own connection, stalled
//! clients cut off (idle ones not), and connections past the limit refused.

use std::sync::Arc;

use kvgate_store::{ChunkKey, Command, Reply, Store};

mod common;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn start(memory_bytes: u64, max_chunk: u32) -> (std::net::SocketAddr, Arc<Store>) {
    let store = Store::new(
        memory_bytes,
        max_chunk,
        kvgate_store::Scopes::open(),
        kvgate_auth::audit::AuditLog::disabled(),
    );
    (serve_store(store.clone()).await, store)
}

fn key(hash: i64) -> ChunkKey {
    ChunkKey::parse(&format!("/models/tiny@1@0@{hash:x}@bfloat16@cachesalt%abc")).unwrap()
}

#[tokio::test]
async fn put_exist_get_as_lmcache_does() {
    let (addr, store) = start(1 << 20, 1 << 20).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    // Two PUTs back to back, no reply awaited.
    let payloads: Vec<Vec<u8>> = (0..2u8).map(|i| vec![i + 1; 131_072]).collect();
    for (i, p) in payloads.iter().enumerate() {
        s.write_all(&header(Command::Put, key(i as i64), p.len() as u32))
            .await
            .unwrap();
        s.write_all(p).await.unwrap();
    }
    // Lookup: EXIST per chunk, stopping at the first miss.
    for (i, want) in [(0, 200), (1, 200), (2, 400)] {
        s.write_all(&header(Command::Exist, key(i), 0))
            .await
            .unwrap();
        assert_eq!(reply(&mut s).await.code, want, "chunk {i}");
    }
    // Retrieve: the stored meta comes back with the payload.
    s.write_all(&header(Command::Get, key(1), 0)).await.unwrap();
    let r = reply(&mut s).await;
    assert_eq!((r.code, r.length, r.meta), (200, 131_072, META));
    let mut got = vec![0u8; r.length as usize];
    s.read_exact(&mut got).await.unwrap();
    assert_eq!(got, payloads[1]);
    // A miss is LMCache's exact miss header.
    s.write_all(&header(Command::Get, key(9), 0)).await.unwrap();
    assert_eq!(reply(&mut s).await, Reply::FAIL);
    s.write_all(&header(Command::Health, key(0), 0))
        .await
        .unwrap();
    assert_eq!(reply(&mut s).await, Reply::OK);
    // Another connection (another worker) sees the same chunks.
    let mut other = TcpStream::connect(addr).await.unwrap();
    other
        .write_all(&header(Command::Exist, key(0), 0))
        .await
        .unwrap();
    assert_eq!(reply(&mut other).await.code, 200);
    assert_eq!(store.memory.len(), 2);
}

#[tokio::test]
async fn the_least_recently_used_chunk_goes_first() {
    let (addr, store) = start(3 * 1000, 1 << 20).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let put = |h: i64| {
        let mut b = header(Command::Put, key(h), 1000).to_vec();
        b.extend(vec![h as u8; 1000]);
        b
    };
    for h in 0..3 {
        s.write_all(&put(h)).await.unwrap();
    }
    // Touch chunk 0, then a fourth PUT evicts chunk 1.
    s.write_all(&header(Command::Get, key(0), 0)).await.unwrap();
    let r = reply(&mut s).await;
    let mut sink = vec![0u8; r.length as usize];
    s.read_exact(&mut sink).await.unwrap();
    s.write_all(&put(3)).await.unwrap();
    for (h, want) in [(0, 200), (1, 400), (2, 200), (3, 200)] {
        s.write_all(&header(Command::Exist, key(h), 0))
            .await
            .unwrap();
        assert_eq!(reply(&mut s).await.code, want, "chunk {h}");
    }
    assert_eq!(store.memory.bytes(), 3000);
    assert_eq!(store.memory.stats.evictions.get(), 1);
}

#[tokio::test]
async fn bad_input_closes_only_its_own_connection() {
    let (addr, store) = start(1 << 20, 4096).await;
    // An oversized PUT: refused before its payload is read or allocated.
    let mut big = TcpStream::connect(addr).await.unwrap();
    big.write_all(&header(Command::Put, key(1), 1 << 30))
        .await
        .unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(big.read(&mut buf).await.unwrap(), 0, "closed");
    // An unknown command, and a key outside the grammar.
    let mut garbage = TcpStream::connect(addr).await.unwrap();
    let mut h = header(Command::Get, key(1), 0);
    h[0] = 42;
    garbage.write_all(&h).await.unwrap();
    assert_eq!(garbage.read(&mut buf).await.unwrap(), 0, "closed");
    let mut bad_key = TcpStream::connect(addr).await.unwrap();
    let mut h = header(Command::Exist, key(1), 0);
    h[36..40].copy_from_slice(b"@@@@");
    bad_key.write_all(&h).await.unwrap();
    assert_eq!(bad_key.read(&mut buf).await.unwrap(), 0, "closed");
    // Others are still served.
    let mut good = TcpStream::connect(addr).await.unwrap();
    good.write_all(&header(Command::Health, key(0), 0))
        .await
        .unwrap();
    assert_eq!(reply(&mut good).await, Reply::OK);
    let errors = store.protocol_errors.get();
    assert_eq!(errors, 3);
    assert!(store.memory.is_empty());
}

async fn start_limited(
    limits: kvgate_store::ConnectionLimits,
) -> (std::net::SocketAddr, Arc<Store>) {
    let store = Store::with(
        1 << 20,
        4096,
        kvgate_store::Scopes::open(),
        kvgate_auth::audit::AuditLog::disabled(),
        kvgate_store::Extras {
            limits,
            ..Default::default()
        },
    );
    (serve_store(store.clone()).await, store)
}

#[tokio::test]
async fn a_stalled_request_is_cut_off_but_an_idle_connection_is_not() {
    let (addr, store) = start_limited(kvgate_store::ConnectionLimits {
        io_timeout: std::time::Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    let mut idle = TcpStream::connect(addr).await.unwrap();
    // Half a header, then nothing: closed once the timeout has passed.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(&header(Command::Put, key(1), 100)[..90])
        .await
        .unwrap();
    // A whole header and half its payload: the same, and nothing stored.
    let mut cut = TcpStream::connect(addr).await.unwrap();
    cut.write_all(&header(Command::Put, key(2), 100))
        .await
        .unwrap();
    cut.write_all(&[7u8; 50]).await.unwrap();
    let mut buf = [0u8; 1];
    let t = std::time::Instant::now();
    assert_eq!(stalled.read(&mut buf).await.unwrap(), 0, "closed");
    assert_eq!(cut.read(&mut buf).await.unwrap(), 0, "closed");
    assert!(t.elapsed() >= std::time::Duration::from_millis(150));
    assert_eq!(store.timeouts.get(), 2);
    assert!(store.memory.is_empty(), "no partial chunk stored");
    // The idle one, quiet for longer than the timeout, still works.
    idle.write_all(&header(Command::Health, key(0), 0))
        .await
        .unwrap();
    assert_eq!(reply(&mut idle).await, Reply::OK);
}

#[tokio::test]
async fn a_flood_of_connections_is_refused_past_the_limit() {
    let (addr, store) = start_limited(kvgate_store::ConnectionLimits {
        max_connections: 2,
        ..Default::default()
    })
    .await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&header(Command::Health, key(0), 0))
            .await
            .unwrap();
        assert_eq!(reply(&mut s).await, Reply::OK);
        open.push(s);
    }
    let mut third = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(third.read(&mut buf).await.unwrap(), 0, "closed at accept");
    assert_eq!(store.connections_refused.get(), 1);
    // One leaves: the next is served.
    drop(open.pop());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(&header(Command::Health, key(0), 0)).await;
        let mut h = [0u8; kvgate_store::protocol::SERVER_HEADER_LEN];
        if s.read_exact(&mut h).await.is_ok() {
            assert_eq!(Reply::decode(&h), Reply::OK);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a slot never came free"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
