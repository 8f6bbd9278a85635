//! What each discovered engine serves, asked of the engine: `GET /v1/models`
//! (vLLM's OpenAI shape). Base models (`parent` null) become the endpoint's
//! `models`, in the engine's order (the first roots the block keys); LoRA
//! adapters (`parent` names their base) become its `adapters`.
//!
//! [`follow_engine_models`] sits between a discovery's raw set (endpoints
//! with the configured models) and what the fleet follows. An endpoint is
//! asked when it first appears (a pod turning Ready, a new DNS record) and
//! every `refresh_ms` after, since vLLM loads and unloads LoRA adapters at
//! runtime. One that cannot answer keeps its last answer (a busy engine's
//! slow reply is no reason to forget its adapters); one that never answered
//! gets the configured models, or is left out until it answers when none
//! are configured.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;

use crate::discovery::DiscoveryError;
use crate::endpoint::{EndpointConfig, EndpointConfigError};

/// How often each engine's `/v1/models` is asked again by default.
pub const DEFAULT_MODELS_REFRESH_MS: u64 = 5_000;
/// An answer slower than this counts as failed (the set waits on new
/// endpoints' first answers, so this bounds how late a pod joins).
pub const MODELS_TIMEOUT: Duration = Duration::from_secs(2);
/// Asking faster than this would load the engines for nothing.
const MIN_REFRESH_MS: u64 = 100;

/// The serde default of `models_from_engine`.
pub fn default_models_from_engine() -> bool {
    true
}

/// The serde default of `models_refresh_ms`.
pub fn default_models_refresh_ms() -> u64 {
    DEFAULT_MODELS_REFRESH_MS
}

/// What one engine says it serves.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServedModels {
    pub models: Vec<String>,
    pub adapters: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    #[error("GET /v1/models: {0}")]
    Http(#[from] reqwest::Error),
    #[error("GET /v1/models: status {0}")]
    Status(u16),
    #[error("GET /v1/models: {0}")]
    Json(#[from] serde_json::Error),
    #[error("GET /v1/models lists no base model")]
    NoBaseModel,
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelCard>,
}

#[derive(Deserialize)]
struct ModelCard {
    id: String,
    #[serde(default)]
    parent: Option<String>,
}

/// Parses a `/v1/models` body: base models and adapters, each once, in order.
pub fn parse_models(body: &[u8]) -> Result<ServedModels, ModelsError> {
    let list: ModelList = serde_json::from_slice(body)?;
    let mut out = ServedModels::default();
    for card in list.data.into_iter().filter(|c| !c.id.is_empty()) {
        let into = match card.parent {
            None => &mut out.models,
            Some(_) => &mut out.adapters,
        };
        if !into.contains(&card.id) {
            into.push(card.id);
        }
    }
    if out.models.is_empty() {
        return Err(ModelsError::NoBaseModel);
    }
    Ok(out)
}

/// Asks `base_url`'s `/v1/models`.
pub async fn fetch_models(
    http: &reqwest::Client,
    base_url: &str,
) -> Result<ServedModels, ModelsError> {
    let resp = http
        .get(format!("{base_url}/v1/models"))
        .timeout(MODELS_TIMEOUT)
        .send()
        .await?;
    if !resp.status().is_success() {
        return Err(ModelsError::Status(resp.status().as_u16()));
    }
    parse_models(&resp.bytes().await?)
}

/// Validates the endpoint a discovery would make, where `models` may be
/// empty when the engines are asked for theirs.
pub fn validate_template(
    template: &EndpointConfig,
    models_from_engine: bool,
) -> Result<(), EndpointConfigError> {
    if models_from_engine && template.models.is_empty() {
        let mut e = template.clone();
        e.models = vec!["from-engine".into()];
        return e.validate();
    }
    template.validate()
}

/// Names an endpoint in logs (a pod's name where discovery knows it).
pub type NameOf = Arc<dyn Fn(&EndpointConfig) -> String + Send + Sync>;

/// Asks every endpoint of `raw` now, then follows `raw` and refreshes in the
/// background (module docs); the returned sender holds the set with each
/// engine's models. The task ends when `raw`'s sender is dropped, or when
/// `owner` is gone and nobody watches the set.
pub async fn follow_engine_models(
    mut raw: watch::Receiver<Vec<EndpointConfig>>,
    refresh_ms: u64,
    name_of: NameOf,
    owner: Weak<()>,
) -> Result<watch::Sender<Vec<EndpointConfig>>, DiscoveryError> {
    // Engines are reached on their pod or record addresses, never through
    // a proxy from the environment.
    let http = reqwest::Client::builder()
        .connect_timeout(MODELS_TIMEOUT)
        .no_proxy()
        .build()?;
    let mut asker = Asker {
        http,
        name_of,
        known: HashMap::new(),
        asked: HashSet::new(),
        failing: HashSet::new(),
    };
    let first = raw.borrow_and_update().clone();
    asker.ask(&first, true).await;
    let tx = watch::Sender::new(asker.fill(&first));
    let out = tx.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(refresh_ms.max(MIN_REFRESH_MS)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            let all = tokio::select! {
                changed = raw.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    false
                }
                _ = tick.tick() => true,
            };
            if owner.strong_count() == 0 && out.is_closed() {
                return;
            }
            let set = raw.borrow_and_update().clone();
            asker.ask(&set, all).await;
            let next = asker.fill(&set);
            out.send_if_modified(|current| {
                let changed = *current != next;
                if changed {
                    tracing::info!(endpoints = next.len(), "engine models: endpoints changed");
                    *current = next;
                }
                changed
            });
        }
    });
    Ok(tx)
}

