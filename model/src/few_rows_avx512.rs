//! AVX-512 kernels of [`FewRows`] for head dims of 64 and 128 (SmolLM2 and Qwen2.5's small
//! models; Llama's): a decode step's attention over a long cache, where the loops of
//! `vmath.rs` spend more instructions per key than the key's bytes cost to read.
//!
//! - **Scores**, sixteen keys at a time: each query row's dot products with the block's keys
//!   in sixteen independent FMA chains (the query row in registers), then one transposing
//!   reduction turns the sixteen 16-lane sums into sixteen scores written together — ~3
//!   instructions of reduction per key and row where a horizontal sum per key took ~20. Rows
//!   run inside the key block, so a block's keys are read from memory once for all of them.
//! - **Weighted sums**: the output rows stay in registers for the whole tile (up to 24
//!   vectors: six rows of 64, three of 128, a larger unit in several passes), each value row
//!   loaded once per pass and multiplied into every row by its broadcast weight. A zero
//!   weight (a masked key, or one whose `2^x` underflowed) adds nothing, as in the portable
//!   loop.
//!
//! Sums run in another order than the portable loops' (fused multiply-adds, a tree over the
//! lanes), so results differ from theirs by f32 rounding; `tests` pins both against f64.

use std::arch::x86_64::*;

use crate::vmath::{FewRows, KvElement, prefetch};

/// Whether [`scores`] and [`add_weighted`] take this shape: AVX-512F and a head dim of 64 or
/// 128.
pub(crate) fn takes(s: &FewRows) -> bool {
    takes_head_dim(s.d)
}

/// Whether the kernels take rows of head dim `d` on this CPU.
pub(crate) fn takes_head_dim(d: usize) -> bool {
    matches!(d, 64 | 128) && std::arch::is_x86_feature_detected!("avx512f")
}

/// [`FewRows::scores`] for a shape [`takes`] accepts.
///
/// # Safety
/// The CPU has AVX-512F, `s.d` is 64 or 128, and the slices hold what `FewRows::check`
/// requires.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn scores<T: KvElement>(s: FewRows, scores: &mut [f32], q: &[f32], k: &[T]) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match s.d {
            64 => scores_d::<4, T>(s, scores, q, k),
            _ => scores_d::<8, T>(s, scores, q, k),
        }
    }
}

/// [`FewRows::add_weighted`] for a shape [`takes`] accepts.
///
/// # Safety
/// As for [`scores`].
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn add_weighted<T: KvElement>(s: FewRows, out: &mut [f32], p: &[f32], v: &[T]) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match s.d {
            64 => weighted_d::<4, T>(s, out, p, v),
            _ => weighted_d::<8, T>(s, out, p, v),
        }
    }
}

/// Scores with `D` vectors of 16 per row (`d = 16·D`).
#[inline(always)]
unsafe fn scores_d<const D: usize, T: KvElement>(
    s: FewRows,
    scores: &mut [f32],
    q: &[f32],
    k: &[T],
) {
    let (qp, kp, sp) = (q.as_ptr(), k.as_ptr(), scores.as_mut_ptr());
    let blocks = s.w / 16 * 16;
    // SAFETY: every load and store below stays within its slice: key `c < w` spans
    // `c·kv_stride .. c·kv_stride + d` of `k`, query row `r < rows` spans `r·d .. (r + 1)·d`
    // of `q` and score `(r, c)` sits at `r·score_stride + c` of `scores` (`FewRows::check`);
    // the intrinsics need AVX-512F, which the caller has.
    unsafe {
        let mut c0 = 0;
        while c0 < blocks {
            // the next block's keys on their way while this one's are multiplied
            for j in c0 + 16..(c0 + 32).min(s.w) {
                prefetch(&k[j * s.kv_stride..][..s.d]);
            }
            for r in 0..s.rows {
                let row = query_row::<D>(qp.add(r * s.d));
                let mut acc = [_mm512_setzero_ps(); 16];
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = dot_lanes::<D, T>(&row, kp.add((c0 + j) * s.kv_stride));
                }
                _mm512_storeu_ps(sp.add(r * s.score_stride + c0), sum_each(acc));
            }
            c0 += 16;
        }
        for c in blocks..s.w {
            for r in 0..s.rows {
                let row = query_row::<D>(qp.add(r * s.d));
                let lanes = dot_lanes::<D, T>(&row, kp.add(c * s.kv_stride));
                *sp.add(r * s.score_stride + c) = _mm512_reduce_add_ps(lanes);
            }
        }
    }
}

