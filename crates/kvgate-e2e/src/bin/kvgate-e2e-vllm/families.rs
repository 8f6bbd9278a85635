//! Phase 3: template parity over real tokenizer families (scripts/vllm/
//! families.sh). Per family one vLLM, started with the family's tokenizer dir
//! (`--tokenizer`) around a tiny model, and a gateway over it: vLLM's
//! rendering server (`vllm launch render`, no engine, quick to start) unless
//! the family's blocks are checked too, then a full engine. Every request
//! of the family corpus goes to vLLM's render endpoints and to the gateway's
//! explain endpoints: it matches when both accept it with the same token ids,
//! or both reject it. Two families at a time, one per core. On the families
//! of [`BLOCK_FAMILIES`], chat requests also go through the gateway and every
//! block vLLM stores must be found under the gateway's keys.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use kvgate_e2e::capture::EventCapture;
use kvgate_e2e::checks::BlockParity;
use kvgate_e2e::corpus::{Item, Kind};
use kvgate_e2e::family_corpus::{family_corpus, special_tokens};
use kvgate_e2e::{render_tokens, EngineAddr, Explained};
use kvgate_gateway::config::GatewayConfig;
use kvgate_gateway::EndpointConfig;
use kvgate_router::{Policy, RouterConfig};
use serde_json::{json, Value};

use crate::requests::corpus_block_parity;
use crate::tier::{EngineSpec, Fleet, Tier, ENGINE_START};

/// Families whose blocks are checked too (different tokenizer classes).
pub(crate) const BLOCK_FAMILIES: &[&str] = &["gemma3", "deepseek-v3"];
const BLOCK_SIZE: u32 = 32;
const MAX_MODEL_LEN: usize = 4096;
/// Chat requests sent for block parity on a block family.
const BLOCK_REQUESTS: usize = 30;

/// Template parity of one family (or all of them).
#[derive(Debug, Default, Clone)]
pub(crate) struct TemplateParity {
    pub(crate) matched: usize,
    pub(crate) total: usize,
    /// Requests vLLM rejected (and the gateway did too, when matched).
    pub(crate) rejected: usize,
    pub(crate) mismatches: Vec<String>,
}

impl TemplateParity {
    pub(crate) fn add(&mut self, other: &TemplateParity) {
        self.matched += other.matched;
        self.total += other.total;
        self.rejected += other.rejected;
    }
}

/// What one side answered: token ids, or a rejection (status, message).
#[derive(Debug, Clone)]
enum Answer {
    Tokens(Vec<u32>),
    Rejected(u16, String),
}

async fn post_any(http: &reqwest::Client, url: &str, body: &Value) -> Result<(u16, Value)> {
    let resp = http
        .post(url)
        .json(body)
        .timeout(std::time::Duration::from_secs(120))
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, v))
}

fn short(v: &Value) -> String {
    let s = v
        .pointer("/error/message")
        .or_else(|| v.get("message"))
        .or_else(|| v.get("error"))
        .unwrap_or(v)
        .to_string();
    s.chars().take(160).collect()
}

async fn vllm_answer(
    http: &reqwest::Client,
    engine: &str,
    item: &Item,
    body: &Value,
) -> Result<(Answer, Value)> {
    let (status, v) = post_any(http, &format!("{engine}{}/render", item.kind.path()), body).await?;
    if status == 200 {
        let ids = render_tokens(&v).context("render token_ids")?;
        return Ok((Answer::Tokens(ids), v));
    }
    Ok((Answer::Rejected(status, short(&v)), v))
}

async fn gateway_answer(
    http: &reqwest::Client,
    gateway: &str,
    item: &Item,
    body: &Value,
) -> Result<Answer> {
    let path = match item.kind {
        Kind::Chat => kvgate_gateway::EXPLAIN_CHAT_PATH,
        Kind::Completion => kvgate_gateway::EXPLAIN_COMPLETIONS_PATH,
    };
    let (status, v) = post_any(http, &format!("{gateway}{path}"), body).await?;
    if status == 200 {
        let e = Explained::parse(&v).context("explain response")?;
        return Ok(Answer::Tokens(e.tokens));
    }
    Ok(Answer::Rejected(status, short(&v)))
}

