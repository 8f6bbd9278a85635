//! Every subcommand's configuration loads one way: the YAML file (or the
//! config's defaults), then environment variables, then flags, then the
//! config's own `validate()`. Defaults live in the library that owns each
//! setting; this module only layers.

use std::path::Path;

use anyhow::{bail, Context, Result};
use kvgate_fleet::EndpointConfig;
use kvgate_gateway::GatewayConfig;
use kvgate_index::IndexConfig;
use kvgate_sim::fleet::SimConfig;
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// One environment variable and how it sets a config.
pub type EnvOverride<C> = (&'static str, fn(&mut C, &str) -> Result<()>);

/// A subcommand's configuration.
pub trait LayeredConfig: DeserializeOwned + Default + 'static {
    /// The environment variables it reads, applied after the file.
    const ENV: &'static [EnvOverride<Self>];
    fn validate(&self) -> Result<()>;
}

/// File (or defaults), then environment, then `flags`, then validation.
pub fn load<C: LayeredConfig>(
    path: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
    flags: impl FnOnce(&mut C) -> Result<()>,
) -> Result<C> {
    let mut cfg = match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading config {}", p.display()))?;
            serde_yaml::from_str(&text)
                .with_context(|| format!("parsing config {}", p.display()))?
        }
        None => C::default(),
    };
    for (var, apply) in C::ENV {
        if let Some(v) = env(var) {
            apply(&mut cfg, &v).with_context(|| format!("{var}={v:?}"))?;
        }
    }
    flags(&mut cfg)?;
    cfg.validate()?;
    Ok(cfg)
}

fn parse<T: std::str::FromStr>(v: &str) -> Result<T>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    Ok(v.parse()?)
}

fn set(slot: &mut String, v: &str) -> Result<()> {
    *slot = v.to_string();
    Ok(())
}

fn set_some(slot: &mut Option<String>, v: &str) -> Result<()> {
    *slot = Some(v.to_string());
    Ok(())
}

fn set_parsed<T: std::str::FromStr>(slot: &mut T, v: &str) -> Result<()>
where
    T::Err: std::error::Error + Send + Sync + 'static,
{
    *slot = parse(v)?;
    Ok(())
}

/// `--endpoint`/`--source` values, appended after the file's.
pub fn endpoint_flags(cfg: &mut Vec<EndpointConfig>, flags: &[String]) -> Result<()> {
    for f in flags {
        cfg.push(EndpointConfig::parse_flag(f).with_context(|| format!("endpoint flag {f:?}"))?);
    }
    Ok(())
}

pub const DEFAULT_INDEX_LISTEN: &str = "0.0.0.0:8090";

/// `kvgate index`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IndexServiceConfig {
    /// Address of the HTTP API (`/v1/locality`, `/v1/index/dump`, `/metrics`).
    pub listen: String,
    /// Address of the gRPC locality API (`kvgate.index.v1.Locality` and
    /// `Scorer`, see `kvgate_indexer::grpc`, plus gRPC health); plaintext.
    /// Unset: not served.
    pub grpc_listen: Option<String>,
    /// TLS 1.3 on the API listener; see `kvgate_tls::TlsConfig`.
    pub tls: Option<kvgate_tls::TlsConfig>,
    /// Secret for block keys; replicas sharing dumps or gateways must share it.
    /// Unset: a random per-process secret.
    pub key_secret: Option<String>,
    pub index: IndexConfig,
    /// Engines to subscribe to (each needs `events`).
    pub sources: Vec<EndpointConfig>,
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
            grpc_listen: None,
            tls: None,
            key_secret: None,
            index: IndexConfig::default(),
            sources: Vec::new(),
            expire_interval_secs: 1,
            tokenizers: Default::default(),
            embedded_tokenizer_fallback: false,
        }
    }
}

