//! Token policies applied to a prompt's cache: observe the attention a policy reads while the
//! prompt prefills, let the policy choose a keep set per layer and KV head, and prune.
//!
//! [`observe_prefill`] prefills once with an [`Observer`] hook that reduces what the policies
//! asked for layer by layer on the device (the mean over the prompt's last `w` rows per query
//! head for every window size asked, per-KV-head column sums), so no probability matrix
//! outlives its layer. [`compress`] then turns one cache and its observations into a pruned
//! copy for any number of policies and budgets: the eval harness compresses one prefill many
//! ways, the sidecar once.

use std::time::{Duration, Instant};

use kvquilt_compression::policy::{
    Budget, BudgetSplit, DecodePool, DecodePoolSpec, KeptPositions, Observation, PolicyError,
    PolicySpec, ProbeNeeds, Shape, TokenPolicy, WindowMean, check_budget, select,
};
use kvquilt_model::{
    HookError, KvCache, LayerHook, LayerProbe, Model, ProbeRequest, ReadBack, Rows, Tensor,
};

use crate::error::{BlendError, Result, invalid};

/// A [`LayerHook`] that keeps, per layer, what a set of policies reads: the mean attention of
/// the call's last `w` query rows per query head for each window `w` (and their maximum when
/// a policy asks), and per-KV-head column sums over every row.
#[derive(Debug)]
pub struct Observer {
    probe: Option<ProbeRequest>,
    /// Window sizes, ascending and distinct; the probe asks for the last `max` rows.
    windows: Vec<usize>,
    /// Whether each window's maximum over its rows is kept too.
    row_max: bool,
    /// Query rows of the observed call.
    call_rows: usize,
    /// One entry per layer run, in order.
    observations: Vec<Observation>,
}

impl Observer {
    /// Observes a call of `rows` query rows for policies needing `needs`.
    pub fn new(rows: usize, needs: &[ProbeNeeds]) -> Self {
        let mut windows: Vec<usize> = needs
            .iter()
            .filter(|n| n.last_rows > 0)
            .map(|n| n.last_rows.min(rows))
            .collect();
        windows.sort_unstable();
        windows.dedup();
        let column_sums = needs.iter().any(|n| n.column_sums);
        let row_max = needs.iter().any(|n| n.row_max && n.last_rows > 0);
        let widest = windows.last().copied().unwrap_or(0);
        let probe = (widest > 0 || column_sums).then(|| ProbeRequest {
            rows: (rows - widest..rows).collect(),
            column_sums,
            ..ProbeRequest::default()
        });
        Self {
            probe,
            windows,
            row_max,
            call_rows: rows,
            observations: Vec::new(),
        }
    }

    /// With `on`, and when what the policies read is one window of every row of the call
    /// (no maximum, no column sums: what [`observe_last_rows`] observes for SnapKV), asks the
    /// attention for each query head's sums over the call's rows instead of every row's
    /// probabilities: the fused kernel computes those on the GPU without materialising a
    /// probability (`ProbeRequest::head_sums_over_all`); the window's mean is the sum over
    /// its rows. On the CPU the tiled attention computes the same (`tiled::attend_head_summed`),
    /// the reference attention from its probabilities.
    pub fn with_head_sums(mut self, on: bool) -> Self {
        let rows = self.call_rows;
        let one_window = self.windows.len() == 1 && self.windows[0] == rows;
        let column_sums = self.probe.as_ref().is_some_and(|p| p.column_sums);
        if on && rows > 0 && one_window && !self.row_max && !column_sums {
            self.probe = Some(ProbeRequest::head_sums_over_all(rows));
        }
        self
    }

    /// What was observed, one entry per layer.
    pub fn into_observations(self) -> Vec<Observation> {
        self.observations
    }

