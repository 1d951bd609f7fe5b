//! Blend modes against full prefill and against contexts assembled by hand from the model's
//! own forward pass, on tiny random models (HF-saved) and the real SmolLM2.
//!
//! Longer than the ~600-line guide on purpose: every mode is checked here against full
//! prefill on the same fixtures and setup helpers, with what it stored beside its output.

use std::path::PathBuf;
use std::sync::Arc;

use kvquilt_blend::{
    BlendConfig, BlendRequest, Blender, ChunkCodec, ChunkEncoding, CorrectionScope, Deviation,
    Fallback, Mode, ModelIdentity, ParallelCorrection, PlannedMode, SegmentSource, StoredObject,
};
use kvquilt_kvstore::{KvObject, PolicyKind, StoreConfig, TierKind, TieredStore};
use kvquilt_model::{
    DType, Device, KvCache, LoadedModel, ParallelContext, Tensor, load, positions,
};
use tokio::runtime::Runtime;

fn tiny(kind: &str) -> LoadedModel {
    let dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../model/tests/fixtures")
    .join(format!("tiny-{kind}"));
    load(&dir, &Device::Cpu, DType::F32).expect("loading a tiny model")
}

struct Setup {
    blender: Blender,
    _rt: Runtime,
}

fn setup(loaded: LoadedModel) -> Setup {
    setup_with(loaded, false)
}

fn setup_with(loaded: LoadedModel, fallback: bool) -> Setup {
    setup_custom(loaded, fallback, None, 0)
}

/// A blender under `encoding` (the model's default when `None`), with a device tier of
/// `device_bytes` (0: off).
fn setup_custom(
    loaded: LoadedModel,
    fallback: bool,
    encoding: Option<ChunkEncoding>,
    device_bytes: u64,
) -> Setup {
    let rt = Runtime::new().unwrap();
    let mut identity = ModelIdentity::of(&loaded).unwrap();
    if let Some(e) = encoding {
        identity = identity.with_encoding(&loaded.model, e).unwrap();
    }
    let store = TieredStore::open(StoreConfig::host_only(1 << 30)).unwrap();
    // exact comparisons need each request to run its own mode
    let blender = Blender::new(
        Arc::new(loaded.model),
        identity,
        Arc::new(store),
        rt.handle().clone(),
    )
    .with_fallback_to_full(fallback)
    .with_device_tier(device_bytes, PolicyKind::Lru);
    Setup { blender, _rt: rt }
}

/// Gives `b`'s cost model a steady machine: 1 ms per unit of prefill work and host-tier loads
/// at 10 GB/s with no latency, outweighing every wall-clock sample taken so far (a prefill
/// fit keeps 0.9 of the old per sample, a tier's bandwidth 0.7: 0.9^100 ≈ 3e-5, 0.7^40 ≈
/// 6e-7). Tests whose point is a decision on fixed numbers call it first: a tiny model's
/// few real samples are wall-clock times, and on a busy host (CI runs tests in parallel on
/// 2 cores) one stalled 8-token prefill or 15 KB load turns the fits' answer (a CI run
/// failed so: a request served from the device tier fell back as `Estimated`).
fn steady_costs(b: &Blender) {
    let costs = b.costs();
    for t in [8usize, 40, 92, 20, 64].iter().cycle().take(100) {
        costs.record_full_prefill(*t, 1e-3 * costs.prefill_work(0, *t));
    }
    for _ in 0..40 {
        costs.record_load(TierKind::HOST, 1 << 20, (1 << 20) as f64 / 10e9);
        costs.record_latency(TierKind::HOST, 0.0);
    }
}

/// Deterministic pseudo-random token ids in `1..vocab`.
fn toks(seed: u32, n: usize, vocab: u32) -> Vec<u32> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            1 + x % (vocab - 1)
        })
        .collect()
}

fn req(prefix: Vec<u32>, chunks: Vec<Vec<u32>>, suffix: Vec<u32>, mode: Mode) -> BlendRequest {
    BlendRequest::new(prefix, chunks, suffix, mode)
}

fn vec1(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

/// max |a − b| ≤ tol × max |b|
fn assert_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
    let (a, b) = (vec1(a), vec1(b));
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff <= tol * scale,
        "{what}: max |Δ| {diff} > {tol} × {scale}"
    );
}

/// Reuse by hand: every segment prefilled alone at `0..T`, keys moved to the prompt's
/// positions, the suffix prefilled over them.
fn reuse_by_hand(b: &Blender, segments: &[&[u32]], suffix: &[u32]) -> Tensor {
    let m = b.model();
    let mut parts = Vec::new();
    let mut at = 0;
    for s in segments {
        let (c, _) = b.codec(b"").prefill(m, s).unwrap();
        parts.push(c.with_positions(positions(at, s.len())).unwrap());
        at += s.len();
    }
    let refs: Vec<&KvCache> = parts.iter().collect();
    let mut cache = KvCache::cat(&refs).unwrap();
    m.prefill(suffix, &positions(at, suffix.len()), &mut cache)
        .unwrap()
}

fn full(b: &Blender, r: &BlendRequest) -> Tensor {
    let mut r = r.clone();
    r.mode = Mode::Full;
    b.run(b"", &r).unwrap().logits
}

/// `r` in another mode.
fn with_mode(r: &BlendRequest, mode: Mode) -> BlendRequest {
    BlendRequest { mode, ..r.clone() }
}

#[test]
fn blend_at_ratio_one_equals_full() {
    for kind in ["qwen2", "llama"] {
        let s = setup(tiny(kind));
        let b = &s.blender;
        let r = req(
            toks(1, 9, 512),
            vec![toks(2, 40, 512), toks(3, 25, 512), toks(4, 33, 512)],
            toks(5, 7, 512),
            Mode::Blend(BlendConfig::cacheblend(1.0)),
        );
        let want = full(b, &r);
        let out = b.run(b"", &r).unwrap();
        assert_close(&out.logits, &want, 1e-4, kind);
        assert_eq!(out.stats.recompute_fraction, 1.0);
        // gradual filtering over several check layers at ratio 1 is also exact
        if b.model().config().num_layers > 2 {
            let cfg = BlendConfig {
                check_layers: vec![1, 2],
                gradual: 2.0,
                deviation: Deviation::Kv,
                ..BlendConfig::cacheblend(1.0)
            };
            let out = b.run(b"", &with_mode(&r, Mode::Blend(cfg))).unwrap();
            assert_close(&out.logits, &want, 1e-4, "gradual");
        }
        // query-aware ranking (a suffix pass over the cache first) is exact at ratio 1 too
        // (also with the suffix pass over the first layer only: the rows it leaves stale in
        // the layers above are recomputed by the blend like every other)
        for (w, layers) in [(0.5, 0), (1.0, 0), (1.0, 1)] {
            let cfg = BlendConfig {
                query_weight: w,
                query_layers: layers,
                ..BlendConfig::cacheblend(1.0)
            };
            let out = b.run(b"", &with_mode(&r, Mode::Blend(cfg))).unwrap();
            assert_close(&out.logits, &want, 1e-4, "query-aware");
        }
        let too_many = BlendConfig {
            query_weight: 1.0,
            query_layers: b.model().config().num_layers + 1,
            ..BlendConfig::cacheblend(0.5)
        };
        assert!(b.run(b"", &with_mode(&r, Mode::Blend(too_many))).is_err());
        // timing the phases changes nothing but the stats
        let timed = BlendRequest {
            time_phases: true,
            ..with_mode(&r, Mode::Blend(BlendConfig::default()))
        };
        let out = b.run(b"", &timed).unwrap();
        let untimed = b
            .run(
                b"",
                &BlendRequest {
                    time_phases: false,
                    ..timed.clone()
                },
            )
            .unwrap();
        assert_eq!(vec1(&out.logits), vec1(&untimed.logits));
        assert!(untimed.stats.phases.is_empty());
        let phases: Vec<&str> = out.stats.phases.iter().map(|p| p.phase).collect();
        for want in [
            "assemble",
            "query pass",
            "layers before check",
            "check layer",
            "recompute layers",
            "head",
        ] {
            assert!(phases.contains(&want), "{want} missing from {phases:?}");
        }
    }
}

