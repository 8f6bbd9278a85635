//! The contracts of the tier's isolation checks: two authenticated by JWT
//! (EdDSA and RS256, the fixture keys in `fixtures/auth/`) and one by API
//! key, and the admin token that suspends them.

use std::path::Path;

use anyhow::{Context, Result};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use kvgate_auth::{AuthConfig, ContractSpec, JwtConfig, KeyRef};

pub(crate) const ADMIN_TOKEN: &str = "kvgate-e2e admin token";
pub(crate) const API_KEY_C: &str = "key-c";
const ISSUER: &str = "https://idp.kvgate-e2e";
const AUDIENCE: &str = "kvgate";

pub(crate) struct Credentials {
    /// Bearer tokens of tenant-a (EdDSA) and tenant-b (RS256).
    pub(crate) jwt_a: String,
    pub(crate) jwt_b: String,
    /// Another subject of tenant-a (the timing probe's colleague).
    pub(crate) jwt_a_colleague: String,
}

fn fixtures() -> Result<std::path::PathBuf> {
    std::fs::canonicalize("fixtures/auth").context("fixtures/auth (run from the repo root)")
}

pub(crate) fn config(work: &Path) -> Result<(AuthConfig, Credentials)> {
    let master_key = work.join("contracts-master.key");
    std::fs::write(&master_key, "kvgate-e2e master key material")?;
    let mut cfg = AuthConfig::for_api_keys(&[(API_KEY_C, "tenant-c")], KeyRef::File(master_key));
    cfg.contracts.push(ContractSpec::active("tenant-a"));
    cfg.contracts.push(ContractSpec::active("tenant-b"));
    let dir = fixtures()?;
    cfg.jwt = Some(JwtConfig {
        jwks_file: Some(dir.join("jwks.json")),
        jwks_url: None,
        jwks_refresh_secs: 300,
        issuer: Some(ISSUER.into()),
        audience: Some(AUDIENCE.into()),
        contract_claim: "contract".into(),
        subject_claim: "sub".into(),
        algorithms: vec!["EdDSA".into(), "RS256".into()],
        leeway_secs: 30,
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let token = |alg: Algorithm, kid: &str, key: EncodingKey, contract: &str, sub: &str| {
        let mut h = Header::new(alg);
        h.kid = Some(kid.into());
        let claims = serde_json::json!({"iss": ISSUER, "aud": AUDIENCE, "sub": sub,
            "contract": contract, "exp": now + 3600});
        encode(&h, &claims, &key).context("signing a test token")
    };
    let ed = EncodingKey::from_ed_pem(&std::fs::read(dir.join("ed25519.pem"))?)?;
    let colleague = token(Algorithm::EdDSA, "ed-1", ed.clone(), "tenant-a", "carol")?;
    let rsa = EncodingKey::from_rsa_pem(&std::fs::read(dir.join("rsa.pem"))?)?;
    Ok((
        cfg,
        Credentials {
            jwt_a: token(Algorithm::EdDSA, "ed-1", ed, "tenant-a", "alice")?,
            jwt_b: token(Algorithm::RS256, "rsa-1", rsa, "tenant-b", "bob")?,
            jwt_a_colleague: colleague,
        },
    ))
}

/// Suspends and reactivates `contract` through the admin API.
pub(crate) async fn suspend_and_reactivate(
    http: &reqwest::Client,
    gateway: &str,
    contract: &str,
) -> Result<()> {
    for action in ["suspend", "activate"] {
        http.post(format!(
            "{gateway}{}/{contract}/{action}",
            kvgate_gateway::admin::ADMIN_CONTRACTS_PATH
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await?
        .error_for_status()
        .with_context(|| format!("admin {action} {contract}"))?;
    }
    Ok(())
}
