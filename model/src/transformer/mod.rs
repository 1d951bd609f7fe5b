//! The decoder forward pass over caller-owned KV.
//!
//! One primitive, [`Model::run_layers`], runs a range of decoder layers for `n` query tokens
//! that either extend the cache ([`Rows::Append`]: prefill, decode) or are rows already in it
//! ([`Rows::Replace`]: CacheBlend's selective recompute, where only chosen tokens are
//! recomputed while attending over a full-length cache). Everything else (prefill, decode,
//! partial forward) is built from it, so the baseline and every reuse mode share one path.
//!
//! Shapes: hidden states are `[n, hidden_size]`; KV follows [`crate::kv`]; logits are f32.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::AtomicU64;

use candle_core::{DType, Device, Tensor};

use crate::attention::{AttentionKernel, CpuAttentionPrecision, ProbeRequest};
use crate::bf16linear::{CpuMatmulPrecision, PackedWeight};
use crate::config::ModelConfig;
use crate::error::{ModelError, Result, invalid_input};
use crate::hook::{CollectProbes, LayerHook};
use crate::intdot::CpuDecodePrecision;
use crate::kv::{KvCache, LayerKv, Pruned, check_increasing};
use crate::parallel::ParallelContext;
use crate::rope::{Rope, RopeTables};
use crate::rows::RowReplacement;
use crate::weights::{LayerWeights, Weights};

mod attention_choice;
mod batch;
#[cfg(feature = "gpu")]
mod graph;

#[cfg(feature = "gpu")]
pub use graph::GraphedCache;

use attention_choice::LayerAttention;
pub use batch::BatchStep;

/// How the query tokens of a [`Model::run_layers`] call relate to the cache.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    /// New tokens at these absolute positions (strictly increasing, after the cache's last
    /// position), appended to every layer. Only valid when running all layers.
    Append(&'a [u32]),
    /// The cache's rows at these indices (strictly increasing); their freshly computed K/V
    /// replace the cached ones layer by layer, and they attend over the whole cache.
    Replace(&'a [usize]),
}

/// What [`Model::run_layers`] returns.
#[derive(Debug)]
pub struct LayersOutput {
    /// Residual stream of the query tokens after the last layer run, `[n, hidden_size]`.
    pub hidden: Tensor,
    /// With a probe ([`Model::run_layers`] only; a [`LayerHook`] sees them layer by layer):
    /// per layer run, `[num_kv_heads, group, probe rows, cache tokens]` f32 attention
    /// probabilities (query head `kv_head * group + g`), or with a summed probe
    /// `[cache tokens]` (summed over the probed rows and every head).
    pub attention: Vec<Tensor>,
}

/// One forward call's checked rows and chosen attention, over the cache it was planned on.
struct CallPlan<'c> {
    /// The cache's positions after the call.
    k_pos: Vec<u32>,
    how: LayerAttention,
    /// Layers outside a parallel context's band of corrected layers attend by this.
    exact_how: Option<LayerAttention>,
    /// With [`Rows::Replace`]: where the fresh rows go.
    replace_index: Option<RowReplacement>,
    pruned: Option<&'c Pruned>,
    parallel: Option<&'c ParallelContext>,
}

/// Default score-matrix budget per attention block, in elements.
fn default_score_budget(device: &Device) -> usize {
    if device.is_cpu() { 1 << 23 } else { 1 << 28 }
}

