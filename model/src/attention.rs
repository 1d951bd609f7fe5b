//! Grouped-query attention over an explicit KV cache with the exact causal mask by position.
//!
//! Queries are processed in blocks so that the score matrix of a block
//! (`num_heads × block × keys`) stays within a fixed element budget whatever the sequence
//! length. Because key positions are strictly increasing, a block whose largest query
//! position is `p` only needs the keys up to the last one at a position `<= p`; the mask is
//! needed only for keys past the block's smallest query position. A block also spans at most
//! `block` positions, so sparse queries (blend's selected tokens) waste no more masked
//! scores per query than contiguous ones: at most `block` keys past a query's own position. The plan (blocks, key
//! ranges, masks) depends on positions alone, so it is built once per forward call and
//! reused by every layer.

use candle_core::{D, DType, Device, Tensor};

use crate::error::{Result, invalid_input};
use crate::kv::check_increasing;

/// One block of queries and the keys it may see.
#[derive(Debug)]
struct Block {
    /// Query rows `q_start..q_end`.
    q_start: usize,
    q_end: usize,
    /// Keys `0..k_len` are visible to at least one query of the block.
    k_len: usize,
    /// `[q_end - q_start, k_len]`, 0 where visible and -inf where not; `None` when every query
    /// sees every key `0..k_len`.
    mask: Option<Tensor>,
}

/// Which keys each query may attend to, precomputed for one forward call.
#[derive(Debug)]
pub(crate) struct AttentionPlan {
    blocks: Vec<Block>,
    num_queries: usize,
    num_keys: usize,
}

/// Which attention implementation a forward pass uses ([`crate::Model::set_attention_kernel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKernel {
    /// The fused kernel where it applies (CUDA, bf16 or f16, head dim 64 or 128); the
    /// reference elsewhere. On CUDA, a shape the kernel cannot run is a counted fallback
    /// ([`crate::Model::attention_fallbacks`]) with a warning.
    #[default]
    Auto,
    /// Always the reference: scores materialised per query block (exact f32 on the CPU).
    Reference,
    /// The fused kernel; where it cannot run, the reference as a counted, logged fallback.
    Fused,
}

impl AttentionKernel {
    /// `auto`, `reference` or `fused` (also `flash`).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "auto" => Ok(Self::Auto),
            "reference" | "ref" => Ok(Self::Reference),
            "fused" | "flash" => Ok(Self::Fused),
            other => Err(invalid_input(format!(
                "unknown attention kernel `{other}` (expected auto, reference or fused)"
            ))),
        }
    }
}

/// Checks what every attention implementation assumes: at least one query, both position
/// lists strictly increasing, and a key at or before the first query (so every query sees one).
pub(crate) fn check_visible(q_pos: &[u32], k_pos: &[u32]) -> Result<()> {
    if q_pos.is_empty() {
        return Err(invalid_input("attention with zero queries"));
    }
    check_increasing(q_pos)?;
    check_increasing(k_pos)?;
    match k_pos.first() {
        Some(&k0) if k0 <= q_pos[0] => Ok(()),
        _ => Err(invalid_input(format!(
            "the query at position {} has no key at or before it",
            q_pos[0]
        ))),
    }
}

impl AttentionPlan {
    /// `q_pos` and `k_pos` must be strictly increasing; every query must see at least one key.
    /// `score_budget` bounds `num_heads × block × keys` elements per block.
    pub(crate) fn new(
        q_pos: &[u32],
        k_pos: &[u32],
        num_heads: usize,
        score_budget: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        check_visible(q_pos, k_pos)?;
        let block = (score_budget / (num_heads * k_pos.len()).max(1)).clamp(1, q_pos.len());
        let mut blocks = Vec::new();
        let mut q_start = 0;
        while q_start < q_pos.len() {
            let limit = (q_start + block).min(q_pos.len());
            let span_end = q_pos[q_start].saturating_add(block as u32);
            let q_end = q_start + q_pos[q_start..limit].partition_point(|&p| p < span_end);
            let (lo, hi) = (q_pos[q_start], q_pos[q_end - 1]);
            let k_len = k_pos.partition_point(|&p| p <= hi);
            // keys 0..k_free are at positions <= lo, visible to every query of the block
            let k_free = k_pos.partition_point(|&p| p <= lo);
            let mask = if k_free == k_len {
                None
            } else {
                let rows = q_end - q_start;
                let mut m = vec![0f32; rows * k_len];
                for (r, &qp) in q_pos[q_start..q_end].iter().enumerate() {
                    for (c, &kp) in k_pos.iter().enumerate().take(k_len).skip(k_free) {
                        if kp > qp {
                            m[r * k_len + c] = f32::NEG_INFINITY;
                        }
                    }
                }
                Some(Tensor::from_vec(m, (rows, k_len), device)?.to_dtype(dtype)?)
            };
            blocks.push(Block {
                q_start,
                q_end,
                k_len,
                mask,
            });
            q_start = q_end;
        }
        Ok(Self {
            blocks,
            num_queries: q_pos.len(),
            num_keys: k_pos.len(),
        })
    }
}

