//! Short passes replayed as CUDA graphs over a cache of fixed capacity (feature `gpu`).
//!
//! A small model's short passes — a reuse request's question, a decode step — are bound by
//! the host issuing kernels, not by the GPU (BENCHMARKS §5: SmolLM2's 32-row question pass
//! over 6k cached tokens issues ~11 kernels per layer at 6–14 µs of host time each). A
//! [`GraphedCache`] holds a request's KV in buffers of fixed capacity and runs "append `n`
//! tokens, return the last one's logits" as one CUDA graph: captured the first time `n` is
//! seen, replayed after. Everything a replay needs that changes between calls lives in device
//! memory the graph reads, written before each launch:
//! - the tokens, their positions and the cache rows they go to (`inputs`, `[3n]` u32);
//! - the key positions (`k_pos`, `[capacity]` u32): slots past the cache's length hold
//!   `u32::MAX`, which the attention kernel's causal bound (keys at positions ≤ the tile's
//!   last query, found by binary search) never reaches, so one graph serves every length;
//! - each layer's key scale (`key_scales`, `[layers × 4]` u32): APE's temperature on a
//!   parallel context's keys for the appended rows, or none
//!   ([`GraphedCache::set_parallel_context`]), so one graph serves corrected and exact
//!   passes alike.
//!
//! A pruned cache (`KvCache::retain`, every KV head keeping as many rows: no padding) loads
//! too: its per-(row, KV head) positions go to `head_pos`, which the attention kernel rotates
//! the first rows' keys by (as the eager decode step does, `FusedAttention::attend_pruned`).
//! Their count is an argument of the kernels, so graphs are kept per (rows appended, column
//! sums, per-head rows): a pruned request's decode captures its own on its first step.
//!
//! A request keeps its rows as views of the buffers ([`GraphedCache::cache`], no copy): the
//! cache is then lent, refuses to load other rows while any view lives, and appends only past
//! them, so a view's rows never change under it; the request's decode steps take the same
//! cache back ([`GraphedCache::holds`]) and append in place.
//!
//! Invariants: the graph's kernels read and write only the cache buffers, the key positions,
//! the key scales, the inputs, the logits buffer, the sums buffer of a pass that sums column attention (zeroed
//! by the graph, then added into atomically) and the model's weights (all outliving it) and
//! memory the graph allocates and frees itself (every temporary of the capture is dropped before it ends); the rows a call
//! writes are `len..len + n`, distinct and below the capacity (checked on the host before the
//! upload). A replay runs the eager pass's kernels with the same arguments but the key count
//! (the capacity) and the key scale (read from device memory, the same values); the attention kernels plan their split-KV partition from the real keys
//! (slots below `u32::MAX`), as the eager pass plans it from its key count, so a replay is
//! bit-identical to `Model::prefill` over the same cache, whatever the capacity. Pinned by
//! `kvquilt-bench graph --check [--capacity N]` on the GPU machine (BENCHMARKS §5, "Seventh"
//! and "Eighth pass").

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::{
    CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use candle_core::cuda_backend::cudarc::driver::{CudaGraph, CudaStream};
use candle_core::cuda_backend::{CudaStorage, WrapErr};
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Tensor};

use super::Model;
use crate::error::{ModelError, Result, invalid_input};
use crate::kernels::{FusedAttention, RowsInto, put_many};
use crate::kv::{KvCache, LayerKv, Lease, Lender, Pruned, check_increasing};
use crate::parallel::ParallelContext;
use crate::rows::SetRows;

