//! `kvquilt bench graph`: short passes replayed as CUDA graphs ([`GraphedCache`]) beside the
//! same passes issued op by op, on one cache.
//!
//! Three rows, each the median of `--repeats`: `load` (a context of `--keys` rows put into
//! the cache, what a reuse request's assembly costs), `question` (load, then `--rows` tokens
//! appended and the first token read back: a reuse request's compute), and `decode` (greedy
//! steps after it, each reading its token back: tokens/s). The eager rows run exactly what
//! the forward pass runs today (the cache assembled with room, the question appended in
//! place). `--check` compares the graph's logits, cache rows and greedy tokens against the
//! eager pass and fails on any difference (a replay is bit-identical to the eager pass).
//!
//! [`GraphedCache`]: kvquilt_model::GraphedCache

use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args)]
pub struct GraphBenchArgs {
    /// cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Random weights of this shape: smollm2-135m or llama3.1-8b.
    #[arg(long, default_value = "smollm2-135m")]
    shape: String,
    /// Cached context rows the question attends over.
    #[arg(long, default_value_t = 6208)]
    keys: usize,
    /// Question rows appended after the context.
    #[arg(long, default_value_t = 32)]
    rows: usize,
    /// Greedy decode steps after the question.
    #[arg(long, default_value_t = 64)]
    steps: usize,
    /// Timed runs per row (after one warm-up).
    #[arg(long, default_value_t = 20)]
    repeats: usize,
    /// Compare the graph's results against the eager pass; exit non-zero on any difference.
    #[arg(long)]
    check: bool,
    /// Rows of the graphed cache (default: context + question + steps, exactly; the
    /// engine's pooled caches are rounded up to 1,024 rows). Results are bit-identical for
    /// any capacity: the attention kernels plan their split-KV count from the real keys.
    #[arg(long)]
    capacity: Option<usize>,
    /// Issue the "graphed" passes op by op through the same buffers instead of capturing
    /// them (diagnosis: separates the capture from the pass).
    #[arg(long)]
    no_capture: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub(crate) fn run(a: GraphBenchArgs) -> Result<()> {
    imp::run(a)
}

#[cfg(not(feature = "gpu"))]
mod imp {
    pub(super) fn run(_: super::GraphBenchArgs) -> anyhow::Result<()> {
        anyhow::bail!("`bench graph` measures CUDA graphs: build with `--features gpu`")
    }
}

#[cfg(feature = "gpu")]
mod imp {
    use std::time::Instant;

    use anyhow::{Result, bail};
    use kvquilt_model::{
        CollectProbes, DType, GraphedCache, KvCache, LayerKv, Model, ParallelContext, ProbeRequest,
        Rows, Tensor,
    };

    use serde::Serialize;

    use super::super::{random_shape, write_report};
    use super::GraphBenchArgs;

    #[derive(Serialize)]
    struct GraphReport {
        device: String,
        shape: String,
        keys: usize,
        rows: usize,
        steps: usize,
        dtype: String,
        /// Median ms: the context put into the cache.
        load_ms: Timing,
        /// Median ms: load, the question appended, its first token read back.
        question_ms: Timing,
        /// Median ms: load, the question appended summing the attention each key receives
        /// (query-aware blend's query pass; eager: the forward pass's summed probe), the
        /// first token read back.
        query_pass_ms: Timing,
        /// Median tokens/s over `steps` greedy steps.
        decode_tokens_per_s: Timing,
        check: Option<Check>,
    }

    #[derive(Serialize)]
    struct Timing {
        eager: f64,
        graph: f64,
    }

