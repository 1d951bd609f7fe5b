//! The plan of a `reuse` or `blend` request, made before anything is read or computed: for
//! every unique segment of the prompt, where its KV will come from and what that is
//! estimated to cost; the placement of every prompt segment onto those entries; and the rule
//! that runs the whole request as full prefill instead ([`Plan::fallback`]).
//!
//! Planning reads the cost estimates and where chunks are held; it changes nothing.

use std::collections::HashMap;

use kvquilt_kvstore::{ChunkKey, KvLayout, TierKind};

use crate::config::BlendConfig;
use crate::cost::{CostModel, PlannedMode};
use crate::request::{Fallback, SegmentSource};

/// Where a chunk is held when the plan is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Held {
    /// Resident in the blender's device tier.
    Device,
    /// In this store tier (the fastest that holds it).
    Store(TierKind),
}

/// Why a unique segment is computed rather than loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// Held nowhere.
    Miss,
    /// Held in the store, but recomputing it is estimated faster than loading it.
    Faster,
}

impl Why {
    /// How a segment computed for this reason is reported.
    pub(crate) fn source(self) -> SegmentSource {
        match self {
            Why::Miss => SegmentSource::Miss,
            Why::Faster => SegmentSource::RecomputedForSpeed,
        }
    }
}

/// Where one unique segment's KV will come from. Materialising may still end up computing
/// a planned load (the object evicted, unreadable or not matching since it was located).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Taken from the device tier (no read, no copy).
    Device,
    /// Streamed from the store; the tier is where it was located when planned.
    Load(TierKind),
    /// Prefilled alone by the chunk contract ([`crate::ChunkCodec::prefill`]).
    Compute(Why),
    /// Computed inside the request's own forward pass (`blend`): no cached KV is read, its
    /// rows are recomputed in every layer in context, outside the recompute budget. A
    /// miss is prefilled alone by the chunk contract after the first token, to be stored.
    InPass(Why),
}

impl Origin {
    /// Whether the segment is held nowhere (computed, one way or the other, and to be
    /// stored).
    pub(crate) fn is_miss(self) -> bool {
        matches!(self, Origin::Compute(Why::Miss) | Origin::InPass(Why::Miss))
    }
}

/// One unique segment of a prompt.
#[derive(Debug, Clone)]
pub(crate) struct Entry<'a> {
    /// Its content-addressed key in the request's namespace.
    pub(crate) key: ChunkKey,
    /// Its tokens (non-empty: requests are validated first).
    pub(crate) tokens: &'a [u32],
    /// Where its KV will come from.
    pub(crate) origin: Origin,
    /// Estimated seconds to obtain its KV by `origin` before the pass: load time (object
    /// bytes over the tier's measured bandwidth) or prefill time; 0 for a miss before any
    /// prefill has been measured, and for a segment computed in the pass (its cost is the
    /// pass's: [`Plan::fallback`]).
    pub(crate) cost_s: f64,
    /// Loaded although recomputing was estimated faster, to measure its tier
    /// ([`CostModel::explore`]).
    pub(crate) explores: bool,
    /// Loaded from a store tier whose load estimate is still a guess
    /// ([`CostModel::load_is_measured`]): the request's estimate is no basis for
    /// correcting the mode's estimates ([`Plan::estimate_is_guess`]).
    pub(crate) guessed: bool,
    /// The prompt's prefix kept as a chain of pages (`engine/chain.rs`): `key` names the
    /// whole prefix (its last page's chain key), and its KV is read page by page, the
    /// pages not stored computed over the ones read ([`Plan::page_prefix`]).
    pub(crate) paged: bool,
}

