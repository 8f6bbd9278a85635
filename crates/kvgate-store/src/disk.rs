//! The disk tier: one directory, bounded in bytes, every chunk an AES-256-GCM
//! frame (`crypto.rs`) under its contract's data key. Names are keyed: a
//! contract's chunks live in `<dir>/<keyed id of the contract>/<keyed id of
//! the chunk>` (HKDF of the contract's key), so nothing on disk shows a
//! contract, model, prompt hash or size class in clear. Untagged (shared)
//! chunks have no key and never leave memory.
//!
//! A write goes to a temporary file and is renamed into place, so a crash
//! mid-write never leaves a torn chunk under a real name (and a torn or
//! foreign file fails its tag anyway: a miss, counted, and the file removed).
//! At start the index of what is on disk is rebuilt from the directory
//! (least recently modified first out); files of contracts no longer
//! configured are removed.
//!
//! The key a file is sealed under also takes a random salt that a shred
//! destroys (`shred_keys.rs`): after a shred no copy of the contract's files
//! opens, even for someone who holds its key material.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kvgate_auth::{Contract, ContractRegistry};
use lru::LruCache;
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;
use zeroize::Zeroizing;

use crate::crypto::{open, seal, Binding, DataKey};
use crate::memory::TierStats;
use crate::protocol::ChunkMeta;
use crate::shred_keys::{disk_key, ShredKeys, STATE_FILE};

/// Bytes of a chunk's meta at the head of its plaintext.
const META_LEN: usize = 24;

/// What is on disk: by (contract id, physical name).
struct Entry {
    contract: String,
    bytes: u64,
}

pub struct DiskTier {
    dir: PathBuf,
    max_bytes: u64,
    inner: Mutex<Inner>,
    keys: Mutex<ShredKeys>,
    pub stats: TierStats,
    /// Frames that did not open (torn, tampered, another epoch's).
    pub integrity_failures: Counter,
}

