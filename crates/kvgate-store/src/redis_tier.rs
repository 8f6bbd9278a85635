//! The Redis/Valkey tier: the shared tier several stores (or one store's
//! restarts) read and write, on one server or a Redis Cluster, so a fleet
//! that outgrows one store scales out on Redis rather than on us.
//!
//! Every value is a sealed frame (`sealed.rs`); every name is keyed (HKDF of
//! the contract's key), so Redis holds no contract, model, prompt hash or
//! salt in clear. A contract `c` has, under its keyed namespace `ns`:
//! - `kvgate:ns:<keyed chunk id>`: one chunk's frame;
//! - `kvgate:ns:index`: the set of its chunk ids, which a shred walks (a
//!   cluster spreads the chunks over its slots; SCAN would have to visit
//!   every node);
//! - `kvgate:ns:salts`: a hash, epoch -> 32 random bytes. The tier key is
//!   HKDF of the data key and that salt: a shred deletes the hash first, so
//!   a copy of a frame taken before (a replica, an RDB file) opens for no
//!   one, key material or not. Stores sharing the server agree on a salt
//!   through `HSETNX`; a new epoch deletes the older epochs' salts.
//!
//! Names spread over the cluster's slots by their whole key (no hash tags),
//! and each command is sent on its own (a pipeline may not cross slots).
//! `max_bytes` bounds what this store has written since it started, oldest
//! first out (`DEL`); several stores on one server are bounded together by
//! Redis's own `maxmemory` (`allkeys-lru`). A command that fails (server
//! down, timeout) is counted in `errors` and is a miss or a chunk not
//! written, never an error to the client; for a second after one the tier
//! is skipped, so a server that is down stalls no request for long.

use std::time::Duration;

use kvgate_auth::Contract;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use rand::RngCore;
use redis::ConnectionLike;

use crate::config::{RedisConfig, WritePolicy};
use crate::crypto::DataKey;
use crate::disk::Evicted;
use crate::ledger::Ledger;
use crate::memory::TierStats;
use crate::protocol::ChunkMeta;
use crate::sealed::{open_chunk, seal_chunk, Loaded, Place};
use crate::shred_keys::{salted_key, REDIS_KEY_INFO};

