//! Weights kept in their GGUF blocks beside their f32 copies, for the CPU's few-row
//! projections (a decode step's: one row per sequence).
//!
//! A CPU decode step at batch 1 is bound by reading the weights: SmolLM2's 540 MB of f32 per
//! token. The default GGUF stores them as Q4_1 (0.625 bytes per weight) and Q8_0 (1.06), so a
//! projection that reads the blocks and dequantises them as it goes reads 3.8–6.4× fewer
//! bytes. Each weight is dequantised with the loader's own formula in f32 (candle's
//! `to_float`: Q4_1 `q·d + m`, Q8_0 `q·d`, no fused multiply-add), so the values multiplied
//! are bit for bit the f32 copy's; only the order of the sums differs, as between any two
//! matmuls (`tests::block_rows_match_the_dequantised_matmul`). Prefill (many rows) keeps the
//! f32 copy and its matmul.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{Result, invalid_input};
use crate::intdot::{CpuDecodePrecision, Rounded};

/// Values per block (both kinds).
pub(crate) const BLOCK: usize = 32;

/// Output rows handled per rayon task.
const ROWS_PER_TASK: usize = 32;

/// Most input rows one call takes (a decode batch's, as `vmath::few_rows_linear`).
pub(crate) const MOST_ROWS: usize = crate::vmath::FEW_ROWS_LINEAR_MAX;

/// The block layouts kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BlockKind {
    /// f16 scale `d`, f16 minimum `m`, 16 bytes of nibbles: value `j < 16` is byte `j`'s low
    /// nibble, value `16 + j` its high nibble; `q·d + m`.
    Q4_1,
    /// f16 scale `d`, 32 signed bytes; `q·d`.
    Q8_0,
}

