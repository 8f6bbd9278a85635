//! `kvgate epp`: the endpoint picker (EPP) of the Gateway API Inference
//! Extension. Envoy's ext_proc filter streams each request through it; it
//! answers with the pod to route to (`x-gateway-destination-endpoint`, and
//! the same under `envoy.lb` in the dynamic metadata) and the body as the
//! engine must get it. The pick is `kvgate gateway`'s routing transaction
//! (`kvgate_gateway::pick`) on the same fleet, index, tokenizers and
//! contracts: one transaction, two fronts.
//!
//! Seams: `wire.rs` (ext_proc messages in and out), `exchange.rs` (one
//! request's steps), this file (the gRPC service and its health).

mod exchange;
pub mod wire;

use std::pin::Pin;
use std::sync::Arc;

use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use futures_util::{Stream, StreamExt};
use kvgate_gateway::Gateway;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

pub use exchange::Exchange;

pub use kvgate_gateway::config::DEFAULT_EPP_LISTEN;
/// The gRPC health service names Envoy and Kubernetes probe.
pub const HEALTH_LIVENESS: &str = "liveness";
pub const HEALTH_READINESS: &str = "readiness";
pub const EXT_PROC_SERVICE: &str = "envoy.service.ext_proc.v3.ExternalProcessor";

/// The ext_proc service over one gateway.
pub struct EndpointPicker {
    gw: Arc<Gateway>,
}

impl EndpointPicker {
    pub fn new(gw: Arc<Gateway>) -> Self {
        Self { gw }
    }

    pub fn into_service(self) -> ExternalProcessorServer<Self> {
        ExternalProcessorServer::new(self)
    }
}

type Replies = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ExternalProcessor for EndpointPicker {
    type ProcessStream = Replies;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        // Replies in order; a few in flight at most (headers, body chunks).
        let (tx, rx) = mpsc::channel::<Result<ProcessingResponse, Status>>(16);
        let mut exchange = Exchange::new(self.gw.clone());
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let msg = match msg {
                    Ok(m) => m,
                    // Envoy went away (reset, timeout): the exchange is
                    // dropped below, which ends the request.
                    Err(status) => {
                        tracing::debug!(%status, "ext_proc stream ended by the client");
                        break;
                    }
                };
                for reply in exchange.on(msg) {
                    if tx.send(Ok(reply)).await.is_err() {
                        return;
                    }
                }
            }
        });
        let stream =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|r| (r, rx)) },
            );
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Serves ext_proc and gRPC health on `listener` until `shutdown` resolves.
/// Readiness is SERVING while some endpoint is available and the gateway
/// is not draining.
pub async fn serve(
    gw: Arc<Gateway>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(HEALTH_LIVENESS, tonic_health::ServingStatus::Serving)
        .await;
    let probe = gw.clone();
    let readiness = tokio::spawn(async move {
        loop {
            let ready = probe.is_ready();
            let status = if ready {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for name in [HEALTH_READINESS, EXT_PROC_SERVICE, ""] {
                health.set_service_status(name, status).await;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    });
    // Replies are small and sent one by one: Nagle's algorithm would hold
    // each behind the peer's delayed ACK (tens of ms a request).
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|c| {
            if let Err(e) = c.set_nodelay(true) {
                tracing::debug!(error = %e, "ext_proc connection: TCP_NODELAY not set");
            }
        })
    });
    let result = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(EndpointPicker::new(gw).into_service())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    readiness.abort();
    result
}
