//! How the tiers work together: memory first; a chunk evicted from memory is
//! written back to disk (sealed), if a disk tier is configured and the chunk
//! has a contract (shared chunks never leave memory), or, with `disk.write:
//! through`, written to disk when it is stored as well; a GET that misses in
//! memory reads the disk and promotes what it finds; EXIST asks both; a
//! shred empties both. Every step is audited with its tier.

use std::sync::Arc;

use kvgate_auth::audit::{kind, AuditRecord};

use crate::config::WritePolicy;
use crate::memory::Chunk;
use crate::scope::Owner;
use crate::server::Store;

/// Which tier answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Memory,
    Disk,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Disk => "disk",
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
    /// Stores a client's chunk: in memory, and on disk too when writing
    /// through; what memory evicts goes to disk.
    pub(crate) fn put_chunk(&self, slot: String, chunk: Arc<Chunk>) {
        if self.write == WritePolicy::Through {
            if let Some(contract) = self.contract_of(&chunk.owner) {
                self.write_to_disk(&slot, &chunk, &contract, "written_through");
            }
        }
        self.to_memory(slot, chunk);
    }

    /// Puts a chunk in memory (a client's, or one promoted from disk).
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

    /// The chunk's contract, when a disk tier can hold it.
    fn contract_of(&self, owner: &Owner) -> Option<Arc<kvgate_auth::Contract>> {
        match (&self.disk, owner) {
            (Some(_), Owner::Contract(id)) => self.scopes.contracts().and_then(|r| r.get(id)),
            _ => None,
        }
    }

    fn demote(&self, slot: &str, c: &Chunk) {
        let on_disk = |contract: &kvgate_auth::Contract| {
            self.write == WritePolicy::Through
                && self
                    .disk
                    .as_ref()
                    .is_some_and(|d| d.contains(contract, slot))
        };
        // Written through already: memory just lets it go.
        let demoted = self.contract_of(&c.owner).is_some_and(|contract| {
            !on_disk(&contract) && self.write_to_disk(slot, c, &contract, "demoted")
        });
        if demoted {
            return;
        }
        self.record(
            &c.owner,
            key_of(slot),
            "evicted",
            c.data.len(),
            Tier::Memory,
        );
    }

    /// Seals a chunk to disk (audited as `what`); false if that failed.
    fn write_to_disk(
        &self,
        slot: &str,
        c: &Chunk,
        contract: &kvgate_auth::Contract,
        what: &'static str,
    ) -> bool {
        let Some(disk) = &self.disk else {
            return false;
        };
        match disk.put(contract, model_of(slot), slot, c.meta, &c.data) {
            Ok(evicted) => {
                self.record(&c.owner, key_of(slot), what, c.data.len(), Tier::Disk);
                for e in evicted {
                    // Named by its file: already a keyed id.
                    self.audit.record(
                        AuditRecord::new(kind::CACHE)
                            .contract(e.contract)
                            .reason("evicted")
                            .detail(serde_json::json!({"chunk": e.name, "bytes": e.bytes, "tier": "disk"})),
                    );
                }
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "disk tier write failed; chunk not on disk");
                false
            }
        }
    }

    /// The chunk from the first tier that has it (a disk hit is promoted).
    pub(crate) fn get_chunk(&self, owner: &Owner, slot: &str) -> Option<(Arc<Chunk>, Tier)> {
        if let Some(c) = self.memory.get(slot) {
            return Some((c, Tier::Memory));
        }
        let (Some(disk), Owner::Contract(id)) = (&self.disk, owner) else {
            return None;
        };
        let contract = self.scopes.contracts().and_then(|r| r.get(id))?;
        let failures = disk.integrity_failures.get();
        let Some(loaded) = disk.get(&contract, model_of(slot), slot) else {
            if disk.integrity_failures.get() > failures {
                self.record(owner, key_of(slot), "integrity_failure", 0, Tier::Disk);
            }
            return None;
        };
        // One buffer, shared by the reply and the memory tier.
        let promoted = Arc::new(Chunk {
            owner: owner.clone(),
            meta: loaded.meta,
            data: loaded.data,
        });
        self.to_memory(slot.to_string(), promoted.clone());
        Some((promoted, Tier::Disk))
    }

    pub(crate) fn contains_chunk(&self, owner: &Owner, slot: &str) -> bool {
        if self.memory.contains(slot) {
            return true;
        }
        match (&self.disk, owner) {
            (Some(disk), Owner::Contract(id)) => self
                .scopes
                .contracts()
                .and_then(|r| r.get(id))
                .is_some_and(|c| disk.contains(&c, slot)),
            _ => false,
        }
    }
}
