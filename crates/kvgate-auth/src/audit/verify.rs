//! Checking an audit log from its files alone (and, for its tail, a
//! checkpoint).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;

use hmac::Mac;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{decode_hash, Checkpoint, HmacSha256};

/// What a verified log holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// SHA-256 (hex) of the last line: a checkpoint for the next verify.
    pub last_hash: Option<String>,
    /// Whether every line's mac was checked (a key was given).
    pub macs_checked: bool,
}

/// The first bad record: where it is and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{problem}", place(.file, .line, .seq))]
pub struct VerifyError {
    pub file: Option<PathBuf>,
    /// 1-based line number in `file`.
    pub line: Option<u64>,
    pub seq: Option<u64>,
    pub problem: Problem,
}

fn place(file: &Option<PathBuf>, line: &Option<u64>, seq: &Option<u64>) -> String {
    let mut s = String::new();
    if let Some(f) = file {
        s.push_str(&f.display().to_string());
        if let Some(l) = line {
            s.push_str(&format!(":{l}"));
        }
    }
    if let Some(q) = seq {
        s.push_str(&format!(" (seq {q})"));
    }
    if !s.is_empty() {
        s.push_str(": ");
    }
    s
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("no files given")]
    NoFiles,
    #[error("cannot read: {0}")]
    Io(String),
    #[error("incomplete last line (no newline): a torn write")]
    Torn,
    #[error("not an audit line: {0}")]
    BadJson(String),
    #[error("no mac, but a key was given")]
    MissingMac,
    #[error("mac does not match: record edited, or the wrong key")]
    BadMac,
    #[error("seq 0 must have prev = 64 zeros")]
    BadGenesis,
    #[error("records seq {from}..={to} are missing before it: deleted")]
    Deleted { from: u64, to: u64 },
    #[error("expected seq {expected}: records reordered, repeated or renumbered")]
    OutOfOrder { expected: u64 },
    #[error("edited: its SHA-256 is not the prev of seq {next_seq} (or that prev was edited)")]
    Edited { next_seq: u64 },
    #[error("edited: its SHA-256 is not the checkpoint's hash")]
    CheckpointMismatch,
    #[error("the chain ends {} but the checkpoint is at seq {checkpoint_seq}: its tail is cut off", ends(.last_seq))]
    Truncated {
        last_seq: Option<u64>,
        checkpoint_seq: u64,
    },
    #[error("the checkpoint (seq {checkpoint_seq}) is before the first record given (seq {first_seq}): give the older files too")]
    CheckpointBeforeStart { first_seq: u64, checkpoint_seq: u64 },
}

fn ends(last: &Option<u64>) -> String {
    match last {
        Some(s) => format!("at seq {s}"),
        None => "with no records".into(),
    }
}

/// The fields verify reads; the rest of the line is covered by its hash.
#[derive(Deserialize)]
struct Head {
    seq: u64,
    prev: String,
    // Required, not otherwise checked: the hash covers them.
    #[serde(rename = "time")]
    _time: String,
    #[serde(rename = "kind")]
    _kind: String,
    #[serde(default)]
    mac: Option<String>,
}

/// The last good line so far.
struct Prev {
    file: usize,
    line: u64,
    seq: u64,
    hash: [u8; 32],
}

