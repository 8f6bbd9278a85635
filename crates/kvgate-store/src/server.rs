//! The `lm://` listener. One task per connection (LMCache keeps one open per
//! worker and sends requests back to back). A header that does not decode
//! closes the connection, since nothing tells where the next one would
//! start; so does a PUT larger than `max_chunk_bytes`, refused before any
//! allocation.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use zeroize::Zeroizing;

use crate::memory::{Chunk, MemoryTier};
use crate::protocol::{Command, ProtocolError, Reply, Request, CLIENT_HEADER_LEN};
use crate::scope::{Owner, Scopes};
use crate::tiers::Tier;
use kvgate_auth::audit::{kind, AuditLog, AuditRecord};

fn command_name(c: Command) -> &'static str {
    match c {
        Command::Put => "put",
        Command::Get => "get",
        Command::Exist => "exist",
        Command::List => "list",
        Command::Health => "health",
    }
}

/// Largest chunk accepted by default: LMCache's 256-token chunk of a
/// Llama-3-8B-sized model is 32 MiB; twice that leaves room.
pub const DEFAULT_MAX_CHUNK_BYTES: u32 = 64 << 20;

/// Connections open at once, over every listener, by default; one more is
/// closed at accept (LMCache keeps one per worker, so a fleet of 64 8-GPU
/// servers needs 512).
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// How long a request may take to arrive once its first byte has (and a
/// reply to be taken) by default; idle time between requests is not
/// counted: LMCache keeps its connections open and quiet.
pub const DEFAULT_IO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Bytes each contract may hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Quotas {
    pub default: Option<u64>,
    pub overrides: std::collections::BTreeMap<String, u64>,
}

impl Quotas {
    pub fn of(&self, owner: &Owner) -> Option<u64> {
        match owner {
            Owner::Contract(c) => self.overrides.get(c).copied().or(self.default),
            Owner::Shared => None,
        }
    }
}

/// What a store may have beyond its memory tier.
#[derive(Default)]
pub struct Extras {
    pub quotas: Quotas,
    pub disk: Option<crate::disk::DiskTier>,
    /// When chunks reach the disk tier (`disk.write`).
    pub write: crate::config::WritePolicy,
    /// Sealed chunks in Redis/Valkey (`redis:`), shared by every store on it.
    pub redis: Option<crate::redis_tier::RedisTier>,
    /// Connections at once and stalled-client timeouts.
    pub limits: ConnectionLimits,
}

/// What one client may hold of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub io_timeout: std::time::Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            io_timeout: DEFAULT_IO_TIMEOUT,
        }
    }
}

pub struct Store {
    pub memory: MemoryTier,
    /// Sealed chunks on disk (`disk:`); None: memory only.
    pub disk: Option<crate::disk::DiskTier>,
    pub(crate) write: crate::config::WritePolicy,
    /// Sealed chunks in Redis/Valkey (`redis:`); None: no shared tier.
    pub redis: Option<crate::redis_tier::RedisTier>,
    pub quotas: Quotas,
    pub scopes: Scopes,
    /// Every access, eviction and shred (`kind: cache`).
    pub audit: AuditLog,
    pub max_chunk_bytes: u32,
    /// Connections closed for a bad header or an oversized chunk.
    pub protocol_errors: Counter,
    /// Requests refused for their key's scope (no tag, or a salt that is no
    /// active contract's).
    pub scope_refusals: Counter,
    /// Contracts shredded.
    pub shreds: Counter,
    /// Connections closed at accept: `max_connections` were open.
    pub connections_refused: Counter,
    /// Connections closed for a request or reply stalled past `io_timeout`.
    pub timeouts: Counter,
    connection_slots: Arc<tokio::sync::Semaphore>,
    io_timeout: std::time::Duration,
}

impl Store {
    pub fn new(
        memory_bytes: u64,
        max_chunk_bytes: u32,
        scopes: Scopes,
        audit: AuditLog,
    ) -> Arc<Self> {
        Self::with(
            memory_bytes,
            max_chunk_bytes,
            scopes,
            audit,
            Extras::default(),
        )
    }

