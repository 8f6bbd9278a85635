//! Encoding of a KV-event batch the way vLLM's msgspec encoder writes it, so
//! the engine simulator's output is byte-for-byte what a real engine sends.
//!
//! msgspec rules followed here: a float is always float64, an int takes the
//! smallest msgpack form, str/bin/array/map take the smallest header, and a
//! struct field left at its `None` default is omitted (vLLM's event structs use
//! `omit_defaults`; of the fields modelled here only `extra_keys` has such a
//! default, the others are always written, `nil` included).

use super::{BlockRemoved, BlockStored, EventBatch, ExtraKey, KvEvent};

/// Which wire form of the events to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventEncoding {
    /// Maps tagged by `"type"`, as vLLM 0.24 to 0.32 send them (smallest map
    /// headers; the real 0.32 capture is byte-identical).
    Map,
    /// Maps as vLLM 0.33 sends them: identical to [`EventEncoding::Map`] except
    /// that `BlockStored` always carries a map16 header, because its struct
    /// has more than 15 fields and msgspec sizes the header for the most it
    /// could write before omitting defaults.
    MapV033,
    /// Positional tagged arrays, as vLLM 0.23 and older send them:
    /// `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size,
    /// lora_id, medium, lora_name, extra_keys, group_idx, kv_cache_spec_kind,
    /// kv_cache_spec_sliding_window]` (the last always nil here, since it is
    /// not modelled), `["BlockRemoved", block_hashes, medium, group_idx]` and
    /// `["AllBlocksCleared"]`.
    TaggedArray,
}

/// Encodes a batch payload: `[ts, [event...], dp_rank|nil]`.
pub fn encode_batch(batch: &EventBatch, encoding: EventEncoding) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(64 + batch.events.len() * 128));
    w.array(3);
    w.f64(batch.ts);
    w.array(batch.events.len());
    for ev in &batch.events {
        match encoding {
            EventEncoding::Map | EventEncoding::MapV033 => w.map_event(ev, encoding),
            EventEncoding::TaggedArray => w.tagged_event(ev),
        }
    }
    match batch.data_parallel_rank {
        Some(r) => w.int(i128::from(r)),
        None => w.nil(),
    }
    w.0
}

struct Writer(Vec<u8>);

impl Writer {
    fn nil(&mut self) {
        self.0.push(0xc0);
    }

    fn f64(&mut self, v: f64) {
        self.0.push(0xcb);
        self.0.extend_from_slice(&v.to_bits().to_be_bytes());
    }

    /// Smallest msgpack int form; non-negative values always use the unsigned
    /// forms, as msgspec does. Takes i128 so u64 hashes and i64 ids share it.
    fn int(&mut self, v: i128) {
        let out = &mut self.0;
        if v >= 0 {
            let v = v as u64;
            if v < 0x80 {
                out.push(v as u8);
            } else if v <= 0xff {
                out.extend_from_slice(&[0xcc, v as u8]);
            } else if v <= 0xffff {
                out.push(0xcd);
                out.extend_from_slice(&(v as u16).to_be_bytes());
            } else if v <= 0xffff_ffff {
                out.push(0xce);
                out.extend_from_slice(&(v as u32).to_be_bytes());
            } else {
                out.push(0xcf);
                out.extend_from_slice(&v.to_be_bytes());
            }
        } else {
            let v = v as i64;
            if v >= -32 {
                out.push(v as i8 as u8);
            } else if v >= i64::from(i8::MIN) {
                out.extend_from_slice(&[0xd0, v as i8 as u8]);
            } else if v >= i64::from(i16::MIN) {
                out.push(0xd1);
                out.extend_from_slice(&(v as i16).to_be_bytes());
            } else if v >= i64::from(i32::MIN) {
                out.push(0xd2);
                out.extend_from_slice(&(v as i32).to_be_bytes());
            } else {
                out.push(0xd3);
                out.extend_from_slice(&v.to_be_bytes());
            }
        }
    }