/// Verifies a chain spread over `files`, given oldest first (rotated files
/// `<path>.<seq>` in name order, then `<path>`).
///
/// Checks that every line is whole and parses, that seq goes up by exactly 1
/// across lines and files, that each `prev` is the SHA-256 of the line
/// before, with `key` that each `mac` matches, and with `checkpoint` that the
/// chain reaches its seq and that line hashes to its hash (so a cut-off or
/// edited tail fails). The first line may start anywhere: seq 0 must have a
/// zero `prev`, a later seq (older files archived away) is taken as given,
/// and the summary's `first_seq` says where the checked chain starts.
///
/// Without a checkpoint, a cut-off tail or an edit of the very last line
/// cannot be seen (unless a key is given, for the edit).
pub fn verify(
    files: &[PathBuf],
    checkpoint: Option<&Checkpoint>,
    key: Option<&[u8]>,
) -> Result<VerifySummary, VerifyError> {
    if files.is_empty() {
        return Err(VerifyError {
            file: None,
            line: None,
            seq: None,
            problem: Problem::NoFiles,
        });
    }
    let cp_hash = checkpoint.map(|c| c.hash.to_ascii_lowercase());
    let mut last: Option<Prev> = None;
    let mut first_seq = None;
    let mut records = 0u64;
    let mut cp_seen = false;
    for (fi, path) in files.iter().enumerate() {
        let at = |line: Option<u64>, seq: Option<u64>, problem| VerifyError {
            file: Some(path.clone()),
            line,
            seq,
            problem,
        };
        let f = File::open(path).map_err(|e| at(None, None, Problem::Io(e.to_string())))?;
        let mut reader = BufReader::new(f);
        let mut buf = Vec::new();
        let mut lineno = 0u64;
        loop {
            buf.clear();
            let n = reader
                .read_until(b'\n', &mut buf)
                .map_err(|e| at(Some(lineno + 1), None, Problem::Io(e.to_string())))?;
            if n == 0 {
                break;
            }
            lineno += 1;
            if buf.pop() != Some(b'\n') {
                return Err(at(Some(lineno), None, Problem::Torn));
            }
            let head: Head = serde_json::from_slice(&buf)
                .map_err(|e| at(Some(lineno), None, Problem::BadJson(e.to_string())))?;
            let seq = head.seq;
            let bad = |problem| at(Some(lineno), Some(seq), problem);
            let prev = decode_hash(&head.prev)
                .ok_or_else(|| bad(Problem::BadJson("prev is not 64 hex characters".into())))?;
            if let Some(key) = key {
                check_mac(&buf, head.mac.as_deref(), key).map_err(bad)?;
            }
            match &last {
                None if seq == 0 && prev != [0u8; 32] => return Err(bad(Problem::BadGenesis)),
                None => {}
                Some(p) => {
                    let expected = p.seq + 1;
                    if seq > expected {
                        return Err(bad(Problem::Deleted {
                            from: expected,
                            to: seq - 1,
                        }));
                    }
                    if seq != expected {
                        return Err(bad(Problem::OutOfOrder { expected }));
                    }
                    if prev != p.hash {
                        // The line before changed (or this prev did): name
                        // the earlier one, the first that is off.
                        return Err(VerifyError {
                            file: Some(files[p.file].clone()),
                            line: Some(p.line),
                            seq: Some(p.seq),
                            problem: Problem::Edited { next_seq: seq },
                        });
                    }
                }
            }
            let hash: [u8; 32] = Sha256::digest(&buf).into();
            if let (Some(cp), Some(want)) = (checkpoint, &cp_hash) {
                if seq == cp.seq {
                    if hex::encode(hash) != *want {
                        return Err(bad(Problem::CheckpointMismatch));
                    }
                    cp_seen = true;
                }
            }
            first_seq.get_or_insert(seq);
            records += 1;
            last = Some(Prev {
                file: fi,
                line: lineno,
                seq,
                hash,
            });
        }
    }
    let last_seq = last.as_ref().map(|p| p.seq);
    if let Some(cp) = checkpoint {
        if !cp_seen {
            let problem = match first_seq {
                Some(first_seq) if cp.seq < first_seq => Problem::CheckpointBeforeStart {
                    first_seq,
                    checkpoint_seq: cp.seq,
                },
                _ => Problem::Truncated {
                    last_seq,
                    checkpoint_seq: cp.seq,
                },
            };
            return Err(VerifyError {
                file: files.last().cloned(),
                line: None,
                seq: None,
                problem,
            });
        }
    }
    Ok(VerifySummary {
        records,
        first_seq,
        last_seq,
        last_hash: last.map(|p| hex::encode(p.hash)),
        macs_checked: key.is_some(),
    })
}

/// A line with a mac ends in `,"mac":"<hex>"}`; the mac is over the line
/// with that replaced by `}`.
fn check_mac(line: &[u8], mac: Option<&str>, key: &[u8]) -> Result<(), Problem> {
    let mac = mac.ok_or(Problem::MissingMac)?;
    let suffix = format!(",\"mac\":\"{mac}\"}}");
    let body = line
        .strip_suffix(suffix.as_bytes())
        .ok_or(Problem::BadMac)?;
    let mut want = [0u8; 32];
    hex::decode_to_slice(mac, &mut want).map_err(|_| Problem::BadMac)?;
    let mut m = HmacSha256::new_from_slice(key).map_err(|_| Problem::BadMac)?;
    m.update(body);
    m.update(b"}");
    m.verify_slice(&want).map_err(|_| Problem::BadMac)
}
