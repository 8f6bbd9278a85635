//! Certificates made on the fly, for tests (feature `testing`): a CA and
//! leaves it signs, as PEM for files and DER for fingerprints.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

pub struct TestCa {
    cert: Certificate,
    key: KeyPair,
}

/// A leaf certificate and its key.
pub struct TestLeaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl TestLeaf {
    /// SHA-256 of the DER, as [`crate::Peer`] reports it.
    pub fn sha256(&self) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(&self.der).into()
    }

    /// Writes `<name>.crt` and `<name>.key` into `dir`.
    pub fn write(&self, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf), std::io::Error> {
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, &self.cert_pem)?;
        std::fs::write(&k, &self.key_pem)?;
        Ok((c, k))
    }
}

impl TestCa {
    pub fn new(name: &str) -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, name.to_string());
        let cert = p.self_signed(&key)?;
        Ok(Self { cert, key })
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    pub fn der(&self) -> &[u8] {
        self.cert.der()
    }

    /// A server certificate for `sans` (DNS names or IP addresses).
    pub fn server(&self, sans: &[&str]) -> Result<TestLeaf, rcgen::Error> {
        self.leaf(sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate (mTLS) named `name`.
    pub fn client(&self, name: &str) -> Result<TestLeaf, rcgen::Error> {
        self.leaf(&[name], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn leaf(
        &self,
        sans: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<TestLeaf, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        p.extended_key_usages = vec![usage];
        let cert = p.signed_by(&key, &self.cert, &self.key)?;
        Ok(TestLeaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        })
    }
}
