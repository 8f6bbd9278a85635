#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use hmac::Mac;
use sha2::{Digest, Sha256};

use super::*;

fn cfg(path: &Path) -> AuditConfig {
    AuditConfig {
        path: Some(path.to_path_buf()),
        ..AuditConfig::default()
    }
}

fn req(i: u64) -> AuditRecord {
    AuditRecord::new(kind::REQUEST)
        .contract("acme")
        .subject("alice")
        .model("llama")
        .endpoint("http://10.0.0.1:8000")
        .status(200)
        .latency_ms(12.5)
        .prompt_tokens(100 + i)
        .cached_tokens(64)
        .output_tokens(20)
}

/// Starts a log, records `n` requests, closes it: lines are audit_open,
/// the requests, audit_close.
fn write_log(cfg: &AuditConfig, n: u64) -> Checkpoint {
    let log = AuditLog::start(cfg).unwrap();
    for i in 0..n {
        log.record(req(i));
    }
    log.close().unwrap().unwrap()
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn write_lines(p: &Path, lines: &[String]) {
    let mut s = lines.join("\n");
    s.push('\n');
    std::fs::write(p, s).unwrap();
}

fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap()
}

fn one(p: &Path) -> Vec<PathBuf> {
    vec![p.to_path_buf()]
}

#[test]
fn written_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let cp = write_log(&cfg(&path), 5);

    let s = verify(&one(&path), None, None).unwrap();
    assert_eq!((s.records, s.first_seq, s.last_seq), (7, Some(0), Some(6)));
    assert!(!s.macs_checked);
    assert_eq!(s.last_hash.as_deref(), Some(cp.hash.as_str()));

    let ls = lines(&path);
    assert_eq!(ls.len(), 7);
    // The checkpoint is the last line's seq and SHA-256.
    assert_eq!(cp.seq, 6);
    assert_eq!(cp.hash, hex::encode(Sha256::digest(ls[6].as_bytes())));
    let on_disk = Checkpoint::read_file(&checkpoint_path(&path)).unwrap();
    assert_eq!(on_disk, cp);
    verify(&one(&path), Some(&on_disk), None).unwrap();

    let open = json(&ls[0]);
    assert_eq!(open["kind"], "audit_open");
    assert_eq!(open["prev"], GENESIS);
    assert_eq!(open["detail"]["resumed_from"], "new");
    let r = json(&ls[1]);
    assert_eq!(r["seq"], 1);
    assert_eq!(r["kind"], "request");
    assert_eq!(r["status"], 200);
    assert_eq!(r["prompt_tokens"], 100);
    assert_eq!(r["prev"], hex::encode(Sha256::digest(ls[0].as_bytes())));
    assert!(r.get("mac").is_none() && r.get("reason").is_none());
    let time = r["time"].as_str().unwrap();
    assert!(time.len() == 24 && time.ends_with('Z'), "{time}");
    assert!(ls[1].starts_with(r#"{"seq":1,"time":""#), "{}", ls[1]);
    assert_eq!(json(&ls[6])["kind"], "audit_close");
}

#[test]
fn edited_field_fails_naming_that_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&cfg(&path), 5);
    let mut ls = lines(&path);
    assert!(ls[3].contains(r#""status":200"#));
    ls[3] = ls[3].replace(r#""status":200"#, r#""status":201"#);
    write_lines(&path, &ls);

    let e = verify(&one(&path), None, None).unwrap_err();
    assert_eq!((e.line, e.seq), (Some(4), Some(3)));
    assert_eq!(e.problem, Problem::Edited { next_seq: 4 });
    let msg = e.to_string();
    assert!(
        msg.contains("audit.log:4 (seq 3)") && msg.contains("edited"),
        "{msg}"
    );
}

#[test]
fn edited_last_record_needs_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let cp = write_log(&cfg(&path), 2);
    let mut ls = lines(&path);
    let last = ls.len() - 1;
    ls[last] = ls[last].replace("audit_close", "audit_closf");
    write_lines(&path, &ls);

    verify(&one(&path), None, None).unwrap();
    let e = verify(&one(&path), Some(&cp), None).unwrap_err();
    assert_eq!(e.problem, Problem::CheckpointMismatch);
    assert_eq!(e.seq, Some(cp.seq));
}

#[test]
fn deleted_middle_record_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&cfg(&path), 5);
    let mut ls = lines(&path);
    ls.remove(3);
    write_lines(&path, &ls);

    let e = verify(&one(&path), None, None).unwrap_err();
    assert_eq!((e.line, e.seq), (Some(4), Some(4)));
    assert_eq!(e.problem, Problem::Deleted { from: 3, to: 3 });
}

