//! `kvquilt bench decode`: decode speed over a cache compressed by a token policy, beside
//! decode over the full cache, both after the same prefill in the same run.
//!
//! One prefill of `--context` tokens observes what the policy reads; the full cache and the
//! pruned copy each decode `--steps` tokens (one warm-up, then `--repeats` timed runs). The
//! prompt is pseudo-random tokens: decode speed depends on the cache's size, not its words.
//! The steps feed fixed pseudo-random tokens, never read back; with `--greedy` each batch-1
//! step feeds the last one's argmax, read to the host, as served decoding does.
//!
//! With `--batch B`, B sequences decode together (`Model::decode_batch`: one read of the
//! weights per step for all of them, attention per sequence), each over its own copy of the
//! cache, as a server decoding B requests at once does; tokens/s counts every sequence's
//! tokens. Each timed run starts from fresh copies after one untimed step, so the copy a
//! clone makes on its first append is not timed.
//!
//! With `--sessions N`, N threads decode at once, each its own sequence as a request of the
//! sidecar does: once each with `decode_step` on its own thread (the sidecar with
//! `limits.decode_batch = 0`), once through a `DecodeBatcher` (the sidecar's default with N
//! workers on a GPU): the batcher's thread hand-offs and gathering included. In a `gpu` build
//! on CUDA, the sessions also run each in its own `GraphedCache` (full caches and caches
//! pruned without padding), a graph replayed per step (what the sidecar's decoding requests do on a blender with graphs and
//! no batching).

use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use anyhow::{Context, Result};
use kvquilt_blend::compress::{compress, observe_last_rows, observe_prefill};
use kvquilt_blend::{DEFAULT_GATHER, DecodeBatcher};
use kvquilt_compression::policy::{Budget, BudgetSplit, PolicySpec, TokenPolicy};
use kvquilt_model::{AttentionKernel, BatchStep, DType, KvCache, Model, Tensor, argmax};
use serde::Serialize;

use super::model::pseudo_tokens;
use super::{machine, median, write_report};
use kvquilt::model_source::ModelArgs;

