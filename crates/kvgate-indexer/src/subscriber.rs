//! One ZMQ SUB per engine endpoint, feeding its KV events into the index.
//!
//! Per endpoint the subscriber tracks the last applied `seq` and repairs the
//! stream when it can:
//!
//! - a gap (`seq > last + 1`: the PUB dropped messages, or we reconnected) is
//!   filled by asking the engine's replay ROUTER for everything from `last + 1`
//!   (vLLM keeps a bounded buffer of recent batches for exactly this);
//! - when the replay is absent, times out or no longer covers the gap, the
//!   endpoint is marked stale in the index (its entries are kept for a grace
//!   period and then dropped unless re-announced) and the live stream goes on;
//! - a `seq` going backwards on the live stream means the engine restarted with
//!   a fresh counter (and an empty cache): its entries are cleared;
//! - a payload that fails to decode is counted and skipped.
//!
//! [`IngestManager`] (in `ingest.rs`, re-exported here) runs one subscriber
//! task per configured source.

mod ingest;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kvgate_index::{EndpointId, IndexError, KvIndex};
use kvgate_wire::vllm::{
    decode_batch, decode_replay_reply, encode_replay_request, parse_pub_frames, KvEvent,
    ReplayReply,
};
use tokio::sync::watch;
use tracing::{debug, info, warn};
use zeromq::{
    DealerSocket, Socket, SocketEvent, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqMessage,
};

use crate::metrics::IndexerMetrics;
use kvgate_fleet::EndpointConfig;

pub use ingest::IngestManager;

/// Default bound on one replay exchange (connect, request, every reply, end).
pub const DEFAULT_REPLAY_TIMEOUT: Duration = Duration::from_secs(2);
/// First delay before re-creating a failed event socket.
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Cap of the reconnect backoff.
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Default bound on one attempt to connect the SUB socket.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Replay metric outcomes.
const OUTCOME_OK: &str = "ok";
/// Events were lost for good: no replay endpoint, timeout, or not covered.
const OUTCOME_UNAVAILABLE: &str = "unavailable";
/// A precautionary replay (after a reconnect) failed; nothing is known lost.
const OUTCOME_FAILED: &str = "failed";

