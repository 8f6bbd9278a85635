//! `kvgate audit verify` on a log written by the audit writer.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Output};

use kvgate_auth::audit::{checkpoint_path, AuditConfig, AuditLog, AuditRecord};

fn kvgate(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kvgate"))
        .arg("audit")
        .arg("verify")
        .args(args)
        .output()
        .unwrap()
}

fn write_log(path: &Path, key: Option<&Path>) {
    let log = AuditLog::start(&AuditConfig {
        path: Some(path.to_path_buf()),
        hmac_key_file: key.map(Path::to_path_buf),
        ..AuditConfig::default()
    })
    .unwrap();
    for _ in 0..3 {
        log.record(AuditRecord::new("request").contract("acme").status(200));
    }
    log.close().unwrap();
}

#[test]
fn verify_passes_a_good_log_and_names_the_first_bad_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.log");
    let key = dir.path().join("audit.key");
    std::fs::write(&key, "0123456789abcdef\n").unwrap();
    write_log(&path, Some(&key));
    let cp = checkpoint_path(&path);

    let out = kvgate(&[
        path.as_os_str(),
        "--checkpoint".as_ref(),
        cp.as_os_str(),
        "--hmac-key-file".as_ref(),
        key.as_os_str(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("audit verify: ok, 5 records, seq 0..4"),
        "{stdout}"
    );

    let text = std::fs::read_to_string(&path).unwrap();
    let edited = text.replacen(r#""status":200"#, r#""status":500"#, 1);
    assert_ne!(edited, text);
    std::fs::write(&path, edited).unwrap();
    let out = kvgate(&[path.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains("audit.log:2 (seq 1)") && stderr.contains("edited"),
        "{stderr}"
    );

    let out = kvgate(&[
        path.as_os_str(),
        "--hmac-key-file".as_ref(),
        key.as_os_str(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stderr.contains("(seq 1)") && stderr.contains("mac"),
        "{stderr}"
    );
}
