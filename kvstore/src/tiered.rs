//! The tiered store: tiers fastest first, one lookup path, promotion on hit, write-through
//! or write-back, shared pins.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::error::{Result, StoreError};
use crate::index::{Lease, Pin, Pins};
use crate::key::ChunkKey;
use crate::object::{KeepEncoded, KvObject, ObjectInfo, StreamLayer, decode_all};
use crate::policy::PolicyKind;
use crate::stats::TierStatsSnapshot;
use crate::tier::{HostMemory, HostTier, SsdConfig, SsdTier, Tier, TierKind};

/// When a put reaches the slower tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum WritePolicy {
    /// Every tier is written before `put` returns (durable at once).
    #[default]
    WriteThrough,
    /// Only the fastest tier is written; slower tiers get the object when it is evicted from
    /// the faster one, or on [`TieredStore::flush`].
    WriteBack,
}

/// Settings of a [`TieredStore`].
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Host tier capacity, bytes of K/V.
    pub host_capacity: u64,
    /// Eviction policy of the host tier.
    pub host_policy: PolicyKind,
    /// How the host tier holds exact objects (`HostTier::with_codec`; raw: decoded). Any
    /// other needs write-through (write-back demotes evicted objects).
    pub host_codec: crate::Codec,
    /// The SSD tier, if any.
    pub ssd: Option<SsdConfig>,
    /// When puts reach the SSD tier.
    pub write: WritePolicy,
    /// Copy objects found in a slower tier into the faster ones.
    pub promote_on_hit: bool,
}

impl StoreConfig {
    /// Host memory only (`capacity` bytes, LRU), write-through, promoting hits.
    pub fn host_only(capacity: u64) -> Self {
        Self {
            host_capacity: capacity,
            host_policy: PolicyKind::Lru,
            host_codec: crate::Codec::Raw,
            ssd: None,
            write: WritePolicy::WriteThrough,
            promote_on_hit: true,
        }
    }

    /// Host memory (`host_capacity` bytes, LRU) above an SSD tier, write-through, promoting
    /// hits.
    pub fn with_ssd(host_capacity: u64, ssd: SsdConfig) -> Self {
        Self {
            ssd: Some(ssd),
            ..Self::host_only(host_capacity)
        }
    }
}

/// A hit: what the object holds and which tier answered.
#[derive(Debug, Clone)]
pub struct Found {
    /// What the object holds (verified).
    pub info: Arc<ObjectInfo>,
    /// The fastest tier holding it.
    pub tier: TierKind,
}

/// Whether a write-down's failure on `tier` skips that tier rather than failing: a remote
/// that refuses (down, its queue full; it counts its dropped puts itself), or a tier the
/// object can never fit.
fn skipped_by(tier: &dyn Tier, e: &StoreError) -> bool {
    tier.is_remote() || e.never_fits()
}

/// Layers of one object arriving in order, read ahead by a background task.
pub struct LayerStream {
    /// What the object holds; the stream yields its `info.layout.num_layers` layers in
    /// order, or stops after an error.
    pub info: Arc<ObjectInfo>,
    /// The tier the layers are read from.
    pub tier: TierKind,
    /// The lossy codec the layers are decoded from (`None`: exact values).
    pub lossy: Option<crate::Codec>,
    rx: mpsc::Receiver<Result<StreamLayer>>,
}

impl LayerStream {
    /// The next layer as the tier handed it over (a record of a codec the stream was opened
    /// to keep stays encoded: [`TieredStore::read_layers_keeping`]), `None` after the last.
    pub async fn next_layer(&mut self) -> Option<Result<StreamLayer>> {
        self.rx.recv().await
    }

    /// The next layer's K‖V (a kept record decoded here, on the CPU), `None` after the last.
    pub async fn next(&mut self) -> Option<Result<Bytes>> {
        let layer = self.rx.recv().await?;
        Some(layer.and_then(|l| l.decoded(&self.info.layout, self.info.tokens.len())))
    }

