//! The tiled attention's two products in bf16 with f32 sums, on CPUs with AVX-512 BF16:
//! `vdpbf16ps` multiplies 32 bf16 pairs per instruction, twice what an f32 FMA does, and the
//! products are what bounds a long prefill's attention on the CPU (BENCHMARKS §5: at 8,192
//! tokens SmolLM2's attention is more FLOPs than its weight matmuls).
//!
//! Precision: Q (already scaled), K, V and the softmax probabilities are rounded to bf16 (to
//! nearest, ties to even); every product and sum is f32. That is the GPU's fused kernel's
//! precision (CPU runtimes commonly keep the whole KV cache in half precision). The row
//! maxima and sums of the online softmax stay f32 (`tiled.rs` computes them from the f32
//! scores this module returns).
//!
//! Layouts, `u32` = two bf16 with the lower index in the low half:
//! - keys of one KV head in blocks of 16: `[t / 16][d / 2][16]`, pair `j` of key `c` at
//!   `[c / 16][j][c % 16]`, keys past `t` zero — so one 64-byte load holds pair `j` of 16 keys;
//! - values of one KV head by pairs of keys: `[t / 2][d]`, `(V[2p][x], V[2p + 1][x])` at
//!   `[p][x]`, a key past `t` zero — one load holds 16 dimensions of two keys;
//! - query and probability rows: plain bf16 rows, so `u32` `j` of a row is its pair
//!   `(2j, 2j + 1)`.
//!
//! Pinned against the f32 products of the same bf16-rounded inputs by
//! `tests::products_equal_f32_products_of_rounded_inputs`.

use half::bf16;
use rayon::prelude::*;

/// Keys per block of the key layout (one AVX-512 register of f32 scores).
const KEY_BLOCK: usize = 16;

/// Key blocks (or value pairs) one packing task takes at least: enough work per task to
/// repay rayon's scheduling, few enough that a 1k-token call still splits.
const PACK_MIN_CHUNKS: usize = 32;

/// Whether this CPU runs the bf16 products, for head dimension `d` (a multiple of 16 up to
/// 128, whose value rows fit the kernels' registers).
pub(crate) fn available(d: usize) -> bool {
    if !matches!(d, 16 | 32 | 64 | 128) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Two bf16 (rounded to nearest even) in one `u32`, `lo` in the low half.
pub(crate) fn pair(lo: f32, hi: f32) -> u32 {
    u32::from(bf16::from_f32(lo).to_bits()) | (u32::from(bf16::from_f32(hi).to_bits()) << 16)
}

/// `src` (even length) as bf16 pairs into `dst` (half its length): by `vcvtneps2bf16` when
/// `vector` (the caller checked [`available`]), else by [`pair`].
fn convert_pairs(vector: bool, src: &[f32], dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: the caller checked AVX-512F and AVX-512 BF16; lengths as documented.
        return unsafe { x86::to_pairs(src, dst) };
    }
    let _ = vector;
    for (o, p) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *o = pair(p[0], p[1]);
    }
}

/// Rows of f32 as bf16 pairs: `rows` rows of `d` (even) from `src` (row stride `d`), each
/// `d / 2` pairs. Where the CPU has AVX-512 BF16, sixteen values per instruction
/// (`vcvtneps2bf16`: the same rounding as [`pair`] for every value but denormals, which it
/// flushes to zero; pinned by `tests::rows_convert_as_pairs_do`) — a bf16 weight product's
/// rows are converted per call, as many values as the call's activations.
pub(crate) fn pairs_of_rows(src: &[f32], rows: usize, d: usize) -> Vec<u32> {
    let src = &src[..rows * d];
    let mut dst = vec![0u32; src.len() / 2];
    convert_pairs(available(16), src, &mut dst);
    dst
}