/// A check at layer 0 ranks by the question before any layer runs: no layer is computed for
/// every token, so at ratio 0 — every chunk stored, no forced chunk starts — the blend is
/// `reuse` (only the question's rows computed, over the stored KV), at ratio 1 it is full
/// prefill, and in between it recomputes exactly its
/// budget. The default (check at layer 1, layer 0 for every token) differs from reuse at
/// ratio 0 — the test would not tell the two apart otherwise. Without the question's
/// ranking a check at layer 0 has nothing to rank by and is refused.
#[test]
fn a_check_at_layer_zero_computes_only_the_selected_rows() {
    for kind in ["llama", "qwen2"] {
        let s = setup(tiny(kind));
        let b = &s.blender;
        let (p, a, c, q) = (
            toks(31, 9, 512),
            toks(32, 40, 512),
            toks(33, 27, 512),
            toks(34, 6, 512),
        );
        let r = req(
            p.clone(),
            vec![a.clone(), c.clone()],
            q.clone(),
            Mode::Reuse,
        );
        b.run(b"", &r).unwrap(); // stores every segment
        let at_zero = |ratio: f32| BlendConfig {
            ratio,
            check_layers: vec![0],
            ..BlendConfig::default()
        };
        let reuse = reuse_by_hand(b, &[&p, &a, &c], &q);
        let out = b
            .run(b"", &with_mode(&r, Mode::Blend(at_zero(0.0))))
            .unwrap();
        assert_eq!(out.stats.misses, 0, "{kind}");
        assert_eq!(out.stats.recompute_fraction, 0.0, "{kind}");
        assert_close(&out.logits, &reuse, 1e-5, "check at 0, ratio 0 = reuse");
        let default_at_zero = BlendConfig {
            ratio: 0.0,
            ..BlendConfig::default()
        };
        let out = b
            .run(b"", &with_mode(&r, Mode::Blend(default_at_zero)))
            .unwrap();
        let (x, y) = (vec1(&out.logits), vec1(&reuse));
        let diff = x
            .iter()
            .zip(&y)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff > 1e-3,
            "{kind}: layer 0 for every token changed nothing ({diff})"
        );

        let out = b
            .run(b"", &with_mode(&r, Mode::Blend(at_zero(1.0))))
            .unwrap();
        assert_close(
            &out.logits,
            &full(b, &r),
            1e-4,
            "check at 0, ratio 1 = full",
        );

        let timed = BlendRequest {
            time_phases: true,
            ..with_mode(&r, Mode::Blend(at_zero(0.5)))
        };
        let out = b.run(b"", &timed).unwrap();
        // the prefix at position 0 is exact (no sink here): its tokens are never selected
        // nor counted in the budget, which is half of the chunks' tokens alone
        let cached = (p.len() + a.len() + c.len()) as f64;
        let blendable = (a.len() + c.len()) as f64;
        assert_eq!(
            out.stats.recompute_fraction,
            (0.5 * blendable).floor() / cached,
            "{kind}"
        );
        let phases: Vec<&str> = out.stats.phases.iter().map(|p| p.phase).collect();
        assert!(phases.contains(&"recompute layers"), "{phases:?}");
        assert!(!phases.contains(&"layers before check"), "{phases:?}");

        let mixed = BlendConfig {
            query_weight: 0.5,
            ..at_zero(0.3)
        };
        let e = b
            .run(b"", &with_mode(&r, Mode::Blend(mixed)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("layer 0"), "{e}");
    }
}

/// APE's correction in a blend at ratio 1: every chunk row is recomputed exactly, so the
/// blend equals a full prefill of the context, marked as a parallel context, with the suffix
/// prefilled over it — corrected as it attends to the chunks (and unit settings equal full
/// prefill). The output cache keeps the mark for the decode steps; bad settings are refused.
#[test]
fn a_parallel_correction_applies_to_the_suffix_over_the_chunks() {
    let s = setup(tiny("llama"));
    let b = &s.blender;
    let (prefix, chunks, suffix) = (
        toks(1, 9, 512),
        vec![toks(2, 40, 512), toks(3, 25, 512)],
        toks(5, 7, 512),
    );
    let with = |t: f32, s: f32| {
        Mode::Blend(BlendConfig {
            parallel: Some(ParallelCorrection::new(t, s)),
            ..BlendConfig::cacheblend(1.0)
        })
    };
    let r = req(
        prefix.clone(),
        chunks.clone(),
        suffix.clone(),
        with(1.0, 1.0),
    );
    assert_close(
        &b.run(b"", &r).unwrap().logits,
        &full(b, &r),
        1e-4,
        "T = S = 1",
    );

    let out = b.run(b"", &with_mode(&r, with(0.6, 0.8))).unwrap();
    let m = b.model();
    let context: Vec<u32> = prefix
        .iter()
        .chain(chunks.concat().iter())
        .copied()
        .collect();
    let mut cache = m.empty_cache().unwrap();
    m.prefill(&context, &positions(0, context.len()), &mut cache)
        .unwrap();
    let marked = ParallelContext::new(9..74, 0.6, 0.8).unwrap();
    cache.set_parallel_context(Some(marked.clone()));
    let want = m
        .prefill(&suffix, &positions(context.len(), suffix.len()), &mut cache)
        .unwrap();
    assert_close(&out.logits, &want, 1e-4, "T 0.6, S 0.8 by hand");
    assert!(
        vec1(&out.logits)
            .iter()
            .zip(vec1(&full(b, &r)))
            .any(|(a, b)| (a - b).abs() > 1e-3),
        "the correction changed nothing"
    );
    assert_eq!(out.cache.parallel_context(), Some(&marked));

    for bad in [with(0.0, 0.9), with(0.9, f32::NAN), with(9.0, 0.9)] {
        let e = b.run(b"", &with_mode(&r, bad)).unwrap_err().to_string();
        assert!(e.contains("parallel correction"), "{e}");
    }
}

