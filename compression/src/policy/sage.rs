//! SAGE-KV: a one-time top-k per KV head by the last prompt token's attention.

use super::{Observation, PolicyError, ProbeNeeds, Regions, Shape, TokenPolicy};

/// After the prompt's forward pass, each layer and KV head keeps its `sinks` first tokens, the
/// `recent` last ones (the last prompt token among them), and the top-k of the rest by the
/// last prompt token's attention (mean over the KV head's query heads); k fills the budget.
/// Scores are taken once and never revisited. Defaults s = 4, w = 64 are the suggested ones
/// in `../shared/research/compression.md` §1 (tagged unverified: no reference code was found);
/// the mean over the GQA group is likewise an assumption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SageKv {
    /// Attention sinks kept at the start.
    pub sinks: usize,
    /// Recent tokens kept at the end (the last prompt token included).
    pub recent: usize,
}

impl Default for SageKv {
    fn default() -> Self {
        Self {
            sinks: 4,
            recent: 64,
        }
    }
}

impl TokenPolicy for SageKv {
    fn name(&self) -> &str {
        "sage"
    }

    fn needs(&self) -> ProbeNeeds {
        ProbeNeeds {
            last_rows: 1,
            column_sums: false,
            row_max: false,
        }
    }

    fn score(
        &self,
        layer: usize,
        obs: &Observation,
        shape: &Shape,
    ) -> Result<Vec<Vec<f32>>, PolicyError> {
        let w = obs.window(self.name(), layer, shape, 1)?;
        let (t, g) = (shape.tokens, shape.group);
        Ok((0..shape.kv_heads)
            .map(|h| {
                let mut s = vec![0f32; t];
                for q in 0..g {
                    let base = (h * g + q) * t;
                    for (x, p) in s.iter_mut().zip(&w.probs[base..base + t]) {
                        *x += p / g as f32;
                    }
                }
                s
            })
            .collect())
    }

    fn regions(&self, _shape: &Shape, _n: usize) -> Regions {
        Regions {
            sinks: self.sinks,
            recent: self.recent.max(1),
            ..Regions::default()
        }
    }
}
