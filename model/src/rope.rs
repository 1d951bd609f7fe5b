//! Rotary position embeddings at arbitrary absolute positions.
//!
//! Convention: HF "rotate_half" (GPT-NeoX style): dimension `i` is paired with `i + d/2`, and
//! pair `i` rotates by `position * inv_freq[i]` radians with `inv_freq[i] = theta^(-2i/d)`
//! (before any scaling). GGUF files of the `llama` architecture store Q/K rows permuted for
//! the interleaved convention; the GGUF loader undoes that permutation so that one convention
//! holds for every model and every stored K (see `gguf.rs`).
//!
//! Because RoPE is a rotation by an angle proportional to the position, rotating a pre-RoPE
//! key to position `p` is the same whatever position it was computed at: this is what lets a
//! chunk prefilled at positions `0..n` be placed at `p..p+n` later (`rotate(k, p+j)`).

use candle_core::{DType, Device, Tensor};

use crate::config::{ModelConfig, RopeScaling};
use crate::error::Result;

/// Precomputed rotary frequencies of one model.
#[derive(Debug, Clone)]
pub struct Rope {
    /// One frequency per rotated pair, in radians per position; `head_dim / 2` entries.
    inv_freq: Vec<f32>,
}

impl Rope {
    /// The frequencies of `cfg`'s head dimension, RoPE base and scaling.
    pub(crate) fn new(cfg: &ModelConfig) -> Self {
        let d = cfg.head_dim;
        let mut inv_freq: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f32 / d as f32))
            .collect();
        match cfg.rope_scaling {
            None => {}
            Some(RopeScaling::Linear { factor }) => {
                for f in &mut inv_freq {
                    *f /= factor;
                }
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old_ctx = original_max_position_embeddings as f32;
                let low_wavelen = old_ctx / low_freq_factor;
                let high_wavelen = old_ctx / high_freq_factor;
                for f in &mut inv_freq {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old_ctx / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        Self { inv_freq }
    }

    /// Frequencies per rotated pair (radians per position).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// `cos` and `sin` tables for the given absolute positions, each `[positions.len(), head_dim/2]`
    /// in `dtype` on `device`. Angles are computed in f32 as `position * inv_freq`, as HF does.
    pub fn tables(&self, positions: &[u32], device: &Device, dtype: DType) -> Result<RopeTables> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let shape = (positions.len(), half);
        let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok(RopeTables { cos, sin })
    }
}

/// `cos`/`sin` for a list of positions, ready to rotate tensors of those positions.
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl RopeTables {
    /// These tables' identity (their cosines' tensor id): what keys rotated by them and
    /// kept are keyed by ([`crate::LayerKv`]'s kept rotations), so keys rotated under
    /// another model's tables (another base or scaling) are never read as these.
    pub(crate) fn id(&self) -> candle_core::TensorId {
        self.cos.id()
    }

    /// The cosines, `[positions, head_dim / 2]`.
    #[cfg_attr(not(feature = "gpu"), allow(dead_code))]
    pub(crate) fn cos(&self) -> &Tensor {
        &self.cos
    }

    /// The sines, `[positions, head_dim / 2]`.
    #[cfg_attr(not(feature = "gpu"), allow(dead_code))]
    pub(crate) fn sin(&self) -> &Tensor {
        &self.sin
    }

    /// Rotates `x` of shape `[tokens, heads, head_dim]` (token `t` at the table's position `t`).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.unsqueeze(0)?.contiguous()?;
        let out = candle_nn::rotary_emb::rope_thd(&x, &self.cos, &self.sin)?;
        Ok(out.squeeze(0)?)
    }

    /// Rows `start..start+len` (consecutive positions).
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        Ok(Self {
            cos: self.cos.narrow(0, start, len)?,
            sin: self.sin.narrow(0, start, len)?,
        })
    }

    /// The rows of these tables for the given token indices (for a subset of the positions).
    pub fn select(&self, rows: &Tensor) -> Result<Self> {
        Ok(Self {
            cos: self.cos.index_select(rows, 0)?.contiguous()?,
            sin: self.sin.index_select(rows, 0)?.contiguous()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Architecture;

    fn cfg(head_dim: usize) -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 8,
            hidden_size: head_dim * 2,
            intermediate_size: 8,
            num_layers: 1,
            num_heads: 2,
            num_kv_heads: 1,
            head_dim,
            rope_theta: 10_000.0,
            rope_scaling: None,
            rms_norm_eps: 1e-5,
            context_length: 64,
            tie_word_embeddings: true,
            qkv_bias: false,
        }
    }

    /// The fused kernel follows rotate_half: x*cos + rotate_half(x)*sin, pairs (i, i + d/2).
    #[test]
    fn rotate_half_convention() -> Result<()> {
        let d = 8;
        let rope = Rope::new(&cfg(d));
        let positions = [0u32, 3, 17];
        let t = rope.tables(&positions, &Device::Cpu, DType::F32)?;
        let x = Tensor::randn(0f32, 1.0, (3, 2, d), &Device::Cpu)?;
        let got = t.apply(&x)?.to_vec3::<f32>()?;
        let xs = x.to_vec3::<f32>()?;
        for (ti, &p) in positions.iter().enumerate() {
            for h in 0..2 {
                for i in 0..d / 2 {
                    let a = p as f32 * rope.inv_freq()[i];
                    let (x1, x2) = (xs[ti][h][i], xs[ti][h][i + d / 2]);
                    let e1 = x1 * a.cos() - x2 * a.sin();
                    let e2 = x2 * a.cos() + x1 * a.sin();
                    assert!((got[ti][h][i] - e1).abs() < 1e-5);
                    assert!((got[ti][h][i + d / 2] - e2).abs() < 1e-5);
                }
            }
        }
        Ok(())
    }

    /// Rotation composes: rotating by a then b equals rotating by a+b (what re-positioning uses).
    #[test]
    fn rotations_compose() -> Result<()> {
        let d = 16;
        let rope = Rope::new(&cfg(d));
        let x = Tensor::randn(0f32, 1.0, (4, 1, d), &Device::Cpu)?;
        let a = rope.tables(&[1, 2, 3, 4], &Device::Cpu, DType::F32)?;
        let b = rope.tables(&[10, 10, 10, 10], &Device::Cpu, DType::F32)?;
        let ab = rope.tables(&[11, 12, 13, 14], &Device::Cpu, DType::F32)?;
        let twice = b.apply(&a.apply(&x)?)?;
        let once = ab.apply(&x)?;
        let diff = (twice - once)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "diff {diff}");
        Ok(())
    }
}