    /// [`LayerStream::next`] for callers outside the async runtime (model threads).
    pub fn next_blocking(&mut self) -> Option<Result<Bytes>> {
        let layer = self.rx.blocking_recv()?;
        Some(layer.and_then(|l| l.decoded(&self.info.layout, self.info.tokens.len())))
    }
}

/// KV objects in tiers, fastest first.
pub struct TieredStore {
    tiers: Vec<Arc<dyn Tier>>,
    /// The fastest tier (also `tiers[0]`), typed: its memory can be set.
    host: Arc<HostTier>,
    ssd: Option<SsdTier>,
    pins: Pins,
    write: WritePolicy,
    promote_on_hit: bool,
    /// Objects in the fastest tier not yet written below it (write-back).
    dirty: Mutex<HashSet<ChunkKey>>,
    /// Keys whose promotion after a read is under way ([`TieredStore::claim_promotion`]):
    /// concurrent hits on one key in a slower tier make one promotion, not one each.
    promoting: Mutex<HashSet<ChunkKey>>,
}

/// A claimed promotion of one key ([`TieredStore::claim_promotion`]); dropping it (the
/// promotion done, failed or its task gone) frees the key for the next hit.
struct Promoting {
    store: Arc<TieredStore>,
    key: ChunkKey,
}

impl Drop for Promoting {
    fn drop(&mut self) {
        self.store.promoting.lock().remove(&self.key);
    }
}

/// Stacks tiers into a [`TieredStore`]: the host tier first, then the SSD tier the config
/// names, then any tiers added with [`StoreBuilder::tier`] (slower ones last: a remote tier
/// goes at the bottom).
pub struct StoreBuilder {
    host: Arc<HostTier>,
    ssd: Option<SsdTier>,
    tiers: Vec<Arc<dyn Tier>>,
    pins: Pins,
    write: WritePolicy,
    promote_on_hit: bool,
}

impl StoreBuilder {
    /// The pins every tier honours (a tier built outside may share them).
    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// Adds `tier` below the tiers stacked so far.
    pub fn tier(mut self, tier: Arc<dyn Tier>) -> Self {
        self.tiers.push(tier);
        self
    }

    /// The store.
    pub fn build(self) -> TieredStore {
        TieredStore {
            tiers: self.tiers,
            host: self.host,
            ssd: self.ssd,
            pins: self.pins,
            write: self.write,
            promote_on_hit: self.promote_on_hit,
            dirty: Mutex::new(HashSet::new()),
            promoting: Mutex::new(HashSet::new()),
        }
    }
}

impl TieredStore {
    /// Opens the configured tiers (the SSD tier rebuilds its index from disk).
    pub fn open(config: StoreConfig) -> Result<Self> {
        Ok(Self::builder(config)?.build())
    }

    /// Opens the configured tiers into a builder, to stack more below them.
    pub fn builder(config: StoreConfig) -> Result<StoreBuilder> {
        let pins = Pins::default();
        if config.host_codec != crate::Codec::Raw && config.write == WritePolicy::WriteBack {
            return Err(crate::StoreError::Invalid(format!(
                "a host codec ({}) needs write-through: write-back demotes evicted objects, which the host tier then holds encoded (and lossy values are never encoded again)",
                config.host_codec
            )));
        }
        let host = Arc::new(
            HostTier::new(config.host_capacity, config.host_policy, pins.clone())
                .with_codec(config.host_codec),
        );
        let mut tiers: Vec<Arc<dyn Tier>> = vec![host.clone()];
        let ssd = match config.ssd {
            Some(c) => {
                let s = SsdTier::open(c, pins.clone())?;
                tiers.push(Arc::new(s.clone()));
                Some(s)
            }
            None => None,
        };
        Ok(StoreBuilder {
            host,
            ssd,
            tiers,
            pins,
            write: config.write,
            promote_on_hit: config.promote_on_hit,
        })
    }

