//! The blender: resolves each segment of a prompt to stored KV (or computes and stores it),
//! then assembles the context by the requested mode.
//!
//! Its methods block (model compute, and store reads through `rt`): call them from a
//! blocking thread (`spawn_blocking`, a model pool), never from inside an async task.
//!
//! The steps of a request, one module each:
//! - [`chain`]: prefix chains, exact KV stored link by link (`prefix` mode's prompt, and
//!   a long prefix's pages in every mode).
//! - [`plan`]: per unique segment, where its KV will come from and what that is estimated to
//!   cost; and when the whole request runs as full prefill instead.
//! - [`sources`]: materialising the plan (streams, device-tier hits, computed segments),
//!   feeding the forward pass layer by layer, and making chunks resident afterwards.
//! - [`modes`]: one runner per [`Mode`].
//! - [`store_back`]: storing what a request computed, after its first token.
//! - [`answer`]: a turn's answer kept as the pages the next turn of a conversation reads.

mod answer;
mod chain;
mod modes;
mod plan;
mod sources;
mod store_back;

pub use store_back::StoreBack;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvquilt_kvstore::{
    ChunkKey, KeepEncoded, PolicyKind, TierKind, TierStatsSnapshot, TieredStore, decode_all,
};
use kvquilt_model::staging::Uploader;
use kvquilt_model::{KvCache, Model};
use tokio::runtime::Handle;

use crate::batcher::DecodeBatcher;
use crate::chunk::ChunkCodec;
use crate::config::Mode;
use crate::cost::CostModel;
use crate::device_tier::DeviceTier;
use crate::error::{Result, invalid};
use crate::identity::ModelIdentity;
use crate::pinned_host::PinnedHost;
use crate::priority::{DEFAULT_PROMPT_PRIORITY, PromptPriority};
use crate::request::{BlendOutput, BlendRequest, StoredObject};

/// Default of [`Blender::with_stall_floor`]: a local read never legitimately takes this
/// long for one layer or header, and a recompute of a typical chunk costs about as much.
pub const DEFAULT_STALL_FLOOR: Duration = Duration::from_millis(250);

/// A store read counts as stalled past this many times its estimated duration (and past
/// the floor).
pub const STALL_FACTOR: f64 = 8.0;

/// Default of [`Blender::with_prefix_page`], tokens: LMCache's chunk size. Large enough that
/// a page's object overhead (header, per-record checksums, a store entry) is small beside
/// its KV, small enough that a turn's new history is mostly in full pages.
pub const DEFAULT_PREFIX_PAGE: usize = 256;

/// What [`Blender::precompute`] did for one chunk.
#[derive(Debug, Clone)]
pub struct Precomputed {
    /// The chunk's key in the caller's namespace.
    pub key: ChunkKey,
    /// The chunk's length in tokens.
    pub tokens: usize,
    /// The tier that already held it, or `None` when it was computed and stored now.
    pub found_in: Option<TierKind>,
}

/// A model, its identity and a store: everything a request needs.
///
/// Shared by every request of a process; each request's own state lives in its runner
/// (`engine/modes/`).
pub struct Blender {
    model: Arc<Model>,
    identity: ModelIdentity,
    store: Arc<TieredStore>,
    /// The runtime store futures are driven on (with `block_on`, from a blocking thread).
    rt: Handle,
    costs: CostModel,
    /// Whether `reuse` and `blend` may run as full prefill ([`Blender::with_fallback_to_full`]).
    fallback_to_full: bool,
    /// Chunk KV resident on the model's device, above the store's tiers; `None`: off.
    device_tier: Option<Arc<DeviceTier>>,
    /// Host→device copies of store hits (pinned staging on CUDA), shared by all requests.
    uploader: Arc<Uploader>,
    /// The shortest wait for a store read before it counts as stalled ([`Blender::with_stall_floor`]).
    stall_floor: Duration,
    /// Which codecs' records are dequantised where the model runs ([`Blender::with_device_decode`]).
    device_codecs: KeepEncoded,
    /// Graphed caches kept between requests ([`Blender::with_graphs`]); `None`: off.
    #[cfg(feature = "gpu")]
    graphs: Option<Arc<crate::graphs::GraphPool>>,
    /// Concurrent requests' decode steps run together ([`Blender::with_decode_batching`]);
    /// `None`: off.
    batcher: Option<DecodeBatcher>,
    /// Prompts on their way to a first token, which decode steps yield to
    /// ([`Blender::with_prompt_priority`]).
    priority: PromptPriority,
    /// Tokens per page of a long prefix ([`Blender::with_prefix_page`]); 0: never paged.
    prefix_page: usize,
}

