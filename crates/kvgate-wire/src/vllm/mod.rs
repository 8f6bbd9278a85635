//! vLLM KV-cache events.
//!
//! On the wire (vLLM >= 0.24) a publish is a ZMQ multipart `[topic, seq, payload]`:
//! `seq` is an 8-byte big-endian signed integer and `payload` a msgpack array
//! `[ts: f64, events: [event...], data_parallel_rank: int|nil]`. Each event is a
//! map with a `"type"` key (0.24+) or a tagged array `["BlockStored", ...]` (older).

mod decode;
mod encode;
mod frames;

pub use decode::{decode_batch, MAX_DEPTH, MAX_EVENTS, MAX_TOKEN_IDS};
pub use encode::{encode_batch, EventEncoding};
pub use frames::{
    decode_replay_reply, decode_replay_request, encode_pub_frames, encode_replay_end,
    encode_replay_reply, encode_replay_request, parse_pub_frames, PubFrame, ReplayReply,
    ReplayReplyGeneration, REPLAY_END_SEQ,
};

/// A block hash as the engine publishes it, folded to 64 bits.
///
/// vLLM publishes either an integer (the low 8 bytes, big-endian, of the digest;
/// the default) or the raw digest bytes. Both fold to the same value: the last 8
/// bytes read big-endian.
pub type EngineHash = u64;

/// One batch of events, flushed by the engine once per step.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    pub ts: f64,
    pub events: Vec<KvEvent>,
    pub data_parallel_rank: Option<i64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    BlockStored(BlockStored),
    BlockRemoved(BlockRemoved),
    AllBlocksCleared,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlockStored {
    pub block_hashes: Vec<EngineHash>,
    pub parent_block_hash: Option<EngineHash>,
    /// `block_hashes.len() * block_size` token ids, the blocks' contents in order.
    pub token_ids: Vec<u32>,
    pub block_size: u32,
    pub lora_id: Option<i64>,
    /// Where the blocks live: "GPU", "CPU", "DISK", ... (None in old releases).
    pub medium: Option<String>,
    pub lora_name: Option<String>,
    /// One entry per block (None where the engine sent none, e.g. old releases).
    pub extra_keys: Option<Vec<Option<Vec<ExtraKey>>>>,
    pub group_idx: u32,
    /// "full_attention", "sliding_window", ... (None in old releases).
    pub kv_cache_spec_kind: Option<String>,
}

impl BlockStored {
    /// Full-attention blocks of the base model stored on the GPU, with no
    /// extra keys: what vLLM publishes for a plain request.
    pub fn on_gpu(
        block_hashes: Vec<EngineHash>,
        parent_block_hash: Option<EngineHash>,
        token_ids: Vec<u32>,
        block_size: u32,
    ) -> Self {
        Self {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            lora_id: None,
            medium: Some("GPU".into()),
            lora_name: None,
            extra_keys: None,
            group_idx: 0,
            kv_cache_spec_kind: Some("full_attention".into()),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BlockRemoved {
    pub block_hashes: Vec<EngineHash>,
    pub medium: Option<String>,
    pub group_idx: u32,
}

/// One item of a block's extra hash keys, as vLLM publishes them (untagged):
/// the LoRA name and the cache salt are strings, a multimodal item is
/// `[identifier, offset]`, a prompt-embeds digest is bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ExtraKey {
    Str(String),
    Int(i64),
    Bytes(Vec<u8>),
    List(Vec<ExtraKey>),
    Nil,
}

/// Everything that can go wrong decoding engine input. Never a panic.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("truncated input: {0}")]
    Truncated(&'static str),
    #[error("unexpected msgpack type for {field}: expected {expected}")]
    WrongType {
        field: &'static str,
        expected: &'static str,
    },
    #[error("unknown event type {0:?}")]
    UnknownEventType(String),
    #[error("field {field} has {len} items, more than the limit {limit}")]
    TooLarge {
        field: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("invalid value for {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("trailing bytes after payload: {0}")]
    TrailingBytes(usize),
    #[error("bad ZMQ framing: {0}")]
    Framing(String),
}
