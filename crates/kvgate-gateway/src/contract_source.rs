//! Where contract changes come from. Three sources, one way in: the config
//! file's watcher (the `kvgate` binary's `reload.rs`), the control plane's
//! poller (`control_plane.rs`) and the admin API (`admin.rs`) all change
//! contracts through [`Gateway::set_suspended`] and
//! [`Gateway::reload_contracts`], which audit the change (naming its source)
//! and drop the index entries of salts that will never be used again. The
//! two that run in the background are [`ContractSource`]s, started with
//! [`Gateway::add_source`]; each stops when the gateway is dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};

use crate::Gateway;

/// What a source's `run` returns.
pub type SourceTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A background source of contract changes.
pub trait ContractSource: Send + 'static {
    /// Its name in logs and in the audit records of its changes.
    fn name(&self) -> &'static str;
    /// Watches or polls until `gw` is gone, applying what changes.
    fn run(self: Box<Self>, gw: Weak<Gateway>) -> SourceTask;
}

impl Gateway {
    /// Runs `source` in the background for as long as the gateway lives.
    pub fn add_source(self: &Arc<Self>, source: Box<dyn ContractSource>) {
        tracing::info!(source = source.name(), "contract source started");
        tokio::spawn(source.run(Arc::downgrade(self)));
    }
}
