//! What the real model and store cost, measured at start on the trace's corpus; a query's
//! TTFT in the modelled trace is computed from these.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use kvquilt_blend::{BlendRequest, Blender, Mode, prefill_work};
use kvquilt_kvstore::{KvLayout, SsdConfig, SsdTier, Tier};
use serde::Serialize;

use super::TraceBenchArgs;
use crate::bench::median;

/// What the real model and store cost, measured at start (seconds).
#[derive(Serialize, Clone)]
pub(super) struct Costs {
    /// κ, the model's attention work per query–key pair in tokens' weight products (the
    /// blender's, from the model's shape): an n-token prefill is `w(n) = n + κ·n(n+1)/2`
    /// units of work, and the prefill times below are affine in it, as the blender's own
    /// cost model fits them (affine in tokens, a fit over 2.6k–7.8k-token prompts
    /// over-states the middle one's full prefill by ~8% on the CPU: BENCHMARKS.md §10).
    pub(super) pair_work: f64,
    /// Full prefill of an n-token prompt: `full_fixed_s + full_per_work_s · w(n)`.
    pub(super) full_fixed_s: f64,
    pub(super) full_per_work_s: f64,
    /// A chunk prefilled alone (a miss): `chunk_fixed_s + chunk_per_work_s · w(n)`.
    pub(super) chunk_fixed_s: f64,
    pub(super) chunk_per_work_s: f64,
    /// The default blend over a host tier of each `--host-codecs` codec, in that order.
    pub(super) blends: Vec<BlendCost>,
    /// Real-size SSD reads (RocksDB, warm page cache), bytes per second.
    pub(super) ssd_bytes_per_s: f64,
    /// The model's KV layout (what a stored chunk holds).
    pub(super) layout: KvLayout,
    /// The blend configuration timed.
    pub(super) blend: String,
}

/// The default blend's cost over a host tier holding its chunks in one codec (a hit's
/// decode included: on the CPU the store decodes it, on a GPU the device does).
#[derive(Serialize, Clone)]
pub(super) struct BlendCost {
    /// The host tier's codec (`raw`: held decoded).
    pub(super) host_codec: String,
    /// TTFT with every chunk a host hit, over full prefill's.
    pub(super) warm_fraction: f64,
    /// TTFT over full prefill's when a fraction `m` of the retrieved tokens are misses
    /// (computed in the blend's pass; their store-back comes after the first token):
    /// `fixed + per_missed · m`, fit at m = 0, ⅓, ⅔ with one slope for every codec (a miss
    /// is computed alike whatever the codec of the hits; the codec moves the intercept).
    pub(super) fixed: f64,
    pub(super) per_missed: f64,
}

impl BlendCost {
    /// TTFT over full prefill's with a fraction `missed` of the retrieved tokens missing
    /// (before any SSD reads).
    pub(super) fn fraction(&self, missed: f64) -> f64 {
        (self.fixed + self.per_missed * missed).max(0.0)
    }
}

impl Costs {
    /// Real KV bytes per token of the model (raw).
    pub(super) fn bytes_per_token(&self) -> u64 {
        self.layout.object_bytes(1)
    }

    /// Units of work of an n-token prefill from an empty cache.
    pub(super) fn work(&self, n: usize) -> f64 {
        prefill_work(self.pair_work, 0, n)
    }

    pub(super) fn full_s(&self, n: usize) -> f64 {
        self.full_fixed_s + self.full_per_work_s * self.work(n)
    }

    pub(super) fn chunk_s(&self, n: usize) -> f64 {
        (self.chunk_fixed_s + self.chunk_per_work_s * self.work(n)).max(0.0)
    }
}

/// Fits prefill seconds as `a + b·w(n)` over (tokens, seconds) points, `w` the work of an
/// n-token prefill for a model of κ = `pair_work` ([`Costs::pair_work`]).
fn prefill_fit(pair_work: f64, points: &[(usize, f64)]) -> (f64, f64) {
    let by_work: Vec<(f64, f64)> = points
        .iter()
        .map(|&(n, s)| (prefill_work(pair_work, 0, n), s))
        .collect();
    affine(&by_work)
}