/// A decoder-only transformer (llama / qwen2 family) with weights on one device.
#[derive(Debug)]
pub struct Model {
    config: ModelConfig,
    weights: Weights,
    rope: Rope,
    /// cos/sin for positions `0..context_length`, in the compute dtype on the device.
    rope_tables: RopeTables,
    device: Device,
    dtype: DType,
    score_budget: usize,
    attention_kernel: AttentionKernel,
    /// The precision of the CPU's tiled attention products.
    cpu_attention_precision: CpuAttentionPrecision,
    /// The projections packed for bf16 products, by the f32 tensor's id (empty unless
    /// [`Model::set_cpu_matmul_precision`] asked for bf16 on a CPU that runs them).
    packed: HashMap<candle_core::TensorId, PackedWeight>,
    /// The precision of the products over the GGUF's blocks in effect
    /// ([`Model::set_cpu_decode_precision`]).
    decode_precision: CpuDecodePrecision,
    /// Forward calls that wanted the fused attention kernel and ran the reference instead.
    attention_fallbacks: AtomicU64,
}

impl Model {
    pub(crate) fn new(
        config: ModelConfig,
        weights: Weights,
        device: Device,
        dtype: DType,
    ) -> Result<Self> {
        let rope = Rope::new(&config);
        let all: Vec<u32> = (0..config.context_length as u32).collect();
        let rope_tables = rope.tables(&all, &device, dtype)?;
        Ok(Self {
            score_budget: default_score_budget(&device),
            config,
            weights,
            rope,
            rope_tables,
            device,
            dtype,
            attention_kernel: AttentionKernel::default(),
            cpu_attention_precision: CpuAttentionPrecision::default(),
            packed: HashMap::new(),
            decode_precision: CpuDecodePrecision::F32,
            attention_fallbacks: AtomicU64::new(0),
        })
    }

    /// A model of the given shape with random weights (benchmarks and tests).
    pub fn random(config: ModelConfig, device: &Device, dtype: DType) -> Result<Self> {
        config.validate().map_err(invalid_input)?;
        let weights = Weights::random(&config, dtype, device)?;
        Self::new(config, weights, device.clone(), dtype)
    }

    /// The same weights under another RoPE base (`rope_theta`): the model then computes, and
    /// its identity names, that base. A wrong base is how a mis-declared model looks
    /// (`kvquilt calibrate --rope-theta` uses it as the gate's negative control). The base must
    /// be finite and > 1.
    pub fn with_rope_theta(self, theta: f32) -> Result<Self> {
        let config = ModelConfig {
            rope_theta: theta,
            ..self.config
        };
        config.validate().map_err(invalid_input)?;
        let mut m = Self::new(config, self.weights, self.device, self.dtype)?;
        m.score_budget = self.score_budget;
        m.attention_kernel = self.attention_kernel;
        m.cpu_attention_precision = self.cpu_attention_precision;
        m.packed = self.packed;
        m.decode_precision = self.decode_precision;
        Ok(m)
    }

    /// The model's shape and hyper-parameters.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device holding the weights; caches and inputs must live there too.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype of weights, activations and KV.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The model's rotary frequencies (the ones attention rotates keys with).
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Bounds the attention score matrix per query block (elements); for tests and tuning.
    pub fn set_score_budget(&mut self, elements: usize) {
        self.score_budget = elements.max(1);
    }

