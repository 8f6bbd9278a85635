//! The routers a comparison puts in front of one fleet: kvgate's gateway and
//! the peers (sglang-router, vllm-router, Envoy), each as its own process,
//! started from a spec, checked end to end, and stopped when dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;

pub use crate::envoy::{envoy_config, envoy_epp_config, EppEnvoy};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouterKind {
    Kvgate,
    SglangRouter,
    VllmRouter,
    Envoy,
    /// Envoy with its ext_proc filter calling `kvgate epp` (the Gateway API
    /// Inference Extension's layout), the policy kvgate's.
    EnvoyEpp,
}

/// A router and the policy it runs, e.g. `sglang-router:cache_aware`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RouterSpec {
    pub kind: RouterKind,
    pub policy: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("router spec {0:?}: expected kvgate:POLICY, envoy-epp:POLICY, sglang-router:POLICY, vllm-router:POLICY or envoy")]
    BadSpec(String),
    #[error("{name}: needs {what}")]
    Missing { name: String, what: &'static str },
    #[error("starting {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{name} exited ({status}); log tail:\n{log_tail}")]
    Exited {
        name: String,
        status: String,
        log_tail: String,
    },
    #[error("{name} not ready after {waited:?}: {last}; log tail:\n{log_tail}")]
    NotReady {
        name: String,
        waited: Duration,
        last: String,
        log_tail: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl RouterSpec {
    pub fn parse(s: &str) -> Result<Self, PeerError> {
        let (kind, policy) = s.split_once(':').unwrap_or((s, ""));
        let kind = match kind {
            "kvgate" => RouterKind::Kvgate,
            "sglang-router" | "sglang" => RouterKind::SglangRouter,
            "vllm-router" => RouterKind::VllmRouter,
            "envoy" => RouterKind::Envoy,
            "envoy-epp" => RouterKind::EnvoyEpp,
            _ => return Err(PeerError::BadSpec(s.into())),
        };
        let policy = match (kind, policy) {
            // Envoy runs one static round-robin cluster here.
            (RouterKind::Envoy, "" | "round_robin") => "round_robin",
            (RouterKind::Envoy, _) | (_, "") => return Err(PeerError::BadSpec(s.into())),
            (_, p) => p,
        };
        Ok(Self {
            kind,
            policy: policy.to_string(),
        })
    }

    /// The name in reports: `kvgate precise_prefix`, `envoy round_robin`.
    pub fn name(&self) -> String {
        let kind = match self.kind {
            RouterKind::Kvgate => "kvgate",
            RouterKind::SglangRouter => "sglang-router",
            RouterKind::VllmRouter => "vllm-router",
            RouterKind::Envoy => "envoy",
            RouterKind::EnvoyEpp => "envoy+kvgate-epp",
        };
        format!("{kind} {}", self.policy)
    }

    pub fn is_round_robin(&self) -> bool {
        self.policy == "round_robin"
    }

    /// A cache-aware policy of a peer (what kvgate's precise routing is
    /// measured against).
    pub fn is_peer_cache_aware(&self) -> bool {
        !self.is_kvgate() && self.policy == "cache_aware"
    }

    /// kvgate routes it (as the gateway, or as Envoy's endpoint picker).
    pub fn is_kvgate(&self) -> bool {
        matches!(self.kind, RouterKind::Kvgate | RouterKind::EnvoyEpp)
    }
}

/// Where a router listens and what it needs on disk.
#[derive(Debug, Clone)]
pub struct LaunchContext {
    pub port: u16,
    /// Prometheus / admin port (the peers insist on binding one).
    pub aux_port: u16,
    /// `envoy-epp`: the picker's ext_proc port (its gateway config says so too).
    pub epp_port: u16,
    pub workers: Vec<String>,
    /// Directory with the peers' executables (a venv's `bin`).
    pub peers_bin: Option<PathBuf>,
    /// The kvgate binary and the gateway config written for this run.
    pub kvgate_exe: PathBuf,
    pub kvgate_config: Option<PathBuf>,
    /// Logs and generated configs go here.
    pub scratch: PathBuf,
}

/// A program, its arguments, and files to write before starting it.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchPlan {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub files: Vec<(PathBuf, String)>,
    /// A process started first and stopped with it (Envoy's endpoint picker).
    pub companion: Option<(PathBuf, Vec<String>)>,
}

impl RouterSpec {
    pub fn plan(&self, ctx: &LaunchContext) -> Result<LaunchPlan, PeerError> {
        let peer = |exe: &str| -> Result<PathBuf, PeerError> {
            ctx.peers_bin
                .as_ref()
                .map(|d| d.join(exe))
                .ok_or_else(|| PeerError::Missing {
                    name: self.name(),
                    what: "the peers' bin directory (--peers-bin)",
                })
        };
        let listen = |v: &mut Vec<String>| {
            v.extend([
                "--host".into(),
                "127.0.0.1".into(),
                "--port".into(),
                ctx.port.to_string(),
                "--worker-urls".into(),
            ]);
            v.extend(ctx.workers.iter().cloned());
        };
        let plan = match self.kind {
            RouterKind::Kvgate => {
                let config = ctx.kvgate_config.clone().ok_or(PeerError::Missing {
                    name: self.name(),
                    what: "a gateway config",
                })?;
                LaunchPlan {
                    program: ctx.kvgate_exe.clone(),
                    args: vec![
                        "gateway".into(),
                        "--config".into(),
                        config.display().to_string(),
                        "--log".into(),
                        "warn".into(),
                    ],
                    files: Vec::new(),
                    companion: None,
                }
            }
            RouterKind::SglangRouter => {
                let mut args = vec!["launch".into()];
                listen(&mut args);
                args.extend(
                    [
                        "--policy",
                        &self.policy,
                        "--prometheus-port",
                        &ctx.aux_port.to_string(),
                        "--log-level",
                        "warn",
                    ]
                    .map(String::from),
                );
                LaunchPlan {
                    program: peer("sglang-router")?,
                    args,
                    files: Vec::new(),
                    companion: None,
                }
            }
            RouterKind::VllmRouter => {
                let mut args = Vec::new();
                listen(&mut args);
                args.extend(
                    [
                        "--policy",
                        &self.policy,
                        "--prometheus-port",
                        &ctx.aux_port.to_string(),
                        "--log-level",
                        "warning",
                        "--worker-startup-check-interval",
                        "1",
                    ]
                    .map(String::from),
                );
                LaunchPlan {
                    program: peer("vllm-router")?,
                    args,
                    files: Vec::new(),
                    companion: None,
                }
            }
            RouterKind::Envoy => {
                let config = ctx.scratch.join("envoy.yaml");
                LaunchPlan {
                    program: peer("envoy")?,
                    args: envoy_args(&config, None),
                    files: vec![(config, envoy_config(ctx.port, ctx.aux_port, &ctx.workers))],
                    companion: None,
                }
            }
            RouterKind::EnvoyEpp => {
                let gateway = ctx.kvgate_config.clone().ok_or(PeerError::Missing {
                    name: self.name(),
                    what: "a gateway config",
                })?;
                let config = ctx.scratch.join(format!("envoy-epp-{}.yaml", ctx.port));
                let envoy = EppEnvoy {
                    port: ctx.port,
                    admin_port: ctx.aux_port,
                    epp_port: ctx.epp_port,
                    workers: ctx.workers.clone(),
                    fail_open: false,
                };
                LaunchPlan {
                    program: peer("envoy")?,
                    args: envoy_args(&config, Some(ctx.port)),
                    files: vec![(config, envoy_epp_config(&envoy))],
                    companion: Some((
                        ctx.kvgate_exe.clone(),
                        vec![
                            "epp".into(),
                            "--config".into(),
                            gateway.display().to_string(),
                            "--log".into(),
                            "warn".into(),
                        ],
                    )),
                }
            }
        };
        Ok(plan)
    }
}

/// Envoy's command line for `config`; `base_id` keeps several Envoys on one
/// host apart (their shared-memory regions).
fn envoy_args(config: &Path, base_id: Option<u16>) -> Vec<String> {
    let mut args = vec![
        "--config-path".to_string(),
        config.display().to_string(),
        "--disable-hot-restart".into(),
    ];
    if let Some(id) = base_id {
        args.extend(["--base-id".into(), id.to_string()]);
    }
    args.extend(["--log-level".into(), "warn".into()]);
    args
}

/// A started router; dropping it stops its whole process group.
pub struct RouterProcess {
    pub name: String,
    pub url: String,
    pub log: PathBuf,
    child: tokio::process::Child,
    companion: Option<tokio::process::Child>,
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        for child in std::iter::once(&mut self.child).chain(self.companion.as_mut()) {
            #[cfg(unix)]
            if let Some(pid) = child.id() {
                // The Python launchers may leave helpers: signal the group.
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", "--", &format!("-{pid}")])
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = child.start_kill();
        }
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

impl RouterProcess {
    /// Writes the plan's files and starts the program, output to a log file.
    pub fn spawn(spec: &RouterSpec, ctx: &LaunchContext) -> Result<Self, PeerError> {
        let plan = spec.plan(ctx)?;
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| PeerError::Io { path, source }
        };
        std::fs::create_dir_all(&ctx.scratch).map_err(io(&ctx.scratch))?;
        for (path, text) in &plan.files {
            std::fs::write(path, text).map_err(io(path))?;
        }
        let log = ctx
            .scratch
            .join(format!("{}.log", spec.name().replace(' ', "-")));
        let start = |program: &Path, args: &[String], log: &Path| {
            let out = std::fs::File::create(log).map_err(io(log))?;
            let err = out.try_clone().map_err(io(log))?;
            let mut cmd = tokio::process::Command::new(program);
            cmd.args(args)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .kill_on_drop(true);
            #[cfg(unix)]
            cmd.process_group(0);
            cmd.spawn().map_err(|source| PeerError::Spawn {
                program: program.display().to_string(),
                source,
            })
        };
        let companion = match &plan.companion {
            Some((program, args)) => {
                Some(start(program, args, &log.with_extension("companion.log"))?)
            }
            None => None,
        };
        let child = start(&plan.program, &plan.args, &log)?;
        Ok(Self {
            name: spec.name(),
            url: format!("http://127.0.0.1:{}", ctx.port),
            log,
            child,
            companion,
        })
    }

    /// Waits until a one-token completion goes through the router to a worker.
    pub async fn wait_ready(
        &mut self,
        client: &reqwest::Client,
        model: &str,
        limit: Duration,
    ) -> Result<(), PeerError> {
        let started = Instant::now();
        let mut last = String::from("no attempt");
        while started.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(PeerError::Exited {
                    name: self.name.clone(),
                    status: status.to_string(),
                    log_tail: log_tail(&self.log),
                });
            }
            if let Some(Ok(Some(status))) = self.companion.as_mut().map(|c| c.try_wait()) {
                return Err(PeerError::Exited {
                    name: format!("{}'s companion", self.name),
                    status: status.to_string(),
                    log_tail: log_tail(&self.log.with_extension("companion.log")),
                });
            }
            let probe = client
                .post(format!("{}/v1/completions", self.url))
                .json(
                    &serde_json::json!({"model": model, "prompt": "ready check", "max_tokens": 1}),
                )
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            match probe {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => last = format!("HTTP {}", r.status()),
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Err(PeerError::NotReady {
            name: self.name.clone(),
            waited: limit,
            last,
            log_tail: log_tail(&self.log),
        })
    }
}

/// A port free right now on loopback (the OS picks it).
pub fn free_port() -> Result<u16, PeerError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| PeerError::Io {
            path: "127.0.0.1:0".into(),
            source,
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn ctx() -> LaunchContext {
        LaunchContext {
            port: 30000,
            aux_port: 29100,
            epp_port: 29200,
            workers: vec![
                "http://127.0.0.1:9001".into(),
                "http://127.0.0.1:9002".into(),
            ],
            peers_bin: Some("/venv/bin".into()),
            kvgate_exe: "/bin/kvgate".into(),
            kvgate_config: Some("/tmp/gw.yaml".into()),
            scratch: "/tmp/cmp".into(),
        }
    }

    #[test]
    fn specs_parse_and_name() {
        let s = RouterSpec::parse("sglang-router:cache_aware").unwrap();
        assert_eq!(s.kind, RouterKind::SglangRouter);
        assert_eq!(s.name(), "sglang-router cache_aware");
        assert!(s.is_peer_cache_aware() && !s.is_round_robin());
        assert_eq!(
            RouterSpec::parse("envoy").unwrap().name(),
            "envoy round_robin"
        );
        assert!(!RouterSpec::parse("kvgate:cache_aware")
            .unwrap()
            .is_peer_cache_aware());
        for bad in ["kvgate", "nginx:round_robin", "envoy:least_request"] {
            assert!(RouterSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plans_name_the_workers_policy_and_ports() {
        let c = ctx();
        let p = RouterSpec::parse("vllm-router:cache_aware")
            .unwrap()
            .plan(&c)
            .unwrap();
        assert_eq!(p.program, PathBuf::from("/venv/bin/vllm-router"));
        let joined = p.args.join(" ");
        assert!(joined.contains("--port 30000 --worker-urls http://127.0.0.1:9001 http://127.0.0.1:9002 --policy cache_aware --prometheus-port 29100"), "{joined}");
        let p = RouterSpec::parse("sglang-router:round_robin")
            .unwrap()
            .plan(&c)
            .unwrap();
        assert_eq!(p.args[0], "launch");
        let p = RouterSpec::parse("kvgate:precise_prefix")
            .unwrap()
            .plan(&c)
            .unwrap();
        assert_eq!(p.args[..3], ["gateway", "--config", "/tmp/gw.yaml"]);
        let no_bin = LaunchContext {
            peers_bin: None,
            ..c
        };
        assert!(RouterSpec::parse("envoy").unwrap().plan(&no_bin).is_err());
    }

    #[test]
    fn envoy_config_lists_every_worker_once() {
        let p = RouterSpec::parse("envoy").unwrap().plan(&ctx()).unwrap();
        assert_eq!(p.files.len(), 1);
        let yaml = &p.files[0].1;
        assert!(yaml.contains("port_value: 30000") && yaml.contains("port_value: 29100"));
        assert_eq!(yaml.matches("- endpoint:").count(), 2);
        assert!(yaml.contains("address: 127.0.0.1, port_value: 9002"));
        assert!(yaml.contains("lb_policy: ROUND_ROBIN"));
    }
}
