//! The host tier on moka's TinyLFU (`PolicyKind::TinyLfu`): a popular object outlives a
//! scan of one-off objects that flushes it out under LRU; objects moka evicts while pinned
//! or leased stay readable outside its eviction and leave once unprotected; bytes stay
//! within capacity.

mod common;

use std::sync::Arc;

use common::{layout, object};
use kvquilt_kvstore::{HostTier, KvDType, KvObject, Pin, Pins, PolicyKind, Tier};

fn obj(i: u64) -> Arc<KvObject> {
    Arc::new(object(i, 32, layout(KvDType::F32, 4)))
}

fn one() -> u64 {
    obj(0).raw_len()
}

/// Object 1 read often, then 40 one-off objects through a tier of 4 objects.
async fn popular_then_scan(policy: PolicyKind) -> bool {
    let tier = HostTier::new(4 * one(), policy, Pins::default());
    tier.put(obj(1), 1.0).await.unwrap();
    for _ in 0..8 {
        assert!(tier.get(obj(1).key()).await.unwrap().is_some());
    }
    for i in 100..140 {
        tier.put(obj(i), 1.0).await.unwrap();
        let s = tier.stats();
        assert!(s.used_bytes <= s.capacity_bytes, "{policy:?}: {s:?}");
    }
    tier.contains(obj(1).key())
}

#[tokio::test]
async fn a_popular_object_outlives_a_scan_of_one_offs() {
    assert!(
        !popular_then_scan(PolicyKind::Lru).await,
        "LRU lets the scan flush it"
    );
    assert!(popular_then_scan(PolicyKind::TinyLfu).await);
    let tier = HostTier::new(4 * one(), PolicyKind::TinyLfu, Pins::default());
    for i in 0..12 {
        tier.put(obj(i), 1.0).await.unwrap();
    }
    let s = tier.stats();
    assert!(s.extra["admission_rejections"] > 0, "{s:?}");
    assert!(s.objects <= 4, "{s:?}");
}

/// Makes `key`'s object frequent in moka's sketch (reads, hits or misses, count), then
/// admits it: it then wins admission over objects read once.
async fn admit_frequent(tier: &HostTier, o: Arc<KvObject>) {
    for _ in 0..6 {
        let _ = tier.get(o.key()).await.unwrap();
    }
    tier.put(o, 1.0).await.unwrap();
}

#[tokio::test]
async fn pinned_and_leased_objects_are_held_outside_its_eviction() {
    let pins = Pins::default();
    let tier = HostTier::new(3 * one(), PolicyKind::TinyLfu, pins.clone());
    let (pinned, leased) = (obj(1), obj(2));
    tier.put(Arc::clone(&pinned), 1.0).await.unwrap();
    tier.put(Arc::clone(&leased), 1.0).await.unwrap();
    pins.set(*pinned.key(), Pin::Hard);
    let lease = tier.lease(leased.key()).expect("held");
    // frequent objects push both out of moka
    for i in 10..16 {
        admit_frequent(&tier, obj(i)).await;
    }
    let s = tier.stats();
    assert_eq!(s.extra["exempt_objects"], 2, "{s:?}");
    for o in [&pinned, &leased] {
        let got = tier.get(o.key()).await.unwrap().expect("still readable");
        assert_eq!(*got, **o);
    }
    assert!(s.used_bytes <= s.capacity_bytes + 2 * one(), "{s:?}");
    // unprotected, they leave at the next admission, handed back for demotion
    drop(lease);
    pins.set(*pinned.key(), Pin::soft(std::time::Duration::ZERO));
    let out = tier.put(obj(20), 1.0).await.unwrap();
    let left: Vec<_> = out
        .evicted
        .iter()
        .map(|(k, copy)| (*k, copy.is_some()))
        .collect();
    assert!(left.contains(&(*pinned.key(), true)), "{left:?}");
    assert!(left.contains(&(*leased.key(), true)), "{left:?}");
    assert!(!tier.contains(pinned.key()) && !tier.contains(leased.key()));
    assert_eq!(tier.stats().extra["exempt_objects"], 0);
}

#[tokio::test]
async fn removal_and_keys_cover_both_maps() {
    let pins = Pins::default();
    let tier = HostTier::new(2 * one(), PolicyKind::TinyLfu, pins.clone());
    let p = obj(1);
    tier.put(Arc::clone(&p), 1.0).await.unwrap();
    pins.set(*p.key(), Pin::Hard);
    for i in 10..14 {
        admit_frequent(&tier, obj(i)).await;
    }
    assert!(tier.keys().contains(p.key()), "an exempt object is listed");
    assert!(tier.remove(p.key()).await.unwrap());
    assert!(!tier.contains(p.key()));
    assert!(!tier.remove(p.key()).await.unwrap());
    // an object larger than the tier is refused by name
    let big = Arc::new(object(99, 32 * 3, layout(KvDType::F32, 4)));
    let e = tier.put(big, 1.0).await.unwrap_err();
    assert!(e.to_string().contains("no room"), "{e}");
}