    fn reduce(
        &self,
        p: LayerProbe,
    ) -> std::result::Result<Observation, kvquilt_model::CandleError> {
        let mut windows = Vec::with_capacity(self.windows.len());
        if let (Some(sums), Some(&rows)) = (p.head_sums, self.windows.first()) {
            // [kv_heads, group, keys] summed over the call's rows: the one window's
            windows.push(WindowMean {
                rows,
                probs: (sums / rows as f64)?.flatten_all()?.to_vec1::<f32>()?,
                max: None,
            });
        }
        if let Some(rows) = p.rows {
            // [kv_heads, group, widest, keys]
            let widest = rows.dims()[2];
            for &w in &self.windows {
                let window = rows.narrow(2, widest - w, w)?;
                let max = match self.row_max {
                    true => Some(window.max(2)?.flatten_all()?.to_vec1::<f32>()?),
                    false => None,
                };
                windows.push(WindowMean {
                    rows: w,
                    probs: window.mean(2)?.flatten_all()?.to_vec1::<f32>()?,
                    max,
                });
            }
        }
        let column_sums = match p.column_sums {
            Some(s) => Some(s.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        Ok(Observation {
            windows,
            column_sums,
        })
    }
}

impl LayerHook for Observer {
    fn probe(&self) -> Option<&ProbeRequest> {
        self.probe.as_ref()
    }

    fn after_attention(
        &mut self,
        _layer: usize,
        probe: LayerProbe,
    ) -> std::result::Result<(), HookError> {
        let obs = self.reduce(probe).map_err(HookError::new)?;
        self.observations.push(obs);
        Ok(())
    }
}

/// Prefills `tokens` at `positions` into `cache` (empty: the observed rows are the cache's
/// rows), observing what policies with `needs` read. Returns the last token's logits and one
/// observation per layer.
pub fn observe_prefill(
    model: &Model,
    tokens: &[u32],
    positions: &[u32],
    cache: &mut KvCache,
    needs: &[ProbeNeeds],
) -> Result<(Tensor, Vec<Observation>)> {
    if !cache.is_empty() {
        return Err(BlendError::Invalid(
            "observing a prefill needs an empty cache (observations index its rows)".into(),
        ));
    }
    let mut observer = Observer::new(tokens.len(), needs);
    let logits = model.prefill_with(tokens, positions, cache, &mut observer)?;
    Ok((logits, observer.into_observations()))
}

/// A pruned cache and what pruning did.
#[derive(Debug, Clone)]
pub struct Compressed {
    /// The cache each layer and KV head now attends over.
    pub cache: KvCache,
    /// Stats for the response and metrics.
    pub stats: CompressStats,
}

/// What compressing a cache kept and cost.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct CompressStats {
    /// Entries (token × layer × KV head) before.
    pub entries_before: usize,
    /// Entries kept.
    pub entries_kept: usize,
    /// K and V bytes before (entries × 2 × head_dim × element size).
    pub kv_bytes_before: usize,
    /// K and V bytes the pruned cache holds, padding of ragged heads included.
    pub kv_bytes_after: usize,
    /// Time observing the prompt's last rows took, ms: re-running them over the cache with
    /// the policy's probe ([`compress_for_decode`]); 0 where the observations came with the
    /// prefill ([`observe_prefill`]).
    pub observe_ms: f64,
    /// Time the policy took to choose (scoring and selection), ms.
    pub policy_ms: f64,
    /// Time gathering the kept entries took, ms.
    pub prune_ms: f64,
}

/// `cache` (of the prompt the observations came from) pruned by `policy` to `budget`, the
/// kept entries placed where the policy says ([`TokenPolicy::positions`]).
/// A policy error (a budget below what it always keeps, a missing observation) is
/// [`BlendError::Policy`], and `cache` is untouched either way.
pub fn compress(
    model: &Model,
    cache: &KvCache,
    observations: &[Observation],
    policy: &dyn TokenPolicy,
    budget: Budget,
    split: &BudgetSplit,
) -> Result<Compressed> {
    let c = model.config();
    let shape = shape(model, cache.len());
    let t0 = Instant::now();
    let keep = select(policy, observations, &shape, budget, split)?;
    let policy_ms = t0.elapsed().as_secs_f64() * 1e3;
    let t1 = Instant::now();
    let mut pruned = cache.retain(&keep.layers)?;
    if policy.positions() == KeptPositions::Compact {
        pruned = pruned.with_compact_positions()?;
    }
    // (the gathers run on the device: their time, not their launch's)
    model.device().synchronize()?;
    let prune_ms = t1.elapsed().as_secs_f64() * 1e3;
    let entry_bytes = 2 * c.head_dim * model.dtype().size_in_bytes();
    let entries_before = shape.tokens * shape.kv_heads * shape.layers;
    let stats = CompressStats {
        entries_before,
        entries_kept: keep.entries(),
        kv_bytes_before: entries_before * entry_bytes,
        kv_bytes_after: pruned.len() * shape.kv_heads * shape.layers * entry_bytes,
        observe_ms: 0.0,
        policy_ms,
        prune_ms,
    };
    Ok(Compressed {
        cache: pruned,
        stats,
    })
}

/// A token policy and budget for one request's decode ([`compress_for_decode`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CompressPlan {
    /// The policy (never `full`).
    pub spec: PolicySpec,
    /// Entries kept per KV head.
    pub budget: Budget,
}

impl CompressPlan {
    /// A plan for `spec` under `budget`. Refused: `full` (nothing to do), a bad budget, and
    /// policies that read every prompt row's attention (H2O's column sums): a served request
    /// re-observes only the prompt's last rows over its assembled cache.
    pub fn new(spec: PolicySpec, budget: Budget) -> std::result::Result<Self, PolicyError> {
        budget.validate()?;
        let Some(policy) = spec.policy() else {
            return Err(PolicyError::BadParameter {
                policy: "full".into(),
                field: "policy".into(),
                why: "`full` compresses nothing; leave `compress` out instead".into(),
            });
        };
        if policy.needs().column_sums {
            return Err(PolicyError::BadParameter {
                policy: policy.name().into(),
                field: "policy".into(),
                why: "it reads every prompt row's attention, which a served request does not \
                      observe (use streaming, snapkv or sage)"
                    .into(),
            });
        }
        Ok(Self { spec, budget })
    }

    /// Checks the budget against a `tokens`-token prompt of `model` (what the policy always
    /// keeps must fit), before anything runs.
    pub fn check(&self, model: &Model, tokens: usize) -> std::result::Result<(), PolicyError> {
        let Some(policy) = self.spec.policy() else {
            return Ok(());
        };
        check_budget(
            policy,
            &shape(model, tokens),
            self.budget,
            &BudgetSplit::Uniform,
        )
    }
}

/// What compressing a request's cache did, for its stats.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CompressReport {
    /// The policy with every parameter (`PolicySpec`'s text form).
    pub policy: String,
    /// `None` when the policy failed and decoding ran over the uncompressed cache.
    pub stats: Option<CompressStats>,
    /// Why the policy failed, when it did.
    pub error: Option<String>,
}

