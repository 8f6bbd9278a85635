//! `kvgate`: one binary, one subcommand per role.

mod audit_cmd;
mod bench_cmd;
mod compare_cmd;
mod config;
mod demo;
mod reload;
mod sentinel_cmd;
mod serve;
mod service;
mod sim_cmd;
mod store_bench_cmd;
mod sweep_cmd;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::config::{endpoint_flags, IndexServiceConfig};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "kvgate",
    version,
    about = "KV-cache-aware gateway and KV block index for vLLM fleets"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax); env KVGATE_LOG.
    #[arg(long, env = "KVGATE_LOG", default_value = "info", global = true)]
    log: String,
    /// Human-readable logs instead of JSON.
    #[arg(long, global = true)]
    pretty_logs: bool,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the global KV block index as a service: subscribe to engines' KV
    /// events and answer locality queries over HTTP (and gRPC, with --grpc-listen).
    Index {
        /// YAML config file (see docs/config.md); env and flags override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// HTTP listen address (env KVGATE_LISTEN).
        #[arg(long)]
        listen: Option<String>,
        /// gRPC locality API listen address (env KVGATE_GRPC_LISTEN); unset: off.
        #[arg(long)]
        grpc_listen: Option<String>,
        /// Bound on tracked (block, endpoint, tier) entries (env KVGATE_MAX_TRACKED_BLOCKS).
        #[arg(long)]
        max_tracked_blocks: Option<usize>,
        /// An engine to subscribe to, repeatable (the --endpoint form; events required):
        /// url=http://H:P,model=M,block_size=16,events=tcp://H:P[,replay=tcp://H:P][,topic=kv][,bind=true]
        #[arg(long = "source")]
        sources: Vec<String>,
    },
    /// Run the OpenAI-compatible KV-cache-aware gateway in front of vLLM endpoints.
    Gateway {
        /// YAML config file; env (KVGATE_*) and flags override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Listen address (env KVGATE_LISTEN).
        #[arg(long)]
        listen: Option<String>,
        /// Routing policy (env KVGATE_POLICY).
        #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(kvgate_router::policy_names()))]
        policy: Option<String>,
        /// An endpoint, repeatable:
        /// url=http://H:P,model=M,block_size=16[,events=tcp://H:P][,replay=tcp://H:P][,adapter=A][,topic=T][,bind=true]
        #[arg(long = "endpoint")]
        endpoints: Vec<String>,
    },
    /// The endpoint picker of an Envoy gateway (Gateway API Inference
    /// Extension, ext_proc on gRPC): the gateway's config, fleet and
    /// routing; Envoy proxies, kvgate picks.
    Epp {
        /// YAML config file (the gateway's); env (KVGATE_*) and flags override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The ext_proc listen address (env KVGATE_EPP_LISTEN; default 0.0.0.0:9002).
        #[arg(long)]
        grpc_listen: Option<String>,
        /// The HTTP listener: metrics, probes, admin API (env KVGATE_LISTEN).
        #[arg(long)]
        listen: Option<String>,
        /// An endpoint, repeatable (as for `kvgate gateway`).
        #[arg(long = "endpoint")]
        endpoints: Vec<String>,
    },
    /// Run simulated vLLM engines (OpenAI API, KV events, vLLM metrics) without a GPU.
    Sim(sim_cmd::SimArgs),
    /// Load-test an OpenAI endpoint with a published workload; writes a report.
    /// `kvgate bench compare`: kvgate vs the peer routers on a simulated fleet.
    Bench(Box<bench_cmd::BenchCli>),
    /// Run the built-in demo on an embedded default (no arguments needed).
    Demo(demo::DemoArgs),
    /// Audit log tools: `kvgate audit verify FILE...`.
    Audit(audit_cmd::AuditArgs),
    /// The contract sidecar of one pod: the gateway in front of one local
    /// runtime, for one contract (TB_CONTRACT_ID, TB_ASSET_ID,
    /// TB_EDC_ENDPOINT, TB_RUNTIME_URL).
    Sentinel(Box<sentinel_cmd::SentinelArgs>),
    /// The KV chunk store LMCache uses as its remote tier (`remote_url:
    /// lm://HOST:PORT`).
    Store {
        /// YAML config file; env (KVGATE_*) and flags override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The lm:// listen address (env KVGATE_LISTEN; default 0.0.0.0:65432).
        #[arg(long)]
        listen: Option<String>,
    },
}

