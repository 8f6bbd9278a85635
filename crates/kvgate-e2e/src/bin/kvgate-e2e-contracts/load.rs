//! Suspension, rate limits, and the audited load.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures_util::StreamExt;
use kvgate_auth::Limits;
use kvgate_sim::engine::EngineConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::fleet;

pub struct Suspension {
    pub suspend_ms: u128,
    pub stream_cut: bool,
    /// Prompt tokens the engines found cached for a prompt sent again after
    /// suspension and reactivation (must be 0: a fresh epoch).
    pub hit_after_reactivation: u64,
    pub rate_limited: bool,
}

const RATE_LIMIT_RPM: u32 = 5;

fn random_tokens(n: usize, rng: &mut StdRng) -> Vec<u32> {
    (0..n).map(|_| rng.random_range(1000..20000)).collect()
}

pub async fn suspension_and_limits(work: &Path) -> Result<Suspension> {
    let keys = [("key-a", "acme"), ("key-l", "limited")];
    let f = fleet::start(
        2,
        EngineConfig::default(),
        &keys,
        work,
        "suspension-audit.jsonl",
        |c| {
            c.contracts[1].limits = Limits {
                requests_per_minute: Some(RATE_LIMIT_RPM),
                ..Limits::default()
            };
        },
    )
    .await?;
    let mut rng = StdRng::seed_from_u64(11);
    let prompt = random_tokens(256, &mut rng);
    ensure!(f.complete("key-a", &prompt, 1).await?.status == 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = f.engine_hits();
    ensure!(f.complete("key-a", &prompt, 1).await?.status == 200);
    ensure!(
        f.engine_hits() > before,
        "the same contract's second request did not hit the engine's cache"
    );

    // A long stream in flight, then the suspension.
    let resp = f
        .post_completion("key-a", &random_tokens(64, &mut rng), 400, true)
        .await?;
    let mut stream = resp.bytes_stream();
    stream.next().await.context("stream ended at once")??;
    let reader = tokio::spawn(async move {
        let mut chunks = 0usize;
        while let Some(c) = stream.next().await {
            match c {
                Ok(_) => chunks += 1,
                Err(_) => return (chunks, true),
            }
        }
        (chunks, false)
    });
    let t = Instant::now();
    f.admin("acme", "suspend").await?;
    let mut suspend_ms = u128::MAX;
    while t.elapsed() < Duration::from_secs(5) {
        if f.complete("key-a", &prompt, 1).await?.status == 403 {
            suspend_ms = t.elapsed().as_millis();
            break;
        }
    }
    let (chunks_after, broke) = tokio::time::timeout(Duration::from_secs(10), reader).await??;
    // 400 tokens are ~2 s of decoding: a cut stream ends well before.
    let stream_cut = broke && chunks_after < 300;

    f.admin("acme", "activate").await?;
    let before = f.engine_hits();
    ensure!(f.complete("key-a", &prompt, 1).await?.status == 200);
    let hit_after_reactivation = f.engine_hits() - before;

    let mut statuses = Vec::new();
    for _ in 0..RATE_LIMIT_RPM + 3 {
        let resp = f
            .post_completion("key-l", &random_tokens(16, &mut rng), 1, false)
            .await?;
        let retry = resp.headers().contains_key("retry-after");
        statuses.push((resp.status().as_u16(), retry));
        resp.bytes().await?;
    }
    let ok = statuses.iter().filter(|s| s.0 == 200).count();
    let limited = statuses.iter().filter(|s| s.0 == 429 && s.1).count();
    Ok(Suspension {
        suspend_ms,
        stream_cut,
        hit_after_reactivation,
        rate_limited: ok == RATE_LIMIT_RPM as usize && limited == 3,
    })
}

pub struct Audited {
    pub requests: u64,
    pub records: u64,
    pub request_records: u64,
    pub verify: String,
}

const LOAD_WORKERS: usize = 16;

/// Closed-loop load from two contracts sharing nothing, each request a
/// shared 512-token prefix of its contract plus a unique question.
pub async fn audited_load(work: &Path, duration: Duration) -> Result<Audited> {
    let keys = [("key-a", "acme"), ("key-b", "globex")];
    let f = std::sync::Arc::new(
        fleet::start(
            4,
            EngineConfig::default(),
            &keys,
            work,
            "load-audit.jsonl",
            |_| {},
        )
        .await?,
    );
    let mut rng = StdRng::seed_from_u64(13);
    let prefixes: Vec<Vec<u32>> = (0..8).map(|_| random_tokens(512, &mut rng)).collect();
    let deadline = Instant::now() + duration;
    let mut workers = Vec::new();
    for w in 0..LOAD_WORKERS {
        let f = f.clone();
        let prefixes = prefixes.clone();
        workers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(100 + w as u64);
            let key = if w % 2 == 0 { "key-a" } else { "key-b" };
            let mut sent = 0u64;
            while Instant::now() < deadline {
                let mut p = prefixes[rng.random_range(0..prefixes.len())].clone();
                p.extend(random_tokens(64, &mut rng));
                f.complete(key, &p, 16).await?;
                sent += 1;
            }
            anyhow::Ok(sent)
        }));
    }
    let mut requests = 0;
    for w in workers {
        requests += w.await??;
    }
    let log = f.gw.sentinel().audit();
    let checkpoint = log.shutdown().await?.context("audit log is on")?;
    let path = log.path().context("audit log path")?.to_path_buf();
    let text = std::fs::read_to_string(&path)?;
    let mut records = 0;
    let mut request_records = 0;
    for line in text.lines() {
        records += 1;
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["kind"] == kvgate_auth::audit::kind::REQUEST {
            request_records += 1;
        }
    }
    let verify = match kvgate_auth::audit::verify(&[path], Some(&checkpoint), None) {
        Ok(s) if s.records == records => "ok".to_string(),
        Ok(s) => format!("FAILED ({} of {records} records checked)", s.records),
        Err(e) => format!("FAILED ({e})"),
    };
    Ok(Audited {
        requests,
        records,
        request_records,
        verify,
    })
}
