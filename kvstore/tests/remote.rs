//! The remote tier against a real 6-node Redis Cluster (scripts/redis-cluster.sh): sharing
//! between processes, every way a remote object can be bad, and a remote that is down,
//! paused or failing over. Each test starts its own cluster.

#[path = "support/cluster.rs"]
mod cluster;
mod common;
#[path = "support/proxy.rs"]
mod proxy;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::Cluster;
use common::{layout, object};
use kvquilt_kvstore::tier::remote::{BreakerState, NAMING_VERSION, ObjectNames, namespace_hash};
use kvquilt_kvstore::{
    Codec, KvDType, KvLayout, KvObject, RecordLayout, RemoteConfig, RemoteTier, SsdConfig,
    StoreConfig, Tier, TierKind, TieredStore, WritePolicy,
};

/// Small stripes, so that every record spans several values; a short breaker; patient
/// deadlines (2–5 s a call): with six `redis-server`s per test on a 2-core CI host, one reply
/// can take longer than the default 100 ms floor, and a test not about deadlines must not
/// see it as a timeout (a miss, a counted timeout, a step toward opening the breaker).
fn config() -> RemoteConfig {
    RemoteConfig {
        stripe_bytes: 1000,
        op_timeout_min: Duration::from_secs(2),
        op_timeout_max: Duration::from_secs(5),
        breaker_open: Duration::from_millis(500),
        negative_ttl: Duration::from_millis(200),
        ..RemoteConfig::default()
    }
}

/// [`config`] with short deadlines (the default floor, 500 ms at most): for the tests of
/// a primary that stops answering, which check that each call is bounded by them.
fn short_deadlines() -> RemoteConfig {
    RemoteConfig {
        op_timeout_min: RemoteConfig::default().op_timeout_min,
        op_timeout_max: Duration::from_millis(500),
        ..config()
    }
}

/// A layout of `layers` layers whose records are ~2.5 stripes at 40 tokens.
fn lay(layers: u32) -> KvLayout {
    layout(KvDType::F32, layers)
}

/// A remote tier on `c` (a separate client: another process as far as the cluster knows).
fn tier(c: &Cluster, config: RemoteConfig) -> RemoteTier {
    RemoteTier::redis(config, &c.seeds, &[]).unwrap()
}

async fn put(t: &RemoteTier, obj: &KvObject) {
    t.put(Arc::new(obj.clone()), 1.0).await.unwrap();
    assert!(t.drain(Duration::from_secs(10)).await, "write drained");
}

/// Every layer of `key` read through `t`'s reader.
async fn read_all(t: &RemoteTier, obj: &KvObject) -> Option<Vec<bytes::Bytes>> {
    let mut r = t.reader(obj.key()).await.unwrap()?;
    let mut out = Vec::new();
    for l in 0..obj.num_layers() {
        match r.layer(l).await {
            Ok(b) => out.push(b),
            Err(_) => return None,
        }
    }
    Some(out)
}

fn header_key(obj: &KvObject) -> String {
    ObjectNames::new(&namespace_hash("default"), obj.key()).header()
}

/// Every key of `obj` on the cluster (header and stripes, in either record layout).
fn object_keys(c: &Cluster, obj: &KvObject) -> Vec<String> {
    c.keys(&format!(
        "kvq:{NAMING_VERSION}:{{{}:{}*",
        namespace_hash("default"),
        obj.key()
    ))
}

/// The hash tag of a key.
fn tag(k: &str) -> &str {
    &k[k.find('{').unwrap()..=k.find('}').unwrap()]
}

fn extra(t: &RemoteTier, name: &str) -> u64 {
    t.stats().extra.get(name).copied().unwrap_or(0)
}

