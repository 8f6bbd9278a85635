//! `kvgate bench store`'s load and its limit: `lm://` PUT and GET throughput
//! over N connections as LMCache's connector sends them (PUTs back to back
//! with no reply, then one GET per chunk), against any server that speaks
//! the protocol; and a loopback "copy" server that stores nothing (a GET is
//! answered from one zeroed buffer), the physical limit of the socket path
//! on this machine.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvgate_store::protocol::{CLIENT_HEADER_LEN, SERVER_HEADER_LEN, SUCCESS};
use kvgate_store::{ChunkKey, ChunkMeta, Command, Reply, Request};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum StoreBenchError {
    #[error("store bench: {0}")]
    Io(#[from] std::io::Error),
    #[error("store bench: a GET of a chunk just stored missed (code {0})")]
    Miss(i32),
    #[error("store bench: a GET returned {got} bytes, {want} were stored")]
    Length { got: u32, want: u32 },
    #[error("store bench: a chunk came back changed")]
    Changed,
    #[error("store bench: {0}")]
    Task(String),
}

/// One phase's throughput.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub chunks: usize,
    pub bytes: u64,
    pub seconds: f64,
    pub mib_s: f64,
}

impl Throughput {
    fn of(chunks: usize, bytes: u64, elapsed: Duration) -> Self {
        let seconds = elapsed.as_secs_f64().max(1e-9);
        Self {
            chunks,
            bytes,
            seconds,
            mib_s: bytes as f64 / seconds / (1 << 20) as f64,
        }
    }
}

/// What one measurement writes and reads back.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub chunk_bytes: u32,
    pub connections: usize,
    pub chunks_per_connection: usize,
    /// Distinguishes one measurement's keys from another's on one server.
    pub run: u64,
}

impl Shape {
    /// About `total` bytes over `connections`, at least one chunk each.
    pub fn new(chunk_bytes: u32, connections: usize, total: u64, run: u64) -> Self {
        let per = total / (u64::from(chunk_bytes) * connections.max(1) as u64);
        Self {
            chunk_bytes,
            connections: connections.max(1),
            chunks_per_connection: per.max(1) as usize,
            run,
        }
    }

    fn key(&self, conn: usize, i: usize) -> Result<ChunkKey, StoreBenchError> {
        let hash = (self.run << 40) | ((conn as u64) << 24) | i as u64;
        ChunkKey::parse(&format!("/models/bench@1@0@{hash:x}@bfloat16"))
            .map_err(|e| StoreBenchError::Task(e.to_string()))
    }

    pub fn bytes(&self) -> u64 {
        u64::from(self.chunk_bytes) * (self.connections * self.chunks_per_connection) as u64
    }
}

/// The meta LMCache sends with a chunk of `bytes` (bf16 KV, 2 layers).
fn meta(bytes: u32) -> ChunkMeta {
    ChunkMeta {
        fmt: 1,
        dtype: 3,
        shape: [2, 2, i32::try_from(bytes / 512).unwrap_or(i32::MAX), 64],
    }
}

/// A chunk's bytes: distinct per chunk, so a mixed-up reply is seen.
fn payload(bytes: u32, seed: u64) -> Vec<u8> {
    (0..bytes)
        .map(|i| (u64::from(i).wrapping_mul(2654435761) ^ seed) as u8)
        .collect()
}

fn header(
    command: Command,
    key: ChunkKey,
    length: u32,
    meta: ChunkMeta,
) -> [u8; CLIENT_HEADER_LEN] {
    Request {
        command,
        length,
        meta,
        location: 0,
        key,
    }
    .encode()
}

async fn reply(s: &mut TcpStream) -> Result<Reply, StoreBenchError> {
    let mut h = [0u8; SERVER_HEADER_LEN];
    s.read_exact(&mut h).await?;
    Ok(Reply::decode(&h))
}

/// Opens the shape's connections.
pub async fn connect(addr: SocketAddr, shape: &Shape) -> Result<Vec<TcpStream>, StoreBenchError> {
    let mut out = Vec::with_capacity(shape.connections);
    for _ in 0..shape.connections {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        out.push(s);
    }
    Ok(out)
}

