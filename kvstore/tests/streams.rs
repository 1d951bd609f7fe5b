//! Layer streams ([`TieredStore::read_layers`]) against what happens to their object while
//! they are open: a removal (a `DELETE`, an eviction) and a record corrupted on disk.

mod common;

use std::sync::Arc;

use common::{layout, object};
use kvquilt_kvstore::{
    KvDType, KvObject, SsdConfig, StoreConfig, StoreError, TierKind, TieredStore,
};

/// A host tier over an SSD tier at `dir`, or a host tier alone.
fn store(dir: &std::path::Path, ssd: bool) -> Arc<TieredStore> {
    let config = if ssd {
        StoreConfig::with_ssd(1 << 30, SsdConfig::new(dir, 1 << 30))
    } else {
        StoreConfig::host_only(1 << 30)
    };
    Arc::new(TieredStore::open(config).unwrap())
}

/// Stores `obj`, then (with an SSD tier) drops the host tier's copy: reads go to the disk.
async fn put(s: &TieredStore, obj: &KvObject) {
    s.put(obj.clone(), 1.0).await.unwrap();
    if s.tiers().len() > 1 {
        assert!(s.tiers()[0].remove(obj.key()).await.unwrap());
    }
}

/// Removing an object after its stream opened (and one layer was read) does not take the
/// rest of its layers away from that stream; a new read is a miss. Before streams read
/// through a consistent view, this was `lost layer N mid-read` (issue 16, defect 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_object_stays_readable_by_an_open_stream() {
    for ssd in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), ssd);
        let obj = object(3, 40, layout(KvDType::F32, 6));
        put(&s, &obj).await;
        let want = if ssd { TierKind::SSD } else { TierKind::HOST };
        assert_eq!(s.locate(obj.key()), Some(want));
        // read-ahead 1: most layers are still unread when the object is removed
        let mut stream = s.read_layers(obj.key(), 1).await.unwrap().unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap(), obj.layer(0));
        assert!(s.remove(obj.key()).await.unwrap(), "removed ({want:?})");
        assert!(s.read_layers(obj.key(), 1).await.unwrap().is_none());
        for l in 1..6 {
            let got = stream.next().await.unwrap();
            assert_eq!(
                got.unwrap(),
                obj.layer(l),
                "layer {l} after removal ({want:?})"
            );
        }
        assert!(stream.next().await.is_none());
        assert_eq!(s.locate(obj.key()), None, "the removal stands");
    }
}

/// A record corrupted on disk: the stream yields the layers before it, then an error naming
/// the object; the tier drops the object (a later read is a miss) and keeps the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_ends_the_stream_with_an_error_and_drops_the_object() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        object(4, 30, layout(KvDType::F16, 5)),
        object(5, 30, layout(KvDType::F16, 5)),
    );
    {
        let s = store(dir.path(), true);
        put(&s, &a).await;
        put(&s, &b).await;
        s.flush().await.unwrap();
    }
    common::corrupt_ssd_record(dir.path(), a.key(), 3);
    let s = store(dir.path(), true);
    let mut stream = s.read_layers(a.key(), 1).await.unwrap().unwrap();
    for l in 0..3 {
        assert_eq!(stream.next().await.unwrap().unwrap(), a.layer(l));
    }
    let err = stream.next().await.unwrap().unwrap_err();
    assert!(matches!(err, StoreError::Checksum { .. }), "{err}");
    assert!(err.to_string().contains(&a.key().to_string()), "{err}");
    assert!(
        stream.next().await.is_none(),
        "the stream stops after an error"
    );
    assert_eq!(s.locate(a.key()), None, "the corrupt object was dropped");
    assert!(s.read_layers(a.key(), 1).await.unwrap().is_none());
    let got = s.get(b.key()).await.unwrap().unwrap().0;
    assert_eq!(*got, b, "the other object is untouched");
}

/// A tier over a host tier under another name whose puts wait for `gate` (when given): a
/// slow copy into a faster tier, as an SSD write of what a promotion evicts is. Counts the
/// puts it was asked for.
struct Gated {
    inner: kvquilt_kvstore::HostTier,
    kind: TierKind,
    gate: Option<Arc<tokio::sync::Semaphore>>,
    puts: std::sync::atomic::AtomicUsize,
}

impl Gated {
    fn new(name: &'static str, gate: Option<Arc<tokio::sync::Semaphore>>) -> Arc<Self> {
        let inner = kvquilt_kvstore::HostTier::new(
            1 << 30,
            kvquilt_kvstore::PolicyKind::Lru,
            kvquilt_kvstore::Pins::default(),
        );
        Arc::new(Self {
            inner,
            kind: TierKind::new(name),
            gate,
            puts: std::sync::atomic::AtomicUsize::new(0),
        })
    }
}

