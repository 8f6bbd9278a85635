//! [`EngineHandle`]: an [`EngineCore`] run on a tokio task, sleeping each
//! step's modelled duration, publishing its events and streaming tokens, with
//! faults a test can inject.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvgate_wire::vllm::{EventBatch, KvEvent};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::{
    EngineConfig, EngineCore, EngineError, EngineStats, RequestId, SimRequest, TokenEvent,
};
use crate::publisher::EventPublisher;

/// Faults a test can inject into a running engine.
#[derive(Debug, Default)]
pub struct Faults {
    /// Refuse new requests (503) as an overloaded or dying engine would.
    pub refuse: std::sync::atomic::AtomicBool,
    /// Multiplies every step's duration (1000 = 1.0x).
    pub slowdown_permille: std::sync::atomic::AtomicU64,
}

enum Command {
    Submit {
        req: SimRequest,
        tx: mpsc::UnboundedSender<TokenEvent>,
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    ResetPrefixCache(oneshot::Sender<bool>),
    Restart(oneshot::Sender<()>),
    CachedHashes(oneshot::Sender<Vec<u64>>),
}

/// A running engine. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<Command>,
    stats: Arc<Mutex<EngineStats>>,
    pub faults: Arc<Faults>,
    pub publisher: Option<Arc<EventPublisher>>,
    config: Arc<EngineConfig>,
    /// Wall-clock start (Unix seconds, f64 bits); a restart moves it, as a
    /// restarted vLLM process reports a new `process_start_time_seconds`.
    started_at: Arc<std::sync::atomic::AtomicU64>,
}

impl EngineHandle {
    /// Starts an engine on the current tokio runtime. Events go to `publisher`.
    pub fn spawn(cfg: EngineConfig, publisher: Option<Arc<EventPublisher>>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Mutex::new(EngineStats::default()));
        let faults = Arc::new(Faults::default());
        faults
            .slowdown_permille
            .store(1000, std::sync::atomic::Ordering::Relaxed);
        let handle = Self {
            tx,
            stats: stats.clone(),
            faults: faults.clone(),
            publisher: publisher.clone(),
            config: Arc::new(cfg.clone()),
            started_at: Arc::new(std::sync::atomic::AtomicU64::new(wall_ts().to_bits())),
        };
        tokio::spawn(drive(EngineCore::new(cfg), rx, stats, faults, publisher));
        handle
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Queues a request; tokens arrive on the returned channel. Dropping the
    /// receiver aborts the request.
    pub async fn submit(
        &self,
        req: SimRequest,
    ) -> Result<mpsc::UnboundedReceiver<TokenEvent>, EngineError> {
        if self
            .faults
            .refuse
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(EngineError::Refusing);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (reply, done) = oneshot::channel();
        self.tx
            .send(Command::Submit { req, tx, reply })
            .map_err(|_| EngineError::Stopped)?;
        done.await.map_err(|_| EngineError::Stopped)??;
        Ok(rx)
    }