fn init_logs(filter: &str, pretty: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if pretty {
        builder.init();
    } else {
        builder.json().init();
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Command::Index {
            config,
            listen,
            grpc_listen,
            max_tracked_blocks,
            sources,
        } => {
            init_logs(&cli.log, cli.pretty_logs);
            let cfg: IndexServiceConfig = config::load(
                config.as_deref(),
                |k| std::env::var(k).ok(),
                |c: &mut IndexServiceConfig| {
                    if let Some(v) = listen {
                        c.listen = v;
                    }
                    if let Some(v) = grpc_listen {
                        c.grpc_listen = Some(v);
                    }
                    if let Some(v) = max_tracked_blocks {
                        c.index.max_tracked_blocks = v;
                    }
                    endpoint_flags(&mut c.sources, &sources)
                },
            )?;
            let service = service::IndexService::start(&cfg).await?;
            tracing::info!(addr = %service.addr, grpc_addr = ?service.grpc_addr, sources = cfg.sources.len(), "index listening");
            tokio::signal::ctrl_c().await?;
            tracing::info!("shutting down");
            Ok(())
        }
        Command::Gateway {
            config,
            listen,
            policy,
            endpoints,
        } => {
            init_logs(&cli.log, cli.pretty_logs);
            let path = config.clone();
            let load = move || -> Result<kvgate_gateway::GatewayConfig> {
                config::load(
                    path.as_deref(),
                    |k| std::env::var(k).ok(),
                    |c: &mut kvgate_gateway::GatewayConfig| {
                        if let Some(v) = &listen {
                            c.listen = v.clone();
                        }
                        if let Some(v) = &policy {
                            c.router.policy = config::parse_policy(v)?;
                        }
                        endpoint_flags(&mut c.endpoints, &endpoints)
                    },
                )
            };
            let cfg = load()?;
            let reload = config.map(|path| reload::ConfigReload {
                path,
                load: Box::new(load),
            });
            serve::gateway(cfg, reload).await
        }
        Command::Epp {
            config,
            grpc_listen,
            listen,
            endpoints,
        } => {
            init_logs(&cli.log, cli.pretty_logs);
            let path = config.clone();
            let load = move || -> Result<kvgate_gateway::GatewayConfig> {
                config::load(
                    path.as_deref(),
                    |k| std::env::var(k).ok(),
                    |c: &mut kvgate_gateway::GatewayConfig| {
                        if let Some(v) = &grpc_listen {
                            c.epp_listen = v.clone();
                        }
                        if let Some(v) = &listen {
                            c.listen = v.clone();
                        }
                        endpoint_flags(&mut c.endpoints, &endpoints)
                    },
                )
            };
            let cfg = load()?;
            let reload = config.map(|path| reload::ConfigReload {
                path,
                load: Box::new(load),
            });
            serve::epp(cfg, reload).await
        }
        Command::Sim(args) => {
            init_logs(&cli.log, cli.pretty_logs);
            sim_cmd::run(args).await
        }
        Command::Bench(args) => {
            init_logs(if cli.log == "info" { "warn" } else { &cli.log }, true);
            let args = *args;
            match (args.cmd, args.run) {
                (Some(bench_cmd::BenchCommand::Compare(c)), _) => compare_cmd::run(*c).await,
                (Some(bench_cmd::BenchCommand::Sweep(s)), _) => sweep_cmd::run(s),
                (Some(bench_cmd::BenchCommand::Store(s)), _) => store_bench_cmd::run(s).await,
                (None, Some(run)) => bench_cmd::run(run).await,
                (None, None) => anyhow::bail!(
                    "kvgate bench: give --target and --out, or a subcommand (see --help)"
                ),
            }
        }
        Command::Demo(args) => {
            // The demo prints a report; logs only on request.
            init_logs(if cli.log == "info" { "error" } else { &cli.log }, true);
            demo::run(args).await
        }
        Command::Audit(args) => audit_cmd::run(args),
        Command::Store { config, listen } => {
            init_logs(&cli.log, cli.pretty_logs);
            let cfg: kvgate_store::StoreConfig = config::load(
                config.as_deref(),
                |k| std::env::var(k).ok(),
                |c: &mut kvgate_store::StoreConfig| {
                    if let Some(l) = listen {
                        c.listen = l;
                    }
                    Ok(())
                },
            )?;
            let listener = tokio::net::TcpListener::bind(&cfg.listen).await?;
            tracing::info!(addr = %listener.local_addr()?, memory_bytes = cfg.memory_bytes, "store listening (lm://)");
            let scopes = kvgate_store::Scopes::new(&cfg.contracts, cfg.unscoped)?;
            // The store's own chain: never the gateway's file.
            let audit = kvgate_auth::audit::AuditLog::start(&cfg.contracts.audit)?;
            let disk = match (&cfg.disk, scopes.contracts()) {
                (Some(d), Some(registry)) => Some(kvgate_store::disk::DiskTier::open(
                    &d.dir,
                    d.max_bytes,
                    registry,
                )?),
                _ => None,
            };
            let extras = kvgate_store::Extras {
                quotas: cfg.quotas(),
                disk,
                write: cfg.disk.as_ref().map(|d| d.write).unwrap_or_default(),
                redis: match (&cfg.redis, scopes.contracts()) {
                    (Some(r), Some(registry)) => {
                        Some(kvgate_store::redis_tier::RedisTier::open(r, registry)?)
                    }
                    _ => None,
                },
                limits: cfg.limits(),
            };
            let store = kvgate_store::Store::with(
                cfg.memory_bytes,
                cfg.max_chunk_bytes,
                scopes,
                audit,
                extras,
            );
            let admin = tokio::net::TcpListener::bind(&cfg.admin_listen).await?;
            tracing::info!(addr = %admin.local_addr()?, "store admin listening");
            let app = kvgate_store::admin::router(store.clone(), cfg.admin_token()?, &cfg.service);
            for bound in &cfg.contract_listeners {
                let l = tokio::net::TcpListener::bind(&bound.listen).await?;
                tracing::info!(addr = %l.local_addr()?, contract = %bound.contract, "store listening (lm://, one contract)");
                tokio::spawn(kvgate_store::serve_scoped(
                    l,
                    store.clone(),
                    Some(bound.contract.clone()),
                ));
            }
            tokio::select! {
                () = kvgate_store::serve(listener, store) => Ok(()),
                r = axum::serve(admin, app) => Ok(r?),
                r = tokio::signal::ctrl_c() => Ok(r?),
            }
        }
        Command::Sentinel(args) => {
            init_logs(&cli.log, cli.pretty_logs);
            let reload = sentinel_cmd::reload(&args);
            serve::gateway(sentinel_cmd::config(*args)?, reload).await
        }
    }
}
