//! kvgate's listeners. Every HTTP surface (gateway, admin, sentinel, index
//! API) binds through [`bind`]: plain TCP, or TLS 1.3 with rustls when a
//! [`TlsConfig`] is given. Certificates are re-read when their files change
//! (a Kubernetes Secret update, cert-manager's renewal) and new connections
//! get the new ones; a bad new file is refused with a log line and the old
//! certificate stays. With a client CA the listener asks for (or requires) a
//! client certificate, and [`Peer`] carries its SHA-256 fingerprint to the
//! contract layer, which maps it to a contract.
//!
//! Towards the engines, [`ClientTlsConfig`] sets up the gateway's HTTP
//! client: only the configured CA is trusted, and kvgate presents its own
//! client certificate to engines that require one.
//!
//! Seams: [`bind`] -> [`Listener`] (an `axum::serve::Listener`), and
//! [`Peer`] (axum connect info) for handlers; [`ClientTlsConfig::apply`] to
//! a `reqwest::ClientBuilder`.

mod certs;
mod client;
mod listener;
#[cfg(feature = "testing")]
pub mod testing;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use certs::ReloadingCerts;
pub use client::ClientTlsConfig;
pub use listener::{bind, BindError, ClientCert, Listener, Peer, Stream};

/// How often certificate files are checked for change, by default.
pub const DEFAULT_RELOAD_INTERVAL_SECS: u64 = 5;

/// TLS on a listener. YAML:
/// `tls: {cert_file: /etc/tls/tls.crt, key_file: /etc/tls/tls.key}`, plus
/// `client_ca_file` (and `require_client_cert: true`) for mTLS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificates that sign client certificates. Set: clients are
    /// asked for a certificate, and one that does not chain to these is
    /// refused in the handshake.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// With `client_ca_file`: refuse a handshake without a client certificate.
    #[serde(default)]
    pub require_client_cert: bool,
    /// How often the files are checked for change, seconds (0: never).
    #[serde(default = "default_reload_interval_secs")]
    pub reload_interval_secs: u64,
}

fn default_reload_interval_secs() -> u64 {
    DEFAULT_RELOAD_INTERVAL_SECS
}

impl TlsConfig {
    /// What serde cannot check: both files named, a CA for required client
    /// certificates. (Whether the files parse is checked at bind.)
    pub fn validate(&self) -> Result<(), TlsError> {
        if self.cert_file.as_os_str().is_empty() || self.key_file.as_os_str().is_empty() {
            return Err(TlsError::Config(
                "tls needs both cert_file and key_file".into(),
            ));
        }
        if self.require_client_cert && self.client_ca_file.is_none() {
            return Err(TlsError::RequireWithoutCa);
        }
        Ok(())
    }

    pub fn new(cert_file: impl Into<PathBuf>, key_file: impl Into<PathBuf>) -> Self {
        Self {
            cert_file: cert_file.into(),
            key_file: key_file.into(),
            client_ca_file: None,
            require_client_cert: false,
            reload_interval_secs: DEFAULT_RELOAD_INTERVAL_SECS,
        }
    }
}

/// Why certificates could not be loaded. Paths are named; file contents
/// (keys) never are.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error("{0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("require_client_cert needs client_ca_file")]
    RequireWithoutCa,
    #[error("client CA {path}: {message}")]
    ClientCa { path: PathBuf, message: String },
    #[error("certificate and key do not make a TLS config: {0}")]
    Config(String),
}
