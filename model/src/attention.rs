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
use crate::parallel::ParallelContext;

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
    /// The probed rows in this block: their places in the request, and their rows within
    /// the block (`None` when that is every row in order).
    probe: Option<(Vec<usize>, Option<Tensor>)>,
    /// With a parallel context: the first row of the block (within it) that attends to it
    /// corrected; every later row does too.
    corrected_from: Option<usize>,
}

/// Which keys each query may attend to, precomputed for one forward call.
#[derive(Debug)]
pub(crate) struct AttentionPlan {
    blocks: Vec<Block>,
    num_queries: usize,
    num_keys: usize,
    /// With a probe: the permutation from block order to the order asked (`None` when they
    /// agree).
    probe_order: Option<Tensor>,
    /// Whether the probe asked for per-KV-head column sums.
    column_sums: bool,
    /// Whether the probe asked for per-query-head sums over every row.
    head_sums: bool,
    /// A parallel context and the indices of its keys.
    parallel: Option<(ParallelContext, std::ops::Range<usize>)>,
}

/// Which attention implementation a forward pass uses ([`crate::Model::set_attention_kernel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKernel {
    /// The fused kernel where it applies (CUDA, bf16 or f16, head dim 64 or 128); on the
    /// CPU in f32 the tiled online-softmax attention (`tiled.rs`) for calls without a
    /// probe; the reference elsewhere. On CUDA, a shape the kernel cannot run is a counted fallback
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

/// The precision of the CPU's tiled attention products (`tiled.rs`); the CUDA kernel has its
/// own (the model's dtype). The library's default is the reference's f32; the `kvquilt`
/// binaries ask for bf16 unless told otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuAttentionPrecision {
    /// f32 products, as the reference computes them.
    #[default]
    F32,
    /// Q, K, V and the probabilities rounded to bf16, products and sums in f32 (the GPU
    /// kernel's precision), on CPUs with AVX-512 BF16 (twice the f32 products' rate there)
    /// for calls of at least 16 queries; and decode steps (at most 8 rows per KV head) read
    /// K and V rounded to bf16, kept laid out by head, products and sums in f32, on CPUs with
    /// AVX-512F for head dims 64 and 128 (`LayerKv::decode_rows`: half the bytes a step
    /// reads); f32 elsewhere, so it never fails.
    Bf16,
}

impl CpuAttentionPrecision {
    /// `f32` or `bf16`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(invalid_input(format!(
                "unknown CPU attention precision `{other}` (expected f32 or bf16)"
            ))),
        }
    }

    /// Whether this CPU runs [`Self::Bf16`]'s bf16 products for head dimension `d` (false
    /// means such calls run f32 products).
    pub fn bf16_available(d: usize) -> bool {
        crate::bf16dot::available(d)
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
    /// `score_budget` bounds `num_heads × block × keys` elements per block. With `probe`, the
    /// gathers of its rows are prepared here, once for every layer that uses the plan. With
    /// `parallel`, queries after that context attend to its keys corrected.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        q_pos: &[u32],
        k_pos: &[u32],
        num_heads: usize,
        score_budget: usize,
        dtype: DType,
        device: &Device,
        probe: Option<&ProbeRequest>,
        parallel: Option<&ParallelContext>,
    ) -> Result<Self> {
        check_visible(q_pos, k_pos)?;
        if let Some(&bad) = probe.and_then(|p| p.rows.iter().find(|&&r| r >= q_pos.len())) {
            return Err(invalid_input(format!(
                "probe row {bad} past the {} queries",
                q_pos.len()
            )));
        }
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
            let probe = match probe {
                // per-head sums alone (of every row) keep no row's probabilities
                Some(p) if p.is_head_summed_over_all(q_pos.len()) => None,
                Some(p) => block_probe(p, q_start, q_end, device)?,
                None => None,
            };
            let corrected_from = parallel.and_then(|p| {
                let rows = &q_pos[q_start..q_end];
                let from = rows.partition_point(|&qp| !p.corrects(qp));
                (from < rows.len()).then_some(from)
            });
            blocks.push(Block {
                q_start,
                q_end,
                k_len,
                mask,
                probe,
                corrected_from,
            });
            q_start = q_end;
        }
        let slots: Vec<usize> = blocks
            .iter()
            .filter_map(|b| b.probe.as_ref())
            .flat_map(|(slots, _)| slots.iter().copied())
            .collect();
        let probe_order = if slots.windows(2).all(|w| w[0] < w[1]) {
            None
        } else {
            let mut at = vec![0u32; slots.len()];
            for (pos, &slot) in slots.iter().enumerate() {
                at[slot] = pos as u32;
            }
            Some(Tensor::new(at, device)?)
        };
        Ok(Self {
            blocks,
            num_queries: q_pos.len(),
            num_keys: k_pos.len(),
            probe_order,
            column_sums: probe.is_some_and(|p| p.column_sums),
            head_sums: probe.is_some_and(|p| p.head_sums),
            parallel: parallel.map(|p| (p.clone(), p.key_range(k_pos))),
        })
    }
}

