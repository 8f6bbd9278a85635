//! kvgate's own block keys.
//!
//! A block key is a chained hash of (parent key, the block's token ids, the block's
//! extra keys). It is computed the same way from a `BlockStored` event's
//! `token_ids` and from a request's tokens, so matching never depends on the
//! engine's hash algorithm or its `PYTHONHASHSEED`.
//!
//! Why keyed SipHash-2-4: request tokens are attacker-controlled and keys are
//! truncated to 64 bits to keep the index small. With a public hash, a 64-bit
//! collision costs ~2^32 work, cheap enough to poison another prefix's routing.
//! SipHash-2-4 is a PRF designed for short attacker-chosen inputs: without the
//! 128-bit secret no offline search is possible. Keyed BLAKE3 gives the same
//! property but measured 3.4x slower on 16-token blocks (85 µs vs 25 µs for an
//! 8k-token prompt; `cargo bench -p kvgate-keys`), and keys are hashed on every
//! stored block and every request.

use std::hash::Hasher;

use kvgate_wire::vllm::ExtraKey;
use siphasher::sip::SipHasher24;

/// kvgate's key for one block of tokens in one model's prefix tree.
pub type BlockKey = u64;

/// Domain separation for the secret derivation; bump if the key layout changes.
const KEY_CONTEXT: &str = "kvgate 2026-11 block keys v1";

/// Why a set of keys could not be computed.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
pub enum KeyError {
    #[error("block size must be > 0")]
    ZeroBlockSize,
    #[error("token count {tokens} is not a multiple of block size {block_size}")]
    PartialBlock { tokens: usize, block_size: usize },
    #[error("no entropy for a random secret: {0}")]
    Entropy(String),
    #[error("{blocks} blocks but {extra} extra-key entries")]
    ExtraKeysMismatch { blocks: usize, extra: usize },
}

/// Computes block keys under one secret. Cheap to clone.
#[derive(Clone)]
pub struct BlockHasher {
    key: [u8; 16],
}

impl std::fmt::Debug for BlockHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret; the fingerprint tells two hashers apart.
        f.debug_struct("BlockHasher")
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

impl BlockHasher {
    /// A hasher whose secret is derived from `secret` (any length). Replicas that
    /// must agree on keys (index dumps, several gateways) share the same secret.
    pub fn from_secret(secret: &[u8]) -> Self {
        let derived = blake3::derive_key(KEY_CONTEXT, secret);
        let mut key = [0u8; 16];
        key.copy_from_slice(&derived[..16]);
        Self { key }
    }

    /// A hasher with a fresh random secret: keys are private to this process.
    pub fn random() -> Result<Self, KeyError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).map_err(|e| KeyError::Entropy(e.to_string()))?;
        Ok(Self::from_secret(&seed))
    }

    /// A public, non-secret identifier of this hasher's secret (for dumps and logs).
    pub fn fingerprint(&self) -> String {
        // A one-way function of the key, distinct from any block key's input.
        let mut h = self.sip();
        h.write(b"fingerprint\xff");
        format!("{:016x}", h.finish())
    }

    /// The parent key of a model's first block. Keys never cross models.
    pub fn root(&self, model: &str) -> BlockKey {
        let mut h = self.sip();
        h.write(b"root\0");
        h.write(model.as_bytes());
        h.finish()
    }

    /// The key of one block given its parent's key.
    pub fn block_key(&self, parent: BlockKey, tokens: &[u32], extra: &[ExtraKey]) -> BlockKey {
        let mut h = self.sip();
        h.write_u64(parent);
        h.write_u32(tokens.len() as u32);
        // Tokens go in as one byte run per buffer (SipHash is fastest on long
        // writes); the stack buffer avoids an allocation per block.
        let mut buf = [0u8; 256];
        for chunk in tokens.chunks(buf.len() / 4) {
            for (dst, t) in buf.chunks_exact_mut(4).zip(chunk) {
                dst.copy_from_slice(&t.to_le_bytes());
            }
            h.write(&buf[..chunk.len() * 4]);
        }
        h.write_u32(extra.len() as u32);
        for e in extra {
            feed_extra(&mut h, e);
        }
        h.finish()
    }

    fn sip(&self) -> SipHasher24 {
        SipHasher24::new_with_key(&self.key)
    }

    /// Keys of consecutive full blocks of `tokens`, chained from `parent`.
    /// A trailing partial block is ignored (engines only cache full blocks).
    /// `extra(i)` gives block `i`'s extra keys.
    pub fn chain_keys<'e, F>(
        &self,
        parent: BlockKey,
        tokens: &[u32],
        block_size: usize,
        mut extra: F,
    ) -> Result<Vec<BlockKey>, KeyError>
    where
        F: FnMut(usize) -> &'e [ExtraKey],
    {
        if block_size == 0 {
            return Err(KeyError::ZeroBlockSize);
        }
        let mut keys = Vec::with_capacity(tokens.len() / block_size);
        let mut prev = parent;
        for (i, block) in tokens.chunks_exact(block_size).enumerate() {
            prev = self.block_key(prev, block, extra(i));
            keys.push(prev);
        }
        Ok(keys)
    }

    /// Keys for a request's prompt, with the extra keys vLLM attaches to each block.
    pub fn request_keys(
        &self,
        tokens: &[u32],
        block_size: usize,
        ctx: &RequestContext<'_>,
    ) -> Result<Vec<BlockKey>, KeyError> {
        let root = self.root(ctx.model);
        if ctx.lora_name.is_none() && ctx.cache_salt.is_none() && ctx.mm_items.is_empty() {
            return self.chain_keys(root, tokens, block_size, |_| &[]);
        }
        let per_block = request_extra_keys(ctx, tokens.len() / block_size.max(1), block_size);
        self.chain_keys(root, tokens, block_size, |i| {
            per_block.get(i).map(Vec::as_slice).unwrap_or(&[])
        })
    }
}

