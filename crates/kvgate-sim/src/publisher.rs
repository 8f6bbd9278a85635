//! Publishes KV event batches the way vLLM's ZMQ publisher does.
//!
//! Frames `[topic, seq (8-byte BE), payload]` on a PUB socket; the last
//! `replay_buffer` payloads are kept so a subscriber that saw a gap can ask the
//! replay ROUTER for `[b"", start_seq]` and get `[b"", topic, seq, payload]` per
//! buffered batch, then the end marker (seq = -1).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use kvgate_wire::vllm::{
    decode_replay_request, encode_batch, encode_replay_end, encode_replay_reply, EventBatch,
    EventEncoding, ReplayReplyGeneration,
};
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// vLLM's default replay buffer length (batches).
pub const DEFAULT_REPLAY_BUFFER: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("zmq: {0}")]
    Zmq(#[from] zeromq::ZmqError),
    #[error("bad endpoint {0:?}")]
    Endpoint(String),
}

type Buffer = Arc<Mutex<VecDeque<(i64, Bytes)>>>;

pub struct EventPublisher {
    socket: tokio::sync::Mutex<PubSocket>,
    topic: Bytes,
    next_seq: AtomicI64,
    buffer: Buffer,
    capacity: usize,
    /// Fault injection: how many upcoming batches to keep out of the live stream
    /// (they stay replayable), as when a subscriber misses messages.
    drop_next: AtomicU64,
    pub pub_endpoint: String,
    pub replay_endpoint: Option<String>,
    replay_task: Option<JoinHandle<()>>,
}

impl Drop for EventPublisher {
    fn drop(&mut self) {
        if let Some(t) = &self.replay_task {
            t.abort();
        }
    }
}

impl EventPublisher {
    /// Binds the PUB socket (and the replay ROUTER, if given). Port 0 picks a free
    /// port; the bound endpoints are in `pub_endpoint` / `replay_endpoint`.
    pub async fn bind(
        pub_endpoint: &str,
        replay_endpoint: Option<&str>,
        topic: &str,
        replay_buffer: usize,
    ) -> Result<Self, PublishError> {
        let mut socket = PubSocket::new();
        let bound = socket.bind(pub_endpoint).await?.to_string();
        let buffer: Buffer = Arc::new(Mutex::new(VecDeque::new()));
        let topic = Bytes::copy_from_slice(topic.as_bytes());
        let (replay_endpoint, replay_task) = match replay_endpoint {
            Some(ep) => {
                let mut router = RouterSocket::new();
                let bound = router.bind(ep).await?.to_string();
                let task = tokio::spawn(serve_replay(router, buffer.clone(), topic.clone()));
                (Some(bound), Some(task))
            }
            None => (None, None),
        };
        Ok(Self {
            socket: tokio::sync::Mutex::new(socket),
            topic,
            next_seq: AtomicI64::new(0),
            buffer,
            capacity: replay_buffer.max(1),
            drop_next: AtomicU64::new(0),
            pub_endpoint: bound,
            replay_endpoint,
            replay_task,
        })
    }

    /// Publishes one batch; returns its sequence number.
    pub async fn publish(&self, batch: &EventBatch) -> Result<i64, PublishError> {
        let payload = Bytes::from(encode_batch(batch, EventEncoding::Map));
        // Sequence numbers and the live send stay in one order under the lock.
        let mut socket = self.socket.lock().await;
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        {
            let mut buf = self.buffer.lock();
            buf.push_back((seq, payload.clone()));
            while buf.len() > self.capacity {
                buf.pop_front();
            }
        }
        let dropped = self
            .drop_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if !dropped {
            let frames = vec![
                self.topic.clone(),
                Bytes::copy_from_slice(&seq.to_be_bytes()),
                payload,
            ];
            let msg =
                ZmqMessage::try_from(frames).map_err(|e| PublishError::Endpoint(e.to_string()))?;
            socket.send(msg).await?;
        }
        Ok(seq)
    }

    /// Keeps the next `n` batches out of the live stream (still replayable).
    pub fn drop_next(&self, n: u64) {
        self.drop_next.store(n, Ordering::SeqCst);
    }

    /// The sequence number the next batch will get.
    pub fn next_seq(&self) -> i64 {
        self.next_seq.load(Ordering::SeqCst)
    }
}

async fn serve_replay(mut router: RouterSocket, buffer: Buffer, topic: Bytes) {
    loop {
        let msg = match router.recv().await {
            Ok(m) => m.into_vec(),
            Err(e) => {
                tracing::debug!(error = %e, "replay socket receive failed");
                continue;
            }
        };
        let Some((identity, rest)) = msg.split_first() else {
            continue;
        };
        // vLLM ignores malformed requests; so do we.
        let Ok(start) = decode_replay_request(rest) else {
            continue;
        };
        let batches: Vec<(i64, Bytes)> = buffer
            .lock()
            .iter()
            .filter(|(seq, _)| *seq >= start)
            .cloned()
            .collect();
        let replies = batches
            .iter()
            .map(|(seq, payload)| {
                encode_replay_reply(ReplayReplyGeneration::WithTopic, &topic, *seq, payload)
            })
            .chain(std::iter::once(encode_replay_end(
                ReplayReplyGeneration::WithTopic,
            )));
        for frames in replies {
            let frames: Vec<Bytes> = std::iter::once(identity.clone())
                .chain(frames.into_iter().map(Bytes::from))
                .collect();
            let Ok(msg) = ZmqMessage::try_from(frames) else {
                break;
            };
            if let Err(e) = router.send(msg).await {
                tracing::debug!(error = %e, "replay reply failed");
                break;
            }
        }
    }
}