/// One sidecar stores, another (its own client) hits and reads the same verified bytes; a
/// store stacked on it streams the object and promotes it into its host tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_stores_another_hits() {
    let c = Cluster::start();
    let (a, b) = (tier(&c, config()), tier(&c, config()));
    let obj = object(1, 40, lay(6));
    assert!(!b.probe(obj.key()).await, "not there yet");
    // a remote that was asked and lacked it counts a miss (found by a probe: the remote's
    // miss counter stayed 0 while requests missed)
    assert_eq!(b.stats().misses, 1);
    put(&a, &obj).await;
    assert!(a.contains(obj.key()), "the writer knows");
    tokio::time::sleep(Duration::from_millis(250)).await; // b's negative entry expires
    assert!(b.probe(obj.key()).await, "the other process finds it");
    let layers = read_all(&b, &obj).await.expect("a hit");
    assert_eq!(layers, obj.layers());
    let whole = b.get(obj.key()).await.unwrap().unwrap();
    assert_eq!(whole.layers(), obj.layers());
    // the record keys are striped: 40 tokens × 2 heads × 8 dims × 4 B × 2 = 5120 B per layer
    let keys = object_keys(&c, &obj);
    assert_eq!(
        keys.len(),
        1 + 6 * 6,
        "header + 6 stripes per layer: {keys:?}"
    );
    // per layer (the default): each layer's stripes under a tag of their own, and the layers
    // of this object on more than one primary
    let tags: std::collections::BTreeSet<&str> = keys.iter().map(|k| tag(k)).collect();
    assert_eq!(tags.len(), 1 + 6, "{tags:?}");
    let primaries: std::collections::BTreeSet<u16> = keys.iter().map(|k| c.primary_of(k)).collect();
    assert!(primaries.len() > 1, "{primaries:?}");

    let store = Arc::new(
        TieredStore::builder(StoreConfig::host_only(1 << 30))
            .unwrap()
            .tier(Arc::new(tier(&c, config())))
            .build(),
    );
    assert_eq!(store.locate(obj.key()), None);
    assert_eq!(
        store.probe(&[*obj.key()]).await,
        vec![Some(TierKind::REMOTE)]
    );
    let mut s = store.read_layers(obj.key(), 2).await.unwrap().unwrap();
    assert_eq!(s.tier, TierKind::REMOTE);
    for l in 0..6 {
        assert_eq!(s.next().await.unwrap().unwrap(), obj.layer(l));
    }
    assert!(s.next().await.is_none());
    for _ in 0..100 {
        if store.locate(obj.key()) == Some(TierKind::HOST) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(store.locate(obj.key()), Some(TierKind::HOST), "promoted");
    // a store's put reaches the remote off the request path
    let other = object(2, 40, lay(6));
    store.put(other.clone(), 1.0).await.unwrap();
    store.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(read_all(&b, &other).await.unwrap(), other.layers());
    // removing through the store unlinks every remote key
    assert!(store.remove(other.key()).await.unwrap());
    let left = object_keys(&c, &other);
    assert!(left.is_empty(), "{left:?}");
}

