//! The tamper-evident audit log: append-only JSON lines, hash-chained.
//!
//! # Line format
//!
//! Each line is one JSON object, written by `serde_json` with its fields in
//! this order (absent record fields are left out):
//!
//! ```text
//! {"seq":N,"time":"2026-01-02T03:04:05.678Z","prev":"<64 hex>","kind":"request",
//!  "contract":..,"subject":..,"model":..,"endpoint":..,"status":..,"latency_ms":..,
//!  "prompt_tokens":..,"cached_tokens":..,"output_tokens":..,"reason":..,"detail":{..},
//!  "mac":"<64 hex>"}
//! ```
//!
//! - `seq` counts from 0 and goes up by exactly 1 per line, across restarts
//!   and rotated files.
//! - `time` is when the event was recorded (UTC, milliseconds); lines from
//!   concurrent requests may be a few milliseconds out of time order.
//! - `prev` is the SHA-256 of the previous line's bytes as written, without
//!   its newline; 64 zeros for seq 0.
//! - `mac`, only when an audit key is configured, is HMAC-SHA256(key, B)
//!   where B is the line serialized without `mac` (ending in `}`). The line
//!   written is B with its final `}` replaced by `,"mac":"<hex>"}`. The
//!   verifier recomputes it from the bytes alone: it strips the trailing
//!   `,"mac":"<hex>"}`, appends `}`, and MACs that; nothing is re-serialized.
//!
//! Because each line commits to the one before, an edited or deleted line is
//! caught by the next line's `prev`; an edited last line or a cut-off tail is
//! caught against a [`Checkpoint`] (the last seq and hash, exported as a
//! metric and written to `<path>.checkpoint` at rotation and shutdown).
//! Without an audit key, someone who can write the file can rebuild the whole
//! chain after an edit: the key or a checkpoint kept elsewhere is what makes
//! that detectable.
//!
//! Records name contracts, subjects, models, endpoints, token counts and
//! statuses; never prompt or output text, and never keys, salts or tokens
//! ([`AuditRecord::detail`] redacts fields named like them).

mod files;
mod log;
mod verify;
mod writer;

#[cfg(test)]
mod tests;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub use files::{checkpoint_path, rotated_path};
pub use log::AuditLog;
pub use verify::{verify, Problem, VerifyError, VerifySummary};

/// The `prev` of seq 0.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Record kinds kvgate writes (a record's `kind` is free text; these are the
/// names the gateway, the store and the writer itself use).
pub mod kind {
    pub const REQUEST: &str = "request";
    pub const AUTH_FAILURE: &str = "auth_failure";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const ADMIN: &str = "admin";
    pub const SUSPENSION: &str = "suspension";
    pub const REACTIVATION: &str = "reactivation";
    /// A principal whose contract does not admit the request (suspended,
    /// expired, unknown, model not covered).
    pub const CONTRACT_REFUSED: &str = "contract_refused";
    pub const CACHE: &str = "cache";
    /// A contracts config applied (or refused) while running.
    pub const CONFIG_RELOAD: &str = "config_reload";
    pub const FIELD_DROPPED: &str = "field_dropped";
    pub const FIELD_REFUSED: &str = "field_refused";
    pub const PATH_REFUSED: &str = "path_refused";
    /// Written by the log itself when it opens a file (start, resume).
    pub const AUDIT_OPEN: &str = "audit_open";
    /// Written by the log itself at shutdown.
    pub const AUDIT_CLOSE: &str = "audit_close";
    /// Written by the log itself after records were dropped (queue full,
    /// write error): `detail.count` of them since the last such record.
    pub const RECORDS_DROPPED: &str = "records_dropped";
}

/// One audited event. Build it with [`AuditRecord::new`] and the setters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contract: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

impl AuditRecord {
    pub fn new(kind: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            contract: None,
            subject: None,
            model: None,
            endpoint: None,
            status: None,
            latency_ms: None,
            prompt_tokens: None,
            cached_tokens: None,
            output_tokens: None,
            reason: None,
            detail: None,
        }
    }

    pub fn contract(mut self, v: impl Into<String>) -> Self {
        self.contract = Some(v.into());
        self
    }

    pub fn subject(mut self, v: impl Into<String>) -> Self {
        self.subject = Some(v.into());
        self
    }

    pub fn model(mut self, v: impl Into<String>) -> Self {
        self.model = Some(v.into());
        self
    }

    pub fn endpoint(mut self, v: impl Into<String>) -> Self {
        self.endpoint = Some(v.into());
        self
    }

    pub fn status(mut self, v: u16) -> Self {
        self.status = Some(v);
        self
    }

    /// Non-finite values are left out (JSON has no NaN).
    pub fn latency_ms(mut self, v: f64) -> Self {
        self.latency_ms = v.is_finite().then_some(v);
        self
    }

    pub fn prompt_tokens(mut self, v: u64) -> Self {
        self.prompt_tokens = Some(v);
        self
    }

    pub fn cached_tokens(mut self, v: u64) -> Self {
        self.cached_tokens = Some(v);
        self
    }

    pub fn output_tokens(mut self, v: u64) -> Self {
        self.output_tokens = Some(v);
        self
    }

    pub fn reason(mut self, v: impl Into<String>) -> Self {
        self.reason = Some(v.into());
        self
    }

    /// Extra structured fields. Object members whose name ends in a secret's
    /// name (`key`, `token`, `salt`, `secret`, `password`, ...; see
    /// [`is_secret_name`]) are replaced by `"[redacted]"`, at any depth, as a
    /// second line of defence: callers must not put secrets here at all.
    pub fn detail(mut self, mut v: serde_json::Value) -> Self {
        redact(&mut v);
        self.detail = Some(v);
        self
    }
}