impl LayeredConfig for IndexServiceConfig {
    const ENV: &'static [EnvOverride<Self>] = &[
        ("KVGATE_LISTEN", |c, v| set(&mut c.listen, v)),
        ("KVGATE_GRPC_LISTEN", |c, v| set_some(&mut c.grpc_listen, v)),
        ("KVGATE_TLS_CERT_FILE", |c, v| {
            tls_file(&mut c.tls, TlsFile::Cert, v)
        }),
        ("KVGATE_TLS_KEY_FILE", |c, v| {
            tls_file(&mut c.tls, TlsFile::Key, v)
        }),
        ("KVGATE_TLS_CLIENT_CA_FILE", |c, v| {
            tls_file(&mut c.tls, TlsFile::ClientCa, v)
        }),
        ("KVGATE_KEY_SECRET", |c, v| set_some(&mut c.key_secret, v)),
        ("KVGATE_MAX_TRACKED_BLOCKS", |c, v| {
            set_parsed(&mut c.index.max_tracked_blocks, v)
        }),
    ];

    fn validate(&self) -> Result<()> {
        if let Some(t) = &self.tls {
            t.validate()?;
            // A plaintext gRPC port next to a TLS (maybe mTLS) HTTP API would
            // serve the same answers without either.
            if self.grpc_listen.is_some() {
                bail!("grpc_listen is plaintext and cannot be combined with tls");
            }
        }
        if self.grpc_listen.as_deref().is_some_and(str::is_empty) {
            bail!("grpc_listen must be an address (host:port) or unset");
        }
        if self.index.max_tracked_blocks == 0 {
            bail!("index.max_tracked_blocks must be > 0");
        }
        kvgate_fleet::validate_all(&self.sources)?;
        if let Some(s) = self.sources.iter().find(|s| s.events.is_none()) {
            bail!("source {:?}: events is required", s.url);
        }
        Ok(())
    }
}

impl LayeredConfig for GatewayConfig {
    const ENV: &'static [EnvOverride<Self>] = &[
        ("KVGATE_LISTEN", |c, v| set(&mut c.listen, v)),
        ("KVGATE_TLS_CERT_FILE", |c, v| {
            tls_file(&mut c.tls, TlsFile::Cert, v)
        }),
        ("KVGATE_TLS_KEY_FILE", |c, v| {
            tls_file(&mut c.tls, TlsFile::Key, v)
        }),
        ("KVGATE_TLS_CLIENT_CA_FILE", |c, v| {
            tls_file(&mut c.tls, TlsFile::ClientCa, v)
        }),
        ("KVGATE_KEY_SECRET", |c, v| set_some(&mut c.key_secret, v)),
        ("KVGATE_POLICY", |c, v| {
            c.router.policy = parse_policy(v)?;
            Ok(())
        }),
        ("KVGATE_EPP_LISTEN", |c, v| set(&mut c.epp_listen, v)),
    ];

    fn validate(&self) -> Result<()> {
        Ok(GatewayConfig::validate(self)?)
    }
}

/// Which file of a listener's TLS an env var names.
enum TlsFile {
    Cert,
    Key,
    ClientCa,
}

/// `KVGATE_TLS_*`: sets one file of the listener's TLS, turning TLS on.
fn tls_file(tls: &mut Option<kvgate_tls::TlsConfig>, which: TlsFile, v: &str) -> Result<()> {
    let t = tls.get_or_insert_with(|| kvgate_tls::TlsConfig::new("", ""));
    let path = std::path::PathBuf::from(v);
    match which {
        TlsFile::Cert => t.cert_file = path,
        TlsFile::Key => t.key_file = path,
        TlsFile::ClientCa => t.client_ca_file = Some(path),
    }
    Ok(())
}

impl LayeredConfig for kvgate_store::StoreConfig {
    const ENV: &'static [EnvOverride<Self>] = &[
        ("KVGATE_LISTEN", |c, v| set(&mut c.listen, v)),
        ("KVGATE_ADMIN_LISTEN", |c, v| set(&mut c.admin_listen, v)),
        ("KVGATE_STORE_MEMORY_BYTES", |c, v| {
            set_parsed(&mut c.memory_bytes, v)
        }),
        ("KVGATE_STORE_REDIS_CA_FILE", |c, v| {
            redis_tls_file(c, |t| &mut t.ca_file, v)
        }),
        ("KVGATE_STORE_REDIS_CERT_FILE", |c, v| {
            redis_tls_file(c, |t| &mut t.cert_file, v)
        }),
        ("KVGATE_STORE_REDIS_KEY_FILE", |c, v| {
            redis_tls_file(c, |t| &mut t.key_file, v)
        }),
    ];

    fn validate(&self) -> Result<()> {
        Ok(kvgate_store::StoreConfig::validate(self)?)
    }
}

