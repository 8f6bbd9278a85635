//! kvgate's contract layer (the "Sentinel"): who a request is (principals),
//! what its contract lets it do (contracts, rate limits), which cache it may
//! share (per-contract `cache_salt`), which body fields only kvgate may set,
//! and the tamper-evident audit log of it all. The gateway, the Envoy
//! endpoint picker and the KV chunk store use it through [`Sentinel`].
//!
//! Order of a request: [`Sentinel::authenticate`] (credential -> principal),
//! [`Sentinel::authorize`] (its contract: status, validity, model), then,
//! once its prompt tokens are known, [`Sentinel::admit`] (rate limits), which
//! yields the [`Admission`] held until the response ends.

pub mod audit;
pub mod config;
pub mod contract;
pub mod fields;
mod jwks;
pub mod limits;
pub mod paths;
pub mod principal;
mod reload;

use std::path::PathBuf;
use std::sync::Arc;

pub use config::{
    ApiKeySpec, AuthConfig, ClientCertSpec, ContractSpec, ContractStatus, ControlPlaneConfig,
    FieldPolicy, InFlightPolicy, Isolation, JwtConfig, KeyRef, Limits,
};
pub use contract::{Contract, ContractError, ContractRegistry, ReloadSummary, StatusChange};
pub use fields::FieldRefused;
pub use limits::{InFlight, LimitError};
pub use principal::{AuthError, AuthMethod, Principal};

use audit::{kind, AuditLog, AuditRecord};
use principal::Authenticator;

