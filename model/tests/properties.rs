//! Properties of the explicit-KV forward pass on tiny random models (HF-saved Llama and
//! Qwen2): chunked prefill equals one prefill, a partial forward equals the full prefill, and
//! pre-RoPE keys move between positions by rotation alone.

mod common;

use common::{max_diff, positions};
use kvquilt_model::{KvCache, LoadedModel, ProbeRequest, Rows, Tensor};
use proptest::prelude::*;

const REL_TOL: f32 = 1e-4;

fn close(a: &Tensor, b: &Tensor, what: &str) -> Result<(), TestCaseError> {
    let (d, m) = max_diff(a, b);
    prop_assert!(
        d <= REL_TOL * m.max(1e-3),
        "{what}: max diff {d} (scale {m})"
    );
    Ok(())
}

fn caches_close(a: &KvCache, b: &KvCache) -> Result<(), TestCaseError> {
    prop_assert_eq!(&a.positions, &b.positions);
    for (l, (x, y)) in a.layers.iter().zip(&b.layers).enumerate() {
        close(&x.k, &y.k, &format!("layer {l} K"))?;
        close(&x.v, &y.v, &format!("layer {l} V"))?;
    }
    Ok(())
}

fn models() -> Vec<LoadedModel> {
    vec![common::tiny("llama"), common::tiny("qwen2")]
}

fn tokens(max_len: usize) -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(0u32..512, 2..max_len)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 24,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// prefill(A) then prefill(B) over A's KV == prefill(A + B): logits and every layer's KV.
    #[test]
    fn chunked_prefill_equals_one_prefill(toks in tokens(60), split_frac in 0.05f64..0.95) {
        for m in models() {
            let split = ((toks.len() as f64 * split_frac) as usize).clamp(1, toks.len() - 1);
            let all = positions(toks.len());
            let mut whole = m.model.empty_cache().unwrap();
            let want = m.model.prefill(&toks, &all, &mut whole).unwrap();
            let mut parts = m.model.empty_cache().unwrap();
            m.model.prefill(&toks[..split], &all[..split], &mut parts).unwrap();
            let got = m.model.prefill(&toks[split..], &all[split..], &mut parts).unwrap();
            close(&got, &want, "logits")?;
            caches_close(&parts, &whole)?;
        }
    }

    /// A partial forward from layer `start` that recomputes every token over a cache whose
    /// later layers hold garbage equals the full prefill.
    #[test]
    fn partial_forward_of_all_tokens_equals_prefill(toks in tokens(40), start_sel in 0usize..3) {
        for m in models() {
            let layers = m.model.config().num_layers;
            let start = start_sel.min(layers - 1);
            let n = toks.len();
            let mut full = m.model.empty_cache().unwrap();
            let want = m.model.prefill(&toks, &positions(n), &mut full).unwrap();
            let rows: Vec<usize> = (0..n).collect();
            // residual stream entering `start`, from the first `start` layers
            let mut cache = full.clone();
            let mut hidden = m.model.embed(&toks).unwrap();
            if start > 0 {
                hidden = m.model.run_layers(0..start, hidden, Rows::Replace(&rows), &mut cache, None).unwrap().hidden;
            }
            for l in start..layers {
                let dims = cache.layers[l].k.dims().to_vec();
                let dev = cache.layers[l].k.device().clone();
                cache.layers[l].k = Tensor::randn(0f32, 1.0, dims.as_slice(), &dev).unwrap();
                cache.layers[l].v = Tensor::randn(0f32, 1.0, dims.as_slice(), &dev).unwrap();
            }
            let out = m.model.run_layers(start..layers, hidden, Rows::Replace(&rows), &mut cache, None).unwrap();
            let got = m.model.logits(&out.hidden.narrow(0, n - 1, 1).unwrap()).unwrap().squeeze(0).unwrap();
            close(&got, &want, "logits")?;
            caches_close(&cache, &full)?;
        }
    }

    /// Recomputing only a subset of tokens (always including the last) over the exact KV of the
    /// others gives the full prefill's logits and KV: the causal mask is exact by position, not
    /// an approximation tied to query order.
    #[test]
    fn partial_forward_over_exact_kv_is_exact(toks in tokens(40), mask in prop::collection::vec(any::<bool>(), 40)) {
        for m in models() {
            let n = toks.len();
            let mut full = m.model.empty_cache().unwrap();
            let want = m.model.prefill(&toks, &positions(n), &mut full).unwrap();
            let mut rows: Vec<usize> = (0..n - 1).filter(|&i| mask[i]).collect();
            rows.push(n - 1);
            let ids: Vec<u32> = rows.iter().map(|&i| toks[i]).collect();
            let mut cache = full.clone();
            let hidden = m.model.embed(&ids).unwrap();
            let layers = m.model.config().num_layers;
            let out = m.model.run_layers(0..layers, hidden, Rows::Replace(&rows), &mut cache, None).unwrap();
            let got = m.model.logits(&out.hidden.narrow(0, rows.len() - 1, 1).unwrap()).unwrap().squeeze(0).unwrap();
            close(&got, &want, "logits")?;
            caches_close(&cache, &full)?;
        }
    }

    /// A chunk prefilled at positions p..p+n and at p+Δ..p+Δ+n has the same pre-RoPE keys, so
    /// rotating the first to positions p+Δ gives the keys computed there; logits agree too.
    #[test]
    fn pre_rope_keys_reposition_by_rotation(toks in tokens(30), p in 0u32..200, delta in 1u32..3000) {
        for m in models() {
            let n = toks.len() as u32;
            let at = |start: u32| (start..start + n).collect::<Vec<u32>>();
            let mut a = m.model.empty_cache().unwrap();
            let la = m.model.prefill(&toks, &at(p), &mut a).unwrap();
            let mut b = m.model.empty_cache().unwrap();
            let lb = m.model.prefill(&toks, &at(p + delta), &mut b).unwrap();
            close(&la, &lb, "logits")?;
            for l in 0..a.layers.len() {
                let moved = m.model.rotate(&a.layers[l].k, &at(p + delta)).unwrap();
                let there = m.model.rotate(&b.layers[l].k, &at(p + delta)).unwrap();
                close(&moved, &there, &format!("layer {l} rotated K"))?;
            }
        }
    }
}

