//! The tier's results: the verdict on them and the one summary line.

use anyhow::Result;
use kvgate_e2e::checks::{BlockParity, CacheTrace, TokenParity};

use crate::families::{FamilyOutcome, TemplateParity};
use crate::timing::TimingProbe;

#[derive(Debug, Default)]
pub(crate) struct Summary {
    pub(crate) tokens: TokenParity,
    pub(crate) blocks: BlockParity,
    pub(crate) salted_blocks: usize,
    pub(crate) hit_rate: f64,
    pub(crate) oracle: f64,
    pub(crate) rr_hit_rate: f64,
    pub(crate) salt_same_hits: bool,
    pub(crate) salt_cross_hits: usize,
    /// Hits of another contract's (JWT or API key) on tenant-a's prompt.
    pub(crate) jwt_cross_hits: usize,
    /// After suspend + reactivate, tenant-a's prompt missed at vLLM.
    pub(crate) suspend_miss: Option<bool>,
    /// The timing side channel through tenant-a's and tenant-b's gateway.
    pub(crate) timing: Option<TimingProbe>,
    pub(crate) evicted_blocks: u64,
    pub(crate) probes: usize,
    pub(crate) probe_mismatches: Vec<String>,
    pub(crate) probes_cached: usize,
    pub(crate) probes_gone: usize,
    pub(crate) gap_replayed: bool,
    pub(crate) restart_purged: bool,
    pub(crate) fidelity: Vec<String>,
    pub(crate) fidelity_run: bool,
    /// vLLM's side of the fidelity script.
    pub(crate) fidelity_vllm: CacheTrace,
    /// Phases 1 and 2 were skipped (`--only-families`).
    pub(crate) only_families: bool,
    /// Families whose template parity ran to the end.
    pub(crate) families: usize,
    pub(crate) template: TemplateParity,
    pub(crate) family_blocks: BlockParity,
    pub(crate) failures: Vec<String>,
}

impl Summary {
    fn resync_ok(&self) -> bool {
        self.probe_mismatches.is_empty()
            && self.probes_cached > 0
            && self.probes_gone > 0
            && self.evicted_blocks > 0
            && self.gap_replayed
            && self.restart_purged
    }

    pub(crate) fn line(&self) -> String {
        format!(
            "e2e-vllm: token_parity={:.3} ({} requests) block_parity={:.3} ({} blocks, {} salted) hit_rate={:.3} oracle={:.3} rr_hit_rate={:.3} salt_cross_hits={} jwt_cross_hits={} suspend_miss={} probe_auc_same={} probe_auc_cross={} resync={} (probes={} evicted_blocks={}) sim_fidelity={} (hits={} stored={} removed={})",
            self.tokens.ratio(),
            self.tokens.total,
            self.blocks.ratio(),
            self.blocks.checked,
            self.salted_blocks,
            self.hit_rate,
            self.oracle,
            self.rr_hit_rate,
            self.salt_cross_hits,
            self.jwt_cross_hits,
            match self.suspend_miss {
                Some(true) => "ok",
                Some(false) => "FAILED",
                None => "not-run",
            },
            self.timing.map_or("not-run".into(), |p| format!("{:.3}", p.auc_same)),
            self.timing.map_or("not-run".into(), |p| format!("{:.3}", p.auc_cross)),
            if self.resync_ok() { "ok" } else { "FAILED" },
            self.probes,
            self.evicted_blocks,
            match (self.fidelity_run, self.fidelity.is_empty()) {
                (true, true) => "ok",
                (true, false) => "FAILED",
                (false, _) => "not-run",
            },
            self.fidelity_vllm.total_hits(),
            self.fidelity_vllm.stored_blocks,
            self.fidelity_vllm.removed_blocks
        ) + &format!(
            " families={} template_parity={}/{} family_block_parity={:.3} ({} blocks)",
            self.families,
            self.template.matched,
            self.template.total,
            self.family_blocks.ratio(),
            self.family_blocks.checked
        )
    }

