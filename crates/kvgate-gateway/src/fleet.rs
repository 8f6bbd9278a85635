//! The endpoints behind the gateway: membership (via [`Discovery`]), health
//! (active checks plus a circuit breaker fed by request outcomes) and the load
//! each one carries.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvgate_index::EndpointId;
use kvgate_router::LoadCounters;
use parking_lot::{Mutex, RwLock};

use crate::config::EndpointConfig;

/// Where endpoints come from. Static config today; DNS and Kubernetes
/// discovery implement the same interface.
pub trait Discovery: Send + Sync {
    /// The current endpoint set; the gateway reconciles its fleet to it.
    fn endpoints(&self) -> Vec<EndpointConfig>;
}

/// Endpoints listed in the configuration file.
pub struct StaticDiscovery(pub Vec<EndpointConfig>);

impl Discovery for StaticDiscovery {
    fn endpoints(&self) -> Vec<EndpointConfig> {
        self.0.clone()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Circuit {
    Closed,
    /// Ejected until the instant; then one probe request may pass.
    Open(Instant),
    /// A probe is allowed; its outcome closes or re-opens the circuit.
    HalfOpen {
        probe_in_flight: bool,
    },
}

#[derive(Debug)]
struct Health {
    circuit: Circuit,
    consecutive_failures: u32,
    /// Active health checks failed in a row.
    failed_checks: u32,
    /// Active health checks pass, or failed fewer times in a row than the
    /// ejection threshold (starts optimistic): one slow answer from a busy
    /// engine is not an outage.
    check_ok: bool,
}

pub struct Endpoint {
    pub cfg: EndpointConfig,
    pub load: Arc<LoadCounters>,
    /// Its id in the precise index when it publishes KV events.
    pub index_id: Option<EndpointId>,
    health: Mutex<Health>,
}

/// Circuit breaker settings.
#[derive(Debug, Clone, Copy)]
pub struct Ejection {
    pub after_failures: u32,
    pub cooldown: Duration,
}

impl Endpoint {
    pub fn new(cfg: EndpointConfig, index_id: Option<EndpointId>) -> Self {
        Self {
            cfg,
            load: Arc::new(LoadCounters::default()),
            index_id,
            health: Mutex::new(Health {
                circuit: Circuit::Closed,
                consecutive_failures: 0,
                failed_checks: 0,
                check_ok: true,
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.cfg.url
    }

    pub fn serves(&self, model: &str) -> bool {
        self.cfg.models.iter().any(|m| m == model) || self.cfg.adapters.iter().any(|a| a == model)
    }

    /// Whether the endpoint may take a request now. A half-open circuit admits
    /// exactly one probe (the caller must report its outcome).
    pub fn admit(&self) -> bool {
        let mut h = self.health.lock();
        if !h.check_ok {
            return false;
        }
        match h.circuit {
            Circuit::Closed => true,
            Circuit::Open(until) if Instant::now() >= until => {
                h.circuit = Circuit::HalfOpen {
                    probe_in_flight: true,
                };
                true
            }
            Circuit::Open(_) => false,
            Circuit::HalfOpen { probe_in_flight } => {
                if probe_in_flight {
                    false
                } else {
                    h.circuit = Circuit::HalfOpen {
                        probe_in_flight: true,
                    };
                    true
                }
            }
        }
    }

    /// Whether it would be admitted, without taking a half-open probe slot.
    pub fn is_available(&self) -> bool {
        let h = self.health.lock();
        h.check_ok
            && match h.circuit {
                Circuit::Closed => true,
                Circuit::Open(until) => Instant::now() >= until,
                Circuit::HalfOpen { probe_in_flight } => !probe_in_flight,
            }
    }

    pub fn record_success(&self) {
        let mut h = self.health.lock();
        h.consecutive_failures = 0;
        // A served request outweighs checks that timed out meanwhile.
        h.failed_checks = 0;
        h.circuit = Circuit::Closed;
    }

    pub fn record_failure(&self, ej: Ejection) {
        let mut h = self.health.lock();
        h.consecutive_failures = h.consecutive_failures.saturating_add(1);
        let reopen = matches!(h.circuit, Circuit::HalfOpen { .. });
        if reopen || h.consecutive_failures >= ej.after_failures {
            if h.circuit == Circuit::Closed {
                tracing::warn!(endpoint = %self.cfg.url, failures = h.consecutive_failures, "requests failed in a row; endpoint ejected");
            }
            h.circuit = Circuit::Open(Instant::now() + ej.cooldown);
        }
    }

    /// Outcome of an active health check. Returns true when this check
    /// turned the endpoint unhealthy.
    pub fn record_check(&self, ok: bool, ej: Ejection) -> bool {
        let mut h = self.health.lock();
        if ok {
            h.failed_checks = 0;
            h.check_ok = true;
            // A passing check is the probe an open circuit waits for.
            if let Circuit::Open(_) | Circuit::HalfOpen { .. } = h.circuit {
                h.circuit = Circuit::HalfOpen {
                    probe_in_flight: false,
                };
            }
            return false;
        }
        h.failed_checks = h.failed_checks.saturating_add(1);
        if h.failed_checks < ej.after_failures {
            return false;
        }
        let turned = h.check_ok;
        h.check_ok = false;
        h.consecutive_failures = h.consecutive_failures.saturating_add(1);
        h.circuit = Circuit::Open(Instant::now() + ej.cooldown);
        turned
    }
}

/// The current endpoint set (swapped whole on membership changes).
#[derive(Default)]
pub struct Fleet {
    endpoints: RwLock<Arc<Vec<Arc<Endpoint>>>>,
}

impl Fleet {
    pub fn snapshot(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.read().clone()
    }

    pub fn set(&self, endpoints: Vec<Arc<Endpoint>>) {
        *self.endpoints.write() = Arc::new(endpoints);
    }

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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep() -> Endpoint {
        Endpoint::new(
            EndpointConfig {
                url: "http://e".into(),
                models: vec!["m".into()],
                adapters: vec!["lora".into()],
                block_size: 16,
                events: None,
                replay: None,
                topic: String::new(),
                bind: false,
            },
            None,
        )
    }

    #[test]
    fn circuit_opens_after_failures_and_recovers_through_one_probe() {
        let e = ep();
        let ej = Ejection {
            after_failures: 2,
            cooldown: Duration::from_millis(30),
        };
        assert!(e.serves("m") && e.serves("lora") && !e.serves("x"));
        e.record_failure(ej);
        assert!(e.admit(), "one failure does not eject");
        e.record_failure(ej);
        assert!(!e.admit() && !e.is_available());
        std::thread::sleep(Duration::from_millis(40));
        assert!(e.is_available());
        assert!(e.admit(), "the probe");
        assert!(!e.admit(), "only one probe at a time");
        e.record_failure(ej);
        assert!(!e.admit(), "a failed probe re-opens");
        std::thread::sleep(Duration::from_millis(40));
        assert!(e.admit());
        e.record_success();
        assert!(e.admit() && e.admit());
    }

    #[test]
    fn health_checks_gate_admission() {
        let e = ep();
        let ej = Ejection {
            after_failures: 3,
            cooldown: Duration::from_secs(60),
        };
        assert!(!e.record_check(false, ej));
        assert!(!e.record_check(false, ej));
        assert!(e.admit(), "two missed checks of three are not an outage");
        e.record_success();
        assert!(!e.record_check(false, ej));
        assert!(!e.record_check(false, ej));
        assert!(e.record_check(false, ej), "the third in a row ejects");
        assert!(!e.record_check(false, ej), "reported once");
        assert!(!e.admit());
        e.record_check(true, ej);
        assert!(e.admit(), "a passing check lets a probe through at once");
        assert!(!e.admit());
        e.record_success();
        assert!(e.admit());
    }
}
