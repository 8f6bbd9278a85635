//! The contract layer on a simulated fleet, end to end (`scripts/e2e-contracts`):
//! a timing side-channel probe across and within contracts, suspension,
//! rate limits, and an audited load whose chain must verify with one record
//! per request. Prints one summary line
//! `e2e-contracts: auc_same=X auc_cross=Y suspend_ms=N rate_limited=ok
//! audit_records=N audit_requests=N audit_verify=ok` and exits non-zero if any
//! check fails.

mod fleet;
mod load;
mod probe;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Parser;

#[derive(Parser)]
struct Args {
    /// Seconds of audited load (the run: 300).
    #[arg(long, default_value_t = 300)]
    load_secs: u64,
    /// Candidate prefixes probed (half of them cached by the victim). With
    /// 400, a probe at chance lands within 0.5 +- 0.1 with odds of about
    /// 3000 to 1.
    #[arg(long, default_value_t = 400)]
    candidates: usize,
    /// Where the audit log and the report go.
    #[arg(long, default_value = "target/e2e-contracts")]
    work: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.work)?;
    let mut failed = Vec::new();

    let probe = probe::run(&args.work, args.candidates).await?;
    eprintln!(
        "  timing probe: same-contract AUC {:.3}, cross-contract AUC {:.3} ({} candidates, 8-64 tokens)",
        probe.auc_same, probe.auc_cross, args.candidates
    );
    if probe.auc_same < 0.9 {
        failed.push(format!(
            "same-contract probe AUC {:.3} < 0.9: the probe cannot see hits",
            probe.auc_same
        ));
    }
    if (probe.auc_cross - 0.5).abs() > 0.1 {
        failed.push(format!(
            "cross-contract probe AUC {:.3} is not at chance",
            probe.auc_cross
        ));
    }

    let s = load::suspension_and_limits(&args.work).await?;
    eprintln!(
        "  suspension: refused {} ms after the admin call, stream cut: {}, reactivated prompt hit {} tokens at the engine; rate limit: {}",
        s.suspend_ms, s.stream_cut, s.hit_after_reactivation, s.rate_limited
    );
    if s.suspend_ms > 1000 || !s.stream_cut {
        failed.push(format!(
            "suspension took {} ms (stream cut: {})",
            s.suspend_ms, s.stream_cut
        ));
    }
    if s.hit_after_reactivation != 0 {
        failed.push(format!(
            "after reactivation the same prompt hit {} cached tokens",
            s.hit_after_reactivation
        ));
    }
    if !s.rate_limited {
        failed.push("rate limits were not enforced as configured".into());
    }

    let a = load::audited_load(&args.work, Duration::from_secs(args.load_secs)).await?;
    eprintln!(
        "  audited load: {} requests in {} s, {} audit records, {} request records, verify: {}",
        a.requests, args.load_secs, a.records, a.request_records, a.verify
    );
    if a.request_records != a.requests {
        failed.push(format!(
            "{} requests but {} request records",
            a.requests, a.request_records
        ));
    }
    if a.verify != "ok" {
        failed.push(format!("audit verify: {}", a.verify));
    }

    println!(
        "e2e-contracts: auc_same={:.3} auc_cross={:.3} suspend_ms={} rate_limited={} audit_records={} audit_requests={} audit_verify={}",
        probe.auc_same,
        probe.auc_cross,
        s.suspend_ms,
        if s.rate_limited { "ok" } else { "FAILED" },
        a.records,
        a.request_records,
        a.verify,
    );
    if !failed.is_empty() {
        bail!("e2e-contracts failed:\n  {}", failed.join("\n  "));
    }
    Ok(())
}