    /// RMSNorm of `x` `[n, hidden]` with weight `w`: on CUDA (bf16/f16) the kernel the fused
    /// residual add uses ([`Model::add_norm`]), so a forward split into layer ranges computes
    /// the same bits as one call; candle's `rms_norm` elsewhere.
    fn norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps as f32;
        #[cfg(feature = "gpu")]
        if crate::kernels::norm_supported(x, w) {
            return crate::kernels::rms_norm(x, w, eps);
        }
        Ok(candle_nn::ops::rms_norm(x, w, eps)?)
    }

    /// The residual add `hidden + r` and the RMSNorm of the sum with weight `w` (the next
    /// block's input): one kernel on CUDA (bf16/f16), the two ops elsewhere.
    fn add_norm(&self, hidden: &Tensor, r: &Tensor, w: &Tensor) -> Result<(Tensor, Tensor)> {
        #[cfg(feature = "gpu")]
        if crate::kernels::norm_supported(hidden, w)
            && r.is_contiguous()
            && r.dims() == hidden.dims()
            && r.dtype() == hidden.dtype()
        {
            return crate::kernels::add_rms_norm(hidden, r, w, self.config.rms_norm_eps as f32);
        }
        let h = (hidden + r)?;
        let x = self.norm(&h, w)?;
        Ok((h, x))
    }

    /// `silu(gate) * up` of the fused gate/up projection `[n, 2 * intermediate]`.
    fn swiglu(&self, gate_up: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "gpu")]
        if crate::kernels::swiglu_supported(gate_up) {
            return crate::kernels::swiglu(gate_up);
        }
        let i = self.config.intermediate_size;
        if gate_up.device().is_cpu() && gate_up.dtype() == DType::F32 {
            return crate::vmath::swiglu(gate_up, i);
        }
        Ok((candle_nn::ops::silu(&gate_up.narrow(1, 0, i)?)? * gate_up.narrow(1, i, i)?)?)
    }

    /// An empty cache for this model.
    pub fn empty_cache(&self) -> Result<KvCache> {
        let c = &self.config;
        KvCache::empty(
            c.num_layers,
            c.num_kv_heads,
            c.head_dim,
            self.dtype,
            &self.device,
        )
    }

    /// Token embeddings, `[tokens.len(), hidden_size]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Tensor> {
        if let Some(&bad) = tokens
            .iter()
            .find(|&&t| t as usize >= self.config.vocab_size)
        {
            return Err(invalid_input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let ids = Tensor::new(tokens, &self.device)?;
        Ok(self.weights.embed.index_select(&ids, 0)?)
    }

    /// What is kept beside projection `w`'s f32 copy: its GGUF blocks (`weights.rs`), its
    /// bf16 packing, if any.
    fn kept(&self, w: &Tensor) -> Kept<'_> {
        Kept {
            blocks: self.weights.blocks.get(&w.id()),
            packed: self.packed.get(&w.id()),
            decode: self.decode_precision,
        }
    }

    /// Chooses the precision of the CPU's weight products over the GGUF's blocks (a decode
    /// step's or batch's 1–8 rows, the last row's logits) in later forward calls (default
    /// [`CpuDecodePrecision::F32`]). `Q16` and `Q8` take effect for an f32 model on a CPU
    /// with AVX-512 VNNI whose file kept its blocks (`intdot.rs`); elsewhere the
    /// precision is `F32`. Returns the precision in effect.
    pub fn set_cpu_decode_precision(
        &mut self,
        precision: CpuDecodePrecision,
    ) -> CpuDecodePrecision {
        let runs = self.device.is_cpu()
            && self.dtype == DType::F32
            && !self.weights.blocks.is_empty()
            && crate::intdot::available();
        self.decode_precision = if runs {
            precision
        } else {
            CpuDecodePrecision::F32
        };
        self.decode_precision
    }

    /// The precision of the CPU's weight products over the GGUF's blocks in effect.
    pub fn cpu_decode_precision(&self) -> CpuDecodePrecision {
        self.decode_precision
    }

    /// Chooses the precision of the CPU's weight products over many rows (prefill, blend's
    /// recomputed rows) in later forward calls (default [`CpuMatmulPrecision::F32`]). `Bf16`
    /// packs every layer's projections in bf16 once (half their f32 bytes again, held while
    /// it is chosen) when the model is f32 on a CPU with AVX-512 BF16; elsewhere it is `F32`.
    /// Returns the precision in effect.
    pub fn set_cpu_matmul_precision(
        &mut self,
        precision: CpuMatmulPrecision,
    ) -> CpuMatmulPrecision {
        self.packed.clear();
        if precision == CpuMatmulPrecision::F32 || !self.device.is_cpu() || self.dtype != DType::F32
        {
            return CpuMatmulPrecision::F32;
        }
        for l in &self.weights.layers {
            for w in [&l.wqkv, &l.wo, &l.wgate_up, &l.wdown] {
                let (out, inp) = match w.dims() {
                    &[out, inp] => (out, inp),
                    _ => continue,
                };
                if !PackedWeight::available(out, inp) {
                    continue;
                }
                let packed = crate::vmath::with_cpu_f32(w, |v| Ok(PackedWeight::new(v, out, inp)));
                if let Ok(packed) = packed {
                    self.packed.insert(w.id(), packed);
                }
            }
        }
        self.cpu_matmul_precision()
    }

    /// The precision of the CPU's weight products over many rows in effect.
    pub fn cpu_matmul_precision(&self) -> CpuMatmulPrecision {
        if self.packed.is_empty() {
            CpuMatmulPrecision::F32
        } else {
            CpuMatmulPrecision::Bf16
        }
    }

    /// Final norm and output projection: `[n, hidden]` → `[n, vocab]` f32 logits.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let x = self.norm(hidden, &self.weights.norm)?;
        let head = &self.weights.lm_head;
        Ok(linear(&x, head, None, self.kept(head))?.to_dtype(DType::F32)?)
    }

    /// Rotates pre-RoPE keys `[tokens, heads, head_dim]` to the given absolute positions
    /// (what attention does internally; exposed for re-positioning checks).
    pub fn rotate(&self, k: &Tensor, positions: &[u32]) -> Result<Tensor> {
        self.tables(positions)?.apply(k)
    }

    /// Fresh pre-RoPE K and V of `hidden` (`[n, hidden]`, the residual stream entering
    /// `layer`), without touching any cache: what CacheBlend compares with cached KV.
    pub fn kv_projection(&self, layer: usize, hidden: &Tensor) -> Result<LayerKv> {
        let w = self.layer(layer)?;
        let x = self.norm(hidden, &w.attn_norm)?;
        let (_, k, v) = self.qkv(w, &x)?;
        Ok(LayerKv::new(k.contiguous()?, v.contiguous()?))
    }

    /// Prefills `tokens` at `positions` after whatever `cache` holds, appending their KV to it.
    /// Returns the f32 logits of the last token, `[vocab]`.
    pub fn prefill(
        &self,
        tokens: &[u32],
        positions: &[u32],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.prefill_with(tokens, positions, cache, &mut ())
    }

    /// [`Model::prefill`] with a [`LayerHook`] around every layer (e.g. observing attention
    /// for a token policy).
    pub fn prefill_with(
        &self,
        tokens: &[u32],
        positions: &[u32],
        cache: &mut KvCache,
        hook: &mut dyn LayerHook,
    ) -> Result<Tensor> {
        let hidden = self.prefill_hidden_with(tokens, positions, cache, hook)?;
        let last = hidden.narrow(0, tokens.len() - 1, 1)?;
        Ok(self.logits(&last)?.squeeze(0)?)
    }

    /// [`Model::prefill`] returning every token's last hidden state, `[n, hidden]` (before the
    /// final norm: [`Model::logits`] of a row is that token's next-token logits), for
    /// scoring a prompt's own tokens.
    pub fn prefill_hidden(
        &self,
        tokens: &[u32],
        positions: &[u32],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        self.prefill_hidden_with(tokens, positions, cache, &mut ())
    }

    fn prefill_hidden_with(
        &self,
        tokens: &[u32],
        positions: &[u32],
        cache: &mut KvCache,
        hook: &mut dyn LayerHook,
    ) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(invalid_input("prefill of zero tokens"));
        }
        let hidden = self.embed(tokens)?;
        let out = self.run_layers_with(
            0..self.config.num_layers,
            hidden,
            Rows::Append(positions),
            cache,
            hook,
        )?;
        Ok(out.hidden)
    }

    /// One decode step: `token` at the position after `cache`'s last, appended to it;
    /// returns the next token's f32 logits `[vocab]`. The one step every decode loop runs
    /// (`generate`, the server), with `hook` around each layer.
    ///
    /// On the CPU the step runs on a thread of rayon's pool (`Model::on_pool`), so `hook`
    /// is `Send` and must not wait for work of that pool.
    pub fn decode_step(
        &self,
        token: u32,
        cache: &mut KvCache,
        hook: &mut (dyn LayerHook + Send),
    ) -> Result<Tensor> {
        let pos = cache.positions.last().map_or(0, |p| p + 1);
        self.on_pool(|| self.prefill_with(&[token], &[pos], cache, hook))
    }

    /// Runs `f` on a thread of rayon's pool when this model computes on the CPU (here when
    /// called from one, or on a GPU). A decode step is ~150 parallel products of a few
    /// microseconds each; called from a thread outside the pool, each of them is handed to
    /// the pool and waited for (two thread wake-ups), which cost SmolLM2's CPU decode a
    /// fifth of its time. From inside, the pool's threads split each product by work
    /// stealing, and the caller sleeps once per step. Throughput: BENCHMARKS §9 "One hand-off
    /// per decode step".
    pub(crate) fn on_pool<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if self.device.is_cpu() {
            rayon::scope(|_| f())
        } else {
            f()
        }
    }

    /// Runs decoder layers `layers` for the query tokens whose residual stream entering
    /// `layers.start` is `hidden` (`[n, hidden_size]`), updating `cache` as `rows` says.
    ///
    /// The exact causal mask holds by absolute position: a query at position `p` attends to
    /// every cached key at a position `<= p`. On error the cache is left as it was.
    pub fn run_layers(
        &self,
        layers: Range<usize>,
        hidden: Tensor,
        rows: Rows<'_>,
        cache: &mut KvCache,
        probe: Option<&ProbeRequest>,
    ) -> Result<LayersOutput> {
        let mut collect = CollectProbes::new(probe.cloned());
        let mut out = self.run_layers_with(layers, hidden, rows, cache, &mut collect)?;
        out.attention = collect.layers.into_iter().filter_map(|p| p.rows).collect();
        Ok(out)
    }

    /// [`Model::run_layers`] with a [`LayerHook`]: its `before_layer` sees layer `l`'s cached
    /// KV just before layer `l` runs (so a caller can supply that layer's KV late: layer-wise
    /// pipelining), and its `after_attention` what its probe asked to observe, layer by layer.
    /// A hook error aborts the call with the cache unchanged. `attention` in the output is
    /// empty: the hook had every layer's report.
    pub fn run_layers_with(
        &self,
        layers: Range<usize>,
        mut hidden: Tensor,
        rows: Rows<'_>,
        cache: &mut KvCache,
        hook: &mut dyn LayerHook,
    ) -> Result<LayersOutput> {
        let c = &self.config;
        if layers.start >= layers.end || layers.end > c.num_layers {
            return Err(invalid_input(format!(
                "layer range {layers:?} outside 0..{}",
                c.num_layers
            )));
        }
        cache.check_shape(c.num_layers, c.num_kv_heads, c.head_dim)?;
        let (n, h) = hidden.dims2()?;
        if h != c.hidden_size {
            return Err(invalid_input(format!(
                "hidden width {h}, model {}",
                c.hidden_size
            )));
        }
        let call = self.plan_call(&layers, n, rows, cache, hook.probe())?;
        let mut new_layers: Vec<(usize, LayerKv)> = Vec::with_capacity(layers.len());
        // the next layer's normed input, when the previous layer's residual add produced it
        let mut normed: Option<Tensor> = None;
        let end = layers.end;
        for l in layers {
            let (q, k_new, v_new) = self.layer_qkv(l, &hidden, normed.take())?;
            let (attn, kv) = self.attend_call(&call, l, cache, &q, k_new, v_new, hook)?;
            (hidden, normed) = self.finish_layer(l, end, &hidden, &attn)?;
            new_layers.push((l, kv));
        }
        let k_pos = call.k_pos;
        for (l, kv) in new_layers {
            cache.layers[l] = kv;
        }
        cache.positions = k_pos;
        Ok(LayersOutput {
            hidden,
            attention: Vec::new(),
        })
    }

    /// Checks one forward call's rows against `cache` and chooses how each layer attends;
    /// `n` is the number of query tokens.
    fn plan_call<'c>(
        &self,
        layers: &Range<usize>,
        n: usize,
        rows: Rows<'_>,
        cache: &'c KvCache,
        probe: Option<&ProbeRequest>,
    ) -> Result<CallPlan<'c>> {
        let c = &self.config;
        let (q_pos, k_pos): (Vec<u32>, Vec<u32>) = match rows {
            Rows::Append(pos) => {
                if *layers != (0..c.num_layers) {
                    return Err(invalid_input(
                        "appending tokens requires running every layer",
                    ));
                }
                if pos.len() != n {
                    return Err(invalid_input(format!(
                        "{} positions for {n} tokens",
                        pos.len()
                    )));
                }
                check_increasing(pos)?;
                if let (Some(&last), Some(&first)) = (cache.positions.last(), pos.first())
                    && first <= last
                {
                    return Err(invalid_input(format!(
                        "new tokens start at position {first}, not after the cache's last position {last}"
                    )));
                }
                let mut k_pos = cache.positions.clone();
                k_pos.extend_from_slice(pos);
                (pos.to_vec(), k_pos)
            }
            Rows::Replace(_) if cache.is_pruned() => {
                return Err(invalid_input(
                    "recomputing rows of a cache pruned per head (its rows are not tokens)",
                ));
            }
            Rows::Replace(idx) => {
                if idx.len() != n {
                    return Err(invalid_input(format!("{} rows for {n} tokens", idx.len())));
                }
                if idx.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(invalid_input("replaced rows must be strictly increasing"));
                }
                if let Some(&last) = idx.last()
                    && last >= cache.len()
                {
                    return Err(invalid_input(format!(
                        "row {last} past a cache of {} tokens",
                        cache.len()
                    )));
                }
                let q_pos = idx.iter().map(|&i| cache.positions[i]).collect();
                (q_pos, cache.positions.clone())
            }
        };
        // checks positions against each other and the context, for either attention
        let pruned = cache.pruned();
        let parallel = cache.parallel_context();
        let how = self.layer_attention(
            &q_pos,
            &k_pos,
            probe,
            self.attention_kernel,
            pruned,
            parallel,
        )?;
        // a correction limited to a band of layers: the others attend exactly
        let exact_how = match parallel {
            Some(p) if layers.clone().any(|l| !p.corrects_layer(l)) => Some(self.layer_attention(
                &q_pos,
                &k_pos,
                probe,
                self.attention_kernel,
                pruned,
                None,
            )?),
            _ => None,
        };
        let replace_index = match rows {
            Rows::Replace(idx) => Some(RowReplacement::new(cache.len(), idx, &self.device)?),
            Rows::Append(_) => None,
        };
        Ok(CallPlan {
            k_pos,
            how,
            exact_how,
            replace_index,
            pruned,
            parallel,
        })
    }

    /// Layer `l` of one call up to its attention output: the layer's cached KV as `hook`
    /// supplies it, with the call's fresh rows `k_new`/`v_new` appended or replaced, and the
    /// attention of `q` over it. Returns the attention `[n, heads * head_dim]` and the
    /// layer's new KV (not yet in `cache`: a call commits every layer at its end).
    #[allow(clippy::too_many_arguments)]
    fn attend_call(
        &self,
        call: &CallPlan<'_>,
        l: usize,
        cache: &KvCache,
        q: &Tensor,
        k_new: Tensor,
        v_new: Tensor,
        hook: &mut dyn LayerHook,
    ) -> Result<(Tensor, LayerKv)> {
        let supplied = self.supply_layer(l, cache, hook)?;
        let kv = match &call.replace_index {
            None => supplied.append(&k_new, &v_new)?,
            Some(index) => supplied.replace_rows(index, &LayerKv::new(k_new, v_new))?,
        };
        let attn = self.attend_supplied(call, l, q, &kv, hook)?;
        Ok((attn, kv))
    }

    /// Layer `l`'s cached KV as `hook` supplies it (checked against the cache's shape).
    fn supply_layer(&self, l: usize, cache: &KvCache, hook: &mut dyn LayerHook) -> Result<LayerKv> {
        let c = &self.config;
        let mut supplied = cache.layers[l].clone();
        hook.before_layer(l, &mut supplied)?;
        let want = [cache.len(), c.num_kv_heads, c.head_dim];
        if supplied.k.dims() != want || supplied.v.dims() != want {
            return Err(invalid_input(format!(
                "layer {l} KV supplied as K {:?} / V {:?}, expected {want:?}",
                supplied.k.dims(),
                supplied.v.dims()
            )));
        }
        Ok(supplied)
    }

    /// The attention of `q` over layer `l`'s KV `kv` (the call's rows in it), as `call`
    /// planned it; `hook` sees what it observed.
    fn attend_supplied(
        &self,
        call: &CallPlan<'_>,
        l: usize,
        q: &Tensor,
        kv: &LayerKv,
        hook: &mut dyn LayerHook,
    ) -> Result<Tensor> {
        let heads = call.pruned.map(|p| (&p.layers[l], p.rows));
        let how = match (&call.exact_how, call.parallel) {
            (Some(exact), Some(p)) if !p.corrects_layer(l) => exact,
            _ => &call.how,
        };
        let (attn, seen) = self.attend_layer(how, q, kv, heads)?;
        hook.after_attention(l, seen)?;
        Ok(attn)
    }

    /// Pre-RoPE Q, K and V of layer `l` (a layer of the model) for the residual stream
    /// `hidden`, from its normed input when the previous layer's residual add already made it.
    fn layer_qkv(
        &self,
        l: usize,
        hidden: &Tensor,
        normed: Option<Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let w = self.layer(l)?;
        let x = match normed {
            Some(x) => x,
            None => self.norm(hidden, &w.attn_norm)?,
        };
        self.qkv(w, &x)
    }

    /// Layer `l` after its attention `attn` (`[n, heads * head_dim]`): the output projection,
    /// the residual add with the MLP's norm, the MLP, and the second residual add — fused with
    /// layer `l + 1`'s input norm when `l + 1 < end` runs next, whose normed input is then
    /// returned beside the residual stream. `l` must be a layer of the model.
    fn finish_layer(
        &self,
        l: usize,
        end: usize,
        hidden: &Tensor,
        attn: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let w = self.layer(l)?;
        let o = linear(attn, &w.wo, None, self.kept(&w.wo))?;
        let (h, x) = self.add_norm(hidden, &o, &w.mlp_norm)?;
        let gate_up = linear(&x, &w.wgate_up, None, self.kept(&w.wgate_up))?;
        let act = self.swiglu(&gate_up)?;
        let down = linear(&act, &w.wdown, None, self.kept(&w.wdown))?;
        Ok(
            match self.weights.layers.get(l + 1).filter(|_| l + 1 < end) {
                Some(next) => {
                    let (h, x) = self.add_norm(&h, &down, &next.attn_norm)?;
                    (h, Some(x))
                }
                None => ((h + down)?, None),
            },
        )
    }

    fn layer(&self, layer: usize) -> Result<&LayerWeights> {
        self.weights.layers.get(layer).ok_or_else(|| {
            invalid_input(format!(
                "layer {layer} of a {}-layer model",
                self.config.num_layers
            ))
        })
    }

    /// Pre-RoPE Q `[n, heads * d]`, K and V `[n, kv_heads, d]` of normed input `x`
    /// `[n, hidden]`: all three strided views of the fused projection (no copies; appending
    /// and attention read rows at any stride).
    fn qkv(&self, w: &LayerWeights, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let n = x.dims()[0];
        let qkv = linear(x, &w.wqkv, w.bqkv.as_ref(), self.kept(&w.wqkv))?;
        let q = qkv.narrow(1, 0, c.num_heads * c.head_dim)?;
        let heads = qkv.reshape((n, c.num_heads + 2 * c.num_kv_heads, c.head_dim))?;
        let k = heads.narrow(1, c.num_heads, c.num_kv_heads)?;
        let v = heads.narrow(1, c.num_heads + c.num_kv_heads, c.num_kv_heads)?;
        Ok((q, k, v))
    }

    /// RoPE tables for `positions`: a slice of the precomputed table when they are
    /// consecutive, a gather otherwise.
    fn tables(&self, positions: &[u32]) -> Result<RopeTables> {
        if let Some(&max) = positions.iter().max()
            && max as usize >= self.config.context_length
        {
            return Err(ModelError::ContextOverflow {
                needed: max as usize + 1,
                context: self.config.context_length,
            });
        }
        let consecutive = positions.windows(2).all(|w| w[1] == w[0] + 1);
        if consecutive && let Some(&first) = positions.first() {
            return self.rope_tables.narrow(first as usize, positions.len());
        }
        let idx = Tensor::new(positions, &self.device)?;
        self.rope_tables.select(&idx)
    }
}