/// Whether graphs pay for `model` by default ([`Blender::with_graphs`]).
fn graphs_pay(model: &Model) -> bool {
    crate::graphs::launch_bound(model.config(), model.dtype())
}

/// The codecs [`Blender::with_device_decode`] keeps encoded up to the model's device: fp8,
/// int8 and KIVI stored without lz4 (`CodecSpec::has_record_plan`: their records are what
/// the dequant kernel reads).
pub fn device_decoded(codec: kvquilt_kvstore::Codec) -> bool {
    codec.has_record_plan()
}

impl Blender {
    /// A blender over `model` (whose identity is `identity`) and `store`, driving store
    /// futures on `rt`; fallback to full prefill on, device tier off. With the model on a
    /// CUDA device, the store's host tier places objects it admits from now on in
    /// page-locked memory of this blender's uploader (`pinned_host.rs`), unless the store's
    /// host memory was already set.
    pub fn new(
        model: Arc<Model>,
        identity: ModelIdentity,
        store: Arc<TieredStore>,
        rt: Handle,
    ) -> Self {
        let uploader = Arc::new(Uploader::new());
        let device_codecs: KeepEncoded = if model.device().is_cuda() {
            device_decoded
        } else {
            decode_all
        };
        if model.device().is_cuda() {
            let pinned = PinnedHost::new(Arc::clone(&uploader), model.device().clone());
            store.set_host_memory(Arc::new(pinned));
        }
        let c = model.config();
        let costs = CostModel::with_pair_work(crate::cost::pair_work(
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
            c.intermediate_size,
        ));
        let b = Self {
            model,
            identity,
            store,
            rt,
            costs,
            fallback_to_full: true,
            device_tier: None,
            uploader,
            stall_floor: DEFAULT_STALL_FLOOR,
            device_codecs,
            #[cfg(feature = "gpu")]
            graphs: None,
            batcher: None,
            priority: PromptPriority::new(DEFAULT_PROMPT_PRIORITY),
            prefix_page: DEFAULT_PREFIX_PAGE,
        };
        let launch_bound = graphs_pay(&b.model);
        b.with_graphs(launch_bound)
    }

    /// Whether a `reuse` request whose chunks are all on the model's device already (the
    /// device tier, or computed now) runs its question as a CUDA graph replayed from a pool
    /// kept between requests (`graphs.rs`): the same kernels, no per-kernel host
    /// cost. It runs where it can (a `gpu` build, a CUDA model in bf16 or f16 whose attention
    /// runs fused); a question longer than a graph takes, or chunks streaming from a store
    /// tier (whose layers the eager pass overlaps with compute), run eagerly as before.
    /// Default: on for a model whose question pass is bound by launching kernels
    /// (`graphs::launch_bound`: SmolLM2's reuse 4.4 → 3.4 ms on the H200), off for
    /// one bound by its weights' reads (the 8B shape's: 8.1 → 11.7 ms, BENCHMARKS §5).
    #[cfg_attr(not(feature = "gpu"), allow(unused_mut))]
    pub fn with_graphs(mut self, on: bool) -> Self {
        #[cfg(feature = "gpu")]
        {
            let can = self.model.fused_attention_unsupported().is_none();
            // a new pool keeps as many idle caches as the one it replaces
            let keep = self.graphs.as_ref().map(|p| p.kept());
            self.graphs = (on && can).then(Arc::<crate::graphs::GraphPool>::default);
            if let (Some(pool), Some(keep)) = (&self.graphs, keep) {
                pool.keep(keep);
            }
        }
        #[cfg(not(feature = "gpu"))]
        let _ = on;
        self
    }