    /// As [`Store::new`], with quotas and a disk tier.
    pub fn with(
        memory_bytes: u64,
        max_chunk_bytes: u32,
        scopes: Scopes,
        audit: AuditLog,
        extras: Extras,
    ) -> Arc<Self> {
        Arc::new(Self {
            memory: MemoryTier::new(memory_bytes),
            disk: extras.disk,
            write: extras.write,
            redis: extras.redis,
            quotas: extras.quotas,
            scopes,
            audit,
            max_chunk_bytes,
            protocol_errors: Counter::default(),
            scope_refusals: Counter::default(),
            shreds: Counter::default(),
            connections_refused: Counter::default(),
            timeouts: Counter::default(),
            connection_slots: Arc::new(tokio::sync::Semaphore::new(extras.limits.max_connections)),
            io_timeout: extras.limits.io_timeout,
        })
    }

    /// Removes every chunk of `contract` from every tier: (chunks, bytes).
    /// Its salt must also have moved (suspension) or its chunks could be
    /// written again.
    pub fn shred(&self, contract: &str) -> (usize, u64) {
        self.shreds.inc();
        let (memory_chunks, memory_bytes) =
            self.memory.shred(&Owner::Contract(contract.to_string()));
        let (lower_chunks, lower_bytes) = self.shred_lower(contract);
        let (chunks, bytes) = (memory_chunks + lower_chunks, memory_bytes + lower_bytes);
        tracing::info!(contract, chunks, bytes, "contract shredded");
        self.audit.record(
            AuditRecord::new(kind::CACHE)
                .contract(contract)
                .reason("shred")
                .detail(serde_json::json!({"chunks": chunks, "bytes": bytes})),
        );
        (chunks, bytes)
    }

    fn owner(&self, req: &Request, bound: Option<&str>) -> Option<Owner> {
        match self.scopes.owner_on(bound, &req.key) {
            Ok(o) => Some(o),
            Err(e) => {
                self.scope_refusals.inc();
                tracing::debug!(error = %e, command = ?req.command, "lm:// request refused for its scope");
                self.audit.record(
                    AuditRecord::new(kind::CACHE)
                        .status(403)
                        .reason("refused")
                        .detail(serde_json::json!({"command": command_name(req.command), "error": e.to_string()})),
                );
                None
            }
        }
    }

    /// One cache record: what happened to which chunk (by its keyed id).
    pub(crate) fn record(
        &self,
        owner: &Owner,
        key: &str,
        what: &'static str,
        bytes: usize,
        tier: Tier,
    ) {
        let rec = AuditRecord::new(kind::CACHE)
            .reason(what)
            .detail(serde_json::json!({
                "chunk": self.scopes.chunk_id(owner, key),
                "bytes": bytes,
                "tier": tier.name(),
            }));
        self.audit.record(match owner {
            Owner::Contract(c) => rec.contract(c),
            Owner::Shared => rec,
        });
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("chunk of {length} bytes is over max_chunk_bytes ({max})")]
    TooLarge { length: u32, max: u32 },
    #[error("request or reply stalled past {0:?}")]
    Stalled(std::time::Duration),
}

/// Serves `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, store: Arc<Store>) {
    serve_scoped(listener, store, None).await
}

/// Serves `listener` with every chunk owned by `bound`'s contract when set
/// (the sidecar layout, see `Scopes::owner_on`).
pub async fn serve_scoped(listener: TcpListener, store: Arc<Store>, bound: Option<String>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = store.connection_slots.clone().try_acquire_owned() else {
            store.connections_refused.inc();
            tracing::warn!(%peer, "lm:// connection refused: max_connections open");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let store = store.clone();
        let bound = bound.clone();
        tokio::spawn(async move {
            let _slot = slot;
            match connection(stream, store.clone(), bound.as_deref()).await {
                Ok(()) => {}
                Err(ConnectionError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                Err(ConnectionError::Stalled(after)) => {
                    store.timeouts.inc();
                    tracing::warn!(%peer, ?after, "lm:// connection closed: client stalled");
                }
                Err(e) => {
                    store.protocol_errors.inc();
                    tracing::warn!(%peer, error = %e, "lm:// connection closed");
                }
            }
        });
    }
}

/// Where a chunk lives in the tiers: its owner's namespace, then LMCache's
/// key, so two contracts' listeners never share an entry.
fn physical(owner: &Owner, key: &str) -> String {
    match owner {
        Owner::Contract(c) => format!("c\u{0}{c}\u{0}{key}"),
        Owner::Shared => format!("s\u{0}{key}"),
    }
}

/// Runs `f` on the store where blocking is allowed when a disk or Redis tier
/// may be touched (file reads, fsyncs and Redis round trips must not stall
/// the runtime's workers); inline otherwise, where it is memory only. The connection waits for it
/// either way, so its requests stay in order.
async fn on_store<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> T + Send + 'static,
) -> Result<T, ConnectionError> {
    if store.disk.is_none() && store.redis.is_none() {
        return Ok(f(store));
    }
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| ConnectionError::Io(std::io::Error::other(e.to_string())))
}

