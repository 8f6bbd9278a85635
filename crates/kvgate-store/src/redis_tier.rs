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
//! `max_bytes` bounds what this store accounts for there, oldest first out
//! (`DEL`): what it writes, and what it found at start (`redis_rebuild.rs`:
//! every chunk of its contracts already there, ordered by Redis's own idle
//! time, older than anything written since), so the bound and the order hold
//! across a restart and a previous run's chunks are served. Several stores on
//! one server are bounded together by Redis's own `maxmemory`
//! (`allkeys-lru`). A command that fails (server down, timeout) is counted
//! in `errors` and is a miss or a chunk not written, never an error to the
//! client; for a second after one the tier is skipped, so a server that is
//! down stalls no request for long. `rediss://` is TLS (`redis_client.rs`);
//! a server that refuses this store at start (a certificate that does not
//! verify, wrong credentials) stops the store from starting, one that is not
//! up yet does not (the rebuild then runs at the first write it answers).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvgate_auth::{Contract, ContractRegistry};
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
use crate::redis_client::{not_up_yet, Clients, Pool};
use crate::sealed::{open_chunk, seal_chunk, Loaded, Place};
use crate::shred_keys::{salted_key, REDIS_KEY_INFO};

/// After a failure the tier is skipped this long: a server that is down
/// costs one timeout a second, not one per request.
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RedisTierError {
    /// Redis's error; it names commands and nodes, never values or keys'
    /// plaintext (every key is keyed already) or the URL's password.
    #[error("redis tier: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis tier: no connection: {0}")]
    Pool(#[from] r2d2::Error),
    #[error("redis tier: skipped after a failure less than {RETRY_AFTER:?} ago")]
    Down,
    #[error("redis tier: reading redis.tls.{what} {}: {source}", path.display())]
    TlsFile {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// At start: the server answered, and TLS or the credentials failed
    /// (every retry would fail alike).
    #[error("redis tier: cannot use the server: {0} (a TLS or credentials failure at start: check the URL, redis.tls's ca_file, cert_file and key_file, and the password)")]
    Refused(redis::RedisError),
}

pub struct RedisTier {
    clients: Clients,
    pool: Pool,
    max_bytes: u64,
    /// When chunks reach this tier (`redis.write`).
    pub write: WritePolicy,
    /// What this store accounts for there, by key name.
    written: Mutex<Ledger<String>>,
    /// Keyed namespace -> contract, for the rebuild.
    namespaces: HashMap<String, String>,
    /// Whether the chunks there at start are accounted for yet.
    rebuilt: AtomicBool,
    /// One rebuild at a time; after one fails for a server that is down,
    /// none before this instant.
    rebuild_after: Mutex<Option<Instant>>,
    pub stats: TierStats,
    /// Frames that did not open (tampered, another epoch's).
    pub integrity_failures: Counter,
    /// Commands that failed (server down, timeout, cluster moving), and
    /// those skipped after one.
    pub errors: Counter,
    /// Set by a failure: until then the tier is not asked.
    down_until: Mutex<Option<Instant>>,
}

fn namespace(c: &Contract) -> String {
    format!("kvgate:{}", c.keyed_id(b"kvgate redis namespace"))
}

impl RedisTier {
    /// Checks the server (a refusal is an error; a server not up yet is
    /// not) and accounts for the chunks of `registry`'s contracts already
    /// there. The pool connects as it is used, so a store starts (memory
    /// and disk serving) while Redis is still coming up.
    pub fn open(cfg: &RedisConfig, registry: &ContractRegistry) -> Result<Self, RedisTierError> {
        let clients = crate::redis_client::clients(cfg)?;
        let up = clients.check()?;
        let tier = Self {
            pool: clients.pool(),
            clients,
            max_bytes: cfg.max_bytes,
            write: cfg.write,
            written: Mutex::new(Ledger::new()),
            namespaces: registry
                .all()
                .iter()
                .map(|c| (namespace(c), c.id().to_string()))
                .collect(),
            rebuilt: AtomicBool::new(false),
            rebuild_after: Mutex::new(None),
            stats: TierStats::default(),
            integrity_failures: Counter::default(),
            errors: Counter::default(),
            down_until: Mutex::new(None),
        };
        if up {
            tier.rebuild();
        }
        Ok(tier)
    }

    /// Whether the chunks already there at start are accounted for.
    pub fn rebuilt(&self) -> bool {
        self.rebuilt.load(Ordering::Acquire)
    }

    /// Accounts for the chunks of this store's contracts on the server, as
    /// older than anything this store wrote since it started (oldest idle
    /// first out).
    fn rebuild(&self) {
        let Some(mut after) = self.rebuild_after.try_lock() else {
            return;
        };
        if self.rebuilt() || after.is_some_and(|t| Instant::now() < t) {
            return;
        }
        match crate::redis_rebuild::scan(&self.clients, &self.namespaces) {
            Ok(mut found) => {
                // Most recently used first: each goes in as the oldest.
                found.sort_by_key(|f| f.idle.unwrap_or(u64::MAX));
                let mut written = self.written.lock();
                for f in found {
                    written.insert_oldest(f.name, &f.contract, f.bytes);
                }
                tracing::info!(
                    chunks = written.len(),
                    bytes = written.bytes(),
                    "redis tier: chunks already on the server accounted for"
                );
                self.rebuilt.store(true, Ordering::Release);
            }
            Err(e) if not_up_yet(&e) => {
                self.errors.inc();
                *after = Some(Instant::now() + RETRY_AFTER);
                tracing::warn!(error = %e, "redis tier: rebuild failed; retried at a later write");
            }
            Err(e) => {
                // Not a server away: retrying would fail alike. The bound
                // covers what this store writes from now on.
                self.errors.inc();
                self.rebuilt.store(true, Ordering::Release);
                tracing::error!(error = %e, "redis tier: chunks already on the server cannot be accounted for");
            }
        }
    }

    /// Runs one command (or a few, for one key each) on a pooled connection.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut dyn ConnectionLike) -> redis::RedisResult<T>,
    ) -> Result<T, RedisTierError> {
        let now = Instant::now();
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
            *self.down_until.lock() = Some(Instant::now() + RETRY_AFTER);
        }
        out
    }

    /// Whether the server answers (a PING through the pool).
    pub fn ping(&self) -> bool {
        self.with(|c| redis::cmd("PING").query::<String>(c)).is_ok()
    }

    /// Bytes this store accounts for there (written, or found at start),
    /// not evicted.
    pub fn bytes(&self) -> u64 {
        self.written.lock().bytes()
    }

    /// Chunks this store accounts for there, not evicted.
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
        if !self.rebuilt() {
            // The server was away at start (or is back): what is there
            // counts before this chunk adds to it.
            self.rebuild();
        }
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

    /// Whether this store knows the chunk is in Redis (written by it or
    /// found at start, and not evicted since): no round trip.
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