/// The probed rows of block `q_start..q_end`: (places in the request, gather index within
/// the block or `None` for all rows in order), or `None` when no probed row is in it.
fn block_probe(
    p: &ProbeRequest,
    q_start: usize,
    q_end: usize,
    device: &Device,
) -> Result<Option<(Vec<usize>, Option<Tensor>)>> {
    let picks: Vec<(usize, u32)> = p
        .rows
        .iter()
        .enumerate()
        .filter(|&(_, &row)| row >= q_start && row < q_end)
        .map(|(slot, &row)| (slot, (row - q_start) as u32))
        .collect();
    if picks.is_empty() {
        return Ok(None);
    }
    let whole = picks.len() == q_end - q_start
        && picks.iter().enumerate().all(|(i, &(_, r))| r as usize == i);
    let index = if whole {
        None
    } else {
        Some(Tensor::new(
            picks.iter().map(|&(_, r)| r).collect::<Vec<_>>(),
            device,
        )?)
    };
    Ok(Some((
        picks.into_iter().map(|(slot, _)| slot).collect(),
        index,
    )))
}

/// What to observe in a forward call's attention: probabilities of chosen query rows (for
/// query-aware selection and policies that read the last rows) and/or each key's attention
/// summed over every query per KV head (H2O's accumulated attention).
///
/// `rows` are indices into the call's queries (0-based, any order).
#[derive(Debug, Clone, Default)]
pub struct ProbeRequest {
    /// Indices of the query rows to report; the result holds them in this order.
    pub rows: Vec<usize>,
    /// Report only each key's probability summed over the rows and every head, `[keys]`
    /// f32 per layer, instead of `[kv_heads, group, rows, keys]`. Probing every row in
    /// order this way runs on the fused kernel path (no probabilities materialised).
    pub summed: bool,
    /// Also report `[kv_heads, keys]` f32: each key's probability summed over every query
    /// row of the call and the query heads of its KV head, reduced block by block (no
    /// `rows × keys` matrix is kept).
    pub column_sums: bool,
    /// Also report `[kv_heads, group, keys]` f32: each key's probability summed over every
    /// query row of the call, per query head (a window's mean attention, times its rows,
    /// when the call's rows are the window). Asked alone for every row in order
    /// ([`ProbeRequest::head_sums_over_all`]), it runs on the fused kernel path.
    pub head_sums: bool,
    /// The first key whose per-head sum is wanted (0: every key). A hint: the fused
    /// kernel then sums, and reads, no key before it (a decode pool ranks only its own
    /// rows, the cache's last few); other paths report every key.
    /// [`crate::LayerProbe::head_sums_from`] says which keys the sums cover.
    pub head_sums_from: usize,
    /// With `head_sums`: the caller adds each KV head's query heads up anyway (a decode
    /// pool ranks per KV head). A hint: the fused kernel then sums the group itself and
    /// reports `[kv_heads, 1, keys]` (no reduction launched after it); other paths report
    /// every query head. The group axis's length says which came.
    pub head_sums_grouped: bool,
}

impl ProbeRequest {
    /// The probabilities of `rows`, per head.
    pub fn rows(rows: Vec<usize>) -> Self {
        Self {
            rows,
            ..Self::default()
        }
    }

