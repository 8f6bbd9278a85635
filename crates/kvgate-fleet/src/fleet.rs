//! The endpoint registry: the current endpoint set (swapped whole on
//! membership changes), each endpoint's breaker and load, and the reconcile
//! that brings the set to what discovery wants.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use kvgate_index::{Clock, EndpointId, KvIndex};
use kvgate_router::{LoadCounters, RouterConfig, Scheduler};
use parking_lot::{Mutex, RwLock};

use crate::breaker::{Breaker, Ejection};
use crate::discovery::Discovery;
use crate::endpoint::EndpointConfig;

/// One endpoint in the fleet.
pub struct Endpoint {
    pub cfg: EndpointConfig,
    pub load: Arc<LoadCounters>,
    /// Its id in the precise index when its KV events are followed.
    pub index_id: Option<EndpointId>,
    /// Shared with the endpoint that replaces this one when only what it
    /// serves changes ([`EndpointConfig::same_engine`]).
    breaker: Arc<Breaker>,
}

impl Endpoint {
    pub fn new(cfg: EndpointConfig, index_id: Option<EndpointId>, ejection: Ejection) -> Self {
        Self {
            cfg,
            load: Arc::new(LoadCounters::default()),
            index_id,
            breaker: Arc::new(Breaker::new(ejection)),
        }
    }

    /// The same engine serving what `cfg` says: its load, index id and breaker kept.
    fn serving(&self, cfg: EndpointConfig) -> Self {
        Self {
            cfg,
            load: self.load.clone(),
            index_id: self.index_id,
            breaker: self.breaker.clone(),
        }
    }

    pub fn name(&self) -> &str {
        self.cfg.name()
    }

    pub fn serves(&self, model: &str) -> bool {
        self.cfg.serves(model)
    }

    /// Whether it may take a request now (takes a half-open probe slot).
    pub fn admit(&self) -> bool {
        self.breaker.admit()
    }

    /// Whether it would be admitted, without taking a probe slot.
    pub fn is_available(&self) -> bool {
        self.breaker.is_available()
    }

    pub fn record_success(&self) {
        self.breaker.record_success();
    }

    pub fn record_failure(&self) {
        if self.breaker.record_failure() {
            tracing::warn!(endpoint = %self.name(), "requests failed in a row; endpoint ejected");
        }
    }

    /// An active health check's outcome.
    pub fn record_check(&self, ok: bool) {
        if self.breaker.record_check(ok) {
            tracing::warn!(endpoint = %self.name(), "health checks failed in a row; endpoint ejected");
        }
    }
}

/// A future that owns what it needs (the feed's lock is not held across it).
pub type Unfollow = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Who follows endpoints' KV events into the index: the indexer's ZMQ
/// subscribers in a real fleet, [`IndexOnly`] where the caller applies events.
pub trait EventFeeds: Send {
    /// Starts following `endpoint`; its id in the index, or None when it
    /// publishes no events (or cannot be followed: logged).
    fn follow(&mut self, endpoint: &EndpointConfig) -> Option<EndpointId>;
    /// Stops following and purges its entries once the returned future ends.
    fn unfollow(&mut self, name: &str) -> Unfollow;
}

/// Registers every endpoint in the index without subscribing to anything:
/// for fleets whose events the caller applies itself (models, benches).
pub struct IndexOnly(pub Arc<KvIndex>);

impl EventFeeds for IndexOnly {
    fn follow(&mut self, endpoint: &EndpointConfig) -> Option<EndpointId> {
        let model = endpoint.root_model()?;
        self.0
            .add_endpoint(endpoint.name(), model, endpoint.block_size)
            .ok()
    }

    fn unfollow(&mut self, name: &str) -> Unfollow {
        self.0.remove_endpoint(name);
        Box::pin(std::future::ready(()))
    }
}

/// The endpoints behind a front, the index their events feed, and the
/// scheduler that picks among them ([`Fleet::route`]).
pub struct Fleet {
    endpoints: RwLock<Arc<Vec<Arc<Endpoint>>>>,
    pub(crate) index: Arc<KvIndex>,
    pub(crate) scheduler: Scheduler,
    feeds: Mutex<Box<dyn EventFeeds>>,
    ejection: Ejection,
    /// One reconcile at a time: leaves finish before joins of the same name.
    reconciling: tokio::sync::Mutex<()>,
}

