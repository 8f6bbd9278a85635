//! LMCache's chunk key strings (since 0.3.15):
//! `model@world_size@worker_id@chunk_hash_hex@dtype[@layer_id][@name%value...]`.
//! The hash is Python's `format(h, "x")` of a signed 64-bit value: lowercase,
//! not zero-padded, `-` for negative. Parsing and printing round-trip
//! exactly, so the server keys what it stores by the client's own string.

use std::fmt;

/// Longest key the client sends (it asserts this before sending).
pub const MAX_KEY_LEN: usize = 150;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    pub model: String,
    pub world_size: u32,
    pub worker_id: u32,
    pub chunk_hash: i64,
    /// LMCache's dtype name (`bfloat16`, `half`, `float`, `fp8_e4m3fn`, ...).
    pub dtype: String,
    /// Per-layer keys (LMCache's layerwise mode).
    pub layer_id: Option<u32>,
    /// `name%value` tags in order; the cache-salt tag is `cachesalt`.
    pub tags: Vec<(String, String)>,
}

/// The tag a request's `kv_transfer_params["lmcache.tag.cachesalt"]` becomes.
pub const CACHE_SALT_TAG: &str = "cachesalt";

/// Why a key string is not in LMCache's grammar. Never echoes the key (it
/// carries a tenant's salt).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is longer than {MAX_KEY_LEN} bytes")]
    TooLong,
    #[error("key has {0} '@' fields, expected at least 5")]
    TooFewFields(usize),
    #[error("key field '{0}' is not valid")]
    BadField(&'static str),
}

impl ChunkKey {
    pub fn parse(s: &str) -> Result<Self, KeyError> {
        if s.len() > MAX_KEY_LEN {
            return Err(KeyError::TooLong);
        }
        if s.bytes().any(|b| b.is_ascii_control()) {
            return Err(KeyError::BadField("control character"));
        }
        let fields: Vec<&str> = s.split('@').collect();
        let [model, world, worker, hash, dtype, rest @ ..] = fields.as_slice() else {
            return Err(KeyError::TooFewFields(fields.len()));
        };
        if model.is_empty() {
            return Err(KeyError::BadField("model"));
        }
        if dtype.is_empty()
            || !dtype
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            return Err(KeyError::BadField("dtype"));
        }
        let num = |v: &str, what| {
            (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .then(|| v.parse::<u32>().ok())
                .flatten()
                .ok_or(KeyError::BadField(what))
        };
        let (layer_id, tag_fields) = match rest.first() {
            Some(f) if !f.contains('%') => (Some(num(f, "layer_id")?), &rest[1..]),
            _ => (None, rest),
        };
        let tags = tag_fields
            .iter()
            .map(|t| match t.split_once('%') {
                Some((n, v)) if !n.is_empty() && !v.contains('%') => {
                    Ok((n.to_string(), v.to_string()))
                }
                _ => Err(KeyError::BadField("tag")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let key = ChunkKey {
            model: model.to_string(),
            world_size: num(world, "world_size")?,
            worker_id: num(worker, "worker_id")?,
            chunk_hash: parse_hash(hash).ok_or(KeyError::BadField("chunk_hash"))?,
            dtype: dtype.to_string(),
            layer_id,
            tags,
        };
        // Only one spelling per key: `007` or `+1` would name a second
        // entry for the same chunk.
        if key.to_string() != s {
            return Err(KeyError::BadField("spelling"));
        }
        Ok(key)
    }

    /// The value of tag `name`, if present.
    pub fn tag(&self, name: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn parse_hash(h: &str) -> Option<i64> {
    let (neg, digits) = match h.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, h),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let magnitude = u64::from_str_radix(digits, 16).ok()?;
    if neg {
        0i64.checked_sub_unsigned(magnitude)
    } else {
        i64::try_from(magnitude).ok()
    }
}

impl fmt::Display for ChunkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hash = if self.chunk_hash < 0 {
            format!("-{:x}", self.chunk_hash.unsigned_abs())
        } else {
            format!("{:x}", self.chunk_hash)
        };
        write!(
            f,
            "{}@{}@{}@{}@{}",
            self.model, self.world_size, self.worker_id, hash, self.dtype
        )?;
        if let Some(l) = self.layer_id {
            write!(f, "@{l}")?;
        }
        for (n, v) in &self.tags {
            write!(f, "@{n}%{v}")?;
        }
        Ok(())
    }
}
