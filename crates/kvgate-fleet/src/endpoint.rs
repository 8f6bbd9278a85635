//! One engine (a vLLM replica) as every front and every discovery names it:
//! where to send requests, what it serves, and where its KV events are.

use serde::{Deserialize, Serialize};

/// Why an endpoint description was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EndpointConfigError {
    #[error("endpoint {0:?}: url must start with http:// or https://")]
    Url(String),
    #[error("endpoint {0:?}: at least one model is required")]
    NoModel(String),
    #[error("endpoint {0:?}: block_size must be > 0")]
    BlockSize(String),
    #[error("endpoint {url:?}: {what} endpoint {value:?} is not tcp:// or ipc://")]
    ZmqEndpoint {
        url: String,
        what: &'static str,
        value: String,
    },
    #[error("endpoint {0:?}: replay needs events")]
    ReplayWithoutEvents(String),
    #[error("endpoint {0:?} is listed twice")]
    Duplicate(String),
    #[error("endpoint part {0:?} is not key=value")]
    NotKeyValue(String),
    #[error("endpoint key {key}: {value:?} is not a valid value")]
    BadValue { key: &'static str, value: String },
    #[error("endpoint: unknown key {0:?} (url, model, adapter, block_size, events, replay, topic, bind)")]
    UnknownKey(String),
    #[error("endpoint: both url and name given ({0:?})")]
    UrlAndName(String),
}

/// One engine. Its `url` is also its name in the index and in metrics.
///
/// YAML takes `url` (or `name`, as the index's sources were written) and
/// `models` (or a single `model`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawEndpoint")]
pub struct EndpointConfig {
    /// Base URL, e.g. `http://10.0.0.5:8000`.
    pub url: String,
    /// Served model names (the `--served-model-name`s); the first one roots
    /// the block keys, as the engine's KV events are indexed under it.
    pub models: Vec<String>,
    /// LoRA adapters it serves (requests may name one as the model).
    pub adapters: Vec<String>,
    pub block_size: u32,
    /// KV events PUB endpoint; without it the approximate prefix scorer is used.
    pub events: Option<String>,
    /// The engine's replay ROUTER endpoint, if it has one.
    pub replay: Option<String>,
    /// Topic prefix to subscribe to ("" = everything; vLLM's default).
    pub topic: String,
    /// Bind instead of connect: vLLM *connects* its PUB when its endpoint has
    /// no wildcard host, and then the subscriber must bind.
    pub bind: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    adapters: Vec<String>,
    block_size: u32,
    #[serde(default)]
    events: Option<String>,
    #[serde(default)]
    replay: Option<String>,
    #[serde(default)]
    topic: String,
    #[serde(default)]
    bind: bool,
}

impl TryFrom<RawEndpoint> for EndpointConfig {
    type Error = EndpointConfigError;

    fn try_from(r: RawEndpoint) -> Result<Self, Self::Error> {
        let url = match (r.url, r.name) {
            (Some(u), Some(_)) => return Err(EndpointConfigError::UrlAndName(u)),
            (Some(u), None) | (None, Some(u)) => u,
            (None, None) => String::new(),
        };
        let mut models = r.models;
        if let Some(m) = r.model {
            models.insert(0, m);
        }
        Ok(Self {
            url,
            models,
            adapters: r.adapters,
            block_size: r.block_size,
            events: r.events,
            replay: r.replay,
            topic: r.topic,
            bind: r.bind,
        })
    }
}

impl EndpointConfig {
    /// An endpoint serving `model` without KV events (see [`Self::with_events`]).
    pub fn new(url: impl Into<String>, model: impl Into<String>, block_size: u32) -> Self {
        Self {
            url: url.into(),
            models: vec![model.into()],
            adapters: Vec::new(),
            block_size,
            events: None,
            replay: None,
            topic: String::new(),
            bind: false,
        }
    }

    /// The same, publishing KV events (precise routing), with an optional replay endpoint.
    pub fn with_events(mut self, events: impl Into<String>, replay: Option<String>) -> Self {
        self.events = Some(events.into());
        self.replay = replay;
        self
    }

    /// Its name in the index, in metrics and in `x-kvgate-decision`.
    pub fn name(&self) -> &str {
        &self.url
    }

    /// The model its block keys (and its KV events) are rooted at.
    pub fn root_model(&self) -> Option<&str> {
        self.models.first().map(String::as_str)
    }

    pub fn serves(&self, model: &str) -> bool {
        self.models.iter().any(|m| m == model) || self.adapters.iter().any(|a| a == model)
    }

    /// Whether `other` is the same engine with the same event feed and block
    /// keys, differing at most in the models past the first and the adapters
    /// (an engine that loaded a LoRA adapter): the fleet then keeps the
    /// endpoint, its index entries and its load, and only updates what it serves.
    pub fn same_engine(&self, other: &Self) -> bool {
        self.url == other.url
            && self.root_model() == other.root_model()
            && self.block_size == other.block_size
            && self.events == other.events
            && self.replay == other.replay
            && self.topic == other.topic
            && self.bind == other.bind
    }

