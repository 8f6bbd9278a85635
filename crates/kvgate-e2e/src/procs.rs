//! Child processes of the tier (vLLM, kvgate gateway, kvgate sim): each in its
//! own process group, logged to a file, killed with its children on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct Managed {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Managed {
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        std::fs::create_dir_all(log_dir)?;
        let log = log_dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// Whether the process has exited (then its log tail explains why).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM to the whole group, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let group = format!("-{}", self.child.id());
        let kill = |signal: &str| {
            let _ = Command::new("kill")
                .args([signal, "--", &group])
                .stderr(Stdio::null())
                .status();
        };
        kill("-TERM");
        let start = Instant::now();
        while start.elapsed() < grace {
            if self.exited() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        kill("-KILL");
        let _ = self.child.wait();
    }

    /// Polls `url` until it answers 2xx; fails early if the process dies.
    pub async fn wait_ready(&mut self, url: &str, timeout: Duration) -> Result<()> {
        let http = reqwest::Client::new();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.exited() {
                bail!(
                    "{} exited while starting; log tail:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            let ok = http
                .get(url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        bail!(
            "{} not ready at {url} after {timeout:?}; log tail:\n{}",
            self.name,
            self.log_tail(30)
        )
    }
}

impl Drop for Managed {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}
