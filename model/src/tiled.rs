//! Tiled attention on the CPU: FlashAttention's online softmax over key tiles, so no score
//! matrix larger than one tile (`rows × KEY_TILE` f32) ever exists, whatever the sequence
//! length.
//!
//! The work is split into units of one KV head × one query tile; a unit's rows are the
//! `group` query heads that read that KV head times the tile's queries, so K and V tiles are
//! loaded once for the whole GQA group. Each unit walks the key tiles its queries can see
//! (keys at positions up to the tile's last query), computes `S = Q Kᵀ` for one key tile with
//! `gemm` (row by row for units of a few rows, a decode step's, where `gemm`'s packing would
//! cost more than the products), turns it into probabilities relative to the running row
//! maximum (base 2, with a vectorised `exp2`), rescales the running output and adds `P V`
//! (the same way). Because key positions are strictly increasing, the keys a query may not
//! see form a suffix of each key tile: masking is a per-row length, never a -inf matrix.
//! Units run on rayon's pool.
//!
//! Same contract as the reference ([`crate::attention::attend`]): Q and K rotated, f32,
//! `q` `[n, num_heads, d]`, `k`/`v` `[t, kv_heads, d]`, output `[n, num_heads * d]`. Pinned
//! against a naive per-query softmax by `tests::matches_naive_on_random_shapes`.
//!
//! A call with few units per thread (a decode step, a short question pass: one unit per KV
//! head) cuts each unit's keys into parts run in parallel and merges their softmax states
//! (pinned by `tests::split_units_match_naive`), probed or not: a probed call's parts keep
//! their probabilities for the sums (units of a few rows, a decode step's) or sweep their
//! keys again once the merged maxima and sums are final (pinned by
//! `tests::split_sums_equal_whole_units`).
//!
//! The products run in f32 (`gemm`, [`FewRows`]) or, when the plan asks for
//! [`CpuAttentionPrecision::Bf16`], the call has at least [`BF16_LEAST_QUERIES`] queries and
//! the CPU has AVX-512 BF16, in bf16 with f32 sums (`bf16dot.rs`: K and V packed once per
//! call, each row's probabilities written straight to bf16 by its softmax step; the maxima
//! and sums of the online softmax stay f32). Pinned by
//! `tests::bf16_products_stay_within_bf16_error_of_naive`.
//!
//! [`attend_by_head`] takes a decode step's K and V laid out by head instead
//! (`crate::kv::HeadRows`, `[kv_heads, capacity, d]`, f32 or bf16): each unit then reads its
//! head's rows as one stream, where rows by token give it a third (for SmolLM2's three KV
//! heads) of every row; bf16 rows are widened to f32 as the row-by-row kernels load them
//! (BENCHMARKS §9 "Decode reads its cache by head"). Pinned by
//! `tests::rows_by_head_attend_like_rows_by_token`.
//!
//! [`attend_summed`] also returns each key's probability summed over every query and head
//! (query-aware blend's question pass): once a unit knows its rows' final maxima and sums, a
//! second sweep recomputes `Q Kᵀ` tile by tile and adds `2^(s - max) / sum` per key, so the
//! probabilities are still never held beyond one tile (pinned against the naive sums by the
//! same test). Units of a few f32 rows (a decode step's) keep their one sweep's
//! probabilities instead (`Kept`: `rows × keys` f32, a few rows' worth) and rescale them.

use candle_core::{DType, Device, Storage, Tensor};
use half::bf16;
use rayon::prelude::*;

use crate::attention::{CpuAttentionPrecision, check_visible};
use crate::bf16dot::{self, PackedKv};
use crate::error::{Result, invalid_input};
use crate::vmath::{FewRows, exp2_in_place, max_of};

/// Query positions per tile (rows per unit are `group ×` this) for long calls, where fewer,
/// larger tiles read K and V fewer times (measured on SmolLM2's shape at 8,192 tokens with
/// f32 products: 128 beat 64 and 256)...
const QUERY_TILE: usize = 128;
/// ... with bf16 products, whose kernels read K and V without packing them: the smaller
/// score tile (`rows × KEY_TILE` f32, 384 KiB for SmolLM2's GQA group of 3) stays in L2
/// (measured at 8,192 tokens: 64 took 0.8–0.9× the time of 128; 32 no better than 64).
const BF16_QUERY_TILE: usize = 64;
/// ... and for calls under [`LONG_CALL`] queries, where smaller tiles keep every core busy.
const SHORT_QUERY_TILE: usize = 64;
const LONG_CALL: usize = 2048;
/// A query tile spans fewer positions than [`QUERY_TILE`] (or its short twin) or than the
/// keys its first query sees over this, whichever is more: sparse queries (blend's
/// recomputed rows) then fill their tiles — larger `gemm` products, K and V read fewer
/// times — while the keys a row computes only to mask stay a small share of what it sees.
const SPAN_PER_KEYS: usize = 16;
/// Keys per tile: the score tile of a unit is `rows × KEY_TILE` f32.
const KEY_TILE: usize = 512;
/// A call with fewer units than this many per thread (a decode step: one unit per KV head) cuts
/// each unit's keys into parts of [`SPLIT_KEYS`], merged afterwards, so every core has work.
const SPLIT_BELOW_UNITS_PER_THREAD: usize = 4;
/// Keys per part of a split unit (whole key tiles).
const SPLIT_KEYS: usize = 2 * KEY_TILE;
/// Units of at most this many rows (a decode step's GQA group) take the products row by row
/// ([`FewRows`]) instead of `gemm`, whose packing of K and V dominates at this shape
/// (measured: SmolLM2 decode at 6k context, BENCHMARKS §5).
const FEW_ROWS: usize = 8;
/// Calls of fewer queries than this (a decode step, a few-token question) keep f32 products
/// under [`CpuAttentionPrecision::Bf16`]: packing the call's K and V to bf16 costs as much as
/// their few rows' products.
const BF16_LEAST_QUERIES: usize = 16;

/// One query tile and the keys it may see.
#[derive(Debug, Clone, Copy)]
struct QueryTile {
    /// Queries `q_start..q_end`.
    q_start: usize,
    q_end: usize,
    /// Keys `0..k_len` are visible to at least one query of the tile.
    k_len: usize,
    /// Keys `0..k_free` are visible to every query of the tile.
    k_free: usize,
}

/// The tiles of one forward call; depends on positions alone, so every layer reuses it.
#[derive(Debug)]
pub(crate) struct TiledPlan {
    q_pos: Vec<u32>,
    k_pos: Vec<u32>,
    tiles: Vec<QueryTile>,
    /// The products' precision asked for.
    precision: CpuAttentionPrecision,
}

impl TiledPlan {
    /// Both position lists strictly increasing, a key at or before the first query.
    /// A tile holds at most `tile` queries spanning fewer positions than `tile` or than a
    /// [`SPAN_PER_KEYS`]th of the keys its first query sees, whichever is more, so a row's
    /// masked work stays a small share of what it sees while sparse queries fill their
    /// tiles.
    /// Products run in `precision` where the call can (see [`CpuAttentionPrecision::Bf16`]).
    pub(crate) fn new(
        q_pos: &[u32],
        k_pos: &[u32],
        precision: CpuAttentionPrecision,
    ) -> Result<Self> {
        check_visible(q_pos, k_pos)?;
        let tile = if q_pos.len() < LONG_CALL {
            SHORT_QUERY_TILE
        } else if precision == CpuAttentionPrecision::Bf16 && bf16dot::available(16) {
            BF16_QUERY_TILE
        } else {
            QUERY_TILE
        };
        let mut tiles = Vec::with_capacity(q_pos.len().div_ceil(tile));
        let mut q_start = 0;
        while q_start < q_pos.len() {
            let limit = (q_start + tile).min(q_pos.len());
            // a row computes (and masks) the keys between its own position and the tile's
            // last: bound that by a sixteenth of what the first row sees, at least `tile`
            let k_free = k_pos.partition_point(|&p| p <= q_pos[q_start]);
            let span = tile.max(k_free / SPAN_PER_KEYS) as u32;
            let span_end = q_pos[q_start].saturating_add(span);
            let q_end = q_start + q_pos[q_start..limit].partition_point(|&p| p < span_end);
            tiles.push(QueryTile {
                q_start,
                q_end,
                k_len: k_pos.partition_point(|&p| p <= q_pos[q_end - 1]),
                k_free,
            });
            q_start = q_end;
        }
        Ok(Self {
            q_pos: q_pos.to_vec(),
            k_pos: k_pos.to_vec(),
            tiles,
            precision,
        })
    }

