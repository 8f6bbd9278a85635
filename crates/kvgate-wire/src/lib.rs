//! Wire formats spoken by kvgate.
//!
//! [`vllm`] decodes and encodes the KV-cache events that vLLM publishes over ZMQ
//! (`BlockStored`, `BlockRemoved`, `AllBlocksCleared`), in both the map form used
//! since vLLM 0.24 and the older tagged-array form, plus the ZMQ framing around
//! them (publish frames and the replay request/reply exchange).

pub mod vllm;
