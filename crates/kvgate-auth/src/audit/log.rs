//! [`AuditLog`]: the request path hands records to a bounded queue; one
//! writer thread (`writer.rs`) numbers, chains, batches and writes them.
//!
//! The writer is a std thread, not a tokio task: writes and fsyncs are
//! blocking syscalls that would stall a runtime worker, and a thread also
//! works where there is no runtime (the CLI, tests) and outlives the order
//! in which a runtime shuts its tasks down.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

use super::writer::Writer;
use super::{encode_record, read_key_file, AuditConfig, AuditError, AuditRecord, Checkpoint};

/// The audit log handle. Cheap to share (`&self` everywhere); records go
/// through a bounded queue to the writer thread.
pub struct AuditLog {
    inner: Option<Inner>,
}

struct Inner {
    tx: SyncSender<Msg>,
    shared: Arc<Shared>,
    path: PathBuf,
}

/// What the writer publishes to the handle.
pub(super) struct Shared {
    pub(super) dropped: AtomicU64,
    pub(super) written: AtomicU64,
    pub(super) closed: AtomicBool,
    pub(super) checkpoint: Mutex<Checkpoint>,
}

pub(super) enum Msg {
    /// A record as its JSON object (`encode_record`).
    Record(SystemTime, Vec<u8>),
    Flush(Ack),
    Close(Ack),
}

pub(super) type AckResult = Result<Checkpoint, String>;

/// Where the writer answers a flush or close.
pub(super) enum Ack {
    Blocking(SyncSender<AckResult>),
    Async(tokio::sync::oneshot::Sender<AckResult>),
}

impl Ack {
    pub(super) fn send(self, r: AckResult) {
        // The caller may have stopped waiting; nothing to do then.
        match self {
            Ack::Blocking(tx) => {
                let _ = tx.send(r);
            }
            Ack::Async(tx) => {
                let _ = tx.send(r);
            }
        }
    }
}

impl AuditLog {
    /// No audit log: records are discarded.
    pub fn disabled() -> Self {
        Self { inner: None }
    }

