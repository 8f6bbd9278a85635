//! Decoding of a KV-event batch payload (the third frame of a publish).
//!
//! A hand-written cursor over the msgpack bytes, classified with
//! [`rmp::Marker`]: no intermediate value tree, no serde, so a batch is decoded
//! in one pass straight into [`EventBatch`]. The input comes from the network,
//! so every length is checked against the bytes actually left before anything
//! is allocated or iterated, and nothing here can panic.
//!
//! The msgpack primitives (the `Cursor` and its reads of ints, strings,
//! lengths and skipped values) are in `cursor`; this module holds the batch
//! and event structure on top of them.

mod cursor;

use cursor::{int_value, Cursor};
use rmp::Marker;

use super::{BlockRemoved, BlockStored, EngineHash, EventBatch, ExtraKey, KvEvent, WireError};

/// Most events accepted in one batch (vLLM flushes once per engine step).
pub const MAX_EVENTS: usize = 1 << 20;
/// Most token ids accepted in one `BlockStored`.
pub const MAX_TOKEN_IDS: usize = 1 << 24;
/// Deepest nesting followed when skipping unknown values or reading extra keys.
pub const MAX_DEPTH: usize = 32;

type Result<T> = std::result::Result<T, WireError>;

/// Decodes one batch payload: `[ts, [event...], dp_rank|nil, ...]`.
///
/// Accepts both event forms (maps tagged by `"type"`, vLLM >= 0.24, and tagged
/// arrays, older releases), int or bytes block hashes, and unknown extra keys or
/// trailing positional fields, which are skipped. Bytes after the top-level
/// array are an error.
pub fn decode_batch(payload: &[u8]) -> Result<EventBatch> {
    let mut c = Cursor::new(payload);
    let n = c.array_len("batch")?;
    if n < 2 {
        return Err(WireError::Invalid {
            field: "batch",
            reason: format!("array of {n} items, need at least [ts, events]"),
        });
    }
    let ts = c.float("ts")?;
    let events = c.events()?;
    let data_parallel_rank = if n >= 3 {
        if c.take_nil()? {
            None
        } else {
            Some(c.i64("data_parallel_rank")?)
        }
    } else {
        None
    };
    // Later releases may append fields to the batch; they carry nothing we use.
    for _ in 3..n {
        c.skip(0)?;
    }
    let left = c.remaining();
    if left != 0 {
        return Err(WireError::TrailingBytes(left));
    }
    Ok(EventBatch {
        ts,
        events,
        data_parallel_rank,
    })
}

/// Which event a `"type"` tag names.
#[derive(Clone, Copy)]
enum Kind {
    Stored,
    Removed,
    Cleared,
}

fn kind_of(tag: &str) -> Result<Kind> {
    match tag {
        "BlockStored" => Ok(Kind::Stored),
        "BlockRemoved" => Ok(Kind::Removed),
        "AllBlocksCleared" => Ok(Kind::Cleared),
        other => Err(WireError::UnknownEventType(other.to_owned())),
    }
}

/// Fields gathered from one event before its kind is known (map keys come in
/// any order, so `"type"` may arrive last).
#[derive(Default)]
struct Fields {
    block_hashes: Option<Vec<EngineHash>>,
    parent_block_hash: Option<EngineHash>,
    token_ids: Option<Vec<u32>>,
    block_size: Option<u32>,
    lora_id: Option<i64>,
    medium: Option<String>,
    lora_name: Option<String>,
    extra_keys: Option<Vec<Option<Vec<ExtraKey>>>>,
    group_idx: u32,
    kv_cache_spec_kind: Option<String>,
}

impl Fields {
    fn finish(self, kind: Kind) -> Result<KvEvent> {
        // Built lazily: the error path is the only one that allocates.
        let missing = |field| {
            move || WireError::Invalid {
                field,
                reason: "missing".to_owned(),
            }
        };
        Ok(match kind {
            Kind::Stored => KvEvent::BlockStored(BlockStored {
                block_hashes: self.block_hashes.ok_or_else(missing("block_hashes"))?,
                parent_block_hash: self.parent_block_hash,
                token_ids: self.token_ids.ok_or_else(missing("token_ids"))?,
                block_size: self.block_size.ok_or_else(missing("block_size"))?,
                lora_id: self.lora_id,
                medium: self.medium,
                lora_name: self.lora_name,
                extra_keys: self.extra_keys,
                group_idx: self.group_idx,
                kv_cache_spec_kind: self.kv_cache_spec_kind,
            }),
            Kind::Removed => KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: self.block_hashes.ok_or_else(missing("block_hashes"))?,
                medium: self.medium,
                group_idx: self.group_idx,
            }),
            Kind::Cleared => KvEvent::AllBlocksCleared,
        })
    }
}

/// Folds a digest to an [`EngineHash`]: its last 8 bytes, big-endian, so the
/// bytes form and the int form vLLM publishes for one block agree.
fn fold_hash(bytes: &[u8]) -> EngineHash {
    let tail = &bytes[bytes.len().saturating_sub(8)..];
    tail.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}