    /// Parses the flag form
    /// `url=http://H:P,model=M[,model=M2],block_size=16[,adapter=A][,events=tcp://H:P][,replay=tcp://H:P][,topic=T][,bind=true]`
    /// (`name=` is accepted for `url=`), then validates it.
    pub fn parse_flag(s: &str) -> Result<Self, EndpointConfigError> {
        let mut e = Self::new("", "", 0);
        e.models.clear();
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| EndpointConfigError::NotKeyValue(part.to_string()))?;
            let bad = |key| EndpointConfigError::BadValue {
                key,
                value: v.to_string(),
            };
            match k {
                "url" | "name" => e.url = v.to_string(),
                "model" => e.models.push(v.to_string()),
                "adapter" => e.adapters.push(v.to_string()),
                "block_size" => e.block_size = v.parse().map_err(|_| bad("block_size"))?,
                "events" => e.events = Some(v.to_string()),
                "replay" => e.replay = Some(v.to_string()),
                "topic" => e.topic = v.to_string(),
                "bind" => e.bind = v.parse().map_err(|_| bad("bind"))?,
                other => return Err(EndpointConfigError::UnknownKey(other.to_string())),
            }
        }
        e.validate()?;
        Ok(e)
    }

    /// The one validation every endpoint passes, whatever described it.
    pub fn validate(&self) -> Result<(), EndpointConfigError> {
        if !self.url.starts_with("http://") && !self.url.starts_with("https://") {
            return Err(EndpointConfigError::Url(self.url.clone()));
        }
        if self.models.is_empty() || self.models.iter().any(String::is_empty) {
            return Err(EndpointConfigError::NoModel(self.url.clone()));
        }
        if self.block_size == 0 {
            return Err(EndpointConfigError::BlockSize(self.url.clone()));
        }
        for (what, value) in [("events", &self.events), ("replay", &self.replay)] {
            if let Some(v) = value {
                if !v.starts_with("tcp://") && !v.starts_with("ipc://") {
                    return Err(EndpointConfigError::ZmqEndpoint {
                        url: self.url.clone(),
                        what,
                        value: v.clone(),
                    });
                }
            }
        }
        if self.replay.is_some() && self.events.is_none() {
            return Err(EndpointConfigError::ReplayWithoutEvents(self.url.clone()));
        }
        Ok(())
    }
}

/// Validates every endpoint of a set and that no url appears twice.
pub fn validate_all(endpoints: &[EndpointConfig]) -> Result<(), EndpointConfigError> {
    let mut seen = std::collections::HashSet::new();
    for e in endpoints {
        e.validate()?;
        if !seen.insert(e.url.as_str()) {
            return Err(EndpointConfigError::Duplicate(e.url.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_and_yaml_forms_agree() {
        let flag = EndpointConfig::parse_flag(
            "url=http://h:1,model=m,model=m2,adapter=a,block_size=16,events=tcp://h:2,replay=tcp://h:3,topic=kv,bind=true",
        )
        .unwrap();
        let yaml: EndpointConfig = serde_yaml::from_str(
            "url: http://h:1\nmodels: [m, m2]\nadapters: [a]\nblock_size: 16\nevents: tcp://h:2\nreplay: tcp://h:3\ntopic: kv\nbind: true\n",
        )
        .unwrap();
        assert_eq!(flag, yaml);
        assert_eq!(flag.root_model(), Some("m"));
        assert!(flag.serves("m2") && flag.serves("a") && !flag.serves("x"));
        // The index's source form: name + one model.
        let source: EndpointConfig =
            serde_yaml::from_str("name: http://h:1\nmodel: m\nblock_size: 16\nevents: tcp://h:2\n")
                .unwrap();
        assert_eq!(
            source,
            EndpointConfig::new("http://h:1", "m", 16).with_events("tcp://h:2", None)
        );
        assert_eq!(
            EndpointConfig::parse_flag("name=http://h:1,model=m,block_size=16,events=tcp://h:2")
                .unwrap(),
            source
        );
    }

    #[test]
    fn bad_endpoints_are_refused_with_a_reason() {
        for (bad, want) in [
            ("url=http://h,block_size=16", "at least one model"),
            ("url=h:1,model=m,block_size=16", "http://"),
            (
                "url=http://h,model=m,block_size=0",
                "block_size must be > 0",
            ),
            ("url=http://h,model=m,block_size=x", "block_size"),
            (
                "url=http://h,model=m,block_size=16,events=http://x",
                "tcp://",
            ),
            (
                "url=http://h,model=m,block_size=16,replay=tcp://x",
                "replay needs events",
            ),
            ("url=http://h,model=m,block_size=16,bind=maybe", "bind"),
            (
                "url=http://h,model=m,block_size=16,colour=red",
                "unknown key",
            ),
            ("x", "key=value"),
        ] {
            let e = EndpointConfig::parse_flag(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
        assert!(serde_yaml::from_str::<EndpointConfig>(
            "url: http://h\nmodels: [m]\nblock_size: 1\nbogus: 2\n"
        )
        .is_err());
        assert!(serde_yaml::from_str::<EndpointConfig>(
            "url: http://h\nname: http://h\nmodels: [m]\nblock_size: 1\n"
        )
        .is_err());
        let e = EndpointConfig::new("http://h", "m", 16);
        assert!(validate_all(&[e.clone(), e.clone()])
            .unwrap_err()
            .to_string()
            .contains("twice"));
        assert!(validate_all(&[e]).is_ok());
    }
}