/// The prompt's last rows re-run over `cache` (a prompt's assembled cache, any mode) to
/// observe what policies with `needs` read: `w` rows of compute for a `w`-row window. Their
/// K/V are recomputed in place (the suffix's rows: the same values the request computed).
pub fn observe_last_rows(
    model: &Model,
    tokens: &[u32],
    cache: &mut KvCache,
    needs: &[ProbeNeeds],
) -> Result<Vec<Observation>> {
    let n = tokens.len();
    if cache.len() != n || n == 0 {
        return Err(BlendError::Invalid(format!(
            "observing the last rows of a {n}-token prompt over a cache of {}",
            cache.len()
        )));
    }
    // a window's per-head sums come from the fused kernel on the GPU and the tiled
    // attention on the CPU, neither materialising the window's probabilities
    observe_rows(model, tokens, cache, needs, true)
}

/// [`observe_last_rows`] after its checks, asking for per-head sums
/// ([`Observer::with_head_sums`]) when `head_sums`.
fn observe_rows(
    model: &Model,
    tokens: &[u32],
    cache: &mut KvCache,
    needs: &[ProbeNeeds],
    head_sums: bool,
) -> Result<Vec<Observation>> {
    let n = tokens.len();
    let widest = needs.iter().map(|x| x.last_rows.min(n)).max().unwrap_or(0);
    let layers = model.config().num_layers;
    if widest == 0 {
        return Ok(vec![Observation::default(); layers]);
    }
    let rows: Vec<usize> = (n - widest..n).collect();
    let mut observer = Observer::new(widest, needs).with_head_sums(head_sums);
    let hidden = model.embed(&tokens[n - widest..])?;
    model.run_layers_with(
        0..layers,
        hidden,
        Rows::Replace(&rows),
        cache,
        &mut observer,
    )?;
    Ok(observer.into_observations())
}

/// `cache` (of `tokens`, as the request assembled it) compressed by `plan` for decoding.
/// Never fails: if observing or the policy fails, decoding runs over the uncompressed cache
/// and the report says why (the caller counts it). Observing recomputes the last rows in
/// place, so on failure the cache is the one those rows were recomputed over (equal values).
pub fn compress_for_decode(
    model: &Model,
    tokens: &[u32],
    mut cache: KvCache,
    plan: &CompressPlan,
) -> (KvCache, CompressReport) {
    let policy_name = plan.spec.to_string();
    let Some(policy) = plan.spec.policy() else {
        return (
            cache,
            CompressReport {
                policy: policy_name,
                stats: None,
                error: Some("`full` compresses nothing".into()),
            },
        );
    };
    let t0 = Instant::now();
    let result =
        observe_last_rows(model, tokens, &mut cache, &[policy.needs()]).and_then(|observations| {
            // (on a device, the last layer's work after its probe is still queued)
            model.device().synchronize()?;
            let observe_ms = t0.elapsed().as_secs_f64() * 1e3;
            let mut c = compress(
                model,
                &cache,
                &observations,
                policy,
                plan.budget,
                &BudgetSplit::Uniform,
            )?;
            c.stats.observe_ms = observe_ms;
            Ok(c)
        });
    fall_back_on_error(cache, policy_name, result)
}

/// The compressed cache and its stats, or the uncompressed cache and the error.
fn fall_back_on_error(
    cache: KvCache,
    policy: String,
    result: Result<Compressed>,
) -> (KvCache, CompressReport) {
    match result {
        Ok(c) => (
            c.cache,
            CompressReport {
                policy,
                stats: Some(c.stats),
                error: None,
            },
        ),
        Err(e) => {
            tracing::warn!("token policy {policy} failed, decoding uncompressed: {e}");
            (
                cache,
                CompressReport {
                    policy,
                    stats: None,
                    error: Some(e.to_string()),
                },
            )
        }
    }
}

fn shape(model: &Model, tokens: usize) -> Shape {
    let c = model.config();
    Shape {
        tokens,
        kv_heads: c.num_kv_heads,
        group: c.group_size(),
        layers: c.num_layers,
    }
}

#[cfg(test)]
mod tests {
    use kvquilt_compression::policy::{SageKv, Schedule, Scorer, StreamingLlm};
    use kvquilt_model::ModelConfig;

    use super::*;

    fn model() -> Model {
        crate::test_model::tiny_random(ModelConfig::smollm2_135m().context_length)
    }

