//! What the real model and store cost, measured at start on the trace's corpus; a query's
//! TTFT in the modelled trace is computed from these.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use kvquilt_blend::{BlendRequest, Blender, Mode};
use kvquilt_kvstore::{SsdConfig, SsdTier, Tier};
use serde::Serialize;

use super::TraceBenchArgs;
use crate::bench::median;

/// What the real model and store cost, measured at start (seconds).
#[derive(Serialize, Clone)]
pub(super) struct Costs {
    /// Full prefill of an n-token prompt: `full_fixed_s + full_per_token_s · n`.
    pub(super) full_fixed_s: f64,
    pub(super) full_per_token_s: f64,
    /// A chunk prefilled alone (a miss): `chunk_fixed_s + chunk_per_token_s · n`.
    pub(super) chunk_fixed_s: f64,
    pub(super) chunk_per_token_s: f64,
    /// The default blend's TTFT with every chunk in the host tier, over full prefill's.
    pub(super) warm_blend_fraction: f64,
    /// The default blend's TTFT over full prefill's when a fraction `m` of the retrieved
    /// tokens are misses (computed in the blend's pass; their store-back comes after the
    /// first token): `blend_fixed + blend_per_missed · m` (fit at m = 0, ⅓, ⅔).
    pub(super) blend_fixed: f64,
    pub(super) blend_per_missed: f64,
    /// Real-size SSD reads (RocksDB, warm page cache), bytes per second.
    pub(super) ssd_bytes_per_s: f64,
    /// Real KV bytes per token of the model.
    pub(super) bytes_per_token: u64,
    /// The blend configuration timed.
    pub(super) blend: String,
}

impl Costs {
    pub(super) fn full_s(&self, n: usize) -> f64 {
        self.full_fixed_s + self.full_per_token_s * n as f64
    }

    pub(super) fn chunk_s(&self, n: usize) -> f64 {
        (self.chunk_fixed_s + self.chunk_per_token_s * n as f64).max(0.0)
    }

    /// The default blend's TTFT over full prefill's with a fraction `missed` of the retrieved
    /// tokens missing (before any SSD reads).
    pub(super) fn blend_fraction(&self, missed: f64) -> f64 {
        (self.blend_fixed + self.blend_per_missed * missed).max(0.0)
    }
}

/// Fits `y = a + b·x` by least squares.
fn affine(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), &(x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (mut sxx, mut sxy) = (0.0, 0.0);
    for &(x, y) in points {
        sxx += (x - mx) * (x - mx);
        sxy += (x - mx) * (y - my);
    }
    let b = if sxx > 0.0 { sxy / sxx } else { my / mx };
    (my - b * mx, b)
}

