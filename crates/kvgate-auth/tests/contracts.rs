#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Contracts through the `Sentinel`: admission, salts and their epochs,
//! suspension (persisted), and the rate limits.

use kvgate_auth::{
    AuthConfig, ContractError, ContractSpec, Denied, Isolation, KeyRef, LimitError, Limits,
    Sentinel,
};

fn key_file(dir: &tempfile::TempDir, name: &str, material: &str) -> KeyRef {
    let p = dir.path().join(name);
    std::fs::write(&p, material).unwrap();
    KeyRef::File(p)
}

fn config(dir: &tempfile::TempDir) -> AuthConfig {
    let mut cfg = AuthConfig::for_api_keys(
        &[("ka", "acme"), ("kb", "globex"), ("kc", "acme")],
        key_file(dir, "master", "master key material, 32 bytes!!"),
    );
    cfg.state_file = Some(dir.path().join("state.json"));
    cfg
}

fn salt(s: &Sentinel, key: &str, model: &str) -> Result<String, Denied> {
    let p = s.authenticate(Some(&format!("Bearer {key}")))?;
    let a = s.authorize(p, model)?;
    Ok(s.admit(a, 10)?.cache_salt)
}

#[tokio::test]
async fn salts_separate_contracts_and_move_with_the_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let s = Sentinel::new(&config(&dir)).unwrap();
    let a1 = salt(&s, "ka", "m").unwrap();
    assert_eq!(a1.len(), 32);
    assert_eq!(a1, salt(&s, "kc", "m").unwrap(), "one contract, one salt");
    assert_ne!(a1, salt(&s, "kb", "m").unwrap());

    s.set_suspended("acme", true, "test").unwrap();
    assert_eq!(
        salt(&s, "ka", "m"),
        Err(Denied::Contract(ContractError::Suspended))
    );
    assert!(salt(&s, "kb", "m").is_ok(), "other contracts unaffected");
    let back = s.set_suspended("acme", false, "test").unwrap();
    assert!(back.changed);
    let a2 = salt(&s, "ka", "m").unwrap();
    assert_ne!(a1, a2, "reactivation starts a fresh epoch");

    // The epoch survives a restart (state file), so the old salt never returns.
    drop(s);
    let s = Sentinel::new(&config(&dir)).unwrap();
    assert_eq!(salt(&s, "ka", "m").unwrap(), a2);
    // Another master key: other salts.
    let mut other = config(&dir);
    other.master_key = Some(key_file(&dir, "master2", "another master key, 32 bytes!!!"));
    let s2 = Sentinel::new(&other).unwrap();
    assert_ne!(salt(&s2, "ka", "m").unwrap(), a2);
}

#[tokio::test]
async fn per_user_isolation_and_the_contract_window_and_models() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.isolation = Isolation::User;
    let s = Sentinel::new(&cfg).unwrap();
    assert_ne!(salt(&s, "ka", "m").unwrap(), salt(&s, "kc", "m").unwrap());

    let mut cfg = config(&dir);
    cfg.state_file = None;
    cfg.contracts[0].models = vec!["base".into()];
    cfg.contracts[0].loras = vec!["base-lora".into()];
    cfg.contracts[1].not_after = Some(1);
    let s = Sentinel::new(&cfg).unwrap();
    assert!(salt(&s, "ka", "base").is_ok());
    assert!(salt(&s, "ka", "base-lora").is_ok());
    assert_eq!(
        salt(&s, "ka", "other").unwrap_err().status(),
        404,
        "a model outside the contract"
    );
    assert_eq!(
        salt(&s, "kb", "base"),
        Err(Denied::Contract(ContractError::Expired))
    );
}

