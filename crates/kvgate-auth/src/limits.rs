//! Per-contract rate limits: token buckets (governor's GCRA) on requests and
//! on tokens, and a bound on concurrent requests. Prompt tokens are charged
//! at admission; output tokens are only known from the response's usage, so
//! they are charged afterwards, and what the bucket cannot take then is owed
//! and charged before the contract's next admission.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::Limits;
use crate::SetupError;

/// Why a request is over its contract's limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("request rate limit reached for this contract")]
    Requests { retry_after: Duration },
    #[error("token rate limit reached for this contract")]
    Tokens { retry_after: Duration },
    #[error(
        "the request needs {needed} tokens, more than the contract's per-minute limit of {limit}"
    )]
    TooLarge { needed: u64, limit: u32 },
    #[error("too many concurrent requests for this contract")]
    Concurrency,
}

impl LimitError {
    /// Seconds for `Retry-After` (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            LimitError::Requests { retry_after } | LimitError::Tokens { retry_after } => {
                retry_after.as_secs_f64().ceil().max(1.0) as u64
            }
            LimitError::TooLarge { .. } => 60,
            LimitError::Concurrency => 1,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            LimitError::Requests { .. } => "rate_limit_requests",
            LimitError::Tokens { .. } | LimitError::TooLarge { .. } => "rate_limit_tokens",
            LimitError::Concurrency => "rate_limit_concurrency",
        }
    }
}

pub(crate) struct ContractLimits {
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<(DefaultDirectRateLimiter, u32)>,
    /// Output tokens the bucket could not take when they were charged.
    owed_tokens: AtomicU64,
    concurrent: Option<Arc<Semaphore>>,
}

/// Held while a request is in flight: its concurrency slot.
#[derive(Debug)]
pub struct InFlight {
    _permit: Option<OwnedSemaphorePermit>,
}

impl ContractLimits {
    pub(crate) fn new(l: &Limits) -> Result<Self, SetupError> {
        let nonzero =
            |v: u32, what: &'static str| NonZeroU32::new(v).ok_or(SetupError::ZeroLimit(what));
        Ok(Self {
            requests: l
                .requests_per_minute
                .map(|n| nonzero(n, "requests_per_minute"))
                .transpose()?
                .map(|n| RateLimiter::direct(Quota::per_minute(n))),
            tokens: l
                .tokens_per_minute
                .map(|n| nonzero(n, "tokens_per_minute"))
                .transpose()?
                .map(|n| (RateLimiter::direct(Quota::per_minute(n)), n.get())),
            owed_tokens: AtomicU64::new(0),
            concurrent: l
                .max_concurrent
                .map(|n| nonzero(n, "max_concurrent"))
                .transpose()?
                .map(|n| Arc::new(Semaphore::new(n.get() as usize))),
        })
    }

    /// Admits one request with `prompt_tokens`, or says when to retry.
    pub(crate) fn admit(&self, prompt_tokens: u64) -> Result<InFlight, LimitError> {
        let permit = match &self.concurrent {
            Some(s) => Some(
                s.clone()
                    .try_acquire_owned()
                    .map_err(|_| LimitError::Concurrency)?,
            ),
            None => None,
        };
        // A request refused for its tokens still counts as a request.
        if let Some(bucket) = &self.requests {
            bucket.check().map_err(|not_until| LimitError::Requests {
                retry_after: not_until.wait_time_from(bucket.clock().now()),
            })?;
        }
        if let Some((bucket, limit)) = &self.tokens {
            let owed = self.owed_tokens.load(Ordering::Acquire);
            let needed = prompt_tokens.saturating_add(owed).max(1);
            if prompt_tokens > u64::from(*limit) {
                return Err(LimitError::TooLarge {
                    needed: prompt_tokens,
                    limit: *limit,
                });
            }
            // What is owed beyond one bucket is forgiven, so a contract is
            // never locked out for longer than a minute by one response.
            let n = needed.min(u64::from(*limit)) as u32;
            if let Some(n) = NonZeroU32::new(n) {
                match bucket.check_n(n) {
                    Ok(Ok(())) => {
                        let _ = self.owed_tokens.fetch_update(
                            Ordering::AcqRel,
                            Ordering::Acquire,
                            |o| Some(o.saturating_sub(owed)),
                        );
                    }
                    Ok(Err(not_until)) => {
                        return Err(LimitError::Tokens {
                            retry_after: not_until.wait_time_from(bucket.clock().now()),
                        })
                    }
                    Err(_) => {
                        return Err(LimitError::TooLarge {
                            needed,
                            limit: *limit,
                        })
                    }
                }
            }
        }
        Ok(InFlight { _permit: permit })
    }

    /// Charges output tokens read from a response's usage.
    pub(crate) fn charge_output(&self, output_tokens: u64) {
        let Some((bucket, limit)) = &self.tokens else {
            return;
        };
        let n = output_tokens.min(u64::from(*limit)) as u32;
        let Some(n) = NonZeroU32::new(n) else {
            return;
        };
        if !matches!(bucket.check_n(n), Ok(Ok(()))) {
            self.owed_tokens
                .fetch_add(u64::from(n.get()), Ordering::AcqRel);
        }
    }
}
