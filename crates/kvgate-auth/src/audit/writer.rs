//! The writer thread: owns the file, numbers and chains records, writes
//! them in batches, fsyncs by policy, rotates, and resumes a chain at start.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::files::{
    checkpoint_path, line_start, parse_seq, read_byte, rotated_path, sync_dir, write_checkpoint,
};
use super::log::{AckResult, Msg, Shared};
use super::{
    decode_hash, encode_line, encode_record, kind, AuditConfig, AuditError, AuditRecord,
    Checkpoint, FsyncPolicy,
};

/// Records written with one `write` at most.
const MAX_BATCH: usize = 4096;
/// How long a batch gathers records after its first before its write (and,
/// under `fsync: batch`, its fdatasync): at most ~100 writes and syncs a
/// second however the records come, for 10 ms more between a record and its
/// write. On a VM each fdatasync costs the guest a device exit: at 2 ms the
/// syncs alone took ~5% of a saturated 2-core gateway (the
/// `contracts_overhead` bench, 0.87x -> 0.92x).
const GROUP_COMMIT: Duration = Duration::from_millis(10);

/// The file end of the log, owned by the writer thread.
pub(super) struct Writer {
    path: PathBuf,
    file: File,
    file_len: u64,
    /// Seq of the first line in the current file (names it at rotation).
    file_first_seq: Option<u64>,
    /// The chain as written to the file: the next seq, the last line's hash.
    next_seq: u64,
    prev: [u8; 32],
    /// Encoded lines not yet written, and the chain after them.
    buf: Vec<u8>,
    buf_lines: u64,
    buf_first_seq: Option<u64>,
    pend_seq: u64,
    pend_prev: [u8; 32],
    key: Option<Zeroizing<Vec<u8>>>,
    fsync: FsyncPolicy,
    max_file_bytes: Option<u64>,
    unsynced: bool,
    last_sync: Instant,
    dropped_noted: u64,
    pub(super) shared: Arc<Shared>,
}

