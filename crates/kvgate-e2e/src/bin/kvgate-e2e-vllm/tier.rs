//! The tier's processes: vLLM instances and gateways started and awaited,
//! and a phase's fleet of engines with the tier's own event capture.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use kvgate_e2e::capture::EventCapture;
use kvgate_e2e::checks::ChainTracker;
use kvgate_e2e::procs::Managed;
use kvgate_e2e::{cache_counters, post_json, EngineAddr};
use kvgate_gateway::config::GatewayConfig;
use kvgate_gateway::EndpointConfig;
use kvgate_router::{Policy, RouterConfig};
use kvgate_wire::vllm::KvEvent;
use serde_json::{json, Value};

use crate::Args;

/// Timeouts of the tier.
pub(crate) const ENGINE_START: Duration = Duration::from_secs(420);
pub(crate) const GATEWAY_START: Duration = Duration::from_secs(30);
pub(crate) const EVENTS_QUIET: Duration = Duration::from_millis(200);
pub(crate) const EVENTS_MAX: Duration = Duration::from_secs(5);
/// How long the gateway's index may take to reflect events the tier has seen.
pub(crate) const INDEX_CATCH_UP: Duration = Duration::from_secs(5);

/// How one phase's vLLM instances run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct VllmSpec {
    model: &'static str,
    block_size: u32,
    max_model_len: usize,
    /// `--num-gpu-blocks-override`: a small cache, so that blocks get evicted.
    gpu_blocks: Option<usize>,
}

pub(crate) const QWEN: VllmSpec = VllmSpec {
    model: "qwen",
    block_size: 64,
    max_model_len: 8192,
    gpu_blocks: None,
};
pub(crate) const LLAMA3: VllmSpec = VllmSpec {
    model: "llama3",
    block_size: 32,
    max_model_len: 2048,
    gpu_blocks: Some(128),
};

/// One vLLM instance's command line: model, tokenizer, cache shape.
pub(crate) struct EngineSpec<'a> {
    pub(crate) model_dir: PathBuf,
    /// `--tokenizer` (the model dir's own tokenizer when None).
    pub(crate) tokenizer_dir: Option<PathBuf>,
    pub(crate) served: &'a str,
    pub(crate) block_size: u32,
    pub(crate) max_model_len: usize,
    pub(crate) gpu_blocks: Option<usize>,
    pub(crate) tool_parser: &'a str,
}

/// Engines of one phase, with the tier's own event capture.
pub(crate) struct Fleet {
    pub(crate) engines: Vec<(EngineAddr, Option<Managed>)>,
    pub(crate) served: String,
    pub(crate) block_size: u32,
    pub(crate) capture: EventCapture,
    chains: Vec<ChainTracker>,
    placed_upto: usize,
}

pub(crate) struct Tier {
    pub(crate) args: Args,
    pub(crate) http: reqwest::Client,
}

impl Tier {
    pub(crate) fn port(&self, offset: u16) -> u16 {
        self.args.base_port + offset
    }

    pub(crate) fn logs(&self) -> PathBuf {
        self.args.work.join("logs")
    }

    /// Starts a vLLM-CPU instance (not waiting for it) on `ports` (HTTP,
    /// events, replay), its threads bound to core `cpu`.
    pub(crate) fn spawn_vllm(
        &self,
        name: &str,
        spec: &VllmSpec,
        ports: (u16, u16, u16),
        cpu: usize,
    ) -> Result<Managed> {
        let engine = EngineSpec {
            model_dir: self.args.models.join(spec.model),
            tokenizer_dir: None,
            served: spec.model,
            block_size: spec.block_size,
            max_model_len: spec.max_model_len,
            gpu_blocks: spec.gpu_blocks,
            // Requests that declare tools need a parser configured (it does
            // not change how prompts render).
            tool_parser: if spec.model.starts_with("llama") {
                "llama3_json"
            } else {
                "hermes"
            },
        };
        self.spawn_engine(name, &engine, ports, cpu)
    }