    fn prompt_cache(m: &Model, n: usize) -> (Vec<u32>, KvCache) {
        let tokens: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % 64).collect();
        let mut cache = m.empty_cache().unwrap();
        m.prefill(&tokens, &kvquilt_model::positions(0, n), &mut cache)
            .unwrap();
        (tokens, cache)
    }

    #[test]
    fn a_served_request_compresses_to_its_budget() {
        let m = model();
        let (tokens, cache) = prompt_cache(&m, 40);
        let plan = CompressPlan::new(
            PolicySpec::Sage(SageKv {
                sinks: 2,
                recent: 4,
            }),
            Budget::Compression(4.0),
        )
        .unwrap();
        plan.check(&m, tokens.len()).unwrap();
        let (pruned, report) = compress_for_decode(&m, &tokens, cache, &plan);
        let stats = report.stats.expect("applied");
        assert_eq!(report.error, None);
        assert_eq!(stats.entries_kept, 10 * 2 * 2);
        assert_eq!(stats.entries_before, 40 * 2 * 2);
        assert!(pruned.is_pruned());
        assert_eq!(pruned.len(), 10);
        // decoding goes on over the pruned cache
        let mut pruned = pruned;
        m.decode_step(5, &mut pruned, &mut ()).unwrap();
    }

    /// A step's sums read after the step (`defer_reads`, what a device does: each layer's
    /// pool rows summed where they are — or already summed per KV head, as the fused kernel
    /// reports a grouped probe — joined (`concat`) and read in one copy) come out as the
    /// CPU's loop sums them as each layer reports: `[layer][kv_head][row]` over the scored
    /// rows alone, layer by layer in order. (Both over CPU tensors here: the narrowing,
    /// joining and order are the device-independent part.)
    #[test]
    fn sums_read_after_the_step_are_each_layers_group_sums_in_order() {
        let layers: Vec<Tensor> = (0..3u32)
            .map(|l| {
                let v: Vec<f32> = (0..2 * 3 * 7u32)
                    .map(|i| ((i * 7 + l * 13) % 11) as f32 / 16.0)
                    .collect();
                Tensor::from_vec(v, (2, 3, 7), &kvquilt_model::Device::Cpu).unwrap()
            })
            .collect();
        // the sums as a path reports them from key `from` on (the fused kernel: the pool's
        // rows alone), `grouped` each KV head's group summed (the fused kernel's
        // `head_sums_grouped`)
        // (deferred reads go through a `ReadBack` started by the last layer, as a decoder's do,
        // or are read when the step is done: both ways here)
        let reported_via = |defer_reads: bool, from: usize, grouped: bool, read_back: bool| {
            let mut reader = ReadBack::new();
            let mut step = StepAttention {
                probe: None,
                scored: 2..7,
                defer_reads,
                per_layer: Vec::new(),
                on_device: Vec::new(),
                layers: layers.len(),
                reader: read_back.then_some(&mut reader),
                read_started: false,
                read_back_failed: None,
            };
            for (l, x) in layers.iter().enumerate() {
                let mut x = x.narrow(2, from, 7 - from).unwrap();
                if grouped {
                    x = x.sum_keepdim(1).unwrap();
                }
                let probe = LayerProbe {
                    head_sums: Some(x),
                    head_sums_from: from,
                    ..LayerProbe::default()
                };
                step.after_attention(l, probe)?;
            }
            if defer_reads && read_back {
                assert!(step.read_started && step.reader.as_ref().is_some_and(|r| r.is_pending()));
            }
            let (sums, failed) = step.into_sums().map_err(HookError::new)?;
            assert_eq!(failed, None);
            Ok::<_, HookError>(sums)
        };
        let reported = |defer_reads: bool, from: usize, grouped: bool| {
            let read_back = reported_via(defer_reads, from, grouped, true);
            let after = reported_via(defer_reads, from, grouped, false);
            assert_eq!(
                read_back.as_ref().ok(),
                after.as_ref().ok(),
                "read back vs after the step"
            );
            read_back
        };
        let sums = |defer_reads: bool, from: usize| reported(defer_reads, from, false);
        let want = sums(false, 0).unwrap();
        for (defer, from) in [(true, 0), (false, 2), (true, 2), (true, 1)] {
            assert_eq!(
                sums(defer, from).unwrap(),
                want,
                "deferred {defer}, from {from}"
            );
        }
        assert!(sums(true, 3).is_err(), "sums that miss a pool row");
        for (defer, from) in [(true, 2), (true, 0), (false, 1)] {
            let got = reported(defer, from, true).unwrap();
            let close = got
                .iter()
                .flatten()
                .flatten()
                .zip(want.iter().flatten().flatten());
            assert!(
                got.len() == 3 && close.clone().count() == 3 * 2 * 5,
                "grouped {got:?}"
            );
            for (a, b) in close {
                assert!(
                    (a - b).abs() <= 1e-6,
                    "grouped, deferred {defer}, from {from}"
                );
            }
        }
        let got = sums(true, 0).unwrap();
        assert_eq!(want.len(), 3);
        let by_hand: f32 = (0..3)
            .map(|g| layers[1].to_vec3::<f32>().unwrap()[1][g][2])
            .sum();
        assert!(
            (want[1][1][0] - by_hand).abs() <= 1e-6,
            "row 2 is the first scored"
        );
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.len(), 2);
            for (gh, wh) in g.iter().zip(w) {
                assert_eq!(gh.len(), 5);
                for (a, b) in gh.iter().zip(wh) {
                    assert!((a - b).abs() <= 1e-6, "{got:?} vs {want:?}");
                }
            }
        }
    }

    /// A window's per-head sums (what the GPU's fused kernel reports) observe what its rows'
    /// probabilities do, to f32 rounding (here the sums through the CPU's tiled attention, the
    /// rows' probabilities through the reference), and give SnapKV the same keep set; a window of fewer rows than the call, or
    /// several windows, keeps the rows' probabilities.
    #[test]
    fn per_head_sums_observe_what_the_rows_probabilities_do() {
        let m = model();
        let (tokens, cache) = prompt_cache(&m, 40);
        let snap = kvquilt_compression::policy::SnapKv {
            window: 8,
            ..Default::default()
        };
        let needs = [snap.needs()];
        let rows = observe_rows(&m, &tokens, &mut cache.clone(), &needs, false).unwrap();
        let sums = observe_rows(&m, &tokens, &mut cache.clone(), &needs, true).unwrap();
        assert_eq!(rows.len(), sums.len());
        for (a, b) in rows.iter().zip(&sums) {
            let (a, b) = (&a.windows[0], &b.windows[0]);
            assert_eq!((a.rows, b.rows), (8, 8));
            assert_eq!(a.probs.len(), b.probs.len());
            let worst = a
                .probs
                .iter()
                .zip(&b.probs)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-6, "{worst}");
        }
        let keep = |obs: &[Observation]| {
            compress(
                &m,
                &cache,
                obs,
                &snap,
                Budget::Entries(16),
                &BudgetSplit::Uniform,
            )
            .unwrap()
            .cache
            .entries_per_head()
        };
        assert_eq!(keep(&rows), keep(&sums));
        // what the sums cannot give keeps the rows
        let narrower = Observer::new(10, &needs).with_head_sums(true);
        assert!(!narrower.probe.as_ref().unwrap().head_sums);
        let two = [
            needs[0],
            ProbeNeeds {
                last_rows: 4,
                ..needs[0]
            },
        ];
        let mixed = Observer::new(8, &two).with_head_sums(true);
        assert!(!mixed.probe.as_ref().unwrap().head_sums);
        let alone = Observer::new(8, &needs).with_head_sums(true);
        assert!(alone.probe.unwrap().head_sums);
    }

    fn pool(budget: usize, recent: usize, scorer: Scorer, schedule: Schedule) -> DecodePoolSpec {
        DecodePoolSpec {
            budget,
            recent,
            max_new: 40,
            scorer,
            schedule,
            from_prompt: false,
            slack: 0,
        }
    }

    /// StreamingLLM's `positions=compact` renumbers what it keeps from zero (decoding goes on
    /// after it); the default leaves the kept entries at their prompt positions.
    #[test]
    fn streaming_renumbers_what_it_keeps_when_asked() {
        let m = model();
        let (tokens, cache) = prompt_cache(&m, 40);
        let plan = |text: &str| CompressPlan::new(text.parse().unwrap(), Budget::Entries(10));
        let compact_plan = plan("streaming:sinks=4:positions=compact").unwrap();
        let (mut compact, r) = compress_for_decode(&m, &tokens, cache.clone(), &compact_plan);
        assert_eq!(r.error, None);
        assert_eq!(r.policy, "streaming:sinks=4:positions=compact");
        assert_eq!(compact.positions, kvquilt_model::positions(0, 10));
        let (mut original, _) =
            compress_for_decode(&m, &tokens, cache, &plan("streaming:sinks=4").unwrap());
        assert_eq!(original.positions.last(), Some(&39));
        let a = m.decode_step(5, &mut compact, &mut ()).unwrap();
        let b = m.decode_step(5, &mut original, &mut ()).unwrap();
        assert_eq!(compact.positions.last(), Some(&10));
        assert_eq!(original.positions.last(), Some(&40));
        let diff = a
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(&b.to_vec1::<f32>().unwrap())
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff > 1e-4, "the numbering changed nothing");
    }

    /// SAGE-KV whole: the prompt pruned to sinks + one-time top-k + a recent window, then
    /// the `sage` decode pool rolls that window, so the cache keeps its size while decoding.
    #[test]
    fn sage_decodes_at_a_constant_size() {
        let m = model();
        let (tokens, cache) = prompt_cache(&m, 40);
        let plan = CompressPlan::new(
            PolicySpec::Sage(SageKv {
                sinks: 2,
                recent: 4,
            }),
            Budget::Entries(10),
        )
        .unwrap();
        let (pruned, report) = compress_for_decode(&m, &tokens, cache, &plan);
        assert_eq!(report.error, None);
        assert_eq!(pruned.len(), 10);
        let spec = DecodePoolSpec::named("sage", 4, None, 40).unwrap();
        let mut d = PooledDecoder::new(&m, pruned, spec).unwrap();
        for t in 0..20u32 {
            d.step(&m, (t * 5 + 1) % 64).unwrap();
            assert_eq!(d.cache().len(), 10, "step {t}");
            assert_eq!(d.cache().positions.last(), Some(&(40 + t)));
        }
        assert_eq!(d.peak_rows(), 11, "one row over, for one step");
        assert_eq!(d.evictions(), 20);
        assert!(
            d.cache()
                .entries_per_head()
                .iter()
                .flatten()
                .all(|&n| n == 10)
        );
    }

    #[test]
    fn a_decode_pool_holds_the_cache_to_prompt_plus_budget() {
        let m = model();
        let (_, cache) = prompt_cache(&m, 20);
        for (scorer, schedule) in [
            (Scorer::Instantaneous, Schedule::Slide),
            (Scorer::Cumulative, Schedule::Slide),
            (Scorer::Recency, Schedule::Slide),
            (Scorer::Instantaneous, Schedule::Adaptive),
        ] {
            let mut d =
                PooledDecoder::new(&m, cache.clone(), pool(8, 4, scorer, schedule)).unwrap();
            for t in 0..30 {
                d.step(&m, (t * 5 + 1) % 64).unwrap();
                assert!(d.cache().len() <= 20 + 8, "{scorer:?} {schedule:?}");
            }
            // slide fills to its budget at once; adaptive's budget is 4 + ⌊t / 9⌋ = 7 at t = 30
            let peak = if schedule == Schedule::Slide { 8 } else { 7 };
            assert_eq!(d.peak_rows(), 20 + peak + 1, "{scorer:?} {schedule:?}");
            assert!(d.evictions() > 0);
            assert_eq!(d.cache().positions.last(), Some(&49));
        }
        // discontinuous overshoots by at most δ = ⌊(40 − 4) / (8 − 4)⌋ = 9
        let mut d = PooledDecoder::new(
            &m,
            cache.clone(),
            pool(8, 4, Scorer::Instantaneous, Schedule::Discontinuous),
        )
        .unwrap();
        for t in 0..30 {
            d.step(&m, (t * 5 + 1) % 64).unwrap();
        }
        assert!(d.peak_rows() <= 20 + 8 + 9, "{}", d.peak_rows());
    }

    #[test]
    fn a_pool_that_never_fills_decodes_like_the_full_cache() {
        let m = model();
        let (_, cache) = prompt_cache(&m, 12);
        let mut full = cache.clone();
        let mut d = PooledDecoder::new(
            &m,
            cache,
            pool(30, 4, Scorer::Instantaneous, Schedule::Slide),
        )
        .unwrap();
        for t in 0..10u32 {
            let a = d.step(&m, t + 3).unwrap().to_vec1::<f32>().unwrap();
            let b = m
                .decode_step(t + 3, &mut full, &mut ())
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let diff = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-4, "step {t}: {diff}");
        }
        assert_eq!(d.evictions(), 0);
    }

    #[test]
    fn plans_refuse_what_a_request_cannot_run() {
        let m = model();
        let h2o = "h2o".parse().unwrap();
        assert!(CompressPlan::new(h2o, Budget::Compression(2.0)).is_err());
        assert!(CompressPlan::new(PolicySpec::Full, Budget::Compression(2.0)).is_err());
        let s = PolicySpec::Streaming(StreamingLlm::default());
        assert!(CompressPlan::new(s.clone(), Budget::Compression(1.0)).is_err());
        // 4 sinks do not fit 2 entries per head of a 40-token prompt
        let plan = CompressPlan::new(s, Budget::Entries(2)).unwrap();
        assert!(matches!(
            plan.check(&m, 40),
            Err(PolicyError::BudgetTooSmall { needed: 4, .. })
        ));
    }

    #[test]
    fn a_failing_policy_falls_back_to_the_uncompressed_cache() {
        let m = model();
        let (_, cache) = prompt_cache(&m, 12);
        let err = Err(BlendError::Invalid("policy broke".into()));
        let (kept, report) = fall_back_on_error(cache.clone(), "sage".into(), err);
        assert!(!kept.is_pruned());
        assert_eq!(kept.len(), cache.len());
        assert_eq!(report.stats, None);
        assert!(report.error.unwrap().contains("policy broke"));
        // observing over a cache that does not match the prompt is such a failure
        let plan = CompressPlan::new("snapkv:window=4".parse().unwrap(), Budget::Compression(2.0))
            .unwrap();
        let (kept, report) = compress_for_decode(&m, &[1, 2, 3], cache, &plan);
        assert!(!kept.is_pruned());
        assert!(report.error.is_some());
    }
}

