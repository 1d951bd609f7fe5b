//! Fetch or recompute: running estimates of what loading a chunk from each tier and
//! recomputing it cost, so a request never takes longer than its full prefill would.
//!
//! Estimates are exponentially weighted moving averages of what this process measured:
//! prefill seconds against its work (every prefill the blender runs; tokens plus query–key
//! pairs weighed by the model's κ, [`CostModel::prefill_work`]) and bytes per second per tier
//! (per object stream: its bytes over the time the request spent waiting for and converting
//! its layers, i.e. what loading adds to the critical path while reads run ahead of compute).
//! Before a tier has been measured a conservative default applies; before any prefill has
//! been measured, loading is chosen.
//!
//! A plan's estimate of a whole `reuse` or `blend` request (loads, plus its recomputed share
//! of a full prefill) leaves out what the mode costs beyond that — the question's pass over
//! the cache, the check layer's scoring, per-layer launches on a GPU — which on short prompts
//! is most of it. So each mode's estimates are corrected by what its requests then took to
//! their first token (an affine fit of measured over estimated seconds, [`PlannedMode`]), and a
//! request the corrected estimate sends to full prefill runs its mode anyway now and then
//! ([`CostModel::explore_mode`]: soon after the correction changes its mind, then ever more
//! rarely while it holds), so the correction follows the machine.

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

/// A mode whose whole-request estimates are corrected by measurements
/// ([`CostModel::record_mode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PlannedMode {
    /// Every cached segment reused as is; only the suffix computed.
    Reuse,
    /// Selective recompute.
    Blend,
}

/// Running cost estimates, shared by every request of one blender.
#[derive(Debug, Default)]
pub struct CostModel {
    inner: Mutex<Costs>,
    /// κ: a model's attention work per query–key pair over its weights' work per token
    /// (0 when unknown). A prefill of `t` tokens is fitted as `t + κ·t(t+1)/2` units of work
    /// ([`CostModel::prefill_work`]), so that short chunk prefills predict a long prompt's:
    /// attention grows with the square of the length, which a fit affine in tokens extends
    /// from 512-token chunks to a 5k-token prompt at about half its measured cost (BENCHMARKS.md
    /// §10, "512-token chunks, real blends").
    pair_work: f64,
}

#[derive(Debug, Default, Clone)]
struct Costs {
    prefill: Affine,
    /// Whole prompts prefilled from an empty cache only (full prefill and fallbacks to it):
    /// what full prefill is predicted from once any was measured
    /// ([`CostModel::full_prefill_s`]).
    full: Affine,
    bandwidth: HashMap<TierKind, f64>,
    /// The highest bandwidth measured per tier: what it does when healthy (stall
    /// deadlines are set from it, so a stall never lengthens the next one's wait).
    peak: HashMap<TierKind, f64>,
    latency: HashMap<TierKind, f64>,
    /// Loads declined for a recompute since the tier was last loaded from.
    declined: HashMap<TierKind, u64>,
    /// Loads measured per tier. The first is provisional (it may carry one-time costs: a
    /// connection set up, staging buffers allocated): the second replaces it.
    loads: HashMap<TierKind, u32>,
    /// Per mode, measured seconds to the first token against the plan's estimate.
    modes: HashMap<PlannedMode, Affine>,
    /// Per mode, requests sent to full prefill by the correction since one last ran it.
    modes_declined: HashMap<PlannedMode, u64>,
    /// Per mode, the declines after which the next exploration runs
    /// ([`CostModel::explore_mode`]); absent: `EXPLORE_FIRST` (2).
    modes_explore_at: HashMap<PlannedMode, u64>,
}

/// After this many loads declined in a row, one is taken anyway to measure the tier again
/// (a remote that was slow may be fast now; the cost is one slower request in this many).
/// Also the longest a mode the correction declines waits to be measured again.
pub(crate) const EXPLORE_EVERY: u64 = 32;

/// Declines of a mode after which the first exploration runs, once the correction starts
/// sending it to full prefill; each further exploration waits twice as many, up to
/// `EXPLORE_EVERY` (32). One slow stretch measured (a busy host, a cold cache) then costs a few
/// fallbacks, not a run of 32 (BENCHMARKS.md §10, "a burst of fallbacks").
pub(crate) const EXPLORE_FIRST: u64 = 2;