    #[derive(Serialize)]
    struct Check {
        /// Largest |graph − eager| over the question's last-row logits.
        logits_max_abs: f32,
        /// Largest |graph − eager| over the question's K and V rows, every layer.
        rows_max_abs: f32,
        /// Greedy tokens (question's first + decode steps) equal in both.
        tokens_equal: usize,
        /// Appends of bad input (a token outside the vocabulary, a position not after the
        /// cache's last, positions of another count) were refused, the cache unchanged.
        refused: bool,
        /// The pass that also sums column attention (query-aware blend's): largest
        /// |graph − eager| over its logits (the same kernels: 0 expected) ...
        sums_logits_max_abs: f32,
        /// ... and over its per-key sums, max |Δ| over the largest eager sum (KV heads, and in
        /// the graph layers too, add with float atomics in any order: equal to f32 rounding,
        /// not bit for bit).
        sums_max_rel: f32,
        /// The same pass with a temperature of 0.9 on the first half of the keys (APE with
        /// the mass kept; the graphed cache given that parallel context, its kernel scaling
        /// those logits), against the eager pass over a cache marked with it: |Δ| of the
        /// logits over the largest logit (the same kernels: 0 expected) ...
        corrected_logits_max_rel: f32,
        /// ... and of the per-key sums, as `sums_max_rel`.
        corrected_sums_max_rel: f32,
        /// Largest change the correction made to the eager sums, over the largest sum (it
        /// must move them for the two checks above to mean anything).
        correction_moved_rel: f32,
        /// A marked cache loaded into a graphed one (the mark with it): the question's
        /// logits against the eager question over the marked cache (0 expected; infinite
        /// when the graphed cache's views lose the mark) ...
        corrected_decode_logits_max_abs: f32,
        /// ... and greedy tokens equal, step for step, decoding on in each.
        corrected_tokens_equal: usize,
        /// A pruned cache (each layer and KV head keeping its own half of the keys) loaded
        /// into a graphed one: largest |graph − eager| over every decode step's logits (0
        /// expected: the same kernel, `attend_pruned`) ...
        pruned_logits_max_abs: f32,
        /// ... greedy tokens equal, step for step ...
        pruned_tokens_equal: usize,
        /// ... one eager step over the graphed cache's views (pruned, as lent) against the
        /// eager cache's next step (0 expected) ...
        pruned_view_step_max_abs: f32,
        /// ... and a cache pruned with padding (heads keeping different counts) refused.
        padded_refused: bool,
        tokens: usize,
        passed: bool,
    }