/// Times the real model and store on this corpus (see the module doc).
pub(super) fn measure(
    a: &TraceBenchArgs,
    blender: &Blender,
    rt: &tokio::runtime::Runtime,
    chunks: &[Vec<u32>],
    question: &[u32],
    blend: &super::Blend,
) -> Result<Costs> {
    let repeats = a.repeats.max(1);
    let codec = blender.codec(b"");
    // a chunk prefilled alone, at the corpus's lengths
    let mut chunk_points = Vec::new();
    for c in chunks.iter().step_by((chunks.len() / 12).max(1)).take(12) {
        let mut runs = Vec::new();
        for _ in 0..=repeats {
            runs.push(codec.prefill(blender.model(), c)?.1.as_secs_f64());
        }
        chunk_points.push((c.len() as f64, median(&runs[1..])));
    }
    let (chunk_fixed_s, chunk_per_token_s) = affine(&chunk_points);
    // full prefill at k/2, k and 3k/2 chunks; the default blend over stored chunks at k
    let time = |req: &BlendRequest| -> Result<f64> {
        let mut runs = Vec::new();
        for _ in 0..=repeats {
            let t = Instant::now();
            let out = blender.run(b"", req)?;
            let _first = out.logits.argmax(0)?.to_scalar::<u32>()?;
            blender.model().device().synchronize()?;
            runs.push(t.elapsed().as_secs_f64());
        }
        Ok(median(&runs[1..]))
    };
    let mut full_points = Vec::new();
    let mut fractions = Vec::new();
    let mut miss_points = Vec::new();
    for (i, n) in [a.k / 2, a.k, a.k + a.k / 2].into_iter().enumerate() {
        let picked: Vec<Vec<u32>> = chunks.iter().skip(i * 37).take(n.max(1)).cloned().collect();
        let req = BlendRequest::new(vec![], picked.clone(), question.to_vec(), Mode::Full);
        let full = time(&req)?;
        full_points.push((req.tokens().len() as f64, full));
        if n == a.k {
            for c in &picked {
                blender.precompute(b"", c)?;
            }
            let warm_req = BlendRequest {
                mode: Mode::Blend(blend.config.clone()),
                ..req
            };
            let warm = time(&warm_req)?;
            fractions.push(warm / full);
            miss_points.push((0.0, warm, warm_req.tokens().len()));
            // the first j chunks replaced by chunks never stored (taken from the corpus's
            // end), and nothing stored back, so every run misses them alike
            for j in [n.div_ceil(3), (2 * n).div_ceil(3)] {
                let mut mixed = picked.clone();
                for (slot, fresh) in mixed.iter_mut().zip(chunks.iter().rev()).take(j) {
                    *slot = fresh.clone();
                }
                let missed: usize = mixed.iter().take(j).map(Vec::len).sum();
                let retrieved: usize = mixed.iter().map(Vec::len).sum();
                let req = BlendRequest {
                    store_back: false,
                    ..BlendRequest::new(
                        vec![],
                        mixed,
                        question.to_vec(),
                        Mode::Blend(blend.config.clone()),
                    )
                };
                let m = missed as f64 / retrieved as f64;
                miss_points.push((m, time(&req)?, req.tokens().len()));
            }
        }
    }
    let (full_fixed_s, full_per_token_s) = affine(&full_points);
    // each blend over full prefill's fitted time at its own length
    let miss_points: Vec<(f64, f64)> = miss_points
        .into_iter()
        .map(|(m, t, n)| (m, t / (full_fixed_s + full_per_token_s * n as f64)))
        .collect();
    let (blend_fixed, blend_per_missed) = affine(&miss_points);
    // real-size objects read back from an SSD tier
    let dir = tempfile::tempdir()?;
    let ssd = SsdTier::open(SsdConfig::new(dir.path(), u64::MAX), Default::default())?;
    let mut keys = Vec::new();
    for c in chunks.iter().take(8) {
        let (obj, _) = codec.encode(blender.model(), c)?;
        keys.push((*obj.key(), obj.raw_len()));
        rt.block_on(ssd.put(Arc::new(obj), 0.0))?;
    }
    rt.block_on(ssd.flush())?;
    let mut rates = Vec::new();
    for _ in 0..=repeats {
        let t = Instant::now();
        let mut bytes = 0;
        for (k, len) in &keys {
            rt.block_on(ssd.get(k))?.context("an SSD object vanished")?;
            bytes += len;
        }
        rates.push(bytes as f64 / t.elapsed().as_secs_f64());
    }
    let bytes_per_token = codec.layout().object_bytes(1);
    Ok(Costs {
        full_fixed_s,
        full_per_token_s,
        chunk_fixed_s,
        chunk_per_token_s,
        warm_blend_fraction: median(&fractions),
        blend_fixed,
        blend_per_missed,
        ssd_bytes_per_s: median(&rates[1..]),
        bytes_per_token,
        blend: blend.label.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affine_fit_recovers_a_line() {
        let (a, b) = affine(&[(1.0, 3.0), (2.0, 5.0), (4.0, 9.0)]);
        assert!((a - 1.0).abs() < 1e-9 && (b - 2.0).abs() < 1e-9, "{a} {b}");
    }
}