#[test]
fn repeated_record_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&cfg(&path), 5);
    let mut ls = lines(&path);
    let dup = ls[3].clone();
    ls.insert(4, dup);
    write_lines(&path, &ls);

    let e = verify(&one(&path), None, None).unwrap_err();
    assert_eq!((e.line, e.seq), (Some(5), Some(3)));
    assert_eq!(e.problem, Problem::OutOfOrder { expected: 4 });
}

#[test]
fn truncated_tail_passes_alone_but_fails_against_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&cfg(&path), 5);
    let mut ls = lines(&path);
    ls.truncate(ls.len() - 2);
    write_lines(&path, &ls);

    let s = verify(&one(&path), None, None).unwrap();
    assert_eq!(s.last_seq, Some(4));
    let cp = Checkpoint::read_file(&checkpoint_path(&path)).unwrap();
    let e = verify(&one(&path), Some(&cp), None).unwrap_err();
    assert_eq!(
        e.problem,
        Problem::Truncated {
            last_seq: Some(4),
            checkpoint_seq: 6
        }
    );
    assert!(e.to_string().contains("cut off"), "{e}");
}

#[test]
fn torn_last_line_fails_and_is_cut_off_on_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&cfg(&path), 2);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(br#"{"seq":4,"time":"2026-"#);
    std::fs::write(&path, &bytes).unwrap();

    let e = verify(&one(&path), None, None).unwrap_err();
    assert_eq!((e.line, e.problem.clone()), (Some(5), Problem::Torn));

    write_log(&cfg(&path), 1);
    let s = verify(&one(&path), None, None).unwrap();
    assert_eq!((s.records, s.last_seq), (7, Some(6)));
    let open = json(&lines(&path)[4]);
    assert_eq!(open["kind"], "audit_open");
    assert_eq!(open["seq"], 4);
    assert_eq!(open["detail"]["truncated_bytes"], 22);
}

#[test]
fn reopening_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&cfg(&path), 3);
    let cp = write_log(&cfg(&path), 2);
    assert_eq!(cp.seq, 8);

    let s = verify(&one(&path), Some(&cp), None).unwrap();
    assert_eq!((s.records, s.first_seq, s.last_seq), (9, Some(0), Some(8)));
    let ls = lines(&path);
    let reopened = json(&ls[5]);
    assert_eq!(reopened["kind"], "audit_open");
    assert_eq!(reopened["seq"], 5);
    assert_eq!(reopened["detail"]["resumed_from"], "file");
    assert_eq!(
        reopened["prev"],
        hex::encode(Sha256::digest(ls[4].as_bytes()))
    );
}

#[test]
fn garbage_last_line_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    std::fs::write(&path, "not json\n").unwrap();
    assert!(matches!(
        AuditLog::start(&cfg(&path)),
        Err(AuditError::Resume { .. })
    ));
}

