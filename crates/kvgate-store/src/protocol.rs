//! LMCache's `lm://` wire format (0.5.6, native struct order: little-endian
//! 4-byte ints on the platforms LMCache runs on). A request is a 186-byte
//! header, `iiiiiiiii150s`: command, length, fmt, dtype, location, shape[4],
//! then the key, space-padded; a PUT's payload (`length` bytes) follows. A
//! reply is a 36-byte header, `iiiiiiiii`: code, length, fmt, dtype,
//! shape[4], location; a GET hit's payload follows. PUT and LIST get no
//! reply; GET answers 200 with the chunk or 400; EXIST and HEALTH 200 or 400.

use crate::key::{ChunkKey, KeyError, MAX_KEY_LEN};

pub const CLIENT_HEADER_LEN: usize = 20 + 16 + MAX_KEY_LEN;
pub const SERVER_HEADER_LEN: usize = 36;

pub const SUCCESS: i32 = 200;
pub const FAIL: i32 = 400;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Put,
    Get,
    Exist,
    List,
    Health,
}

impl Command {
    pub fn code(self) -> i32 {
        match self {
            Command::Put => 1,
            Command::Get => 2,
            Command::Exist => 3,
            Command::List => 4,
            Command::Health => 5,
        }
    }

    fn from_code(c: i32) -> Option<Self> {
        Some(match c {
            1 => Command::Put,
            2 => Command::Get,
            3 => Command::Exist,
            4 => Command::List,
            5 => Command::Health,
            _ => return None,
        })
    }
}

/// How the client describes a chunk's payload; stored with it and repeated
/// in a GET reply (the client sizes its buffer from it). Opaque to the
/// store: payloads are never decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkMeta {
    pub fmt: i32,
    pub dtype: i32,
    pub shape: [i32; 4],
}

impl ChunkMeta {
    /// What LMCache's own server puts in a reply without a chunk: fmt
    /// KV_2LTD (1), dtype float16 (2), a zero shape.
    pub const EMPTY: ChunkMeta = ChunkMeta {
        fmt: 1,
        dtype: 2,
        shape: [0; 4],
    };
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    /// Payload bytes that follow (PUT).
    pub length: u32,
    pub meta: ChunkMeta,
    pub location: i32,
    pub key: ChunkKey,
}

/// Why a request header is refused. The connection is closed after one:
/// without a valid header there is no telling where the next one starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("unknown command {0}")]
    UnknownCommand(i32),
    #[error("negative payload length {0}")]
    NegativeLength(i32),
    #[error("a {0:?} request carries no payload, but its length is {1}")]
    UnexpectedPayload(Command, u32),
    #[error("key is not UTF-8")]
    KeyNotUtf8,
    #[error(transparent)]
    Key(#[from] KeyError),
}

fn int_at(buf: &[u8], i: usize) -> i32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[4 * i..4 * i + 4]);
    i32::from_le_bytes(b)
}

fn put_int(buf: &mut [u8], i: usize, v: i32) {
    buf[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
}

impl Request {
    pub fn decode(buf: &[u8; CLIENT_HEADER_LEN]) -> Result<Self, ProtocolError> {
        let code = int_at(buf, 0);
        let command = Command::from_code(code).ok_or(ProtocolError::UnknownCommand(code))?;
        let raw_len = int_at(buf, 1);
        let length = u32::try_from(raw_len).map_err(|_| ProtocolError::NegativeLength(raw_len))?;
        if command != Command::Put && length != 0 {
            return Err(ProtocolError::UnexpectedPayload(command, length));
        }
        let meta = ChunkMeta {
            fmt: int_at(buf, 2),
            dtype: int_at(buf, 3),
            shape: [
                int_at(buf, 5),
                int_at(buf, 6),
                int_at(buf, 7),
                int_at(buf, 8),
            ],
        };
        let key_bytes = &buf[36..];
        // Python's struct pads `s` with NULs; LMCache pads with spaces first.
        let end = key_bytes
            .iter()
            .rposition(|b| *b != b' ' && *b != 0)
            .map_or(0, |i| i + 1);
        let key = std::str::from_utf8(&key_bytes[..end]).map_err(|_| ProtocolError::KeyNotUtf8)?;
        Ok(Request {
            command,
            length,
            meta,
            location: int_at(buf, 4),
            key: ChunkKey::parse(key)?,
        })
    }

    /// The header as LMCache's client writes it (tests and tools).
    pub fn encode(&self) -> [u8; CLIENT_HEADER_LEN] {
        let mut buf = [b' '; CLIENT_HEADER_LEN];
        let ints = [
            self.command.code(),
            i32::try_from(self.length).unwrap_or(i32::MAX),
            self.meta.fmt,
            self.meta.dtype,
            self.location,
            self.meta.shape[0],
            self.meta.shape[1],
            self.meta.shape[2],
            self.meta.shape[3],
        ];
        for (i, v) in ints.into_iter().enumerate() {
            put_int(&mut buf, i, v);
        }
        let key = self.key.to_string();
        let n = key.len().min(MAX_KEY_LEN);
        buf[36..36 + n].copy_from_slice(&key.as_bytes()[..n]);
        buf
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub code: i32,
    pub length: u32,
    pub meta: ChunkMeta,
    pub location: i32,
}

impl Reply {
    /// 200 with no chunk (EXIST, HEALTH).
    pub const OK: Reply = Reply {
        code: SUCCESS,
        length: 0,
        meta: ChunkMeta::EMPTY,
        location: 0,
    };
    /// 400 (a miss), byte for byte what LMCache's server sends.
    pub const FAIL: Reply = Reply {
        code: FAIL,
        length: 0,
        meta: ChunkMeta::EMPTY,
        location: 0,
    };

    /// A GET hit: its payload follows.
    pub fn hit(length: u32, meta: ChunkMeta) -> Reply {
        Reply {
            code: SUCCESS,
            length,
            meta,
            location: 0,
        }
    }

    pub fn encode(&self) -> [u8; SERVER_HEADER_LEN] {
        let mut buf = [0u8; SERVER_HEADER_LEN];
        let ints = [
            self.code,
            i32::try_from(self.length).unwrap_or(i32::MAX),
            self.meta.fmt,
            self.meta.dtype,
            self.meta.shape[0],
            self.meta.shape[1],
            self.meta.shape[2],
            self.meta.shape[3],
            self.location,
        ];
        for (i, v) in ints.into_iter().enumerate() {
            put_int(&mut buf, i, v);
        }
        buf
    }

    pub fn decode(buf: &[u8; SERVER_HEADER_LEN]) -> Reply {
        Reply {
            code: int_at(buf, 0),
            length: u32::try_from(int_at(buf, 1)).unwrap_or(0),
            meta: ChunkMeta {
                fmt: int_at(buf, 2),
                dtype: int_at(buf, 3),
                shape: [
                    int_at(buf, 4),
                    int_at(buf, 5),
                    int_at(buf, 6),
                    int_at(buf, 7),
                ],
            },
            location: int_at(buf, 8),
        }
    }
}
