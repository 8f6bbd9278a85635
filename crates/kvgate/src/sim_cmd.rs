//! `kvgate sim`: one or several simulated vLLM engines in this process.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::config::{with_host, with_port};
use kvgate_sim::fleet::{RunningSim, SimConfig};

#[derive(clap::Args, Debug, Default)]
pub struct SimArgs {
    /// YAML config (keys as `kvgate_sim::SimConfig`); flags override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// HTTP host (env KVGATE_SIM_HOST).
    #[arg(long)]
    host: Option<String>,
    /// HTTP port (env KVGATE_SIM_PORT); replica i listens on port + i.
    #[arg(long)]
    port: Option<u16>,
    /// Served model name.
    #[arg(long)]
    model: Option<String>,
    /// Directory with tokenizer.json (+ tokenizer_config.json); default: embedded Qwen2.5.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long)]
    block_size: Option<usize>,
    /// KV blocks (as vLLM's --num-gpu-blocks-override; block 0 is reserved).
    #[arg(long)]
    num_blocks: Option<usize>,
    #[arg(long)]
    max_num_seqs: Option<usize>,
    #[arg(long)]
    max_num_batched_tokens: Option<usize>,
    #[arg(long)]
    max_model_len: Option<usize>,
    /// KV events PUB endpoint, e.g. tcp://*:5557 (replica i: port + 2i).
    #[arg(long)]
    events: Option<String>,
    /// Replay ROUTER endpoint, e.g. tcp://*:5558 (replica i: port + 2i).
    #[arg(long)]
    replay: Option<String>,
    #[arg(long)]
    topic: Option<String>,
    /// Simulated seconds per wall second (env KVGATE_SIM_TIME_SCALE).
    #[arg(long)]
    time_scale: Option<f64>,
    /// Engines to start in this process.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
}

impl SimArgs {
    /// The YAML file, then env (`KVGATE_SIM_HOST`, `KVGATE_SIM_PORT`,
    /// `KVGATE_SIM_TIME_SCALE`), then these flags; validated.
    pub fn load(&self, env: impl Fn(&str) -> Option<String>) -> Result<SimConfig> {
        crate::config::load(self.config.as_deref(), env, |cfg: &mut SimConfig| {
            if let Some(h) = &self.host {
                cfg.listen = with_host(&cfg.listen, h);
            }
            if let Some(p) = self.port {
                cfg.listen = with_port(&cfg.listen, p);
            }
            if let Some(m) = &self.model {
                cfg.model = m.clone();
            }
            if self.tokenizer.is_some() {
                cfg.tokenizer = self.tokenizer.clone();
            }
            let e = &mut cfg.engine;
            e.block_size = self.block_size.unwrap_or(e.block_size);
            e.num_blocks = self.num_blocks.unwrap_or(e.num_blocks);
            e.max_num_seqs = self.max_num_seqs.unwrap_or(e.max_num_seqs);
            e.max_num_batched_tokens = self
                .max_num_batched_tokens
                .unwrap_or(e.max_num_batched_tokens);
            e.time_scale = self.time_scale.unwrap_or(e.time_scale);
            cfg.max_model_len = self.max_model_len.unwrap_or(cfg.max_model_len);
            if self.events.is_some() {
                cfg.events = self.events.clone();
            }
            if self.replay.is_some() {
                cfg.replay = self.replay.clone();
            }
            if let Some(t) = &self.topic {
                cfg.topic = t.clone();
            }
            Ok(())
        })
    }
}

/// `tcp://host:port` with the port moved by `by`.
fn shift_port(endpoint: &str, by: usize) -> Result<String> {
    let (head, port) = endpoint
        .rsplit_once(':')
        .with_context(|| format!("endpoint {endpoint:?} has no port"))?;
    let port: usize = port
        .parse()
        .with_context(|| format!("endpoint {endpoint:?} has a bad port"))?;
    if port == 0 {
        return Ok(endpoint.to_string());
    }
    Ok(format!("{head}:{}", port + by))
}

pub async fn run(args: SimArgs) -> Result<()> {
    let base = args.load(|k| std::env::var(k).ok())?;
    let mut sims = Vec::new();
    for i in 0..args.replicas.max(1) {
        let mut cfg = base.clone();
        cfg.listen = shift_port(&base.listen, i)?;
        cfg.events = base
            .events
            .as_deref()
            .map(|e| shift_port(e, 2 * i))
            .transpose()?;
        cfg.replay = base
            .replay
            .as_deref()
            .map(|e| shift_port(e, 2 * i))
            .transpose()?;
        let sim = RunningSim::start(cfg).await?;
        tracing::info!(
            url = %sim.url(),
            events = ?sim.config.events,
            replay = ?sim.config.replay,
            model = %sim.config.model,
            "simulated engine serving"
        );
        println!(
            "{} events={} replay={}",
            sim.url(),
            sim.config.events.as_deref().unwrap_or("-"),
            sim.config.replay.as_deref().unwrap_or("-")
        );
        sims.push(sim);
    }
    tokio::signal::ctrl_c().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_yaml_and_ports_shift_per_replica() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sim.yaml");
        std::fs::write(
            &p,
            "model: m\nlisten: 0.0.0.0:9000\nengine:\n  block_size: 32\n  num_blocks: 128\n",
        )
        .unwrap();
        let args = SimArgs {
            config: Some(p),
            port: Some(9100),
            num_blocks: Some(64),
            ..Default::default()
        };
        let cfg = args.load(|_| None).unwrap();
        assert_eq!(cfg.model, "m");
        assert_eq!(cfg.listen, "0.0.0.0:9100");
        assert_eq!(cfg.engine.block_size, 32);
        assert_eq!(cfg.engine.num_blocks, 64);
        assert_eq!(shift_port("tcp://*:5557", 4).unwrap(), "tcp://*:5561");
        assert!(shift_port("tcp://*", 1).is_err());
        let bad = SimArgs {
            time_scale: Some(0.0),
            ..Default::default()
        };
        assert!(bad.load(|_| None).is_err());
        let env = |k: &str| (k == "KVGATE_SIM_PORT").then(|| "9200".to_string());
        let cfg = SimArgs::default().load(env).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:9200", "env applies after the file");
        std::fs::write(dir.path().join("bad.yaml"), "engine:\n  nonsense: 1\n").unwrap();
        let bad = SimArgs {
            config: Some(dir.path().join("bad.yaml")),
            ..Default::default()
        };
        assert!(bad.load(|_| None).is_err(), "unknown keys are errors");
    }
}