/// A correction's scope: `Selection` corrects the ranking's pass alone (at ratio 1 the blend
/// is full prefill and the output cache is unmarked; below it the ranking, and so the logits,
/// move), `Answer` the answer alone (at ratio 1 the by-hand corrected prefill, the mark kept
/// for decoding); a layer band past the model is refused.
#[test]
fn a_correction_scope_limits_it_to_the_ranking_or_the_answer() {
    let s = setup(tiny("qwen2"));
    let b = &s.blender;
    let (prefix, chunks, suffix) = (
        toks(1, 9, 512),
        vec![toks(2, 40, 512), toks(3, 25, 512)],
        toks(5, 7, 512),
    );
    let with = |ratio: f32, scope: CorrectionScope, layers: Option<(usize, usize)>| {
        Mode::Blend(BlendConfig {
            query_weight: 1.0,
            parallel: Some(ParallelCorrection {
                scope,
                layers,
                ..ParallelCorrection::new(0.25, 4.0)
            }),
            ..BlendConfig::cacheblend(ratio)
        })
    };
    let r = req(
        prefix.clone(),
        chunks.clone(),
        suffix.clone(),
        with(1.0, CorrectionScope::Selection, None),
    );
    let out = b.run(b"", &r).unwrap();
    assert_close(
        &out.logits,
        &full(b, &r),
        1e-4,
        "selection scope at ratio 1",
    );
    assert_eq!(out.cache.parallel_context(), None);

    let answer = b
        .run(
            b"",
            &with_mode(&r, with(1.0, CorrectionScope::Answer, None)),
        )
        .unwrap();
    let everywhere = b
        .run(
            b"",
            &with_mode(&r, with(1.0, CorrectionScope::Everywhere, None)),
        )
        .unwrap();
    assert_close(
        &answer.logits,
        &everywhere.logits,
        1e-5,
        "answer scope at ratio 1",
    );
    assert!(answer.cache.parallel_context().is_some());

    // a temperature keeps each row's order of keys, so a ranking by attention alone may
    // not move on a tiny random model: mixed with V deviation (half and half), the sharper
    // attention's larger spread moves it (the model has 3 layers: with 2, the rows
    // recomputed after the check layer would feed no later layer)
    let mixed = |parallel: Option<ParallelCorrection>| {
        Mode::Blend(BlendConfig {
            query_weight: 0.5,
            parallel,
            ..BlendConfig::cacheblend(0.3)
        })
    };
    let selection = ParallelCorrection {
        scope: CorrectionScope::Selection,
        ..ParallelCorrection::new(0.25, 4.0)
    };
    let exact = b.run(b"", &with_mode(&r, mixed(None))).unwrap();
    let ranked = b.run(b"", &with_mode(&r, mixed(Some(selection)))).unwrap();
    assert!(
        vec1(&ranked.logits)
            .iter()
            .zip(vec1(&exact.logits))
            .any(|(a, b)| (a - b).abs() > 1e-4),
        "a corrected ranking changed nothing"
    );
    let layers = b.model().config().num_layers;
    let e = b
        .run(
            b"",
            &with_mode(
                &r,
                with(0.3, CorrectionScope::Everywhere, Some((0, layers + 1))),
            ),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("parallel correction in layers"), "{e}");
}

#[test]
fn reuse_of_one_chunk_at_position_zero_equals_full() {
    let s = setup(tiny("qwen2"));
    let b = &s.blender;
    let r = req(vec![], vec![toks(7, 50, 512)], toks(8, 6, 512), Mode::Reuse);
    let out = b.run(b"", &r).unwrap();
    assert_close(&out.logits, &full(b, &r), 1e-5, "reuse");
    assert_eq!(out.stats.recompute_fraction, 0.0);
}

#[test]
fn reuse_matches_keys_placed_by_the_models_own_positions() {
    // A chunk's pre-RoPE keys moved to position p must act like the chunk prefilled alone
    // starting at p: both give the same context for the suffix.
    let s = setup(tiny("llama"));
    let b = &s.blender;
    let (prefix, chunk, suffix) = (toks(11, 37, 512), toks(12, 29, 512), toks(13, 5, 512));
    let out = b
        .run(
            b"",
            &req(
                prefix.clone(),
                vec![chunk.clone()],
                suffix.clone(),
                Mode::Reuse,
            ),
        )
        .unwrap();
    let m = b.model();
    let mut cache = m.empty_cache().unwrap();
    m.prefill(&prefix, &positions(0, prefix.len()), &mut cache)
        .unwrap();
    let mut own = m.empty_cache().unwrap();
    m.prefill(&chunk, &positions(prefix.len(), chunk.len()), &mut own)
        .unwrap();
    let mut cache = KvCache::cat(&[&cache, &own]).unwrap();
    let want = m
        .prefill(
            &suffix,
            &positions(prefix.len() + chunk.len(), suffix.len()),
            &mut cache,
        )
        .unwrap();
    assert_close(&out.logits, &want, 1e-4, "re-positioned keys");
}

