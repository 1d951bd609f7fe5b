//! The SSD tier over its own damaged files (issue 16, defect 3): a truncated blob file, a
//! truncated or altered table file, an altered MANIFEST, at rest and while serving. The
//! tier always opens, never hands out wrong bytes, reads what it lost as misses, and keeps
//! storing; another process's lock is the one thing it refuses, with an error saying so.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{layout, object};
use kvquilt_kvstore::{KvDType, KvObject, Pins, SsdConfig, SsdTier, StoreError, Tier};

fn objects(seed: u64) -> Vec<KvObject> {
    (seed..seed + 4)
        .map(|i| object(i, 64, layout(KvDType::F32, 3)))
        .collect()
}

fn open(dir: &Path) -> SsdTier {
    SsdTier::open(SsdConfig::new(dir, 1 << 30), Pins::default()).expect("the tier opens")
}

/// The database's files whose name ends with `suffix` or starts with `prefix`.
fn files(dir: &Path, pick: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.ends_with(pick) || n.starts_with(pick)
        })
        .collect();
    v.sort();
    v
}

#[derive(Debug, Clone, Copy)]
enum Harm {
    /// Cut the file to half its length.
    Truncate,
    /// Flip 16 bytes at 60% of its length (inside a value of a blob file).
    Flip,
    /// Delete the file.
    Delete,
}

fn harm(path: &Path, how: Harm) {
    if let Harm::Delete = how {
        std::fs::remove_file(path).unwrap();
        return;
    }
    let mut b = std::fs::read(path).unwrap();
    match how {
        Harm::Truncate => b.truncate(b.len() / 2),
        Harm::Flip => {
            let m = b.len() * 6 / 10;
            for x in &mut b[m..m + 16] {
                *x ^= 0x5a;
            }
        }
        Harm::Delete => unreachable!("handled above"),
    }
    std::fs::write(path, b).unwrap();
}

/// Stores `objs` and flushes them to RocksDB's files.
async fn store_all(t: &SsdTier, objs: &[KvObject]) {
    for o in objs {
        t.put(Arc::new(o.clone()), 1.0).await.unwrap();
    }
    t.flush().await.unwrap();
}

/// Every read is the stored object or a miss, never an error or other bytes.
async fn reads_are_right_or_missing(t: &SsdTier, objs: &[KvObject]) -> usize {
    let mut right = 0;
    for o in objs {
        match t.get(o.key()).await {
            Ok(Some(got)) => {
                assert_eq!(*got, *o, "wrong bytes handed out");
                right += 1;
            }
            Ok(None) => assert!(!t.contains(o.key()), "a miss drops the object"),
            Err(e) => panic!("a read of damaged files is an error, not a miss: {e}"),
        }
    }
    right
}

/// After whatever recovery: the tier stores and reads back new objects, and still does
/// after a reopen.
async fn keeps_storing(dir: &Path, t: SsdTier) {
    let fresh = objects(100);
    store_all(&t, &fresh).await;
    assert_eq!(reads_are_right_or_missing(&t, &fresh).await, fresh.len());
    drop(t);
    let t = open(dir);
    assert_eq!(reads_are_right_or_missing(&t, &fresh).await, fresh.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_files_at_rest_never_stop_the_tier() {
    for (pick, how) in [
        (".blob", Harm::Truncate),
        (".blob", Harm::Flip),
        // a missing blob file once failed every read of its objects (and `serve`'s start-up)
        (".blob", Harm::Delete),
        (".sst", Harm::Truncate),
        (".sst", Harm::Flip),
        ("MANIFEST", Harm::Flip),
        ("MANIFEST", Harm::Truncate),
        ("CURRENT", Harm::Truncate),
    ] {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("store");
        let objs = objects(1);
        store_all(&open(&dir), &objs).await;
        let targets = files(&dir, pick);
        assert!(!targets.is_empty(), "no {pick} file");
        for f in &targets {
            harm(f, how);
        }
        let t = open(&dir);
        let right = reads_are_right_or_missing(&t, &objs).await;
        eprintln!(
            "{pick} {how:?}: {right} of {} objects survive, recoveries {}",
            objs.len(),
            t.stats().recoveries
        );
        keeps_storing(&dir, t).await;
    }
}

/// A blob file truncated or deleted under a running tier: reads of its objects are misses
/// that drop them (not errors, and not again and again); the tier keeps storing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_file_truncated_while_serving_costs_misses() {
    for how in [Harm::Truncate, Harm::Delete] {
        blob_file_harmed_while_serving(how).await;
    }
}

async fn blob_file_harmed_while_serving(how: Harm) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("store");
    let objs = objects(1);
    let t = open(&dir);
    store_all(&t, &objs).await;
    for f in files(&dir, ".blob") {
        harm(&f, how);
    }
    reads_are_right_or_missing(&t, &objs).await;
    assert!(t.stats().checksum_failures > 0, "the damage was counted");
    // the second read of a dropped object is a plain miss
    let before = t.stats().checksum_failures;
    reads_are_right_or_missing(&t, &objs).await;
    assert_eq!(t.stats().checksum_failures, before);
    keeps_storing(&dir, t).await;
}

