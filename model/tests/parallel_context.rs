//! A cache marked with a parallel context (APE's correction, `KvCache::set_parallel_context`)
//! on tiny random models: the correction reaches the queries after the context, in a prefill
//! and in every decode step, and nothing else.

mod common;

use common::{max_diff, positions};
use kvquilt_model::{KvCache, LoadedModel, Model, ParallelContext, Rows, Tensor};

fn models() -> Vec<LoadedModel> {
    vec![common::tiny("llama"), common::tiny("qwen2")]
}

fn prompt(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 41 + 7) % 500).collect()
}

/// The first 24 tokens prefilled, marked as a context at positions `4..20`.
fn context_cache(model: &Model, t: f32, s: f32) -> KvCache {
    let mut cache = model.empty_cache().unwrap();
    model
        .prefill(&prompt(24), &positions(24), &mut cache)
        .unwrap();
    cache.set_parallel_context(Some(ParallelContext::new(4..20, t, s).unwrap()));
    cache
}

fn diff(a: &Tensor, b: &Tensor) -> f32 {
    max_diff(a, b).0
}

/// `T = S = 1` is exact attention; other settings move every later step's logits.
#[test]
fn unit_settings_are_exact_and_others_change_what_follows() {
    for m in models() {
        let model = &m.model;
        let mut plain = context_cache(model, 1.0, 1.0);
        plain.set_parallel_context(None);
        let mut unit = context_cache(model, 1.0, 1.0);
        let mut ape = context_cache(model, 0.5, 0.8);
        for token in [3u32, 77, 150] {
            let want = model.decode_step(token, &mut plain, &mut ()).unwrap();
            let got = model.decode_step(token, &mut unit, &mut ()).unwrap();
            let moved = model.decode_step(token, &mut ape, &mut ()).unwrap();
            let (d, scale) = max_diff(&got, &want);
            assert!(
                d <= 1e-4 * scale.max(1e-3),
                "T = S = 1: {d} (scale {scale})"
            );
            assert!(diff(&moved, &want) > 1e-3, "T 0.5, S 0.8 changed nothing");
        }
        assert_eq!(ape.parallel_context().map(|p| p.positions()), Some(4..20));
    }
}

/// Several tokens appended at once attend as the same tokens appended one by one (every one
/// of them after the context, each corrected); a call whose queries all sit inside the
/// context (blend's recomputed rows) is not corrected at all.
#[test]
fn appended_rows_are_corrected_and_rows_inside_are_not() {
    for m in models() {
        let model = &m.model;
        let tail = [9u32, 31, 250];
        let mut at_once = context_cache(model, 0.6, 0.9);
        let hidden = model.embed(&tail).unwrap();
        let out = model
            .run_layers(
                0..model.config().num_layers,
                hidden,
                Rows::Append(&[24, 25, 26]),
                &mut at_once,
                None,
            )
            .unwrap();
        let mut one_by_one = context_cache(model, 0.6, 0.9);
        let mut last = None;
        for &tok in &tail {
            let pos = one_by_one.positions.last().unwrap() + 1;
            let h = model.embed(&[tok]).unwrap();
            let o = model
                .run_layers(
                    0..model.config().num_layers,
                    h,
                    Rows::Append(&[pos]),
                    &mut one_by_one,
                    None,
                )
                .unwrap();
            last = Some(o.hidden);
        }
        let all = out.hidden.narrow(0, 2, 1).unwrap();
        let (d, scale) = max_diff(&all, &last.unwrap());
        assert!(d <= 1e-4 * scale.max(1e-3), "at once vs one by one: {d}");

        // rows 5, 9, 17 (inside the context) recomputed: the same with or without it
        let rows = [5usize, 9, 17];
        let toks: Vec<u32> = rows.iter().map(|&r| prompt(24)[r]).collect();
        let run = |cache: &mut KvCache| {
            let h = model.embed(&toks).unwrap();
            model
                .run_layers(
                    0..model.config().num_layers,
                    h,
                    Rows::Replace(&rows),
                    cache,
                    None,
                )
                .unwrap()
                .hidden
        };
        let mut marked = context_cache(model, 0.6, 0.9);
        let mut unmarked = context_cache(model, 0.6, 0.9);
        unmarked.set_parallel_context(None);
        let (d, scale) = max_diff(&run(&mut marked), &run(&mut unmarked));
        assert!(d <= 1e-4 * scale.max(1e-3), "rows inside the context: {d}");
    }
}

/// A pruned cache's rows are not at their positions: pruning a marked cache is refused, and
/// marking a pruned one fails its next call, the cache left as it was.
#[test]
fn a_pruned_cache_refuses_the_correction() {
    let m = common::tiny("llama");
    let model = &m.model;
    let cache = context_cache(model, 0.9, 0.9);
    let heads = cache.layers[0].k.dims()[1];
    let keep = vec![vec![vec![0u32, 1, 2, 10, 22, 23]; heads]; cache.layers.len()];
    let e = cache.retain(&keep).unwrap_err();
    assert!(e.to_string().contains("parallel context"), "{e}");

    let mut unmarked = cache.clone();
    unmarked.set_parallel_context(None);
    let mut pruned = unmarked.retain(&keep).unwrap();
    pruned.set_parallel_context(cache.parallel_context().cloned());
    let before = pruned.len();
    let e = model.decode_step(5, &mut pruned, &mut ()).unwrap_err();
    assert!(e.to_string().contains("pruned"), "{e}");
    assert_eq!(pruned.len(), before);
}