/// Why two answers differ, or None when they agree.
fn difference(vllm: &Answer, gateway: &Answer) -> Option<String> {
    match (vllm, gateway) {
        (Answer::Tokens(a), Answer::Tokens(b)) if a == b => None,
        (Answer::Rejected(s, _), Answer::Rejected(g, _)) if *s < 500 && (400..500).contains(g) => {
            None
        }
        (Answer::Tokens(e), Answer::Tokens(g)) => {
            let at = e
                .iter()
                .zip(g)
                .position(|(x, y)| x != y)
                .unwrap_or(e.len().min(g.len()));
            let w = |t: &[u32]| t[at.saturating_sub(2)..(at + 6).min(t.len())].to_vec();
            Some(format!(
                "ids differ: lengths vLLM {} gateway {}, first at {at}: vLLM {:?} gateway {:?}",
                e.len(),
                g.len(),
                w(e),
                w(g)
            ))
        }
        (Answer::Tokens(_), Answer::Rejected(s, m)) => {
            Some(format!("vLLM accepted, gateway {s}: {m}"))
        }
        (Answer::Rejected(s, m), Answer::Tokens(_)) => {
            Some(format!("vLLM {s} ({m}), gateway accepted"))
        }
        (Answer::Rejected(s, m), Answer::Rejected(g, gm)) => {
            Some(format!("vLLM {s} ({m}), gateway {g} ({gm})"))
        }
    }
}

/// The result of one family.
pub(crate) struct FamilyOutcome {
    pub(crate) name: String,
    pub(crate) parity: TemplateParity,
    pub(crate) blocks: Option<BlockParity>,
    pub(crate) took: std::time::Duration,
}

pub(crate) fn families_dir(t: &Tier) -> PathBuf {
    t.args
        .families_dir
        .clone()
        .unwrap_or_else(|| t.args.work.join("families"))
}