    pub async fn reset_prefix_cache(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::ResetPrefixCache(tx)).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Fault: a restart. In-flight requests end without completing, the cache
    /// is emptied (`AllBlocksCleared`).
    pub async fn restart(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Restart(tx)).is_ok() {
            let _ = rx.await;
        }
        // Strictly later than the previous start, even within one clock tick.
        let previous = self.start_time_seconds();
        let now = wall_ts().max(previous + 1e-3);
        self.started_at
            .store(now.to_bits(), std::sync::atomic::Ordering::Relaxed);
    }

    /// When this engine (last) started, Unix seconds.
    pub fn start_time_seconds(&self) -> f64 {
        f64::from_bits(self.started_at.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The engine hashes a new request could hit right now.
    pub async fn cached_hashes(&self) -> Vec<u64> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::CachedHashes(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    pub fn metrics_snapshot(&self) -> EngineStats {
        self.stats.lock().clone()
    }
}

fn wall_ts() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

async fn publish(publisher: &Option<Arc<EventPublisher>>, events: Vec<KvEvent>) {
    if events.is_empty() {
        return;
    }
    if let Some(p) = publisher {
        let batch = EventBatch {
            ts: wall_ts(),
            events,
            data_parallel_rank: None,
        };
        if let Err(e) = p.publish(&batch).await {
            tracing::warn!(error = %e, "publishing KV events failed");
        }
    }
}

async fn drive(
    mut core: EngineCore,
    mut rx: mpsc::UnboundedReceiver<Command>,
    stats: Arc<Mutex<EngineStats>>,
    faults: Arc<Faults>,
    publisher: Option<Arc<EventPublisher>>,
) {
    let scale = if core.config().time_scale > 0.0 {
        core.config().time_scale
    } else {
        1.0
    };
    let started = Instant::now();
    let mut seed: u64 = 0x5eed;
    let mut streams: std::collections::HashMap<RequestId, mpsc::UnboundedSender<TokenEvent>> =
        std::collections::HashMap::new();
    // Wall-clock instant at which the current step ends. Steps are scheduled
    // back to back against this deadline so timer granularity never adds up.
    let mut deadline = Instant::now();
    loop {
        // Wait for work when idle, otherwise take whatever has arrived.
        if core.is_idle() {
            let Some(cmd) = rx.recv().await else {
                return;
            };
            let now = Instant::now();
            core.advance_to((now - started).as_secs_f64() * scale);
            deadline = now;
            handle_command(&mut core, cmd, &mut streams, &mut seed, &publisher).await;
        }
        while let Ok(cmd) = rx.try_recv() {
            handle_command(&mut core, cmd, &mut streams, &mut seed, &publisher).await;
        }
        let Some(out) = core.step() else {
            *stats.lock() = core.stats();
            continue;
        };
        let slow = faults
            .slowdown_permille
            .load(std::sync::atomic::Ordering::Relaxed) as f64
            / 1000.0;
        deadline += Duration::from_secs_f64(out.duration_secs * slow.max(0.0) / scale);
        // Past deadlines (catching up, or the first step after idling) must not
        // wait for the timer's next 1 ms tick.
        if deadline > Instant::now() {
            tokio::time::sleep_until(deadline.into()).await;
        } else {
            tokio::task::yield_now().await;
        }
        publish(&publisher, out.kv_events).await;
        // Counters first, so a client that has its response sees them.
        *stats.lock() = core.stats();
        let mut aborted = false;
        for o in out.outputs {
            let mut gone = false;
            if let Some(tx) = streams.get(&o.id) {
                for e in o.events {
                    if tx.send(e).is_err() {
                        gone = true;
                        break;
                    }
                }
            }
            if o.finished || gone {
                streams.remove(&o.id);
                if gone && !o.finished {
                    core.abort(o.id);
                    aborted = true;
                }
            }
        }
        if aborted {
            *stats.lock() = core.stats();
        }
    }
}

async fn handle_command(
    core: &mut EngineCore,
    cmd: Command,
    streams: &mut std::collections::HashMap<RequestId, mpsc::UnboundedSender<TokenEvent>>,
    seed: &mut u64,
    publisher: &Option<Arc<EventPublisher>>,
) {
    match cmd {
        Command::Submit { req, tx, reply } => {
            *seed = seed.wrapping_add(1);
            match core.add_request(req, *seed) {
                Ok(id) => {
                    streams.insert(id, tx);
                    let _ = reply.send(Ok(()));
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            }
        }
        Command::ResetPrefixCache(reply) => {
            let ok = core.reset_prefix_cache();
            // vLLM flushes AllBlocksCleared with the next step's events; an idle
            // engine has no next step, so publish now.
            publish(publisher, core.take_events()).await;
            let _ = reply.send(ok);
        }
        Command::Restart(reply) => {
            for id in core.restart() {
                streams.remove(&id);
            }
            publish(publisher, core.take_events()).await;
            let _ = reply.send(());
        }
        Command::CachedHashes(reply) => {
            let _ = reply.send(core.pool().cached_hashes().collect());
        }
    }
}
