#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! `kvgate epp` at the gRPC level, one ext_proc stream per request, as
//! Envoy drives it: each case of the EPP protocol's list (split bodies,
//! invalid JSON, missing model, subset partial and empty, header-only,
//! multi-chunk and empty-final-chunk responses, SSE), contracts applied to
//! the forwarded body, and the load released when a stream ends early.

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    body_mutation::Mutation, HttpBody, HttpHeaders, ProcessingRequest, ProcessingResponse,
};
use envoy_types::pb::google::protobuf::{value::Kind, ListValue, Struct, Value};
use kvgate_epp::wire::{DESTINATION_HEADER, LB_NAMESPACE, SUBSET_KEY, SUBSET_NAMESPACE};
use kvgate_gateway::{EndpointConfig, Gateway, GatewayConfig, StaticDiscovery};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// An engine that only answers health checks and metrics (the picker never
/// forwards anything itself).
async fn engine() -> String {
    let app = axum::Router::new()
        .route("/health", axum::routing::get(|| async { "" }))
        .route(
            "/metrics",
            axum::routing::get(|| async { "vllm:num_requests_waiting{engine=\"0\"} 0\n" }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    addr.to_string()
}

struct Picker {
    gw: Arc<Gateway>,
    url: String,
    client: ExternalProcessorClient<tonic::transport::Channel>,
    engines: Vec<String>,
}

async fn picker(n: usize, contracts: kvgate_auth::AuthConfig) -> Picker {
    let mut engines = Vec::new();
    for _ in 0..n {
        engines.push(engine().await);
    }
    let cfg = GatewayConfig {
        endpoints: engines
            .iter()
            .map(|a| EndpointConfig {
                url: format!("http://{a}"),
                models: vec!["m".into()],
                adapters: vec![],
                block_size: 16,
                events: None,
                replay: None,
                topic: String::new(),
                bind: false,
            })
            .collect(),
        contracts,
        ..Default::default()
    };
    let discovery = Arc::new(StaticDiscovery::new(cfg.endpoints.clone()).unwrap());
    let gw = Gateway::start(cfg, discovery).await.unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(kvgate_epp::serve(gw.clone(), l, std::future::pending()));
    let url = format!("http://{addr}");
    let client = ExternalProcessorClient::connect(url.clone()).await.unwrap();
    Picker {
        gw,
        url,
        client,
        engines,
    }
}

fn headers(pairs: &[(&str, &str)], end_of_stream: bool) -> ProcessingRequest {
    ProcessingRequest {
        request: Some(Request::RequestHeaders(HttpHeaders {
            headers: Some(HeaderMap {
                headers: pairs
                    .iter()
                    .map(|(k, v)| HeaderValue {
                        key: k.to_string(),
                        raw_value: v.as_bytes().to_vec(),
                        ..Default::default()
                    })
                    .collect(),
            }),
            end_of_stream,
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn post(path: &str) -> ProcessingRequest {
    headers(
        &[
            (":method", "POST"),
            (":path", path),
            ("content-type", "application/json"),
        ],
        false,
    )
}

fn with_subset(mut msg: ProcessingRequest, subset: &[&str]) -> ProcessingRequest {
    let list = Value {
        kind: Some(Kind::ListValue(ListValue {
            values: subset
                .iter()
                .map(|s| Value {
                    kind: Some(Kind::StringValue(s.to_string())),
                })
                .collect(),
        })),
    };
    msg.metadata_context = Some(Metadata {
        filter_metadata: [(
            SUBSET_NAMESPACE.to_string(),
            Struct {
                fields: [(SUBSET_KEY.to_string(), list)].into(),
            },
        )]
        .into(),
        ..Default::default()
    });
    msg
}

fn body(bytes: &[u8], end_of_stream: bool, request: bool) -> ProcessingRequest {
    let b = HttpBody {
        body: bytes.to_vec(),
        end_of_stream,
        ..Default::default()
    };
    ProcessingRequest {
        request: Some(if request {
            Request::RequestBody(b)
        } else {
            Request::ResponseBody(b)
        }),
        ..Default::default()
    }
}

/// One ext_proc stream: messages in, replies out.
struct Stream {
    tx: mpsc::Sender<ProcessingRequest>,
    rx: Streaming<ProcessingResponse>,
}

impl Stream {
    async fn open(p: &Picker) -> Self {
        let (tx, rx) = mpsc::channel(64);
        let replies = p
            .client
            .clone()
            .process(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self { tx, rx: replies }
    }

    async fn send(&self, msg: ProcessingRequest) {
        self.tx.send(msg).await.unwrap();
    }

    async fn reply(&mut self) -> ProcessingResponse {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("a reply within 5 s")
            .unwrap()
            .expect("the stream is open")
    }

    /// No reply within 300 ms (the picker is waiting for more).
    async fn silent(&mut self) {
        let r = tokio::time::timeout(Duration::from_millis(300), self.rx.message()).await;
        assert!(r.is_err(), "unexpected reply: {r:?}");
    }
}

/// The destination a request-headers reply names: the header's primary,
/// checked to lead the `envoy.lb` metadata's list, with the route cache cleared.
fn destination(r: &ProcessingResponse) -> String {
    let (primary, list) = destinations(r);
    assert_eq!(list[0], primary);
    primary
}

/// (the header's primary, the metadata's `primary[,fallback...]` list).
fn destinations(r: &ProcessingResponse) -> (String, Vec<String>) {
    let Some(Response::RequestHeaders(h)) = &r.response else {
        panic!("not a request-headers reply: {r:?}");
    };
    let common = h.response.as_ref().unwrap();
    assert!(common.clear_route_cache);
    let set = &common.header_mutation.as_ref().unwrap().set_headers;
    let header = set
        .iter()
        .map(|o| o.header.as_ref().unwrap())
        .find(|h| h.key == DESTINATION_HEADER)
        .expect("the destination header is set");
    let dest = String::from_utf8(header.raw_value.clone()).unwrap();
    let md = r.dynamic_metadata.as_ref().unwrap();
    let Some(Kind::StructValue(lb)) = &md.fields[LB_NAMESPACE].kind else {
        panic!("no envoy.lb struct");
    };
    let Some(Kind::StringValue(v)) = &lb.fields[DESTINATION_HEADER].kind else {
        panic!("no destination in envoy.lb");
    };
    assert!(!dest.contains(','), "the header names one address: {dest}");
    (dest, v.split(',').map(String::from).collect())
}

fn removed_headers(r: &ProcessingResponse) -> Vec<String> {
    let Some(Response::RequestHeaders(h)) = &r.response else {
        panic!("not a request-headers reply");
    };
    h.response
        .as_ref()
        .unwrap()
        .header_mutation
        .as_ref()
        .unwrap()
        .remove_headers
        .clone()
}

/// (bytes, end_of_stream) of a streamed body reply.
fn streamed(r: &ProcessingResponse, request: bool) -> (Vec<u8>, bool) {
    let common = match (&r.response, request) {
        (Some(Response::RequestBody(b)), true) | (Some(Response::ResponseBody(b)), false) => {
            b.response.as_ref().unwrap()
        }
        _ => panic!(
            "not a {} body reply: {r:?}",
            if request { "request" } else { "response" }
        ),
    };
    match &common.body_mutation.as_ref().unwrap().mutation {
        Some(Mutation::StreamedResponse(s)) => (s.body.clone(), s.end_of_stream),
        m => panic!("not a streamed body: {m:?}"),
    }
}

/// Reads body replies until `end_of_stream`: the whole forwarded body.
async fn forwarded_body(s: &mut Stream) -> serde_json::Value {
    let mut all = Vec::new();
    loop {
        let (b, end) = streamed(&s.reply().await, true);
        all.extend(b);
        if end {
            return serde_json::from_slice(&all).unwrap();
        }
    }
}

/// (status, error JSON) of an immediate response.
fn immediate(r: &ProcessingResponse) -> (i32, serde_json::Value) {
    let Some(Response::ImmediateResponse(i)) = &r.response else {
        panic!("not an immediate response: {r:?}");
    };
    (
        i.status.as_ref().unwrap().code,
        serde_json::from_slice(&i.body).unwrap(),
    )
}

async fn wait_ready(p: &Picker) {
    for _ in 0..100 {
        if p.gw.fleet().snapshot().iter().all(|e| e.is_available()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("endpoints never became available");
}

const CHAT: &str = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hello there, a prompt long enough to route"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_split_across_chunks_is_collected_then_answered_headers_then_body() {
    let p = picker(2, Default::default()).await;
    wait_ready(&p).await;
    let mut s = Stream::open(&p).await;
    s.send(post("/v1/chat/completions")).await;
    let (a, b) = CHAT.as_bytes().split_at(17);
    s.send(body(a, false, true)).await;
    s.silent().await;
    s.send(body(b, true, true)).await;
    let (primary, named) = destinations(&s.reply().await);
    assert_eq!(
        named.len(),
        2,
        "the primary, then the other engine as fallback: {named:?}"
    );
    assert_eq!(named[0], primary);
    assert_ne!(named[0], named[1]);
    for n in &named {
        assert!(p.engines.contains(n), "{n} is one of {:?}", p.engines);
    }
    let sent: serde_json::Value = serde_json::from_str(CHAT).unwrap();
    assert_eq!(
        forwarded_body(&mut s).await,
        sent,
        "the body arrives intact"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_and_a_missing_model_are_400_in_openai_shape() {
    let p = picker(1, Default::default()).await;
    wait_ready(&p).await;
    for (bad, param) in [
        (&b"{\"model\": \"m\", \"messages\": ["[..], None),
        (
            &br#"{"messages":[{"role":"user","content":"x"}]}"#[..],
            Some("model"),
        ),
    ] {
        let mut s = Stream::open(&p).await;
        s.send(post("/v1/chat/completions")).await;
        s.send(body(bad, true, true)).await;
        let (status, err) = immediate(&s.reply().await);
        assert_eq!(status, 400);
        assert_eq!(err["error"]["type"], "BadRequestError");
        assert_eq!(err["error"]["param"].as_str(), param);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subset_hint_limits_the_pick_and_an_empty_match_is_503() {
    let p = picker(3, Default::default()).await;
    wait_ready(&p).await;
    let only = p.engines[2].clone();
    for _ in 0..5 {
        let mut s = Stream::open(&p).await;
        s.send(with_subset(
            post("/v1/chat/completions"),
            &[&only, "10.255.0.1:8000"],
        ))
        .await;
        s.send(body(CHAT.as_bytes(), true, true)).await;
        let (primary, named) = destinations(&s.reply().await);
        assert_eq!(
            (primary, named),
            (only.clone(), vec![only.clone()]),
            "no fallback outside the subset"
        );
    }
    let mut s = Stream::open(&p).await;
    s.send(with_subset(
        post("/v1/chat/completions"),
        &["10.255.0.1:8000"],
    ))
    .await;
    s.send(body(CHAT.as_bytes(), true, true)).await;
    let (status, err) = immediate(&s.reply().await);
    assert_eq!(status, 503, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_only_request_is_answered_in_the_headers_phase() {
    let p = picker(2, Default::default()).await;
    wait_ready(&p).await;
    let mut s = Stream::open(&p).await;
    s.send(headers(
        &[(":method", "GET"), (":path", "/v1/models")],
        true,
    ))
    .await;
    let dest = destination(&s.reply().await);
    assert!(
        p.engines.contains(&dest),
        "one endpoint for a request without a model: {dest}"
    );
    // A path that is not an inference endpoint never reaches an engine.
    let mut s = Stream::open(&p).await;
    s.send(headers(
        &[(":method", "POST"), (":path", "/reset_prefix_cache")],
        true,
    ))
    .await;
    assert_eq!(immediate(&s.reply().await).0, 404);
    let mut s = Stream::open(&p).await;
    s.send(headers(
        &[(":method", "POST"), (":path", "/v1//chat/completions")],
        true,
    ))
    .await;
    assert_eq!(immediate(&s.reply().await).0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_chunks_pass_through_as_they_come_and_the_load_ends_with_them() {
    let p = picker(1, Default::default()).await;
    wait_ready(&p).await;
    let in_flight = || p.gw.fleet().snapshot()[0].load.snapshot().in_flight;
    // SSE, several chunks, then an empty final chunk.
    let mut s = Stream::open(&p).await;
    s.send(post("/v1/chat/completions")).await;
    s.send(body(CHAT.as_bytes(), true, true)).await;
    destination(&s.reply().await);
    forwarded_body(&mut s).await;
    assert_eq!(in_flight(), 1, "the pick holds the endpoint's load");
    let mut resp = headers(
        &[(":status", "200"), ("content-type", "text/event-stream")],
        false,
    );
    if let Some(Request::RequestHeaders(h)) = resp.request.take() {
        resp.request = Some(Request::ResponseHeaders(h));
    }
    s.send(resp).await;
    assert!(matches!(
        s.reply().await.response,
        Some(Response::ResponseHeaders(_))
    ));
    let events = [
        "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n",
        "data: {\"choices\":[{\"delta\":{\"content\":\"b\"}}]}\n\n",
        "data: {\"usage\":{\"completion_tokens\":2}}\n\ndata: [DONE]\n\n",
    ];
    for e in events {
        s.send(body(e.as_bytes(), false, false)).await;
        let (b, end) = streamed(&s.reply().await, false);
        assert_eq!(b, e.as_bytes(), "each SSE chunk as it came");
        assert!(!end);
        assert_eq!(in_flight(), 1);
    }
    s.send(body(b"", true, false)).await;
    let (b, end) = streamed(&s.reply().await, false);
    assert!(b.is_empty() && end, "the empty final chunk ends the stream");
    assert_eq!(in_flight(), 0, "load released at the body's end");

    // A stream Envoy drops mid-response releases the load too.
    let mut s = Stream::open(&p).await;
    s.send(post("/v1/completions")).await;
    s.send(body(br#"{"model":"m","prompt":"abc"}"#, true, true))
        .await;
    destination(&s.reply().await);
    forwarded_body(&mut s).await;
    assert_eq!(in_flight(), 1);
    drop(s);
    for _ in 0..100 {
        if in_flight() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(in_flight(), 0, "load released when the stream is dropped");
}

fn contracts() -> kvgate_auth::AuthConfig {
    let dir = std::env::temp_dir().join(format!("kvgate-epp-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("master.key");
    std::fs::write(&path, "epp test master key material").unwrap();
    kvgate_auth::AuthConfig::for_api_keys(
        &[("key-a", "acme"), ("key-b", "globex")],
        kvgate_auth::KeyRef::File(path),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contracts_apply_no_key_is_401_and_each_contract_gets_its_own_salt_and_tag() {
    let p = picker(1, contracts()).await;
    wait_ready(&p).await;
    let mut s = Stream::open(&p).await;
    s.send(post("/v1/chat/completions")).await;
    s.send(body(CHAT.as_bytes(), true, true)).await;
    let (status, err) = immediate(&s.reply().await);
    assert_eq!(status, 401, "{err}");

    let mut salts = Vec::new();
    for key in ["key-a", "key-b"] {
        let mut s = Stream::open(&p).await;
        let auth = format!("Bearer {key}");
        s.send(headers(
            &[
                (":method", "POST"),
                (":path", "/v1/chat/completions"),
                ("authorization", &auth),
                ("x-data-parallel-rank", "3"),
            ],
            false,
        ))
        .await;
        let mut hostile: serde_json::Value = serde_json::from_str(CHAT).unwrap();
        hostile["cache_salt"] = "stolen".into();
        hostile["kv_transfer_params"] = serde_json::json!({"lmcache.tag.cachesalt": "stolen"});
        s.send(body(&serde_json::to_vec(&hostile).unwrap(), true, true))
            .await;
        let headers_reply = s.reply().await;
        destination(&headers_reply);
        let removed = removed_headers(&headers_reply);
        assert!(
            removed.contains(&"authorization".to_string()),
            "{removed:?}"
        );
        assert!(
            removed.contains(&"x-data-parallel-rank".to_string()),
            "{removed:?}"
        );
        let sent = forwarded_body(&mut s).await;
        let salt = sent["cache_salt"].as_str().unwrap().to_string();
        assert_ne!(salt, "stolen");
        assert_eq!(sent["kv_transfer_params"]["lmcache.tag.cachesalt"], salt);
        assert_eq!(sent["messages"], hostile["messages"]);
        salts.push(salt);
    }
    assert_ne!(salts[0], salts[1], "no two contracts share a salt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_reports_liveness_and_readiness() {
    let p = picker(1, Default::default()).await;
    wait_ready(&p).await;
    let channel = tonic::transport::Endpoint::from_shared(p.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["liveness", "readiness", kvgate_epp::EXT_PROC_SERVICE] {
        let mut status = 0;
        for _ in 0..50 {
            status = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .map(|r| r.into_inner().status)
                .unwrap_or(0);
            if status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service}"
        );
    }
}
