//! CacheBlend's forward pass: layer 0 for every token, then at each check layer keep the
//! tokens whose cached KV deviates most from their fresh KV (or, query-aware, those the
//! question attends to most), and recompute only those on the layers after, attending over
//! the full-length cache with the exact causal mask. A check at layer 0 (query-aware only)
//! ranks before any layer runs, so no layer is computed for every token.

use std::cell::RefCell;

use kvquilt_model::{
    FillLayers, HookError, KvCache, LayerHook, LayerKv, LayerProbe, Model, ProbeRequest,
    RowReplacement, Rows, Tensor,
};

use crate::config::BlendConfig;
use crate::error::{BlendError, Result, invalid};
use crate::phases::PhaseClock;
use crate::select::{Deviation, TokenRoles, select};

/// A blend's outcome before the caller adds its bookkeeping.
pub(crate) struct Recomputed {
    /// The suffix's last hidden rows, `[suffix tokens, hidden]` (before the final norm: the
    /// head is the caller's, `crate::prompt_logprobs::suffix_head`).
    pub(crate) suffix_hidden: Tensor,
    /// Non-suffix tokens recomputed after the last check layer.
    pub(crate) recomputed: usize,
}

/// Runs the blend over `cache` (every prompt token at its absolute position; suffix rows and
/// not-yet-fetched layers may hold placeholders). `fill(l, kv)` supplies the cached KV of
/// layer `l` (cached segments plus placeholder suffix rows) and is called once per layer, in
/// layer order, just before the layer is needed. On return `cache` holds the blended KV.
/// `clock` is charged the query pass, the layers before the first check, the check layers
/// (scoring and selection) and the recompute layers; it is left in the head's phase. `query`, when given, is the
/// query-aware signal already computed (the suffix's attention per token, `[tokens]`, as
/// [`suffix_attention`] returns it: a graphed pass, `crate::graphs`); otherwise a
/// query-aware configuration runs that pass here.
#[allow(clippy::too_many_arguments)]
pub(crate) fn blend(
    model: &Model,
    tokens: &[u32],
    roles: &TokenRoles,
    cfg: &BlendConfig,
    cache: &mut KvCache,
    fill: &mut dyn FnMut(usize, &mut LayerKv) -> Result<()>,
    clock: &RefCell<PhaseClock>,
    query: Option<Vec<f32>>,
) -> Result<Recomputed> {
    cfg.validate(model.config().num_layers)?;
    if query.as_ref().is_some_and(|q| q.len() != tokens.len()) {
        return Err(invalid("a query signal not of the prompt's length"));
    }
    with_fill(model.config().num_layers, fill, |fill_once| {
        run(model, tokens, roles, cfg, cache, fill_once, clock, query)
    })
}

/// A model-side layer hook over `fill` that calls it at most once per layer and, when it
/// fails, returns `fill`'s own error (the store's) rather than the model's wrapper of it.
pub(crate) fn with_fill<T>(
    num_layers: usize,
    fill: &mut dyn FnMut(usize, &mut LayerKv) -> Result<()>,
    body: impl FnOnce(&mut dyn FnMut(usize, &mut LayerKv) -> kvquilt_model::Result<()>) -> Result<T>,
) -> Result<T> {
    let mut filled = vec![false; num_layers];
    let mut fill_error: Option<BlendError> = None;
    let mut fill_once = |l: usize, kv: &mut LayerKv| -> kvquilt_model::Result<()> {
        if !filled[l] {
            filled[l] = true;
            if let Err(e) = fill(l, kv) {
                let msg = format!("fetching layer {l}: {e}");
                fill_error = Some(e);
                return Err(kvquilt_model::ModelError::InvalidInput(msg));
            }
        }
        Ok(())
    };
    let result = body(&mut fill_once);
    match (result, fill_error) {
        (Err(_), Some(e)) => Err(e),
        (r, _) => r,
    }
}