/// Fits `y = a + b·x` by least squares.
fn affine(points: &[(f64, f64)]) -> (f64, f64) {
    let (a, b) = affine_shared_slope(&[points.to_vec()]);
    (a[0], b)
}

/// Fits `y = a_g + b·x` over groups of points: one slope, an intercept per group (least
/// squares on the deviations from each group's means). One group: [`affine`]. With no
/// spread in x the slope is the means' ratio (a line through the origin).
fn affine_shared_slope(groups: &[Vec<(f64, f64)>]) -> (Vec<f64>, f64) {
    let means: Vec<(f64, f64)> = groups
        .iter()
        .map(|g| {
            let n = g.len().max(1) as f64;
            let (sx, sy) = g.iter().fold((0.0, 0.0), |(a, b), &(x, y)| (a + x, b + y));
            (sx / n, sy / n)
        })
        .collect();
    let (mut sxx, mut sxy) = (0.0, 0.0);
    for (g, &(mx, my)) in groups.iter().zip(&means) {
        for &(x, y) in g {
            sxx += (x - mx) * (x - mx);
            sxy += (x - mx) * (y - my);
        }
    }
    let b = if sxx > 0.0 {
        sxy / sxx
    } else {
        let (mx, my) = means
            .iter()
            .fold((0.0, 0.0), |(a, b), &(x, y)| (a + x, b + y));
        my / mx
    };
    (means.iter().map(|&(mx, my)| my - b * mx).collect(), b)
}