/// Whether a field name is one [`AuditRecord::detail`] redacts: its last
/// `_`/`-`-separated word, lowercased, names a secret. `cached_tokens` or
/// `max_tokens` are counts and stay.
pub fn is_secret_name(name: &str) -> bool {
    const SECRET_WORDS: &[&str] = &[
        "key",
        "token",
        "salt",
        "secret",
        "password",
        "passwd",
        "authorization",
        "bearer",
        "jwt",
        "credential",
        "credentials",
        "cookie",
    ];
    let last = name.rsplit(['_', '-', '.']).next().unwrap_or(name);
    let last = last.to_ascii_lowercase();
    SECRET_WORDS.contains(&last.as_str())
}

fn redact(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                if is_secret_name(k) {
                    *child = serde_json::Value::String("[redacted]".into());
                } else {
                    redact(child);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// `audit:` in the gateway's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// The log file; unset: no audit log.
    pub path: Option<PathBuf>,
    /// When the writer fsyncs; see [`FsyncPolicy`].
    pub fsync: FsyncPolicy,
    /// Rotate once the file would grow past this: it is renamed to
    /// `<path>.<its first seq, 20 digits>` and a new `<path>` continues the
    /// chain. Unset: never rotate.
    pub max_file_bytes: Option<u64>,
    /// A file whose bytes (one trailing newline stripped) are the HMAC key;
    /// each line then carries a `mac`.
    pub hmac_key_file: Option<PathBuf>,
    /// Records waiting for the writer; more are dropped (and counted).
    pub queue: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            path: None,
            fsync: FsyncPolicy::default(),
            max_file_bytes: None,
            hmac_key_file: None,
            queue: 65536,
        }
    }
}

/// When the writer calls `fdatasync`. Rotation and shutdown always sync.
/// YAML: `fsync: never`, `fsync: batch`, `fsync: {interval_ms: 200}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "FsyncRepr", into = "FsyncRepr")]
pub enum FsyncPolicy {
    /// Leave it to the OS: a process crash loses nothing written, a power
    /// loss or kernel crash loses what the OS had not flushed yet.
    Never,
    /// After every batch write (a batch gathers for 10 ms): a power loss
    /// loses at most the batch being written (and what was still queued).
    #[default]
    Batch,
    /// At most this many ms after a write.
    IntervalMs(u64),
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum FsyncRepr {
    Name(String),
    Interval { interval_ms: u64 },
}

impl TryFrom<FsyncRepr> for FsyncPolicy {
    type Error = String;

    fn try_from(r: FsyncRepr) -> Result<Self, String> {
        match r {
            FsyncRepr::Name(n) if n == "never" => Ok(FsyncPolicy::Never),
            FsyncRepr::Name(n) if n == "batch" => Ok(FsyncPolicy::Batch),
            FsyncRepr::Name(n) => Err(format!(
                "fsync {n:?}: expected never, batch or {{interval_ms: N}}"
            )),
            FsyncRepr::Interval { interval_ms: 0 } => {
                Err("fsync interval_ms must be above 0 (or use batch)".into())
            }
            FsyncRepr::Interval { interval_ms } => Ok(FsyncPolicy::IntervalMs(interval_ms)),
        }
    }
}

impl From<FsyncPolicy> for FsyncRepr {
    fn from(p: FsyncPolicy) -> Self {
        match p {
            FsyncPolicy::Never => FsyncRepr::Name("never".into()),
            FsyncPolicy::Batch => FsyncRepr::Name("batch".into()),
            FsyncPolicy::IntervalMs(interval_ms) => FsyncRepr::Interval { interval_ms },
        }
    }
}

/// The last line written: its seq and the SHA-256 (hex) of its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: String,
}

/// `<path>.checkpoint`: a [`Checkpoint`] and the file holding that line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointFile {
    pub seq: u64,
    pub hash: String,
    pub file: PathBuf,
}

