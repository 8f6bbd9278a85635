//! Tenants and their cache isolation. A request's tenant comes from its API
//! key; its `cache_salt` is derived from the tenant and a secret, never taken
//! from the client, so no tenant can hit (or probe) another's cached prefixes.

use std::collections::BTreeMap;

use crate::config::TenancyConfig;

pub struct Tenancy {
    keys: BTreeMap<String, String>,
    salt_key: [u8; 32],
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("missing API key (Authorization: Bearer ...)")]
    Missing,
    #[error("invalid API key")]
    Invalid,
}

/// Domain separation for salt derivation.
const SALT_CONTEXT: &str = "kvgate 2026-11 tenant cache salt v1";

impl Tenancy {
    pub fn new(cfg: &TenancyConfig, random_secret: [u8; 32]) -> Self {
        let secret: Vec<u8> = match &cfg.salt_secret {
            Some(s) => s.as_bytes().to_vec(),
            None => random_secret.to_vec(),
        };
        Self {
            keys: cfg.api_keys.clone(),
            salt_key: blake3::derive_key(SALT_CONTEXT, &secret),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The tenant of a request from its `Authorization` header value.
    /// Without configured keys every request is the anonymous shared tenant.
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Option<String>, AuthError> {
        if !self.enabled() {
            return Ok(None);
        }
        let key = authorization
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or(AuthError::Missing)?;
        self.keys
            .get(key)
            .cloned()
            .map(Some)
            .ok_or(AuthError::Invalid)
    }

    /// vLLM `cache_salt` for a tenant: 32 hex chars (no `@`, `/`, `\`), keyed so
    /// it cannot be guessed from the tenant's name.
    pub fn cache_salt(&self, tenant: &str) -> String {
        let h = blake3::keyed_hash(&self.salt_key, tenant.as_bytes());
        hex::encode(&h.as_bytes()[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_tenants_and_salts_differ() {
        let cfg = TenancyConfig {
            api_keys: [
                ("k1".to_string(), "acme".to_string()),
                ("k2".to_string(), "globex".to_string()),
            ]
            .into(),
            salt_secret: Some("s".into()),
        };
        let t = Tenancy::new(&cfg, [0; 32]);
        assert_eq!(t.authenticate(Some("Bearer k1")), Ok(Some("acme".into())));
        assert_eq!(t.authenticate(Some("Bearer nope")), Err(AuthError::Invalid));
        assert_eq!(t.authenticate(None), Err(AuthError::Missing));
        assert_eq!(t.authenticate(Some("Basic k1")), Err(AuthError::Missing));
        let a = t.cache_salt("acme");
        assert_eq!(a.len(), 32);
        assert_ne!(a, t.cache_salt("globex"));
        assert_eq!(
            a,
            Tenancy::new(&cfg, [9; 32]).cache_salt("acme"),
            "configured secret wins"
        );
        let other = Tenancy::new(
            &TenancyConfig {
                salt_secret: Some("t".into()),
                ..cfg
            },
            [0; 32],
        );
        assert_ne!(a, other.cache_salt("acme"));
        let open = Tenancy::new(&TenancyConfig::default(), [0; 32]);
        assert_eq!(open.authenticate(None), Ok(None));
    }
}