#[async_trait::async_trait]
impl kvquilt_kvstore::Tier for Gated {
    fn kind(&self) -> TierKind {
        self.kind
    }
    fn contains(&self, key: &kvquilt_kvstore::ChunkKey) -> bool {
        self.inner.contains(key)
    }
    fn keys(&self) -> Vec<kvquilt_kvstore::ChunkKey> {
        self.inner.keys()
    }
    async fn info(
        &self,
        key: &kvquilt_kvstore::ChunkKey,
    ) -> kvquilt_kvstore::Result<Option<Arc<kvquilt_kvstore::ObjectInfo>>> {
        self.inner.info(key).await
    }
    async fn reader(
        &self,
        key: &kvquilt_kvstore::ChunkKey,
    ) -> kvquilt_kvstore::Result<Option<Box<dyn kvquilt_kvstore::LayerReader>>> {
        self.inner.reader(key).await
    }
    async fn get(
        &self,
        key: &kvquilt_kvstore::ChunkKey,
    ) -> kvquilt_kvstore::Result<Option<Arc<KvObject>>> {
        self.inner.get(key).await
    }
    async fn put(
        &self,
        obj: Arc<KvObject>,
        cost_s: f64,
    ) -> kvquilt_kvstore::Result<kvquilt_kvstore::PutOutcome> {
        self.puts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            let _pass = gate.acquire().await;
        }
        self.inner.put(obj, cost_s).await
    }
    async fn remove(&self, key: &kvquilt_kvstore::ChunkKey) -> kvquilt_kvstore::Result<bool> {
        self.inner.remove(key).await
    }
    fn lease(&self, key: &kvquilt_kvstore::ChunkKey) -> Option<kvquilt_kvstore::Lease> {
        self.inner.lease(key)
    }
    fn stats(&self) -> kvquilt_kvstore::TierStatsSnapshot {
        self.inner.stats()
    }
}

/// Waits (up to 30 s, else fails) until the fastest tier of `s` holds `key`: a promotion
/// spawned after a read has landed.
async fn promoted_to_host(s: &TieredStore, key: &kvquilt_kvstore::ChunkKey) {
    let landed = async {
        while !s.tiers()[0].contains(key) {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), landed)
        .await
        .expect("the promotion never reached the host tier");
}

/// A hit in a slow tier returns from `get_promoting_later` while its promotion into the
/// faster tiers is still held up (a gate closed on the middle tier's puts), and the promotion
/// lands once the gate opens; `get` waits for the promotion (it cannot return with the gate
/// closed). The prefix path reads its links this way, so a link's stall deadline covers the
/// read alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hits_promotion_does_not_hold_up_its_read() {
    use std::time::Duration;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let far = Gated::new("far", None);
    let s = Arc::new(
        TieredStore::builder(StoreConfig::host_only(1 << 30))
            .unwrap()
            .tier(Gated::new("middle", Some(Arc::clone(&gate))))
            .tier(far.clone())
            .build(),
    );
    let obj = object(5, 24, layout(KvDType::F32, 4));
    kvquilt_kvstore::Tier::put(far.as_ref(), Arc::new(obj.clone()), 1.0)
        .await
        .unwrap();
    assert_eq!(s.locate(obj.key()), Some(TierKind::new("far")));

    // `get` promotes first: with the middle tier's puts held, it does not return
    let waited = tokio::time::timeout(Duration::from_millis(200), s.get(obj.key())).await;
    assert!(
        waited.is_err(),
        "get returned before its promotion could land"
    );

    let (got, tier) =
        tokio::time::timeout(Duration::from_secs(30), s.get_promoting_later(obj.key()))
            .await
            .expect("the read waited for its promotion")
            .unwrap()
            .unwrap();
    assert_eq!(tier, TierKind::new("far"));
    assert_eq!(got.layer(2), obj.layer(2));
    assert!(
        !s.tiers()[0].contains(obj.key()),
        "promoted past a closed gate"
    );

    gate.add_permits(16);
    promoted_to_host(&s, obj.key()).await;
    assert_eq!(s.locate(obj.key()), Some(TierKind::HOST));
}

/// Eight concurrent hits on one key in a slow tier make one promotion: while the first hit's
/// copy into the middle tier waits at a closed gate, the others return without starting
/// their own; once it lands the claim is freed, and a later hit (the faster copies removed)
/// promotes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_hits_promote_once() {
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let middle = Gated::new("middle", Some(Arc::clone(&gate)));
    let far = Gated::new("far", None);
    let s = Arc::new(
        TieredStore::builder(StoreConfig::host_only(1 << 30))
            .unwrap()
            .tier(middle.clone())
            .tier(far.clone())
            .build(),
    );
    let obj = object(6, 24, layout(KvDType::F32, 4));
    kvquilt_kvstore::Tier::put(far.as_ref(), Arc::new(obj.clone()), 1.0)
        .await
        .unwrap();
    let hits = (0..8).map(|_| {
        let s = Arc::clone(&s);
        let key = *obj.key();
        tokio::spawn(async move { s.get_promoting_later(&key).await })
    });
    for hit in futures_util::future::join_all(hits).await {
        let (got, tier) = hit.unwrap().unwrap().unwrap();
        assert_eq!(tier, TierKind::new("far"));
        assert_eq!(got.layer(1), obj.layer(1));
    }
    // the first promotion's put may still be on its way to the gate
    let asked = async {
        while middle.puts.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), asked)
        .await
        .expect("no promotion started");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        middle.puts.load(Ordering::SeqCst),
        1,
        "one promotion for eight hits"
    );

    gate.add_permits(64);
    promoted_to_host(&s, obj.key()).await;
    assert_eq!(middle.puts.load(Ordering::SeqCst), 1);

    // the claim was freed: with the faster copies gone, the next hit promotes again
    for t in &s.tiers()[..2] {
        assert!(t.remove(obj.key()).await.unwrap());
    }
    let again = async {
        loop {
            s.get_promoting_later(obj.key()).await.unwrap().unwrap();
            if s.tiers()[0].contains(obj.key()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), again)
        .await
        .expect("a later hit never promoted");
    assert!(middle.puts.load(Ordering::SeqCst) >= 2);
}