/// The blend proper, under `fill_once` (see [`blend`]).
#[allow(clippy::too_many_arguments)]
fn run(
    model: &Model,
    tokens: &[u32],
    roles: &TokenRoles,
    cfg: &BlendConfig,
    cache: &mut KvCache,
    fill_once: &mut dyn FnMut(usize, &mut LayerKv) -> kvquilt_model::Result<()>,
    clock: &RefCell<PhaseClock>,
    query: Option<Vec<f32>>,
) -> Result<Recomputed> {
    let num_layers = model.config().num_layers;
    let n = tokens.len();
    let non_suffix = n - roles.suffix_len();
    let enter = |phase: &'static str| clock.borrow_mut().enter(phase).map(|_| ());

    // the cache's parallel context (APE), held off the passes its scope leaves exact
    let scope = cfg.parallel.map(|p| p.scope).unwrap_or_default();
    let context = cache.parallel_context().cloned();
    let attention = if cfg.query_weight <= 0.0 {
        None
    } else if let Some(q) = query {
        Some(q)
    } else {
        enter("query pass")?;
        let layers = match cfg.query_layers {
            0 => num_layers,
            n => n.min(num_layers),
        };
        cache.set_parallel_context(context.clone().filter(|_| scope.in_selection()));
        Some(suffix_attention(
            model, tokens, non_suffix, layers, roles, cache, fill_once,
        )?)
    };
    cache.set_parallel_context(context.filter(|_| scope.in_answer()));
    let mut active: Vec<usize> = (0..n).collect();
    let mut hidden = model.embed(tokens)?;
    let mut cursor = 0;
    // Spans of layers between check layers; the last span ends at the top with no check.
    let spans = cfg
        .check_layers
        .iter()
        .copied()
        .zip(cfg.schedule().into_iter().map(Some))
        .chain(std::iter::once((num_layers, None)));
    for (i, (check, ratio)) in spans.enumerate() {
        if cursor < check {
            enter(if i == 0 {
                "layers before check"
            } else {
                "recompute layers"
            })?;
            hidden = model
                .run_layers_with(
                    cursor..check,
                    hidden,
                    Rows::Replace(&active),
                    cache,
                    &mut FillLayers(&mut *fill_once),
                )?
                .hidden;
        }
        let Some(ratio) = ratio else { break };
        if check > 0 {
            fill_once(check, &mut cache.layers[check])?;
        }
        enter("check layer")?;
        // A check at layer 0 ranks by the question alone (validated): no layer has run, and
        // layer 0's stored KV is what the tokens alone give (as decoded, when a lossy codec
        // stored it), so nothing is projected and no row replaced.
        let mut scores = if check == 0 {
            vec![0.0; active.len()]
        } else {
            let fresh = model.kv_projection(check, &hidden)?;
            let cached = if active.len() == n {
                // every row is active (the first check): the layer as it is, no gather
                cache.layers[check].clone()
            } else {
                let rows = Tensor::new(
                    active.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                    model.device(),
                )?;
                LayerKv::new(
                    cache.layers[check].k.index_select(&rows, 0)?,
                    cache.layers[check].v.index_select(&rows, 0)?,
                )
            };
            let scores = deviation(&fresh, &cached, cfg.deviation)?;
            // CacheBlend's check layer attends with fresh K/V for every token it scored.
            let index = RowReplacement::new(n, &active, model.device())?;
            cache.layers[check] = cache.layers[check].replace_rows(&index, &fresh)?;
            scores
        };
        if let Some(att) = &attention {
            mix(&mut scores, &active, att, roles, cfg.query_weight);
        }
        if cfg.span > 0 {
            scores = dilate(&scores, &active, &roles.segment, cfg.span);
        }
        if cfg.whole_segments {
            scores = by_segment(&scores, &active, roles, cfg.chunk_sink);
        }
        let budget = (ratio * roles.blendable_len() as f32).floor() as usize;
        let kept = select(&active, &scores, roles, budget, ratio, cfg.spread());
        let pick: Vec<u32> = active
            .iter()
            .enumerate()
            .filter(|(_, t)| kept.binary_search(t).is_ok())
            .map(|(i, _)| i as u32)
            .collect();
        hidden = hidden.index_select(&Tensor::new(pick, model.device())?, 0)?;
        active = kept;
        cursor = check;
    }
    enter("head")?;
    // (the suffix is always active, and last)
    let suffix = roles.suffix_len();
    let suffix_hidden = hidden.narrow(0, hidden.dims()[0] - suffix, suffix)?;
    let recomputed = active
        .iter()
        .filter(|&&t| !roles_is_suffix(roles, t))
        .count();
    Ok(Recomputed {
        suffix_hidden,
        recomputed,
    })
}