fn rotated_files(dir: &Path, path: &Path) -> Vec<PathBuf> {
    let prefix = format!("{}.0", path.file_name().unwrap().to_str().unwrap());
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(&prefix)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn rotation_keeps_the_chain_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let c = AuditConfig {
        max_file_bytes: Some(1000),
        ..cfg(&path)
    };
    let cp = write_log(&c, 30);

    let rotated = rotated_files(dir.path(), &path);
    assert!(rotated.len() >= 3, "{rotated:?}");
    assert_eq!(rotated[0], rotated_path(&path, 0));
    for f in &rotated {
        assert!(std::fs::metadata(f).unwrap().len() <= 1000, "{f:?}");
    }
    let mut all = rotated.clone();
    all.push(path.clone());
    let s = verify(&all, Some(&cp), None).unwrap();
    assert_eq!(
        (s.records, s.first_seq, s.last_seq),
        (32, Some(0), Some(31))
    );

    // The first line of each file chains to the last of the one before.
    let second = lines(&rotated[1]);
    let end_of_first = lines(&rotated[0]).pop().unwrap();
    assert_eq!(
        json(&second[0])["prev"],
        hex::encode(Sha256::digest(end_of_first.as_bytes()))
    );

    // The newest file alone is a tail that starts mid-chain.
    let tail = verify(&one(&path), Some(&cp), None).unwrap();
    assert!(tail.first_seq.unwrap() > 0);
    // Files out of order, or one left out, fail.
    let mut reversed = all.clone();
    reversed.swap(0, 1);
    assert!(verify(&reversed, None, None).is_err());
    let mut gap = all.clone();
    gap.remove(1);
    let e = verify(&gap, None, None).unwrap_err();
    assert!(matches!(e.problem, Problem::Deleted { .. }), "{e}");
    assert_eq!(e.file.as_deref(), Some(all[2].as_path()));
    // A checkpoint older than the files given cannot be checked.
    let old = Checkpoint {
        seq: 0,
        hash: GENESIS.into(),
    };
    let e = verify(&one(&path), Some(&old), None).unwrap_err();
    assert!(
        matches!(
            e.problem,
            Problem::CheckpointBeforeStart {
                checkpoint_seq: 0,
                ..
            }
        ),
        "{e}"
    );

    // Reopening continues the chain in the current file.
    let cp2 = write_log(&c, 3);
    let mut all = rotated_files(dir.path(), &path);
    all.push(path.clone());
    let s = verify(&all, Some(&cp2), None).unwrap();
    assert_eq!(s.last_seq, Some(36));
}

#[test]
fn missing_current_file_continues_from_checkpoint() {
    // A crash after rotation renamed the file, before the new one had a line.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let cp = write_log(&cfg(&path), 2);
    std::fs::rename(&path, rotated_path(&path, 0)).unwrap();

    write_log(&cfg(&path), 1);
    let open = json(&lines(&path)[0]);
    assert_eq!(open["seq"], cp.seq + 1);
    assert_eq!(open["prev"], cp.hash.as_str());
    assert_eq!(open["detail"]["resumed_from"], "checkpoint");
    let s = verify(&[rotated_path(&path, 0), path.clone()], None, None).unwrap();
    assert_eq!(s.last_seq, Some(cp.seq + 3));
}

#[test]
fn truncated_while_down_is_noted_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    write_log(&cfg(&path), 4);
    let mut ls = lines(&path);
    ls.truncate(3);
    write_lines(&path, &ls);

    let log = AuditLog::start(&cfg(&path)).unwrap();
    log.close().unwrap();
    let open = json(&lines(&path)[3]);
    assert_eq!(open["kind"], "audit_open");
    assert_eq!(open["detail"]["checkpoint_seq"], 5);
}

fn key_file(dir: &Path, name: &str, key: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{key}\n")).unwrap();
    p
}

#[test]
fn hmac_log_verifies_with_its_key_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let c = AuditConfig {
        hmac_key_file: Some(key_file(dir.path(), "k", "right key")),
        ..cfg(&path)
    };
    let cp = write_log(&c, 3);
    assert!(lines(&path).iter().all(|l| json(l)["mac"].is_string()));

    let s = verify(&one(&path), Some(&cp), Some(b"right key")).unwrap();
    assert!(s.macs_checked);
    assert_eq!(s.records, 5);
    let e = verify(&one(&path), None, Some(b"wrong key")).unwrap_err();
    assert_eq!(
        (e.line, e.seq, e.problem),
        (Some(1), Some(0), Problem::BadMac)
    );
    // Without a key the chain still checks.
    verify(&one(&path), None, None).unwrap();
    // A log without macs fails when a key is expected.
    let plain = dir.path().join("plain.log");
    write_log(&cfg(&plain), 1);
    let e = verify(&one(&plain), None, Some(b"right key")).unwrap_err();
    assert_eq!(e.problem, Problem::MissingMac);
}

#[test]
fn mac_is_over_the_line_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let c = AuditConfig {
        hmac_key_file: Some(key_file(dir.path(), "k", "k1")),
        ..cfg(&path)
    };
    write_log(&c, 1);
    let line = lines(&path)[1].clone();
    let mac = json(&line)["mac"].as_str().unwrap().to_owned();
    let suffix = format!(r#","mac":"{mac}"}}"#);
    let body = format!("{}}}", line.strip_suffix(&suffix).unwrap());
    let mut m = HmacSha256::new_from_slice(b"k1").unwrap();
    m.update(body.as_bytes());
    assert_eq!(hex::encode(m.finalize().into_bytes()), mac);
    assert!(json(&body).get("mac").is_none());
}

