//! Contracts: their status and validity, the models they may use, their key
//! material (held in zeroized buffers, never stored by kvgate) and the cache
//! salts derived from it. A salt is a keyed, domain-separated,
//! length-prefixed hash of (contract, salt epoch[, subject]); the epoch moves
//! on suspension and reactivation, so nothing cached before can be hit again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use hkdf::Hkdf;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::config::{AuthConfig, ContractSpec, ContractStatus, KeyRef};
use crate::limits::ContractLimits;
use crate::SetupError;

/// Domain separation of every key kvgate derives from contract material.
const CONTRACT_KEY_SALT: &[u8] = b"kvgate contract key v1";
const CACHE_SALT_INFO: &[u8] = b"kvgate cache_salt v1";
const KEYED_ID_INFO: &[u8] = b"kvgate keyed id v1";
/// Our users' design: `cache_key = KDF(base_key, "kvcache")`, per epoch.
const DATA_KEY_INFO: &[u8] = b"kvgate kvcache v1";

/// Why a principal's contract does not admit a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContractError {
    #[error("unknown contract")]
    Unknown,
    #[error("contract is suspended")]
    Suspended,
    #[error("contract has expired")]
    Expired,
    #[error("contract is not valid yet")]
    NotYetValid,
    #[error("the contract does not cover model `{0}`")]
    ModelNotAllowed(String),
}

impl ContractError {
    /// OpenAI's error `code` for it.
    pub fn code(&self) -> &'static str {
        match self {
            ContractError::Unknown => "contract_unknown",
            ContractError::Suspended => "contract_suspended",
            ContractError::Expired => "contract_expired",
            ContractError::NotYetValid => "contract_not_yet_valid",
            ContractError::ModelNotAllowed(_) => "model_not_allowed",
        }
    }
}

/// One contract as the gateway holds it.
pub struct Contract {
    pub spec: ContractSpec,
    key: Zeroizing<[u8; 32]>,
    epoch: AtomicU64,
    suspended: AtomicBool,
    pub(crate) limits: ContractLimits,
    /// The contract-wide salt and the epoch it is of: every request needs
    /// it, and deriving it costs two HMACs.
    salt: Mutex<Option<(u64, Zeroizing<String>)>>,
}