/// The families to run: every dir under the families dir, filtered.
pub(crate) fn family_names(t: &Tier) -> Result<Vec<String>> {
    let dir = families_dir(t);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("families dir {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("tokenizer.json").is_file())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    names.sort();
    if let Some(filter) = &t.args.families {
        let wanted: Vec<&str> = filter.split(',').map(str::trim).collect();
        names.retain(|n| wanted.contains(&n.as_str()));
    }
    Ok(names)
}

async fn run_family(t: &Tier, name: &str, lane: u16) -> Result<FamilyOutcome> {
    let started = Instant::now();
    let http = &t.http;
    let tok_dir = families_dir(t).join(name);
    let served = format!("fam-{name}");
    let first = 50 + lane * 10;
    let ports = (t.port(first), t.port(first + 1), t.port(first + 2));
    let spec = EngineSpec {
        model_dir: t.args.models.join(&served),
        tokenizer_dir: Some(tok_dir.clone()),
        served: &served,
        block_size: BLOCK_SIZE,
        max_model_len: MAX_MODEL_LEN,
        gpu_blocks: None,
        tool_parser: "pythonic",
    };
    let with_engine = BLOCK_FAMILIES.contains(&name);
    let mut proc = if with_engine {
        t.spawn_engine(&format!("vllm-{served}"), &spec, ports, usize::from(lane))?
    } else {
        t.spawn_renderer(&format!("vllm-render-{served}"), &spec, ports.0)?
    };
    let addr = EngineAddr {
        url: format!("http://127.0.0.1:{}", ports.0),
        events: format!("tcp://127.0.0.1:{}", ports.1),
        replay: format!("tcp://127.0.0.1:{}", ports.2),
    };
    proc.wait_ready(&format!("{}/health", addr.url), ENGINE_START)
        .await?;
    let mut capture = EventCapture::default();
    if with_engine {
        capture.subscribe(0, &addr.events).await?;
    }
    let cfg = GatewayConfig {
        listen: format!("127.0.0.1:{}", t.port(first + 3)),
        endpoints: vec![EndpointConfig {
            events: with_engine.then(|| addr.events.clone()),
            replay: with_engine.then(|| addr.replay.clone()),
            topic: "kv".into(),
            ..EndpointConfig::new(addr.url.clone(), served.clone(), BLOCK_SIZE)
        }],
        router: RouterConfig {
            policy: Policy::PrecisePrefix,
            ..RouterConfig::default()
        },
        key_secret: Some("kvgate-e2e".into()),
        tokenizers: [(served.clone(), tok_dir.display().to_string())].into(),
        embedded_tokenizer_fallback: false,
        health_interval_ms: 500,
        ..GatewayConfig::default()
    };
    let (_gw, gateway) = t.start_gateway(&format!("gateway-{served}"), &cfg).await?;
    let mut fleet = Fleet::new(
        vec![(addr, Some(proc))],
        served.clone(),
        BLOCK_SIZE,
        capture,
    );

    let tok_cfg: Value =
        serde_json::from_slice(&std::fs::read(tok_dir.join("tokenizer_config.json"))?)?;
    let specials = special_tokens(&tok_cfg);
    let seed = name.bytes().map(u64::from).sum::<u64>();
    let items = family_corpus(
        seed,
        &specials,
        t.args.family_chat,
        t.args.family_completions,
        500,
    );
    let mut parity = TemplateParity::default();
    let mut accepted = Vec::new();
    let mut details = Vec::new();
    let engine = fleet.url(0).to_string();
    for item in &items {
        let body = fleet.body(&item.body, 4);
        let (v, raw) = vllm_answer(http, &engine, item, &body).await?;
        let g = gateway_answer(http, &gateway, item, &body).await?;
        parity.total += 1;
        let rejected = matches!(v, Answer::Rejected(..));
        parity.rejected += usize::from(rejected);
        match difference(&v, &g) {
            None => {
                parity.matched += 1;
                // Block parity runs on requests both sides render alike.
                if !rejected && item.kind == Kind::Chat {
                    accepted.push(item.clone());
                }
            }
            Some(why) => {
                if parity.mismatches.len() < 4 {
                    parity
                        .mismatches
                        .push(format!("{served}/{}: {why}", item.name));
                }
                details.push(json!({"name": item.name, "why": why, "request": body, "vllm": raw}));
            }
        }
    }
    std::fs::write(
        t.args.work.join(format!("families-{name}-mismatches.json")),
        serde_json::to_vec_pretty(&details)?,
    )?;
    let blocks = if with_engine {
        let mut b = BlockParity::default();
        let picked: Vec<Item> = accepted.into_iter().take(BLOCK_REQUESTS).collect();
        corpus_block_parity(http, &mut fleet, &gateway, &picked, &mut b).await?;
        Some(b)
    } else {
        None
    };
    Ok(FamilyOutcome {
        name: name.to_string(),
        parity,
        blocks,
        took: started.elapsed(),
    })
}

/// Runs `names` one after another (one lane of the phase).
async fn lane(t: &Tier, names: Vec<String>, lane: u16) -> Vec<Result<FamilyOutcome>> {
    let mut out = Vec::new();
    for n in names {
        let r = run_family(t, &n, lane)
            .await
            .with_context(|| format!("family {n}"));
        match &r {
            Ok(o) => eprintln!(
                "  {}: template parity {}/{} ({} rejected by vLLM){} in {:.0?}",
                o.name,
                o.parity.matched,
                o.parity.total,
                o.parity.rejected,
                o.blocks
                    .as_ref()
                    .map(|b| format!(", blocks {}/{}", b.found, b.checked))
                    .unwrap_or_default(),
                o.took
            ),
            Err(e) => eprintln!("  {n}: FAILED {e:#}"),
        }
        out.push(r);
    }
    out
}

/// Phase 3: every family, two at a time.
pub(crate) async fn phase_families(t: &Tier) -> Result<Vec<Result<FamilyOutcome>>> {
    let names = family_names(t)?;
    eprintln!(
        "== phase 3: template parity over {} families: {}",
        names.len(),
        names.join(", ")
    );
    let (a, b): (Vec<_>, Vec<_>) = names.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let strip = |v: Vec<(usize, String)>| v.into_iter().map(|(_, n)| n).collect::<Vec<_>>();
    let (ra, rb) = tokio::join!(lane(t, strip(a), 0), lane(t, strip(b), 1));
    Ok(ra.into_iter().chain(rb).collect())
}
