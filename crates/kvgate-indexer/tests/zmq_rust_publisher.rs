#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The subscriber against an in-test engine (zeromq-rs PUB + replay ROUTER):
//! gap repair by replay, staleness without replay, decode errors, engine
//! restarts and endpoint removal.

mod zmq_common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use kvgate_index::KvIndex;
use kvgate_indexer::metrics::IndexerMetrics;
use kvgate_indexer::subscriber::{run_with_options, IngestManager, SubscriberOptions};
use kvgate_indexer::EndpointConfig;
use kvgate_wire::vllm::{
    decode_replay_request, encode_batch, encode_pub_frames, encode_replay_end, encode_replay_reply,
    BlockRemoved, BlockStored, EventBatch, EventEncoding, KvEvent, ReplayReplyGeneration,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};
use zmq_common::{count, endpoint, free_port, held, new_index, replays, wait_until};

const BS: u32 = 4;
const WAIT: Duration = Duration::from_secs(15);

fn msg(frames: Vec<Vec<u8>>) -> ZmqMessage {
    ZmqMessage::try_from(frames.into_iter().map(Bytes::from).collect::<Vec<_>>()).unwrap()
}

fn stored(hashes: &[u64], parent: Option<u64>, first_token: u32) -> KvEvent {
    let n = hashes.len() as u32 * BS;
    KvEvent::BlockStored(BlockStored::on_gpu(
        hashes.to_vec(),
        parent,
        (first_token..first_token + n).collect(),
        BS,
    ))
}

fn removed(hashes: &[u64]) -> KvEvent {
    KvEvent::BlockRemoved(BlockRemoved {
        block_hashes: hashes.to_vec(),
        medium: Some("GPU".into()),
        group_idx: 0,
    })
}

/// (seq, payload) of every batch published, as vLLM's replay buffer keeps them.
type ReplayBuffer = Arc<Mutex<Vec<(i64, Vec<u8>)>>>;

/// A fake engine: PUB on one port, vLLM's replay ROUTER (optional) on another.
struct FakeEngine {
    pub_port: u16,
    pub_sock: PubSocket,
    buffer: ReplayBuffer,
    next_seq: i64,
    /// Engine hashes stored minus removed: the engine's true block set.
    truth: BTreeSet<u64>,
    router: Option<JoinHandle<()>>,
}

impl FakeEngine {
    async fn start(name: &str, with_replay: bool) -> (Self, EndpointConfig) {
        let pub_port = free_port();
        let mut pub_sock = PubSocket::new();
        pub_sock
            .bind(&format!("tcp://127.0.0.1:{pub_port}"))
            .await
            .unwrap();
        let buffer = ReplayBuffer::default();
        let mut replay = None;
        let mut router = None;
        if with_replay {
            let port = free_port();
            let mut sock = RouterSocket::new();
            sock.bind(&format!("tcp://127.0.0.1:{port}")).await.unwrap();
            replay = Some(format!("tcp://127.0.0.1:{port}"));
            let buffer = buffer.clone();
            router = Some(tokio::spawn(async move {
                while let Ok(req) = sock.recv().await {
                    let mut frames = req.into_vec();
                    let identity = frames.remove(0).to_vec();
                    let Ok(start) = decode_replay_request(&frames) else {
                        continue;
                    };
                    let batches: Vec<_> = buffer
                        .lock()
                        .unwrap()
                        .iter()
                        .filter(|(s, _)| *s >= start)
                        .cloned()
                        .collect();
                    for (seq, payload) in batches {
                        let mut reply = vec![identity.clone()];
                        reply.extend(encode_replay_reply(
                            ReplayReplyGeneration::WithTopic,
                            b"",
                            seq,
                            &payload,
                        ));
                        sock.send(msg(reply)).await.unwrap();
                    }
                    let mut end = vec![identity.clone()];
                    end.extend(encode_replay_end(ReplayReplyGeneration::WithTopic));
                    sock.send(msg(end)).await.unwrap();
                }
            }));
        }
        let source = EndpointConfig {
            url: name.to_string(),
            models: vec!["m".into()],
            adapters: Vec::new(),
            block_size: BS,
            events: Some(format!("tcp://127.0.0.1:{pub_port}")),
            replay,
            topic: String::new(),
            bind: false,
        };
        let engine = Self {
            pub_port,
            pub_sock,
            buffer,
            next_seq: 0,
            truth: BTreeSet::new(),
            router,
        };
        (engine, source)
    }

