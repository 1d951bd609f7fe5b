//! Running a policy over every layer under a budget.

use super::{
    Budget, BudgetSplit, KeepSet, Observation, PolicyError, Regions, Shape, TokenPolicy, top_n,
};

/// The keep set of `policy` for a cache of `shape` given one [`Observation`] per layer.
///
/// Errors: a bad budget or split, a budget below what the policy always keeps
/// ([`PolicyError::BudgetTooSmall`] names both), or observations that lack what the policy
/// asked for. Nothing is partially applied: the caller gets a whole keep set or an error.
pub fn select(
    policy: &dyn TokenPolicy,
    observations: &[Observation],
    shape: &Shape,
    budget: Budget,
    split: &BudgetSplit,
) -> Result<KeepSet, PolicyError> {
    let per_layer = checked_layer_budgets(policy, shape, budget, split)?;
    if observations.len() != shape.layers {
        return Err(PolicyError::BadObservation {
            policy: policy.name().into(),
            layer: observations.len(),
            why: format!(
                "{} observations for {} layers",
                observations.len(),
                shape.layers
            ),
        });
    }
    // layers are scored and selected independently: across the cores (on the H200's host,
    // SnapKV over the 8B shape's 32 layers at 8k spent ~100 ms here on one thread)
    let one = |l: usize| select_layer(policy, l, &observations[l], shape, per_layer[l], split);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(shape.layers);
    let layers: Vec<Result<Vec<Vec<u32>>, PolicyError>> = if threads <= 1 {
        (0..shape.layers).map(one).collect()
    } else {
        let per = shape.layers.div_ceil(threads);
        std::thread::scope(|scope| {
            // a part whose thread cannot be started runs here, after the others start
            let parts: Vec<_> = (0..shape.layers)
                .step_by(per)
                .map(|from| {
                    let one = &one;
                    let part = move || {
                        (from..(from + per).min(shape.layers))
                            .map(one)
                            .collect::<Vec<_>>()
                    };
                    std::thread::Builder::new()
                        .spawn_scoped(scope, part)
                        .map_err(|_| part)
                })
                .collect();
            parts
                .into_iter()
                .flat_map(|p| match p {
                    Ok(thread) => match thread.join() {
                        Ok(layers) => layers,
                        Err(panic) => std::panic::resume_unwind(panic),
                    },
                    Err(part) => part(),
                })
                .collect()
        })
    };
    // the first failing layer's error, as one thread going layer by layer would report
    let layers = layers.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(KeepSet { layers })
}

/// Layer `l`'s keep set: `n_l` entries per KV head (or per layer, split per head).
fn select_layer(
    policy: &dyn TokenPolicy,
    l: usize,
    obs: &Observation,
    shape: &Shape,
    n_l: usize,
    split: &BudgetSplit,
) -> Result<Vec<Vec<u32>>, PolicyError> {
    let regions = policy.regions(shape, n_l);
    let scores = policy.score(l, obs, shape)?;
    if scores.len() != shape.kv_heads || scores.iter().any(|s| s.len() != shape.tokens) {
        return Err(PolicyError::BadObservation {
            policy: policy.name().into(),
            layer: l,
            why: format!("scores shaped {} heads for {shape:?}", scores.len()),
        });
    }
    Ok(match split.head_floor() {
        Some(floor) => ragged(&scores, &regions, n_l, floor),
        None => scores.iter().map(|s| top_n(s, &regions, n_l)).collect(),
    })
}

/// Checks, before anything runs, that `budget` and `split` are valid and leave room for
/// what `policy` always keeps in a cache of `shape` (what [`select`] would refuse first).
pub fn check_budget(
    policy: &dyn TokenPolicy,
    shape: &Shape,
    budget: Budget,
    split: &BudgetSplit,
) -> Result<(), PolicyError> {
    checked_layer_budgets(policy, shape, budget, split).map(|_| ())
}

/// Entries per head for each layer, each checked to hold the policy's regions.
fn checked_layer_budgets(
    policy: &dyn TokenPolicy,
    shape: &Shape,
    budget: Budget,
    split: &BudgetSplit,
) -> Result<Vec<usize>, PolicyError> {
    budget.validate()?;
    let per_layer = layer_budgets(policy, shape, budget.per_head(shape.tokens), split)?;
    for &n_l in &per_layer {
        check_room(policy, &policy.regions(shape, n_l), shape.tokens, n_l)?;
    }
    Ok(per_layer)
}

/// Entries per head for each layer.
fn layer_budgets(
    policy: &dyn TokenPolicy,
    shape: &Shape,
    n: usize,
    split: &BudgetSplit,
) -> Result<Vec<usize>, PolicyError> {
    let bad = |field: &str, why: String| PolicyError::BadParameter {
        policy: policy.name().into(),
        field: field.into(),
        why,
    };
    if let Some(floor) = split.head_floor()
        && !(0.0..=1.0).contains(&floor)
    {
        return Err(bad("floor", format!("{floor} is outside 0..=1")));
    }
    let Some(w) = split.layer_weights() else {
        return Ok(vec![n; shape.layers]);
    };
    if w.len() != shape.layers {
        return Err(bad(
            "layer weights",
            format!("{} weights for {} layers", w.len(), shape.layers),
        ));
    }
    if w.iter().any(|x| !x.is_finite() || *x < 0.0) {
        return Err(bad(
            "layer weights",
            "weights must be finite and ≥ 0".into(),
        ));
    }
    let total: f64 = w.iter().map(|&x| x as f64).sum();
    if total <= 0.0 {
        return Err(bad("layer weights", "weights sum to 0".into()));
    }
    let all = (n * shape.layers) as f64;
    Ok(w.iter()
        .map(|&x| ((all * x as f64 / total).round() as usize).clamp(1, shape.tokens.max(1)))
        .collect())
}

fn check_room(
    policy: &dyn TokenPolicy,
    regions: &Regions,
    tokens: usize,
    n: usize,
) -> Result<(), PolicyError> {
    // a cache shorter than the budget keeps everything; otherwise the regions must fit
    let needed = regions.count(tokens);
    if n < tokens && needed > n {
        return Err(PolicyError::BudgetTooSmall {
            policy: policy.name().into(),
            budget: n,
            needed,
            tokens,
            what: regions.describe(),
        });
    }
    Ok(())
}

/// `n · heads` entries for the layer chosen by score across heads, each head keeping its
/// always-kept rows and at least `⌈floor · n⌉` (AdaKV-style).
fn ragged(scores: &[Vec<f32>], regions: &Regions, n: usize, floor: f32) -> Vec<Vec<u32>> {
    let tokens = scores.first().map_or(0, Vec::len);
    if n >= tokens {
        return scores
            .iter()
            .map(|_| (0..tokens as u32).collect())
            .collect();
    }
    let min = ((floor * n as f32).ceil() as usize)
        .max(regions.count(tokens))
        .min(n);
    let mut kept: Vec<Vec<u32>> = scores.iter().map(|s| top_n(s, regions, min)).collect();
    let mut left = n * scores.len() - kept.iter().map(Vec::len).sum::<usize>();
    // the rest by score over every head's remaining rows
    let mut pool: Vec<(f32, usize, u32)> = Vec::new();
    for (h, s) in scores.iter().enumerate() {
        for t in 0..tokens as u32 {
            if kept[h].binary_search(&t).is_err() {
                pool.push((s[t as usize], h, t));
            }
        }
    }
    pool.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    for (_, h, t) in pool {
        if left == 0 {
            break;
        }
        kept[h].push(t);
        left -= 1;
    }
    for k in &mut kept {
        k.sort_unstable();
    }
    kept
}
