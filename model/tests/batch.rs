//! Batched decoding (`Model::decode_batch`) on tiny random models: each sequence of a batch
//! steps as its own `decode_step` would — over caches of different lengths, a cache pruned
//! per head and one marked with a parallel context — and a failing batch changes no cache.

mod common;

use common::{max_diff, positions};
use kvquilt_model::{
    BatchStep, CollectProbes, HookError, KvCache, LayerHook, LayerKv, LoadedModel, Model,
    ParallelContext, ProbeRequest, Tensor,
};

fn models() -> Vec<LoadedModel> {
    vec![common::tiny("llama"), common::tiny("qwen2")]
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 29 + salt) % 500).collect()
}

fn close(a: &Tensor, b: &Tensor, what: &str) {
    let (d, m) = max_diff(a, b);
    assert!(d <= 1e-4 * m.max(1e-3), "{what}: max diff {d} (scale {m})");
}

/// Three caches unlike each other: 23 tokens, 9 tokens pruned to 6 per head (different
/// rows per head), and 30 tokens marked with a parallel context.
fn caches(model: &Model) -> Vec<KvCache> {
    let mut a = model.empty_cache().unwrap();
    model
        .prefill(&prompt(23, 3), &positions(23), &mut a)
        .unwrap();
    let mut full = model.empty_cache().unwrap();
    model
        .prefill(&prompt(9, 5), &positions(9), &mut full)
        .unwrap();
    let heads = full.layers[0].k.dims()[1];
    let keep: Vec<Vec<Vec<u32>>> = (0..full.layers.len())
        .map(|l| {
            (0..heads)
                .map(|h| {
                    let mut kept = vec![0, 8];
                    kept.extend((1..8).filter(|i| (i + l as u32 + h as u32).is_multiple_of(2)));
                    kept.sort_unstable();
                    kept
                })
                .collect()
        })
        .collect();
    let b = full.retain(&keep).unwrap();
    assert!(b.is_pruned());
    let mut c = model.empty_cache().unwrap();
    model
        .prefill(&prompt(30, 7), &positions(30), &mut c)
        .unwrap();
    c.set_parallel_context(Some(ParallelContext::new(4..20, 0.7, 1.0).unwrap()));
    vec![a, b, c]
}

/// One batched step of every cache of `caches`, cache `b` appending `tokens[b]`.
fn step_all(
    model: &Model,
    caches: &mut [KvCache],
    tokens: &[u32],
) -> kvquilt_model::Result<Tensor> {
    let mut batch: Vec<BatchStep<'_>> = caches
        .iter_mut()
        .zip(tokens)
        .map(|(c, &t)| BatchStep::new(t, c))
        .collect();
    model.decode_batch(&mut batch)
}

fn same_cache(a: &KvCache, b: &KvCache, what: &str) {
    assert_eq!(a.positions, b.positions, "{what}: positions");
    for (l, (x, y)) in a.layers.iter().zip(&b.layers).enumerate() {
        close(&x.k, &y.k, &format!("{what}: layer {l} K"));
        close(&x.v, &y.v, &format!("{what}: layer {l} V"));
    }
}

/// Two batched steps give every sequence the logits and cache its own two decode steps give.
#[test]
fn a_batched_step_matches_each_sequences_own_step() {
    for m in models() {
        let model = &m.model;
        let base = caches(model);
        let mut alone = base.clone();
        let mut batched = base.clone();
        for (step, tokens) in [[11u32, 12, 13], [40, 41, 42]].iter().enumerate() {
            let want: Vec<Tensor> = alone
                .iter_mut()
                .zip(tokens)
                .map(|(c, &t)| model.decode_step(t, c, &mut ()).unwrap())
                .collect();
            let got = step_all(model, &mut batched, tokens).unwrap();
            assert_eq!(got.dims(), [3, model.config().vocab_size]);
            for (b, w) in want.iter().enumerate() {
                close(
                    &got.get(b).unwrap(),
                    w,
                    &format!("step {step}, sequence {b}"),
                );
            }
        }
        for (b, (x, y)) in batched.iter().zip(&alone).enumerate() {
            same_cache(x, y, &format!("sequence {b}"));
        }
        // the parallel context still corrects the batched sequence's steps
        let mut plain = base[2].clone();
        plain.set_parallel_context(None);
        let corrected = model
            .decode_step(11, &mut base[2].clone(), &mut ())
            .unwrap();
        let exact = model.decode_step(11, &mut plain, &mut ()).unwrap();
        assert!(
            max_diff(&corrected, &exact).0 > 1e-3,
            "the mark changes the step"
        );
    }
}

/// A hook given to one sequence of a batch sees what it sees in that sequence's own step;
/// the other sequences' hooks see their own caches.
#[test]
fn a_sequences_hook_sees_its_own_attention() {
    for m in models() {
        let model = &m.model;
        let base = caches(model);
        let probe = || ProbeRequest::rows(vec![0]);
        let mut want = CollectProbes::new(Some(probe()));
        model
            .decode_step(11, &mut base[0].clone(), &mut want)
            .unwrap();
        let mut got = CollectProbes::new(Some(probe()));
        let mut other = CollectProbes::new(Some(probe()));
        let mut caches = base.clone();
        let (first, rest) = caches.split_at_mut(1);
        let mut batch = vec![
            BatchStep::new(11, &mut first[0]).with_hook(&mut got),
            BatchStep::new(12, &mut rest[1]).with_hook(&mut other),
        ];
        model.decode_batch(&mut batch).unwrap();
        assert_eq!(got.layers.len(), model.config().num_layers);
        for (l, (g, w)) in got.layers.iter().zip(&want.layers).enumerate() {
            let (g, w) = (g.rows.as_ref().unwrap(), w.rows.as_ref().unwrap());
            close(g, w, &format!("layer {l}'s probe"));
        }
        // the third cache's probe covers its own 31 keys
        let keys = other.layers[0].rows.as_ref().unwrap().dims()[3];
        assert_eq!(keys, base[2].len() + 1);
    }
}

