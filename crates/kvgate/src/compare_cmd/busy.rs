//! `--busy-check`: waits out other heavy work on the machine and tells a
//! router's runs that were disturbed by it.

use std::sync::Arc;
use std::time::Duration;

use super::progress;

/// Watches `--busy-check`: `seen` turns true whenever the check succeeds.
pub(super) struct BusyWatch {
    check: Option<String>,
    seen: Arc<std::sync::atomic::AtomicBool>,
    _poller: Option<tokio::task::JoinHandle<()>>,
}

async fn busy(check: &str) -> bool {
    tokio::process::Command::new("sh")
        .args(["-c", check])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

impl BusyWatch {
    pub(super) fn start(check: Option<String>) -> Self {
        let seen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let poller = check.clone().map(|c| {
            let seen = seen.clone();
            tokio::spawn(async move {
                loop {
                    if busy(&c).await {
                        seen.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            })
        });
        Self {
            check,
            seen,
            _poller: poller,
        }
    }

    /// Waits until the machine is quiet, then starts a clean window.
    pub(super) async fn wait_quiet(&self) {
        let Some(c) = &self.check else { return };
        let mut told = false;
        while busy(c).await {
            if !told {
                progress(&format!("machine busy ({c}); waiting"));
                told = true;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        self.seen.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the window since `wait_quiet` was disturbed.
    pub(super) fn disturbed(&self) -> bool {
        self.seen.load(std::sync::atomic::Ordering::Relaxed)
    }
}
