//! The remote tier: chunk KV shared by several kvquilt processes through an existing
//! distributed key-value engine ([`RemoteStore`]; Redis Cluster in [`RedisCluster`]).
//!
//! Nothing read from the remote is trusted more than a local disk: the header's checksum, the
//! key it names and every record's checksum are verified before use, so another node's bug, a
//! partial write, an eviction of some stripes or a copied-in value is a counted miss (the
//! object's keys unlinked, a short negative-cache entry set), never data.
//!
//! The remote is never on the critical path longer than it is worth:
//! - every call has a deadline from the measured round trip and bandwidth
//!   ([`health::Health::deadline`]), within `[op_timeout_min, op_timeout_max]`;
//! - consecutive failures open a circuit breaker: while open, the tier answers misses at
//!   once and drops puts (counted), then lets one call probe the remote back;
//! - writes leave the request path through a bounded queue (full: dropped and counted);
//!   records first, then the header as the commit marker, each `SET NX` with the TTL;
//! - start-up does not wait: the first connection is made in the background.
//!
//! Code map: `names.rs` key names and the header envelope, `health.rs` breakers and
//! deadlines, `reader.rs` reading an object, `writer.rs` the write queue, `redis_cluster.rs`
//! the engine; this file the trait, the config and the `Tier` implementation.
//!
//! Presence: [`Tier::contains`] answers from a hint of keys this process wrote or saw
//! (no I/O); [`Tier::probe`] asks the remote (one round trip) and fills the hint.
//! Eviction is the engine's (`maxmemory` with an LRU policy; hits refresh the TTL of every
//! key they read, in the reads themselves: `RemoteStore::get_touch`).

mod health;
mod names;
mod reader;
mod redis_cluster;
mod writer;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{Semaphore, mpsc};

pub use health::{Breaker, BreakerState, Health, Pass};
pub use names::{
    NAMING_VERSION, ObjectNames, Placement, RecordLayout, Records, envelope, namespace_hash,
    parse_envelope,
};
pub use redis_cluster::RedisCluster;

use reader::{Opened, RemoteReader};

use super::{LayerReader, PutOutcome, Tier, TierKind};
use crate::codec::Codec;
use crate::error::{Result, StoreError};
use crate::index::Lease;
use crate::key::ChunkKey;
use crate::object::{KvObject, ObjectInfo};
use crate::stats::{TierStats, TierStatsSnapshot};

/// What a remote engine call can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RemoteError {
    /// No answer within the deadline.
    #[error("remote call timed out after {0:?}")]
    Timeout(Duration),
    /// The engine cannot be reached (connection refused or lost).
    #[error("remote unavailable: {0}")]
    Unavailable(String),
    /// The breaker is open: the remote was not asked.
    #[error("remote marked down (circuit breaker open)")]
    Down,
    /// The engine answered with an error (out of memory, wrong type, ...).
    #[error("remote engine error: {0}")]
    Engine(String),
    /// The client could not be set up (bad seed address).
    #[error("remote configuration: {0}")]
    Config(String),
}

/// A distributed key-value engine as the remote tier sees it: byte values under string keys.
/// Reads and writes on the request path name keys of one hash tag (one layer's stripes, or a
/// header), so an engine that shards by hash tag answers them from one shard; `delete` and
/// `expire` may name an object's keys across tags, and such an engine splits them.
#[async_trait]
pub trait RemoteStore: Send + Sync + 'static {
    /// The engine's name (logs).
    fn name(&self) -> &str;

    /// The values of `keys`, `None` for a missing key.
    async fn get(&self, keys: &[String]) -> std::result::Result<Vec<Option<Bytes>>, RemoteError>;

    /// Sets every `(key, value)` that does not exist yet, expiring after `ttl`; for each
    /// item in order, whether it was set (`false`: the key existed, its value unchanged).
    async fn set_nx(
        &self,
        items: &[(String, Bytes)],
        ttl: Duration,
    ) -> std::result::Result<Vec<bool>, RemoteError>;

    /// Whether `key` exists.
    async fn exists(&self, key: &str) -> std::result::Result<bool, RemoteError>;

    /// Removes `keys` (missing ones are ignored).
    async fn delete(&self, keys: &[String]) -> std::result::Result<(), RemoteError>;

    /// Sets the time to live of `keys` to `ttl` (missing ones are ignored).
    async fn expire(&self, keys: &[String], ttl: Duration) -> std::result::Result<(), RemoteError>;

    /// [`RemoteStore::get`] that also sets each key it finds to live `ttl` longer: what a hit
    /// reads stays alive. Engines that can do both in one command override it (Redis's
    /// `GETEX`); the default reads, then sets the TTLs (best effort: a failure to refresh
    /// does not fail the read).
    async fn get_touch(
        &self,
        keys: &[String],
        ttl: Duration,
    ) -> std::result::Result<Vec<Option<Bytes>>, RemoteError> {
        let got = self.get(keys).await?;
        let _ = self.expire(keys, ttl).await;
        Ok(got)
    }

    /// The server holding `key` (e.g. `host:port` of a cluster primary), when the engine
    /// knows its topology: each gets its own circuit breaker. `None`: one breaker for all.
    fn shard(&self, _key: &str) -> Option<String> {
        None
    }

    /// One round trip to the engine, refreshing what [`RemoteStore::shard`] knows where it
    /// can (called at start and every few seconds, off the request path).
    async fn ping(&self) -> std::result::Result<(), RemoteError> {
        self.exists("kvq:ping").await.map(|_| ())
    }
}

