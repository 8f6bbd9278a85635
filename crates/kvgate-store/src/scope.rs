//! Whose a chunk is. LMCache's client has no authentication; what it carries
//! is a tag: the gateway sets each request's
//! `kv_transfer_params["lmcache.tag.cachesalt"]` to its contract's salt, and
//! LMCache writes it into every chunk key as `@cachesalt%SALT`. The store
//! holds the same contracts (the same config and key material as the
//! gateway), so it can derive every contract's current salt and map a tag to
//! its contract. A tag that is no contract's current salt (a salt of an old
//! epoch, a suspended contract's, or made up) is refused; a key without a tag
//! is refused too unless `unscoped: shared` keeps it in a shared namespace.
//! A namespace, not authentication: whoever knows a salt can use it, which
//! is why salts never appear in logs, metrics or answers.

use kvgate_auth::{AuthConfig, ContractRegistry, SetupError};
use serde::{Deserialize, Serialize};

use crate::key::{ChunkKey, CACHE_SALT_TAG};

/// Whose a chunk is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    Contract(String),
    /// Untagged chunks, when `unscoped: shared` allows them.
    Shared,
}

/// What happens to a key without a `cachesalt` tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unscoped {
    #[default]
    Refuse,
    Shared,
}

/// Why a key has no owner here. Never carries the salt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("key has no cachesalt tag and unscoped keys are refused")]
    Untagged,
    #[error("cachesalt tag is no active contract's current salt")]
    UnknownSalt,
    #[error("the key's cachesalt tag is another contract's than this listener's")]
    OtherContract,
    #[error("this listener's contract is unknown or suspended")]
    ListenerContract,
}

pub struct Scopes {
    /// None: no contracts configured, every chunk is shared.
    contracts: Option<ContractRegistry>,
    unscoped: Unscoped,
}

impl Scopes {
    pub fn new(contracts: &AuthConfig, unscoped: Unscoped) -> Result<Self, SetupError> {
        let contracts = if contracts.contracts.is_empty() {
            tracing::warn!(
                "store: no contracts configured; every chunk is in one shared namespace"
            );
            None
        } else {
            Some(ContractRegistry::new(contracts)?)
        };
        Ok(Self {
            contracts,
            unscoped,
        })
    }

    /// No contracts: everything shared (a fleet without tenants).
    pub fn open() -> Self {
        Self {
            contracts: None,
            unscoped: Unscoped::Shared,
        }
    }

    pub fn contracts(&self) -> Option<&ContractRegistry> {
        self.contracts.as_ref()
    }

    /// How the audit log names a chunk: keyed by its contract's key (see
    /// `kvgate_auth::Contract::keyed_id`); a shared chunk by a plain hash.
    pub fn chunk_id(&self, owner: &Owner, key: &str) -> String {
        let contract = match owner {
            Owner::Contract(id) => self.contracts.as_ref().and_then(|r| r.get(id)),
            Owner::Shared => None,
        };
        match contract {
            Some(c) => c.keyed_id(key.as_bytes()),
            None => {
                use sha2::Digest;
                hex::encode(&sha2::Sha256::digest(key.as_bytes())[..16])
            }
        }
    }

    /// The owner of `key` on a listener bound to `bound` (the sidecar layout:
    /// an unmodified client, every chunk its pod's contract's), or on a
    /// shared listener (None): see [`Scopes::owner`].
    pub fn owner_on(&self, bound: Option<&str>, key: &ChunkKey) -> Result<Owner, ScopeError> {
        let Some(contract) = bound else {
            return self.owner(key);
        };
        if key.tag(CACHE_SALT_TAG).is_some() {
            return match self.owner(key)? {
                Owner::Contract(c) if c == contract => Ok(Owner::Contract(c)),
                _ => Err(ScopeError::OtherContract),
            };
        }
        match self.contracts.as_ref().and_then(|r| r.get(contract)) {
            Some(c) if !c.is_suspended() => Ok(Owner::Contract(contract.to_string())),
            _ => Err(ScopeError::ListenerContract),
        }
    }

    pub fn owner(&self, key: &ChunkKey) -> Result<Owner, ScopeError> {
        let Some(registry) = &self.contracts else {
            return Ok(Owner::Shared);
        };
        let Some(tag) = key.tag(CACHE_SALT_TAG) else {
            return match self.unscoped {
                Unscoped::Shared => Ok(Owner::Shared),
                Unscoped::Refuse => Err(ScopeError::Untagged),
            };
        };
        // Every contract is compared, so timing says nothing of which matched.
        let mut owner = None;
        for c in registry.all() {
            if c.is_current_salt(tag) && !c.is_suspended() {
                owner = Some(c.id().to_string());
            }
        }
        owner.map(Owner::Contract).ok_or(ScopeError::UnknownSalt)
    }
}
