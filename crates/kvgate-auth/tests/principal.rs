#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Principals against real signatures: JWTs of every accepted algorithm made
//! with the fixture keys, and each way a token can be bad.

use std::path::PathBuf;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use kvgate_auth::principal::{api_key_sha256, AuthError, AuthMethod, Authenticator};
use kvgate_auth::{ApiKeySpec, JwtConfig};
use serde_json::json;
mod support;
use support::{fixture, now, read};

fn jwt_config(jwks: PathBuf) -> JwtConfig {
    serde_yaml::from_str::<JwtConfig>(&format!(
        "{{jwks_file: {}, issuer: https://idp.example, audience: kvgate}}",
        jwks.display()
    ))
    .unwrap()
}

fn authenticator() -> Authenticator {
    Authenticator::new(
        &[ApiKeySpec {
            sha256: api_key_sha256("sk-acme-1"),
            contract: "acme".into(),
            subject: Some("svc".into()),
        }],
        Some(&jwt_config(fixture("jwks.json"))),
    )
    .unwrap()
}

fn claims() -> serde_json::Value {
    json!({"iss": "https://idp.example", "aud": "kvgate", "sub": "alice",
        "contract": "globex", "exp": now() + 600, "nbf": now() - 10})
}

fn token(alg: Algorithm, kid: Option<&str>, claims: &serde_json::Value) -> String {
    let key = match alg {
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&read("ed25519.pem")).unwrap(),
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&read("rsa.pem")).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&read("ec.pem")).unwrap(),
        _ => EncodingKey::from_secret(&read("hs256.secret")),
    };
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_string);
    encode(&h, claims, &key).unwrap()
}

fn bearer(t: &str) -> String {
    format!("Bearer {t}")
}

#[test]
fn every_accepted_algorithm_names_its_contract() {
    let a = authenticator();
    for (alg, kid) in [
        (Algorithm::EdDSA, "ed-1"),
        (Algorithm::RS256, "rsa-1"),
        (Algorithm::ES256, "ec-1"),
        (Algorithm::HS256, "hs-1"),
    ] {
        let p = a
            .authenticate(Some(&bearer(&token(alg, Some(kid), &claims()))))
            .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(
            (p.contract.as_str(), p.subject.as_str()),
            ("globex", "alice")
        );
        assert_eq!(p.method, AuthMethod::Jwt);
    }
    // Without a kid, the one key of the algorithm's type is used.
    let p = a
        .authenticate(Some(&bearer(&token(Algorithm::EdDSA, None, &claims()))))
        .unwrap();
    assert_eq!(p.contract, "globex");
    let k = a.authenticate(Some("Bearer sk-acme-1")).unwrap();
    assert_eq!(
        (k.contract.as_str(), k.method),
        ("acme", AuthMethod::ApiKey)
    );
}

#[test]
fn bad_tokens_are_refused_for_what_they_are() {
    let a = authenticator();
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = claims();
        f(&mut c);
        c
    };
    let auth = |t: &str| a.authenticate(Some(&bearer(t)));
    let expired = with(&|c| c["exp"] = json!(now() - 3600));
    assert_eq!(
        auth(&token(Algorithm::EdDSA, Some("ed-1"), &expired)),
        Err(AuthError::Expired)
    );
    let early = with(&|c| c["nbf"] = json!(now() + 3600));
    assert_eq!(
        auth(&token(Algorithm::EdDSA, Some("ed-1"), &early)),
        Err(AuthError::NotYetValid)
    );
    let iss = with(&|c| c["iss"] = json!("https://evil.example"));
    assert_eq!(
        auth(&token(Algorithm::EdDSA, Some("ed-1"), &iss)),
        Err(AuthError::WrongIssuer)
    );
    let aud = with(&|c| c["aud"] = json!("someone-else"));
    assert_eq!(
        auth(&token(Algorithm::EdDSA, Some("ed-1"), &aud)),
        Err(AuthError::WrongAudience)
    );
    let no_exp = with(&|c| {
        c.as_object_mut().unwrap().remove("exp");
    });
    assert!(matches!(
        auth(&token(Algorithm::EdDSA, Some("ed-1"), &no_exp)),
        Err(AuthError::InvalidToken(_))
    ));
    let no_contract = with(&|c| {
        c.as_object_mut().unwrap().remove("contract");
    });
    assert_eq!(
        auth(&token(Algorithm::EdDSA, Some("ed-1"), &no_contract)),
        Err(AuthError::MissingClaim("contract".into()))
    );
    assert_eq!(
        auth(&token(Algorithm::EdDSA, Some("nope"), &claims())),
        Err(AuthError::UnknownKey)
    );

    // Forged: a valid token's payload swapped for another contract's.
    let good = token(Algorithm::EdDSA, Some("ed-1"), &claims());
    let other = token(
        Algorithm::EdDSA,
        Some("ed-1"),
        &with(&|c| c["contract"] = json!("acme")),
    );
    let parts: Vec<&str> = good.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        other.split('.').nth(1).unwrap(),
        parts[2]
    );
    assert_eq!(auth(&forged), Err(AuthError::InvalidToken("bad signature")));

    // alg: none, signed or not.
    let b64 = |v: serde_json::Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(claims())
    );
    assert!(auth(&none).is_err());
    let none_sig = format!(
        "{}.{}.{}",
        b64(json!({"alg": "none"})),
        b64(claims()),
        parts[2]
    );
    assert!(auth(&none_sig).is_err());

    // Key confusion: HS256 signed with the RSA public key as the secret,
    // naming the RSA key.
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("rsa-1".into());
    let confused = encode(
        &h,
        &claims(),
        &EncodingKey::from_secret(&read("rsa.pub.pem")),
    )
    .unwrap();
    assert_eq!(auth(&confused), Err(AuthError::KeyConfusion));
    let mut h = Header::new(Algorithm::HS256);
    h.kid = None;
    let confused = encode(
        &h,
        &claims(),
        &EncodingKey::from_secret(&read("rsa.pub.pem")),
    )
    .unwrap();
    assert_eq!(
        auth(&confused),
        Err(AuthError::InvalidToken("bad signature"))
    );

    // Oversized, empty, and not Bearer.
    let big = format!("eyJ{}.a.b", "A".repeat(9000));
    assert_eq!(auth(&big), Err(AuthError::Oversized));
    assert_eq!(a.authenticate(None), Err(AuthError::Missing));
    assert_eq!(a.authenticate(Some("Bearer ")), Err(AuthError::Missing));
    assert_eq!(a.authenticate(Some("Basic abc")), Err(AuthError::NotBearer));
    assert_eq!(
        a.authenticate(Some("Bearer sk-wrong")),
        Err(AuthError::InvalidApiKey)
    );
}

