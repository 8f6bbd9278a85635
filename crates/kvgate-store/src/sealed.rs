//! A chunk as it leaves process memory (the disk and Redis tiers): its meta
//! (fmt, dtype, shape: the client sizes its buffer from them) then its bytes,
//! in one AES-256-GCM frame (`crypto.rs`) whose AAD binds contract, epoch,
//! model and chunk, so the meta is as tamper-proof as the data.

use kvgate_auth::Contract;
use zeroize::Zeroizing;

use crate::crypto::{open, seal, Binding, DataKey};
use crate::protocol::ChunkMeta;

/// Bytes of a chunk's meta at the head of its plaintext.
const META_LEN: usize = 24;

/// A chunk read back from a tier outside memory.
pub struct Loaded {
    pub meta: ChunkMeta,
    pub data: Zeroizing<Vec<u8>>,
}

/// Where a frame belongs: a frame moved to another contract, epoch, model or
/// chunk fails its tag.
pub(crate) struct Place<'a> {
    pub contract: &'a Contract,
    pub epoch: u64,
    pub model: &'a str,
    /// The chunk's physical key in the tiers.
    pub slot: &'a str,
}

impl<'a> Place<'a> {
    pub fn new(contract: &'a Contract, epoch: u64, model: &'a str, slot: &'a str) -> Self {
        Self {
            contract,
            epoch,
            model,
            slot,
        }
    }

    fn binding(&self) -> Binding<'_> {
        Binding {
            contract: self.contract.id(),
            epoch: self.epoch,
            model: self.model,
            chunk_key: self.slot,
        }
    }
}

/// The chunk's frame under `key`.
pub(crate) fn seal_chunk(key: &DataKey, at: &Place<'_>, meta: ChunkMeta, data: &[u8]) -> Vec<u8> {
    let mut plain = Zeroizing::new(Vec::with_capacity(META_LEN + data.len()));
    for v in [
        meta.fmt,
        meta.dtype,
        meta.shape[0],
        meta.shape[1],
        meta.shape[2],
        meta.shape[3],
    ] {
        plain.extend_from_slice(&v.to_le_bytes());
    }
    plain.extend_from_slice(data);
    seal(key, &at.binding(), &plain)
}

/// The chunk in `frame`, or None if the frame does not open there (torn,
/// tampered, moved, another epoch's): a miss, never data.
pub(crate) fn open_chunk(key: &DataKey, at: &Place<'_>, frame: &[u8]) -> Option<Loaded> {
    let plain = open(key, &at.binding(), frame).ok()?;
    if plain.len() < META_LEN {
        return None;
    }
    let int = |i: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&plain[4 * i..4 * i + 4]);
        i32::from_le_bytes(b)
    };
    Some(Loaded {
        meta: ChunkMeta {
            fmt: int(0),
            dtype: int(1),
            shape: [int(2), int(3), int(4), int(5)],
        },
        data: Zeroizing::new(plain[META_LEN..].to_vec()),
    })
}
