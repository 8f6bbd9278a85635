//! Phase 1 (Qwen tokenizer, block size 64, ample cache): token parity, block
//! parity with and without a tenant's `cache_salt`, routing against vLLM's own
//! optimal hit rate, salt isolation.

use anyhow::{bail, Result};
use kvgate_auth::AuthConfig;
use kvgate_e2e::checks::BlockParity;
use kvgate_e2e::corpus::{self, Kind};
use kvgate_e2e::post_json;
use kvgate_router::Policy;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::contracts;
use crate::requests::{corpus_block_parity, explain, hits_on, send_checked, token_parity};
use crate::summary::Summary;
use crate::tier::{Fleet, Tier, EVENTS_MAX, EVENTS_QUIET, QWEN};
use crate::timing;

/// The multi-prefix routing workload: `prefixes` shared documents, each asked
/// `per_prefix` questions, in a shuffled order.
fn routing_workload(prefixes: usize, per_prefix: usize, words: usize, seed: u64) -> Vec<Value> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut order: Vec<(usize, usize)> = (0..prefixes)
        .flat_map(|p| (0..per_prefix).map(move |q| (p, q)))
        .collect();
    for i in (1..order.len()).rev() {
        let j = rng.random_range(0..=i);
        order.swap(i, j);
    }
    let docs: Vec<String> = (0..prefixes)
        .map(|p| {
            let mut r = StdRng::seed_from_u64(seed * 1000 + p as u64);
            let body: Vec<String> = (0..words)
                .map(|_| format!("w{}", r.random_range(0..5000)))
                .collect();
            format!("Document {p}. {}", body.join(" "))
        })
        .collect();
    order
        .into_iter()
        .map(|(p, q)| {
            json!({"messages": [
                {"role": "system", "content": docs[p]},
                {"role": "user", "content": format!("Question {q} about document {p}: what does word {} say?", q * 7)}]})
        })
        .collect()
}

/// Runs the routing workload through `gateway`; returns the fleet's hit rate
/// and the prompts' token ids (for the oracle).
async fn routing_run(
    http: &reqwest::Client,
    fleet: &mut Fleet,
    gateway: &str,
    workload: &[Value],
    parity: Option<&mut BlockParity>,
) -> Result<(f64, Vec<Vec<u32>>)> {
    fleet.reset(http).await?;
    let before = fleet.counters(http).await?;
    let mut prompts = Vec::new();
    let mut parity = parity;
    for (i, w) in workload.iter().enumerate() {
        let body = fleet.body(w, 1);
        prompts.push(
            explain(http, gateway, Kind::Chat, &body, None)
                .await?
                .tokens,
        );
        match parity.as_deref_mut() {
            Some(p) => {
                send_checked(
                    http,
                    fleet,
                    gateway,
                    Kind::Chat,
                    &body,
                    None,
                    &format!("routing-{i}"),
                    p,
                )
                .await?;
            }
            None => {
                post_json(http, &format!("{gateway}/v1/chat/completions"), &body, None).await?;
            }
        }
    }
    fleet.capture.settle(EVENTS_QUIET, EVENTS_MAX).await;
    let after = fleet.counters(http).await?;
    let queries = after.1 - before.1;
    if queries <= 0.0 {
        bail!("vLLM counted no prefix-cache queries");
    }
    Ok(((after.0 - before.0) / queries, prompts))
}