#[test]
fn changed_mac_or_field_fails_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let c = AuditConfig {
        hmac_key_file: Some(key_file(dir.path(), "k", "k1")),
        ..cfg(&path)
    };
    write_log(&c, 4);
    let orig = lines(&path);

    // seq 2 carrying seq 3's mac.
    let mut ls = orig.clone();
    let (m2, m3) = (
        json(&ls[2])["mac"].as_str().unwrap().to_owned(),
        json(&ls[3])["mac"].as_str().unwrap().to_owned(),
    );
    ls[2] = ls[2].replace(&m2, &m3);
    write_lines(&path, &ls);
    let e = verify(&one(&path), None, Some(b"k1")).unwrap_err();
    assert_eq!((e.seq, e.problem), (Some(2), Problem::BadMac));
    let e = verify(&one(&path), None, None).unwrap_err();
    assert_eq!(
        (e.seq, e.problem),
        (Some(2), Problem::Edited { next_seq: 3 })
    );

    // An edited field: the mac catches it on the line itself.
    let mut ls = orig.clone();
    ls[2] = ls[2].replace(r#""output_tokens":20"#, r#""output_tokens":2"#);
    write_lines(&path, &ls);
    let e = verify(&one(&path), None, Some(b"k1")).unwrap_err();
    assert_eq!((e.seq, e.problem), (Some(2), Problem::BadMac));
}

#[test]
fn secrets_in_detail_are_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::start(&cfg(&path)).unwrap();
    log.record(AuditRecord::new(kind::ADMIN).detail(serde_json::json!({
        "api_key": "sk-very-secret",
        "nested": [{"cache_salt": "salty-value", "Authorization": "Bearer abc"}],
        "cached_tokens": 5,
        "max_tokens": 7,
    })));
    log.close().unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    for secret in ["sk-very-secret", "salty-value", "Bearer abc"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    let rec = json(&lines(&path)[1]);
    assert_eq!(rec["detail"]["api_key"], "[redacted]");
    assert_eq!(rec["detail"]["nested"][0]["cache_salt"], "[redacted]");
    assert_eq!(rec["detail"]["cached_tokens"], 5);
    assert_eq!(rec["detail"]["max_tokens"], 7);
    assert!(is_secret_name("hmac-key") && is_secret_name("access_token"));
    assert!(!is_secret_name("prompt_tokens") && !is_secret_name("keys_total"));
}

#[test]
fn drops_are_counted_and_recorded_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::start(&cfg(&path)).unwrap();
    log.count_drops_for_test(3);
    log.record(req(0));
    let cp = log.flush().unwrap().unwrap();
    assert_eq!(log.checkpoint(), Some(cp.clone()));
    assert_eq!(cp.seq, 2);
    assert_eq!(log.written(), 3);
    let ls = lines(&path);
    let note = json(&ls[1]);
    assert_eq!(note["kind"], "records_dropped");
    assert_eq!(note["detail"]["count"], 3);
    assert_eq!(json(&ls[2])["kind"], "request");

    log.close().unwrap();
    let written = log.written();
    log.record(req(1));
    assert_eq!(log.dropped(), 4);
    assert_eq!(log.written(), written);
    // Closing again is a no-op.
    assert_eq!(log.close().unwrap(), log.checkpoint());
    verify(&one(&path), None, None).unwrap();
}

#[test]
fn disabled_log_is_inert() {
    let log = AuditLog::start(&AuditConfig::default()).unwrap();
    assert!(!log.is_enabled());
    log.record(req(0));
    assert_eq!((log.written(), log.dropped()), (0, 0));
    assert_eq!(log.checkpoint(), None);
    assert!(log.close().unwrap().is_none());
    assert!(!AuditLog::disabled().is_enabled());
}

