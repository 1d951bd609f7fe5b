//! A decode step's products over a GGUF's blocks with its activations rounded to integers:
//! the scheme of llama.cpp's CPU backend (8 bits), or the same at 16 bits, on CPUs with
//! AVX-512 VNNI.
//!
//! [`crate::quant`]'s exact products dequantise every weight to f32 before multiplying, a
//! dozen vector instructions per block of 32 weights: at SmolLM2's 134 M weights per token
//! that, not the memory, bounds a decode step (BENCHMARKS §9). Here each input row is rounded
//! once per call, per block of 32 values, to integers ([`RoundedRows`]: scale
//! `dx = max|x| / L`, `qx = round(x / dx)` with `L` = 127 or 32,767, and the block's exact f32
//! sum), and a block's product is integer multiply-adds (8 bits: one `vpdpbusd`, 32 weight
//! bytes × 32 activation bytes into 8 sums of 4 products; 16 bits: one `vpdpwssd`, 32 × 32
//! words into 16 sums of 2), exact, scaled once: for Q4_1 `Σ w·x = d·dx·Σ q·qx + m·Σ x`, for
//! Q8_0 `d·dx·Σ q·qx`. The weights multiplied are the file's own, exactly; the activations
//! carry a rounding error of at most `dx / 2` per value: ≤ 0.4% of the block's largest at 8
//! bits (about bf16's), ≤ 0.0015% at 16.
//!
//! Numerics are defined by the portable [`rows_times_blocks_portable`] (integer sums per
//! lane, one fused multiply-add per lane and block into one of two accumulators by the
//! block's parity — two dependency chains — the accumulators added, the lanes summed by
//! halves, then the Q4_1 minimum's two chains): the VNNI kernels give its results bit for bit
//! (`tests::the_vnni_kernels_equal_the_portable_one`), within the rounding bound of the f32
//! products (`tests::products_stay_within_the_rounding_bound`).

use crate::error::{Result, invalid_input};
use crate::quant::{BLOCK, BlockKind};

/// The precision of the CPU's weight products over a GGUF's blocks: a decode step's or
/// batch's 1–8 rows and the logits of a call's last row (many rows multiply the f32 copy or
/// its bf16 packing, `CpuMatmulPrecision`). The library's default is f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuDecodePrecision {
    /// Each block dequantised with the loader's formula, products and sums in f32: the
    /// values multiplied are the f32 copy's.
    #[default]
    F32,
    /// The rows rounded to 16 bits per block of 32 values and multiplied in integers (this
    /// module), on CPUs with AVX-512 VNNI for an f32 model that kept its blocks; f32
    /// elsewhere.
    Q16,
    /// The same at 8 bits (llama.cpp's CPU scheme): fewer instructions per block, a
    /// rounding error about bf16's.
    Q8,
}

impl CpuDecodePrecision {
    /// `f32`, `q16` or `q8`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "f32" => Ok(Self::F32),
            "q16" => Ok(Self::Q16),
            "q8" => Ok(Self::Q8),
            other => Err(invalid_input(format!(
                "unknown CPU decode precision `{other}` (expected f32, q16 or q8)"
            ))),
        }
    }
}

/// Whether this CPU runs the integer products (AVX-512 VNNI, BW and DQ, F16C).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// An integer type the rows are rounded to.
pub(crate) trait Level: Copy + Default + Into<i32> + Send + Sync {
    /// The largest magnitude used (the type's maximum; its minimum is left out so that a
    /// sign flips without overflow).
    const MAX: f32;
    /// Products summed per lane of the kernel's integer multiply-add.
    const PER_LANE: usize;
    /// `v`, already rounded and within `±MAX`.
    fn from_rounded(v: f32) -> Self;
}

impl Level for i8 {
    const MAX: f32 = 127.0;
    const PER_LANE: usize = 4;
    fn from_rounded(v: f32) -> Self {
        v as i8
    }
}

impl Level for i16 {
    const MAX: f32 = 32767.0;
    const PER_LANE: usize = 2;
    fn from_rounded(v: f32) -> Self {
        v as i16
    }
}