impl Fleet {
    pub fn new(
        router: RouterConfig,
        ejection: Ejection,
        index: Arc<KvIndex>,
        feeds: Box<dyn EventFeeds>,
    ) -> Self {
        Self::with_clock(router, ejection, index, feeds, Clock::wall())
    }

    /// A fleet whose scheduler reads `clock` (models in simulated time).
    pub fn with_clock(
        router: RouterConfig,
        ejection: Ejection,
        index: Arc<KvIndex>,
        feeds: Box<dyn EventFeeds>,
        clock: Clock,
    ) -> Self {
        Self {
            endpoints: RwLock::new(Arc::new(Vec::new())),
            index,
            scheduler: Scheduler::with_clock(router, clock),
            feeds: Mutex::new(feeds),
            ejection,
            reconciling: tokio::sync::Mutex::new(()),
        }
    }

    pub fn index(&self) -> &Arc<KvIndex> {
        &self.index
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    pub fn snapshot(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.read().clone()
    }

    /// Every model and adapter some endpoint serves, sorted.
    pub fn models(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .snapshot()
            .iter()
            .flat_map(|e| e.cfg.models.iter().chain(&e.cfg.adapters).cloned())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    fn enter(&self, cfg: EndpointConfig) -> Arc<Endpoint> {
        let index_id = self.feeds.lock().follow(&cfg);
        tracing::info!(endpoint = %cfg.url, events = index_id.is_some(), "endpoint joined");
        Arc::new(Endpoint::new(cfg, index_id, self.ejection))
    }

    /// Adds one endpoint now (no discovery): for fleets built in code.
    pub fn join(&self, cfg: EndpointConfig) -> Arc<Endpoint> {
        let e = self.enter(cfg);
        let mut set = self.endpoints.write();
        let mut next = Vec::clone(&set);
        next.push(e.clone());
        *set = Arc::new(next);
        e
    }

    /// Brings the fleet to `desired`: endpoints no longer wanted leave (their
    /// event feeds stop and their entries are purged), then new ones join.
    /// An endpoint whose description changed leaves and joins again, unless
    /// only what it serves past its first model changed (a LoRA adapter
    /// loaded or unloaded): that one is kept, serving the new list.
    pub async fn reconcile(&self, desired: Vec<EndpointConfig>) {
        let _one = self.reconciling.lock().await;
        let current = self.snapshot();
        let kept_in =
            |e: &Endpoint, set: &[EndpointConfig]| set.iter().any(|d| e.cfg.same_engine(d));
        for gone in current.iter().filter(|e| !kept_in(e, &desired)) {
            let unfollow = self.feeds.lock().unfollow(gone.name());
            unfollow.await;
            self.scheduler.forget_endpoint(gone.name());
            tracing::info!(endpoint = %gone.name(), "endpoint left");
        }
        let next: Vec<Arc<Endpoint>> = desired
            .into_iter()
            .map(
                |cfg| match current.iter().find(|e| e.cfg.same_engine(&cfg)) {
                    Some(kept) if kept.cfg == cfg => kept.clone(),
                    Some(kept) => {
                        tracing::info!(
                            endpoint = %cfg.url,
                            models = ?cfg.models,
                            adapters = ?cfg.adapters,
                            "endpoint serves a new model list"
                        );
                        Arc::new(kept.serving(cfg))
                    }
                    None => self.enter(cfg),
                },
            )
            .collect();
        *self.endpoints.write() = Arc::new(next);
    }

    /// Reconciles to `discovery`'s current set now, then to every change in
    /// the background until the fleet or the discovery is dropped.
    pub async fn follow(self: &Arc<Self>, discovery: &dyn Discovery) {
        let mut rx = discovery.watch();
        let first = rx.borrow_and_update().clone();
        self.reconcile(first).await;
        let fleet = Arc::downgrade(self);
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let desired = rx.borrow_and_update().clone();
                let Some(fleet) = fleet.upgrade() else { return };
                fleet.reconcile(desired).await;
            }
        });
    }
}
