//! `kvgate audit verify`: checks audit log files offline, from the files
//! alone (plus a checkpoint for the tail, and the key for the macs).

use std::path::PathBuf;

use anyhow::Result;
use kvgate_auth::audit::{self, Checkpoint};

#[derive(clap::Args, Debug)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub cmd: AuditCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum AuditCommand {
    /// Verify an audit log's hash chain (and macs, and checkpoint); exits 1
    /// naming the first bad record.
    Verify(VerifyArgs),
}

#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    /// Log files, oldest first: the rotated ones in name order, then the
    /// current one (`audit.log.0* audit.log`).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// A checkpoint (`<path>.checkpoint`, or `{"seq":N,"hash":"..."}` saved
    /// from the metric): the chain must reach it, so a cut-off tail fails.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// The audit key file: every line's mac is checked too.
    #[arg(long)]
    pub hmac_key_file: Option<PathBuf>,
}

pub fn run(args: AuditArgs) -> Result<()> {
    match args.cmd {
        AuditCommand::Verify(v) => verify(v),
    }
}

fn verify(args: VerifyArgs) -> Result<()> {
    let checkpoint = args
        .checkpoint
        .as_deref()
        .map(Checkpoint::read_file)
        .transpose()?;
    let key = args
        .hmac_key_file
        .as_deref()
        .map(audit::read_key_file)
        .transpose()?;
    let key = key.as_ref().map(|k| k.as_slice());
    match audit::verify(&args.files, checkpoint.as_ref(), key) {
        Ok(s) => {
            let range = match (s.first_seq, s.last_seq) {
                (Some(a), Some(b)) => format!(", seq {a}..{b}"),
                _ => String::new(),
            };
            println!("audit verify: ok, {} records{range}", s.records);
            let mut checked = vec!["hash chain"];
            if s.macs_checked {
                checked.push("macs");
            }
            if checkpoint.is_some() {
                checked.push("checkpoint");
            }
            println!("checked: {}", checked.join(", "));
            if let Some(h) = s.last_hash {
                println!("last hash: {h}");
            }
            Ok(())
        }
        Err(e) => {
            // The error names the file, line and seq; no anyhow backtrace
            // or "Error:" prefix around it.
            eprintln!("audit verify: FAILED: {e}");
            std::process::exit(1);
        }
    }
}
