//! [`IngestManager`]: one subscriber task per event source, by endpoint name,
//! and the fleet's [`EventFeeds`] on top of it.

use std::collections::HashMap;
use std::sync::Arc;

use kvgate_fleet::{EndpointConfig, EventFeeds, Unfollow};
use kvgate_index::{EndpointId, KvIndex};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{error, warn};

use super::{run_with_options, SubscriberError, SubscriberOptions};
use crate::metrics::IndexerMetrics;

struct Ingest {
    handle: JoinHandle<Result<(), SubscriberError>>,
    shutdown: watch::Sender<bool>,
}

/// Runs one subscriber task per source, by endpoint name.
pub struct IngestManager {
    index: Arc<KvIndex>,
    metrics: Arc<IndexerMetrics>,
    opts: SubscriberOptions,
    tasks: HashMap<String, Ingest>,
}

impl IngestManager {
    pub fn new(index: Arc<KvIndex>, metrics: Arc<IndexerMetrics>) -> Self {
        Self::with_options(index, metrics, SubscriberOptions::default())
    }

    pub fn with_options(
        index: Arc<KvIndex>,
        metrics: Arc<IndexerMetrics>,
        opts: SubscriberOptions,
    ) -> Self {
        Self {
            index,
            metrics,
            opts,
            tasks: HashMap::new(),
        }
    }

    /// Registers the endpoint (so a conflict is reported here, not in a
    /// task's log) and spawns its subscriber. Needs a tokio runtime.
    pub fn add(&mut self, source: EndpointConfig) -> Result<EndpointId, SubscriberError> {
        if self.tasks.contains_key(&source.url) {
            return Err(SubscriberError::AlreadyRunning(source.url));
        }
        if source.events.is_none() {
            return Err(SubscriberError::NoEvents(source.url));
        }
        let model = source
            .root_model()
            .ok_or_else(|| SubscriberError::NoModel(source.url.clone()))?;
        let id = self
            .index
            .add_endpoint(&source.url, model, source.block_size)
            .map_err(|e| SubscriberError::Register {
                name: source.url.clone(),
                source: e,
            })?;
        let (tx, rx) = watch::channel(false);
        let name = source.url.clone();
        let handle = tokio::spawn(run_with_options(
            source,
            self.index.clone(),
            self.metrics.clone(),
            rx,
            self.opts.clone(),
        ));
        self.tasks.insert(
            name,
            Ingest {
                handle,
                shutdown: tx,
            },
        );
        Ok(id)
    }

    /// Stops the endpoint's subscriber and removes the endpoint from the
    /// index, purging its entries. Returns the entries purged (None if the
    /// index did not know the endpoint).
    pub async fn remove(&mut self, name: &str) -> Option<usize> {
        self.detach(name).await
    }

    /// [`Self::remove`], as a future that borrows nothing: the subscriber is
    /// taken out now, the purge happens once its task is gone.
    fn detach(&mut self, name: &str) -> impl std::future::Future<Output = Option<usize>> + Send {
        let task = self.tasks.remove(name);
        let index = self.index.clone();
        let name = name.to_string();
        async move {
            if let Some(task) = task {
                task.handle.abort();
                // Wait until the task is really gone: it could otherwise still
                // be applying a batch when the endpoint (and its id) is removed.
                let _ = task.handle.await;
            }
            index.remove_endpoint(&name)
        }
    }

    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tasks.keys().cloned().collect();
        names.sort();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tasks.contains_key(name)
    }

    /// Asks every subscriber to stop and waits for them; entries stay.
    pub async fn shutdown(mut self) {
        let tasks: Vec<Ingest> = self.tasks.drain().map(|(_, t)| t).collect();
        for t in &tasks {
            let _ = t.shutdown.send(true);
        }
        for t in tasks {
            match t.handle.await {
                Ok(Err(e)) => warn!(error = %e, "subscriber ended with an error"),
                Err(e) if e.is_panic() => warn!(error = %e, "subscriber task panicked"),
                _ => {}
            }
        }
    }
}

/// The fleet's endpoints' events, followed by this manager's subscribers.
impl EventFeeds for IngestManager {
    fn follow(&mut self, endpoint: &EndpointConfig) -> Option<EndpointId> {
        endpoint.events.as_ref()?;
        match self.add(endpoint.clone()) {
            Ok(id) => Some(id),
            Err(e) => {
                error!(endpoint = %endpoint.url, error = %e, "cannot subscribe to KV events");
                None
            }
        }
    }

    fn unfollow(&mut self, name: &str) -> Unfollow {
        let detach = self.detach(name);
        Box::pin(async move {
            detach.await;
        })
    }
}

impl Drop for IngestManager {
    fn drop(&mut self) {
        // Tasks would otherwise outlive the manager and keep feeding the index.
        for t in self.tasks.values() {
            t.handle.abort();
        }
    }
}