impl Cursor<'_> {
    /// A block hash: an int (negative ones keep their two's-complement bits) or
    /// a digest folded by [`fold_hash`].
    #[inline]
    fn hash(&mut self, field: &'static str) -> Result<EngineHash> {
        let m = self.marker(field)?;
        match m {
            Marker::FixPos(v) => Ok(u64::from(v)),
            Marker::U64 => self.be::<8>(field),
            Marker::Bin8 | Marker::Bin16 | Marker::Bin32 => match self.bin_of(m, field)? {
                Some(b) => Ok(fold_hash(b)),
                None => Err(WireError::Truncated(field)),
            },
            _ => match int_value(self, m, field)? {
                Some(v) => Ok(v as i64 as u64),
                None => Err(WireError::WrongType {
                    field,
                    expected: "int or bytes",
                }),
            },
        }
    }

    fn opt_hash(&mut self, field: &'static str) -> Result<Option<EngineHash>> {
        if self.take_nil()? {
            return Ok(None);
        }
        self.hash(field).map(Some)
    }

    fn hashes(&mut self, field: &'static str) -> Result<Vec<EngineHash>> {
        let n = self.array_len(field)?;
        // check_len bounded n by the bytes left, so this allocation is too.
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.hash(field)?);
        }
        Ok(out)
    }

    fn token_ids(&mut self) -> Result<Vec<u32>> {
        const F: &str = "token_ids";
        let n = self.array_len_max(F, MAX_TOKEN_IDS)?;
        let mut out = Vec::with_capacity(n);
        // Token ids dominate a payload's bytes, so the common forms (fixint,
        // u8, u16, u32) are read straight off the slice with one bounds check
        // each; anything else, including a truncated tail, goes through the
        // checked cursor path.
        let buf = self.buf;
        let mut p = self.pos;
        for _ in 0..n {
            let left = buf.len() - p;
            let t = match buf.get(p).copied() {
                Some(b @ 0x00..=0x7f) => {
                    p += 1;
                    u32::from(b)
                }
                Some(0xcc) if left >= 2 => {
                    p += 2;
                    u32::from(buf[p - 1])
                }
                Some(0xcd) if left >= 3 => {
                    p += 3;
                    u32::from(u16::from_be_bytes([buf[p - 2], buf[p - 1]]))
                }
                Some(0xce) if left >= 5 => {
                    p += 5;
                    u32::from_be_bytes([buf[p - 4], buf[p - 3], buf[p - 2], buf[p - 1]])
                }
                _ => {
                    self.pos = p;
                    let t = self.token_slow()?;
                    p = self.pos;
                    t
                }
            };
            out.push(t);
        }
        self.pos = p;
        Ok(out)
    }

    /// One token id in any int form, range-checked to u32.
    #[cold]
    fn token_slow(&mut self) -> Result<u32> {
        const F: &str = "token_ids";
        let v = self.int(F)?;
        u32::try_from(v).map_err(|_| WireError::Invalid {
            field: F,
            reason: format!("{v} does not fit u32"),
        })
    }

    fn extra_keys(&mut self) -> Result<Option<Vec<Option<Vec<ExtraKey>>>>> {
        const F: &str = "extra_keys";
        if self.take_nil()? {
            return Ok(None);
        }
        let n = self.array_len(F)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            if self.take_nil()? {
                out.push(None);
                continue;
            }
            let k = self.array_len(F)?;
            let mut items = Vec::with_capacity(k);
            for _ in 0..k {
                items.push(self.extra_key(1)?);
            }
            out.push(Some(items));
        }
        Ok(Some(out))
    }

    /// One extra-key item. vLLM only puts str, int, bytes, nil and nested
    /// tuples here; a float, bool, map or ext means we would misread the key,
    /// so those are rejected rather than guessed at.
    fn extra_key(&mut self, depth: usize) -> Result<ExtraKey> {
        const F: &str = "extra_keys";
        if depth > MAX_DEPTH {
            return Err(WireError::Invalid {
                field: F,
                reason: format!("nested deeper than {MAX_DEPTH}"),
            });
        }
        let m = self.marker(F)?;
        if let Marker::Null = m {
            return Ok(ExtraKey::Nil);
        }
        if let Some(b) = self.str_bytes_of(m, F)? {
            return Ok(ExtraKey::Str(Self::utf8(b, F)?.to_owned()));
        }
        if let Some(b) = self.bin_of(m, F)? {
            return Ok(ExtraKey::Bytes(b.to_vec()));
        }
        if let Some(n) = self.array_len_of(m, F)? {
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(self.extra_key(depth + 1)?);
            }
            return Ok(ExtraKey::List(items));
        }
        match int_value(self, m, F)? {
            Some(v) => i64::try_from(v)
                .map(ExtraKey::Int)
                .map_err(|_| WireError::Invalid {
                    field: F,
                    reason: format!("{v} does not fit i64"),
                }),
            None => Err(WireError::WrongType {
                field: F,
                expected: "str, int, bytes, nil or array",
            }),
        }
    }

    fn events(&mut self) -> Result<Vec<KvEvent>> {
        const F: &str = "events";
        let n = self.array_len_max(F, MAX_EVENTS)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.event()?);
        }
        Ok(out)
    }

    fn event(&mut self) -> Result<KvEvent> {
        const F: &str = "event";
        let m = self.marker(F)?;
        if let Some(n) = self.map_len_of(m, F)? {
            return self.map_event(n);
        }
        if let Some(n) = self.array_len_of(m, F)? {
            return self.tagged_event(n);
        }
        Err(WireError::WrongType {
            field: F,
            expected: "map or tagged array",
        })
    }

    /// An event as a map (vLLM >= 0.24). Keys are matched by name in any
    /// order; unknown ones (newer releases add fields) are skipped.
    fn map_event(&mut self, n: usize) -> Result<KvEvent> {
        let mut kind = None;
        let mut f = Fields::default();
        for _ in 0..n {
            let m = self.marker("event key")?;
            let Some(key) = self.str_bytes_of(m, "event key")? else {
                // msgspec never writes non-str keys; skip such an entry whole.
                self.pos -= 1;
                self.skip(1)?;
                self.skip(1)?;
                continue;
            };
            match key {
                b"type" => kind = Some(kind_of(self.str("type")?)?),
                b"block_hashes" => f.block_hashes = Some(self.hashes("block_hashes")?),
                b"parent_block_hash" => f.parent_block_hash = self.opt_hash("parent_block_hash")?,
                b"token_ids" => f.token_ids = Some(self.token_ids()?),
                b"block_size" => f.block_size = Some(self.u32("block_size")?),
                b"lora_id" => f.lora_id = self.opt_i64("lora_id")?,
                b"medium" => f.medium = self.opt_string("medium")?,
                b"lora_name" => f.lora_name = self.opt_string("lora_name")?,
                b"extra_keys" => f.extra_keys = self.extra_keys()?,
                b"group_idx" => f.group_idx = self.u32("group_idx")?,
                b"kv_cache_spec_kind" => {
                    f.kv_cache_spec_kind = self.opt_string("kv_cache_spec_kind")?
                }
                _ => self.skip(1)?,
            }
        }
        let kind = kind.ok_or_else(|| WireError::Invalid {
            field: "type",
            reason: "missing".to_owned(),
        })?;
        f.finish(kind)
    }

    /// An event as a tagged array (vLLM < 0.24): `[tag, fields...]` in struct
    /// order. Fields past the ones known are skipped; missing trailing ones
    /// take their defaults.
    fn tagged_event(&mut self, n: usize) -> Result<KvEvent> {
        if n == 0 {
            return Err(WireError::Invalid {
                field: "event",
                reason: "empty tagged array".to_owned(),
            });
        }
        let kind = kind_of(self.str("type")?)?;
        let mut f = Fields::default();
        for i in 1..n {
            match (kind, i) {
                (Kind::Stored | Kind::Removed, 1) => {
                    f.block_hashes = Some(self.hashes("block_hashes")?)
                }
                (Kind::Stored, 2) => f.parent_block_hash = self.opt_hash("parent_block_hash")?,
                (Kind::Stored, 3) => f.token_ids = Some(self.token_ids()?),
                (Kind::Stored, 4) => f.block_size = Some(self.u32("block_size")?),
                (Kind::Stored, 5) => f.lora_id = self.opt_i64("lora_id")?,
                (Kind::Stored, 6) | (Kind::Removed, 2) => f.medium = self.opt_string("medium")?,
                (Kind::Stored, 7) => f.lora_name = self.opt_string("lora_name")?,
                (Kind::Stored, 8) => f.extra_keys = self.extra_keys()?,
                (Kind::Stored, 9) | (Kind::Removed, 3) => f.group_idx = self.u32("group_idx")?,
                (Kind::Stored, 10) => {
                    f.kv_cache_spec_kind = self.opt_string("kv_cache_spec_kind")?
                }
                _ => self.skip(1)?,
            }
        }
        f.finish(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fold_takes_last_eight_bytes_big_endian() {
        assert_eq!(fold_hash(&[]), 0);
        assert_eq!(fold_hash(&[1, 2]), 0x0102);
        let mut d = [0xaau8; 32];
        d[24..].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(fold_hash(&d), 0x0102_0304_0506_0708);
    }

    #[test]
    fn huge_declared_array_fails_fast() {
        // [ts, array32(0xffffffff)] with nothing behind it.
        let mut p = vec![0x92, 0xcb];
        p.extend_from_slice(&1.0f64.to_bits().to_be_bytes());
        p.extend_from_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(decode_batch(&p), Err(WireError::TooLarge { .. })));
        p[10..].copy_from_slice(&[0xdd, 0x00, 0x0f, 0xff, 0xff]);
        assert!(matches!(decode_batch(&p), Err(WireError::Truncated(_))));
    }
}
