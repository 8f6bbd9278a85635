//! `kvgate index` configuration: YAML file, then environment, then flags.
//!
//! Every default lives here or in the library that owns the setting
//! (`kvgate_index::IndexConfig::default`, `kvgate_indexer::api::DEFAULT_TIER_WEIGHTS`).

use std::path::Path;

use anyhow::{bail, Context, Result};
use kvgate_index::IndexConfig;
use kvgate_indexer::EventSource;
use serde::Deserialize;

pub const DEFAULT_INDEX_LISTEN: &str = "0.0.0.0:8090";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IndexServiceConfig {
    /// Address of the HTTP API (`/v1/locality`, `/v1/index/dump`, `/metrics`).
    pub listen: String,
    /// Secret for block keys; replicas sharing dumps or gateways must share it.
    /// Unset: a random per-process secret. Env: `KVGATE_KEY_SECRET`.
    pub key_secret: Option<String>,
    pub index: IndexConfig,
    /// Engines to subscribe to.
    pub sources: Vec<EventSource>,
    /// How often TTL and stale-grace expiry run.
    pub expire_interval_secs: u64,
    /// Model name -> directory with tokenizer.json / tokenizer_config.json, for
    /// `text` and `messages` locality queries.
    pub tokenizers: std::collections::BTreeMap<String, String>,
    /// Use the embedded (Qwen) tokenizer for models not listed above.
    pub embedded_tokenizer_fallback: bool,
}

impl Default for IndexServiceConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_INDEX_LISTEN.to_string(),
            key_secret: None,
            index: IndexConfig::default(),
            sources: Vec::new(),
            expire_interval_secs: 1,
            tokenizers: Default::default(),
            embedded_tokenizer_fallback: false,
        }
    }
}

/// Flag overrides, applied last.
#[derive(Debug, Default, Clone)]
pub struct IndexOverrides {
    pub listen: Option<String>,
    pub max_tracked_blocks: Option<usize>,
    pub sources: Vec<String>,
}

impl IndexServiceConfig {
    pub fn load(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        flags: &IndexOverrides,
    ) -> Result<Self> {
        let mut cfg = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config {}", p.display()))?;
                serde_yaml::from_str(&text)
                    .with_context(|| format!("parsing config {}", p.display()))?
            }
            None => Self::default(),
        };
        if let Some(v) = env("KVGATE_LISTEN") {
            cfg.listen = v;
        }
        if let Some(v) = env("KVGATE_KEY_SECRET") {
            cfg.key_secret = Some(v);
        }
        if let Some(v) = env("KVGATE_MAX_TRACKED_BLOCKS") {
            cfg.index.max_tracked_blocks = v
                .parse()
                .with_context(|| format!("KVGATE_MAX_TRACKED_BLOCKS={v:?}"))?;
        }
        if let Some(v) = &flags.listen {
            cfg.listen = v.clone();
        }
        if let Some(v) = flags.max_tracked_blocks {
            cfg.index.max_tracked_blocks = v;
        }
        for s in &flags.sources {
            cfg.sources.push(parse_source_flag(s)?);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        if self.index.max_tracked_blocks == 0 {
            bail!("index.max_tracked_blocks must be > 0");
        }
        let mut names: Vec<&str> = self.sources.iter().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            bail!("source {:?} is listed twice", w[0]);
        }
        for s in &self.sources {
            if s.block_size == 0 {
                bail!("source {:?}: block_size must be > 0", s.name);
            }
            if !s.events.starts_with("tcp://") && !s.events.starts_with("ipc://") {
                bail!(
                    "source {:?}: events endpoint {:?} is not tcp:// or ipc://",
                    s.name,
                    s.events
                );
            }
        }
        Ok(())
    }
}