impl BlockKind {
    /// Bytes per block of 32 values.
    pub(crate) fn bytes(self) -> usize {
        match self {
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// A `[rows, cols]` weight as GGUF blocks, row-major (each row `cols / 32` blocks).
#[derive(Clone)]
pub(crate) struct BlockRows {
    kind: BlockKind,
    rows: usize,
    cols: usize,
    data: Arc<Vec<u8>>,
}

impl std::fmt::Debug for BlockRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockRows")
            .field("kind", &self.kind)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

impl BlockRows {
    /// The blocks of a 2-D Q4_1 or Q8_0 tensor (`[rows, cols]`); `None` for any other.
    pub(crate) fn from_qtensor(q: &QTensor) -> Result<Option<Self>> {
        let kind = match q.dtype() {
            GgmlDType::Q4_1 => BlockKind::Q4_1,
            GgmlDType::Q8_0 => BlockKind::Q8_0,
            _ => return Ok(None),
        };
        let &[rows, cols] = q.shape().dims() else {
            return Ok(None);
        };
        let data = q.data()?;
        if !cols.is_multiple_of(BLOCK) || data.len() != rows * cols / BLOCK * kind.bytes() {
            return Err(invalid_input(format!(
                "{kind:?} blocks of {} bytes for a [{rows}, {cols}] tensor",
                data.len()
            )));
        }
        Ok(Some(Self {
            kind,
            rows,
            cols,
            data: Arc::new(data.into_owned()),
        }))
    }

    /// Rows (output features).
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes per row.
    pub(crate) fn row_bytes(&self) -> usize {
        self.cols / BLOCK * self.kind.bytes()
    }

    /// The block layout.
    #[cfg(test)]
    pub(crate) fn kind(&self) -> BlockKind {
        self.kind
    }

    /// The blocks, row-major.
    #[cfg(test)]
    pub(crate) fn data(&self) -> &[u8] {
        &self.data
    }

    /// Row `i` of the result is row `from[i]` of this one.
    pub(crate) fn permute_rows(&self, from: &[usize]) -> Result<Self> {
        if from.len() != self.rows || from.iter().any(|&r| r >= self.rows) {
            return Err(invalid_input("a row permutation of the wrong rows"));
        }
        let rb = self.row_bytes();
        let mut data = Vec::with_capacity(self.data.len());
        for &r in from {
            data.extend_from_slice(&self.data[r * rb..][..rb]);
        }
        Ok(Self {
            data: Arc::new(data),
            ..self.clone()
        })
    }

    /// `parts` stacked row-wise (one kind and width), as `Tensor::cat(.., 0)` stacks their
    /// f32 copies; `None` when they differ.
    pub(crate) fn cat(parts: &[&Self]) -> Option<Self> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.kind != first.kind || p.cols != first.cols)
        {
            return None;
        }
        let mut data = Vec::with_capacity(parts.iter().map(|p| p.data.len()).sum());
        for p in parts {
            data.extend_from_slice(&p.data);
        }
        Some(Self {
            kind: first.kind,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols: first.cols,
            data: Arc::new(data),
        })
    }

    /// `x · wᵀ` for `x` `[n, cols]` (f32, CPU, 1 ≤ n ≤ [`MOST_ROWS`]): `[n, rows]`. Output
    /// features are spread over rayon's pool; each block is read once for all `n` rows. At
    /// `Q16` or `Q8` (on a CPU that runs them, [`crate::intdot::available`]) the rows are
    /// rounded to integers per block and multiplied in integers ([`crate::intdot`]); at `F32`
    /// each block is dequantised with the loader's formula and multiplied in f32.
    pub(crate) fn linear(&self, x: &Tensor, precision: CpuDecodePrecision) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        if d != self.cols
            || n == 0
            || n > MOST_ROWS
            || x.dtype() != DType::F32
            || !x.device().is_cpu()
        {
            return Err(invalid_input(format!(
                "block projection of [{}, {}] takes f32 [1..={MOST_ROWS}, {}] on the CPU, got {:?} {:?}",
                self.rows,
                self.cols,
                self.cols,
                x.dims(),
                x.dtype()
            )));
        }
        let rb = self.row_bytes();
        // each task: its rows' outputs for every input row, output-major
        let blocks: Vec<Vec<f32>> = crate::vmath::with_cpu_f32(x, |xv| {
            let rounded = Rounded::new(precision, xv, n, d);
            Ok(self
                .data
                .par_chunks(ROWS_PER_TASK * rb)
                .map(|w| {
                    let mut out = vec![0f32; n * (w.len() / rb)];
                    match &rounded {
                        Some(q) => q.times_blocks(self.kind, w, rb, &mut out),
                        None => rows_times_blocks(self.kind, xv, n, w, rb, &mut out),
                    }
                    out
                })
                .collect())
        })?;
        let mut y = vec![0f32; n * self.rows];
        for (i, block) in blocks.iter().enumerate() {
            let (j0, cols) = (i * ROWS_PER_TASK, block.len() / n);
            for c in 0..cols {
                for r in 0..n {
                    y[r * self.rows + j0 + c] = block[c * n + r];
                }
            }
        }
        Ok(Tensor::from_vec(y, (n, self.rows), &Device::Cpu)?)
    }

    /// The f32 values (the loader's dequantisation), `[rows * cols]`.
    #[cfg(test)]
    fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; BLOCK];
        let mut all = Vec::with_capacity(self.rows * self.cols);
        for b in self.data.chunks_exact(self.kind.bytes()) {
            dequantize_block(self.kind, b, &mut out);
            all.extend_from_slice(&out);
        }
        all
    }
}

/// One block's 32 values, exactly as candle's `to_float` computes them.
#[inline(always)]
fn dequantize_block(kind: BlockKind, b: &[u8], out: &mut [f32]) {
    let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    match kind {
        BlockKind::Q4_1 => {
            let m = half::f16::from_le_bytes([b[2], b[3]]).to_f32();
            let qs = &b[4..20];
            for j in 0..BLOCK / 2 {
                out[j] = (qs[j] & 0x0f) as f32 * d + m;
                out[j + BLOCK / 2] = (qs[j] >> 4) as f32 * d + m;
            }
        }
        BlockKind::Q8_0 => {
            for j in 0..BLOCK {
                out[j] = (b[2 + j] as i8) as f32 * d;
            }
        }
    }
}