struct Inner {
    files: LruCache<PathBuf, Entry>,
    bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk tier {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DiskError + '_ {
    move |source| DiskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A file the tier removed to make room: its contract, its (keyed) name,
/// its size.
pub struct Evicted {
    pub contract: String,
    pub name: String,
    pub bytes: u64,
}

/// A chunk read back from disk.
pub struct Loaded {
    pub meta: ChunkMeta,
    pub data: Zeroizing<Vec<u8>>,
}

fn contract_dir(c: &Contract) -> String {
    c.keyed_id(b"kvgate disk directory")
}

impl DiskTier {
    /// Opens (or creates) `dir` and rebuilds the index of the chunks of the
    /// contracts in `registry`.
    pub fn open(
        dir: &Path,
        max_bytes: u64,
        registry: &ContractRegistry,
    ) -> Result<Self, DiskError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let by_dir: HashMap<String, String> = registry
            .all()
            .iter()
            .map(|c| (contract_dir(c), c.id().to_string()))
            .collect();
        let mut keys = ShredKeys::load(dir)?;
        keys.retain(&by_dir.keys().cloned().collect::<Vec<_>>())?;
        let mut found: Vec<(std::time::SystemTime, PathBuf, Entry)> = Vec::new();
        for d in std::fs::read_dir(dir).map_err(io(dir))?.flatten() {
            let name = d.file_name().to_string_lossy().into_owned();
            let path = d.path();
            if !path.is_dir() {
                // The key state, or its temporary file from a crash.
                if name != STATE_FILE {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            let Some(contract) = by_dir.get(&name) else {
                // A contract no longer configured: its chunks can never be
                // read again, so they go.
                let _ = std::fs::remove_dir_all(&path);
                continue;
            };
            for f in std::fs::read_dir(&path).map_err(io(&path))?.flatten() {
                let p = f.path();
                let Ok(m) = f.metadata() else { continue };
                if p.extension().is_some_and(|e| e == "tmp") {
                    let _ = std::fs::remove_file(&p);
                    continue;
                }
                let modified = m.modified().unwrap_or(std::time::UNIX_EPOCH);
                found.push((
                    modified,
                    p,
                    Entry {
                        contract: contract.clone(),
                        bytes: m.len(),
                    },
                ));
            }
        }
        found.sort_by_key(|(t, _, _)| *t);
        let mut files = LruCache::unbounded();
        let mut bytes = 0;
        for (_, p, e) in found {
            bytes += e.bytes;
            files.put(p, e);
        }
        let tier = Self {
            dir: dir.to_path_buf(),
            max_bytes,
            inner: Mutex::new(Inner { files, bytes }),
            keys: Mutex::new(keys),
            stats: TierStats::default(),
            integrity_failures: Counter::default(),
        };
        tier.evict_to_fit();
        Ok(tier)
    }

    pub fn bytes(&self) -> u64 {
        self.inner.lock().bytes
    }

    pub fn len(&self) -> usize {
        self.inner.lock().files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn path(&self, c: &Contract, slot: &str) -> PathBuf {
        self.dir
            .join(contract_dir(c))
            .join(c.keyed_id(slot.as_bytes()))
    }

    fn binding<'a>(c: &'a Contract, epoch: u64, model: &'a str, slot: &'a str) -> Binding<'a> {
        Binding {
            contract: c.id(),
            epoch,
            model,
            chunk_key: slot,
        }
    }

    /// Seals and writes a chunk of contract `c` (`slot`: its physical key in
    /// the tiers). Returns the paths evicted to make room.
    pub fn put(
        &self,
        c: &Contract,
        model: &str,
        slot: &str,
        meta: ChunkMeta,
        data: &[u8],
    ) -> Result<Vec<Evicted>, DiskError> {
        let epoch = c.epoch();
        let mut plain = Zeroizing::new(Vec::with_capacity(META_LEN + data.len()));
        for v in [
            meta.fmt,
            meta.dtype,
            meta.shape[0],
            meta.shape[1],
            meta.shape[2],
            meta.shape[3],
        ] {
            plain.extend_from_slice(&v.to_le_bytes());
        }
        plain.extend_from_slice(data);
        let key = self.key(c, epoch, true)?.ok_or_else(|| DiskError::Io {
            path: self.dir.join(STATE_FILE),
            source: std::io::Error::other("no disk key"),
        })?;
        let frame = seal(&key, &Self::binding(c, epoch, model, slot), &plain);
        let path = self.path(c, slot);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &frame).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        let mut inner = self.inner.lock();
        if let Some(old) = inner.files.put(
            path,
            Entry {
                contract: c.id().to_string(),
                bytes: frame.len() as u64,
            },
        ) {
            inner.bytes -= old.bytes;
        }
        inner.bytes += frame.len() as u64;
        drop(inner);
        Ok(self.evict_to_fit())
    }

    fn evict_to_fit(&self) -> Vec<Evicted> {
        let mut evicted = Vec::new();
        let mut inner = self.inner.lock();
        while inner.bytes > self.max_bytes {
            let Some((p, e)) = inner.files.pop_lru() else {
                break;
            };
            inner.bytes -= e.bytes;
            let _ = std::fs::remove_file(&p);
            self.stats.evictions.inc();
            evicted.push(Evicted {
                contract: e.contract,
                name: p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                bytes: e.bytes,
            });
        }
        evicted
    }

    /// Whether a chunk is on disk (not opened: EXIST is asked for every
    /// chunk of every lookup).
    pub fn contains(&self, c: &Contract, slot: &str) -> bool {
        self.inner.lock().files.contains(&self.path(c, slot))
    }

    /// Reads and opens a chunk. A frame that does not open is removed and
    /// counted: a miss, never data.
    pub fn get(&self, c: &Contract, model: &str, slot: &str) -> Option<Loaded> {
        let path = self.path(c, slot);
        let known = self.inner.lock().files.get(&path).is_some();
        let frame = known.then(|| std::fs::read(&path).ok()).flatten();
        let Some(frame) = frame else {
            self.stats.misses.inc();
            return None;
        };
        let key = match self.key(c, c.epoch(), false) {
            Ok(Some(k)) => k,
            // Shredded (or an epoch never written): nothing here can open.
            Ok(None) | Err(_) => {
                self.stats.misses.inc();
                self.remove(&path);
                return None;
            }
        };
        match open(&key, &Self::binding(c, c.epoch(), model, slot), &frame) {
            Ok(plain) if plain.len() >= META_LEN => {
                let int = |i: usize| {
                    let mut b = [0u8; 4];
                    b.copy_from_slice(&plain[4 * i..4 * i + 4]);
                    i32::from_le_bytes(b)
                };
                let meta = ChunkMeta {
                    fmt: int(0),
                    dtype: int(1),
                    shape: [int(2), int(3), int(4), int(5)],
                };
                self.stats.hits.inc();
                Some(Loaded {
                    meta,
                    data: Zeroizing::new(plain[META_LEN..].to_vec()),
                })
            }
            _ => {
                self.integrity_failures.inc();
                self.stats.misses.inc();
                self.remove(&path);
                None
            }
        }
    }

    fn remove(&self, path: &Path) {
        let mut inner = self.inner.lock();
        if let Some(e) = inner.files.pop(path) {
            inner.bytes -= e.bytes;
        }
        let _ = std::fs::remove_file(path);
    }

    /// The key `c`'s chunks are sealed under at `epoch` (made if `create`).
    fn key(&self, c: &Contract, epoch: u64, create: bool) -> Result<Option<DataKey>, DiskError> {
        let salt = self.keys.lock().salt(&contract_dir(c), epoch, create)?;
        Ok(salt.map(|s| disk_key(&c.data_key(epoch), &s)))
    }

    /// Removes every file of contract `c`: (files, bytes). Its salts go
    /// first, so even a copy of a file taken before never opens again.
    pub fn shred(&self, c: &Contract) -> (usize, u64) {
        if let Err(e) = self.keys.lock().forget(&contract_dir(c)) {
            tracing::error!(error = %e, "disk tier: the shredded contract's salts could not be saved as gone");
        }
        let mut inner = self.inner.lock();
        let mine: Vec<PathBuf> = inner
            .files
            .iter()
            .filter(|(_, e)| e.contract == c.id())
            .map(|(p, _)| p.clone())
            .collect();
        let mut bytes = 0;
        for p in &mine {
            if let Some(e) = inner.files.pop(p) {
                inner.bytes -= e.bytes;
                bytes += e.bytes;
            }
        }
        drop(inner);
        let _ = std::fs::remove_dir_all(self.dir.join(contract_dir(c)));
        (mine.len(), bytes)
    }
}