/// Times the real model and store on this corpus (see the module doc): full prefill and a
/// chunk's prefill on `blender`, the default blend on each of `hosts` (a blender over a host
/// tier of one codec, named beside it).
pub(super) fn measure(
    a: &TraceBenchArgs,
    blender: &Blender,
    hosts: &[(String, Blender)],
    rt: &tokio::runtime::Runtime,
    chunks: &[Vec<u32>],
    question: &[u32],
    blend: &super::Blend,
) -> Result<Costs> {
    let repeats = a.repeats.max(1);
    let codec = blender.codec(b"");
    let pair_work = blender.costs().pair_work();
    // a chunk prefilled alone, at the corpus's lengths
    let mut chunk_points = Vec::new();
    for c in chunks.iter().step_by((chunks.len() / 12).max(1)).take(12) {
        let mut runs = Vec::new();
        for _ in 0..=repeats {
            runs.push(codec.prefill(blender.model(), c)?.1.as_secs_f64());
        }
        chunk_points.push((c.len(), median(&runs[1..])));
    }
    let (chunk_fixed_s, chunk_per_work_s) = prefill_fit(pair_work, &chunk_points);
    // full prefill at k/2, k and 3k/2 chunks; the default blend over stored chunks at k
    let once = |blender: &Blender, req: &BlendRequest| -> Result<f64> {
        let t = Instant::now();
        let out = blender.run(b"", req)?;
        let _first = out.logits.argmax(0)?.to_scalar::<u32>()?;
        blender.model().device().synchronize()?;
        Ok(t.elapsed().as_secs_f64())
    };
    let mut full_points = Vec::new();
    // per host codec: the warm blend over full prefill measured beside it, and (miss
    // fraction, seconds, prompt tokens) of each blend
    let mut warm = vec![0.0; hosts.len()];
    let mut miss_points = vec![Vec::new(); hosts.len()];
    for (i, n) in [a.k / 2, a.k, a.k + a.k / 2].into_iter().enumerate() {
        let picked: Vec<Vec<u32>> = chunks.iter().skip(i * 37).take(n.max(1)).cloned().collect();
        let req = BlendRequest::new(vec![], picked.clone(), question.to_vec(), Mode::Full);
        let runs = (0..=repeats)
            .map(|_| once(blender, &req))
            .collect::<Result<Vec<_>>>()?;
        let full = median(&runs[1..]);
        full_points.push((req.tokens().len(), full));
        // the blends at k chunks (the middle size: with k = 1 the sizes are 0, 1, 1)
        if i != 1 {
            continue;
        }
        for (_, host) in hosts {
            for c in &picked {
                host.precompute(b"", c)?;
            }
        }
        // every chunk stored, then the first j chunks replaced by chunks never stored
        // (taken from the corpus's end) and nothing stored back, so every run misses them
        let mut blends = vec![(
            0.0,
            BlendRequest {
                mode: Mode::Blend(blend.config.clone()),
                ..req
            },
        )];
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
            blends.push((missed as f64 / retrieved as f64, req));
        }
        for (m, req) in &blends {
            // the host tiers' runs interleaved, so that this machine's drift over the
            // measurement lands on every codec alike (the first round warms up)
            let mut runs = vec![Vec::new(); hosts.len()];
            for _ in 0..=repeats {
                for (h, (_, host)) in hosts.iter().enumerate() {
                    runs[h].push(once(host, req)?);
                }
            }
            for (h, runs) in runs.iter().enumerate() {
                let t = median(&runs[1..]);
                if *m == 0.0 {
                    warm[h] = t / full;
                }
                miss_points[h].push((*m, t, req.tokens().len()));
            }
        }
    }
    let (full_fixed_s, full_per_work_s) = prefill_fit(pair_work, &full_points);
    // each blend over full prefill's fitted time at its own length
    let groups: Vec<Vec<(f64, f64)>> = miss_points
        .into_iter()
        .map(|points| {
            points
                .into_iter()
                .map(|(m, t, n)| {
                    let full = full_fixed_s + full_per_work_s * prefill_work(pair_work, 0, n);
                    (m, t / full)
                })
                .collect()
        })
        .collect();
    let (intercepts, per_missed) = affine_shared_slope(&groups);
    let blends = hosts
        .iter()
        .zip(warm)
        .zip(intercepts)
        .map(|(((name, _), warm_fraction), fixed)| BlendCost {
            host_codec: name.clone(),
            warm_fraction,
            fixed,
            per_missed,
        })
        .collect();
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
    Ok(Costs {
        pair_work,
        full_fixed_s,
        full_per_work_s,
        chunk_fixed_s,
        chunk_per_work_s,
        blends,
        ssd_bytes_per_s: median(&rates[1..]),
        layout: *codec.layout(),
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

    #[test]
    fn full_prefill_fit_over_work_predicts_the_middle_prompt() {
        // prefills whose attention grows with the square (κ of the trace's CPU fit, §10),
        // timed at the modelled trace's three lengths of 512-token-chunk prompts
        let (kappa, a, b) = (3.9e-4, 0.05, 6.5e-4 / 2.0);
        let secs = |n: usize| a + b * prefill_work(kappa, 0, n);
        let points: Vec<(usize, f64)> = [2_600, 5_200, 7_800].map(|n| (n, secs(n))).to_vec();
        let (fa, fb) = prefill_fit(kappa, &points);
        assert!((fa - a).abs() < 1e-9 && (fb - b).abs() < 1e-12, "{fa} {fb}");
        // affine in tokens, the same points over-state the middle prompt's prefill by ~8%:
        // the modelled trace read every blend that much cheaper against full prefill
        let (ta, tb) = prefill_fit(0.0, &points);
        let over = (ta + tb * 5_200.0) / secs(5_200);
        assert!(over > 1.05, "{over}");
    }

    #[test]
    fn a_shared_slope_keeps_each_groups_intercept() {
        let line = |a: f64, b: f64| vec![(0.0, a), (0.3, a + 0.3 * b), (0.7, a + 0.7 * b)];
        let (a, b) = affine_shared_slope(&[line(0.4, 0.5), line(0.45, 0.5)]);
        assert!((b - 0.5).abs() < 1e-9, "{b}");
        assert!(
            (a[0] - 0.4).abs() < 1e-9 && (a[1] - 0.45).abs() < 1e-9,
            "{a:?}"
        );
        // slopes 0.4 and 0.6: the shared one between them, one group alone is `affine`'s
        let (_, b) = affine_shared_slope(&[line(0.4, 0.4), line(0.4, 0.6)]);
        assert!((b - 0.5).abs() < 1e-9, "{b}");
        let one = line(0.2, 0.9);
        let (a, b) = affine_shared_slope(std::slice::from_ref(&one));
        let (a1, b1) = affine(&one);
        assert!((a[0] - a1).abs() < 1e-9 && (b - b1).abs() < 1e-9);
    }
}
