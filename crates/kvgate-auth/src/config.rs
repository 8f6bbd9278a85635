//! The contract layer's YAML config (`contracts:` in the gateway's config),
//! validated once by [`crate::Sentinel::new`].

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::audit::AuditConfig;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// API keys, by hash only. No keys and no JWT: no authentication, one
    /// shared anonymous tenant (for a fleet with no contracts at all).
    pub api_keys: Vec<ApiKeySpec>,
    /// Client certificates (mTLS: the listener's `tls.client_ca_file`), by
    /// the SHA-256 (hex) of their DER: a client presenting one is under its
    /// contract without a bearer token.
    pub client_certs: Vec<ClientCertSpec>,
    pub jwt: Option<JwtConfig>,
    pub contracts: Vec<ContractSpec>,
    /// The one contract this kvgate serves (the sidecar layout, `TB_CONTRACT_ID`):
    /// without credentials configured every request is under it; with them,
    /// a principal naming another contract is refused.
    pub pod_contract: Option<String>,
    /// Where contract status comes from besides this file and the admin API.
    pub control_plane: Option<ControlPlaneConfig>,
    /// Key material of contracts that name none of their own: each contract's
    /// is derived from it and the contract id (HKDF).
    pub master_key: Option<KeyRef>,
    /// Where suspensions and salt epochs are kept across restarts (JSON,
    /// rewritten atomically). Without it they last as long as the process,
    /// and a restart brings back each contract's configured epoch.
    pub state_file: Option<PathBuf>,
    pub isolation: Isolation,
    /// What happens to a client's engine-steering body fields
    /// ([`crate::fields::PRIVILEGED_FIELDS`]).
    pub privileged_fields: FieldPolicy,
    /// Also set the salt as LMCache's cache tag (`kv_transfer_params`), so an
    /// LMCache remote tier is scoped per contract too.
    pub lmcache_tag: bool,
    /// What happens to a suspended contract's responses in flight.
    pub on_suspend: InFlightPolicy,
    pub audit: AuditConfig,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            client_certs: Vec::new(),
            jwt: None,
            contracts: Vec::new(),
            pod_contract: None,
            control_plane: None,
            master_key: None,
            state_file: None,
            isolation: Isolation::default(),
            privileged_fields: FieldPolicy::default(),
            lmcache_tag: true,
            on_suspend: InFlightPolicy::default(),
            audit: AuditConfig::default(),
        }
    }
}

/// An API key, by its SHA-256 (hex) so the config file holds no secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeySpec {
    pub sha256: String,
    pub contract: String,
    /// Who within the contract (audit, per-user isolation); default: the
    /// key's hash prefix.
    #[serde(default)]
    pub subject: Option<String>,
}

/// A client certificate by the SHA-256 of its DER (`openssl x509 -in c.pem
/// -outform der | sha256sum`), with the same fields as an API key's: its
/// contract, and who within it (default: the fingerprint's prefix).
pub type ClientCertSpec = ApiKeySpec;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// A JWKS document (RFC 7517) in a file, re-read when it changes (`kid`
    /// rotation).
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// Or at a URL (the issuer's `jwks_uri`), fetched at start and refreshed.
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default = "default_jwks_refresh_secs")]
    pub jwks_refresh_secs: u64,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// The claim naming the contract.
    #[serde(default = "default_contract_claim")]
    pub contract_claim: String,
    #[serde(default = "default_subject_claim")]
    pub subject_claim: String,
    /// Accepted algorithms; `none` can never be listed.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    #[serde(default = "default_leeway_secs")]
    pub leeway_secs: u64,
}