#[derive(clap::Args)]
pub struct DecodeBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Use random weights of a known shape instead of a model file (`llama3.1-8b`,
    /// `smollm2-135m`).
    #[arg(long)]
    random: Option<String>,
    /// The token policy (`snapkv`, `sage`, `h2o`, `streaming`, with `:key=value`…).
    #[arg(long, default_value = "snapkv")]
    policy: String,
    /// Compression factors (N× less KV per KV head).
    #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
    compression: Vec<f32>,
    /// Prompt tokens prefilled before decoding.
    #[arg(long, default_value_t = 6000)]
    context: usize,
    /// Decode steps per timed run.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Sequences decoded together per step, each over its own copy of the cache (a list
    /// measures each size; 1 is `decode_step`, one sequence alone).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batch: Vec<usize>,
    /// Concurrent sessions (threads) decoding each alone, then through a decode batcher, then
    /// (a `gpu` build on CUDA; not over a cache pruned with padding) each in its own graphed cache (a list measures each
    /// count; none by default).
    #[arg(long, value_delimiter = ',')]
    sessions: Vec<usize>,
    /// Decode pools, `NAME:ROWS` (`streaming:256`, `scope-slide:256`, `h2o:128`, …: the
    /// policies of `eval --task longgen`), each decoding `--steps` tokens over the full
    /// cache (the prompt's rows untouched) through `PooledDecoder`, which observes, reselects
    /// and moves its rows in place as the sidecar's decoding does; beside the full cache's
    /// own steps at batch 1. Random weights serve: a pool's cost does not depend on them.
    #[arg(long, value_delimiter = ',')]
    pools: Vec<String>,
    /// Rows every pool may hold over its budget before reselecting (`DecodePoolSpec::slack`).
    #[arg(long, default_value_t = 0)]
    pool_slack: usize,
    /// Decode as served: each batch-1 step (the caches' and the pools') feeds the argmax of
    /// the last step's logits, read to the host, as the next token, instead of fixed
    /// pseudo-random tokens that no step waits for. A sampler needs every step's logits, so
    /// a served step waits for the device; without this, a full cache's steps queue up
    /// unread while a scoring pool's wait for the attention sums they read.
    #[arg(long)]
    greedy: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Row {
    /// `full` or the compression factor.
    cache: String,
    /// Sequences decoded together.
    batch: usize,
    kv_bytes: usize,
    /// The first step's logits with the chosen attention against the reference attention
    /// over the same cache: largest absolute difference, and whether the argmax agrees.
    check_max_abs_diff: f32,
    check_same_argmax: bool,
    /// With a batch of several sequences: three batched steps against each sequence's own
    /// `decode_step`s over the same cache, the largest logit difference and whether every
    /// argmax agreed (`None` at batch 1).
    batch_check: Option<(f32, bool)>,
    tokens_per_s: f64,
    speedup_vs_full: f64,
    runs_s: Vec<f64>,
}

#[derive(Serialize)]
struct Report {
    model: String,
    device: String,
    dtype: String,
    machine: String,
    policy: String,
    context: usize,
    steps: usize,
    repeats: usize,
    /// `--greedy`: each batch-1 step's token was the last step's argmax, read to the host.
    greedy: bool,
    rows: Vec<Row>,
    pools: Vec<PoolRow>,
    sessions: Vec<SessionsRow>,
    /// What compressing the context's cache costs on the sidecar's path, per factor.
    compress: Vec<CompressCost>,
}

/// What the sidecar's `compress_for_decode` costs a request before its first token is out:
/// medians over the repeats (after one untimed run), ms.
#[derive(Serialize)]
struct CompressCost {
    /// The compression factor.
    factor: f32,
    /// Recomputing the prompt's last rows with the policy's probes
    /// (`compress::observe_last_rows`).
    observe_ms: f64,
    /// The policy choosing each layer and KV head's keep set.
    policy_ms: f64,
    /// Gathering the kept rows (`KvCache::retain`).
    prune_ms: f64,
    /// All three, as one request runs them, device work included.
    total_ms: f64,
    /// The observations with the chosen attention (on CUDA: per-head sums from the fused
    /// kernel) against the reference attention's: largest |Δ| of the window's mean
    /// attention ...
    observed_vs_reference_max_abs: f32,
    /// ... and the share of the reference's kept entries the chosen attention's keep set
    /// also keeps (1: the same keep set).
    keep_agreement: f64,
}

/// One decode pool's steps beside the full cache's.
#[derive(Serialize)]
struct PoolRow {
    /// `NAME:ROWS`.
    pool: String,
    tokens_per_s: f64,
    /// Over the full cache's `decode_step` at batch 1, in the same run.
    speedup_vs_full: f64,
    /// Reselections over the last run, its untimed first step included.
    reselections: usize,
    /// Most rows the pool's cache held.
    peak_rows: usize,
    /// Largest |Δ| of any step's logits between the pool as served (evicting in place in
    /// its own buffers, its attention sums read back behind the last layer's attention) and
    /// the same pool whose every reselection copies the kept rows out (`KvCache::retain`,
    /// forced by holding a view of its cache across each step) and which reads its sums
    /// once each step is done (`PooledDecoder::reading_after_steps`): the in-place row
    /// moves and the early reads checked on this device (0 when both give the same values).
    in_place_vs_copies_max_abs: f32,
    /// Where a timed step's wall time went (`PooledDecoder::times`), per step, the median of
    /// the timed runs.
    phases_us: StepPhases,
    runs_s: Vec<f64>,
}

/// [`PoolTimes`](kvquilt_blend::compress::PoolTimes) per step, in µs. On a device `step` is
/// the launching; the wait for the step's work falls in `read` (up to the last layer's
/// attention, on the steps a scorer reads) and in the next read of the logits (outside the
/// decoder, not here).
#[derive(Serialize, Clone, Copy, Default)]
struct StepPhases {
    step: f64,
    read: f64,
    select: f64,
    retain: f64,
}

impl StepPhases {
    /// The steps taken from `before` to `after`, per step.
    fn between(
        before: kvquilt_blend::compress::PoolTimes,
        after: kvquilt_blend::compress::PoolTimes,
    ) -> Self {
        let n = after.steps.saturating_sub(before.steps).max(1) as f64;
        let us = |a: std::time::Duration, b: std::time::Duration| {
            a.saturating_sub(b).as_secs_f64() * 1e6 / n
        };
        Self {
            step: us(after.step, before.step),
            read: us(after.read, before.read),
            select: us(after.select, before.select),
            retain: us(after.retain, before.retain),
        }
    }

    /// Each phase's median over `runs`.
    fn median(runs: &[Self]) -> Self {
        let of = |f: fn(&Self) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
        Self {
            step: of(|p| p.step),
            read: of(|p| p.read),
            select: of(|p| p.select),
            retain: of(|p| p.retain),
        }
    }
}

#[derive(Serialize)]
struct SessionsRow {
    /// `full` or the compression factor.
    cache: String,
    sessions: usize,
    /// Every session's tokens per second, each decoding alone on its thread (median run).
    alone_tokens_per_s: f64,
    /// The same through a decode batcher.
    batched_tokens_per_s: f64,
    /// The same each alone in its own graphed cache, a graph replayed per step (`gpu` builds
    /// on CUDA; not over a cache pruned with padding, which does not go into one).
    graphed_tokens_per_s: Option<f64>,
    /// Mean sequences per model step of the batcher.
    mean_batch: f64,
    alone_runs_s: Vec<f64>,
    batched_runs_s: Vec<f64>,
    graphed_runs_s: Vec<f64>,
}

/// How each session of [`concurrent`] decodes.
#[derive(Clone, Copy)]
enum Sessions<'a> {
    /// `Model::decode_step` on its own thread.
    Alone,
    /// Through a decode batcher.
    Batched(&'a DecodeBatcher),
    /// In its own graphed cache, a graph replayed per step.
    #[cfg(feature = "gpu")]
    Graphed,
}

/// One session's steps: the cache it decodes over, as [`Sessions`] says.
enum Session {
    Alone(KvCache),
    Batched(kvquilt_blend::BatchedSteps),
    #[cfg(feature = "gpu")]
    Graphed(kvquilt_model::GraphedCache),
}

impl Session {
    fn new(how: Sessions<'_>, model: &Arc<Model>, base: &KvCache, steps: usize) -> Result<Self> {
        #[cfg(not(feature = "gpu"))]
        let _ = (model, steps);
        Ok(match how {
            Sessions::Alone => Self::Alone(base.clone()),
            Sessions::Batched(b) => Self::Batched(b.session(base.clone())),
            #[cfg(feature = "gpu")]
            Sessions::Graphed => {
                // the untimed first step and `steps` more
                let mut g =
                    kvquilt_model::GraphedCache::new(Arc::clone(model), base.len() + steps + 1)?;
                g.load(base)?;
                Self::Graphed(g)
            }
        })
    }

    fn step(&mut self, model: &Model, token: u32) -> Result<()> {
        match self {
            Self::Alone(cache) => drop(model.decode_step(token, cache, &mut ())?),
            Self::Batched(b) => drop(b.step(token)?),
            #[cfg(feature = "gpu")]
            Self::Graphed(g) => {
                let pos = g.positions().last().map_or(0, |p| p + 1);
                drop(g.append(&[token], &[pos])?)
            }
        }
        Ok(())
    }
}

/// `sessions` threads each decoding `steps` tokens over its own copy of `base`, all at once
/// (after one untimed step each), as `how` says. Seconds of each timed run, after one
/// warm-up run.
fn concurrent(
    model: &Arc<Model>,
    base: &KvCache,
    sessions: usize,
    steps: usize,
    repeats: usize,
    how: Sessions<'_>,
    token: &(dyn Fn(usize, usize) -> u32 + Sync),
) -> Result<Vec<f64>> {
    let mut runs = Vec::with_capacity(repeats + 1);
    for _ in 0..=repeats.max(1) {
        let start = Barrier::new(sessions + 1);
        let done = Barrier::new(sessions + 1);
        let t = std::thread::scope(|s| -> Result<f64> {
            let handles: Vec<_> = (0..sessions)
                .map(|b| {
                    let (start, done) = (&start, &done);
                    s.spawn(move || -> Result<()> {
                        let mut session = Session::new(how, model, base, steps);
                        let mut step = |i: usize| -> Result<()> {
                            match session.as_mut() {
                                Ok(sn) => sn.step(model, token(i, b)),
                                Err(e) => Err(anyhow::anyhow!("{e:#}")),
                            }
                        };
                        // every thread reaches both barriers, whatever fails
                        let sync = || -> Result<()> { Ok(model.device().synchronize()?) };
                        let first = step(0).and_then(|()| sync());
                        start.wait();
                        let rest = match first {
                            Ok(()) => (1..=steps).try_for_each(&mut step).and_then(|()| sync()),
                            Err(_) => Ok(()),
                        };
                        done.wait();
                        // this thread frees its buffers: bound, as cudarc frees unbound
                        kvquilt_model::bind_to_thread(model.device())?;
                        drop(session);
                        first.and(rest)
                    })
                })
                .collect();
            start.wait();
            let t = Instant::now();
            done.wait();
            let secs = t.elapsed().as_secs_f64();
            for h in handles {
                h.join()
                    .map_err(|_| anyhow::anyhow!("a decode session panicked"))??;
            }
            Ok(secs)
        })?;
        runs.push(t);
    }
    // the first run warms up
    runs.remove(0);
    Ok(runs)
}

/// One decode step over `base` with `kernel` against the reference attention: the largest
/// absolute logit difference and whether the argmax agrees.
fn check(model: &mut Model, kernel: AttentionKernel, base: &KvCache) -> Result<(f32, bool)> {
    model.set_attention_kernel(AttentionKernel::Reference);
    let want = model
        .decode_step(7, &mut base.clone(), &mut ())?
        .to_vec1::<f32>()?;
    model.set_attention_kernel(kernel);
    let got = model
        .decode_step(7, &mut base.clone(), &mut ())?
        .to_vec1::<f32>()?;
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    Ok((diff, argmax(&got) == argmax(&want)))
}

pub(crate) fn run(a: DecodeBenchArgs) -> Result<()> {
    let spec: PolicySpec = a.policy.parse().context("--policy")?;
    let policy = spec
        .policy()
        .context("--policy full compresses nothing; name a policy")?;
    for &n in &a.compression {
        Budget::Compression(n)
            .validate()
            .with_context(|| format!("--compression {n}"))?;
    }
    let device = a.model.device()?;
    let dtype = a.model.dtype(&device)?;
    let kernel = a.model.attention_kernel()?;
    let (mut model, name) = match a.random.as_deref() {
        Some(shape) => {
            let (config, name) = super::random_shape(shape)?;
            let mut m = Model::random(config, &device, dtype)?;
            m.set_attention_kernel(kernel);
            (m, name)
        }
        None => {
            let mut m = a.model.load()?;
            m.model.set_attention_kernel(kernel);
            (m.model, m.path.display().to_string())
        }
    };
    let c = model.config().clone();
    let entry_bytes = 2 * c.head_dim * model.dtype().size_in_bytes();
    let vocab = c.vocab_size as u64;
    let ctx = pseudo_tokens(a.context, vocab);
    let pos = kvquilt_model::positions(0, ctx.len());
    let mut full = model.empty_cache()?;
    let (_, observations) = observe_prefill(&model, &ctx, &pos, &mut full, &[policy.needs()])?;
    let steps = a.steps.max(1);
    let full_check = check(&mut model, kernel, &full)?;
    let mut pruned = Vec::new();
    for &n in &a.compression {
        let c = compress(
            &model,
            &full,
            &observations,
            policy,
            Budget::Compression(n),
            &BudgetSplit::Uniform,
        )?;
        let checked = check(&mut model, kernel, &c.cache)?;
        eprintln!(
            "{n}×: attention {kernel:?} vs reference, max |Δlogit| {:.4}, same argmax {}",
            checked.0, checked.1
        );
        pruned.push((n, c, checked));
    }
    let mut compress_costs = Vec::with_capacity(a.compression.len());
    for &n in &a.compression {
        let (max_abs, agreement) =
            observed_like_reference(&mut model, kernel, &ctx, &full, policy, n)?;
        let mut cc = compress_cost(&model, &ctx, &full, policy, n, a.repeats)?;
        cc.observed_vs_reference_max_abs = max_abs;
        cc.keep_agreement = agreement;
        eprintln!(
            "compressing for decode {}×: {:.2} ms (observe {:.2}, policy {:.2}, prune {:.2}); \
             against the reference attention's observations: max |Δ| {:e}, keep sets agree on {:.4}",
            cc.factor, cc.total_ms, cc.observe_ms, cc.policy_ms, cc.prune_ms, max_abs, agreement
        );
        compress_costs.push(cc);
    }
    let model = Arc::new(model);
    let token = |i: usize, b: usize| ((i * 31 + b * 17 + 7) as u64 % vocab) as u32;
    // `steps` steps of `batch` sequences over copies of `base`, after an untimed first one
    let decode = |base: &KvCache, batch: usize| -> Result<Vec<f64>> {
        let mut runs = Vec::with_capacity(a.repeats + 1);
        for _ in 0..=a.repeats.max(1) {
            let mut caches = vec![base.clone(); batch];
            let mut next = token(0, 0);
            let mut step = |i: usize| -> Result<()> {
                if batch == 1 {
                    let logits = model.decode_step(next, &mut caches[0], &mut ())?;
                    next = next_token(a.greedy, &logits, || token(i + 1, 0))?;
                } else {
                    let mut steps: Vec<BatchStep<'_>> = caches
                        .iter_mut()
                        .enumerate()
                        .map(|(b, c)| BatchStep::new(token(i, b), c))
                        .collect();
                    model.decode_batch(&mut steps)?;
                }
                Ok(())
            };
            step(0)?;
            model.device().synchronize()?;
            let t = Instant::now();
            for i in 1..=steps {
                step(i)?;
            }
            model.device().synchronize()?;
            runs.push(t.elapsed().as_secs_f64());
        }
        // the first run warms up
        runs.remove(0);
        Ok(runs)
    };
    // three steps of `batch` copies of `base` batched against each one's own steps
    let batch_check = |base: &KvCache, batch: usize| -> Result<Option<(f32, bool)>> {
        if batch < 2 {
            return Ok(None);
        }
        let mut alone = vec![base.clone(); batch];
        let mut together = vec![base.clone(); batch];
        let (mut worst, mut same) = (0f32, true);
        for i in 0..3 {
            let mut steps: Vec<BatchStep<'_>> = together
                .iter_mut()
                .enumerate()
                .map(|(b, c)| BatchStep::new(token(i, b), c))
                .collect();
            let got = model.decode_batch(&mut steps)?;
            for (b, c) in alone.iter_mut().enumerate() {
                let want = model
                    .decode_step(token(i, b), c, &mut ())?
                    .to_vec1::<f32>()?;
                let row = got.get(b)?.to_vec1::<f32>()?;
                let d = row
                    .iter()
                    .zip(&want)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                worst = worst.max(d);
                same &= argmax(&row) == argmax(&want);
            }
        }
        Ok(Some((worst, same)))
    };
    let mut rows = Vec::new();
    for &batch in &a.batch {
        anyhow::ensure!(batch >= 1, "--batch {batch}: at least one sequence");
        let full_runs = decode(&full, batch)?;
        let full_tps = (batch * steps) as f64 / median(&full_runs);
        eprintln!(
            "batch {batch}, full cache ({} tokens): {full_tps:.1} tokens/s",
            full.len()
        );
        rows.push(Row {
            cache: "full".into(),
            batch,
            kv_bytes: batch * full.len() * c.num_kv_heads * c.num_layers * entry_bytes,
            check_max_abs_diff: full_check.0,
            batch_check: batch_check(&full, batch)?,
            check_same_argmax: full_check.1,
            tokens_per_s: full_tps,
            speedup_vs_full: 1.0,
            runs_s: full_runs,
        });
        for (n, pruned, checked) in &pruned {
            let runs = decode(&pruned.cache, batch)?;
            let tps = (batch * steps) as f64 / median(&runs);
            eprintln!(
                "batch {batch}, {spec} {n}×: {tps:.1} tokens/s ({:.2}× full)",
                tps / full_tps
            );
            rows.push(Row {
                cache: format!("{n}x"),
                batch,
                kv_bytes: batch * pruned.stats.kv_bytes_after,
                check_max_abs_diff: checked.0,
                batch_check: batch_check(&pruned.cache, batch)?,
                check_same_argmax: checked.1,
                tokens_per_s: tps,
                speedup_vs_full: tps / full_tps,
                runs_s: runs,
            });
        }
    }
    println!(
        "| batch | cache | KV MB | decode tok/s | vs full | max abs Δlogit vs reference | same argmax | batched vs own steps: max abs Δlogit, same argmax |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.2}× | {:.4} | {} | {} |",
            r.batch,
            r.cache,
            r.kv_bytes as f64 / 1e6,
            r.tokens_per_s,
            r.speedup_vs_full,
            r.check_max_abs_diff,
            r.check_same_argmax,
            r.batch_check
                .map_or("–".into(), |(d, same)| format!("{d:.4}, {same}"))
        );
    }
    let pools = match rows.iter().find(|r| r.batch == 1 && r.cache == "full") {
        _ if a.pools.is_empty() => Vec::new(),
        Some(r) => pool_rows(&model, &full, &a, r.tokens_per_s, &token)?,
        // (`--batch` left batch 1 out)
        None => {
            let full_tps = steps as f64 / median(&decode(&full, 1)?);
            pool_rows(&model, &full, &a, full_tps, &token)?
        }
    };
    // the caches the sessions' threads copy were written on this thread's stream
    model.device().synchronize()?;
    let mut sessions_rows = Vec::new();
    for &n in &a.sessions {
        anyhow::ensure!(n >= 1, "--sessions {n}: at least one");
        let caches = std::iter::once(("full".to_string(), &full))
            .chain(pruned.iter().map(|(f, p, _)| (format!("{f}x"), &p.cache)));
        for (label, base) in caches {
            let run = |how| concurrent(&model, base, n, steps, a.repeats, how, &token);
            let alone = run(Sessions::Alone)?;
            let batcher = DecodeBatcher::start(Arc::clone(&model), n.max(2), DEFAULT_GATHER)?;
            let batched = run(Sessions::Batched(&batcher))?;
            let st = batcher.stats();
            #[cfg(feature = "gpu")]
            let graphed = match model.device().is_cuda() && !base.is_padded() {
                true => run(Sessions::Graphed)?,
                false => Vec::new(),
            };
            #[cfg(not(feature = "gpu"))]
            let graphed = Vec::new();
            let row = SessionsRow {
                cache: label,
                sessions: n,
                alone_tokens_per_s: (n * steps) as f64 / median(&alone),
                batched_tokens_per_s: (n * steps) as f64 / median(&batched),
                graphed_tokens_per_s: (!graphed.is_empty())
                    .then(|| (n * steps) as f64 / median(&graphed)),
                mean_batch: st.steps as f64 / st.batches.max(1) as f64,
                alone_runs_s: alone,
                batched_runs_s: batched,
                graphed_runs_s: graphed,
            };
            eprintln!(
                "{} sessions, {}: alone {:.1} tokens/s, batched {:.1} tokens/s (mean batch {:.2}), graphed {:?}",
                n,
                row.cache,
                row.alone_tokens_per_s,
                row.batched_tokens_per_s,
                row.mean_batch,
                row.graphed_tokens_per_s
            );
            sessions_rows.push(row);
        }
    }
    if !sessions_rows.is_empty() {
        println!(
            "| sessions | cache | alone tok/s | batched tok/s | batched / alone | mean batch | graphed alone tok/s |"
        );
        println!("|---|---|---|---|---|---|---|");
        for r in &sessions_rows {
            println!(
                "| {} | {} | {:.1} | {:.1} | {:.2}× | {:.2} | {} |",
                r.sessions,
                r.cache,
                r.alone_tokens_per_s,
                r.batched_tokens_per_s,
                r.batched_tokens_per_s / r.alone_tokens_per_s,
                r.mean_batch,
                r.graphed_tokens_per_s
                    .map_or("–".into(), |t| format!("{t:.1}"))
            );
        }
    }
    let report = Report {
        sessions: sessions_rows,
        model: name,
        device: format!("{:?}", model.device()),
        dtype: format!("{:?}", model.dtype()),
        machine: machine(),
        policy: spec.to_string(),
        context: a.context,
        steps,
        repeats: a.repeats,
        greedy: a.greedy,
        rows,
        pools,
        compress: compress_costs,
    };
    write_report(&report, a.json.as_deref())
}