/// Decoding with a decode pool (SCOPE, H2O, StreamingLLM or SAGE-KV decoding): each step
/// appends its token, the pool observes the step's attention per KV head where its scorer
/// ranks by it ([`DecodePool::reads_next_step`]), and when the pool
/// is due the cache is pruned to its selection in place ([`KvCache::retain_tail_in_place`]
/// on the decoder's own copy of the cache: only the pool's rows move). The prompt's rows are
/// never evicted — except, for a pool [`DecodePoolSpec::from_prompt`] (`sage`), its last
/// `budget` rows, which roll as a window — and the cache holds at most prompt + pool budget
/// rows (+ `δ` for `discontinuous`; for `sage`, the larger of the prompt's rows and the budget, + 1
/// during a step; every pool + its `slack`).
#[derive(Debug)]
pub struct PooledDecoder {
    pool: DecodePool,
    cache: KvCache,
    /// Reselections so far.
    evictions: usize,
    /// Most rows the cache held.
    peak_rows: usize,
    /// Where the steps' wall time went.
    times: PoolTimes,
    /// Reads each step's attention sums back (on a device: behind the last layer's
    /// attention, while the rest of the step runs); `None` reads them after the step
    /// ([`PooledDecoder::reading_after_steps`]).
    reader: Option<ReadBack>,
}

