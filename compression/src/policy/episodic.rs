//! EpiCache's cache scoring (`episodes.rs` builds the episodes): every cached entry scored by
//! the attention an episode's scoring prompt pays it, the prompt appended after the cache
//! for the observation and dropped after; the system prompt always kept.

use super::{Observation, PolicyError, ProbeNeeds, Regions, Shape, TokenPolicy};

/// Scores entries by the attention of the last `rows` observed rows (an episode's scoring
/// prompt), averaged over those rows, then the maximum over the KV head's query heads; the
/// first `sinks` entries (the system prompt) are always kept. The reference code takes the
/// maximum over the prompt's rows too; kvquilt's observer reduces rows by their mean (one
/// vector per head per layer leaves the device), a documented deviation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Episodic {
    /// Rows of the scoring prompt.
    pub rows: usize,
    /// Leading entries always kept (the system prompt).
    pub sinks: usize,
}

impl TokenPolicy for Episodic {
    fn name(&self) -> &str {
        "epicache"
    }

    fn needs(&self) -> ProbeNeeds {
        ProbeNeeds {
            last_rows: self.rows,
            column_sums: false,
        }
    }

    fn score(
        &self,
        layer: usize,
        obs: &Observation,
        shape: &Shape,
    ) -> Result<Vec<Vec<f32>>, PolicyError> {
        // the rows are the scoring prompt's, observed over the cache alone: the caller hands
        // a window over exactly the cache's entries
        let w = obs
            .windows
            .iter()
            .find(|w| w.rows == self.rows)
            .ok_or_else(|| PolicyError::BadObservation {
                policy: self.name().into(),
                layer,
                why: format!(
                    "no mean attention of the scoring prompt's {} rows",
                    self.rows
                ),
            })?;
        let (t, g) = (shape.tokens, shape.group);
        if w.probs.len() != shape.kv_heads * g * t {
            return Err(PolicyError::BadObservation {
                policy: self.name().into(),
                layer,
                why: format!(
                    "{} values for {} KV heads × {g} × {t} entries",
                    w.probs.len(),
                    shape.kv_heads
                ),
            });
        }
        Ok((0..shape.kv_heads)
            .map(|h| {
                (0..t)
                    .map(|k| {
                        (0..g)
                            .map(|q| w.probs[(h * g + q) * t + k])
                            .fold(0.0, f32::max)
                    })
                    .collect()
            })
            .collect())
    }

    fn regions(&self, _shape: &Shape, _n: usize) -> Regions {
        Regions {
            sinks: self.sinks,
            ..Regions::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Budget, BudgetSplit, WindowMean, select};

    #[test]
    fn the_most_attended_entries_of_any_query_head_are_kept_with_the_sinks() {
        // 1 KV head, group 2, 6 entries; head 0 looks at entry 4, head 1 at entry 2
        let probs = vec![
            0.1, 0.0, 0.0, 0.0, 0.8, 0.1, //
            0.1, 0.0, 0.7, 0.1, 0.0, 0.1,
        ];
        let obs = Observation {
            windows: vec![WindowMean { rows: 3, probs }],
            column_sums: None,
        };
        let shape = Shape {
            tokens: 6,
            kv_heads: 1,
            group: 2,
            layers: 1,
        };
        let p = Episodic { rows: 3, sinks: 1 };
        let scores = p.score(0, &obs, &shape).unwrap();
        assert_eq!(scores, vec![vec![0.1, 0.0, 0.7, 0.1, 0.8, 0.1]]);
        let keep = select(
            &p,
            &[obs],
            &shape,
            Budget::Entries(3),
            &BudgetSplit::Uniform,
        )
        .unwrap();
        assert_eq!(
            keep.layers,
            vec![vec![vec![0, 2, 4]]],
            "sink, then the two maxima"
        );
        // a window over the wrong number of entries is refused
        let bad = Shape { tokens: 5, ..shape };
        assert!(p.score(0, &Observation::default(), &bad).is_err());
    }
}