impl Writer {
    pub(super) fn open(
        path: PathBuf,
        cfg: &AuditConfig,
        key: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<Writer, AuditError> {
        let err_path = path.clone();
        let io = |source| AuditError::Io {
            path: err_path.clone(),
            source,
        };
        let resume = |reason: String| AuditError::Resume {
            path: err_path.clone(),
            reason,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io)?;
        let mut len = file.metadata().map_err(io)?.len();
        let mut detail = serde_json::Map::new();

        // A torn last line never reached a checkpoint (those are written
        // after whole batches): cut it off and continue from the last whole
        // line, saying so in the audit_open record.
        if len > 0 && read_byte(&mut file, len - 1).map_err(io)? != b'\n' {
            let keep = line_start(&mut file, len).map_err(io)?;
            file.set_len(keep).map_err(io)?;
            tracing::warn!(path = %path.display(), bytes = len - keep, "audit log: cut off a torn last line");
            detail.insert("truncated_bytes".into(), (len - keep).into());
            len = keep;
        }

        let cp_path = checkpoint_path(&path);
        let checkpoint = if cp_path.exists() {
            Some(Checkpoint::read_file(&cp_path)?)
        } else {
            None
        };
        let (next_seq, prev, file_first_seq, from) = if len > 0 {
            let start = line_start(&mut file, len - 1).map_err(io)?;
            let mut last = vec![0u8; (len - 1 - start) as usize];
            file.seek(SeekFrom::Start(start)).map_err(io)?;
            file.read_exact(&mut last).map_err(io)?;
            let seq = parse_seq(&last).map_err(|e| resume(format!("last line: {e}")))?;
            file.seek(SeekFrom::Start(0)).map_err(io)?;
            let mut first = Vec::new();
            BufReader::new(&mut file)
                .read_until(b'\n', &mut first)
                .map_err(io)?;
            let first_seq = parse_seq(first.trim_ascii_end())
                .map_err(|e| resume(format!("first line: {e}")))?;
            (
                seq + 1,
                Sha256::digest(&last).into(),
                Some(first_seq),
                "file",
            )
        } else if let Some(cp) = &checkpoint {
            let hash = decode_hash(&cp.hash).ok_or_else(|| resume("checkpoint hash".into()))?;
            (cp.seq + 1, hash, None, "checkpoint")
        } else {
            (0, [0u8; 32], None, "new")
        };
        // Only the seqs are compared at start: a chain that ends before the
        // last checkpoint lost its tail while kvgate was down.
        if let Some(cp) = &checkpoint {
            if cp.seq >= next_seq {
                tracing::error!(path = %path.display(), checkpoint_seq = cp.seq, last_seq = next_seq.checked_sub(1),
                    "audit log ends before its checkpoint: its tail was cut off");
                detail.insert("checkpoint_seq".into(), cp.seq.into());
            }
        }
        detail.insert("resumed_from".into(), from.into());
        detail.insert("version".into(), env!("CARGO_PKG_VERSION").into());

        let mut w = Writer {
            path,
            file,
            file_len: len,
            file_first_seq,
            next_seq,
            prev,
            buf: Vec::new(),
            buf_lines: 0,
            buf_first_seq: None,
            pend_seq: next_seq,
            pend_prev: prev,
            key,
            fsync: cfg.fsync,
            max_file_bytes: cfg.max_file_bytes,
            unsynced: false,
            last_sync: Instant::now(),
            dropped_noted: 0,
            shared: Arc::new(Shared {
                dropped: AtomicU64::new(0),
                written: AtomicU64::new(0),
                closed: AtomicBool::new(false),
                checkpoint: Mutex::new(Checkpoint {
                    seq: next_seq.saturating_sub(1),
                    hash: hex::encode(prev),
                }),
            }),
        };
        let open = AuditRecord::new(kind::AUDIT_OPEN).detail(detail.into());
        w.push_record(SystemTime::now(), &open);
        w.commit().map_err(io)?;
        w.sync_now().map_err(io)?;
        Ok(w)
    }

    pub(super) fn run(mut self, rx: Receiver<Msg>) {
        loop {
            let first = match self.wait(&rx) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    self.sync();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Every handle is gone without a close: finish anyway.
                    let _ = self.finish();
                    return;
                }
            };
            self.note_drops();
            if matches!(first, Msg::Record(..)) {
                // Let a batch gather: one write (and under `batch` one
                // fdatasync) for every record of the window, and senders
                // meanwhile find no waiting receiver to wake.
                std::thread::sleep(GROUP_COMMIT);
            }
            let mut next = Some(first);
            let mut control = None;
            let mut disconnected = false;
            let mut n = 0;
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Record(t, body) => self.push(t, &body),
                    ctrl => {
                        control = Some(ctrl);
                        break;
                    }
                }
                n += 1;
                if n < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(m) => next = Some(m),
                        Err(TryRecvError::Empty) => {}
                        Err(TryRecvError::Disconnected) => disconnected = true,
                    }
                }
            }
            // Write errors are logged and counted inside.
            let _ = self.commit();
            match control {
                Some(Msg::Flush(ack)) => {
                    let r = self.sync_now().map_err(|e| e.to_string());
                    ack.send(r.map(|()| self.checkpoint()));
                }
                Some(Msg::Close(ack)) => {
                    // The few records that raced with the close are kept.
                    let mut acks = vec![ack];
                    while let Ok(m) = rx.try_recv() {
                        match m {
                            Msg::Record(t, body) => self.push(t, &body),
                            Msg::Flush(a) | Msg::Close(a) => acks.push(a),
                        }
                    }
                    let r = self.finish();
                    for a in acks {
                        a.send(r.clone());
                    }
                    return;
                }
                Some(Msg::Record(..)) | None => {}
            }
            if disconnected {
                let _ = self.finish();
                return;
            }
            if let FsyncPolicy::IntervalMs(ms) = self.fsync {
                if self.last_sync.elapsed() >= Duration::from_millis(ms) {
                    self.sync();
                }
            }
        }
    }

    /// The next message; under an interval policy with unsynced data, no
    /// longer than until the sync is due.
    fn wait(&self, rx: &Receiver<Msg>) -> Result<Msg, RecvTimeoutError> {
        match self.fsync {
            FsyncPolicy::IntervalMs(ms) if self.unsynced => {
                let due = Duration::from_millis(ms).saturating_sub(self.last_sync.elapsed());
                rx.recv_timeout(due)
            }
            _ => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        }
    }

    fn checkpoint(&self) -> Checkpoint {
        self.shared.checkpoint.lock().clone()
    }

    /// One of the writer's own records (open, close, drops): encoded here.
    fn push_record(&mut self, time: SystemTime, rec: &AuditRecord) {
        match encode_record(rec) {
            Ok(body) => self.push(time, &body),
            Err(e) => self.lost(1, &e),
        }
    }

    /// Adds an encoded record as the next line of the pending batch,
    /// rotating first if the line would take the file past `max_file_bytes`.
    fn push(&mut self, time: SystemTime, body: &[u8]) {
        let mut line = self.encode(time, body);
        if let (Some(max), Some((l, _))) = (self.max_file_bytes, &line) {
            let size = self.file_len + self.buf.len() as u64;
            if size > 0 && size + l.len() as u64 + 1 > max {
                let _ = self.commit();
                self.rotate();
                // The chain may have moved back if that commit failed.
                line = self.encode(time, body);
            }
        }
        let Some((line, hash)) = line else {
            return;
        };
        if self.buf.is_empty() {
            self.buf_first_seq = Some(self.pend_seq);
        }
        self.buf.extend_from_slice(&line);
        self.buf.push(b'\n');
        self.buf_lines += 1;
        self.pend_seq += 1;
        self.pend_prev = hash;
    }

    fn encode(&mut self, time: SystemTime, body: &[u8]) -> Option<(Vec<u8>, [u8; 32])> {
        let key = self.key.as_ref().map(|k| k.as_slice());
        match encode_line(self.pend_seq, time, &self.pend_prev, body, key) {
            Ok(l) => Some(l),
            Err(e) => {
                self.lost(1, &e);
                None
            }
        }
    }

    /// Writes the pending batch with one write. On an error the file is cut
    /// back to its last whole line and the batch counts as dropped, so the
    /// chain on disk stays whole.
    fn commit(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let lines = self.buf_lines;
        let r = self.file.write_all(&self.buf);
        self.buf_lines = 0;
        match r {
            Ok(()) => {
                self.file_len += self.buf.len() as u64;
                self.buf.clear();
                if self.file_first_seq.is_none() {
                    self.file_first_seq = self.buf_first_seq;
                }
                self.next_seq = self.pend_seq;
                self.prev = self.pend_prev;
                self.shared.written.fetch_add(lines, Ordering::Relaxed);
                *self.shared.checkpoint.lock() = Checkpoint {
                    seq: self.next_seq.saturating_sub(1),
                    hash: hex::encode(self.prev),
                };
                self.unsynced = true;
                if self.fsync == FsyncPolicy::Batch {
                    self.sync();
                }
                Ok(())
            }
            Err(e) => {
                self.buf.clear();
                if let Err(e2) = self.file.set_len(self.file_len) {
                    tracing::error!(path = %self.path.display(), error = %e2,
                        "audit log: cannot cut off a failed write; the chain on disk is broken here");
                }
                self.pend_seq = self.next_seq;
                self.pend_prev = self.prev;
                self.lost(lines, &e.to_string());
                Err(e)
            }
        }
    }

    fn lost(&self, n: u64, why: &str) {
        let total = self.shared.dropped.fetch_add(n, Ordering::Relaxed) + n;
        tracing::error!(path = %self.path.display(), records = n, dropped_total = total, error = why,
            "audit records lost");
    }

    /// After records were dropped, a record saying how many.
    fn note_drops(&mut self) {
        let total = self.shared.dropped.load(Ordering::Relaxed);
        if total > self.dropped_noted {
            let count = total - self.dropped_noted;
            self.dropped_noted = total;
            let rec = AuditRecord::new(kind::RECORDS_DROPPED)
                .detail(serde_json::json!({ "count": count, "total": total }));
            self.push_record(SystemTime::now(), &rec);
        }
    }

    fn sync(&mut self) {
        if let Err(e) = self.sync_now() {
            tracing::error!(path = %self.path.display(), error = %e, "audit log: fsync failed");
        }
    }

    fn sync_now(&mut self) -> std::io::Result<()> {
        self.last_sync = Instant::now();
        if !self.unsynced {
            return Ok(());
        }
        self.file.sync_data()?;
        self.unsynced = false;
        Ok(())
    }

    /// Renames the current file to `<path>.<first seq>` and starts a new
    /// one; the checkpoint (naming the old file) is written first, so a
    /// crash in between still leaves the chain's end on disk for
    /// [`Writer::open`]. Failures are logged and the current file goes on.
    fn rotate(&mut self) {
        let Some(first) = self.file_first_seq else {
            return;
        };
        let rotated = rotated_path(&self.path, first);
        let fail = |what: &str, e: &dyn std::fmt::Display| {
            tracing::error!(path = %self.path.display(), error = %e, "audit log: rotation failed: {what}");
        };
        if rotated.exists() {
            fail("target exists", &rotated.display());
            return;
        }
        if let Err(e) = self.file.sync_all() {
            fail("fsync", &e);
            return;
        }
        self.unsynced = false;
        let cp = self.checkpoint();
        if let Err(e) = write_checkpoint(&self.path, &cp, &rotated) {
            fail("checkpoint", &e);
        }
        if let Err(e) = std::fs::rename(&self.path, &rotated) {
            fail("rename", &e);
            return;
        }
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create_new(true)
            .open(&self.path);
        match file {
            Ok(f) => {
                sync_dir(&self.path);
                self.file = f;
                self.file_len = 0;
                self.file_first_seq = None;
                tracing::info!(path = %self.path.display(), rotated = %rotated.display(), "audit log rotated");
            }
            Err(e) => {
                fail("new file", &e);
                // Keep writing the old file under its old name.
                let _ = std::fs::rename(&rotated, &self.path);
            }
        }
    }

    /// The `audit_close` record, a sync and the checkpoint file.
    fn finish(&mut self) -> AckResult {
        self.note_drops();
        let close = AuditRecord::new(kind::AUDIT_CLOSE).detail(serde_json::json!({
            "written": self.shared.written.load(Ordering::Relaxed) + 1,
            "dropped": self.shared.dropped.load(Ordering::Relaxed),
        }));
        self.push_record(SystemTime::now(), &close);
        let written = self.commit();
        let synced = self.sync_now();
        let cp = self.checkpoint();
        let saved = write_checkpoint(&self.path, &cp, &self.path);
        written
            .and(synced)
            .and(saved)
            .map(|()| cp)
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }
}