/// The probe returns one distribution over the visible keys per layer and query head.
#[test]
fn attention_probe_rows_are_distributions() {
    let m = common::tiny("qwen2");
    let toks: Vec<u32> = (0..33).map(|i| (i * 7 % 512) as u32).collect();
    let n = toks.len();
    let mut cache = m.model.empty_cache().unwrap();
    let probe = ProbeRequest::rows(vec![n - 1, 3]);
    let layers = m.model.config().num_layers;
    let out = m
        .model
        .run_layers(
            0..layers,
            m.model.embed(&toks).unwrap(),
            Rows::Append(&positions(n)),
            &mut cache,
            Some(&probe),
        )
        .unwrap();
    assert_eq!(out.attention.len(), layers);
    let c = m.model.config();
    for a in &out.attention {
        assert_eq!(a.dims(), &[c.num_kv_heads, c.group_size(), 2, n]);
        let sums = a
            .sum(3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
        // row 3 sees keys 0..=3 only
        let row3 = a
            .narrow(2, 1, 1)
            .unwrap()
            .sum(0)
            .unwrap()
            .sum(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(row3[4..].iter().all(|&p| p == 0.0));
    }
}

/// The summed probe (what query-aware blend ranks by) is the per-row probabilities summed
/// over rows and heads: every (row, head) contributes one unit, and no key past the last
/// query's position receives any.
#[test]
fn column_sums_add_up_the_probabilities() {
    use kvquilt_model::{AttentionKernel, Device};
    let m = common::tiny("qwen2");
    let c = m.model.config().clone();
    let dev = Device::Cpu;
    let kp: Vec<u32> = vec![0, 1, 2, 5, 6, 7, 9, 10, 11, 12];
    let qp: Vec<u32> = vec![2, 6, 7];
    let q = Tensor::randn(0f32, 1.0, (qp.len(), c.num_heads, c.head_dim), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (kp.len(), c.num_kv_heads, c.head_dim), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (kp.len(), c.num_kv_heads, c.head_dim), &dev).unwrap();
    let (out, sums) = m
        .model
        .attention_column_sums(&q, &k, &v, &qp, &kp, AttentionKernel::Reference)
        .unwrap();
    let plain = m
        .model
        .attention(&q, &k, &v, &qp, &kp, AttentionKernel::Reference)
        .unwrap();
    assert!(max_diff(&out, &plain).0 < 1e-6);
    let sums = sums.to_vec1::<f32>().unwrap();
    assert_eq!(sums.len(), kp.len());
    let total: f32 = sums.iter().sum();
    assert!(
        (total - (qp.len() * c.num_heads) as f32).abs() < 1e-3,
        "{total}"
    );
    for (j, s) in sums.iter().enumerate() {
        assert!(*s >= 0.0);
        if kp[j] > 7 {
            assert_eq!(*s, 0.0, "key at {} is past every query", kp[j]);
        }
    }
}
