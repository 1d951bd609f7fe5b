//! H2O: heavy hitters by accumulated attention, plus the most recent tokens.

use super::{Observation, PolicyError, ProbeNeeds, Regions, Shape, TokenPolicy};

/// Scores each token by the attention it received from every query of the prompt, summed
/// over the KV head's group and divided by how many queries can see it (`T − t`, kvpress's
/// normalisation; without it early tokens win by seeing more queries); keeps the top of those
/// plus the most recent `recent_fraction · n` tokens (H2O's heavy:recent split, 1:1 by
/// default — tagged unverified in `../shared/research/compression.md`).
#[derive(Debug, Clone, PartialEq)]
pub struct H2o {
    /// Fraction of the budget given to the most recent tokens (0..1).
    pub recent_fraction: f32,
    /// Divide each token's sum by the number of queries that see it.
    pub normalise: bool,
}

impl Default for H2o {
    fn default() -> Self {
        Self {
            recent_fraction: 0.5,
            normalise: true,
        }
    }
}

impl TokenPolicy for H2o {
    fn name(&self) -> &str {
        "h2o"
    }

    fn needs(&self) -> ProbeNeeds {
        ProbeNeeds {
            last_rows: 0,
            column_sums: true,
            row_max: false,
        }
    }

    fn score(
        &self,
        layer: usize,
        obs: &Observation,
        shape: &Shape,
    ) -> Result<Vec<Vec<f32>>, PolicyError> {
        let sums = obs.column_sums(self.name(), layer, shape)?;
        let t = shape.tokens;
        if t == 0 {
            return Ok(vec![Vec::new(); shape.kv_heads]);
        }
        Ok(sums
            .chunks(t)
            .map(|head| {
                head.iter()
                    .enumerate()
                    .map(|(j, &s)| {
                        if self.normalise {
                            s / (t - j) as f32
                        } else {
                            s
                        }
                    })
                    .collect()
            })
            .collect())
    }

    fn regions(&self, _shape: &Shape, n: usize) -> Regions {
        Regions {
            recent: ((n as f32 * self.recent_fraction).floor() as usize).max(1),
            ..Regions::default()
        }
    }
}