/// Attention the suffix pays each token, summed over layers `0..layers`, heads and suffix
/// rows, `[n]`: the suffix alone is run over the cached KV (as `reuse` would). Its rows in
/// those layers of `cache` are overwritten; the blend recomputes them anyway.
///
/// Tokens computed in the pass (`roles.computed`) have no KV yet, only placeholder rows: the
/// suffix is run over the other tokens alone (at their own positions) and the computed ones
/// get no attention, so the ranking of the cached tokens is what it would be if the missing
/// segments were not in the prompt (test
/// `tests::the_question_pass_sees_only_the_tokens_that_have_kv`), not skewed by attention
/// paid to zero keys. That pass gathers the held rows of each layer it runs through into a
/// second cache, held until it returns.
fn suffix_attention(
    model: &Model,
    tokens: &[u32],
    non_suffix: usize,
    layers: usize,
    roles: &TokenRoles,
    cache: &mut KvCache,
    fill_once: &mut dyn FnMut(usize, &mut LayerKv) -> kvquilt_model::Result<()>,
) -> Result<Vec<f32>> {
    let n = tokens.len();
    let hidden = model.embed(&tokens[non_suffix..])?;
    let probe = ProbeRequest::summed_over_all(n - non_suffix);
    if !roles.computed.iter().any(|&c| c) {
        let rows: Vec<usize> = (non_suffix..n).collect();
        let mut hook = SuffixAttention {
            probe,
            fill: fill_once,
            total: None,
        };
        model.run_layers_with(0..layers, hidden, Rows::Replace(&rows), cache, &mut hook)?;
        return hook.sums(n);
    }
    if roles.computed[non_suffix..].iter().any(|&c| c) {
        return Err(invalid("a suffix token is marked computed in the pass"));
    }
    // the held tokens as runs of rows; the suffix is the last run's tail
    let mut held: Vec<std::ops::Range<usize>> = Vec::new();
    for t in (0..n).filter(|&t| !roles.computed[t]) {
        match held.last_mut() {
            Some(r) if r.end == t => r.end = t + 1,
            _ => held.push(t..t + 1),
        }
    }
    let m: usize = held.iter().map(|r| r.len()).sum();
    let positions: Vec<u32> = held
        .iter()
        .flat_map(|r| cache.positions[r.clone()].iter().copied())
        .collect();
    let shape = cache.layers[0].k.dims().to_vec();
    let zeros = Tensor::zeros(
        (m, shape[1], shape[2]),
        cache.layers[0].k.dtype(),
        model.device(),
    )?;
    let placeholder = LayerKv::new(zeros.clone(), zeros);
    let mut held_cache = KvCache::new(vec![placeholder; cache.layers.len()], positions);
    // the held rows keep their positions, so the context's correction applies as it would
    held_cache.set_parallel_context(cache.parallel_context().cloned());
    let mut fill_held = |l: usize, kv: &mut LayerKv| -> kvquilt_model::Result<()> {
        fill_once(l, &mut cache.layers[l])?;
        let parts = held
            .iter()
            .map(|r| cache.layers[l].narrow(r.start, r.len()))
            .collect::<kvquilt_model::Result<Vec<_>>>()?;
        *kv = LayerKv::cat(&parts.iter().collect::<Vec<_>>())?;
        Ok(())
    };
    let rows: Vec<usize> = (m - (n - non_suffix)..m).collect();
    let mut hook = SuffixAttention {
        probe,
        fill: &mut fill_held,
        total: None,
    };
    model.run_layers_with(
        0..layers,
        hidden,
        Rows::Replace(&rows),
        &mut held_cache,
        &mut hook,
    )?;
    let sums = hook.sums(m)?;
    let mut out = vec![0f32; n];
    for (t, s) in held.into_iter().flatten().zip(sums) {
        out[t] = s;
    }
    Ok(out)
}