impl Contract {
    pub fn id(&self) -> &str {
        &self.spec.id
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    pub fn is_suspended(&self) -> bool {
        self.suspended.load(Ordering::Acquire)
    }

    /// The vLLM `cache_salt` (and LMCache tag) of this contract's current
    /// epoch, for one subject under per-user isolation: 32 hex chars.
    pub fn cache_salt(&self, subject: Option<&str>) -> String {
        let epoch = self.epoch();
        if subject.is_some() {
            return self.derive_salt(epoch, subject);
        }
        self.with_salt(epoch, |s| s.to_string())
    }

    /// Whether `salt` is this contract's contract-wide salt now, compared in
    /// constant time without copying it (the KV store asks this of every
    /// contract for every chunk).
    pub fn is_current_salt(&self, salt: &str) -> bool {
        self.with_salt(self.epoch(), |s| {
            bool::from(s.as_bytes().ct_eq(salt.as_bytes()))
        })
    }

    /// `f` of the contract-wide salt of `epoch`, derived once per epoch.
    fn with_salt<T>(&self, epoch: u64, f: impl FnOnce(&str) -> T) -> T {
        let mut cached = self.salt.lock();
        if !matches!(&*cached, Some((e, _)) if *e == epoch) {
            *cached = Some((epoch, Zeroizing::new(self.derive_salt(epoch, None))));
        }
        match &*cached {
            Some((_, s)) => f(s),
            None => f(""),
        }
    }

    /// A stable id for one of this contract's cache entries, keyed by the
    /// contract's key: audit records name chunks by it, never by their key
    /// (which carries the salt and the prompt's hash). 32 hex chars.
    pub fn keyed_id(&self, name: &[u8]) -> String {
        let mut info = Zeroizing::new(Vec::with_capacity(KEYED_ID_INFO.len() + name.len() + 8));
        info.extend_from_slice(KEYED_ID_INFO);
        push_prefixed(&mut info, name);
        let mut out = [0u8; 16];
        self.expand(&info, &mut out);
        hex::encode(out)
    }

    /// The key this contract's KV chunks are encrypted under at rest, for
    /// salt epoch `epoch`: a new epoch (suspension, re-keying) is a new key.
    /// Derived when needed, never stored.
    pub fn data_key(&self, epoch: u64) -> Zeroizing<[u8; 32]> {
        let mut info = Zeroizing::new(Vec::with_capacity(DATA_KEY_INFO.len() + 8));
        info.extend_from_slice(DATA_KEY_INFO);
        info.extend_from_slice(&epoch.to_be_bytes());
        let mut out = Zeroizing::new([0u8; 32]);
        self.expand(&info, out.as_mut_slice());
        out
    }

    fn derive_salt(&self, epoch: u64, subject: Option<&str>) -> String {
        let mut info = Zeroizing::new(Vec::with_capacity(96));
        info.extend_from_slice(CACHE_SALT_INFO);
        push_prefixed(&mut info, self.spec.id.as_bytes());
        info.extend_from_slice(&epoch.to_be_bytes());
        match subject {
            Some(s) => {
                info.push(1);
                push_prefixed(&mut info, s.as_bytes());
            }
            None => info.push(0),
        }
        let mut out = [0u8; 16];
        self.expand(&info, &mut out);
        hex::encode(out)
    }

    fn expand(&self, info: &[u8], out: &mut [u8]) {
        // The contract key is a full-entropy PRK; output lengths here are far
        // below HKDF's limit, so expansion cannot fail.
        if let Ok(hk) = Hkdf::<Sha256>::from_prk(self.key.as_ref()) {
            let _ = hk.expand(info, out);
        }
    }

    fn check(&self, model: &str, now_unix: u64) -> Result<(), ContractError> {
        if self.is_suspended() {
            return Err(ContractError::Suspended);
        }
        if self.spec.not_before.is_some_and(|t| now_unix < t) {
            return Err(ContractError::NotYetValid);
        }
        if self.spec.not_after.is_some_and(|t| now_unix >= t) {
            return Err(ContractError::Expired);
        }
        let open = self.spec.models.is_empty() && self.spec.loras.is_empty();
        let listed = self
            .spec
            .models
            .iter()
            .chain(&self.spec.loras)
            .any(|m| m == model);
        if open || listed {
            Ok(())
        } else {
            Err(ContractError::ModelNotAllowed(model.to_string()))
        }
    }
}

/// A contract's key: its own material, or derived from the master key.
fn spec_key(spec: &ContractSpec, master: Option<&[u8]>) -> Result<Zeroizing<[u8; 32]>, SetupError> {
    match (&spec.key, master) {
        (Some(k), _) => Ok(contract_key(&read_key(k)?, "")),
        (None, Some(m)) => Ok(contract_key(m, &spec.id)),
        (None, None) => Err(SetupError::NoKey(spec.id.clone())),
    }
}

fn build(
    spec: &ContractSpec,
    key: Zeroizing<[u8; 32]>,
    epoch: u64,
    suspended: bool,
) -> Result<Arc<Contract>, SetupError> {
    Ok(Arc::new(Contract {
        limits: ContractLimits::new(&spec.limits)?,
        spec: spec.clone(),
        key,
        epoch: AtomicU64::new(epoch),
        salt: Mutex::new(None),
        suspended: AtomicBool::new(suspended),
    }))
}

/// A length-prefixed field: no two field lists hash alike.
fn push_prefixed(buf: &mut Vec<u8>, field: &[u8]) {
    buf.extend_from_slice(&(field.len() as u64).to_be_bytes());
    buf.extend_from_slice(field);
}

/// What a suspension or reactivation did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatusChange {
    pub contract: String,
    pub status: ContractStatus,
    pub epoch: u64,
    /// False when the contract already had that status (nothing changed).
    pub changed: bool,
}

impl StatusChange {
    fn new(contract: &str, suspended: bool, epoch: u64, changed: bool) -> Self {
        Self {
            contract: contract.to_string(),
            status: if suspended {
                ContractStatus::Suspended
            } else {
                ContractStatus::Active
            },
            epoch,
            changed,
        }
    }
}

/// Every contract, by id. A reload swaps the whole map: requests already
/// holding a contract keep it, new ones see the new map.
pub struct ContractRegistry {
    contracts: RwLock<Arc<BTreeMap<String, Arc<Contract>>>>,
    state_file: Option<PathBuf>,
    /// Serializes status changes, reloads and their persistence.
    changes: Mutex<()>,
}

/// What a reload of the contracts config changed, by contract id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReloadSummary {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Spec changed (models, limits, window, priority): same key and epoch.
    pub updated: Vec<String>,
    /// Key material changed: a new salt epoch, so nothing cached under the
    /// old key is hit again.
    pub rekeyed: Vec<String>,
    /// `status:` changed in the config: applied as a suspension or a
    /// reactivation (epoch moved).
    pub status_changed: Vec<String>,
}

