//! `kvquilt serve` settings: embedded defaults, then a TOML file, then environment variables
//! and flags (a flag beats its variable, which beats the file).
//!
//! ```toml
//! listen = "127.0.0.1:8077"
//! data_dir = "/var/lib/kvquilt"
//! model = "smollm2-135m-instruct"     # a .gguf, an HF directory or a known name
//! api_tokens = ["change-me-0123"]     # tokens of the default tenant (8+ characters)
//!
//! [limits]
//! max_body_bytes = 16777216            # a JSON request body
//! # max_kv_body_bytes = 402653184      # an uploaded KV object; unset: the largest object
//!                                      #   of max_request_tokens tokens of this model
//! # body_budget_bytes = 1073741824     # bodies being read + KV exports being sent, at
//!                                      #   once; unset: 1 GiB or twice the largest limit
//! tenant_body_share = 0.5              # most of each body budget one tenant holds (with
//!                                      #   tenants configured; 1: no bound)
//! max_request_tokens = 8192
//! max_document_bytes = 262144          # one document's text, checked before tokenizing
//! max_text_bytes = 1048576             # all text of one request, checked first
//! max_chunks = 64
//! max_new_tokens = 4096                # most tokens a completion may ask for (left out:
//!                                      #   512 in chat, 16 in completions, within it)
//! workers = 1                          # model requests computed at once
//! max_queue = 64                       # model requests waiting; more get 503
//! # decode_batch = 4                   # requests decoding together in one model step (at most
//!                                      #   workers decode at once; 0 or 1: each alone); unset:
//!                                      #   workers
//! decode_yield_ms = 100                # a decode step waits at most this long while other
//!                                      #   requests' prompts run to their first token (0: never)
//! header_timeout_s = 30                # a request head must arrive within it; idle
//!                                      #   keep-alive connections close after it
//! body_timeout_s = 60                  # a request body must arrive within it (408)
//! send_timeout_s = 30                  # a client that stops reading this long is cut off
//! max_connections = 1024               # connections served at once (more wait)
//! shutdown_grace_s = 30                # a stop waits this long for requests in flight
//!
//! [store]
//! host_bytes = 2147483648
//! device_bytes = 4294967296            # chunk KV kept in GPU memory (CUDA devices only)
//! ssd_bytes = 68719476736
//! ssd_open_files = 256                 # store files kept open at once (the rest reopened per read)
//! host_policy = "s3fifo"               # what leaves the host tier: s3fifo, lfu, cost-aware, lru
//! stall_ms = 250                       # a store read slower than this is recomputed instead
//!
//! [store.codecs]
//! ssd = "raw"                          # lz4; lossy: int8 (8 bits, best), fp8, fp8sym, kivi4, kivi2 (+lz4)
//! host = "raw"                         # raw: decoded; a lossy one holds more chunks
//! allow_lossy = false                  # lossy codecs cost accuracy: opt in
//! remote = "raw"                       # the remote tier's codec
//!
//! [store.remote]                       # a tier shared by several sidecars (Redis Cluster)
//! seeds = ["10.0.0.5:6379"]            # empty (the default): no remote tier
//! address_map = {}                     # announced node "host:port" -> reachable "host:port"
//! namespace = "default"                # processes share chunks within one namespace
//! stripe_bytes = 4194304               # larger records are striped over several values
//! window = 4                           # calls in flight per object: layers read ahead, write pipelines
//! record_layout = "per-layer"          # each layer on its own shard (bandwidth); "one-shard":
//!                                      #   an object on one shard (a shard down costs only its objects)
//! connect_timeout_ms = 500
//! op_timeout_min_ms = 100              # each call's deadline: from measured RTT and
//! op_timeout_max_ms = 2000             #   bandwidth, within these bounds
//! ttl_s = 86400                        # refreshed on every hit; eviction is the engine's
//! queue = 64                           # objects waiting to be written; more are dropped
//! negative_ttl_ms = 1000               # a miss is remembered this long
//! breaker_failures = 3                 # consecutive failures that mark the remote down
//! breaker_open_ms = 2000               # down this long, then probed
//!
//! [blend]
//! calibration_dir = "/var/lib/kvquilt/calibration"   # default: <cache root>/calibration
//! uncalibrated = "prefix"              # a model without a calibration record serves `blend`
//!                                      # (no ratio) as exact prefix reuse; "blend": opt in
//! fall_back_to_full = true             # reuse/blend run as full prefill when that is
//!                                      # estimated faster; false: always the asked mode
//! prefix_page = 256                    # tokens per page of a long prefix (a conversation's
//!                                      # history), stored and read page by page; 0: whole
//!
//! [[tenants]]
//! name = "acme"
//! tokens = ["acme-secret"]
//! quota_bytes = 10737418240
//! pin_bytes = 1073741824               # its chunks it may keep pinned; default 0: none
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// Everything the server needs, merged from all sources.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The store's directory (RocksDB under `store/`).
    pub data_dir: PathBuf,
    /// Model path or known name; `None` is the default model.
    pub model: Option<String>,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Compute dtype (`f32`, `f16`, `bf16`); `None` is the device's default.
    pub dtype: Option<String>,
    /// Attention implementation: `auto` (the fused kernel on CUDA where it applies),
    /// `reference` or `fused`.
    pub attention: String,
    /// Precision of the CPU's tiled attention products: `bf16` (bf16 inputs, f32 sums, on
    /// CPUs with AVX-512 BF16; f32 elsewhere; the default: needle answers identical to f32's,
    /// BENCHMARKS §5) or `f32`.
    pub cpu_attention: String,
    /// Precision of the CPU's weight products over many rows (prefill, blend's recomputed
    /// rows): `bf16` (bf16 inputs and weights, f32 sums, an f32 model on a CPU with AVX-512
    /// BF16, holding a bf16 copy of its projections; f32 elsewhere; the default: needle and
    /// MuSiQue scores as f32's, BENCHMARKS §5) or `f32`.
    pub cpu_matmul: String,
    /// Precision of the CPU's weight products over the GGUF's blocks (decode steps and
    /// batches, the logits row): `q16` or `q8` (the rows rounded to 16 or 8 bits per 32
    /// values, integer products, an f32 model on a CPU with AVX-512 VNNI; f32 elsewhere;
    /// `q16` is the default, BENCHMARKS §9) or `f32` (each block dequantised, f32
    /// products).
    pub cpu_decode: String,
    /// Bearer tokens of the default tenant.
    pub api_tokens: Vec<String>,
    /// Tenants besides the default one.
    pub tenants: Vec<TenantConfig>,
    /// Request limits.
    pub limits: Limits,
    /// Tier capacities.
    pub store: StoreSettings,
    /// What `blend` means for this model (its calibration).
    pub blend: BlendSettings,
    /// Log level: error, warn, info, debug, trace.
    pub log_level: String,
}

