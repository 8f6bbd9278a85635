//! How the tiers work together: memory first, then disk, then Redis. A chunk
//! evicted from memory is written back (sealed) to each lower tier that is
//! configured and does not hold it yet, if the chunk has a contract (shared
//! chunks never leave memory); a tier with `write: through` also gets every
//! chunk when it is stored. A GET that misses in memory reads disk, then
//! Redis, and promotes what it finds to memory; EXIST asks each tier; a
//! shred empties all of them. Every step is audited with its tier.

use std::sync::Arc;

use kvgate_auth::audit::{kind, AuditRecord};
use kvgate_auth::Contract;

use crate::config::WritePolicy;
use crate::disk::{Evicted, Loaded};
use crate::memory::Chunk;
use crate::scope::Owner;
use crate::server::Store;

/// Which tier answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Memory,
    Disk,
    Redis,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
            Tier::Redis => "redis",
        }
    }
}

/// LMCache's key inside a physical slot (`owner NUL ... NUL key`).
fn key_of(slot: &str) -> &str {
    slot.rsplit('\u{0}').next().unwrap_or_default()
}

/// The model field of an LMCache key (bound into the frame's AAD).
fn model_of(slot: &str) -> &str {
    key_of(slot).split('@').next().unwrap_or_default()
}

impl Store {
    /// Stores a client's chunk: in memory, and in each tier that writes
    /// through; what memory evicts goes down.
    pub(crate) fn put_chunk(&self, slot: String, chunk: Arc<Chunk>) {
        if let Some(contract) = self.contract_of(&chunk.owner) {
            for tier in [Tier::Disk, Tier::Redis] {
                if self.policy(tier) == Some(WritePolicy::Through) {
                    self.write_to(tier, &slot, &chunk, &contract, "written_through");
                }
            }
        }
        self.to_memory(slot, chunk);
    }

    /// The write policy of a lower tier; None if it is not configured.
    fn policy(&self, tier: Tier) -> Option<WritePolicy> {
        match tier {
            Tier::Memory => None,
            Tier::Disk => self.disk.as_ref().map(|_| self.write),
            Tier::Redis => self.redis.as_ref().map(|r| r.write),
        }
    }

    /// Puts a chunk in memory (a client's, or one promoted from below).
    fn to_memory(&self, slot: String, chunk: Arc<Chunk>) {
        let owner = chunk.owner.clone();
        let bytes = chunk.data.len();
        let quota = self.quotas.of(&owner);
        match self.memory.put(slot.clone(), chunk, quota) {
            Ok(evicted) => {
                self.record(&owner, key_of(&slot), "put", bytes, Tier::Memory);
                for (s, c) in evicted {
                    self.demote(&s, &c);
                }
            }
            Err(_) => self.record(&owner, key_of(&slot), "put_too_large", bytes, Tier::Memory),
        }
    }

    /// The chunk's contract, when a tier below memory can hold it.
    fn contract_of(&self, owner: &Owner) -> Option<Arc<Contract>> {
        if self.disk.is_none() && self.redis.is_none() {
            return None;
        }
        match owner {
            Owner::Contract(id) => self.scopes.contracts().and_then(|r| r.get(id)),
            Owner::Shared => None,
        }
    }

    fn demote(&self, slot: &str, c: &Chunk) {
        let mut kept = false;
        if let Some(contract) = self.contract_of(&c.owner) {
            for tier in [Tier::Disk, Tier::Redis] {
                let Some(policy) = self.policy(tier) else {
                    continue;
                };
                // Written through already: memory just lets it go.
                let holds = policy == WritePolicy::Through && self.holds(tier, &contract, slot);
                kept |= holds || self.write_to(tier, slot, c, &contract, "demoted");
            }
        }
        if !kept {
            let bytes = c.data.len();
            self.record(&c.owner, key_of(slot), "evicted", bytes, Tier::Memory);
        }
    }

    /// Whether a lower tier holds the chunk, as far as this store knows
    /// without asking a server.
    fn holds(&self, tier: Tier, contract: &Contract, slot: &str) -> bool {
        match tier {
            Tier::Memory => false,
            Tier::Disk => self
                .disk
                .as_ref()
                .is_some_and(|d| d.contains(contract, slot)),
            Tier::Redis => self.redis.as_ref().is_some_and(|r| r.knows(contract, slot)),
        }
    }