    /// Each key's probability summed over every one of `n` query rows and every head.
    pub fn summed_over_all(n: usize) -> Self {
        Self {
            rows: (0..n).collect(),
            summed: true,
            ..Self::default()
        }
    }

    /// Each key's probability summed over every one of `n` query rows, per query head.
    pub fn head_sums_over_all(n: usize) -> Self {
        Self {
            rows: (0..n).collect(),
            head_sums: true,
            ..Self::default()
        }
    }

    /// This request, wanting per-head sums only of keys `from..` ([`ProbeRequest::head_sums_from`]).
    pub fn with_head_sums_from(mut self, from: usize) -> Self {
        self.head_sums_from = from;
        self
    }

    /// This request, adding each KV head's per-head sums up anyway
    /// ([`ProbeRequest::head_sums_grouped`]).
    pub fn with_grouped_head_sums(mut self) -> Self {
        self.head_sums_grouped = true;
        self
    }

    /// Whether this asks for per-head sums over all `n` rows of a call, in order, and
    /// nothing else.
    pub(crate) fn is_head_summed_over_all(&self, n: usize) -> bool {
        self.head_sums && !self.summed && !self.column_sums && self.is_every_row(n)
    }

    /// This request, also asking for per-KV-head column sums over every row.
    pub fn with_column_sums(mut self) -> Self {
        self.column_sums = true;
        self
    }

    /// Whether this asks for the sum over all `n` rows of a call, in order, and nothing else.
    pub(crate) fn is_summed_over_all(&self, n: usize) -> bool {
        self.summed && !self.column_sums && !self.head_sums && self.is_every_row(n)
    }

    /// Whether `rows` are all `n` rows of a call, in order.
    fn is_every_row(&self, n: usize) -> bool {
        self.rows.len() == n && self.rows.iter().enumerate().all(|(i, &r)| i == r)
    }
}

/// What [`attend`] returns: the output and what the plan's probe asked for.
pub(crate) struct Attended {
    /// `[n, num_heads * d]`.
    pub(crate) out: Tensor,
    /// The probed rows, `[kv_heads, group, rows, t]` f32 in the order asked.
    pub(crate) rows: Option<Tensor>,
    /// `[kv_heads, t]` f32 column sums over every query and the group.
    pub(crate) column_sums: Option<Tensor>,
    /// `[kv_heads, group, t]` f32 sums over every query, per query head.
    pub(crate) head_sums: Option<Tensor>,
}