impl<'a> Entry<'a> {
    /// Plans one segment held at `held`: a device-tier entry is taken from there; a stored
    /// one is loaded unless `may_recompute` and recomputing it is estimated strictly faster
    /// (and the cost model does not want the load to measure the tier:
    /// [`CostModel::explore`]); anything else is computed as a miss. What is computed is
    /// computed in the pass when `in_pass`, else prefilled alone.
    fn new(
        key: ChunkKey,
        tokens: &'a [u32],
        held: Option<Held>,
        layout: &KvLayout,
        costs: &CostModel,
        may_recompute: bool,
        in_pass: bool,
    ) -> Self {
        let bytes = usize::try_from(layout.object_bytes(tokens.len())).unwrap_or(usize::MAX);
        let recompute_s = costs.prefill_s(tokens.len());
        let mut explores = false;
        let guessed = matches!(held, Some(Held::Store(t)) if !costs.load_is_measured(t));
        let (origin, cost_s) = match held {
            Some(Held::Device) => (Origin::Device, costs.load_s(TierKind::GPU, bytes)),
            Some(Held::Store(tier)) => {
                let load_s = costs.load_s(tier, bytes);
                match recompute_s {
                    Some(r) if may_recompute && r < load_s => {
                        if costs.explore(tier) {
                            explores = true;
                            (Origin::Load(tier), load_s)
                        } else {
                            (Origin::Compute(Why::Faster), r)
                        }
                    }
                    _ => (Origin::Load(tier), load_s),
                }
            }
            None => (Origin::Compute(Why::Miss), recompute_s.unwrap_or(0.0)),
        };
        let (origin, cost_s) = match origin {
            Origin::Compute(why) if in_pass => (Origin::InPass(why), 0.0),
            _ => (origin, cost_s),
        };
        let guessed = guessed && matches!(origin, Origin::Load(_));
        Self {
            key,
            tokens,
            origin,
            cost_s,
            explores,
            guessed,
            paged: false,
        }
    }
}

/// What a request will do for each of its segments.
///
/// Invariants: `entries` holds one entry per distinct key, in order of first appearance;
/// `placement` has one index into `entries` per prompt segment, in prompt order (a duplicate
/// segment maps to the entry of its first appearance, so its KV is obtained once and placed
/// twice).
#[derive(Debug, Clone)]
pub(crate) struct Plan<'a> {
    /// The unique segments.
    pub(crate) entries: Vec<Entry<'a>>,
    /// For each prompt segment, the index of its entry.
    pub(crate) placement: Vec<usize>,
}

impl<'a> Plan<'a> {
    /// Plans `segments` (in prompt order): `key_of` names a segment, `held` says where a key
    /// is held now, `layout` sizes the objects and `costs` estimates loads and prefills;
    /// stored segments are recomputed when that is estimated faster only if `may_recompute`
    /// (off, every stored segment is loaded: a request measured as its mode reads what is
    /// stored, e.g. through a lossy codec); segments to compute are computed in the pass
    /// when `in_pass` (`blend`: [`Origin::InPass`]), else prefilled alone first.
    pub(crate) fn build(
        segments: &[&'a [u32]],
        key_of: impl Fn(&[u32]) -> ChunkKey,
        held: impl Fn(&ChunkKey) -> Option<Held>,
        layout: &KvLayout,
        costs: &CostModel,
        may_recompute: bool,
        in_pass: bool,
    ) -> Self {
        let mut index: HashMap<ChunkKey, usize> = HashMap::new();
        let mut entries: Vec<Entry<'a>> = Vec::new();
        let mut placement = Vec::with_capacity(segments.len());
        for &tokens in segments {
            let key = key_of(tokens);
            let i = *index.entry(key).or_insert_with(|| {
                entries.push(Entry::new(
                    key,
                    tokens,
                    held(&key),
                    layout,
                    costs,
                    may_recompute,
                    in_pass,
                ));
                entries.len() - 1
            });
            placement.push(i);
        }
        Self { entries, placement }
    }

    /// Makes the first entry — the prompt's prefix, which opens the prompt — a paged one
    /// named `key` (its last page's chain key). `device`: resident whole in the device tier
    /// (taken from there). Else `run` is the longest run of its pages the store holds from
    /// its start (each page's tier and length): with one or more, the entry is a load of
    /// the tier holding the first, estimated as loading the run plus prefilling the rest
    /// over it — so a conversation whose new turn holds most of its history plans to read it
    /// (and a request holding it is not one that holds nothing) — unless `may_recompute`
    /// and prefilling the whole prefix is estimated strictly faster (a slow or stalled tier),
    /// when it is computed for speed like any stored segment (and the cost model may still
    /// take the load to measure the tier: [`CostModel::explore`]). With no page held, a
    /// miss. Computed either way, a paged prefix is prefilled before the pass, never in it
    /// (its KV is then exact: what `blend` never recomputes). With `tail_in_pass` the pages
    /// after a held run are computed as the first rows of the question's pass
    /// (`chain::Tail`), so they are estimated as the rows they add to that pass
    /// ([`CostModel::prefill_rows_s`]), not as a prefill of their own: on a GPU a pass of
    /// few rows costs a read of the weights (BENCHMARKS.md §13, "the answers' pages on the
    /// GPU"; a run that turns out to be read through a lossy codec has its tail prefilled
    /// before the pass after all, which the mode's correction learns). A plan without
    /// segments is left as it is.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn page_prefix(
        &mut self,
        key: ChunkKey,
        device: bool,
        run: &[(TierKind, usize)],
        layout: &KvLayout,
        costs: &CostModel,
        may_recompute: bool,
        tail_in_pass: bool,
    ) {
        let Some(first) = self.entries.first_mut() else {
            return;
        };
        let tokens = first.tokens;
        let held = match (device, run.first()) {
            (true, _) => Some(Held::Device),
            (false, Some(&(tier, _))) => Some(Held::Store(tier)),
            (false, None) => None,
        };
        *first = Entry::new(key, tokens, held, layout, costs, false, false);
        first.paged = true;
        if let Some(Held::Store(_)) = held {
            let bytes = |n: usize| usize::try_from(layout.object_bytes(n)).unwrap_or(usize::MAX);
            let read: usize = run.iter().map(|&(_, n)| n).sum();
            let load_s: f64 = run.iter().map(|&(t, n)| costs.load_s(t, bytes(n))).sum();
            let rest = tokens.len().saturating_sub(read);
            let rest_s = match rest {
                0 => None,
                n if tail_in_pass => costs.prefill_rows_s(read, n),
                n => costs.prefill_after_s(read, n),
            };
            let rest_s = rest_s.unwrap_or(0.0);
            first.cost_s = load_s + rest_s;
            first.guessed = run.iter().any(|&(t, _)| !costs.load_is_measured(t));
            let faster = costs
                .prefill_s(tokens.len())
                .filter(|&r| may_recompute && r < first.cost_s);
            if let (Some(recompute_s), Some(&(tier, _))) = (faster, run.first()) {
                if costs.explore(tier) {
                    first.explores = true;
                } else {
                    first.origin = Origin::Compute(Why::Faster);
                    first.cost_s = recompute_s;
                    first.guessed = false;
                }
            }
        }
    }

