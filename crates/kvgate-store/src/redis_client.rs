//! How the Redis tier reaches its server: the client for `redis.url` or the
//! cluster client for `redis.cluster`, `rediss://` with `redis.tls`'s
//! certificates (rustls, the server's certificate always verified), the
//! pool the tier's commands share, and the check at start that tells a
//! server that is not up yet (the store starts; the tier catches up when it
//! answers) from one that refuses this store (certificates, credentials:
//! the store does not start).

use std::path::Path;
use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};

use crate::config::{RedisConfig, RedisTlsConfig};
use crate::redis_tier::RedisTierError;

/// How long a connection or a reply may take before the tier counts a miss.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections kept open to the server (or, in cluster mode, to each node).
const POOL_SIZE: u32 = 16;

/// The clients the tier was configured with.
pub(crate) enum Clients {
    Single(redis::Client),
    /// The cluster client, and a client per seed node (for the check at
    /// start, which wants each node's own answer).
    Cluster(redis::cluster::ClusterClient, Vec<redis::Client>),
}

pub(crate) enum Pool {
    Single(r2d2::Pool<redis::Client>),
    Cluster(r2d2::Pool<redis::cluster::ClusterClient>),
}

/// Read and write timeouts on each new single-server connection.
#[derive(Debug)]
struct Timeouts;

impl r2d2::CustomizeConnection<redis::Connection, RedisError> for Timeouts {
    fn on_acquire(&self, conn: &mut redis::Connection) -> Result<(), RedisError> {
        conn.set_read_timeout(Some(COMMAND_TIMEOUT))?;
        conn.set_write_timeout(Some(COMMAND_TIMEOUT))
    }
}

fn pool_builder<M: r2d2::ManageConnection>() -> r2d2::Builder<M> {
    r2d2::Pool::builder()
        .max_size(POOL_SIZE)
        .min_idle(Some(0))
        .connection_timeout(COMMAND_TIMEOUT)
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, RedisTierError> {
    std::fs::read(path).map_err(|source| RedisTierError::TlsFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// `redis.tls`'s files, as the `redis` crate takes them.
fn certificates(tls: &RedisTlsConfig) -> Result<redis::TlsCertificates, RedisTierError> {
    let root_cert = tls
        .ca_file
        .as_deref()
        .map(|p| read("ca_file", p))
        .transpose()?;
    let client_tls = match (&tls.cert_file, &tls.key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read("cert_file", cert)?,
            client_key: read("key_file", key)?,
        }),
        _ => None,
    };
    Ok(redis::TlsCertificates {
        client_tls,
        root_cert,
    })
}

fn client(url: &str, certs: Option<&redis::TlsCertificates>) -> redis::RedisResult<redis::Client> {
    match certs {
        Some(c) => redis::Client::build_with_tls(url, c.clone()),
        None => redis::Client::open(url),
    }
}

/// The clients for `cfg`; nothing is connected yet.
pub(crate) fn clients(cfg: &RedisConfig) -> Result<Clients, RedisTierError> {
    if cfg.uses_tls() {
        // rustls wants one process-wide provider; ring, as kvgate-tls's
        // listeners use, unless someone installed one already.
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
    }
    let certs = cfg.tls.as_ref().map(certificates).transpose()?;
    if cfg.cluster.is_empty() {
        let url = cfg.url.as_deref().unwrap_or_default();
        return Ok(Clients::Single(client(url, certs.as_ref())?));
    }
    let mut builder =
        redis::cluster::ClusterClient::builder(cfg.cluster.iter().map(String::as_str))
            .connection_timeout(COMMAND_TIMEOUT)
            .response_timeout(COMMAND_TIMEOUT);
    if let Some(c) = &certs {
        builder = builder.certs(c.clone());
    }
    let seeds = cfg
        .cluster
        .iter()
        .map(|u| client(u, certs.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Clients::Cluster(builder.build()?, seeds))
}

impl Clients {
    /// The pool the tier's commands share; it connects as it is used.
    pub(crate) fn pool(&self) -> Pool {
        match self {
            Clients::Single(c) => Pool::Single(
                pool_builder()
                    .connection_customizer(Box::new(Timeouts))
                    .build_unchecked(c.clone()),
            ),
            Clients::Cluster(c, _) => Pool::Cluster(pool_builder().build_unchecked(c.clone())),
        }
    }

    /// One connection and a PING to the server (to each seed of a cluster,
    /// until one answers): Ok(true) if one answered, Ok(false) if none is up
    /// yet, an error if one refused this store.
    pub(crate) fn check(&self) -> Result<bool, RedisTierError> {
        let seeds = match self {
            Clients::Single(c) => std::slice::from_ref(c),
            Clients::Cluster(_, seeds) => seeds.as_slice(),
        };
        for s in seeds {
            let pong = s
                .get_connection_with_timeout(COMMAND_TIMEOUT)
                .and_then(|mut c| {
                    c.set_read_timeout(Some(COMMAND_TIMEOUT))?;
                    redis::cmd("PING").query::<String>(&mut c)
                });
            match pong {
                Ok(_) => return Ok(true),
                Err(e) if not_up_yet(&e) => {
                    tracing::warn!(error = %e, "redis tier: server not reachable at start; the tier catches up when it answers");
                }
                Err(e) => return Err(RedisTierError::Refused(e)),
            }
        }
        Ok(false)
    }
}

/// A server that is down, starting or unreachable for now, as opposed to one
/// that answered and refused (a certificate that does not verify, a TLS
/// alert, wrong credentials, a URL the client cannot use).
pub(crate) fn not_up_yet(e: &RedisError) -> bool {
    e.is_connection_refusal()
        || e.is_timeout()
        || e.is_connection_dropped()
        || matches!(
            e.kind(),
            ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::ClusterDown
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::MasterDown
                )
        )
}