#[test]
fn reorder_duplicates_partial_all_hit_all_miss() {
    let s = setup(tiny("qwen2"));
    let b = &s.blender;
    let (p, a, c, d, q) = (
        toks(20, 8, 512),
        toks(21, 30, 512),
        toks(22, 19, 512),
        toks(23, 41, 512),
        toks(24, 6, 512),
    );
    // all miss: everything computed and stored back
    let r1 = req(
        p.clone(),
        vec![a.clone(), c.clone()],
        q.clone(),
        Mode::Reuse,
    );
    let out = b.run(b"", &r1).unwrap();
    assert_eq!(out.stats.misses, 3);
    assert_eq!(out.stats.stored_back, 3);
    assert_close(
        &out.logits,
        &reuse_by_hand(b, &[&p, &a, &c], &q),
        1e-5,
        "all miss",
    );
    // all hit: the second identical request loads everything
    let again = b.run(b"", &r1).unwrap();
    assert_eq!(again.stats.misses, 0);
    assert_eq!(again.stats.hits_host, 3);
    assert_eq!(vec1(&again.logits), vec1(&out.logits));
    // reordered chunks: still all hits, and right for the new order
    let r2 = req(
        p.clone(),
        vec![c.clone(), a.clone()],
        q.clone(),
        Mode::Reuse,
    );
    let out = b.run(b"", &r2).unwrap();
    assert_eq!(out.stats.hits_host, 3);
    assert_close(
        &out.logits,
        &reuse_by_hand(b, &[&p, &c, &a], &q),
        1e-5,
        "reordered",
    );
    // a duplicate chunk: loaded once, placed twice; one new chunk: a partial hit
    let r3 = req(
        p.clone(),
        vec![a.clone(), d.clone(), a.clone()],
        q.clone(),
        Mode::Reuse,
    );
    let out = b.run(b"", &r3).unwrap();
    assert_eq!(
        out.stats.segments,
        vec![
            SegmentSource::Hit(TierKind::HOST),
            SegmentSource::Hit(TierKind::HOST),
            SegmentSource::Miss,
            SegmentSource::Hit(TierKind::HOST)
        ]
    );
    assert_close(
        &out.logits,
        &reuse_by_hand(b, &[&p, &a, &d, &a], &q),
        1e-5,
        "duplicates",
    );
    // the same shapes through blend, against full prefill at ratio 1
    for chunks in [
        vec![c.clone(), a.clone()],
        vec![a.clone(), d.clone(), a.clone()],
        vec![d.clone()],
    ] {
        let r = req(
            p.clone(),
            chunks,
            q.clone(),
            Mode::Blend(BlendConfig::cacheblend(1.0)),
        );
        let out = b.run(b"", &r).unwrap();
        assert_eq!(out.stats.misses, 0);
        assert_close(&out.logits, &full(b, &r), 1e-4, "blend shapes");
    }
    // no prefix, two chunks: blend at the default ratio runs and recomputes that share of
    // the second (once both are stored: a miss is computed whole in the pass); the first,
    // at position 0, is exact and never recomputed
    let r = req(
        vec![],
        vec![toks(29, 20, 512), toks(30, 200, 512)],
        q.clone(),
        Mode::Blend(BlendConfig::default()),
    );
    assert_eq!(b.run(b"", &r).unwrap().stats.recomputed_tokens, 220);
    let out = b.run(b"", &r).unwrap();
    assert_eq!(out.stats.recomputed_tokens, 60);
    // one chunk alone at position 0 is all exact: nothing to recompute
    let alone = req(
        vec![],
        vec![toks(30, 200, 512)],
        q.clone(),
        Mode::Blend(BlendConfig::default()),
    );
    assert_eq!(b.run(b"", &alone).unwrap().stats.recomputed_tokens, 0);
}

#[test]
fn store_back_makes_a_second_blend_all_hits() {
    let s = setup(tiny("qwen2"));
    let b = &s.blender;
    let cfg = BlendConfig {
        chunk_start: 2,
        per_chunk: true,
        ..BlendConfig::cacheblend(0.3)
    };
    let r = req(
        toks(40, 10, 512),
        vec![toks(41, 60, 512), toks(42, 45, 512)],
        toks(43, 8, 512),
        Mode::Blend(cfg),
    );
    let first = b.run(b"", &r).unwrap();
    assert_eq!((first.stats.misses, first.stats.stored_back), (3, 3));
    // every segment a miss: the pass computed them all, which is full prefill
    assert_eq!(first.stats.recomputed_tokens, 115);
    assert_close(
        &first.logits,
        &full(b, &r),
        1e-4,
        "all computed in the pass",
    );
    // the output names what was stored: every segment's key, length and KV bytes
    let (codec, layout) = (b.codec(b""), b.identity().layout);
    let want: Vec<StoredObject> = r
        .segments()
        .iter()
        .map(|s| StoredObject {
            key: codec.key(s),
            tokens: s.len(),
            bytes: layout.object_bytes(s.len()),
            parent: None,
        })
        .collect();
    assert_eq!(first.stored, want);
    let second = b.run(b"", &r).unwrap();
    assert_eq!((second.stats.misses, second.stats.hits_host), (0, 3));
    assert!(second.stored.is_empty());
    // (the prefix, at position 0, is exact: the budget is a share of the chunks alone)
    assert_eq!(
        second.stats.recomputed_tokens,
        (0.3f32 * 105.0).floor() as usize
    );
    // what was stored is the chunk contract's KV: a blend over it equals one over chunks
    // precomputed by the batch path
    let fresh = setup(tiny("qwen2"));
    for seg in r.segments() {
        fresh.blender.precompute(b"", seg).unwrap();
    }
    let batch = fresh.blender.run(b"", &r).unwrap();
    assert_eq!(batch.stats.hits_host, 3);
    assert_eq!(vec1(&second.logits), vec1(&batch.logits));
    // another namespace shares nothing
    let other = b.run(b"tenant-b", &r).unwrap();
    assert_eq!(other.stats.misses, 3);
    // a request that may not store computes the same and stores nothing
    let r = BlendRequest {
        store_back: false,
        ..r
    };
    let barred = b.run(b"tenant-c", &r).unwrap();
    assert_eq!((barred.stats.misses, barred.stats.stored_back), (3, 0));
    assert!(barred.stored.is_empty());
    assert_eq!(vec1(&barred.logits), vec1(&first.logits));
    assert_eq!(b.run(b"tenant-c", &r).unwrap().stats.misses, 3);
}

