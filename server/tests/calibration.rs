//! What `blend` means on a served model: its calibration record's settings, or (none) exact
//! prefix reuse unless the configuration opts in; `/v1/models`, the stats and start-up say so.

mod common;

use std::sync::Arc;

use axum::http::StatusCode;
use common::{TestApp, tiny_chat_model};
use kvquilt::serve::app_state;
use kvquilt::serve::config::{BlendSettings, Config};
use kvquilt_api::BlendResponse;
use kvquilt_api::openai::ModelList;
use kvquilt_blend::calibration::{
    CalibrationRecord, CalibrationSet, CalibrationTarget, ExactnessCheck, FullReference,
    RECORD_FORMAT, Rung, calibration_key,
};
use kvquilt_blend::{BlendConfig, ModelIdentity};
use kvquilt_kvstore::{StoreConfig, TieredStore};
use kvquilt_model::{DType, Device};
use serde_json::{Value, json};

const DOCS: [&str; 2] = [
    "The Zorblat Tower stands in the town of Quenmoor. It was finished in 1911.",
    "The secret number is 4817.",
];

fn config(dir: &std::path::Path, uncalibrated: &str) -> Config {
    Config {
        blend: BlendSettings {
            calibration_dir: Some(dir.to_path_buf()),
            uncalibrated: uncalibrated.into(),
            ..BlendSettings::default()
        },
        ..Config::default()
    }
}

/// The calibration key of the model every `TestApp` serves.
fn key() -> String {
    let loaded = kvquilt_model::load(&tiny_chat_model(), &Device::Cpu, DType::F32).unwrap();
    calibration_key(&ModelIdentity::of(&loaded).unwrap())
}

fn record(key: String, ratio: Option<f32>) -> CalibrationRecord {
    CalibrationRecord {
        format: RECORD_FORMAT,
        key,
        model: "tiny-chat".into(),
        device: "cpu".into(),
        dtype: "f32".into(),
        chunk_encoding: String::new(),
        kvquilt_version: "test".into(),
        created_unix_s: 0,
        run_time_s: 0.0,
        set: CalibrationSet {
            name: "test".into(),
            needle_examples: 30,
            musique_examples: 30,
            seed: 1,
            passages: 10,
            data_blake3: String::new(),
            prompt_tokens_median: 0.0,
        },
        target: CalibrationTarget::default(),
        checks: vec![ExactnessCheck {
            name: "shift".into(),
            what: String::new(),
            first_token_kl: 0.0,
            max_abs_logit_diff: 0.0,
            same_first_token: true,
            kl_tolerance: 1e-4,
            pass: true,
        }],
        full: FullReference {
            needle_accuracy: 0.8,
            ttft_ms_median: 1.0,
        },
        variant: "kvquilt".into(),
        // the rung that decides a certified ratio (a record's ratio must follow from it)
        ladder: ratio
            .map(|r| Rung {
                ratio: r,
                needle_accuracy: 0.8,
                accuracy_vs_full: 1.0,
                musique_first_token_kl: 0.0,
                musique_agreement: 1.0,
                ttft_speedup: 1.0,
                meets_target: true,
            })
            .into_iter()
            .collect(),
        certified: ratio.map(|r| BlendConfig {
            ratio: r,
            ..BlendConfig::default()
        }),
        verdict: "test".into(),
    }
}

async fn models(app: &TestApp) -> ModelList {
    let (status, v) = app.call("GET", "/v1/models", None, None, "").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    serde_json::from_value(v).expect("a ModelList")
}