impl ReloadSummary {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.updated.is_empty()
            && self.rekeyed.is_empty()
            && self.status_changed.is_empty()
    }
}

/// What survives a restart (the state file).
#[derive(Debug, Default, Serialize, Deserialize)]
struct PersistedState {
    contracts: BTreeMap<String, PersistedContract>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PersistedContract {
    epoch: u64,
    suspended: bool,
}

impl ContractRegistry {
    pub fn new(cfg: &AuthConfig) -> Result<Self, SetupError> {
        let master = cfg.master_key.as_ref().map(read_key).transpose()?;
        let persisted = match &cfg.state_file {
            Some(p) if p.exists() => read_state(p)?,
            _ => PersistedState::default(),
        };
        let mut contracts = BTreeMap::new();
        for spec in &cfg.contracts {
            if spec.id.is_empty() || contracts.contains_key(&spec.id) {
                return Err(SetupError::ContractId(spec.id.clone()));
            }
            let saved = persisted.contracts.get(&spec.id);
            // A persisted epoch never goes back below the configured one.
            let epoch = saved.map_or(spec.salt_epoch, |s| s.epoch.max(spec.salt_epoch));
            let suspended = saved.map_or(spec.status == ContractStatus::Suspended, |s| s.suspended);
            let key = spec_key(spec, master.as_ref().map(|m| m.as_slice()))?;
            contracts.insert(spec.id.clone(), build(spec, key, epoch, suspended)?);
        }
        if cfg.state_file.is_none() && !contracts.is_empty() {
            tracing::warn!("contracts.state_file is not set: suspensions and salt epochs last only as long as this process");
        }
        Ok(Self {
            contracts: RwLock::new(Arc::new(contracts)),
            state_file: cfg.state_file.clone(),
            changes: Mutex::new(()),
        })
    }

    /// Applies a new contracts config. A contract whose spec and key are
    /// unchanged is kept as it is (its live status, epoch and rate buckets);
    /// a changed spec keeps the epoch and live status; new key material moves
    /// the epoch; a changed `status:` is applied like an admin suspension or
    /// reactivation. Nothing is changed if any contract of the new config is
    /// invalid.
    pub fn reload(&self, cfg: &AuthConfig) -> Result<ReloadSummary, SetupError> {
        let master = cfg.master_key.as_ref().map(read_key).transpose()?;
        let _serial = self.changes.lock();
        let old = self.snapshot();
        let mut next = BTreeMap::new();
        let mut summary = ReloadSummary::default();
        for spec in &cfg.contracts {
            if spec.id.is_empty() || next.contains_key(&spec.id) {
                return Err(SetupError::ContractId(spec.id.clone()));
            }
            let key = spec_key(spec, master.as_ref().map(|m| m.as_slice()))?;
            let Some(current) = old.get(&spec.id) else {
                let suspended = spec.status == ContractStatus::Suspended;
                next.insert(
                    spec.id.clone(),
                    build(spec, key, spec.salt_epoch, suspended)?,
                );
                summary.added.push(spec.id.clone());
                continue;
            };
            let same_key = bool::from(current.key.as_slice().ct_eq(key.as_slice()));
            if same_key && current.spec == *spec {
                next.insert(spec.id.clone(), current.clone());
                continue;
            }
            let mut epoch = current.epoch();
            let mut suspended = current.is_suspended();
            if !same_key {
                epoch += 1;
                summary.rekeyed.push(spec.id.clone());
            } else {
                summary.updated.push(spec.id.clone());
            }
            if spec.status != current.spec.status {
                let now = spec.status == ContractStatus::Suspended;
                if now != suspended {
                    suspended = now;
                    epoch += u64::from(same_key);
                }
                summary.status_changed.push(spec.id.clone());
            }
            let replacement = build(spec, key, epoch.max(spec.salt_epoch), suspended)?;
            // Responses in flight hold the old contract: they see the change.
            current.suspended.store(suspended, Ordering::Release);
            current.epoch.store(replacement.epoch(), Ordering::Release);
            next.insert(spec.id.clone(), replacement);
        }
        for (id, c) in old.iter() {
            if !next.contains_key(id) {
                // In flight under a removed contract: treated as suspended.
                c.suspended.store(true, Ordering::Release);
                summary.removed.push(id.clone());
            }
        }
        *self.contracts.write() = Arc::new(next);
        self.persist()?;
        Ok(summary)
    }