#[tokio::test]
async fn rate_limits_answer_429_with_a_retry_time() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.contracts[0].limits = Limits {
        requests_per_minute: Some(2),
        tokens_per_minute: None,
        max_concurrent: None,
    };
    cfg.contracts[1].limits = Limits {
        requests_per_minute: None,
        tokens_per_minute: Some(100),
        max_concurrent: Some(1),
    };
    let s = Sentinel::new(&cfg).unwrap();
    assert!(salt(&s, "ka", "m").is_ok());
    assert!(salt(&s, "ka", "m").is_ok());
    let e = salt(&s, "ka", "m").unwrap_err();
    assert!(
        matches!(e, Denied::Limit(LimitError::Requests { .. })),
        "{e:?}"
    );
    assert_eq!(e.status(), 429);
    assert!((1..=30).contains(&e.retry_after_secs().unwrap()));

    let admit = |tokens: u64| {
        let p = s.authenticate(Some("Bearer kb")).unwrap();
        let a = s.authorize(p, "m").unwrap();
        s.admit(a, tokens)
    };
    let held = admit(60).unwrap();
    assert!(matches!(
        admit(1),
        Err(Denied::Limit(LimitError::Concurrency))
    ));
    held.charge_output(30);
    drop(held);
    // 60 prompt + 30 output of 100 used: 20 more do not fit.
    assert!(matches!(
        admit(20),
        Err(Denied::Limit(LimitError::Tokens { .. }))
    ));
    assert!(admit(5).is_ok());
    assert!(matches!(
        admit(500),
        Err(Denied::Limit(LimitError::TooLarge { .. }))
    ));
}

#[test]
fn bad_configs_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let mut cfg = config(&dir);
    cfg.api_keys[0].contract = "nobody".into();
    assert!(Sentinel::new(&cfg).is_err());
    let mut cfg = config(&dir);
    cfg.master_key = None;
    assert!(Sentinel::new(&cfg)
        .err()
        .unwrap()
        .to_string()
        .contains("no key"));
    let mut cfg = config(&dir);
    cfg.contracts.push(ContractSpec::active("acme"));
    assert!(Sentinel::new(&cfg).is_err(), "repeated id");
    let mut cfg = config(&dir);
    cfg.master_key = Some(key_file(&dir, "short", "short"));
    let e = Sentinel::new(&cfg).err().unwrap().to_string();
    assert!(
        e.contains("at least 16 bytes") && !e.contains("short\""),
        "{e}"
    );
    let mut cfg = config(&dir);
    cfg.contracts[0].limits.requests_per_minute = Some(0);
    assert!(Sentinel::new(&cfg).is_err());
    let mut cfg = config(&dir);
    cfg.api_keys[0].sha256 = "zz".into();
    assert!(Sentinel::new(&cfg).is_err());
}

/// The README's config, and the gateway's config written as JSON (the
/// real-vLLM tier does that), parse as YAML.
#[test]
fn configs_parse_as_written_in_yaml_and_json() {
    let yaml = r#"
master_key: {file: /run/secrets/kvgate-master}
state_file: /var/lib/kvgate/contracts.json
api_keys: [{sha256: "00000000000000000000000000000000000000000000000000000000000000aa", contract: acme}]
contracts:
  - {id: acme, models: [llama], limits: {requests_per_minute: 600, max_concurrent: 32}, key: {env: ACME_KEY}}
jwt: {jwks_file: /etc/kvgate/jwks.json, issuer: https://idp, audience: kvgate}
control_plane: {url: "http://edc:8181/api"}
audit: {path: /var/log/kvgate/audit.jsonl, fsync: {interval_ms: 200}}
privileged_fields: refuse
isolation: user
"#;
    let cfg: AuthConfig = serde_yaml::from_str(yaml).unwrap();
    assert_eq!(
        cfg.master_key,
        Some(KeyRef::File("/run/secrets/kvgate-master".into()))
    );
    assert_eq!(cfg.contracts[0].key, Some(KeyRef::Env("ACME_KEY".into())));
    assert_eq!(cfg.contracts[0].limits.max_concurrent, Some(32));
    assert_eq!(cfg.control_plane.as_ref().unwrap().poll_ms, 500);
    let json = serde_json::to_string(&cfg).unwrap();
    let back: AuthConfig = serde_yaml::from_str(&json).unwrap();
    assert_eq!(back, cfg);
    let both: Result<AuthConfig, _> = serde_yaml::from_str("master_key: {file: a, env: B}");
    assert!(both.is_err());
}
