//! The tier's checkers: pure functions over what the engine published and what
//! the gateway computed, so that each can be shown to fail on a mismatch.

use std::collections::HashMap;

use kvgate_wire::vllm::{BlockStored, EngineHash};

/// Token parity over a corpus: requests whose token ids equal the engine's.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TokenParity {
    pub matched: usize,
    pub total: usize,
    /// A few mismatches, described, for the log.
    pub mismatches: Vec<String>,
}

impl TokenParity {
    /// Records one request: the gateway's ids against the engine's.
    pub fn record(&mut self, name: &str, gateway: &[u32], engine: &[u32]) {
        self.total += 1;
        if gateway == engine {
            self.matched += 1;
            return;
        }
        if self.mismatches.len() < 10 {
            let at = gateway
                .iter()
                .zip(engine)
                .position(|(a, b)| a != b)
                .unwrap_or(gateway.len().min(engine.len()));
            let window = |t: &[u32]| t[at.saturating_sub(3)..(at + 5).min(t.len())].to_vec();
            self.mismatches.push(format!(
                "{name}: lengths gateway {} engine {}, first difference at {at}: gateway {:?} engine {:?}",
                gateway.len(),
                engine.len(),
                window(gateway),
                window(engine)
            ));
        }
    }

    pub fn ratio(&self) -> f64 {
        ratio(self.matched, self.total)
    }
}

fn ratio(n: usize, d: usize) -> f64 {
    if d == 0 {
        0.0
    } else {
        n as f64 / d as f64
    }
}

/// A block an engine reported stored, placed in its chain.
#[derive(Debug, Clone, PartialEq)]
pub struct PlacedBlock {
    /// Block index from the start of the sequence; None if its parent was never seen.
    pub position: Option<usize>,
    pub tokens: Vec<u32>,
    pub block_size: usize,
}

/// Places each stored block at its position in its sequence, by following
/// parent hashes (a block without a parent is block 0). One per engine.
#[derive(Debug, Default)]
pub struct ChainTracker {
    positions: HashMap<EngineHash, usize>,
}

impl ChainTracker {
    pub fn place(&mut self, stored: &BlockStored) -> Vec<PlacedBlock> {
        let bs = stored.block_size as usize;
        let mut next = match stored.parent_block_hash {
            None => Some(0),
            Some(parent) => self.positions.get(&parent).map(|p| p + 1),
        };
        let mut out = Vec::with_capacity(stored.block_hashes.len());
        for (i, hash) in stored.block_hashes.iter().enumerate() {
            let tokens = stored
                .token_ids
                .get(i * bs..(i + 1) * bs)
                .map(<[u32]>::to_vec)
                .unwrap_or_default();
            if let Some(p) = next {
                self.positions.insert(*hash, p);
            }
            out.push(PlacedBlock {
                position: next,
                tokens,
                block_size: bs,
            });
            next = next.map(|p| p + 1);
        }
        out
    }

    /// The engine's cache was cleared: its chains start over.
    pub fn clear(&mut self) {
        self.positions.clear();
    }
}

/// Block parity: of the prompt blocks the engine stored for a request, how
/// many the gateway keyed identically and the index holds for that engine.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BlockParity {
    pub found: usize,
    pub checked: usize,
    /// Blocks holding generated tokens: the gateway never keys those.
    pub generated: usize,
    pub mismatches: Vec<String>,
}

impl BlockParity {
    /// Checks the blocks stored for one request. `block_size` is the size the
    /// gateway keyed with; `held(p)` says whether the index holds the gateway's
    /// key for block `p` on the engine that served the request.
    pub fn record(
        &mut self,
        name: &str,
        stored: &[PlacedBlock],
        prompt: &[u32],
        block_size: usize,
        held: impl Fn(usize) -> bool,
    ) {
        let prompt_blocks = prompt.len() / block_size.max(1);
        for b in stored {
            let problem = match b.position {
                None => Some("block with an unknown parent".to_string()),
                Some(p) if b.block_size == block_size && p >= prompt_blocks => {
                    self.generated += 1;
                    continue;
                }
                Some(p) => {
                    let expected = prompt.get(p * block_size..(p + 1) * block_size);
                    if b.block_size != block_size {
                        Some(format!(
                            "block {p}: engine block size {} vs gateway {block_size}",
                            b.block_size
                        ))
                    } else if expected != Some(b.tokens.as_slice()) {
                        Some(format!("block {p}: tokens differ from the gateway's"))
                    } else if !held(p) {
                        Some(format!(
                            "block {p}: not in the index under the gateway's key"
                        ))
                    } else {
                        None
                    }
                }
            };
            self.checked += 1;
            match problem {
                None => self.found += 1,
                Some(why) => {
                    if self.mismatches.len() < 10 {
                        self.mismatches.push(format!("{name}: {why}"));
                    }
                }
            }
        }
    }