/// A link of a prefix chain keeps its chain (object format v6) through every tier and every
/// way an object is read back: the remote's header and whole-object read, a layer stream
/// promoted into the host tier, a whole read promoted, and the SSD tier. (The whole-object
/// read and the stream's promotion once rebuilt objects without it: a page read from the
/// remote then came back as nobody's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_keeps_its_chain_through_every_tier() {
    use kvquilt_kvstore::{ChainLink, ChunkKey};
    let c = Cluster::start();
    let a = tier(&c, config());
    let plain = object(3, 40, lay(3));
    let link = ChainLink {
        root: ChunkKey([5; 32]),
        parent: ChunkKey([6; 32]),
    };
    let linked = |obj: &KvObject| {
        KvObject::new(
            link.key(obj.tokens()),
            *obj.layout(),
            obj.tokens().to_vec(),
            obj.layers().to_vec(),
            None,
        )
        .unwrap()
        .with_chain(link)
        .unwrap()
    };
    let obj = linked(&plain);
    put(&a, &obj).await;
    let b = tier(&c, config());
    assert_eq!(b.info(obj.key()).await.unwrap().unwrap().chain, Some(link));
    assert_eq!(
        b.get(obj.key()).await.unwrap().unwrap().info().chain,
        Some(link)
    );
    // a stream from the remote, promoted into the host tier
    let dir = tempfile::tempdir().unwrap();
    let ssd = SsdConfig::new(dir.path(), 1 << 30);
    let store = Arc::new(
        TieredStore::builder(StoreConfig::with_ssd(1 << 30, ssd))
            .unwrap()
            .tier(Arc::new(tier(&c, config())))
            .build(),
    );
    let mut s = store.read_layers(obj.key(), 2).await.unwrap().unwrap();
    while s.next().await.is_some() {}
    let mut promoted = None;
    for _ in 0..200 {
        promoted = store.locate(obj.key());
        if promoted != Some(TierKind::REMOTE) && promoted.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        matches!(promoted, Some(TierKind::HOST | TierKind::SSD)),
        "{promoted:?}"
    );
    for t in store.tiers() {
        if let Some(info) = t.info(obj.key()).await.unwrap() {
            assert_eq!(info.chain, Some(link), "{}", t.kind());
        }
    }
    // a whole read promoted (`get_promoting_later`), on another store over the remote
    let other = linked(&object(4, 40, lay(3)));
    put(&a, &other).await;
    let dir2 = tempfile::tempdir().unwrap();
    let store2 = Arc::new(
        TieredStore::builder(StoreConfig::with_ssd(
            1 << 30,
            SsdConfig::new(dir2.path(), 1 << 30),
        ))
        .unwrap()
        .tier(Arc::new(tier(&c, config())))
        .build(),
    );
    let (got, _) = store2
        .get_promoting_later(other.key())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.info().chain, Some(link));
    for _ in 0..200 {
        if store2.locate(other.key()) == Some(TierKind::HOST) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let found = store2.lookup(other.key()).await.unwrap().unwrap();
    assert_ne!(found.tier, TierKind::REMOTE, "promoted");
    assert_eq!(found.info.chain, Some(link));
}

/// In one shard, an object's keys share the header's tag; a reader configured per layer
/// reads it (the envelope, not the reader's setting, says where records are), and the
/// other way round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_follow_the_writers_record_layout() {
    let c = Cluster::start();
    let one_shard = RemoteConfig {
        layout: RecordLayout::OneShard,
        ..config()
    };
    let (a, b) = (tier(&c, one_shard.clone()), tier(&c, config()));
    let obj = object(1, 40, lay(6));
    put(&a, &obj).await;
    let keys = object_keys(&c, &obj);
    assert_eq!(keys.len(), 1 + 6 * 6, "{keys:?}");
    assert!(
        keys.iter().all(|k| tag(k) == tag(&header_key(&obj))),
        "{keys:?}"
    );
    assert_eq!(read_all(&b, &obj).await.as_deref(), Some(obj.layers()));
    let other = object(2, 40, lay(6));
    put(&b, &other).await;
    assert_eq!(read_all(&a, &other).await.as_deref(), Some(other.layers()));
    assert!(a.remove(other.key()).await.unwrap(), "removed across tags");
    assert!(object_keys(&c, &other).is_empty());
}