    /// Places objects the host tier admits from now on in `memory` (page-locked memory on a
    /// GPU host, so hits upload by DMA). Once per store: false if a memory was already set.
    pub fn set_host_memory(&self, memory: Arc<dyn HostMemory>) -> bool {
        self.host.set_memory(memory)
    }

    /// The tiers, fastest first.
    pub fn tiers(&self) -> &[Arc<dyn Tier>] {
        &self.tiers
    }

    /// The fastest tier holding `key`, without I/O or statistics (a remote tier answers
    /// from its hint: see [`TieredStore::probe`]).
    pub fn locate(&self, key: &ChunkKey) -> Option<TierKind> {
        self.tiers
            .iter()
            .find(|t| t.contains(key))
            .map(|t| t.kind())
    }

    /// Objects that have left a tier of this store so far (evicted, removed, dropped as
    /// damaged): when it has not moved, every object held before is still held (a remote
    /// tier's own expiries excepted: its engine evicts without telling).
    pub fn departures(&self) -> u64 {
        self.tiers
            .iter()
            .map(|t| {
                let s = t.stats();
                s.evictions + s.removes + s.checksum_failures
            })
            .sum()
    }

    /// Where each of `keys` is held, asking remote tiers about keys no local tier holds
    /// (concurrently: one round trip for the lot, each within the remote's deadline).
    /// Afterwards [`TieredStore::locate`] answers the same for keys found remote.
    pub async fn probe(&self, keys: &[ChunkKey]) -> Vec<Option<TierKind>> {
        let mut found: Vec<Option<TierKind>> = keys.iter().map(|k| self.locate(k)).collect();
        for t in self.tiers.iter().filter(|t| t.is_remote()) {
            let ask: Vec<usize> = (0..keys.len()).filter(|&i| found[i].is_none()).collect();
            if ask.is_empty() {
                break;
            }
            let answers =
                futures_util::future::join_all(ask.iter().map(|&i| t.probe(&keys[i]))).await;
            for (&i, yes) in ask.iter().zip(answers) {
                if yes {
                    found[i] = Some(t.kind());
                }
            }
        }
        found
    }

    /// What `key` holds, from the fastest tier that has it (verified).
    pub async fn lookup(&self, key: &ChunkKey) -> Result<Option<Found>> {
        for t in &self.tiers {
            if !t.contains(key) && !t.is_remote() {
                continue;
            }
            if let Some(info) = t.info(key).await? {
                return Ok(Some(Found {
                    info,
                    tier: t.kind(),
                }));
            }
        }
        Ok(None)
    }

    /// The whole object from the fastest tier that has it; promoted to faster tiers before
    /// this returns.
    pub async fn get(&self, key: &ChunkKey) -> Result<Option<(Arc<KvObject>, TierKind)>> {
        let Some((found_at, obj)) = self.find(key).await? else {
            return Ok(None);
        };
        if found_at > 0 && self.promote_on_hit {
            self.promote(found_at, &obj).await;
        }
        Ok(Some((obj, self.tiers[found_at].kind())))
    }

    /// [`TieredStore::get`] for a request's path: a hit in a slower tier is promoted by a
    /// spawned task after this returns, as a layer stream's is, so the caller waits for the
    /// read alone — not for copies into faster tiers, nor the write-back of what they evict
    /// (an SSD write; pinned by `streams::a_hits_promotion_does_not_hold_up_its_read`).
    /// Hits on a key whose promotion is already under way leave it to that one (pinned by
    /// `streams::concurrent_hits_promote_once`).
    pub async fn get_promoting_later(
        self: &Arc<Self>,
        key: &ChunkKey,
    ) -> Result<Option<(Arc<KvObject>, TierKind)>> {
        let Some((found_at, obj)) = self.find(key).await? else {
            return Ok(None);
        };
        if found_at > 0
            && self.promote_on_hit
            && let Some(claim) = self.claim_promotion(key)
        {
            let copy = Arc::clone(&obj);
            tokio::spawn(async move {
                claim.store.promote(found_at, &copy).await;
                drop(claim);
            });
        }
        Ok(Some((obj, self.tiers[found_at].kind())))
    }