    /// Starts vLLM's GPU-less rendering server (`vllm launch render`: the
    /// same chat/completion preprocessing as `vllm serve`, no engine) for
    /// `spec`'s model and tokenizer on `port`; it answers the render endpoints.
    pub(crate) fn spawn_renderer(
        &self,
        name: &str,
        spec: &EngineSpec<'_>,
        port: u16,
    ) -> Result<Managed> {
        let mut cmd = Command::new(self.args.venv.join("bin/vllm"));
        cmd.args(["launch", "render"]).arg(&spec.model_dir);
        if let Some(dir) = &spec.tokenizer_dir {
            cmd.arg("--tokenizer").arg(dir);
        }
        cmd.args(["--served-model-name", spec.served, "--host", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .args(["--max-model-len", &spec.max_model_len.to_string()])
            .args([
                "--enable-auto-tool-choice",
                "--tool-call-parser",
                spec.tool_parser,
            ])
            .env("HF_HUB_OFFLINE", "1")
            .env("TRANSFORMERS_OFFLINE", "1")
            .env("VLLM_NO_USAGE_STATS", "1")
            .env("DO_NOT_TRACK", "1")
            .env("PYTHONHASHSEED", "0");
        Managed::spawn(name, cmd, &self.logs())
    }

    /// Starts vLLM for `spec` (not waiting for it); see [`Tier::spawn_vllm`].
    pub(crate) fn spawn_engine(
        &self,
        name: &str,
        spec: &EngineSpec<'_>,
        ports: (u16, u16, u16),
        cpu: usize,
    ) -> Result<Managed> {
        let (http, events, replay) = ports;
        let mut cmd = Command::new(self.args.venv.join("bin/python"));
        cmd.args(["-m", "vllm.entrypoints.openai.api_server", "--model"])
            .arg(&spec.model_dir);
        if let Some(dir) = &spec.tokenizer_dir {
            cmd.arg("--tokenizer").arg(dir);
        }
        cmd.args(["--served-model-name", spec.served, "--host", "127.0.0.1"])
            .args(["--port", &http.to_string()])
            .args(["--block-size", &spec.block_size.to_string()])
            .args(["--max-model-len", &spec.max_model_len.to_string()])
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
        cmd.args([
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            spec.tool_parser,
        ]);
        if let Some(n) = spec.gpu_blocks {
            cmd.args(["--num-gpu-blocks-override", &n.to_string()]);
        }
        Managed::spawn(name, cmd, &self.logs())
    }

    pub(crate) async fn start_fleet(&self, spec: &VllmSpec, first_port: u16) -> Result<Fleet> {
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
    pub(crate) async fn start_gateway(
        &self,
        name: &str,
        cfg: &GatewayConfig,
    ) -> Result<(Managed, String)> {
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

    pub(crate) fn gateway_config(
        &self,
        fleet: &Fleet,
        listen_offset: u16,
        policy: Policy,
        engines: &[usize],
        events_override: Option<(usize, String)>,
        contracts: kvgate_auth::AuthConfig,
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
            contracts,
            health_interval_ms: 500,
            ..GatewayConfig::default()
        }
    }
}

impl Fleet {
    /// A fleet of already started engines, `capture` subscribed to them.
    pub(crate) fn new(
        engines: Vec<(EngineAddr, Option<Managed>)>,
        served: String,
        block_size: u32,
        capture: EventCapture,
    ) -> Self {
        let chains = engines.iter().map(|_| ChainTracker::default()).collect();
        Fleet {
            engines,
            served,
            block_size,
            capture,
            chains,
            placed_upto: 0,
        }
    }

    pub(crate) fn url(&self, i: usize) -> &str {
        &self.engines[i].0.url
    }

    /// Places every batch captured so far in its engine's chains; returns the
    /// blocks stored since the last call, with their engine.
    pub(crate) fn advance(&mut self) -> Vec<(usize, kvgate_e2e::checks::PlacedBlock)> {
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

    pub(crate) fn body(&self, item_body: &Value, max_tokens: u32) -> Value {
        let mut body = item_body.clone();
        body["model"] = json!(self.served);
        body["max_tokens"] = json!(max_tokens);
        body["temperature"] = json!(0);
        body
    }

    /// Empties both engines' prefix caches and waits for the index to hear it
    /// (vLLM announces AllBlocksCleared at its next step, so each is poked).
    pub(crate) async fn reset(&mut self, http: &reqwest::Client) -> Result<()> {
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
    pub(crate) async fn counters(&self, http: &reqwest::Client) -> Result<(f64, f64)> {
        let mut total = (0.0, 0.0);
        for (addr, _) in &self.engines {
            let (h, q) = cache_counters(http, &addr.url).await?;
            total.0 += h;
            total.1 += q;
        }
        Ok(total)
    }
}