/// `--source name=URL,model=M,block_size=16,events=tcp://..[,replay=tcp://..][,topic=kv][,bind=true]`
pub fn parse_source_flag(s: &str) -> Result<EventSource> {
    let mut src = EventSource {
        name: String::new(),
        model: String::new(),
        block_size: 0,
        events: String::new(),
        replay: None,
        topic: String::new(),
        bind: false,
    };
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .with_context(|| format!("--source part {part:?} is not key=value"))?;
        match k {
            "name" => src.name = v.to_string(),
            "model" => src.model = v.to_string(),
            "block_size" => {
                src.block_size = v.parse().with_context(|| format!("block_size={v:?}"))?
            }
            "events" => src.events = v.to_string(),
            "replay" => src.replay = Some(v.to_string()),
            "topic" => src.topic = v.to_string(),
            "bind" => src.bind = v.parse().with_context(|| format!("bind={v:?}"))?,
            other => bail!("--source: unknown key {other:?}"),
        }
    }
    for (what, empty) in [
        ("name", src.name.is_empty()),
        ("model", src.model.is_empty()),
        ("events", src.events.is_empty()),
    ] {
        if empty {
            bail!("--source {s:?}: missing {what}=");
        }
    }
    Ok(src)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.yaml");
        std::fs::write(
            &p,
            "listen: 127.0.0.1:1\nindex:\n  max_tracked_blocks: 10\n  ttl_secs: 5\nsources:\n  - name: a\n    model: m\n    block_size: 16\n    events: tcp://127.0.0.1:5557\n",
        )
        .unwrap();
        let env = |k: &str| match k {
            "KVGATE_LISTEN" => Some("127.0.0.1:2".to_string()),
            "KVGATE_MAX_TRACKED_BLOCKS" => Some("20".to_string()),
            _ => None,
        };
        let cfg = IndexServiceConfig::load(Some(&p), env, &IndexOverrides::default()).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:2");
        assert_eq!(cfg.index.max_tracked_blocks, 20);
        assert_eq!(cfg.index.ttl_secs, Some(5));
        assert_eq!(cfg.sources.len(), 1);
        let flags = IndexOverrides {
            listen: Some("127.0.0.1:3".into()),
            max_tracked_blocks: Some(30),
            sources: vec!["name=b,model=m,block_size=32,events=tcp://127.0.0.1:6000,replay=tcp://127.0.0.1:6001".into()],
        };
        let cfg = IndexServiceConfig::load(Some(&p), env, &flags).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:3");
        assert_eq!(cfg.index.max_tracked_blocks, 30);
        assert_eq!(
            cfg.sources[1].replay.as_deref(),
            Some("tcp://127.0.0.1:6001")
        );
    }

    #[test]
    fn bad_config_is_a_clear_error() {
        let none = |_: &str| None;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.yaml");
        std::fs::write(&p, "listen: x\nbogus: 1\n").unwrap();
        let e = IndexServiceConfig::load(Some(&p), none, &IndexOverrides::default()).unwrap_err();
        assert!(format!("{e:#}").contains("bogus"), "{e:#}");
        for bad in [
            "name=a",
            "name=a,model=m,block_size=x,events=tcp://h:1",
            "name=a,model=m,block_size=0,events=tcp://h:1",
            "nokey",
        ] {
            let flags = IndexOverrides {
                sources: vec![bad.into()],
                ..Default::default()
            };
            assert!(
                IndexServiceConfig::load(None, none, &flags).is_err(),
                "{bad}"
            );
        }
        let env = |_: &str| Some("many".to_string());
        assert!(IndexServiceConfig::load(None, env, &IndexOverrides::default()).is_err());
    }
}

/// `kvgate gateway` flag overrides, applied after the file and the environment.
#[derive(Debug, Default, Clone)]
pub struct GatewayOverrides {
    pub listen: Option<String>,
    pub policy: Option<String>,
    /// `url=http://h:p,model=m,block_size=16[,events=tcp://h:p][,replay=tcp://h:p]`
    pub endpoints: Vec<String>,
}

