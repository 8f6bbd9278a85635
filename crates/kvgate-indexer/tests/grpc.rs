#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The gRPC locality API agrees with the HTTP one: both fronts over one
//! `ApiState`, the same queries, the same pods, block counts, match lengths,
//! scores and coverage, bit for bit; Score and GetCandidates agree with the
//! HTTP answer's pods.

mod grpc_common;

use axum::http::StatusCode;
use grpc_common::{expected, fixture, messages, post, query, tokens, TEXT};
use kvgate_indexer::grpc::pb::locality_query::Prompt;
use kvgate_indexer::grpc::pb::{CandidatesRequest, LocalityQuery, ScoreRequest};
use serde_json::{json, Value};

/// (what, HTTP body, the same query over gRPC, pods expected as candidates best first)
fn cases() -> Vec<(&'static str, Value, LocalityQuery, Vec<&'static str>)> {
    let range = |n: u32| (0..n).collect::<Vec<u32>>();
    let salted = |salt: &str| LocalityQuery {
        cache_salt: Some(salt.into()),
        ..query("m", tokens(0..8))
    };
    vec![
        (
            "tokens",
            json!({"model": "m", "tokens": range(16)}),
            query("m", tokens(0..16)),
            vec!["http://b", "http://a", "http://d"],
        ),
        (
            "a partial block",
            json!({"model": "m", "tokens": range(6)}),
            query("m", tokens(0..6)),
            vec!["http://a", "http://b"],
        ),
        (
            "empty prompt",
            json!({"model": "m", "tokens": []}),
            query("m", tokens([])),
            vec![],
        ),
        (
            "salt",
            json!({"model": "m", "tokens": range(8), "cache_salt": "tenant-a"}),
            salted("tenant-a"),
            vec!["http://e"],
        ),
        (
            "another salt",
            json!({"model": "m", "tokens": range(8), "cache_salt": "tenant-b"}),
            salted("tenant-b"),
            vec![],
        ),
        (
            "lora",
            json!({"model": "m", "tokens": range(8), "lora_name": "adapter"}),
            LocalityQuery {
                lora: Some("adapter".into()),
                ..query("m", tokens(0..8))
            },
            vec![],
        ),
        (
            "another model",
            json!({"model": "other", "tokens": range(8)}),
            query("other", tokens(0..8)),
            vec!["http://x"],
        ),
        (
            "unknown model",
            json!({"model": "nope", "tokens": range(8)}),
            query("nope", tokens(0..8)),
            vec![],
        ),
        (
            "text",
            json!({"model": "m", "text": TEXT}),
            query("m", Prompt::Text(TEXT.into())),
            vec!["http://c"],
        ),
        (
            "messages",
            json!({"model": "m", "messages": messages()}),
            query("m", Prompt::MessagesJson(messages().to_string())),
            vec!["http://c"],
        ),
        (
            "messages with chat_template_kwargs",
            json!({"model": "m", "messages": messages(), "chat_template_kwargs": {"enable_thinking": false}}),
            LocalityQuery {
                chat_template_kwargs_json: Some(r#"{"enable_thinking": false}"#.into()),
                ..query("m", Prompt::MessagesJson(messages().to_string()))
            },
            vec!["http://c"],
        ),
        (
            "messages with template fields",
            json!({"model": "m", "messages": messages(), "add_generation_prompt": false,
                   "tools": null, "chat_template_kwargs": {"enable_thinking": false}}),
            LocalityQuery {
                add_generation_prompt: Some(false),
                tools_json: Some("null".into()),
                chat_template_kwargs_json: Some(r#"{"enable_thinking": false}"#.into()),
                ..query("m", Prompt::MessagesJson(messages().to_string()))
            },
            vec!["http://c"],
        ),
    ]
}

#[tokio::test]
async fn grpc_locality_agrees_with_http() {
    let mut f = fixture().await;
    for (what, body, q, _) in cases() {
        let (status, json) = post(&f.http, &body).await;
        assert_eq!(status, StatusCode::OK, "{what}: {json}");
        let got = f.locality.locality(q).await.unwrap().into_inner();
        assert_eq!(got, expected(&json), "{what}: {json}");
    }
    // The answers are not trivially equal: the first case ranks every pod of m.
    let q = cases().remove(0).2;
    let got = f.locality.locality(q).await.unwrap().into_inner();
    let names: Vec<&str> = got.pods.iter().map(|p| p.pod_id.as_str()).collect();
    assert_eq!(
        names,
        ["http://b", "http://a", "http://d", "http://c", "http://e"]
    );
    assert_eq!(got.cache_hits, 4);
    assert_eq!(got.coverage, 1.0);
    let tiers: Vec<(&str, u32)> = got.pods[0]
        .tiers
        .iter()
        .map(|t| (t.tier.as_str(), t.blocks))
        .collect();
    assert_eq!(tiers, [("GPU", 2), ("CPU", 2)]);
    assert_eq!(got.pods[1].tier, "GPU");
    assert!((got.pods[0].score - (2.0 + 2.0 * 0.8) / 4.0).abs() < 1e-12);
    assert_eq!((got.pods[2].block_count, got.pods[2].match_length), (1, 8));
}

#[tokio::test]
async fn score_and_candidates_agree_with_http() {
    let mut f = fixture().await;
    for (what, body, q, want) in cases() {
        let (_, json) = post(&f.http, &body).await;
        let endpoints = json["endpoints"].as_array().unwrap();
        for e in endpoints {
            let pod = e["endpoint"].as_str().unwrap();
            let reply = f
                .scorer
                .score(ScoreRequest {
                    prefix: Some(q.clone()),
                    pod_id: pod.into(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(reply.score, e["score"].as_f64().unwrap(), "{what}: {pod}");
            assert_eq!(reply.match_length, e["matched_tokens"].as_u64().unwrap());
            assert_eq!(
                u64::from(reply.block_count),
                e["matched_blocks"].as_u64().unwrap()
            );
        }
        let reply = f
            .scorer
            .get_candidates(CandidatesRequest {
                prefix: Some(q.clone()),
                limit: None,
            })
            .await
            .unwrap()
            .into_inner();
        let names: Vec<&str> = reply.pods.iter().map(|p| p.pod_id.as_str()).collect();
        assert_eq!(names, want, "{what}");
        assert!(
            reply.pods.windows(2).all(|w| w[0].score >= w[1].score),
            "{what}: best first"
        );
        assert!(reply.pods.iter().all(|p| p.match_length > 0), "{what}");
        // The candidates are HTTP's matched endpoints, in HTTP's order.
        let http: Vec<(&str, f64, u64)> = endpoints
            .iter()
            .filter(|e| e["matched_blocks"].as_u64() > Some(0))
            .map(|e| {
                (
                    e["endpoint"].as_str().unwrap(),
                    e["score"].as_f64().unwrap(),
                    e["matched_tokens"].as_u64().unwrap(),
                )
            })
            .collect();
        let grpc: Vec<(&str, f64, u64)> = reply
            .pods
            .iter()
            .map(|p| (p.pod_id.as_str(), p.score, p.match_length))
            .collect();
        assert_eq!(grpc, http, "{what}");
        for limit in [1, 2] {
            let reply = f
                .scorer
                .get_candidates(CandidatesRequest {
                    prefix: Some(q.clone()),
                    limit: Some(limit),
                })
                .await
                .unwrap()
                .into_inner();
            let n = (limit as usize).min(want.len());
            assert_eq!(reply.pods.len(), n, "{what}: limit {limit}");
            assert!(reply
                .pods
                .iter()
                .map(|p| p.pod_id.as_str())
                .eq(want[..n].iter().copied()));
        }
    }
}