/// A tenant: its own key salt (no cross-tenant hits), tokens and storage quota.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// The tenant's name (its key namespace is `tenant:{name}`).
    pub name: String,
    /// Its bearer tokens.
    pub tokens: Vec<String>,
    /// Most bytes of KV (decoded) this tenant's chunks may occupy; `None` is unlimited; 0:
    /// the tenant stores nothing (every upload or store-back is over quota; its requests are
    /// still served, their chunks computed).
    pub quota_bytes: Option<u64>,
    /// Most bytes of KV (decoded) of its chunks it may keep pinned at once (`POST
    /// /v1/chunks/{id}/pin`); 0 (the default): it pins nothing, pins are then the
    /// operator's alone. Pinned chunks still count against `quota_bytes`.
    #[serde(default)]
    pub pin_bytes: u64,
}

/// Request limits; every one is enforced with a 4xx that names it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest JSON request body, bytes.
    pub max_body_bytes: usize,
    /// Largest uploaded KV object (`PUT /v1/chunks/{id}/kv`), bytes; `None`: the size of
    /// this model's object of `max_request_tokens` tokens (plus 1 MiB of header room).
    pub max_kv_body_bytes: Option<usize>,
    /// Bytes that request bodies being read and KV objects being sent may hold at once;
    /// more wait. `None`: 1 GiB, or twice the largest body limit when that is more.
    pub body_budget_bytes: Option<u64>,
    /// Fraction of each body budget (JSON bodies, KV transfers) one tenant may hold when
    /// tenants are configured (default 0.5; 1: no bound), so one tenant's slow or large
    /// bodies leave the others room. A body larger than a tenant's part takes the whole
    /// part (it is never refused for it alone).
    pub tenant_body_share: f64,
    /// Most prompt tokens in one request (all chunks, prefix and question).
    pub max_request_tokens: usize,
    /// Most bytes of one document's text, checked before it is tokenized.
    pub max_document_bytes: usize,
    /// Most bytes of text in one request (documents, question, system and instruction,
    /// messages — each with 32 bytes for its template markup — prompt, stop strings),
    /// checked before anything is tokenized.
    pub max_text_bytes: usize,
    /// Most chunks (documents) in one request (at most `kvquilt_api::MAX_CHUNKS`, 4,096: a
    /// longer list is refused as the body is read).
    pub max_chunks: usize,
    /// Most tokens one completion may ask for (`max_tokens`; more is a 400). The default,
    /// 4,096, takes what clients commonly ask (LangChain's 1,024, a long answer's 2,048);
    /// a request that names none gets 512 (chat) or 16 (completions) within it, and never
    /// more than fits beside its prompt.
    pub max_new_tokens: usize,
    /// Model requests computed at once. On a GPU with CUDA graphs (a small model) the
    /// sidecar also keeps up to this many graphed caches idle between requests, each holding
    /// its capacity of KV in device memory outside `store.device_bytes` (SmolLM2 in bf16: 23
    /// KiB per row, a request's rows rounded up to 1,024).
    pub workers: usize,
    /// Model requests allowed to wait for a worker; more are refused with 503.
    pub max_queue: usize,
    /// Requests decoding together in one model step
    /// (`kvquilt_blend::Blender::with_decode_batching`; at most `workers` requests decode at
    /// once). 0 or 1: each request decodes alone. Unset (the default): `workers`. Requests
    /// decoding side by side on their own threads compete for the same weights' reads:
    /// batched, 4 requests at 8k on the 8B shape decode 1.4–1.6× their tokens per second on
    /// the H200, and 2–4 on the 2-core CPU VM 1.25–2.1× (a request whose cache goes into a
    /// CUDA graph — the small model's on a GPU — replays it instead, which is faster still;
    /// BENCHMARKS §9, "Batched decoding").
    pub decode_batch: Option<usize>,
    /// Milliseconds a decode step waits, at most, while other requests' prompts run to their
    /// first token (`kvquilt_blend::Blender::with_prompt_priority`): first tokens come before
    /// further tokens, as a scheduler that runs waiting prefills before decode steps does.
    /// On the H200, with 7 requests decoding beside a new one, its first token took 387 ms
    /// without it and 10 ms with the default (BENCHMARKS §9); each decoding request's steps
    /// take longer while prompts run (2.1 → 3.4 ms per token there). 0: decode steps never
    /// wait.
    pub decode_yield_ms: u64,
    /// Quota of the default tenant, bytes (`None`: unlimited; 0 as for a tenant's
    /// `quota_bytes`).
    pub default_quota_bytes: Option<u64>,
    /// Seconds a request head may take to arrive; an idle keep-alive connection is closed
    /// after as long.
    pub header_timeout_s: u64,
    /// Seconds a request body may take to arrive in full (then 408).
    pub body_timeout_s: u64,
    /// Seconds a response may wait for its client to read before the connection is closed.
    pub send_timeout_s: u64,
    /// Connections served at once; more wait to be accepted (lowered at start to fit the
    /// open-file limit).
    pub max_connections: usize,
    /// Seconds a stop waits for requests in flight before it drops their connections.
    pub shutdown_grace_s: u64,
}

/// Store capacities.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSettings {
    /// Host-memory tier, bytes of KV.
    pub host_bytes: u64,
    /// Device tier (chunk KV resident in GPU memory), bytes of KV; used only when the model
    /// runs on a GPU (on the CPU the host tier already holds chunks in memory). 0: off.
    pub device_bytes: u64,
    /// SSD tier, stored bytes.
    pub ssd_bytes: u64,
    /// Files of the SSD tier kept open at once (`kvquilt_kvstore::SsdConfig::max_open_files`,
    /// 20 or more); the sidecar keeps twice as many descriptors free of connections, for the
    /// store, the model and the log.
    pub ssd_open_files: u32,
    /// How the host tier chooses what leaves: `s3fifo` (the default: the best hit rate on
    /// a RAG query stream, BENCHMARKS.md §10), `lfu`, `cost-aware` or `lru`.
    pub host_policy: String,
    /// Milliseconds a store read (opening a chunk, or one layer of it) may take before it
    /// counts as stalled and the chunk is recomputed instead (or 8× what the tier takes when
    /// healthy, if longer): a hung disk or a remote that stops answering costs this much,
    /// never the request (`kvquilt_blend::Blender::with_stall_floor`).
    pub stall_ms: u64,
    /// How the tiers encode objects (`[store.codecs]`).
    pub codecs: CodecSettings,
    /// The shared remote tier (`[store.remote]`); off without seeds.
    pub remote: RemoteSettings,
}