    /// Claims the promotion of `key`: `None` while another is under way. The claim is held
    /// until its promotion ends (dropped with the task that runs it, even if it panics).
    fn claim_promotion(self: &Arc<Self>, key: &ChunkKey) -> Option<Promoting> {
        self.promoting.lock().insert(*key).then(|| Promoting {
            store: Arc::clone(self),
            key: *key,
        })
    }

    /// The whole object from the fastest tier that has it, and that tier's index.
    async fn find(&self, key: &ChunkKey) -> Result<Option<(usize, Arc<KvObject>)>> {
        for (i, t) in self.tiers.iter().enumerate() {
            if !t.contains(key) && !t.is_remote() {
                continue;
            }
            if let Some(obj) = t.get(key).await? {
                return Ok(Some((i, obj)));
            }
        }
        Ok(None)
    }

    /// Streams `key`'s layers in order from the fastest tier that has it, reading ahead
    /// `read_ahead` layers; the object is leased until the stream ends and promoted after.
    pub async fn read_layers(
        self: &Arc<Self>,
        key: &ChunkKey,
        read_ahead: usize,
    ) -> Result<Option<LayerStream>> {
        self.read_layers_keeping(key, read_ahead, decode_all).await
    }

    /// [`TieredStore::read_layers`], handing over records of the codecs `keep` names as stored
    /// ([`StreamLayer::Encoded`], verified) for the caller to decode: the GPU path
    /// dequantises them on the device. Tiers that cannot hand records over decode as usual.
    /// Promotion after the stream decodes kept records on a blocking thread, off the
    /// request's path.
    pub async fn read_layers_keeping(
        self: &Arc<Self>,
        key: &ChunkKey,
        read_ahead: usize,
        keep: KeepEncoded,
    ) -> Result<Option<LayerStream>> {
        for (i, t) in self.tiers.iter().enumerate() {
            // a local tier is leased (kept from eviction) while the stream reads it; a remote
            // one is asked directly (its reader misses fast when the key is known absent)
            let lease = t.lease(key);
            if lease.is_none() && !t.is_remote() {
                continue;
            }
            let Some(mut reader) = t.reader(key).await? else {
                continue;
            };
            let info = Arc::clone(reader.info());
            let lossy = reader.lossy();
            let n = info.layout.num_layers as usize;
            let (tx, rx) = mpsc::channel(read_ahead.max(1));
            let (store, info_task) = (Arc::clone(self), Arc::clone(&info));
            tokio::spawn(async move {
                let _lease: Option<Lease> = lease;
                let mut layers = Vec::with_capacity(n);
                let mut kept_any = false;
                for l in 0..n {
                    let r = reader.layer_as(l, keep).await;
                    let ok = r.as_ref().ok().cloned();
                    if tx.send(r).await.is_err() {
                        return; // the reader went away
                    }
                    match ok {
                        Some(b) => {
                            kept_any |= matches!(b, StreamLayer::Encoded { .. });
                            layers.push(b);
                        }
                        None => return,
                    }
                }
                drop(reader);
                // (the decode below is skipped too when another read is promoting the key)
                if i > 0
                    && store.promote_on_hit
                    && let Some(_claim) = store.claim_promotion(&info_task.key)
                {
                    let i2 = &info_task;
                    let (layout, tokens) = (i2.layout, i2.tokens.len());
                    let decode = move || {
                        layers
                            .into_iter()
                            .map(|l| l.decoded(&layout, tokens))
                            .collect::<Result<Vec<Bytes>>>()
                    };
                    // records kept encoded are decoded off the runtime's threads
                    let decoded = if kept_any {
                        tokio::task::spawn_blocking(decode)
                            .await
                            .unwrap_or_else(|e| Err(StoreError::Invalid(e.to_string())))
                    } else {
                        decode()
                    };
                    let Ok(layers) = decoded else {
                        return;
                    };
                    if let Ok(obj) = KvObject::from_info(i2, layers) {
                        store.promote(i, &Arc::new(obj.decoded_from(lossy))).await;
                    }
                }
            });
            return Ok(Some(LayerStream {
                info,
                tier: t.kind(),
                lossy,
                rx,
            }));
        }
        Ok(None)
    }