/// Settings of a [`RemoteTier`] (`[store.remote]` in the sidecar's config).
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// Deployment namespace: processes share objects only within one (hashed into keys).
    pub namespace: String,
    /// Most bytes of one value; larger records are striped.
    pub stripe_bytes: usize,
    /// Calls in flight per object: layers fetched ahead of the one being read (fewer when
    /// they would hold more than four stripes' bytes), and record pipelines of one write.
    pub window: usize,
    /// How written objects' records are placed over the engine's shards (readers follow
    /// what each object's envelope says).
    pub layout: RecordLayout,
    /// Connecting may take this long.
    pub connect_timeout: Duration,
    /// Lower bound of a call's deadline.
    pub op_timeout_min: Duration,
    /// Upper bound of a call's deadline (and the deadline before anything was measured).
    pub op_timeout_max: Duration,
    /// Time to live of written objects, refreshed on every hit.
    pub ttl: Duration,
    /// Objects waiting to be written; a put finding the queue full is dropped (counted).
    pub queue: usize,
    /// Objects written at once.
    pub write_concurrency: usize,
    /// How long a miss is remembered (no remote call for that key meanwhile).
    pub negative_ttl: Duration,
    /// How long a key seen present is assumed present without asking.
    pub hint_ttl: Duration,
    /// Consecutive failures that open the breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open before probing.
    pub breaker_open: Duration,
    /// How objects are encoded on the remote.
    pub codec: Codec,
    /// Whether objects of a lossy codec are served (else they are misses, left in place).
    pub serve_lossy: bool,
}

impl Default for RemoteConfig {
    fn default() -> Self {
        Self {
            namespace: "default".into(),
            stripe_bytes: 4 << 20,
            window: 4,
            layout: RecordLayout::default(),
            connect_timeout: Duration::from_millis(500),
            op_timeout_min: Duration::from_millis(100),
            op_timeout_max: Duration::from_secs(2),
            ttl: Duration::from_secs(24 * 3600),
            queue: 64,
            write_concurrency: 2,
            negative_ttl: Duration::from_secs(1),
            hint_ttl: Duration::from_secs(60),
            breaker_failures: 3,
            breaker_open: Duration::from_secs(2),
            codec: Codec::Raw,
            serve_lossy: false,
        }
    }
}

/// Counters of the remote tier beyond [`TierStats`] (reported in the snapshot's `extra`).
#[derive(Debug, Default)]
struct RemoteCounters {
    /// Reads that found a stripe missing (a partial object: evicted or half-written).
    partial_reads: AtomicU64,
    /// Calls that missed their deadline.
    timeouts: AtomicU64,
    /// Calls that failed otherwise (connection, engine errors).
    errors: AtomicU64,
    /// Calls skipped because the breaker was open.
    skipped_down: AtomicU64,
    /// Puts dropped: queue full or remote down.
    dropped_puts: AtomicU64,
    /// Writes that failed after leaving the queue.
    put_failures: AtomicU64,
    /// Lookups answered by the negative cache.
    negative_hits: AtomicU64,
}

