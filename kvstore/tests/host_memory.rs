//! The host tier's memory hook: admitted objects are placed in the configured memory
//! (page-locked on a GPU host), reads hand out the placed bytes, objects promoted from the SSD
//! tier are placed too, and a memory that fails to place leaves the object admitted as built.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use kvquilt_kvstore::{HostMemory, KvDType, SsdConfig, StoreConfig, TieredStore};

use common::{layout, object};

const READ_AHEAD: usize = 2;

/// Copies layers into one buffer per object and remembers the buffers' address ranges.
#[derive(Debug, Default)]
struct Arena {
    ranges: parking_lot::Mutex<Vec<(usize, usize)>>,
    placed: AtomicUsize,
    fail: bool,
}

impl HostMemory for Arena {
    fn place(&self, layers: &[Bytes]) -> Result<Vec<Bytes>, String> {
        if self.fail {
            return Err("no page-locked memory left".into());
        }
        let all = Bytes::from(layers.concat());
        self.ranges.lock().push((all.as_ptr() as usize, all.len()));
        self.placed.fetch_add(1, Ordering::Relaxed);
        let mut at = 0;
        Ok(layers
            .iter()
            .map(|l| {
                at += l.len();
                all.slice(at - l.len()..at)
            })
            .collect())
    }

    fn holds(&self, bytes: &Bytes) -> bool {
        let p = bytes.as_ptr() as usize;
        self.ranges
            .lock()
            .iter()
            .any(|&(a, n)| p >= a && p + bytes.len() <= a + n)
    }
}

#[tokio::test]
async fn admitted_objects_live_in_the_tier_memory() {
    let store = Arc::new(TieredStore::open(StoreConfig::host_only(1 << 20)).unwrap());
    let arena = Arc::new(Arena::default());
    assert!(store.set_host_memory(arena.clone()));
    assert!(
        !store.set_host_memory(Arc::new(Arena::default())),
        "set once"
    );
    let lay = layout(KvDType::F16, 3);
    let obj = object(1, 5, lay);
    store.put(obj.clone(), 0.0).await.unwrap();
    assert_eq!(arena.placed.load(Ordering::Relaxed), 1);
    let (got, _) = store.get(obj.key()).await.unwrap().unwrap();
    for l in 0..3 {
        assert_eq!(got.layer(l), obj.layer(l), "same contents");
        assert!(arena.holds(got.layer(l)), "layer {l} read from the arena");
        assert!(!arena.holds(obj.layer(l)));
    }
    let mut stream = store
        .read_layers(obj.key(), READ_AHEAD)
        .await
        .unwrap()
        .unwrap();
    let first = stream.next().await.unwrap().unwrap();
    assert!(
        arena.holds(&first),
        "streamed layers come from the arena too"
    );
}

#[tokio::test]
async fn promoted_objects_are_placed() {
    let dir = tempfile::tempdir().unwrap();
    let lay = layout(KvDType::BF16, 2);
    let obj = object(2, 7, lay);
    {
        let store = TieredStore::open(StoreConfig::with_ssd(
            1 << 20,
            SsdConfig::new(dir.path(), 1 << 24),
        ))
        .unwrap();
        store.put(obj.clone(), 0.0).await.unwrap();
    }
    // a fresh process: the object is only on the SSD until a hit promotes it
    let store = TieredStore::open(StoreConfig::with_ssd(
        1 << 20,
        SsdConfig::new(dir.path(), 1 << 24),
    ))
    .unwrap();
    let arena = Arc::new(Arena::default());
    store.set_host_memory(arena.clone());
    store.get(obj.key()).await.unwrap().unwrap();
    let (got, _) = store.get(obj.key()).await.unwrap().unwrap();
    assert_eq!(arena.placed.load(Ordering::Relaxed), 1);
    assert!(arena.holds(got.layer(1)));
    assert_eq!(got.layer(1), obj.layer(1));
}

