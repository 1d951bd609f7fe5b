//! A data directory that cannot be written (issue 16, fault injection): a store shipped on a
//! read-only volume, or a filesystem remounted read-only. The SSD tier opens it with
//! RocksDB's read-only mode and serves what it holds; new objects stay in the host tier
//! (`writes_durable` and `held_durably` say so); deletes of what it holds are refused with
//! a clear error; nothing wrong is served. On a real tmpfs, remounted read-only.

mod common;

use std::path::Path;

use common::{Tmpfs, layout, object};
use kvquilt_kvstore::{
    KvDType, KvObject, Pin, SsdConfig, StoreConfig, StoreError, TieredStore, WritePolicy,
};

fn store(dir: &Path) -> kvquilt_kvstore::Result<TieredStore> {
    TieredStore::open(StoreConfig::with_ssd(1 << 30, SsdConfig::new(dir, 1 << 30)))
}

fn obj(i: u64) -> KvObject {
    object(i, 64, layout(KvDType::F32, 4))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_directory_is_served_and_new_objects_stay_in_memory() {
    let Some(fs) = Tmpfs::new(256 << 20) else {
        eprintln!("tmpfs mount not permitted here");
        return;
    };
    let db = fs.path.join("db");
    {
        let s = store(&db).unwrap();
        for i in 0..3 {
            s.put(obj(i), 1.0).await.unwrap();
        }
        s.flush().await.unwrap();
        assert!(s.writes_durable());
    }
    assert!(fs.set_read_only(true), "remount read-only");
    let s = store(&db).expect("a read-only store opens");
    assert!(!s.writes_durable());
    let ssd = s.stats().into_iter().find(|t| t.tier == "ssd").unwrap();
    assert_eq!(ssd.extra.get("read_only"), Some(&1));
    assert_eq!(ssd.objects, 3);
    // what it holds is served, byte for byte, and durably held
    for i in 0..3 {
        let (got, tier) = s.get(obj(i).key()).await.unwrap().expect("held");
        assert_eq!(*got, obj(i));
        assert_eq!(tier.name(), "ssd");
        assert!(s.held_durably(obj(i).key()));
    }
    // a new object is acknowledged in memory only, and says so
    s.put(obj(7), 1.0).await.unwrap();
    assert!(s.get(obj(7).key()).await.unwrap().is_some());
    assert!(!s.held_durably(obj(7).key()));
    // deleting what the read-only tier holds is refused by name; a memory-only one goes
    let e = s.remove(obj(0).key()).await.unwrap_err();
    assert!(matches!(e, StoreError::ReadOnly { .. }), "{e}");
    assert!(e.to_string().contains("read-only"), "{e}");
    assert!(s.get(obj(0).key()).await.unwrap().is_some());
    // a pin the read-only tier cannot keep is refused and leaves the pin as it was (it was
    // once left in force in memory behind the error); a memory-only object's pin holds
    let e = s.pin(obj(1).key(), Pin::Hard).await.unwrap_err();
    assert!(matches!(e, StoreError::ReadOnly { .. }), "{e}");
    assert_eq!(s.pins().get(obj(1).key()), None);
    s.pin(obj(7).key(), Pin::Hard).await.unwrap();
    assert_eq!(s.pins().get(obj(7).key()), Some(Pin::Hard));
    assert!(s.remove(obj(7).key()).await.unwrap());
    s.flush()
        .await
        .expect("a flush of a read-only store is a no-op");
    drop(s);
    // write-back over the read-only tier: a new object stays in memory and a flush is still
    // no error (it once wrote every dirty object to the read-only tier and failed each time)
    let s = TieredStore::open(StoreConfig {
        write: WritePolicy::WriteBack,
        ..StoreConfig::with_ssd(1 << 30, SsdConfig::new(&db, 1 << 30))
    })
    .expect("a read-only store opens for write-back too");
    s.put(obj(9), 1.0).await.unwrap();
    s.flush()
        .await
        .expect("a write-back flush over a read-only tier");
    assert!(s.get(obj(9).key()).await.unwrap().is_some());
    assert!(!s.held_durably(obj(9).key()));
    drop(s);

    // writable again: the next open writes, and what was held is still there
    assert!(fs.set_read_only(false));
    let s = store(&db).unwrap();
    assert!(s.writes_durable());
    s.put(obj(8), 1.0).await.unwrap();
    assert!(s.held_durably(obj(8).key()));
    assert!(s.get(obj(2).key()).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_created_is_a_clear_error() {
    let Some(fs) = Tmpfs::new(8 << 20) else {
        eprintln!("tmpfs mount not permitted here");
        return;
    };
    assert!(fs.set_read_only(true));
    let Err(e) = store(&fs.path.join("db")) else {
        panic!("a store opened where nothing can be created");
    };
    assert!(matches!(e, StoreError::ReadOnly { .. }), "{e}");
    assert!(e.to_string().contains("read-only"), "{e}");
}
