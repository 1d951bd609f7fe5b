//! SnapKV: the observation window's attention, pooled, mean over the GQA group.

use super::{Observation, PolicyError, ProbeNeeds, Regions, Shape, TokenPolicy};

/// How SnapKV smooths scores along the tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Average over a window of `kernel` tokens, zero-padded, divided by `kernel` (torch's
    /// `avg_pool1d` with `count_include_pad`; kvpress).
    Avg,
    /// Maximum over the window (SCOPE's runs).
    Max,
}

/// How SnapKV reduces the scores of a KV head's query heads (its GQA group) to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupReduce {
    /// The mean over the group (kvpress).
    Mean,
    /// The maximum over the group: a token one query head attends to strongly is kept even
    /// when the others ignore it (EpiCache reduces its scoring rows and group this way).
    Max,
}

/// Scores every token by the attention of the prompt's last `window` rows (causal inside the
/// window), averaged over those rows, smoothed by a `kernel`-wide pool, then reduced over the
/// KV head's query heads (`group`); the window itself is always kept. Defaults w = 64,
/// kernel 5, average pooling, mean over the group, as in kvpress's `SnapKVPress`
/// (`../shared/research/compression.md` §1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapKv {
    /// Observation window: the last rows observed (and always kept).
    pub window: usize,
    /// Pooling width (odd, at most 127; 1 disables smoothing). The pooling costs
    /// O(tokens × kernel) per query head and layer.
    pub kernel: usize,
    /// Pooling kind.
    pub pooling: Pooling,
    /// How the group's query heads are combined.
    pub group: GroupReduce,
}

impl Default for SnapKv {
    fn default() -> Self {
        Self {
            window: 64,
            kernel: 5,
            pooling: Pooling::Avg,
            group: GroupReduce::Mean,
        }
    }
}

impl TokenPolicy for SnapKv {
    fn name(&self) -> &str {
        "snapkv"
    }

    fn needs(&self) -> ProbeNeeds {
        ProbeNeeds {
            last_rows: self.window,
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
        let w = obs.window(self.name(), layer, shape, self.window)?;
        let (t, g) = (shape.tokens, shape.group);
        let scored = t - w.rows; // keys before the window; the window is kept
        Ok((0..shape.kv_heads)
            .map(|h| {
                let mut head = vec![0f32; t];
                for q in 0..g {
                    // the window's mean, pooled, then reduced over the group
                    let base = (h * g + q) * t;
                    let mean = &w.probs[base..base + scored];
                    for (x, p) in head.iter_mut().zip(pool(mean, self.kernel, self.pooling)) {
                        match self.group {
                            GroupReduce::Mean => *x += p / g as f32,
                            // probabilities are ≥ 0, so the zero start is the identity
                            GroupReduce::Max => *x = x.max(p),
                        }
                    }
                }
                head
            })
            .collect())
    }

    fn regions(&self, _shape: &Shape, _n: usize) -> Regions {
        Regions {
            recent: self.window.max(1),
            ..Regions::default()
        }
    }
}

/// The widest pooling a spec may ask for: SnapKV uses 5–7; a request's kernel of thousands
/// would cost thousands of times the default's work over a long prompt.
pub(crate) const MAX_KERNEL: usize = 127;

/// `kernel`-wide pooling with `kernel / 2` zero padding on each side, stride 1.
fn pool(x: &[f32], kernel: usize, how: Pooling) -> Vec<f32> {
    let half = kernel / 2;
    (0..x.len())
        .map(|i| {
            let window = &x[i.saturating_sub(half)..(i + half + 1).min(x.len())];
            match how {
                Pooling::Avg => window.iter().sum::<f32>() / kernel as f32,
                // zero padding only matters when every value is negative, which
                // probabilities never are
                Pooling::Max => window.iter().copied().fold(0.0, f32::max),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two query heads of one KV head: the mean halves a token only one of them attends to,
    /// the maximum keeps its full score.
    #[test]
    fn the_group_is_reduced_by_mean_or_max() {
        use crate::policy::{Observation, Shape, WindowMean};
        let shape = Shape {
            tokens: 4,
            kv_heads: 1,
            group: 2,
            layers: 1,
        };
        // a window of 1 row (the last token), per query head: probabilities over 4 tokens
        let obs = Observation {
            windows: vec![WindowMean {
                rows: 1,
                probs: vec![0.8, 0.0, 0.1, 0.1, 0.0, 0.6, 0.3, 0.1],
                max: None,
            }],
            column_sums: None,
        };
        let score = |group| {
            let p = SnapKv {
                window: 1,
                kernel: 1,
                pooling: Pooling::Max,
                group,
            };
            p.score(0, &obs, &shape).unwrap()
        };
        let mean = score(GroupReduce::Mean);
        let max = score(GroupReduce::Max);
        assert_eq!(mean[0][..3], [0.4, 0.3, 0.2]);
        assert_eq!(max[0][..3], [0.8, 0.6, 0.3]);
    }

    #[test]
    fn pooling_counts_padding() {
        let p = pool(&[5.0, 0.0, 0.0, 0.0, 10.0], 3, Pooling::Avg);
        assert_eq!(p, vec![5.0 / 3.0, 5.0 / 3.0, 0.0, 10.0 / 3.0, 10.0 / 3.0]);
        let m = pool(&[5.0, 0.0, 0.0, 0.0, 10.0], 3, Pooling::Max);
        assert_eq!(m, vec![5.0, 5.0, 0.0, 10.0, 10.0]);
        assert_eq!(pool(&[1.0, 2.0], 1, Pooling::Avg), vec![1.0, 2.0]);
    }
}