/// `--pools`: each pool's `--steps` steps over a fresh decoder on `full` (one untimed step
/// first; the decoder's copy of the cache is made outside the timing), `--repeats` timed runs
/// after a warm-up, as the full cache's `decode` runs, beside its batch-1 rate `full_tps`.
/// Prints its table.
fn pool_rows(
    model: &Model,
    full: &KvCache,
    a: &DecodeBenchArgs,
    full_tps: f64,
    token: &dyn Fn(usize, usize) -> u32,
) -> Result<Vec<PoolRow>> {
    let steps = a.steps.max(1);
    let mut out = Vec::with_capacity(a.pools.len());
    for p in &a.pools {
        let (name, budget) = p
            .split_once(':')
            .and_then(|(n, r)| Some((n, r.parse::<usize>().ok()?)))
            .with_context(|| format!("--pools takes NAME:ROWS (streaming:256), not `{p}`"))?;
        let spec =
            kvquilt_compression::policy::DecodePoolSpec::named(name, budget, None, steps + 1)
                .with_context(|| format!("--pools {p}"))?
                .with_slack(a.pool_slack);
        let (mut runs, mut reselections, mut peak_rows) = (Vec::new(), 0, 0);
        let mut phases = Vec::new();
        for _ in 0..=a.repeats.max(1) {
            let mut d = kvquilt_blend::compress::PooledDecoder::new(model, full.clone(), spec)?;
            let logits = d.step(model, token(0, 0))?;
            let mut next = next_token(a.greedy, &logits, || token(1, 0))?;
            model.device().synchronize()?;
            let before = d.times();
            let t = Instant::now();
            for i in 1..=steps {
                let logits = d.step(model, next)?;
                next = next_token(a.greedy, &logits, || token(i + 1, 0))?;
            }
            model.device().synchronize()?;
            runs.push(t.elapsed().as_secs_f64());
            phases.push(StepPhases::between(before, d.times()));
            (reselections, peak_rows) = (d.evictions(), d.peak_rows());
        }
        runs.remove(0);
        phases.remove(0);
        let phases = StepPhases::median(&phases);
        let tps = steps as f64 / median(&runs);
        let moved = in_place_vs_copies(model, full, spec, steps, token)?;
        eprintln!(
            "pool {p}: {tps:.1} tokens/s ({:.2}× full); in place vs copies: max |Δlogit| {moved:.2e}",
            tps / full_tps
        );
        out.push(PoolRow {
            pool: p.clone(),
            tokens_per_s: tps,
            speedup_vs_full: tps / full_tps,
            reselections,
            peak_rows,
            in_place_vs_copies_max_abs: moved,
            phases_us: phases,
            runs_s: runs,
        });
    }
    println!(
        "| pool (slack {}{}) | decode tok/s | vs full ({full_tps:.1}) | reselections | peak rows | in place vs copies, max abs Δlogit | µs a step: step / read / select / retain |",
        a.pool_slack,
        if a.greedy { ", greedy" } else { "" }
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &out {
        let p = &r.phases_us;
        println!(
            "| {} | {:.1} | {:.2}× | {} | {} | {:.2e} | {:.0} / {:.0} / {:.0} / {:.0} |",
            r.pool,
            r.tokens_per_s,
            r.speedup_vs_full,
            r.reselections,
            r.peak_rows,
            r.in_place_vs_copies_max_abs,
            p.step,
            p.read,
            p.select,
            p.retain
        );
    }
    Ok(out)
}

/// The next step's token: with `greedy`, the argmax of `logits` (`[vocab]`), read to the host
/// as a sampler reads them; else `fixed()`, no read.
fn next_token(greedy: bool, logits: &Tensor, fixed: impl FnOnce() -> u32) -> Result<u32> {
    if !greedy {
        return Ok(fixed());
    }
    Ok(argmax(&logits.to_dtype(DType::F32)?.to_vec1::<f32>()?))
}

/// [`PoolRow::in_place_vs_copies_max_abs`]: `steps` tokens through two decoders of `spec`
/// over `full`, one as served, the other holding a clone of its cache across each step (its
/// layers then do not own their buffers, so every reselection copies) and reading its
/// attention sums after each step.
fn in_place_vs_copies(
    model: &Model,
    full: &KvCache,
    spec: kvquilt_compression::policy::DecodePoolSpec,
    steps: usize,
    token: &dyn Fn(usize, usize) -> u32,
) -> Result<f32> {
    use kvquilt_blend::compress::PooledDecoder;
    let mut in_place = PooledDecoder::new(model, full.clone(), spec)?;
    let mut copies = PooledDecoder::new(model, full.clone(), spec)?.reading_after_steps();
    let mut worst = 0f32;
    for i in 0..=steps {
        let a = in_place.step(model, token(i, 0))?;
        let held = copies.cache().clone();
        let b = copies.step(model, token(i, 0))?;
        drop(held);
        let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        worst = worst.max(d);
    }
    Ok(worst)
}

/// The sidecar's observations of `full` (the cache of `tokens`) with `kernel` against the
/// reference attention's: the largest |Δ| of any window mean, and the share of the
/// reference keep set's entries (SnapKV at factor `n`, …) that `kernel`'s keeps too.
fn observed_like_reference(
    model: &mut Model,
    kernel: AttentionKernel,
    tokens: &[u32],
    full: &KvCache,
    policy: &dyn TokenPolicy,
    n: f32,
) -> Result<(f32, f64)> {
    let mut observe =
        |k: AttentionKernel| -> Result<Vec<kvquilt_compression::policy::Observation>> {
            model.set_attention_kernel(k);
            Ok(observe_last_rows(
                model,
                tokens,
                &mut full.clone(),
                &[policy.needs()],
            )?)
        };
    let want = observe(AttentionKernel::Reference)?;
    let got = observe(kernel)?;
    model.set_attention_kernel(kernel);
    let mut worst = 0f32;
    for (w, g) in want.iter().zip(&got) {
        for (a, b) in w.windows.iter().zip(&g.windows) {
            for (x, y) in a.probs.iter().zip(&b.probs) {
                worst = worst.max((x - y).abs());
            }
        }
    }
    let shape = kvquilt_compression::policy::Shape {
        tokens: full.len(),
        kv_heads: model.config().num_kv_heads,
        group: model.config().group_size(),
        layers: model.config().num_layers,
    };
    let keep = |obs: &[kvquilt_compression::policy::Observation]| {
        kvquilt_compression::policy::select(
            policy,
            obs,
            &shape,
            Budget::Compression(n),
            &BudgetSplit::Uniform,
        )
    };
    let (a, b) = (keep(&want)?, keep(&got)?);
    let (mut shared, mut total) = (0usize, 0usize);
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        for (ha, hb) in la.iter().zip(lb) {
            total += ha.len();
            shared += ha.iter().filter(|r| hb.binary_search(r).is_ok()).count();
        }
    }
    Ok((worst, shared as f64 / total.max(1) as f64))
}