/// `n` input rows rounded to integers of type `T` per block of 32 values.
#[derive(Debug)]
pub(crate) struct RoundedRows<T> {
    n: usize,
    /// Blocks per row (`cols / 32`).
    blocks: usize,
    /// `[n, cols]` rounded values, `round(x / dx)` within `±T::MAX`.
    q: Vec<T>,
    /// `[n, blocks]` scales `dx = max|x| / T::MAX` (0 for a block of zeros).
    d: Vec<f32>,
    /// `[n, blocks]` exact f32 sums of each block's values (in order).
    sum: Vec<f32>,
}

impl<T: Level> RoundedRows<T> {
    /// Rounds `n` rows of `cols` values (`x` row-major; `cols` a multiple of 32).
    pub(crate) fn new(x: &[f32], n: usize, cols: usize) -> Self {
        assert!(cols.is_multiple_of(BLOCK) && x.len() == n * cols);
        let blocks = cols / BLOCK;
        let mut q = vec![T::default(); n * cols];
        let mut d = Vec::with_capacity(n * blocks);
        let mut sum = Vec::with_capacity(n * blocks);
        for (xs, qs) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)) {
            let max = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
            let dx = max / T::MAX;
            let inv = if dx > 0.0 { 1.0 / dx } else { 0.0 };
            for (o, v) in qs.iter_mut().zip(xs) {
                // |v · inv| ≤ MAX up to rounding; the clamp keeps it there
                *o = T::from_rounded((v * inv).round().clamp(-T::MAX, T::MAX));
            }
            d.push(dx);
            sum.push(xs.iter().sum());
        }
        Self {
            n,
            blocks,
            q,
            d,
            sum,
        }
    }
}

/// A call's rows rounded at the width a precision asks for.
pub(crate) enum Rounded {
    /// `Q8`'s rows.
    I8(RoundedRows<i8>),
    /// `Q16`'s rows.
    I16(RoundedRows<i16>),
}

impl Rounded {
    /// `n` rows of `cols` values rounded for `precision`; `None` for `F32` or on a CPU
    /// without the kernels ([`available`]).
    pub(crate) fn new(
        precision: CpuDecodePrecision,
        x: &[f32],
        n: usize,
        cols: usize,
    ) -> Option<Self> {
        match precision {
            _ if !available() => None,
            CpuDecodePrecision::F32 => None,
            CpuDecodePrecision::Q16 => Some(Self::I16(RoundedRows::new(x, n, cols))),
            CpuDecodePrecision::Q8 => Some(Self::I8(RoundedRows::new(x, n, cols))),
        }
    }

    /// [`rows_times_blocks`] at this width.
    pub(crate) fn times_blocks(&self, kind: BlockKind, w: &[u8], rb: usize, out: &mut [f32]) {
        match self {
            Self::I8(x) => rows_times_blocks(kind, x, w, rb, out),
            Self::I16(x) => rows_times_blocks(kind, x, w, rb, out),
        }
    }
}

/// `out[c * n + r] = x[r] · w[c]` for the `n` rounded rows of `x` and the rows `c` of `w`
/// (blocks of `rb` bytes per row, `rb` being `x`'s blocks per row of `kind`): the VNNI
/// kernel where [`available`] (8 or 16 bits, 1–8 rows), else the portable one (the same
/// bits).
pub(crate) fn rows_times_blocks<T: Level>(
    kind: BlockKind,
    x: &RoundedRows<T>,
    w: &[u8],
    rb: usize,
    out: &mut [f32],
) {
    assert!(
        rb == x.blocks * kind.bytes()
            && w.len().is_multiple_of(rb)
            && out.len() >= x.n * (w.len() / rb)
    );
    #[cfg(target_arch = "x86_64")]
    if available() && (1..=8).contains(&x.n) {
        // SAFETY: the CPU has every feature the kernels are compiled for (`available`), the
        // shapes were asserted above and the row count is one the kernels take.
        return unsafe { x86::rows_times_blocks(kind, x, w, rb, out) };
    }
    rows_times_blocks_portable(kind, x, w, rb, out);
}