/// Whether a prefill of `tokens` tokens in `seconds` is a sample the fits take (tokens
/// computed, a finite positive time).
fn is_prefill_sample(tokens: usize, seconds: f64) -> bool {
    tokens > 0 && seconds.is_finite() && seconds > 0.0
}

fn ewma(old: Option<f64>, new: f64) -> f64 {
    match old {
        Some(o) => o + ALPHA * (new - o),
        None => new,
    }
}

impl CostModel {
    /// A cost model whose prefill fit weighs a query–key pair as `pair_work` tokens' weight
    /// products (κ; the crate's `cost::pair_work` computes it from a model's shape).
    /// Non-finite or negative values are taken as 0 (work = tokens).
    pub fn with_pair_work(pair_work: f64) -> Self {
        Self {
            inner: Mutex::default(),
            pair_work: if pair_work.is_finite() && pair_work > 0.0 {
                pair_work
            } else {
                0.0
            },
        }
    }

    /// Units of work of a causal prefill of `tokens` tokens after `context` cached rows: one
    /// per token for its weight products, plus κ per query–key pair of its attention
    /// (`tokens·context` over the cached rows, `tokens·(tokens+1)/2` among its own).
    pub fn prefill_work(&self, context: usize, tokens: usize) -> f64 {
        prefill_work(self.pair_work, context, tokens)
    }

    /// κ, as given to [`CostModel::with_pair_work`] (0 when unknown).
    pub fn pair_work(&self) -> f64 {
        self.pair_work
    }

    /// Records a prefill of `tokens` tokens from an empty cache that took `seconds`.
    pub fn record_prefill(&self, tokens: usize, seconds: f64) {
        self.record_prefill_after(0, tokens, seconds);
    }

    /// Records a prefill of `tokens` tokens after `context` cached rows that took `seconds`.
    pub fn record_prefill_after(&self, context: usize, tokens: usize, seconds: f64) {
        if is_prefill_sample(tokens, seconds) {
            let work = self.prefill_work(context, tokens);
            self.inner.lock().prefill.add(work, seconds);
        }
    }

    /// Records a whole prompt of `tokens` tokens prefilled from an empty cache (a `full`
    /// request, or a fallback to it) that took `seconds`: a sample of the prefill fit, and
    /// of full prefill's own ([`CostModel::full_prefill_s`]).
    pub fn record_full_prefill(&self, tokens: usize, seconds: f64) {
        if is_prefill_sample(tokens, seconds) {
            let work = self.prefill_work(0, tokens);
            let mut c = self.inner.lock();
            c.prefill.add(work, seconds);
            c.full.add(work, seconds);
        }
    }

