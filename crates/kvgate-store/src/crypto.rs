//! Encryption at rest: every chunk that leaves process memory (disk, Redis)
//! is an AES-256-GCM frame `[1-byte version][12-byte nonce][ciphertext ||
//! 16-byte tag]` (the layout LMCache's own encrypted tier uses), under the
//! contract's data key, with a fresh random nonce per write. The AAD binds
//! the format version, contract, salt epoch, model and chunk key, so a frame
//! moved to another key, contract or epoch fails its tag: a failed tag is a
//! miss (and a metric and an audit record), never data.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, Key, KeyInit, Nonce, Tag};
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

/// Bytes before the ciphertext: version and nonce.
const HEAD_LEN: usize = 1 + NONCE_LEN;

/// Seals `plaintext` with a fresh random nonce.
pub fn seal(key: &DataKey, binding: &Binding<'_>, plaintext: &[u8]) -> Vec<u8> {
    seal_parts(key, binding, &[], plaintext)
}

/// Seals the plaintext `head` then `body` (e.g. a chunk's meta, then its
/// bytes) with a fresh random nonce: one copy into the frame, encrypted in
/// place there.
pub fn seal_parts(key: &DataKey, binding: &Binding<'_>, head: &[u8], body: &[u8]) -> Vec<u8> {
    seal_in_place(
        key,
        rand::random::<[u8; NONCE_LEN]>(),
        &binding.aad(),
        head,
        body,
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
    seal_in_place(key, nonce, aad.unwrap_or_default(), &[], plaintext)
}

fn seal_in_place(
    key: &DataKey,
    nonce: [u8; NONCE_LEN],
    aad: &[u8],
    head: &[u8],
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEAD_LEN + head.len() + body.len() + TAG_LEN);
    out.push(FRAME_VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(head);
    out.extend_from_slice(body);
    match key
        .cipher()
        .encrypt_in_place_detached(&Nonce::from(nonce), aad, &mut out[HEAD_LEN..])
    {
        Ok(tag) => out.extend_from_slice(&tag),
        // AES-GCM fails only for messages over 64 GiB, far above any chunk:
        // the plaintext is wiped, and the frame (too short) never opens.
        Err(_) => {
            zeroize::Zeroize::zeroize(&mut out);
            out.truncate(HEAD_LEN);
        }
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

/// Opens a frame sealed by [`seal_parts`] in its own buffer (decrypted in
/// place): fills `head` with the plaintext's first bytes and returns the
/// rest in the same buffer, moved to its start, wiped when dropped.
pub fn open_parts(
    key: &DataKey,
    binding: &Binding<'_>,
    frame: Vec<u8>,
    head: &mut [u8],
) -> Result<Zeroizing<Vec<u8>>, IntegrityError> {
    open_in_place(key, &binding.aad(), Zeroizing::new(frame), head)
}

/// Opens a frame with a given AAD (None: none).
pub fn open_with_aad(
    key: &DataKey,
    aad: Option<&[u8]>,
    frame: &[u8],
) -> Result<Zeroizing<Vec<u8>>, IntegrityError> {
    open_in_place(
        key,
        aad.unwrap_or_default(),
        Zeroizing::new(frame.to_vec()),
        &mut [],
    )
}

fn open_in_place(
    key: &DataKey,
    aad: &[u8],
    mut frame: Zeroizing<Vec<u8>>,
    head: &mut [u8],
) -> Result<Zeroizing<Vec<u8>>, IntegrityError> {
    if frame.len() < HEAD_LEN + head.len() + TAG_LEN {
        return Err(IntegrityError::Short);
    }
    if frame[0] != FRAME_VERSION {
        return Err(IntegrityError::Version(frame[0]));
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&frame[1..HEAD_LEN]);
    let end = frame.len() - TAG_LEN;
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&frame[end..]);
    let tag = Tag::from(tag);
    key.cipher()
        .decrypt_in_place_detached(&Nonce::from(nonce), aad, &mut frame[HEAD_LEN..end], &tag)
        .map_err(|_| IntegrityError::Tag)?;
    let body = HEAD_LEN + head.len();
    head.copy_from_slice(&frame[HEAD_LEN..body]);
    frame.copy_within(body..end, 0);
    frame.truncate(end - body);
    Ok(frame)
}