/// What besides tokens identifies a request's cached blocks.
#[derive(Debug, Clone, Default)]
pub struct RequestContext<'a> {
    pub model: &'a str,
    pub lora_name: Option<&'a str>,
    /// vLLM's `cache_salt`; enters the first block only, as in vLLM.
    pub cache_salt: Option<&'a str>,
    /// Multimodal placeholders: (content identifier, first token offset, token length).
    pub mm_items: &'a [(String, usize, usize)],
}

/// The extra keys vLLM publishes for each of a request's first `blocks` blocks, in
/// vLLM's order: LoRA name, multimodal (identifier, offset from block start), salt.
pub fn request_extra_keys(
    ctx: &RequestContext<'_>,
    blocks: usize,
    block_size: usize,
) -> Vec<Vec<ExtraKey>> {
    (0..blocks)
        .map(|i| {
            let start = i * block_size;
            let end = start + block_size;
            let mut keys = Vec::new();
            if let Some(lora) = ctx.lora_name {
                keys.push(ExtraKey::Str(lora.to_string()));
            }
            for (id, offset, len) in ctx.mm_items {
                if *offset < end && offset + len > start {
                    let rel = *offset as i64 - start as i64;
                    keys.push(ExtraKey::List(vec![
                        ExtraKey::Str(id.clone()),
                        ExtraKey::Int(rel),
                    ]));
                }
            }
            if i == 0 {
                if let Some(salt) = ctx.cache_salt {
                    keys.push(ExtraKey::Str(salt.to_string()));
                }
            }
            keys
        })
        .collect()
}

/// Keys of the blocks of one `BlockStored` event, chained from the parent's key.
pub fn stored_block_keys(
    hasher: &BlockHasher,
    parent: BlockKey,
    token_ids: &[u32],
    block_size: usize,
    blocks: usize,
    extra_keys: Option<&[Option<Vec<ExtraKey>>]>,
    lora_name: Option<&str>,
) -> Result<Vec<BlockKey>, KeyError> {
    if block_size == 0 {
        return Err(KeyError::ZeroBlockSize);
    }
    if token_ids.len() != blocks * block_size {
        return Err(KeyError::PartialBlock {
            tokens: token_ids.len(),
            block_size,
        });
    }
    match extra_keys {
        Some(extra) => {
            if extra.len() != blocks {
                return Err(KeyError::ExtraKeysMismatch {
                    blocks,
                    extra: extra.len(),
                });
            }
            hasher.chain_keys(parent, token_ids, block_size, |i| {
                extra.get(i).and_then(|e| e.as_deref()).unwrap_or(&[])
            })
        }
        // Releases without extra_keys only publish the LoRA name.
        None => match lora_name {
            Some(name) => {
                let lora = [ExtraKey::Str(name.to_string())];
                hasher.chain_keys(parent, token_ids, block_size, |_| &lora)
            }
            None => hasher.chain_keys(parent, token_ids, block_size, |_| &[]),
        },
    }
}