async fn blend(app: &TestApp, extra: Value) -> BlendResponse {
    let mut body = json!({"question": "What is the number?", "chunks": DOCS});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (status, v) = app.json("POST", "/v1/blend", None, body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    serde_json::from_value(v).expect("a BlendResponse")
}

async fn chat_stats(app: &TestApp) -> Value {
    let body = json!({
        "messages": [{"role": "user", "content": "What is the number?"}],
        "documents": DOCS,
        "max_tokens": 2
    });
    let (status, v) = app.json("POST", "/v1/chat/completions", None, body).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    v["kvquilt"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncalibrated_model_serves_blend_as_prefix_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::new(config(dir.path(), "prefix"));
    let card = models(&app)
        .await
        .data
        .remove(0)
        .kvquilt
        .expect("calibration");
    assert!(!card.calibrated && card.blend_ratio.is_none() && card.record.is_none());
    assert_eq!(card.selection, None);
    assert!(card.note.contains("served as prefix"), "{}", card.note);

    // no mode, and mode blend without a ratio: prefix, with the reason in the stats
    for extra in [json!({}), json!({"mode": "blend"})] {
        let r = blend(&app, extra).await;
        assert_eq!(r.stats.mode, "prefix");
        let note = r.stats.calibration.expect("a calibration note");
        assert!(note.contains("no calibration record"), "{note}");
    }
    let chat = chat_stats(&app).await;
    assert_eq!(chat["mode"], "prefix");
    assert!(
        chat["calibration"]
            .as_str()
            .unwrap()
            .contains("served as prefix")
    );

    // an explicit ratio is honoured as today, and other modes carry no note
    // (blend, or full prefill where the cost model estimates it faster on this tiny model)
    let r = blend(&app, json!({"mode": "blend", "ratio": 1.0})).await;
    assert_ne!(r.stats.mode, "prefix");
    assert!(r.stats.calibration.is_none());
    let r = blend(&app, json!({"mode": "full"})).await;
    assert_eq!((r.stats.mode.as_str(), r.stats.calibration), ("full", None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opting_in_blends_an_uncalibrated_model() {
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::new(config(dir.path(), "blend"));
    let card = models(&app).await.data.remove(0).kvquilt.unwrap();
    assert!(!card.calibrated);
    assert_eq!(card.blend_ratio, Some(BlendConfig::default().ratio));
    assert_eq!(card.selection.as_deref(), Some("kvquilt"));
    let r = blend(&app, json!({})).await;
    assert_ne!(r.stats.mode, "prefix");
    assert!(r.stats.calibration.unwrap().contains("by configuration"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calibration_record_sets_what_blend_means() {
    let dir = tempfile::tempdir().unwrap();
    let path = record(key(), Some(1.0)).save(dir.path()).unwrap();
    let app = TestApp::new(config(dir.path(), "prefix"));
    let card = models(&app).await.data.remove(0).kvquilt.unwrap();
    assert!(card.calibrated);
    assert_eq!(card.blend_ratio, Some(1.0));
    // the record's selection variant, named on the card
    assert_eq!(card.selection.as_deref(), Some("kvquilt"));
    assert_eq!(
        card.record.as_deref(),
        Some(path.display().to_string().as_str())
    );
    // ratio 1 recomputes every chunk token (the fallback may run full prefill instead,
    // estimated faster on this tiny model; either way the record decided the mode)
    let r = blend(&app, json!({})).await;
    assert!(["blend", "full"].contains(&r.stats.mode.as_str()));
    let note = r.stats.calibration.unwrap();
    assert!(
        note.contains("ratio 1 (kvquilt) from") && note.contains(&path.display().to_string()),
        "{note}"
    );

    // a record that certifies nothing leaves the model uncalibrated, with its verdict
    let dir = tempfile::tempdir().unwrap();
    record(key(), None).save(dir.path()).unwrap();
    let app = TestApp::new(config(dir.path(), "prefix"));
    let r = blend(&app, json!({})).await;
    assert_eq!(r.stats.mode, "prefix");
    assert!(r.stats.calibration.unwrap().contains("certifies no ratio"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_stops_the_start_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join(format!("{}.json", key()));
    std::fs::write(&file, "{\"format\": 1, \"key\": ").unwrap();
    let loaded = kvquilt_model::load(&tiny_chat_model(), &Device::Cpu, DType::F32).unwrap();
    let store = TieredStore::open(StoreConfig::host_only(1 << 20)).unwrap();
    let err = app_state(
        &config(dir.path(), "prefix"),
        loaded,
        Arc::new(store),
        &[42; 32],
    )
    .err()
    .expect("a damaged record is an error");
    let msg = format!("{err:#}");
    assert!(
        msg.contains(&file.display().to_string()) && msg.contains("not readable"),
        "{msg}"
    );
    // a bad policy name is refused when the configuration is checked
    let bad = config(dir.path(), "maybe");
    let msg = format!("{:#}", bad.validate().unwrap_err());
    assert!(msg.contains("blend.uncalibrated"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_model_is_listed_by_its_name() {
    // (the name only labels the served model; the tiny model is what runs)
    let dir = tempfile::tempdir().unwrap();
    let app = TestApp::new(Config {
        model: Some("qwen2.5-coder-0.5b-instruct".into()),
        ..config(dir.path(), "prefix")
    });
    assert_eq!(models(&app).await.data[0].id, "qwen2.5-coder-0.5b-instruct");
    let app = TestApp::new(Config {
        model: Some("/models/My-Model.Q4_K_M.gguf".into()),
        ..config(dir.path(), "prefix")
    });
    assert_eq!(models(&app).await.data[0].id, "My-Model.Q4_K_M");
}