    pub(super) fn run(a: GraphBenchArgs) -> Result<()> {
        if a.rows == 0 || a.keys == 0 || a.repeats == 0 {
            bail!("--rows, --keys and --repeats must be positive");
        }
        let device = kvquilt_model::parse_device(&a.device)?;
        if !device.is_cuda() {
            bail!("`bench graph` runs on CUDA (--device cuda)");
        }
        let (config, shape_name) = random_shape(&a.shape)?;
        let needed = a.keys + a.rows + a.steps;
        let capacity = a.capacity.unwrap_or(needed);
        if capacity < needed {
            bail!("--capacity {capacity} below the {needed} rows the bench appends");
        }
        if capacity > config.context_length {
            bail!(
                "a cache of {capacity} rows ({} keys + {} rows + {} steps, or --capacity) \
                 exceeds the shape's context of {}",
                a.keys,
                a.rows,
                a.steps,
                config.context_length
            );
        }
        let dtype = DType::BF16;
        let model = std::sync::Arc::new(Model::random(config.clone(), &device, dtype)?);
        let c = &config;
        let randn = |shape: &[usize]| -> Result<Tensor> {
            Ok(Tensor::randn(0f32, 1.0, shape, &device)?.to_dtype(dtype)?)
        };
        let context = KvCache::new(
            (0..c.num_layers)
                .map(|_| {
                    Ok(LayerKv::new(
                        randn(&[a.keys, c.num_kv_heads, c.head_dim])?,
                        randn(&[a.keys, c.num_kv_heads, c.head_dim])?,
                    ))
                })
                .collect::<Result<Vec<_>>>()?,
            (0..a.keys as u32).collect(),
        );
        let tokens: Vec<u32> = (0..a.rows as u32)
            .map(|j| (j * 7919 + 13) % c.vocab_size as u32)
            .collect();
        let q_pos: Vec<u32> = (a.keys as u32..(a.keys + a.rows) as u32).collect();
        let mut graphed = GraphedCache::new(model.clone(), capacity)?;
        graphed.set_capture(!a.no_capture);
        if a.rows > graphed.most_rows() {
            bail!(
                "--rows {} above the {} a graphed pass takes",
                a.rows,
                graphed.most_rows()
            );
        }

        // eager: what reuse runs today (assembly with room, the question appended in place)
        let eager_load = || -> Result<KvCache> {
            let layers = context
                .layers
                .iter()
                .map(|l| Ok(LayerKv::cat_with_room(&[l], a.rows + a.steps)?))
                .collect::<Result<Vec<_>>>()?;
            Ok(KvCache::new(layers, context.positions.clone()))
        };
        let eager_question = |cache: &mut KvCache| -> Result<(Tensor, u32)> {
            let logits = model.prefill(&tokens, &q_pos, cache)?;
            let first = logits.argmax(0)?.to_scalar::<u32>()?;
            Ok((logits, first))
        };
        let eager_decode = |cache: &mut KvCache, mut tok: u32| -> Result<Vec<u32>> {
            let mut out = Vec::with_capacity(a.steps);
            for _ in 0..a.steps {
                tok = model
                    .decode_step(tok, cache, &mut ())?
                    .argmax(0)?
                    .to_scalar::<u32>()?;
                out.push(tok);
            }
            Ok(out)
        };
        let graph_question = |g: &mut GraphedCache| -> Result<(Tensor, u32)> {
            g.load(&context)?;
            let logits = g.append(&tokens, &q_pos)?;
            let first = logits.argmax(0)?.to_scalar::<u32>()?;
            Ok((logits, first))
        };
        // query-aware blend's query pass without graphs: the summed probe, layer sums added
        // in order; returns the logits and the sums
        let eager_query_pass = |cache: &mut KvCache| -> Result<(Tensor, Tensor)> {
            let mut hook = CollectProbes::new(Some(ProbeRequest::summed_over_all(a.rows)));
            let out = model.run_layers_with(
                0..c.num_layers,
                model.embed(&tokens)?,
                Rows::Append(&q_pos),
                cache,
                &mut hook,
            )?;
            let logits = model
                .logits(&out.hidden.narrow(0, a.rows - 1, 1)?)?
                .squeeze(0)?;
            let mut sums: Option<Tensor> = None;
            for p in hook.layers {
                let Some(s) = p.rows else {
                    bail!("the summed probe reported nothing");
                };
                sums = Some(match sums {
                    None => s,
                    Some(t) => (t + s)?,
                });
            }
            let Some(sums) = sums else {
                bail!("no layer reported a probe");
            };
            Ok((logits, sums))
        };
        let graph_query_pass = |g: &mut GraphedCache| -> Result<(Tensor, Tensor)> {
            g.load(&context)?;
            Ok(g.append_with_column_sums(&tokens, &q_pos)?)
        };
        let graph_decode = |g: &mut GraphedCache, mut tok: u32| -> Result<Vec<u32>> {
            let mut out = Vec::with_capacity(a.steps);
            for _ in 0..a.steps {
                let pos = g.len() as u32;
                tok = g.append(&[tok], &[pos])?.argmax(0)?.to_scalar::<u32>()?;
                out.push(tok);
            }
            Ok(out)
        };

        let check = if a.check {
            let mut cache = eager_load()?;
            let (le, first_e) = eager_question(&mut cache)?;
            let (lg, first_g) = graph_question(&mut graphed)?;
            let logits_max_abs = max_abs(&le, &lg)?;
            let gc = graphed.cache()?;
            let mut rows_max_abs = 0f32;
            for (e, g) in cache.layers.iter().zip(&gc.layers) {
                for (x, y) in [(&e.k, &g.k), (&e.v, &g.v)] {
                    let d = max_abs(&x.narrow(0, a.keys, a.rows)?, &y.narrow(0, a.keys, a.rows)?)?;
                    rows_max_abs = rows_max_abs.max(d);
                }
            }
            let mut te = vec![first_e];
            te.extend(eager_decode(&mut cache, first_e)?);
            // bad input is refused and leaves the cache as it was (the decode below then
            // still matches the eager one step for step); so is reloading rows that are
            // lent out (`gc` views them)
            let next = graphed.len() as u32;
            let refused = graphed.load(&context).is_err()
                && graphed.append(&[c.vocab_size as u32], &[next]).is_err()
                && graphed.append(&[0], &[0]).is_err()
                && graphed.append(&[0, 1], &[next]).is_err()
                && graphed.len() == next as usize;
            let mut tg = vec![first_g];
            tg.extend(graph_decode(&mut graphed, first_e)?);
            let tokens_equal = te.iter().zip(&tg).take_while(|(x, y)| x == y).count();
            // the pass summing column attention, against the eager forward pass's summed
            // probe (what query-aware blend runs without graphs), layer sums added in order
            let (sums_logits_max_abs, sums_max_rel) = {
                let (le, eager) = eager_query_pass(&mut eager_load()?)?;
                let mut g = GraphedCache::new(model.clone(), capacity)?;
                g.set_capture(!a.no_capture);
                // twice: the first call captures, the second replays
                graph_query_pass(&mut g)?;
                let (lg, sums) = graph_query_pass(&mut g)?;
                let scale = eager
                    .abs()?
                    .max(0)?
                    .to_scalar::<f32>()?
                    .max(f32::MIN_POSITIVE);
                (max_abs(&le, &lg)?, max_abs(&eager, &sums)? / scale)
            };
            // the query pass with a temperature on the first half of the keys: the eager pass
            // over a marked cache against the graphed one over a cache given the same context
            // (both apply it in the attention kernel); then the question and decoding over a
            // marked cache loaded with its mark
            let t = 0.9f32;
            let half = (a.keys / 2).max(1);
            let context_of = |keys: usize| -> Result<ParallelContext> {
                Ok(ParallelContext::new(0..keys as u32, t, 1.0 / t)?)
            };
            let (corrected_logits_max_rel, corrected_sums_max_rel, correction_moved_rel) = {
                let mut marked = eager_load()?;
                marked.set_parallel_context(Some(context_of(half)?));
                let (le, eager) = eager_query_pass(&mut marked)?;
                let (_, plain) = eager_query_pass(&mut eager_load()?)?;
                let mut g = GraphedCache::new(model.clone(), capacity)?;
                g.set_capture(!a.no_capture);
                let pass = |g: &mut GraphedCache| -> Result<(Tensor, Tensor)> {
                    g.load(&context)?;
                    g.set_parallel_context(Some(context_of(half)?))?;
                    Ok(g.append_with_column_sums(&tokens, &q_pos)?)
                };
                pass(&mut g)?;
                let (lg, sums) = pass(&mut g)?;
                let largest = |x: &Tensor| -> Result<f32> {
                    Ok(x.abs()?.max(0)?.to_scalar::<f32>()?.max(f32::MIN_POSITIVE))
                };
                (
                    max_abs(&le, &lg)? / largest(&le)?,
                    max_abs(&eager, &sums)? / largest(&eager)?,
                    max_abs(&eager, &plain)? / largest(&eager)?,
                )
            };
            let (corrected_decode_logits_max_abs, corrected_tokens_equal) = {
                let mut marked = eager_load()?;
                marked.set_parallel_context(Some(context_of(half)?));
                let (le, first) = eager_question(&mut marked)?;
                let mut te_marked = vec![first];
                te_marked.extend(eager_decode(&mut marked, first)?);
                let mut marked_context = context.clone();
                marked_context.set_parallel_context(Some(context_of(half)?));
                let mut g = GraphedCache::new(model.clone(), capacity)?;
                g.set_capture(!a.no_capture);
                g.load(&marked_context)?;
                let lg = g.append(&tokens, &q_pos)?;
                let mut tg = vec![lg.argmax(0)?.to_scalar::<u32>()?];
                tg.extend(graph_decode(&mut g, first)?);
                let marked_views = g.cache()?.parallel_context() == marked.parallel_context();
                (
                    if marked_views {
                        max_abs(&le, &lg)?
                    } else {
                        f32::INFINITY
                    },
                    te_marked
                        .iter()
                        .zip(&tg)
                        .take_while(|(x, y)| x == y)
                        .count(),
                )
            };
            // a pruned cache: each layer and KV head keeps its own half of the keys (as many
            // per head: no padding), decoded eagerly and graphed from its first token on
            let (
                pruned_logits_max_abs,
                pruned_tokens_equal,
                pruned_view_step_max_abs,
                padded_refused,
            ) = {
                let keep = |padded: bool| -> Vec<Vec<Vec<u32>>> {
                    (0..c.num_layers)
                        .map(|l| {
                            (0..c.num_kv_heads)
                                .map(|h| {
                                    let mut rows: Vec<u32> = (0..a.keys as u32)
                                        .filter(|r| (*r as usize + l + h).is_multiple_of(2))
                                        .take((a.keys / 2).max(1))
                                        .collect();
                                    if padded && h == 0 && rows.len() > 1 {
                                        rows.pop();
                                    }
                                    rows
                                })
                                .collect()
                        })
                        .collect()
                };
                let pruned = context.retain(&keep(false))?;
                let padded = context.retain(&keep(true))?;
                let next_pos = |positions: &[u32]| positions.last().map_or(0, |p| p + 1);
                let mut eager = pruned.clone();
                let mut g = GraphedCache::new(model.clone(), capacity)?;
                g.set_capture(!a.no_capture);
                let padded_refused = g.load(&padded).is_err();
                g.load(&pruned)?;
                let (mut tok_e, mut tok_g) = (tokens[0], tokens[0]);
                let (mut worst, mut equal, mut steps_done) = (0f32, 0, 0);
                for _ in 0..a.steps {
                    let le = model.decode_step(tok_e, &mut eager, &mut ())?;
                    let pos = next_pos(g.positions());
                    let lg = g.append(&[tok_g], &[pos])?;
                    worst = worst.max(max_abs(&le, &lg)?);
                    tok_e = le.argmax(0)?.to_scalar::<u32>()?;
                    tok_g = lg.argmax(0)?.to_scalar::<u32>()?;
                    // greedy tokens equal step for step, up to the first difference
                    if tok_e == tok_g && equal == steps_done {
                        equal += 1;
                    }
                    steps_done += 1;
                }
                let mut view = g.cache()?;
                let view_step = if view.is_pruned() {
                    let lv = model.decode_step(tok_g, &mut view, &mut ())?;
                    let le = model.decode_step(tok_e, &mut eager, &mut ())?;
                    max_abs(&le, &lv)?
                } else {
                    f32::INFINITY
                };
                (worst, equal, view_step, padded_refused)
            };
            // the replay runs the eager pass's kernels with the eager pass's split plan
            // (ARCHITECTURE.md, "A graphed pass is the eager pass"): bit-identical, so any
            // difference at all fails
            let passed = logits_max_abs == 0.0
                && rows_max_abs == 0.0
                && first_e == first_g
                && refused
                && tokens_equal == te.len()
                && sums_logits_max_abs == 0.0
                && sums_max_rel <= 1e-4
                && corrected_logits_max_rel == 0.0
                && corrected_sums_max_rel <= 1e-4
                && correction_moved_rel > 1e-3
                && corrected_decode_logits_max_abs == 0.0
                && corrected_tokens_equal == te.len()
                && pruned_logits_max_abs == 0.0
                && pruned_tokens_equal == a.steps
                && pruned_view_step_max_abs == 0.0
                && padded_refused;
            println!(
                "check: logits max |Δ| {logits_max_abs:e}, K/V rows max |Δ| {rows_max_abs:e}, \
                 greedy tokens equal {tokens_equal}/{}, bad input refused: {refused}; \
                 with column sums: logits max |Δ| {sums_logits_max_abs:e}, sums max rel |Δ| \
                 {sums_max_rel:e}; corrected (T 0.9): logits max rel |Δ| \
                 {corrected_logits_max_rel:e}, sums max rel |Δ| {corrected_sums_max_rel:e}, \
                 the correction moved the sums by {correction_moved_rel:e}; over a marked cache: \
                 question logits max |Δ| {corrected_decode_logits_max_abs:e}, greedy tokens \
                 equal {corrected_tokens_equal}/{}; pruned: decode logits max |Δ| \
                 {pruned_logits_max_abs:e}, greedy tokens equal {pruned_tokens_equal}/{}, a step \
                 over its views max |Δ| {pruned_view_step_max_abs:e}, padded refused: \
                 {padded_refused} — {}",
                te.len(),
                te.len(),
                a.steps,
                if passed { "pass" } else { "FAIL" }
            );
            Some(Check {
                logits_max_abs,
                rows_max_abs,
                tokens_equal,
                refused,
                sums_logits_max_abs,
                sums_max_rel,
                corrected_logits_max_rel,
                corrected_sums_max_rel,
                correction_moved_rel,
                corrected_decode_logits_max_abs,
                corrected_tokens_equal,
                pruned_logits_max_abs,
                pruned_tokens_equal,
                pruned_view_step_max_abs,
                padded_refused,
                tokens: te.len(),
                passed,
            })
        } else {
            None
        };

        let median = |mut v: Vec<f64>| -> f64 {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let sync = || -> Result<()> { Ok(device.synchronize()?) };
        let mut load = (Vec::new(), Vec::new());
        let mut question = (Vec::new(), Vec::new());
        let mut decode = (Vec::new(), Vec::new());
        let mut query_pass = (Vec::new(), Vec::new());
        for i in 0..=a.repeats {
            let keep = i > 0;
            // eager
            sync()?;
            let t0 = Instant::now();
            drop(eager_load()?);
            sync()?;
            let t_load = t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            let mut cache = eager_load()?;
            let (_, first) = eager_question(&mut cache)?;
            let t_q = t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            eager_decode(&mut cache, first)?;
            let t_d = t0.elapsed().as_secs_f64();
            if keep {
                load.0.push(t_load * 1e3);
                question.0.push(t_q * 1e3);
                decode.0.push(a.steps as f64 / t_d);
            }
            // graphed
            sync()?;
            let t0 = Instant::now();
            graphed.load(&context)?;
            sync()?;
            let t_load = t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            let (_, first) = graph_question(&mut graphed)?;
            let t_q = t0.elapsed().as_secs_f64();
            let t0 = Instant::now();
            graph_decode(&mut graphed, first)?;
            let t_d = t0.elapsed().as_secs_f64();
            if keep {
                load.1.push(t_load * 1e3);
                question.1.push(t_q * 1e3);
                decode.1.push(a.steps as f64 / t_d);
            }
            // the query pass, eager then graphed
            sync()?;
            let t0 = Instant::now();
            let mut cache = eager_load()?;
            let (logits, _) = eager_query_pass(&mut cache)?;
            logits.argmax(0)?.to_scalar::<u32>()?;
            let t_e = t0.elapsed().as_secs_f64();
            drop(cache);
            let t0 = Instant::now();
            let (logits, _) = graph_query_pass(&mut graphed)?;
            logits.argmax(0)?.to_scalar::<u32>()?;
            let t_g = t0.elapsed().as_secs_f64();
            if keep {
                query_pass.0.push(t_e * 1e3);
                query_pass.1.push(t_g * 1e3);
            }
        }
        let timing = |(e, g): (Vec<f64>, Vec<f64>)| Timing {
            eager: median(e),
            graph: median(g),
        };
        let report = GraphReport {
            device: a.device,
            shape: shape_name,
            keys: a.keys,
            rows: a.rows,
            steps: a.steps,
            dtype: format!("{dtype:?}"),
            load_ms: timing(load),
            question_ms: timing(question),
            query_pass_ms: timing(query_pass),
            decode_tokens_per_s: timing(decode),
            check,
        };
        println!(
            "{} keys, {} rows ({}):\n  load            eager {:>8.3} ms   graph {:>8.3} ms\n  \
             load + question eager {:>8.3} ms   graph {:>8.3} ms   ({:.2}× faster)\n  \
             load + query pass eager {:>6.3} ms   graph {:>8.3} ms   ({:.2}× faster)\n  \
             decode          eager {:>8.1} tok/s graph {:>8.1} tok/s ({:.2}×)",
            report.keys,
            report.rows,
            report.shape,
            report.load_ms.eager,
            report.load_ms.graph,
            report.question_ms.eager,
            report.question_ms.graph,
            report.question_ms.eager / report.question_ms.graph,
            report.query_pass_ms.eager,
            report.query_pass_ms.graph,
            report.query_pass_ms.eager / report.query_pass_ms.graph,
            report.decode_tokens_per_s.eager,
            report.decode_tokens_per_s.graph,
            report.decode_tokens_per_s.graph / report.decode_tokens_per_s.eager,
        );
        let failed = report.check.as_ref().is_some_and(|c| !c.passed);
        write_report(&report, a.json.as_deref())?;
        if failed {
            bail!("the graphed pass differs from the eager pass (it must be bit-identical)");
        }
        Ok(())
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
        Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?)
    }
}