/// What [`kvquilt_blend::compress::compress_for_decode`] costs over `full` (the cache of
/// `tokens`) at factor `n`, phase by phase, `repeats` timed runs after one untimed.
fn compress_cost(
    model: &Model,
    tokens: &[u32],
    full: &KvCache,
    policy: &dyn TokenPolicy,
    n: f32,
    repeats: usize,
) -> Result<CompressCost> {
    let (mut observe, mut select, mut prune, mut total) = (vec![], vec![], vec![], vec![]);
    for run in 0..=repeats.max(1) {
        let mut cache = full.clone();
        model.device().synchronize()?;
        let t = Instant::now();
        let observations = observe_last_rows(model, tokens, &mut cache, &[policy.needs()])?;
        model.device().synchronize()?;
        let observed = t.elapsed().as_secs_f64() * 1e3;
        let c = compress(
            model,
            &cache,
            &observations,
            policy,
            Budget::Compression(n),
            &BudgetSplit::Uniform,
        )?;
        model.device().synchronize()?;
        let all = t.elapsed().as_secs_f64() * 1e3;
        if run > 0 {
            observe.push(observed);
            select.push(c.stats.policy_ms);
            prune.push(c.stats.prune_ms);
            total.push(all);
        }
    }
    Ok(CompressCost {
        factor: n,
        observe_ms: median(&observe),
        policy_ms: median(&select),
        prune_ms: median(&prune),
        total_ms: median(&total),
        observed_vs_reference_max_abs: 0.0,
        keep_agreement: 1.0,
    })
}
