//! Who is asking: an `Authorization: Bearer` API key (matched by SHA-256 in
//! constant time) or a JWT (verified against a JWKS file, re-read when it
//! changes). Either names a contract and a subject within it.

use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet};

use crate::jwks::Jwks;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{ApiKeySpec, ClientCertSpec, JwtConfig};
use crate::SetupError;

/// Longer bearer values are refused before any parsing.
pub const MAX_BEARER_BYTES: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub contract: String,
    pub subject: String,
    pub method: AuthMethod,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ApiKey,
    Jwt,
    /// No credential: the pod's one contract (sidecar layout).
    PodContract,
    /// A client certificate the listener verified (mTLS).
    ClientCert,
}

/// Why a request has no principal. Messages never echo the credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing credentials (Authorization: Bearer ...)")]
    Missing,
    #[error("the Authorization header must be 'Bearer <token>'")]
    NotBearer,
    #[error("bearer token is longer than {MAX_BEARER_BYTES} bytes")]
    Oversized,
    #[error("invalid API key")]
    InvalidApiKey,
    #[error("invalid token: {0}")]
    InvalidToken(&'static str),
    #[error("token algorithm is not accepted")]
    DisallowedAlgorithm,
    #[error("token signed with a key of another type than its algorithm")]
    KeyConfusion,
    #[error("token signed by an unknown key")]
    UnknownKey,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token issuer is not accepted")]
    WrongIssuer,
    #[error("token audience is not accepted")]
    WrongAudience,
    #[error("token has no string claim '{0}'")]
    MissingClaim(String),
    #[error("the client certificate is not registered to a contract")]
    UnknownClientCert,
    #[error("the bearer token and the client certificate name different contracts")]
    CertificateMismatch,
}

impl AuthError {
    /// A short, stable name (audit records, metrics labels).
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::NotBearer => "not_bearer",
            AuthError::Oversized => "oversized",
            AuthError::InvalidApiKey => "invalid_api_key",
            AuthError::InvalidToken(_) => "invalid_token",
            AuthError::DisallowedAlgorithm => "disallowed_algorithm",
            AuthError::KeyConfusion => "key_confusion",
            AuthError::UnknownKey => "unknown_key",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::MissingClaim(_) => "missing_claim",
            AuthError::UnknownClientCert => "unknown_client_cert",
            AuthError::CertificateMismatch => "certificate_mismatch",
        }
    }
}

pub struct Authenticator {
    api_keys: Vec<KeyEntry>,
    client_certs: Vec<KeyEntry>,
    jwt: Option<JwtVerifier>,
}

struct KeyEntry {
    sha256: [u8; 32],
    contract: String,
    subject: String,
}

impl Authenticator {
    /// Fetches a JWKS URL's keys before the first request and keeps them
    /// fresh in the background (nothing to do for a file or no JWT).
    pub async fn start_key_refresh(&self) -> Result<(), SetupError> {
        match &self.jwt {
            Some(j) => j.jwks.start_refresh().await,
            None => Ok(()),
        }
    }

    pub fn new(api_keys: &[ApiKeySpec], jwt: Option<&JwtConfig>) -> Result<Self, SetupError> {
        let api_keys = entries(api_keys, "key")?;
        let jwt = jwt.map(JwtVerifier::new).transpose()?;
        Ok(Self {
            api_keys,
            client_certs: Vec::new(),
            jwt,
        })
    }

    /// Also maps these client certificates to their contracts.
    pub fn with_client_certs(mut self, certs: &[ClientCertSpec]) -> Result<Self, SetupError> {
        self.client_certs = entries(certs, "cert")?;
        Ok(self)
    }

    /// Whether any credential is configured (else requests are anonymous).
    pub fn enabled(&self) -> bool {
        !self.api_keys.is_empty() || !self.client_certs.is_empty() || self.jwt.is_some()
    }

