//! APE's attention correction for a context encoded in parallel (Yang et al., ICLR 2025,
//! "Adaptive Parallel Encoding"; the reference code `ape/ape_llama.py`).
//!
//! Chunks prefilled alone and placed side by side attend as if each were the whole context:
//! a query after them sees a flatter distribution over their keys, and too much of its mass
//! goes to them. APE corrects the attention of the queries *after* the context over the
//! context's keys with a temperature `T` and a scale `S`: within the context, logits `x`
//! (`q·k/√d`) become `x / T`; the context's share of the softmax is `exp(S·T·LSE(x / T))`
//! against the other keys' `exp(LSE(y))`. In one softmax over every key that is the logit
//! `x / T + (S·T − 1)·LSE(x / T)` for each context key and `y` unchanged elsewhere, which is
//! how [`ParallelContext::adjust`] applies it. `T = S = 1` is exact attention.
//!
//! Queries inside the context (blend's recomputed rows) attend exactly; so do keys outside it
//! (the prefix before it, the suffix and decoded tokens after it). A context may limit the
//! correction to a band of layers ([`ParallelContext::with_layers`]); the other layers attend
//! exactly.

use std::ops::Range;

use candle_core::{D, DType, Tensor};

use crate::error::{Result, invalid_input};

/// A context encoded in parallel and APE's correction of the attention paid to it
/// (the module docs). Held by a [`crate::KvCache`], so every later call over the cache
/// (the rest of a prefill, each decode step) applies it.
#[derive(Debug, Clone, PartialEq)]
pub struct ParallelContext {
    positions: Range<u32>,
    temperature: f32,
    scale: f32,
    /// Layers corrected; `None`: every layer.
    layers: Option<Range<usize>>,
}

impl ParallelContext {
    /// The largest temperature or scale accepted: past any setting the paper tunes (≤ 1),
    /// small enough that `S·T·LSE` stays finite in bf16.
    pub const MAX_FACTOR: f32 = 4.0;

    /// The context at absolute `positions` (not empty), corrected by `temperature` and
    /// `scale` (each finite, in `(0, MAX_FACTOR]`, [`Self::MAX_FACTOR`]).
    pub fn new(positions: Range<u32>, temperature: f32, scale: f32) -> Result<Self> {
        if positions.is_empty() {
            return Err(invalid_input(format!(
                "parallel context at positions {positions:?}: empty"
            )));
        }
        Self::check_factors(temperature, scale)?;
        Ok(Self {
            positions,
            temperature,
            scale,
            layers: None,
        })
    }

    /// The same correction in `layers` only (not empty); the model's other layers attend
    /// exactly. Layers past the model's last are never run, so they correct nothing.
    pub fn with_layers(self, layers: Range<usize>) -> Result<Self> {
        if layers.is_empty() {
            return Err(invalid_input(format!(
                "parallel context corrected in layers {layers:?}: empty"
            )));
        }
        Ok(Self {
            layers: Some(layers),
            ..self
        })
    }

    /// The layers corrected, `None` for every layer.
    pub fn layers(&self) -> Option<Range<usize>> {
        self.layers.clone()
    }

    /// Whether layer `l`'s attention is corrected.
    pub fn corrects_layer(&self, l: usize) -> bool {
        self.layers.as_ref().is_none_or(|r| r.contains(&l))
    }

    /// Checks a temperature and a scale as [`ParallelContext::new`] does.
    pub fn check_factors(temperature: f32, scale: f32) -> Result<()> {
        for (name, v) in [("temperature", temperature), ("scale", scale)] {
            if !(v.is_finite() && v > 0.0 && v <= Self::MAX_FACTOR) {
                return Err(invalid_input(format!(
                    "parallel context {name} {v}: must be in (0, {}]",
                    Self::MAX_FACTOR
                )));
            }
        }
        Ok(())
    }

    /// The context's absolute positions.
    pub fn positions(&self) -> Range<u32> {
        self.positions.clone()
    }

    /// APE's `T`.
    pub fn temperature(&self) -> f32 {
        self.temperature
    }

    /// APE's `S`.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Whether the correction keeps the context's share of the softmax (`S·T = 1` to f32
    /// rounding): then it is a temperature on the context keys' logits alone, which every
    /// attention implementation applies to those keys scaled by `1 / T`.
    pub fn keeps_mass(&self) -> bool {
        (f64::from(self.scale) * f64::from(self.temperature) - 1.0).abs() <= 1e-6
    }

    /// Whether a query at `q_pos` is corrected (it comes after the whole context).
    pub(crate) fn corrects(&self, q_pos: u32) -> bool {
        q_pos >= self.positions.end
    }

    /// Indices of the context's keys among keys at `k_pos` (strictly increasing): one
    /// contiguous range.
    pub(crate) fn key_range(&self, k_pos: &[u32]) -> Range<usize> {
        let start = k_pos.partition_point(|&p| p < self.positions.start);
        let end = k_pos.partition_point(|&p| p < self.positions.end);
        start..end
    }