/// The products' definition in plain Rust (see the module docs); any row count.
pub(crate) fn rows_times_blocks_portable<T: Level>(
    kind: BlockKind,
    x: &RoundedRows<T>,
    w: &[u8],
    rb: usize,
    out: &mut [f32],
) {
    let (n, blocks, bb) = (x.n, x.blocks, kind.bytes());
    let lanes = BLOCK / T::PER_LANE;
    let mut wq = [0i32; BLOCK];
    for (c, row) in w.chunks_exact(rb).enumerate() {
        // per row, two accumulators (even and odd blocks) of `lanes`, and two minimum sums
        let mut acc = vec![0f32; n * 2 * lanes];
        let mut msum = vec![0f32; n * 2];
        for k in 0..blocks {
            let b = &row[k * bb..][..bb];
            let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            let m = unpack(kind, b, &mut wq);
            let parity = k % 2;
            for r in 0..n {
                let at = r * blocks + k;
                let xq = &x.q[at * BLOCK..][..BLOCK];
                let s = d * x.d[at];
                let acc = &mut acc[(r * 2 + parity) * lanes..][..lanes];
                for (lane, a) in acc.iter_mut().enumerate() {
                    let p: i32 = (lane * T::PER_LANE..(lane + 1) * T::PER_LANE)
                        .map(|j| wq[j] * xq[j].into())
                        .sum();
                    *a = (p as f32).mul_add(s, *a);
                }
                if kind == BlockKind::Q4_1 {
                    let ms = &mut msum[r * 2 + parity];
                    *ms = m.mul_add(x.sum[at], *ms);
                }
            }
        }
        for r in 0..n {
            let (even, odd) = acc[r * 2 * lanes..][..2 * lanes].split_at(lanes);
            let mut v: Vec<f32> = even.iter().zip(odd).map(|(a, b)| a + b).collect();
            out[c * n + r] = sum_by_halves(&mut v) + (msum[r * 2] + msum[r * 2 + 1]);
        }
    }
}

/// The sum of `v` (a power of two long) by halves: `v[i] += v[i + len / 2]` until one is left.
fn sum_by_halves(v: &mut [f32]) -> f32 {
    let mut len = v.len();
    while len > 1 {
        len /= 2;
        for i in 0..len {
            v[i] += v[i + len];
        }
    }
    v[0]
}

