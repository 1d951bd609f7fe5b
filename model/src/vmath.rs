//! Vectorised f32 math for the CPU paths: a maximum, `2^x` over slices (the tiled
//! attention's softmax), the tiled attention's products for tiles of few query rows
//! ([`FewRows`]), and SwiGLU (`silu(gate) * up`) in one pass. Loops are written so
//! that they vectorise; where the CPU has AVX-512 or AVX2 + FMA, a build of the same loop for
//! those features is chosen at run time.

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{Result, invalid_input};

/// The largest value of a non-empty slice (eight lanes, so it vectorises).
pub(crate) fn max_of(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    lanes.iter().fold(tail, |a, &b| a.max(b))
}

/// Replaces each `x` by `2^(x - m)` (every `x <= m`) and returns their sum. Dispatches to an
/// AVX-512 or AVX2 build of the same loop where the CPU has it.
pub(crate) fn exp2_in_place(x: &mut [f32], m: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, the only feature the function is compiled for.
            return unsafe { exp2_avx512(x, m) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA, the features the function is compiled for.
            return unsafe { exp2_avx2(x, m) };
        }
    }
    exp2_portable(x, m)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp2_avx512(x: &mut [f32], m: f32) -> f32 {
    exp2_portable(x, m)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn exp2_avx2(x: &mut [f32], m: f32) -> f32 {
    exp2_portable(x, m)
}

#[inline(always)]
fn exp2_portable(x: &mut [f32], m: f32) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        let c: &mut [f32; 16] = c.try_into().expect("chunks of 16");
        for i in 0..16 {
            c[i] = exp2_nonpositive(c[i] - m);
            lanes[i] += c[i];
        }
    }
    let mut sum: f32 = 0.0;
    for v in chunks.into_remainder() {
        *v = exp2_nonpositive(*v - m);
        sum += *v;
    }
    lanes.iter().sum::<f32>() + sum
}

/// `2^x` for `x <= 0` to about 2e-7 relative error (Cephes' exp2f polynomial on
/// `[-0.5, 0.5]`); below -126 it returns `2^-126`, which is 0 for every sum it enters.
/// Branch-free so that loops over it vectorise.
#[inline(always)]
pub(crate) fn exp2_nonpositive(x: f32) -> f32 {
    // round to nearest by the float trick: adding 1.5 × 2^23 leaves no fraction bits
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -126.0 { -126.0 } else { x };
    let shifted = x + ROUND;
    let n = shifted - ROUND;
    let f = x - n; // in [-0.5, 0.5]
    let p = 1.535_336_2e-4_f32;
    let p = p * f + 1.339_887_4e-3;
    let p = p * f + 9.618_437e-3;
    let p = p * f + 5.550_332_5e-2;
    let p = p * f + 2.402_264_8e-1;
    let p = p * f + 6.931_472e-1;
    let two_f = p * f + 1.0;
    // the low mantissa bits of `shifted` hold n (two's complement): 2^n's exponent field
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    let two_n = f32::from_bits(n_bits.wrapping_add(127) << 23);
    two_f * two_n
}

/// Rows of a SwiGLU call handled per rayon task.
const SWIGLU_ROWS_PER_TASK: usize = 16;

/// Most rows [`few_rows_linear`] takes: past them a general matmul's packing pays for itself.
pub(crate) const FEW_ROWS_LINEAR_MAX: usize = 8;

/// Output features of one [`few_rows_linear`] task.
const LINEAR_OUTPUTS_PER_TASK: usize = 64;

/// `f` over the f32 values of `t` (a CPU tensor, made contiguous first), in row-major order.
pub(crate) fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(invalid_input(format!(
            "f32 values of a CPU tensor, not one on {:?}",
            t.device()
        )));
    };
    let start = layout.start_offset();
    f(&cpu.as_slice::<f32>()?[start..start + t.elem_count()])
}

