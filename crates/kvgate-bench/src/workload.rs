//! The published workloads (see the crate README), as request lists.
//!
//! Prompts are filler words: what matters is the sharing structure. With a
//! byte-level BPE tokenizer a common English word with its leading space is one
//! token, so N words are ~N tokens.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// One request of a workload.
#[derive(Debug, Clone, Serialize)]
pub struct RequestSpec {
    /// Seconds after the stage start (None: as soon as a slot frees up).
    pub at: Option<f64>,
    pub body: Body,
    pub max_tokens: u32,
    /// Sharing group (prefix id / user), for reports and oracles.
    pub group: usize,
    pub session_id: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub enum Body {
    Completion(String),
    Chat(Vec<serde_json::Value>),
}

const WORDS: &[&str] = &[
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "community",
    "name",
    "president",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "information",
    "back",
    "parent",
    "face",
    "others",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
    "education",
];

/// `n` filler words from `rng`.
pub fn filler(rng: &mut StdRng, n: usize) -> String {
    let mut s = String::with_capacity(n * 7);
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    s
}

/// How requests arrive within a stage.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arrival {
    Poisson,
    Constant,
}

/// Arrival offsets for `n` requests at `rate` per second.
pub fn arrivals(n: usize, rate: f64, kind: Arrival, rng: &mut StdRng) -> Vec<f64> {
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            let at = t;
            t += match kind {
                Arrival::Constant => 1.0 / rate,
                // Exponential inter-arrival times.
                Arrival::Poisson => -(1.0 - rng.random::<f64>()).ln() / rate,
            };
            at
        })
        .collect()
}

/// `specs` with Poisson arrival offsets at `rate` per second.
pub fn timed(mut specs: Vec<RequestSpec>, rate: f64, seed: u64) -> Vec<RequestSpec> {
    let mut rng = StdRng::seed_from_u64(seed);
    let times = arrivals(specs.len(), rate, Arrival::Poisson, &mut rng);
    for (s, t) in specs.iter_mut().zip(times) {
        s.at = Some(t);
    }
    specs
}

/// Shared-prefix workload (LLMD-73, SGL-GSP shapes): `groups` prefixes of
/// `prefix_tokens`, each followed by `prompts_per_group` unique parts. Requests
/// are interleaved across groups in random order.
pub fn shared_prefix(
    groups: usize,
    prompts_per_group: usize,
    prefix_tokens: usize,
    unique_tokens: usize,
    output: u32,
    seed: u64,
) -> Vec<RequestSpec> {
    let mut rng = StdRng::seed_from_u64(seed);
    let prefixes: Vec<String> = (0..groups)
        .map(|g| format!("Context {g}: {}", filler(&mut rng, prefix_tokens)))
        .collect();
    let mut order: Vec<usize> = (0..groups * prompts_per_group)
        .map(|i| i % groups)
        .collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.random_range(0..=i));
    }
    order
        .into_iter()
        .map(|g| RequestSpec {
            at: None,
            body: Body::Completion(format!(
                "{} Question: {}",
                prefixes[g],
                filler(&mut rng, unique_tokens)
            )),
            max_tokens: output,
            group: g,
            session_id: None,
        })
        .collect()
}

/// `n` requests drawn uniformly, with replacement, from a fixed pool of
/// prompts (LLMD-73 sends its 150 x 5 prompts over and over through the
/// ladder, so prefixes stay hot and caches fill up across stages).
pub fn draw(pool: &[RequestSpec], n: usize, seed: u64) -> Vec<RequestSpec> {
    if pool.is_empty() {
        return Vec::new();
    }
    let mut rng = StdRng::seed_from_u64(seed ^ 0xd7a3);
    (0..n)
        .map(|_| pool[rng.random_range(0..pool.len())].clone())
        .collect()
}

/// A shared-prefix workload's shape, in tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharedPrefixShape {
    pub prompts_per_group: usize,
    pub prefix_tokens: usize,
    pub unique_tokens: usize,
    pub output_tokens: usize,
}

impl SharedPrefixShape {
    /// `groups` groups of this shape, with `output_tokens` per request.
    pub fn groups(&self, groups: usize, output_tokens: u32, seed: u64) -> Vec<RequestSpec> {
        shared_prefix(
            groups,
            self.prompts_per_group,
            self.prefix_tokens,
            self.unique_tokens,
            output_tokens,
            seed,
        )
    }
}