/// Fails at one layer of the sequence it observes.
struct FailAt(usize);

impl LayerHook for FailAt {
    fn before_layer(&mut self, layer: usize, _kv: &mut LayerKv) -> Result<(), HookError> {
        if layer == self.0 {
            return Err(HookError::msg("refused"));
        }
        Ok(())
    }
}

/// A bad token, a failing hook in the last layer of one sequence, or an empty batch: an
/// error, and every cache of the batch is as it was.
#[test]
fn a_failed_batch_leaves_every_cache_as_it_was() {
    for m in models() {
        let model = &m.model;
        let base = caches(model);
        let vocab = model.config().vocab_size as u32;
        let mut caches = base.clone();
        let err = step_all(model, &mut caches, &[1, vocab, 2])
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside the vocabulary"), "{err}");
        for (b, (x, y)) in caches.iter().zip(&base).enumerate() {
            same_cache(x, y, &format!("after a bad token, sequence {b}"));
        }

        let last = model.config().num_layers - 1;
        let mut fail = FailAt(last);
        let mut batch: Vec<BatchStep<'_>> = caches
            .iter_mut()
            .zip([1, 2, 3])
            .map(|(c, t)| BatchStep::new(t, c))
            .collect();
        batch[2].hook = Some(&mut fail);
        let err = model.decode_batch(&mut batch).unwrap_err().to_string();
        assert!(err.contains("refused"), "{err}");
        for (b, (x, y)) in caches.iter().zip(&base).enumerate() {
            same_cache(x, y, &format!("after a hook's error, sequence {b}"));
        }

        let err = model.decode_batch(&mut []).unwrap_err().to_string();
        assert!(err.contains("zero sequences"), "{err}");
    }
}

/// Sequences sharing one cache's buffers (clones of one prompt's cache, as concurrent
/// requests over one cached prompt are) each get their own rows: only one of them may append
/// in place, the others copy, and every step equals that sequence's own steps.
#[test]
fn sequences_cloned_from_one_cache_append_their_own_rows() {
    for m in models() {
        let model = &m.model;
        let mut base = model.empty_cache().unwrap();
        model
            .prefill(&prompt(17, 9), &positions(17), &mut base)
            .unwrap();
        // a first step makes the cache's growable buffers, which the clones then share
        model.decode_step(5, &mut base, &mut ()).unwrap();
        let mut alone = vec![base.clone(); 4];
        let mut batched = vec![base.clone(); 4];
        for step in 0..5u32 {
            let tokens: Vec<u32> = (0..4).map(|b| 20 + 7 * b + step).collect();
            // the batch first: its first sequence takes the shared frontier, the others copy
            let got = step_all(model, &mut batched, &tokens).unwrap();
            let want: Vec<Tensor> = alone
                .iter_mut()
                .zip(&tokens)
                .map(|(c, &t)| model.decode_step(t, c, &mut ()).unwrap())
                .collect();
            for (b, w) in want.iter().enumerate() {
                close(
                    &got.get(b).unwrap(),
                    w,
                    &format!("step {step}, sequence {b}"),
                );
            }
        }
        for (b, (x, y)) in batched.iter().zip(&alone).enumerate() {
            same_cache(x, y, &format!("clone {b}"));
        }
    }
}

/// Records whether each layer ran on a thread of rayon's pool.
#[derive(Default)]
struct PoolThreads(Vec<bool>);

impl LayerHook for PoolThreads {
    fn before_layer(&mut self, _layer: usize, _kv: &mut LayerKv) -> Result<(), HookError> {
        self.0.push(rayon::current_thread_index().is_some());
        Ok(())
    }
}

/// On the CPU a decode step, alone or batched, runs on rayon's pool even when called from a
/// thread outside it (one hand-off per step instead of one per parallel product:
/// `Model::on_pool`), and its results are those of the same step taken inside the pool.
#[test]
fn cpu_decode_steps_run_on_the_pool() {
    for m in models() {
        let model = &m.model;
        let base = caches(model);
        assert!(rayon::current_thread_index().is_none(), "a test thread");
        let mut alone = PoolThreads::default();
        let mut cache = base[0].clone();
        let got = model.decode_step(11, &mut cache, &mut alone).unwrap();
        assert_eq!(alone.0.len(), model.config().num_layers);
        assert!(alone.0.iter().all(|&on| on), "{:?}", alone.0);
        let want = rayon::scope(|_| model.decode_step(11, &mut base[0].clone(), &mut ())).unwrap();
        close(&got, &want, "a step called from outside the pool");
        let (mut first, mut second) = (PoolThreads::default(), PoolThreads::default());
        let mut caches = base.clone();
        let (a, rest) = caches.split_at_mut(1);
        let mut batch = [
            BatchStep::new(11, &mut a[0]).with_hook(&mut first),
            BatchStep::new(12, &mut rest[0]).with_hook(&mut second),
        ];
        model.decode_batch(&mut batch).unwrap();
        for seen in [&first.0, &second.0] {
            assert_eq!(seen.len(), model.config().num_layers);
            assert!(seen.iter().all(|&on| on), "{seen:?}");
        }
    }
}
