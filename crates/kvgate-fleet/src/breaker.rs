//! Each endpoint's health: active checks plus a circuit breaker fed by
//! request outcomes.
//!
//! States of the circuit:
//! - **Closed**: requests flow. `after_failures` failed requests in a row
//!   open it.
//! - **Open(until)**: ejected; nothing is admitted until the cooldown ends.
//! - **HalfOpen**: one probe request may pass; its success closes the
//!   circuit, its failure re-opens it. A passing health check moves an open
//!   circuit here at once.
//!
//! Active checks gate admission separately: `after_failures` failed checks in
//! a row eject the endpoint (one slow answer from a busy engine is no outage),
//! and a served request clears the count.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Circuit breaker settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ejection {
    pub after_failures: u32,
    pub cooldown: Duration,
}

impl Default for Ejection {
    fn default() -> Self {
        Self {
            after_failures: crate::DEFAULT_EJECT_AFTER_FAILURES,
            cooldown: Duration::from_millis(crate::DEFAULT_EJECT_COOLDOWN_MS),
        }
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
struct State {
    circuit: Circuit,
    consecutive_failures: u32,
    /// Active health checks failed in a row.
    failed_checks: u32,
    /// Active health checks pass, or failed fewer times in a row than the
    /// ejection threshold (starts optimistic).
    check_ok: bool,
}

/// One endpoint's breaker.
#[derive(Debug)]
pub struct Breaker {
    ejection: Ejection,
    state: Mutex<State>,
}

impl Breaker {
    pub fn new(ejection: Ejection) -> Self {
        Self {
            ejection: Ejection {
                after_failures: ejection.after_failures.max(1),
                ..ejection
            },
            state: Mutex::new(State {
                circuit: Circuit::Closed,
                consecutive_failures: 0,
                failed_checks: 0,
                check_ok: true,
            }),
        }
    }

    /// Whether the endpoint may take a request now. A half-open circuit admits
    /// exactly one probe (the caller must report its outcome).
    pub fn admit(&self) -> bool {
        let mut h = self.state.lock();
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
        let h = self.state.lock();
        h.check_ok
            && match h.circuit {
                Circuit::Closed => true,
                Circuit::Open(until) => Instant::now() >= until,
                Circuit::HalfOpen { probe_in_flight } => !probe_in_flight,
            }
    }

    pub fn record_success(&self) {
        let mut h = self.state.lock();
        h.consecutive_failures = 0;
        // A served request outweighs checks that timed out meanwhile.
        h.failed_checks = 0;
        h.circuit = Circuit::Closed;
    }

    /// A failed request. Returns true when this failure opened a closed circuit.
    pub fn record_failure(&self) -> bool {
        let mut h = self.state.lock();
        h.consecutive_failures = h.consecutive_failures.saturating_add(1);
        let reopen = matches!(h.circuit, Circuit::HalfOpen { .. });
        if reopen || h.consecutive_failures >= self.ejection.after_failures {
            let opened = h.circuit == Circuit::Closed;
            h.circuit = Circuit::Open(Instant::now() + self.ejection.cooldown);
            return opened;
        }
        false
    }

    /// Outcome of an active health check. Returns true when this check
    /// turned the endpoint unhealthy.
    pub fn record_check(&self, ok: bool) -> bool {
        let mut h = self.state.lock();
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
        if h.failed_checks < self.ejection.after_failures {
            return false;
        }
        let turned = h.check_ok;
        h.check_ok = false;
        h.consecutive_failures = h.consecutive_failures.saturating_add(1);
        h.circuit = Circuit::Open(Instant::now() + self.ejection.cooldown);
        turned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn circuit_opens_after_failures_and_recovers_through_one_probe() {
        let e = Breaker::new(Ejection {
            after_failures: 2,
            cooldown: Duration::from_millis(30),
        });
        assert!(!e.record_failure());
        assert!(e.admit(), "one failure does not eject");
        assert!(e.record_failure(), "the second opens the circuit");
        assert!(!e.admit() && !e.is_available());
        std::thread::sleep(Duration::from_millis(40));
        assert!(e.is_available());
        assert!(e.admit(), "the probe");
        assert!(!e.admit(), "only one probe at a time");
        assert!(
            !e.record_failure(),
            "a failed probe re-opens (already counted)"
        );
        assert!(!e.admit(), "a failed probe re-opens");
        std::thread::sleep(Duration::from_millis(40));
        assert!(e.admit());
        e.record_success();
        assert!(e.admit() && e.admit());
    }

    #[test]
    fn health_checks_gate_admission() {
        let e = Breaker::new(Ejection {
            after_failures: 3,
            cooldown: Duration::from_secs(60),
        });
        assert!(!e.record_check(false));
        assert!(!e.record_check(false));
        assert!(e.admit(), "two missed checks of three are not an outage");
        e.record_success();
        assert!(!e.record_check(false));
        assert!(!e.record_check(false));
        assert!(e.record_check(false), "the third in a row ejects");
        assert!(!e.record_check(false), "reported once");
        assert!(!e.admit());
        e.record_check(true);
        assert!(e.admit(), "a passing check lets a probe through at once");
        assert!(!e.admit());
        e.record_success();
        assert!(e.admit());
    }
}
