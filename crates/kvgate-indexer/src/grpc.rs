//! The locality API over gRPC (`proto/kvgate/index/v1/index.proto`, package
//! `kvgate.index.v1`), for schedulers that speak gRPC: `Locality` (the whole
//! answer) and `Scorer` (one pod's score, the pods holding a prefix).
//!
//! Both services run over the HTTP API's [`ApiState`] and answer with the
//! same [`query_locality`]; this module only maps messages. Errors carry the
//! HTTP API's message text, with HTTP's status as a gRPC code ([`status`]).

use std::future::Future;

use axum::http::StatusCode;
use kvgate_openai::OpenAiError;
use serde_json::Value;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use crate::api::{
    query_locality, ApiState, EndpointScore, LocalityResponse, Prompt, MAX_BODY_BYTES,
};

/// The code generated from the proto (in OUT_DIR).
pub mod pb {
    tonic::include_proto!("kvgate.index.v1");
}

/// A query's Debug never shows its cache salt (a secret), only whether one was sent.
impl std::fmt::Debug for pb::LocalityQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalityQuery")
            .field("model_id", &self.model_id)
            .field("prompt", &self.prompt.as_ref().map(prompt_kind))
            .field(
                "cache_salt",
                &self.cache_salt.as_ref().map(|_| "<redacted>"),
            )
            .field("lora", &self.lora)
            .finish_non_exhaustive()
    }
}

use pb::locality_query::Prompt as PbPrompt;

/// What kind of prompt a query carries, and how long it is.
fn prompt_kind(p: &PbPrompt) -> String {
    match p {
        PbPrompt::Tokens(t) => format!("{} token ids", t.ids.len()),
        PbPrompt::Text(t) => format!("text of {} bytes", t.len()),
        PbPrompt::MessagesJson(m) => format!("messages of {} bytes", m.len()),
    }
}
use pb::locality_server::{Locality, LocalityServer};
use pb::scorer_server::{Scorer, ScorerServer};
use pb::{
    CandidatesReply, CandidatesRequest, LocalityQuery, LocalityResult, PodLocality, ScoreReply,
    ScoreRequest, ScoredPod, TierBlocks,
};

/// Both services over one [`ApiState`].
#[derive(Clone)]
pub struct IndexGrpc {
    state: ApiState,
}

impl IndexGrpc {
    pub fn new(state: ApiState) -> Self {
        Self { state }
    }

    /// `kvgate.index.v1.Locality`, taking messages up to HTTP's body limit.
    pub fn locality_service(&self) -> LocalityServer<Self> {
        LocalityServer::new(self.clone()).max_decoding_message_size(MAX_BODY_BYTES)
    }

    /// `kvgate.index.v1.Scorer`, taking messages up to HTTP's body limit.
    pub fn scorer_service(&self) -> ScorerServer<Self> {
        ScorerServer::new(self.clone()).max_decoding_message_size(MAX_BODY_BYTES)
    }

    /// The HTTP API's answer to `q`.
    fn run(&self, q: LocalityQuery) -> Result<LocalityResponse, Status> {
        let prompt = prompt(&q).map_err(|e| status(&e))?;
        query_locality(
            &self.state,
            &q.model_id,
            prompt,
            q.cache_salt.as_deref(),
            q.lora.as_deref(),
        )
        .map_err(|e| status(&e))
    }
}

/// HTTP's error as a gRPC status: the same message, HTTP's status as a code.
pub fn status(e: &OpenAiError) -> Status {
    let message = e.message().to_string();
    match e.status() {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => {
            Status::invalid_argument(message)
        }
        StatusCode::NOT_FOUND => Status::not_found(message),
        StatusCode::PAYLOAD_TOO_LARGE => Status::out_of_range(message),
        StatusCode::UNAUTHORIZED => Status::unauthenticated(message),
        StatusCode::FORBIDDEN => Status::permission_denied(message),
        StatusCode::SERVICE_UNAVAILABLE => Status::unavailable(message),
        _ => Status::internal(message),
    }
}

/// The query's prompt as the HTTP API's: exactly one of tokens, text or a
/// chat body (`messages_json` and the chat fields, as a chat completion's).
fn prompt(q: &LocalityQuery) -> Result<Prompt, OpenAiError> {
    if q.model_id.is_empty() {
        return Err(OpenAiError::bad_request(
            "missing 'model_id'",
            Some("model"),
        ));
    }
    let (tokens, text, chat) = match &q.prompt {
        Some(PbPrompt::Tokens(t)) => (Some(t.ids.clone()), None, None),
        Some(PbPrompt::Text(t)) => (None, Some(t.clone()), None),
        Some(PbPrompt::MessagesJson(m)) => (None, None, Some(chat_body(m, q)?)),
        None => (None, None, None),
    };
    Prompt::one_of(tokens, text, chat)
}

