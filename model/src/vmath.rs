//! Vectorised f32 math for the CPU paths: a maximum, `2^x` over slices (the tiled
//! attention's softmax), and SwiGLU (`silu(gate) * up`) in one pass. Loops are written so
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
fn exp2_nonpositive(x: f32) -> f32 {
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
    let gate_up = gate_up.contiguous()?;
    let (storage, layout) = gate_up.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(invalid_input("CPU SwiGLU takes a CPU tensor"));
    };
    let src = &cpu.as_slice::<f32>()?[layout.start_offset()..layout.start_offset() + n * width];
    let mut out = vec![0f32; n * inter];
    out.par_chunks_mut(inter * SWIGLU_ROWS_PER_TASK)
        .zip(src.par_chunks(width * SWIGLU_ROWS_PER_TASK))
        .for_each(|(o, s)| {
            for (o, row) in o.chunks_exact_mut(inter).zip(s.chunks_exact(width)) {
                let (g, u) = row.split_at(inter);
                swiglu_row(g, u, o);
            }
        });
    drop(storage);
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

#[cfg(test)]
mod tests {
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

    /// The fused SwiGLU against candle's `silu(gate) * up` on values across the range the
    /// polynomial covers (|x| up to 100), rows split over several tasks.
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
                (a - b).abs() <= 1e-6 * b.abs().max(1e-3),
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
