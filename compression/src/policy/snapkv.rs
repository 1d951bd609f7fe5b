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

/// Scores every token by the attention of the prompt's last `window` rows (causal inside the
/// window), averaged over those rows, smoothed by a `kernel`-wide pool, then averaged over the
/// KV head's query heads; the window itself is always kept. Defaults w = 64, kernel 5, average
/// pooling, as in kvpress's `SnapKVPress` (`../shared/research/compression.md` §1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapKv {
    /// Observation window: the last rows observed (and always kept).
    pub window: usize,
    /// Pooling width (odd; 1 disables smoothing).
    pub kernel: usize,
    /// Pooling kind.
    pub pooling: Pooling,
}

impl Default for SnapKv {
    fn default() -> Self {
        Self {
            window: 64,
            kernel: 5,
            pooling: Pooling::Avg,
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
                    // the window's mean, pooled, then averaged over the group
                    let base = (h * g + q) * t;
                    let mean = &w.probs[base..base + scored];
                    for (x, p) in head.iter_mut().zip(pool(mean, self.kernel, self.pooling)) {
                        *x += p / g as f32;
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

    #[test]
    fn pooling_counts_padding() {
        let p = pool(&[5.0, 0.0, 0.0, 0.0, 10.0], 3, Pooling::Avg);
        assert_eq!(p, vec![5.0 / 3.0, 5.0 / 3.0, 0.0, 10.0 / 3.0, 10.0 / 3.0]);
        let m = pool(&[5.0, 0.0, 0.0, 0.0, 10.0], 3, Pooling::Max);
        assert_eq!(m, vec![5.0, 5.0, 0.0, 10.0, 10.0]);
        assert_eq!(pool(&[1.0, 2.0], 1, Pooling::Avg), vec![1.0, 2.0]);
    }
}