/// Attention probabilities of chosen query rows, for eviction policies.
///
/// `rows` are indices into the call's queries (0-based, any order, no duplicates needed).
#[derive(Debug, Clone)]
pub struct ProbeRequest {
    /// Indices of the query rows to report; the result holds them in this order.
    pub rows: Vec<usize>,
}

/// Computes `softmax(q kᵀ / √d + mask) v`.
///
/// Shapes: `q` `[n, num_heads, d]` (rotated), `k` `[t, kv_heads, d]` (rotated), `v`
/// `[t, kv_heads, d]`. Query head `h` reads KV head `h / group` (HF `repeat_kv` order).
/// Returns `[n, num_heads * d]` and, when `probe` is given, the probabilities of the probed
/// rows as `[kv_heads, group, probe.rows.len(), t]` (rows in the order asked).
pub(crate) fn attend(
    plan: &AttentionPlan,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probe: Option<&ProbeRequest>,
) -> Result<(Tensor, Option<Tensor>)> {
    let (n, num_heads, d) = q.dims3()?;
    let (t, kv_heads, _) = k.dims3()?;
    if n != plan.num_queries || t != plan.num_keys {
        return Err(invalid_input(format!(
            "attention plan for {}x{} used with {n}x{t}",
            plan.num_queries, plan.num_keys
        )));
    }
    let group = num_heads / kv_heads;
    let scale = 1.0 / (d as f64).sqrt();
    // [kv_heads, group, n, d]: the queries that share a KV head sit together
    let q = (q.transpose(0, 1)?.contiguous()? * scale)?.reshape((kv_heads, group, n, d))?;
    let k = k.transpose(0, 1)?.contiguous()?; // [kv_heads, t, d]
    let v = v.transpose(0, 1)?.contiguous()?;

    let mut outs = Vec::with_capacity(plan.blocks.len());
    let mut probed: Vec<Tensor> = Vec::new();
    let mut probed_slots: Vec<usize> = Vec::new();
    for b in &plan.blocks {
        let nb = b.q_end - b.q_start;
        let qb = q
            .narrow(2, b.q_start, nb)?
            .contiguous()?
            .reshape((kv_heads, group * nb, d))?;
        let kb = k.narrow(1, 0, b.k_len)?;
        let vb = v.narrow(1, 0, b.k_len)?;
        let mut scores = qb.matmul(&kb.t()?)?; // [kv_heads, group*nb, k_len]
        if let Some(mask) = &b.mask {
            scores = scores
                .reshape((kv_heads, group, nb, b.k_len))?
                .broadcast_add(mask)?
                .reshape((kv_heads, group * nb, b.k_len))?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        if let Some(p) = probe {
            // the probed rows of this block in one gather (slot = place in the request)
            let picks: Vec<(usize, u32)> = p
                .rows
                .iter()
                .enumerate()
                .filter(|&(_, &row)| row >= b.q_start && row < b.q_end)
                .map(|(slot, &row)| (slot, (row - b.q_start) as u32))
                .collect();
            if !picks.is_empty() {
                let idx: Vec<u32> = picks.iter().map(|&(_, r)| r).collect();
                let r = probs
                    .reshape((kv_heads, group, nb, b.k_len))?
                    .index_select(&Tensor::new(idx, q.device())?, 2)?
                    .pad_with_zeros(D::Minus1, 0, t - b.k_len)?;
                probed_slots.extend(picks.iter().map(|&(slot, _)| slot));
                probed.push(r);
            }
        }
        let ob = probs.matmul(&vb)?; // [kv_heads, group*nb, d]
        let ob = ob
            .reshape((num_heads, nb, d))?
            .transpose(0, 1)?
            .reshape((nb, num_heads * d))?;
        outs.push(ob);
    }
    let out = Tensor::cat(&outs, 0)?;
    let probe_out = match probe {
        None => None,
        Some(p) => {
            if let Some(&bad) = p.rows.iter().find(|&&r| r >= n) {
                return Err(invalid_input(format!(
                    "probe row {bad} past the {n} queries"
                )));
            }
            // rows come block by block; put them in the order asked
            let rows = Tensor::cat(&probed, 2)?;
            let rows = if probed_slots.windows(2).all(|w| w[0] < w[1]) {
                rows
            } else {
                let mut at = vec![0u32; probed_slots.len()];
                for (pos, &slot) in probed_slots.iter().enumerate() {
                    at[slot] = pos as u32;
                }
                rows.index_select(&Tensor::new(at, rows.device())?, 2)?
            };
            Some(rows.to_dtype(DType::F32)?)
        }
    };
    Ok((out, probe_out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference: every query against every key, masked one at a time.
    fn naive(q: &Tensor, k: &Tensor, v: &Tensor, qp: &[u32], kp: &[u32]) -> Vec<Vec<f32>> {
        let (n, h, d) = q.dims3().unwrap();
        let kvh = k.dims()[1];
        let g = h / kvh;
        let q = q.to_vec3::<f32>().unwrap();
        let k = k.to_vec3::<f32>().unwrap();
        let v = v.to_vec3::<f32>().unwrap();
        let mut out = vec![vec![0f32; h * d]; n];
        for i in 0..n {
            for head in 0..h {
                let kh = head / g;
                let vis: Vec<usize> = (0..kp.len()).filter(|&j| kp[j] <= qp[i]).collect();
                let s: Vec<f32> = vis
                    .iter()
                    .map(|&j| {
                        (0..d).map(|x| q[i][head][x] * k[j][kh][x]).sum::<f32>() / (d as f32).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f32::MIN, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for (w, &j) in e.iter().zip(&vis) {
                    for x in 0..d {
                        out[i][head * d + x] += w / z * v[j][kh][x];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn blocks_and_masks_match_naive() -> Result<()> {
        let dev = Device::Cpu;
        let (h, kvh, d) = (6, 2, 4);
        let kp: Vec<u32> = vec![0, 1, 2, 5, 6, 7, 9, 10, 11, 12];
        let qp: Vec<u32> = vec![2, 6, 7, 11, 12];
        let q = Tensor::randn(0f32, 1.0, (qp.len(), h, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (kp.len(), kvh, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (kp.len(), kvh, d), &dev)?;
        let want = naive(&q, &k, &v, &qp, &kp);
        for budget in [1, 50, 200, 10_000] {
            let plan = AttentionPlan::new(&qp, &kp, h, budget, DType::F32, &dev)?;
            // a block holds at most `block` queries within `block` positions
            let block = (budget / (h * kp.len())).clamp(1, qp.len());
            for b in &plan.blocks {
                assert!(b.q_end - b.q_start <= block);
                assert!((qp[b.q_end - 1] - qp[b.q_start]) < block as u32);
            }
            if budget == 200 {
                let starts: Vec<usize> = plan.blocks.iter().map(|b| b.q_start).collect();
                assert_eq!(starts, vec![0, 1, 3], "positions 2 | 6 7 | 11 12");
            }
            let probe = ProbeRequest { rows: vec![4, 0] };
            let (got, probs) = attend(&plan, &q, &k, &v, Some(&probe))?;
            let got = got.to_vec2::<f32>()?;
            for (a, b) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!((a - b).abs() < 1e-5, "budget {budget}: {a} vs {b}");
            }
            let probs = probs.unwrap();
            assert_eq!(probs.dims(), &[kvh, h / kvh, 2, kp.len()]);
            // probabilities sum to one, and nothing lands on a future key of row 0 (pos 2)
            let sums = probs.sum(D::Minus1)?.flatten_all()?.to_vec1::<f32>()?;
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5));
            let row0 = probs.narrow(2, 1, 1)?.flatten_all()?.to_vec1::<f32>()?;
            for (j, p) in row0.iter().enumerate() {
                if kp[j % kp.len()] > 2 {
                    assert_eq!(*p, 0.0);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn query_without_visible_key_is_rejected() {
        let r = AttentionPlan::new(&[1], &[2, 3], 1, 100, DType::F32, &Device::Cpu);
        assert!(r.is_err());
    }
}
