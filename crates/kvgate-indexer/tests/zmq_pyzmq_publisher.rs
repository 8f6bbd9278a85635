#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The subscriber against a real libzmq publisher: scripts/fake_vllm_publisher.py
//! (pyzmq) frames real vLLM payloads exactly as vLLM's ZmqEventPublisher does,
//! drops one batch from the live stream, and serves it from its replay ROUTER.
//!
//! Needs python3 with pyzmq (`pip install pyzmq`); KVGATE_SKIP_PYZMQ=1 skips.

mod zmq_common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use kvgate_indexer::metrics::IndexerMetrics;
use kvgate_indexer::subscriber::{run_with_options, SubscriberOptions};
use kvgate_indexer::EndpointConfig;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;
use zmq_common::{count, endpoint, free_port, held, new_index, replays, wait_until};

/// False (after saying why) when the test should be skipped.
fn pyzmq_available() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import zmq"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    if std::env::var("KVGATE_SKIP_PYZMQ").as_deref() == Ok("1") {
        eprintln!("SKIPPED: python3 with pyzmq not found and KVGATE_SKIP_PYZMQ=1");
        return false;
    }
    panic!(
        "this test needs python3 with pyzmq (a real libzmq publisher): run \
         `pip install pyzmq` (./scripts/test does), or set KVGATE_SKIP_PYZMQ=1 to skip it"
    );
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fake_vllm_publisher.py")
}

/// Runs the script with payload set `set` against a subscriber whose
/// endpoint has `block_size`, and checks the index ends equal to the
/// engine's true block set after repairing the dropped batch by replay.
async fn interop(set: &str, block_size: u32, sub_binds: bool) {
    if !pyzmq_available() {
        return;
    }
    let (pub_port, replay_port) = (free_port(), free_port());
    let mut child = Command::new("python3")
        .arg(script())
        .args(["--pub-port", &pub_port.to_string()])
        .args(["--replay-port", &replay_port.to_string()])
        .args(["--set", set, "--drop-index", "2", "--max-runtime", "60"])
        .args(sub_binds.then_some("--pub-connect"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("cannot run python3");
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();

    let index = new_index();
    let metrics = Arc::new(IndexerMetrics::default());
    let name = format!("http://pyzmq-{set}-{sub_binds}");
    let source = EndpointConfig {
        url: name.clone(),
        models: vec!["m".into()],
        adapters: Vec::new(),
        block_size,
        // vLLM binds a wildcard endpoint (the subscriber connects) and
        // connects to any other (the subscriber binds).
        events: Some(format!("tcp://127.0.0.1:{pub_port}")),
        replay: Some(format!("tcp://127.0.0.1:{replay_port}")),
        topic: String::new(),
        bind: sub_binds,
    };
    let (tx, rx) = watch::channel(false);
    let opts = SubscriberOptions {
        replay_timeout: Duration::from_secs(2),
        ..SubscriberOptions::default()
    };
    let task = tokio::spawn(run_with_options(
        source,
        index.clone(),
        metrics.clone(),
        rx,
        opts,
    ));

    // Slow joiner: the script publishes empty batches until told to go.
    let joined = wait_until(Duration::from_secs(20), || {
        endpoint(&index, &name).and_then(|e| e.last_seq).is_some()
    })
    .await;
    assert!(joined, "no message from the pyzmq publisher within 20 s");
    stdin.write_all(b"go\n").await.unwrap();
    stdin.flush().await.unwrap();

    let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("publisher printed no result")
        .unwrap()
        .expect("publisher exited early");
    let report: serde_json::Value = serde_json::from_str(&line).unwrap();
    let want: BTreeSet<(u64, String)> = report["true_blocks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_u64().unwrap(), p[1].as_str().unwrap().to_string()))
        .collect();
    assert!(!want.is_empty(), "the scenario should leave blocks held");
    let last_seq = report["last_seq"].as_i64().unwrap();

    let done = wait_until(Duration::from_secs(20), || {
        endpoint(&index, &name).and_then(|e| e.last_seq) == Some(last_seq)
            && held(&index, &name) == want
    })
    .await;
    assert!(
        done,
        "index {:?} (last seq {:?}) != engine {:?} (last seq {last_seq})",
        held(&index, &name),
        endpoint(&index, &name).and_then(|e| e.last_seq),
        want
    );
    assert_eq!(
        count(&metrics.seq_gaps, &name),
        1,
        "the dropped batch is a gap"
    );
    assert!(replays(&metrics, &name, "ok") >= 1);
    assert_eq!(replays(&metrics, &name, "unavailable"), 0);
    assert_eq!(count(&metrics.decode_errors, &name), 0);
    assert!(!endpoint(&index, &name).unwrap().stale);

    tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("subscriber did not stop")
        .unwrap()
        .unwrap();
    drop(stdin); // EOF: the script exits
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("publisher did not exit")
        .unwrap();
    assert!(status.success(), "publisher exited with {status}");
}

/// vLLM 0.33.0 payloads (block size 16): prefix, LoRA + cache salt,
/// multimodal, eviction, reset, a sliding-window group, an empty batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyzmq_publisher_v033_payloads() {
    interop("v033", 16, false).await;
}

/// Payloads captured from a real vLLM 0.32 server (block size 32).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyzmq_publisher_real_vllm_032_capture() {
    interop("real032", 32, false).await;
}

/// vLLM's PUB connects (endpoint without a wildcard host); the subscriber binds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyzmq_publisher_connects_to_bound_subscriber() {
    interop("v033", 16, true).await;
}
