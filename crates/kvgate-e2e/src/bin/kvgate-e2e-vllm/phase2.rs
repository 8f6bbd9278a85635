//! Phase 2 (Llama 3 tokenizer, block size 32, 128 blocks): token and block
//! parity, evictions checked by probing vLLM, a forced event gap repaired by
//! replay, a restart purging the index, and the simulator's fidelity against
//! the restarted (fresh) instance.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;
use kvgate_e2e::capture::{block_counts, replay_all};
use kvgate_e2e::checks::CacheTrace;
use kvgate_e2e::corpus::{self, Kind};
use kvgate_e2e::procs::Managed;
use kvgate_e2e::proxy::PausableProxy;
use kvgate_e2e::{metric_sum, EngineAddr};
use kvgate_router::Policy;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::requests::{corpus_block_parity, direct_hits, explain, send_checked, token_parity};
use crate::summary::Summary;
use crate::tier::{Fleet, Tier, ENGINE_START, EVENTS_MAX, EVENTS_QUIET, GATEWAY_START, LLAMA3};

/// Token-id prompts of `blocks` full blocks plus a short tail, from a seed.
fn token_prompts(
    seed: u64,
    n: usize,
    blocks: usize,
    block_size: usize,
    tail: usize,
) -> Vec<Vec<u32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            (0..blocks * block_size + tail)
                .map(|_| rng.random_range(1000..100_000))
                .collect()
        })
        .collect()
}

/// Probes engine `e` with `prefix` + one fresh token: the index's prediction
/// (leading blocks held) must equal vLLM's actual hit.
async fn probe(
    http: &reqwest::Client,
    fleet: &mut Fleet,
    gateway: &str,
    e: usize,
    prefix: &[u32],
    tail: u32,
    s: &mut Summary,
) -> Result<()> {
    let bs = fleet.block_size;
    let mut prompt = prefix.to_vec();
    prompt.push(tail);
    let body = json!({"model": fleet.served, "prompt": prompt, "max_tokens": 1, "temperature": 0});
    fleet.capture.settle(EVENTS_QUIET, EVENTS_MAX).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let predicted = explain(http, gateway, Kind::Completion, &body, None)
        .await?
        .leading_held(bs, fleet.url(e)) as u64
        * u64::from(bs);
    let actual = direct_hits(http, fleet, e, &body, "/v1/completions").await?;
    fleet.advance();
    s.probes += 1;
    if predicted == actual {
        if actual > 0 {
            s.probes_cached += 1;
        } else {
            s.probes_gone += 1;
        }
    } else {
        s.probe_mismatches.push(format!(
            "engine {e}: index says {predicted} cached tokens, vLLM hit {actual}"
        ));
    }
    Ok(())
}