    fn snapshot(&self) -> Arc<BTreeMap<String, Arc<Contract>>> {
        self.contracts.read().clone()
    }

    pub fn get(&self, id: &str) -> Option<Arc<Contract>> {
        self.contracts.read().get(id).cloned()
    }

    /// Every contract, by id.
    pub fn all(&self) -> Vec<Arc<Contract>> {
        self.contracts.read().values().cloned().collect()
    }

    /// The contract `id`, if it admits a request for `model` now.
    pub fn admit(
        &self,
        id: &str,
        model: &str,
        now_unix: u64,
    ) -> Result<Arc<Contract>, ContractError> {
        let c = self.get(id).ok_or(ContractError::Unknown)?;
        c.check(model, now_unix)?;
        Ok(c)
    }

    /// Takes another holder's view of a contract (the gateway's, pushed to
    /// the KV store): its status, and its epoch unless ours is already
    /// later (epochs never go back). What `set_suspended` there did, here.
    pub fn sync(&self, id: &str, suspended: bool, epoch: u64) -> Result<StatusChange, SetupError> {
        let c = self
            .get(id)
            .ok_or_else(|| SetupError::ContractId(id.to_string()))?;
        let _serial = self.changes.lock();
        let was = (c.is_suspended(), c.epoch());
        c.suspended.store(suspended, Ordering::Release);
        c.epoch.fetch_max(epoch, Ordering::AcqRel);
        let changed = was != (c.is_suspended(), c.epoch());
        if changed {
            self.persist()?;
        }
        Ok(StatusChange::new(id, suspended, c.epoch(), changed))
    }

    /// Suspends (`true`) or reactivates a contract. Either moves its salt
    /// epoch: blocks cached before can never be hit again, by anyone.
    pub fn set_suspended(&self, id: &str, suspended: bool) -> Result<StatusChange, SetupError> {
        let c = self
            .get(id)
            .ok_or_else(|| SetupError::ContractId(id.to_string()))?;
        let _serial = self.changes.lock();
        let changed = c.suspended.swap(suspended, Ordering::AcqRel) != suspended;
        if changed {
            c.epoch.fetch_add(1, Ordering::AcqRel);
            self.persist()?;
        }
        Ok(StatusChange::new(id, suspended, c.epoch(), changed))
    }

    fn persist(&self) -> Result<(), SetupError> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let state = PersistedState {
            contracts: self
                .snapshot()
                .iter()
                .map(|(id, c)| {
                    (
                        id.clone(),
                        PersistedContract {
                            epoch: c.epoch(),
                            suspended: c.is_suspended(),
                        },
                    )
                })
                .collect(),
        };
        let io = |e: std::io::Error| SetupError::StateFile {
            path: path.clone(),
            reason: e.to_string(),
        };
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_vec_pretty(&state).map_err(|e| SetupError::StateFile {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

/// The contract key: HKDF-Extract of its material (and, from a master key,
/// the contract id).
fn contract_key(material: &[u8], id: &str) -> Zeroizing<[u8; 32]> {
    let mut ikm = Zeroizing::new(Vec::with_capacity(material.len() + id.len() + 16));
    push_prefixed(&mut ikm, material);
    push_prefixed(&mut ikm, id.as_bytes());
    let (prk, _) = Hkdf::<Sha256>::extract(Some(CONTRACT_KEY_SALT), &ikm);
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&prk);
    key
}

fn read_key(r: &KeyRef) -> Result<Zeroizing<Vec<u8>>, SetupError> {
    let bytes = match r {
        KeyRef::File(p) => Zeroizing::new(std::fs::read(p).map_err(|e| SetupError::Key {
            source_name: p.display().to_string(),
            reason: e.to_string(),
        })?),
        KeyRef::Env(name) => Zeroizing::new(
            std::env::var(name)
                .map_err(|e| SetupError::Key {
                    source_name: format!("${name}"),
                    reason: e.to_string(),
                })?
                .into_bytes(),
        ),
    };
    let trimmed = bytes.trim_ascii_end();
    if trimmed.len() < 16 {
        return Err(SetupError::Key {
            source_name: match r {
                KeyRef::File(p) => p.display().to_string(),
                KeyRef::Env(n) => format!("${n}"),
            },
            reason: "key material must be at least 16 bytes".into(),
        });
    }
    Ok(Zeroizing::new(trimmed.to_vec()))
}

fn read_state(path: &Path) -> Result<PersistedState, SetupError> {
    let err = |reason: String| SetupError::StateFile {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    serde_json::from_slice(&text).map_err(|e| err(e.to_string()))
}