/// `x · wᵀ` for few rows `x` `[n, in]` and a weight `w` `[out, in]` (f32, CPU, `w` packed):
/// `[n, out]`. Each weight row is read once for all `n` rows, with no packing: a decode
/// step's projections (one row per sequence of a batch), where a general matmul packs the
/// whole weight on every call and so reads it about twice. Output features are spread over
/// rayon's pool. Pinned against candle's matmul by `tests::few_rows_linear_matches_matmul`.
pub(crate) fn few_rows_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, d) = x.dims2()?;
    let (out, d_w) = w.dims2()?;
    if d != d_w
        || n > FEW_ROWS_LINEAR_MAX
        || x.dtype() != DType::F32
        || w.dtype() != DType::F32
        || !x.device().is_cpu()
        || !w.device().is_cpu()
        || !w.is_contiguous()
    {
        return Err(invalid_input(format!(
            "few-rows linear takes f32 [n <= {FEW_ROWS_LINEAR_MAX}, in] and a packed [out, in] on the CPU, got {:?} {:?} and {:?} {:?}",
            x.dims(),
            x.dtype(),
            w.dims(),
            w.dtype()
        )));
    }
    // each task: `n` rows of its outputs, output-major within the task's block
    let blocks: Vec<Vec<f32>> = with_cpu_f32(x, |xv| {
        with_cpu_f32(w, |wv| {
            Ok(wv
                .par_chunks(LINEAR_OUTPUTS_PER_TASK * d)
                .map(|wb| {
                    let mut block = vec![0f32; n * (wb.len() / d)];
                    rows_times_block(xv, wb, d, &mut block);
                    block
                })
                .collect())
        })
    })?;
    let mut y = vec![0f32; n * out];
    for (i, block) in blocks.iter().enumerate() {
        let (j0, cols) = (i * LINEAR_OUTPUTS_PER_TASK, block.len() / n.max(1));
        for r in 0..n {
            y[r * out + j0..][..cols].copy_from_slice(&block[r * cols..][..cols]);
        }
    }
    Ok(Tensor::from_vec(y, (n, out), &Device::Cpu)?)
}