    pub fn ratio(&self) -> f64 {
        ratio(self.found, self.checked)
    }
}

/// Leading blocks held: what a prefix-cache lookup would hit.
pub fn leading_held(held: &[bool]) -> usize {
    held.iter().take_while(|h| **h).count()
}

/// One scripted run's cache behaviour, compared between vLLM and the sim.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CacheTrace {
    /// Prefix-cache hit tokens of each request, in order.
    pub hits_per_request: Vec<u64>,
    pub stored_blocks: u64,
    pub removed_blocks: u64,
}

impl CacheTrace {
    pub fn total_hits(&self) -> u64 {
        self.hits_per_request.iter().sum()
    }

    /// Differences between two traces, empty when they agree.
    pub fn differences(&self, other: &CacheTrace) -> Vec<String> {
        let mut out = Vec::new();
        if self.total_hits() != other.total_hits() {
            out.push(format!(
                "prefix_cache_hits {} vs {}",
                self.total_hits(),
                other.total_hits()
            ));
        }
        if let Some(i) = self
            .hits_per_request
            .iter()
            .zip(&other.hits_per_request)
            .position(|(a, b)| a != b)
        {
            out.push(format!(
                "request {i}: hits {} vs {}",
                self.hits_per_request[i], other.hits_per_request[i]
            ));
        }
        if self.hits_per_request.len() != other.hits_per_request.len() {
            out.push(format!(
                "requests {} vs {}",
                self.hits_per_request.len(),
                other.hits_per_request.len()
            ));
        }
        if self.stored_blocks != other.stored_blocks {
            out.push(format!(
                "BlockStored blocks {} vs {}",
                self.stored_blocks, other.stored_blocks
            ));
        }
        if self.removed_blocks != other.removed_blocks {
            out.push(format!(
                "BlockRemoved blocks {} vs {}",
                self.removed_blocks, other.removed_blocks
            ));
        }
        out
    }
}