/// What a projection keeps beside its f32 copy ([`Model::kept`]).
#[derive(Clone, Copy)]
struct Kept<'a> {
    /// The GGUF blocks: a decode step's few rows read them.
    blocks: Option<&'a crate::quant::BlockRows>,
    /// The bf16 packing: many rows multiply it.
    packed: Option<&'a PackedWeight>,
    /// The blocks' products' precision.
    decode: CpuDecodePrecision,
}

/// Rows from which a projection packed in bf16 multiplies by the packing (fewer go to the
/// blocks or the few-rows product, which read the weights once).
const PACKED_FROM_ROWS: usize = 16;

/// `x @ wᵀ (+ b)` for `x` `[n, in]` and `w` `[out, in]`: on the CPU in f32, 16+ rows of a
/// projection packed in bf16 by the packing (`bf16linear`), 2 to 8 rows (a
/// decode batch, a short question) read each weight row once for all of them
/// (`vmath::few_rows_linear`: twice the throughput of candle's matmul for a batch of 2, which
/// packs the whole weight on every call); a general matmul otherwise (one row included: a
/// lone decode step's matmul measured as fast, and it leaves rayon's pool to concurrent
/// requests).
fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>, kept: Kept<'_>) -> Result<Tensor> {
    let rows = x.dims().first().copied().unwrap_or(0);
    let cpu_f32 = x.device().is_cpu() && x.dtype() == DType::F32;
    let y = if let Some(packed) = kept
        .packed
        .filter(|_| cpu_f32 && rows >= PACKED_FROM_ROWS && x.rank() == 2)
    {
        let y = crate::vmath::with_cpu_f32(x, |values| Ok(packed.matmul(values, rows)))?;
        Tensor::from_vec(y, (rows, packed.out()), x.device())?
    } else if let Some(blocks) = kept
        .blocks
        .filter(|_| cpu_f32 && (1..=crate::quant::MOST_ROWS).contains(&rows))
    {
        blocks.linear(x, kept.decode)?
    } else if cpu_f32
        && w.dtype() == DType::F32
        && w.is_contiguous()
        && (2..=crate::vmath::FEW_ROWS_LINEAR_MAX).contains(&rows)
    {
        crate::vmath::few_rows_linear(x, w)?
    } else {
        x.matmul(&w.t()?)?
    };
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}