#[test]
fn algorithms_not_listed_are_refused() {
    let mut cfg = jwt_config(fixture("jwks.json"));
    cfg.algorithms = vec!["EdDSA".into()];
    let a = Authenticator::new(&[], Some(&cfg)).unwrap();
    assert!(a
        .authenticate(Some(&bearer(&token(
            Algorithm::EdDSA,
            Some("ed-1"),
            &claims()
        ))))
        .is_ok());
    assert_eq!(
        a.authenticate(Some(&bearer(&token(
            Algorithm::HS256,
            Some("hs-1"),
            &claims()
        )))),
        Err(AuthError::DisallowedAlgorithm)
    );
    cfg.algorithms = vec!["none".into()];
    assert!(
        Authenticator::new(&[], Some(&cfg)).is_err(),
        "`none` cannot be configured"
    );
}

#[test]
fn a_rotated_key_works_as_soon_as_the_jwks_file_has_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let full: serde_json::Value = serde_json::from_slice(&read("jwks.json")).unwrap();
    let only_ed = json!({"keys": [full["keys"][0].clone()]});
    std::fs::write(&path, only_ed.to_string()).unwrap();
    let a = Authenticator::new(&[], Some(&jwt_config(path.clone()))).unwrap();
    let rs = bearer(&token(Algorithm::RS256, Some("rsa-1"), &claims()));
    assert_eq!(a.authenticate(Some(&rs)), Err(AuthError::UnknownKey));
    std::fs::write(&path, full.to_string()).unwrap();
    // Make sure the modification time moves even on coarse clocks.
    let f = std::fs::File::options().write(true).open(&path).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    assert!(a.authenticate(Some(&rs)).is_ok());
    // A broken file keeps the last good set.
    std::fs::write(&path, "not json").unwrap();
    let f = std::fs::File::options().write(true).open(&path).unwrap();
    f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        a.authenticate(Some(&bearer(&token(
            Algorithm::RS256,
            Some("gone"),
            &claims()
        )))),
        Err(AuthError::UnknownKey)
    );
    assert!(a.authenticate(Some(&rs)).is_ok());
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
    /// Whatever the header holds, the answer is a principal or an error.
    #[test]
    fn arbitrary_headers_never_panic(s in ".{0,300}", dots in proptest::collection::vec("[A-Za-z0-9_-]{0,40}", 3)) {
        let a = authenticator();
        let _ = a.authenticate(Some(&s));
        let t = format!("Bearer eyJ{}.{}.{}", dots[0], dots[1], dots[2]);
        proptest::prop_assert!(a.authenticate(Some(&t)).is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_a_jwks_url_are_fetched_first_and_refreshed() {
    use std::sync::Arc;
    let full: serde_json::Value = serde_json::from_slice(&read("jwks.json")).unwrap();
    let served = Arc::new(parking_lot::Mutex::new(
        json!({"keys": [full["keys"][0].clone()]}),
    ));
    let app = axum::Router::new()
        .route(
            "/.well-known/jwks.json",
            axum::routing::get(
                |axum::extract::State(s): axum::extract::State<
                    Arc<parking_lot::Mutex<serde_json::Value>>,
                >| async move { axum::Json(s.lock().clone()) },
            ),
        )
        .with_state(served.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    let mut cfg = jwt_config(fixture("jwks.json"));
    cfg.jwks_file = None;
    cfg.jwks_url = Some(format!("http://{addr}/.well-known/jwks.json"));
    cfg.jwks_refresh_secs = 1;
    let a = Authenticator::new(&[], Some(&cfg)).unwrap();
    a.start_key_refresh().await.unwrap();
    let ed = bearer(&token(Algorithm::EdDSA, Some("ed-1"), &claims()));
    assert!(
        a.authenticate(Some(&ed)).is_ok(),
        "fetched before the first request"
    );
    let rs = bearer(&token(Algorithm::RS256, Some("rsa-1"), &claims()));
    assert_eq!(a.authenticate(Some(&rs)), Err(AuthError::UnknownKey));
    *served.lock() = full;
    let t = std::time::Instant::now();
    while a.authenticate(Some(&rs)).is_err() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "rotated key never fetched"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Both a file and a URL: refused at setup.
    cfg.jwks_file = Some(fixture("jwks.json"));
    assert!(Authenticator::new(&[], Some(&cfg)).is_err());
}