/// `KVGATE_STORE_REDIS_*_FILE`: one file of the Redis tier's TLS (the
/// `redis:` block itself comes from the file: it needs `max_bytes`).
fn redis_tls_file(
    c: &mut kvgate_store::StoreConfig,
    slot: fn(&mut kvgate_store::RedisTlsConfig) -> &mut Option<std::path::PathBuf>,
    v: &str,
) -> Result<()> {
    let Some(r) = c.redis.as_mut() else {
        bail!("a Redis TLS file needs a redis: block in the store's config");
    };
    *slot(r.tls.get_or_insert_with(Default::default)) = Some(v.into());
    Ok(())
}

impl LayeredConfig for SimConfig {
    const ENV: &'static [EnvOverride<Self>] = &[
        ("KVGATE_SIM_HOST", |c, v| {
            c.listen = with_host(&c.listen, v);
            Ok(())
        }),
        ("KVGATE_SIM_PORT", |c, v| {
            c.listen = with_port(&c.listen, parse(v)?);
            Ok(())
        }),
        ("KVGATE_SIM_TIME_SCALE", |c, v| {
            set_parsed(&mut c.engine.time_scale, v)
        }),
    ];

    fn validate(&self) -> Result<()> {
        Ok(SimConfig::validate(self)?)
    }
}

/// `host:port` with the host replaced.
pub fn with_host(listen: &str, host: &str) -> String {
    let port = listen.rsplit_once(':').map_or("8000", |(_, p)| p);
    format!("{host}:{port}")
}

/// `host:port` with the port replaced.
pub fn with_port(listen: &str, port: u16) -> String {
    let host = listen.rsplit_once(':').map_or("127.0.0.1", |(h, _)| h);
    format!("{host}:{port}")
}