/// Where a [`PooledDecoder`]'s steps spent their wall time (the host's clock), summed over
/// its steps. On a device the model's work runs after its launch: `step` is the launching;
/// a step whose attention the pool reads waits in `read` for the device to reach the last
/// layer's attention (or the whole step, [`PooledDecoder::reading_after_steps`]), and the
/// rest of the step's work is waited for by whatever reads the logits next.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PoolTimes {
    /// Steps taken.
    pub steps: usize,
    /// `Model::decode_step`, the pool's attention probe included.
    pub step: Duration,
    /// Reading the step's attention sums to the host (the steps a scorer reads).
    pub read: Duration,
    /// Observing the sums and selecting the rows to keep (host work alone).
    pub select: Duration,
    /// Moving the kept rows ([`KvCache::retain_tail_in_place`]: host bookkeeping, uploads and
    /// launches).
    pub retain: Duration,
}

/// `[layer][kv_head][row]`: a step's attention on each pool row, summed over the KV head's
/// query heads.
type StepSums = Vec<Vec<Vec<f32>>>;

/// A step's attention over the pool's rows, summed over each KV head's query heads.
struct StepAttention<'r> {
    probe: Option<ProbeRequest>,
    /// The rows whose attention the pool reads ([`DecodePool::scored_rows`]): only these
    /// are summed and kept.
    scored: std::ops::Range<usize>,
    /// Whether the sums stay where the model computed them until every layer has reported
    /// (a device): reading each layer's as it reports would make the host wait for that
    /// layer's work before it launches the next one's, every layer of every step
    /// (BENCHMARKS §9, "Pools on the 8B shape"). On the CPU they are summed as they come.
    defer_reads: bool,
    /// `[layer][kv_head][row]`: the sums summed as each layer reports them.
    per_layer: Vec<Vec<Vec<f32>>>,
    /// With `defer_reads`, each layer's `[kv_heads, rows]` sums, read in one copy by
    /// [`StepAttention::into_sums`].
    on_device: Vec<Tensor>,
    /// The model's layers, and where the sums go once the last has reported (with
    /// `defer_reads`): joined in one launch, their copy queued at once behind the last
    /// layer's attention, so the host waits for that copy, not for the rest of the step (the
    /// last layer's MLP and the LM head run while the pool selects).
    layers: usize,
    reader: Option<&'r mut ReadBack>,
    /// Whether this step started its read (a read left from an earlier, failed step is
    /// never taken for this one's).
    read_started: bool,
    /// Why the early read could not be had (then the sums are read after the step).
    read_back_failed: Option<String>,
}

