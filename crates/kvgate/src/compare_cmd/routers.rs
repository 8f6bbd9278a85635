//! Routers under test: a kvgate gateway's config, starting a router in front
//! of workers, and the ladder's stages run through it (in simulated time).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use kvgate_bench::peers::{free_port, LaunchContext, RouterKind, RouterProcess, RouterSpec};
use kvgate_bench::report::{scrape_fleet, StageReport};
use kvgate_bench::workload::{self, RequestSpec};
use kvgate_bench::{run_stage, summarize, StageOptions, StageSummary};
use kvgate_gateway::{EndpointConfig, GatewayConfig};
use kvgate_router::Policy;
use kvgate_sim::fleet::{RunningSim, DEFAULT_MODEL};

use super::{progress, CompareArgs, SETTLE};

pub(super) struct Stage {
    pub(super) rate: f64,
    pub(super) specs: Vec<RequestSpec>,
}

/// Arrival offsets in wall seconds for `rate` requests per simulated second.
pub(super) fn timed(
    specs: Vec<RequestSpec>,
    rate: f64,
    time_scale: f64,
    seed: u64,
) -> Vec<RequestSpec> {
    workload::timed(specs, rate * time_scale, seed)
}

/// Client-side wall-clock numbers in simulated time.
fn to_sim_time(mut s: StageSummary, time_scale: f64) -> StageSummary {
    for ms in [
        &mut s.ttft_p50_ms,
        &mut s.ttft_p90_ms,
        &mut s.ttft_p99_ms,
        &mut s.itl_p50_ms,
        &mut s.itl_p90_ms,
        &mut s.e2e_p50_ms,
        &mut s.duration_s,
    ] {
        *ms *= time_scale;
    }
    s.request_rate /= time_scale;
    s.output_tok_s /= time_scale;
    s
}

pub(super) async fn reset_caches(fleet: &[RunningSim]) {
    for sim in fleet {
        sim.engine.reset_prefix_cache().await;
    }
}

/// A gateway config for `policy` in front of `endpoints`, written to `dir`
/// (for `envoy-epp`, the picker's: ext_proc on `epp_port`).
fn gateway_config(
    spec: &RouterSpec,
    listen: u16,
    epp_port: u16,
    endpoints: Vec<EndpointConfig>,
    dir: &std::path::Path,
) -> Result<PathBuf> {
    let policy: Policy = serde_yaml::from_str(&spec.policy)
        .with_context(|| format!("unknown kvgate policy {:?}", spec.policy))?;
    let mut cfg = GatewayConfig {
        listen: format!("127.0.0.1:{listen}"),
        endpoints: endpoints
            .into_iter()
            .map(|mut e| {
                // The approximate policy is for fleets without events.
                if policy == Policy::ApproxPrefix {
                    e.events = None;
                    e.replay = None;
                }
                e
            })
            .collect(),
        metrics_interval_ms: 200,
        epp_listen: format!("127.0.0.1:{epp_port}"),
        ..GatewayConfig::default()
    };
    cfg.router.policy = policy;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!(
        "gateway-{}-{listen}.yaml",
        spec.name().replace(' ', "-")
    ));
    std::fs::write(&path, serde_yaml::to_string(&cfg)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// Starts `spec` in front of `workers` and waits until a request goes through.
pub(super) async fn start_router(
    args: &CompareArgs,
    spec: &RouterSpec,
    workers: &[String],
    gateway_endpoints: Vec<EndpointConfig>,
    model: &str,
    scratch: &std::path::Path,
    client: &reqwest::Client,
) -> Result<RouterProcess> {
    let port = free_port()?;
    let epp_port = free_port()?;
    let kvgate_config = match spec.kind {
        RouterKind::Kvgate => Some(gateway_config(
            spec,
            port,
            epp_port,
            gateway_endpoints,
            scratch,
        )?),
        // The picker's HTTP side (metrics, probes) on a port of its own.
        RouterKind::EnvoyEpp => Some(gateway_config(
            spec,
            free_port()?,
            epp_port,
            gateway_endpoints,
            scratch,
        )?),
        _ => None,
    };
    let ctx = LaunchContext {
        port,
        aux_port: free_port()?,
        epp_port,
        workers: workers.to_vec(),
        peers_bin: args.peers_bin.clone(),
        kvgate_exe: std::env::current_exe()?,
        kvgate_config,
        scratch: scratch.to_path_buf(),
    };
    let mut p = RouterProcess::spawn(spec, &ctx)?;
    p.wait_ready(client, model, Duration::from_secs(args.ready_timeout_s))
        .await?;
    tokio::time::sleep(SETTLE).await;
    Ok(p)
}

pub(super) async fn run_stages(
    args: &CompareArgs,
    client: &reqwest::Client,
    fleet: &[RunningSim],
    base: &str,
    label: &str,
    stages: &[Stage],
    fresh_caches: bool,
) -> Vec<StageReport> {
    let engines: Vec<String> = fleet.iter().map(RunningSim::url).collect();
    let mut out = Vec::new();
    for st in stages {
        if fresh_caches {
            reset_caches(fleet).await;
            tokio::time::sleep(SETTLE).await;
        }
        let name = format!("{label} @ {} QPS", st.rate);
        let before = scrape_fleet(client, &engines).await;
        let opts = StageOptions {
            name: name.clone(),
            concurrency: None,
            timeout: Duration::from_secs(args.timeout_s),
            progress: true,
        };
        let (outcomes, secs) = run_stage(client, base, DEFAULT_MODEL, &st.specs, &opts).await;
        let after = scrape_fleet(client, &engines).await;
        let summary = to_sim_time(summarize(&name, &outcomes, secs), args.time_scale);
        if let Some(e) = &summary.first_error {
            progress(&format!("  {name}: {} errors, first: {e}", summary.errors));
        }
        out.push(StageReport {
            offered_rate: Some(st.rate),
            summary,
            fleet_hit_rate: after.rate_since(before),
        });
    }
    out
}