/// Each way a remote object can be bad is a counted miss, unlinks the object, and a new put
/// restores it: a flipped byte in a stripe, another object's stripe copied in, a deleted
/// stripe, a truncated header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_remote_objects_are_counted_misses_and_unlinked() {
    let c = Cluster::start();
    let t = tier(&c, config());
    let donor = object(99, 40, lay(4));
    put(&t, &donor).await;
    let donor_stripe = {
        let k = c.keys(&format!("*{}*:l1:0", donor.key()));
        assert_eq!(k.len(), 1, "{k:?}");
        let key = k[0].clone();
        c.on_primary(&key, |conn| {
            redis::cmd("GET").arg(&key).query::<Vec<u8>>(conn).unwrap()
        })
    };
    type Damage = Box<dyn Fn(&Cluster, &KvObject)>;
    let stripe_of = |c: &Cluster, o: &KvObject| c.keys(&format!("*{}*:l2:1", o.key()))[0].clone();
    let cases: Vec<(&str, Damage)> = vec![
        (
            "flipped byte",
            Box::new(move |c: &Cluster, o: &KvObject| {
                let k = stripe_of(c, o);
                c.on_primary(&k, |conn| {
                    let mut v: Vec<u8> = redis::cmd("GET").arg(&k).query(conn).unwrap();
                    v[10] ^= 0xff;
                    let _: () = redis::cmd("SET").arg(&k).arg(v).query(conn).unwrap();
                });
            }),
        ),
        (
            "another object's stripe",
            Box::new(move |c: &Cluster, o: &KvObject| {
                let k = stripe_of(c, o);
                let v = donor_stripe.clone();
                c.on_primary(&k, |conn| {
                    let _: () = redis::cmd("SET").arg(&k).arg(v).query(conn).unwrap();
                });
            }),
        ),
        (
            "deleted stripe",
            Box::new(move |c: &Cluster, o: &KvObject| {
                let k = stripe_of(c, o);
                c.on_primary(&k, |conn| {
                    let _: () = redis::cmd("DEL").arg(&k).query(conn).unwrap();
                });
            }),
        ),
        (
            "truncated header",
            Box::new(|c: &Cluster, o: &KvObject| {
                let k = header_key(o);
                c.on_primary(&k, |conn| {
                    let mut v: Vec<u8> = redis::cmd("GET").arg(&k).query(conn).unwrap();
                    v.truncate(v.len() - 7);
                    let _: () = redis::cmd("SET").arg(&k).arg(v).query(conn).unwrap();
                });
            }),
        ),
    ];
    for (i, (what, damage)) in cases.iter().enumerate() {
        let obj = object(10 + i as u64, 40, lay(4));
        put(&t, &obj).await;
        damage(&c, &obj);
        let before = t.stats();
        let (checksums, partial) = (before.checksum_failures, extra(&t, "partial_reads"));
        assert!(
            read_all(&t, &obj).await.is_none(),
            "{what}: a miss, not data"
        );
        let after = t.stats();
        if *what == "deleted stripe" {
            assert_eq!(extra(&t, "partial_reads"), partial + 1, "{what}");
        } else {
            assert_eq!(after.checksum_failures, checksums + 1, "{what}");
        }
        let left = c.keys(&format!("*{}*", obj.key()));
        let header_left = left.iter().any(|k| k.ends_with(":h"));
        assert!(!header_left, "{what}: header unlinked ({left:?})");
        assert!(
            t.reader(obj.key()).await.unwrap().is_none(),
            "{what}: negative entry"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
        put(&t, &obj).await;
        assert_eq!(
            read_all(&t, &obj).await.as_deref(),
            Some(obj.layers()),
            "{what}: a new put restores it"
        );
    }
    assert_eq!(extra(&t, "timeouts"), 0);
}

/// Two processes writing the same object at once leave one readable, verified object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_of_one_key() {
    let c = Cluster::start();
    let (a, b) = (tier(&c, config()), tier(&c, config()));
    for seed in 0..5 {
        let obj = object(200 + seed, 40, lay(4));
        let (ra, rb) = tokio::join!(put(&a, &obj), put(&b, &obj));
        let _ = (ra, rb);
        assert_eq!(read_all(&a, &obj).await.as_deref(), Some(obj.layers()));
        assert_eq!(read_all(&b, &obj).await.as_deref(), Some(obj.layers()));
    }
    // writers of one key with different encodings: the first header wins; the other write's
    // records, which no header names, are unlinked (they were once left for their TTL while
    // the write counted as a put)
    let obj = object(210, 40, lay(4));
    put(&a, &obj).await;
    let pattern = format!("*{}*", obj.key());
    let mut first = c.keys(&pattern);
    first.sort();
    assert!(first.len() > 4, "header and records: {first:?}");
    let lz4 = tier(
        &c,
        RemoteConfig {
            codec: Codec::Lz4,
            ..config()
        },
    );
    put(&lz4, &obj).await;
    let mut after = c.keys(&pattern);
    after.sort();
    assert_eq!(first, after, "the losing write's records unlinked");
    assert_eq!(lz4.stats().puts, 0, "no object of its own");
    assert_eq!(read_all(&lz4, &obj).await.as_deref(), Some(obj.layers()));
}

