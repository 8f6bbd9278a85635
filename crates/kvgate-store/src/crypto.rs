//! Encryption at rest: every chunk that leaves process memory (disk, Redis)
//! is an AES-256-GCM frame `[1-byte version][12-byte nonce][ciphertext ||
//! 16-byte tag]` (the layout LMCache's own encrypted tier uses), under the
//! contract's data key, with a fresh random nonce per write. The AAD binds
//! the format version, contract, salt epoch, model and chunk key, so a frame
//! moved to another key, contract or epoch fails its tag: a failed tag is a
//! miss (and a metric and an audit record), never data.

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{Aes256Gcm, Key, KeyInit, Nonce};
use zeroize::Zeroizing;

pub const FRAME_VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Domain separation of the AAD.
const AAD_DOMAIN: &[u8] = b"kvgate chunk v1";

/// A contract's data key for one salt epoch (`kvgate_auth::Contract::data_key`).
pub struct DataKey(Zeroizing<[u8; 32]>);

impl DataKey {
    pub fn new(bytes: Zeroizing<[u8; 32]>) -> Self {
        Self(bytes)
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&Key::<Aes256Gcm>::from(*self.0))
    }
}

/// Why a frame does not open. Says nothing about the plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntegrityError {
    #[error("frame too short")]
    Short,
    #[error("unknown frame version {0}")]
    Version(u8),
    #[error(
        "authentication tag does not verify (wrong key, contract, epoch or chunk, or tampered)"
    )]
    Tag,
}

/// What a frame is bound to.
pub struct Binding<'a> {
    pub contract: &'a str,
    pub epoch: u64,
    pub model: &'a str,
    pub chunk_key: &'a str,
}

impl Binding<'_> {
    /// Length-prefixed fields: no two bindings share an AAD.
    fn aad(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.contract.len() + self.chunk_key.len());
        out.extend_from_slice(AAD_DOMAIN);
        out.push(FRAME_VERSION);
        for f in [
            self.contract.as_bytes(),
            self.model.as_bytes(),
            self.chunk_key.as_bytes(),
        ] {
            out.extend_from_slice(&(f.len() as u64).to_be_bytes());
            out.extend_from_slice(f);
        }
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out
    }
}

/// Seals `plaintext` with a fresh random nonce.
pub fn seal(key: &DataKey, binding: &Binding<'_>, plaintext: &[u8]) -> Vec<u8> {
    seal_with_nonce(
        key,
        rand::random::<[u8; NONCE_LEN]>(),
        Some(&binding.aad()),
        plaintext,
    )
}

/// Seals with a given nonce and AAD (None: none, as in LMCache's frames).
/// Only `seal` picks nonces for real data; this is for test vectors.
pub fn seal_with_nonce(
    key: &DataKey,
    nonce: [u8; NONCE_LEN],
    aad: Option<&[u8]>,
    plaintext: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + TAG_LEN);
    out.push(FRAME_VERSION);
    out.extend_from_slice(&nonce);
    let payload = Payload {
        msg: plaintext,
        aad: aad.unwrap_or_default(),
    };
    // AES-GCM fails only for messages over 64 GiB, far above any chunk.
    if let Ok(ct) = key.cipher().encrypt(&Nonce::from(nonce), payload) {
        out.extend_from_slice(&ct);
    }
    out
}

/// Opens a frame sealed for `binding`.
pub fn open(
    key: &DataKey,
    binding: &Binding<'_>,
    frame: &[u8],
) -> Result<Zeroizing<Vec<u8>>, IntegrityError> {
    open_with_aad(key, Some(&binding.aad()), frame)
}

/// Opens a frame with a given AAD (None: none).
pub fn open_with_aad(
    key: &DataKey,
    aad: Option<&[u8]>,
    frame: &[u8],
) -> Result<Zeroizing<Vec<u8>>, IntegrityError> {
    if frame.len() < 1 + NONCE_LEN + TAG_LEN {
        return Err(IntegrityError::Short);
    }
    if frame[0] != FRAME_VERSION {
        return Err(IntegrityError::Version(frame[0]));
    }
    let (nonce, ct) = frame[1..].split_at(NONCE_LEN);
    let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| IntegrityError::Short)?;
    let payload = Payload {
        msg: ct,
        aad: aad.unwrap_or_default(),
    };
    key.cipher()
        .decrypt(&Nonce::from(nonce), payload)
        .map(Zeroizing::new)
        .map_err(|_| IntegrityError::Tag)
}
