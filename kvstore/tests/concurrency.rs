//! Concurrency: capacity holds under 8 concurrent writers, pins and leases survive eviction
//! pressure, and 8 readers beside 8 writers never see wrong bytes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{layout, object};
use kvquilt_kvstore::{
    Codec, KvDType, Pin, PolicyKind, SsdConfig, StoreConfig, TieredStore, WritePolicy,
};

const TOKENS: usize = 32;

fn store(
    dir: &std::path::Path,
    host: u64,
    ssd: u64,
    policy: PolicyKind,
    write: WritePolicy,
) -> Arc<TieredStore> {
    Arc::new(
        TieredStore::open(StoreConfig {
            host_policy: policy,
            ssd: Some(SsdConfig {
                policy,
                codec: Codec::Raw,
                sync_writes: false,
                ..SsdConfig::new(dir, ssd)
            }),
            write,
            ..StoreConfig::host_only(host)
        })
        .unwrap(),
    )
}

fn obj_bytes() -> u64 {
    object(0, TOKENS, layout(KvDType::F32, 4)).raw_len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn capacity_holds_under_eight_writers() {
    for policy in [
        PolicyKind::Lru,
        PolicyKind::Lfu,
        PolicyKind::S3Fifo,
        PolicyKind::CostAware,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let one = obj_bytes();
        let s = store(
            dir.path(),
            10 * one,
            25 * one + 25 * 4096,
            policy,
            WritePolicy::WriteThrough,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (s, stop) = (Arc::clone(&s), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut checks = 0;
                while !stop.load(Ordering::Relaxed) {
                    for t in s.stats() {
                        assert!(
                            t.used_bytes <= t.capacity_bytes,
                            "{policy:?}: {} over capacity: {t:?}",
                            t.tier
                        );
                    }
                    checks += 1;
                    tokio::task::yield_now().await;
                }
                checks
            })
        };
        let writers: Vec<_> = (0..8u64)
            .map(|w| {
                let s = Arc::clone(&s);
                tokio::spawn(async move {
                    for i in 0..40u64 {
                        s.put(
                            object(w * 1000 + i, TOKENS, layout(KvDType::F32, 4)),
                            (i % 7) as f64,
                        )
                        .await
                        .unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        stop.store(true, Ordering::Relaxed);
        assert!(watcher.await.unwrap() > 0);
        for t in s.stats() {
            assert!(t.used_bytes <= t.capacity_bytes, "{policy:?}: {t:?}");
            assert!(
                t.evictions > 0,
                "{policy:?}: pressure caused evictions in {}",
                t.tier
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pinned_and_leased_objects_survive_pressure() {
    let dir = tempfile::tempdir().unwrap();
    let one = obj_bytes();
    let s = store(
        dir.path(),
        4 * one,
        6 * one + 6 * 4096,
        PolicyKind::Lru,
        WritePolicy::WriteThrough,
    );
    let l = layout(KvDType::F32, 4);
    let pinned = object(1, TOKENS, l);
    let soft = object(2, TOKENS, l);
    let leased = object(3, TOKENS, l);
    for o in [&pinned, &soft, &leased] {
        s.put(o.clone(), 1.0).await.unwrap();
    }
    s.pin(pinned.key(), Pin::Hard).await.unwrap();
    s.pin(soft.key(), Pin::soft(std::time::Duration::from_secs(3600)))
        .await
        .unwrap();
    let leases = s.lease(leased.key());
    assert_eq!(leases.len(), 2, "leased in host and SSD");
    // a stream of new objects far beyond capacity
    for i in 100..160 {
        s.put(object(i, TOKENS, l), 1.0).await.unwrap();
    }
    for o in [&pinned, &soft, &leased] {
        assert_eq!(
            s.locate(o.key()),
            Some(kvquilt_kvstore::TierKind::HOST),
            "{:?} was evicted",
            o.key()
        );
        assert_eq!(*s.get(o.key()).await.unwrap().unwrap().0, *o);
    }
    drop(leases);
    s.unpin(pinned.key()).await.unwrap();
    for i in 200..260 {
        s.put(object(i, TOKENS, l), 1.0).await.unwrap();
    }
    assert_eq!(
        s.locate(pinned.key()),
        None,
        "unpinned, it is evicted like any other"
    );
    assert!(s.locate(soft.key()).is_some(), "the soft pin still holds");
}

/// 8 writers and 8 readers over a small host tier and an SSD tier; whatever a reader gets
/// must be exactly the object its key names.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn readers_and_writers_stress() {
    for write in [WritePolicy::WriteThrough, WritePolicy::WriteBack] {
        let dir = tempfile::tempdir().unwrap();
        let one = obj_bytes();
        let s = store(dir.path(), 12 * one, 1 << 30, PolicyKind::S3Fifo, write);
        let l = layout(KvDType::F32, 4);
        let mut tasks = Vec::new();
        for w in 0..8u64 {
            let s = Arc::clone(&s);
            tasks.push(tokio::spawn(async move {
                for i in 0..60u64 {
                    s.put(object(w * 100 + i, TOKENS, l), 1.0).await.unwrap();
                }
                0usize
            }));
        }
        for r in 0..8u64 {
            let s = Arc::clone(&s);
            tasks.push(tokio::spawn(async move {
                let mut hits = 0;
                for j in 0..300u64 {
                    let seed = ((r * 7919 + j * 104_729) % 8) * 100 + (j % 60);
                    let want = object(seed, TOKENS, l);
                    if j % 2 == 0 {
                        if let Some((got, _)) = s.get(want.key()).await.unwrap() {
                            assert_eq!(*got, want, "{write:?}: wrong bytes for object {seed}");
                            hits += 1;
                        }
                    } else if let Some(mut stream) = s.read_layers(want.key(), 2).await.unwrap() {
                        let mut l = 0;
                        while let Some(layer) = stream.next().await {
                            assert_eq!(
                                layer.unwrap(),
                                *want.layer(l),
                                "{write:?}: layer {l} of {seed}"
                            );
                            l += 1;
                        }
                        assert_eq!(l, 4);
                        hits += 1;
                    }
                }
                hits
            }));
        }
        let mut hits = 0;
        for t in tasks {
            hits += t.await.unwrap();
        }
        assert!(hits > 0, "{write:?}: readers found objects");
        s.flush().await.unwrap();
        // after a flush every object is in the SSD tier, whatever the write policy
        let ssd = &s.tiers()[1];
        for w in 0..8u64 {
            for i in 0..60u64 {
                assert!(
                    ssd.contains(object(w * 100 + i, TOKENS, l).key()),
                    "{write:?}: {w}/{i} reached the SSD"
                );
            }
        }
        assert_eq!(
            s.stats().iter().map(|t| t.checksum_failures).sum::<u64>(),
            0
        );
    }
}
