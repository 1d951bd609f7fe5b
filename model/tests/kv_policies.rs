//! Pruned caches (kept entries per layer and KV head, as token policies leave them) and the
//! layer hook, on tiny random models.

mod common;

use common::{max_diff, positions};
use kvquilt_model::{
    HookError, KvCache, LayerHook, LayerKv, LayerProbe, LoadedModel, ModelError, ProbeRequest,
    Rows, Tensor,
};

fn models() -> Vec<LoadedModel> {
    vec![common::tiny("llama"), common::tiny("qwen2")]
}

fn close(a: &Tensor, b: &Tensor, what: &str) {
    let (d, m) = max_diff(a, b);
    assert!(d <= 1e-4 * m.max(1e-3), "{what}: max diff {d} (scale {m})");
}

fn prompt(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % 500).collect()
}

/// A dense (unpruned) cache of `cache`'s rows `rows` in every layer and head, at `at`.
fn dense_rows(cache: &KvCache, rows: &[u32], at: Vec<u32>) -> KvCache {
    let device = cache.layers[0].k.device();
    let idx = Tensor::new(rows, device).unwrap();
    let layers = cache
        .layers
        .iter()
        .map(|l| {
            LayerKv::new(
                l.k.index_select(&idx, 0).unwrap(),
                l.v.index_select(&idx, 0).unwrap(),
            )
        })
        .collect();
    KvCache::new(layers, at)
}

/// The same rows kept by every head of every layer must behave exactly like a dense cache of
/// those rows at their own positions (holes included): one decode step, a multi-token
/// append, and another step.
#[test]
fn a_pruned_cache_attends_like_the_reference_over_its_kept_keys() {
    for m in models() {
        let model = &m.model;
        let toks = prompt(40);
        let mut cache = model.empty_cache().unwrap();
        model.prefill(&toks, &positions(40), &mut cache).unwrap();
        let kept: Vec<u32> = vec![0, 1, 2, 3, 9, 17, 18, 30, 36, 37, 38, 39];
        let heads = cache.layers[0].k.dims()[1];
        let keep = vec![vec![kept.clone(); heads]; cache.layers.len()];
        let mut pruned = cache.retain(&keep).unwrap();
        assert!(pruned.is_pruned());
        assert_eq!(pruned.len(), kept.len());
        let mut dense = dense_rows(&cache, &kept, kept.clone());

        let a = model.decode_step(7, &mut pruned, &mut ()).unwrap();
        let b = model.prefill(&[7], &[40], &mut dense).unwrap();
        close(&a, &b, "decode step");
        let q = [5u32, 6, 8];
        let a = model.prefill(&q, &[41, 42, 43], &mut pruned).unwrap();
        let b = model.prefill(&q, &[41, 42, 43], &mut dense).unwrap();
        close(&a, &b, "appended question");
        let a = model.decode_step(9, &mut pruned, &mut ()).unwrap();
        let b = model.decode_step(9, &mut dense, &mut ()).unwrap();
        close(&a, &b, "second step");
        assert_eq!(pruned.positions.last(), Some(&44));
        assert_eq!(pruned.entries_per_head()[0], vec![kept.len() + 5; heads]);
    }
}