/// A KV cache in buffers of fixed capacity on one CUDA device, and the captured graphs that
/// append to it (one per row count, and per whether the pass sums the attention each key
/// receives). Holds the model whose weights the graphs read.
pub struct GraphedCache {
    model: Arc<Model>,
    capacity: usize,
    /// Per layer, K and V `[capacity, kv_heads, head_dim]`; rows `len..` are not keys yet.
    layers: Vec<LayerKv>,
    /// `[capacity]` u32: the key positions, `u32::MAX` past the cache's length.
    k_pos: Tensor,
    /// The key positions on the host (`len` of them).
    positions: Vec<u32>,
    /// Whether every `k_pos` slot past `len` is known to hold `u32::MAX` (false after a
    /// failed load or a failed clear, until the next append rewrites them all).
    k_pos_clean: bool,
    /// `[layers × 4]` u32: per layer the attention kernel's key scale (first corrected row,
    /// first and end key slot, the factor's f32 bits), read by every pass.
    key_scales: Tensor,
    /// The parallel context the appended rows attend to corrected.
    context: Option<ParallelContext>,
    /// Whether `key_scales` holds `context`'s scales (written before the next pass if not).
    key_scales_written: bool,
    /// What views of the rows hold while lent ([`GraphedCache::cache`]).
    lender: Arc<Lender>,
    /// The per-head part of the pruned cache loaded, if one was: its first `rows` rows are
    /// per (row, KV head), at the positions in `head_pos`.
    pruned: Option<Arc<Pruned>>,
    /// `[layers × capacity × kv_heads]` u32, allocated on the first pruned load: layer `l`'s
    /// per-head positions at `l × rows × kv_heads`, `rows × kv_heads` of them (row-major
    /// (row, KV head)).
    head_pos: Option<Tensor>,
    /// Keyed by (rows, whether the pass sums column attention, per-head rows — 0 unpruned).
    graphs: HashMap<GraphKey, Captured>,
    /// Whether passes are captured and replayed (else issued op by op: a diagnosis switch).
    capture: bool,
}

/// What a captured pass is kept under: (rows it appends, whether it sums column attention,
/// the pruned rows it rotates per head — 0 for an unpruned cache).
type GraphKey = (usize, bool, usize);

/// Most graphs of pruned caches kept: each pruned request's row count needs its own, so
/// older ones are dropped past this many.
const MOST_PRUNED_GRAPHS: usize = 4;

/// One captured pass of `n` rows.
struct Captured {
    /// `None` when passes are issued op by op ([`GraphedCache::set_capture`]).
    graph: Option<CudaGraph>,
    /// `[3n]` u32: token ids, their positions, the cache rows they are written to.
    inputs: Tensor,
    /// `[vocab]` f32: the last row's logits, written by every replay.
    logits: Tensor,
    /// `[capacity]` f32, for a pass that sums column attention: each key slot's attention
    /// probability summed over the pass's rows, heads and layers (0 for slots that are not
    /// keys), zeroed and then added into by every replay.
    sums: Option<Tensor>,
}

// SAFETY: a `CudaGraph` is raw driver handles, which CUDA lets any thread use as long as
// calls on one graph are serialised: every use here goes through `&mut self` or `&self` of a
// value that is moved, not shared, between threads (no `Sync`). What the graphs read lives in
// this value (buffers, model) or in candle's process-wide parameter cache (the shapes and
// strides its ops upload, `params_from_vec`). candle's upload guard also routes
// `CudaDevice::clone_htod`/`memcpy_htod` through a cache local to the capturing thread,
// freed when that thread exits: no op of the captured pass uploads that way today (all
// reach the parameter cache); one that did would tie its graphs to the capturing thread.
unsafe impl Send for GraphedCache {}

impl GraphedCache {
    /// An empty cache of `capacity` rows for `model`, which must run on CUDA in bf16 or f16
    /// with the fused attention kernel's head dims.
    pub fn new(model: Arc<Model>, capacity: usize) -> Result<Self> {
        let c = model.config();
        if !model.device().is_cuda() || !matches!(model.dtype(), DType::BF16 | DType::F16) {
            return Err(invalid_input(format!(
                "graphed passes run on CUDA in bf16 or f16, not {:?} on {:?}",
                model.dtype(),
                model.device()
            )));
        }
        if let Some(why) = model.fused_attention_unsupported() {
            return Err(invalid_input(format!("graphed passes need {why}")));
        }
        if capacity == 0 || capacity > c.context_length {
            return Err(invalid_input(format!(
                "a graphed cache of {capacity} rows (the model's context is {})",
                c.context_length
            )));
        }
        let zeros = || {
            Tensor::zeros(
                (capacity, c.num_kv_heads, c.head_dim),
                model.dtype(),
                model.device(),
            )
        };
        let layers = (0..c.num_layers)
            .map(|_| Ok(LayerKv::new(zeros()?, zeros()?)))
            .collect::<Result<Vec<_>>>()?;
        let k_pos = Tensor::new(vec![u32::MAX; capacity], model.device())?;
        let key_scales = Tensor::new(key_scales_of(None, &[], c.num_layers), model.device())?;
        Ok(Self {
            model,
            capacity,
            layers,
            k_pos,
            positions: Vec::new(),
            k_pos_clean: true,
            key_scales,
            context: None,
            key_scales_written: true,
            lender: Arc::new(Lender::default()),
            pruned: None,
            head_pos: None,
            graphs: HashMap::new(),
            capture: true,
        })
    }

