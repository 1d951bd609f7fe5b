//! Two sidecars sharing a remote tier on a real Redis Cluster (issue 15): one stores, the
//! other hits; the remote's statistics reach `/v1/stats` and `/metrics`; a remote that goes
//! away mid-run costs recomputes, never an error.

#[path = "../../kvstore/tests/support/cluster.rs"]
mod cluster;
mod common;

use std::time::{Duration, Instant};

use axum::http::StatusCode;
use cluster::Cluster;
use common::TestApp;
use kvquilt::serve::config::{Config, RemoteSettings, StoreSettings};
use kvquilt::store_setup::open_store;
use kvquilt_api::{BlendResponse, Stats};
use serde_json::json;

const DOCS: [&str; 3] = [
    "The Zorblat Tower stands in the town of Quenmoor. It was finished in 1911.",
    "Quenmoor is a fishing town on the northern coast.",
    "Its harbour freezes in most winters, and the boats stay in the sheds.",
];

/// A sidecar with its own data directory over the cluster seeded by `seeds`.
fn sidecar(dir: &std::path::Path, seeds: &[String]) -> TestApp {
    let settings = StoreSettings {
        host_bytes: 1 << 30,
        ssd_bytes: 1 << 30,
        remote: RemoteSettings {
            seeds: seeds.to_vec(),
            op_timeout_max_ms: 500,
            breaker_open_ms: 500,
            ..Default::default()
        },
        ..Default::default()
    };
    TestApp::with_store(Config::default(), open_store(dir, &settings).unwrap())
}

async fn blend(app: &TestApp) -> BlendResponse {
    app.blend(json!({"question": "When was the tower finished?", "chunks": DOCS, "mode": "reuse"}))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sidecar_stores_the_other_hits() {
    let c = Cluster::start();
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = sidecar(da.path(), &c.seeds);
    let (s, v) = a
        .json("POST", "/v1/chunks", None, json!({"chunks": DOCS}))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let id = v["chunks"][0]["id"].as_str().unwrap().to_string();
    let on_a = blend(&a).await; // stores the prompt's prefix segment too
    let segments = on_a.stats.segments.len();
    assert_eq!(segments, 4, "{:?}", on_a.stats);
    a.state.blender.store().flush().await.unwrap(); // the remote writes are done

    let b = sidecar(db.path(), &c.seeds);
    let first = blend(&b).await;
    assert_eq!(first.stats.hits_remote, segments, "{:?}", first.stats);
    assert_eq!(first.stats.misses, 0);
    // promoted: a later request hits locally (promotion is asynchronous: a request issued
    // before it lands still reads the remote, and is counted there)
    let mut remote_hits = first.stats.hits_remote;
    let mut second = blend(&b).await;
    remote_hits += second.stats.hits_remote;
    for _ in 0..500 {
        if second.stats.hits_host == segments {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        second = blend(&b).await;
        remote_hits += second.stats.hits_remote;
    }
    assert_eq!(second.stats.hits_host, segments, "{:?}", second.stats);
    assert_eq!(first.token, second.token, "the same first token");

    let (_, v) = b.call("GET", "/v1/stats", None, None, "").await;
    let stats: Stats = serde_json::from_value(v).unwrap();
    let remote = stats.tiers.iter().find(|t| t.tier == "remote").unwrap();
    assert_eq!(
        remote.hits, remote_hits as u64,
        "what the responses reported"
    );
    assert_eq!(remote.extra.get("breaker_state"), Some(&0));
    let (_, metrics) = b.bytes("GET", "/metrics", None, None).await;
    let text = String::from_utf8(metrics).unwrap();
    assert!(
        text.contains(&format!(
            "kvquilt_store_hits_total{{tier=\"remote\"}} {remote_hits}"
        )),
        "{text}"
    );
    assert!(
        text.contains("kvquilt_store_breaker_state{tier=\"remote\"} 0"),
        "{text}"
    );

    // a chunk id A stored works on any sidecar of the cluster: a fresh one finds it on the
    // remote and adopts it (found by a probe of remote-only sidecars: an id worked only on
    // the sidecar that stored it, and not there after a restart)
    let dd = tempfile::tempdir().unwrap();
    let d = sidecar(dd.path(), &c.seeds);
    let by_id = d
        .blend(json!({"question": "When was the tower finished?", "chunks": [{"id": id}], "mode": "reuse"}))
        .await;
    assert_eq!(by_id.stats.hits_remote, 2, "{:?}", by_id.stats); // the prefix and the chunk
    let (s, info) = d
        .json("GET", &format!("/v1/chunks/{id}"), None, json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{info}");
    // an id no sidecar stored is still unknown
    let (s, _) = d
        .json(
            "GET",
            &format!("/v1/chunks/{}", "ab".repeat(32)),
            None,
            json!({}),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // the cluster goes away: a third sidecar recomputes within its deadlines
    drop(c);
    let dc = tempfile::tempdir().unwrap();
    let cside = sidecar(dc.path(), &["127.0.0.1:1".to_string()]);
    let t0 = Instant::now();
    let r = blend(&cside).await;
    assert_eq!(r.stats.misses, segments, "{:?}", r.stats);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // and a sidecar whose remote died after start-up keeps answering
    let r = blend(&b).await;
    assert_eq!(r.stats.hits_host, segments, "local hits need no remote");
}

/// A primary killed (SIGKILL) while a sidecar serves requests that read the remote: every
/// answer is the one recompute gives (the chunks' KV is the same bytes either way), none
/// fails, and each ends within a bound; once the replica has taken over, remote hits resume
/// (records are spread per layer, so until then every object has a layer on the killed
/// primary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_under_load_changes_no_answer() {
    let c = Cluster::start();
    let (da, dr) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = sidecar(da.path(), &c.seeds);
    blend(&a).await;
    a.state.blender.store().flush().await.unwrap();
    // the reference: a sidecar with no remote recomputes every chunk
    let reference = blend(&sidecar_local(dr.path())).await.token;

    let victim = c.base; // the script's first node is a primary
    let mut remote_hits_after_kill = 0;
    let mut killed = None;
    for round in 0.. {
        if round == 2 {
            c.signal(victim, "-9");
            killed = Some(Instant::now());
        }
        if round >= 6
            && (remote_hits_after_kill > 0
                || killed.is_some_and(|k| k.elapsed() > Duration::from_secs(30)))
        {
            break;
        }
        // three fresh sidecars a round (nothing promoted yet): every request reads the remote
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let bs: Vec<TestApp> = dirs.iter().map(|d| sidecar(d.path(), &c.seeds)).collect();
        let t0 = Instant::now();
        let (r1, r2, r3) = tokio::join!(blend(&bs[0]), blend(&bs[1]), blend(&bs[2]));
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "round {round}: {:?}",
            t0.elapsed()
        );
        for r in [r1, r2, r3] {
            assert_eq!(r.token, reference, "round {round}: {:?}", r.stats);
            if round >= 2 {
                remote_hits_after_kill += r.stats.hits_remote;
            }
        }
    }
    assert!(remote_hits_after_kill > 0, "the promoted replica serves on");
}

/// A sidecar with no remote tier (host memory only).
fn sidecar_local(dir: &std::path::Path) -> TestApp {
    let settings = StoreSettings {
        host_bytes: 1 << 30,
        ssd_bytes: 1 << 30,
        ..Default::default()
    };
    TestApp::with_store(Config::default(), open_store(dir, &settings).unwrap())
}