    /// Whether a call of this plan with head dimension `d` runs bf16 products.
    fn bf16_products(&self, d: usize) -> bool {
        self.precision == CpuAttentionPrecision::Bf16
            && self.q_pos.len() >= BF16_LEAST_QUERIES
            && bf16dot::available(d)
    }
}

/// `softmax(q kᵀ / √d) v` with the exact position mask of `plan`; see the module docs.
pub(crate) fn attend(plan: &TiledPlan, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    Ok(run(plan, q, Kv::ByToken { k, v }, Sums::None)?.0)
}

/// Which probability sums a call reports beside its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sums {
    /// None.
    None,
    /// Each key's, over every query row and head: `[t]`.
    Total,
    /// Each key's over every query row, per query head: `[num_heads, t]` (head
    /// `kh · group + g`), what [`crate::attention::ProbeRequest::head_sums_over_all`] asks.
    PerHead,
}

/// [`attend`], plus each key's attention probability summed over every query row and head,
/// `[t]` f32 (what [`crate::attention::ProbeRequest::summed_over_all`] asks for).
pub(crate) fn attend_summed(
    plan: &TiledPlan,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (out, sums) = run(plan, q, Kv::ByToken { k, v }, Sums::Total)?;
    let t = sums.len();
    Ok((out, Tensor::from_vec(sums, t, &Device::Cpu)?))
}

/// [`attend`], plus each key's attention probability summed over every query row, per query
/// head: `[kv_heads, group, t]` f32 (what
/// [`crate::attention::ProbeRequest::head_sums_over_all`] asks for; a decode pool's per-head
/// scores). Over `k`/`v` token-major (`[t, kv_heads, d]` f32) or, with `by_head`, a decode
/// mirror's rows ([`attend_by_head`]'s). Pinned by `tests::head_sums_match_naive`.
pub(crate) fn attend_head_summed(
    plan: &TiledPlan,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    by_head: bool,
) -> Result<(Tensor, Tensor)> {
    let kv = match by_head {
        true => Kv::ByHead { k, v },
        false => Kv::ByToken { k, v },
    };
    let kv_heads = if by_head { k.dims()[0] } else { k.dims()[1] };
    let (out, sums) = run(plan, q, kv, Sums::PerHead)?;
    let (heads, t) = (q.dims()[1], plan.k_pos.len());
    let group = heads / kv_heads.max(1);
    Ok((
        out,
        Tensor::from_vec(sums, (kv_heads, group, t), &Device::Cpu)?,
    ))
}

/// [`attend`] over a layer's rows laid out by head (`crate::kv::HeadRows`): `k` and `v`
/// `[kv_heads, capacity, d]`, f32 or bf16, the first `plan`'s key count of each head's rows
/// read. For calls whose units take the products row by row ([`reads_by_head`]): a decode
/// step's. Products and sums are f32 whatever the rows hold; over f32 rows the result equals
/// [`attend`]'s over the same rows token-major bit for bit (pinned by
/// `tests::rows_by_head_attend_like_rows_by_token`).
pub(crate) fn attend_by_head(
    plan: &TiledPlan,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<Tensor> {
    Ok(run(plan, q, Kv::ByHead { k, v }, Sums::None)?.0)
}

/// Whether [`attend_by_head`] takes calls of `plan` for GQA groups of `group` query heads:
/// every unit few enough rows for the row-by-row products (such calls never pack K and V
/// to bf16: they have fewer than [`BF16_LEAST_QUERIES`] queries).
pub(crate) fn reads_by_head(plan: &TiledPlan, group: usize) -> bool {
    plan.q_pos.len() * group <= FEW_ROWS
}

const _: () = assert!(FEW_ROWS < BF16_LEAST_QUERIES);

/// The K and V rows of one call: token-major `[t, kv_heads, d]` f32 (a layer's own), or
/// head-major `[kv_heads, capacity, d]` f32 or bf16 (a decode mirror's, the first `t` rows of
/// each head read).
#[derive(Clone, Copy)]
enum Kv<'a> {
    ByToken { k: &'a Tensor, v: &'a Tensor },
    ByHead { k: &'a Tensor, v: &'a Tensor },
}

