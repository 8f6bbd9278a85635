//! Where endpoints come from. A discovery is a stream of desired endpoint
//! sets: the fleet reconciles to each new set as it arrives. Static config,
//! DNS and Kubernetes are implementations of the same trait.

use tokio::sync::watch;

use crate::endpoint::{validate_all, EndpointConfig, EndpointConfigError};

/// Why a discovery could not start.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(transparent)]
    Endpoint(#[from] EndpointConfigError),
    #[error("discovery: the engines' http client: {0}")]
    Http(#[from] reqwest::Error),
}

pub trait Discovery: Send + Sync {
    /// The desired endpoint set, now and whenever it changes.
    fn watch(&self) -> watch::Receiver<Vec<EndpointConfig>>;
}

/// A fixed set (the configuration file), changeable by hand ([`Self::set`]).
pub struct StaticDiscovery {
    tx: watch::Sender<Vec<EndpointConfig>>,
}

impl StaticDiscovery {
    /// Validates the set (each endpoint, no url twice).
    pub fn new(endpoints: Vec<EndpointConfig>) -> Result<Self, EndpointConfigError> {
        validate_all(&endpoints)?;
        Ok(Self {
            tx: watch::Sender::new(endpoints),
        })
    }

    /// Replaces the set; watchers reconcile to it.
    pub fn set(&self, endpoints: Vec<EndpointConfig>) -> Result<(), EndpointConfigError> {
        validate_all(&endpoints)?;
        self.tx.send_replace(endpoints);
        Ok(())
    }
}

impl Discovery for StaticDiscovery {
    fn watch(&self) -> watch::Receiver<Vec<EndpointConfig>> {
        self.tx.subscribe()
    }
}