/// Renumbered in cache order (StreamingLLM's positions within the cache), a pruned cache
/// attends like a dense cache of its kept rows at 0, 1, 2, …: straight after the prune, and
/// with a row decoded after the prune before renumbering.
#[test]
fn compact_positions_attend_like_a_dense_cache_numbered_from_zero() {
    for m in models() {
        let model = &m.model;
        let toks = prompt(40);
        let mut cache = model.empty_cache().unwrap();
        model.prefill(&toks, &positions(40), &mut cache).unwrap();
        let kept: Vec<u32> = vec![0, 1, 2, 3, 30, 33, 36, 37, 38, 39];
        let heads = cache.layers[0].k.dims()[1];
        let keep = vec![vec![kept.clone(); heads]; cache.layers.len()];
        let n = kept.len();
        let mut dense = dense_rows(&cache, &kept, positions(n));
        let mut compact = cache
            .retain(&keep)
            .unwrap()
            .with_compact_positions()
            .unwrap();
        assert_eq!(compact.positions, positions(n));
        let a = model.decode_step(7, &mut compact, &mut ()).unwrap();
        let b = model.prefill(&[7], &[n as u32], &mut dense).unwrap();
        close(&a, &b, "renumbered after the prune");
        // the original positions attend differently (else the test could not fail)
        let mut original = cache.retain(&keep).unwrap();
        let c = model.decode_step(7, &mut original, &mut ()).unwrap();
        assert!(max_diff(&a, &c).0 > 1e-3, "positions make no difference");
        // renumbered after a row decoded at the original positions: as a dense cache of the
        // same rows (the decoded one computed alike) renumbered
        let mut at_original = dense_rows(&cache, &kept, kept.clone());
        model.prefill(&[7], &[40], &mut at_original).unwrap();
        let mut dense_again = at_original.with_positions(positions(n + 1)).unwrap();
        let mut again = original.with_compact_positions().unwrap();
        let a = model.decode_step(9, &mut again, &mut ()).unwrap();
        let b = model.decode_step(9, &mut dense_again, &mut ()).unwrap();
        close(&a, &b, "renumbered after a decoded row");
        assert_eq!(again.positions.last(), Some(&(n as u32 + 1)));
        // an unpruned cache is numbered from zero as it stands
        let plain = cache.clone().with_compact_positions().unwrap();
        assert_eq!(plain.positions, positions(40));
        assert!(!plain.is_pruned());
    }
}