/// Computes `softmax(q kᵀ / √d + mask) v`.
///
/// Shapes: `q` `[n, num_heads, d]` (rotated), `k` `[t, kv_heads, d]` (rotated), `v`
/// `[t, kv_heads, d]`. Query head `h` reads KV head `h / group` (HF `repeat_kv` order).
/// Returns `[n, num_heads * d]` and, when the plan was built with a probe, the probabilities
/// of the probed rows as `[kv_heads, group, probe.rows.len(), t]` (rows in the order asked)
/// and the column sums asked for. `key_bias` (`[kv_heads, b]`, `b <= t`, 0 or -inf) masks keys
/// `0..b` per KV head on top of the position mask (a pruned cache's padding).
pub(crate) fn attend(
    plan: &AttentionPlan,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    key_bias: Option<&Tensor>,
) -> Result<Attended> {
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

    // [kv_heads, 1, t]: the bias padded with zeros over keys it does not cover
    let key_bias = match key_bias {
        Some(b) => {
            let covered = b.dims()[1];
            Some(
                b.pad_with_zeros(1, 0, t.saturating_sub(covered))?
                    .unsqueeze(1)?,
            )
        }
        None => None,
    };
    let mut outs = Vec::with_capacity(plan.blocks.len());
    let mut probed: Vec<Tensor> = Vec::new();
    let mut column_sums: Option<Tensor> = None;
    let mut head_sums: Option<Tensor> = None;
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
        if let Some(bias) = &key_bias {
            scores = scores.broadcast_add(&bias.narrow(2, 0, b.k_len)?)?;
        }
        if let (Some(from), Some((parallel, keys))) = (b.corrected_from, &plan.parallel) {
            // rows from `from` on come after the context, which they all see whole
            let s4 = scores.reshape((kv_heads, group, nb, b.k_len))?;
            let tail = parallel.adjust(&s4.narrow(2, from, nb - from)?, keys.clone())?;
            // f32 from here to the softmax (`ParallelContext::adjust`)
            let s4 = if from == 0 {
                tail
            } else {
                Tensor::cat(&[&s4.narrow(2, 0, from)?.to_dtype(DType::F32)?, &tail], 2)?
            };
            scores = s4.reshape((kv_heads, group * nb, b.k_len))?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        if plan.column_sums {
            let sums = probs
                .to_dtype(DType::F32)?
                .sum(1)?
                .pad_with_zeros(1, 0, t - b.k_len)?;
            column_sums = Some(match column_sums {
                None => sums,
                Some(acc) => (acc + sums)?,
            });
        }
        if plan.head_sums {
            let sums = probs
                .to_dtype(DType::F32)?
                .reshape((kv_heads, group, nb, b.k_len))?
                .sum(2)?
                .pad_with_zeros(2, 0, t - b.k_len)?;
            head_sums = Some(match head_sums {
                None => sums,
                Some(acc) => (acc + sums)?,
            });
        }
        if let Some((_, index)) = &b.probe {
            let mut r = probs.reshape((kv_heads, group, nb, b.k_len))?;
            if let Some(index) = index {
                r = r.index_select(index, 2)?;
            }
            // f32 per block: a corrected block's probabilities already are
            probed.push(
                r.to_dtype(DType::F32)?
                    .pad_with_zeros(D::Minus1, 0, t - b.k_len)?,
            );
        }
        let ob = probs.to_dtype(vb.dtype())?.matmul(&vb)?; // [kv_heads, group*nb, d]
        let ob = ob
            .reshape((num_heads, nb, d))?
            .transpose(0, 1)?
            .reshape((nb, num_heads * d))?;
        outs.push(ob);
    }
    let out = Tensor::cat(&outs, 0)?;
    let probe_out = if probed.is_empty() {
        None
    } else {
        // rows come block by block; put them in the order asked
        let rows = Tensor::cat(&probed, 2)?;
        let rows = match &plan.probe_order {
            None => rows,
            Some(order) => rows.index_select(order, 2)?,
        };
        Some(rows.to_dtype(DType::F32)?)
    };
    Ok(Attended {
        out,
        rows: probe_out,
        column_sums,
        head_sums,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Every query against every visible key, one at a time, in f64; `[n, h·d]` flattened.
    /// (Also the reference of the tiled attention's tests.)
    pub(crate) fn naive(q: &Tensor, k: &Tensor, v: &Tensor, qp: &[u32], kp: &[u32]) -> Vec<f32> {
        let (n, h, d) = q.dims3().unwrap();
        let kvh = k.dims()[1];
        let g = h / kvh;
        let q = q.to_vec3::<f32>().unwrap();
        let k = k.to_vec3::<f32>().unwrap();
        let v = v.to_vec3::<f32>().unwrap();
        let mut out = vec![0f32; n * h * d];
        for i in 0..n {
            for head in 0..h {
                let kh = head / g;
                let vis: Vec<usize> = (0..kp.len()).filter(|&j| kp[j] <= qp[i]).collect();
                let s: Vec<f64> = vis
                    .iter()
                    .map(|&j| {
                        (0..d)
                            .map(|x| q[i][head][x] as f64 * k[j][kh][x] as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::MIN, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for (w, &j) in e.iter().zip(&vis) {
                    for x in 0..d {
                        out[i * h * d + head * d + x] += (w / z * v[j][kh][x] as f64) as f32;
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
            let probe = ProbeRequest::rows(vec![4, 0]);
            let plan =
                AttentionPlan::new(&qp, &kp, h, budget, DType::F32, &dev, Some(&probe), None)?;
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
            let a = attend(&plan, &q, &k, &v, None)?;
            let (got, probs) = (a.out, a.rows);
            let got = got.to_vec2::<f32>()?;
            for (a, b) in got.iter().flatten().zip(&want) {
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
        let r = AttentionPlan::new(&[1], &[2, 3], 1, 100, DType::F32, &Device::Cpu, None, None);
        assert!(r.is_err());
    }
}