impl StepAttention<'_> {
    /// `[layer][kv_head][row]`, every layer's sums (from a device: joined in one launch,
    /// read in one copy), and why the early read failed if it did (the sums then come from a
    /// read after the step: a failed early read costs time, never the step).
    fn into_sums(mut self) -> kvquilt_model::Result<(StepSums, Option<String>)> {
        let started = match self.read_started {
            true => self.reader.as_deref_mut(),
            false => None,
        };
        let early = started.map(|reader| reader.finish());
        let mut failed = self.read_back_failed.take();
        match early.map(|r| r.and_then(|read| read.map(|(f, d)| Self::split(f, &d)).transpose())) {
            Some(Ok(Some(sums))) => return Ok((sums, failed)),
            Some(Err(e)) => failed = Some(e.to_string()),
            Some(Ok(None)) | None => {}
        }
        let sums = match Self::joined(&self.on_device)? {
            None => self.per_layer,
            Some(all) => all.to_vec3::<f32>()?,
        };
        Ok((sums, failed))
    }

    /// `[layers, kv_heads, rows]` values, row-major, as `[layer][kv_head][row]`.
    fn split(flat: Vec<f32>, dims: &[usize]) -> kvquilt_model::Result<StepSums> {
        let &[layers, heads, rows] = dims else {
            return Err(kvquilt_model::ModelError::InvalidInput(format!(
                "attention sums read back as {dims:?}"
            )));
        };
        if flat.len() != layers * heads * rows {
            return Err(kvquilt_model::ModelError::InvalidInput(format!(
                "{} attention sums read back as {dims:?}",
                flat.len()
            )));
        }
        Ok((0..layers)
            .map(|l| {
                (0..heads)
                    .map(|h| flat[(l * heads + h) * rows..][..rows].to_vec())
                    .collect()
            })
            .collect())
    }

    /// Every layer's `[kv_heads, rows]` sums as one `[layers, kv_heads, rows]` tensor (one
    /// launch on a device); `None` before any layer reported.
    fn joined(on_device: &[Tensor]) -> kvquilt_model::Result<Option<Tensor>> {
        let Some(first) = on_device.first() else {
            return Ok(None);
        };
        let (heads, rows) = first.dims2()?;
        let parts: Vec<&Tensor> = on_device.iter().collect();
        Ok(Some(kvquilt_model::concat(&parts)?.reshape((
            parts.len(),
            heads,
            rows,
        ))?))
    }
}

impl LayerHook for StepAttention<'_> {
    fn probe(&self) -> Option<&ProbeRequest> {
        self.probe.as_ref()
    }

    fn after_attention(
        &mut self,
        _layer: usize,
        probe: LayerProbe,
    ) -> std::result::Result<(), HookError> {
        let Some(per_head) = probe.head_sums else {
            return Ok(());
        };
        // the sums cover keys `head_sums_from..` (on a device, the pool's rows alone)
        let Some(at) = self.scored.start.checked_sub(probe.head_sums_from) else {
            return Err(HookError::new(kvquilt_model::CandleError::Msg(format!(
                "attention sums from key {}, the pool's rows from {}",
                probe.head_sums_from, self.scored.start
            ))));
        };
        let scored = || -> std::result::Result<Tensor, kvquilt_model::CandleError> {
            per_head.narrow(2, at, self.scored.len())
        };
        if self.defer_reads {
            // the pool's rows alone, summed where they are, read once every layer has
            // reported (the fused kernel summed each KV head's group itself: no reduction
            // to launch)
            let sums = scored().and_then(|x| match x.dim(1)? {
                1 => x.squeeze(1),
                _ => x.sum(1),
            });
            self.on_device.push(sums.map_err(HookError::new)?);
            if self.on_device.len() == self.layers
                && let Some(reader) = self.reader.as_deref_mut()
            {
                let start = Self::joined(&self.on_device).and_then(|all| match all {
                    Some(all) => reader.start(&all),
                    None => Ok(()),
                });
                match start {
                    Ok(()) => self.read_started = true,
                    // read after the step instead
                    Err(e) => {
                        self.read_back_failed = Some(e.to_string());
                        self.reader = None;
                    }
                }
            }
        } else {
            let sums = scored().and_then(|x| group_sums(&x));
            self.per_layer.push(sums.map_err(HookError::new)?);
        }
        Ok(())
    }
}