    /// Publishes a raw payload (live or only into the replay buffer).
    async fn publish_raw(&mut self, payload: Vec<u8>, live: bool) -> i64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.buffer.lock().unwrap().push((seq, payload.clone()));
        if live {
            self.pub_sock
                .send(msg(encode_pub_frames(b"", seq, &payload)))
                .await
                .unwrap();
        }
        seq
    }

    async fn publish(&mut self, events: Vec<KvEvent>, live: bool) -> i64 {
        for ev in &events {
            match ev {
                KvEvent::BlockStored(s) => self.truth.extend(&s.block_hashes),
                KvEvent::BlockRemoved(r) => {
                    for h in &r.block_hashes {
                        self.truth.remove(h);
                    }
                }
                KvEvent::AllBlocksCleared => self.truth.clear(),
            }
        }
        let batch = EventBatch {
            ts: 1.0,
            events,
            data_parallel_rank: Some(0),
        };
        self.publish_raw(encode_batch(&batch, EventEncoding::MapV033), live)
            .await
    }

    /// ZMQ's slow joiner: publishes empty batches until the subscriber has
    /// seen one, so later messages are known to reach it.
    async fn warm_up(&mut self, index: &KvIndex, name: &str) {
        for _ in 0..300 {
            self.publish(vec![], true).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            if endpoint(index, name).and_then(|e| e.last_seq).is_some() {
                return;
            }
        }
        panic!("subscriber never received a message from the fake engine");
    }

    /// Closes the PUB socket, dropping its subscribers.
    async fn close_pub(&mut self) {
        let old = std::mem::replace(&mut self.pub_sock, PubSocket::new());
        let errors = old.close().await;
        assert!(errors.is_empty(), "{errors:?}");
    }

    /// Binds a fresh PUB socket on the same port.
    async fn rebind_pub(&mut self) {
        self.pub_sock
            .bind(&format!("tcp://127.0.0.1:{}", self.pub_port))
            .await
            .unwrap();
    }

    fn truth_set(&self) -> BTreeSet<(u64, String)> {
        self.truth.iter().map(|h| (*h, "GPU".to_string())).collect()
    }
}

impl Drop for FakeEngine {
    fn drop(&mut self) {
        if let Some(r) = self.router.take() {
            r.abort();
        }
    }
}

fn opts() -> SubscriberOptions {
    SubscriberOptions {
        replay_timeout: Duration::from_millis(500),
        ..SubscriberOptions::default()
    }
}

fn spawn_subscriber(
    source: EndpointConfig,
    index: Arc<KvIndex>,
    metrics: Arc<IndexerMetrics>,
) -> (watch::Sender<bool>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    let handle = tokio::spawn(async move {
        run_with_options(source, index, metrics, rx, opts())
            .await
            .unwrap();
    });
    (tx, handle)
}

async fn stop(tx: watch::Sender<bool>, handle: JoinHandle<()>) {
    tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("subscriber did not shut down")
        .unwrap();
}