    /// A header whose small form packs the length into `fix`'s low bits and
    /// whose larger forms are `m8` (if any), `m16`, `m32`.
    fn header(&mut self, n: usize, fix: (u8, usize), m8: Option<u8>, m16: u8, m32: u8) {
        if n <= fix.1 {
            self.0.push(fix.0 | n as u8);
        } else if let (Some(m), true) = (m8, n <= 0xff) {
            self.0.extend_from_slice(&[m, n as u8]);
        } else if n <= 0xffff {
            self.0.push(m16);
            self.0.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            self.0.push(m32);
            self.0.extend_from_slice(&(n as u32).to_be_bytes());
        }
    }

    fn array(&mut self, n: usize) {
        self.header(n, (0x90, 15), None, 0xdc, 0xdd);
    }

    fn map(&mut self, n: usize) {
        self.header(n, (0x80, 15), None, 0xde, 0xdf);
    }

    fn map16(&mut self, n: usize) {
        self.0.push(0xde);
        self.0.extend_from_slice(&(n as u16).to_be_bytes());
    }

    fn str(&mut self, s: &str) {
        self.header(s.len(), (0xa0, 31), Some(0xd9), 0xda, 0xdb);
        self.0.extend_from_slice(s.as_bytes());
    }

    fn bin(&mut self, b: &[u8]) {
        let n = b.len();
        // bin has no fix form: bin8 covers even the empty slice.
        if n <= 0xff {
            self.0.extend_from_slice(&[0xc4, n as u8]);
        } else if n <= 0xffff {
            self.0.push(0xc5);
            self.0.extend_from_slice(&(n as u16).to_be_bytes());
        } else {
            self.0.push(0xc6);
            self.0.extend_from_slice(&(n as u32).to_be_bytes());
        }
        self.0.extend_from_slice(b);
    }

    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.str(s),
            None => self.nil(),
        }
    }

    fn opt_int(&mut self, v: Option<i128>) {
        match v {
            Some(v) => self.int(v),
            None => self.nil(),
        }
    }

    fn hashes(&mut self, hs: &[u64]) {
        self.array(hs.len());
        for &h in hs {
            self.int(i128::from(h));
        }
    }

    fn token_ids(&mut self, ts: &[u32]) {
        self.array(ts.len());
        for &t in ts {
            self.int(i128::from(t));
        }
    }

    fn extra_key(&mut self, k: &ExtraKey) {
        match k {
            ExtraKey::Str(s) => self.str(s),
            ExtraKey::Int(v) => self.int(i128::from(*v)),
            ExtraKey::Bytes(b) => self.bin(b),
            ExtraKey::Nil => self.nil(),
            ExtraKey::List(items) => {
                self.array(items.len());
                for i in items {
                    self.extra_key(i);
                }
            }
        }
    }

    fn extra_keys(&mut self, keys: Option<&[Option<Vec<ExtraKey>>]>) {
        let Some(keys) = keys else {
            return self.nil();
        };
        self.array(keys.len());
        for block in keys {
            match block {
                None => self.nil(),
                Some(items) => {
                    self.array(items.len());
                    for i in items {
                        self.extra_key(i);
                    }
                }
            }
        }
    }

    fn map_event(&mut self, ev: &KvEvent, encoding: EventEncoding) {
        match ev {
            KvEvent::BlockStored(s) => self.map_stored(s, encoding),
            KvEvent::BlockRemoved(r) => self.map_removed(r),
            KvEvent::AllBlocksCleared => {
                self.map(1);
                self.str("type");
                self.str("AllBlocksCleared");
            }
        }
    }

    fn map_stored(&mut self, s: &BlockStored, encoding: EventEncoding) {
        let n = if s.extra_keys.is_some() { 11 } else { 10 };
        if encoding == EventEncoding::MapV033 {
            self.map16(n);
        } else {
            self.map(n);
        }
        self.str("type");
        self.str("BlockStored");
        self.str("block_hashes");
        self.hashes(&s.block_hashes);
        self.str("parent_block_hash");
        self.opt_int(s.parent_block_hash.map(i128::from));
        self.str("token_ids");
        self.token_ids(&s.token_ids);
        self.str("block_size");
        self.int(i128::from(s.block_size));
        self.str("lora_id");
        self.opt_int(s.lora_id.map(i128::from));
        self.str("medium");
        self.opt_str(s.medium.as_deref());
        self.str("lora_name");
        self.opt_str(s.lora_name.as_deref());
        if s.extra_keys.is_some() {
            self.str("extra_keys");
            self.extra_keys(s.extra_keys.as_deref());
        }
        self.str("group_idx");
        self.int(i128::from(s.group_idx));
        self.str("kv_cache_spec_kind");
        self.opt_str(s.kv_cache_spec_kind.as_deref());
    }

    fn map_removed(&mut self, r: &BlockRemoved) {
        self.map(4);
        self.str("type");
        self.str("BlockRemoved");
        self.str("block_hashes");
        self.hashes(&r.block_hashes);
        self.str("medium");
        self.opt_str(r.medium.as_deref());
        self.str("group_idx");
        self.int(i128::from(r.group_idx));
    }

    fn tagged_event(&mut self, ev: &KvEvent) {
        match ev {
            KvEvent::BlockStored(s) => {
                self.array(12);
                self.str("BlockStored");
                self.hashes(&s.block_hashes);
                self.opt_int(s.parent_block_hash.map(i128::from));
                self.token_ids(&s.token_ids);
                self.int(i128::from(s.block_size));
                self.opt_int(s.lora_id.map(i128::from));
                self.opt_str(s.medium.as_deref());
                self.opt_str(s.lora_name.as_deref());
                self.extra_keys(s.extra_keys.as_deref());
                self.int(i128::from(s.group_idx));
                self.opt_str(s.kv_cache_spec_kind.as_deref());
                // kv_cache_spec_sliding_window: not modelled.
                self.nil();
            }
            KvEvent::BlockRemoved(r) => {
                self.array(4);
                self.str("BlockRemoved");
                self.hashes(&r.block_hashes);
                self.opt_str(r.medium.as_deref());
                self.int(i128::from(r.group_idx));
            }
            KvEvent::AllBlocksCleared => {
                self.array(1);
                self.str("AllBlocksCleared");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc_int(v: i128) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        w.int(v);
        w.0
    }

    #[test]
    fn ints_take_smallest_form() {
        assert_eq!(enc_int(0), [0x00]);
        assert_eq!(enc_int(127), [0x7f]);
        assert_eq!(enc_int(128), [0xcc, 0x80]);
        assert_eq!(enc_int(256), [0xcd, 0x01, 0x00]);
        assert_eq!(enc_int(65536), [0xce, 0, 1, 0, 0]);
        assert_eq!(enc_int(1 << 32), [0xcf, 0, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(enc_int(-1), [0xff]);
        assert_eq!(enc_int(-32), [0xe0]);
        assert_eq!(enc_int(-33), [0xd0, 0xdf]);
        assert_eq!(enc_int(-129), [0xd1, 0xff, 0x7f]);
        assert_eq!(enc_int(-32769), [0xd2, 0xff, 0xff, 0x7f, 0xff]);
        assert_eq!(enc_int(i128::from(i64::MIN))[0], 0xd3);
    }

    #[test]
    fn str_and_bin_headers() {
        let mut w = Writer(Vec::new());
        w.str(&"x".repeat(31));
        assert_eq!(w.0[0], 0xbf);
        let mut w = Writer(Vec::new());
        w.str(&"x".repeat(32));
        assert_eq!(&w.0[..2], &[0xd9, 32]);
        let mut w = Writer(Vec::new());
        w.bin(&[]);
        assert_eq!(w.0, [0xc4, 0]);
        let mut w = Writer(Vec::new());
        w.bin(&[0; 300]);
        assert_eq!(&w.0[..3], &[0xc5, 0x01, 0x2c]);
    }
}