    /// The principal of a request: its bearer credential if it has one,
    /// else its connection's client certificate (the SHA-256 of its DER).
    /// With both, they must name the same contract.
    pub fn authenticate_with_cert(
        &self,
        authorization: Option<&str>,
        client_cert: Option<&[u8; 32]>,
    ) -> Result<Principal, AuthError> {
        let cert = client_cert.and_then(|fp| self.client_cert(fp));
        match (authorization, cert) {
            (None, Some(p)) => Ok(p),
            (None, None) if client_cert.is_some() => Err(AuthError::UnknownClientCert),
            (authorization, cert) => {
                let p = self.authenticate(authorization)?;
                match cert {
                    Some(c) if c.contract != p.contract => Err(AuthError::CertificateMismatch),
                    _ => Ok(p),
                }
            }
        }
    }

    fn client_cert(&self, fingerprint: &[u8; 32]) -> Option<Principal> {
        // Fingerprints are not secret: a plain lookup.
        self.client_certs
            .iter()
            .find(|e| e.sha256 == *fingerprint)
            .map(|e| Principal {
                contract: e.contract.clone(),
                subject: e.subject.clone(),
                method: AuthMethod::ClientCert,
            })
    }

    /// The principal of an `Authorization` header value.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        let value = authorization.ok_or(AuthError::Missing)?;
        if value.len() > MAX_BEARER_BYTES + 7 {
            return Err(AuthError::Oversized);
        }
        let (scheme, token) = value.split_once(' ').ok_or(AuthError::NotBearer)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(AuthError::NotBearer);
        }
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_BEARER_BYTES {
            return Err(AuthError::Oversized);
        }
        match &self.jwt {
            Some(jwt) if looks_like_jwt(token) => jwt.verify(token),
            _ => self.api_key(token),
        }
    }

    fn api_key(&self, key: &str) -> Result<Principal, AuthError> {
        let presented: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        // Every entry is compared, so timing says nothing of which matched.
        let mut found: Option<&KeyEntry> = None;
        for entry in &self.api_keys {
            if bool::from(entry.sha256.ct_eq(&presented)) {
                found = Some(entry);
            }
        }
        found
            .map(|e| Principal {
                contract: e.contract.clone(),
                subject: e.subject.clone(),
                method: AuthMethod::ApiKey,
            })
            .ok_or(AuthError::InvalidApiKey)
    }
}

/// API keys or client certificates by hash, each with its contract and
/// subject (default: `<kind>-` and the hash's first 8 hex digits).
fn entries(specs: &[ApiKeySpec], kind: &str) -> Result<Vec<KeyEntry>, SetupError> {
    specs
        .iter()
        .map(|k| {
            let mut sha256 = [0u8; 32];
            hex::decode_to_slice(k.sha256.trim(), &mut sha256)
                .map_err(|_| SetupError::ApiKeyHash(k.contract.clone()))?;
            Ok(KeyEntry {
                sha256,
                contract: k.contract.clone(),
                subject: k
                    .subject
                    .clone()
                    .unwrap_or_else(|| format!("{kind}-{}", &k.sha256.trim()[..8])),
            })
        })
        .collect()
}

/// Whether an `Authorization` header value is `Bearer <token>` for the
/// token whose SHA-256 is `expected` (compared in constant time): the check
/// of the admin listeners' tokens, which name no contract.
pub fn bearer_matches(authorization: Option<&str>, expected: &[u8; 32]) -> bool {
    authorization
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| -> [u8; 32] { Sha256::digest(t.trim().as_bytes()).into() })
        .is_some_and(|p| bool::from(p.ct_eq(expected)))
}

/// What the config holds for an API key: its SHA-256, hex.
pub fn api_key_sha256(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Three base64url segments, the first a JSON object (`eyJ` = `{"`).
fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.split('.').count() == 3
}

struct JwtVerifier {
    cfg: JwtConfig,
    algorithms: Vec<Algorithm>,
    jwks: Jwks,
}

