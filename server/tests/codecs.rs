//! A lossy SSD codec through the API (issue 13): a lossy hit says so in the response's
//! stats, `/v1/stats` and `/metrics`; an exact copy is preferred while one exists.

mod common;

use axum::http::StatusCode;
use common::TestApp;
use kvquilt::serve::config::Config;
use kvquilt_api::Stats;
use kvquilt_kvstore::{Codec, SsdConfig, StoreConfig, TieredStore};
use serde_json::json;

const DOCS: [&str; 2] = [
    "The Zorblat Tower stands in the town of Quenmoor. It was finished in 1911.",
    "Quenmoor is a fishing town on the northern coast.",
];

/// A store whose objects live on an int8 SSD tier only (the host tier has no room).
fn app(dir: &std::path::Path) -> TestApp {
    let ssd = SsdConfig {
        codec: Codec::parse("int8+lz4").unwrap(),
        serve_lossy: true,
        ..SsdConfig::new(dir, 1 << 30)
    };
    let store = TieredStore::open(StoreConfig::with_ssd(1, ssd)).unwrap();
    TestApp::with_store(Config::default(), store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lossy_hit_says_so_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(dir.path());
    let (s, v) = app
        .json("POST", "/v1/chunks", None, json!({"chunks": DOCS}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let b = app
        .blend(json!({"question": "When was the tower finished?", "chunks": DOCS, "mode": "reuse"}))
        .await;
    assert_eq!((b.stats.hits_ssd, b.stats.lossy_hits), (2, 2));
    let (_, v) = app.call("GET", "/v1/stats", None, None, "").await;
    let stats: Stats = serde_json::from_value(v).unwrap();
    let ssd = stats.tiers.iter().find(|t| t.tier == "ssd").unwrap();
    assert_eq!(
        ssd.hits_by_codec.get("int8"),
        Some(&2),
        "{:?}",
        ssd.hits_by_codec
    );
    let (_, metrics) = app.bytes("GET", "/metrics", None, None).await;
    let text = String::from_utf8(metrics).unwrap();
    assert!(text.contains("kvquilt_lossy_segments_total 2"), "{text}");
    assert!(
        text.contains("kvquilt_store_hits_by_codec_total{tier=\"ssd\",codec=\"int8\"} 2"),
        "{text}"
    );
    // the binary object of a lossy chunk is not handed out as if exact
    let id = &b.chunk_ids[0];
    let r = app
        .call("GET", &format!("/v1/chunks/{id}/kv"), None, None, "")
        .await;
    common::assert_err(&r, 409, "lossy_object", "int8");
}
