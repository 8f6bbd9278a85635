//! Long-running no-panic, no-corruption check of the `lm://` side of the
//! store, run as a plain binary (`cargo bench -p kvgate-store --bench
//! fuzz_lm`, in CI; no fuzzing toolchain needed). Exits non-zero on any
//! panic or wrong answer.
//!
//! - **Headers and keys** (1.2M cases): LMCache's own client headers (the
//!   fixture vectors) mutated by bit flips, byte overwrites, hostile ints in
//!   every field (negative and huge lengths), keys cut, grown, padded with
//!   spaces or NULs, or made of random bytes, plus pure random headers. A
//!   header that decodes must re-encode to one that decodes the same, and a
//!   key that parses must print back to itself.
//! - **Sealed frames** (100k cases): a chunk sealed for one binding, mutated;
//!   no changed frame may open.
//! - **Framing against a live store** (2k connections): random sequences of
//!   whole PUTs, GETs, EXISTs and HEALTHs mixed with garbage headers, PUTs cut
//!   off mid-payload and PUTs over the size limit. After each connection the
//!   store must answer HEALTH on a new one, a cut-off PUT must never be
//!   stored, and every chunk stored whole must read back byte for byte.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;

use kvgate_auth::audit::AuditLog;
use kvgate_store::crypto::{open, seal, Binding, DataKey};
use kvgate_store::protocol::{CLIENT_HEADER_LEN, SERVER_HEADER_LEN};
use kvgate_store::{ChunkKey, ChunkMeta, Command, Reply, Request, Scopes, Store};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PROTOCOL: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/lmcache_protocol.json"
));

const HEADER_CASES: u64 = 1_200_000;
const FRAME_CASES: u64 = 100_000;
const CONNECTIONS: u64 = 2_000;
const MAX_CHUNK: u32 = 1 << 16;

/// The fuzzer's deterministic randomness.
struct Rng(StdRng);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0.random()
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            self.0.random_range(0..n)
        }
    }
}

