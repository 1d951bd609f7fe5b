//! The SSD tier: RocksDB with large values in blob files.
//!
//! Layout in the database:
//! - column family `data` (blob files on): `key ‖ b'h'` → header bytes; `key ‖ b'l' ‖ layer
//!   (u32 big-endian)` → that layer's stored record. One layer is one value, so a layer can be
//!   read alone.
//! - column family `meta`: `key` → [`Meta`] (stored size, codec, times, recompute cost, pin).
//!
//! An object's header, records and meta are written in one `WriteBatch` with a synced WAL:
//! after a crash an object is either wholly present or absent. What RocksDB is assumed to
//! give: atomic, durable batches when `sync` is set, and reads that return what was written
//! or an error. What it is not trusted with: the bytes themselves, which are checked against
//! BLAKE3 checksums on every read.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use rocksdb::{
    ColumnFamilyDescriptor, DB, DBCompressionType, DBPinnableSlice, IteratorMode, Options,
    ReadOptions, SnapshotWithThreadMode, WriteBatch, WriteOptions,
};

use super::key_locks::KeyLocks;
use super::{LayerReader, PutOutcome, Tier, TierKind};
use crate::codec::Codec;
use crate::error::{Result, StoreError};
use crate::index::{Lease, Pin, Pins, TierIndex, Victim};
use crate::key::ChunkKey;
use crate::object::{
    KeepEncoded, KvObject, ObjectHeader, ObjectInfo, StreamLayer, decode_all, decode_header,
    record_as,
};
use crate::policy::PolicyKind;
use crate::stats::TierStats;

const DATA_CF: &str = "data";
const META_CF: &str = "meta";
const META_VERSION: u8 = 1;
/// Most threads one object read uses (one per 512 KiB of records).
const READ_THREADS: usize = 8;

/// Settings of an SSD tier.
#[derive(Debug, Clone)]
pub struct SsdConfig {
    /// The RocksDB directory.
    pub path: PathBuf,
    /// Most stored bytes (headers + records) the tier may hold.
    pub capacity: u64,
    /// Eviction policy.
    pub policy: PolicyKind,
    /// Codec for new objects.
    pub codec: Codec,
    /// Sync the WAL on every write (durable puts). Off only for benchmarks of the raw path.
    pub sync_writes: bool,
    /// Bytes of the filesystem a write leaves free (default [`DEFAULT_MIN_FREE_BYTES`]),
    /// beyond the data RocksDB's memtables still have to flush: a put that would leave less
    /// is refused with [`StoreError::DiskFull`] before RocksDB writes anything. RocksDB itself needs room to flush its memtables; a write that
    /// fails inside RocksDB for lack of space stops every later write until RocksDB's
    /// recovery sees free space again (checked every 5 s), while this check answers
    /// again the moment space is freed (pinned by `full_disk::writes_resume_when_space_is_freed`).
    pub min_free_bytes: u64,
    /// Whether objects stored with a lossy codec may be served (and `codec` may be lossy).
    /// Off by default: a lossy copy never stands in for an exact one unless the deployment
    /// chose it (its accuracy cost is measured in BENCHMARKS.md §6).
    pub serve_lossy: bool,
    /// Files RocksDB keeps open at once, table and blob files together (default
    /// [`DEFAULT_MAX_OPEN_FILES`]; RocksDB raises anything below 20 to 20). Beyond it files are
    /// opened per read and closed again (least recently used first), so a store of thousands
    /// of files stays within a process's descriptor limit — the sidecar reserves descriptors
    /// for the store on that assumption (`limits.max_connections`).
    pub max_open_files: u32,
}

/// Default of [`SsdConfig::max_open_files`]: a quarter of the common 1,024-descriptor soft
/// limit, half of what the sidecar keeps free of connections for the store and the model.
pub const DEFAULT_MAX_OPEN_FILES: u32 = 256;

/// Default of [`SsdConfig::min_free_bytes`]: 64 MiB of headroom for RocksDB's logs,
/// compactions and the meta column family.
pub const DEFAULT_MIN_FREE_BYTES: u64 = 64 << 20;

impl SsdConfig {
    /// A durable tier at `path`: LRU, raw codec, synced writes.
    pub fn new(path: impl Into<PathBuf>, capacity: u64) -> Self {
        Self {
            path: path.into(),
            capacity,
            policy: PolicyKind::Lru,
            codec: Codec::Raw,
            sync_writes: true,
            min_free_bytes: DEFAULT_MIN_FREE_BYTES,
            serve_lossy: false,
            max_open_files: DEFAULT_MAX_OPEN_FILES,
        }
    }
}

/// Bytes available to this process on the filesystem holding `path`.
fn free_bytes(path: &Path) -> std::io::Result<u64> {
    Ok(fs_status(path)?.free)
}

/// What the filesystem holding a directory allows.
struct FsStatus {
    /// Bytes an unprivileged write may still take.
    free: u64,
    /// Mounted read-only, or the directory not writable by this process.
    read_only: bool,
}

