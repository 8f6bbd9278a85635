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
use parking_lot::Mutex;
use prometheus_client::metrics::counter::Counter;

use crate::crypto::DataKey;
use crate::ledger::Ledger;
use crate::memory::TierStats;
use crate::protocol::ChunkMeta;
pub use crate::sealed::Loaded;
use crate::sealed::{open_chunk, seal_chunk, Place};
use crate::shred_keys::{salted_key, ShredKeys, DISK_KEY_INFO, STATE_FILE};

pub struct DiskTier {
    dir: PathBuf,
    max_bytes: u64,
    /// What is on disk, by path.
    files: Mutex<Ledger<PathBuf>>,
    keys: Mutex<ShredKeys>,
    pub stats: TierStats,
    /// Frames that did not open (torn, tampered, another epoch's).
    pub integrity_failures: Counter,
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
        let mut found: Vec<(std::time::SystemTime, PathBuf, &str, u64)> = Vec::new();
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
                found.push((modified, p, contract, m.len()));
            }
        }
        found.sort_by_key(|(t, ..)| *t);
        let mut files = Ledger::new();
        for (_, p, contract, bytes) in found {
            files.insert(p, contract, bytes);
        }
        let tier = Self {
            dir: dir.to_path_buf(),
            max_bytes,
            files: Mutex::new(files),
            keys: Mutex::new(keys),
            stats: TierStats::default(),
            integrity_failures: Counter::default(),
        };
        tier.evict_to_fit();
        Ok(tier)
    }

    pub fn bytes(&self) -> u64 {
        self.files.lock().bytes()
    }

    pub fn len(&self) -> usize {
        self.files.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn path(&self, c: &Contract, slot: &str) -> PathBuf {
        self.dir
            .join(contract_dir(c))
            .join(c.keyed_id(slot.as_bytes()))
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
        let key = self.key(c, epoch, true)?.ok_or_else(|| DiskError::Io {
            path: self.dir.join(STATE_FILE),
            source: std::io::Error::other("no disk key"),
        })?;
        let at = Place::new(c, epoch, model, slot);
        let frame = seal_chunk(&key, &at, meta, data);
        let path = self.path(c, slot);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &frame).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        self.files.lock().insert(path, c.id(), frame.len() as u64);
        Ok(self.evict_to_fit())
    }

    fn evict_to_fit(&self) -> Vec<Evicted> {
        let over = self.files.lock().over(self.max_bytes);
        over.into_iter()
            .map(|(p, e)| {
                let _ = std::fs::remove_file(&p);
                self.stats.evictions.inc();
                Evicted {
                    contract: e.contract,
                    name: p
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    bytes: e.bytes,
                }
            })
            .collect()
    }

    /// Whether a chunk is on disk (not opened: EXIST is asked for every
    /// chunk of every lookup).
    pub fn contains(&self, c: &Contract, slot: &str) -> bool {
        self.files.lock().contains(&self.path(c, slot))
    }

    /// Reads and opens a chunk. A frame that does not open is removed and
    /// counted: a miss, never data.
    pub fn get(&self, c: &Contract, model: &str, slot: &str) -> Option<Loaded> {
        let path = self.path(c, slot);
        let known = self.files.lock().touch(&path);
        let frame = known.then(|| std::fs::read(&path).ok()).flatten();
        let Some(frame) = frame else {
            self.stats.misses.inc();
            return None;
        };
        // One read of the epoch: a suspension between two would make a good
        // frame look tampered (and delete it).
        let epoch = c.epoch();
        let key = match self.key(c, epoch, false) {
            Ok(Some(k)) => k,
            // Shredded (or an epoch never written): nothing here can open.
            Ok(None) | Err(_) => {
                self.stats.misses.inc();
                self.remove(&path);
                return None;
            }
        };
        let at = Place::new(c, epoch, model, slot);
        match open_chunk(&key, &at, frame) {
            Some(loaded) => {
                self.stats.hits.inc();
                Some(loaded)
            }
            None => {
                self.integrity_failures.inc();
                self.stats.misses.inc();
                self.remove(&path);
                None
            }
        }
    }

    fn remove(&self, path: &Path) {
        self.files.lock().remove(&path.to_path_buf());
        let _ = std::fs::remove_file(path);
    }

    /// The key `c`'s chunks are sealed under at `epoch` (made if `create`).
    fn key(&self, c: &Contract, epoch: u64, create: bool) -> Result<Option<DataKey>, DiskError> {
        let salt = self.keys.lock().salt(&contract_dir(c), epoch, create)?;
        Ok(salt.map(|s| salted_key(&c.data_key(epoch), &s, DISK_KEY_INFO)))
    }

    /// Removes every file of contract `c`: (files, bytes). Its salts go
    /// first, so even a copy of a file taken before never opens again.
    pub fn shred(&self, c: &Contract) -> (usize, u64) {
        if let Err(e) = self.keys.lock().forget(&contract_dir(c)) {
            tracing::error!(error = %e, "disk tier: the shredded contract's salts could not be saved as gone");
        }
        let mine = self.files.lock().take_contract(c.id());
        let _ = std::fs::remove_dir_all(self.dir.join(contract_dir(c)));
        (mine.len(), mine.iter().map(|(_, e)| e.bytes).sum())
    }
}
