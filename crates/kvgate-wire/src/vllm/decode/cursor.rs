//! The msgpack cursor under the batch decoder: a position over the payload
//! bytes, reading markers, ints, floats, strings and container lengths, each
//! checked against the bytes left, and skipping values of any type.

use rmp::Marker;

use super::{Result, MAX_DEPTH};
use crate::vllm::WireError;

/// A msgpack integer, kept wide enough for both u64 and i64.
pub(super) fn int_value(
    c: &mut Cursor<'_>,
    m: Marker,
    field: &'static str,
) -> Result<Option<i128>> {
    Ok(Some(match m {
        Marker::FixPos(v) => i128::from(v),
        Marker::FixNeg(v) => i128::from(v),
        Marker::U8 => i128::from(c.byte(field)?),
        Marker::U16 => i128::from(c.be::<2>(field)?),
        Marker::U32 => i128::from(c.be::<4>(field)?),
        Marker::U64 => i128::from(c.be::<8>(field)?),
        // Signed forms: reinterpret the big-endian bits at their width.
        Marker::I8 => i128::from(c.byte(field)? as i8),
        Marker::I16 => i128::from(c.be::<2>(field)? as u16 as i16),
        Marker::I32 => i128::from(c.be::<4>(field)? as u32 as i32),
        Marker::I64 => i128::from(c.be::<8>(field)? as i64),
        _ => return Ok(None),
    }))
}