    /// Copies `obj`, found in tier `found_at`, into every faster tier (best effort).
    ///
    /// A removal racing the promotion wins: after copying, the source tier must still hold
    /// the object, else the copies are removed again. With [`TieredStore::remove`] going
    /// slowest tier first, either this check sees the source's removal, or the removal
    /// reaches the faster tiers after the copy landed (pinned by
    /// `streams::a_removed_object_stays_readable_by_an_open_stream`).
    async fn promote(&self, found_at: usize, obj: &Arc<KvObject>) {
        let key = obj.key();
        for t in self.tiers[..found_at].iter().rev() {
            match t.put(Arc::clone(obj), 0.0).await {
                Ok(out) => self.demote(&out.evicted).await,
                Err(e) => tracing::debug!(%key, error = %e, "promotion skipped"),
            }
        }
        if !self.tiers[found_at].contains(key) {
            for t in &self.tiers[..found_at] {
                if let Err(e) = t.remove(key).await {
                    tracing::warn!(%key, error = %e, "undoing the promotion of a removed object failed");
                }
            }
        }
    }

    /// Write-back: objects evicted from the fastest tier before reaching the slower ones are
    /// written down now.
    async fn demote(&self, evicted: &[(ChunkKey, Option<Arc<KvObject>>)]) {
        if self.write != WritePolicy::WriteBack {
            return;
        }
        for (key, obj) in evicted {
            // the key stays dirty until it is written below, so a flush meanwhile writes it
            // too (a double write is a no-op) instead of returning before it is down
            if !self.dirty.lock().contains(key) {
                continue;
            }
            let Some(obj) = obj else {
                self.dirty.lock().remove(key);
                continue;
            };
            for t in self.tiers[1..].iter().filter(|t| !t.read_only()) {
                if let Err(e) = t.put(Arc::clone(obj), 0.0).await {
                    if skipped_by(t.as_ref(), &e) {
                        tracing::debug!(%key, error = %e, tier = ?t.kind(), "write-back of an evicted object skipped this tier");
                    } else {
                        tracing::warn!(%key, error = %e, tier = ?t.kind(), "write-back of an evicted object failed; it is lost from this tier");
                    }
                }
            }
            self.dirty.lock().remove(key);
        }
    }