    /// Opens (or creates) `cfg.path` and starts the writer. An existing file
    /// continues its chain from its last line (only that line is read); a
    /// torn last line, from a crash mid-write, is cut off first. A missing or
    /// empty file continues from `<path>.checkpoint` if there is one (a crash
    /// during rotation), else starts a chain at seq 0. Every start writes an
    /// `audit_open` record before returning, so an unwritable log fails here.
    pub fn start(cfg: &AuditConfig) -> Result<Self, AuditError> {
        let Some(path) = cfg.path.clone() else {
            return Ok(Self::disabled());
        };
        if cfg.queue == 0 {
            return Err(AuditError::Config("queue must be above 0".into()));
        }
        if cfg.max_file_bytes == Some(0) {
            return Err(AuditError::Config(
                "max_file_bytes must be above 0 (leave it unset to never rotate)".into(),
            ));
        }
        let key = cfg
            .hmac_key_file
            .as_deref()
            .map(read_key_file)
            .transpose()?;
        let writer = Writer::open(path.clone(), cfg, key)?;
        let shared = writer.shared.clone();
        let (tx, rx) = mpsc::sync_channel(cfg.queue);
        std::thread::Builder::new()
            .name("kvgate-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| AuditError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Self {
            inner: Some(Inner { tx, shared, path }),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    pub fn path(&self) -> Option<&Path> {
        self.inner.as_ref().map(|i| i.path.as_path())
    }

    /// Queues a record; never blocks. When the queue is full (or the log is
    /// closed) the record is dropped and counted in [`AuditLog::dropped`];
    /// the writer then writes a `records_dropped` record with the count, so
    /// the loss shows in the log itself. Dropped records get no seq, so the
    /// chain around them is intact: only that record tells.
    pub fn record(&self, rec: AuditRecord) {
        let Some(inner) = &self.inner else {
            return;
        };
        if inner.shared.closed.load(Ordering::Acquire) {
            inner.drop_one("log closed");
            return;
        }
        let time = SystemTime::now();
        let body = match encode_record(&rec) {
            Ok(b) => b,
            Err(_) => {
                inner.drop_one("record does not encode");
                return;
            }
        };
        match inner.tx.try_send(Msg::Record(time, body)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => inner.drop_one("queue full"),
            Err(TrySendError::Disconnected(_)) => inner.drop_one("writer stopped"),
        }
    }

    /// Records dropped since start (queue full, write errors, after close):
    /// a metric to alert on.
    pub fn dropped(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.shared.dropped.load(Ordering::Relaxed))
    }

    /// Lines written since start, the writer's own records included.
    pub fn written(&self) -> u64 {
        self.inner
            .as_ref()
            .map_or(0, |i| i.shared.written.load(Ordering::Relaxed))
    }

    /// The last line written (handed to the OS): export it as a metric, so a
    /// cut-off tail can be told against it. None when disabled.
    pub fn checkpoint(&self) -> Option<Checkpoint> {
        self.inner
            .as_ref()
            .map(|i| i.shared.checkpoint.lock().clone())
    }

    /// Waits until everything queued before it is written and fsynced.
    /// Blocks: not for the request path.
    pub fn flush(&self) -> Result<Option<Checkpoint>, AuditError> {
        let Some(inner) = &self.inner else {
            return Ok(None);
        };
        let (tx, rx) = mpsc::sync_channel(1);
        inner.send_blocking(Msg::Flush(Ack::Blocking(tx)))?;
        wait_blocking(&rx).map(Some)
    }

    /// Writes what is queued and an `audit_close` record, fsyncs, and writes
    /// `<path>.checkpoint`. Later records are dropped (and counted). Blocks
    /// until done; [`AuditLog::shutdown`] is the async form. Closing twice
    /// returns the checkpoint.
    pub fn close(&self) -> Result<Option<Checkpoint>, AuditError> {
        let Some(inner) = &self.inner else {
            return Ok(None);
        };
        if inner.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(self.checkpoint());
        }
        let (tx, rx) = mpsc::sync_channel(1);
        inner.send_blocking(Msg::Close(Ack::Blocking(tx)))?;
        wait_blocking(&rx).map(Some)
    }

    /// [`AuditLog::close`] without blocking the runtime. Call it at shutdown:
    /// a process that exits without it loses what was still queued.
    pub async fn shutdown(&self) -> Result<Option<Checkpoint>, AuditError> {
        let Some(inner) = &self.inner else {
            return Ok(None);
        };
        if inner.shared.closed.swap(true, Ordering::AcqRel) {
            return Ok(self.checkpoint());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut msg = Msg::Close(Ack::Async(tx));
        loop {
            match inner.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) => {
                    // The writer is draining the queue; the close waits its turn.
                    msg = m;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(TrySendError::Disconnected(_)) => return Err(writer_gone()),
            }
        }
        match rx.await {
            Ok(r) => r.map(Some).map_err(AuditError::Writer),
            Err(_) => Err(writer_gone()),
        }
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path())
            .field("written", &self.written())
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl Inner {
    fn drop_one(&self, why: &'static str) {
        let n = self.shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        // Under overload every request would warn: log the 1st, 2nd, 4th, ...
        if n.is_power_of_two() {
            tracing::warn!(dropped_total = n, why, "audit record dropped");
        }
    }

    fn send_blocking(&self, msg: Msg) -> Result<(), AuditError> {
        self.tx.send(msg).map_err(|_| writer_gone())
    }
}

fn wait_blocking(rx: &Receiver<AckResult>) -> Result<Checkpoint, AuditError> {
    match rx.recv() {
        Ok(r) => r.map_err(AuditError::Writer),
        Err(_) => Err(writer_gone()),
    }
}

fn writer_gone() -> AuditError {
    AuditError::Writer("the writer thread is gone".into())
}

#[cfg(test)]
impl AuditLog {
    /// Counts drops as the request path would under overload.
    pub(super) fn count_drops_for_test(&self, n: u64) {
        if let Some(i) = &self.inner {
            i.shared.dropped.fetch_add(n, Ordering::Relaxed);
        }
    }
}
