//! The tier's own view of each engine's KV events: a ZMQ SUB per engine,
//! independent of the gateway's, so the checks compare against what the
//! engine actually published.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvgate_wire::vllm::{decode_batch, parse_pub_frames, KvEvent};
use parking_lot::Mutex;
use tokio::task::JoinHandle;
use zeromq::{Socket, SocketRecv, SubSocket};

/// One event batch as received.
#[derive(Debug, Clone)]
pub struct Captured {
    pub engine: usize,
    pub seq: i64,
    pub events: Vec<KvEvent>,
    pub at: Instant,
}

#[derive(Default)]
pub struct EventCapture {
    log: Arc<Mutex<Vec<Captured>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl EventCapture {
    /// Subscribes to `endpoint` (e.g. tcp://127.0.0.1:5557) as engine number `engine`.
    pub async fn subscribe(&mut self, engine: usize, endpoint: &str) -> anyhow::Result<()> {
        let mut sock = SubSocket::new();
        sock.connect(endpoint).await?;
        sock.subscribe("").await?;
        let log = self.log.clone();
        self.tasks.push(tokio::spawn(async move {
            while let Ok(msg) = sock.recv().await {
                let frames = msg.into_vec();
                let Ok(frame) = parse_pub_frames(&frames) else {
                    continue;
                };
                let Ok(batch) = decode_batch(&frame.payload) else {
                    continue;
                };
                log.lock().push(Captured {
                    engine,
                    seq: frame.seq,
                    events: batch.events,
                    at: Instant::now(),
                });
            }
        }));
        Ok(())
    }

    /// A position in the log, to take what arrives after it.
    pub fn mark(&self) -> usize {
        self.log.lock().len()
    }

    pub fn since(&self, mark: usize) -> Vec<Captured> {
        self.log
            .lock()
            .get(mark..)
            .map(<[_]>::to_vec)
            .unwrap_or_default()
    }

    /// Waits until no batch has arrived for `quiet` (bounded by `max`):
    /// engines flush events once per step, so a short silence after a response
    /// means its events are in.
    pub async fn settle(&self, quiet: Duration, max: Duration) {
        let start = Instant::now();
        loop {
            tokio::time::sleep(quiet / 3).await;
            let last = self.log.lock().last().map(|c| c.at);
            let silent = last.is_none_or(|t| t.elapsed() >= quiet);
            if (silent && start.elapsed() >= quiet) || start.elapsed() >= max {
                return;
            }
        }
    }

    /// Waits until `pred` holds for some batch after `mark`.
    pub async fn wait_for(
        &self,
        mark: usize,
        max: Duration,
        pred: impl Fn(&Captured) -> bool,
    ) -> bool {
        let start = Instant::now();
        while start.elapsed() < max {
            if self.since(mark).iter().any(&pred) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }
}

impl Drop for EventCapture {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Blocks stored and removed in a list of batches.
pub fn block_counts(batches: &[Captured]) -> (u64, u64) {
    let (mut stored, mut removed) = (0, 0);
    for b in batches {
        for ev in &b.events {
            match ev {
                KvEvent::BlockStored(s) => stored += s.block_hashes.len() as u64,
                KvEvent::BlockRemoved(r) => removed += r.block_hashes.len() as u64,
                KvEvent::AllBlocksCleared => {}
            }
        }
    }
    (stored, removed)
}

/// Every batch an engine still buffers for replay, from seq 0: its own record
/// of what it published, independent of any subscription's timing.
pub async fn replay_all(endpoint: &str, timeout: Duration) -> anyhow::Result<Vec<Captured>> {
    use kvgate_wire::vllm::{decode_replay_reply, encode_replay_request, ReplayReply};
    use zeromq::{DealerSocket, SocketSend, ZmqMessage};
    let exchange = async {
        let mut dealer = DealerSocket::new();
        dealer.connect(endpoint).await?;
        let request: Vec<bytes::Bytes> = encode_replay_request(0)
            .into_iter()
            .map(bytes::Bytes::from)
            .collect();
        dealer
            .send(ZmqMessage::try_from(request).map_err(|e| anyhow::anyhow!("{e:?}"))?)
            .await?;
        let mut out = Vec::new();
        loop {
            let frames = dealer.recv().await?.into_vec();
            match decode_replay_reply(&frames)? {
                ReplayReply::End => return Ok::<_, anyhow::Error>(out),
                ReplayReply::Batch { seq, payload, .. } => out.push(Captured {
                    engine: usize::MAX,
                    seq,
                    events: decode_batch(&payload)?.events,
                    at: Instant::now(),
                }),
            }
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| anyhow::anyhow!("replay from {endpoint} timed out"))?
}