/// Supplies each layer's KV and adds up its summed suffix attention, `[n]`, on the device.
struct SuffixAttention<'a> {
    probe: ProbeRequest,
    fill: &'a mut dyn FnMut(usize, &mut LayerKv) -> kvquilt_model::Result<()>,
    total: Option<Tensor>,
}

impl SuffixAttention<'_> {
    /// The summed attention per cached token, `[tokens]` (zeros when no layer ran),
    /// read back once.
    fn sums(self, tokens: usize) -> Result<Vec<f32>> {
        match self.total {
            Some(t) => Ok(t.to_vec1::<f32>()?),
            None => Ok(vec![0f32; tokens]),
        }
    }
}

impl LayerHook for SuffixAttention<'_> {
    fn probe(&self) -> Option<&ProbeRequest> {
        Some(&self.probe)
    }

    fn before_layer(
        &mut self,
        layer: usize,
        kv: &mut LayerKv,
    ) -> std::result::Result<(), HookError> {
        (self.fill)(layer, kv).map_err(HookError::new)
    }

    fn after_attention(
        &mut self,
        _layer: usize,
        probe: LayerProbe,
    ) -> std::result::Result<(), HookError> {
        let Some(per_token) = probe.rows else {
            return Err(HookError::msg("the summed probe reported nothing"));
        };
        self.total = Some(match self.total.take() {
            None => per_token,
            Some(t) => (t + per_token).map_err(HookError::new)?,
        });
        Ok(())
    }
}

/// Mixes each active token's deviation score with its suffix attention, each normalised by
/// its mean over the active tokens that are ranked (non-suffix, with cached KV: a computed
/// token's placeholder rows deviate by their whole size).
fn mix(scores: &mut [f32], active: &[usize], attention: &[f32], roles: &TokenRoles, w: f32) {
    let ranked = || {
        active
            .iter()
            .enumerate()
            .filter(|(_, t)| roles.segment[**t] != roles.segments && !roles.computed[**t])
    };
    let count = ranked().count().max(1) as f32;
    let mean_dev = (ranked().map(|(i, _)| scores[i]).sum::<f32>() / count).max(f32::MIN_POSITIVE);
    let mean_att =
        (ranked().map(|(_, &t)| attention[t]).sum::<f32>() / count).max(f32::MIN_POSITIVE);
    for (i, &t) in active.iter().enumerate() {
        scores[i] = (1.0 - w) * scores[i] / mean_dev + w * attention[t] / mean_att;
    }
}

/// Each active token's score becomes the largest score of the active tokens of its segment
/// within `span` positions of it (ties keep the earlier order).
fn dilate(scores: &[f32], active: &[usize], segment: &[usize], span: usize) -> Vec<f32> {
    (0..active.len())
        .map(|i| {
            let (t, seg) = (active[i], segment[active[i]]);
            let mut best = scores[i];
            for j in (0..i).rev() {
                if t - active[j] > span || segment[active[j]] != seg {
                    break;
                }
                best = best.max(scores[j]);
            }
            for j in i + 1..active.len() {
                if active[j] - t > span || segment[active[j]] != seg {
                    break;
                }
                best = best.max(scores[j]);
            }
            best
        })
        .collect()
}