/// How long a connection or a reply may take before the tier counts a miss.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections kept open to the server (or, in cluster mode, to each node).
const POOL_SIZE: u32 = 16;
/// After a failure the tier is skipped this long: a server that is down
/// costs one timeout a second, not one per request.
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RedisTierError {
    /// Redis's error; it names commands and nodes, never values or keys'
    /// plaintext (every key is keyed already).
    #[error("redis tier: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis tier: no connection: {0}")]
    Pool(#[from] r2d2::Error),
    #[error("redis tier: skipped after a failure less than {RETRY_AFTER:?} ago")]
    Down,
}

enum Pool {
    Single(r2d2::Pool<redis::Client>),
    Cluster(r2d2::Pool<redis::cluster::ClusterClient>),
}

/// Read and write timeouts on each new single-server connection.
#[derive(Debug)]
struct Timeouts;

impl r2d2::CustomizeConnection<redis::Connection, redis::RedisError> for Timeouts {
    fn on_acquire(&self, conn: &mut redis::Connection) -> Result<(), redis::RedisError> {
        conn.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        conn.set_write_timeout(Some(COMMAND_TIMEOUT))
    }
}

pub struct RedisTier {
    pool: Pool,
    max_bytes: u64,
    /// When chunks reach this tier (`redis.write`).
    pub write: WritePolicy,
    /// What this store has written there, by key name.
    written: Mutex<Ledger<String>>,
    pub stats: TierStats,
    /// Frames that did not open (tampered, another epoch's).
    pub integrity_failures: Counter,
    /// Commands that failed (server down, timeout, cluster moving), and
    /// those skipped after one.
    pub errors: Counter,
    /// Set by a failure: until then the tier is not asked.
    down_until: Mutex<Option<std::time::Instant>>,
}

fn pool_builder<M: r2d2::ManageConnection>() -> r2d2::Builder<M> {
    r2d2::Pool::builder()
        .max_size(POOL_SIZE)
        .min_idle(Some(0))
        .connection_timeout(COMMAND_TIMEOUT)
}

fn namespace(c: &Contract) -> String {
    format!("kvgate:{}", c.keyed_id(b"kvgate redis namespace"))
}

impl RedisTier {
    /// Connects lazily: the pool opens connections as they are needed, so a
    /// store starts (memory and disk serving) while Redis is still coming up.
    pub fn open(cfg: &RedisConfig) -> Result<Self, RedisTierError> {
        let pool = if cfg.cluster.is_empty() {
            let client = redis::Client::open(cfg.url.as_deref().unwrap_or_default())?;
            Pool::Single(
                pool_builder()
                    .connection_customizer(Box::new(Timeouts))
                    .build_unchecked(client),
            )
        } else {
            let client =
                redis::cluster::ClusterClient::builder(cfg.cluster.iter().map(String::as_str))
                    .connection_timeout(COMMAND_TIMEOUT)
                    .response_timeout(COMMAND_TIMEOUT)
                    .build()?;
            Pool::Cluster(pool_builder().build_unchecked(client))
        };
        Ok(Self {
            pool,
            max_bytes: cfg.max_bytes,
            write: cfg.write,
            written: Mutex::new(Ledger::new()),
            stats: TierStats::default(),
            integrity_failures: Counter::default(),
            errors: Counter::default(),
            down_until: Mutex::new(None),
        })
    }

    /// Runs one command (or a few, for one key each) on a pooled connection.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut dyn ConnectionLike) -> redis::RedisResult<T>,
    ) -> Result<T, RedisTierError> {
        let now = std::time::Instant::now();
        if self.down_until.lock().is_some_and(|t| now < t) {
            self.errors.inc();
            return Err(RedisTierError::Down);
        }
        let out = match &self.pool {
            Pool::Single(p) => p
                .get()
                .map_err(RedisTierError::from)
                .and_then(|mut c| Ok(f(&mut *c)?)),
            Pool::Cluster(p) => p
                .get()
                .map_err(RedisTierError::from)
                .and_then(|mut c| Ok(f(&mut *c)?)),
        };
        if out.is_err() {
            self.errors.inc();
            *self.down_until.lock() = Some(std::time::Instant::now() + RETRY_AFTER);
        }
        out
    }

    /// Whether the server answers (a PING through the pool).
    pub fn ping(&self) -> bool {
        self.with(|c| redis::cmd("PING").query::<String>(c)).is_ok()
    }

    /// Bytes this store has written and not evicted.
    pub fn bytes(&self) -> u64 {
        self.written.lock().bytes()
    }

    /// Chunks this store has written and not evicted.
    pub fn len(&self) -> usize {
        self.written.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn name(c: &Contract, slot: &str) -> String {
        format!("{}:{}", namespace(c), c.keyed_id(slot.as_bytes()))
    }

    /// The key `c`'s chunks are sealed under at `epoch` (its salt made, as
    /// every store sharing the server will read it, if `create`).
    fn key(
        &self,
        c: &Contract,
        epoch: u64,
        create: bool,
    ) -> Result<Option<DataKey>, RedisTierError> {
        let salts = format!("{}:salts", namespace(c));
        let field = epoch.to_string();
        let get = |conn: &mut dyn ConnectionLike| {
            redis::cmd("HGET")
                .arg(&salts)
                .arg(&field)
                .query::<Option<Vec<u8>>>(conn)
        };
        let mut salt = self.with(get)?;
        if salt.is_none() && create {
            let mut fresh = zeroize::Zeroizing::new([0u8; 32]);
            rand::rng().fill_bytes(fresh.as_mut_slice());
            let made: bool = self.with(|conn| {
                redis::cmd("HSETNX")
                    .arg(&salts)
                    .arg(&field)
                    .arg(fresh.as_slice())
                    .query(conn)
            })?;
            if made {
                self.forget_older_epochs(&salts, epoch);
            }
            // Whoever won the race, every store now reads the same salt.
            salt = self.with(get)?;
        }
        let Some(salt) = salt.map(zeroize::Zeroizing::new) else {
            return Ok(None);
        };
        let Ok(salt) = <[u8; 32]>::try_from(salt.as_slice()) else {
            // Not a salt of ours: nothing sealed under it can be trusted.
            return Ok(None);
        };
        let salt = zeroize::Zeroizing::new(salt);
        Ok(Some(salted_key(&c.data_key(epoch), &salt, REDIS_KEY_INFO)))
    }

    /// Epochs only move forward: an older epoch's chunks can never be read
    /// again, so their salts go.
    fn forget_older_epochs(&self, salts: &str, epoch: u64) {
        let older: Vec<String> = self
            .with(|c| redis::cmd("HKEYS").arg(salts).query::<Vec<String>>(c))
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.parse::<u64>().is_ok_and(|e| e < epoch))
            .collect();
        if !older.is_empty() {
            let _ = self.with(|c| redis::cmd("HDEL").arg(salts).arg(&older).query::<i64>(c));
        }
    }

    /// Seals and writes a chunk of contract `c` (`slot`: its physical key in
    /// the tiers). Returns what was evicted to make room.
    pub fn put(
        &self,
        c: &Contract,
        model: &str,
        slot: &str,
        meta: ChunkMeta,
        data: &[u8],
    ) -> Result<Vec<Evicted>, RedisTierError> {
        let epoch = c.epoch();
        let Some(key) = self.key(c, epoch, true)? else {
            return Ok(Vec::new());
        };
        let at = Place::new(c, epoch, model, slot);
        let frame = seal_chunk(&key, &at, meta, data);
        let name = Self::name(c, slot);
        let index = format!("{}:index", namespace(c));
        self.with(|conn| {
            redis::cmd("SET").arg(&name).arg(&frame).query::<()>(conn)?;
            redis::cmd("SADD").arg(&index).arg(&name).query::<i64>(conn)
        })?;
        self.written.lock().insert(name, c.id(), frame.len() as u64);
        Ok(self.evict_to_fit())
    }

    fn evict_to_fit(&self) -> Vec<Evicted> {
        let over = self.written.lock().over(self.max_bytes);
        over.into_iter()
            .map(|(name, e)| {
                let index = name.rsplit_once(':').map(|(ns, _)| format!("{ns}:index"));
                let _ = self.with(|c| {
                    redis::cmd("DEL").arg(&name).query::<i64>(c)?;
                    match &index {
                        Some(i) => redis::cmd("SREM").arg(i).arg(&name).query::<i64>(c),
                        None => Ok(0),
                    }
                });
                self.stats.evictions.inc();
                Evicted {
                    contract: e.contract,
                    name: name.rsplit(':').next().unwrap_or_default().to_string(),
                    bytes: e.bytes,
                }
            })
            .collect()
    }

    /// Whether this store knows the chunk is in Redis (written by it and not
    /// evicted since): no round trip.
    pub fn knows(&self, c: &Contract, slot: &str) -> bool {
        self.written.lock().contains(&Self::name(c, slot))
    }

    /// Whether the chunk is in Redis, whoever wrote it (not opened).
    pub fn contains(&self, c: &Contract, slot: &str) -> bool {
        let name = Self::name(c, slot);
        self.with(|conn| redis::cmd("EXISTS").arg(&name).query::<bool>(conn))
            .unwrap_or(false)
    }

    /// Reads and opens a chunk (written by any store). A frame that does not
    /// open is deleted and counted: a miss, never data.
    pub fn get(&self, c: &Contract, model: &str, slot: &str) -> Option<Loaded> {
        let name = Self::name(c, slot);
        let miss = || {
            self.stats.misses.inc();
            None
        };
        // One read of the epoch: a suspension between two would make a good
        // frame look tampered (and delete it).
        let epoch = c.epoch();
        let Ok(Some(key)) = self.key(c, epoch, false) else {
            // Shredded, an epoch never written, or the server away.
            return miss();
        };
        let frame =
            match self.with(|conn| redis::cmd("GET").arg(&name).query::<Option<Vec<u8>>>(conn)) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    self.forget(&name);
                    return miss();
                }
                Err(_) => return miss(),
            };
        let at = Place::new(c, epoch, model, slot);
        match open_chunk(&key, &at, frame) {
            Some(loaded) => {
                self.written.lock().touch(&name);
                self.stats.hits.inc();
                Some(loaded)
            }
            None => {
                self.integrity_failures.inc();
                let _ = self.with(|conn| redis::cmd("DEL").arg(&name).query::<i64>(conn));
                self.forget(&name);
                miss()
            }
        }
    }

    fn forget(&self, name: &str) {
        self.written.lock().remove(&name.to_string());
    }

    /// Removes every chunk of contract `c`, whichever store wrote it:
    /// (chunks, bytes this store had written). Its salts go first.
    pub fn shred(&self, c: &Contract) -> Result<(usize, u64), RedisTierError> {
        let ns = namespace(c);
        let (salts, index) = (format!("{ns}:salts"), format!("{ns}:index"));
        self.with(|conn| redis::cmd("DEL").arg(&salts).query::<i64>(conn))?;
        let names: Vec<String> =
            self.with(|conn| redis::cmd("SMEMBERS").arg(&index).query(conn))?;
        let mut chunks = 0;
        for n in &names {
            chunks += self.with(|conn| redis::cmd("DEL").arg(n).query::<usize>(conn))?;
        }
        self.with(|conn| redis::cmd("DEL").arg(&index).query::<i64>(conn))?;
        let mine = self.written.lock().take_contract(c.id());
        Ok((chunks, mine.iter().map(|(_, e)| e.bytes).sum()))
    }
}