    /// Adds phase 3's per-family results; a family that aborted is a failure.
    pub(crate) fn record_families(&mut self, outcomes: Vec<Result<FamilyOutcome>>) {
        for o in outcomes {
            match o {
                Ok(o) => {
                    self.families += 1;
                    self.template.add(&o.parity);
                    let room = 12usize.saturating_sub(self.template.mismatches.len());
                    self.template
                        .mismatches
                        .extend(o.parity.mismatches.into_iter().take(room));
                    if let Some(b) = o.blocks {
                        self.family_blocks.found += b.found;
                        self.family_blocks.checked += b.checked;
                        self.family_blocks.generated += b.generated;
                        self.family_blocks.mismatches.extend(b.mismatches);
                    }
                }
                Err(e) => self.failures.push(format!("{e:#}")),
            }
        }
    }

    fn families_verdict(&self, f: &mut Vec<String>) {
        if self.template.total == 0 || self.template.matched < self.template.total {
            f.push(format!(
                "template parity {}/{} over {} families",
                self.template.matched, self.template.total, self.families
            ));
        }
        if self.family_blocks.checked == 0 || self.family_blocks.ratio() < 1.0 {
            f.push(format!(
                "family block parity {}/{}",
                self.family_blocks.found, self.family_blocks.checked
            ));
        }
    }

    pub(crate) fn verdict(&mut self) {
        let mut f = Vec::new();
        self.families_verdict(&mut f);
        if self.only_families {
            self.failures.extend(f);
            return;
        }
        if self.tokens.total < 200 || self.tokens.ratio() < 1.0 {
            f.push(format!("token parity {:?}", self.tokens.mismatches));
        }
        if self.blocks.checked == 0 || self.blocks.ratio() < 1.0 || self.salted_blocks == 0 {
            f.push(format!("block parity {:?}", self.blocks.mismatches));
        }
        if self.hit_rate + 0.005 < self.oracle {
            f.push(format!(
                "precise hit rate {:.3} below vLLM's optimum {:.3}",
                self.hit_rate, self.oracle
            ));
        }
        if self.rr_hit_rate + 0.02 > self.oracle {
            f.push(format!(
                "round_robin reached {:.3} of {:.3}: the workload does not separate policies",
                self.rr_hit_rate, self.oracle
            ));
        }
        if !self.salt_same_hits || self.salt_cross_hits > 0 {
            f.push(format!(
                "salt isolation: same-tenant hit {} cross-tenant hits {}",
                self.salt_same_hits, self.salt_cross_hits
            ));
        }
        if self.jwt_cross_hits > 0 {
            f.push(format!(
                "contracts: {} cross-contract hits on tenant-a's prompt",
                self.jwt_cross_hits
            ));
        }
        if self.suspend_miss == Some(false) {
            f.push("contracts: after suspend + reactivate the prompt still hit at vLLM".into());
        }
        // The same-contract probe is the positive control (the channel is
        // there to be closed): 0.75 is 7 standard deviations above chance
        // at 150 + 150 samples. 1.000 in earlier runs, 0.79-0.88 in the
        // last three on this box, cause not found yet (see timing.rs).
        match self.timing {
            None => f.push("timing probe: not run".into()),
            Some(p) if p.auc_same < PROBE_WORKS_AUC || (p.auc_cross - 0.5).abs() > 0.1 => f.push(format!(
                "timing probe: same-contract AUC {:.3} (needs >= {PROBE_WORKS_AUC}), cross-contract {:.3} (needs 0.5 +- 0.1)",
                p.auc_same, p.auc_cross
            )),
            Some(_) => {}
        }
        if !self.resync_ok() {
            f.push(format!(
                "resync: probe mismatches {:?}, cached/gone probes {}/{}, evicted {}, gap replayed {}, restart purged {}",
                self.probe_mismatches,
                self.probes_cached,
                self.probes_gone,
                self.evicted_blocks,
                self.gap_replayed,
                self.restart_purged
            ));
        }
        if !self.fidelity_run || !self.fidelity.is_empty() {
            f.push(format!("sim fidelity: {:?}", self.fidelity));
        }
        self.failures.extend(f);
    }
}

/// The same-contract AUC below which the timing probe is not working.
const PROBE_WORKS_AUC: f64 = 0.75;