/// Replaces each active token's score by its rank (higher first) in the order: segments by
/// the mean score of their active tokens past the first `sink` of the segment, descending
/// (segments whose KV is exact last); then, within a segment, the token's own score.
fn by_segment(scores: &[f32], active: &[usize], roles: &TokenRoles, sink: usize) -> Vec<f32> {
    let mut start = vec![usize::MAX; roles.segments + 1];
    for (t, &s) in roles.segment.iter().enumerate() {
        start[s] = start[s].min(t);
    }
    let (mut sum, mut count) = (
        vec![0f64; roles.segments + 1],
        vec![0usize; roles.segments + 1],
    );
    for (i, &t) in active.iter().enumerate() {
        let s = roles.segment[t];
        if t - start[s] >= sink {
            sum[s] += f64::from(scores[i]);
            count[s] += 1;
        }
    }
    let mean = |t: usize| {
        let s = roles.segment[t];
        if roles.exact[t] || count[s] == 0 {
            f64::NEG_INFINITY
        } else {
            sum[s] / count[s] as f64
        }
    };
    let mut order: Vec<usize> = (0..active.len()).collect();
    order.sort_by(|&a, &b| {
        mean(active[b])
            .total_cmp(&mean(active[a]))
            .then(roles.segment[active[a]].cmp(&roles.segment[active[b]]))
            .then(scores[b].total_cmp(&scores[a]))
    });
    let mut ranked = vec![0f32; active.len()];
    for (rank, &i) in order.iter().enumerate() {
        ranked[i] = (active.len() - rank) as f32;
    }
    ranked
}

/// Whether token `t` is a suffix token.
fn roles_is_suffix(roles: &TokenRoles, t: usize) -> bool {
    roles.segment[t] == roles.segments
}