/// llm-d's "KV-cache wins you can see" workload (LLMD-73).
pub const LLMD_73: SharedPrefixShape = SharedPrefixShape {
    prompts_per_group: 5,
    prefix_tokens: 6000,
    unique_tokens: 1200,
    output_tokens: 1000,
};

/// No-reuse control: every prompt is unique from its first token.
pub fn no_reuse(n: usize, tokens: usize, output: u32, seed: u64) -> Vec<RequestSpec> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    (0..n)
        .map(|i| RequestSpec {
            at: None,
            body: Body::Completion(format!("{i} {}", filler(&mut rng, tokens))),
            max_tokens: output,
            group: i,
            session_id: None,
        })
        .collect()
}

/// vLLM's prefix_repetition shape: `prefixes` prefixes reused round-robin.
pub fn prefix_repetition(
    n: usize,
    prefixes: usize,
    prefix_tokens: usize,
    suffix_tokens: usize,
    output: u32,
    seed: u64,
) -> Vec<RequestSpec> {
    let mut rng = StdRng::seed_from_u64(seed);
    let p: Vec<String> = (0..prefixes.max(1))
        .map(|_| filler(&mut rng, prefix_tokens))
        .collect();
    (0..n)
        .map(|i| RequestSpec {
            at: None,
            body: Body::Completion(format!(
                "{} {}",
                p[i % p.len()],
                filler(&mut rng, suffix_tokens)
            )),
            max_tokens: output,
            group: i % p.len(),
            session_id: None,
        })
        .collect()
}

/// Multi-round QA (MRQA-S shape): each user has a shared system prompt plus a
/// private history; each round appends an answer and a new question. Rounds of
/// one user are spaced `users / qps` seconds apart.
#[derive(Debug, Clone, Copy)]
pub struct MultiRoundQa {
    pub users: usize,
    pub rounds: usize,
    pub system_tokens: usize,
    pub history_tokens: usize,
    pub question_tokens: usize,
    pub output: u32,
    pub qps: f64,
}

pub fn multi_round_qa(w: MultiRoundQa, seed: u64) -> Vec<RequestSpec> {
    let MultiRoundQa {
        users,
        rounds,
        system_tokens,
        history_tokens,
        question_tokens,
        output,
        qps,
    } = w;
    let mut rng = StdRng::seed_from_u64(seed);
    let system = filler(&mut rng, system_tokens);
    let gap = users as f64 / qps.max(1e-9);
    let mut out = Vec::with_capacity(users * rounds);
    for u in 0..users {
        let mut messages = vec![
            serde_json::json!({"role": "system", "content": system}),
            serde_json::json!({"role": "user", "content": format!("I am user {u}. {}", filler(&mut rng, history_tokens))}),
        ];
        for r in 0..rounds {
            if r > 0 {
                messages.push(serde_json::json!({"role": "assistant", "content": filler(&mut rng, output as usize)}));
                messages.push(serde_json::json!({"role": "user", "content": filler(&mut rng, question_tokens)}));
            }
            out.push(RequestSpec {
                at: Some(r as f64 * gap + u as f64 / qps.max(1e-9)),
                body: Body::Chat(messages.clone()),
                max_tokens: output,
                group: u,
                session_id: Some(format!("user-{u}")),
            });
        }
    }
    out.sort_by(|a, b| a.at.unwrap_or(0.0).total_cmp(&b.at.unwrap_or(0.0)));
    out
}

/// One line of a Mooncake-format trace.
#[derive(Debug, Clone, Deserialize)]
pub struct TraceLine {
    /// Milliseconds from the trace start.
    pub timestamp: f64,
    pub input_length: usize,
    pub output_length: u32,
    /// Equal ids mean equal 512-token blocks.
    pub hash_ids: Vec<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("trace line {line}: {source}")]
    Parse {
        line: usize,
        source: serde_json::Error,
    },
}