    /// Whether stored layers of a device-decoded codec ([`device_decoded`]: fp8, int8, KIVI)
    /// cross to the model's device as stored and are dequantised there
    /// (`kvquilt_model::dequant`), instead of being decoded on the CPU by the store. Default:
    /// on for a CUDA model (8-bit: a quarter of f32's bytes, half of bf16's, over PCIe; KIVI-4
    /// about half of that again; and no CPU decode on the path), off on the CPU
    /// (on, the CPU runs the same formula after the read instead of inside it; both give the
    /// same bits, pinned by `blend/tests/device_decode.rs`).
    pub fn with_device_decode(mut self, on: bool) -> Self {
        self.device_codecs = if on { device_decoded } else { decode_all };
        self
    }

    /// How long a store read may take before it counts as stalled: opening an object, or
    /// one layer, that takes longer than `floor` and [`STALL_FACTOR`] times the cost model's
    /// estimate for it is abandoned and the chunk recomputed (a hung or slow disk, a remote
    /// that stops answering costs a recompute plus this wait, never the request). Default
    /// [`DEFAULT_STALL_FLOOR`].
    pub fn with_stall_floor(mut self, floor: Duration) -> Self {
        self.stall_floor = floor;
        self
    }

    /// Keeps up to `capacity` bytes of chunk KV resident on the model's device (GPU memory
    /// under CUDA), evicting by `policy` and honouring the store's pins. Chunks enter after a
    /// `reuse` or `blend` request has read or computed them; later requests take them from
    /// there without a store read or a host→device copy. 0 bytes: off.
    pub fn with_device_tier(mut self, capacity: u64, policy: PolicyKind) -> Self {
        self.device_tier = (capacity > 0)
            .then(|| Arc::new(DeviceTier::new(capacity, policy, self.store.pins().clone())));
        self
    }

    /// The device tier, when on.
    pub fn device_tier(&self) -> Option<&DeviceTier> {
        self.device_tier.as_deref()
    }

    /// Statistics of every tier a request reads, top first: the device tier (when on), then
    /// the store's.
    pub fn tier_stats(&self) -> Vec<TierStatsSnapshot> {
        let mut all: Vec<_> = self.device_tier.iter().map(|d| d.stats()).collect();
        all.extend(self.store.stats());
        all
    }

    /// Deletes a chunk from every store tier, then from the device tier; false if none held
    /// it. Store first: a request that read the chunk from the store makes it resident only
    /// if the store still holds it after (`Sources::finish`), so either that check sees the
    /// removal or this removal reaches the device tier after the chunk landed there (pinned
    /// by `blend/tests/faults.rs::a_chunk_deleted_while_a_request_reads_it_is_not_made_resident`).
    pub async fn remove(&self, key: &ChunkKey) -> Result<bool> {
        let in_store = self.store.remove(key).await?;
        let on_device = self.device_tier.as_ref().is_some_and(|d| d.remove(key));
        Ok(in_store || on_device)
    }

    /// Graphed caches kept idle between requests when this blender runs graphs
    /// ([`Blender::with_graphs`]): as many as requests decode at once (the sidecar's workers;
    /// at least 2, the default), so that concurrent requests each find one with its graphs
    /// captured instead of allocating a cache and capturing anew. Each idle cache holds its
    /// capacity of KV in device memory (a request's rows rounded up to 1,024), outside the
    /// device tier's budget.
    pub fn with_idle_graphs(self, keep: usize) -> Self {
        #[cfg(feature = "gpu")]
        if let Some(pool) = &self.graphs {
            pool.keep(keep);
        }
        #[cfg(not(feature = "gpu"))]
        let _ = keep;
        self
    }