/// Issuers rotate keys over days; five minutes bounds how long a new key
/// waits when no token has asked for it yet.
fn default_jwks_refresh_secs() -> u64 {
    300
}
fn default_contract_claim() -> String {
    "contract".into()
}
fn default_subject_claim() -> String {
    "sub".into()
}
fn default_algorithms() -> Vec<String> {
    ["RS256", "ES256", "EdDSA", "HS256"]
        .map(String::from)
        .into()
}
/// Clock skew allowed on `exp`/`nbf`.
fn default_leeway_secs() -> u64 {
    30
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContractSpec {
    pub id: String,
    #[serde(default)]
    pub status: ContractStatus,
    /// Validity window, unix seconds.
    #[serde(default)]
    pub not_before: Option<u64>,
    #[serde(default)]
    pub not_after: Option<u64>,
    /// Models (base names) it may use; empty: every model.
    #[serde(default)]
    pub models: Vec<String>,
    /// LoRA adapters it may use (as served model names); empty: none beyond
    /// `models`.
    #[serde(default)]
    pub loras: Vec<String>,
    #[serde(default)]
    pub limits: Limits,
    /// Its key material (cache salts derive from it); default: derived from
    /// the master key.
    #[serde(default)]
    pub key: Option<KeyRef>,
    /// The first salt epoch (a control plane may set it; suspension and
    /// reactivation move it on).
    #[serde(default)]
    pub salt_epoch: u64,
    /// vLLM `priority` for its requests (clients' are never used).
    #[serde(default)]
    pub priority: Option<i64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContractStatus {
    #[default]
    Active,
    Suspended,
}

/// Per-contract limits; unset is unlimited.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    /// Prompt tokens at admission plus output tokens from usage.
    pub tokens_per_minute: Option<u32>,
    pub max_concurrent: Option<u32>,
}

/// Where key material lives: never in the config itself. YAML:
/// `{file: /run/secrets/key}` or `{env: VAR}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "KeyRefRepr", into = "KeyRefRepr")]
pub enum KeyRef {
    /// A file (e.g. a mounted Kubernetes Secret); its bytes, trailing
    /// newline trimmed.
    File(PathBuf),
    /// An environment variable.
    Env(String),
}

/// [`KeyRef`] as YAML writes it (serde_yaml reads enums only as tags).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRefRepr {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    env: Option<String>,
}

impl TryFrom<KeyRefRepr> for KeyRef {
    type Error = &'static str;
    fn try_from(r: KeyRefRepr) -> Result<Self, Self::Error> {
        match (r.file, r.env) {
            (Some(f), None) => Ok(KeyRef::File(f)),
            (None, Some(e)) => Ok(KeyRef::Env(e)),
            _ => Err("a key is either {file: PATH} or {env: VAR}"),
        }
    }
}

impl From<KeyRef> for KeyRefRepr {
    fn from(k: KeyRef) -> Self {
        match k {
            KeyRef::File(f) => KeyRefRepr {
                file: Some(f),
                env: None,
            },
            KeyRef::Env(e) => KeyRefRepr {
                file: None,
                env: Some(e),
            },
        }
    }
}

/// Who shares a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// Everyone under one contract.
    #[default]
    Contract,
    /// Each subject within a contract alone.
    User,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldPolicy {
    /// Removed from the body (and audited).
    #[default]
    Drop,
    /// The request is refused with 400.
    Refuse,
}

impl AuthConfig {
    /// One active, unlimited contract per `(api key, contract)` pair, keys
    /// derived from `master_key`: the smallest contract setup.
    pub fn for_api_keys(keys: &[(&str, &str)], master_key: KeyRef) -> Self {
        let mut contracts: Vec<ContractSpec> = Vec::new();
        for (_, c) in keys {
            if !contracts.iter().any(|s| s.id == *c) {
                contracts.push(ContractSpec::active(c));
            }
        }
        Self {
            api_keys: keys
                .iter()
                .map(|(k, c)| ApiKeySpec {
                    sha256: crate::principal::api_key_sha256(k),
                    contract: c.to_string(),
                    subject: None,
                })
                .collect(),
            contracts,
            master_key: Some(master_key),
            ..Self::default()
        }
    }
}

impl ContractSpec {
    /// An active contract with no limits, window or model restriction.
    pub fn active(id: &str) -> Self {
        Self {
            id: id.to_string(),
            status: ContractStatus::Active,
            not_before: None,
            not_after: None,
            models: Vec::new(),
            loras: Vec::new(),
            limits: Limits::default(),
            key: None,
            salt_epoch: 0,
            priority: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InFlightPolicy {
    /// Broken off at their next chunk.
    #[default]
    Cut,
    /// Left to finish.
    Drain,
}

/// An HTTP control plane polled for each contract's status (a dataspace
/// connector such as EDC plugs in here): `GET {url}/contracts/{id}` answers
/// `{"id": "...", "status": "active" | "suspended" | "expired" | "terminated"}`
/// (other fields ignored); anything but `active` suspends the contract.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlPlaneConfig {
    pub url: String,
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// A bearer token for the control plane, from a file.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// Twice a second: a suspension at the control plane takes effect within 1 s.
pub const DEFAULT_CONTROL_PLANE_POLL_MS: u64 = 500;

fn default_poll_ms() -> u64 {
    DEFAULT_CONTROL_PLANE_POLL_MS
}