/// Replays a trace: block `h` becomes a fixed 512-word text, so equal hash ids
/// share text exactly; the tail past the last full block is unique.
pub fn trace(jsonl: &str, seed: u64) -> Result<Vec<RequestSpec>, TraceError> {
    const BLOCK: usize = 512;
    let mut blocks: std::collections::HashMap<u64, String> = Default::default();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::new();
    for (i, line) in jsonl
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let t: TraceLine = serde_json::from_str(line).map_err(|source| TraceError::Parse {
            line: i + 1,
            source,
        })?;
        let mut prompt = String::new();
        for h in &t.hash_ids {
            let text = blocks.entry(*h).or_insert_with(|| {
                let mut r = StdRng::seed_from_u64(seed ^ h.wrapping_mul(0x9e37_79b9_7f4a_7c15));
                filler(&mut r, BLOCK)
            });
            prompt.push_str(text);
            prompt.push(' ');
        }
        let covered = t.hash_ids.len() * BLOCK;
        if t.input_length > covered {
            prompt.push_str(&filler(&mut rng, t.input_length - covered));
        }
        out.push(RequestSpec {
            at: Some(t.timestamp / 1000.0),
            body: Body::Completion(prompt),
            max_tokens: t.output_length.max(1),
            group: t.hash_ids.first().copied().unwrap_or(0) as usize,
            session_id: None,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let w = shared_prefix(4, 3, 100, 10, 8, 1);
        assert_eq!(w.len(), 12);
        let texts: Vec<&str> = w
            .iter()
            .map(|r| match &r.body {
                Body::Completion(s) => s.as_str(),
                Body::Chat(_) => "",
            })
            .collect();
        for g in 0..4 {
            let same: Vec<&&str> = w
                .iter()
                .zip(&texts)
                .filter(|(r, _)| r.group == g)
                .map(|(_, t)| t)
                .collect();
            assert_eq!(same.len(), 3);
            let prefix = format!("Context {g}: ");
            assert!(same.iter().all(|t| t.starts_with(&prefix)));
            assert_eq!(
                same[0].split(" Question: ").next(),
                same[1].split(" Question: ").next()
            );
        }
        let n = no_reuse(5, 50, 8, 1);
        assert_eq!(n.len(), 5);
        let q = multi_round_qa(
            MultiRoundQa {
                users: 3,
                rounds: 4,
                system_tokens: 50,
                history_tokens: 50,
                question_tokens: 10,
                output: 20,
                qps: 1.0,
            },
            1,
        );
        assert_eq!(q.len(), 12);
        assert!(q.windows(2).all(|w| w[0].at <= w[1].at));
        let Body::Chat(last) = &q.iter().rfind(|r| r.group == 0).unwrap().body else {
            panic!()
        };
        assert_eq!(last.len(), 2 + 3 * 2);
        let a = arrivals(1000, 10.0, Arrival::Poisson, &mut StdRng::seed_from_u64(3));
        let span = a[999];
        assert!((80.0..120.0).contains(&span), "{span}");
        assert_eq!(
            arrivals(3, 2.0, Arrival::Constant, &mut StdRng::seed_from_u64(3)),
            vec![0.0, 0.5, 1.0]
        );
        let t = trace("{\"timestamp\": 0, \"input_length\": 1100, \"output_length\": 5, \"hash_ids\": [1, 2]}\n{\"timestamp\": 500, \"input_length\": 600, \"output_length\": 5, \"hash_ids\": [1]}\n", 1).unwrap();
        let (Body::Completion(a), Body::Completion(b)) = (&t[0].body, &t[1].body) else {
            panic!()
        };
        assert_eq!(a[..3000], b[..3000]);
        assert_eq!(t[1].at, Some(0.5));
        assert!(trace("{bad", 1).is_err());
    }
}

/// The best prefix-cache hit rate any placement could reach for these prompts
/// (token ids, in arrival order): every earlier prompt sits in one infinite
/// cache, only full blocks hit, and the last prompt token is always computed.
pub fn oracle_hit_rate(prompts: &[Vec<u32>], block_size: usize) -> f64 {
    Oracle::new(block_size).hit_rate(prompts)
}

/// The best case for routing: one cache shared by every engine, kept across
/// calls (stages follow one another on a warm fleet). Unbounded, or an LRU of
/// the whole fleet's blocks, for workloads that do not fit.
#[derive(Debug)]
pub struct Oracle {
    block_size: usize,
    seen: lru::LruCache<u64, ()>,
}

impl Oracle {
    pub fn new(block_size: usize) -> Self {
        Self::bounded(block_size, None)
    }

    /// `capacity_blocks`: LRU of that many blocks (None: unbounded).
    pub fn bounded(block_size: usize, capacity_blocks: Option<usize>) -> Self {
        Self {
            block_size: block_size.max(1),
            seen: match capacity_blocks.and_then(std::num::NonZeroUsize::new) {
                Some(cap) => lru::LruCache::new(cap),
                None => lru::LruCache::unbounded(),
            },
        }
    }

    /// Hit rate of `prompts` (in order) given everything seen before; they are
    /// remembered afterwards.
    pub fn hit_rate<P: AsRef<[u32]>>(&mut self, prompts: impl IntoIterator<Item = P>) -> f64 {
        use std::hash::{Hash, Hasher};
        let bs = self.block_size;
        let (mut hits, mut total) = (0usize, 0usize);
        for tokens in prompts {
            let tokens = tokens.as_ref();
            let mut parent = 0u64;
            let chain: Vec<u64> = tokens
                .chunks_exact(bs)
                .map(|block| {
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    (parent, block).hash(&mut h);
                    parent = h.finish();
                    parent
                })
                .collect();
            let max_hit = tokens.len().saturating_sub(1) / bs;
            hits += chain[..max_hit.min(chain.len())]
                .iter()
                .take_while(|h| self.seen.contains(*h))
                .count()
                * bs;
            total += tokens.len();
            for h in chain {
                self.seen.put(h, ());
            }
        }
        if total == 0 {
            0.0
        } else {
            hits as f64 / total as f64
        }
    }
}

#[cfg(test)]
mod oracle_tests {
    use super::oracle_hit_rate;

    #[test]
    fn oracle_counts_full_shared_blocks_only() {
        let a: Vec<u32> = (0..40).collect();
        let mut b: Vec<u32> = (0..32).collect();
        b.extend(100..108);
        // b shares a's first two 16-token blocks; a's third block is partial.
        assert_eq!(oracle_hit_rate(&[a.clone(), b], 16), 32.0 / 80.0);
        // An identical 32-token prompt hits 1 block: the last token is computed.
        let c: Vec<u32> = (0..32).collect();
        assert_eq!(oracle_hit_rate(&[c.clone(), c], 16), 16.0 / 64.0);
        assert_eq!(oracle_hit_rate(&[], 16), 0.0);
    }

    #[test]
    fn oracle_remembers_earlier_stages() {
        let a: Vec<u32> = (0..48).collect();
        let mut o = super::Oracle::new(16);
        assert_eq!(o.hit_rate(std::slice::from_ref(&a)), 0.0);
        // The same prompt in a later stage hits all but its last block.
        assert_eq!(o.hit_rate(std::slice::from_ref(&a)), 32.0 / 48.0);
        assert_eq!(oracle_hit_rate(std::slice::from_ref(&a), 16), 0.0);
    }

    #[test]
    fn a_bounded_oracle_forgets_the_least_recent_blocks() {
        let a: Vec<u32> = (0..48).collect();
        let b: Vec<u32> = (100..148).collect();
        // Room for a's 3 blocks only: b pushes them out.
        let mut o = super::Oracle::bounded(16, Some(3));
        o.hit_rate(std::slice::from_ref(&a));
        o.hit_rate(std::slice::from_ref(&b));
        assert_eq!(o.hit_rate(std::slice::from_ref(&a)), 0.0);
        let mut o = super::Oracle::bounded(16, Some(6));
        o.hit_rate(&[a.clone(), b]);
        assert_eq!(o.hit_rate(std::slice::from_ref(&a)), 32.0 / 48.0);
    }

    #[test]
    fn draws_come_from_the_pool_and_repeat() {
        let pool = super::shared_prefix(4, 5, 8, 4, 1, 3);
        let drawn = super::draw(&pool, 100, 9);
        assert_eq!(drawn.len(), 100);
        let bodies: Vec<String> = pool.iter().map(|s| format!("{:?}", s.body)).collect();
        assert!(drawn
            .iter()
            .all(|d| bodies.contains(&format!("{:?}", d.body))));
        let distinct: std::collections::HashSet<String> =
            drawn.iter().map(|d| format!("{:?}", d.body)).collect();
        assert!(distinct.len() > 10 && distinct.len() <= 20);
        assert!(super::draw(&[], 5, 1).is_empty());
    }
}