/// A blend computes its misses inside its own pass: their rows run every layer in context
/// (outside the ratio's budget, which counts the cached tokens), nothing is prefilled alone
/// before the first token, and the misses are prefilled alone afterwards to be stored.
#[test]
fn a_blend_computes_its_misses_in_its_own_pass() {
    let s = setup(tiny("llama"));
    let b = &s.blender;
    let (d, a, c, q) = (
        toks(100, 24, 512),
        toks(101, 40, 512),
        toks(102, 36, 512),
        toks(103, 5, 512),
    );
    for seg in [&a, &c] {
        b.precompute(b"", seg).unwrap();
    }
    // d (a miss) first, then two hits; nothing recomputed among the hits
    let r = req(
        vec![],
        vec![d.clone(), a.clone(), c.clone()],
        q.clone(),
        Mode::Blend(BlendConfig::cacheblend(0.0)),
    );
    let out = b.run(b"", &r).unwrap();
    assert_eq!((out.stats.misses, out.stats.hits_host), (1, 2));
    assert_eq!(
        out.stats.recomputed_tokens, 24,
        "d alone: its rows, every layer"
    );
    assert_eq!(out.stored.len(), 1);
    // at position 0, d's rows see only themselves: every layer equals full prefill's rows
    let mut whole = b.model().empty_cache().unwrap();
    let tokens = r.tokens();
    b.model()
        .prefill(&tokens, &positions(0, tokens.len()), &mut whole)
        .unwrap();
    for (l, (got, want)) in out.cache.layers.iter().zip(&whole.layers).enumerate() {
        for (g, w) in [(&got.k, &want.k), (&got.v, &want.v)] {
            let (g, w) = (g.narrow(0, 0, 24).unwrap(), w.narrow(0, 0, 24).unwrap());
            assert_close(
                &g.flatten_all().unwrap(),
                &w.flatten_all().unwrap(),
                1e-4,
                &format!("layer {l}"),
            );
        }
    }
    // the budget is a ratio of the cached tokens: 0.5 · 76 of them on top of d's 24
    let half = with_mode(&r, Mode::Blend(BlendConfig::cacheblend(0.5)));
    let fresh = setup(tiny("llama"));
    for seg in [&a, &c] {
        fresh.blender.precompute(b"", seg).unwrap();
    }
    let out = fresh.blender.run(b"", &half).unwrap();
    assert_eq!(out.stats.recomputed_tokens, 24 + 38);
    // at ratio 1 a miss between hits changes nothing: still full prefill
    let mid = req(
        vec![],
        vec![a.clone(), toks(104, 30, 512), c.clone()],
        q.clone(),
        Mode::Blend(BlendConfig::cacheblend(1.0)),
    );
    let out = b.run(b"", &mid).unwrap();
    assert_eq!(out.stats.misses, 1);
    assert_close(&out.logits, &full(b, &mid), 1e-4, "a miss between hits");
    // stored afterwards, as the chunk contract makes it: the next request hits it
    let again = b.run(b"", &r).unwrap();
    assert_eq!((again.stats.misses, again.stats.hits_host), (0, 3));
    // answered first: nothing is prefilled alone or stored until its store-back runs
    let f = toks(106, 28, 512);
    let later = req(
        vec![],
        vec![a.clone(), f.clone()],
        q.clone(),
        Mode::Blend(BlendConfig::cacheblend(0.3)),
    );
    let (out, work) = b.run_deferring(b"", &later).unwrap();
    assert!(out.stored.is_empty() && !work.is_empty());
    assert_eq!((out.stats.misses, out.stats.stored_back), (1, 0));
    let key = b.codec(b"").key(&f);
    assert!(b.store().locate(&key).is_none());
    let stored = b.store_back(work);
    assert_eq!(stored.iter().map(|o| o.key).collect::<Vec<_>>(), vec![key]);
    assert!(b.store().locate(&key).is_some());
    // a request that may not store, with no device tier, leaves nothing behind
    let e = toks(105, 20, 512);
    let barred = BlendRequest {
        store_back: false,
        ..req(
            vec![],
            vec![e.clone(), a.clone()],
            q.clone(),
            Mode::Blend(BlendConfig::cacheblend(0.3)),
        )
    };
    let out = b.run(b"", &barred).unwrap();
    assert_eq!((out.stats.misses, out.stored.len()), (1, 0));
    assert!(b.store().locate(&b.codec(b"").key(&e)).is_none());
}

#[test]
fn prefix_mode_equals_full_and_reuses_its_chain() {
    let s = setup(tiny("llama"));
    let b = &s.blender;
    let (p, a, c, q) = (
        toks(50, 9, 512),
        toks(51, 31, 512),
        toks(52, 17, 512),
        toks(53, 4, 512),
    );
    let r = req(
        p.clone(),
        vec![a.clone(), c.clone()],
        q.clone(),
        Mode::Prefix,
    );
    let first = b.run(b"", &r).unwrap();
    assert_eq!((first.stats.misses, first.stats.stored_back), (3, 3));
    let chain = b.codec(b"").prefix_keys(&r.segments());
    let stored: Vec<_> = first.stored.iter().map(|o| o.key).collect();
    assert_eq!(stored, chain, "one prefix object per link");
    assert_close(&first.logits, &full(b, &r), 1e-5, "prefix, cold");
    let second = b.run(b"", &r).unwrap();
    assert_eq!(second.stats.hits_host, 3);
    assert_close(&second.logits, &full(b, &r), 1e-5, "prefix, warm");
    // a different second chunk reuses only the first two links of the chain
    let r2 = req(p, vec![a, toks(54, 12, 512)], q, Mode::Prefix);
    let out = b.run(b"", &r2).unwrap();
    assert_eq!((out.stats.hits_host, out.stats.misses), (2, 1));
    assert_close(&out.logits, &full(b, &r2), 1e-5, "prefix, partial");
}

#[test]
fn a_stored_object_that_does_not_match_is_recomputed() {
    let s = setup(tiny("qwen2"));
    let b = &s.blender;
    let codec = b.codec(b"");
    let (a, other, q) = (toks(60, 20, 512), toks(61, 20, 512), toks(62, 5, 512));
    // an object under a's key that holds another chunk's tokens and KV
    let (cache, _) = codec.prefill(b.model(), &other).unwrap();
    let forged: KvObject = codec
        .to_object(codec.key(&a), &other, &cache, None)
        .unwrap();
    s._rt.block_on(b.store().put(forged, 0.0)).unwrap();
    let r = req(vec![], vec![a.clone()], q.clone(), Mode::Reuse);
    let out = b.run(b"", &r).unwrap();
    assert_eq!(out.stats.segments, vec![SegmentSource::Unusable]);
    assert_close(&out.logits, &full(b, &r), 1e-5, "recomputed");
}

#[test]
fn never_slower_than_full_prefill() {
    let s = setup_with(tiny("qwen2"), true);
    let b = &s.blender;
    let r = req(
        vec![],
        vec![toks(70, 40, 512), toks(71, 40, 512)],
        toks(72, 4, 512),
        Mode::Reuse,
    );
    // cold: computing every chunk costs as much as one full prefill (by the prefill rate
    // measured on another chunk), so full runs, and the chunks are stored for next time
    b.precompute(b"", &toks(73, 40, 512)).unwrap();
    let cold = b.run(b"", &r).unwrap();
    assert!(cold.stats.fell_back_to_full);
    assert_eq!(cold.stats.fallback, Some(Fallback::NothingLoaded));
    assert_eq!((cold.stats.misses, cold.stats.stored_back), (2, 2));
    assert_eq!(cold.stored.len(), 2);
    assert_close(&cold.logits, &full(b, &r), 1e-6, "cold");
    steady_costs(b);
    let warm = b.run(b"", &r).unwrap();
    assert_eq!((warm.stats.mode, warm.stats.hits_host), ("reuse", 2));
    assert_eq!(warm.stats.fallback, None);
    // pretend recompute is nearly free: loading cannot win
    for _ in 0..100 {
        b.costs().record_prefill(1_000_000_000, 1e-9);
    }
    let out = b.run(b"", &r).unwrap();
    assert!(out.stats.fell_back_to_full, "{:?}", out.stats);
    // (every chunk recomputed rather than loaded)
    assert_eq!(out.stats.fallback, Some(Fallback::NothingLoaded));
    assert_eq!(out.stats.mode, "full");
    assert_eq!(
        out.stats.segments,
        vec![
            SegmentSource::RecomputedForSpeed,
            SegmentSource::RecomputedForSpeed
        ]
    );
    assert_close(&out.logits, &full(b, &r), 1e-6, "fallback");
    // a blend the plan estimates faster than full prefill still runs as full prefill when
    // blends measured here took far longer than their estimates (fixed costs the plan does
    // not model): the measurements correct the estimate
    let s = setup_with(tiny("qwen2"), true);
    let b = &s.blender;
    let rb = with_mode(&r, Mode::Blend(BlendConfig::cacheblend(0.2)));
    b.precompute(b"", &toks(73, 40, 512)).unwrap();
    for c in &rb.chunks {
        b.precompute(b"", c).unwrap();
    }
    let ran = b.run(b"", &rb).unwrap();
    assert_eq!((ran.stats.mode, ran.stats.hits_host), ("blend", 2));
    steady_costs(b);
    for x in [1e-4, 1e-3, 1e-2] {
        b.costs().record_mode(PlannedMode::Blend, x, 100.0 * x);
    }
    let out = b.run(b"", &rb).unwrap();
    assert!(out.stats.fell_back_to_full, "{:?}", out.stats);
    assert_eq!(out.stats.fallback, Some(Fallback::Measured));
}