    /// Seals a chunk into a lower tier (audited as `what`); false if that
    /// failed or the tier is not configured.
    fn write_to(
        &self,
        tier: Tier,
        slot: &str,
        c: &Chunk,
        contract: &Contract,
        what: &'static str,
    ) -> bool {
        let model = model_of(slot);
        let written = match tier {
            Tier::Memory => return false,
            Tier::Disk => self.disk.as_ref().map(|d| {
                d.put(contract, model, slot, c.meta, &c.data)
                    .map_err(|e| e.to_string())
            }),
            Tier::Redis => self.redis.as_ref().map(|r| {
                r.put(contract, model, slot, c.meta, &c.data)
                    .map_err(|e| e.to_string())
            }),
        };
        match written {
            None => false,
            Some(Ok(evicted)) => {
                self.record(&c.owner, key_of(slot), what, c.data.len(), tier);
                self.record_evicted(evicted, tier);
                true
            }
            Some(Err(error)) => {
                tracing::warn!(%error, tier = tier.name(), "tier write failed; chunk not there");
                false
            }
        }
    }

    fn record_evicted(&self, evicted: Vec<Evicted>, tier: Tier) {
        for e in evicted {
            // Named by its file or Redis key: already a keyed id.
            self.audit.record(
                AuditRecord::new(kind::CACHE)
                    .contract(e.contract)
                    .reason("evicted")
                    .detail(
                        serde_json::json!({"chunk": e.name, "bytes": e.bytes, "tier": tier.name()}),
                    ),
            );
        }
    }

    /// The chunk from the first tier that has it (a hit below memory is
    /// promoted).
    pub(crate) fn get_chunk(&self, owner: &Owner, slot: &str) -> Option<(Arc<Chunk>, Tier)> {
        if let Some(c) = self.memory.get(slot) {
            return Some((c, Tier::Memory));
        }
        let contract = self.contract_of(owner)?;
        let model = model_of(slot);
        let (loaded, tier) = self
            .disk
            .as_ref()
            .and_then(|disk| {
                let failures = disk.integrity_failures.get();
                let found = disk.get(&contract, model, slot);
                if found.is_none() && disk.integrity_failures.get() > failures {
                    self.record(owner, key_of(slot), "integrity_failure", 0, Tier::Disk);
                }
                found.map(|l| (l, Tier::Disk))
            })
            .or_else(|| {
                let redis = self.redis.as_ref()?;
                let failures = redis.integrity_failures.get();
                let found = redis.get(&contract, model, slot);
                if found.is_none() && redis.integrity_failures.get() > failures {
                    self.record(owner, key_of(slot), "integrity_failure", 0, Tier::Redis);
                }
                found.map(|l| (l, Tier::Redis))
            })?;
        Some((self.promote(owner, slot, loaded), tier))
    }

    /// One buffer, shared by the reply and the memory tier.
    fn promote(&self, owner: &Owner, slot: &str, loaded: Loaded) -> Arc<Chunk> {
        let promoted = Arc::new(Chunk {
            owner: owner.clone(),
            meta: loaded.meta,
            data: loaded.data,
        });
        self.to_memory(slot.to_string(), promoted.clone());
        promoted
    }

    pub(crate) fn contains_chunk(&self, owner: &Owner, slot: &str) -> bool {
        if self.memory.contains(slot) {
            return true;
        }
        let Some(contract) = self.contract_of(owner) else {
            return false;
        };
        self.disk
            .as_ref()
            .is_some_and(|d| d.contains(&contract, slot))
            || self
                .redis
                .as_ref()
                .is_some_and(|r| r.contains(&contract, slot))
    }

    /// Empties a contract from the tiers below memory: (chunks, bytes).
    pub(crate) fn shred_lower(&self, contract: &str) -> (usize, u64) {
        let Some(c) = self.scopes.contracts().and_then(|r| r.get(contract)) else {
            return (0, 0);
        };
        let (mut chunks, mut bytes) = self.disk.as_ref().map_or((0, 0), |d| d.shred(&c));
        if let Some(redis) = &self.redis {
            match redis.shred(&c) {
                Ok((n, b)) => {
                    chunks += n;
                    bytes += b;
                }
                Err(e) => {
                    tracing::error!(error = %e, contract, "redis tier: shred incomplete; the contract's salts may remain");
                }
            }
        }
        (chunks, bytes)
    }
}
