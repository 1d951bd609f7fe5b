//! The API over a failing store (issue 16): a full disk answers 507 naming the condition,
//! acknowledges nothing it did not store durably, and recovers as soon as space exists.

mod common;

use axum::http::StatusCode;
use common::{TestApp, Tmpfs, assert_err};
use kvquilt::serve::config::Config;
use kvquilt::serve::tenants;
use kvquilt_api::{ChunkOutcome, PutChunksResponse, Stats};
use kvquilt_kvstore::{SsdConfig, StoreConfig, TieredStore};
use serde_json::json;

/// Document `i`: 400 bytes, 400 tokens of the tiny model (200 KB of KV).
fn doc(i: usize) -> String {
    let line = format!("Document {i:05} says the tide turns at {i} past the hour. ");
    line.repeat(400 / line.len() + 1)[..400].to_string()
}

async fn objects_on_ssd(app: &TestApp) -> u64 {
    let (status, v) = app.call("GET", "/v1/stats", None, None, "").await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let s: Stats = serde_json::from_value(v).unwrap();
    s.tiers.iter().find(|t| t.tier == "ssd").unwrap().objects
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_a_507_and_recovers_when_space_is_freed() {
    let Some(fs) = Tmpfs::new(64 << 20) else {
        eprintln!("tmpfs mount not permitted here; kvstore's full_disk tests cover the tier");
        return;
    };
    let filler = fs.path.join("filler");
    std::fs::write(&filler, vec![1u8; 24 << 20]).unwrap();
    let ssd = SsdConfig {
        min_free_bytes: 8 << 20,
        ..SsdConfig::new(fs.path.join("store"), u64::MAX)
    };
    let store = TieredStore::open(StoreConfig::with_ssd(1 << 30, ssd)).unwrap();
    let app = TestApp::with_store(Config::default(), store);
    let mut stored = 0;
    let refused = loop {
        let r = app
            .json(
                "POST",
                "/v1/chunks",
                None,
                json!({ "chunks": [doc(stored)] }),
            )
            .await;
        if r.0 != StatusCode::OK {
            break r;
        }
        stored += 1;
        assert!(stored < 1000, "the disk never filled");
    };
    assert!(stored > 0);
    assert_err(&refused, 507, "store_full", "free");
    // nothing answers for the refused chunk: a blend over it computes it (a miss)
    let r = app
        .json(
            "POST",
            "/v1/blend",
            None,
            json!({"suffix_tokens": [70, 71], "chunks": [doc(stored)], "mode": "reuse"}),
        )
        .await;
    assert_eq!(r.0, StatusCode::OK, "{}", r.1);
    assert_eq!(r.1["stats"]["misses"], 1, "{}", r.1);
    assert_eq!(objects_on_ssd(&app).await, stored as u64);
    // space is freed: the next request stores it
    std::fs::remove_file(&filler).unwrap();
    let (status, v) = app
        .json(
            "POST",
            "/v1/chunks",
            None,
            json!({ "chunks": [doc(stored)] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    let p: PutChunksResponse = serde_json::from_value(v).unwrap();
    assert_eq!(p.chunks[0].status, ChunkOutcome::Stored);
    assert_eq!(objects_on_ssd(&app).await, stored as u64 + 1);
}

/// A data directory on a read-only filesystem (issue 16, fault injection): the sidecar
/// starts over it, serves the chunks it holds, keeps new ones in memory and says so
/// (`durable: false`), refuses to delete what it cannot by name, and shows the condition in
/// `/v1/stats`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_data_directory_is_served_and_says_so() {
    let Some(fs) = Tmpfs::new(256 << 20) else {
        eprintln!("tmpfs mount not permitted here; kvstore's read_only tests cover the tier");
        return;
    };
    let open = || {
        let ssd = SsdConfig::new(fs.path.join("store"), u64::MAX);
        TieredStore::open(StoreConfig::with_ssd(1 << 30, ssd)).unwrap()
    };
    let held = {
        let app = TestApp::with_store(Config::default(), open());
        let c = put(&app, 0).await;
        assert!(c.durable, "written through to the SSD tier");
        c.id
    };
    assert!(fs.set_read_only(true), "remount read-only");
    let app = TestApp::with_store(Config::default(), open());
    assert_eq!(
        app.state.account_existing().await.unwrap(),
        1,
        "as `serve` does at start"
    );
    let (status, v) = app.call("GET", "/v1/stats", None, None, "").await;
    assert_eq!(status, StatusCode::OK);
    let stats: Stats = serde_json::from_value(v).unwrap();
    let ssd = stats.tiers.iter().find(|t| t.tier == "ssd").unwrap();
    assert_eq!(ssd.extra.get("read_only"), Some(&1));
    assert_eq!(ssd.objects, 1);
    // the held chunk is served from the read-only disk
    let out = app
        .blend(json!({ "chunks": [{ "id": held }], "question": "When?", "mode": "reuse" }))
        .await;
    assert_eq!(out.stats.hits_ssd, 1, "{:?}", out.stats);
    // a new chunk is acknowledged as memory-only, and is served from memory
    let c = put(&app, 1).await;
    assert_eq!(c.status, ChunkOutcome::Stored);
    assert!(!c.durable);
    let again = put(&app, 1).await;
    assert_eq!(again.status, ChunkOutcome::Hit);
    // deleting what the read-only disk holds is refused, by name
    let r = app
        .call("DELETE", &format!("/v1/chunks/{held}"), None, None, "")
        .await;
    assert_err(&r, 503, "store_read_only", "read-only");
    // a read-only directory without a namespace key: the default tenant needs none, so
    // `serve` starts (it once refused to); tenants' chunks would be unreachable: refused
    let keyless = fs.path.join("store");
    assert!(!keyless.join(tenants::NAMESPACE_KEY_FILE).exists());
    assert!(tenants::serving_key(&keyless, false).is_ok());
    assert!(tenants::serving_key(&keyless, true).is_err());
    assert!(fs.set_read_only(false));
}

/// `POST /v1/chunks` of document `i`: its one status.
async fn put(app: &TestApp, i: usize) -> kvquilt_api::ChunkStatus {
    let (status, v) = app
        .json("POST", "/v1/chunks", None, json!({ "chunks": [doc(i)] }))
        .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    serde_json::from_value::<PutChunksResponse>(v)
        .unwrap()
        .chunks[0]
        .clone()
}
