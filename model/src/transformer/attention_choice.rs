//! Which attention a forward call runs, and running it: the fused kernel on CUDA where it
//! applies (with a counted, logged fallback where it does not), the reference elsewhere. Also
//! the public entry points that run one layer's attention alone, for checks and benchmarks.

use std::sync::atomic::Ordering;

use candle_core::{DType, Tensor};

use super::Model;
use crate::attention::{AttentionKernel, AttentionPlan, ProbeRequest, attend, check_visible};
use crate::error::{ModelError, Result, invalid_input};
use crate::rope::RopeTables;

/// How one forward call attends (chosen once per call, used by every layer).
pub(super) enum LayerAttention {
    /// Materialised scores per query block, over keys rotated by `k_tables`; a probe's
    /// probabilities summed to `[keys]` when `summed`.
    Reference {
        plan: AttentionPlan,
        q_tables: RopeTables,
        k_tables: RopeTables,
        summed: bool,
    },
    /// Tiled online-softmax attention on the CPU (f32, no probe): keys rotated by
    /// `k_tables`, no score matrix beyond one tile.
    Tiled {
        plan: crate::tiled::TiledPlan,
        q_tables: RopeTables,
        k_tables: RopeTables,
    },
    /// The fused kernel, rotating pre-RoPE Q and K as it loads them; with column sums of
    /// the probabilities per key when `summed` (a summed probe of every row).
    #[cfg(feature = "gpu")]
    Fused {
        kernel: crate::kernels::FusedAttention,
        summed: bool,
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
        Ok(self.attention_with(q, k, v, q_pos, k_pos, kernel, false)?.0)
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
        let (out, sums) = self.attention_with(q, k, v, q_pos, k_pos, kernel, true)?;
        let sums = sums.ok_or_else(|| invalid_input("no column sums came back"))?;
        Ok((out, sums))
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
        let how = self.layer_attention(q_pos, k_pos, probe.as_ref(), kernel)?;
        let q2 = q.reshape((n, h * d))?;
        self.attend_layer(&how, &q2, k, v)
    }

    /// Chooses and prepares the attention of one forward call.
    pub(super) fn layer_attention(
        &self,
        q_pos: &[u32],
        k_pos: &[u32],
        probe: Option<&ProbeRequest>,
        kernel: AttentionKernel,
    ) -> Result<LayerAttention> {
        check_visible(q_pos, k_pos)?;
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
        // summed probe of every row runs fused (the kernel's log-sum-exp + attn_colsum).
        let summed = probe.is_some_and(|p| p.is_summed_over_all(q_pos.len()));
        let fused = (probe.is_none() || summed)
            && match kernel {
                AttentionKernel::Reference => false,
                AttentionKernel::Auto if self.device.is_cpu() => false,
                AttentionKernel::Auto | AttentionKernel::Fused => {
                    match self.fused_attention_unsupported() {
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
            return Ok(LayerAttention::Fused { kernel, summed });
        }
        debug_assert!(!fused || !cfg!(feature = "gpu"));
        // The CPU's own fused path: tiled online softmax, for calls with no probe.
        if probe.is_none()
            && kernel == AttentionKernel::Auto
            && self.device.is_cpu()
            && self.dtype == DType::F32
        {
            return Ok(LayerAttention::Tiled {
                plan: crate::tiled::TiledPlan::new(q_pos, k_pos)?,
                q_tables: self.tables(q_pos)?,
                k_tables: self.tables(k_pos)?,
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
            )?,
            q_tables: self.tables(q_pos)?,
            k_tables: self.tables(k_pos)?,
            summed: probe.is_some_and(|p| p.summed),
        })
    }

    /// Counts a fallback to the reference attention; warns on the first one.
    fn note_fallback(&self, why: &str) {
        if self.attention_fallbacks.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                "fused attention cannot run ({why}); using the reference attention (counted in attention_fallbacks)"
            );
        }
    }

    /// `q` `[n, num_heads * head_dim]` and `k` rotated to their positions, `q` as
    /// `[n, num_heads, head_dim]` (the host attentions' inputs; the fused kernel rotates as it
    /// loads).
    fn rotate_qk(
        &self,
        q: &Tensor,
        q_tables: &RopeTables,
        k: &Tensor,
        k_tables: &RopeTables,
    ) -> Result<(Tensor, Tensor)> {
        let c = &self.config;
        let q = q.reshape((q.dims()[0], c.num_heads, c.head_dim))?;
        Ok((q_tables.apply(&q)?, k_tables.apply(k)?))
    }

    /// One layer's attention: pre-RoPE `q` `[n, num_heads * head_dim]` (rows may be a strided
    /// view) over the layer's pre-RoPE K and V; with the probed rows' probabilities when the
    /// call was prepared with a probe.
    pub(super) fn attend_layer(
        &self,
        how: &LayerAttention,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        match how {
            LayerAttention::Reference {
                plan,
                q_tables,
                k_tables,
                summed,
            } => {
                let (q_rot, k_rot) = self.rotate_qk(q, q_tables, k, k_tables)?;
                let (out, probs) = attend(plan, &q_rot, &k_rot, v)?;
                let probs = match probs {
                    Some(p) if *summed => Some(p.flatten_to(2)?.sum(0)?),
                    p => p,
                };
                Ok((out, probs))
            }
            LayerAttention::Tiled {
                plan,
                q_tables,
                k_tables,
            } => {
                let (q_rot, k_rot) = self.rotate_qk(q, q_tables, k, k_tables)?;
                Ok((crate::tiled::attend(plan, &q_rot, &k_rot, v)?, None))
            }
            #[cfg(feature = "gpu")]
            LayerAttention::Fused { kernel, summed } => {
                if *summed {
                    let (out, sums) = kernel.attend_and_column_sums(q, k, v)?;
                    Ok((out, Some(sums)))
                } else {
                    Ok((kernel.attend(q, k, v)?, None))
                }
            }
        }
    }
}