/// The units of one call on rayon's pool; with `sums`, the per-key probability sums too
/// (see [`Sums`]; empty without).
fn run(plan: &TiledPlan, q: &Tensor, kv: Kv<'_>, sums: Sums) -> Result<(Tensor, Vec<f32>)> {
    let (n, num_heads, d) = q.dims3()?;
    let t = plan.k_pos.len();
    let (k, v, by_head) = match kv {
        Kv::ByToken { k, v } => (k, v, false),
        Kv::ByHead { k, v } => (k, v, true),
    };
    let (kv_heads, dk, fits) = match k.dims3()? {
        (rows, heads, dk) if !by_head => (heads, dk, rows == t),
        (heads, capacity, dk) => (heads, dk, t <= capacity),
    };
    if n != plan.q_pos.len() || !fits || dk != d || v.dims() != k.dims() {
        return Err(invalid_input(format!(
            "tiled attention planned for {}x{} keys used with q {:?}, k {:?}, v {:?}",
            plan.q_pos.len(),
            plan.k_pos.len(),
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if kv_heads == 0 || !num_heads.is_multiple_of(kv_heads) {
        return Err(invalid_input(format!(
            "{num_heads} heads over {kv_heads} KV heads"
        )));
    }
    let shape = Shape {
        num_heads,
        group: num_heads / kv_heads,
        d,
    };
    if by_head && !reads_by_head(plan, shape.group) {
        return Err(invalid_input(format!(
            "rows by head are read by calls of at most {FEW_ROWS} rows per unit, not {n} queries × {} heads",
            shape.group,
        )));
    }
    let q = contiguous_f32(q)?;
    let (k, v) = if by_head {
        (k.contiguous()?, v.contiguous()?)
    } else {
        (contiguous_f32(k)?, contiguous_f32(v)?)
    };
    let units: Vec<(usize, QueryTile)> = (0..kv_heads)
        .flat_map(|kh| plan.tiles.iter().map(move |&tile| (kh, tile)))
        .collect();
    let bf16 = !by_head && plan.bf16_products(d);
    // (a probed call splits as the unprobed one does: its sums are added part by part)
    let split = units.len() < SPLIT_BELOW_UNITS_PER_THREAD * rayon::current_num_threads()
        && units.iter().any(|(_, tile)| tile.k_len > SPLIT_KEYS);
    // key c of KV head kh starts at kh·head + c·row
    let (row, head) = if by_head {
        (d, k.dims()[1] * d)
    } else {
        (kv_heads * d, d)
    };
    let results: Vec<(Vec<f32>, Vec<f32>)> = with_slices(&q, &k, &v, |qs, kv| {
        let packed = match (bf16, kv) {
            (true, Slices::F32(ks, vs)) => Some(PackedKv::new(ks, vs, t, kv_heads, d)),
            _ => None,
        };
        let ops = match (&packed, kv) {
            (Some(packed), _) => Operands::Bf16(packed),
            (None, Slices::F32(k, v)) => Operands::F32(Strided { k, v, row, head }),
            (None, Slices::Bf16(k, v)) => Operands::Bf16Rows(Strided { k, v, row, head }),
        };
        if split {
            split_units(plan, shape, &units, qs, ops, sums)
        } else {
            units
                .par_iter()
                .map(|&(kh, tile)| unit(plan, shape, kh, tile, qs, ops, sums))
                .collect()
        }
    })?;
    // scatter each unit's rows (g, i) to output row q_start + i, head kh * group + g
    let mut out = vec![0f32; n * num_heads * d];
    let mut key_sums = match sums {
        Sums::None => Vec::new(),
        Sums::Total => vec![0f32; t],
        Sums::PerHead => vec![0f32; num_heads * t],
    };
    for (&(kh, tile), (o, col)) in units.iter().zip(&results) {
        match sums {
            Sums::None => {}
            Sums::Total => key_sums.iter_mut().zip(col).for_each(|(a, b)| *a += b),
            // the unit's `[group, k_len]` into heads kh·group.., keys 0..k_len
            Sums::PerHead => {
                for (g, part) in col.chunks(tile.k_len.max(1)).enumerate() {
                    let at = (kh * shape.group + g) * t;
                    let dst = &mut key_sums[at..at + part.len()];
                    dst.iter_mut().zip(part).for_each(|(a, b)| *a += b);
                }
            }
        }
        let nb = tile.q_end - tile.q_start;
        for g in 0..shape.group {
            for i in 0..nb {
                let at = (tile.q_start + i) * num_heads * d + (kh * shape.group + g) * d;
                out[at..at + d].copy_from_slice(&o[(g * nb + i) * d..][..d]);
            }
        }
    }
    Ok((
        Tensor::from_vec(out, (n, num_heads * d), &Device::Cpu)?,
        key_sums,
    ))
}

/// What one call's products read: the K and V rows as they are (f32, or a decode mirror's
/// bf16 rows, whose products are f32 over rows widened as they load), or their bf16 packing
/// (`bf16dot`), chosen once per call.
#[derive(Clone, Copy)]
enum Operands<'a> {
    F32(Strided<'a, f32>),
    Bf16Rows(Strided<'a, bf16>),
    Bf16(&'a PackedKv),
}

/// K and V rows in place: key (value) `c` of KV head `kh` starts at `kh·head + c·row`.
#[derive(Clone, Copy)]
struct Strided<'a, T> {
    k: &'a [T],
    v: &'a [T],
    row: usize,
    head: usize,
}

impl<'a, T> Strided<'a, T> {
    /// Keys of head `kh` from key `k0` on.
    fn keys(&self, kh: usize, k0: usize) -> &'a [T] {
        &self.k[kh * self.head + k0 * self.row..]
    }

    /// Values of head `kh` from value `k0` on.
    fn values(&self, kh: usize, k0: usize) -> &'a [T] {
        &self.v[kh * self.head + k0 * self.row..]
    }
}

/// One unit's two products over key tiles: its scaled queries in the operands' precision
/// and, for bf16, the probability tile's pairs.
struct UnitProducts<'a> {
    ops: Operands<'a>,
    s: Shape,
    kh: usize,
    rows: usize,
    /// `[rows, d]` f32, scaled (see [`scaled_queries`]); empty for bf16 products.
    q: Vec<f32>,
    /// `[rows, d / 2]` bf16 pairs of the same; empty for f32 products.
    q_pairs: Vec<u32>,
    /// `[rows, KEY_TILE / 2]` bf16 pairs of the probability tile (bf16 products only).
    p_pairs: Vec<u32>,
}

impl<'a> UnitProducts<'a> {
    fn new(ops: Operands<'a>, s: Shape, kh: usize, tile: QueryTile, q: &[f32]) -> Self {
        let rows = s.group * (tile.q_end - tile.q_start);
        let qt = scaled_queries(s, kh, tile, q);
        match ops {
            Operands::F32(_) | Operands::Bf16Rows(_) => Self {
                ops,
                s,
                kh,
                rows,
                q: qt,
                q_pairs: Vec::new(),
                p_pairs: Vec::new(),
            },
            Operands::Bf16(_) => Self {
                ops,
                s,
                kh,
                rows,
                q: Vec::new(),
                q_pairs: bf16dot::pairs_of_rows(&qt, rows, s.d),
                p_pairs: vec![0; rows * KEY_TILE / 2],
            },
        }
    }

    /// The score tile (row stride `KEY_TILE`) of keys `k0..k0 + w`.
    fn scores(&self, k0: usize, w: usize, scores: &mut [f32]) {
        let d = self.s.d;
        match self.ops {
            Operands::F32(kv) => score_tile(
                scores,
                &self.q,
                kv.keys(self.kh, k0),
                self.rows,
                w,
                d,
                kv.row,
            ),
            Operands::Bf16Rows(kv) => {
                few_rows(self.rows, w, d, kv.row).scores(scores, &self.q, kv.keys(self.kh, k0))
            }
            Operands::Bf16(packed) => {
                packed.scores(self.kh, k0, w, &self.q_pairs, self.rows, scores, KEY_TILE)
            }
        }
    }

    /// One row's online-softmax step over the score tile's keys `0..w`, of which it sees
    /// `0..visible`: its probabilities relative to `m = max(m_old, its scores)` (in the score
    /// tile for f32 products, as bf16 pairs for bf16 ones), the rest zero. Returns `m` and
    /// the probabilities' sum, or `None` when the row sees none of these keys.
    fn probabilities(
        &mut self,
        r: usize,
        scores: &mut [f32],
        w: usize,
        visible: usize,
        m_old: f32,
    ) -> Option<(f32, f32)> {
        let row = &mut scores[r * KEY_TILE..r * KEY_TILE + w];
        match self.ops {
            Operands::F32(_) | Operands::Bf16Rows(_) => {
                row[visible..].fill(0.0);
                if visible == 0 {
                    return None;
                }
                let seen = &mut row[..visible];
                let m = m_old.max(max_of(seen));
                Some((m, exp2_in_place(seen, m)))
            }
            Operands::Bf16(_) => {
                let pairs = &mut self.p_pairs[r * KEY_TILE / 2..][..KEY_TILE / 2];
                if visible == 0 {
                    pairs[..w.div_ceil(2)].fill(0);
                    return None;
                }
                Some(bf16dot::probabilities_to_pairs(
                    &row[..visible],
                    m_old,
                    w,
                    pairs,
                ))
            }
        }
    }

    /// `out += P V` for the keys `k0..k0 + w` after [`Self::probabilities`] of every row: the
    /// probability tile `p` (row stride `KEY_TILE`) for f32 products, the pairs for bf16.
    fn add_weighted(&mut self, k0: usize, w: usize, p: &[f32], out: &mut [f32]) {
        let d = self.s.d;
        match self.ops {
            Operands::F32(kv) => {
                add_weighted(out, p, kv.values(self.kh, k0), self.rows, w, d, kv.row)
            }
            Operands::Bf16Rows(kv) => {
                few_rows(self.rows, w, d, kv.row).add_weighted(out, p, kv.values(self.kh, k0))
            }
            Operands::Bf16(packed) => {
                packed.add_weighted(self.kh, k0, w, &self.p_pairs, KEY_TILE / 2, self.rows, out);
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Shape {
    num_heads: usize,
    group: usize,
    d: usize,
}

fn contiguous_f32(x: &Tensor) -> Result<Tensor> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return Err(invalid_input(format!(
            "tiled attention takes f32 on the CPU, got {:?} on {:?}",
            x.dtype(),
            x.device()
        )));
    }
    Ok(x.contiguous()?)
}

/// The K and V of one call on the host: f32, or bf16 (a decode mirror's rows).
#[derive(Clone, Copy)]
enum Slices<'a> {
    F32(&'a [f32], &'a [f32]),
    Bf16(&'a [bf16], &'a [bf16]),
}

/// Runs `f` over the contents of three contiguous CPU tensors: `q` f32, `k` and `v` both f32
/// or both bf16.
fn with_slices<R>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    f: impl FnOnce(&[f32], Slices<'_>) -> R,
) -> Result<R> {
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    fn slice<'a, T: candle_core::WithDType>(
        s: &'a candle_core::CpuStorage,
        l: &candle_core::Layout,
        len: usize,
    ) -> candle_core::Result<&'a [T]> {
        Ok(&s.as_slice::<T>()?[l.start_offset()..l.start_offset() + len])
    }
    match (&*qs, &*ks, &*vs) {
        (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) => {
            let (kn, vn) = (k.elem_count(), v.elem_count());
            let kv = match k.dtype() {
                DType::BF16 => Slices::Bf16(slice(ks, kl, kn)?, slice(vs, vl, vn)?),
                _ => Slices::F32(slice(ks, kl, kn)?, slice(vs, vl, vn)?),
            };
            Ok(f(slice(qs, ql, q.elem_count())?, kv))
        }
        _ => Err(invalid_input("tiled attention takes CPU tensors")),
    }
}

/// Units with few of them per thread, each cut into parts of [`SPLIT_KEYS`] keys run on
/// rayon's pool, then merged per unit: the same results as [`unit`], up to the order of the
/// sums. With `sums`, a unit of a few f32 rows keeps its parts' probabilities ([`Kept`])
/// and adds them once the merged maxima and sums are known; any other unit sweeps its
/// parts a second time then, in parallel too (each part adds its own keys' sums).
fn split_units(
    plan: &TiledPlan,
    s: Shape,
    units: &[(usize, QueryTile)],
    q: &[f32],
    ops: Operands<'_>,
    sums: Sums,
) -> Vec<(Vec<f32>, Vec<f32>)> {
    let parts: Vec<(usize, std::ops::Range<usize>)> = units
        .iter()
        .enumerate()
        .flat_map(|(u, (_, tile))| {
            (0..tile.k_len.div_ceil(SPLIT_KEYS).max(1))
                .map(move |p| (u, p * SPLIT_KEYS..((p + 1) * SPLIT_KEYS).min(tile.k_len)))
        })
        .collect();
    let keeps = |u: usize| sums != Sums::None && keeps_probabilities(s, units[u].1, ops);
    let partials: Vec<(Partial, Option<Kept>)> = parts
        .par_iter()
        .map(|(u, keys)| {
            let (kh, tile) = units[*u];
            let mut products = UnitProducts::new(ops, s, kh, tile, q);
            let mut kept = keeps(*u).then(|| Kept::new(products.rows, keys.clone()));
            let p = partial(plan, tile, &mut products, keys.clone(), kept.as_mut());
            (p, kept)
        })
        .collect();
    let mut merged: Vec<Option<Partial>> = (0..units.len()).map(|_| None).collect();
    let mut kept: Vec<Vec<Kept>> = (0..units.len()).map(|_| Vec::new()).collect();
    for ((u, _), (p, k)) in parts.iter().zip(partials) {
        merged[*u] = Some(match merged[*u].take() {
            None => p,
            Some(acc) => acc.merge(p, s.d),
        });
        kept[*u].extend(k);
    }
    let finished: Vec<Option<Finished>> = merged
        .into_iter()
        .map(|p| p.map(|p| p.finished(s.d)))
        .collect();
    if sums == Sums::None {
        return finished
            .into_iter()
            .map(|f| f.map(|f| (f.out, Vec::new())).unwrap_or_default())
            .collect();
    }
    // the second sweeps, part by part, over keys whose rows' maxima and sums are final
    let swept: Vec<Option<Vec<f32>>> = parts
        .par_iter()
        .map(|(u, keys)| {
            let f = finished[*u].as_ref().filter(|_| !keeps(*u))?;
            let (kh, tile) = units[*u];
            let mut products = UnitProducts::new(ops, s, kh, tile, q);
            Some(sweep_sums(plan, tile, &mut products, keys.clone(), f, sums))
        })
        .collect();
    let mut cols: Vec<Vec<f32>> = units
        .iter()
        .map(|(_, tile)| vec![0f32; sum_columns(s, sums) * tile.k_len])
        .collect();
    for ((u, keys), local) in parts.iter().zip(swept) {
        let Some(local) = local else { continue };
        let k_len = units[*u].1.k_len;
        for (c, part) in local.chunks(keys.len().max(1)).enumerate() {
            cols[*u][c * k_len + keys.start..][..part.len()].copy_from_slice(part);
        }
    }
    for (u, kept) in kept.iter().enumerate() {
        let Some(f) = &finished[u] else { continue };
        for part in kept {
            part.add_sums(f, units[u].1, sums, &mut cols[u]);
        }
    }
    finished
        .into_iter()
        .zip(cols)
        .map(|(f, col)| f.map(|f| (f.out, col)).unwrap_or_default())
        .collect()
}

/// Whether a unit's sweep keeps its probabilities for the sums ([`Kept`]) rather than
/// sweeping its keys a second time: a few f32 rows' (a decode step's), whose probabilities
/// take little room and are at hand (the bf16 products keep them as pairs instead).
fn keeps_probabilities(s: Shape, tile: QueryTile, ops: Operands<'_>) -> bool {
    s.group * (tile.q_end - tile.q_start) <= FEW_ROWS && !matches!(ops, Operands::Bf16(_))
}

/// Columns of a unit's sums: one per query head of its group (`Sums::PerHead`), one in all
/// (`Sums::Total`), none without sums.
fn sum_columns(s: Shape, sums: Sums) -> usize {
    match sums {
        Sums::None => 0,
        Sums::Total => 1,
        Sums::PerHead => s.group,
    }
}

/// A unit's final softmax state: its output, and each row's maximum (base 2) and 1 / sum,
/// what its probabilities are relative to.
struct Finished {
    out: Vec<f32>,
    row_max: Vec<f32>,
    inv: Vec<f32>,
}

/// The second sweep of a unit's keys `keys` (all of them, or a split unit's part): each
/// row's probabilities, now that its maximum and sum are final (`f`), summed per key;
/// returns `[columns, keys.len()]` ([`sum_columns`]; per head, column `g` for query head
/// `kh·group + g`).
fn sweep_sums(
    plan: &TiledPlan,
    tile: QueryTile,
    products: &mut UnitProducts<'_>,
    keys: std::ops::Range<usize>,
    f: &Finished,
    sums: Sums,
) -> Vec<f32> {
    let nb = tile.q_end - tile.q_start;
    let rows = products.rows;
    let len = keys.len();
    let per_head = sums == Sums::PerHead;
    let mut col = vec![0f32; sum_columns(products.s, sums) * len];
    // rows are (g, i): query head kh·group + g, query tile.q_start + i
    let mut scores = vec![0f32; rows * KEY_TILE];
    let mut k0 = keys.start;
    while k0 < keys.end {
        let w = KEY_TILE.min(keys.end - k0);
        products.scores(k0, w, &mut scores);
        for r in 0..rows {
            let visible = visible_keys(plan, tile, k0, w, r % nb);
            let seen = &mut scores[r * KEY_TILE..r * KEY_TILE + visible];
            exp2_in_place(seen, f.row_max[r]);
            let at = if per_head { (r / nb) * len } else { 0 } + (k0 - keys.start);
            for (c, p) in col[at..at + visible].iter_mut().zip(seen.iter()) {
                *c += p * f.inv[r];
            }
        }
        k0 += w;
    }
    col
}

/// One unit's online-softmax state over some of its keys: output not yet divided by the row
/// sums, each row's running maximum (base 2) and sum relative to it.
struct Partial {
    out: Vec<f32>,
    max: Vec<f32>,
    sum: Vec<f32>,
}

impl Partial {
    /// The final state: the output divided by the row sums, the maxima and 1 / the sums.
    fn finished(mut self, d: usize) -> Finished {
        let inv = self.sum.iter().map(|s| 1.0 / s).collect();
        let row_max = std::mem::take(&mut self.max);
        Finished {
            out: self.normalised(d),
            row_max,
            inv,
        }
    }

    /// The state over both parts' keys.
    fn merge(mut self, other: Partial, d: usize) -> Partial {
        for r in 0..self.max.len() {
            let m = self.max[r].max(other.max[r]);
            if m == f32::NEG_INFINITY {
                continue; // neither part saw a key for this row
            }
            let (a, b) = ((self.max[r] - m).exp2(), (other.max[r] - m).exp2());
            self.sum[r] = self.sum[r] * a + other.sum[r] * b;
            self.max[r] = m;
            let (o, p) = (
                &mut self.out[r * d..(r + 1) * d],
                &other.out[r * d..(r + 1) * d],
            );
            o.iter_mut().zip(p).for_each(|(x, y)| *x = *x * a + y * b);
        }
        self
    }

    /// The attention output, each row divided by its sum.
    fn normalised(mut self, d: usize) -> Vec<f32> {
        for (o, s) in self.out.chunks_exact_mut(d).zip(&self.sum) {
            let inv = 1.0 / s;
            o.iter_mut().for_each(|x| *x *= inv);
        }
        self.out
    }
}

/// A unit's queries `[group * nb, d]`, row `g * nb + i` for query `q_start + i` of head
/// `kh * group + g`, scaled so that scores come out in base 2: exp(x / √d) = 2^(x log2(e) / √d).
fn scaled_queries(s: Shape, kh: usize, tile: QueryTile, q: &[f32]) -> Vec<f32> {
    let nb = tile.q_end - tile.q_start;
    let d = s.d;
    let scale = std::f32::consts::LOG2_E / (d as f32).sqrt();
    let mut qt = vec![0f32; s.group * nb * d];
    for g in 0..s.group {
        for i in 0..nb {
            let src = (tile.q_start + i) * s.num_heads * d + (kh * s.group + g) * d;
            for (o, x) in qt[(g * nb + i) * d..][..d].iter_mut().zip(&q[src..src + d]) {
                *o = x * scale;
            }
        }
    }
    qt
}

/// One KV head × one query tile: returns `[group * nb, d]`, row `g * nb + i` for query
/// `q_start + i` of head `kh * group + g`; with `sums`, also the unit's probabilities summed
/// per key over its rows, `[k_len]` (`Sums::Total`) or `[group, k_len]` (`Sums::PerHead`;
/// empty without sums).
fn unit(
    plan: &TiledPlan,
    s: Shape,
    kh: usize,
    tile: QueryTile,
    q: &[f32],
    ops: Operands<'_>,
    sums: Sums,
) -> (Vec<f32>, Vec<f32>) {
    let mut products = UnitProducts::new(ops, s, kh, tile, q);
    // a few f32 rows (a decode step's) keep their probabilities from the first sweep
    let mut kept = (sums != Sums::None && keeps_probabilities(s, tile, ops))
        .then(|| Kept::new(products.rows, 0..tile.k_len));
    let state = partial(plan, tile, &mut products, 0..tile.k_len, kept.as_mut());
    if sums == Sums::None {
        return (state.normalised(s.d), Vec::new());
    }
    let f = state.finished(s.d);
    let col = match kept {
        Some(kept) => {
            let mut col = vec![0f32; sum_columns(s, sums) * tile.k_len];
            kept.add_sums(&f, tile, sums, &mut col);
            col
        }
        // second sweep: the keys' sums once every row's maximum and sum are final
        None => sweep_sums(plan, tile, &mut products, 0..tile.k_len, &f, sums),
    };
    (f.out, col)
}

/// A sweep's probabilities over keys `start..start + k_len` (a whole unit's, or a split
/// unit's part: whole key tiles) as it left them, for the per-key sums without a second
/// sweep: row `r`'s over key `start + c` in `p[r · k_len + c]`, relative to the row's
/// running max (its part's) when its key tile was seen (`tile_max[r · tiles + tile]`; −∞
/// where the row saw none of the tile, whose probabilities are 0). Only f32 probabilities
/// are kept (not the bf16 products' pairs).
struct Kept {
    start: usize,
    k_len: usize,
    tiles: usize,
    p: Vec<f32>,
    tile_max: Vec<f32>,
}

impl Kept {
    /// Room for `rows` rows over `keys` (starting on a key tile).
    fn new(rows: usize, keys: std::ops::Range<usize>) -> Self {
        let k_len = keys.len();
        let tiles = k_len.div_ceil(KEY_TILE);
        Self {
            start: keys.start,
            k_len,
            tiles,
            p: vec![0.0; rows * k_len],
            tile_max: vec![f32::NEG_INFINITY; rows * tiles],
        }
    }

    /// Records the score tile's probabilities of keys `k0..k0 + w` (row stride `KEY_TILE`)
    /// and each row's max they are relative to.
    fn record(&mut self, k0: usize, w: usize, scores: &[f32], row_max: &[f32]) {
        let local = k0 - self.start;
        let tile = local / KEY_TILE;
        for (r, m) in row_max.iter().enumerate() {
            self.p[r * self.k_len + local..][..w].copy_from_slice(&scores[r * KEY_TILE..][..w]);
            self.tile_max[r * self.tiles + tile] = *m;
        }
    }

    /// Adds each row's final probabilities (relative to `f`, the unit's final state over
    /// all its keys) into the unit's `sums` (`[columns, k_len]` of `tile`'s keys).
    fn add_sums(&self, f: &Finished, tile: QueryTile, sums: Sums, col: &mut [f32]) {
        let nb = tile.q_end - tile.q_start;
        for (r, (&m, &inv)) in f.row_max.iter().zip(&f.inv).enumerate() {
            let base = if sums == Sums::PerHead {
                (r / nb) * tile.k_len
            } else {
                0
            };
            for tile in 0..self.tiles {
                let seen = self.tile_max[r * self.tiles + tile];
                if seen == f32::NEG_INFINITY {
                    continue;
                }
                let f = (seen - m).exp2() * inv;
                let k0 = tile * KEY_TILE;
                let w = KEY_TILE.min(self.k_len - k0);
                let p = &self.p[r * self.k_len + k0..][..w];
                for (c, p) in col[base + self.start + k0..][..w].iter_mut().zip(p) {
                    *c += p * f;
                }
            }
        }
    }
}

/// The online-softmax state of one unit over keys `keys` (a whole unit: `0..k_len`; a
/// split unit's part: a range of whole key tiles), through the unit's `products`; with
/// `kept` (made for `keys`), each tile's probabilities recorded in it.
fn partial(
    plan: &TiledPlan,
    tile: QueryTile,
    products: &mut UnitProducts<'_>,
    keys: std::ops::Range<usize>,
    mut kept: Option<&mut Kept>,
) -> Partial {
    let nb = tile.q_end - tile.q_start;
    let rows = products.rows;
    let d = products.s.d;
    let mut out = vec![0f32; rows * d];
    let mut row_max = vec![f32::NEG_INFINITY; rows];
    let mut row_sum = vec![0f32; rows];
    let mut scores = vec![0f32; rows * KEY_TILE];
    let mut k0 = keys.start;
    while k0 < keys.end {
        let w = KEY_TILE.min(keys.end - k0);
        products.scores(k0, w, &mut scores);
        for r in 0..rows {
            let visible = visible_keys(plan, tile, k0, w, r % nb);
            let Some((m_new, sum)) = products.probabilities(r, &mut scores, w, visible, row_max[r])
            else {
                continue; // nothing seen here; the row's state is unchanged
            };
            let alpha = (row_max[r] - m_new).exp2(); // 0 on the first tile (max was -inf)
            row_sum[r] = row_sum[r] * alpha + sum;
            row_max[r] = m_new;
            if alpha != 1.0 {
                out[r * d..(r + 1) * d].iter_mut().for_each(|o| *o *= alpha);
            }
        }
        if let Some(kept) = kept.as_deref_mut() {
            kept.record(k0, w, &scores, &row_max);
        }
        products.add_weighted(k0, w, &scores, &mut out);
        k0 += w;
    }
    Partial {
        out,
        max: row_max,
        sum: row_sum,
    }
}

/// `S[rows, w] = Qt[rows, d] · K[.., kh, :]ᵀ` into the score tile (row stride `KEY_TILE`):
/// `kt` starts at the tile's first key of this KV head, rows `kv_stride` apart.
fn score_tile(
    scores: &mut [f32],
    qt: &[f32],
    kt: &[f32],
    rows: usize,
    w: usize,
    d: usize,
    kv_stride: usize,
) {
    assert!(scores.len() >= rows * KEY_TILE && w <= KEY_TILE && qt.len() >= rows * d);
    assert!(w == 0 || kt.len() >= (w - 1) * kv_stride + d);
    if rows <= FEW_ROWS {
        return few_rows(rows, w, d, kv_stride).scores(scores, qt, kt);
    }
    // SAFETY: dst has rows × KEY_TILE elements (row stride KEY_TILE ≥ w); lhs is rows × d
    // with row stride d; rhs element (x, c) is kt[c * kv_stride + x], and the last one read,
    // (d-1, w-1), lies within kt (asserted above). No aliasing: dst is our own.
    unsafe {
        gemm::gemm(
            rows,
            w,
            d,
            scores.as_mut_ptr(),
            1,
            KEY_TILE as isize,
            false,
            qt.as_ptr(),
            1,
            d as isize,
            kt.as_ptr(),
            kv_stride as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The row-by-row products of a tile (score rows `KEY_TILE` apart).
fn few_rows(rows: usize, w: usize, d: usize, kv_stride: usize) -> FewRows {
    FewRows {
        rows,
        w,
        d,
        kv_stride,
        score_stride: KEY_TILE,
    }
}

/// `out[rows, d] += P[rows, w] · V` for the probability tile `p` (row stride `KEY_TILE`) and
/// `vt` starting at the tile's first value of this KV head, rows `kv_stride` apart.
fn add_weighted(
    out: &mut [f32],
    p: &[f32],
    vt: &[f32],
    rows: usize,
    w: usize,
    d: usize,
    kv_stride: usize,
) {
    assert!(p.len() >= rows * KEY_TILE && w <= KEY_TILE && out.len() >= rows * d);
    assert!(w == 0 || vt.len() >= (w - 1) * kv_stride + d);
    if rows <= FEW_ROWS {
        return few_rows(rows, w, d, kv_stride).add_weighted(out, p, vt);
    }
    // SAFETY: dst is rows × d with row stride d (asserted above); lhs is the probability
    // tile (row stride KEY_TILE, w columns); rhs element (c, x) is vt[c * kv_stride + x],
    // the last one, (w-1, d-1), within vt (asserted above).
    unsafe {
        gemm::gemm(
            rows,
            d,
            w,
            out.as_mut_ptr(),
            1,
            d as isize,
            true,
            p.as_ptr(),
            1,
            KEY_TILE as isize,
            vt.as_ptr(),
            1,
            kv_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Keys of the tile `k0..k0 + w` that query `i` of `tile` sees (a prefix of the tile).
fn visible_keys(plan: &TiledPlan, tile: QueryTile, k0: usize, w: usize, i: usize) -> usize {
    if k0 + w <= tile.k_free {
        return w;
    }
    let qp = plan.q_pos[tile.q_start + i];
    plan.k_pos[k0..k0 + w].partition_point(|&p| p <= qp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::tests::naive;
    use proptest::prelude::*;

    /// Strictly increasing positions: `len` of them from `start`, with random gaps.
    fn increasing(start: u32, gaps: &[u32]) -> Vec<u32> {
        let mut p = start;
        gaps.iter()
            .map(|g| {
                let at = p;
                p += 1 + g;
                at
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Random GQA shapes, keys with holes, sparse or contiguous queries, one key, lengths
        /// across tile boundaries: against an f64 naive softmax, no worse than twice the
        /// reference attention's f32 error on the same inputs.
        #[test]
        fn matches_naive_on_random_shapes(
            (kv_heads, group) in (1usize..4, 1usize..5),
            d in prop::sample::select(vec![4usize, 16, 64]),
            key_gaps in prop::collection::vec(prop::sample::select(vec![0u32, 0, 0, 1, 3]), 1..600),
            k_start in 0u32..50,
            picks in prop::collection::vec(any::<bool>(), 1..600),
            sparse in any::<bool>(),
            seed_scale in 0.5f64..3.0,
        ) {
            let kp = increasing(k_start, &key_gaps);
            let last = *kp.last().unwrap();
            // queries: a subset of [k_start, last + 3], always including the first key's position
            let mut qp: Vec<u32> = (k_start..=last + 3)
                .zip(picks.iter().cycle())
                .filter(|&(p, &keep)| p == k_start || !sparse || keep)
                .map(|(p, _)| p)
                .collect();
            qp.truncate(700);
            let h = kv_heads * group;
            let dev = Device::Cpu;
            let q = (Tensor::randn(0f32, 1.0, (qp.len(), h, d), &dev).unwrap() * seed_scale).unwrap();
            let k = (Tensor::randn(0f32, 1.0, (kp.len(), kv_heads, d), &dev).unwrap() * seed_scale).unwrap();
            let v = Tensor::randn(0f32, 1.0, (kp.len(), kv_heads, d), &dev).unwrap();
            let plan = TiledPlan::new(&qp, &kp, CpuAttentionPrecision::F32).unwrap();
            let got = attend(&plan, &q, &k, &v).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = naive(&q, &k, &v, &qp, &kp);
            // the reference attention in f32 on the same inputs sets the tolerance
            let rotated_plan = crate::attention::AttentionPlan::new(
                &qp, &kp, h, 1 << 16, DType::F32, &dev, None, None,
            ).unwrap();
            let reference = crate::attention::attend(&rotated_plan, &q, &k, &v, None)
                .unwrap()
                .out
                .flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let max_err = |x: &[f32]| x.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            let (ours, theirs) = (max_err(&got), max_err(&reference));
            // 1e-5 absolute: f32 summation-order noise (a 2e-6 floor failed once in ~50 CI runs at 5.2e-6)
            prop_assert!(ours <= 2.0 * theirs + 1e-5, "tiled error {} vs reference {}", ours, theirs);
            prop_assert!(ours < 1e-4, "tiled error {}", ours);
            // the summed probe: the same output, and each key's probability summed over
            // every query and head against f64
            let (out, sums) = attend_summed(&plan, &q, &k, &v).unwrap();
            prop_assert_eq!(out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), got);
            let sums = sums.to_vec1::<f32>().unwrap();
            let want = naive_key_sums(&q, &k, &qp, &kp);
            for (j, (g, w)) in sums.iter().zip(&want).enumerate() {
                prop_assert!(
                    ((*g as f64) - w).abs() <= 1e-5 * w.max(1.0),
                    "key {}: {} vs {}", j, g, w
                );
            }
        }
    }

    /// Each key's softmax probability summed over every query and head, in f64 (`q`, `k`
    /// rotated; query head `h` reads KV head `h / group`).
    fn naive_key_sums(q: &Tensor, k: &Tensor, qp: &[u32], kp: &[u32]) -> Vec<f64> {
        let per_head = naive_head_sums(q, k, qp, kp);
        (0..kp.len())
            .map(|j| per_head.iter().map(|h| h[j]).sum())
            .collect()
    }

    /// Each key's probability summed over every query row, per query head: `[h][keys]`.
    fn naive_head_sums(q: &Tensor, k: &Tensor, qp: &[u32], kp: &[u32]) -> Vec<Vec<f64>> {
        let (n, h, d) = q.dims3().unwrap();
        let kvh = k.dims()[1];
        let q = q.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let k = k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut sums = vec![vec![0f64; kp.len()]; h];
        for i in 0..n {
            let seen = kp.partition_point(|&p| p <= qp[i]);
            for head in 0..h {
                let kh = head / (h / kvh);
                let qr = &q[(i * h + head) * d..][..d];
                let s: Vec<f64> = (0..seen)
                    .map(|j| {
                        let kr = &k[(j * kvh + kh) * d..][..d];
                        qr.iter()
                            .zip(kr)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for (j, x) in s.iter().enumerate() {
                    sums[head][j] += (x - m).exp() / z;
                }
            }
        }
        sums
    }

    /// Per-head sums ([`attend_head_summed`]) equal the naive per-head probabilities summed
    /// over the rows, token-major and over a decode mirror's rows by head (f32 and bf16,
    /// with room past the keys), and the output equals [`attend`]'s bit for bit: below
    /// `SPLIT_KEYS` keys, where neither call splits a unit, and above, where both split
    /// (a decode step's parts keeping their probabilities, a few queries' sweeping again).
    #[test]
    fn head_sums_match_naive() {
        let dev = Device::Cpu;
        let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let round = |x: &Tensor| {
            x.to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        };
        // groups of 3 and 2: a decode step's units keep their probabilities (`Kept`) with one
        // query and, for the group of 2, with 3 queries per unit too
        // 771 keys: no unit splits; 2,229: the decode-like calls split their units in parts
        for ((h, kvh, d), keys) in [(9, 3, 64), (4, 2, 16)]
            .into_iter()
            .flat_map(|shape| [(shape, 900u32), (shape, 2600)])
        {
            let kp: Vec<u32> = (0..keys).filter(|p| p % 7 != 3).collect();
            let last = *kp.last().unwrap();
            let long: Vec<u32> = (0..last + 2).filter(|p| p % 5 != 1).collect();
            let mut calls = vec![vec![last + 1], vec![40, last - 2, last + 1]];
            if kp.len() < SPLIT_KEYS {
                calls.push(long);
            }
            for qp in calls {
                let q = Tensor::randn(0f32, 1.0, (qp.len(), h, d), &dev).unwrap();
                let k = Tensor::randn(0f32, 1.0, (kp.len(), kvh, d), &dev).unwrap();
                let v = Tensor::randn(0f32, 1.0, (kp.len(), kvh, d), &dev).unwrap();
                let plan = TiledPlan::new(&qp, &kp, CpuAttentionPrecision::F32).unwrap();
                let check = |sums: &Tensor, k: &Tensor, what: &str| {
                    let want = naive_head_sums(&q, k, &qp, &kp);
                    assert_eq!(sums.dims(), &[kvh, h / kvh, kp.len()], "{what}");
                    let got = flat(sums);
                    for (head, row) in want.iter().enumerate() {
                        for (j, w) in row.iter().enumerate() {
                            let g = got[head * kp.len() + j] as f64;
                            assert!(
                                (g - w).abs() < 2e-4,
                                "{what}: head {head} key {j}: {g} vs {w}"
                            );
                        }
                    }
                };
                let (out, sums) = attend_head_summed(&plan, &q, &k, &v, false).unwrap();
                // (the unprobed call splits the same units into the same parts)
                assert_eq!(flat(&out), flat(&attend(&plan, &q, &k, &v).unwrap()));
                check(&sums, &k, &format!("token-major, {} queries", qp.len()));
                if !reads_by_head(&plan, h / kvh) {
                    continue;
                }
                // a decode mirror's rows, [kv_heads, capacity, d] with room, f32 and bf16
                for dtype in [DType::F32, DType::BF16] {
                    let by_head = |x: &Tensor| {
                        let room = Tensor::zeros((kvh, kp.len() + 50, d), dtype, &dev).unwrap();
                        let rows = x.to_dtype(dtype).unwrap().transpose(0, 1).unwrap();
                        room.slice_set(&rows.contiguous().unwrap(), 1, 0).unwrap();
                        room
                    };
                    let (out, sums) =
                        attend_head_summed(&plan, &q, &by_head(&k), &by_head(&v), true).unwrap();
                    let plain = attend_by_head(&plan, &q, &by_head(&k), &by_head(&v)).unwrap();
                    assert_eq!(flat(&out), flat(&plain));
                    // bf16 rows: the sums of the rounded keys' probabilities
                    let seen = if dtype == DType::BF16 {
                        round(&k)
                    } else {
                        k.clone()
                    };
                    check(
                        &sums,
                        &seen,
                        &format!("by head {dtype:?}, {} queries", qp.len()),
                    );
                }
            }
        }
    }

    /// A call long enough for the larger query tiles, keys with holes.
    #[test]
    fn long_calls_match_naive() {
        let kp: Vec<u32> = (0..2300u32).filter(|p| p % 7 != 3).collect();
        let qp: Vec<u32> = (0..2300u32).filter(|p| p % 11 != 5).collect();
        assert!(qp.len() >= LONG_CALL);
        let (h, kvh, d) = (4, 2, 8);
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (qp.len(), h, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (kp.len(), kvh, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (kp.len(), kvh, d), &dev).unwrap();
        let plan = TiledPlan::new(&qp, &kp, CpuAttentionPrecision::F32).unwrap();
        assert!(
            plan.tiles
                .iter()
                .any(|t| t.q_end - t.q_start > SHORT_QUERY_TILE)
        );
        let got = attend(&plan, &q, &k, &v).unwrap().flatten_all().unwrap();
        let want = naive(&q, &k, &v, &qp, &kp);
        for (a, b) in got.to_vec1::<f32>().unwrap().iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    /// Sparse queries over many keys (blend's recomputed rows): tiles fill up to their query
    /// count over wider spans, bounded by a sixteenth of the keys their first query sees, and
    /// the output and per-key sums still match the naive ones.
    #[test]
    fn sparse_queries_fill_wider_tiles_and_match_naive() {
        let kp: Vec<u32> = (0..3000u32).filter(|p| p % 13 != 7).collect();
        // every third position (blend at r ~0.3) and the last 8 (the question)
        let qp: Vec<u32> = kp
            .iter()
            .copied()
            .filter(|p| p % 3 == 1 || *p >= 2990)
            .collect();
        let plan = TiledPlan::new(&qp, &kp, CpuAttentionPrecision::F32).unwrap();
        let mut wider = 0;
        for t in &plan.tiles {
            let span = (qp[t.q_end - 1] - qp[t.q_start]) as usize;
            let seen = kp.partition_point(|&p| p <= qp[t.q_start]);
            assert!(span < SHORT_QUERY_TILE.max(seen / SPAN_PER_KEYS), "{t:?}");
            assert!(t.q_end - t.q_start <= SHORT_QUERY_TILE);
            wider += usize::from(span >= SHORT_QUERY_TILE);
        }
        // a span of 64 positions holds ~21 of these queries; the later tiles hold more
        assert!(
            wider >= plan.tiles.len() / 3,
            "{wider} of {}",
            plan.tiles.len()
        );
        let fullest = plan.tiles.iter().map(|t| t.q_end - t.q_start).max();
        assert!(fullest >= Some(40), "{fullest:?}");
        let (h, kvh, d) = (6, 2, 16);
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (qp.len(), h, d), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (kp.len(), kvh, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (kp.len(), kvh, d), &dev).unwrap();
        let (got, sums) = attend_summed(&plan, &q, &k, &v).unwrap();
        let want = naive(&q, &k, &v, &qp, &kp);
        for (a, b) in got
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .zip(&want)
        {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let want_sums = naive_key_sums(&q, &k, &qp, &kp);
        for (a, b) in sums.to_vec1::<f32>().unwrap().iter().zip(&want_sums) {
            assert!(
                (*a as f64 - b).abs() < 1e-4 * b.abs().max(1.0),
                "{a} vs {b}"
            );
        }
    }

    /// Units of at most [`FEW_ROWS`] rows (a decode step, a short question over few heads)
    /// take the row-by-row products: outputs and per-key sums as the naive softmax's.
    #[test]
    fn few_row_units_match_naive() {
        let kp: Vec<u32> = (0..1300u32).filter(|p| p % 7 != 3).collect();
        let last = *kp.last().unwrap();
        let (h, kvh, d) = (6, 2, 64);
        let dev = Device::Cpu;
        for qp in [vec![last + 1], vec![40, 600, last]] {
            let q = Tensor::randn(0f32, 1.0, (qp.len(), h, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (kp.len(), kvh, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (kp.len(), kvh, d), &dev).unwrap();
            let plan = TiledPlan::new(&qp, &kp, CpuAttentionPrecision::F32).unwrap();
            assert!(
                plan.tiles
                    .iter()
                    .all(|t| (t.q_end - t.q_start) * h / kvh <= FEW_ROWS)
            );
            let (got, sums) = attend_summed(&plan, &q, &k, &v).unwrap();
            let want = naive(&q, &k, &v, &qp, &kp);
            let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{qp:?}: {a} vs {b}");
            }
            let want_sums = naive_key_sums(&q, &k, &qp, &kp);
            for (a, b) in sums.to_vec1::<f32>().unwrap().iter().zip(&want_sums) {
                assert!((*a as f64 - b).abs() < 1e-5, "{qp:?}: sum {a} vs {b}");
            }
        }
    }

    /// Decode steps and short question passes over long caches (one unit per KV head) cut
    /// each unit's keys into parts and merge them: still the naive softmax, including a
    /// query that sees only the first part's keys.
    #[test]
    fn split_units_match_naive() {
        let kp: Vec<u32> = (0..3400u32).filter(|p| p % 9 != 4).collect();
        let last = *kp.last().unwrap();
        let (h, kvh, d) = (4, 1, 16);
        let dev = Device::Cpu;
        for qp in [vec![last + 1], vec![700, last - 3, last, last + 2], vec![5]] {
            let q = Tensor::randn(0f32, 1.0, (qp.len(), h, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (kp.len(), kvh, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (kp.len(), kvh, d), &dev).unwrap();
            let plan = TiledPlan::new(&qp, &kp, CpuAttentionPrecision::F32).unwrap();
            assert!(plan.tiles.len() * kvh < SPLIT_BELOW_UNITS_PER_THREAD);
            let got = attend(&plan, &q, &k, &v).unwrap().flatten_all().unwrap();
            let want = naive(&q, &k, &v, &qp, &kp);
            for (a, b) in got.to_vec1::<f32>().unwrap().iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{qp:?}: {a} vs {b}");
            }
        }
    }

    /// Units split in parts report the sums a whole unit does, to f32 rounding of each key's
    /// probability (relative, where `head_sums_match_naive`'s bound is absolute), per head
    /// and in total: SmolLM2's head shape, peaked softmaxes over four parts; a decode step's
    /// units (their parts keep their probabilities) and a short question's (their parts
    /// sweep again once the merged maxima and sums are final), with f32 products and, where
    /// the CPU has them, bf16 products.
    #[test]
    fn split_sums_equal_whole_units() {
        let dev = Device::Cpu;
        let kp: Vec<u32> = (0..3600u32).collect();
        let (h, kvh, d) = (9, 3, 64);
        let k = Tensor::randn(0f32, 1.0, (kp.len(), kvh, d), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (kp.len(), kvh, d), &dev).unwrap();
        let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (ks, vs) = (flat(&k), flat(&v));
        let shape = Shape {
            num_heads: h,
            group: h / kvh,
            d,
        };
        let packed = PackedKv::new(&ks, &vs, kp.len(), kvh, d);
        let cases = [
            (vec![3600u32], CpuAttentionPrecision::F32),
            ((3589..=3600).collect(), CpuAttentionPrecision::F32),
            ((3581..=3600).collect(), CpuAttentionPrecision::Bf16),
        ];
        for (qp, precision) in cases {
            let q = Tensor::randn(0f32, 3.0, (qp.len(), h, d), &dev).unwrap();
            let qs = flat(&q);
            let plan = TiledPlan::new(&qp, &kp, precision).unwrap();
            assert_eq!(plan.tiles.len(), 1);
            let ops = match plan.bf16_products(d) {
                true => Operands::Bf16(&packed),
                false => Operands::F32(Strided {
                    k: &ks,
                    v: &vs,
                    row: kvh * d,
                    head: d,
                }),
            };
            let close = |g: f32, w: f32, what: &str| {
                assert!(
                    (g - w).abs() <= 1e-4 * w.abs() + 1e-12,
                    "{} queries, {what}: split {g} vs whole {w}",
                    qp.len()
                );
            };
            let (_, split) = run(&plan, &q, Kv::ByToken { k: &k, v: &v }, Sums::PerHead).unwrap();
            let (_, total) = run(&plan, &q, Kv::ByToken { k: &k, v: &v }, Sums::Total).unwrap();
            let mut whole_total = vec![0f32; kp.len()];
            for kh in 0..kvh {
                let tile = plan.tiles[0];
                let (_, whole) = unit(&plan, shape, kh, tile, &qs, ops, Sums::PerHead);
                let got = &split[kh * shape.group * kp.len()..][..whole.len()];
                for (j, (g, w)) in got.iter().zip(&whole).enumerate() {
                    close(*g, *w, &format!("KV head {kh}, entry {j}"));
                }
                let (_, whole) = unit(&plan, shape, kh, tile, &qs, ops, Sums::Total);
                whole_total
                    .iter_mut()
                    .zip(&whole)
                    .for_each(|(a, b)| *a += b);
            }
            for (j, (g, w)) in total.iter().zip(&whole_total).enumerate() {
                close(*g, *w, &format!("total, key {j}"));
            }
        }
    }

    /// Rows laid out by head (a decode mirror's, with spare capacity) attend exactly as the
    /// same rows by token: f32 rows bit for bit, bf16 rows bit for bit against f32 rows
    /// holding the same rounded values; split and unsplit units, SmolLM2's head shape and
    /// a small one; calls too large for them are refused.
    #[test]
    fn rows_by_head_attend_like_rows_by_token() {
        let dev = Device::Cpu;
        let flat = |x: Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (h, kvh, d) in [(9, 3, 64), (6, 2, 16)] {
            for t in [700usize, 2600] {
                let kp: Vec<u32> = (0..t as u32).map(|p| p * 2).collect();
                let last = *kp.last().unwrap();
                for qp in [vec![last + 1], vec![last - 2, last + 1]] {
                    if qp.len() * (h / kvh) > FEW_ROWS {
                        continue;
                    }
                    let q = Tensor::randn(0f32, 1.0, (qp.len(), h, d), &dev).unwrap();
                    let k = Tensor::randn(0f32, 1.0, (t, kvh, d), &dev).unwrap();
                    let v = Tensor::randn(0f32, 1.0, (t, kvh, d), &dev).unwrap();
                    let plan = TiledPlan::new(&qp, &kp, CpuAttentionPrecision::Bf16).unwrap();
                    assert!(reads_by_head(&plan, h / kvh));
                    // by head with room: [kv_heads, capacity, d]
                    let by_head = |x: &Tensor, dtype: DType| {
                        let room = Tensor::zeros((kvh, t + 300, d), dtype, &dev).unwrap();
                        let rows = x.to_dtype(dtype).unwrap().transpose(0, 1).unwrap();
                        room.slice_set(&rows.contiguous().unwrap(), 1, 0).unwrap();
                        room
                    };
                    let want = flat(attend(&plan, &q, &k, &v).unwrap());
                    let got = attend_by_head(
                        &plan,
                        &q,
                        &by_head(&k, DType::F32),
                        &by_head(&v, DType::F32),
                    )
                    .unwrap();
                    assert_eq!(flat(got), want, "f32, d {d}, {t} keys, {qp:?}");
                    let round = |x: &Tensor| {
                        x.to_dtype(DType::BF16)
                            .unwrap()
                            .to_dtype(DType::F32)
                            .unwrap()
                    };
                    let want = flat(attend(&plan, &q, &round(&k), &round(&v)).unwrap());
                    let got = attend_by_head(
                        &plan,
                        &q,
                        &by_head(&k, DType::BF16),
                        &by_head(&v, DType::BF16),
                    )
                    .unwrap();
                    assert_eq!(flat(got), want, "bf16, d {d}, {t} keys, {qp:?}");
                }
            }
        }
        // more rows per unit than the row-by-row products take
        let kp: Vec<u32> = (0..40).collect();
        let qp: Vec<u32> = (37..40).collect();
        let plan = TiledPlan::new(&qp, &kp, CpuAttentionPrecision::F32).unwrap();
        assert!(!reads_by_head(&plan, 3));
        let q = Tensor::zeros((3, 9, 64), DType::F32, &dev).unwrap();
        let kv = Tensor::zeros((3, 64, 64), DType::F32, &dev).unwrap();
        assert!(attend_by_head(&plan, &q, &kv, &kv).is_err());
    }

    /// bf16 products (where the CPU has them) on the paths a call can take — long calls'
    /// larger tiles, sparse queries, a split unit, the summed probe, a call too short for
    /// bf16 — stay within bf16's error of the naive softmax, and calls of 16+ queries really
    /// ran them (their output differs from the f32 products').
    #[test]
    fn bf16_products_stay_within_bf16_error_of_naive() {
        let bf16 = bf16dot::available(64);
        if !bf16 {
            eprintln!("this CPU has no AVX-512 BF16: bf16 plans must run f32 products");
        }
        let kp: Vec<u32> = (0..2600u32).filter(|p| p % 7 != 3).collect();
        let last = *kp.last().unwrap();
        let dev = Device::Cpu;
        let cases: Vec<(&str, Vec<u32>, usize, usize)> = vec![
            ("long", (0..2600u32).filter(|p| p % 11 != 5).collect(), 9, 3),
            (
                "sparse",
                (0..2600u32).filter(|p| p % 13 == 0).collect(),
                4,
                2,
            ),
            ("split", (last - 40..=last).collect(), 4, 1),
            ("short", vec![3, 900, last], 4, 2),
        ];
        for (name, qp, h, kvh) in cases {
            let d = 64;
            let q = Tensor::randn(0f32, 1.0, (qp.len(), h, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (kp.len(), kvh, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (kp.len(), kvh, d), &dev).unwrap();
            let plan = TiledPlan::new(&qp, &kp, CpuAttentionPrecision::Bf16).unwrap();
            let exact = TiledPlan::new(&qp, &kp, CpuAttentionPrecision::F32).unwrap();
            let got = attend(&plan, &q, &k, &v)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let f32_out = attend(&exact, &q, &k, &v)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let want = naive(&q, &k, &v, &qp, &kp);
            let runs_bf16 = bf16 && qp.len() >= BF16_LEAST_QUERIES;
            assert_eq!(runs_bf16, plan.bf16_products(d), "{name}");
            assert!(
                (got != f32_out) == runs_bf16,
                "{name}: bf16 products ran iff expected"
            );
            // bf16 keeps 8 significant bits: scores and probabilities off by ~2^-9 relative.
            // Measured on these cases: max 0.7e-3–8.4e-3, mean ≤ 1.8e-4 (the f32 products:
            // ~1e-6); the bounds leave 2.4× and 2.8×
            let errs: Vec<f32> = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
            let max = errs.iter().fold(0f32, |a, &b| a.max(b));
            let mean = errs.iter().sum::<f32>() / errs.len() as f32;
            assert!(max < 2e-2 && mean < 5e-4, "{name}: max {max}, mean {mean}");
            if name == "split" {
                assert!(
                    plan.tiles.len() * kvh < SPLIT_BELOW_UNITS_PER_THREAD,
                    "a split call"
                );
            }
            if name == "long" {
                assert!(
                    plan.tiles
                        .iter()
                        .all(|t| t.q_end - t.q_start <= BF16_QUERY_TILE)
                        || !bf16
                );
            }
            // the summed probe (split as the unprobed call is): the same
            // output up to summation order and rounding, each key's sums within bf16's error
            let (out, sums) = attend_summed(&plan, &q, &k, &v).unwrap();
            let out = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let apart = out
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            // (bf16 split parts round probabilities relative to their own maxima)
            let bound = if runs_bf16 { 2e-3 } else { 1e-5 };
            assert!(apart < bound, "{name}: summed probe's output {apart} apart");
            let sums = sums.to_vec1::<f32>().unwrap();
            let want = naive_key_sums(&q, &k, &qp, &kp);
            for (j, (g, w)) in sums.iter().zip(&want).enumerate() {
                assert!(
                    ((*g as f64) - w).abs() <= 2e-2 * w.max(1.0),
                    "{name}: key {j}: {g} vs {w}"
                );
            }
        }
    }

    #[test]
    fn rejects_what_the_reference_rejects() {
        assert!(
            TiledPlan::new(&[1], &[2, 3], CpuAttentionPrecision::F32).is_err(),
            "no key at or before the query"
        );
        assert!(
            TiledPlan::new(&[3, 2], &[0, 1], CpuAttentionPrecision::F32).is_err(),
            "queries out of order"
        );
        let plan = TiledPlan::new(&[0, 1], &[0, 1], CpuAttentionPrecision::F32).unwrap();
        let x = Tensor::zeros((3, 2, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(
            attend(&plan, &x, &x, &x).is_err(),
            "shape other than planned"
        );
    }
}