    /// The sum of the entries' estimates, seconds: what obtaining every unique segment's KV
    /// is estimated to take.
    pub(crate) fn estimate_s(&self) -> f64 {
        self.entries.iter().fold(0.0, |sum, e| sum + e.cost_s)
    }

    /// Prompt tokens whose segment is computed in the pass (every placement counted).
    pub(crate) fn in_pass_tokens(&self) -> usize {
        self.placement
            .iter()
            .map(|&i| &self.entries[i])
            .filter(|e| matches!(e.origin, Origin::InPass(_)))
            .map(|e| e.tokens.len())
            .sum()
    }

    /// Whether any entry's KV is held somewhere (the device tier, or a store tier to
    /// stream it from) rather than computed for this request.
    pub(crate) fn holds_any(&self) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(e.origin, Origin::Load(_) | Origin::Device))
    }

    /// The plan's estimate of the whole request in its mode, seconds to the first token:
    /// `estimate_s + share · full_s + suffix_s`, where `full_s` and `suffix_s` are the
    /// estimated prefill seconds of the whole prompt (`prompt_tokens`) and of its suffix
    /// (`suffix_tokens`, after the rest of the prompt), and `share = m + (1 − m) ·
    /// recompute_share`: the share of a full prefill the mode spends recomputing held
    /// tokens ([`recompute_share`]), with the fraction `m` of the non-suffix tokens computed
    /// in the pass ([`Plan::in_pass_tokens`]) run through every layer. `None` before any
    /// prefill was measured.
    pub(crate) fn mode_estimate_s(
        &self,
        costs: &CostModel,
        prompt_tokens: usize,
        suffix_tokens: usize,
        recompute_share: f64,
    ) -> Option<f64> {
        let full_s = costs.prefill_s(prompt_tokens)?;
        let cached = prompt_tokens.saturating_sub(suffix_tokens).max(1);
        let suffix_s = costs.prefill_after_s(cached, suffix_tokens).unwrap_or(0.0);
        let m = (self.in_pass_tokens() as f64 / cached as f64).min(1.0);
        let share = m + (1.0 - m) * recompute_share;
        Some(self.estimate_s() + share * full_s + suffix_s)
    }

    /// Whether the plan's estimate rests on a guessed load time (a store tier not yet
    /// measured twice): such a request is not recorded as a sample of its mode, or its
    /// guess would skew the mode's correction ([`CostModel::mode_s`]) for the requests after.
    pub(crate) fn estimate_is_guess(&self) -> bool {
        self.entries.iter().any(|e| e.guessed)
    }

    /// Whether the request should run as full prefill, and why: never slower than full
    /// prefill.
    ///
    /// Full prefill's time is [`CostModel::full_prefill_s`]: what whole prompts measured once
    /// one was, so that a mode's corrected estimate (measured seconds) is weighed against
    /// measured seconds too, not against a rate learnt from chunks.
    /// The rule: only once a prefill rate has been measured (before that, never), and never
    /// when a load is taken to measure its tier ([`Entry::explores`]). Then full
    /// prefill runs when no entry is held (computing chunks alone cannot beat computing
    /// them together; a device-tier entry is held, the cheapest of all), or when the
    /// mode's estimate ([`Plan::mode_estimate_s`]) is no less than full prefill's, once
    /// corrected by what requests of `mode` measured ([`CostModel::mode_s`]) — except
    /// that a request only the correction sends to full runs its mode now and then, to
    /// measure it again ([`CostModel::explore_mode`]; a mode the correction lets run
    /// resets that schedule, [`CostModel::mode_kept`]).
    /// `estimate_s` is [`Plan::mode_estimate_s`]'s (`None`: no prefill measured yet).
    pub(crate) fn fallback(
        &self,
        costs: &CostModel,
        mode: PlannedMode,
        prompt_tokens: usize,
        estimate_s: Option<f64>,
    ) -> Option<Fallback> {
        let (Some(full_s), Some(estimate)) = (costs.full_prefill_s(prompt_tokens), estimate_s)
        else {
            return None;
        };
        if self.entries.iter().any(|e| e.explores) {
            return None; // a load taken to measure its tier is not overruled
        }
        if !self.holds_any() {
            return Some(Fallback::NothingLoaded);
        }
        if estimate >= full_s {
            return Some(Fallback::Estimated);
        }
        if costs.mode_s(mode, estimate) < full_s {
            costs.mode_kept(mode);
            return None;
        }
        (!costs.explore_mode(mode)).then_some(Fallback::Measured)
    }
}

