//! Serving the gateway and the endpoint picker until SIGTERM or Ctrl-C, then
//! draining: not-ready at once (`/ready` 503, gRPC readiness NOT_SERVING),
//! no new connections, in-flight requests (streams included) given
//! `drain_grace_ms` to finish, then the audit chain's checkpoint and exit 0.
//! A drain that outlasts the grace exits anyway (logged): Kubernetes would
//! SIGKILL soon after.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use kvgate_gateway::{Gateway, GatewayConfig, StaticDiscovery};
use tokio::sync::watch;

use crate::reload;

/// Serves a gateway; with a config file, its changes are applied while
/// serving (`reload.rs`).
pub async fn gateway(cfg: GatewayConfig, reload: Option<reload::ConfigReload>) -> Result<()> {
    let listener = kvgate_tls::bind(&cfg.listen, cfg.tls.as_ref()).await?;
    let gw = start(cfg, reload).await?;
    tracing::info!(addr = %listener.local_addr(), tls = listener.certs().is_some(), "gateway listening");
    let stop = Stop::new();
    let http = tokio::spawn(serve_http(gw.clone(), listener, stop.rx()));
    drain(&gw, stop, vec![Box::pin(async move { http.await? })]).await
}

/// Serves the endpoint picker (ext_proc on `epp_listen`) and the gateway's
/// HTTP side (metrics, probes, admin) on `listen`; config changes as for the
/// gateway.
pub async fn epp(cfg: GatewayConfig, reload: Option<reload::ConfigReload>) -> Result<()> {
    let grpc = tokio::net::TcpListener::bind(&cfg.epp_listen).await?;
    let http = kvgate_tls::bind(&cfg.listen, cfg.tls.as_ref()).await?;
    let gw = start(cfg, reload).await?;
    tracing::info!(grpc = %grpc.local_addr()?, http = %http.local_addr(), "endpoint picker listening");
    let stop = Stop::new();
    let http = tokio::spawn(serve_http(gw.clone(), http, stop.rx()));
    let mut grpc_stop = stop.rx();
    let grpc = tokio::spawn(kvgate_epp::serve(gw.clone(), grpc, async move {
        let _ = grpc_stop.changed().await;
    }));
    drain(
        &gw,
        stop,
        vec![
            Box::pin(async move { http.await? }),
            Box::pin(async move { Ok(grpc.await??) }),
        ],
    )
    .await
}

/// The gateway over the config's endpoints, following the config file's
/// changes when there is one.
async fn start(cfg: GatewayConfig, reload: Option<reload::ConfigReload>) -> Result<Arc<Gateway>> {
    let discovery: Arc<dyn kvgate_gateway::Discovery> = match (&cfg.dns, &cfg.kubernetes) {
        (Some(dns), _) => Arc::new(
            kvgate_fleet::DnsDiscovery::start(dns.clone(), kvgate_fleet::dns::system_resolver())
                .await?,
        ),
        // In-cluster (the pod's service account), else the kubeconfig.
        (None, Some(k8s)) => Arc::new(
            kvgate_k8s::K8sDiscovery::start(k8s.clone(), kube::Client::try_default().await?)
                .await?,
        ),
        (None, None) => Arc::new(StaticDiscovery::new(cfg.endpoints.clone())?),
    };
    let gw = Gateway::start(cfg.clone(), discovery).await?;
    if let Some(reload) = reload {
        gw.add_source(Box::new(reload::ConfigFile {
            running: cfg,
            reload,
        }));
    }
    Ok(gw)
}

/// The signal every listener stops on.
struct Stop(watch::Sender<bool>);

impl Stop {
    fn new() -> Self {
        Self(watch::channel(false).0)
    }

    fn rx(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }
}

type Served = std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send>>;

async fn serve_http(
    gw: Arc<Gateway>,
    listener: kvgate_tls::Listener,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    // Connect info carries the client certificate to the contract layer.
    let app = gw
        .router()
        .into_make_service_with_connect_info::<kvgate_tls::Peer>();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        })
        .await?;
    Ok(())
}

/// Waits for SIGTERM or Ctrl-C, then drains (module docs).
async fn drain(gw: &Gateway, stop: Stop, served: Vec<Served>) -> Result<()> {
    shutdown_signal().await;
    let grace = Duration::from_millis(gw.config().drain_grace_ms);
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        "draining: not ready, no new connections"
    );
    gw.start_drain();
    let _ = stop.0.send(true);
    match tokio::time::timeout(grace, futures_util::future::try_join_all(served)).await {
        Ok(r) => {
            r?;
            tracing::info!("drained");
        }
        Err(_) => tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "drain grace over with requests in flight; exiting"
        ),
    }
    // Writes what is queued and the checkpoint of the audit chain.
    gw.sentinel().audit().shutdown().await?;
    Ok(())
}

/// Ctrl-C or SIGTERM (what Kubernetes sends).
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