/// The remote tier shared by several sidecars: a Redis Cluster (or Valkey) reached through
/// `seeds`. Field meanings: `kvquilt_kvstore::RemoteConfig`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteSettings {
    /// Seed nodes, `host:port`; empty: no remote tier.
    pub seeds: Vec<String>,
    /// Node addresses the cluster announces (`host:port`) → where this sidecar reaches
    /// them (NAT, proxies).
    pub address_map: std::collections::BTreeMap<String, String>,
    /// Deployment namespace (hashed into every key).
    pub namespace: String,
    /// Most bytes of one value.
    pub stripe_bytes: usize,
    /// Calls in flight per object.
    pub window: usize,
    /// Where written objects' records go: `per-layer` or `one-shard`.
    pub record_layout: String,
    /// Connect timeout, ms.
    pub connect_timeout_ms: u64,
    /// Lower bound of a call's deadline, ms.
    pub op_timeout_min_ms: u64,
    /// Upper bound of a call's deadline, ms.
    pub op_timeout_max_ms: u64,
    /// Time to live of written objects, seconds.
    pub ttl_s: u64,
    /// Write queue length, objects.
    pub queue: usize,
    /// How long a miss is remembered, ms.
    pub negative_ttl_ms: u64,
    /// Consecutive failures that open the breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open, ms.
    pub breaker_open_ms: u64,
}

impl Default for RemoteSettings {
    fn default() -> Self {
        let d = kvquilt_kvstore::RemoteConfig::default();
        Self {
            seeds: Vec::new(),
            address_map: Default::default(),
            namespace: d.namespace,
            stripe_bytes: d.stripe_bytes,
            window: d.window,
            record_layout: d.layout.to_string(),
            connect_timeout_ms: d.connect_timeout.as_millis() as u64,
            op_timeout_min_ms: d.op_timeout_min.as_millis() as u64,
            op_timeout_max_ms: d.op_timeout_max.as_millis() as u64,
            ttl_s: d.ttl.as_secs(),
            queue: d.queue,
            negative_ttl_ms: d.negative_ttl.as_millis() as u64,
            breaker_failures: d.breaker_failures,
            breaker_open_ms: d.breaker_open.as_millis() as u64,
        }
    }
}

impl RemoteSettings {
    /// The remote tier's config, `None` without seeds; values out of range are errors.
    pub fn config(&self, codecs: &CodecSettings) -> Result<Option<kvquilt_kvstore::RemoteConfig>> {
        use std::time::Duration;
        // checked with or without seeds: a typo must not wait for the day seeds are added
        let layout = self
            .record_layout
            .parse()
            .map_err(|e: String| anyhow::anyhow!("store.remote.record_layout: {e}"))?;
        if self.stripe_bytes < 4096 || self.stripe_bytes > 512 << 20 {
            bail!("store.remote.stripe_bytes must be between 4096 and 536870912");
        }
        if self.op_timeout_min_ms == 0 || self.op_timeout_min_ms > self.op_timeout_max_ms {
            bail!("store.remote: need 0 < op_timeout_min_ms <= op_timeout_max_ms");
        }
        // each within what it can mean (and what the caches and queues built from it
        // accept: moka refuses a time to live past 1,000 years, tokio a queue past 2^61)
        const HOUR_MS: u64 = 3_600_000;
        for (name, v, least, most) in [
            ("op_timeout_max_ms", self.op_timeout_max_ms, 1, HOUR_MS),
            ("connect_timeout_ms", self.connect_timeout_ms, 1, HOUR_MS),
            ("negative_ttl_ms", self.negative_ttl_ms, 0, 24 * HOUR_MS),
            ("breaker_open_ms", self.breaker_open_ms, 1, 24 * HOUR_MS),
            ("ttl_s", self.ttl_s, 1, 10 * 365 * 86_400),
            ("window", self.window as u64, 1, 4096),
            ("queue", self.queue as u64, 1, 1_000_000),
            (
                "breaker_failures",
                self.breaker_failures as u64,
                1,
                1_000_000,
            ),
        ] {
            if !(least..=most).contains(&v) {
                bail!("store.remote.{name} must be {least}..={most} (got {v})");
            }
        }
        let codec = codecs.remote_codec()?;
        for seed in &self.seeds {
            if let Err(why) = check_seed(seed) {
                bail!("store.remote.seeds: {seed:?} {why}");
            }
        }
        if let Some(node) = self
            .address_map
            .iter()
            .flat_map(|(k, v)| [k, v])
            .find(|n| !is_host_port(n))
        {
            bail!("store.remote.address_map: {node:?} is not a `host:port` address");
        }
        if self.seeds.is_empty() {
            return Ok(None);
        }
        Ok(Some(kvquilt_kvstore::RemoteConfig {
            namespace: self.namespace.clone(),
            stripe_bytes: self.stripe_bytes,
            window: self.window,
            layout,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            op_timeout_min: Duration::from_millis(self.op_timeout_min_ms),
            op_timeout_max: Duration::from_millis(self.op_timeout_max_ms),
            ttl: Duration::from_secs(self.ttl_s),
            queue: self.queue,
            negative_ttl: Duration::from_millis(self.negative_ttl_ms),
            breaker_failures: self.breaker_failures,
            breaker_open: Duration::from_millis(self.breaker_open_ms),
            codec,
            serve_lossy: codecs.allow_lossy,
            ..kvquilt_kvstore::RemoteConfig::default()
        }))
    }
}

/// Whether `s` reads as `host:port`: a non-empty host, and a port number.
fn is_host_port(s: &str) -> bool {
    s.rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

/// Checks that a seed reads as `host:port` or as a `redis://…` URL (which the client parses
/// itself; a cluster client takes no other scheme, and `rediss://` needs TLS, not built in);
/// `Err` says what is wrong with it.
fn check_seed(s: &str) -> Result<(), &'static str> {
    match s.split_once("://") {
        Some(("rediss", _)) => Err(
            "asks for TLS, which this build's Redis client does not speak (plain TCP only): \
             reach the cluster over a private network or a TLS tunnel, and give its `redis://` \
             or `host:port` address",
        ),
        Some(("redis", rest)) if !rest.is_empty() => Ok(()),
        None if is_host_port(s) => Ok(()),
        _ => Err("is not a `host:port` address or a `redis://` URL"),
    }
}