#[test]
fn a_second_process_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path());
    let Err(e) = SsdTier::open(SsdConfig::new(dir.path(), 1 << 30), Pins::default()) else {
        panic!("two tiers opened one directory");
    };
    assert!(matches!(e, StoreError::Locked { .. }), "{e}");
    assert!(e.to_string().contains("another process"), "{e}");
    assert!(dir.path().exists() && files(dir.path(), "damaged").is_empty());
}

/// A damaged table among healthy ones (found by a probe of `kvquilt serve`): two flushes
/// make two table + blob file pairs; the second's tables are cut. RocksDB's repair would
/// delete every blob file and leave the healthy tables pointing at them, so a later
/// compaction stops all writes, restart after restart. The tier moves the damaged store
/// aside instead and starts empty: reads are misses, writes work, and keep working across
/// reopens and compactions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_table_among_healthy_ones_never_stops_writes() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("store");
    let (first, second) = (objects(1), objects(10));
    let before = {
        let t = open(&dir);
        store_all(&t, &first).await;
        let before = files(&dir, ".sst");
        store_all(&t, &second).await;
        before
    };
    for f in files(&dir, ".sst") {
        if !before.contains(&f) {
            harm(&f, Harm::Truncate);
        }
    }
    let t = open(&dir);
    let right = reads_are_right_or_missing(&t, &first).await
        + reads_are_right_or_missing(&t, &second).await;
    eprintln!(
        "{right} of 8 objects survive, recoveries {}",
        t.stats().recoveries
    );
    for round in 0..3 {
        let fresh = objects(100 + 10 * round);
        store_all(&t, &fresh).await;
        assert_eq!(reads_are_right_or_missing(&t, &fresh).await, fresh.len());
    }
    drop(t);
    let t = open(&dir);
    store_all(&t, &objects(200)).await;
    assert!(!t.read_only(), "writes were stopped");
}

/// Whole-object reads racing removals and re-puts of the same object: a read sees the object
/// whole or not at all, never a header without its layers — which once read as damage
/// (counted, logged) and deleted the key, taking a fresh copy with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_racing_removals_never_see_damage() {
    let dir = tempfile::tempdir().unwrap();
    let t = Arc::new(open(dir.path()));
    // large enough that its layers are read after the header, by several threads
    let obj = object(77, 2048, layout(KvDType::F32, 8));
    t.put(Arc::new(obj.clone()), 1.0).await.unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let (t, obj, stop) = (Arc::clone(&t), obj.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                t.remove(obj.key()).await.unwrap();
                t.put(Arc::new(obj.clone()), 1.0).await.unwrap();
            }
        })
    };
    let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut whole = 0;
    while std::time::Instant::now() < until {
        if let Some(got) = t.get(obj.key()).await.unwrap() {
            assert!(*got == obj, "a read returned other bytes");
            whole += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    churn.await.unwrap();
    assert!(whole > 0, "no read found the object");
    assert_eq!(t.stats().checksum_failures, 0, "a race read as damage");
}