    /// With `false`, every pass is issued op by op on the stream, through the same buffers a
    /// graph uses, instead of being captured and replayed: the same kernels with the same
    /// arguments, so a difference between the two modes is the capture's. For diagnosis.
    pub fn set_capture(&mut self, on: bool) {
        if on != self.capture {
            self.graphs.clear();
            self.capture = on;
        }
    }

    /// The model whose weights the graphs read.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The positions of the rows the cache holds.
    pub fn positions(&self) -> &[u32] {
        &self.positions
    }

    /// Rows the cache holds.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether the cache holds no rows.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Rows the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Replaces the cache's contents with `cache`'s rows (this model's shape, at most the
    /// capacity; pruned only without padding, [`KvCache::is_padded`]):
    /// [`GraphedCache::load_parts`] with one part per layer and a pruned cache's per-head
    /// positions (uploaded before the rows' copies). Invalid input (a per-head table that
    /// does not fit, among the rest) leaves the cache as it was; a failure after the checks
    /// leaves it empty.
    pub fn load(&mut self, cache: &KvCache) -> Result<()> {
        let c = self.model.config();
        cache.check_shape(c.num_layers, c.num_kv_heads, c.head_dim)?;
        if cache.is_padded() {
            return Err(invalid_input(
                "a graphed cache holds a pruned cache only when every KV head keeps as many rows (no padding)",
            ));
        }
        if let Some(p) = cache.parallel_context() {
            check_context_fits(p, &cache.positions)?;
        }
        let layers: Vec<Vec<LayerKv>> = cache.layers.iter().map(|l| vec![l.clone()]).collect();
        let pruned = cache.pruned_shared();
        let head_table = pruned.map(|p| self.head_table(p)).transpose()?;
        self.write_parts(&layers, &cache.positions, head_table.as_deref())?;
        self.pruned = pruned.map(Arc::clone);
        self.set_parallel_context(cache.parallel_context().cloned())
    }

    /// A pruned cache's per-head positions as the graphs read them (layer, row, KV head),
    /// checked against this cache's shape.
    fn head_table(&self, pruned: &Pruned) -> Result<Vec<u32>> {
        let kvh = self.model.config().num_kv_heads;
        let table: Vec<u32> = pruned
            .layers
            .iter()
            .flat_map(|l| l.host_positions.iter().copied())
            .collect();
        if table.len() != self.layers.len() * pruned.rows * kvh {
            return Err(invalid_input(format!(
                "per-head positions of {} entries for {} layers of {} rows × {kvh} KV heads",
                table.len(),
                self.layers.len(),
                pruned.rows
            )));
        }
        Ok(table)
    }

    /// Writes per-head positions ([`GraphedCache::head_table`]) where the graphs read them,
    /// allocating that buffer on first use.
    fn upload_head_positions(&mut self, table: &[u32]) -> Result<()> {
        let kvh = self.model.config().num_kv_heads;
        let head_pos = match &self.head_pos {
            Some(t) => t,
            None => self.head_pos.insert(Tensor::zeros(
                self.layers.len() * self.capacity * kvh,
                DType::U32,
                self.model.device(),
            )?),
        };
        head_pos.inplace_op1(&Upload { data: table, at: 0 })?;
        Ok(())
    }

    /// Replaces the cache's contents: layer `l`'s rows become `layers[l]`'s parts one after
    /// the other (rows of this model's KV shape and dtype), at `positions` (one per row,
    /// strictly increasing, below the model's context, at most the capacity): one upload of
    /// the key positions, then every layer's K and V in one launch per 96 non-empty parts (a
    /// 30-layer context of 12 chunks in 8). Captured graphs stay valid. Refused while views
    /// of the rows are lent ([`GraphedCache::is_lent`]); the writes wait (on the device) for
    /// the work queued on earlier views. Invalid input leaves the cache as it was; a failure
    /// while writing leaves it empty.
    pub fn load_parts(&mut self, layers: &[Vec<LayerKv>], positions: &[u32]) -> Result<()> {
        self.write_parts(layers, positions, None)
    }

