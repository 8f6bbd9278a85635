//! `kvgate demo`: the KV block index end to end, on an embedded default.
//!
//! Starts the index service and a fleet of synthetic engines that publish KV
//! events over real ZMQ in vLLM 0.32's format (one engine loses live events and
//! must be replayed), sends a shared-prefix workload through them, then asks the
//! index over HTTP where each prefix is cached and checks the answers against
//! what the engines really hold. (The full gateway demo with simulated vLLM
//! engines replaces this once the gateway and simulator exist.)

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kvgate_indexer::api::LocalityResponse;
use kvgate_indexer::EventSource;
use kvgate_sim::publisher::{EventPublisher, DEFAULT_REPLAY_BUFFER};
use kvgate_wire::vllm::{BlockRemoved, BlockStored, EventBatch, KvEvent};
use serde::Serialize;

use crate::config::IndexServiceConfig;
use crate::service::IndexService;

const MODEL: &str = "demo-model";

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Simulated engines in the fleet.
    #[arg(long, default_value_t = 4)]
    engines: usize,
    /// Distinct shared prefixes (system prompts).
    #[arg(long, default_value_t = 8)]
    prefixes: usize,
    /// Requests sent through the fleet.
    #[arg(long, default_value_t = 96)]
    requests: usize,
    /// Tokens per shared prefix.
    #[arg(long, default_value_t = 2048)]
    prefix_tokens: usize,
    /// Engine block size.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One synthetic engine: an LRU cache of blocks, by content hash.
struct Engine {
    name: String,
    publisher: EventPublisher,
    /// block hash -> last use (a logical clock)
    cached: HashMap<u64, u64>,
    capacity_blocks: usize,
    clock: u64,
    requests: usize,
}

#[derive(Serialize)]
struct DemoReport {
    engines: usize,
    requests: usize,
    prefixes: usize,
    prefix_tokens: usize,
    engine_capacity_tokens: usize,
    oracle_hit_rate: f64,
    phases: Vec<PhaseReport>,
}

#[derive(Serialize)]
struct PhaseReport {
    policy: &'static str,
    hit_rate: f64,
    requests_per_engine: Vec<usize>,
    events_published: i64,
    live_batches_dropped: u64,
    seq_gaps: u64,
    replays_ok: u64,
    /// Share of locality answers equal to the engines' real cache contents.
    index_agreement: f64,
    locality_query_p50_us: f64,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn tokens(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| (self.next() % 150_000) as u32).collect()
    }
}

/// The engine's own block hash (its value is opaque to the index, as vLLM's is).
fn engine_hash(parent: u64, block: &[u32]) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&parent.to_le_bytes());
    for t in block {
        h.update(&t.to_le_bytes());
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.finalize().as_bytes()[..8]);
    u64::from_le_bytes(b)
}

impl Engine {
    /// "Runs" a prompt: reuses its cached leading blocks, caches the rest,
    /// evicts least recently used blocks past capacity, and publishes what
    /// changed. Returns the prompt tokens that hit the cache.
    async fn serve(&mut self, prompt: &[u32], block_size: usize) -> Result<usize> {
        self.requests += 1;
        self.clock += 1;
        let hit_blocks = self.cached_prefix_blocks(prompt, block_size);
        let mut parent: Option<u64> = None;
        let mut new_hashes = Vec::new();
        let mut new_parent = None;
        for (i, block) in prompt.chunks_exact(block_size).enumerate() {
            let h = engine_hash(parent.unwrap_or(0), block);
            if i >= hit_blocks {
                if new_hashes.is_empty() {
                    new_parent = parent;
                }
                new_hashes.push(h);
            }
            self.cached.insert(h, self.clock);
            parent = Some(h);
        }
        let mut events = Vec::new();
        let n = new_hashes.len();
        if n > 0 {
            events.push(KvEvent::BlockStored(BlockStored {
                block_hashes: new_hashes,
                parent_block_hash: new_parent,
                token_ids: prompt[hit_blocks * block_size..(hit_blocks + n) * block_size].to_vec(),
                block_size: block_size as u32,
                lora_id: None,
                medium: Some("GPU".into()),
                lora_name: None,
                extra_keys: Some(vec![None; n]),
                group_idx: 0,
                kv_cache_spec_kind: Some("full_attention".into()),
            }));
        }
        if self.cached.len() > self.capacity_blocks {
            let mut by_age: Vec<(u64, u64)> = self.cached.iter().map(|(h, t)| (*t, *h)).collect();
            by_age.sort_unstable();
            let excess = self.cached.len() - self.capacity_blocks;
            let evicted: Vec<u64> = by_age.iter().take(excess).map(|(_, h)| *h).collect();
            for h in &evicted {
                self.cached.remove(h);
            }
            events.push(KvEvent::BlockRemoved(BlockRemoved {
                block_hashes: evicted,
                medium: Some("GPU".into()),
                group_idx: 0,
            }));
        }
        if !events.is_empty() {
            let batch = EventBatch {
                ts: 0.0,
                events,
                data_parallel_rank: Some(0),
            };
            self.publisher.publish(&batch).await?;
        }
        Ok(hit_blocks * block_size)
    }