/// `io` within `limit`, or the connection is stalled.
async fn within<T>(
    limit: std::time::Duration,
    io: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, ConnectionError> {
    match tokio::time::timeout(limit, io).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ConnectionError::Stalled(limit)),
    }
}

async fn connection(
    stream: TcpStream,
    store: Arc<Store>,
    bound: Option<&str>,
) -> Result<(), ConnectionError> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut header = [0u8; CLIENT_HEADER_LEN];
    loop {
        // Idle between requests for as long as the client likes; once a
        // request has begun, the rest must come within the timeout.
        match read.read(&mut header[..1]).await {
            // The client hung up between requests.
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        let t = store.io_timeout;
        within(t, read.read_exact(&mut header[1..])).await?;
        let req = Request::decode(&header)?;
        let key = req.key.to_string();
        let owner = store.owner(&req, bound);
        let slot = owner.as_ref().map(|o| physical(o, &key));
        match (req.command, owner) {
            (Command::Put, owner) => {
                if req.length > store.max_chunk_bytes {
                    return Err(ConnectionError::TooLarge {
                        length: req.length,
                        max: store.max_chunk_bytes,
                    });
                }
                let Some(owner) = owner else {
                    // Refused, but the payload is read off so the next
                    // header is where the client put it.
                    let mut payload = (&mut read).take(u64::from(req.length));
                    within(t, tokio::io::copy(&mut payload, &mut tokio::io::sink())).await?;
                    continue;
                };
                let mut data = Zeroizing::new(vec![0u8; req.length as usize]);
                within(t, read.read_exact(&mut data)).await?;
                let slot = physical(&owner, &key);
                let chunk = Arc::new(Chunk {
                    owner,
                    meta: req.meta,
                    data,
                });
                on_store(&store, move |st| st.put_chunk(slot, chunk)).await?;
            }
            (Command::Get, Some(owner)) => {
                let found = match slot.clone() {
                    Some(s) => {
                        let o = owner.clone();
                        on_store(&store, move |st| st.get_chunk(&o, &s)).await?
                    }
                    None => None,
                };
                match found {
                    Some((chunk, tier)) => {
                        let length = u32::try_from(chunk.data.len()).unwrap_or(u32::MAX);
                        // The client reads the header with one recv(36).
                        within(t, write.write_all(&Reply::hit(length, chunk.meta).encode()))
                            .await?;
                        within(t, write.write_all(&chunk.data)).await?;
                        store.record(&owner, &key, "get_hit", chunk.data.len(), tier);
                    }
                    None => {
                        within(t, write.write_all(&Reply::FAIL.encode())).await?;
                        store.record(&owner, &key, "get_miss", 0, Tier::Memory);
                    }
                }
            }
            (Command::Exist, Some(owner)) => {
                let hit = match slot.clone() {
                    // Memory and disk answer from their indexes; Redis is
                    // asked, off the runtime's workers.
                    Some(s) if store.redis.is_some() => {
                        let o = owner.clone();
                        on_store(&store, move |st| st.contains_chunk(&o, &s)).await?
                    }
                    Some(s) => store.contains_chunk(&owner, &s),
                    None => false,
                };
                let reply = if hit { Reply::OK } else { Reply::FAIL };
                within(t, write.write_all(&reply.encode())).await?;
                let what = if hit { "exist_hit" } else { "exist_miss" };
                store.record(&owner, &key, what, 0, Tier::Memory);
            }
            (Command::Get | Command::Exist, None) => {
                within(t, write.write_all(&Reply::FAIL.encode())).await?
            }
            (Command::Health, _) => within(t, write.write_all(&Reply::OK.encode())).await?,
            // Listing keys would show other tenants' tags: not answered
            // (LMCache's own server sends no header for it either).
            (Command::List, _) => {}
        }
    }
}