struct Inner {
    store: Arc<dyn RemoteStore>,
    config: RemoteConfig,
    ns: String,
    health: Health,
    stats: TierStats,
    counters: RemoteCounters,
    /// Keys seen present (written or probed), for `contains`.
    present: moka::sync::Cache<ChunkKey, ()>,
    /// Keys seen absent or bad, answered as misses without a call.
    absent: moka::sync::Cache<ChunkKey, ()>,
    /// Objects accepted by `put`, with when they were queued.
    queue: mpsc::Sender<(Arc<KvObject>, Instant)>,
    /// Keys removed here, with when: a write queued before its key's removal must not
    /// commit it afterwards (or leaves nothing if it did; `writer.rs`). Kept longer than a
    /// queued write can wait ([`REMOVED_FOR`]).
    removed: moka::sync::Cache<ChunkKey, Instant>,
    /// Objects accepted by `put` and not yet written or given up.
    pending: AtomicU64,
    /// Record reads in flight across every reader, in MiB ([`BUDGET_STRIPES`]): many
    /// readers with deep windows (or writers with large objects) would otherwise queue far
    /// more bytes than the link moves in a deadline, and crowd memory and the engine's
    /// replication buffers.
    read_budget: Arc<Semaphore>,
    /// The same for record writes.
    write_budget: Arc<Semaphore>,
}

/// How long a removal is remembered against writes queued before it (at least; also 16
/// call deadlines): far longer than a write waits in the queue and runs.
const REMOVED_FOR: Duration = Duration::from_secs(600);

/// Stripes' worth of record bytes all readers (and, separately, all writers) of a tier keep
/// in flight at most (and at least 16 MiB).
const BUDGET_STRIPES: usize = 16;

/// The read (and the write) budget of a tier configured by `c`, MiB.
fn budget_mib(c: &RemoteConfig) -> u32 {
    ((BUDGET_STRIPES * c.stripe_bytes).div_ceil(1 << 20)).max(16) as u32
}

/// A tier on a shared remote engine. Cheap to clone.
#[derive(Clone)]
pub struct RemoteTier(Arc<Inner>);