/// The most model workers a sidecar runs (each holds a model's working memory).
const MAX_WORKERS: usize = 256;

/// The most tokens a request may be allowed (16 Mi; a model's context is far below).
const MAX_REQUEST_TOKENS: usize = 1 << 24;

/// Codecs of the store's tiers: the SSD tier encodes what it writes with `ssd`; the host
/// tier holds exact objects encoded with `host` (raw: decoded, the default). The device
/// tier always holds exact decoded KV.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CodecSettings {
    /// The SSD tier's codec: `raw`, `lz4`, or a lossy one (`int8`, `fp8`, `kivi4`, `kivi2`,
    /// `kivi8`, `int8sym`, `fp8sym`, each optionally `+lz4`; `CodecSpec::parse`), which needs
    /// `allow_lossy`.
    pub ssd: String,
    /// The host tier's codec (the same names): a lossy one holds several times more chunks
    /// in the same memory, each read decoding its layers on the CPU.
    pub host: String,
    /// The remote tier's codec (the same names).
    pub remote: String,
    /// Whether lossy codecs may be used and lossy objects served (they cost accuracy:
    /// BENCHMARKS.md §6). Off: objects stored lossy earlier are misses, left on disk.
    pub allow_lossy: bool,
}

impl Default for CodecSettings {
    fn default() -> Self {
        Self {
            ssd: "raw".into(),
            host: "raw".into(),
            remote: "raw".into(),
            allow_lossy: false,
        }
    }
}

impl CodecSettings {
    /// The SSD codec, checked against `allow_lossy`.
    pub fn ssd_codec(&self) -> Result<kvquilt_kvstore::Codec> {
        self.checked("ssd", &self.ssd)
    }

    /// The host tier's codec, checked against `allow_lossy`.
    pub fn host_codec(&self) -> Result<kvquilt_kvstore::Codec> {
        self.checked("host", &self.host)
    }

    /// The remote tier's codec, checked against `allow_lossy`.
    pub fn remote_codec(&self) -> Result<kvquilt_kvstore::Codec> {
        self.checked("remote", &self.remote)
    }

    fn checked(&self, tier: &str, name: &str) -> Result<kvquilt_kvstore::Codec> {
        let codec = kvquilt_kvstore::Codec::parse(name)
            .map_err(|e| anyhow::anyhow!("store.codecs.{tier}: {e}"))?;
        if codec.is_lossy() && !self.allow_lossy {
            bail!(
                "store.codecs.{tier} = \"{name}\" is lossy: its KV is close to, not equal to, the chunk's (accuracy cost in BENCHMARKS.md §6); set store.codecs.allow_lossy = true in the config (for `precompute`: --allow-lossy) to choose it"
            );
        }
        Ok(codec)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8077)),
            data_dir: default_data_dir(),
            model: None,
            device: "cpu".into(),
            dtype: None,
            attention: "auto".into(),
            cpu_attention: "bf16".into(),
            cpu_matmul: "bf16".into(),
            cpu_decode: "q16".into(),
            api_tokens: Vec::new(),
            tenants: Vec::new(),
            limits: Limits::default(),
            store: StoreSettings::default(),
            blend: BlendSettings::default(),
            log_level: "info".into(),
        }
    }
}

impl Limits {
    /// Requests decoding together in one model step: `decode_batch` when set, else
    /// `workers` (every request that can decode at once).
    pub fn effective_decode_batch(&self) -> usize {
        self.decode_batch.unwrap_or(self.workers)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 16 << 20,
            max_kv_body_bytes: None,
            body_budget_bytes: None,
            tenant_body_share: 0.5,
            max_request_tokens: 8192,
            max_document_bytes: 256 << 10,
            max_text_bytes: 1 << 20,
            max_chunks: 64,
            max_new_tokens: 4096,
            workers: 1,
            max_queue: 64,
            decode_batch: None,
            decode_yield_ms: 100,
            default_quota_bytes: None,
            header_timeout_s: 30,
            body_timeout_s: 60,
            send_timeout_s: 30,
            max_connections: 1024,
            shutdown_grace_s: 30,
        }
    }
}

impl StoreSettings {
    /// The host tier's eviction policy ([`StoreSettings::host_policy`]).
    pub fn host_policy(&self) -> Result<kvquilt_kvstore::PolicyKind> {
        kvquilt_kvstore::PolicyKind::from_name(&self.host_policy).with_context(|| {
            format!(
                "store.host_policy `{}` is not one of s3fifo, lfu, cost-aware, lru",
                self.host_policy
            )
        })
    }
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            host_bytes: 2 << 30,
            device_bytes: 4 << 30,
            ssd_bytes: 64 << 30,
            ssd_open_files: kvquilt_kvstore::DEFAULT_MAX_OPEN_FILES,
            host_policy: "s3fifo".into(),
            stall_ms: kvquilt_blend::DEFAULT_STALL_FLOOR.as_millis() as u64,
            codecs: CodecSettings::default(),
            remote: RemoteSettings::default(),
        }
    }
}

/// The smallest page of a paged prefix `[blend] prefix_page` accepts, tokens: pages are
/// read one by one, so a page of a few tokens makes a long history thousands of reads.
pub const MIN_PREFIX_PAGE: usize = 16;

/// The largest, tokens: a page is stored and read whole (no layer streaming), and a
/// conversation reads only its history's full pages.
pub const MAX_PREFIX_PAGE: usize = 65_536;

/// `[blend]`: where calibration records are, and what an uncalibrated model does with
/// `blend` requests that name no ratio.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlendSettings {
    /// Folder of calibration records (`kvquilt calibrate --out`); `None`: the default,
    /// `<cache root>/calibration`. The records built into kvquilt are consulted after it.
    pub calibration_dir: Option<PathBuf>,
    /// A model without a certified record: `prefix` (default) serves `blend` requests that
    /// give no ratio as exact prefix reuse; `blend` runs kvquilt's uncalibrated default.
    pub uncalibrated: String,
    /// `reuse` and `blend` requests run as full prefill when the cost model estimates that
    /// faster (default; the response says `fell_back_to_full`). Off: every request runs the
    /// mode it asks for, so a repeated approximate request gives the same answer every time,
    /// at the cost of the requests where the mode is slower than full prefill.
    pub fall_back_to_full: bool,
    /// Tokens per page of a prefix longer than one (`kvquilt_blend::Blender::with_prefix_page`,
    /// default [`kvquilt_blend::DEFAULT_PREFIX_PAGE`]): such a prefix — a conversation's
    /// history — is stored and read page by page, so the next turn reads the pages it
    /// shares with this one. 0: every prefix is one object. Sidecars sharing a remote tier
    /// share pages only at one size.
    pub prefix_page: usize,
}