/// The chat completion body `POST /v1/locality` would get.
fn chat_body(messages: &str, q: &LocalityQuery) -> Result<Value, OpenAiError> {
    let mut body = serde_json::Map::new();
    body.insert(
        "messages".into(),
        json_field(messages, "messages_json", "messages")?,
    );
    if let Some(tools) = &q.tools_json {
        body.insert("tools".into(), json_field(tools, "tools_json", "tools")?);
    }
    if let Some(b) = q.add_generation_prompt {
        body.insert("add_generation_prompt".into(), Value::Bool(b));
    }
    if let Some(b) = q.continue_final_message {
        body.insert("continue_final_message".into(), Value::Bool(b));
    }
    if let Some(kwargs) = &q.chat_template_kwargs_json {
        body.insert(
            "chat_template_kwargs".into(),
            json_field(kwargs, "chat_template_kwargs_json", "chat_template_kwargs")?,
        );
    }
    Ok(Value::Object(body))
}

fn json_field(raw: &str, name: &str, param: &'static str) -> Result<Value, OpenAiError> {
    serde_json::from_str(raw).map_err(|e| {
        OpenAiError::bad_request(format!("'{name}' is not valid JSON: {e}"), Some(param))
    })
}

/// The HTTP answer as the gRPC one.
pub fn locality_result(resp: &LocalityResponse) -> LocalityResult {
    let pods: Vec<PodLocality> = resp.endpoints.iter().map(pod_locality).collect();
    LocalityResult {
        cache_hits: pods.first().map_or(0, |p| p.block_count),
        coverage: resp.coverage,
        prompt_tokens: resp.prompt_tokens as u64,
        pods,
    }
}

fn pod_locality(e: &EndpointScore) -> PodLocality {
    PodLocality {
        pod_id: e.endpoint.clone(),
        block_count: e.matched_blocks,
        match_length: e.matched_tokens as u64,
        score: e.score,
        tier: e.tier.clone().unwrap_or_default(),
        block_size: e.block_size,
        stale: e.stale,
        tiers: e
            .tiers
            .iter()
            .map(|(tier, blocks)| TierBlocks {
                tier: tier.clone(),
                blocks: *blocks,
            })
            .collect(),
    }
}

fn missing(field: &str) -> Status {
    Status::invalid_argument(format!("missing '{field}'"))
}

#[tonic::async_trait]
impl Locality for IndexGrpc {
    async fn locality(
        &self,
        request: Request<LocalityQuery>,
    ) -> Result<Response<LocalityResult>, Status> {
        let resp = self.run(request.into_inner())?;
        Ok(Response::new(locality_result(&resp)))
    }
}

#[tonic::async_trait]
impl Scorer for IndexGrpc {
    async fn score(&self, request: Request<ScoreRequest>) -> Result<Response<ScoreReply>, Status> {
        let ScoreRequest { prefix, pod_id } = request.into_inner();
        let prefix = prefix.ok_or_else(|| missing("prefix"))?;
        if pod_id.is_empty() {
            return Err(missing("pod_id"));
        }
        let model = prefix.model_id.clone();
        let resp = self.run(prefix)?;
        let pod = resp
            .endpoints
            .iter()
            .find(|e| e.endpoint == pod_id)
            .ok_or_else(|| {
                Status::not_found(format!("no pod {pod_id:?} serves model {model:?}"))
            })?;
        Ok(Response::new(ScoreReply {
            score: pod.score,
            match_length: pod.matched_tokens as u64,
            block_count: pod.matched_blocks,
        }))
    }

    async fn get_candidates(
        &self,
        request: Request<CandidatesRequest>,
    ) -> Result<Response<CandidatesReply>, Status> {
        let CandidatesRequest { prefix, limit } = request.into_inner();
        let resp = self.run(prefix.ok_or_else(|| missing("prefix"))?)?;
        let limit = match limit {
            None | Some(0) => usize::MAX,
            Some(n) => n as usize,
        };
        // Already best first: the HTTP order.
        let pods = resp
            .endpoints
            .iter()
            .filter(|e| e.matched_blocks > 0)
            .take(limit)
            .map(|e| ScoredPod {
                pod_id: e.endpoint.clone(),
                score: e.score,
                match_length: e.matched_tokens as u64,
            })
            .collect();
        Ok(Response::new(CandidatesReply { pods }))
    }
}

/// Serves `Locality`, `Scorer` and gRPC health (`grpc.health.v1.Health`:
/// SERVING for both services and the server) on `listener` until `shutdown`
/// resolves. Plaintext (h2c).
pub async fn serve(
    state: ApiState,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<LocalityServer<IndexGrpc>>().await;
    health.set_serving::<ScorerServer<IndexGrpc>>().await;
    let grpc = IndexGrpc::new(state);
    // Replies are small: Nagle's algorithm would hold each behind the
    // client's delayed ACK.
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|c| {
            if let Err(e) = c.set_nodelay(true) {
                tracing::debug!(error = %e, "gRPC connection: TCP_NODELAY not set");
            }
        })
    });
    tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(grpc.locality_service())
        .add_service(grpc.scorer_service())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    #[test]
    fn a_query_debug_never_shows_its_salt() {
        let q = super::pb::LocalityQuery {
            model_id: "m".into(),
            cache_salt: Some("s3cret-salt".into()),
            ..Default::default()
        };
        let shown = format!("{q:?}");
        assert!(!shown.contains("s3cret-salt"), "{shown}");
        assert!(
            shown.contains("<redacted>") && shown.contains("\"m\""),
            "{shown}"
        );
    }
}