/// `out[r * cols + c] = x[r] · w[c]` for the `n = x.len() / d` rows of `x` and the
/// `cols = w.len() / d` rows of `w` (1 ≤ n ≤ [`FEW_ROWS_LINEAR_MAX`]): every row's
/// accumulators advance together over each sixteen-element piece of a weight row, so the
/// weight is read once and the rows' sums are independent chains of FMAs.
fn rows_times_block(x: &[f32], w: &[f32], d: usize, out: &mut [f32]) {
    macro_rules! dispatch {
        ($($n:literal)*) => {
            match x.len() / d {
                $($n => {
                    #[cfg(target_arch = "x86_64")]
                    {
                        if std::arch::is_x86_feature_detected!("avx512f") {
                            // SAFETY: the CPU has AVX-512F, the only feature it is compiled for.
                            return unsafe { rows_times_block_avx512::<$n>(x, w, d, out) };
                        }
                        if std::arch::is_x86_feature_detected!("avx2")
                            && std::arch::is_x86_feature_detected!("fma")
                        {
                            // SAFETY: the CPU has AVX2 and FMA, the features it is compiled for.
                            return unsafe { rows_times_block_avx2::<$n>(x, w, d, out) };
                        }
                    }
                    rows_times::<$n>(x, w, d, out)
                })*
                n => panic!("rows_times_block: {n} rows (1..={FEW_ROWS_LINEAR_MAX})"),
            }
        };
    }
    dispatch!(1 2 3 4 5 6 7 8)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn rows_times_block_avx512<const N: usize>(x: &[f32], w: &[f32], d: usize, out: &mut [f32]) {
    rows_times::<N>(x, w, d, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn rows_times_block_avx2<const N: usize>(x: &[f32], w: &[f32], d: usize, out: &mut [f32]) {
    rows_times::<N>(x, w, d, out)
}

#[inline(always)]
fn rows_times<const N: usize>(x: &[f32], w: &[f32], d: usize, out: &mut [f32]) {
    let cols = w.len() / d;
    let (full, tail) = (d / 16 * 16, d % 16);
    for c in 0..cols {
        if c + PREFETCH_ROWS < cols {
            prefetch(&w[(c + PREFETCH_ROWS) * d..][..d]);
        }
        let wr = &w[c * d..][..d];
        let mut acc = [[0f32; 16]; N];
        for k in (0..full).step_by(16) {
            let wk = &wr[k..k + 16];
            for (r, a) in acc.iter_mut().enumerate() {
                let xk = &x[r * d + k..][..16];
                for i in 0..16 {
                    a[i] += wk[i] * xk[i];
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            let t: f32 = (0..tail).map(|i| wr[full + i] * x[r * d + full + i]).sum();
            out[r * cols + c] = a.iter().sum::<f32>() + t;
        }
    }
}

/// `silu(gate) * up` of a fused gate/up projection `[n, 2 * inter]` (f32, CPU): `[n, inter]`,
/// one pass over the input, rows spread over rayon's pool. `silu(x) = x · σ(x)` with `σ` from
/// `2^(−|x| log2 e)`, so the exponent is never positive (relative error about 2e-7, as the
/// tiled attention's `exp2`). Pinned against candle's `silu` and product by
/// `tests::swiglu_matches_candle`.
pub(crate) fn swiglu(gate_up: &Tensor, inter: usize) -> Result<Tensor> {
    let (n, width) = gate_up.dims2()?;
    if width != 2 * inter || gate_up.dtype() != DType::F32 || !gate_up.device().is_cpu() {
        return Err(invalid_input(format!(
            "CPU SwiGLU takes f32 [n, {}] on the CPU, got {:?} {:?} on {:?}",
            2 * inter,
            gate_up.dims(),
            gate_up.dtype(),
            gate_up.device()
        )));
    }
    let mut out = vec![0f32; n * inter];
    with_cpu_f32(gate_up, |src| {
        out.par_chunks_mut(inter * SWIGLU_ROWS_PER_TASK)
            .zip(src.par_chunks(width * SWIGLU_ROWS_PER_TASK))
            .for_each(|(o, s)| {
                for (o, row) in o.chunks_exact_mut(inter).zip(s.chunks_exact(width)) {
                    let (g, u) = row.split_at(inter);
                    swiglu_row(g, u, o);
                }
            });
        Ok(())
    })?;
    Ok(Tensor::from_vec(out, (n, inter), &Device::Cpu)?)
}

/// `o = silu(g) * u`, element by element.
fn swiglu_row(g: &[f32], u: &[f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, the only feature the function is compiled for.
            return unsafe { swiglu_avx512(g, u, o) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA, the features the function is compiled for.
            return unsafe { swiglu_avx2(g, u, o) };
        }
    }
    swiglu_portable(g, u, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn swiglu_avx512(g: &[f32], u: &[f32], o: &mut [f32]) {
    swiglu_portable(g, u, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn swiglu_avx2(g: &[f32], u: &[f32], o: &mut [f32]) {
    swiglu_portable(g, u, o)
}

#[inline(always)]
fn swiglu_portable(g: &[f32], u: &[f32], o: &mut [f32]) {
    for ((o, &x), &u) in o.iter_mut().zip(g).zip(u) {
        // e = exp(−|x|) ≤ 1; σ(x) = 1 / (1 + e) for x ≥ 0, e / (1 + e) below
        let e = exp2_nonpositive(-x.abs() * std::f32::consts::LOG2_E);
        let num = if x >= 0.0 { 1.0 } else { e };
        *o = x * (num / (1.0 + e)) * u;
    }
}

/// A tile of few query rows against strided key or value rows (a decode step's unit: one row
/// per query head of a GQA group). Both products read each key or value row once, with no
/// packing, which is what a general matmul spends most of its time on at this shape.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FewRows {
    /// Query rows, each `d` long and packed.
    pub(crate) rows: usize,
    /// Keys (values) in the tile.
    pub(crate) w: usize,
    /// Elements per row of `q`, K and V.
    pub(crate) d: usize,
    /// Elements from one key (value) row to the next.
    pub(crate) kv_stride: usize,
    /// Elements from one score row to the next.
    pub(crate) score_stride: usize,
}

impl FewRows {
    /// `scores[r * score_stride + c] = q[r] · k[c * kv_stride..][..d]` for `r < rows`, `c < w`.
    pub(crate) fn scores<T: KvElement>(self, scores: &mut [f32], q: &[f32], k: &[T]) {
        self.check(scores, q.len(), k.len());
        #[cfg(target_arch = "x86_64")]
        if crate::few_rows_avx512::takes(&self) {
            // SAFETY: `takes` checked the CPU and the head dim; `check` the slices.
            return unsafe { crate::few_rows_avx512::scores(self, scores, q, k) };
        }
        T::few_scores(self, scores, q, k)
    }

    /// `out[r * d..][..d] += Σ_c p[r * score_stride + c] · v[c * kv_stride..][..d]`.
    pub(crate) fn add_weighted<T: KvElement>(self, out: &mut [f32], p: &[f32], v: &[T]) {
        self.check(p, out.len(), v.len());
        #[cfg(target_arch = "x86_64")]
        if crate::few_rows_avx512::takes(&self) {
            // SAFETY: `takes` checked the CPU and the head dim; `check` the slices.
            return unsafe { crate::few_rows_avx512::add_weighted(self, out, p, v) };
        }
        T::few_weighted(self, out, p, v)
    }

    /// Panics unless every slice holds what the shape reads or writes (a caller's bug).
    fn check(self, scores: &[f32], rows_len: usize, kv_len: usize) {
        assert!(self.w <= self.score_stride || self.rows == 0);
        assert!(scores.len() >= self.rows.saturating_sub(1) * self.score_stride + self.w);
        assert!(rows_len >= self.rows * self.d);
        assert!(self.w == 0 || kv_len >= (self.w - 1) * self.kv_stride + self.d);
    }
}

/// Whether [`FewRows`]' products over bf16 rows of head dim `d` run in vector kernels that
/// widen sixteen elements per instruction (elsewhere each element is widened alone, slower
/// than reading f32 rows).
pub(crate) fn few_rows_widen_bf16(d: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    return crate::few_rows_avx512::takes_head_dim(d);
    #[cfg(not(target_arch = "x86_64"))]
    return {
        let _ = d;
        false
    };
}

/// What a key or value row of [`FewRows`] holds: f32 (a layer's own rows), or bf16 (the
/// decode mirror of a layer, `kv::DecodeMirror`). Products and sums are f32 either way: a
/// bf16 element widens to f32 exactly.
pub(crate) trait KvElement: Copy + Send + Sync + 'static {
    /// The element as f32 (exact for both).
    fn to_f32(self) -> f32;

    /// Sixteen elements from `p` as f32 lanes.
    ///
    /// # Safety
    /// `p` points at sixteen readable elements; the caller is compiled for AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;

    /// [`FewRows::scores`] where the AVX-512 kernels do not take the shape.
    fn few_scores(s: FewRows, scores: &mut [f32], q: &[f32], k: &[Self]) {
        let mut key = vec![0f32; s.d];
        for c in 0..s.w {
            for (x, y) in key.iter_mut().zip(&k[c * s.kv_stride..][..s.d]) {
                *x = y.to_f32();
            }
            for r in 0..s.rows {
                scores[r * s.score_stride + c] = dot(&q[r * s.d..][..s.d], &key);
            }
        }
    }

    /// [`FewRows::add_weighted`] where the AVX-512 kernels do not take the shape.
    fn few_weighted(s: FewRows, out: &mut [f32], p: &[f32], v: &[Self]) {
        for c in 0..s.w {
            let value = &v[c * s.kv_stride..][..s.d];
            for r in 0..s.rows {
                let weight = p[r * s.score_stride + c];
                if weight == 0.0 {
                    continue; // a masked key (or one whose 2^x underflowed)
                }
                for (o, x) in out[r * s.d..][..s.d].iter_mut().zip(value) {
                    *o += weight * x.to_f32();
                }
            }
        }
    }
}

impl KvElement for f32 {
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        // SAFETY: forwarded from the caller.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }

    fn few_scores(s: FewRows, scores: &mut [f32], q: &[f32], k: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F, the only feature the function is compiled for.
                return unsafe { few_scores_avx512(s, scores, q, k) };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has AVX2 and FMA, the features the function is compiled for.
                return unsafe { few_scores_avx2(s, scores, q, k) };
            }
        }
        few_scores(s, scores, q, k)
    }

    fn few_weighted(s: FewRows, out: &mut [f32], p: &[f32], v: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F, the only feature the function is compiled for.
                return unsafe { few_weighted_avx512(s, out, p, v) };
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has AVX2 and FMA, the features the function is compiled for.
                return unsafe { few_weighted_avx2(s, out, p, v) };
            }
        }
        few_weighted(s, out, p, v)
    }
}

impl KvElement for half::bf16 {
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: forwarded from the caller; a bf16 is the high half of the f32 it widens to
        // (`bf16` is a transparent `u16`).
        unsafe {
            let halves = _mm256_loadu_si256(p.cast());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(halves)))
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn few_scores_avx512(s: FewRows, scores: &mut [f32], q: &[f32], k: &[f32]) {
    few_scores(s, scores, q, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn few_scores_avx2(s: FewRows, scores: &mut [f32], q: &[f32], k: &[f32]) {
    few_scores(s, scores, q, k)
}

#[inline(always)]
fn few_scores(s: FewRows, scores: &mut [f32], q: &[f32], k: &[f32]) {
    for c in 0..s.w {
        if c + PREFETCH_ROWS < s.w {
            prefetch(&k[(c + PREFETCH_ROWS) * s.kv_stride..][..s.d]);
        }
        let key = &k[c * s.kv_stride..][..s.d];
        for r in 0..s.rows {
            scores[r * s.score_stride + c] = dot(&q[r * s.d..][..s.d], key);
        }
    }
}

/// Key (value) rows ahead of the one read that [`FewRows`] asks the cache for: the rows are
/// strided, one KV head's part of each, and waiting for them is what bounds the loops.
const PREFETCH_ROWS: usize = 8;

/// Asks the CPU to bring `row`'s cache lines in (a hint; no effect on results).
#[inline(always)]
pub(crate) fn prefetch<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    for at in (0..std::mem::size_of_val(row)).step_by(64) {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: a prefetch reads nothing architecturally; the address is within `row`.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().cast::<i8>().add(at)) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// `a · b` in sixteen lanes (so that it vectorises), then the tail.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ac, bc) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..16 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn few_weighted_avx512(s: FewRows, out: &mut [f32], p: &[f32], v: &[f32]) {
    few_weighted(s, out, p, v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn few_weighted_avx2(s: FewRows, out: &mut [f32], p: &[f32], v: &[f32]) {
    few_weighted(s, out, p, v)
}

#[inline(always)]
fn few_weighted(s: FewRows, out: &mut [f32], p: &[f32], v: &[f32]) {
    for c in 0..s.w {
        if c + PREFETCH_ROWS < s.w {
            prefetch(&v[(c + PREFETCH_ROWS) * s.kv_stride..][..s.d]);
        }
        let value = &v[c * s.kv_stride..][..s.d];
        for r in 0..s.rows {
            let weight = p[r * s.score_stride + c];
            if weight == 0.0 {
                continue; // a masked key (or one whose 2^x underflowed)
            }
            for (o, x) in out[r * s.d..][..s.d].iter_mut().zip(value) {
                *o += weight * x;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn exp2_is_accurate_over_its_range() {
        let mut xs: Vec<f32> = (0..=200_000).map(|i| -(i as f32) * 1e-3 * 0.6).collect();
        let want: Vec<f64> = xs.iter().map(|&x| (x as f64).exp2()).collect();
        let sum = exp2_in_place(&mut xs, 0.0);
        for (g, w) in xs.iter().zip(&want) {
            assert!(((*g as f64) - w).abs() <= 3e-7 * w, "{g} vs {w}");
        }
        assert!((sum as f64 - want.iter().sum::<f64>()).abs() < 1e-4 * sum as f64);
        let mut tiny = [-1000.0f32, f32::MIN];
        exp2_in_place(&mut tiny, 0.0);
        assert!(tiny.iter().all(|&x| x.is_finite() && x < 1e-37));
    }

    /// Few-row scores and weighted sums against f64 loops, at a head size with a tail past
    /// the sixteen lanes, strided rows and a score row wider than the tile; f32 and bf16 rows.
    #[test]
    fn few_rows_match_plain_loops() {
        let shape = FewRows {
            rows: 3,
            w: 37,
            d: 70,
            kv_stride: 3 * 70 + 5,
            score_stride: 40,
        };
        few_rows_match_f64(
            shape,
            |x| x,
            |s, out, q, k| s.scores(out, q, k),
            |s, out, p, v| s.add_weighted(out, p, v),
        );
        few_rows_match_f64(
            shape,
            half::bf16::from_f32,
            |s, out, q, k| s.scores(out, q, k),
            |s, out, p, v| s.add_weighted(out, p, v),
        );
    }

    /// Checks an implementation of [`FewRows::scores`] and [`FewRows::add_weighted`] at
    /// `shape` against f64 loops: weights with zero (masked) entries, sums added onto what the
    /// output rows held.
    pub(crate) fn few_rows_match_f64<T: KvElement>(
        shape: FewRows,
        element: impl Fn(f32) -> T,
        scores: impl Fn(FewRows, &mut [f32], &[f32], &[T]),
        add_weighted: impl Fn(FewRows, &mut [f32], &[f32], &[T]),
    ) {
        let FewRows {
            rows,
            w,
            d,
            kv_stride,
            score_stride,
        } = shape;
        let val = |i: usize| ((i * 7919) % 1000) as f32 / 500.0 - 1.0;
        let q: Vec<f32> = (0..rows * d).map(val).collect();
        let kv: Vec<T> = (0..w.max(1) * kv_stride)
            .map(|i| element(val(i + 17)))
            .collect();
        let mut got = vec![f32::NAN; rows * score_stride];
        scores(shape, &mut got, &q, &kv);
        for r in 0..rows {
            for c in 0..w {
                let want: f64 = (0..d)
                    .map(|x| q[r * d + x] as f64 * kv[c * kv_stride + x].to_f32() as f64)
                    .sum();
                let g = got[r * score_stride + c] as f64;
                assert!(
                    (g - want).abs() < 1e-4,
                    "{shape:?} score ({r}, {c}): {g} vs {want}"
                );
            }
        }
        let p: Vec<f32> = (0..rows * score_stride)
            .map(|i| if i % 5 == 0 { 0.0 } else { val(i + 3).abs() })
            .collect();
        let before: Vec<f32> = (0..rows * d).map(|i| val(i + 11)).collect();
        let mut out = before.clone();
        add_weighted(shape, &mut out, &p, &kv);
        for r in 0..rows {
            for x in 0..d {
                let want = before[r * d + x] as f64
                    + (0..w)
                        .map(|c| {
                            p[r * score_stride + c] as f64 * kv[c * kv_stride + x].to_f32() as f64
                        })
                        .sum::<f64>();
                let g = out[r * d + x] as f64;
                assert!(
                    (g - want).abs() < 1e-4,
                    "{shape:?} out ({r}, {x}): {g} vs {want}"
                );
            }
        }
    }

    /// Few-row projections against candle's matmul: 1 to 8 rows, a weight whose output
    /// count is not a multiple of a task's, an input width with a tail past sixteen lanes.
    #[test]
    fn few_rows_linear_matches_matmul() {
        let (out, d) = (150, 37);
        let w = Tensor::randn(0f32, 1.0, (out, d), &Device::Cpu).unwrap();
        for n in [1, 2, 3, 8] {
            let x = Tensor::randn(0f32, 1.0, (n, d), &Device::Cpu).unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap();
            let got = few_rows_linear(&x, &w).unwrap();
            assert_eq!(got.dims(), [n, out]);
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-4, "{n} rows: max diff {diff}");
        }
        let x = Tensor::zeros((9, d), DType::F32, &Device::Cpu).unwrap();
        assert!(few_rows_linear(&x, &w).is_err(), "9 rows are not few");
    }

    /// The fused SwiGLU against candle's `silu(gate) * up` on values across the range the
    /// polynomial covers (|x| up to 100), rows split over several tasks: within 4e-6
    /// relative (both sides round in f32 with different `exp`s; 1e-6 failed about one run
    /// in a hundred on random inputs, at 1.06e-6).
    #[test]
    fn swiglu_matches_candle() {
        let (n, inter) = (37, 53);
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 1.0, (n, 2 * inter), &dev).unwrap() * 12.0).unwrap();
        let mut v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[0] = 100.0;
        v[1] = -100.0;
        v[2] = 0.0;
        v[3] = -1e-30;
        let x = Tensor::from_vec(v, (n, 2 * inter), &dev).unwrap();
        let got = swiglu(&x, inter).unwrap();
        let want = (candle_nn::ops::silu(&x.narrow(1, 0, inter).unwrap()).unwrap()
            * x.narrow(1, inter, inter).unwrap())
        .unwrap();
        let (g, w) = (
            got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            assert!(
                (a - b).abs() <= 4e-6 * b.abs().max(1e-3),
                "element {i}: {a} vs {b}"
            );
        }
        // a strided view (the projection's rows) is read the same
        let wide = Tensor::cat(&[&x, &x], 1)
            .unwrap()
            .narrow(1, 0, 2 * inter)
            .unwrap();
        assert_eq!(
            swiglu(&wide, inter)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            g
        );
        assert!(swiglu(&x, inter + 1).is_err());
    }
}