    /// Stores `obj`; `cost_s` is the seconds its recomputation would take (for cost-aware
    /// eviction). Content-addressed: storing a key that is already held is a no-op.
    ///
    /// `Ok` means the last local tier written holds the object (the SSD tier when written
    /// through: durable); an error means no tier answers for it as a result of this call.
    /// A tier smaller than the object (it can never hold it: `ssd_bytes = 0`, a long chunk
    /// of a large model) is skipped rather than failing the put; when no tier can hold it
    /// and no remote is handed it, that is the error. A remote tier is handed the object
    /// too, but writes it off the request path.
    ///
    /// Not cancel-safe: a put dropped while a slower tier writes leaves the faster tiers'
    /// copies in place whether or not that write lands (the clean-up of a refused write
    /// above never runs). Run it to completion where the caller may go away: the sidecar's
    /// uploads run in a task of their own, the engine's store-back under `block_on`.
    pub async fn put(&self, obj: KvObject, cost_s: f64) -> Result<()> {
        let obj = Arc::new(obj);
        let key = *obj.key();
        let targets: &[Arc<dyn Tier>] = match self.write {
            WritePolicy::WriteThrough => &self.tiers,
            WritePolicy::WriteBack => &self.tiers[..1],
        };
        // Write-back marks the object dirty before the fastest tier holds it: a concurrent put
        // may evict it the moment it lands, and the eviction must find it dirty to demote it.
        let write_back = self.write == WritePolicy::WriteBack && self.tiers.len() > 1;
        let newly_dirty = write_back && self.dirty.lock().insert(key);
        let mut written = Vec::new();
        let mut last = Ok(());
        // a tier the object can never fit (smaller than the object: `ssd_bytes = 0`, a long
        // chunk of a large model) is skipped, not a failure: the others still hold it
        let mut never_fit = None;
        let (mut accepted, mut to_remote) = (false, false);
        // why a remote did not take the object (down, queue full)
        let mut remote_refused = None;
        for (i, t) in targets.iter().enumerate() {
            if i > 0 && t.read_only() {
                // a read-only tier serves what it holds: the object stays in the tiers
                // above it (memory only; [`TieredStore::writes_durable`] says so)
                continue;
            }
            if t.is_remote() {
                // queued off the request path, and only once the local tiers hold the object
                // (remote tiers sit below them); a failure there is the remote's to count
                if last.is_err() {
                    continue;
                }
                match t.put(Arc::clone(&obj), cost_s).await {
                    Ok(_) => to_remote = true,
                    Err(e) => {
                        tracing::debug!(%key, tier = %t.kind(), error = %e, "remote put not queued");
                        remote_refused.get_or_insert(e);
                    }
                }
                continue;
            }
            last = match t.put(Arc::clone(&obj), cost_s).await {
                Ok(out) => {
                    accepted = true;
                    if newly_dirty && !out.written {
                        // already held: whoever stored it owns its dirtiness
                        self.dirty.lock().remove(&key);
                    }
                    if out.written {
                        written.push(i);
                    }
                    self.demote(&out.evicted).await;
                    Ok(())
                }
                Err(e) if e.never_fits() => {
                    tracing::debug!(%key, tier = ?t.kind(), error = %e, "put skipped a tier it cannot fit");
                    never_fit.get_or_insert(e);
                    continue;
                }
                Err(e) => {
                    if newly_dirty {
                        self.dirty.lock().remove(&key);
                    }
                    tracing::warn!(%key, tier = ?t.kind(), error = %e, "put failed");
                    Err(e)
                }
            };
        }
        if !accepted
            && !to_remote
            && let Some(e) = remote_refused.or(never_fit)
        {
            // no tier holds it nor will (a remote's refusal says more than a tier too small)
            if newly_dirty {
                self.dirty.lock().remove(&key);
            }
            return Err(e);
        }
        // The put stands or falls with the last tier written (the durable one, written
        // through): a faster tier without room is only a slower first hit, but copies of an
        // object the durable tier refused are removed, so that nothing answers a hit for a
        // write that was not acknowledged (pinned by `full_disk::a_refused_write_leaves_no_hit`).
        if last.is_err() {
            for &i in &written {
                if let Err(e) = targets[i].remove(&key).await {
                    tracing::warn!(%key, error = %e, "removing the copy of a refused write failed");
                }
            }
        }
        last
    }

    /// Whether a put acknowledged now survives a restart: written through to a local tier
    /// below the host tier that can write (false: no such tier, write-back, or its directory
    /// is read-only, and new objects are held in memory only).
    pub fn writes_durable(&self) -> bool {
        self.write == WritePolicy::WriteThrough
            && self.tiers[1..]
                .iter()
                .any(|t| !t.is_remote() && !t.read_only())
    }

    /// Counts a use of each of `keys` that did not read it (see [`Tier::touch`]) in every
    /// local tier holding it, so that chunks a request recomputed for speed keep their
    /// standing in eviction. Remote tiers refresh their TTL on reads only.
    pub fn touch(&self, keys: &[ChunkKey]) {
        for t in self.tiers.iter().filter(|t| !t.is_remote()) {
            for k in keys {
                t.touch(k);
            }
        }
    }

