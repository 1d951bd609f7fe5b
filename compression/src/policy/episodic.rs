//! EpiCache's cache scoring (`episodes.rs` builds the episodes): every cached entry scored by
//! the attention an episode's scoring prompt pays it, the prompt appended after the cache
//! for the observation and dropped after; the system prompt always kept.

use super::{Observation, PolicyError, ProbeNeeds, Regions, Shape, TokenPolicy};

/// Scores entries by the attention of the last `rows` observed rows (an episode's scoring
/// prompt), reduced over those rows by their mean or (`row_max`, the reference code's) their
/// maximum, then the maximum over the KV head's query heads; the first `sinks` entries (the
/// system prompt) are always kept. Either reduction is taken where the model runs: one vector
/// per query head and layer leaves the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Episodic {
    /// Rows of the scoring prompt.
    pub rows: usize,
    /// Leading entries always kept (the system prompt).
    pub sinks: usize,
    /// Reduce the prompt's rows by their maximum instead of their mean.
    pub row_max: bool,
}

impl TokenPolicy for Episodic {
    fn name(&self) -> &str {
        "epicache"
    }

    fn needs(&self) -> ProbeNeeds {
        ProbeNeeds {
            last_rows: self.rows,
            column_sums: false,
            row_max: self.row_max,
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
        let probs = match (self.row_max, &w.max) {
            (false, _) => &w.probs,
            (true, Some(max)) => max,
            (true, None) => {
                return Err(PolicyError::BadObservation {
                    policy: self.name().into(),
                    layer,
                    why: format!(
                        "no maximum attention of the scoring prompt's {} rows",
                        self.rows
                    ),
                });
            }
        };
        let (t, g) = (shape.tokens, shape.group);
        if probs.len() != shape.kv_heads * g * t {
            return Err(PolicyError::BadObservation {
                policy: self.name().into(),
                layer,
                why: format!(
                    "{} values for {} KV heads × {g} × {t} entries",
                    probs.len(),
                    shape.kv_heads
                ),
            });
        }
        Ok((0..shape.kv_heads)
            .map(|h| {
                (0..t)
                    .map(|k| {
                        (0..g)
                            .map(|q| probs[(h * g + q) * t + k])
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
            windows: vec![WindowMean {
                rows: 3,
                probs,
                max: None,
            }],
            column_sums: None,
        };
        let shape = Shape {
            tokens: 6,
            kv_heads: 1,
            group: 2,
            layers: 1,
        };
        let p = Episodic {
            rows: 3,
            sinks: 1,
            row_max: false,
        };
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
        // reduced by the maximum over the prompt's rows (the reference code's): the maxima
        // the observer kept, not the means
        let obs = Observation {
            windows: vec![WindowMean {
                rows: 3,
                probs: vec![0.0; 12],
                max: Some(vec![
                    0.2, 0.9, 0.0, 0.0, 0.0, 0.0, //
                    0.0, 0.0, 0.0, 0.5, 0.0, 0.3,
                ]),
            }],
            column_sums: None,
        };
        let pm = Episodic {
            row_max: true,
            ..p.clone()
        };
        assert!(pm.needs().row_max);
        assert_eq!(
            pm.score(0, &obs, &shape).unwrap(),
            vec![vec![0.2, 0.9, 0.0, 0.5, 0.0, 0.3]]
        );
        // without the maxima observed it refuses rather than score by the means
        let no_max = Observation {
            windows: vec![WindowMean {
                rows: 3,
                probs: vec![0.0; 12],
                max: None,
            }],
            column_sums: None,
        };
        assert!(pm.score(0, &no_max, &shape).is_err());
        // a window over the wrong number of entries is refused
        let bad = Shape { tokens: 5, ..shape };
        assert!(p.score(0, &Observation::default(), &bad).is_err());
    }
}