/// A chain whose third batch (seq 2 of the main sequence) is what the
/// following ones build on: without it, block 6 would be an orphan.
async fn publish_chain_with_drop(engine: &mut FakeEngine, live_drop: bool) -> i64 {
    engine.publish(vec![stored(&[1, 2], None, 0)], true).await;
    engine.publish(vec![stored(&[3], Some(2), 8)], true).await;
    engine
        .publish(vec![stored(&[4, 5], Some(3), 12)], !live_drop)
        .await;
    engine.publish(vec![stored(&[6], Some(5), 20)], true).await;
    engine.publish(vec![removed(&[1])], true).await;
    engine.publish(vec![stored(&[10], None, 100)], true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_is_repaired_by_replay() {
    let index = new_index();
    let metrics = Arc::new(IndexerMetrics::default());
    let (mut engine, source) = FakeEngine::start("http://e1", true).await;
    let name = source.url.clone();
    let (tx, handle) = spawn_subscriber(source, index.clone(), metrics.clone());
    engine.warm_up(&index, &name).await;

    let last = publish_chain_with_drop(&mut engine, true).await;
    let want = engine.truth_set();
    assert_eq!(want.len(), 6);
    let done = wait_until(WAIT, || {
        endpoint(&index, &name).and_then(|e| e.last_seq) == Some(last)
            && held(&index, &name) == want
    })
    .await;
    assert!(done, "index {:?} != engine {:?}", held(&index, &name), want);
    assert_eq!(count(&metrics.seq_gaps, &name), 1);
    assert!(replays(&metrics, &name, "ok") >= 1);
    assert_eq!(replays(&metrics, &name, "unavailable"), 0);
    assert_eq!(count(&metrics.decode_errors, &name), 0);
    assert!(!endpoint(&index, &name).unwrap().stale);
    stop(tx, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gap_without_replay_marks_endpoint_stale() {
    let index = new_index();
    let metrics = Arc::new(IndexerMetrics::default());
    let (mut engine, source) = FakeEngine::start("http://e2", false).await;
    let name = source.url.clone();
    let (tx, handle) = spawn_subscriber(source, index.clone(), metrics.clone());
    engine.warm_up(&index, &name).await;
    assert!(!endpoint(&index, &name).unwrap().stale);

    let last = publish_chain_with_drop(&mut engine, true).await;
    let done = wait_until(WAIT, || {
        endpoint(&index, &name).and_then(|e| e.last_seq) == Some(last)
    })
    .await;
    assert!(done, "subscriber did not reach seq {last}");
    assert!(endpoint(&index, &name).unwrap().stale);
    assert_eq!(count(&metrics.seq_gaps, &name), 1);
    assert_eq!(replays(&metrics, &name, "unavailable"), 1);
    // The live stream went on: blocks after the gap that do not depend on
    // the lost batch are indexed.
    let got = held(&index, &name);
    assert!(got.contains(&(10, "GPU".into())), "{got:?}");
    assert!(
        !got.contains(&(6, "GPU".into())),
        "6's parent was lost: {got:?}"
    );
    stop(tx, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payload_is_counted_and_skipped() {
    let index = new_index();
    let metrics = Arc::new(IndexerMetrics::default());
    let (mut engine, source) = FakeEngine::start("http://e3", true).await;
    let (mut peer, peer_source) = FakeEngine::start("http://e3-peer", true).await;
    let name = source.url.clone();
    let peer_name = peer_source.url.clone();
    let (tx, handle) = spawn_subscriber(source, index.clone(), metrics.clone());
    let (peer_tx, peer_handle) = spawn_subscriber(peer_source, index.clone(), metrics.clone());
    engine.warm_up(&index, &name).await;
    peer.warm_up(&index, &peer_name).await;

    engine.publish(vec![stored(&[1, 2], None, 0)], true).await;
    peer.publish(vec![stored(&[1, 2], None, 0)], true).await;
    let good = kvgate_wire::vllm::encode_batch(
        &EventBatch {
            ts: 0.0,
            events: vec![stored(&[9], None, 90)],
            data_parallel_rank: None,
        },
        kvgate_wire::vllm::EventEncoding::Map,
    );
    let garbage: Vec<Vec<u8>> = vec![
        // msgpack array header promising 3 items, then garbage.
        vec![0x93, 0xc1, 0xff, 0x00, 0x13],
        // array32 header claiming 4 billion elements.
        vec![0xdd, 0xff, 0xff, 0xff, 0xff, 0x01],
        // a valid payload cut short.
        good[..good.len() / 2].to_vec(),
        // not msgpack at all.
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        Vec::new(),
    ];
    for g in &garbage {
        engine.publish_raw(g.clone(), true).await;
    }
    engine.publish(vec![stored(&[3], Some(2), 8)], true).await;
    let last = engine.publish(vec![stored(&[7], None, 50)], true).await;
    let peer_last = peer.publish(vec![stored(&[3], Some(2), 8)], true).await;
    let want = engine.truth_set();
    let peer_want = peer.truth_set();
    let done = wait_until(WAIT, || {
        endpoint(&index, &name).and_then(|e| e.last_seq) == Some(last)
            && held(&index, &name) == want
            && endpoint(&index, &peer_name).and_then(|e| e.last_seq) == Some(peer_last)
            && held(&index, &peer_name) == peer_want
    })
    .await;
    assert!(done, "index {:?} != engine {:?}", held(&index, &name), want);
    assert_eq!(count(&metrics.decode_errors, &name), garbage.len() as u64);
    // The other endpoint never saw an error and holds exactly its own blocks.
    assert_eq!(count(&metrics.decode_errors, &peer_name), 0);
    assert_eq!(held(&index, &peer_name), peer_want);
    // The poison messages' seqs count as consumed: no gap, no replay loop.
    assert_eq!(count(&metrics.seq_gaps, &name), 0);
    assert!(!endpoint(&index, &name).unwrap().stale);
    stop(tx, handle).await;
    stop(peer_tx, peer_handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_restart_clears_and_remove_purges() {
    let index = new_index();
    let metrics = Arc::new(IndexerMetrics::default());
    let (mut engine, source) = FakeEngine::start("http://e4", false).await;
    let name = source.url.clone();
    let mut manager = IngestManager::with_options(index.clone(), metrics.clone(), opts());
    manager.add(source.clone()).unwrap();
    assert!(
        manager.add(source).is_err(),
        "a second add of the same name"
    );
    engine.warm_up(&index, &name).await;

    engine.publish(vec![stored(&[1, 2], None, 0)], true).await;
    let last = engine.publish(vec![stored(&[3], Some(2), 8)], true).await;
    assert!(
        wait_until(WAIT, || endpoint(&index, &name).and_then(|e| e.last_seq)
            == Some(last))
        .await
    );
    assert_eq!(held(&index, &name).len(), 3);

    // The engine restarts: its counter starts over and its cache is empty.
    engine.next_seq = 0;
    engine.truth.clear();
    engine.buffer.lock().unwrap().clear();
    let last = engine.publish(vec![stored(&[20], None, 200)], true).await;
    assert_eq!(last, 0);
    let want = engine.truth_set();
    let done = wait_until(WAIT, || held(&index, &name) == want).await;
    assert!(done, "index {:?} != engine {:?}", held(&index, &name), want);
    assert_eq!(endpoint(&index, &name).unwrap().last_seq, Some(0));

    // Removing the source stops its task and purges the endpoint.
    assert_eq!(manager.remove(&name).await, Some(1));
    assert!(endpoint(&index, &name).is_none());
    assert!(!manager.contains(&name));
    engine.publish(vec![stored(&[30], None, 300)], true).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        endpoint(&index, &name).is_none(),
        "removed endpoint came back"
    );
    manager.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_replays_what_was_missed() {
    let index = new_index();
    let metrics = Arc::new(IndexerMetrics::default());
    let (mut engine, source) = FakeEngine::start("http://e5", true).await;
    let name = source.url.clone();
    let (tx, handle) = spawn_subscriber(source, index.clone(), metrics.clone());
    engine.warm_up(&index, &name).await;
    engine.publish(vec![stored(&[1, 2], None, 0)], true).await;

    // The PUB goes away; what the engine publishes meanwhile is lost live but
    // buffered for replay, and nothing is published after it comes back: only
    // the replay after the reconnect can bring these in.
    engine.close_pub().await;
    engine.publish(vec![stored(&[3], Some(2), 8)], false).await;
    let last = engine.publish(vec![stored(&[4], Some(3), 12)], false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    engine.rebind_pub().await;
    let want = engine.truth_set();
    let done = wait_until(WAIT, || {
        endpoint(&index, &name).and_then(|e| e.last_seq) == Some(last)
            && held(&index, &name) == want
    })
    .await;
    assert!(done, "index {:?} != engine {:?}", held(&index, &name), want);
    assert!(count(&metrics.reconnects, &name) >= 1);
    assert_eq!(count(&metrics.seq_gaps, &name), 0);
    assert!(!endpoint(&index, &name).unwrap().stale);
    stop(tx, handle).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_seen_on_reconnect_clears_before_any_new_event() {
    let index = new_index();
    let metrics = Arc::new(IndexerMetrics::default());
    let (mut engine, source) = FakeEngine::start("http://e6", true).await;
    let name = source.url.clone();
    let (tx, handle) = spawn_subscriber(source, index.clone(), metrics.clone());
    engine.warm_up(&index, &name).await;
    let last = engine.publish(vec![stored(&[1, 2], None, 0)], true).await;
    assert!(
        wait_until(WAIT, || endpoint(&index, &name).and_then(|e| e.last_seq)
            == Some(last))
        .await
    );
    assert_eq!(held(&index, &name).len(), 2);

    // The engine process dies and comes back: the connection drops, its
    // counter and replay buffer start over, and it has published nothing yet.
    engine.close_pub().await;
    engine.next_seq = 0;
    engine.truth.clear();
    engine.buffer.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(300)).await;
    engine.rebind_pub().await;
    let done = wait_until(WAIT, || held(&index, &name).is_empty()).await;
    assert!(done, "stale entries kept: {:?}", held(&index, &name));

    // The new incarnation's events apply from seq 0 on.
    let last = engine.publish(vec![stored(&[7], None, 70)], true).await;
    assert_eq!(last, 0);
    let want = engine.truth_set();
    let done = wait_until(WAIT, || held(&index, &name) == want).await;
    assert!(done, "index {:?} != engine {:?}", held(&index, &name), want);
    assert!(!endpoint(&index, &name).unwrap().stale);
    stop(tx, handle).await;
}