    /// Corrected logits, in f32 whatever the scores' dtype (shifted logits in bf16 would lose
    /// the differences between keys): `scores` `[.., rows, keys]` with the context's keys at
    /// columns `keys` (every one of them visible to every row, so no `-inf` among them).
    pub(crate) fn adjust(&self, scores: &Tensor, keys: Range<usize>) -> Result<Tensor> {
        let scores = scores.to_dtype(DType::F32)?;
        if keys.is_empty() {
            return Ok(scores);
        }
        let t = scores.dim(D::Minus1)?;
        let x = (scores.narrow(D::Minus1, keys.start, keys.len())? / f64::from(self.temperature))?;
        let max = x.max_keepdim(D::Minus1)?;
        let lse = (x
            .broadcast_sub(&max)?
            .exp()?
            .sum_keepdim(D::Minus1)?
            .log()?
            + &max)?;
        let shift = (lse * f64::from(self.scale * self.temperature - 1.0))?;
        let z = x.broadcast_add(&shift)?;
        let mut parts = Vec::with_capacity(3);
        if keys.start > 0 {
            parts.push(scores.narrow(D::Minus1, 0, keys.start)?);
        }
        parts.push(z);
        if keys.end < t {
            parts.push(scores.narrow(D::Minus1, keys.end, t - keys.end)?);
        }
        Ok(Tensor::cat(&parts, D::Minus1)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn bad_settings_are_refused_by_name() {
        assert!(ParallelContext::new(3..3, 0.9, 0.9).is_err());
        for (t, s) in [(0.0, 1.0), (1.0, -1.0), (f32::NAN, 1.0), (1.0, 5.0)] {
            let e = ParallelContext::new(1..9, t, s).unwrap_err().to_string();
            assert!(e.contains("temperature") || e.contains("scale"), "{e}");
        }
        assert!(ParallelContext::new(1..9, 0.9, 0.9).is_ok());
    }

    #[test]
    fn context_keys_and_corrected_queries_follow_positions() {
        let p = ParallelContext::new(4..10, 0.9, 0.9).unwrap();
        assert_eq!(p.key_range(&[0, 1, 4, 5, 9, 10, 11]), 2..5);
        assert_eq!(p.key_range(&[0, 1, 2]), 3..3);
        assert!(!p.corrects(9) && p.corrects(10));
        assert!(p.corrects_layer(0) && p.corrects_layer(1000));
        let banded = p.with_layers(3..5).unwrap();
        assert!(!banded.corrects_layer(2) && banded.corrects_layer(3));
        assert!(banded.corrects_layer(4) && !banded.corrects_layer(5));
        assert!(banded.with_layers(2..2).is_err());
    }

    /// The corrected softmax gives the context `exp(S·T·LSE(x/T))` of the mass against
    /// `exp(LSE(y))` for the rest, and within the context `softmax(x/T)`: computed here by
    /// hand in f64 from the two parts, as APE's reference code combines them.
    #[test]
    fn adjusted_logits_split_mass_as_ape_combines_two_attentions() {
        let row = [0.3f32, -1.2, 2.0, 0.7, 1.1, -0.4];
        let (t, s) = (0.7f32, 0.8f32);
        let keys = 1..4;
        let p = ParallelContext::new(0..1, t, s).unwrap();
        let scores = Tensor::new(&row[..], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let z = p.adjust(&scores, keys.clone()).unwrap();
        let got = candle_nn::ops::softmax_last_dim(&z)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let lse = |xs: &[f64]| xs.iter().map(|x| x.exp()).sum::<f64>().ln();
        let ctx: Vec<f64> = row[keys.clone()]
            .iter()
            .map(|&x| x as f64 / t as f64)
            .collect();
        let other: Vec<f64> = row
            .iter()
            .enumerate()
            .filter(|(i, _)| !keys.contains(i))
            .map(|(_, &y)| y as f64)
            .collect();
        let (l_ctx, l_other) = ((s * t) as f64 * lse(&ctx), lse(&other));
        let w_ctx = 1.0 / (1.0 + (l_other - l_ctx).exp());
        for (i, &g) in got.iter().enumerate() {
            let want = if keys.contains(&i) {
                w_ctx * (row[i] as f64 / t as f64 - lse(&ctx)).exp()
            } else {
                (1.0 - w_ctx) * (row[i] as f64 - lse(&other)).exp()
            };
            assert!((g as f64 - want).abs() < 1e-6, "key {i}: {g} vs {want}");
        }
    }

    /// bf16 scores come back as f32 logits, the shift computed from them as f32 would.
    #[test]
    fn bf16_scores_are_adjusted_in_f32() {
        let p = ParallelContext::new(0..1, 0.5, 3.0).unwrap();
        let row = Tensor::new(&[[7.5f32, 9.0, 8.25, -1.0, 12.0]], &Device::Cpu).unwrap();
        let bf = row.to_dtype(DType::BF16).unwrap();
        let got = p.adjust(&bf, 1..4).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let want = p.adjust(&bf.to_dtype(DType::F32).unwrap(), 1..4).unwrap();
        let d = (got - want).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn unit_temperature_and_scale_leave_logits_as_they_are() {
        let p = ParallelContext::new(0..1, 1.0, 1.0).unwrap();
        let scores = Tensor::new(&[[0.5f32, -2.0, 1.5, 3.0]], &Device::Cpu).unwrap();
        let z = p.adjust(&scores, 0..3).unwrap();
        let d = (z - &scores).unwrap().abs().unwrap().max_all().unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-6);
    }
}