    /// Records `bytes` read from `tier` in `seconds`.
    pub fn record_load(&self, tier: TierKind, bytes: usize, seconds: f64) {
        if bytes == 0 || !seconds.is_finite() || seconds <= 0.0 {
            return;
        }
        let mut c = self.inner.lock();
        c.declined.remove(&tier);
        let n = c.loads.entry(tier).or_insert(0);
        *n = n.saturating_add(1);
        let old = if *n == 2 {
            None // the provisional first sample is replaced
        } else {
            c.bandwidth.get(&tier).copied()
        };
        let rate = bytes as f64 / seconds;
        c.bandwidth.insert(tier, ewma(old, rate));
        let peak = c.peak.entry(tier).or_insert(0.0);
        *peak = peak.max(rate);
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

    /// Whether `tier`'s load estimate rests on measurements: two loads measured (the first
    /// is provisional, [`CostModel::record_load`]); before that it is a default guess.
    pub fn load_is_measured(&self, tier: TierKind) -> bool {
        self.inner.lock().loads.get(&tier).copied().unwrap_or(0) >= 2
    }

    /// Seconds `bytes` take from `tier` when it is healthy: at the highest bandwidth measured
    /// (the default before any), no open latency. What stall deadlines are multiples of.
    pub fn healthy_load_s(&self, tier: TierKind, bytes: usize) -> f64 {
        let c = self.inner.lock();
        let bw = c
            .peak
            .get(&tier)
            .copied()
            .unwrap_or_else(|| default_bandwidth(tier));
        bytes as f64 / bw
    }

    /// Whether a load from `tier` that recomputing is estimated to beat should be taken
    /// anyway, to measure the tier: always until two loads were measured (its default
    /// estimate is a guess, and a guess that always loses is never corrected; the first
    /// measurement is provisional), then once every `EXPLORE_EVERY` (32) declines. Counts the
    /// decline otherwise.
    pub fn explore(&self, tier: TierKind) -> bool {
        let mut c = self.inner.lock();
        if c.loads.get(&tier).copied().unwrap_or(0) < 2 {
            return true;
        }
        let n = c.declined.entry(tier).or_insert(0);
        *n += 1;
        if *n >= EXPLORE_EVERY {
            *n = 0;
            return true;
        }
        false
    }

    /// Seconds to prefill `tokens` tokens from an empty cache, if any prefill has been
    /// measured.
    pub fn prefill_s(&self, tokens: usize) -> Option<f64> {
        self.prefill_after_s(0, tokens)
    }

    /// Seconds to prefill a whole prompt of `tokens` tokens: fitted over the whole prompts
    /// measured ([`CostModel::record_full_prefill`]) once there is one, else the prefill
    /// fit's [`CostModel::prefill_s`]. A blender that mostly blends feeds the prefill fit with
    /// chunk prefills, whose rate can under-state a long prompt's (attention's share grows
    /// with length, and a device's attention kernel can run at less of its peak than κ
    /// assumes): one full prefill measured is the better predictor of the next.
    pub fn full_prefill_s(&self, tokens: usize) -> Option<f64> {
        let work = self.prefill_work(0, tokens);
        let c = self.inner.lock();
        c.full.predict(work).or_else(|| c.prefill.predict(work))
    }

    /// Seconds to prefill `tokens` tokens after `context` cached rows, if any prefill has
    /// been measured.
    pub fn prefill_after_s(&self, context: usize, tokens: usize) -> Option<f64> {
        let work = self.prefill_work(context, tokens);
        self.inner.lock().prefill.predict(work)
    }

    /// Seconds that `tokens` rows after `context` cached rows add to a forward pass that
    /// runs anyway: the prefill fit's part that grows with work, without its fixed part
    /// (what every pass costs however few its rows: on a GPU, one read of the weights).
    /// What a prefix's pages not stored add when they are computed in the question's pass
    /// rather than in a pass of their own (`engine/chain.rs`'s deferred tail). `None` before
    /// any prefill was measured.
    pub fn prefill_rows_s(&self, context: usize, tokens: usize) -> Option<f64> {
        let work = self.prefill_work(context, tokens);
        self.inner.lock().prefill.variable(work)
    }

    /// Records that a request run in `mode`, planned at `estimated_s` seconds, took
    /// `seconds` to its first token.
    pub fn record_mode(&self, mode: PlannedMode, estimated_s: f64, seconds: f64) {
        let valid = |x: f64| x.is_finite() && x > 0.0;
        if !valid(estimated_s) || !valid(seconds) {
            return;
        }
        let mut c = self.inner.lock();
        c.modes_declined.remove(&mode);
        c.modes.entry(mode).or_default().add(estimated_s, seconds);
    }

    /// What a request of `mode` planned at `estimated_s` seconds is expected to take, by
    /// what such requests measured (the estimate itself before any was measured).
    pub fn mode_s(&self, mode: PlannedMode, estimated_s: f64) -> f64 {
        let c = self.inner.lock();
        c.modes
            .get(&mode)
            .and_then(|fit| fit.predict(estimated_s))
            .unwrap_or(estimated_s)
    }

    /// Whether a request of `mode` that the correction alone sends to full prefill should run
    /// its mode anyway, to measure it again: after `EXPLORE_FIRST` (2) such requests, then after
    /// twice as many each time, up to `EXPLORE_EVERY` (32), until the correction lets the mode
    /// run again ([`CostModel::mode_kept`]). Counts the decline otherwise.
    pub fn explore_mode(&self, mode: PlannedMode) -> bool {
        let mut c = self.inner.lock();
        let at = c
            .modes_explore_at
            .get(&mode)
            .copied()
            .unwrap_or(EXPLORE_FIRST);
        let n = c.modes_declined.entry(mode).or_insert(0);
        *n += 1;
        if *n >= at {
            *n = 0;
            c.modes_explore_at.insert(mode, (2 * at).min(EXPLORE_EVERY));
            return true;
        }
        false
    }

    /// Records that the correction let a request of `mode` run (its corrected estimate below
    /// full prefill's): should it change its mind again, the next exploration comes after
    /// `EXPLORE_FIRST` (2) declines.
    pub fn mode_kept(&self, mode: PlannedMode) {
        self.inner.lock().modes_explore_at.remove(&mode);
    }
}

/// Units of work of a causal prefill of `tokens` tokens after `context` cached rows, for a
/// model whose query–key pair weighs `pair_work` (κ) tokens' weight products: `t + κ·t·(c +
/// (t+1)/2)` ([`CostModel::prefill_work`] with that model's κ). Seconds are affine in it on
/// one device (test `chunk_prefills_predict_a_long_prompt_with_the_pairs_weighed`).
pub fn prefill_work(pair_work: f64, context: usize, tokens: usize) -> f64 {
    let (c, t) = (context as f64, tokens as f64);
    t + pair_work * t * (c + (t + 1.0) / 2.0)
}

/// κ of a decoder of this shape: attention multiply-adds per query–key pair over weight
/// multiply-adds per token, both per layer — `2·heads·head_dim` (the score and the weighted
/// sum) over the projections' and MLP's weights (`hidden·(heads + 2·kv_heads)·head_dim`
/// for Q, K and V, `heads·head_dim·hidden` for O, `3·hidden·intermediate` for a gated MLP).
/// SmolLM2-135M: 1,152 / 3.54 M = 3.3·10⁻⁴; 0 for a shape without weights.
pub(crate) fn pair_work(
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
) -> f64 {
    let (h, d) = (hidden as f64, head_dim as f64);
    let weights = h * (heads + 2 * kv_heads) as f64 * d
        + heads as f64 * d * h
        + 3.0 * h * intermediate as f64;
    if weights > 0.0 {
        2.0 * heads as f64 * d / weights
    } else {
        0.0
    }
}

/// Weight of the newest sample in the fits (a window of about ten samples).
const FIT_ALPHA: f64 = 0.1;

/// `y = a + b·x` fitted by exponentially weighted least squares over recent samples: prefill
/// seconds against work ([`CostModel::prefill_work`]; a prefill has a fixed part — kernel
/// launches, per-layer work independent of length — that a cost per token alone spreads
/// over the tokens: it then under-estimates short chunks and over-estimates long ones), or
/// a mode's measured seconds against its estimate. Until samples of more than one `x` were
/// seen, the fit is proportional.
#[derive(Debug, Default, Clone)]
struct Affine {
    w: f64,
    x: f64,
    y: f64,
    xx: f64,
    xy: f64,
}

impl Affine {
    fn add(&mut self, x: f64, y: f64) {
        let keep = 1.0 - FIT_ALPHA;
        let first = self.w == 0.0;
        let k = if first { 0.0 } else { keep };
        self.w = self.w * k + 1.0;
        self.x = self.x * k + x;
        self.y = self.y * k + y;
        self.xx = self.xx * k + x * x;
        self.xy = self.xy * k + x * y;
    }