pub(crate) async fn phase_llama(t: &Tier, s: &mut Summary) -> Result<()> {
    eprintln!("== phase 2: Llama 3 tokenizer, block size 32, 128 blocks");
    let http = &t.http;
    let mut fleet = t.start_fleet(&LLAMA3, 30).await?;
    // Engine 1's events reach the gateway through a proxy the tier can cut.
    let proxy = PausableProxy::start(
        fleet.engines[1]
            .0
            .events
            .trim_start_matches("tcp://")
            .to_string(),
    )
    .await?;
    let cfg = t.gateway_config(
        &fleet,
        23,
        Policy::PrecisePrefix,
        &[0, 1],
        Some((1, format!("tcp://127.0.0.1:{}", proxy.port))),
        kvgate_auth::AuthConfig::default(),
    );
    let (_gw, gateway) = t.start_gateway("gateway-llama3", &cfg).await?;

    let items = corpus::corpus(2, t.args.chat, t.args.completions, 700);
    token_parity(http, &fleet, &gateway, &items, &mut s.tokens).await?;
    eprintln!(
        "  token parity (qwen + llama3): {}/{}",
        s.tokens.matched, s.tokens.total
    );
    let before = s.blocks.checked;
    corpus_block_parity(http, &mut fleet, &gateway, &items, &mut s.blocks).await?;
    eprintln!(
        "  block parity (bs 32): {} blocks more",
        s.blocks.checked - before
    );

    // Evictions: 40 prompts of 20 blocks through 2 x 127 blocks.
    let prompts = token_prompts(7, 40, 20, 32, 5);
    let mark = fleet.capture.mark();
    let mut routed = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let body = json!({"model": fleet.served, "prompt": p, "max_tokens": 2, "temperature": 0});
        routed.push(
            send_checked(
                http,
                &mut fleet,
                &gateway,
                Kind::Completion,
                &body,
                None,
                &format!("evict-{i}"),
                &mut s.blocks,
            )
            .await?,
        );
    }
    s.evicted_blocks = block_counts(&fleet.capture.since(mark)).1;
    // Probing stores blocks too (and evicts others), so the most recent
    // prompts go first, on the engine that served them, then the oldest ones.
    let url0 = fleet.url(0).to_string();
    for i in (34..40).rev() {
        let e = if routed[i] == url0 { 0 } else { 1 };
        probe(
            http,
            &mut fleet,
            &gateway,
            e,
            &prompts[i][..640],
            900 + i as u32,
            s,
        )
        .await?;
    }
    for (i, p) in prompts.iter().enumerate().take(6) {
        for e in 0..2 {
            probe(http, &mut fleet, &gateway, e, &p[..640], 900 + i as u32, s).await?;
        }
    }
    eprintln!(
        "  evictions: {} blocks removed; probes {} ({} cached, {} gone, {} mismatched)",
        s.evicted_blocks,
        s.probes,
        s.probes_cached,
        s.probes_gone,
        s.probe_mismatches.len()
    );

    // A gap: the gateway's subscription to engine 1 is cut while engine 1 works.
    let replays_ok = |text: &str| metric_sum(text, "kv_cache_replays_total", &["outcome=\"ok\""]);
    let metrics_before = http
        .get(format!("{gateway}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    proxy.pause();
    let missed = token_prompts(8, 6, 12, 32, 3);
    for p in &missed {
        let body = json!({"model": fleet.served, "prompt": p, "max_tokens": 1, "temperature": 0});
        direct_hits(http, &fleet, 1, &body, "/v1/completions").await?;
    }
    fleet.advance();
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.resume();
    let started = Instant::now();
    let mut replayed = false;
    while started.elapsed() < Duration::from_secs(30) {
        let text = http
            .get(format!("{gateway}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        if replays_ok(&text) > replays_ok(&metrics_before) {
            replayed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mismatches_before = s.probe_mismatches.len();
    let cached_before = s.probes_cached;
    for (i, p) in missed.iter().enumerate() {
        probe(http, &mut fleet, &gateway, 1, &p[..384], 950 + i as u32, s).await?;
    }
    s.gap_replayed = replayed
        && s.probe_mismatches.len() == mismatches_before
        && s.probes_cached >= cached_before + missed.len();
    eprintln!(
        "  gap: replay {replayed}, missed prompts found after replay: {}",
        s.gap_replayed
    );

    // A restart purges engine 1's entries, before it serves anything.
    let held_before: Vec<usize> = explain_all(http, &gateway, &fleet, &prompts, 1).await?;
    let url1 = fleet.url(1).to_string();
    if let Some(mut p) = fleet.engines[1].1.take() {
        p.stop(Duration::from_secs(10));
    }
    let proc = t.spawn_vllm(
        "vllm-llama3-1-restarted",
        &LLAMA3,
        (t.port(33), t.port(34), t.port(35)),
        1,
    )?;
    fleet.engines[1].1 = Some(proc);
    if let Some(p) = fleet.engines[1].1.as_mut() {
        p.wait_ready(&format!("{url1}/health"), ENGINE_START)
            .await?;
    }
    let started = Instant::now();
    let mut purged = false;
    while started.elapsed() < Duration::from_secs(30) {
        let held: Vec<usize> = explain_all(http, &gateway, &fleet, &prompts, 1).await?;
        if held.iter().all(|h| *h == 0) {
            purged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    s.restart_purged = purged && held_before.iter().any(|h| *h > 0);
    eprintln!(
        "  restart: engine 1 held {} blocks of the eviction prompts before, purged after: {purged}",
        held_before.iter().sum::<usize>()
    );

    // Fidelity: the same script against the fresh vLLM instance and the sim.
    let vllm_trace = fidelity_trace(http, &mut fleet, 1).await?;
    let sim_port = t.port(40);
    let mut sim_cmd = Command::new(&t.args.kvgate);
    sim_cmd
        .arg("sim")
        .args([
            "--port",
            &sim_port.to_string(),
            "--host",
            "127.0.0.1",
            "--model",
            "llama3",
        ])
        .args([
            "--block-size",
            "32",
            "--num-blocks",
            "128",
            "--max-model-len",
            "2048",
        ])
        .args(["--events", &format!("tcp://127.0.0.1:{}", t.port(41))])
        .args(["--replay", &format!("tcp://127.0.0.1:{}", t.port(42))])
        .args(["--time-scale", "20"]);
    let mut sim = Managed::spawn("sim-fidelity", sim_cmd, &t.logs())?;
    let sim_url = format!("http://127.0.0.1:{sim_port}");
    sim.wait_ready(&format!("{sim_url}/health"), GATEWAY_START)
        .await?;
    fleet
        .capture
        .subscribe(2, &format!("tcp://127.0.0.1:{}", t.port(41)))
        .await?;
    fleet.engines.push((
        EngineAddr {
            url: sim_url,
            events: format!("tcp://127.0.0.1:{}", t.port(41)),
            replay: format!("tcp://127.0.0.1:{}", t.port(42)),
        },
        Some(sim),
    ));
    // Let the new subscription join before the sim publishes anything.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sim_trace = fidelity_trace(http, &mut fleet, 2).await?;
    s.fidelity_run = true;
    s.fidelity = vllm_trace.differences(&sim_trace);
    s.fidelity_vllm = vllm_trace.clone();
    eprintln!(
        "  sim fidelity: vLLM hits {} stored {} removed {}; sim hits {} stored {} removed {}",
        vllm_trace.total_hits(),
        vllm_trace.stored_blocks,
        vllm_trace.removed_blocks,
        sim_trace.total_hits(),
        sim_trace.stored_blocks,
        sim_trace.removed_blocks
    );
    drop(proxy);
    Ok(())
}

/// Per prompt, the leading blocks the gateway's index says engine `e` holds.
async fn explain_all(
    http: &reqwest::Client,
    gateway: &str,
    fleet: &Fleet,
    prompts: &[Vec<u32>],
    e: usize,
) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for p in prompts {
        let body = json!({"model": fleet.served, "prompt": p, "max_tokens": 1});
        out.push(
            explain(http, gateway, Kind::Completion, &body, None)
                .await?
                .leading_held(fleet.block_size, fleet.url(e)),
        );
    }
    Ok(out)
}

const FIDELITY_REQUESTS: usize = 64;

/// The fidelity script (token-id prompts sent one at a time, fixed output
/// length): per-request hits and the blocks stored and removed.
async fn fidelity_trace(http: &reqwest::Client, fleet: &mut Fleet, e: usize) -> Result<CacheTrace> {
    // 8 shared 8-block prefixes and 2 unique blocks per request: ~180 cached
    // blocks through 127, so eviction order shows in the hits and removals.
    let shared = token_prompts(11, 8, 8, 32, 0);
    let mut rng = StdRng::seed_from_u64(12);
    let mut trace = CacheTrace::default();
    fleet.capture.settle(EVENTS_QUIET, EVENTS_MAX).await;
    let mark = fleet.capture.mark();
    for i in 0..FIDELITY_REQUESTS {
        let mut prompt = shared[i % shared.len()].clone();
        // Tails of 60 or 71 tokens: the last prompt block fills up with
        // generated tokens in some requests and not in others.
        let tail = if i % 3 == 0 { 60 } else { 71 };
        prompt.extend((0..tail).map(|_| rng.random_range(1000..100_000u32)));
        let body = json!({"model": fleet.served, "prompt": prompt, "max_tokens": 8, "ignore_eos": true, "temperature": 0});
        trace
            .hits_per_request
            .push(direct_hits(http, fleet, e, &body, "/v1/completions").await?);
    }
    // Counted from the engine's own replay buffer (everything since it
    // started), so a late subscription cannot skew the comparison.
    fleet.capture.settle(EVENTS_QUIET, EVENTS_MAX).await;
    let replayed = replay_all(&fleet.engines[e].0.replay, EVENTS_MAX).await?;
    let live: Vec<_> = fleet
        .capture
        .since(mark)
        .into_iter()
        .filter(|b| b.engine == e)
        .collect();
    let (stored, removed) = block_counts(&replayed);
    if block_counts(&live) != (stored, removed) {
        eprintln!(
            "  note: the tier's live subscription saw {:?} (stored, removed) blocks (it rejoins late after a restart), the replay buffer {:?}",
            block_counts(&live),
            (stored, removed)
        );
    }
    trace.stored_blocks = stored;
    trace.removed_blocks = removed;
    fleet.advance();
    Ok(trace)
}