/// A config the contract layer cannot start with.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("api key or client certificate of contract {0:?}: sha256 must be 64 hex characters")]
    ApiKeyHash(String),
    #[error("api key or client certificate names unknown contract {0:?}")]
    ApiKeyContract(String),
    #[error("jwt algorithm {0:?} is not accepted (RS256/384/512, PS256/384/512, ES256/384, EdDSA, HS256/384/512)")]
    Algorithm(String),
    #[error("JWKS file {path}: {reason}")]
    Jwks { path: PathBuf, reason: String },
    #[error("contract id {0:?} is empty, repeated or unknown")]
    ContractId(String),
    #[error("contract {0:?} has no key and no master_key is configured")]
    NoKey(String),
    #[error("key material {source_name}: {reason}")]
    Key { source_name: String, reason: String },
    #[error("contracts state file {path}: {reason}")]
    StateFile { path: PathBuf, reason: String },
    #[error("limit {0} must be above 0 (leave it unset for no limit)")]
    ZeroLimit(&'static str),
    #[error("audit log: {0}")]
    Audit(#[from] audit::AuditError),
    #[error("contracts.{0} changed: it takes effect only at a restart (the running config stays)")]
    NeedsRestart(&'static str),
}

/// Why a request is refused by the contract layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("{0}")]
    Auth(#[from] AuthError),
    #[error("{0}")]
    Contract(#[from] ContractError),
    #[error("{0}")]
    Limit(#[from] LimitError),
    #[error("{0}")]
    Field(#[from] FieldRefused),
}

impl Denied {
    /// The HTTP status it is answered with.
    pub fn status(&self) -> u16 {
        match self {
            Denied::Auth(_) => 401,
            Denied::Contract(ContractError::ModelNotAllowed(_)) => 404,
            Denied::Contract(_) => 403,
            Denied::Limit(_) => 429,
            Denied::Field(_) => 400,
        }
    }

    /// OpenAI's error `code`.
    pub fn code(&self) -> &'static str {
        match self {
            Denied::Auth(_) => "invalid_api_key",
            Denied::Contract(e) => e.code(),
            Denied::Limit(e) => e.code(),
            Denied::Field(_) => "privileged_field",
        }
    }

    /// `Retry-After` seconds, for rate limits.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Denied::Limit(e) => Some(e.retry_after_secs()),
            _ => None,
        }
    }
}

pub struct Sentinel {
    /// Swapped whole by a reload (`reload.rs`).
    auth: parking_lot::RwLock<Arc<Authenticator>>,
    contracts: ContractRegistry,
    /// The settings a reload may not change (they need a restart).
    restart_only: reload::RestartOnly,
    isolation: Isolation,
    privileged_fields: FieldPolicy,
    lmcache_tag: bool,
    on_suspend: InFlightPolicy,
    pod_contract: Option<String>,
    audit: AuditLog,
}

/// The `service` label of the `sentinel_*` metrics our users' KEDA
/// triggers select on (gateway and store), unless configured.
pub const DEFAULT_SERVICE: &str = "kvgate";

/// The subject of requests under the pod's contract without credentials.
pub const POD_SUBJECT: &str = "pod";

/// A request whose contract admits it, before its rate limits.
pub struct Authorized {
    pub principal: Principal,
    pub contract: Arc<Contract>,
}

/// An admitted request: its contract, its salt, its concurrency slot.
pub struct Admission {
    pub principal: Principal,
    pub contract: Arc<Contract>,
    /// The contract's (or, under per-user isolation, the subject's) salt of
    /// the current epoch.
    pub cache_salt: String,
    cut_on_suspend: bool,
    _in_flight: InFlight,
}

impl Admission {
    /// Charges the response's output tokens to the contract's token bucket.
    pub fn charge_output(&self, output_tokens: u64) {
        self.contract.limits.charge_output(output_tokens);
    }

    /// Whether the response should be broken off now: its contract was
    /// suspended and the policy cuts responses in flight.
    pub fn cut(&self) -> bool {
        self.cut_on_suspend && self.contract.is_suspended()
    }
}

impl Sentinel {
    pub fn new(cfg: &AuthConfig) -> Result<Self, SetupError> {
        let contracts = ContractRegistry::new(cfg)?;
        Ok(Self {
            auth: parking_lot::RwLock::new(Arc::new(reload::authenticator(cfg)?)),
            contracts,
            restart_only: reload::RestartOnly::of(cfg),
            isolation: cfg.isolation,
            privileged_fields: cfg.privileged_fields,
            lmcache_tag: cfg.lmcache_tag,
            on_suspend: cfg.on_suspend,
            pod_contract: cfg.pod_contract.clone(),
            audit: AuditLog::start(&cfg.audit)?,
        })
    }

    /// Without credentials configured every request is anonymous: no
    /// contract, no salt, no limits (privileged fields are still dropped).
    pub fn enabled(&self) -> bool {
        self.auth.read().enabled() || self.pod_contract.is_some()
    }

    /// Fetches a JWKS URL's keys and keeps them fresh (call once, before
    /// serving; nothing to do without one).
    pub async fn start_key_refresh(&self) -> Result<(), SetupError> {
        let auth = self.auth.read().clone();
        auth.start_key_refresh().await
    }

    pub fn contracts(&self) -> &ContractRegistry {
        &self.contracts
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    pub fn privileged_fields(&self) -> FieldPolicy {
        self.privileged_fields
    }

    pub fn lmcache_tag(&self) -> bool {
        self.lmcache_tag
    }

    /// The principal behind an `Authorization` header value. Failures are
    /// audited here.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, Denied> {
        self.authenticate_with_cert(authorization, None)
    }

    /// As [`Self::authenticate`], on a connection that may carry a verified
    /// client certificate (the SHA-256 of its DER): see
    /// [`principal::Authenticator::authenticate_with_cert`].
    pub fn authenticate_with_cert(
        &self,
        authorization: Option<&str>,
        client_cert: Option<&[u8; 32]>,
    ) -> Result<Principal, Denied> {
        let auth = self.auth.read().clone();
        if let (false, Some(c)) = (auth.enabled(), &self.pod_contract) {
            return Ok(Principal {
                contract: c.clone(),
                subject: POD_SUBJECT.into(),
                method: AuthMethod::PodContract,
            });
        }
        auth.authenticate_with_cert(authorization, client_cert)
            .map_err(|e| {
                self.audit.record(
                    AuditRecord::new(kind::AUTH_FAILURE)
                        .status(401)
                        .reason(e.reason()),
                );
                e.into()
            })
    }

    /// The principal's contract, if it admits `model` now. Refusals are
    /// audited here.
    pub fn authorize(&self, principal: Principal, model: &str) -> Result<Authorized, Denied> {
        let admitted = match &self.pod_contract {
            Some(c) if *c != principal.contract => Err(ContractError::Unknown),
            _ => self.contracts.admit(&principal.contract, model, now_unix()),
        };
        match admitted {
            Ok(contract) => Ok(Authorized {
                contract,
                principal,
            }),
            Err(e) => {
                let denied = Denied::from(e);
                self.audit.record(
                    AuditRecord::new(kind::CONTRACT_REFUSED)
                        .contract(&principal.contract)
                        .subject(&principal.subject)
                        .model(model)
                        .status(denied.status())
                        .reason(denied.code()),
                );
                Err(denied)
            }
        }
    }

    /// The salt an authorized request's prompts are cached under.
    pub fn cache_salt(&self, a: &Authorized) -> String {
        a.contract.cache_salt(match self.isolation {
            Isolation::Contract => None,
            Isolation::User => Some(&a.principal.subject),
        })
    }

    /// Admits an authorized request of `prompt_tokens` under its contract's
    /// limits.
    pub fn admit(&self, a: Authorized, prompt_tokens: u64) -> Result<Admission, Denied> {
        match a.contract.limits.admit(prompt_tokens) {
            Ok(in_flight) => Ok(Admission {
                cache_salt: self.cache_salt(&a),
                cut_on_suspend: self.on_suspend == InFlightPolicy::Cut,
                principal: a.principal,
                contract: a.contract,
                _in_flight: in_flight,
            }),
            Err(e) => {
                self.audit.record(
                    AuditRecord::new(kind::RATE_LIMITED)
                        .contract(a.contract.id())
                        .subject(&a.principal.subject)
                        .status(429)
                        .prompt_tokens(prompt_tokens)
                        .reason(e.code()),
                );
                Err(e.into())
            }
        }
    }

    /// Suspends or reactivates a contract (admin API, control plane): new
    /// requests are refused at once and its salt epoch moves on.
    pub fn set_suspended(
        &self,
        id: &str,
        suspended: bool,
        actor: &str,
    ) -> Result<StatusChange, SetupError> {
        let change = self.contracts.set_suspended(id, suspended)?;
        self.audit.record(
            AuditRecord::new(if suspended {
                "suspension"
            } else {
                "reactivation"
            })
            .contract(id)
            .subject(actor)
            .reason(if change.changed {
                "changed"
            } else {
                "unchanged"
            }),
        );
        Ok(change)
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
