//! Which attention a forward call runs, and running it: the fused kernel on CUDA where it
//! applies (with a counted, logged fallback where it does not), the reference elsewhere. Also
//! the public entry points that run one layer's attention alone, for checks and benchmarks.

use std::sync::atomic::Ordering;

use candle_core::{DType, Tensor};

use super::Model;
use crate::attention::{
    AttentionKernel, AttentionPlan, CpuAttentionPrecision, ProbeRequest, attend, check_visible,
};
use crate::error::{ModelError, Result, invalid_input};
use crate::hook::LayerProbe;
use crate::kv::{HeadRows, LayerKv, Pruned, PrunedLayer};
use crate::parallel::ParallelContext;
use crate::rope::RopeTables;

/// Calls of fewer corrected rows than this (a decode step) keep the reference on the CPU
/// rather than `LayerAttention::ScaledKeys`: their few score rows cost less than copying and
/// rotating every key of the layer again.
const SCALED_KEYS_LEAST_CPU_ROWS: usize = 8;

/// How one forward call attends (chosen once per call, used by every layer).
pub(super) enum LayerAttention {
    /// Materialised scores per query block, over keys rotated by `k_tables`; a probe's
    /// probabilities summed to `[keys]` when `summed`.
    Reference {
        plan: AttentionPlan,
        q_tables: RopeTables,
        k_tables: RopeTables,
        k_pos: Vec<u32>,
        summed: bool,
    },
    /// Tiled online-softmax attention on the CPU (f32; no probe, a summed probe of every
    /// row when `summed`, or per-head sums over every row when `head_summed`): keys rotated
    /// by `k_tables`, no score matrix beyond one tile.
    Tiled {
        plan: crate::tiled::TiledPlan,
        q_tables: RopeTables,
        k_tables: RopeTables,
        k_pos: Vec<u32>,
        summed: bool,
        head_summed: bool,
    },
    /// Rows `0..from` attend exactly by `exact` (fused, tiled or reference), rows `from..` —
    /// those after a parallel context — corrected by `corrected` (`ScaledKeys` or the
    /// reference), so the exact rows of a call (blend's recomputed rows beside its suffix)
    /// keep their fast attention. No probe.
    Split {
        from: usize,
        exact: Box<LayerAttention>,
        corrected: Box<LayerAttention>,
    },
    /// Every row after a parallel context whose correction keeps the context's mass
    /// (`ParallelContext::keeps_mass`): `inner` (tiled or reference, probe included; on CUDA
    /// the fused kernel scales the logits itself instead) over a copy of the layer whose
    /// context keys `keys` are scaled by `factor` (`1 / T`; RoPE is linear, so scaling
    /// pre-RoPE keys scales their logits).
    ScaledKeys {
        inner: Box<LayerAttention>,
        keys: std::ops::Range<usize>,
        factor: f64,
    },
    /// The fused kernel, rotating pre-RoPE Q and K as it loads them; with column sums of
    /// the probabilities per key when `summed` (a summed probe of every row), per query head
    /// when `head_summed` (a per-head summed probe of every row).
    #[cfg(feature = "gpu")]
    Fused {
        kernel: crate::kernels::FusedAttention,
        summed: bool,
        head_summed: bool,
        /// With `head_summed`: the first key summed ([`ProbeRequest::head_sums_from`]).
        head_sums_from: usize,
        /// With `head_summed`: one row per KV head, its group summed by the kernel
        /// ([`ProbeRequest::head_sums_grouped`]).
        head_sums_grouped: bool,
        /// Over a pruned cache: the tables of the rows appended after pruning (for keys
        /// rotated before a kernel that rotates K once per call; per tile, the kernel rotates
        /// each pruned row by its own position).
        tail_tables: Option<(usize, RopeTables)>,
    },
}

impl Model {
    /// Chooses the attention implementation of later forward calls (default
    /// [`AttentionKernel::Auto`]).
    pub fn set_attention_kernel(&mut self, kernel: AttentionKernel) {
        self.attention_kernel = kernel;
    }

    /// The attention implementation forward calls ask for.
    pub fn attention_kernel(&self) -> AttentionKernel {
        self.attention_kernel
    }

    /// Chooses the precision of the CPU's tiled attention products in later forward calls
    /// (default [`CpuAttentionPrecision::F32`]).
    pub fn set_cpu_attention_precision(&mut self, precision: CpuAttentionPrecision) {
        self.cpu_attention_precision = precision;
    }

    /// The precision the CPU's tiled attention products are asked for.
    pub fn cpu_attention_precision(&self) -> CpuAttentionPrecision {
        self.cpu_attention_precision
    }

    /// Forward calls so far that wanted the fused attention kernel but ran the reference
    /// because the kernel does not support this model's shape, dtype or device.
    pub fn attention_fallbacks(&self) -> u64 {
        self.attention_fallbacks.load(Ordering::Relaxed)
    }

