//! Storage tiers ("medium" in vLLM's events), interned to small integers.

use serde::Serialize;

/// Most tiers an index distinguishes; further medium names share the last slot.
pub const MAX_TIERS: usize = 8;

/// A storage tier, by its index in the [`TierNames`] table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Tier(pub u8);

impl Tier {
    /// Device memory: what vLLM reports for its KV cache (CPU builds say "GPU" too).
    pub const GPU: Tier = Tier(0);
    pub const CPU: Tier = Tier(1);
    pub const DISK: Tier = Tier(2);
}

/// Medium name <-> tier. The first three are fixed so weights can be configured
/// by name before any event arrives.
#[derive(Debug, Clone)]
pub struct TierNames {
    names: Vec<String>,
}

impl Default for TierNames {
    fn default() -> Self {
        Self {
            names: vec!["GPU".into(), "CPU".into(), "DISK".into()],
        }
    }
}

impl TierNames {
    /// The tier of a medium name (case-insensitive); `None` means GPU, vLLM's default.
    pub fn intern(&mut self, medium: Option<&str>) -> Tier {
        let Some(medium) = medium else {
            return Tier::GPU;
        };
        if let Some(i) = self
            .names
            .iter()
            .position(|n| n.eq_ignore_ascii_case(medium))
        {
            return Tier(i as u8);
        }
        if self.names.len() < MAX_TIERS - 1 {
            self.names.push(medium.to_ascii_uppercase());
            return Tier((self.names.len() - 1) as u8);
        }
        if self.names.len() == MAX_TIERS - 1 {
            self.names.push("OTHER".into());
        }
        Tier((MAX_TIERS - 1) as u8)
    }

    pub fn name(&self, tier: Tier) -> &str {
        self.names
            .get(tier.0 as usize)
            .map(String::as_str)
            .unwrap_or("OTHER")
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interning_is_stable_and_bounded() {
        let mut t = TierNames::default();
        assert_eq!(t.intern(None), Tier::GPU);
        assert_eq!(t.intern(Some("gpu")), Tier::GPU);
        assert_eq!(t.intern(Some("CPU")), Tier::CPU);
        let lm = t.intern(Some("lmcache"));
        assert_eq!(t.intern(Some("LMCACHE")), lm);
        assert_eq!(t.name(lm), "LMCACHE");
        for i in 0..20 {
            let tier = t.intern(Some(&format!("m{i}")));
            assert!((tier.0 as usize) < MAX_TIERS);
        }
        assert_eq!(t.len(), MAX_TIERS);
        assert_eq!(t.name(Tier((MAX_TIERS - 1) as u8)), "OTHER");
    }
}