/// Value rows ahead of the one multiplied that [`weighted_rows`] asks for.
const AHEAD: usize = 8;

/// A query row of `16·D` floats in registers.
#[inline(always)]
unsafe fn query_row<const D: usize>(q: *const f32) -> [__m512; D] {
    // SAFETY: the caller's row holds 16·D floats.
    std::array::from_fn(|i| unsafe { _mm512_loadu_ps(q.add(16 * i)) })
}

/// The 16 lane sums of `row · key` (`key` 16·D floats).
#[inline(always)]
unsafe fn dot_lanes<const D: usize, T: KvElement>(row: &[__m512; D], key: *const T) -> __m512 {
    // SAFETY: the caller's key holds 16·D elements.
    unsafe {
        let mut a = _mm512_mul_ps(row[0], T::load16(key));
        for (i, &x) in row.iter().enumerate().skip(1) {
            a = _mm512_fmadd_ps(x, T::load16(key.add(16 * i)), a);
        }
        a
    }
}

/// Lane `j` of the result is the sum of `v[j]`'s sixteen lanes: a tree of additions with the
/// transposing shuffles between its levels (15 vector additions for the sixteen sums, where
/// summing each vector alone takes 15 scalar ones per vector).
///
/// # Safety
/// The CPU has AVX-512F.
#[inline(always)]
unsafe fn sum_each(v: [__m512; 16]) -> __m512 {
    // SAFETY: register-only operations of AVX-512F, which the caller has.
    unsafe {
        // level 1: the two 256-bit halves of each vector added, two vectors per result:
        // b[i] = [v[2i] 8 partials | v[2i+1] 8 partials]
        let b: [__m512; 8] = std::array::from_fn(|i| {
            let (x, y) = (v[2 * i], v[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b01_00_01_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_10_11_10>(x, y),
            )
        });
        // level 2: four partials per vector, four vectors per result (128-bit lane m of
        // c[i] belongs to v[4i + m])
        let c: [__m512; 4] = std::array::from_fn(|i| {
            let (x, y) = (b[2 * i], b[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
            )
        });
        // levels 3 and 4 within 128-bit lanes: pairs, then whole sums; lane m of e holds
        // [v[m], v[4 + m], v[8 + m], v[12 + m]]
        let d: [__m512; 2] = std::array::from_fn(|i| {
            let (x, y) = (c[2 * i], c[2 * i + 1]);
            _mm512_add_ps(
                _mm512_shuffle_ps::<0b10_00_10_00>(x, y),
                _mm512_shuffle_ps::<0b11_01_11_01>(x, y),
            )
        });
        let e = _mm512_add_ps(
            _mm512_shuffle_ps::<0b10_00_10_00>(d[0], d[1]),
            _mm512_shuffle_ps::<0b11_01_11_01>(d[0], d[1]),
        );
        // element 4m + n of e is the sum of v[4n + m]: back to order
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        _mm512_permutexvar_ps(order, e)
    }
}

/// Weighted sums with `D` vectors of 16 per row, the rows in passes of at most `24 / D`.
#[inline(always)]
unsafe fn weighted_d<const D: usize, T: KvElement>(
    s: FewRows,
    out: &mut [f32],
    p: &[f32],
    v: &[T],
) {
    let per_pass = 24 / D;
    let mut r0 = 0;
    while r0 < s.rows {
        let n = (s.rows - r0).min(per_pass);
        // SAFETY: forwarded; rows r0..r0 + n are within `rows`.
        unsafe {
            match n {
                1 => weighted_rows::<D, 1, T>(s, r0, out, p, v),
                2 => weighted_rows::<D, 2, T>(s, r0, out, p, v),
                3 => weighted_rows::<D, 3, T>(s, r0, out, p, v),
                4 => weighted_rows::<D, 4, T>(s, r0, out, p, v),
                5 => weighted_rows::<D, 5, T>(s, r0, out, p, v),
                _ => weighted_rows::<D, 6, T>(s, r0, out, p, v),
            }
        }
        r0 += n;
    }
}

/// Rows `r0..r0 + R` of a weighted sum, their outputs in `R·D` registers.
#[inline(always)]
unsafe fn weighted_rows<const D: usize, const R: usize, T: KvElement>(
    s: FewRows,
    r0: usize,
    out: &mut [f32],
    p: &[f32],
    v: &[T],
) {
    let (op, pp, vp) = (out.as_mut_ptr(), p.as_ptr(), v.as_ptr());
    // SAFETY: every access stays within its slice: output row `r` spans `r·d .. (r + 1)·d`
    // of `out`, weight `(r, c)` sits at `r·score_stride + c` of `p`, value `c < w` spans
    // `c·kv_stride .. + d` of `v` (`FewRows::check`), and `r0 + R <= rows`; the intrinsics
    // need AVX-512F, which the caller has.
    unsafe {
        let mut acc: [[__m512; D]; R] =
            std::array::from_fn(|r| query_row::<D>(op.add((r0 + r) * s.d)));
        for c in 0..s.w {
            if c + AHEAD < s.w {
                prefetch(&v[(c + AHEAD) * s.kv_stride..][..s.d]);
            }
            let row = vp.add(c * s.kv_stride);
            let vals: [__m512; D] = std::array::from_fn(|i| T::load16(row.add(16 * i)));
            for (r, a) in acc.iter_mut().enumerate() {
                let w = *pp.add((r0 + r) * s.score_stride + c);
                if w == 0.0 {
                    continue;
                }
                let w = _mm512_set1_ps(w);
                for (x, &y) in a.iter_mut().zip(&vals) {
                    *x = _mm512_fmadd_ps(w, y, *x);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (i, &x) in a.iter().enumerate() {
                _mm512_storeu_ps(op.add((r0 + r) * s.d + 16 * i), x);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmath::tests::few_rows_match_f64;

    /// Both kernels against f64 loops over every row count a unit can have, both head dims,
    /// tiles of whole blocks, a tail and none at all, strided rows, score rows wider than the
    /// tile and zero weights; f32 rows and bf16 ones.
    #[test]
    fn kernels_match_f64_loops() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        for d in [64, 128] {
            for rows in 1..=8 {
                for w in [0, 5, 16, 37, 64] {
                    let shape = FewRows {
                        rows,
                        w,
                        d,
                        kv_stride: 3 * d + 5,
                        score_stride: 70,
                    };
                    assert!(takes(&shape));
                    few_rows_match_f64(
                        shape,
                        |x| x,
                        // SAFETY: AVX-512F checked above, a head dim of 64 or 128, and the
                        // helper's slices fit the shape.
                        |s, out, q, k| unsafe { scores::<f32>(s, out, q, k) },
                        // SAFETY: as above.
                        |s, out, p, v| unsafe { add_weighted::<f32>(s, out, p, v) },
                    );
                    few_rows_match_f64(
                        shape,
                        half::bf16::from_f32,
                        // SAFETY: as above.
                        |s, out, q, k| unsafe { scores::<half::bf16>(s, out, q, k) },
                        // SAFETY: as above.
                        |s, out, p, v| unsafe { add_weighted::<half::bf16>(s, out, p, v) },
                    );
                }
            }
        }
    }
}
