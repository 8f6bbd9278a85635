//! `kvgate sentinel`: the contract sidecar of one KServe InferenceService
//! pod. It is the gateway with one local runtime and one contract, laid out
//! as our users deploy it: listen on 8000, forward to vLLM on
//! `localhost:8081`, the contract from `TB_CONTRACT_ID`, the asset (the
//! served model) from `TB_ASSET_ID`, contract status from the control plane
//! at `TB_EDC_ENDPOINT`, the runtime at `TB_RUNTIME_URL`, and a per-pod
//! concurrency limit. A config file (`--config`, the gateway's YAML) can
//! add credentials, limits, the audit log; these settings are applied on top.

use std::path::PathBuf;

use anyhow::{Context, Result};
use kvgate_auth::{ContractSpec, ControlPlaneConfig, KeyRef};
use kvgate_fleet::EndpointConfig;
use kvgate_gateway::GatewayConfig;

/// Where the sidecar listens unless `KVGATE_LISTEN`, `--listen` or the file
/// say otherwise (KServe's container port).
pub const SIDECAR_LISTEN: &str = "0.0.0.0:8000";
/// The local runtime (vLLM) when `TB_RUNTIME_URL` is unset.
pub const SIDECAR_RUNTIME_URL: &str = "http://localhost:8081";
/// Requests in flight per pod when neither the file nor `--max-concurrent`
/// set one: a pod of one GPU serving a licensed model.
pub const SIDECAR_MAX_CONCURRENT: u32 = 8;
/// vLLM's default block size (the sidecar does not index: one runtime).
const RUNTIME_BLOCK_SIZE: u32 = 16;
/// The contract's key material when no `--key-file` is given (a Kubernetes
/// Secret mapped to an env var).
pub const SIDECAR_KEY_ENV: &str = "TB_CONTRACT_KEY";

#[derive(clap::Args, Clone)]
pub struct SentinelArgs {
    /// The gateway's YAML config (optional); env (KVGATE_*) and flags override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The contract this pod serves.
    #[arg(long, env = "TB_CONTRACT_ID")]
    contract: String,
    /// The licensed asset: the model name the runtime serves, unless --model.
    #[arg(long, env = "TB_ASSET_ID")]
    asset: Option<String>,
    /// The model name the runtime serves (default: the asset id).
    #[arg(long, env = "KVGATE_MODEL")]
    model: Option<String>,
    /// The control plane polled for the contract's status.
    #[arg(long, env = "TB_EDC_ENDPOINT")]
    control_plane: Option<String>,
    /// The local runtime.
    #[arg(long, env = "TB_RUNTIME_URL", default_value = SIDECAR_RUNTIME_URL)]
    runtime: String,
    /// Listen address (env KVGATE_LISTEN; default 0.0.0.0:8000).
    #[arg(long)]
    listen: Option<String>,
    /// Requests in flight per pod (more get 429).
    #[arg(long, env = "KVGATE_MAX_CONCURRENT")]
    max_concurrent: Option<u32>,
    /// A file with the contract's key material (default: env TB_CONTRACT_KEY).
    #[arg(long, env = "KVGATE_CONTRACT_KEY_FILE")]
    key_file: Option<PathBuf>,
}

/// The config file, if any, and how to load it again (reload on change).
pub fn reload(args: &SentinelArgs) -> Option<crate::reload::ConfigReload> {
    let path = args.config.clone()?;
    let args = args.clone();
    Some(crate::reload::ConfigReload {
        path,
        load: Box::new(move || config(args.clone())),
    })
}

/// The gateway config of the sidecar layout.
pub fn config(mut args: SentinelArgs) -> Result<GatewayConfig> {
    let listen_from_env = std::env::var("KVGATE_LISTEN").is_ok();
    let file = args.config.take();
    let from_file = file.is_some();
    crate::config::load(
        file.as_deref(),
        |k| std::env::var(k).ok(),
        |c: &mut GatewayConfig| apply(c, args, listen_from_env || from_file),
    )
}

fn apply(c: &mut GatewayConfig, args: SentinelArgs, listen_set: bool) -> Result<()> {
    match args.listen {
        Some(l) => c.listen = l,
        None if !listen_set => c.listen = SIDECAR_LISTEN.into(),
        None => {}
    }
    let model = args
        .model
        .or(args.asset.clone())
        .context("the served model: set TB_ASSET_ID or --model")?;
    c.endpoints = vec![EndpointConfig::new(
        args.runtime,
        &model,
        RUNTIME_BLOCK_SIZE,
    )];
    // One runtime: nothing to choose, so nothing to tokenize for.
    c.router.policy = kvgate_router::Policy::RoundRobin;
    let auth = &mut c.contracts;
    auth.pod_contract = Some(args.contract.clone());
    if !auth.contracts.iter().any(|s| s.id == args.contract) {
        let mut spec = ContractSpec::active(&args.contract);
        spec.key = Some(match args.key_file {
            Some(p) => KeyRef::File(p),
            None => KeyRef::Env(SIDECAR_KEY_ENV.into()),
        });
        auth.contracts.push(spec);
    }
    if let Some(spec) = auth.contracts.iter_mut().find(|s| s.id == args.contract) {
        if let Some(n) = args.max_concurrent {
            spec.limits.max_concurrent = Some(n);
        }
        spec.limits
            .max_concurrent
            .get_or_insert(SIDECAR_MAX_CONCURRENT);
    }
    if let Some(url) = args.control_plane {
        let poll_ms = auth
            .control_plane
            .as_ref()
            .map_or(kvgate_auth::config::DEFAULT_CONTROL_PLANE_POLL_MS, |cp| {
                cp.poll_ms
            });
        auth.control_plane = Some(ControlPlaneConfig {
            url,
            poll_ms,
            token_file: auth
                .control_plane
                .as_ref()
                .and_then(|cp| cp.token_file.clone()),
        });
    }
    if let Some(asset) = args.asset {
        tracing::info!(contract = %args.contract, asset = %asset, "sentinel serving one contract");
    }
    Ok(())
}