/// Narrowing keeps the mark (by position); re-positioning drops it (it named the old
/// positions); concatenating gives an unmarked cache.
#[test]
fn cache_operations_keep_or_drop_the_mark_by_position() {
    let m = common::tiny("llama");
    let cache = context_cache(&m.model, 0.9, 0.9);
    assert!(cache.narrow(2, 10).unwrap().parallel_context().is_some());
    let moved = cache.clone().with_positions(positions(24)).unwrap();
    assert!(moved.parallel_context().is_none());
    let joined = KvCache::cat(&[
        &cache.narrow(0, 12).unwrap(),
        &cache.narrow(12, 12).unwrap(),
    ]);
    assert!(joined.unwrap().parallel_context().is_none());
}

/// The reference attention corrects by block: a call whose rows sit inside and after the
/// context, run with a probe (so it does not split) under a score budget small enough for
/// blocks to mix corrected and exact rows, gives what the split call gives.
#[test]
fn blocks_that_mix_corrected_and_exact_rows_match_the_split_call() {
    for m in models() {
        let mut model = m.model;
        let rows = [5usize, 9, 17, 19, 20, 22, 23]; // 19 and 20 share a block
        let toks: Vec<u32> = rows.iter().map(|&r| prompt(24)[r]).collect();
        let layers = 0..model.config().num_layers;
        let mut split = context_cache(&model, 0.6, 1.3);
        let want = model
            .run_layers(
                layers.clone(),
                model.embed(&toks).unwrap(),
                Rows::Replace(&rows),
                &mut split,
                None,
            )
            .unwrap()
            .hidden;
        // 2 rows (within 2 positions) x every head x 24 keys per block
        model.set_score_budget(2 * model.config().num_heads * 24);
        let mut probed = context_cache(&model, 0.6, 1.3);
        let probe = kvquilt_model::ProbeRequest::rows(vec![0, 6]);
        let got = model
            .run_layers(
                layers,
                model.embed(&toks).unwrap(),
                Rows::Replace(&rows),
                &mut probed,
                Some(&probe),
            )
            .unwrap()
            .hidden;
        let (d, scale) = max_diff(&got, &want);
        assert!(d <= 1e-4 * scale.max(1e-3), "mixed blocks vs split: {d}");
    }
}

/// A correction limited to a band of layers corrects exactly those layers' attention: after
/// three tokens appended, a layer's KV depends only on the layers below it, so with the band
/// at layer 1 the layer-0 and layer-1 rows equal exact attention's and the logits do not;
/// with the band at layer 0, layer 0's rows equal exact's and layer 1's the unbanded
/// correction's. A band over every layer is the unbanded correction, bit for bit.
#[test]
fn a_layer_band_corrects_only_its_layers() {
    for m in models() {
        let model = &m.model;
        let layers = model.config().num_layers;
        assert!(layers >= 2, "the test needs two layers");
        let tail = [9u32, 31, 250];
        let run = |band: Option<std::ops::Range<usize>>, corrected: bool| {
            let mut cache = context_cache(model, 0.6, 1.0 / 0.6);
            match (corrected, band) {
                (false, _) => cache.set_parallel_context(None),
                (true, Some(b)) => {
                    let p = cache.parallel_context().unwrap().clone();
                    cache.set_parallel_context(Some(p.with_layers(b).unwrap()));
                }
                (true, None) => {}
            }
            let out = model
                .run_layers(
                    0..layers,
                    model.embed(&tail).unwrap(),
                    Rows::Append(&[24, 25, 26]),
                    &mut cache,
                    None,
                )
                .unwrap();
            (cache, out.hidden)
        };
        let rows = |c: &KvCache, l: usize| c.layers[l].narrow(24, 3).unwrap();
        let (exact, exact_out) = run(None, false);
        let (all, all_out) = run(None, true);
        let (wide, wide_out) = run(Some(0..layers + 5), true);
        assert_eq!(diff(&wide_out, &all_out), 0.0, "a band over every layer");
        for l in 0..layers {
            assert_eq!(diff(&rows(&wide, l).k, &rows(&all, l).k), 0.0);
        }
        let (top, top_out) = run(Some(1..2), true);
        let (bottom, _) = run(Some(0..1), true);
        for l in 0..2 {
            assert_eq!(diff(&rows(&top, l).v, &rows(&exact, l).v), 0.0, "layer {l}");
        }
        assert!(
            diff(&top_out, &exact_out) > 1e-4,
            "the band at layer 1 changed nothing"
        );
        assert_eq!(diff(&rows(&bottom, 0).v, &rows(&exact, 0).v), 0.0);
        assert_eq!(diff(&rows(&bottom, 1).v, &rows(&all, 1).v), 0.0);
        assert!(diff(&rows(&bottom, 1).v, &rows(&exact, 1).v) > 1e-5);
    }
}