/// A timing probe's ROC AUC over `(ttft, cached)` samples: the chance that a
/// cached candidate's TTFT is below an uncached one's (ties count
/// half): 1.0 is a perfect probe, 0.5 chance.
pub fn roc_auc(samples: &[(f64, bool)]) -> f64 {
    let pos: Vec<f64> = samples.iter().filter(|s| s.1).map(|s| s.0).collect();
    let neg: Vec<f64> = samples.iter().filter(|s| !s.1).map(|s| s.0).collect();
    if pos.is_empty() || neg.is_empty() {
        return 0.5;
    }
    let mut wins = 0.0;
    for p in &pos {
        for n in &neg {
            wins += if p < n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (pos.len() * neg.len()) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(hashes: &[u64], parent: Option<u64>, tokens: &[u32], bs: u32) -> BlockStored {
        BlockStored::on_gpu(hashes.to_vec(), parent, tokens.to_vec(), bs)
    }

    /// A 100-token prompt at block size 32: three prompt blocks stored in two
    /// events (the second chained to the first), then one generated block.
    fn scenario(bs: u32) -> (Vec<PlacedBlock>, Vec<u32>) {
        let prompt: Vec<u32> = (0..100).collect();
        let b = bs as usize;
        let mut chain = ChainTracker::default();
        let mut placed = chain.place(&stored(&[11], None, &prompt[..b], bs));
        placed.extend(chain.place(&stored(&[12, 13], Some(11), &prompt[b..3 * b], bs)));
        let mut generated = prompt[3 * b..].to_vec();
        generated.resize(b, 7);
        placed.extend(chain.place(&stored(&[14], Some(13), &generated, bs)));
        (placed, prompt)
    }

    #[test]
    fn block_parity_is_whole_when_keys_and_index_agree() {
        let (placed, prompt) = scenario(32);
        let mut parity = BlockParity::default();
        parity.record("r", &placed, &prompt, 32, |_| true);
        assert_eq!((parity.found, parity.checked, parity.generated), (3, 3, 1));
        assert_eq!(parity.ratio(), 1.0);
        assert!(parity.mismatches.is_empty());
    }

    #[test]
    fn block_parity_breaks_on_a_wrong_block_size() {
        let (placed, prompt) = scenario(32);
        let mut parity = BlockParity::default();
        // The gateway keyed with 16-token blocks; the engine stored 32-token ones.
        parity.record("r", &placed, &prompt, 16, |_| true);
        assert!(parity.ratio() < 1.0, "{parity:?}");
        assert!(parity.mismatches[0].contains("block size"), "{parity:?}");
    }

    #[test]
    fn block_parity_breaks_on_different_tokens_or_missing_index_entries() {
        let (placed, mut prompt) = scenario(32);
        let mut parity = BlockParity::default();
        parity.record("r", &placed, &prompt, 32, |p| p != 1);
        assert_eq!((parity.found, parity.checked), (2, 3));
        assert!(parity.mismatches[0].contains("not in the index"));

        prompt[40] += 1; // e.g. a chat template rendered one token differently
        let mut parity = BlockParity::default();
        parity.record("r", &placed, &prompt, 32, |_| true);
        assert_eq!((parity.found, parity.checked), (2, 3));
        assert!(parity.mismatches[0].contains("tokens differ"));
    }

    #[test]
    fn orphan_blocks_count_as_failures() {
        let mut chain = ChainTracker::default();
        let prompt: Vec<u32> = (0..64).collect();
        let placed = chain.place(&stored(&[5], Some(99), &prompt[32..], 32));
        assert_eq!(placed[0].position, None);
        let mut parity = BlockParity::default();
        parity.record("r", &placed, &prompt, 32, |_| true);
        assert_eq!((parity.found, parity.checked), (0, 1));
    }

    #[test]
    fn token_parity_reports_the_first_difference() {
        let mut t = TokenParity::default();
        t.record("same", &[1, 2, 3], &[1, 2, 3]);
        t.record("differs", &[1, 2, 3, 4], &[1, 2, 9, 4]);
        t.record("shorter", &[1, 2], &[1, 2, 3]);
        assert_eq!((t.matched, t.total), (1, 3));
        assert!(t.mismatches[0].contains("first difference at 2"), "{t:?}");
        assert!(
            t.mismatches[1].contains("lengths gateway 2 engine 3"),
            "{t:?}"
        );
        assert!(t.ratio() < 0.34);
    }

    #[test]
    fn traces_compare_hits_and_event_counts() {
        let a = CacheTrace {
            hits_per_request: vec![0, 64, 32],
            stored_blocks: 10,
            removed_blocks: 2,
        };
        assert!(a.differences(&a.clone()).is_empty());
        let b = CacheTrace {
            hits_per_request: vec![0, 64, 0],
            removed_blocks: 3,
            ..a.clone()
        };
        let d = a.differences(&b);
        assert_eq!(d.len(), 3, "{d:?}");
        assert!(d[1].starts_with("request 2"));
        assert_eq!(leading_held(&[true, true, false, true]), 2);
    }

    #[test]
    fn roc_auc_is_one_for_a_perfect_probe_and_half_for_none() {
        let perfect = [(1.0, true), (2.0, true), (3.0, false), (4.0, false)];
        assert_eq!(roc_auc(&perfect), 1.0);
        let inverted = [(3.0, true), (4.0, true), (1.0, false), (2.0, false)];
        assert_eq!(roc_auc(&inverted), 0.0);
        let tied = [(1.0, true), (1.0, false)];
        assert_eq!(roc_auc(&tied), 0.5);
    }
}