impl Default for BlendSettings {
    fn default() -> Self {
        Self {
            calibration_dir: None,
            uncalibrated: "prefix".into(),
            fall_back_to_full: true,
            prefix_page: kvquilt_blend::DEFAULT_PREFIX_PAGE,
        }
    }
}

impl BlendSettings {
    /// Whether an uncalibrated model blends anyway (`uncalibrated = "blend"`).
    pub fn blend_uncalibrated(&self) -> Result<bool> {
        match self.uncalibrated.as_str() {
            "prefix" => Ok(false),
            "blend" => Ok(true),
            other => bail!("blend.uncalibrated `{other}` is not one of prefix, blend"),
        }
    }

    /// The calibration folder.
    pub fn calibration_dir(&self) -> PathBuf {
        self.calibration_dir
            .clone()
            .unwrap_or_else(kvquilt_blend::calibration::default_dir)
    }
}

/// `~/.local/share/kvquilt` (or `./kvquilt-data` without a home directory).
pub fn default_data_dir() -> PathBuf {
    match std::env::var_os("HOME") {
        Some(h) => Path::new(&h).join(".local/share/kvquilt"),
        None => PathBuf::from("kvquilt-data"),
    }
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))
    }

    /// What this configuration resolves to, a few lines for an operator (`serve
    /// --check-config`): where it listens and stores, the model, the tiers, the remote and the
    /// tenants — token counts, never tokens.
    pub fn summary(&self) -> String {
        let gib = |b: u64| format!("{:.1} GiB", b as f64 / f64::from(1u32 << 30));
        let (store, codecs) = (&self.store, &self.store.codecs);
        let remote = if store.remote.seeds.is_empty() {
            "off".to_string()
        } else {
            format!(
                "{} (namespace {:?}, codec {})",
                store.remote.seeds.join(","),
                store.remote.namespace,
                codecs.remote
            )
        };
        let tenants: Vec<String> = self
            .tenants
            .iter()
            .map(|t| format!("{} (tokens: {})", t.name, t.tokens.len()))
            .collect();
        format!(
            "config OK\n\
             listen    {} (the default tenant's API tokens: {})\n\
             data_dir  {}\n\
             model     {} on {}{}\n\
             store     host {} ({}, {}), ssd {} ({}), device {} (GPU only); lossy codecs {}\n\
             remote    {}\n\
             tenants   {}\n",
            self.listen,
            self.api_tokens.len(),
            self.data_dir.display(),
            self.model.as_deref().unwrap_or("the default model"),
            self.device,
            self.dtype
                .as_deref()
                .map_or(String::new(), |d| format!(" in {d}")),
            gib(store.host_bytes),
            codecs.host,
            store.host_policy,
            gib(store.ssd_bytes),
            codecs.ssd,
            gib(store.device_bytes),
            if codecs.allow_lossy {
                "allowed"
            } else {
                "refused"
            },
            remote,
            if tenants.is_empty() {
                "none besides the default".to_string()
            } else {
                tenants.join(", ")
            },
        )
    }

    /// Checks what cannot be served safely or at all.
    pub fn validate(&self) -> Result<()> {
        kvquilt_model::AttentionKernel::parse(&self.attention)?;
        kvquilt_model::CpuAttentionPrecision::parse(&self.cpu_attention)?;
        kvquilt_model::CpuMatmulPrecision::parse(&self.cpu_matmul)?;
        kvquilt_model::CpuDecodePrecision::parse(&self.cpu_decode)?;
        let any_token =
            !self.api_tokens.is_empty() || self.tenants.iter().any(|t| !t.tokens.is_empty());
        if !self.listen.ip().is_loopback() && !any_token {
            bail!(
                "listening on {} (not loopback) needs at least one API token: pass --api-token or set api_tokens in the config",
                self.listen
            );
        }
        let mut seen = std::collections::HashSet::new();
        for t in self
            .api_tokens
            .iter()
            .chain(self.tenants.iter().flat_map(|t| &t.tokens))
        {
            if t.len() < 8 {
                bail!("an API token is shorter than 8 characters");
            }
            // what an `Authorization: Bearer` header can carry and match exactly: a token
            // with spaces (trimmed when it arrives) or other bytes could never authenticate,
            // or would authenticate as another tenant's token without them
            if !t.bytes().all(|b| b.is_ascii_graphic()) {
                bail!(
                    "an API token holds a space or a character that is not visible ASCII; a token travels in an `Authorization: Bearer` header, so it may hold only visible ASCII"
                );
            }
            if !seen.insert(t) {
                bail!(
                    "an API token is given twice (tokens identify tenants, so each must be unique)"
                );
            }
        }
        if self.log_level.parse::<tracing::Level>().is_err() {
            bail!(
                "log_level {:?}: expected error, warn, info, debug or trace",
                self.log_level
            );
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.tenants {
            if let Some(why) = crate::serve::tenants::tenant_name_problem(&t.name) {
                bail!("tenant name {:?} {why}", t.name);
            }
            if t.name == "default" || !names.insert(&t.name) {
                bail!(
                    "tenant names must be unique, non-empty and not `default` (got `{}`)",
                    t.name
                );
            }
            if t.tokens.is_empty() {
                bail!("tenant `{}` has no tokens", t.name);
            }
        }
        kvquilt_model::DeviceName::parse(&self.device)?;
        if let Some(d) = &self.dtype {
            crate::model_source::parse_dtype(d)?;
        }
        if self
            .blend
            .calibration_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            bail!(
                "blend.calibration_dir is empty; name a directory, or leave it out for the default"
            );
        }
        let l = &self.limits;
        // what sizes pools and per-request buffers: within what a host can hold
        if l.workers > MAX_WORKERS {
            bail!(
                "limits.workers (--workers, KVQUILT_WORKERS) must be at most {MAX_WORKERS} (got {})",
                l.workers
            );
        }
        if l.max_request_tokens > MAX_REQUEST_TOKENS {
            bail!(
                "limits.max_request_tokens must be at most {MAX_REQUEST_TOKENS} (got {})",
                l.max_request_tokens
            );
        }
        if l.max_new_tokens > MAX_REQUEST_TOKENS {
            bail!(
                "limits.max_new_tokens must be at most {MAX_REQUEST_TOKENS} (got {})",
                l.max_new_tokens
            );
        }
        if l.max_chunks > kvquilt_api::MAX_CHUNKS {
            bail!(
                "limits.max_chunks must be at most {} (the most a request is read with; got {})",
                kvquilt_api::MAX_CHUNKS,
                l.max_chunks
            );
        }
        if l.max_kv_body_bytes == Some(0) {
            bail!("limits.max_kv_body_bytes must be at least 1 (0 would refuse every KV upload)");
        }
        if let Some(budget) = l.body_budget_bytes {
            let largest = l.max_body_bytes.max(l.max_kv_body_bytes.unwrap_or(0)) as u64;
            if budget < largest {
                bail!(
                    "limits.body_budget_bytes ({budget}) is below the largest body a request may send ({largest} bytes: limits.max_body_bytes, limits.max_kv_body_bytes)"
                );
            }
        }
        // (max_queue may be 0: no request waits for a worker)
        for (name, v) in [
            ("workers", l.workers),
            ("max_body_bytes", l.max_body_bytes),
            ("max_request_tokens", l.max_request_tokens),
            ("max_document_bytes", l.max_document_bytes),
            ("max_text_bytes", l.max_text_bytes),
            ("max_chunks", l.max_chunks),
            ("max_new_tokens", l.max_new_tokens),
            ("max_connections", l.max_connections),
            ("header_timeout_s", l.header_timeout_s as usize),
            ("body_timeout_s", l.body_timeout_s as usize),
            ("send_timeout_s", l.send_timeout_s as usize),
        ] {
            if v == 0 {
                // the one limit a flag also sets is named by both
                let also = if name == "workers" {
                    " (--workers, KVQUILT_WORKERS)"
                } else {
                    ""
                };
                bail!("limits.{name}{also} must be at least 1 (0 would refuse every request)");
            }
        }
        for (name, v) in [
            ("header_timeout_s", l.header_timeout_s),
            ("body_timeout_s", l.body_timeout_s),
            ("send_timeout_s", l.send_timeout_s),
            ("shutdown_grace_s", l.shutdown_grace_s),
        ] {
            if v > 86_400 {
                bail!("limits.{name} must be at most 86400 (a day; got {v})");
            }
        }
        if !(l.tenant_body_share > 0.0 && l.tenant_body_share <= 1.0) {
            bail!(
                "limits.tenant_body_share must be a fraction in (0, 1] (got {})",
                l.tenant_body_share
            );
        }
        if l.decode_yield_ms > 60_000 {
            bail!(
                "limits.decode_yield_ms must be at most 60000 (a minute per decode step; got {})",
                l.decode_yield_ms
            );
        }
        self.blend.blend_uncalibrated()?;
        let page = self.blend.prefix_page;
        if page != 0 && !(MIN_PREFIX_PAGE..=MAX_PREFIX_PAGE).contains(&page) {
            bail!(
                "blend.prefix_page must be 0 (prefixes kept whole) or {MIN_PREFIX_PAGE}..={MAX_PREFIX_PAGE} tokens \
                 (a page is one stored object, read one after another; got {page})"
            );
        }
        self.validate_store()
    }

    /// The store's part of [`Config::validate`]: what `precompute --config` checks of the
    /// same file (it listens nowhere, and layers its own flags and environment over the
    /// file's model, device and remote seeds afterwards).
    pub fn validate_store(&self) -> Result<()> {
        if self.data_dir.as_os_str().is_empty() {
            bail!("data_dir is empty (it would mean the current directory); name a directory");
        }
        self.store.host_policy()?;
        if !(1..=600_000).contains(&self.store.stall_ms) {
            bail!(
                "store.stall_ms must be 1..=600000 milliseconds (got {})",
                self.store.stall_ms
            );
        }
        if !(20..=1 << 20).contains(&self.store.ssd_open_files) {
            bail!(
                "store.ssd_open_files must be 20..=1048576 (got {})",
                self.store.ssd_open_files
            );
        }
        self.store.codecs.ssd_codec()?;
        self.store.codecs.host_codec()?;
        self.store.remote.config(&self.store.codecs)?;
        if self.store.host_bytes == 0
            && self.store.ssd_bytes == 0
            && self.store.remote.seeds.is_empty()
        {
            bail!(
                "store.host_bytes and store.ssd_bytes are both 0 and no [store.remote] seeds are set: no tier could keep a chunk (give one of them room)"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example in this module's documentation is a valid config, every key of it known.
    #[test]
    fn the_documented_example_parses_and_validates() {
        let source = include_str!("config.rs");
        let example: String = source
            .lines()
            .skip_while(|l| *l != "//! ```toml")
            .skip(1)
            .take_while(|l| *l != "//! ```")
            .map(|l| {
                let line = l.strip_prefix("//! ").or_else(|| l.strip_prefix("//!"));
                format!("{}\n", line.unwrap_or(l))
            })
            .collect();
        assert!(example.contains("[store.remote]"), "{example}");
        let c: Config = toml::from_str(&example).unwrap();
        c.validate().unwrap();
        assert_eq!(c.store.host_policy, "s3fifo");
        assert_eq!(c.tenants.len(), 1);
    }

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let c: Config = toml::from_str(
            "listen = \"0.0.0.0:9000\"\napi_tokens = [\"abcdefgh\"]\n[limits]\nmax_chunks = 3\n",
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.limits.max_chunks, 3);
        assert_eq!(c.limits.max_request_tokens, 8192);
        c.validate().unwrap();
        assert!(toml::from_str::<Config>("listne = \"x\"").is_err());
    }

    /// Values that would panic a cache or queue built from them, size pools past a host,
    /// mean something else than they say, or fail only later: refused by `validate`
    /// (`serve --check-config` and `precompute --config` run it) naming the key.
    #[test]
    fn out_of_range_settings_are_refused_by_name() {
        let refused = |toml: &str, key: &str| {
            let c: Config = toml::from_str(toml).unwrap_or_else(|e| panic!("{toml}: {e}"));
            let e = c.validate().expect_err(toml).to_string();
            assert!(e.contains(key), "{toml}: {e}");
        };
        for (toml, key) in [
            (
                "[store.remote]\nnegative_ttl_ms = 40000000000000\n",
                "negative_ttl_ms",
            ),
            (
                "[store.remote]\nop_timeout_max_ms = 2000000000000\n",
                "op_timeout_max_ms",
            ),
            ("[store.remote]\nqueue = 4000000000000000000\n", "queue"),
            ("[blend]\nprefix_page = 4\n", "prefix_page"),
            ("[store.remote]\nttl_s = 9000000000000000000\n", "ttl_s"),
            (
                "[store.remote]\nconnect_timeout_ms = 0\n",
                "connect_timeout_ms",
            ),
            ("[store.remote]\nbreaker_failures = 0\n", "breaker_failures"),
            ("[store.remote]\nbreaker_open_ms = 0\n", "breaker_open_ms"),
            // checked with no seeds too
            ("[store.remote]\nwindow = 0\n", "window"),
            ("[store.remote]\nstripe_bytes = 0\n", "stripe_bytes"),
            ("[store.codecs]\nremote = \"int7\"\n", "int7"),
            ("[store.remote]\nseeds = [\"\"]\n", "host:port"),
            ("[store.remote]\nseeds = [\"redis://\"]\n", "host:port"),
            (
                "[store.remote]\nseeds = [\"127.0.0.1:7000\"]\naddress_map = {\"x\" = \"y\"}\n",
                "host:port",
            ),
            (
                "[limits]\nworkers = 4000000000000000000\n",
                "limits.workers",
            ),
            (
                "[limits]\nmax_request_tokens = 1000000000000000\n",
                "max_request_tokens",
            ),
            ("[limits]\nmax_kv_body_bytes = 0\n", "max_kv_body_bytes"),
            ("[limits]\nmax_chunks = 4097\n", "max_chunks"),
            (
                "[limits]\nmax_new_tokens = 1000000000000000\n",
                "max_new_tokens",
            ),
            ("[limits]\nbody_budget_bytes = 1024\n", "body_budget_bytes"),
            ("device = \"gpu7\"\n", "gpu7"),
            ("dtype = \"f64\"\n", "f64"),
            ("data_dir = \"\"\n", "data_dir"),
            ("[blend]\ncalibration_dir = \"\"\n", "calibration_dir"),
        ] {
            refused(toml, key);
        }
        // `precompute --config` checks the store's part: a deployment file whose tokens come
        // from the environment (KVQUILT_API_TOKENS) is one it must read
        let c: Config = toml::from_str("listen = \"0.0.0.0:9000\"\n").unwrap();
        assert!(c.validate().is_err());
        c.validate_store().unwrap();
        let c: Config = toml::from_str("[store.remote]\nqueue = 0\n").unwrap();
        assert!(
            c.validate_store().is_err(),
            "the store's checks include the remote's"
        );
        // the bounds themselves are accepted
        let c: Config = toml::from_str(
            "device = \"cuda:1\"\ndtype = \"bf16\"\n[limits]\nworkers = 256\n[store.remote]\nseeds = [\"redis-a:7000\", \"[::1]:7001\", \"redis://redis-b\", \"redis://c:6380/0\"]\nnegative_ttl_ms = 0\n",
        )
        .unwrap();
        c.validate().unwrap();
        // a scheme the client cannot connect with is refused by name, not found out at the
        // first remote read (TLS: the client was built without it)
        for (seed, says) in [
            ("rediss://c:6380/0", "TLS"),
            ("unix:///tmp/redis.sock", "redis://"),
            ("http://c:6379", "redis://"),
        ] {
            let c: Config =
                toml::from_str(&format!("[store.remote]\nseeds = [{seed:?}]\n")).unwrap();
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(seed) && e.contains(says), "{seed}: {e}");
        }
    }

    #[test]
    fn a_lossy_codec_must_be_chosen_explicitly() {
        let parse = |t: &str| toml::from_str::<Config>(t).unwrap();
        assert!(parse("[store.codecs]\nssd = \"lz4\"\n").validate().is_ok());
        let e = parse("[store.codecs]\nssd = \"int8+lz4\"\n")
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("allow_lossy"), "{e}");
        let c = parse("[store.codecs]\nssd = \"int8+lz4\"\nallow_lossy = true\n");
        assert!(c.validate().is_ok());
        assert!(c.store.codecs.ssd_codec().unwrap().is_lossy());
        let e = parse("[store.codecs]\nhost = \"kivi4\"\n")
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("store.codecs.host"), "{e}");
        let e = parse("[store.codecs]\nssd = \"int7\"\n")
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("store.codecs.ssd"), "{e}");
    }

    #[test]
    fn store_policies_and_stall_are_checked() {
        let parse = |t: &str| toml::from_str::<Config>(t).unwrap();
        assert_eq!(
            Config::default().store.host_policy().unwrap(),
            kvquilt_kvstore::PolicyKind::S3Fifo
        );
        let c = parse("[store]\nhost_policy = \"lru\"\nstall_ms = 100\n");
        c.validate().unwrap();
        assert_eq!(
            c.store.host_policy().unwrap(),
            kvquilt_kvstore::PolicyKind::Lru
        );
        let e = parse("[store]\nhost_policy = \"fifo\"\n")
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("store.host_policy"), "{e}");
        let e = parse("[store]\nstall_ms = 0\n").validate().unwrap_err();
        assert!(e.to_string().contains("store.stall_ms"), "{e}");
    }

    #[test]
    fn a_limit_of_zero_is_refused_by_name() {
        let parse = |t: &str| toml::from_str::<Config>(t).unwrap();
        for name in [
            "workers",
            "max_body_bytes",
            "max_chunks",
            "max_new_tokens",
            "max_connections",
            "header_timeout_s",
            "body_timeout_s",
        ] {
            let e = parse(&format!("[limits]\n{name} = 0\n"))
                .validate()
                .unwrap_err();
            assert!(e.to_string().contains(&format!("limits.{name}")), "{e}");
        }
        assert!(parse("[limits]\nmax_queue = 0\n").validate().is_ok());
    }

    #[test]
    fn cpu_precisions_are_checked() {
        let parse = |t: &str| toml::from_str::<Config>(t).unwrap();
        assert_eq!(Config::default().cpu_decode, "q16");
        for ok in [
            "cpu_decode = \"f32\"",
            "cpu_decode = \"q8\"",
            "cpu_matmul = \"f32\"",
        ] {
            assert!(parse(ok).validate().is_ok(), "{ok}");
        }
        for (bad, word) in [
            ("cpu_decode = \"q4\"", "decode"),
            ("cpu_matmul = \"f16\"", "matmul"),
            ("cpu_attention = \"q8\"", "attention"),
        ] {
            let e = parse(bad).validate().unwrap_err();
            assert!(e.to_string().contains(word), "{bad}: {e}");
        }
    }

    #[test]
    fn log_levels_and_tenant_names_are_checked() {
        let parse = |t: &str| toml::from_str::<Config>(t).unwrap();
        assert!(parse("log_level = \"WARN\"\n").validate().is_ok());
        let e = parse("log_level = \"verbose\"\n").validate().unwrap_err();
        assert!(e.to_string().contains("verbose"), "{e}");
        for (name, why) in [(" acme", "white space"), ("a\\u0007b", "control character")] {
            let t = format!("[[tenants]]\nname = \"{name}\"\ntokens = [\"abcdefgh\"]\n");
            let e = parse(&t).validate().unwrap_err();
            assert!(e.to_string().contains(why), "{name:?}: {e}");
        }
    }

    /// A token that differs from another only by white space authenticated as the other
    /// (the header is trimmed), and one with spaces around it never authenticated (found by a
    /// security probe): both are refused at start.
    #[test]
    fn tokens_a_header_cannot_carry_exactly_are_refused() {
        let parse = |t: &str| toml::from_str::<Config>(t).unwrap();
        for bad in [
            "abcdefgh1 ",
            " abcdefgh1",
            "abcd efgh1",
            "        ",
            "abcdefgh\t",
            "abcdéfgh1",
        ] {
            let t = format!(
                "api_tokens = [\"abcdefgh1\"]\n[[tenants]]\nname = \"b\"\ntokens = [\"{bad}\"]\n"
            );
            let e = parse(&t).validate().unwrap_err();
            assert!(e.to_string().contains("visible ASCII"), "{bad:?}: {e}");
        }
        let ok = "api_tokens = [\"abcdefgh1\"]\n[[tenants]]\nname = \"b\"\ntokens = [\"abc-DEF_gh.2~+/=\"]\n";
        assert!(parse(ok).validate().is_ok());
    }

    #[test]
    fn the_remote_record_layout_is_checked() {
        let parse = |t: &str| toml::from_str::<Config>(t).unwrap();
        let remote = |layout: &str| {
            format!("[store.remote]\nseeds = [\"127.0.0.1:7000\"]\nrecord_layout = \"{layout}\"\n")
        };
        let c = parse(&remote("one-shard"));
        let r = c.store.remote.config(&c.store.codecs).unwrap().unwrap();
        assert_eq!(r.layout, kvquilt_kvstore::RecordLayout::OneShard);
        let c = parse("[store.remote]\nseeds = [\"127.0.0.1:7000\"]\n");
        let r = c.store.remote.config(&c.store.codecs).unwrap().unwrap();
        assert_eq!(
            r.layout,
            kvquilt_kvstore::RecordLayout::PerLayer,
            "the default"
        );
        let e = parse(&remote("striped")).validate().unwrap_err();
        assert!(
            format!("{e:#}").contains("record_layout") && format!("{e:#}").contains("striped"),
            "{e:#}"
        );
        // a typo is refused without seeds too (found by a probe: it waited for the seeds)
        let e = parse("[store.remote]\nrecord_layout = \"per_layer\"\n")
            .validate()
            .unwrap_err();
        assert!(format!("{e:#}").contains("per_layer"), "{e:#}");
    }

    /// A store with no room anywhere and no remote would answer every upload with 507 and
    /// keep nothing (found by a probe): refused at start.
    #[test]
    fn a_store_that_could_keep_nothing_is_refused() {
        let parse = |t: &str| toml::from_str::<Config>(t).unwrap();
        let e = parse("[store]\nhost_bytes = 0\nssd_bytes = 0\n")
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("no tier could keep a chunk"), "{e}");
        for ok in [
            "[store]\nhost_bytes = 0\n",
            "[store]\nssd_bytes = 0\n",
            "[store]\nhost_bytes = 0\nssd_bytes = 0\n[store.remote]\nseeds = [\"127.0.0.1:7000\"]\n",
        ] {
            assert!(parse(ok).validate().is_ok(), "{ok}");
        }
    }

    #[test]
    fn the_store_s_open_file_bound_is_checked() {
        let parse = |t: &str| toml::from_str::<Config>(t).unwrap();
        assert_eq!(
            Config::default().store.ssd_open_files,
            kvquilt_kvstore::DEFAULT_MAX_OPEN_FILES
        );
        for bad in ["0", "19", "2000000"] {
            let e = parse(&format!("[store]\nssd_open_files = {bad}\n"))
                .validate()
                .unwrap_err();
            assert!(e.to_string().contains("store.ssd_open_files"), "{e}");
        }
        assert!(parse("[store]\nssd_open_files = 20\n").validate().is_ok());
    }

    #[test]
    fn decode_batching_defaults_to_the_workers() {
        let parse = |t: &str| toml::from_str::<Config>(t).unwrap().limits;
        let unset = parse("[limits]\nworkers = 4\n");
        assert_eq!(unset.decode_batch, None);
        assert_eq!(unset.effective_decode_batch(), 4);
        assert_eq!(
            Limits::default().effective_decode_batch(),
            1,
            "one worker: alone"
        );
        let off = parse("[limits]\nworkers = 4\ndecode_batch = 0\n");
        assert_eq!(off.effective_decode_batch(), 0);
        let set = parse("[limits]\nworkers = 8\ndecode_batch = 3\n");
        assert_eq!(set.effective_decode_batch(), 3);
    }

    #[test]
    fn decode_yields_are_bounded() {
        let parse = |t: &str| toml::from_str::<Config>(t).unwrap();
        assert_eq!(Limits::default().decode_yield_ms, 100);
        assert!(parse("[limits]\ndecode_yield_ms = 0\n").validate().is_ok());
        let e = parse("[limits]\ndecode_yield_ms = 60001\n")
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("limits.decode_yield_ms"), "{e}");
    }

    #[test]
    fn non_loopback_needs_a_token() {
        let c = Config {
            listen: "0.0.0.0:1".parse().unwrap(),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("API token"));
        assert!(Config::default().validate().is_ok());
    }
}