/// The first loads from a tier are planned with a guessed load time (its default
/// bandwidth): measuring such a request as a sample of its mode would skew the correction
/// that decides when a mode falls back to full prefill (a remote behind a slow link was sent
/// to full prefill although loading it was 1.3× faster: BENCHMARKS.md §8). Once the tier is
/// measured, requests are samples again.
#[test]
fn a_guessed_load_time_is_no_sample_of_the_mode() {
    let s = setup_with(tiny("qwen2"), true);
    let b = &s.blender;
    let r = req(
        vec![],
        vec![toks(80, 40, 512)],
        toks(81, 4, 512),
        Mode::Reuse,
    );
    b.precompute(b"", &toks(82, 40, 512)).unwrap(); // a prefill measured
    b.precompute(b"", &r.chunks[0]).unwrap();
    let probe = 0.5;
    for run in 0..2 {
        assert!(!b.costs().load_is_measured(TierKind::HOST), "run {run}");
        let out = b.run(b"", &r).unwrap();
        assert_eq!(
            (out.stats.mode, out.stats.hits_host),
            ("reuse", 1),
            "run {run}"
        );
        assert_eq!(
            b.costs().mode_s(PlannedMode::Reuse, probe),
            probe,
            "run {run}: no sample from a guessed load time"
        );
    }
    assert!(b.costs().load_is_measured(TierKind::HOST));
    steady_costs(b);
    let out = b.run(b"", &r).unwrap();
    assert_eq!(out.stats.hits_host, 1);
    assert_ne!(
        b.costs().mode_s(PlannedMode::Reuse, probe),
        probe,
        "measured: a sample"
    );
}