    /// Leading blocks of `prompt` this engine caches.
    fn cached_prefix_blocks(&self, prompt: &[u32], block_size: usize) -> usize {
        let mut parent = 0;
        let mut n = 0;
        for block in prompt.chunks_exact(block_size) {
            let h = engine_hash(parent, block);
            if !self.cached.contains_key(&h) {
                break;
            }
            n += 1;
            parent = h;
        }
        n
    }
}

fn progress(msg: &str) {
    eprintln!("[demo] {msg}");
}

#[derive(Clone, Copy, PartialEq)]
enum Policy {
    RoundRobin,
    IndexGuided,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round_robin",
            Policy::IndexGuided => "index_guided",
        }
    }
}

pub async fn run(args: DemoArgs) -> Result<()> {
    if args.engines == 0 || args.prefixes == 0 || args.block_size == 0 || args.requests == 0 {
        bail!("--engines, --prefixes, --requests and --block-size must be > 0");
    }
    let started = Instant::now();
    // Each engine fits about two prefixes plus suffixes: a router that spreads a
    // prefix over every engine thrashes; one that keeps it in place does not.
    let capacity_blocks = (2 * args.prefix_tokens + 4 * SUFFIX_TOKENS) / args.block_size;
    let mut rng = Rng(0x005e_ed0f_cafe);
    let prefixes: Vec<Vec<u32>> = (0..args.prefixes)
        .map(|_| rng.tokens(args.prefix_tokens))
        .collect();
    let workload: Vec<Vec<u32>> = (0..args.requests)
        .map(|_| {
            let mut p = prefixes[(rng.next() as usize) % prefixes.len()].clone();
            p.extend(rng.tokens(SUFFIX_TOKENS));
            p
        })
        .collect();
    let distinct = {
        let mut seen: Vec<&[u32]> = workload.iter().map(|w| &w[..args.prefix_tokens]).collect();
        seen.sort_unstable();
        seen.dedup();
        seen.len()
    };
    let prompt_tokens: usize = workload.iter().map(Vec::len).sum();
    let oracle = ((args.requests - distinct)
        * (args.prefix_tokens / args.block_size * args.block_size)) as f64
        / prompt_tokens as f64;
    let mut phases = Vec::new();
    for policy in [Policy::RoundRobin, Policy::IndexGuided] {
        phases.push(run_phase(&args, policy, capacity_blocks, &workload, &mut rng).await?);
    }
    let report = DemoReport {
        engines: args.engines,
        requests: args.requests,
        prefixes: args.prefixes,
        prefix_tokens: args.prefix_tokens,
        engine_capacity_tokens: capacity_blocks * args.block_size,
        oracle_hit_rate: oracle,
        phases,
    };
    print_report(&report, started.elapsed());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        progress(&format!("wrote {}", path.display()));
    }
    if let Some(p) = report.phases.iter().find(|p| p.index_agreement < 1.0) {
        bail!(
            "{}: the index disagreed with the engines' caches on some prefixes",
            p.policy
        );
    }
    Ok(())
}

const SUFFIX_TOKENS: usize = 256;