    fn predict(&self, x: f64) -> Option<f64> {
        self.fit().map(|(a, b)| a + b * x)
    }

    /// The fit's part that grows with `x` (`b·x`, without the fixed part `a`).
    fn variable(&self, x: f64) -> Option<f64> {
        self.fit().map(|(_, b)| b * x)
    }

    /// `(a, b)` of `y = a + b·x`; `a` is 0 (a proportional fit) while the samples' `x` are
    /// too alike to tell a fixed part apart, or when the affine fit's `a` or `b` is
    /// negative. `None` before any sample.
    fn fit(&self) -> Option<(f64, f64)> {
        if self.w == 0.0 {
            return None;
        }
        let (mx, my) = (self.x / self.w, self.y / self.w);
        let var = self.xx / self.w - mx * mx;
        let proportional = (0.0, my / mx);
        // one length seen (or nearly): no fixed part can be told apart
        if var <= (0.05 * mx).powi(2) {
            return Some(proportional);
        }
        let b = (self.xy / self.w - mx * my) / var;
        let a = my - b * mx;
        if b <= 0.0 || a < 0.0 {
            return Some(proportional);
        }
        Some((a, b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunk prefills (128–512 tokens) of a machine whose prefill is `a + b·(t + κ·t²/2)`
    /// predict its 5,300-token prompt within 10% once the fit weighs pairs by the
    /// model's κ; affine in tokens, the same samples predict it at about 60% of its cost —
    /// the under-estimate that sent faster blends to full prefill.
    #[test]
    fn chunk_prefills_predict_a_long_prompt_with_the_pairs_weighed() {
        let kappa = pair_work(576, 9, 3, 64, 1536); // SmolLM2-135M's shape
        assert!((kappa - 3.255e-4).abs() < 1e-6, "{kappa}");
        // this VM's measured rate: attention a bit slower per unit than the products
        let truth = |t: f64| 0.043 + 6.2e-4 * (t + 1.2 * kappa * t * (t + 1.0) / 2.0);
        let shaped = CostModel::with_pair_work(kappa);
        let affine = CostModel::default();
        for t in [512, 384, 512, 128, 512, 256, 512, 512, 448, 512] {
            shaped.record_prefill(t, truth(t as f64));
            affine.record_prefill(t, truth(t as f64));
        }
        let long = truth(5300.0);
        let shaped_s = shaped.prefill_s(5300).unwrap();
        let affine_s = affine.prefill_s(5300).unwrap();
        assert!((shaped_s / long - 1.0).abs() < 0.1, "{shaped_s} vs {long}");
        assert!(affine_s / long < 0.7, "{affine_s} vs {long}");
        // the chunks themselves are still predicted as measured
        assert!((shaped.prefill_s(512).unwrap() / truth(512.0) - 1.0).abs() < 0.02);
        // no κ (unknown or nonsense): work is tokens
        assert_eq!(
            CostModel::with_pair_work(f64::NAN).prefill_work(5, 10),
            10.0
        );
        assert_eq!(CostModel::with_pair_work(-1.0).prefill_work(5, 10), 10.0);
        // a segment after cached rows attends to them too (a prefix's link is recorded so),
        // and a prompt's work is that of its parts in order
        let after = shaped.prefill_after_s(4800, 512).unwrap();
        assert!(after > 1.5 * shaped.prefill_s(512).unwrap(), "{after}");
        assert!(
            (shaped.prefill_work(4800, 512) + shaped.prefill_work(0, 4800)
                - shaped.prefill_work(0, 5312))
            .abs()
                < 1e-6
        );
        assert_eq!(pair_work(0, 0, 0, 0, 0), 0.0);
    }

    /// A device whose attention runs at a fifth of the rate κ assumes (the H200 trace's
    /// case, BENCHMARKS.md §10): its chunk prefills under-state a 5,184-token prompt by a
    /// quarter; one whole prompt measured predicts the next one's prefill, and chunks alone
    /// still predict chunks.
    #[test]
    fn a_measured_full_prefill_predicts_the_next_one() {
        let kappa = pair_work(4096, 32, 8, 128, 14336); // Llama-3.1-8B's shape
        let truth = |t: f64| 0.003 + 2.2e-5 * (t + 5.0 * kappa * t * (t + 1.0) / 2.0);
        let c = CostModel::with_pair_work(kappa);
        assert_eq!(c.full_prefill_s(100), None, "nothing measured");
        for t in [512, 384, 512, 128, 512, 256, 512, 512] {
            c.record_prefill(t, truth(t as f64));
        }
        let chunk_fit = c.full_prefill_s(5184).unwrap();
        assert_eq!(
            Some(chunk_fit),
            c.prefill_s(5184),
            "no prompt measured: the prefill fit"
        );
        assert!(chunk_fit < 0.8 * truth(5184.0), "{chunk_fit}");
        c.record_full_prefill(5184, truth(5184.0));
        let full = c.full_prefill_s(5184).unwrap();
        assert!((full / truth(5184.0) - 1.0).abs() < 1e-9, "{full}");
        let near = c.full_prefill_s(5000).unwrap();
        assert!((near / truth(5000.0) - 1.0).abs() < 0.05, "{near}");
        // more chunk prefills after it leave full prefill's fit as measured
        for t in [512, 256, 512] {
            c.record_prefill(t, truth(t as f64));
        }
        assert_eq!(c.full_prefill_s(5184), Some(full));
        c.record_full_prefill(0, 1.0); // ignored
        c.record_full_prefill(10, f64::NAN); // ignored
        assert_eq!(c.full_prefill_s(5184), Some(full));
    }

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

    #[test]
    fn the_prefill_fit_finds_the_fixed_part() {
        let c = CostModel::default();
        // 10 ms fixed + 0.1 ms per token, prefills of two lengths
        for _ in 0..5 {
            c.record_prefill(128, 0.010 + 128e-4);
            c.record_prefill(1024, 0.010 + 1024e-4);
        }
        let est = c.prefill_s(512).unwrap();
        assert!((est - (0.010 + 512e-4)).abs() < 1e-6, "{est}");
        assert!((c.prefill_s(64).unwrap() - (0.010 + 64e-4)).abs() < 1e-6);
        // rows added to a pass that runs anyway cost the per-token part alone
        let rows = c.prefill_rows_s(0, 64).unwrap();
        assert!((rows - 64e-4).abs() < 1e-6, "{rows}");
        // one length seen: no fixed part told apart, the rows cost what a prefill would
        let one = CostModel::default();
        assert_eq!(one.prefill_rows_s(0, 8), None);
        one.record_prefill(100, 0.02);
        assert_eq!(one.prefill_rows_s(0, 50), one.prefill_s(50));
    }

    #[test]
    fn a_modes_estimates_are_corrected_by_what_it_measured() {
        let c = CostModel::default();
        assert_eq!(
            c.mode_s(PlannedMode::Blend, 0.5),
            0.5,
            "nothing measured: the estimate"
        );
        // blends take a fixed 20 ms beyond the plan's estimate
        for _ in 0..5 {
            c.record_mode(PlannedMode::Blend, 0.010, 0.030);
            c.record_mode(PlannedMode::Blend, 0.050, 0.070);
        }
        assert!((c.mode_s(PlannedMode::Blend, 0.030) - 0.050).abs() < 1e-9);
        assert_eq!(c.mode_s(PlannedMode::Reuse, 0.030), 0.030, "per mode");
        c.record_mode(PlannedMode::Reuse, 0.0, 1.0); // ignored
        c.record_mode(PlannedMode::Reuse, 0.010, f64::NAN); // ignored
        assert_eq!(c.mode_s(PlannedMode::Reuse, 0.030), 0.030);
        // declined requests run the mode after EXPLORE_FIRST (2) declines, then after 4, 8
        // and 16, then once in EXPLORE_EVERY (32)
        let taken: Vec<u64> = (1..=2 * EXPLORE_EVERY)
            .filter(|_| c.explore_mode(PlannedMode::Blend))
            .collect();
        assert_eq!(taken, [2, 6, 14, 30, 62]);
        assert!(!c.explore_mode(PlannedMode::Blend));
        // a measurement resets the count, not the schedule
        c.record_mode(PlannedMode::Blend, 0.010, 0.030);
        assert!((1..EXPLORE_EVERY).all(|_| !c.explore_mode(PlannedMode::Blend)));
        assert!(c.explore_mode(PlannedMode::Blend));
        // the mode let run by the correction: the schedule starts again
        c.mode_kept(PlannedMode::Blend);
        assert!(!c.explore_mode(PlannedMode::Blend));
        assert!(c.explore_mode(PlannedMode::Blend));
    }

    #[test]
    fn an_unmeasured_tier_is_tried_then_rechecked_now_and_then() {
        let c = CostModel::default();
        let t = TierKind::REMOTE;
        assert!(c.explore(t) && c.explore(t), "never measured: always load");
        c.record_load(t, 1_000, 100.0); // a cold first load
        assert!(c.explore(t), "the first measurement is provisional");
        c.record_load(t, 1_000, 1.0);
        assert!(
            (c.load_s(t, 1_000) - c.load_s(t, 0) - 1.0).abs() < 1e-9,
            "replaced"
        );
        let taken = (0..3 * EXPLORE_EVERY).filter(|_| c.explore(t)).count();
        assert_eq!(taken, 3, "one in {EXPLORE_EVERY}");
        assert!(!c.explore(t));
        c.record_load(t, 1_000, 1.0); // a load resets the count
        assert!((1..EXPLORE_EVERY).all(|_| !c.explore(t)));
        assert!(c.explore(t));
    }
}