/// Tunables of a subscriber; the defaults suit a LAN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriberOptions {
    pub replay_timeout: Duration,
    pub connect_timeout: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl Default for SubscriberOptions {
    fn default() -> Self {
        Self {
            replay_timeout: DEFAULT_REPLAY_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            reconnect_min: RECONNECT_BACKOFF_MIN,
            reconnect_max: RECONNECT_BACKOFF_MAX,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubscriberError {
    #[error("cannot register endpoint {name:?}: {source}")]
    Register { name: String, source: IndexError },
    #[error("a subscriber for {0:?} is already running")]
    AlreadyRunning(String),
    #[error("endpoint {0:?} publishes no KV events (no events endpoint)")]
    NoEvents(String),
    #[error("endpoint {0:?} names no model")]
    NoModel(String),
}

/// Runs one endpoint's subscriber until `shutdown` turns true (a dropped
/// sender is not a shutdown: the task then runs until aborted) or the endpoint
/// is removed from the index. Errors only if the endpoint cannot be registered.
pub async fn run(
    source: EndpointConfig,
    index: Arc<KvIndex>,
    metrics: Arc<IndexerMetrics>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), SubscriberError> {
    run_with_options(
        source,
        index,
        metrics,
        shutdown,
        SubscriberOptions::default(),
    )
    .await
}

/// [`run`] with explicit tunables.
pub async fn run_with_options(
    source: EndpointConfig,
    index: Arc<KvIndex>,
    metrics: Arc<IndexerMetrics>,
    mut shutdown: watch::Receiver<bool>,
    opts: SubscriberOptions,
) -> Result<(), SubscriberError> {
    let events = source
        .events
        .clone()
        .ok_or_else(|| SubscriberError::NoEvents(source.url.clone()))?;
    let model = source
        .root_model()
        .ok_or_else(|| SubscriberError::NoModel(source.url.clone()))?;
    let id = index
        .add_endpoint(&source.url, model, source.block_size)
        .map_err(|e| SubscriberError::Register {
            name: source.url.clone(),
            source: e,
        })?;
    // Resume from a restored index's position, so the first connect replays
    // whatever the engine published meanwhile.
    let last_applied = index
        .endpoints()
        .into_iter()
        .find(|e| e.id == id)
        .and_then(|e| e.last_seq);
    let mut st = Stream {
        source,
        events,
        id,
        index,
        metrics,
        opts,
        last_applied,
        live_high: None,
        gone: false,
        replay_saw_from: false,
    };
    st.run_loop(&mut shutdown).await;
    Ok(())
}

/// Resolves once shutdown is requested; never if the sender is gone.
async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// How a replay went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReplayResult {
    /// Everything needed was replayed.
    Covered,
    /// Some events are lost for good (absent endpoint, timeout, bounded buffer).
    Lost,
    /// A precautionary replay failed; nothing is known to be lost.
    Failed,
}

/// One endpoint's stream state.
struct Stream {
    source: EndpointConfig,
    /// The engine's PUB endpoint (`source.events`, checked present).
    events: String,
    id: EndpointId,
    index: Arc<KvIndex>,
    metrics: Arc<IndexerMetrics>,
    opts: SubscriberOptions,
    /// Last seq applied (or skipped as undecodable), live or replayed.
    last_applied: Option<i64>,
    /// Highest seq seen on the live stream: PUB/SUB delivers in order and at
    /// most once, so a live seq at or below it means the engine restarted.
    live_high: Option<i64>,
    /// The endpoint was removed from the index under us: stop.
    gone: bool,
    /// The last replay delivered the batch it was asked to start from.
    replay_saw_from: bool,
}

impl Stream {
    async fn run_loop(&mut self, shutdown: &mut watch::Receiver<bool>) {
        let mut backoff = self.opts.reconnect_min;
        let mut connections: u64 = 0;
        loop {
            let mut opts = SocketOptions::default();
            opts.connect_timeout(self.opts.connect_timeout);
            let mut sock = SubSocket::with_options(opts);
            let opened = tokio::select! {
                _ = wait_shutdown(shutdown) => return,
                r = open(&mut sock, &self.source, &self.events) => r,
            };
            if let Err(e) = opened {
                warn!(endpoint = %self.source.url, events = %self.events, error = %e,
                    "cannot open event socket; retrying in {backoff:?}");
                drop(sock);
                tokio::select! {
                    _ = wait_shutdown(shutdown) => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(self.opts.reconnect_max);
                continue;
            }
            backoff = self.opts.reconnect_min;
            // Created after connect so that only *later* connections show up;
            // in bind mode the engine's first connection shows up too.
            let mut monitor = sock.monitor();
            let mut monitor_open = true;
            if !self.source.bind {
                self.on_connected(&mut connections).await;
            }
            info!(endpoint = %self.source.url, events = %self.events,
                bind = self.source.bind, "event stream open");
            loop {
                if self.gone {
                    info!(endpoint = %self.source.url, "endpoint removed from the index; stopping");
                    return;
                }
                tokio::select! {
                    _ = wait_shutdown(shutdown) => return,
                    ev = monitor.recv(), if monitor_open => match ev {
                        Ok(SocketEvent::Connected(..)) | Ok(SocketEvent::Accepted(..)) => {
                            // zeromq-rs reconnects a SUB by itself (connect mode)
                            // and engines reconnect to a bound SUB: either way
                            // messages may have been lost while disconnected.
                            self.on_connected(&mut connections).await;
                        }
                        Ok(SocketEvent::Disconnected(_)) => {
                            debug!(endpoint = %self.source.url, "event peer disconnected");
                        }
                        Ok(_) => {}
                        Err(_) => monitor_open = false,
                    },
                    msg = sock.recv() => match msg {
                        Ok(msg) => self.on_live(msg).await,
                        Err(e) => {
                            warn!(endpoint = %self.source.url, error = %e,
                                "event stream failed; reconnecting in {backoff:?}");
                            break;
                        }
                    },
                }
            }
            drop(sock);
            tokio::select! {
                _ = wait_shutdown(shutdown) => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(self.opts.reconnect_max);
        }
    }

    /// A (re)connection: count it, and replay what may have been missed.
    async fn on_connected(&mut self, connections: &mut u64) {
        *connections += 1;
        if *connections > 1 {
            IndexerMetrics::inc(&self.metrics.reconnects, &self.source.url);
        }
        if let (Some(last), Some(addr)) = (self.last_applied, self.source.replay.clone()) {
            // Asks from `last`, a batch we already hold: an engine that still
            // buffers it is the one we were following; one that does not has
            // restarted (fresh counter, empty cache) or overflowed its buffer.
            debug!(endpoint = %self.source.url, from = last, "replaying after (re)connect");
            let result = self.replay(&addr, last, None).await;
            if result == ReplayResult::Covered && !self.replay_saw_from {
                warn!(endpoint = %self.source.url, last,
                    "engine no longer has our last event batch: restarted; clearing its entries");
                self.index.clear_endpoint(self.id);
                self.last_applied = None;
                self.live_high = None;
                let result = match self.replay(&addr, 0, None).await {
                    ReplayResult::Covered => OUTCOME_OK,
                    _ => OUTCOME_UNAVAILABLE,
                };
                IndexerMetrics::record_outcome(&self.metrics.replays, &self.source.url, result);
            } else {
                self.record_replay(result);
            }
        }
    }

    async fn on_live(&mut self, msg: ZmqMessage) {
        let frames = msg.into_vec();
        let frame = match parse_pub_frames(&frames) {
            Ok(f) if f.seq >= 0 => f,
            Ok(f) => {
                self.decode_error(&format!("negative seq {}", f.seq));
                return;
            }
            Err(e) => {
                // The seq is unknown, so there is nothing to advance.
                self.decode_error(&e.to_string());
                return;
            }
        };
        let seq = frame.seq;
        if self.live_high.is_some_and(|high| seq <= high) {
            warn!(endpoint = %self.source.url, seq, previous = ?self.live_high,
                "event seq went backwards: engine restarted; clearing its entries");
            self.index.clear_endpoint(self.id);
            self.last_applied = None;
        }
        self.live_high = Some(seq);
        match self.last_applied {
            // The first message seen (startup, or engine restart): anything
            // before it went out before we joined (ZMQ's slow joiner, or an
            // engine that has been running for a while). Replay fetches what
            // is still buffered; what is not is no loss of ours: the endpoint
            // holds no entries yet that could be wrong, so it is not stale.
            None if seq > 0 => {
                if let Some(addr) = self.source.replay.clone() {
                    debug!(endpoint = %self.source.url, seq, "joined mid-stream; replaying from 0");
                    let result = match self.replay(&addr, 0, Some(seq - 1)).await {
                        ReplayResult::Covered => OUTCOME_OK,
                        _ => OUTCOME_UNAVAILABLE,
                    };
                    IndexerMetrics::record_outcome(&self.metrics.replays, &self.source.url, result);
                }
            }
            Some(last) if seq > last + 1 => {
                IndexerMetrics::inc(&self.metrics.seq_gaps, &self.source.url);
                warn!(endpoint = %self.source.url, expected = last + 1, got = seq,
                    "event seq gap; requesting replay");
                self.recover(last + 1, seq - 1).await;
            }
            _ => {}
        }
        // The replay may already have delivered this one.
        if self.last_applied.is_none_or(|l| seq > l) {
            self.apply(seq, &frame.payload);
        }
    }

    /// Fills `from..=through` by replay, or marks the endpoint stale.
    async fn recover(&mut self, from: i64, through: i64) {
        let result = match self.source.replay.clone() {
            Some(addr) => self.replay(&addr, from, Some(through)).await,
            None => ReplayResult::Lost,
        };
        self.record_replay(result);
    }

    fn record_replay(&self, result: ReplayResult) {
        let outcome = match result {
            ReplayResult::Covered => OUTCOME_OK,
            ReplayResult::Failed => OUTCOME_FAILED,
            ReplayResult::Lost => {
                warn!(endpoint = %self.source.url,
                    "events lost and not replayable; marking endpoint stale");
                self.index.mark_stale(self.id);
                OUTCOME_UNAVAILABLE
            }
        };
        IndexerMetrics::record_outcome(&self.metrics.replays, &self.source.url, outcome);
    }

    /// Asks the replay ROUTER for every buffered batch from `from` and applies
    /// them in order. `through` is the last seq that must be covered (None for
    /// a precautionary replay after a reconnect, where any hole counts).
    async fn replay(&mut self, addr: &str, from: i64, through: Option<i64>) -> ReplayResult {
        // Next seq the replay must deliver for coverage to be whole.
        let mut next = from;
        let mut holes = false;
        self.replay_saw_from = false;
        let timeout = self.opts.replay_timeout;
        let exchange = async {
            // A fresh DEALER per replay: a late reply to an abandoned replay
            // can then never be mistaken for part of this one.
            let mut dealer = DealerSocket::new();
            dealer.connect(addr).await.map_err(|e| e.to_string())?;
            let request: Vec<Bytes> = encode_replay_request(from)
                .into_iter()
                .map(Bytes::from)
                .collect();
            let request = ZmqMessage::try_from(request).map_err(|e| e.to_string())?;
            dealer.send(request).await.map_err(|e| e.to_string())?;
            loop {
                let reply = dealer.recv().await.map_err(|e| e.to_string())?;
                let frames = reply.into_vec();
                match decode_replay_reply(&frames) {
                    Ok(ReplayReply::End) => return Ok::<(), String>(()),
                    Ok(ReplayReply::Batch { seq, payload, .. }) => {
                        if seq == from {
                            self.replay_saw_from = true;
                        }
                        if seq < next {
                            continue;
                        }
                        if seq > next {
                            holes = true;
                        }
                        next = seq + 1;
                        if self.last_applied.is_none_or(|l| seq > l) {
                            self.apply(seq, &payload);
                        }
                    }
                    Err(e) => self.decode_error(&format!("replay reply: {e}")),
                }
            }
        };
        let outcome = tokio::time::timeout(timeout, exchange).await;
        let reached = through.is_none_or(|t| next > t);
        match outcome {
            Ok(Ok(())) if !holes && reached => ReplayResult::Covered,
            Ok(Ok(())) => {
                warn!(endpoint = %self.source.url, from, first_missing = next,
                    "replay buffer no longer covers the gap");
                ReplayResult::Lost
            }
            // Everything needed arrived, only the end marker did not.
            Err(_) | Ok(Err(_)) if through.is_some() && !holes && reached => ReplayResult::Covered,
            Err(_) => {
                warn!(endpoint = %self.source.url, replay = addr,
                    timeout = ?self.opts.replay_timeout, "replay timed out");
                self.unreplayable(through)
            }
            Ok(Err(e)) => {
                warn!(endpoint = %self.source.url, replay = addr, error = %e, "replay failed");
                self.unreplayable(through)
            }
        }
    }

    fn unreplayable(&self, through: Option<i64>) -> ReplayResult {
        if through.is_some() {
            ReplayResult::Lost
        } else {
            ReplayResult::Failed
        }
    }

    /// Decodes and applies one batch, then records `seq` as applied.
    ///
    /// An undecodable payload advances `last_applied` too: its seq is known,
    /// and a replay would only bring the same bytes back, so not advancing
    /// would turn one poison message into a replay on every later message.
    fn apply(&mut self, seq: i64, payload: &[u8]) {
        match decode_batch(payload) {
            Err(e) => self.decode_error(&format!("seq {seq}: {e}")),
            Ok(batch) => {
                for ev in &batch.events {
                    let kind = match ev {
                        KvEvent::BlockStored(_) => "BlockStored",
                        KvEvent::BlockRemoved(_) => "BlockRemoved",
                        KvEvent::AllBlocksCleared => "AllBlocksCleared",
                    };
                    self.metrics.record_event(&self.source.url, kind);
                }
                match self.index.apply_batch(self.id, &batch) {
                    Ok(stats) => {
                        debug!(endpoint = %self.source.url, seq, events = batch.events.len(),
                            stored = stats.stored_blocks, removed = stats.removed_blocks,
                            orphans = stats.orphan_blocks, "applied batch");
                        if stats.rejected_events > 0 {
                            warn!(endpoint = %self.source.url, seq,
                                rejected = stats.rejected_events,
                                "events rejected (block size mismatch?)");
                        }
                        self.metrics.record_apply(&self.source.url, &stats);
                    }
                    Err(e) => {
                        warn!(endpoint = %self.source.url, error = %e, "cannot apply batch");
                        if matches!(e, IndexError::UnknownEndpoint(_)) {
                            self.gone = true;
                        }
                        return;
                    }
                }
            }
        }
        self.last_applied = Some(seq);
        self.index.set_last_seq(self.id, seq);
    }

    fn decode_error(&self, what: &str) {
        IndexerMetrics::inc(&self.metrics.decode_errors, &self.source.url);
        warn!(endpoint = %self.source.url, error = what, "undecodable event message skipped");
    }
}

async fn open(
    sock: &mut SubSocket,
    source: &EndpointConfig,
    events: &str,
) -> Result<(), zeromq::ZmqError> {
    if source.bind {
        sock.bind(events).await?;
    } else {
        sock.connect(events).await?;
    }
    // zeromq-rs remembers the subscription and re-sends it on reconnects.
    sock.subscribe(&source.topic).await
}