/// A block's 32 integer weights in value order, and its minimum (0 for Q8_0).
fn unpack(kind: BlockKind, b: &[u8], wq: &mut [i32; BLOCK]) -> f32 {
    match kind {
        BlockKind::Q4_1 => {
            for j in 0..BLOCK / 2 {
                wq[j] = i32::from(b[4 + j] & 0x0f);
                wq[j + BLOCK / 2] = i32::from(b[4 + j] >> 4);
            }
            half::f16::from_le_bytes([b[2], b[3]]).to_f32()
        }
        BlockKind::Q8_0 => {
            for (j, q) in wq.iter_mut().enumerate() {
                *q = i32::from(b[2 + j] as i8);
            }
            0.0
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Level, RoundedRows};
    use crate::quant::{BLOCK, BlockKind};

    /// Dispatches to the 8- or 16-bit kernel for `x`'s row count.
    ///
    /// # Safety
    /// As [`rows_times_blocks_n`]; `x` has 1–8 rows.
    pub(super) unsafe fn rows_times_blocks<T: Level>(
        kind: BlockKind,
        x: &RoundedRows<T>,
        w: &[u8],
        rb: usize,
        out: &mut [f32],
    ) {
        macro_rules! dispatch {
            ($($n:literal)*) => {
                match x.n {
                    // SAFETY: the caller's contract, `N` being `x.n`.
                    $($n => unsafe { rows_times_blocks_n::<T, $n>(kind, x, w, rb, out) },)*
                    _ => unreachable!("1–8 rows (checked by the caller)"),
                }
            };
        }
        dispatch!(1 2 3 4 5 6 7 8);
    }

    /// One row's accumulators over every other block (one dependency chain): the lanes
    /// (8 for 8-bit rows, 16 for 16-bit ones; the other array unused) and the Q4_1
    /// minimum's sum.
    #[derive(Clone, Copy)]
    struct Chain {
        acc8: __m256,
        acc16: __m512,
        msum: f32,
    }

    /// [`super::rows_times_blocks_portable`] for `N` rows: a block's 32 weights unpacked
    /// once into one register in value order (Q4_1: the low nibbles, then the high ones),
    /// then per row one integer multiply-add against the row's 32 rounded values
    /// (`vpdpbusd` on 256-bit vectors at 8 bits — Q8_0 through the sign trick, `|q|` times
    /// `qx` with `q`'s sign — `vpdpwssd` on 512-bit vectors at 16), its lanes converted and
    /// added with one fused multiply-add; even and odd blocks into two chains held in
    /// registers, then the lanes summed by halves.
    ///
    /// # Safety
    /// The CPU has the features enabled here; `rb` is `x`'s blocks per row of `kind`, `w`
    /// holds whole rows of `rb` bytes, `out` `N` values per row of `w`, and `x` has `N`
    /// rows of `i8` or `i16` values.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    unsafe fn rows_times_blocks_n<T: Level, const N: usize>(
        kind: BlockKind,
        x: &RoundedRows<T>,
        w: &[u8],
        rb: usize,
        out: &mut [f32],
    ) {
        // SAFETY: `block` reads block `k < blocks` of a row of `w` and row `r < N` block `k`
        // of `x` (the caller's contract); every store writes `out[c * N + r]` for a row `c`
        // of `w`.
        unsafe {
            let (blocks, bb) = (x.blocks, kind.bytes());
            debug_assert!(x.n == N && rb == blocks * bb && out.len() >= N * (w.len() / rb));
            let zero = Chain {
                acc8: _mm256_setzero_ps(),
                acc16: _mm512_setzero_ps(),
                msum: 0.0,
            };
            for (c, row) in w.chunks_exact(rb).enumerate() {
                let (mut even, mut odd) = ([zero; N], [zero; N]);
                let mut k = 0;
                while k + 1 < blocks {
                    block(kind, row.as_ptr().add(k * bb), x, k, &mut even);
                    block(kind, row.as_ptr().add((k + 1) * bb), x, k + 1, &mut odd);
                    k += 2;
                }
                if k < blocks {
                    block(kind, row.as_ptr().add(k * bb), x, k, &mut even);
                }
                for r in 0..N {
                    // the lanes summed by halves, as `sum_by_halves`
                    let v8 = if T::PER_LANE == 2 {
                        let v = _mm512_add_ps(even[r].acc16, odd[r].acc16);
                        _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v))
                    } else {
                        _mm256_add_ps(even[r].acc8, odd[r].acc8)
                    };
                    let v4 = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps::<1>(v8));
                    let v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
                    let v1 = _mm_add_ss(v2, _mm_movehdup_ps(v2));
                    *out.get_unchecked_mut(c * N + r) =
                        _mm_cvtss_f32(v1) + (even[r].msum + odd[r].msum);
                }
            }
        }
    }

    /// Block `k` (at `b`) of one weight row times block `k` of each of `x`'s `N` rows, into
    /// `chains`.
    ///
    /// # Safety
    /// Inlined into [`rows_times_blocks_n`] (its features); `b` points at a whole block of
    /// `kind`, `k` is a block of `x`'s rows, and `x` has `N` rows.
    #[inline(always)]
    unsafe fn block<T: Level, const N: usize>(
        kind: BlockKind,
        b: *const u8,
        x: &RoundedRows<T>,
        k: usize,
        chains: &mut [Chain; N],
    ) {
        // SAFETY: the caller's contract bounds every read (the first 4 bytes of a block hold
        // its f16 scale and, for Q4_1, minimum; a Q8_0 block's 34 bytes cover the 4 read).
        unsafe {
            let blocks = x.blocks;
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(b.cast::<i32>().read_unaligned()));
            let d = _mm_cvtss_f32(dm);
            let xq = |r: usize| x.q.as_ptr().add((r * blocks + k) * BLOCK);
            let scale = |r: usize| d * *x.d.get_unchecked(r * blocks + k);
            if T::PER_LANE == 2 {
                let wz = match kind {
                    BlockKind::Q4_1 => {
                        let q = _mm256_cvtepu8_epi16(_mm_loadu_si128(b.add(4).cast()));
                        let lo = _mm256_and_si256(q, _mm256_set1_epi16(0x0f));
                        let hi = _mm256_srli_epi16::<4>(q);
                        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
                    }
                    BlockKind::Q8_0 => _mm512_cvtepi8_epi16(_mm256_loadu_si256(b.add(2).cast())),
                };
                for (r, ch) in chains.iter_mut().enumerate() {
                    let xv = _mm512_loadu_si512(xq(r).cast());
                    let p = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wz, xv);
                    let s = _mm512_set1_ps(scale(r));
                    ch.acc16 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s, ch.acc16);
                }
            } else {
                let zero = _mm256_setzero_si256();
                match kind {
                    BlockKind::Q4_1 => {
                        let q = _mm_loadu_si128(b.add(4).cast());
                        let wv = _mm256_and_si256(
                            _mm256_set_m128i(_mm_srli_epi16::<4>(q), q),
                            _mm256_set1_epi8(0x0f),
                        );
                        for (r, ch) in chains.iter_mut().enumerate() {
                            let xv = _mm256_loadu_si256(xq(r).cast());
                            let p = _mm256_dpbusd_epi32(zero, wv, xv);
                            let s = _mm256_set1_ps(scale(r));
                            ch.acc8 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, ch.acc8);
                        }
                    }
                    BlockKind::Q8_0 => {
                        let wv = _mm256_loadu_si256(b.add(2).cast());
                        let magnitude = _mm256_sign_epi8(wv, wv);
                        for (r, ch) in chains.iter_mut().enumerate() {
                            let xv = _mm256_loadu_si256(xq(r).cast());
                            let p = _mm256_dpbusd_epi32(zero, magnitude, _mm256_sign_epi8(xv, wv));
                            let s = _mm256_set1_ps(scale(r));
                            ch.acc8 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, ch.acc8);
                        }
                    }
                }
            }
            if kind == BlockKind::Q4_1 {
                let m = _mm_cvtss_f32(_mm_movehdup_ps(dm));
                for (r, ch) in chains.iter_mut().enumerate() {
                    ch.msum = m.mul_add(*x.sum.get_unchecked(r * blocks + k), ch.msum);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;

    use super::*;
    use crate::bf16dot::tests::values;
    use crate::quant::BlockRows;

    /// `quant`'s test weights as blocks, and their dequantised values.
    fn blocks(kind: GgmlDType, rows: usize, cols: usize, seed: u64) -> (BlockRows, Vec<f32>) {
        let (q, deq) = crate::quant::tests::quantized(kind, rows, cols, seed);
        let deq: Vec<f32> = deq.flatten_all().unwrap().to_vec1().unwrap();
        (BlockRows::from_qtensor(&q).unwrap().unwrap(), deq)
    }

    fn rounds_within_half_a_step<T: Level>() {
        let mut x = values(3 * 64, 5);
        x[64..96].fill(0.0);
        x[3] = 7.5; // an outlier sets its block's step
        let q = RoundedRows::<T>::new(&x, 3, 64);
        assert_eq!((q.n, q.blocks), (3, 2));
        for (b, xs) in x.chunks_exact(BLOCK).enumerate() {
            let d = q.d[b];
            for (j, v) in xs.iter().enumerate() {
                let back = Into::<i32>::into(q.q[b * BLOCK + j]) as f32 * d;
                assert!((back - v).abs() <= d / 2.0 * 1.0001, "block {b}, value {j}");
            }
            assert_eq!(q.sum[b], xs.iter().sum::<f32>());
        }
        assert_eq!(q.d[2], 0.0);
        assert!(q.q[64..96].iter().all(|&v| Into::<i32>::into(v) == 0));
    }

    /// Rounding: every value within half a step of its block's scale, a block of zeros all
    /// zero, sums exact; both widths.
    #[test]
    fn rows_round_within_half_a_step() {
        rounds_within_half_a_step::<i8>();
        rounds_within_half_a_step::<i16>();
    }

    fn kernel_equals_portable<T: Level>() {
        for kind in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (b, _) = blocks(kind, 37, 160, 11);
            for n in 1..=crate::quant::MOST_ROWS {
                let x = RoundedRows::<T>::new(&values(n * 160, 3 + n as u64), n, 160);
                let mut portable = vec![0f32; n * 37];
                rows_times_blocks_portable(b.kind(), &x, b.data(), b.row_bytes(), &mut portable);
                let mut fast = vec![0f32; n * 37];
                rows_times_blocks(b.kind(), &x, b.data(), b.row_bytes(), &mut fast);
                assert_eq!(
                    fast.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    portable.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{kind:?}, {n} rows, {} products per lane",
                    T::PER_LANE
                );
            }
        }
    }

    /// The VNNI kernels give the portable products bit for bit, both block kinds, both
    /// widths, every row count (skipped on a CPU without AVX-512 VNNI).
    #[test]
    fn the_vnni_kernels_equal_the_portable_one() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        kernel_equals_portable::<i8>();
        kernel_equals_portable::<i16>();
    }

    /// Against the f32 products of the dequantised weights, each output within the bound the
    /// activations' rounding allows (`Σ |d·q| · dx / 2` over the blocks: the minimum's term
    /// multiplies the exact sums), plus f32 noise; returns the largest error over its bound.
    fn within_the_rounding_bound<T: Level>(kind: GgmlDType) -> f32 {
        let (rows, cols, n) = (29, 192, 3);
        let (b, deq) = blocks(kind, rows, cols, 17);
        // each block's minimum (0 for Q8_0): `d·q = w - m`
        let mins: Vec<f32> = b
            .data()
            .chunks_exact(b.kind().bytes())
            .map(|blk| match b.kind() {
                BlockKind::Q4_1 => half::f16::from_le_bytes([blk[2], blk[3]]).to_f32(),
                BlockKind::Q8_0 => 0.0,
            })
            .collect();
        let x = values(n * cols, 23);
        let q = RoundedRows::<T>::new(&x, n, cols);
        let mut got = vec![0f32; n * rows];
        rows_times_blocks(b.kind(), &q, b.data(), b.row_bytes(), &mut got);
        let per_row = cols / BLOCK;
        let mut worst = 0f32;
        for c in 0..rows {
            for r in 0..n {
                let (w, xs) = (&deq[c * cols..][..cols], &x[r * cols..][..cols]);
                let exact: f64 = w.iter().zip(xs).map(|(a, b)| f64::from(a * b)).sum();
                let bound: f32 = w
                    .chunks_exact(BLOCK)
                    .enumerate()
                    .map(|(k, wb)| {
                        let m = mins[c * per_row + k];
                        wb.iter().map(|v| (v - m).abs()).sum::<f32>() * q.d[r * per_row + k] / 2.0
                    })
                    .sum();
                let err = (f64::from(got[c * n + r]) - exact).abs() as f32;
                assert!(
                    err <= bound * 1.001 + 1e-4,
                    "{kind:?} row {c}, input {r}: {err} > {bound}"
                );
                worst = worst.max(err / bound);
            }
        }
        worst
    }

    /// Both widths and block kinds stay within the rounding bound; at 8 bits the bound is
    /// not vacuous (errors reach a measurable part of it, so a kernel that ignored the
    /// rounding's sign or scale would fail).
    #[test]
    fn products_stay_within_the_rounding_bound() {
        for kind in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let worst = within_the_rounding_bound::<i8>(kind);
            assert!(worst > 0.01 && worst < 0.5, "{kind:?} at 8 bits: {worst}");
            within_the_rounding_bound::<i16>(kind);
        }
    }
}