fn seed_headers() -> Vec<[u8; CLIENT_HEADER_LEN]> {
    let f: Value = serde_json::from_str(PROTOCOL).unwrap();
    f["client_messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| hex::decode(m["hex"].as_str().unwrap()).unwrap())
        .filter(|b| b.len() == CLIENT_HEADER_LEN)
        .map(|b| b.try_into().unwrap())
        .collect()
}

fn seed_keys() -> Vec<String> {
    let f: Value = serde_json::from_str(PROTOCOL).unwrap();
    f["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["to_string"].as_str().unwrap().to_string())
        .collect()
}

const HOSTILE_INTS: [i32; 9] = [0, 1, -1, i32::MIN, i32::MAX, 200, 400, 1 << 24, -(1 << 24)];

fn mutate_header(h: &mut [u8; CLIENT_HEADER_LEN], keys: &[String], rng: &mut Rng) {
    for _ in 0..=rng.below(3) {
        match rng.below(6) {
            0 => h[rng.below(CLIENT_HEADER_LEN)] ^= 1 << rng.below(8),
            1 => h[rng.below(CLIENT_HEADER_LEN)] = rng.next() as u8,
            2 => {
                let field = rng.below(9);
                let v = HOSTILE_INTS[rng.below(HOSTILE_INTS.len())];
                h[4 * field..4 * field + 4].copy_from_slice(&v.to_le_bytes());
            }
            3 => {
                // Another key, cut or grown, padded with spaces or NULs.
                let mut k = keys[rng.below(keys.len())].clone().into_bytes();
                match rng.below(3) {
                    0 => k.truncate(rng.below(k.len() + 1)),
                    1 => {
                        let at = rng.below(k.len() + 1);
                        k.insert(at, b"@%/\x00 \xff"[rng.below(6)]);
                    }
                    _ => k.extend(std::iter::repeat_n(b'x', rng.below(200))),
                }
                let pad = if rng.below(2) == 0 { b' ' } else { 0 };
                for (i, b) in h[36..].iter_mut().enumerate() {
                    *b = k.get(i).copied().unwrap_or(pad);
                }
            }
            4 => {
                for b in h[36..].iter_mut() {
                    *b = rng.next() as u8;
                }
            }
            _ => {
                for b in h.iter_mut() {
                    *b = rng.next() as u8;
                }
            }
        }
    }
}

/// Returns (decoded, refused) counts.
fn headers(rng: &mut Rng) -> Result<(u64, u64), String> {
    let seeds = seed_headers();
    let keys = seed_keys();
    if seeds.is_empty() || keys.is_empty() {
        return Err("no seed headers or keys in the fixture".into());
    }
    let (mut ok, mut refused) = (0, 0);
    for case in 0..HEADER_CASES {
        let mut h = seeds[rng.below(seeds.len())];
        mutate_header(&mut h, &keys, rng);
        let outcome = catch_unwind(AssertUnwindSafe(|| match Request::decode(&h) {
            Ok(r) => {
                let again = Request::decode(&r.encode());
                (again.as_ref() == Ok(&r), true)
            }
            Err(_) => (true, false),
        }));
        match outcome {
            Err(_) => {
                return Err(format!(
                    "case {case}: decode panicked on {}",
                    hex::encode(h)
                ))
            }
            Ok((false, _)) => {
                return Err(format!(
                    "case {case}: re-encoded header decodes differently: {}",
                    hex::encode(h)
                ))
            }
            Ok((true, true)) => ok += 1,
            Ok((true, false)) => refused += 1,
        }
        // The key grammar on its own, on the header's key bytes as text.
        let text = String::from_utf8_lossy(&h[36..])
            .trim_end_matches([' ', '\0'])
            .to_string();
        let parsed = catch_unwind(|| ChunkKey::parse(&text).map(|k| k.to_string()));
        match parsed {
            Err(_) => return Err(format!("case {case}: key parse panicked on {text:?}")),
            Ok(Ok(s)) if s != text => {
                return Err(format!("case {case}: key {text:?} prints back as {s:?}"))
            }
            Ok(_) => {}
        }
    }
    Ok((ok, refused))
}

fn frames(rng: &mut Rng) -> Result<u64, String> {
    let key = DataKey::new(zeroize::Zeroizing::new([7u8; 32]));
    let at = Binding {
        contract: "acme",
        epoch: 3,
        model: "/models/tiny",
        chunk_key: "/models/tiny@1@0@ab@bfloat16",
    };
    let chunk: Vec<u8> = (0..512).map(|i| i as u8).collect();
    let sealed = seal(&key, &at, &chunk);
    let mut refused = 0;
    for case in 0..FRAME_CASES {
        let mut f = sealed.clone();
        match rng.below(4) {
            0 => {
                let i = rng.below(f.len());
                f[i] ^= 1 << rng.below(8);
            }
            1 => f.truncate(rng.below(f.len())),
            2 => f.insert(rng.below(f.len() + 1), rng.next() as u8),
            _ => {
                let i = rng.below(f.len());
                f[i] = f[i].wrapping_add(1 + rng.below(255) as u8);
            }
        }
        match catch_unwind(|| open(&key, &at, &f).is_ok()) {
            Err(_) => return Err(format!("frame case {case}: open panicked")),
            Ok(true) => return Err(format!("frame case {case}: a changed frame opened")),
            Ok(false) => refused += 1,
        }
    }
    Ok(refused)
}

fn header_for(command: Command, key: &ChunkKey, length: u32) -> [u8; CLIENT_HEADER_LEN] {
    Request {
        command,
        length,
        meta: ChunkMeta {
            fmt: 1,
            dtype: 3,
            shape: [2, 2, 16, 8],
        },
        location: 0,
        key: key.clone(),
    }
    .encode()
}

async fn health(addr: std::net::SocketAddr, key: &ChunkKey) -> Result<(), String> {
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    s.write_all(&header_for(Command::Health, key, 0))
        .await
        .map_err(|e| e.to_string())?;
    let mut r = [0u8; SERVER_HEADER_LEN];
    s.read_exact(&mut r)
        .await
        .map_err(|e| format!("HEALTH: {e}"))?;
    match Reply::decode(&r).code {
        200 => Ok(()),
        c => Err(format!("HEALTH answered {c}")),
    }
}

/// Reads a GET's answer: the bytes on a hit.
async fn get(s: &mut TcpStream, key: &ChunkKey) -> std::io::Result<Option<Vec<u8>>> {
    s.write_all(&header_for(Command::Get, key, 0)).await?;
    let mut r = [0u8; SERVER_HEADER_LEN];
    s.read_exact(&mut r).await?;
    let r = Reply::decode(&r);
    if r.code != 200 {
        return Ok(None);
    }
    let mut data = vec![0u8; r.length as usize];
    s.read_exact(&mut data).await?;
    Ok(Some(data))
}

/// Returns (connections, whole PUTs, cut PUTs).
async fn framing(rng: &mut Rng) -> Result<(u64, u64, u64), String> {
    let store = Store::new(64 << 20, MAX_CHUNK, Scopes::open(), AuditLog::disabled());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(kvgate_store::serve(l, store));
    let probe = ChunkKey::parse("m@1@0@0@bfloat16").unwrap();
    // What each key must read as: Some(bytes) stored whole, None never stored.
    let mut expected: HashMap<String, Option<Vec<u8>>> = HashMap::new();
    let (mut whole, mut cut) = (0, 0);
    for conn in 0..CONNECTIONS {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        for _ in 0..=rng.below(6) {
            let key = ChunkKey::parse(&format!("m@1@0@{:x}@bfloat16", rng.next() >> 1)).unwrap();
            let name = key.to_string();
            let len = 1 + rng.below(4096);
            let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Writes may fail once the store has closed the connection.
            let sent = match rng.below(8) {
                0 | 1 => {
                    let mut msg = header_for(Command::Put, &key, len as u32).to_vec();
                    msg.extend_from_slice(&data);
                    let r = s.write_all(&msg).await;
                    if r.is_ok() {
                        expected.insert(name, Some(data));
                        whole += 1;
                    }
                    r
                }
                2 => {
                    // Cut off mid-payload: the connection ends here.
                    let mut msg = header_for(Command::Put, &key, len as u32).to_vec();
                    msg.extend_from_slice(&data[..rng.below(len)]);
                    let _ = s.write_all(&msg).await;
                    expected.insert(name, None);
                    cut += 1;
                    break;
                }
                3 => {
                    let mut h = header_for(
                        Command::Put,
                        &key,
                        MAX_CHUNK + 1 + rng.below(1 << 20) as u32,
                    );
                    if rng.below(2) == 0 {
                        h[..4].copy_from_slice(&(rng.next() as i32).to_le_bytes());
                    }
                    let _ = s.write_all(&h).await;
                    expected.insert(name, None);
                    break;
                }
                4 => {
                    let garbage: Vec<u8> =
                        (0..1 + rng.below(400)).map(|_| rng.next() as u8).collect();
                    let _ = s.write_all(&garbage).await;
                    break;
                }
                5 => match get(&mut s, &key).await {
                    Ok(None) => Ok(()),
                    Ok(Some(_)) => return Err(format!("connection {conn}: a fresh key hit")),
                    Err(e) => Err(e),
                },
                _ => {
                    let mut r = [0u8; SERVER_HEADER_LEN];
                    match s.write_all(&header_for(Command::Health, &probe, 0)).await {
                        Ok(()) => s.read_exact(&mut r).await.map(|_| ()),
                        Err(e) => Err(e),
                    }
                }
            };
            if sent.is_err() {
                break;
            }
        }
        drop(s);
        health(addr, &probe)
            .await
            .map_err(|e| format!("after connection {conn}: {e}"))?;
    }
    // A PUT is taken before a later request on its connection, but a
    // connection's last PUT may still be in flight: a HEALTH round trip on
    // each connection was not awaited, so wait for the store to settle.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    for (name, want) in &expected {
        let key = ChunkKey::parse(name).unwrap();
        let got = get(&mut s, &key)
            .await
            .map_err(|e| format!("GET {name}: {e}"))?;
        if &got != want {
            return Err(format!(
                "{name}: stored {:?} bytes, expected {:?}",
                got.map(|g| g.len()),
                want.as_ref().map(|w| w.len())
            ));
        }
    }
    Ok((CONNECTIONS, whole, cut))
}

fn main() -> ExitCode {
    let started = std::time::Instant::now();
    let mut rng = Rng(StdRng::seed_from_u64(0x6c6d_2f2f_6675_7a7a));
    let result = headers(&mut rng).and_then(|(ok, refused)| {
        let sealed = frames(&mut rng)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (conns, whole, cut) = rt.block_on(framing(&mut rng))?;
        Ok(format!(
            "fuzz_lm: {HEADER_CASES} header cases ({ok} decoded, {refused} refused), {FRAME_CASES} changed frames (\
             {sealed} refused, 0 opened), {conns} connections ({whole} whole PUTs read back, {cut} cut PUTs never \
             stored), 0 panics, {:.0?}",
            started.elapsed()
        ))
    });
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fuzz_lm: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
