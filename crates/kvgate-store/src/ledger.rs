//! What a tier outside memory holds, by name: each entry's contract and
//! size, least recently used first out, and the bytes in all. The disk tier
//! keeps one by file path, the Redis tier by key name.

use std::hash::Hash;

use lru::LruCache;

pub(crate) struct Entry {
    pub contract: String,
    pub bytes: u64,
}

pub(crate) struct Ledger<K: Hash + Eq> {
    entries: LruCache<K, Entry>,
    bytes: u64,
}

impl<K: Hash + Eq + Clone> Ledger<K> {
    pub fn new() -> Self {
        Self {
            entries: LruCache::unbounded(),
            bytes: 0,
        }
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Records `name` as the most recently used (replacing what it held).
    pub fn insert(&mut self, name: K, contract: &str, bytes: u64) {
        let entry = Entry {
            contract: contract.to_string(),
            bytes,
        };
        if let Some(old) = self.entries.put(name, entry) {
            self.bytes -= old.bytes;
        }
        self.bytes += bytes;
    }

    /// Records `name` as the least recently used (the next out), unless it
    /// is here already: what a restart finds, older than anything since.
    pub fn insert_oldest(&mut self, name: K, contract: &str, bytes: u64) {
        if self.entries.contains(&name) {
            return;
        }
        self.insert(name.clone(), contract, bytes);
        self.entries.demote(&name);
    }

    pub fn contains(&self, name: &K) -> bool {
        self.entries.contains(name)
    }

    /// Marks `name` used; false if it is not here.
    pub fn touch(&mut self, name: &K) -> bool {
        self.entries.get(name).is_some()
    }

    pub fn remove(&mut self, name: &K) -> Option<Entry> {
        let e = self.entries.pop(name)?;
        self.bytes -= e.bytes;
        Some(e)
    }

    /// Takes the least recently used entries out until the total fits.
    pub fn over(&mut self, max_bytes: u64) -> Vec<(K, Entry)> {
        let mut out = Vec::new();
        while self.bytes > max_bytes {
            let Some((name, e)) = self.entries.pop_lru() else {
                break;
            };
            self.bytes -= e.bytes;
            out.push((name, e));
        }
        out
    }

    /// Takes every entry of `contract` out.
    pub fn take_contract(&mut self, contract: &str) -> Vec<(K, Entry)> {
        let names: Vec<K> = self
            .entries
            .iter()
            .filter(|(_, e)| e.contract == contract)
            .map(|(n, _)| n.clone())
            .collect();
        names
            .into_iter()
            .filter_map(|n| self.remove(&n).map(|e| (n, e)))
            .collect()
    }
}