    /// What this blender's CUDA graphs did ([`Blender::with_graphs`]); zeros when off.
    pub fn graph_stats(&self) -> crate::graphs::GraphStats {
        #[cfg(feature = "gpu")]
        if let Some(pool) = &self.graphs {
            return pool.stats();
        }
        crate::graphs::GraphStats::default()
    }

    /// Decode steps over a request's cache (its prompt's, from [`Blender::run`]), for up to
    /// `steps` tokens: each step replays a CUDA graph from the pool `reuse` uses where this
    /// blender runs graphs ([`Blender::with_graphs`]; in the graphed cache the cache is a
    /// view of, after a graphed question, else copied into one first, steps enough to pay
    /// for it), whatever other requests decode meanwhile (on the H200 concurrent graphed
    /// requests decode 2.7–3.4× the tokens per second of the same requests batched,
    /// BENCHMARKS §9); else, with decode batching on ([`Blender::with_decode_batching`]), in
    /// batches with the other requests' steps; else `Model::decode_step`.
    pub fn decode_steps(&self, cache: KvCache, steps: usize) -> crate::graphs::DecodeSteps {
        use crate::graphs::DecodeSteps;
        #[cfg(feature = "gpu")]
        let cache = match &self.graphs {
            Some(pool)
                if self.model.attention_kernel() != kvquilt_model::AttentionKernel::Reference =>
            {
                match DecodeSteps::graphed(&self.model, pool, cache, steps) {
                    DecodeSteps::Eager(cache) => cache,
                    graphed => return graphed,
                }
            }
            _ => cache,
        };
        let _ = steps;
        match &self.batcher {
            Some(b) => DecodeSteps::Batched(b.session(cache)),
            None => DecodeSteps::eager(cache),
        }
    }

    /// Whether concurrent requests' decode steps run together, at most `max_batch` sequences
    /// per model step (`batcher.rs`: every weight read once per step for all of them,
    /// attention per sequence; where the cache's bytes dominate a step — long contexts, many
    /// requests — this is what a token policy's compression speeds up). 0 or 1: off (the
    /// default). With graphs ([`Blender::with_graphs`]) a request whose cache goes into a
    /// graphed one replays its graph instead; the batches take the others (caches pruned
    /// with padding, corrections a graph cannot apply, fewer than 4 steps, a cache too long for the
    /// context, a pool off after failed captures, the reference attention, a model without
    /// graphs). Requests decoding under a decode pool (SCOPE) step alone.
    pub fn with_decode_batching(mut self, max_batch: usize) -> Result<Self> {
        self.batcher = match max_batch {
            0 | 1 => None,
            n => Some(DecodeBatcher::start(
                Arc::clone(&self.model),
                n,
                crate::batcher::DEFAULT_GATHER,
            )?),
        };
        Ok(self)
    }

    /// How long, at most, each decode step of a request waits while other requests' prompts
    /// run to their first token ([`Blender::yield_to_prompts`], `priority.rs`); zero: decode
    /// steps never wait. Default [`DEFAULT_PROMPT_PRIORITY`].
    pub fn with_prompt_priority(mut self, max_wait: Duration) -> Self {
        self.priority = PromptPriority::new(max_wait);
        self
    }

    /// Tokens per page of a long prefix (default [`DEFAULT_PREFIX_PAGE`]; 0: prefixes are
    /// never paged). A prefix longer than a page is stored and read as a chain of pages
    /// (`engine/chain.rs`) in every mode, so the next turn of a conversation reads the
    /// history it shares with this one. Pages of another size name other objects: sidecars
    /// sharing a remote tier share pages only at one size.
    pub fn with_prefix_page(mut self, tokens: usize) -> Self {
        self.prefix_page = tokens;
        self
    }

