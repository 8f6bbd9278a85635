//! Requests through a gateway (its explain endpoint, block-checked sends,
//! corpus token and block parity) and straight to an engine (its hits).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kvgate_e2e::checks::{BlockParity, TokenParity};
use kvgate_e2e::corpus::{self, Kind};
use kvgate_e2e::{cache_counters, post_json, render_tokens, Explained};
use serde_json::Value;

use crate::tier::{Fleet, EVENTS_MAX, EVENTS_QUIET, INDEX_CATCH_UP};

fn explain_path(kind: Kind) -> &'static str {
    match kind {
        Kind::Chat => kvgate_gateway::EXPLAIN_CHAT_PATH,
        Kind::Completion => kvgate_gateway::EXPLAIN_COMPLETIONS_PATH,
    }
}

/// The gateway's view of a request (its explain endpoint).
pub(crate) async fn explain(
    http: &reqwest::Client,
    gateway: &str,
    kind: Kind,
    body: &Value,
    auth: Option<&str>,
) -> Result<Explained> {
    let (v, _) = post_json(
        http,
        &format!("{gateway}{}", explain_path(kind)),
        body,
        auth,
    )
    .await?;
    Explained::parse(&v).context("explain response")
}

/// Sends one request through a gateway and checks every block the engine
/// stored for it against the gateway's keys and index.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn send_checked(
    http: &reqwest::Client,
    fleet: &mut Fleet,
    gateway: &str,
    kind: Kind,
    body: &Value,
    auth: Option<&str>,
    name: &str,
    parity: &mut BlockParity,
) -> Result<String> {
    fleet.capture.settle(EVENTS_QUIET, EVENTS_MAX).await;
    fleet.advance();
    let (_, headers) = post_json(http, &format!("{gateway}{}", kind.path()), body, auth).await?;
    let routed = headers
        .get("x-kvgate-endpoint")
        .and_then(|v| v.to_str().ok())
        .context("no x-kvgate-endpoint header")?
        .to_string();
    fleet.capture.settle(EVENTS_QUIET, EVENTS_MAX).await;
    let placed = fleet.advance();
    let bs = fleet.block_size;
    let started = Instant::now();
    loop {
        let explained = explain(http, gateway, kind, body, auth).await?;
        let mut attempt = BlockParity::default();
        let mut stray = Vec::new();
        let mine: Vec<_> = placed
            .iter()
            .filter_map(|(engine, b)| {
                if fleet.url(*engine) == routed {
                    Some(b.clone())
                } else {
                    stray.push(format!(
                        "{name}: a block stored on {} while routed to {routed}",
                        fleet.url(*engine)
                    ));
                    None
                }
            })
            .collect();
        attempt.record(name, &mine, &explained.tokens, bs as usize, |p| {
            explained.held(bs, &routed, p)
        });
        attempt.checked += stray.len();
        attempt.mismatches.extend(stray);
        if attempt.found == attempt.checked || started.elapsed() > INDEX_CATCH_UP {
            parity.found += attempt.found;
            parity.checked += attempt.checked;
            parity.generated += attempt.generated;
            let room = 10usize.saturating_sub(parity.mismatches.len());
            parity
                .mismatches
                .extend(attempt.mismatches.into_iter().take(room));
            return Ok(routed);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends every corpus request through `gateway`, checking its blocks.
pub(crate) async fn corpus_block_parity(
    http: &reqwest::Client,
    fleet: &mut Fleet,
    gateway: &str,
    items: &[corpus::Item],
    parity: &mut BlockParity,
) -> Result<()> {
    for item in items {
        let body = fleet.body(&item.body, 4);
        send_checked(
            http, fleet, gateway, item.kind, &body, None, &item.name, parity,
        )
        .await?;
    }
    Ok(())
}

/// Token parity of a corpus: the gateway's ids (explain) vs vLLM's render.
pub(crate) async fn token_parity(
    http: &reqwest::Client,
    fleet: &Fleet,
    gateway: &str,
    items: &[corpus::Item],
    out: &mut TokenParity,
) -> Result<()> {
    let engine = fleet.url(0).to_string();
    for item in items {
        let body = fleet.body(&item.body, 4);
        let (render, _) = post_json(
            http,
            &format!("{engine}{}/render", item.kind.path()),
            &body,
            None,
        )
        .await
        .with_context(|| format!("render {}", item.name))?;
        let expected = render_tokens(&render).context("render token_ids")?;
        let got = explain(http, gateway, item.kind, &body, None).await?.tokens;
        out.record(&format!("{}/{}", fleet.served, item.name), &got, &expected);
    }
    Ok(())
}

/// Hit tokens of one request sent straight to an engine.
pub(crate) async fn direct_hits(
    http: &reqwest::Client,
    fleet: &Fleet,
    engine: usize,
    body: &Value,
    path: &str,
) -> Result<u64> {
    let target = format!("{}{path}", fleet.url(engine));
    hits_on(http, fleet, engine, &target, body, None).await
}

/// Prefix-cache hit tokens engine `engine` counts while `target` serves one request.
pub(crate) async fn hits_on(
    http: &reqwest::Client,
    fleet: &Fleet,
    engine: usize,
    target: &str,
    body: &Value,
    auth: Option<&str>,
) -> Result<u64> {
    let url = fleet.url(engine).to_string();
    let before = cache_counters(http, &url).await?;
    post_json(http, target, body, auth).await?;
    fleet.capture.settle(EVENTS_QUIET, EVENTS_MAX).await;
    let after = cache_counters(http, &url).await?;
    Ok((after.0 - before.0).round() as u64)
}
