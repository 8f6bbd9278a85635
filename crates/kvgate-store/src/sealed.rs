//! A chunk as it leaves process memory (the disk and Redis tiers): its meta
//! (fmt, dtype, shape: the client sizes its buffer from them) then its bytes,
//! in one AES-256-GCM frame (`crypto.rs`) whose AAD binds contract, epoch,
//! model and chunk, so the meta is as tamper-proof as the data.

use kvgate_auth::Contract;
use zeroize::Zeroizing;

use crate::crypto::{open_parts, seal_parts, Binding, DataKey};
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

/// The chunk's frame under `key` (its bytes copied once, into the frame).
pub(crate) fn seal_chunk(key: &DataKey, at: &Place<'_>, meta: ChunkMeta, data: &[u8]) -> Vec<u8> {
    let mut head = [0u8; META_LEN];
    for (i, v) in [
        meta.fmt,
        meta.dtype,
        meta.shape[0],
        meta.shape[1],
        meta.shape[2],
        meta.shape[3],
    ]
    .into_iter()
    .enumerate()
    {
        head[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    seal_parts(key, &at.binding(), &head, data)
}

/// The chunk in `frame` (opened in its own buffer), or None if the frame
/// does not open there (torn, tampered, moved, another epoch's): a miss,
/// never data.
pub(crate) fn open_chunk(key: &DataKey, at: &Place<'_>, frame: Vec<u8>) -> Option<Loaded> {
    let mut head = [0u8; META_LEN];
    let data = open_parts(key, &at.binding(), frame, &mut head).ok()?;
    let int = |i: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&head[4 * i..4 * i + 4]);
        i32::from_le_bytes(b)
    };
    Some(Loaded {
        meta: ChunkMeta {
            fmt: int(0),
            dtype: int(1),
            shape: [int(2), int(3), int(4), int(5)],
        },
        data,
    })
}
