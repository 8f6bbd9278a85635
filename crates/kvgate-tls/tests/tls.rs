#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Real TLS handshakes against the listener: TLS 1.3 with a CA-signed
//! certificate, reload on change (and a bad new file refused), mTLS with the
//! client certificate's fingerprint reaching the handler.

use std::path::Path;
use std::sync::Arc;

use axum::extract::ConnectInfo;
use axum::routing::get;
use axum::Router;
use kvgate_tls::testing::TestCa;
use kvgate_tls::{bind, Peer, TlsConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn client_config(ca: &TestCa, identity: Option<(&str, &str)>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca.der().to_vec())).unwrap();
    let b = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match identity {
        None => b.with_no_client_auth(),
        Some((cert, key)) => {
            use rustls::pki_types::pem::PemObject;
            let certs = CertificateDer::pem_slice_iter(cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            b.with_client_auth_cert(certs, key).unwrap()
        }
    };
    Arc::new(cfg)
}

/// One HTTP/1.1 GET over TLS: (response text, the server's leaf DER).
async fn get_over_tls(
    addr: std::net::SocketAddr,
    cfg: Arc<ClientConfig>,
) -> std::io::Result<(String, Vec<u8>)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let (_, conn) = tls.get_ref();
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let leaf = conn.peer_certificates().unwrap()[0].to_vec();
    tls.write_all(b"GET /peer HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await?;
    Ok((String::from_utf8_lossy(&out).into_owned(), leaf))
}

fn app() -> Router {
    Router::new().route(
        "/peer",
        get(|ConnectInfo(p): ConnectInfo<Peer>| async move {
            match p.client_cert_sha256 {
                Some(h) => format!("cert={}", hex::encode(h)),
                None => "cert=none".to_string(),
            }
        }),
    )
}

async fn serve(cfg: &TlsConfig) -> (std::net::SocketAddr, Arc<kvgate_tls::ReloadingCerts>) {
    let listener = bind("127.0.0.1:0", Some(cfg)).await.unwrap();
    let addr = listener.local_addr();
    let certs = listener.certs().unwrap().clone();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app().into_make_service_with_connect_info::<Peer>(),
        )
        .await
        .unwrap()
    });
    (addr, certs)
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[tokio::test]
async fn tls13_serves_and_reloads_a_changed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test ca").unwrap();
    let first = ca.server(&["localhost", "127.0.0.1"]).unwrap();
    let (crt, key) = first.write(dir.path(), "tls").unwrap();
    let mut cfg = TlsConfig::new(crt, key);
    cfg.reload_interval_secs = 0;
    let (addr, certs) = serve(&cfg).await;

    let (resp, leaf_seen) = get_over_tls(addr, client_config(&ca, None)).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("cert=none"), "{resp}");
    assert_eq!(leaf_seen, first.der);

    // Unchanged files: nothing to do.
    assert!(!certs.reload_if_changed().unwrap());

    // A renewed certificate (new key too): new connections get it.
    let second = ca.server(&["localhost"]).unwrap();
    second.write(dir.path(), "tls").unwrap();
    assert!(certs.reload_if_changed().unwrap());
    let (_, leaf_seen) = get_over_tls(addr, client_config(&ca, None)).await.unwrap();
    assert_eq!(leaf_seen, second.der);

    // A broken file is refused and the last good certificate stays.
    write(
        dir.path(),
        "tls.crt",
        "-----BEGIN CERTIFICATE-----\nnot base64!\n",
    );
    assert!(certs.reload_if_changed().is_err());
    let (resp, leaf_seen) = get_over_tls(addr, client_config(&ca, None)).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(leaf_seen, second.der);
    assert_eq!(certs.reloads(), 1);
}

#[tokio::test]
async fn the_watcher_picks_up_a_renewal_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("test ca").unwrap();
    let (crt, key) = ca
        .server(&["localhost"])
        .unwrap()
        .write(dir.path(), "tls")
        .unwrap();
    let mut cfg = TlsConfig::new(crt, key);
    cfg.reload_interval_secs = 1;
    let (addr, certs) = serve(&cfg).await;
    let renewed = ca.server(&["localhost"]).unwrap();
    renewed.write(dir.path(), "tls").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while certs.reloads() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload within 10 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (_, leaf_seen) = get_over_tls(addr, client_config(&ca, None)).await.unwrap();
    assert_eq!(leaf_seen, renewed.der);
}

#[tokio::test]
async fn mtls_requires_a_client_certificate_from_the_ca_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = TestCa::new("server ca").unwrap();
    let client_ca = TestCa::new("client ca").unwrap();
    let other_ca = TestCa::new("someone else").unwrap();
    let (crt, key) = server_ca
        .server(&["localhost"])
        .unwrap()
        .write(dir.path(), "tls")
        .unwrap();
    let mut cfg = TlsConfig::new(crt, key);
    cfg.client_ca_file = Some(write(dir.path(), "ca.crt", &client_ca.pem()));
    cfg.require_client_cert = true;
    let (addr, _) = serve(&cfg).await;

    let tenant = client_ca.client("tenant-a").unwrap();
    let id = Some((tenant.cert_pem.as_str(), tenant.key_pem.as_str()));
    let (resp, _) = get_over_tls(addr, client_config(&server_ca, id))
        .await
        .unwrap();
    let want = format!("cert={}", hex::encode(tenant.sha256()));
    assert!(resp.ends_with(&want), "{resp}");

    // No certificate, or one from another CA: no HTTP answer at all.
    for identity in [None, Some(other_ca.client("mallory").unwrap())] {
        let id = identity
            .as_ref()
            .map(|l| (l.cert_pem.as_str(), l.key_pem.as_str()));
        if let Ok((resp, _)) = get_over_tls(addr, client_config(&server_ca, id)).await {
            assert!(!resp.contains("200"), "served: {resp}");
        }
    }
}

#[tokio::test]
async fn optional_client_auth_serves_clients_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("ca").unwrap();
    let (crt, key) = ca
        .server(&["localhost"])
        .unwrap()
        .write(dir.path(), "tls")
        .unwrap();
    let mut cfg = TlsConfig::new(crt, key);
    cfg.client_ca_file = Some(write(dir.path(), "ca.crt", &ca.pem()));
    let (addr, _) = serve(&cfg).await;
    let (resp, _) = get_over_tls(addr, client_config(&ca, None)).await.unwrap();
    assert!(resp.ends_with("cert=none"), "{resp}");
}

#[tokio::test]
async fn bad_files_are_a_bind_error_naming_the_file_not_its_contents() {
    let dir = tempfile::tempdir().unwrap();
    let key = write(
        dir.path(),
        "tls.key",
        "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
    );
    let missing = TlsConfig::new(dir.path().join("nope.crt"), &key);
    let e = bind("127.0.0.1:0", Some(&missing))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("nope.crt"), "{e}");
    let empty = TlsConfig::new(write(dir.path(), "empty.crt", "hello\n"), &key);
    let e = bind("127.0.0.1:0", Some(&empty))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("no PEM certificate"), "{e}");
    assert!(!e.contains("c2VjcmV0"), "{e}");
    let yaml: TlsConfig =
        serde_yaml::from_str("cert_file: /a\nkey_file: /b\nrequire_client_cert: true\n").unwrap();
    assert!(yaml.require_client_cert);
    assert_eq!(
        yaml.reload_interval_secs,
        kvgate_tls::DEFAULT_RELOAD_INTERVAL_SECS
    );
    assert!(serde_yaml::from_str::<TlsConfig>("cert_file: /a\nkey_file: /b\nbogus: 1\n").is_err());
}