impl RemoteTier {
    /// A tier on `store`. Must be called inside a tokio runtime: the writer and the first
    /// connection run as tasks (start-up does not wait for the remote).
    pub fn new(config: RemoteConfig, store: Arc<dyn RemoteStore>) -> Result<Self> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| {
            StoreError::Invalid("the remote tier needs a tokio runtime to start in".into())
        })?;
        if config.stripe_bytes == 0 || config.stripe_bytes > names::MAX_STRIPE_BYTES {
            return Err(StoreError::Invalid(format!(
                "remote stripe_bytes {} out of range (1 ..= {})",
                config.stripe_bytes,
                names::MAX_STRIPE_BYTES
            )));
        }
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let inner = Arc::new(Inner {
            ns: namespace_hash(&config.namespace),
            health: Health::new(
                config.breaker_failures,
                config.breaker_open,
                config.op_timeout_min,
                config.op_timeout_max,
            ),
            stats: TierStats::default(),
            counters: RemoteCounters::default(),
            present: moka::sync::Cache::builder()
                .max_capacity(1 << 20)
                .time_to_live(config.hint_ttl)
                .build(),
            absent: moka::sync::Cache::builder()
                .max_capacity(1 << 20)
                .time_to_live(config.negative_ttl)
                .build(),
            queue: tx,
            removed: moka::sync::Cache::builder()
                .max_capacity(1 << 20)
                .time_to_live(REMOVED_FOR.max(config.op_timeout_max * 16))
                .build(),
            pending: AtomicU64::new(0),
            read_budget: Arc::new(Semaphore::new(budget_mib(&config) as usize)),
            write_budget: Arc::new(Semaphore::new(budget_mib(&config) as usize)),
            store,
            config,
        });
        rt.spawn(writer::writer(Arc::downgrade(&inner), rx));
        // connects, learns the topology and a first round trip, off the start-up path
        rt.spawn(topology(Arc::downgrade(&inner)));
        Ok(Self(inner))
    }

    /// A tier on the Redis Cluster seeded by `seeds` (`host:port`), reaching announced
    /// node addresses through `address_map` where it names them ([`RedisCluster::new`]).
    pub fn redis(
        config: RemoteConfig,
        seeds: &[String],
        address_map: &[(String, String)],
    ) -> Result<Self> {
        let store = RedisCluster::new(
            seeds,
            address_map,
            config.connect_timeout,
            config.op_timeout_max,
        )
        .map_err(|e| StoreError::Invalid(e.to_string()))?;
        Self::new(config, Arc::new(store))
    }

    /// The breaker's state.
    pub fn breaker(&self) -> BreakerState {
        self.0.health.state()
    }

    /// Measured round trip and bandwidth (seconds, bytes per second), when measured.
    pub fn measured(&self) -> (Option<f64>, Option<f64>) {
        (self.0.health.rtt_s(), self.0.health.bytes_per_s())
    }

    /// Objects accepted for writing and not yet written (queued or in flight).
    pub fn pending_writes(&self) -> u64 {
        self.0.pending.load(Relaxed)
    }

    /// Waits until every accepted write is done, at most `timeout` (tests, benchmarks, a
    /// graceful stop). False on timeout.
    pub async fn drain(&self, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while self.pending_writes() > 0 {
            if Instant::now() >= end {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

impl Inner {
    /// A share of `budget` for a call moving `bytes` (whole MiB, at least one, at most the
    /// budget), held until the guard drops. Waiting for it is not the remote's slowness:
    /// a call's deadline starts once it is made.
    async fn budget_share(
        &self,
        budget: &Arc<Semaphore>,
        bytes: usize,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let mib = (bytes.div_ceil(1 << 20) as u32).clamp(1, budget_mib(&self.config));
        Arc::clone(budget).acquire_many_owned(mib).await.ok()
    }

    /// The shard holding `key`'s header, when the engine knows its topology.
    fn shard(&self, key: &ChunkKey) -> Option<String> {
        self.store.shard(&ObjectNames::new(&self.ns, key).header())
    }

    /// Whether reads of `key`'s object would find a shard marked down: its header's, or,
    /// when this tier spreads records over every shard, any.
    fn object_down(&self, key: &ChunkKey) -> bool {
        self.health.is_down(self.shard(key).as_deref())
            || (self.config.layout == RecordLayout::PerLayer && self.health.shards_down() > 0)
    }

    /// Runs one engine call on the request path whose keys share `route`'s hash tag
    /// (`None`: no key) under the breaker of the shard serving it and a deadline for `bytes`
    /// bytes ([`Health::deadline`]); a timeout or a lost connection counts against the
    /// breaker, an answer (even an engine error) for it.
    async fn call<T>(
        &self,
        route: Option<&str>,
        bytes: usize,
        fut: impl Future<Output = std::result::Result<T, RemoteError>>,
    ) -> std::result::Result<T, RemoteError> {
        self.call_within(None, route, bytes, fut).await
    }

    /// [`Inner::call`] for a write off the request path: its deadline is the upper bound
    /// (a slow write costs no request time; abandoning it wastes the work done).
    async fn call_off_path<T>(
        &self,
        route: &str,
        bytes: usize,
        fut: impl Future<Output = std::result::Result<T, RemoteError>>,
    ) -> std::result::Result<T, RemoteError> {
        self.call_within(Some(self.config.op_timeout_max), Some(route), bytes, fut)
            .await
    }

    async fn call_within<T>(
        &self,
        deadline: Option<Duration>,
        route: Option<&str>,
        bytes: usize,
        fut: impl Future<Output = std::result::Result<T, RemoteError>>,
    ) -> std::result::Result<T, RemoteError> {
        let shard = route.and_then(|k| self.store.shard(k));
        let breaker = self.health.breaker(shard.as_deref());
        let global = self.health.global();
        let pass = match shard {
            // a shard's call goes unless the remote as a whole is marked down
            Some(_) if global.state() == BreakerState::Open => None,
            _ => breaker.allow(),
        };
        let Some(pass) = pass else {
            TierStats::add(&self.counters.skipped_down, 1);
            return Err(RemoteError::Down);
        };
        let deadline = deadline.unwrap_or_else(|| self.health.deadline(bytes));
        let in_flight = self.health.in_flight(bytes);
        // (dropped at this await, unsettled, the pass frees a half-open probe's slot)
        let r = self.settle(
            tokio::time::timeout(deadline, fut).await,
            deadline,
            &breaker,
        );
        drop(pass);
        if r.is_ok() {
            in_flight.done();
        }
        r
    }

    /// Counts a call's outcome and tells the breaker.
    fn settle<T>(
        &self,
        r: std::result::Result<std::result::Result<T, RemoteError>, tokio::time::error::Elapsed>,
        deadline: Duration,
        breaker: &Breaker,
    ) -> std::result::Result<T, RemoteError> {
        let answered = || {
            breaker.success();
            self.health.global().success();
        };
        match r {
            Err(_) => {
                TierStats::add(&self.counters.timeouts, 1);
                breaker.failure();
                Err(RemoteError::Timeout(deadline))
            }
            Ok(Err(e @ (RemoteError::Timeout(_) | RemoteError::Unavailable(_)))) => {
                let c = match e {
                    RemoteError::Timeout(_) => &self.counters.timeouts,
                    _ => &self.counters.errors,
                };
                TierStats::add(c, 1);
                breaker.failure();
                Err(e)
            }
            Ok(Err(e)) => {
                TierStats::add(&self.counters.errors, 1);
                answered();
                Err(e)
            }
            Ok(Ok(v)) => {
                answered();
                Ok(v)
            }
        }
    }

    /// Reads and verifies `key`'s header: `None` on a miss (absent, unreadable, bad, lossy
    /// while lossy objects are not served, or the remote failing), counted.
    async fn open(&self, key: &ChunkKey) -> Option<Opened> {
        if self.absent.contains_key(key) {
            TierStats::add(&self.counters.negative_hits, 1);
            TierStats::add(&self.stats.misses, 1);
            return None;
        }
        let names = ObjectNames::new(&self.ns, key);
        let header_key = names.header();
        let t = Instant::now();
        let got = self
            .call(
                Some(&header_key),
                0,
                self.store
                    .get_touch(std::slice::from_ref(&header_key), self.config.ttl),
            )
            .await;
        let value = match got {
            Ok(mut v) => {
                self.health.record_rtt(t.elapsed());
                v.pop().flatten()
            }
            Err(e) => {
                tracing::debug!(%key, error = %e, "remote tier: header read failed; a miss");
                TierStats::add(&self.stats.misses, 1);
                return None;
            }
        };
        let Some(bytes) = value else {
            self.absent.insert(*key, ());
            self.present.invalidate(key);
            TierStats::add(&self.stats.misses, 1);
            return None;
        };
        match parse_envelope(&bytes, key) {
            Ok((header, placement)) => {
                if header.codec.is_lossy() && !self.config.serve_lossy {
                    tracing::debug!(%key, codec = %header.codec, "remote tier: lossy object not served");
                    TierStats::add(&self.stats.misses, 1);
                    return None;
                }
                self.present.insert(*key, ());
                TierStats::add(&self.stats.hits, 1);
                self.stats.hit_codec(header.codec);
                self.stats.get_latency.record(t.elapsed());
                let records = names.records(
                    &bytes[names::ENVELOPE_LEN..],
                    placement.stripe_bytes,
                    placement.layout,
                );
                Some(Opened {
                    header: Arc::new(header),
                    records: Arc::new(records),
                    names,
                })
            }
            Err(e @ StoreError::NewerFormat { .. }) => {
                tracing::warn!(%key, error = %e, "remote tier: skipping an object of a newer format");
                TierStats::add(&self.stats.misses, 1);
                None
            }
            Err(e) => {
                TierStats::add(&self.stats.checksum_failures, 1);
                TierStats::add(&self.stats.misses, 1);
                tracing::warn!(%key, error = %e, "remote tier: header failed verification; unlinked, a miss");
                self.forget(key, vec![header_key]).await;
                None
            }
        }
    }

    /// Marks `key` absent here and unlinks `keys` on the remote (best effort).
    async fn forget(&self, key: &ChunkKey, keys: Vec<String>) {
        self.absent.insert(*key, ());
        self.present.invalidate(key);
        let route = ObjectNames::new(&self.ns, key).header();
        if let Err(e) = self.call(Some(&route), 0, self.store.delete(&keys)).await {
            tracing::debug!(%key, error = %e, "remote tier: unlinking a bad object failed (its TTL removes it)");
        }
    }
}

/// Time between pings (and topology refreshes) of the remote.
const TOPOLOGY_EVERY: Duration = Duration::from_secs(5);

/// Pings the remote and refreshes the engine's view of its shards, now and every
/// [`TOPOLOGY_EVERY`], until the tier is dropped. The first ping is the tier's connection:
/// a remote that refuses it (down at start) opens the remote-wide breaker at once instead
/// of costing the first requests a timeout each; one that is only slow counts a failure.
async fn topology(inner: std::sync::Weak<Inner>) {
    let mut first = true;
    loop {
        let Some(i) = inner.upgrade() else { return };
        let t = Instant::now();
        match tokio::time::timeout(i.config.op_timeout_max, i.store.ping()).await {
            Ok(Ok(())) => {
                i.health.record_rtt(t.elapsed());
                i.health.global().success();
                if first {
                    tracing::info!(
                        engine = i.store.name(),
                        rtt_us = t.elapsed().as_micros() as u64,
                        "remote tier connected"
                    );
                }
            }
            Ok(Err(e @ (RemoteError::Unavailable(_) | RemoteError::Config(_)))) if first => {
                i.health.trip();
                tracing::warn!(engine = i.store.name(), error = %e, "remote tier unreachable at start; serving without it until it answers");
            }
            Ok(Err(e)) => {
                i.health.global().failure();
                tracing::debug!(error = %e, "remote tier: ping failed");
            }
            Err(_) => {
                i.health.global().failure();
                tracing::debug!("remote tier: ping timed out");
            }
        }
        first = false;
        drop(i);
        tokio::time::sleep(TOPOLOGY_EVERY).await;
    }
}

#[async_trait]
impl Tier for RemoteTier {
    fn kind(&self) -> TierKind {
        TierKind::REMOTE
    }

    fn is_remote(&self) -> bool {
        true
    }

    fn contains(&self, key: &ChunkKey) -> bool {
        let s = &self.0;
        s.present.contains_key(key) && !s.object_down(key)
    }

    /// A `false` answer counts as a miss of this tier (a store asks the remote only for
    /// what its local tiers lack, so each is a lookup the remote could not serve).
    async fn probe(&self, key: &ChunkKey) -> bool {
        let s = &self.0;
        if s.absent.contains_key(key) {
            TierStats::add(&s.counters.negative_hits, 1);
            TierStats::add(&s.stats.misses, 1);
            return false;
        }
        if self.contains(key) {
            return true;
        }
        let t = Instant::now();
        let header = ObjectNames::new(&s.ns, key).header();
        match s.call(Some(&header), 0, s.store.exists(&header)).await {
            Ok(true) => {
                s.health.record_rtt(t.elapsed());
                s.present.insert(*key, ());
                true
            }
            Ok(false) => {
                s.health.record_rtt(t.elapsed());
                s.absent.insert(*key, ());
                TierStats::add(&s.stats.misses, 1);
                false
            }
            Err(_) => {
                TierStats::add(&s.stats.misses, 1);
                false
            }
        }
    }

    fn keys(&self) -> Vec<ChunkKey> {
        Vec::new()
    }

    async fn info(&self, key: &ChunkKey) -> Result<Option<Arc<ObjectInfo>>> {
        Ok(self
            .0
            .open(key)
            .await
            .map(|o| Arc::new(o.header.info.clone())))
    }

    async fn reader(&self, key: &ChunkKey) -> Result<Option<Box<dyn LayerReader>>> {
        let Some(opened) = self.0.open(key).await else {
            return Ok(None);
        };
        Ok(Some(Box::new(RemoteReader::new(
            Arc::clone(&self.0),
            opened,
        ))))
    }

    async fn get(&self, key: &ChunkKey) -> Result<Option<Arc<KvObject>>> {
        let Some(mut r) = self.reader(key).await? else {
            return Ok(None);
        };
        let n = r.info().layout.num_layers as usize;
        let mut layers = Vec::with_capacity(n);
        for l in 0..n {
            match r.layer(l).await {
                Ok(b) => layers.push(b),
                // a failed read is a miss here (the object was unlinked if it was bad)
                Err(e) => {
                    tracing::debug!(%key, error = %e, "remote tier: whole-object read failed; a miss");
                    return Ok(None);
                }
            }
        }
        let obj = KvObject::from_info(r.info(), layers)?.decoded_from(r.lossy());
        Ok(Some(Arc::new(obj)))
    }

    async fn put(&self, obj: Arc<KvObject>, _cost_s: f64) -> Result<PutOutcome> {
        let s = &self.0;
        if obj.lossy().is_some() || s.present.contains_key(obj.key()) {
            // lossy values are never encoded again; a present object needs no write
            return Ok(PutOutcome::default());
        }
        if s.object_down(obj.key()) {
            TierStats::add(&s.counters.dropped_puts, 1);
            return Err(StoreError::Remote(
                "remote tier marked down: the chunk was not written there".into(),
            ));
        }
        s.pending.fetch_add(1, Relaxed);
        if s.queue.try_send((obj, Instant::now())).is_err() {
            s.pending.fetch_sub(1, Relaxed);
            TierStats::add(&s.counters.dropped_puts, 1);
            tracing::debug!("remote tier: write queue full; put dropped");
            return Err(StoreError::Remote(
                "remote tier's write queue is full: the chunk was not written there".into(),
            ));
        }
        Ok(PutOutcome::default())
    }

    async fn remove(&self, key: &ChunkKey) -> Result<bool> {
        let s = &self.0;
        // before anything else: a write of this key still queued or running will not
        // commit it after this (test `a_removal_wins_over_a_queued_write`)
        s.removed.insert(*key, Instant::now());
        s.present.invalidate(key);
        let names = ObjectNames::new(&s.ns, key);
        let header_key = names.header();
        let mut keys = vec![header_key.clone()];
        let got = s
            .call(
                Some(&header_key),
                0,
                s.store.get(std::slice::from_ref(&header_key)),
            )
            .await;
        let existed = match got {
            Ok(mut v) => match v.pop().flatten() {
                Some(b) => {
                    if let Ok((h, p)) = parse_envelope(&b, key) {
                        keys = names
                            .records(&b[names::ENVELOPE_LEN..], p.stripe_bytes, p.layout)
                            .all(&h);
                        keys.push(header_key.clone());
                    }
                    true
                }
                None => false,
            },
            Err(e) => {
                tracing::warn!(%key, error = %e, "remote tier: could not remove an object (the remote may still serve it until its TTL)");
                return Ok(false);
            }
        };
        s.absent.insert(*key, ());
        if let Err(e) = s.call(Some(&header_key), 0, s.store.delete(&keys)).await {
            tracing::warn!(%key, error = %e, "remote tier: unlinking failed (the remote may still serve it until its TTL)");
            return Ok(false);
        }
        if existed {
            TierStats::add(&s.stats.removes, 1);
        }
        Ok(existed)
    }

    fn lease(&self, _key: &ChunkKey) -> Option<Lease> {
        None
    }

    /// Waits for queued writes (a graceful stop), at most four times the call deadline cap.
    async fn flush(&self) -> Result<()> {
        if !self.drain(self.0.config.op_timeout_max * 4).await {
            tracing::warn!(
                pending = self.pending_writes(),
                "remote tier: stopping with writes still queued; they are lost (recomputed on a miss)"
            );
        }
        Ok(())
    }

    fn stats(&self) -> TierStatsSnapshot {
        let s = &self.0;
        let c = &s.counters;
        let mut snap = s.stats.snapshot("remote", 0, 0, 0);
        let (rtt, bw) = self.measured();
        for (name, v) in [
            ("partial_reads", c.partial_reads.load(Relaxed)),
            ("timeouts", c.timeouts.load(Relaxed)),
            ("errors", c.errors.load(Relaxed)),
            ("skipped_down", c.skipped_down.load(Relaxed)),
            ("dropped_puts", c.dropped_puts.load(Relaxed)),
            ("put_failures", c.put_failures.load(Relaxed)),
            ("negative_hits", c.negative_hits.load(Relaxed)),
            ("pending_writes", s.pending.load(Relaxed)),
            ("breaker_state", s.health.state() as u64),
            ("breaker_opens", s.health.opens()),
            ("shards_down", s.health.shards_down() as u64),
            ("rtt_us", rtt.map_or(0, |r| (r * 1e6) as u64)),
            ("bandwidth_bytes_per_s", bw.map_or(0, |b| b as u64)),
        ] {
            snap.extra.insert(name.to_string(), v);
        }
        snap
    }
}