    /// [`GraphedCache::load_parts`], with a pruned cache's per-head positions
    /// ([`GraphedCache::head_table`]) uploaded beside the key positions, before the rows'
    /// copies (an upload from pageable memory waits for the stream, which would otherwise
    /// hold those copies). The caller marks the rows pruned once this succeeds.
    fn write_parts(
        &mut self,
        layers: &[Vec<LayerKv>],
        positions: &[u32],
        head_table: Option<&[u32]>,
    ) -> Result<()> {
        let c = self.model.config();
        if self.is_lent() {
            return Err(invalid_input(
                "loading a graphed cache whose rows are still lent out",
            ));
        }
        if layers.len() != self.layers.len() {
            return Err(invalid_input(format!(
                "{} layers into a {}-layer graphed cache",
                layers.len(),
                self.layers.len()
            )));
        }
        if positions.len() > self.capacity {
            return Err(invalid_input(format!(
                "{} rows into a graphed cache of {}",
                positions.len(),
                self.capacity
            )));
        }
        if let Some((l, rows)) = layers
            .iter()
            .map(|parts| parts.iter().map(LayerKv::len).sum::<usize>())
            .enumerate()
            .find(|(_, rows)| *rows != positions.len())
        {
            return Err(invalid_input(format!(
                "{} positions, but layer {l}'s parts hold {rows} rows",
                positions.len()
            )));
        }
        check_increasing(positions)?;
        if let Some(&max) = positions.last()
            && max as usize >= c.context_length
        {
            return Err(ModelError::ContextOverflow {
                needed: max as usize + 1,
                context: c.context_length,
            });
        }
        // the views lent before may have been read on another thread's stream: this
        // stream's writes wait for that work (on the device)
        let stream = self.model.device().as_cuda_device()?.cuda_stream();
        self.lender.wait_for_leases(&stream)?;
        self.positions.clear();
        self.pruned = None;
        self.k_pos_clean = false;
        if self.context.take().is_some() {
            self.key_scales_written = false;
        }
        // the positions go first: an upload from pageable memory waits for the stream, which
        // would otherwise hold the copies below
        self.upload_k_pos(positions)?;
        if let Some(table) = head_table {
            self.upload_head_positions(table)?;
        }
        let mut copies = Vec::with_capacity(2 * layers.iter().map(Vec::len).sum::<usize>());
        for (dst, parts) in self.layers.iter().zip(layers) {
            // a buffer's copies one after the other (`put_many` reads its address once)
            let filled: Vec<&LayerKv> = parts.iter().filter(|p| !p.is_empty()).collect();
            for (buffer, keys) in [(&dst.k, true), (&dst.v, false)] {
                let mut at = 0;
                for p in &filled {
                    let src = if keys { &p.k } else { &p.v };
                    copies.push(RowsInto {
                        dst: buffer,
                        at,
                        src,
                    });
                    at += p.len();
                }
            }
        }
        // SAFETY of the copies (`put_many`'s contract): `&mut self` and no lent views (checked
        // above) make this call the buffers' only user; no part is a view of them (a view
        // lent by this cache would have made it lent).
        put_many(&copies)?;
        self.positions = positions.to_vec();
        self.k_pos_clean = true;
        Ok(())
    }

    /// Rows appended from now on attend to `context`'s keys corrected, as rows appended to a
    /// [`KvCache`] marked with it do (`KvCache::set_parallel_context`), in the corrected
    /// layers; `None`: exactly. The correction must be a temperature alone
    /// ([`ParallelContext::keeps_mass`]), which the attention kernel applies to the scores
    /// (`FusedAttention::with_key_scale_at`), and the context must end within the rows held
    /// (every appended row comes after it). Every load clears it; views lent later
    /// ([`GraphedCache::cache`]) carry it as their mark. Captured graphs stay valid.
    pub fn set_parallel_context(&mut self, context: Option<ParallelContext>) -> Result<()> {
        if let Some(p) = &context {
            check_context_fits(p, &self.positions)?;
        }
        self.context = context;
        self.key_scales_written = false;
        self.write_key_scales()
    }

    /// The parallel context appended rows attend to corrected
    /// ([`GraphedCache::set_parallel_context`]).
    pub fn parallel_context(&self) -> Option<&ParallelContext> {
        self.context.as_ref()
    }

    /// Writes `context`'s key scales where the graphs read them, unless written already.
    fn write_key_scales(&mut self) -> Result<()> {
        if self.key_scales_written {
            return Ok(());
        }
        let scales = key_scales_of(self.context.as_ref(), &self.positions, self.layers.len());
        self.key_scales.inplace_op1(&Upload {
            data: &scales,
            at: 0,
        })?;
        self.key_scales_written = true;
        Ok(())
    }