#[test]
fn every_fsync_policy_writes_a_valid_log() {
    for fsync in [
        FsyncPolicy::Never,
        FsyncPolicy::Batch,
        FsyncPolicy::IntervalMs(5),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = AuditLog::start(&AuditConfig {
            fsync,
            ..cfg(&path)
        })
        .unwrap();
        for i in 0..100 {
            log.record(req(i));
            if i == 50 {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let cp = log.close().unwrap().unwrap();
        let s = verify(&one(&path), Some(&cp), None).unwrap();
        assert_eq!(s.records, 102, "{fsync:?}");
    }
}

#[tokio::test]
async fn async_shutdown_writes_everything_queued() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let log = AuditLog::start(&AuditConfig {
        queue: 4,
        ..cfg(&path)
    })
    .unwrap();
    for i in 0..3 {
        log.record(req(i));
    }
    let cp = log.shutdown().await.unwrap().unwrap();
    let s = verify(&one(&path), Some(&cp), None).unwrap();
    assert_eq!((s.records, log.dropped()), (5, 0));
    assert_eq!(json(lines(&path).last().unwrap())["kind"], "audit_close");
}

#[test]
fn config_parses() {
    let c: AuditConfig = serde_json::from_str(
        r#"{"path":"/var/log/kvgate/audit.log","fsync":{"interval_ms":200},"max_file_bytes":1000000}"#,
    )
    .unwrap();
    assert_eq!(c.fsync, FsyncPolicy::IntervalMs(200));
    assert_eq!(c.queue, 65536);
    let d = AuditConfig::default();
    assert_eq!(
        (d.fsync, d.path, d.queue),
        (FsyncPolicy::Batch, None, 65536)
    );
    for (s, want) in [
        (r#""never""#, FsyncPolicy::Never),
        (r#""batch""#, FsyncPolicy::Batch),
    ] {
        let p: FsyncPolicy = serde_json::from_str(s).unwrap();
        assert_eq!(p, want);
        assert_eq!(serde_json::to_string(&p).unwrap(), s);
    }
    assert_eq!(
        serde_json::to_string(&FsyncPolicy::IntervalMs(7)).unwrap(),
        r#"{"interval_ms":7}"#
    );
    assert!(serde_json::from_str::<FsyncPolicy>(r#""sometimes""#).is_err());
    assert!(serde_json::from_str::<FsyncPolicy>(r#"{"interval_ms":0}"#).is_err());
    assert!(serde_json::from_str::<AuditConfig>(r#"{"pth":"x"}"#).is_err());
    let zero = AuditConfig {
        queue: 0,
        ..cfg(Path::new("/nonexistent/audit.log"))
    };
    assert!(matches!(AuditLog::start(&zero), Err(AuditError::Config(_))));
}

#[test]
fn time_is_rfc3339_utc_millis() {
    let at = |s: u64, ms: u64| {
        format_time(UNIX_EPOCH + Duration::from_secs(s) + Duration::from_millis(ms))
    };
    assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
    assert_eq!(at(951_782_400, 500), "2000-02-29T00:00:00.500Z");
    assert_eq!(at(1_735_689_599, 999), "2024-12-31T23:59:59.999Z");
    assert_eq!(at(4_107_542_400, 0), "2100-03-01T00:00:00.000Z");
    assert_eq!(at(253_402_300_799, 1), "9999-12-31T23:59:59.001Z");
}

#[test]
fn key_file_strips_one_newline() {
    let dir = tempfile::tempdir().unwrap();
    let p = key_file(dir.path(), "k", "abc");
    assert_eq!(read_key_file(&p).unwrap().as_slice(), b"abc");
    std::fs::write(&p, "\n").unwrap();
    assert!(read_key_file(&p).is_err());
}

#[test]
fn a_line_is_its_record_with_seq_time_and_prev_first() {
    #[derive(serde::Serialize)]
    struct Flat<'a> {
        seq: u64,
        time: &'a str,
        prev: &'a str,
        #[serde(flatten)]
        record: &'a AuditRecord,
    }
    let time = UNIX_EPOCH + Duration::from_millis(1_767_323_045_678);
    let prev = [0xabu8; 32];
    for rec in [
        req(7).detail(serde_json::json!({"why": "a \"quoted\" reason"})),
        AuditRecord::new(kind::AUDIT_OPEN),
    ] {
        let body = encode_record(&rec).unwrap();
        let (line, hash) = encode_line(41, time, &prev, &body, None).unwrap();
        let want = serde_json::to_vec(&Flat {
            seq: 41,
            time: &format_time(time),
            prev: &hex::encode(prev),
            record: &rec,
        })
        .unwrap();
        assert_eq!(
            String::from_utf8(line.clone()).unwrap(),
            String::from_utf8(want).unwrap()
        );
        assert_eq!(hash, <[u8; 32]>::from(Sha256::digest(&line)));
    }
    assert!(encode_line(0, time, &prev, b"[1]", None).is_err());
}
