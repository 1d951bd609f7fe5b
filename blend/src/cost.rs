//! Fetch or recompute: running estimates of what loading a chunk from each tier and
//! recomputing it cost, so a request never takes longer than its full prefill would.
//!
//! Estimates are exponentially weighted moving averages of what this process measured:
//! prefill seconds per token (every prefill the blender runs) and bytes per second per tier
//! (per object stream: its bytes over the time the request spent waiting for and converting
//! its layers, i.e. what loading adds to the critical path while reads run ahead of compute).
//! Before a tier has been measured a conservative default applies; before any prefill has
//! been measured, loading is chosen.

use std::collections::HashMap;

use kvquilt_kvstore::TierKind;
use parking_lot::Mutex;

/// Weight of the newest measurement in the moving averages.
const ALPHA: f64 = 0.3;

/// Bytes per second assumed for a tier not yet measured.
fn default_bandwidth(tier: TierKind) -> f64 {
    match tier {
        TierKind::Gpu => 200e9,
        TierKind::Host => 8e9,
        TierKind::Ssd => 1e9,
    }
}

/// Running cost estimates, shared by every request of one blender.
#[derive(Debug, Default)]
pub struct CostModel {
    inner: Mutex<Costs>,
}

#[derive(Debug, Default, Clone)]
struct Costs {
    prefill_s_per_token: Option<f64>,
    bandwidth: HashMap<TierKind, f64>,
}

fn ewma(old: Option<f64>, new: f64) -> f64 {
    match old {
        Some(o) => o + ALPHA * (new - o),
        None => new,
    }
}

impl CostModel {
    /// Records a prefill of `tokens` tokens that took `seconds`.
    pub fn record_prefill(&self, tokens: usize, seconds: f64) {
        if tokens == 0 || !seconds.is_finite() || seconds <= 0.0 {
            return;
        }
        let mut c = self.inner.lock();
        c.prefill_s_per_token = Some(ewma(c.prefill_s_per_token, seconds / tokens as f64));
    }

    /// Records `bytes` read from `tier` in `seconds`.
    pub fn record_load(&self, tier: TierKind, bytes: usize, seconds: f64) {
        if bytes == 0 || !seconds.is_finite() || seconds <= 0.0 {
            return;
        }
        let mut c = self.inner.lock();
        let old = c.bandwidth.get(&tier).copied();
        c.bandwidth.insert(tier, ewma(old, bytes as f64 / seconds));
    }

    /// Seconds to load `bytes` from `tier`.
    pub fn load_s(&self, tier: TierKind, bytes: usize) -> f64 {
        let bw = self
            .inner
            .lock()
            .bandwidth
            .get(&tier)
            .copied()
            .unwrap_or_else(|| default_bandwidth(tier));
        bytes as f64 / bw
    }

    /// Seconds to prefill `tokens` tokens, if any prefill has been measured.
    pub fn prefill_s(&self, tokens: usize) -> Option<f64> {
        self.inner
            .lock()
            .prefill_s_per_token
            .map(|s| s * tokens as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimates_follow_measurements() {
        let c = CostModel::default();
        assert_eq!(c.prefill_s(100), None);
        c.record_prefill(100, 1.0);
        assert!((c.prefill_s(50).unwrap() - 0.5).abs() < 1e-12);
        c.record_prefill(100, 2.0);
        let s = c.prefill_s(1).unwrap();
        assert!(s > 0.01 && s < 0.02);
        assert!((c.load_s(TierKind::Ssd, 1_000_000_000) - 1.0).abs() < 1e-9);
        c.record_load(TierKind::Ssd, 100, 1.0);
        assert!((c.load_s(TierKind::Ssd, 100) - 1.0).abs() < 1e-9);
        c.record_load(TierKind::Ssd, 0, 0.0); // ignored
        assert!((c.load_s(TierKind::Ssd, 100) - 1.0).abs() < 1e-9);
    }
}