/// `[kv_heads, group, keys]` f32 on the CPU → `[kv_heads][keys]`, summed over each KV
/// head's query heads by a plain loop: candle's reduction over the middle axis took as long
/// as the step's attention (BENCHMARKS §9, "A decode pool's host work").
fn group_sums(x: &Tensor) -> std::result::Result<Vec<Vec<f32>>, kvquilt_model::CandleError> {
    let (heads, group, keys) = x.dims3()?;
    let flat = x.flatten_all()?.to_vec1::<f32>()?;
    Ok((0..heads)
        .map(|h| {
            let mut sum = vec![0f32; keys];
            for g in 0..group {
                let row = &flat[(h * group + g) * keys..][..keys];
                sum.iter_mut().zip(row).for_each(|(s, x)| *s += x);
            }
            sum
        })
        .collect())
}

impl PooledDecoder {
    /// Decoding over `cache` (the whole prompt, pruned or not: its rows are the prefill
    /// region, the last `budget` of them the pool's for a `sage` pool).
    pub fn new(model: &Model, cache: KvCache, spec: DecodePoolSpec) -> Result<Self> {
        if cache.parallel_context().is_some() {
            return Err(invalid(
                "a decode pool prunes its cache, and a cache with a parallel context (APE) cannot be pruned",
            ));
        }
        if cache.is_padded() {
            // the pool keeps every prompt row of every head, and a head's padding rows hold
            // no key (`KvCache::retain` refuses them)
            return Err(invalid(
                "a decode pool keeps every prompt row of every head: it cannot run over a cache pruned to different counts per head (a per-head budget split)",
            ));
        }
        let c = model.config();
        let pool = DecodePool::new(spec, cache.len(), c.num_layers, c.num_kv_heads)?;
        // the decoder's own copy, with room for what the pool adds: each reselection then
        // moves the pool's rows within it (views the caller holds of the prompt's rows read
        // them as they were), and each step appends in place
        // (at most what the decode can append: one row a generated token — a request's
        // budget is not bounded by the generation it asks for, and sized this allocation)
        let room = spec
            .budget
            .saturating_add(spec.slack)
            .saturating_add(spec.delta())
            .saturating_add(1)
            .min(spec.max_new.saturating_add(1));
        let cache = cache.owned_with_room(room)?;
        Ok(Self {
            peak_rows: cache.len(),
            pool,
            cache,
            evictions: 0,
            times: PoolTimes::default(),
            reader: Some(ReadBack::new()),
        })
    }

    /// This decoder reading each step's attention sums once the step is done, as one read
    /// of every layer's, instead of behind the last layer's attention: the same values by
    /// another path (a check's reference; `bench decode --pools` compares the two).
    pub fn reading_after_steps(mut self) -> Self {
        self.reader = None;
        self
    }

    /// Appends `token` and returns the next token's logits; prunes the pool when it is due.
    pub fn step(&mut self, model: &Model, token: u32) -> Result<Tensor> {
        // the step's attention, when the pool ranks its rows by it (SCOPE's instantaneous
        // scorer: only the step before a reselection)
        let reads = self.pool.reads_next_step();
        let mut hook = StepAttention {
            probe: reads
                // the step's one row, per query head: on the CPU the tiled attention
                // answers it over the cache's rows by head, from its one sweep's
                // probabilities (a few rows' worth), no probability matrix
                .then(|| {
                    ProbeRequest::head_sums_over_all(1)
                        .with_head_sums_from(self.pool.scored_rows().start)
                        .with_grouped_head_sums()
                }),
            scored: self.pool.scored_rows(),
            defer_reads: !model.device().is_cpu(),
            per_layer: Vec::new(),
            on_device: Vec::new(),
            layers: model.config().num_layers,
            reader: self.reader.as_mut(),
            read_started: false,
            read_back_failed: None,
        };
        let started = Instant::now();
        let logits = model.decode_step(token, &mut self.cache, &mut hook)?;
        let stepped = Instant::now();
        self.peak_rows = self.peak_rows.max(self.cache.len());
        let (sums, read_back_failed) = hook.into_sums()?;
        if let Some(why) = read_back_failed {
            // from now on this decoder reads its sums after each step
            tracing::warn!(
                "reading a decode pool's attention sums early failed ({why}); reading them after each step"
            );
            self.reader = None;
        }
        let read = Instant::now();
        match reads {
            true => self.pool.observe(&sums)?,
            false => self.pool.observe_unread()?,
        }
        let mut selected = Instant::now();
        let mut retained = selected;
        if self.pool.due() {
            // selected on a copy (the pool's rows: cheap), kept only once the cache has
            // followed, so a refused reselection leaves pool and cache agreeing
            let mut pool = self.pool.clone();
            let keep = pool.select();
            selected = Instant::now();
            // the pool's rows move within the decoder's own buffers; the protected rows
            // (the prompt's) stay where they are and cost nothing
            self.cache
                .retain_tail_in_place(keep.protected, &keep.pool)?;
            retained = Instant::now();
            self.pool = pool;
            self.evictions += 1;
        }
        let t = &mut self.times;
        t.steps += 1;
        t.step += stepped - started;
        t.read += read - stepped;
        t.select += selected - read;
        t.retain += retained - selected;
        Ok(logits)
    }

    /// The cache as it stands. Its rows are rewritten in place by later steps: keep no
    /// narrowed view or tensor of it across a step ([`KvCache::retain_in_place`]).
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// How many times the pool was reselected.
    pub fn evictions(&self) -> usize {
        self.evictions
    }

    /// The most rows the cache held at once.
    pub fn peak_rows(&self) -> usize {
        self.peak_rows
    }

    /// Where the steps so far spent their wall time.
    pub fn times(&self) -> PoolTimes {
        self.times
    }
}