    /// Whether `key` is held where it survives a restart: by a tier below the host tier
    /// (for a remote tier, by its presence hint).
    pub fn held_durably(&self, key: &ChunkKey) -> bool {
        self.tiers[1..].iter().any(|t| t.contains(key))
    }

    /// Deletes `key` from every tier, slowest first (see `TieredStore::promote`); false if
    /// no tier held it.
    pub async fn remove(&self, key: &ChunkKey) -> Result<bool> {
        let mut any = false;
        for t in self.tiers.iter().rev() {
            any |= t.remove(key).await?;
        }
        self.dirty.lock().remove(key);
        self.pins.clear(key);
        Ok(any)
    }

    /// Protects `key` from eviction in every local tier (persisted by the SSD tier; a remote
    /// tier keeps objects by its own time to live). When persisting fails, the pin it had
    /// is put back and the error returned.
    pub async fn pin(&self, key: &ChunkKey, pin: Pin) -> Result<()> {
        let before = self.pins.get(key);
        self.pins.set(*key, pin);
        self.persist_pin_or_restore(key, before).await
    }

    /// Removes `key`'s pin, in memory and on the SSD tier; it is then evicted like any other.
    /// When persisting fails, the pin is put back and the error returned.
    pub async fn unpin(&self, key: &ChunkKey) -> Result<()> {
        let before = self.pins.clear(key);
        self.persist_pin_or_restore(key, before).await
    }

    /// Persists `key`'s pin as it now stands (SSD tier); on failure restores `before`.
    async fn persist_pin_or_restore(&self, key: &ChunkKey, before: Option<Pin>) -> Result<()> {
        let Some(s) = &self.ssd else {
            return Ok(());
        };
        let persisted = s.persist_pin(*key).await;
        if persisted.is_err() {
            match before {
                Some(p) => self.pins.set(*key, p),
                None => {
                    self.pins.clear(key);
                }
            }
        }
        persisted
    }

    /// The pins every tier honours (shared with tiers kept outside the store, e.g. blend's
    /// device tier).
    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    /// Leases `key` in every tier that holds it.
    pub fn lease(&self, key: &ChunkKey) -> Vec<Lease> {
        self.tiers.iter().filter_map(|t| t.lease(key)).collect()
    }

    /// Writes dirty objects down (write-back) and makes every tier durable.
    ///
    /// A key leaves the dirty set only once it is written below, so an eviction racing the
    /// flush still finds it dirty and demotes it (a double write is a no-op). As when
    /// evicted objects are written down, read-only tiers, a remote that refuses (down, its
    /// queue full) and a tier the object can never fit are skipped; any other failure is returned after every other object and tier had its
    /// turn, so one failing write never leaves the rest unwritten.
    pub async fn flush(&self) -> Result<()> {
        let mut first_error = None;
        let dirty: Vec<ChunkKey> = self.dirty.lock().iter().copied().collect();
        for key in dirty {
            let obj = match self.tiers[0].get(&key).await {
                Ok(Some(obj)) => obj,
                Ok(None) => continue,
                Err(e) => {
                    first_error.get_or_insert(e);
                    continue;
                }
            };
            let mut written = true;
            // a read-only tier is never written, as by `put`
            for t in self.tiers[1..].iter().filter(|t| !t.read_only()) {
                match t.put(Arc::clone(&obj), 0.0).await {
                    Ok(_) => {}
                    Err(e) if skipped_by(t.as_ref(), &e) => {
                        tracing::debug!(%key, error = %e, tier = ?t.kind(), "flush skipped this tier");
                    }
                    Err(e) => {
                        written = false;
                        first_error.get_or_insert(e);
                    }
                }
            }
            if written {
                self.dirty.lock().remove(&key);
            }
        }
        for t in &self.tiers {
            if let Err(e) = t.flush().await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Statistics of every tier, fastest first.
    pub fn stats(&self) -> Vec<TierStatsSnapshot> {
        self.tiers.iter().map(|t| t.stats()).collect()
    }
}