#[tokio::test]
async fn a_memory_that_cannot_place_leaves_the_object_admitted() {
    let store = TieredStore::open(StoreConfig::host_only(1 << 20)).unwrap();
    store.set_host_memory(Arc::new(Arena {
        fail: true,
        ..Arena::default()
    }));
    let obj = object(3, 4, layout(KvDType::F32, 2));
    store.put(obj.clone(), 0.0).await.unwrap();
    let (got, _) = store.get(obj.key()).await.unwrap().unwrap();
    assert_eq!(got.layer(0), obj.layer(0));
}

/// A host tier holding objects encoded places their records in its memory too, and a stream
/// asked to keep the codec hands those placed records over as stored (verified): on a GPU
/// host they cross to the device by DMA and are dequantised there.
#[tokio::test]
async fn encoded_records_are_placed_and_handed_over_as_stored() {
    use kvquilt_kvstore::{Codec, StreamLayer};
    let int8 = Codec::Int8 {
        lz4: false,
        group: 0,
        zero_point: true,
    };
    let config = StoreConfig {
        host_codec: int8,
        ..StoreConfig::host_only(1 << 20)
    };
    let store = Arc::new(TieredStore::open(config).unwrap());
    let arena = Arc::new(Arena::default());
    assert!(store.set_host_memory(arena.clone()));
    let lay = layout(KvDType::BF16, 3);
    let obj = common::sane(&object(2, 9, lay), 2);
    store.put(obj.clone(), 0.0).await.unwrap();
    assert_eq!(
        arena.placed.load(Ordering::Relaxed),
        1,
        "the records were placed"
    );
    let mut kept = store
        .read_layers_keeping(obj.key(), READ_AHEAD, |c| c.has_scaled8())
        .await
        .unwrap()
        .unwrap();
    let mut decoded = store
        .read_layers(obj.key(), READ_AHEAD)
        .await
        .unwrap()
        .unwrap();
    for l in 0..3 {
        let layer = kept.next_layer().await.unwrap().unwrap();
        let StreamLayer::Encoded { codec, record } = &layer else {
            panic!("layer {l} was decoded: {layer:?}");
        };
        assert_eq!(*codec, int8);
        assert!(
            arena.holds(record),
            "layer {l}'s record comes from the arena"
        );
        assert!(
            record.len() < obj.layer(l).len(),
            "smaller than the decoded layer"
        );
        let want = decoded.next().await.unwrap().unwrap();
        assert_eq!(layer.decoded(&lay, 9).unwrap(), want, "layer {l}");
    }
    assert!(kept.next_layer().await.is_none());
}

/// Places records with one byte flipped: memory that went bad under an encoded object.
#[derive(Debug)]
struct Flipping;

impl HostMemory for Flipping {
    fn place(&self, layers: &[Bytes]) -> Result<Vec<Bytes>, String> {
        Ok(layers
            .iter()
            .map(|l| {
                let mut v = l.to_vec();
                let mid = v.len() / 2;
                if let Some(b) = v.get_mut(mid) {
                    *b ^= 0x40;
                }
                Bytes::from(v)
            })
            .collect())
    }

    fn holds(&self, _bytes: &Bytes) -> bool {
        false
    }
}

/// An encoded host-tier object that no longer decodes is a miss, counted and dropped, and
/// the store serves the object from the SSD tier (it was once an error for the whole read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoded_object_gone_bad_in_memory_is_a_miss_served_from_below() {
    let dir = tempfile::tempdir().unwrap();
    let s = TieredStore::open(StoreConfig {
        host_codec: kvquilt_kvstore::Codec::Lz4,
        ..StoreConfig::with_ssd(1 << 30, SsdConfig::new(dir.path(), 1 << 30))
    })
    .unwrap();
    assert!(s.set_host_memory(Arc::new(Flipping)));
    let o = object(5, 64, layout(KvDType::F32, 3));
    s.put(o.clone(), 1.0).await.unwrap();
    let host = &s.tiers()[0];
    assert!(
        host.get(o.key()).await.unwrap().is_none(),
        "a miss, not an error"
    );
    assert_eq!(host.stats().checksum_failures, 1);
    assert!(host.get(o.key()).await.unwrap().is_none(), "dropped");
    let (got, tier) = s.get(o.key()).await.unwrap().expect("served from below");
    assert_eq!(tier.name(), "ssd");
    assert!(*got == o, "the exact object");
}
