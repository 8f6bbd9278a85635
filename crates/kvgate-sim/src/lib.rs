//! kvgate's simulated vLLM engine.
//!
//! So far: [`publisher::EventPublisher`], which publishes KV events exactly as
//! vLLM 0.32 does (ZMQ PUB frames plus a replay ROUTER). The engine model itself
//! (paged KV cache, scheduler, OpenAI endpoints) builds on it.

pub mod publisher;
