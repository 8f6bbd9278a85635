//! What the precise policy believes requests in flight are computing, before
//! the engines' KV events say so.
//!
//! A routed request's prompt is recorded here as cached on its endpoint, so
//! the requests that follow find its prefix there at once rather than
//! copying it elsewhere. The belief lasts exactly as long as it is needed:
//! while the request waits for its first token, however long its queue (a
//! wall-clock TTL from routing would expire under overload, just when
//! followers most need it), and then a short grace for its KV events to
//! arrive (`speculative_ttl_secs`). After that only the engine's own events
//! count, so a prefix the engine has since evicted is not believed cached
//! (a long TTL would be, next to fast engines, a stale signal).
//!
//! Requests of one group share keys: a key is forgotten only when no request
//! still expecting it remains.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use kvgate_index::{EndpointId, KvIndex};
use kvgate_keys::BlockKey;
use parking_lot::Mutex;

pub(crate) struct Speculation {
    pub(crate) index: KvIndex,
    /// (endpoint, key) -> requests in flight expecting it.
    expecting: Mutex<HashMap<(EndpointId, BlockKey), u32>>,
    /// Released by their requests: forgotten once the clock passes the time.
    released: Mutex<VecDeque<(u32, EndpointId, Vec<BlockKey>)>>,
    grace_secs: u32,
}

impl Speculation {
    pub(crate) fn new(index: KvIndex, grace_secs: u32) -> Self {
        Self {
            index,
            expecting: Mutex::new(HashMap::new()),
            released: Mutex::new(VecDeque::new()),
            grace_secs,
        }
    }

    /// A request routed to `endpoint` is computing `keys`.
    pub(crate) fn expect(
        self: &Arc<Self>,
        endpoint: &str,
        model: &str,
        block_size: u32,
        keys: &[BlockKey],
    ) -> Option<Speculated> {
        self.forget_released();
        let id = self.index.add_endpoint(endpoint, model, block_size).ok()?;
        self.index.record_keys(id, keys).ok()?;
        let mut expecting = self.expecting.lock();
        for &k in keys {
            *expecting.entry((id, k)).or_default() += 1;
        }
        Some(Speculated {
            spec: self.clone(),
            id,
            keys: keys.to_vec(),
        })
    }

    /// Forgets what released requests computed, once their grace is over.
    pub(crate) fn forget_released(&self) -> usize {
        let now = self.index.now_secs();
        let mut due = Vec::new();
        {
            let mut released = self.released.lock();
            while released.front().is_some_and(|(at, _, _)| *at <= now) {
                if let Some(r) = released.pop_front() {
                    due.push(r);
                }
            }
        }
        if due.is_empty() {
            return 0;
        }
        let mut forgotten = 0;
        let mut expecting = self.expecting.lock();
        for (_, id, keys) in due {
            let gone: Vec<BlockKey> = keys
                .into_iter()
                .filter(|&k| match expecting.get_mut(&(id, k)) {
                    Some(n) if *n > 1 => {
                        *n -= 1;
                        false
                    }
                    _ => {
                        expecting.remove(&(id, k));
                        true
                    }
                })
                .collect();
            forgotten += self.index.forget_keys(id, &gone);
        }
        forgotten
    }

    /// An endpoint went away: nothing it was expected to compute stands.
    pub(crate) fn forget_endpoint(&self, endpoint: &str) {
        if let Some(id) = self.index.endpoint_id(endpoint) {
            self.expecting.lock().retain(|(e, _), _| *e != id);
            self.released.lock().retain(|(_, e, _)| *e != id);
        }
        self.index.remove_endpoint(endpoint);
    }

    fn release(&self, id: EndpointId, keys: Vec<BlockKey>) {
        let at = self.index.now_secs().saturating_add(self.grace_secs);
        self.released.lock().push_back((at, id, keys));
    }
}

/// One routed request's speculation: released at its first token (or when
/// it ends without one), forgotten a grace later.
pub struct Speculated {
    spec: Arc<Speculation>,
    id: EndpointId,
    keys: Vec<BlockKey>,
}

impl Drop for Speculated {
    fn drop(&mut self) {
        self.spec.release(self.id, std::mem::take(&mut self.keys));
    }
}

impl std::fmt::Debug for Speculated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Speculated")
            .field("endpoint", &self.id)
            .field("keys", &self.keys.len())
            .finish()
    }
}