    /// Writes every key-position slot: `positions`, then `u32::MAX` (no key). The slots are
    /// clean once the cache's own positions are `positions`.
    fn upload_k_pos(&self, positions: &[u32]) -> Result<()> {
        let mut k_pos = positions.to_vec();
        k_pos.resize(self.capacity, u32::MAX);
        Ok(self.k_pos.inplace_op1(&Upload {
            data: &k_pos,
            at: 0,
        })?)
    }

    /// The cache's rows as a [`KvCache`], views of its buffers (no copy) lent by this
    /// cache: what a request keeps once its first token is out, for an eager pass, a
    /// store-back, or decoding on in this cache ([`GraphedCache::holds`]). While any view (or
    /// a clone of one) lives, the cache is lent ([`GraphedCache::is_lent`]): it refuses to
    /// load other rows, and appends only past them, so a view's rows never change under it.
    /// Appending to a view copies.
    pub fn cache(&self) -> Result<KvCache> {
        let len = self.len();
        let stream = self.model.device().as_cuda_device()?.cuda_stream();
        let lease = Lease::new(&self.lender, Some(stream));
        let layers = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                Ok(LayerKv::lent(
                    l.k.narrow(0, 0, len)?,
                    l.v.narrow(0, 0, len)?,
                    &lease,
                    i,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut cache =
            KvCache::new(layers, self.positions.clone()).with_pruned(self.pruned.clone());
        cache.set_parallel_context(self.context.clone());
        Ok(cache)
    }

    /// Whether views of this cache's rows ([`GraphedCache::cache`]) are alive.
    pub fn is_lent(&self) -> bool {
        Arc::strong_count(&self.lender) > 1
    }

    /// Whether `cache` is this cache's own rows as lent — every layer the view
    /// [`GraphedCache::cache`] made of it, covering every row, at the same positions — so
    /// that once it is dropped, appends to this cache go on from where it ends (a request's
    /// decode after its graphed question, with no copy).
    pub fn holds(&self, cache: &KvCache) -> bool {
        let same_pruned = match (cache.pruned_shared(), &self.pruned) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        same_pruned
            && cache.positions == self.positions
            && cache.parallel_context() == self.context.as_ref()
            && cache.layers.len() == self.layers.len()
            && cache
                .layers
                .iter()
                .enumerate()
                .all(|(l, kv)| kv.len() == self.len() && kv.is_lent_by(&self.lender, l))
    }

    /// Appends `tokens` at `positions` (strictly increasing, after the cache's last position)
    /// and returns the last token's f32 logits `[vocab]`: the same pass as
    /// [`Model::prefill`], replayed from a graph captured on this call's row count's first
    /// use. The row count is at most [`GraphedCache::most_rows`]. On error the cache holds the
    /// rows it held.
    pub fn append(&mut self, tokens: &[u32], positions: &[u32]) -> Result<Tensor> {
        Ok(self.append_pass(tokens, positions, false)?.0)
    }

    /// [`GraphedCache::append`], also returning the attention each key receives from the
    /// appended rows, summed over them, every head and every layer, `[len]` f32 (len after
    /// the call: the appended rows are keys too) — query-aware blend's signal, as
    /// [`Model::run_layers_with`] reports it under `ProbeRequest::summed_over_all` layer by
    /// layer (here added up on the device into one running total; the adds are atomic, per
    /// KV head as in the eager pass and here per layer too, so the two agree to f32
    /// rounding, not bit for bit). A separate graph from `append`'s for the same
    /// row count.
    pub fn append_with_column_sums(
        &mut self,
        tokens: &[u32],
        positions: &[u32],
    ) -> Result<(Tensor, Tensor)> {
        let (logits, sums) = self.append_pass(tokens, positions, true)?;
        let sums = sums.ok_or_else(|| invalid_input("the pass summed no column attention"))?;
        Ok((logits, sums))
    }

    /// The pass of [`GraphedCache::append`], with column sums when `sums`.
    fn append_pass(
        &mut self,
        tokens: &[u32],
        positions: &[u32],
        sums: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let n = tokens.len();
        let c = self.model.config();
        if n == 0 || positions.len() != n {
            return Err(invalid_input(format!(
                "{n} tokens at {} positions",
                positions.len()
            )));
        }
        if n > self.most_rows() {
            return Err(invalid_input(format!(
                "a graphed pass of {n} rows (at most {})",
                self.most_rows()
            )));
        }
        if sums && self.pruned.is_some() {
            return Err(invalid_input(
                "column sums over a pruned graphed cache (a query pass runs over full KV)",
            ));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(invalid_input(format!(
                "token id {bad} is outside the vocabulary of {}",
                c.vocab_size
            )));
        }
        check_increasing(positions)?;
        if let (Some(&last), Some(&first)) = (self.positions.last(), positions.first())
            && first <= last
        {
            return Err(invalid_input(format!(
                "new tokens start at position {first}, not after the cache's last position {last}"
            )));
        }
        if let Some(&max) = positions.last()
            && max as usize >= c.context_length
        {
            return Err(ModelError::ContextOverflow {
                needed: max as usize + 1,
                context: c.context_length,
            });
        }
        let len = self.len();
        if len + n > self.capacity {
            return Err(invalid_input(format!(
                "{n} rows after {len} in a graphed cache of {}",
                self.capacity
            )));
        }
        if !self.k_pos_clean {
            self.upload_k_pos(&self.positions)?;
            self.k_pos_clean = true;
        }
        self.write_key_scales()?;
        let key = (n, sums, self.pruned.as_ref().map_or(0, |p| p.rows));
        let mut captured = match self.graphs.remove(&key) {
            Some(c) => c,
            None => {
                self.drop_old_pruned_graphs();
                self.buffers(n, sums)?
            }
        };
        let mut inputs = Vec::with_capacity(3 * n);
        inputs.extend_from_slice(tokens);
        inputs.extend_from_slice(positions);
        inputs.extend((len..len + n).map(|r| r as u32));
        let ran = self
            .upload_and_run(n, &inputs, positions, &mut captured)
            .and_then(|()| {
                let sums = match &captured.sums {
                    Some(s) => Some(s.narrow(0, 0, len + n)?.copy()?),
                    None => None,
                };
                Ok((captured.logits.copy()?, sums))
            });
        self.graphs.insert(key, captured);
        match ran {
            Ok(out) => {
                self.positions.extend_from_slice(positions);
                Ok(out)
            }
            Err(e) => {
                // the slots of the rows not appended go back to "no key" (a later append
                // of other positions must not find these among the keys)
                let cleared = self.k_pos.inplace_op1(&Upload {
                    data: &vec![u32::MAX; n],
                    at: len,
                });
                if let Err(c) = cleared {
                    tracing::warn!(error = %c, "could not clear a failed append's key positions");
                    self.k_pos_clean = false;
                }
                Err(e)
            }
        }
    }

    /// Uploads one call's inputs and runs its pass: the graph's replay, or on a row count's
    /// first use the pass issued op by op (this call's result) and then captured.
    fn upload_and_run(
        &self,
        n: usize,
        inputs: &[u32],
        positions: &[u32],
        captured: &mut Captured,
    ) -> Result<()> {
        captured.inputs.inplace_op1(&Upload {
            data: inputs,
            at: 0,
        })?;
        self.k_pos.inplace_op1(&Upload {
            data: positions,
            at: self.len(),
        })?;
        if let Some(graph) = &captured.graph {
            return Ok(graph.launch().w()?);
        }
        if !self.capture {
            return self.issue(n, captured);
        }
        captured.graph = Some(self.capture(n, captured)?);
        Ok(())
    }

    /// Keeps fewer than [`MOST_PRUNED_GRAPHS`] graphs of pruned caches (dropping those of the
    /// most per-head rows first: any order would do, each request has its own count), so a
    /// new one fits.
    fn drop_old_pruned_graphs(&mut self) {
        let mut pruned: Vec<GraphKey> = self.graphs.keys().filter(|k| k.2 > 0).copied().collect();
        if pruned.len() < MOST_PRUNED_GRAPHS {
            return;
        }
        pruned.sort_by_key(|k| std::cmp::Reverse(k.2));
        for k in &pruned[..pruned.len() + 1 - MOST_PRUNED_GRAPHS] {
            self.graphs.remove(k);
        }
    }

    /// The most rows one graphed pass appends ([`GraphedCache::most_rows_of`]).
    pub fn most_rows(&self) -> usize {
        Self::most_rows_of(self.model.config())
    }

    /// The most rows one graphed pass of a model of this shape appends: the attention kernel
    /// rotates K per tile as it loads (not once over every key slot, most of which are not
    /// keys) up to this many (63 for SmolLM2's 9 heads over 3, 48 for 32 over 8).
    pub fn most_rows_of(config: &crate::ModelConfig) -> usize {
        FusedAttention::most_rows_rotating_per_tile(config.num_heads, config.num_kv_heads)
    }

    /// The input and output buffers of the pass of `n` rows, with column sums when `sums`
    /// (its graph comes on first use).
    fn buffers(&self, n: usize, sums: bool) -> Result<Captured> {
        let device = self.model.device();
        Ok(Captured {
            graph: None,
            inputs: Tensor::zeros(3 * n, DType::U32, device)?,
            logits: Tensor::zeros(self.model.config().vocab_size, DType::F32, device)?,
            sums: match sums {
                true => Some(Tensor::zeros(self.capacity, DType::F32, device)?),
                false => None,
            },
        })
    }

    /// Runs the pass of `n` rows op by op over the uploaded inputs, then captures it.
    ///
    /// candle uploads some ops' shapes and strides from host memory as it issues them; a
    /// graph would replay such a copy from a host buffer long freed. With candle's upload
    /// cache on (a guard for this thread), the first run leaves every such upload in device
    /// buffers kept for the thread's life, keyed by content, and the capture copies from
    /// those (device to device); it fails rather than capture an upload the run did not
    /// make. The first run is also what loads every kernel the capture launches.
    fn capture(&self, n: usize, captured: &Captured) -> Result<CudaGraph> {
        let cuda = self.model.device().as_cuda_device()?;
        let _uploads_cached = cuda.enable_cuda_graph_htod_cache();
        self.issue(n, captured)?;
        let stream = cuda.cuda_stream();
        stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
            .w()?;
        let issued = self.issue(n, captured);
        let graph = end_capture(&stream);
        issued?;
        let graph = graph?;
        graph.upload().w()?;
        Ok(graph)
    }

    /// Issues the pass of `n` rows into `captured`'s outputs: every temporary is dropped
    /// before this returns, so a graph capturing it frees what it allocates.
    fn issue(&self, n: usize, captured: &Captured) -> Result<()> {
        let (inputs, logits) = (&captured.inputs, &captured.logits);
        let model = &*self.model;
        let c = model.config();
        let ids = inputs.narrow(0, 0, n)?;
        let q_pos = inputs.narrow(0, n, n)?;
        let rows = inputs.narrow(0, 2 * n, n)?;
        let attention = FusedAttention::on_device(
            q_pos,
            self.k_pos.clone(),
            model.rope_tables.cos(),
            model.rope_tables.sin(),
            c.num_heads,
            c.num_kv_heads,
            c.head_dim,
        )?;
        let end = c.num_layers;
        // a pruned cache's first rows, rotated per (row, KV head) by `head_pos`
        let head_rows = match (&self.pruned, &self.head_pos) {
            (Some(p), Some(t)) => Some((p.rows, t)),
            (Some(_), None) => {
                return Err(invalid_input(
                    "a pruned graphed cache without its per-head positions",
                ));
            }
            (None, _) => None,
        };
        let mut hidden = model.weights.embed.index_select(&ids, 0)?;
        let mut normed: Option<Tensor> = None;
        if let Some(sums) = &captured.sums {
            // one running total over the layers, added into by each layer's column sums
            sums.zero_set()?;
        }
        for (l, kv) in self.layers.iter().enumerate() {
            let w = model.layer(l)?;
            let x = match normed.take() {
                Some(x) => x,
                None => model.norm(&hidden, &w.attn_norm)?,
            };
            let (q, k_new, v_new) = model.qkv(w, &x)?;
            kv.k.inplace_op3(&k_new, &rows, &SetRows)?;
            kv.v.inplace_op3(&v_new, &rows, &SetRows)?;
            // this layer's key scale, read from device memory at each replay
            let attention =
                attention
                    .clone()
                    .with_key_scale_at(self.key_scales.narrow(0, 4 * l, 4)?)?;
            let attn = match (&captured.sums, head_rows) {
                (None, None) => attention.attend(&q, &kv.k, &kv.v)?,
                (None, Some((rows, table))) => {
                    let per = rows * c.num_kv_heads;
                    let layer_pos = table.narrow(0, l * per, per)?;
                    attention.attend_pruned(&q, &kv.k, &kv.v, &layer_pos, rows)?
                }
                (Some(sums), None) => {
                    attention.attend_and_add_column_sums(&q, &kv.k, &kv.v, sums)?
                }
                (Some(_), Some(_)) => {
                    return Err(invalid_input("column sums over a pruned graphed cache"));
                }
            };
            (hidden, normed) = model.finish_layer(l, end, &hidden, &attn)?;
        }
        let last = hidden.narrow(0, n - 1, 1)?;
        let out = model.logits(&last)?.squeeze(0)?;
        logits.slice_set(&out, 0, 0)?;
        Ok(())
    }
}

/// Refuses a correction other than a temperature alone (the only one the kernel applies)
/// and a context that does not end within rows at `positions` (rows appended after them
/// must all come after it).
fn check_context_fits(p: &ParallelContext, positions: &[u32]) -> Result<()> {
    if !p.keeps_mass() {
        return Err(invalid_input(format!(
            "a graphed cache corrects with a temperature alone (S·T = 1), not T {} and S {}",
            p.temperature(),
            p.scale()
        )));
    }
    if positions
        .last()
        .is_none_or(|&last| last + 1 < p.positions().end)
    {
        return Err(invalid_input(format!(
            "a parallel context at positions {:?} past a graphed cache's rows (last position {:?})",
            p.positions(),
            positions.last()
        )));
    }
    Ok(())
}

/// The attention kernel's key scale per layer, `[layers × 4]` u32, for rows appended after
/// keys at `positions`: `context`'s keys among them with their logits times `1 / T` in the
/// layers it corrects (every appended row corrected: it comes after the context), else
/// none (`[0, 0, 0, 1.0f32.to_bits()]`). The factor is computed as the eager pass computes
/// it (`1.0f32 / T`), so both give the same bits.
fn key_scales_of(context: Option<&ParallelContext>, positions: &[u32], layers: usize) -> Vec<u32> {
    let none = [0, 0, 0, 1.0f32.to_bits()];
    (0..layers)
        .flat_map(|l| match context {
            Some(p) if p.corrects_layer(l) => {
                let keys = p.key_range(positions);
                [
                    0,
                    keys.start as u32,
                    keys.end as u32,
                    (1.0f32 / p.temperature()).to_bits(),
                ]
            }
            _ => none,
        })
        .collect()
}

/// Ends the stream's capture and instantiates the graph, also after a failed issue, so that
/// this thread's stream leaves capture mode either way. cudarc keeps one error slot per
/// context, and its `end_capture` reports an error found there instead of ending the
/// capture; a failed capture fills it (its temporaries' `free_async` fails on an invalidated
/// capture), so the slot is drained first, and again while the stream still captures.
fn end_capture(stream: &std::sync::Arc<CudaStream>) -> Result<CudaGraph> {
    let mut last = None;
    for _ in 0..3 {
        if let Err(stale) = stream.context().check_err() {
            tracing::debug!(error = %stale, "an error recorded while capturing");
        }
        match stream.end_capture(CUgraphInstantiate_flags(0)) {
            Ok(Some(graph)) => return Ok(graph),
            Ok(None) => return Err(invalid_input("the captured pass issued nothing")),
            Err(e) => last = Some(e),
        }
        let _ = stream.context().check_err();
        let capturing = stream.capture_status().is_ok_and(|s| {
            s != candle_core::cuda_backend::cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE
        });
        if !capturing {
            break;
        }
    }
    Err(match last {
        Some(e) => candle_core::Error::Cuda(Box::new(e)).into(),
        None => invalid_input("ending a capture failed"),
    })
}

/// Writes `data` into a u32 tensor at element `at` (an in-place candle op: the tensor keeps
/// its buffer, which a captured graph reads).
struct Upload<'a> {
    data: &'a [u32],
    at: usize,
}

impl Upload<'_> {
    fn range(&self, l: &Layout) -> candle_core::Result<std::ops::Range<usize>> {
        let end = self.at + self.data.len();
        if !l.is_contiguous() || end > l.shape().elem_count() {
            candle_core::bail!(
                "upload of {} values at {} into {:?}",
                self.data.len(),
                self.at,
                l.shape()
            );
        }
        Ok(l.start_offset() + self.at..l.start_offset() + end)
    }
}

impl InplaceOp1 for Upload<'_> {
    fn name(&self) -> &'static str {
        "kvquilt-upload"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("graphed caches live on CUDA")
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let range = self.range(l)?;
        let stream = s.device().cuda_stream();
        let mut dst = s.as_cuda_slice_mut::<u32>()?.slice_mut(range);
        stream.memcpy_htod(self.data, &mut dst).w()?;
        Ok(())
    }
}
