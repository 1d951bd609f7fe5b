//! Writes of one object racing each other on the SSD tier: two puts, a put and a removal,
//! a rewrite of the object's `meta` record (a flush, a pin) and a removal. Whatever the
//! interleaving, a put acknowledged is readable, and what the index holds is what is on
//! disk (a reopen, which rebuilds the index from disk, finds the same objects, every one
//! readable).

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use common::{layout, object};
use kvquilt_kvstore::{ChunkKey, KvDType, KvObject, Pin, Pins, SsdConfig, SsdTier, Tier};

const TOKENS: usize = 16;

fn open(dir: &std::path::Path, sync: bool) -> SsdTier {
    SsdTier::open(
        SsdConfig {
            sync_writes: sync,
            ..SsdConfig::new(dir, 1 << 30)
        },
        Pins::default(),
    )
    .expect("the tier opens")
}

fn objects(n: u64) -> Vec<Arc<KvObject>> {
    (0..n)
        .map(|s| Arc::new(object(s, TOKENS, layout(KvDType::F32, 4))))
        .collect()
}

/// Keys the tier holds, and whether it can read every one.
async fn held_and_readable(t: &SsdTier) -> BTreeSet<ChunkKey> {
    let keys: BTreeSet<ChunkKey> = t.keys().into_iter().collect();
    for k in &keys {
        assert!(
            t.get(k).await.unwrap().is_some(),
            "{k} is held but unreadable"
        );
    }
    keys
}

/// Closes the tier (its last handle and RocksDB with it) and opens the directory again.
async fn reopen(t: SsdTier, dir: &std::path::Path) -> SsdTier {
    t.flush().await.unwrap();
    drop(t);
    open(dir, true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_put_acknowledged_is_readable_whoever_wrote_it() {
    let dir = tempfile::tempdir().unwrap();
    // synced writes: each takes long enough for a second put to arrive meanwhile
    let t = open(dir.path(), true);
    let objs = objects(4);
    for round in 0..40 {
        let o = &objs[round % objs.len()];
        t.remove(o.key()).await.unwrap();
        let puts: Vec<_> = (0..3)
            .map(|_| {
                let (t, o) = (t.clone(), Arc::clone(o));
                tokio::spawn(async move {
                    let out = t.put(Arc::clone(&o), 1.0).await.unwrap();
                    // acknowledged (by this put or one before it): readable now
                    let got = t.get(o.key()).await.unwrap();
                    assert!(
                        got.is_some(),
                        "round {round}: acknowledged but not readable"
                    );
                    out.written
                })
            })
            .collect();
        let mut written = 0;
        for p in puts {
            written += usize::from(p.await.unwrap());
        }
        assert_eq!(
            written, 1,
            "round {round}: one put writes, the others find it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn removals_racing_puts_leave_index_and_disk_as_one() {
    let dir = tempfile::tempdir().unwrap();
    let objs = objects(4);
    let mut t = open(dir.path(), true);
    for round in 0..25 {
        // each object put and removed at once, from two tasks, in both orders of spawning
        let mut tasks = Vec::new();
        for (i, o) in objs.iter().enumerate() {
            for put_first in [round % 2 == 0, round % 2 == 1] {
                let (t, o) = (t.clone(), Arc::clone(o));
                tasks.push(tokio::spawn(async move {
                    if put_first == (i % 2 == 0) {
                        t.put(o, 1.0).await.unwrap();
                    } else {
                        t.remove(o.key()).await.unwrap();
                    }
                }));
            }
        }
        for task in tasks {
            task.await.unwrap();
        }
        let before = held_and_readable(&t).await;
        let used = t.stats().used_bytes;
        t = reopen(t, dir.path()).await;
        assert_eq!(
            held_and_readable(&t).await,
            before,
            "round {round}: the disk holds what the index held"
        );
        assert_eq!(t.stats().used_bytes, used, "round {round}: bytes counted");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn meta_rewrites_never_bring_back_a_removed_object() {
    let dir = tempfile::tempdir().unwrap();
    let t = open(dir.path(), false);
    let objs = objects(64);
    for round in 0..20 {
        for o in &objs {
            t.put(Arc::clone(o), 1.0).await.unwrap();
            // a read: its access time is rewritten into `meta` at the next flush
            assert!(t.get(o.key()).await.unwrap().is_some());
        }
        // the flush (and pins) rewrite meta records while every object is removed
        let flush = {
            let t = t.clone();
            tokio::spawn(async move { t.flush().await.unwrap() })
        };
        let pins = {
            let (t, objs) = (t.clone(), objs.clone());
            tokio::spawn(async move {
                for o in objs.iter().rev() {
                    t.persist_pin(*o.key()).await.unwrap();
                }
            })
        };
        for o in &objs {
            t.remove(o.key()).await.unwrap();
        }
        flush.await.unwrap();
        pins.await.unwrap();
        assert!(t.keys().is_empty(), "round {round}: every object removed");
    }
    let t = reopen(t, dir.path()).await;
    assert_eq!(
        held_and_readable(&t).await,
        BTreeSet::new(),
        "no meta record outlived its object"
    );
    // a pin kept on a removed key does not bring it back either
    let pins = Pins::default();
    pins.set(*objs[0].key(), Pin::Hard);
    drop(t);
    let t = SsdTier::open(SsdConfig::new(dir.path(), 1 << 30), pins).unwrap();
    t.persist_pin(*objs[0].key()).await.unwrap();
    assert!(t.keys().is_empty());
}

/// Puts that evict one another (a tier of five objects — room for the four being written
/// and one more — eight objects put by four tasks in different orders): every put finishes — a put waits for a victim's lock holding only
/// its own, so two puts that each evicted the other's key cannot wait on each other — and
/// index and disk still agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn puts_evicting_one_another_finish_and_agree() {
    let dir = tempfile::tempdir().unwrap();
    let objs = objects(8);
    let one = {
        let t = open(dir.path(), false);
        t.put(Arc::clone(&objs[0]), 1.0).await.unwrap();
        let used = t.stats().used_bytes;
        t.remove(objs[0].key()).await.unwrap();
        used
    };
    let t = SsdTier::open(
        SsdConfig {
            sync_writes: false,
            ..SsdConfig::new(dir.path(), 5 * one + one / 2)
        },
        Pins::default(),
    )
    .unwrap();
    let workers: Vec<_> = (0..4usize)
        .map(|w| {
            let (t, objs) = (t.clone(), objs.clone());
            tokio::spawn(async move {
                for i in 0..200usize {
                    let o = &objs[(i * (w + 1) + w) % objs.len()];
                    t.put(Arc::clone(o), 1.0).await.unwrap();
                    if (i + w) % 5 == 0 {
                        t.remove(o.key()).await.unwrap();
                    }
                }
            })
        })
        .collect();
    let all = async {
        for w in workers {
            w.await.unwrap();
        }
    };
    if tokio::time::timeout(std::time::Duration::from_secs(120), all)
        .await
        .is_err()
    {
        // (a deadlocked blocking thread would also hang the runtime's shutdown)
        eprintln!("puts evicting one another deadlocked");
        std::process::abort();
    }
    assert!(t.stats().used_bytes <= 5 * one + one / 2);
    assert!(t.stats().evictions > 0, "the puts evicted one another");
    let before = held_and_readable(&t).await;
    let t = reopen(t, dir.path()).await;
    assert_eq!(held_and_readable(&t).await, before);
}