/// The engines' last answers.
struct Asker {
    http: reqwest::Client,
    name_of: NameOf,
    /// url -> its last good answer.
    known: HashMap<String, ServedModels>,
    /// Urls asked since they (last) appeared.
    asked: HashSet<String>,
    /// Urls whose last ask failed (warned once per failure streak).
    failing: HashSet<String>,
}

impl Asker {
    /// Forgets endpoints no longer in `set` (one that comes back is asked
    /// afresh), then asks every endpoint (`all`) or only the new ones, at once.
    async fn ask(&mut self, set: &[EndpointConfig], all: bool) {
        let urls: HashSet<&str> = set.iter().map(|e| e.url.as_str()).collect();
        self.known.retain(|u, _| urls.contains(u.as_str()));
        self.asked.retain(|u| urls.contains(u.as_str()));
        self.failing.retain(|u| urls.contains(u.as_str()));
        let due: Vec<&EndpointConfig> = set
            .iter()
            .filter(|e| all || !self.asked.contains(&e.url))
            .collect();
        let http = &self.http;
        let answers =
            futures_util::future::join_all(due.iter().map(|e| fetch_models(http, &e.url))).await;
        for (e, answer) in due.into_iter().zip(answers) {
            self.asked.insert(e.url.clone());
            match answer {
                Ok(served) => {
                    if self.failing.remove(&e.url) {
                        tracing::info!(engine = %(self.name_of)(e), "engine models: answering again");
                    }
                    self.known.insert(e.url.clone(), served);
                }
                Err(err) => {
                    if self.failing.insert(e.url.clone()) {
                        let kept = if self.known.contains_key(&e.url) {
                            "its last answer"
                        } else if e.models.is_empty() {
                            "left out (no models configured)"
                        } else {
                            "the configured models"
                        };
                        tracing::warn!(
                            engine = %(self.name_of)(e),
                            error = %err,
                            kept,
                            "engine models: /v1/models failed"
                        );
                    }
                }
            }
        }
    }

    /// Each endpoint with what its engine serves (module docs).
    fn fill(&self, set: &[EndpointConfig]) -> Vec<EndpointConfig> {
        set.iter()
            .filter_map(|e| match self.known.get(&e.url) {
                Some(served) => Some(EndpointConfig {
                    models: served.models.clone(),
                    adapters: served.adapters.clone(),
                    ..e.clone()
                }),
                None if !e.models.is_empty() => Some(e.clone()),
                None => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_models_and_adapters_are_told_apart_by_parent() {
        let body = br#"{"object":"list","data":[
            {"id":"base","object":"model","root":"/models/base","parent":null,"max_model_len":4096},
            {"id":"alias","object":"model","root":"/models/base","parent":null},
            {"id":"sql-lora","object":"model","root":"/adapters/sql","parent":"base"},
            {"id":"chat-lora","object":"model","root":"/adapters/chat","parent":"base"},
            {"id":"sql-lora","object":"model","root":"/adapters/sql","parent":"base"}]}"#;
        let served = parse_models(body).unwrap();
        assert_eq!(served.models, ["base", "alias"]);
        assert_eq!(served.adapters, ["sql-lora", "chat-lora"]);
        // A card without `parent` is a base model (older servers omit it).
        let served = parse_models(br#"{"data":[{"id":"m"}]}"#).unwrap();
        assert_eq!(served.models, ["m"]);
    }

    #[test]
    fn an_answer_without_a_base_model_is_refused() {
        assert!(matches!(
            parse_models(br#"{"data":[{"id":"a","parent":"b"}]}"#),
            Err(ModelsError::NoBaseModel)
        ));
        assert!(matches!(
            parse_models(b"not json"),
            Err(ModelsError::Json(_))
        ));
    }

    #[test]
    fn a_template_may_leave_models_to_the_engines() {
        let mut e = EndpointConfig::new("http://h:1", "m", 16);
        e.models.clear();
        assert!(validate_template(&e, true).is_ok());
        assert!(validate_template(&e, false).is_err());
        e.block_size = 0;
        assert!(validate_template(&e, true).is_err());
    }
}