pub fn load_gateway_config(
    path: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
    flags: &GatewayOverrides,
) -> Result<kvgate_gateway::GatewayConfig> {
    let mut cfg: kvgate_gateway::GatewayConfig = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading config {}", p.display()))?;
            serde_yaml::from_str(&text)
                .with_context(|| format!("parsing config {}", p.display()))?
        }
        None => Default::default(),
    };
    if let Some(v) = env("KVGATE_LISTEN") {
        cfg.listen = v;
    }
    if let Some(v) = env("KVGATE_KEY_SECRET") {
        cfg.key_secret = Some(v);
    }
    if let Some(v) = env("KVGATE_SALT_SECRET") {
        cfg.tenancy.salt_secret = Some(v);
    }
    if let Some(v) = env("KVGATE_POLICY") {
        cfg.router.policy = parse_policy(&v)?;
    }
    if let Some(v) = &flags.listen {
        cfg.listen = v.clone();
    }
    if let Some(v) = &flags.policy {
        cfg.router.policy = parse_policy(v)?;
    }
    for e in &flags.endpoints {
        cfg.endpoints.push(parse_endpoint_flag(e)?);
    }
    for e in &cfg.endpoints {
        if e.block_size == 0 {
            bail!("endpoint {:?}: block_size must be > 0", e.url);
        }
        if e.models.is_empty() {
            bail!("endpoint {:?}: at least one model is required", e.url);
        }
        if !e.url.starts_with("http://") && !e.url.starts_with("https://") {
            bail!(
                "endpoint {:?}: url must start with http:// or https://",
                e.url
            );
        }
    }
    Ok(cfg)
}

/// A registered policy's name; the error lists the registered ones.
pub fn parse_policy(s: &str) -> Result<kvgate_router::Policy> {
    Ok(s.trim().parse()?)
}

fn parse_endpoint_flag(s: &str) -> Result<kvgate_gateway::EndpointConfig> {
    let mut e = kvgate_gateway::EndpointConfig {
        url: String::new(),
        models: Vec::new(),
        adapters: Vec::new(),
        block_size: 0,
        events: None,
        replay: None,
        topic: String::new(),
        bind: false,
    };
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .with_context(|| format!("--endpoint part {part:?} is not key=value"))?;
        match k {
            "url" => e.url = v.to_string(),
            "model" => e.models.push(v.to_string()),
            "adapter" => e.adapters.push(v.to_string()),
            "block_size" => {
                e.block_size = v.parse().with_context(|| format!("block_size={v:?}"))?
            }
            "events" => e.events = Some(v.to_string()),
            "replay" => e.replay = Some(v.to_string()),
            "topic" => e.topic = v.to_string(),
            "bind" => e.bind = v.parse().with_context(|| format!("bind={v:?}"))?,
            other => bail!("--endpoint: unknown key {other:?}"),
        }
    }
    Ok(e)
}

#[cfg(test)]
mod gateway_tests {
    use super::*;

    #[test]
    fn gateway_config_layers_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.yaml");
        std::fs::write(
            &p,
            "listen: 127.0.0.1:1\nrouter:\n  policy: round_robin\nendpoints:\n  - url: http://127.0.0.1:8000\n    models: [m]\n    block_size: 16\n",
        )
        .unwrap();
        let env = |k: &str| (k == "KVGATE_POLICY").then(|| "least_load".to_string());
        let flags = GatewayOverrides {
            listen: Some("127.0.0.1:2".into()),
            policy: None,
            endpoints: vec![
                "url=http://127.0.0.1:8001,model=m,block_size=32,events=tcp://127.0.0.1:5557"
                    .into(),
            ],
        };
        let cfg = load_gateway_config(Some(&p), env, &flags).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:2");
        assert_eq!(cfg.router.policy, kvgate_router::Policy::LeastLoad);
        assert_eq!(cfg.endpoints.len(), 2);
        assert_eq!(
            cfg.endpoints[1].events.as_deref(),
            Some("tcp://127.0.0.1:5557")
        );
        let none = |_: &str| None;
        for bad in [
            "url=http://h,block_size=16",
            "url=h:1,model=m,block_size=16",
            "url=http://h,model=m,block_size=0",
            "x",
        ] {
            let flags = GatewayOverrides {
                endpoints: vec![bad.into()],
                ..Default::default()
            };
            assert!(load_gateway_config(None, none, &flags).is_err(), "{bad}");
        }
        let flags = GatewayOverrides {
            policy: Some("fastest".into()),
            ..Default::default()
        };
        let err = load_gateway_config(None, none, &flags)
            .unwrap_err()
            .to_string();
        for name in kvgate_router::policy_names() {
            assert!(err.contains(name), "{err}");
            assert_eq!(parse_policy(name).unwrap().name(), name);
        }
    }
}
