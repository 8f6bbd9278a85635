//! The server's certificates, re-read on change. Each handshake takes the
//! current `ServerConfig`, so a reload affects new connections only; open
//! ones keep the certificate they were made with. Change is seen by the
//! files' modification time and length (a Kubernetes Secret volume swaps a
//! symlink, which changes both for the file it points to); a file that no
//! longer parses is refused and the last good certificate stays in use.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{TlsConfig, TlsError};

/// What a file looked like when last read: (modified, length).
type Stamp = Vec<Option<(SystemTime, u64)>>;

pub struct ReloadingCerts {
    cfg: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    stamp: Mutex<Stamp>,
    reloads: AtomicU64,
}

impl ReloadingCerts {
    /// Reads the files once; fails if they do not make a TLS config.
    pub fn load(cfg: &TlsConfig) -> Result<Arc<Self>, TlsError> {
        let stamp = stamp(cfg);
        let server = server_config(cfg)?;
        Ok(Arc::new(Self {
            cfg: cfg.clone(),
            current: RwLock::new(Arc::new(server)),
            stamp: Mutex::new(stamp),
            reloads: AtomicU64::new(0),
        }))
    }

    /// The config new handshakes use.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.current.read().clone()
    }

    /// Successful reloads since start.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    /// Re-reads the files if they changed since the last look. Ok(true): new
    /// certificates are in use; Err: the new files were refused and the old
    /// certificates stay (the same change is not retried until the files
    /// change again).
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamp(&self.cfg);
        {
            let mut seen = self.stamp.lock();
            if *seen == now {
                return Ok(false);
            }
            *seen = now;
        }
        let server = server_config(&self.cfg)?;
        *self.current.write() = Arc::new(server);
        self.reloads.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// Checks for change every `reload_interval_secs` (0: never) until the
    /// returned task is aborted.
    pub(crate) fn watch(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        if self.cfg.reload_interval_secs == 0 {
            return None;
        }
        let me = self.clone();
        let every = Duration::from_secs(self.cfg.reload_interval_secs);
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                match me.reload_if_changed() {
                    Ok(true) => tracing::info!(cert_file = %me.cfg.cert_file.display(),
                        "TLS certificate reloaded; new connections use it"),
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e,
                        "new TLS certificate refused; the previous one stays in use"),
                }
            }
        }))
    }
}

fn files(cfg: &TlsConfig) -> Vec<&Path> {
    let mut f = vec![cfg.cert_file.as_path(), cfg.key_file.as_path()];
    if let Some(ca) = &cfg.client_ca_file {
        f.push(ca);
    }
    f
}

fn stamp(cfg: &TlsConfig) -> Stamp {
    files(cfg)
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

fn read_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| read_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| read_err(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

/// TLS 1.3 only, whatever features other crates enable in rustls.
fn server_config(cfg: &TlsConfig) -> Result<ServerConfig, TlsError> {
    let certs = certificates(&cfg.cert_file)?;
    let key =
        PrivateKeyDer::from_pem_file(&cfg.key_file).map_err(|e| read_err(&cfg.key_file, e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match (&cfg.client_ca_file, cfg.require_client_cert) {
        (None, true) => return Err(TlsError::RequireWithoutCa),
        (None, false) => builder.with_no_client_auth(),
        (Some(ca), require) => {
            let ca_err = |e: &dyn std::fmt::Display| TlsError::ClientCa {
                path: ca.clone(),
                message: e.to_string(),
            };
            let mut roots = RootCertStore::empty();
            for c in certificates(ca)? {
                roots.add(c).map_err(|e| ca_err(&e))?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let verifier = if require {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(verifier.build().map_err(|e| ca_err(&e))?)
        }
    };
    let mut server = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    // axum serves HTTP/1.1 here.
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(server)
}