/// Squared L2 distance per token between fresh and cached KV, `[tokens]`.
fn deviation(fresh: &LayerKv, cached: &LayerKv, how: Deviation) -> Result<Vec<f32>> {
    let sq = |a: &Tensor, b: &Tensor| -> Result<Vec<f32>> {
        let d =
            (a.to_dtype(kvquilt_model::DType::F32)? - b.to_dtype(kvquilt_model::DType::F32)?)?;
        Ok(d.sqr()?.flatten_from(1)?.sum(1)?.to_vec1::<f32>()?)
    };
    Ok(match how {
        Deviation::V => sq(&fresh.v, &cached.v)?,
        Deviation::K => sq(&fresh.k, &cached.k)?,
        Deviation::Kv => {
            let k = sq(&fresh.k, &cached.k)?;
            let v = sq(&fresh.v, &cached.v)?;
            let mean =
                |x: &[f32]| (x.iter().sum::<f32>() / x.len().max(1) as f32).max(f32::MIN_POSITIVE);
            let (mk, mv) = (mean(&k), mean(&v));
            k.iter().zip(&v).map(|(a, b)| a / mk + b / mv).collect()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::{by_segment, dilate, mix, suffix_attention};
    use crate::select::{Spread, TokenRoles, select};
    use kvquilt_model::{DType, Device, KvCache, LayerKv, Model, Tensor, load, positions};

    fn tiny_llama() -> Model {
        let dir = std::path::PathBuf::from(
            std::env::var_os("CARGO_MANIFEST_DIR")
                .unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
        )
        .join("../model/tests/fixtures/tiny-llama");
        load(&dir, &Device::Cpu, DType::F32)
            .expect("loading a tiny model")
            .model
    }

    /// `tokens` rows of `cache` in every layer (positions too).
    fn rows_of(cache: &KvCache, tokens: &[usize]) -> KvCache {
        let idx = Tensor::new(
            tokens.iter().map(|&t| t as u32).collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .unwrap();
        KvCache::new(
            cache
                .layers
                .iter()
                .map(|l| {
                    LayerKv::new(
                        l.k.index_select(&idx, 0).unwrap(),
                        l.v.index_select(&idx, 0).unwrap(),
                    )
                })
                .collect(),
            tokens.iter().map(|&t| cache.positions[t]).collect(),
        )
    }

    /// A segment computed in the pass has only placeholder (zero) rows when the question
    /// pass runs: the question must attend over the held tokens alone, at their own
    /// positions, and pay the computed tokens nothing.
    #[test]
    fn the_question_pass_sees_only_the_tokens_that_have_kv() {
        let model = tiny_llama();
        let layers = model.config().num_layers;
        // A (10 tokens), B (8, computed in the pass), C (12), suffix (5)
        let tokens: Vec<u32> = (0..35u32).map(|i| (i * 37 + 11) % 500).collect();
        let segment: Vec<usize> = (0..35)
            .map(|t| match t {
                0..10 => 0,
                10..18 => 1,
                18..30 => 2,
                _ => 3,
            })
            .collect();
        let computed: Vec<bool> = segment.iter().map(|&s| s == 1).collect();
        let roles = TokenRoles {
            segments: 3,
            forced: segment.iter().map(|&s| s == 3).collect(),
            exact: vec![false; 35],
            computed: computed.clone(),
            segment: segment.clone(),
        };
        // the assembled cache: full prefill's rows, B's and the suffix's zeroed
        let mut full = model.empty_cache().unwrap();
        model
            .prefill(&tokens, &positions(0, 35), &mut full)
            .unwrap();
        let mask: Vec<f32> = (0..35)
            .map(|t| if computed[t] || t >= 30 { 0.0 } else { 1.0 })
            .collect();
        let mask = Tensor::new(mask, &Device::Cpu)
            .unwrap()
            .reshape((35, 1, 1))
            .unwrap();
        let mut assembled = full.clone();
        for l in &mut assembled.layers {
            *l = LayerKv::new(
                l.k.broadcast_mul(&mask).unwrap(),
                l.v.broadcast_mul(&mask).unwrap(),
            );
        }
        let mut noop = |_: usize, _: &mut LayerKv| -> kvquilt_model::Result<()> { Ok(()) };
        let got = suffix_attention(
            &model,
            &tokens,
            30,
            layers,
            &roles,
            &mut assembled.clone(),
            &mut noop,
        )
        .unwrap();
        // the reference: the prompt without B, every other token at its own position
        let held: Vec<usize> = (0..35).filter(|&t| !computed[t]).collect();
        let held_tokens: Vec<u32> = held.iter().map(|&t| tokens[t]).collect();
        let held_roles = TokenRoles {
            segment: held.iter().map(|&t| segment[t]).collect(),
            segments: 3,
            forced: held.iter().map(|&t| t >= 30).collect(),
            exact: vec![false; 27],
            computed: vec![false; 27],
        };
        let want = suffix_attention(
            &model,
            &held_tokens,
            22,
            layers,
            &held_roles,
            &mut rows_of(&assembled, &held),
            &mut noop,
        )
        .unwrap();
        for (i, &t) in held.iter().enumerate() {
            assert!(
                (got[t] - want[i]).abs() <= 1e-5 * want[i].abs().max(1.0),
                "token {t}: {} vs {}",
                got[t],
                want[i]
            );
        }
        assert!(computed.iter().zip(&got).all(|(&c, &g)| !c || g == 0.0));
        // what the pass paid before: attention to B's zero keys shifted the held tokens'
        let mut as_cached = roles.clone();
        as_cached.computed = vec![false; 35];
        let before = suffix_attention(
            &model,
            &tokens,
            30,
            layers,
            &as_cached,
            &mut assembled.clone(),
            &mut noop,
        )
        .unwrap();
        let shift: f32 = held.iter().map(|&t| (before[t] - got[t]).abs()).sum();
        assert!(shift > 1e-3, "zero keys took no attention ({shift})");
        // every document missing: the question attends to itself alone
        let mut none_held = roles.clone();
        none_held.computed = (0..35).map(|t| t < 30).collect();
        let alone = suffix_attention(
            &model,
            &tokens,
            30,
            layers,
            &none_held,
            &mut assembled.clone(),
            &mut noop,
        )
        .unwrap();
        assert!(alone[..30].iter().all(|&a| a == 0.0));
        let total: f32 = alone[30..].iter().sum();
        let want = (layers * 5 * model.config().num_heads) as f32;
        assert!((total - want).abs() < 1e-3 * want, "{total} vs {want}");
        // a suffix token marked computed is refused
        let mut bad = roles.clone();
        bad.computed[33] = true;
        assert!(
            suffix_attention(&model, &tokens, 30, layers, &bad, &mut assembled, &mut noop).is_err()
        );
    }

    #[test]
    fn by_segment_takes_the_best_segment_whole() {
        // segment 1's mean past its first token (5.5) beats segment 0's (4.5), though segment
        // 0 holds the largest score past a sink
        let roles = TokenRoles {
            segment: vec![0, 0, 0, 1, 1, 1, 2],
            segments: 2,
            forced: vec![false, false, false, false, false, false, true],
            exact: vec![false; 7],
            computed: vec![false; 7],
        };
        let active: Vec<usize> = (0..7).collect();
        let scores = [0.0, 9.0, 0.0, 50.0, 6.0, 5.0, 0.0];
        let ranked = by_segment(&scores, &active, &roles, 1);
        let kept = select(&active, &ranked, &roles, 3, 0.5, Spread::Global);
        assert_eq!(kept, vec![3, 4, 5, 6]);
        // with one token left for segment 0, its own best comes next
        let kept = select(&active, &ranked, &roles, 4, 0.67, Spread::Global);
        assert_eq!(kept, vec![1, 3, 4, 5, 6]);
    }

    #[test]
    fn dilate_spreads_peaks_within_a_segment() {
        let active = [0, 1, 2, 3, 5, 6];
        let segment = [0, 0, 0, 1, 1, 1, 1];
        let s = dilate(&[0.0, 9.0, 0.0, 1.0, 0.0, 0.0], &active, &segment, 1);
        // token 3 is in segment 1: the 9 of token 1 does not cross; 5 is 2 away from 3
        assert_eq!(s, vec![9.0, 9.0, 9.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn mix_normalises_each_score_by_its_mean() {
        // tokens 0..3 ranked, token 3 is the suffix
        let roles = TokenRoles {
            segment: vec![0, 0, 0, 1],
            segments: 1,
            forced: vec![false, false, false, true],
            exact: vec![false; 4],
            computed: vec![false; 4],
        };
        let active = [0, 1, 2, 3];
        let att = [1.0, 0.0, 2.0, 50.0];
        let mut s = [4.0, 2.0, 0.0, 9.0];
        mix(&mut s, &active, &att, &roles, 0.5);
        // deviation mean 2, attention mean 1
        assert_eq!(&s[..3], &[1.5, 0.5, 1.0]);
        let mut only_att = [4.0, 2.0, 0.0, 9.0];
        mix(&mut only_att, &active, &att, &roles, 1.0);
        assert_eq!(&only_att[..3], &[1.0, 0.0, 2.0]);
        // a computed token (placeholder rows: a huge deviation) is not in the means
        let roles = TokenRoles {
            segment: vec![0, 0, 0, 0, 1],
            segments: 1,
            forced: vec![false, false, false, false, true],
            exact: vec![false; 5],
            computed: vec![false, false, false, true, false],
        };
        let active = [0, 1, 2, 3, 4];
        let att = [1.0, 0.0, 2.0, 7.0, 50.0];
        let mut with_computed = [4.0, 2.0, 0.0, 1e6, 9.0];
        mix(&mut with_computed, &active, &att, &roles, 0.5);
        assert_eq!(&with_computed[..3], &[1.5, 0.5, 1.0]);
    }
}