/// `out[c * n + r] = x[r] · w[c]` for the `n` rows of `x` and the rows `c` of `w` (blocks of
/// `rb` bytes per row), with the widest vector unit the CPU has: AVX-512 in intrinsics
/// ([`rows_times_blocks_avx512_n`], 1.2–1.4× the autovectorised kernel at one row on the CPU
/// VM), else the portable kernel compiled for AVX2 + FMA or for the baseline; all give the
/// same bits.
fn rows_times_blocks(kind: BlockKind, x: &[f32], n: usize, w: &[u8], rb: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, the only feature the function is compiled for; it
            // checks the shapes the intrinsics kernel relies on.
            return unsafe { rows_times_blocks_avx512(kind, x, n, w, rb, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA, the features the function is compiled for.
            return unsafe { rows_times_blocks_avx2(kind, x, n, w, rb, out) };
        }
    }
    rows_times_blocks_any(kind, x, n, w, rb, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_times_blocks_avx512(
    kind: BlockKind,
    x: &[f32],
    n: usize,
    w: &[u8],
    rb: usize,
    out: &mut [f32],
) {
    let cols = x.len() / n.max(1);
    if n == 0
        || x.len() != n * cols
        || cols == 0
        || !cols.is_multiple_of(BLOCK)
        || rb != cols / BLOCK * kind.bytes()
        || !w.len().is_multiple_of(rb)
        || out.len() < n * (w.len() / rb)
    {
        // (shapes the caller never passes: the portable kernel's own checks panic on them)
        return rows_times_blocks_any(kind, x, n, w, rb, out);
    }
    macro_rules! dispatch {
        ($($n:literal)*) => {
            match n {
                // SAFETY: AVX-512F is this function's feature; the shapes were checked above.
                $($n => unsafe { rows_times_blocks_avx512_n::<$n>(kind, x, w, rb, out) },)*
                _ => rows_times_blocks_any(kind, x, n, w, rb, out),
            }
        };
    }
    dispatch!(1 2 3 4 5 6 7 8)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_times_blocks_avx2(
    kind: BlockKind,
    x: &[f32],
    n: usize,
    w: &[u8],
    rb: usize,
    out: &mut [f32],
) {
    rows_times_blocks_any(kind, x, n, w, rb, out)
}

/// The kernel's body, compiled into each of the wrappers above (vectorised for their unit),
/// for each row count up to [`MOST_ROWS`].
#[inline(always)]
fn rows_times_blocks_any(
    kind: BlockKind,
    x: &[f32],
    n: usize,
    w: &[u8],
    rb: usize,
    out: &mut [f32],
) {
    macro_rules! dispatch {
        ($($n:literal)*) => {
            match n {
                $($n => rows_times_blocks_n::<$n>(kind, x, w, rb, out),)*
                _ => unreachable!("at most {MOST_ROWS} rows (checked by the caller)"),
            }
        };
    }
    dispatch!(1 2 3 4 5 6 7 8)
}

/// [`rows_times_blocks_any`] for `N` rows: every row's accumulators advance together over
/// each dequantised block, so the block is dequantised once for all of them.
#[inline(always)]
fn rows_times_blocks_n<const N: usize>(
    kind: BlockKind,
    x: &[f32],
    w: &[u8],
    rb: usize,
    out: &mut [f32],
) {
    let d = x.len() / N;
    let mut vals = [0f32; BLOCK];
    for (c, row) in w.chunks_exact(rb).enumerate() {
        let mut acc = [[0f32; BLOCK]; N];
        for (k, b) in row.chunks_exact(kind.bytes()).enumerate() {
            dequantize_block(kind, b, &mut vals);
            for (r, a) in acc.iter_mut().enumerate() {
                let xs = &x[r * d + k * BLOCK..][..BLOCK];
                for j in 0..BLOCK {
                    a[j] = vals[j].mul_add(xs[j], a[j]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            out[c * N + r] = a.iter().sum();
        }
    }
}

/// [`rows_times_blocks_n`] in AVX-512 intrinsics: the same values in the same lanes (a
/// block's 32 values as two vectors of 16: Q4_1's low nibbles then its high ones), each
/// dequantised with the loader's formula (a multiply, then for Q4_1 an add: no fused
/// multiply-add), accumulated with a fused multiply-add per lane as the portable kernel
/// does, and the 32 lanes summed in the same order — so the results are bit for bit the
/// portable kernel's (`tests::the_avx512_kernel_equals_the_portable_one`).
///
/// # Safety
/// The CPU has AVX-512F; `x` holds `N` rows of `cols` values and `w` whole rows of `rb`
/// bytes, `rb` being `cols / 32` blocks of `kind`; `out` holds `N` values per row of `w`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_times_blocks_avx512_n<const N: usize>(
    kind: BlockKind,
    x: &[f32],
    w: &[u8],
    rb: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;

    // SAFETY: for every operation below, AVX-512F is this function's feature, and the
    // caller's contract bounds every load and store: block `k` of row `c` lies in `w`, its
    // `x` values at `r * cols + k * 32 .. + 32` in `x`, and `out[c * N + r]` in `out`.
    unsafe {
        let cols = x.len() / N;
        let blocks = cols / BLOCK;
        let bb = kind.bytes();
        debug_assert!(
            rb == blocks * bb && w.len().is_multiple_of(rb) && out.len() >= N * (w.len() / rb)
        );
        let nibble = _mm512_set1_epi32(0x0f);
        for (c, row) in w.chunks_exact(rb).enumerate() {
            let mut lo = [_mm512_setzero_ps(); N];
            let mut hi = [_mm512_setzero_ps(); N];
            for k in 0..blocks {
                let b = row.as_ptr().add(k * bb);
                let d = _mm512_set1_ps(half::f16::from_le_bytes([*b, *b.add(1)]).to_f32());
                let (vl, vh) = match kind {
                    BlockKind::Q4_1 => {
                        let m = _mm512_set1_ps(
                            half::f16::from_le_bytes([*b.add(2), *b.add(3)]).to_f32(),
                        );
                        let q = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.add(4).cast()));
                        let ql = _mm512_cvtepi32_ps(_mm512_and_si512(q, nibble));
                        let qh = _mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(q));
                        (
                            _mm512_add_ps(_mm512_mul_ps(ql, d), m),
                            _mm512_add_ps(_mm512_mul_ps(qh, d), m),
                        )
                    }
                    BlockKind::Q8_0 => {
                        let ql = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(2).cast()));
                        let qh = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(18).cast()));
                        (
                            _mm512_mul_ps(_mm512_cvtepi32_ps(ql), d),
                            _mm512_mul_ps(_mm512_cvtepi32_ps(qh), d),
                        )
                    }
                };
                for r in 0..N {
                    let xs = x.as_ptr().add(r * cols + k * BLOCK);
                    lo[r] = _mm512_fmadd_ps(vl, _mm512_loadu_ps(xs), lo[r]);
                    hi[r] = _mm512_fmadd_ps(vh, _mm512_loadu_ps(xs.add(16)), hi[r]);
                }
            }
            for r in 0..N {
                let mut a = [0f32; BLOCK];
                _mm512_storeu_ps(a.as_mut_ptr(), lo[r]);
                _mm512_storeu_ps(a.as_mut_ptr().add(16), hi[r]);
                out[c * N + r] = a.iter().sum();
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use candle_core::quantized::QTensor;

    use super::*;

    /// A `[rows, cols]` tensor of values in [-1, 1] quantised to `kind`, and its
    /// dequantisation.
    pub(crate) fn quantized(
        kind: GgmlDType,
        rows: usize,
        cols: usize,
        seed: u64,
    ) -> (QTensor, Tensor) {
        let mut s = seed;
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, kind).unwrap();
        let deq = q.dequantize(&Device::Cpu).unwrap();
        (q, deq)
    }

    /// The AVX-512 kernel gives the portable kernel's results bit for bit, both kinds, every
    /// row count (skipped on a CPU without AVX-512F).
    #[test]
    fn the_avx512_kernel_equals_the_portable_one() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            for kind in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
                let (q, _) = quantized(kind, 37, 160, 11);
                let b = BlockRows::from_qtensor(&q).unwrap().unwrap();
                let rb = b.row_bytes();
                for n in 1..=MOST_ROWS {
                    let x: Vec<f32> = Tensor::randn(0f32, 1.0, n * 160, &Device::Cpu)
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let mut portable = vec![0f32; n * 37];
                    rows_times_blocks_any(b.kind, &x, n, &b.data, rb, &mut portable);
                    let mut wide = vec![0f32; n * 37];
                    // SAFETY: the CPU has AVX-512F (checked above).
                    unsafe { rows_times_blocks_avx512(b.kind, &x, n, &b.data, rb, &mut wide) };
                    assert_eq!(
                        wide.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        portable.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{kind:?}, {n} rows"
                    );
                }
            }
        }
    }

    /// Both kinds: the blocks dequantise to candle's values bit for bit, and every row count
    /// up to the most gives the dequantised matmul's outputs (the order of sums aside); a
    /// permutation and a stacking of rows act as on the f32 copies.
    #[test]
    fn block_rows_match_the_dequantised_matmul() {
        for kind in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (q, deq) = quantized(kind, 70, 96, 7);
            let b = BlockRows::from_qtensor(&q).unwrap().unwrap();
            let want: Vec<f32> = deq.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(b.dequantize(), want, "{kind:?} values");
            for n in 1..=MOST_ROWS {
                let x = Tensor::randn(0f32, 1.0, (n, 96), &Device::Cpu).unwrap();
                let got = b.linear(&x, CpuDecodePrecision::F32).unwrap();
                let expect = x.matmul(&deq.t().unwrap()).unwrap();
                let diff = (got - &expect)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(diff < 1e-4, "{kind:?}, {n} rows: {diff}");
            }
            let from: Vec<usize> = (0..70).rev().collect();
            let p = b.permute_rows(&from).unwrap();
            let rows: Vec<Vec<f32>> = deq.to_vec2().unwrap();
            let flipped: Vec<f32> = rows.iter().rev().flatten().copied().collect();
            assert_eq!(p.dequantize(), flipped);
            let both = BlockRows::cat(&[&b, &p]).unwrap();
            assert_eq!(both.rows(), 140);
            assert_eq!(both.dequantize(), [want.clone(), flipped].concat());
        }
        // another layout is not kept; bad calls are refused
        let (q, _) = quantized(GgmlDType::Q4_0, 4, 32, 1);
        assert!(BlockRows::from_qtensor(&q).unwrap().is_none());
        let (q, _) = quantized(GgmlDType::Q8_0, 4, 32, 1);
        let b = BlockRows::from_qtensor(&q).unwrap().unwrap();
        let wide = Tensor::zeros((MOST_ROWS + 1, 32), DType::F32, &Device::Cpu).unwrap();
        assert!(b.linear(&wide, CpuDecodePrecision::F32).is_err());
        let narrow = Tensor::zeros((1, 31), DType::F32, &Device::Cpu).unwrap();
        assert!(b.linear(&narrow, CpuDecodePrecision::Q8).is_err());
    }
}
