#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! A new contracts config applied to a running `Sentinel`: contracts added,
//! removed, updated, re-keyed and re-statused by id; credentials swapped;
//! restart-only settings and broken configs refused with nothing changed.

use kvgate_auth::{
    AuthConfig, AuthError, ContractError, ContractSpec, ContractStatus, Denied, Isolation, KeyRef,
    Limits, Sentinel,
};

fn key_file(dir: &tempfile::TempDir, name: &str, material: &str) -> KeyRef {
    let p = dir.path().join(name);
    std::fs::write(&p, material).unwrap();
    KeyRef::File(p)
}

fn config(dir: &tempfile::TempDir, keys: &[(&str, &str)]) -> AuthConfig {
    let mut cfg = AuthConfig::for_api_keys(
        keys,
        key_file(dir, "master", "master key material, 32 bytes!!"),
    );
    cfg.state_file = Some(dir.path().join("state.json"));
    cfg.audit.path = Some(dir.path().join("audit.jsonl"));
    cfg
}

fn salt(s: &Sentinel, key: &str) -> Result<String, Denied> {
    let p = s.authenticate(Some(&format!("Bearer {key}")))?;
    let a = s.authorize(p, "m")?;
    Ok(s.admit(a, 10)?.cache_salt)
}

fn spec<'a>(cfg: &'a mut AuthConfig, id: &str) -> &'a mut ContractSpec {
    cfg.contracts.iter_mut().find(|c| c.id == id).unwrap()
}

#[tokio::test]
async fn contracts_and_credentials_are_reconciled_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let s = Sentinel::new(&config(&dir, &[("ka", "acme"), ("kb", "globex")])).unwrap();
    let acme = salt(&s, "ka").unwrap();
    let globex_contract = s.contracts().get("globex").unwrap();

    // Unchanged: nothing to do, the same salt.
    let same = s
        .reload(&config(&dir, &[("ka", "acme"), ("kb", "globex")]), "test")
        .await
        .unwrap();
    assert!(same.is_empty(), "{same:?}");
    assert_eq!(salt(&s, "ka").unwrap(), acme);

    // globex goes (its key with it), initech comes, acme gets a limit.
    let mut next = config(&dir, &[("ka", "acme"), ("ki", "initech")]);
    spec(&mut next, "acme").limits = Limits {
        requests_per_minute: Some(1),
        ..Limits::default()
    };
    let summary = s.reload(&next, "test").await.unwrap();
    assert_eq!(summary.added, ["initech"]);
    assert_eq!(summary.removed, ["globex"]);
    assert_eq!(summary.updated, ["acme"]);
    assert_eq!(salt(&s, "kb"), Err(Denied::Auth(AuthError::InvalidApiKey)));
    assert!(
        globex_contract.is_suspended(),
        "in flight under a removed contract: cut"
    );
    assert_eq!(
        salt(&s, "ka").unwrap(),
        acme,
        "a spec change keeps the epoch"
    );
    assert!(
        matches!(salt(&s, "ka"), Err(Denied::Limit(_))),
        "the new limit applies"
    );
    assert!(salt(&s, "ki").is_ok());

    // New key material for acme: a new epoch, so a new salt.
    let mut rekeyed = next.clone();
    spec(&mut rekeyed, "acme").key = Some(key_file(&dir, "acme.key", "acme's own key material"));
    spec(&mut rekeyed, "acme").limits = Limits::default();
    let summary = s.reload(&rekeyed, "test").await.unwrap();
    assert_eq!(summary.rekeyed, ["acme"]);
    let acme2 = salt(&s, "ka").unwrap();
    assert_ne!(acme2, acme);

    // `status:` in the config suspends, and reactivates with a fresh epoch.
    let mut suspended = rekeyed.clone();
    spec(&mut suspended, "acme").status = ContractStatus::Suspended;
    assert_eq!(
        s.reload(&suspended, "test").await.unwrap().status_changed,
        ["acme"]
    );
    assert_eq!(
        salt(&s, "ka"),
        Err(Denied::Contract(ContractError::Suspended))
    );
    assert_eq!(
        s.reload(&rekeyed, "test").await.unwrap().status_changed,
        ["acme"]
    );
    let acme3 = salt(&s, "ka").unwrap();
    assert_ne!(acme3, acme2);

    // Refused whole, nothing changed: a restart-only setting, a key for a
    // contract that does not exist, a contract without key material.
    let mut isolation = rekeyed.clone();
    isolation.isolation = Isolation::User;
    let mut orphan_key = rekeyed.clone();
    orphan_key.api_keys[0].contract = "nobody".into();
    let mut keyless = rekeyed.clone();
    keyless.master_key = None;
    for (bad, says) in [
        (isolation, "isolation"),
        (orphan_key, "nobody"),
        (keyless, "no key"),
    ] {
        let e = s.reload(&bad, "test").await.unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
        assert_eq!(salt(&s, "ka").unwrap(), acme3);
        assert!(salt(&s, "ki").is_ok());
    }

    // Every reload is audited, with what it touched; never a key or salt.
    s.audit().flush().unwrap();
    let log = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let reloads: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"config_reload\""))
        .collect();
    assert_eq!(reloads.len(), 8, "{log}");
    assert!(reloads[1].contains("initech") && reloads[1].contains("globex"));
    assert!(!log.contains(&acme3) && !log.contains("acme's own key material"));

    // The epochs survive a restart.
    drop(s);
    let s = Sentinel::new(&rekeyed).unwrap();
    assert_eq!(salt(&s, "ka").unwrap(), acme3);
}