async fn run_phase(
    args: &DemoArgs,
    policy: Policy,
    capacity_blocks: usize,
    workload: &[Vec<u32>],
    rng: &mut Rng,
) -> Result<PhaseReport> {
    progress(&format!(
        "{}: starting the index service and {} engines",
        policy.name(),
        args.engines
    ));
    let cfg = IndexServiceConfig {
        listen: "127.0.0.1:0".into(),
        key_secret: Some("kvgate-demo".into()),
        ..Default::default()
    };
    let mut service = IndexService::start(&cfg).await?;
    let mut engines = Vec::new();
    for i in 0..args.engines {
        let publisher = EventPublisher::bind(
            "tcp://127.0.0.1:0",
            Some("tcp://127.0.0.1:0"),
            "kv",
            DEFAULT_REPLAY_BUFFER,
        )
        .await
        .context("binding an engine's event sockets")?;
        let name = format!("engine-{i}");
        service.ingest.add(EventSource {
            name: name.clone(),
            model: MODEL.into(),
            block_size: args.block_size as u32,
            events: publisher.pub_endpoint.clone(),
            replay: publisher.replay_endpoint.clone(),
            topic: "kv".into(),
            bind: false,
        })?;
        engines.push(Engine {
            name,
            publisher,
            cached: HashMap::new(),
            capacity_blocks,
            clock: 0,
            requests: 0,
        });
    }
    wait_connected(&service, &engines).await?;
    progress(&format!(
        "{}: sending {} requests",
        policy.name(),
        workload.len()
    ));
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/locality", service.addr);
    let mut latencies = Vec::new();
    let mut hit_tokens = 0usize;
    let dropped = 2u64;
    for (r, prompt) in workload.iter().enumerate() {
        if r == workload.len() / 2 {
            // One engine loses two live batches: the index must replay them.
            engines[1 % engines.len()].publisher.drop_next(dropped);
        }
        let e = match policy {
            Policy::RoundRobin => r % engines.len(),
            Policy::IndexGuided => {
                // Events travel asynchronously, as in production; give them a
                // moment but never block on them (a lost batch shows up only
                // when the next one arrives).
                let _ = wait_caught_up(&service, &engines, Duration::from_millis(50)).await;
                let (resp, us) = locality(&client, &url, prompt).await?;
                latencies.push(us);
                pick(&resp, &engines)
            }
        };
        hit_tokens += engines[e].serve(prompt, args.block_size).await?;
    }
    // One more batch per engine, so a trailing dropped batch shows up as a gap.
    for e in &engines {
        e.publisher
            .publish(&EventBatch {
                ts: 0.0,
                events: vec![],
                data_parallel_rank: Some(0),
            })
            .await?;
    }
    wait_caught_up(&service, &engines, Duration::from_secs(20)).await?;

    progress(&format!(
        "{}: checking the index against the engines' caches",
        policy.name()
    ));
    let mut agree = 0;
    let checks: Vec<&Vec<u32>> = workload
        .iter()
        .step_by((workload.len() / 16).max(1))
        .collect();
    for prompt in &checks {
        let mut probe = (*prompt).clone();
        probe.extend(rng.tokens(100));
        let (resp, us) = locality(&client, &url, &probe).await?;
        latencies.push(us);
        let ok = engines.iter().all(|e| {
            let truth = e.cached_prefix_blocks(&probe, args.block_size) * args.block_size;
            resp.endpoints
                .iter()
                .find(|x| x.endpoint == e.name)
                .map_or(truth == 0, |x| x.matched_tokens == truth)
        });
        agree += usize::from(ok);
    }
    latencies.sort_by(f64::total_cmp);
    let m = &service.metrics;
    let sum = |f: &dyn Fn(&str) -> u64| engines.iter().map(|e| f(&e.name)).sum::<u64>();
    Ok(PhaseReport {
        policy: policy.name(),
        hit_rate: hit_tokens as f64 / workload.iter().map(Vec::len).sum::<usize>() as f64,
        requests_per_engine: engines.iter().map(|e| e.requests).collect(),
        events_published: engines.iter().map(|e| e.publisher.next_seq()).sum(),
        live_batches_dropped: dropped,
        seq_gaps: sum(&|n| m.seq_gaps.get_or_create(&ep_label(n)).get()),
        replays_ok: sum(&|n| {
            m.replays
                .get_or_create(&kvgate_indexer::metrics::OutcomeLabels {
                    endpoint: n.into(),
                    outcome: "ok".into(),
                })
                .get()
        }),
        index_agreement: agree as f64 / checks.len().max(1) as f64,
        locality_query_p50_us: latencies.get(latencies.len() / 2).copied().unwrap_or(0.0),
    })
}

