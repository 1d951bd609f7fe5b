//! Block prefill under a budget (EpiCache's build and block-prefill SnapKV), on the tiny
//! qwen2 model: without eviction it is plain prefill; with eviction the cache never holds
//! more than budget + block (+ the scoring prompt), ends at the budget, and decoding goes on.

use std::path::PathBuf;

use kvquilt_blend::block_prefill::{
    BlockScorer, SENSITIVITY_ALPHA, block_prefill, key_sensitivity, layer_weights,
};
use kvquilt_compression::policy::{BudgetSplit, SnapKv};
use kvquilt_model::{DType, Device, Model, load, positions};

mod support;
use support::max_diff;

fn model() -> Model {
    let fixture = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("../model/tests/fixtures/tiny-qwen2");
    load(&fixture, &Device::Cpu, DType::F32).unwrap().model
}

fn toks(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| 1 + (i * 31 + seed * 7) % 400)
        .collect()
}

#[test]
fn without_eviction_it_is_plain_prefill() {
    let m = model();
    let context = toks(70, 1);
    let question = toks(5, 2);
    let mut plain = m.empty_cache().unwrap();
    m.prefill(&context, &positions(0, 70), &mut plain).unwrap();
    let want = m.prefill(&question, &positions(70, 5), &mut plain).unwrap();
    let prompt = toks(6, 3);
    for scorer in [
        BlockScorer::Window(SnapKv::default()),
        BlockScorer::Prompt {
            tokens: &prompt,
            row_max: false,
        },
        BlockScorer::Prompt {
            tokens: &prompt,
            row_max: true,
        },
    ] {
        let b = block_prefill(&m, &context, 16, 100, 4, &BudgetSplit::Uniform, &scorer).unwrap();
        assert_eq!((b.evictions, b.next_position, b.cache.len()), (0, 70, 70));
        let mut cache = b.cache;
        let got = m.prefill(&question, &positions(70, 5), &mut cache).unwrap();
        let d = max_diff(&want, &got);
        assert!(d < 1e-4, "{scorer:?}: logits moved by {d}");
    }
}

#[test]
fn eviction_bounds_the_cache_and_decoding_goes_on() {
    let m = model();
    let layers = m.config().num_layers;
    let kv_heads = m.config().num_kv_heads;
    let context = toks(130, 4);
    let prompt = toks(6, 5);
    let snap = SnapKv {
        window: 8,
        ..SnapKv::default()
    };
    for (scorer, extra) in [
        (BlockScorer::Window(snap), 0),
        (
            BlockScorer::Prompt {
                tokens: &prompt,
                row_max: false,
            },
            6,
        ),
        (
            BlockScorer::Prompt {
                tokens: &prompt,
                row_max: true,
            },
            6,
        ),
    ] {
        let b = block_prefill(&m, &context, 16, 40, 4, &BudgetSplit::Uniform, &scorer).unwrap();
        assert!(b.evictions >= 5, "{scorer:?}: {} evictions", b.evictions);
        assert!(
            b.peak_rows <= 40 + 16 + extra,
            "{scorer:?}: peak {}",
            b.peak_rows
        );
        assert_eq!(b.next_position, 130);
        assert_eq!(b.cache.entries_per_head(), vec![vec![40; kv_heads]; layers]);
        let mut cache = b.cache;
        let logits = m
            .prefill(&toks(5, 6), &positions(130, 5), &mut cache)
            .unwrap();
        let v: Vec<f32> = logits.to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{scorer:?}");
    }
}

/// The scoring prompt's rows reduced by their maximum (the reference code's) keep other
/// entries than their mean does: the option reaches the selection.
#[test]
fn a_prompt_scored_by_its_rows_maximum_keeps_other_entries() {
    let m = model();
    let context = toks(130, 4);
    let prompt = toks(6, 5);
    let kept = |row_max| {
        let scorer = BlockScorer::Prompt {
            tokens: &prompt,
            row_max,
        };
        block_prefill(&m, &context, 16, 40, 4, &BudgetSplit::Uniform, &scorer)
            .unwrap()
            .cache
    };
    let (mean, max) = (kept(false), kept(true));
    let differs = mean
        .layers
        .iter()
        .zip(&max.layers)
        .any(|(a, b)| max_diff(&a.k.flatten_all().unwrap(), &b.k.flatten_all().unwrap()) > 0.0);
    assert!(differs, "the same entries kept by mean and by maximum");
}

#[test]
fn a_budget_that_cannot_hold_the_sinks_is_refused() {
    let m = model();
    let snap = BlockScorer::Window(SnapKv::default());
    assert!(block_prefill(&m, &toks(50, 1), 16, 4, 4, &BudgetSplit::Uniform, &snap).is_err());
    assert!(block_prefill(&m, &toks(50, 1), 0, 20, 4, &BudgetSplit::Uniform, &snap).is_err());
    assert!(block_prefill(&m, &[], 16, 20, 4, &BudgetSplit::Uniform, &snap).is_err());
    let empty: [u32; 0] = [];
    let prompt = BlockScorer::Prompt {
        tokens: &empty,
        row_max: false,
    };
    assert!(block_prefill(&m, &toks(50, 1), 16, 20, 4, &BudgetSplit::Uniform, &prompt).is_err());
}

#[test]
fn key_sensitivity_is_zero_where_nothing_is_cut_and_at_layer_zero() {
    let m = model();
    let sample = toks(64, 5);
    // sinks + half a block cover everything before each block: keys equal full prefill's
    let whole = key_sensitivity(&m, &sample, 40, 32).unwrap();
    assert_eq!(whole.len(), m.config().num_layers);
    assert!(whole.iter().all(|s| s.abs() < 1e-4), "{whole:?}");
    // blocks of 8 with 2 sinks: later blocks lose most of their context
    let cut = key_sensitivity(&m, &sample, 8, 2).unwrap();
    // layer 0's keys are a projection of the token alone
    assert!(cut[0].abs() < 1e-4, "{cut:?}");
    assert!(cut[1..].iter().all(|&s| s > 1e-4 && s <= 2.0), "{cut:?}");
    // a sample of one block has nothing to cut
    assert!(key_sensitivity(&m, &toks(8, 1), 8, 2).is_err());
}

#[test]
fn layer_weights_follow_the_profile_with_a_floor() {
    // min-max normalised to 0, 0.5, 1 → shares 0, 0.5^a, 1 (of their sum), floor 1/12
    let w = layer_weights(&[0.1, 0.2, 0.3], SENSITIVITY_ALPHA);
    assert!((w.iter().sum::<f32>() - 3.0).abs() < 1e-5, "{w:?}");
    assert!(w[0] < w[1] && w[1] < w[2], "{w:?}");
    let half = 0.5f32.powf(SENSITIVITY_ALPHA);
    let (s1, s2) = (half / (1.0 + half), 1.0 / (1.0 + half));
    let sum = 1.0 / 12.0 + s1 + s2;
    let want = [1.0 / 12.0 / sum * 3.0, s1 / sum * 3.0, s2 / sum * 3.0];
    for (a, b) in w.iter().zip(want) {
        assert!((a - b).abs() < 1e-5, "{w:?} vs {want:?}");
    }
    // a flat profile is uniform
    assert_eq!(layer_weights(&[0.3, 0.3], 1.1), vec![1.0, 1.0]);
    assert!(layer_weights(&[], 1.1).is_empty());
}
