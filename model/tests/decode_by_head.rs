//! CPU decode steps read their layers by head (`LayerKv::decode_rows`: a kept head-major
//! copy of each layer's rotated keys and values, bf16 under `CpuAttentionPrecision::Bf16`
//! where the CPU has AVX-512F): their logits stay those of the reference attention — within
//! f32 rounding in f32, within bf16's in bf16 — over a cache of tokens and over one pruned
//! per head, step after step (each step converting its own row into the kept copy).

mod common;

use common::{max_diff, positions};
use kvquilt_model::{
    AttentionKernel, CpuAttentionPrecision, DType, Device, KvCache, Model, ModelConfig, Tensor,
};

/// A random model of SmolLM2's attention shape (9 heads over 3 KV heads of 64), two layers.
fn smollm2_shaped() -> Model {
    let config = ModelConfig {
        num_layers: 2,
        vocab_size: 1024,
        ..ModelConfig::smollm2_135m()
    };
    Model::random(config, &Device::Cpu, DType::F32).unwrap()
}

/// A cache of 600 tokens, and the same tokens pruned to 200 rows per head (other rows per
/// head and layer, none padded).
fn caches(model: &Model) -> Vec<(&'static str, KvCache)> {
    let tokens: Vec<u32> = (0..600u32).map(|i| (i * 37 + 11) % 1000).collect();
    let mut full = model.empty_cache().unwrap();
    model.prefill(&tokens, &positions(600), &mut full).unwrap();
    let heads = full.layers[0].k.dims()[1];
    let keep: Vec<Vec<Vec<u32>>> = (0..full.layers.len())
        .map(|l| {
            (0..heads)
                .map(|h| {
                    (0..600u32)
                        .filter(|i| (i + l as u32 + h as u32).is_multiple_of(3))
                        .collect()
                })
                .collect()
        })
        .collect();
    let pruned = full.retain(&keep).unwrap();
    assert!(pruned.is_pruned() && !pruned.is_padded());
    vec![("tokens", full), ("pruned", pruned)]
}

/// Eight decode steps through the tiled attention (by head) and through the reference,
/// each over its own copy of `cache`: the largest logit difference relative to the
/// reference's largest logit, and the by-head steps' logits.
fn steps(model: &mut Model, cache: &KvCache) -> (f32, Vec<Tensor>) {
    let (mut by_head, mut reference) = (cache.clone(), cache.clone());
    let mut worst = 0f32;
    let mut logits = Vec::new();
    for step in 0..8u32 {
        let token = 100 + 7 * step;
        model.set_attention_kernel(AttentionKernel::Auto);
        let a = model.decode_step(token, &mut by_head, &mut ()).unwrap();
        model.set_attention_kernel(AttentionKernel::Reference);
        let b = model.decode_step(token, &mut reference, &mut ()).unwrap();
        let (d, m) = max_diff(&a, &b);
        worst = worst.max(d / m.max(1e-3));
        logits.push(a);
    }
    model.set_attention_kernel(AttentionKernel::Auto);
    (worst, logits)
}

#[test]
fn decode_steps_read_by_head_attend_like_the_reference() {
    let mut model = smollm2_shaped();
    for (what, cache) in caches(&model) {
        model.set_cpu_attention_precision(CpuAttentionPrecision::F32);
        let (f32_worst, f32_logits) = steps(&mut model, &cache);
        assert!(f32_worst < 1e-4, "{what}, f32: {f32_worst}");
        model.set_cpu_attention_precision(CpuAttentionPrecision::Bf16);
        let (bf16_worst, bf16_logits) = steps(&mut model, &cache);
        // K and V rounded to bf16 (8 significant bits): measured 1.4e-3 (tokens) and
        // 2.3e-3 (pruned) of the largest logit; f32 rows 6e-7
        assert!(bf16_worst < 1e-2, "{what}, bf16: {bf16_worst}");
        let moved = f32_logits
            .iter()
            .zip(&bf16_logits)
            .any(|(a, b)| max_diff(a, b).0 > 0.0);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            assert!(
                moved,
                "{what}: bf16 rows were read (their logits differ from f32's)"
            );
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = moved;
    }
}