impl Checkpoint {
    /// Reads a checkpoint file (`{"seq":..,"hash":..}`, other fields ignored).
    pub fn read_file(path: &Path) -> Result<Checkpoint, AuditError> {
        let bytes = std::fs::read(path).map_err(|source| AuditError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cp: Checkpoint =
            serde_json::from_slice(&bytes).map_err(|e| AuditError::Checkpoint {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        if decode_hash(&cp.hash).is_none() {
            return Err(AuditError::Checkpoint {
                path: path.to_path_buf(),
                reason: "hash must be 64 hex characters".into(),
            });
        }
        Ok(cp)
    }
}

/// Why the audit log cannot start (or stop cleanly).
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot continue the chain of {path}: {reason}")]
    Resume { path: PathBuf, reason: String },
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("audit key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("audit config: {0}")]
    Config(String),
    #[error("audit writer stopped: {0}")]
    Writer(String),
}

/// Reads an audit key file: its bytes, one trailing `\n` (or `\r\n`)
/// stripped, so `openssl rand -hex 32 > key` and raw random bytes both work.
/// Writer and verifier both use this, so they agree on the key's bytes.
pub fn read_key_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, AuditError> {
    let mut key = Zeroizing::new(std::fs::read(path).map_err(|e| AuditError::Key {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?);
    if key.last() == Some(&b'\n') {
        key.pop();
        if key.last() == Some(&b'\r') {
            key.pop();
        }
    }
    if key.is_empty() {
        return Err(AuditError::Key {
            path: path.to_path_buf(),
            reason: "empty key".into(),
        });
    }
    Ok(key)
}

type HmacSha256 = Hmac<Sha256>;

/// A record's JSON object, encoded where the record is made (a request's
/// task), so the writer thread only numbers, chains and writes: one buffer
/// crosses threads, and the encoding is spread over the workers instead of
/// landing on one core in bursts.
fn encode_record(record: &AuditRecord) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(256);
    serde_json::to_writer(&mut out, record).map_err(|e| e.to_string())?;
    Ok(out)
}

/// The bytes of one line (no newline) and their SHA-256: `record` (from
/// [`encode_record`]) with `seq`, `time` and `prev` as its first fields.
fn encode_line(
    seq: u64,
    time: SystemTime,
    prev: &[u8; 32],
    record: &[u8],
    key: Option<&[u8]>,
) -> Result<(Vec<u8>, [u8; 32]), String> {
    let fields = record
        .strip_prefix(b"{")
        .filter(|f| f.ends_with(b"}"))
        .ok_or("a record must encode as a JSON object")?;
    let mut prev_hex = [0u8; 64];
    hex::encode_to_slice(prev, &mut prev_hex).map_err(|e| e.to_string())?;
    let mut line = Vec::with_capacity(record.len() + 128);
    write!(line, "{{\"seq\":{seq},\"time\":\"").map_err(|e| e.to_string())?;
    line.extend_from_slice(format_time(time).as_bytes());
    line.extend_from_slice(b"\",\"prev\":\"");
    line.extend_from_slice(&prev_hex);
    line.push(b'"');
    if fields != b"}" {
        line.push(b',');
    }
    line.extend_from_slice(fields);
    if let Some(key) = key {
        let mac = line_mac(key, &line)?;
        // `line` is a JSON object, so it ends in `}`.
        line.pop();
        line.extend_from_slice(b",\"mac\":\"");
        line.extend_from_slice(hex::encode(mac).as_bytes());
        line.extend_from_slice(b"\"}");
    }
    let hash = Sha256::digest(&line).into();
    Ok((line, hash))
}

fn line_mac(key: &[u8], body: &[u8]) -> Result<[u8; 32], String> {
    let mut mac = HmacSha256::new_from_slice(key).map_err(|e| e.to_string())?;
    mac.update(body);
    Ok(mac.finalize().into_bytes().into())
}

fn decode_hash(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// RFC 3339, UTC, milliseconds: `2026-01-02T03:04:05.678Z`. Digits are
/// written by hand: `format!` was most of the writer's encoding time.
fn format_time(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    let mut out = String::with_capacity(24);
    push_digits(&mut out, y.clamp(0, 9999) as u64, 4);
    out.push('-');
    push_digits(&mut out, u64::from(m), 2);
    out.push('-');
    push_digits(&mut out, u64::from(day), 2);
    out.push('T');
    push_digits(&mut out, s / 3600, 2);
    out.push(':');
    push_digits(&mut out, s % 3600 / 60, 2);
    out.push(':');
    push_digits(&mut out, s % 60, 2);
    out.push('.');
    push_digits(&mut out, u64::from(d.subsec_millis()), 3);
    out.push('Z');
    out
}

/// `v`'s last `width` decimal digits, zero-padded.
fn push_digits(out: &mut String, v: u64, width: u32) {
    for i in (0..width).rev() {
        let digit = (v / 10u64.pow(i) % 10) as u8;
        out.push(char::from(b'0' + digit));
    }
}

/// (year, month, day) of a count of days since 1970-01-01 in the proleptic
/// Gregorian calendar, via 400-year eras counted from March 1st (so the leap
/// day is the last day of its year).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days from 0000-03-01
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // 0..399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of March-based year
    let mp = (5 * doy + 2) / 153; // March = 0
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}