/// Heads keeping different rows (padded and masked) decode without error, and pruning again
/// keeps composing positions; the unpruned full keep set changes nothing.
#[test]
fn ragged_and_repeated_pruning() {
    let mut padded_seen = false;
    for m in models() {
        let model = &m.model;
        let toks = prompt(30);
        let mut cache = model.empty_cache().unwrap();
        model.prefill(&toks, &positions(30), &mut cache).unwrap();
        let heads = cache.layers[0].k.dims()[1];
        let layers = cache.layers.len();

        let all: Vec<u32> = (0..30).collect();
        let mut same = cache.retain(&vec![vec![all; heads]; layers]).unwrap();
        let a = model.decode_step(3, &mut same, &mut ()).unwrap();
        let b = model.decode_step(3, &mut cache.clone(), &mut ()).unwrap();
        close(&a, &b, "keeping everything");

        let keep: Vec<Vec<Vec<u32>>> = (0..layers)
            .map(|l| {
                (0..heads)
                    .map(|h| {
                        (0..30u32)
                            .filter(|&t| (t as usize + h + l).is_multiple_of(h + 2))
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let mut ragged = cache.retain(&keep).unwrap();
        let counts = ragged.entries_per_head();
        for l in 0..layers {
            for h in 0..heads {
                assert_eq!(counts[l][h], keep[l][h].len());
            }
        }
        let logits = model.decode_step(3, &mut ragged, &mut ()).unwrap();
        assert!(
            logits
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .all(|x| x.is_finite())
        );
        let rows = ragged.len() as u32;
        // a padded head's stand-in rows hold no key: keeping one is refused (it became an
        // unmasked copy of the head's last entry at position 0)
        let every_row: Vec<u32> = (0..rows).collect();
        let refused = ragged
            .retain(&vec![vec![every_row; heads]; layers])
            .is_err();
        assert_eq!(refused, ragged.is_padded(), "{heads} heads");
        padded_seen |= ragged.is_padded();
        // keeping every real entry (each head's kept rows, then the decoded token) changes
        // nothing
        let real: Vec<Vec<Vec<u32>>> = (0..layers)
            .map(|l| {
                (0..heads)
                    .map(|h| (0..counts[l][h] as u32).chain([rows - 1]).collect())
                    .collect()
            })
            .collect();
        let mut kept = ragged.retain(&real).unwrap();
        let x = model.decode_step(5, &mut kept, &mut ()).unwrap();
        let y = model.decode_step(5, &mut ragged.clone(), &mut ()).unwrap();
        close(&x, &y, "keeping every real entry of a pruned cache");
        // prune the pruned cache again: row 0 of every head and the decoded token
        let again = ragged
            .retain(&vec![vec![vec![0, rows - 1]; heads]; layers])
            .unwrap();
        assert_eq!(again.len(), 2);
        assert_eq!(again.positions.last(), Some(&30));
    }
    assert!(padded_seen, "some model's heads kept different counts");
}

#[test]
fn bad_keep_sets_and_row_operations_on_pruned_caches_are_refused() {
    let m = common::tiny("llama");
    let model = &m.model;
    let mut cache = model.empty_cache().unwrap();
    model
        .prefill(&prompt(10), &positions(10), &mut cache)
        .unwrap();
    let heads = cache.layers[0].k.dims()[1];
    let layers = cache.layers.len();
    let with = |rows: Vec<u32>| vec![vec![rows; heads]; layers];
    for bad in [
        with(vec![]),
        with(vec![3, 2]),
        with(vec![1, 1]),
        with(vec![0, 10]),
        vec![vec![vec![0]; heads]; layers - 1],
        vec![vec![vec![0]; heads + 1]; layers],
    ] {
        let e = cache.retain(&bad).unwrap_err();
        assert!(matches!(e, ModelError::InvalidInput(_)), "{e}");
    }
    let pruned = cache.retain(&with(vec![0, 4, 9])).unwrap();
    assert!(pruned.narrow(0, 1).is_err());
    assert!(pruned.clone().with_positions(vec![0, 1, 2]).is_err());
    assert!(KvCache::cat(&[&pruned]).is_err());
    let hidden = model.embed(&[1]).unwrap();
    let e = model
        .run_layers(
            0..layers,
            hidden,
            Rows::Replace(&[1]),
            &mut pruned.clone(),
            None,
        )
        .unwrap_err();
    assert!(e.to_string().contains("pruned"), "{e}");
    // new tokens must come after every kept position
    assert!(model.prefill(&[1], &[9], &mut pruned.clone()).is_err());
}

/// A hook that counts calls, checks the probe reports, and fails on request.
struct Counting {
    probe: ProbeRequest,
    before: Vec<usize>,
    after: Vec<LayerProbe>,
    fail_at: Option<usize>,
}

impl LayerHook for Counting {
    fn probe(&self) -> Option<&ProbeRequest> {
        Some(&self.probe)
    }

    fn before_layer(&mut self, layer: usize, _kv: &mut LayerKv) -> Result<(), HookError> {
        self.before.push(layer);
        Ok(())
    }

    fn after_attention(&mut self, layer: usize, probe: LayerProbe) -> Result<(), HookError> {
        if self.fail_at == Some(layer) {
            return Err(HookError::msg("policy gave up"));
        }
        self.after.push(probe);
        Ok(())
    }
}

#[test]
fn the_hook_sees_every_layer_and_column_sums_add_up_the_rows() {
    let m = common::tiny("qwen2");
    let model = &m.model;
    let toks = prompt(24);
    let n = toks.len();
    let mut hook = Counting {
        probe: ProbeRequest::rows((0..n).collect()).with_column_sums(),
        before: Vec::new(),
        after: Vec::new(),
        fail_at: None,
    };
    let mut cache = model.empty_cache().unwrap();
    let logits = model
        .prefill_with(&toks, &positions(n), &mut cache, &mut hook)
        .unwrap();
    let layers = model.config().num_layers;
    assert_eq!(hook.before, (0..layers).collect::<Vec<_>>());
    assert_eq!(hook.after.len(), layers);
    for p in &hook.after {
        let rows = p.rows.as_ref().unwrap(); // [kv_heads, group, n, n]
        let sums = p.column_sums.as_ref().unwrap(); // [kv_heads, n]
        let want = rows.sum(1).unwrap().sum(1).unwrap();
        close(sums, &want, "column sums");
    }
    // the plain prefill gives the same logits
    let mut plain = model.empty_cache().unwrap();
    let want = model.prefill(&toks, &positions(n), &mut plain).unwrap();
    close(&logits, &want, "logits with a hook");

    // a failing hook aborts with its error and leaves the cache as it was
    let mut hook = Counting {
        probe: ProbeRequest::rows(vec![1]),
        before: Vec::new(),
        after: Vec::new(),
        fail_at: Some(1),
    };
    let before = cache.len();
    let kept = cache.clone();
    let e = model
        .prefill_with(&[3, 4], &[n as u32, n as u32 + 1], &mut cache, &mut hook)
        .unwrap_err();
    assert!(matches!(e, ModelError::Hook(_)), "{e}");
    assert_eq!(cache.len(), before);
    // no layer committed what the failed call computed (its layer 0 ran before the hook
    // failed), and the cache decodes as the one it was
    assert!(
        cache.layers.iter().all(|l| l.len() == before),
        "a layer grew"
    );
    let after_failure = model.decode_step(5, &mut cache, &mut ()).unwrap();
    let untouched = model.decode_step(5, &mut kept.clone(), &mut ()).unwrap();
    close(&after_failure, &untouched, "decoding after the failed call");
}

/// The same cache's layers as plain tensors (no growth buffers): attention then rotates
/// every key afresh in every call.
fn without_growth(cache: &KvCache) -> KvCache {
    // a clone keeps the positions and a pruned cache's per-head positions
    let mut fresh = cache.clone();
    for l in &mut fresh.layers {
        *l = LayerKv::new(l.k.copy().unwrap(), l.v.copy().unwrap());
    }
    fresh
}

/// Decode steps over a cache whose rotated keys are kept beside its buffers (only each step's
/// own key is rotated) give bit-identical logits to the same cache rotated afresh, over a
/// plain cache and a pruned one, across steps, a multi-token append and a clone that
/// diverges.
#[test]
fn kept_rotations_decode_exactly_as_fresh_ones() {
    for m in models() {
        let model = &m.model;
        let mut cache = model.empty_cache().unwrap();
        model
            .prefill(&prompt(50), &positions(50), &mut cache)
            .unwrap();
        let heads = cache.layers[0].k.dims()[1];
        let kept: Vec<u32> = (0..50).filter(|t| t % 3 != 1).collect();
        let pruned = cache
            .retain(&vec![vec![kept; heads]; cache.layers.len()])
            .unwrap();
        for mut c in [cache.clone(), pruned] {
            let mut branch = None;
            for (i, tok) in [7u32, 8, 9, 10].into_iter().enumerate() {
                let mut fresh = without_growth(&c);
                let a = model.decode_step(tok, &mut c, &mut ()).unwrap();
                let b = model.decode_step(tok, &mut fresh, &mut ()).unwrap();
                let (d, _) = max_diff(&a, &b);
                assert_eq!(d, 0.0, "step {i}, pruned {}", c.is_pruned());
                if i == 1 {
                    branch = Some(c.clone());
                }
            }
            let next = c.positions.last().unwrap() + 1;
            let q = [5u32, 6, 8];
            let pos = [next, next + 1, next + 2];
            let mut fresh = without_growth(&c);
            let a = model.prefill(&q, &pos, &mut c).unwrap();
            let b = model.prefill(&q, &pos, &mut fresh).unwrap();
            assert_eq!(max_diff(&a, &b).0, 0.0, "appended question");
            // an older clone decoding another token shares the kept rows it agrees with
            let mut old = branch.unwrap();
            let mut fresh = without_growth(&old);
            let a = model.decode_step(99, &mut old, &mut ()).unwrap();
            let b = model.decode_step(99, &mut fresh, &mut ()).unwrap();
            assert_eq!(max_diff(&a, &b).0, 0.0, "diverging clone");
        }
    }
}

/// A decode pool's keep set over a cache of `rows` rows: the first 20 rows, 6 of the rows
/// between them and the newest 2 (a different 6 per layer, head and step), the newest 2.
fn pool_keep(layers: usize, heads: usize, rows: u32, step: usize) -> Vec<Vec<Vec<u32>>> {
    (0..layers)
        .map(|l| {
            (0..heads)
                .map(|h| {
                    let mut middle: Vec<u32> = (20..rows - 2).collect();
                    middle.sort_by_key(|&t| ((t as usize) * 7 + h * 3 + l + step) % 11);
                    middle.truncate(6);
                    middle.sort_unstable();
                    (0..20).chain(middle).chain([rows - 2, rows - 1]).collect()
                })
                .collect()
        })
        .collect()
}

/// Eviction written into a decode pool's own buffers ([`KvCache::retain_in_place`]) decodes
/// bit for bit as the same keep sets copied out by `retain`: the leading rows stay, the pool's
/// rows move per head, and the rotated keys and by-head mirror kept beside the buffers move
/// with them (steps with an attention probe read the former, steps without the latter). A
/// cache whose layers are cloned is copied instead, the clone's rows untouched; a copy made
/// by `owned_with_room` evicts in place from its first reselection, though the rows it
/// copied are still read through the original; and the per-head positions it records rotate
/// its keys afresh exactly as the moved copies hold them.
#[test]
fn evicting_in_place_decodes_as_retain_does() {
    // the real model too: its head dim takes the CPU's by-head decode kernels
    for m in models().into_iter().chain([common::smollm2()]) {
        let model = &m.model;
        let mut prompt_cache = model.empty_cache().unwrap();
        model
            .prefill(&prompt(30), &positions(30), &mut prompt_cache)
            .unwrap();
        let heads = prompt_cache.layers[0].k.dims()[1];
        let layers = prompt_cache.layers.len();
        let snapshot = |c: &KvCache| {
            c.layers[1]
                .k
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let prompt_rows = snapshot(&prompt_cache);
        let mut copied = prompt_cache.clone();
        let mut moved = prompt_cache.owned_with_room(16).unwrap();
        let mut capacity = None;
        for step in 0..12 {
            let tok = 100 + step as u32;
            let probe = |c: &mut KvCache| {
                let mut hook = Counting {
                    probe: ProbeRequest::rows(vec![0]),
                    before: Vec::new(),
                    after: Vec::new(),
                    fail_at: None,
                };
                // two steps with a probe (reading the rotated keys), two without (the mirror)
                match step % 4 {
                    0 | 1 => model.decode_step(tok, c, &mut hook).unwrap(),
                    _ => model.decode_step(tok, c, &mut ()).unwrap(),
                }
            };
            // the moved cache's positions rotate its keys afresh as its kept copies have them
            let fresh = probe(&mut without_growth(&moved));
            let (a, b) = (probe(&mut copied), probe(&mut moved));
            assert_eq!(max_diff(&a, &b).0, 0.0, "step {step}");
            assert_eq!(max_diff(&fresh, &b).0, 0.0, "step {step}: rotated afresh");
            let keep = pool_keep(layers, heads, moved.len() as u32, step);
            copied = copied.retain(&keep).unwrap();
            if step == 6 {
                let other = moved.clone();
                let before = snapshot(&other);
                assert!(!moved.retain_in_place(&keep).unwrap(), "a cloned layer");
                assert_eq!(snapshot(&other), before);
                capacity = None;
                continue;
            }
            assert!(moved.retain_in_place(&keep).unwrap(), "step {step}");
            // the same buffers, written in place
            let cap = moved.layers[0].capacity();
            assert!(
                capacity.is_none_or(|c| c == cap),
                "step {step}: new buffers"
            );
            capacity = Some(cap);
            assert_eq!(moved.positions, copied.positions);
            assert_eq!(moved.entries_per_head(), copied.entries_per_head());
        }
        // a question appended after the last eviction reads the same rows too
        let next = copied.positions.last().unwrap() + 1;
        let q = [5u32, 6, 8];
        let pos = [next, next + 1, next + 2];
        let a = model.prefill(&q, &pos, &mut copied).unwrap();
        let b = model.prefill(&q, &pos, &mut moved).unwrap();
        assert_eq!(max_diff(&a, &b).0, 0.0, "appended question");
        assert_eq!(snapshot(&prompt_cache), prompt_rows, "the original's rows");
    }
}