    /// Why the fused attention kernel cannot run this model, or `None` when it can.
    pub fn fused_attention_unsupported(&self) -> Option<String> {
        let c = &self.config;
        if !cfg!(feature = "gpu") {
            return Some("kvquilt was built without the `gpu` feature".into());
        }
        if !self.device.is_cuda() {
            return Some("the model is not on a CUDA device".into());
        }
        if !matches!(self.dtype, DType::BF16 | DType::F16) {
            return Some(format!(
                "dtype {:?} (the kernel takes bf16 or f16)",
                self.dtype
            ));
        }
        if !crate::kernels::HEAD_DIMS.contains(&c.head_dim) {
            return Some(format!(
                "head dim {} (the kernel has {:?})",
                c.head_dim,
                crate::kernels::HEAD_DIMS
            ));
        }
        if !c.num_heads.is_multiple_of(c.num_kv_heads) || c.num_heads / c.num_kv_heads > 64 {
            return Some(format!(
                "{} heads over {} KV heads",
                c.num_heads, c.num_kv_heads
            ));
        }
        None
    }

    /// Attention of pre-RoPE queries `q` `[n, num_heads, head_dim]` at `q_pos` over pre-RoPE
    /// keys `k` and values `v` `[t, num_kv_heads, head_dim]` at `k_pos`, with the exact
    /// position mask, by the given implementation (no fallback: [`AttentionKernel::Fused`]
    /// fails where the kernel cannot run). Returns `[n, num_heads * head_dim]`. For kernel
    /// checks and benchmarks; the forward pass calls the same code.
    pub fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        q_pos: &[u32],
        k_pos: &[u32],
        kernel: AttentionKernel,
    ) -> Result<Tensor> {
        Ok(self
            .attention_with(q, k, v, q_pos, k_pos, kernel, false, None)?
            .0)
    }

    /// [`Model::attention`] and each key's probability summed over every query and head,
    /// `[t]` f32 (a summed probe of every row, as query-aware blend asks for).
    pub fn attention_column_sums(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        q_pos: &[u32],
        k_pos: &[u32],
        kernel: AttentionKernel,
    ) -> Result<(Tensor, Tensor)> {
        let (out, sums) = self.attention_with(q, k, v, q_pos, k_pos, kernel, true, None)?;
        let sums = sums.ok_or_else(|| invalid_input("no column sums came back"))?;
        Ok((out, sums))
    }

    /// [`Model::attention`] (and, with `summed`, its column sums) with queries after
    /// `parallel`'s context attending to it corrected, as a forward pass over a cache marked
    /// with that context does: for checks of the corrected kernels against the reference.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_corrected(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        q_pos: &[u32],
        k_pos: &[u32],
        kernel: AttentionKernel,
        parallel: &ParallelContext,
        summed: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.attention_with(q, k, v, q_pos, k_pos, kernel, summed, Some(parallel))
    }

    #[allow(clippy::too_many_arguments)]
    fn attention_with(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        q_pos: &[u32],
        k_pos: &[u32],
        kernel: AttentionKernel,
        summed: bool,
        parallel: Option<&ParallelContext>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let c = &self.config;
        let (n, h, d) = q.dims3()?;
        if (h, d) != (c.num_heads, c.head_dim) || n != q_pos.len() {
            return Err(invalid_input(format!(
                "q is {:?}, expected [{}, {}, {}]",
                q.dims(),
                q_pos.len(),
                c.num_heads,
                c.head_dim
            )));
        }
        let want = [k_pos.len(), c.num_kv_heads, c.head_dim];
        if k.dims() != want || v.dims() != want {
            return Err(invalid_input(format!(
                "k {:?} / v {:?}, expected {want:?}",
                k.dims(),
                v.dims()
            )));
        }
        if kernel == AttentionKernel::Fused
            && let Some(why) = self.fused_attention_unsupported()
        {
            return Err(invalid_input(format!("fused attention unavailable: {why}")));
        }
        let probe = summed.then(|| ProbeRequest::summed_over_all(n));
        let how = self.layer_attention(q_pos, k_pos, probe.as_ref(), kernel, None, parallel)?;
        let q2 = q.reshape((n, h * d))?;
        let kv = LayerKv::new(k.clone(), v.clone());
        let (out, probe) = self.attend_layer(&how, &q2, &kv, None)?;
        Ok((out, probe.rows))
    }

    /// Chooses and prepares the attention of one forward call. Over a pruned cache (per-head
    /// positions) keys are rotated by their own positions: by the fused kernel as it loads
    /// them when it rotates K per tile (decode; column sums included), else before attending
    /// (the kernel then rotates only Q, and column sums take the reference); padded heads
    /// need the reference. Queries after a `parallel` context attend to it corrected (not
    /// over a pruned cache, whose rows are not at their positions): a call without a probe
    /// whose other rows come before them splits (`LayerAttention::Split`); corrected rows
    /// run any attention over scaled keys when the correction is a temperature alone
    /// (`ScaledKeys`), else the reference — which also runs a probed call's exact rows beside
    /// its corrected ones. On the GPU a temperature alone runs in the fused kernel instead
    /// (exact and corrected rows, column sums included, in one launch over the unscaled
    /// keys).
    pub(super) fn layer_attention(
        &self,
        q_pos: &[u32],
        k_pos: &[u32],
        probe: Option<&ProbeRequest>,
        kernel: AttentionKernel,
        pruned: Option<&Pruned>,
        parallel: Option<&ParallelContext>,
    ) -> Result<LayerAttention> {
        check_visible(q_pos, k_pos)?;
        // only calls with a query after the context are corrected
        let parallel = parallel.filter(|p| q_pos.last().is_some_and(|&q| p.corrects(q)));
        if parallel.is_some() && pruned.is_some() {
            return Err(invalid_input(
                "a parallel context's correction over a cache pruned per head (its rows are not at their positions)",
            ));
        }
        // on the GPU a temperature alone rides in the fused kernel: exact and corrected rows
        // in one launch, no scaled copy of the keys
        #[cfg(feature = "gpu")]
        if let Some(p) = parallel
            && p.keeps_mass()
            && let Some(how) = self.fused_with_key_scale(q_pos, k_pos, probe, kernel, p)?
        {
            return Ok(how);
        }
        if let Some(p) = parallel
            && probe.is_none()
        {
            let from = q_pos.partition_point(|&q| !p.corrects(q));
            if from > 0 {
                let exact =
                    self.layer_attention(&q_pos[..from], k_pos, None, kernel, None, None)?;
                let corrected =
                    self.layer_attention(&q_pos[from..], k_pos, None, kernel, None, Some(p))?;
                return Ok(LayerAttention::Split {
                    from,
                    exact: Box::new(exact),
                    corrected: Box::new(corrected),
                });
            }
        }
        // every row corrected, the context's mass kept: a temperature on its keys' logits,
        // which any implementation applies to keys scaled by 1 / T
        if let Some(p) = parallel
            && p.keeps_mass()
            && q_pos.first().is_some_and(|&q| p.corrects(q))
            && !(self.device.is_cpu() && q_pos.len() < SCALED_KEYS_LEAST_CPU_ROWS)
        {
            let inner = self.layer_attention(q_pos, k_pos, probe, kernel, None, None)?;
            return Ok(LayerAttention::ScaledKeys {
                inner: Box::new(inner),
                keys: p.key_range(k_pos),
                factor: 1.0 / f64::from(p.temperature()),
            });
        }
        let c = &self.config;
        if let Some(&max) = q_pos.iter().chain(k_pos).max()
            && max as usize >= c.context_length
        {
            return Err(ModelError::ContextOverflow {
                needed: max as usize + 1,
                context: c.context_length,
            });
        }
        // Per-row probes need the probabilities, which only the reference materialises; a
        // summed probe of every row runs fused (the kernel's log-sum-exp + attn_colsum), over
        // a pruned cache too when the kernel rotates K per tile (decode: a pool's probe).
        let summed = probe.is_some_and(|p| p.is_summed_over_all(q_pos.len()));
        // (the kernel's per-query-head sums take GQA groups of at most 8, its per-KV-head
        // sums and the reference any)
        let head_summed = probe.is_some_and(|p| {
            p.is_head_summed_over_all(q_pos.len())
                && (p.head_sums_grouped || c.num_heads <= 8 * c.num_kv_heads)
        });
        let padded = pruned.is_some_and(|p| p.layers.iter().any(|l| l.bias.is_some()));
        let fused = (probe.is_none() || summed || head_summed)
            && !padded
            && match kernel {
                AttentionKernel::Reference => false,
                AttentionKernel::Auto if self.device.is_cpu() => false,
                AttentionKernel::Auto | AttentionKernel::Fused => {
                    match self.fused_attention_unsupported() {
                        None if parallel.is_some() => {
                            self.note_fallback(
                                "the kernel corrects with a temperature alone (S·T = 1)",
                            );
                            false
                        }
                        None => true,
                        Some(why) => {
                            self.note_fallback(&why);
                            false
                        }
                    }
                }
            };
        #[cfg(feature = "gpu")]
        if fused {
            let kernel = crate::kernels::FusedAttention::new(
                q_pos,
                k_pos,
                self.rope_tables.cos(),
                self.rope_tables.sin(),
                c.num_heads,
                c.num_kv_heads,
                c.head_dim,
                &self.device,
            )?;
            // the column sums rotate a pruned cache's rows by their per-head positions only
            // in a kernel that rotates K per tile; calls of many query rows over one (none
            // the pools make) take the reference, the kernel built for them unused
            if (summed || head_summed) && pruned.is_some() && kernel.rotates_first() {
                self.note_fallback("column sums over a pruned cache for many query rows");
            } else {
                let tail_tables = match pruned {
                    Some(p) => Some((p.rows, self.tables(&k_pos[p.rows..])?)),
                    None => None,
                };
                return Ok(LayerAttention::Fused {
                    kernel,
                    summed,
                    head_summed,
                    head_sums_from: probe.map_or(0, |p| p.head_sums_from.min(k_pos.len())),
                    head_sums_grouped: probe.is_some_and(|p| p.head_sums_grouped),
                    tail_tables,
                });
            }
        }
        #[cfg(not(feature = "gpu"))]
        let _ = fused; // a build without the CUDA kernels has no fused path
        // The CPU's own fused path: tiled online softmax, for calls with no probe, a summed
        // probe of every row (not over a pruned cache) or per-head sums over every row (a
        // decode pool's scores: over its pruned cache too, the keys rotated first).
        if (probe.is_none() || (summed && pruned.is_none()) || head_summed)
            && !padded
            && parallel.is_none()
            && kernel == AttentionKernel::Auto
            && self.device.is_cpu()
            && self.dtype == DType::F32
        {
            return Ok(LayerAttention::Tiled {
                plan: crate::tiled::TiledPlan::new(q_pos, k_pos, self.cpu_attention_precision)?,
                q_tables: self.tables(q_pos)?,
                k_tables: self.tables(k_pos)?,
                k_pos: k_pos.to_vec(),
                summed,
                head_summed,
            });
        }
        Ok(LayerAttention::Reference {
            plan: AttentionPlan::new(
                q_pos,
                k_pos,
                c.num_heads,
                self.score_budget,
                self.dtype,
                &self.device,
                probe,
                parallel,
            )?,
            q_tables: self.tables(q_pos)?,
            k_tables: self.tables(k_pos)?,
            k_pos: k_pos.to_vec(),
            summed: probe.is_some_and(|p| p.summed),
        })
    }

    /// The fused kernel over a temperature-only correction (`ParallelContext::keeps_mass`):
    /// the call's exact attention with the rows after the context seeing the context keys'
    /// logits times `1 / T` (`FusedAttention::with_key_scale`), or `None` where the exact
    /// call would not run fused (the CPU, the reference asked for, a per-row probe, an
    /// unsupported shape: the caller's other forms apply).
    #[cfg(feature = "gpu")]
    fn fused_with_key_scale(
        &self,
        q_pos: &[u32],
        k_pos: &[u32],
        probe: Option<&ProbeRequest>,
        kernel: AttentionKernel,
        p: &ParallelContext,
    ) -> Result<Option<LayerAttention>> {
        if kernel == AttentionKernel::Reference
            || self.device.is_cpu()
            || self.fused_attention_unsupported().is_some()
        {
            return Ok(None);
        }
        match self.layer_attention(q_pos, k_pos, probe, kernel, None, None)? {
            LayerAttention::Fused {
                kernel: fused,
                summed,
                head_summed,
                head_sums_from,
                head_sums_grouped,
                tail_tables: None,
            } => {
                let from = q_pos.partition_point(|&q| !p.corrects(q));
                let factor = 1.0 / p.temperature();
                Ok(Some(LayerAttention::Fused {
                    kernel: fused.with_key_scale(from, p.key_range(k_pos), factor)?,
                    summed,
                    head_summed,
                    head_sums_from,
                    head_sums_grouped,
                    tail_tables: None,
                }))
            }
            _ => Ok(None),
        }
    }

    /// Counts a fallback to the reference attention; warns on the first one.
    fn note_fallback(&self, why: &str) {
        if self.attention_fallbacks.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                "fused attention cannot run ({why}); using the reference attention (counted in attention_fallbacks)"
            );
        }
    }

    /// Keys rotated to their positions `k_pos`: by `k_tables`, except a pruned layer's first
    /// rows, each rotated by its own (layer, head) position. On the CPU the rotated keys are
    /// kept beside the layer's buffers ([`LayerKv::rotated_keys`]), so a decode step rotates
    /// its own key only, not the whole context (or every kept entry) in every layer.
    fn rotate_keys(
        &self,
        kv: &LayerKv,
        k_tables: &RopeTables,
        k_pos: &[u32],
        pruned: Option<(&PrunedLayer, usize)>,
    ) -> Result<Tensor> {
        let t = kv.len();
        if self.device.is_cpu() {
            let per_head = pruned.map(|(layer, _)| &layer.host_positions);
            let rotate = self.key_rotation(kv, k_tables, pruned);
            return kv.rotated_keys(self.rope_tables.id(), k_pos, per_head, rotate);
        }
        match pruned {
            None => k_tables.apply(&kv.k),
            Some((layer, rows)) => {
                self.rotate_pruned(&kv.k, layer, rows, &k_tables.narrow(rows, t - rows)?)
            }
        }
    }

    /// How the CPU's kept copies of a layer's keys ([`LayerKv::rotated_keys`],
    /// [`LayerKv::decode_rows`]) rotate its pre-RoPE rows `start..` (`part`, running to the
    /// layer's end): by `k_tables`, except a pruned layer's first rows, each by its own
    /// (layer, head) position.
    fn key_rotation<'a>(
        &'a self,
        kv: &'a LayerKv,
        k_tables: &'a RopeTables,
        pruned: Option<(&'a PrunedLayer, usize)>,
    ) -> impl Fn(&Tensor, usize) -> Result<Tensor> + 'a {
        move |part, start| match pruned {
            Some((layer, rows)) if start < rows => {
                let t = kv.len();
                let tail = k_tables.narrow(rows, t - rows)?;
                let all = self.rotate_pruned(&kv.k, layer, rows, &tail)?;
                Ok(all.narrow(0, start, t - start)?)
            }
            // rows of tokens, or appended after pruning: shared positions
            _ => k_tables.narrow(start, part.dims()[0])?.apply(part),
        }
    }

    /// A CPU decode step's rows of `kv` laid out by head ([`LayerKv::decode_rows`]): bf16
    /// under [`CpuAttentionPrecision::Bf16`] where the CPU has AVX-512F (whose kernels widen
    /// them as they load), f32 otherwise; `None` for a layer without growth buffers.
    fn decode_rows(
        &self,
        kv: &LayerKv,
        k_tables: &RopeTables,
        k_pos: &[u32],
        pruned: Option<(&PrunedLayer, usize)>,
    ) -> Result<Option<HeadRows>> {
        let bf16 = self.cpu_attention_precision == CpuAttentionPrecision::Bf16
            && crate::vmath::few_rows_widen_bf16(self.config.head_dim);
        let dtype = if bf16 { DType::BF16 } else { DType::F32 };
        let per_head = pruned.map(|(layer, _)| &layer.host_positions);
        kv.decode_rows(
            self.rope_tables.id(),
            k_pos,
            per_head,
            dtype,
            self.key_rotation(kv, k_tables, pruned),
        )
    }

    /// A pruned layer's keys rotated: rows `0..rows` per head by `layer`'s positions, the
    /// rest by `tail` (their tables, in order).
    fn rotate_pruned(
        &self,
        k: &Tensor,
        layer: &PrunedLayer,
        rows: usize,
        tail: &RopeTables,
    ) -> Result<Tensor> {
        let (t, heads, d) = k.dims3()?;
        let per_head = self.rope_tables.select(&layer.positions)?;
        let head_rows = per_head
            .apply(&k.narrow(0, 0, rows)?.reshape((rows * heads, 1, d))?)?
            .reshape((rows, heads, d))?;
        if rows == t {
            return Ok(head_rows);
        }
        let shared = tail.apply(&k.narrow(0, rows, t - rows)?)?;
        Ok(Tensor::cat(&[&head_rows, &shared], 0)?)
    }

    /// One layer's attention: pre-RoPE `q` `[n, num_heads * head_dim]` (rows may be a strided
    /// view) over the layer's pre-RoPE K and V (the first `rows` of them per head when the
    /// cache is pruned); with what the call's probe asked for.
    pub(super) fn attend_layer(
        &self,
        how: &LayerAttention,
        q: &Tensor,
        kv: &LayerKv,
        pruned: Option<(&PrunedLayer, usize)>,
    ) -> Result<(Tensor, LayerProbe)> {
        let v = &kv.v;
        match how {
            LayerAttention::Split {
                from,
                exact,
                corrected,
            } => {
                let n = q.dims()[0];
                let (a, _) = self.attend_layer(exact, &q.narrow(0, 0, *from)?, kv, pruned)?;
                let (b, _) =
                    self.attend_layer(corrected, &q.narrow(0, *from, n - from)?, kv, pruned)?;
                Ok((Tensor::cat(&[&a, &b], 0)?, LayerProbe::default()))
            }
            LayerAttention::ScaledKeys {
                inner,
                keys,
                factor,
            } => {
                if keys.is_empty() {
                    return self.attend_layer(inner, q, kv, pruned);
                }
                let t = kv.k.dims()[0];
                let mut parts = Vec::with_capacity(3);
                if keys.start > 0 {
                    parts.push(kv.k.narrow(0, 0, keys.start)?);
                }
                parts.push((kv.k.narrow(0, keys.start, keys.len())? * *factor)?);
                if keys.end < t {
                    parts.push(kv.k.narrow(0, keys.end, t - keys.end)?);
                }
                let scaled = LayerKv::new(Tensor::cat(&parts, 0)?, kv.v.clone());
                self.attend_layer(inner, q, &scaled, pruned)
            }
            LayerAttention::Reference {
                plan,
                q_tables,
                k_tables,
                k_pos,
                summed,
            } => {
                let c = &self.config;
                let q = q.reshape((q.dims()[0], c.num_heads, c.head_dim))?;
                let q_rot = q_tables.apply(&q)?;
                let k_rot = self.rotate_keys(kv, k_tables, k_pos, pruned)?;
                let bias = pruned.and_then(|(l, _)| l.bias.as_ref());
                let a = attend(plan, &q_rot, &k_rot, v, bias)?;
                let rows = match a.rows {
                    Some(p) if *summed => Some(p.flatten_to(2)?.sum(0)?),
                    p => p,
                };
                Ok((
                    a.out,
                    LayerProbe {
                        rows,
                        column_sums: a.column_sums,
                        head_sums: a.head_sums,
                        head_sums_from: 0,
                    },
                ))
            }
            LayerAttention::Tiled {
                plan,
                q_tables,
                k_tables,
                k_pos,
                summed,
                head_summed,
            } => {
                if pruned.is_some_and(|(l, _)| l.bias.is_some()) {
                    return Err(invalid_input(
                        "tiled attention over a padded pruned layer (the reference masks padding)",
                    ));
                }
                let c = &self.config;
                let q = q.reshape((q.dims()[0], c.num_heads, c.head_dim))?;
                let q_rot = q_tables.apply(&q)?;
                // a decode step reads its layer's rows by head
                if !*summed
                    && crate::tiled::reads_by_head(plan, c.num_heads / c.num_kv_heads)
                    && let Some(rows) = self.decode_rows(kv, k_tables, k_pos, pruned)?
                {
                    if *head_summed {
                        let (out, sums) =
                            crate::tiled::attend_head_summed(plan, &q_rot, &rows.k, &rows.v, true)?;
                        return Ok((out, LayerProbe::head_sums(sums)));
                    }
                    let out = crate::tiled::attend_by_head(plan, &q_rot, &rows.k, &rows.v)?;
                    return Ok((out, LayerProbe::default()));
                }
                let k_rot = self.rotate_keys(kv, k_tables, k_pos, pruned)?;
                if *head_summed {
                    let (out, sums) =
                        crate::tiled::attend_head_summed(plan, &q_rot, &k_rot, v, false)?;
                    return Ok((out, LayerProbe::head_sums(sums)));
                }
                if *summed {
                    let (out, sums) = crate::tiled::attend_summed(plan, &q_rot, &k_rot, v)?;
                    return Ok((
                        out,
                        LayerProbe {
                            rows: Some(sums),
                            ..LayerProbe::default()
                        },
                    ));
                }
                let out = crate::tiled::attend(plan, &q_rot, &k_rot, v)?;
                Ok((out, LayerProbe::default()))
            }
            #[cfg(feature = "gpu")]
            LayerAttention::Fused {
                kernel,
                summed,
                head_summed,
                head_sums_from,
                head_sums_grouped,
                tail_tables,
            } => {
                let k = &kv.k;
                // a pruned cache's per-head positions, when the kernel rotates its rows
                let mut head_pos = None;
                if let Some((layer, rows)) = pruned {
                    let (Some((_, tail)), None) = (tail_tables, &layer.bias) else {
                        return Err(invalid_input(
                            "fused attention over a pruned cache needs unpadded heads and its tail tables",
                        ));
                    };
                    // decode: the kernel (and the column sums) rotate each pruned row by its
                    // own position as they load; calls that rotate K once first get keys
                    // rotated here (and no probe: `layer_attention` sends those elsewhere)
                    if !kernel.rotates_first() {
                        head_pos = Some((&layer.positions, rows));
                    } else if *summed || *head_summed {
                        return Err(invalid_input(
                            "fused column sums over a pruned cache need a kernel rotating K per tile",
                        ));
                    } else {
                        let k_rot = self.rotate_pruned(k, layer, rows, tail)?;
                        return Ok((kernel.attend_rotated(q, &k_rot, v)?, LayerProbe::default()));
                    }
                }
                if *summed {
                    let (out, sums) = kernel.attend_and_column_sums(q, k, v, head_pos)?;
                    Ok((
                        out,
                        LayerProbe {
                            rows: Some(sums),
                            ..LayerProbe::default()
                        },
                    ))
                } else if *head_summed {
                    use crate::kernels::HeadSums;
                    let (by, group) = if *head_sums_grouped {
                        (HeadSums::PerKvHead, 1)
                    } else {
                        let c = &self.config;
                        (HeadSums::PerQueryHead, c.num_heads / c.num_kv_heads)
                    };
                    let (out, sums) =
                        kernel.attend_and_head_sums(q, k, v, head_pos, *head_sums_from, by)?;
                    let c = &self.config;
                    Ok((
                        out,
                        LayerProbe {
                            head_sums: Some(sums.reshape((c.num_kv_heads, group, ()))?),
                            head_sums_from: *head_sums_from,
                            ..LayerProbe::default()
                        },
                    ))
                } else if let Some((positions, rows)) = head_pos {
                    let out = kernel.attend_pruned(q, k, v, positions, rows)?;
                    Ok((out, LayerProbe::default()))
                } else {
                    Ok((kernel.attend(q, k, v)?, LayerProbe::default()))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::config::{Architecture, ModelConfig};
    use crate::kv::{KvCache, LayerKv};

    fn model() -> Model {
        let config = ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 32,
            hidden_size: 32,
            intermediate_size: 16,
            num_layers: 1,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            rope_theta: 10_000.0,
            rope_scaling: None,
            rms_norm_eps: 1e-5,
            context_length: 64,
            tie_word_embeddings: true,
            qkv_bias: false,
        };
        Model::random(config, &Device::Cpu, DType::F32).unwrap()
    }

    /// A summed probe of every row (query-aware blend's question pass) runs tiled on the CPU
    /// and reports what the reference reports: each key's probability summed over every
    /// query and head, with the same output.
    #[test]
    fn the_cpu_sums_every_rows_attention_per_key_as_the_reference_does() -> Result<()> {
        let m = model();
        let dev = Device::Cpu;
        let kp: Vec<u32> = (0..40).filter(|p| p % 5 != 2).collect();
        let qp: Vec<u32> = vec![3, 9, 17, 30, 38, 39];
        let q = Tensor::randn(0f32, 1.0, (qp.len(), 4, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (kp.len(), 2, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (kp.len(), 2, 8), &dev)?;
        let how = m.layer_attention(
            &qp,
            &kp,
            Some(&ProbeRequest::summed_over_all(qp.len())),
            AttentionKernel::Auto,
            None,
            None,
        )?;
        assert!(matches!(how, LayerAttention::Tiled { summed: true, .. }));
        let (out, sums) = m.attention_column_sums(&q, &k, &v, &qp, &kp, AttentionKernel::Auto)?;
        let (want_out, want_sums) =
            m.attention_column_sums(&q, &k, &v, &qp, &kp, AttentionKernel::Reference)?;
        for (a, b) in [(&out, &want_out), (&sums, &want_sums)] {
            let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "tiled vs reference: {diff}");
        }
        let total = sums.sum_all()?.to_scalar::<f32>()?;
        assert!(
            (total - (qp.len() * 4) as f32).abs() < 1e-3,
            "every row sums to 1: {total}"
        );
        Ok(())
    }

    /// A call whose rows sit both inside and after a parallel context splits: the rows inside
    /// on the CPU's tiled attention, the rows after corrected — through the reference, or,
    /// when the correction keeps the context's mass, the tiled attention over keys scaled by
    /// `1 / T` — the same output as the corrected reference over every row.
    #[test]
    fn rows_after_a_parallel_context_split_off_to_the_corrected_reference() -> Result<()> {
        let m = model();
        let dev = Device::Cpu;
        let kp: Vec<u32> = (0..56).collect();
        let qp: Vec<u32> = [2u32, 7, 15, 29].into_iter().chain(40..52).collect();
        let q = Tensor::randn(0f32, 1.0, (qp.len(), 4 * 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (kp.len(), 2, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (kp.len(), 2, 8), &dev)?;
        let kv = LayerKv::new(k, v);
        let plain = m.attention(
            &q.reshape((qp.len(), 4, 8))?,
            &kv.k,
            &kv.v,
            &qp,
            &kp,
            AttentionKernel::Reference,
        )?;
        for (t, s, scaled) in [(0.7, 1.2, false), (0.8, 1.25, true)] {
            let p = ParallelContext::new(5..40, t, s)?;
            assert_eq!(p.keeps_mass(), scaled);
            let how = m.layer_attention(&qp, &kp, None, AttentionKernel::Auto, None, Some(&p))?;
            let LayerAttention::Split {
                from,
                exact,
                corrected,
            } = &how
            else {
                panic!("expected a split call");
            };
            assert_eq!(*from, 4);
            assert!(matches!(**exact, LayerAttention::Tiled { .. }));
            match &**corrected {
                LayerAttention::ScaledKeys { inner, keys, .. } if scaled => {
                    assert!(matches!(**inner, LayerAttention::Tiled { .. }));
                    assert_eq!(*keys, 5..40);
                }
                LayerAttention::Reference { .. } if !scaled => {}
                _ => panic!("T {t}, S {s}: unexpected corrected attention"),
            }
            let (got, _) = m.attend_layer(&how, &q, &kv, None)?;

            let plan = AttentionPlan::new(&qp, &kp, 4, 1 << 20, DType::F32, &dev, None, Some(&p))?;
            let q_rot = m.rotate(&q.reshape((qp.len(), 4, 8))?, &qp)?;
            let k_rot = m.rotate(&kv.k, &kp)?;
            let want = attend(&plan, &q_rot, &k_rot, &kv.v, None)?.out;
            let diff = (&got - &want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(
                diff < 1e-5,
                "T {t}, S {s}: split vs corrected reference: {diff}"
            );
            // the correction reached the rows after the context and only those
            let d = (&got - &plain)?.abs()?;
            let moved = d
                .narrow(0, 4, qp.len() - 4)?
                .max_all()?
                .to_scalar::<f32>()?;
            let kept = d.narrow(0, 0, 4)?.max_all()?.to_scalar::<f32>()?;
            assert!(moved > 1e-3 && kept < 1e-5, "moved {moved}, kept {kept}");
        }
        Ok(())
    }

    /// Heads keeping different tokens (one padded and masked) attend exactly over their own
    /// kept keys, each rotated by its own position, plus the rows appended after pruning.
    #[test]
    fn ragged_heads_attend_over_their_own_kept_keys() -> Result<()> {
        let m = model();
        let dev = Device::Cpu;
        let (t, heads, kvh, d) = (12usize, 4usize, 2usize, 8usize);
        let k = Tensor::randn(0f32, 1.0, (t, kvh, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (t, kvh, d), &dev)?;
        let cache = KvCache::new(
            vec![LayerKv::new(k.clone(), v.clone())],
            (0..t as u32).collect(),
        );
        let keep: Vec<Vec<u32>> = vec![vec![0, 3, 4, 9, 11], vec![1, 7, 10]];
        let pruned = cache.retain(std::slice::from_ref(&keep))?;
        // two rows appended to every head at positions 12 and 13
        let k_new = Tensor::randn(0f32, 1.0, (2, kvh, d), &dev)?;
        let v_new = Tensor::randn(0f32, 1.0, (2, kvh, d), &dev)?;
        let layer = pruned.layers[0].append(&k_new, &v_new)?;
        let mut k_pos = pruned.positions.clone();
        k_pos.extend([12, 13]);
        let q_pos = [12u32, 13];
        let q = Tensor::randn(0f32, 1.0, (2, heads * d), &dev)?;
        let p = pruned.pruned().unwrap();
        let how = m.layer_attention(&q_pos, &k_pos, None, AttentionKernel::Auto, Some(p), None)?;
        let (got, _) = m.attend_layer(&how, &q, &layer, Some((&p.layers[0], p.rows)))?;
        let got = got.to_vec2::<f32>()?;

        // naive: per query head, its KV head's kept keys then the appended ones, causal
        let qr = m
            .rotate(&q.reshape((2, heads, d))?, &q_pos)?
            .to_vec3::<f32>()?;
        for (i, &qp) in q_pos.iter().enumerate() {
            for head in 0..heads {
                let kh = head / (heads / kvh);
                let mut keys: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
                for &row in &keep[kh] {
                    let kk = m.rotate(&k.narrow(0, row as usize, 1)?, &[row])?;
                    keys.push((
                        kk.narrow(1, kh, 1)?.flatten_all()?.to_vec1()?,
                        v.narrow(0, row as usize, 1)?
                            .narrow(1, kh, 1)?
                            .flatten_all()?
                            .to_vec1()?,
                    ));
                }
                for (j, p) in [12u32, 13]
                    .into_iter()
                    .enumerate()
                    .filter(|&(_, p)| p <= qp)
                {
                    let kk = m.rotate(&k_new.narrow(0, j, 1)?, &[p])?;
                    keys.push((
                        kk.narrow(1, kh, 1)?.flatten_all()?.to_vec1()?,
                        v_new
                            .narrow(0, j, 1)?
                            .narrow(1, kh, 1)?
                            .flatten_all()?
                            .to_vec1()?,
                    ));
                }
                let s: Vec<f64> = keys
                    .iter()
                    .map(|(kk, _)| {
                        (0..d)
                            .map(|x| qr[i][head][x] as f64 * kk[x] as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
                let z: f64 = e.iter().sum();
                for x in 0..d {
                    let want: f64 = e
                        .iter()
                        .zip(&keys)
                        .map(|(w, (_, vv))| w / z * vv[x] as f64)
                        .sum();
                    let g = got[i][head * d + x] as f64;
                    assert!(
                        (g - want).abs() < 1e-4,
                        "query {i} head {head}: {g} vs {want}"
                    );
                }
            }
        }
        Ok(())
    }
}