pub(crate) async fn phase_qwen(t: &Tier, s: &mut Summary) -> Result<()> {
    eprintln!("== phase 1: Qwen tokenizer, block size 64");
    let http = &t.http;
    let mut fleet = t.start_fleet(&QWEN, 0).await?;
    let no_tenants = AuthConfig::default();
    let (_g_precise, precise) = t
        .start_gateway(
            "gateway-qwen-precise",
            &t.gateway_config(
                &fleet,
                20,
                Policy::PrecisePrefix,
                &[0, 1],
                None,
                no_tenants.clone(),
            ),
        )
        .await?;
    let (_g_rr, rr) = t
        .start_gateway(
            "gateway-qwen-rr",
            &t.gateway_config(&fleet, 21, Policy::RoundRobin, &[0, 1], None, no_tenants),
        )
        .await?;
    let (tenants, creds) = contracts::config(&t.args.work)?;
    let (jwt_a, jwt_b) = (creds.jwt_a.as_str(), creds.jwt_b.as_str());
    let mut tenant_cfg = t.gateway_config(&fleet, 22, Policy::PrecisePrefix, &[0], None, tenants);
    tenant_cfg.admin_token_sha256 = Some(kvgate_auth::principal::api_key_sha256(
        contracts::ADMIN_TOKEN,
    ));
    let (_g_tenant, tenant) = t.start_gateway("gateway-qwen-tenants", &tenant_cfg).await?;

    let items = corpus::corpus(1, t.args.chat, t.args.completions, 1500);
    token_parity(http, &fleet, &precise, &items, &mut s.tokens).await?;
    eprintln!(
        "  token parity (qwen): {}/{}",
        s.tokens.matched, s.tokens.total
    );

    let workload = routing_workload(6, 8, 450, 42);
    let (hit, prompts) =
        routing_run(http, &mut fleet, &precise, &workload, Some(&mut s.blocks)).await?;
    s.hit_rate = hit;
    s.oracle = kvgate_bench::workload::oracle_hit_rate(&prompts, 64);
    let (rr_hit, _) = routing_run(http, &mut fleet, &rr, &workload, None).await?;
    s.rr_hit_rate = rr_hit;
    eprintln!(
        "  routing: precise {hit:.3} oracle {:.3} round_robin {rr_hit:.3}",
        s.oracle
    );

    fleet.reset(http).await?;
    corpus_block_parity(http, &mut fleet, &precise, &items, &mut s.blocks).await?;
    eprintln!(
        "  block parity (bs 64, no salt): {}/{}",
        s.blocks.found, s.blocks.checked
    );

    // With a tenant's salt: every block carries it from the first on.
    let before = s.blocks.checked;
    for item in items.iter().filter(|i| i.kind == Kind::Chat).take(40) {
        let body = fleet.body(&item.body, 4);
        send_checked(
            http,
            &mut fleet,
            &tenant,
            item.kind,
            &body,
            Some(jwt_a),
            &format!("salted-{}", item.name),
            &mut s.blocks,
        )
        .await?;
    }
    s.salted_blocks = s.blocks.checked - before;

    // Isolation: the same prompt as another tenant hits in neither the index nor vLLM.
    let docs = routing_workload(2, 1, 600, 77);
    let body = fleet.body(&docs[0], 1);
    let other_body = fleet.body(&docs[1], 1);
    // vLLM's hits are read on engine 0, the tenants' gateway's only endpoint.
    let tenant_chat = format!("{tenant}/v1/chat/completions");
    let explain_as = |key: &str, body: Value| {
        let tenant = tenant.clone();
        let key = key.to_string();
        async move { explain(http, &tenant, Kind::Chat, &body, Some(&key)).await }
    };
    send_checked(
        http,
        &mut fleet,
        &tenant,
        Kind::Chat,
        &body,
        Some(jwt_a),
        "salt-first",
        &mut s.blocks,
    )
    .await?;
    send_checked(
        http,
        &mut fleet,
        &tenant,
        Kind::Chat,
        &other_body,
        Some(jwt_a),
        "salt-second",
        &mut s.blocks,
    )
    .await?;
    let engine0 = fleet.url(0).to_string();
    let same_index = explain_as(jwt_a, body.clone())
        .await?
        .leading_held(64, &engine0);
    let same_vllm = hits_on(http, &fleet, 0, &tenant_chat, &body, Some(jwt_a)).await?;
    s.salt_same_hits = same_index > 0 && same_vllm > 0;
    let cross_index = explain_as(jwt_b, body.clone()).await?.held_anywhere();
    let cross_vllm = hits_on(http, &fleet, 0, &tenant_chat, &body, Some(jwt_b)).await?;
    // A client-chosen salt is replaced by the tenant's: no way into A's cache.
    let mut spoofed = other_body.clone();
    spoofed["cache_salt"] = json!("tenant-a");
    let spoof_index = explain_as(jwt_b, spoofed.clone()).await?.held_anywhere();
    let spoof_vllm = hits_on(http, &fleet, 0, &tenant_chat, &spoofed, Some(jwt_b)).await?;
    s.salt_cross_hits = [
        cross_index,
        cross_vllm as usize,
        spoof_index,
        spoof_vllm as usize,
    ]
    .iter()
    .filter(|n| **n > 0)
    .count();
    eprintln!(
        "  salt: same tenant index {same_index} blocks, vLLM {same_vllm} tokens; other tenant index {cross_index}, vLLM {cross_vllm}; spoofed salt index {spoof_index}, vLLM {spoof_vllm}"
    );
    // The API-key contract sees none of it either.
    let api_index = explain_as(contracts::API_KEY_C, body.clone())
        .await?
        .held_anywhere();
    let api_vllm = hits_on(
        http,
        &fleet,
        0,
        &tenant_chat,
        &body,
        Some(contracts::API_KEY_C),
    )
    .await?;
    s.jwt_cross_hits = [
        cross_index,
        cross_vllm as usize,
        api_index,
        api_vllm as usize,
    ]
    .iter()
    .filter(|n| **n > 0)
    .count();
    // Suspension and reactivation: a fresh epoch, so the same prompt misses.
    contracts::suspend_and_reactivate(http, &tenant, "tenant-a").await?;
    let after_vllm = hits_on(http, &fleet, 0, &tenant_chat, &body, Some(jwt_a)).await?;
    s.suspend_miss = Some(after_vllm == 0);
    eprintln!(
        "  contracts: API-key contract index {api_index}, vLLM {api_vllm}; after suspend + reactivate the same prompt hit {after_vllm} tokens at vLLM"
    );
    let who = timing::Probers {
        victim: jwt_a,
        colleague: &creds.jwt_a_colleague,
        attacker: jwt_b,
    };
    let started = std::time::Instant::now();
    let probe = timing::run(http, &tenant, &fleet.served, &who, t.args.probe_candidates).await?;
    eprintln!(
        "  timing probe ({} candidates, {:.0?}): same-contract AUC {:.3}, cross-contract AUC {:.3}",
        probe.candidates,
        started.elapsed(),
        probe.auc_same,
        probe.auc_cross
    );
    s.timing = Some(probe);
    Ok(())
}