/// A removal wins over a write of the same key still in the queue: the write does not
/// commit the object afterwards (it once did, bringing a deleted chunk back for every
/// process), and a put after the removal stores it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_wins_over_a_queued_write() {
    let c = Cluster::start();
    let one_writer = RemoteConfig {
        write_concurrency: 1,
        ..config()
    };
    let a = tier(&c, one_writer);
    // a large object first, so that the small one waits behind it in the queue
    let big = object(300, 2000, lay(8));
    let small = object(301, 40, lay(4));
    a.put(Arc::new(big.clone()), 1.0).await.unwrap();
    a.put(Arc::new(small.clone()), 1.0).await.unwrap();
    assert!(!a.remove(small.key()).await.unwrap(), "not committed yet");
    assert!(a.drain(Duration::from_secs(20)).await, "writes drained");
    let b = tier(&c, config());
    assert!(
        read_all(&b, &small).await.is_none(),
        "removed: never committed after"
    );
    assert_eq!(read_all(&b, &big).await.as_deref(), Some(big.layers()));
    // stored again by a put after the removal
    put(&a, &small).await;
    let d = tier(&c, config());
    assert_eq!(read_all(&d, &small).await.as_deref(), Some(small.layers()));
}

/// Every node down from the start: the tier is created at once, the first calls fail within
/// the connect timeout, the breaker opens, reads are misses and puts are dropped (counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_down_at_start_costs_nothing() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    }; // closed again: connections are refused
    let t0 = Instant::now();
    // the breaker stays open for the whole test: one that half-opened while this thread was
    // descheduled would let the put below through as a probe
    let down = RemoteConfig {
        breaker_open: Duration::from_secs(60),
        ..config()
    };
    let t = RemoteTier::redis(down, &[format!("127.0.0.1:{port}")], &[]).unwrap();
    // (bounds well under one call's 2 s deadline, with room for a busy host)
    assert!(
        t0.elapsed() < Duration::from_millis(250),
        "start-up did not wait"
    );
    let obj = object(3, 40, lay(4));
    let t1 = Instant::now();
    let mut probes = 0;
    while t.breaker() != BreakerState::Open && t1.elapsed() < Duration::from_secs(3) {
        assert!(!t.probe(obj.key()).await);
        probes += 1;
    }
    assert_eq!(t.breaker(), BreakerState::Open, "after {probes} probes");
    let t2 = Instant::now();
    assert!(t.reader(obj.key()).await.unwrap().is_none());
    // the put is refused, not acknowledged: a store with no local room says so
    let e = t.put(Arc::new(obj.clone()), 1.0).await.unwrap_err();
    assert!(e.to_string().contains("marked down"), "{e}");
    assert!(
        t2.elapsed() < Duration::from_millis(250),
        "open breaker: no waiting"
    );
    assert_eq!(extra(&t, "dropped_puts"), 1);
    // a remote-only store (no room in its local tiers) fails the put instead of saying
    // "stored" (found by a probe of remote-only sidecars)
    let remote_only = TieredStore::builder(StoreConfig::host_only(0))
        .unwrap()
        .tier(Arc::new(t.clone()))
        .build();
    let e = remote_only.put(obj.clone(), 1.0).await.unwrap_err();
    assert!(e.to_string().contains("marked down"), "{e}");
    assert_eq!(extra(&t, "dropped_puts"), 2);
    assert!(extra(&t, "breaker_opens") >= 1);
    // write-back: flushing dirty objects past a remote that is down still writes every one
    // of them to the SSD tier and makes it durable (the remote's refusal was once the
    // flush's error: the objects after the first and the tiers' own flushes were skipped)
    let dir = tempfile::tempdir().unwrap();
    let write_back = TieredStore::builder(StoreConfig {
        write: WritePolicy::WriteBack,
        ..StoreConfig::with_ssd(1 << 30, SsdConfig::new(dir.path(), 1 << 30))
    })
    .unwrap()
    .tier(Arc::new(t.clone()))
    .build();
    let objs: Vec<KvObject> = (10..13).map(|s| object(s, 40, lay(4))).collect();
    for o in &objs {
        write_back.put(o.clone(), 1.0).await.unwrap();
    }
    write_back.flush().await.unwrap();
    let ssd = &write_back.tiers()[1];
    assert_eq!(ssd.kind(), TierKind::SSD);
    for o in &objs {
        assert!(
            ssd.get(o.key()).await.unwrap().is_some(),
            "flushed to the SSD"
        );
    }
}