/// Every connection PUTs its chunks back to back; done when each has had
/// an EXIST of its last chunk answered (the server takes a connection's
/// requests in order). Returns the connections for the GET phase.
pub async fn put_phase(
    conns: Vec<TcpStream>,
    shape: Shape,
) -> Result<(Vec<TcpStream>, Throughput), StoreBenchError> {
    let data = Arc::new(payload(shape.chunk_bytes, shape.run));
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(c, mut s)| {
            let data = data.clone();
            tokio::spawn(async move {
                let m = meta(shape.chunk_bytes);
                for i in 0..shape.chunks_per_connection {
                    s.write_all(&header(
                        Command::Put,
                        shape.key(c, i)?,
                        shape.chunk_bytes,
                        m,
                    ))
                    .await?;
                    s.write_all(&data).await?;
                }
                let last = shape.key(c, shape.chunks_per_connection - 1)?;
                s.write_all(&header(Command::Exist, last, 0, ChunkMeta::EMPTY))
                    .await?;
                match reply(&mut s).await? {
                    r if r.code == SUCCESS => Ok(s),
                    r => Err(StoreBenchError::Miss(r.code)),
                }
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(
            t.await
                .map_err(|e| StoreBenchError::Task(e.to_string()))??,
        );
    }
    let chunks = shape.connections * shape.chunks_per_connection;
    Ok((out, Throughput::of(chunks, shape.bytes(), start.elapsed())))
}

/// Every connection GETs its chunks one by one, reading each whole. With
/// `verify`, each connection's first chunk is compared byte for byte and
/// every length checked.
pub async fn get_phase(
    conns: Vec<TcpStream>,
    shape: Shape,
    verify: bool,
) -> Result<Throughput, StoreBenchError> {
    let want = Arc::new(payload(shape.chunk_bytes, shape.run));
    // Each connection's buffer, written once before the clock starts: a
    // fresh allocation's first touch faults its pages in, which on this VM
    // costs more than the copy and is no part of the server's speed.
    let bufs: Vec<Vec<u8>> = (0..conns.len())
        .map(|_| vec![1u8; shape.chunk_bytes as usize])
        .collect();
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .zip(bufs)
        .enumerate()
        .map(|(c, (mut s, mut buf))| {
            let want = want.clone();
            tokio::spawn(async move {
                for i in 0..shape.chunks_per_connection {
                    s.write_all(&header(Command::Get, shape.key(c, i)?, 0, ChunkMeta::EMPTY))
                        .await?;
                    let r = reply(&mut s).await?;
                    if r.code != SUCCESS {
                        return Err(StoreBenchError::Miss(r.code));
                    }
                    if r.length != shape.chunk_bytes {
                        return Err(StoreBenchError::Length {
                            got: r.length,
                            want: shape.chunk_bytes,
                        });
                    }
                    s.read_exact(&mut buf).await?;
                    if verify && i == 0 && buf != *want {
                        return Err(StoreBenchError::Changed);
                    }
                }
                Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await
            .map_err(|e| StoreBenchError::Task(e.to_string()))??;
    }
    let chunks = shape.connections * shape.chunks_per_connection;
    Ok(Throughput::of(chunks, shape.bytes(), start.elapsed()))
}

/// Whether an `lm://` server answers (an EXIST of a chunk nobody stored).
pub async fn answers(addr: SocketAddr) -> bool {
    let probe = async {
        let mut s = TcpStream::connect(addr).await?;
        let key = ChunkKey::parse("/models/bench@1@0@0@bfloat16")
            .map_err(|e| StoreBenchError::Task(e.to_string()))?;
        s.write_all(&header(Command::Exist, key, 0, ChunkMeta::EMPTY))
            .await?;
        reply(&mut s).await
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Ok(_))
    )
}

/// The loopback limit: an `lm://` server on its own threads that reads
/// every PUT's payload into one buffer and answers every GET from one
/// zeroed buffer of the stored length. Serves on `addr` until the process
/// exits (the bench runs it in a process of its own, as every server).
pub fn spawn_loopback(addr: SocketAddr) -> Result<SocketAddr, StoreBenchError> {
    let listener = std::net::TcpListener::bind(addr)?;
    let addr = listener.local_addr()?;
    let lengths: Arc<parking_lot::Mutex<HashMap<String, (u32, ChunkMeta)>>> = Arc::default();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let lengths = lengths.clone();
            std::thread::spawn(move || {
                let _ = loopback_connection(stream, &lengths);
            });
        }
    });
    Ok(addr)
}

fn loopback_connection(
    mut s: std::net::TcpStream,
    lengths: &parking_lot::Mutex<HashMap<String, (u32, ChunkMeta)>>,
) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut h = [0u8; CLIENT_HEADER_LEN];
    let mut buf: Vec<u8> = Vec::new();
    loop {
        s.read_exact(&mut h)?;
        let req = Request::decode(&h).map_err(|e| std::io::Error::other(e.to_string()))?;
        match req.command {
            Command::Put => {
                buf.resize(req.length as usize, 0);
                s.read_exact(&mut buf)?;
                lengths
                    .lock()
                    .insert(req.key.to_string(), (req.length, req.meta));
            }
            Command::Get => match lengths.lock().get(&req.key.to_string()).copied() {
                Some((len, meta)) => {
                    buf.resize(len as usize, 0);
                    s.write_all(&Reply::hit(len, meta).encode())?;
                    s.write_all(&buf)?;
                }
                None => s.write_all(&Reply::FAIL.encode())?,
            },
            Command::Exist | Command::Health => s.write_all(&Reply::OK.encode())?,
            Command::List => {}
        }
    }
}

/// A process's peak resident set (VmHWM), bytes; None where /proc has none.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