    /// The pages `prefix` is kept as: `Some` (each page [`Blender::with_prefix_page`] tokens,
    /// the last possibly shorter) when it is longer than one page, else `None` (one link,
    /// or one chunk: kept whole).
    pub(crate) fn prefix_pages<'p>(&self, prefix: &'p [u32]) -> Option<Vec<&'p [u32]>> {
        (self.prefix_page > 0 && prefix.len() > self.prefix_page)
            .then(|| prefix.chunks(self.prefix_page).collect())
    }

    /// Waits while other requests' prompts run to their first token ([`Blender::run_deferring`]
    /// holds a turn), at most the bound of [`Blender::with_prompt_priority`]; returns how long
    /// it waited. A decode loop calls it before each step (never inside a prompt's pass).
    pub fn yield_to_prompts(&self) -> Duration {
        self.priority.yield_to_prompts()
    }

    /// A prompt's turn: decode steps yield ([`Blender::yield_to_prompts`]) until it is
    /// dropped. [`Blender::run_deferring`] holds one for its pass (paused while the pass
    /// waits on a store: [`crate::PromptTurn::paused_while_pending`]); a caller holds its own
    /// over other work on the way to a first token (a token policy compressing the cache
    /// before the answer starts).
    pub fn prompt_turn(&self) -> crate::priority::PromptTurn<'_> {
        self.priority.turn()
    }

    /// What decode steps gave to prompts ([`Blender::with_prompt_priority`]).
    pub fn prompt_priority_stats(&self) -> crate::priority::YieldStats {
        self.priority.stats()
    }

    /// What the decode batcher did ([`Blender::with_decode_batching`]); `None` when off.
    pub fn decode_batch_stats(&self) -> Option<crate::batcher::BatchStats> {
        self.batcher.as_ref().map(|b| b.stats())
    }

    /// Whether `reuse` and `blend` requests run as full prefill when that is estimated to
    /// reach the first token sooner (default true; the rule: `Plan::fallback` in
    /// `engine/plan.rs`), and stored chunks are recomputed when that is estimated faster than
    /// loading them. Off, a request always runs its mode and loads every stored chunk: for
    /// tests and measurements of the modes themselves (e.g. reads through a lossy codec).
    pub fn with_fallback_to_full(mut self, on: bool) -> Self {
        self.fallback_to_full = on;
        self
    }

    /// The model every request runs on.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The store chunks are read from and stored back to.
    pub fn store(&self) -> &Arc<TieredStore> {
        &self.store
    }

    /// The model's identity (the model-side inputs of every key).
    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }

    /// The running load and prefill cost estimates, shared by every request.
    pub fn costs(&self) -> &CostModel {
        &self.costs
    }

    /// The chunk codec of a namespace (tenant salt; empty for the default namespace).
    pub fn codec(&self, namespace: &[u8]) -> ChunkCodec {
        ChunkCodec::new(self.identity.clone(), namespace)
    }

    /// The stored objects `req` is made of in `namespace`, each object's key and tokens, in
    /// prompt order, each key once: what the request reads where held and stores where not.
    /// In `prefix` mode, the links of its chain (the prefix's pages or the prefix, then each
    /// chunk); otherwise a paged prefix's pages (`engine/chain.rs`), then each other segment
    /// under its chunk key. A quota check sizes a request's store-back from the ones not
    /// held (a conversation's next turn stores only its new pages, not its whole history;
    /// test `blend/tests/pages.rs::a_request_is_made_of_its_pages_and_chunks`).
    pub fn objects_of(&self, namespace: &[u8], req: &BlendRequest) -> Vec<(ChunkKey, usize)> {
        let mut objects = self.links_of(namespace, req);
        if req.mode == Mode::Prefix {
            return objects;
        }
        let codec = self.codec(namespace);
        let mut seen: std::collections::HashSet<ChunkKey> =
            objects.iter().map(|&(key, _)| key).collect();
        let mut segments = req.segments();
        if !objects.is_empty() {
            segments.remove(0); // (the prefix, as its pages)
        }
        for seg in segments {
            let key = codec.key(seg);
            if seen.insert(key) {
                objects.push((key, seg.len()));
            }
        }
        objects
    }

    /// The prefix-chain links of [`Blender::objects_of`] (each key and token count, in
    /// order): in `prefix` mode every link of the request's chain, otherwise its prefix's
    /// pages when the prefix is paged (none when it is one chunk). Each names an object
    /// that records its chain (format v6), so it is its tenant's like a chunk
    /// ([`ChunkCodec::names`]).
    pub fn links_of(&self, namespace: &[u8], req: &BlendRequest) -> Vec<(ChunkKey, usize)> {
        let codec = self.codec(namespace);
        let links = if req.mode == Mode::Prefix {
            modes::prefix::chain_links(self, req).0
        } else {
            match chain::PrefixPages::of(self, &codec, &req.prefix) {
                Some(p) => p.pages,
                None => return Vec::new(),
            }
        };
        let keys = codec.prefix_keys(&links);
        keys.into_iter()
            .zip(links.iter().map(|l| l.len()))
            .collect()
    }

    /// Makes sure a chunk's KV is stored: the precompute job's unit of work, and what the
    /// API's chunk upload runs. Content-addressed, so a chunk already held costs a lookup.
    pub fn precompute(&self, namespace: &[u8], tokens: &[u32]) -> Result<Precomputed> {
        let codec = self.codec(namespace);
        let key = codec.key(tokens);
        // held, and served as the store is configured (its header read and verified, remote
        // tiers asked too): a lossy object the store does not serve, or one found damaged,
        // is computed again (and the exact object replaces it)
        if let Some(found) = self.rt.block_on(self.store.lookup(&key))? {
            return Ok(Precomputed {
                key,
                tokens: tokens.len(),
                found_in: Some(found.tier),
            });
        }
        let (obj, took) = codec.encode(&self.model, tokens)?;
        self.costs.record_prefill(tokens.len(), took.as_secs_f64());
        self.rt.block_on(self.store.put(obj, took.as_secs_f64()))?;
        Ok(Precomputed {
            key,
            tokens: tokens.len(),
            found_in: None,
        })
    }

    /// Runs one prompt, its store-back included (see [`Blender::run_deferring`] to answer
    /// first). See [`Mode`] for what each mode computes.
    pub fn run(&self, namespace: &[u8], req: &BlendRequest) -> Result<BlendOutput> {
        let (mut out, work) = self.run_deferring(namespace, req)?;
        out.set_stored(self.store_back(work));
        Ok(out)
    }

    /// Runs one prompt up to its first token's logits, and returns the store-back it leaves
    /// (prefilling alone the misses it computed in its pass, storing what it computed):
    /// run it with [`Blender::store_back`] once the answer is on its way; until then the
    /// output's `stored` is empty. Other requests' decode steps yield to the pass
    /// ([`Blender::with_prompt_priority`]).
    ///
    /// When the device runs out of memory the request fails (the error says so:
    /// [`crate::BlendError::is_out_of_device_memory`]) and the device tier sheds its unpinned
    /// residents, so a retry finds the memory they held.
    pub fn run_deferring(
        &self,
        namespace: &[u8],
        req: &BlendRequest,
    ) -> Result<(BlendOutput, StoreBack)> {
        let start = Instant::now();
        // decode steps of other requests yield until this pass has its first token (but
        // not while it waits on a store: the modes pause the turn around those waits)
        let turn = self.priority.turn();
        self.validate(req)?;
        let ran = match &req.mode {
            Mode::Full => modes::full::run(self, req, start),
            Mode::Prefix => modes::prefix::run(self, namespace, req, start, &turn),
            Mode::Reuse => modes::reuse::run(self, namespace, req, start, &turn),
            Mode::Blend(cfg) => {
                cfg.validate(self.model.config().num_layers)?;
                // a prompt of a prefix and its question alone has nothing to blend: a
                // prefix stored as full prefill computes it (exact at the start) is read as
                // `reuse` reads it, exactly, its pages not stored computed in the question's
                // pass (the stats still say `blend`, recomputing nothing)
                let exact = self.codec(namespace).encoding().exact_at_start(&req.prefix);
                if req.chunks.is_empty() && exact {
                    modes::reuse::run(self, namespace, req, start, &turn)
                } else {
                    modes::blend::run(self, namespace, req, cfg, start, &turn)
                }
            }
        };
        if let Err(e) = &ran {
            self.shed_on_out_of_memory(e);
        }
        // the first token is ready: scoring the suffix's own tokens, when asked, is not the
        // pass's work (other requests' decode steps go on)
        drop(turn);
        let (mut out, work) = ran?;
        if req.mode != Mode::Full {
            out.stats.link_keys = self.links_of(namespace, req).iter().map(|l| l.0).collect();
        }
        if let Some(k) = req.prompt_logprobs
            && let Err(e) = out.score_suffix(&self.model, &req.suffix, k)
        {
            // the request fails; what its pass computed is still stored for the next one
            self.shed_on_out_of_memory(&e);
            self.store_back(work);
            return Err(e);
        }
        Ok((out, work))
    }

    /// When `e` says the device ran out of memory, the device tier sheds its unpinned
    /// residents, so a retry finds the memory they held.
    fn shed_on_out_of_memory(&self, e: &crate::BlendError) {
        if e.is_out_of_device_memory()
            && let Some(tier) = &self.device_tier
        {
            let shed = tier.shed();
            tracing::warn!("the device ran out of memory; the device tier shed {shed} chunks");
        }
    }

    /// Prefills `tokens` alone by `codec`'s chunk contract and records the prefill rate in the
    /// cost model; returns the KV (positions `0..T`) and the seconds it took.
    fn prefill_chunk(&self, codec: &ChunkCodec, tokens: &[u32]) -> Result<(KvCache, f64)> {
        let (cache, took) = codec.prefill(&self.model, tokens)?;
        let seconds = took.as_secs_f64();
        self.costs.record_prefill(tokens.len(), seconds);
        Ok((cache, seconds))
    }

    /// Runs a request's store-back ([`Blender::run_deferring`]); returns what it stored, in
    /// the order computed. Its failures are logged, not returned: the answer is already out.
    pub fn store_back(&self, work: StoreBack) -> Vec<StoredObject> {
        store_back::run(self, work)
    }

    /// Checks what every mode needs: a non-empty suffix, no empty chunk, and a prompt that
    /// fits the model's context.
    fn validate(&self, req: &BlendRequest) -> Result<()> {
        if req.suffix.is_empty() {
            return Err(invalid(
                "the suffix (question) is empty; the first token needs at least one computed token",
            ));
        }
        if req.chunks.iter().any(|c| c.is_empty()) {
            return Err(invalid("a chunk has zero tokens"));
        }
        let n =
            req.prefix.len() + req.chunks.iter().map(Vec::len).sum::<usize>() + req.suffix.len();
        let ctx = self.model.config().context_length;
        if n > ctx {
            return Err(invalid(format!(
                "the prompt has {n} tokens, the model's context is {ctx}"
            )));
        }
        Ok(())
    }
}

/// Time since `start` once `model`'s device has run everything enqueued so far. GPU launches
/// return before their kernels run, so a timer read without waiting would measure only the
/// enqueueing: time to first token and the cost model's prefill rates are taken through this.
pub(crate) fn device_elapsed(model: &Model, start: Instant) -> Result<std::time::Duration> {
    model.device().synchronize()?;
    Ok(start.elapsed())
}

/// Milliseconds since `start`, the device's work included ([`device_elapsed`]).
fn ms(model: &Model, start: Instant) -> Result<f64> {
    Ok(device_elapsed(model, start)?.as_secs_f64() * 1e3)
}

/// `part / whole`, 0 when `whole` is 0.
fn fraction(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}