fn feed_extra(h: &mut SipHasher24, e: &ExtraKey) {
    // Tag + length prefixes keep the encoding injective across variants.
    match e {
        ExtraKey::Nil => {
            h.write(&[0]);
        }
        ExtraKey::Str(s) => {
            h.write(&[1]);
            h.write(&(s.len() as u64).to_le_bytes());
            h.write(s.as_bytes());
        }
        ExtraKey::Int(i) => {
            h.write(&[2]);
            h.write(&i.to_le_bytes());
        }
        ExtraKey::Bytes(b) => {
            h.write(&[3]);
            h.write(&(b.len() as u64).to_le_bytes());
            h.write(b);
        }
        ExtraKey::List(items) => {
            h.write(&[4]);
            h.write(&(items.len() as u64).to_le_bytes());
            for item in items {
                feed_extra(h, item);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + 3).collect()
    }

    #[test]
    fn event_and_request_paths_agree_for_block_sizes() {
        let h = BlockHasher::from_secret(b"s");
        for bs in [16usize, 32, 64] {
            let t = toks(bs * 5 + 3);
            let ctx = RequestContext {
                model: "m",
                ..Default::default()
            };
            let req = h.request_keys(&t, bs, &ctx).unwrap();
            assert_eq!(req.len(), 5);
            // The same blocks published in two events (3 + 2) chain to the same keys.
            let root = h.root("m");
            let a = stored_block_keys(&h, root, &t[..3 * bs], bs, 3, None, None).unwrap();
            let b = stored_block_keys(&h, a[2], &t[3 * bs..5 * bs], bs, 2, None, None).unwrap();
            assert_eq!([a, b].concat(), req);
        }
    }

    #[test]
    fn salt_lora_and_mm_match_vllm_extra_keys_layout() {
        let h = BlockHasher::from_secret(b"s");
        let t = toks(48);
        let ctx = RequestContext {
            model: "m",
            lora_name: Some("sql-lora"),
            cache_salt: Some("tenant-a"),
            mm_items: &[],
        };
        let per_block = request_extra_keys(&ctx, 3, 16);
        // The layout vLLM publishes for LoRA + salt: [lora, salt] then [lora].
        assert_eq!(
            per_block[0],
            vec![
                ExtraKey::Str("sql-lora".into()),
                ExtraKey::Str("tenant-a".into())
            ]
        );
        assert_eq!(per_block[1], vec![ExtraKey::Str("sql-lora".into())]);
        let published: Vec<Option<Vec<ExtraKey>>> = per_block.into_iter().map(Some).collect();
        let from_event =
            stored_block_keys(&h, h.root("m"), &t, 16, 3, Some(&published), None).unwrap();
        assert_eq!(from_event, h.request_keys(&t, 16, &ctx).unwrap());

        let mm = [("mmhash-0123abcd".to_string(), 10usize, 12usize)];
        let ctx = RequestContext {
            model: "m",
            mm_items: &mm,
            ..Default::default()
        };
        let per_block = request_extra_keys(&ctx, 3, 16);
        assert_eq!(
            per_block[1],
            vec![ExtraKey::List(vec![
                ExtraKey::Str("mmhash-0123abcd".into()),
                ExtraKey::Int(-6)
            ])]
        );
        assert!(per_block[2].is_empty());
    }

    #[test]
    fn salt_model_secret_and_tokens_all_change_keys() {
        let h = BlockHasher::from_secret(b"s");
        let t = toks(32);
        let base = RequestContext {
            model: "m",
            ..Default::default()
        };
        let k0 = h.request_keys(&t, 16, &base).unwrap();
        let salted = RequestContext {
            cache_salt: Some("x"),
            ..base.clone()
        };
        let k1 = h.request_keys(&t, 16, &salted).unwrap();
        assert_ne!(k0[0], k1[0]);
        assert_ne!(k0[1], k1[1], "salt must propagate down the chain");
        let other_model = RequestContext {
            model: "n",
            ..base.clone()
        };
        assert_ne!(k0, h.request_keys(&t, 16, &other_model).unwrap());
        let h2 = BlockHasher::from_secret(b"t");
        assert_ne!(k0, h2.request_keys(&t, 16, &base).unwrap());
        assert_ne!(h.fingerprint(), h2.fingerprint());
        let mut t2 = t.clone();
        t2[20] += 1;
        let k2 = h.request_keys(&t2, 16, &base).unwrap();
        assert_eq!(k0[0], k2[0]);
        assert_ne!(k0[1], k2[1]);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let h = BlockHasher::from_secret(b"s");
        assert_eq!(
            h.chain_keys(0, &[1, 2], 0, |_| &[]),
            Err(KeyError::ZeroBlockSize)
        );
        assert!(matches!(
            stored_block_keys(&h, 0, &[1, 2, 3], 2, 2, None, None),
            Err(KeyError::PartialBlock { .. })
        ));
        assert!(matches!(
            stored_block_keys(&h, 0, &[1, 2], 2, 1, Some(&[None, None]), None),
            Err(KeyError::ExtraKeysMismatch { .. })
        ));
    }

    #[test]
    fn extra_key_encoding_is_injective_across_shapes() {
        let h = BlockHasher::from_secret(b"s");
        let a = h.block_key(0, &[1], &[ExtraKey::Str("ab".into())]);
        let b = h.block_key(
            0,
            &[1],
            &[ExtraKey::Str("a".into()), ExtraKey::Str("b".into())],
        );
        let c = h.block_key(0, &[1], &[ExtraKey::Bytes(b"ab".to_vec())]);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(h.block_key(0, &[1, 2], &[]), h.block_key(0, &[1], &[]));
    }
}
