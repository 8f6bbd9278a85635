//! TLS from kvgate to the engines: the CA their certificates must chain to
//! (the only roots trusted) and, for mTLS, kvgate's own client certificate.
//! TLS 1.3, as on the listeners.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::TlsError;

/// `upstream_tls:` in the gateway's YAML, for `https://` endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientTlsConfig {
    /// PEM CA certificates the engines' certificates chain to.
    pub ca_file: PathBuf,
    /// kvgate's client certificate (PEM chain) for engines that require one.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn invalid(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Read {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

impl ClientTlsConfig {
    /// `b`, trusting only `ca_file`'s certificates and presenting the client
    /// certificate if one is configured.
    pub fn apply(&self, b: reqwest::ClientBuilder) -> Result<reqwest::ClientBuilder, TlsError> {
        let roots = reqwest::Certificate::from_pem_bundle(&read(&self.ca_file)?)
            .map_err(|e| invalid(&self.ca_file, e))?;
        if roots.is_empty() {
            return Err(TlsError::NoCertificate(self.ca_file.clone()));
        }
        let mut b = b
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .min_tls_version(reqwest::tls::Version::TLS_1_3);
        for r in roots {
            b = b.add_root_certificate(r);
        }
        match (&self.cert_file, &self.key_file) {
            (None, None) => Ok(b),
            (Some(cert), Some(key)) => {
                let mut pem = read(cert)?;
                pem.push(b'\n');
                pem.extend_from_slice(&read(key)?);
                let id = reqwest::Identity::from_pem(&pem).map_err(|e| invalid(cert, e))?;
                Ok(b.identity(id))
            }
            _ => Err(TlsError::Config(
                "upstream_tls needs both cert_file and key_file, or neither".into(),
            )),
        }
    }
}