#[test]
fn bad_requests_are_rejected() {
    let s = setup(tiny("llama"));
    let b = &s.blender;
    let bad = [
        req(vec![], vec![toks(1, 5, 512)], vec![], Mode::Reuse),
        req(vec![], vec![vec![]], vec![1], Mode::Reuse),
        req(vec![], vec![vec![600]], vec![1], Mode::Reuse),
        req(vec![], vec![toks(1, 5000, 512)], vec![1], Mode::Full),
        req(
            vec![],
            vec![toks(1, 5, 512)],
            vec![1],
            Mode::Blend(BlendConfig::cacheblend(1.5)),
        ),
        req(
            vec![],
            vec![toks(1, 5, 512)],
            vec![1],
            Mode::Blend(BlendConfig {
                check_layers: vec![2],
                ..BlendConfig::default()
            }),
        ),
    ];
    for r in bad {
        let e = b.run(b"", &r).unwrap_err();
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn identity_changes_with_dtype_and_weights_and_keys_with_namespace() {
    let a = ModelIdentity::of(&tiny("qwen2")).unwrap();
    assert_eq!(
        a,
        ModelIdentity::of(&tiny("qwen2")).unwrap(),
        "deterministic"
    );
    let dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../model/tests/fixtures/tiny-qwen2");
    let f16 = load(&dir, &Device::Cpu, DType::F16).unwrap();
    let b = ModelIdentity::of(&f16).unwrap();
    assert_ne!(a.model, b.model, "compute dtype is part of the identity");
    assert_ne!(a.layout, b.layout);
    let c = ModelIdentity::of(&tiny("llama")).unwrap();
    assert_ne!(a.model, c.model);
    let toks = toks(1, 10, 512);
    let (k1, k2) = (
        ChunkCodec::new(a.clone(), b"").key(&toks),
        ChunkCodec::new(a, b"tenant").key(&toks),
    );
    assert_ne!(k1, k2);
}

#[test]
fn sink_encoding_keeps_the_chunk_rows_of_a_prefill_behind_the_sink() {
    let loaded = tiny("llama");
    let alone = ModelIdentity::of(&loaded).unwrap();
    assert_eq!(
        alone.encoding(),
        &ChunkEncoding::Alone,
        "no tokenizer, no BOS"
    );
    let s = setup_custom(loaded, false, Some(ChunkEncoding::Sink(vec![1])), 0);
    let b = &s.blender;
    let codec = b.codec(b"");
    let m = b.model();
    let chunk = toks(70, 23, 512);
    assert_ne!(chunk[0], 1);
    // the stored KV is rows 1.. of prefilling [1] ‖ chunk
    let (got, _) = codec.prefill(m, &chunk).unwrap();
    let mut want = m.empty_cache().unwrap();
    m.prefill(&[&[1][..], &chunk].concat(), &positions(0, 24), &mut want)
        .unwrap();
    assert_eq!(got.positions, positions(0, 23));
    for (g, w) in got.layers.iter().zip(&want.layers) {
        assert_eq!(
            g.k.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            w.k.narrow(0, 1, 23)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }
    // the encoding is part of every key
    assert_ne!(codec.key(&chunk), ChunkCodec::new(alone, b"").key(&chunk));
    // a chunk that opens with the sink is prefilled alone, so a prompt's first segment that
    // opens with it is exact: reuse of that one chunk equals full prefill
    let first = [&[1][..], &toks(71, 30, 512)].concat();
    let r = req(vec![], vec![first], toks(72, 5, 512), Mode::Reuse);
    let out = b.run(b"", &r).unwrap();
    assert_close(&out.logits, &full(b, &r), 1e-5, "opening chunk");
    // blend at ratio 1 still equals full prefill under this encoding, and a prefix that does
    // not open with the sink is recomputed rather than taken as exact
    let r = req(
        toks(73, 9, 512),
        vec![chunk.clone(), toks(74, 17, 512)],
        toks(75, 6, 512),
        Mode::Blend(BlendConfig::cacheblend(1.0)),
    );
    let out = b.run(b"", &r).unwrap();
    assert_close(&out.logits, &full(b, &r), 1e-4, "blend r=1, sink");
    let r = with_mode(&r, Mode::Blend(BlendConfig::cacheblend(0.0)));
    assert_eq!(b.run(b"", &r).unwrap().stats.recomputed_tokens, 0);
    // bad sinks are refused
    let m = tiny("llama");
    let id = ModelIdentity::of(&m).unwrap();
    assert!(
        id.clone()
            .with_encoding(&m.model, ChunkEncoding::Sink(vec![]))
            .is_err()
    );
    assert!(
        id.with_encoding(&m.model, ChunkEncoding::Sink(vec![100_000]))
            .is_err()
    );
}

#[test]
fn the_device_tier_serves_repeat_chunks_and_forgets_deleted_ones() {
    let s = setup_custom(tiny("qwen2"), false, None, 1 << 20);
    let b = &s.blender;
    let (p, a, c, q) = (
        toks(80, 8, 512),
        toks(81, 30, 512),
        toks(82, 19, 512),
        toks(83, 6, 512),
    );
    let r = req(
        p.clone(),
        vec![a.clone(), c.clone()],
        q.clone(),
        Mode::Reuse,
    );
    // first: all miss, computed chunks become resident
    let first = b.run(b"", &r).unwrap();
    assert_eq!(first.stats.misses, 3);
    let tier = b.device_tier().expect("device tier on");
    assert_eq!(tier.stats().objects, 3);
    // second: every chunk from the device tier, same logits
    let second = b.run(b"", &r).unwrap();
    assert_eq!((second.stats.hits_gpu, second.stats.hits_host), (3, 0));
    assert_eq!(vec1(&second.logits), vec1(&first.logits));
    // blend reads them the same way, and is exact at ratio 1
    let rb = with_mode(&r, Mode::Blend(BlendConfig::cacheblend(1.0)));
    let out = b.run(b"", &rb).unwrap();
    assert_eq!(out.stats.hits_gpu, 3);
    assert_close(
        &out.logits,
        &full(b, &rb),
        1e-4,
        "blend from the device tier",
    );
    // chunks read from the host tier become resident too
    let d = toks(84, 12, 512);
    b.precompute(b"", &d).unwrap();
    let r2 = req(p.clone(), vec![d.clone()], q.clone(), Mode::Reuse);
    let once = b.run(b"", &r2).unwrap().stats;
    assert_eq!(
        (once.hits_gpu, once.hits_host),
        (1, 1),
        "the prefix resident, d not"
    );
    let twice = b.run(b"", &r2).unwrap().stats;
    assert_eq!((twice.hits_gpu, twice.hits_host), (2, 0));
    // deleting a chunk drops it from the device tier and the store
    let key = b.codec(b"").key(&a);
    assert!(s._rt.block_on(b.remove(&key)).unwrap());
    assert!(!tier.contains(&key));
    let third = b.run(b"", &r).unwrap();
    assert_eq!(third.stats.misses, 1);
    assert_eq!(vec1(&third.logits), vec1(&first.logits));
    // a tier too small for a chunk holds nothing and changes no answer
    let small = setup_custom(tiny("qwen2"), false, None, 64);
    let out = small.blender.run(b"", &r).unwrap();
    let out2 = small.blender.run(b"", &r).unwrap();
    assert_eq!(out2.stats.hits_gpu, 0);
    assert_eq!(vec1(&out2.logits), vec1(&out.logits));
}

/// Chunks resident in the device tier are the cheapest KV there is: a request that finds all
/// of them there runs its own mode, not full prefill (the plan once counted only store loads
/// as "something to load", so with fallback on every all-device request ran as full).
#[test]
fn a_request_served_from_the_device_tier_runs_its_mode() {
    let s = setup_custom(tiny("qwen2"), true, None, 1 << 20);
    let b = &s.blender;
    let r = req(
        toks(90, 8, 512),
        vec![toks(91, 40, 512), toks(92, 40, 512)],
        toks(93, 4, 512),
        Mode::Reuse,
    );
    // a prefill rate is measured (the fallback rule applies from then on)
    b.precompute(b"", &toks(94, 40, 512)).unwrap();
    let cold = b.run(b"", &r).unwrap();
    assert!(cold.stats.fell_back_to_full, "{:?}", cold.stats);
    assert_eq!(cold.stored.len(), 3);
    steady_costs(b);
    // its store-back prefilled the misses alone, stored them and made them resident
    let hot = b.run(b"", &r).unwrap();
    assert!(!hot.stats.fell_back_to_full, "{:?}", hot.stats);
    assert_eq!((hot.stats.mode, hot.stats.hits_gpu), ("reuse", 3));
    assert_close(
        &hot.logits,
        &reuse_by_hand(b, &r.segments(), &r.suffix),
        1e-5,
        "hot",
    );
}

/// A held chunk a request uses without reading it (the request ran as full prefill because
/// that was faster) still counts as used: the host tier's LRU keeps it over a chunk no
/// request used since (found by `kvquilt bench trace --real`, where most requests fell back).
#[test]
fn chunks_used_by_a_fallback_keep_their_standing_in_eviction() {
    let loaded = tiny("qwen2");
    let rt = Runtime::new().unwrap();
    let identity = ModelIdentity::of(&loaded).unwrap();
    let one = ChunkCodec::new(identity.clone(), b"")
        .layout()
        .object_bytes(40);
    let store = TieredStore::open(StoreConfig::host_only(3 * one)).unwrap();
    let b = Blender::new(
        Arc::new(loaded.model),
        identity,
        Arc::new(store),
        rt.handle().clone(),
    );
    let (a, bb, c, d) = (
        toks(80, 40, 512),
        toks(81, 40, 512),
        toks(82, 40, 512),
        toks(83, 40, 512),
    );
    for t in [&a, &bb, &c] {
        b.precompute(b"", t).unwrap();
    }
    // two loads of C measure the host tier (until then every plan loads, to measure it);
    // C is now the most recently used
    let only_c = req(vec![], vec![c.clone()], toks(85, 4, 512), Mode::Reuse);
    for _ in 0..2 {
        assert_eq!(b.run(b"", &only_c).unwrap().stats.hits_host, 1);
    }
    // recompute nearly free: the request runs as full prefill and reads nothing
    for _ in 0..100 {
        b.costs().record_prefill(1_000_000_000, 1e-9);
    }
    let r = req(
        vec![],
        vec![a.clone(), bb.clone()],
        toks(84, 4, 512),
        Mode::Reuse,
    );
    let out = b.run(b"", &r).unwrap();
    assert!(out.stats.fell_back_to_full, "{:?}", out.stats);
    assert_eq!(out.stats.hits_host, 0);
    // room for D: the least recently used is C now (a and b were used by the request)
    b.precompute(b"", &d).unwrap();
    let codec = b.codec(b"");
    let held = |t: &[u32]| b.store().locate(&codec.key(t)).is_some();
    assert!(
        held(&a) && held(&bb) && held(&d),
        "used chunks were evicted"
    );
    assert!(!held(&c), "the unused chunk stays");
}

/// Chunks are prefilled behind the special token prompts open with: the chat template's
/// first token (ChatML when the model ships none), not a BOS its prompts never contain.
#[test]
fn chunks_are_encoded_behind_the_token_prompts_open_with() {
    let chat = tiny("chat");
    let im_start = chat
        .tokenizer
        .as_ref()
        .and_then(|t| t.token_id("<|im_start|>"))
        .unwrap();
    assert_eq!(kvquilt_blend::prompt_opening(&chat), Some(im_start));
    assert_eq!(
        ModelIdentity::of(&chat).unwrap().encoding(),
        &ChunkEncoding::Sink(vec![im_start])
    );
    // no tokenizer: nothing to open with, chunks are prefilled alone
    let bare = tiny("llama");
    assert_eq!(kvquilt_blend::prompt_opening(&bare), None);
    assert_eq!(
        ModelIdentity::of(&bare).unwrap().encoding(),
        &ChunkEncoding::Alone
    );
}

/// A prompt of nothing but its question (no prefix, no chunks) is served by every mode as
/// its full prefill ("concatenating zero layers" failed `reuse` and `blend` on it).
#[test]
fn a_prompt_without_chunks_is_served_by_every_mode() {
    let s = setup(tiny("qwen2"));
    let b = &s.blender;
    let question = toks(9, 7, 200);
    let want = full(b, &req(vec![], vec![], question.clone(), Mode::Full));
    for mode in [
        Mode::Reuse,
        Mode::Prefix,
        Mode::Blend(BlendConfig::default()),
    ] {
        let out = b
            .run(b"", &req(vec![], vec![], question.clone(), mode.clone()))
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        assert_close(&out.logits, &want, 1e-4, &format!("{mode:?}"));
    }
}

/// The suffix's own tokens scored (`BlendRequest::prompt_logprobs`, OpenAI's `echo`): where a
/// mode is exact (full, prefix — a miss, then a hit —, blend at ratio 1) each token's
/// log-probability is what a prefill of the prompt up to it gives (one prefill per token,
/// computed here); every mode lists suffix tokens 1.. with sorted alternatives; and scoring
/// changes no mode's first-token logits.
#[test]
fn the_suffix_s_own_tokens_are_scored_as_prefill_scores_them() {
    let s = setup(tiny("llama"));
    let b = &s.blender;
    let m = b.model();
    let suffix = toks(23, 9, 512);
    let base = req(
        vec![],
        vec![toks(21, 30, 512), toks(22, 17, 512)],
        suffix.clone(),
        Mode::Full,
    );
    let all = base.tokens();
    let before = all.len() - suffix.len();
    let want: Vec<f32> = (1..suffix.len())
        .map(|i| {
            let upto = &all[..before + i];
            let mut c = m.empty_cache().unwrap();
            let row = vec1(&m.prefill(upto, &positions(0, upto.len()), &mut c).unwrap());
            row[suffix[i] as usize] - kvquilt_model::log_sum_exp(&row)
        })
        .collect();
    let exact = |mode: &Mode| !matches!(mode, Mode::Reuse);
    for mode in [
        Mode::Full,
        Mode::Prefix,
        Mode::Prefix,
        Mode::Reuse,
        Mode::Blend(BlendConfig::cacheblend(1.0)),
    ] {
        let plain = b.run(b"", &with_mode(&base, mode.clone())).unwrap();
        assert!(plain.prompt_logprobs.is_empty());
        let scored = BlendRequest {
            prompt_logprobs: Some(3),
            ..with_mode(&base, mode.clone())
        };
        let out = b.run(b"", &scored).unwrap();
        assert_close(
            &out.logits,
            &plain.logits,
            1e-6,
            &format!("{mode:?}: first token"),
        );
        let got = &out.prompt_logprobs;
        assert_eq!(got.len(), suffix.len() - 1, "{mode:?}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.id, suffix[i + 1]);
            assert_eq!(g.top.len(), 3);
            assert!(g.top.windows(2).all(|p| p[0].1 >= p[1].1), "{mode:?}");
            assert!(g.top[0].1 >= g.logprob, "{mode:?} token {i}");
            if exact(&mode) {
                assert!(
                    (g.logprob - w).abs() < 1e-3,
                    "{mode:?} token {}: {} vs {w}",
                    i + 1,
                    g.logprob
                );
            }
        }
    }
}

/// `cached_tokens` (OpenAI's `usage.prompt_tokens_details`) counts only tokens whose stored
/// KV is exactly what full prefill computes: every link `prefix` mode reads, the prefix
/// segment `reuse` and `blend` read (computed alone at position 0), never chunks placed at
/// new positions, and nothing a request computed.
#[test]
fn cached_tokens_count_exact_reuse_only() {
    let s = setup(tiny("llama"));
    let b = &s.blender;
    let (prefix, chunks) = (toks(31, 12, 512), vec![toks(32, 20, 512), toks(33, 9, 512)]);
    let r = req(prefix.clone(), chunks, toks(34, 5, 512), Mode::Prefix);
    let first = b.run(b"", &r).unwrap();
    assert_eq!(first.stats.cached_tokens, 0, "nothing stored yet");
    let again = b.run(b"", &r).unwrap();
    assert_eq!(
        again.stats.cached_tokens,
        12 + 20 + 9,
        "{:?}",
        again.stats.segments
    );
    assert_eq!(
        b.run(b"", &with_mode(&r, Mode::Full))
            .unwrap()
            .stats
            .cached_tokens,
        0
    );
    for (ns, mode) in [
        (b"x", Mode::Reuse),
        (b"y", Mode::Blend(BlendConfig::cacheblend(0.3))),
    ] {
        let cold = b.run(ns, &with_mode(&r, mode.clone())).unwrap();
        assert_eq!(
            cold.stats.cached_tokens, 0,
            "{mode:?}: another namespace, all missed"
        );
        let out = b.run(ns, &with_mode(&r, mode.clone())).unwrap();
        assert!(
            out.stats
                .segments
                .iter()
                .all(|s| matches!(s, SegmentSource::Hit(_)))
        );
        assert_eq!(
            out.stats.cached_tokens,
            prefix.len(),
            "{mode:?}: the prefix alone"
        );
    }
    // a prefix encoded behind a sink it does not open with is not prefill's KV
    let s = setup_custom(tiny("llama"), false, Some(ChunkEncoding::Sink(vec![7])), 0);
    let reuse = with_mode(&r, Mode::Reuse);
    s.blender.run(b"", &reuse).unwrap();
    let out = s.blender.run(b"", &reuse).unwrap();
    assert!(matches!(out.stats.segments[0], SegmentSource::Hit(_)));
    assert_eq!(out.stats.cached_tokens, 0);
}