impl JwtVerifier {
    fn new(cfg: &JwtConfig) -> Result<Self, SetupError> {
        let algorithms = cfg
            .algorithms
            .iter()
            .map(|a| {
                a.parse::<Algorithm>()
                    .map_err(|_| SetupError::Algorithm(a.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if algorithms.is_empty() {
            return Err(SetupError::Algorithm("(none listed)".into()));
        }
        Ok(Self {
            jwks: Jwks::new(cfg)?,
            algorithms,
            cfg: cfg.clone(),
        })
    }

    fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        // `alg: none` and unknown algorithms fail to parse here.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::InvalidToken("malformed header"))?;
        if !self.algorithms.contains(&header.alg) {
            return Err(AuthError::DisallowedAlgorithm);
        }
        let mut set = self.jwks.current(false);
        if let Err(AuthError::UnknownKey) = pick_key(&set, header.kid.as_deref(), header.alg) {
            set = self.jwks.current(true);
        }
        let jwk = pick_key(&set, header.kid.as_deref(), header.alg)?;
        let key = DecodingKey::from_jwk(jwk).map_err(|_| AuthError::UnknownKey)?;
        let mut v = Validation::new(header.alg);
        v.algorithms = vec![header.alg];
        v.leeway = self.cfg.leeway_secs;
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp"]);
        match &self.cfg.audience {
            Some(a) => v.set_audience(&[a]),
            None => v.validate_aud = false,
        }
        if let Some(i) = &self.cfg.issuer {
            v.set_issuer(&[i]);
        }
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &v)
            .map_err(|e| jwt_error(e.kind()))?;
        let claim = |name: &str| {
            data.claims
                .get(name)
                .and_then(serde_json::Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .ok_or_else(|| AuthError::MissingClaim(name.to_string()))
        };
        Ok(Principal {
            contract: claim(&self.cfg.contract_claim)?,
            subject: claim(&self.cfg.subject_claim)?,
            method: AuthMethod::Jwt,
        })
    }
}

/// The key a token names: by `kid`, or the only key of its algorithm's type.
/// A key's type (and its `alg`, when stated) must match the token's
/// algorithm: an RSA public key is never used as an HMAC secret.
fn pick_key<'a>(set: &'a JwkSet, kid: Option<&str>, alg: Algorithm) -> Result<&'a Jwk, AuthError> {
    let fits = |k: &Jwk| {
        let type_fits = matches!(
            (&k.algorithm, alg),
            (
                AlgorithmParameters::RSA(_),
                Algorithm::RS256
                    | Algorithm::RS384
                    | Algorithm::RS512
                    | Algorithm::PS256
                    | Algorithm::PS384
                    | Algorithm::PS512
            ) | (
                AlgorithmParameters::EllipticCurve(_),
                Algorithm::ES256 | Algorithm::ES384
            ) | (AlgorithmParameters::OctetKeyPair(_), Algorithm::EdDSA)
                | (
                    AlgorithmParameters::OctetKey(_),
                    Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
                )
        );
        let alg_fits = k
            .common
            .key_algorithm
            .is_none_or(|ka| format!("{ka:?}") == format!("{alg:?}"));
        type_fits && alg_fits
    };
    match kid {
        Some(kid) => {
            let k = set
                .keys
                .iter()
                .find(|k| k.common.key_id.as_deref() == Some(kid))
                .ok_or(AuthError::UnknownKey)?;
            if fits(k) {
                Ok(k)
            } else {
                Err(AuthError::KeyConfusion)
            }
        }
        None => {
            let mut matching = set.keys.iter().filter(|k| fits(k));
            match (matching.next(), matching.next()) {
                (Some(k), None) => Ok(k),
                _ => Err(AuthError::UnknownKey),
            }
        }
    }
}

fn jwt_error(kind: &jsonwebtoken::errors::ErrorKind) -> AuthError {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::ExpiredSignature => AuthError::Expired,
        K::ImmatureSignature => AuthError::NotYetValid,
        K::InvalidIssuer => AuthError::WrongIssuer,
        K::InvalidAudience => AuthError::WrongAudience,
        K::InvalidAlgorithm | K::InvalidAlgorithmName => AuthError::DisallowedAlgorithm,
        K::InvalidSignature => AuthError::InvalidToken("bad signature"),
        K::MissingRequiredClaim(_) => AuthError::InvalidToken("missing exp"),
        _ => AuthError::InvalidToken("malformed"),
    }
}
