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

/// Bytes per second assumed for a tier not yet measured (any tier other than the local
/// ones is assumed to be across a network).
fn default_bandwidth(tier: TierKind) -> f64 {
    match tier {
        TierKind::GPU => 200e9,
        TierKind::HOST => 8e9,
        TierKind::SSD => 1e9,
        _ => 0.5e9,
    }
}

/// Seconds from asking a tier for an object to holding its verified header, assumed for a
/// tier not yet measured.
fn default_latency(tier: TierKind) -> f64 {
    match tier {
        TierKind::GPU | TierKind::HOST => 0.0,
        TierKind::SSD => 1e-4,
        _ => 1e-3,
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
    latency: HashMap<TierKind, f64>,
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

    /// Records that opening an object in `tier` (header read and verified) took `seconds`.
    pub fn record_latency(&self, tier: TierKind, seconds: f64) {
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        let mut c = self.inner.lock();
        let old = c.latency.get(&tier).copied();
        c.latency.insert(tier, ewma(old, seconds));
    }

    /// Seconds to load `bytes` from `tier`: its open latency plus the bytes over its
    /// bandwidth.
    pub fn load_s(&self, tier: TierKind, bytes: usize) -> f64 {
        let c = self.inner.lock();
        let bw = c
            .bandwidth
            .get(&tier)
            .copied()
            .unwrap_or_else(|| default_bandwidth(tier));
        let lat = c
            .latency
            .get(&tier)
            .copied()
            .unwrap_or_else(|| default_latency(tier));
        lat + bytes as f64 / bw
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
        c.record_latency(TierKind::SSD, 0.0);
        assert!((c.load_s(TierKind::SSD, 1_000_000_000) - 1.0).abs() < 1e-9);
        c.record_load(TierKind::SSD, 100, 1.0);
        assert!((c.load_s(TierKind::SSD, 100) - 1.0).abs() < 1e-9);
        c.record_load(TierKind::SSD, 0, 0.0); // ignored
        assert!((c.load_s(TierKind::SSD, 100) - 1.0).abs() < 1e-9);
        // a remote tier: latency dominates small objects
        let remote = TierKind::REMOTE;
        c.record_latency(remote, 0.002);
        c.record_load(remote, 1_000_000, 0.001);
        assert!((c.load_s(remote, 1_000) - 0.002001).abs() < 1e-9);
    }
}
