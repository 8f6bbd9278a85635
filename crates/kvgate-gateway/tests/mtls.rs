#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The gateway on a TLS 1.3 listener with client certificates (real rustls
//! handshakes both ends): a registered certificate is a principal whose
//! contract's salt reaches the engine, a bearer token must name the same
//! contract as the certificate, and a request with neither is refused.

use std::sync::Arc;

use kvgate_auth::ClientCertSpec;
use kvgate_gateway::{Gateway, GatewayConfig, StaticDiscovery};
use kvgate_tls::testing::{TestCa, TestLeaf};
use kvgate_tls::{Peer, TlsConfig};
use serde_json::Value;

mod common;
use common::*;

fn client(ca: &TestCa, identity: Option<&TestLeaf>, addr: std::net::SocketAddr) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .resolve("localhost", addr);
    if let Some(l) = identity {
        let pem = format!("{}{}", l.cert_pem, l.key_pem);
        b = b.identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap());
    }
    b.build().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_a_contract_and_must_agree_with_a_bearer() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = TestCa::new("server ca").unwrap();
    let client_ca = TestCa::new("client ca").unwrap();
    let (crt, key) = server_ca
        .server(&["localhost"])
        .unwrap()
        .write(dir.path(), "tls")
        .unwrap();
    let ca_file = dir.path().join("clients.crt");
    std::fs::write(&ca_file, client_ca.pem()).unwrap();
    let acme_app = client_ca.client("acme-app").unwrap();
    let stranger = client_ca.client("stranger").unwrap();

    let (url, upstream) = spawn_upstream().await;
    let mut tls = TlsConfig::new(crt, key);
    tls.client_ca_file = Some(ca_file);
    let mut cfg = GatewayConfig {
        endpoints: vec![endpoint(&url)],
        tls: Some(tls.clone()),
        ..Default::default()
    };
    cfg.contracts = contracts(&[("key-a", "acme"), ("key-b", "globex")]);
    cfg.contracts.client_certs = vec![ClientCertSpec {
        sha256: hex::encode(acme_app.sha256()),
        contract: "acme".into(),
        subject: Some("acme-app".into()),
    }];
    cfg.contracts.audit.path = Some(dir.path().join("audit.jsonl"));
    let discovery = Arc::new(StaticDiscovery::new(cfg.endpoints.clone()).unwrap());
    let gw = Gateway::start(cfg, discovery).await.unwrap();
    let listener = kvgate_tls::bind("127.0.0.1:0", Some(&tls)).await.unwrap();
    let addr = listener.local_addr();
    let app = gw.router().into_make_service_with_connect_info::<Peer>();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let base = format!("https://localhost:{}", addr.port());

    let send = |c: reqwest::Client, bearer: Option<&'static str>| {
        let mut r = c
            .post(format!("{base}/v1/chat/completions"))
            .json(&chat_body("hi"));
        if let Some(b) = bearer {
            r = r.bearer_auth(b);
        }
        async move {
            let resp = r.send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            (status, text)
        }
    };
    let with_cert = client(&server_ca, Some(&acme_app), addr);
    let anonymous = client(&server_ca, None, addr);

    // The certificate alone is acme; so is acme's key alone: one salt.
    assert_eq!(send(with_cert.clone(), None).await.0, 200);
    assert_eq!(send(anonymous.clone(), Some("key-a")).await.0, 200);
    assert_eq!(send(with_cert.clone(), Some("key-a")).await.0, 200);
    let bodies = upstream.bodies.lock().clone();
    assert_eq!(bodies.len(), 3);
    let salt = bodies[0]["cache_salt"].as_str().unwrap().to_string();
    assert_eq!(salt.len(), 32);
    assert!(bodies.iter().all(|b| b["cache_salt"] == salt.as_str()));

    // Refused, each in OpenAI's error shape: another contract's key with
    // acme's certificate, an unregistered certificate, nothing at all.
    for (c, bearer, reason) in [
        (with_cert.clone(), Some("key-b"), "certificate_mismatch"),
        (
            client(&server_ca, Some(&stranger), addr),
            None,
            "unknown_client_cert",
        ),
        (anonymous.clone(), None, "missing"),
    ] {
        let (status, text) = send(c, bearer).await;
        assert_eq!(status, 401, "{reason}: {text}");
        let e: Value = serde_json::from_str(&text).unwrap();
        assert!(e["error"]["message"].is_string(), "{text}");
        assert!(!text.contains(&salt));
        let log = {
            gw.sentinel().audit().flush().unwrap();
            std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap()
        };
        assert!(
            log.lines()
                .any(|l| l.contains("\"auth_failure\"") && l.contains(reason)),
            "{reason} not audited"
        );
    }
    assert_eq!(
        upstream.bodies.lock().len(),
        3,
        "no refused request reached the engine"
    );

    // Plain HTTP to the TLS port gets no HTTP answer.
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/health", addr.port()))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_presents_its_client_certificate_to_engines_that_require_one() {
    let dir = tempfile::tempdir().unwrap();
    let engine_ca = TestCa::new("engine ca").unwrap();
    let gateway_ca = TestCa::new("gateway client ca").unwrap();
    let (crt, key) = engine_ca
        .server(&["127.0.0.1"])
        .unwrap()
        .write(dir.path(), "engine")
        .unwrap();
    let clients_ca = dir.path().join("gateway-clients.crt");
    std::fs::write(&clients_ca, gateway_ca.pem()).unwrap();
    let mut engine_tls = TlsConfig::new(crt, key);
    engine_tls.client_ca_file = Some(clients_ca);
    engine_tls.require_client_cert = true;
    let listener = kvgate_tls::bind("127.0.0.1:0", Some(&engine_tls))
        .await
        .unwrap();
    let url = format!("https://127.0.0.1:{}", listener.local_addr().port());
    let (app, upstream) = upstream_app();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let engine_ca_file = dir.path().join("engine-ca.crt");
    std::fs::write(&engine_ca_file, engine_ca.pem()).unwrap();
    let (id_crt, id_key) = gateway_ca
        .client("kvgate")
        .unwrap()
        .write(dir.path(), "kvgate")
        .unwrap();
    let with_identity = kvgate_tls::ClientTlsConfig {
        ca_file: engine_ca_file.clone(),
        cert_file: Some(id_crt),
        key_file: Some(id_key),
    };
    let without_identity = kvgate_tls::ClientTlsConfig {
        cert_file: None,
        key_file: None,
        ..with_identity.clone()
    };
    let client = reqwest::Client::new();
    for (tls, want) in [(with_identity, 200), (without_identity, 502)] {
        let (gw_url, _gw) = gateway(GatewayConfig {
            endpoints: vec![endpoint(&url)],
            upstream_tls: Some(tls),
            connect_retries: 0,
            ..Default::default()
        })
        .await;
        let resp = client
            .post(format!("{gw_url}/v1/chat/completions"))
            .json(&chat_body("hi"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), want);
        resp.text().await.unwrap();
    }
    assert_eq!(
        upstream.bodies.lock().len(),
        1,
        "only the mTLS request reached the engine"
    );

    // A CA file without a certificate is a start error naming the file.
    let empty = dir.path().join("empty.crt");
    std::fs::write(&empty, "nothing here\n").unwrap();
    let discovery = Arc::new(StaticDiscovery::new(vec![endpoint(&url)]).unwrap());
    let e = Gateway::start(
        GatewayConfig {
            endpoints: vec![endpoint(&url)],
            upstream_tls: Some(kvgate_tls::ClientTlsConfig {
                ca_file: empty,
                cert_file: None,
                key_file: None,
            }),
            ..Default::default()
        },
        discovery,
    )
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("empty.crt"), "{e}");
}