/// A primary paused for 5 s (SIGSTOP), in each record layout: reads of objects with a key
/// on it time out within the deadline and are misses, its shard's breaker opens, nothing
/// hangs, and objects wholly on the other primaries keep hitting; after SIGCONT the shard is
/// probed back and hits resume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_primary_times_out_then_recovers() {
    paused_primary(RecordLayout::PerLayer).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_primary_times_out_then_recovers_one_shard() {
    paused_primary(RecordLayout::OneShard).await;
}

async fn paused_primary(layout: RecordLayout) {
    let c = Cluster::start();
    let t = tier(
        &c,
        RemoteConfig {
            layout,
            ..short_deadlines()
        },
    );
    let obj = object(4, 40, lay(4));
    put(&t, &obj).await;
    assert!(read_all(&t, &obj).await.is_some());
    let port = c.primary_of(&header_key(&obj));
    // an object with no key on that primary: one layer (per layer, the tags of four or more
    // layers fall in every third of the slot space: CRC16 is linear, and layer numbers that
    // differ in their low bits move a tag's slot by multiples of 4,096)
    let mut other = None;
    for seed in 500..600 {
        let o = object(seed, 40, lay(1));
        put(&t, &o).await;
        if object_keys(&c, &o).iter().all(|k| c.primary_of(k) != port) {
            other = Some(o);
            break;
        }
    }
    let other = other.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await; // the tier learns the topology
    c.signal(port, "-STOP");
    let paused = Instant::now();
    let mut slowest = Duration::ZERO;
    while paused.elapsed() < Duration::from_secs(3) {
        let t0 = Instant::now();
        assert!(read_all(&t, &obj).await.is_none(), "paused: a miss");
        slowest = slowest.max(t0.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // (a call's deadline is 500 ms; the pause lasts 5 s)
    assert!(
        slowest <= Duration::from_millis(1500),
        "bounded by the deadline: {slowest:?}"
    );
    assert!(extra(&t, "timeouts") >= 1);
    assert!(extra(&t, "breaker_opens") >= 1);
    assert_eq!(
        extra(&t, "shards_down"),
        1,
        "only the paused primary's shard"
    );
    assert_eq!(
        read_all(&t, &other).await.as_deref(),
        Some(other.layers()),
        "the other primaries serve on"
    );
    let left = Duration::from_secs(5).saturating_sub(paused.elapsed());
    tokio::time::sleep(left).await;
    c.signal(port, "-CONT");
    let resumed = Instant::now();
    let mut back = false;
    while resumed.elapsed() < Duration::from_secs(15) {
        if read_all(&t, &obj).await.as_deref() == Some(obj.layers()) {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "hits resume after SIGCONT");
    assert_eq!(t.breaker(), BreakerState::Closed);
    assert_eq!(extra(&t, "shards_down"), 0);
}

/// A primary killed (SIGKILL): reads fail fast as misses; after the replica takes over,
/// hits resume (the object was replicated before the kill).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_fails_over() {
    let c = Cluster::start();
    let t = tier(&c, short_deadlines());
    let obj = object(5, 40, lay(4));
    put(&t, &obj).await;
    let hk = header_key(&obj);
    let port = c.primary_of(&hk);
    // WAIT covers this connection's writes; replication is one ordered stream, so a marker
    // written on the object's slot and acknowledged means the object is replicated too
    c.on_primary(&hk, |conn| {
        let marker = format!("{hk}:marker");
        let _: () = redis::cmd("SET").arg(&marker).arg(1).query(conn).unwrap();
        let n: i64 = redis::cmd("WAIT").arg(1).arg(1500).query(conn).unwrap();
        assert_eq!(n, 1, "replicated");
    });
    c.signal(port, "-9");
    let killed = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut back = false;
    while killed.elapsed() < Duration::from_secs(20) {
        let t0 = Instant::now();
        let got = read_all(&t, &obj).await;
        slowest = slowest.max(t0.elapsed());
        if got.as_deref() == Some(obj.layers()) {
            back = true;
            break;
        }
        assert!(got.is_none());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "hits resume after failover");
    assert!(
        slowest <= Duration::from_millis(1500),
        "each try bounded: {slowest:?}"
    );
}

/// A hit keeps what it read alive: reading an object sets every key it read (header and
/// stripes) back to the configured time to live, so TTL expiry spares objects in use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_refreshes_the_time_to_live_of_what_it_read() {
    let c = Cluster::start();
    let config = RemoteConfig {
        ttl: Duration::from_secs(3600),
        ..config()
    };
    let (a, b) = (tier(&c, config.clone()), tier(&c, config));
    let obj = object(3, 40, lay(4));
    put(&a, &obj).await;
    let keys = object_keys(&c, &obj);
    assert_eq!(keys.len(), 1 + 4 * 6, "header + 6 stripes per layer");
    let ttl =
        |k: &str| -> i64 { c.on_primary(k, |conn| redis::cmd("TTL").arg(k).query(conn).unwrap()) };
    // the object has aged: a minute left on every key
    for k in &keys {
        c.on_primary(k, |conn| {
            redis::cmd("EXPIRE")
                .arg(k)
                .arg(60)
                .query::<i64>(conn)
                .unwrap()
        });
        assert!(ttl(k) <= 60);
    }
    assert_eq!(read_all(&b, &obj).await.expect("a hit"), obj.layers());
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let low: Vec<(&String, i64)> = keys
            .iter()
            .map(|k| (k, ttl(k)))
            .filter(|(_, t)| *t < 3000)
            .collect();
        if low.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "keys not refreshed by the hit: {low:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Filling the cluster past `maxmemory` (allkeys-lru) evicts stripes and headers of any
/// object (Redis evicts keys, not objects): every read is then a verified hit or a counted
/// miss, never an error or wrong bytes, and the cluster keeps taking new objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_maxmemory_partial_objects_are_misses() {
    let c = Cluster::start_with("6mb");
    let t = tier(&c, config());
    // 160 KiB each: 19 MiB against 3 primaries of 6 MiB
    let objs: Vec<KvObject> = (0..120).map(|i| object(300 + i, 160, lay(8))).collect();
    for o in &objs {
        put(&t, o).await;
    }
    let (mut hits, mut misses) = (0, 0);
    for o in &objs {
        match read_all(&t, o).await {
            Some(layers) => {
                assert_eq!(layers, o.layers());
                hits += 1;
            }
            None => misses += 1,
        }
    }
    let s = t.stats();
    assert!(misses > 0, "the cluster evicted something ({hits} hits)");
    assert!(
        extra(&t, "partial_reads") > 0,
        "some objects lost only part: {s:?}"
    );
    assert_eq!(extra(&t, "timeouts") + extra(&t, "errors"), 0, "{s:?}");
    let fresh = object(999, 40, lay(4));
    tokio::time::sleep(Duration::from_millis(250)).await;
    put(&t, &fresh).await;
    assert_eq!(read_all(&t, &fresh).await.as_deref(), Some(fresh.layers()));
}

/// Every node behind a proxy adding 15 ms each way and limiting each connection to 20 MB/s:
/// the tier measures the round trip and throughput, its deadlines follow them (no call times
/// out although each takes far longer than on loopback), and reads stay verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_network_is_measured_and_waited_for() {
    let c = Cluster::start();
    let slow = proxy::Throttle {
        delay: Duration::from_millis(15),
        bytes_per_s: 20e6,
    };
    let mut proxies = Vec::new();
    let mut map = Vec::new();
    for i in 0..6 {
        let node: std::net::SocketAddr = format!("127.0.0.1:{}", c.base + i).parse().unwrap();
        let p = proxy::Proxy::start(node, slow).await;
        map.push((node.to_string(), p.addr.to_string()));
        proxies.push(p);
    }
    let seeds = vec![proxies[0].addr.to_string()];
    let t = RemoteTier::redis(
        RemoteConfig {
            // the default floor: what is waited for must come from the measurements
            op_timeout_min: RemoteConfig::default().op_timeout_min,
            op_timeout_max: Duration::from_secs(5),
            ..config()
        },
        &seeds,
        &map,
    )
    .unwrap();
    let objs: Vec<KvObject> = (0..4).map(|i| object(700 + i, 400, lay(4))).collect();
    for o in &objs {
        put(&t, o).await;
    }
    for o in &objs {
        assert_eq!(read_all(&t, o).await.as_deref(), Some(o.layers()));
    }
    let rtt_us = extra(&t, "rtt_us");
    assert!(
        rtt_us >= 30_000,
        "the round trip includes both delays: {rtt_us} us"
    );
    let bw = extra(&t, "bandwidth_bytes_per_s");
    assert!(
        bw > 0 && bw < 60_000_000,
        "throughput measured near the limit: {bw}"
    );
    assert_eq!(extra(&t, "timeouts"), 0, "{:?}", t.stats().extra);
}

