//! The block keys each contract's requests were routed with, most recent
//! first out, bounded per contract. A suspension moves the contract's salt
//! epoch, so these keys are never looked up again: the gateway drops them
//! from the index and the router's approximate index at once rather than
//! leaving them to age out.

use std::collections::{HashMap, HashSet, VecDeque};

use kvgate_keys::BlockKey;
use parking_lot::Mutex;

/// Keys remembered per contract (the oldest are forgotten first; the index
/// bound and the engines' evictions take care of what falls off).
pub const DEFAULT_KEYS_PER_CONTRACT: usize = 1 << 16;

#[derive(Default)]
pub(crate) struct ContractKeys {
    per_contract: Mutex<HashMap<String, Recent>>,
}

#[derive(Default)]
struct Recent {
    order: VecDeque<BlockKey>,
    seen: HashSet<BlockKey>,
}

impl ContractKeys {
    pub(crate) fn record(&self, contract: &str, keys: &[(u32, Vec<BlockKey>)]) {
        // Routing by load alone has no keys: skip the lock.
        if keys.iter().all(|(_, ks)| ks.is_empty()) {
            return;
        }
        let mut all = self.per_contract.lock();
        let recent = match all.get_mut(contract) {
            Some(r) => r,
            None => all.entry(contract.to_string()).or_default(),
        };
        for k in keys.iter().flat_map(|(_, ks)| ks) {
            if recent.seen.insert(*k) {
                recent.order.push_back(*k);
            }
        }
        while recent.order.len() > DEFAULT_KEYS_PER_CONTRACT {
            if let Some(old) = recent.order.pop_front() {
                recent.seen.remove(&old);
            }
        }
    }

    /// The contract's keys, forgotten here.
    pub(crate) fn take(&self, contract: &str) -> Vec<BlockKey> {
        self.per_contract
            .lock()
            .remove(contract)
            .map(|r| r.order.into())
            .unwrap_or_default()
    }
}