pub(super) struct Cursor<'a> {
    pub(super) buf: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    #[inline]
    pub(super) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    #[inline]
    fn byte(&mut self, what: &'static str) -> Result<u8> {
        match self.buf.get(self.pos) {
            Some(&b) => {
                self.pos += 1;
                Ok(b)
            }
            None => Err(WireError::Truncated(what)),
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    #[inline]
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(WireError::Truncated(what));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// An N-byte big-endian unsigned integer (N <= 8).
    #[inline]
    pub(super) fn be<const N: usize>(&mut self, what: &'static str) -> Result<u64> {
        let s = self.take(N, what)?;
        Ok(s.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    #[inline]
    pub(super) fn marker(&mut self, what: &'static str) -> Result<Marker> {
        Ok(Marker::from_u8(self.byte(what)?))
    }

    /// Consumes a nil if one is next.
    #[inline]
    pub(super) fn take_nil(&mut self) -> Result<bool> {
        match self.peek() {
            Some(0xc0) => {
                self.pos += 1;
                Ok(true)
            }
            Some(_) => Ok(false),
            None => Err(WireError::Truncated("value")),
        }
    }

    /// A container length, rejected up front when the bytes left cannot hold
    /// `n` items of at least `min_item` bytes each: this is what keeps a forged
    /// 4-billion-element header from costing anything.
    #[inline]
    fn check_len(&self, n: usize, min_item: usize, what: &'static str) -> Result<usize> {
        if n.saturating_mul(min_item) > self.remaining() {
            return Err(WireError::Truncated(what));
        }
        Ok(n)
    }

    pub(super) fn array_len_of(&mut self, m: Marker, what: &'static str) -> Result<Option<usize>> {
        self.array_len_limited(m, what, usize::MAX)
    }

    /// An array length, checked against `limit` before the bytes left, so an
    /// oversized claim is reported as such rather than as a truncation.
    fn array_len_limited(
        &mut self,
        m: Marker,
        what: &'static str,
        limit: usize,
    ) -> Result<Option<usize>> {
        let n = match m {
            Marker::FixArray(n) => usize::from(n),
            Marker::Array16 => self.be::<2>(what)? as usize,
            Marker::Array32 => self.be::<4>(what)? as usize,
            _ => return Ok(None),
        };
        if n > limit {
            return Err(WireError::TooLarge {
                field: what,
                len: n,
                limit,
            });
        }
        self.check_len(n, 1, what).map(Some)
    }

    pub(super) fn map_len_of(&mut self, m: Marker, what: &'static str) -> Result<Option<usize>> {
        let n = match m {
            Marker::FixMap(n) => usize::from(n),
            Marker::Map16 => self.be::<2>(what)? as usize,
            Marker::Map32 => self.be::<4>(what)? as usize,
            _ => return Ok(None),
        };
        self.check_len(n, 2, what).map(Some)
    }

    pub(super) fn array_len(&mut self, field: &'static str) -> Result<usize> {
        self.array_len_max(field, usize::MAX)
    }

    pub(super) fn array_len_max(&mut self, field: &'static str, limit: usize) -> Result<usize> {
        let m = self.marker(field)?;
        self.array_len_limited(m, field, limit)?
            .ok_or(WireError::WrongType {
                field,
                expected: "array",
            })
    }

    /// The bytes of a str, if `m` starts one.
    pub(super) fn str_bytes_of(
        &mut self,
        m: Marker,
        what: &'static str,
    ) -> Result<Option<&'a [u8]>> {
        let n = match m {
            Marker::FixStr(n) => usize::from(n),
            Marker::Str8 => usize::from(self.byte(what)?),
            Marker::Str16 => self.be::<2>(what)? as usize,
            Marker::Str32 => self.be::<4>(what)? as usize,
            _ => return Ok(None),
        };
        self.take(n, what).map(Some)
    }

    /// The bytes of a bin, if `m` starts one.
    pub(super) fn bin_of(&mut self, m: Marker, what: &'static str) -> Result<Option<&'a [u8]>> {
        let n = match m {
            Marker::Bin8 => usize::from(self.byte(what)?),
            Marker::Bin16 => self.be::<2>(what)? as usize,
            Marker::Bin32 => self.be::<4>(what)? as usize,
            _ => return Ok(None),
        };
        self.take(n, what).map(Some)
    }

    pub(super) fn utf8(bytes: &'a [u8], field: &'static str) -> Result<&'a str> {
        std::str::from_utf8(bytes).map_err(|e| WireError::Invalid {
            field,
            reason: format!("not utf-8: {e}"),
        })
    }

    pub(super) fn str(&mut self, field: &'static str) -> Result<&'a str> {
        let m = self.marker(field)?;
        match self.str_bytes_of(m, field)? {
            Some(b) => Self::utf8(b, field),
            None => Err(WireError::WrongType {
                field,
                expected: "str",
            }),
        }
    }

    pub(super) fn opt_string(&mut self, field: &'static str) -> Result<Option<String>> {
        if self.take_nil()? {
            return Ok(None);
        }
        self.str(field).map(|s| Some(s.to_owned()))
    }

    pub(super) fn int(&mut self, field: &'static str) -> Result<i128> {
        let m = self.marker(field)?;
        int_value(self, m, field)?.ok_or(WireError::WrongType {
            field,
            expected: "int",
        })
    }

    pub(super) fn i64(&mut self, field: &'static str) -> Result<i64> {
        let v = self.int(field)?;
        i64::try_from(v).map_err(|_| WireError::Invalid {
            field,
            reason: format!("{v} does not fit i64"),
        })
    }

    pub(super) fn u32(&mut self, field: &'static str) -> Result<u32> {
        let v = self.int(field)?;
        u32::try_from(v).map_err(|_| WireError::Invalid {
            field,
            reason: format!("{v} does not fit u32"),
        })
    }

    pub(super) fn opt_i64(&mut self, field: &'static str) -> Result<Option<i64>> {
        if self.take_nil()? {
            return Ok(None);
        }
        self.i64(field).map(Some)
    }

    /// The batch timestamp: float64 from msgspec, but float32 and ints are
    /// accepted since any msgpack encoder may pick those for a Python float.
    pub(super) fn float(&mut self, field: &'static str) -> Result<f64> {
        match self.marker(field)? {
            Marker::F64 => Ok(f64::from_bits(self.be::<8>(field)?)),
            Marker::F32 => Ok(f64::from(f32::from_bits(self.be::<4>(field)? as u32))),
            m => match int_value(self, m, field)? {
                Some(v) => Ok(v as f64),
                None => Err(WireError::WrongType {
                    field,
                    expected: "float",
                }),
            },
        }
    }

    /// Skips one value of any type (unknown keys, trailing positional fields).
    pub(super) fn skip(&mut self, depth: usize) -> Result<()> {
        const F: &str = "unknown value";
        if depth > MAX_DEPTH {
            return Err(WireError::Invalid {
                field: F,
                reason: format!("nested deeper than {MAX_DEPTH}"),
            });
        }
        let m = self.marker(F)?;
        let fixed = match m {
            Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
                0
            }
            Marker::U8 | Marker::I8 => 1,
            Marker::U16 | Marker::I16 => 2,
            Marker::U32 | Marker::I32 | Marker::F32 => 4,
            Marker::U64 | Marker::I64 | Marker::F64 => 8,
            Marker::FixExt1 => 2,
            Marker::FixExt2 => 3,
            Marker::FixExt4 => 5,
            Marker::FixExt8 => 9,
            Marker::FixExt16 => 17,
            Marker::Ext8 => usize::from(self.byte(F)?) + 1,
            Marker::Ext16 => self.be::<2>(F)? as usize + 1,
            Marker::Ext32 => (self.be::<4>(F)? as usize).saturating_add(1),
            Marker::FixStr(n) => usize::from(n),
            Marker::Str8 | Marker::Bin8 => usize::from(self.byte(F)?),
            Marker::Str16 | Marker::Bin16 => self.be::<2>(F)? as usize,
            Marker::Str32 | Marker::Bin32 => self.be::<4>(F)? as usize,
            Marker::FixArray(_) | Marker::Array16 | Marker::Array32 => {
                let n = self.array_len_of(m, F)?.unwrap_or(0);
                for _ in 0..n {
                    self.skip(depth + 1)?;
                }
                return Ok(());
            }
            Marker::FixMap(_) | Marker::Map16 | Marker::Map32 => {
                let n = self.map_len_of(m, F)?.unwrap_or(0);
                for _ in 0..n {
                    self.skip(depth + 1)?;
                    self.skip(depth + 1)?;
                }
                return Ok(());
            }
            Marker::Reserved => {
                return Err(WireError::Invalid {
                    field: F,
                    reason: "reserved marker 0xc1".to_owned(),
                })
            }
        };
        self.take(fixed, F).map(|_| ())
    }
}
