//! The log's files: reading a line back, names, the checkpoint file.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{Checkpoint, CheckpointFile};

#[derive(Deserialize)]
struct SeqOnly {
    seq: u64,
}

pub(super) fn parse_seq(line: &[u8]) -> Result<u64, String> {
    serde_json::from_slice::<SeqOnly>(line)
        .map(|s| s.seq)
        .map_err(|e| e.to_string())
}

pub(super) fn read_byte(file: &mut File, at: u64) -> std::io::Result<u8> {
    let mut b = [0u8; 1];
    file.seek(SeekFrom::Start(at))?;
    file.read_exact(&mut b)?;
    Ok(b[0])
}

/// Where the line holding byte `end - 1` starts: just after the last `\n`
/// before `end`, or 0. Reads backwards in chunks.
pub(super) fn line_start(file: &mut File, end: u64) -> std::io::Result<u64> {
    let mut chunk = [0u8; 8192];
    let mut upto = end;
    while upto > 0 {
        let from = upto.saturating_sub(chunk.len() as u64);
        let n = (upto - from) as usize;
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut chunk[..n])?;
        if let Some(i) = chunk[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(from + i as u64 + 1);
        }
        upto = from;
    }
    Ok(0)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// `<path>.checkpoint`.
pub fn checkpoint_path(path: &Path) -> PathBuf {
    with_suffix(path, ".checkpoint")
}

/// `<path>.<first seq, 20 digits>`: rotated files sort by name in chain
/// order, and `<path>.0*` globs them (without the checkpoint).
pub fn rotated_path(path: &Path, first_seq: u64) -> PathBuf {
    with_suffix(path, &format!(".{first_seq:020}"))
}

/// Writes `<path>.checkpoint` atomically (temp file, fsync, rename).
pub(super) fn write_checkpoint(path: &Path, cp: &Checkpoint, file: &Path) -> std::io::Result<()> {
    let body = CheckpointFile {
        seq: cp.seq,
        hash: cp.hash.clone(),
        file: file.to_path_buf(),
    };
    let mut json = serde_json::to_vec(&body).map_err(std::io::Error::other)?;
    json.push(b'\n');
    let tmp = with_suffix(path, ".checkpoint.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(&json)?;
    f.sync_all()?;
    std::fs::rename(&tmp, checkpoint_path(path))?;
    sync_dir(path);
    Ok(())
}

/// Makes a rename in `path`'s directory durable (best effort).
pub(super) fn sync_dir(path: &Path) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}