fn fs_status(path: &Path) -> std::io::Result<FsStatus> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` is written by the call before it
    // is read (only on success).
    let st = unsafe {
        if libc::statvfs(c.as_ptr(), st.as_mut_ptr()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        st.assume_init()
    };
    // SAFETY: `c` is a valid NUL-terminated path; `access` only reads it.
    let writable = unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0;
    Ok(FsStatus {
        free: (st.f_bavail as u64).saturating_mul(st.f_frsize as u64),
        read_only: st.f_flag & libc::ST_RDONLY != 0 || !writable,
    })
}

/// What the `meta` column family records per object.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Meta {
    /// Header plus records, bytes.
    stored: u64,
    /// The object's codec id (its parameters are in the object header).
    codec_id: u8,
    /// Nanoseconds since the Unix epoch, strictly increasing per tier (a tie-free order).
    created_ns: u64,
    last_access_ns: u64,
    cost_s: f64,
    pin: Option<Pin>,
}

impl Meta {
    const LEN: usize = 1 + 8 + 1 + 8 + 8 + 8 + 1 + 8;

    fn encode(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = META_VERSION;
        b[1..9].copy_from_slice(&self.stored.to_le_bytes());
        b[9] = self.codec_id;
        b[10..18].copy_from_slice(&self.created_ns.to_le_bytes());
        b[18..26].copy_from_slice(&self.last_access_ns.to_le_bytes());
        b[26..34].copy_from_slice(&self.cost_s.to_le_bytes());
        let (kind, until) = match self.pin {
            None => (0u8, 0u64),
            Some(Pin::Hard) => (1, 0),
            Some(Pin::Soft { until_unix_s }) => (2, until_unix_s),
        };
        b[34] = kind;
        b[35..43].copy_from_slice(&until.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != Self::LEN || b[0] != META_VERSION {
            return Err(StoreError::Corrupt(format!(
                "meta record of {} bytes",
                b.len()
            )));
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let pin = match b[34] {
            0 => None,
            1 => Some(Pin::Hard),
            2 => Some(Pin::Soft {
                until_unix_s: u64_at(35),
            }),
            k => return Err(StoreError::Corrupt(format!("pin kind {k}"))),
        };
        Ok(Self {
            stored: u64_at(1),
            codec_id: b[9],
            created_ns: u64_at(10),
            last_access_ns: u64_at(18),
            cost_s: f64::from_le_bytes(b[26..34].try_into().expect("8 bytes")),
            pin,
        })
    }
}

fn header_key(key: &ChunkKey) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[..32].copy_from_slice(&key.0);
    k[32] = b'h';
    k
}

fn layer_key(key: &ChunkKey, layer: usize) -> [u8; 37] {
    let mut k = [0u8; 37];
    k[..32].copy_from_slice(&key.0);
    k[32] = b'l';
    k[33..].copy_from_slice(&(layer as u32).to_be_bytes());
    k
}

/// A RocksDB value kept alive past the read that fetched it. Fields drop in order: the
/// slice before the database handle.
struct PinnedValue {
    slice: DBPinnableSlice<'static>,
    _db: Arc<Inner>,
}

impl AsRef<[u8]> for PinnedValue {
    fn as_ref(&self) -> &[u8] {
        &self.slice
    }
}

/// A RocksDB snapshot kept alive past the call that took it: reads through it see the
/// database as it was then, whatever is deleted or compacted since. Fields drop in order:
/// the snapshot before the database handle.
struct PinnedSnapshot {
    snapshot: SnapshotWithThreadMode<'static, DB>,
    inner: Arc<Inner>,
}

impl PinnedSnapshot {
    fn take(inner: &Arc<Inner>) -> Self {
        // SAFETY: the transmute changes only the lifetime parameter (same type, same layout).
        // The snapshot borrows `inner.db`, which lives inside the `Arc<Inner>` this struct
        // holds and drops after the snapshot (field order), so the borrow never dangles.
        let snapshot: SnapshotWithThreadMode<'static, DB> =
            unsafe { std::mem::transmute(inner.db.snapshot()) };
        Self {
            snapshot,
            inner: Arc::clone(inner),
        }
    }

    /// [`Inner::data_read_opts`] reading at this snapshot. The options point at the
    /// snapshot: they must not outlive `self` (they are built per read).
    fn read_opts(&self) -> ReadOptions {
        let mut r = self.inner.data_read_opts();
        r.set_snapshot(&self.snapshot);
        r
    }
}

/// An SSD-tier object open for reading: its verified header and a snapshot taken before
/// the header was read, so a `DELETE` or an eviction while the reader lives does not take
/// the layers from under it.
struct SsdReader {
    snap: Arc<PinnedSnapshot>,
    header: Arc<ObjectHeader>,
    info: Arc<ObjectInfo>,
}

#[async_trait]
impl LayerReader for SsdReader {
    fn info(&self) -> &Arc<ObjectInfo> {
        &self.info
    }

    fn lossy(&self) -> Option<Codec> {
        self.header.codec.is_lossy().then_some(self.header.codec)
    }

    async fn layer(&mut self, layer: usize) -> Result<Bytes> {
        let layout = self.info.layout;
        let tokens = self.info.tokens.len();
        self.layer_as(layer, decode_all)
            .await?
            .decoded(&layout, tokens)
    }

    async fn layer_as(&mut self, layer: usize, keep: KeepEncoded) -> Result<StreamLayer> {
        let n = self.header.layers.len();
        if layer >= n {
            return Err(StoreError::Invalid(format!("layer {layer} of {n}")));
        }
        let (snap, header) = (Arc::clone(&self.snap), Arc::clone(&self.header));
        tokio::task::spawn_blocking(move || {
            let s = &snap.inner;
            let t = Instant::now();
            let r = s.read_layer(&header, layer, &snap.read_opts(), keep);
            match &r {
                Ok(_) => s.stats.get_latency.record(t.elapsed()),
                Err(e) => {
                    s.drop_if_corrupt(&header.info.key, e);
                }
            }
            r
        })
        .await
        .map_err(|e| StoreError::Invalid(format!("SSD tier task failed: {e}")))?
    }
}

struct Inner {
    db: DB,
    path: PathBuf,
    config: SsdConfig,
    index: Arc<TierIndex>,
    pins: Pins,
    stats: TierStats,
    /// Last-access times not yet written to `meta` (persisted on flush).
    touched: Mutex<HashMap<ChunkKey, u64>>,
    /// The last timestamp handed out by [`Inner::now_ns`].
    clock: AtomicU64,
    /// Opened with RocksDB's read-only mode (the directory could not be written at start):
    /// serves what it holds, never writes.
    opened_read_only: bool,
    /// Why RocksDB stopped accepting writes (damage found while serving), once it has: the
    /// tier then serves what it can read and stores nothing new until the next start moves
    /// it aside ([`DAMAGE_MARKER`]).
    writes_stopped: Mutex<Option<String>>,
    /// Objects held with a lossy codec while lossy objects are not served (found at open:
    /// a tier that does not serve them never writes them): misses left on disk, which a put
    /// of the exact object replaces.
    unserved_lossy: Mutex<HashSet<ChunkKey>>,
    /// One writer per object: a put, a delete and a rewrite of its `meta` record hold the
    /// object's key from their first look at the index to their last write, so none of
    /// them acts on what another is halfway through (pinned by `races.rs`).
    writers: KeyLocks,
}

/// The SSD tier. Cheap to clone.
#[derive(Clone)]
pub struct SsdTier(Arc<Inner>);

impl Inner {
    fn db_err(&self, e: rocksdb::Error) -> StoreError {
        classify(&self.path, e)
    }

    /// Whether the tier cannot write now: opened read-only, or its filesystem turned
    /// read-only (remounted after errors) or unwritable since. Checked before every write,
    /// so RocksDB never meets the condition itself (a write failing inside RocksDB would
    /// stop its writes until a restart).
    fn is_read_only(&self) -> bool {
        self.opened_read_only
            || self.writes_stopped.lock().is_some()
            || fs_status(&self.path).is_ok_and(|f| f.read_only)
    }

    /// A write's error: damage RocksDB found (it stops all writes from then on) makes the
    /// tier read-only for this run and leaves the [`DAMAGE_MARKER`] for the next start.
    fn write_err(&self, e: rocksdb::Error) -> StoreError {
        let e = self.db_err(e);
        // (a flush that needs a blob file that is gone fails the same way every time)
        if let StoreError::Damaged { detail, .. } | StoreError::Db { detail, .. } = &e
            && is_damage(&e)
        {
            self.stop_writes(detail);
        }
        e
    }

    /// Stops writing for this run after damage (`detail`, RocksDB's message) and leaves
    /// the [`DAMAGE_MARKER`] so the next start moves the store aside.
    fn stop_writes(&self, detail: &str) {
        let mut stopped = self.writes_stopped.lock();
        if stopped.is_some() {
            return;
        }
        tracing::error!(path = %self.path.display(), error = %detail, "SSD tier: RocksDB stopped writes after finding damage; serving what it can read, storing nothing new; the store is moved aside at the next start");
        if let Err(io) = std::fs::write(self.path.join(DAMAGE_MARKER), detail) {
            tracing::error!(error = %io, "SSD tier: could not leave the damage marker; remove the store directory by hand");
        }
        *stopped = Some(detail.to_string());
    }

    /// [`StoreError::ReadOnly`] when the tier cannot write now.
    fn check_writable(&self) -> Result<()> {
        if !self.is_read_only() {
            return Ok(());
        }
        Err(StoreError::ReadOnly {
            path: self.path.display().to_string(),
            detail: if self.opened_read_only {
                "opened read-only at start: serving what it holds, storing nothing new".into()
            } else if let Some(why) = self.writes_stopped.lock().as_ref() {
                format!(
                    "RocksDB stopped writes after finding damage ({why}): serving what it can read, storing nothing new until the next start moves the store aside"
                )
            } else {
                "the filesystem is read-only or the directory not writable: serving what it holds, storing nothing new".into()
            },
        })
    }

    fn data(&self) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(DATA_CF)
            .expect("data column family exists")
    }

    fn meta(&self) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(META_CF)
            .expect("meta column family exists")
    }

    fn write_opts(&self) -> WriteOptions {
        let mut w = WriteOptions::default();
        w.set_sync(self.config.sync_writes);
        w
    }

    /// Reads (by `opts`: [`Inner::data_read_opts`], or a snapshot's) and verifies the
    /// header; `Ok(None)` when absent.
    fn read_header(&self, key: &ChunkKey, opts: &ReadOptions) -> Result<Option<ObjectHeader>> {
        let Some(raw) = self
            .db
            .get_pinned_cf_opt(self.data(), header_key(key), opts)
            .map_err(|e| self.db_err(e))?
        else {
            return Ok(None);
        };
        let (h, len) = decode_header(&raw)?;
        if len != raw.len() || h.info.key != *key {
            return Err(StoreError::Corrupt(format!(
                "header stored under {key} does not belong to it"
            )));
        }
        Ok(Some(h))
    }

    /// Options for reads of the data column family: RocksDB's own block checksums are off
    /// there because every header and record is verified against its BLAKE3 checksum. The
    /// table blocks a read passes through (small: headers and blob indexes) stay in RocksDB's
    /// block cache, so a cold read goes to the disk for the layer records alone; the records
    /// themselves live in blob files, which that cache does not hold.
    fn data_read_opts(&self) -> ReadOptions {
        let mut r = ReadOptions::default();
        r.set_verify_checksums(false);
        r
    }

    /// Reads (by `opts`) and verifies layer `layer` of the object `header` describes, kept
    /// encoded when its codec is one of `keep`, decoded otherwise.
    fn read_layer(
        self: &Arc<Self>,
        header: &ObjectHeader,
        layer: usize,
        opts: &ReadOptions,
        keep: KeepEncoded,
    ) -> Result<StreamLayer> {
        let key = &header.info.key;
        let raw = self
            .db
            .get_pinned_cf_opt(self.data(), layer_key(key, layer), opts)
            .map_err(|e| self.db_err(e))?
            .ok_or_else(|| StoreError::Corrupt(format!("object {key} lacks layer {layer}")))?;
        TierStats::add(&self.stats.bytes_out, raw.len() as u64);
        record_as(header, layer, &self.pinned_bytes(raw), keep)
    }

    /// [`Inner::read_layer`] decoded (a raw layer without a copy).
    fn read_decoded(
        self: &Arc<Self>,
        header: &ObjectHeader,
        layer: usize,
        opts: &ReadOptions,
    ) -> Result<Bytes> {
        self.read_layer(header, layer, opts, decode_all)?
            .decoded(&header.info.layout, header.info.tokens.len())
    }

    /// The value RocksDB read, as `Bytes` that keep it (and the database) alive: a raw-codec
    /// layer reaches the caller without a copy.
    fn pinned_bytes(self: &Arc<Self>, slice: DBPinnableSlice<'_>) -> Bytes {
        // SAFETY: the transmute changes only the lifetime parameter (same type, same layout).
        // The slice borrows `self.db`, which lives inside `Arc<Inner>`; `PinnedValue` holds
        // that `Arc` and drops the slice before it (field order), so the borrow never dangles.
        let slice: DBPinnableSlice<'static> = unsafe { std::mem::transmute(slice) };
        Bytes::from_owner(PinnedValue {
            slice,
            _db: Arc::clone(self),
        })
    }

    /// Every layer of the object, read at `snap` (where its header was read). Large objects
    /// are read by several threads at once (a cold read then keeps several requests in
    /// flight on the device); each layer is verified as soon as it arrives.
    fn read_all_layers(
        self: &Arc<Self>,
        header: &ObjectHeader,
        snap: &PinnedSnapshot,
    ) -> Result<Vec<Bytes>> {
        let n = header.layers.len();
        let bytes = header.payload_len();
        let readers = ((bytes >> 19) as usize).clamp(1, READ_THREADS).min(n);
        if readers == 1 {
            let opts = snap.read_opts();
            return (0..n)
                .map(|l| self.read_decoded(header, l, &opts))
                .collect();
        }
        let mut out: Vec<Option<Result<Bytes>>> = (0..n).map(|_| None).collect();
        std::thread::scope(|scope| {
            let slots: Vec<&mut [Option<Result<Bytes>>]> =
                out.chunks_mut(n.div_ceil(readers)).collect();
            for (t, slot) in slots.into_iter().enumerate() {
                let first = t * n.div_ceil(readers);
                scope.spawn(move || {
                    let opts = snap.read_opts();
                    for (j, cell) in slot.iter_mut().enumerate() {
                        *cell = Some(self.read_decoded(header, first + j, &opts));
                    }
                });
            }
        });
        out.into_iter()
            .map(|r| r.expect("every layer slot is filled"))
            .collect()
    }

    /// Turns a failed verification into a miss ([`Inner::drop_if_corrupt`]).
    fn quarantine<T>(&self, key: &ChunkKey, r: Result<Option<T>>) -> Result<Option<T>> {
        match r {
            Err(e) if self.drop_if_corrupt(key, &e) => Ok(None),
            other => other,
        }
    }

    /// When `e` says the object failed verification, or that a database file holding it is
    /// damaged or gone (a deleted or cut blob file, [`is_damage`]): counts it, logs it, drops
    /// the object and returns true. An object from a newer format version counts as a miss
    /// but stays on disk (true as well). Any other error: false, nothing done.
    fn drop_if_corrupt(&self, key: &ChunkKey, e: &StoreError) -> bool {
        match e {
            StoreError::NewerFormat { .. } => {
                TierStats::add(&self.stats.misses, 1);
                tracing::warn!(%key, error = %e, "SSD tier: skipping an object of a newer format");
            }
            StoreError::Checksum { .. }
            | StoreError::Corrupt(_)
            | StoreError::Mismatch(_)
            | StoreError::Damaged { .. } => self.drop_damaged(key, e),
            StoreError::Db { .. } if is_damage(e) => self.drop_damaged(key, e),
            _ => return false,
        }
        true
    }

    /// Counts, logs and drops an object that cannot be read back (see `drop_if_corrupt`).
    fn drop_damaged(&self, key: &ChunkKey, e: &StoreError) {
        TierStats::add(&self.stats.checksum_failures, 1);
        tracing::warn!(%key, error = %e, "SSD tier: object failed verification or its file is gone; dropped and treated as a miss");
        if let Err(e) = self.delete(key) {
            // (a read-only tier keeps the bytes; forgetting the object stops the same miss
            // from being met again and again)
            self.index.remove(key);
            tracing::warn!(%key, error = %e, "SSD tier: could not drop a corrupt object; forgotten for this run");
        }
    }

    /// Whether an object of `header` may be served: a lossy one only when the tier's
    /// config allows lossy objects ([`SsdConfig::serve_lossy`]); otherwise it is a miss,
    /// left on disk (the config may allow it again).
    fn usable(&self, header: &ObjectHeader) -> bool {
        let ok = !header.codec.is_lossy() || self.config.serve_lossy;
        if !ok {
            tracing::debug!(key = %header.info.key, codec = %header.codec, "SSD tier: lossy object not served (serve_lossy is off)");
        }
        ok
    }

    /// Counts a hit of `key`, stored with `codec`.
    fn hit(&self, key: &ChunkKey, codec: Codec) {
        TierStats::add(&self.stats.hits, 1);
        self.stats.hit_codec(codec);
        self.used(key);
    }

    /// Records a use of `key` for eviction and its last-access time (persisted on flush).
    fn used(&self, key: &ChunkKey) {
        self.index.touch(key);
        let now = self.now_ns();
        self.touched.lock().insert(*key, now);
    }

    /// Wall-clock nanoseconds, forced strictly increasing so recorded access order has no ties.
    fn now_ns(&self) -> u64 {
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let prev = self.clock.fetch_max(wall, Ordering::Relaxed);
        if wall > prev {
            wall
        } else {
            self.clock.fetch_add(1, Ordering::Relaxed) + 1
        }
    }

    /// Deletes `key`'s object (header, records, meta) and forgets it; whether it was on
    /// disk. Takes the key's writer lock.
    fn delete(&self, key: &ChunkKey) -> Result<bool> {
        let _writer = self.writers.lock(*key);
        self.delete_locked(key)
    }

    /// [`Inner::delete`] by the holder of `key`'s writer lock.
    fn delete_locked(&self, key: &ChunkKey) -> Result<bool> {
        if self.is_read_only() && !self.index.contains(key) {
            return Ok(false); // nothing of it here to refuse
        }
        self.check_writable()?;
        let existed = self
            .db
            .get_pinned_cf(self.meta(), key.0)
            .map_err(|e| self.db_err(e))?
            .is_some()
            || self
                .db
                .get_pinned_cf(self.data(), header_key(key))
                .map_err(|e| self.db_err(e))?
                .is_some();
        let mut b = WriteBatch::default();
        self.delete_into(&mut b, key);
        self.db
            .write_opt(b, &self.write_opts())
            .map_err(|e| self.write_err(e))?;
        self.index.remove(key);
        self.touched.lock().remove(key);
        self.unserved_lossy.lock().remove(key);
        Ok(existed)
    }

    /// Stores `obj` unless held. Holds the key's writer lock throughout: a second put of the
    /// key waits, then finds it held (acknowledged only once the first is on disk), and a
    /// delete waits for the write to land before removing it.
    fn put_blocking(&self, obj: &KvObject, cost_s: f64) -> Result<PutOutcome> {
        let key = *obj.key();
        let _writer = self.writers.lock(key);
        if self.index.contains(&key) {
            // held already, unless what is held is a lossy object this tier does not serve
            // (a store written with a lossy codec, opened without lossy objects allowed):
            // the exact object replaces it (a lossy codec is only configured when lossy
            // objects are served, so `obj` is stored exactly)
            if !self.unserved_lossy.lock().contains(&key) {
                return Ok(PutOutcome::default());
            }
            self.check_writable()?;
            self.delete_locked(&key)?;
        }
        self.check_writable()?;
        let enc = obj.encode_or_raw(self.config.codec)?;
        let stored = enc.header.stored_len(enc.header_bytes.len());
        self.check_free_space(stored)?;
        let (reservation, victims) = self.index.admit(key, stored, cost_s)?;
        let evicted = self.delete_victims(&victims)?;
        let now = self.now_ns();
        let meta = Meta {
            stored,
            codec_id: enc.header.codec.id(),
            created_ns: now,
            last_access_ns: now,
            cost_s,
            pin: self.pins.get(&key),
        };
        let mut b = WriteBatch::default();
        b.put_cf(self.data(), header_key(&key), &enc.header_bytes);
        for (i, r) in enc.records.iter().enumerate() {
            b.put_cf(self.data(), layer_key(&key, i), r);
        }
        b.put_cf(self.meta(), key.0, meta.encode());
        // on error the reservation is dropped, releasing the bytes: nothing half-written
        self.db
            .write_opt(b, &self.write_opts())
            .map_err(|e| self.write_err(e))?;
        reservation.commit();
        TierStats::add(&self.stats.evictions, evicted as u64);
        TierStats::add(&self.stats.puts, 1);
        TierStats::add(&self.stats.bytes_in, stored);
        Ok(PutOutcome {
            written: true,
            evicted: victims.into_iter().map(|v| (v.key, None)).collect(),
        })
    }

    /// Deletes the objects a put's admission evicted; returns how many it deleted (a victim
    /// put again since its eviction, by a put that took its key in between, is left alone).
    /// When every victim's lock is free, in one batch: all of them or, when the batch fails,
    /// none, and the index holds them again (on disk and counted, as before the put).
    /// Otherwise one at a time, waiting for each lock; a failure indexes that victim and
    /// the ones after it again.
    ///
    /// Called holding the putting key's writer lock. That cannot deadlock: a thread waits
    /// for a key only here, holding no other lock than its own key's (the batch path waits
    /// for none), and only for a key its own admission evicted — which no admission still
    /// writing can be. So each waiter waits for a put admitted after its own, and no chain
    /// of waiters closes into a circle. (Holding one victim's lock while waiting for the
    /// next could: two puts may each have evicted the other's key.)
    fn delete_victims(&self, victims: &[Victim]) -> Result<usize> {
        let free: Option<Vec<_>> = victims
            .iter()
            .map(|v| self.writers.try_lock(v.key).map(|g| (v, g)))
            .collect();
        if let Some(held) = free {
            let gone: Vec<&Victim> = held
                .iter()
                .filter(|(v, _)| !self.index.contains(&v.key))
                .map(|(v, _)| *v)
                .collect();
            self.delete_victim_batch(&gone)?;
            return Ok(gone.len());
        }
        let mut deleted = 0;
        for (i, v) in victims.iter().enumerate() {
            let writer = self.writers.lock(v.key);
            if self.index.contains(&v.key) {
                continue;
            }
            if let Err(e) = self.delete_victim_batch(&[v]) {
                drop(writer);
                for rest in &victims[i + 1..] {
                    let _w = self.writers.lock(rest.key);
                    if !self.index.contains(&rest.key) {
                        self.index.restore(rest.key, rest.size, rest.cost_s);
                    }
                }
                return Err(e);
            }
            deleted += 1;
        }
        Ok(deleted)
    }

    /// Deletes `victims` (whose writer locks the caller holds) in one batch; on failure the
    /// index holds them again.
    fn delete_victim_batch(&self, victims: &[&Victim]) -> Result<()> {
        if victims.is_empty() {
            return Ok(());
        }
        let mut b = WriteBatch::default();
        for v in victims {
            self.delete_into(&mut b, &v.key);
        }
        if let Err(e) = self.db.write_opt(b, &self.write_opts()) {
            for v in victims {
                self.index.restore(v.key, v.size, v.cost_s);
            }
            return Err(self.write_err(e));
        }
        let mut touched = self.touched.lock();
        let mut unserved = self.unserved_lossy.lock();
        for v in victims {
            touched.remove(&v.key);
            unserved.remove(&v.key);
        }
        Ok(())
    }

    /// Adds the deletion of `key`'s header, records and meta to `b`.
    fn delete_into(&self, b: &mut WriteBatch, key: &ChunkKey) {
        b.delete_cf(self.meta(), key.0);
        b.delete_cf(self.data(), header_key(key));
        let mut lo = [0u8; 33];
        lo[..32].copy_from_slice(&key.0);
        lo[32] = b'l';
        let mut hi = lo;
        hi[32] = b'm';
        b.delete_range_cf(self.data(), lo, hi);
    }

    /// Refuses a write of `stored` bytes that would leave less than
    /// [`SsdConfig::min_free_bytes`] free on the filesystem, counting as used the data its
    /// memtables hold (their flush writes it to blob and table files before the log is
    /// dropped).
    fn check_free_space(&self, stored: u64) -> Result<()> {
        let free = free_bytes(&self.path).map_err(|source| StoreError::Io {
            path: self.path.display().to_string(),
            source,
        })?;
        let unflushed = self
            .db
            .property_int_value_cf(self.data(), rocksdb::properties::CUR_SIZE_ALL_MEM_TABLES)
            .ok()
            .flatten()
            .unwrap_or(0);
        let reserve = self.config.min_free_bytes;
        let needed = stored.saturating_add(unflushed).saturating_add(reserve);
        if free >= needed {
            return Ok(());
        }
        Err(StoreError::DiskFull {
            path: self.path.display().to_string(),
            detail: format!(
                "{free} bytes free; this object needs {stored}, unflushed memtables {unflushed}, and {reserve} must stay free (min_free_bytes)"
            ),
        })
    }

    /// Rewrites `key`'s `meta` record, if it has one, changed by `change` and with the pin
    /// it has now, under the key's writer lock (a rewrite racing a delete would otherwise
    /// bring back the meta record of a deleted object: pinned by
    /// `races.rs::meta_rewrites_never_bring_back_a_removed_object`).
    fn rewrite_meta(
        &self,
        key: &ChunkKey,
        opts: &WriteOptions,
        change: impl FnOnce(&mut Meta),
    ) -> Result<()> {
        let _writer = self.writers.lock(*key);
        let Some(raw) = self
            .db
            .get_pinned_cf(self.meta(), key.0)
            .map_err(|e| self.db_err(e))?
        else {
            return Ok(());
        };
        let mut m = Meta::decode(&raw)?;
        change(&mut m);
        m.pin = self.pins.get(key);
        self.db
            .put_cf_opt(self.meta(), key.0, m.encode(), opts)
            .map_err(|e| self.write_err(e))
    }

    fn flush_blocking(&self) -> Result<()> {
        if self.is_read_only() {
            // nothing was written; recent access times are not persisted
            self.touched.lock().clear();
            return Ok(());
        }
        let touched: Vec<(ChunkKey, u64)> = self.touched.lock().drain().collect();
        let mut unsynced = WriteOptions::default();
        unsynced.set_sync(false);
        for (key, at) in touched {
            // one object at a time, under its writer lock: a delete meanwhile either lands
            // first (no meta to rewrite) or after the rewrite (and removes it)
            self.rewrite_meta(&key, &unsynced, |m| {
                m.last_access_ns = m.last_access_ns.max(at);
            })?;
        }
        // memtables to disk (the rewrites' log synced with them): values move to blob
        // files, the WAL can be recycled
        self.db
            .flush_cf(self.data())
            .map_err(|e| self.write_err(e))?;
        self.db
            .flush_cf(self.meta())
            .map_err(|e| self.write_err(e))?;
        self.db.flush_wal(true).map_err(|e| self.write_err(e))
    }
}

/// Maps RocksDB errors onto the store's, recognising a full disk.
fn classify(path: &Path, e: rocksdb::Error) -> StoreError {
    let detail = e.into_string();
    let full = [
        "No space left on device",
        "ENOSPC",
        "File too large",
        "Disk quota exceeded",
    ];
    let path = path.display().to_string();
    let read_only = ["Read-only file system", "EROFS", "Permission denied"];
    if full.iter().any(|m| detail.contains(m)) {
        StoreError::DiskFull { path, detail }
    } else if read_only.iter().any(|m| detail.contains(m)) {
        StoreError::ReadOnly { path, detail }
    } else if detail.contains("Corruption:") {
        StoreError::Damaged { path, detail }
    } else if detail.contains("lock") && detail.contains("LOCK") {
        StoreError::Locked { path, detail }
    } else {
        StoreError::Db { path, detail }
    }
}

/// Options of the whole database (column families have their own, in
/// [`SsdTier::open_as_is`]).
fn db_options(config: &SsdConfig) -> Options {
    let mut o = Options::default();
    let max_open = i32::try_from(config.max_open_files.max(20)).unwrap_or(i32::MAX);
    o.set_max_open_files(max_open);
    // RocksDB's table cache (table and blob files) keeps `max_open − 10` files, split over
    // 2^bits shards of which each may keep at least one: with its default 64 shards a bound
    // of 20 still kept 64 files open. Shards of at least 8 files each make the bound hold.
    let cached = (max_open - 10).max(1);
    o.set_table_cache_num_shard_bits((cached / 8).max(1).ilog2().min(6) as i32);
    o.create_if_missing(true);
    o.create_missing_column_families(true);
    o.set_compression_type(DBCompressionType::None);
    // layer records are read whole and in order: let the kernel read ahead (RocksDB's
    // default FADV_RANDOM made cold 2 MiB reads crawl in readahead-sized pieces)
    o.set_advise_random_on_open(false);
    o
}

/// Whether `e` says the database's files are damaged (what starting over
/// can fix): RocksDB's corruption reports, and its I/O errors on files it expected (a
/// missing table or blob file). Not: another process's lock, a full disk, no permission.
fn is_damage(e: &StoreError) -> bool {
    match e {
        StoreError::Damaged { .. } => true,
        StoreError::Db { detail, .. } => {
            detail.contains("No such file") || detail.contains("unexpected EOF")
        }
        _ => false,
    }
}

/// Renames the directory `path` to `<path>.damaged-<unix seconds>` (a numbered suffix if
/// taken); returns the new path.
/// Written into the store's directory when RocksDB stops writes after finding damage while
/// serving; at the next open the store is moved aside and started empty.
pub const DAMAGE_MARKER: &str = "KVQUILT-DAMAGED";

/// What the damage marker in `path` says, if there is one.
fn needs_recovery(path: &Path) -> Option<String> {
    std::fs::read_to_string(path.join(DAMAGE_MARKER)).ok()
}

fn move_aside(path: &Path) -> Result<PathBuf> {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let name = path
        .file_name()
        .map_or_else(|| "store".into(), |n| n.to_string_lossy().into_owned());
    let io = |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    };
    for n in 0..100 {
        let suffix = if n == 0 {
            String::new()
        } else {
            format!("-{n}")
        };
        let to = path.with_file_name(format!("{name}.damaged-{now}{suffix}"));
        if to.exists() {
            continue;
        }
        std::fs::rename(path, &to).map_err(io)?;
        std::fs::create_dir_all(path).map_err(io)?;
        return Ok(to);
    }
    Err(io(std::io::Error::other(
        "no free name to move the damaged store aside",
    )))
}

impl SsdTier {
    /// Whether the index holds `key`; counts a miss when it does not (no I/O).
    fn held_or_miss(&self, key: &ChunkKey) -> bool {
        let held = self.0.index.contains(key);
        if !held {
            TierStats::add(&self.0.stats.misses, 1);
        }
        held
    }

    /// Opens (or creates) the tier at `config.path` and rebuilds its index from `meta`,
    /// restoring pins into `pins`.
    ///
    /// A cache never refuses to start over its own files: when RocksDB finds them damaged
    /// (a truncated table file, a bad MANIFEST), or the last run's writes were stopped by
    /// damage RocksDB found while serving (the [`DAMAGE_MARKER`] file), the tier moves the
    /// directory aside (`<path>.damaged-<unix seconds>`, kept for inspection; delete it to
    /// reclaim the space) and starts empty, logged and counted ([`TierStats::recoveries`]);
    /// objects lost are misses, recomputed on demand. It does not run RocksDB's repair:
    /// repair drops every blob file (where all layer records live) and leaves the tables
    /// that survive pointing at them, so a later compaction stops all writes, restart after
    /// restart (pinned by `damage::a_damaged_table_among_healthy_ones_never_stops_writes`).
    /// A truncated or altered blob file does not stop the open: its objects fail
    /// verification as they are read, and are misses. A directory that cannot be written
    /// is opened read-only (`SsdTier::open_read_only`). Other errors that are not damage
    /// (another process holds the directory, a full disk) are returned: moving files aside
    /// cannot fix them.
    pub fn open(config: SsdConfig, pins: Pins) -> Result<Self> {
        if config.codec.is_lossy() && !config.serve_lossy {
            return Err(StoreError::Invalid(format!(
                "the SSD codec {} is lossy: it needs serve_lossy (a lossy copy stands in for an exact one only when chosen)",
                config.codec
            )));
        }
        std::fs::create_dir_all(&config.path).map_err(|source| {
            let path = config.path.display().to_string();
            match source.raw_os_error() {
                Some(libc::EROFS | libc::EACCES | libc::EPERM) => StoreError::ReadOnly {
                    path,
                    detail: format!("cannot create the store directory: {source}"),
                },
                _ => StoreError::Io { path, source },
            }
        })?;
        if fs_status(&config.path).is_ok_and(|f| f.read_only) {
            return Self::open_read_only(&config, &pins);
        }
        if let Some(why) = needs_recovery(&config.path) {
            let aside = move_aside(&config.path)?;
            tracing::error!(path = %config.path.display(), %why, moved_to = %aside.display(), "SSD tier: RocksDB stopped writes after finding damage in the last run; store moved aside, starting empty");
            let tier = Self::open_as_is(&config, &pins, false)?;
            TierStats::add(&tier.0.stats.recoveries, 1);
            return Ok(tier);
        }
        let damage = match Self::open_as_is(&config, &pins, false) {
            Err(e) if is_damage(&e) => e,
            Err(StoreError::ReadOnly { .. }) => return Self::open_read_only(&config, &pins),
            other => return other,
        };
        let aside = move_aside(&config.path)?;
        tracing::error!(path = %config.path.display(), error = %damage, moved_to = %aside.display(), "SSD tier: damaged store files moved aside; starting empty");
        let tier = Self::open_as_is(&config, &pins, false)?;
        TierStats::add(&tier.0.stats.recoveries, 1);
        Ok(tier)
    }

    /// Opens the database at an unwritable `config.path` with RocksDB's read-only mode
    /// (no lock, no log, nothing written): a store shipped on a read-only volume, or a
    /// filesystem remounted read-only after errors, still serves its objects; puts and
    /// deletes answer [`StoreError::ReadOnly`] and the [`crate::TieredStore`] keeps new
    /// objects in memory only. A directory holding no database cannot be opened so.
    fn open_read_only(config: &SsdConfig, pins: &Pins) -> Result<Self> {
        let path = config.path.display().to_string();
        match Self::open_as_is(config, pins, true) {
            Ok(t) => {
                tracing::warn!(%path, objects = t.0.index.len(), "SSD tier: the directory is read-only; serving what it holds, storing nothing new (new chunks stay in memory)");
                Ok(t)
            }
            Err(e) => Err(StoreError::ReadOnly {
                path,
                detail: format!("cannot be written, and opening it read-only failed: {e}"),
            }),
        }
    }

    /// Opens the database at `config.path` as it is (no repair) and rebuilds the index
    /// (`read_only`: with RocksDB's read-only mode).
    fn open_as_is(config: &SsdConfig, pins: &Pins, read_only: bool) -> Result<Self> {
        let config = config.clone();
        let pins = pins.clone();
        let mut data_opts = Options::default();
        data_opts.set_compression_type(DBCompressionType::None);
        data_opts.set_enable_blob_files(true);
        data_opts.set_min_blob_size(4096);
        data_opts.set_blob_file_size(256 << 20);
        data_opts.set_blob_compression_type(DBCompressionType::None);
        data_opts.set_enable_blob_gc(true);
        // values leave the memtable for blob files soon: the host tier, not RocksDB's
        // memtable, is the in-memory copy
        data_opts.set_write_buffer_size(16 << 20);
        let mut meta_opts = Options::default();
        meta_opts.set_compression_type(DBCompressionType::None);
        // meta entries are ~50 bytes: a small memtable (the default 64 MiB would also size
        // every preallocated log file)
        meta_opts.set_write_buffer_size(1 << 20);
        let cfs = vec![
            ColumnFamilyDescriptor::new(DATA_CF, data_opts),
            ColumnFamilyDescriptor::new(META_CF, meta_opts),
        ];
        let db = if read_only {
            DB::open_cf_descriptors_read_only(&db_options(&config), &config.path, cfs, false)
        } else {
            DB::open_cf_descriptors(&db_options(&config), &config.path, cfs)
        }
        .map_err(|e| classify(&config.path, e))?;
        let index = Arc::new(TierIndex::new(
            "ssd",
            config.capacity,
            config.policy,
            pins.clone(),
        ));
        let inner = Inner {
            db,
            path: config.path.clone(),
            config,
            index,
            pins,
            stats: TierStats::default(),
            touched: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(0),
            opened_read_only: read_only,
            writes_stopped: Mutex::new(None),
            unserved_lossy: Mutex::new(HashSet::new()),
            writers: KeyLocks::default(),
        };
        let mut metas = Vec::new();
        for item in inner.db.iterator_cf(inner.meta(), IteratorMode::Start) {
            let (k, v) = item.map_err(|e| inner.db_err(e))?;
            let Ok(key) = <[u8; 32]>::try_from(&k[..]) else {
                tracing::warn!(
                    "SSD tier: ignoring a meta entry with a {}-byte key",
                    k.len()
                );
                continue;
            };
            match Meta::decode(&v) {
                Ok(m) => metas.push((ChunkKey(key), m)),
                Err(e) => {
                    tracing::warn!(key = %ChunkKey(key), error = %e, "SSD tier: unreadable meta entry")
                }
            }
        }
        metas.sort_by_key(|(_, m)| m.last_access_ns);
        if let Some((_, m)) = metas.last() {
            inner
                .clock
                .store(m.last_access_ns.max(m.created_ns), Ordering::Relaxed);
        }
        for (key, m) in metas {
            inner.index.restore(key, m.stored, m.cost_s);
            if !inner.config.serve_lossy && Codec::id_is_lossy(m.codec_id) {
                inner.unserved_lossy.lock().insert(key);
            }
            if let Some(p) = m.pin {
                inner.pins.set(key, p);
            }
        }
        Ok(Self(Arc::new(inner)))
    }

    /// Runs blocking RocksDB work off the async runtime.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Arc<Inner>) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = Arc::clone(&self.0);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| StoreError::Invalid(format!("SSD tier task failed: {e}")))?
    }

    /// Pins or unpins `key`, persisting the pin in `meta`.
    pub async fn persist_pin(&self, key: ChunkKey) -> Result<()> {
        self.blocking(move |s| {
            if s.is_read_only() && !s.index.contains(&key) {
                return Ok(()); // held in memory only: so is its pin
            }
            s.check_writable()?;
            s.rewrite_meta(&key, &s.write_opts(), |_| {})
        })
        .await
    }

    /// Reads and verifies every object; returns the keys that failed (and were dropped).
    pub async fn verify_all(&self) -> Result<Vec<ChunkKey>> {
        let this = self.clone();
        let keys = self.keys();
        let mut bad = Vec::new();
        for key in keys {
            if this.get(&key).await?.is_none() {
                bad.push(key);
            }
        }
        Ok(bad)
    }

    /// The RocksDB directory.
    pub fn path(&self) -> &Path {
        &self.0.path
    }
}

#[async_trait]
impl Tier for SsdTier {
    fn kind(&self) -> TierKind {
        TierKind::SSD
    }

    fn contains(&self, key: &ChunkKey) -> bool {
        self.0.index.contains(key)
    }

    fn read_only(&self) -> bool {
        self.0.is_read_only()
    }

    fn touch(&self, key: &ChunkKey) {
        if self.0.index.contains(key) {
            self.0.used(key);
        }
    }

    fn keys(&self) -> Vec<ChunkKey> {
        self.0.index.keys()
    }

    async fn info(&self, key: &ChunkKey) -> Result<Option<Arc<ObjectInfo>>> {
        if !self.held_or_miss(key) {
            return Ok(None);
        }
        let key = *key;
        self.blocking(move |s| {
            let t = Instant::now();
            let h = s.read_header(&key, &s.data_read_opts());
            let h = s.quarantine(&key, h)?.filter(|h| s.usable(h));
            match &h {
                Some(h) => {
                    s.hit(&key, h.codec);
                    s.stats.get_latency.record(t.elapsed());
                }
                None => TierStats::add(&s.stats.misses, 1),
            }
            Ok(h.map(|h| Arc::new(h.info)))
        })
        .await
    }

    async fn reader(&self, key: &ChunkKey) -> Result<Option<Box<dyn LayerReader>>> {
        if !self.held_or_miss(key) {
            return Ok(None);
        }
        let key = *key;
        self.blocking(move |s| {
            let t = Instant::now();
            let snap = PinnedSnapshot::take(s);
            let h = s.read_header(&key, &snap.read_opts());
            let Some(header) = s.quarantine(&key, h)?.filter(|h| s.usable(h)) else {
                TierStats::add(&s.stats.misses, 1);
                return Ok(None);
            };
            s.hit(&key, header.codec);
            s.stats.get_latency.record(t.elapsed());
            let reader = SsdReader {
                info: Arc::new(header.info.clone()),
                header: Arc::new(header),
                snap: Arc::new(snap),
            };
            Ok(Some(Box::new(reader) as Box<dyn LayerReader>))
        })
        .await
    }

    async fn get(&self, key: &ChunkKey) -> Result<Option<Arc<KvObject>>> {
        if !self.held_or_miss(key) {
            return Ok(None);
        }
        let key = *key;
        self.blocking(move |s| {
            let t = Instant::now();
            // header and layers read at one snapshot, as a reader's are: an eviction or a
            // DELETE between them would otherwise read as a damaged object (and drop it)
            let snap = PinnedSnapshot::take(s);
            let r = s
                .read_header(&key, &snap.read_opts())
                .and_then(|h| match h {
                    Some(h) if s.usable(&h) => {
                        let layers = s.read_all_layers(&h, &snap)?;
                        Ok(Some((KvObject::from_parts(&h, layers)?, h.codec)))
                    }
                    _ => Ok(None),
                });
            let r = s.quarantine(&key, r)?;
            match &r {
                Some((_, codec)) => {
                    s.hit(&key, *codec);
                    s.stats.get_latency.record(t.elapsed());
                }
                None => TierStats::add(&s.stats.misses, 1),
            }
            Ok(r.map(|(o, _)| Arc::new(o)))
        })
        .await
    }

    async fn put(&self, obj: Arc<KvObject>, cost_s: f64) -> Result<PutOutcome> {
        self.blocking(move |s| {
            let t = Instant::now();
            let r = s.put_blocking(&obj, cost_s);
            s.stats.put_latency.record(t.elapsed());
            r
        })
        .await
    }

    async fn remove(&self, key: &ChunkKey) -> Result<bool> {
        let key = *key;
        self.blocking(move |s| {
            let existed = s.delete(&key)?;
            if existed {
                TierStats::add(&s.stats.removes, 1);
            }
            Ok(existed)
        })
        .await
    }

    fn lease(&self, key: &ChunkKey) -> Option<Lease> {
        self.0.index.lease(key)
    }

    async fn flush(&self) -> Result<()> {
        self.blocking(|s| s.flush_blocking()).await
    }

    fn stats(&self) -> crate::TierStatsSnapshot {
        let i = &self.0.index;
        let mut s = self
            .0
            .stats
            .snapshot("ssd", i.used(), i.capacity(), i.len() as u64);
        s.extra
            .insert("read_only".into(), u64::from(self.0.is_read_only()));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a write failing on damage does (RocksDB stops all writes once it finds damage
    /// in a compaction or a flush; `write_err` calls `stop_writes` on such an error): the
    /// tier turns read-only for the run, a flush is a no-op, and the next open moves the
    /// store aside and writes again.
    #[tokio::test]
    async fn writes_stopped_by_damage_heal_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let config = SsdConfig::new(&path, 1 << 30);
        let t = SsdTier::open(config.clone(), Pins::default()).unwrap();
        assert!(!t.read_only());
        t.0.stop_writes("Corruption: VersionBuilder: Blob file #10 not found");
        assert!(t.read_only());
        let e = t.0.check_writable().unwrap_err();
        assert!(e.to_string().contains("Blob file #10"), "{e}");
        assert!(path.join(DAMAGE_MARKER).exists());
        t.flush().await.unwrap();
        drop(t);
        let t = SsdTier::open(config, Pins::default()).unwrap();
        assert_eq!(t.stats().recoveries, 1);
        assert!(!t.read_only());
        assert!(!path.join(DAMAGE_MARKER).exists());
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("store.damaged-")
            })
            .collect();
        assert_eq!(aside.len(), 1, "the damaged store is kept aside");
    }

    #[test]
    fn meta_round_trip() {
        let m = Meta {
            stored: 123,
            codec_id: Codec::Lz4.id(),
            created_ns: 5,
            last_access_ns: 9,
            cost_s: 0.25,
            pin: Some(Pin::Soft { until_unix_s: 77 }),
        };
        assert_eq!(Meta::decode(&m.encode()).unwrap(), m);
        assert!(Meta::decode(&m.encode()[..10]).is_err());
    }
}
