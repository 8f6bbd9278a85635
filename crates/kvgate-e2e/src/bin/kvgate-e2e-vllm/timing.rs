//! The timing side channel on real vLLM (InputSnatch-style), through the
//! contracts' gateway: tenant-a (the victim) caches half of a set of
//! candidate documents; a colleague in tenant-a and an attacker in tenant-b
//! then send each candidate with a fresh question and time the answer (one
//! output token, so the time is the time to first token). A hit skips the
//! document's prefill. The colleague must tell cached from uncached (the
//! probe works); the attacker must be at chance (the contracts' salts keep
//! vLLM's prefix cache apart).
//!
//! How long the documents are: the tiny CPU model prefills ~30k tokens/s
//! on a quiet 2-core box (a 1300-token miss ~45 ms against a hit's ~25-35
//! ms: too close, AUC 0.79-0.81 in two CI runs) and far slower on a busy
//! one, so candidates are ~2600 and ~5100 tokens: a miss costs 100-200 ms
//! more than a hit whatever the box. Each length is half cached, so length
//! tells the prober nothing.
//! Open: the colleague's AUC was 1.000 in earlier runs and 0.79-0.88 in
//! the last three (with either length), so some probes of cached documents
//! look like misses or the reverse; next step: log each probe's time and
//! the instance that served it.
//! How many: at chance the AUC of n cached against n uncached samples has a
//! standard deviation of sqrt((2n+1)/(12n²)), 0.033 for n = 150, so the
//! ±0.1 band is 3 of them.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kvgate_e2e::checks::roc_auc;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Words per candidate document (a word is ~5 Qwen tokens here).
const WORDS: [usize; 2] = [512, 1024];

/// Who probes: the bearer tokens of the victim, its colleague (same
/// contract, another subject) and the attacker (another contract).
pub(crate) struct Probers<'a> {
    pub(crate) victim: &'a str,
    pub(crate) colleague: &'a str,
    pub(crate) attacker: &'a str,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct TimingProbe {
    pub(crate) auc_same: f64,
    pub(crate) auc_cross: f64,
    pub(crate) candidates: usize,
}

fn document(words: usize, rng: &mut StdRng) -> String {
    let body: Vec<String> = (0..words)
        .map(|_| format!("w{}", rng.random_range(0..50_000)))
        .collect();
    body.join(" ")
}

/// The chat request for `doc` with a question nobody asked before.
fn ask(served: &str, doc: &str, rng: &mut StdRng) -> Value {
    json!({
        "model": served,
        "max_tokens": 1,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": doc},
            {"role": "user", "content": format!("Question {}: what follows?", rng.random::<u64>())},
        ],
    })
}

/// Sends `body` as `bearer`; the time until the whole one-token answer.
async fn timed(http: &reqwest::Client, url: &str, body: &Value, bearer: &str) -> Result<Duration> {
    let started = Instant::now();
    let resp = http
        .post(url)
        .bearer_auth(bearer)
        .json(body)
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let text = resp.text().await?;
    ensure!(status.is_success(), "probe answered {status}: {text}");
    Ok(started.elapsed())
}

/// Runs the probe with `candidates` documents through `gateway`.
pub(crate) async fn run(
    http: &reqwest::Client,
    gateway: &str,
    served: &str,
    who: &Probers<'_>,
    candidates: usize,
) -> Result<TimingProbe> {
    let url = format!("{gateway}/v1/chat/completions");
    let mut rng = StdRng::seed_from_u64(0x5eed_70be);
    // (document, cached by the victim)
    let set: Vec<(String, bool)> = (0..candidates)
        .map(|i| (document(WORDS[(i / 2) % WORDS.len()], &mut rng), i % 2 == 0))
        .collect();
    for (doc, _) in set.iter().filter(|(_, cached)| *cached) {
        timed(http, &url, &ask(served, doc, &mut rng), who.victim).await?;
    }
    let mut order: Vec<usize> = (0..set.len()).collect();
    order.shuffle(&mut rng);
    let (mut same, mut cross) = (Vec::new(), Vec::new());
    for i in order {
        let (doc, cached) = &set[i];
        // The attacker first: its probe cannot warm the colleague's cache.
        for (bearer, out) in [(who.attacker, &mut cross), (who.colleague, &mut same)] {
            let t = timed(http, &url, &ask(served, doc, &mut rng), bearer).await?;
            out.push((t.as_secs_f64(), *cached));
        }
    }
    Ok(TimingProbe {
        auc_same: roc_auc(&same),
        auc_cross: roc_auc(&cross),
        candidates,
    })
}
