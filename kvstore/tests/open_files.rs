//! The SSD tier's descriptors: a store of many files keeps at most `max_open_files` of them
//! open (RocksDB's default, unbounded, kept every table and blob file open for good, so a
//! large store could exhaust the process's descriptor limit and fail reads and accepts).
//! Alone in its test binary, so the descriptors counted are this test's.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::{layout, object};
use kvquilt_kvstore::{KvDType, Pins, SsdConfig, SsdTier, Tier};

/// Files under `dir` this process holds descriptors on (one entry per descriptor).
fn open_under(dir: &Path) -> Vec<String> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.starts_with(dir))
        .filter_map(|t| Some(t.file_name()?.to_string_lossy().into_owned()))
        .collect()
}

#[tokio::test]
async fn a_store_of_many_files_keeps_at_most_its_bound_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().canonicalize().unwrap();
    let config = SsdConfig {
        max_open_files: 20,
        sync_writes: false,
        ..SsdConfig::new(&path, 1 << 30)
    };
    let t = SsdTier::open(config, Pins::default()).unwrap();
    let l = layout(KvDType::F32, 2);
    let objects: Vec<_> = (0..60).map(|i| object(i, 64, l)).collect();
    // one flush per object: a blob file (and a table file) each
    for o in &objects {
        t.put(Arc::new(o.clone()), 1.0).await.unwrap();
        t.flush().await.unwrap();
    }
    for o in &objects {
        assert_eq!(*t.get(o.key()).await.unwrap().unwrap(), *o);
    }
    let blobs = std::fs::read_dir(&path)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "blob"))
        })
        .count();
    assert!(blobs >= 40, "the test needs many files; {blobs} blob files");
    // 20: RocksDB's table cache (20 − 10) plus its log, lock, manifest and info log
    let open = open_under(&path);
    assert!(
        open.len() <= 20,
        "{} descriptors open for {blobs} blob files: {open:?}",
        open.len()
    );
}
