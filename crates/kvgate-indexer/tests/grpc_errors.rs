#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The gRPC locality API's errors: the HTTP API's text for the same bad
//! input (INVALID_ARGUMENT for HTTP's 400), NOT_FOUND for an unknown pod,
//! HTTP's size limit; gRPC health; gRPC queries in the query metrics.

mod grpc_common;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use grpc_common::{fixture, http, post, query, tokens};
use kvgate_indexer::grpc::pb::locality_query::Prompt;
use kvgate_indexer::grpc::pb::{CandidatesRequest, LocalityQuery, ScoreRequest};
use serde_json::json;
use tonic::Code;

#[tokio::test]
async fn bad_input_is_invalid_argument_with_http_text() {
    let mut f = fixture().await;
    let msgs = |m: &str| query("m", Prompt::MessagesJson(m.into()));
    for (body, q) in [
        (
            json!({"model": "m"}),
            LocalityQuery {
                model_id: "m".into(),
                ..Default::default()
            },
        ),
        (
            json!({"model": "nope", "text": "hi"}),
            query("nope", Prompt::Text("hi".into())),
        ),
        (
            json!({"model": "m", "messages": [{"content": "no role"}]}),
            msgs(r#"[{"content": "no role"}]"#),
        ),
        (json!({"model": "m", "messages": {}}), msgs("{}")),
        (
            json!({"model": "m", "messages": [], "tools": {}}),
            LocalityQuery {
                tools_json: Some("{}".into()),
                ..msgs("[]")
            },
        ),
        (
            json!({"model": "m", "messages": [], "chat_template_kwargs": [1]}),
            LocalityQuery {
                chat_template_kwargs_json: Some("[1]".into()),
                ..msgs("[]")
            },
        ),
    ] {
        let (status, json) = post(&f.http, &body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let message = json["error"]["message"].as_str().unwrap();
        let e = f.locality.locality(q.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{body}: {e:?}");
        assert_eq!(e.message(), message, "{body}");
        // Scorer reads the prefix the same way.
        let e = f
            .scorer
            .score(ScoreRequest {
                prefix: Some(q.clone()),
                pod_id: "http://a".into(),
            })
            .await
            .unwrap_err();
        assert_eq!((e.code(), e.message()), (Code::InvalidArgument, message));
        let e = f
            .scorer
            .get_candidates(CandidatesRequest {
                prefix: Some(q),
                limit: None,
            })
            .await
            .unwrap_err();
        assert_eq!((e.code(), e.message()), (Code::InvalidArgument, message));
    }
    // gRPC's own fields: JSON strings that are not JSON, a missing model or
    // prefix or pod; the salt never shows in an error.
    let bad_json = LocalityQuery {
        cache_salt: Some("secret-salt".into()),
        ..msgs("[{")
    };
    for (q, says) in [
        (bad_json, "'messages_json' is not valid JSON"),
        (
            LocalityQuery {
                tools_json: Some("nope".into()),
                ..msgs("[]")
            },
            "'tools_json' is not valid JSON",
        ),
        (query("", tokens(0..8)), "missing 'model_id'"),
    ] {
        let e = f.locality.locality(q).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(says), "{e:?}");
        assert!(!format!("{e:?}").contains("secret-salt"), "{e:?}");
    }
    let prefix = Some(query("m", tokens(0..8)));
    for req in [
        ScoreRequest {
            prefix: None,
            pod_id: "http://a".into(),
        },
        ScoreRequest {
            prefix: prefix.clone(),
            pod_id: String::new(),
        },
    ] {
        let e = f.scorer.score(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    let e = f
        .scorer
        .get_candidates(CandidatesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::InvalidArgument, "missing 'prefix'")
    );
    // A pod that is not in the index, or serves another model: NOT_FOUND.
    for pod in ["http://zzz", "http://x"] {
        let e = f
            .scorer
            .score(ScoreRequest {
                prefix: prefix.clone(),
                pod_id: pod.into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{pod}: {e:?}");
        assert!(e.message().contains(pod), "{e:?}");
    }
}

#[tokio::test]
async fn message_size_limit_matches_http() {
    let mut f = fixture().await;
    // 5-byte varints: ~5 MB (over tonic's 4 MiB default, under HTTP's 8 MiB) is
    // answered; ~9 MB is refused.
    let ok = f
        .locality
        .locality(query("m", tokens(std::iter::repeat_n(u32::MAX, 1_000_000))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.prompt_tokens, 1_000_000);
    let e = f
        .locality
        .locality(query("m", tokens(std::iter::repeat_n(u32::MAX, 1_800_000))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
}

#[tokio::test]
async fn health_and_metrics_cover_grpc() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let mut f = fixture().await;
    let mut health = HealthClient::new(f.channel.clone());
    for service in ["", "kvgate.index.v1.Locality", "kvgate.index.v1.Scorer"] {
        let reply = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.status, ServingStatus::Serving as i32, "{service:?}");
    }
    let e = health
        .check(HealthCheckRequest {
            service: "kvgate.index.v1.Nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // gRPC queries are recorded as HTTP's are.
    for _ in 0..2 {
        f.locality.locality(query("m", tokens(0..8))).await.unwrap();
    }
    f.scorer
        .get_candidates(CandidatesRequest {
            prefix: Some(query("m", tokens(0..8))),
            limit: None,
        })
        .await
        .unwrap();
    let (status, text) = http(
        &f.http,
        Request::get("/metrics").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let text = text.as_str().unwrap();
    assert!(
        text.contains("kv_cache_query_duration_seconds_count 3"),
        "{text}"
    );
}
