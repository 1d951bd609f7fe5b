//! StreamingLLM: attention sinks plus the most recent tokens.

use super::{KeptPositions, Observation, PolicyError, ProbeNeeds, Regions, Shape, TokenPolicy};

/// Keeps the first `sinks` tokens and the most recent `n − sinks` (Xiao et al., StreamingLLM;
/// 4 sinks as in the paper and kvpress). Observes nothing. The kept entries stay at their
/// prompt positions (kvpress) or are renumbered in cache order (the paper's positions within
/// the cache, `positions=compact`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamingLlm {
    /// Attention sinks kept at the start.
    pub sinks: usize,
    /// Where the kept entries sit.
    pub positions: KeptPositions,
}

impl StreamingLlm {
    /// `sinks` sinks, entries at their prompt positions.
    pub fn with_sinks(sinks: usize) -> Self {
        Self {
            sinks,
            positions: KeptPositions::Original,
        }
    }
}

impl Default for StreamingLlm {
    fn default() -> Self {
        Self::with_sinks(4)
    }
}

impl TokenPolicy for StreamingLlm {
    fn name(&self) -> &str {
        "streaming"
    }

    fn needs(&self) -> ProbeNeeds {
        ProbeNeeds::default()
    }

    /// Recency: later tokens score higher.
    fn score(
        &self,
        _layer: usize,
        _obs: &Observation,
        shape: &Shape,
    ) -> Result<Vec<Vec<f32>>, PolicyError> {
        let recency: Vec<f32> = (0..shape.tokens).map(|t| t as f32).collect();
        Ok(vec![recency; shape.kv_heads])
    }

    fn regions(&self, _shape: &Shape, _n: usize) -> Regions {
        Regions {
            sinks: self.sinks,
            ..Regions::default()
        }
    }

    fn positions(&self) -> KeptPositions {
        self.positions
    }
}