/// One row of an online softmax step, straight to bf16: `m = max(m_old, max(seen))`, then
/// `dst`'s first `⌈w / 2⌉` pairs hold `2^(x - m)` for the `seen` scores (rounded to bf16) and
/// zeros up to `w` keys (the keys the row may not see, and the pad past an odd `w`). Returns
/// `m` and the sum of the unrounded probabilities. `seen` is not empty, `seen.len() ≤ w`.
pub(crate) fn probabilities_to_pairs(
    seen: &[f32],
    m_old: f32,
    w: usize,
    dst: &mut [u32],
) -> (f32, f32) {
    assert!(!seen.is_empty() && seen.len() <= w && dst.len() >= w.div_ceil(2));
    #[cfg(target_arch = "x86_64")]
    {
        assert!(available(16), "bf16 products on a CPU without AVX-512 BF16");
        // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (asserted); lengths asserted above.
        unsafe { x86::probabilities_to_pairs(seen, m_old, w, dst) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (seen, m_old, w, dst);
        unreachable!("bf16 products are only built for x86_64 (see `available`)")
    }
}

/// One call's K and V in the layouts above, every KV head.
#[derive(Debug)]
pub(crate) struct PackedKv {
    d: usize,
    /// Key blocks per head (`⌈t / 16⌉`).
    blocks: usize,
    /// Key pairs per head (`⌈t / 2⌉`).
    pairs: usize,
    keys: Vec<u32>,
    values: Vec<u32>,
}

impl PackedKv {
    /// Packs `k`, `v` (`[t, kv_heads, d]`, f32, contiguous); `d` as [`available`] takes it.
    pub(crate) fn new(k: &[f32], v: &[f32], t: usize, kv_heads: usize, d: usize) -> Self {
        assert!(d.is_multiple_of(KEY_BLOCK) && k.len() >= t * kv_heads * d && v.len() >= k.len());
        let (blocks, pairs) = (t.div_ceil(KEY_BLOCK), t.div_ceil(2));
        let half = d / 2;
        // split over rayon's threads by key block and value pair: packed on one thread, this
        // was the largest part of a reuse's question (32 rows over 5k cached tokens)
        // sixteen values per conversion where the CPU has the instruction (as it does
        // wherever the products run), one at a time otherwise; the same pairs either way
        let vector = available(d);
        let mut keys = vec![0u32; kv_heads * blocks * half * KEY_BLOCK];
        keys.par_chunks_mut(half * KEY_BLOCK)
            .with_min_len(PACK_MIN_CHUNKS)
            .enumerate()
            .for_each(|(at, block)| {
                let (kh, b) = (at / blocks, at % blocks);
                let mut row_pairs = [0u32; 64];
                for c in b * KEY_BLOCK..t.min((b + 1) * KEY_BLOCK) {
                    let row = &k[(c * kv_heads + kh) * d..][..d];
                    let row_pairs = &mut row_pairs[..half];
                    convert_pairs(vector, row, row_pairs);
                    for (j, &p) in row_pairs.iter().enumerate() {
                        block[j * KEY_BLOCK + c % KEY_BLOCK] = p;
                    }
                }
            });
        let mut values = vec![0u32; kv_heads * pairs * d];
        values
            .par_chunks_mut(d)
            .with_min_len(PACK_MIN_CHUNKS)
            .enumerate()
            .for_each(|(at, out)| {
                let (kh, p) = (at / pairs, at % pairs);
                let a = &v[(2 * p * kv_heads + kh) * d..][..d];
                let b = (2 * p + 1 < t).then(|| &v[((2 * p + 1) * kv_heads + kh) * d..][..d]);
                #[cfg(target_arch = "x86_64")]
                if vector {
                    // SAFETY: `available` checked AVX-512F and AVX-512 BF16 and `d` a
                    // multiple of 16; `a`, `b` and `out` are `d` long.
                    return unsafe { x86::interleave_pairs(a, b, out) };
                }
                for (x, o) in out.iter_mut().enumerate() {
                    *o = pair(a[x], b.map_or(0.0, |b| b[x]));
                }
            });
        Self {
            d,
            blocks,
            pairs,
            keys,
            values,
        }
    }

    /// `scores[r * stride + c] = q[r] · K[k0 + c]` for `r < rows` and `c` below `w` rounded up
    /// to 16 (keys past the call's end score 0), KV head `kh`. `q` holds `rows` query rows
    /// of `d / 2` pairs; `k0` is a multiple of 16 and `w` rounded up to 16 fits `stride`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn scores(
        &self,
        kh: usize,
        k0: usize,
        w: usize,
        q: &[u32],
        rows: usize,
        scores: &mut [f32],
        stride: usize,
    ) {
        let half = self.d / 2;
        let nblocks = w.div_ceil(KEY_BLOCK);
        assert!(k0.is_multiple_of(KEY_BLOCK) && k0 / KEY_BLOCK + nblocks <= self.blocks);
        assert!(nblocks * KEY_BLOCK <= stride && q.len() >= rows * half);
        assert!(rows == 0 || scores.len() >= (rows - 1) * stride + nblocks * KEY_BLOCK);
        let head =
            &self.keys[kh * self.blocks * half * KEY_BLOCK..][..self.blocks * half * KEY_BLOCK];
        let first = &head[k0 / KEY_BLOCK * half * KEY_BLOCK..];
        #[cfg(target_arch = "x86_64")]
        {
            assert!(
                available(self.d),
                "bf16 products on a CPU without AVX-512 BF16"
            );
            // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (asserted); every block read
            // (`nblocks` from `k0`) and every score written lies within the slices (asserted).
            unsafe { x86::scores(first, half, nblocks, q, rows, scores, stride) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (first, nblocks, q, rows, scores, stride);
            unreachable!("bf16 products are only built for x86_64 (see `available`)")
        }
    }

    /// `out[r * d..][..d] += Σ_c p[r][c] · V[k0 + c]` over `c < w` (pairs `⌈w / 2⌉`), KV head
    /// `kh`: `p` holds `rows` probability rows of pairs, `p_stride` pairs apart, a pair past
    /// an odd `w` zero in its upper half; `k0` even.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn add_weighted(
        &self,
        kh: usize,
        k0: usize,
        w: usize,
        p: &[u32],
        p_stride: usize,
        rows: usize,
        out: &mut [f32],
    ) {
        let d = self.d;
        let npairs = w.div_ceil(2);
        assert!(k0.is_multiple_of(2) && k0 / 2 + npairs <= self.pairs);
        assert!(npairs <= p_stride && out.len() >= rows * d);
        assert!(rows == 0 || p.len() >= (rows - 1) * p_stride + npairs);
        let head = &self.values[kh * self.pairs * d..][..self.pairs * d];
        let first = &head[k0 / 2 * d..];
        #[cfg(target_arch = "x86_64")]
        {
            assert!(available(d), "bf16 products on a CPU without AVX-512 BF16");
            // SAFETY: as in `scores`: features asserted, every pair read and row written
            // within the slices (asserted above).
            unsafe { x86::add_weighted(first, d, npairs, p, p_stride, rows, out) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (first, npairs, p, p_stride, rows, out);
            unreachable!("bf16 products are only built for x86_64 (see `available`)")
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    //! The register-blocked kernels: `R` rows × `C` key blocks of scores, `R` rows × `X`
    //! 16-wide column blocks of output, all accumulators in registers (≤ 24 of 32).

    use std::arch::x86_64::*;

    use super::KEY_BLOCK;

    /// Rows per register block of the score kernel (× 4 key blocks = 24 accumulators).
    const SCORE_ROWS: usize = 6;
    /// Key blocks per register block of the score kernel.
    const SCORE_BLOCKS: usize = 4;

    /// See [`super::PackedKv::scores`]; `k` starts at the first block.
    ///
    /// # Safety
    /// AVX-512F and AVX-512 BF16 present; `k` holds `nblocks` blocks of `half * 16`, `q`
    /// `rows * half` pairs, `scores` row `rows - 1` up to `nblocks * 16`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(crate) unsafe fn scores(
        k: &[u32],
        half: usize,
        nblocks: usize,
        q: &[u32],
        rows: usize,
        scores: &mut [f32],
        stride: usize,
    ) {
        let mut c0 = 0;
        while c0 < nblocks {
            let c = SCORE_BLOCKS.min(nblocks - c0);
            let kb = k[c0 * half * KEY_BLOCK..].as_ptr();
            let mut r0 = 0;
            while r0 < rows {
                let r = SCORE_ROWS.min(rows - r0);
                let qr = q[r0 * half..].as_ptr();
                let out = scores[r0 * stride + c0 * KEY_BLOCK..].as_mut_ptr();
                macro_rules! go {
                    ($($rr:literal),*) => {
                        match (r, c) {
                            $(
                                ($rr, 1) => score_block::<$rr, 1>(kb, half, qr, out, stride),
                                ($rr, 2) => score_block::<$rr, 2>(kb, half, qr, out, stride),
                                ($rr, 3) => score_block::<$rr, 3>(kb, half, qr, out, stride),
                                ($rr, _) => score_block::<$rr, 4>(kb, half, qr, out, stride),
                            )*
                            _ => unreachable!("at most {SCORE_ROWS} rows per block"),
                        }
                    };
                }
                // SAFETY: blocks c0..c0 + c, rows r0..r0 + r lie within the slices (caller).
                unsafe { go!(1, 2, 3, 4, 5, 6) };
                r0 += r;
            }
            c0 += c;
        }
    }

    /// `R` query rows (pairs `half` apart) × `C` key blocks starting at `k`.
    #[inline(always)]
    unsafe fn score_block<const R: usize, const C: usize>(
        k: *const u32,
        half: usize,
        q: *const u32,
        out: *mut f32,
        stride: usize,
    ) {
        // SAFETY: the caller keeps every offset within its slices (the whole body).
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); C]; R];
            for j in 0..half {
                let mut kv = [_mm512_setzero_si512(); C];
                for (c, kv) in kv.iter_mut().enumerate() {
                    *kv = _mm512_loadu_epi32(k.add((c * half + j) * KEY_BLOCK).cast());
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let qb = _mm512_set1_epi32(*q.add(r * half + j) as i32);
                    for (a, kv) in acc.iter_mut().zip(&kv) {
                        *a = _mm512_dpbf16_ps(*a, bh(qb), bh(*kv));
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (c, a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(out.add(r * stride + c * KEY_BLOCK), *a);
                }
            }
        }
    }

    /// See [`super::PackedKv::add_weighted`]; `v` starts at the first pair.
    ///
    /// # Safety
    /// AVX-512F and AVX-512 BF16 present; `d` one of 16, 32, 64, 128; `v` holds `npairs`
    /// rows of `d`, `p` row `rows - 1` up to `npairs`, `out` `rows * d`.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn add_weighted(
        v: &[u32],
        d: usize,
        npairs: usize,
        p: &[u32],
        p_stride: usize,
        rows: usize,
        out: &mut [f32],
    ) {
        let vp = v.as_ptr();
        let mut r0 = 0;
        while r0 < rows {
            let pr = p[r0 * p_stride..].as_ptr();
            let o = out[r0 * d..].as_mut_ptr();
            macro_rules! go {
                ($x:literal, $max:literal, $($rr:literal),*) => {{
                    let r = $max.min(rows - r0);
                    match r {
                        $( $rr => weighted_block::<$rr, $x>(vp, npairs, pr, p_stride, o), )*
                        _ => unreachable!("at most {} rows per block", $max),
                    }
                    r
                }};
            }
            // SAFETY: rows r0..r0 + r and `npairs` pairs lie within the slices (caller).
            r0 += unsafe {
                match d {
                    16 => go!(1, 8, 1, 2, 3, 4, 5, 6, 7, 8),
                    32 => go!(2, 8, 1, 2, 3, 4, 5, 6, 7, 8),
                    64 => go!(4, 6, 1, 2, 3, 4, 5, 6),
                    _ => go!(8, 3, 1, 2, 3),
                }
            };
        }
    }

    /// `R` output rows of `X * 16` (their probability rows `p_stride` pairs apart) plus
    /// `npairs` value pairs starting at `v`.
    #[inline(always)]
    unsafe fn weighted_block<const R: usize, const X: usize>(
        v: *const u32,
        npairs: usize,
        p: *const u32,
        p_stride: usize,
        out: *mut f32,
    ) {
        let d = X * 16;
        // SAFETY: the caller keeps every offset within its slices (the whole body).
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); X]; R];
            for (r, acc) in acc.iter_mut().enumerate() {
                for (x, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_loadu_ps(out.add(r * d + x * 16));
                }
            }
            for j in 0..npairs {
                let mut vv = [_mm512_setzero_si512(); X];
                for (x, vv) in vv.iter_mut().enumerate() {
                    *vv = _mm512_loadu_epi32(v.add(j * d + x * 16).cast());
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let pb = _mm512_set1_epi32(*p.add(r * p_stride + j) as i32);
                    for (a, vv) in acc.iter_mut().zip(&vv) {
                        *a = _mm512_dpbf16_ps(*a, bh(pb), bh(*vv));
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (x, a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(out.add(r * d + x * 16), *a);
                }
            }
        }
    }

    /// `src` (even length) as bf16 pairs into `dst` (half its length), sixteen values per
    /// conversion, the tail by [`super::pair`].
    ///
    /// # Safety
    /// AVX-512F and AVX-512 BF16 present.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn to_pairs(src: &[f32], dst: &mut [u32]) {
        assert!(src.len().is_multiple_of(2) && dst.len() == src.len() / 2);
        let mut chunks = src.chunks_exact(16);
        for (c, out) in (&mut chunks).zip(dst.chunks_exact_mut(8)) {
            // SAFETY: `c` is 16 f32 and `out` 8 u32 (256 bits).
            unsafe {
                let packed = _mm512_cvtneps_pbh(_mm512_loadu_ps(c.as_ptr()));
                _mm256_storeu_si256(
                    out.as_mut_ptr().cast(),
                    std::mem::transmute::<__m256bh, __m256i>(packed),
                );
            }
        }
        let rest = chunks.remainder();
        let tail = &mut dst[(src.len() - rest.len()) / 2..];
        for (o, p) in tail.iter_mut().zip(rest.chunks_exact(2)) {
            *o = super::pair(p[0], p[1]);
        }
    }

    /// `out[x] = pair(a[x], b[x])` (`b` absent: 0), sixteen at a time.
    ///
    /// # Safety
    /// AVX-512F and AVX-512 BF16 present; `a`, `b` and `out` the same length, a multiple of
    /// 16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn interleave_pairs(a: &[f32], b: Option<&[f32]>, out: &mut [u32]) {
        assert!(out.len().is_multiple_of(16) && a.len() == out.len());
        assert!(b.is_none_or(|b| b.len() == out.len()));
        // 16 values as bf16, each in the low half of a 32-bit lane
        let lanes = |x: &[f32]| {
            // SAFETY: `x` is 16 f32; the features are enabled here.
            unsafe {
                let h = _mm512_cvtneps_pbh(_mm512_loadu_ps(x.as_ptr()));
                _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(h))
            }
        };
        for (i, o) in out.chunks_exact_mut(16).enumerate() {
            let lo = lanes(&a[16 * i..][..16]);
            let hi = b.map_or(_mm512_setzero_si512(), |b| lanes(&b[16 * i..][..16]));
            let both = _mm512_or_si512(lo, _mm512_slli_epi32::<16>(hi));
            // SAFETY: `o` is 16 u32.
            unsafe { _mm512_storeu_si512(o.as_mut_ptr().cast(), both) };
        }
    }

    /// See [`super::probabilities_to_pairs`] (lengths checked there).
    ///
    /// # Safety
    /// AVX-512F and AVX-512 BF16 present.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn probabilities_to_pairs(
        seen: &[f32],
        m_old: f32,
        w: usize,
        dst: &mut [u32],
    ) -> (f32, f32) {
        let mut chunks = seen.chunks_exact(16);
        let mut max = _mm512_set1_ps(m_old);
        for c in &mut chunks {
            // SAFETY: `c` is 16 f32.
            max = _mm512_max_ps(max, unsafe { _mm512_loadu_ps(c.as_ptr()) });
        }
        let m = chunks
            .remainder()
            .iter()
            .fold(_mm512_reduce_max_ps(max), |a, &b| a.max(b));
        let mut lanes = [0f32; 16];
        let mut chunks = seen.chunks_exact(16);
        let full = seen.len() / 16;
        assert!(dst.len() >= full * 8 + (seen.len() % 16).div_ceil(2));
        let mut total = _mm512_setzero_ps();
        let mv = _mm512_set1_ps(m);
        for (i, c) in (&mut chunks).enumerate() {
            // SAFETY: features enabled here; `c` is 16 f32 and pairs `8i..8i + 8` lie within
            // `dst` (asserted above: i < full).
            unsafe {
                let p = exp2_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(c.as_ptr()), mv));
                total = _mm512_add_ps(total, p);
                let packed = _mm512_cvtneps_pbh(p);
                _mm256_storeu_si256(
                    dst.as_mut_ptr().add(8 * i).cast(),
                    std::mem::transmute::<__m256bh, __m256i>(packed),
                );
            }
        }
        // SAFETY: `lanes` is 16 f32.
        unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), total) };
        let rest = chunks.remainder();
        let mut sum = 0f32;
        let mut at = full * 8;
        if !rest.is_empty() {
            let mut p = [0f32; 16];
            for (p, x) in p.iter_mut().zip(rest) {
                *p = crate::vmath::exp2_nonpositive(x - m);
                sum += *p;
            }
            // SAFETY: features enabled here; `p` is 16 f32; 256 plain bits either way.
            let pairs = unsafe {
                std::mem::transmute::<__m256bh, [u32; 8]>(_mm512_cvtneps_pbh(_mm512_loadu_ps(
                    p.as_ptr(),
                )))
            };
            let n = rest.len().div_ceil(2);
            dst[at..at + n].copy_from_slice(&pairs[..n]);
            at += n;
        }
        dst[at..w.div_ceil(2)].fill(0);
        (m, lanes.iter().sum::<f32>() + sum)
    }

    /// `2^x` for 16 `x <= 0`: [`crate::vmath::exp2_nonpositive`]'s polynomial on the
    /// fraction, by fused multiply-adds, scaled by `2^n` with `vscalefps` (below -126: 2^-126).
    ///
    /// # Safety
    /// AVX-512F present (inlined into functions built for it).
    #[inline(always)]
    unsafe fn exp2_nonpositive(x: __m512) -> __m512 {
        // SAFETY: the caller's CPU has AVX-512F.
        unsafe {
            let x = _mm512_max_ps(x, _mm512_set1_ps(-126.0));
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
            let f = _mm512_sub_ps(x, n); // in [-0.5, 0.5]
            let mut p = _mm512_set1_ps(1.535_336_2e-4);
            for c in [
                1.339_887_4e-3,
                9.618_437e-3,
                5.550_332_5e-2,
                2.402_264_8e-1,
                6.931_472e-1,
                1.0,
            ] {
                p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
            }
            _mm512_scalef_ps(p, n)
        }
    }

    /// The same 512 bits seen as 32 bf16.
    #[inline(always)]
    fn bh(x: __m512i) -> __m512bh {
        // SAFETY: both types are 512 plain bits with no invalid values.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(x) }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn bf(x: f32) -> f32 {
        bf16::from_f32(x).to_f32()
    }

    /// Pseudo-random values in [-2, 2).
    pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    /// Rows converted sixteen values at a time equal [`pair`]'s rounding bit for bit — ties
    /// to even, values that round up to the next binade, ±0, ±infinity, the largest finite
    /// values (rounding to infinity), NaN staying NaN — on lengths with and without a tail;
    /// denormals (below 2^-126) may come out as zero of their sign.
    #[test]
    fn rows_convert_as_pairs_do() {
        let mut src = values(1000, 7);
        let tie = f32::from_bits(0x3f80_8000); // exactly between two bf16: to even (down)
        let up = f32::from_bits(0x3f81_8000); // between two bf16, odd below: up
        let carry = f32::from_bits(0x3fff_ffff); // rounds into the next binade
        src[..10].copy_from_slice(&[
            tie,
            up,
            carry,
            -carry,
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -f32::MAX,
        ]);
        for len in [1000, 998, 34, 16, 2] {
            let got = pairs_of_rows(&src, 1, len);
            let want: Vec<u32> = src[..len]
                .chunks_exact(2)
                .map(|p| pair(p[0], p[1]))
                .collect();
            assert_eq!(got, want, "{len} values");
        }
        let nan = pairs_of_rows(&[f32::NAN, -f32::NAN], 1, 2)[0];
        for half in [nan & 0xffff, nan >> 16] {
            assert!(bf16::from_bits(half as u16).is_nan());
        }
        let tiny = pairs_of_rows(&[1e-39, -1e-39], 1, 2)[0];
        for (half, want) in [
            (tiny & 0xffff, pair(1e-39, 0.0)),
            (tiny >> 16, pair(-1e-39, 0.0)),
        ] {
            let got = bf16::from_bits(half as u16);
            assert!(got.to_bits() == want as u16 || got.to_f32() == 0.0, "{got}");
        }
    }

    /// `PackedKv` holds the same pairs as packing pair by pair: keys by blocks of 16, values
    /// by key pairs, an odd key count's last value paired with zero.
    #[test]
    fn kv_packs_as_pair_by_pair() {
        if !available(64) {
            eprintln!("this CPU has no AVX-512 BF16");
            return;
        }
        for (t, kv_heads, d) in [(37usize, 3usize, 64usize), (16, 1, 16), (5, 2, 128)] {
            let k = values(t * kv_heads * d, 3);
            let v = values(t * kv_heads * d, 4);
            let packed = PackedKv::new(&k, &v, t, kv_heads, d);
            let (blocks, pairs, half) = (t.div_ceil(KEY_BLOCK), t.div_ceil(2), d / 2);
            for kh in 0..kv_heads {
                for c in 0..t {
                    let row = &k[(c * kv_heads + kh) * d..][..d];
                    for j in 0..half {
                        let at = (kh * blocks + c / KEY_BLOCK) * half * KEY_BLOCK
                            + j * KEY_BLOCK
                            + c % KEY_BLOCK;
                        assert_eq!(packed.keys[at], pair(row[2 * j], row[2 * j + 1]));
                    }
                }
                for p in 0..pairs {
                    let a = &v[(2 * p * kv_heads + kh) * d..][..d];
                    for x in 0..d {
                        let b = if 2 * p + 1 < t {
                            v[((2 * p + 1) * kv_heads + kh) * d + x]
                        } else {
                            0.0
                        };
                        assert_eq!(packed.values[(kh * pairs + p) * d + x], pair(a[x], b));
                    }
                }
            }
        }
    }

    /// Both products, every supported head dimension, row and key counts off the register
    /// blocks, odd key counts, a tile not at key 0: equal (to f32 summation order) to f32
    /// products of the same inputs rounded to bf16.
    #[test]
    fn products_equal_f32_products_of_rounded_inputs() {
        if !available(64) {
            eprintln!("skipped: this CPU has no AVX-512 BF16 (the products are not used here)");
            return;
        }
        for (d, t, kv_heads, rows, k0, w) in [
            (64, 100, 3, 7, 16, 83),
            (64, 1000, 2, 13, 512, 488),
            (128, 37, 1, 4, 0, 37),
            (16, 5, 2, 9, 0, 5),
            (32, 70, 1, 1, 32, 37),
        ] {
            let k = values(t * kv_heads * d, 1 + d as u64);
            let v = values(t * kv_heads * d, 2 + t as u64);
            let q = values(rows * d, 3);
            let packed = PackedKv::new(&k, &v, t, kv_heads, d);
            let qp = pairs_of_rows(&q, rows, d);
            let stride = 512;
            for kh in 0..kv_heads {
                let mut s = vec![f32::NAN; rows * stride];
                packed.scores(kh, k0, w, &qp, rows, &mut s, stride);
                for r in 0..rows {
                    for c in 0..w {
                        let key = &k[((k0 + c) * kv_heads + kh) * d..][..d];
                        let want: f32 = (0..d).map(|x| bf(q[r * d + x]) * bf(key[x])).sum();
                        let got = s[r * stride + c];
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{got} vs {want}"
                        );
                    }
                }
                // probabilities: the scores scaled into [0, 1], then P V
                // probabilities: each row's visible part (all but the last 3 keys) through
                // the softmax step; the rest must come out as zeros
                let seen = w.saturating_sub(3).max(1);
                let mut pp = vec![u32::MAX; rows * stride / 2];
                let mut p = vec![0f32; rows * stride];
                for r in 0..rows {
                    let row = &s[r * stride..][..seen];
                    let (m, sum) = probabilities_to_pairs(row, -1.0, w, &mut pp[r * stride / 2..]);
                    let want_m = row.iter().fold(-1f32, |a, &b| a.max(b));
                    assert_eq!(m, want_m);
                    for (c, x) in row.iter().enumerate() {
                        p[r * stride + c] = (x - m).exp2();
                    }
                    let want_sum: f32 = p[r * stride..][..seen].iter().sum();
                    assert!(
                        (sum - want_sum).abs() <= 1e-5 * want_sum.max(1.0),
                        "{sum} vs {want_sum}"
                    );
                    for c in 0..w.div_ceil(2) * 2 {
                        let pair = pp[r * stride / 2 + c / 2];
                        let got = bf16::from_bits((pair >> (16 * (c % 2))) as u16).to_f32();
                        let want = bf(p[r * stride + c]);
                        assert!(
                            (got - want).abs() <= 1e-6 + want * 8e-3,
                            "key {c}: {got} vs {want}"
                        );
                    }
                }
                let mut out = values(rows * d, 4);
                let before = out.clone();
                packed.add_weighted(kh, k0, w, &pp, stride / 2, rows, &mut out);
                for r in 0..rows {
                    for x in 0..d {
                        let want = before[r * d + x]
                            + (0..w)
                                .map(|c| {
                                    let pair = pp[r * stride / 2 + c / 2];
                                    let pc = bf16::from_bits((pair >> (16 * (c % 2))) as u16);
                                    pc.to_f32() * bf(v[((k0 + c) * kv_heads + kh) * d + x])
                                })
                                .sum::<f32>();
                        let got = out[r * d + x];
                        assert!(
                            (got - want).abs() <= 1e-4 * (1.0 + want.abs()),
                            "{got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