/// A remote tier storing int8 hands a stream asked to keep 8-bit records those records as
/// stored (verified; the GPU dequantises them), and the same object decoded to a stream
/// that is not; promotion after a kept stream still lands a decoded (lossy-marked) copy in
/// the host tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_records_stream_from_the_remote_as_stored() {
    use kvquilt_kvstore::{Codec, StreamLayer};
    let c = Cluster::start();
    let int8 = Codec::Int8 {
        lz4: false,
        group: 0,
        zero_point: true,
    };
    let lossy = RemoteConfig {
        codec: int8,
        serve_lossy: true,
        ..config()
    };
    let writer = tier(&c, lossy.clone());
    let obj = common::sane(&object(7, 40, lay(4)), 7);
    put(&writer, &obj).await;
    // two sidecars with their own host tiers over the same remote
    let sidecar = || {
        Arc::new(
            TieredStore::builder(StoreConfig::host_only(1 << 30))
                .unwrap()
                .tier(Arc::new(tier(&c, lossy.clone())))
                .build(),
        )
    };
    let (plain, store) = (sidecar(), sidecar());
    let mut decoded = plain.read_layers(obj.key(), 2).await.unwrap().unwrap();
    let want: Vec<bytes::Bytes> = {
        let mut v = Vec::new();
        while let Some(l) = decoded.next().await {
            v.push(l.unwrap());
        }
        v
    };
    assert_eq!(want.len(), 4);
    let mut kept = store
        .read_layers_keeping(obj.key(), 2, |c| c.has_scaled8())
        .await
        .unwrap()
        .expect("a remote hit");
    assert_eq!(kept.tier, TierKind::REMOTE);
    for (l, want) in want.iter().enumerate() {
        let layer = kept.next_layer().await.unwrap().unwrap();
        let StreamLayer::Encoded { codec, .. } = &layer else {
            panic!("layer {l} decoded: {layer:?}");
        };
        assert_eq!(*codec, int8);
        assert_eq!(&layer.decoded(obj.layout(), 40).unwrap(), want, "layer {l}");
    }
    for _ in 0..100 {
        if store.locate(obj.key()) == Some(TierKind::HOST) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (promoted, tier) = store.get(obj.key()).await.unwrap().unwrap();
    assert_eq!(tier, TierKind::HOST, "promoted after a kept stream");
    assert_eq!(promoted.lossy(), Some(int8));
    assert_eq!(promoted.layers(), want.as_slice());
}