/// A registered policy's name; the error lists the registered ones.
pub fn parse_policy(s: &str) -> Result<kvgate_router::Policy> {
    Ok(s.trim().parse()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn index_flags(
        listen: Option<&str>,
        max: Option<usize>,
        sources: &[&str],
    ) -> impl FnOnce(&mut IndexServiceConfig) -> Result<()> {
        let listen = listen.map(str::to_string);
        let sources: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
        move |c| {
            if let Some(l) = listen {
                c.listen = l;
            }
            if let Some(m) = max {
                c.index.max_tracked_blocks = m;
            }
            endpoint_flags(&mut c.sources, &sources)
        }
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.yaml");
        std::fs::write(
            &p,
            "listen: 127.0.0.1:1\nindex:\n  max_tracked_blocks: 10\n  ttl_secs: 5\nsources:\n  - name: http://a:8000\n    model: m\n    block_size: 16\n    events: tcp://127.0.0.1:5557\n",
        )
        .unwrap();
        let env = |k: &str| match k {
            "KVGATE_LISTEN" => Some("127.0.0.1:2".to_string()),
            "KVGATE_MAX_TRACKED_BLOCKS" => Some("20".to_string()),
            _ => None,
        };
        let cfg: IndexServiceConfig = load(Some(&p), env, index_flags(None, None, &[])).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:2");
        assert_eq!(cfg.grpc_listen, None, "gRPC is off unless set");
        assert_eq!(cfg.index.max_tracked_blocks, 20);
        assert_eq!(cfg.index.ttl_secs, Some(5));
        assert_eq!(cfg.sources.len(), 1);
        let flags = index_flags(
            Some("127.0.0.1:3"),
            Some(30),
            &["name=http://b:8000,model=m,block_size=32,events=tcp://127.0.0.1:6000,replay=tcp://127.0.0.1:6001"],
        );
        let cfg: IndexServiceConfig = load(Some(&p), env, flags).unwrap();
        assert_eq!(cfg.listen, "127.0.0.1:3");
        assert_eq!(cfg.index.max_tracked_blocks, 30);
        assert_eq!(
            cfg.sources[1].replay.as_deref(),
            Some("tcp://127.0.0.1:6001")
        );
    }

    #[test]
    fn grpc_listen_comes_from_the_file_or_the_env_and_is_plaintext_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.yaml");
        std::fs::write(&p, "grpc_listen: 127.0.0.1:9003\n").unwrap();
        let none = |_: &str| None;
        let cfg: IndexServiceConfig = load(Some(&p), none, |_| Ok(())).unwrap();
        assert_eq!(cfg.grpc_listen.as_deref(), Some("127.0.0.1:9003"));
        let env = |k: &str| (k == "KVGATE_GRPC_LISTEN").then(|| "127.0.0.1:9004".to_string());
        let cfg: IndexServiceConfig = load(Some(&p), env, |_| Ok(())).unwrap();
        assert_eq!(cfg.grpc_listen.as_deref(), Some("127.0.0.1:9004"));
        let cfg: IndexServiceConfig = load(None, env, |c: &mut IndexServiceConfig| {
            c.grpc_listen = Some("127.0.0.1:9005".into());
            Ok(())
        })
        .unwrap();
        assert_eq!(cfg.grpc_listen.as_deref(), Some("127.0.0.1:9005"));
        let with_tls = |k: &str| match k {
            "KVGATE_GRPC_LISTEN" => Some("127.0.0.1:9004".to_string()),
            "KVGATE_TLS_CERT_FILE" => Some("/tls/tls.crt".to_string()),
            "KVGATE_TLS_KEY_FILE" => Some("/tls/tls.key".to_string()),
            _ => None,
        };
        let e = load::<IndexServiceConfig>(None, with_tls, |_| Ok(())).unwrap_err();
        assert!(format!("{e:#}").contains("grpc_listen"), "{e:#}");
        let empty = |k: &str| (k == "KVGATE_GRPC_LISTEN").then(String::new);
        let e = load::<IndexServiceConfig>(None, empty, |_| Ok(())).unwrap_err();
        assert!(format!("{e:#}").contains("grpc_listen"), "{e:#}");
    }

    #[test]
    fn bad_config_is_a_clear_error() {
        let none = |_: &str| None;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.yaml");
        std::fs::write(&p, "listen: x\nbogus: 1\n").unwrap();
        let e = load::<IndexServiceConfig>(Some(&p), none, |_| Ok(())).unwrap_err();
        assert!(format!("{e:#}").contains("bogus"), "{e:#}");
        for bad in [
            "name=http://a",
            "name=http://a,model=m,block_size=x,events=tcp://h:1",
            "name=http://a,model=m,block_size=0,events=tcp://h:1",
            "name=http://a,model=m,block_size=16",
            "nokey",
        ] {
            assert!(
                load::<IndexServiceConfig>(None, none, index_flags(None, None, &[bad])).is_err(),
                "{bad}"
            );
        }
        let env = |_: &str| Some("many".to_string());
        assert!(load::<IndexServiceConfig>(None, env, |_| Ok(())).is_err());
    }

    #[test]
    fn tls_comes_from_the_file_or_the_env_and_is_validated() {
        let cert_only = |k: &str| (k == "KVGATE_TLS_CERT_FILE").then(|| "/tls/tls.crt".to_string());
        let e = load::<GatewayConfig>(None, cert_only, |_| Ok(())).unwrap_err();
        assert!(format!("{e:#}").contains("key_file"), "{e:#}");
        let all = |k: &str| match k {
            "KVGATE_TLS_CERT_FILE" => Some("/tls/tls.crt".to_string()),
            "KVGATE_TLS_KEY_FILE" => Some("/tls/tls.key".to_string()),
            "KVGATE_TLS_CLIENT_CA_FILE" => Some("/tls/ca.crt".to_string()),
            _ => None,
        };
        for tls in [
            load::<GatewayConfig>(None, all, |_| Ok(())).unwrap().tls,
            load::<IndexServiceConfig>(None, all, |_| Ok(()))
                .unwrap()
                .tls,
        ] {
            let tls = tls.unwrap();
            assert_eq!(tls.key_file, PathBuf::from("/tls/tls.key"));
            assert_eq!(tls.client_ca_file, Some(PathBuf::from("/tls/ca.crt")));
        }
        let none = |_: &str| None;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.yaml");
        for (yaml, says) in [
            (
                "tls: {cert_file: /a, key_file: /b, require_client_cert: true}\n",
                "client_ca_file",
            ),
            (
                "endpoints: [{url: \"https://10.0.0.5:8000\", models: [m], block_size: 16}]\n",
                "upstream_tls",
            ),
        ] {
            std::fs::write(&p, yaml).unwrap();
            let e = load::<GatewayConfig>(Some(&p), none, |_| Ok(())).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{yaml}: {e:#}");
        }
    }

    #[test]
    fn store_redis_tls_comes_from_the_file_or_the_env_and_is_validated() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.yaml");
        let contracts = "contracts: {contracts: [{id: c}]}\n";
        let none = |_: &str| None;
        std::fs::write(
            &p,
            format!("{contracts}redis: {{url: 'rediss://r:6380', max_bytes: 10, tls: {{ca_file: /tls/ca.crt}}}}\n"),
        )
        .unwrap();
        let cfg: kvgate_store::StoreConfig = load(Some(&p), none, |_| Ok(())).unwrap();
        let tls = cfg.redis.unwrap().tls.unwrap();
        assert_eq!(tls.ca_file, Some(PathBuf::from("/tls/ca.crt")));
        let client = |k: &str| match k {
            "KVGATE_STORE_REDIS_CERT_FILE" => Some("/tls/c.crt".to_string()),
            "KVGATE_STORE_REDIS_KEY_FILE" => Some("/tls/c.key".to_string()),
            _ => None,
        };
        let cfg: kvgate_store::StoreConfig = load(Some(&p), client, |_| Ok(())).unwrap();
        let tls = cfg.redis.unwrap().tls.unwrap();
        assert_eq!(tls.key_file, Some(PathBuf::from("/tls/c.key")));
        assert_eq!(tls.ca_file, Some(PathBuf::from("/tls/ca.crt")));
        let cert_only = |k: &str| (k == "KVGATE_STORE_REDIS_CERT_FILE").then(|| "/c".to_string());
        let e = load::<kvgate_store::StoreConfig>(Some(&p), cert_only, |_| Ok(())).unwrap_err();
        assert!(format!("{e:#}").contains("key_file"), "{e:#}");
        let e = load::<kvgate_store::StoreConfig>(None, cert_only, |_| Ok(())).unwrap_err();
        assert!(format!("{e:#}").contains("redis: block"), "{e:#}");
        for (redis, says) in [
            ("{url: 'redis://r', max_bytes: 10, tls: {}}", "rediss://"),
            (
                "{cluster: ['rediss://a', 'redis://b'], max_bytes: 10}",
                "all rediss://",
            ),
        ] {
            std::fs::write(&p, format!("{contracts}redis: {redis}\n")).unwrap();
            let e = load::<kvgate_store::StoreConfig>(Some(&p), none, |_| Ok(())).unwrap_err();
            assert!(format!("{e:#}").contains(says), "{redis}: {e:#}");
        }
    }

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
        let cfg: GatewayConfig =
            load(Some(&p), env, |c: &mut GatewayConfig| {
                c.listen = "127.0.0.1:2".into();
                endpoint_flags(
                &mut c.endpoints,
                &["url=http://127.0.0.1:8001,model=m,block_size=32,events=tcp://127.0.0.1:5557"
                    .into()],
            )
            })
            .unwrap();
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
            "url=http://127.0.0.1:8000,model=m,block_size=16",
            "x",
        ] {
            let r = load::<GatewayConfig>(Some(&p), none, |c| {
                endpoint_flags(&mut c.endpoints, &[bad.to_string()])
            });
            assert!(r.is_err(), "{bad}");
        }
        let r = load::<GatewayConfig>(None, none, |c| {
            c.router.policy = parse_policy("fastest")?;
            Ok(())
        });
        let err = r.unwrap_err().to_string();
        for name in kvgate_router::policy_names() {
            assert!(err.contains(name), "{err}");
            assert_eq!(parse_policy(name).unwrap().name(), name);
        }
        let r = load::<GatewayConfig>(None, none, |c| {
            c.health_interval_ms = 0;
            Ok(())
        });
        assert!(format!("{:#}", r.unwrap_err()).contains("health_interval_ms"));
    }
}