async fn locality(
    client: &reqwest::Client,
    url: &str,
    tokens: &[u32],
) -> Result<(LocalityResponse, f64)> {
    let t = Instant::now();
    let resp: LocalityResponse = client
        .post(url)
        .json(&serde_json::json!({"model": MODEL, "tokens": tokens}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok((resp, t.elapsed().as_secs_f64() * 1e6))
}

/// The engine with the longest cached prefix; among equals, the least used.
fn pick(resp: &LocalityResponse, engines: &[Engine]) -> usize {
    let matched = |e: &Engine| {
        resp.endpoints
            .iter()
            .find(|x| x.endpoint == e.name)
            .map_or(0, |x| x.matched_tokens)
    };
    let best = engines.iter().map(matched).max().unwrap_or(0);
    (0..engines.len())
        .filter(|i| matched(&engines[*i]) == best)
        .min_by_key(|i| engines[*i].requests)
        .unwrap_or(0)
}

fn ep_label(name: &str) -> kvgate_indexer::metrics::EndpointLabels {
    kvgate_indexer::metrics::EndpointLabels {
        endpoint: name.to_string(),
    }
}

/// ZMQ subscriptions take a moment to propagate: probe until each engine's
/// first batch has reached the index.
async fn wait_connected(service: &IndexService, engines: &[Engine]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let eps = service.index.endpoints();
        let ready = engines
            .iter()
            .all(|e| eps.iter().any(|x| x.name == e.name && x.last_seq.is_some()));
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("engines' event streams did not connect within 15 s");
        }
        for e in engines {
            e.publisher
                .publish(&EventBatch {
                    ts: 0.0,
                    events: vec![],
                    data_parallel_rank: Some(0),
                })
                .await?;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_caught_up(service: &IndexService, engines: &[Engine], limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    let want: Arc<HashMap<String, i64>> = Arc::new(
        engines
            .iter()
            .map(|e| (e.name.clone(), e.publisher.next_seq() - 1))
            .collect(),
    );
    loop {
        let eps = service.index.endpoints();
        if eps
            .iter()
            .all(|e| want.get(&e.name).is_none_or(|w| e.last_seq == Some(*w)))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the index did not catch up with the engines within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn print_report(r: &DemoReport, took: Duration) {
    println!();
    println!(
        "kvgate demo: {} engines (cache {} tokens each), {} requests over {} shared prefixes of {} tokens",
        r.engines, r.engine_capacity_tokens, r.requests, r.prefixes, r.prefix_tokens
    );
    println!();
    println!(
        "  {:<14} {:>9} {:>12} {:>22} {:>8} {:>6} {:>8} {:>10} {:>14}",
        "policy",
        "hit_rate",
        "vs oracle",
        "requests per engine",
        "batches",
        "gaps",
        "replays",
        "index ok",
        "query p50 us"
    );
    for p in &r.phases {
        let per = p
            .requests_per_engine
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join("/");
        println!(
            "  {:<14} {:>8.1}% {:>11.0}% {:>22} {:>8} {:>6} {:>8} {:>9.0}% {:>14.0}",
            p.policy,
            p.hit_rate * 100.0,
            if r.oracle_hit_rate > 0.0 {
                p.hit_rate / r.oracle_hit_rate * 100.0
            } else {
                0.0
            },
            per,
            p.events_published,
            p.seq_gaps,
            p.replays_ok,
            p.index_agreement * 100.0,
            p.locality_query_p50_us
        );
    }
    println!();
    println!(
        "  oracle hit rate {:.1}%. Each phase drops {} live event batches on one engine; the index replays them.",
        r.oracle_hit_rate * 100.0,
        r.phases.first().map_or(0, |p| p.live_batches_dropped)
    );
    println!(
        "  'index ok': locality answers equal to the engines' real cache contents. Took {:.1} s.",
        took.as_secs_f64()
    );
}
