//! Operations: `/health` and `/v1/stats`.

use serde::{Deserialize, Serialize};

/// `GET /health`: answered without the model pool or the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Health {
    /// Always `ok` when the server answers.
    pub status: String,
    /// The served model's name.
    pub model: String,
    /// Seconds since start-up.
    pub uptime_s: f64,
}

/// A latency histogram: `counts[i]` observations fell in `(bounds_s[i-1], bounds_s[i]]`, the
/// last count above every bound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Histogram {
    /// Upper bounds, seconds.
    pub bounds_s: Vec<f64>,
    /// Observations per bucket (one more than `bounds_s`).
    pub counts: Vec<u64>,
    /// Sum of all observations, seconds.
    pub sum_s: f64,
    /// Number of observations.
    pub count: u64,
}

/// One tier's counters since start-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TierStats {
    /// `gpu`, `host`, `ssd` or `remote`.
    pub tier: String,
    /// Lookups it answered.
    pub hits: u64,
    /// Lookups it could not answer.
    pub misses: u64,
    /// Bytes written into it (stored size).
    pub bytes_in: u64,
    /// Bytes read out of it (stored size).
    pub bytes_out: u64,
    /// Objects written.
    pub puts: u64,
    /// Objects removed on request.
    pub removes: u64,
    /// Objects evicted for room.
    pub evictions: u64,
    /// Reads that failed verification (each dropped the object).
    pub checksum_failures: u64,
    /// Times the tier found its files damaged at start and repaired them or moved them
    /// aside (a cache never refuses to start over its own files).
    #[serde(default)]
    pub recoveries: u64,
    /// Hits by the codec family of the object served (`raw`, `lz4`, `fp8`, `int8`, `kivi`).
    #[serde(default)]
    pub hits_by_codec: std::collections::BTreeMap<String, u64>,
    /// Bytes held now.
    pub used_bytes: u64,
    /// Most bytes it may hold.
    pub capacity_bytes: u64,
    /// Objects held now.
    pub objects: u64,
    /// Read latency.
    pub get_latency: Histogram,
    /// Write latency.
    pub put_latency: Histogram,
    /// Counters only some tiers have, by name. The remote tier: `partial_reads` (a stripe
    /// missing), `timeouts`, `errors`, `skipped_down` (calls not made, breaker open),
    /// `dropped_puts` (queue full or remote down), `put_failures`, `negative_hits`,
    /// `pending_writes`, `breaker_state` (0 closed, 1 open, 2 half-open),
    /// `breaker_opens`, `rtt_us`, `bandwidth_bytes_per_s` (as measured).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub extra: std::collections::BTreeMap<String, u64>,
}

/// The model pool's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PoolStats {
    /// Model requests computed at once.
    pub workers: usize,
    /// Requests computing now.
    pub running: usize,
    /// Requests waiting for a worker.
    pub waiting: usize,
}

/// The caller's tenant and its storage use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TenantUsage {
    /// The tenant's name (`default` without tenants).
    pub name: String,
    /// Decoded KV bytes of its stored chunks.
    pub used_bytes: u64,
    /// Its quota, bytes; absent: unlimited.
    pub quota_bytes: Option<u64>,
    /// Decoded KV bytes of its chunks pinned now (pins whose time to live lapsed not
    /// counted).
    #[serde(default)]
    pub pinned_bytes: u64,
    /// Most bytes it may keep pinned; absent: no limit (the operator, the default tenant);
    /// 0: it may not pin.
    #[serde(default)]
    pub pin_bytes: Option<u64>,
}

/// `GET /v1/stats`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Stats {
    /// The served model's name.
    pub model: String,
    /// Seconds since start-up.
    pub uptime_s: f64,
    /// Every tier a request reads, fastest first: store-wide figures, shown to the default
    /// tenant (the operator) only; empty for any other tenant.
    pub tiers: Vec<TierStats>,
    /// The model pool: server-wide, shown to the default tenant only (its counts follow
    /// other tenants' requests); absent for any other tenant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolStats>,
    /// The caller's tenant.
    pub tenant: TenantUsage,
    /// Measured prefill time of 1,000 tokens, seconds: learned from every tenant's requests,
    /// so shown to the default tenant only; absent before the first prefill and for any
    /// other tenant.
    pub prefill_s_per_1k_tokens: Option<f64>,
    /// What this sidecar's chunk keys derive from beside the tenant's namespace: sidecars
    /// share stored chunks (uploaded objects; a remote tier's, whose keys also carry
    /// `store.remote.namespace`) only when these are equal — compare them when two never
    /// hit each other's chunks. Absent in answers of older sidecars.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_identity: Option<KeyIdentity>,
}

/// The parts of a sidecar's chunk keys that come from its model ([`Stats::key_identity`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct KeyIdentity {
    /// BLAKE3 (64 hex digits) of the architecture, every config value, the weights, the
    /// compute dtype and the chunk encoding.
    pub model: String,
    /// BLAKE3 (64 hex digits) of the tokenizer's serialized form.
    pub tokenizer: String,
    /// The layout of the KV it stores.
    pub layout: crate::Layout,
    /// How it prefills a chunk for storage.
    pub chunk_encoding: String,
}