/// The share of a full prefill's compute a mode spends recomputing cached tokens, in `0..=1`:
/// `reuse` (`cfg` = None) none; `blend` every token through the layers before the first check
/// layer `f`, then `ratio` of the tokens that are not exact through the rest: `(f + ratio ·
/// (1 − e) · (L − f)) / L` for a model of `L = num_layers` layers, where `e` (clamped to
/// `0..=1`) is the fraction of the held tokens (those not computed in the pass) whose KV is
/// exact (never selected: `crate::select`). `cfg` must be validated.
pub(crate) fn recompute_share(
    cfg: Option<&BlendConfig>,
    num_layers: usize,
    exact_fraction: f64,
) -> f64 {
    match cfg {
        Some(c) => {
            let l = num_layers as f64;
            let first = c.check_layers.first().copied().unwrap_or(0) as f64;
            let blendable = 1.0 - exact_fraction.clamp(0.0, 1.0);
            (first + c.ratio as f64 * blendable * (l - first)) / l
        }
        None => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use kvquilt_kvstore::{KvDType, RopeScalingSpec};

    use super::*;

    fn layout() -> KvLayout {
        KvLayout {
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 4,
            dtype: KvDType::F32,
            k_pre_rope: true,
            rope_theta: 10_000.0,
            rope_scaling: RopeScalingSpec::None,
        }
    }

    /// [`Plan::fallback`] on the plan's own estimate.
    fn full_wins(
        plan: &Plan<'_>,
        costs: &CostModel,
        mode: PlannedMode,
        prompt: usize,
        suffix: usize,
        share: f64,
    ) -> bool {
        let estimate = plan.mode_estimate_s(costs, prompt, suffix, share);
        plan.fallback(costs, mode, prompt, estimate).is_some()
    }

    /// A key named by a segment's first token.
    fn key_of(tokens: &[u32]) -> ChunkKey {
        ChunkKey([tokens[0] as u8; 32])
    }

    #[test]
    fn a_duplicate_segment_maps_to_one_entry() {
        let (a, b) = (vec![1, 2, 3], vec![2, 3]);
        let segments: Vec<&[u32]> = vec![&a, &b, &a];
        let plan = Plan::build(
            &segments,
            key_of,
            |_| None,
            &layout(),
            &CostModel::default(),
            true,
            false,
        );
        assert_eq!(plan.entries.len(), 2);
        assert_eq!(plan.placement, vec![0, 1, 0]);
        assert_eq!(plan.entries[0].tokens, &a[..]);
        assert_eq!(plan.entries[1].key, key_of(&b));
        // nothing measured: misses are estimated free
        assert_eq!(plan.entries[0].origin, Origin::Compute(Why::Miss));
        assert_eq!(plan.estimate_s(), 0.0);
    }

    #[test]
    fn origins_follow_where_chunks_are_held_and_what_is_cheaper() {
        let (a, b, c) = (vec![1; 10], vec![2; 10], vec![3; 10]);
        let segments: Vec<&[u32]> = vec![&a, &b, &c];
        let held = |k: &ChunkKey| match k.0[0] {
            1 => Some(Held::Device),
            2 => Some(Held::Store(TierKind::SSD)),
            _ => None,
        };
        let costs = CostModel::default();
        let plan = Plan::build(&segments, key_of, held, &layout(), &costs, true, false);
        let origins: Vec<Origin> = plan.entries.iter().map(|e| e.origin).collect();
        assert_eq!(
            origins,
            vec![
                Origin::Device,
                Origin::Load(TierKind::SSD),
                Origin::Compute(Why::Miss)
            ]
        );
        // 10 tokens · 2 layers · (K + V) · 2 heads · 4 dims · 4 bytes = 1,280 bytes at 1 GB/s,
        // after the SSD's assumed 0.1 ms to open an object
        assert!((plan.entries[1].cost_s - (1e-4 + 1_280.0 / 1e9)).abs() < 1e-12);
        // recompute nearly free: the stored chunk is recomputed for speed, once the SSD tier
        // has been measured (before that, it is loaded to measure it)
        costs.record_prefill(1_000_000, 1e-9);
        let plan = Plan::build(&segments, key_of, held, &layout(), &costs, true, false);
        assert_eq!(
            plan.entries[1].origin,
            Origin::Load(TierKind::SSD),
            "explored"
        );
        costs.record_load(TierKind::SSD, 1_280, 1.28e-6);
        costs.record_load(TierKind::SSD, 1_280, 1.28e-6);
        let plan = Plan::build(&segments, key_of, held, &layout(), &costs, true, false);
        assert_eq!(plan.entries[0].origin, Origin::Device);
        assert_eq!(plan.entries[1].origin, Origin::Compute(Why::Faster));
        assert_eq!(Why::Faster.source(), SegmentSource::RecomputedForSpeed);
        // ... unless the caller measures the mode as asked: then what is stored is loaded
        let plan = Plan::build(&segments, key_of, held, &layout(), &costs, false, false);
        assert_eq!(plan.entries[1].origin, Origin::Load(TierKind::SSD));
    }

    #[test]
    fn a_paged_prefix_is_loaded_from_its_run_or_recomputed_when_that_is_faster() {
        // a 40-token prefix (pages 16, 16, 8, the first two held on the SSD) and a chunk
        let (prefix, chunk) = (vec![1; 40], vec![2; 10]);
        let segments: Vec<&[u32]> = vec![&prefix, &chunk];
        let run = [(TierKind::SSD, 16), (TierKind::SSD, 16)];
        let last = ChunkKey([9; 32]);
        let costs = CostModel::default();
        costs.record_prefill(1, 1e-3); // 1 ms per token
        let paged = |costs: &CostModel, run: &[(TierKind, usize)], may_recompute: bool| {
            let mut plan = Plan::build(&segments, key_of, |_| None, &layout(), costs, true, false);
            plan.page_prefix(last, false, run, &layout(), costs, may_recompute, false);
            plan.entries[0].clone()
        };
        // loading the run (2 × 2,560 bytes) and prefilling the 8 tokens after it beats
        // prefilling all 40
        let e = paged(&costs, &run, true);
        assert!(e.paged && e.key == last);
        assert_eq!(e.origin, Origin::Load(TierKind::SSD));
        // no page held: a miss, computed before the pass
        assert_eq!(paged(&costs, &[], true).origin, Origin::Compute(Why::Miss));
        // the SSD slows to 10 kB/s (a stalled disk): prefilling the whole prefix is faster
        for _ in 0..40 {
            costs.record_load(TierKind::SSD, 1_000_000, 100.0);
        }
        let e = paged(&costs, &run, true);
        assert_eq!(e.origin, Origin::Compute(Why::Faster), "{e:?}");
        assert_eq!(Some(e.cost_s), costs.prefill_s(40));
        assert!(!e.explores && !e.guessed);
        // a caller measuring its mode as asked reads what is stored, whatever it costs
        assert_eq!(
            paged(&costs, &run, false).origin,
            Origin::Load(TierKind::SSD)
        );
        // every 32 declines one plan loads, to measure the tier again
        let explored = (0..32)
            .filter(|_| paged(&costs, &run, true).explores)
            .count();
        assert_eq!(explored, 1);
    }

    #[test]
    fn a_tail_computed_in_the_question_s_pass_costs_its_rows_not_a_pass() {
        // a 40-token prefix (pages 16, 16, 8; the first two held on the SSD) and its question
        // alone: the 8 tokens after the run are computed in the question's pass
        let prefix = vec![1; 40];
        let segments: Vec<&[u32]> = vec![&prefix];
        let run = [(TierKind::SSD, 16), (TierKind::SSD, 16)];
        let last = ChunkKey([9; 32]);
        let costs = CostModel::default();
        // a GPU-like pass: 5 ms however few its rows (a read of the weights) + 0.1 ms a row
        costs.record_prefill(8, 5e-3 + 8e-4);
        costs.record_prefill(64, 5e-3 + 64e-4);
        // the SSD reads 2,560 bytes in 2.5 ms (a page in about 2 ms)
        costs.record_load(TierKind::SSD, 2_560, 2.5e-3);
        costs.record_load(TierKind::SSD, 2_560, 2.5e-3);
        let paged = |tail_in_pass: bool| {
            let mut plan = Plan::build(&segments, key_of, |_| None, &layout(), &costs, true, false);
            plan.page_prefix(last, false, &run, &layout(), &costs, true, tail_in_pass);
            plan.entries[0].clone()
        };
        let page_bytes = usize::try_from(layout().object_bytes(16)).unwrap();
        let load_s = 2.0 * costs.load_s(TierKind::SSD, page_bytes);
        // in a pass of its own the tail costs a pass: reading the run and prefilling the
        // tail (5.0 + 5.8 ms) loses to prefilling all 40 tokens (9 ms)
        let own = paged(false);
        assert_eq!(own.origin, Origin::Compute(Why::Faster), "{own:?}");
        assert!((costs.prefill_s(40).unwrap() - 9e-3).abs() < 1e-9);
        // in the question's pass it costs its 8 rows (0.8 ms): the run is read
        let in_pass = paged(true);
        assert_eq!(in_pass.origin, Origin::Load(TierKind::SSD), "{in_pass:?}");
        assert!(
            (in_pass.cost_s - (load_s + 8e-4)).abs() < 1e-9,
            "{in_pass:?}"
        );
    }

    #[test]
    fn full_prefill_wins_without_loads_or_when_estimated_no_slower() {
        let (a, b) = (vec![1; 100], vec![2; 100]);
        let segments: Vec<&[u32]> = vec![&a, &b];
        let stored = |_: &ChunkKey| Some(Held::Store(TierKind::HOST));
        let costs = CostModel::default();
        let plan = Plan::build(&segments, key_of, stored, &layout(), &costs, true, false);
        // no prefill measured: never
        assert!(!full_wins(&plan, &costs, PlannedMode::Reuse, 204, 4, 0.0));
        // 1 ms per token: loading 2 × 12,800 bytes from the host is far cheaper
        costs.record_prefill(1, 1e-3);
        let plan = Plan::build(&segments, key_of, stored, &layout(), &costs, true, false);
        assert!(plan.holds_any());
        assert!(!full_wins(&plan, &costs, PlannedMode::Reuse, 204, 4, 0.0));
        assert!(!full_wins(&plan, &costs, PlannedMode::Reuse, 204, 4, 0.9));
        // recomputing everything plus the loads is slower than full prefill
        assert!(full_wins(&plan, &costs, PlannedMode::Reuse, 204, 4, 1.0));
        // nothing held (every entry a miss): full prefill
        let plan = Plan::build(&segments, key_of, |_| None, &layout(), &costs, true, false);
        assert!(!plan.holds_any() && full_wins(&plan, &costs, PlannedMode::Reuse, 204, 4, 0.0));
        // every entry in the device tier: never full prefill for a mode that recomputes
        // less than all of it
        let device = |_: &ChunkKey| Some(Held::Device);
        let plan = Plan::build(&segments, key_of, device, &layout(), &costs, true, false);
        assert!(plan.holds_any() && !full_wins(&plan, &costs, PlannedMode::Reuse, 204, 4, 0.0));
        assert!(!full_wins(&plan, &costs, PlannedMode::Reuse, 204, 4, 0.9));
    }

    /// §10's trace cases: a 5,184-token blend of ten 512-token chunks (the first `missed`
    /// of them missed, the rest held in the host tier; 64 suffix tokens) measured at `share`
    /// of full prefill, on a blender whose prefills so far were chunk prefills of a machine
    /// taking `truth(t)` seconds for `t` tokens: whether the plan sends it to full prefill.
    fn long_blend_falls_back(
        costs: &CostModel,
        truth: &dyn Fn(f64) -> f64,
        missed: u8,
        share: f64,
    ) -> bool {
        let chunks: Vec<Vec<u32>> = (1..=10).map(|i| vec![i; 512]).collect();
        let segments: Vec<&[u32]> = chunks.iter().map(Vec::as_slice).collect();
        let held = |k: &ChunkKey| (k.0[0] > missed).then_some(Held::Store(TierKind::HOST));
        let (prompt, suffix) = (5184, 64);
        for t in [512, 384, 512, 128, 512, 256, 512, 512] {
            costs.record_prefill(t, truth(t as f64));
        }
        let plan = Plan::build(&segments, key_of, held, &layout(), costs, true, true);
        assert_eq!(plan.in_pass_tokens(), usize::from(missed) * 512);
        let estimate = plan.mode_estimate_s(costs, prompt, suffix, 0.3).unwrap();
        costs.record_mode(PlannedMode::Blend, estimate, share * truth(prompt as f64));
        full_wins(&plan, costs, PlannedMode::Blend, prompt, suffix, 0.3)
    }

    /// BENCHMARKS.md §10's case: a 5,184-token blend with half of its ten 512-token chunks
    /// missed runs in 0.62 of full prefill (0.40 + 0.44·m), yet a blender whose prefills were
    /// chunks alone sent it to full prefill: fitted affine in tokens, those chunks put a
    /// 5,184-token prefill at about half its cost. Fitted over work (κ from the shape), it
    /// blends; the affine fit (κ = 0) still falls back.
    #[test]
    fn chunk_prefills_alone_do_not_send_a_faster_long_blend_to_full_prefill() {
        let kappa = crate::cost::pair_work(576, 9, 3, 64, 1536); // SmolLM2-135M
        let truth = |t: f64| 0.043 + 6.2e-4 * (t + 1.2 * kappa * t * (t + 1.0) / 2.0);
        let falls_back = |costs: &CostModel| long_blend_falls_back(costs, &truth, 5, 0.62);
        assert!(!falls_back(&CostModel::with_pair_work(kappa)));
        assert!(falls_back(&CostModel::default()));
    }

    /// The H200 trace's case (BENCHMARKS.md §10, the 8B shape): a 5,184-token blend with
    /// six of its ten chunks missed runs in 0.85 of full prefill, but the device's attention
    /// runs at a fifth of the rate κ assumes, so its chunk prefills put full prefill at
    /// three quarters of its cost and the blend went to full prefill. Once one whole prompt
    /// was measured, the plan weighs the blend against that and blends.
    #[test]
    fn a_measured_full_prefill_keeps_a_faster_blend_from_falling_back() {
        let kappa = crate::cost::pair_work(4096, 32, 8, 128, 14336); // Llama-3.1-8B
        let truth = |t: f64| 0.003 + 2.2e-5 * (t + 5.0 * kappa * t * (t + 1.0) / 2.0);
        let costs = CostModel::with_pair_work(kappa);
        let falls_back = |costs: &CostModel| long_blend_falls_back(costs, &truth, 6, 0.85);
        assert!(falls_back(&costs), "weighed against the chunks' rate");
        costs.record_full_prefill(5184, truth(5184.0));
        assert!(!falls_back(&costs), "weighed against the prompt measured");
    }

    #[test]
    fn a_blend_computes_its_misses_in_the_pass_and_weighs_them_as_recomputed() {
        let (a, b) = (vec![1; 100], vec![2; 60]);
        // b twice: 160 of the 260 cached tokens are b's
        let segments: Vec<&[u32]> = vec![&a, &b, &b];
        let held = |k: &ChunkKey| (k.0[0] == 1).then_some(Held::Store(TierKind::HOST));
        let costs = CostModel::default();
        costs.record_prefill(1, 1e-3);
        let plan = Plan::build(&segments, key_of, held, &layout(), &costs, true, true);
        assert_eq!(plan.entries[1].origin, Origin::InPass(Why::Miss));
        assert_eq!(plan.entries[1].cost_s, 0.0, "its cost is the pass's");
        assert_eq!(plan.in_pass_tokens(), 120);
        // alone first, the same miss costs its prefill before the pass
        let alone = Plan::build(&segments, key_of, held, &layout(), &costs, true, false);
        assert_eq!(alone.entries[1].origin, Origin::Compute(Why::Miss));
        assert!((alone.entries[1].cost_s - 0.06).abs() < 1e-9);
        assert_eq!(alone.in_pass_tokens(), 0);
        // 1 ms per token, 264 prompt tokens (4 suffix): the pass recomputes 120/260 of the
        // cached tokens whole and `share` of the rest; a's 100 × 40 bytes · 2 · 2 · 4 load in
        // well under a millisecond
        let (full_s, suffix_s) = (0.264, 0.004);
        let m = 120.0 / 260.0;
        for share in [0.1, 0.3, 0.5] {
            let want = plan.estimate_s() + (m + (1.0 - m) * share) * full_s + suffix_s >= full_s;
            assert_eq!(
                full_wins(&plan, &costs, PlannedMode::Blend, 264, 4, share),
                want,
                "{share}"
            );
        }
        assert!(!full_wins(&plan, &costs, PlannedMode::Blend, 264, 4, 0.3));
        assert!(full_wins(&plan, &costs, PlannedMode::Blend, 264, 4, 0.99));
        let estimate = plan.mode_estimate_s(&costs, 264, 4, 0.99);
        let why = plan.fallback(&costs, PlannedMode::Blend, 264, estimate);
        assert_eq!(why, Some(Fallback::Estimated));
        // nothing held: full prefill, as for misses prefilled alone
        let none = Plan::build(&segments, key_of, |_| None, &layout(), &costs, true, true);
        assert!(full_wins(&none, &costs, PlannedMode::Blend, 264, 4, 0.0));
        let estimate = none.mode_estimate_s(&costs, 264, 4, 0.0);
        let why = none.fallback(&costs, PlannedMode::Blend, 264, estimate);
        assert_eq!(why, Some(Fallback::NothingLoaded));
    }

    #[test]
    fn what_a_mode_measured_corrects_its_estimate() {
        let (a, b) = (vec![1; 100], vec![2; 100]);
        let segments: Vec<&[u32]> = vec![&a, &b];
        let stored = |_: &ChunkKey| Some(Held::Store(TierKind::HOST));
        let costs = CostModel::default();
        costs.record_prefill(1, 1e-3);
        let plan = Plan::build(&segments, key_of, stored, &layout(), &costs, true, true);
        let estimate = plan.mode_estimate_s(&costs, 204, 4, 0.5).unwrap();
        // half of 204 ms recomputed, 4 ms of suffix and the loads: well under full prefill
        assert!(estimate < 0.204 && estimate > 0.106, "{estimate}");
        assert!(!full_wins(&plan, &costs, PlannedMode::Blend, 204, 4, 0.5));
        // blends measured at twice their estimates: full prefill, with the reason, but for
        // the requests that run the blend to measure it again: after 2 declines, then 4, 8
        // and 16, then every EXPLORE_EVERY (32)
        let measured_at = |costs: &CostModel, factor: f64| {
            for x in [0.05, 0.1, 0.2] {
                costs.record_mode(PlannedMode::Blend, x, factor * x);
            }
        };
        measured_at(&costs, 2.0);
        let why = plan.fallback(&costs, PlannedMode::Blend, 204, Some(estimate));
        assert_eq!(why, Some(Fallback::Measured));
        let explored = |costs: &CostModel, n: u64| -> Vec<u64> {
            (1..=n)
                .filter(|_| !full_wins(&plan, costs, PlannedMode::Blend, 204, 4, 0.5))
                .collect()
        };
        assert_eq!(explored(&costs, 100), [1, 5, 13, 29, 61, 93]);
        // reuse has measurements of its own
        assert!(!full_wins(&plan, &costs, PlannedMode::Reuse, 204, 4, 0.5));
        // blends measured faster again: the blend runs, and a later change of mind is
        // explored early again
        for _ in 0..8 {
            measured_at(&costs, 0.5);
        }
        assert!(!full_wins(&plan, &costs, PlannedMode::Blend, 204, 4, 0.5));
        for _ in 0..8 {
            measured_at(&costs, 3.0);
        }
        assert_eq!(explored(&costs, 40), [2, 6, 14, 30]);
    }

    #[test]
    fn blend_recomputes_the_layers_before_the_first_check_and_its_ratio_after() {
        assert_eq!(recompute_share(None, 24, 0.0), 0.0);
        let cfg = BlendConfig::cacheblend(0.5);
        // (1 + 0.5 · 3) / 4
        assert!((recompute_share(Some(&cfg), 4, 0.0) - 0.625).abs() < 1e-12);
        // three quarters of the cached tokens exact: (1 + 0.5 · 0.25 · 3) / 4
        assert!((recompute_share(Some(&cfg), 4, 0.75) - 0.34375).abs() < 1e-12);
        // all exact: the layers before the check alone
        assert!((recompute_share(Some(&cfg), 4, 1.0) - 0.25).abs() < 1e-12);
    }
}
